//! The HTTP server: `/graphql`, `/health`, `/ready`, and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_graphql::http::GraphiQLSource;
use async_graphql_axum::{GraphQLRequest, GraphQLResponse};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use commerce_plugin_host::{EngineConfig, LoadError, PluginRegistry};
use serde_json::json;
use tokio::net::TcpListener;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::api::{self, KernelSchema};
use crate::carts::{self, ActivityRecorder, CartStore, CartStoreError};
use crate::commerce::{Carts, Commerce, Plugins, Sagas};
use crate::config::{Config, ConfigError};
use crate::event_store::StoreError;
use crate::projections::Projector;
use crate::sagas::runner::{RunnerSettings, SagaRunner};
use crate::storage::Database;

/// How long a health probe waits for a backing store before calling it down.
const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the kernel could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("carts: {0}")]
    Carts(#[from] CartStoreError),
    #[error("plugins: {0}")]
    Plugins(#[from] LoadError),
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Serve(std::io::Error),
}

/// What every request handler shares.
#[derive(Clone)]
pub struct AppState {
    database: Database,
    schema: KernelSchema,
    commerce: Commerce,
    carts: Carts,
    projector: Projector,
    plugins: Plugins,
    sagas: Sagas,
    /// Set once shutdown begins, so `/ready` sends load balancers elsewhere.
    draining: Arc<AtomicBool>,
    graphiql: bool,
}

impl AppState {
    pub fn new(
        database: Database,
        cart_store: Arc<dyn CartStore>,
        plugin_registry: Arc<PluginRegistry>,
        config: &Config,
    ) -> Self {
        let store = database.event_store();
        let views = database.view_store();
        let commerce = Commerce::new(Arc::clone(&store), Arc::clone(&views));
        let carts = Carts::new(commerce.clone(), cart_store, config.cart_limits);
        let projector = Projector::new(Arc::clone(&store), views);
        let plugins = Plugins::new(commerce.clone(), plugin_registry);
        let sagas = Sagas::new(commerce.clone(), database.saga_store());
        AppState {
            schema: api::build_schema(api::Adapters {
                event_store: store,
                commerce: commerce.clone(),
                carts: carts.clone(),
                cart_activity: database.cart_activity(),
                projector: projector.clone(),
                plugins: plugins.clone(),
                sagas: sagas.clone(),
            }),
            commerce,
            carts,
            projector,
            plugins,
            sagas,
            database,
            draining: Arc::new(AtomicBool::new(false)),
            graphiql: config.graphiql,
        }
    }
}

/// The kernel's routes with their limits.
pub fn router(state: AppState, config: &Config) -> Router {
    Router::new()
        .route("/graphql", get(graphiql).post(graphql))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .layer(RequestBodyLimitLayer::new(config.max_request_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.request_timeout,
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Opens the database (applying migrations) and the cart store, and serves
/// until `shutdown` resolves; see [`serve`].
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), KernelError> {
    let database = Database::connect(&config.database).await?;
    database.migrate().await?;
    let cart_store = carts::open(&config.carts).await?;
    serve(database, cart_store, &config, shutdown, on_listening).await
}

/// Opens the plugin directory and the engine that runs plugins.
async fn open_plugins(config: &Config) -> Result<Arc<PluginRegistry>, KernelError> {
    let dir = config.plugins.dir.clone();
    let settings = EngineConfig {
        max_concurrent_invocations: config.plugins.max_concurrent_invocations,
        cache_dir: None,
    };
    let registry = tokio::task::spawn_blocking(move || PluginRegistry::open(dir, settings))
        .await
        .map_err(|join| LoadError::Engine {
            reason: join.to_string(),
        })??;
    Ok(Arc::new(registry))
}

/// Serves the API on `config.listen_addr` from an open, migrated `database`
/// and an open cart store until `shutdown` resolves.
///
/// `on_listening` is told the bound address (useful with port 0). After
/// `shutdown`, `/ready` answers 503, no new connections are accepted, and
/// in-flight requests get up to `config.shutdown_timeout` to finish; then the
/// database pools are closed.
pub async fn serve(
    database: Database,
    cart_store: Arc<dyn CartStore>,
    config: &Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), KernelError> {
    let registry = open_plugins(config).await?;
    let state = AppState::new(database.clone(), Arc::clone(&cart_store), registry, config);
    // The plugin versions recorded as active, before the first request.
    state.plugins.catch_up().await?;
    let draining = Arc::clone(&state.draining);
    // Background work of every kernel process: projections, the expiry sweep,
    // the plugin follower, the cart activity recorder and the saga runner.
    // All are safe to run in several processes at once.
    let (stop_background, background_stopped) = tokio::sync::watch::channel(false);
    let recorder = ActivityRecorder::new(cart_store, database.cart_activity());
    let runner = Arc::new(SagaRunner::new(
        state.sagas.clone(),
        Arc::clone(state.plugins.registry()),
        RunnerSettings {
            node_id: format!("{}-{}", std::process::id(), uuid::Uuid::now_v7()),
            lease: config.sagas.lease,
            poll_interval: config.sagas.poll_interval,
            max_concurrent: config.sagas.max_concurrent,
            pause_at: config.sagas.pause_at.iter().cloned().collect(),
        },
    ));
    if !config.sagas.pause_at.is_empty() {
        tracing::warn!(points = ?config.sagas.pause_at, "saga pause points set: for crash tests only");
    }
    let background = [
        tokio::spawn(state.projector.clone().run(background_stopped.clone())),
        tokio::spawn(sweep_expired_reservations(
            state.commerce.clone(),
            background_stopped.clone(),
        )),
        tokio::spawn(state.plugins.clone().follow(background_stopped.clone())),
        tokio::spawn(recorder.run(background_stopped.clone())),
        tokio::spawn(runner.run(background_stopped)),
    ];
    let carts_backend = state.carts.store().backend();
    let app = router(state, config);

    let listener = TcpListener::bind(config.listen_addr)
        .await
        .map_err(|source| KernelError::Bind {
            address: config.listen_addr,
            source,
        })?;
    let address = listener.local_addr().map_err(KernelError::Serve)?;
    tracing::info!(
        %address,
        backend = %database.backend(),
        carts = carts_backend,
        "commerce-kernel listening on http://{address} (GraphQL at /graphql)"
    );
    on_listening(address);

    let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
    let graceful = async move {
        shutdown.await;
        draining.store(true, Ordering::SeqCst);
        tracing::info!("shutting down: finishing in-flight requests");
        let _ = stopping_tx.send(true);
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(graceful);
    let grace = config.shutdown_timeout;
    let deadline = async move {
        if stopping_rx.wait_for(|stopping| *stopping).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        served = server => served.map_err(KernelError::Serve)?,
        () = deadline => tracing::warn!(
            grace_secs = grace.as_secs(),
            "shutdown grace period over; abandoning open connections (their transactions roll back)"
        ),
    }
    let _ = stop_background.send(true);
    for task in background {
        // A batch in progress finishes (or rolls back) within the grace period.
        if tokio::time::timeout(grace, task).await.is_err() {
            tracing::warn!("a background task did not stop in time");
        }
    }
    database.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// How often the kernel looks for reservations past their expiry.
const RESERVATION_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Most reservations released per sweep.
const RESERVATION_SWEEP_LIMIT: u32 = 500;

/// Releases expired reservations (as events) until `stopped` turns true.
async fn sweep_expired_reservations(
    commerce: Commerce,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        match commerce
            .expire_reservations(chrono::Utc::now(), RESERVATION_SWEEP_LIMIT)
            .await
        {
            Ok(0) => {}
            Ok(released) => tracing::info!(released, "expired reservations released"),
            Err(error) => tracing::warn!(%error, "reservation sweep failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(RESERVATION_SWEEP_INTERVAL) => {}
            _ = stopped.changed() => return,
        }
    }
}

/// Resolves on ctrl-c or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

async fn graphql(State(state): State<AppState>, request: GraphQLRequest) -> GraphQLResponse {
    state.schema.execute(request.into_inner()).await.into()
}

async fn graphiql(State(state): State<AppState>) -> Response {
    if state.graphiql {
        Html(GraphiQLSource::build().endpoint("/graphql").finish()).into_response()
    } else {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "GraphiQL is disabled; POST GraphQL requests to /graphql",
        )
            .into_response()
    }
}

/// Runs a health probe within [`HEALTH_PROBE_TIMEOUT`]: its latency, or why
/// the store is down.
async fn probe<E: std::fmt::Display>(
    check: impl Future<Output = Result<(), E>>,
) -> Result<Duration, String> {
    let started = std::time::Instant::now();
    match tokio::time::timeout(HEALTH_PROBE_TIMEOUT, check).await {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!(
            "no answer within {} ms",
            HEALTH_PROBE_TIMEOUT.as_millis()
        )),
    }
}

async fn probe_database(database: &Database) -> Result<Duration, String> {
    probe(async { database.ping().await.map(|_| ()) }).await
}

async fn probe_carts(carts: &Carts) -> Result<Duration, String> {
    probe(carts.store().ping()).await
}

fn check_json(
    backend: impl serde::Serialize,
    probe: &Result<Duration, String>,
) -> serde_json::Value {
    match probe {
        Ok(latency) => json!({
            "status": "up",
            "backend": backend,
            "latency_ms": latency.as_secs_f64() * 1000.0,
        }),
        Err(error) => json!({ "status": "down", "backend": backend, "error": error }),
    }
}

/// Status of each backing store (database, cart store); 503 when any is down.
async fn health(State(state): State<AppState>) -> Response {
    let (database, carts) =
        tokio::join!(probe_database(&state.database), probe_carts(&state.carts));
    let (status, summary) = if database.is_ok() && carts.is_ok() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    };
    let body = json!({
        "status": summary,
        "version": env!("CARGO_PKG_VERSION"),
        "checks": {
            "database": check_json(state.database.backend(), &database),
            "carts": check_json(state.carts.store().backend(), &carts),
        },
    });
    (status, Json(body)).into_response()
}

/// 200 while the kernel takes traffic; 503 while draining or when the
/// database or the cart store is unreachable.
/// Counters in the Prometheus text format.
async fn metrics(State(state): State<AppState>) -> Response {
    let metrics = state.commerce.metrics();
    let inventory = metrics.inventory_conflicts.load(Ordering::Relaxed);
    let carts = metrics.cart_conflicts.load(Ordering::Relaxed);
    let other = metrics.other_conflicts.load(Ordering::Relaxed);
    let body = format!(
        "# HELP commerce_inventory_conflicts_total Version conflicts met by inventory commands.\n\
         # TYPE commerce_inventory_conflicts_total counter\n\
         commerce_inventory_conflicts_total {inventory}\n\
         # HELP commerce_cart_conflicts_total Version conflicts met by cart commands.\n\
         # TYPE commerce_cart_conflicts_total counter\n\
         commerce_cart_conflicts_total {carts}\n\
         # HELP commerce_command_conflicts_total Version conflicts met by other commands.\n\
         # TYPE commerce_command_conflicts_total counter\n\
         commerce_command_conflicts_total {other}\n"
    );
    let body = body + &plugin_metrics(&state.plugins) + &saga_metrics(&state.sagas).await;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
        .into_response()
}

/// Sagas per status; `commerce_sagas{status="PARKED"}` above zero needs a human.
async fn saga_metrics(sagas: &Sagas) -> String {
    use std::fmt::Write as _;
    let counts = match sagas.store().count_by_status().await {
        Ok(counts) => counts,
        Err(error) => {
            tracing::warn!(%error, "could not count sagas");
            return String::new();
        }
    };
    let mut text = String::from(
        "# HELP commerce_sagas Sagas by status (PARKED ones wait for a human).\n\
         # TYPE commerce_sagas gauge\n",
    );
    for status in crate::domain::saga::SagaStatus::ALL {
        let count = counts
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, count)| *count);
        let _ = writeln!(text, "commerce_sagas{{status=\"{status}\"}} {count}");
    }
    text
}

/// Per-plugin counters, labelled by plugin name (all versions together).
fn plugin_metrics(plugins: &Plugins) -> String {
    use std::fmt::Write as _;
    let stats = plugins.registry().all_stats();
    let mut text = String::from(
        "# HELP commerce_plugin_invocations_total Plugin invocations, failed ones included.\n\
         # TYPE commerce_plugin_invocations_total counter\n",
    );
    for (name, snapshot) in &stats {
        let _ = writeln!(
            text,
            "commerce_plugin_invocations_total{{plugin=\"{name}\"}} {}",
            snapshot.invocations
        );
    }
    text.push_str(
        "# HELP commerce_plugin_errors_total Failed plugin invocations by kind.\n\
         # TYPE commerce_plugin_errors_total counter\n",
    );
    for (name, snapshot) in &stats {
        for (kind, count) in &snapshot.errors {
            let _ = writeln!(
                text,
                "commerce_plugin_errors_total{{plugin=\"{name}\",kind=\"{kind}\"}} {count}"
            );
        }
    }
    text.push_str(
        "# HELP commerce_plugin_duration_seconds_total Time spent in plugin invocations.\n\
         # TYPE commerce_plugin_duration_seconds_total counter\n",
    );
    for (name, snapshot) in &stats {
        let seconds = snapshot.total_duration.as_secs_f64();
        let _ = writeln!(
            text,
            "commerce_plugin_duration_seconds_total{{plugin=\"{name}\"}} {seconds}"
        );
    }
    text.push_str(
        "# HELP commerce_plugin_fuel_consumed_total Wasm fuel (instructions) plugins consumed.\n\
         # TYPE commerce_plugin_fuel_consumed_total counter\n",
    );
    for (name, snapshot) in &stats {
        let _ = writeln!(
            text,
            "commerce_plugin_fuel_consumed_total{{plugin=\"{name}\"}} {}",
            snapshot.fuel_consumed
        );
    }
    text
}

async fn ready(State(state): State<AppState>) -> Response {
    let status = if state.draining.load(Ordering::SeqCst) {
        "draining"
    } else if probe_database(&state.database).await.is_err()
        || probe_carts(&state.carts).await.is_err()
    {
        "unavailable"
    } else {
        return (StatusCode::OK, Json(json!({ "status": "ready" }))).into_response();
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "status": status })),
    )
        .into_response()
}
