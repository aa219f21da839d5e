//! `commerce-kernel`: runs the kernel (`serve`, the default), applies migrations
//! (`migrate`), prints the GraphQL schema (`schema`), mints a development
//! token (`token`), creates a sample catalog (`seed --demo`), or puts a
//! storefront's load on a running kernel (`loadtest`).

use std::process::ExitCode;

use std::time::Duration;

use commerce_kernel::auth::{Authenticator, Role};
use commerce_kernel::config::Config;
use commerce_kernel::server::{self, KernelError};
use commerce_kernel::storage::Database;
use commerce_kernel::telemetry::{Telemetry, TelemetryError};

/// The kernel allocates and frees small buffers on many threads for every
/// request, statement and plugin call; with glibc's allocator that was a
/// fifth of the kernel's CPU under load (`perf`, BENCHMARKS.md). Only the
/// binary sets it: the library and its tests use the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "\
usage: commerce-kernel [COMMAND]

commands:
  serve     run the kernel (default)
  migrate   bring the database schema up to date, then exit
  schema    print the GraphQL schema (SDL) to stdout
  token --sub <id> --role <customer|admin> [--ttl <seconds>]
            print a bearer token signed with the configured HS256 secret
            (a customer's UUID subject is their id; any other subject maps to
            one, see README; default lifetime 86400 seconds)
  seed --demo
            create a small sample catalog (prices in EUR and USD, stock),
            unless it exists, and print it with a customer token to use
  plugin install <dir> | list | activate <name> <version> | rollback <name>
            manage plugins in the configured database and plugin directory,
            recorded as events of the actor cli:<user>; running kernels
            sharing both follow within seconds (see plugins/README.md)
  plugin --url <kernel url> [--token <admin token>] install <dir> | list | ...
            the same through a running kernel's GraphQL API, as that admin
            (the token may come from COMMERCE_TOKEN instead)
  plugin new <name> --kind <payment|shipping|saga-step> [--dir <folder>]
            write a ready-to-build plugin crate into <folder>/<name>
  watch <order id> --token <token> [--url http://localhost:8084]
            follow an order live over the orderStatusChanged subscription,
            a line per status, until it is final (exit 0 once CONFIRMED)
  reconcile-inventory [--repair]
            replay every inventory stream and compare it with the stock read
            model and with the orders holding its reservations; --repair
            releases reservations held for ended orders (events) and rebuilds
            a read model that disagrees. Exit 0 when nothing is left to repair
  sagas [--parked | --overdue SECONDS]
            list parked sagas (the default) or those due for SECONDS and not
            run, oldest first (at most 200), a line each: saga, order, status,
            step, lease owner, reason
  sagas retry <saga id>... | retry-parked [--first N]
            go on with these sagas now (a parked one resumes compensating), or
            with the oldest N parked ones (default 50), as retrySaga does
  sagas compensate --reason TEXT <saga id>...
            request each saga's compensation (its order ends FAILED)
  rebuild-projections [products|inventory|orders]
            rebuild a read model (default: all) from the event log into shadow
            tables and swap it in, while kernels keep serving; queries never
            see it half-built (see docs/runbooks.md)
  prune [--apply] [--idempotency-days N] [--saga-days N] [--cart-days N]
            count (with --apply, delete) idempotency keys, rows of finished
            sagas and cart activity older than N days (30, 90, 365); events
            are never deleted
  abandoned-carts [--hours H]
            carts idle H hours (default 24) and never checked out: how many,
            the abandonment rate, and how long they have been idle
  loadtest [options]
            place orders on a running kernel as a storefront does and
            report orders/s, latencies and CPU per order (`loadtest --help`)
  help      print this message

Configuration comes from COMMERCE_* environment variables; see README.md.
With COMMERCE_DATABASE_URL unset, data is kept in SQLite under ./data/.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match args.as_slice() {
        [] => "serve",
        [first, ..] if first == "token" => return token(&args[1..]),
        [first, ..] if first == "loadtest" => return loadtest(&args[1..]),
        [first, ..] if first == "seed" => return seed(&args[1..]),
        [first, ..] if first == "reconcile-inventory" => {
            return reconcile_inventory(&args[1..]);
        }
        [first, ..] if first == "prune" => return prune(&args[1..]),
        [first, ..] if first == "abandoned-carts" => return abandoned_carts(&args[1..]),
        [first, ..] if first == "sagas" => return sagas(&args[1..]),
        [first, ..] if first == "rebuild-projections" => {
            return rebuild_projections(&args[1..]);
        }
        [first, ..] if first == "watch" => return watch(&args[1..]),
        [first, ..] if first == "plugin" => return plugin(&args[1..]),
        [one] => one.as_str(),
        _ => {
            eprintln!("commerce-kernel: expected at most one command\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match command {
        "serve" | "migrate" => {}
        "schema" => {
            print!("{}", commerce_kernel::api::sdl());
            return ExitCode::SUCCESS;
        }
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        "-V" | "--version" => {
            println!("commerce-kernel {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        other => {
            eprintln!("commerce-kernel: unknown command `{other}`\n\n{USAGE}");
            return ExitCode::from(2);
        }
    }

    let config = match config_from_env() {
        Ok(config) => config,
        Err(code) => return code,
    };
    let runtime = match multi_thread_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let telemetry = match Telemetry::init(&config.telemetry, runtime.handle().clone()) {
        Ok(telemetry) => telemetry,
        Err(TelemetryError::Config(error)) => {
            eprintln!("commerce-kernel: invalid configuration: {error}");
            return ExitCode::from(2);
        }
        Err(error) => {
            eprintln!("commerce-kernel: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        if command == "migrate" {
            migrate(&config).await
        } else {
            server::run(config, server::shutdown_signal(), |_| {}).await
        }
    });
    // The last spans leave while the runtime that sends them still runs.
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "commerce-kernel stopped");
            eprintln!("commerce-kernel: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `token --sub <id> --role <role> [--ttl <seconds>]`: prints a token.
fn token(args: &[String]) -> ExitCode {
    let usage = |problem: &str| {
        eprintln!("commerce-kernel token: {problem}\n\n{USAGE}");
        ExitCode::from(2)
    };
    let (mut subject, mut role, mut ttl) = (None, None, 86_400u64);
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let Some(value) = rest.next() else {
            return usage(&format!("{flag} needs a value"));
        };
        match flag.as_str() {
            "--sub" => subject = Some(value.clone()),
            "--role" => match Role::parse(value) {
                Some(parsed) => role = Some(parsed),
                None => return usage(&format!("unknown role `{value}`")),
            },
            "--ttl" => match value.parse::<u64>() {
                Ok(seconds) if (1..=31_536_000).contains(&seconds) => ttl = seconds,
                _ => return usage("--ttl is a number of seconds, 1 to 31536000"),
            },
            other => return usage(&format!("unknown option `{other}`")),
        }
    }
    let (Some(subject), Some(role)) = (subject, role) else {
        return usage("--sub and --role are required");
    };
    let config = match config_from_env() {
        Ok(config) => config,
        Err(code) => return code,
    };
    let minted = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(async {
            let auth = Authenticator::open(&config.auth).await?;
            auth.mint(&subject, role, Duration::from_secs(ttl))
        }),
        Err(error) => {
            eprintln!("commerce-kernel: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match minted {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("commerce-kernel token: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `seed --demo`: the demo catalog, created where missing, then printed
/// with a customer token.
fn seed(args: &[String]) -> ExitCode {
    use commerce_kernel::commerce::Commerce;
    if args != ["--demo"] {
        eprintln!("commerce-kernel seed: the one seed is `seed --demo`\n\n{USAGE}");
        return ExitCode::from(2);
    }
    let config = match config_from_env() {
        Ok(config) => config,
        Err(code) => return code,
    };
    let runtime = match multi_thread_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let seeded = runtime.block_on(async {
        let database = open_database(&config).await?;
        let commerce = Commerce::new(database.event_store(), database.view_store());
        let context = cli_context();
        let seeded = commerce
            .seed_demo_catalog(&context)
            .await
            .map_err(|error| error.to_string());
        database.close().await;
        let token = match Authenticator::open(&config.auth).await {
            Ok(auth) => auth
                .mint(
                    "demo-customer",
                    Role::Customer,
                    Duration::from_secs(7 * 86_400),
                )
                .ok(),
            Err(_) => None,
        };
        seeded.map(|seeded| (seeded, token))
    });
    let (products, token) = match seeded {
        Ok(seeded) => seeded,
        Err(error) => {
            eprintln!("commerce-kernel seed: {error}");
            return ExitCode::FAILURE;
        }
    };
    let created = products.iter().filter(|p| p.created).count();
    println!(
        "Demo catalog: {} products, {created} created now, {} already there.",
        products.len(),
        products.len() - created
    );
    for product in &products {
        let stock = if product.stocked {
            format!("stocked with {}", commerce_kernel::commerce::DEMO_STOCK)
        } else {
            "stock left as it was".to_string()
        };
        println!(
            "  {:<11} {:<24} {:>9}  {}  {stock}",
            product.sku,
            product.name,
            // The demo's currencies have cents.
            format!(
                "{:.2} {}",
                product.price.amount(),
                product.price.currency().code()
            ),
            product.product_id
        );
    }
    match token {
        Some(token) => println!(
            "\nA customer token (subject demo-customer, valid 7 days), for GraphiQL's headers pane:\n  \
             {{\"Authorization\": \"Bearer {token}\"}}"
        ),
        None => println!(
            "\nTokens come from your identity provider here; guests may also start a session with \
             createGuestSession."
        ),
    }
    println!(
        "\nThe catalog needs no token:\n  {{ products {{ edges {{ node {{ id sku name price {{ amount currency }} inventory {{ available }} }} }} }} }}"
    );
    ExitCode::SUCCESS
}

/// `watch <order id> --token <token> [--url <kernel>]`: prints each status
/// of the order as the subscription reports it, until a final one.
fn watch(args: &[String]) -> ExitCode {
    use commerce_kernel::loadtest::storefront::Storefront;
    let usage = |problem: &str| {
        eprintln!("commerce-kernel watch: {problem}\n\n{USAGE}");
        ExitCode::from(2)
    };
    let (order, options) = match argument_and_options(args, &["--token", "--url"]) {
        Ok(parsed) => parsed,
        Err(problem) => return usage(&problem),
    };
    let token = option(&options, "--token");
    let url = option(&options, "--url").unwrap_or_else(|| "http://localhost:8084".to_string());
    let (Some(order), Some(token)) = (order, token) else {
        return usage("an order id and --token are required");
    };
    if uuid::Uuid::parse_str(&order).is_err() {
        return usage(&format!("`{order}` is not an order id"));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("commerce-kernel: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let last = runtime.block_on(async {
        let storefront = Storefront::new(&url).map_err(|error| error.to_string())?;
        let live = storefront
            .live(&token)
            .await
            .map_err(|error| error.to_string())?;
        let mut statuses = live.follow(&order);
        let mut last = None;
        while let Some(status) = statuses.recv().await {
            let status = status.map_err(|error| error.to_string())?;
            // Each of the saga's steps is reported; the status changes less often.
            if last.as_ref() != Some(&status) {
                println!("{status}");
            }
            last = Some(status);
        }
        last.ok_or_else(|| "the subscription ended without a status".to_string())
    });
    match last {
        Ok(status) if status == "CONFIRMED" => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("commerce-kernel watch: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `plugin new …`, or `plugin [--url <url> [--token <token>]] install <dir>
/// | list | activate <name> <version> | rollback <name>`: on the configured
/// database and plugin directory, or through a running kernel's API.
fn plugin(args: &[String]) -> ExitCode {
    use commerce_kernel::commerce::{Commerce, Plugins};
    use commerce_plugin_host::{EngineConfig, PluginRegistry};
    let usage = |problem: &str| {
        eprintln!("commerce-kernel plugin: {problem}\n\n{USAGE}");
        ExitCode::from(2)
    };
    if args.first().map(String::as_str) == Some("new") {
        return plugin_new(&args[1..]);
    }
    let (mut url, mut token, mut rest) = (None, None, args);
    while let [flag, value, tail @ ..] = rest {
        match flag.as_str() {
            "--url" => url = Some(value.clone()),
            "--token" => token = Some(value.clone()),
            _ => break,
        }
        rest = tail;
    }
    let words: Vec<&str> = rest.iter().map(String::as_str).collect();
    if !matches!(
        words.as_slice(),
        ["install", _] | ["list"] | ["activate", _, _] | ["rollback", _]
    ) {
        return usage(
            "expected new <name> --kind <kind>, or [--url <url> [--token <token>]] followed by \
             install <dir>, list, activate <name> <version> or rollback <name>",
        );
    }
    if let Some(url) = url {
        let Some(token) = token.or_else(|| std::env::var("COMMERCE_TOKEN").ok()) else {
            return usage("--url needs an admin token: --token <token> or COMMERCE_TOKEN");
        };
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => {
                eprintln!("commerce-kernel: cannot start the async runtime: {error}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(rest) = url.strip_prefix("http://") {
            let host = rest.split(['/', ':']).next().unwrap_or_default();
            let loopback = matches!(host, "localhost" | "127.0.0.1") || rest.starts_with("[::1]");
            if !loopback {
                eprintln!(
                    "commerce-kernel plugin: warning: {url} is plain HTTP: the admin token \
                     travels unencrypted; use https:// beyond this machine"
                );
            }
        }
        // A kernel that never answers must not hang the command for good.
        const REMOTE_TIMEOUT: Duration = Duration::from_secs(120);
        let outcome = runtime.block_on(async {
            tokio::time::timeout(REMOTE_TIMEOUT, remote_plugin(&url, &token, &words))
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "{url} did not answer within {} s",
                        REMOTE_TIMEOUT.as_secs()
                    ))
                })
        });
        return report_plugin_outcome(outcome);
    }
    if token.is_some() {
        return usage("--token is for a running kernel: give its --url too");
    }
    let config = match config_from_env() {
        Ok(config) => config,
        Err(code) => return code,
    };
    let runtime = match multi_thread_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    // Run elsewhere than the kernel's own folder, an embedded database
    // would be created afresh, and the plugin installed into a shop nobody
    // runs: the commands work on an existing one only.
    if let commerce_kernel::storage::DatabaseConfig::Sqlite { path } = &config.database
        && !path.exists()
    {
        eprintln!(
            "commerce-kernel plugin: there is no kernel database at {}; set \
             COMMERCE_DATA_DIR (or COMMERCE_DATABASE_URL) to the kernel's, or give a running \
             kernel's --url",
            path.display()
        );
        return ExitCode::FAILURE;
    }
    let outcome = runtime.block_on(async {
        let database = open_database(&config).await?;
        let dir = config.plugins.dir.clone();
        let registry =
            tokio::task::spawn_blocking(move || PluginRegistry::open(dir, EngineConfig::default()))
                .await
                .map_err(|error| error.to_string())?
                .map_err(|error| error.to_string())?;
        let plugins = Plugins::new(
            Commerce::new(database.event_store(), database.view_store()),
            std::sync::Arc::new(registry),
        );
        let context = cli_context();
        let done = async {
            plugins.place_bundled().await.map_err(|e| e.to_string())?;
            match words.as_slice() {
                ["install", dir] => {
                    let (manifest_text, _, component) = read_plugin_dir(dir)?;
                    let installed = plugins
                        .install(manifest_text, component, &context)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(format!(
                        "installed {} (sha256 {}) on {}; activate it with `plugin activate {} {}`",
                        installed.label(),
                        installed.sha256,
                        config.database.describe(),
                        installed.name,
                        installed.version
                    ))
                }
                ["list"] => {
                    plugins.catch_up().await.map_err(|e| e.to_string())?;
                    let mut lines = Vec::new();
                    for summary in plugins.list().await.map_err(|e| e.to_string())? {
                        let versions: Vec<&str> = summary
                            .versions
                            .iter()
                            .map(|version| version.version.as_str())
                            .collect();
                        lines.push(format!(
                            "{:<20} active: {:<20} installed: {}",
                            summary.name,
                            summary
                                .active
                                .as_ref()
                                .map_or("none", |active| active.version.as_str()),
                            versions.join(", ")
                        ));
                    }
                    Ok(lines.join("\n"))
                }
                ["activate", name, version] => {
                    plugins
                        .activate(name, version, &context)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(format!("activated {name}@{version}"))
                }
                ["rollback", name] => {
                    let written = plugins
                        .roll_back(name, &context)
                        .await
                        .map_err(|e| e.to_string())?;
                    let now = written
                        .state
                        .active()
                        .map_or("none".to_string(), |active| active.version.clone());
                    Ok(format!("rolled {name} back to {now}"))
                }
                _ => Err("unreachable: the words were checked".to_string()),
            }
        }
        .await;
        database.close().await;
        done
    });
    report_plugin_outcome(outcome)
}

fn report_plugin_outcome(outcome: Result<String, String>) -> ExitCode {
    match outcome {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("commerce-kernel plugin: {error}");
            ExitCode::FAILURE
        }
    }
}

/// A plugin folder's `plugin.toml` (as text, and parsed) and the component
/// it names.
fn read_plugin_dir(
    dir: &str,
) -> Result<(String, commerce_plugin_host::PluginManifest, Vec<u8>), String> {
    use commerce_plugin_host::{MANIFEST_FILE, PluginManifest};
    let dir = std::path::Path::new(dir);
    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest_text = std::fs::read_to_string(&manifest_path)
        .map_err(|error| format!("{}: {error}", manifest_path.display()))?;
    let manifest = PluginManifest::parse(&manifest_text)
        .map_err(|error| format!("{}: {error}", manifest_path.display()))?;
    let component_path = dir.join(&manifest.component);
    let component = std::fs::read(&component_path)
        .map_err(|error| format!("{}: {error}", component_path.display()))?;
    Ok((manifest_text, manifest, component))
}

/// `plugin --url … <command>`: the command as admin mutations and queries
/// of the running kernel at `url`, which records them with that admin as
/// the actor and checks an install exactly as `installPlugin` always does.
async fn remote_plugin(url: &str, token: &str, words: &[&str]) -> Result<String, String> {
    use base64::Engine as _;
    use commerce_kernel::loadtest::storefront::{CallError, Storefront};
    use serde_json::json;
    const PLUGIN: &str = "plugin { name activeVersion { version } versions { version sha256 } }";
    let kernel = Storefront::new(url).map_err(|error| error.to_string())?;
    let explain = |error: CallError| match error.code.as_str() {
        "HTTP_413" => format!(
            "the kernel at {url} refused the request as too large ({}); raise its \
             COMMERCE_MAX_REQUEST_BYTES, or install on its database with `plugin install` \
             without --url",
            error.message
        ),
        _ => error.to_string(),
    };
    match words {
        ["install", dir] => {
            let (manifest_text, manifest, component) = read_plugin_dir(dir)?;
            kernel
                .mutate(
                    token,
                    "installPlugin",
                    &format!(
                        "mutation ($input: InstallPluginInput!) {{ installPlugin(input: $input) \
                         {{ {PLUGIN} errors {{ code message }} }} }}"
                    ),
                    json!({ "input": {
                        "manifest": manifest_text,
                        "component": base64::engine::general_purpose::STANDARD.encode(&component),
                    } }),
                )
                .await
                .map_err(explain)?;
            // What the kernel installed: a refusal came back as an error.
            let (name, version, sha256) = (&manifest.name, &manifest.version, &manifest.sha256);
            Ok(format!(
                "installed {name}@{version} (sha256 {sha256}) on {url}; activate it with \
                 `plugin --url {url} activate {name} {version}`"
            ))
        }
        ["list"] => {
            let mut plugins = Vec::new();
            let mut after = serde_json::Value::Null;
            loop {
                let body = kernel
                    .graphql(
                        token,
                        "query ($after: String) { plugins(after: $after) { \
                         pageInfo { hasNextPage endCursor } edges { node { \
                         name activeVersion { version } versions { version } } } } }",
                        json!({ "after": after }),
                    )
                    .await
                    .map_err(explain)?;
                let page = &body["data"]["plugins"];
                plugins.extend(
                    page["edges"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|edge| edge["node"].clone()),
                );
                // A cursor that does not move would never end the loop.
                if page["pageInfo"]["hasNextPage"] != true || page["pageInfo"]["endCursor"] == after
                {
                    break;
                }
                after = page["pageInfo"]["endCursor"].clone();
            }
            let mut lines = Vec::new();
            for plugin in &plugins {
                let versions: Vec<&str> = plugin["versions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|version| version["version"].as_str())
                    .collect();
                lines.push(format!(
                    "{:<20} active: {:<20} installed: {}",
                    plugin["name"].as_str().unwrap_or_default(),
                    plugin["activeVersion"]["version"]
                        .as_str()
                        .unwrap_or("none"),
                    versions.join(", ")
                ));
            }
            Ok(lines.join("\n"))
        }
        ["activate", name, version] => {
            kernel
                .mutate(
                    token,
                    "activatePlugin",
                    &format!(
                        "mutation ($input: ActivatePluginInput!) {{ activatePlugin(input: $input) \
                         {{ {PLUGIN} errors {{ code message }} }} }}"
                    ),
                    json!({ "input": { "name": name, "version": version } }),
                )
                .await
                .map_err(explain)?;
            Ok(format!("activated {name}@{version} on {url}"))
        }
        ["rollback", name] => {
            let payload = kernel
                .mutate(
                    token,
                    "rollbackPlugin",
                    &format!(
                        "mutation ($input: RollbackPluginInput!) {{ rollbackPlugin(input: $input) \
                         {{ {PLUGIN} errors {{ code message }} }} }}"
                    ),
                    json!({ "input": { "name": name } }),
                )
                .await
                .map_err(explain)?;
            let now = payload["plugin"]["activeVersion"]["version"]
                .as_str()
                .unwrap_or("none");
            Ok(format!("rolled {name} back to {now} on {url}"))
        }
        _ => Err("unreachable: the words were checked".to_string()),
    }
}

/// A command's `--option value` pairs, in the order given.
type Options = Vec<(&'static str, String)>;

/// A command's one positional argument and its `--option value` pairs,
/// of the options in `known`; anything else is refused, said why.
fn argument_and_options(
    args: &[String],
    known: &[&'static str],
) -> Result<(Option<String>, Options), String> {
    let mut argument = None;
    let mut options = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        if let Some(name) = known.iter().find(|name| **name == arg.as_str()) {
            let value = rest.next().ok_or_else(|| format!("{arg} needs a value"))?;
            options.push((*name, value.clone()));
        } else if argument.is_none() && !arg.starts_with('-') {
            argument = Some(arg.clone());
        } else {
            return Err(format!("unexpected `{arg}`"));
        }
    }
    Ok((argument, options))
}

/// The last value given for `name`.
fn option(options: &Options, name: &str) -> Option<String> {
    options
        .iter()
        .rev()
        .find(|(given, _)| *given == name)
        .map(|(_, value)| value.clone())
}

/// `plugin new <name> --kind <kind> [--dir <folder>]`.
fn plugin_new(args: &[String]) -> ExitCode {
    use commerce_kernel::plugin_template;
    let usage = |problem: &str| {
        eprintln!("commerce-kernel plugin new: {problem}\n\n{USAGE}");
        ExitCode::from(2)
    };
    let (name, options) = match argument_and_options(args, &["--kind", "--dir"]) {
        Ok(parsed) => parsed,
        Err(problem) => return usage(&problem),
    };
    let kind = option(&options, "--kind");
    let dir = option(&options, "--dir").unwrap_or_else(|| ".".to_string());
    let (Some(name), Some(kind)) = (name, kind) else {
        return usage("a name and --kind are required");
    };
    let kind = match plugin_template::parse_kind(&kind) {
        Ok(kind) => kind,
        Err(error) => return usage(&error.to_string()),
    };
    match plugin_template::create(std::path::Path::new(&dir), &name, kind) {
        Ok(root) => {
            println!(
                "created {}: a {} plugin; its README.md says how to build and install it",
                root.display(),
                kind.as_str()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("commerce-kernel plugin new: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The configured database, its schema brought up to date, for a
/// command-line tool.
async fn open_database(config: &Config) -> Result<Database, String> {
    let database = Database::connect(&config.database)
        .await
        .map_err(|error| error.to_string())?;
    database
        .migrate()
        .await
        .map_err(|error| error.to_string())?;
    Ok(database)
}

/// `reconcile-inventory [--repair]`: the runbook's inventory check on the
/// configured database, printed a line per drift.
fn reconcile_inventory(args: &[String]) -> ExitCode {
    use commerce_kernel::api::runbooks::unrepaired_products;
    use commerce_kernel::commerce::{Commerce, RECONCILIATION_GRACE};
    use commerce_kernel::projections::{ProjectionName, Projector};
    let repair = match args {
        [] => false,
        [flag] if flag == "--repair" => true,
        _ => {
            eprintln!("commerce-kernel reconcile-inventory: the one option is --repair\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let checked = on_database(|database| async move {
        let commerce = Commerce::new(database.event_store(), database.view_store());
        let report = commerce
            .reconcile_inventory(repair, RECONCILIATION_GRACE, &cli_context())
            .await
            .map_err(|error| error.to_string())?;
        let rebuilt = if repair && report.read_model_drifted() {
            Projector::new(database.event_store(), database.view_store())
                .rebuild(ProjectionName::Inventory, Duration::from_secs(600))
                .await
                .map_err(|error| error.to_string())?
        } else {
            false
        };
        Ok((report, rebuilt))
    });
    let (report, rebuilt) = match checked {
        Ok(Ok(done)) => done,
        Ok(Err(error)) => {
            eprintln!("commerce-kernel reconcile-inventory: {error}");
            return ExitCode::FAILURE;
        }
        Err(code) => return code,
    };
    println!(
        "{} inventory streams replayed ({} events)",
        report.products_checked, report.events_replayed
    );
    for drift in &report.drift {
        let reservation = drift
            .reservation_id
            .map(|id| format!(" reservation {id}"))
            .unwrap_or_default();
        println!(
            "drift: product {} {:?}{reservation}: {}",
            drift.product_id, drift.kind, drift.detail
        );
    }
    for released in &report.released {
        println!("released reservation {released}");
    }
    if rebuilt {
        println!("rebuilt the inventory read model");
    }
    let remaining = unrepaired_products(&report, rebuilt);
    if remaining == 0 {
        println!("no drift left");
        ExitCode::SUCCESS
    } else {
        println!("{remaining} product(s) with drift left");
        ExitCode::FAILURE
    }
}

/// `prune [--apply] [--idempotency-days N] [--saga-days N] [--cart-days N]`:
/// the runbook's pruning on the configured database; a dry run unless
/// `--apply`.
fn prune(args: &[String]) -> ExitCode {
    use commerce_kernel::api::runbooks::prune_before;
    let usage = |problem: &str| {
        eprintln!("commerce-kernel prune: {problem}\n\n{USAGE}");
        ExitCode::from(2)
    };
    let (mut apply, mut days) = (false, [30, 90, 365]);
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let slot = match flag.as_str() {
            "--apply" => {
                apply = true;
                continue;
            }
            "--idempotency-days" => 0,
            "--saga-days" => 1,
            "--cart-days" => 2,
            other => return usage(&format!("unknown option `{other}`")),
        };
        match rest.next().map(|value| value.parse::<i32>()) {
            Some(Ok(count)) => days[slot] = count,
            _ => return usage(&format!("{flag} needs a whole number of days")),
        }
    }
    let before = match prune_before(
        chrono::Utc::now(),
        [
            ("--idempotency-days", days[0]),
            ("--saga-days", days[1]),
            ("--cart-days", days[2]),
        ],
    ) {
        Ok(before) => before,
        Err((flag, reason)) => return usage(&format!("{flag} {reason}")),
    };
    let pruned = on_database(|database| async move {
        database
            .maintenance()
            .prune(&before, !apply)
            .await
            .map_err(|error| error.to_string())
    });
    let report = match pruned {
        Ok(Ok(report)) => report,
        Ok(Err(error)) => {
            eprintln!("commerce-kernel prune: {error}");
            return ExitCode::FAILURE;
        }
        Err(code) => return code,
    };
    let verb = if report.dry_run {
        "would go"
    } else {
        "deleted"
    };
    println!("idempotency keys: {} {verb}", report.idempotency_keys);
    println!("finished sagas: {} {verb}", report.finished_sagas);
    println!("cart activity: {} {verb}", report.cart_activity);
    if report.dry_run {
        println!("dry run: nothing deleted (--apply deletes)");
    }
    ExitCode::SUCCESS
}

/// What `sagas` was asked to do.
enum SagaCommand {
    List(commerce_kernel::sagas::SagaFilter),
    RetryParked(u32),
    Retry(Vec<uuid::Uuid>),
    Compensate(String, Vec<uuid::Uuid>),
}

/// The saga ids given, each once, or what is wrong with one.
fn saga_ids(ids: &[String]) -> Result<Vec<uuid::Uuid>, String> {
    if ids.is_empty() {
        return Err("name the sagas by id".to_string());
    }
    let mut unique: Vec<uuid::Uuid> = Vec::with_capacity(ids.len());
    for id in ids {
        match id.parse() {
            Ok(id) if !unique.contains(&id) => unique.push(id),
            Ok(_) => {}
            Err(_) => return Err(format!("{id} is not a saga id (a UUID)")),
        }
    }
    Ok(unique)
}

/// `sagas …`: the runbook's saga recovery on the configured database; the
/// requests are events by `cli:<user>`, which the kernels' runners act on.
fn sagas(args: &[String]) -> ExitCode {
    use commerce_kernel::domain::saga::SagaStatus;
    use commerce_kernel::sagas::SagaFilter;
    let usage = |problem: &str| {
        eprintln!("commerce-kernel sagas: {problem}\n\n{USAGE}");
        ExitCode::from(2)
    };
    let command = match args {
        [] => SagaCommand::List(SagaFilter {
            status: Some(SagaStatus::Parked),
            ..SagaFilter::default()
        }),
        [flag] if flag == "--parked" => SagaCommand::List(SagaFilter {
            status: Some(SagaStatus::Parked),
            ..SagaFilter::default()
        }),
        [flag, seconds] if flag == "--overdue" => match seconds.parse::<u64>() {
            Ok(seconds) => SagaCommand::List(SagaFilter {
                overdue_by: Some(Duration::from_secs(seconds)),
                ..SagaFilter::default()
            }),
            Err(_) => return usage("--overdue needs a whole number of seconds"),
        },
        [command] if command == "retry-parked" => SagaCommand::RetryParked(50),
        [command, flag, first] if command == "retry-parked" && flag == "--first" => {
            match first.parse::<u32>() {
                Ok(first @ 1..=10_000) => SagaCommand::RetryParked(first),
                _ => return usage("--first needs a number from 1 to 10000"),
            }
        }
        [command, flag, reason, ids @ ..] if command == "compensate" && flag == "--reason" => {
            use commerce_kernel::domain::saga::MAX_REASON_CHARS;
            if let Err(refused) =
                commerce_kernel::domain::clean_text("reason", reason, MAX_REASON_CHARS)
            {
                return usage(&refused.to_string());
            }
            match saga_ids(ids) {
                Ok(ids) => SagaCommand::Compensate(reason.clone(), ids),
                Err(problem) => return usage(&problem),
            }
        }
        [command, ids @ ..] if command == "retry" => match saga_ids(ids) {
            Ok(ids) => SagaCommand::Retry(ids),
            Err(problem) => return usage(&problem),
        },
        _ => return usage("unknown options"),
    };
    let done = on_database(|database| async move {
        let commerce =
            commerce_kernel::commerce::Commerce::new(database.event_store(), database.view_store());
        let sagas = commerce_kernel::commerce::Sagas::new(commerce, database.saga_store());
        let mut lines = Vec::new();
        let mut refused = 0usize;
        match command {
            SagaCommand::List(filter) => {
                let rows = sagas
                    .store()
                    .list(&filter, None, 200)
                    .await
                    .map_err(|error| error.to_string())?;
                let total = sagas
                    .store()
                    .count(&filter)
                    .await
                    .map_err(|error| error.to_string())?;
                for row in &rows {
                    let reason = match sagas.load(row.saga_id).await {
                        Ok(loaded) => {
                            let state = loaded.state;
                            state
                                .parked
                                .or(state.compensation.map(|c| c.reason))
                                .or(state.requested.map(|r| r.reason))
                        }
                        Err(error) => Some(format!("(not readable: {error})")),
                    };
                    lines.push(format!(
                        "{} order {} {} step {} lease {} {}",
                        row.saga_id,
                        row.correlation_id,
                        row.status,
                        row.current_step.as_deref().unwrap_or("-"),
                        row.lease_owner.as_deref().unwrap_or("-"),
                        reason
                            .map(|reason| commerce_kernel::domain::summarize(&reason, 200))
                            .unwrap_or_default()
                    ));
                }
                lines.push(if total > rows.len() as u64 {
                    format!("{} of {total} saga(s), the oldest", rows.len())
                } else {
                    format!("{} saga(s)", rows.len())
                });
            }
            SagaCommand::RetryParked(first) => {
                let outcomes = sagas
                    .retry_parked(None, first, &cli_context())
                    .await
                    .map_err(|error| error.to_string())?;
                for (saga_id, outcome) in &outcomes {
                    match outcome {
                        Ok(_) => lines.push(format!("{saga_id} retried")),
                        Err(error) => {
                            refused += 1;
                            lines.push(format!("{saga_id} refused: {error}"));
                        }
                    }
                }
                lines.push(format!("{} retried", outcomes.len() - refused));
            }
            SagaCommand::Retry(ids) => {
                for saga_id in ids {
                    match sagas.retry(saga_id, &cli_context()).await {
                        Ok(_) => lines.push(format!("{saga_id} retried")),
                        Err(error) => {
                            refused += 1;
                            lines.push(format!("{saga_id} refused: {error}"));
                        }
                    }
                }
            }
            SagaCommand::Compensate(reason, ids) => {
                for saga_id in ids {
                    match sagas.compensate(saga_id, &reason, &cli_context()).await {
                        Ok(written) if written.position.is_none() => lines.push(format!(
                            "{saga_id} unchanged: its compensation was requested already"
                        )),
                        Ok(written) if written.state.status == Some(SagaStatus::Parked) => {
                            lines.push(format!(
                                "{saga_id} compensation recorded; the saga is parked: \
                                 it acts on it once retried"
                            ));
                        }
                        Ok(_) => lines.push(format!("{saga_id} compensation requested")),
                        Err(error) => {
                            refused += 1;
                            lines.push(format!("{saga_id} refused: {error}"));
                        }
                    }
                }
            }
        }
        Ok((lines, refused))
    });
    match done {
        Ok(Ok((lines, refused))) => {
            for line in lines {
                println!("{line}");
            }
            if refused == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Ok(Err(error)) => {
            eprintln!("commerce-kernel sagas: {error}");
            ExitCode::FAILURE
        }
        Err(code) => code,
    }
}

/// `rebuild-projections [name]`: rebuilds read models on the configured
/// database, each swapped in whole (`Projector::rebuild_now`), and says how
/// long each took.
fn rebuild_projections(args: &[String]) -> ExitCode {
    use commerce_kernel::projections::{ProjectionName, Projector};
    let projections = match args {
        [] => ProjectionName::ALL.to_vec(),
        [name] => match ProjectionName::parse(name) {
            Some(projection) => vec![projection],
            None => {
                let known: Vec<&str> = ProjectionName::ALL.iter().map(|p| p.as_str()).collect();
                eprintln!(
                    "commerce-kernel rebuild-projections: no read model {name:?}; known: {}\n\n{USAGE}",
                    known.join(", ")
                );
                return ExitCode::from(2);
            }
        },
        _ => {
            eprintln!("commerce-kernel rebuild-projections: one read model at most\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let rebuilt = on_database(|database| async move {
        let projector = Projector::new(database.event_store(), database.view_store());
        for projection in projections {
            let started = std::time::Instant::now();
            projector
                .rebuild_now(projection)
                .await
                .map_err(|error| format!("{}: {error}", projection.as_str()))?;
            // As each is swapped in: a later failure must not hide it.
            println!(
                "rebuilt {} in {:.1} s",
                projection.as_str(),
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    });
    match rebuilt {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(error)) => {
            eprintln!("commerce-kernel rebuild-projections: {error}");
            ExitCode::FAILURE
        }
        Err(code) => code,
    }
}

/// `abandoned-carts [--hours H]`: the runbook's abandonment analysis, from
/// the cart record in the configured database.
fn abandoned_carts(args: &[String]) -> ExitCode {
    let hours = match args {
        [] => 24.0,
        [flag, value] if flag == "--hours" => match value.parse::<f64>() {
            Ok(hours) if hours > 0.0 && hours <= 87_600.0 => hours,
            _ => {
                eprintln!(
                    "commerce-kernel abandoned-carts: --hours must be more than 0 and at most 87600\n\n{USAGE}"
                );
                return ExitCode::from(2);
            }
        },
        _ => {
            eprintln!("commerce-kernel abandoned-carts: the one option is --hours H\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let now = chrono::Utc::now();
    let cutoff = now - chrono::Duration::milliseconds((hours * 3_600_000.0) as i64);
    let reported = on_database(|database| async move {
        database
            .cart_activity()
            .abandoned(now, cutoff, None, 0)
            .await
            .map_err(|error| error.to_string())
    });
    let report = match reported {
        Ok(Ok(report)) => report,
        Ok(Err(error)) => {
            eprintln!("commerce-kernel abandoned-carts: {error}");
            return ExitCode::FAILURE;
        }
        Err(code) => return code,
    };
    println!(
        "abandoned (idle {hours} h, never checked out): {} ({} expired)",
        report.abandoned, report.expired
    );
    println!("checked out: {}", report.checked_out);
    println!("active (touched within {hours} h): {}", report.active);
    match report.abandonment_rate() {
        Some(rate) => println!("abandonment rate: {:.1}%", rate * 100.0),
        None => println!("abandonment rate: none yet (no cart abandoned or checked out)"),
    }
    let bounds = commerce_kernel::carts::IDLE_AGE_BOUNDS.map(|bound| bound.as_secs() / 3_600);
    for (slot, count) in report.by_idle_age.iter().enumerate() {
        let from = slot.checked_sub(1).and_then(|below| bounds.get(below));
        match (from, bounds.get(slot)) {
            (None, Some(under)) => println!("idle under {under} h: {count}"),
            (Some(from), Some(under)) => println!("idle {from} h to {under} h: {count}"),
            (Some(from), None) => println!("idle {from} h or more: {count}"),
            (None, None) => {}
        }
    }
    ExitCode::SUCCESS
}

/// Runs `work` on the configured database (opened and migrated, closed
/// afterwards), on a runtime of its own. The outer error is the exit code
/// of a configuration the command cannot start with.
fn on_database<T, F, Fut>(work: F) -> Result<Result<T, String>, ExitCode>
where
    F: FnOnce(Database) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let config = config_from_env()?;
    let runtime = multi_thread_runtime()?;
    Ok(runtime.block_on(async {
        let database = open_database(&config).await?;
        let outcome = work(database.clone()).await;
        database.close().await;
        outcome
    }))
}

/// How a command-line tool's writes are recorded: actor `cli:<user>`.
fn cli_context() -> commerce_kernel::commerce::CommandContext {
    commerce_kernel::commerce::CommandContext {
        actor: Some(format!("cli:{}", cli_user())),
        correlation_id: Some(uuid::Uuid::now_v7()),
    }
}

/// Who runs a command-line tool, for the actor of what it records.
fn cli_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|user| !user.is_empty() && user.len() <= 64 && !user.contains(char::is_control))
        .unwrap_or_else(|| "unknown".to_string())
}

/// `loadtest [options]`: runs a load test and prints its report.
fn loadtest(args: &[String]) -> ExitCode {
    use commerce_kernel::loadtest::{self, Options, Tokens};
    if args.iter().any(|arg| arg == "--help" || arg == "-h") {
        println!("{}", loadtest::USAGE);
        return ExitCode::SUCCESS;
    }
    let options = match Options::parse(args) {
        Ok(options) => options,
        Err(error) => {
            eprintln!("commerce-kernel loadtest: {error}\n\n{}", loadtest::USAGE);
            return ExitCode::from(2);
        }
    };
    let config = match config_from_env() {
        Ok(config) => config,
        Err(code) => return code,
    };
    let runtime = match multi_thread_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let report = runtime.block_on(async {
        let auth = Authenticator::open(&config.auth)
            .await
            .map_err(|error| format!("cannot mint tokens: {error}"))?;
        // Long enough for any run; the tokens never leave this process.
        let ttl = Duration::from_secs(7 * 86_400);
        let mint = |subject: &str, role| {
            auth.mint(subject, role, ttl)
                .map_err(|error| format!("cannot mint tokens: {error}"))
        };
        let tokens = Tokens {
            admin: mint("loadtest", Role::Admin)?,
            customers: (0..loadtest::customers_needed(&options))
                .map(|_| mint(&uuid::Uuid::now_v7().to_string(), Role::Customer))
                .collect::<Result<_, _>>()?,
        };
        loadtest::run(&options, tokens)
            .await
            .map_err(|error| error.to_string())
    });
    match report {
        Ok(report) => {
            print!("{}", report.text());
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("commerce-kernel loadtest: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration from the environment, or the exit code after saying
/// what is wrong with it.
fn config_from_env() -> Result<Config, ExitCode> {
    Config::from_env().map_err(|error| {
        eprintln!("commerce-kernel: invalid configuration: {error}");
        ExitCode::from(2)
    })
}

/// The runtime of `serve`, `migrate` and `loadtest`.
fn multi_thread_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|error| {
            eprintln!("commerce-kernel: cannot start the async runtime: {error}");
            ExitCode::FAILURE
        })
}

async fn migrate(config: &Config) -> Result<(), KernelError> {
    let database = Database::connect(&config.database).await?;
    database.migrate().await?;
    tracing::info!(backend = %database.backend(), "database schema is up to date");
    database.close().await;
    Ok(())
}
