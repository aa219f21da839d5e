//! Installing, activating and rolling back plugins. The plugin host checks
//! and runs them; the event store remembers who did what, and every kernel
//! process follows those events, so an activation on one reaches all.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use commerce_plugin_host::{
    LoadError, LoadedPlugin, PluginKind, PluginManifest, PluginRegistry, StatsSnapshot, sha256_hex,
};
use tokio::sync::{Mutex, watch};

use super::bundled_plugins::BUNDLED;
use super::{CommandContext, CommandError, Commerce, ConflictCounter, Written};
use crate::domain::Aggregate;
use crate::domain::plugin::{PluginEvent, PluginHistory};
use crate::event_store::repository::decode;
use crate::event_store::{EventFilter, Position, StoreError};

/// How often a process looks for activations made by others.
pub const FOLLOW_INTERVAL: Duration = Duration::from_secs(2);

/// One plugin name as the API lists it.
#[derive(Debug, Clone)]
pub struct PluginSummary {
    pub name: String,
    /// Installed versions in this process's plugin directory.
    pub versions: Vec<PluginManifest>,
    /// The version this process runs.
    pub active: Option<PluginManifest>,
    pub stats: Option<StatsSnapshot>,
}

/// The plugin commands, around one [`PluginRegistry`].
#[derive(Clone)]
pub struct Plugins {
    commerce: Commerce,
    registry: Arc<PluginRegistry>,
    /// How far this process has applied the log's plugin events.
    followed: Arc<Mutex<Position>>,
}

impl Plugins {
    pub fn new(commerce: Commerce, registry: Arc<PluginRegistry>) -> Self {
        Plugins {
            commerce,
            registry,
            followed: Arc::new(Mutex::new(Position::START)),
        }
    }

    pub fn registry(&self) -> &Arc<PluginRegistry> {
        &self.registry
    }

    /// Checks a plugin version completely, writes it into the plugin
    /// directory and records it. Does not activate it.
    pub async fn install(
        &self,
        manifest_text: String,
        component: Vec<u8>,
        context: &CommandContext,
    ) -> Result<PluginManifest, CommandError> {
        let registry = Arc::clone(&self.registry);
        let manifest = blocking(move || registry.install(&manifest_text, &component)).await?;
        let id = PluginHistory::stream_id(&manifest.name);
        self.commerce
            .retrying(ConflictCounter::Other, false, || async {
                let loaded = self.commerce.repository::<PluginHistory>().load(id).await?;
                let events = loaded.state.install(
                    &manifest.name,
                    &manifest.version,
                    manifest.kind.as_str(),
                    &manifest.sha256,
                )?;
                self.write(id, loaded, events, context).await
            })
            .await?;
        Ok(manifest)
    }

    /// Makes an installed version the one new calls use, in this process at
    /// once and in the others within [`FOLLOW_INTERVAL`]. A version that does
    /// not load is refused before anything is recorded, and the active
    /// version stays.
    pub async fn activate(
        &self,
        name: &str,
        version: &str,
        context: &CommandContext,
    ) -> Result<Written<PluginHistory>, CommandError> {
        let plugin = self.prepare(name, version).await?;
        let manifest = plugin.manifest().clone();
        let id = PluginHistory::stream_id(name);
        let written = self
            .commerce
            .retrying(ConflictCounter::Other, false, || async {
                let loaded = self.commerce.repository::<PluginHistory>().load(id).await?;
                // A version copied into the directory by hand is recorded
                // as installed when it is first activated.
                let mut events = loaded.state.install(
                    name,
                    version,
                    manifest.kind.as_str(),
                    &manifest.sha256,
                )?;
                let mut state = loaded.state.clone();
                events.iter().for_each(|event| state.apply(event));
                events.extend(state.activate(name, version)?);
                self.write(id, loaded, events, context).await
            })
            .await?;
        self.registry.swap(plugin);
        Ok(written)
    }

    /// Writes the kernel's bundled plugins into this process's plugin
    /// directory, without compiling them, so that every process can load a
    /// bundled version the log names. A directory that holds other files
    /// under a bundled name and version keeps them (logged).
    pub async fn place_bundled(&self) -> Result<(), CommandError> {
        let registry = Arc::clone(&self.registry);
        blocking(move || {
            for bundled in BUNDLED {
                if let Err(error) = registry.place(&bundled.manifest(), bundled.component) {
                    tracing::warn!(
                        plugin = bundled.name,
                        version = bundled.version,
                        "could not place a bundled plugin in the plugin directory: {error}"
                    );
                }
            }
            Ok(())
        })
        .await
    }

    /// On a database where no admin ever activated a payment or shipping
    /// plugin, activates the bundled payment and shipping plugins that are
    /// not active yet and records the bundled steps as installed, under
    /// `context`'s actor (the kernel's own, [`crate::server::SYSTEM_ACTOR`]).
    /// Anywhere else it does nothing: an admin has chosen. A start that
    /// stopped half-way is completed by the next. Safe when several
    /// processes start at once: each plugin's own stream decides, and only
    /// a stream without any activation gets one. Returns the versions it
    /// activated.
    pub async fn activate_defaults(
        &self,
        context: &CommandContext,
    ) -> Result<Vec<String>, CommandError> {
        if self.chosen_by_an_admin(context.actor.as_deref()).await? {
            return Ok(Vec::new());
        }
        let mut activated = Vec::new();
        for bundled in BUNDLED {
            // Already active here (catch_up followed the log before): the
            // stream has its activation, so there is nothing to compile.
            if self.registry.active(bundled.name).is_ok() {
                continue;
            }
            let sha256 = sha256_hex(bundled.component);
            let plugin = if bundled.active_by_default {
                let plugin = self.prepare(bundled.name, bundled.version).await?;
                // The directory may hold other bytes under this version
                // (place_bundled kept them): never record what does not run.
                if plugin.manifest().sha256 != sha256 {
                    tracing::warn!(
                        plugin = bundled.name,
                        version = bundled.version,
                        "not activating a bundled plugin: the plugin directory holds other bytes \
                         under its version"
                    );
                    continue;
                }
                Some(plugin)
            } else {
                None
            };
            let id = PluginHistory::stream_id(bundled.name);
            let written = self
                .commerce
                .retrying(ConflictCounter::Other, false, || async {
                    let loaded = self.commerce.repository::<PluginHistory>().load(id).await?;
                    if loaded.state.active().is_some() {
                        return Ok(Written::unchanged(id, loaded));
                    }
                    let mut events = loaded.state.install(
                        bundled.name,
                        bundled.version,
                        bundled.kind.as_str(),
                        &sha256,
                    )?;
                    if bundled.active_by_default {
                        let mut state = loaded.state.clone();
                        events.iter().for_each(|event| state.apply(event));
                        events.extend(state.activate(bundled.name, bundled.version)?);
                    }
                    self.write(id, loaded, events, context).await
                })
                .await?;
            let activated_here = written.position.is_some()
                && written
                    .state
                    .active()
                    .is_some_and(|active| active.version == bundled.version);
            if let (Some(plugin), true) = (plugin, activated_here) {
                self.registry.swap(plugin);
                tracing::warn!(
                    plugin = bundled.name,
                    version = bundled.version,
                    "activated a bundled plugin: no payment or shipping plugin was ever chosen; \
                     it takes no money (COMMERCE_DEFAULT_PLUGINS=false turns this off)"
                );
                activated.push(format!("{}@{}", bundled.name, bundled.version));
            }
        }
        Ok(activated)
    }

    /// Whether anyone but `system` ever activated a payment or shipping
    /// plugin, under any name.
    async fn chosen_by_an_admin(&self, system: Option<&str>) -> Result<bool, CommandError> {
        let filter = EventFilter {
            aggregate_type: Some(PluginHistory::AGGREGATE_TYPE.to_string()),
            ..EventFilter::default()
        };
        let mut kinds: BTreeMap<String, String> = BTreeMap::new();
        let mut activated: Vec<String> = Vec::new();
        let mut after = Position::START;
        loop {
            let events = self
                .commerce
                .store()
                .read_all_matching(&filter, after, 500)
                .await?;
            let Some(last) = events.last() else { break };
            after = last.position;
            for event in &events {
                match decode::<PluginEvent>(event)? {
                    PluginEvent::PluginInstalled { name, kind, .. } => {
                        kinds.insert(name, kind);
                    }
                    PluginEvent::PluginActivated { name, .. }
                        if event.metadata.actor.as_deref() != system =>
                    {
                        activated.push(name);
                    }
                    PluginEvent::PluginActivated { .. } | PluginEvent::PluginRolledBack { .. } => {}
                }
            }
        }
        Ok(activated.iter().any(|name| {
            kinds.get(name).is_some_and(|kind| {
                kind == PluginKind::Payment.as_str() || kind == PluginKind::Shipping.as_str()
            })
        }))
    }

    /// Goes back to the version that was active before the current one.
    pub async fn roll_back(
        &self,
        name: &str,
        context: &CommandContext,
    ) -> Result<Written<PluginHistory>, CommandError> {
        let id = PluginHistory::stream_id(name);
        let (written, plugin) = self
            .commerce
            .retrying(ConflictCounter::Other, false, || async {
                let loaded = self.commerce.repository::<PluginHistory>().load(id).await?;
                let event = loaded.state.roll_back(name)?;
                let plugin = self.prepare(name, event.version()).await?;
                let written = self.write(id, loaded, vec![event], context).await?;
                Ok((written, plugin))
            })
            .await?;
        self.registry.swap(plugin);
        Ok(written)
    }

    async fn write(
        &self,
        id: uuid::Uuid,
        loaded: crate::event_store::repository::Loaded<PluginHistory>,
        events: Vec<PluginEvent>,
        context: &CommandContext,
    ) -> Result<Written<PluginHistory>, CommandError> {
        if events.is_empty() {
            return Ok(Written::unchanged(id, loaded));
        }
        let outcome = self
            .commerce
            .repository::<PluginHistory>()
            .append(id, loaded.version, &events, context.metadata(), None)
            .await?;
        Ok(Written::after(id, loaded, &events, outcome.last_position))
    }

    /// Loads an installed version off the async executor (compiling is CPU work).
    async fn prepare(&self, name: &str, version: &str) -> Result<Arc<LoadedPlugin>, CommandError> {
        let registry = Arc::clone(&self.registry);
        let (name, version) = (name.to_string(), version.to_string());
        blocking(move || registry.prepare(&name, &version)).await
    }

    /// Every plugin name with installed versions or an active one.
    pub async fn list(&self) -> Result<Vec<PluginSummary>, CommandError> {
        let registry = Arc::clone(&self.registry);
        let installed = blocking(move || registry.installed()).await?;
        let mut summaries: BTreeMap<String, PluginSummary> = BTreeMap::new();
        for version in installed {
            summary_of(&mut summaries, &self.registry, &version.manifest.name)
                .versions
                .push(version.manifest);
        }
        for plugin in self.registry.active_plugins() {
            summary_of(&mut summaries, &self.registry, &plugin.manifest().name).active =
                Some(plugin.manifest().clone());
        }
        Ok(summaries.into_values().collect())
    }

    /// Applies activations and rollbacks recorded since the last call
    /// (by this process or another): each plugin ends on the version its
    /// latest event names. A version that does not load here is logged and
    /// the current one kept. Returns how many plugins were swapped.
    pub async fn catch_up(&self) -> Result<usize, StoreError> {
        let mut followed = self.followed.lock().await;
        let filter = EventFilter {
            aggregate_type: Some(PluginHistory::AGGREGATE_TYPE.to_string()),
            ..EventFilter::default()
        };
        let mut wanted: BTreeMap<String, String> = BTreeMap::new();
        loop {
            let events = self
                .commerce
                .store()
                .read_all_matching(&filter, *followed, 500)
                .await?;
            let Some(last) = events.last() else { break };
            *followed = last.position;
            for event in &events {
                match decode::<PluginEvent>(event)? {
                    PluginEvent::PluginActivated { name, version, .. }
                    | PluginEvent::PluginRolledBack { name, version, .. } => {
                        wanted.insert(name, version);
                    }
                    PluginEvent::PluginInstalled { .. } => {}
                }
            }
        }
        let mut swapped = 0;
        for (name, version) in wanted {
            let current = self
                .registry
                .active(&name)
                .ok()
                .map(|p| p.manifest().version.clone());
            if current.as_deref() == Some(version.as_str()) {
                continue;
            }
            match self.prepare(&name, &version).await {
                Ok(plugin) => {
                    self.registry.swap(plugin);
                    swapped += 1;
                }
                Err(error) => tracing::error!(
                    plugin = %name,
                    version = %version,
                    "could not activate a plugin version recorded as active: {error}"
                ),
            }
        }
        Ok(swapped)
    }

    /// Runs [`catch_up`](Self::catch_up) every [`FOLLOW_INTERVAL`] until `stop`.
    pub async fn follow(self, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep(FOLLOW_INTERVAL) => {
                    if let Err(error) = self.catch_up().await {
                        tracing::warn!("following plugin activations failed: {error}");
                    }
                }
            }
        }
    }
}

/// The entry of `name` in a listing, created with its counters on first use.
fn summary_of<'a>(
    summaries: &'a mut BTreeMap<String, PluginSummary>,
    registry: &PluginRegistry,
    name: &str,
) -> &'a mut PluginSummary {
    summaries
        .entry(name.to_string())
        .or_insert_with(|| PluginSummary {
            name: name.to_string(),
            versions: Vec::new(),
            active: None,
            stats: registry.stats(name),
        })
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, LoadError> + Send + 'static,
) -> Result<T, CommandError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|join| {
            CommandError::Plugin(LoadError::Engine {
                reason: join.to_string(),
            })
        })?
        .map_err(CommandError::Plugin)
}
