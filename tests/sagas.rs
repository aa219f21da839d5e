//! The order-fulfilment saga, run in process against the real plugin
//! components and fake payment and shipping providers: the happy path and
//! every edge case of the design documents, on SQLite and (with
//! `COMMERCE_TEST_DATABASE_URL`) Postgres. Crashes and several processes are
//! in `saga_crash.rs`.

#[macro_use]
mod support;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use chrono::Utc;
use commerce_kernel::commerce::{
    CommandContext, CommandError, Commerce, NewProduct, OrderTransition, PlaceOrderInput, Sagas,
};
use commerce_kernel::domain::DomainError;
use commerce_kernel::domain::inventory::Inventory;
use commerce_kernel::domain::money::{Currency, Money};
use commerce_kernel::domain::order::{Address, Order, OrderStatus};
use commerce_kernel::domain::saga::{
    MAX_ERROR_MESSAGE_CHARS, MAX_REASON_CHARS, ORDER_FULFILMENT, ParkCause, Saga, SagaDefinition,
    SagaEvent, SagaStatus, StepAction, StepDefinition, StepRetry, StepStatus,
};
use commerce_kernel::event_store::repository::encode;
use commerce_kernel::event_store::repository::{AggregateRepository, Loaded};
use commerce_kernel::event_store::{
    AppendOutcome, AppendRequest, EventMetadata, NewEvent, StoreError, StreamAppend,
};
use commerce_kernel::sagas::hooks::FaultHooks;
use commerce_kernel::sagas::runner::{RunnerMetrics, RunnerSettings, SagaRunner};
use commerce_kernel::sagas::{
    Claim, Committed, InstanceUpdate, LeaseChange, SagaCursor, SagaFilter, SagaInstance, SagaStore,
};
use commerce_kernel::storage::Database;
use commerce_plugin_artifacts as artifacts;
use commerce_plugin_host::{EngineConfig, PluginRegistry, sha256_hex};
use support::counting::CountingEvents;
use support::fakes::{FakePayments, FakeShipping, HOSTILE_DECLINES};
use support::{BackendKind, TestDatabase, run_suite_except};
use uuid::Uuid;

fn main() {
    run_suite_except(
        &cases![
            an_order_is_confirmed_through_the_plugins,
            a_declined_payment_releases_the_stock_and_fails_the_order,
            an_order_out_of_stock_fails_before_any_payment,
            two_buyers_for_the_last_item_one_confirmed_one_failed,
            a_failed_shipment_refunds_the_payment_and_releases_the_stock,
            a_slow_payment_is_retried_with_the_same_key_and_charged_once,
            cancelling_runs_the_compensations_that_apply,
            a_plugin_step_inserted_by_an_admin_applies_to_new_sagas_only,
            a_compensation_that_keeps_failing_parks_the_saga_until_retried,
            a_saga_past_its_deadline_is_compensated,
            a_paused_former_owner_cannot_write_after_losing_its_lease,
            steps_recorded_at_once_each_keep_their_own_outcome,
            a_drive_reads_the_saga_and_order_streams_once_not_before_every_step,
            an_order_moved_under_a_drive_is_read_again_before_the_drive_writes_it,
            a_cancel_after_the_next_step_was_decided_stops_it_before_its_call,
            hostile_provider_text_still_ends_the_saga,
            a_payment_only_authorized_is_captured_before_the_order_is_confirmed,
            an_unrecorded_charge_is_looked_up_and_refunded_never_forgotten,
            an_unrecorded_shipment_is_looked_up_and_cancelled,
            a_call_that_never_happened_is_neither_charged_nor_refunded,
            a_plugin_of_contract_0_1_is_probed_by_repeating_the_call,
            a_step_whose_plugin_is_not_here_waits_for_a_process_that_has_it,
            failed_writes_and_releases_do_not_strand_a_saga,
            a_drive_task_that_panics_is_taken_over,
            a_call_that_succeeded_is_recorded_when_the_store_falters,
            a_former_owner_paused_past_its_lease_makes_no_provider_call,
            cancelling_as_the_saga_starts_ends_one_consistent_way,
            a_spinning_pure_step_is_compensated_without_running_it_again,
            a_heartbeat_does_not_wait_for_a_row_a_write_holds,
            one_process_reserves_and_confirms_a_popular_product_without_conflicts,
        ],
        &["a_heartbeat_does_not_wait_for_a_row_a_write_holds"],
    );
}

/// `payment-http` as built against `commerce:plugin@0.1.0`, before
/// `lookup` (see tests/fixtures/README.md).
const LEGACY_PAYMENT_HTTP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/payment-http-0.1.0.wasm"
);

/// Longest a saga may take to settle in these tests.
const SETTLE: Duration = Duration::from_secs(30);

fn context() -> CommandContext {
    CommandContext {
        actor: Some("test".into()),
        correlation_id: None,
    }
}

/// Compiled components shared by every test of this binary.
fn cache_dir() -> std::path::PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temporary directory"))
        .path()
        .to_path_buf()
}

fn manifest(name: &str, version: &str, kind: &str, bytes: &[u8], extra: &str) -> String {
    format!(
        "name = \"{name}\"\nversion = \"{version}\"\nkind = \"{kind}\"\n\
         component = \"{name}.wasm\"\nsha256 = \"{}\"\n{extra}\n",
        sha256_hex(bytes)
    )
}

fn install(
    registry: &PluginRegistry,
    name: &str,
    version: &str,
    kind: &str,
    path: &str,
    extra: &str,
) -> anyhow::Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("component {path}"))?;
    registry.install(&manifest(name, version, kind, &bytes, extra), &bytes)?;
    registry.activate(name, version)?;
    Ok(())
}

fn quick(max_attempts: u32, timeout_ms: u64) -> StepRetry {
    StepRetry {
        max_attempts,
        initial_backoff_ms: 20,
        max_backoff_ms: 100,
        timeout_ms,
    }
}

fn step(name: &str, action: StepAction, retry: StepRetry) -> StepDefinition {
    StepDefinition {
        name: name.into(),
        action,
        retry,
    }
}

/// The default steps with test-sized retries; `extra` goes before payment.
fn definition(extra: Option<StepDefinition>) -> SagaDefinition {
    let mut steps = vec![step(
        "reserve-inventory",
        StepAction::ReserveInventory,
        quick(3, 5_000),
    )];
    steps.extend(extra);
    steps.extend([
        step(
            "payment",
            StepAction::Payment {
                plugin: "payment".into(),
            },
            quick(4, 500),
        ),
        step(
            "shipment",
            StepAction::Shipment {
                plugin: "shipping".into(),
                service: "standard".into(),
            },
            quick(3, 2_000),
        ),
        step("confirm", StepAction::Confirm, quick(3, 5_000)),
    ]);
    SagaDefinition {
        steps,
        timeout_ms: 60_000,
        compensation_retry: quick(3, 5_000),
    }
}

/// A kernel's saga machinery in this process, with both plugins active.
struct Shop {
    commerce: Commerce,
    sagas: Sagas,
    registry: Arc<PluginRegistry>,
    payments: FakePayments,
    shipping: FakeShipping,
    _plugins: tempfile::TempDir,
    runner: Option<Runner>,
}

/// A saga runner task, as one kernel process runs it.
struct Runner {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    metrics: Arc<RunnerMetrics>,
}

impl Runner {
    /// Starts a runner on `sagas` with its own node id.
    fn start(
        sagas: &Sagas,
        registry: &Arc<PluginRegistry>,
        lease: Duration,
        hooks: FaultHooks,
    ) -> Runner {
        let runner = Arc::new(SagaRunner::new(
            sagas.clone(),
            Arc::clone(registry),
            RunnerSettings {
                node_id: format!("test-{}", Uuid::now_v7()),
                lease,
                poll_interval: Duration::from_millis(20),
                max_concurrent: 16,
                hooks,
                shutdown_grace: Duration::from_millis(100),
            },
        ));
        let metrics = runner.metrics();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(runner.run(stopped));
        Runner {
            stop,
            task,
            metrics,
        }
    }

    /// Stops it as a process would die: its drive tasks end where they
    /// are, nothing more is written for them.
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// A registry of its own (another process's plugin directory): with the
/// payment plugin `payment_component` and the shipping plugin installed and
/// active against the fake providers, or with nothing at all.
fn registry(
    payments: &FakePayments,
    shipping: &FakeShipping,
    payment_component: Option<&str>,
) -> anyhow::Result<(Arc<PluginRegistry>, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let registry = Arc::new(PluginRegistry::open(
        dir.path(),
        EngineConfig {
            max_concurrent_invocations: 32,
            cache_dir: Some(cache_dir()),
            outbound_headers: None,
        },
    )?);
    if let Some(component) = payment_component {
        install_providers(&registry, payments, shipping, component)?;
    }
    Ok((registry, dir))
}

/// Installs and activates `payment` (from `payment_component`) and
/// `shipping` against the fake providers.
fn install_providers(
    registry: &PluginRegistry,
    payments: &FakePayments,
    shipping: &FakeShipping,
    payment_component: &str,
) -> anyhow::Result<()> {
    let grant = |url: String, address: std::net::SocketAddr| {
        format!("allowed_hosts = [\"{address}\"]\n[config]\nbase_url = \"{url}\"")
    };
    install(
        registry,
        "payment",
        "1.0.0",
        "payment",
        payment_component,
        &grant(payments.base_url(), payments.address),
    )?;
    install(
        registry,
        "shipping",
        "1.0.0",
        "shipping",
        artifacts::SHIPPING_HTTP,
        &grant(shipping.base_url(), shipping.address),
    )
}

/// The lease of the tests' runners.
const LEASE: Duration = Duration::from_secs(5);

async fn shop(db: &TestDatabase) -> anyhow::Result<Shop> {
    let mut shop = shop_without_runner(db, db.database.saga_store()).await?;
    shop.runner = Some(Runner::start(
        &shop.sagas,
        &shop.registry,
        LEASE,
        FaultHooks::default(),
    ));
    Ok(shop)
}

/// The shop on `saga_store` (the database's, or a wrapper of it), with no
/// runner yet.
async fn shop_without_runner(
    db: &TestDatabase,
    saga_store: Arc<dyn SagaStore>,
) -> anyhow::Result<Shop> {
    let payments = FakePayments::start().await;
    let shipping = FakeShipping::start().await;
    let (registry, plugins) = registry(&payments, &shipping, Some(artifacts::PAYMENT_HTTP))?;
    let commerce = Commerce::new(db.event_store(), db.database.view_store());
    let sagas = Sagas::new(commerce.clone(), saga_store);
    sagas
        .define(ORDER_FULFILMENT, definition(None), &context())
        .await?;
    Ok(Shop {
        commerce,
        sagas,
        registry,
        payments,
        shipping,
        _plugins: plugins,
        runner: None,
    })
}

fn eur(amount: &str) -> anyhow::Result<Money> {
    Ok(Money::new(amount.parse()?, Currency::parse("EUR")?)?)
}

fn address(country: &str) -> Address {
    Address {
        name: "Grace Hopper".into(),
        line1: "1 Navy Way".into(),
        line2: None,
        city: "Arlington".into(),
        postal_code: "22202".into(),
        region: None,
        country: country.into(),
    }
}

impl Shop {
    async fn product(&self, price: &str, stock: i64) -> anyhow::Result<Uuid> {
        let created = self
            .commerce
            .create_product(
                NewProduct {
                    sku: format!("SKU-{}", Uuid::now_v7().simple()),
                    name: "Teapot".into(),
                    price: eur(price)?,
                    active: true,
                },
                &context(),
            )
            .await?;
        if stock > 0 {
            self.commerce
                .adjust_inventory(created.id, stock, "initial stock", None, &context())
                .await?;
        }
        Ok(created.id)
    }

    /// Places an order and starts its saga, as `placeOrder` does.
    async fn order(
        &self,
        lines: Vec<(Uuid, u32)>,
        payment_method: &str,
        country: &str,
    ) -> anyhow::Result<Uuid> {
        let order = self
            .commerce
            .place_order(
                PlaceOrderInput {
                    customer_id: Uuid::now_v7(),
                    lines,
                    shipping_address: address(country),
                    payment_method: payment_method.into(),
                    idempotency_key: None,
                    email: None,
                },
                &context(),
            )
            .await?;
        self.sagas.start_for_order(order.id, &context()).await?;
        Ok(order.id)
    }

    async fn saga(&self, order_id: Uuid) -> anyhow::Result<Loaded<Saga>> {
        self.sagas
            .for_order(order_id)
            .await?
            .context("the order has a saga")
    }

    /// Waits until the order's saga ends or is parked.
    async fn settled(&self, order_id: Uuid) -> anyhow::Result<Loaded<Saga>> {
        self.settled_within(order_id, SETTLE).await
    }

    async fn settled_within(
        &self,
        order_id: Uuid,
        limit: Duration,
    ) -> anyhow::Result<Loaded<Saga>> {
        self.wait_within(limit, order_id, |saga| {
            saga.status
                .is_some_and(|s| s.is_final() || s == SagaStatus::Parked)
        })
        .await
    }

    async fn wait_for(
        &self,
        order_id: Uuid,
        done: impl Fn(&Saga) -> bool,
    ) -> anyhow::Result<Loaded<Saga>> {
        self.wait_within(SETTLE, order_id, done).await
    }

    async fn wait_within(
        &self,
        limit: Duration,
        order_id: Uuid,
        done: impl Fn(&Saga) -> bool,
    ) -> anyhow::Result<Loaded<Saga>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let saga = self.saga(order_id).await?;
            if done(&saga.state) {
                return Ok(saga);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("saga did not get there in time: {saga:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn order_state(&self, order_id: Uuid) -> anyhow::Result<Order> {
        Ok(self.commerce.load_order(order_id).await?.state)
    }

    /// Checks the product's stock: `on_hand` units and nothing held.
    async fn expect_stock(&self, product: Uuid, on_hand: u32) -> anyhow::Result<()> {
        let stock = AggregateRepository::<Inventory>::new(Arc::clone(self.commerce.store()))
            .load(Inventory::stream_id(product))
            .await?
            .state;
        ensure!(
            stock.on_hand == on_hand && stock.reserved == 0,
            "expected {on_hand} on hand and none reserved: {stock:?}"
        );
        Ok(())
    }

    /// The fake provider's payments for the order, as (status, refunded).
    fn payments(&self, order_id: Uuid) -> Vec<(String, bool)> {
        self.payments
            .payments_for(&order_id.to_string())
            .into_iter()
            .map(|p| (p.status, p.refunded))
            .collect()
    }
}

fn step_status(saga: &Saga, name: &str) -> Option<StepStatus> {
    saga.step(name).map(|s| s.status)
}

async fn an_order_is_confirmed_through_the_plugins(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let shop = shop(&db).await?;
    let product = shop.product("12.50", 5).await?;
    let order_id = shop.order(vec![(product, 2)], "tok_visa", "DE").await?;

    let saga = shop.settled(order_id).await?;
    ensure!(
        saga.state.status == Some(SagaStatus::Completed),
        "{saga:#?}"
    );
    for step in &saga.state.steps {
        ensure!(
            step.status == StepStatus::Succeeded && step.attempts == 1,
            "{step:?}"
        );
    }
    let payment = saga.state.step("payment").and_then(|s| s.output.clone());
    let amount = payment.as_ref().and_then(|p| p["amount"].as_str());
    ensure!(
        amount.and_then(|a| a.parse::<rust_decimal::Decimal>().ok()) == Some(25.into())
            && payment.as_ref().map(|p| p["status"].clone()) == Some(serde_json::json!("captured")),
        "{payment:?}"
    );
    let order = shop.order_state(order_id).await?;
    ensure!(order.status == Some(OrderStatus::Confirmed), "{order:?}");
    ensure!(order.payment_reference.is_some() && order.shipment_reference.is_some());
    ensure!(
        shop.payments(order_id) == [("captured".to_string(), false)],
        "one charge: {:?}",
        shop.payments(order_id)
    );
    ensure!(shop.shipping.shipments().len() == 1);
    shop.expect_stock(product, 3).await?;
    // The saga row is an index of the record.
    let row = shop
        .sagas
        .store()
        .get(Saga::id_for(ORDER_FULFILMENT, order_id))
        .await?
        .context("row")?;
    ensure!(
        row.status == SagaStatus::Completed && row.next_run_at.is_none(),
        "{row:?}"
    );
    ensure!(row.version == saga.version, "{row:?} vs {}", saga.version);
    Ok(())
}

async fn a_declined_payment_releases_the_stock_and_fails_the_order(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let shop = shop(&db).await?;
    let product = shop.product("5", 3).await?;
    let order_id = shop.order(vec![(product, 2)], "tok_decline", "DE").await?;

    let saga = shop.settled(order_id).await?;
    ensure!(
        saga.state.status == Some(SagaStatus::Compensated),
        "{saga:#?}"
    );
    let payment = saga.state.step("payment").context("payment step")?;
    ensure!(
        payment.status == StepStatus::Failed && payment.attempts == 1,
        "a decline is not retried: {payment:?}"
    );
    ensure!(step_status(&saga.state, "shipment") == Some(StepStatus::Pending));
    let order = shop.order_state(order_id).await?;
    ensure!(order.status == Some(OrderStatus::Failed), "{order:?}");
    let reason = order.reason.unwrap_or_default();
    ensure!(
        reason == "payment declined",
        "the customer's reason: {reason}"
    );
    let detail = saga
        .state
        .compensation
        .map(|c| c.reason)
        .unwrap_or_default();
    ensure!(
        detail.contains("payment") && detail.contains("card_declined"),
        "the saga's reason names the step and the code: {detail}"
    );
    shop.expect_stock(product, 3).await?;
    ensure!(shop.shipping.shipments().is_empty());
    ensure!(
        shop.payments(order_id)
            .iter()
            .all(|(status, _)| status != "captured"),
        "{:?}",
        shop.payments(order_id)
    );
    Ok(())
}

async fn an_order_out_of_stock_fails_before_any_payment(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let shop = shop(&db).await?;
    let product = shop.product("5", 1).await?;
    let order_id = shop.order(vec![(product, 2)], "tok_visa", "DE").await?;

    let saga = shop.settled(order_id).await?;
    ensure!(
        saga.state.status == Some(SagaStatus::Compensated),
        "{saga:#?}"
    );
    let order = shop.order_state(order_id).await?;
    ensure!(order.status == Some(OrderStatus::Failed), "{order:?}");
    ensure!(order.reason.as_deref() == Some("out of stock"), "{order:?}");
    ensure!(
        saga.state
            .compensation
            .as_ref()
            .is_some_and(|c| c.reason.contains("insufficient_stock")),
        "{saga:#?}"
    );
    ensure!(
        shop.payments.requests() == 0,
        "the payment provider was never called"
    );
    ensure!(step_status(&saga.state, "payment") == Some(StepStatus::Pending));
    shop.expect_stock(product, 1).await?;
    Ok(())
}

async fn two_buyers_for_the_last_item_one_confirmed_one_failed(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let shop = shop(&db).await?;
    let product = shop.product("99", 1).await?;
    let (first, second) = tokio::join!(
        shop.order(vec![(product, 1)], "tok_visa", "DE"),
        shop.order(vec![(product, 1)], "tok_visa", "DE"),
    );
    let orders = [first?, second?];
    let mut statuses = Vec::new();
    for order_id in orders {
        shop.settled(order_id).await?;
        statuses.push(shop.order_state(order_id).await?.status);
    }
    statuses.sort_by_key(|s| s.map(OrderStatus::as_str));
    ensure!(
        statuses == [Some(OrderStatus::Confirmed), Some(OrderStatus::Failed)],
        "{statuses:?}"
    );
    shop.expect_stock(product, 0).await?;
    let charged: usize = orders.iter().map(|o| shop.payments(*o).len()).sum();
    ensure!(charged == 1, "only the winner paid: {charged}");
    Ok(())
}

async fn a_failed_shipment_refunds_the_payment_and_releases_the_stock(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let shop = shop(&db).await?;
    let product = shop.product("20", 2).await?;
    // The fake carrier refuses country XX (a permanent failure).
    let order_id = shop.order(vec![(product, 1)], "tok_visa", "XX").await?;

    let saga = shop.settled(order_id).await?;
    ensure!(
        saga.state.status == Some(SagaStatus::Compensated),
        "{saga:#?}"
    );
    ensure!(step_status(&saga.state, "payment") == Some(StepStatus::Compensated));
    ensure!(step_status(&saga.state, "shipment") == Some(StepStatus::Failed));
    ensure!(
        shop.payments(order_id) == [("refunded".to_string(), true)],
        "charged once, refunded once: {:?}",
        shop.payments(order_id)
    );
    let order = shop.order_state(order_id).await?;
    ensure!(order.status == Some(OrderStatus::Failed), "{order:?}");
    shop.expect_stock(product, 2).await?;
    Ok(())
}

async fn a_slow_payment_is_retried_with_the_same_key_and_charged_once(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let shop = shop(&db).await?;
    let product = shop.product("7", 1).await?;
    // The provider records the charge, then holds its answer for 3 s; the
    // step gives up after 500 ms and retries with the same key.
    let order_id = shop.order(vec![(product, 1)], "tok_slow", "DE").await?;

    let saga = shop.settled(order_id).await?;
    ensure!(
        saga.state.status == Some(SagaStatus::Completed),
        "{saga:#?}"
    );
    let payment = saga.state.step("payment").context("payment step")?;
    ensure!(payment.attempts >= 2, "retried: {payment:?}");
    ensure!(
        shop.payments(order_id) == [("captured".to_string(), false)],
        "one charge: {:?}",
        shop.payments(order_id)
    );
    ensure!(shop.order_state(order_id).await?.status == Some(OrderStatus::Confirmed));
    Ok(())
}

async fn cancelling_runs_the_compensations_that_apply(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let shop = shop(&db).await?;
    let product = shop.product("15", 4).await?;

    // Cancelled while the (slow) payment call is in flight: the call's
    // outcome is still found out and refunded, then the order is cancelled.
    let in_flight = shop.order(vec![(product, 1)], "tok_slow", "DE").await?;
    shop.wait_for(in_flight, |saga| {
        saga.step("payment").is_some_and(|s| s.attempts >= 1)
    })
    .await?;
    shop.sagas
        .cancel_order(in_flight, "customer changed their mind", &context())
        .await?;
    let saga = shop.settled(in_flight).await?;
    ensure!(
        saga.state.status == Some(SagaStatus::Compensated),
        "{saga:#?}"
    );
    let order = shop.order_state(in_flight).await?;
    ensure!(
        order.status == Some(OrderStatus::Cancelled)
            && order.reason.as_deref() == Some("customer changed their mind"),
        "{order:?}"
    );
    let payments = shop.payments(in_flight);
    ensure!(
        payments.len() == 1 && payments.iter().all(|(_, refunded)| *refunded),
        "any charge is refunded: {payments:?}"
    );
    ensure!(step_status(&saga.state, "shipment") == Some(StepStatus::Pending));

    // A confirmed order cannot be cancelled; nothing is written.
    let confirmed = shop.order(vec![(product, 1)], "tok_visa", "DE").await?;
    shop.settled(confirmed).await?;
    let before = shop.saga(confirmed).await?.version;
    match shop
        .sagas
        .cancel_order(confirmed, "too late", &context())
        .await
    {
        Err(CommandError::Domain(DomainError::IllegalTransition { from, to })) => ensure!(
            from == OrderStatus::Confirmed && to == OrderStatus::Cancelled,
            "{from} -> {to}"
        ),
        other => bail!("a confirmed order was cancelled: {other:?}"),
    }
    ensure!(shop.saga(confirmed).await?.version == before);
    shop.expect_stock(product, 3).await?;
    Ok(())
}

async fn a_plugin_step_inserted_by_an_admin_applies_to_new_sagas_only(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let shop = shop(&db).await?;
    install(
        &shop.registry,
        "order-limit",
        "1.0.0",
        "saga-step",
        artifacts::ORDER_LIMIT,
        "",
    )?;
    let product = shop.product("1", 500).await?;
    // Started under the old definition (slow payment, so it is still
    // running when the definition changes).
    let old = shop.order(vec![(product, 101)], "tok_slow", "DE").await?;

    let limit = step(
        "order-limit",
        StepAction::Custom {
            plugin: "order-limit".into(),
        },
        quick(2, 1_000),
    );
    shop.sagas
        .define(ORDER_FULFILMENT, definition(Some(limit)), &context())
        .await?;
    let big = shop.order(vec![(product, 101)], "tok_visa", "DE").await?;
    let small = shop.order(vec![(product, 3)], "tok_visa", "DE").await?;

    let old_saga = shop.settled(old).await?;
    ensure!(
        old_saga.state.steps.len() == 4 && old_saga.state.status == Some(SagaStatus::Completed),
        "a running saga keeps its definition: {old_saga:#?}"
    );
    let big_saga = shop.settled(big).await?;
    ensure!(
        big_saga.state.status == Some(SagaStatus::Compensated),
        "{big_saga:#?}"
    );
    let refused = big_saga.state.step("order-limit").context("the new step")?;
    ensure!(
        refused.error.as_ref().map(|e| e.code.as_str()) == Some("order_limit_exceeded"),
        "{refused:?}"
    );
    ensure!(shop.payments(big).is_empty(), "refused before payment");
    let small_saga = shop.settled(small).await?;
    ensure!(
        small_saga.state.steps.len() == 5 && small_saga.state.status == Some(SagaStatus::Completed),
        "{small_saga:#?}"
    );
    let output = small_saga
        .state
        .step("order-limit")
        .and_then(|s| s.output.clone());
    ensure!(
        output.as_ref().map(|o| o["items"].clone()) == Some(serde_json::json!(3)),
        "{output:?}"
    );
    Ok(())
}

async fn a_compensation_that_keeps_failing_parks_the_saga_until_retried(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let shop = shop(&db).await?;
    // A step after payment whose compensation always fails transiently.
    install(
        &shop.registry,
        "flaky",
        "1.0.0",
        "saga-step",
        artifacts::MISBEHAVING,
        "",
    )?;
    let mut steps = definition(None);
    steps.steps.insert(
        2,
        step(
            "fail-compensate",
            StepAction::Custom {
                plugin: "flaky".into(),
            },
            quick(2, 1_000),
        ),
    );
    shop.sagas
        .define(ORDER_FULFILMENT, steps, &context())
        .await?;
    let product = shop.product("8", 2).await?;
    // The carrier refuses country XX: compensation undoes the custom step,
    // which keeps failing, so the refund behind it waits.
    let order_id = shop.order(vec![(product, 1)], "tok_visa", "XX").await?;

    let parked = shop.settled(order_id).await?;
    ensure!(
        parked.state.status == Some(SagaStatus::Parked)
            && parked.state.park_cause == Some(ParkCause::CompensationFailed),
        "{parked:#?}"
    );
    ensure!(
        parked.state.current_step().map(|s| s.name()) == Some("fail-compensate"),
        "{parked:#?}"
    );
    ensure!(
        shop.payments(order_id) == [("captured".to_string(), false)],
        "the refund waits behind the parked step"
    );
    let counts = shop.sagas.store().count_by_status().await?;
    ensure!(counts.contains(&(SagaStatus::Parked, 1)), "{counts:?}");
    let metrics = &shop.runner.as_ref().context("runner")?.metrics;
    ensure!(
        metrics
            .parked()
            .contains(&(ParkCause::CompensationFailed, 1)),
        "{metrics:?}"
    );

    // The operator fixes the plugin and retries: compensation goes on.
    install(
        &shop.registry,
        "flaky",
        "2.0.0",
        "saga-step",
        artifacts::ORDER_LIMIT,
        "",
    )?;
    // In bulk, as the runbook does: every saga parked for this cause.
    let saga_id = Saga::id_for(ORDER_FULFILMENT, order_id);
    let retried = shop
        .sagas
        .retry_parked(Some(ParkCause::CompensationFailed), 100, &context())
        .await?;
    ensure!(
        retried.len() == 1 && retried[0].0 == saga_id && retried[0].1.is_ok(),
        "{retried:?}"
    );
    let saga = shop
        .wait_for(order_id, |saga| {
            saga.status == Some(SagaStatus::Compensated)
        })
        .await?;
    ensure!(step_status(&saga.state, "payment") == Some(StepStatus::Compensated));
    ensure!(
        shop.payments(order_id) == [("refunded".to_string(), true)],
        "{:?}",
        shop.payments(order_id)
    );
    ensure!(shop.order_state(order_id).await?.status == Some(OrderStatus::Failed));
    shop.expect_stock(product, 2).await?;
    // The retry is on record with its actor.
    let events = shop
        .commerce
        .store()
        .read_stream(saga_id, Default::default())
        .await?;
    ensure!(
        events.iter().any(
            |e| e.event_type == "RetryRequested" && e.metadata.actor.as_deref() == Some("test")
        ),
        "retry recorded with its actor"
    );
    Ok(())
}

async fn a_saga_past_its_deadline_is_compensated(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let shop = shop(&db).await?;
    let mut short = definition(None);
    short.timeout_ms = 1_000;
    // Payment keeps failing transiently (HTTP 500) with attempts to spare.
    short.steps[1].retry = quick(100, 500);
    shop.sagas
        .define(ORDER_FULFILMENT, short, &context())
        .await?;
    shop.payments.fail_next(u32::MAX);
    let product = shop.product("3", 2).await?;
    let order_id = shop.order(vec![(product, 1)], "tok_visa", "DE").await?;

    // The deadline begins compensation. Whether the provider charged is
    // unknown, and asking it fails too (it answers 500 to everything):
    // parked, since nothing may be concluded without knowing.
    let parked = shop.settled(order_id).await?;
    ensure!(
        parked.state.status == Some(SagaStatus::Parked)
            && parked.state.park_cause == Some(ParkCause::OutcomeUnknown),
        "{parked:#?}"
    );
    let cause = parked.state.compensation.clone().context("compensating")?;
    ensure!(
        cause.reason.contains("deadline") && !cause.cancel,
        "{cause:?}"
    );
    let attempts = parked.state.step("payment").map_or(0, |s| s.attempts);
    ensure!(
        attempts < 100,
        "no forward attempt after the deadline: {attempts}"
    );

    // The provider recovers; the retried compensation asks it, learns that
    // no charge was ever made, and refunds nothing.
    shop.payments.fail_next(0);
    shop.sagas
        .retry(Saga::id_for(ORDER_FULFILMENT, order_id), &context())
        .await?;
    let saga = shop
        .wait_for(order_id, |saga| {
            saga.status == Some(SagaStatus::Compensated)
        })
        .await?;
    ensure!(step_status(&saga.state, "payment") == Some(StepStatus::Compensated));
    ensure!(
        shop.payments(order_id).is_empty(),
        "no charge, no refund: {:?}",
        shop.payments(order_id)
    );
    ensure!(shop.order_state(order_id).await?.status == Some(OrderStatus::Failed));
    shop.expect_stock(product, 2).await?;
    Ok(())
}

async fn a_paused_former_owner_cannot_write_after_losing_its_lease(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    // No runner here: the test plays two runners against the store.
    let commerce = Commerce::new(db.event_store(), db.database.view_store());
    let sagas = Sagas::new(commerce.clone(), db.database.saga_store());
    let store = Arc::clone(sagas.store());
    let product = commerce
        .create_product(
            NewProduct {
                sku: format!("SKU-{}", Uuid::now_v7().simple()),
                name: "Kettle".into(),
                price: eur("30")?,
                active: true,
            },
            &context(),
        )
        .await?;
    let order = commerce
        .place_order(
            PlaceOrderInput {
                customer_id: Uuid::now_v7(),
                lines: vec![(product.id, 1)],
                shipping_address: address("DE"),
                payment_method: "card".into(),
                idempotency_key: None,
                email: None,
            },
            &context(),
        )
        .await?;
    let saga_id = sagas.start_for_order(order.id, &context()).await?;
    ensure!(
        sagas.start_for_order(order.id, &context()).await? == saga_id,
        "one saga per order"
    );

    let lease = Duration::from_millis(300);
    let first = store.claim("runner-a", lease, 10, &[]).await?;
    ensure!(first.len() == 1 && first[0].saga_id == saga_id, "{first:?}");
    let again = store.claim("runner-b", lease, 10, &[]).await?;
    ensure!(again.is_empty(), "a held lease is not claimed twice");

    // Runner A pauses past its lease (by the database's clock); runner B
    // takes the saga over.
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    ensure!(
        !store.hold(first[0], Duration::from_secs(5)).await?,
        "a lapsed lease is not held again"
    );
    let taken = store
        .claim("runner-b", Duration::from_secs(10), 10, &[])
        .await?;
    ensure!(
        taken.len() == 1 && taken[0].fencing_token > first[0].fencing_token,
        "{taken:?}"
    );
    ensure!(
        store.hold(taken[0], Duration::from_secs(30)).await?,
        "the owner's lease holds"
    );
    let row = store.get(saga_id).await?.context("row")?;
    let lease_left = row.lease_expires_at.context("leased")? - Utc::now();
    ensure!(
        lease_left > chrono::Duration::seconds(25),
        "held for the call: {lease_left}"
    );

    let loaded = sagas.load(saga_id).await?;
    let event = SagaEvent::StepStarted {
        step: "reserve-inventory".into(),
        phase: commerce_kernel::domain::saga::Phase::Forward,
        attempt: 1,
        at: Utc::now(),
        plugin_version: None,
        reaches_outside: false,
    };
    let write_at = |claim_token, expected_version: u32| {
        let request = AppendRequest {
            streams: vec![StreamAppend {
                aggregate_id: saga_id,
                aggregate_type: "saga".into(),
                expected_version,
                events: vec![encode(&event).expect("encodes")],
            }],
            metadata: Default::default(),
            idempotency_key: None,
        };
        let update = InstanceUpdate {
            saga_id,
            status: SagaStatus::Running,
            current_step: Some("reserve-inventory".into()),
            version: expected_version + 1,
            next_run_at: Some(Utc::now()),
            now: Utc::now(),
            lease: LeaseChange::Keep,
        };
        let claim = Claim {
            saga_id,
            fencing_token: claim_token,
            deferrals: 0,
            trace: None,
        };
        let store = Arc::clone(&store);
        async move { store.commit(Some(claim), update, request).await }
    };
    let write = |claim_token| write_at(claim_token, loaded.version);
    // A wakes up and tries to record a step: refused, nothing written.
    ensure!(write(first[0].fencing_token).await? == Committed::LeaseLost);
    ensure!(sagas.load(saga_id).await?.version == loaded.version);
    // B's write with the current token goes through.
    ensure!(matches!(
        write(taken[0].fencing_token).await?,
        Committed::Written(_)
    ));
    ensure!(sagas.load(saga_id).await?.version == loaded.version + 1);
    let row = store.get(saga_id).await?.context("row")?;
    ensure!(
        row.lease_owner.as_deref() == Some("runner-b") && row.version == loaded.version + 1,
        "{row:?}"
    );
    // The same write again: B holds the lease, but the stream has moved on.
    // A typed conflict, and neither the stream nor the row changed.
    let again = write(taken[0].fencing_token).await;
    ensure!(
        matches!(
            again,
            Err(StoreError::VersionConflict { expected, actual, .. })
                if expected == loaded.version && actual == loaded.version + 1
        ),
        "{again:?}"
    );
    // Ahead of the stream (a version it never had): refused the same way,
    // rather than leaving a gap in the stream.
    let ahead = write_at(taken[0].fencing_token, loaded.version + 2).await;
    ensure!(
        matches!(
            ahead,
            Err(StoreError::VersionConflict { expected, actual, .. })
                if expected == loaded.version + 2 && actual == loaded.version + 1
        ),
        "{ahead:?}"
    );
    ensure!(sagas.load(saga_id).await?.version == loaded.version + 1);
    let unchanged = store.get(saga_id).await?.context("row")?;
    ensure!(
        unchanged == row,
        "{unchanged:?} after refused writes, was {row:?}"
    );
    Ok(())
}

/// Starts `count` sagas of `saga_type` straight in the store, each due now
/// with one event, and returns their ids in the order started.
async fn start_bare_sagas(
    store: &Arc<dyn SagaStore>,
    saga_type: &str,
    count: usize,
) -> anyhow::Result<Vec<Uuid>> {
    let mut saga_ids = Vec::new();
    for _ in 0..count {
        let saga_id = Uuid::now_v7();
        let started = InstanceUpdate {
            saga_id,
            status: SagaStatus::Running,
            current_step: None,
            version: 1,
            next_run_at: Some(Utc::now()),
            now: Utc::now(),
            lease: LeaseChange::Keep,
        };
        let first = AppendRequest::single(
            saga_id,
            "saga",
            0,
            vec![NewEvent::new("Started", serde_json::json!({}))],
        );
        store
            .start(started, saga_type, Uuid::now_v7(), first)
            .await?
            .context("a new saga starts")?;
        saga_ids.push(saga_id);
    }
    Ok(saga_ids)
}

/// Many sagas' steps recorded at the same moment (on Postgres, several go
/// in one statement): each gets the outcome it would get alone, and one
/// that is refused or conflicts writes nothing, neither its events nor its
/// row, while the others are written. A step may also hold its lease for a
/// call or give the saga back in the same write.
async fn steps_recorded_at_once_each_keep_their_own_outcome(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    /// Sagas whose lease ran out before their step is recorded.
    const LAPSED: usize = 6;
    /// Sagas of each kind below.
    const EACH: usize = 4;
    /// Kinds of steps: a plain step; one under a claim superseded since; one
    /// behind its own stream; one also writing a stream the others of its
    /// kind write too (all at its version 1); one holding the lease for a
    /// call; one giving the saga back; one both behind and under a
    /// superseded claim (refused as the latter, as alone).
    const KINDS: usize = 7;
    let store = db.database.saga_store();
    let events = db.event_store();
    let saga_type = format!("merge-test-{}", Uuid::now_v7().simple());
    let event = |name: &str| NewEvent::new(name, serde_json::json!({ "test": name }));
    // Claimed first, for a moment only.
    let mut saga_ids = start_bare_sagas(&store, &saga_type, LAPSED).await?;
    let mut claims = store
        .claim("merge-runner", Duration::from_millis(1), LAPSED as u32, &[])
        .await?;
    let lapsing = saga_ids.clone();
    saga_ids.extend(start_bare_sagas(&store, &saga_type, EACH * KINDS).await?);
    claims.extend(
        store
            .claim(
                "merge-runner",
                Duration::from_secs(60),
                (EACH * KINDS) as u32,
                &lapsing,
            )
            .await?,
    );
    ensure!(claims.len() == saga_ids.len(), "claimed {}", claims.len());
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A stream several sagas write at once, as orders share a product's
    // inventory stream.
    let shared = Uuid::now_v7();
    events
        .append(AppendRequest::single(
            shared,
            "shared",
            0,
            vec![event("Opened")],
        ))
        .await?;
    let claim_of = |saga_id: Uuid| {
        claims
            .iter()
            .copied()
            .find(|c| c.saga_id == saga_id)
            .expect("claimed")
    };
    let mut before = Vec::new();
    for &saga_id in &saga_ids {
        before.push(store.get(saga_id).await?.context("row")?);
    }

    // The lapsed ones hold for a call; the others by kind.
    let kind = |i: usize| (i >= LAPSED).then(|| (i - LAPSED) % KINDS);
    let commits = saga_ids.iter().enumerate().map(|(i, &saga_id)| {
        let mut claim = claim_of(saga_id);
        if matches!(kind(i), Some(1 | 6)) {
            claim.fencing_token -= 1;
        }
        let expected = if matches!(kind(i), Some(2 | 6)) { 0 } else { 1 };
        let mut streams = vec![StreamAppend {
            aggregate_id: saga_id,
            aggregate_type: "saga".into(),
            expected_version: expected,
            events: vec![event("StepStarted"), event("StepSucceeded")],
        }];
        if kind(i) == Some(3) {
            streams.push(StreamAppend {
                aggregate_id: shared,
                aggregate_type: "shared".into(),
                expected_version: 1,
                events: vec![event("Taken")],
            });
        }
        let request = AppendRequest {
            streams,
            metadata: EventMetadata {
                actor: Some(format!("saga-{i}")),
                ..Default::default()
            },
            idempotency_key: None,
        };
        let update = InstanceUpdate {
            saga_id,
            status: SagaStatus::Compensating,
            current_step: Some(format!("step-{i}")),
            version: expected + 2,
            next_run_at: None,
            now: Utc::now(),
            lease: match kind(i) {
                None | Some(4) => LeaseChange::Hold(Duration::from_secs(120)),
                Some(5) => LeaseChange::Release,
                Some(_) => LeaseChange::Keep,
            },
        };
        let store = Arc::clone(&store);
        async move { store.commit(Some(claim), update, request).await }
    });
    // Newest saga first: the store must not rely on the order it is asked
    // in (a merged statement takes its steps by saga id).
    let mut commits: Vec<_> = commits.collect();
    commits.reverse();
    let mut outcomes = futures_util::future::join_all(commits).await;
    outcomes.reverse();

    let mut shared_written = 0;
    let mut transactions = Vec::new();
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let saga_id = saga_ids[i];
        let stream = events.read_streams(&[saga_id]).await?;
        let row = store.get(saga_id).await?.context("row")?;
        let written = match (kind(i), outcome) {
            (Some(0 | 3 | 4 | 5), Ok(Committed::Written(outcome))) => {
                transactions.push(outcome.last_position.transaction_id);
                true
            }
            (None | Some(1 | 6), Ok(Committed::LeaseLost)) => false,
            (
                Some(2),
                Err(StoreError::VersionConflict {
                    aggregate_id,
                    expected: 0,
                    actual: 1,
                }),
            ) if aggregate_id == saga_id => false,
            (
                Some(3),
                Err(StoreError::VersionConflict {
                    aggregate_id,
                    expected: 1,
                    actual: 2,
                }),
            ) if aggregate_id == shared => false,
            (kind, outcome) => bail!("saga {i} (kind {kind:?}): {outcome:?}"),
        };
        if !written {
            ensure!(
                stream.len() == 1,
                "saga {i} refused, yet {} events",
                stream.len()
            );
            ensure!(row == before[i], "saga {i} refused, yet {row:?}");
            continue;
        }
        shared_written += usize::from(kind(i) == Some(3));
        ensure!(stream.len() == 3, "saga {i}: {} events", stream.len());
        ensure!(
            stream[2].metadata.actor.as_deref() == Some(&format!("saga-{i}")[..]),
            "saga {i}: its own metadata"
        );
        ensure!(
            row.version == 3
                && row.status == SagaStatus::Compensating
                && row.current_step == Some(format!("step-{i}"))
                && row.next_run_at.is_none(),
            "saga {i}: {row:?}"
        );
        let lease_left = row.lease_expires_at.map(|at| at - Utc::now());
        match kind(i) {
            Some(4) => ensure!(
                row.lease_owner.is_some()
                    && lease_left.is_some_and(|left| left > chrono::Duration::seconds(100)),
                "saga {i} holds its lease for the call: {row:?}"
            ),
            Some(5) => ensure!(
                row.lease_owner.is_none() && row.lease_expires_at.is_none(),
                "saga {i} is given back: {row:?}"
            ),
            _ => ensure!(
                row.lease_owner == before[i].lease_owner
                    && row.lease_expires_at == before[i].lease_expires_at,
                "saga {i} keeps its lease as it was: {row:?}"
            ),
        }
    }
    ensure!(
        shared_written == 1,
        "{shared_written} writers of the shared stream"
    );
    ensure!(events.read_streams(&[shared]).await?.len() == 2);
    let written = transactions.len();
    ensure!(written == 3 * EACH + 1, "{written} written");
    if db.kind == BackendKind::Postgres {
        // Steps queued behind the first went out together.
        transactions.sort_unstable();
        transactions.dedup();
        ensure!(
            transactions.len() < written,
            "{} transactions for {written} steps written",
            transactions.len(),
        );
    }
    Ok(())
}

/// A heartbeat renews a process's leases without waiting for a row a
/// step's write holds at that moment (Postgres). Waiting there while
/// holding the rows it renewed first could close a deadlock with a merged
/// step statement, which Postgres breaks only after its deadlock timeout
/// (a second), stalling every reader of the log meanwhile. The row passed
/// over is renewed once its write is done.
async fn a_heartbeat_does_not_wait_for_a_row_a_write_holds(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let Database::Postgres(postgres) = &db.database else {
        bail!("a Postgres case");
    };
    let store = db.database.saga_store();
    let saga_type = format!("heartbeat-test-{}", Uuid::now_v7().simple());
    let saga_ids = start_bare_sagas(&store, &saga_type, 3).await?;
    let claims = store
        .claim("heartbeat-runner", Duration::from_secs(5), 3, &[])
        .await?;
    ensure!(claims.len() == 3, "claimed {}", claims.len());
    let lease_of = |saga_id| {
        let store = Arc::clone(&store);
        async move {
            store
                .get(saga_id)
                .await?
                .and_then(|row| row.lease_expires_at)
                .context("leased")
        }
    };
    let before = lease_of(saga_ids[1]).await?;

    // A write holding the middle saga's row, as a step's statement does
    // while it waits.
    let mut writer = postgres.pool().begin().await?;
    sqlx::query("SELECT 1 FROM saga_instances WHERE saga_id = $1 FOR UPDATE")
        .bind(saga_ids[1])
        .execute(&mut *writer)
        .await?;
    let renewed = tokio::time::timeout(
        Duration::from_secs(3),
        store.heartbeat("heartbeat-runner", &saga_ids, Duration::from_secs(60)),
    )
    .await
    .context("the heartbeat waited for a row a write holds")??;
    ensure!(renewed == 2, "{renewed} leases renewed beside the held row");
    for &saga_id in [saga_ids[0], saga_ids[2]].iter() {
        let left = lease_of(saga_id).await? - Utc::now();
        ensure!(
            left > chrono::Duration::seconds(50),
            "saga {saga_id} not renewed: {left} left"
        );
    }
    ensure!(
        lease_of(saga_ids[1]).await? == before,
        "the held row changed under its write"
    );
    writer.rollback().await?;

    let renewed = store
        .heartbeat("heartbeat-runner", &saga_ids, Duration::from_secs(60))
        .await?;
    ensure!(
        renewed == 3,
        "{renewed} leases renewed once the write ended"
    );
    let left = lease_of(saga_ids[1]).await? - Utc::now();
    ensure!(
        left > chrono::Duration::seconds(50),
        "the row passed over was not renewed later: {left} left"
    );
    Ok(())
}

/// Sixteen orders for the same two products, driven at once by one
/// process: its reserve and confirm steps take turns per product instead of
/// racing for the stock streams, so none of them loses a version race, and
/// every order is confirmed with the stock counted exactly.
async fn one_process_reserves_and_confirms_a_popular_product_without_conflicts(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    const ORDERS: u32 = 16;
    let mut shop = shop_without_runner(&db, db.database.saga_store()).await?;
    let (teapot, cups) = (shop.product("30", 50).await?, shop.product("4", 100).await?);
    let mut order_ids = Vec::new();
    for i in 0..ORDERS {
        // Lines in both orders of products: the steps enter them by id.
        let lines = if i % 2 == 0 {
            vec![(teapot, 1), (cups, 2)]
        } else {
            vec![(cups, 2), (teapot, 1)]
        };
        order_ids.push(shop.order(lines, "tok_visa", "DE").await?);
    }
    shop.runner = Some(Runner::start(
        &shop.sagas,
        &shop.registry,
        LEASE,
        FaultHooks::default(),
    ));
    for &order_id in &order_ids {
        let saga = shop.settled(order_id).await?;
        ensure!(
            saga.state.status == Some(SagaStatus::Completed),
            "{saga:#?}"
        );
    }
    let conflicts = shop
        .runner
        .as_ref()
        .map(|runner| runner.metrics.conflict_retries.load(Ordering::Relaxed))
        .unwrap_or_default();
    ensure!(
        conflicts == 0,
        "{conflicts} version conflicts between one process's own steps"
    );
    shop.expect_stock(teapot, 50 - ORDERS).await?;
    shop.expect_stock(cups, 100 - 2 * ORDERS).await?;
    Ok(())
}

/// Between steps a drive keeps the saga and the order as its own last
/// writes left them: each stream is read once when the drive starts, not
/// before every step.
/// (That a request arriving meanwhile is still honoured is what the
/// cancellation tests show.)
async fn a_drive_reads_the_saga_and_order_streams_once_not_before_every_step(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let shop = shop_without_runner(&db, db.database.saga_store()).await?;
    let product = shop.product("4", 3).await?;
    let events = Arc::new(CountingEvents::new(db.event_store()));
    let counted = Sagas::new(
        Commerce::new(events.clone(), db.database.view_store()),
        db.database.saga_store(),
    );
    let order_id = shop.order(vec![(product, 1)], "tok_visa", "DE").await?;
    let runner = Runner::start(&counted, &shop.registry, LEASE, FaultHooks::default());
    let saga = shop.settled(order_id).await?;
    ensure!(
        saga.state.status == Some(SagaStatus::Completed),
        "{saga:#?}"
    );
    runner.stop().await;
    let reads = events.reads_of(Saga::id_for(ORDER_FULFILMENT, order_id));
    ensure!(
        reads == 1,
        "the runner read the saga's stream {reads} times for {} steps",
        saga.state.steps.len()
    );
    // The order too: read for the first step, then kept as each write
    // (reserved, paid, shipped) left it.
    let reads = events.reads_of(order_id);
    ensure!(
        reads == 1,
        "the runner read the order's stream {reads} times for {} steps",
        saga.state.steps.len()
    );
    Ok(())
}

/// A cancel that lands after a drive decided its next step on the saga it
/// kept, before that step's first write: the write fails its version
/// check, the drive reads the saga again and compensates instead. The
/// carrier is never asked; the payment is refunded. (A runner that read the
/// stream before every step would have decided on the same state here: what
/// this shows is that a step's first write is where any stale decision
/// stops, which is what keeping the saga between steps relies on.)
async fn a_cancel_after_the_next_step_was_decided_stops_it_before_its_call(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let (shop, runner, product, order_id) = paid_and_waiting_before_shipment(&db).await?;
    shop.sagas
        .cancel_order(order_id, "changed my mind", &context())
        .await?;
    let saga = shop.settled(order_id).await?;
    // The drive went on from the saga it kept, and its write said no.
    let conflicts = runner.metrics.conflict_retries.load(Ordering::Relaxed);
    runner.stop().await;
    ensure!(
        conflicts >= 1,
        "no version conflict: the drive did not act on what it kept"
    );
    ensure!(
        saga.state.status == Some(SagaStatus::Compensated),
        "{saga:#?}"
    );
    ensure!(
        step_status(&saga.state, "shipment") == Some(StepStatus::Pending),
        "{saga:#?}"
    );
    let key = Saga::step_key(saga_id_of(order_id), "shipment");
    ensure!(
        shop.shipping.requests_with_key(&key) == 0,
        "the carrier was asked {} times",
        shop.shipping.requests_with_key(&key)
    );
    ensure!(
        shop.payments(order_id) == [("refunded".to_string(), true)],
        "{:?}",
        shop.payments(order_id)
    );
    ensure!(shop.order_state(order_id).await?.status == Some(OrderStatus::Cancelled));
    shop.expect_stock(product, 2).await?;
    Ok(())
}

/// A drive keeps the order as its own writes left it. An order moved by
/// someone else meanwhile (here an admin cancels it directly, between the
/// payment and the shipment) turns the drive's next write of the order into
/// a version conflict: the drive reads the order again, finds it cancelled,
/// and undoes what it did instead of recording a shipment on it.
async fn an_order_moved_under_a_drive_is_read_again_before_the_drive_writes_it(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let (shop, runner, product, order_id) = paid_and_waiting_before_shipment(&db).await?;
    shop.commerce
        .transition_order(
            order_id,
            OrderTransition::Cancel {
                reason: "cancelled by the shop".into(),
            },
            None,
            &context(),
        )
        .await?;
    let saga = shop.settled(order_id).await?;
    let conflicts = runner.metrics.conflict_retries.load(Ordering::Relaxed);
    runner.stop().await;
    ensure!(
        conflicts >= 1,
        "no version conflict: the drive did not write on the order it kept"
    );
    ensure!(
        saga.state.status == Some(SagaStatus::Compensated),
        "{saga:#?}"
    );
    let order = shop.order_state(order_id).await?;
    ensure!(order.status == Some(OrderStatus::Cancelled), "{order:#?}");
    ensure!(
        order.shipment_reference.is_none(),
        "a shipment was recorded on a cancelled order: {order:#?}"
    );
    ensure!(
        shop.shipping
            .shipments()
            .iter()
            .filter(|shipment| shipment.order_id == order_id.to_string())
            .all(|shipment| shipment.cancelled),
        "{:?}",
        shop.shipping.shipments()
    );
    ensure!(
        shop.payments(order_id) == [("refunded".to_string(), true)],
        "{:?}",
        shop.payments(order_id)
    );
    shop.expect_stock(product, 2).await?;
    Ok(())
}

/// A shop whose runner paid an order (one unit of a product with two in
/// stock) and now waits at the shipment's start, holding the saga and the
/// order as its payment write left them. It waits longer than the lease:
/// the heartbeat keeps it, and whatever the test does meanwhile has all the
/// time it needs to land.
async fn paid_and_waiting_before_shipment(
    db: &TestDatabase,
) -> anyhow::Result<(Shop, Runner, Uuid, Uuid)> {
    let shop = shop_without_runner(db, db.database.saga_store()).await?;
    let product = shop.product("5", 2).await?;
    let runner = Runner::start(
        &shop.sagas,
        &shop.registry,
        LEASE,
        FaultHooks::from_setting(Some("before-start:shipment=4000")).map_err(anyhow::Error::msg)?,
    );
    let order_id = shop.order(vec![(product, 1)], "tok_visa", "DE").await?;
    shop.wait_for(order_id, |saga| {
        step_status(saga, "payment") == Some(StepStatus::Succeeded)
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok((shop, runner, product, order_id))
}

fn saga_id_of(order_id: Uuid) -> Uuid {
    Saga::id_for(ORDER_FULFILMENT, order_id)
}

/// Waits until `ready` holds, polling; fails after `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, ready: F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !ready().await? {
        if tokio::time::Instant::now() > deadline {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Text as a saga may store and show it: one line, no control characters.
fn clean_line(text: &str, max_chars: usize) -> bool {
    text.chars().count() <= max_chars && !text.chars().any(char::is_control)
}

async fn hostile_provider_text_still_ends_the_saga(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let shop = shop(&db).await?;
    let product = shop.product("5", 20).await?;
    let mut orders = Vec::new();
    for method in HOSTILE_DECLINES {
        orders.push((method, shop.order(vec![(product, 2)], method, "DE").await?));
    }
    for (method, order_id) in orders {
        let saga = shop
            .settled_within(order_id, Duration::from_secs(10))
            .await
            .with_context(|| format!("declined with {method}"))?;
        ensure!(
            saga.state.status == Some(SagaStatus::Compensated),
            "{method}: {saga:#?}"
        );
        let order = shop.order_state(order_id).await?;
        ensure!(
            order.status == Some(OrderStatus::Failed)
                && order.reason.as_deref() == Some("payment declined"),
            "{method}: {order:?}"
        );
        let error = saga
            .state
            .step("payment")
            .and_then(|step| step.error.clone())
            .context("the decline is on record")?;
        ensure!(
            clean_line(&error.message, MAX_ERROR_MESSAGE_CHARS)
                && error.code.len() <= 64
                && error
                    .code
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.".contains(&b)),
            "{method}: stored bounded and clean: {error:?}"
        );
        let cause = saga.state.compensation.clone().context("compensated")?;
        ensure!(
            clean_line(&cause.reason, MAX_REASON_CHARS),
            "{method}: {cause:?}"
        );
    }
    shop.expect_stock(product, 20).await?;

    // A charge made, answered with a reference the order will not keep (a
    // tab, a newline, markup): the order refuses it, and the charge is
    // refunded with the reference exactly as the provider gave it.
    let odd = shop
        .order(vec![(product, 2)], "tok_odd_reference", "DE")
        .await?;
    let saga = shop.settled_within(odd, Duration::from_secs(10)).await?;
    ensure!(
        saga.state.status == Some(SagaStatus::Compensated),
        "{saga:#?}"
    );
    ensure!(
        shop.payments(odd) == [("refunded".to_string(), true)],
        "{:?}",
        shop.payments(odd)
    );
    let order = shop.order_state(odd).await?;
    ensure!(
        order.status == Some(OrderStatus::Failed)
            && order.reason.as_deref() == Some("the payment could not be completed")
            && order.payment_reference.is_none(),
        "{order:?}"
    );
    let cause = saga.state.compensation.clone().context("compensated")?;
    ensure!(clean_line(&cause.reason, MAX_REASON_CHARS), "{cause:?}");
    shop.expect_stock(product, 20).await
}

async fn a_payment_only_authorized_is_captured_before_the_order_is_confirmed(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let shop = shop(&db).await?;
    let product = shop.product("11", 2).await?;
    // The provider answers every charge with an authorization only.
    let order_id = shop
        .order(vec![(product, 1)], "tok_auth_only", "DE")
        .await?;
    let saga = shop.settled(order_id).await?;
    ensure!(
        saga.state.status == Some(SagaStatus::Completed),
        "{saga:#?}"
    );
    ensure!(
        shop.payments(order_id) == [("captured".to_string(), false)],
        "captured before confirming: {:?}",
        shop.payments(order_id)
    );
    let output = saga.state.step("payment").and_then(|s| s.output.clone());
    ensure!(
        output.as_ref().map(|o| o["status"].clone()) == Some(serde_json::json!("captured")),
        "{output:?}"
    );
    ensure!(shop.order_state(order_id).await?.status == Some(OrderStatus::Confirmed));

    // A shipment refused after the authorization was captured: refunded.
    let refused = shop
        .order(vec![(product, 1)], "tok_auth_only", "XX")
        .await?;
    let saga = shop.settled(refused).await?;
    ensure!(
        saga.state.status == Some(SagaStatus::Compensated),
        "{saga:#?}"
    );
    ensure!(
        shop.payments(refused) == [("refunded".to_string(), true)],
        "{:?}",
        shop.payments(refused)
    );

    // An authorization the provider will not capture: the step fails, and
    // compensation finds the authorization and cancels it (not a refund).
    let uncaptured = shop
        .order(vec![(product, 1)], "tok_capture_refused", "DE")
        .await?;
    let saga = shop.settled(uncaptured).await?;
    ensure!(
        saga.state.status == Some(SagaStatus::Compensated),
        "{saga:#?}"
    );
    ensure!(
        shop.payments(uncaptured) == [("cancelled".to_string(), false)],
        "the authorization is released: {:?}",
        shop.payments(uncaptured)
    );
    let order = shop.order_state(uncaptured).await?;
    ensure!(
        order.status == Some(OrderStatus::Failed) && order.payment_reference.is_none(),
        "{order:?}"
    );
    shop.expect_stock(product, 1).await
}

async fn an_unrecorded_shipment_is_looked_up_and_cancelled(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let shop = shop_without_runner(&db, db.database.saga_store()).await?;
    let product = shop.product("9", 2).await?;
    // This process dies right after the carrier created the shipment.
    let doomed = Runner::start(
        &shop.sagas,
        &shop.registry,
        LEASE,
        FaultHooks::from_setting(Some("after-call:shipment")).map_err(anyhow::Error::msg)?,
    );
    let order_id = shop.order(vec![(product, 1)], "tok_visa", "DE").await?;
    eventually(Duration::from_secs(15), "the shipment", || async {
        Ok(shop
            .shipping
            .shipments()
            .iter()
            .any(|s| s.order_id == order_id.to_string()))
    })
    .await?;
    doomed.stop().await;
    shop.sagas
        .cancel_order(order_id, "changed my mind", &context())
        .await?;
    let runner = Runner::start(&shop.sagas, &shop.registry, LEASE, FaultHooks::default());
    let saga = shop.settled(order_id).await?;
    ensure!(
        saga.state.status == Some(SagaStatus::Compensated),
        "{saga:#?}"
    );
    let shipments: Vec<_> = shop
        .shipping
        .shipments()
        .into_iter()
        .filter(|s| s.order_id == order_id.to_string())
        .collect();
    ensure!(
        shipments.len() == 1 && shipments[0].cancelled,
        "created once, cancelled: {shipments:?}"
    );
    ensure!(
        shop.payments(order_id) == [("refunded".to_string(), true)],
        "{:?}",
        shop.payments(order_id)
    );
    ensure!(shop.order_state(order_id).await?.status == Some(OrderStatus::Cancelled));
    shop.expect_stock(product, 2).await?;
    runner.stop().await;
    Ok(())
}

async fn an_unrecorded_charge_is_looked_up_and_refunded_never_forgotten(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let shop = shop_without_runner(&db, db.database.saga_store()).await?;
    let product = shop.product("9", 2).await?;
    // This process dies right after the provider charged, before the
    // outcome is recorded.
    let doomed = Runner::start(
        &shop.sagas,
        &shop.registry,
        LEASE,
        FaultHooks::from_setting(Some("after-call:payment")).map_err(anyhow::Error::msg)?,
    );
    let order_id = shop.order(vec![(product, 1)], "tok_visa", "DE").await?;
    eventually(Duration::from_secs(15), "the charge", || async {
        Ok(shop.payments(order_id).len() == 1)
    })
    .await?;
    doomed.stop().await;
    shop.sagas
        .cancel_order(order_id, "changed my mind", &context())
        .await?;

    // A process without the payment plugin takes the saga: it cannot learn
    // what the charge did, so it must not conclude anything.
    // (It takes the saga once the dead process's lease has lapsed.)
    let (bare, _bare_dir) = registry(&shop.payments, &shop.shipping, None)?;
    let without = Runner::start(&shop.sagas, &bare, LEASE, FaultHooks::default());
    eventually(3 * LEASE, "a deferral", || async {
        Ok(without.metrics.deferrals.load(Ordering::Relaxed) > 0)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let saga = shop.saga(order_id).await?;
    ensure!(
        saga.state.status == Some(SagaStatus::Compensating),
        "never compensated without knowing: {saga:#?}"
    );
    ensure!(
        shop.payments(order_id) == [("captured".to_string(), false)],
        "{:?}",
        shop.payments(order_id)
    );
    without.stop().await;

    // A process with the plugin: the charge is looked up and refunded.
    let with = Runner::start(&shop.sagas, &shop.registry, LEASE, FaultHooks::default());
    let saga = shop.settled(order_id).await?;
    ensure!(
        saga.state.status == Some(SagaStatus::Compensated),
        "{saga:#?}"
    );
    ensure!(
        shop.payments(order_id) == [("refunded".to_string(), true)],
        "{:?}",
        shop.payments(order_id)
    );
    ensure!(shop.order_state(order_id).await?.status == Some(OrderStatus::Cancelled));
    let key = Saga::step_key(Saga::id_for(ORDER_FULFILMENT, order_id), "payment");
    ensure!(
        shop.payments.lookups() >= 1 && shop.payments.requests_with_key(&key) == 1,
        "asked, not repeated: {} charge requests",
        shop.payments.requests_with_key(&key)
    );
    shop.expect_stock(product, 2).await?;
    with.stop().await;
    Ok(())
}

/// A process dies just before the payment call; the order is cancelled;
/// another process compensates. With `payment_component` of contract 0.2
/// the provider is asked and nothing is charged; the ledger is returned.
async fn die_before_the_charge_then_cancel(
    db: &TestDatabase,
    payment_component: &str,
) -> anyhow::Result<(Vec<(String, bool)>, u64)> {
    let shop = shop_without_runner(db, db.database.saga_store()).await?;
    let (plugins, _dir) = registry(&shop.payments, &shop.shipping, Some(payment_component))?;
    let product = shop.product("6", 2).await?;
    let doomed = Runner::start(
        &shop.sagas,
        &plugins,
        LEASE,
        FaultHooks::from_setting(Some("before-call:payment")).map_err(anyhow::Error::msg)?,
    );
    let order_id = shop.order(vec![(product, 1)], "tok_visa", "DE").await?;
    shop.wait_for(order_id, |saga| {
        saga.step("payment").is_some_and(|s| s.attempts >= 1)
    })
    .await?;
    // Past the recorded start, stopped at the call.
    tokio::time::sleep(Duration::from_millis(200)).await;
    doomed.stop().await;
    shop.sagas
        .cancel_order(order_id, "changed my mind", &context())
        .await?;
    let runner = Runner::start(&shop.sagas, &plugins, LEASE, FaultHooks::default());
    let saga = shop.settled(order_id).await?;
    ensure!(
        saga.state.status == Some(SagaStatus::Compensated),
        "{saga:#?}"
    );
    ensure!(shop.order_state(order_id).await?.status == Some(OrderStatus::Cancelled));
    shop.expect_stock(product, 2).await?;
    runner.stop().await;
    Ok((shop.payments(order_id), shop.payments.lookups()))
}

async fn a_call_that_never_happened_is_neither_charged_nor_refunded(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let (ledger, lookups) = die_before_the_charge_then_cancel(&db, artifacts::PAYMENT_HTTP).await?;
    ensure!(ledger.is_empty(), "no charge, no refund: {ledger:?}");
    ensure!(lookups >= 1, "the provider was asked");
    Ok(())
}

async fn a_plugin_of_contract_0_1_is_probed_by_repeating_the_call(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    // Built against commerce:plugin@0.1.0, without lookup: it still loads,
    // and the kernel learns the outcome the old way (a charge and its refund).
    let (ledger, lookups) = die_before_the_charge_then_cancel(&db, LEGACY_PAYMENT_HTTP).await?;
    ensure!(
        ledger == [("refunded".to_string(), true)],
        "probed, then refunded: {ledger:?}"
    );
    ensure!(lookups == 0, "a 0.1 plugin has no lookup");
    Ok(())
}

async fn a_step_whose_plugin_is_not_here_waits_for_a_process_that_has_it(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    const ORDERS: usize = 6;
    let shop = shop_without_runner(&db, db.database.saga_store()).await?;
    let product = shop.product("4", 10).await?;
    // A process whose plugin directory lacks both plugins starts first and
    // takes the first sagas.
    let (bare, _bare_dir) = registry(&shop.payments, &shop.shipping, None)?;
    let without = Runner::start(&shop.sagas, &bare, LEASE, FaultHooks::default());
    let mut orders = Vec::new();
    for _ in 0..ORDERS {
        orders.push(shop.order(vec![(product, 1)], "tok_visa", "DE").await?);
    }
    eventually(Duration::from_secs(10), "a deferral", || async {
        Ok(without.metrics.deferrals.load(Ordering::Relaxed) > 0)
    })
    .await?;
    let with = Runner::start(&shop.sagas, &shop.registry, LEASE, FaultHooks::default());
    for order_id in &orders {
        let saga = shop.settled(*order_id).await?;
        ensure!(
            saga.state.status == Some(SagaStatus::Completed),
            "{saga:#?}"
        );
        ensure!(
            shop.payments(*order_id) == [("captured".to_string(), false)],
            "{:?}",
            shop.payments(*order_id)
        );
    }
    shop.expect_stock(product, 10 - ORDERS as u32).await?;
    without.stop().await;
    with.stop().await;
    Ok(())
}

/// A saga store that fails on request: the next `commits` commits and the
/// next `releases` releases (and deferrals) fail as a lost connection
/// would; once `paused`, claims and heartbeats do nothing, as for a process
/// that is stopped (its drives are stopped by a fault hook).
struct FlakySagaStore {
    inner: Arc<dyn SagaStore>,
    /// Commits let through before `commits` fail.
    pass_first: AtomicU32,
    commits: AtomicU32,
    releases: AtomicU32,
    paused: AtomicBool,
}

impl FlakySagaStore {
    fn new(inner: Arc<dyn SagaStore>) -> Arc<Self> {
        Arc::new(FlakySagaStore {
            inner,
            pass_first: AtomicU32::new(0),
            commits: AtomicU32::new(0),
            releases: AtomicU32::new(0),
            paused: AtomicBool::new(false),
        })
    }

    fn fail(counter: &AtomicU32) -> Result<(), StoreError> {
        match counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)) {
            Ok(_) => Err(StoreError::Database(sqlx::Error::PoolTimedOut)),
            Err(_) => Ok(()),
        }
    }
}

#[async_trait::async_trait]
impl SagaStore for FlakySagaStore {
    async fn start(
        &self,
        instance: InstanceUpdate,
        saga_type: &str,
        correlation_id: Uuid,
        request: AppendRequest,
    ) -> Result<Option<AppendOutcome>, StoreError> {
        self.inner
            .start(instance, saga_type, correlation_id, request)
            .await
    }
    async fn claim(
        &self,
        owner: &str,
        lease: Duration,
        limit: u32,
        skip: &[Uuid],
    ) -> Result<Vec<Claim>, StoreError> {
        if self.paused.load(Ordering::SeqCst) {
            return Ok(Vec::new());
        }
        self.inner.claim(owner, lease, limit, skip).await
    }
    async fn heartbeat(
        &self,
        owner: &str,
        sagas: &[Uuid],
        lease: Duration,
    ) -> Result<u64, StoreError> {
        if self.paused.load(Ordering::SeqCst) {
            return Ok(0);
        }
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
        let passing = self
            .pass_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if !passing {
            Self::fail(&self.commits)?;
        }
        self.inner.commit(fence, update, request).await
    }
    async fn release(
        &self,
        claim: Claim,
        seen_version: Option<u32>,
        next_run_at: Option<chrono::DateTime<Utc>>,
        now: chrono::DateTime<Utc>,
    ) -> Result<(), StoreError> {
        Self::fail(&self.releases)?;
        self.inner
            .release(claim, seen_version, next_run_at, now)
            .await
    }
    async fn defer(&self, claim: Claim, delay: Duration) -> Result<(), StoreError> {
        Self::fail(&self.releases)?;
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
    async fn count_by_status(&self) -> Result<Vec<(SagaStatus, u64)>, StoreError> {
        self.inner.count_by_status().await
    }
    async fn orders_without_saga(
        &self,
        placed_before: chrono::DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Uuid>, StoreError> {
        self.inner.orders_without_saga(placed_before, limit).await
    }
}

async fn failed_writes_and_releases_do_not_strand_a_saga(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    const SHORT_LEASE: Duration = Duration::from_secs(1);
    let flaky = FlakySagaStore::new(db.database.saga_store());
    let mut shop = shop_without_runner(&db, flaky.clone()).await?;
    let product = shop.product("3", 5).await?;
    shop.runner = Some(Runner::start(
        &shop.sagas,
        &shop.registry,
        SHORT_LEASE,
        FaultHooks::default(),
    ));

    // One commit fails, and so does the release after it.
    flaky.commits.store(1, Ordering::SeqCst);
    flaky.releases.store(1, Ordering::SeqCst);
    let first = shop.order(vec![(product, 1)], "tok_visa", "DE").await?;
    let saga = shop.settled_within(first, 3 * SHORT_LEASE).await?;
    ensure!(
        saga.state.status == Some(SagaStatus::Completed),
        "{saga:#?}"
    );

    // Once that drive has given the saga back (its release retried):
    let store = Arc::clone(shop.sagas.store());
    let first_saga = Saga::id_for(ORDER_FULFILMENT, first);
    eventually(
        Duration::from_secs(5),
        "the first saga given back",
        || async {
            Ok(store
                .get(first_saga)
                .await?
                .is_some_and(|row| row.lease_owner.is_none()))
        },
    )
    .await?;

    // Commits keep failing past the retries in place, and giving the saga
    // back fails too: its lease lapses and it is taken up again.
    flaky.commits.store(8, Ordering::SeqCst);
    flaky.releases.store(1, Ordering::SeqCst);
    let second = shop.order(vec![(product, 1)], "tok_visa", "DE").await?;
    let saga = shop.settled_within(second, 15 * SHORT_LEASE).await?;
    ensure!(
        saga.state.status == Some(SagaStatus::Completed),
        "{saga:#?}"
    );
    let metrics = &shop.runner.as_ref().context("runner")?.metrics;
    ensure!(
        metrics.write_retries.load(Ordering::Relaxed) >= 9,
        "every retry counted: {metrics:?}"
    );
    for order_id in [first, second] {
        ensure!(shop.payments(order_id) == [("captured".to_string(), false)]);
    }
    shop.expect_stock(product, 3).await
}

async fn a_call_that_succeeded_is_recorded_when_the_store_falters(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let flaky = FlakySagaStore::new(db.database.saga_store());
    let mut shop = shop_without_runner(&db, flaky.clone()).await?;
    // One attempt only: an outcome lost now would be compensated.
    let mut single = definition(None);
    single.steps[1].retry = quick(1, 2_000);
    shop.sagas
        .define(ORDER_FULFILMENT, single, &context())
        .await?;
    let product = shop.product("3", 2).await?;
    shop.runner = Some(Runner::start(
        &shop.sagas,
        &shop.registry,
        LEASE,
        FaultHooks::default(),
    ));
    // Reserving and the payment's start go through; the three writes of the
    // charge's outcome after it fail.
    flaky.pass_first.store(2, Ordering::SeqCst);
    flaky.commits.store(3, Ordering::SeqCst);
    let order_id = shop.order(vec![(product, 1)], "tok_visa", "DE").await?;
    let saga = shop.settled(order_id).await?;
    ensure!(
        saga.state.status == Some(SagaStatus::Completed),
        "the charge is recorded, not undone: {saga:#?}"
    );
    let payment = saga.state.step("payment").context("payment")?;
    ensure!(payment.attempts == 1, "one attempt: {payment:?}");
    let key = Saga::step_key(Saga::id_for(ORDER_FULFILMENT, order_id), "payment");
    ensure!(
        shop.payments.requests_with_key(&key) == 1,
        "the provider was called once, the write retried: {}",
        shop.payments.requests_with_key(&key)
    );
    ensure!(shop.payments(order_id) == [("captured".to_string(), false)]);
    ensure!(
        flaky.commits.load(Ordering::SeqCst) == 0,
        "every failure met"
    );
    shop.expect_stock(product, 1).await
}

async fn a_drive_task_that_panics_is_taken_over(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let mut shop = shop_without_runner(&db, db.database.saga_store()).await?;
    let product = shop.product("3", 5).await?;
    let runner = Runner::start(
        &shop.sagas,
        &shop.registry,
        Duration::from_secs(1),
        FaultHooks::from_setting(Some("before-call:payment=panic")).map_err(anyhow::Error::msg)?,
    );
    let order_id = shop.order(vec![(product, 1)], "tok_visa", "DE").await?;
    let saga = shop
        .settled_within(order_id, Duration::from_secs(10))
        .await?;
    ensure!(
        saga.state.status == Some(SagaStatus::Completed),
        "{saga:#?}"
    );
    ensure!(runner.metrics.panics.load(Ordering::Relaxed) == 1);
    ensure!(shop.payments(order_id) == [("captured".to_string(), false)]);
    runner.stop().await;

    // Drives that panic every time: parked after three, not retried in a
    // loop. (Each panic comes before the call, after the step's start is
    // recorded, so the payment's four attempts outlast the three panics.)
    let runner = Runner::start(
        &shop.sagas,
        &shop.registry,
        Duration::from_secs(1),
        FaultHooks::from_setting(Some("before-call:payment=panic-always"))
            .map_err(anyhow::Error::msg)?,
    );
    let doomed = shop.order(vec![(product, 1)], "tok_visa", "DE").await?;
    let saga = shop.settled_within(doomed, Duration::from_secs(15)).await?;
    ensure!(
        saga.state.status == Some(SagaStatus::Parked)
            && saga.state.park_cause == Some(ParkCause::DriveFailed),
        "{saga:#?}"
    );
    ensure!(runner.metrics.panics.load(Ordering::Relaxed) == 3);
    ensure!(shop.payments.payments_for(&doomed.to_string()).is_empty());
    shop.runner = Some(runner);
    Ok(())
}

async fn a_former_owner_paused_past_its_lease_makes_no_provider_call(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    // Paused right before it records the payment's start (the write that
    // makes its lease last over the call), and right after that write.
    paused_former_owner_makes_no_call(&db, "before-start").await?;
    paused_former_owner_makes_no_call(&db, "before-call").await
}

/// Process A stops for 3 s at `when` of the payment step, heartbeat and
/// claims included (its store does nothing once paused), as a process the
/// operating system stopped; its lease (1 s, or the payment's deadline
/// plus the margin once its start is recorded) lapses meanwhile and
/// process B takes the saga over. A must not call the provider after.
async fn paused_former_owner_makes_no_call(db: &TestDatabase, when: &str) -> anyhow::Result<()> {
    const SHORT_LEASE: Duration = Duration::from_secs(1);
    let shop = shop_without_runner(db, db.database.saga_store()).await?;
    let product = shop.product("3", 5).await?;
    let frozen = FlakySagaStore::new(db.database.saga_store());
    let sagas_a = Sagas::new(shop.commerce.clone(), frozen.clone());
    let a = Runner::start(
        &sagas_a,
        &shop.registry,
        SHORT_LEASE,
        FaultHooks::from_setting(Some(&format!("{when}:payment=3000")))
            .map_err(anyhow::Error::msg)?,
    );
    let order_id = shop.order(vec![(product, 1)], "tok_visa", "DE").await?;
    shop.wait_for(order_id, |saga| match when {
        "before-start" => step_status(saga, "reserve-inventory") == Some(StepStatus::Succeeded),
        _ => saga.step("payment").is_some_and(|s| s.attempts >= 1),
    })
    .await?;
    let started = tokio::time::Instant::now();
    frozen.paused.store(true, Ordering::SeqCst);
    // Process B takes the saga over once A's lease lapses, and finishes it.
    let b = Runner::start(
        &shop.sagas,
        &shop.registry,
        SHORT_LEASE,
        FaultHooks::default(),
    );
    let saga = shop
        .settled_within(order_id, Duration::from_secs(10))
        .await?;
    ensure!(
        saga.state.status == Some(SagaStatus::Completed),
        "{when}: {saga:#?}"
    );
    // A wakes up and finds its lease gone: its record of the call's start
    // is refused, or its lease cannot be held again. It never calls.
    tokio::time::sleep_until(started + Duration::from_millis(3_500)).await;
    eventually(Duration::from_secs(5), "A gives up", || async {
        Ok(a.metrics.leases_lost.load(Ordering::Relaxed) >= 1)
    })
    .await?;
    let key = Saga::step_key(Saga::id_for(ORDER_FULFILMENT, order_id), "payment");
    ensure!(
        shop.payments.requests_with_key(&key) == 1,
        "{when}: only the owner called the provider: {} requests",
        shop.payments.requests_with_key(&key)
    );
    ensure!(shop.payments(order_id) == [("captured".to_string(), false)]);
    a.stop().await;
    b.stop().await;
    Ok(())
}

async fn cancelling_as_the_saga_starts_ends_one_consistent_way(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    const ROUNDS: usize = 20;
    let shop = shop(&db).await?;
    let product = shop.product("2", 100).await?;

    // A cancel that finds no saga starts it with the request in the same
    // write: no runner can take a step in between.
    let alone = shop
        .commerce
        .place_order(
            PlaceOrderInput {
                customer_id: Uuid::now_v7(),
                lines: vec![(product, 1)],
                shipping_address: address("DE"),
                payment_method: "tok_visa".into(),
                idempotency_key: None,
                email: None,
            },
            &context(),
        )
        .await?;
    shop.sagas
        .cancel_order(alone.id, "changed my mind", &context())
        .await?;
    let first_two: Vec<_> = shop
        .commerce
        .store()
        .read_stream(Saga::id_for(ORDER_FULFILMENT, alone.id), Default::default())
        .await?
        .into_iter()
        .take(2)
        .collect();
    ensure!(
        first_two.len() == 2
            && first_two[0].event_type == "Started"
            && first_two[1].event_type == "CompensationRequested"
            && first_two[0].position.transaction_id == first_two[1].position.transaction_id,
        "one write: {first_two:#?}"
    );
    let saga = shop.settled(alone.id).await?;
    ensure!(
        saga.state
            .steps
            .iter()
            .all(|s| s.status == StepStatus::Pending)
            && shop.payments(alone.id).is_empty(),
        "{saga:#?}"
    );

    let mut orders = Vec::new();
    for _ in 0..ROUNDS {
        // Placed, its saga not started yet: placeOrder starts it as the
        // customer cancels.
        let order = shop
            .commerce
            .place_order(
                PlaceOrderInput {
                    customer_id: Uuid::now_v7(),
                    lines: vec![(product, 1)],
                    shipping_address: address("DE"),
                    payment_method: "tok_visa".into(),
                    idempotency_key: None,
                    email: None,
                },
                &context(),
            )
            .await?;
        let (starting, cancelling) = (context(), context());
        let (started, cancelled) = tokio::join!(
            shop.sagas.start_for_order(order.id, &starting),
            shop.sagas
                .cancel_order(order.id, "changed my mind", &cancelling),
        );
        started?;
        let refused = match cancelled {
            Ok(_) => false,
            Err(CommandError::Domain(DomainError::IllegalTransition { .. })) => true,
            Err(other) => return Err(other.into()),
        };
        orders.push((order.id, refused));
    }
    let mut confirmed = 0;
    let mut before_any_step = 0;
    for (order_id, refused) in orders {
        let saga = shop.settled(order_id).await?;
        let order = shop.order_state(order_id).await?;
        let ledger = shop.payments(order_id);
        let saga_id = Saga::id_for(ORDER_FULFILMENT, order_id);
        let story: Vec<(String, serde_json::Value)> = shop
            .commerce
            .store()
            .read_stream(saga_id, Default::default())
            .await?
            .into_iter()
            .map(|event| (event.event_type, event.data))
            .collect();
        let requested_at = story
            .iter()
            .position(|(event_type, _)| event_type == "CompensationRequested");
        match order.status {
            Some(OrderStatus::Cancelled) => {
                ensure!(
                    saga.state.status == Some(SagaStatus::Compensated)
                        && saga.state.compensation.as_ref().is_some_and(|c| c.cancel),
                    "cancelled by its saga, nothing beside it: {saga:#?}"
                );
                ensure!(
                    ledger.iter().all(|(status, _)| status != "captured"),
                    "nothing kept: {ledger:?}"
                );
                ensure!(!refused);
                let requested_at = requested_at.context("the cancel is on record")?;
                // No step starts once the cancel is recorded.
                ensure!(
                    story[requested_at..].iter().all(|(event_type, data)| {
                        event_type != "StepStarted" || data["phase"] == "compensation"
                    }),
                    "{story:?}"
                );
                if requested_at == 1 {
                    // The cancel started the saga: nothing ran at all.
                    before_any_step += 1;
                    ensure!(
                        ledger.is_empty()
                            && saga
                                .state
                                .steps
                                .iter()
                                .all(|s| s.status == StepStatus::Pending),
                        "{ledger:?} {saga:#?}"
                    );
                }
            }
            Some(OrderStatus::Confirmed) => {
                confirmed += 1;
                ensure!(refused, "a confirmed order's cancel was refused");
                ensure!(ledger == [("captured".to_string(), false)], "{ledger:?}");
            }
            other => bail!("order {order_id} ended {other:?}: {saga:#?}"),
        }
    }
    eprintln!(
        "cancel racing the start: {before_any_step} of {ROUNDS} cancelled before any step, \
         {confirmed} confirmed first"
    );
    shop.expect_stock(product, 100 - confirmed).await?;
    ensure!(
        shop.order_state(alone.id).await?.status == Some(OrderStatus::Cancelled),
        "cancelled before any step"
    );
    Ok(())
}

async fn a_spinning_pure_step_is_compensated_without_running_it_again(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let shop = shop(&db).await?;
    // A pure step that spins until its deadline (fuel to spare).
    install(
        &shop.registry,
        "spinner",
        "1.0.0",
        "saga-step",
        artifacts::MISBEHAVING,
        "[limits]\nfuel = 10000000000\ntimeout_ms = 300",
    )?;
    let spin = step(
        "loop",
        StepAction::Custom {
            plugin: "spinner".into(),
        },
        quick(2, 1_000),
    );
    shop.sagas
        .define(ORDER_FULFILMENT, definition(Some(spin)), &context())
        .await?;
    let product = shop.product("1", 3).await?;
    let order_id = shop.order(vec![(product, 1)], "tok_visa", "DE").await?;
    let saga = shop
        .settled_within(order_id, Duration::from_secs(15))
        .await?;
    ensure!(
        saga.state.status == Some(SagaStatus::Compensated),
        "{saga:#?}"
    );
    let step = saga.state.step("loop").context("the step")?;
    ensure!(
        step.status == StepStatus::Compensated
            && step.attempts == 2
            && step.compensation_attempts == 1,
        "{step:?}"
    );
    let calls = shop.registry.stats("spinner").context("stats")?.invocations;
    ensure!(
        calls == 3,
        "two executes and one compensate, no execute to find out: {calls}"
    );
    ensure!(shop.payments.requests() == 0);
    shop.expect_stock(product, 3).await
}
