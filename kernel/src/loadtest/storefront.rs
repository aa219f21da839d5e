//! The load test's storefront: GraphQL over HTTP as a shop's pages call it,
//! and one WebSocket per customer carrying `orderStatusChanged`
//! subscriptions (`graphql-transport-ws`), several at a time, as a browser
//! tab watching its orders does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// A failed call, by the code the report counts it under: a GraphQL error
/// code (`INSUFFICIENT_STOCK`), `HTTP_<status>`, `TRANSPORT`, `TIMEOUT`,
/// `WS_CLOSED`, or the final status of an order that did not confirm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    /// What the report counts it under.
    pub code: String,
    /// What went wrong, in the server's or the transport's words.
    pub message: String,
}

impl CallError {
    /// A failure counted under `code`.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> CallError {
        CallError {
            code: code.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// GraphQL over HTTP against one kernel.
#[derive(Clone)]
pub struct Storefront {
    http: reqwest::Client,
    graphql_url: String,
    ws_url: String,
}

impl Storefront {
    /// A storefront for the kernel at `base_url` (`http://host:port`).
    pub fn new(base_url: &str) -> Result<Storefront, CallError> {
        let base = base_url.trim_end_matches('/');
        let ws_base = if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            return Err(CallError::new(
                "INVALID_URL",
                format!("`{base_url}` is not an http:// or https:// URL"),
            ));
        };
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .build()
            .map_err(|error| CallError::new("TRANSPORT", error.to_string()))?;
        Ok(Storefront {
            http,
            graphql_url: format!("{base}/graphql"),
            ws_url: format!("{ws_base}/graphql"),
        })
    }

    /// Runs a mutation and returns `data.<field>`; an error if the response
    /// has top-level errors or the payload has `errors`.
    pub async fn mutate(
        &self,
        token: &str,
        field: &str,
        query: &str,
        variables: Value,
    ) -> Result<Value, CallError> {
        let body = self.graphql(token, query, variables).await?;
        let payload = body["data"][field].clone();
        if let Some(first) = payload["errors"]
            .as_array()
            .and_then(|errors| errors.first())
        {
            return Err(CallError::new(
                first["code"].as_str().unwrap_or("UNKNOWN"),
                first["message"].as_str().unwrap_or_default(),
            ));
        }
        Ok(payload)
    }

    /// Runs one GraphQL operation; the whole response, or the first error.
    pub async fn graphql(
        &self,
        token: &str,
        query: &str,
        variables: Value,
    ) -> Result<Value, CallError> {
        let response = self
            .http
            .post(&self.graphql_url)
            .bearer_auth(token)
            .json(&json!({ "query": query, "variables": variables }))
            .send()
            .await
            .map_err(|error| CallError::new("TRANSPORT", error.to_string()))?;
        let status = response.status();
        let body: Value = response.json().await.map_err(|error| {
            CallError::new(format!("HTTP_{}", status.as_u16()), error.to_string())
        })?;
        if let Some(first) = body["errors"].as_array().and_then(|errors| errors.first()) {
            return Err(CallError::new(
                first["extensions"]["code"]
                    .as_str()
                    .map_or_else(|| format!("HTTP_{}", status.as_u16()), str::to_string),
                first["message"].as_str().unwrap_or_default(),
            ));
        }
        if !status.is_success() {
            return Err(CallError::new(
                format!("HTTP_{}", status.as_u16()),
                body.to_string(),
            ));
        }
        Ok(body)
    }

    /// Opens a subscription connection authenticated as `token`.
    pub async fn live(&self, token: &str) -> Result<LiveOrders, CallError> {
        LiveOrders::connect(&self.ws_url, token).await
    }
}

/// Order statuses after which an order never changes again.
pub const FINAL_STATUSES: [&str; 3] = ["CONFIRMED", "CANCELLED", "FAILED"];

const WATCH: &str = "subscription ($id: UUID!) { orderStatusChanged(orderId: $id) { status } }";

/// Who waits on one subscription: for its final status only, or for
/// every status it reports.
enum Waiter {
    Final(oneshot::Sender<Result<String, CallError>>),
    Each(mpsc::UnboundedSender<Result<String, CallError>>),
}

impl Waiter {
    /// The subscription ended with `outcome`.
    fn finish(self, outcome: Result<String, CallError>) {
        match self {
            Waiter::Final(waiter) => {
                let _ = waiter.send(outcome);
            }
            Waiter::Each(waiter) => {
                let _ = waiter.send(outcome);
            }
        }
    }
}

type Waiters = Arc<Mutex<HashMap<String, Waiter>>>;

fn waiters(waiters: &Waiters) -> MutexGuard<'_, HashMap<String, Waiter>> {
    waiters
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One customer's WebSocket: any number of order subscriptions at once,
/// each ending at the order's final status.
pub struct LiveOrders {
    outgoing: mpsc::UnboundedSender<Message>,
    waiters: Waiters,
    next_id: AtomicU64,
}

impl LiveOrders {
    async fn connect(url: &str, token: &str) -> Result<LiveOrders, CallError> {
        let closed = |error: &dyn std::fmt::Display| CallError::new("WS_CLOSED", error.to_string());
        let mut request = url.into_client_request().map_err(|e| closed(&e))?;
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static("graphql-transport-ws"),
        );
        // Without Nagle's algorithm, as browsers open WebSockets. A small
        // read buffer: tungstenite zeroes all of it before every read, and
        // the load test is to measure the kernel, not its own memset.
        let config = WebSocketConfig::default().read_buffer_size(4 * 1024);
        let (socket, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), true)
            .await
            .map_err(|e| closed(&e))?;
        let (mut sink, mut stream) = socket.split();
        let init = json!({ "type": "connection_init", "payload": { "authorization": format!("Bearer {token}") } });
        sink.send(Message::text(init.to_string()))
            .await
            .map_err(|e| closed(&e))?;
        loop {
            let message = stream
                .next()
                .await
                .ok_or_else(|| CallError::new("WS_CLOSED", "closed before connection_ack"))?
                .map_err(|e| closed(&e))?;
            match message {
                Message::Text(text) => {
                    let parsed: Value = serde_json::from_str(&text).unwrap_or_default();
                    match parsed["type"].as_str() {
                        Some("connection_ack") => break,
                        Some("ping") => {}
                        _ => return Err(CallError::new("UNAUTHENTICATED", text.to_string())),
                    }
                }
                // The server refused the connection (a bad token): say why.
                Message::Close(frame) => {
                    return Err(CallError::new(
                        "UNAUTHENTICATED",
                        frame.map_or("closed before connection_ack".to_string(), |frame| {
                            format!("{} {}", frame.code, frame.reason)
                        }),
                    ));
                }
                _ => {}
            }
        }

        let (outgoing, mut to_send) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(message) = to_send.recv().await {
                if sink.send(message).await.is_err() {
                    break;
                }
            }
        });
        let waiting = Waiters::default();
        let reader_waiting = Arc::clone(&waiting);
        let replies = outgoing.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                on_message(&text, &reader_waiting, &replies);
            }
            for (_, waiter) in waiters(&reader_waiting).drain() {
                waiter.finish(Err(CallError::new(
                    "WS_CLOSED",
                    "the subscription connection closed",
                )));
            }
        });
        Ok(LiveOrders {
            outgoing,
            waiters: waiting,
            next_id: AtomicU64::new(1),
        })
    }

    /// Subscribes to `order_id`; the receiver gets its final status (or why
    /// the subscription ended without one).
    pub fn watch(&self, order_id: &str) -> oneshot::Receiver<Result<String, CallError>> {
        let (done, receiver) = oneshot::channel();
        self.subscribe(order_id, Waiter::Final(done));
        receiver
    }

    /// Subscribes to `order_id`; the receiver gets each status as it
    /// changes, from PENDING on, and closes after the final one (or after
    /// why the subscription ended without one).
    pub fn follow(&self, order_id: &str) -> mpsc::UnboundedReceiver<Result<String, CallError>> {
        let (each, receiver) = mpsc::unbounded_channel();
        self.subscribe(order_id, Waiter::Each(each));
        receiver
    }

    fn subscribe(&self, order_id: &str, waiter: Waiter) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed).to_string();
        waiters(&self.waiters).insert(id.clone(), waiter);
        let subscribe = json!({
            "id": id,
            "type": "subscribe",
            "payload": { "query": WATCH, "variables": { "id": order_id } },
        });
        if self
            .outgoing
            .send(Message::text(subscribe.to_string()))
            .is_err()
            && let Some(waiter) = waiters(&self.waiters).remove(&id)
        {
            waiter.finish(Err(CallError::new("WS_CLOSED", "the connection closed")));
        }
    }
}

/// Handles one server message: a final status ends its subscription.
fn on_message(text: &str, waiting: &Waiters, replies: &mpsc::UnboundedSender<Message>) {
    let Ok(message) = serde_json::from_str::<Value>(text) else {
        return;
    };
    let id = message["id"].as_str().unwrap_or_default().to_string();
    let finish = |outcome: Result<String, CallError>| {
        if let Some(waiter) = waiters(waiting).remove(&id) {
            waiter.finish(outcome);
        }
    };
    match message["type"].as_str() {
        Some("ping") => {
            let _ = replies.send(Message::text(json!({ "type": "pong" }).to_string()));
        }
        Some("next") => {
            if let Some(errors) = message["payload"]["errors"].as_array()
                && let Some(first) = errors.first()
            {
                finish(Err(CallError::new(
                    first["extensions"]["code"]
                        .as_str()
                        .unwrap_or("SUBSCRIPTION"),
                    first["message"].as_str().unwrap_or_default(),
                )));
                return;
            }
            let status = message["payload"]["data"]["orderStatusChanged"]["status"]
                .as_str()
                .unwrap_or_default();
            if !FINAL_STATUSES.contains(&status) {
                if status.is_empty() {
                    return;
                }
                if let Some(Waiter::Each(each)) = waiters(waiting).get(&id) {
                    let _ = each.send(Ok(status.to_string()));
                }
                return;
            }
            finish(Ok(status.to_string()));
            let complete = json!({ "id": id, "type": "complete" });
            let _ = replies.send(Message::text(complete.to_string()));
        }
        Some("error") => finish(Err(CallError::new(
            "SUBSCRIPTION",
            message["payload"].to_string(),
        ))),
        Some("complete") => finish(Err(CallError::new(
            "SUBSCRIPTION",
            "the subscription ended before a final status",
        ))),
        _ => {}
    }
}
