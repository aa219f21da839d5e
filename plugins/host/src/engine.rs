//! The wasmtime engine every plugin runs on, and the loading of one plugin
//! version: hash check, compilation (cached on disk), import check against
//! the manifest's grants, and pre-linking.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::bindings::payment::commerce::plugin::{config, log};
use crate::bindings::v0_1::payment::commerce::plugin::{config as config_v0_1, log as log_v0_1};
use crate::bindings::{payment, saga_step, shipping, v0_1};
use crate::error::LoadError;
use crate::manifest::{HostPattern, MAX_MEMORY_BYTES, PluginKind, PluginManifest};
use crate::outbound::{OutboundHeaders, OutboundHttp};
use crate::state::{Grants, InvocationState};
use crate::stats::PluginStats;

/// How often the engine's epoch advances; a deadline is a whole number of ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Settings of the [`PluginEngine`].
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Invocations that may run at once; more wait for a free slot. The
    /// pooling allocator reserves (virtual) memory for this many instances.
    pub max_concurrent_invocations: u32,
    /// Where compiled components are cached; `None` compiles on every load.
    pub cache_dir: Option<PathBuf>,
    /// Added to every HTTP request a plugin sends (the kernel's trace
    /// context).
    pub outbound_headers: Option<OutboundHeaders>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_concurrent_invocations: 128,
            cache_dir: None,
            outbound_headers: None,
        }
    }
}

/// The engine shared by all plugins, with its epoch ticker and the pool of
/// invocation slots.
#[derive(Clone)]
pub struct PluginEngine {
    pub(crate) engine: Engine,
    pub(crate) permits: Arc<Semaphore>,
    cache_dir: Option<PathBuf>,
    outbound_headers: Option<OutboundHeaders>,
}

impl PluginEngine {
    /// Configures wasmtime for untrusted plugins: fuel, epoch interruption,
    /// the pooling allocator, and memories capped at [`MAX_MEMORY_BYTES`].
    pub fn new(settings: EngineConfig) -> Result<PluginEngine, LoadError> {
        let slots = settings.max_concurrent_invocations.max(1);
        let mut pool = PoolingAllocationConfig::default();
        // A Rust component built with std has a few core instances (its
        // module, the WASI adapter, shims), two memories and a few tables.
        pool.total_component_instances(slots)
            .total_core_instances(slots.saturating_mul(8))
            .total_memories(slots.saturating_mul(2))
            .total_tables(slots.saturating_mul(4))
            .total_stacks(slots)
            .max_memory_size(MAX_MEMORY_BYTES as usize)
            // Reusing a slot should not cost system calls and page faults:
            // the first pages of memories, tables and stacks are reset with
            // memset and stay resident, and decommits are batched.
            .linear_memory_keep_resident(1 << 20)
            .table_keep_resident(64 << 10)
            .async_stack_keep_resident(128 << 10)
            .decommit_batch_size(32)
            .pagemap_scan(wasmtime::Enabled::Auto);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .consume_fuel(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|error| LoadError::Engine {
            reason: format!("{error:#}"),
        })?;

        // The ticker stops once the last clone of the engine is gone.
        let weak = engine.weak();
        thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|error| LoadError::Engine {
                reason: error.to_string(),
            })?;

        if let Some(dir) = &settings.cache_dir {
            std::fs::create_dir_all(dir).map_err(|source| LoadError::Io {
                path: dir.display().to_string(),
                source,
            })?;
        }
        Ok(PluginEngine {
            engine,
            permits: Arc::new(Semaphore::new(slots as usize)),
            cache_dir: settings.cache_dir,
            outbound_headers: settings.outbound_headers,
        })
    }

    /// Checks, compiles and pre-links one plugin version. Nothing is
    /// activated: the caller decides when the result replaces what runs.
    pub fn load(
        &self,
        manifest: PluginManifest,
        component_bytes: &[u8],
        stats: Arc<PluginStats>,
    ) -> Result<LoadedPlugin, LoadError> {
        let label = manifest.label();
        let actual = sha256_hex(component_bytes);
        if actual != manifest.sha256 {
            return Err(LoadError::HashMismatch {
                label,
                expected: manifest.sha256,
                actual,
            });
        }
        let config = resolve_config(&label, &manifest.config)?;
        let component = self.compile(&label, &manifest.sha256, component_bytes)?;
        check_imports(&self.engine, &component, &manifest)?;

        let mut linker = Linker::<InvocationState>::new(&self.engine);
        let link = |error: wasmtime::Error| LoadError::Engine {
            reason: format!("{error:#}"),
        };
        log::add_to_linker::<_, HasSelf<InvocationState>>(&mut linker, |state| state)
            .map_err(link)?;
        config::add_to_linker::<_, HasSelf<InvocationState>>(&mut linker, |state| state)
            .map_err(link)?;
        log_v0_1::add_to_linker::<_, HasSelf<InvocationState>>(&mut linker, |state| state)
            .map_err(link)?;
        config_v0_1::add_to_linker::<_, HasSelf<InvocationState>>(&mut linker, |state| state)
            .map_err(link)?;
        if manifest.grants_wasi() {
            wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(link)?;
        }
        if manifest.grants_http() {
            wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(link)?;
        }
        let wrong_world = |error: wasmtime::Error| LoadError::WrongWorld {
            label: label.clone(),
            kind: manifest.kind.to_string(),
            reason: format!("{error:#}"),
        };
        let instance_pre = linker.instantiate_pre(&component).map_err(wrong_world)?;
        // The current contract first; a component built against 0.1 lacks
        // `lookup` and is bound by the old one. The error shown is the
        // current contract's: that is what a new plugin should implement.
        let prepared = match manifest.kind {
            PluginKind::Payment => match payment::PaymentPluginPre::new(instance_pre.clone()) {
                Ok(pre) => Prepared::Payment(pre),
                Err(error) => v0_1::payment::PaymentPluginPre::new(instance_pre)
                    .map(Prepared::PaymentV0_1)
                    .map_err(|_| wrong_world(error))?,
            },
            PluginKind::Shipping => match shipping::ShippingPluginPre::new(instance_pre.clone()) {
                Ok(pre) => Prepared::Shipping(pre),
                Err(error) => v0_1::shipping::ShippingPluginPre::new(instance_pre)
                    .map(Prepared::ShippingV0_1)
                    .map_err(|_| wrong_world(error))?,
            },
            PluginKind::SagaStep => match saga_step::SagaStepPluginPre::new(instance_pre.clone()) {
                Ok(pre) => Prepared::SagaStep(pre),
                Err(error) => v0_1::saga_step::SagaStepPluginPre::new(instance_pre)
                    .map(Prepared::SagaStepV0_1)
                    .map_err(|_| wrong_world(error))?,
            },
        };
        let grants = Grants {
            label,
            config,
            allowed_hosts: manifest
                .allowed_hosts
                .iter()
                .filter_map(|h| HostPattern::parse(h))
                .collect(),
            memory_bytes: usize::try_from(manifest.limits.memory_bytes).unwrap_or(usize::MAX),
            outbound: OutboundHttp::new(),
            outbound_headers: self.outbound_headers.clone(),
        };
        Ok(LoadedPlugin {
            engine: self.clone(),
            manifest,
            grants: Arc::new(grants),
            prepared,
            stats,
        })
    }

    /// Compiles a component, or reads it from the cache. Cached artifacts
    /// are keyed by the component's hash and the engine's settings.
    fn compile(&self, label: &str, sha256: &str, bytes: &[u8]) -> Result<Component, LoadError> {
        let invalid = |error: wasmtime::Error| LoadError::InvalidComponent {
            label: label.to_string(),
            reason: format!("{error:#}"),
        };
        let Some(dir) = &self.cache_dir else {
            return Component::new(&self.engine, bytes).map_err(invalid);
        };
        let mut hasher = DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        let cached = dir.join(format!("{sha256}-{:016x}.cwasm", hasher.finish()));
        if cached.is_file() {
            // SAFETY: the file was written by `serialize` below, into the
            // kernel's own cache directory, and wasmtime checks that it was
            // produced by a compatible engine. Whoever can write that
            // directory can already replace the kernel itself.
            match unsafe { Component::deserialize_file(&self.engine, &cached) } {
                Ok(component) => return Ok(component),
                Err(error) => tracing::warn!(
                    plugin = label,
                    file = %cached.display(),
                    "ignoring an unusable compiled-component cache entry: {error:#}"
                ),
            }
        }
        let component = Component::new(&self.engine, bytes).map_err(invalid)?;
        if let Ok(serialized) = component.serialize() {
            // Written aside and renamed, so a reader never sees half a file.
            let partial = cached.with_extension(format!("partial-{}", std::process::id()));
            let written = std::fs::write(&partial, serialized)
                .and_then(|()| std::fs::rename(&partial, &cached));
            if let Err(error) = written {
                tracing::warn!(
                    plugin = label,
                    "could not cache the compiled component: {error}"
                );
                let _ = std::fs::remove_file(&partial);
            }
        }
        Ok(component)
    }
}

/// The lowercase hex SHA-256 of `bytes`, as manifests pin it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Replaces `env:NAME` values with the kernel's environment variable.
fn resolve_config(
    label: &str,
    config: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, LoadError> {
    config
        .iter()
        .map(|(key, value)| match value.strip_prefix("env:") {
            Some(variable) => std::env::var(variable)
                .map(|secret| (key.clone(), secret))
                .map_err(|_| LoadError::MissingSecret {
                    label: label.to_string(),
                    key: key.clone(),
                    variable: variable.to_string(),
                }),
            None => Ok((key.clone(), value.clone())),
        })
        .collect()
}

/// Versions of `commerce:plugin` whose components load: the current one
/// and its predecessor (see [`crate::bindings::v0_1`]).
const SUPPORTED_CONTRACTS: &[&str] = &["0.2.", "0.1."];

/// WASI interfaces of the sandboxed runtime (what Rust's std uses).
const WASI_RUNTIME: &[&str] = &[
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/wall-clock",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
];

const WASI_HTTP: &[&str] = &["wasi:http/types", "wasi:http/outgoing-handler"];

/// Refuses a component that imports anything its manifest does not grant,
/// naming the first such import and what would grant it.
fn check_imports(
    engine: &Engine,
    component: &Component,
    manifest: &PluginManifest,
) -> Result<(), LoadError> {
    for (name, _) in component.component_type().imports(engine) {
        let (interface, version) = name.split_once('@').unwrap_or((name, ""));
        let refusal = if interface.starts_with("commerce:plugin/") {
            let known = matches!(
                interface,
                "commerce:plugin/types" | "commerce:plugin/log" | "commerce:plugin/config"
            );
            let supported = SUPPORTED_CONTRACTS
                .iter()
                .any(|contract| version.starts_with(contract));
            match (known, supported) {
                (true, true) => None,
                (true, false) => Some(
                    "is a version of the contract this kernel does not host \
                     (it hosts commerce:plugin@0.2 and @0.1)"
                        .to_string(),
                ),
                (false, _) => Some("is not something the kernel offers plugins".to_string()),
            }
        } else if WASI_RUNTIME.contains(&interface) {
            (!manifest.grants_wasi())
                .then(|| "its manifest does not grant (set `wasi = true`)".to_string())
        } else if WASI_HTTP.contains(&interface) {
            (!manifest.grants_http())
                .then(|| "its manifest does not grant (list `allowed_hosts`)".to_string())
        } else {
            Some("plugins are never granted (no files, sockets or other host access)".to_string())
        };
        if let Some(reason) = refusal {
            return Err(LoadError::UngrantedImport {
                label: manifest.label(),
                import: name.to_string(),
                reason,
            });
        }
    }
    Ok(())
}

/// A pre-linked component, by the world (and contract version) it implements.
pub(crate) enum Prepared {
    Payment(payment::PaymentPluginPre<InvocationState>),
    Shipping(shipping::ShippingPluginPre<InvocationState>),
    SagaStep(saga_step::SagaStepPluginPre<InvocationState>),
    PaymentV0_1(v0_1::payment::PaymentPluginPre<InvocationState>),
    ShippingV0_1(v0_1::shipping::ShippingPluginPre<InvocationState>),
    SagaStepV0_1(v0_1::saga_step::SagaStepPluginPre<InvocationState>),
}

/// One plugin version, ready to run: every invocation gets a fresh store
/// and instance from it. Cheap to share behind an `Arc`.
pub struct LoadedPlugin {
    pub(crate) engine: PluginEngine,
    pub(crate) manifest: PluginManifest,
    pub(crate) grants: Arc<Grants>,
    pub(crate) prepared: Prepared,
    pub(crate) stats: Arc<PluginStats>,
}

impl LoadedPlugin {
    pub fn manifest(&self) -> &PluginManifest {
        &self.manifest
    }

    pub fn stats(&self) -> &PluginStats {
        &self.stats
    }

    /// The contract version the component implements: `"0.2"` or `"0.1"`.
    pub fn contract(&self) -> &'static str {
        match self.prepared {
            Prepared::Payment(_) | Prepared::Shipping(_) | Prepared::SagaStep(_) => "0.2",
            Prepared::PaymentV0_1(_) | Prepared::ShippingV0_1(_) | Prepared::SagaStepV0_1(_) => {
                "0.1"
            }
        }
    }

    /// Whether the plugin answers `lookup` (payment and shipping plugins of
    /// contract 0.2). Without it, the kernel can learn a call's unknown
    /// outcome only by repeating the call with the same idempotency key.
    pub fn supports_lookup(&self) -> bool {
        matches!(self.prepared, Prepared::Payment(_) | Prepared::Shipping(_))
    }

    /// Whether the plugin can reach anything outside the kernel: only
    /// outbound HTTP to its `allowed_hosts` leaves the sandbox (the WASI
    /// runtime has no files and no sockets). A plugin without it has had no
    /// outside effect, whatever happened to a call.
    pub fn reaches_outside(&self) -> bool {
        self.manifest.grants_http()
    }
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("plugin", &self.grants.label)
            .finish_non_exhaustive()
    }
}
