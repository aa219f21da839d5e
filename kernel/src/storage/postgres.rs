//! The PostgreSQL backend: production storage, shared by every kernel process.
//!
//! # Reading the global log without gaps
//!
//! Identity values are allocated before commit, so event 102 can become visible
//! before event 101. Each event therefore records the id of its writing
//! transaction (`pg_current_xact_id()`), and [`read_all`](PostgresEventStore)
//! returns only events of transactions older than the oldest one still running
//! (`pg_snapshot_xmin`), ordered by `(transaction_id, sequence)`. Every
//! transaction below that horizon has finished, so no event can later appear
//! before a position a reader has already passed. The cost: a long-running
//! transaction anywhere in the cluster pauses readers, which is why the pool
//! sets `idle_in_transaction_session_timeout`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::connection_shelf::{ConnectionShelf, SHELF_IDLE_LIMIT};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Postgres;
use sqlx::postgres::{PgConnectOptions, PgDatabaseError, PgExecutor, PgPool, PgPoolOptions};
use uuid::Uuid;

use crate::event_store::{
    AppendOutcome, AppendRequest, Backend, EventFilter, EventMetadata, EventStore, NewEvent,
    Position, RecordedEvent, StoreError, StreamSelection, StreamVersion, validate,
    validate_stream_ids,
};
use crate::storage::stream_reads::{StreamReadBatcher, StreamsAfter};
use crate::storage::{EVENT_COLUMNS, log_count_query, log_query};

/// How long a session may sit idle inside a transaction before Postgres ends it.
/// An open transaction holds back the read horizon of the global log.
const IDLE_IN_TRANSACTION_TIMEOUT_MS: &str = "30000";
/// A pooled connection idle this long is pinged before it is handed out.
const PING_AFTER_IDLE: Duration = Duration::from_secs(5);

/// SQLSTATEs raised by `append_events` (migrations/postgres).
const VERSION_CONFLICT_STATE: &str = "CK001";
const TYPE_MISMATCH_STATE: &str = "CK002";
const UNIQUE_VIOLATION_STATE: &str = "23505";

/// Connection pool and migrations for one Postgres database.
#[derive(Clone, Debug)]
pub struct PostgresDatabase {
    connections: ConnectionShelf,
    /// Shared by every event store of this database, so that all of the
    /// process's stream reads can be merged.
    stream_reads: Arc<StreamReadBatcher<PostgresStreamReads>>,
}

impl PostgresDatabase {
    /// Opens a pool and checks that the server answers.
    pub async fn connect(
        options: PgConnectOptions,
        max_connections: u32,
    ) -> Result<Self, StoreError> {
        let options = options.application_name("commerce-kernel").options([(
            "idle_in_transaction_session_timeout",
            IDLE_IN_TRANSACTION_TIMEOUT_MS,
        )]);
        // A ping before every use costs a round trip per statement: only a
        // connection idle for a while is pinged (a restart or failover
        // usually shows there), within the acquire timeout. One the server
        // dropped while busy fails its next statement, which every caller
        // handles as a store error (and sqlx then closes it).
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .test_before_acquire(false)
            .before_acquire(|connection, metadata| {
                Box::pin(async move {
                    if metadata.idle_for >= PING_AFTER_IDLE {
                        sqlx::Connection::ping(connection).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options)
            .await?;
        Ok(Self::from_pool(pool))
    }

    /// Wraps an existing pool (tests and tools that manage their own).
    pub fn from_pool(pool: PgPool) -> Self {
        // At most half the pool idle on the shelf, out of reach of
        // transactions (which take theirs from the pool).
        let shelf_capacity = (pool.options().get_max_connections() / 2) as usize;
        let connections = ConnectionShelf::new(pool, shelf_capacity, SHELF_IDLE_LIMIT);
        PostgresDatabase {
            stream_reads: Arc::new(StreamReadBatcher::new(PostgresStreamReads {
                connections: connections.clone(),
            })),
            connections,
        }
    }

    /// The pool: for transactions, migrations and tests.
    pub fn pool(&self) -> &PgPool {
        self.connections.pool()
    }

    /// Where single statements take their connection (see
    /// [`ConnectionShelf`]).
    pub fn connections(&self) -> &ConnectionShelf {
        &self.connections
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        // sqlx serialises concurrent migrators with an advisory lock.
        sqlx::migrate!("../migrations/postgres")
            .run(self.pool())
            .await?;
        Ok(())
    }

    pub fn event_store(&self) -> PostgresEventStore {
        PostgresEventStore {
            connections: self.connections.clone(),
            stream_reads: Arc::clone(&self.stream_reads),
        }
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.connections).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.connections.close().await;
    }
}

/// [`EventStore`] on Postgres.
#[derive(Clone, Debug)]
pub struct PostgresEventStore {
    connections: ConnectionShelf,
    stream_reads: Arc<StreamReadBatcher<PostgresStreamReads>>,
}

impl PostgresEventStore {
    /// Appends through `executor`, which may be an open transaction: the events
    /// then commit (and become readable) with it (the test suites hold an
    /// append open this way). The saga store writes its rows with events by
    /// a gated append instead ([`Self::append_gated`]), in one statement.
    pub async fn append_with<'c>(
        executor: impl PgExecutor<'c>,
        request: AppendRequest,
    ) -> Result<AppendOutcome, StoreError> {
        validate(&request)?;
        let resulting_versions = request.resulting_versions();
        let mut args = AppendArguments::from_request(request);
        let (stream_ids, expected_versions) =
            (args.stream_ids.clone(), args.expected_versions.clone());
        let query = sqlx::query_as(
            "SELECT replayed, transaction_id, sequence, stream_versions \
             FROM append_events($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(args.idempotency_key.take());
        let row: Option<(bool, i64, i64, Option<Value>)> = args
            .bind_to(query)
            .fetch_optional(executor)
            .await
            .map_err(|error| append_error(error, &stream_ids, &expected_versions))?;

        let Some((replayed, transaction_id, sequence, stored_versions)) = row else {
            return Err(StoreError::Corrupt(
                "append_events returned no row: the idempotency record names a missing event"
                    .into(),
            ));
        };
        let stream_versions = match (replayed, stored_versions) {
            (false, _) => resulting_versions,
            (true, Some(stored)) => serde_json::from_value::<Vec<StreamVersion>>(stored)
                .map_err(|e| StoreError::Corrupt(format!("idempotency record: {e}")))?,
            (true, None) => {
                return Err(StoreError::Corrupt(
                    "idempotency record without versions".into(),
                ));
            }
        };
        Ok(AppendOutcome {
            stream_versions,
            last_position: Position {
                transaction_id,
                sequence,
            },
            replayed,
        })
    }
}

/// Appends a batch to one stream with one plain statement: the events are
/// inserted only if the stream is at the expected version ($3): event $3
/// exists with the stream's type, or $3 = 0. A stream ahead of $3 fails on
/// `UNIQUE (aggregate_id, version)`; a stream behind it, or of another type,
/// inserts nothing. Both become typed errors through [`stream_conflict`].
///
/// [`stream_conflict`]: PostgresEventStore::stream_conflict
const APPEND_BATCH_TO_STREAM: &str = "\
WITH inserted AS (
    INSERT INTO events (id, aggregate_id, aggregate_type, event_type, schema_version, event_data,
                        version, correlation_id, causation_id, actor, trace_parent, created_at)
    SELECT e.id, $1, $2, e.event_type, e.schema_version, e.event_data,
           $3 + e.ord::integer, $8, $9, $10, $11, statement_timestamp()
    FROM unnest($4::uuid[], $5::text[], $6::integer[], $7::jsonb[])
             WITH ORDINALITY AS e(id, event_type, schema_version, event_data, ord)
    WHERE $3 = 0 OR EXISTS (
        SELECT 1 FROM events p
        WHERE p.aggregate_id = $1 AND p.version = $3 AND p.aggregate_type = $2)
    ORDER BY e.ord
    RETURNING transaction_id, sequence
)
SELECT max(transaction_id), max(sequence) FROM inserted";

/// The row both single-stream statements return: the last inserted event's
/// `(transaction_id, sequence)`, NULL when nothing was inserted.
type LastPosition = (Option<i64>, Option<i64>);

/// [`APPEND_BATCH_TO_STREAM`] for a single event, with scalar parameters: the
/// most frequent append, and measurably cheaper to bind and plan than arrays.
const APPEND_ONE_TO_STREAM: &str = "\
INSERT INTO events (id, aggregate_id, aggregate_type, event_type, schema_version, event_data,
                    version, correlation_id, causation_id, actor, trace_parent, created_at)
SELECT $4::uuid, $1, $2, $5::text, $6::integer, $7::jsonb,
       $3 + 1, $8, $9, $10, $11, statement_timestamp()
WHERE $3 = 0 OR EXISTS (
    SELECT 1 FROM events p
    WHERE p.aggregate_id = $1 AND p.version = $3 AND p.aggregate_type = $2)
RETURNING transaction_id, sequence";

/// The constraint that makes a second writer at the same version fail.
const STREAM_VERSION_CONSTRAINT: &str = "events_aggregate_id_version_key";

impl PostgresEventStore {
    /// The common append (one stream, no idempotency key) in one round trip,
    /// without `append_events`' procedural overhead. Needs the pool rather than
    /// any executor: on a conflict it reads the stream's actual version, which
    /// an aborted caller's transaction could not.
    async fn append_single_stream(
        &self,
        request: AppendRequest,
    ) -> Result<AppendOutcome, StoreError> {
        validate(&request)?;
        let resulting_versions = request.resulting_versions();
        let Some(stream) = request.streams.into_iter().next() else {
            return Err(StoreError::invalid("streams", "an append needs a stream"));
        };
        let expected = stream.expected_version as i32;
        let metadata = request.metadata;
        let query = match <[NewEvent; 1]>::try_from(stream.events) {
            Ok([event]) => sqlx::query_as(APPEND_ONE_TO_STREAM)
                .bind(stream.aggregate_id)
                .bind(&stream.aggregate_type)
                .bind(expected)
                .bind(event.id)
                .bind(event.event_type)
                .bind(event.schema_version as i32)
                .bind(event.data),
            Err(events) => {
                let mut ids = Vec::with_capacity(events.len());
                let mut types = Vec::with_capacity(events.len());
                let mut schema_versions = Vec::with_capacity(events.len());
                let mut data = Vec::with_capacity(events.len());
                for event in events {
                    ids.push(event.id);
                    types.push(event.event_type);
                    schema_versions.push(event.schema_version as i32);
                    data.push(event.data);
                }
                sqlx::query_as(APPEND_BATCH_TO_STREAM)
                    .bind(stream.aggregate_id)
                    .bind(&stream.aggregate_type)
                    .bind(expected)
                    .bind(ids)
                    .bind(types)
                    .bind(schema_versions)
                    .bind(data)
            }
        };
        // Both statements yield the last event's position; none means nothing
        // was inserted (the batch one returns a row of NULLs then).
        let result: Result<Option<LastPosition>, sqlx::Error> = query
            .bind(metadata.correlation_id)
            .bind(metadata.causation_id)
            .bind(metadata.actor)
            .bind(metadata.trace_parent.map(|trace| trace.to_string()))
            .fetch_optional(&self.connections)
            .await;
        match result {
            Ok(Some((Some(transaction_id), Some(sequence)))) => Ok(AppendOutcome {
                stream_versions: resulting_versions,
                last_position: Position {
                    transaction_id,
                    sequence,
                },
                replayed: false,
            }),
            // Nothing inserted: the stream is behind `expected` or of another type.
            Ok(_) => Err(Self::stream_conflict(
                &self.connections,
                stream.aggregate_id,
                &stream.aggregate_type,
                expected,
            )
            .await),
            // The stream is ahead: a concurrent writer took the next version.
            Err(error) if is_stream_version_taken(&error) => Err(Self::stream_conflict(
                &self.connections,
                stream.aggregate_id,
                &stream.aggregate_type,
                expected,
            )
            .await),
            Err(error) => Err(append_error(error, &[stream.aggregate_id], &[expected])),
        }
    }

    /// Why an append to `aggregate_id` as a `requested_type` at version
    /// `expected` did not apply, as the stream stands now.
    async fn stream_conflict(
        connections: &ConnectionShelf,
        aggregate_id: Uuid,
        requested_type: &str,
        expected: i32,
    ) -> StoreError {
        let latest: Result<Option<(i32, String)>, sqlx::Error> = sqlx::query_as(
            "SELECT version, aggregate_type FROM events \
             WHERE aggregate_id = $1 ORDER BY version DESC LIMIT 1",
        )
        .bind(aggregate_id)
        .fetch_optional(connections)
        .await;
        match latest {
            Err(error) => StoreError::Database(error),
            Ok(latest) => conflict_of(aggregate_id, requested_type, expected, latest),
        }
    }
}

/// Why an append to `aggregate_id` as a `requested_type` at version
/// `expected` did not apply, given the stream's `latest` event (version and
/// type; `None`: no stream).
fn conflict_of(
    aggregate_id: Uuid,
    requested_type: &str,
    expected: i32,
    latest: Option<(i32, String)>,
) -> StoreError {
    match latest {
        Some((_, existing)) if existing != requested_type => StoreError::AggregateTypeMismatch {
            aggregate_id,
            existing,
            requested: requested_type.to_string(),
        },
        latest => StoreError::VersionConflict {
            aggregate_id,
            expected: u32::try_from(expected).unwrap_or(0),
            actual: latest.map_or(0, |(version, _)| u32::try_from(version).unwrap_or(0)),
        },
    }
}

/// An append to any number of streams that happens only together with a
/// write to another table (the *gate*), in one statement: one round trip,
/// no `BEGIN`/`COMMIT`, and none of `append_events`' procedural overhead.
/// The saga store writes a saga's row and its events this way.
///
/// `{GATE}` is a data-modifying statement that writes its row only when
/// `{READY}` is true (every stream is at its expected version, checked in
/// the statement's snapshot) and returns a row when it wrote. The events are
/// inserted only if it did. A concurrent writer that takes a stream's next
/// version first makes the insert fail on `UNIQUE (aggregate_id, version)`,
/// which aborts the whole statement, gate included. The gate's own
/// parameters are numbered from [`GATE_FIRST_PARAMETER`].
///
/// Returns whether the streams were ready and the last inserted event's
/// position (NULL when nothing was inserted).
const GATED_APPEND: &str = "\
WITH streams AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::integer[]) AS s(id, type, expected)
),
ready AS (
    SELECT NOT EXISTS (
        SELECT 1 FROM streams s
        WHERE s.expected > 0 AND NOT EXISTS (
            SELECT 1 FROM events p
            WHERE p.aggregate_id = s.id AND p.version = s.expected AND p.aggregate_type = s.type)
    ) AS ok
),
gate AS ({GATE}),
inserted AS (
    INSERT INTO events (id, aggregate_id, aggregate_type, event_type, schema_version, event_data,
                        version, correlation_id, causation_id, actor, trace_parent, created_at)
    SELECT e.id, e.stream, s.type, e.type, e.schema_version, e.data,
           e.version, $10, $11, $12, $13, statement_timestamp()
    FROM unnest($4::uuid[], $5::uuid[], $6::text[], $7::integer[], $8::integer[], $9::jsonb[])
             WITH ORDINALITY AS e(id, stream, type, version, schema_version, data, ord)
    JOIN streams s ON s.id = e.stream
    WHERE EXISTS (SELECT 1 FROM gate)
    ORDER BY e.ord
    RETURNING transaction_id, sequence
)
SELECT (SELECT ok FROM ready), max(i.transaction_id), max(i.sequence) FROM inserted i";

/// The first parameter number a gate of [`GATED_APPEND`] may use.
pub(crate) const GATE_FIRST_PARAMETER: usize = 14;

/// The statement of a [`PostgresEventStore::append_gated`] with `gate`, in
/// which `{READY}` stands for the streams' readiness.
pub(crate) fn gated_append_statement(gate: &str) -> String {
    GATED_APPEND.replace("{GATE}", &gate.replace("{READY}", "(SELECT ok FROM ready)"))
}

/// What a gated append did.
#[derive(Debug)]
pub(crate) enum Gated {
    /// The gate wrote its row and the events were appended.
    Written(AppendOutcome),
    /// Every stream was ready but the gate wrote nothing: nothing was written.
    Refused,
}

/// What one run of a gated statement did, before any conflict is looked up.
#[derive(Debug)]
pub(crate) enum GatedRun {
    Done(Gated),
    /// A stream was not at its expected version (or another writer took
    /// its next one): nothing was written. The streams (id, type, expected
    /// version), for [`PostgresEventStore::first_conflict`].
    Conflict(Vec<(Uuid, String, i32)>),
}

/// A gated append's row: streams ready, last position.
type GatedRow = (Option<bool>, Option<i64>, Option<i64>);

/// A query of [`GATED_APPEND`] with the append's parameters bound, for the
/// gate's to follow.
pub(crate) type GatedQuery<'q> =
    sqlx::query::QueryAs<'q, Postgres, GatedRow, sqlx::postgres::PgArguments>;

impl PostgresEventStore {
    /// Runs `statement` (made by [`gated_append_statement`]) for `request`,
    /// with the gate's parameters bound by `bind_gate`, and looks up which
    /// stream conflicted if one did. Idempotency keys are not supported
    /// here (they need `append_events`).
    pub(crate) async fn append_gated<'q>(
        connections: &ConnectionShelf,
        statement: &'q str,
        request: AppendRequest,
        bind_gate: impl FnOnce(GatedQuery<'q>) -> GatedQuery<'q>,
    ) -> Result<Gated, StoreError> {
        match Self::run_gated(connections, statement, request, bind_gate).await? {
            GatedRun::Done(gated) => Ok(gated),
            GatedRun::Conflict(streams) => Err(Self::first_conflict(connections, &streams).await),
        }
    }

    /// [`Self::append_gated`] without the look-up of a conflict.
    pub(crate) async fn run_gated<'q>(
        connections: &ConnectionShelf,
        statement: &'q str,
        request: AppendRequest,
        bind_gate: impl FnOnce(GatedQuery<'q>) -> GatedQuery<'q>,
    ) -> Result<GatedRun, StoreError> {
        validate_gated(&request)?;
        let resulting_versions = request.resulting_versions();
        let streams = gated_streams(&request);
        let args = AppendArguments::from_request(request);
        let (stream_ids, expected_versions) =
            (args.stream_ids.clone(), args.expected_versions.clone());
        let query = args.bind_to(sqlx::query_as(statement));
        let result: Result<GatedRow, sqlx::Error> = bind_gate(query).fetch_one(connections).await;
        match result {
            Ok((_, Some(transaction_id), Some(sequence))) => {
                Ok(GatedRun::Done(Gated::Written(AppendOutcome {
                    stream_versions: resulting_versions,
                    last_position: Position {
                        transaction_id,
                        sequence,
                    },
                    replayed: false,
                })))
            }
            Ok((Some(true), _, _)) => Ok(GatedRun::Done(Gated::Refused)),
            // A stream was not at its expected version.
            Ok(_) => Ok(GatedRun::Conflict(streams)),
            // A concurrent writer took a stream's next version.
            Err(error) if is_stream_version_taken(&error) => Ok(GatedRun::Conflict(streams)),
            Err(error) => Err(append_error(error, &stream_ids, &expected_versions)),
        }
    }

    /// The conflict of the first of `streams` (id, type, expected version)
    /// that is not as expected now; the first stream's if all are (they
    /// were not when the append ran). One read for all of them.
    pub(crate) async fn first_conflict(
        connections: &ConnectionShelf,
        streams: &[(Uuid, String, i32)],
    ) -> StoreError {
        let ids: Vec<Uuid> = streams.iter().map(|(id, _, _)| *id).collect();
        let latest: Result<Vec<(Uuid, i32, String)>, sqlx::Error> = sqlx::query_as(
            "SELECT s.id, e.version, e.aggregate_type \
             FROM unnest($1::uuid[]) AS s(id) \
             CROSS JOIN LATERAL (SELECT version, aggregate_type FROM events \
               WHERE aggregate_id = s.id ORDER BY version DESC LIMIT 1) e",
        )
        .bind(ids)
        .fetch_all(connections)
        .await;
        let latest: HashMap<Uuid, (i32, String)> = match latest {
            Ok(rows) => rows
                .into_iter()
                .map(|(id, version, kind)| (id, (version, kind)))
                .collect(),
            Err(error) => return StoreError::Database(error),
        };
        let mut first = None;
        for (aggregate_id, aggregate_type, expected) in streams {
            let conflict = conflict_of(
                *aggregate_id,
                aggregate_type,
                *expected,
                latest.get(aggregate_id).cloned(),
            );
            match conflict {
                StoreError::VersionConflict {
                    expected, actual, ..
                } if expected == actual => {
                    first.get_or_insert(conflict);
                }
                other => return other,
            }
        }
        first.unwrap_or_else(|| StoreError::Corrupt("a gated append named no stream".into()))
    }
}

/// A gated append's request is valid and has no idempotency key.
pub(crate) fn validate_gated(request: &AppendRequest) -> Result<(), StoreError> {
    validate(request)?;
    if request.idempotency_key.is_some() {
        return Err(StoreError::invalid(
            "idempotency_key",
            "a gated append takes no idempotency key",
        ));
    }
    Ok(())
}

/// The streams of a gated append as its conflict look-up takes them.
pub(crate) fn gated_streams(request: &AppendRequest) -> Vec<(Uuid, String, i32)> {
    request
        .streams
        .iter()
        .map(|s| {
            (
                s.aggregate_id,
                s.aggregate_type.clone(),
                s.expected_version as i32,
            )
        })
        .collect()
}

/// Whether `error` is the insert of a stream's version another writer
/// took first.
pub(crate) fn is_stream_version_taken(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .is_some_and(|e| e.constraint() == Some(STREAM_VERSION_CONSTRAINT))
}

/// An append request as the parallel arrays `append_events` takes.
struct AppendArguments {
    idempotency_key: Option<String>,
    stream_ids: Vec<Uuid>,
    stream_types: Vec<String>,
    expected_versions: Vec<i32>,
    events: EventColumns,
    metadata: EventMetadata,
}

impl AppendArguments {
    /// Assumes a validated request, so every version fits in an `i32`.
    fn from_request(request: AppendRequest) -> Self {
        let event_count = request.event_count();
        let mut args = AppendArguments {
            idempotency_key: request.idempotency_key,
            stream_ids: Vec::with_capacity(request.streams.len()),
            stream_types: Vec::with_capacity(request.streams.len()),
            expected_versions: Vec::with_capacity(request.streams.len()),
            events: EventColumns::with_capacity(event_count),
            metadata: request.metadata,
        };
        for stream in request.streams {
            let expected = stream.expected_version as i32;
            args.stream_ids.push(stream.aggregate_id);
            args.stream_types.push(stream.aggregate_type);
            args.expected_versions.push(expected);
            args.events
                .push(stream.aggregate_id, expected, stream.events);
        }
        args
    }

    /// Binds the streams, the events and the metadata, in this order: the
    /// parameters of [`GATED_APPEND`], and those of `append_events` after
    /// its idempotency key.
    fn bind_to<'q, O>(
        self,
        query: sqlx::query::QueryAs<'q, Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, Postgres, O, sqlx::postgres::PgArguments> {
        let query = query
            .bind(self.stream_ids)
            .bind(self.stream_types)
            .bind(self.expected_versions);
        self.events
            .bind_to(query)
            .bind(self.metadata.correlation_id)
            .bind(self.metadata.causation_id)
            .bind(self.metadata.actor)
            .bind(self.metadata.trace_parent.map(|trace| trace.to_string()))
    }
}

/// The events of an append as the parallel arrays the append statements
/// take: ids, streams, event types, versions, schema versions, data.
#[derive(Default)]
pub(crate) struct EventColumns {
    ids: Vec<Uuid>,
    streams: Vec<Uuid>,
    types: Vec<String>,
    versions: Vec<i32>,
    schema_versions: Vec<i32>,
    data: Vec<Value>,
}

impl EventColumns {
    fn with_capacity(events: usize) -> Self {
        EventColumns {
            ids: Vec::with_capacity(events),
            streams: Vec::with_capacity(events),
            types: Vec::with_capacity(events),
            versions: Vec::with_capacity(events),
            schema_versions: Vec::with_capacity(events),
            data: Vec::with_capacity(events),
        }
    }

    /// Adds `events` of `stream`, appended after its version `expected`.
    /// Assumes a validated request, so every version fits in an `i32`.
    pub(crate) fn push(
        &mut self,
        stream: Uuid,
        expected: i32,
        events: impl IntoIterator<Item = NewEvent>,
    ) {
        for (offset, event) in events.into_iter().enumerate() {
            self.ids.push(event.id);
            self.streams.push(stream);
            self.types.push(event.event_type);
            self.versions.push(expected + offset as i32 + 1);
            self.schema_versions.push(event.schema_version as i32);
            self.data.push(event.data);
        }
    }

    /// Binds the six arrays, in the order of the type's docs.
    pub(crate) fn bind_to<'q, O>(
        self,
        query: sqlx::query::QueryAs<'q, Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, Postgres, O, sqlx::postgres::PgArguments> {
        query
            .bind(self.ids)
            .bind(self.streams)
            .bind(self.types)
            .bind(self.versions)
            .bind(self.schema_versions)
            .bind(self.data)
    }
}

/// Maps the errors `append_events` raises to typed store errors.
/// `stream_ids` and `expected_versions` are the request's, to report what was expected.
fn append_error(error: sqlx::Error, stream_ids: &[Uuid], expected_versions: &[i32]) -> StoreError {
    let Some(db_error) = error
        .as_database_error()
        .and_then(|e| e.try_downcast_ref::<PgDatabaseError>())
    else {
        return StoreError::Database(error);
    };
    let detail = db_error.detail().unwrap_or_default();
    let mut parts = detail.splitn(2, ' ');
    let aggregate_id = parts.next().and_then(|id| id.parse::<Uuid>().ok());
    let rest = parts.next().unwrap_or_default();
    match (db_error.code(), aggregate_id) {
        (VERSION_CONFLICT_STATE, Some(aggregate_id)) => StoreError::VersionConflict {
            aggregate_id,
            expected: stream_ids
                .iter()
                .zip(expected_versions)
                .find(|(id, _)| **id == aggregate_id)
                .map_or(0, |(_, v)| u32::try_from(*v).unwrap_or(0)),
            actual: rest.parse().unwrap_or(0),
        },
        (TYPE_MISMATCH_STATE, Some(aggregate_id)) => {
            let (existing, requested) = rest.split_once(' ').unwrap_or((rest, ""));
            StoreError::AggregateTypeMismatch {
                aggregate_id,
                existing: existing.to_string(),
                requested: requested.to_string(),
            }
        }
        (UNIQUE_VIOLATION_STATE, _) if db_error.constraint() == Some("events_pkey") => {
            StoreError::invalid("id", "an event with this id is already stored")
        }
        _ => StoreError::Database(error),
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
    schema_version: i32,
    event_data: Value,
    version: i32,
    correlation_id: Option<Uuid>,
    causation_id: Option<Uuid>,
    actor: Option<String>,
    created_at: DateTime<Utc>,
    trace_parent: Option<String>,
}

impl TryFrom<EventRow> for RecordedEvent {
    type Error = StoreError;

    fn try_from(row: EventRow) -> Result<Self, StoreError> {
        let non_negative = |value: i32, what: &str| {
            u32::try_from(value)
                .map_err(|_| StoreError::Corrupt(format!("event {}: negative {what}", row.id)))
        };
        Ok(RecordedEvent {
            id: row.id,
            position: Position {
                transaction_id: row.transaction_id,
                sequence: row.sequence,
            },
            aggregate_id: row.aggregate_id,
            aggregate_type: row.aggregate_type,
            event_type: row.event_type,
            schema_version: non_negative(row.schema_version, "schema version")?,
            data: row.event_data,
            version: non_negative(row.version, "version")?,
            metadata: EventMetadata {
                correlation_id: row.correlation_id,
                causation_id: row.causation_id,
                actor: row.actor,
                // Written by the kernel; anything else reads as none.
                trace_parent: row.trace_parent.and_then(|text| text.parse().ok()),
            },
            created_at: row.created_at,
        })
    }
}

/// An event with whether the global log shows it yet.
#[derive(sqlx::FromRow)]
struct ReadableEventRow {
    #[sqlx(flatten)]
    event: EventRow,
    readable: bool,
}

fn to_recorded(rows: Vec<EventRow>) -> Result<Vec<RecordedEvent>, StoreError> {
    rows.into_iter().map(RecordedEvent::try_from).collect()
}

/// [`EventStore::read_streams_after`] as one statement, for the
/// [`StreamReadBatcher`] to run for one read or for several merged.
#[derive(Debug)]
pub struct PostgresStreamReads {
    connections: ConnectionShelf,
}

#[async_trait]
impl StreamsAfter for PostgresStreamReads {
    async fn read(
        &self,
        streams: &[(Uuid, u32)],
    ) -> Result<Vec<(RecordedEvent, bool)>, StoreError> {
        let ids: Vec<Uuid> = streams.iter().map(|(id, _)| *id).collect();
        let versions: Vec<i32> = streams
            .iter()
            .map(|(_, version)| i32::try_from(*version).unwrap_or(i32::MAX))
            .collect();
        // One read for every stream, and readability in the same snapshot.
        // One index range per stream: `OFFSET 0` keeps the planner from
        // flattening the LATERAL into a join, which the generic plan of a
        // prepared statement ran as a hash join over the whole table.
        let rows: Vec<ReadableEventRow> = sqlx::query_as(&format!(
            "SELECT {EVENT_COLUMNS}, {READABLE} AS readable \
             FROM unnest($1::uuid[], $2::integer[]) AS s(stream, after_version) \
             CROSS JOIN LATERAL (SELECT * FROM events \
               WHERE aggregate_id = s.stream AND version > s.after_version OFFSET 0) e \
             ORDER BY transaction_id, sequence"
        ))
        .bind(ids)
        .bind(versions)
        .fetch_all(&self.connections)
        .await?;
        rows.into_iter()
            .map(|row| Ok((RecordedEvent::try_from(row.event)?, row.readable)))
            .collect()
    }
}

/// Events a log reader may see now: those of transactions below the oldest one
/// still running (the read horizon), all of which have finished.
const READABLE: &str = "transaction_id < pg_snapshot_xmin(pg_current_snapshot())::text::bigint";

#[async_trait]
impl EventStore for PostgresEventStore {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        if request.streams.len() == 1 && request.idempotency_key.is_none() {
            self.append_single_stream(request).await
        } else {
            Self::append_with(&self.connections, request).await
        }
    }

    async fn read_stream(
        &self,
        aggregate_id: Uuid,
        selection: StreamSelection,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let to_version = selection
            .to_version
            .map(|v| i32::try_from(v).unwrap_or(i32::MAX));
        let rows: Vec<EventRow> = sqlx::query_as(&format!(
            "SELECT {EVENT_COLUMNS} FROM events \
             WHERE aggregate_id = $1 \
               AND ($2::integer IS NULL OR version <= $2) \
               AND ($3::timestamptz IS NULL OR created_at <= $3) \
               AND ($4::integer IS NULL OR version > $4) \
             ORDER BY version"
        ))
        .bind(aggregate_id)
        .bind(to_version)
        .bind(selection.until)
        .bind(
            selection
                .after_version
                .map(|v| i32::try_from(v).unwrap_or(i32::MAX)),
        )
        .fetch_all(&self.connections)
        .await?;
        to_recorded(rows)
    }

    async fn read_streams(&self, aggregate_ids: &[Uuid]) -> Result<Vec<RecordedEvent>, StoreError> {
        validate_stream_ids(aggregate_ids)?;
        if aggregate_ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<EventRow> = sqlx::query_as(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE aggregate_id = ANY($1) \
             ORDER BY aggregate_id, version"
        ))
        .bind(aggregate_ids)
        .fetch_all(&self.connections)
        .await?;
        to_recorded(rows)
    }

    async fn read_all_matching(
        &self,
        filter: &EventFilter,
        after: Position,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut query = log_query::<Postgres>(filter, after, limit, READABLE);
        let rows: Vec<EventRow> = query.build_query_as().fetch_all(&self.connections).await?;
        to_recorded(rows)
    }

    async fn count_matching(&self, filter: &EventFilter) -> Result<u64, StoreError> {
        let count: i64 = log_count_query::<Postgres>(filter, READABLE)
            .build_query_scalar()
            .fetch_one(&self.connections)
            .await?;
        Ok(count.max(0) as u64)
    }

    async fn head(&self) -> Result<Position, StoreError> {
        let row: Option<(i64, i64)> = sqlx::query_as(&format!(
            "SELECT transaction_id, sequence FROM events \
             WHERE {READABLE} \
             ORDER BY transaction_id DESC, sequence DESC LIMIT 1"
        ))
        .fetch_optional(&self.connections)
        .await?;
        Ok(
            row.map_or(Position::START, |(transaction_id, sequence)| Position {
                transaction_id,
                sequence,
            }),
        )
    }

    async fn read_streams_after(
        &self,
        streams: &[(Uuid, u32)],
    ) -> Result<Vec<(RecordedEvent, bool)>, StoreError> {
        let ids: Vec<Uuid> = streams.iter().map(|(id, _)| *id).collect();
        validate_stream_ids(&ids)?;
        // A stream named twice is read once, from the lower version.
        let mut unique: Vec<(Uuid, u32)> = streams.to_vec();
        unique.sort_unstable();
        unique.dedup_by_key(|(id, _)| *id);
        self.stream_reads.read(&unique).await
    }

    async fn stream_version(&self, aggregate_id: Uuid) -> Result<u32, StoreError> {
        let version: Option<i32> =
            sqlx::query_scalar("SELECT max(version) FROM events WHERE aggregate_id = $1")
                .bind(aggregate_id)
                .fetch_one(&self.connections)
                .await?;
        u32::try_from(version.unwrap_or(0))
            .map_err(|_| StoreError::Corrupt(format!("stream {aggregate_id}: negative version")))
    }
}
