//! Append throughput and latency on Postgres, against the raw ceiling measured
//! in the same run.
//!
//! ```text
//! COMMERCE_BENCH_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//!     cargo bench -p commerce-kernel --bench append -- [--seconds N]
//! ```
//!
//! Each scenario runs N seconds (default 5, after a 1 s warm-up) with a fixed
//! number of clients, each on its own connection and in a closed loop:
//! - `raw insert`: one plain single-row INSERT of a JSONB event per transaction,
//!   into a table with a primary key and no other logic: the ceiling.
//! - `append x1`: `EventStore::append` of one event to the client's own stream,
//!   with optimistic concurrency (expected version) as the kernel uses it.
//! - `append x1 + key`: the same with an idempotency key.
//! - `append xN`: batches of N events per append.
//!
//! Everything runs in a fresh schema that is dropped afterwards.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use commerce_kernel::event_store::{AppendRequest, EventStore, NewEvent};
use commerce_kernel::storage::{Database, DatabaseConfig};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection as _, PgConnection};
use uuid::Uuid;

const URL_VARIABLE: &str = "COMMERCE_BENCH_DATABASE_URL";
const WARM_UP: Duration = Duration::from_secs(1);

#[derive(Clone, Copy)]
enum Workload {
    RawInsert,
    Append { batch: usize, keyed: bool },
}

/// Appends of `batch` events each, with or without an idempotency key.
fn append(batch: usize, keyed: bool) -> Workload {
    Workload::Append { batch, keyed }
}

struct Scenario {
    name: String,
    workload: Workload,
    clients: usize,
}

struct Measurement {
    operations: u64,
    events: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Measurement {
    fn per_second(&self, count: u64) -> f64 {
        count as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let index = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[index]
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --benches` runs bench binaries without `--bench`: do nothing then.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let seconds = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(5);
    let Some(url) = std::env::var(URL_VARIABLE)
        .ok()
        .or_else(|| std::env::var("COMMERCE_TEST_DATABASE_URL").ok())
    else {
        eprintln!("set {URL_VARIABLE} to a Postgres URL (a fresh schema is created and dropped)");
        std::process::exit(2);
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(error) = runtime.block_on(run(&url, Duration::from_secs(seconds))) {
        eprintln!("benchmark failed: {error:#}");
        std::process::exit(1);
    }
}

async fn run(url: &str, duration: Duration) -> anyhow::Result<()> {
    let schema = format!("bench_{}", Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(url).await?;
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut admin)
        .await?;
    let settings: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, setting FROM pg_settings WHERE name IN ('synchronous_commit', 'fsync', 'shared_buffers', 'max_connections') ORDER BY name",
    )
    .fetch_all(&mut admin)
    .await?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut admin)
        .await?;

    let result = run_in_schema(url, &schema, duration).await;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&mut admin)
        .await?;
    let rows = result?;

    println!();
    println!(
        "Postgres {version}; {}; {} cores; {} s per scenario",
        settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", "),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        duration.as_secs()
    );
    println!(
        "{:<22} {:>7} {:>12} {:>12} {:>9} {:>9} {:>9}",
        "scenario", "clients", "appends/s", "events/s", "p50 ms", "p99 ms", "vs raw"
    );
    let raw_at = |clients: usize| {
        rows.iter()
            .find(|(s, _)| matches!(s.workload, Workload::RawInsert) && s.clients == clients)
            .map(|(_, m)| m.per_second(m.events))
    };
    for (scenario, m) in &rows {
        let ratio = match scenario.workload {
            Workload::RawInsert => String::from("-"),
            Workload::Append { .. } => raw_at(scenario.clients).map_or_else(
                || "-".into(),
                |raw| format!("{:.0}%", 100.0 * m.per_second(m.events) / raw),
            ),
        };
        println!(
            "{:<22} {:>7} {:>12.0} {:>12.0} {:>9.2} {:>9.2} {:>9}",
            scenario.name,
            scenario.clients,
            m.per_second(m.operations),
            m.per_second(m.events),
            m.percentile(0.50).as_secs_f64() * 1000.0,
            m.percentile(0.99).as_secs_f64() * 1000.0,
            ratio
        );
    }
    Ok(())
}

async fn run_in_schema(
    url: &str,
    schema: &str,
    duration: Duration,
) -> anyhow::Result<Vec<(Scenario, Measurement)>> {
    let options = PgConnectOptions::from_str(url)?.options([("search_path", schema)]);
    let max_clients = 32;
    let database = Database::connect(&DatabaseConfig::Postgres {
        options: Box::new(options.clone()),
        max_connections: max_clients as u32,
    })
    .await?;
    database.migrate().await?;
    let store = database.event_store();
    let raw_pool = PgPoolOptions::new()
        .max_connections(max_clients as u32)
        .connect_with(options)
        .await?;
    sqlx::query(
        "CREATE TABLE raw_events (id UUID PRIMARY KEY, aggregate_id UUID NOT NULL, event_type TEXT NOT NULL, \
         event_data JSONB NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .execute(&raw_pool)
    .await?;

    let scenario = |name: &str, workload, clients| Scenario {
        name: name.to_string(),
        workload,
        clients,
    };
    let scenarios = vec![
        scenario("raw insert", Workload::RawInsert, 8),
        scenario("append x1", append(1, false), 8),
        scenario("append x1 + key", append(1, true), 8),
        scenario("raw insert", Workload::RawInsert, 32),
        scenario("append x1", append(1, false), 32),
        scenario("append x10", append(10, false), 32),
        scenario("append x50", append(50, false), 8),
    ];
    let mut results = Vec::new();
    for scenario in scenarios {
        eprintln!(
            "running {} with {} clients ...",
            scenario.name, scenario.clients
        );
        let measurement = measure(&scenario, &store, &raw_pool, duration).await?;
        results.push((scenario, measurement));
    }
    raw_pool.close().await;
    database.close().await;
    Ok(results)
}

async fn measure(
    scenario: &Scenario,
    store: &Arc<dyn EventStore>,
    raw_pool: &PgPool,
    duration: Duration,
) -> anyhow::Result<Measurement> {
    let start = Instant::now() + WARM_UP;
    let end = start + duration;
    let mut clients = Vec::new();
    for _ in 0..scenario.clients {
        let store = Arc::clone(store);
        let raw_pool = raw_pool.clone();
        let workload = scenario.workload;
        clients.push(tokio::spawn(async move {
            let aggregate_id = Uuid::now_v7();
            let mut version = 0u32;
            let mut latencies = Vec::new();
            let (mut operations, mut events) = (0u64, 0u64);
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                let written = match workload {
                    Workload::RawInsert => {
                        sqlx::query("INSERT INTO raw_events (id, aggregate_id, event_type, event_data) VALUES ($1, $2, $3, $4)")
                            .bind(Uuid::now_v7())
                            .bind(aggregate_id)
                            .bind("ItemReserved")
                            .bind(payload())
                            .execute(&raw_pool)
                            .await?;
                        1
                    }
                    Workload::Append { batch, keyed } => {
                        let events = (0..batch).map(|_| NewEvent::new("ItemReserved", payload())).collect();
                        let mut request = AppendRequest::single(aggregate_id, "inventory", version, events);
                        if keyed {
                            request = request.with_idempotency_key(format!("bench:{}", Uuid::now_v7()));
                        }
                        version = store.append(request).await?.stream_versions[0].version;
                        batch as u64
                    }
                };
                if began >= start {
                    latencies.push(began.elapsed());
                    operations += 1;
                    events += written;
                }
            }
            anyhow::Ok((operations, events, latencies))
        }));
    }
    let mut total = Measurement {
        operations: 0,
        events: 0,
        elapsed: duration,
        latencies: Vec::new(),
    };
    for client in clients {
        let (operations, events, latencies) = client.await??;
        total.operations += operations;
        total.events += events;
        total.latencies.extend(latencies);
    }
    total.latencies.sort_unstable();
    Ok(total)
}

fn payload() -> serde_json::Value {
    json!({
        "reservation_id": Uuid::now_v7(),
        "order_id": Uuid::now_v7(),
        "quantity": 2,
        "expires_at": "2026-11-21T12:00:00Z",
        "unit_price": { "amount": "19.99", "currency": "EUR" }
    })
}
