//! Fake payment and shipping services for tests: real HTTP on 127.0.0.1,
//! speaking the APIs the `payment-http` and `shipping-http` plugins expect,
//! each keeping a ledger keyed by idempotency key.
//!
//! Both answer `GET /payments?idempotency_key=` (`/shipments?…`) with what
//! a key created, for the plugins' `lookup`.
//!
//! Failure injection:
//! - payment method `tok_decline`: 402 `card_declined` (recorded, replayed);
//!   the `tok_decline_*` methods of [`HOSTILE_DECLINES`] decline with hostile
//!   text (two lines, 20 KB, control characters, HTML, bytes that are not
//!   UTF-8);
//! - payment method `tok_auth_only`: every payment is only authorized, even
//!   a charge that asked for capture, as some providers answer;
//!   `tok_capture_refused` too, and its capture is refused (402);
//! - payment method `tok_odd_reference`: the payment is made, and its id
//!   holds a tab, a newline and markup;
//! - payment method `tok_slow`: the charge is recorded, then the answer is
//!   held for [`SLOW_RESPONSE`], past any test plugin's deadline; a retry
//!   with the same key gets the recorded answer at once;
//! - [`FakePayments::fail_next`] / [`FakeShipping::fail_next`]: the next
//!   requests (lookups included) get HTTP 500 and are not recorded;
//! - a shipping address in country `XX`: 422 `address_refused`.
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// How long a `tok_slow` answer is held.
pub const SLOW_RESPONSE: Duration = Duration::from_secs(3);

/// Payment methods the fake declines with hostile text, and what it sends.
pub const HOSTILE_DECLINES: [&str; 5] = [
    "tok_decline_multiline",
    "tok_decline_huge",
    "tok_decline_control",
    "tok_decline_html",
    "tok_decline_binary",
];

/// A recorded answer: status and body, replayed byte for byte.
#[derive(Clone, Debug)]
struct Answer {
    status: StatusCode,
    body: Vec<u8>,
    content_type: &'static str,
}

impl Answer {
    fn json(status: StatusCode, body: Value) -> Answer {
        Answer {
            status,
            body: body.to_string().into_bytes(),
            content_type: "application/json",
        }
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        (
            self.status,
            [(header::CONTENT_TYPE, self.content_type)],
            self.body,
        )
            .into_response()
    }
}

/// The decline a `tok_decline*` payment method asks for, if it is one.
fn decline(method: &str) -> Option<Answer> {
    let declined = |code: &str, message: &str| {
        Answer::json(
            StatusCode::PAYMENT_REQUIRED,
            json!({ "error": { "code": code, "message": message } }),
        )
    };
    let raw = |content_type: &'static str, body: Vec<u8>| Answer {
        status: StatusCode::PAYMENT_REQUIRED,
        body,
        content_type,
    };
    Some(match method {
        "tok_decline" => declined("card_declined", "the card was declined"),
        "tok_decline_multiline" => declined(
            "card_declined",
            "Your card was declined.\nPlease try another card.",
        ),
        "tok_decline_huge" => declined("card_declined", &"declined ".repeat(20 * 1024 / 9)),
        "tok_decline_control" => declined(
            "card\ndeclined <b>\u{0}",
            "no\u{0}\u{7}\u{1b}[31m\r\n\u{202e}gnirts\tmore",
        ),
        "tok_decline_html" => raw(
            "text/html",
            b"<!DOCTYPE html>\n<html><body><h1>402</h1>\n<p>Declined</p></body></html>".to_vec(),
        ),
        "tok_decline_binary" => raw("application/json", vec![0xff, 0xfe, b'{', 0x80, 0x00]),
        _ => return None,
    })
}

/// One payment as the fake provider keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakePayment {
    pub id: String,
    pub order_id: String,
    pub amount: String,
    pub currency: String,
    pub status: String,
    pub refunded: bool,
    /// The payment method it was made with.
    pub method: String,
}

#[derive(Default)]
struct PaymentLedger {
    /// Every answer given, by idempotency key, replayed on a repeat.
    answers: BTreeMap<String, Answer>,
    payments: BTreeMap<String, FakePayment>,
    /// The payment each creating key made.
    created_by: BTreeMap<String, String>,
    /// Requests that reached the service, including repeats and failures.
    requests: u64,
    /// Writing requests per idempotency key, repeats included.
    requests_by_key: BTreeMap<String, u64>,
    /// `lookup` requests answered.
    lookups: u64,
    fail_next: u32,
    /// The `traceparent` header of each writing request, in arrival order
    /// (empty for a request without one).
    traceparents: Vec<String>,
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
            .route("/payments", post(create_payment).get(find_payments))
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

    /// Writing requests that carried `key`, repeats included.
    pub fn requests_with_key(&self, key: &str) -> u64 {
        let ledger = self.ledger.lock().expect("ledger");
        ledger.requests_by_key.get(key).copied().unwrap_or(0)
    }

    /// `lookup` requests the service answered.
    pub fn lookups(&self) -> u64 {
        self.ledger.lock().expect("ledger").lookups
    }

    /// The `traceparent` header of each writing request ("" for none).
    pub fn traceparents(&self) -> Vec<String> {
        self.ledger.lock().expect("ledger").traceparents.clone()
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
    Answer::json(
        status,
        json!({ "error": { "code": code, "message": message } }),
    )
}

/// The parts of a ledger every request touches.
struct Admission<'a> {
    requests: &'a mut u64,
    requests_by_key: &'a mut BTreeMap<String, u64>,
    fail_next: &'a mut u32,
    answers: &'a mut BTreeMap<String, Answer>,
    traceparents: &'a mut Vec<String>,
}

/// Counts a request and applies an injected failure.
fn injected_failure(requests: &mut u64, fail_next: &mut u32) -> Option<Answer> {
    *requests += 1;
    if *fail_next > 0 {
        *fail_next -= 1;
        return Some(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "injected failure",
        ));
    }
    None
}

/// The idempotency key, the recorded answer if the key was seen, or an
/// injected failure.
fn admit<L>(
    ledger: &Mutex<L>,
    headers: &HeaderMap,
    access: impl Fn(&mut L) -> Admission<'_>,
) -> Result<String, Answer> {
    let mut ledger = ledger.lock().expect("ledger");
    let Admission {
        requests,
        requests_by_key,
        fail_next,
        answers,
        traceparents,
    } = access(&mut ledger);
    traceparents.push(
        headers
            .get("traceparent")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string(),
    );
    let header_key = headers
        .get("idempotency-key")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    *requests_by_key.entry(header_key.to_string()).or_default() += 1;
    if let Some(failure) = injected_failure(requests, fail_next) {
        return Err(failure);
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

fn payment_access(l: &mut PaymentLedger) -> Admission<'_> {
    Admission {
        requests: &mut l.requests,
        requests_by_key: &mut l.requests_by_key,
        fail_next: &mut l.fail_next,
        answers: &mut l.answers,
        traceparents: &mut l.traceparents,
    }
}

/// `?idempotency_key=` of a lookup.
#[derive(serde::Deserialize)]
struct KeyQuery {
    idempotency_key: String,
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
        let answer = if let Some(declined) = decline(&method) {
            declined
        } else {
            let capture = body
                .get("capture")
                .and_then(Value::as_bool)
                .unwrap_or(false)
                && !matches!(method.as_str(), "tok_auth_only" | "tok_capture_refused");
            let number = ledger.payments.len() + 1;
            let payment = FakePayment {
                id: if method == "tok_odd_reference" {
                    format!("pay_\t{number}\n<b>")
                } else {
                    format!("pay_{number}")
                },
                order_id: text("order_id"),
                amount: text("amount"),
                currency: text("currency"),
                status: if capture { "captured" } else { "authorized" }.to_string(),
                refunded: false,
                method: method.clone(),
            };
            let answer = Answer::json(StatusCode::CREATED, payment_json(&payment));
            ledger.created_by.insert(key.clone(), payment.id.clone());
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

/// `lookup`: the payment a key created, as it stands now.
async fn find_payments(
    State(ledger): State<Arc<Mutex<PaymentLedger>>>,
    Query(query): Query<KeyQuery>,
) -> Answer {
    let mut ledger = ledger.lock().expect("ledger");
    let ledger = &mut *ledger;
    if let Some(failure) = injected_failure(&mut ledger.requests, &mut ledger.fail_next) {
        return failure;
    }
    ledger.lookups += 1;
    let found: Vec<Value> = ledger
        .created_by
        .get(&query.idempotency_key)
        .and_then(|id| ledger.payments.get(id))
        .map(payment_json)
        .into_iter()
        .collect();
    Answer::json(StatusCode::OK, json!({ "data": found }))
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
    if action == "capture" && payment.method == "tok_capture_refused" {
        return error(
            StatusCode::PAYMENT_REQUIRED,
            "capture_refused",
            "the authorization cannot be captured",
        );
    }
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
    let answer = Answer::json(StatusCode::OK, payment_json(payment));
    ledger.answers.insert(key, answer.clone());
    answer
}

/// One shipment as the fake carrier keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeShipment {
    pub id: String,
    pub order_id: String,
    pub service: String,
    pub tracking_number: String,
    pub cancelled: bool,
}

#[derive(Default)]
struct ShippingLedger {
    answers: BTreeMap<String, Answer>,
    shipments: BTreeMap<String, FakeShipment>,
    created_by: BTreeMap<String, String>,
    requests: u64,
    requests_by_key: BTreeMap<String, u64>,
    lookups: u64,
    fail_next: u32,
    traceparents: Vec<String>,
}

fn shipping_access(l: &mut ShippingLedger) -> Admission<'_> {
    Admission {
        requests: &mut l.requests,
        requests_by_key: &mut l.requests_by_key,
        fail_next: &mut l.fail_next,
        answers: &mut l.answers,
        traceparents: &mut l.traceparents,
    }
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
            .route("/shipments", post(create_shipment).get(find_shipments))
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

    /// Writing requests that carried `key`, repeats included.
    pub fn requests_with_key(&self, key: &str) -> u64 {
        let ledger = self.ledger.lock().expect("ledger");
        ledger.requests_by_key.get(key).copied().unwrap_or(0)
    }

    /// The `traceparent` header of each writing request ("" for none).
    pub fn traceparents(&self) -> Vec<String> {
        self.ledger.lock().expect("ledger").traceparents.clone()
    }
}

fn shipment_json(shipment: &FakeShipment) -> Value {
    json!({
        "id": shipment.id,
        "tracking_number": shipment.tracking_number,
        "label_url": format!("https://labels.invalid/{}", shipment.id),
    })
}

/// `lookup`: the shipment a key created.
async fn find_shipments(
    State(ledger): State<Arc<Mutex<ShippingLedger>>>,
    Query(query): Query<KeyQuery>,
) -> Answer {
    let mut ledger = ledger.lock().expect("ledger");
    let ledger = &mut *ledger;
    if let Some(failure) = injected_failure(&mut ledger.requests, &mut ledger.fail_next) {
        return failure;
    }
    ledger.lookups += 1;
    let found: Vec<Value> = ledger
        .created_by
        .get(&query.idempotency_key)
        .and_then(|id| ledger.shipments.get(id))
        .map(shipment_json)
        .into_iter()
        .collect();
    Answer::json(StatusCode::OK, json!({ "data": found }))
}

async fn rates(
    State(ledger): State<Arc<Mutex<ShippingLedger>>>,
    Json(body): Json<Value>,
) -> Answer {
    {
        let mut ledger = ledger.lock().expect("ledger");
        let ledger = &mut *ledger;
        if let Some(failure) = injected_failure(&mut ledger.requests, &mut ledger.fail_next) {
            return failure;
        }
    }
    let currency = body
        .get("currency")
        .and_then(Value::as_str)
        .unwrap_or("EUR");
    Answer::json(
        StatusCode::OK,
        json!({ "rates": [
            { "service": "standard", "amount": "4.90", "currency": currency, "estimated_days": 3 },
            { "service": "express", "amount": "12.50", "currency": currency, "estimated_days": 1 },
        ]}),
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
        let text = |field: &str| {
            body.get(field)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let shipment = FakeShipment {
            id: format!("shp_{number}"),
            order_id: text("order_id"),
            service: text("service"),
            tracking_number: format!("TRK{number:06}"),
            cancelled: false,
        };
        let answer = Answer::json(StatusCode::CREATED, shipment_json(&shipment));
        ledger.created_by.insert(key.clone(), shipment.id.clone());
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
    let answer = Answer::json(StatusCode::OK, json!({ "id": id, "status": "cancelled" }));
    ledger.answers.insert(key, answer.clone());
    answer
}
