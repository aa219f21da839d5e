//! The runbook's commands for admins (docs/runbooks.md): checks, repairs
//! and maintenance an operator runs.

use std::sync::Arc;

use async_graphql::{Context, Enum, Object, SimpleObject};
use uuid::Uuid;

use super::access::{AdminOnly, command_context};
use super::commerce::{REBUILD_TIMEOUT, commerce, projector};
use super::error::UserError;
use super::{ApiError, ErrorCode};
use crate::commerce::{DriftKind, InventoryReconciliation};
use crate::metrics::Metrics;
use crate::projections::ProjectionName;
use crate::storage::maintenance::{INVENTORY_CHECK, PruneBefore, StoreMaintenance};

#[derive(Default)]
pub struct RunbookMutation;

#[Object]
impl RunbookMutation {
    /// Replays every inventory stream and compares it with the stock read
    /// model and with the orders its reservations are held for (a
    /// reservation is judged once `olderThanSeconds` old). With `repair`,
    /// an ended order's own reservations still held are released by
    /// `ReservationReleased` events, and a read model that disagrees is
    /// rebuilt from the events (into shadow tables, swapped in at once);
    /// rows are never edited. Sets `commerce_inventory_drift_products` to the
    /// products left with drift. For admins.
    #[graphql(guard = "AdminOnly")]
    async fn reconcile_inventory(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = false)] repair: bool,
        #[graphql(default = 60)] older_than_seconds: i32,
    ) -> Result<ReconcileInventoryPayload, ApiError> {
        if !(0..=86_400).contains(&older_than_seconds) {
            return Err(ApiError::invalid(
                "olderThanSeconds",
                "must be between 0 and 86400",
            ));
        }
        let context = command_context(ctx)?;
        let started = std::time::Instant::now();
        let grace = chrono::Duration::seconds(i64::from(older_than_seconds));
        let report = commerce(ctx)
            .reconcile_inventory(repair, grace, &context)
            .await
            .map_err(super::error::command_failure)?;
        let mut errors = Vec::new();
        let mut read_model_rebuilt = false;
        if repair && report.read_model_drifted() {
            // What is left of the request's wait after the replay above.
            let wait = REBUILD_TIMEOUT
                .saturating_sub(started.elapsed())
                .max(std::time::Duration::from_secs(1));
            read_model_rebuilt = projector(ctx)
                .rebuild(ProjectionName::Inventory, wait)
                .await?;
            if !read_model_rebuilt {
                errors.push(UserError::new(
                    ErrorCode::ReadModelLagging,
                    Some("repair"),
                    "the inventory read model is still being rebuilt, in the background"
                        .to_string(),
                ));
            }
        }
        let left = unrepaired_products(&report, read_model_rebuilt);
        if let Some(metrics) = ctx.data_opt::<Arc<Metrics>>() {
            metrics.set_inventory_drift(left);
        }
        // The other processes report the periodic check's last result:
        // this run is the latest.
        if let Some(maintenance) = ctx.data_opt::<StoreMaintenance>()
            && let Err(error) = maintenance.record_check(INVENTORY_CHECK, left as u64).await
        {
            tracing::warn!(%error, "could not record the inventory check");
        }
        Ok(ReconcileInventoryPayload::new(
            report,
            read_model_rebuilt,
            errors,
        ))
    }

    /// Deletes what the kernel keeps beside the event log once it is old
    /// enough: idempotency keys, the rows of finished sagas (their events
    /// stay) and cart activity, each older than its number of days (at
    /// least 1). A dry run, the default, counts what would go. Events are
    /// never deleted. For admins.
    #[graphql(guard = "AdminOnly")]
    async fn prune_store(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = true)] dry_run: bool,
        #[graphql(default = 30)] idempotency_keys_older_than_days: i32,
        #[graphql(default = 90)] finished_sagas_older_than_days: i32,
        #[graphql(default = 365)] cart_activity_older_than_days: i32,
    ) -> Result<PruneStorePayload, ApiError> {
        let before = prune_before(
            chrono::Utc::now(),
            [
                (
                    "idempotencyKeysOlderThanDays",
                    idempotency_keys_older_than_days,
                ),
                ("finishedSagasOlderThanDays", finished_sagas_older_than_days),
                ("cartActivityOlderThanDays", cart_activity_older_than_days),
            ],
        )
        .map_err(|(field, reason)| ApiError::invalid(field, reason))?;
        let report = ctx
            .data_unchecked::<StoreMaintenance>()
            .prune(&before, dry_run)
            .await?;
        Ok(PruneStorePayload {
            dry_run: report.dry_run,
            idempotency_keys: report.idempotency_keys,
            finished_sagas: report.finished_sagas,
            cart_activity: report.cart_activity,
        })
    }
}

/// The cut-off times of a prune `days` back from `now` (idempotency keys,
/// finished sagas, cart activity, in this order); a count of days outside
/// 1..=36500 is refused with its field's name.
pub fn prune_before(
    now: chrono::DateTime<chrono::Utc>,
    days: [(&'static str, i32); 3],
) -> Result<PruneBefore, (&'static str, &'static str)> {
    let mut before = [now; 3];
    for (slot, (field, count)) in before.iter_mut().zip(days) {
        if !(1..=36_500).contains(&count) {
            return Err((field, "must be a whole number of days from 1 to 36500"));
        }
        *slot = now - chrono::Duration::days(i64::from(count));
    }
    Ok(PruneBefore {
        idempotency_keys: before[0],
        finished_sagas: before[1],
        cart_activity: before[2],
    })
}

/// Rows `pruneStore` deleted, or would delete in a dry run.
#[derive(SimpleObject)]
pub struct PruneStorePayload {
    pub dry_run: bool,
    pub idempotency_keys: u64,
    pub finished_sagas: u64,
    pub cart_activity: u64,
}

/// Products left with drift once the repair (if any) is done.
pub fn unrepaired_products(report: &InventoryReconciliation, read_model_rebuilt: bool) -> usize {
    let remaining = InventoryReconciliation {
        drift: report
            .drift
            .iter()
            .filter(|drift| match drift.kind {
                DriftKind::ReadModel => !read_model_rebuilt,
                DriftKind::LeakedReservation => !drift
                    .reservation_id
                    .is_some_and(|id| report.released.contains(&id)),
            })
            .cloned()
            .collect(),
        ..InventoryReconciliation::default()
    };
    remaining.drifted_products()
}

/// What `reconcileInventory` found and did.
#[derive(SimpleObject)]
pub struct ReconcileInventoryPayload {
    /// Inventory streams replayed.
    pub products_checked: u64,
    pub events_replayed: u64,
    /// Every disagreement found (before the repair).
    pub drift: Vec<InventoryDrift>,
    /// Reservations the repair released.
    pub released_reservations: Vec<Uuid>,
    /// Whether the repair rebuilt the inventory read model.
    pub read_model_rebuilt: bool,
    pub errors: Vec<UserError>,
}

impl ReconcileInventoryPayload {
    fn new(
        report: InventoryReconciliation,
        read_model_rebuilt: bool,
        errors: Vec<UserError>,
    ) -> Self {
        ReconcileInventoryPayload {
            products_checked: report.products_checked,
            events_replayed: report.events_replayed,
            drift: report
                .drift
                .into_iter()
                .map(|drift| InventoryDrift {
                    product_id: drift.product_id,
                    kind: match drift.kind {
                        DriftKind::ReadModel => InventoryDriftKind::ReadModel,
                        DriftKind::LeakedReservation => InventoryDriftKind::LeakedReservation,
                    },
                    reservation_id: drift.reservation_id,
                    detail: drift.detail,
                })
                .collect(),
            released_reservations: report.released,
            read_model_rebuilt,
            errors,
        }
    }
}

/// One disagreement between an inventory stream and what depends on it.
#[derive(SimpleObject)]
pub struct InventoryDrift {
    pub product_id: Uuid,
    pub kind: InventoryDriftKind,
    /// The reservation held for nobody, for `LEAKED_RESERVATION`.
    pub reservation_id: Option<Uuid>,
    /// Both sides, in words.
    pub detail: String,
}

#[derive(Enum, Copy, Clone, PartialEq, Eq)]
pub enum InventoryDriftKind {
    /// The read model's stock or reservations differ from the stream.
    ReadModel,
    /// An ended order's own reservation, still held.
    LeakedReservation,
}
