//! `flat-rate-shipping`: the shipping plugin a fresh kernel runs, so the
//! first order completes without a carrier. One service at a flat price per
//! destination country and currency; shipments get tracking numbers of its
//! own and go out by hand.
//!
//! Configuration (manifest `[config]`):
//!
//! | key | meaning | default |
//! | --- | --- | --- |
//! | `rates` | `COUNTRY:CURRENCY=AMOUNT` entries, comma-separated; `*` as the country matches any other | none: required |
//! | `service` | the service's name, which the saga's shipment step names | `standard` |
//! | `estimated_days` | days to deliver, shown with the rate | none |
//!
//! For example `rates = "DE:EUR=4.90, *:EUR=9.90, *:USD=12.00"`. A
//! destination and currency without a rate is refused (a permanent
//! failure), by `quote` and by `create-shipment`, so an order to a country
//! the shop does not ship to fails and releases its stock. `quote` answers
//! the rate; the kernel does not call it yet, so the rate is not added to
//! what the order charges.
//!
//! Answers depend on the call's input alone: a shipment's reference is
//! `flat:<idempotency key>` and its tracking number a hash of that key, so a
//! call repeated with the same key answers as the first did. `lookup`
//! answers none: the plugin keeps no records, and nothing left the shop
//! that a person did not send.

wit_bindgen::generate!({ path: "../../../wit", world: "shipping-plugin" });

use commerce::plugin::config;
use commerce::plugin::types::{ErrorDetail, Failure, Money, Order};
use exports::commerce::plugin::shipping_provider::{Guest, Rate, Shipment};

const DEFAULT_SERVICE: &str = "standard";

struct FlatRateShipping;

impl Guest for FlatRateShipping {
    fn quote(order: Order) -> Result<Vec<Rate>, Failure> {
        let price = rate_for(&order)?;
        Ok(vec![Rate {
            service: service(),
            price,
            estimated_days: estimated_days()?,
        }])
    }

    fn create_shipment(
        idempotency_key: String,
        order: Order,
        service_name: String,
    ) -> Result<Shipment, Failure> {
        let service = service();
        if service_name != service {
            return Err(Failure::Permanent(detail(
                "unknown_service",
                &format!("this shop ships by {service:?}, not {service_name:?}"),
            )));
        }
        rate_for(&order)?;
        Ok(Shipment {
            tracking_number: Some(tracking_number(&idempotency_key)),
            reference: format!("flat:{idempotency_key}"),
            label_url: None,
        })
    }

    fn cancel_shipment(_idempotency_key: String, reference: String) -> Result<(), Failure> {
        if reference.starts_with("flat:") {
            Ok(())
        } else {
            Err(Failure::Permanent(detail(
                "unknown_shipment",
                &format!("{reference:?} is not a shipment this plugin made"),
            )))
        }
    }

    fn lookup(_idempotency_key: String) -> Result<Option<Shipment>, Failure> {
        Ok(None)
    }
}

fn service() -> String {
    config::get("service").unwrap_or_else(|| DEFAULT_SERVICE.to_string())
}

fn estimated_days() -> Result<Option<u32>, Failure> {
    match config::get("estimated_days") {
        None => Ok(None),
        Some(days) => days.trim().parse().map(Some).map_err(|_| {
            invalid_config(&format!("estimated_days {days:?} is not a whole number"))
        }),
    }
}

/// The price of shipping `order` to its address in its currency: the
/// country's own rate, else the `*` rate of that currency.
fn rate_for(order: &Order) -> Result<Money, Failure> {
    let rates = config::get("rates").ok_or_else(|| invalid_config("the manifest sets no rates"))?;
    let country = order.shipping_address.country.to_ascii_uppercase();
    let currency = &order.total.currency;
    let mut fallback = None;
    for entry in rates.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (destination, amount) = entry
            .split_once('=')
            .ok_or_else(|| invalid_entry(entry))?;
        let (entry_country, entry_currency) = destination
            .trim()
            .split_once(':')
            .ok_or_else(|| invalid_entry(entry))?;
        let amount = amount.trim();
        if !plugin_amount::is_decimal(amount) || !plugin_amount::is_currency_code(entry_currency)
        {
            return Err(invalid_entry(entry));
        }
        if entry_currency != currency {
            continue;
        }
        let price = Money {
            amount: amount.to_string(),
            currency: currency.clone(),
        };
        if entry_country.eq_ignore_ascii_case(&country) {
            return Ok(price);
        }
        if entry_country == "*" && fallback.is_none() {
            fallback = Some(price);
        }
    }
    fallback.ok_or_else(|| {
        Failure::Permanent(detail(
            "no_rate",
            &format!("this shop does not ship to {country:?} in {currency}"),
        ))
    })
}

/// `FR` and 16 hex digits of a 64-bit FNV-1a hash of the key: stable for
/// the key, and not a secret (anyone with the key could compute it).
fn tracking_number(idempotency_key: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in idempotency_key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("FR{hash:016X}")
}

fn invalid_entry(entry: &str) -> Failure {
    invalid_config(&format!(
        "rates entry {entry:?} is not COUNTRY:CURRENCY=AMOUNT (for example DE:EUR=4.90)"
    ))
}

fn invalid_config(message: &str) -> Failure {
    Failure::Permanent(detail("invalid_config", message))
}

fn detail(code: &str, message: &str) -> ErrorDetail {
    ErrorDetail {
        code: code.to_string(),
        message: message.to_string(),
    }
}

export!(FlatRateShipping);
