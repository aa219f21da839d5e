//! Inventory reconciliation: every inventory stream replayed from the log
//! and compared with the stock read model and with the orders its
//! reservations are held for. It is the runbook's command
//! (`reconcileInventory`, `commerce-kernel reconcile-inventory`) and the
//! source of `commerce_inventory_drift_products` (the InventoryMismatch
//! alert).
//!
//! The streams are the truth. What it finds is reported, and repaired only
//! by writing events, never by editing rows:
//! - [`DriftKind::ReadModel`]: the stock read model disagrees with a stream
//!   at the version it shows, or has no row for a stream it has already
//!   passed. The repair (by its callers) is rebuilding the inventory
//!   projection from the events.
//! - [`DriftKind::LeakedReservation`]: one of an order's own reservations
//!   (listed in the order's `InventoryReserved` event) still held after the
//!   order ended. The kernel commits or releases an order's reservations in
//!   the same append that ends it, so this is a bug's (or a hand's) doing,
//!   and the stock is held for nobody. The repair releases it with a
//!   `ReservationReleased` event, as the order's end would have.
//!
//! Nothing else is judged: reservations of carts, of other systems (even
//! named `order:<id>`, if that order does not list them) and of orders
//! still in progress are left alone, and so is anything reserved within
//! the grace period (by default [`GRACE`]). A read model behind a stream is
//! compared with the stream at the version it shows.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::orders::reservation_owner;
use super::{CommandContext, CommandError, Commerce};
use crate::domain::inventory::{Inventory, InventoryEvent, ReleaseReason};
use crate::domain::order::Order;
use crate::domain::{Aggregate as _, DomainError};
use crate::event_store::repository::{AggregateRepository, decode};
use crate::event_store::{EventFilter, MAX_STREAMS_PER_READ, Position, StoreError};
use crate::projections::{InventoryView, ProjectionName, ReservationView};

/// How recent a write may be and still not count, by default: the read
/// model and an order's placement need a moment.
pub const GRACE: chrono::Duration = chrono::Duration::seconds(60);

/// Events read from the log at a time.
const PAGE: u32 = 1_000;

/// What kind of disagreement a [`Drift`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriftKind {
    /// The read model's stock or reservations differ from the stream's.
    ReadModel,
    /// An ended order's own reservation, still held.
    LeakedReservation,
}

/// One disagreement found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub product_id: Uuid,
    pub kind: DriftKind,
    /// The leaked reservation, for [`DriftKind::LeakedReservation`].
    pub reservation_id: Option<Uuid>,
    /// What differs, in words (both sides' numbers).
    pub detail: String,
}

/// The outcome of a reconciliation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InventoryReconciliation {
    /// Inventory streams replayed.
    pub products_checked: u64,
    pub events_replayed: u64,
    pub drift: Vec<Drift>,
    /// Leaked reservations the repair released (a subset of `drift`).
    pub released: Vec<Uuid>,
}

impl InventoryReconciliation {
    /// Products with any drift: the value of `commerce_inventory_drift_products`.
    pub fn drifted_products(&self) -> usize {
        self.drift
            .iter()
            .map(|drift| drift.product_id)
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// Whether the read model needs rebuilding.
    pub fn read_model_drifted(&self) -> bool {
        self.drift.iter().any(|d| d.kind == DriftKind::ReadModel)
    }
}

/// One stream as replayed.
struct Replayed {
    product_id: Uuid,
    state: Inventory,
    version: u32,
    /// Where its last event is in the log.
    last_position: Position,
    /// When each live reservation was made.
    reserved_at: BTreeMap<Uuid, DateTime<Utc>>,
}

impl Commerce {
    /// Replays every inventory stream and compares it with the read model
    /// and with the orders holding its reservations, judging what was
    /// written more than `grace` ago; with `release_leaked`, releases the
    /// leaked reservations (see the module docs).
    pub async fn reconcile_inventory(
        &self,
        release_leaked: bool,
        grace: chrono::Duration,
        context: &CommandContext,
    ) -> Result<InventoryReconciliation, CommandError> {
        let now = Utc::now();
        let (streams, events_replayed) = self.replay_inventory().await?;
        let mut report = InventoryReconciliation {
            products_checked: streams.len() as u64,
            events_replayed,
            ..InventoryReconciliation::default()
        };
        let ids: Vec<Uuid> = streams.keys().copied().collect();
        for chunk in ids.chunks(MAX_STREAMS_PER_READ) {
            let products: Vec<Uuid> = chunk.iter().map(|s| streams[s].product_id).collect();
            // Read before the snapshot: a row missing at a checkpoint past
            // the stream's last event is missing for good (and during a
            // rebuild, rows the projector has not reached are not).
            let checkpoint = self.views.checkpoint(ProjectionName::Inventory).await?;
            let (stock, reservations) = self.views.inventory_snapshot(&products).await?;
            let stock: HashMap<Uuid, &InventoryView> =
                stock.iter().map(|view| (view.product_id, view)).collect();
            let mut shown: HashMap<Uuid, Vec<&ReservationView>> = HashMap::new();
            for reservation in &reservations {
                shown
                    .entry(reservation.product_id)
                    .or_default()
                    .push(reservation);
            }
            for stream_id in chunk {
                let replayed = &streams[stream_id];
                let view = stock.get(&replayed.product_id).copied();
                let held = shown
                    .get(&replayed.product_id)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let detail = match view {
                    None if checkpoint >= replayed.last_position => {
                        Some("the read model has no stock for it".to_string())
                    }
                    None => None,
                    Some(view) if view.version == replayed.version => {
                        read_model_difference(&replayed.state, view, held)
                    }
                    // The read model is behind (or, read after the log,
                    // ahead): compare it with the stream at its version.
                    Some(view) => {
                        let then = AggregateRepository::<Inventory>::new(self.store.clone())
                            .load_at_version(*stream_id, view.version)
                            .await?;
                        read_model_difference(&then.state, view, held)
                    }
                };
                if let Some(detail) = detail {
                    report.drift.push(Drift {
                        product_id: replayed.product_id,
                        kind: DriftKind::ReadModel,
                        reservation_id: None,
                        detail,
                    });
                }
            }
        }
        for leak in self.leaked_reservations(&streams, now - grace).await? {
            if release_leaked {
                match self
                    .decide_inventory(leak.product_id, None, context, |inventory| {
                        inventory.release(
                            leak.product_id,
                            leak.reservation,
                            ReleaseReason::Released,
                        )
                    })
                    .await
                {
                    Ok(_) => report.released.push(leak.reservation),
                    // Released meanwhile.
                    Err(CommandError::Domain(DomainError::ReservationNotFound { .. })) => continue,
                    // Reported as drift left; the other leaks are still tried.
                    Err(error) => {
                        tracing::warn!(reservation_id = %leak.reservation, %error, "could not release a leaked reservation");
                    }
                }
            }
            report.drift.push(Drift {
                product_id: leak.product_id,
                kind: DriftKind::LeakedReservation,
                reservation_id: Some(leak.reservation),
                detail: leak.detail,
            });
        }
        Ok(report)
    }

    /// Every inventory stream folded from the global log, by stream id;
    /// and how many events that took.
    async fn replay_inventory(&self) -> Result<(BTreeMap<Uuid, Replayed>, u64), CommandError> {
        let filter = EventFilter {
            aggregate_type: Some(Inventory::AGGREGATE_TYPE.to_string()),
            ..EventFilter::default()
        };
        let mut streams: BTreeMap<Uuid, Replayed> = BTreeMap::new();
        let mut after = Position::START;
        let mut count = 0u64;
        loop {
            let page = self.store.read_all_matching(&filter, after, PAGE).await?;
            for recorded in &page {
                let event: InventoryEvent = decode(recorded)?;
                let product_id = match &event {
                    InventoryEvent::StockAdjusted { product_id, .. }
                    | InventoryEvent::StockReserved { product_id, .. }
                    | InventoryEvent::ReservationReleased { product_id, .. }
                    | InventoryEvent::ReservationCommitted { product_id, .. } => *product_id,
                };
                let stream = streams
                    .entry(recorded.aggregate_id)
                    .or_insert_with(|| Replayed {
                        product_id,
                        state: Inventory::default(),
                        version: 0,
                        last_position: recorded.position,
                        reserved_at: BTreeMap::new(),
                    });
                match &event {
                    InventoryEvent::StockReserved { reservation_id, .. } => {
                        stream
                            .reserved_at
                            .insert(*reservation_id, recorded.created_at);
                    }
                    InventoryEvent::ReservationReleased { reservation_id, .. }
                    | InventoryEvent::ReservationCommitted { reservation_id, .. } => {
                        stream.reserved_at.remove(reservation_id);
                    }
                    InventoryEvent::StockAdjusted { .. } => {}
                }
                stream.state.apply(&event);
                stream.version = recorded.version;
                stream.last_position = recorded.position;
                count += 1;
            }
            match page.last() {
                Some(last) if page.len() == PAGE as usize => after = last.position,
                _ => return Ok((streams, count)),
            }
        }
    }

    /// Reservations that an ended order lists as its own, made before
    /// `settled_before`, and still held now (checked on the stream again).
    async fn leaked_reservations(
        &self,
        streams: &BTreeMap<Uuid, Replayed>,
        settled_before: DateTime<Utc>,
    ) -> Result<Vec<Leak>, CommandError> {
        let mut candidates = Vec::new();
        for (stream_id, replayed) in streams {
            for (reservation, held) in &replayed.state.reservations {
                let Some(order_id) = held
                    .owner
                    .strip_prefix("order:")
                    .and_then(|id| Uuid::parse_str(id).ok())
                    .filter(|id| reservation_owner(*id) == held.owner)
                else {
                    continue;
                };
                let made = replayed.reserved_at.get(reservation).copied();
                if made.is_some_and(|at| at > settled_before) {
                    continue;
                }
                candidates.push((
                    *stream_id,
                    replayed.product_id,
                    *reservation,
                    order_id,
                    held.quantity,
                ));
            }
        }
        let mut leaks = Vec::new();
        // Not the process's cache: most of these orders are never loaded
        // again.
        let orders = AggregateRepository::<Order>::new(self.store.clone());
        for (stream_id, product_id, reservation, order_id, quantity) in candidates {
            let order = match orders.load(order_id).await {
                Ok(order) => order.state,
                // Not an order's stream: someone else's owner name.
                Err(StoreError::Codec(_) | StoreError::AggregateTypeMismatch { .. }) => continue,
                Err(other) => return Err(other.into()),
            };
            let own = order
                .reservations
                .iter()
                .any(|held| held.reservation_id == reservation);
            let status = match order.status {
                Some(status) if status.is_final() && own => status.as_str(),
                _ => continue,
            };
            let now_held = self.repository::<Inventory>().load(stream_id).await?;
            if !now_held.state.reservations.contains_key(&reservation) {
                continue;
            }
            leaks.push(Leak {
                product_id,
                reservation,
                detail: format!(
                    "{quantity} unit(s) reserved for order {order_id}, which is {status}"
                ),
            });
        }
        Ok(leaks)
    }
}

/// A reservation held for nobody.
struct Leak {
    product_id: Uuid,
    reservation: Uuid,
    detail: String,
}

/// How the read model's stock and reservations differ from `stream` (at
/// the read model's version); `None` when they agree.
fn read_model_difference(
    stream: &Inventory,
    view: &InventoryView,
    reservations: &[&ReservationView],
) -> Option<String> {
    let mut differences = Vec::new();
    if view.on_hand != stream.on_hand || view.reserved != stream.reserved {
        differences.push(format!(
            "the read model shows {} on hand and {} reserved, the stream {} and {}",
            view.on_hand, view.reserved, stream.on_hand, stream.reserved
        ));
    }
    let shown: BTreeMap<Uuid, u32> = reservations
        .iter()
        .map(|r| (r.reservation_id, r.quantity))
        .collect();
    let held: BTreeMap<Uuid, u32> = stream
        .reservations
        .iter()
        .map(|(id, r)| (*id, r.quantity))
        .collect();
    if shown != held {
        let missing = held.keys().filter(|id| !shown.contains_key(id)).count();
        let extra = shown.keys().filter(|id| !held.contains_key(id)).count();
        differences.push(format!(
            "reservations differ: {missing} held but not shown, {extra} shown but not held, {} with another quantity",
            held.iter()
                .filter(|(id, quantity)| shown.get(id).is_some_and(|q| q != *quantity))
                .count()
        ));
    }
    (!differences.is_empty()).then(|| differences.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::inventory::Reservation;

    fn view(on_hand: u32, reserved: u32) -> InventoryView {
        InventoryView {
            product_id: Uuid::nil(),
            on_hand,
            reserved,
            version: 3,
            updated_at: Utc::now(),
        }
    }

    fn shown(reservation_id: Uuid, quantity: u32) -> ReservationView {
        ReservationView {
            reservation_id,
            product_id: Uuid::nil(),
            owner: "order:x".into(),
            quantity,
            expires_at: None,
            created_at: Utc::now(),
        }
    }

    #[test]
    fn the_read_model_agrees_only_when_stock_and_reservations_match() {
        let held = Uuid::now_v7();
        let mut stream = Inventory {
            on_hand: 10,
            reserved: 2,
            reservations: BTreeMap::new(),
        };
        stream.reservations.insert(
            held,
            Reservation {
                owner: "order:x".into(),
                quantity: 2,
                expires_at: None,
            },
        );
        let same = shown(held, 2);
        assert_eq!(read_model_difference(&stream, &view(10, 2), &[&same]), None);
        assert!(read_model_difference(&stream, &view(15, 2), &[&same]).is_some());
        assert!(read_model_difference(&stream, &view(10, 2), &[]).is_some());
        let other_quantity = shown(held, 3);
        assert!(read_model_difference(&stream, &view(10, 2), &[&other_quantity]).is_some());
        let stranger = shown(Uuid::now_v7(), 2);
        assert!(read_model_difference(&stream, &view(10, 2), &[&same, &stranger]).is_some());
    }
}
