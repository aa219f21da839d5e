//! `manual-payment`: the payment plugin a fresh kernel runs, so the first
//! order completes without a payment service. It moves no money: it accepts
//! payments to be settled outside the shop (bank transfer, cash on
//! delivery, an invoice), and the kernel's own event log is the record of
//! each one (the saga's payment step records the payment this plugin
//! returns, and its compensation the refund or cancellation).
//!
//! - `charge` answers `captured` at once, `authorize` answers `authorized`;
//!   `capture`, `refund` and `cancel` answer with the payment in its new state.
//! - Answers depend on the call's input alone, so a call repeated with the
//!   same idempotency key answers exactly as the first did: the payment's
//!   reference is `manual:<idempotency key>`, followed by its amount and
//!   currency, which is what `capture`, `refund` and `cancel` read back.
//! - `lookup` answers none: the plugin keeps no records, so it has none of
//!   any key, and since it moved no money there is nothing outside the
//!   kernel to undo when a call's outcome was never recorded.
//! - Payment methods that fail on purpose, for trying a shop's unhappy
//!   paths: `test_decline` is declined (a permanent failure, so the order
//!   fails and its stock is released), `test_unavailable` fails as a
//!   provider that is down would (a transient failure: the kernel retries
//!   with the same key and in the end compensates).
//! - A malformed amount or currency is refused (a permanent failure).

wit_bindgen::generate!({ path: "../../../wit", world: "payment-plugin" });

use commerce::plugin::types::{ErrorDetail, Failure, Money};
use exports::commerce::plugin::payment_provider::{Guest, Payment, PaymentRequest, PaymentStatus};

/// Declined, as a card would be.
pub const DECLINED_METHOD: &str = "test_decline";
/// Fails as an unreachable provider would.
pub const UNAVAILABLE_METHOD: &str = "test_unavailable";

const REFERENCE_PREFIX: &str = "manual:";

struct ManualPayment;

impl Guest for ManualPayment {
    fn authorize(request: PaymentRequest) -> Result<Payment, Failure> {
        accept(request, PaymentStatus::Authorized)
    }

    fn charge(request: PaymentRequest) -> Result<Payment, Failure> {
        accept(request, PaymentStatus::Captured)
    }

    fn capture(
        _idempotency_key: String,
        reference: String,
        amount: Money,
    ) -> Result<Payment, Failure> {
        let payment = read_reference(&reference)?;
        check_part(&payment, &amount)?;
        Ok(Payment {
            status: PaymentStatus::Captured,
            amount,
            ..payment
        })
    }

    fn refund(
        _idempotency_key: String,
        reference: String,
        amount: Money,
    ) -> Result<Payment, Failure> {
        let payment = read_reference(&reference)?;
        check_part(&payment, &amount)?;
        Ok(Payment {
            status: PaymentStatus::Refunded,
            amount,
            ..payment
        })
    }

    fn cancel(_idempotency_key: String, reference: String) -> Result<Payment, Failure> {
        let payment = read_reference(&reference)?;
        Ok(Payment {
            status: PaymentStatus::Cancelled,
            ..payment
        })
    }

    fn lookup(_idempotency_key: String) -> Result<Option<Payment>, Failure> {
        Ok(None)
    }
}

fn accept(request: PaymentRequest, status: PaymentStatus) -> Result<Payment, Failure> {
    match request.payment_method.as_str() {
        DECLINED_METHOD => {
            return Err(Failure::Permanent(detail(
                "card_declined",
                "declined: the payment method test_decline always is",
            )));
        }
        UNAVAILABLE_METHOD => {
            return Err(Failure::Transient(detail(
                "provider_unavailable",
                "unavailable: the payment method test_unavailable always is",
            )));
        }
        _ => {}
    }
    check_money(&request.amount)?;
    Ok(Payment {
        reference: format!(
            "{REFERENCE_PREFIX}{}:{}:{}",
            request.idempotency_key, request.amount.amount, request.amount.currency
        ),
        status,
        amount: request.amount,
    })
}

/// The payment a reference of this plugin names, as it was made.
fn read_reference(reference: &str) -> Result<Payment, Failure> {
    let unknown = || {
        Failure::Permanent(detail(
            "unknown_payment",
            &format!("{reference:?} is not a reference this plugin made"),
        ))
    };
    let rest = reference.strip_prefix(REFERENCE_PREFIX).ok_or_else(unknown)?;
    // The key comes first and may itself hold colons.
    let mut parts = rest.rsplitn(3, ':');
    let (Some(currency), Some(amount), Some(_key)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(unknown());
    };
    let amount = Money {
        amount: amount.to_string(),
        currency: currency.to_string(),
    };
    check_money(&amount).map_err(|_| unknown())?;
    Ok(Payment {
        reference: reference.to_string(),
        status: PaymentStatus::Captured,
        amount,
    })
}

/// A capture or refund must be in the payment's currency. Whether the
/// amount is within the payment's is the kernel's to know: it asks for
/// what it recorded.
fn check_part(payment: &Payment, part: &Money) -> Result<(), Failure> {
    check_money(part)?;
    if part.currency != payment.amount.currency {
        return Err(Failure::Permanent(detail(
            "currency_mismatch",
            &format!(
                "the payment is in {}, not {}",
                payment.amount.currency, part.currency
            ),
        )));
    }
    Ok(())
}

fn check_money(money: &Money) -> Result<(), Failure> {
    if plugin_amount::is_decimal(&money.amount) && plugin_amount::is_currency_code(&money.currency)
    {
        Ok(())
    } else {
        Err(Failure::Permanent(detail(
            "invalid_amount",
            &format!(
                "{:?} {:?} is not an amount in a currency",
                money.amount, money.currency
            ),
        )))
    }
}

fn detail(code: &str, message: &str) -> ErrorDetail {
    ErrorDetail {
        code: code.to_string(),
        message: message.to_string(),
    }
}

export!(ManualPayment);
