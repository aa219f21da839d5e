//! Running sagas: the store of saga instances ([`SagaStore`]) and the
//! runner that drives them ([`runner::SagaRunner`]).
//!
//! A saga's record is its event stream ([`crate::domain::saga`]). The store
//! keeps one row per saga beside it (`saga_instances`), written in the same
//! transaction as the saga's events, which serves as:
//! - the work queue: `next_run_at` says when a runner should look at it;
//! - the lease: a runner claims due rows (`FOR UPDATE SKIP LOCKED` on
//!   Postgres), holds them until `lease_expires_at` (renewed by a
//!   heartbeat for the sagas it is driving), and every claim increments
//!   `fencing_token`. A runner's writes carry the token it claimed with;
//!   once another runner has claimed the saga the token no longer matches
//!   and the write is refused whole ([`Committed::LeaseLost`]), so a paused
//!   former owner cannot write. Before each plugin call the runner extends
//!   its lease over the call's deadline (with the write that records the
//!   call's start, [`LeaseChange::Hold`], or [`SagaStore::hold`]), or does
//!   not call at all; the write that ends a drive gives the saga back
//!   ([`LeaseChange::Release`]);
//! - the index behind the admin queries (by order, by status).
//!
//! Lease and due times are the database's clock: the kernel processes'
//! clocks may disagree, the database's is one.

pub mod hooks;
pub mod runner;
mod stock_gate;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::saga::SagaStatus;
use crate::event_store::{AppendOutcome, AppendRequest, StoreError};
use crate::telemetry::TraceParent;

/// A saga's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaInstance {
    pub saga_id: Uuid,
    pub saga_type: String,
    /// The order the saga fulfils.
    pub correlation_id: Uuid,
    pub status: SagaStatus,
    pub current_step: Option<String>,
    /// The saga stream's version the row reflects.
    pub version: u32,
    pub next_run_at: Option<DateTime<Utc>>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub fencing_token: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A saga a runner holds: its writes must carry `fencing_token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub saga_id: Uuid,
    pub fencing_token: i64,
    /// How many times in a row the saga was given back without progress
    /// ([`SagaStore::defer`]) before this claim.
    pub deferrals: u32,
    /// The trace the saga's drives continue: that of the request that
    /// started it (see [`crate::telemetry`]).
    pub trace: Option<TraceParent>,
}

/// The row's new state after a write to the saga's stream. `next_run_at`
/// is written relative to `now` (the writer's clock) onto the database's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceUpdate {
    pub saga_id: Uuid,
    pub status: SagaStatus,
    pub current_step: Option<String>,
    pub version: u32,
    pub next_run_at: Option<DateTime<Utc>>,
    pub now: DateTime<Utc>,
    /// What a fenced write does to its claim's lease as well (a write
    /// without a fence leaves the lease alone whatever this says).
    pub lease: LeaseChange,
}

/// What a fenced write does to the lease of the claim it carries, in the
/// same statement, so that neither costs a write of its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LeaseChange {
    #[default]
    Keep,
    /// Makes sure the lease holds for at least this much longer, as
    /// [`SagaStore::hold`] does before a plugin call; the write is refused
    /// ([`Committed::LeaseLost`]) when the lease already ran out.
    Hold(Duration),
    /// Gives the saga back: the write ends the drive (the saga is final or
    /// parked, so it is due again only if someone asks).
    Release,
}

/// The outcome of a fenced write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Committed {
    Written(AppendOutcome),
    /// Another runner claimed the saga since, or (for a write that holds
    /// the lease) the lease ran out: nothing was written.
    LeaseLost,
}

/// Which sagas an admin lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SagaFilter {
    pub correlation_id: Option<Uuid>,
    pub status: Option<SagaStatus>,
    /// Only sagas overdue by at least this long: due to run (neither
    /// finished nor parked, no retry waiting) since at least this long ago by
    /// the database's clock. A saga normally runs within milliseconds of
    /// being due, so one overdue by minutes is stuck: no runner is up, or
    /// one holds its lease while a step waits on a provider.
    pub overdue_by: Option<std::time::Duration>,
}

/// Cursor of a saga listing: sagas are listed oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SagaCursor {
    pub created_at: DateTime<Utc>,
    pub saga_id: Uuid,
}

/// Saga instances on a storage backend.
#[async_trait]
pub trait SagaStore: Send + Sync {
    /// Creates the row (due now) and appends the saga's first events in one
    /// transaction. `None` when the saga exists already (nothing written).
    async fn start(
        &self,
        instance: InstanceUpdate,
        saga_type: &str,
        correlation_id: Uuid,
        request: AppendRequest,
    ) -> Result<Option<AppendOutcome>, StoreError>;

    /// Claims up to `limit` sagas that are due and not leased (or whose lease
    /// expired) for `owner`, for `lease` from now by the database's clock,
    /// passing over the sagas in `skip` (up to 200 of them: ones `owner`
    /// just gave back because it cannot run their next step).
    async fn claim(
        &self,
        owner: &str,
        lease: Duration,
        limit: u32,
        skip: &[Uuid],
    ) -> Result<Vec<Claim>, StoreError>;

    /// Extends `owner`'s leases of `sagas` to at least `lease` from now;
    /// returns how many it extended. Sagas `owner` no longer holds are left
    /// alone, and a lease already longer (see [`hold`](Self::hold)) is kept.
    /// On Postgres it never waits for a saga's row: one a write holds at
    /// that moment is tried again a few times within milliseconds, and
    /// otherwise left to the next heartbeat. A row held across two
    /// heartbeats in a row may see its lease lapse; the fence keeps that
    /// safe (the old owner's next write is refused, and the saga is taken
    /// up again). On SQLite it waits for the database's write lock.
    async fn heartbeat(
        &self,
        owner: &str,
        sagas: &[Uuid],
        lease: Duration,
    ) -> Result<u64, StoreError>;

    /// Makes sure the claim holds for at least `at_least` more: extends its
    /// lease that far if needed. `false` when the claim is gone (another
    /// runner took the saga) or its lease already ran out: the caller must
    /// not act for the saga any more.
    async fn hold(&self, claim: Claim, at_least: Duration) -> Result<bool, StoreError>;

    /// Appends to the saga's stream (and any other streams in `request`) and
    /// updates its row, atomically. With `fence`, only while the claim still
    /// holds; without (a request from the API), whatever the lease.
    async fn commit(
        &self,
        fence: Option<Claim>,
        update: InstanceUpdate,
        request: AppendRequest,
    ) -> Result<Committed, StoreError>;

    /// Gives a claimed saga back, due at `next_run_at` (`None`: never). If
    /// the row moved past `seen_version` meanwhile (a request arrived), it is
    /// due at once instead; without `seen_version`, at `next_run_at` anyway.
    async fn release(
        &self,
        claim: Claim,
        seen_version: Option<u32>,
        next_run_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Gives a claimed saga back without progress (its step could not run
    /// on this process), due after `delay`, and counts the deferral.
    async fn defer(&self, claim: Claim, delay: Duration) -> Result<(), StoreError>;

    /// Gives back every saga `owner` holds but those in `keep` (up to 200)
    /// at graceful shutdown: their due times stay as they are (a saga with
    /// work left is due), and the kept ones' leases lapse.
    async fn release_all(&self, owner: &str, keep: &[Uuid]) -> Result<u64, StoreError>;

    async fn get(&self, saga_id: Uuid) -> Result<Option<SagaInstance>, StoreError>;

    /// Sagas matching `filter`, oldest first, after `after`.
    async fn list(
        &self,
        filter: &SagaFilter,
        after: Option<SagaCursor>,
        limit: u32,
    ) -> Result<Vec<SagaInstance>, StoreError>;

    /// How many sagas match `filter` (what [`Self::list`] would page through).
    async fn count(&self, filter: &SagaFilter) -> Result<u64, StoreError>;

    /// How many sagas are in each status.
    async fn count_by_status(&self) -> Result<Vec<(SagaStatus, u64)>, StoreError>;

    /// How many sagas are in each status that is not final. The stores
    /// answer from the status index's live range, without counting the
    /// table's history, so `/metrics` can ask often.
    async fn count_live_by_status(&self) -> Result<Vec<(SagaStatus, u64)>, StoreError> {
        let mut counts = self.count_by_status().await?;
        counts.retain(|(status, _)| !status.is_final());
        Ok(counts)
    }

    /// Orders still PENDING in the read model, placed before `placed_before`,
    /// with no saga: a process stopped between placing an order and
    /// starting its saga.
    async fn orders_without_saga(
        &self,
        placed_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Uuid>, StoreError>;
}
