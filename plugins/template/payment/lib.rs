//! `{{name}}`: a payment plugin.
//!
//! As made by `commerce-kernel plugin new`, it moves no money: every
//! payment is accepted at once and its reference is made from the
//! idempotency key. Replace the bodies marked `TODO` with calls to your
//! payment provider (outbound HTTP needs `wasi:http`, granted by
//! `allowed_hosts` in `plugin.toml`; see the kernel's
//! `plugins/guests/payment-http` for a complete adapter).
//!
//! The contract, in `wit/types.wit`:
//! - every write carries an idempotency key; a repeated key must answer as
//!   the first call did, and never charge twice;
//! - `Failure::Permanent` for a decline (never retried), `Failure::Transient`
//!   for a provider that is down or slow (retried with the same key);
//! - `lookup` answers what a call with that key did, `None` only when the
//!   provider has no record of it, and a failure when it cannot find out.

wit_bindgen::generate!({ path: "wit", world: "payment-plugin" });

use commerce::plugin::log::{Level, log};
use commerce::plugin::types::{ErrorDetail, Failure, Money};
use exports::commerce::plugin::payment_provider::{Guest, Payment, PaymentRequest, PaymentStatus};

/// The prefix of this plugin's references: `<prefix><idempotency key>`.
const REFERENCE_PREFIX: &str = "{{name}}:";

struct Plugin;

impl Guest for Plugin {
    fn authorize(request: PaymentRequest) -> Result<Payment, Failure> {
        // TODO: ask the provider to authorize `request.amount`.
        Ok(payment(&request, PaymentStatus::Authorized))
    }

    fn charge(request: PaymentRequest) -> Result<Payment, Failure> {
        // TODO: ask the provider to charge `request.amount`, passing
        // `request.idempotency_key` on. Report `Authorized` if it only
        // authorized: the kernel then captures. Implement `lookup` with it.
        log(
            Level::Info,
            &format!("charging {} {}", request.amount.amount, request.amount.currency),
        );
        Ok(payment(&request, PaymentStatus::Captured))
    }

    fn capture(_key: String, reference: String, amount: Money) -> Result<Payment, Failure> {
        // TODO: capture the authorization `reference` with the provider.
        Ok(Payment {
            reference: ours(reference)?,
            status: PaymentStatus::Captured,
            amount,
        })
    }

    fn refund(_key: String, reference: String, amount: Money) -> Result<Payment, Failure> {
        // TODO: refund `amount` of `reference` with the provider.
        Ok(Payment {
            reference: ours(reference)?,
            status: PaymentStatus::Refunded,
            amount,
        })
    }

    fn cancel(_key: String, reference: String) -> Result<Payment, Failure> {
        // TODO: cancel the authorization `reference` with the provider. The
        // kernel reads the status only; the amount here is a placeholder.
        Ok(Payment {
            reference: ours(reference)?,
            status: PaymentStatus::Cancelled,
            amount: Money {
                amount: "0".to_string(),
                currency: "XXX".to_string(),
            },
        })
    }

    fn lookup(_key: String) -> Result<Option<Payment>, Failure> {
        // TODO: ask the provider what the call with this key did, and
        // answer `Ok(None)` only when it says it has no record of the key.
        // The kernel asks after a call whose outcome it never recorded; a
        // wrong `None` there means a charge that is never refunded. Until
        // this asks, it answers "cannot find out": the kernel retries and
        // in the end parks the saga for a person, which is safe.
        Err(Failure::Transient(ErrorDetail {
            code: "lookup_not_implemented".to_string(),
            message: "this plugin cannot look payments up yet".to_string(),
        }))
    }
}

fn payment(request: &PaymentRequest, status: PaymentStatus) -> Payment {
    Payment {
        reference: format!("{REFERENCE_PREFIX}{}", request.idempotency_key),
        status,
        amount: request.amount.clone(),
    }
}

/// `reference` if this plugin made it; a permanent failure otherwise.
fn ours(reference: String) -> Result<String, Failure> {
    if reference.starts_with(REFERENCE_PREFIX) {
        Ok(reference)
    } else {
        Err(Failure::Permanent(ErrorDetail {
            code: "unknown_payment".to_string(),
            message: format!("{reference:?} is not a reference this plugin made"),
        }))
    }
}

export!(Plugin);
