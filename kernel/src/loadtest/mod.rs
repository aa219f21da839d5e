//! `commerce-kernel loadtest`: drives a running kernel the way a storefront
//! does and reports what a shop owner would measure.
//!
//! Each order is three things a shop's pages do: `createCart` with N lines,
//! `placeOrder`, and waiting for CONFIRMED on the customer's
//! `orderStatusChanged` subscription (never polling). Orders arrive either
//! at a fixed rate (open loop: each order's latency counts from when it was
//! due, so a slow kernel cannot hide its queueing, the coordinated-omission
//! trap), or from C clients placing orders back to back (closed loop).
//!
//! Set-up, with an admin token minted from the configured secret: a catalog
//! of products with ample stock, customers (tokens for fresh ids) and, when
//! given plugin components, the `payment` and `shipping` plugins installed
//! and activated against an in-process provider stub ([`stub`]). At the end
//! every order of the run is audited: CONFIRMED, and (with the stub) exactly
//! one captured payment and one live shipment in the stub's ledger. Anything
//! else is reported and makes the command exit non-zero.

mod report;
pub mod storefront;
mod stub;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use uuid::Uuid;

pub use report::{CpuSample, LatencySummary, Report};
pub use storefront::{CallError, LiveOrders, Storefront};
pub use stub::ProviderStub;

use report::Latencies;

/// Why a load test could not run (as opposed to what it measured).
#[derive(Debug, thiserror::Error)]
pub enum LoadtestError {
    #[error("{0}")]
    Usage(String),
    #[error("setting up the shop failed: {0}")]
    Setup(String),
    #[error("the provider stub: {0}")]
    Stub(String),
    #[error("writing the report: {0}")]
    Report(String),
}

/// How orders arrive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrivals {
    /// `clients` customers, each placing its next order when the last one
    /// is CONFIRMED.
    Closed { clients: usize },
    /// Orders due at a fixed rate, whatever happened to earlier ones.
    Open { per_second: f64 },
}

/// What `commerce-kernel loadtest` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The kernels, `http://host:port`: customers are spread over them.
    pub urls: Vec<String>,
    pub arrivals: Arrivals,
    /// The measured window.
    pub duration: Duration,
    /// Orders before the window: placed and audited, not measured.
    pub warmup: Duration,
    /// Products in the catalog the load test creates (or takes, with
    /// `use_catalog`).
    pub products: usize,
    /// Take the first `products` products of the kernel's catalog (sellable
    /// in EUR, with stock) instead of creating new ones: to load-test a
    /// shop as it is, with its history (an aged database, say).
    pub use_catalog: bool,
    /// Lines per cart, each a different product.
    pub lines: usize,
    /// Customers orders are spread over in open loop (each has one
    /// subscription connection).
    pub customers: usize,
    /// Units of stock per product.
    pub stock: i64,
    /// Components to install as the `payment` and `shipping` plugins,
    /// configured for the provider stub.
    pub payment_plugin: Option<PathBuf>,
    pub shipping_plugin: Option<PathBuf>,
    /// Start the provider stub on this port even without plugins to
    /// install (the kernel's plugins already point at it).
    pub stub_port: Option<u16>,
    /// Longest an order may take to reach a final status.
    pub order_timeout: Duration,
    /// Where to write the JSON report.
    pub json: Option<PathBuf>,
}

pub const USAGE: &str = "\
usage: commerce-kernel loadtest [options]

Drives a running kernel as a storefront does: per order createCart with
--lines lines, placeOrder, then wait for CONFIRMED on orderStatusChanged.
The admin and customer tokens are minted with the configured secret
(COMMERCE_JWT_SECRET, or the embedded default's <data dir>/jwt-secret).

  --url URL               the kernel (default http://127.0.0.1:8084); given
                          more than once, customers are spread over the kernels
  --clients N             closed loop: N clients back to back (default 8)
  --rate N                open loop: N orders/s due at fixed times instead
  --duration SECS         measured window (default 20)
  --warmup SECS           orders before the window, audited only (default 2)
  --products N            products to create (default 20)
  --use-catalog           take the first --products products of the
                          kernel's catalog instead (sellable in EUR, with
                          stock): a shop as it is, with its history
  --lines N               lines per order (default 2)
  --customers N           customers in open loop (default 64)
  --stock N               stock per product (default 100000000)
  --payment-plugin FILE   install this component as plugin `payment` and
  --shipping-plugin FILE  this one as `shipping`, both against the provider
                          stub this command starts (payment-http's and
                          shipping-http's protocol); the stub's ledger is audited
  --stub-port PORT        start the stub on this port without installing
  --order-timeout SECS    longest wait for a final status (default 30)
  --json FILE             also write the report as JSON

Exit status: 0 when every order was CONFIRMED (with one charge and one
shipment each where the stub keeps the ledger) and no call failed; 1 otherwise.";

impl Options {
    /// Parses the words after `loadtest`.
    pub fn parse(args: &[String]) -> Result<Options, LoadtestError> {
        let mut options = Options {
            urls: Vec::new(),
            arrivals: Arrivals::Closed { clients: 8 },
            duration: Duration::from_secs(20),
            warmup: Duration::from_secs(2),
            products: 20,
            use_catalog: false,
            lines: 2,
            customers: 64,
            stock: 100_000_000,
            payment_plugin: None,
            shipping_plugin: None,
            stub_port: None,
            order_timeout: Duration::from_secs(30),
            json: None,
        };
        let usage = |problem: String| LoadtestError::Usage(problem);
        let mut rest = args.iter();
        while let Some(flag) = rest.next() {
            if flag == "--use-catalog" {
                options.use_catalog = true;
                continue;
            }
            let value = rest
                .next()
                .ok_or_else(|| usage(format!("{flag} needs a value")))?;
            let number = |low: f64, high: f64| -> Result<f64, LoadtestError> {
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|n| n.is_finite() && (low..=high).contains(n))
                    .ok_or_else(|| usage(format!("{flag} is a number from {low} to {high}")))
            };
            let seconds = |low: f64, high: f64| number(low, high).map(Duration::from_secs_f64);
            match flag.as_str() {
                "--url" => options.urls.push(value.clone()),
                "--clients" => {
                    options.arrivals = Arrivals::Closed {
                        clients: number(1.0, 10_000.0)? as usize,
                    }
                }
                "--rate" => {
                    options.arrivals = Arrivals::Open {
                        per_second: number(0.1, 100_000.0)?,
                    }
                }
                "--duration" => options.duration = seconds(0.5, 86_400.0)?,
                "--warmup" => options.warmup = seconds(0.0, 3_600.0)?,
                "--products" => options.products = number(1.0, 10_000.0)? as usize,
                "--lines" => options.lines = number(1.0, 100.0)? as usize,
                "--customers" => options.customers = number(1.0, 100_000.0)? as usize,
                "--stock" => options.stock = number(1.0, 1e12)? as i64,
                "--payment-plugin" => options.payment_plugin = Some(PathBuf::from(value)),
                "--shipping-plugin" => options.shipping_plugin = Some(PathBuf::from(value)),
                "--stub-port" => options.stub_port = Some(number(0.0, 65_535.0)? as u16),
                "--order-timeout" => options.order_timeout = seconds(0.1, 3_600.0)?,
                "--json" => options.json = Some(PathBuf::from(value)),
                other => return Err(usage(format!("unknown option `{other}`"))),
            }
        }
        if options.urls.is_empty() {
            options.urls.push("http://127.0.0.1:8084".to_string());
        }
        if options.lines > options.products {
            return Err(usage(format!(
                "--lines {} needs at least as many --products",
                options.lines
            )));
        }
        if options.payment_plugin.is_some() != options.shipping_plugin.is_some() {
            return Err(usage(
                "--payment-plugin and --shipping-plugin go together".to_string(),
            ));
        }
        Ok(options)
    }
}

/// Tokens the load test acts with, minted by the caller (who holds the
/// secret): `admin` for set-up, and one per customer (subject: a fresh
/// customer id).
pub struct Tokens {
    pub admin: String,
    pub customers: Vec<String>,
}

/// How many customers `options` needs tokens for.
pub fn customers_needed(options: &Options) -> usize {
    match options.arrivals {
        Arrivals::Closed { clients } => clients,
        Arrivals::Open { .. } => options.customers,
    }
}

/// Runs the load test against the kernel; the report, also written as JSON
/// when asked.
pub async fn run(options: &Options, tokens: Tokens) -> Result<Report, LoadtestError> {
    let storefronts = options
        .urls
        .iter()
        .map(|url| Storefront::new(url))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| LoadtestError::Usage(error.to_string()))?;
    let storefront = &storefronts[0];
    let stub = match (&options.payment_plugin, options.stub_port) {
        (Some(_), port) => Some(ProviderStub::start(port.unwrap_or(0)).await?),
        (None, Some(port)) => Some(ProviderStub::start(port).await?),
        (None, None) => None,
    };
    if let (Some(stub), Some(payment), Some(shipping)) =
        (&stub, &options.payment_plugin, &options.shipping_plugin)
    {
        install_plugins(storefront, &tokens.admin, stub, payment, shipping).await?;
        // Kernels follow activations from the log every 2 s and then load
        // (compile) the component: that work must not fall in the window.
        tokio::time::sleep(PLUGIN_FOLLOW).await;
    }
    let products = if options.use_catalog {
        existing_catalog(storefront, &tokens.admin, options).await?
    } else {
        create_catalog(storefront, &tokens.admin, options).await?
    };
    let mut customers = Vec::with_capacity(tokens.customers.len());
    for (index, token) in tokens.customers.into_iter().enumerate() {
        let storefront = storefronts[index % storefronts.len()].clone();
        let live = storefront
            .live(&token)
            .await
            .map_err(|error| LoadtestError::Setup(format!("subscription connection: {error}")))?;
        customers.push(Customer {
            token,
            storefront,
            live,
        });
    }
    let shop = Arc::new(Shop {
        products,
        customers,
        lines: options.lines,
        order_timeout: options.order_timeout,
        tally: Mutex::new(Tally::default()),
    });

    let started = Instant::now();
    let window_start = started + options.warmup;
    let window_end = window_start + options.duration;
    let cpu_sampler = tokio::spawn(async move {
        tokio::time::sleep_until(window_start.into()).await;
        CpuSample::now()
    });
    match options.arrivals {
        Arrivals::Closed { clients } => closed_loop(&shop, clients, window_start, window_end).await,
        Arrivals::Open { per_second } => {
            open_loop(&shop, per_second, started, window_start, window_end).await
        }
    }
    // Every order of the run has ended (final status or timeout): the CPU
    // window covers the measured orders' whole work.
    let cpu_before = cpu_sampler.await.ok().flatten();
    let cpu_after = CpuSample::now();

    let tally = std::mem::take(&mut *lock(&shop.tally));
    let cpu_ms_per_order = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) if tally.measured > 0 => {
            let mut per_order: BTreeMap<String, f64> = after
                .since(&before)
                .into_iter()
                .map(|(group, seconds)| {
                    (group.to_string(), seconds * 1000.0 / tally.measured as f64)
                })
                .collect();
            let total = per_order.values().sum();
            per_order.insert("total".to_string(), total);
            Some(per_order)
        }
        _ => None,
    };
    let (problems, more_problems) = audit(&tally, stub.as_ref());
    let report = Report {
        mode: match options.arrivals {
            Arrivals::Closed { .. } => "closed",
            Arrivals::Open { .. } => "open",
        }
        .to_string(),
        clients: match options.arrivals {
            Arrivals::Closed { clients } => Some(clients),
            Arrivals::Open { .. } => None,
        },
        target_rate: match options.arrivals {
            Arrivals::Open { per_second } => Some(per_second),
            Arrivals::Closed { .. } => None,
        },
        duration_s: options.duration.as_secs_f64(),
        warmup_s: options.warmup.as_secs_f64(),
        lines_per_order: options.lines,
        products: options.products,
        orders: tally.measured,
        confirmed: tally.measured_confirmed,
        failed: tally.measured - tally.measured_confirmed,
        orders_per_s: tally.measured_confirmed as f64 / options.duration.as_secs_f64(),
        create_cart: tally.create_cart.summary(),
        place_order: tally.place_order.summary(),
        place_to_confirmed: tally.confirmed.summary(),
        errors: tally.errors.clone(),
        cpu_ms_per_order,
        audited_orders: tally.orders.len() as u64,
        ledger_checked: stub.is_some(),
        problems,
        more_problems,
    };
    if let Some(path) = &options.json {
        let json = serde_json::to_string_pretty(&report)
            .map_err(|error| LoadtestError::Report(error.to_string()))?;
        std::fs::write(path, json + "\n")
            .map_err(|error| LoadtestError::Report(format!("{}: {error}", path.display())))?;
    }
    Ok(report)
}

/// A customer of the load test: their token, the kernel they use and
/// their subscription connection to it.
struct Customer {
    token: String,
    storefront: Storefront,
    live: LiveOrders,
}

/// What every order task shares.
struct Shop {
    products: Vec<Uuid>,
    customers: Vec<Customer>,
    lines: usize,
    order_timeout: Duration,
    tally: Mutex<Tally>,
}

/// What the orders of a run did.
#[derive(Default)]
struct Tally {
    /// Orders started in the measured window, and those CONFIRMED.
    measured: u64,
    measured_confirmed: u64,
    create_cart: Latencies,
    place_order: Latencies,
    confirmed: Latencies,
    errors: BTreeMap<String, u64>,
    /// Every order placed in the run (warm-up too): its id and final status
    /// (or why none was seen).
    orders: Vec<(String, Result<String, CallError>)>,
    /// Why warm-up orders were never placed (measured ones count in `errors`).
    unplaced_in_warmup: Vec<CallError>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn closed_loop(shop: &Arc<Shop>, clients: usize, window_start: Instant, window_end: Instant) {
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let shop = Arc::clone(shop);
            tokio::spawn(async move {
                let mut sequence = client;
                loop {
                    let start = Instant::now();
                    if start >= window_end {
                        break;
                    }
                    shop.order(client, sequence, start, None, start >= window_start)
                        .await;
                    sequence += clients;
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
}

async fn open_loop(
    shop: &Arc<Shop>,
    per_second: f64,
    started: Instant,
    window_start: Instant,
    window_end: Instant,
) {
    let interval = Duration::from_secs_f64(1.0 / per_second);
    let mut tasks = Vec::new();
    for sequence in 0usize.. {
        let due = started + interval.mul_f64(sequence as f64);
        if due >= window_end {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let shop = Arc::clone(shop);
        let customer = sequence % shop.customers.len();
        tasks.push(tokio::spawn(async move {
            shop.order(customer, sequence, due, Some(due), due >= window_start)
                .await;
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

const CREATE_CART: &str = "mutation ($input: CreateCartInput!) { createCart(input: $input) { cart { id } errors { code message } } }";
const PLACE_ORDER: &str = "mutation ($input: PlaceOrderInput!) { placeOrder(input: $input) { order { id status } errors { code message } } }";

impl Shop {
    /// One order from `customer`: cart, checkout, wait for its final
    /// status. `due` is its scheduled start in open loop.
    async fn order(
        &self,
        customer: usize,
        sequence: usize,
        start: Instant,
        due: Option<Instant>,
        measured: bool,
    ) {
        let customer = &self.customers[customer % self.customers.len()];
        let items: Vec<Value> = (0..self.lines)
            .map(|line| {
                let product = self.products[(sequence * self.lines + line) % self.products.len()];
                json!({ "productId": product, "quantity": 1 })
            })
            .collect();
        let outcome = self.place(customer, items, start, due).await;
        let mut tally = lock(&self.tally);
        let Steps {
            create_cart,
            place_order,
            order,
        } = outcome;
        if measured {
            tally.measured += 1;
            if let Some(latency) = create_cart {
                tally.create_cart.record(latency);
            }
            if let Some(latency) = place_order {
                tally.place_order.record(latency);
            }
        }
        match order {
            Ok((order_id, Ok(status), confirmed_after)) => {
                if measured && status == "CONFIRMED" {
                    tally.measured_confirmed += 1;
                    tally.confirmed.record(confirmed_after);
                } else if measured {
                    *tally.errors.entry(format!("ORDER_{status}")).or_default() += 1;
                }
                tally.orders.push((order_id, Ok(status)));
            }
            Ok((order_id, Err(error), _)) => {
                if measured {
                    *tally.errors.entry(error.code.clone()).or_default() += 1;
                }
                tally.orders.push((order_id, Err(error)));
            }
            Err(error) => {
                if measured {
                    *tally.errors.entry(error.code).or_default() += 1;
                } else {
                    tally.unplaced_in_warmup.push(error);
                }
            }
        }
    }

    async fn place(
        &self,
        customer: &Customer,
        items: Vec<Value>,
        start: Instant,
        due: Option<Instant>,
    ) -> Steps {
        let mut steps = Steps {
            create_cart: None,
            place_order: None,
            order: Err(CallError::new("UNKNOWN", "not placed")),
        };
        let cart = customer
            .storefront
            .mutate(
                &customer.token,
                "createCart",
                CREATE_CART,
                json!({ "input": { "items": items } }),
            )
            .await;
        steps.create_cart = Some(start.elapsed());
        let cart_id = match cart {
            Ok(payload) => payload["cart"]["id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            Err(error) => {
                steps.order = Err(error);
                return steps;
            }
        };
        let placing = Instant::now();
        let placed = customer
            .storefront
            .mutate(
                &customer.token,
                "placeOrder",
                PLACE_ORDER,
                json!({ "input": {
                    "cartId": cart_id,
                    "paymentMethod": "tok_loadtest",
                    "shippingAddress": { "name": "Load Test", "line1": "1 Main St", "city": "Berlin", "postalCode": "10115", "country": "DE" },
                }}),
            )
            .await;
        steps.place_order = Some(placing.elapsed());
        let order_id = match placed {
            Ok(payload) => match payload["order"]["id"].as_str() {
                Some(id) => id.to_string(),
                None => {
                    steps.order = Err(CallError::new("NO_ORDER", payload.to_string()));
                    return steps;
                }
            },
            Err(error) => {
                steps.order = Err(error);
                return steps;
            }
        };
        let watching = customer.live.watch(&order_id);
        let status = match tokio::time::timeout(self.order_timeout, watching).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(CallError::new("WS_CLOSED", "the subscription was dropped")),
            Err(_) => Err(CallError::new(
                "TIMEOUT",
                format!("no final status within {:?}", self.order_timeout),
            )),
        };
        let confirmed_after = due.unwrap_or(placing).elapsed();
        steps.order = Ok((order_id, status, confirmed_after));
        steps
    }
}

/// What one order's calls did: the calls' latencies, and the order's id
/// with its final status and the time to it (or why it was not placed).
struct Steps {
    create_cart: Option<Duration>,
    place_order: Option<Duration>,
    #[allow(clippy::type_complexity)]
    order: Result<(String, Result<String, CallError>, Duration), CallError>,
}

/// How long kernels may take to run a newly activated plugin.
const PLUGIN_FOLLOW: Duration = Duration::from_secs(3);

/// Problems listed in a report; more are counted.
const LISTED_PROBLEMS: usize = 20;

/// Every order of the run CONFIRMED, and with the stub exactly one
/// captured payment (and no other) and one live shipment each.
fn audit(tally: &Tally, stub: Option<&ProviderStub>) -> (Vec<String>, u64) {
    let mut problems: Vec<String> = tally
        .unplaced_in_warmup
        .iter()
        .map(|error| format!("a warm-up order was not placed: {error}"))
        .collect();
    let ledger = stub.map(ProviderStub::by_order);
    for (order_id, status) in &tally.orders {
        match status {
            Ok(status) if status == "CONFIRMED" => {}
            Ok(status) => problems.push(format!("order {order_id} ended {status}")),
            Err(error) => problems.push(format!("order {order_id}: {error}")),
        }
        if let Some(ledger) = &ledger {
            let entry = ledger.get(order_id).cloned().unwrap_or_default();
            if entry.captured != 1 || entry.payments != 1 || entry.live_shipments != 1 {
                problems.push(format!(
                    "order {order_id}: {} payments ({} captured), {} shipments in the ledger",
                    entry.payments, entry.captured, entry.live_shipments
                ));
            }
        }
    }
    let more = problems.len().saturating_sub(LISTED_PROBLEMS) as u64;
    problems.truncate(LISTED_PROBLEMS);
    (problems, more)
}

const INSTALL: &str = "mutation ($input: InstallPluginInput!) { installPlugin(input: $input) { errors { field code message } } }";
const ACTIVATE: &str = "mutation ($name: String!, $version: String!) { activatePlugin(input: { name: $name, version: $version }) { errors { code message } } }";

/// Installs and activates the two components as `payment` and `shipping`,
/// configured for the stub, under a version of their own for this run.
async fn install_plugins(
    storefront: &Storefront,
    admin: &str,
    stub: &ProviderStub,
    payment: &std::path::Path,
    shipping: &std::path::Path,
) -> Result<(), LoadtestError> {
    use base64::Engine as _;
    let version = format!("0.0.0-loadtest.{}", Uuid::now_v7().simple());
    for (name, path) in [("payment", payment), ("shipping", shipping)] {
        let bytes = std::fs::read(path)
            .map_err(|error| LoadtestError::Usage(format!("{}: {error}", path.display())))?;
        let manifest = format!(
            "name = \"{name}\"\nversion = \"{version}\"\nkind = \"{name}\"\n\
             component = \"{name}.wasm\"\nsha256 = \"{}\"\n\
             allowed_hosts = [\"{}\"]\n[config]\nbase_url = \"{}\"\n",
            commerce_plugin_host::sha256_hex(&bytes),
            stub.address,
            stub.base_url()
        );
        let input = json!({
            "manifest": manifest,
            "component": base64::engine::general_purpose::STANDARD.encode(&bytes),
        });
        let setup = |error: CallError| LoadtestError::Setup(format!("plugin {name}: {error}"));
        storefront
            .mutate(admin, "installPlugin", INSTALL, json!({ "input": input }))
            .await
            .map_err(setup)?;
        storefront
            .mutate(
                admin,
                "activatePlugin",
                ACTIVATE,
                json!({ "name": name, "version": version }),
            )
            .await
            .map_err(setup)?;
    }
    Ok(())
}

const CREATE_PRODUCT: &str = "mutation ($sku: String!, $name: String!, $amount: Decimal!) { createProduct(input: { sku: $sku, name: $name, price: { amount: $amount, currency: \"EUR\" } }) { product { id } errors { code message } } }";
const ADJUST: &str = "mutation ($id: UUID!, $delta: Int!) { adjustInventory(input: { productId: $id, delta: $delta, reason: \"load test stock\" }) { errors { code message } } }";

const FIRST_PRODUCTS: &str = "query ($first: Int!) { products(first: $first) { edges { node { id active price { currency } inventory { available } } } } }";

/// The first `options.products` products of the kernel's catalog; an error
/// unless each is active, priced in EUR and in stock (a cart takes one
/// currency, and an order on a product without stock fails).
async fn existing_catalog(
    storefront: &Storefront,
    admin: &str,
    options: &Options,
) -> Result<Vec<Uuid>, LoadtestError> {
    let first = i64::try_from(options.products).unwrap_or(i64::MAX);
    let body = storefront
        .graphql(admin, FIRST_PRODUCTS, json!({ "first": first }))
        .await
        .map_err(|error| LoadtestError::Setup(format!("listing the catalog: {error}")))?;
    let edges = body["data"]["products"]["edges"]
        .as_array()
        .ok_or_else(|| LoadtestError::Setup(format!("products answered {body}")))?;
    let mut products = Vec::with_capacity(edges.len());
    for edge in edges {
        let node = &edge["node"];
        let usable = node["active"] == true
            && node["price"]["currency"] == "EUR"
            && node["inventory"]["available"]
                .as_i64()
                .is_some_and(|n| n > 0);
        let id = node["id"].as_str().and_then(|id| id.parse().ok());
        match id {
            Some(id) if usable => products.push(id),
            _ => {
                return Err(LoadtestError::Setup(format!(
                    "--use-catalog: product {node} is not active, in EUR and in stock"
                )));
            }
        }
    }
    if products.len() < options.products {
        return Err(LoadtestError::Setup(format!(
            "--use-catalog: the catalog has {} products, --products asks for {}",
            products.len(),
            options.products
        )));
    }
    Ok(products)
}

/// Creates `options.products` products priced in EUR, each with
/// `options.stock` units; their ids.
async fn create_catalog(
    storefront: &Storefront,
    admin: &str,
    options: &Options,
) -> Result<Vec<Uuid>, LoadtestError> {
    let run = Uuid::now_v7().simple().to_string();
    let mut products = Vec::with_capacity(options.products);
    for index in 0..options.products {
        let setup = |error: CallError| LoadtestError::Setup(format!("product {index}: {error}"));
        let created = storefront
            .mutate(
                admin,
                "createProduct",
                CREATE_PRODUCT,
                json!({
                    "sku": format!("LT-{run}-{index}"),
                    "name": format!("Load test product {index}"),
                    "amount": format!("{}.90", 5 + index % 50),
                }),
            )
            .await
            .map_err(setup)?;
        let id: Uuid = created["product"]["id"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .ok_or_else(|| LoadtestError::Setup(format!("createProduct answered {created}")))?;
        storefront
            .mutate(
                admin,
                "adjustInventory",
                ADJUST,
                json!({ "id": id, "delta": options.stock }),
            )
            .await
            .map_err(setup)?;
        products.push(id);
    }
    Ok(products)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(words: &[&str]) -> Result<Options, LoadtestError> {
        Options::parse(&words.iter().map(|w| w.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options_parse_and_refuse_what_cannot_run() {
        let options = parse(&["--rate", "500", "--duration", "60", "--lines", "3"]).expect("valid");
        assert_eq!(options.arrivals, Arrivals::Open { per_second: 500.0 });
        assert_eq!(options.duration, Duration::from_secs(60));
        assert_eq!(options.lines, 3);
        assert!(!options.use_catalog);
        let options = parse(&["--use-catalog", "--products", "5"]).expect("valid");
        assert!(options.use_catalog && options.products == 5);
        for bad in [
            &["--clients"][..],
            &["--clients", "0"],
            &["--rate", "NaN"],
            &["--lines", "30", "--products", "20"],
            &["--payment-plugin", "p.wasm"],
            &["--frobnicate", "1"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_audit_finds_orders_not_confirmed() {
        let mut tally = Tally::default();
        tally.orders.push(("a".into(), Ok("CONFIRMED".into())));
        tally.orders.push(("b".into(), Ok("FAILED".into())));
        tally
            .orders
            .push(("c".into(), Err(CallError::new("TIMEOUT", "slow"))));
        let (problems, more) = audit(&tally, None);
        assert_eq!(more, 0);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("b ended FAILED"));
    }
}
