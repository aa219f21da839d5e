//! `AggregateCache`: aggregates this process rebuilt recently, each with the
//! stream version it was rebuilt at, so the next load reads and folds only
//! the events written since instead of replaying the whole stream.
//!
//! Why: an inventory stream gains events with every sale of its product,
//! and each order loads it twice; without the cache an order on a product
//! sold a million times replays a million events. With it, a load is one
//! indexed read of what is new (usually nothing) whatever the stream's age.
//!
//! Safety: events are immutable and versions dense, so "the state at
//! version N plus the events after N" is the state now, whichever process
//! wrote them. The cache is never trusted for writes: an append still
//! carries the loaded version as its expected version, and the store
//! refuses it if the stream moved. Several kernel processes each keep their
//! own cache.
//!
//! Bounded: at most `capacity` aggregates. To make room the oldest entry
//! not used since it was last considered is dropped ("second chance"): a
//! hot product's inventory, loaded by every order, stays while the stream
//! of each short-lived order passes through.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use uuid::Uuid;

use super::repository::Loaded;
use crate::domain::Aggregate;

/// How many aggregates a process keeps by default.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// Recently rebuilt aggregates of any type, by stream id.
pub struct AggregateCache {
    capacity: usize,
    inner: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    by_id: HashMap<Uuid, Entry>,
    /// Ids in the order they were cached or given a second chance.
    order: VecDeque<Uuid>,
}

struct Entry {
    loaded: Arc<dyn Any + Send + Sync>,
    /// Read or written since eviction last looked at it.
    used: bool,
}

impl std::fmt::Debug for AggregateCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregateCache")
            .field("capacity", &self.capacity)
            .field("len", &self.entries().by_id.len())
            .finish()
    }
}

impl AggregateCache {
    /// A cache of at most `capacity` aggregates (0 keeps none).
    pub fn new(capacity: usize) -> AggregateCache {
        AggregateCache {
            capacity,
            inner: Mutex::new(Entries::default()),
        }
    }

    fn entries(&self) -> MutexGuard<'_, Entries> {
        // Every change below is completed before the guard is dropped, so
        // a poisoned lock still holds a consistent map.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The cached state of stream `id`, if it holds an `A`.
    pub fn get<A: Aggregate>(&self, id: Uuid) -> Option<Loaded<A>> {
        let loaded = {
            let mut entries = self.entries();
            let entry = entries.by_id.get_mut(&id)?;
            entry.used = true;
            Arc::clone(&entry.loaded)
        };
        loaded.downcast_ref::<Loaded<A>>().cloned()
    }

    /// Remembers `loaded` as the state of stream `id`, unless an entry
    /// already holds a later version (another task loaded it meanwhile).
    pub fn put<A: Aggregate>(&self, id: Uuid, loaded: &Loaded<A>) {
        if self.capacity == 0 || loaded.version == 0 {
            return;
        }
        // Cloned before the lock: every aggregate type shares it.
        let copy: Arc<dyn Any + Send + Sync> = Arc::new(loaded.clone());
        let mut entries = self.entries();
        if let Some(entry) = entries.by_id.get_mut(&id) {
            let newer_cached = entry
                .loaded
                .downcast_ref::<Loaded<A>>()
                .is_some_and(|cached| cached.version > loaded.version);
            if !newer_cached {
                entry.loaded = copy;
            }
            entry.used = true;
            return;
        }
        entries.by_id.insert(
            id,
            Entry {
                loaded: copy,
                used: false,
            },
        );
        entries.order.push_back(id);
        while entries.by_id.len() > self.capacity {
            let Some(oldest) = entries.order.pop_front() else {
                break;
            };
            let second_chance = entries
                .by_id
                .get_mut(&oldest)
                .is_some_and(|entry| std::mem::replace(&mut entry.used, false));
            if second_chance {
                entries.order.push_back(oldest);
            } else {
                entries.by_id.remove(&oldest);
            }
        }
    }

    /// Aggregates held now.
    pub fn len(&self) -> usize {
        self.entries().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::inventory::Inventory;
    use crate::domain::order::Order;

    fn inventory(on_hand: u32, version: u32) -> Loaded<Inventory> {
        Loaded {
            state: Inventory {
                on_hand,
                ..Inventory::default()
            },
            version,
        }
    }

    #[test]
    fn keeps_the_latest_version_of_the_right_type() {
        let cache = AggregateCache::new(10);
        let id = Uuid::now_v7();
        cache.put(id, &inventory(5, 3));
        cache.put(id, &inventory(4, 2));
        assert_eq!(
            cache.get::<Inventory>(id),
            Some(inventory(5, 3)),
            "older never replaces newer"
        );
        cache.put(id, &inventory(7, 4));
        assert_eq!(cache.get::<Inventory>(id).map(|l| l.version), Some(4));
        assert_eq!(cache.get::<Order>(id), None, "another type is a miss");
        cache.put(Uuid::now_v7(), &inventory(1, 0));
        assert_eq!(cache.len(), 1, "an empty stream is not kept");
    }

    #[test]
    fn an_aggregate_in_use_outlives_ones_passing_through() {
        let cache = AggregateCache::new(3);
        let hot = Uuid::now_v7();
        cache.put(hot, &inventory(9, 1));
        for n in 0..20 {
            assert!(
                cache.get::<Inventory>(hot).is_some(),
                "hot entry evicted at {n}"
            );
            cache.put(Uuid::now_v7(), &inventory(n, 1));
        }
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn stays_within_its_capacity_dropping_the_oldest() {
        let cache = AggregateCache::new(3);
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
        for (n, id) in ids.iter().enumerate() {
            cache.put(*id, &inventory(n as u32, 1));
        }
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.get::<Inventory>(ids[0]), None);
        assert_eq!(
            cache.get::<Inventory>(ids[4]).map(|l| l.state.on_hand),
            Some(4)
        );
        let none = AggregateCache::new(0);
        none.put(ids[0], &inventory(1, 1));
        assert!(none.is_empty());
    }
}
