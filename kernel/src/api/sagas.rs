//! Sagas in GraphQL: an order's saga step by step, the admin's list of
//! sagas, the saga definition, and the requests an admin makes (retry,
//! compensate, define). Each request is an event with the acting admin as
//! its actor. Everything here but an order's own saga is for admins.

use std::time::Duration;

use async_graphql::connection::{Connection, Edge};
use async_graphql::{Context, Enum, InputObject, Json, Object, SimpleObject};
use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::access::{AdminOnly, command_context};
use super::commerce::refused;
use super::error::{ApiError, ErrorCode, UserError};
use super::{Page, TotalCount, max_page_size, page_size};
use crate::commerce::{CommandError, Sagas};
use crate::domain::saga::{
    MAX_REASON_CHARS, ORDER_FULFILMENT, ParkCause, Saga as SagaRecord, SagaDefinition,
    SagaStatus as DomainSagaStatus, StepAction, StepDefinition, StepRetry, StepState,
    StepStatus as DomainStepStatus,
};
use crate::event_store::repository::Loaded;
use crate::sagas::{SagaCursor, SagaFilter, SagaInstance};

pub(super) fn sagas<'a>(ctx: &Context<'a>) -> &'a Sagas {
    ctx.data_unchecked::<Sagas>()
}

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
#[graphql(remote = "DomainSagaStatus")]
pub enum SagaStatus {
    Running,
    Compensating,
    Completed,
    Compensated,
    /// A compensation kept failing: needs a human, then `retrySaga`.
    Parked,
}

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
#[graphql(remote = "DomainStepStatus")]
pub enum SagaStepStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Compensating,
    Compensated,
}

/// Why a saga waits for a person; see the README's "Parked sagas".
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
#[graphql(remote = "ParkCause")]
pub enum SagaParkCause {
    /// A compensation failed on every attempt.
    CompensationFailed,
    /// Whether a call had its effect could not be learned.
    OutcomeUnknown,
    /// The saga's own write was refused for a reason retrying cannot fix.
    WriteRefused,
    /// The step's plugin was not active on any process that took the saga.
    PluginUnavailable,
    /// The runner failed (panicked) on the saga several times in a row.
    DriveFailed,
}

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum SagaStepKind {
    ReserveInventory,
    Payment,
    Shipment,
    Custom,
    Confirm,
}

/// What a saga's step list counts against the complexity limit: the
/// default saga has four steps, one with a custom step five.
const SAGA_STEPS_COST: usize = 5;

/// A saga as its events tell it.
pub struct Saga {
    id: Uuid,
    loaded: Loaded<SagaRecord>,
}

impl Saga {
    pub(super) fn new(id: Uuid, loaded: Loaded<SagaRecord>) -> Self {
        Saga { id, loaded }
    }
}

#[Object]
impl Saga {
    async fn id(&self) -> Uuid {
        self.id
    }
    async fn saga_type(&self) -> &str {
        &self.loaded.state.saga_type
    }
    /// The order it fulfils (also the correlation id of its events).
    async fn order_id(&self) -> Uuid {
        self.loaded.state.order_id
    }
    async fn status(&self) -> SagaStatus {
        self.loaded
            .state
            .status
            .unwrap_or(DomainSagaStatus::Running)
            .into()
    }
    /// The step being worked on (forward, or being undone).
    async fn current_step(&self) -> Option<&str> {
        self.loaded.state.current_step().map(StepState::name)
    }
    /// Why it compensates (or was asked to), or why it is parked. Admins
    /// get the details (the provider's words, the failing step); the
    /// order's customer a short reason.
    async fn reason(&self, ctx: &Context<'_>) -> Result<Option<String>, ApiError> {
        let state = &self.loaded.state;
        if !super::access::principal(ctx)?.is_admin() {
            return Ok(super::customer_view::saga_reason(state));
        }
        Ok(state
            .parked
            .as_deref()
            .or(state.compensation.as_ref().map(|c| c.reason.as_str()))
            .or(state.requested.as_ref().map(|c| c.reason.as_str()))
            .map(|reason| crate::domain::summarize(reason, MAX_REASON_CHARS)))
    }
    /// Why it is parked, as a kind an operator can act on; null unless parked.
    #[graphql(guard = "super::access::AdminOnly")]
    async fn park_cause(&self) -> Option<SagaParkCause> {
        self.loaded.state.park_cause.map(Into::into)
    }
    /// Counted against the complexity limit as five steps.
    #[graphql(complexity = "SAGA_STEPS_COST * child_complexity")]
    async fn steps(&self) -> Vec<SagaStep> {
        self.loaded
            .state
            .steps
            .iter()
            .cloned()
            .map(SagaStep)
            .collect()
    }
    async fn started_at(&self) -> Option<DateTime<Utc>> {
        self.loaded.state.started_at
    }
    /// Still running then, it is compensated.
    async fn deadline(&self) -> Option<DateTime<Utc>> {
        self.loaded.state.deadline
    }
    /// When the next attempt is due, while one waits.
    async fn retry_at(&self) -> Option<DateTime<Utc>> {
        self.loaded.state.retry_at
    }
    /// The saga stream's version.
    async fn version(&self) -> u32 {
        self.loaded.version
    }
}

pub struct SagaStep(pub(super) StepState);

#[Object]
impl SagaStep {
    async fn name(&self) -> &str {
        self.0.name()
    }
    async fn kind(&self) -> SagaStepKind {
        kind(&self.0.definition.action)
    }
    /// The plugin it calls. For admins; null for customers.
    async fn plugin(&self, ctx: &Context<'_>) -> Result<Option<&str>, ApiError> {
        Ok(super::access::principal(ctx)?
            .is_admin()
            .then(|| self.0.definition.action.plugin())
            .flatten())
    }
    async fn status(&self) -> SagaStepStatus {
        self.0.status.into()
    }
    /// Forward attempts started.
    async fn attempts(&self) -> u32 {
        self.0.attempts
    }
    async fn compensation_attempts(&self) -> u32 {
        self.0.compensation_attempts
    }
    /// The last attempt's error: `code: message` (cleaned, bounded) for
    /// admins, a short reason for the order's customer.
    async fn error(&self, ctx: &Context<'_>) -> Result<Option<String>, ApiError> {
        if !super::access::principal(ctx)?.is_admin() {
            return Ok(super::customer_view::step_error(&self.0));
        }
        Ok(self.0.error.as_ref().map(|error| error.summary()))
    }
    /// What the step returned (payment reference, shipment, ...). For admins.
    #[graphql(guard = "super::access::AdminOnly")]
    async fn output(&self) -> Option<Json<Value>> {
        self.0.output.clone().map(Json)
    }
}

fn kind(action: &StepAction) -> SagaStepKind {
    match action {
        StepAction::ReserveInventory => SagaStepKind::ReserveInventory,
        StepAction::Payment { .. } => SagaStepKind::Payment,
        StepAction::Shipment { .. } => SagaStepKind::Shipment,
        StepAction::Custom { .. } => SagaStepKind::Custom,
        StepAction::Confirm => SagaStepKind::Confirm,
    }
}

/// A saga's row in the runner's queue: who holds it and when it is due.
pub struct SagaSummary(SagaInstance);

#[Object]
impl SagaSummary {
    async fn id(&self) -> Uuid {
        self.0.saga_id
    }
    async fn saga_type(&self) -> &str {
        &self.0.saga_type
    }
    async fn correlation_id(&self) -> Uuid {
        self.0.correlation_id
    }
    async fn status(&self) -> SagaStatus {
        self.0.status.into()
    }
    async fn current_step(&self) -> Option<&str> {
        self.0.current_step.as_deref()
    }
    async fn next_run_at(&self) -> Option<DateTime<Utc>> {
        self.0.next_run_at
    }
    /// The kernel process driving it now, if any.
    async fn lease_owner(&self) -> Option<&str> {
        self.0.lease_owner.as_deref()
    }
    async fn lease_expires_at(&self) -> Option<DateTime<Utc>> {
        self.0.lease_expires_at
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    async fn updated_at(&self) -> DateTime<Utc> {
        self.0.updated_at
    }
    /// The saga's full record.
    async fn saga(&self, ctx: &Context<'_>) -> Result<Saga, ApiError> {
        let loaded = sagas(ctx)
            .load(self.0.saga_id)
            .await
            .map_err(super::error::command_failure)?;
        Ok(Saga::new(self.0.saga_id, loaded))
    }
}

/// How a step is retried.
#[derive(SimpleObject, InputObject, Clone, Copy)]
#[graphql(input_name = "StepRetryInput")]
pub struct SagaStepRetry {
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Each attempt is stopped after this long.
    pub timeout_ms: u64,
}

impl From<StepRetry> for SagaStepRetry {
    fn from(retry: StepRetry) -> Self {
        SagaStepRetry {
            max_attempts: retry.max_attempts,
            initial_backoff_ms: retry.initial_backoff_ms,
            max_backoff_ms: retry.max_backoff_ms,
            timeout_ms: retry.timeout_ms,
        }
    }
}

impl From<SagaStepRetry> for StepRetry {
    fn from(retry: SagaStepRetry) -> Self {
        StepRetry {
            max_attempts: retry.max_attempts,
            initial_backoff_ms: retry.initial_backoff_ms,
            max_backoff_ms: retry.max_backoff_ms,
            timeout_ms: retry.timeout_ms,
        }
    }
}

/// A step of a saga definition.
#[derive(SimpleObject, InputObject, Clone)]
#[graphql(input_name = "SagaStepDefinitionInput")]
pub struct SagaStepDefinition {
    pub name: String,
    pub kind: SagaStepKind,
    /// The plugin a PAYMENT, SHIPMENT or CUSTOM step calls.
    pub plugin: Option<String>,
    /// The shipping service a SHIPMENT step asks for (default "standard").
    pub service: Option<String>,
    pub retry: SagaStepRetry,
}

impl From<&StepDefinition> for SagaStepDefinition {
    fn from(step: &StepDefinition) -> Self {
        SagaStepDefinition {
            name: step.name.clone(),
            kind: kind(&step.action),
            plugin: step.action.plugin().map(str::to_string),
            service: match &step.action {
                StepAction::Shipment { service, .. } => Some(service.clone()),
                _ => None,
            },
            retry: step.retry.into(),
        }
    }
}

impl SagaStepDefinition {
    fn to_domain(&self) -> Result<StepDefinition, ApiError> {
        let plugin = || {
            self.plugin.clone().ok_or_else(|| {
                ApiError::invalid("steps.plugin", format!("step {} needs a plugin", self.name))
            })
        };
        let action = match self.kind {
            SagaStepKind::ReserveInventory => StepAction::ReserveInventory,
            SagaStepKind::Confirm => StepAction::Confirm,
            SagaStepKind::Payment => StepAction::Payment { plugin: plugin()? },
            SagaStepKind::Custom => StepAction::Custom { plugin: plugin()? },
            SagaStepKind::Shipment => StepAction::Shipment {
                plugin: plugin()?,
                service: self.service.clone().unwrap_or_else(|| "standard".into()),
            },
        };
        Ok(StepDefinition {
            name: self.name.clone(),
            action,
            retry: self.retry.into(),
        })
    }
}

/// The steps new sagas of a type follow.
#[derive(SimpleObject)]
pub struct SagaDefinitionView {
    pub saga_type: String,
    /// How many times it was set (0: the built-in default applies).
    pub revision: u32,
    pub steps: Vec<SagaStepDefinition>,
    pub timeout_ms: u64,
    pub compensation_retry: SagaStepRetry,
}

fn definition_view(
    saga_type: &str,
    definition: &SagaDefinition,
    revision: u32,
) -> SagaDefinitionView {
    SagaDefinitionView {
        saga_type: saga_type.to_string(),
        revision,
        steps: definition
            .steps
            .iter()
            .map(SagaStepDefinition::from)
            .collect(),
        timeout_ms: definition.timeout_ms,
        compensation_retry: definition.compensation_retry.into(),
    }
}

#[derive(InputObject)]
pub struct DefineSagaInput {
    /// Default "order-fulfilment", the only type so far.
    pub saga_type: Option<String>,
    pub steps: Vec<SagaStepDefinition>,
    /// Default 300000 (5 minutes).
    pub timeout_ms: Option<u64>,
    pub compensation_retry: Option<SagaStepRetry>,
}

#[derive(SimpleObject, Default)]
pub struct SagaDefinitionPayload {
    pub definition: Option<SagaDefinitionView>,
    pub errors: Vec<UserError>,
}

#[derive(SimpleObject, Default)]
pub struct SagaPayload {
    pub saga: Option<Saga>,
    pub errors: Vec<UserError>,
}

/// What `retryParkedSagas` did.
#[derive(SimpleObject, Default)]
pub struct RetryParkedSagasPayload {
    /// The sagas retried, as the retry left them.
    pub retried: Vec<Saga>,
    /// Sagas the retry refused or failed on (one no longer parked, say): the
    /// field is the saga's id.
    pub errors: Vec<UserError>,
}

#[derive(SimpleObject, Default)]
pub struct CompensateSagasPayload {
    /// The sagas whose compensation was requested, as the request left them.
    pub compensated: Vec<Saga>,
    /// Sagas the request refused or failed on (one already finished, say):
    /// the field is the saga's id.
    pub errors: Vec<UserError>,
}

fn parse_cursor(text: &str) -> Result<SagaCursor, ApiError> {
    let invalid = || ApiError::invalid("after", "not a cursor this API returned");
    let (micros, id) = text.split_once(':').ok_or_else(invalid)?;
    Ok(SagaCursor {
        created_at: micros
            .parse::<i64>()
            .ok()
            .and_then(DateTime::from_timestamp_micros)
            .ok_or_else(invalid)?,
        saga_id: id.parse().map_err(|_| invalid())?,
    })
}

fn cursor(instance: &SagaInstance) -> String {
    format!(
        "{}:{}",
        instance.created_at.timestamp_micros(),
        instance.saga_id
    )
}

#[derive(Default)]
pub struct SagaQuery;

#[Object]
impl SagaQuery {
    /// Sagas, oldest first, optionally of one order (`correlationId`), in
    /// one status (PARKED ones need a human), or overdue (stuck: due to run
    /// for at least `overdueForSeconds`). For admins.
    #[graphql(
        guard = "AdminOnly",
        complexity = "super::page_cost(first, child_complexity)"
    )]
    async fn sagas(
        &self,
        ctx: &Context<'_>,
        correlation_id: Option<Uuid>,
        status: Option<SagaStatus>,
        #[graphql(
            desc = "Only sagas that have been due to run for at least this many seconds (0: every saga due now) and still have not: none is parked, finished or waiting for a retry. Such a saga is stuck: no runner is up, or one holds it while a step waits (see `leaseOwner`)."
        )]
        overdue_for_seconds: Option<i32>,
        #[graphql(desc = "Page size (default 50, at most the server's maximum page size).")]
        first: Option<i32>,
        #[graphql(desc = "Cursor of the last saga already seen.")] after: Option<String>,
    ) -> Result<Page<SagaSummary>, ApiError> {
        let first = page_size(ctx, first)?;
        let after_cursor = after.as_deref().map(parse_cursor).transpose()?;
        let overdue_by = overdue_for_seconds
            .map(|seconds| match u64::try_from(seconds) {
                Ok(seconds) => Ok(Duration::from_secs(seconds)),
                Err(_) => Err(ApiError::invalid(
                    "overdueForSeconds",
                    "must be 0 or more seconds",
                )),
            })
            .transpose()?;
        let filter = SagaFilter {
            correlation_id,
            status: status.map(Into::into),
            overdue_by,
        };
        let mut rows = sagas(ctx)
            .store()
            .list(&filter, after_cursor, first + 1)
            .await?;
        let has_next_page = rows.len() > first as usize;
        rows.truncate(first as usize);
        let store = sagas(ctx).store().clone();
        let total = TotalCount::new(move || {
            let (store, filter) = (store.clone(), filter.clone());
            Box::pin(async move { store.count(&filter).await })
        });
        let mut connection =
            Connection::with_additional_fields(after.is_some(), has_next_page, total);
        connection.edges.extend(
            rows.into_iter()
                .map(|row| Edge::new(cursor(&row), SagaSummary(row))),
        );
        Ok(connection)
    }

    /// One saga, step by step; null when there is none. For admins.
    #[graphql(guard = "AdminOnly")]
    async fn saga(&self, ctx: &Context<'_>, id: Uuid) -> Result<Option<Saga>, ApiError> {
        match sagas(ctx).load(id).await {
            Ok(loaded) => Ok(Some(Saga::new(id, loaded))),
            Err(crate::commerce::CommandError::Domain(crate::domain::DomainError::NotFound {
                ..
            })) => Ok(None),
            Err(other) => Err(super::error::command_failure(other)),
        }
    }

    /// The definition new sagas of `sagaType` follow. For admins.
    #[graphql(guard = "AdminOnly")]
    async fn saga_definition(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = "order-fulfilment")] saga_type: String,
    ) -> Result<SagaDefinitionView, ApiError> {
        let loaded = sagas(ctx)
            .definitions(&saga_type)
            .await
            .map_err(super::error::command_failure)?;
        Ok(definition_view(
            &saga_type,
            &loaded.state.effective(),
            loaded.state.revisions,
        ))
    }
}

#[derive(Default)]
pub struct SagaMutation;

#[Object]
impl SagaMutation {
    /// Sets the steps new sagas follow (insert a plugin step, swap the
    /// payment plugin, tune retries). Running sagas keep their definition. For admins.
    #[graphql(guard = "AdminOnly")]
    async fn define_saga(
        &self,
        ctx: &Context<'_>,
        input: DefineSagaInput,
    ) -> Result<SagaDefinitionPayload, ApiError> {
        let saga_type = input
            .saga_type
            .clone()
            .unwrap_or_else(|| ORDER_FULFILMENT.to_string());
        let defaults = SagaDefinition::default_order_fulfilment();
        let steps = input
            .steps
            .iter()
            .map(SagaStepDefinition::to_domain)
            .collect::<Result<Vec<_>, _>>()?;
        let definition = SagaDefinition {
            steps,
            timeout_ms: input.timeout_ms.unwrap_or(defaults.timeout_ms),
            compensation_retry: input
                .compensation_retry
                .map(Into::into)
                .unwrap_or(defaults.compensation_retry),
        };
        let context = command_context(ctx)?;
        match refused(sagas(ctx).define(&saga_type, definition, &context)).await? {
            Ok(written) => Ok(SagaDefinitionPayload {
                definition: Some(definition_view(
                    &saga_type,
                    &written.state.effective(),
                    written.state.revisions,
                )),
                errors: Vec::new(),
            }),
            Err(errors) => Ok(SagaDefinitionPayload {
                definition: None,
                errors,
            }),
        }
    }

    /// Goes on with a saga now: a waiting retry runs at once, a PARKED saga
    /// resumes compensating with fresh attempts. For admins.
    #[graphql(guard = "AdminOnly")]
    async fn retry_saga(&self, ctx: &Context<'_>, id: Uuid) -> Result<SagaPayload, ApiError> {
        let context = command_context(ctx)?;
        saga_payload(refused(sagas(ctx).retry(id, &context)).await?)
    }

    /// Retries up to `first` PARKED sagas (default 50, at most the server's
    /// page size), oldest first, each as `retrySaga` does: the runbook's
    /// bulk recovery once the cause is fixed. For admins.
    #[graphql(guard = "AdminOnly")]
    async fn retry_parked_sagas(
        &self,
        ctx: &Context<'_>,
        #[graphql(
            desc = "Only sagas parked for this cause; null: every cause (DRIVE_FAILED and WRITE_REFUSED need a fix first)."
        )]
        park_cause: Option<SagaParkCause>,
        first: Option<i32>,
    ) -> Result<RetryParkedSagasPayload, ApiError> {
        let first = page_size(ctx, first)?;
        let context = command_context(ctx)?;
        let outcomes = sagas(ctx)
            .retry_parked(park_cause.map(Into::into), first, &context)
            .await
            .map_err(super::error::command_failure)?;
        let (retried, errors) = bulk_outcomes(outcomes, "retry");
        Ok(RetryParkedSagasPayload { retried, errors })
    }

    /// Undoes a running saga: its effects are compensated and the order
    /// ends FAILED with `reason`. For admins.
    #[graphql(guard = "AdminOnly")]
    async fn compensate_saga(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
        reason: String,
    ) -> Result<SagaPayload, ApiError> {
        let context = command_context(ctx)?;
        saga_payload(refused(sagas(ctx).compensate(id, &reason, &context)).await?)
    }

    /// Undoes each of `ids` as `compensateSaga` does, with the same
    /// `reason`: the runbook's way out for overdue sagas an admin gives up
    /// on. At most the server's page size at once; one saga's refusal (it
    /// finished meanwhile, say) stops none of the others. For admins.
    #[graphql(guard = "AdminOnly")]
    async fn compensate_sagas(
        &self,
        ctx: &Context<'_>,
        ids: Vec<Uuid>,
        reason: String,
    ) -> Result<CompensateSagasPayload, ApiError> {
        let most = max_page_size(ctx);
        if ids.len() > most as usize {
            return Err(ApiError::invalid(
                "ids",
                format!("at most {most} sagas at once"),
            ));
        }
        // Refused once for all, with its own field, rather than once per saga.
        if let Err(refused) = crate::domain::clean_text("reason", &reason, MAX_REASON_CHARS) {
            return Ok(CompensateSagasPayload {
                compensated: Vec::new(),
                errors: vec![super::error::user_error(CommandError::Domain(refused))?],
            });
        }
        let context = command_context(ctx)?;
        let mut outcomes = Vec::with_capacity(ids.len());
        let mut seen = std::collections::HashSet::new();
        for id in ids.into_iter().filter(|id| seen.insert(*id)) {
            outcomes.push((id, sagas(ctx).compensate(id, &reason, &context).await));
        }
        let (compensated, errors) = bulk_outcomes(outcomes, "compensation");
        Ok(CompensateSagasPayload {
            compensated,
            errors,
        })
    }
}

/// A bulk request's outcomes, each saga's written state or its error (the
/// field is the saga's id). A store failure on one is reported too: the
/// writes before it stand, and the admin must see them.
fn bulk_outcomes(
    outcomes: Vec<(
        Uuid,
        Result<crate::commerce::Written<SagaRecord>, CommandError>,
    )>,
    request: &str,
) -> (Vec<Saga>, Vec<UserError>) {
    let (mut written_sagas, mut errors) = (Vec::new(), Vec::new());
    for (saga_id, outcome) in outcomes {
        match outcome {
            Ok(written) => written_sagas.push(Saga::new(
                written.id,
                Loaded {
                    state: written.state,
                    version: written.version,
                },
            )),
            Err(error) => {
                let error = super::error::user_error(error).unwrap_or_else(|failure| {
                    tracing::warn!(%saga_id, ?failure, request, "a saga's bulk request failed");
                    UserError::new(
                        ErrorCode::Internal,
                        None,
                        format!("the {request} could not be written; try again"),
                    )
                });
                errors.push(UserError {
                    field: Some(saga_id.to_string()),
                    ..error
                });
            }
        }
    }
    (written_sagas, errors)
}

fn saga_payload(
    outcome: Result<crate::commerce::Written<SagaRecord>, Vec<UserError>>,
) -> Result<SagaPayload, ApiError> {
    Ok(match outcome {
        Ok(written) => SagaPayload {
            saga: Some(Saga::new(
                written.id,
                Loaded {
                    state: written.state,
                    version: written.version,
                },
            )),
            errors: Vec::new(),
        },
        Err(errors) => SagaPayload { saga: None, errors },
    })
}
