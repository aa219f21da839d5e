//! CQRS read models: views of the event log that queries read instead of the
//! event store.
//!
//! A projection follows the global log (gap-free, see the event store) for
//! one aggregate type and turns each event into [`ViewChange`]s with the pure
//! function [`project`]. A [`ViewStore`] applies a batch of changes and moves
//! the projection's checkpoint in one transaction, so every event is applied
//! exactly once and a crash resumes from the last committed batch. Several
//! kernel processes may run projectors against one database: the checkpoint
//! row is taken with a lock, so one applies a batch while the others skip.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};
use uuid::Uuid;

use crate::domain::catalog::ProductEvent;
use crate::domain::inventory::InventoryEvent;
use crate::domain::money::Money;
use crate::domain::order::{Address, OrderEvent, OrderLine, OrderStatus};
use crate::event_store::repository::decode;
use crate::event_store::{
    EventFilter, EventStore, LogHorizon, Position, RecordedEvent, StoreError,
};

/// Events read and applied per transaction.
const BATCH_SIZE: u32 = 500;
/// How often a projector looks for events written by other processes.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often [`Projector::wait_for`] checks progress.
const WAIT_STEP: Duration = Duration::from_millis(3);
/// How often a projection that failed to project an event is tried again,
/// on its own (see [`Projector::run`]).
const FAILING_RETRY: Duration = Duration::from_secs(1);
/// With a [`LogHorizon`], how long a read-your-writes wait trusts this
/// process's projector to report progress before looking anyway (another
/// process may be the one applying).
const PROGRESS_WAIT: Duration = Duration::from_millis(20);

/// The kernel's projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProjectionName {
    /// `product_views`.
    Products,
    /// `inventory_views` and `reservation_views`.
    Inventory,
    /// `order_views`.
    Orders,
}

impl ProjectionName {
    pub const ALL: [ProjectionName; 3] = [
        ProjectionName::Products,
        ProjectionName::Inventory,
        ProjectionName::Orders,
    ];

    /// The name in `projection_checkpoints` and in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            ProjectionName::Products => "products",
            ProjectionName::Inventory => "inventory",
            ProjectionName::Orders => "orders",
        }
    }

    pub fn parse(name: &str) -> Option<ProjectionName> {
        ProjectionName::ALL.into_iter().find(|p| p.as_str() == name)
    }

    /// The aggregate type whose events this projection follows.
    pub fn aggregate_type(self) -> &'static str {
        match self {
            ProjectionName::Products => "product",
            ProjectionName::Inventory => "inventory",
            ProjectionName::Orders => "order",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductView {
    pub product_id: Uuid,
    pub sku: String,
    pub name: String,
    pub price: Money,
    pub active: bool,
    pub version: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryView {
    pub product_id: Uuid,
    pub on_hand: u32,
    pub reserved: u32,
    pub version: u32,
    pub updated_at: DateTime<Utc>,
}

impl InventoryView {
    pub fn available(&self) -> u32 {
        self.on_hand.saturating_sub(self.reserved)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationView {
    pub reservation_id: Uuid,
    pub product_id: Uuid,
    pub owner: String,
    pub quantity: u32,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderView {
    pub order_id: Uuid,
    pub customer_id: Uuid,
    pub status: OrderStatus,
    pub total: Money,
    /// Why the order was cancelled or failed.
    pub reason: Option<String>,
    pub lines: Vec<OrderLine>,
    pub shipping_address: Address,
    pub payment_method: String,
    pub version: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One row-level change a projection makes for an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewChange {
    InsertProduct(ProductView),
    UpdateProduct {
        product_id: Uuid,
        name: Option<String>,
        price: Option<Money>,
        active: Option<bool>,
        version: u32,
        at: DateTime<Utc>,
    },
    /// Creates the row at zero first if there is none.
    AdjustInventory {
        product_id: Uuid,
        on_hand_delta: i64,
        reserved_delta: i64,
        version: u32,
        at: DateTime<Utc>,
    },
    InsertReservation(ReservationView),
    DeleteReservation {
        reservation_id: Uuid,
    },
    InsertOrder(Box<OrderView>),
    SetOrderStatus {
        order_id: Uuid,
        status: OrderStatus,
        reason: Option<String>,
        version: u32,
        at: DateTime<Utc>,
    },
}

/// What one projection applies in a round: its changes for the events after
/// `from`, up to and including `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionBatch {
    pub projection: ProjectionName,
    pub from: Position,
    pub to: Position,
    pub changes: Vec<ViewChange>,
}

/// Why a round failed, and which projection's event it could not project
/// (`None`: the store failed, for all of them).
#[derive(Debug)]
struct RoundFailure {
    projection: Option<ProjectionName>,
    error: StoreError,
}

impl RoundFailure {
    fn of_all(error: StoreError) -> Self {
        RoundFailure {
            projection: None,
            error,
        }
    }
}

/// The changes `projection` makes for `event` (none for other aggregate types).
pub fn project(
    projection: ProjectionName,
    event: &RecordedEvent,
) -> Result<Vec<ViewChange>, StoreError> {
    if event.aggregate_type != projection.aggregate_type() {
        return Ok(Vec::new());
    }
    let (id, version, at) = (event.aggregate_id, event.version, event.created_at);
    let changes = match projection {
        ProjectionName::Products => match decode::<ProductEvent>(event)? {
            ProductEvent::Created {
                sku,
                name,
                price,
                active,
            } => vec![ViewChange::InsertProduct(ProductView {
                product_id: id,
                sku,
                name,
                price,
                active,
                version,
                created_at: at,
                updated_at: at,
            })],
            change => {
                let (mut name, mut price, mut active) = (None, None, None);
                match change {
                    ProductEvent::Renamed { name: new } => name = Some(new),
                    ProductEvent::PriceChanged { price: new } => price = Some(new),
                    ProductEvent::ActivationChanged { active: new } => active = Some(new),
                    ProductEvent::Created { .. } => {}
                }
                vec![ViewChange::UpdateProduct {
                    product_id: id,
                    name,
                    price,
                    active,
                    version,
                    at,
                }]
            }
        },
        ProjectionName::Inventory => {
            // Inventory streams have ids of their own; the events name the product.
            let adjust =
                |product_id, on_hand_delta: i64, reserved_delta: i64| ViewChange::AdjustInventory {
                    product_id,
                    on_hand_delta,
                    reserved_delta,
                    version,
                    at,
                };
            match decode::<InventoryEvent>(event)? {
                InventoryEvent::StockAdjusted {
                    product_id, delta, ..
                } => vec![adjust(product_id, delta, 0)],
                InventoryEvent::StockReserved {
                    product_id,
                    reservation_id,
                    owner,
                    quantity,
                    expires_at,
                } => vec![
                    adjust(product_id, 0, i64::from(quantity)),
                    ViewChange::InsertReservation(ReservationView {
                        reservation_id,
                        product_id,
                        owner,
                        quantity,
                        expires_at,
                        created_at: at,
                    }),
                ],
                InventoryEvent::ReservationReleased {
                    product_id,
                    reservation_id,
                    quantity,
                    ..
                } => vec![
                    adjust(product_id, 0, -i64::from(quantity)),
                    ViewChange::DeleteReservation { reservation_id },
                ],
                InventoryEvent::ReservationCommitted {
                    product_id,
                    reservation_id,
                    quantity,
                } => vec![
                    adjust(product_id, -i64::from(quantity), -i64::from(quantity)),
                    ViewChange::DeleteReservation { reservation_id },
                ],
            }
        }
        ProjectionName::Orders => match decode::<OrderEvent>(event)? {
            OrderEvent::Placed {
                customer_id,
                lines,
                total,
                shipping_address,
                payment_method,
                ..
            } => vec![ViewChange::InsertOrder(Box::new(OrderView {
                order_id: id,
                customer_id,
                status: OrderStatus::Pending,
                total,
                reason: None,
                lines,
                shipping_address,
                payment_method,
                version,
                created_at: at,
                updated_at: at,
            }))],
            transition => {
                let status = transition.status();
                let reason = match transition {
                    OrderEvent::Cancelled { reason } | OrderEvent::Failed { reason } => {
                        Some(reason)
                    }
                    _ => None,
                };
                vec![ViewChange::SetOrderStatus {
                    order_id: id,
                    status,
                    reason,
                    version,
                    at,
                }]
            }
        },
    };
    Ok(changes)
}

/// Storage of the views and their checkpoints; one implementation per backend.
#[async_trait]
pub trait ViewStore: Send + Sync {
    /// Position of the last event the projection has applied.
    async fn checkpoint(&self, projection: ProjectionName) -> Result<Position, StoreError>;

    /// In one transaction: applies every batch's changes and moves each
    /// batch's checkpoint from its `from` to its `to`. Writes nothing and
    /// returns `false` when any of those checkpoints is no longer at its
    /// `from` or another process is applying a batch of one of them.
    async fn apply(&self, batches: &[ProjectionBatch]) -> Result<bool, StoreError>;

    /// Empties the projection's views and moves its checkpoint to the start,
    /// in one transaction (waiting for a batch in progress to finish).
    async fn reset(&self, projection: ProjectionName) -> Result<(), StoreError>;

    async fn product(&self, product_id: Uuid) -> Result<Option<ProductView>, StoreError>;

    /// Products in creation order, after the product `after`.
    async fn products(
        &self,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<ProductView>, StoreError>;

    async fn inventory(&self, product_id: Uuid) -> Result<Option<InventoryView>, StoreError>;

    /// The stock of each of `product_ids` that has any, in one read (at
    /// most [`crate::event_store::MAX_STREAMS_PER_READ`] ids).
    async fn inventories(&self, product_ids: &[Uuid]) -> Result<Vec<InventoryView>, StoreError>;

    async fn reservation(
        &self,
        reservation_id: Uuid,
    ) -> Result<Option<ReservationView>, StoreError>;

    /// Reservations whose expiry is at or before `now`, oldest expiry first.
    async fn expired_reservations(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<ReservationView>, StoreError>;

    async fn order(&self, order_id: Uuid) -> Result<Option<OrderView>, StoreError>;

    /// How many products there are.
    async fn count_products(&self) -> Result<u64, StoreError>;

    /// Orders newest first, matching `filter`, older than the order `before`.
    async fn orders(
        &self,
        filter: &OrderFilter,
        before: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<OrderView>, StoreError>;

    /// How many orders match `filter`.
    async fn count_orders(&self, filter: &OrderFilter) -> Result<u64, StoreError>;
}

/// Which orders a listing shows; `None` fields match every order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OrderFilter {
    pub status: Option<OrderStatus>,
    pub customer_id: Option<Uuid>,
}

/// How far a projection is behind the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectionLag {
    pub projection: ProjectionName,
    pub checkpoint: Position,
    /// The newest readable position of the whole log.
    pub head: Position,
    /// Events of the projection's aggregate type not yet applied (counted up
    /// to [`BATCH_SIZE`]; more shows as that number).
    pub pending_events: u32,
}

/// Runs the projections: catches them up with the log, on a timer and when
/// woken by a local write.
#[derive(Clone)]
pub struct Projector {
    store: Arc<dyn EventStore>,
    views: Arc<dyn ViewStore>,
    wake: Arc<Notify>,
    /// Counts the running loop's rounds, so waiters wake when one ends.
    rounds: Arc<watch::Sender<u64>>,
    /// The log's readable head, when the process follows it.
    horizon: Option<LogHorizon>,
    /// Each projection's checkpoint as this process last wrote it, so a
    /// round woken by an append starts reading the log there instead of
    /// reading the checkpoint first. If another process has moved the
    /// checkpoint since, the apply finds it elsewhere and is refused whole
    /// ([`ViewStore::apply`]), and the next round reads it again; rounds
    /// on the poll timer always read it (a reset elsewhere, a quiet shop).
    written: Arc<Mutex<HashMap<ProjectionName, Position>>>,
}

impl Projector {
    pub fn new(store: Arc<dyn EventStore>, views: Arc<dyn ViewStore>) -> Self {
        Projector {
            store,
            views,
            wake: Arc::new(Notify::new()),
            rounds: Arc::new(watch::Sender::new(0)),
            horizon: None,
            written: Arc::default(),
        }
    }

    /// Read-your-writes waits first for `horizon` to pass the write (one
    /// read of the head for the whole process), then for this process's
    /// projector rounds, instead of polling on their own every few ms.
    /// [`LogHorizon::follow`] must run.
    pub fn with_horizon(mut self, horizon: LogHorizon) -> Self {
        self.horizon = Some(horizon);
        self
    }

    pub fn views(&self) -> &Arc<dyn ViewStore> {
        &self.views
    }

    /// Asks the running loop to look for new events now.
    pub fn nudge(&self) {
        self.wake.notify_one();
    }

    fn filter(projection: ProjectionName) -> EventFilter {
        EventFilter {
            aggregate_type: Some(projection.aggregate_type().to_string()),
            ..EventFilter::default()
        }
    }

    /// Applies every readable event the projections have not applied yet.
    /// Returns how many events of the log this call went through; stops
    /// early (without error) when another process is applying.
    pub async fn catch_up(&self) -> Result<usize, StoreError> {
        self.lock_written().clear();
        self.catch_up_from_written(&ProjectionName::ALL)
            .await
            .map_err(|failure| failure.error)
    }

    /// Catches `projections` up together: one read of the log and one
    /// [`ViewStore::apply`] per batch for all of them, instead of one each.
    /// Each starts from the checkpoint this process last wrote for it when
    /// it has one, else from the stored checkpoint.
    async fn catch_up_from_written(
        &self,
        projections: &[ProjectionName],
    ) -> Result<usize, RoundFailure> {
        let filter = EventFilter {
            any_aggregate_type: projections
                .iter()
                .map(|p| p.aggregate_type().to_string())
                .collect(),
            ..EventFilter::default()
        };
        let mut applied = 0;
        loop {
            let mut froms = Vec::with_capacity(projections.len());
            for &projection in projections {
                let written = self.lock_written().get(&projection).copied();
                let from = match written {
                    Some(from) => from,
                    None => self
                        .views
                        .checkpoint(projection)
                        .await
                        .map_err(RoundFailure::of_all)?,
                };
                froms.push((projection, from));
            }
            let Some(start) = froms.iter().map(|(_, from)| *from).min() else {
                return Ok(applied);
            };
            let events = self
                .store
                .read_all_matching(&filter, start, BATCH_SIZE)
                .await
                .map_err(RoundFailure::of_all)?;
            let Some(last) = events.last() else {
                return Ok(applied);
            };
            let to = last.position;
            let mut batches = Vec::with_capacity(froms.len());
            for (projection, from) in froms {
                // A projection ahead of this batch (rebuilt siblings start
                // further back) sits it out.
                if from >= to {
                    continue;
                }
                let mut changes = Vec::new();
                for event in events.iter().filter(|event| event.position > from) {
                    changes.extend(project(projection, event).map_err(|error| RoundFailure {
                        projection: Some(projection),
                        error,
                    })?);
                }
                // Moved to `to` even without changes of its own: the
                // events it skipped are of other types, and a checkpoint
                // at the head answers read-your-writes without a log read.
                batches.push(ProjectionBatch {
                    projection,
                    from,
                    to,
                    changes,
                });
            }
            if !self
                .views
                .apply(&batches)
                .await
                .map_err(RoundFailure::of_all)?
            {
                // Another process is applying, or was: read where it got.
                self.lock_written().clear();
                return Ok(applied);
            }
            let mut written = self.lock_written();
            for batch in &batches {
                written.insert(batch.projection, batch.to);
            }
            applied += events.len();
        }
    }

    fn lock_written(&self) -> std::sync::MutexGuard<'_, HashMap<ProjectionName, Position>> {
        self.written.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Catches the projections up, then waits for a nudge, the poll interval
    /// or shutdown. Errors are logged and retried on the next round.
    ///
    /// The projections share each round. One that cannot project an event
    /// (a corrupt or unknown event) would hold back the others, whose
    /// shared reads start at the furthest-behind checkpoint: it is left out
    /// of the shared rounds and tried alone every [`FAILING_RETRY`] until
    /// it gets past that event.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut woken = false;
        let mut failing: HashMap<ProjectionName, tokio::time::Instant> = HashMap::new();
        loop {
            if !woken {
                // A timer round: another process may have moved (or reset)
                // any checkpoint.
                self.lock_written().clear();
            }
            let together: Vec<ProjectionName> = ProjectionName::ALL
                .into_iter()
                .filter(|p| !failing.contains_key(p))
                .collect();
            if let Err(failure) = self.catch_up_from_written(&together).await {
                self.note_failure(&failure, &mut failing);
            }
            let now = tokio::time::Instant::now();
            let due: Vec<ProjectionName> = failing
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(p, _)| *p)
                .collect();
            for projection in due {
                match self.catch_up_from_written(&[projection]).await {
                    Ok(_) => {
                        failing.remove(&projection);
                    }
                    Err(failure) => self.note_failure(&failure, &mut failing),
                }
            }
            self.rounds
                .send_modify(|rounds| *rounds = rounds.wrapping_add(1));
            tokio::select! {
                _ = self.wake.notified() => woken = true,
                _ = tokio::time::sleep(POLL_INTERVAL) => woken = false,
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }

    fn note_failure(
        &self,
        failure: &RoundFailure,
        failing: &mut HashMap<ProjectionName, tokio::time::Instant>,
    ) {
        self.lock_written().clear();
        match failure.projection {
            Some(projection) => {
                failing.insert(projection, tokio::time::Instant::now() + FAILING_RETRY);
                tracing::warn!(projection = projection.as_str(), error = %failure.error, "projection failed; retrying it on its own");
            }
            None => tracing::warn!(error = %failure.error, "projections failed; retrying"),
        }
    }

    /// Whether `projection` has applied every one of its events at or before
    /// `position`. True also when its checkpoint is behind `position` only
    /// because the events since are of other aggregate types.
    pub async fn has_reached(
        &self,
        projection: ProjectionName,
        position: Position,
    ) -> Result<bool, StoreError> {
        let checkpoint = self.views.checkpoint(projection).await?;
        if checkpoint >= position {
            return Ok(true);
        }
        // The log is gap-free below the head: once `position` is readable,
        // every event before it is too, so "nothing pending up to it" is final.
        if self.store.head().await? < position {
            return Ok(false);
        }
        let next = self
            .store
            .read_all_matching(&Self::filter(projection), checkpoint, 1)
            .await?;
        Ok(next.first().is_none_or(|event| event.position > position))
    }

    /// Read-your-writes: waits until each of `projections` has reached
    /// `position`, or `timeout` passes. Returns whether they all did.
    pub async fn wait_for(
        &self,
        projections: &[ProjectionName],
        position: Position,
        timeout: Duration,
    ) -> Result<bool, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pending: Vec<ProjectionName> = projections.to_vec();
        if let Some(horizon) = &self.horizon {
            // No projection can pass a position the log does not show yet.
            if !horizon.wait_until_readable(position, timeout).await {
                return Ok(false);
            }
        }
        let mut rounds = self.rounds.subscribe();
        loop {
            rounds.mark_unchanged();
            self.nudge();
            let mut still = Vec::with_capacity(pending.len());
            for projection in pending {
                if !self.has_reached(projection, position).await? {
                    still.push(projection);
                }
            }
            pending = still;
            if pending.is_empty() {
                return Ok(true);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            if self.horizon.is_some() {
                let wait = PROGRESS_WAIT.min(deadline - now);
                let _ = tokio::time::timeout(wait, rounds.changed()).await;
            } else {
                tokio::time::sleep(WAIT_STEP).await;
            }
        }
    }

    /// Empties a projection and replays it from the start of the log; returns
    /// once it has caught up with the log as it was when the rebuild began
    /// (or after `timeout`, while it keeps catching up in the background).
    pub async fn rebuild(
        &self,
        projection: ProjectionName,
        timeout: Duration,
    ) -> Result<bool, StoreError> {
        let head = self.store.head().await?;
        self.views.reset(projection).await?;
        self.catch_up().await?;
        self.wait_for(&[projection], head, timeout).await
    }

    /// Each projection's position against the head of the log.
    pub async fn lag(&self) -> Result<Vec<ProjectionLag>, StoreError> {
        let head = self.store.head().await?;
        let mut lags = Vec::with_capacity(ProjectionName::ALL.len());
        for projection in ProjectionName::ALL {
            let checkpoint = self.views.checkpoint(projection).await?;
            let pending = self
                .store
                .read_all_matching(&Self::filter(projection), checkpoint, BATCH_SIZE)
                .await?;
            lags.push(ProjectionLag {
                projection,
                checkpoint,
                head,
                pending_events: u32::try_from(pending.len()).unwrap_or(BATCH_SIZE),
            });
        }
        Ok(lags)
    }
}
