//! Cart stores: where carts live between requests, and the durable record of
//! their lifecycle.
//!
//! A store keeps whole carts ([`crate::domain::cart::Cart`]) and writes them
//! with compare-and-swap on the cart's version, atomically with a time to live
//! and with an entry in the store's activity queue. The cart rules live once,
//! in the domain; a store only loads, swaps and queues:
//! - [`redis::RedisCartStore`] (production, `COMMERCE_REDIS_URL`): one hash for
//!   the cart's metadata and one for its lines, written by one Lua script that
//!   also appends the activity entry to a Redis stream. Shared by any number
//!   of kernel processes.
//! - [`embedded::EmbeddedCartStore`] (the default): the same behaviour in
//!   this process's memory, for a single process.
//!
//! The [`ActivityRecorder`] moves queued activity into the SQL database in
//! batches, off the request path, where [`CartActivityLog`] answers the
//! abandoned-cart report.

pub mod embedded;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::cart::{Cart, CartOwner, CartStatus};
use crate::event_store::StoreError;

/// A cart store failed (unreachable, or holding something unreadable). The
/// command may be retried; nothing was half-written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CartStoreError {
    #[error("cart store unavailable: {0}")]
    Unavailable(String),
    #[error("cart store holds an unreadable cart: {0}")]
    Corrupt(String),
}

/// The result of a compare-and-swap write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swap {
    Written,
    /// The stored cart is at `actual` (0: it does not exist, or expired).
    Conflict {
        actual: u32,
    },
}

/// One entry of the activity queue, with the store's token to acknowledge it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedActivity {
    pub token: String,
    pub activity: CartActivity,
}

/// Where carts live.
#[async_trait]
pub trait CartStore: Send + Sync {
    /// `"redis"` or `"embedded"`.
    fn backend(&self) -> &'static str;

    /// The cart, or `None` when it never existed or has expired.
    async fn load(&self, id: Uuid, now: DateTime<Utc>) -> Result<Option<Cart>, CartStoreError>;

    /// Stores `cart` if the stored one is at `expected_version` (0: none may
    /// exist), resets its time to live to `cart.expires_at`, and queues its
    /// activity, all in one atomic step.
    async fn swap(
        &self,
        cart: &Cart,
        expected_version: u32,
        now: DateTime<Utc>,
    ) -> Result<Swap, CartStoreError>;

    /// Up to `max` queued activity entries not yet acknowledged. Entries
    /// handed out before but never acknowledged (their reader died) come
    /// back after a while, so each is recorded at least once.
    async fn queued_activity(&self, max: usize) -> Result<Vec<QueuedActivity>, CartStoreError>;

    /// Drops entries that are recorded.
    async fn acknowledge_activity(&self, tokens: &[String]) -> Result<(), CartStoreError>;

    /// Round trip to the store, for health checks.
    async fn ping(&self) -> Result<(), CartStoreError>;
}

/// Which cart store to run, from configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CartBackendConfig {
    /// `redis://` or `rediss://` URL, and a prefix for every key the store writes.
    Redis {
        url: String,
        key_prefix: String,
    },
    Embedded,
}

/// Opens the configured store.
pub async fn open(config: &CartBackendConfig) -> Result<Arc<dyn CartStore>, CartStoreError> {
    match config {
        CartBackendConfig::Redis { url, key_prefix } => Ok(Arc::new(
            redis::RedisCartStore::connect(url, key_prefix).await?,
        )),
        CartBackendConfig::Embedded => Ok(Arc::new(embedded::EmbeddedCartStore::new())),
    }
}

/// A cart's state as the lifecycle record keeps it; queued with every write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CartActivity {
    pub cart_id: Uuid,
    pub owner: CartOwner,
    pub status: CartStatus,
    pub version: u32,
    pub line_count: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub order_id: Option<Uuid>,
}

impl CartActivity {
    pub fn of(cart: &Cart) -> Self {
        CartActivity {
            cart_id: cart.id,
            owner: cart.owner.clone(),
            status: cart.status,
            version: cart.version,
            line_count: u32::try_from(cart.lines.len()).unwrap_or(u32::MAX),
            created_at: cart.created_at,
            updated_at: cart.updated_at,
            expires_at: cart.expires_at,
            order_id: cart.order_id,
        }
    }
}

/// A cart untouched for a while and never checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbandonedCart {
    pub cart_id: Uuid,
    pub owner: CartOwner,
    pub line_count: u32,
    pub created_at: DateTime<Utc>,
    pub last_activity_at: DateTime<Utc>,
    /// When the cart expired or will expire.
    pub expires_at: DateTime<Utc>,
}

/// The abandoned carts as of `now`, and the counts behind the rate.
#[derive(Debug, Clone, PartialEq)]
pub struct AbandonmentReport {
    /// Oldest activity first, after the cursor asked for, at most the limit asked for.
    pub carts: Vec<AbandonedCart>,
    /// Carts untouched since the cutoff and not checked out (expired ones included).
    pub abandoned: u64,
    pub checked_out: u64,
    /// Touched since the cutoff and not checked out: undecided, so not in the rate.
    pub active: u64,
    /// The abandoned carts by how long they have been idle: the first
    /// counts those idle less than [`IDLE_AGE_BOUNDS`]`[0]`, each next one
    /// from the previous bound, the last those idle longer than every bound.
    pub by_idle_age: [u64; 4],
    /// Abandoned carts past their expiry: the cart store has let them go.
    pub expired: u64,
}

/// Where the abandonment report's idle ages split: a day, a week, 30 days.
pub const IDLE_AGE_BOUNDS: [Duration; 3] = [
    Duration::from_secs(86_400),
    Duration::from_secs(7 * 86_400),
    Duration::from_secs(30 * 86_400),
];

impl AbandonmentReport {
    /// Abandoned carts over decided carts (abandoned or checked out); `None`
    /// when there are none.
    pub fn abandonment_rate(&self) -> Option<f64> {
        let decided = self.abandoned + self.checked_out;
        (decided > 0).then(|| self.abandoned as f64 / decided as f64)
    }
}

/// Where abandoned carts are listed after: the last one seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbandonedCursor {
    pub last_activity_at: DateTime<Utc>,
    pub cart_id: Uuid,
}

/// The durable lifecycle record of every cart, in the SQL database.
#[async_trait]
pub trait CartActivityLog: Send + Sync {
    /// Merges entries into the record. Idempotent, and order does not matter:
    /// the newest version of a cart wins and a checkout is never forgotten.
    async fn record(&self, entries: &[CartActivity]) -> Result<(), StoreError>;

    /// Carts idle since `cutoff` and not checked out, plus the counts (idle
    /// ages and expiry as of `now`).
    async fn abandoned(
        &self,
        now: DateTime<Utc>,
        cutoff: DateTime<Utc>,
        after: Option<AbandonedCursor>,
        limit: u32,
    ) -> Result<AbandonmentReport, StoreError>;

    /// What the carts created in `[from, to)` became, a cart idle since
    /// `cutoff` and not checked out counting as abandoned.
    async fn cart_kpis(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        cutoff: DateTime<Utc>,
    ) -> Result<CartKpis, StoreError>;
}

/// The carts created in a time range, for the `kpis` report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CartKpis {
    pub created: u64,
    pub checked_out: u64,
    /// Idle since the cutoff and never checked out.
    pub abandoned: u64,
}

/// Most entries moved per batch.
pub const ACTIVITY_BATCH: usize = 500;
/// Pause between polls of an empty queue.
const ACTIVITY_POLL: Duration = Duration::from_millis(500);

/// Moves cart activity from the cart store into the [`CartActivityLog`].
/// Safe to run in several processes at once (recording is idempotent).
#[derive(Clone)]
pub struct ActivityRecorder {
    carts: Arc<dyn CartStore>,
    log: Arc<dyn CartActivityLog>,
}

/// Why a batch was not recorded; it stays queued and is tried again.
#[derive(Debug, thiserror::Error)]
pub enum RecorderError {
    #[error(transparent)]
    Carts(#[from] CartStoreError),
    #[error("recording cart activity: {0}")]
    Log(#[from] StoreError),
}

impl ActivityRecorder {
    pub fn new(carts: Arc<dyn CartStore>, log: Arc<dyn CartActivityLog>) -> Self {
        ActivityRecorder { carts, log }
    }

    /// Records one batch; returns how many entries it held.
    pub async fn record_batch(&self) -> Result<usize, RecorderError> {
        let queued = self.carts.queued_activity(ACTIVITY_BATCH).await?;
        if queued.is_empty() {
            return Ok(0);
        }
        let entries: Vec<CartActivity> = queued.iter().map(|q| q.activity.clone()).collect();
        self.log.record(&entries).await?;
        let tokens: Vec<String> = queued.into_iter().map(|q| q.token).collect();
        self.carts.acknowledge_activity(&tokens).await?;
        Ok(tokens.len())
    }

    /// Records until the queue is empty; returns how many entries it moved.
    pub async fn record_all(&self) -> Result<usize, RecorderError> {
        let mut total = 0;
        loop {
            let recorded = self.record_batch().await?;
            total += recorded;
            if recorded < ACTIVITY_BATCH {
                return Ok(total);
            }
        }
    }

    /// Records until `stopped` turns true, then drains what is queued.
    pub async fn run(self, mut stopped: tokio::sync::watch::Receiver<bool>) {
        loop {
            if let Err(error) = self.record_all().await {
                tracing::warn!(%error, "cart activity not recorded yet; retrying");
            }
            tokio::select! {
                _ = tokio::time::sleep(ACTIVITY_POLL) => {}
                _ = stopped.changed() => break,
            }
        }
        if let Err(error) = self.record_all().await {
            tracing::warn!(%error, "cart activity left queued at shutdown");
        }
    }
}
