//! `{{name}}`: a shipping plugin.
//!
//! As made by `commerce-kernel plugin new`, it ships nowhere: it offers one
//! service, `standard` (the service the kernel's default order saga asks
//! for), at the price set by `price` and `currency` in `plugin.toml`, and
//! makes a shipment reference from the idempotency key. Replace the bodies
//! marked `TODO` with calls to your carrier (outbound HTTP needs
//! `allowed_hosts` in `plugin.toml`; see the kernel's
//! `plugins/guests/shipping-http` for a complete adapter).
//!
//! The contract, in `wit/types.wit`: a repeated idempotency key answers as
//! the first call did; `Failure::Permanent` for what retrying cannot fix
//! (an address the carrier refuses), `Failure::Transient` otherwise;
//! `lookup` answers what a call with that key did, `None` only when the
//! carrier has no record of it.

wit_bindgen::generate!({ path: "wit", world: "shipping-plugin" });

use commerce::plugin::config;
use commerce::plugin::types::{ErrorDetail, Failure, Money, Order};
use exports::commerce::plugin::shipping_provider::{Guest, Rate, Shipment};

const SERVICE: &str = "standard";
const REFERENCE_PREFIX: &str = "{{name}}:";

struct Plugin;

impl Guest for Plugin {
    fn quote(order: Order) -> Result<Vec<Rate>, Failure> {
        // TODO: ask the carrier for rates to `order.shipping_address`.
        Ok(vec![Rate {
            service: SERVICE.to_string(),
            price: price(&order)?,
            estimated_days: Some(3),
        }])
    }

    fn create_shipment(key: String, order: Order, service: String) -> Result<Shipment, Failure> {
        if service != SERVICE {
            return Err(permanent(
                "unknown_service",
                format!("this plugin ships by {SERVICE:?}, not {service:?}"),
            ));
        }
        price(&order)?;
        // TODO: book the shipment with the carrier, passing `key` on.
        Ok(Shipment {
            reference: format!("{REFERENCE_PREFIX}{key}"),
            tracking_number: None,
            label_url: None,
        })
    }

    fn cancel_shipment(_key: String, reference: String) -> Result<(), Failure> {
        // TODO: cancel `reference` with the carrier.
        if reference.starts_with(REFERENCE_PREFIX) {
            Ok(())
        } else {
            Err(permanent(
                "unknown_shipment",
                format!("{reference:?} is not a reference this plugin made"),
            ))
        }
    }

    fn lookup(_key: String) -> Result<Option<Shipment>, Failure> {
        // TODO: ask the carrier what the call with this key did, and answer
        // `Ok(None)` only when it has no record of the key. Until then this
        // answers "cannot find out", so the kernel never concludes that a
        // shipment it lost track of was not booked.
        Err(lookup_not_implemented())
    }
}

/// The configured price, in the order's currency only.
fn price(order: &Order) -> Result<Money, Failure> {
    let setting = |key: &str| {
        config::get(key).ok_or_else(|| permanent("invalid_config", format!("{key} is not set")))
    };
    let (amount, currency) = (setting("price")?, setting("currency")?);
    if currency != order.total.currency {
        return Err(permanent(
            "no_rate",
            format!("no rate in {}", order.total.currency),
        ));
    }
    Ok(Money { amount, currency })
}

fn lookup_not_implemented() -> Failure {
    Failure::Transient(ErrorDetail {
        code: "lookup_not_implemented".to_string(),
        message: "this plugin cannot look shipments up yet".to_string(),
    })
}

fn permanent(code: &str, message: String) -> Failure {
    Failure::Permanent(ErrorDetail {
        code: code.to_string(),
        message,
    })
}

export!(Plugin);
