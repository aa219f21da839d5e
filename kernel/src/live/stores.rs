//! Store decorators that see every successful append: they report it to
//! [`LiveUpdates`], and record its latency and the orders it moves in
//! [`Metrics`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::LiveUpdates;
use crate::domain::saga::SagaStatus;
use crate::event_store::{
    AppendOutcome, AppendRequest, Backend, EventFilter, EventStore, Position, RecordedEvent,
    StoreError, StreamSelection,
};
use crate::metrics::Metrics;
use crate::sagas::{
    Claim, Committed, InstanceUpdate, SagaCursor, SagaFilter, SagaInstance, SagaStore,
};

/// An event store that reports every successful append to a [`LiveUpdates`]
/// and records it in [`Metrics`].
pub struct NotifyingEventStore {
    inner: Arc<dyn EventStore>,
    live: LiveUpdates,
    metrics: Arc<Metrics>,
}

impl NotifyingEventStore {
    pub fn wrap(
        inner: Arc<dyn EventStore>,
        live: LiveUpdates,
        metrics: Arc<Metrics>,
    ) -> Arc<dyn EventStore> {
        Arc::new(NotifyingEventStore {
            inner,
            live,
            metrics,
        })
    }
}

fn appended_ids(request: &AppendRequest) -> Vec<Uuid> {
    request.streams.iter().map(|s| s.aggregate_id).collect()
}

#[async_trait]
impl EventStore for NotifyingEventStore {
    fn backend(&self) -> Backend {
        self.inner.backend()
    }

    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        let ids = appended_ids(&request);
        let started = Instant::now();
        // The request goes to the store; what metrics need of it is kept.
        let observed = self.metrics.observe(&request);
        let outcome = self.inner.append(request).await?;
        self.metrics
            .record_append(&observed, &outcome, started.elapsed());
        self.live.changed(ids);
        Ok(outcome)
    }

    async fn read_stream(
        &self,
        aggregate_id: Uuid,
        selection: StreamSelection,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_stream(aggregate_id, selection).await
    }

    async fn read_streams(&self, aggregate_ids: &[Uuid]) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_streams(aggregate_ids).await
    }

    async fn read_all_matching(
        &self,
        filter: &EventFilter,
        after: Position,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_all_matching(filter, after, limit).await
    }

    async fn count_matching(&self, filter: &EventFilter) -> Result<u64, StoreError> {
        self.inner.count_matching(filter).await
    }

    async fn head(&self) -> Result<Position, StoreError> {
        self.inner.head().await
    }

    async fn read_streams_after(
        &self,
        streams: &[(Uuid, u32)],
    ) -> Result<Vec<(RecordedEvent, bool)>, StoreError> {
        self.inner.read_streams_after(streams).await
    }

    async fn stream_version(&self, aggregate_id: Uuid) -> Result<u32, StoreError> {
        self.inner.stream_version(aggregate_id).await
    }
}

/// A saga store that reports the events of every successful write to a
/// [`LiveUpdates`] (saga writes append in the store's own transaction) and
/// records them in [`Metrics`].
pub struct NotifyingSagaStore {
    inner: Arc<dyn SagaStore>,
    live: LiveUpdates,
    metrics: Arc<Metrics>,
}

impl NotifyingSagaStore {
    pub fn wrap(
        inner: Arc<dyn SagaStore>,
        live: LiveUpdates,
        metrics: Arc<Metrics>,
    ) -> Arc<dyn SagaStore> {
        Arc::new(NotifyingSagaStore {
            inner,
            live,
            metrics,
        })
    }
}

#[async_trait]
impl SagaStore for NotifyingSagaStore {
    async fn start(
        &self,
        instance: InstanceUpdate,
        saga_type: &str,
        correlation_id: Uuid,
        request: AppendRequest,
    ) -> Result<Option<AppendOutcome>, StoreError> {
        let ids = appended_ids(&request);
        let began = Instant::now();
        let observed = self.metrics.observe(&request);
        let started = self
            .inner
            .start(instance, saga_type, correlation_id, request)
            .await?;
        if let Some(outcome) = &started {
            self.metrics
                .record_append(&observed, outcome, began.elapsed());
            self.live.changed(ids);
        }
        Ok(started)
    }

    async fn claim(
        &self,
        owner: &str,
        lease: Duration,
        limit: u32,
        skip: &[Uuid],
    ) -> Result<Vec<Claim>, StoreError> {
        self.inner.claim(owner, lease, limit, skip).await
    }

    async fn heartbeat(
        &self,
        owner: &str,
        sagas: &[Uuid],
        lease: Duration,
    ) -> Result<u64, StoreError> {
        self.inner.heartbeat(owner, sagas, lease).await
    }

    async fn hold(&self, claim: Claim, at_least: Duration) -> Result<bool, StoreError> {
        self.inner.hold(claim, at_least).await
    }

    async fn commit(
        &self,
        fence: Option<Claim>,
        update: InstanceUpdate,
        request: AppendRequest,
    ) -> Result<Committed, StoreError> {
        let ids = appended_ids(&request);
        let started = Instant::now();
        let observed = self.metrics.observe(&request);
        let committed = self.inner.commit(fence, update, request).await?;
        if let Committed::Written(outcome) = &committed {
            self.metrics
                .record_append(&observed, outcome, started.elapsed());
            self.live.changed(ids);
        }
        Ok(committed)
    }

    async fn release(
        &self,
        claim: Claim,
        seen_version: Option<u32>,
        next_run_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.inner
            .release(claim, seen_version, next_run_at, now)
            .await
    }

    async fn defer(&self, claim: Claim, delay: Duration) -> Result<(), StoreError> {
        self.inner.defer(claim, delay).await
    }

    async fn release_all(&self, owner: &str, keep: &[Uuid]) -> Result<u64, StoreError> {
        self.inner.release_all(owner, keep).await
    }

    async fn get(&self, saga_id: Uuid) -> Result<Option<SagaInstance>, StoreError> {
        self.inner.get(saga_id).await
    }

    async fn list(
        &self,
        filter: &SagaFilter,
        after: Option<SagaCursor>,
        limit: u32,
    ) -> Result<Vec<SagaInstance>, StoreError> {
        self.inner.list(filter, after, limit).await
    }

    async fn count(&self, filter: &SagaFilter) -> Result<u64, StoreError> {
        self.inner.count(filter).await
    }

    async fn count_live_by_status(&self) -> Result<Vec<(SagaStatus, u64)>, StoreError> {
        self.inner.count_live_by_status().await
    }

    async fn count_by_status(&self) -> Result<Vec<(SagaStatus, u64)>, StoreError> {
        self.inner.count_by_status().await
    }

    async fn orders_without_saga(
        &self,
        placed_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Uuid>, StoreError> {
        self.inner.orders_without_saga(placed_before, limit).await
    }
}
