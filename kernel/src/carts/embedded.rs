//! The embedded cart store: carts in this process's memory.
//!
//! The default when no Redis URL is configured, so a first `cargo run` needs
//! nothing else. It behaves as the Redis store does (compare-and-swap,
//! time to live, activity queue) but is private to one process and does not
//! survive a restart: run Redis for several processes or durable carts. The
//! lifecycle record it feeds is durable once recorded.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{CartActivity, CartStore, CartStoreError, QueuedActivity, Swap};
use crate::domain::cart::Cart;

#[derive(Default)]
struct State {
    carts: HashMap<Uuid, Cart>,
    /// Activity not yet acknowledged, by sequence number.
    activity: BTreeMap<u64, CartActivity>,
    next_sequence: u64,
}

/// Carts in memory, behind one lock held only for map operations.
#[derive(Default)]
pub struct EmbeddedCartStore {
    state: Mutex<State>,
}

impl EmbeddedCartStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, CartStoreError> {
        // A panic while holding the lock cannot leave a half-written cart:
        // every write is a single insert.
        self.state.lock().map_err(|_| {
            CartStoreError::Unavailable("the embedded cart store lock is poisoned".into())
        })
    }
}

#[async_trait]
impl CartStore for EmbeddedCartStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn load(&self, id: Uuid, now: DateTime<Utc>) -> Result<Option<Cart>, CartStoreError> {
        let mut state = self.lock()?;
        match state.carts.get(&id) {
            Some(cart) if cart.is_expired(now) => {
                state.carts.remove(&id);
                Ok(None)
            }
            found => Ok(found.cloned()),
        }
    }

    async fn swap(
        &self,
        cart: &Cart,
        expected_version: u32,
        now: DateTime<Utc>,
    ) -> Result<Swap, CartStoreError> {
        let mut state = self.lock()?;
        let actual = match state.carts.get(&cart.id) {
            Some(stored) if !stored.is_expired(now) => stored.version,
            _ => 0,
        };
        if actual != expected_version {
            return Ok(Swap::Conflict { actual });
        }
        state.carts.insert(cart.id, cart.clone());
        let sequence = state.next_sequence;
        state.next_sequence += 1;
        state.activity.insert(sequence, CartActivity::of(cart));
        Ok(Swap::Written)
    }

    async fn queued_activity(&self, max: usize) -> Result<Vec<QueuedActivity>, CartStoreError> {
        let mut state = self.lock()?;
        // The recorder polls this often: a good moment to free expired carts.
        let now = Utc::now();
        state.carts.retain(|_, cart| !cart.is_expired(now));
        Ok(state
            .activity
            .iter()
            .take(max)
            .map(|(sequence, activity)| QueuedActivity {
                token: sequence.to_string(),
                activity: activity.clone(),
            })
            .collect())
    }

    async fn acknowledge_activity(&self, tokens: &[String]) -> Result<(), CartStoreError> {
        let mut state = self.lock()?;
        for token in tokens {
            if let Ok(sequence) = token.parse::<u64>() {
                state.activity.remove(&sequence);
            }
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), CartStoreError> {
        self.lock().map(|_| ())
    }
}
