//! Batched reads behind nested fields, with async-graphql's DataLoader: a
//! page of 500 orders asking each for its saga and its events, or 500
//! products asking for their stock, costs one read per kind and batch, not
//! one per node. The loaders keep no cache (each load reads the store), so
//! they are shared by every request of the schema without serving stale
//! data; concurrent requests batch together.

use std::collections::HashMap;
use std::sync::Arc;

use async_graphql::Context;
use async_graphql::dataloader::{DataLoader, Loader};
use uuid::Uuid;

use super::ApiError;
use crate::event_store::{EventStore, MAX_STREAMS_PER_READ, RecordedEvent, StoreError};
use crate::projections::{InventoryView, ViewStore};

/// Whole event streams by aggregate id.
pub struct StreamLoader(Arc<dyn EventStore>);

impl Loader<Uuid> for StreamLoader {
    type Value = Arc<Vec<RecordedEvent>>;
    type Error = Arc<StoreError>;

    async fn load(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Self::Value>, Self::Error> {
        let mut streams: HashMap<Uuid, Vec<RecordedEvent>> = HashMap::new();
        for chunk in ids.chunks(MAX_STREAMS_PER_READ) {
            for event in self.0.read_streams(chunk).await.map_err(Arc::new)? {
                streams.entry(event.aggregate_id).or_default().push(event);
            }
        }
        Ok(streams
            .into_iter()
            .map(|(id, events)| (id, Arc::new(events)))
            .collect())
    }
}

/// Stock (the inventory read model) by product id.
pub struct InventoryLoader(Arc<dyn ViewStore>);

impl Loader<Uuid> for InventoryLoader {
    type Value = InventoryView;
    type Error = Arc<StoreError>;

    async fn load(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Self::Value>, Self::Error> {
        let mut found = HashMap::new();
        for chunk in ids.chunks(MAX_STREAMS_PER_READ) {
            for view in self.0.inventories(chunk).await.map_err(Arc::new)? {
                found.insert(view.product_id, view);
            }
        }
        Ok(found)
    }
}

/// The loaders, as schema data.
pub(super) struct Loaders {
    streams: DataLoader<StreamLoader>,
    inventory: DataLoader<InventoryLoader>,
}

impl Loaders {
    pub(super) fn new(events: Arc<dyn EventStore>, views: Arc<dyn ViewStore>) -> Self {
        Loaders {
            streams: DataLoader::new(StreamLoader(events), tokio::spawn),
            inventory: DataLoader::new(InventoryLoader(views), tokio::spawn),
        }
    }
}

fn loaders<'a>(ctx: &Context<'a>) -> &'a Loaders {
    ctx.data_unchecked::<Loaders>()
}

/// Every event of the stream `id` (none when it does not exist), batched
/// with the other loads of the moment.
pub(super) async fn stream(
    ctx: &Context<'_>,
    id: Uuid,
) -> Result<Arc<Vec<RecordedEvent>>, ApiError> {
    Ok(loaders(ctx)
        .streams
        .load_one(id)
        .await
        .map_err(ApiError::Batch)?
        .unwrap_or_default())
}

/// The stock of `product_id`, batched with the other loads of the moment.
pub(super) async fn inventory(
    ctx: &Context<'_>,
    product_id: Uuid,
) -> Result<Option<InventoryView>, ApiError> {
    loaders(ctx)
        .inventory
        .load_one(product_id)
        .await
        .map_err(ApiError::Batch)
}
