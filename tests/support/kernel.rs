//! A kernel serving a test database on a loopback port, with tokens to call it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use commerce_kernel::auth::{Authenticator, Role};
use commerce_kernel::carts::CartBackendConfig;
use commerce_kernel::config::{self, Config};
use commerce_kernel::server;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::{CartBackendKind, TestCartStore, TestDatabase};

/// The HS256 secret test kernels share (so a token works on every node).
pub const TEST_JWT_SECRET: &str = "test-secret-test-secret-test-secret";
/// What `/metrics` asks of test kernels, on every backend alike.
pub const TEST_METRICS_TOKEN: &str = "test-metrics-token";

pub struct RunningKernel {
    pub address: SocketAddr,
    pub carts: TestCartStore,
    /// The plugin directory, unless the test passed its own.
    _plugins_dir: Option<tempfile::TempDir>,
    pub shutdown: oneshot::Sender<()>,
    pub task: JoinHandle<Result<(), server::KernelError>>,
    pub http: reqwest::Client,
    pub auth: Authenticator,
    /// A token of the admin "test-admin".
    pub admin: String,
}

impl RunningKernel {
    /// A kernel with its own cart store; `vars` are `COMMERCE_*` settings.
    pub async fn start(db: &TestDatabase, vars: &[(&str, &str)]) -> anyhow::Result<Self> {
        let carts = TestCartStore::create(CartBackendKind::paired_with(db.kind)).await?;
        Self::serve(db, carts, vars).await
    }

    /// Another kernel process on the same database and cart store as `other`
    /// (and so, with Redis, on the same live-update channel).
    pub async fn join(
        other: &RunningKernel,
        db: &TestDatabase,
        vars: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let carts = TestCartStore::open(other.carts.kind, other.carts.config.clone()).await?;
        Self::serve(db, carts, vars).await
    }

    async fn serve(
        db: &TestDatabase,
        carts: TestCartStore,
        vars: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut default = |name: &str, value: String| {
            if !vars.iter().any(|(k, _)| k == name) {
                vars.push((name.to_string(), value));
            }
        };
        default(config::LISTEN_ADDR, "127.0.0.1:0".into());
        default(config::JWT_SECRET, TEST_JWT_SECRET.into());
        default(config::METRICS_TOKEN, TEST_METRICS_TOKEN.into());
        // The suites set up the plugins they test; tests/bundled_plugins.rs
        // turns the bundled ones on.
        default(config::DEFAULT_PLUGINS, "false".into());
        // The gauge it sets is the reconciliation test's to check.
        default(config::INVENTORY_CHECK_SECS, "0".into());
        if let CartBackendConfig::Redis { url, key_prefix } = &carts.config {
            default(config::REDIS_URL, url.clone());
            default(config::REDIS_KEY_PREFIX, key_prefix.clone());
        }
        let plugins_dir = if vars.iter().any(|(k, _)| k == config::PLUGINS_DIR) {
            None
        } else {
            let dir = tempfile::tempdir()?;
            vars.push((config::PLUGINS_DIR.into(), dir.path().display().to_string()));
            Some(dir)
        };
        let config = Config::from_lookup(|name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })?;
        let auth = Authenticator::open(&config.auth).await?;
        // With a JWKS, the identity provider signs tokens: the test does.
        let admin = auth
            .mint("test-admin", Role::Admin, Duration::from_secs(3600))
            .unwrap_or_default();
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let (bound_tx, bound_rx) = oneshot::channel();
        let database = db.database.clone();
        let cart_store = Arc::clone(&carts.store);
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = shutdown_rx.await;
            };
            server::serve(database, cart_store, &config, shutdown, |address| {
                let _ = bound_tx.send(address);
            })
            .await
        });
        let address = match tokio::time::timeout(Duration::from_secs(10), bound_rx).await {
            Ok(Ok(address)) => address,
            // The server stopped before listening: its error says why.
            Ok(Err(_closed)) => {
                return Err(anyhow::anyhow!("kernel did not start: {:?}", task.await?));
            }
            Err(_elapsed) => anyhow::bail!("kernel did not start listening"),
        };
        Ok(RunningKernel {
            address,
            carts,
            _plugins_dir: plugins_dir,
            shutdown,
            task,
            http: reqwest::Client::new(),
            auth,
            admin,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// A token for the customer `customer_id`.
    pub fn customer_token(&self, customer_id: Uuid) -> anyhow::Result<String> {
        Ok(self.auth.mint(
            &customer_id.to_string(),
            Role::Customer,
            Duration::from_secs(3600),
        )?)
    }

    /// `/metrics`, with the test token; it must answer 200.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let response = self
            .http
            .get(self.url("/metrics"))
            .bearer_auth(TEST_METRICS_TOKEN)
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        ensure!(status == 200, "/metrics answered {status}: {text}");
        Ok(text)
    }

    /// Runs a GraphQL request as the test admin; it must answer 200.
    pub async fn graphql(&self, query: &str, variables: Value) -> anyhow::Result<Value> {
        let (status, body) = self.graphql_as(Some(&self.admin), query, variables).await?;
        ensure!(status == 200, "GraphQL answered {status}: {body}");
        Ok(body)
    }

    /// Runs a GraphQL request with `token` (or none): the status and the body.
    pub async fn graphql_as(
        &self,
        token: Option<&str>,
        query: &str,
        variables: Value,
    ) -> anyhow::Result<(u16, Value)> {
        let mut request = self
            .http
            .post(self.url("/graphql"))
            .json(&json!({ "query": query, "variables": variables }));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        let body = serde_json::from_str(&text)
            .with_context(|| format!("a {status} answer that is not JSON: {text}"))?;
        Ok((status, body))
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .context("kernel did not stop")???;
        self.carts.remove().await
    }
}

impl super::shop::AdminClient for RunningKernel {
    async fn admin_graphql(&self, query: &str, variables: Value) -> anyhow::Result<Value> {
        self.graphql(query, variables).await
    }
}

/// The `extensions.code` of a response's first error.
pub fn error_code(response: &Value) -> Option<&str> {
    response["errors"][0]["extensions"]["code"].as_str()
}

/// A mutation payload's typed error codes (`errors { code }`), in order.
pub fn payload_codes(payload: &Value) -> Vec<String> {
    payload["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .filter_map(|e| e["code"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}
