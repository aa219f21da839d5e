//! A small sample catalog, so a new shop has something to query and sell:
//! `commerce-kernel seed --demo`, or `COMMERCE_DEMO_CATALOG=true` at start.
//!
//! Idempotent, also when several processes seed at once: each product is
//! found by its SKU claim before it is created, and stocked only while its
//! inventory stream is empty (the append's version check decides), so a
//! second run creates and stocks nothing, and never undoes what the shop
//! sold or changed since.

use rust_decimal::Decimal;
use uuid::Uuid;

use super::{CommandContext, CommandError, Commerce, NewProduct};
use crate::domain::DomainError;
use crate::domain::catalog::SkuClaim;
use crate::domain::money::{Currency, Money};

/// Units each demo product is stocked with on its first seeding.
pub const DEMO_STOCK: i64 = 100;

/// SKU, name, price in minor units, currency.
const DEMO_PRODUCTS: &[(&str, &str, i64, &str)] = &[
    ("DEMO-MUG", "Enamel mug", 1250, "EUR"),
    ("DEMO-TEE", "Organic cotton T-shirt", 2490, "EUR"),
    ("DEMO-TOTE", "Canvas tote bag", 1590, "EUR"),
    ("DEMO-BEANS", "Coffee beans, 250 g", 990, "EUR"),
    ("DEMO-CAP", "Baseball cap", 1900, "USD"),
    ("DEMO-SOCKS", "Wool socks", 1400, "USD"),
];

/// One demo product and what this run did with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoProduct {
    /// The product's id (its stream).
    pub product_id: Uuid,
    /// The demo SKU (`DEMO-…`) that finds it again.
    pub sku: &'static str,
    /// The name it was created with.
    pub name: &'static str,
    /// The price it was created with (a later change stays).
    pub price: Money,
    /// This run created it (else it existed).
    pub created: bool,
    /// This run stocked it with [`DEMO_STOCK`] units (else it had stock
    /// adjustments already).
    pub stocked: bool,
}

impl Commerce {
    /// Creates and stocks the demo products that are missing; returns every
    /// demo product with what this run did.
    pub async fn seed_demo_catalog(
        &self,
        context: &CommandContext,
    ) -> Result<Vec<DemoProduct>, CommandError> {
        let mut seeded = Vec::with_capacity(DEMO_PRODUCTS.len());
        for &(sku, name, minor_units, currency) in DEMO_PRODUCTS {
            let price = Money::new(Decimal::new(minor_units, 2), Currency::parse(currency)?)?;
            let (product_id, created) = match self.product_by_sku(sku).await? {
                Some(product_id) => (product_id, false),
                None => {
                    let new = NewProduct {
                        sku: sku.to_string(),
                        name: name.to_string(),
                        price,
                        active: true,
                    };
                    match self.create_product(new, context).await {
                        Ok(product) => (product.id, true),
                        // Another process seeding at the same moment won.
                        Err(CommandError::Domain(DomainError::SkuTaken { .. })) => {
                            let product_id = self.product_by_sku(sku).await?.ok_or(
                                CommandError::Domain(DomainError::SkuTaken {
                                    sku: sku.to_string(),
                                }),
                            )?;
                            (product_id, false)
                        }
                        Err(other) => return Err(other),
                    }
                }
            };
            let stocked = match self
                .adjust_inventory(product_id, DEMO_STOCK, "demo catalog", Some(0), context)
                .await
            {
                Ok(_) => true,
                Err(CommandError::VersionConflict { .. }) => false,
                Err(other) => return Err(other),
            };
            seeded.push(DemoProduct {
                product_id,
                sku,
                name,
                price,
                created,
                stocked,
            });
        }
        Ok(seeded)
    }

    /// The product that claimed `sku`, if any.
    async fn product_by_sku(&self, sku: &str) -> Result<Option<Uuid>, CommandError> {
        let claim = self
            .repository::<SkuClaim>()
            .load(SkuClaim::stream_id(sku))
            .await?;
        Ok(claim.state.product_id)
    }
}
