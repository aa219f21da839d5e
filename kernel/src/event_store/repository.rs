//! Loads aggregates by replaying their streams and saves the events their
//! commands produce: the seam between the pure domain and the event store.

use std::marker::PhantomData;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::cache::AggregateCache;
use super::{
    AppendOutcome, AppendRequest, EventMetadata, EventStore, MAX_STREAMS_PER_READ, NewEvent,
    RecordedEvent, StoreError, StreamSelection,
};
use crate::domain::{Aggregate, DomainEvent};

/// An aggregate's state with the stream version it was rebuilt from, which is
/// the expected version for the next append.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded<A> {
    pub state: A,
    pub version: u32,
}

/// Typed access to the streams of one aggregate type.
pub struct AggregateRepository<A> {
    store: Arc<dyn EventStore>,
    /// Where [`AggregateRepository::load`] starts from, if set.
    cache: Option<Arc<AggregateCache>>,
    aggregate: PhantomData<fn() -> A>,
}

impl<A> Clone for AggregateRepository<A> {
    fn clone(&self) -> Self {
        AggregateRepository {
            store: Arc::clone(&self.store),
            cache: self.cache.clone(),
            aggregate: PhantomData,
        }
    }
}

impl<A: Aggregate> AggregateRepository<A> {
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        AggregateRepository {
            store,
            cache: None,
            aggregate: PhantomData,
        }
    }

    /// A repository whose loads start from `cache` and read only the
    /// events written since (see [`AggregateCache`]).
    pub fn cached(store: Arc<dyn EventStore>, cache: Arc<AggregateCache>) -> Self {
        AggregateRepository {
            store,
            cache: Some(cache),
            aggregate: PhantomData,
        }
    }

    /// The aggregate as it is now. A missing stream loads as the default state at version 0.
    pub async fn load(&self, id: Uuid) -> Result<Loaded<A>, StoreError> {
        if self.cache.is_none() {
            return self.load_selected(id, StreamSelection::default()).await;
        }
        // From the cached version, as a read of several streams: the store
        // may merge it with other callers' (see `storage::stream_reads`).
        self.load_many(&[id])
            .await?
            .pop()
            .ok_or_else(|| StoreError::Corrupt(format!("stream {id} missing from its own load")))
    }

    /// The aggregates `ids` as they are now, in the order of `ids`, in one
    /// read of the store per [`MAX_STREAMS_PER_READ`] ids instead of one
    /// per aggregate. Like [`Self::load`], each starts from the cache when
    /// it can and reads only what is new.
    pub async fn load_many(&self, ids: &[Uuid]) -> Result<Vec<Loaded<A>>, StoreError> {
        let mut all = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(MAX_STREAMS_PER_READ) {
            // Each stream once: a store reading stream by stream would
            // return a repeated one's events twice.
            let mut unique = chunk.to_vec();
            unique.sort_unstable();
            unique.dedup();
            let starts: Vec<Loaded<A>> = unique
                .iter()
                .map(|&id| {
                    self.cache
                        .as_ref()
                        .and_then(|cache| cache.get::<A>(id))
                        .unwrap_or_else(|| Loaded {
                            state: A::default(),
                            version: 0,
                        })
                })
                .collect();
            let after: Vec<(Uuid, u32)> = unique
                .iter()
                .zip(&starts)
                .map(|(&id, start)| (id, start.version))
                .collect();
            // Readability is for followers of the global log; a load wants
            // every committed event of its streams.
            let mut recorded: Vec<RecordedEvent> = self
                .store
                .read_streams_after(&after)
                .await?
                .into_iter()
                .map(|(event, _readable)| event)
                .collect();
            recorded.sort_by_key(|event| (event.aggregate_id, event.version));
            let mut loaded = Vec::with_capacity(unique.len());
            for (&id, start) in unique.iter().zip(starts) {
                let from = recorded.partition_point(|event| event.aggregate_id < id);
                let to = recorded.partition_point(|event| event.aggregate_id <= id);
                let news = &recorded[from..to];
                if news.is_empty() {
                    loaded.push(start);
                    continue;
                }
                let now = Self::fold_onto(id, start, news)?;
                if let Some(cache) = &self.cache {
                    cache.put(id, &now);
                }
                loaded.push(now);
            }
            for id in chunk {
                let index = unique.partition_point(|unique_id| unique_id < id);
                all.push(loaded.get(index).cloned().ok_or_else(|| {
                    StoreError::Corrupt(format!("stream {id} missing from its own load"))
                })?);
            }
        }
        Ok(all)
    }

    /// The aggregate as it was at `version` (or its latest version, if lower).
    pub async fn load_at_version(&self, id: Uuid, version: u32) -> Result<Loaded<A>, StoreError> {
        let selection = StreamSelection {
            to_version: Some(version),
            ..StreamSelection::default()
        };
        self.load_selected(id, selection).await
    }

    /// The aggregate as it was at `time`.
    pub async fn load_as_of(&self, id: Uuid, time: DateTime<Utc>) -> Result<Loaded<A>, StoreError> {
        let selection = StreamSelection {
            until: Some(time),
            ..StreamSelection::default()
        };
        self.load_selected(id, selection).await
    }

    async fn load_selected(
        &self,
        id: Uuid,
        selection: StreamSelection,
    ) -> Result<Loaded<A>, StoreError> {
        let recorded = self.store.read_stream(id, selection).await?;
        Self::fold(id, &recorded)
    }

    /// The aggregate `id` rebuilt from `recorded`, its stream's events in
    /// version order (as read, for instance, by [`EventStore::read_streams`]).
    pub fn fold(id: Uuid, recorded: &[RecordedEvent]) -> Result<Loaded<A>, StoreError> {
        let empty = Loaded {
            state: A::default(),
            version: 0,
        };
        Self::fold_onto(id, empty, recorded)
    }

    /// `start` with `recorded`, the events after its version in version
    /// order, folded in.
    fn fold_onto(
        id: Uuid,
        start: Loaded<A>,
        recorded: &[RecordedEvent],
    ) -> Result<Loaded<A>, StoreError> {
        let Loaded {
            mut state,
            mut version,
        } = start;
        for event in recorded {
            if event.aggregate_type != A::AGGREGATE_TYPE {
                return Err(StoreError::AggregateTypeMismatch {
                    aggregate_id: id,
                    existing: event.aggregate_type.clone(),
                    requested: A::AGGREGATE_TYPE.to_string(),
                });
            }
            state.apply(&decode::<A::Event>(event)?);
            version = event.version;
        }
        Ok(Loaded { state, version })
    }

    /// Appends `events` to the aggregate's stream if it is still at `expected_version`.
    pub async fn append(
        &self,
        id: Uuid,
        expected_version: u32,
        events: &[A::Event],
        metadata: EventMetadata,
        idempotency_key: Option<String>,
    ) -> Result<AppendOutcome, StoreError> {
        let new_events = events.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
        let mut request =
            AppendRequest::single(id, A::AGGREGATE_TYPE, expected_version, new_events)
                .with_metadata(metadata);
        request.idempotency_key = idempotency_key;
        self.store.append(request).await
    }
}

/// Turns a domain event into a storable one: the serde tag becomes the event type.
pub fn encode<E: DomainEvent>(event: &E) -> Result<NewEvent, StoreError> {
    let tagged = serde_json::to_value(event).map_err(|e| StoreError::Codec(e.to_string()))?;
    let Value::Object(mut fields) = tagged else {
        return Err(StoreError::Codec(
            "domain events must serialize as {\"type\": ..., \"data\": ...}".into(),
        ));
    };
    let Some(Value::String(event_type)) = fields.remove("type") else {
        return Err(StoreError::Codec(
            "domain event has no string `type` tag".into(),
        ));
    };
    let data = fields.remove("data").unwrap_or(Value::Null);
    let mut new_event = NewEvent::new(event_type, data);
    new_event.schema_version = E::schema_version(&new_event.event_type);
    Ok(new_event)
}

/// Turns a stored event back into a domain event, upcasting older payloads.
pub fn decode<E: DomainEvent>(event: &RecordedEvent) -> Result<E, StoreError> {
    let data = E::upcast(&event.event_type, event.schema_version, event.data.clone())
        .map_err(|reason| StoreError::Codec(format!("event {}: {reason}", event.id)))?;
    let mut tagged = serde_json::Map::new();
    tagged.insert("type".into(), Value::String(event.event_type.clone()));
    if !data.is_null() {
        tagged.insert("data".into(), data);
    }
    serde_json::from_value(Value::Object(tagged))
        .map_err(|e| StoreError::Codec(format!("event {} ({}): {e}", event.id, event.event_type)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_store::Position;
    use serde::{Deserialize, Serialize};
    use serde_json::json;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "type", content = "data")]
    enum Sample {
        Opened { name: String },
        Closed,
        Renamed { to: String },
    }

    impl DomainEvent for Sample {
        fn schema_version(event_type: &str) -> u32 {
            if event_type == "Renamed" { 2 } else { 1 }
        }

        fn upcast(event_type: &str, stored_version: u32, data: Value) -> Result<Value, String> {
            match (event_type, stored_version) {
                // Schema 1 called the field `name`.
                ("Renamed", 1) => Ok(json!({ "to": data["name"] })),
                _ if stored_version == Self::schema_version(event_type) => Ok(data),
                _ => Err(format!("unknown schema {stored_version}")),
            }
        }
    }

    fn recorded(event_type: &str, schema_version: u32, data: Value) -> RecordedEvent {
        RecordedEvent {
            id: Uuid::now_v7(),
            position: Position::START,
            aggregate_id: Uuid::now_v7(),
            aggregate_type: "sample".into(),
            event_type: event_type.into(),
            schema_version,
            data,
            version: 1,
            metadata: EventMetadata::default(),
            created_at: Utc::now(),
        }
    }

    #[test]
    fn encode_splits_tag_and_payload() {
        let event = encode(&Sample::Opened { name: "a".into() }).expect("encodes");
        assert_eq!(event.event_type, "Opened");
        assert_eq!(event.data, json!({"name": "a"}));
        assert_eq!(event.schema_version, 1);
        let unit = encode(&Sample::Closed).expect("encodes");
        assert_eq!(
            (unit.event_type.as_str(), unit.data),
            ("Closed", Value::Null)
        );
        assert_eq!(
            encode(&Sample::Renamed { to: "b".into() })
                .map(|e| e.schema_version)
                .ok(),
            Some(2)
        );
    }

    #[test]
    fn decode_round_trips_and_upcasts_old_schemas() {
        for original in [Sample::Opened { name: "x".into() }, Sample::Closed] {
            let new_event = encode(&original).expect("encodes");
            let stored = recorded(
                &new_event.event_type,
                new_event.schema_version,
                new_event.data,
            );
            assert_eq!(decode::<Sample>(&stored).ok(), Some(original));
        }
        let old = recorded("Renamed", 1, json!({"name": "legacy"}));
        assert_eq!(
            decode::<Sample>(&old).ok(),
            Some(Sample::Renamed {
                to: "legacy".into()
            })
        );
    }

    #[test]
    fn decode_reports_unknown_types_and_schemas() {
        assert!(matches!(
            decode::<Sample>(&recorded("Exploded", 1, json!({}))),
            Err(StoreError::Codec(_))
        ));
        assert!(matches!(
            decode::<Sample>(&recorded("Opened", 9, json!({}))),
            Err(StoreError::Codec(_))
        ));
        assert!(matches!(
            decode::<Sample>(&recorded("Opened", 1, json!({"name": 5}))),
            Err(StoreError::Codec(_))
        ));
    }
}
