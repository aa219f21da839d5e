//! Running sagas: the store of saga instances ([`SagaStore`]) and the
//! runner that drives them ([`runner::SagaRunner`]).
//!
//! A saga's record is its event stream ([`crate::domain::saga`]). The store
//! keeps one row per saga beside it (`saga_instances`), written in the same
//! transaction as the saga's events, which serves as:
//! - the work queue: `next_run_at` says when a runner should look at it;
//! - the lease: a runner claims due rows (`FOR UPDATE SKIP LOCKED` on
//!   Postgres), holds them until `lease_expires_at` (renewed by a
//!   heartbeat), and every claim increments `fencing_token`. A runner's
//!   writes carry the token it claimed with; once another runner has claimed
//!   the saga the token no longer matches and the write is refused whole
//!   ([`Committed::LeaseLost`]), so a paused former owner cannot write;
//! - the index behind the admin queries (by order, by status).

pub mod runner;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::saga::SagaStatus;
use crate::event_store::{AppendOutcome, AppendRequest, StoreError};

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
}

/// The row's new state after a write to the saga's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceUpdate {
    pub saga_id: Uuid,
    pub status: SagaStatus,
    pub current_step: Option<String>,
    pub version: u32,
    pub next_run_at: Option<DateTime<Utc>>,
    pub now: DateTime<Utc>,
}

/// The outcome of a fenced write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Committed {
    Written(AppendOutcome),
    /// Another runner claimed the saga since: nothing was written.
    LeaseLost,
}

/// Which sagas an admin lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SagaFilter {
    pub correlation_id: Option<Uuid>,
    pub status: Option<SagaStatus>,
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
    /// expired) for `owner` until `lease_until`.
    async fn claim(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Claim>, StoreError>;

    /// Extends every lease `owner` holds until `lease_until`; returns how many.
    async fn heartbeat(&self, owner: &str, lease_until: DateTime<Utc>) -> Result<u64, StoreError>;

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
    /// due at once instead.
    async fn release(
        &self,
        claim: Claim,
        seen_version: u32,
        next_run_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Gives back every saga `owner` holds, due at once (graceful shutdown).
    async fn release_all(&self, owner: &str) -> Result<u64, StoreError>;

    async fn get(&self, saga_id: Uuid) -> Result<Option<SagaInstance>, StoreError>;

    /// Sagas matching `filter`, oldest first, after `after`.
    async fn list(
        &self,
        filter: &SagaFilter,
        after: Option<SagaCursor>,
        limit: u32,
    ) -> Result<Vec<SagaInstance>, StoreError>;

    /// How many sagas are in each status.
    async fn count_by_status(&self) -> Result<Vec<(SagaStatus, u64)>, StoreError>;

    /// Orders still PENDING in the read model, placed before `placed_before`,
    /// with no saga: a process stopped between placing an order and
    /// starting its saga.
    async fn orders_without_saga(
        &self,
        placed_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Uuid>, StoreError>;
}
