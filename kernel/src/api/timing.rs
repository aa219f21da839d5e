//! `commerce_graphql_request_duration_seconds`: how long each GraphQL
//! request over HTTP took, by operation; and the span of each operation's
//! execution (`graphql`, with the same label), inside the request's span.
//!
//! The label is the operation's type and its first root field (`mutation
//! placeOrder`, `query products`), read from the parsed document: it is
//! bounded by the schema, where a client's `operationName` is whatever the
//! client sends. A document that does not parse is `invalid`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use async_graphql::Response;
use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextExecute, NextParseQuery, NextRequest,
};
use async_graphql::parser::types::{ExecutableDocument, OperationType, Selection};
use async_graphql::registry::Registry;
use async_graphql::{ServerResult, Variables};

use tracing::Instrument as _;

use crate::metrics::Metrics;
use crate::telemetry;

/// Times every request into [`Metrics`].
pub struct GraphqlTiming(pub Arc<Metrics>);

impl ExtensionFactory for GraphqlTiming {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(RequestTiming {
            metrics: Arc::clone(&self.0),
            operation: Mutex::new(None),
        })
    }
}

/// One request's timing; `create` makes one per request.
struct RequestTiming {
    metrics: Arc<Metrics>,
    /// Set once the document is parsed.
    operation: Mutex<Option<String>>,
}

#[async_trait::async_trait]
impl Extension for RequestTiming {
    async fn request(&self, ctx: &ExtensionContext<'_>, next: NextRequest<'_>) -> Response {
        let started = Instant::now();
        let response = next.run(ctx).await;
        let operation = self
            .operation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_else(|| "invalid".to_string());
        self.metrics.record_graphql(operation, started.elapsed());
        response
    }

    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        let document = next.run(ctx, query, variables).await?;
        *self
            .operation
            .lock()
            .unwrap_or_else(PoisonError::into_inner) =
            Some(operation_label(&document, &ctx.schema_env.registry));
        Ok(document)
    }

    async fn execute(
        &self,
        ctx: &ExtensionContext<'_>,
        operation_name: Option<&str>,
        next: NextExecute<'_>,
    ) -> Response {
        let operation = self
            .operation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| "invalid".to_string());
        let span =
            tracing::info_span!(target: telemetry::TARGET, "graphql", operation = %operation);
        next.run(ctx, operation_name).instrument(span).await
    }
}

/// `<type> <first root field>` of the document's first operation; a field
/// the schema's root type does not have is `(unknown)`, so that a client
/// cannot add label values (and series) at will.
pub fn operation_label(document: &ExecutableDocument, schema: &Registry) -> String {
    let Some((_, operation)) = document.operations.iter().next() else {
        return "invalid".to_string();
    };
    let (kind, root) = match operation.node.ty {
        OperationType::Query => ("query", Some(&schema.query_type)),
        OperationType::Mutation => ("mutation", schema.mutation_type.as_ref()),
        OperationType::Subscription => ("subscription", schema.subscription_type.as_ref()),
    };
    let root = root.and_then(|name| schema.types.get(name));
    let first = operation
        .node
        .selection_set
        .node
        .items
        .first()
        .map(|selection| match &selection.node {
            Selection::Field(field) => {
                let name = field.node.name.node.as_str();
                let known = matches!(name, "__typename" | "__schema" | "__type")
                    || root.is_some_and(|root| root.field_by_name(name).is_some());
                if known {
                    name.to_string()
                } else {
                    "(unknown)".to_string()
                }
            }
            Selection::FragmentSpread(_) | Selection::InlineFragment(_) => "(fragment)".to_string(),
        })
        .unwrap_or_else(|| "(empty)".to_string());
    format!("{kind} {first}")
}
