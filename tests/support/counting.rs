//! An event store that counts the stream reads going through it, per
//! stream, and a view store that counts stock and checkpoint reads and logs applied
//! batches, for tests that prove what a path does not read or write.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use commerce_kernel::event_store::{
    AppendOutcome, AppendRequest, Backend, EventFilter, EventStore, Position, RecordedEvent,
    StoreError, StreamSelection,
};
use commerce_kernel::projections::{
    InventoryView, OrderFilter, OrderView, ProductView, ProjectionBatch, ProjectionName,
    ReservationView, ShadowView, ViewChange, ViewStore,
};
use uuid::Uuid;

pub struct CountingEvents {
    inner: Arc<dyn EventStore>,
    /// Reads of each stream; a read of several streams counts for each.
    reads: Mutex<HashMap<Uuid, u64>>,
    /// Read calls, whatever their number of streams.
    calls: Mutex<u64>,
    /// Reads of the global log (`read_all_matching`).
    log_reads: AtomicU64,
}

impl CountingEvents {
    pub fn new(inner: Arc<dyn EventStore>) -> Self {
        CountingEvents {
            inner,
            reads: Mutex::default(),
            calls: Mutex::default(),
            log_reads: AtomicU64::new(0),
        }
    }

    /// Reads of the global log so far.
    pub fn log_reads(&self) -> u64 {
        self.log_reads.load(Ordering::SeqCst)
    }

    /// Stream read calls so far.
    pub fn stream_reads(&self) -> u64 {
        *self.calls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads of `aggregate_id`'s stream so far.
    pub fn reads_of(&self, aggregate_id: Uuid) -> u64 {
        self.reads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&aggregate_id)
            .copied()
            .unwrap_or(0)
    }

    fn count(&self, aggregate_ids: impl IntoIterator<Item = Uuid>) {
        *self.calls.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        let mut reads = self.reads.lock().unwrap_or_else(PoisonError::into_inner);
        for id in aggregate_ids {
            *reads.entry(id).or_default() += 1;
        }
    }
}

#[async_trait::async_trait]
impl EventStore for CountingEvents {
    fn backend(&self) -> Backend {
        self.inner.backend()
    }
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        self.inner.append(request).await
    }
    async fn read_stream(
        &self,
        aggregate_id: Uuid,
        selection: StreamSelection,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.count([aggregate_id]);
        self.inner.read_stream(aggregate_id, selection).await
    }
    async fn read_streams(&self, aggregate_ids: &[Uuid]) -> Result<Vec<RecordedEvent>, StoreError> {
        self.count(aggregate_ids.iter().copied());
        self.inner.read_streams(aggregate_ids).await
    }
    async fn read_streams_after(
        &self,
        streams: &[(Uuid, u32)],
    ) -> Result<Vec<(RecordedEvent, bool)>, StoreError> {
        self.count(streams.iter().map(|(id, _)| *id));
        self.inner.read_streams_after(streams).await
    }
    async fn read_all_matching(
        &self,
        filter: &EventFilter,
        after: Position,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.log_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_all_matching(filter, after, limit).await
    }
    async fn count_matching(&self, filter: &EventFilter) -> Result<u64, StoreError> {
        self.inner.count_matching(filter).await
    }
    async fn head(&self) -> Result<Position, StoreError> {
        self.inner.head().await
    }
    async fn stream_version(&self, aggregate_id: Uuid) -> Result<u32, StoreError> {
        self.inner.stream_version(aggregate_id).await
    }
}

/// A view store that counts the stock reads going through it and logs
/// which projections each applied batch moved.
pub struct CountingViews {
    inner: Arc<dyn ViewStore>,
    pub inventory_reads: AtomicU64,
    pub checkpoint_reads: AtomicU64,
    applied: Mutex<Vec<Vec<ProjectionName>>>,
    /// When set, the next apply notifies `apply_entered`, then waits for
    /// [`Self::release_apply`]: a projector round held between its log
    /// read and its write.
    hold_next_apply: std::sync::atomic::AtomicBool,
    pub apply_entered: tokio::sync::Notify,
    apply_released: tokio::sync::Notify,
    /// Holds a rebuild's shadow after its next batch (see
    /// [`Self::hold_next_shadow_apply`]).
    pub shadow_hold: Arc<ShadowHold>,
    /// Shadows made: rebuilds that replayed the log.
    pub shadows: AtomicU64,
}

/// A rebuild held with its shadow part-built: after its next batch is
/// written, `entered` is notified and the rebuild waits for `released`.
#[derive(Default)]
pub struct ShadowHold {
    armed: std::sync::atomic::AtomicBool,
    pub entered: tokio::sync::Notify,
    pub released: tokio::sync::Notify,
}

/// A shadow whose applies go through a [`ShadowHold`].
struct HeldShadow {
    inner: Box<dyn ShadowView>,
    hold: Arc<ShadowHold>,
}

#[async_trait::async_trait]
impl ShadowView for HeldShadow {
    async fn apply(&mut self, changes: Vec<ViewChange>) -> Result<(), StoreError> {
        self.inner.apply(changes).await?;
        if self.hold.armed.swap(false, Ordering::SeqCst) {
            self.hold.entered.notify_one();
            self.hold.released.notified().await;
        }
        Ok(())
    }
    async fn lock_live(&mut self) -> Result<Position, StoreError> {
        self.inner.lock_live().await
    }
    async fn swap(self: Box<Self>, at: Position) -> Result<(), StoreError> {
        self.inner.swap(at).await
    }
}

impl CountingViews {
    pub fn new(inner: Arc<dyn ViewStore>) -> Self {
        CountingViews {
            inner,
            inventory_reads: AtomicU64::new(0),
            checkpoint_reads: AtomicU64::new(0),
            applied: Mutex::default(),
            hold_next_apply: std::sync::atomic::AtomicBool::new(false),
            apply_entered: tokio::sync::Notify::new(),
            apply_released: tokio::sync::Notify::new(),
            shadow_hold: Arc::default(),
            shadows: AtomicU64::new(0),
        }
    }

    /// Holds the next rebuild after its shadow's next batch (see
    /// [`ShadowHold`]).
    pub fn hold_next_shadow_apply(&self) {
        self.shadow_hold.armed.store(true, Ordering::SeqCst);
    }

    /// Holds the next apply until [`Self::release_apply`] (see
    /// `apply_entered`).
    pub fn hold_next_apply(&self) {
        self.hold_next_apply.store(true, Ordering::SeqCst);
    }

    /// Lets the held apply go on.
    pub fn release_apply(&self) {
        self.apply_released.notify_one();
    }

    /// The projections of each apply that was written, in order.
    pub fn applied(&self) -> Vec<Vec<ProjectionName>> {
        self.applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[async_trait::async_trait]
impl ViewStore for CountingViews {
    async fn checkpoint(&self, projection: ProjectionName) -> Result<Position, StoreError> {
        self.checkpoint_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.checkpoint(projection).await
    }
    async fn apply(&self, batches: &[ProjectionBatch]) -> Result<bool, StoreError> {
        if self.hold_next_apply.swap(false, Ordering::SeqCst) {
            self.apply_entered.notify_one();
            self.apply_released.notified().await;
        }
        let written = self.inner.apply(batches).await?;
        if written {
            self.applied
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(batches.iter().map(|batch| batch.projection).collect());
        }
        Ok(written)
    }
    async fn reset(&self, projection: ProjectionName) -> Result<(), StoreError> {
        self.inner.reset(projection).await
    }
    async fn shadow(&self, projection: ProjectionName) -> Result<Box<dyn ShadowView>, StoreError> {
        self.shadows.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(HeldShadow {
            inner: self.inner.shadow(projection).await?,
            hold: Arc::clone(&self.shadow_hold),
        }))
    }
    async fn product(&self, product_id: Uuid) -> Result<Option<ProductView>, StoreError> {
        self.inner.product(product_id).await
    }
    async fn products(
        &self,
        after: Option<Uuid>,
        limit: u32,
        active_only: bool,
    ) -> Result<Vec<ProductView>, StoreError> {
        self.inner.products(after, limit, active_only).await
    }
    async fn inventory(&self, product_id: Uuid) -> Result<Option<InventoryView>, StoreError> {
        self.inventory_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.inventory(product_id).await
    }
    async fn inventories(&self, product_ids: &[Uuid]) -> Result<Vec<InventoryView>, StoreError> {
        self.inventory_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.inventories(product_ids).await
    }
    async fn inventory_snapshot(
        &self,
        product_ids: &[Uuid],
    ) -> Result<(Vec<InventoryView>, Vec<ReservationView>), StoreError> {
        self.inner.inventory_snapshot(product_ids).await
    }
    async fn reservation(
        &self,
        reservation_id: Uuid,
    ) -> Result<Option<ReservationView>, StoreError> {
        self.inner.reservation(reservation_id).await
    }
    async fn expired_reservations(
        &self,
        now: chrono::DateTime<chrono::Utc>,
        limit: u32,
    ) -> Result<Vec<ReservationView>, StoreError> {
        self.inner.expired_reservations(now, limit).await
    }
    async fn order(&self, order_id: Uuid) -> Result<Option<OrderView>, StoreError> {
        self.inner.order(order_id).await
    }
    async fn count_products(&self, active_only: bool) -> Result<u64, StoreError> {
        self.inner.count_products(active_only).await
    }
    async fn orders(
        &self,
        filter: &OrderFilter,
        before: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<OrderView>, StoreError> {
        self.inner.orders(filter, before, limit).await
    }
    async fn order_kpis(
        &self,
        from: chrono::DateTime<chrono::Utc>,
        to: chrono::DateTime<chrono::Utc>,
    ) -> Result<commerce_kernel::projections::OrderKpis, StoreError> {
        self.inner.order_kpis(from, to).await
    }
    async fn count_orders(&self, filter: &OrderFilter) -> Result<u64, StoreError> {
        self.inner.count_orders(filter).await
    }
}
