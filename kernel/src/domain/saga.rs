//! Sagas: the durable, step-by-step fulfilment of an order.
//!
//! A saga follows a [`SagaDefinition`] (its steps and their retry policies),
//! copied into the saga when it starts, so a running saga keeps the
//! definition it started with while new sagas use the newest one
//! ([`SagaDefinitions`]).
//!
//! ```text
//! RUNNING ──every step succeeded──> COMPLETED
//!    │
//!    └─ a step failed for good, the deadline passed, or a cancel ─> COMPENSATING
//!                                                                     │
//!          COMPENSATED <── every effect undone, order FAILED/CANCELLED ┤
//!          PARKED <─────── a compensation kept failing (retrySaga resumes it)
//! ```
//!
//! Every step's start and outcome is an event ([`SagaEvent`]). What to do
//! next is a pure function of the events and the clock ([`Saga::next`]), so
//! a process that takes a saga over after a crash continues exactly where
//! the record stops. Once compensation has begun no forward step runs again.
//!
//! A step that was started but whose outcome was not recorded (the process
//! died during the call, or the call timed out) may have had its effect. Its
//! compensation first finds out what the call did (the runner asks the
//! provider's `lookup`; see `sagas::runner`), then undoes exactly that.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::{Aggregate, DomainError, DomainEvent, clean_text, summarize};

/// The saga type every order starts.
pub const ORDER_FULFILMENT: &str = "order-fulfilment";

/// Namespace of saga ids (UUIDv5 of saga type and order id) and of
/// definition streams (UUIDv5 of the saga type).
const SAGA_NAMESPACE: Uuid = Uuid::from_u128(0x3e7a_90c1_5d24_4b6f_8a0e_c1d2_4f63_b8a5);
const DEFINITION_NAMESPACE: Uuid = Uuid::from_u128(0x9c04_d6e2_71b3_4a58_b6f1_2e8d_0a47_c35e);

/// Most steps a definition may have.
pub const MAX_STEPS: usize = 20;
/// Longest a step attempt may run, and the longest back-off.
pub const MAX_STEP_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest a saga may run before it is compensated.
pub const MAX_SAGA_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest error message a step records (providers' texts are cut to this).
pub const MAX_ERROR_MESSAGE_CHARS: usize = 300;
/// Longest error code a step records.
pub const MAX_ERROR_CODE_CHARS: usize = 64;
/// Longest reason a saga records (why it compensates, why it is parked).
/// Orders accept reasons of up to 500 characters, so the order's own write
/// can never be refused because of one.
pub const MAX_REASON_CHARS: usize = 500;

/// What a step does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StepAction {
    /// Reserves every line's stock (built in). Released when the saga ends compensated.
    ReserveInventory,
    /// Charges the order's total through a payment plugin; refunded on compensation.
    Payment { plugin: String },
    /// Creates a shipment through a shipping plugin; cancelled on compensation.
    Shipment { plugin: String, service: String },
    /// A custom step plugin (`execute`, `compensate`).
    Custom { plugin: String },
    /// Commits the reserved stock and confirms the order (built in): the
    /// point of no return, so it must be the last step.
    Confirm,
}

impl StepAction {
    /// The plugin the step calls, if any.
    pub fn plugin(&self) -> Option<&str> {
        match self {
            StepAction::Payment { plugin }
            | StepAction::Shipment { plugin, .. }
            | StepAction::Custom { plugin } => Some(plugin),
            StepAction::ReserveInventory | StepAction::Confirm => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            StepAction::ReserveInventory => "RESERVE_INVENTORY",
            StepAction::Payment { .. } => "PAYMENT",
            StepAction::Shipment { .. } => "SHIPMENT",
            StepAction::Custom { .. } => "CUSTOM",
            StepAction::Confirm => "CONFIRM",
        }
    }

    /// Whether the step has an effect outside the kernel that compensation
    /// must undo. Stock is given back when the order fails or is cancelled,
    /// and confirming is final.
    pub fn is_compensated_by_a_call(&self) -> bool {
        self.plugin().is_some()
    }

    /// The order built-in steps must keep (custom steps may go anywhere
    /// before confirming).
    fn builtin_rank(&self) -> Option<u8> {
        match self {
            StepAction::ReserveInventory => Some(0),
            StepAction::Payment { .. } => Some(1),
            StepAction::Shipment { .. } => Some(2),
            StepAction::Confirm => Some(3),
            StepAction::Custom { .. } => None,
        }
    }
}

/// How a step is retried: up to `max_attempts` attempts in all, each
/// stopped after `timeout_ms`, with exponential back-off between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRetry {
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub timeout_ms: u64,
}

impl StepRetry {
    /// The wait before attempt `attempt + 1` after attempt `attempt` failed:
    /// the initial back-off doubled per attempt, capped, with "equal jitter"
    /// (half fixed, half random) so retries of many sagas spread out but never
    /// come back at once. `random` is any random number.
    pub fn backoff(&self, attempt: u32, random: u64) -> Duration {
        let doublings = attempt.saturating_sub(1).min(30);
        let ceiling = self
            .initial_backoff_ms
            .saturating_mul(1u64 << doublings)
            .min(self.max_backoff_ms);
        let half = ceiling / 2;
        Duration::from_millis(half + random % (ceiling - half + 1))
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    fn validate(&self, field: &'static str) -> Result<(), DomainError> {
        let max_ms = MAX_STEP_TIMEOUT.as_millis() as u64;
        if !(1..=100).contains(&self.max_attempts) {
            return Err(DomainError::invalid(field, "maxAttempts must be 1 to 100"));
        }
        if self.initial_backoff_ms > self.max_backoff_ms || self.max_backoff_ms > max_ms {
            return Err(DomainError::invalid(
                field,
                format!("backoffs must satisfy initial <= max <= {max_ms} ms"),
            ));
        }
        if self.timeout_ms == 0 || self.timeout_ms > max_ms {
            return Err(DomainError::invalid(
                field,
                format!("timeoutMs must be 1 to {max_ms}"),
            ));
        }
        Ok(())
    }
}

/// One step of a definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepDefinition {
    /// Unique within the definition; part of the step's idempotency key.
    pub name: String,
    pub action: StepAction,
    pub retry: StepRetry,
}

/// The steps of a saga type, in order, and its limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaDefinition {
    pub steps: Vec<StepDefinition>,
    /// A saga still running this long after it started is compensated.
    pub timeout_ms: u64,
    /// How compensations are retried; when `max_attempts` are used up the
    /// saga is parked for a human.
    pub compensation_retry: StepRetry,
}

impl SagaDefinition {
    /// The order-fulfilment saga a kernel runs until an admin defines another:
    /// reserve stock, charge through plugin `payment`, ship through plugin
    /// `shipping` (service "standard"), confirm. Five minutes in all.
    pub fn default_order_fulfilment() -> SagaDefinition {
        let call = StepRetry {
            max_attempts: 5,
            initial_backoff_ms: 1_000,
            max_backoff_ms: 30_000,
            timeout_ms: 15_000,
        };
        let local = StepRetry {
            max_attempts: 5,
            initial_backoff_ms: 200,
            max_backoff_ms: 5_000,
            timeout_ms: 10_000,
        };
        SagaDefinition {
            steps: vec![
                StepDefinition {
                    name: "reserve-inventory".into(),
                    action: StepAction::ReserveInventory,
                    retry: local,
                },
                StepDefinition {
                    name: "payment".into(),
                    action: StepAction::Payment {
                        plugin: "payment".into(),
                    },
                    retry: call,
                },
                StepDefinition {
                    name: "shipment".into(),
                    action: StepAction::Shipment {
                        plugin: "shipping".into(),
                        service: "standard".into(),
                    },
                    retry: call,
                },
                StepDefinition {
                    name: "confirm".into(),
                    action: StepAction::Confirm,
                    retry: local,
                },
            ],
            timeout_ms: 300_000,
            compensation_retry: StepRetry {
                max_attempts: 10,
                initial_backoff_ms: 1_000,
                max_backoff_ms: 60_000,
                timeout_ms: 15_000,
            },
        }
    }

    /// Checks the definition: 1 to [`MAX_STEPS`] uniquely named steps; the
    /// built-in steps each exactly once, in the order reserve inventory,
    /// payment, shipment, confirm (the order's state machine), confirm last;
    /// sane retry policies.
    pub fn validate(&self) -> Result<(), DomainError> {
        if self.steps.is_empty() || self.steps.len() > MAX_STEPS {
            return Err(DomainError::invalid(
                "steps",
                format!("a saga has 1 to {MAX_STEPS} steps"),
            ));
        }
        let mut ranks = Vec::new();
        for (index, step) in self.steps.iter().enumerate() {
            valid_name("steps.name", &step.name)?;
            if self.steps[..index].iter().any(|s| s.name == step.name) {
                return Err(DomainError::invalid(
                    "steps.name",
                    format!("step name {:?} is used twice", step.name),
                ));
            }
            if let Some(plugin) = step.action.plugin() {
                valid_name("steps.plugin", plugin)?;
            }
            if let StepAction::Shipment { service, .. } = &step.action {
                clean_text("steps.service", service, 64)?;
            }
            step.retry.validate("steps.retry")?;
            ranks.extend(step.action.builtin_rank());
        }
        if ranks != [0, 1, 2, 3] {
            return Err(DomainError::invalid(
                "steps",
                "the built-in steps RESERVE_INVENTORY, PAYMENT, SHIPMENT and CONFIRM must each \
                 appear once, in that order",
            ));
        }
        if !matches!(
            self.steps.last().map(|s| &s.action),
            Some(StepAction::Confirm)
        ) {
            return Err(DomainError::invalid(
                "steps",
                "CONFIRM is the point of no return and must be the last step",
            ));
        }
        let max = MAX_SAGA_TIMEOUT.as_millis() as u64;
        if !(1_000..=max).contains(&self.timeout_ms) {
            return Err(DomainError::invalid(
                "timeoutMs",
                format!("must be 1000 to {max}"),
            ));
        }
        self.compensation_retry.validate("compensationRetry")
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// Step and plugin names: 1 to 64 of `a-z 0-9 - _`.
fn valid_name(field: &'static str, name: &str) -> Result<(), DomainError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(DomainError::invalid(
            field,
            format!("{name:?} must be 1 to 64 characters of a-z, 0-9, '-' and '_'"),
        ))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum DefinitionEvent {
    Defined { definition: SagaDefinition },
}

impl DomainEvent for DefinitionEvent {}

/// The definitions of one saga type over time; the newest applies to new sagas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SagaDefinitions {
    pub current: Option<SagaDefinition>,
    /// How many times the definition was set.
    pub revisions: u32,
}

impl Aggregate for SagaDefinitions {
    const AGGREGATE_TYPE: &'static str = "saga_definition";
    type Event = DefinitionEvent;

    fn apply(&mut self, event: &DefinitionEvent) {
        let DefinitionEvent::Defined { definition } = event;
        self.current = Some(definition.clone());
        self.revisions += 1;
    }
}

impl SagaDefinitions {
    pub fn stream_id(saga_type: &str) -> Uuid {
        Uuid::new_v5(&DEFINITION_NAMESPACE, saga_type.as_bytes())
    }

    /// The definition new sagas of this type use.
    pub fn effective(&self) -> SagaDefinition {
        self.current
            .clone()
            .unwrap_or_else(SagaDefinition::default_order_fulfilment)
    }

    /// Replaces the definition; setting the current one again writes nothing.
    pub fn define(&self, definition: SagaDefinition) -> Result<Vec<DefinitionEvent>, DomainError> {
        definition.validate()?;
        if self.current.as_ref() == Some(&definition) {
            return Ok(Vec::new());
        }
        Ok(vec![DefinitionEvent::Defined { definition }])
    }
}

/// Which way a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Forward,
    Compensation,
}

/// Why an attempt failed. Built with [`StepError::new`], which cleans and
/// bounds whatever a plugin or provider said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepError {
    /// Machine-readable: the plugin's code (`card_declined`) or the
    /// kernel's (`deadline`, `insufficient_stock`, ...).
    pub code: String,
    pub message: String,
    /// Whether another attempt may succeed (a timeout, a provider error).
    pub retryable: bool,
    /// Whether the failed call may still have had its effect (a timeout, a
    /// crash, a provider error), so compensation must find out.
    pub effect_possible: bool,
}

impl StepError {
    /// An error with `code` reduced to at most [`MAX_ERROR_CODE_CHARS`] of
    /// `a-z 0-9 _ - .` and `message` made one line of at most
    /// [`MAX_ERROR_MESSAGE_CHARS`]: a provider's text (several lines, 100 KB,
    /// control characters, an HTML page) is stored bounded and clean.
    pub fn new(code: &str, message: &str, retryable: bool, effect_possible: bool) -> StepError {
        StepError {
            code: error_code(code),
            message: summarize(message, MAX_ERROR_MESSAGE_CHARS),
            retryable,
            effect_possible,
        }
    }

    /// `code: message`, cleaned again: records written before errors were
    /// cleaned on the way in may hold anything.
    pub fn summary(&self) -> String {
        summarize(
            &format!("{}: {}", error_code(&self.code), self.message),
            MAX_ERROR_MESSAGE_CHARS + MAX_ERROR_CODE_CHARS + 2,
        )
    }
}

fn error_code(code: &str) -> String {
    let cleaned: String = code
        .chars()
        .filter_map(|c| match c {
            'a'..='z' | '0'..='9' | '_' | '-' | '.' => Some(c),
            'A'..='Z' => Some(c.to_ascii_lowercase()),
            c if c.is_whitespace() => Some('_'),
            _ => None,
        })
        .take(MAX_ERROR_CODE_CHARS)
        .collect();
    if cleaned.is_empty() {
        "unknown".to_string()
    } else {
        cleaned
    }
}

/// Why compensation runs, and whether the order ends CANCELLED or FAILED.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompensationCause {
    /// For admins: what failed, with the provider's words.
    pub reason: String,
    /// A cancellation (the order ends CANCELLED) rather than a failure (FAILED).
    pub cancel: bool,
    /// The order's reason, which its customer sees: the requester's words
    /// for a request, a short fixed text for a failure ([`customer_reason`]).
    pub order_reason: String,
}

/// Why a saga is parked (waits for a person and `retrySaga`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParkCause {
    /// A compensation failed on every attempt (a refund the provider keeps refusing).
    #[default]
    CompensationFailed,
    /// Whether a call had its effect could not be learned: no `lookup`, and
    /// repeating the call failed. Check with the provider by hand.
    OutcomeUnknown,
    /// The saga's own write was refused for a reason retrying cannot fix.
    WriteRefused,
    /// The step's plugin was not active on any process that took the saga.
    PluginUnavailable,
    /// The runner itself failed (panicked) on the saga several times in a
    /// row: a kernel bug; the log has the panics.
    DriveFailed,
}

impl ParkCause {
    pub const ALL: [ParkCause; 5] = [
        ParkCause::CompensationFailed,
        ParkCause::OutcomeUnknown,
        ParkCause::WriteRefused,
        ParkCause::PluginUnavailable,
        ParkCause::DriveFailed,
    ];

    /// The label of metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ParkCause::CompensationFailed => "compensation_failed",
            ParkCause::OutcomeUnknown => "outcome_unknown",
            ParkCause::WriteRefused => "write_refused",
            ParkCause::PluginUnavailable => "plugin_unavailable",
            ParkCause::DriveFailed => "drive_failed",
        }
    }
}

impl fmt::Display for ParkCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a customer is told about a step that failed: a short fixed text,
/// never a provider's words or a reference.
pub fn customer_reason(step: &StepState) -> &'static str {
    let Some(error) = &step.error else {
        return "the order could not be completed";
    };
    match (&step.definition.action, error.code.as_str()) {
        (StepAction::ReserveInventory, "insufficient_stock") => "out of stock",
        (StepAction::ReserveInventory, "product_inactive") => "a product is no longer available",
        (_, "deadline") => "a provider did not answer in time",
        _ if error.retryable => "a provider is unavailable",
        (StepAction::Payment { .. }, "unusable_result" | "unexpected_payment_status") => {
            "the payment could not be completed"
        }
        (StepAction::Payment { .. }, _) => "payment declined",
        (StepAction::Shipment { .. }, _) => "the shipment was refused",
        _ => "the order could not be completed",
    }
}

// `Started` carries the whole definition; events live briefly, so boxing buys little.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum SagaEvent {
    Started {
        saga_type: String,
        order_id: Uuid,
        definition: SagaDefinition,
        started_at: DateTime<Utc>,
        deadline: DateTime<Utc>,
    },
    /// Written before the step's action: a call, or a local transaction.
    StepStarted {
        step: String,
        phase: Phase,
        attempt: u32,
        at: DateTime<Utc>,
        /// The plugin version called, for plugin steps.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        plugin_version: Option<String>,
        /// Whether that version can reach anything outside the kernel (it
        /// is granted outbound HTTP). One that cannot has had no outside
        /// effect whatever happened to the call. Records from before this
        /// was kept read as `true`.
        #[serde(default = "reaches_outside_by_default")]
        reaches_outside: bool,
    },
    StepSucceeded {
        step: String,
        output: Value,
    },
    /// An attempt failed; `retry_at` is when the next attempt is due, or none
    /// when the step gives up (forward: compensation follows; compensation:
    /// the saga is parked).
    StepFailed {
        step: String,
        phase: Phase,
        attempt: u32,
        error: StepError,
        retry_at: Option<DateTime<Utc>>,
    },
    StepCompensated {
        step: String,
        output: Value,
    },
    /// Someone asked for the saga to be undone (cancelOrder, compensateSaga).
    CompensationRequested {
        reason: String,
        cancel: bool,
    },
    CompensationStarted {
        reason: String,
        cancel: bool,
        /// The order's reason; records from before it was kept use `reason`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        order_reason: Option<String>,
    },
    /// An admin asked for the saga to go on now (a parked saga resumes its
    /// compensation with fresh attempts).
    RetryRequested,
    Completed,
    Compensated,
    Parked {
        step: String,
        reason: String,
        #[serde(default)]
        cause: ParkCause,
    },
}

fn reaches_outside_by_default() -> bool {
    true
}

impl DomainEvent for SagaEvent {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SagaStatus {
    Running,
    Compensating,
    Completed,
    Compensated,
    /// A compensation kept failing: a human must look (and `retrySaga`).
    Parked,
}

impl SagaStatus {
    pub const ALL: [SagaStatus; 5] = [
        SagaStatus::Running,
        SagaStatus::Compensating,
        SagaStatus::Completed,
        SagaStatus::Compensated,
        SagaStatus::Parked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "RUNNING",
            SagaStatus::Compensating => "COMPENSATING",
            SagaStatus::Completed => "COMPLETED",
            SagaStatus::Compensated => "COMPENSATED",
            SagaStatus::Parked => "PARKED",
        }
    }

    pub fn parse(text: &str) -> Option<SagaStatus> {
        SagaStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// COMPLETED and COMPENSATED: nothing will ever happen again.
    pub fn is_final(self) -> bool {
        matches!(self, SagaStatus::Completed | SagaStatus::Compensated)
    }
}

impl fmt::Display for SagaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StepStatus {
    Pending,
    /// Started; no outcome recorded yet.
    Running,
    Succeeded,
    /// The last forward attempt failed (it may be retried).
    Failed,
    /// Being undone (its last compensation attempt may have failed).
    Compensating,
    Compensated,
}

/// A step of a saga as its events tell it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepState {
    pub definition: StepDefinition,
    pub status: StepStatus,
    /// Forward attempts started.
    pub attempts: u32,
    pub compensation_attempts: u32,
    pub error: Option<StepError>,
    /// What the forward call returned (payment reference, shipment, ...).
    pub output: Option<Value>,
    /// Whether the forward action (any attempt) may have had an effect that
    /// is not undone.
    pub effect_possible: bool,
    /// Whether an attempt before the last may have had its effect (its
    /// outcome was never recorded, or it failed with the effect possible).
    /// That stays to be found out whatever later attempts answer: a refusal
    /// (another version's, a rotated key's 401, even a decline) says
    /// nothing certain about an earlier call; only `lookup` does.
    pub earlier_effect_possible: bool,
    /// When the last forward attempt started.
    pub last_started_at: Option<DateTime<Utc>>,
    /// The plugin version of the last forward attempt.
    pub plugin_version: Option<String>,
    /// Whether any attempt ran on a version that could reach anything
    /// outside the kernel; see [`SagaEvent::StepStarted`].
    pub reaches_outside: bool,
}

impl StepState {
    pub fn name(&self) -> &str {
        &self.definition.name
    }

    /// Whether compensation has something to undo here.
    fn needs_undo(&self) -> bool {
        self.definition.action.is_compensated_by_a_call()
            && match self.status {
                StepStatus::Pending | StepStatus::Compensated => false,
                StepStatus::Succeeded | StepStatus::Compensating => true,
                StepStatus::Running | StepStatus::Failed => self.effect_possible,
            }
    }

    /// Whether the forward outcome is unknown: compensation must first ask
    /// the provider what the call did (its `lookup`).
    pub fn outcome_unknown(&self) -> bool {
        self.output.is_none()
    }

    /// Whether an unknown outcome can be nothing to learn: the attempt ran
    /// on a plugin version with no way out of the kernel, so compensation
    /// only calls its `compensate`, never its `execute` again.
    pub fn had_no_outside_reach(&self) -> bool {
        matches!(self.definition.action, StepAction::Custom { .. }) && !self.reaches_outside
    }
}

/// What the runner should do next with a saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Final or parked: nothing until someone intervenes.
    Idle,
    /// Nothing until then (a retry's back-off; the deadline comes earlier).
    Wait(DateTime<Utc>),
    /// Run step `step` forward as attempt `attempt`.
    Forward { step: usize, attempt: u32 },
    /// Record that compensation begins.
    BeginCompensation(CompensationCause),
    /// Undo step `step`, attempt `attempt`.
    Compensate { step: usize, attempt: u32 },
    /// Every effect is undone: fail or cancel the order (releasing its stock)
    /// and end the saga.
    FinishCompensation(CompensationCause),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Saga {
    pub saga_type: String,
    pub order_id: Uuid,
    pub started_at: Option<DateTime<Utc>>,
    pub deadline: Option<DateTime<Utc>>,
    /// `None` until started.
    pub status: Option<SagaStatus>,
    pub steps: Vec<StepState>,
    pub compensation_retry: Option<StepRetry>,
    /// When the next attempt (forward or compensation) is due.
    pub retry_at: Option<DateTime<Utc>>,
    /// Set once compensation has begun.
    pub compensation: Option<CompensationCause>,
    /// A request to compensate, not yet acted on.
    pub requested: Option<CompensationCause>,
    /// Why the saga is parked.
    pub parked: Option<String>,
    pub park_cause: Option<ParkCause>,
    /// The status a parked saga had before, to which `retrySaga` returns it.
    pub parked_from: Option<SagaStatus>,
}

impl Aggregate for Saga {
    const AGGREGATE_TYPE: &'static str = "saga";
    type Event = SagaEvent;

    fn apply(&mut self, event: &SagaEvent) {
        match event {
            SagaEvent::Started {
                saga_type,
                order_id,
                definition,
                started_at,
                deadline,
            } => {
                self.saga_type = saga_type.clone();
                self.order_id = *order_id;
                self.started_at = Some(*started_at);
                self.deadline = Some(*deadline);
                self.status = Some(SagaStatus::Running);
                self.compensation_retry = Some(definition.compensation_retry);
                self.steps = definition
                    .steps
                    .iter()
                    .map(|definition| StepState {
                        definition: definition.clone(),
                        status: StepStatus::Pending,
                        attempts: 0,
                        compensation_attempts: 0,
                        error: None,
                        output: None,
                        effect_possible: false,
                        earlier_effect_possible: false,
                        last_started_at: None,
                        plugin_version: None,
                        reaches_outside: false,
                    })
                    .collect();
            }
            SagaEvent::StepStarted {
                step,
                phase,
                attempt,
                at,
                plugin_version,
                reaches_outside,
            } => {
                self.retry_at = None;
                if let Some(state) = self.step_mut(step) {
                    match phase {
                        Phase::Forward => {
                            state.earlier_effect_possible |= state.effect_possible;
                            state.status = StepStatus::Running;
                            state.attempts = *attempt;
                            state.effect_possible = true;
                            state.last_started_at = Some(*at);
                            state.plugin_version = plugin_version.clone();
                            state.reaches_outside |= *reaches_outside;
                        }
                        Phase::Compensation => {
                            state.status = StepStatus::Compensating;
                            state.compensation_attempts = *attempt;
                        }
                    }
                }
            }
            SagaEvent::StepSucceeded { step, output } => {
                if let Some(state) = self.step_mut(step) {
                    state.status = StepStatus::Succeeded;
                    state.output = Some(output.clone());
                    state.error = None;
                }
            }
            SagaEvent::StepFailed {
                step,
                phase,
                error,
                retry_at,
                ..
            } => {
                self.retry_at = *retry_at;
                if let Some(state) = self.step_mut(step) {
                    state.error = Some(error.clone());
                    if *phase == Phase::Forward {
                        state.status = StepStatus::Failed;
                        state.effect_possible =
                            state.earlier_effect_possible || error.effect_possible;
                    }
                }
            }
            SagaEvent::StepCompensated { step, .. } => {
                if let Some(state) = self.step_mut(step) {
                    state.status = StepStatus::Compensated;
                    state.effect_possible = false;
                    state.earlier_effect_possible = false;
                    state.error = None;
                }
            }
            SagaEvent::CompensationRequested { reason, cancel } => {
                // A cancellation's reason is the order's; an admin's request
                // to compensate (`compensateSaga`) is internal.
                let order_reason = if *cancel {
                    reason.clone()
                } else {
                    "the order could not be completed".to_string()
                };
                self.requested = Some(CompensationCause {
                    reason: reason.clone(),
                    cancel: *cancel,
                    order_reason,
                });
            }
            SagaEvent::CompensationStarted {
                reason,
                cancel,
                order_reason,
            } => {
                self.status = Some(SagaStatus::Compensating);
                self.compensation = Some(CompensationCause {
                    reason: reason.clone(),
                    cancel: *cancel,
                    order_reason: order_reason.clone().unwrap_or_else(|| reason.clone()),
                });
                self.requested = None;
                self.retry_at = None;
            }
            SagaEvent::RetryRequested => {
                self.retry_at = None;
                if self.status == Some(SagaStatus::Parked) {
                    self.status = Some(self.parked_from.unwrap_or(SagaStatus::Compensating));
                    self.parked = None;
                    self.park_cause = None;
                    for step in &mut self.steps {
                        if step.status == StepStatus::Compensating {
                            step.compensation_attempts = 0;
                        }
                    }
                }
            }
            SagaEvent::Completed => self.status = Some(SagaStatus::Completed),
            SagaEvent::Compensated => self.status = Some(SagaStatus::Compensated),
            SagaEvent::Parked { reason, cause, .. } => {
                if self.status != Some(SagaStatus::Parked) {
                    self.parked_from = self.status;
                }
                self.status = Some(SagaStatus::Parked);
                self.parked = Some(reason.clone());
                self.park_cause = Some(*cause);
            }
        }
    }
}

impl Saga {
    /// The id of the saga of type `saga_type` for `order_id`: one per order.
    pub fn id_for(saga_type: &str, order_id: Uuid) -> Uuid {
        Uuid::new_v5(
            &SAGA_NAMESPACE,
            format!("{saga_type}:{order_id}").as_bytes(),
        )
    }

    /// The idempotency key of a step's forward call, the same on every
    /// attempt and after any restart.
    pub fn step_key(saga_id: Uuid, step: &str) -> String {
        format!("{saga_id}:{step}")
    }

    /// The idempotency key of the capture that follows a charge the
    /// provider only authorized.
    pub fn capture_key(saga_id: Uuid, step: &str) -> String {
        format!("{saga_id}:{step}:capture")
    }

    /// The idempotency key of a step's compensation call.
    pub fn compensation_key(saga_id: Uuid, step: &str) -> String {
        format!("{saga_id}:{step}:compensate")
    }

    pub fn start(
        saga_type: &str,
        order_id: Uuid,
        definition: SagaDefinition,
        now: DateTime<Utc>,
    ) -> Result<Vec<SagaEvent>, DomainError> {
        definition.validate()?;
        let deadline = now
            + chrono::Duration::from_std(definition.timeout())
                .map_err(|_| DomainError::invalid("timeoutMs", "out of range"))?;
        Ok(vec![SagaEvent::Started {
            saga_type: saga_type.to_string(),
            order_id,
            definition,
            started_at: now,
            deadline,
        }])
    }

    fn step_mut(&mut self, name: &str) -> Option<&mut StepState> {
        self.steps.iter_mut().find(|s| s.definition.name == name)
    }

    pub fn step(&self, name: &str) -> Option<&StepState> {
        self.steps.iter().find(|s| s.definition.name == name)
    }

    /// The step being worked on: the first unfinished one going forward, the
    /// one being undone while compensating.
    pub fn current_step(&self) -> Option<&StepState> {
        let status = match self.status? {
            SagaStatus::Parked => self.parked_from.unwrap_or(SagaStatus::Compensating),
            other => other,
        };
        match status {
            SagaStatus::Running => self
                .steps
                .iter()
                .find(|s| s.status != StepStatus::Succeeded),
            SagaStatus::Compensating | SagaStatus::Parked => {
                self.steps.iter().rev().find(|s| s.needs_undo())
            }
            SagaStatus::Completed | SagaStatus::Compensated => None,
        }
    }

    /// What to do next, given the record and the time.
    pub fn next(&self, now: DateTime<Utc>) -> Next {
        let Some(status) = self.status else {
            return Next::Idle;
        };
        match status {
            SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::Parked => Next::Idle,
            SagaStatus::Running => self.next_forward(now),
            SagaStatus::Compensating => self.next_compensation(now),
        }
    }

    fn next_forward(&self, now: DateTime<Utc>) -> Next {
        if let Some(requested) = &self.requested {
            return Next::BeginCompensation(requested.clone());
        }
        let deadline = self.deadline.unwrap_or(now);
        if now >= deadline {
            return Next::BeginCompensation(CompensationCause {
                reason: "the saga did not finish before its deadline".into(),
                cancel: false,
                order_reason: "the order took too long to process".into(),
            });
        }
        let Some(index) = self
            .steps
            .iter()
            .position(|s| s.status != StepStatus::Succeeded)
        else {
            // Confirming completes the saga in the same write, so this is a
            // record that lost its `Completed`; nothing is left to do forward.
            return Next::Idle;
        };
        let step = &self.steps[index];
        let max_attempts = step.definition.retry.max_attempts;
        match step.status {
            StepStatus::Pending => Next::Forward {
                step: index,
                attempt: 1,
            },
            // Started, outcome never recorded: the process running it stopped.
            StepStatus::Running if step.attempts < max_attempts => Next::Forward {
                step: index,
                attempt: step.attempts + 1,
            },
            StepStatus::Running => Next::BeginCompensation(CompensationCause {
                reason: format!(
                    "step {} did not finish in {} attempts",
                    step.name(),
                    step.attempts
                ),
                cancel: false,
                order_reason: "a provider did not answer in time".into(),
            }),
            StepStatus::Failed => match self.retry_at {
                Some(at) if at > now => Next::Wait(at.min(deadline)),
                Some(_) if step.attempts < max_attempts => Next::Forward {
                    step: index,
                    attempt: step.attempts + 1,
                },
                _ => Next::BeginCompensation(CompensationCause {
                    reason: match &step.error {
                        Some(error) => summarize(
                            &format!("step {} failed: {}", step.name(), error.summary()),
                            MAX_REASON_CHARS,
                        ),
                        None => format!("step {} failed", step.name()),
                    },
                    cancel: false,
                    order_reason: customer_reason(step).to_string(),
                }),
            },
            // Not reachable going forward; treat like a finished step.
            StepStatus::Succeeded | StepStatus::Compensating | StepStatus::Compensated => {
                Next::Idle
            }
        }
    }

    fn next_compensation(&self, now: DateTime<Utc>) -> Next {
        let cause = self.compensation.clone().unwrap_or(CompensationCause {
            reason: "compensation".into(),
            cancel: false,
            order_reason: "the order could not be completed".into(),
        });
        let Some(index) = self.steps.iter().rposition(StepState::needs_undo) else {
            return Next::FinishCompensation(cause);
        };
        let step = &self.steps[index];
        if step.status == StepStatus::Compensating
            && let Some(at) = self.retry_at
            && at > now
        {
            return Next::Wait(at);
        }
        let attempt = if step.status == StepStatus::Compensating {
            step.compensation_attempts + 1
        } else {
            1
        };
        Next::Compensate {
            step: index,
            attempt,
        }
    }

    /// Whether a compensation attempt that failed should be the last: the
    /// saga is then parked.
    pub fn compensation_exhausted(&self, attempt: u32) -> bool {
        attempt
            >= self
                .compensation_retry
                .map(|retry| retry.max_attempts)
                .unwrap_or(1)
    }

    fn require_active(&self, saga_id: Uuid) -> Result<SagaStatus, DomainError> {
        match self.status {
            None => Err(DomainError::NotFound {
                kind: "saga",
                id: saga_id,
            }),
            Some(status) if status.is_final() => Err(DomainError::SagaEnded { saga_id, status }),
            Some(status) => Ok(status),
        }
    }

    /// Asks for the saga to be undone. Already compensating (or parked while
    /// compensating): nothing to add. Parked going forward: recorded, so the
    /// saga compensates once an admin retries it instead of going on.
    pub fn request_compensation(
        &self,
        saga_id: Uuid,
        reason: &str,
        cancel: bool,
    ) -> Result<Vec<SagaEvent>, DomainError> {
        let reason = clean_text("reason", reason, MAX_REASON_CHARS)?;
        let going_forward = match self.require_active(saga_id)? {
            SagaStatus::Running => true,
            // Parked going forward: recorded now, acted on once retried.
            SagaStatus::Parked => self.parked_from == Some(SagaStatus::Running),
            _ => false,
        };
        if going_forward && self.requested.is_none() {
            Ok(vec![SagaEvent::CompensationRequested { reason, cancel }])
        } else {
            Ok(Vec::new())
        }
    }

    /// Asks the runner to go on now: a waiting retry runs at once, a parked
    /// saga resumes its compensation with fresh attempts.
    pub fn request_retry(&self, saga_id: Uuid) -> Result<Vec<SagaEvent>, DomainError> {
        self.require_active(saga_id)?;
        Ok(vec![SagaEvent::RetryRequested])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(seconds: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + seconds, 0)
            .single()
            .expect("valid time")
    }

    fn started() -> Saga {
        let mut saga = Saga::default();
        let events = Saga::start(
            ORDER_FULFILMENT,
            Uuid::now_v7(),
            SagaDefinition::default_order_fulfilment(),
            at(0),
        )
        .expect("valid definition");
        for event in &events {
            saga.apply(event);
        }
        saga
    }

    fn apply(saga: &mut Saga, events: &[SagaEvent]) {
        for event in events {
            saga.apply(event);
        }
    }

    fn started_step(step: &str, phase: Phase, attempt: u32) -> SagaEvent {
        SagaEvent::StepStarted {
            step: step.into(),
            phase,
            attempt,
            at: at(1),
            plugin_version: None,
            reaches_outside: true,
        }
    }

    fn succeeded(step: &str) -> SagaEvent {
        SagaEvent::StepSucceeded {
            step: step.into(),
            output: serde_json::json!({ "reference": step }),
        }
    }

    fn failed(step: &str, attempt: u32, effect_possible: bool, retry_at: Option<i64>) -> SagaEvent {
        SagaEvent::StepFailed {
            step: step.into(),
            phase: Phase::Forward,
            attempt,
            error: StepError {
                code: "boom".into(),
                message: "it broke".into(),
                retryable: effect_possible,
                effect_possible,
            },
            retry_at: retry_at.map(at),
        }
    }

    #[test]
    fn the_happy_path_runs_every_step_forward_once() {
        let mut saga = started();
        for (index, name) in ["reserve-inventory", "payment", "shipment", "confirm"]
            .into_iter()
            .enumerate()
        {
            assert_eq!(
                saga.next(at(1)),
                Next::Forward {
                    step: index,
                    attempt: 1
                }
            );
            apply(
                &mut saga,
                &[started_step(name, Phase::Forward, 1), succeeded(name)],
            );
        }
        apply(&mut saga, &[SagaEvent::Completed]);
        assert_eq!(saga.status, Some(SagaStatus::Completed));
        assert_eq!(saga.next(at(2)), Next::Idle);
        assert!(
            saga.request_compensation(Uuid::nil(), "late", true)
                .is_err()
        );
    }

    #[test]
    fn transient_failures_wait_then_retry_and_give_up_into_compensation() {
        let mut saga = started();
        apply(
            &mut saga,
            &[
                started_step("reserve-inventory", Phase::Forward, 1),
                succeeded("reserve-inventory"),
                started_step("payment", Phase::Forward, 1),
                failed("payment", 1, true, Some(10)),
            ],
        );
        assert_eq!(saga.next(at(5)), Next::Wait(at(10)));
        assert_eq!(
            saga.next(at(10)),
            Next::Forward {
                step: 1,
                attempt: 2
            }
        );
        // The last attempt fails: compensation, which must find out whether
        // the uncertain payment happened.
        apply(
            &mut saga,
            &[
                started_step("payment", Phase::Forward, 5),
                failed("payment", 5, true, None),
            ],
        );
        let Next::BeginCompensation(cause) = saga.next(at(20)) else {
            panic!("expected compensation, got {:?}", saga.next(at(20)));
        };
        assert!(cause.reason.contains("payment"), "{}", cause.reason);
        apply(
            &mut saga,
            &[SagaEvent::CompensationStarted {
                reason: cause.reason,
                cancel: false,
                order_reason: Some(cause.order_reason),
            }],
        );
        assert_eq!(
            saga.next(at(20)),
            Next::Compensate {
                step: 1,
                attempt: 1
            }
        );
        assert!(saga.steps[1].outcome_unknown());
    }

    #[test]
    fn a_declined_payment_has_nothing_to_undo_but_the_stock() {
        let mut saga = started();
        apply(
            &mut saga,
            &[
                started_step("reserve-inventory", Phase::Forward, 1),
                succeeded("reserve-inventory"),
                started_step("payment", Phase::Forward, 1),
                failed("payment", 1, false, None),
                SagaEvent::CompensationStarted {
                    reason: "declined".into(),
                    cancel: false,
                    order_reason: None,
                },
            ],
        );
        assert_eq!(
            saga.next(at(2)),
            Next::FinishCompensation(CompensationCause {
                reason: "declined".into(),
                cancel: false,
                order_reason: "declined".into(),
            })
        );
    }

    #[test]
    fn compensation_runs_in_reverse_and_never_goes_forward_again() {
        let mut saga = started();
        for name in ["reserve-inventory", "payment", "shipment"] {
            apply(
                &mut saga,
                &[started_step(name, Phase::Forward, 1), succeeded(name)],
            );
        }
        apply(
            &mut saga,
            &[SagaEvent::CompensationRequested {
                reason: "changed my mind".into(),
                cancel: true,
            }],
        );
        let Next::BeginCompensation(cause) = saga.next(at(3)) else {
            panic!("a request begins compensation");
        };
        assert!(cause.cancel);
        apply(
            &mut saga,
            &[SagaEvent::CompensationStarted {
                reason: cause.reason,
                cancel: true,
                order_reason: Some(cause.order_reason),
            }],
        );
        // Shipment first, then payment; stock goes back when the order is cancelled.
        assert_eq!(
            saga.next(at(3)),
            Next::Compensate {
                step: 2,
                attempt: 1
            }
        );
        apply(
            &mut saga,
            &[
                started_step("shipment", Phase::Compensation, 1),
                SagaEvent::StepFailed {
                    step: "shipment".into(),
                    phase: Phase::Compensation,
                    attempt: 1,
                    error: StepError {
                        code: "down".into(),
                        message: "carrier down".into(),
                        retryable: true,
                        effect_possible: true,
                    },
                    retry_at: Some(at(9)),
                },
            ],
        );
        assert_eq!(saga.next(at(4)), Next::Wait(at(9)));
        assert_eq!(
            saga.next(at(9)),
            Next::Compensate {
                step: 2,
                attempt: 2
            }
        );
        apply(
            &mut saga,
            &[SagaEvent::StepCompensated {
                step: "shipment".into(),
                output: Value::Null,
            }],
        );
        assert_eq!(
            saga.next(at(9)),
            Next::Compensate {
                step: 1,
                attempt: 1
            }
        );
        apply(
            &mut saga,
            &[SagaEvent::StepCompensated {
                step: "payment".into(),
                output: Value::Null,
            }],
        );
        assert!(matches!(
            saga.next(at(9)),
            Next::FinishCompensation(CompensationCause { cancel: true, .. })
        ));
        // A late request changes nothing.
        assert_eq!(
            saga.request_compensation(Uuid::nil(), "again", true),
            Ok(Vec::new())
        );
    }

    #[test]
    fn a_parked_saga_resumes_with_fresh_attempts() {
        let mut saga = started();
        apply(
            &mut saga,
            &[
                started_step("reserve-inventory", Phase::Forward, 1),
                succeeded("reserve-inventory"),
                started_step("payment", Phase::Forward, 1),
                succeeded("payment"),
                SagaEvent::CompensationStarted {
                    reason: "x".into(),
                    cancel: false,
                    order_reason: None,
                },
                started_step("payment", Phase::Compensation, 10),
                SagaEvent::Parked {
                    step: "payment".into(),
                    reason: "refund keeps failing".into(),
                    cause: ParkCause::CompensationFailed,
                },
            ],
        );
        assert!(saga.compensation_exhausted(10));
        assert_eq!(saga.next(at(5)), Next::Idle);
        let retry = saga.request_retry(Uuid::nil()).expect("parked sagas retry");
        apply(&mut saga, &retry);
        assert_eq!(
            saga.next(at(5)),
            Next::Compensate {
                step: 1,
                attempt: 1
            }
        );
    }

    #[test]
    fn a_step_whose_process_died_runs_again_and_the_deadline_compensates() {
        let mut saga = started();
        apply(
            &mut saga,
            &[
                started_step("reserve-inventory", Phase::Forward, 1),
                succeeded("reserve-inventory"),
                started_step("payment", Phase::Forward, 1),
            ],
        );
        assert_eq!(
            saga.next(at(2)),
            Next::Forward {
                step: 1,
                attempt: 2
            }
        );
        assert!(matches!(
            saga.next(at(301)),
            Next::BeginCompensation(CompensationCause { cancel: false, .. })
        ));
    }

    #[test]
    fn definitions_keep_the_order_state_machine() {
        let mut definition = SagaDefinition::default_order_fulfilment();
        assert_eq!(definition.validate(), Ok(()));
        definition.steps.insert(
            1,
            StepDefinition {
                name: "order-limit".into(),
                action: StepAction::Custom {
                    plugin: "order-limit".into(),
                },
                retry: definition.steps[0].retry,
            },
        );
        assert_eq!(definition.validate(), Ok(()));

        let mut swapped = definition.clone();
        swapped.steps.swap(2, 3);
        assert!(swapped.validate().is_err(), "shipment before payment");
        let mut twice = definition.clone();
        twice.steps[1].name = "payment".into();
        assert!(twice.validate().is_err(), "duplicate names");
        let mut after_confirm = definition.clone();
        let custom = after_confirm.steps.remove(1);
        after_confirm.steps.push(custom);
        assert!(after_confirm.validate().is_err(), "confirm is last");
        let mut bad_retry = definition.clone();
        bad_retry.steps[0].retry.max_attempts = 0;
        assert!(bad_retry.validate().is_err());
        let mut bad_name = definition;
        bad_name.steps[1].name = "Order Limit".into();
        assert!(bad_name.validate().is_err());

        let history = SagaDefinitions::default();
        assert_eq!(
            history.effective(),
            SagaDefinition::default_order_fulfilment()
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let retry = StepRetry {
            max_attempts: 5,
            initial_backoff_ms: 100,
            max_backoff_ms: 1_000,
            timeout_ms: 1_000,
        };
        for random in [0, 7, u64::MAX] {
            let first = retry.backoff(1, random).as_millis();
            assert!((50..=100).contains(&first), "{first}");
            let third = retry.backoff(3, random).as_millis();
            assert!((200..=400).contains(&third), "{third}");
            let late = retry.backoff(30, random).as_millis();
            assert!((500..=1_000).contains(&late), "{late}");
        }
    }

    #[test]
    fn records_written_before_these_fields_still_read() {
        let started: SagaEvent = serde_json::from_value(serde_json::json!({
            "type": "StepStarted",
            "data": { "step": "payment", "phase": "forward", "attempt": 1, "at": at(1) },
        }))
        .expect("an old StepStarted");
        assert!(matches!(
            started,
            SagaEvent::StepStarted {
                reaches_outside: true,
                plugin_version: None,
                ..
            }
        ));
        let parked: SagaEvent = serde_json::from_value(serde_json::json!({
            "type": "Parked",
            "data": { "step": "payment", "reason": "refund keeps failing" },
        }))
        .expect("an old Parked");
        assert!(matches!(
            parked,
            SagaEvent::Parked {
                cause: ParkCause::CompensationFailed,
                ..
            }
        ));
        let mut saga = started_saga_at_payment();
        let compensating: SagaEvent = serde_json::from_value(serde_json::json!({
            "type": "CompensationStarted",
            "data": { "reason": "step payment failed", "cancel": false },
        }))
        .expect("an old CompensationStarted");
        apply(&mut saga, &[compensating]);
        let cause = saga.compensation.expect("compensating");
        assert_eq!(cause.order_reason, "step payment failed");
    }

    fn started_saga_at_payment() -> Saga {
        let mut saga = started();
        apply(
            &mut saga,
            &[
                started_step("reserve-inventory", Phase::Forward, 1),
                succeeded("reserve-inventory"),
                started_step("payment", Phase::Forward, 1),
            ],
        );
        saga
    }

    #[test]
    fn any_provider_text_makes_a_clean_bounded_reason_and_a_short_one_for_the_customer() {
        let mut saga = started_saga_at_payment();
        let message = format!(
            "Your card was declined.\nPlease try another card.{}",
            "\u{7}x".repeat(50_000)
        );
        let error = StepError::new("Card Declined\n<b>", &message, false, false);
        assert_eq!(error.code, "card_declined_b");
        assert!(error.message.chars().count() <= MAX_ERROR_MESSAGE_CHARS);
        assert!(!error.message.chars().any(char::is_control));
        assert!(
            error
                .message
                .starts_with("Your card was declined. Please try another card.")
        );
        apply(
            &mut saga,
            &[SagaEvent::StepFailed {
                step: "payment".into(),
                phase: Phase::Forward,
                attempt: 1,
                error,
                retry_at: None,
            }],
        );
        let Next::BeginCompensation(cause) = saga.next(at(2)) else {
            panic!("a decline compensates");
        };
        assert!(cause.reason.chars().count() <= MAX_REASON_CHARS);
        assert!(!cause.reason.chars().any(char::is_control));
        assert!(
            cause
                .reason
                .starts_with("step payment failed: card_declined_b: Your card")
        );
        assert_eq!(cause.order_reason, "payment declined");
        // Whatever an old record holds, the order's own check accepts it.
        assert!(clean_text("reason", &cause.order_reason, 500).is_ok());
    }

    #[test]
    fn customers_get_a_fixed_reason_for_each_kind_of_failure() {
        let saga = started();
        let with = |index: usize, code: &str, retryable: bool| {
            let mut step = saga.steps[index].clone();
            step.error = Some(StepError::new(code, "details", retryable, false));
            customer_reason(&step)
        };
        assert_eq!(with(0, "insufficient_stock", false), "out of stock");
        assert_eq!(
            with(0, "product_inactive", false),
            "a product is no longer available"
        );
        assert_eq!(with(1, "card_declined", false), "payment declined");
        assert_eq!(
            with(1, "deadline", true),
            "a provider did not answer in time"
        );
        assert_eq!(with(1, "http_503", true), "a provider is unavailable");
        assert_eq!(
            with(2, "address_refused", false),
            "the shipment was refused"
        );
        assert_eq!(
            with(3, "whatever", false),
            "the order could not be completed"
        );
    }

    #[test]
    fn a_saga_parked_going_forward_is_retried_going_forward() {
        let mut saga = started_saga_at_payment();
        apply(
            &mut saga,
            &[SagaEvent::Parked {
                step: "payment".into(),
                reason: "a saga write was refused".into(),
                cause: ParkCause::WriteRefused,
            }],
        );
        assert_eq!(saga.status, Some(SagaStatus::Parked));
        assert_eq!(saga.park_cause, Some(ParkCause::WriteRefused));
        assert_eq!(saga.current_step().map(StepState::name), Some("payment"));
        assert_eq!(saga.next(at(2)), Next::Idle);
        let retry = saga.request_retry(Uuid::nil()).expect("parked sagas retry");
        apply(&mut saga, &retry);
        assert_eq!(saga.status, Some(SagaStatus::Running));
        assert_eq!(saga.park_cause, None);
        assert_eq!(
            saga.next(at(2)),
            Next::Forward {
                step: 1,
                attempt: 2
            }
        );
    }

    #[test]
    fn only_a_custom_step_without_outside_reach_has_nothing_to_learn() {
        let mut definition = SagaDefinition::default_order_fulfilment();
        definition.steps.insert(
            1,
            StepDefinition {
                name: "limit".into(),
                action: StepAction::Custom {
                    plugin: "limit".into(),
                },
                retry: definition.steps[0].retry,
            },
        );
        let mut saga = Saga::default();
        apply(
            &mut saga,
            &Saga::start(ORDER_FULFILMENT, Uuid::nil(), definition, at(0)).expect("valid"),
        );
        let start = |reaches_outside| SagaEvent::StepStarted {
            step: "limit".into(),
            phase: Phase::Forward,
            attempt: 1,
            at: at(1),
            plugin_version: Some("1.0.0".into()),
            reaches_outside,
        };
        apply(&mut saga, &[start(false)]);
        assert!(
            saga.step("limit")
                .is_some_and(StepState::had_no_outside_reach)
        );
        apply(&mut saga, &[start(true)]);
        assert!(
            !saga
                .step("limit")
                .is_some_and(StepState::had_no_outside_reach)
        );
        // A payment always reaches its provider.
        assert!(
            !saga
                .step("payment")
                .is_some_and(StepState::had_no_outside_reach)
        );
    }

    #[test]
    fn an_attempt_that_may_have_charged_stays_to_undo_whatever_later_attempts_say() {
        let mut saga = started_saga_at_payment();
        // Attempt 1 times out (the provider may have charged), attempt 2 is
        // refused before reaching it (a misconfigured version, say).
        apply(
            &mut saga,
            &[
                failed("payment", 1, true, Some(2)),
                started_step("payment", Phase::Forward, 2),
                failed("payment", 2, false, None),
            ],
        );
        let Next::BeginCompensation(cause) = saga.next(at(3)) else {
            panic!("compensates");
        };
        apply(
            &mut saga,
            &[SagaEvent::CompensationStarted {
                reason: cause.reason,
                cancel: false,
                order_reason: Some(cause.order_reason),
            }],
        );
        assert_eq!(
            saga.next(at(3)),
            Next::Compensate {
                step: 1,
                attempt: 1
            },
            "the first attempt's charge must be looked up"
        );
    }

    #[test]
    fn a_cancel_of_a_saga_parked_going_forward_is_kept_for_its_retry() {
        let mut saga = started_saga_at_payment();
        apply(
            &mut saga,
            &[SagaEvent::Parked {
                step: "payment".into(),
                reason: "refused".into(),
                cause: ParkCause::WriteRefused,
            }],
        );
        let request = saga
            .request_compensation(Uuid::nil(), "changed my mind", true)
            .expect("recorded");
        assert_eq!(request.len(), 1);
        apply(&mut saga, &request);
        let retry = saga.request_retry(Uuid::nil()).expect("retried");
        apply(&mut saga, &retry);
        assert!(matches!(
            saga.next(at(2)),
            Next::BeginCompensation(CompensationCause { cancel: true, .. })
        ));
        // An admin's compensate request keeps its reason from the customer.
        let mut other = started_saga_at_payment();
        let request = other
            .request_compensation(Uuid::nil(), "flagged by the fraud team", false)
            .expect("recorded");
        apply(&mut other, &request);
        let cause = other.requested.expect("requested");
        assert_eq!(cause.reason, "flagged by the fraud team");
        assert_eq!(cause.order_reason, "the order could not be completed");
    }

    #[test]
    fn no_later_refusal_settles_an_attempt_that_may_have_charged() {
        let start = |attempt: u32, version: &str| SagaEvent::StepStarted {
            step: "payment".into(),
            phase: Phase::Forward,
            attempt,
            at: at(1),
            plugin_version: Some(version.into()),
            reaches_outside: true,
        };
        let refused = |attempt: u32, code: &str| SagaEvent::StepFailed {
            step: "payment".into(),
            phase: Phase::Forward,
            attempt,
            error: StepError::new(code, "refused", false, false),
            retry_at: None,
        };
        let timed_out = SagaEvent::StepFailed {
            step: "payment".into(),
            phase: Phase::Forward,
            attempt: 1,
            error: StepError::new("deadline", "no answer", true, true),
            retry_at: Some(at(2)),
        };
        let base = || {
            let mut saga = started();
            apply(
                &mut saga,
                &[
                    started_step("reserve-inventory", Phase::Forward, 1),
                    succeeded("reserve-inventory"),
                ],
            );
            saga
        };
        // Even the same version declining the same key (a 401 from a
        // rotated key reads the same): the first call is still to look up.
        for (second_version, code) in [
            ("1.0.0", "card_declined"),
            ("1.0.0", "http_401"),
            ("2.0.0", "invalid_config"),
        ] {
            let mut saga = base();
            apply(
                &mut saga,
                &[
                    start(1, "1.0.0"),
                    timed_out.clone(),
                    start(2, second_version),
                    refused(2, code),
                ],
            );
            assert!(
                saga.step("payment").is_some_and(|s| s.effect_possible),
                "{code}"
            );
        }
        // An attempt left running by a dead process counts too.
        let mut died = base();
        apply(
            &mut died,
            &[
                start(1, "1.0.0"),
                start(2, "1.0.0"),
                refused(2, "card_declined"),
            ],
        );
        assert!(died.step("payment").is_some_and(|s| s.effect_possible));
        // A first attempt refused outright has nothing to undo.
        let mut declined = base();
        apply(
            &mut declined,
            &[start(1, "1.0.0"), refused(1, "card_declined")],
        );
        assert!(declined.step("payment").is_some_and(|s| !s.effect_possible));
    }
}
