//! Per-plugin counters: invocations, errors by kind, time spent, fuel used.
//! They count by plugin name across versions, so a hot swap does not reset them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::ErrorKind;

/// Counters of one plugin name, updated by every invocation.
#[derive(Debug, Default)]
pub struct PluginStats {
    invocations: AtomicU64,
    errors: [AtomicU64; ErrorKind::ALL.len()],
    duration_micros: AtomicU64,
    fuel_consumed: AtomicU64,
}

/// A consistent-enough copy of [`PluginStats`] for reading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub invocations: u64,
    /// Non-zero error counts, by kind.
    pub errors: Vec<(ErrorKind, u64)>,
    /// Wall-clock time spent in invocations, summed.
    pub total_duration: Duration,
    /// Fuel (wasm instructions) consumed, summed.
    pub fuel_consumed: u64,
}

impl PluginStats {
    pub(crate) fn record(&self, duration: Duration, fuel: u64, error: Option<ErrorKind>) {
        self.invocations.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        self.duration_micros.fetch_add(micros, Ordering::Relaxed);
        self.fuel_consumed.fetch_add(fuel, Ordering::Relaxed);
        if let Some(kind) = error {
            let index = ErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
            self.errors[index].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            invocations: self.invocations.load(Ordering::Relaxed),
            errors: ErrorKind::ALL
                .iter()
                .zip(&self.errors)
                .map(|(kind, count)| (*kind, count.load(Ordering::Relaxed)))
                .filter(|(_, count)| *count > 0)
                .collect(),
            total_duration: Duration::from_micros(self.duration_micros.load(Ordering::Relaxed)),
            fuel_consumed: self.fuel_consumed.load(Ordering::Relaxed),
        }
    }
}
