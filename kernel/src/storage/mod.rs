//! Storage backends: PostgreSQL for production, SQLite as the embedded default.
//!
//! [`Database`] owns the connection pools and migrations of one backend and
//! hands out the adapters built on it (today the [`EventStore`]). Which backend
//! runs is decided once, from configuration ([`DatabaseConfig`]).

pub mod postgres;
pub mod sqlite;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;

use crate::event_store::{Backend, EventStore, StoreError};

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
