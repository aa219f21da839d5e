//! The `commerce-kernel` binary as an operator runs it: start-up on the embedded
//! default, development tokens, SIGTERM, configuration errors, and the
//! committed GraphQL schema.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BINARY: &str = env!("CARGO_BIN_EXE_commerce-kernel");

/// Kills the child if a test fails before stopping it.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kernel(data_dir: &std::path::Path) -> Command {
    let mut command = Command::new(BINARY);
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("COMMERCE_DATA_DIR", data_dir)
        .env("COMMERCE_LISTEN_ADDR", "127.0.0.1:0")
        .env("COMMERCE_LOG", "info")
        .env("NO_COLOR", "1");
    command
}

/// Runs the binary with `args` on the embedded database in `data_dir`, to
/// its end: its exit code, stdout and stderr.
fn run_command(data_dir: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    let output = kernel(data_dir).args(args).output().expect("run");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A minimal HTTP/1.1 GET, so the test needs no client tool on the machine.
fn http_get(address: &str, path: &str) -> String {
    http(
        address,
        &format!("GET {path} HTTP/1.1\r\nHost: kernel\r\nConnection: close\r\n\r\n"),
    )
}

/// A GraphQL POST with an optional bearer token.
fn graphql_post(address: &str, token: Option<&str>, query: &str) -> String {
    let body = format!("{{\"query\":\"{query}\"}}");
    let authorization = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    http(
        address,
        &format!(
            "POST /graphql HTTP/1.1\r\nHost: kernel\r\nConnection: close\r\n{authorization}\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn http(address: &str, request: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(address).expect("connect to the kernel");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    stream.write_all(request.as_bytes()).expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    response
}

/// Runs `commerce-kernel token ...` on the data dir; its stdout, or its stderr as the error.
fn mint(data_dir: &std::path::Path, args: &[&str]) -> Result<String, String> {
    let output = kernel(data_dir)
        .arg("token")
        .args(args)
        .output()
        .expect("run the kernel");
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn wait_for_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Starts `commerce-kernel` on the data dir with `vars` set: the process,
/// the address it logged, and the rest of its log lines as they come.
fn serve(
    data_dir: &std::path::Path,
    vars: &[(&str, &str)],
) -> (KillOnDrop, String, std::sync::mpsc::Receiver<String>) {
    let mut child = KillOnDrop(
        kernel(data_dir)
            .envs(vars.iter().copied())
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
    // The one line that tells an operator where the kernel listens.
    let address = loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the kernel never logged its address");
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().expect("address").to_string();
        }
    };
    (child, address, lines_rx)
}

#[test]
fn runs_on_the_embedded_default_and_stops_cleanly_on_sigterm() {
    let data = tempfile::tempdir().expect("temp dir");
    let (mut child, address, lines_rx) = serve(data.path(), &[]);
    assert!(
        data.path().join("commerce.db").exists(),
        "no SQLite file under the data dir"
    );

    let health = http_get(&address, "/health");
    assert!(health.starts_with("HTTP/1.1 200"), "health: {health}");
    assert!(
        health.contains("\"backend\":\"sqlite\""),
        "health: {health}"
    );

    // The kernel made a development secret on first start; `token` signs
    // with it, and the running kernel accepts what it signs.
    let secret = data.path().join("jwt-secret");
    assert!(secret.exists(), "no development secret in the data dir");
    let admin = mint(data.path(), &["--sub", "ops", "--role", "admin"]).expect("admin token");
    let answer = graphql_post(&address, Some(&admin), "{ eventLogHead }");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"eventLogHead\""), "{answer}");
    let anonymous = graphql_post(&address, None, "{ eventLogHead }");
    assert!(anonymous.starts_with("HTTP/1.1 401"), "{anonymous}");
    assert!(anonymous.contains("UNAUTHENTICATED"), "{anonymous}");
    let customer = uuid::Uuid::now_v7().to_string();
    let customer =
        mint(data.path(), &["--sub", &customer, "--role", "customer"]).expect("customer token");
    let refused = graphql_post(&address, Some(&customer), "{ eventLogHead }");
    assert!(refused.contains("FORBIDDEN"), "{refused}");

    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(status.success());
    let exit = wait_for_exit(&mut child.0, Duration::from_secs(20))
        .expect("the kernel did not stop after SIGTERM");
    assert!(exit.success(), "exit status after SIGTERM: {exit}");
    let rest: Vec<String> = lines_rx.try_iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("stopped")),
        "no shutdown log: {rest:?}"
    );
}

/// `COMMERCE_LOG_FORMAT=json`: every line is one JSON object a log
/// collector can read, a request's lines carry its span's fields: the
/// trace of the caller's `traceparent`, and the request's correlation id.
#[test]
fn json_logs_are_one_object_per_line() {
    let data = tempfile::tempdir().expect("temp dir");
    let (mut child, address, lines_rx) = serve(
        data.path(),
        &[
            ("COMMERCE_LOG_FORMAT", "json"),
            ("COMMERCE_LOG", "info,tower_http=debug"),
        ],
    );
    let health = http_get(&address, "/health");
    assert!(health.starts_with("HTTP/1.1 200"), "health: {health}");
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let body = r#"{"query":"{ products { totalCount } }"}"#;
    let traced = http(
        &address,
        &format!(
            "POST /graphql HTTP/1.1\r\nHost: kernel\r\nConnection: close\r\n\
             traceparent: 00-{trace}-00f067aa0ba902b7-01\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(traced.starts_with("HTTP/1.1 200"), "{traced}");
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(status.success());
    wait_for_exit(&mut child.0, Duration::from_secs(20)).expect("stopped");
    let lines: Vec<serde_json::Value> = lines_rx
        .try_iter()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
        })
        .collect();
    assert!(
        lines.iter().all(|line| line["timestamp"].is_string()
            && line["level"].is_string()
            && line["target"].is_string()),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|line| line["span"]["uri"] == "/health"),
        "a request's lines carry its span: {lines:#?}"
    );
    assert!(
        lines.iter().any(|line| line["span"]["uri"] == "/graphql"
            && line["span"]["trace_id"] == trace
            && line["span"]["correlation_id"]
                .as_str()
                .is_some_and(|id| id.len() == 36)),
        "a request's lines carry its trace and correlation ids: {lines:#?}"
    );
    assert!(
        lines.iter().any(|line| line["message"] == "stopped"),
        "{lines:#?}"
    );
}

#[test]
fn bad_configuration_stops_start_up_naming_the_variable() {
    let data = tempfile::tempdir().expect("temp dir");
    for (variable, value) in [
        ("COMMERCE_LISTEN_ADDR", "localhost"),
        ("COMMERCE_DATABASE_URL", "mysql://x"),
        ("COMMERCE_REQUEST_TIMEOUT_SECS", "forever"),
        ("COMMERCE_LOG", "info,[[["),
        ("COMMERCE_LOG_FORMAT", "xml"),
    ] {
        let output = kernel(data.path())
            .env(variable, value)
            .output()
            .expect("run the kernel");
        assert_eq!(output.status.code(), Some(2), "{variable}={value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(variable), "{variable}={value}: {stderr}");
    }
}

#[test]
fn token_refuses_what_it_cannot_sign() {
    let data = tempfile::tempdir().expect("temp dir");
    let too_long = "x".repeat(300);
    let too_long = mint(data.path(), &["--sub", &too_long, "--role", "customer"]);
    assert!(too_long.unwrap_err().contains("1 to 256 bytes"));
    let unknown_role = mint(data.path(), &["--sub", "ops", "--role", "root"]);
    assert!(unknown_role.unwrap_err().contains("unknown role"));
    assert!(mint(data.path(), &["--sub", "ops"]).is_err());
    let output = kernel(data.path())
        .env("COMMERCE_JWKS_URL", "https://idp.example/jwks.json")
        .args(["token", "--sub", "ops", "--role", "admin"])
        .output()
        .expect("run the kernel");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("identity provider"));
}

#[test]
fn unknown_commands_are_refused() {
    let output = Command::new(BINARY)
        .arg("serev")
        .output()
        .expect("run the kernel");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown command `serev`"));
}

#[test]
fn migrate_prepares_the_database_and_exits() {
    let data = tempfile::tempdir().expect("temp dir");
    let output = kernel(data.path())
        .arg("migrate")
        .output()
        .expect("run the kernel");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(data.path().join("commerce.db").exists());
}

/// `seed --demo` creates and stocks the sample catalog once and says so; a
/// second run, and a kernel started with `COMMERCE_DEMO_CATALOG=true`,
/// change nothing; the catalog answers without a token.
#[test]
fn seed_demo_creates_the_sample_catalog_once() {
    let data = tempfile::tempdir().expect("temp dir");
    let seed = || {
        let output = kernel(data.path())
            .args(["seed", "--demo"])
            .output()
            .expect("run seed");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let first = seed();
    assert!(
        first.contains("6 products, 6 created now, 0 already there"),
        "{first}"
    );
    assert_eq!(first.matches("stocked with 100").count(), 6, "{first}");
    assert!(
        first.contains("12.50 EUR") && first.contains("19.00 USD"),
        "{first}"
    );
    assert!(first.contains("\"Authorization\": \"Bearer ey"), "{first}");
    let second = seed();
    assert!(
        second.contains("6 products, 0 created now, 6 already there"),
        "{second}"
    );
    assert_eq!(
        second.matches("stock left as it was").count(),
        6,
        "{second}"
    );

    let (_child, address, _lines) = serve(data.path(), &[("COMMERCE_DEMO_CATALOG", "true")]);
    let query = "{ products { totalCount edges { node { sku inventory { available } } } } }";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = graphql_post(&address, None, query);
        if answer.contains("\"totalCount\":6") {
            assert_eq!(answer.matches("\"available\":100").count(), 6, "{answer}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the catalog never showed: {answer}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // `watch` with a token the kernel refuses says so, with the server's reason.
    let refused = kernel(data.path())
        .args([
            "watch",
            &uuid::Uuid::now_v7().to_string(),
            "--token",
            "not-a-token",
        ])
        .args(["--url", &format!("http://{address}")])
        .output()
        .expect("run watch");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("UNAUTHENTICATED") && !stderr.contains("closed before connection_ack"),
        "{stderr}"
    );
}

/// The sha256 of the `order-limit` component the plugin tests install.
fn order_limit_sha256() -> String {
    let component = std::fs::read(commerce_plugin_artifacts::ORDER_LIMIT).expect("order-limit");
    commerce_plugin_host::sha256_hex(&component)
}

/// A folder under `parent` holding `order-limit` as plugin `limit` at
/// `version`, its manifest pinning `pinned`; its path.
fn limit_version(parent: &std::path::Path, version: &str, pinned: &str) -> String {
    let component = std::fs::read(commerce_plugin_artifacts::ORDER_LIMIT).expect("order-limit");
    let dir = parent.join(format!("upload-{version}"));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("limit.wasm"), &component).expect("component");
    std::fs::write(
        dir.join("plugin.toml"),
        format!(
            "name = \"limit\"\nversion = \"{version}\"\nkind = \"saga-step\"\n\
             component = \"limit.wasm\"\nsha256 = \"{pinned}\"\n"
        ),
    )
    .expect("manifest");
    dir.display().to_string()
}

/// `plugin install | list | activate | rollback` on the configured
/// database and directory: a kernel started on them runs what the CLI
/// activated, the events name `cli:<user>` as their actor, and bad input
/// is refused with a reason and exit status 1.
#[test]
fn the_plugin_commands_install_activate_and_roll_back() {
    let data = tempfile::tempdir().expect("temp dir");
    let plugin = |args: &[&str]| {
        let output = kernel(data.path())
            .env("USER", "ada")
            .arg("plugin")
            .args(args)
            .output()
            .expect("run plugin");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    // No shop here yet: refused, rather than a new one made for the plugin.
    let (code, _, stderr) = plugin(&["list"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("there is no kernel database at"),
        "{stderr}"
    );
    assert!(!data.path().join("commerce.db").exists());
    let migrated = kernel(data.path())
        .arg("migrate")
        .output()
        .expect("migrate");
    assert!(migrated.status.success());

    let sha256 = order_limit_sha256();
    let version_dir = |version: &str, pinned: &str| limit_version(data.path(), version, pinned);

    for version in ["2.0.0", "2.0.1"] {
        let (code, stdout, stderr) = plugin(&["install", &version_dir(version, &sha256)]);
        assert_eq!(code, Some(0), "{stdout}{stderr}");
        assert!(
            stdout.contains(&format!("installed limit@{version}")),
            "{stdout}"
        );
    }
    for version in ["2.0.0", "2.0.1"] {
        let (code, stdout, stderr) = plugin(&["activate", "limit", version]);
        assert_eq!(code, Some(0), "{stdout}{stderr}");
    }
    let (code, stdout, _) = plugin(&["rollback", "limit"]);
    assert_eq!(
        (code, stdout.trim()),
        (Some(0), "rolled limit back to 2.0.0")
    );
    let (_, listed, _) = plugin(&["list"]);
    let line = listed
        .lines()
        .find(|line| line.starts_with("limit "))
        .unwrap_or_else(|| panic!("limit is listed: {listed}"));
    assert!(
        line.contains("active: 2.0.0") && line.contains("installed: 2.0.0, 2.0.1"),
        "{listed}"
    );

    // Refused, with the reason, and nothing recorded.
    let wrong_pin = "0".repeat(64);
    for (args, reason) in [
        (
            vec!["install".to_string(), version_dir("3.0.0", &wrong_pin)],
            "sha256",
        ),
        (
            vec!["install".to_string(), "/nonexistent".to_string()],
            "/nonexistent",
        ),
        (
            vec!["activate".into(), "limit".into(), "9.9.9".into()],
            "9.9.9",
        ),
        (
            vec!["rollback".into(), "nothing-here".into()],
            "nothing-here",
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stdout, stderr) = plugin(&args);
        assert_eq!(code, Some(1), "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    }
    let (code, _, _) = plugin(&["activate", "limit"]);
    assert_eq!(code, Some(2), "a missing version is a usage error");

    // A kernel on the same data runs what the CLI chose.
    let (_child, address, _lines) = serve(data.path(), &[]);
    let admin = mint(data.path(), &["--sub", "ops", "--role", "admin"]).expect("admin token");
    let answer = graphql_post(
        &address,
        Some(&admin),
        "{ plugins { edges { node { name activeVersion { version } } } } events(aggregateType: \\\"plugin\\\") { edges { node { eventType actor } } } }",
    );
    assert!(
        answer.contains("{\"name\":\"limit\",\"activeVersion\":{\"version\":\"2.0.0\"}}"),
        "{answer}"
    );
    let limit_events = answer.matches("\"actor\":\"cli:ada\"").count();
    assert_eq!(
        limit_events, 5,
        "two installs, two activations, one rollback: {answer}"
    );
}

/// `plugin --url … --token …`: the same commands through a running
/// kernel's API, recorded with the token's admin as the actor; a customer's
/// token, a refused component and missing flags are refused with reasons.
#[test]
fn the_plugin_commands_work_against_a_running_kernel() {
    let data = tempfile::tempdir().expect("temp dir");
    let (_child, address, _lines) = serve(data.path(), &[]);
    let url = format!("http://{address}");
    let admin = mint(data.path(), &["--sub", "ops", "--role", "admin"]).expect("admin token");
    let customer = mint(
        data.path(),
        &[
            "--sub",
            &uuid::Uuid::now_v7().to_string(),
            "--role",
            "customer",
        ],
    )
    .expect("customer token");
    // Another machine: no database or plugin directory of the kernel's.
    let elsewhere = tempfile::tempdir().expect("temp dir");
    let plugin = |flags: &[&str], args: &[&str]| {
        let output = kernel(elsewhere.path())
            .arg("plugin")
            .args(flags)
            .args(args)
            .output()
            .expect("run plugin");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let as_admin = ["--url", url.as_str(), "--token", admin.as_str()];
    let sha256 = order_limit_sha256();
    let version_dir =
        |version: &str, pinned: &str| limit_version(elsewhere.path(), version, pinned);

    for version in ["2.0.0", "2.0.1"] {
        let (code, stdout, stderr) =
            plugin(&as_admin, &["install", &version_dir(version, &sha256)]);
        assert_eq!(code, Some(0), "{stdout}{stderr}");
        assert!(
            stdout.contains(&format!(
                "installed limit@{version} (sha256 {sha256}) on {url}"
            )),
            "{stdout}"
        );
        let (code, stdout, stderr) = plugin(&as_admin, &["activate", "limit", version]);
        assert_eq!(code, Some(0), "{stdout}{stderr}");
    }
    let (code, stdout, _) = plugin(&as_admin, &["rollback", "limit"]);
    assert_eq!(
        (code, stdout.trim()),
        (
            Some(0),
            format!("rolled limit back to 2.0.0 on {url}").as_str()
        )
    );
    let (code, listed, _) = plugin(&as_admin, &["list"]);
    assert_eq!(code, Some(0));
    let line = listed
        .lines()
        .find(|line| line.starts_with("limit "))
        .unwrap_or_else(|| panic!("limit is listed: {listed}"));
    assert!(
        line.contains("active: 2.0.0") && line.contains("installed: 2.0.0, 2.0.1"),
        "{listed}"
    );

    // Refused by the kernel, with its reason, and nothing recorded.
    let as_customer = ["--url", url.as_str(), "--token", customer.as_str()];
    for (flags, args, reason) in [
        (
            &as_customer,
            vec!["install".to_string(), version_dir("3.0.0", &sha256)],
            "FORBIDDEN",
        ),
        (&as_customer, vec!["list".to_string()], "FORBIDDEN"),
        (
            &as_admin,
            vec!["install".to_string(), version_dir("3.0.1", &"0".repeat(64))],
            "sha256",
        ),
        (
            &as_admin,
            vec!["activate".into(), "limit".into(), "9.9.9".into()],
            "9.9.9",
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stdout, stderr) = plugin(flags, &args);
        assert_eq!(code, Some(1), "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    }
    // Usage errors: a URL without a token, a token without a URL.
    assert_eq!(plugin(&["--url", url.as_str()], &["list"]).0, Some(2));
    assert_eq!(plugin(&["--token", admin.as_str()], &["list"]).0, Some(2));

    let answer = graphql_post(
        &address,
        Some(&admin),
        "{ events(aggregateType: \\\"plugin\\\") { edges { node { eventType actor } } } }",
    );
    assert_eq!(
        answer.matches("\"actor\":\"admin:ops\"").count(),
        5,
        "two installs, two activations, one rollback, by the token's admin: {answer}"
    );
}

#[test]
fn committed_schema_matches_the_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../schema.graphql");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == commerce_kernel::api::sdl(),
        "schema.graphql is out of date: run `cargo run -q -- schema > schema.graphql`"
    );
}

/// `reconcile-inventory`: clean on a shop with the demo catalog, projected
/// by a kernel that ran (exit 0); a read-model
/// row edited behind the events' back is reported (exit 1, the product
/// named) and left alone; `--repair` rebuilds the read model from the
/// events, after which nothing is found. On the embedded database, and on
/// Postgres when `COMMERCE_TEST_DATABASE_URL` is set.
#[test]
fn reconcile_inventory_reports_drift_and_repairs_it() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let data = tempfile::tempdir().expect("temp dir");
    let sqlite = format!("sqlite://{}", data.path().join("commerce.db").display());
    let mut databases = vec![sqlite];
    let postgres = std::env::var("COMMERCE_TEST_DATABASE_URL")
        .ok()
        .filter(|url| !url.is_empty());
    let schema = format!("cli_{}", uuid::Uuid::new_v4().simple());
    if let Some(url) = &postgres {
        runtime.block_on(async {
            use sqlx::Connection as _;
            let mut admin = sqlx::PgConnection::connect(url).await.expect("postgres");
            sqlx::query(&format!("CREATE SCHEMA {schema}"))
                .execute(&mut admin)
                .await
                .expect("schema");
        });
        let separator = if url.contains('?') { '&' } else { '?' };
        databases.push(format!(
            "{url}{separator}options=-c%20search_path%3D{schema}"
        ));
    }
    for database in databases {
        let run = |args: &[&str]| {
            let output = kernel(data.path())
                .env("COMMERCE_DATABASE_URL", &database)
                .env("COMMERCE_JWT_SECRET", "cli-test-secret-cli-test-secret-xx")
                .args(args)
                .output()
                .expect("run the kernel");
            (
                output.status.code(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
            )
        };
        // A kernel creates the demo catalog and projects its stock.
        let (mut child, _, _) = serve(
            data.path(),
            &[
                ("COMMERCE_DATABASE_URL", &database),
                ("COMMERCE_JWT_SECRET", "cli-test-secret-cli-test-secret-xx"),
                ("COMMERCE_DEMO_CATALOG", "true"),
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        // Every product's stock, not only the first: a row not yet
        // projected would be missing to the check.
        while runtime.block_on(async {
            let (stock, products) = (
                rows(&database, "inventory_views").await,
                rows(&database, "product_views").await,
            );
            stock == 0 || stock != products
        }) {
            assert!(
                Instant::now() < deadline,
                "the demo stock was never projected"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let status = Command::new("kill")
            .args(["-TERM", &child.0.id().to_string()])
            .status()
            .expect("send SIGTERM");
        assert!(status.success());
        wait_for_exit(&mut child.0, Duration::from_secs(20)).expect("stopped");

        let (code, clean) = run(&["reconcile-inventory"]);
        assert_eq!(code, Some(0), "{clean}");
        assert!(clean.contains("no drift left"), "{clean}");

        let product: uuid::Uuid = runtime.block_on(async {
            if database.starts_with("sqlite") {
                let pool = sqlx::SqlitePool::connect(&database).await.expect("sqlite");
                let (product,): (uuid::Uuid,) = sqlx::query_as(
                    "UPDATE inventory_views SET on_hand = on_hand + 3 \
                     WHERE product_id = (SELECT MIN(product_id) FROM inventory_views) \
                     RETURNING product_id",
                )
                .fetch_one(&pool)
                .await
                .expect("edit a row");
                pool.close().await;
                product
            } else {
                let pool = sqlx::PgPool::connect(&database).await.expect("postgres");
                let (product,): (uuid::Uuid,) = sqlx::query_as(
                    "UPDATE inventory_views SET on_hand = on_hand + 3 \
                     WHERE product_id = (SELECT MIN(product_id::text)::uuid FROM inventory_views) \
                     RETURNING product_id",
                )
                .fetch_one(&pool)
                .await
                .expect("edit a row");
                pool.close().await;
                product
            }
        });
        let (code, found) = run(&["reconcile-inventory"]);
        assert_eq!(code, Some(1), "{found}");
        assert!(
            found.contains(&format!("drift: product {product} ReadModel"))
                && found.contains("1 product(s) with drift left"),
            "{found}"
        );
        let (code, again) = run(&["reconcile-inventory"]);
        assert_eq!(code, Some(1), "reporting repairs nothing: {again}");

        let (code, repaired) = run(&["reconcile-inventory", "--repair"]);
        assert_eq!(code, Some(0), "{repaired}");
        assert!(
            repaired.contains("rebuilt the inventory read model"),
            "{repaired}"
        );
        let (code, after) = run(&["reconcile-inventory"]);
        assert_eq!(code, Some(0), "{after}");
        assert!(after.contains("no drift left"), "{after}");

        // `rebuild-projections`: a catalog row renamed behind the events'
        // back is put right; an unknown read model is refused.
        let names = |database: &str| {
            let database = database.to_string();
            runtime.block_on(async move {
                let query = "SELECT name FROM product_views ORDER BY product_id";
                if database.starts_with("sqlite") {
                    let pool = sqlx::SqlitePool::connect(&database).await.expect("sqlite");
                    let names: Vec<String> = sqlx::query_scalar(query)
                        .fetch_all(&pool)
                        .await
                        .expect("names");
                    pool.close().await;
                    names
                } else {
                    let pool = sqlx::PgPool::connect(&database).await.expect("postgres");
                    let names: Vec<String> = sqlx::query_scalar(query)
                        .fetch_all(&pool)
                        .await
                        .expect("names");
                    pool.close().await;
                    names
                }
            })
        };
        let catalog = names(&database);
        let rename = "UPDATE product_views SET name = 'renamed by hand'";
        runtime.block_on(async {
            if database.starts_with("sqlite") {
                let pool = sqlx::SqlitePool::connect(&database).await.expect("sqlite");
                sqlx::query(rename).execute(&pool).await.expect("rename");
                pool.close().await;
            } else {
                let pool = sqlx::PgPool::connect(&database).await.expect("postgres");
                sqlx::query(rename).execute(&pool).await.expect("rename");
                pool.close().await;
            }
        });
        assert_ne!(names(&database), catalog);
        let (code, rebuilt) = run(&["rebuild-projections", "products"]);
        assert_eq!(code, Some(0), "{rebuilt}");
        assert!(rebuilt.contains("rebuilt products in"), "{rebuilt}");
        assert_eq!(names(&database), catalog, "{rebuilt}");
        let (code, _) = run(&["rebuild-projections", "prices"]);
        assert_eq!(code, Some(2));
    }
    if let Some(url) = &postgres {
        runtime.block_on(async {
            use sqlx::Connection as _;
            let mut admin = sqlx::PgConnection::connect(url).await.expect("postgres");
            sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                .execute(&mut admin)
                .await
                .expect("drop the schema");
        });
    }
}

/// Rows of a read model's table.
async fn rows(database: &str, table: &str) -> i64 {
    let count = format!("SELECT COUNT(*) FROM {table}");
    if database.starts_with("sqlite") {
        let pool = sqlx::SqlitePool::connect(database).await.expect("sqlite");
        let (rows,): (i64,) = sqlx::query_as(&count)
            .fetch_one(&pool)
            .await
            .unwrap_or((0,));
        pool.close().await;
        rows
    } else {
        let pool = sqlx::PgPool::connect(database).await.expect("postgres");
        let (rows,): (i64,) = sqlx::query_as(&count)
            .fetch_one(&pool)
            .await
            .unwrap_or((0,));
        pool.close().await;
        rows
    }
}

/// `prune`: a dry run by default, `--apply` deletes, a retention outside
/// 1..=36500 days is refused naming its option (exit 2).
#[test]
fn prune_is_a_dry_run_unless_applied() {
    let data = tempfile::tempdir().expect("temp dir");
    let run = |args: &[&str]| run_command(data.path(), args);
    let (code, out, _) = run(&["prune"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("finished sagas: 0 would go") && out.contains("dry run: nothing deleted"),
        "{out}"
    );
    let (code, out, _) = run(&["prune", "--apply", "--cart-days", "30"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("cart activity: 0 deleted") && !out.contains("dry run"),
        "{out}"
    );
    for (flag, value) in [
        ("--saga-days", "0"),
        ("--idempotency-days", "forever"),
        ("--cart-days", "36501"),
    ] {
        let (code, _, err) = run(&["prune", flag, value]);
        assert_eq!(code, Some(2), "{flag} {value}");
        assert!(err.contains(flag), "{flag} {value}: {err}");
    }
}

/// `abandoned-carts`: the abandonment analysis from the cart record, here
/// rows written as the activity recorder would have written them days ago:
/// two carts left (one expired since), one bought. Bad options exit 2.
#[test]
fn abandoned_carts_are_counted_by_idle_age() {
    let data = tempfile::tempdir().expect("temp dir");
    let run = |args: &[&str]| run_command(data.path(), args);
    let (code, out, _) = run(&["abandoned-carts"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("abandonment rate: none yet"), "{out}");

    let now = chrono::Utc::now();
    let days = |n: i64| (now - chrono::Duration::days(n)).timestamp_micros();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let url = format!("sqlite://{}", data.path().join("commerce.db").display());
        let pool = sqlx::SqlitePool::connect(&url).await.expect("database");
        // (idle days, expired, checked out)
        for (idle, expired, bought) in [(2, true, false), (40, false, false), (3, false, true)] {
            sqlx::query(
                "INSERT INTO cart_activity (cart_id, owner_kind, owner_id, status, version, \
                 line_count, created_at, last_activity_at, expires_at, checked_out_at, order_id) \
                 VALUES (?1, 'session', 'visitor', ?2, 2, 1, ?3, ?4, ?5, ?6, NULL)",
            )
            .bind(uuid::Uuid::now_v7())
            .bind(if bought { "CHECKED_OUT" } else { "OPEN" })
            .bind(days(idle + 1))
            .bind(days(idle))
            .bind(if expired { days(1) } else { days(-5) })
            .bind(bought.then(|| days(idle)))
            .execute(&pool)
            .await
            .expect("insert");
        }
        pool.close().await;
    });
    let (code, out, _) = run(&["abandoned-carts", "--hours", "24"]);
    assert_eq!(code, Some(0), "{out}");
    for line in [
        "abandoned (idle 24 h, never checked out): 2 (1 expired)",
        "checked out: 1",
        "abandonment rate: 66.7%",
        "idle under 24 h: 0",
        "idle 24 h to 168 h: 1",
        "idle 168 h to 720 h: 0",
        "idle 720 h or more: 1",
    ] {
        assert!(out.lines().any(|printed| printed == line), "{line}:\n{out}");
    }
    for bad in [
        &["--hours", "0"][..],
        &["--hours", "soon"],
        &["--days", "2"],
    ] {
        let mut args = vec!["abandoned-carts"];
        args.extend_from_slice(bad);
        let (code, _, err) = run(&args);
        assert_eq!(code, Some(2), "{bad:?}: {err}");
    }
}

/// `sagas`: a saga left as a node that claimed it and died leaves it (due
/// ten minutes ago, its lease held by `node-gone`) is listed as overdue
/// with its order and lease owner, not as parked; `sagas compensate`
/// requests its compensation (an event by the command line's actor) and
/// refuses an unknown saga with exit 1; bad options exit 2.
#[test]
fn sagas_lists_overdue_sagas_and_compensates_them() {
    use commerce_kernel::commerce::{CommandContext, Commerce, NewProduct, PlaceOrderInput, Sagas};
    use commerce_kernel::domain::money::{Currency, Money};
    use commerce_kernel::domain::order::Address;
    use commerce_kernel::storage::{Database, DatabaseConfig};

    let data = tempfile::tempdir().expect("temp dir");
    let run = |args: &[&str]| run_command(data.path(), args);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let config = DatabaseConfig::Sqlite {
        path: data.path().join("commerce.db"),
    };
    let context = CommandContext {
        actor: Some("test".into()),
        correlation_id: None,
    };
    // An order whose saga started and no runner ever took.
    let (order, saga) = runtime.block_on(async {
        let database = Database::connect(&config).await.expect("database");
        database.migrate().await.expect("migrate");
        let commerce = Commerce::new(database.event_store(), database.view_store());
        let product = commerce
            .create_product(
                NewProduct {
                    sku: "CUP-1".into(),
                    name: "Cup".into(),
                    price: Money::new(
                        "4.50".parse().expect("price"),
                        Currency::parse("EUR").expect("EUR"),
                    )
                    .expect("money"),
                    active: true,
                },
                &context,
            )
            .await
            .expect("product")
            .id;
        let order = commerce
            .place_order(
                PlaceOrderInput {
                    customer_id: uuid::Uuid::now_v7(),
                    lines: vec![(product, 1)],
                    shipping_address: Address {
                        name: "Ada".into(),
                        line1: "1 Main St".into(),
                        line2: None,
                        city: "Berlin".into(),
                        postal_code: "10115".into(),
                        region: None,
                        country: "DE".into(),
                    },
                    payment_method: "card".into(),
                    idempotency_key: None,
                    email: None,
                },
                &context,
            )
            .await
            .expect("order")
            .id;
        let sagas = Sagas::new(commerce, database.saga_store());
        let saga = sagas.start_for_order(order, &context).await.expect("saga");
        let now = "CAST(unixepoch('subsec') * 1000000 AS INTEGER)";
        let url = format!("sqlite://{}", data.path().join("commerce.db").display());
        let pool = sqlx::SqlitePool::connect(&url).await.expect("sqlite");
        let taken = sqlx::query(&format!(
            "UPDATE saga_instances SET lease_owner = 'node-gone', \
             lease_expires_at = {now} + 3600000000, next_run_at = {now} - 600000000"
        ))
        .execute(&pool)
        .await
        .expect("age the saga");
        assert_eq!(taken.rows_affected(), 1);
        pool.close().await;
        database.close().await;
        (order, saga)
    });

    let (code, parked, _) = run(&["sagas"]);
    assert_eq!(code, Some(0), "{parked}");
    let has_line = |out: &str, line: &str| out.lines().any(|printed| printed == line);
    assert!(has_line(&parked, "0 saga(s)"), "{parked}");
    let (code, listed, _) = run(&["sagas", "--overdue", "300"]);
    assert_eq!(code, Some(0), "{listed}");
    assert!(
        listed.contains(&format!("{saga} order {order} RUNNING"))
            && listed.contains("lease node-gone")
            && has_line(&listed, "1 saga(s)"),
        "{listed}"
    );
    let (_, later, _) = run(&["sagas", "--overdue", "3600"]);
    assert!(has_line(&later, "0 saga(s)"), "{later}");
    // Nothing parked: nothing retried, the running saga left alone.
    let (code, retried, _) = run(&["sagas", "retry-parked", "--first", "10"]);
    assert_eq!(code, Some(0), "{retried}");
    assert!(has_line(&retried, "0 retried"), "{retried}");

    let unknown = uuid::Uuid::now_v7().to_string();
    let (code, out, _) = run(&[
        "sagas",
        "compensate",
        "--reason",
        "stuck since the outage",
        &saga.to_string(),
        &unknown,
        &saga.to_string(),
    ]);
    assert_eq!(code, Some(1), "one refused: {out}");
    assert!(
        has_line(&out, &format!("{saga} compensation requested"))
            && out
                .lines()
                .filter(|line| line.starts_with(&saga.to_string()))
                .count()
                == 1
            && out.contains(&format!("{unknown} refused")),
        "a repeated id counts once: {out}"
    );
    let (code, again, _) = run(&[
        "sagas",
        "compensate",
        "--reason",
        "stuck since the outage",
        &saga.to_string(),
    ]);
    assert_eq!(code, Some(0), "{again}");
    assert!(
        has_line(
            &again,
            &format!("{saga} unchanged: its compensation was requested already")
        ),
        "{again}"
    );
    let requested = runtime.block_on(async {
        let database = Database::connect(&config).await.expect("database");
        let commerce = Commerce::new(database.event_store(), database.view_store());
        let loaded = Sagas::new(commerce, database.saga_store())
            .load(saga)
            .await
            .expect("saga");
        let events = database
            .event_store()
            .read_streams(&[saga])
            .await
            .expect("events");
        database.close().await;
        (
            loaded.state.requested.map(|r| r.reason),
            events.last().and_then(|e| e.metadata.actor.clone()),
        )
    });
    assert_eq!(requested.0.as_deref(), Some("stuck since the outage"));
    assert!(
        requested.1.is_some_and(|actor| actor.starts_with("cli:")),
        "the request is the command line's"
    );
    // Retried by id: the request is recorded (the runner acts on it once it
    // holds the saga); an unknown saga is refused.
    let (code, retried, _) = run(&["sagas", "retry", &saga.to_string()]);
    assert_eq!(code, Some(0), "{retried}");
    assert!(has_line(&retried, &format!("{saga} retried")), "{retried}");
    let (code, _, _) = run(&["sagas", "retry", &unknown]);
    assert_eq!(code, Some(1));

    for bad in [
        &["--overdue", "soon"][..],
        &["retry-parked", "--first", "0"],
        &["compensate", "--reason", "x"],
        &["compensate", "--reason", "x", "not-a-uuid"],
        &[
            "compensate",
            "--reason",
            "  ",
            "0199a6f0-0000-7000-8000-000000000000",
        ],
        &["--everything"],
        &["retry"],
        &["retry", "later"],
    ] {
        let mut args = vec!["sagas"];
        args.extend_from_slice(bad);
        let (code, _, err) = run(&args);
        assert_eq!(code, Some(2), "{bad:?}: {err}");
    }
}
