//! The plugin host's two error types: [`LoadError`] when a plugin cannot be
//! installed or activated, [`PluginError`] when an invocation does not
//! produce a result.

use std::fmt;

/// Why a plugin version could not be installed, loaded or activated. The
/// version that was active stays active.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("invalid manifest: {reason}")]
    InvalidManifest { reason: String },
    #[error("{label}: the component's sha256 is {actual}, but the manifest pins {expected}")]
    HashMismatch {
        label: String,
        expected: String,
        actual: String,
    },
    #[error("{label}: not a valid WebAssembly component: {reason}")]
    InvalidComponent { label: String, reason: String },
    #[error("{label}: does not implement the {kind} contract: {reason}")]
    WrongWorld {
        label: String,
        kind: String,
        reason: String,
    },
    #[error("{label}: imports {import}, which {reason}")]
    UngrantedImport {
        label: String,
        import: String,
        reason: String,
    },
    #[error(
        "{label}: config value {key} refers to the environment variable {variable}, which is not set"
    )]
    MissingSecret {
        label: String,
        key: String,
        variable: String,
    },
    #[error("{label} is already installed with a different component or manifest")]
    AlreadyInstalled { label: String },
    #[error("no installed plugin {name} has version {version}")]
    NotInstalled { name: String, version: String },
    #[error("plugin directory {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the plugin engine could not be configured: {reason}")]
    Engine { reason: String },
}

/// Why an invocation did not return the plugin's answer. The kernel never
/// crashes or hangs because of a plugin: every way a plugin can misbehave
/// ends in one of these, within the plugin's deadline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    /// No plugin of that name is active.
    #[error("no plugin named {name} is active")]
    NotActive { name: String },
    /// The active plugin of that name implements another contract.
    #[error("plugin {name} is a {actual} plugin, not a {expected} one")]
    WrongKind {
        name: String,
        expected: String,
        actual: String,
    },
    /// The plugin ran and answered with a failure of its own.
    #[error("{plugin}: {failure}")]
    Failed { plugin: String, failure: Failure },
    /// It executed more instructions than its fuel allows.
    #[error("{plugin}: ran out of fuel ({fuel} instructions)")]
    FuelExhausted { plugin: String, fuel: u64 },
    /// It did not finish within its wall-clock deadline.
    #[error("{plugin}: did not finish within {timeout_ms} ms")]
    DeadlineExceeded { plugin: String, timeout_ms: u64 },
    /// It tried to grow its memory past its limit.
    #[error("{plugin}: tried to use more than {memory_bytes} bytes of memory")]
    MemoryExceeded { plugin: String, memory_bytes: u64 },
    /// It trapped (a panic, `unreachable`, an out-of-bounds access, ...).
    #[error("{plugin}: trapped: {message}")]
    Trapped { plugin: String, message: String },
    /// It answered, but not in the shape the contract asks for.
    #[error("{plugin}: returned an invalid answer: {message}")]
    InvalidOutput { plugin: String, message: String },
    /// The host could not run it (instantiation failed, host function error).
    #[error("{plugin}: could not be run: {message}")]
    Host { plugin: String, message: String },
    /// The plugin's contract version has no such call (`lookup` before 0.2).
    /// Nothing ran.
    #[error("{plugin}: implements commerce:plugin@{contract}, which has no {call}")]
    Unsupported {
        plugin: String,
        call: &'static str,
        contract: &'static str,
    },
}

impl PluginError {
    /// A short, stable label for metrics and logs: `permanent`, `transient`,
    /// `fuel`, `deadline`, `memory`, `trap`, `invalid_output`, `host`,
    /// `not_active`, `wrong_kind`, `unsupported`.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PluginError::NotActive { .. } => ErrorKind::NotActive,
            PluginError::WrongKind { .. } => ErrorKind::WrongKind,
            PluginError::Failed { failure, .. } if failure.permanent => ErrorKind::Permanent,
            PluginError::Failed { .. } => ErrorKind::Transient,
            PluginError::FuelExhausted { .. } => ErrorKind::Fuel,
            PluginError::DeadlineExceeded { .. } => ErrorKind::Deadline,
            PluginError::MemoryExceeded { .. } => ErrorKind::Memory,
            PluginError::Trapped { .. } => ErrorKind::Trap,
            PluginError::InvalidOutput { .. } => ErrorKind::InvalidOutput,
            PluginError::Host { .. } => ErrorKind::Host,
            PluginError::Unsupported { .. } => ErrorKind::Unsupported,
        }
    }

    /// Whether calling again with the same input and idempotency key may
    /// succeed: transient failures, missed deadlines and host trouble.
    /// Everything else (a decline, a trap, a runaway plugin) fails again.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind(),
            ErrorKind::Transient | ErrorKind::Deadline | ErrorKind::Host
        )
    }
}

/// The label of a [`PluginError`], as counted per plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    NotActive,
    WrongKind,
    Permanent,
    Transient,
    Fuel,
    Deadline,
    Memory,
    Trap,
    InvalidOutput,
    Host,
    Unsupported,
}

impl ErrorKind {
    /// Every kind, in the order metrics list them.
    pub const ALL: [ErrorKind; 11] = [
        ErrorKind::NotActive,
        ErrorKind::WrongKind,
        ErrorKind::Permanent,
        ErrorKind::Transient,
        ErrorKind::Fuel,
        ErrorKind::Deadline,
        ErrorKind::Memory,
        ErrorKind::Trap,
        ErrorKind::InvalidOutput,
        ErrorKind::Host,
        ErrorKind::Unsupported,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotActive => "not_active",
            ErrorKind::WrongKind => "wrong_kind",
            ErrorKind::Permanent => "permanent",
            ErrorKind::Transient => "transient",
            ErrorKind::Fuel => "fuel",
            ErrorKind::Deadline => "deadline",
            ErrorKind::Memory => "memory",
            ErrorKind::Trap => "trap",
            ErrorKind::InvalidOutput => "invalid_output",
            ErrorKind::Host => "host",
            ErrorKind::Unsupported => "unsupported",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure the plugin reported itself (the WIT `failure` variant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// `permanent` (a decline; never retried) or `transient` (retried).
    pub permanent: bool,
    /// Machine-readable, such as `card_declined`.
    pub code: String,
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.permanent {
            "permanent"
        } else {
            "transient"
        };
        write!(f, "{kind} failure {}: {}", self.code, self.message)
    }
}

impl From<crate::bindings::Failure> for Failure {
    fn from(failure: crate::bindings::Failure) -> Self {
        match failure {
            crate::bindings::Failure::Permanent(detail) => Failure {
                permanent: true,
                code: detail.code,
                message: detail.message,
            },
            crate::bindings::Failure::Transient(detail) => Failure {
                permanent: false,
                code: detail.code,
                message: detail.message,
            },
        }
    }
}
