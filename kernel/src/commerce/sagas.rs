//! Saga commands: starting an order's saga, defining the saga type, and the
//! requests people make of a running saga (cancel the order, compensate,
//! retry). The runner that drives sagas is [`crate::sagas::runner`].
//!
//! Requests are events on the saga's stream, appended at the version read
//! (so they serialize with the runner's writes) together with an update of
//! its `saga_instances` row that makes it due at once.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use uuid::Uuid;

use super::{CommandContext, CommandError, Commerce, ConflictCounter, Written, stream_append};
use crate::domain::order::{Order, OrderStatus};
use crate::domain::saga::{
    ORDER_FULFILMENT, ParkCause, Saga, SagaDefinition, SagaDefinitions, SagaEvent, SagaStatus,
};
use crate::domain::{Aggregate, DomainError};
use crate::event_store::repository::Loaded;
use crate::event_store::{AppendRequest, EventMetadata, StoreError, StreamAppend};
use crate::sagas::{
    Claim, Committed, InstanceUpdate, LeaseChange, SagaCursor, SagaFilter, SagaStore,
};

/// Most parked sagas [`Sagas::retry_parked`] looks at in one call.
pub const MAX_PARKED_SCANNED: usize = 10_000;
/// Parked sagas read per page while looking.
const PARKED_PAGE: u32 = 200;

/// Saga commands, sharing the command handlers and the saga store.
#[derive(Clone)]
pub struct Sagas {
    commerce: Commerce,
    store: Arc<dyn SagaStore>,
    /// Wakes this process's runner when a saga becomes due.
    wake: Arc<Notify>,
}

/// The row of a saga in the state `saga` (at stream version `version`).
pub(crate) fn instance_update(
    saga_id: Uuid,
    saga: &Saga,
    version: u32,
    next_run_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> InstanceUpdate {
    InstanceUpdate {
        saga_id,
        status: saga.status.unwrap_or(SagaStatus::Running),
        current_step: saga.current_step().map(|step| step.name().to_string()),
        version,
        next_run_at,
        now,
        lease: LeaseChange::Keep,
    }
}

/// Whether a saga in state `saga` is due again only if someone asks (it is
/// final or parked): the write that brings it there ends its drive.
pub(crate) fn ends_drive(saga: &Saga) -> bool {
    saga.status
        .is_some_and(|s| s.is_final() || s == SagaStatus::Parked)
}

impl Sagas {
    pub fn new(commerce: Commerce, store: Arc<dyn SagaStore>) -> Self {
        Sagas {
            commerce,
            store,
            wake: Arc::new(Notify::new()),
        }
    }

    pub fn store(&self) -> &Arc<dyn SagaStore> {
        &self.store
    }

    pub fn commerce(&self) -> &Commerce {
        &self.commerce
    }

    /// Notified whenever this process makes a saga due.
    pub fn wake(&self) -> &Arc<Notify> {
        &self.wake
    }

    fn known_type(saga_type: &str) -> Result<(), CommandError> {
        if saga_type == ORDER_FULFILMENT {
            Ok(())
        } else {
            Err(DomainError::invalid(
                "sagaType",
                format!("unknown saga type {saga_type:?}; known: {ORDER_FULFILMENT}"),
            )
            .into())
        }
    }

    /// The definitions of `saga_type` (the default applies until one is set).
    pub async fn definitions(
        &self,
        saga_type: &str,
    ) -> Result<Loaded<SagaDefinitions>, CommandError> {
        Self::known_type(saga_type)?;
        Ok(self
            .commerce
            .repository::<SagaDefinitions>()
            .load(SagaDefinitions::stream_id(saga_type))
            .await?)
    }

    /// Sets the definition new sagas of `saga_type` follow. Running sagas
    /// keep theirs.
    pub async fn define(
        &self,
        saga_type: &str,
        definition: SagaDefinition,
        context: &CommandContext,
    ) -> Result<Written<SagaDefinitions>, CommandError> {
        Self::known_type(saga_type)?;
        let id = SagaDefinitions::stream_id(saga_type);
        self.commerce
            .retrying(ConflictCounter::Other, false, || async {
                let loaded = self
                    .commerce
                    .repository::<SagaDefinitions>()
                    .load(id)
                    .await?;
                let events = loaded.state.define(definition.clone())?;
                if events.is_empty() {
                    return Ok(Written::unchanged(id, loaded));
                }
                let outcome = self
                    .commerce
                    .repository::<SagaDefinitions>()
                    .append(id, loaded.version, &events, context.metadata(), None)
                    .await?;
                Ok(Written::after(id, loaded, &events, outcome.last_position))
            })
            .await
    }

    /// Starts the order-fulfilment saga of `order_id` with the current
    /// definition; returns the saga's id. Idempotent: an order has one saga.
    pub async fn start_for_order(
        &self,
        order_id: Uuid,
        context: &CommandContext,
    ) -> Result<Uuid, CommandError> {
        self.start(order_id, None, context).await?;
        Ok(Saga::id_for(ORDER_FULFILMENT, order_id))
    }

    /// [`Self::start_for_order`], saying whether this call started the saga:
    /// its id, or `None` when it existed already (another process started
    /// it meanwhile).
    pub async fn start_if_missing(
        &self,
        order_id: Uuid,
        context: &CommandContext,
    ) -> Result<Option<Uuid>, CommandError> {
        Ok(self
            .start(order_id, None, context)
            .await?
            .map(|written| written.id))
    }

    /// Starts the order's saga, with a cancellation (`cancel`, its reason)
    /// already requested in the same write when given. The saga as written
    /// when this call started it; `None` when it existed already.
    async fn start(
        &self,
        order_id: Uuid,
        cancel: Option<&str>,
        context: &CommandContext,
    ) -> Result<Option<Written<Saga>>, CommandError> {
        let saga_id = Saga::id_for(ORDER_FULFILMENT, order_id);
        // No look for an existing saga first: the start itself writes
        // nothing and says so when the saga exists, and almost every start
        // is of a new order's saga.
        self.commerce.load_order(order_id).await?;
        let definition = self.definitions(ORDER_FULFILMENT).await?.state.effective();
        let now = Utc::now();
        let mut events = Saga::start(ORDER_FULFILMENT, order_id, definition, now)?;
        let mut saga = Saga::default();
        for event in &events {
            saga.apply(event);
        }
        if let Some(reason) = cancel {
            let requested = saga.request_compensation(saga_id, reason, true)?;
            for event in &requested {
                saga.apply(event);
            }
            events.extend(requested);
        }
        let request = AppendRequest {
            streams: vec![stream_append::<Saga>(saga_id, 0, &events)?],
            metadata: saga_metadata(context, order_id),
            idempotency_key: None,
        };
        let update = instance_update(saga_id, &saga, events.len() as u32, Some(now), now);
        let started = match self
            .store
            .start(update, ORDER_FULFILMENT, order_id, request)
            .await
        {
            Ok(Some(outcome)) => Some(Written {
                id: saga_id,
                state: saga,
                version: events.len() as u32,
                position: Some(outcome.last_position),
            }),
            // Started concurrently elsewhere: it exists.
            Ok(None) | Err(StoreError::VersionConflict { .. }) => None,
            Err(other) => return Err(other.into()),
        };
        self.wake.notify_one();
        Ok(started)
    }

    /// The saga as its stream says it is now.
    pub async fn load(&self, saga_id: Uuid) -> Result<Loaded<Saga>, CommandError> {
        let loaded = self.commerce.repository::<Saga>().load(saga_id).await?;
        if loaded.state.status.is_none() {
            return Err(DomainError::NotFound {
                kind: "saga",
                id: saga_id,
            }
            .into());
        }
        Ok(loaded)
    }

    /// The order's saga, if it has one.
    pub async fn for_order(&self, order_id: Uuid) -> Result<Option<Loaded<Saga>>, CommandError> {
        let saga_id = Saga::id_for(ORDER_FULFILMENT, order_id);
        let loaded = self.commerce.repository::<Saga>().load(saga_id).await?;
        Ok(loaded.state.status.is_some().then_some(loaded))
    }

    /// Cancels an order through its saga, which undoes what it did and then
    /// cancels the order. An order whose saga has not started yet gets it
    /// now (starting is idempotent, so a `placeOrder` starting it at the
    /// same moment starts the same one), with the request on it: the saga
    /// then cancels before any step. The order is never cancelled beside a
    /// running saga, so a charge can never follow its cancellation. A
    /// finished order is refused as the state machine says.
    pub async fn cancel_order(
        &self,
        order_id: Uuid,
        reason: &str,
        context: &CommandContext,
    ) -> Result<Written<Saga>, CommandError> {
        let saga_id = Saga::id_for(ORDER_FULFILMENT, order_id);
        let order = self.commerce.load_order(order_id).await?;
        let finished = |order: &Written<Order>| {
            let from = order.state.status.unwrap_or(OrderStatus::Pending);
            DomainError::IllegalTransition {
                from,
                to: OrderStatus::Cancelled,
            }
        };
        let saga = match self.for_order(order_id).await? {
            Some(saga) => saga,
            None => {
                if order.state.status.is_some_and(OrderStatus::is_final) {
                    return Err(finished(&order).into());
                }
                // Started with the cancellation in the same write, so no
                // runner can take a step first.
                if let Some(started) = self.start(order_id, Some(reason), context).await? {
                    return Ok(started);
                }
                // `placeOrder` started it meanwhile: ask it like any other.
                self.load(saga_id).await?
            }
        };
        if !saga.state.status.is_some_and(SagaStatus::is_final) {
            match self
                .request(saga_id, context, |saga| {
                    saga.request_compensation(saga_id, reason, true)
                })
                .await
            {
                // The saga finished meanwhile: refused like a finished order.
                Err(CommandError::Domain(DomainError::SagaEnded { .. })) => {}
                other => return other,
            }
        }
        let order = self.commerce.load_order(order_id).await?;
        Err(finished(&order).into())
    }

    /// An admin's request to undo a saga (the order ends FAILED).
    pub async fn compensate(
        &self,
        saga_id: Uuid,
        reason: &str,
        context: &CommandContext,
    ) -> Result<Written<Saga>, CommandError> {
        self.request(saga_id, context, |saga| {
            saga.request_compensation(saga_id, reason, false)
        })
        .await
    }

    /// An admin's request to go on now (a parked saga resumes compensating).
    pub async fn retry(
        &self,
        saga_id: Uuid,
        context: &CommandContext,
    ) -> Result<Written<Saga>, CommandError> {
        self.request(saga_id, context, |saga| saga.request_retry(saga_id))
            .await
    }

    /// Retries the oldest `limit` PARKED sagas (those parked for `cause`
    /// among them, when given; at most [`MAX_PARKED_SCANNED`] are looked
    /// at): to each what [`Self::retry`] does, once it is checked, in the
    /// same write, that the saga is still parked for that cause. One saga's
    /// refusal or failure stops none of the others; each outcome comes back
    /// with its saga's id.
    pub async fn retry_parked(
        &self,
        cause: Option<ParkCause>,
        limit: u32,
        context: &CommandContext,
    ) -> Result<Vec<(Uuid, Result<Written<Saga>, CommandError>)>, CommandError> {
        let filter = SagaFilter {
            correlation_id: None,
            status: Some(SagaStatus::Parked),
            overdue_by: None,
        };
        let mut outcomes = Vec::new();
        let (mut after, mut scanned) = (None, 0);
        while outcomes.len() < limit as usize && scanned < MAX_PARKED_SCANNED {
            let page = self.store.list(&filter, after, PARKED_PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(SagaCursor {
                created_at: last.created_at,
                saga_id: last.saga_id,
            });
            scanned += page.len();
            for instance in page {
                if outcomes.len() == limit as usize {
                    break;
                }
                let saga_id = instance.saga_id;
                let wanted = |saga: &Saga| {
                    saga.status == Some(SagaStatus::Parked)
                        && cause.is_none_or(|cause| saga.park_cause == Some(cause))
                };
                match self.load(saga_id).await {
                    Ok(loaded) if !wanted(&loaded.state) => continue,
                    Ok(_) => {}
                    Err(error) => {
                        outcomes.push((saga_id, Err(error)));
                        continue;
                    }
                }
                let outcome = self
                    .request(saga_id, context, |saga| {
                        if wanted(saga) {
                            saga.request_retry(saga_id)
                        } else {
                            Err(DomainError::invalid(
                                "sagaId",
                                "no longer parked for that cause: left as it is",
                            ))
                        }
                    })
                    .await;
                outcomes.push((saga_id, outcome));
            }
        }
        Ok(outcomes)
    }

    /// Appends what `decide` makes of the saga and makes it due at once,
    /// whoever holds its lease; retried when the saga moved meanwhile.
    async fn request<F>(
        &self,
        saga_id: Uuid,
        context: &CommandContext,
        decide: F,
    ) -> Result<Written<Saga>, CommandError>
    where
        F: Fn(&Saga) -> Result<Vec<SagaEvent>, DomainError>,
    {
        let written = self
            .commerce
            .retrying(ConflictCounter::Other, false, || async {
                let loaded = self.load(saga_id).await?;
                let events = decide(&loaded.state)?;
                if events.is_empty() {
                    return Ok(Written::unchanged(saga_id, loaded));
                }
                let (committed, written) = self
                    .commit(None, None, saga_id, loaded, &events, Vec::new(), context)
                    .await?;
                match committed {
                    Committed::Written(_) => Ok(written),
                    Committed::LeaseLost => Err(StoreError::Corrupt(
                        "an unfenced saga write reported a lost lease".into(),
                    )
                    .into()),
                }
            })
            .await?;
        self.wake.notify_one();
        Ok(written)
    }

    /// Appends `events` to the saga (with `other_streams`, atomically) and
    /// updates its row: due now while there is work, never once it is final
    /// or parked. With `fence`, only while that claim holds; then a write
    /// that ends the drive ([`ends_drive`]) gives the saga back, and with
    /// `hold` the lease is made to last that much longer at least (the
    /// write is refused if it already ran out), both in the same statement.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn commit(
        &self,
        fence: Option<Claim>,
        hold: Option<Duration>,
        saga_id: Uuid,
        loaded: Loaded<Saga>,
        events: &[SagaEvent],
        other_streams: Vec<StreamAppend>,
        context: &CommandContext,
    ) -> Result<(Committed, Written<Saga>), CommandError> {
        let now = Utc::now();
        let order_id = loaded.state.order_id;
        let mut after = loaded.state.clone();
        for event in events {
            after.apply(event);
        }
        let done = ends_drive(&after);
        let version = loaded.version + events.len() as u32;
        let mut update = instance_update(saga_id, &after, version, (!done).then_some(now), now);
        update.lease = match (done, hold) {
            (true, _) => LeaseChange::Release,
            (false, Some(at_least)) => LeaseChange::Hold(at_least),
            (false, None) => LeaseChange::Keep,
        };
        let mut streams = vec![stream_append::<Saga>(saga_id, loaded.version, events)?];
        streams.extend(other_streams);
        let request = AppendRequest {
            streams,
            metadata: saga_metadata(context, order_id),
            idempotency_key: None,
        };
        let committed = self.store.commit(fence, update, request).await?;
        let written = match &committed {
            Committed::Written(outcome) => {
                Written::after(saga_id, loaded, events, outcome.last_position)
            }
            Committed::LeaseLost => Written::unchanged(saga_id, loaded),
        };
        Ok((committed, written))
    }
}

/// Saga events (and the order and stock events the saga writes) carry the
/// order's id as their correlation id, so the saga's whole story is one
/// `events(correlationId:)` query; the request that caused a write, if any,
/// is its causation id.
fn saga_metadata(context: &CommandContext, order_id: Uuid) -> EventMetadata {
    EventMetadata {
        correlation_id: Some(order_id),
        causation_id: context.correlation_id,
        ..context.metadata()
    }
}
