//! The load test's provider stub: a payment service and a carrier on one
//! loopback port, speaking the HTTP APIs the `payment-http` and
//! `shipping-http` plugins call, and keeping a ledger the load test audits
//! at the end (one captured payment and one live shipment per order).
//!
//! Like a real provider it honours `Idempotency-Key`: a repeated request
//! gets the first answer and changes nothing. It never fails on purpose;
//! the test suites' fakes (`tests/fakes`) inject failures, this measures.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::LoadtestError;

/// A payment as the stub keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StubPayment {
    pub order_id: String,
    pub amount: String,
    pub currency: String,
    /// `captured`, `authorized`, `refunded` or `cancelled`.
    pub status: String,
}

/// A shipment as the stub keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StubShipment {
    pub order_id: String,
    pub cancelled: bool,
}

#[derive(Default)]
struct Ledger {
    /// Every answer given to a writing request, by idempotency key.
    answers: HashMap<String, (StatusCode, Value)>,
    payments: HashMap<String, StubPayment>,
    shipments: HashMap<String, StubShipment>,
    /// The payment or shipment each creating key made.
    created_by: HashMap<String, String>,
    requests: u64,
}

type Shared = Arc<Mutex<Ledger>>;

fn lock(ledger: &Shared) -> MutexGuard<'_, Ledger> {
    // A handler that panicked cannot leave the ledger half-changed: every
    // change is a single insert made after all checks.
    ledger
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The running stub. Dropping it stops the server.
pub struct ProviderStub {
    pub address: SocketAddr,
    ledger: Shared,
    server: JoinHandle<()>,
}

impl Drop for ProviderStub {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// What the ledger holds for one order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OrderLedger {
    /// Payments captured and not refunded.
    pub captured: usize,
    /// Every payment made for the order, whatever its status.
    pub payments: usize,
    /// Shipments not cancelled.
    pub live_shipments: usize,
}

impl ProviderStub {
    /// Starts the stub on `127.0.0.1:port` (0: any free port).
    pub async fn start(port: u16) -> Result<ProviderStub, LoadtestError> {
        let ledger = Shared::default();
        let app = Router::new()
            .route("/payments", post(create_payment).get(find_payments))
            .route("/payments/{id}/{action}", post(payment_action))
            .route("/rates", post(rates))
            .route("/shipments", post(create_shipment).get(find_shipments))
            .route("/shipments/{id}/cancel", post(cancel_shipment))
            .with_state(Arc::clone(&ledger));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .map_err(|error| {
                LoadtestError::Stub(format!("cannot bind 127.0.0.1:{port}: {error}"))
            })?;
        let address = listener
            .local_addr()
            .map_err(|error| LoadtestError::Stub(error.to_string()))?;
        // Answers go out at once, as a provider's would (see server.rs).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let server = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::error!(%error, "the load test's provider stub stopped");
            }
        });
        Ok(ProviderStub {
            address,
            ledger,
            server,
        })
    }

    /// `http://127.0.0.1:<port>`, the plugins' `base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Requests the stub has answered, repeats included.
    pub fn requests(&self) -> u64 {
        lock(&self.ledger).requests
    }

    /// The ledger, by order id.
    pub fn by_order(&self) -> HashMap<String, OrderLedger> {
        let ledger = lock(&self.ledger);
        let mut orders: HashMap<String, OrderLedger> = HashMap::new();
        for payment in ledger.payments.values() {
            let entry = orders.entry(payment.order_id.clone()).or_default();
            entry.payments += 1;
            if payment.status == "captured" {
                entry.captured += 1;
            }
        }
        for shipment in ledger.shipments.values() {
            let entry = orders.entry(shipment.order_id.clone()).or_default();
            if !shipment.cancelled {
                entry.live_shipments += 1;
            }
        }
        orders
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> (StatusCode, Json<Value>) {
    (
        status,
        Json(json!({ "error": { "code": code, "message": message } })),
    )
}

/// The request's idempotency key, or the answer to give instead: the
/// recorded one for a repeat, or a 400 without a key.
fn admit(ledger: &mut Ledger, headers: &HeaderMap) -> Result<String, (StatusCode, Json<Value>)> {
    ledger.requests += 1;
    let key = headers
        .get("idempotency-key")
        .and_then(|value| value.to_str().ok())
        .filter(|key| !key.is_empty())
        .ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "missing_idempotency_key",
                "send Idempotency-Key",
            )
        })?;
    match ledger.answers.get(key) {
        Some((status, body)) => Err((*status, Json(body.clone()))),
        None => Ok(key.to_string()),
    }
}

/// Records the answer to `key` and returns it.
fn answer(
    ledger: &mut Ledger,
    key: String,
    status: StatusCode,
    body: Value,
) -> (StatusCode, Json<Value>) {
    ledger.answers.insert(key, (status, body.clone()));
    (status, Json(body))
}

fn text(body: &Value, field: &str) -> String {
    body.get(field)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn payment_json(id: &str, payment: &StubPayment) -> Value {
    json!({
        "id": id,
        "status": payment.status,
        "amount": payment.amount,
        "currency": payment.currency,
    })
}

async fn create_payment(
    State(ledger): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let mut ledger = lock(&ledger);
    let key = match admit(&mut ledger, &headers) {
        Ok(key) => key,
        Err(recorded) => return recorded,
    };
    let capture = body
        .get("capture")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let id = format!("pay_{}", ledger.payments.len() + 1);
    let payment = StubPayment {
        order_id: text(&body, "order_id"),
        amount: text(&body, "amount"),
        currency: text(&body, "currency"),
        status: if capture { "captured" } else { "authorized" }.to_string(),
    };
    let json = payment_json(&id, &payment);
    ledger.created_by.insert(key.clone(), id.clone());
    ledger.payments.insert(id, payment);
    answer(&mut ledger, key, StatusCode::CREATED, json)
}

async fn payment_action(
    State(ledger): State<Shared>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
) -> (StatusCode, Json<Value>) {
    let mut ledger = lock(&ledger);
    let key = match admit(&mut ledger, &headers) {
        Ok(key) => key,
        Err(recorded) => return recorded,
    };
    let Some(payment) = ledger.payments.get_mut(&id) else {
        return error(StatusCode::NOT_FOUND, "unknown_payment", "no such payment");
    };
    let next = match (action.as_str(), payment.status.as_str()) {
        ("capture", "authorized") => "captured",
        ("refund", "captured") => "refunded",
        ("cancel", "authorized") => "cancelled",
        ("capture" | "refund" | "cancel", _) => {
            return error(
                StatusCode::CONFLICT,
                "invalid_state",
                "not possible in this state",
            );
        }
        _ => return error(StatusCode::NOT_FOUND, "unknown_action", "no such action"),
    };
    payment.status = next.to_string();
    let json = payment_json(&id, payment);
    answer(&mut ledger, key, StatusCode::OK, json)
}

/// `?idempotency_key=` of a lookup.
#[derive(Deserialize)]
struct KeyQuery {
    idempotency_key: String,
}

async fn find_payments(State(ledger): State<Shared>, Query(query): Query<KeyQuery>) -> Json<Value> {
    let mut ledger = lock(&ledger);
    ledger.requests += 1;
    let found: Vec<Value> = ledger
        .created_by
        .get(&query.idempotency_key)
        .and_then(|id| Some(payment_json(id, ledger.payments.get(id)?)))
        .into_iter()
        .collect();
    Json(json!({ "data": found }))
}

async fn rates(State(ledger): State<Shared>, Json(body): Json<Value>) -> Json<Value> {
    lock(&ledger).requests += 1;
    let currency = body
        .get("currency")
        .and_then(Value::as_str)
        .unwrap_or("EUR");
    Json(json!({ "rates": [
        { "service": "standard", "amount": "4.90", "currency": currency, "estimated_days": 3 },
    ]}))
}

fn shipment_json(id: &str) -> Value {
    json!({
        "id": id,
        "tracking_number": format!("TRK-{id}"),
        "label_url": format!("https://labels.invalid/{id}"),
    })
}

async fn create_shipment(
    State(ledger): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let mut ledger = lock(&ledger);
    let key = match admit(&mut ledger, &headers) {
        Ok(key) => key,
        Err(recorded) => return recorded,
    };
    let id = format!("shp_{}", ledger.shipments.len() + 1);
    ledger.shipments.insert(
        id.clone(),
        StubShipment {
            order_id: text(&body, "order_id"),
            cancelled: false,
        },
    );
    ledger.created_by.insert(key.clone(), id.clone());
    answer(&mut ledger, key, StatusCode::CREATED, shipment_json(&id))
}

async fn find_shipments(
    State(ledger): State<Shared>,
    Query(query): Query<KeyQuery>,
) -> Json<Value> {
    let mut ledger = lock(&ledger);
    ledger.requests += 1;
    let found: Vec<Value> = ledger
        .created_by
        .get(&query.idempotency_key)
        .filter(|id| ledger.shipments.contains_key(*id))
        .map(|id| shipment_json(id))
        .into_iter()
        .collect();
    Json(json!({ "data": found }))
}

async fn cancel_shipment(
    State(ledger): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> (StatusCode, Json<Value>) {
    let mut ledger = lock(&ledger);
    let key = match admit(&mut ledger, &headers) {
        Ok(key) => key,
        Err(recorded) => return recorded,
    };
    let Some(shipment) = ledger.shipments.get_mut(&id) else {
        return error(
            StatusCode::NOT_FOUND,
            "unknown_shipment",
            "no such shipment",
        );
    };
    shipment.cancelled = true;
    answer(
        &mut ledger,
        key,
        StatusCode::OK,
        json!({ "id": id, "status": "cancelled" }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn repeats_answer_once_and_the_ledger_counts_per_order() {
        let stub = ProviderStub::start(0).await.expect("stub");
        let client = reqwest::Client::new();
        let pay = |key: &'static str| {
            client
                .post(format!("{}/payments", stub.base_url()))
                .header("Idempotency-Key", key)
                .json(&json!({ "order_id": "o1", "amount": "10.00", "currency": "EUR", "capture": true }))
                .send()
        };
        let first: Value = pay("k1").await.expect("pay").json().await.expect("json");
        let again: Value = pay("k1").await.expect("pay").json().await.expect("json");
        assert_eq!(first, again, "a repeat gets the first answer");
        let ship = client
            .post(format!("{}/shipments", stub.base_url()))
            .header("Idempotency-Key", "s1")
            .json(&json!({ "order_id": "o1", "service": "standard" }))
            .send()
            .await
            .expect("ship");
        assert_eq!(ship.status(), StatusCode::CREATED);
        let ledger = stub.by_order();
        assert_eq!(
            ledger.get("o1"),
            Some(&OrderLedger {
                captured: 1,
                payments: 1,
                live_shipments: 1
            })
        );
        pay("k2").await.expect("second charge");
        assert_eq!(stub.by_order()["o1"].captured, 2, "a double charge shows");
    }
}
