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
//! Only connections known to be clean are shelved. A statement that failed,
//! or whose future was dropped half-way (a cancelled request), gives its
//! connection back to the pool, which runs its check and closes it if it is
//! broken. A shelved connection unused for [`SHELF_IDLE_LIMIT`] goes back to
//! the pool on its next take (a restart or failover usually shows there:
//! the pool tests a connection idle that long before handing it out), and
//! one older than [`SHELF_AGE_LIMIT`] is given back after its statement, so
//! that the pool's own lifetime rules still replace connections.
//!
//! Transactions take their connection from the pool
//! ([`ConnectionShelf::pool`]), as before. To leave them connections, the
//! shelf holds at most half the pool's connections.
//!
//! To sqlx a shelved connection is still in use, and closing the pool waits
//! for every connection in use: close through [`ConnectionShelf::close`],
//! which empties the shelf first and shelves nothing after.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, StreamExt, TryStreamExt};
use sqlx::Either;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgQueryResult, PgRow, PgStatement, PgTypeInfo};
use sqlx::{Describe, Execute, Executor, PgPool, Postgres};

/// A shelved connection unused this long goes back to the pool, which
/// tests it before handing it out again.
pub const SHELF_IDLE_LIMIT: Duration = Duration::from_secs(5);
/// A connection this long in use goes back to the pool after its statement,
/// where sqlx's lifetime rules apply to it.
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
    shelf: Mutex<Shelf>,
}

#[derive(Debug, Default)]
struct Shelf {
    /// Most recently shelved last: the next statement takes the warmest.
    connections: Vec<Shelved>,
    /// Set by [`ConnectionShelf::close`]: nothing is shelved any more.
    closed: bool,
}

#[derive(Debug)]
struct Shelved {
    connection: PoolConnection<Postgres>,
    shelved_at: Instant,
    first_taken: Instant,
}

impl ConnectionShelf {
    /// A shelf in front of `pool`, holding at most `capacity` connections
    /// (0 turns it off: every statement then goes to the pool).
    pub fn new(pool: PgPool, capacity: usize) -> ConnectionShelf {
        ConnectionShelf {
            inner: Arc::new(Inner {
                pool,
                capacity,
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
        loop {
            let Some(shelved) = self.inner.lock().connections.pop() else {
                break;
            };
            if shelved.shelved_at.elapsed() < SHELF_IDLE_LIMIT {
                return Ok(Taken {
                    connection: Some(shelved.connection),
                    first_taken: shelved.first_taken,
                    clean: false,
                    home: Arc::clone(&self.inner),
                });
            }
            // Idle too long: back to the pool, which tests it before it is
            // handed out again (dropping it there is the sqlx way back).
            drop(shelved);
        }
        let connection = self.inner.pool.acquire().await?;
        Ok(Taken {
            connection: Some(connection),
            first_taken: Instant::now(),
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

/// A connection taken for one statement. Shelved again when dropped if the
/// statement ran to its end ([`Taken::finished`]); otherwise given back to
/// the pool, which checks it.
struct Taken {
    connection: Option<PoolConnection<Postgres>>,
    first_taken: Instant,
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

    /// Marks the statement as run to its end when `result` is a success.
    fn finished<T>(&mut self, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        self.clean = result.is_ok();
        result
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        let Some(connection) = self.connection.take() else {
            return;
        };
        if !self.clean || self.first_taken.elapsed() >= SHELF_AGE_LIMIT {
            // The pool's way back: it checks the connection first.
            return;
        }
        let mut shelf = self.home.lock();
        if !shelf.closed && shelf.connections.len() < self.home.capacity {
            shelf.connections.push(Shelved {
                connection,
                shelved_at: Instant::now(),
                first_taken: self.first_taken,
            });
        }
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
        // before it is shelved. Every caller collects them anyway.
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
