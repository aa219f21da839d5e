//! The saga runner: a background task in every kernel process that claims
//! due sagas and drives each until it has to wait, ends, or is parked.
//!
//! Driving a saga is a loop: load its record, ask the domain what comes
//! next ([`Saga::next`]), do it, record the result with a write fenced by
//! the claim, repeat. Built-in steps (reserve stock, confirm) are local: the
//! step's record and the order's and inventory's events are one atomic
//! append. Plugin steps (payment, shipment, custom) call out, so their
//! start is recorded before the call and their outcome after it; a crash in
//! between leaves a started step, which is run again with the same
//! idempotency key (`<saga id>:<step>`), so the provider answers with what
//! the first call did.
//!
//! Losing the claim (another process took the saga over after this one's
//! lease ran out) makes the next write fail whole; the runner then drops the
//! saga without writing anything.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use commerce_plugin_host::{self as host, PluginError, PluginRegistry};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use uuid::Uuid;

use super::{Claim, Committed};
use crate::commerce::{CommandContext, CommandError, Commerce, OrderTransition, Sagas};
use crate::domain::DomainError;
use crate::domain::money::{Currency, Money};
use crate::domain::order::{Order, PlacedOrder};
use crate::domain::saga::{
    CompensationCause, Next, Phase, Saga, SagaEvent, StepAction, StepError, StepState, StepStatus,
};
use crate::event_store::repository::{AggregateRepository, Loaded};

/// How a runner behaves; see the `COMMERCE_SAGA_*` settings.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// This process's name in leases (unique per process start).
    pub node_id: String,
    /// How long a claim holds without a heartbeat.
    pub lease: Duration,
    /// How often the runner looks for due sagas when nothing woke it.
    pub poll_interval: Duration,
    /// Most sagas this process drives at once.
    pub max_concurrent: usize,
    /// Pause points for the crash tests (`COMMERCE_TEST_PAUSE_AT`).
    pub pause_at: HashSet<String>,
}

/// Orders placed this long ago and still without a saga get one.
const ORPHAN_AGE: chrono::Duration = chrono::Duration::seconds(30);
const ORPHAN_SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// A wait shorter than this is slept through rather than given back.
const SHORT_WAIT: chrono::Duration = chrono::Duration::milliseconds(20);
/// Version conflicts in a row after which a saga is given back for later.
const MAX_CONFLICTS: u32 = 40;

/// What a step's attempt came to.
type Attempt = Result<Value, StepError>;

/// Where driving a saga stands after one action.
enum Flow {
    Continue,
    /// The claim is gone or the saga must wait: stop driving it.
    Stop,
}

pub struct SagaRunner {
    sagas: Sagas,
    registry: Arc<PluginRegistry>,
    settings: RunnerSettings,
    context: CommandContext,
}

impl SagaRunner {
    pub fn new(sagas: Sagas, registry: Arc<PluginRegistry>, settings: RunnerSettings) -> Self {
        let context = CommandContext {
            actor: Some(format!("saga-runner:{}", settings.node_id)),
            correlation_id: None,
        };
        SagaRunner {
            sagas,
            registry,
            settings,
            context,
        }
    }

    fn commerce(&self) -> &Commerce {
        self.sagas.commerce()
    }

    /// Claims and drives sagas until `stop` turns true; then gives back
    /// every saga it holds so another process can go on at once.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let store = Arc::clone(self.sagas.store());
        let permits = Arc::new(Semaphore::new(self.settings.max_concurrent.max(1)));
        let mut drives = JoinSet::new();
        let heartbeat = tokio::spawn(Arc::clone(&self).heartbeat());
        let sweeper = tokio::spawn(Arc::clone(&self).sweep_orphans());
        let wake = Arc::clone(self.sagas.wake());
        loop {
            while drives.try_join_next().is_some() {}
            let free = permits.available_permits();
            let mut claimed_all = false;
            if free > 0 {
                let now = Utc::now();
                match store
                    .claim(&self.settings.node_id, now, now + self.lease(), free as u32)
                    .await
                {
                    Ok(claims) => {
                        claimed_all = claims.len() == free;
                        for claim in claims {
                            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                                break;
                            };
                            let runner = Arc::clone(&self);
                            drives.spawn(async move {
                                runner.drive(claim).await;
                                drop(permit);
                            });
                        }
                    }
                    Err(error) => tracing::warn!(%error, "could not claim sagas"),
                }
            }
            if claimed_all {
                // There may be more due: look again once a slot frees up.
                tokio::select! {
                    _ = drives.join_next() => {}
                    _ = stop.changed() => break,
                }
                continue;
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(self.settings.poll_interval) => {}
                _ = stop.changed() => break,
            }
            if *stop.borrow() {
                break;
            }
        }
        heartbeat.abort();
        sweeper.abort();
        drives.shutdown().await;
        match store.release_all(&self.settings.node_id).await {
            Ok(released) if released > 0 => tracing::info!(released, "gave back sagas"),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "could not give back sagas"),
        }
    }

    fn lease(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.settings.lease).unwrap_or(chrono::Duration::seconds(30))
    }

    /// Extends this process's leases three times per lease period.
    async fn heartbeat(self: Arc<Self>) {
        let mut interval = tokio::time::interval(self.settings.lease / 3);
        loop {
            interval.tick().await;
            let until = Utc::now() + self.lease();
            if let Err(error) = self
                .sagas
                .store()
                .heartbeat(&self.settings.node_id, until)
                .await
            {
                tracing::warn!(%error, "saga lease heartbeat failed");
            }
        }
    }

    /// Starts sagas for orders a process placed but stopped before starting
    /// their saga (a crash between the two writes).
    async fn sweep_orphans(self: Arc<Self>) {
        let mut interval = tokio::time::interval(ORPHAN_SWEEP_INTERVAL);
        loop {
            interval.tick().await;
            let orphans = match self
                .sagas
                .store()
                .orders_without_saga(Utc::now() - ORPHAN_AGE, 100)
                .await
            {
                Ok(orphans) => orphans,
                Err(error) => {
                    tracing::warn!(%error, "could not look for orders without a saga");
                    continue;
                }
            };
            for order_id in orphans {
                match self.sagas.start_for_order(order_id, &self.context).await {
                    Ok(saga_id) => tracing::info!(%order_id, %saga_id, "started a missing saga"),
                    Err(error) => tracing::warn!(%order_id, %error, "could not start a saga"),
                }
            }
        }
    }

    /// Drives one claimed saga until it waits, ends, or the claim is lost.
    async fn drive(&self, claim: Claim) {
        let mut conflicts = 0;
        loop {
            match self.step(claim).await {
                Ok(Flow::Continue) => conflicts = 0,
                Ok(Flow::Stop) => return,
                Err(CommandError::VersionConflict { .. }) if conflicts < MAX_CONFLICTS => {
                    // A request, or another order's stock write, got there
                    // first: reload and decide again.
                    conflicts += 1;
                    let jitter = Uuid::new_v4().as_u128() as u64 % 20;
                    tokio::time::sleep(Duration::from_millis(1 + jitter)).await;
                }
                Err(error) => {
                    tracing::warn!(saga_id = %claim.saga_id, %error, "saga step could not be recorded; retrying later");
                    // Due again in a second (a moved version also means now).
                    let later = Utc::now() + chrono::Duration::seconds(1);
                    if let Err(error) = self
                        .sagas
                        .store()
                        .release(claim, u32::MAX, None, later)
                        .await
                    {
                        tracing::warn!(saga_id = %claim.saga_id, %error, "could not give a saga back");
                    }
                    return;
                }
            }
        }
    }

    /// Does the next thing the saga's record calls for.
    async fn step(&self, claim: Claim) -> Result<Flow, CommandError> {
        let saga_id = claim.saga_id;
        let loaded = self.sagas.load(saga_id).await?;
        let now = Utc::now();
        match loaded.state.next(now) {
            Next::Idle => {
                self.sagas
                    .store()
                    .release(claim, loaded.version, None, now)
                    .await?;
                Ok(Flow::Stop)
            }
            Next::Wait(at) if at - now <= SHORT_WAIT => {
                tokio::time::sleep((at - now).to_std().unwrap_or_default()).await;
                Ok(Flow::Continue)
            }
            Next::Wait(at) => {
                self.sagas
                    .store()
                    .release(claim, loaded.version, Some(at), now)
                    .await?;
                Ok(Flow::Stop)
            }
            Next::BeginCompensation(CompensationCause { reason, cancel }) => {
                tracing::info!(%saga_id, %reason, "saga compensating");
                let events = [SagaEvent::CompensationStarted { reason, cancel }];
                self.record(claim, loaded, &events, Vec::new()).await
            }
            Next::Forward { step, attempt } => self.forward(claim, loaded, step, attempt).await,
            Next::Compensate { step, attempt } => {
                self.compensate(claim, loaded, step, attempt).await
            }
            Next::FinishCompensation(cause) => self.finish(claim, loaded, cause).await,
        }
    }

    /// Appends `events` (and `other_streams`) under the claim.
    async fn record(
        &self,
        claim: Claim,
        loaded: Loaded<Saga>,
        events: &[SagaEvent],
        other_streams: Vec<crate::event_store::StreamAppend>,
    ) -> Result<Flow, CommandError> {
        let (committed, _) = self
            .sagas
            .commit(
                Some(claim),
                claim.saga_id,
                loaded,
                events,
                other_streams,
                &self.context,
            )
            .await?;
        match committed {
            Committed::Written(_) => Ok(Flow::Continue),
            Committed::LeaseLost => {
                tracing::warn!(saga_id = %claim.saga_id, "lost the saga's lease; another process drives it now");
                Ok(Flow::Stop)
            }
        }
    }

    async fn load_order(&self, order_id: Uuid) -> Result<Loaded<Order>, CommandError> {
        Ok(
            AggregateRepository::<Order>::new(Arc::clone(self.commerce().store()))
                .load(order_id)
                .await?,
        )
    }

    /// Runs step `index` forward.
    async fn forward(
        &self,
        claim: Claim,
        loaded: Loaded<Saga>,
        index: usize,
        attempt: u32,
    ) -> Result<Flow, CommandError> {
        let step = loaded.state.steps[index].clone();
        let order_id = loaded.state.order_id;
        let started = SagaEvent::StepStarted {
            step: step.name().to_string(),
            phase: Phase::Forward,
            attempt,
            at: Utc::now(),
        };
        let local = match &step.definition.action {
            StepAction::ReserveInventory => Some(OrderTransition::ReserveInventory),
            StepAction::Confirm => Some(OrderTransition::Confirm),
            _ => None,
        };
        if let Some(transition) = local {
            return self
                .forward_locally(claim, loaded, &step, attempt, started, transition)
                .await;
        }

        // A call: record its start first, so a crash during it is known.
        let mut loaded = loaded;
        let events = [started];
        let flow = self
            .record(claim, loaded.clone(), &events, Vec::new())
            .await?;
        if let Flow::Stop = flow {
            return Ok(flow);
        }
        advance(&mut loaded, &events);

        let order = self.load_order(order_id).await?;
        self.pause_point("before-call", step.name()).await;
        let outcome = self
            .call_forward(claim.saga_id, &loaded.state, &step, &order.state)
            .await;
        self.pause_point("after-call", step.name()).await;

        let (events, streams) = match outcome {
            Ok(output) => match self.order_effect(order_id, &order, &step, &output).await {
                Ok(streams) => (
                    vec![SagaEvent::StepSucceeded {
                        step: step.name().to_string(),
                        output,
                    }],
                    streams,
                ),
                Err(CommandError::Domain(refused)) => {
                    // The call worked but its answer does not fit the order
                    // (a different amount, say): undo it.
                    let error = StepError {
                        code: "unusable_result".into(),
                        message: refused.to_string(),
                        retryable: false,
                        effect_possible: true,
                    };
                    (vec![forward_failure(&step, attempt, error)], Vec::new())
                }
                Err(other) => return Err(other),
            },
            Err(error) => (vec![forward_failure(&step, attempt, error)], Vec::new()),
        };
        self.record(claim, loaded, &events, streams).await
    }

    /// A built-in step: the step's record and the order's change in one append.
    async fn forward_locally(
        &self,
        claim: Claim,
        loaded: Loaded<Saga>,
        step: &StepState,
        attempt: u32,
        started: SagaEvent,
        transition: OrderTransition,
    ) -> Result<Flow, CommandError> {
        let order_id = loaded.state.order_id;
        let order = self.load_order(order_id).await?;
        let planned = self
            .commerce()
            .plan_transition(order_id, &order, &transition)
            .await;
        let (events, streams) = match planned {
            Ok(planned) => {
                let output = match &transition {
                    OrderTransition::ReserveInventory => {
                        let order_after =
                            planned.events.iter().fold(order.state.clone(), |mut o, e| {
                                crate::domain::Aggregate::apply(&mut o, e);
                                o
                            });
                        json!({ "reservations": order_after.reservations })
                    }
                    _ => json!({}),
                };
                let mut events = vec![
                    started,
                    SagaEvent::StepSucceeded {
                        step: step.name().to_string(),
                        output,
                    },
                ];
                if matches!(transition, OrderTransition::Confirm) {
                    events.push(SagaEvent::Completed);
                }
                (events, planned.streams)
            }
            Err(CommandError::Domain(refused)) => {
                // Out of stock, a deactivated product, an order no longer
                // able to move: retrying gives the same answer.
                let error = StepError {
                    code: domain_code(&refused).into(),
                    message: refused.to_string(),
                    retryable: false,
                    effect_possible: false,
                };
                (
                    vec![started, forward_failure(step, attempt, error)],
                    Vec::new(),
                )
            }
            Err(CommandError::Store(store_error)) => {
                let error = StepError {
                    code: "store".into(),
                    message: store_error.to_string(),
                    retryable: true,
                    effect_possible: false,
                };
                (
                    vec![started, forward_failure(step, attempt, error)],
                    Vec::new(),
                )
            }
            Err(other) => return Err(other),
        };
        self.record(claim, loaded, &events, streams).await
    }

    /// The order's events that record a call's result (paid, shipped).
    async fn order_effect(
        &self,
        order_id: Uuid,
        order: &Loaded<Order>,
        step: &StepState,
        output: &Value,
    ) -> Result<Vec<crate::event_store::StreamAppend>, CommandError> {
        let transition = match &step.definition.action {
            StepAction::Payment { .. } => OrderTransition::MarkPaid {
                payment_reference: text(output, "reference"),
                amount: output_money(output)?,
            },
            StepAction::Shipment { .. } => OrderTransition::Ship {
                shipment_reference: text(output, "reference"),
            },
            _ => return Ok(Vec::new()),
        };
        Ok(self
            .commerce()
            .plan_transition(order_id, order, &transition)
            .await?
            .streams)
    }

    /// Calls a plugin step forward, within the step's timeout.
    async fn call_forward(
        &self,
        saga_id: Uuid,
        saga: &Saga,
        step: &StepState,
        order: &Order,
    ) -> Attempt {
        let timeout = step.definition.retry.timeout();
        match tokio::time::timeout(timeout, self.invoke_forward(saga_id, saga, step, order)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(StepError {
                code: "deadline".into(),
                message: format!("no answer within {} ms", timeout.as_millis()),
                retryable: true,
                effect_possible: true,
            }),
        }
    }

    async fn invoke_forward(
        &self,
        saga_id: Uuid,
        saga: &Saga,
        step: &StepState,
        order: &Order,
    ) -> Attempt {
        let Some(placed) = &order.placed else {
            return Err(StepError {
                code: "order_missing".into(),
                message: format!("order {} does not exist", saga.order_id),
                retryable: false,
                effect_possible: false,
            });
        };
        let plugin_order = plugin_order(saga.order_id, placed);
        let key = Saga::step_key(saga_id, step.name());
        let plugin = self.plugin(step)?;
        match &step.definition.action {
            StepAction::Payment { .. } => {
                let request = host::PaymentRequest {
                    idempotency_key: key,
                    amount: plugin_money(&placed.total),
                    payment_method: placed.payment_method.clone(),
                    order: plugin_order,
                };
                let payment = plugin.charge(request).await.map_err(step_error)?;
                Ok(json!({
                    "reference": payment.reference,
                    "status": payment_status(payment.status),
                    "amount": payment.amount.amount,
                    "currency": payment.amount.currency,
                }))
            }
            StepAction::Shipment { service, .. } => {
                let shipment = plugin
                    .create_shipment(key, plugin_order, service.clone())
                    .await
                    .map_err(step_error)?;
                Ok(json!({
                    "reference": shipment.reference,
                    "tracking_number": shipment.tracking_number,
                    "label_url": shipment.label_url,
                }))
            }
            StepAction::Custom { .. } => {
                let context = step_context(saga_id, saga, step, key, plugin_order);
                let output = plugin.execute_step(context).await.map_err(step_error)?;
                serde_json::from_str(&output).map_err(|error| StepError {
                    code: "invalid_output".into(),
                    message: error.to_string(),
                    retryable: false,
                    effect_possible: true,
                })
            }
            StepAction::ReserveInventory | StepAction::Confirm => Err(StepError {
                code: "not_a_call".into(),
                message: "built-in steps run locally".into(),
                retryable: false,
                effect_possible: false,
            }),
        }
    }

    fn plugin(&self, step: &StepState) -> Result<Arc<host::LoadedPlugin>, StepError> {
        let name = step.definition.action.plugin().unwrap_or_default();
        self.registry.active(name).map_err(step_error)
    }

    /// Undoes step `index`: finds out what the forward call did if its
    /// outcome was never recorded, then undoes that.
    async fn compensate(
        &self,
        claim: Claim,
        mut loaded: Loaded<Saga>,
        index: usize,
        attempt: u32,
    ) -> Result<Flow, CommandError> {
        let step = loaded.state.steps[index].clone();
        let started = [SagaEvent::StepStarted {
            step: step.name().to_string(),
            phase: Phase::Compensation,
            attempt,
            at: Utc::now(),
        }];
        if let Flow::Stop = self
            .record(claim, loaded.clone(), &started, Vec::new())
            .await?
        {
            return Ok(Flow::Stop);
        }
        advance(&mut loaded, &started);

        let order = self.load_order(loaded.state.order_id).await?;
        let retry = loaded
            .state
            .compensation_retry
            .unwrap_or(step.definition.retry);
        self.pause_point("before-compensation", step.name()).await;
        let outcome = match tokio::time::timeout(
            retry.timeout(),
            self.undo(claim.saga_id, &loaded.state, &step, &order.state),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_) => Err(StepError {
                code: "deadline".into(),
                message: format!("no answer within {} ms", retry.timeout_ms),
                retryable: true,
                effect_possible: true,
            }),
        };
        self.pause_point("after-compensation", step.name()).await;

        let events = match outcome {
            Ok(output) => vec![SagaEvent::StepCompensated {
                step: step.name().to_string(),
                output,
            }],
            Err(error) => {
                let exhausted = loaded.state.compensation_exhausted(attempt);
                let retry_at =
                    (!exhausted).then(|| Utc::now() + backoff(retry.backoff(attempt, random())));
                let reason = format!(
                    "compensating {} failed {attempt} times: {}: {}",
                    step.name(),
                    error.code,
                    error.message
                );
                let mut events = vec![SagaEvent::StepFailed {
                    step: step.name().to_string(),
                    phase: Phase::Compensation,
                    attempt,
                    error,
                    retry_at,
                }];
                if exhausted {
                    tracing::error!(saga_id = %claim.saga_id, %reason, "saga parked: needs manual intervention");
                    events.push(SagaEvent::Parked {
                        step: step.name().to_string(),
                        reason,
                    });
                }
                events
            }
        };
        self.record(claim, loaded, &events, Vec::new()).await
    }

    async fn undo(&self, saga_id: Uuid, saga: &Saga, step: &StepState, order: &Order) -> Attempt {
        let output = match &step.output {
            Some(output) => output.clone(),
            None => match self.call_forward(saga_id, saga, step, order).await {
                Ok(output) => output,
                Err(error) if !error.effect_possible => {
                    return Ok(json!({ "undone": false, "reason": "the call had no effect" }));
                }
                Err(error) => return Err(error),
            },
        };
        let key = Saga::compensation_key(saga_id, step.name());
        let plugin = self.plugin(step)?;
        match &step.definition.action {
            StepAction::Payment { .. } => {
                let amount = host::Money {
                    amount: text(&output, "amount"),
                    currency: text(&output, "currency"),
                };
                let refund = plugin
                    .refund(key, text(&output, "reference"), amount)
                    .await
                    .map_err(step_error)?;
                Ok(json!({ "refund": refund.reference, "amount": refund.amount.amount }))
            }
            StepAction::Shipment { .. } => {
                plugin
                    .cancel_shipment(key, text(&output, "reference"))
                    .await
                    .map_err(step_error)?;
                Ok(json!({ "cancelled": text(&output, "reference") }))
            }
            StepAction::Custom { .. } => {
                let Some(placed) = &order.placed else {
                    return Ok(json!({ "undone": false, "reason": "no order" }));
                };
                let context = step_context(
                    saga_id,
                    saga,
                    step,
                    key,
                    plugin_order(saga.order_id, placed),
                );
                plugin
                    .compensate_step(context, output.to_string())
                    .await
                    .map_err(step_error)?;
                Ok(json!({}))
            }
            StepAction::ReserveInventory | StepAction::Confirm => Ok(json!({})),
        }
    }

    /// Fails or cancels the order (releasing its stock) and ends the saga.
    async fn finish(
        &self,
        claim: Claim,
        loaded: Loaded<Saga>,
        cause: CompensationCause,
    ) -> Result<Flow, CommandError> {
        let order_id = loaded.state.order_id;
        let order = self.load_order(order_id).await?;
        let transition = if cause.cancel {
            OrderTransition::Cancel {
                reason: cause.reason.clone(),
            }
        } else {
            OrderTransition::Fail {
                reason: cause.reason.clone(),
            }
        };
        let streams = match self
            .commerce()
            .plan_transition(order_id, &order, &transition)
            .await
        {
            Ok(planned) => planned.streams,
            // Already final or gone: nothing left to change on the order.
            Err(CommandError::Domain(
                DomainError::IllegalTransition { .. } | DomainError::NotFound { .. },
            )) => Vec::new(),
            Err(other) => return Err(other),
        };
        tracing::info!(saga_id = %claim.saga_id, %order_id, reason = %cause.reason, "saga compensated");
        self.record(claim, loaded, &[SagaEvent::Compensated], streams)
            .await
    }

    /// The crash tests' hook: at a configured point the runner announces
    /// itself on stdout and stops here for good, so the test can kill the
    /// process exactly there.
    async fn pause_point(&self, when: &str, step: &str) {
        if self.settings.pause_at.is_empty() {
            return;
        }
        let point = format!("{when}:{step}");
        if self.settings.pause_at.contains(&point) {
            println!("saga paused at {point}");
            std::future::pending::<()>().await;
        }
    }
}

/// A failed forward attempt, due again after the step's back-off if the
/// error may pass and attempts are left; otherwise compensation follows.
fn forward_failure(step: &StepState, attempt: u32, error: StepError) -> SagaEvent {
    let retry = &step.definition.retry;
    let retry_at = (error.retryable && attempt < retry.max_attempts)
        .then(|| Utc::now() + backoff(retry.backoff(attempt, random())));
    SagaEvent::StepFailed {
        step: step.name().to_string(),
        phase: Phase::Forward,
        attempt,
        error,
        retry_at,
    }
}

/// `loaded` after `events` were appended to it.
fn advance(loaded: &mut Loaded<Saga>, events: &[SagaEvent]) {
    for event in events {
        crate::domain::Aggregate::apply(&mut loaded.state, event);
    }
    loaded.version += events.len() as u32;
}

fn random() -> u64 {
    Uuid::new_v4().as_u128() as u64
}

fn backoff(wait: Duration) -> chrono::Duration {
    chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::seconds(60))
}

/// A plugin error as a step error.
fn step_error(error: PluginError) -> StepError {
    // Refused before running, or a failure the plugin itself calls
    // permanent (a decline): nothing happened. Anything else (a timeout, a
    // trap after a request went out, ...) may have had its effect.
    let effect_possible = !matches!(
        &error,
        PluginError::NotActive { .. } | PluginError::WrongKind { .. }
    ) && !matches!(&error, PluginError::Failed { failure, .. } if failure.permanent);
    let code = match &error {
        PluginError::Failed { failure, .. } => failure.code.clone(),
        other => other.kind().as_str().to_string(),
    };
    StepError {
        code,
        message: error.to_string(),
        retryable: error.is_retryable(),
        effect_possible,
    }
}

fn domain_code(error: &DomainError) -> &'static str {
    match error {
        DomainError::InsufficientStock { .. } => "insufficient_stock",
        DomainError::ProductInactive { .. } => "product_inactive",
        DomainError::IllegalTransition { .. } => "illegal_transition",
        DomainError::NotFound { .. } => "not_found",
        _ => "refused",
    }
}

fn text(value: &Value, field: &str) -> String {
    value
        .get(field)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn output_money(output: &Value) -> Result<Money, CommandError> {
    let amount = text(output, "amount")
        .parse()
        .map_err(|_| DomainError::invalid("amount", "the payment's amount is not a decimal"))?;
    Ok(Money::new(
        amount,
        Currency::parse(&text(output, "currency"))?,
    )?)
}

fn payment_status(status: host::PaymentStatus) -> &'static str {
    match status {
        host::PaymentStatus::Authorized => "authorized",
        host::PaymentStatus::Captured => "captured",
        host::PaymentStatus::Refunded => "refunded",
        host::PaymentStatus::Cancelled => "cancelled",
    }
}

fn plugin_money(money: &Money) -> host::Money {
    host::Money {
        amount: money.amount().to_string(),
        currency: money.currency().code().to_string(),
    }
}

/// The order as plugins see it.
fn plugin_order(order_id: Uuid, placed: &PlacedOrder) -> host::Order {
    let address = &placed.shipping_address;
    host::Order {
        id: order_id.to_string(),
        customer_id: placed.customer_id.to_string(),
        lines: placed
            .lines
            .iter()
            .map(|line| host::OrderLine {
                product_id: line.product_id.to_string(),
                sku: line.sku.clone(),
                name: line.name.clone(),
                quantity: line.quantity,
                unit_price: plugin_money(&line.unit_price),
                line_total: plugin_money(&line.line_total),
            })
            .collect(),
        total: plugin_money(&placed.total),
        shipping_address: host::Address {
            name: address.name.clone(),
            line1: address.line1.clone(),
            line2: address.line2.clone(),
            city: address.city.clone(),
            postal_code: address.postal_code.clone(),
            region: address.region.clone(),
            country: address.country.clone(),
        },
        payment_method: placed.payment_method.clone(),
    }
}

fn step_context(
    saga_id: Uuid,
    saga: &Saga,
    step: &StepState,
    idempotency_key: String,
    order: host::Order,
) -> host::StepContext {
    host::StepContext {
        saga_id: saga_id.to_string(),
        step: step.name().to_string(),
        idempotency_key,
        order,
        prior_outputs: saga
            .steps
            .iter()
            .filter(|s| s.status == StepStatus::Succeeded)
            .filter_map(|s| {
                s.output.as_ref().map(|output| host::StepOutput {
                    step: s.name().to_string(),
                    output: output.to_string(),
                })
            })
            .collect(),
    }
}
