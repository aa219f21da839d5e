//! The administrative history of one plugin name: which versions were
//! installed (with their sha256), and which is active. Activations form a
//! stack: activating pushes a version, rolling back pops to the one before.
//!
//! Who did it is the event's metadata (`actor`); what is the name, version
//! and sha256 in the payload.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Aggregate, DomainError, DomainEvent};

/// Namespace of plugin stream ids (UUIDv5 of the plugin's name).
const PLUGIN_NAMESPACE: Uuid = Uuid::from_u128(0x6a1f_2c55_86b2_4f0e_9d1c_4b0e_7a3d_9e21);

/// One installed version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstalledVersion {
    pub version: String,
    pub kind: String,
    pub sha256: String,
}

/// An entry of the activation stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActiveVersion {
    pub version: String,
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum PluginEvent {
    PluginInstalled {
        name: String,
        version: String,
        kind: String,
        sha256: String,
    },
    PluginActivated {
        name: String,
        version: String,
        sha256: String,
        previous_version: Option<String>,
    },
    PluginRolledBack {
        name: String,
        version: String,
        sha256: String,
        from_version: String,
    },
}

impl DomainEvent for PluginEvent {}

impl PluginEvent {
    /// The version the event installs, activates or rolls back to.
    pub fn version(&self) -> &str {
        match self {
            PluginEvent::PluginInstalled { version, .. }
            | PluginEvent::PluginActivated { version, .. }
            | PluginEvent::PluginRolledBack { version, .. } => version,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PluginHistory {
    installed: Vec<InstalledVersion>,
    activations: Vec<ActiveVersion>,
}

impl Aggregate for PluginHistory {
    const AGGREGATE_TYPE: &'static str = "plugin";
    type Event = PluginEvent;

    fn apply(&mut self, event: &PluginEvent) {
        match event {
            PluginEvent::PluginInstalled {
                version,
                kind,
                sha256,
                ..
            } => {
                self.installed.push(InstalledVersion {
                    version: version.clone(),
                    kind: kind.clone(),
                    sha256: sha256.clone(),
                });
            }
            PluginEvent::PluginActivated {
                version, sha256, ..
            } => {
                self.activations.push(ActiveVersion {
                    version: version.clone(),
                    sha256: sha256.clone(),
                });
            }
            PluginEvent::PluginRolledBack { .. } => {
                self.activations.pop();
            }
        }
    }
}

impl PluginHistory {
    /// The stream of the plugin called `name`.
    pub fn stream_id(name: &str) -> Uuid {
        Uuid::new_v5(&PLUGIN_NAMESPACE, name.as_bytes())
    }

    /// The version new calls use, if any was activated.
    pub fn active(&self) -> Option<&ActiveVersion> {
        self.activations.last()
    }

    pub fn installed(&self) -> &[InstalledVersion] {
        &self.installed
    }

    fn installed_version(&self, version: &str) -> Option<&InstalledVersion> {
        self.installed
            .iter()
            .find(|installed| installed.version == version)
    }

    /// Records an installation; nothing when the same version with the same
    /// hash is already recorded.
    pub fn install(
        &self,
        name: &str,
        version: &str,
        kind: &str,
        sha256: &str,
    ) -> Result<Vec<PluginEvent>, DomainError> {
        match self.installed_version(version) {
            Some(installed) if installed.sha256 == sha256 => Ok(Vec::new()),
            Some(_) => Err(DomainError::Invalid {
                field: "version",
                reason: format!("{name}@{version} is already installed with another component"),
            }),
            None => Ok(vec![PluginEvent::PluginInstalled {
                name: name.to_string(),
                version: version.to_string(),
                kind: kind.to_string(),
                sha256: sha256.to_string(),
            }]),
        }
    }

    /// Activates an installed version; nothing when it is already active.
    pub fn activate(&self, name: &str, version: &str) -> Result<Vec<PluginEvent>, DomainError> {
        let installed = self
            .installed_version(version)
            .ok_or_else(|| DomainError::Invalid {
                field: "version",
                reason: format!("{name}@{version} is not installed"),
            })?;
        if self
            .active()
            .is_some_and(|active| active.version == version)
        {
            return Ok(Vec::new());
        }
        Ok(vec![PluginEvent::PluginActivated {
            name: name.to_string(),
            version: version.to_string(),
            sha256: installed.sha256.clone(),
            previous_version: self.active().map(|active| active.version.clone()),
        }])
    }

    /// Goes back to the version that was active before the current one.
    pub fn roll_back(&self, name: &str) -> Result<PluginEvent, DomainError> {
        let [.., previous, current] = self.activations.as_slice() else {
            return Err(DomainError::Invalid {
                field: "name",
                reason: format!("{name} has no earlier active version to roll back to"),
            });
        };
        Ok(PluginEvent::PluginRolledBack {
            name: name.to_string(),
            version: previous.version.clone(),
            sha256: previous.sha256.clone(),
            from_version: current.version.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replay(events: &[PluginEvent]) -> PluginHistory {
        let mut history = PluginHistory::default();
        for event in events {
            history.apply(event);
        }
        history
    }

    fn installed(versions: &[&str]) -> Vec<PluginEvent> {
        let mut events = Vec::new();
        for version in versions {
            let history = replay(&events);
            events.extend(
                history
                    .install("pay", version, "payment", &format!("sha-{version}"))
                    .expect("install"),
            );
        }
        events
    }

    #[test]
    fn activations_stack_and_rollbacks_pop() {
        let mut events = installed(&["1", "2", "3"]);
        for version in ["1", "2", "3"] {
            events.extend(replay(&events).activate("pay", version).expect("activate"));
        }
        assert_eq!(
            replay(&events).active().map(|a| a.version.as_str()),
            Some("3")
        );

        let back = replay(&events).roll_back("pay").expect("roll back");
        assert_eq!(
            back,
            PluginEvent::PluginRolledBack {
                name: "pay".into(),
                version: "2".into(),
                sha256: "sha-2".into(),
                from_version: "3".into(),
            }
        );
        events.push(back);
        events.push(replay(&events).roll_back("pay").expect("roll back again"));
        assert_eq!(
            replay(&events).active().map(|a| a.version.as_str()),
            Some("1")
        );
        assert!(
            replay(&events).roll_back("pay").is_err(),
            "nothing before the first"
        );
    }

    #[test]
    fn activation_is_idempotent_and_needs_an_installed_version() {
        let mut events = installed(&["1"]);
        assert!(replay(&events).activate("pay", "9").is_err());
        events.extend(replay(&events).activate("pay", "1").expect("activate"));
        assert!(
            replay(&events)
                .activate("pay", "1")
                .expect("again")
                .is_empty()
        );
        assert!(
            replay(&events)
                .install("pay", "1", "payment", "sha-1")
                .expect("same")
                .is_empty()
        );
        assert!(
            replay(&events)
                .install("pay", "1", "payment", "other")
                .is_err()
        );
    }
}
