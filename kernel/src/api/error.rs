//! How errors reach GraphQL clients: every resolver error carries a machine
//! readable `extensions.code` (and `extensions.field` where one input is at
//! fault). Internal failures are logged in full and reported without detail.

use async_graphql::{Enum, ErrorExtensions};

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
    /// The service failed; the request may be retried.
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidInput => "INVALID_INPUT",
            ErrorCode::VersionConflict => "VERSION_CONFLICT",
            ErrorCode::AggregateTypeMismatch => "AGGREGATE_TYPE_MISMATCH",
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
    InvalidArgument { field: String, message: String },
    Store(StoreError),
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
            ) => ErrorCode::Internal,
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
        };
        async_graphql::Error::new(message).extend_with(|_, extensions| {
            extensions.set("code", code.as_str());
            if let Some(field) = field {
                extensions.set("field", field);
            }
        })
    }
}
