//! Fake payment and shipping services for tests: real HTTP on 127.0.0.1,
//! speaking the APIs the `payment-http` and `shipping-http` plugins expect,
//! each keeping a ledger keyed by idempotency key.
//!
//! Failure injection:
//! - payment method `tok_decline`: 402 `card_declined` (recorded, replayed);
//! - payment method `tok_slow`: the charge is recorded, then the answer is
//!   held for [`SLOW_RESPONSE`], past any test plugin's deadline; a retry
//!   with the same key gets the recorded answer at once;
//! - [`FakePayments::fail_next`] / [`FakeShipping::fail_next`]: the next
//!   requests get HTTP 500 and are not recorded;
//! - a shipping address in country `XX`: 422 `address_refused`.
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{Value, json};

/// How long a `tok_slow` answer is held.
pub const SLOW_RESPONSE: Duration = Duration::from_secs(3);

type Answer = (StatusCode, Json<Value>);

/// One payment as the fake provider keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakePayment {
    pub id: String,
    pub order_id: String,
    pub amount: String,
    pub currency: String,
    pub status: String,
    pub refunded: bool,
}

#[derive(Default)]
struct PaymentLedger {
    /// Every answer given, by idempotency key, replayed on a repeat.
    answers: BTreeMap<String, Answer>,
    payments: BTreeMap<String, FakePayment>,
    /// Requests that reached the service, including repeats and failures.
    requests: u64,
    fail_next: u32,
}

/// The fake payment service. Dropping it stops the server.
pub struct FakePayments {
    pub address: SocketAddr,
    ledger: Arc<Mutex<PaymentLedger>>,
    _server: Loopback,
}

impl FakePayments {
    pub async fn start() -> FakePayments {
        let ledger = Arc::new(Mutex::new(PaymentLedger::default()));
        let app = Router::new()
            .route("/payments", post(create_payment))
            .route("/payments/{id}/{action}", post(payment_action))
            .with_state(Arc::clone(&ledger));
        let (address, server) = serve(app).await;
        FakePayments {
            address,
            ledger,
            _server: server,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The next `count` requests fail with HTTP 500 before touching the ledger.
    pub fn fail_next(&self, count: u32) {
        self.ledger.lock().expect("ledger").fail_next = count;
    }

    /// Payments recorded for `order_id` (a charge or authorization each).
    pub fn payments_for(&self, order_id: &str) -> Vec<FakePayment> {
        let ledger = self.ledger.lock().expect("ledger");
        ledger
            .payments
            .values()
            .filter(|p| p.order_id == order_id)
            .cloned()
            .collect()
    }

    pub fn payments(&self) -> Vec<FakePayment> {
        self.ledger
            .lock()
            .expect("ledger")
            .payments
            .values()
            .cloned()
            .collect()
    }

    pub fn requests(&self) -> u64 {
        self.ledger.lock().expect("ledger").requests
    }
}

/// A server task on a loopback port, stopped when dropped.
struct Loopback(tokio::task::JoinHandle<()>);

impl Drop for Loopback {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn serve(app: Router) -> (SocketAddr, Loopback) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let address = listener.local_addr().expect("local address");
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (address, Loopback(server))
}

fn error(status: StatusCode, code: &str, message: &str) -> Answer {
    (
        status,
        Json(json!({ "error": { "code": code, "message": message } })),
    )
}

/// The idempotency key, the recorded answer if the key was seen, or an
/// injected failure.
fn admit<L>(
    ledger: &Mutex<L>,
    headers: &HeaderMap,
    access: impl Fn(&mut L) -> (&mut u64, &mut u32, &mut BTreeMap<String, Answer>),
) -> Result<String, Answer> {
    let mut ledger = ledger.lock().expect("ledger");
    let (requests, fail_next, answers) = access(&mut ledger);
    *requests += 1;
    if *fail_next > 0 {
        *fail_next -= 1;
        return Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "injected failure",
        ));
    }
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
    match answers.get(key) {
        Some(answer) => Err(answer.clone()),
        None => Ok(key.to_string()),
    }
}

fn payment_access(l: &mut PaymentLedger) -> (&mut u64, &mut u32, &mut BTreeMap<String, Answer>) {
    (&mut l.requests, &mut l.fail_next, &mut l.answers)
}

fn payment_json(payment: &FakePayment) -> Value {
    json!({
        "id": payment.id,
        "status": payment.status,
        "amount": payment.amount,
        "currency": payment.currency,
    })
}

async fn create_payment(
    State(ledger): State<Arc<Mutex<PaymentLedger>>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Answer {
    let key = match admit(&ledger, &headers, payment_access) {
        Ok(key) => key,
        Err(answer) => return answer,
    };
    let text = |field: &str| {
        body.get(field)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let method = text("payment_method");
    let (answer, slow) = {
        let mut ledger = ledger.lock().expect("ledger");
        let answer = if method == "tok_decline" {
            error(
                StatusCode::PAYMENT_REQUIRED,
                "card_declined",
                "the card was declined",
            )
        } else {
            let capture = body
                .get("capture")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let payment = FakePayment {
                id: format!("pay_{}", ledger.payments.len() + 1),
                order_id: text("order_id"),
                amount: text("amount"),
                currency: text("currency"),
                status: if capture { "captured" } else { "authorized" }.to_string(),
                refunded: false,
            };
            let answer = (StatusCode::CREATED, Json(payment_json(&payment)));
            ledger.payments.insert(payment.id.clone(), payment);
            answer
        };
        ledger.answers.insert(key, answer.clone());
        (answer, method == "tok_slow")
    };
    if slow {
        tokio::time::sleep(SLOW_RESPONSE).await;
    }
    answer
}

async fn payment_action(
    State(ledger): State<Arc<Mutex<PaymentLedger>>>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
    Json(_body): Json<Value>,
) -> Answer {
    let key = match admit(&ledger, &headers, payment_access) {
        Ok(key) => key,
        Err(answer) => return answer,
    };
    let mut ledger = ledger.lock().expect("ledger");
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
    payment.refunded = next == "refunded";
    let answer = (StatusCode::OK, Json(payment_json(payment)));
    ledger.answers.insert(key, answer.clone());
    answer
}

/// One shipment as the fake carrier keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeShipment {
    pub id: String,
    pub order_id: String,
    pub service: String,
    pub cancelled: bool,
}

#[derive(Default)]
struct ShippingLedger {
    answers: BTreeMap<String, Answer>,
    shipments: BTreeMap<String, FakeShipment>,
    requests: u64,
    fail_next: u32,
}

fn shipping_access(l: &mut ShippingLedger) -> (&mut u64, &mut u32, &mut BTreeMap<String, Answer>) {
    (&mut l.requests, &mut l.fail_next, &mut l.answers)
}

/// The fake carrier. Dropping it stops the server.
pub struct FakeShipping {
    pub address: SocketAddr,
    ledger: Arc<Mutex<ShippingLedger>>,
    _server: Loopback,
}

impl FakeShipping {
    pub async fn start() -> FakeShipping {
        let ledger = Arc::new(Mutex::new(ShippingLedger::default()));
        let app = Router::new()
            .route("/rates", post(rates))
            .route("/shipments", post(create_shipment))
            .route("/shipments/{id}/cancel", post(cancel_shipment))
            .with_state(Arc::clone(&ledger));
        let (address, server) = serve(app).await;
        FakeShipping {
            address,
            ledger,
            _server: server,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn fail_next(&self, count: u32) {
        self.ledger.lock().expect("ledger").fail_next = count;
    }

    pub fn shipments(&self) -> Vec<FakeShipment> {
        self.ledger
            .lock()
            .expect("ledger")
            .shipments
            .values()
            .cloned()
            .collect()
    }
}

async fn rates(
    State(ledger): State<Arc<Mutex<ShippingLedger>>>,
    Json(body): Json<Value>,
) -> Answer {
    {
        let mut ledger = ledger.lock().expect("ledger");
        ledger.requests += 1;
        if ledger.fail_next > 0 {
            ledger.fail_next -= 1;
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "injected failure",
            );
        }
    }
    let currency = body
        .get("currency")
        .and_then(Value::as_str)
        .unwrap_or("EUR");
    (
        StatusCode::OK,
        Json(json!({ "rates": [
            { "service": "standard", "amount": "4.90", "currency": currency, "estimated_days": 3 },
            { "service": "express", "amount": "12.50", "currency": currency, "estimated_days": 1 },
        ]})),
    )
}

async fn create_shipment(
    State(ledger): State<Arc<Mutex<ShippingLedger>>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Answer {
    let key = match admit(&ledger, &headers, shipping_access) {
        Ok(key) => key,
        Err(answer) => return answer,
    };
    let mut ledger = ledger.lock().expect("ledger");
    let country = body
        .pointer("/address/country")
        .and_then(Value::as_str)
        .unwrap_or("");
    let answer = if country == "XX" {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "address_refused",
            "we do not ship there",
        )
    } else {
        let number = ledger.shipments.len() + 1;
        let shipment = FakeShipment {
            id: format!("shp_{number}"),
            order_id: body
                .get("order_id")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            service: body
                .get("service")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            cancelled: false,
        };
        let answer = (
            StatusCode::CREATED,
            Json(json!({
                "id": shipment.id,
                "tracking_number": format!("TRK{number:06}"),
                "label_url": format!("https://labels.invalid/{}", shipment.id),
            })),
        );
        ledger.shipments.insert(shipment.id.clone(), shipment);
        answer
    };
    ledger.answers.insert(key, answer.clone());
    answer
}

async fn cancel_shipment(
    State(ledger): State<Arc<Mutex<ShippingLedger>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(_body): Json<Value>,
) -> Answer {
    let key = match admit(&ledger, &headers, shipping_access) {
        Ok(key) => key,
        Err(answer) => return answer,
    };
    let mut ledger = ledger.lock().expect("ledger");
    let Some(shipment) = ledger.shipments.get_mut(&id) else {
        return error(
            StatusCode::NOT_FOUND,
            "unknown_shipment",
            "no such shipment",
        );
    };
    shipment.cancelled = true;
    let answer = (
        StatusCode::OK,
        Json(json!({ "id": id, "status": "cancelled" })),
    );
    ledger.answers.insert(key, answer.clone());
    answer
}
