//! A plugin's manifest, `plugin.toml`: what it is, which component file it
//! runs (pinned by sha256), what it may use and how much.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::LoadError;

/// The file name of a manifest inside a plugin version's directory.
pub const MANIFEST_FILE: &str = "plugin.toml";

/// The most any manifest may ask for. The engine's pooling allocator
/// reserves memory for this size, so it is a hard ceiling, not a default.
pub const MAX_MEMORY_BYTES: u64 = 256 << 20;
/// The longest wall-clock deadline a manifest may set.
pub const MAX_TIMEOUT_MS: u64 = 60_000;
/// The largest fuel budget a manifest may set (about ten seconds of work).
pub const MAX_FUEL: u64 = 10_000_000_000;

/// Which contract a plugin implements, and so which world it must target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum PluginKind {
    /// `payment-plugin`: authorize, charge, capture, refund, cancel.
    Payment,
    /// `shipping-plugin`: quote, create and cancel shipments.
    Shipping,
    /// `saga-step-plugin` (or `-with-host`): a custom step of the order saga.
    SagaStep,
}

impl PluginKind {
    /// The name used in manifests and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Payment => "payment",
            PluginKind::Shipping => "shipping",
            PluginKind::SagaStep => "saga-step",
        }
    }

    /// The interface the component must export.
    pub fn exported_interface(self) -> &'static str {
        match self {
            PluginKind::Payment => "commerce:plugin/payment-provider",
            PluginKind::Shipping => "commerce:plugin/shipping-provider",
            PluginKind::SagaStep => "commerce:plugin/saga-step",
        }
    }

    /// Whether the plugin gets the sandboxed WASI runtime when its manifest
    /// says nothing: adapters are usually written against std, steps need not be.
    fn wasi_by_default(self) -> bool {
        !matches!(self, PluginKind::SagaStep)
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Resource limits for one invocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Instructions (wasmtime fuel) one call may execute.
    #[serde(default = "Limits::default_fuel")]
    pub fuel: u64,
    /// Wall-clock deadline of one call, including the provider's answer.
    #[serde(default = "Limits::default_timeout_ms")]
    pub timeout_ms: u64,
    /// Linear memory one instance may grow to.
    #[serde(default = "Limits::default_memory_bytes")]
    pub memory_bytes: u64,
}

impl Limits {
    fn default_fuel() -> u64 {
        100_000_000
    }

    fn default_timeout_ms() -> u64 {
        5_000
    }

    fn default_memory_bytes() -> u64 {
        32 << 20
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel: Limits::default_fuel(),
            timeout_ms: Limits::default_timeout_ms(),
            memory_bytes: Limits::default_memory_bytes(),
        }
    }
}

/// A parsed and validated `plugin.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginManifest {
    /// `[a-z0-9-]`, 1 to 64 characters; the name the saga and the API use.
    pub name: String,
    /// The plugin's version, 1 to 64 characters of `[0-9A-Za-z.+-]`.
    pub version: String,
    pub kind: PluginKind,
    /// The component's file name, next to the manifest.
    pub component: String,
    /// The component's SHA-256, lowercase hex: a component that does not
    /// match is refused.
    pub sha256: String,
    /// Hosts the plugin may reach over `wasi:http`: `host`, `host:port` or
    /// `*.domain`. Empty: no outbound HTTP at all.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Whether the plugin gets the sandboxed WASI runtime that Rust's std
    /// needs (clocks, random, exit, stdio into the log; no files, no sockets).
    /// Defaults to true for adapters and false for saga steps.
    #[serde(default)]
    pub wasi: Option<bool>,
    #[serde(default)]
    pub limits: Limits,
    /// What `config.get` returns. A value `env:NAME` is read from the
    /// kernel's environment when the plugin is loaded, so secrets stay out
    /// of the file.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

impl PluginManifest {
    /// Parses and validates a manifest's text.
    pub fn parse(text: &str) -> Result<PluginManifest, LoadError> {
        let manifest: PluginManifest =
            toml::from_str(text).map_err(|error| LoadError::InvalidManifest {
                reason: error.to_string(),
            })?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Whether the sandboxed WASI runtime is granted.
    pub fn grants_wasi(&self) -> bool {
        self.wasi.unwrap_or(self.kind.wasi_by_default()) || self.grants_http()
    }

    /// Whether outbound HTTP is granted (to `allowed_hosts` only).
    pub fn grants_http(&self) -> bool {
        !self.allowed_hosts.is_empty()
    }

    /// `name@version`, as logs and errors show a plugin.
    pub fn label(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    fn validate(&self) -> Result<(), LoadError> {
        let invalid = |reason: String| Err(LoadError::InvalidManifest { reason });
        if !valid_name(&self.name) {
            return invalid(format!(
                "name {:?} must be 1 to 64 characters of a-z, 0-9 and -",
                self.name
            ));
        }
        if !valid_version(&self.version) {
            return invalid(format!(
                "version {:?} must be 1 to 64 characters of 0-9, A-Z, a-z, '.', '+' and '-' (not starting with '.')",
                self.version
            ));
        }
        if self.component.is_empty()
            || self.component.len() > 128
            || self.component.starts_with('.')
            || self.component.contains(['/', '\\'])
        {
            return invalid(format!(
                "component {:?} must be a plain file name next to the manifest",
                self.component
            ));
        }
        if self.sha256.len() != 64
            || !self
                .sha256
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return invalid("sha256 must be 64 lowercase hex digits".to_string());
        }
        if self.limits.fuel == 0 || self.limits.fuel > MAX_FUEL {
            return invalid(format!("limits.fuel must be between 1 and {MAX_FUEL}"));
        }
        if self.limits.timeout_ms == 0 || self.limits.timeout_ms > MAX_TIMEOUT_MS {
            return invalid(format!(
                "limits.timeout_ms must be between 1 and {MAX_TIMEOUT_MS}"
            ));
        }
        if self.limits.memory_bytes < 65_536 || self.limits.memory_bytes > MAX_MEMORY_BYTES {
            return invalid(format!(
                "limits.memory_bytes must be between 65536 and {MAX_MEMORY_BYTES}"
            ));
        }
        if self.wasi == Some(false) && self.grants_http() {
            return invalid("allowed_hosts needs wasi; remove `wasi = false`".to_string());
        }
        for host in &self.allowed_hosts {
            if HostPattern::parse(host).is_none() {
                return invalid(format!(
                    "allowed_hosts entry {host:?} must be `host`, `host:port` or `*.domain`"
                ));
            }
        }
        for key in self.config.keys() {
            if key.is_empty() || key.len() > 128 {
                return invalid(format!("config key {key:?} must be 1 to 128 characters"));
            }
        }
        Ok(())
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'))
        && !name.starts_with('-')
}

fn valid_version(version: &str) -> bool {
    (1..=64).contains(&version.len())
        && !version.starts_with('.')
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-'))
}

/// One `allowed_hosts` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HostPattern {
    /// Lowercase host, or the domain a `*.` pattern covers (without the dot).
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

impl HostPattern {
    pub(crate) fn parse(entry: &str) -> Option<HostPattern> {
        let entry = entry.trim().to_ascii_lowercase();
        let (host, port) = match entry.rsplit_once(':') {
            Some((host, port)) => (host.to_string(), Some(port.parse::<u16>().ok()?)),
            None => (entry.clone(), None),
        };
        let (host, wildcard) = match host.strip_prefix("*.") {
            Some(domain) => (domain.to_string(), true),
            None => (host, false),
        };
        let valid_host = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
        valid_host.then_some(HostPattern {
            host,
            wildcard,
            port,
        })
    }

    /// Whether a request to `host:port` is allowed by this entry.
    pub(crate) fn allows(&self, host: &str, port: u16) -> bool {
        let host = host.to_ascii_lowercase();
        let host_matches = if self.wildcard {
            host.strip_suffix(&self.host)
                .is_some_and(|prefix| prefix.ends_with('.'))
        } else {
            host == self.host
        };
        host_matches && self.port.is_none_or(|allowed| allowed == port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"
        name = "payment-http"
        version = "1.2.0"
        kind = "payment"
        component = "payment_http.wasm"
        sha256 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
        allowed_hosts = ["127.0.0.1:8080", "*.example.com"]
        [limits]
        timeout_ms = 2000
        [config]
        base_url = "http://127.0.0.1:8080"
    "#;

    #[test]
    fn a_valid_manifest_parses_with_defaults_filled_in() {
        let manifest = PluginManifest::parse(VALID).expect("valid");
        assert_eq!(manifest.kind, PluginKind::Payment);
        assert_eq!(manifest.limits.timeout_ms, 2000);
        assert_eq!(manifest.limits.fuel, Limits::default().fuel);
        assert!(manifest.grants_http());
        assert!(manifest.grants_wasi());
        assert_eq!(manifest.label(), "payment-http@1.2.0");
    }

    #[test]
    fn invalid_manifests_are_refused_with_the_reason() {
        let cases = [
            (VALID.replace("payment-http\"", "Payment HTTP\""), "name"),
            (VALID.replace("1.2.0", "../1"), "version"),
            (
                VALID.replace("payment_http.wasm", "../evil.wasm"),
                "component",
            ),
            (VALID.replace("0123456789abcdef0123", "0123"), "sha256"),
            (
                VALID.replace("timeout_ms = 2000", "timeout_ms = 0"),
                "timeout_ms",
            ),
            (
                VALID.replace("timeout_ms = 2000", "memory_bytes = 1099511627776"),
                "memory_bytes",
            ),
            (
                VALID.replace("\"*.example.com\"", "\"http://x\""),
                "allowed_hosts",
            ),
            (
                VALID.replace("kind = \"payment\"", "kind = \"teleport\""),
                "kind",
            ),
            (
                VALID.replace("[limits]", "surprise = 1\n[limits]"),
                "surprise",
            ),
        ];
        for (text, expected) in cases {
            match PluginManifest::parse(&text) {
                Err(LoadError::InvalidManifest { reason }) => {
                    assert!(reason.contains(expected), "{expected}: {reason}")
                }
                other => panic!("{expected}: expected a refusal, got {other:?}"),
            }
        }
    }

    #[test]
    fn host_patterns_match_exactly_what_they_name() {
        let exact = HostPattern::parse("127.0.0.1:8080").expect("valid");
        assert!(exact.allows("127.0.0.1", 8080));
        assert!(!exact.allows("127.0.0.1", 8081));
        assert!(!exact.allows("127.0.0.2", 8080));
        let any_port = HostPattern::parse("API.Example.com").expect("valid");
        assert!(any_port.allows("api.example.com", 443));
        assert!(!any_port.allows("evil-api.example.com", 443));
        let wildcard = HostPattern::parse("*.example.com").expect("valid");
        assert!(wildcard.allows("pay.example.com", 443));
        assert!(!wildcard.allows("example.com", 443));
        assert!(!wildcard.allows("payexample.com", 443));
        assert!(HostPattern::parse("*.").is_none());
        assert!(HostPattern::parse("host:99999").is_none());
    }
}
