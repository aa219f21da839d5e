//! `payment-http`: the `payment-provider` contract over HTTP+JSON.
//!
//! Configuration (manifest `[config]`): `base_url` (required) and `api_key`
//! (optional, sent as a bearer token). The provider's API, which the test
//! suite's fake payment service implements:
//!
//! | call | request |
//! | --- | --- |
//! | authorize, charge | `POST /payments {order_id, amount, currency, payment_method, capture}` |
//! | capture | `POST /payments/{reference}/capture {amount, currency}` |
//! | refund | `POST /payments/{reference}/refund {amount, currency}` |
//! | cancel | `POST /payments/{reference}/cancel {}` |
//! | lookup | `GET /payments?idempotency_key=<key>` |
//!
//! `{reference}` is percent-encoded: a provider's id may hold anything.
//! Each answers `{id, status, amount, currency}`; `lookup` answers
//! `{data: [...]}` with the payments created with that key, now. An empty
//! `data` means the provider has none; any other answer (a 404 from a
//! provider without the endpoint included) is a failure, never "none". Every request carries the
//! call's idempotency key in `Idempotency-Key`, so the provider, not this
//! plugin, makes retries safe. A declined card is a 402 and a permanent
//! failure; 5xx and network errors are transient.

use plugin_http::{HttpFailure, JsonClient, percent_encoded};
use serde::{Deserialize, Serialize};

wit_bindgen::generate!({ path: "../../../wit", world: "payment-plugin" });

use commerce::plugin::types::{ErrorDetail, Failure, Money};
use commerce::plugin::{config, log};
use exports::commerce::plugin::payment_provider::{Guest, Payment, PaymentRequest, PaymentStatus};

struct PaymentHttp;

#[derive(Serialize)]
struct CreatePayment<'a> {
    order_id: &'a str,
    amount: &'a str,
    currency: &'a str,
    payment_method: &'a str,
    capture: bool,
}

#[derive(Serialize)]
struct AmountBody<'a> {
    amount: &'a str,
    currency: &'a str,
}

#[derive(Serialize)]
struct Empty {}

#[derive(Deserialize)]
struct PaymentAnswer {
    id: String,
    status: String,
    amount: String,
    currency: String,
}

#[derive(Deserialize)]
struct PaymentList {
    data: Vec<PaymentAnswer>,
}

impl Guest for PaymentHttp {
    fn authorize(request: PaymentRequest) -> Result<Payment, Failure> {
        create(request, false)
    }

    fn charge(request: PaymentRequest) -> Result<Payment, Failure> {
        create(request, true)
    }

    fn capture(
        idempotency_key: String,
        reference: String,
        amount: Money,
    ) -> Result<Payment, Failure> {
        let body = AmountBody {
            amount: &amount.amount,
            currency: &amount.currency,
        };
        call(
            &format!("/payments/{}/capture", percent_encoded(&reference)),
            &idempotency_key,
            &body,
        )
    }

    fn refund(
        idempotency_key: String,
        reference: String,
        amount: Money,
    ) -> Result<Payment, Failure> {
        let body = AmountBody {
            amount: &amount.amount,
            currency: &amount.currency,
        };
        call(
            &format!("/payments/{}/refund", percent_encoded(&reference)),
            &idempotency_key,
            &body,
        )
    }

    fn cancel(idempotency_key: String, reference: String) -> Result<Payment, Failure> {
        call(
            &format!("/payments/{}/cancel", percent_encoded(&reference)),
            &idempotency_key,
            &Empty {},
        )
    }

    fn lookup(idempotency_key: String) -> Result<Option<Payment>, Failure> {
        let path = format!(
            "/payments?idempotency_key={}",
            percent_encoded(&idempotency_key)
        );
        let mut answer: PaymentList = client()?.get(&path).map_err(|error| {
            log::log(
                log::Level::Warn,
                &format!("GET /payments failed: {error:?}"),
            );
            failure(error)
        })?;
        match answer.data.len() {
            0 => Ok(None),
            1 => answer.data.pop().map(payment).transpose(),
            many => Err(Failure::Permanent(ErrorDetail {
                code: "ambiguous_lookup".to_string(),
                message: format!("the provider has {many} payments for one idempotency key"),
            })),
        }
    }
}

fn create(request: PaymentRequest, capture: bool) -> Result<Payment, Failure> {
    let body = CreatePayment {
        order_id: &request.order.id,
        amount: &request.amount.amount,
        currency: &request.amount.currency,
        payment_method: &request.payment_method,
        capture,
    };
    call("/payments", &request.idempotency_key, &body)
}

fn client() -> Result<JsonClient, Failure> {
    let base_url = config::get("base_url").ok_or_else(|| {
        Failure::Permanent(ErrorDetail {
            code: "invalid_config".to_string(),
            message: "the manifest sets no base_url".to_string(),
        })
    })?;
    JsonClient::new(&base_url, config::get("api_key")).map_err(failure)
}

fn call<B: Serialize>(path: &str, idempotency_key: &str, body: &B) -> Result<Payment, Failure> {
    let answer: PaymentAnswer =
        client()?
            .post(path, Some(idempotency_key), body)
            .map_err(|error| {
                log::log(log::Level::Warn, &format!("POST {path} failed: {error:?}"));
                failure(error)
            })?;
    payment(answer)
}

fn payment(answer: PaymentAnswer) -> Result<Payment, Failure> {
    let status = match answer.status.as_str() {
        "authorized" => PaymentStatus::Authorized,
        "captured" => PaymentStatus::Captured,
        "refunded" => PaymentStatus::Refunded,
        "cancelled" => PaymentStatus::Cancelled,
        other => {
            return Err(Failure::Transient(ErrorDetail {
                code: "invalid_response".to_string(),
                message: format!("the provider answered with unknown status {other:?}"),
            }));
        }
    };
    Ok(Payment {
        reference: answer.id,
        status,
        amount: Money {
            amount: answer.amount,
            currency: answer.currency,
        },
    })
}

fn failure(error: HttpFailure) -> Failure {
    match error {
        HttpFailure::Permanent { code, message } => {
            Failure::Permanent(ErrorDetail { code, message })
        }
        HttpFailure::Transient { code, message } => {
            Failure::Transient(ErrorDetail { code, message })
        }
    }
}

export!(PaymentHttp);
