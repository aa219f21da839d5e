//! The plugins the kernel ships with (`kernel/src/commerce/bundled_plugins.rs`):
//! the committed components are what their sources build, a fresh shop
//! sells with them, and a shop whose admin chose plugins is left alone.
//! Runs on every backend (see support/mod.rs).

#[macro_use]
mod support;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use commerce_kernel::commerce::bundled_plugins::{
    BUNDLED, FLAT_RATE_SHIPPING, MANUAL_PAYMENT, ORDER_LIMIT,
};
use commerce_kernel::config;
use serde_json::{Value, json};
use support::TestDatabase;
use support::kernel::RunningKernel;
use support::shop::{self, address, upload};
use uuid::Uuid;

/// Every version of a bundled component ever released, with its sha256. A
/// component whose bytes change needs a new version (a plugin directory
/// that holds the old bytes under the old version refuses new ones), and
/// then a line here.
const RELEASED: &[(&str, &str, &str)] = &[
    (
        "payment",
        "1.0.0+manual",
        "d61ed9db9790e9d06783de9b83edd42e54bb72b56d33551cbf866db8d0b5e491",
    ),
    (
        "shipping",
        "1.0.0+flat-rate",
        "e9c834140ace36973c77bc91f612a4dc51080a466f1998a8246348ea5d9db67a",
    ),
    (
        "order-limit",
        "1.0.0",
        "e0b555dc1a56b35cf41226bf1e506b33a7bbdfc9ae3cee621e757c1bc1edb226",
    ),
];

/// Set to write freshly built components over the committed ones.
const UPDATE: &str = "COMMERCE_UPDATE_BUNDLED_PLUGINS";

fn main() {
    support::run_trials(|| {
        let mut trials = vec![libtest_mimic::Trial::test(
            "bundled_components_are_what_their_sources_build",
            || {
                bundled_components_are_what_their_sources_build()
                    .map_err(|e| format!("{e:#}").into())
            },
        )];
        trials.extend(support::suite_trials(
            &cases![
                a_fresh_shop_confirms_its_first_order_with_the_bundled_plugins,
                the_test_payment_methods_fail_as_documented,
                a_destination_without_a_rate_is_refused_and_the_payment_refunded,
                kernels_starting_together_activate_each_default_once,
                a_shop_whose_admin_chose_a_payment_plugin_is_left_alone,
                a_start_that_stopped_half_way_is_completed_by_the_next,
                the_setting_turns_the_defaults_off,
            ],
            // One process owns an embedded database.
            &["kernels_starting_together_activate_each_default_once"],
        ));
        trials
    })
}

/// The committed components in `plugins/defaults` are byte for byte what
/// `plugins/guests` builds (the `commerce-plugin-artifacts` build, with its
/// paths remapped so every checkout builds the same bytes), and each
/// bundled version is one that was released with exactly these bytes.
fn bundled_components_are_what_their_sources_build() -> anyhow::Result<()> {
    let built = [
        (&MANUAL_PAYMENT, commerce_plugin_artifacts::MANUAL_PAYMENT),
        (
            &FLAT_RATE_SHIPPING,
            commerce_plugin_artifacts::FLAT_RATE_SHIPPING,
        ),
        (&ORDER_LIMIT, commerce_plugin_artifacts::ORDER_LIMIT),
    ];
    let update = std::env::var_os(UPDATE).is_some();
    let defaults = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/defaults");
    let mut stale = Vec::new();
    for (bundled, path) in built {
        let fresh = std::fs::read(path).with_context(|| path.to_string())?;
        if fresh != bundled.component {
            if update {
                std::fs::write(defaults.join(bundled.file), &fresh)?;
            }
            stale.push(bundled.file);
        }
    }
    ensure!(
        stale.is_empty(),
        "plugins/defaults/{{{}}} differ from what plugins/guests builds{}",
        stale.join(", "),
        if update {
            " (now overwritten: build again, and give each a new version)"
        } else {
            "; if the sources changed on purpose, run `COMMERCE_UPDATE_BUNDLED_PLUGINS=1 \
             cargo test --test bundled_plugins`, give each a new version in \
             kernel/src/commerce/bundled_plugins.rs and list it in tests/bundled_plugins.rs"
        }
    );
    for bundled in BUNDLED {
        let sha256 = commerce_plugin_host::sha256_hex(bundled.component);
        ensure!(
            RELEASED.contains(&(bundled.name, bundled.version, sha256.as_str())),
            "{}@{} with sha256 {sha256} was never released: a changed component needs a new \
             version, listed in RELEASED",
            bundled.name,
            bundled.version
        );
    }
    Ok(())
}

const DEFAULTS_ON: &[(&str, &str)] = &[(config::DEFAULT_PLUGINS, "true")];

/// A product in `currency` with `stock` units; its id.
async fn product(kernel: &RunningKernel, currency: &str, stock: i64) -> anyhow::Result<Uuid> {
    let created = kernel
        .graphql(
            "mutation ($sku: String!, $currency: String!) { createProduct(input: { sku: $sku, name: \"Teapot\", price: { amount: \"19.90\", currency: $currency } }) { product { id } errors { code message } } }",
            json!({ "sku": format!("SKU-{}", Uuid::now_v7().simple()), "currency": currency }),
        )
        .await?;
    let id: Uuid =
        serde_json::from_value(created["data"]["createProduct"]["product"]["id"].clone())
            .with_context(|| created.to_string())?;
    let adjusted = kernel
        .graphql(
            "mutation ($id: UUID!, $delta: Int!) { adjustInventory(input: { productId: $id, delta: $delta, reason: \"stock\" }) { errors { code message } } }",
            json!({ "id": id, "delta": stock }),
        )
        .await?;
    ensure!(
        adjusted["data"]["adjustInventory"]["errors"] == json!([]),
        "{adjusted}"
    );
    Ok(id)
}

/// A customer's order of one `product`, paid with `payment_method` and
/// shipped to `country`, followed to its final status; the order's id and
/// that status.
async fn buy(
    kernel: &RunningKernel,
    product: Uuid,
    payment_method: &str,
    country: &str,
) -> anyhow::Result<(Uuid, String)> {
    let token = kernel.customer_token(Uuid::now_v7())?;
    let call = |query: &'static str, variables: Value| {
        let token = token.clone();
        async move {
            let (status, body) = kernel.graphql_as(Some(&token), query, variables).await?;
            ensure!(status == 200, "{status}: {body}");
            anyhow::Ok(body)
        }
    };
    let cart = call(
        "mutation ($input: CreateCartInput!) { createCart(input: $input) { cart { id } errors { code message } } }",
        json!({ "input": { "items": [{ "productId": product, "quantity": 1 }] } }),
    )
    .await?;
    let cart_id = cart["data"]["createCart"]["cart"]["id"]
        .as_str()
        .with_context(|| cart.to_string())?
        .to_string();
    let placed = call(
        "mutation ($input: PlaceOrderInput!) { placeOrder(input: $input) { order { id } errors { code message } } }",
        json!({ "input": { "cartId": cart_id, "paymentMethod": payment_method, "shippingAddress": address(country) } }),
    )
    .await?;
    let order_id: Uuid =
        serde_json::from_value(placed["data"]["placeOrder"]["order"]["id"].clone())
            .with_context(|| placed.to_string())?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let read = call(
            "query ($id: UUID!) { order(id: $id) { status } }",
            json!({ "id": order_id }),
        )
        .await?;
        let status = read["data"]["order"]["status"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if matches!(status.as_str(), "CONFIRMED" | "FAILED" | "CANCELLED") {
            return Ok((order_id, status));
        }
        if tokio::time::Instant::now() > deadline {
            bail!("order {order_id} is still {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The saga's steps of an order, as an admin sees them.
async fn steps(kernel: &RunningKernel, order_id: Uuid) -> anyhow::Result<Value> {
    let read = kernel
        .graphql(
            "query ($id: UUID!) { order(id: $id) { saga { steps { name status error output } } } }",
            json!({ "id": order_id }),
        )
        .await?;
    Ok(read["data"]["order"]["saga"]["steps"].clone())
}

/// The events of an order's saga, oldest first (`eventType`, `data`).
async fn saga_events(kernel: &RunningKernel, order_id: Uuid) -> anyhow::Result<Vec<Value>> {
    let saga = kernel
        .graphql(
            "query ($id: UUID!) { order(id: $id) { saga { id } } }",
            json!({ "id": order_id }),
        )
        .await?;
    let events = kernel
        .graphql(
            "query ($id: UUID!) { aggregateEvents(aggregateId: $id, first: 100) { edges { node { eventType data } } } }",
            json!({ "id": saga["data"]["order"]["saga"]["id"] }),
        )
        .await?;
    Ok(events["data"]["aggregateEvents"]["edges"]
        .as_array()
        .with_context(|| events.to_string())?
        .iter()
        .map(|edge| edge["node"].clone())
        .collect())
}

fn step<'a>(steps: &'a Value, name: &str) -> &'a Value {
    steps
        .as_array()
        .and_then(|steps| steps.iter().find(|s| s["name"] == name))
        .unwrap_or(&Value::Null)
}

/// `plugins` as the API lists them: name → (active version, installed versions).
async fn plugins(
    kernel: &RunningKernel,
) -> anyhow::Result<Vec<(String, Option<String>, Vec<String>)>> {
    let listed = kernel
        .graphql(
            "{ plugins { edges { node { name activeVersion { version } versions { version } } } } }",
            json!({}),
        )
        .await?;
    let plugins = listed["data"]["plugins"]["edges"]
        .as_array()
        .with_context(|| listed.to_string())?;
    Ok(plugins
        .iter()
        .map(|edge| {
            let plugin = &edge["node"];
            (
                plugin["name"].as_str().unwrap_or_default().to_string(),
                plugin["activeVersion"]["version"]
                    .as_str()
                    .map(str::to_string),
                plugin["versions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v["version"].as_str().map(str::to_string))
                    .collect(),
            )
        })
        .collect())
}

/// The plugin events in the log: (type, plugin name, version, actor).
async fn plugin_events(
    kernel: &RunningKernel,
) -> anyhow::Result<Vec<(String, String, String, String)>> {
    let read = kernel
        .graphql(
            "{ events(first: 100, aggregateType: \"plugin\") { edges { node { eventType data actor } } } }",
            json!({}),
        )
        .await?;
    let edges = read["data"]["events"]["edges"]
        .as_array()
        .with_context(|| read.to_string())?;
    Ok(edges
        .iter()
        .map(|edge| {
            let node = &edge["node"];
            let text = |value: &Value| value.as_str().unwrap_or_default().to_string();
            (
                text(&node["eventType"]),
                text(&node["data"]["name"]),
                text(&node["data"]["version"]),
                text(&node["actor"]),
            )
        })
        .collect())
}

fn activations(events: &[(String, String, String, String)], name: &str) -> usize {
    events
        .iter()
        .filter(|(kind, plugin, ..)| kind == "PluginActivated" && plugin == name)
        .count()
}

/// A fresh shop: nobody set up plugins, a product, an order, CONFIRMED.
/// The bundled payment and shipping plugins are active, recorded as
/// activated by `system`, and the order-limit step installed, not active.
async fn a_fresh_shop_confirms_its_first_order_with_the_bundled_plugins(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, DEFAULTS_ON).await?;
    let teapot = product(&kernel, "EUR", 3).await?;
    let (order_id, status) = buy(&kernel, teapot, "invoice", "DE").await?;
    ensure!(status == "CONFIRMED", "the first order ended {status}");

    let steps = steps(&kernel, order_id).await?;
    let payment = &step(&steps, "payment")["output"];
    ensure!(
        payment["status"] == "captured"
            && payment["amount"].as_str().and_then(|a| a.parse().ok())
                == Some(rust_decimal::Decimal::new(1990, 2))
            && payment["currency"] == "EUR"
            && payment["reference"]
                .as_str()
                .is_some_and(|r| r.starts_with("manual:")),
        "payment step: {steps}"
    );
    let shipment = &step(&steps, "shipment")["output"];
    ensure!(
        shipment["tracking_number"]
            .as_str()
            .is_some_and(|t| t.starts_with("FR") && t.len() == 18),
        "shipment step: {steps}"
    );

    let listed = plugins(&kernel).await?;
    let entry = |name: &str| listed.iter().find(|(n, ..)| n == name).cloned();
    ensure!(
        entry("payment").and_then(|e| e.1).as_deref() == Some(MANUAL_PAYMENT.version),
        "{listed:?}"
    );
    ensure!(
        entry("shipping").and_then(|e| e.1).as_deref() == Some(FLAT_RATE_SHIPPING.version),
        "{listed:?}"
    );
    let order_limit = entry("order-limit").context("order-limit is listed")?;
    ensure!(
        order_limit.1.is_none() && order_limit.2 == vec![ORDER_LIMIT.version.to_string()],
        "order-limit must be installed and inactive: {listed:?}"
    );

    let events = plugin_events(&kernel).await?;
    ensure!(
        activations(&events, "payment") == 1 && activations(&events, "shipping") == 1,
        "{events:?}"
    );
    ensure!(
        activations(&events, "order-limit") == 0
            && events
                .iter()
                .any(|(kind, name, ..)| kind == "PluginInstalled" && name == "order-limit"),
        "{events:?}"
    );
    ensure!(
        events.iter().all(|(.., actor)| actor == "system"),
        "the kernel's own activations are the system's: {events:?}"
    );

    // A process starting later changes nothing: the defaults are chosen now.
    let later = RunningKernel::join(&kernel, &db, DEFAULTS_ON).await?;
    ensure!(plugin_events(&later).await? == events);
    let (_, status) = buy(&later, teapot, "invoice", "FR").await?;
    ensure!(
        status == "CONFIRMED",
        "on the later process the order ended {status}"
    );
    later.stop().await?;
    kernel.stop().await
}

/// `test_decline` is declined at once and the order fails with its stock
/// released; `test_unavailable` is retried and then compensated.
async fn the_test_payment_methods_fail_as_documented(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, DEFAULTS_ON).await?;
    let teapot = product(&kernel, "EUR", 1).await?;
    let (declined, status) = buy(&kernel, teapot, "test_decline", "DE").await?;
    ensure!(status == "FAILED", "a declined payment ended {status}");
    let payment = step(&steps(&kernel, declined).await?, "payment").clone();
    ensure!(
        payment["error"]
            .as_str()
            .is_some_and(|e| e.contains("card_declined")),
        "the step says why: {payment}"
    );
    // The one unit is free again: the next order gets it.
    let (_, status) = buy(&kernel, teapot, "invoice", "DE").await?;
    ensure!(
        status == "CONFIRMED",
        "the released unit's order ended {status}"
    );

    // With test-sized retries, an unavailable provider is asked again with
    // the same key until the attempts run out, then the order fails.
    shop::define_saga(&kernel).await?;
    let kettle = product(&kernel, "EUR", 1).await?;
    let (unavailable, status) = buy(&kernel, kettle, "test_unavailable", "DE").await?;
    ensure!(
        status == "FAILED",
        "an unavailable provider's order ended {status}"
    );
    let failures: Vec<Value> = saga_events(&kernel, unavailable)
        .await?
        .into_iter()
        .filter(|node| {
            node["eventType"] == "StepFailed"
                && node["data"]["step"] == "payment"
                && node["data"]["phase"] == "forward"
        })
        .collect();
    ensure!(
        failures.len() == 4
            && failures.iter().all(|failure| {
                failure["data"]["error"]["code"] == "provider_unavailable"
                    && failure["data"]["error"]["retryable"] == true
            }),
        "retried until the attempts ran out: {failures:?}"
    );
    let (_, status) = buy(&kernel, kettle, "invoice", "DE").await?;
    ensure!(status == "CONFIRMED", "its unit was released: {status}");
    kernel.stop().await
}

/// A currency the rates do not cover: the shipment is refused, and the
/// payment the manual plugin took is refunded by the compensation.
async fn a_destination_without_a_rate_is_refused_and_the_payment_refunded(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, DEFAULTS_ON).await?;
    let franc_teapot = product(&kernel, "CHF", 1).await?;
    let (order_id, status) = buy(&kernel, franc_teapot, "invoice", "CH").await?;
    ensure!(status == "FAILED", "an order nobody ships ended {status}");
    let steps = steps(&kernel, order_id).await?;
    ensure!(
        step(&steps, "shipment")["error"]
            .as_str()
            .is_some_and(|e| e.contains("no_rate")),
        "{steps}"
    );
    ensure!(
        step(&steps, "payment")["status"] == "COMPENSATED",
        "{steps}"
    );
    // The compensation refunded the whole charge.
    let events = saga_events(&kernel, order_id).await?;
    let refunded = events
        .iter()
        .find(|node| node["eventType"] == "StepCompensated" && node["data"]["step"] == "payment")
        .with_context(|| format!("no compensation of the payment: {events:?}"))?;
    ensure!(
        refunded["data"]["output"]["refund"]
            .as_str()
            .is_some_and(|r| r.starts_with("manual:"))
            && refunded["data"]["output"]["amount"] == "19.9",
        "{refunded}"
    );
    kernel.stop().await
}

/// Two processes on one fresh database start together: each default is
/// activated once, and both run it.
async fn kernels_starting_together_activate_each_default_once(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let (first, second) = tokio::join!(
        RunningKernel::start(&db, DEFAULTS_ON),
        RunningKernel::start(&db, DEFAULTS_ON)
    );
    let (first, second) = (first?, second?);
    let events = plugin_events(&first).await?;
    ensure!(
        activations(&events, "payment") == 1 && activations(&events, "shipping") == 1,
        "{events:?}"
    );
    let teapot = product(&first, "EUR", 2).await?;
    for kernel in [&first, &second] {
        let (_, status) = buy(kernel, teapot, "invoice", "DE").await?;
        ensure!(status == "CONFIRMED", "ended {status}");
    }
    first.stop().await?;
    second.stop().await
}

/// An admin activated a payment plugin of their own (under another name):
/// a kernel starting later activates no bundled plugin.
async fn a_shop_whose_admin_chose_a_payment_plugin_is_left_alone(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, &[]).await?;
    let installed = kernel
        .graphql(
            "mutation ($input: InstallPluginInput!) { installPlugin(input: $input) { errors { code message } } }",
            json!({ "input": upload("my-psp", "payment", commerce_plugin_artifacts::MANUAL_PAYMENT, "")? }),
        )
        .await?;
    ensure!(
        installed["data"]["installPlugin"]["errors"] == json!([]),
        "{installed}"
    );
    let activated = kernel
        .graphql(
            "mutation { activatePlugin(input: { name: \"my-psp\", version: \"1.0.0\" }) { errors { code message } } }",
            json!({}),
        )
        .await?;
    ensure!(
        activated["data"]["activatePlugin"]["errors"] == json!([]),
        "{activated}"
    );

    let later = RunningKernel::join(&kernel, &db, DEFAULTS_ON).await?;
    let events = plugin_events(&later).await?;
    ensure!(
        events.iter().all(|(_, name, ..)| name == "my-psp"),
        "nothing but the admin's plugin: {events:?}"
    );
    let listed = plugins(&later).await?;
    ensure!(
        listed
            .iter()
            .all(|(name, active, _)| name == "my-psp" || active.is_none()),
        "no bundled plugin active: {listed:?}"
    );
    later.stop().await?;
    kernel.stop().await
}

/// The kernel activated the bundled payment plugin and stopped before the
/// shipping one: the next start activates shipping, and only shipping.
async fn a_start_that_stopped_half_way_is_completed_by_the_next(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    use commerce_kernel::commerce::{CommandContext, Commerce, Plugins};
    use commerce_plugin_host::{EngineConfig, PluginRegistry};
    let plugins_dir = tempfile::tempdir()?;
    let registry = Arc::new(PluginRegistry::open(
        plugins_dir.path(),
        EngineConfig::default(),
    )?);
    let plugins = Plugins::new(
        Commerce::new(db.event_store(), db.database.view_store()),
        registry,
    );
    plugins.place_bundled().await?;
    let system = CommandContext {
        actor: Some(commerce_kernel::server::SYSTEM_ACTOR.to_string()),
        correlation_id: None,
    };
    plugins
        .activate(MANUAL_PAYMENT.name, MANUAL_PAYMENT.version, &system)
        .await?;

    let kernel = RunningKernel::start(&db, DEFAULTS_ON).await?;
    let events = plugin_events(&kernel).await?;
    ensure!(
        activations(&events, "payment") == 1 && activations(&events, "shipping") == 1,
        "{events:?}"
    );
    let teapot = product(&kernel, "EUR", 1).await?;
    let (_, status) = buy(&kernel, teapot, "invoice", "DE").await?;
    ensure!(status == "CONFIRMED", "ended {status}");
    kernel.stop().await
}

/// `COMMERCE_DEFAULT_PLUGINS=false`: nothing is activated or recorded, but
/// the bundled versions are in the directory for an admin to activate.
async fn the_setting_turns_the_defaults_off(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, &[(config::DEFAULT_PLUGINS, "false")]).await?;
    ensure!(plugin_events(&kernel).await?.is_empty());
    let listed = plugins(&kernel).await?;
    ensure!(
        listed.iter().all(|(_, active, _)| active.is_none()),
        "{listed:?}"
    );
    ensure!(
        listed.iter().any(|(name, _, versions)| name == "payment"
            && versions.contains(&MANUAL_PAYMENT.version.to_string())),
        "the bundled versions are available: {listed:?}"
    );
    let activated = kernel
        .graphql(
            "mutation ($version: String!) { activatePlugin(input: { name: \"payment\", version: $version }) { errors { code message } } }",
            json!({ "version": MANUAL_PAYMENT.version }),
        )
        .await?;
    ensure!(
        activated["data"]["activatePlugin"]["errors"] == json!([]),
        "{activated}"
    );
    kernel.stop().await
}
