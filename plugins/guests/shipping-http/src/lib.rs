//! `shipping-http`: the `shipping-provider` contract over HTTP+JSON.
//!
//! Configuration (manifest `[config]`): `base_url` (required) and `api_key`
//! (optional, sent as a bearer token). The carrier's API, which the test
//! suite's fake shipping service implements:
//!
//! | call | request | answer |
//! | --- | --- | --- |
//! | quote | `POST /rates {order_id, currency, country, postal_code, items}` | `{rates: [{service, amount, currency, estimated_days}]}` |
//! | create-shipment | `POST /shipments {order_id, service, address, items}` | `{id, tracking_number, label_url}` |
//! | cancel-shipment | `POST /shipments/{reference}/cancel {}` | `{id, status}` |
//! | lookup | `GET /shipments?idempotency_key=<key>` | `{data: [{id, tracking_number, label_url}]}` |
//!
//! `lookup` asks for the shipments created with an idempotency key: an empty
//! `data` means the carrier has none, and any other answer (a 404 from a
//! carrier without the endpoint included) is a failure, never "none".
//!
//! Writes carry the idempotency key in `Idempotency-Key`. 4xx answers are
//! permanent failures (an address the carrier refuses); 5xx and network
//! errors are transient.

use plugin_http::{HttpFailure, JsonClient, percent_encoded};
use serde::{Deserialize, Serialize};

wit_bindgen::generate!({ path: "../../../wit", world: "shipping-plugin" });

use commerce::plugin::types::{Address, ErrorDetail, Failure, Money, Order};
use commerce::plugin::{config, log};
use exports::commerce::plugin::shipping_provider::{Guest, Rate, Shipment};

struct ShippingHttp;

#[derive(Serialize)]
struct Item<'a> {
    sku: &'a str,
    quantity: u32,
}

#[derive(Serialize)]
struct RateRequest<'a> {
    order_id: &'a str,
    currency: &'a str,
    country: &'a str,
    postal_code: &'a str,
    items: Vec<Item<'a>>,
}

#[derive(Serialize)]
struct AddressBody<'a> {
    name: &'a str,
    line1: &'a str,
    line2: Option<&'a str>,
    city: &'a str,
    postal_code: &'a str,
    region: Option<&'a str>,
    country: &'a str,
}

#[derive(Serialize)]
struct ShipmentRequest<'a> {
    order_id: &'a str,
    service: &'a str,
    address: AddressBody<'a>,
    items: Vec<Item<'a>>,
}

#[derive(Serialize)]
struct Empty {}

#[derive(Deserialize)]
struct RateAnswer {
    service: String,
    amount: String,
    currency: String,
    estimated_days: Option<u32>,
}

#[derive(Deserialize)]
struct RatesAnswer {
    rates: Vec<RateAnswer>,
}

#[derive(Deserialize)]
struct ShipmentAnswer {
    id: String,
    tracking_number: Option<String>,
    label_url: Option<String>,
}

#[derive(Deserialize)]
struct CancelAnswer {}

#[derive(Deserialize)]
struct ShipmentList {
    data: Vec<ShipmentAnswer>,
}

impl Guest for ShippingHttp {
    fn quote(order: Order) -> Result<Vec<Rate>, Failure> {
        let body = RateRequest {
            order_id: &order.id,
            currency: &order.total.currency,
            country: &order.shipping_address.country,
            postal_code: &order.shipping_address.postal_code,
            items: items(&order),
        };
        let answer: RatesAnswer = client()?.post("/rates", None, &body).map_err(failure)?;
        Ok(answer
            .rates
            .into_iter()
            .map(|rate| Rate {
                service: rate.service,
                price: Money {
                    amount: rate.amount,
                    currency: rate.currency,
                },
                estimated_days: rate.estimated_days,
            })
            .collect())
    }

    fn create_shipment(
        idempotency_key: String,
        order: Order,
        service: String,
    ) -> Result<Shipment, Failure> {
        let body = ShipmentRequest {
            order_id: &order.id,
            service: &service,
            address: address(&order.shipping_address),
            items: items(&order),
        };
        let answer: ShipmentAnswer = client()?
            .post("/shipments", Some(&idempotency_key), &body)
            .map_err(failure)?;
        Ok(shipment(answer))
    }

    fn lookup(idempotency_key: String) -> Result<Option<Shipment>, Failure> {
        let path = format!(
            "/shipments?idempotency_key={}",
            percent_encoded(&idempotency_key)
        );
        let mut answer: ShipmentList = client()?.get(&path).map_err(failure)?;
        match answer.data.len() {
            0 => Ok(None),
            1 => Ok(answer.data.pop().map(shipment)),
            many => Err(Failure::Permanent(ErrorDetail {
                code: "ambiguous_lookup".to_string(),
                message: format!("the carrier has {many} shipments for one idempotency key"),
            })),
        }
    }

    fn cancel_shipment(idempotency_key: String, reference: String) -> Result<(), Failure> {
        let _: CancelAnswer = client()?
            .post(
                &format!("/shipments/{}/cancel", percent_encoded(&reference)),
                Some(&idempotency_key),
                &Empty {},
            )
            .map_err(failure)?;
        Ok(())
    }
}

fn shipment(answer: ShipmentAnswer) -> Shipment {
    Shipment {
        reference: answer.id,
        tracking_number: answer.tracking_number,
        label_url: answer.label_url,
    }
}

fn items(order: &Order) -> Vec<Item<'_>> {
    order
        .lines
        .iter()
        .map(|line| Item {
            sku: &line.sku,
            quantity: line.quantity,
        })
        .collect()
}

fn address(address: &Address) -> AddressBody<'_> {
    AddressBody {
        name: &address.name,
        line1: &address.line1,
        line2: address.line2.as_deref(),
        city: &address.city,
        postal_code: &address.postal_code,
        region: address.region.as_deref(),
        country: &address.country,
    }
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

fn failure(error: HttpFailure) -> Failure {
    if let HttpFailure::Transient { code, message } = &error {
        log::log(
            log::Level::Warn,
            &format!("carrier call failed ({code}): {message}"),
        );
    }
    match error {
        HttpFailure::Permanent { code, message } => {
            Failure::Permanent(ErrorDetail { code, message })
        }
        HttpFailure::Transient { code, message } => {
            Failure::Transient(ErrorDetail { code, message })
        }
    }
}

export!(ShippingHttp);
