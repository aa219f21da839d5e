//! The plugin host against the real guest components from `plugins/guests`:
//! each contract, each hostile case, hot swap under load, and the HTTP
//! adapters against fake providers on loopback.

mod fakes;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use commerce_plugin_artifacts as artifacts;
use commerce_plugin_host::{
    Address, EngineConfig, ErrorKind, LoadError, LoadedPlugin, Money, Order, OrderLine,
    PaymentRequest, PaymentStatus, PluginError, PluginRegistry, StepContext, sha256_hex,
};
use fakes::{FakePayments, FakeShipping, SLOW_RESPONSE};

/// `payment-http` as built against `commerce:plugin@0.1.0`
/// (tests/fixtures/README.md).
const LEGACY_PAYMENT_HTTP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/payment-http-0.1.0.wasm"
);

/// Compiled components shared by every test in this binary, so each
/// component is compiled once per run.
fn cache_dir() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temporary directory"))
        .path()
        .to_path_buf()
}

fn registry() -> (tempfile::TempDir, PluginRegistry) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let settings = EngineConfig {
        max_concurrent_invocations: 32,
        cache_dir: Some(cache_dir()),
        outbound_headers: None,
    };
    let registry = PluginRegistry::open(dir.path().join("plugins"), settings).expect("registry");
    (dir, registry)
}

fn component(path: &str) -> Vec<u8> {
    std::fs::read(path).expect("a built guest component")
}

/// A manifest for `bytes`, with `extra` TOML appended (tables last).
fn manifest(name: &str, version: &str, kind: &str, bytes: &[u8], extra: &str) -> String {
    format!(
        "name = \"{name}\"\nversion = \"{version}\"\nkind = \"{kind}\"\n\
         component = \"{name}.wasm\"\nsha256 = \"{}\"\n{extra}\n",
        sha256_hex(bytes)
    )
}

fn install_and_activate(
    registry: &PluginRegistry,
    manifest_text: &str,
    bytes: &[u8],
) -> Arc<LoadedPlugin> {
    let manifest = registry.install(manifest_text, bytes).expect("install");
    registry
        .activate(&manifest.name, &manifest.version)
        .expect("activate");
    registry.active(&manifest.name).expect("active")
}

fn money(amount: &str) -> Money {
    Money {
        amount: amount.to_string(),
        currency: "EUR".to_string(),
    }
}

fn order(id: &str, quantity: u32, unit_price: &str, total: &str, country: &str) -> Order {
    Order {
        id: id.to_string(),
        customer_id: "customer-1".to_string(),
        lines: vec![OrderLine {
            product_id: "product-1".to_string(),
            sku: "SKU-1".to_string(),
            name: "Mug".to_string(),
            quantity,
            unit_price: money(unit_price),
            line_total: money(total),
        }],
        total: money(total),
        shipping_address: Address {
            name: "Ada".to_string(),
            line1: "1 Loop Road".to_string(),
            line2: None,
            city: "Berlin".to_string(),
            postal_code: "10115".to_string(),
            region: None,
            country: country.to_string(),
        },
        payment_method: "tok_visa".to_string(),
    }
}

fn step(step: &str, order: Order) -> StepContext {
    StepContext {
        saga_id: "saga-1".to_string(),
        step: step.to_string(),
        idempotency_key: format!("saga-1:{step}"),
        order,
        prior_outputs: Vec::new(),
    }
}

fn misbehaving(registry: &PluginRegistry, limits: &str) -> Arc<LoadedPlugin> {
    let bytes = component(artifacts::MISBEHAVING);
    let text = manifest("misbehaving", "1.0.0", "saga-step", &bytes, limits);
    install_and_activate(registry, &text, &bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pure_step_runs_and_refuses_with_a_permanent_failure() {
    let (_dir, registry) = registry();
    let bytes = component(artifacts::ORDER_LIMIT);
    let plugin = install_and_activate(
        &registry,
        &manifest("order-limit", "1.0.0", "saga-step", &bytes, ""),
        &bytes,
    );

    let output = plugin
        .execute_step(step("limit", order("o-1", 3, "19.99", "59.97", "DE")))
        .await
        .expect("passes");
    let output: serde_json::Value = serde_json::from_str(&output).expect("JSON");
    assert_eq!(output["items"], 3);
    assert_eq!(output["total"], "59.97");

    for (quantity, total) in [(101, "101.00"), (1, "10000.01")] {
        match plugin
            .execute_step(step("limit", order("o-2", quantity, "1.00", total, "DE")))
            .await
        {
            Err(PluginError::Failed { failure, .. }) => {
                assert!(failure.permanent);
                assert_eq!(failure.code, "order_limit_exceeded");
            }
            other => panic!("expected a permanent failure, got {other:?}"),
        }
    }
    plugin
        .compensate_step(step("limit", order("o-1", 1, "1", "1", "DE")), "{}".into())
        .await
        .expect("compensates");

    let stats = registry.stats("order-limit").expect("stats");
    assert_eq!(stats.invocations, 4);
    assert_eq!(stats.errors, vec![(ErrorKind::Permanent, 2)]);
    assert!(stats.fuel_consumed > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_runs_out_of_fuel() {
    let (_dir, registry) = registry();
    let plugin = misbehaving(&registry, "[limits]\nfuel = 5000000\ntimeout_ms = 10000");
    let started = Instant::now();
    let result = plugin
        .execute_step(step("loop", order("o", 1, "1", "1", "DE")))
        .await;
    assert!(
        matches!(
            result,
            Err(PluginError::FuelExhausted {
                fuel: 5_000_000,
                ..
            })
        ),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_with_fuel_to_spare_hits_the_deadline() {
    let (_dir, registry) = registry();
    let plugin = misbehaving(&registry, "[limits]\nfuel = 10000000000\ntimeout_ms = 200");
    let started = Instant::now();
    let result = plugin
        .execute_step(step("loop", order("o", 1, "1", "1", "DE")))
        .await;
    assert!(
        matches!(
            result,
            Err(PluginError::DeadlineExceeded {
                timeout_ms: 200,
                ..
            })
        ),
        "{result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    // The kernel is fine: the same plugin serves the next call.
    plugin
        .execute_step(step("ok", order("o", 1, "1", "1", "DE")))
        .await
        .expect("next call works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_is_stopped_at_the_memory_limit() {
    let (_dir, registry) = registry();
    let plugin = misbehaving(&registry, "[limits]\nmemory_bytes = 8388608");
    let result = plugin
        .execute_step(step("allocate", order("o", 1, "1", "1", "DE")))
        .await;
    assert!(
        matches!(
            result,
            Err(PluginError::MemoryExceeded {
                memory_bytes: 8_388_608,
                ..
            })
        ),
        "{result:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traps_and_garbage_are_typed_errors() {
    let (_dir, registry) = registry();
    let plugin = misbehaving(&registry, "");
    let run = |name: &str| plugin.execute_step(step(name, order("o", 1, "1", "1", "DE")));
    assert!(matches!(
        run("trap").await,
        Err(PluginError::Trapped { .. })
    ));
    assert!(matches!(
        run("garbage").await,
        Err(PluginError::InvalidOutput { .. })
    ));
    match run("fail-transient").await {
        Err(error @ PluginError::Failed { .. }) => assert!(error.is_retryable()),
        other => panic!("expected a transient failure, got {other:?}"),
    }
    let stats = registry.stats("misbehaving").expect("stats");
    let kinds: Vec<ErrorKind> = stats.errors.iter().map(|(kind, _)| *kind).collect();
    assert_eq!(
        kinds,
        vec![
            ErrorKind::Transient,
            ErrorKind::Trap,
            ErrorKind::InvalidOutput
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_that_break_the_rules_are_refused_at_install() {
    let (_dir, registry) = registry();
    let payment = component(artifacts::PAYMENT_HTTP);
    let pure = component(artifacts::ORDER_LIMIT);

    // HTTP without allowed hosts: wasi:http is not granted.
    let error = registry
        .install(&manifest("pay", "1", "payment", &payment, ""), &payment)
        .unwrap_err();
    match &error {
        LoadError::UngrantedImport { import, .. } => {
            assert!(import.starts_with("wasi:http/"), "{error}")
        }
        other => panic!("expected an ungranted import, got {other}"),
    }
    // A std adapter as a saga step: WASI is not granted to steps by default.
    let error = registry
        .install(&manifest("pay", "2", "saga-step", &payment, ""), &payment)
        .unwrap_err();
    assert!(
        matches!(error, LoadError::UngrantedImport { .. }),
        "{error}"
    );
    // The right grants, the wrong contract.
    let text = manifest(
        "pay",
        "3",
        "saga-step",
        &payment,
        "allowed_hosts = [\"127.0.0.1\"]",
    );
    assert!(matches!(
        registry.install(&text, &payment),
        Err(LoadError::WrongWorld { .. })
    ));
    let error = registry
        .install(&manifest("pure", "1", "payment", &pure, ""), &pure)
        .unwrap_err();
    assert!(matches!(error, LoadError::WrongWorld { .. }), "{error}");

    // Not a component: garbage, a core module, nothing.
    for bytes in [
        b"not wasm at all".to_vec(),
        b"\0asm\x01\0\0\0".to_vec(),
        Vec::new(),
    ] {
        let error = registry
            .install(&manifest("junk", "1", "saga-step", &bytes, ""), &bytes)
            .unwrap_err();
        assert!(
            matches!(error, LoadError::InvalidComponent { .. }),
            "{error}"
        );
    }
    // A pin that does not match.
    let text = manifest("pure", "1", "saga-step", &payment, "");
    assert!(matches!(
        registry.install(&text, &pure),
        Err(LoadError::HashMismatch { .. })
    ));

    assert!(
        registry.installed().expect("listing").is_empty(),
        "nothing refused was written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_version_leaves_the_active_one_running() {
    let (_dir, registry) = registry();
    let pure = component(artifacts::ORDER_LIMIT);
    install_and_activate(
        &registry,
        &manifest("limit", "1.0.0", "saga-step", &pure, ""),
        &pure,
    );

    let junk = b"\0asm\x0d\0\x01\0".to_vec();
    assert!(
        registry
            .install(&manifest("limit", "2.0.0", "saga-step", &junk, ""), &junk)
            .is_err()
    );
    assert!(matches!(
        registry.activate("limit", "2.0.0"),
        Err(LoadError::NotInstalled { .. })
    ));

    let active = registry.active("limit").expect("still active");
    assert_eq!(active.manifest().version, "1.0.0");
    active
        .execute_step(step("limit", order("o", 1, "1", "1", "DE")))
        .await
        .expect("still serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installs_are_idempotent_and_survive_a_restart() {
    let (dir, registry) = registry();
    let pure = component(artifacts::ORDER_LIMIT);
    let text = manifest(
        "limit",
        "1.0.0",
        "saga-step",
        &pure,
        "[limits]\nfuel = 1000000",
    );
    registry.install(&text, &pure).expect("install");
    registry
        .install(&text, &pure)
        .expect("the same install again is fine");
    let changed = text.replace("fuel = 1000000", "fuel = 2000000");
    assert!(matches!(
        registry.install(&changed, &pure),
        Err(LoadError::AlreadyInstalled { .. })
    ));
    drop(registry);

    let reopened =
        PluginRegistry::open(dir.path().join("plugins"), EngineConfig::default()).expect("reopen");
    let installed = reopened.installed().expect("listing");
    assert_eq!(installed.len(), 1);
    assert_eq!(installed[0].manifest.limits.fuel, 1_000_000);
    assert!(
        reopened.active("limit").is_err(),
        "activation is the kernel's decision"
    );
    reopened
        .activate("limit", "1.0.0")
        .expect("activate after restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_secrets_come_from_the_environment() {
    let (_dir, registry) = registry();
    let payment = component(artifacts::PAYMENT_HTTP);
    let text = manifest(
        "pay",
        "1",
        "payment",
        &payment,
        "allowed_hosts = [\"127.0.0.1\"]\n[config]\napi_key = \"env:COMMERCE_TEST_SECRET_THAT_IS_NOT_SET\"",
    );
    match registry.install(&text, &payment) {
        Err(LoadError::MissingSecret { variable, .. }) => {
            assert_eq!(variable, "COMMERCE_TEST_SECRET_THAT_IS_NOT_SET")
        }
        other => panic!("expected a missing secret, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_swap_under_concurrent_calls_fails_no_call() {
    let (_dir, registry) = registry();
    let registry = Arc::new(registry);
    // Two versions of one plugin, told apart by their output.
    let first = component(artifacts::MISBEHAVING);
    let second = component(artifacts::ORDER_LIMIT);
    let v1 =
        manifest("swapped", "1.0.0", "saga-step", &first, "").replace("swapped.wasm", "v1.wasm");
    let v2 =
        manifest("swapped", "2.0.0", "saga-step", &second, "").replace("swapped.wasm", "v2.wasm");
    install_and_activate(&registry, &v1, &first);
    registry.install(&v2, &second).expect("install v2");
    let v1_loaded = registry.prepare("swapped", "1.0.0").expect("v1");
    let v2_loaded = registry.prepare("swapped", "2.0.0").expect("v2");

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let served = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let mut callers = Vec::new();
    for caller in 0..8 {
        let (registry, stop, served) = (
            Arc::clone(&registry),
            Arc::clone(&stop),
            Arc::clone(&served),
        );
        callers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let plugin = registry
                    .active("swapped")
                    .expect("always an active version");
                match plugin
                    .execute_step(step(
                        &format!("call-{caller}"),
                        order("o", 1, "1", "1", "DE"),
                    ))
                    .await
                {
                    Ok(output) if output.contains("\"step\"") => {
                        served[0].fetch_add(1, Ordering::Relaxed)
                    }
                    Ok(_) => served[1].fetch_add(1, Ordering::Relaxed),
                    Err(error) => {
                        failures.push(error);
                        0
                    }
                };
            }
            failures
        }));
    }
    for round in 0..40 {
        let next = if round % 2 == 0 {
            &v2_loaded
        } else {
            &v1_loaded
        };
        registry.swap(Arc::clone(next));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        let failures = caller.await.expect("caller");
        assert!(
            failures.is_empty(),
            "calls failed during swaps: {failures:?}"
        );
    }
    assert!(served[0].load(Ordering::Relaxed) > 0 && served[1].load(Ordering::Relaxed) > 0);

    // A call holding the old version finishes on it after the swap.
    let held = registry.active("swapped").expect("active");
    let before = held.manifest().version.clone();
    registry.swap(if before == "1.0.0" {
        v2_loaded
    } else {
        v1_loaded
    });
    assert_eq!(held.manifest().version, before);
    held.execute_step(step("held", order("o", 1, "1", "1", "DE")))
        .await
        .expect("old version still runs");
}

fn payment_plugin(
    registry: &PluginRegistry,
    base_url: &str,
    allowed: &str,
    timeout_ms: u64,
) -> Arc<LoadedPlugin> {
    payment_plugin_from(
        artifacts::PAYMENT_HTTP,
        registry,
        base_url,
        allowed,
        timeout_ms,
    )
}

fn payment_plugin_from(
    path: &str,
    registry: &PluginRegistry,
    base_url: &str,
    allowed: &str,
    timeout_ms: u64,
) -> Arc<LoadedPlugin> {
    let bytes = component(path);
    let extra = format!(
        "allowed_hosts = [\"{allowed}\"]\n[limits]\ntimeout_ms = {timeout_ms}\n[config]\nbase_url = \"{base_url}\""
    );
    install_and_activate(
        registry,
        &manifest("payment-http", "1.0.0", "payment", &bytes, &extra),
        &bytes,
    )
}

fn payment_request(key: &str, order_id: &str, method: &str) -> PaymentRequest {
    let mut order = order(order_id, 2, "10.00", "20.00", "DE");
    order.payment_method = method.to_string();
    PaymentRequest {
        idempotency_key: key.to_string(),
        order,
        amount: money("20.00"),
        payment_method: method.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_http_charges_once_per_idempotency_key_and_refunds() {
    let provider = FakePayments::start().await;
    let (_dir, registry) = registry();
    let plugin = payment_plugin(
        &registry,
        &provider.base_url(),
        &provider.address.to_string(),
        5000,
    );

    let first = plugin
        .charge(payment_request("saga-1:payment", "o-1", "tok_visa"))
        .await
        .expect("charged");
    assert_eq!(first.status, PaymentStatus::Captured);
    assert_eq!(first.amount.amount, "20.00");
    let again = plugin
        .charge(payment_request("saga-1:payment", "o-1", "tok_visa"))
        .await
        .expect("replayed");
    assert_eq!(again.reference, first.reference);
    assert_eq!(
        provider.payments_for("o-1").len(),
        1,
        "one charge for one key"
    );

    let refunded = plugin
        .refund(
            "saga-1:refund".into(),
            first.reference.clone(),
            money("20.00"),
        )
        .await
        .expect("refunded");
    assert_eq!(refunded.status, PaymentStatus::Refunded);

    let held = plugin
        .authorize(payment_request("saga-2:payment", "o-2", "tok_visa"))
        .await
        .expect("authorized");
    assert_eq!(held.status, PaymentStatus::Authorized);
    let captured = plugin
        .capture(
            "saga-2:capture".into(),
            held.reference.clone(),
            money("20.00"),
        )
        .await
        .expect("captured");
    assert_eq!(captured.status, PaymentStatus::Captured);
    let held = plugin
        .authorize(payment_request("saga-3:payment", "o-3", "tok_visa"))
        .await
        .expect("authorized");
    let cancelled = plugin
        .cancel_payment("saga-3:cancel".into(), held.reference)
        .await
        .expect("cancelled");
    assert_eq!(cancelled.status, PaymentStatus::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_http_tells_declines_from_transient_failures() {
    let provider = FakePayments::start().await;
    let (_dir, registry) = registry();
    let plugin = payment_plugin(
        &registry,
        &provider.base_url(),
        &provider.address.to_string(),
        5000,
    );

    match plugin
        .charge(payment_request("k-decline", "o-1", "tok_decline"))
        .await
    {
        Err(error @ PluginError::Failed { .. }) => {
            assert!(!error.is_retryable());
            let PluginError::Failed { failure, .. } = error else {
                unreachable!()
            };
            assert_eq!(failure.code, "card_declined");
        }
        other => panic!("expected a decline, got {other:?}"),
    }

    provider.fail_next(1);
    match plugin
        .charge(payment_request("k-500", "o-2", "tok_visa"))
        .await
    {
        Err(error @ PluginError::Failed { .. }) => assert!(error.is_retryable(), "{error}"),
        other => panic!("expected a transient failure, got {other:?}"),
    }
    plugin
        .charge(payment_request("k-500", "o-2", "tok_visa"))
        .await
        .expect("the retry succeeds");
    assert_eq!(provider.payments_for("o-2").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_provider_hits_the_deadline_and_the_retry_charges_nothing_more() {
    let provider = FakePayments::start().await;
    let (_dir, registry) = registry();
    let plugin = payment_plugin(
        &registry,
        &provider.base_url(),
        &provider.address.to_string(),
        500,
    );

    let started = Instant::now();
    let result = plugin
        .charge(payment_request("k-slow", "o-slow", "tok_slow"))
        .await;
    assert!(
        matches!(
            result,
            Err(PluginError::DeadlineExceeded {
                timeout_ms: 500,
                ..
            })
        ),
        "{result:?}"
    );
    assert!(
        started.elapsed() < SLOW_RESPONSE,
        "gave up at the deadline, not the answer"
    );

    let retried = plugin
        .charge(payment_request("k-slow", "o-slow", "tok_slow"))
        .await
        .expect("replayed");
    assert_eq!(retried.status, PaymentStatus::Captured);
    assert_eq!(provider.payments_for("o-slow").len(), 1, "still one charge");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_outside_allowed_hosts_are_refused_by_the_host() {
    let provider = FakePayments::start().await;
    let (_dir, registry) = registry();
    // Allowed: some other port on loopback, not the provider's.
    let other = format!(
        "127.0.0.1:{}",
        provider.address.port().wrapping_add(1).max(1)
    );
    let plugin = payment_plugin(&registry, &provider.base_url(), &other, 5000);
    match plugin.charge(payment_request("k", "o", "tok_visa")).await {
        Err(PluginError::Failed { failure, .. }) => {
            assert!(failure.permanent);
            assert_eq!(failure.code, "request_denied");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(provider.requests(), 0, "nothing reached the provider");
}

/// A loopback TCP proxy in front of `target` that counts the connections
/// it accepts and can drop the ones it holds, as a provider's load balancer
/// closing idle keep-alive connections would.
struct CountingProxy {
    address: std::net::SocketAddr,
    accepted: Arc<AtomicU64>,
    open: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    _accept: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    async fn start(target: std::net::SocketAddr) -> CountingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let accepted = Arc::new(AtomicU64::new(0));
        let open = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (count, held) = (Arc::clone(&accepted), Arc::clone(&open));
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let relay = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                held.lock().expect("connections").push(relay);
            }
        });
        CountingProxy {
            address,
            accepted,
            open,
            _accept: accept,
        }
    }

    /// Closes every connection it relays.
    fn drop_connections(&self) {
        for relay in self.open.lock().expect("connections").drain(..) {
            relay.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_calls_reuse_a_connection_and_survive_one_the_provider_closed() {
    let provider = FakePayments::start().await;
    let proxy = CountingProxy::start(provider.address).await;
    let (_dir, registry) = registry();
    let plugin = payment_plugin(
        &registry,
        &format!("http://{}", proxy.address),
        &proxy.address.to_string(),
        5000,
    );
    for n in 0..5 {
        plugin
            .charge(payment_request(
                &format!("reuse:{n}"),
                &format!("o-{n}"),
                "tok_visa",
            ))
            .await
            .expect("charged");
    }
    assert_eq!(
        proxy.accepted.load(Ordering::SeqCst),
        1,
        "five calls one after another share one kept-alive connection"
    );

    proxy.drop_connections();
    tokio::time::sleep(Duration::from_millis(50)).await;
    plugin
        .charge(payment_request("reuse:after-close", "o-after", "tok_visa"))
        .await
        .expect("a closed idle connection is replaced, not an error");
    assert_eq!(proxy.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(provider.payments().len(), 6, "each call charged once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipping_http_quotes_ships_once_and_cancels() {
    let carrier = FakeShipping::start().await;
    let (_dir, registry) = registry();
    let bytes = component(artifacts::SHIPPING_HTTP);
    let extra = format!(
        "allowed_hosts = [\"{}\"]\n[config]\nbase_url = \"{}\"",
        carrier.address,
        carrier.base_url()
    );
    let plugin = install_and_activate(
        &registry,
        &manifest("shipping-http", "1.0.0", "shipping", &bytes, &extra),
        &bytes,
    );

    let rates = plugin
        .quote(order("o-1", 1, "5", "5", "DE"))
        .await
        .expect("rates");
    assert_eq!(rates.len(), 2);
    assert_eq!(rates[0].price.currency, "EUR");

    let shipment = plugin
        .create_shipment(
            "saga-1:shipment".into(),
            order("o-1", 1, "5", "5", "DE"),
            "standard".into(),
        )
        .await
        .expect("shipment");
    let again = plugin
        .create_shipment(
            "saga-1:shipment".into(),
            order("o-1", 1, "5", "5", "DE"),
            "standard".into(),
        )
        .await
        .expect("replayed");
    assert_eq!(again.reference, shipment.reference);
    assert!(shipment.tracking_number.is_some());
    assert_eq!(carrier.shipments().len(), 1);

    plugin
        .cancel_shipment("saga-1:cancel-shipment".into(), shipment.reference)
        .await
        .expect("cancelled");
    assert!(carrier.shipments()[0].cancelled);

    match plugin
        .create_shipment(
            "saga-2:shipment".into(),
            order("o-2", 1, "5", "5", "XX"),
            "standard".into(),
        )
        .await
    {
        Err(PluginError::Failed { failure, .. }) => {
            assert!(failure.permanent);
            assert_eq!(failure.code, "address_refused");
        }
        other => panic!("expected a refused address, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_of_the_wrong_contract_is_refused() {
    let (_dir, registry) = registry();
    let pure = component(artifacts::ORDER_LIMIT);
    let plugin = install_and_activate(
        &registry,
        &manifest("limit", "1", "saga-step", &pure, ""),
        &pure,
    );
    let result = plugin.charge(payment_request("k", "o", "tok_visa")).await;
    assert!(
        matches!(result, Err(PluginError::WrongKind { .. })),
        "{result:?}"
    );
    assert!(matches!(
        registry.active("nothing"),
        Err(PluginError::NotActive { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_http_looks_up_what_a_key_did_and_never_guesses() {
    let registry_of_its_own = registry;
    let provider = FakePayments::start().await;
    let (_dir, registry) = registry();
    let plugin = payment_plugin(
        &registry,
        &provider.base_url(),
        &provider.address.to_string(),
        5000,
    );
    assert_eq!(plugin.contract(), "0.2");
    assert!(plugin.supports_lookup());
    assert!(plugin.reaches_outside());

    // Nothing made with the key yet: none, and looking changed nothing.
    let found = plugin.lookup_payment("saga-9:payment".into()).await;
    assert!(matches!(found, Ok(None)), "{found:?}");
    let charged = plugin
        .charge(payment_request("saga-9:payment", "o-9", "tok_visa"))
        .await
        .expect("charged");
    let found = plugin
        .lookup_payment("saga-9:payment".into())
        .await
        .expect("looked up")
        .expect("the charge");
    assert_eq!(found.reference, charged.reference);
    assert_eq!(found.status, PaymentStatus::Captured);
    // It answers with the payment as it is now.
    plugin
        .refund("saga-9:refund".into(), charged.reference, money("20.00"))
        .await
        .expect("refunded");
    let found = plugin
        .lookup_payment("saga-9:payment".into())
        .await
        .expect("looked up");
    assert_eq!(found.map(|p| p.status), Some(PaymentStatus::Refunded));
    // A declined key made no payment.
    let _ = plugin
        .charge(payment_request("saga-10:payment", "o-10", "tok_decline"))
        .await;
    let found = plugin.lookup_payment("saga-10:payment".into()).await;
    assert!(matches!(found, Ok(None)), "{found:?}");
    assert_eq!(provider.payments_for("o-10"), Vec::new());

    // A provider without the endpoint (or down) is "could not find out",
    // never "none".
    let (_other_dir, other_registry) = registry_of_its_own();
    let elsewhere = payment_plugin(
        &other_registry,
        &format!("{}/no-such-api", provider.base_url()),
        &provider.address.to_string(),
        5000,
    );
    let found = elsewhere.lookup_payment("saga-9:payment".into()).await;
    assert!(
        matches!(found, Err(PluginError::Failed { .. })),
        "{found:?}"
    );
    provider.fail_next(1);
    let found = plugin.lookup_payment("saga-9:payment".into()).await;
    assert!(
        matches!(&found, Err(error) if error.is_retryable()),
        "{found:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_built_against_contract_0_1_still_runs_without_lookup() {
    let provider = FakePayments::start().await;
    let (_dir, registry) = registry();
    let plugin = payment_plugin_from(
        LEGACY_PAYMENT_HTTP,
        &registry,
        &provider.base_url(),
        &provider.address.to_string(),
        5000,
    );
    assert_eq!(plugin.contract(), "0.1");
    assert!(!plugin.supports_lookup());
    let charged = plugin
        .charge(payment_request("saga-1:payment", "o-1", "tok_visa"))
        .await
        .expect("charged");
    assert_eq!(charged.status, PaymentStatus::Captured);
    let refunded = plugin
        .refund("saga-1:refund".into(), charged.reference, money("20.00"))
        .await
        .expect("refunded");
    assert_eq!(refunded.status, PaymentStatus::Refunded);
    let found = plugin.lookup_payment("saga-1:payment".into()).await;
    assert!(
        matches!(
            found,
            Err(PluginError::Unsupported {
                call: "lookup",
                contract: "0.1",
                ..
            })
        ),
        "{found:?}"
    );
    assert_eq!(provider.lookups(), 0, "nothing was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipping_http_looks_up_what_a_key_created() {
    let carrier = FakeShipping::start().await;
    let (_dir, registry) = registry();
    let bytes = component(artifacts::SHIPPING_HTTP);
    let extra = format!(
        "allowed_hosts = [\"{}\"]\n[config]\nbase_url = \"{}\"",
        carrier.address,
        carrier.base_url()
    );
    let plugin = install_and_activate(
        &registry,
        &manifest("shipping-http", "1.0.0", "shipping", &bytes, &extra),
        &bytes,
    );
    let found = plugin.lookup_shipment("saga-1:shipment".into()).await;
    assert!(matches!(found, Ok(None)), "{found:?}");
    let shipment = plugin
        .create_shipment(
            "saga-1:shipment".into(),
            order("o-1", 1, "5", "5", "DE"),
            "standard".into(),
        )
        .await
        .expect("shipment");
    let found = plugin
        .lookup_shipment("saga-1:shipment".into())
        .await
        .expect("looked up")
        .expect("the shipment");
    assert_eq!(found.reference, shipment.reference);
    assert_eq!(found.tracking_number, shipment.tracking_number);
    assert_eq!(carrier.shipments().len(), 1, "looking created nothing");
}
