//! Plugins in GraphQL: list them with their counters, install a version
//! (manifest plus base64 component), activate it, roll back. For admins
//! (authentication arrives with issue 7).

use async_graphql::{Context, Enum, InputObject, Object, SimpleObject};
use base64::Engine as _;
use commerce_plugin_host::PluginManifest;

use async_graphql::connection::{Connection, Edge};

use super::access::{AdminOnly, command_context};
use super::commerce::refused;
use super::error::{ApiError, UserError, command_failure};
use super::{Page, TotalCount, page_size};
use crate::commerce::{PluginSummary, Plugins};

/// Largest component accepted by `installPlugin`, decoded.
pub const MAX_COMPONENT_BYTES: usize = 16 << 20;

fn plugins<'a>(ctx: &Context<'a>) -> &'a Plugins {
    ctx.data_unchecked::<Plugins>()
}

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
#[graphql(remote = "commerce_plugin_host::PluginKind")]
pub enum PluginKind {
    Payment,
    Shipping,
    SagaStep,
}

/// One plugin name: its versions in this process's plugin directory and
/// the one that runs.
pub struct Plugin(PluginSummary);

#[Object]
impl Plugin {
    async fn name(&self) -> &str {
        &self.0.name
    }

    /// The version new calls use; null when none is active.
    async fn active_version(&self) -> Option<PluginVersion> {
        self.0.active.clone().map(PluginVersion)
    }

    /// Installed versions, oldest name first.
    async fn versions(&self) -> Vec<PluginVersion> {
        self.0.versions.iter().cloned().map(PluginVersion).collect()
    }

    /// Counters since this process started, over all versions.
    async fn stats(&self) -> PluginStats {
        let snapshot = self.0.stats.clone();
        PluginStats {
            invocations: snapshot.as_ref().map_or(0.0, |s| s.invocations as f64),
            errors: snapshot
                .as_ref()
                .map(|s| {
                    s.errors
                        .iter()
                        .map(|(kind, count)| PluginErrorCount {
                            kind: kind.as_str().to_string(),
                            count: *count as f64,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            total_duration_ms: snapshot
                .as_ref()
                .map_or(0.0, |s| s.total_duration.as_secs_f64() * 1000.0),
            fuel_consumed: snapshot.as_ref().map_or(0.0, |s| s.fuel_consumed as f64),
        }
    }
}

/// One installed version, as its manifest describes it.
pub struct PluginVersion(PluginManifest);

#[Object]
impl PluginVersion {
    async fn version(&self) -> &str {
        &self.0.version
    }

    async fn kind(&self) -> PluginKind {
        self.0.kind.into()
    }

    /// The component's SHA-256 (lowercase hex), as pinned by the manifest.
    async fn sha256(&self) -> &str {
        &self.0.sha256
    }

    /// Hosts the plugin may reach over HTTP.
    async fn allowed_hosts(&self) -> &[String] {
        &self.0.allowed_hosts
    }

    async fn limits(&self) -> PluginLimits {
        PluginLimits {
            fuel: self.0.limits.fuel as f64,
            timeout_ms: self.0.limits.timeout_ms as f64,
            memory_bytes: self.0.limits.memory_bytes as f64,
        }
    }
}

/// Limits of one invocation. Numbers are floats because they can exceed a
/// GraphQL Int; they are exact up to 2^53.
#[derive(SimpleObject)]
pub struct PluginLimits {
    pub fuel: f64,
    pub timeout_ms: f64,
    pub memory_bytes: f64,
}

/// Counters of one plugin (floats, exact up to 2^53).
#[derive(SimpleObject)]
pub struct PluginStats {
    pub invocations: f64,
    /// Failed invocations by kind (`permanent`, `transient`, `fuel`,
    /// `deadline`, `memory`, `trap`, `invalid_output`, `host`, ...).
    pub errors: Vec<PluginErrorCount>,
    pub total_duration_ms: f64,
    pub fuel_consumed: f64,
}

#[derive(SimpleObject)]
pub struct PluginErrorCount {
    pub kind: String,
    pub count: f64,
}

#[derive(InputObject)]
pub struct InstallPluginInput {
    /// The plugin's `plugin.toml`, as text.
    pub manifest: String,
    /// The component file, base64 (standard alphabet, padded); at most 16 MiB decoded.
    pub component: String,
}

#[derive(InputObject)]
pub struct ActivatePluginInput {
    pub name: String,
    pub version: String,
}

#[derive(InputObject)]
pub struct RollbackPluginInput {
    pub name: String,
}

#[derive(SimpleObject, Default)]
pub struct PluginPayload {
    pub plugin: Option<Plugin>,
    pub errors: Vec<UserError>,
}

#[derive(Default)]
pub struct PluginQuery;

#[Object]
impl PluginQuery {
    /// Every plugin with installed versions or an active one, by name. For
    /// admins.
    #[graphql(
        guard = "AdminOnly",
        complexity = "super::page_cost(first, child_complexity)"
    )]
    async fn plugins(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Page size (default 50, at most the server's maximum page size).")]
        first: Option<i32>,
        #[graphql(desc = "Cursor (the name) of the last plugin already seen.")] after: Option<
            String,
        >,
    ) -> Result<Page<Plugin>, ApiError> {
        let first = page_size(ctx, first)? as usize;
        let mut summaries = plugins(ctx).list().await.map_err(command_failure)?;
        summaries.sort_by(|a, b| a.name.cmp(&b.name));
        let total = summaries.len() as u64;
        let rest: Vec<_> = summaries
            .into_iter()
            .filter(|plugin| {
                after
                    .as_deref()
                    .is_none_or(|seen| plugin.name.as_str() > seen)
            })
            .collect();
        let has_next = rest.len() > first;
        let mut connection =
            Connection::with_additional_fields(after.is_some(), has_next, TotalCount::known(total));
        connection.edges.extend(
            rest.into_iter()
                .take(first)
                .map(|plugin| Edge::new(plugin.name.clone(), Plugin(plugin))),
        );
        Ok(connection)
    }
}

#[derive(Default)]
pub struct PluginMutation;

#[Object]
impl PluginMutation {
    /// Checks a plugin version (manifest, sha256 pin, component, imports
    /// against grants) and installs it. It does not run until activated. For admins.
    #[graphql(guard = "AdminOnly")]
    async fn install_plugin(
        &self,
        ctx: &Context<'_>,
        input: InstallPluginInput,
    ) -> Result<PluginPayload, ApiError> {
        let component = base64::engine::general_purpose::STANDARD
            .decode(input.component.trim())
            .map_err(|error| ApiError::invalid("component", format!("not base64: {error}")))?;
        if component.len() > MAX_COMPONENT_BYTES {
            return Err(ApiError::invalid("component", "larger than 16 MiB"));
        }
        let context = command_context(ctx)?;
        let installed = plugins(ctx).install(input.manifest, component, &context);
        match refused(installed).await? {
            Ok(manifest) => plugin_payload(ctx, &manifest.name).await,
            Err(errors) => Ok(PluginPayload {
                plugin: None,
                errors,
            }),
        }
    }

    /// Makes an installed version the active one. Calls already running
    /// finish on the version they started with; new calls use this one.
    /// Recorded as an event with the acting admin and the sha256.
    #[graphql(guard = "AdminOnly")]
    async fn activate_plugin(
        &self,
        ctx: &Context<'_>,
        input: ActivatePluginInput,
    ) -> Result<PluginPayload, ApiError> {
        let context = command_context(ctx)?;
        let activated = plugins(ctx).activate(&input.name, &input.version, &context);
        match refused(activated).await? {
            Ok(_) => plugin_payload(ctx, &input.name).await,
            Err(errors) => Ok(PluginPayload {
                plugin: None,
                errors,
            }),
        }
    }

    /// Goes back to the version that was active before the current one. For admins.
    #[graphql(guard = "AdminOnly")]
    async fn rollback_plugin(
        &self,
        ctx: &Context<'_>,
        input: RollbackPluginInput,
    ) -> Result<PluginPayload, ApiError> {
        let context = command_context(ctx)?;
        let rolled_back = plugins(ctx).roll_back(&input.name, &context);
        match refused(rolled_back).await? {
            Ok(_) => plugin_payload(ctx, &input.name).await,
            Err(errors) => Ok(PluginPayload {
                plugin: None,
                errors,
            }),
        }
    }
}

async fn plugin_payload(ctx: &Context<'_>, name: &str) -> Result<PluginPayload, ApiError> {
    let plugin = match refused(plugins(ctx).list()).await? {
        Ok(summaries) => summaries.into_iter().find(|s| s.name == name).map(Plugin),
        Err(errors) => {
            return Ok(PluginPayload {
                plugin: None,
                errors,
            });
        }
    };
    Ok(PluginPayload {
        plugin,
        errors: Vec::new(),
    })
}
