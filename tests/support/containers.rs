//! Postgres and Redis in containers for one run of a suite, with the
//! `testcontainers` feature (`cargo test --workspace --features
//! commerce-kernel/testcontainers`): a service whose test URL
//! (`COMMERCE_TEST_DATABASE_URL`, `COMMERCE_TEST_REDIS_URL`) is not set is
//! started in a container when a Docker engine answers, and removed when
//! the suite ends (or the process is interrupted). A set URL always wins;
//! without the feature, or without Docker, the suites run as before
//! (Postgres and Redis cases ignored when their URL is unset).

use std::sync::OnceLock;

/// The URLs of the services this run started, once [`start`] has run.
static STARTED: OnceLock<Urls> = OnceLock::new();

#[derive(Debug, Default)]
struct Urls {
    postgres: Option<String>,
    redis: Option<String>,
}

/// The Postgres URL of a container this run started, if any.
pub fn postgres_url() -> Option<String> {
    STARTED.get().and_then(|urls| urls.postgres.clone())
}

/// The Redis URL of a container this run started, if any.
pub fn redis_url() -> Option<String> {
    STARTED.get().and_then(|urls| urls.redis.clone())
}

/// What [`start`] started; dropping it removes the containers.
pub struct Containers {
    _running: Vec<Box<dyn std::any::Any>>,
}

/// Starts the services whose test URL is unset, when built with the
/// `testcontainers` feature and a Docker engine answers. Call once, before
/// the suite lists its cases; keep the result until the suite has run.
pub fn start(postgres_wanted: bool, redis_wanted: bool) -> Containers {
    #[cfg(feature = "testcontainers")]
    {
        let (urls, running) = with_docker::start(postgres_wanted, redis_wanted);
        let _ = STARTED.set(urls);
        Containers { _running: running }
    }
    #[cfg(not(feature = "testcontainers"))]
    {
        let _ = (postgres_wanted, redis_wanted);
        let _ = STARTED.set(Urls::default());
        Containers {
            _running: Vec::new(),
        }
    }
}

#[cfg(feature = "testcontainers")]
mod with_docker {
    use testcontainers_modules::postgres::Postgres;
    use testcontainers_modules::redis::{REDIS_PORT, Redis};
    use testcontainers_modules::testcontainers::ImageExt as _;
    use testcontainers_modules::testcontainers::runners::SyncRunner;

    /// The modules' default images are older than the kernel needs
    /// (Postgres 13 for `pg_current_xact_id`, Redis 6.2 for `XAUTOCLAIM`).
    const POSTGRES_TAG: &str = "17-alpine";
    const REDIS_TAG: &str = "7-alpine";

    use super::Urls;

    pub(super) fn start(
        postgres_wanted: bool,
        redis_wanted: bool,
    ) -> (Urls, Vec<Box<dyn std::any::Any>>) {
        let mut urls = Urls::default();
        let mut running: Vec<Box<dyn std::any::Any>> = Vec::new();
        if postgres_wanted {
            match Postgres::default()
                .with_tag(POSTGRES_TAG)
                .start()
                .and_then(|node| {
                    let url = format!(
                        "postgres://postgres:postgres@{}:{}/postgres",
                        node.get_host()?,
                        node.get_host_port_ipv4(5432)?
                    );
                    Ok((node, url))
                }) {
                Ok((node, url)) => {
                    urls.postgres = Some(url);
                    running.push(Box::new(node));
                }
                Err(error) => {
                    eprintln!("no Postgres container ({error}); Postgres cases are ignored")
                }
            }
        }
        if redis_wanted {
            match Redis::default()
                .with_tag(REDIS_TAG)
                .start()
                .and_then(|node| {
                    let url = format!(
                        "redis://{}:{}",
                        node.get_host()?,
                        node.get_host_port_ipv4(REDIS_PORT)?
                    );
                    Ok((node, url))
                }) {
                Ok((node, url)) => {
                    urls.redis = Some(url);
                    running.push(Box::new(node));
                }
                Err(error) => eprintln!("no Redis container ({error}); Redis cases are ignored"),
            }
        }
        (urls, running)
    }
}
