//! Conversions between the current contract's records and those of
//! `commerce:plugin@0.1.0`, which are the same records under other Rust
//! types (the shared `types` interface is already one type for both; see
//! [`crate::bindings::v0_1`]).

use crate::bindings::v0_1::payment::exports::commerce::plugin::payment_provider as payment_v0_1;
use crate::bindings::v0_1::saga_step::exports::commerce::plugin::saga_step as step_v0_1;
use crate::bindings::v0_1::shipping::exports::commerce::plugin::shipping_provider as shipping_v0_1;
use crate::bindings::{Payment, PaymentRequest, PaymentStatus, Rate, Shipment, StepContext};

pub(crate) fn payment_request(request: &PaymentRequest) -> payment_v0_1::PaymentRequest {
    payment_v0_1::PaymentRequest {
        idempotency_key: request.idempotency_key.clone(),
        order: request.order.clone(),
        amount: request.amount.clone(),
        payment_method: request.payment_method.clone(),
    }
}

pub(crate) fn payment(payment: payment_v0_1::Payment) -> Payment {
    Payment {
        reference: payment.reference,
        status: match payment.status {
            payment_v0_1::PaymentStatus::Authorized => PaymentStatus::Authorized,
            payment_v0_1::PaymentStatus::Captured => PaymentStatus::Captured,
            payment_v0_1::PaymentStatus::Refunded => PaymentStatus::Refunded,
            payment_v0_1::PaymentStatus::Cancelled => PaymentStatus::Cancelled,
        },
        amount: payment.amount,
    }
}

pub(crate) fn rate(rate: shipping_v0_1::Rate) -> Rate {
    Rate {
        service: rate.service,
        price: rate.price,
        estimated_days: rate.estimated_days,
    }
}

pub(crate) fn shipment(shipment: shipping_v0_1::Shipment) -> Shipment {
    Shipment {
        reference: shipment.reference,
        tracking_number: shipment.tracking_number,
        label_url: shipment.label_url,
    }
}

pub(crate) fn step_context(context: &StepContext) -> step_v0_1::StepContext {
    step_v0_1::StepContext {
        saga_id: context.saga_id.clone(),
        step: context.step.clone(),
        idempotency_key: context.idempotency_key.clone(),
        order: context.order.clone(),
        prior_outputs: context
            .prior_outputs
            .iter()
            .map(|output| step_v0_1::StepOutput {
                step: output.step.clone(),
                output: output.output.clone(),
            })
            .collect(),
    }
}
