//! `order-limit`: a pure saga step that refuses orders above fixed limits,
//! to show how a custom step slots into the order saga.
//!
//! It imports nothing (world `saga-step-plugin`), so it is built `no_std`:
//! std on wasm32-wasip2 would import WASI. Limits are constants; a step that
//! reads them from its manifest would use `saga-step-plugin-with-host`.
#![no_std]
extern crate alloc;

use alloc::format;
use alloc::string::{String, ToString};

use plugin_heap as _;

wit_bindgen::generate!({ path: "../../../wit", world: "saga-step-plugin" });

use commerce::plugin::types::{ErrorDetail, Failure};
use exports::commerce::plugin::saga_step::{Guest, StepContext};

/// Orders worth more than this, in whole units of their currency, are refused.
const MAX_TOTAL_UNITS_OF_CURRENCY: u64 = 10_000;
/// Orders with more items than this, over all lines, are refused.
const MAX_ITEMS: u64 = 100;

struct OrderLimit;

impl Guest for OrderLimit {
    fn execute(context: StepContext) -> Result<String, Failure> {
        let order = &context.order;
        let items: u64 = order
            .lines
            .iter()
            .map(|line| u64::from(line.quantity))
            .sum();
        if items > MAX_ITEMS {
            return Err(refuse(format!(
                "the order has {items} items; at most {MAX_ITEMS} are allowed"
            )));
        }
        if exceeds(&order.total.amount, MAX_TOTAL_UNITS_OF_CURRENCY)? {
            return Err(refuse(format!(
                "the order total {} {} is above {MAX_TOTAL_UNITS_OF_CURRENCY}",
                order.total.amount, order.total.currency
            )));
        }
        Ok(format!(
            "{{\"items\":{items},\"total\":\"{}\"}}",
            order.total.amount
        ))
    }

    fn compensate(_context: StepContext, _output: String) -> Result<(), Failure> {
        // A check changes nothing, so there is nothing to undo.
        Ok(())
    }
}

/// Whether the decimal string `amount` ("123.45") is above `limit`.
fn exceeds(amount: &str, limit: u64) -> Result<bool, Failure> {
    let (whole, fraction) = amount.split_once('.').unwrap_or((amount, ""));
    let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !(fraction.is_empty() || digits(fraction)) {
        return Err(Failure::Permanent(ErrorDetail {
            code: "invalid_amount".to_string(),
            message: format!("the order total {amount:?} is not a decimal amount"),
        }));
    }
    let whole = whole.trim_start_matches('0');
    // More digits than the limit has means larger, whatever they are.
    if whole.len() > 20 {
        return Ok(true);
    }
    let whole: u64 = whole.parse().unwrap_or(0);
    Ok(whole > limit || (whole == limit && fraction.bytes().any(|b| b != b'0')))
}

fn refuse(message: String) -> Failure {
    Failure::Permanent(ErrorDetail {
        code: "order_limit_exceeded".to_string(),
        message,
    })
}

export!(OrderLimit);
