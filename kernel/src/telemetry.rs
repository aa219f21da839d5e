//! Telemetry: the process's log lines and traces, and the W3C trace context
//! that ties one order's work together.
//!
//! [`Telemetry::init`] installs the one `tracing` subscriber of the process:
//! log lines (text or JSON, filtered by `COMMERCE_LOG`) and an OpenTelemetry
//! layer that gives every span a trace id and a span id. Spans are exported
//! over OTLP/HTTP when an endpoint is configured ([`TraceExport`]) and
//! dropped otherwise; the ids are used either way:
//! - a request's span continues the caller's `traceparent` header, or starts
//!   a trace ([`request_span`]);
//! - every appended event records the trace context it was written in
//!   ([`current`], `EventMetadata::trace_parent`), and so does a saga's row
//!   when the saga starts;
//! - the saga runner continues that trace for each drive of the saga, on
//!   whichever process claims it ([`continue_trace`]);
//! - a plugin's outbound HTTP request carries a `traceparent` header
//!   ([`inject_current`], called by the plugin host).
//!
//! The kernel's spans use the target [`TARGET`], which is enabled whatever
//! `COMMERCE_LOG` says: a log line written inside one (a warning during a
//! saga step, say) always carries its `trace_id` and `correlation_id`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::{self, ConfigError, LogFormat};

/// The target of the kernel's spans (requests, GraphQL operations, saga
/// drives and steps, plugin calls): always enabled, see the module docs.
pub const TARGET: &str = commerce_plugin_host::TRACE_TARGET;

/// How long one export of spans may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where traces go: OTLP over HTTP with protobuf, from the standard
/// OpenTelemetry variables (see [`config`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceExport {
    /// The full URL spans are posted to (`.../v1/traces`).
    pub traces_url: String,
}

/// What [`Telemetry::init`] sets up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// A `tracing` filter directive such as `info` or `commerce_kernel=debug`.
    pub log_filter: String,
    pub log_format: LogFormat,
    /// `None`: spans get ids and are propagated, but are not exported.
    pub traces: Option<TraceExport>,
    /// Continue the trace of a request's `traceparent` header; otherwise
    /// each request starts a trace and links the caller's.
    pub trust_traceparent: bool,
}

/// Errors setting up telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot set up the OTLP span exporter: {0}")]
    Exporter(String),
    #[error("a tracing subscriber is installed already")]
    AlreadyInstalled,
}

/// The process's telemetry; [`Telemetry::shutdown`] sends the spans not yet
/// exported.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Installs the process's `tracing` subscriber. Exports (when configured)
    /// run on `runtime`, from a thread of the OpenTelemetry SDK's own.
    pub fn init(
        config: &TelemetryConfig,
        runtime: tokio::runtime::Handle,
    ) -> Result<Telemetry, TelemetryError> {
        let filter = tracing_subscriber::EnvFilter::try_new(&config.log_filter)
            .map_err(|e| ConfigError {
                variable: config::LOG,
                reason: format!("`{}` is not a tracing filter ({e})", config.log_filter),
            })?
            .add_directive(
                format!("{TARGET}=info")
                    .parse()
                    .map_err(|e| TelemetryError::Exporter(format!("{e}")))?,
            );
        let provider = tracer_provider(config.traces.as_ref(), runtime)?;
        // Ids come from the `tracing` span tree, so OpenTelemetry's own
        // current context, idle timing and code locations are not needed:
        // each costs on every poll or span of the hot path.
        let traces = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("commerce-kernel"))
            .with_threads(false)
            .with_context_activation(false)
            .with_tracked_inactivity(false)
            .with_location(false);
        // Colours only on a terminal: log files and journald get plain text.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout())
            && std::env::var_os("NO_COLOR").is_none();
        let lines = tracing_subscriber::fmt::layer();
        let registry = tracing_subscriber::registry().with(filter).with(traces);
        let installed = match config.log_format {
            LogFormat::Text => registry.with(lines.with_ansi(ansi)).try_init(),
            LogFormat::Json => registry
                .with(
                    lines
                        .json()
                        .flatten_event(true)
                        .with_current_span(true)
                        .with_span_list(true),
                )
                .try_init(),
        };
        installed.map_err(|_| TelemetryError::AlreadyInstalled)?;
        Ok(Telemetry { provider })
    }

    /// Exports every finished span now (tests; the SDK exports batches
    /// every few seconds on its own).
    pub fn flush(&self) {
        if let Err(error) = self.provider.force_flush() {
            tracing::warn!(%error, "could not export spans");
        }
    }

    /// Exports the spans not yet exported and stops exporting.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "could not export the last spans");
        }
    }
}

fn tracer_provider(
    export: Option<&TraceExport>,
    runtime: tokio::runtime::Handle,
) -> Result<SdkTracerProvider, TelemetryError> {
    let mut resource = Resource::builder().with_attribute(opentelemetry::KeyValue::new(
        "service.version",
        env!("CARGO_PKG_VERSION"),
    ));
    // OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES (read by the SDK) name
    // the service when they do.
    let named = std::env::var_os("OTEL_SERVICE_NAME").is_some()
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES")
            .is_ok_and(|attributes| attributes.contains("service.name="));
    if !named {
        resource = resource.with_service_name("commerce-kernel");
    }
    let builder = SdkTracerProvider::builder().with_resource(resource.build());
    let Some(export) = export else {
        // Nothing records: spans still get ids (and pass on the caller's
        // sampling decision), but none is built to be thrown away.
        return Ok(builder
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)))
            .build());
    };
    let client = reqwest::Client::builder()
        .timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(export.traces_url.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .with_http_client(ExportClient {
            client,
            runtime,
            last_warning: std::sync::atomic::AtomicU64::new(0),
        })
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    Ok(builder.with_batch_exporter(exporter).build())
}

/// The exporter's HTTP client: the kernel's reqwest (rustls, so `https`
/// collectors work too), run on the kernel's runtime. The SDK calls it from
/// a thread of its own, where no runtime is.
#[derive(Debug)]
struct ExportClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
    /// When the last failure was logged, in seconds since the epoch.
    last_warning: std::sync::atomic::AtomicU64,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for ExportClient {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let sent = self.runtime.spawn(async move {
            let request = reqwest::Request::try_from(request)?;
            let response = client.execute(request).await?;
            let mut answer = http::Response::builder().status(response.status());
            if let Some(headers) = answer.headers_mut() {
                *headers = response.headers().clone();
            }
            let body = response.bytes().await?;
            Ok::<_, opentelemetry_http::HttpError>(answer.body(body)?)
        });
        let answer = sent.await?;
        match &answer {
            Ok(response) if response.status().is_success() => {}
            Ok(response) => self.warn(&format!("the collector answered {}", response.status())),
            Err(error) => self.warn(&error.to_string()),
        }
        answer
    }
}

impl ExportClient {
    /// Says that spans were lost, at most once a minute.
    fn warn(&self, problem: &str) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        let last = self.last_warning.load(std::sync::atomic::Ordering::Relaxed);
        if now >= last + 60
            && self
                .last_warning
                .compare_exchange(
                    last,
                    now,
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                )
                .is_ok()
        {
            tracing::warn!(%problem, "could not export spans; traces will have gaps");
        }
    }
}

/// A W3C trace context (`traceparent`): the trace, the span that was
/// current, and whether the trace is sampled. Stored with events and saga
/// rows as `00-<trace id>-<span id>-<flags>`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: TraceId,
    span_id: SpanId,
    flags: TraceFlags,
}

impl TraceParent {
    fn of(context: &SpanContext) -> Option<TraceParent> {
        context.is_valid().then(|| TraceParent {
            trace_id: context.trace_id(),
            span_id: context.span_id(),
            flags: context.trace_flags(),
        })
    }

    /// The trace's id, 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        self.trace_id.to_string()
    }

    /// The context as a remote parent of a span of this process.
    fn as_parent(&self) -> opentelemetry::Context {
        opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            self.trace_id,
            self.span_id,
            self.flags,
            true,
            TraceState::NONE,
        ))
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id,
            self.span_id,
            self.flags.to_u8()
        )
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Text that is not a version-00 `traceparent` with non-zero ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a W3C traceparent (00-<32 hex digits>-<16 hex digits>-<2 hex digits>)")]
pub struct InvalidTraceParent;

impl FromStr for TraceParent {
    type Err = InvalidTraceParent;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let lower_hex = |part: &str, len: usize| {
            part.len() == len && part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        let mut parts = text.split('-');
        let (Some("00"), Some(trace), Some(span), Some(flags), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(InvalidTraceParent);
        };
        if !(lower_hex(trace, 32) && lower_hex(span, 16) && lower_hex(flags, 2)) {
            return Err(InvalidTraceParent);
        }
        let parsed = TraceParent {
            trace_id: TraceId::from_hex(trace).map_err(|_| InvalidTraceParent)?,
            span_id: SpanId::from_hex(span).map_err(|_| InvalidTraceParent)?,
            flags: TraceFlags::new(u8::from_str_radix(flags, 16).map_err(|_| InvalidTraceParent)?),
        };
        if parsed.trace_id == TraceId::INVALID || parsed.span_id == SpanId::INVALID {
            return Err(InvalidTraceParent);
        }
        Ok(parsed)
    }
}

impl serde::Serialize for TraceParent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for TraceParent {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The trace context of the current span; `None` outside any span (or
/// when [`Telemetry::init`] was not called, as in an embedding program).
pub fn current() -> Option<TraceParent> {
    let span = Span::current();
    if span.is_none() {
        return None;
    }
    TraceParent::of(span.context().span().span_context())
}

/// The span of one HTTP request: with `trust_traceparent`, it continues the
/// trace of the request's `traceparent` header; otherwise (or without one)
/// it starts a trace, linked to the caller's if there is one, so that a
/// caller cannot choose the trace id recorded with the order or whether it
/// is sampled. Its `trace_id` is recorded for the log lines; the GraphQL
/// handler records the request's `correlation_id`.
pub fn request_span<B>(request: &http::Request<B>, trust_traceparent: bool) -> Span {
    let span = tracing::info_span!(
        target: TARGET,
        "request",
        otel.kind = "server",
        method = %request.method(),
        uri = %request.uri(),
        trace_id = tracing::field::Empty,
        correlation_id = tracing::field::Empty,
    );
    let caller = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
    let caller = caller.span().span_context().clone();
    if trust_traceparent {
        continue_trace(&span, TraceParent::of(&caller));
    } else {
        if caller.is_valid() {
            span.add_link(caller);
        }
        continue_trace(&span, None);
    }
    span
}

/// Makes `span` a child of `parent` (a trace context stored with a saga,
/// say), or the root of a new trace when there is none, and records its
/// `trace_id` field. Call it before the span is first entered.
pub fn continue_trace(span: &Span, parent: Option<TraceParent>) {
    if let Some(parent) = parent {
        // Fails only without the OpenTelemetry layer (nothing to continue
        // then) or for a span already entered (a caller's bug, kept quiet).
        let _ = span.set_parent(parent.as_parent());
    }
    if let Some(trace) = TraceParent::of(span.context().span().span_context()) {
        span.record("trace_id", tracing::field::display(trace.trace_id));
    }
}

/// Adds the current span's `traceparent` to an outbound request's headers
/// (replacing one the plugin set). Nothing outside a span.
pub fn inject_current(headers: &mut http::HeaderMap) {
    let span = Span::current();
    if span.is_none() {
        return;
    }
    let context = span.context();
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(headers));
        // The kernel keeps no trace state: no empty `tracestate` header.
        if headers
            .get("tracestate")
            .is_some_and(|value| value.is_empty())
        {
            headers.remove("tracestate");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_parents_round_trip_and_odd_text_is_refused() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed: TraceParent = text.parse().expect("valid");
        assert_eq!(parsed.to_string(), text);
        assert_eq!(parsed.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        for odd in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-00",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47361-0f067aa0ba902b7-01",
        ] {
            assert_eq!(odd.parse::<TraceParent>(), Err(InvalidTraceParent), "{odd}");
        }
    }

    #[test]
    fn without_the_layer_nothing_is_current() {
        let span = tracing::info_span!(target: TARGET, "request");
        let _entered = span.enter();
        assert_eq!(current(), None);
    }
}
