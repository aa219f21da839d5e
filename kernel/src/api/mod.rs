//! The GraphQL API (async-graphql), served on `/graphql` by [`crate::server`].
//!
//! Resolvers are thin: they validate arguments, call the adapters found in the
//! schema data, and map results to GraphQL types. `schema.graphql` at the
//! repository root is this schema printed as SDL (`commerce-kernel schema`), and
//! a test fails when the two differ.

pub mod carts;
pub mod commerce;
pub mod error;
pub mod plugins;
pub mod sagas;

use std::sync::Arc;

use async_graphql::connection::{Connection, Edge, EmptyFields};
use async_graphql::{Context, EmptySubscription, Json, MergedObject, Object, Schema};
use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

pub use error::{ApiError, ErrorCode};

use crate::carts::CartActivityLog;
use crate::commerce::{Carts, Commerce, Plugins, Sagas};
use crate::event_store::{EventFilter, EventStore, Position, RecordedEvent, StreamSelection};
use crate::projections::Projector;

/// The kernel's GraphQL schema.
pub type KernelSchema = Schema<QueryRoot, MutationRoot, EmptySubscription>;

/// Every query: the event log's and the commerce read models'.
#[derive(MergedObject, Default)]
pub struct QueryRoot(
    EventLogQuery,
    commerce::CommerceQuery,
    carts::CartQuery,
    plugins::PluginQuery,
    sagas::SagaQuery,
);

#[derive(MergedObject, Default)]
pub struct MutationRoot(
    commerce::CommerceMutation,
    carts::CartMutation,
    plugins::PluginMutation,
    sagas::SagaMutation,
);

/// Default and largest page of a connection.
pub const DEFAULT_PAGE_SIZE: i32 = 50;
pub const MAX_PAGE_SIZE: i32 = 500;
/// Deepest query accepted and most expensive query accepted (in field count).
pub const MAX_QUERY_DEPTH: usize = 16;
pub const MAX_QUERY_COMPLEXITY: usize = 10_000;

/// What the resolvers reach through the schema's data.
pub struct Adapters {
    pub event_store: Arc<dyn EventStore>,
    pub commerce: Commerce,
    pub carts: Carts,
    pub cart_activity: Arc<dyn CartActivityLog>,
    pub projector: Projector,
    pub plugins: Plugins,
    pub sagas: Sagas,
}

/// Builds the schema around the kernel's adapters.
pub fn build_schema(adapters: Adapters) -> KernelSchema {
    schema_builder()
        .data(adapters.event_store)
        .data(adapters.commerce)
        .data(adapters.carts)
        .data(adapters.cart_activity)
        .data(adapters.projector)
        .data(adapters.plugins)
        .data(adapters.sagas)
        .finish()
}

/// The schema as SDL, the content of `schema.graphql`.
pub fn sdl() -> String {
    schema_builder().finish().sdl()
}

fn schema_builder() -> async_graphql::SchemaBuilder<QueryRoot, MutationRoot, EmptySubscription> {
    Schema::build(
        QueryRoot::default(),
        MutationRoot::default(),
        EmptySubscription,
    )
    .limit_depth(MAX_QUERY_DEPTH)
    .limit_complexity(MAX_QUERY_COMPLEXITY)
}

fn event_store<'a>(ctx: &Context<'a>) -> &'a Arc<dyn EventStore> {
    // Registered by `build_schema`; a schema without it cannot be built.
    ctx.data_unchecked::<Arc<dyn EventStore>>()
}

#[derive(Default)]
pub struct EventLogQuery;

#[Object]
impl EventLogQuery {
    /// The global event log, oldest first, optionally narrowed by the filters
    /// given. Cursors are log positions: passing the last one seen as `after`
    /// never skips an event.
    #[allow(clippy::too_many_arguments)]
    async fn events(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Page size, 1 to 500 (default 50).")] first: Option<i32>,
        #[graphql(desc = "Cursor of the last event already seen.")] after: Option<String>,
        aggregate_id: Option<Uuid>,
        aggregate_type: Option<String>,
        event_type: Option<String>,
        correlation_id: Option<Uuid>,
    ) -> Result<Connection<String, Event, EmptyFields, EmptyFields>, ApiError> {
        let first = page_size(first)?;
        let after_position = match &after {
            None => Position::START,
            Some(cursor) => cursor
                .parse::<Position>()
                .map_err(|e| ApiError::invalid("after", e.to_string()))?,
        };
        let filter = EventFilter {
            aggregate_id,
            aggregate_type,
            event_type,
            correlation_id,
        };
        // One more than asked for tells whether another page follows.
        let mut events = event_store(ctx)
            .read_all_matching(&filter, after_position, first + 1)
            .await?;
        let has_next_page = events.len() > first as usize;
        events.truncate(first as usize);

        let mut connection = Connection::new(after.is_some(), has_next_page);
        connection.edges.extend(
            events
                .into_iter()
                .map(|event| Edge::new(event.position.to_string(), Event(event))),
        );
        Ok(connection)
    }

    /// One aggregate's events in version order: the whole stream, or the
    /// stream as it was at `untilVersion` or at time `until`.
    async fn aggregate_events(
        &self,
        ctx: &Context<'_>,
        aggregate_id: Uuid,
        until_version: Option<i32>,
        until: Option<DateTime<Utc>>,
    ) -> Result<Vec<Event>, ApiError> {
        let to_version = until_version
            .map(|v| {
                u32::try_from(v)
                    .map_err(|_| ApiError::invalid("untilVersion", "must not be negative"))
            })
            .transpose()?;
        let events = event_store(ctx)
            .read_stream(aggregate_id, StreamSelection { to_version, until })
            .await?;
        Ok(events.into_iter().map(Event).collect())
    }

    /// Cursor of the newest event readers can see now; compare with a
    /// consumer's cursor to measure its lag.
    async fn event_log_head(&self, ctx: &Context<'_>) -> Result<String, ApiError> {
        Ok(event_store(ctx).head().await?.to_string())
    }
}

fn page_size(first: Option<i32>) -> Result<u32, ApiError> {
    let first = first.unwrap_or(DEFAULT_PAGE_SIZE);
    if !(1..=MAX_PAGE_SIZE).contains(&first) {
        return Err(ApiError::invalid(
            "first",
            format!("must be between 1 and {MAX_PAGE_SIZE}"),
        ));
    }
    Ok(first as u32)
}

/// A stored domain event.
pub struct Event(RecordedEvent);

#[Object]
impl Event {
    async fn id(&self) -> Uuid {
        self.0.id
    }
    /// Position in the global log; also this event's cursor.
    async fn position(&self) -> String {
        self.0.position.to_string()
    }
    async fn aggregate_id(&self) -> Uuid {
        self.0.aggregate_id
    }
    async fn aggregate_type(&self) -> &str {
        &self.0.aggregate_type
    }
    async fn event_type(&self) -> &str {
        &self.0.event_type
    }
    /// The stream's version after this event (1 for the first).
    async fn version(&self) -> i32 {
        // Stored as a Postgres INTEGER, so it always fits.
        i32::try_from(self.0.version).unwrap_or(i32::MAX)
    }
    /// Version of the payload's shape.
    async fn schema_version(&self) -> i32 {
        i32::try_from(self.0.schema_version).unwrap_or(i32::MAX)
    }
    async fn data(&self) -> Json<&Value> {
        Json(&self.0.data)
    }
    async fn correlation_id(&self) -> Option<Uuid> {
        self.0.metadata.correlation_id
    }
    async fn causation_id(&self) -> Option<Uuid> {
        self.0.metadata.causation_id
    }
    async fn actor(&self) -> Option<&str> {
        self.0.metadata.actor.as_deref()
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}
