//! `ConnectionShelf`: Postgres connections kept ready between statements,
//! in front of the sqlx pool.
//!
//! Why: sqlx gives a connection back to its pool by first sending the
//! server a round trip of its own (a `Sync`, awaited), whatever state the
//! connection is in. For a connection that finished its statement that
//! round trip tells nothing new, yet it costs both processes a wake-up and
//! two system calls per statement: under load about a tenth of the CPU per
//! order (BENCHMARKS.md, "Sixth step"). A connection whose statement ran to
//! its end is put on this shelf instead, and the next statement takes it
//! from there without asking the pool.
//!
//! Only connections in a known state are shelved: after a statement that
//! ran to its end, or one the server refused (a conflict, say: sqlx reads
//! the rest of that answer before the next statement). A connection whose
//! statement broke off (an I/O error, an error that ended the server's
//! session, or a future dropped half-way by a cancelled request) goes back
//! to the pool, which checks it and closes it if it is broken.
//!
//! Kept fresh: a take pings a shelved connection unused for
//! [`SHELF_IDLE_LIMIT`] before using it (a restart or failover usually shows
//! there, as the pool's own `before_acquire` check does), and each take and
//! shelving gives back to the pool the shelved connections that have been
//! unused that long, so a burst does not leave connections on the shelf for
//! good. One that has been out of the pool for [`SHELF_AGE_LIMIT`] goes back
//! after its statement, so that the pool's idle and lifetime rules still
//! replace connections (its lifetime may be exceeded by up to that limit).
//!
//! Transactions take their connection from the pool
//! ([`ConnectionShelf::pool`]), as before. The shelf keeps at most half of
//! the pool's connections idle on it; connections in use by statements are
//! taken from the pool as before, and compete with transactions as before.
//!
//! To sqlx a shelved connection is still in use, and closing the pool waits
//! for every connection in use: close through [`ConnectionShelf::close`],
//! which empties the shelf first and shelves nothing after.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, StreamExt, TryStreamExt};
use sqlx::Either;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{
    PgConnection, PgDatabaseError, PgQueryResult, PgRow, PgSeverity, PgStatement, PgTypeInfo,
};
use sqlx::{Describe, Execute, Executor, PgPool, Postgres};

/// A shelved connection unused this long is pinged before its next use, or
/// given back to the pool when another take or shelving passes it.
pub const SHELF_IDLE_LIMIT: Duration = Duration::from_secs(5);
/// A connection out of the pool this long goes back to it after its
/// statement, where sqlx's idle and lifetime rules apply to it.
pub const SHELF_AGE_LIMIT: Duration = Duration::from_secs(15 * 60);

/// A sqlx pool with a shelf of ready connections in front of it; use
/// `&ConnectionShelf` wherever a `&PgPool` would run a statement.
#[derive(Clone, Debug)]
pub struct ConnectionShelf {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    capacity: usize,
    /// [`SHELF_IDLE_LIMIT`] in production.
    idle_limit: Duration,
    shelf: Mutex<Shelf>,
}

#[derive(Debug, Default)]
struct Shelf {
    /// Most recently shelved last: the next statement takes the warmest,
    /// and the stalest are at the front.
    connections: VecDeque<Shelved>,
    /// Set by [`ConnectionShelf::close`]: nothing is shelved any more.
    closed: bool,
}

#[derive(Debug)]
struct Shelved {
    connection: PoolConnection<Postgres>,
    shelved_at: Instant,
    from_pool_at: Instant,
}

impl ConnectionShelf {
    /// A shelf in front of `pool`, holding at most `capacity` connections
    /// (0 turns it off: every statement then goes to the pool) and checking
    /// those unused for `idle_limit` ([`SHELF_IDLE_LIMIT`], shorter in
    /// tests).
    pub fn new(pool: PgPool, capacity: usize, idle_limit: Duration) -> ConnectionShelf {
        ConnectionShelf {
            inner: Arc::new(Inner {
                pool,
                capacity,
                idle_limit,
                shelf: Mutex::new(Shelf::default()),
            }),
        }
    }

    /// The pool behind the shelf: for transactions and migrations.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// How many connections wait on the shelf now.
    pub fn shelved(&self) -> usize {
        self.inner.lock().connections.len()
    }

    /// Gives every shelved connection back, shelves none from now on, and
    /// closes the pool (which waits for the connections still in use).
    pub async fn close(&self) {
        let shelved = {
            let mut shelf = self.inner.lock();
            shelf.closed = true;
            std::mem::take(&mut shelf.connections)
        };
        drop(shelved);
        self.inner.pool.close().await;
    }

    /// A connection for one statement: the warmest shelved one, or one from
    /// the pool.
    async fn take(&self) -> Result<Taken, sqlx::Error> {
        let (shelved, stale) = {
            let mut shelf = self.inner.lock();
            let taken = shelf.connections.pop_back();
            (taken, shelf.give_back_stale(self.inner.idle_limit))
        };
        // Dropping a pool connection is sqlx's way back to its pool.
        drop(stale);
        if let Some(mut shelved) = shelved {
            // Unused for a while: the server may have gone since. Bounded
            // like the pool's own check, which runs within its acquire
            // timeout: a host that silently drops packets would otherwise
            // hold the statement until TCP gives up.
            let usable = shelved.shelved_at.elapsed() < self.inner.idle_limit || {
                let limit = self.inner.pool.options().get_acquire_timeout();
                let ping = sqlx::Connection::ping(&mut *shelved.connection);
                match tokio::time::timeout(limit, ping).await {
                    Ok(answered) => answered.is_ok(),
                    Err(_) => {
                        // Closed, not given back: the pool's own check on
                        // its way back would wait as long again.
                        shelved.connection.close_on_drop();
                        false
                    }
                }
            };
            if usable {
                return Ok(Taken {
                    connection: Some(shelved.connection),
                    from_pool_at: shelved.from_pool_at,
                    clean: false,
                    home: Arc::clone(&self.inner),
                });
            }
        }
        let connection = self.inner.pool.acquire().await?;
        Ok(Taken {
            connection: Some(connection),
            from_pool_at: Instant::now(),
            clean: false,
            home: Arc::clone(&self.inner),
        })
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Shelf> {
        self.shelf
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Shelf {
    /// Takes off the shelf the connections unused for `idle_limit`, for
    /// the caller to give back to the pool once the lock is released.
    fn give_back_stale(&mut self, idle_limit: Duration) -> Vec<Shelved> {
        let mut stale = Vec::new();
        while self
            .connections
            .front()
            .is_some_and(|oldest| oldest.shelved_at.elapsed() >= idle_limit)
        {
            stale.extend(self.connections.pop_front());
        }
        stale
    }
}

/// A connection taken for one statement. Shelved again when dropped if the
/// statement left it in a known state ([`Taken::finished`]); otherwise given
/// back to the pool, which checks it.
struct Taken {
    connection: Option<PoolConnection<Postgres>>,
    from_pool_at: Instant,
    clean: bool,
    home: Arc<Inner>,
}

impl Taken {
    /// The connection; it is taken out only when `Taken` is dropped.
    fn connection(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        self.connection
            .as_deref_mut()
            .ok_or(sqlx::Error::PoolClosed)
    }

    /// Records how the statement ended: the connection is in a known state
    /// after a success or an error the server sent about the statement
    /// (sqlx reads the rest of that answer before the connection's next
    /// statement); not after an error that ended the server's session
    /// (`FATAL`, `PANIC`: a terminated backend, a shutdown), nor after
    /// anything else (I/O, protocol).
    fn finished<T>(&mut self, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        self.clean = match &result {
            Ok(_) => true,
            Err(sqlx::Error::Database(error)) => error
                .try_downcast_ref::<PgDatabaseError>()
                .is_some_and(|error| {
                    !matches!(error.severity(), PgSeverity::Fatal | PgSeverity::Panic)
                }),
            Err(_) => false,
        };
        result
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        let Some(connection) = self.connection.take() else {
            return;
        };
        if !self.clean || self.from_pool_at.elapsed() >= SHELF_AGE_LIMIT {
            // The pool's way back: it checks the connection first.
            return;
        }
        let stale = {
            let mut shelf = self.home.lock();
            if !shelf.closed && shelf.connections.len() < self.home.capacity {
                shelf.connections.push_back(Shelved {
                    connection,
                    shelved_at: Instant::now(),
                    from_pool_at: self.from_pool_at,
                });
            }
            shelf.give_back_stale(self.home.idle_limit)
        };
        drop(stale);
    }
}

impl<'s> Executor<'s> for &'_ ConnectionShelf {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        E: 'q + Execute<'q, Postgres>,
    {
        // The results are gathered before they are handed on, so that the
        // connection is known to have reached the end of its statement
        // before it is shelved. So `fetch` does not stream here, and a
        // caller that stops early still reads everything: every caller
        // collects the rows today.
        let shelf = self.clone();
        let results = async move {
            let mut taken = shelf.take().await?;
            let results = taken
                .connection()?
                .fetch_many(query)
                .try_collect::<Vec<_>>()
                .await;
            taken.finished(results)
        };
        stream::once(results)
            .map_ok(|results| stream::iter(results.into_iter().map(Ok)))
            .try_flatten()
            .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        E: 'q + Execute<'q, Postgres>,
    {
        let shelf = self.clone();
        Box::pin(async move {
            let mut taken = shelf.take().await?;
            // sqlx reads a statement's answer to its end before it returns
            // the first row.
            let row = taken.connection()?.fetch_optional(query).await;
            taken.finished(row)
        })
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement<'q>, sqlx::Error>> {
        let shelf = self.clone();
        Box::pin(async move {
            let mut taken = shelf.take().await?;
            let statement = taken.connection()?.prepare_with(sql, parameters).await;
            taken.finished(statement)
        })
    }

    fn describe<'e, 'q: 'e>(
        self,
        sql: &'q str,
    ) -> BoxFuture<'e, Result<Describe<Postgres>, sqlx::Error>> {
        let shelf = self.clone();
        Box::pin(async move {
            let mut taken = shelf.take().await?;
            let described = taken.connection()?.describe(sql).await;
            taken.finished(described)
        })
    }
}
