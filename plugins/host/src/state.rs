//! What a store holds during one invocation: the plugin's grants, its memory
//! limiter, and the host imports it may call.

use std::collections::BTreeMap;
use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::bindings::payment::commerce::plugin::{config, log};
use crate::bindings::v0_1::payment::commerce::plugin::{config as config_v0_1, log as log_v0_1};
use crate::manifest::HostPattern;
use crate::outbound::{OutboundHeaders, OutboundHttp};

/// Log lines one invocation may write; more are dropped, so a chatty plugin
/// cannot flood the kernel's log.
const MAX_LOG_LINES: u32 = 32;
/// Characters of one log line kept.
const MAX_LOG_LINE: usize = 1024;

/// The per-plugin part of an invocation's state, shared by all invocations
/// of one loaded version.
#[derive(Debug)]
pub(crate) struct Grants {
    /// `name@version`, for log lines.
    pub label: String,
    pub config: BTreeMap<String, String>,
    pub allowed_hosts: Vec<HostPattern>,
    pub memory_bytes: usize,
    /// Where allowed requests go out (a connection pool of this version's).
    pub outbound: OutboundHttp,
    /// What the kernel adds to each of them.
    pub outbound_headers: Option<OutboundHeaders>,
}

/// The `T` of `Store<T>`: created fresh for every invocation.
pub(crate) struct InvocationState {
    grants: Arc<Grants>,
    table: ResourceTable,
    /// Built on first use: a pure step never pays for it.
    wasi: Option<WasiCtx>,
    http: WasiHttpCtx,
    hooks: AllowedHosts,
    log_lines: u32,
    /// Set when the plugin asked for more memory than it may have, so a trap
    /// that follows is reported as what it is.
    pub memory_refused: bool,
}

impl InvocationState {
    pub(crate) fn new(grants: Arc<Grants>) -> Self {
        let hooks = AllowedHosts {
            grants: Arc::clone(&grants),
        };
        InvocationState {
            grants,
            table: ResourceTable::new(),
            wasi: None,
            http: WasiHttpCtx::new(),
            hooks,
            log_lines: 0,
            memory_refused: false,
        }
    }
}

/// The sandboxed WASI runtime: no arguments, no environment, no files, no
/// sockets, stdin empty, stdout and stderr discarded. Clocks and random work.
fn sandboxed_wasi() -> WasiCtx {
    let mut builder = WasiCtx::builder();
    builder
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    builder.build()
}

impl WasiView for InvocationState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: self.wasi.get_or_insert_with(sandboxed_wasi),
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for InvocationState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// Lets a request through only to the manifest's `allowed_hosts`.
struct AllowedHosts {
    grants: Arc<Grants>,
}

type ResponseFuture = Box<
    dyn Future<
            Output = wasmtime_wasi_http::Result<(
                http::Response<wasmtime_wasi_http::WasiBody>,
                Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
            )>,
        > + Send,
>;

impl WasiHttpHooks for AllowedHosts {
    fn send_request(
        &mut self,
        mut request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> ResponseFuture {
        let uri = request.uri();
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let allowed = uri.host().is_some_and(|host| {
            self.grants
                .allowed_hosts
                .iter()
                .any(|pattern| pattern.allows(host, port))
        });
        if !allowed {
            tracing::warn!(
                plugin = %self.grants.label,
                uri = %uri,
                "plugin request to a host outside its allowed_hosts refused"
            );
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        // Here, not in the future below: this runs within the invocation's
        // span, the future may not.
        if let Some(headers) = &self.grants.outbound_headers {
            headers.add_to(request.headers_mut());
        }
        let outbound = self.grants.outbound.clone();
        Box::new(async move {
            let response = outbound.send(request, options).await?;
            // The pool drives its connections: nothing for the caller to run.
            let io = async { Ok(()) };
            Ok((response, Box::new(io) as Box<dyn Future<Output = _> + Send>))
        })
    }
}

impl log::Host for InvocationState {
    fn log(&mut self, level: log::Level, message: String) {
        self.log_lines += 1;
        if self.log_lines > MAX_LOG_LINES {
            return;
        }
        // One line per call, whatever the plugin sent: no forged log lines.
        let mut message: String = message
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if message.len() > MAX_LOG_LINE {
            let mut end = MAX_LOG_LINE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        let plugin = self.grants.label.as_str();
        match level {
            log::Level::Debug => tracing::debug!(plugin, "{message}"),
            log::Level::Info => tracing::info!(plugin, "{message}"),
            log::Level::Warn => tracing::warn!(plugin, "{message}"),
            log::Level::Error => tracing::error!(plugin, "{message}"),
        }
    }
}

impl config::Host for InvocationState {
    fn get(&mut self, key: String) -> Option<String> {
        self.grants.config.get(&key).cloned()
    }
}

/// Components built against `commerce:plugin@0.1.0` import the same
/// functions under the old version.
impl log_v0_1::Host for InvocationState {
    fn log(&mut self, level: log_v0_1::Level, message: String) {
        let level = match level {
            log_v0_1::Level::Debug => log::Level::Debug,
            log_v0_1::Level::Info => log::Level::Info,
            log_v0_1::Level::Warn => log::Level::Warn,
            log_v0_1::Level::Error => log::Level::Error,
        };
        log::Host::log(self, level, message);
    }
}

impl config_v0_1::Host for InvocationState {
    fn get(&mut self, key: String) -> Option<String> {
        config::Host::get(self, key)
    }
}

impl wasmtime::ResourceLimiter for InvocationState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.grants.memory_bytes {
            self.memory_refused = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}
