//! Creating and updating products.

use uuid::Uuid;

use super::{CommandContext, CommandError, Commerce, ConflictCounter, Written, stream_append};
use crate::domain::DomainError;
use crate::domain::catalog::{Product, ProductUpdate, SkuClaim, validate_sku};
use crate::domain::money::Money;
use crate::event_store::repository::Loaded;
use crate::event_store::{AppendRequest, StoreError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewProduct {
    pub sku: String,
    pub name: String,
    pub price: Money,
    pub active: bool,
}

pub type CreatedProduct = Written<Product>;
pub type UpdatedProduct = Written<Product>;

impl Commerce {
    /// Creates a product and claims its SKU in one atomic append.
    pub async fn create_product(
        &self,
        input: NewProduct,
        context: &CommandContext,
    ) -> Result<CreatedProduct, CommandError> {
        let sku = validate_sku(&input.sku)?;
        let events = Product::create(&sku, &input.name, input.price, input.active)?;
        let product_id = Uuid::now_v7();
        let claim_id = SkuClaim::stream_id(&sku);
        let request = AppendRequest {
            streams: vec![
                stream_append::<Product>(product_id, 0, &events)?,
                stream_append::<SkuClaim>(claim_id, 0, &[SkuClaim::claim(&sku, product_id)])?,
            ],
            metadata: context.metadata(),
            idempotency_key: None,
        };
        match self.store.append(request).await {
            Ok(outcome) => Ok(Written::after(
                product_id,
                Loaded {
                    state: Product::default(),
                    version: 0,
                },
                &events,
                outcome.last_position,
            )),
            Err(StoreError::VersionConflict { aggregate_id, .. }) if aggregate_id == claim_id => {
                Err(DomainError::SkuTaken { sku }.into())
            }
            Err(other) => Err(other.into()),
        }
    }

    /// Renames, reprices or (de)activates a product. Only real changes are
    /// written; an update that changes nothing writes nothing.
    pub async fn update_product(
        &self,
        product_id: Uuid,
        update: ProductUpdate,
        expected_version: Option<u32>,
        context: &CommandContext,
    ) -> Result<UpdatedProduct, CommandError> {
        self.retrying(
            ConflictCounter::Other,
            expected_version.is_some(),
            || async {
                let loaded = self
                    .load_expecting::<Product>(product_id, expected_version)
                    .await?;
                let events = loaded.state.update(product_id, &update)?;
                if events.is_empty() {
                    return Ok(Written::unchanged(product_id, loaded));
                }
                let outcome = self
                    .repository::<Product>()
                    .append(
                        product_id,
                        loaded.version,
                        &events,
                        context.metadata(),
                        None,
                    )
                    .await?;
                Ok(Written::after(
                    product_id,
                    loaded,
                    &events,
                    outcome.last_position,
                ))
            },
        )
        .await
    }

    /// The product as its stream says it is now (authoritative, not a view).
    pub async fn load_product(&self, product_id: Uuid) -> Result<Written<Product>, CommandError> {
        let loaded = self.repository::<Product>().load(product_id).await?;
        Ok(existing_product(product_id, loaded)?)
    }

    /// [`Self::load_product`] for each of `product_ids`, in their order, in
    /// one read of the store: a cart's or an order's lines at once.
    pub async fn load_products(
        &self,
        product_ids: &[Uuid],
    ) -> Result<Vec<Result<Written<Product>, DomainError>>, CommandError> {
        let loaded = self.repository::<Product>().load_many(product_ids).await?;
        Ok(product_ids
            .iter()
            .zip(loaded)
            .map(|(&product_id, loaded)| existing_product(product_id, loaded))
            .collect())
    }
}

/// `loaded` if its stream holds a product.
fn existing_product(
    product_id: Uuid,
    loaded: Loaded<Product>,
) -> Result<Written<Product>, DomainError> {
    if loaded.state.details.is_none() {
        return Err(DomainError::NotFound {
            kind: "product",
            id: product_id,
        });
    }
    Ok(Written::unchanged(product_id, loaded))
}
