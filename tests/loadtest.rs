//! `commerce-kernel loadtest` as an operator runs it against a kernel: a few
//! seconds of orders through GraphQL, with the payment-http and
//! shipping-http plugins calling the load test's provider stub. It asserts
//! only what must always hold (every order CONFIRMED, one charge and one
//! shipment each, a report that says so), never a speed.

#[macro_use]
mod support;

use std::process::Command;
use std::sync::Arc;

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};
use support::kernel::{RunningKernel, TEST_JWT_SECRET};
use support::{TestDatabase, run_suite};

const BINARY: &str = env!("CARGO_BIN_EXE_commerce-kernel");

fn main() {
    run_suite(&cases![
        a_short_closed_loop_confirms_every_order_with_one_charge_each,
        a_short_open_loop_confirms_every_order_with_one_charge_each,
    ]);
}

/// Runs the load test binary against `kernel` with `shape`; its JSON report.
async fn loadtest(kernel: &RunningKernel, shape: &[&str]) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let json = dir.path().join("report.json");
    let mut command = Command::new(BINARY);
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("COMMERCE_JWT_SECRET", TEST_JWT_SECRET)
        .env("COMMERCE_DATA_DIR", dir.path())
        .arg("loadtest")
        .args(["--url", &kernel.url("")])
        .args(shape)
        .args(["--duration", "3", "--warmup", "0.5", "--products", "5"])
        .args(["--payment-plugin", commerce_plugin_artifacts::PAYMENT_HTTP])
        .args([
            "--shipping-plugin",
            commerce_plugin_artifacts::SHIPPING_HTTP,
        ])
        .arg("--json")
        .arg(&json);
    let output = tokio::task::spawn_blocking(move || command.output()).await??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "loadtest failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(stdout.contains("all CONFIRMED"), "{stdout}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).context("the JSON report")?)?;
    ensure!(report["ledger_checked"] == true, "{report}");
    ensure!(report["problems"] == serde_json::json!([]), "{report}");
    ensure!(report["errors"] == serde_json::json!({}), "{report}");
    let (orders, confirmed) = (
        report["orders"].as_u64().unwrap_or(0),
        report["confirmed"].as_u64().unwrap_or(0),
    );
    ensure!(orders > 0 && confirmed == orders, "{report}");
    ensure!(
        report["audited_orders"].as_u64().unwrap_or(0) >= orders,
        "{report}"
    );
    ensure!(
        report["place_to_confirmed"]["count"].as_u64() == Some(confirmed),
        "{report}"
    );
    Ok(report)
}

async fn a_short_closed_loop_confirms_every_order_with_one_charge_each(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, &[]).await?;
    let report = loadtest(&kernel, &["--clients", "4", "--lines", "2"]).await?;
    ensure!(report["clients"] == 4, "{report}");
    // Again on the shop as the first run left it: its catalog, not a new one.
    loadtest(&kernel, &["--clients", "2", "--use-catalog"]).await?;
    let listed = kernel
        .graphql("{ products(first: 100) { totalCount } }", json!({}))
        .await?;
    ensure!(
        listed["data"]["products"]["totalCount"] == 5,
        "the second run made a catalog of its own: {listed}"
    );
    kernel.stop().await
}

async fn a_short_open_loop_confirms_every_order_with_one_charge_each(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, &[]).await?;
    let report = loadtest(&kernel, &["--rate", "10", "--customers", "3"]).await?;
    ensure!(report["mode"] == "open", "{report}");
    kernel.stop().await
}
