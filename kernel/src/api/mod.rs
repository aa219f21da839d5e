//! The GraphQL API (async-graphql), served on `/graphql` by [`crate::server`].
//!
//! Resolvers are thin: they validate arguments, call the adapters found in the
//! schema data, and map results to GraphQL types. `schema.graphql` at the
//! repository root is this schema printed as SDL (`commerce-kernel schema`), and
//! a test fails when the two differ.

pub mod access;
pub mod carts;
pub mod commerce;
mod customer_view;
pub mod error;
pub mod guests;
pub mod kpis;
pub mod limits;
mod loaders;
pub mod plugins;
pub mod runbooks;
pub mod sagas;
pub mod subscriptions;
pub mod timing;

use std::sync::Arc;

use async_graphql::connection::{Connection, Edge, EmptyFields};
use async_graphql::{Context, Json, MergedObject, Object, Schema};
use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use serde_json::Value;
use uuid::Uuid;

pub use error::{ApiError, ErrorCode};

use crate::carts::CartActivityLog;
use crate::commerce::{Carts, Commerce, Plugins, Sagas};
use crate::config::GraphqlLimits;
use crate::event_store::{
    EventFilter, EventStore, Position, RecordedEvent, StoreError, StreamSelection,
};
use crate::live::LiveUpdates;
use crate::projections::Projector;
use access::AdminOnly;

/// The kernel's GraphQL schema.
pub type KernelSchema = Schema<QueryRoot, MutationRoot, subscriptions::SubscriptionRoot>;

/// Every query: the event log's and the commerce read models'. Named
/// `Query` in the schema, as the GraphQL spec's examples name it.
#[derive(MergedObject, Default)]
#[graphql(name = "Query")]
pub struct QueryRoot(
    EventLogQuery,
    commerce::CommerceQuery,
    carts::CartQuery,
    plugins::PluginQuery,
    sagas::SagaQuery,
    kpis::KpiQuery,
);

/// Every mutation; `Mutation` in the schema.
#[derive(MergedObject, Default)]
#[graphql(name = "Mutation")]
pub struct MutationRoot(
    commerce::CommerceMutation,
    guests::GuestMutation,
    carts::CartMutation,
    plugins::PluginMutation,
    sagas::SagaMutation,
    runbooks::RunbookMutation,
);

/// Page size of a connection when `first` is not given.
pub const DEFAULT_PAGE_SIZE: u32 = 50;

/// What the resolvers reach through the schema's data.
pub struct Adapters {
    pub event_store: Arc<dyn EventStore>,
    pub commerce: Commerce,
    pub carts: Carts,
    pub cart_activity: Arc<dyn CartActivityLog>,
    pub projector: Projector,
    pub plugins: Plugins,
    pub sagas: Sagas,
    pub live: LiveUpdates,
    pub guests: guests::GuestSessions,
    /// Where request durations and cart operations are recorded.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Pruning for the runbook.
    pub maintenance: crate::storage::maintenance::StoreMaintenance,
}

/// Builds the schema around the kernel's adapters, within `limits`.
pub fn build_schema(adapters: Adapters, limits: GraphqlLimits) -> KernelSchema {
    let loaders = loaders::Loaders::new(
        Arc::clone(&adapters.event_store),
        Arc::clone(adapters.projector.views()),
    );
    schema_builder(limits)
        .extension(timing::GraphqlTiming(Arc::clone(&adapters.metrics)))
        .data(adapters.metrics)
        .data(loaders)
        .data(adapters.event_store)
        .data(adapters.commerce)
        .data(adapters.carts)
        .data(adapters.cart_activity)
        .data(adapters.projector)
        .data(adapters.plugins)
        .data(adapters.sagas)
        .data(adapters.live)
        .data(adapters.guests)
        .data(adapters.maintenance)
        .data(limits)
        .finish()
}

/// The schema as SDL, the content of `schema.graphql`.
pub fn sdl() -> String {
    schema_builder(GraphqlLimits::default()).finish().sdl()
}

fn schema_builder(
    limits: GraphqlLimits,
) -> async_graphql::SchemaBuilder<QueryRoot, MutationRoot, subscriptions::SubscriptionRoot> {
    let builder = Schema::build(
        QueryRoot::default(),
        MutationRoot::default(),
        subscriptions::SubscriptionRoot,
    )
    .limit_depth(limits.max_depth)
    .limit_complexity(limits.max_complexity)
    // Fragment spreads and nested input values have their own recursion
    // bound: async-graphql's default (32), or the depth limit if higher, so
    // it never refuses what the depth limit allows.
    .limit_recursive_depth(limits.max_depth.max(32))
    .extension(limits::AliasLimit(limits.max_aliases))
    .extension(limits::ExpansionLimit(limits.max_complexity))
    .extension(error::ErrorShape);
    if limits.introspection {
        builder
    } else {
        builder.disable_introspection()
    }
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
    /// never skips an event. For admins.
    #[allow(clippy::too_many_arguments)]
    #[graphql(guard = "AdminOnly", complexity = "page_cost(first, child_complexity)")]
    async fn events(
        &self,
        ctx: &Context<'_>,
        #[graphql(
            desc = "Page size (default 50, at most the server's maximum page size, 500 unless configured)."
        )]
        first: Option<i32>,
        #[graphql(desc = "Cursor of the last event already seen.")] after: Option<String>,
        aggregate_id: Option<Uuid>,
        aggregate_type: Option<String>,
        event_type: Option<String>,
        correlation_id: Option<Uuid>,
    ) -> Result<Page<Event>, ApiError> {
        let first = page_size(ctx, first)?;
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
            ..EventFilter::default()
        };
        // One more than asked for tells whether another page follows.
        let mut events = event_store(ctx)
            .read_all_matching(&filter, after_position, first + 1)
            .await?;
        let has_next_page = events.len() > first as usize;
        events.truncate(first as usize);

        let store = Arc::clone(event_store(ctx));
        let total = TotalCount::new(move || {
            let (store, filter) = (Arc::clone(&store), filter.clone());
            Box::pin(async move { store.count_matching(&filter).await })
        });
        let mut connection =
            Connection::with_additional_fields(after.is_some(), has_next_page, total);
        connection.edges.extend(
            events
                .into_iter()
                .map(|event| Edge::new(event.position.to_string(), Event(event))),
        );
        Ok(connection)
    }

    /// One aggregate's events in version order: the whole stream, or the
    /// stream as it was at `untilVersion` or at time `until`. Cursors are
    /// versions. For admins.
    #[graphql(guard = "AdminOnly", complexity = "page_cost(first, child_complexity)")]
    #[allow(clippy::too_many_arguments)]
    async fn aggregate_events(
        &self,
        ctx: &Context<'_>,
        aggregate_id: Uuid,
        until_version: Option<i32>,
        until: Option<DateTime<Utc>>,
        #[graphql(desc = "Page size (default 50, at most the server's maximum page size).")]
        first: Option<i32>,
        #[graphql(desc = "Cursor (the version) of the last event already seen.")] after: Option<
            String,
        >,
    ) -> Result<Page<Event>, ApiError> {
        let first = page_size(ctx, first)?;
        let until_version = until_version
            .map(|v| {
                u32::try_from(v)
                    .map_err(|_| ApiError::invalid("untilVersion", "must not be negative"))
            })
            .transpose()?;
        let after_version = after
            .as_deref()
            .map(|cursor| {
                cursor
                    .parse::<u32>()
                    .map_err(|_| ApiError::invalid("after", "not a cursor of this list"))
            })
            .transpose()?;
        // One more than asked for tells whether another page follows.
        let page_end = after_version.unwrap_or(0).saturating_add(first + 1);
        let selection = StreamSelection {
            after_version,
            to_version: Some(until_version.map_or(page_end, |v| v.min(page_end))),
            until,
        };
        let store = Arc::clone(event_store(ctx));
        let mut events = store.read_stream(aggregate_id, selection).await?;
        let has_next_page = events.len() > first as usize;
        events.truncate(first as usize);
        let total = TotalCount::new(move || {
            let store = Arc::clone(&store);
            Box::pin(async move {
                if until.is_none() {
                    // Versions run 1..=n without gaps.
                    let version = store.stream_version(aggregate_id).await?;
                    return Ok(u64::from(until_version.map_or(version, |v| v.min(version))));
                }
                let as_of = StreamSelection {
                    to_version: until_version,
                    until,
                    ..StreamSelection::default()
                };
                Ok(store.read_stream(aggregate_id, as_of).await?.len() as u64)
            })
        });
        let mut connection =
            Connection::with_additional_fields(after.is_some(), has_next_page, total);
        connection.edges.extend(
            events
                .into_iter()
                .map(|event| Edge::new(event.version.to_string(), Event(event))),
        );
        Ok(connection)
    }

    /// Cursor of the newest event readers can see now; compare with a
    /// consumer's cursor to measure its lag. For admins.
    #[graphql(guard = "AdminOnly")]
    async fn event_log_head(&self, ctx: &Context<'_>) -> Result<String, ApiError> {
        Ok(event_store(ctx).head().await?.to_string())
    }
}

/// A page of a list: Relay's `edges { cursor node }` and `pageInfo`, plus
/// `totalCount`.
pub type Page<Node> = Connection<String, Node, TotalCount, EmptyFields>;

type Counter = Box<dyn Fn() -> BoxFuture<'static, Result<u64, StoreError>> + Send + Sync>;

/// A connection's `totalCount`, counted only when a client selects it.
pub struct TotalCount(Counter);

impl TotalCount {
    pub fn new(
        count: impl Fn() -> BoxFuture<'static, Result<u64, StoreError>> + Send + Sync + 'static,
    ) -> Self {
        TotalCount(Box::new(count))
    }

    /// A count already known.
    pub fn known(count: u64) -> Self {
        TotalCount::new(move || Box::pin(async move { Ok(count) }))
    }
}

#[Object]
impl TotalCount {
    /// Items in the whole list, on every page together (filters applied).
    async fn total_count(&self) -> Result<u64, ApiError> {
        Ok((self.0)().await?)
    }
}

/// The server's maximum page size, which also bounds a bulk request.
fn max_page_size(ctx: &Context<'_>) -> u32 {
    ctx.data_opt::<GraphqlLimits>()
        .map_or(GraphqlLimits::default().max_page_size, |l| l.max_page_size)
}

/// `first` checked against the configured maximum page size.
fn page_size(ctx: &Context<'_>, first: Option<i32>) -> Result<u32, ApiError> {
    let max = max_page_size(ctx);
    let Some(first) = first else {
        return Ok(DEFAULT_PAGE_SIZE.min(max));
    };
    match u32::try_from(first) {
        Ok(first) if (1..=max).contains(&first) => Ok(first),
        _ => Err(ApiError::invalid(
            "first",
            format!("must be between 1 and {max}"),
        )),
    }
}

/// What a page of a connection costs against the complexity limit: its
/// selection once per node asked for.
fn page_cost(first: Option<i32>, child_complexity: usize) -> usize {
    let nodes = first.map_or(DEFAULT_PAGE_SIZE as usize, |n| n.clamp(1, 10_000) as usize);
    nodes.saturating_mul(child_complexity.max(1))
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
    /// The payload. A customer (who sees only their own orders' events)
    /// gets the part meant for them: no references, reservation ids or
    /// providers' words.
    async fn data(&self, ctx: &Context<'_>) -> Result<Json<Value>, ApiError> {
        if access::principal(ctx)?.is_admin() {
            return Ok(Json(self.0.data.clone()));
        }
        Ok(Json(customer_view::order_event_data(
            &self.0.event_type,
            &self.0.data,
        )))
    }
    /// For admins; null for customers.
    async fn correlation_id(&self, ctx: &Context<'_>) -> Result<Option<Uuid>, ApiError> {
        Ok(access::principal(ctx)?
            .is_admin()
            .then_some(self.0.metadata.correlation_id)
            .flatten())
    }
    /// For admins; null for customers.
    async fn causation_id(&self, ctx: &Context<'_>) -> Result<Option<Uuid>, ApiError> {
        Ok(access::principal(ctx)?
            .is_admin()
            .then_some(self.0.metadata.causation_id)
            .flatten())
    }
    /// The OpenTelemetry trace the event was written in (32 hex digits):
    /// the request's, or for a saga's events the request that placed the
    /// order. Null for events written before traces were recorded. For
    /// admins; null for customers.
    async fn trace_id(&self, ctx: &Context<'_>) -> Result<Option<String>, ApiError> {
        Ok(access::principal(ctx)?
            .is_admin()
            .then_some(self.0.metadata.trace_parent)
            .flatten()
            .map(|trace| trace.trace_id()))
    }
    /// Who or what wrote the event (`admin:<sub>`, `customer:<id>`,
    /// `saga-runner:<node>`). For admins; null for customers.
    async fn actor(&self, ctx: &Context<'_>) -> Result<Option<&str>, ApiError> {
        Ok(access::principal(ctx)?
            .is_admin()
            .then_some(self.0.metadata.actor.as_deref())
            .flatten())
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}
