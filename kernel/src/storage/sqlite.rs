//! The embedded backend: one SQLite file, so a first `cargo run` needs nothing
//! else running.
//!
//! SQLite admits one writer at a time. The kernel funnels all writes through a
//! single-connection pool and starts each with `BEGIN IMMEDIATE`, which takes the
//! write lock up front: a read-then-write transaction then never fails to upgrade,
//! even if another process opens the same file. Because writes are serial, the
//! allocation order of events is their commit order and the global log has no
//! gaps for a reader to skip. Reads use a separate pool and run in parallel (WAL).

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};
use uuid::Uuid;

use crate::event_store::{
    AppendOutcome, AppendRequest, Backend, EventFilter, EventMetadata, EventStore, Position,
    RecordedEvent, StoreError, StreamSelection, StreamVersion, validate, validate_stream_ids,
};
use crate::storage::{EVENT_COLUMNS, log_count_query, log_query};

const READ_CONNECTIONS: u32 = 4;
/// How long a writer waits for another process's write lock on the same file.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The pools of one SQLite database file.
#[derive(Clone, Debug)]
pub struct SqliteDatabase {
    writer: SqlitePool,
    reader: SqlitePool,
    path: PathBuf,
}

impl SqliteDatabase {
    /// Opens (creating if needed) the database file and its parent directory.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Database(sqlx::Error::Configuration(
                    format!("cannot create {}: {e}", parent.display()).into(),
                ))
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a committed append survives power loss, not only a process crash.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(READ_CONNECTIONS)
            .connect_with(options)
            .await?;
        Ok(SqliteDatabase {
            writer,
            reader,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("../migrations/sqlite")
            .run(&self.writer)
            .await?;
        Ok(())
    }

    /// The pool for reads, which run in parallel with the writer (WAL).
    pub fn reader(&self) -> &SqlitePool {
        &self.reader
    }

    /// The single writer connection, for a write of one statement (which
    /// SQLite commits on its own).
    pub fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    /// Starts a write transaction holding SQLite's write lock. Every other
    /// writer waits until it commits or rolls back, so keep it short.
    pub async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }

    pub fn event_store(&self) -> SqliteEventStore {
        SqliteEventStore {
            database: self.clone(),
        }
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }
}

/// [`EventStore`] on SQLite.
#[derive(Clone, Debug)]
pub struct SqliteEventStore {
    database: SqliteDatabase,
}

impl SqliteEventStore {
    /// Appends on `connection`, which must be inside a write transaction (see
    /// [`SqliteDatabase::begin_write`]); the events commit with it.
    pub async fn append_in(
        connection: &mut SqliteConnection,
        request: AppendRequest,
    ) -> Result<AppendOutcome, StoreError> {
        validate(&request)?;
        if let Some(key) = &request.idempotency_key
            && let Some(outcome) = replay(connection, key).await?
        {
            return Ok(outcome);
        }

        for stream in &request.streams {
            let current: Option<(String, i64)> = sqlx::query_as(
                "SELECT aggregate_type, version FROM streams WHERE aggregate_id = ?",
            )
            .bind(stream.aggregate_id)
            .fetch_optional(&mut *connection)
            .await?;
            let new_version = i64::from(stream.expected_version) + stream.events.len() as i64;
            match current {
                Some((existing, _)) if existing != stream.aggregate_type => {
                    return Err(StoreError::AggregateTypeMismatch {
                        aggregate_id: stream.aggregate_id,
                        existing,
                        requested: stream.aggregate_type.clone(),
                    });
                }
                Some((_, actual)) if actual != i64::from(stream.expected_version) => {
                    return Err(StoreError::VersionConflict {
                        aggregate_id: stream.aggregate_id,
                        expected: stream.expected_version,
                        actual: u32::try_from(actual).unwrap_or(0),
                    });
                }
                Some(_) => {
                    sqlx::query("UPDATE streams SET version = ? WHERE aggregate_id = ?")
                        .bind(new_version)
                        .bind(stream.aggregate_id)
                        .execute(&mut *connection)
                        .await?;
                }
                None if stream.expected_version != 0 => {
                    return Err(StoreError::VersionConflict {
                        aggregate_id: stream.aggregate_id,
                        expected: stream.expected_version,
                        actual: 0,
                    });
                }
                None => {
                    sqlx::query(
                        "INSERT INTO streams (aggregate_id, aggregate_type, version) VALUES (?, ?, ?)",
                    )
                    .bind(stream.aggregate_id)
                    .bind(&stream.aggregate_type)
                    .bind(new_version)
                    .execute(&mut *connection)
                    .await?;
                }
            }
        }

        let transaction_id: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(transaction_id), 0) + 1 FROM events")
                .fetch_one(&mut *connection)
                .await?;
        let created_at = Utc::now().timestamp_micros();
        let trace_parent = request.metadata.trace_parent.map(|trace| trace.to_string());
        let mut last_sequence = 0;
        for stream in &request.streams {
            for (offset, event) in stream.events.iter().enumerate() {
                let version = i64::from(stream.expected_version) + offset as i64 + 1;
                let inserted = sqlx::query_scalar(
                    "INSERT INTO events (transaction_id, id, aggregate_id, aggregate_type, event_type, \
                         schema_version, event_data, version, correlation_id, causation_id, actor, \
                         trace_parent, created_at) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING sequence",
                )
                .bind(transaction_id)
                .bind(event.id)
                .bind(stream.aggregate_id)
                .bind(&stream.aggregate_type)
                .bind(&event.event_type)
                .bind(i64::from(event.schema_version))
                .bind(event.data.to_string())
                .bind(version)
                .bind(request.metadata.correlation_id)
                .bind(request.metadata.causation_id)
                .bind(&request.metadata.actor)
                .bind(trace_parent.as_deref())
                .bind(created_at)
                .fetch_one(&mut *connection)
                .await;
                last_sequence = inserted.map_err(|error| insert_error(error, event.id))?;
            }
        }

        let stream_versions = request.resulting_versions();
        if let Some(key) = &request.idempotency_key {
            // Validation guarantees at least one stream; the last one holds the last event.
            let last = stream_versions
                .last()
                .map_or((Uuid::nil(), 0), |v| (v.aggregate_id, v.version));
            let stored = serde_json::to_string(&stream_versions)
                .map_err(|e| StoreError::Codec(e.to_string()))?;
            sqlx::query(
                "INSERT INTO idempotency_keys (key, stream_versions, last_aggregate_id, last_version, created_at) \
                 VALUES (?, ?, ?, ?, ?)",
            )
            .bind(key)
            .bind(stored)
            .bind(last.0)
            .bind(i64::from(last.1))
            .bind(created_at)
            .execute(&mut *connection)
            .await?;
        }

        Ok(AppendOutcome {
            stream_versions,
            last_position: Position {
                transaction_id,
                sequence: last_sequence,
            },
            replayed: false,
        })
    }
}

/// The stored outcome of an earlier append with `key`, if there was one.
async fn replay(
    connection: &mut SqliteConnection,
    key: &str,
) -> Result<Option<AppendOutcome>, StoreError> {
    let stored: Option<(String, i64, i64)> = sqlx::query_as(
        "SELECT k.stream_versions, e.transaction_id, e.sequence FROM idempotency_keys k \
         JOIN events e ON e.aggregate_id = k.last_aggregate_id AND e.version = k.last_version \
         WHERE k.key = ?",
    )
    .bind(key)
    .fetch_optional(&mut *connection)
    .await?;
    let Some((versions, transaction_id, sequence)) = stored else {
        return Ok(None);
    };
    let stream_versions: Vec<StreamVersion> = serde_json::from_str(&versions)
        .map_err(|e| StoreError::Corrupt(format!("idempotency record {key}: {e}")))?;
    Ok(Some(AppendOutcome {
        stream_versions,
        last_position: Position {
            transaction_id,
            sequence,
        },
        replayed: true,
    }))
}

fn insert_error(error: sqlx::Error, event_id: Uuid) -> StoreError {
    let duplicate_id = error
        .as_database_error()
        .is_some_and(|e| e.is_unique_violation() && e.message().contains("events.id"));
    if duplicate_id {
        StoreError::invalid(
            "id",
            format!("an event with id {event_id} is already stored"),
        )
    } else {
        StoreError::Database(error)
    }
}

#[derive(sqlx::FromRow)]
struct EventRow {
    sequence: i64,
    transaction_id: i64,
    id: Uuid,
    aggregate_id: Uuid,
    aggregate_type: String,
    event_type: String,
    schema_version: i64,
    event_data: String,
    version: i64,
    correlation_id: Option<Uuid>,
    causation_id: Option<Uuid>,
    actor: Option<String>,
    created_at: i64,
    trace_parent: Option<String>,
}

impl TryFrom<EventRow> for RecordedEvent {
    type Error = StoreError;

    fn try_from(row: EventRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("event {}: {what}", row.id));
        Ok(RecordedEvent {
            id: row.id,
            position: Position {
                transaction_id: row.transaction_id,
                sequence: row.sequence,
            },
            aggregate_id: row.aggregate_id,
            aggregate_type: row.aggregate_type,
            event_type: row.event_type,
            schema_version: u32::try_from(row.schema_version)
                .map_err(|_| corrupt("schema version out of range"))?,
            data: serde_json::from_str(&row.event_data).map_err(|_| corrupt("data is not JSON"))?,
            version: u32::try_from(row.version).map_err(|_| corrupt("version out of range"))?,
            metadata: EventMetadata {
                correlation_id: row.correlation_id,
                causation_id: row.causation_id,
                actor: row.actor,
                // Written by the kernel; anything else reads as none.
                trace_parent: row.trace_parent.and_then(|text| text.parse().ok()),
            },
            created_at: DateTime::from_timestamp_micros(row.created_at)
                .ok_or_else(|| corrupt("timestamp out of range"))?,
        })
    }
}

fn to_recorded(rows: Vec<EventRow>) -> Result<Vec<RecordedEvent>, StoreError> {
    rows.into_iter().map(RecordedEvent::try_from).collect()
}

#[async_trait]
impl EventStore for SqliteEventStore {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        let mut transaction = self.database.begin_write().await?;
        let outcome = Self::append_in(&mut transaction, request).await?;
        transaction.commit().await?;
        Ok(outcome)
    }

    async fn read_stream(
        &self,
        aggregate_id: Uuid,
        selection: StreamSelection,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows: Vec<EventRow> = sqlx::query_as(&format!(
            "SELECT {EVENT_COLUMNS} FROM events \
             WHERE aggregate_id = ?1 \
               AND (?2 IS NULL OR version <= ?2) \
               AND (?3 IS NULL OR created_at <= ?3) \
               AND (?4 IS NULL OR version > ?4) \
             ORDER BY version"
        ))
        .bind(aggregate_id)
        .bind(selection.to_version.map(i64::from))
        .bind(selection.until.map(|t| t.timestamp_micros()))
        .bind(selection.after_version.map(i64::from))
        .fetch_all(&self.database.reader)
        .await?;
        to_recorded(rows)
    }

    async fn read_streams(&self, aggregate_ids: &[Uuid]) -> Result<Vec<RecordedEvent>, StoreError> {
        validate_stream_ids(aggregate_ids)?;
        if aggregate_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut query = sqlx::QueryBuilder::<Sqlite>::new(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE aggregate_id IN ("
        ));
        let mut ids = query.separated(", ");
        for id in aggregate_ids {
            ids.push_bind(*id);
        }
        query.push(") ORDER BY aggregate_id, version");
        let rows: Vec<EventRow> = query
            .build_query_as()
            .fetch_all(&self.database.reader)
            .await?;
        to_recorded(rows)
    }

    async fn read_streams_after(
        &self,
        streams: &[(Uuid, u32)],
    ) -> Result<Vec<(RecordedEvent, bool)>, StoreError> {
        let ids: Vec<Uuid> = streams.iter().map(|(id, _)| *id).collect();
        validate_stream_ids(&ids)?;
        if streams.is_empty() {
            return Ok(Vec::new());
        }
        let mut query =
            sqlx::QueryBuilder::<Sqlite>::new(format!("SELECT {EVENT_COLUMNS} FROM events WHERE "));
        for (index, (aggregate_id, version)) in streams.iter().enumerate() {
            if index > 0 {
                query.push(" OR ");
            }
            query
                .push("(aggregate_id = ")
                .push_bind(*aggregate_id)
                .push(" AND version > ")
                .push_bind(i64::from(*version))
                .push(")");
        }
        query.push(" ORDER BY transaction_id, sequence");
        let rows: Vec<EventRow> = query
            .build_query_as()
            .fetch_all(&self.database.reader)
            .await?;
        // One writer: whatever is committed is readable (as in the log read).
        Ok(to_recorded(rows)?
            .into_iter()
            .map(|event| (event, true))
            .collect())
    }

    async fn read_all_matching(
        &self,
        filter: &EventFilter,
        after: Position,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut query = log_query::<Sqlite>(filter, after, limit, "TRUE");
        let rows: Vec<EventRow> = query
            .build_query_as()
            .fetch_all(&self.database.reader)
            .await?;
        to_recorded(rows)
    }

    async fn count_matching(&self, filter: &EventFilter) -> Result<u64, StoreError> {
        let count: i64 = log_count_query::<Sqlite>(filter, "TRUE")
            .build_query_scalar()
            .fetch_one(&self.database.reader)
            .await?;
        Ok(count.max(0) as u64)
    }

    async fn head(&self) -> Result<Position, StoreError> {
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT transaction_id, sequence FROM events \
             ORDER BY transaction_id DESC, sequence DESC LIMIT 1",
        )
        .fetch_optional(&self.database.reader)
        .await?;
        Ok(
            row.map_or(Position::START, |(transaction_id, sequence)| Position {
                transaction_id,
                sequence,
            }),
        )
    }

    async fn stream_version(&self, aggregate_id: Uuid) -> Result<u32, StoreError> {
        let version: Option<i64> =
            sqlx::query_scalar("SELECT version FROM streams WHERE aggregate_id = ?")
                .bind(aggregate_id)
                .fetch_optional(&self.database.reader)
                .await?;
        u32::try_from(version.unwrap_or(0)).map_err(|_| {
            StoreError::Corrupt(format!("stream {aggregate_id}: version out of range"))
        })
    }
}
