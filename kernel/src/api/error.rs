//! How errors reach GraphQL clients: every resolver error carries a machine
//! readable `extensions.code` (and `extensions.field` where one input is at
//! fault). Internal failures are logged in full and reported without detail.

use std::sync::Arc;

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextRequest, NextSubscribe,
};
use async_graphql::{Enum, ErrorExtensions, Response, ServerError};
use futures_util::StreamExt as _;
use futures_util::stream::BoxStream;

use async_graphql::SimpleObject;

use commerce_plugin_host::LoadError;

use crate::carts::CartStoreError;
use crate::commerce::CommandError;
use crate::domain::DomainError;
use crate::event_store::StoreError;

/// Error codes clients can branch on. Also used in typed mutation payloads.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// An argument is malformed or out of range; `field` names it.
    InvalidInput,
    /// The aggregate changed since the caller read it; reload and retry.
    VersionConflict,
    /// The id belongs to an aggregate of another type.
    AggregateTypeMismatch,
    /// Nothing with this id exists.
    NotFound,
    /// Not enough available stock for a reservation.
    InsufficientStock,
    /// On hand would drop below what is reserved.
    StockBelowReserved,
    /// The reservation does not exist or has ended.
    ReservationNotFound,
    /// The owner already holds a reservation of another quantity.
    ReservationMismatch,
    /// Another product has this SKU.
    DuplicateSku,
    /// Amounts of different currencies were combined.
    CurrencyMismatch,
    /// The product is not active and cannot be sold.
    ProductInactive,
    /// The order's state machine does not allow this transition.
    IllegalTransition,
    /// The cart is being checked out or was checked out, and cannot change.
    CartNotOpen,
    /// A plugin version was refused (manifest, hash, component, imports,
    /// missing version); the message says why and the active version stays.
    PluginRejected,
    /// The change was saved, but the read model had not caught up with it
    /// before the response: read it again shortly.
    ReadModelLagging,
    /// No valid bearer token came with the request (HTTP 401).
    Unauthenticated,
    /// The token's role may not do this (admin only), or the kernel is
    /// configured not to (guest sessions turned off).
    Forbidden,
    /// Too many requests of this kind from this client address; try again
    /// shortly.
    RateLimited,
    /// The document is malformed, fails validation against the schema, or
    /// exceeds a limit (depth, complexity, aliases, batch size).
    InvalidQuery,
    /// The service failed; the request may be retried.
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidInput => "INVALID_INPUT",
            ErrorCode::VersionConflict => "VERSION_CONFLICT",
            ErrorCode::AggregateTypeMismatch => "AGGREGATE_TYPE_MISMATCH",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::InsufficientStock => "INSUFFICIENT_STOCK",
            ErrorCode::StockBelowReserved => "STOCK_BELOW_RESERVED",
            ErrorCode::ReservationNotFound => "RESERVATION_NOT_FOUND",
            ErrorCode::ReservationMismatch => "RESERVATION_MISMATCH",
            ErrorCode::DuplicateSku => "DUPLICATE_SKU",
            ErrorCode::CurrencyMismatch => "CURRENCY_MISMATCH",
            ErrorCode::ProductInactive => "PRODUCT_INACTIVE",
            ErrorCode::IllegalTransition => "ILLEGAL_TRANSITION",
            ErrorCode::CartNotOpen => "CART_NOT_OPEN",
            ErrorCode::PluginRejected => "PLUGIN_REJECTED",
            ErrorCode::ReadModelLagging => "READ_MODEL_LAGGING",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::InvalidQuery => "INVALID_QUERY",
            ErrorCode::Internal => "INTERNAL",
        }
    }
}

/// An error a resolver returns: resolvers return `Result<T, ApiError>`.
///
/// Deliberately not `Display`: async-graphql converts any `Display` error into a
/// GraphQL error without a code, and that path must not be the one taken.
#[derive(Debug)]
pub enum ApiError {
    InvalidArgument {
        field: String,
        message: String,
    },
    Store(StoreError),
    /// A batched read failed (shared by every field that waited on it).
    Batch(std::sync::Arc<StoreError>),
    Carts(CartStoreError),
    /// The plugin directory or engine failed (not a refused plugin).
    Plugins(LoadError),
    /// A command refused where the schema has no payload to carry the refusal.
    Refused(UserError),
    /// The request carries no principal (see [`crate::api::access`]).
    Unauthenticated,
    /// The principal's role may not use this field.
    Forbidden,
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        ApiError::Store(error)
    }
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::InvalidArgument { .. } => ErrorCode::InvalidInput,
            ApiError::Store(StoreError::InvalidInput { .. }) => ErrorCode::InvalidInput,
            ApiError::Store(StoreError::VersionConflict { .. }) => ErrorCode::VersionConflict,
            ApiError::Store(StoreError::AggregateTypeMismatch { .. }) => {
                ErrorCode::AggregateTypeMismatch
            }
            ApiError::Store(
                StoreError::Codec(_)
                | StoreError::Corrupt(_)
                | StoreError::Database(_)
                | StoreError::Migration(_),
            )
            | ApiError::Batch(_)
            | ApiError::Carts(_)
            | ApiError::Plugins(_) => ErrorCode::Internal,
            ApiError::Refused(refusal) => refusal.code,
            ApiError::Unauthenticated => ErrorCode::Unauthenticated,
            ApiError::Forbidden => ErrorCode::Forbidden,
        }
    }
}

impl From<ApiError> for async_graphql::Error {
    fn from(error: ApiError) -> Self {
        let code = error.code();
        let (message, field) = match error {
            ApiError::InvalidArgument { field, message } => (message, Some(field)),
            ApiError::Store(store_error) => match store_error {
                StoreError::InvalidInput { field, .. } => {
                    (store_error.to_string(), Some(field.to_string()))
                }
                _ if code == ErrorCode::Internal => {
                    tracing::error!(error = %store_error, "request failed");
                    ("internal error".to_string(), None)
                }
                _ => (store_error.to_string(), None),
            },
            ApiError::Refused(refusal) => (refusal.message, refusal.field),
            ApiError::Unauthenticated => ("authentication required".to_string(), None),
            ApiError::Forbidden => ("this needs the admin role".to_string(), None),
            ApiError::Batch(store_error) => {
                tracing::error!(error = %store_error, "request failed");
                ("internal error".to_string(), None)
            }
            ApiError::Carts(cart_error) => {
                tracing::error!(error = %cart_error, "request failed");
                ("internal error".to_string(), None)
            }
            ApiError::Plugins(plugin_error) => {
                tracing::error!(error = %plugin_error, "request failed");
                ("internal error".to_string(), None)
            }
        };
        async_graphql::Error::new(message).extend_with(|_, extensions| {
            extensions.set("code", code.as_str());
            if let Some(field) = field {
                extensions.set("field", field);
            }
        })
    }
}

/// A refused mutation's reason, inside its payload (`errors { field code message }`).
#[derive(SimpleObject, Debug, Clone, PartialEq, Eq)]
pub struct UserError {
    /// The input field at fault, when one is.
    pub field: Option<String>,
    pub code: ErrorCode,
    pub message: String,
}

impl UserError {
    pub fn new(code: ErrorCode, field: Option<&str>, message: impl Into<String>) -> Self {
        UserError {
            field: field.map(str::to_string),
            code,
            message: message.into(),
        }
    }
}

/// How a command's outcome reaches a client: refusals become [`UserError`]s
/// in the payload; store failures stay top-level errors (`INTERNAL`).
pub fn user_error(error: CommandError) -> Result<UserError, ApiError> {
    let message = error.to_string();
    let (code, field) = match error {
        CommandError::Store(store) => return Err(ApiError::Store(store)),
        CommandError::CartStore(carts) => return Err(ApiError::Carts(carts)),
        CommandError::Plugin(refusal) => {
            let field = match refusal {
                LoadError::Io { .. } | LoadError::Engine { .. } => {
                    return Err(ApiError::Plugins(refusal));
                }
                LoadError::InvalidManifest { .. } | LoadError::MissingSecret { .. } => "manifest",
                LoadError::HashMismatch { .. }
                | LoadError::InvalidComponent { .. }
                | LoadError::WrongWorld { .. }
                | LoadError::UngrantedImport { .. } => "component",
                LoadError::AlreadyInstalled { .. } | LoadError::NotInstalled { .. } => "version",
            };
            (ErrorCode::PluginRejected, Some(field))
        }
        CommandError::VersionConflict { .. } => {
            (ErrorCode::VersionConflict, Some("expectedVersion"))
        }
        CommandError::Domain(domain) => match domain {
            DomainError::Invalid { field, .. } => (ErrorCode::InvalidInput, Some(field)),
            DomainError::NotFound { .. } => (ErrorCode::NotFound, None),
            DomainError::AlreadyExists { .. } => (ErrorCode::InvalidInput, Some("id")),
            DomainError::SkuTaken { .. } => (ErrorCode::DuplicateSku, Some("sku")),
            DomainError::CurrencyMismatch { .. } => (ErrorCode::CurrencyMismatch, Some("currency")),
            DomainError::InsufficientStock { .. } => {
                (ErrorCode::InsufficientStock, Some("quantity"))
            }
            DomainError::StockBelowReserved { .. } => {
                (ErrorCode::StockBelowReserved, Some("delta"))
            }
            DomainError::ReservationNotFound { .. } => {
                (ErrorCode::ReservationNotFound, Some("reservationId"))
            }
            DomainError::ReservationMismatch { .. } => {
                (ErrorCode::ReservationMismatch, Some("quantity"))
            }
            DomainError::ProductInactive { .. } => (ErrorCode::ProductInactive, Some("productId")),
            DomainError::IllegalTransition { .. } => (ErrorCode::IllegalTransition, None),
            DomainError::CartNotOpen { .. } => (ErrorCode::CartNotOpen, Some("cartId")),
            DomainError::SagaEnded { .. } => (ErrorCode::IllegalTransition, Some("id")),
        },
    };
    Ok(UserError::new(code, field, message))
}

/// A command's failure as a top-level error, for resolvers without a payload.
pub fn command_failure(error: CommandError) -> ApiError {
    match user_error(error) {
        Ok(refusal) => ApiError::Refused(refusal),
        Err(failure) => failure,
    }
}

/// Longest error message sent; parse errors quote the document, which may
/// be as large as the body limit allows.
const MAX_MESSAGE_CHARS: usize = 300;

/// Gives every error a code (errors raised by the GraphQL engine itself:
/// parse, validation, limits, input coercion, get INVALID_QUERY; resolvers
/// set their own) and cuts long messages, over HTTP and WebSocket alike.
pub struct ErrorShape;

impl ExtensionFactory for ErrorShape {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(ErrorShape)
    }
}

#[async_trait::async_trait]
impl Extension for ErrorShape {
    async fn request(&self, ctx: &ExtensionContext<'_>, next: NextRequest<'_>) -> Response {
        let mut response = next.run(ctx).await;
        shape(&mut response.errors);
        response
    }

    fn subscribe<'s>(
        &self,
        ctx: &ExtensionContext<'_>,
        stream: BoxStream<'s, Response>,
        next: NextSubscribe<'_>,
    ) -> BoxStream<'s, Response> {
        next.run(ctx, stream)
            .map(|mut response| {
                shape(&mut response.errors);
                response
            })
            .boxed()
    }
}

fn shape(errors: &mut [ServerError]) {
    for error in errors {
        let has_code = error
            .extensions
            .as_ref()
            .is_some_and(|extensions| extensions.get("code").is_some());
        if !has_code {
            error
                .extensions
                .get_or_insert_with(Default::default)
                .set("code", ErrorCode::InvalidQuery.as_str());
        }
        shorten(&mut error.message);
    }
}

/// Cuts `message` to [`MAX_MESSAGE_CHARS`], marking the cut.
pub(crate) fn shorten(message: &mut String) {
    if let Some((cut, _)) = message.char_indices().nth(MAX_MESSAGE_CHARS) {
        message.truncate(cut);
        message.push_str("...");
    }
}
