//! The order-fulfilment saga, run in process against the real plugin
//! components and fake payment and shipping providers: the happy path and
//! every edge case of the design documents, on SQLite and (with
//! `COMMERCE_TEST_DATABASE_URL`) Postgres. Crashes and several processes are
//! in `saga_crash.rs`.

#[macro_use]
mod support;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use chrono::Utc;
use commerce_kernel::commerce::{
    Cancellation, CommandContext, CommandError, Commerce, NewProduct, PlaceOrderInput, Sagas,
};
use commerce_kernel::domain::DomainError;
use commerce_kernel::domain::inventory::Inventory;
use commerce_kernel::domain::money::{Currency, Money};
use commerce_kernel::domain::order::{Address, Order, OrderStatus};
use commerce_kernel::domain::saga::{
    ORDER_FULFILMENT, Saga, SagaDefinition, SagaEvent, SagaStatus, StepAction, StepDefinition,
    StepRetry, StepStatus,
};
use commerce_kernel::event_store::repository::encode;
use commerce_kernel::event_store::repository::{AggregateRepository, Loaded};
use commerce_kernel::event_store::{AppendRequest, StreamAppend};
use commerce_kernel::sagas::runner::{RunnerSettings, SagaRunner};
use commerce_kernel::sagas::{Committed, InstanceUpdate};
use commerce_plugin_artifacts as artifacts;
use commerce_plugin_host::{EngineConfig, PluginRegistry, sha256_hex};
use support::fakes::{FakePayments, FakeShipping};
use support::{TestDatabase, run_suite};
use uuid::Uuid;

fn main() {
    run_suite(&cases![
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
    ]);
}

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
    _stop: tokio::sync::watch::Sender<bool>,
}

async fn shop(db: &TestDatabase) -> anyhow::Result<Shop> {
    let payments = FakePayments::start().await;
    let shipping = FakeShipping::start().await;
    let plugins = tempfile::tempdir()?;
    let registry = Arc::new(PluginRegistry::open(
        plugins.path(),
        EngineConfig {
            max_concurrent_invocations: 32,
            cache_dir: Some(cache_dir()),
        },
    )?);
    let grant = |url: String, address: std::net::SocketAddr| {
        format!("allowed_hosts = [\"{address}\"]\n[config]\nbase_url = \"{url}\"")
    };
    install(
        &registry,
        "payment",
        "1.0.0",
        "payment",
        artifacts::PAYMENT_HTTP,
        &grant(payments.base_url(), payments.address),
    )?;
    install(
        &registry,
        "shipping",
        "1.0.0",
        "shipping",
        artifacts::SHIPPING_HTTP,
        &grant(shipping.base_url(), shipping.address),
    )?;

    let commerce = Commerce::new(db.event_store(), db.database.view_store());
    let sagas = Sagas::new(commerce.clone(), db.database.saga_store());
    sagas
        .define(ORDER_FULFILMENT, definition(None), &context())
        .await?;
    let runner = Arc::new(SagaRunner::new(
        sagas.clone(),
        Arc::clone(&registry),
        RunnerSettings {
            node_id: format!("test-{}", Uuid::now_v7()),
            lease: Duration::from_secs(5),
            poll_interval: Duration::from_millis(20),
            max_concurrent: 16,
            pause_at: Default::default(),
        },
    ));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(runner.run(stopped));
    Ok(Shop {
        commerce,
        sagas,
        registry,
        payments,
        shipping,
        _plugins: plugins,
        _stop: stop,
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
        self.wait_for(order_id, |saga| {
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
        let deadline = tokio::time::Instant::now() + SETTLE;
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
        reason.contains("payment"),
        "reason names the step: {reason}"
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
    ensure!(
        order
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("insufficient_stock"),
        "{order:?}"
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
    let cancelled = shop
        .sagas
        .cancel_order(in_flight, "customer changed their mind", &context())
        .await?;
    ensure!(matches!(cancelled, Cancellation::Requested(_)));
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
    // A step after payment that always fails transiently (forward, and when
    // compensation asks it what it did).
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
            "fail-transient",
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
    let order_id = shop.order(vec![(product, 1)], "tok_visa", "DE").await?;

    let parked = shop.settled(order_id).await?;
    ensure!(
        parked.state.status == Some(SagaStatus::Parked),
        "{parked:#?}"
    );
    ensure!(
        parked.state.current_step().map(|s| s.name()) == Some("fail-transient"),
        "{parked:#?}"
    );
    ensure!(
        shop.payments(order_id) == [("captured".to_string(), false)],
        "the refund waits behind the parked step"
    );
    let counts = shop.sagas.store().count_by_status().await?;
    ensure!(counts.contains(&(SagaStatus::Parked, 1)), "{counts:?}");

    // The operator fixes the plugin and retries: compensation goes on.
    install(
        &shop.registry,
        "flaky",
        "2.0.0",
        "saga-step",
        artifacts::ORDER_LIMIT,
        "",
    )?;
    let saga_id = Saga::id_for(ORDER_FULFILMENT, order_id);
    shop.sagas.retry(saga_id, &context()).await?;
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
    // unknown, so compensation asks it again (still failing): parked.
    let parked = shop.settled(order_id).await?;
    ensure!(
        parked.state.status == Some(SagaStatus::Parked),
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

    // The provider recovers; the retried compensation learns the outcome
    // (asking charges now) and refunds it: a charge and its refund.
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
        shop.payments(order_id) == [("refunded".to_string(), true)],
        "{:?}",
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
            },
            &context(),
        )
        .await?;
    let saga_id = sagas.start_for_order(order.id, &context()).await?;
    ensure!(
        sagas.start_for_order(order.id, &context()).await? == saga_id,
        "one saga per order"
    );

    let now = Utc::now();
    let first = store
        .claim("runner-a", now, now + chrono::Duration::seconds(10), 10)
        .await?;
    ensure!(first.len() == 1 && first[0].saga_id == saga_id, "{first:?}");
    let again = store
        .claim("runner-b", now, now + chrono::Duration::seconds(10), 10)
        .await?;
    ensure!(again.is_empty(), "a held lease is not claimed twice");

    // Runner A pauses past its lease; runner B takes the saga over.
    let later = now + chrono::Duration::seconds(11);
    let taken = store
        .claim("runner-b", later, later + chrono::Duration::seconds(10), 10)
        .await?;
    ensure!(
        taken.len() == 1 && taken[0].fencing_token > first[0].fencing_token,
        "{taken:?}"
    );

    let loaded = sagas.load(saga_id).await?;
    let event = SagaEvent::StepStarted {
        step: "reserve-inventory".into(),
        phase: commerce_kernel::domain::saga::Phase::Forward,
        attempt: 1,
        at: Utc::now(),
    };
    let write = |claim_token| {
        let request = AppendRequest {
            streams: vec![StreamAppend {
                aggregate_id: saga_id,
                aggregate_type: "saga".into(),
                expected_version: loaded.version,
                events: vec![encode(&event).expect("encodes")],
            }],
            metadata: Default::default(),
            idempotency_key: None,
        };
        let update = InstanceUpdate {
            saga_id,
            status: SagaStatus::Running,
            current_step: Some("reserve-inventory".into()),
            version: loaded.version + 1,
            next_run_at: Some(Utc::now()),
            now: Utc::now(),
        };
        let claim = commerce_kernel::sagas::Claim {
            saga_id,
            fencing_token: claim_token,
        };
        let store = Arc::clone(&store);
        async move { store.commit(Some(claim), update, request).await }
    };
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
    Ok(())
}
