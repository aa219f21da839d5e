//! Kernel configuration, read from `COMMERCE_*` environment variables.
//!
//! Every variable has a safe default, so the kernel starts with none set (on the
//! embedded SQLite backend). A value that cannot be used stops start-up with a
//! [`ConfigError`] naming the variable. The README lists the variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;

use crate::auth::{AuthConfig, KeySource, MIN_SECRET_BYTES, SECRET_FILE};
use crate::carts::CartBackendConfig;
use crate::domain::cart::CartLimits;
use crate::domain::order::MAX_LINES;
use crate::storage::DatabaseConfig;
use crate::telemetry::{TelemetryConfig, TraceExport};

pub const DATABASE_URL: &str = "COMMERCE_DATABASE_URL";
pub const DATABASE_MAX_CONNECTIONS: &str = "COMMERCE_DATABASE_MAX_CONNECTIONS";
pub const DATA_DIR: &str = "COMMERCE_DATA_DIR";
pub const LISTEN_ADDR: &str = "COMMERCE_LISTEN_ADDR";
pub const REQUEST_TIMEOUT_SECS: &str = "COMMERCE_REQUEST_TIMEOUT_SECS";
pub const SHUTDOWN_TIMEOUT_SECS: &str = "COMMERCE_SHUTDOWN_TIMEOUT_SECS";
pub const MAX_REQUEST_BYTES: &str = "COMMERCE_MAX_REQUEST_BYTES";
pub const GRAPHIQL: &str = "COMMERCE_GRAPHIQL";
pub const LOG: &str = "COMMERCE_LOG";
/// `text` (the default) or `json`: one JSON object per log line.
pub const LOG_FORMAT: &str = "COMMERCE_LOG_FORMAT";
/// The OpenTelemetry variables the kernel reads itself (the SDK reads
/// others: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
/// `OTEL_TRACES_SAMPLER`, `OTEL_EXPORTER_OTLP_HEADERS`, ...).
pub const OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub const OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
pub const OTLP_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
pub const OTLP_TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
pub const OTEL_TRACES_EXPORTER: &str = "OTEL_TRACES_EXPORTER";
pub const OTEL_SDK_DISABLED: &str = "OTEL_SDK_DISABLED";
pub const REDIS_URL: &str = "COMMERCE_REDIS_URL";
pub const REDIS_KEY_PREFIX: &str = "COMMERCE_REDIS_KEY_PREFIX";
pub const CART_TTL_SECS: &str = "COMMERCE_CART_TTL_SECS";
pub const CART_MAX_LINES: &str = "COMMERCE_CART_MAX_LINES";
pub const PLUGINS_DIR: &str = "COMMERCE_PLUGINS_DIR";
pub const PLUGIN_CONCURRENCY: &str = "COMMERCE_PLUGIN_CONCURRENCY";
/// Whether a kernel on a database where no payment or shipping plugin was
/// ever chosen activates the bundled ones (default true on the embedded
/// database, false on Postgres).
pub const DEFAULT_PLUGINS: &str = "COMMERCE_DEFAULT_PLUGINS";
pub const JWT_SECRET: &str = "COMMERCE_JWT_SECRET";
pub const JWKS_URL: &str = "COMMERCE_JWKS_URL";
pub const JWT_ISSUER: &str = "COMMERCE_JWT_ISSUER";
pub const JWT_AUDIENCE: &str = "COMMERCE_JWT_AUDIENCE";
/// Signs guest session tokens when `COMMERCE_JWKS_URL` is set.
pub const GUEST_TOKEN_SECRET: &str = "COMMERCE_GUEST_TOKEN_SECRET";
/// Whether the kernel creates the demo catalog (`seed --demo`) when it
/// starts, where it is missing (default false).
pub const DEMO_CATALOG: &str = "COMMERCE_DEMO_CATALOG";
/// Whether the catalog (`products`, `product`, `inventory`) answers
/// requests without a token (default true).
pub const PUBLIC_CATALOG: &str = "COMMERCE_PUBLIC_CATALOG";
/// Whether `createGuestSession` answers (default true).
pub const GUEST_SESSIONS: &str = "COMMERCE_GUEST_SESSIONS";
/// How long a guest session's token lives, in seconds (default 86400).
pub const GUEST_SESSION_TTL_SECS: &str = "COMMERCE_GUEST_SESSION_TTL_SECS";
/// Guest sessions one client address may start per minute, per process
/// (default 10).
pub const GUEST_SESSIONS_PER_MINUTE: &str = "COMMERCE_GUEST_SESSIONS_PER_MINUTE";
/// Browser origins that may call the API (`https://shop.example,
/// http://localhost:3000`); none by default.
pub const CORS_ORIGINS: &str = "COMMERCE_CORS_ORIGINS";
/// Whether the client address is the last one a proxy appended to
/// `X-Forwarded-For` (default false: the connection's peer).
pub const TRUST_FORWARDED_FOR: &str = "COMMERCE_TRUST_FORWARDED_FOR";
/// Whether a request's `traceparent` header is continued (default true, as
/// OpenTelemetry does); false starts a trace of the kernel's own for each
/// request and links the caller's to it.
pub const TRUST_TRACEPARENT: &str = "COMMERCE_TRUST_TRACEPARENT";
/// How often each process reconciles the inventory (report only), in
/// seconds (default 3600; 0: never, only when an admin asks).
pub const INVENTORY_CHECK_SECS: &str = "COMMERCE_INVENTORY_CHECK_SECS";
pub const GRAPHQL_MAX_DEPTH: &str = "COMMERCE_GRAPHQL_MAX_DEPTH";
pub const GRAPHQL_MAX_COMPLEXITY: &str = "COMMERCE_GRAPHQL_MAX_COMPLEXITY";
pub const GRAPHQL_MAX_PAGE_SIZE: &str = "COMMERCE_GRAPHQL_MAX_PAGE_SIZE";
pub const GRAPHQL_MAX_ALIASES: &str = "COMMERCE_GRAPHQL_MAX_ALIASES";
pub const GRAPHQL_MAX_BATCH: &str = "COMMERCE_GRAPHQL_MAX_BATCH";
pub const GRAPHQL_INTROSPECTION: &str = "COMMERCE_GRAPHQL_INTROSPECTION";
pub const LIVE_POLL_MS: &str = "COMMERCE_LIVE_POLL_MS";
pub const SAGA_LEASE_MS: &str = "COMMERCE_SAGA_LEASE_MS";
pub const SAGA_POLL_MS: &str = "COMMERCE_SAGA_POLL_MS";
pub const SAGA_CONCURRENCY: &str = "COMMERCE_SAGA_CONCURRENCY";
/// For the crash tests only, and only in builds with the `test-hooks`
/// feature (a release build refuses to start with it): `<when>:<step>`
/// points (comma-separated) at which the saga runner stops for good, waits
/// (`=<ms>`) or panics (`=panic`); see [`crate::sagas::hooks`]. `when` is
/// before-start (a plugin step, before its start is recorded), before-call,
/// after-call, before-compensation or after-compensation.
pub const TEST_PAUSE_AT: &str = "COMMERCE_TEST_PAUSE_AT";
/// A listener of its own for `/metrics` (then not on the API port).
pub const METRICS_ADDR: &str = "COMMERCE_METRICS_ADDR";
/// A bearer token `/metrics` requires, wherever it is served.
pub const METRICS_TOKEN: &str = "COMMERCE_METRICS_TOKEN";

/// Shortest metrics token accepted.
const MIN_METRICS_TOKEN_BYTES: usize = 16;

/// Longest cart time to live accepted: 90 days.
const MAX_CART_TTL_SECS: u64 = 90 * 86_400;

/// Name of the SQLite file inside the data directory.
pub const EMBEDDED_DATABASE_FILE: &str = "commerce.db";

/// Everything the kernel needs to start.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen_addr: SocketAddr,
    pub database: DatabaseConfig,
    /// Redis, or the embedded cart store when no Redis URL is set.
    pub carts: CartBackendConfig,
    pub cart_limits: CartLimits,
    pub plugins: PluginsConfig,
    pub sagas: SagasConfig,
    /// Longest a request may run before it is answered with 408.
    pub request_timeout: Duration,
    /// Longest graceful shutdown waits for in-flight requests after SIGTERM/ctrl-c.
    pub shutdown_timeout: Duration,
    /// Largest request body accepted, in bytes.
    pub max_request_bytes: usize,
    /// Serve the GraphiQL IDE on `GET /graphql`.
    pub graphiql: bool,
    /// How bearer tokens are checked.
    pub auth: AuthConfig,
    /// Bounds on what one GraphQL request may ask for.
    pub graphql: GraphqlLimits,
    /// How often subscriptions look at the log tail for changes made by
    /// other processes whose wake-up was lost (Redis down, say).
    pub live_poll_interval: Duration,
    /// Log lines and traces.
    pub telemetry: TelemetryConfig,
    /// What browsers and guests may do without an identity provider.
    pub storefront: StorefrontConfig,
    /// Create the demo catalog at start where it is missing.
    pub demo_catalog: bool,
    /// Where and to whom `/metrics` answers.
    pub metrics: MetricsConfig,
    /// How often the inventory reconciliation runs by itself (report only,
    /// for `commerce_inventory_drift_products`); `None`: never.
    pub inventory_check_interval: Option<Duration>,
}

/// Where `/metrics` is served, and to whom.
///
/// With a listen address of its own it is served there and not on the API
/// port. Otherwise it is on the API port when a token guards it, or on the
/// embedded database (a development machine) without one; a shared
/// (production) database without either serves no metrics on the API port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    pub listen_addr: Option<SocketAddr>,
    /// Required as `Authorization: Bearer <token>` when set.
    pub token: Option<String>,
    /// Served on the API port.
    pub on_api_port: bool,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// For people: one line per event, the span's fields before it.
    Text,
    /// For log collectors: one JSON object per line, with `timestamp`,
    /// `level`, `target`, the event's fields (`message` among them) and
    /// the fields of the span it happened in (`span`, `spans`).
    Json,
}

/// Access for storefronts that call the API from browsers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorefrontConfig {
    /// The catalog answers requests without a token.
    pub public_catalog: bool,
    /// `createGuestSession`, when guest sessions are on.
    pub guest_sessions: Option<GuestSessionConfig>,
    /// Origins (`scheme://host[:port]`) whose pages may call the API.
    pub cors_origins: Vec<String>,
    /// Take the client address from `X-Forwarded-For` (behind a proxy).
    pub trust_forwarded_for: bool,
}

/// How guest sessions are handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestSessionConfig {
    /// How long a guest token lives.
    pub ttl: Duration,
    /// Sessions one client address may start per minute in one process.
    pub per_minute: u32,
}

/// Where plugins live and how many invocations may run at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginsConfig {
    /// `<name>/<version>/plugin.toml` and components; default `<data dir>/plugins`.
    pub dir: PathBuf,
    /// Plugin invocations running at once in this process; more wait.
    pub max_concurrent_invocations: u32,
    /// Activate the bundled payment and shipping plugins (and install the
    /// `order-limit` step) on a database where no payment or shipping
    /// plugin was ever activated; see [`crate::commerce::bundled_plugins`].
    pub activate_defaults: bool,
}

/// Bounds on GraphQL requests. Each is configurable; each refusal names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphqlLimits {
    /// Deepest selection nesting accepted.
    pub max_depth: usize,
    /// Most expensive query accepted (every field counts 1, lists count
    /// their page size times their selection).
    pub max_complexity: usize,
    /// Largest `first` of a connection.
    pub max_page_size: u32,
    /// Most aliased fields in one document.
    pub max_aliases: usize,
    /// Most operations in one batched HTTP request.
    pub max_batch: usize,
    /// Whether `__schema` and `__type` are answered.
    pub introspection: bool,
}

impl Default for GraphqlLimits {
    fn default() -> Self {
        GraphqlLimits {
            max_depth: 16,
            max_complexity: 50_000,
            max_page_size: 500,
            max_aliases: 50,
            max_batch: 10,
            introspection: true,
        }
    }
}

/// How this process runs sagas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SagasConfig {
    /// How long a claim on a saga holds without a heartbeat; after a crash,
    /// another process takes the crashed one's sagas over this much later.
    pub lease: Duration,
    /// How often to look for due sagas (this process's own are started at once).
    pub poll_interval: Duration,
    /// Sagas driven at once by this process.
    pub max_concurrent: usize,
    /// The fault hooks of [`TEST_PAUSE_AT`], as set (checked).
    pub fault_hooks: Option<String>,
}

/// A configuration value the kernel cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {reason}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub reason: String,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads configuration through `lookup`, which returns a variable's value if set.
    /// Empty values count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).filter(|value| !value.trim().is_empty());

        let max_connections = parse_or(
            &get,
            DATABASE_MAX_CONNECTIONS,
            20u32,
            "a whole number of connections",
        )?;
        if !(1..=10_000).contains(&max_connections) {
            return Err(invalid(
                DATABASE_MAX_CONNECTIONS,
                "must be between 1 and 10000",
            ));
        }
        let data_dir = get(DATA_DIR).map_or_else(|| PathBuf::from("data"), PathBuf::from);
        let database = match get(DATABASE_URL) {
            Some(url) => database_from_url(&url, max_connections)?,
            None => DatabaseConfig::Sqlite {
                path: data_dir.join(EMBEDDED_DATABASE_FILE),
            },
        };
        let max_concurrent_invocations: u32 = parse_or(
            &get,
            PLUGIN_CONCURRENCY,
            128,
            "a whole number of invocations",
        )?;
        if !(1..=4096).contains(&max_concurrent_invocations) {
            return Err(invalid(PLUGIN_CONCURRENCY, "must be between 1 and 4096"));
        }
        let plugins = PluginsConfig {
            dir: get(PLUGINS_DIR).map_or_else(|| data_dir.join("plugins"), PathBuf::from),
            max_concurrent_invocations,
            // The bundled payment plugin takes no money: a shared
            // (production) database gets it only when asked.
            activate_defaults: flag(
                &get,
                DEFAULT_PLUGINS,
                matches!(database, DatabaseConfig::Sqlite { .. }),
            )?,
        };

        let lease_ms: u64 = parse_or(
            &get,
            SAGA_LEASE_MS,
            15_000,
            "a whole number of milliseconds",
        )?;
        if !(300..=600_000).contains(&lease_ms) {
            return Err(invalid(SAGA_LEASE_MS, "must be between 300 and 600000"));
        }
        let poll_ms: u64 = parse_or(&get, SAGA_POLL_MS, 250, "a whole number of milliseconds")?;
        if !(10..=60_000).contains(&poll_ms) {
            return Err(invalid(SAGA_POLL_MS, "must be between 10 and 60000"));
        }
        let max_concurrent: usize =
            parse_or(&get, SAGA_CONCURRENCY, 64, "a whole number of sagas")?;
        if !(1..=4096).contains(&max_concurrent) {
            return Err(invalid(SAGA_CONCURRENCY, "must be between 1 and 4096"));
        }
        let fault_hooks = get(TEST_PAUSE_AT);
        crate::sagas::hooks::FaultHooks::from_setting(fault_hooks.as_deref())
            .map_err(|reason| invalid(TEST_PAUSE_AT, &reason))?;
        let sagas = SagasConfig {
            lease: Duration::from_millis(lease_ms),
            poll_interval: Duration::from_millis(poll_ms),
            max_concurrent,
            fault_hooks,
        };

        let carts = match get(REDIS_URL) {
            Some(url) => {
                // Parsed now so a typo stops start-up; the URL may hold a password.
                redis::Client::open(url.as_str()).map_err(|e| {
                    invalid(
                        REDIS_URL,
                        format!(
                            "not a usable Redis URL such as redis://127.0.0.1:6379 ({})",
                            redact(&e.to_string(), &url)
                        ),
                    )
                })?;
                CartBackendConfig::Redis {
                    url,
                    key_prefix: get(REDIS_KEY_PREFIX).unwrap_or_else(|| "commerce:".to_string()),
                }
            }
            None => CartBackendConfig::Embedded,
        };
        let ttl_secs: u64 = parse_or(&get, CART_TTL_SECS, 7 * 86_400, "a whole number of seconds")?;
        if !(1..=MAX_CART_TTL_SECS).contains(&ttl_secs) {
            return Err(invalid(
                CART_TTL_SECS,
                format!("must be between 1 and {MAX_CART_TTL_SECS} seconds (90 days)"),
            ));
        }
        let max_lines: usize = parse_or(&get, CART_MAX_LINES, MAX_LINES, "a whole number")?;
        if !(1..=MAX_LINES).contains(&max_lines) {
            return Err(invalid(
                CART_MAX_LINES,
                format!("must be between 1 and {MAX_LINES}, the most an order holds"),
            ));
        }
        let cart_limits = CartLimits {
            max_lines,
            ttl: chrono::Duration::seconds(ttl_secs as i64),
        };

        let listen_addr = parse_or(
            &get,
            LISTEN_ADDR,
            SocketAddr::from(([0, 0, 0, 0], 8084)),
            "a socket address such as 0.0.0.0:8084",
        )?;
        let request_timeout = seconds(&get, REQUEST_TIMEOUT_SECS, 30)?;
        let shutdown_timeout = seconds(&get, SHUTDOWN_TIMEOUT_SECS, 30)?;
        let max_request_bytes =
            parse_or(&get, MAX_REQUEST_BYTES, 1_048_576usize, "a number of bytes")?;
        if max_request_bytes < 1024 {
            return Err(invalid(MAX_REQUEST_BYTES, "must be at least 1024"));
        }
        let graphiql = flag(&get, GRAPHIQL, true)?;
        let graphql = graphql_limits(&get)?;
        let auth = auth_config(&get, &database, &data_dir)?;
        let live_poll_ms: u64 =
            parse_or(&get, LIVE_POLL_MS, 1_000, "a whole number of milliseconds")?;
        if !(50..=60_000).contains(&live_poll_ms) {
            return Err(invalid(LIVE_POLL_MS, "must be between 50 and 60000"));
        }
        let log_filter = get(LOG)
            .or_else(|| get("RUST_LOG"))
            .unwrap_or_else(|| "info,sqlx=warn".to_string());
        let log_format = match get(LOG_FORMAT).as_deref().map(str::trim) {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(_) => return Err(invalid(LOG_FORMAT, "must be `text` or `json`")),
        };

        let storefront = storefront_config(&get)?;

        let metrics_addr = match get(METRICS_ADDR) {
            Some(text) => Some(text.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    METRICS_ADDR,
                    "must be a socket address such as 0.0.0.0:9184",
                )
            })?),
            None => None,
        };
        if metrics_addr.is_some_and(|address| address == listen_addr) {
            return Err(invalid(
                METRICS_ADDR,
                "must differ from COMMERCE_LISTEN_ADDR (leave it unset to serve /metrics there)",
            ));
        }
        // Trimmed: a token read from a secret file often ends in a newline.
        let metrics_token = get(METRICS_TOKEN).map(|token| token.trim().to_string());
        if metrics_token
            .as_ref()
            .is_some_and(|token| token.len() < MIN_METRICS_TOKEN_BYTES)
        {
            return Err(invalid(
                METRICS_TOKEN,
                format!("must be at least {MIN_METRICS_TOKEN_BYTES} bytes"),
            ));
        }
        let metrics = MetricsConfig {
            listen_addr: metrics_addr,
            on_api_port: metrics_addr.is_none()
                && (metrics_token.is_some() || matches!(database, DatabaseConfig::Sqlite { .. })),
            token: metrics_token,
        };

        Ok(Config {
            metrics,
            storefront,
            demo_catalog: flag(&get, DEMO_CATALOG, false)?,
            listen_addr,
            database,
            carts,
            cart_limits,
            plugins,
            sagas,
            request_timeout,
            shutdown_timeout,
            max_request_bytes,
            graphiql,
            auth,
            graphql,
            live_poll_interval: Duration::from_millis(live_poll_ms),
            inventory_check_interval: match parse_or(
                &get,
                INVENTORY_CHECK_SECS,
                3_600u64,
                "a whole number of seconds",
            )? {
                0 => None,
                secs if secs <= 604_800 => Some(Duration::from_secs(secs)),
                _ => {
                    return Err(invalid(
                        INVENTORY_CHECK_SECS,
                        "must be between 0 (never) and 604800 seconds",
                    ));
                }
            },
            telemetry: TelemetryConfig {
                log_filter,
                log_format,
                traces: trace_export(&get)?,
                trust_traceparent: flag(&get, TRUST_TRACEPARENT, true)?,
            },
        })
    }
}

/// The key source: a secret, a JWKS URL, or (on SQLite only) the generated
/// development secret. Postgres means several processes may share the
/// database, and each would invent its own secret, so one must be configured.
fn auth_config(
    get: &impl Fn(&str) -> Option<String>,
    database: &DatabaseConfig,
    data_dir: &std::path::Path,
) -> Result<AuthConfig, ConfigError> {
    let keys = match (get(JWT_SECRET), get(JWKS_URL)) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                JWKS_URL,
                format!("set either {JWT_SECRET} (HS256) or {JWKS_URL} (RS256), not both"),
            ));
        }
        (Some(secret), None) => {
            if secret.len() < MIN_SECRET_BYTES {
                return Err(invalid(
                    JWT_SECRET,
                    format!("must be at least {MIN_SECRET_BYTES} bytes"),
                ));
            }
            KeySource::Secret(secret)
        }
        (None, Some(url)) => {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(invalid(JWKS_URL, "must be an http:// or https:// URL"));
            }
            KeySource::Jwks(url)
        }
        (None, None) => match database {
            DatabaseConfig::Sqlite { .. } => KeySource::SecretFile(data_dir.join(SECRET_FILE)),
            DatabaseConfig::Postgres { .. } => {
                return Err(invalid(
                    JWT_SECRET,
                    format!(
                        "with Postgres, set {JWT_SECRET} (shared by every kernel process) or {JWKS_URL}"
                    ),
                ));
            }
        },
    };
    let guest_secret = get(GUEST_TOKEN_SECRET);
    if let Some(secret) = &guest_secret {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(invalid(
                GUEST_TOKEN_SECRET,
                format!("must be at least {MIN_SECRET_BYTES} bytes"),
            ));
        }
        if !matches!(keys, KeySource::Jwks(_)) {
            return Err(invalid(
                GUEST_TOKEN_SECRET,
                format!("is for {JWKS_URL} only: without it, the HS256 secret signs guest tokens"),
            ));
        }
    }
    Ok(AuthConfig {
        keys,
        issuer: get(JWT_ISSUER).unwrap_or_else(|| "commerce-kernel".to_string()),
        audience: get(JWT_AUDIENCE).unwrap_or_else(|| "commerce-kernel".to_string()),
        guest_secret,
    })
}

fn graphql_limits(get: &impl Fn(&str) -> Option<String>) -> Result<GraphqlLimits, ConfigError> {
    let defaults = GraphqlLimits::default();
    let bounded = |name: &'static str, default: usize, max: usize| {
        let value: usize = parse_or(get, name, default, "a whole number")?;
        if (1..=max).contains(&value) {
            Ok(value)
        } else {
            Err(invalid(name, format!("must be between 1 and {max}")))
        }
    };
    Ok(GraphqlLimits {
        max_depth: bounded(GRAPHQL_MAX_DEPTH, defaults.max_depth, 256)?,
        max_complexity: bounded(GRAPHQL_MAX_COMPLEXITY, defaults.max_complexity, 10_000_000)?,
        max_page_size: bounded(
            GRAPHQL_MAX_PAGE_SIZE,
            defaults.max_page_size as usize,
            10_000,
        )? as u32,
        max_aliases: bounded(GRAPHQL_MAX_ALIASES, defaults.max_aliases, 10_000)?,
        max_batch: bounded(GRAPHQL_MAX_BATCH, defaults.max_batch, 1_000)?,
        introspection: flag(get, GRAPHQL_INTROSPECTION, defaults.introspection)?,
    })
}

fn flag(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: bool,
) -> Result<bool, ConfigError> {
    match get(name).as_deref().map(str::to_ascii_lowercase).as_deref() {
        None => Ok(default),
        Some("true" | "1" | "yes" | "on") => Ok(true),
        Some("false" | "0" | "no" | "off") => Ok(false),
        Some(other) => Err(invalid(name, format!("`{other}` is not true or false"))),
    }
}

fn storefront_config(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<StorefrontConfig, ConfigError> {
    let guest_sessions = if flag(get, GUEST_SESSIONS, true)? {
        let ttl_secs: u64 = parse_or(
            get,
            GUEST_SESSION_TTL_SECS,
            86_400,
            "a whole number of seconds",
        )?;
        if !(60..=30 * 86_400).contains(&ttl_secs) {
            return Err(invalid(
                GUEST_SESSION_TTL_SECS,
                "must be between 60 and 2592000 seconds (30 days)",
            ));
        }
        let per_minute: u32 = parse_or(get, GUEST_SESSIONS_PER_MINUTE, 10, "a whole number")?;
        if !(1..=100_000).contains(&per_minute) {
            return Err(invalid(
                GUEST_SESSIONS_PER_MINUTE,
                "must be between 1 and 100000",
            ));
        }
        Some(GuestSessionConfig {
            ttl: Duration::from_secs(ttl_secs),
            per_minute,
        })
    } else {
        None
    };
    let mut cors_origins = Vec::new();
    for origin in get(CORS_ORIGINS).iter().flat_map(|list| list.split(',')) {
        let origin = origin.trim().trim_end_matches('/');
        if origin.is_empty() {
            continue;
        }
        if !is_origin(origin) {
            return Err(invalid(
                CORS_ORIGINS,
                format!(
                    "`{origin}` is not an origin such as https://shop.example or http://localhost:3000 \
                     (scheme, host and port only; no path, no wildcard)"
                ),
            ));
        }
        cors_origins.push(origin.to_ascii_lowercase());
    }
    Ok(StorefrontConfig {
        public_catalog: flag(get, PUBLIC_CATALOG, true)?,
        guest_sessions,
        cors_origins,
        trust_forwarded_for: flag(get, TRUST_FORWARDED_FOR, false)?,
    })
}

/// `http(s)://host[:port]`, as a browser sends it in `Origin`.
fn is_origin(text: &str) -> bool {
    let Some((scheme, authority)) = text.split_once("://") else {
        return false;
    };
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            if !port.parse::<u16>().is_ok_and(|p| p > 0) {
                return false;
            }
            host
        }
        _ => authority,
    };
    matches!(scheme, "http" | "https")
        && !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':'))
}

/// `postgres://` and `postgresql://` select Postgres; `sqlite:` selects a file.
fn database_from_url(url: &str, max_connections: u32) -> Result<DatabaseConfig, ConfigError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        // The URL may hold a password: never echo it back.
        let options = PgConnectOptions::from_str(url).map_err(|e| {
            invalid(
                DATABASE_URL,
                format!(
                    "not a usable Postgres URL ({})",
                    redact(&e.to_string(), url)
                ),
            )
        })?;
        Ok(DatabaseConfig::Postgres {
            options: Box::new(options),
            max_connections,
        })
    } else if let Some(path) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        let path = path.split('?').next().unwrap_or_default();
        if path.is_empty() || path == ":memory:" {
            return Err(invalid(
                DATABASE_URL,
                "an SQLite URL must name a file (sqlite://data/commerce.db); in-memory databases lose every event",
            ));
        }
        Ok(DatabaseConfig::Sqlite {
            path: PathBuf::from(path),
        })
    } else {
        Err(invalid(
            DATABASE_URL,
            "must start with postgres://, postgresql:// or sqlite://",
        ))
    }
}

/// Where spans go, from the standard OpenTelemetry variables: none unless
/// an OTLP endpoint is set. Only OTLP over HTTP with protobuf is spoken
/// (a collector's port 4318); asking for gRPC stops start-up rather than
/// sending to a port that cannot understand it.
fn trace_export(get: &impl Fn(&str) -> Option<String>) -> Result<Option<TraceExport>, ConfigError> {
    if get(OTEL_SDK_DISABLED).is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    match get(OTEL_TRACES_EXPORTER).as_deref().map(str::trim) {
        None | Some("otlp") => {}
        Some("none") => return Ok(None),
        Some(other) => {
            return Err(invalid(
                OTEL_TRACES_EXPORTER,
                format!("`{other}` is not supported: `otlp` or `none`"),
            ));
        }
    }
    for variable in [OTLP_TRACES_PROTOCOL, OTLP_PROTOCOL] {
        if let Some(protocol) = get(variable)
            && protocol.trim() != "http/protobuf"
        {
            return Err(invalid(
                variable,
                format!(
                    "`{protocol}` is not supported: the kernel exports `http/protobuf` (port 4318 of a collector)"
                ),
            ));
        }
    }
    // The signal's own endpoint is the URL itself; the general one is a
    // base that `/v1/traces` is appended to (the OpenTelemetry spec).
    let (variable, traces_url) = match (get(OTLP_TRACES_ENDPOINT), get(OTLP_ENDPOINT)) {
        (Some(url), _) => (OTLP_TRACES_ENDPOINT, url.trim().to_string()),
        (None, Some(base)) => (
            OTLP_ENDPOINT,
            format!("{}/v1/traces", base.trim().trim_end_matches('/')),
        ),
        (None, None) => return Ok(None),
    };
    match reqwest::Url::parse(&traces_url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
        _ => {
            return Err(invalid(
                variable,
                "must be an http:// or https:// URL such as http://collector:4318",
            ));
        }
    }
    Ok(Some(TraceExport { traces_url }))
}

fn redact(message: &str, url: &str) -> String {
    message.replace(url, "<url>")
}

fn parse_or<T: FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    default: T,
    expected: &str,
) -> Result<T, ConfigError> {
    match get(variable) {
        None => Ok(default),
        Some(raw) => raw
            .trim()
            .parse()
            .map_err(|_| invalid(variable, format!("`{raw}` is not {expected}"))),
    }
}

fn seconds(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    default: u64,
) -> Result<Duration, ConfigError> {
    let secs: u64 = parse_or(get, variable, default, "a whole number of seconds")?;
    if secs == 0 || secs > 86_400 {
        return Err(invalid(variable, "must be between 1 and 86400 seconds"));
    }
    Ok(Duration::from_secs(secs))
}

fn invalid(variable: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        variable,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn metrics_stay_off_a_production_api_port_unless_asked() {
        const PG: (&str, &str) = (DATABASE_URL, "postgres://u@localhost/db");
        const SECRET: (&str, &str) = (JWT_SECRET, "0123456789abcdef0123456789abcdef");
        let metrics = |vars: &[(&str, &str)]| config(vars).expect("valid").metrics;
        // The embedded database: a development machine, open on the API port.
        assert!(metrics(&[]).on_api_port);
        // Postgres: nowhere on the API port by default.
        let production = metrics(&[PG, SECRET]);
        assert!(!production.on_api_port && production.listen_addr.is_none());
        // Behind a token (trimmed) on the API port.
        let guarded = metrics(&[PG, SECRET, (METRICS_TOKEN, " a-token-of-16-bytes\n")]);
        assert!(guarded.on_api_port);
        assert_eq!(guarded.token.as_deref(), Some("a-token-of-16-bytes"));
        // A listener of its own: never on the API port.
        let own = metrics(&[(METRICS_ADDR, "127.0.0.1:9184")]);
        assert!(!own.on_api_port);
        assert_eq!(own.listen_addr.map(|a| a.port()), Some(9184));
        for bad in [
            (METRICS_ADDR, "9184"),
            (METRICS_ADDR, "0.0.0.0:8084"),
            (METRICS_TOKEN, "short"),
        ] {
            let error = config(&[bad]).expect_err("refused");
            assert_eq!(error.variable, bad.0);
        }
    }

    #[test]
    fn defaults_to_embedded_sqlite_on_port_8084() {
        let config = config(&[]).expect("defaults are valid");
        assert_eq!(config.listen_addr.to_string(), "0.0.0.0:8084");
        match config.database {
            DatabaseConfig::Sqlite { path } => assert_eq!(path, PathBuf::from("data/commerce.db")),
            other => panic!("expected sqlite, got {other:?}"),
        }
        assert!(config.graphiql);
        assert_eq!(config.carts, CartBackendConfig::Embedded);
        assert_eq!(config.cart_limits, CartLimits::default());
    }

    #[test]
    fn token_keys_come_from_a_secret_a_jwks_or_the_data_directory() {
        let embedded = config(&[(DATA_DIR, "/srv/k")]).expect("valid");
        assert_eq!(
            embedded.auth.keys,
            KeySource::SecretFile(PathBuf::from("/srv/k/jwt-secret"))
        );
        assert_eq!(embedded.auth.issuer, "commerce-kernel");
        let jwks = config(&[
            (JWKS_URL, "https://idp.example/.well-known/jwks.json"),
            (JWT_ISSUER, "https://idp.example/"),
            (JWT_AUDIENCE, "shop"),
        ])
        .expect("valid");
        assert_eq!(
            jwks.auth.keys,
            KeySource::Jwks("https://idp.example/.well-known/jwks.json".into())
        );
        assert_eq!(jwks.auth.audience, "shop");
        // Several processes share Postgres: each inventing a secret would
        // make tokens work on one node only.
        let error = config(&[(DATABASE_URL, "postgres://db/commerce")]).unwrap_err();
        assert_eq!(error.variable, JWT_SECRET);
        let both = config(&[
            (JWT_SECRET, "0123456789abcdef0123456789abcdef"),
            (JWKS_URL, "https://idp/keys"),
        ]);
        assert_eq!(both.unwrap_err().variable, JWKS_URL);
        // The secret never shows in debug output.
        let secret = config(&[(JWT_SECRET, "0123456789abcdef0123456789abcdef-x")]).expect("valid");
        assert!(!format!("{secret:?}").contains("0123456789abcdef"));
    }

    /// The bundled plugins take no money: a shared database gets them only
    /// when asked. Storefront settings: their defaults and their checks.
    #[test]
    fn shop_defaults_depend_on_the_database_and_are_checked() {
        const SECRET: &str = "0123456789abcdef0123456789abcdef";
        assert!(config(&[]).expect("valid").plugins.activate_defaults);
        let shared = config(&[(DATABASE_URL, "postgres://db/shop"), (JWT_SECRET, SECRET)]);
        assert!(!shared.expect("valid").plugins.activate_defaults);
        let asked = config(&[
            (DATABASE_URL, "postgres://db/shop"),
            (JWT_SECRET, SECRET),
            (DEFAULT_PLUGINS, "true"),
        ]);
        assert!(asked.expect("valid").plugins.activate_defaults);

        let storefront = config(&[]).expect("valid").storefront;
        assert!(storefront.public_catalog && !storefront.trust_forwarded_for);
        assert_eq!(storefront.cors_origins, Vec::<String>::new());
        assert_eq!(
            storefront.guest_sessions,
            Some(GuestSessionConfig {
                ttl: Duration::from_secs(86_400),
                per_minute: 10
            })
        );
        let origins = config(&[(CORS_ORIGINS, "https://Shop.example/, http://localhost:3000")]);
        assert_eq!(
            origins.expect("valid").storefront.cors_origins,
            ["https://shop.example", "http://localhost:3000"]
        );
        for bad in [
            "*",
            "shop.example",
            "https://shop.example/cart",
            "ftp://x",
            "http://x:0",
        ] {
            assert_eq!(
                config(&[(CORS_ORIGINS, bad)]).unwrap_err().variable,
                CORS_ORIGINS,
                "{bad}"
            );
        }
        assert_eq!(
            config(&[(GUEST_SESSION_TTL_SECS, "10")])
                .unwrap_err()
                .variable,
            GUEST_SESSION_TTL_SECS
        );
        assert_eq!(
            config(&[(GUEST_TOKEN_SECRET, SECRET)])
                .unwrap_err()
                .variable,
            GUEST_TOKEN_SECRET,
            "a guest secret without a JWKS"
        );
        assert_eq!(
            config(&[(GUEST_SESSIONS, "false")])
                .expect("valid")
                .storefront
                .guest_sessions,
            None
        );
    }

    #[test]
    fn graphql_limits_are_configurable() {
        let defaults = config(&[]).expect("valid").graphql;
        assert_eq!(defaults, GraphqlLimits::default());
        let tight = config(&[
            (GRAPHQL_MAX_DEPTH, "5"),
            (GRAPHQL_MAX_COMPLEXITY, "100"),
            (GRAPHQL_MAX_PAGE_SIZE, "20"),
            (GRAPHQL_MAX_ALIASES, "3"),
            (GRAPHQL_MAX_BATCH, "2"),
            (GRAPHQL_INTROSPECTION, "off"),
        ])
        .expect("valid")
        .graphql;
        assert_eq!(
            tight,
            GraphqlLimits {
                max_depth: 5,
                max_complexity: 100,
                max_page_size: 20,
                max_aliases: 3,
                max_batch: 2,
                introspection: false,
            }
        );
    }

    #[test]
    fn a_redis_url_selects_the_redis_cart_store() {
        let config = config(&[
            (REDIS_URL, "redis://:secret@cache:6379/2"),
            (CART_TTL_SECS, "3600"),
            (CART_MAX_LINES, "20"),
        ])
        .expect("valid");
        assert_eq!(
            config.carts,
            CartBackendConfig::Redis {
                url: "redis://:secret@cache:6379/2".into(),
                key_prefix: "commerce:".into(),
            }
        );
        assert_eq!(config.cart_limits.ttl, chrono::Duration::hours(1));
        assert_eq!(config.cart_limits.max_lines, 20);
    }

    #[test]
    fn selects_backend_by_url() {
        let pg = config(&[
            (DATABASE_URL, "postgres://u:secret@db:5432/commerce"),
            (JWT_SECRET, "0123456789abcdef0123456789abcdef"),
        ])
        .expect("valid");
        assert!(matches!(
            pg.database,
            DatabaseConfig::Postgres {
                max_connections: 20,
                ..
            }
        ));
        let file = config(&[(DATABASE_URL, "sqlite:///var/lib/commerce/k.db")]).expect("valid");
        assert!(
            matches!(file.database, DatabaseConfig::Sqlite { ref path } if path == &PathBuf::from("/var/lib/commerce/k.db"))
        );
        let dir = config(&[(DATA_DIR, "/srv/k")]).expect("valid");
        assert!(
            matches!(dir.database, DatabaseConfig::Sqlite { ref path } if path == &PathBuf::from("/srv/k/commerce.db"))
        );
    }

    #[test]
    fn bad_values_name_their_variable() {
        let cases = [
            (DATABASE_URL, "mysql://localhost/db"),
            (DATABASE_URL, "sqlite::memory:"),
            (LISTEN_ADDR, "localhost"),
            (REQUEST_TIMEOUT_SECS, "0"),
            (SHUTDOWN_TIMEOUT_SECS, "soon"),
            (MAX_REQUEST_BYTES, "12"),
            (DATABASE_MAX_CONNECTIONS, "-3"),
            (GRAPHIQL, "maybe"),
            (REDIS_URL, "memcached://cache"),
            (CART_TTL_SECS, "0"),
            (CART_TTL_SECS, "99999999"),
            (CART_MAX_LINES, "101"),
            (JWT_SECRET, "too-short"),
            (JWKS_URL, "ftp://idp/keys"),
            (GRAPHQL_MAX_DEPTH, "0"),
            (GRAPHQL_MAX_PAGE_SIZE, "100000"),
            (GRAPHQL_INTROSPECTION, "maybe"),
            (LIVE_POLL_MS, "1"),
        ];
        for (variable, value) in cases {
            let error = config(&[(variable, value)]).expect_err(value);
            assert_eq!(error.variable, variable, "{value}");
            assert!(error.to_string().starts_with(variable));
        }
    }

    #[test]
    fn errors_never_echo_a_database_password() {
        let error =
            config(&[(DATABASE_URL, "postgres://u:hunter2@db:notaport/x")]).expect_err("bad port");
        assert!(!error.to_string().contains("hunter2"), "{error}");
        let error = config(&[(REDIS_URL, "redis://:hunter2@cache:port/x")]).expect_err("bad port");
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }
    #[test]
    fn the_inventory_check_runs_hourly_unless_told_otherwise() {
        let interval = |vars: &[(&str, &str)]| config(vars).map(|c| c.inventory_check_interval);
        assert_eq!(interval(&[]), Ok(Some(Duration::from_secs(3600))));
        assert_eq!(interval(&[(INVENTORY_CHECK_SECS, "0")]), Ok(None));
        assert_eq!(
            interval(&[(INVENTORY_CHECK_SECS, "90")]),
            Ok(Some(Duration::from_secs(90)))
        );
        for bad in ["-1", "hourly", "604801"] {
            let error = interval(&[(INVENTORY_CHECK_SECS, bad)]).expect_err(bad);
            assert_eq!(error.variable, INVENTORY_CHECK_SECS);
        }
    }

    #[test]
    fn traces_are_exported_only_to_a_configured_otlp_http_endpoint() {
        let traces = |vars: &[(&str, &str)]| config(vars).map(|c| c.telemetry.traces);
        assert_eq!(traces(&[]), Ok(None));
        assert_eq!(
            traces(&[(OTLP_ENDPOINT, "http://collector:4318/")]),
            Ok(Some(TraceExport {
                traces_url: "http://collector:4318/v1/traces".into()
            }))
        );
        assert_eq!(
            traces(&[
                (OTLP_ENDPOINT, "http://collector:4318"),
                (OTLP_TRACES_ENDPOINT, "https://traces.example/otlp"),
                (OTLP_PROTOCOL, "http/protobuf"),
            ]),
            Ok(Some(TraceExport {
                traces_url: "https://traces.example/otlp".into()
            }))
        );
        for off in [(OTEL_SDK_DISABLED, "true"), (OTEL_TRACES_EXPORTER, "none")] {
            assert_eq!(
                traces(&[(OTLP_ENDPOINT, "http://collector:4318"), off]),
                Ok(None)
            );
        }
        for (variable, value) in [
            (OTLP_ENDPOINT, "collector:4318"),
            (OTLP_TRACES_ENDPOINT, "ftp://collector/v1/traces"),
            (OTLP_PROTOCOL, "grpc"),
            (OTLP_TRACES_PROTOCOL, "http/json"),
            (OTEL_TRACES_EXPORTER, "zipkin"),
        ] {
            let error = traces(&[(OTLP_ENDPOINT, "http://collector:4318"), (variable, value)])
                .map(|_| ())
                .expect_err(value);
            assert_eq!(error.variable, variable, "{value}");
        }
    }
}
