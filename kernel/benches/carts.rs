//! Cart write throughput and latency, against a raw Redis write measured in
//! the same run.
//!
//! ```text
//! COMMERCE_BENCH_REDIS_URL=redis://127.0.0.1:6379 \
//!     cargo bench -p commerce-kernel --bench carts -- [--seconds N]
//! ```
//!
//! Each scenario runs N seconds (default 5, after a 1 s warm-up) with a fixed
//! number of clients in closed loops, sharing one multiplexed Redis
//! connection as the kernel's requests do:
//! - `raw HSET`: one HSET of one field per operation: the ceiling of a write.
//! - `swap`: `CartStore::swap` of a 3-line cart at its current version (the
//!   Lua compare-and-swap with TTL and activity entry), each client its own cart.
//! - `swap, recorder running`: the same while the activity recorder moves
//!   entries into SQLite, as in the server.
//! - `add item`: the whole `Carts::change_items` command (load the cart,
//!   load the product from the event store, decide, swap), own carts.
//! - `add item, one cart`: every client adds to the same cart (conflicts,
//!   retried).
//!
//! The embedded store runs the `swap` and `add item` scenarios too. The
//! catalog lives in a temporary SQLite database; Redis keys go under a fresh
//! prefix that is deleted afterwards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use commerce_kernel::carts::{self, ActivityRecorder, CartBackendConfig, CartStore};
use commerce_kernel::commerce::{
    CartItem, Carts, CommandContext, CommandError, Commerce, NewCart, NewProduct,
};
use commerce_kernel::domain::DomainError;
use commerce_kernel::domain::cart::{Cart, CartLimits, CartOwner, QuantityMode};
use commerce_kernel::domain::money::{Currency, Money};
use commerce_kernel::storage::{Database, DatabaseConfig};
use uuid::Uuid;

const URL_VARIABLE: &str = "COMMERCE_BENCH_REDIS_URL";
const WARM_UP: Duration = Duration::from_secs(1);
const CLIENTS: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    RawHset,
    Swap,
    AddItem,
    AddItemOneCart,
}

struct Scenario {
    name: &'static str,
    workload: Workload,
    embedded: bool,
    recorder: bool,
}

struct Measurement {
    operations: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Measurement {
    fn per_second(&self) -> f64 {
        self.operations as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let index = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[index]
    }
}

/// What every client of a scenario shares.
#[derive(Clone)]
struct Fixture {
    redis: redis::aio::MultiplexedConnection,
    store: Arc<dyn CartStore>,
    carts: Carts,
    product_id: Uuid,
    shared_cart: Uuid,
    /// Prefix of every Redis key the run writes.
    prefix: String,
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
        .and_then(|s| s.parse().ok())
        .unwrap_or(5u64);
    let Some(url) = std::env::var(URL_VARIABLE).ok().filter(|u| !u.is_empty()) else {
        eprintln!("set {URL_VARIABLE} (e.g. redis://127.0.0.1:6379) to run this benchmark");
        return;
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("runtime: {error}");
            std::process::exit(1);
        }
    };
    if let Err(error) = runtime.block_on(run(&url, Duration::from_secs(seconds))) {
        eprintln!("carts bench failed: {error}");
        std::process::exit(1);
    }
}

async fn run(url: &str, duration: Duration) -> Result<(), Box<dyn std::error::Error>> {
    let directory = tempfile::tempdir()?;
    let database = Database::connect(&DatabaseConfig::Sqlite {
        path: directory.path().join("bench.db"),
    })
    .await?;
    database.migrate().await?;
    let commerce = Commerce::new(database.event_store(), database.view_store());
    let product_id = commerce
        .create_product(
            NewProduct {
                sku: "BENCH-1".into(),
                name: "Bench mug".into(),
                price: Money::new("3.50".parse()?, Currency::parse("EUR")?)?,
                active: true,
            },
            &CommandContext::default(),
        )
        .await?
        .id;
    let prefix = format!("bench:{}:", Uuid::new_v4().simple());
    let redis_config = CartBackendConfig::Redis {
        url: url.to_string(),
        key_prefix: prefix.clone(),
    };
    let redis_client = redis::Client::open(url)?;
    let raw = redis_client.get_multiplexed_async_connection().await?;
    let limits = CartLimits::default();

    let scenarios = [
        Scenario {
            name: "raw HSET",
            workload: Workload::RawHset,
            embedded: false,
            recorder: false,
        },
        Scenario {
            name: "swap",
            workload: Workload::Swap,
            embedded: false,
            recorder: false,
        },
        Scenario {
            name: "swap, recorder running",
            workload: Workload::Swap,
            embedded: false,
            recorder: true,
        },
        Scenario {
            name: "add item",
            workload: Workload::AddItem,
            embedded: false,
            recorder: false,
        },
        Scenario {
            name: "add item, one cart",
            workload: Workload::AddItemOneCart,
            embedded: false,
            recorder: false,
        },
        Scenario {
            name: "swap",
            workload: Workload::Swap,
            embedded: true,
            recorder: false,
        },
        Scenario {
            name: "add item",
            workload: Workload::AddItem,
            embedded: true,
            recorder: false,
        },
    ];
    println!("{CLIENTS} clients, {} s per scenario\n", duration.as_secs());
    println!(
        "{:<8} {:<24} {:>10} {:>8} {:>8} {:>8}",
        "store", "scenario", "ops/s", "p50 ms", "p99 ms", "vs raw"
    );
    let mut raw_rate = None;
    for scenario in &scenarios {
        let store = if scenario.embedded {
            carts::open(&CartBackendConfig::Embedded).await?
        } else {
            carts::open(&redis_config).await?
        };
        let carts = Carts::new(commerce.clone(), Arc::clone(&store), limits);
        let shared = carts
            .create_cart(NewCart {
                owner: CartOwner::Customer(Uuid::now_v7()),
                currency: None,
                items: Vec::new(),
            })
            .await?;
        let fixture = Fixture {
            redis: raw.clone(),
            store: Arc::clone(&store),
            carts,
            product_id,
            shared_cart: shared.id,
            prefix: prefix.clone(),
        };
        let (stop_recorder, recorder_stopped) = tokio::sync::watch::channel(false);
        let recorder = scenario.recorder.then(|| {
            tokio::spawn(
                ActivityRecorder::new(Arc::clone(&store), database.cart_activity())
                    .run(recorder_stopped),
            )
        });
        let measured = measure(&fixture, scenario.workload, duration).await?;
        let _ = stop_recorder.send(true);
        if let Some(recorder) = recorder {
            recorder.await?;
        }
        // Drop what the scenario queued so the next one starts clean.
        ActivityRecorder::new(store, database.cart_activity())
            .record_all()
            .await?;
        let rate = measured.per_second();
        if scenario.workload == Workload::RawHset {
            raw_rate = Some(rate);
        }
        let versus = match raw_rate {
            Some(raw) if scenario.workload != Workload::RawHset && !scenario.embedded => {
                format!("{:.0}%", 100.0 * rate / raw)
            }
            _ => String::new(),
        };
        println!(
            "{:<8} {:<24} {:>10.0} {:>8.2} {:>8.2} {:>8}",
            if scenario.embedded {
                "embedded"
            } else {
                "redis"
            },
            scenario.name,
            rate,
            measured.percentile(0.5).as_secs_f64() * 1000.0,
            measured.percentile(0.99).as_secs_f64() * 1000.0,
            versus
        );
    }

    let mut connection = raw.clone();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut connection)
        .await?;
    for chunk in keys.chunks(1000) {
        redis::cmd("DEL")
            .arg(chunk)
            .query_async::<()>(&mut connection)
            .await?;
    }
    database.close().await;
    Ok(())
}

async fn measure(
    fixture: &Fixture,
    workload: Workload,
    duration: Duration,
) -> Result<Measurement, Box<dyn std::error::Error>> {
    let started = Instant::now();
    let warm_until = started + WARM_UP;
    let until = warm_until + duration;
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let fixture = fixture.clone();
        clients.push(tokio::spawn(async move {
            client(fixture, workload, warm_until, until).await
        }));
    }
    let mut operations = 0;
    let mut latencies = Vec::new();
    for client in clients {
        let (count, mut client_latencies) = client.await?.map_err(|e| e.to_string())?;
        operations += count;
        latencies.append(&mut client_latencies);
    }
    latencies.sort_unstable();
    Ok(Measurement {
        operations,
        elapsed: duration,
        latencies,
    })
}

/// One closed-loop client; counts only what finishes after the warm-up.
async fn client(
    fixture: Fixture,
    workload: Workload,
    warm_until: Instant,
    until: Instant,
) -> Result<(u64, Vec<Duration>), String> {
    let failed = |e: &dyn std::fmt::Display| e.to_string();
    let own = fixture
        .carts
        .create_cart(NewCart {
            owner: CartOwner::Customer(Uuid::now_v7()),
            currency: None,
            items: vec![CartItem {
                product_id: fixture.product_id,
                quantity: 1,
                mode: QuantityMode::Set,
            }],
        })
        .await
        .map_err(|e| failed(&e))?;
    let mut cart: Cart = own;
    let mut redis = fixture.redis.clone();
    let raw_key = format!("{}raw:{}", fixture.prefix, Uuid::now_v7());
    let add_one = [CartItem {
        product_id: fixture.product_id,
        quantity: 1,
        mode: QuantityMode::Add,
    }];
    let mut count = 0;
    let mut latencies = Vec::new();
    loop {
        let began = Instant::now();
        if began >= until {
            break;
        }
        match workload {
            Workload::RawHset => {
                redis::cmd("HSET")
                    .arg(&raw_key)
                    .arg("version")
                    .arg(count)
                    .query_async::<()>(&mut redis)
                    .await
                    .map_err(|e| failed(&e))?;
            }
            Workload::Swap => {
                let mut next = cart.clone();
                next.version += 1;
                next.updated_at = chrono::Utc::now();
                next.expires_at = next.updated_at + chrono::Duration::hours(1);
                let swapped = fixture
                    .store
                    .swap(&next, cart.version, next.updated_at)
                    .await
                    .map_err(|e| failed(&e))?;
                if swapped != carts::Swap::Written {
                    return Err("own cart conflicted".into());
                }
                cart = next;
            }
            Workload::AddItem | Workload::AddItemOneCart => {
                let cart_id = if workload == Workload::AddItem {
                    cart.id
                } else {
                    fixture.shared_cart
                };
                match fixture.carts.change_items(cart_id, &add_one, None).await {
                    Ok(_) => {}
                    // The line is full (999): start it again at 1, which is a change too.
                    Err(CommandError::Domain(DomainError::Invalid {
                        field: "items.quantity",
                        ..
                    })) => {
                        let reset = [CartItem {
                            mode: QuantityMode::Set,
                            ..add_one[0]
                        }];
                        fixture
                            .carts
                            .change_items(cart_id, &reset, None)
                            .await
                            .map_err(|e| failed(&e))?;
                    }
                    Err(error) => return Err(failed(&error)),
                }
            }
        }
        if began >= warm_until {
            count += 1;
            latencies.push(began.elapsed());
        }
    }
    Ok((count, latencies))
}
