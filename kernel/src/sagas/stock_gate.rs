//! `StockGate`: one saga step at a time per product in this process, for
//! the steps that write stock (reserve, confirm).
//!
//! Why: every order for a product appends to that product's one inventory
//! stream under optimistic concurrency. When several of this process's
//! drives reserve or commit the same popular product at once, all but one
//! lose the race: each loser pays a look-up of the conflicting version, a
//! read of the stream, a back-off sleep and a second write (at 64 clients
//! on 20 products, about 1.4 conflict look-ups per order). Waiting for the
//! product here instead costs nothing on the database: the step that goes
//! next plans on the stock as the previous one left it.
//!
//! Safety does not rest on it. The append still carries the version its
//! plan read, and the store still refuses it if the stream moved (another
//! process, an admin's stock adjustment, a compensation's release): the
//! gate only keeps this process's own stock steps from racing each other.
//! Products are entered in id order, so two steps that both need two
//! products cannot wait for each other. A step waits at most a given
//! patience: a write that hangs keeps its products' turn, and the steps
//! behind it then go on without the turn (racing, as without the gate)
//! rather than holding their drives, and the runner's permits, with it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;

/// Entries kept for products no step holds before the map is swept.
const SWEEP_AT: usize = 1_024;

/// Per-product locks of one process, created on first use and dropped
/// when no step holds or waits for them.
#[derive(Debug, Default)]
pub(crate) struct StockGate {
    products: Mutex<HashMap<Uuid, Weak<tokio::sync::Mutex<()>>>>,
}

/// What a step holds while it plans and writes stock: its products, each
/// let go when this is dropped.
#[derive(Debug)]
pub(crate) struct StockHeld {
    _products: Vec<OwnedMutexGuard<()>>,
    /// Every product asked for is held (the wait did not run out).
    all: bool,
}

impl StockHeld {
    /// Whether the step got its turn on every product it asked for.
    pub(crate) fn all_held(&self) -> bool {
        self.all
    }
}

impl StockGate {
    /// Waits until this process has no other stock step on any of
    /// `products` under way, and holds them until the result is dropped.
    /// After `patience` it stops waiting and holds only the products it
    /// got (the append's version check decides for the others).
    pub(crate) async fn enter(
        &self,
        products: impl IntoIterator<Item = Uuid>,
        patience: Duration,
    ) -> StockHeld {
        let mut products: Vec<Uuid> = products.into_iter().collect();
        products.sort_unstable();
        products.dedup();
        let locks: Vec<Arc<tokio::sync::Mutex<()>>> = {
            let mut map = self.products.lock().unwrap_or_else(PoisonError::into_inner);
            if map.len() >= SWEEP_AT {
                map.retain(|_, lock| lock.strong_count() > 0);
            }
            products
                .iter()
                .map(|product| {
                    if let Some(lock) = map.get(product).and_then(Weak::upgrade) {
                        return lock;
                    }
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(*product, Arc::downgrade(&lock));
                    lock
                })
                .collect()
        };
        let deadline = tokio::time::Instant::now() + patience;
        let mut held = Vec::with_capacity(locks.len());
        for (lock, product) in locks.into_iter().zip(&products) {
            match tokio::time::timeout_at(deadline, lock.lock_owned()).await {
                Ok(guard) => held.push(guard),
                Err(_) => {
                    tracing::warn!(%product, patience_ms = patience.as_millis() as u64, "a stock step waited too long for its turn on a product; going on without it");
                }
            }
        }
        StockHeld {
            all: held.len() == products.len(),
            _products: held,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const PATIENCE: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn a_product_is_held_by_one_step_at_a_time() {
        let gate = Arc::new(StockGate::default());
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let first = gate.enter([b, a], PATIENCE).await;
        assert!(first.all_held());
        let waiting = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move {
                let _held = gate.enter([a], PATIENCE).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "entered a product another step holds"
        );
        // Other products are free meanwhile.
        let other = tokio::time::timeout(
            Duration::from_secs(1),
            gate.enter([Uuid::now_v7()], PATIENCE),
        )
        .await
        .expect("a free product waits for nothing");
        drop(other);
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("entered once the product was let go")
            .expect("no panic");
    }

    #[tokio::test]
    async fn a_product_named_twice_is_entered_once() {
        let gate = StockGate::default();
        let a = Uuid::now_v7();
        tokio::time::timeout(Duration::from_secs(1), gate.enter([a, a], PATIENCE))
            .await
            .expect("a step does not wait for itself");
    }

    #[tokio::test]
    async fn a_step_stops_waiting_after_its_patience() {
        let gate = StockGate::default();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let _stuck = gate.enter([a], PATIENCE).await;
        let started = tokio::time::Instant::now();
        let late = tokio::time::timeout(
            Duration::from_secs(5),
            gate.enter([a, b], Duration::from_millis(100)),
        )
        .await
        .expect("waited past its patience");
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert!(!late.all_held(), "a product it never got counted as held");
        // It holds what it got: b stays taken until it is let go.
        let b_again =
            tokio::time::timeout(Duration::from_millis(100), gate.enter([b], PATIENCE)).await;
        assert!(b_again.is_err(), "entered a product a late step holds");
        drop(late);
        tokio::time::timeout(Duration::from_secs(1), gate.enter([b], PATIENCE))
            .await
            .expect("free once the late step let go");
    }

    #[tokio::test]
    async fn products_no_step_holds_are_forgotten() {
        let gate = StockGate::default();
        let held_product = Uuid::now_v7();
        let held = gate.enter([held_product], PATIENCE).await;
        for _ in 0..(SWEEP_AT * 2) {
            drop(gate.enter([Uuid::now_v7()], PATIENCE).await);
        }
        // A product a step holds survives the sweeps, and still excludes.
        let again = tokio::time::timeout(
            Duration::from_millis(100),
            gate.enter([held_product], PATIENCE),
        )
        .await;
        assert!(again.is_err(), "a held product was forgotten");
        drop(held);
        let kept = gate
            .products
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        assert!(kept <= SWEEP_AT, "{kept} entries kept");
    }
}
