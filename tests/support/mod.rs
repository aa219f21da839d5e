//! Fixtures shared by the integration suites: a fresh, empty database per test
//! on each backend, and a runner that executes one suite against every backend.
//!
//! SQLite always runs. Postgres runs when `COMMERCE_TEST_DATABASE_URL` is set
//! (`.ci/run` sets it); otherwise its tests are listed as ignored, never passed.
//! Each Postgres test gets its own schema, so runs never see each other's data.

#![allow(dead_code)] // Each test binary uses its own part of the fixtures.

pub mod containers;
pub mod counting;
#[path = "../fakes/mod.rs"]
pub mod fakes;
pub mod kernel;
pub mod shop;
pub mod socket;
pub mod traces;

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::Context as _;
use commerce_kernel::event_store::{AppendOutcome, AppendRequest, EventStore, Position};
use commerce_kernel::storage::postgres::PostgresEventStore;
use commerce_kernel::storage::sqlite::SqliteEventStore;
use commerce_kernel::storage::{Database, DatabaseConfig};
use libtest_mimic::{Arguments, Failed, Trial};
use sqlx::Connection as _;
use sqlx::postgres::{PgConnectOptions, PgConnection};

/// Points the suites at a Postgres server, e.g. `postgres://postgres@127.0.0.1:5432/test`.
pub const TEST_DATABASE_URL: &str = "COMMERCE_TEST_DATABASE_URL";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Sqlite,
    Postgres,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Sqlite => "sqlite",
            BackendKind::Postgres => "postgres",
        }
    }
}

/// The test Postgres: `COMMERCE_TEST_DATABASE_URL`, else a container this
/// run started ([`containers`]).
fn postgres_url() -> Option<String> {
    configured(TEST_DATABASE_URL).or_else(containers::postgres_url)
}

/// The URL in environment variable `name`, if it is set and not blank.
fn configured(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|url| !url.trim().is_empty())
}

/// Runs the trials `build` lists, with Postgres and Redis in containers
/// when their test URLs are unset and the `testcontainers` feature is on
/// (see [`containers`]); the containers are removed before the process
/// exits.
pub fn run_trials(build: impl FnOnce() -> Vec<Trial>) -> ! {
    let args = Arguments::from_args();
    // Listing the cases needs no servers.
    let containers = containers::start(
        !args.list && configured(TEST_DATABASE_URL).is_none(),
        !args.list && configured(TEST_REDIS_URL).is_none(),
    );
    let conclusion = libtest_mimic::run(&args, build());
    drop(containers);
    conclusion.exit()
}

/// A fresh database with migrations applied, removed again by [`TestDatabase::remove`].
pub struct TestDatabase {
    pub database: Database,
    pub kind: BackendKind,
    cleanup: Cleanup,
}

enum Cleanup {
    Sqlite(tempfile::TempDir),
    Postgres { url: String, schema: String },
}

impl TestDatabase {
    pub async fn create(kind: BackendKind) -> anyhow::Result<Self> {
        match kind {
            BackendKind::Sqlite => {
                let dir = tempfile::tempdir().context("temporary directory")?;
                let config = DatabaseConfig::Sqlite {
                    path: dir.path().join("commerce.db"),
                };
                let database = Database::connect(&config).await?;
                database.migrate().await?;
                Ok(TestDatabase {
                    database,
                    kind,
                    cleanup: Cleanup::Sqlite(dir),
                })
            }
            BackendKind::Postgres => {
                let url =
                    postgres_url().with_context(|| format!("{TEST_DATABASE_URL} is not set"))?;
                let schema = format!("test_{}", uuid::Uuid::new_v4().simple());
                let mut admin = PgConnection::connect(&url)
                    .await
                    .with_context(|| format!("cannot reach Postgres at {TEST_DATABASE_URL}"))?;
                sqlx::query(&format!("CREATE SCHEMA {schema}"))
                    .execute(&mut admin)
                    .await?;
                admin.close().await?;
                let options =
                    PgConnectOptions::from_str(&url)?.options([("search_path", schema.as_str())]);
                let config = DatabaseConfig::Postgres {
                    options: Box::new(options),
                    max_connections: 40,
                };
                let database = Database::connect(&config).await?;
                database.migrate().await?;
                Ok(TestDatabase {
                    database,
                    kind,
                    cleanup: Cleanup::Postgres { url, schema },
                })
            }
        }
    }

    /// The URL a kernel process uses to reach this database
    /// (`COMMERCE_DATABASE_URL`).
    pub fn url(&self) -> String {
        match &self.cleanup {
            Cleanup::Sqlite(dir) => {
                format!("sqlite://{}", dir.path().join("commerce.db").display())
            }
            Cleanup::Postgres { url, schema } => {
                let separator = if url.contains('?') { '&' } else { '?' };
                format!("{url}{separator}options=-c%20search_path%3D{schema}")
            }
        }
    }

    pub fn event_store(&self) -> Arc<dyn EventStore> {
        self.database.event_store()
    }

    /// Runs `statement` (its `$1` bound to `id`, if given) on this
    /// database, as a hand or a bug would write behind the kernel's back;
    /// the rows it changed.
    pub async fn execute(&self, statement: &str, id: Option<uuid::Uuid>) -> anyhow::Result<u64> {
        Ok(match &self.database {
            Database::Postgres(db) => {
                let mut query = sqlx::query(statement);
                if let Some(id) = id {
                    query = query.bind(id);
                }
                query.execute(db.pool()).await?.rows_affected()
            }
            Database::Sqlite(db) => {
                let mut query = sqlx::query(statement);
                if let Some(id) = id {
                    query = query.bind(id);
                }
                query.execute(db.writer()).await?.rows_affected()
            }
        })
    }

    /// Starts `request` in a transaction that stays open until [`HeldAppend::commit`].
    pub async fn hold_append(&self, request: AppendRequest) -> anyhow::Result<HeldAppend> {
        match &self.database {
            Database::Postgres(db) => {
                let mut transaction = db.pool().begin().await?;
                let outcome = PostgresEventStore::append_with(&mut *transaction, request).await?;
                Ok(HeldAppend::Postgres(transaction, outcome))
            }
            Database::Sqlite(db) => {
                let mut transaction = db.begin_write().await?;
                let outcome = SqliteEventStore::append_in(&mut transaction, request).await?;
                Ok(HeldAppend::Sqlite(transaction, outcome))
            }
        }
    }

    /// Closes the pools and deletes the database.
    pub async fn remove(self) -> anyhow::Result<()> {
        self.database.close().await;
        match self.cleanup {
            Cleanup::Sqlite(dir) => dir.close()?,
            Cleanup::Postgres { url, schema } => {
                let mut admin = PgConnection::connect(&url).await?;
                sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                    .execute(&mut admin)
                    .await?;
                admin.close().await?;
            }
        }
        Ok(())
    }
}

/// An append whose transaction is still open.
pub enum HeldAppend {
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>, AppendOutcome),
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>, AppendOutcome),
}

impl HeldAppend {
    pub async fn commit(self) -> anyhow::Result<AppendOutcome> {
        match self {
            HeldAppend::Postgres(transaction, outcome) => {
                transaction.commit().await?;
                Ok(outcome)
            }
            HeldAppend::Sqlite(transaction, outcome) => {
                transaction.commit().await?;
                Ok(outcome)
            }
        }
    }
}

/// Waits until readers of the global log can see `through`. On Postgres an event
/// becomes readable only once every older write transaction in the cluster has
/// finished (another test's, say); on SQLite at once.
pub async fn wait_until_readable(store: &dyn EventStore, through: Position) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while store.head().await? < through {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the log never reached {through}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    Ok(())
}

/// `cases![a, b, ...]`: the async functions `a`, `b`, ... as named cases for
/// [`run_suite`]. Each takes an `Arc<TestDatabase>` and returns `anyhow::Result<()>`.
#[allow(unused_macros)]
macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        [$((stringify!($name), (|db| Box::pin($name(db))) as $crate::support::SuiteCase)),*]
    };
}

/// A test of a backend-neutral suite: gets a fresh database, returns an error to fail.
pub type SuiteCase =
    fn(Arc<TestDatabase>) -> std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// Runs every case against every backend, as `<backend>::<case>`. Cases on a
/// backend that is not configured are reported as ignored.
pub fn run_suite(cases: &[(&'static str, SuiteCase)]) -> ! {
    run_suite_except(cases, &[])
}

/// [`run_suite`], with the cases named in `postgres_only` reported as
/// ignored on SQLite (several kernel processes, say).
pub fn run_suite_except(cases: &[(&'static str, SuiteCase)], postgres_only: &[&str]) -> ! {
    run_trials(|| suite_trials(cases, postgres_only))
}

/// The trials [`run_suite_except`] runs, for a test binary that adds
/// trials of its own.
#[allow(dead_code)]
pub fn suite_trials(cases: &[(&'static str, SuiteCase)], postgres_only: &[&str]) -> Vec<Trial> {
    let postgres_configured = postgres_url().is_some();
    let mut trials = Vec::new();
    for kind in [BackendKind::Sqlite, BackendKind::Postgres] {
        for &(name, case) in cases {
            let available = match kind {
                BackendKind::Sqlite => !postgres_only.contains(&name),
                BackendKind::Postgres => postgres_configured,
            };
            trials.push(
                Trial::test(format!("{}::{name}", kind.name()), move || {
                    run_case(kind, case)
                })
                .with_ignored_flag(!available),
            );
        }
    }
    trials
}

fn run_case(kind: BackendKind, case: SuiteCase) -> Result<(), Failed> {
    block_on(async move {
        let database = Arc::new(
            TestDatabase::create(kind)
                .await
                .map_err(|e| Failed::from(format!("setting up {}: {e:#}", kind.name())))?,
        );
        let outcome = case(Arc::clone(&database)).await;
        // Keep a failed test's database for inspection; remove a passed one's.
        if outcome.is_ok()
            && let Ok(database) = Arc::try_unwrap(database)
        {
            database
                .remove()
                .await
                .map_err(|e| Failed::from(format!("cleanup: {e:#}")))?;
        }
        outcome.map_err(|e| Failed::from(format!("{e:#}")))
    })
}

/// Runs one test on a runtime of its own, as small as the CI machine.
fn block_on(test: impl Future<Output = Result<(), Failed>>) -> Result<(), Failed> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failed::from(format!("runtime: {e}")))?
        .block_on(test)
}

/// Points the cart suites at a Redis server, e.g. `redis://127.0.0.1:6379`.
pub const TEST_REDIS_URL: &str = "COMMERCE_TEST_REDIS_URL";

/// The test Redis: `COMMERCE_TEST_REDIS_URL`, else a container this run
/// started ([`containers`]).
fn redis_url() -> Option<String> {
    configured(TEST_REDIS_URL).or_else(containers::redis_url)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CartBackendKind {
    Embedded,
    Redis,
}

impl CartBackendKind {
    pub fn name(self) -> &'static str {
        match self {
            CartBackendKind::Embedded => "embedded",
            CartBackendKind::Redis => "redis",
        }
    }

    /// The cart store that runs with a database in production: Redis with
    /// Postgres (when a test Redis is configured), embedded with SQLite.
    pub fn paired_with(database: BackendKind) -> Self {
        if database == BackendKind::Postgres && redis_url().is_some() {
            CartBackendKind::Redis
        } else {
            CartBackendKind::Embedded
        }
    }

    /// The database each cart backend runs with: the embedded default pairs
    /// SQLite with the embedded cart store; Redis pairs with Postgres when it
    /// is configured, as in production.
    fn database(self) -> BackendKind {
        match self {
            CartBackendKind::Redis if postgres_url().is_some() => BackendKind::Postgres,
            _ => BackendKind::Sqlite,
        }
    }
}

/// A cart store for one test: Redis keys under a prefix of its own, deleted
/// again by [`TestCartStore::remove`].
pub struct TestCartStore {
    pub kind: CartBackendKind,
    /// The configuration that opens this store again (another "process").
    pub config: commerce_kernel::carts::CartBackendConfig,
    pub store: Arc<dyn commerce_kernel::carts::CartStore>,
}

impl TestCartStore {
    pub async fn create(kind: CartBackendKind) -> anyhow::Result<Self> {
        use commerce_kernel::carts::CartBackendConfig;
        let config = match kind {
            CartBackendKind::Embedded => CartBackendConfig::Embedded,
            CartBackendKind::Redis => CartBackendConfig::Redis {
                url: redis_url().with_context(|| format!("{TEST_REDIS_URL} is not set"))?,
                key_prefix: format!("test:{}:", uuid::Uuid::new_v4().simple()),
            },
        };
        Self::open(kind, config).await
    }

    /// Opens the store `config` describes (again, as another process would).
    pub async fn open(
        kind: CartBackendKind,
        config: commerce_kernel::carts::CartBackendConfig,
    ) -> anyhow::Result<Self> {
        let store = commerce_kernel::carts::open(&config)
            .await
            .with_context(|| format!("opening the {} cart store", kind.name()))?;
        Ok(TestCartStore {
            kind,
            config,
            store,
        })
    }

    /// Deletes every key the test wrote.
    pub async fn remove(self) -> anyhow::Result<()> {
        let commerce_kernel::carts::CartBackendConfig::Redis { url, key_prefix } = self.config
        else {
            return Ok(());
        };
        let client = redis::Client::open(url.as_str())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{key_prefix}*"))
            .query_async(&mut connection)
            .await?;
        if !keys.is_empty() {
            redis::cmd("DEL")
                .arg(keys)
                .query_async::<()>(&mut connection)
                .await?;
        }
        Ok(())
    }
}

/// A test of the cart suite: a fresh database and cart store.
pub type CartCase = fn(
    Arc<TestDatabase>,
    Arc<TestCartStore>,
) -> std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// `cart_cases![a, b, ...]`: like [`cases!`], for [`run_cart_suite`].
#[allow(unused_macros)]
macro_rules! cart_cases {
    ($($name:ident),* $(,)?) => {
        [$((stringify!($name), (|db, carts| Box::pin($name(db, carts))) as $crate::support::CartCase)),*]
    };
}

/// Runs every case against every cart backend, as `<cart backend>::<case>`.
/// Redis cases are reported as ignored when `COMMERCE_TEST_REDIS_URL` is unset.
pub fn run_cart_suite(cases: &[(&'static str, CartCase)]) -> ! {
    run_trials(|| {
        let redis_configured = redis_url().is_some();
        let mut trials = Vec::new();
        for kind in [CartBackendKind::Embedded, CartBackendKind::Redis] {
            for &(name, case) in cases {
                let available = kind == CartBackendKind::Embedded || redis_configured;
                trials.push(
                    Trial::test(format!("{}::{name}", kind.name()), move || {
                        run_cart_case(kind, case)
                    })
                    .with_ignored_flag(!available),
                );
            }
        }
        trials
    })
}

fn run_cart_case(kind: CartBackendKind, case: CartCase) -> Result<(), Failed> {
    block_on(async move {
        let setup = |e: anyhow::Error| Failed::from(format!("setting up {}: {e:#}", kind.name()));
        let database = Arc::new(TestDatabase::create(kind.database()).await.map_err(setup)?);
        let carts = Arc::new(TestCartStore::create(kind).await.map_err(setup)?);
        let outcome = case(Arc::clone(&database), Arc::clone(&carts)).await;
        // Keep a failed test's data for inspection; remove a passed one's.
        if outcome.is_ok() {
            let cleanup = |e: anyhow::Error| Failed::from(format!("cleanup: {e:#}"));
            if let Ok(carts) = Arc::try_unwrap(carts) {
                carts.remove().await.map_err(cleanup)?;
            }
            if let Ok(database) = Arc::try_unwrap(database) {
                database.remove().await.map_err(cleanup)?;
            }
        }
        outcome.map_err(|e| Failed::from(format!("{e:#}")))
    })
}
