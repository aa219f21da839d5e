//! The commerce kernel: an event-sourced commerce backend with a GraphQL API.
//!
//! Map of the crate (ARCHITECTURE.md at the repository root has the long form):
//! - [`domain`]: pure domain contracts (aggregates, events); no I/O.
//! - [`event_store`]: the event store contract, its types and the aggregate repository.
//! - [`storage`]: the backends (PostgreSQL, embedded SQLite) and their migrations.
//! - [`commerce`]: command handlers: load aggregates, decide, append, retry conflicts.
//! - [`carts`]: cart stores (Redis, embedded) and the cart lifecycle record.
//! - [`projections`]: CQRS read models following the event log.
//! - [`sagas`]: saga instances (work queue, leases) and the runner driving them.
//! - [`api`]: the GraphQL schema.
//! - [`server`]: HTTP routes, health, graceful shutdown.
//! - [`loadtest`]: `commerce-kernel loadtest`, a storefront's load against a running kernel.
//! - [`plugin_template`]: `commerce-kernel plugin new`, a plugin crate from `plugins/template/`.
//! - [`metrics`]: the Prometheus registry and what records into it.
//! - [`config`]: configuration from `COMMERCE_*` environment variables.

pub mod api;
pub mod auth;
pub mod carts;
pub mod commerce;
pub mod config;
pub mod domain;
pub mod event_store;
pub mod live;
pub mod loadtest;
pub mod metrics;
pub mod plugin_template;
pub mod projections;
pub mod sagas;
pub mod server;
pub mod storage;
pub mod telemetry;
