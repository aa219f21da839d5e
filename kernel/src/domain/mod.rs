//! The commerce domain: aggregates, their events and the rules between them.
//!
//! Everything here is pure: no I/O, no clocks, no database. Aggregates decide
//! which events a command produces and fold events into state; the storage
//! adapters persist and replay them (see [`crate::event_store::repository`]).

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// A consistency boundary whose state is the fold of its own event stream.
///
/// `apply` must be deterministic and total: replaying the same events always
/// yields the same state, which is what makes rebuilding by replay exact.
pub trait Aggregate: Default + Send {
    /// Stored with every event of the stream; also guards against reading one
    /// aggregate's stream as another's.
    const AGGREGATE_TYPE: &'static str;

    type Event: DomainEvent;

    fn apply(&mut self, event: &Self::Event);
}

/// An event type family of one aggregate, stored as `(event_type, data)`.
///
/// Implementations are serde enums tagged adjacently, `#[serde(tag = "type",
/// content = "data")]`: the tag becomes the stored event type and the content
/// the stored payload.
pub trait DomainEvent: Serialize + DeserializeOwned + Send + Sync {
    /// Current payload schema of `event_type`. Bump it when a payload's shape
    /// changes, and teach [`DomainEvent::upcast`] to rewrite older payloads.
    fn schema_version(_event_type: &str) -> u32 {
        1
    }

    /// Rewrites a payload stored at `stored_version` into the current schema.
    /// The default accepts only the current schema.
    fn upcast(event_type: &str, stored_version: u32, data: Value) -> Result<Value, String> {
        let current = Self::schema_version(event_type);
        if stored_version == current {
            Ok(data)
        } else {
            Err(format!(
                "no upcaster for {event_type} from schema {stored_version} to {current}"
            ))
        }
    }
}
