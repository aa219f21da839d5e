//! StoreMaintenance: the runbook's pruning of what the kernel keeps beside
//! the event log and no longer needs. Events are never deleted here.
//!
//! - Idempotency keys: a repeated append within the retention replays the
//!   first outcome; past it the key is forgotten, so keep it longer than any
//!   client or provider retries.
//! - Rows of finished sagas (`COMPLETED`, `COMPENSATED`) in
//!   `saga_instances`: the work queue and the index behind `sagas(...)`. A
//!   pruned saga leaves those listings; its events stay, so `Order.saga`
//!   and `saga(id)` still show it. Sagas that are not final are never
//!   touched.
//! - Cart activity (`cart_activity`): the record behind cart KPIs and
//!   abandonment reports; pruned rows leave those figures.
//!
//! Each kind is deleted in batches of [`BATCH`] rows, one short transaction
//! each, so a large backlog never holds a lock for long. A dry run counts
//! what would go and deletes nothing.
//!
//! It also schedules the checks every process runs on a timer (the
//! inventory report): [`StoreMaintenance::claim_check`] lets one process
//! per interval run one, and the others report what it found.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::Database;
use crate::event_store::StoreError;

/// Rows one delete statement removes at most.
pub const BATCH: i64 = 5_000;

/// What is old enough to go, per kind: rows written before each time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneBefore {
    pub idempotency_keys: DateTime<Utc>,
    pub finished_sagas: DateTime<Utc>,
    pub cart_activity: DateTime<Utc>,
}

/// Rows deleted (or, in a dry run, that would be), per kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub idempotency_keys: u64,
    pub finished_sagas: u64,
    pub cart_activity: u64,
    pub dry_run: bool,
}

/// One kind of row and how its age is stored.
struct Kind {
    table: &'static str,
    key: &'static str,
    /// The condition besides age (SQL; `$1`, if used, is the cut-off).
    condition: &'static str,
    age: &'static str,
    /// Postgres stores this age as TIMESTAMPTZ, not as microseconds.
    timestamptz_on_postgres: bool,
}

const IDEMPOTENCY_KEYS: Kind = Kind {
    table: "idempotency_keys",
    key: "key",
    condition: "TRUE",
    age: "created_at",
    timestamptz_on_postgres: true,
};

const FINISHED_SAGAS: Kind = Kind {
    table: "saga_instances",
    key: "saga_id",
    // Created before the cut-off too (a row is updated after it is
    // created, so this excludes nothing): the finished sagas' index is by
    // creation, as their last update changes at every step (migration
    // postgres/0011).
    condition: "status IN ('COMPLETED', 'COMPENSATED') AND created_at < $1",
    age: "updated_at",
    timestamptz_on_postgres: false,
};

const CART_ACTIVITY: Kind = Kind {
    table: "cart_activity",
    key: "cart_id",
    condition: "TRUE",
    age: "last_activity_at",
    timestamptz_on_postgres: false,
};

/// The inventory reconciliation's periodic report ([`StoreMaintenance::claim_check`]).
pub const INVENTORY_CHECK: &str = "inventory";

/// Claims a check unless one started less than `$2` microseconds ago, by
/// the database's clock (`{NOW}`); returns the row when claimed.
const CLAIM_CHECK: &str = "INSERT INTO runbook_checks (name, started_at) VALUES ($1, {NOW}) \
     ON CONFLICT (name) DO UPDATE SET started_at = excluded.started_at \
     WHERE runbook_checks.started_at <= excluded.started_at - $2 RETURNING name";

/// Records what a check found (`$2`), keeping when it started.
const RECORD_CHECK: &str = "INSERT INTO runbook_checks (name, started_at, found) \
     VALUES ($1, {NOW}, $2) ON CONFLICT (name) DO UPDATE SET found = excluded.found";

/// Prunes one database.
#[derive(Clone)]
pub struct StoreMaintenance {
    database: Database,
}

impl StoreMaintenance {
    pub fn new(database: Database) -> Self {
        StoreMaintenance { database }
    }

    /// Deletes (or with `dry_run` counts) the rows older than `before`.
    pub async fn prune(
        &self,
        before: &PruneBefore,
        dry_run: bool,
    ) -> Result<PruneReport, StoreError> {
        Ok(PruneReport {
            idempotency_keys: self
                .prune_kind(&IDEMPOTENCY_KEYS, before.idempotency_keys, dry_run)
                .await?,
            finished_sagas: self
                .prune_kind(&FINISHED_SAGAS, before.finished_sagas, dry_run)
                .await?,
            cart_activity: self
                .prune_kind(&CART_ACTIVITY, before.cart_activity, dry_run)
                .await?,
            dry_run,
        })
    }

    /// Claims the periodic check `name` for this process unless any
    /// process started it less than `interval` ago (by the database's
    /// clock): true for the one process that should run it now.
    pub async fn claim_check(&self, name: &str, interval: Duration) -> Result<bool, StoreError> {
        let interval = i64::try_from(interval.as_micros()).unwrap_or(i64::MAX);
        let claimed: Option<(String,)> = match &self.database {
            Database::Postgres(db) => {
                sqlx::query_as(&CLAIM_CHECK.replace("{NOW}", super::sagas::POSTGRES.now()))
                    .bind(name)
                    .bind(interval)
                    .fetch_optional(db.connections().pool())
                    .await?
            }
            Database::Sqlite(db) => {
                sqlx::query_as(&CLAIM_CHECK.replace("{NOW}", super::sagas::SQLITE.now()))
                    .bind(name)
                    .bind(interval)
                    .fetch_optional(db.writer())
                    .await?
            }
        };
        Ok(claimed.is_some())
    }

    /// Records what the check `name` found (a count), for every process to
    /// report. A check run outside the schedule (an admin's) counts as run
    /// now when none ever was.
    pub async fn record_check(&self, name: &str, found: u64) -> Result<(), StoreError> {
        let found = i64::try_from(found).unwrap_or(i64::MAX);
        match &self.database {
            Database::Postgres(db) => {
                sqlx::query(&RECORD_CHECK.replace("{NOW}", super::sagas::POSTGRES.now()))
                    .bind(name)
                    .bind(found)
                    .execute(db.connections().pool())
                    .await?;
            }
            Database::Sqlite(db) => {
                sqlx::query(&RECORD_CHECK.replace("{NOW}", super::sagas::SQLITE.now()))
                    .bind(name)
                    .bind(found)
                    .execute(db.writer())
                    .await?;
            }
        }
        Ok(())
    }

    /// What the last finished run of the check `name` found; `None` before
    /// any has.
    pub async fn last_check(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let query = "SELECT found FROM runbook_checks WHERE name = $1";
        let found: Option<(Option<i64>,)> = match &self.database {
            Database::Postgres(db) => {
                sqlx::query_as(query)
                    .bind(name)
                    .fetch_optional(db.connections().pool())
                    .await?
            }
            Database::Sqlite(db) => {
                sqlx::query_as(query)
                    .bind(name)
                    .fetch_optional(db.reader())
                    .await?
            }
        };
        Ok(found
            .and_then(|(found,)| found)
            .map(|found| u64::try_from(found).unwrap_or(0)))
    }

    async fn prune_kind(
        &self,
        kind: &Kind,
        before: DateTime<Utc>,
        dry_run: bool,
    ) -> Result<u64, StoreError> {
        let Kind {
            table,
            key,
            condition,
            age,
            ..
        } = kind;
        let old = format!("{condition} AND {age} < $1");
        let count = format!("SELECT COUNT(*) FROM {table} WHERE {old}");
        let delete = format!(
            // The age again outside: a row written to since the subquery
            // chose it (a cart's activity refreshed) stays.
            "DELETE FROM {table} WHERE {old} AND {key} IN \
             (SELECT {key} FROM {table} WHERE {old} LIMIT $2)"
        );
        let micros = before.timestamp_micros();
        let mut total = 0u64;
        match &self.database {
            Database::Postgres(db) => {
                let pool = db.connections().pool();
                // Binds as the column stores it.
                macro_rules! bound {
                    ($query:expr) => {
                        if kind.timestamptz_on_postgres {
                            $query.bind(before)
                        } else {
                            $query.bind(micros)
                        }
                    };
                }
                if dry_run {
                    let (rows,): (i64,) = bound!(sqlx::query_as(&count)).fetch_one(pool).await?;
                    return Ok(u64::try_from(rows).unwrap_or(0));
                }
                loop {
                    let done = bound!(sqlx::query(&delete))
                        .bind(BATCH)
                        .execute(pool)
                        .await?
                        .rows_affected();
                    total += done;
                    if done < BATCH as u64 {
                        return Ok(total);
                    }
                }
            }
            Database::Sqlite(db) => {
                if dry_run {
                    let (rows,): (i64,) = sqlx::query_as(&count)
                        .bind(micros)
                        .fetch_one(db.reader())
                        .await?;
                    return Ok(u64::try_from(rows).unwrap_or(0));
                }
                loop {
                    let done = sqlx::query(&delete)
                        .bind(micros)
                        .bind(BATCH)
                        .execute(db.writer())
                        .await?
                        .rows_affected();
                    total += done;
                    if done < BATCH as u64 {
                        return Ok(total);
                    }
                }
            }
        }
    }
}
