//! One invocation: a fresh store with the plugin's limits, instantiation
//! from the pre-linked component, the call, and the classification of
//! whatever went wrong into a [`PluginError`].

use std::time::{Duration, Instant};

use tracing::Instrument as _;
use wasmtime::{Store, Trap, UpdateDeadline};

use crate::bindings::{
    Failure as WitFailure, Money, Order, Payment, PaymentRequest, Rate, Shipment, StepContext,
};
use crate::contract_v0_1 as v0_1;
use crate::engine::{LoadedPlugin, Prepared};
use crate::error::{Failure, PluginError};
use crate::manifest::PluginKind;
use crate::state::InvocationState;

/// Fuel (about one unit per wasm instruction) a call runs between two
/// yields to the async runtime.
const YIELD_FUEL: u64 = 500_000;

/// JSON a saga step may return, at most.
const MAX_STEP_OUTPUT_BYTES: usize = 64 * 1024;
/// A provider reference or tracking number, at most.
/// A provider reference, at most. (The order keeps references of up to 200
/// plain characters; a longer or odd one is refused there, and the kernel
/// undoes the call with the reference exactly as the provider gave it.)
const MAX_REFERENCE_CHARS: usize = 1024;
/// A tracking number or a rate's service, at most.
const MAX_LABEL_CHARS: usize = 1024;
/// A label URL, at most.
const MAX_URL_CHARS: usize = 2048;

/// A call into a plugin, by contract.
enum Call {
    Execute(StepContext),
    Compensate(StepContext, String),
    Authorize(PaymentRequest),
    Charge(PaymentRequest),
    Capture(String, String, Money),
    Refund(String, String, Money),
    Cancel(String, String),
    LookupPayment(String),
    Quote(Order),
    CreateShipment(String, Order, String),
    CancelShipment(String, String),
    LookupShipment(String),
}

impl Call {
    fn kind(&self) -> PluginKind {
        match self {
            Call::Execute(..) | Call::Compensate(..) => PluginKind::SagaStep,
            Call::Authorize(..)
            | Call::Charge(..)
            | Call::Capture(..)
            | Call::Refund(..)
            | Call::Cancel(..)
            | Call::LookupPayment(..) => PluginKind::Payment,
            Call::Quote(..)
            | Call::CreateShipment(..)
            | Call::CancelShipment(..)
            | Call::LookupShipment(..) => PluginKind::Shipping,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Call::Execute(..) => "execute",
            Call::Compensate(..) => "compensate",
            Call::Authorize(..) => "authorize",
            Call::Charge(..) => "charge",
            Call::Capture(..) => "capture",
            Call::Refund(..) => "refund",
            Call::Cancel(..) => "cancel",
            Call::LookupPayment(..) | Call::LookupShipment(..) => "lookup",
            Call::Quote(..) => "quote",
            Call::CreateShipment(..) => "create-shipment",
            Call::CancelShipment(..) => "cancel-shipment",
        }
    }
}

/// What a call returned, by contract.
enum Answer {
    Json(String),
    Unit,
    Payment(Payment),
    Rates(Vec<Rate>),
    Shipment(Shipment),
    FoundPayment(Option<Payment>),
    FoundShipment(Option<Shipment>),
}

impl LoadedPlugin {
    /// Runs a saga step forward; returns its output, checked to be JSON.
    pub async fn execute_step(&self, context: StepContext) -> Result<String, PluginError> {
        match self.invoke(Call::Execute(context)).await? {
            Answer::Json(output) => Ok(output),
            _ => Err(self.mismatch()),
        }
    }

    /// Undoes a saga step, given the output its `execute` returned.
    pub async fn compensate_step(
        &self,
        context: StepContext,
        output: String,
    ) -> Result<(), PluginError> {
        self.expect_unit(Call::Compensate(context, output)).await
    }

    pub async fn authorize(&self, request: PaymentRequest) -> Result<Payment, PluginError> {
        self.expect_payment(Call::Authorize(request)).await
    }

    pub async fn charge(&self, request: PaymentRequest) -> Result<Payment, PluginError> {
        self.expect_payment(Call::Charge(request)).await
    }

    pub async fn capture(
        &self,
        idempotency_key: String,
        reference: String,
        amount: Money,
    ) -> Result<Payment, PluginError> {
        self.expect_payment(Call::Capture(idempotency_key, reference, amount))
            .await
    }

    pub async fn refund(
        &self,
        idempotency_key: String,
        reference: String,
        amount: Money,
    ) -> Result<Payment, PluginError> {
        self.expect_payment(Call::Refund(idempotency_key, reference, amount))
            .await
    }

    pub async fn cancel_payment(
        &self,
        idempotency_key: String,
        reference: String,
    ) -> Result<Payment, PluginError> {
        self.expect_payment(Call::Cancel(idempotency_key, reference))
            .await
    }

    /// The payment made with `idempotency_key`, as the provider has it now;
    /// `None` when it has no record of the key. [`PluginError::Unsupported`]
    /// for plugins of contract 0.1 (see [`LoadedPlugin::supports_lookup`]).
    pub async fn lookup_payment(
        &self,
        idempotency_key: String,
    ) -> Result<Option<Payment>, PluginError> {
        match self.invoke(Call::LookupPayment(idempotency_key)).await? {
            Answer::FoundPayment(found) => Ok(found),
            _ => Err(self.mismatch()),
        }
    }

    pub async fn quote(&self, order: Order) -> Result<Vec<Rate>, PluginError> {
        match self.invoke(Call::Quote(order)).await? {
            Answer::Rates(rates) => Ok(rates),
            _ => Err(self.mismatch()),
        }
    }

    pub async fn create_shipment(
        &self,
        idempotency_key: String,
        order: Order,
        service: String,
    ) -> Result<Shipment, PluginError> {
        match self
            .invoke(Call::CreateShipment(idempotency_key, order, service))
            .await?
        {
            Answer::Shipment(shipment) => Ok(shipment),
            _ => Err(self.mismatch()),
        }
    }

    pub async fn cancel_shipment(
        &self,
        idempotency_key: String,
        reference: String,
    ) -> Result<(), PluginError> {
        self.expect_unit(Call::CancelShipment(idempotency_key, reference))
            .await
    }

    /// The shipment created with `idempotency_key`; `None` when the carrier
    /// has no record of the key. [`PluginError::Unsupported`] for plugins of
    /// contract 0.1.
    pub async fn lookup_shipment(
        &self,
        idempotency_key: String,
    ) -> Result<Option<Shipment>, PluginError> {
        match self.invoke(Call::LookupShipment(idempotency_key)).await? {
            Answer::FoundShipment(found) => Ok(found),
            _ => Err(self.mismatch()),
        }
    }

    async fn expect_payment(&self, call: Call) -> Result<Payment, PluginError> {
        match self.invoke(call).await? {
            Answer::Payment(payment) => Ok(payment),
            _ => Err(self.mismatch()),
        }
    }

    async fn expect_unit(&self, call: Call) -> Result<(), PluginError> {
        match self.invoke(call).await? {
            Answer::Unit => Ok(()),
            _ => Err(self.mismatch()),
        }
    }

    fn mismatch(&self) -> PluginError {
        PluginError::Host {
            plugin: self.grants.label.clone(),
            message: "the call and its answer disagree (a host bug)".to_string(),
        }
    }

    /// Runs one call in its span (see [`crate::TRACE_TARGET`]).
    async fn invoke(&self, call: Call) -> Result<Answer, PluginError> {
        let span = tracing::info_span!(
            target: crate::TRACE_TARGET,
            "plugin_call",
            plugin = %self.grants.label,
            call = call.name(),
        );
        self.invoke_in_store(call).instrument(span).await
    }

    /// Runs one call in a fresh store and records it in the plugin's stats.
    async fn invoke_in_store(&self, call: Call) -> Result<Answer, PluginError> {
        let label = &self.grants.label;
        if call.kind() != self.manifest.kind {
            return Err(PluginError::WrongKind {
                name: self.manifest.name.clone(),
                expected: call.kind().to_string(),
                actual: self.manifest.kind.to_string(),
            });
        }
        if matches!(call, Call::LookupPayment(..) | Call::LookupShipment(..))
            && !self.supports_lookup()
        {
            return Err(PluginError::Unsupported {
                plugin: label.clone(),
                call: call.name(),
                contract: self.contract(),
            });
        }
        let limits = self.manifest.limits;
        let timeout = Duration::from_millis(limits.timeout_ms);
        let started = Instant::now();

        // Waiting for a slot counts against the deadline: a caller is never
        // held longer than the plugin's timeout.
        let permit = tokio::time::timeout(timeout, self.engine.permits.acquire()).await;
        let _permit = match permit {
            Ok(Ok(permit)) => permit,
            Ok(Err(_closed)) => {
                return Err(self.record(started, 0, self.host_error("the engine is shut down")));
            }
            Err(_elapsed) => {
                let error = PluginError::DeadlineExceeded {
                    plugin: label.clone(),
                    timeout_ms: limits.timeout_ms,
                };
                return Err(self.record(started, 0, error));
            }
        };

        let mut store = Store::new(
            &self.engine.engine,
            InvocationState::new(self.grants.clone()),
        );
        store.limiter(|state| state);
        if let Err(error) = store.set_fuel(limits.fuel) {
            return Err(self.record(started, 0, self.host_error(&format!("{error:#}"))));
        }
        // Running wasm gives its thread back to the async runtime every
        // YIELD_FUEL instructions (well under a millisecond), so a plugin
        // that spins until its deadline holds a worker for a slice at a
        // time, never for the whole call: the kernel keeps answering while
        // four such calls run on two cores. An epoch tick past the deadline
        // traps; one before it yields too (for wasm that waits rather than
        // computes).
        if let Err(error) = store.fuel_async_yield_interval(Some(YIELD_FUEL)) {
            return Err(self.record(started, 0, self.host_error(&format!("{error:#}"))));
        }
        let deadline = started + timeout;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if Instant::now() >= deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::YieldCustom(
                    1,
                    Box::pin(tokio::task::yield_now()),
                ))
            }
        });

        // The epoch deadline stops wasm that spins; this one also stops a
        // plugin waiting on the network inside a host call.
        let outcome = tokio::time::timeout(timeout, self.run(&mut store, call)).await;
        let fuel_used = limits.fuel.saturating_sub(store.get_fuel().unwrap_or(0));
        let result = match outcome {
            Err(_elapsed) => Err(PluginError::DeadlineExceeded {
                plugin: label.clone(),
                timeout_ms: limits.timeout_ms,
            }),
            Ok(Ok(Ok(answer))) => self.check(answer),
            Ok(Ok(Err(failure))) => Err(PluginError::Failed {
                plugin: label.clone(),
                failure: Failure::from(failure),
            }),
            Ok(Err(error)) => Err(self.classify(&error, store.data().memory_refused)),
        };
        match result {
            Ok(answer) => {
                self.stats.record(started.elapsed(), fuel_used, None);
                Ok(answer)
            }
            Err(error) => Err(self.record(started, fuel_used, error)),
        }
    }

    /// Counts a failed invocation; returns its error for the caller.
    fn record(&self, started: Instant, fuel_used: u64, error: PluginError) -> PluginError {
        self.stats
            .record(started.elapsed(), fuel_used, Some(error.kind()));
        tracing::debug!(plugin = %self.grants.label, kind = %error.kind(), "plugin call failed: {error}");
        error
    }

    fn host_error(&self, message: &str) -> PluginError {
        PluginError::Host {
            plugin: self.grants.label.clone(),
            message: message.to_string(),
        }
    }

    async fn run(
        &self,
        store: &mut Store<InvocationState>,
        call: Call,
    ) -> wasmtime::Result<Result<Answer, WitFailure>> {
        Ok(match &self.prepared {
            Prepared::SagaStep(pre) => {
                let plugin = pre.instantiate_async(&mut *store).await?;
                let step = plugin.commerce_plugin_saga_step();
                match call {
                    Call::Execute(context) => step
                        .call_execute(&mut *store, &context)
                        .await?
                        .map(Answer::Json),
                    Call::Compensate(context, output) => step
                        .call_compensate(&mut *store, &context, &output)
                        .await?
                        .map(|()| Answer::Unit),
                    _ => unreachable_call()?,
                }
            }
            Prepared::SagaStepV0_1(pre) => {
                let plugin = pre.instantiate_async(&mut *store).await?;
                let step = plugin.commerce_plugin_saga_step();
                match call {
                    Call::Execute(context) => step
                        .call_execute(&mut *store, &v0_1::step_context(&context))
                        .await?
                        .map(Answer::Json),
                    Call::Compensate(context, output) => step
                        .call_compensate(&mut *store, &v0_1::step_context(&context), &output)
                        .await?
                        .map(|()| Answer::Unit),
                    _ => unreachable_call()?,
                }
            }
            Prepared::Payment(pre) => {
                let plugin = pre.instantiate_async(&mut *store).await?;
                let provider = plugin.commerce_plugin_payment_provider();
                let payment = match call {
                    Call::Authorize(request) => {
                        provider.call_authorize(&mut *store, &request).await?
                    }
                    Call::Charge(request) => provider.call_charge(&mut *store, &request).await?,
                    Call::Capture(key, reference, amount) => {
                        provider
                            .call_capture(&mut *store, &key, &reference, &amount)
                            .await?
                    }
                    Call::Refund(key, reference, amount) => {
                        provider
                            .call_refund(&mut *store, &key, &reference, &amount)
                            .await?
                    }
                    Call::Cancel(key, reference) => {
                        provider.call_cancel(&mut *store, &key, &reference).await?
                    }
                    Call::LookupPayment(key) => {
                        return Ok(provider
                            .call_lookup(&mut *store, &key)
                            .await?
                            .map(Answer::FoundPayment));
                    }
                    _ => unreachable_call()?,
                };
                payment.map(Answer::Payment)
            }
            Prepared::PaymentV0_1(pre) => {
                let plugin = pre.instantiate_async(&mut *store).await?;
                let provider = plugin.commerce_plugin_payment_provider();
                let payment = match call {
                    Call::Authorize(request) => {
                        provider
                            .call_authorize(&mut *store, &v0_1::payment_request(&request))
                            .await?
                    }
                    Call::Charge(request) => {
                        provider
                            .call_charge(&mut *store, &v0_1::payment_request(&request))
                            .await?
                    }
                    Call::Capture(key, reference, amount) => {
                        provider
                            .call_capture(&mut *store, &key, &reference, &amount)
                            .await?
                    }
                    Call::Refund(key, reference, amount) => {
                        provider
                            .call_refund(&mut *store, &key, &reference, &amount)
                            .await?
                    }
                    Call::Cancel(key, reference) => {
                        provider.call_cancel(&mut *store, &key, &reference).await?
                    }
                    _ => unreachable_call()?,
                };
                payment.map(|payment| Answer::Payment(v0_1::payment(payment)))
            }
            Prepared::Shipping(pre) => {
                let plugin = pre.instantiate_async(&mut *store).await?;
                let provider = plugin.commerce_plugin_shipping_provider();
                match call {
                    Call::Quote(order) => provider
                        .call_quote(&mut *store, &order)
                        .await?
                        .map(Answer::Rates),
                    Call::CreateShipment(key, order, service) => provider
                        .call_create_shipment(&mut *store, &key, &order, &service)
                        .await?
                        .map(Answer::Shipment),
                    Call::CancelShipment(key, reference) => provider
                        .call_cancel_shipment(&mut *store, &key, &reference)
                        .await?
                        .map(|()| Answer::Unit),
                    Call::LookupShipment(key) => provider
                        .call_lookup(&mut *store, &key)
                        .await?
                        .map(Answer::FoundShipment),
                    _ => unreachable_call()?,
                }
            }
            Prepared::ShippingV0_1(pre) => {
                let plugin = pre.instantiate_async(&mut *store).await?;
                let provider = plugin.commerce_plugin_shipping_provider();
                match call {
                    Call::Quote(order) => provider
                        .call_quote(&mut *store, &order)
                        .await?
                        .map(|rates| Answer::Rates(rates.into_iter().map(v0_1::rate).collect())),
                    Call::CreateShipment(key, order, service) => provider
                        .call_create_shipment(&mut *store, &key, &order, &service)
                        .await?
                        .map(|shipment| Answer::Shipment(v0_1::shipment(shipment))),
                    Call::CancelShipment(key, reference) => provider
                        .call_cancel_shipment(&mut *store, &key, &reference)
                        .await?
                        .map(|()| Answer::Unit),
                    _ => unreachable_call()?,
                }
            }
        })
    }

    /// Refuses answers the contract does not allow.
    fn check(&self, answer: Answer) -> Result<Answer, PluginError> {
        let invalid = |message: String| PluginError::InvalidOutput {
            plugin: self.grants.label.clone(),
            message,
        };
        match &answer {
            Answer::Json(output) => {
                if output.len() > MAX_STEP_OUTPUT_BYTES {
                    return Err(invalid(format!(
                        "the step output is {} bytes; at most {MAX_STEP_OUTPUT_BYTES} are kept",
                        output.len()
                    )));
                }
                serde_json::from_str::<serde_json::Value>(output)
                    .map_err(|error| invalid(format!("the step output is not JSON: {error}")))?;
                // JSON may escape a NUL, which the event store cannot keep.
                if output.contains("\\u0000") {
                    return Err(invalid("the step output holds a NUL character".to_string()));
                }
            }
            Answer::Payment(payment) | Answer::FoundPayment(Some(payment)) => {
                check_reference(&payment.reference).map_err(invalid)?;
                check_amount(&payment.amount).map_err(invalid)?;
            }
            Answer::Rates(rates) => {
                for rate in rates {
                    check_amount(&rate.price).map_err(invalid)?;
                    check_present("a rate's service", &rate.service, MAX_LABEL_CHARS)
                        .map_err(invalid)?;
                }
            }
            Answer::Shipment(shipment) | Answer::FoundShipment(Some(shipment)) => {
                check_reference(&shipment.reference).map_err(invalid)?;
                // Optional, and often empty while a label is pending.
                if let Some(tracking) = &shipment.tracking_number {
                    check_storable("the tracking number", tracking, MAX_LABEL_CHARS)
                        .map_err(invalid)?;
                }
                if let Some(url) = &shipment.label_url {
                    check_storable("the label URL", url, MAX_URL_CHARS).map_err(invalid)?;
                }
            }
            Answer::Unit | Answer::FoundPayment(None) | Answer::FoundShipment(None) => {}
        }
        Ok(answer)
    }

    /// Names what stopped the plugin. Wasmtime reports fuel and epoch
    /// deadlines as traps of their own; a refused memory growth shows up as
    /// whatever the guest did next (usually a trap), so the flag decides.
    fn classify(&self, error: &wasmtime::Error, memory_refused: bool) -> PluginError {
        let plugin = self.grants.label.clone();
        let limits = self.manifest.limits;
        match error.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => PluginError::FuelExhausted {
                plugin,
                fuel: limits.fuel,
            },
            Some(Trap::Interrupt) => PluginError::DeadlineExceeded {
                plugin,
                timeout_ms: limits.timeout_ms,
            },
            _ if memory_refused => PluginError::MemoryExceeded {
                plugin,
                memory_bytes: limits.memory_bytes,
            },
            Some(trap) => PluginError::Trapped {
                plugin,
                message: trap.to_string(),
            },
            None => PluginError::Host {
                plugin,
                message: format!("{error:#}"),
            },
        }
    }
}

fn unreachable_call<T>() -> wasmtime::Result<T> {
    // `invoke` checks the call's kind against the plugin's before running it.
    Err(wasmtime::format_err!(
        "a call of another plugin kind reached this plugin"
    ))
}

/// A provider's identifier of a payment or shipment. It is kept exactly (a
/// refund names it), so it is never cleaned: refused only when it cannot be
/// stored (empty, overlong, a NUL).
fn check_reference(reference: &str) -> Result<(), String> {
    check_present("the reference", reference, MAX_REFERENCE_CHARS)
}

/// Non-empty and storable.
fn check_present(what: &str, text: &str, max: usize) -> Result<(), String> {
    if text.trim().is_empty() {
        return Err(format!("{what} is empty"));
    }
    check_storable(what, text, max)
}

/// At most `max` characters and no NUL, which the event store cannot keep.
/// Other odd characters are the reader's to clean where it shows them.
fn check_storable(what: &str, text: &str, max: usize) -> Result<(), String> {
    if text.chars().count() > max || text.contains('\0') {
        return Err(format!(
            "{what} {} is longer than {max} characters or holds a NUL",
            preview(text)
        ));
    }
    Ok(())
}

/// The start of a provider's text, quoted, for an error message.
fn preview(text: &str) -> String {
    let mut shown: String = text.chars().take(40).collect();
    if shown.len() < text.len() {
        shown.push('…');
    }
    format!("{shown:?}")
}

fn check_amount(money: &Money) -> Result<(), String> {
    let (whole, fraction) = money.amount.split_once('.').unwrap_or((&money.amount, ""));
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    let valid_amount = !whole.is_empty()
        && whole.len() <= 20
        && digits(whole)
        && fraction.len() <= 8
        && digits(fraction)
        && (fraction.is_empty() != money.amount.contains('.'));
    let valid_currency =
        money.currency.len() == 3 && money.currency.bytes().all(|b| b.is_ascii_uppercase());
    if !valid_amount || !valid_currency {
        return Err(format!(
            "{} {} is not a decimal amount with an ISO 4217 currency",
            preview(&money.amount),
            preview(&money.currency)
        ));
    }
    Ok(())
}
