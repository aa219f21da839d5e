//! `OutboundHttp`: how a plugin's `wasi:http` requests leave the kernel,
//! once `state::AllowedHosts` has let them through.
//!
//! One pooled client per loaded plugin version (hyper-util's client with a
//! rustls connector), instead of wasmtime-wasi-http's default of a new TCP
//! connection per request:
//! - connections to a provider are kept alive and reused, so a call pays no
//!   TCP (or TLS) handshake;
//! - `TCP_NODELAY` is set: a request's head and body are written separately,
//!   and with Nagle's algorithm the body waits for the provider's delayed
//!   acknowledgement of the head, about 40 ms per call on Linux.
//!
//! Timeouts: the request's `connect-timeout` plus `first-byte-timeout`
//! bound the wait for the response head (600 s each when the plugin sets
//! none). The invocation's own deadline bounds everything else.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody};

/// The wait for a connection or a first byte when the plugin sets none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long an unused connection stays open for the next call: shorter
/// than most providers' own idle limits, so the kernel closes first.
const IDLE_CONNECTION: Duration = Duration::from_secs(20);

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Headers the kernel adds to every request a plugin sends (its trace
/// context), replacing any the plugin set. Called as the request leaves,
/// within the invocation's span.
#[derive(Clone)]
pub struct OutboundHeaders(Arc<dyn Fn(&mut http::HeaderMap) + Send + Sync>);

impl OutboundHeaders {
    pub fn new(add: impl Fn(&mut http::HeaderMap) + Send + Sync + 'static) -> OutboundHeaders {
        OutboundHeaders(Arc::new(add))
    }

    pub(crate) fn add_to(&self, headers: &mut http::HeaderMap) {
        (self.0)(headers)
    }
}

impl std::fmt::Debug for OutboundHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutboundHeaders")
    }
}

/// A plugin version's HTTP client; cheap to clone (the pool is shared).
#[derive(Clone)]
pub(crate) struct OutboundHttp {
    client: Client<Connector, WasiBody>,
}

impl std::fmt::Debug for OutboundHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutboundHttp")
    }
}

impl OutboundHttp {
    pub(crate) fn new() -> OutboundHttp {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            // The timer sweeps idle connections of versions no longer called.
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(IDLE_CONNECTION)
            .build(connector);
        OutboundHttp { client }
    }

    /// Sends `request` and returns the response with its body streaming.
    pub(crate) async fn send(
        &self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
    ) -> Result<http::Response<WasiBody>, Error> {
        let connect = options
            .and_then(|o| o.connect_timeout)
            .unwrap_or(DEFAULT_TIMEOUT);
        let first_byte = options
            .and_then(|o| o.first_byte_timeout)
            .unwrap_or(DEFAULT_TIMEOUT);
        let response = tokio::time::timeout(
            connect.saturating_add(first_byte),
            self.client.request(request),
        )
        .await
        .map_err(|_| Error::ConnectionTimeout)?
        .map_err(failure)?;
        Ok(response.map(|body| body.map_err(Error::from).boxed_unsync()))
    }
}

/// What a plugin sees of a failed request: it could not connect, or the
/// connection failed on the way (both transient to the HTTP adapters).
fn failure(error: hyper_util::client::legacy::Error) -> Error {
    if error.is_connect() {
        Error::ConnectionRefused
    } else {
        Error::ConnectionTerminated
    }
}
