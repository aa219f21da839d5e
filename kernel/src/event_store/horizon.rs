//! `LogHorizon`: the global log's readable head, read for everyone in the
//! process who waits for it to reach a position.
//!
//! An event is in the log (and in its stream) the moment its transaction
//! commits, but the global log shows it only once every older transaction
//! has ended (see "Reading the global log without gaps" in ARCHITECTURE.md).
//! Under load some older transaction is almost always still open, so a
//! subscriber woken by an append usually finds it not yet readable. Instead
//! of each waiter polling, one task reads the head every [`POLL`] while
//! anyone waits, and wakes those whose position it has passed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use super::{EventStore, Position};

/// How often the head is read while someone waits.
pub const POLL: Duration = Duration::from_millis(2);

/// The readable head of the log, shared in one process; cheap to clone.
#[derive(Clone)]
pub struct LogHorizon {
    inner: Arc<Inner>,
}

struct Inner {
    head: watch::Sender<Position>,
    waiters: AtomicUsize,
    someone_waits: Notify,
}

/// Counts a waiter for as long as it lives.
struct Waiting<'a>(&'a Inner);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Default for LogHorizon {
    fn default() -> Self {
        LogHorizon {
            inner: Arc::new(Inner {
                head: watch::Sender::new(Position::START),
                waiters: AtomicUsize::new(0),
                someone_waits: Notify::new(),
            }),
        }
    }
}

impl LogHorizon {
    /// Resolves `true` once the readable head is at or past `position`, or
    /// `false` after `timeout` (a long transaction holds the log back, or
    /// [`LogHorizon::follow`] is not running).
    pub async fn wait_until_readable(&self, position: Position, timeout: Duration) -> bool {
        let mut head = self.inner.head.subscribe();
        if *head.borrow() >= position {
            return true;
        }
        self.inner.waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.inner);
        // Stores a permit if the follower is busy: the wait is never missed.
        self.inner.someone_waits.notify_one();
        matches!(
            tokio::time::timeout(timeout, head.wait_for(|head| *head >= position)).await,
            Ok(Ok(_))
        )
    }

    /// Reads the head every [`POLL`] while anyone waits, until `stop`
    /// turns true.
    pub async fn follow(self, store: Arc<dyn EventStore>, mut stop: watch::Receiver<bool>) {
        loop {
            if self.inner.waiters.load(Ordering::SeqCst) == 0 {
                tokio::select! {
                    () = self.inner.someone_waits.notified() => {}
                    _ = stop.changed() => return,
                }
                continue;
            }
            match store.head().await {
                Ok(read) => {
                    self.inner.head.send_if_modified(|head| {
                        let moved = read > *head;
                        if moved {
                            *head = read;
                        }
                        moved
                    });
                }
                Err(error) => tracing::debug!(%error, "log horizon: reading the head failed"),
            }
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                _ = stop.changed() => return,
            }
        }
    }
}
