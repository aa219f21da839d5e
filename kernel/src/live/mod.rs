//! Wake-ups for live subscriptions: who should look at the event log again.
//!
//! The event log is the only source of truth; nothing here carries data.
//! A subscriber registers the aggregate ids it follows and is woken when one
//! of them may have new events. It then reads the log itself, so a wake-up
//! that arrives twice costs a read, and one that never arrives costs latency:
//!
//! 1. **In process**: the event and saga stores are wrapped
//!    ([`NotifyingEventStore`], [`NotifyingSagaStore`]) so every append made
//!    by this process wakes its own subscribers at once.
//! 2. **Across processes** (when Redis is configured): the ids of every
//!    append are published on `<prefix>events`; every kernel process
//!    listens there and wakes its subscribers.
//! 3. **Not yet readable**: an append is in its stream at once but in the
//!    global log only once older transactions have ended. A subscriber that
//!    finds its streams ahead of the readable head waits for the head
//!    ([`LogHorizon`], read for the whole process every 2 ms while anyone
//!    waits) instead of for the next wake-up.
//! 4. **Safety net**: while anyone is subscribed, [`LiveUpdates::follow_log`]
//!    reads the log's tail every `COMMERCE_LIVE_POLL_MS` and wakes the
//!    aggregates it sees there. It catches what 1 and 2 miss: a lost
//!    message, Redis down, or an event that became readable only after an
//!    earlier transaction finished.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::{Notify, mpsc, watch};
use uuid::Uuid;

use crate::event_store::{EventStore, LogHorizon, Position, StoreError};

mod order_feed;
mod stores;

pub use order_feed::{OrderChange, OrderFeed};
pub use stores::{NotifyingEventStore, NotifyingSagaStore};

/// Most ids queued for publishing; beyond it ids are dropped (the log
/// follower still finds them).
const PUBLISH_QUEUE: usize = 16_384;
/// Most ids in one published message.
const PUBLISH_BATCH: usize = 512;
/// Wait before reconnecting to Redis after a failure.
const REDIS_RETRY: Duration = Duration::from_secs(1);
/// Events read per page by the log follower.
const FOLLOW_PAGE: u32 = 1_000;

/// The wake-up hub of one kernel process; cheap to clone.
#[derive(Clone)]
pub struct LiveUpdates {
    inner: Arc<Hub>,
}

struct Hub {
    /// Subscribers by the aggregate id they follow.
    watchers: Mutex<HashMap<Uuid, Vec<Watcher>>>,
    next_watch: AtomicU64,
    /// Ids waiting to be published to other processes, when Redis is set.
    publish: Mutex<Option<mpsc::Sender<Uuid>>>,
    poll_interval: Duration,
    horizon: LogHorizon,
}

/// One subscriber's wake-up, by its registration number.
type Watcher = (u64, Arc<Notify>);

/// A subscriber's registration; dropping it unregisters.
pub struct Watch {
    hub: Arc<Hub>,
    id: u64,
    aggregates: Vec<Uuid>,
    notify: Arc<Notify>,
}

impl Watch {
    /// Resolves at the next wake-up for one of the watched aggregates, or at
    /// once if one came since the last call.
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let Ok(mut watchers) = self.hub.watchers.lock() else {
            return;
        };
        for aggregate in &self.aggregates {
            if let Some(list) = watchers.get_mut(aggregate) {
                list.retain(|(id, _)| *id != self.id);
                if list.is_empty() {
                    watchers.remove(aggregate);
                }
            }
        }
    }
}

impl LiveUpdates {
    /// A hub whose log follower looks at the tail every `poll_interval`.
    pub fn new(poll_interval: Duration) -> Self {
        LiveUpdates {
            inner: Arc::new(Hub {
                watchers: Mutex::new(HashMap::new()),
                next_watch: AtomicU64::new(1),
                publish: Mutex::new(None),
                poll_interval,
                horizon: LogHorizon::default(),
            }),
        }
    }

    /// Registers interest in `aggregates`. Register before the first read
    /// of the log: a change that lands between the two then still wakes.
    pub fn watch(&self, aggregates: &[Uuid]) -> Watch {
        let id = self.inner.next_watch.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        if let Ok(mut watchers) = self.inner.watchers.lock() {
            for aggregate in aggregates {
                watchers
                    .entry(*aggregate)
                    .or_default()
                    .push((id, Arc::clone(&notify)));
            }
        }
        Watch {
            hub: Arc::clone(&self.inner),
            id,
            aggregates: aggregates.to_vec(),
            notify,
        }
    }

    /// The log's readable head, for subscribers whose streams are ahead of
    /// it; [`LogHorizon::follow`] must run for it to move.
    pub fn horizon(&self) -> &LogHorizon {
        &self.inner.horizon
    }

    /// Subscribers registered in this process (counting each aggregate).
    pub fn watcher_count(&self) -> usize {
        self.inner
            .watchers
            .lock()
            .map_or(0, |watchers| watchers.values().map(Vec::len).sum())
    }

    /// Tells this process's subscribers, and other processes, that these
    /// aggregates have new events.
    pub fn changed(&self, aggregates: impl IntoIterator<Item = Uuid>) {
        let publish = self.inner.publish.lock().ok().and_then(|p| p.clone());
        for aggregate in aggregates {
            self.wake_local(aggregate);
            if let Some(queue) = &publish {
                // Full queue: the log follower of the other processes finds it.
                let _ = queue.try_send(aggregate);
            }
        }
    }

    fn wake_local(&self, aggregate: Uuid) {
        let Ok(watchers) = self.inner.watchers.lock() else {
            return;
        };
        if let Some(list) = watchers.get(&aggregate) {
            for (_, notify) in list {
                // Stores a permit when the subscriber is busy, so a wake-up
                // during its read is not lost.
                notify.notify_one();
            }
        }
    }

    /// Follows the log's tail while anyone is subscribed, waking what it
    /// sees, until `stop` turns true.
    ///
    /// While nobody is subscribed it only remembers the head. Any event that
    /// becomes readable after that moment has a later position, so a
    /// subscriber registered since is covered from its first read on.
    pub async fn follow_log(self, store: Arc<dyn EventStore>, mut stop: watch::Receiver<bool>) {
        let mut cursor: Option<Position> = None;
        loop {
            match self.follow_step(store.as_ref(), cursor).await {
                Ok(next) => cursor = Some(next),
                Err(error) => tracing::warn!(%error, "live updates: reading the log tail failed"),
            }
            tokio::select! {
                () = tokio::time::sleep(self.inner.poll_interval) => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn follow_step(
        &self,
        store: &dyn EventStore,
        cursor: Option<Position>,
    ) -> Result<Position, StoreError> {
        let (Some(mut cursor), true) = (cursor, self.watcher_count() > 0) else {
            return store.head().await;
        };
        loop {
            let page = store.read_all(cursor, FOLLOW_PAGE).await?;
            let Some(last) = page.last() else {
                return Ok(cursor);
            };
            cursor = last.position;
            let full = page.len() == FOLLOW_PAGE as usize;
            for event in &page {
                self.wake_local(event.aggregate_id);
            }
            if !full {
                return Ok(cursor);
            }
        }
    }

    /// Publishes this process's changes to, and receives other processes'
    /// changes from, Redis channel `<key_prefix>events`, reconnecting after
    /// failures, until `stop` turns true.
    pub async fn bridge_redis(self, url: String, key_prefix: String, stop: watch::Receiver<bool>) {
        let client = match redis::Client::open(url.as_str()) {
            Ok(client) => client,
            Err(error) => {
                tracing::error!(%error, "live updates: unusable Redis URL; other processes' changes arrive through the log follower only");
                return;
            }
        };
        let channel = format!("{key_prefix}events");
        let (queue, outgoing) = mpsc::channel(PUBLISH_QUEUE);
        if let Ok(mut publish) = self.inner.publish.lock() {
            *publish = Some(queue);
        }
        let publisher = tokio::spawn(publish_changes(
            client.clone(),
            channel.clone(),
            outgoing,
            stop.clone(),
        ));
        self.receive_changes(client, channel, stop).await;
        if let Ok(mut publish) = self.inner.publish.lock() {
            *publish = None;
        }
        let _ = publisher.await;
    }

    async fn receive_changes(
        &self,
        client: redis::Client,
        channel: String,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let listening = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                tracing::debug!(%channel, "live updates: listening for other processes' changes");
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    let Ok(payload) = message.get_payload::<String>() else {
                        continue;
                    };
                    for id in payload.split(',') {
                        if let Ok(aggregate) = Uuid::parse_str(id) {
                            self.wake_local(aggregate);
                        }
                    }
                }
                Ok::<(), redis::RedisError>(())
            };
            tokio::select! {
                ended = listening => match ended {
                    Ok(()) => tracing::warn!("live updates: Redis closed the subscription; reconnecting"),
                    Err(error) => tracing::warn!(%error, "live updates: Redis subscription failed; reconnecting"),
                },
                _ = stop.changed() => return,
            }
            tokio::select! {
                () = tokio::time::sleep(REDIS_RETRY) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

/// Sends queued ids in batches; a failed send is dropped (the log follower
/// of the other processes covers it) and the connection is made again.
async fn publish_changes(
    client: redis::Client,
    channel: String,
    mut outgoing: mpsc::Receiver<Uuid>,
    mut stop: watch::Receiver<bool>,
) {
    let mut connection: Option<redis::aio::MultiplexedConnection> = None;
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    loop {
        let received = tokio::select! {
            received = outgoing.recv_many(&mut batch, PUBLISH_BATCH) => received,
            _ = stop.changed() => return,
        };
        if received == 0 {
            return;
        }
        let payload = batch
            .drain(..)
            .map(|id| id.to_string())
            .collect::<Vec<_>>()
            .join(",");
        if connection.is_none() {
            match client.get_multiplexed_async_connection().await {
                Ok(made) => connection = Some(made),
                Err(error) => {
                    tracing::warn!(%error, "live updates: cannot reach Redis to publish");
                    continue;
                }
            }
        }
        if let Some(conn) = connection.as_mut() {
            let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(&payload)
                .query_async(conn)
                .await;
            if let Err(error) = sent {
                tracing::warn!(%error, "live updates: publishing failed");
                connection = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_change_wakes_the_watchers_of_that_aggregate_only() {
        let live = LiveUpdates::new(Duration::from_secs(1));
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let watching_a = live.watch(&[a]);
        let watching_b = live.watch(&[b]);
        let also_a = live.watch(&[a, b]);
        assert_eq!(live.watcher_count(), 4);
        // Woken before waiting: the permit is kept.
        live.changed([a]);
        let soon = Duration::from_millis(200);
        assert!(
            tokio::time::timeout(soon, watching_a.changed())
                .await
                .is_ok()
        );
        assert!(tokio::time::timeout(soon, also_a.changed()).await.is_ok());
        assert!(
            tokio::time::timeout(soon, watching_b.changed())
                .await
                .is_err()
        );
        drop(also_a);
        assert_eq!(live.watcher_count(), 2);
        drop((watching_a, watching_b));
        assert_eq!(live.watcher_count(), 0);
    }
}
