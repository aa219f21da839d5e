//! The kernel's Prometheus metrics, on the `prometheus-client` library: one
//! [`Metrics`] per process, built at start and shared by the parts that
//! record into it. `/metrics` encodes it in the OpenMetrics text format.
//!
//! Three kinds of source:
//! - instruments recorded where things happen: orders reaching a status
//!   and event-store append latency (the store decorators in
//!   [`crate::live::stores`]), saga durations (the saga runner), GraphQL
//!   request durations ([`GraphqlTiming`]) and cart operations (the API);
//! - gauges a background task refreshes every [`REFRESH_EVERY`]
//!   ([`refresh`]): sagas not yet final by status, projection lag. A scrape
//!   never queries the database;
//! - counters other components already keep (conflicts, saga runner,
//!   plugins), read at scrape time by a [`Collector`] the server registers
//!   ([`Metrics::register_collector`]).
//!
//! Each process counts what it did; Prometheus adds the processes up
//! (`sum by (status) (rate(commerce_orders_total[5m]))`). Gauges of shared
//! state (sagas, projection lag) are the same on every process: take `max`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::domain::order::{Order, OrderStatus};
use crate::domain::saga::SagaStatus;
use crate::event_store::{AppendOutcome, AppendRequest};

/// The cart mutations [`Metrics::count_cart_operation`] counts.
pub const CART_OPERATIONS: [&str; 5] = [
    "createCart",
    "upsertCartItems",
    "removeCartItem",
    "clearCart",
    "placeOrder",
];

/// How often [`refresh`] reads the gauges of shared state.
pub const REFRESH_EVERY: Duration = Duration::from_secs(15);

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Latency buckets for database writes and requests, in seconds: 1 ms to 10 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// Saga durations, in seconds: 50 ms to 5 minutes (the default saga timeout).
const SAGA_BUCKETS: [f64; 13] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 180.0, 300.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabel {
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProjectionLabel {
    projection: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

fn saga_histogram() -> Histogram {
    Histogram::new(SAGA_BUCKETS)
}

/// What an append will count once it succeeds ([`Metrics::observe`]).
#[derive(Debug, Default)]
pub struct ObservedAppend {
    order_statuses: Vec<OrderStatus>,
}

/// The process's registry and the instruments recorded into it.
#[derive(Debug)]
pub struct Metrics {
    /// Locked only to add a collector and to encode; instruments are
    /// recorded through their own handles, without it.
    registry: Mutex<Registry>,
    orders: Family<StatusLabel, Counter>,
    saga_duration: Family<OutcomeLabel, Histogram>,
    append_duration: Histogram,
    graphql_duration: Family<OperationLabel, Histogram>,
    cart_operations: Family<OperationLabel, Counter>,
    sagas: Family<StatusLabel, Gauge>,
    projection_lag: Family<ProjectionLabel, Gauge>,
    inventory_drift: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every instrument and the build's info.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let orders = Family::<StatusLabel, Counter>::default();
        registry.register(
            "commerce_orders",
            "Orders that reached each status on this process (PENDING: placed).",
            orders.clone(),
        );
        let saga_duration =
            Family::<OutcomeLabel, Histogram>::new_with_constructor(saga_histogram as fn() -> _);
        registry.register_with_unit(
            "commerce_saga_duration",
            "Order sagas from start to their final status, by outcome (COMPLETED, COMPENSATED).",
            Unit::Seconds,
            saga_duration.clone(),
        );
        let append_duration = latency_histogram();
        registry.register_with_unit(
            "commerce_event_store_append_duration",
            "Event-store appends (commands' and sagas' writes), from request to commit.",
            Unit::Seconds,
            append_duration.clone(),
        );
        let graphql_duration = Family::<OperationLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> _,
        );
        registry.register_with_unit(
            "commerce_graphql_request_duration",
            "GraphQL operations, by type and first root field (`mutation placeOrder`).",
            Unit::Seconds,
            graphql_duration.clone(),
        );
        let cart_operations = Family::<OperationLabel, Counter>::default();
        registry.register(
            "commerce_cart_operations",
            "Cart mutations that succeeded, by operation.",
            cart_operations.clone(),
        );
        let sagas = Family::<StatusLabel, Gauge>::default();
        registry.register(
            "commerce_sagas",
            "Sagas not yet final, by status (PARKED ones wait for a person); the same on every process.",
            sagas.clone(),
        );
        let projection_lag = Family::<ProjectionLabel, Gauge>::default();
        registry.register(
            "commerce_projection_lag_events",
            "Events a read model has yet to apply (counted up to one batch); the same on every process.",
            projection_lag.clone(),
        );
        let inventory_drift = Gauge::default();
        registry.register(
            "commerce_inventory_drift_products",
            "Products whose inventory stream disagrees with the read model or holds stock for an ended order, at this process's last reconciliation.",
            inventory_drift.clone(),
        );
        registry.register(
            "commerce_build",
            "The running kernel's version.",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        // Every series a rule or dashboard takes `increase` or `rate` of
        // exists at 0 from the start: a series born at 1 hides its first
        // event from them.
        for status in OrderStatus::ALL {
            drop(orders.get_or_create(&StatusLabel {
                status: status.as_str(),
            }));
        }
        for outcome in [SagaStatus::Completed, SagaStatus::Compensated] {
            drop(saga_duration.get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            }));
        }
        for operation in CART_OPERATIONS {
            drop(cart_operations.get_or_create(&OperationLabel {
                operation: operation.to_string(),
            }));
        }
        Metrics {
            registry: Mutex::new(registry),
            orders,
            saga_duration,
            append_duration,
            graphql_duration,
            cart_operations,
            sagas,
            projection_lag,
            inventory_drift,
        }
    }

    /// Adds counters another component keeps; read at every scrape.
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .register_collector(collector);
    }

    /// Everything, in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &registry) {
            // Writing to a String fails only if a collector fails.
            tracing::warn!(%error, "could not encode the metrics");
        }
        text
    }

    /// What [`Self::record_append`] will need of `request`, taken before
    /// the request goes to the store: the order statuses its events reach.
    pub fn observe(&self, request: &AppendRequest) -> ObservedAppend {
        use crate::domain::Aggregate as _;
        let order_statuses = request
            .streams
            .iter()
            .filter(|stream| stream.aggregate_type == Order::AGGREGATE_TYPE)
            .flat_map(|stream| &stream.events)
            .filter_map(|event| OrderStatus::reached_by(&event.event_type))
            .collect();
        ObservedAppend { order_statuses }
    }

    /// Records a successful append that took `elapsed`: its latency, and
    /// each order event as its order reaching a status. An append that
    /// only replayed an idempotency key wrote nothing and counts nothing.
    pub fn record_append(
        &self,
        observed: &ObservedAppend,
        outcome: &AppendOutcome,
        elapsed: Duration,
    ) {
        if outcome.replayed {
            return;
        }
        self.append_duration.observe(elapsed.as_secs_f64());
        for status in &observed.order_statuses {
            self.orders
                .get_or_create(&StatusLabel {
                    status: status.as_str(),
                })
                .inc();
        }
    }

    /// A saga reached its final status `outcome` after `elapsed`.
    pub fn record_saga_finished(&self, outcome: SagaStatus, elapsed: Duration) {
        self.saga_duration
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// A GraphQL operation labelled `operation` took `elapsed`.
    pub fn record_graphql(&self, operation: String, elapsed: Duration) {
        self.graphql_duration
            .get_or_create(&OperationLabel { operation })
            .observe(elapsed.as_secs_f64());
    }

    /// A cart mutation (`createCart`, ...) succeeded.
    pub fn count_cart_operation(&self, operation: &'static str) {
        self.cart_operations
            .get_or_create(&OperationLabel {
                operation: operation.to_string(),
            })
            .inc();
    }

    /// Sets the gauge of sagas in each non-final status.
    pub fn set_live_sagas(&self, counts: &[(SagaStatus, u64)]) {
        for status in SagaStatus::ALL.into_iter().filter(|s| !s.is_final()) {
            let count = counts
                .iter()
                .find(|(s, _)| *s == status)
                .map_or(0, |(_, count)| *count);
            self.sagas
                .get_or_create(&StatusLabel {
                    status: status.as_str(),
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// Sets the products with drift that the last inventory reconciliation
    /// of this process found.
    pub fn set_inventory_drift(&self, products: usize) {
        self.inventory_drift
            .set(i64::try_from(products).unwrap_or(i64::MAX));
    }

    /// Sets a read model's lag in events.
    pub fn set_projection_lag(&self, projection: &'static str, pending_events: u32) {
        self.projection_lag
            .get_or_create(&ProjectionLabel { projection })
            .set(i64::from(pending_events));
    }
}

/// Reads the gauges of shared state into `metrics` every [`REFRESH_EVERY`]
/// until the process stops: sagas not yet final (an index range, not a
/// scan of the table's history) and each projection's lag. A failed read
/// keeps the last values and is logged.
pub async fn refresh(
    metrics: Arc<Metrics>,
    sagas: Arc<dyn crate::sagas::SagaStore>,
    projector: crate::projections::Projector,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(REFRESH_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped.wait_for(|stopped| *stopped) => return,
        }
        match sagas.count_live_by_status().await {
            Ok(counts) => metrics.set_live_sagas(&counts),
            Err(error) => tracing::warn!(%error, "could not count the live sagas for /metrics"),
        }
        match projector.lag().await {
            Ok(lags) => {
                for lag in lags {
                    metrics.set_projection_lag(lag.projection.as_str(), lag.pending_events);
                }
            }
            Err(error) => tracing::warn!(%error, "could not read the projection lag for /metrics"),
        }
    }
}

/// Counters that the conflict retries, the saga runner and the plugin host
/// keep themselves, encoded from their current values at every scrape.
pub struct ComponentCounters {
    pub conflicts: Arc<crate::commerce::Metrics>,
    pub runner: Arc<crate::sagas::runner::RunnerMetrics>,
    pub plugins: Arc<commerce_plugin_host::PluginRegistry>,
}

impl std::fmt::Debug for ComponentCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ComponentCounters")
    }
}

impl Collector for ComponentCounters {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::counter::ConstCounter;
        use std::sync::atomic::Ordering::Relaxed;

        let mut counter = |name: &str, help: &str, value: u64| {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)
        };
        let conflicts = &self.conflicts;
        counter(
            "commerce_inventory_conflicts",
            "Version conflicts met by inventory commands (each retry counts one).",
            conflicts.inventory_conflicts.load(Relaxed),
        )?;
        counter(
            "commerce_cart_conflicts",
            "Version conflicts met by cart commands.",
            conflicts.cart_conflicts.load(Relaxed),
        )?;
        counter(
            "commerce_command_conflicts",
            "Version conflicts met by other commands.",
            conflicts.other_conflicts.load(Relaxed),
        )?;
        let runner = &self.runner;
        for (name, help, value) in [
            (
                "commerce_saga_write_retries",
                "Saga writes retried after the store failed (each retry backs off).",
                &runner.write_retries,
            ),
            (
                "commerce_saga_conflict_retries",
                "Saga writes retried after another write to their streams got there first.",
                &runner.conflict_retries,
            ),
            (
                "commerce_saga_deferrals",
                "Sagas given back because a step's plugin was not active on this process.",
                &runner.deferrals,
            ),
            (
                "commerce_saga_leases_lost",
                "Saga drives stopped because another process holds the saga now.",
                &runner.leases_lost,
            ),
            (
                "commerce_saga_drive_panics",
                "Saga drive tasks that panicked (the saga's lease was left to lapse).",
                &runner.panics,
            ),
            (
                "commerce_saga_stock_turns_skipped",
                "Reserve or confirm steps that stopped waiting for their turn on a product (a write on it took over 2 s) and went on without it.",
                &runner.stock_turns_skipped,
            ),
        ] {
            counter(name, help, value.load(Relaxed))?;
        }

        let mut family = encoder.encode_descriptor(
            "commerce_sagas_parked",
            "Sagas this process parked for a person, by cause.",
            None,
            MetricType::Counter,
        )?;
        for (cause, count) in runner.parked() {
            ConstCounter::new(count).encode(family.encode_family(&[("cause", cause.as_str())])?)?;
        }

        let stats = self.plugins.all_stats();
        let mut family = encoder.encode_descriptor(
            "commerce_plugin_invocations",
            "Plugin invocations, failed ones included, by plugin (all versions).",
            None,
            MetricType::Counter,
        )?;
        for (name, snapshot) in &stats {
            ConstCounter::new(snapshot.invocations)
                .encode(family.encode_family(&[("plugin", name.as_str())])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "commerce_plugin_errors",
            "Failed plugin invocations, by plugin and kind.",
            None,
            MetricType::Counter,
        )?;
        for (name, snapshot) in &stats {
            for (kind, count) in &snapshot.errors {
                ConstCounter::new(*count).encode(
                    family.encode_family(&[("plugin", name.as_str()), ("kind", kind.as_str())])?,
                )?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "commerce_plugin_duration_seconds",
            "Time spent in plugin invocations, summed.",
            None,
            MetricType::Counter,
        )?;
        for (name, snapshot) in &stats {
            ConstCounter::new(snapshot.total_duration.as_secs_f64())
                .encode(family.encode_family(&[("plugin", name.as_str())])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "commerce_plugin_fuel_consumed",
            "Wasm fuel (instructions) plugins consumed.",
            None,
            MetricType::Counter,
        )?;
        for (name, snapshot) in &stats {
            ConstCounter::new(snapshot.fuel_consumed)
                .encode(family.encode_family(&[("plugin", name.as_str())])?)?;
        }
        Ok(())
    }
}
