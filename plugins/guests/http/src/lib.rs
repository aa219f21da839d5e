//! A blocking JSON client on `wasi:http/outgoing-handler`, shared by the
//! HTTP adapter plugins.
//!
//! The host decides which hosts a plugin may reach (its manifest's
//! `allowed_hosts`) and how long a call may take; this crate only speaks
//! HTTP and sorts answers into the contract's two kinds of failure:
//!
//! | answer | failure |
//! | --- | --- |
//! | 2xx | none |
//! | 408, 409, 425, 429, 5xx, no answer | transient: retry with the same key |
//! | any other 4xx | permanent |
//!
//! A provider's error body `{"error": {"code", "message"}}` is passed on.

use serde::Serialize;
use serde::de::DeserializeOwned;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme,
};
use wasip2::io::streams::StreamError;

/// Why a request did not produce a usable 2xx answer, in the contract's terms.
#[derive(Debug)]
pub enum HttpFailure {
    Permanent { code: String, message: String },
    Transient { code: String, message: String },
}

impl HttpFailure {
    fn transient(code: &str, message: impl Into<String>) -> Self {
        HttpFailure::Transient {
            code: code.to_string(),
            message: message.into(),
        }
    }

    fn permanent(code: &str, message: impl Into<String>) -> Self {
        HttpFailure::Permanent {
            code: code.to_string(),
            message: message.into(),
        }
    }
}

/// Answers larger than this are refused rather than buffered.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// A provider's API at `base_url` ("http://127.0.0.1:8080/v1").
pub struct JsonClient {
    scheme: Scheme,
    authority: String,
    base_path: String,
    bearer_token: Option<String>,
}

impl JsonClient {
    /// Parses `base_url`; only `http` and `https` are accepted.
    pub fn new(base_url: &str, bearer_token: Option<String>) -> Result<Self, HttpFailure> {
        let (scheme, rest) = if let Some(rest) = base_url.strip_prefix("https://") {
            (Scheme::Https, rest)
        } else if let Some(rest) = base_url.strip_prefix("http://") {
            (Scheme::Http, rest)
        } else {
            return Err(HttpFailure::permanent(
                "invalid_config",
                format!("base_url {base_url:?} must start with http:// or https://"),
            ));
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.is_empty() {
            return Err(HttpFailure::permanent(
                "invalid_config",
                format!("base_url {base_url:?} names no host"),
            ));
        }
        Ok(JsonClient {
            scheme,
            authority: authority.to_string(),
            base_path: format!("/{}", path.trim_end_matches('/')),
            bearer_token,
        })
    }

    /// POSTs `body` as JSON to `path` under the base URL, with the
    /// `Idempotency-Key` header when one is given, and decodes a 2xx answer.
    pub fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        idempotency_key: Option<&str>,
        body: &B,
    ) -> Result<R, HttpFailure> {
        let body = serde_json::to_vec(body)
            .map_err(|error| HttpFailure::permanent("invalid_request", error.to_string()))?;
        let answer = self.send(Method::Post, path, idempotency_key, Some(&body))?;
        decode(answer)
    }

    /// GETs `path_and_query` under the base URL and decodes a 2xx answer.
    pub fn get<R: DeserializeOwned>(&self, path_and_query: &str) -> Result<R, HttpFailure> {
        let answer = self.send(Method::Get, path_and_query, None, None)?;
        decode(answer)
    }

    fn send(
        &self,
        method: Method,
        path: &str,
        idempotency_key: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), HttpFailure> {
        let mut headers: Vec<(String, Vec<u8>)> =
            vec![("accept".to_string(), b"application/json".to_vec())];
        if body.is_some() {
            headers.push(("content-type".to_string(), b"application/json".to_vec()));
        }
        if let Some(key) = idempotency_key {
            headers.push(("idempotency-key".to_string(), key.as_bytes().to_vec()));
        }
        if let Some(token) = &self.bearer_token {
            headers.push((
                "authorization".to_string(),
                format!("Bearer {token}").into_bytes(),
            ));
        }
        let headers = Fields::from_list(&headers)
            .map_err(|error| HttpFailure::permanent("invalid_request", format!("{error:?}")))?;
        let request = OutgoingRequest::new(headers);
        let path_with_query = format!("{}{}", self.base_path.trim_end_matches('/'), path);
        let refused = |what: &str| HttpFailure::permanent("invalid_request", format!("bad {what}"));
        request
            .set_method(&method)
            .map_err(|()| refused("method"))?;
        request
            .set_scheme(Some(&self.scheme))
            .map_err(|()| refused("scheme"))?;
        request
            .set_authority(Some(&self.authority))
            .map_err(|()| refused("authority"))?;
        request
            .set_path_with_query(Some(&path_with_query))
            .map_err(|()| refused("path"))?;

        let outgoing = request.body().map_err(|()| refused("body"))?;
        if let Some(body) = body {
            let stream = outgoing.write().map_err(|()| refused("body stream"))?;
            for chunk in body.chunks(4096) {
                stream
                    .blocking_write_and_flush(chunk)
                    .map_err(|error| HttpFailure::transient("network", format!("{error:?}")))?;
            }
        }
        // The whole body is written before the request goes out, so the
        // provider never answers a request it has not read in full.
        OutgoingBody::finish(outgoing, None).map_err(network)?;
        // No deadline of our own: the host bounds the whole invocation.
        let future =
            outgoing_handler::handle(request, Some(RequestOptions::new())).map_err(network)?;
        future.subscribe().block();
        let response = match future.get() {
            Some(Ok(Ok(response))) => response,
            Some(Ok(Err(error))) => return Err(network(error)),
            Some(Err(())) | None => {
                return Err(HttpFailure::transient("network", "no response"));
            }
        };
        let status = response.status();
        let incoming = response
            .consume()
            .map_err(|()| HttpFailure::transient("network", "response body unavailable"))?;
        let answer = read_all(&incoming)?;
        drop(IncomingBody::finish(incoming));
        Ok((status, answer))
    }
}

/// `text` with everything but unreserved characters percent-encoded, for a
/// query value or a path segment (a provider's reference may hold anything).
pub fn percent_encoded(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// A 2xx answer decoded, or the provider's failure in the contract's terms.
fn decode<R: DeserializeOwned>((status, answer): (u16, Vec<u8>)) -> Result<R, HttpFailure> {
    if (200..300).contains(&status) {
        return serde_json::from_slice(&answer).map_err(|error| {
            HttpFailure::transient(
                "invalid_response",
                format!("the provider answered {status} with a body that does not parse: {error}"),
            )
        });
    }
    let (code, message) = provider_error(&answer).unwrap_or_else(|| {
        (
            format!("http_{status}"),
            format!("the provider answered {status}"),
        )
    });
    if matches!(status, 408 | 409 | 425 | 429) || status >= 500 {
        Err(HttpFailure::Transient { code, message })
    } else {
        Err(HttpFailure::Permanent { code, message })
    }
}

/// A request that got no answer. One the host refused (a host outside the
/// manifest's `allowed_hosts`) fails the same way every time.
fn network(error: ErrorCode) -> HttpFailure {
    match error {
        ErrorCode::HttpRequestDenied => HttpFailure::permanent(
            "request_denied",
            "the kernel refused the request: the host is not in the plugin's allowed_hosts",
        ),
        other => HttpFailure::transient("network", format!("{other:?}")),
    }
}

fn read_all(body: &IncomingBody) -> Result<Vec<u8>, HttpFailure> {
    let stream = body
        .stream()
        .map_err(|()| HttpFailure::transient("network", "response body unavailable"))?;
    let mut answer = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => {
                answer.extend_from_slice(&chunk);
                if answer.len() > MAX_RESPONSE_BYTES {
                    return Err(HttpFailure::transient(
                        "invalid_response",
                        "the provider's answer is larger than 1 MiB",
                    ));
                }
            }
            Err(StreamError::Closed) => return Ok(answer),
            Err(StreamError::LastOperationFailed(error)) => {
                return Err(HttpFailure::transient("network", error.to_debug_string()));
            }
        }
    }
}

/// `{"error": {"code": "...", "message": "..."}}`, when the body is that.
fn provider_error(body: &[u8]) -> Option<(String, String)> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let error = value.get("error")?;
    let code = error.get("code")?.as_str()?.to_string();
    let message = error
        .get("message")
        .and_then(|m| m.as_str())
        .unwrap_or("")
        .to_string();
    Some((code, message))
}
