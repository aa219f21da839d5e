//! The HTTP server: `/graphql` (queries and mutations over POST,
//! subscriptions over WebSocket, GraphiQL on a plain GET), `/health`,
//! `/ready`, `/metrics`, and graceful shutdown.

use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_graphql::http::{ALL_WEBSOCKET_PROTOCOLS, GraphiQLSource};
use async_graphql::{BatchRequest, Data};
use async_graphql_axum::{GraphQLBatchRequest, GraphQLProtocol, GraphQLWebSocket};
use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use commerce_plugin_host::{EngineConfig, LoadError, OutboundHeaders, PluginRegistry};
use serde_json::json;
use tokio::net::TcpListener;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::api::access::AnonymousAccess;
use crate::api::guests::{ClientAddress, GuestSessions};
use crate::api::{self, ErrorCode, KernelSchema};
use crate::auth::{AuthError, AuthSetupError, Authenticator};
use crate::carts::{self, ActivityRecorder, CartStore, CartStoreError};
use crate::commerce::{Carts, CommandContext, CommandError, Commerce, Plugins, Sagas};
use crate::config::{
    Config, ConfigError, GraphqlLimits, MetricsConfig, StorefrontConfig, TEST_PAUSE_AT,
};
use crate::event_store::StoreError;
use crate::live::{LiveUpdates, NotifyingEventStore, NotifyingSagaStore};
use crate::metrics::{self, ComponentCounters, Metrics};
use crate::projections::Projector;
use crate::sagas::hooks::FaultHooks;
use crate::sagas::runner::{RunnerMetrics, RunnerSettings, SagaRunner};
use crate::storage::Database;
use crate::telemetry;

/// The actor of what the kernel records on its own, such as activating the
/// bundled plugins on a fresh database.
pub const SYSTEM_ACTOR: &str = "system";

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
    #[error("setting up the shop: {0}")]
    Setup(#[from] CommandError),
    #[error("authentication: {0}")]
    Auth(#[from] AuthSetupError),
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
    /// The counters of this process's saga runner.
    saga_runner: Arc<RunnerMetrics>,
    /// This process's Prometheus registry.
    metrics: Arc<Metrics>,
    metrics_config: Arc<MetricsConfig>,
    live: LiveUpdates,
    auth: Authenticator,
    limits: GraphqlLimits,
    max_request_bytes: usize,
    /// Set once shutdown begins, so `/ready` sends load balancers elsewhere.
    draining: Arc<AtomicBool>,
    graphiql: bool,
    /// What requests without a token may run.
    anonymous: AnonymousAccess,
    /// Browser origins and the client address source.
    storefront: Arc<StorefrontConfig>,
}

impl AppState {
    pub fn new(
        database: Database,
        cart_store: Arc<dyn CartStore>,
        plugin_registry: Arc<PluginRegistry>,
        auth: Authenticator,
        config: &Config,
    ) -> Self {
        // Every append of this process wakes its live subscriptions.
        let live = LiveUpdates::new(config.live_poll_interval);
        let metrics = Arc::new(Metrics::new());
        let store =
            NotifyingEventStore::wrap(database.event_store(), live.clone(), Arc::clone(&metrics));
        let saga_store =
            NotifyingSagaStore::wrap(database.saga_store(), live.clone(), Arc::clone(&metrics));
        let views = database.view_store();
        let commerce = Commerce::new(Arc::clone(&store), Arc::clone(&views));
        let carts = Carts::new(commerce.clone(), cart_store, config.cart_limits);
        let projector =
            Projector::new(Arc::clone(&store), views).with_horizon(live.horizon().clone());
        let plugins = Plugins::new(commerce.clone(), plugin_registry);
        let sagas = Sagas::new(commerce.clone(), saga_store);
        let saga_runner = Arc::<RunnerMetrics>::default();
        metrics.register_collector(Box::new(ComponentCounters {
            conflicts: Arc::clone(commerce.metrics()),
            runner: Arc::clone(&saga_runner),
            plugins: Arc::clone(plugins.registry()),
        }));
        let adapters = api::Adapters {
            event_store: store,
            commerce: commerce.clone(),
            carts: carts.clone(),
            cart_activity: database.cart_activity(),
            projector: projector.clone(),
            plugins: plugins.clone(),
            sagas: sagas.clone(),
            live: live.clone(),
            guests: GuestSessions::new(auth.clone(), config.storefront.guest_sessions),
            metrics: Arc::clone(&metrics),
            maintenance: database.maintenance(),
        };
        AppState {
            schema: api::build_schema(adapters, config.graphql),
            commerce,
            carts,
            projector,
            plugins,
            sagas,
            saga_runner,
            metrics,
            metrics_config: Arc::new(config.metrics.clone()),
            live,
            auth,
            limits: config.graphql,
            max_request_bytes: config.max_request_bytes,
            database,
            draining: Arc::new(AtomicBool::new(false)),
            graphiql: config.graphiql,
            anonymous: AnonymousAccess {
                catalog: config.storefront.public_catalog,
                guest_sessions: config.storefront.guest_sessions.is_some(),
            },
            storefront: Arc::new(config.storefront.clone()),
        }
    }
}

/// The kernel's routes with their limits.
pub fn router(state: AppState, config: &Config) -> Router {
    let router = Router::new()
        .route("/graphql", get(graphql_get).post(graphql))
        .route("/health", get(health))
        .route("/ready", get(ready));
    let router = if config.metrics.on_api_port {
        router.route("/metrics", get(metrics))
    } else {
        router
    };
    let router = router
        .layer(RequestBodyLimitLayer::new(config.max_request_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.request_timeout,
        ));
    let router = match cors(&config.storefront) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router
        .layer(TraceLayer::new_for_http().make_span_with({
            let trust = config.telemetry.trust_traceparent;
            move |request: &axum::http::Request<axum::body::Body>| {
                telemetry::request_span(request, trust)
            }
        }))
        .with_state(state)
}

/// Answers browsers' preflights and requests from the configured origins
/// (`COMMERCE_CORS_ORIGINS`); other origins get no CORS headers, so their
/// pages cannot read the answers. Credentials are bearer tokens, never
/// cookies, so none are allowed.
fn cors(storefront: &StorefrontConfig) -> Option<CorsLayer> {
    let origins: Vec<HeaderValue> = storefront
        .cors_origins
        .iter()
        .filter_map(|origin| HeaderValue::from_str(origin).ok())
        .collect();
    (!origins.is_empty()).then(|| {
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .max_age(Duration::from_secs(600))
    })
}

/// Where a request comes from: the last address a trusted proxy appended
/// to `X-Forwarded-For` (`ip` or `ip:port`), else the connection's peer.
/// Only the last entry counts: the ones before it are the client's word.
/// An IPv6 client counts as its /64, which one subscriber usually holds.
fn client_address(
    storefront: &StorefrontConfig,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
) -> ClientAddress {
    let forwarded = storefront
        .trust_forwarded_for
        .then(|| {
            let last = headers
                .get_all("x-forwarded-for")
                .iter()
                .next_back()?
                .to_str()
                .ok()?
                .rsplit(',')
                .next()?
                .trim();
            last.parse::<IpAddr>()
                .ok()
                .or_else(|| last.parse::<SocketAddr>().ok().map(|address| address.ip()))
        })
        .flatten();
    let address = forwarded
        .or(peer.map(|peer| peer.ip()))
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    ClientAddress(match address {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
        v4 => v4,
    })
}

/// Whether a WebSocket upgrade may proceed: a browser names its page's
/// origin, which must be a configured one or the kernel's own (GraphiQL);
/// clients that are not browsers send none.
fn origin_allowed(storefront: &StorefrontConfig, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.to_ascii_lowercase();
    if storefront.cors_origins.contains(&origin) {
        return true;
    }
    let host = headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .map(str::to_ascii_lowercase);
    host.is_some_and(|host| {
        origin
            .split_once("://")
            .is_some_and(|(_, authority)| authority == host)
    })
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
        outbound_headers: Some(OutboundHeaders::new(telemetry::inject_current)),
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
    let auth = Authenticator::open(&config.auth).await?;
    let state = AppState::new(
        database.clone(),
        Arc::clone(&cart_store),
        registry,
        auth,
        config,
    );
    // The plugin versions recorded as active, before the first request;
    // the bundled ones among them are in every process's directory.
    state.plugins.place_bundled().await?;
    state.plugins.catch_up().await?;
    if config.plugins.activate_defaults {
        let system = CommandContext {
            actor: Some(SYSTEM_ACTOR.to_string()),
            correlation_id: None,
        };
        state.plugins.activate_defaults(&system).await?;
    }
    if config.demo_catalog {
        let system = CommandContext {
            actor: Some(SYSTEM_ACTOR.to_string()),
            correlation_id: None,
        };
        let seeded = state.commerce.seed_demo_catalog(&system).await?;
        tracing::info!(
            products = seeded.len(),
            created = seeded.iter().filter(|product| product.created).count(),
            "demo catalog in place (COMMERCE_DEMO_CATALOG)"
        );
        // So the first request already lists it.
        state.projector.catch_up().await?;
    }
    let draining = Arc::clone(&state.draining);
    // Background work of every kernel process: projections, the expiry sweep,
    // the plugin follower, the cart activity recorder and the saga runner.
    // All are safe to run in several processes at once.
    let (stop_background, background_stopped) = tokio::sync::watch::channel(false);
    let recorder = ActivityRecorder::new(cart_store, database.cart_activity());
    let runner = Arc::new(
        SagaRunner::new(
            state.sagas.clone(),
            Arc::clone(state.plugins.registry()),
            RunnerSettings {
                node_id: format!("{}-{}", std::process::id(), uuid::Uuid::now_v7()),
                lease: config.sagas.lease,
                poll_interval: config.sagas.poll_interval,
                max_concurrent: config.sagas.max_concurrent,
                hooks: FaultHooks::from_setting(config.sagas.fault_hooks.as_deref()).map_err(
                    |reason| ConfigError {
                        variable: TEST_PAUSE_AT,
                        reason,
                    },
                )?,
                // Within the time the server gives each background task to stop.
                shutdown_grace: config.shutdown_timeout * 2 / 3,
            },
        )
        .with_metrics(Arc::clone(&state.metrics), Arc::clone(&state.saga_runner)),
    );
    if let Some(points) = &config.sagas.fault_hooks {
        tracing::warn!(%points, "saga fault hooks set: for the test suites only");
    }
    let redis = match &config.carts {
        carts::CartBackendConfig::Redis { url, key_prefix } => {
            Some((url.clone(), key_prefix.clone()))
        }
        carts::CartBackendConfig::Embedded => None,
    };
    let live_bridge = redis.map(|(url, key_prefix)| {
        tokio::spawn(
            state
                .live
                .clone()
                .bridge_redis(url, key_prefix, background_stopped.clone()),
        )
    });
    let background = [
        tokio::spawn(
            state
                .live
                .clone()
                .follow_log(state.commerce.store().clone(), background_stopped.clone()),
        ),
        tokio::spawn(
            state
                .live
                .horizon()
                .clone()
                .follow(state.commerce.store().clone(), background_stopped.clone()),
        ),
        tokio::spawn(state.projector.clone().run(background_stopped.clone())),
        tokio::spawn(sweep_expired_reservations(
            state.commerce.clone(),
            background_stopped.clone(),
        )),
        tokio::spawn(check_inventory(
            state.commerce.clone(),
            database.maintenance(),
            Arc::clone(&state.metrics),
            config.inventory_check_interval,
            background_stopped.clone(),
        )),
        tokio::spawn(state.plugins.clone().follow(background_stopped.clone())),
        tokio::spawn(recorder.run(background_stopped.clone())),
        tokio::spawn(metrics::refresh(
            Arc::clone(&state.metrics),
            Arc::clone(state.sagas.store()),
            state.projector.clone(),
            background_stopped.clone(),
        )),
        tokio::spawn(runner.run(background_stopped)),
    ];
    let carts_backend = state.carts.store().backend();
    let metrics_app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(state.clone());
    let app = router(state, config);
    let metrics_listener = match config.metrics.listen_addr {
        Some(address) => {
            let listener = TcpListener::bind(address)
                .await
                .map_err(|source| KernelError::Bind { address, source })?;
            tracing::info!(
                address = %listener.local_addr().map_err(KernelError::Serve)?,
                "metrics on their own listener (COMMERCE_METRICS_ADDR)"
            );
            Some(listener)
        }
        None => {
            if !config.metrics.on_api_port {
                tracing::info!(
                    "no /metrics: set COMMERCE_METRICS_ADDR (a listener of its own) or \
                     COMMERCE_METRICS_TOKEN (on this port, behind the token)"
                );
            }
            None
        }
    };

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
    // TCP_NODELAY: subscription updates are small frames sent one after
    // another; with Nagle's algorithm each waits for the client's delayed
    // acknowledgement of the one before (about 40 ms on Linux).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
    });
    // Serves until the background stops, so a scrape during the drain
    // still answers.
    let metrics_server = metrics_listener.map(|listener| {
        let mut stopped = stop_background.subscribe();
        tokio::spawn(async move {
            let stop = async move {
                let _ = stopped.wait_for(|stopped| *stopped).await;
            };
            if let Err(error) = axum::serve(listener, metrics_app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::warn!(%error, "the metrics listener stopped");
            }
        })
    });
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(graceful);
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
    for task in background
        .into_iter()
        .chain(live_bridge)
        .chain(metrics_server)
    {
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

/// Reconciles the inventory every `interval` (report only) and sets
/// `commerce_inventory_drift_products`, for the InventoryMismatch alert.
/// Every process looks at a random point of each interval; the first to
/// look once the last run is nine tenths of an interval old runs the check
/// (`StoreMaintenance::claim_check`), so a deployment replays the streams
/// about once per interval, not once per process. The others report what
/// the last run found.
async fn check_inventory(
    commerce: Commerce,
    maintenance: crate::storage::maintenance::StoreMaintenance,
    metrics: Arc<Metrics>,
    interval: Option<Duration>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let Some(interval) = interval else {
        return;
    };
    let mut wait = interval.mul_f64(rand_fraction());
    let context = CommandContext {
        actor: Some("kernel:inventory-check".into()),
        correlation_id: None,
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopped.changed() => return,
        }
        wait = interval;
        use crate::storage::maintenance::INVENTORY_CHECK;
        match maintenance
            .claim_check(INVENTORY_CHECK, interval.mul_f64(0.9))
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                match maintenance.last_check(INVENTORY_CHECK).await {
                    Ok(Some(found)) => {
                        metrics.set_inventory_drift(usize::try_from(found).unwrap_or(usize::MAX));
                    }
                    Ok(None) => {}
                    Err(error) => tracing::warn!(%error, "could not read the last inventory check"),
                }
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "could not schedule the inventory check; trying again later");
                continue;
            }
        }
        let check =
            commerce.reconcile_inventory(false, crate::commerce::RECONCILIATION_GRACE, &context);
        let checked = tokio::select! {
            checked = check => checked,
            // Report only: nothing half-done to leave behind.
            _ = stopped.changed() => return,
        };
        match checked {
            Ok(report) => {
                let drifted = report.drifted_products();
                metrics.set_inventory_drift(drifted);
                if let Err(error) = maintenance
                    .record_check(INVENTORY_CHECK, drifted as u64)
                    .await
                {
                    tracing::warn!(%error, "could not record the inventory check");
                }
                if drifted > 0 {
                    tracing::warn!(
                        products = drifted,
                        "inventory drift found; see docs/runbooks.md#inventory-reconciliation"
                    );
                }
            }
            Err(error) => {
                tracing::warn!(%error, "inventory reconciliation failed; trying again later")
            }
        }
    }
}

/// A random number in [0, 1).
fn rand_fraction() -> f64 {
    (uuid::Uuid::new_v4().as_u128() % 1_000_000) as f64 / 1_000_000.0
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

/// Queries and mutations: authenticated, within the batch bound, and with
/// every error carrying a code.
async fn graphql(
    State(state): State<AppState>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    request: Result<GraphQLBatchRequest<BadRequest>, BadRequest>,
) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    let principal = match state.auth.authenticate_header(authorization).await {
        Ok(principal) => Some(principal),
        // No token at all: the catalog and guest sessions may still answer.
        Err(AuthError::Missing) => None,
        Err(error) => return auth_refusal(&error),
    };
    let mut request = match request {
        Ok(request) => request.0,
        Err(refusal) => return refusal.into_response(),
    };
    if let BatchRequest::Batch(requests) = &request
        && requests.len() > state.limits.max_batch
    {
        return graphql_error(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidQuery,
            &format!(
                "the batch holds {} operations; at most {} are accepted",
                requests.len(),
                state.limits.max_batch
            ),
        );
    }
    if principal.is_none() {
        let open = match &mut request {
            BatchRequest::Single(request) => state.anonymous.allows(request),
            BatchRequest::Batch(requests) => requests
                .iter_mut()
                .all(|request| state.anonymous.allows(request)),
        };
        if !open {
            return auth_refusal(&AuthError::Missing);
        }
    }
    let client = client_address(&state.storefront, &headers, peer.map(|peer| peer.0.0));
    // Every command of this request records it (and its trace), and so
    // does every log line of the request.
    let correlation = api::access::Correlation::new();
    tracing::Span::current().record("correlation_id", tracing::field::display(correlation.0));
    let request = request.data(client).data(correlation);
    let request = match principal {
        Some(principal) => request.data(principal),
        None => request,
    };
    let response = state.schema.execute_batch(request).await;
    async_graphql_axum::GraphQLResponse::from(response).into_response()
}

/// A body that is not a GraphQL request: 400 (413 when too large) with a
/// GraphQL error body, never the parser's debug output.
struct BadRequest(async_graphql::ParseRequestError);

impl From<async_graphql::ParseRequestError> for BadRequest {
    fn from(error: async_graphql::ParseRequestError) -> Self {
        BadRequest(error)
    }
}

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        use async_graphql::ParseRequestError;
        match self.0 {
            ParseRequestError::PayloadTooLarge => graphql_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::InvalidQuery,
                "the request body is too large",
            ),
            other => graphql_error(StatusCode::BAD_REQUEST, ErrorCode::InvalidQuery, &{
                // The parse error may quote the body.
                let mut reason = format!("not a GraphQL request: {other}");
                api::error::shorten(&mut reason);
                reason
            }),
        }
    }
}

/// A response shaped like GraphQL's, for refusals before execution.
fn graphql_error(status: StatusCode, code: ErrorCode, message: &str) -> Response {
    let body =
        json!({ "errors": [{ "message": message, "extensions": { "code": code.as_str() } }] });
    (status, Json(body)).into_response()
}

/// 401 (with `WWW-Authenticate`), 403 or 503 for a request that may not run.
fn auth_refusal(error: &AuthError) -> Response {
    let (status, code) = match error.status() {
        403 => (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
        503 => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Internal),
        _ => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthenticated),
    };
    let mut response = graphql_error(status, code, &error.to_string());
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"commerce-kernel\""),
        );
    }
    response
}

/// What a subscription socket reads at a time. The socket library zeroes
/// this much before every read, even one that finds nothing (its default,
/// 128 KiB, was 3% of the kernel's CPU under load), while clients send only
/// small control messages; a bigger message still arrives whole, as the
/// buffer grows to a frame's announced length.
const WEBSOCKET_READ_BUFFER_BYTES: usize = 4 * 1024;

/// `GET /graphql`: a WebSocket upgrade starts a subscription connection;
/// anything else gets GraphiQL (when enabled).
async fn graphql_get(
    State(state): State<AppState>,
    headers: HeaderMap,
    protocol: Result<GraphQLProtocol, StatusCode>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match (upgrade, protocol) {
        (Ok(_), _) if !origin_allowed(&state.storefront, &headers) => (
            StatusCode::FORBIDDEN,
            "this origin may not open subscriptions (COMMERCE_CORS_ORIGINS)",
        )
            .into_response(),
        (Ok(upgrade), Ok(protocol)) => {
            let (schema, auth) = (state.schema.clone(), state.auth.clone());
            // The body limit does not reach inside a WebSocket: bound its
            // messages the same way.
            upgrade
                .read_buffer_size(WEBSOCKET_READ_BUFFER_BYTES)
                .max_message_size(state.max_request_bytes)
                .max_frame_size(state.max_request_bytes)
                .protocols(ALL_WEBSOCKET_PROTOCOLS)
                .on_upgrade(move |socket| {
                    GraphQLWebSocket::new(socket, schema, protocol)
                        .on_connection_init(move |payload| authenticate_socket(auth, payload))
                        .serve()
                })
        }
        (Ok(_), Err(status)) => (
            status,
            "WebSocket subprotocol must be graphql-transport-ws or graphql-ws",
        )
            .into_response(),
        (Err(_), _) => graphiql(state.graphiql),
    }
}

/// The token of a WebSocket connection comes in its `connection_init`
/// payload (browsers cannot set headers on WebSockets): `{"authorization":
/// "Bearer <token>"}` (any case) or `{"token": "<token>"}`. Without a valid
/// one the server closes the connection (4403).
async fn authenticate_socket(
    auth: Authenticator,
    payload: serde_json::Value,
) -> async_graphql::Result<Data> {
    let field = |name: &str| {
        payload.as_object().and_then(|object| {
            object
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .and_then(|(_, value)| value.as_str())
        })
    };
    let principal = match (field("authorization"), field("token")) {
        (Some(header), _) => auth.authenticate_header(Some(header)).await,
        (None, Some(token)) => auth.verify(token).await,
        (None, None) => Err(AuthError::Missing),
    }
    .map_err(|error| async_graphql::Error::new(error.to_string()))?;
    let mut data = Data::default();
    data.insert(principal);
    Ok(data)
}

fn graphiql(enabled: bool) -> Response {
    if enabled {
        Html(
            GraphiQLSource::build()
                .endpoint("/graphql")
                .subscription_endpoint("/graphql")
                .finish(),
        )
        .into_response()
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

/// The process's metrics ([`crate::metrics`]), where the configuration
/// serves them ([`MetricsConfig`]): a token, when set, is required as a
/// bearer token, compared in constant time.
async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(expected) = &state.metrics_config.token {
        // The scheme's case does not matter (RFC 9110); the token's does.
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token.trim());
        let matches: bool =
            subtle::ConstantTimeEq::ct_eq(given.as_bytes(), expected.as_bytes()).into();
        if !matches {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "/metrics needs the token set in COMMERCE_METRICS_TOKEN\n",
            )
                .into_response();
        }
    }
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        state.metrics.encode(),
    )
        .into_response()
}

/// 200 while the kernel takes traffic; 503 while draining or when the
/// database or the cart store is unreachable.
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
