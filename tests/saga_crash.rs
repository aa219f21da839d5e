//! The saga across real kernel processes: an order placed through GraphQL
//! reaches CONFIRMED through the plugins; a kernel killed with SIGKILL at
//! each step boundary is restarted and every saga still ends CONFIRMED or
//! fully compensated, with exactly one charge (or a charge and its refund)
//! per order in the fake provider's ledger and the stock consistent; and two
//! kernels sharing Postgres, one killed mid-payment, finish every saga.
//!
//! Kernels stop at a step boundary through `COMMERCE_TEST_PAUSE_AT` (a
//! fault hook of test builds): the runner announces the point on stdout and
//! waits there forever, and the test kills the process at that moment.
//!
//! Also here, because it needs a kernel process of its own: plugins that
//! spin until their limits do not hold up the kernel's other requests.

#[macro_use]
mod support;

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use commerce_kernel::auth::{AuthConfig, Authenticator, KeySource, Role};
use commerce_kernel::domain::inventory::Inventory;
use commerce_kernel::event_store::repository::AggregateRepository;
use serde_json::{Value, json};
use support::kernel::{TEST_JWT_SECRET, TEST_METRICS_TOKEN};
use support::shop::{self, AdminClient, Shop};
use support::{TestDatabase, run_suite_except};
use uuid::Uuid;

const BINARY: &str = env!("CARGO_BIN_EXE_commerce-kernel");
/// Longest a kernel may take to start, and a saga to settle.
const START: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_secs(40);

fn main() {
    // SQLite is one process's embedded store: several kernels need Postgres.
    run_suite_except(
        &cases![
            an_order_placed_through_graphql_reaches_confirmed_through_the_plugins,
            a_kernel_killed_at_each_step_boundary_finishes_every_saga_after_restart,
            two_kernels_share_the_sagas_and_one_takes_over_when_the_other_dies,
            spinning_plugins_do_not_hold_up_other_requests,
            a_charge_unrecorded_at_a_kill_is_refunded_not_forgotten,
        ],
        &["two_kernels_share_the_sagas_and_one_takes_over_when_the_other_dies"],
    );
}

/// A kernel process. Killed (SIGKILL) when dropped.
struct Kernel {
    child: Child,
    address: String,
    lines: std::sync::Mutex<Receiver<String>>,
    http: reqwest::Client,
}

impl Drop for Kernel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What every kernel of a test shares: the database, the plugin directory.
struct Cluster {
    database_url: String,
    plugins: tempfile::TempDir,
    data: tempfile::TempDir,
}

impl Cluster {
    fn new(db: &TestDatabase) -> anyhow::Result<Self> {
        Ok(Cluster {
            database_url: db.url(),
            plugins: tempfile::tempdir()?,
            data: tempfile::tempdir()?,
        })
    }

    /// Starts a kernel; `pause_at` stops its saga runner at that point.
    async fn start(&self, pause_at: Option<&str>) -> anyhow::Result<Kernel> {
        self.start_with_plugins(pause_at, self.plugins.path()).await
    }

    /// A kernel with a plugin directory of its own (`plugins`).
    async fn start_with_plugins(
        &self,
        pause_at: Option<&str>,
        plugins: &std::path::Path,
    ) -> anyhow::Result<Kernel> {
        let mut command = Command::new(BINARY);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("COMMERCE_DATABASE_URL", &self.database_url)
            .env("COMMERCE_JWT_SECRET", TEST_JWT_SECRET)
            .env("COMMERCE_METRICS_TOKEN", TEST_METRICS_TOKEN)
            .env("COMMERCE_DATA_DIR", self.data.path())
            .env("COMMERCE_PLUGINS_DIR", plugins)
            // The test installs the plugins it crashes in.
            .env("COMMERCE_DEFAULT_PLUGINS", "false")
            .env("COMMERCE_LISTEN_ADDR", "127.0.0.1:0")
            .env("COMMERCE_SAGA_LEASE_MS", "1000")
            .env("COMMERCE_SAGA_POLL_MS", "50")
            .env("COMMERCE_MAX_REQUEST_BYTES", "33554432")
            .env("COMMERCE_LOG", "info,sqlx=warn")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(point) = pause_at {
            command.env("COMMERCE_TEST_PAUSE_AT", point);
        }
        let mut child = command.spawn().context("start the kernel")?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let (lines_tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines_tx.send(line);
            }
        });
        let mut kernel = Kernel {
            child,
            address: String::new(),
            lines: std::sync::Mutex::new(lines),
            http: reqwest::Client::new(),
        };
        let line = kernel.wait_for_line("listening on http://", START).await?;
        kernel.address = line
            .split("listening on http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .context("address")?
            .to_string();
        Ok(kernel)
    }
}

impl Kernel {
    /// Waits (without blocking the runtime) for a stdout line containing `text`.
    async fn wait_for_line(&mut self, text: &str, limit: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            let next = self
                .lines
                .lock()
                .map_err(|_| anyhow::anyhow!("line reader poisoned"))?
                .try_recv();
            match next {
                Ok(line) if line.contains(text) => return Ok(line),
                Ok(_) => continue,
                Err(TryRecvError::Disconnected) => {
                    bail!(
                        "the kernel exited before printing {text:?}: {:?}",
                        self.child.try_wait()
                    )
                }
                Err(TryRecvError::Empty) if Instant::now() > deadline => {
                    bail!("the kernel never printed {text:?}")
                }
                Err(TryRecvError::Empty) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// SIGKILL: no shutdown, no lease given back.
    /// Waits until this process runs an active version of each plugin.
    async fn wait_for_plugins(&self, names: &[&str]) -> anyhow::Result<()> {
        let deadline = Instant::now() + START;
        loop {
            let body = self
                .graphql(
                    "{ plugins(first: 50) { edges { node { name activeVersion { version } } } } }",
                    json!({}),
                )
                .await?;
            let active: Vec<&str> = body["data"]["plugins"]["edges"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|edge| !edge["node"]["activeVersion"].is_null())
                .filter_map(|edge| edge["node"]["name"].as_str())
                .collect();
            if names.iter().all(|name| active.contains(name)) {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "plugins never active: {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How long `/health` takes to answer.
    async fn time_health(&self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let response = self
            .http
            .get(format!("http://{}/health", self.address))
            .send()
            .await?;
        ensure!(response.status() == 200, "health: {}", response.status());
        Ok(started.elapsed())
    }

    fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    async fn graphql(&self, query: &str, variables: Value) -> anyhow::Result<Value> {
        let auth = Authenticator::open(&AuthConfig {
            keys: KeySource::Secret(TEST_JWT_SECRET.into()),
            issuer: "commerce-kernel".into(),
            audience: "commerce-kernel".into(),
            guest_secret: None,
        })
        .await?;
        let admin = auth.mint("crash-test", Role::Admin, Duration::from_secs(600))?;
        let response = self
            .http
            .post(format!("http://{}/graphql", self.address))
            .bearer_auth(admin)
            .json(&json!({ "query": query, "variables": variables }))
            .send()
            .await?;
        ensure!(
            response.status() == 200,
            "GraphQL answered {}",
            response.status()
        );
        let body: Value = response.json().await?;
        ensure!(body.get("errors").is_none(), "GraphQL errors: {body}");
        Ok(body)
    }
}

impl AdminClient for Kernel {
    async fn admin_graphql(&self, query: &str, variables: Value) -> anyhow::Result<Value> {
        self.graphql(query, variables).await
    }
}

/// A cart with one unit, checked out through `placeOrder`; the order's id.
async fn place_order(
    kernel: &Kernel,
    shop: &Shop,
    payment_method: &str,
    country: &str,
) -> anyhow::Result<Uuid> {
    let cart = kernel
        .mutate(
            "createCart",
            "mutation ($product: UUID!) { createCart(input: { sessionId: \"s\", items: [{ productId: $product, quantity: 1 }] }) { cart { id } errors { code message } } }",
            json!({ "product": shop.product }),
        )
        .await?;
    let placed = kernel
        .mutate(
            "placeOrder",
            "mutation ($cart: UUID!, $method: String!, $country: String!) { placeOrder(input: { cartId: $cart, paymentMethod: $method, idempotencyKey: \"k\",
               shippingAddress: { name: \"Ada\", line1: \"1 Main St\", city: \"Berlin\", postalCode: \"10115\", country: $country } })
               { order { id } errors { field code message } } }",
            json!({ "cart": cart["cart"]["id"], "method": payment_method, "country": country }),
        )
        .await?;
    Ok(serde_json::from_value(placed["order"]["id"].clone())?)
}

const ORDER: &str = "query ($id: UUID!) { order(id: $id) { status reason
    saga { id status currentStep steps { name status attempts compensationAttempts error } } } }";

/// Waits until the order's saga has ended; the order as GraphQL shows it then.
async fn settled(kernel: &Kernel, order_id: Uuid) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let body = kernel.graphql(ORDER, json!({ "id": order_id })).await?;
        let order = body["data"]["order"].clone();
        let saga = order["saga"]["status"].as_str().unwrap_or_default();
        let status = order["status"].as_str().unwrap_or_default();
        // The saga ends in the same write as the order's last event; the
        // order view follows the log shortly after.
        if matches!(saga, "COMPLETED" | "COMPENSATED" | "PARKED")
            && matches!(status, "CONFIRMED" | "FAILED" | "CANCELLED")
        {
            return Ok(order);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("order {order_id} did not settle: {order}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The provider's payments for the order, as (status, refunded).
fn payments(shop: &Shop, order_id: Uuid) -> Vec<(String, bool)> {
    shop.payments
        .payments_for(&order_id.to_string())
        .into_iter()
        .map(|p| (p.status, p.refunded))
        .collect()
}

/// Stock holds exactly the live reservations, and on hand dropped by the
/// confirmed units only.
async fn check_stock(
    db: &TestDatabase,
    shop: &Shop,
    initial: u32,
    confirmed: u32,
) -> anyhow::Result<()> {
    let stock = AggregateRepository::<Inventory>::new(db.event_store())
        .load(Inventory::stream_id(shop.product))
        .await?
        .state;
    let live: u32 = stock.reservations.values().map(|r| r.quantity).sum();
    ensure!(
        stock.reserved == live && live == 0,
        "reserved {} vs live reservations {live}",
        stock.reserved
    );
    ensure!(
        stock.on_hand == initial - confirmed,
        "on hand {} after {confirmed} of {initial} sold",
        stock.on_hand
    );
    Ok(())
}

async fn an_order_placed_through_graphql_reaches_confirmed_through_the_plugins(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let cluster = Cluster::new(&db)?;
    let kernel = cluster.start(None).await?;
    let shop = shop::open(&kernel, 3).await?;
    let order_id = place_order(&kernel, &shop, "tok_visa", "DE").await?;

    let order = settled(&kernel, order_id).await?;
    ensure!(order["status"] == "CONFIRMED", "{order}");
    let saga = &order["saga"];
    ensure!(
        saga["status"] == "COMPLETED" && saga["currentStep"].is_null(),
        "{saga}"
    );
    let steps: Vec<(String, String, u64)> = saga["steps"]
        .as_array()
        .context("steps")?
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or_default().to_string(),
                s["status"].as_str().unwrap_or_default().to_string(),
                s["attempts"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    let expected: Vec<(String, String, u64)> =
        ["reserve-inventory", "payment", "shipment", "confirm"]
            .iter()
            .map(|name| (name.to_string(), "SUCCEEDED".to_string(), 1))
            .collect();
    ensure!(steps == expected, "{steps:?}");
    ensure!(payments(&shop, order_id) == [("captured".to_string(), false)]);
    ensure!(shop.shipping.shipments().len() == 1);

    // The admin views: the list by order, the saga by id, its events.
    let listed = kernel
        .graphql(
            "query ($id: UUID!) { sagas(correlationId: $id) { edges { node { id status currentStep } } } }",
            json!({ "id": order_id }),
        )
        .await?;
    let nodes = listed["data"]["sagas"]["edges"]
        .as_array()
        .context("edges")?;
    ensure!(
        nodes.len() == 1
            && nodes[0]["node"]["id"] == saga["id"]
            && nodes[0]["node"]["status"] == "COMPLETED",
        "{listed}"
    );
    let events = kernel
        .graphql(
            "query ($id: UUID!) { events(correlationId: $id, first: 100) { edges { node { aggregateType eventType actor } } } }",
            json!({ "id": order_id }),
        )
        .await?;
    let saga_events: Vec<&str> = events["data"]["events"]["edges"]
        .as_array()
        .context("edges")?
        .iter()
        .filter(|e| e["node"]["aggregateType"] == "saga")
        .filter_map(|e| e["node"]["eventType"].as_str())
        .collect();
    ensure!(
        saga_events.first() == Some(&"Started")
            && saga_events.last() == Some(&"Completed")
            && saga_events.iter().filter(|e| **e == "StepStarted").count() == 4,
        "{saga_events:?}"
    );

    // Finished: neither cancelled nor compensated any more.
    let cancel = kernel
        .graphql(
            "mutation ($id: UUID!) { cancelOrder(id: $id, reason: \"late\") { errors { code } } }",
            json!({ "id": order_id }),
        )
        .await?;
    ensure!(
        cancel["data"]["cancelOrder"]["errors"][0]["code"] == "ILLEGAL_TRANSITION",
        "{cancel}"
    );
    let compensate = kernel
        .graphql(
            "mutation ($id: UUID!) { compensateSaga(id: $id, reason: \"late\") { errors { code } } }",
            json!({ "id": saga["id"] }),
        )
        .await?;
    ensure!(
        compensate["data"]["compensateSaga"]["errors"][0]["code"] == "ILLEGAL_TRANSITION",
        "{compensate}"
    );
    check_stock(&db, &shop, 3, 1).await?;
    kernel.kill()
}

/// A pause point, the payment method and country that lead through it, and
/// how the order must end.
const BOUNDARIES: [(&str, &str, &str, &str); 5] = [
    ("before-call:payment", "tok_visa", "DE", "CONFIRMED"),
    ("after-call:payment", "tok_visa", "DE", "CONFIRMED"),
    ("after-call:shipment", "tok_visa", "DE", "CONFIRMED"),
    // The carrier refuses country XX, so the payment is refunded.
    ("before-compensation:payment", "tok_visa", "XX", "FAILED"),
    ("after-compensation:payment", "tok_visa", "XX", "FAILED"),
];

async fn a_kernel_killed_at_each_step_boundary_finishes_every_saga_after_restart(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let cluster = Cluster::new(&db)?;
    let first = cluster.start(None).await?;
    let shop = shop::open(&first, 10).await?;
    first.kill()?;

    let mut confirmed: u32 = 0;
    for (point, method, country, outcome) in BOUNDARIES {
        let mut doomed = cluster.start(Some(point)).await?;
        let order_id = place_order(&doomed, &shop, method, country).await?;
        doomed
            .wait_for_line(&format!("saga paused at {point}"), SETTLE)
            .await
            .with_context(|| format!("reaching {point}"))?;
        doomed.kill()?;

        let restarted = cluster.start(None).await?;
        let order = settled(&restarted, order_id)
            .await
            .with_context(|| format!("after a kill at {point}"))?;
        ensure!(order["status"] == outcome, "{point}: {order}");
        let ledger = payments(&shop, order_id);
        if outcome == "CONFIRMED" {
            confirmed += 1;
            ensure!(
                ledger == [("captured".to_string(), false)],
                "{point}: exactly one charge: {ledger:?}"
            );
        } else {
            ensure!(order["saga"]["status"] == "COMPENSATED", "{point}: {order}");
            ensure!(
                ledger == [("refunded".to_string(), true)],
                "{point}: one charge, refunded once: {ledger:?}"
            );
        }
        restarted.kill()?;
    }
    let shipped = shop.shipping.shipments().len();
    ensure!(
        shipped == confirmed as usize,
        "one shipment per confirmed order: {shipped}"
    );
    check_stock(&db, &shop, 10, confirmed).await
}

async fn two_kernels_share_the_sagas_and_one_takes_over_when_the_other_dies(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    const ORDERS: usize = 6;
    let cluster = Cluster::new(&db)?;
    let mut doomed = cluster.start(Some("after-call:payment")).await?;
    let survivor = cluster.start(None).await?;
    let shop = shop::open(&survivor, 20).await?;
    // The doomed kernel follows the activations within seconds; until then
    // it would give every saga to the survivor.
    doomed.wait_for_plugins(&["payment", "shipping"]).await?;

    // Orders arrive at both; the doomed kernel stops mid-payment on any it takes.
    let mut orders = Vec::new();
    for index in 0..ORDERS {
        let kernel = if index % 2 == 0 { &doomed } else { &survivor };
        orders.push(place_order(kernel, &shop, "tok_visa", "DE").await?);
    }
    doomed
        .wait_for_line("saga paused at after-call:payment", SETTLE)
        .await?;
    doomed.kill()?;

    for order_id in &orders {
        let order = settled(&survivor, *order_id).await?;
        ensure!(order["status"] == "CONFIRMED", "{order}");
        let ledger = payments(&shop, *order_id);
        ensure!(
            ledger == [("captured".to_string(), false)],
            "one charge for {order_id}: {ledger:?}"
        );
    }
    ensure!(shop.shipping.shipments().len() == ORDERS);
    check_stock(&db, &shop, 20, ORDERS as u32).await?;
    survivor.kill()
}

async fn spinning_plugins_do_not_hold_up_other_requests(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    /// The slowest answer allowed while the plugins spin.
    const ANSWER_WITHIN: Duration = Duration::from_millis(100);
    const SPINNING: usize = 4;
    let cluster = Cluster::new(&db)?;
    let kernel = cluster.start(None).await?;
    let shop = shop::open(&kernel, 10).await?;
    // A pure step that spins until its limits: 10^10 fuel, 5 s.
    kernel
        .mutate(
            "installPlugin",
            "mutation ($input: InstallPluginInput!) { installPlugin(input: $input) { errors { field code message } } }",
            json!({ "input": shop::upload(
                "spinner",
                "saga-step",
                commerce_plugin_artifacts::MISBEHAVING,
                "[limits]\nfuel = 10000000000\ntimeout_ms = 5000",
            )? }),
        )
        .await?;
    kernel
        .mutate(
            "activatePlugin",
            "mutation { activatePlugin(input: { name: \"spinner\", version: \"1.0.0\" }) { errors { code message } } }",
            json!({}),
        )
        .await?;
    let retry = shop::RETRY;
    let spin = "{ maxAttempts: 1, initialBackoffMs: 50, maxBackoffMs: 200, timeoutMs: 6000 }";
    let define = format!(
        "mutation {{ defineSaga(input: {{ timeoutMs: 60000, compensationRetry: {retry}, steps: [
            {{ name: \"reserve-inventory\", kind: RESERVE_INVENTORY, retry: {retry} }},
            {{ name: \"loop\", kind: CUSTOM, plugin: \"spinner\", retry: {spin} }},
            {{ name: \"payment\", kind: PAYMENT, plugin: \"payment\", retry: {retry} }},
            {{ name: \"shipment\", kind: SHIPMENT, plugin: \"shipping\", retry: {retry} }},
            {{ name: \"confirm\", kind: CONFIRM, retry: {retry} }} ] }})
          {{ definition {{ revision }} errors {{ field code message }} }} }}"
    );
    kernel.mutate("defineSaga", &define, json!({})).await?;
    let mut orders = Vec::new();
    for _ in 0..SPINNING {
        orders.push(place_order(&kernel, &shop, "tok_visa", "DE").await?);
    }
    let spinning = async |kernel: &Kernel, order_id: Uuid| -> anyhow::Result<bool> {
        let body = kernel.graphql(ORDER, json!({ "id": order_id })).await?;
        let steps = body["data"]["order"]["saga"]["steps"].clone();
        Ok(steps
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["name"] == "loop" && s["status"] == "RUNNING"))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut all = true;
        for order_id in &orders {
            all &= spinning(&kernel, *order_id).await?;
        }
        if all {
            break;
        }
        ensure!(Instant::now() < deadline, "the steps never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The calls are in their wasm now (the step was recorded first). While
    // they spin, the kernel answers.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        slowest = slowest.max(kernel.time_health().await?);
        let started = Instant::now();
        kernel
            .graphql(
                "{ products(first: 5) { edges { node { id } } } }",
                json!({}),
            )
            .await?;
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for order_id in &orders {
        ensure!(
            spinning(&kernel, *order_id).await?,
            "still spinning after the measurements, so they overlapped"
        );
    }
    eprintln!("slowest answer while {SPINNING} plugins spun: {slowest:?}");
    ensure!(
        slowest < ANSWER_WITHIN,
        "/health and a query answered within {ANSWER_WITHIN:?} while {SPINNING} plugins spun: slowest {slowest:?}"
    );

    // Each step ran out of time once and was undone by its `compensate`,
    // never executed again to find out what it did: it cannot reach out.
    for order_id in &orders {
        let order = settled(&kernel, *order_id).await?;
        ensure!(
            order["status"] == "FAILED" && order["saga"]["status"] == "COMPENSATED",
            "{order}"
        );
    }
    let metrics = kernel
        .http
        .get(format!("http://{}/metrics", kernel.address))
        .bearer_auth(TEST_METRICS_TOKEN)
        .send()
        .await?
        .text()
        .await?;
    let calls = metrics
        .lines()
        .find(|line| line.starts_with("commerce_plugin_invocations_total{plugin=\"spinner\"}"))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|count| count.parse::<u64>().ok());
    ensure!(
        calls == Some(2 * SPINNING as u64),
        "one execute and one compensate each: {calls:?}"
    );
    kernel.kill()
}

async fn a_charge_unrecorded_at_a_kill_is_refunded_not_forgotten(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let cluster = Cluster::new(&db)?;
    let first = cluster.start(None).await?;
    let shop = shop::open(&first, 3).await?;
    first.kill()?;

    // Killed right after the provider charged, before the outcome was
    // recorded.
    let mut doomed = cluster.start(Some("after-call:payment")).await?;
    let order_id = place_order(&doomed, &shop, "tok_visa", "DE").await?;
    doomed
        .wait_for_line("saga paused at after-call:payment", SETTLE)
        .await?;
    doomed.kill()?;
    ensure!(payments(&shop, order_id) == [("captured".to_string(), false)]);

    // A kernel whose plugin directory lacks the plugins (so none is active
    // on it) takes the saga once the lease lapses, and the order is cancelled.
    let empty = tempfile::tempdir()?;
    let without = cluster.start_with_plugins(None, empty.path()).await?;
    without
        .graphql(
            "mutation ($id: UUID!) { cancelOrder(id: $id, reason: \"changed my mind\") { errors { code } } }",
            json!({ "id": order_id }),
        )
        .await?;
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let order = without.graphql(ORDER, json!({ "id": order_id })).await?;
        let saga = &order["data"]["order"]["saga"];
        // It must not conclude anything it does not know.
        ensure!(
            saga["status"] != "COMPENSATED",
            "compensated without knowing: {order}"
        );
        if saga["status"] == "COMPENSATING" {
            break;
        }
        ensure!(tokio::time::Instant::now() < deadline, "{order}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let order = without.graphql(ORDER, json!({ "id": order_id })).await?;
    ensure!(
        order["data"]["order"]["saga"]["status"] == "COMPENSATING",
        "still waiting for a process with the plugin: {order}"
    );
    ensure!(payments(&shop, order_id) == [("captured".to_string(), false)]);
    without.kill()?;

    // A kernel with the plugins finds the charge and refunds it.
    let with = cluster.start(None).await?;
    let order = settled(&with, order_id).await?;
    ensure!(
        order["status"] == "CANCELLED" && order["saga"]["status"] == "COMPENSATED",
        "{order}"
    );
    ensure!(
        payments(&shop, order_id) == [("refunded".to_string(), true)],
        "{:?}",
        payments(&shop, order_id)
    );
    check_stock(&db, &shop, 3, 0).await?;
    with.kill()
}
