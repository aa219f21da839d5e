//! Storage backends: PostgreSQL for production, SQLite as the embedded default.
//!
//! [`Database`] owns the connection pools and migrations of one backend and
//! hands out the adapters built on it (the [`EventStore`], the read models'
//! [`ViewStore`], the cart lifecycle record and the saga instances). Which backend
//! runs is decided once, from configuration ([`DatabaseConfig`]).

mod batcher;
pub mod cart_activity;
pub mod connection_shelf;
pub mod maintenance;
pub mod postgres;
pub mod postgres_views;
mod saga_commits;
pub mod sagas;
pub mod sqlite;
pub mod sqlite_views;
pub mod stream_reads;
mod views;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Encode, QueryBuilder, Type};
use uuid::Uuid;

use crate::carts::CartActivityLog;
use crate::event_store::{Backend, EventFilter, EventStore, Position, StoreError, clamp_limit};
use crate::projections::ViewStore;
use crate::sagas::SagaStore;

/// Where the kernel keeps its data.
#[derive(Clone, Debug)]
pub enum DatabaseConfig {
    /// A PostgreSQL server. Several kernel processes may share one.
    Postgres {
        options: Box<PgConnectOptions>,
        max_connections: u32,
    },
    /// An SQLite file, created if missing, used by this process.
    Sqlite { path: PathBuf },
}

impl DatabaseConfig {
    /// Which database this is, for messages: the SQLite file, or the
    /// Postgres server and database (never the password).
    pub fn describe(&self) -> String {
        match self {
            DatabaseConfig::Postgres { options, .. } => format!(
                "postgres://{}:{}/{}",
                options.get_host(),
                options.get_port(),
                options.get_database().unwrap_or_default()
            ),
            DatabaseConfig::Sqlite { path } => path.display().to_string(),
        }
    }
}

/// An open backend: its pools, ready for migrations and adapters.
#[derive(Clone)]
pub enum Database {
    Postgres(postgres::PostgresDatabase),
    Sqlite(sqlite::SqliteDatabase),
}

impl Database {
    /// Opens the backend named by `config`. Does not run migrations.
    pub async fn connect(config: &DatabaseConfig) -> Result<Self, StoreError> {
        match config {
            DatabaseConfig::Postgres {
                options,
                max_connections,
            } => Ok(Database::Postgres(
                postgres::PostgresDatabase::connect((**options).clone(), *max_connections).await?,
            )),
            DatabaseConfig::Sqlite { path } => {
                Ok(Database::Sqlite(sqlite::SqliteDatabase::open(path).await?))
            }
        }
    }

    /// Brings the schema up to date. Safe to run from several processes at once.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Database::Postgres(db) => db.migrate().await,
            Database::Sqlite(db) => db.migrate().await,
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Database::Postgres(_) => Backend::Postgres,
            Database::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// The event store on this backend.
    pub fn event_store(&self) -> Arc<dyn EventStore> {
        match self {
            Database::Postgres(db) => Arc::new(db.event_store()),
            Database::Sqlite(db) => Arc::new(db.event_store()),
        }
    }

    /// The read models on this backend.
    pub fn view_store(&self) -> Arc<dyn ViewStore> {
        match self {
            Database::Postgres(db) => Arc::new(postgres_views::PostgresViewStore::new(
                db.connections().clone(),
            )),
            Database::Sqlite(db) => Arc::new(sqlite_views::SqliteViewStore::new(db.clone())),
        }
    }

    /// The durable record of cart lifecycles on this backend.
    pub fn cart_activity(&self) -> Arc<dyn CartActivityLog> {
        match self {
            Database::Postgres(db) => {
                Arc::new(cart_activity::PostgresCartActivity::new(db.clone()))
            }
            Database::Sqlite(db) => Arc::new(cart_activity::SqliteCartActivity::new(db.clone())),
        }
    }

    /// Saga instances (work queue, leases, index) on this backend.
    pub fn saga_store(&self) -> Arc<dyn SagaStore> {
        match self {
            Database::Postgres(db) => Arc::new(sagas::PostgresSagaStore::new(db.clone())),
            Database::Sqlite(db) => Arc::new(sagas::SqliteSagaStore::new(db.clone())),
        }
    }

    /// The runbook's pruning of what the kernel keeps beside the log.
    pub fn maintenance(&self) -> maintenance::StoreMaintenance {
        maintenance::StoreMaintenance::new(self.clone())
    }

    /// Round trip to the database, for health checks.
    pub async fn ping(&self) -> Result<Duration, StoreError> {
        let started = std::time::Instant::now();
        match self {
            Database::Postgres(db) => db.ping().await?,
            Database::Sqlite(db) => db.ping().await?,
        }
        Ok(started.elapsed())
    }

    /// Waits for checked-out connections to come back, then closes every pool.
    pub async fn close(&self) {
        match self {
            Database::Postgres(db) => db.close().await,
            Database::Sqlite(db) => db.close().await,
        }
    }
}

/// Columns every event read selects, in the order the backends' rows declare them.
pub(crate) const EVENT_COLUMNS: &str = "sequence, transaction_id, id, aggregate_id, aggregate_type, \
     event_type, schema_version, event_data, version, correlation_id, causation_id, actor, created_at, \
     trace_parent";

/// The read of the global log both backends run: events after `after` that
/// match `filter`, in log order. `visible` is the backend's extra condition
/// for which events may be read yet (see `postgres::READABLE`).
pub(crate) fn log_query<'args, DB>(
    filter: &EventFilter,
    after: Position,
    limit: u32,
    visible: &str,
) -> QueryBuilder<'args, DB>
where
    DB: sqlx::Database,
    i64: Encode<'args, DB> + Type<DB>,
    Uuid: Encode<'args, DB> + Type<DB>,
    String: Encode<'args, DB> + Type<DB>,
{
    let mut query = filtered_log::<DB>(EVENT_COLUMNS, filter, after, visible);
    query
        .push(" ORDER BY transaction_id, sequence LIMIT ")
        .push_bind(clamp_limit(limit));
    query
}

/// `SELECT count(*)` of the readable events matching `filter`.
pub(crate) fn log_count_query<'args, DB>(
    filter: &EventFilter,
    visible: &str,
) -> QueryBuilder<'args, DB>
where
    DB: sqlx::Database,
    i64: Encode<'args, DB> + Type<DB>,
    Uuid: Encode<'args, DB> + Type<DB>,
    String: Encode<'args, DB> + Type<DB>,
{
    filtered_log::<DB>("count(*)", filter, Position::START, visible)
}

fn filtered_log<'args, DB>(
    columns: &str,
    filter: &EventFilter,
    after: Position,
    visible: &str,
) -> QueryBuilder<'args, DB>
where
    DB: sqlx::Database,
    i64: Encode<'args, DB> + Type<DB>,
    Uuid: Encode<'args, DB> + Type<DB>,
    String: Encode<'args, DB> + Type<DB>,
{
    let mut query = QueryBuilder::new(format!(
        "SELECT {columns} FROM events WHERE {visible} AND (transaction_id, sequence) > ("
    ));
    query
        .push_bind(after.transaction_id)
        .push(", ")
        .push_bind(after.sequence)
        .push(")");
    if let Some(aggregate_id) = filter.aggregate_id {
        query.push(" AND aggregate_id = ").push_bind(aggregate_id);
    }
    if let Some(aggregate_type) = &filter.aggregate_type {
        query
            .push(" AND aggregate_type = ")
            .push_bind(aggregate_type.clone());
    }
    if !filter.any_aggregate_type.is_empty() {
        query.push(" AND aggregate_type IN (");
        let mut types = query.separated(", ");
        for aggregate_type in &filter.any_aggregate_type {
            types.push_bind(aggregate_type.clone());
        }
        query.push(")");
    }
    if let Some(event_type) = &filter.event_type {
        query
            .push(" AND event_type = ")
            .push_bind(event_type.clone());
    }
    if let Some(correlation_id) = filter.correlation_id {
        query
            .push(" AND correlation_id = ")
            .push_bind(correlation_id);
    }
    query
}
