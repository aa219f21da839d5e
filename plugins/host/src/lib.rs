//! The commerce kernel's plugin host: it runs payment adapters, shipping
//! adapters and saga steps shipped as WebAssembly components implementing
//! the WIT contracts in `wit/`.
//!
//! - [`PluginManifest`]: what a plugin is and may do (`plugin.toml`).
//! - [`PluginEngine`]: one wasmtime engine with fuel, epoch deadlines and the
//!   pooling allocator; it checks, compiles (with a disk cache) and pre-links
//!   a version into a [`LoadedPlugin`].
//! - [`LoadedPlugin`]: typed calls (`charge`, `create_shipment`,
//!   `execute_step`, ...), each in a fresh store within the manifest's
//!   limits. Every misbehaviour ends as a [`PluginError`].
//! - [`PluginRegistry`]: the plugin directory and the active version of each
//!   plugin, swapped atomically.
//!
//! The host knows nothing of the event store: the kernel records
//! installations and activations and decides which version is active.

mod bindings;
mod contract_v0_1;
mod engine;
mod error;
mod invoke;
mod manifest;
mod outbound;
mod registry;
mod state;
mod stats;

pub use bindings::{
    Address, ErrorDetail, Money, Order, OrderLine, Payment, PaymentRequest, PaymentStatus, Rate,
    Shipment, StepContext, StepOutput,
};
pub use engine::{EPOCH_TICK, EngineConfig, LoadedPlugin, PluginEngine, sha256_hex};
pub use error::{ErrorKind, Failure, LoadError, PluginError};
pub use manifest::{
    Limits, MANIFEST_FILE, MAX_FUEL, MAX_MEMORY_BYTES, MAX_TIMEOUT_MS, PluginKind, PluginManifest,
};
pub use outbound::OutboundHeaders;
pub use registry::{InstalledPlugin, PluginRegistry};
pub use stats::{PluginStats, StatsSnapshot};

/// The `tracing` target of the host's spans (one per plugin call, with the
/// plugin's label and the call's name). The kernel enables it whatever its
/// log filter says, so that its traces always show plugin calls.
pub const TRACE_TARGET: &str = "commerce::trace";
