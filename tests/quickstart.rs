//! The README's quickstart, run as written: the `# terminal 1` block starts
//! the kernel, the `# terminal 2` block buys as a guest and watches the
//! order to CONFIRMED. Only what cannot be the same here is replaced: `cargo
//! run --release` by the binary this test build made, and the kernel's
//! address (`KERNEL=...`, and the port) by a free one. The test fails when
//! the README no longer has those lines, so the quickstart cannot rot.
//!
//! Needs bash and curl, as the README says; without them it says it was
//! skipped.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};

const BINARY: &str = env!("CARGO_BIN_EXE_commerce-kernel");
const README: &str = include_str!("../README.md");

/// Kills the kernel if the test ends early.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The lines of the README's `sh` block whose first line is `first`,
/// without that line.
fn block(first: &str) -> Vec<&'static str> {
    let mut lines = README.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "```sh" && lines.clone().next().map(str::trim) == Some(first) {
            lines.next();
            return lines.take_while(|line| line.trim() != "```").collect();
        }
    }
    panic!("README.md has no ```sh block starting with `{first}`");
}

fn available(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

#[test]
fn the_readme_quickstart_confirms_an_order_watched_live() {
    if !available("bash") || !available("curl") || !available("timeout") {
        eprintln!("skipped: the quickstart needs bash and curl (and timeout, to bound it)");
        return;
    }
    // Terminal 1: one line, the kernel with the sample catalog.
    let start = block("# terminal 1: the kernel, with the sample catalog");
    assert_eq!(
        start,
        ["COMMERCE_DEMO_CATALOG=true cargo run --release"],
        "the README starts the kernel some other way: update this test"
    );
    let data = tempfile::tempdir().expect("temp dir");
    let mut kernel = KillOnDrop(
        Command::new(BINARY)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("COMMERCE_DEMO_CATALOG", "true")
            .env("COMMERCE_DATA_DIR", data.path())
            .env("COMMERCE_LISTEN_ADDR", "127.0.0.1:0")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the kernel"),
    );
    let stdout = kernel.0.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let address = loop {
        let line = lines
            .next()
            .expect("the kernel stopped before it listened")
            .expect("read the kernel's log");
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().expect("address").to_string();
        }
    };
    // Keep reading the log, so the kernel never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));

    // Terminal 2, with the two substitutions.
    let buy = block("# terminal 2: a guest buys the first product and watches the order");
    assert!(
        buy.first() == Some(&"KERNEL=http://localhost:8084"),
        "the README's second block no longer starts with KERNEL=http://localhost:8084: {buy:?}"
    );
    assert!(
        buy.iter()
            .any(|line| line.contains("cargo run --release -- watch")),
        "the README no longer watches the order: {buy:?}"
    );
    let script: Vec<String> = buy
        .iter()
        .map(|line| match *line {
            "KERNEL=http://localhost:8084" => format!("KERNEL=http://{address}"),
            line => line.replace("cargo run --release --", BINARY),
        })
        .collect();
    // Bounded: a subscription that never reaches a final status fails the
    // test instead of holding CI.
    let output = Command::new("timeout")
        .args(["120", "bash", "-euo", "pipefail", "-c", &script.join("\n")])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .expect("run the quickstart");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the quickstart failed ({}):\n{printed}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let statuses: Vec<&str> = printed.lines().collect();
    assert_eq!(
        statuses,
        [
            "PENDING",
            "INVENTORY_RESERVED",
            "PAID",
            "SHIPPED",
            "CONFIRMED"
        ],
        "what watch printed"
    );
}
