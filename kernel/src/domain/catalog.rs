//! The catalog: products and their prices.
//!
//! A product's price lives only here; carts and orders read it from the
//! catalog when they price a line, never from the client. Every price change
//! is a `PriceChanged` event, so the stream is the price history.
//!
//! SKUs are unique across products. The event store has no secondary unique
//! index, so uniqueness is a stream of its own: creating a product also
//! appends `Claimed` to the stream of [`SkuClaim::stream_id`] at expected
//! version 0, in the same atomic append. A second product with that SKU
//! conflicts on the claim stream and writes nothing.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::money::Money;
use super::{Aggregate, DomainError, DomainEvent, clean_text};

/// Longest product name, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// Longest SKU, in bytes (SKUs are ASCII).
pub const MAX_SKU_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum ProductEvent {
    Created {
        sku: String,
        name: String,
        price: Money,
        active: bool,
    },
    Renamed {
        name: String,
    },
    PriceChanged {
        price: Money,
    },
    ActivationChanged {
        active: bool,
    },
}

impl DomainEvent for ProductEvent {}

/// A product as its stream says it is now. `None` fields mean "not created".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Product {
    pub details: Option<ProductDetails>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductDetails {
    pub sku: String,
    pub name: String,
    pub price: Money,
    pub active: bool,
}

/// What an update changes; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProductUpdate {
    pub name: Option<String>,
    pub price: Option<Money>,
    pub active: Option<bool>,
}

impl Aggregate for Product {
    const AGGREGATE_TYPE: &'static str = "product";
    type Event = ProductEvent;

    fn apply(&mut self, event: &ProductEvent) {
        match (event, &mut self.details) {
            (
                ProductEvent::Created {
                    sku,
                    name,
                    price,
                    active,
                },
                _,
            ) => {
                self.details = Some(ProductDetails {
                    sku: sku.clone(),
                    name: name.clone(),
                    price: *price,
                    active: *active,
                });
            }
            (ProductEvent::Renamed { name }, Some(details)) => details.name = name.clone(),
            (ProductEvent::PriceChanged { price }, Some(details)) => details.price = *price,
            (ProductEvent::ActivationChanged { active }, Some(details)) => details.active = *active,
            // A change to a product that was never created cannot be decided
            // by `update`, so it cannot be in a stream either.
            (_, None) => {}
        }
    }
}

/// Checks a SKU: 1 to 64 ASCII letters, digits, `-`, `_` or `.`.
pub fn validate_sku(sku: &str) -> Result<String, DomainError> {
    let sku = sku.trim();
    if sku.is_empty() || sku.len() > MAX_SKU_LEN {
        return Err(DomainError::invalid(
            "sku",
            format!("must be 1 to {MAX_SKU_LEN} characters"),
        ));
    }
    if !sku
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(DomainError::invalid(
            "sku",
            "only ASCII letters, digits, '-', '_' and '.'",
        ));
    }
    Ok(sku.to_string())
}

impl Product {
    /// The events that create a product. The caller appends them at version 0
    /// together with [`SkuClaim::claim`].
    pub fn create(
        sku: &str,
        name: &str,
        price: Money,
        active: bool,
    ) -> Result<Vec<ProductEvent>, DomainError> {
        Ok(vec![ProductEvent::Created {
            sku: validate_sku(sku)?,
            name: clean_text("name", name, MAX_NAME_CHARS)?,
            price,
            active,
        }])
    }

    /// The events for an update: one per field that actually changes, none if
    /// nothing does.
    pub fn update(
        &self,
        product_id: Uuid,
        update: &ProductUpdate,
    ) -> Result<Vec<ProductEvent>, DomainError> {
        let Some(details) = &self.details else {
            return Err(DomainError::NotFound {
                kind: "product",
                id: product_id,
            });
        };
        let mut events = Vec::new();
        if let Some(name) = &update.name {
            let name = clean_text("name", name, MAX_NAME_CHARS)?;
            if name != details.name {
                events.push(ProductEvent::Renamed { name });
            }
        }
        if let Some(price) = update.price
            && price != details.price
        {
            events.push(ProductEvent::PriceChanged { price });
        }
        if let Some(active) = update.active
            && active != details.active
        {
            events.push(ProductEvent::ActivationChanged { active });
        }
        Ok(events)
    }

    /// The product's current price if it can be sold now.
    pub fn sellable_price(&self, product_id: Uuid) -> Result<&ProductDetails, DomainError> {
        match &self.details {
            None => Err(DomainError::NotFound {
                kind: "product",
                id: product_id,
            }),
            Some(details) if !details.active => Err(DomainError::ProductInactive { product_id }),
            Some(details) => Ok(details),
        }
    }
}

/// The claim on a SKU: a one-event stream per SKU naming its product.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SkuClaim {
    pub product_id: Option<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum SkuClaimEvent {
    Claimed { sku: String, product_id: Uuid },
}

impl DomainEvent for SkuClaimEvent {}

impl Aggregate for SkuClaim {
    const AGGREGATE_TYPE: &'static str = "sku_claim";
    type Event = SkuClaimEvent;

    fn apply(&mut self, event: &SkuClaimEvent) {
        let SkuClaimEvent::Claimed { product_id, .. } = event;
        self.product_id = Some(*product_id);
    }
}

/// Namespace of the name-based UUIDs of SKU claim streams.
const SKU_NAMESPACE: Uuid = Uuid::from_u128(0x6c1f_93a0_5e7b_4d2c_9a41_0b8e_2f3d_7c15);

impl SkuClaim {
    /// The claim stream of a SKU. SKUs are unique regardless of letter case.
    pub fn stream_id(sku: &str) -> Uuid {
        Uuid::new_v5(&SKU_NAMESPACE, sku.to_ascii_uppercase().as_bytes())
    }

    pub fn claim(sku: &str, product_id: Uuid) -> SkuClaimEvent {
        SkuClaimEvent::Claimed {
            sku: sku.to_string(),
            product_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::money::Currency;

    fn eur(amount: &str) -> Money {
        Money::new(
            amount.parse().expect("decimal"),
            Currency::parse("EUR").expect("EUR"),
        )
        .expect("valid")
    }

    fn created() -> Product {
        let mut product = Product::default();
        for event in Product::create("MUG-1", " Mug ", eur("9.50"), true).expect("valid") {
            product.apply(&event);
        }
        product
    }

    #[test]
    fn create_validates_and_trims() {
        let product = created();
        let details = product.details.expect("created");
        assert_eq!(
            (details.sku.as_str(), details.name.as_str()),
            ("MUG-1", "Mug")
        );
        assert!(Product::create("has space", "Mug", eur("1"), true).is_err());
        assert!(Product::create("", "Mug", eur("1"), true).is_err());
        assert!(Product::create("A", "  ", eur("1"), true).is_err());
        assert!(Product::create("A", "bell\u{7}", eur("1"), true).is_err());
    }

    #[test]
    fn update_emits_only_real_changes() {
        let product = created();
        let id = Uuid::now_v7();
        let unchanged = ProductUpdate {
            name: Some("Mug".into()),
            price: Some(eur("9.5")),
            active: Some(true),
        };
        assert_eq!(product.update(id, &unchanged), Ok(vec![]));
        let changed = ProductUpdate {
            name: Some("Big mug".into()),
            price: Some(eur("11")),
            active: Some(false),
        };
        assert_eq!(
            product.update(id, &changed),
            Ok(vec![
                ProductEvent::Renamed {
                    name: "Big mug".into()
                },
                ProductEvent::PriceChanged { price: eur("11") },
                ProductEvent::ActivationChanged { active: false },
            ])
        );
        assert!(matches!(
            Product::default().update(id, &changed),
            Err(DomainError::NotFound { .. })
        ));
    }

    #[test]
    fn inactive_products_cannot_be_sold() {
        let mut product = created();
        let id = Uuid::now_v7();
        assert!(product.sellable_price(id).is_ok());
        product.apply(&ProductEvent::ActivationChanged { active: false });
        assert_eq!(
            product.sellable_price(id),
            Err(DomainError::ProductInactive { product_id: id })
        );
    }

    #[test]
    fn sku_claims_ignore_case() {
        assert_eq!(SkuClaim::stream_id("mug-1"), SkuClaim::stream_id("MUG-1"));
        assert_ne!(SkuClaim::stream_id("MUG-1"), SkuClaim::stream_id("MUG-2"));
    }
}
