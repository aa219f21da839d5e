//! The event store: an append-only log of domain events, the kernel's source of
//! truth. Aggregates are rebuilt by replaying their stream; projections, sagas and
//! subscriptions follow the global log through [`EventStore::read_all`].
//!
//! This module holds the backend-neutral contract ([`EventStore`]), its types and
//! the input validation both backends share. The backends live in
//! [`crate::storage`]; [`repository`] turns domain aggregates into appends and back.

pub mod cache;
pub mod horizon;
pub mod repository;

use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::telemetry::TraceParent;

pub use cache::AggregateCache;
pub use horizon::LogHorizon;
pub use repository::{AggregateRepository, Loaded};

/// Most events one append may carry, across all its streams.
pub const MAX_EVENTS_PER_APPEND: usize = 1_000;
/// Most streams one append may write atomically.
pub const MAX_STREAMS_PER_APPEND: usize = 100;
/// Longest aggregate type, event type, idempotency key or actor, in bytes.
pub const MAX_NAME_LEN: usize = 200;
/// Most events one read of the global log returns; larger limits are lowered to this.
pub const MAX_READ_LIMIT: u32 = 10_000;

/// A place in the global log.
///
/// Events are ordered by the transaction that wrote them, then by their
/// allocation sequence. On Postgres, `transaction_id` is the writer's xid8, which
/// is what lets a reader never skip an event that commits late (see
/// `storage::postgres`). On SQLite, which has one writer, it counts appends.
/// Both parts are non-negative; [`Position::START`] is before every event.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Position {
    pub transaction_id: i64,
    pub sequence: i64,
}

impl Position {
    /// Before the first event of the log.
    pub const START: Position = Position {
        transaction_id: 0,
        sequence: 0,
    };
}

/// Positions print as `transaction_id:sequence`, the form cursors use.
impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.transaction_id, self.sequence)
    }
}

impl FromStr for Position {
    type Err = InvalidPosition;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (transaction, sequence) = s.split_once(':').ok_or(InvalidPosition)?;
        let transaction_id: i64 = transaction.parse().map_err(|_| InvalidPosition)?;
        let sequence: i64 = sequence.parse().map_err(|_| InvalidPosition)?;
        if transaction_id < 0 || sequence < 0 {
            return Err(InvalidPosition);
        }
        Ok(Position {
            transaction_id,
            sequence,
        })
    }
}

/// A string that is not a [`Position`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a log position (expected `transaction:sequence`, two non-negative integers)")]
pub struct InvalidPosition;

/// Who and what caused an append; stored with each of its events.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    /// Ties together every event of one business flow (an order's saga, say).
    pub correlation_id: Option<Uuid>,
    /// The event or command that directly caused this one.
    pub causation_id: Option<Uuid>,
    /// The authenticated user or the kernel component that acted.
    pub actor: Option<String>,
    /// The trace the append happened in (the span that was current), so
    /// that what follows from the event (a saga's steps on any process)
    /// continues the same trace; see [`crate::telemetry`].
    #[serde(default)]
    pub trace_parent: Option<TraceParent>,
}

/// An event about to be appended.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    /// Unique id of the event; a UUIDv7 by default, so ids sort by creation time.
    pub id: Uuid,
    pub event_type: String,
    /// Version of the payload's shape, for upcasting older events on read.
    pub schema_version: u32,
    pub data: Value,
}

impl NewEvent {
    /// An event with a fresh UUIDv7 id and schema version 1.
    pub fn new(event_type: impl Into<String>, data: Value) -> Self {
        NewEvent {
            id: Uuid::now_v7(),
            event_type: event_type.into(),
            schema_version: 1,
            data,
        }
    }
}

/// Events for one stream, written only if the stream is at `expected_version`.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamAppend {
    pub aggregate_id: Uuid,
    pub aggregate_type: String,
    /// The version the caller last saw; 0 means the stream must not exist yet.
    pub expected_version: u32,
    pub events: Vec<NewEvent>,
}

/// One atomic append: every stream at its expected version and every event
/// written, or nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct AppendRequest {
    pub streams: Vec<StreamAppend>,
    pub metadata: EventMetadata,
    /// When set, a second append with the same key writes nothing and returns the
    /// first one's outcome (with [`AppendOutcome::replayed`] set). Keys are global:
    /// prefix them with the command they belong to.
    pub idempotency_key: Option<String>,
}

impl AppendRequest {
    /// An append to a single stream with no metadata and no idempotency key.
    pub fn single(
        aggregate_id: Uuid,
        aggregate_type: impl Into<String>,
        expected_version: u32,
        events: Vec<NewEvent>,
    ) -> Self {
        AppendRequest {
            streams: vec![StreamAppend {
                aggregate_id,
                aggregate_type: aggregate_type.into(),
                expected_version,
                events,
            }],
            metadata: EventMetadata::default(),
            idempotency_key: None,
        }
    }

    pub fn with_metadata(mut self, metadata: EventMetadata) -> Self {
        self.metadata = metadata;
        self
    }

    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Each stream's version once this append is written, in request order.
    pub fn resulting_versions(&self) -> Vec<StreamVersion> {
        self.streams
            .iter()
            .map(|s| StreamVersion {
                aggregate_id: s.aggregate_id,
                // Validation bounds both terms, so this cannot overflow.
                version: s.expected_version + s.events.len() as u32,
            })
            .collect()
    }

    /// Total number of events across all streams.
    pub fn event_count(&self) -> usize {
        self.streams.iter().map(|s| s.events.len()).sum()
    }
}

/// A stream's version after an append.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamVersion {
    pub aggregate_id: Uuid,
    pub version: u32,
}

/// What an append did (or, when replayed, what the first append with the same
/// idempotency key did).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Each stream's version after the append, in request order.
    pub stream_versions: Vec<StreamVersion>,
    /// Position of the append's last event. A reader of the global log that has
    /// passed it has seen every event of the append.
    pub last_position: Position,
    /// True when the idempotency key had been used: nothing was written now.
    pub replayed: bool,
}

/// An event as stored.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RecordedEvent {
    pub id: Uuid,
    pub position: Position,
    pub aggregate_id: Uuid,
    pub aggregate_type: String,
    pub event_type: String,
    pub schema_version: u32,
    pub data: Value,
    /// 1 for a stream's first event, then one more for each.
    pub version: u32,
    pub metadata: EventMetadata,
    /// When the append was written; all events of one append share it, and
    /// within a stream it never decreases with the version.
    pub created_at: DateTime<Utc>,
}

/// Which part of one stream to read. The default is the whole stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamSelection {
    /// Include only versions above this one (to page through a stream).
    pub after_version: Option<u32>,
    /// Highest version to include (the stream as it was at that version).
    pub to_version: Option<u32>,
    /// Include only events written at or before this time (the stream as it was then).
    pub until: Option<DateTime<Utc>>,
}

/// Narrows a read of the global log. Every field that is set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub aggregate_id: Option<Uuid>,
    pub aggregate_type: Option<String>,
    /// When not empty, only events of one of these aggregate types (one
    /// read for several followers, such as the projector's).
    pub any_aggregate_type: Vec<String>,
    pub event_type: Option<String>,
    pub correlation_id: Option<Uuid>,
}

/// Which storage engine is behind a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        })
    }
}

/// Everything that can go wrong in the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The stream moved on since the caller read it. Nothing was written.
    #[error("stream {aggregate_id} is at version {actual}, expected {expected}")]
    VersionConflict {
        aggregate_id: Uuid,
        expected: u32,
        actual: u32,
    },
    /// The stream exists with another aggregate type. Nothing was written.
    #[error("stream {aggregate_id} is a {existing}, not a {requested}")]
    AggregateTypeMismatch {
        aggregate_id: Uuid,
        existing: String,
        requested: String,
    },
    /// The request was malformed; `field` names the offending part.
    #[error("invalid {field}: {reason}")]
    InvalidInput { field: &'static str, reason: String },
    /// A stored event could not be turned into a domain event or back.
    #[error("event codec: {0}")]
    Codec(String),
    /// A stored row does not have the shape the store writes.
    #[error("corrupt row in the event store: {0}")]
    Corrupt(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        StoreError::InvalidInput {
            field,
            reason: reason.into(),
        }
    }
}

/// Most streams one [`EventStore::read_streams`] reads.
pub const MAX_STREAMS_PER_READ: usize = 1000;

/// Checks the ids of a [`EventStore::read_streams`].
pub(crate) fn validate_stream_ids(aggregate_ids: &[Uuid]) -> Result<(), StoreError> {
    if aggregate_ids.len() > MAX_STREAMS_PER_READ {
        return Err(StoreError::invalid(
            "aggregate_ids",
            format!("at most {MAX_STREAMS_PER_READ} streams per read"),
        ));
    }
    Ok(())
}

/// The event store contract, implemented by every storage backend.
///
/// Implementations are cheap to share (`Arc<dyn EventStore>`) and safe to call
/// from many tasks and many processes at once.
#[async_trait]
pub trait EventStore: Send + Sync {
    fn backend(&self) -> Backend;

    /// Appends atomically: each stream must be at its expected version (else
    /// [`StoreError::VersionConflict`] and nothing is written). A request whose
    /// idempotency key was used before returns the original outcome and writes
    /// nothing, also when the two calls race.
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError>;

    /// One stream's events in version order, limited by `selection`. A stream
    /// that does not exist reads as empty.
    async fn read_stream(
        &self,
        aggregate_id: Uuid,
        selection: StreamSelection,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Every event of the streams `aggregate_ids`, stream by stream in
    /// version order, in one read (at most [`MAX_STREAMS_PER_READ`] ids). The
    /// batched reads behind nested GraphQL fields use it; a stream that does
    /// not exist has no events.
    async fn read_streams(&self, aggregate_ids: &[Uuid]) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Up to `limit` events of the global log after `after` that match `filter`,
    /// in log order. Following the log by passing the last position read back in
    /// never skips an event, even when transactions commit out of order: an event
    /// becomes readable only once no earlier position can still appear.
    async fn read_all_matching(
        &self,
        filter: &EventFilter,
        after: Position,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Up to `limit` events of the global log after `after`; see [`Self::read_all_matching`].
    async fn read_all(
        &self,
        after: Position,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.read_all_matching(&EventFilter::default(), after, limit)
            .await
    }

    /// How many readable events match `filter`. Counts the whole log when
    /// unfiltered: meant for dashboards and `totalCount`, not hot paths.
    async fn count_matching(&self, filter: &EventFilter) -> Result<u64, StoreError>;

    /// Position of the newest event a reader of the global log can see now,
    /// or [`Position::START`] for an empty log. Projection lag is measured against it.
    async fn head(&self) -> Result<Position, StoreError>;

    /// A stream's current version; 0 when it does not exist.
    async fn stream_version(&self, aggregate_id: Uuid) -> Result<u32, StoreError>;

    /// The events of each of `streams` after its version (at most
    /// [`MAX_STREAMS_PER_READ`] streams), in one read, in log order, each
    /// with whether the global log shows it yet
    /// ([`Self::read_all_matching`]). The readable ones come first: no event
    /// can appear later before them, so a reader that keeps log order takes
    /// those and waits for the rest.
    async fn read_streams_after(
        &self,
        streams: &[(Uuid, u32)],
    ) -> Result<Vec<(RecordedEvent, bool)>, StoreError>;
}

/// Checks a request before any backend sees it, so both backends reject the
/// same inputs with the same errors.
pub(crate) fn validate(request: &AppendRequest) -> Result<(), StoreError> {
    if request.streams.is_empty() {
        return Err(StoreError::invalid(
            "streams",
            "an append needs at least one stream",
        ));
    }
    if request.streams.len() > MAX_STREAMS_PER_APPEND {
        return Err(StoreError::invalid(
            "streams",
            format!("at most {MAX_STREAMS_PER_APPEND} streams per append"),
        ));
    }
    if request.event_count() > MAX_EVENTS_PER_APPEND {
        return Err(StoreError::invalid(
            "events",
            format!("at most {MAX_EVENTS_PER_APPEND} events per append"),
        ));
    }
    if let Some(key) = &request.idempotency_key {
        validate_text("idempotency_key", key)?;
    }
    if let Some(actor) = &request.metadata.actor {
        validate_text("actor", actor)?;
    }
    let mut event_ids = std::collections::HashSet::new();
    for (index, stream) in request.streams.iter().enumerate() {
        if request.streams[..index]
            .iter()
            .any(|earlier| earlier.aggregate_id == stream.aggregate_id)
        {
            return Err(StoreError::invalid(
                "streams",
                format!("stream {} appears twice in one append", stream.aggregate_id),
            ));
        }
        validate_name("aggregate_type", &stream.aggregate_type)?;
        if stream.events.is_empty() {
            return Err(StoreError::invalid(
                "events",
                format!("stream {} has no events to append", stream.aggregate_id),
            ));
        }
        let last = u64::from(stream.expected_version) + stream.events.len() as u64;
        if last > i32::MAX as u64 {
            return Err(StoreError::invalid(
                "expected_version",
                format!(
                    "stream {} would pass the largest version",
                    stream.aggregate_id
                ),
            ));
        }
        for event in &stream.events {
            validate_name("event_type", &event.event_type)?;
            if event.schema_version == 0 || event.schema_version > i32::MAX as u32 {
                return Err(StoreError::invalid(
                    "schema_version",
                    "must be between 1 and 2147483647",
                ));
            }
            if !event_ids.insert(event.id) {
                return Err(StoreError::invalid(
                    "id",
                    format!("event id {} appears twice in one append", event.id),
                ));
            }
            if contains_nul(&event.data) {
                // Postgres JSONB cannot hold U+0000; refuse it on both backends alike.
                return Err(StoreError::invalid(
                    "data",
                    "event data may not contain the character U+0000",
                ));
            }
        }
    }
    Ok(())
}

/// Aggregate and event type names: short identifiers, safe in filters and logs.
fn validate_name(field: &'static str, name: &str) -> Result<(), StoreError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(StoreError::invalid(
            field,
            format!("must be 1 to {MAX_NAME_LEN} bytes long"),
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':'))
    {
        return Err(StoreError::invalid(
            field,
            "may hold only ASCII letters, digits and `_ . - :`",
        ));
    }
    Ok(())
}

/// Free text (keys, actors): bounded, no control characters.
fn validate_text(field: &'static str, text: &str) -> Result<(), StoreError> {
    if text.is_empty() || text.len() > MAX_NAME_LEN {
        return Err(StoreError::invalid(
            field,
            format!("must be 1 to {MAX_NAME_LEN} bytes long"),
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(StoreError::invalid(
            field,
            "may not contain control characters",
        ));
    }
    Ok(())
}

fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// Clamps a caller's read limit to what one read may return.
pub(crate) fn clamp_limit(limit: u32) -> i64 {
    i64::from(limit.min(MAX_READ_LIMIT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(events: Vec<NewEvent>) -> AppendRequest {
        AppendRequest::single(Uuid::now_v7(), "test", 0, events)
    }

    #[test]
    fn positions_order_by_transaction_then_sequence() {
        let a = Position {
            transaction_id: 5,
            sequence: 900,
        };
        let b = Position {
            transaction_id: 6,
            sequence: 10,
        };
        assert!(Position::START < a && a < b);
    }

    #[test]
    fn positions_round_trip_through_text_and_reject_garbage() {
        let p = Position {
            transaction_id: 42,
            sequence: 7,
        };
        assert_eq!(p.to_string().parse::<Position>(), Ok(p));
        for bad in [
            "",
            "42",
            "a:b",
            "1:-1",
            "-1:1",
            "1:2:3",
            "99999999999999999999:1",
        ] {
            assert_eq!(bad.parse::<Position>(), Err(InvalidPosition), "{bad:?}");
        }
    }

    #[test]
    fn validation_rejects_malformed_requests() {
        let cases = [
            (request(vec![]), "events"),
            (
                request(vec![NewEvent::new("bad type!", json!({}))]),
                "event_type",
            ),
            (request(vec![NewEvent::new("", json!({}))]), "event_type"),
            (
                request(vec![NewEvent::new("ok", json!({"k": "nul\u{0}"}))]),
                "data",
            ),
            (
                request(vec![NewEvent::new("ok", json!({}))]).with_idempotency_key(""),
                "idempotency_key",
            ),
            (
                request(vec![NewEvent::new("ok", json!({}))])
                    .with_idempotency_key("x".repeat(MAX_NAME_LEN + 1)),
                "idempotency_key",
            ),
            (
                AppendRequest::single(
                    Uuid::now_v7(),
                    "test",
                    i32::MAX as u32,
                    vec![NewEvent::new("ok", json!({}))],
                ),
                "expected_version",
            ),
            (
                AppendRequest {
                    streams: vec![],
                    metadata: EventMetadata::default(),
                    idempotency_key: None,
                },
                "streams",
            ),
        ];
        for (request, field) in cases {
            match validate(&request) {
                Err(StoreError::InvalidInput { field: got, .. }) => assert_eq!(got, field),
                other => panic!("expected invalid {field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn validation_rejects_duplicate_streams_and_event_ids() {
        let id = Uuid::now_v7();
        let event = NewEvent::new("ok", json!({}));
        let mut twice = AppendRequest::single(id, "test", 0, vec![event.clone()]);
        twice.streams.push(twice.streams[0].clone());
        assert!(matches!(
            validate(&twice),
            Err(StoreError::InvalidInput {
                field: "streams",
                ..
            })
        ));

        let same_id = AppendRequest::single(id, "test", 0, vec![event.clone(), event]);
        assert!(matches!(
            validate(&same_id),
            Err(StoreError::InvalidInput { field: "id", .. })
        ));
    }

    #[test]
    fn resulting_versions_follow_expected_plus_count() {
        let mut request = AppendRequest::single(
            Uuid::now_v7(),
            "test",
            3,
            vec![NewEvent::new("a", json!(1)), NewEvent::new("b", json!(2))],
        );
        request.streams.push(StreamAppend {
            aggregate_id: Uuid::now_v7(),
            aggregate_type: "other".into(),
            expected_version: 0,
            events: vec![NewEvent::new("c", json!(3))],
        });
        assert_eq!(validate(&request).ok(), Some(()));
        let versions: Vec<u32> = request
            .resulting_versions()
            .iter()
            .map(|v| v.version)
            .collect();
        assert_eq!(versions, vec![5, 1]);
    }
}
