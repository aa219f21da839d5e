//! The plugin directory and the table of active plugins.
//!
//! Layout: `<dir>/<name>/<version>/plugin.toml` next to the component file
//! it names, and `<dir>/.cache/` for compiled components. A version is
//! written once and never changed; activating one swaps an `Arc`, so calls
//! already running finish on the version they started with.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use crate::engine::{EngineConfig, LoadedPlugin, PluginEngine, sha256_hex};
use crate::error::{LoadError, PluginError};
use crate::manifest::{MANIFEST_FILE, PluginManifest};
use crate::stats::{PluginStats, StatsSnapshot};

/// A version found in the plugin directory.
#[derive(Clone, Debug)]
pub struct InstalledPlugin {
    pub manifest: PluginManifest,
    pub directory: PathBuf,
}

/// Installed plugins on disk, and the version of each that runs.
pub struct PluginRegistry {
    engine: PluginEngine,
    dir: PathBuf,
    active: RwLock<BTreeMap<String, Arc<LoadedPlugin>>>,
    stats: Mutex<BTreeMap<String, Arc<PluginStats>>>,
}

static STAGING_COUNTER: AtomicU64 = AtomicU64::new(0);

impl PluginRegistry {
    /// Opens (and creates) the plugin directory. Nothing is active until
    /// [`activate`](Self::activate) or [`swap`](Self::swap) says so.
    pub fn open(dir: impl Into<PathBuf>, settings: EngineConfig) -> Result<Self, LoadError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| io_error(&dir, source))?;
        let settings = EngineConfig {
            cache_dir: settings.cache_dir.or_else(|| Some(dir.join(".cache"))),
            ..settings
        };
        Ok(PluginRegistry {
            engine: PluginEngine::new(settings)?,
            dir,
            active: RwLock::new(BTreeMap::new()),
            stats: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn directory(&self) -> &Path {
        &self.dir
    }

    /// Every version in the directory whose manifest parses, by name then
    /// version. Entries that do not parse are logged and left out.
    pub fn installed(&self) -> Result<Vec<InstalledPlugin>, LoadError> {
        let mut found = Vec::new();
        for name_dir in read_dir(&self.dir)? {
            let is_plugin = name_dir
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.starts_with('.'));
            if !is_plugin || !name_dir.is_dir() {
                continue;
            }
            for version_dir in read_dir(&name_dir)? {
                let manifest_path = version_dir.join(MANIFEST_FILE);
                if !manifest_path.is_file() {
                    continue;
                }
                match read_manifest(&manifest_path) {
                    Ok(manifest) => found.push(InstalledPlugin {
                        manifest,
                        directory: version_dir,
                    }),
                    Err(error) => tracing::warn!(
                        path = %manifest_path.display(),
                        "ignoring a plugin version whose manifest is unusable: {error}"
                    ),
                }
            }
        }
        found.sort_by(|a, b| {
            (&a.manifest.name, &a.manifest.version).cmp(&(&b.manifest.name, &b.manifest.version))
        });
        Ok(found)
    }

    /// One installed version.
    pub fn installed_version(
        &self,
        name: &str,
        version: &str,
    ) -> Result<InstalledPlugin, LoadError> {
        let not_installed = || LoadError::NotInstalled {
            name: name.to_string(),
            version: version.to_string(),
        };
        let directory = self.version_dir(name, version).ok_or_else(not_installed)?;
        let manifest_path = directory.join(MANIFEST_FILE);
        if !manifest_path.is_file() {
            return Err(not_installed());
        }
        let manifest = read_manifest(&manifest_path)?;
        if manifest.name != name || manifest.version != version {
            return Err(LoadError::InvalidManifest {
                reason: format!(
                    "{} names {}, not {name}@{version}",
                    manifest_path.display(),
                    manifest.label()
                ),
            });
        }
        Ok(InstalledPlugin {
            manifest,
            directory,
        })
    }

    /// Checks a new version completely (manifest, hash, component, imports
    /// against grants) and writes it into the directory. Installing the
    /// same manifest and component again is a no-op; a different one under
    /// the same name and version is refused. Does not activate it.
    pub fn install(
        &self,
        manifest_text: &str,
        component: &[u8],
    ) -> Result<PluginManifest, LoadError> {
        let manifest = PluginManifest::parse(manifest_text)?;
        // Loading proves it would run; the result is dropped, the compiled
        // artifact stays in the cache for activation.
        self.engine
            .load(manifest.clone(), component, self.stats_for(&manifest.name))?;
        self.write_version(&manifest, manifest_text, component)?;
        tracing::info!(plugin = %manifest.label(), sha256 = %manifest.sha256, "plugin installed");
        Ok(manifest)
    }

    /// Writes a version into the directory without compiling it: for
    /// components the caller has proven elsewhere, such as the kernel's
    /// bundled plugins (its tests load them), so that a start compiles only
    /// what it activates. The manifest and the sha256 pin are still checked,
    /// and [`prepare`](Self::prepare) checks everything else before the
    /// version runs. Placing the same files again is a no-op; other files
    /// under the same name and version are refused.
    pub fn place(
        &self,
        manifest_text: &str,
        component: &[u8],
    ) -> Result<PluginManifest, LoadError> {
        let manifest = PluginManifest::parse(manifest_text)?;
        let actual = sha256_hex(component);
        if actual != manifest.sha256 {
            return Err(LoadError::HashMismatch {
                label: manifest.label(),
                expected: manifest.sha256,
                actual,
            });
        }
        self.write_version(&manifest, manifest_text, component)?;
        Ok(manifest)
    }

    /// Writes a checked version's files under `<dir>/<name>/<version>`, all
    /// at once (a staging folder renamed into place).
    fn write_version(
        &self,
        manifest: &PluginManifest,
        manifest_text: &str,
        component: &[u8],
    ) -> Result<(), LoadError> {
        let label = manifest.label();
        let target = self
            .version_dir(&manifest.name, &manifest.version)
            .ok_or_else(|| LoadError::InvalidManifest {
                reason: format!("{label} cannot be a directory name"),
            })?;
        if target.exists() {
            return self.same_as_installed(manifest, manifest_text, component);
        }
        let name_dir = self.dir.join(&manifest.name);
        std::fs::create_dir_all(&name_dir).map_err(|source| io_error(&name_dir, source))?;
        let staging = self.dir.join(format!(
            ".staging-{}-{}",
            std::process::id(),
            STAGING_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| {
            std::fs::create_dir(&staging)?;
            std::fs::write(staging.join(&manifest.component), component)?;
            std::fs::write(staging.join(MANIFEST_FILE), manifest_text)?;
            std::fs::rename(&staging, &target)
        })();
        if let Err(source) = written {
            let _ = std::fs::remove_dir_all(&staging);
            // Another installer may have won the race with the same files.
            if target.exists() {
                return self.same_as_installed(manifest, manifest_text, component);
            }
            return Err(io_error(&target, source));
        }
        Ok(())
    }

    fn same_as_installed(
        &self,
        manifest: &PluginManifest,
        manifest_text: &str,
        component: &[u8],
    ) -> Result<(), LoadError> {
        let installed = self.installed_version(&manifest.name, &manifest.version)?;
        let installed_text = std::fs::read_to_string(installed.directory.join(MANIFEST_FILE))
            .map_err(|source| io_error(&installed.directory, source))?;
        if installed_text == manifest_text && installed.manifest.sha256 == sha256_hex(component) {
            Ok(())
        } else {
            Err(LoadError::AlreadyInstalled {
                label: manifest.label(),
            })
        }
    }

    /// Loads an installed version so it can be swapped in. Compiling is
    /// CPU work (milliseconds from the cache, up to seconds without): call
    /// it off the async executor.
    pub fn prepare(&self, name: &str, version: &str) -> Result<Arc<LoadedPlugin>, LoadError> {
        let installed = self.installed_version(name, version)?;
        let path = installed.directory.join(&installed.manifest.component);
        let component = std::fs::read(&path).map_err(|source| io_error(&path, source))?;
        let stats = self.stats_for(name);
        Ok(Arc::new(self.engine.load(
            installed.manifest,
            &component,
            stats,
        )?))
    }

    /// Makes `plugin` the active version of its name; returns the version
    /// it replaced. Calls that already hold the old version finish on it.
    pub fn swap(&self, plugin: Arc<LoadedPlugin>) -> Option<Arc<LoadedPlugin>> {
        let name = plugin.manifest().name.clone();
        let label = plugin.manifest().label();
        let previous = self
            .active
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name, plugin);
        tracing::info!(plugin = %label, "plugin activated");
        previous
    }

    /// [`prepare`](Self::prepare) then [`swap`](Self::swap).
    pub fn activate(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Option<Arc<LoadedPlugin>>, LoadError> {
        let plugin = self.prepare(name, version)?;
        Ok(self.swap(plugin))
    }

    /// The version of `name` that new calls use.
    pub fn active(&self, name: &str) -> Result<Arc<LoadedPlugin>, PluginError> {
        self.active
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
            .ok_or_else(|| PluginError::NotActive {
                name: name.to_string(),
            })
    }

    /// Every active plugin, by name.
    pub fn active_plugins(&self) -> Vec<Arc<LoadedPlugin>> {
        self.active
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// The counters of `name`, across its versions, if it was ever loaded.
    pub fn stats(&self, name: &str) -> Option<StatsSnapshot> {
        self.stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .map(|s| s.snapshot())
    }

    /// The counters of every plugin ever loaded, by name.
    pub fn all_stats(&self) -> Vec<(String, StatsSnapshot)> {
        self.stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(name, stats)| (name.clone(), stats.snapshot()))
            .collect()
    }

    pub fn engine(&self) -> &PluginEngine {
        &self.engine
    }

    fn stats_for(&self, name: &str) -> Arc<PluginStats> {
        self.stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// `<dir>/<name>/<version>`, when both are safe as path components.
    fn version_dir(&self, name: &str, version: &str) -> Option<PathBuf> {
        let safe = |part: &str| {
            !part.is_empty()
                && !part.starts_with('.')
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-'))
        };
        (safe(name) && safe(version)).then(|| self.dir.join(name).join(version))
    }
}

fn read_manifest(path: &Path) -> Result<PluginManifest, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| io_error(path, source))?;
    PluginManifest::parse(&text)
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let entries = std::fs::read_dir(dir).map_err(|source| io_error(dir, source))?;
    Ok(entries.flatten().map(|entry| entry.path()).collect())
}

fn io_error(path: &Path, source: std::io::Error) -> LoadError {
    LoadError::Io {
        path: path.display().to_string(),
        source,
    }
}
