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
use std::sync::atomic::{AtomicU64, Ordering};
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
/// With a [`LogHorizon`], how often a read-your-writes wait looks whether
/// this process's projector loop is running a round at all.
const PROGRESS_WAIT: Duration = Duration::from_millis(20);
/// With a [`LogHorizon`], how long a read-your-writes wait gives this
/// process's rounds to take its write in before it asks the store anyway.
const STORE_PATIENCE: Duration = Duration::from_millis(250);

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
    /// The email given at checkout, if any.
    pub email: Option<String>,
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

/// Why a round failed: which projection could not project or write its
/// batch, and the position it got stuck at (`None`: the store failed, for
/// all of them).
#[derive(Debug)]
struct RoundFailure {
    projection: Option<ProjectionName>,
    at: Option<Position>,
    error: StoreError,
}

impl RoundFailure {
    fn of_all(error: StoreError) -> Self {
        RoundFailure {
            projection: None,
            at: None,
            error,
        }
    }
}

/// A projection left out of the shared rounds, and when to try it alone.
struct Failing {
    retry_at: tokio::time::Instant,
    /// It rejoins once it has applied its events up to this position
    /// ([`Projector::has_reached`]).
    at: Position,
}

/// What [`Projector::next_batch`] did.
struct BatchStep {
    /// Events of the log the batch went through.
    applied: usize,
    /// Whether more may follow (the batch was full).
    more: bool,
    /// Projections already past this full batch: they go on on their own.
    ahead: Vec<ProjectionName>,
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
                email,
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
                email,
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

/// `changes`, in the order they were made, reduced to at most one change
/// per row and kind with the same end state: stock deltas summed per
/// product, a reservation inserted and deleted within the batch dropped,
/// an order's status changes folded into its insert or into one status
/// change. Product changes (rare) are kept as they are, in order, first.
///
/// Why: a store can then write a whole batch kind by kind in set
/// statements (`unnest`), no row touched twice, instead of one statement
/// per change; under load one batch holds many orders' events.
pub fn net<'a>(changes: impl IntoIterator<Item = &'a ViewChange>) -> Vec<ViewChange> {
    let mut products = Vec::new();
    let mut stock: Vec<ViewChange> = Vec::new();
    let mut stock_rows: HashMap<Uuid, usize> = HashMap::new();
    let mut inserted: Vec<Option<ReservationView>> = Vec::new();
    let mut inserted_rows: HashMap<Uuid, usize> = HashMap::new();
    let mut deleted = Vec::new();
    let mut orders: Vec<ViewChange> = Vec::new();
    let mut order_rows: HashMap<Uuid, usize> = HashMap::new();
    for change in changes {
        match change {
            ViewChange::InsertProduct(_) | ViewChange::UpdateProduct { .. } => {
                products.push(change.clone());
            }
            ViewChange::AdjustInventory {
                product_id,
                on_hand_delta,
                reserved_delta,
                version,
                at,
            } => match stock_rows
                .get(product_id)
                .and_then(|&row| stock.get_mut(row))
            {
                Some(ViewChange::AdjustInventory {
                    on_hand_delta: on_hand,
                    reserved_delta: reserved,
                    version: last_version,
                    at: last_at,
                    ..
                }) => {
                    *on_hand += on_hand_delta;
                    *reserved += reserved_delta;
                    *last_version = *version;
                    *last_at = *at;
                }
                _ => {
                    stock_rows.insert(*product_id, stock.len());
                    stock.push(change.clone());
                }
            },
            ViewChange::InsertReservation(reservation) => {
                inserted_rows.insert(reservation.reservation_id, inserted.len());
                inserted.push(Some(reservation.clone()));
            }
            ViewChange::DeleteReservation { reservation_id } => {
                match inserted_rows
                    .get(reservation_id)
                    .and_then(|&row| inserted.get_mut(row))
                {
                    Some(row) => *row = None,
                    None => deleted.push(change.clone()),
                }
            }
            ViewChange::InsertOrder(order) => {
                order_rows.insert(order.order_id, orders.len());
                orders.push(ViewChange::InsertOrder(order.clone()));
            }
            ViewChange::SetOrderStatus {
                order_id,
                status,
                reason,
                version,
                at,
            } => match order_rows
                .get(order_id)
                .and_then(|&row| orders.get_mut(row))
            {
                Some(ViewChange::InsertOrder(order)) => {
                    order.status = *status;
                    if reason.is_some() {
                        order.reason.clone_from(reason);
                    }
                    order.version = *version;
                    order.updated_at = *at;
                }
                Some(ViewChange::SetOrderStatus {
                    status: last_status,
                    reason: last_reason,
                    version: last_version,
                    at: last_at,
                    ..
                }) => {
                    *last_status = *status;
                    if reason.is_some() {
                        last_reason.clone_from(reason);
                    }
                    *last_version = *version;
                    *last_at = *at;
                }
                _ => {
                    order_rows.insert(*order_id, orders.len());
                    orders.push(change.clone());
                }
            },
        }
    }
    products
        .into_iter()
        .chain(stock)
        .chain(
            inserted
                .into_iter()
                .flatten()
                .map(ViewChange::InsertReservation),
        )
        .chain(deleted)
        .chain(orders)
        .collect()
}

/// A projection's views rebuilt beside the live ones: temporary tables on
/// a connection of their own, which only that connection sees and which
/// go with it. Queries keep reading the live views, whole, until
/// [`ShadowView::swap`] replaces their rows in one transaction; a shadow
/// dropped before that (a failure, a cancelled request, a killed process)
/// leaves nothing behind and the live views as they were.
#[async_trait]
pub trait ShadowView: Send {
    /// Writes `changes` (of the projection's events, in log order) to the
    /// shadow tables.
    async fn apply(&mut self, changes: Vec<ViewChange>) -> Result<(), StoreError>;

    /// Begins the swap's transaction: locks the live checkpoint, so every
    /// process's projector waits for this projection until the swap
    /// commits (on SQLite, every writer waits: keep what follows short),
    /// and returns it. Changes applied after this are part of the swap.
    async fn lock_live(&mut self) -> Result<Position, StoreError>;

    /// After [`Self::lock_live`]: replaces the live views' rows with the
    /// shadow's, moves the checkpoint to `at`, and commits.
    async fn swap(self: Box<Self>, at: Position) -> Result<(), StoreError>;
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

    /// Empty shadow tables for `projection`, on a connection of their own,
    /// to rebuild it beside the live views ([`Projector::rebuild`]).
    async fn shadow(&self, projection: ProjectionName) -> Result<Box<dyn ShadowView>, StoreError>;

    async fn product(&self, product_id: Uuid) -> Result<Option<ProductView>, StoreError>;

    /// Products in creation order, after the product `after`; with
    /// `active_only`, those on sale alone.
    async fn products(
        &self,
        after: Option<Uuid>,
        limit: u32,
        active_only: bool,
    ) -> Result<Vec<ProductView>, StoreError>;

    async fn inventory(&self, product_id: Uuid) -> Result<Option<InventoryView>, StoreError>;

    /// The stock of each of `product_ids` that has any, in one read (at
    /// most [`crate::event_store::MAX_STREAMS_PER_READ`] ids).
    async fn inventories(&self, product_ids: &[Uuid]) -> Result<Vec<InventoryView>, StoreError>;

    async fn reservation(
        &self,
        reservation_id: Uuid,
    ) -> Result<Option<ReservationView>, StoreError>;

    /// The stock of each of `product_ids` that has any, and every
    /// reservation of those products, read in one snapshot (at most
    /// [`crate::event_store::MAX_STREAMS_PER_READ`] ids): the inventory
    /// reconciliation compares the two with the streams, and reads made at
    /// two moments could disagree with each other, not with the streams.
    async fn inventory_snapshot(
        &self,
        product_ids: &[Uuid],
    ) -> Result<(Vec<InventoryView>, Vec<ReservationView>), StoreError>;

    /// Reservations whose expiry is at or before `now`, oldest expiry first.
    async fn expired_reservations(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<ReservationView>, StoreError>;

    async fn order(&self, order_id: Uuid) -> Result<Option<OrderView>, StoreError>;

    /// How many products there are (with `active_only`, on sale).
    async fn count_products(&self, active_only: bool) -> Result<u64, StoreError>;

    /// Orders newest first, matching `filter`, older than the order `before`.
    async fn orders(
        &self,
        filter: &OrderFilter,
        before: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<OrderView>, StoreError>;

    /// How many orders match `filter`.
    async fn count_orders(&self, filter: &OrderFilter) -> Result<u64, StoreError>;

    /// What the orders placed in `[from, to)` became (see [`OrderKpis`]).
    async fn order_kpis(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<OrderKpis, StoreError>;
}

/// The orders placed in a time range, for the `kpis` report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OrderKpis {
    /// How many are in each status now (statuses with none left out).
    pub by_status: Vec<(OrderStatus, u64)>,
    /// The totals of the CONFIRMED ones, per currency, summed exactly.
    pub revenue: Vec<Money>,
    /// Placed to final status (CONFIRMED, FAILED, CANCELLED): the 95th
    /// percentile by nearest rank; `None` when none is final.
    pub final_p95: Option<std::time::Duration>,
}

/// The nearest-rank index (0-based) of the `percent` percentile of `count`
/// sorted values: both backends pick this one row.
pub fn nearest_rank(count: u64, percent: u64) -> u64 {
    (count * percent).div_ceil(100).saturating_sub(1)
}

/// Which orders a listing shows; `None` fields match every order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderFilter {
    pub status: Option<OrderStatus>,
    pub customer_id: Option<Uuid>,
    /// Orders whose checkout email is this one, compared by [`email_key`].
    pub email: Option<String>,
}

/// What two emails must share to be the same address in an order search:
/// the whole address lowercased. Computed here, not in SQL, so that both
/// backends agree (SQLite's `lower` knows only ASCII).
pub fn email_key(email: &str) -> String {
    email.trim().to_lowercase()
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
    /// Numbers the running loop's rounds as they begin (the first is 1).
    started: Arc<AtomicU64>,
    /// The number of the loop's last ended round, so waiters wake when one
    /// ends and can tell whether it began after what they wait for.
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
    /// Counts this process's resets (rebuilds), so that a batch applied
    /// just before one does not record its checkpoint after it.
    resets: Arc<AtomicU64>,
    /// Per projection, the rebuilds of this process.
    rebuilds: Arc<HashMap<ProjectionName, RebuildSlot>>,
}

/// A projection's rebuilds in one process: one at a time, and a request
/// made while one runs joins it instead of replaying the log again.
#[derive(Default)]
struct RebuildSlot {
    /// Held by the rebuild under way.
    running: tokio::sync::Mutex<()>,
    /// Rebuilds that swapped.
    swapped: AtomicU64,
}

impl Projector {
    pub fn new(store: Arc<dyn EventStore>, views: Arc<dyn ViewStore>) -> Self {
        Projector {
            store,
            views,
            wake: Arc::new(Notify::new()),
            started: Arc::default(),
            rounds: Arc::new(watch::Sender::new(0)),
            horizon: None,
            written: Arc::default(),
            resets: Arc::default(),
            rebuilds: Arc::new(
                ProjectionName::ALL
                    .into_iter()
                    .map(|projection| (projection, RebuildSlot::default()))
                    .collect(),
            ),
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
    /// Returns how many events of the log this call went through; a group
    /// stops early (without error) when another process is applying it.
    pub async fn catch_up(&self) -> Result<usize, StoreError> {
        self.lock_written().clear();
        self.catch_up_from_written(&ProjectionName::ALL)
            .await
            .map_err(|failure| failure.error)
    }

    /// Rounds of `projections` ([`Self::round`]) until none has more.
    async fn catch_up_from_written(
        &self,
        projections: &[ProjectionName],
    ) -> Result<usize, RoundFailure> {
        let mut applied = 0;
        loop {
            let (events, more) = self.round(projections).await?;
            applied += events;
            if !more {
                return Ok(applied);
            }
        }
    }

    /// One round of `projections` together: one read of the log and one
    /// [`ViewStore::apply`] per batch for all of them, instead of one each.
    /// Each starts from the checkpoint this process last wrote for it when
    /// it has one, else from the stored checkpoint. Returns how many events
    /// the round went through and whether more may follow.
    ///
    /// A shared read starts at the furthest-behind checkpoint. So that a
    /// projection far behind (rebuilt, say) does not hold the others back,
    /// those a full batch did not reach take a batch of their own in the
    /// same round; every round reads all of them again, so what is written
    /// during a long replay reaches the others' views at the next round.
    async fn round(&self, projections: &[ProjectionName]) -> Result<(usize, bool), RoundFailure> {
        let mut pending = vec![projections.to_vec()];
        let (mut applied, mut more) = (0, false);
        while let Some(group) = pending.pop() {
            let step = self.next_batch(&group).await?;
            applied += step.applied;
            more |= step.more;
            if !step.ahead.is_empty() {
                pending.push(step.ahead);
            }
        }
        Ok((applied, more))
    }

    /// Reads and applies the next batch of `group`'s events.
    async fn next_batch(&self, group: &[ProjectionName]) -> Result<BatchStep, RoundFailure> {
        let resets = self.resets.load(Ordering::Acquire);
        let done = BatchStep {
            applied: 0,
            more: false,
            ahead: Vec::new(),
        };
        let filter = EventFilter {
            any_aggregate_type: group
                .iter()
                .map(|p| p.aggregate_type().to_string())
                .collect(),
            ..EventFilter::default()
        };
        let mut froms = Vec::with_capacity(group.len());
        for &projection in group {
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
            return Ok(done);
        };
        let events = self
            .store
            .read_all_matching(&filter, start, BATCH_SIZE)
            .await
            .map_err(RoundFailure::of_all)?;
        let Some(last) = events.last() else {
            return Ok(done);
        };
        let to = last.position;
        // A batch shorter than asked for reached what the log shows now:
        // no second read to find it empty (an append meanwhile wakes the
        // projector again).
        let full = events.len() >= BATCH_SIZE as usize;
        let mut batches = Vec::with_capacity(froms.len());
        let mut ahead = Vec::new();
        for (projection, from) in froms {
            if from >= to {
                // Already past this batch; if it was full, the projection
                // may have more of its own further on.
                if full {
                    ahead.push(projection);
                }
                continue;
            }
            let mut changes = Vec::new();
            for event in events.iter().filter(|event| event.position > from) {
                changes.extend(project(projection, event).map_err(|error| RoundFailure {
                    projection: Some(projection),
                    at: Some(event.position),
                    error,
                })?);
            }
            // Moved to `to` even without changes of its own: the events it
            // skipped are of other types, and a checkpoint at the head
            // answers read-your-writes without a log read.
            batches.push(ProjectionBatch {
                projection,
                from,
                to,
                changes,
            });
        }
        let applied = match self.views.apply(&batches).await {
            Ok(applied) => applied,
            // One projection's rows refused (or the store failing): find
            // which, so the others go on without it.
            Err(_) if batches.len() > 1 => self.apply_one_by_one(&batches).await?,
            Err(error) => {
                return Err(RoundFailure {
                    projection: batches.first().map(|batch| batch.projection),
                    at: Some(to),
                    error,
                });
            }
        };
        if !applied {
            // Another process is applying, or was: read where it got. The
            // projections ahead of this batch were not part of it.
            self.lock_written().clear();
            return Ok(BatchStep {
                applied: 0,
                more: false,
                ahead,
            });
        }
        let mut written = self.lock_written();
        // A reset since this batch began may have come after its apply:
        // what it wrote is gone, so it must not count as written.
        if self.resets.load(Ordering::Acquire) == resets {
            for batch in &batches {
                written.insert(batch.projection, batch.to);
            }
        }
        Ok(BatchStep {
            applied: events.len(),
            more: full,
            ahead,
        })
    }

    /// Applies `batches` each in a transaction of its own, after their
    /// shared apply failed. If some apply and one does not, that projection
    /// is at fault; if none does, the store is (the failure is everyone's).
    async fn apply_one_by_one(&self, batches: &[ProjectionBatch]) -> Result<bool, RoundFailure> {
        let mut first_failure = None;
        let mut any_written = false;
        for batch in batches {
            match self.views.apply(std::slice::from_ref(batch)).await {
                Ok(true) => any_written = true,
                Ok(false) => return Ok(false),
                Err(error) => {
                    first_failure.get_or_insert(RoundFailure {
                        projection: Some(batch.projection),
                        at: Some(batch.to),
                        error,
                    });
                }
            }
        }
        match first_failure {
            None => Ok(true),
            Some(failure) if any_written => Err(failure),
            Some(failure) => Err(RoundFailure::of_all(failure.error)),
        }
    }

    fn lock_written(&self) -> std::sync::MutexGuard<'_, HashMap<ProjectionName, Position>> {
        self.written.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs rounds of the projections: the next at once while a round says
    /// more may follow, else after a nudge, the poll interval or shutdown.
    /// Errors are logged and retried on the next round.
    ///
    /// A projection that fails on its own (an event it cannot project, rows
    /// its store refuses) would hold back the others, whose shared reads
    /// start at the furthest-behind checkpoint: it is left out of the shared
    /// rounds and caught up alone every [`FAILING_RETRY`], and rejoins once
    /// it has applied its events up to where it failed.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut woken = false;
        let mut failing: HashMap<ProjectionName, Failing> = HashMap::new();
        loop {
            let round = self.started.fetch_add(1, Ordering::SeqCst) + 1;
            if !woken {
                // A timer round: another process may have moved (or reset)
                // any checkpoint.
                self.lock_written().clear();
            }
            let together: Vec<ProjectionName> = ProjectionName::ALL
                .into_iter()
                .filter(|p| !failing.contains_key(p))
                .collect();
            let more = match self.round(&together).await {
                Ok((_, more)) => more,
                Err(failure) => {
                    self.note_failure(failure, &mut failing);
                    false
                }
            };
            let now = tokio::time::Instant::now();
            let due: Vec<(ProjectionName, Position)> = failing
                .iter()
                .filter(|(_, failed)| failed.retry_at <= now)
                .map(|(p, failed)| (*p, failed.at))
                .collect();
            for (projection, at) in due {
                let caught_up = match self.catch_up_from_written(&[projection]).await {
                    Ok(_) => self.has_reached(projection, at).await,
                    Err(failure) => {
                        self.note_failure(failure, &mut failing);
                        continue;
                    }
                };
                match caught_up {
                    Ok(true) => {
                        failing.remove(&projection);
                    }
                    Ok(false) | Err(_) => {
                        if let Some(failed) = failing.get_mut(&projection) {
                            failed.retry_at = now + FAILING_RETRY;
                        }
                    }
                }
            }
            self.rounds.send_replace(round);
            if more {
                woken = true;
                if shutdown.has_changed().unwrap_or(true) {
                    return;
                }
                continue;
            }
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

    fn note_failure(&self, failure: RoundFailure, failing: &mut HashMap<ProjectionName, Failing>) {
        self.lock_written().clear();
        match (failure.projection, failure.at) {
            (Some(projection), Some(at)) => {
                tracing::warn!(projection = projection.as_str(), error = %failure.error, "projection failed; retrying it on its own");
                failing.insert(
                    projection,
                    Failing {
                        retry_at: tokio::time::Instant::now() + FAILING_RETRY,
                        at,
                    },
                );
            }
            _ => tracing::warn!(error = %failure.error, "projections failed; retrying"),
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

    /// Whether this process's projector moved `projection`'s checkpoint to
    /// `position` or past it: reached, known without a read. Checkpoints
    /// only move forward; a rebuild's swap ([`Self::rebuild_now`]) moves
    /// the checkpoint to where the live one was or past it. A rebuild here
    /// forgets what was written anyway (and a batch applied just before it
    /// does not record it afterwards, see `resets`); one in another
    /// process is seen at this process's next round, whose apply finds the
    /// checkpoint moved, is refused and forgets what was written. What was
    /// written stays true through a swap: the rebuilt view holds it.
    fn written_past(&self, projection: ProjectionName, position: Position) -> bool {
        self.lock_written()
            .get(&projection)
            .is_some_and(|written| *written >= position)
    }

    /// Read-your-writes: waits until each of `projections` has reached
    /// `position`, or `timeout` passes. Returns whether they all did.
    /// What this process's projector wrote is trusted first (see
    /// [`Self::written_past`]); the store is asked about the rest.
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
        // With a horizon this process runs the projector loop, and a round
        // that begins once `position` is readable reads the log past it.
        // The store is asked when such a round ended without taking a
        // projection past (another process is applying it, or it is
        // failing, or the round's batch ended before it), when no round is
        // under way (the loop is not running here), or when rounds take
        // longer than `STORE_PATIENCE` (a slow store, or a loop that died
        // mid-round). A round already under way when the wait began read
        // the log too early to prove anything; it is waited out, and the
        // nudge starts a fresh one after it.
        let mut fresh_round = self.started.load(Ordering::SeqCst) + 1;
        let mut awaited_since = tokio::time::Instant::now();
        let mut ask_store = self.horizon.is_none();
        loop {
            self.nudge();
            pending.retain(|&projection| !self.written_past(projection, position));
            if ask_store {
                let mut still = Vec::with_capacity(pending.len());
                for projection in pending {
                    if !self.has_reached(projection, position).await? {
                        still.push(projection);
                    }
                }
                pending = still;
                // The store answered as of now: the next look needs a
                // round that begins after it.
                fresh_round = self.started.load(Ordering::SeqCst) + 1;
                awaited_since = tokio::time::Instant::now();
                ask_store = self.horizon.is_none();
            }
            if pending.is_empty() {
                return Ok(true);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            if self.horizon.is_some() {
                let wait = PROGRESS_WAIT.min(deadline - now);
                let fresh_ended =
                    tokio::time::timeout(wait, rounds.wait_for(|&ended| ended >= fresh_round))
                        .await
                        .is_ok();
                let under_way = self.started.load(Ordering::SeqCst) > *rounds.borrow();
                ask_store = fresh_ended || !under_way || awaited_since.elapsed() >= STORE_PATIENCE;
            } else {
                tokio::time::sleep(WAIT_STEP).await;
            }
        }
    }

    /// Rebuilds a projection from the start of the log without queries
    /// ever seeing it half-built ([`Self::rebuild_now`]). Returns true once
    /// swapped, or false after `timeout` while the rebuild goes on in the
    /// background (a request that started it may end; the rebuild does not).
    /// A request made while this process rebuilds the projection joins that
    /// rebuild (and runs one of its own only if that one fails).
    pub async fn rebuild(
        &self,
        projection: ProjectionName,
        timeout: Duration,
    ) -> Result<bool, StoreError> {
        let projector = self.clone();
        // Read when asked, not when the task runs: a rebuild that swaps in
        // between is one this request may join.
        let swapped_before = self
            .rebuilds
            .get(&projection)
            .map(|slot| slot.swapped.load(Ordering::Acquire));
        let rebuild = tokio::spawn(async move {
            let (Some(slot), Some(swapped_before)) =
                (projector.rebuilds.get(&projection), swapped_before)
            else {
                return projector.rebuild_now(projection).await;
            };
            let _running = match slot.running.try_lock() {
                Ok(running) => running,
                Err(_) => {
                    let running = slot.running.lock().await;
                    if slot.swapped.load(Ordering::Acquire) > swapped_before {
                        // Joined: the rebuild under way when asked swapped.
                        return Ok(());
                    }
                    running
                }
            };
            let rebuilt = projector.rebuild_now(projection).await;
            match &rebuilt {
                Ok(()) => {
                    slot.swapped.fetch_add(1, Ordering::AcqRel);
                }
                Err(error) => {
                    tracing::warn!(projection = projection.as_str(), %error, "rebuild failed; the live views are unchanged");
                }
            }
            rebuilt
        });
        match tokio::time::timeout(timeout, rebuild).await {
            Ok(Ok(rebuilt)) => rebuilt.map(|()| true),
            Ok(Err(stopped)) => Err(StoreError::Corrupt(format!(
                "the rebuild of {} stopped: {stopped}",
                projection.as_str()
            ))),
            Err(_) => Ok(false),
        }
    }

    /// The rebuild itself: the log is replayed into shadow tables
    /// ([`ViewStore::shadow`]) while the live views keep answering; then,
    /// with the live checkpoint locked, the events written meanwhile are
    /// replayed too and the shadow's rows replace the live ones in one
    /// transaction. Dropping the future drops the shadow and changes
    /// nothing.
    pub async fn rebuild_now(&self, projection: ProjectionName) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let mut shadow = self.views.shadow(projection).await?;
        let mut at = Position::START;
        while self.replay_batch(projection, &mut shadow, &mut at).await? {}
        let replayed = std::time::Instant::now();
        let live = shadow.lock_live().await?;
        let locked = std::time::Instant::now();
        // Every projector waits now. What they applied was readable, so
        // this replay, which reads to the log's end, has it too.
        while self.replay_batch(projection, &mut shadow, &mut at).await? {}
        shadow.swap(at.max(live)).await?;
        self.resets.fetch_add(1, Ordering::AcqRel);
        self.lock_written().remove(&projection);
        self.nudge();
        // How long the live checkpoint was locked is what the rest of the
        // system felt (see `ShadowView::lock_live`).
        tracing::info!(
            projection = projection.as_str(),
            replay_ms = (replayed - started).as_millis() as u64,
            lock_wait_ms = (locked - replayed).as_millis() as u64,
            locked_ms = locked.elapsed().as_millis() as u64,
            "projection rebuilt and swapped in"
        );
        Ok(())
    }

    /// Replays the next batch of `projection`'s events after `at` into
    /// `shadow`, moving `at` to its last; returns whether more may follow.
    async fn replay_batch(
        &self,
        projection: ProjectionName,
        shadow: &mut Box<dyn ShadowView>,
        at: &mut Position,
    ) -> Result<bool, StoreError> {
        let events = self
            .store
            .read_all_matching(&Self::filter(projection), *at, BATCH_SIZE)
            .await?;
        let Some(last) = events.last() else {
            return Ok(false);
        };
        let mut changes = Vec::new();
        for event in &events {
            changes.extend(project(projection, event)?);
        }
        shadow.apply(net(changes.iter())).await?;
        *at = last.position;
        Ok(events.len() >= BATCH_SIZE as usize)
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::TimeZone as _;

    use super::*;
    use crate::domain::money::Currency;

    /// The views as maps, changed one change at a time the way the stores'
    /// statements change them.
    #[derive(Debug, Default, Clone, PartialEq)]
    struct Tables {
        products: BTreeMap<Uuid, ProductView>,
        stock: BTreeMap<Uuid, (i64, i64, u32, DateTime<Utc>)>,
        reservations: BTreeMap<Uuid, ReservationView>,
        orders: BTreeMap<Uuid, OrderView>,
    }

    impl Tables {
        fn apply(&mut self, change: &ViewChange) {
            match change.clone() {
                ViewChange::InsertProduct(product) => {
                    self.products.insert(product.product_id, product);
                }
                ViewChange::UpdateProduct {
                    product_id,
                    name,
                    price,
                    active,
                    version,
                    at,
                } => {
                    let row = self.products.get_mut(&product_id).expect("product row");
                    row.name = name.unwrap_or(row.name.clone());
                    row.price = price.unwrap_or(row.price);
                    row.active = active.unwrap_or(row.active);
                    row.version = version;
                    row.updated_at = at;
                }
                ViewChange::AdjustInventory {
                    product_id,
                    on_hand_delta,
                    reserved_delta,
                    version,
                    at,
                } => {
                    let row = self.stock.entry(product_id).or_insert((0, 0, 0, at));
                    *row = (row.0 + on_hand_delta, row.1 + reserved_delta, version, at);
                }
                ViewChange::InsertReservation(reservation) => {
                    let fresh = self
                        .reservations
                        .insert(reservation.reservation_id, reservation);
                    assert!(fresh.is_none(), "a reservation inserted twice");
                }
                ViewChange::DeleteReservation { reservation_id } => {
                    self.reservations.remove(&reservation_id);
                }
                ViewChange::InsertOrder(order) => {
                    let fresh = self.orders.insert(order.order_id, *order);
                    assert!(fresh.is_none(), "an order inserted twice");
                }
                ViewChange::SetOrderStatus {
                    order_id,
                    status,
                    reason,
                    version,
                    at,
                } => {
                    let row = self.orders.get_mut(&order_id).expect("order row");
                    row.status = status;
                    row.reason = reason.or(row.reason.clone());
                    row.version = version;
                    row.updated_at = at;
                }
            }
        }
    }

    fn at(second: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 4, 12, 0, second)
            .single()
            .expect("a valid time")
    }

    fn euros(amount: i64) -> Money {
        Money::new(amount.into(), Currency::parse("EUR").expect("EUR")).expect("money")
    }

    fn reservation(id: Uuid, product_id: Uuid, quantity: u32) -> ReservationView {
        ReservationView {
            reservation_id: id,
            product_id,
            owner: "order:test".into(),
            quantity,
            expires_at: None,
            created_at: at(0),
        }
    }

    fn order(id: Uuid, version: u32) -> OrderView {
        OrderView {
            order_id: id,
            customer_id: Uuid::from_u128(9),
            status: OrderStatus::Pending,
            total: euros(12),
            reason: None,
            lines: Vec::new(),
            shipping_address: Address {
                name: "Grace Hopper".into(),
                line1: "1 Navy Way".into(),
                line2: None,
                city: "Arlington".into(),
                postal_code: "22202".into(),
                region: None,
                country: "US".into(),
            },
            payment_method: "card".into(),
            email: None,
            version,
            created_at: at(0),
            updated_at: at(0),
        }
    }

    fn status(order_id: Uuid, status: OrderStatus, reason: Option<&str>, v: u32) -> ViewChange {
        ViewChange::SetOrderStatus {
            order_id,
            status,
            reason: reason.map(str::to_string),
            version: v,
            at: at(v),
        }
    }

    fn adjust(product_id: Uuid, on_hand: i64, reserved: i64, v: u32) -> ViewChange {
        ViewChange::AdjustInventory {
            product_id,
            on_hand_delta: on_hand,
            reserved_delta: reserved,
            version: v,
            at: at(v),
        }
    }

    #[test]
    fn a_netted_batch_leaves_the_views_as_the_changes_one_by_one_and_touches_each_row_once() {
        let id = Uuid::from_u128;
        let (cup, saucer) = (id(1), id(2));
        let (kept, dropped, older) = (id(10), id(11), id(12));
        let (new_order, old_order) = (id(20), id(21));
        let mut before = Tables::default();
        before.apply(&adjust(saucer, 5, 0, 1));
        before.apply(&ViewChange::InsertReservation(reservation(
            older, saucer, 1,
        )));
        before.apply(&ViewChange::InsertOrder(Box::new(order(old_order, 1))));
        before.apply(&status(old_order, OrderStatus::Failed, Some("declined"), 2));

        let changes = vec![
            ViewChange::InsertProduct(ProductView {
                product_id: cup,
                sku: "CUP".into(),
                name: "Cup".into(),
                price: euros(3),
                active: true,
                version: 1,
                created_at: at(1),
                updated_at: at(1),
            }),
            ViewChange::UpdateProduct {
                product_id: cup,
                name: Some("Espresso cup".into()),
                price: None,
                active: None,
                version: 2,
                at: at(2),
            },
            adjust(cup, 10, 0, 1),
            adjust(cup, 0, 2, 2),
            ViewChange::InsertReservation(reservation(kept, cup, 2)),
            adjust(saucer, 0, 1, 2),
            ViewChange::InsertReservation(reservation(dropped, saucer, 1)),
            ViewChange::InsertOrder(Box::new(order(new_order, 1))),
            status(new_order, OrderStatus::InventoryReserved, None, 2),
            status(new_order, OrderStatus::Cancelled, Some("customer asked"), 3),
            status(new_order, OrderStatus::Cancelled, None, 4),
            adjust(saucer, 0, -1, 3),
            ViewChange::DeleteReservation {
                reservation_id: dropped,
            },
            ViewChange::DeleteReservation {
                reservation_id: older,
            },
            adjust(cup, -2, -2, 3),
            status(old_order, OrderStatus::Failed, Some("retried"), 3),
            status(old_order, OrderStatus::Cancelled, None, 4),
        ];
        let netted = net(&changes);

        let mut one_by_one = before.clone();
        changes.iter().for_each(|change| one_by_one.apply(change));
        let mut at_once = before.clone();
        netted.iter().for_each(|change| at_once.apply(change));
        assert_eq!(at_once, one_by_one);
        assert_eq!(
            one_by_one.orders[&old_order].reason.as_deref(),
            Some("retried"),
            "a status change without a reason keeps the last one given"
        );

        // Each row once per kind (products aside), so stores can write kinds
        // in set statements; the reservation made and released in the batch
        // is not written at all.
        let mut rows = std::collections::HashSet::new();
        for change in &netted {
            let row = match change {
                ViewChange::InsertProduct(_) | ViewChange::UpdateProduct { .. } => continue,
                ViewChange::AdjustInventory { product_id, .. } => ("stock", *product_id),
                ViewChange::InsertReservation(r) => ("reservation", r.reservation_id),
                ViewChange::DeleteReservation { reservation_id } => {
                    ("reservation", *reservation_id)
                }
                ViewChange::InsertOrder(o) => ("order", o.order_id),
                ViewChange::SetOrderStatus { order_id, .. } => ("order", *order_id),
            };
            assert!(rows.insert(row), "{row:?} changed twice in {netted:#?}");
        }
        assert!(!rows.contains(&("reservation", dropped)));
        assert_eq!(netted.len(), 2 + 2 + 1 + 1 + 2);
    }
}
