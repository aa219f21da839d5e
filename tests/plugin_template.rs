//! `commerce-kernel plugin new`, as an integrator uses it: a crate of each
//! kind is made, then built and installed by the commands of its own
//! README, run as written; a kernel whose saga runs the three made this way
//! (as `payment`, `shipping` and a custom step) confirms an order.
//!
//! Builds three guest crates for `wasm32-wasip2` (the target the
//! `commerce-plugin-artifacts` build installs), sharing one target folder
//! under cargo's test scratch space, so later runs are incremental.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use commerce_kernel::loadtest::storefront::Storefront;
use serde_json::json;

const BINARY: &str = env!("CARGO_BIN_EXE_commerce-kernel");
const TOOLCHAIN_FILE: &str = include_str!("../rust-toolchain.toml");

/// Kills the kernel if the test ends early.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The binary with a clean environment on the data dir `data`.
fn kernel(data: &Path) -> Command {
    let mut command = Command::new(BINARY);
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("COMMERCE_DATA_DIR", data)
        .env("COMMERCE_LISTEN_ADDR", "127.0.0.1:0")
        .env("COMMERCE_LOG", "warn,commerce_kernel=info")
        .env("USER", "integrator")
        .env("NO_COLOR", "1");
    command
}

/// Runs the binary; its stdout, or a panic with everything it said.
fn run(data: &Path, args: &[&str]) -> String {
    let output = kernel(data).args(args).output().expect("run the kernel");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    assert!(output.status.success(), "{args:?}: {stdout}{stderr}");
    stdout
}

/// The toolchain this repository pins: the generated crates live outside
/// it, where rustup would otherwise pick its default toolchain.
fn pinned_toolchain() -> &'static str {
    TOOLCHAIN_FILE
        .lines()
        .find_map(|line| line.trim().strip_prefix("channel = "))
        .map(|channel| channel.trim_matches('"'))
        .expect("rust-toolchain.toml names a channel")
}

/// The lines of the first ```sh block of a generated README.
fn build_commands(readme: &str) -> String {
    let mut lines = readme.lines().skip_while(|line| line.trim() != "```sh");
    lines.next().expect("the README has a ```sh block");
    let block: Vec<&str> = lines.take_while(|line| line.trim() != "```").collect();
    assert!(!block.is_empty(), "an empty ```sh block");
    block.join("\n")
}

#[test]
fn made_plugins_build_install_and_confirm_an_order() {
    let work = tempfile::tempdir().expect("temp dir");
    let data = work.path().join("data");
    let crates = work.path().join("crates");
    std::fs::create_dir_all(&crates).expect("crates dir");
    let shared_target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-template-target");
    std::fs::create_dir_all(&shared_target).expect("shared target dir");
    let bin_dir = Path::new(BINARY).parent().expect("the binary's folder");
    let path = std::env::join_paths(std::iter::once(bin_dir.to_path_buf()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .expect("PATH");

    // The shop the plugins go to exists before them, as it would.
    std::fs::create_dir_all(&data).expect("data dir");
    run(&data, &["migrate"]);
    for (name, kind) in [
        ("payment", "payment"),
        ("shipping", "shipping"),
        ("order-check", "saga-step"),
    ] {
        let made = run(
            &data,
            &["plugin", "new", name, "--kind", kind, "--dir"]
                .into_iter()
                .chain([crates.to_str().expect("utf-8 path")])
                .collect::<Vec<_>>(),
        );
        assert!(made.contains(&format!("a {kind} plugin")), "{made}");
        let root = crates.join(name);
        // One build folder for the three, as `target` is where the README
        // looks for the component.
        std::os::unix::fs::symlink(&shared_target, root.join("target")).expect("link target");
        let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
        let commands = build_commands(&readme);
        // An integrator's shell: none of the outer `cargo test`'s settings
        // (they are for the kernel's build) and no COMMERCE_* variable but
        // the shop's folder. Where cargo and rustup live, and how cargo
        // reaches the registry, stay.
        let mut shell = Command::new("sh");
        shell
            .args(["-e", "-c", &commands])
            .current_dir(&root)
            .env_clear()
            .env("PATH", &path)
            .env("COMMERCE_DATA_DIR", &data)
            .env("COMMERCE_LOG", "warn")
            .env("USER", "integrator")
            .env("RUSTUP_TOOLCHAIN", pinned_toolchain());
        for (variable, value) in std::env::vars_os() {
            let name = variable.to_string_lossy().to_ascii_lowercase();
            let keep = ["home", "cargo_home", "rustup_home", "tmpdir"].contains(&name.as_str())
                || name.ends_with("_proxy")
                || name.starts_with("cargo_net_")
                || name.starts_with("cargo_http_")
                || name.starts_with("cargo_registries_");
            if keep {
                shell.env(variable, value);
            }
        }
        let output = shell.output().expect("run the README's commands");
        assert!(
            output.status.success(),
            "{name}: the README's commands failed:\n{commands}\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let listed = run(&data, &["plugin", "list"]);
    for name in ["payment", "shipping", "order-check"] {
        let line = listed
            .lines()
            .find(|line| line.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} is listed: {listed}"));
        assert!(line.contains("active: 0.1.0"), "{listed}");
    }

    let seeded = run(&data, &["seed", "--demo"]);
    let customer = seeded
        .split("Bearer ")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("seed prints a customer token: {seeded}"))
        .to_string();
    let admin = run(&data, &["token", "--sub", "ops", "--role", "admin"])
        .trim()
        .to_string();
    let mut child = KillOnDrop(
        kernel(&data)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the kernel"),
    );
    let stdout = child.0.stdout.take().expect("piped stdout");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let address = loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the kernel never logged its address");
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().expect("address").to_string();
        }
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (status, steps) = runtime.block_on(async {
        let kernel = Storefront::new(&format!("http://{address}")).expect("url");
        let retry = "{ maxAttempts: 3, initialBackoffMs: 100, maxBackoffMs: 1000, timeoutMs: 5000 }";
        kernel
            .mutate(
                &admin,
                "defineSaga",
                &format!(
                    "mutation {{ defineSaga(input: {{ steps: [
                        {{ name: \"reserve-inventory\", kind: RESERVE_INVENTORY, retry: {retry} }},
                        {{ name: \"order-check\", kind: CUSTOM, plugin: \"order-check\", retry: {retry} }},
                        {{ name: \"payment\", kind: PAYMENT, plugin: \"payment\", retry: {retry} }},
                        {{ name: \"shipment\", kind: SHIPMENT, plugin: \"shipping\", retry: {retry} }},
                        {{ name: \"confirm\", kind: CONFIRM, retry: {retry} }} ] }}) {{ errors {{ code message }} }} }}"
                ),
                json!({}),
            )
            .await
            .expect("defineSaga");
        // The made shipping plugin has a rate in EUR only. The catalog shows
        // once the new kernel's projections have caught up with the seed.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let product = loop {
            let products = kernel
                .graphql(
                    &customer,
                    "{ products(first: 20) { edges { node { id price { currency } } } } }",
                    json!({}),
                )
                .await
                .expect("products");
            let in_euros = products["data"]["products"]["edges"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|edge| edge["node"]["price"]["currency"] == "EUR")
                .map(|edge| edge["node"]["id"].clone());
            match in_euros {
                Some(product) => break product,
                None if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                None => panic!("no product in EUR: {products}"),
            }
        };
        let cart = kernel
            .mutate(
                &customer,
                "createCart",
                "mutation ($input: CreateCartInput!) { createCart(input: $input) { cart { id } errors { code message } } }",
                json!({ "input": { "items": [{ "productId": product, "quantity": 2 }] } }),
            )
            .await
            .expect("createCart");
        let placed = kernel
            .mutate(
                &customer,
                "placeOrder",
                "mutation ($cart: UUID!) { placeOrder(input: { cartId: $cart, paymentMethod: \"card\", shippingAddress: { name: \"Ada\", line1: \"1 Main St\", city: \"Berlin\", postalCode: \"10115\", country: \"DE\" } }) { order { id } errors { code message } } }",
                json!({ "cart": cart["cart"]["id"] }),
            )
            .await
            .expect("placeOrder");
        let order = placed["order"]["id"].as_str().expect("order id").to_string();
        let live = kernel.live(&customer).await.expect("subscription socket");
        let status = tokio::time::timeout(Duration::from_secs(60), live.watch(&order))
            .await
            .expect("the order reached a final status within a minute")
            .expect("the subscription answered");
        // Step outputs are for admins.
        let steps = kernel
            .graphql(
                &admin,
                "query ($id: UUID!) { order(id: $id) { saga { steps { name status output } } } }",
                json!({ "id": order }),
            )
            .await
            .expect("order");
        (status, steps)
    });
    assert_eq!(
        status.as_ref().map(String::as_str),
        Ok("CONFIRMED"),
        "{steps}"
    );
    let steps = &steps["data"]["order"]["saga"]["steps"];
    assert_eq!(steps[1]["name"], "order-check", "{steps}");
    assert_eq!(steps[1]["status"], "SUCCEEDED", "{steps}");
    assert_eq!(steps[1]["output"], json!({ "items": 2 }), "{steps}");
    assert!(
        steps[2]["output"].to_string().contains("\"payment:"),
        "the reference the made payment plugin gave: {steps}"
    );
}
