//! Command handlers: the application layer between the API and the domain.
//!
//! Each handler loads the aggregates it needs by replaying their streams,
//! lets the pure domain decide the events, and appends them at the versions
//! it loaded. A stale version means another command got there first:
//! - with an `expected_version` from the caller (compare-and-swap), the
//!   conflict is returned as is;
//! - otherwise the handler reloads and decides again, with bounded
//!   exponential backoff and full jitter ([`RetryPolicy`]), counting each
//!   conflict ([`Metrics`]).
//!
//! Handlers return the log position of what they wrote, so the API can wait
//! for the read models to reach it (read-your-writes).

pub mod bundled_plugins;
mod carts;
mod catalog;
mod demo_catalog;
mod inventory;
mod orders;
mod plugins;
mod reconciliation;
mod sagas;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use uuid::Uuid;

use crate::carts::CartStoreError;
use crate::domain::{Aggregate, DomainError};
use crate::event_store::cache::{self, AggregateCache};
use crate::event_store::repository::{AggregateRepository, Loaded, encode};
use crate::event_store::{EventMetadata, EventStore, Position, StoreError, StreamAppend};
use crate::projections::ViewStore;

pub use carts::{CartItem, Carts, Checkout, CheckoutInput, NewCart, PricedCart};
pub use catalog::{CreatedProduct, NewProduct, UpdatedProduct};
pub use demo_catalog::{DEMO_STOCK, DemoProduct};
pub use inventory::{InventoryChange, ReservationMade};
pub use orders::{OrderChange, OrderTransition, PlaceOrderInput};
pub use plugins::{FOLLOW_INTERVAL, PluginSummary, Plugins};
pub use reconciliation::{
    Drift, DriftKind, GRACE as RECONCILIATION_GRACE, InventoryReconciliation,
};
pub use sagas::Sagas;
pub(crate) use sagas::ends_drive;

/// Why a command did not happen. Nothing was written in any case.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The domain refused the command.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// The aggregate is not at the version the caller expected (or kept
    /// moving through every retry).
    #[error("{aggregate_id} is at version {actual}, expected {expected}")]
    VersionConflict {
        aggregate_id: Uuid,
        expected: u32,
        actual: u32,
    },
    /// The store failed; the command may be retried.
    #[error(transparent)]
    Store(StoreError),
    /// The cart store failed; the command may be retried.
    #[error(transparent)]
    CartStore(#[from] CartStoreError),
    /// A plugin version was refused (or the plugin directory failed).
    #[error(transparent)]
    Plugin(#[from] commerce_plugin_host::LoadError),
}

impl From<StoreError> for CommandError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::VersionConflict {
                aggregate_id,
                expected,
                actual,
            } => CommandError::VersionConflict {
                aggregate_id,
                expected,
                actual,
            },
            StoreError::InvalidInput { field, reason } => {
                CommandError::Domain(DomainError::Invalid { field, reason })
            }
            other => CommandError::Store(other),
        }
    }
}

/// Counters the kernel exports (see `/metrics`).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Version conflicts met by inventory commands (each retry counts one).
    pub inventory_conflicts: AtomicU64,
    /// Version conflicts met by cart commands (each retry counts one).
    pub cart_conflicts: AtomicU64,
    /// Version conflicts met by other commands.
    pub other_conflicts: AtomicU64,
}

/// Retries of commands that met a version conflict.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Upper bound of the first back-off; doubles per attempt.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// Sized for a hot product: a hundred buyers racing for one stream still
    /// all get a definite answer (a reservation or "insufficient stock").
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 40,
            initial_backoff: Duration::from_millis(2),
            max_backoff: Duration::from_millis(100),
        }
    }
}

impl RetryPolicy {
    /// Full jitter: a uniformly random wait up to the attempt's ceiling.
    fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_backoff);
        let random = Uuid::new_v4().as_u128() as u64;
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(random % nanos.max(1))
    }
}

/// Which counter a command's conflicts go to.
#[derive(Debug, Clone, Copy)]
enum ConflictCounter {
    Inventory,
    Cart,
    Other,
}

/// The command handlers, sharing one store.
#[derive(Clone)]
pub struct Commerce {
    store: Arc<dyn EventStore>,
    views: Arc<dyn ViewStore>,
    metrics: Arc<Metrics>,
    retry: RetryPolicy,
    /// Aggregates this process loaded, so a load reads only what is new.
    cache: Arc<AggregateCache>,
}

impl Commerce {
    pub fn new(store: Arc<dyn EventStore>, views: Arc<dyn ViewStore>) -> Self {
        Commerce {
            store,
            views,
            metrics: Arc::new(Metrics::default()),
            retry: RetryPolicy::default(),
            cache: Arc::new(AggregateCache::new(cache::DEFAULT_CAPACITY)),
        }
    }

    pub fn with_retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// Loads start from what this process loaded before (see
    /// [`AggregateCache`]); appends are checked against the stream as always.
    pub(crate) fn repository<A: Aggregate>(&self) -> AggregateRepository<A> {
        AggregateRepository::cached(Arc::clone(&self.store), Arc::clone(&self.cache))
    }

    /// Loads an aggregate; with `expected` set, refuses at once if it moved.
    async fn load_expecting<A: Aggregate>(
        &self,
        id: Uuid,
        expected: Option<u32>,
    ) -> Result<Loaded<A>, CommandError> {
        let loaded = self.repository::<A>().load(id).await?;
        match expected {
            Some(expected) if expected != loaded.version => Err(CommandError::VersionConflict {
                aggregate_id: id,
                expected,
                actual: loaded.version,
            }),
            _ => Ok(loaded),
        }
    }

    /// Runs `attempt` until it does not meet a version conflict. With a
    /// caller's expected version there is nothing to retry: the caller asked
    /// for that exact version.
    async fn retrying<T, F, Fut>(
        &self,
        counter: ConflictCounter,
        caller_expects_version: bool,
        mut attempt: F,
    ) -> Result<T, CommandError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, CommandError>>,
    {
        let mut tries = 0;
        loop {
            let result = attempt().await;
            let Err(CommandError::VersionConflict { .. }) = &result else {
                return result;
            };
            let count = match counter {
                ConflictCounter::Inventory => &self.metrics.inventory_conflicts,
                ConflictCounter::Cart => &self.metrics.cart_conflicts,
                ConflictCounter::Other => &self.metrics.other_conflicts,
            };
            count.fetch_add(1, Ordering::Relaxed);
            tries += 1;
            if caller_expects_version || tries >= self.retry.max_attempts {
                return result;
            }
            tokio::time::sleep(self.retry.backoff(tries)).await;
        }
    }
}

/// One stream's part of an atomic multi-stream append.
pub(crate) fn stream_append<A: Aggregate>(
    id: Uuid,
    expected_version: u32,
    events: &[A::Event],
) -> Result<StreamAppend, StoreError> {
    Ok(StreamAppend {
        aggregate_id: id,
        aggregate_type: A::AGGREGATE_TYPE.to_string(),
        expected_version,
        events: events.iter().map(encode).collect::<Result<_, _>>()?,
    })
}

/// Who is acting, recorded with every event a command writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandContext {
    pub actor: Option<String>,
    pub correlation_id: Option<Uuid>,
}

impl CommandContext {
    /// The metadata of this command's events. The trace context is the
    /// current span's: the request's, or the saga step's in the runner.
    pub(crate) fn metadata(&self) -> EventMetadata {
        EventMetadata {
            correlation_id: self.correlation_id,
            causation_id: None,
            actor: self.actor.clone(),
            trace_parent: crate::telemetry::current(),
        }
    }
}

/// What a command wrote: the aggregate's new state and version, and where in
/// the log its last event is.
#[derive(Debug, Clone, PartialEq)]
pub struct Written<A> {
    pub id: Uuid,
    pub state: A,
    pub version: u32,
    /// `None` when the command changed nothing (an idempotent repeat).
    pub position: Option<Position>,
}

impl<A: Aggregate> Written<A> {
    /// Folds `events` into a loaded state, as the store now has it.
    fn after(id: Uuid, mut loaded: Loaded<A>, events: &[A::Event], position: Position) -> Self {
        for event in events {
            loaded.state.apply(event);
        }
        Written {
            id,
            state: loaded.state,
            version: loaded.version + events.len() as u32,
            position: Some(position),
        }
    }

    fn unchanged(id: Uuid, loaded: Loaded<A>) -> Self {
        Written {
            id,
            state: loaded.state,
            version: loaded.version,
            position: None,
        }
    }
}
