//! What a customer sees of the records of their own orders. Payment and
//! shipment references, reservation ids, who acted (admin subjects, kernel
//! node ids) and providers' words stay with admins; a customer gets
//! statuses, times, amounts and short fixed reasons ("payment declined").

use serde_json::{Map, Value, json};

use crate::domain::saga::{Saga, SagaStatus, StepState, customer_reason};
use crate::domain::summarize;

/// Longest reason a customer is shown.
const MAX_CUSTOMER_REASON_CHARS: usize = 200;

/// The part of an order event's payload its customer may see.
pub(super) fn order_event_data(event_type: &str, data: &Value) -> Value {
    let keep = |fields: &[&str]| {
        let kept: Map<String, Value> = fields
            .iter()
            .filter_map(|field| Some((field.to_string(), data.get(*field)?.clone())))
            .collect();
        Value::Object(kept)
    };
    match event_type {
        "Placed" => keep(&["lines", "total", "shipping_address"]),
        "PaymentCaptured" => keep(&["amount"]),
        "Cancelled" | "Failed" => match data.get("reason").and_then(Value::as_str) {
            Some(reason) => json!({ "reason": reason_text(reason) }),
            None => json!({}),
        },
        _ => json!({}),
    }
}

/// An order's reason as a customer is shown it: one short line. Reasons
/// are written fit for customers; records from before may hold more.
pub(super) fn reason_text(reason: &str) -> String {
    summarize(reason, MAX_CUSTOMER_REASON_CHARS)
}

/// Why the saga compensates or waits, as the order's customer is told.
pub(super) fn saga_reason(saga: &Saga) -> Option<String> {
    if saga.status == Some(SagaStatus::Parked) {
        return Some("the order is waiting for review by the shop".to_string());
    }
    saga.compensation
        .as_ref()
        .or(saga.requested.as_ref())
        .map(|cause| reason_text(&cause.order_reason))
}

/// What went wrong with a step, as the order's customer is told.
pub(super) fn step_error(step: &StepState) -> Option<String> {
    step.error
        .as_ref()
        .map(|_| customer_reason(step).to_string())
}
