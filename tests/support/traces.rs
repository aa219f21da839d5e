//! A fake OpenTelemetry collector (OTLP over HTTP with protobuf, as a real
//! collector's port 4318 takes it) and this test process's telemetry,
//! installed once and exporting to it.
//!
//! The subscriber is the process's: every kernel a test binary starts after
//! [`collector`] exports its spans here. Tests pick theirs by trace id.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use commerce_kernel::config::LogFormat;
use commerce_kernel::telemetry::{Telemetry, TelemetryConfig, TraceExport};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use prost::Message as _;

/// One span as the collector received it.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    pub name: String,
    /// 32 lowercase hex digits.
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// String attributes (other kinds as their debug text).
    pub attributes: BTreeMap<String, String>,
}

/// The collector and the telemetry sending to it.
pub struct Collector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    telemetry: Telemetry,
}

impl Collector {
    /// Exports every finished span now, then returns those of `trace_id`.
    pub fn spans_of(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.telemetry.flush();
        self.spans
            .lock()
            .expect("spans")
            .iter()
            .filter(|span| span.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

/// The process's collector, started (and telemetry installed) on first use.
/// Logs are off: only spans are wanted, and the suite's output stays quiet.
pub fn collector() -> &'static Collector {
    static COLLECTOR: OnceLock<Collector> = OnceLock::new();
    COLLECTOR.get_or_init(|| {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let (started, address) = std::sync::mpsc::channel();
        let received = Arc::clone(&spans);
        // Its own runtime, which outlives every test's: the exporter sends
        // from it.
        std::thread::Builder::new()
            .name("fake-collector".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .expect("collector runtime");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                        .await
                        .expect("bind the collector");
                    let app = Router::new()
                        .route("/v1/traces", post(receive))
                        .with_state(received);
                    started
                        .send((
                            listener.local_addr().expect("address"),
                            tokio::runtime::Handle::current(),
                        ))
                        .expect("report the address");
                    let _ = axum::serve(listener, app).await;
                });
            })
            .expect("collector thread");
        let (address, runtime) = address.recv().expect("collector started");
        let telemetry = Telemetry::init(
            &TelemetryConfig {
                log_filter: "off".into(),
                log_format: LogFormat::Text,
                traces: Some(TraceExport {
                    traces_url: format!("http://{address}/v1/traces"),
                }),
                trust_traceparent: true,
            },
            runtime,
        )
        .expect("telemetry");
        Collector { spans, telemetry }
    })
}

async fn receive(State(spans): State<Arc<Mutex<Vec<ReceivedSpan>>>>, body: Bytes) -> &'static str {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return "not an export request";
    };
    let mut spans = spans.lock().expect("spans");
    for resource in request.resource_spans {
        for scope in resource.scope_spans {
            for span in scope.spans {
                let attributes = span
                    .attributes
                    .iter()
                    .map(|kv| {
                        let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                            Some(any_value::Value::StringValue(text)) => text.clone(),
                            other => format!("{other:?}"),
                        };
                        (kv.key.clone(), value)
                    })
                    .collect();
                spans.push(ReceivedSpan {
                    name: span.name,
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent_span_id: hex::encode(&span.parent_span_id),
                    attributes,
                });
            }
        }
    }
    "ok"
}
