//! Per-invocation overhead of a plugin: a fresh store, instantiation from
//! the pre-linked component and one call, against a native Rust function
//! doing the same work, measured in the same run.
//!
//! `cargo bench -p commerce-plugin-host --bench invocation [-- --iterations N]`
//!
//! - `native`: the order-limit check as a plain Rust function.
//! - `pure step`: the `order-limit` component (no imports), `execute`.
//! - `WASI adapter`: the `payment-http` component with WASI and wasi:http
//!   linked, `charge` with no `base_url` configured, so it answers at once
//!   without network I/O: the cost of hosting the adapter, not of HTTP.

use std::hint::black_box;
use std::time::{Duration, Instant};

use commerce_plugin_artifacts as artifacts;
use commerce_plugin_host::{
    Address, EngineConfig, Money, Order, OrderLine, PaymentRequest, PluginError, PluginRegistry,
    StepContext, sha256_hex,
};

fn main() {
    let iterations = std::env::args()
        .skip_while(|arg| arg != "--iterations")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000usize);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temporary directory");
    let settings = EngineConfig {
        max_concurrent_invocations: 16,
        cache_dir: None,
        outbound_headers: None,
    };
    let registry = PluginRegistry::open(dir.path(), settings).expect("registry");

    let pure = std::fs::read(artifacts::ORDER_LIMIT).expect("order-limit component");
    let step_manifest = manifest("order-limit", "saga-step", &pure, "");
    registry
        .install(&step_manifest, &pure)
        .expect("install order-limit");
    registry
        .activate("order-limit", "1.0.0")
        .expect("activate order-limit");
    let step = registry.active("order-limit").expect("active");

    let adapter = std::fs::read(artifacts::PAYMENT_HTTP).expect("payment-http component");
    let adapter_manifest = manifest(
        "payment-http",
        "payment",
        &adapter,
        "allowed_hosts = [\"127.0.0.1\"]",
    );
    registry
        .install(&adapter_manifest, &adapter)
        .expect("install payment-http");
    registry
        .activate("payment-http", "1.0.0")
        .expect("activate payment-http");
    let payment = registry.active("payment-http").expect("active");

    let context = step_context();
    let native = measure(iterations, || {
        let output = black_box(native_order_limit(black_box(&context.order)));
        assert!(output.is_ok());
    });
    let pure_step = measure(iterations, || {
        let output = runtime.block_on(step.execute_step(context.clone()));
        black_box(output.expect("the step passes"));
    });
    let request = PaymentRequest {
        idempotency_key: "bench:payment".into(),
        order: context.order.clone(),
        amount: context.order.total.clone(),
        payment_method: "tok_visa".into(),
    };
    let wasi_adapter = measure(iterations / 4, || {
        let answer = runtime.block_on(payment.charge(request.clone()));
        // No base_url: the adapter refuses before any I/O.
        assert!(
            matches!(answer, Err(PluginError::Failed { .. })),
            "{answer:?}"
        );
    });

    println!(
        "per-invocation overhead, {iterations} calls ({} for the adapter), one thread",
        iterations / 4
    );
    println!("{:<14} {:>10} {:>10} {:>10}", "", "p50", "p99", "mean");
    for (name, stats) in [
        ("native", native),
        ("pure step", pure_step),
        ("WASI adapter", wasi_adapter),
    ] {
        println!(
            "{name:<14} {:>10} {:>10} {:>10}",
            micros(stats.p50),
            micros(stats.p99),
            micros(stats.mean)
        );
    }
    let fuel = registry
        .stats("order-limit")
        .map(|s| s.fuel_consumed / s.invocations.max(1));
    println!("fuel per pure-step call: {}", fuel.unwrap_or(0));
}

struct Timings {
    p50: Duration,
    p99: Duration,
    mean: Duration,
}

fn measure(iterations: usize, mut call: impl FnMut()) -> Timings {
    for _ in 0..iterations.min(1_000) {
        call();
    }
    let mut samples: Vec<Duration> = (0..iterations.max(1))
        .map(|_| {
            let started = Instant::now();
            call();
            started.elapsed()
        })
        .collect();
    samples.sort();
    let total: Duration = samples.iter().sum();
    Timings {
        p50: samples[samples.len() / 2],
        p99: samples[samples.len() * 99 / 100],
        mean: total / samples.len() as u32,
    }
}

fn micros(duration: Duration) -> String {
    format!("{:.2} us", duration.as_secs_f64() * 1e6)
}

fn manifest(name: &str, kind: &str, bytes: &[u8], extra: &str) -> String {
    format!(
        "name = \"{name}\"\nversion = \"1.0.0\"\nkind = \"{kind}\"\ncomponent = \"{name}.wasm\"\n\
         sha256 = \"{}\"\n{extra}\n",
        sha256_hex(bytes)
    )
}

/// What the `order-limit` step checks, natively.
fn native_order_limit(order: &Order) -> Result<String, String> {
    let items: u64 = order
        .lines
        .iter()
        .map(|line| u64::from(line.quantity))
        .sum();
    if items > 100 {
        return Err("too many items".into());
    }
    let whole: u64 = order
        .total
        .amount
        .split('.')
        .next()
        .unwrap_or("0")
        .parse()
        .map_err(|_| "amount")?;
    if whole > 10_000 {
        return Err("total too high".into());
    }
    Ok(format!(
        "{{\"items\":{items},\"total\":\"{}\"}}",
        order.total.amount
    ))
}

fn step_context() -> StepContext {
    let money = |amount: &str| Money {
        amount: amount.into(),
        currency: "EUR".into(),
    };
    let lines = (0..3)
        .map(|i| OrderLine {
            product_id: format!("product-{i}"),
            sku: format!("SKU-{i}"),
            name: "Mug".into(),
            quantity: 2,
            unit_price: money("9.99"),
            line_total: money("19.98"),
        })
        .collect();
    StepContext {
        saga_id: "saga".into(),
        step: "order-limit".into(),
        idempotency_key: "saga:order-limit".into(),
        order: Order {
            id: "order".into(),
            customer_id: "customer".into(),
            lines,
            total: money("59.94"),
            shipping_address: Address {
                name: "Ada".into(),
                line1: "1 Loop Road".into(),
                line2: None,
                city: "Berlin".into(),
                postal_code: "10115".into(),
                region: None,
                country: "DE".into(),
            },
            payment_method: "tok_visa".into(),
        },
        prior_outputs: Vec::new(),
    }
}
