//! What a load test reports: latency percentiles, errors by code, CPU per
//! order for each process on the machine, and the ledger audit; as text and
//! as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies of one kind of call, in microseconds.
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        // 1 us to one hour at three significant digits; never fails for
        // these bounds.
        Latencies(
            Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| {
                Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits are valid"))
            }),
        )
    }
}

impl Latencies {
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.0.saturating_record(micros.max(1));
    }

    pub fn summary(&self) -> LatencySummary {
        let ms = |micros: u64| micros as f64 / 1000.0;
        LatencySummary {
            count: self.0.len(),
            p50_ms: ms(self.0.value_at_quantile(0.50)),
            p95_ms: ms(self.0.value_at_quantile(0.95)),
            p99_ms: ms(self.0.value_at_quantile(0.99)),
            max_ms: ms(self.0.max()),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// CPU seconds used so far by the processes of each group on this machine.
#[derive(Debug, Clone, Default)]
pub struct CpuSample(BTreeMap<&'static str, f64>);

/// The groups CPU is reported for, by process name (`/proc/<pid>/comm`).
/// `loadtest` is this process (the provider stub included); `kernel` every
/// other `commerce-kernel` process.
pub const CPU_GROUPS: [&str; 4] = ["kernel", "postgres", "redis", "loadtest"];

impl CpuSample {
    /// Reads `/proc`: user and system time of every process in a group,
    /// plus the time of its children that have ended (a Postgres backend
    /// that exited is counted in the postmaster's). `None` where `/proc`
    /// cannot be read (not Linux).
    pub fn now() -> Option<CpuSample> {
        let me = std::process::id();
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if ticks <= 0 {
            return None;
        }
        let mut sample = CpuSample::default();
        for group in CPU_GROUPS {
            sample.0.insert(group, 0.0);
        }
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some((name, ticks_used)) = parse_stat(&stat) else {
                continue;
            };
            let group = if pid == me {
                "loadtest"
            } else if name == "commerce-kernel" {
                "kernel"
            } else if name == "postgres" || name == "postmaster" {
                "postgres"
            } else if name.starts_with("redis-server") {
                "redis"
            } else {
                continue;
            };
            *sample.0.entry(group).or_default() += ticks_used as f64 / ticks as f64;
        }
        Some(sample)
    }

    /// CPU seconds per group between `earlier` and this sample.
    pub fn since(&self, earlier: &CpuSample) -> BTreeMap<&'static str, f64> {
        self.0
            .iter()
            .map(|(group, seconds)| {
                let before = earlier.0.get(group).copied().unwrap_or(0.0);
                (*group, (seconds - before).max(0.0))
            })
            .collect()
    }
}

/// `(comm, utime + stime + cutime + cstime)` from a `/proc/<pid>/stat` line.
fn parse_stat(stat: &str) -> Option<(&str, u64)> {
    // The name is in parentheses and may itself hold spaces or ')'.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?;
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // After the name: state is field 3 of the line, utime field 14, so
    // utime..cstime are indices 11..=14 here.
    let ticks = fields
        .get(11..15)?
        .iter()
        .map(|field| field.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    Some((name, ticks))
}

/// The result of one load test run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `open` (fixed arrival rate) or `closed` (clients back to back).
    pub mode: String,
    pub clients: Option<usize>,
    pub target_rate: Option<f64>,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub lines_per_order: usize,
    pub products: usize,
    /// Orders started in the measured window.
    pub orders: u64,
    pub confirmed: u64,
    pub failed: u64,
    pub orders_per_s: f64,
    pub create_cart: LatencySummary,
    pub place_order: LatencySummary,
    /// To the CONFIRMED update on the subscription: from `placeOrder`'s
    /// start in closed loop; in open loop from the order's due time, so it
    /// includes `createCart` and any wait for the kernel to take the order.
    pub place_to_confirmed: LatencySummary,
    pub errors: BTreeMap<String, u64>,
    /// CPU milliseconds per measured order, by process group; `None` where
    /// `/proc` is not available.
    pub cpu_ms_per_order: Option<BTreeMap<String, f64>>,
    /// Orders of the whole run (warm-up included) the audit checked.
    pub audited_orders: u64,
    /// Whether the provider stub's ledger was audited.
    pub ledger_checked: bool,
    /// What the audit found wrong (empty: every order CONFIRMED, with one
    /// captured payment and one shipment when the ledger was checked).
    pub problems: Vec<String>,
    /// Count of problems beyond those listed.
    pub more_problems: u64,
}

impl Report {
    /// Orders were measured, and nothing went wrong with any of them.
    pub fn passed(&self) -> bool {
        self.orders > 0 && self.problems.is_empty() && self.errors.is_empty()
    }

    /// The report as a person reads it.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let shape = match (self.clients, self.target_rate) {
            (Some(clients), _) => format!("closed loop, {clients} clients"),
            (None, Some(rate)) => format!("open loop, {rate} orders/s offered"),
            _ => self.mode.clone(),
        };
        let _ = writeln!(
            out,
            "loadtest: {shape}, {:.0} s measured after {:.0} s warm-up, {} lines per order from {} products",
            self.duration_s, self.warmup_s, self.lines_per_order, self.products
        );
        let _ = writeln!(
            out,
            "orders: {} started, {} confirmed, {} not confirmed; {:.1} orders/s",
            self.orders, self.confirmed, self.failed, self.orders_per_s
        );
        let _ = writeln!(
            out,
            "{:<20} {:>8} {:>9} {:>9} {:>9} {:>9}",
            "latency (ms)", "count", "p50", "p95", "p99", "max"
        );
        for (name, summary) in [
            ("createCart", &self.create_cart),
            ("placeOrder", &self.place_order),
            (
                if self.mode == "open" {
                    "due->CONFIRMED"
                } else {
                    "place->CONFIRMED"
                },
                &self.place_to_confirmed,
            ),
        ] {
            let _ = writeln!(
                out,
                "  {:<18} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                name, summary.count, summary.p50_ms, summary.p95_ms, summary.p99_ms, summary.max_ms
            );
        }
        if self.errors.is_empty() {
            let _ = writeln!(out, "errors: none");
        } else {
            let listed: Vec<String> = self
                .errors
                .iter()
                .map(|(code, count)| format!("{code} {count}"))
                .collect();
            let _ = writeln!(out, "errors: {}", listed.join(", "));
        }
        match &self.cpu_ms_per_order {
            Some(cpu) => {
                let listed: Vec<String> = cpu
                    .iter()
                    .map(|(group, ms)| format!("{group} {ms:.2}"))
                    .collect();
                let _ = writeln!(out, "CPU ms per order: {}", listed.join(", "));
            }
            None => {
                let _ = writeln!(out, "CPU ms per order: not available (no /proc)");
            }
        }
        let ledger = if self.ledger_checked {
            "status and provider ledger"
        } else {
            "status only (no provider stub)"
        };
        if self.problems.is_empty() {
            let _ = writeln!(
                out,
                "audit ({ledger}): {} orders, all CONFIRMED{}",
                self.audited_orders,
                if self.ledger_checked {
                    ", each with one captured payment and one shipment"
                } else {
                    ""
                }
            );
        } else {
            let _ = writeln!(
                out,
                "audit ({ledger}): {} problems in {} orders",
                self.problems.len() as u64 + self.more_problems,
                self.audited_orders
            );
            for problem in &self.problems {
                let _ = writeln!(out, "  {problem}");
            }
            if self.more_problems > 0 {
                let _ = writeln!(out, "  … and {} more", self.more_problems);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_names_parse() {
        let line = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 2 1 20 0 1 0 5 0 0";
        assert_eq!(parse_stat(line), Some(("a b) c", 13)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_counted_as_the_load_generator() {
        let Some(sample) = CpuSample::now() else {
            return;
        };
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(200) {
            std::hint::black_box(spin.elapsed());
        }
        let later = CpuSample::now().expect("/proc stays readable");
        let used = later.since(&sample);
        assert!(used["loadtest"] >= 0.1, "{used:?}");
    }
}
