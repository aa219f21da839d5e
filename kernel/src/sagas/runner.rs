//! The saga runner: a background task in every kernel process that claims
//! due sagas and drives each until it has to wait, ends, or is parked.
//!
//! Driving a saga is a loop: load its record, ask the domain what comes
//! next ([`Saga::next`]), do it, record the result with a write fenced by
//! the claim, repeat. Built-in steps (reserve stock, confirm) are local: the
//! step's record and the order's and inventory's events are one atomic
//! append. Plugin steps (payment, shipment, custom) call out, so their
//! start is recorded before the call and their outcome after it; a crash in
//! between leaves a started step, which is run again with the same
//! idempotency key (`<saga id>:<step>`), so the provider answers with what
//! the first call did.
//!
//! The money rules (ARCHITECTURE.md, "Sagas"):
//! - a plugin is called only while this process's lease on the saga holds
//!   for the call's whole deadline: the write that records the call's start
//!   extends it ([`LeaseChange::Hold`](super::LeaseChange::Hold)), and is refused once the lease ran
//!   out; if the call does not start right after that write, the lease is
//!   checked and extended again ([`SagaStore::hold`]). A process that lost
//!   its lease stops without calling;
//! - a step whose plugin is not active here is given back for another
//!   process ([`SagaStore::defer`]), never failed;
//! - a charge answered `authorized` is captured before the step succeeds;
//! - compensation undoes what happened and only that: a recorded outcome
//!   directly, an unknown one after asking the provider (`lookup`), or, for
//!   plugins of contract 0.1 without it, by repeating the call with its
//!   key. A step whose plugin cannot reach outside the kernel has nothing
//!   to learn. When the outcome cannot be learned the saga is parked, never
//!   taken as "no effect";
//! - a write refused for a reason retrying cannot fix parks the saga; a
//!   store failure is retried with back-off, counted.
//!
//! Losing the claim (another process took the saga over after this one's
//! lease ran out) makes the next write fail whole; the runner then drops the
//! saga without writing anything. The heartbeat renews only the sagas a
//! drive task is working on, so a saga whose task ended or panicked without
//! giving it back is taken up again once its lease lapses.

use std::any::Any;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::Utc;
use commerce_plugin_host::{self as host, LoadedPlugin, PluginError, PluginRegistry};
use futures_util::FutureExt as _;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument as _;
use uuid::Uuid;

use super::hooks::FaultHooks;
use super::stock_gate::StockGate;
use super::{Claim, Committed, SagaStore};
use crate::commerce::{CommandContext, CommandError, Commerce, OrderTransition, Sagas, ends_drive};
use crate::domain::money::{Currency, Money};
use crate::domain::order::{Order, OrderEvent, PlacedOrder};
use crate::domain::saga::{
    CompensationCause, MAX_REASON_CHARS, Next, ParkCause, Phase, Saga, SagaEvent, SagaStatus,
    StepAction, StepError, StepRetry, StepState, StepStatus,
};
use crate::domain::{DomainError, summarize};
use crate::event_store::StoreError;
use crate::event_store::repository::Loaded;
use crate::telemetry;

/// How a runner behaves; see the `COMMERCE_SAGA_*` settings.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// This process's name in leases (unique per process start).
    pub node_id: String,
    /// How long a claim holds without a heartbeat.
    pub lease: Duration,
    /// How often the runner looks for due sagas when nothing woke it.
    pub poll_interval: Duration,
    /// Most sagas this process drives at once.
    pub max_concurrent: usize,
    /// Fault points for the crash tests (empty in release builds).
    pub hooks: FaultHooks,
    /// How long a stopping runner lets its drives reach a step boundary.
    pub shutdown_grace: Duration,
}

/// Orders placed this long ago and still without a saga get one.
const ORPHAN_AGE: chrono::Duration = chrono::Duration::seconds(30);
const ORPHAN_SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// A wait shorter than this is slept through rather than given back.
const SHORT_WAIT: chrono::Duration = chrono::Duration::milliseconds(20);
/// Longest a reserve or confirm step waits for its turn on a product
/// (`StockGate`) before it goes on without it.
const STOCK_PATIENCE: Duration = Duration::from_secs(2);
/// Version conflicts in a row after which a saga is given back for later.
const MAX_CONFLICTS: u32 = 40;
/// The wait after a version conflict, doubled per conflict in a row.
const CONFLICT_BACKOFF: Duration = Duration::from_millis(2);
const CONFLICT_BACKOFF_CAP: Duration = Duration::from_millis(100);
/// Store failures in a row a drive retries in place before it gives the
/// saga back for later.
const MAX_WRITE_RETRIES: u32 = 5;
/// Store failures in a row for which the outcome of a call is written
/// again in place (up to about 40 s in all) before the saga is given back.
const MAX_OUTCOME_WRITE_RETRIES: u32 = 12;
/// The wait after a failed saga write, doubled per failure in a row.
const WRITE_BACKOFF: Duration = Duration::from_millis(100);
const WRITE_BACKOFF_CAP: Duration = Duration::from_secs(5);
/// The wait before a deferred saga is due again, doubled per deferral in a row.
const DEFERRAL_BACKOFF: Duration = Duration::from_millis(250);
const DEFERRAL_BACKOFF_CAP: Duration = Duration::from_secs(30);
/// Deferrals in a row after which a compensation is parked: about two
/// minutes in which no process that took the saga had the step's plugin.
/// (Going forward, the saga's deadline ends the waiting instead.)
const MAX_COMPENSATION_DEFERRALS: u32 = 10;
/// Most sagas still mid-step a stopping runner names to keep their leases
/// (the store's limit); with more, it gives none back.
const MAX_KEPT_ON_STOP: usize = 200;
/// Panics in a row of a saga's drives on one process after which it is parked.
const MAX_PANICS: u32 = 3;
/// Sagas whose panics a process remembers before it starts afresh.
const MAX_PANIC_RECORDS: usize = 10_000;
/// How long a process leaves a saga it gave back (for want of a plugin) to
/// the other processes before it claims it again itself.
const PASS_OVER: Duration = Duration::from_secs(5);
/// A plugin is called only while the lease holds for the call's deadline
/// and this much more.
const CALL_LEASE_MARGIN: Duration = Duration::from_secs(2);

/// What a step's attempt came to.
type Attempt = Result<Value, StepError>;

/// Where driving a saga stands after one action.
enum Flow {
    Continue,
    /// The claim is gone or the saga must wait: stop driving it.
    Stop,
}

/// A compensation attempt that did not undo its step.
struct UndoFailure {
    error: StepError,
    /// Whether what the forward call did is still unknown (it could not be
    /// looked up), as opposed to known and not undone.
    outcome_unknown: bool,
    /// The next attempt must not come before this.
    not_before: Option<chrono::DateTime<Utc>>,
}

/// What this process's runner counts, for `/metrics`.
#[derive(Debug, Default)]
pub struct RunnerMetrics {
    /// Saga writes retried after the store failed.
    pub write_retries: AtomicU64,
    /// Saga writes retried after another write to one of their streams got
    /// there first (a request, another order's stock).
    pub conflict_retries: AtomicU64,
    /// Sagas given back because a step's plugin was not active here.
    pub deferrals: AtomicU64,
    /// Drives stopped because another process holds the saga now.
    pub leases_lost: AtomicU64,
    /// Drive tasks that panicked (their saga's lease was left to lapse).
    pub panics: AtomicU64,
    /// Reserve or confirm steps that stopped waiting for their turn on a
    /// product (`StockGate`) and went on without it: a write on that
    /// product took longer than `STOCK_PATIENCE`.
    pub stock_turns_skipped: AtomicU64,
    /// Sagas this process parked, by [`ParkCause::ALL`] index.
    parked: [AtomicU64; ParkCause::ALL.len()],
}

impl RunnerMetrics {
    /// Sagas this process parked, by cause.
    pub fn parked(&self) -> Vec<(ParkCause, u64)> {
        ParkCause::ALL
            .iter()
            .zip(&self.parked)
            .map(|(cause, count)| (*cause, count.load(Ordering::Relaxed)))
            .collect()
    }

    fn count_park(&self, cause: ParkCause) {
        if let Some(index) = ParkCause::ALL.iter().position(|c| *c == cause) {
            self.parked[index].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The sagas this process is driving right now, with their claims: the
/// heartbeat renews these and no others.
///
/// Between two steps a drive also keeps the saga as its own last write left
/// it, so the next step starts without reading the saga's stream. That is
/// safe because every step begins with a write fenced by the claim and
/// checked against the saga's version: a request that arrived meanwhile
/// (cancel, retry: appended without the lease) makes that write a version
/// conflict, and the drive forgets what it kept and reads the stream
/// again. A step that only gives the saga back (nothing due) hands over the
/// version it saw, and the store makes the saga due at once if the stream
/// moved past it. What a drive keeps ends with the drive.
///
/// It keeps the order the same way, as the drive's own last write left it
/// (reserved, paid, shipped), so the steps after the first read no order
/// stream either. Every write of the order's events carries that version,
/// so an order moved by anyone else (an admin's transition, say) turns the
/// write into a conflict, after which the order is read again. What a call
/// sends a provider (lines, total, address) never changes once placed.
#[derive(Debug, Default)]
struct Driving(Mutex<HashMap<Uuid, Drive>>);

#[derive(Debug)]
struct Drive {
    fencing_token: i64,
    /// The saga as this drive's last write left it.
    kept: Option<Loaded<Saga>>,
    /// The order as this drive's last write left it (or as last read).
    order: Option<Loaded<Order>>,
}

impl Driving {
    /// Registers a drive; dropping the guard ends it, however the task ends.
    fn enter(self: &Arc<Self>, claim: Claim) -> DrivingGuard {
        self.lock().insert(
            claim.saga_id,
            Drive {
                fencing_token: claim.fencing_token,
                kept: None,
                order: None,
            },
        );
        DrivingGuard {
            driving: Arc::clone(self),
            claim,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Drive>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sagas(&self) -> Vec<Uuid> {
        self.lock().keys().copied().collect()
    }

    /// The saga `claim`'s drive kept, if any (taken: whoever goes on with
    /// it keeps the state its write leaves).
    fn take_kept(&self, claim: Claim) -> Option<Loaded<Saga>> {
        self.lock()
            .get_mut(&claim.saga_id)
            .filter(|drive| drive.fencing_token == claim.fencing_token)
            .and_then(|drive| drive.kept.take())
    }

    /// Keeps `saga` for `claim`'s next step (nothing if the drive ended).
    fn keep(&self, claim: Claim, saga: Loaded<Saga>) {
        if let Some(drive) = self
            .lock()
            .get_mut(&claim.saga_id)
            .filter(|drive| drive.fencing_token == claim.fencing_token)
        {
            drive.kept = Some(saga);
        }
    }

    /// The order `claim`'s drive kept, if any (taken, like the saga).
    fn take_order(&self, claim: Claim) -> Option<Loaded<Order>> {
        self.lock()
            .get_mut(&claim.saga_id)
            .filter(|drive| drive.fencing_token == claim.fencing_token)
            .and_then(|drive| drive.order.take())
    }

    /// Keeps `order` for `claim`'s next step (nothing if the drive ended).
    fn keep_order(&self, claim: Claim, order: Loaded<Order>) {
        if let Some(drive) = self
            .lock()
            .get_mut(&claim.saga_id)
            .filter(|drive| drive.fencing_token == claim.fencing_token)
        {
            drive.order = Some(order);
        }
    }

    /// Drops what `claim`'s drive kept: the next step reads the streams.
    fn forget(&self, claim: Claim) {
        let _ = self.take_kept(claim);
        let _ = self.take_order(claim);
    }
}

struct DrivingGuard {
    driving: Arc<Driving>,
    claim: Claim,
}

impl Drop for DrivingGuard {
    fn drop(&mut self) {
        let mut sagas = self.driving.lock();
        if sagas
            .get(&self.claim.saga_id)
            .is_some_and(|drive| drive.fencing_token == self.claim.fencing_token)
        {
            sagas.remove(&self.claim.saga_id);
        }
    }
}

/// How a failed drive step is handled.
enum WriteFailure {
    /// Another write got there first: reload and decide again.
    Conflict,
    /// The store failed: retry after a back-off.
    Transient,
    /// Refused for a reason retrying cannot fix: park the saga.
    Refused,
}

fn classify(error: &CommandError) -> WriteFailure {
    match error {
        CommandError::VersionConflict { .. } => WriteFailure::Conflict,
        CommandError::Store(StoreError::Database(error)) if refused_for_good(error) => {
            WriteFailure::Refused
        }
        CommandError::Store(StoreError::Database(_)) | CommandError::CartStore(_) => {
            WriteFailure::Transient
        }
        CommandError::Domain(_) | CommandError::Store(_) | CommandError::Plugin(_) => {
            WriteFailure::Refused
        }
    }
}

/// Whether the database refused a statement for what it holds (a
/// constraint, data it cannot store: Postgres's SQLSTATE class 22), which
/// the same statement meets again, as opposed to a lost connection, a
/// timeout or a busy database.
fn refused_for_good(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(error) => {
            !matches!(error.kind(), sqlx::error::ErrorKind::Other)
                || error.code().is_some_and(|code| code.starts_with("22"))
        }
        _ => false,
    }
}

/// The retries in place of a saga write: a version conflict reloads and
/// decides again, a store failure tries again, each after a growing,
/// jittered wait and counted; anything else is not retried here.
struct WriteRetry {
    conflicts: u32,
    failures: u32,
    max_failures: u32,
}

impl WriteRetry {
    fn new(max_failures: u32) -> Self {
        WriteRetry {
            conflicts: 0,
            failures: 0,
            max_failures,
        }
    }

    /// Waits before the next try of a write that failed with `error` and
    /// returns `true`; `false` (at once) when it must not be tried again
    /// here: refused, or out of tries.
    async fn wait(&mut self, metrics: &RunnerMetrics, saga_id: Uuid, error: &CommandError) -> bool {
        match classify(error) {
            WriteFailure::Conflict if self.conflicts < MAX_CONFLICTS => {
                // A request, or another order's stock write, got there
                // first: reload and decide again.
                self.conflicts += 1;
                metrics.conflict_retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(conflict_backoff(self.conflicts)).await;
                true
            }
            WriteFailure::Transient if self.failures < self.max_failures => {
                self.failures += 1;
                metrics.write_retries.fetch_add(1, Ordering::Relaxed);
                let wait = write_backoff(self.failures);
                tracing::warn!(%saga_id, failures = self.failures, wait_ms = wait.as_millis() as u64, %error, "saga write failed; retrying");
                tokio::time::sleep(wait).await;
                true
            }
            _ => false,
        }
    }
}

pub struct SagaRunner {
    sagas: Sagas,
    registry: Arc<PluginRegistry>,
    settings: RunnerSettings,
    context: CommandContext,
    driving: Arc<Driving>,
    /// Sagas this process gave back because it lacks their step's plugin,
    /// and until when it leaves them to other processes.
    passed_over: Mutex<HashMap<Uuid, Instant>>,
    /// Panics in a row of the drives of each saga (this process only).
    panics: Mutex<HashMap<Uuid, u32>>,
    /// Set when the runner stops: drives end at their next step boundary.
    stopping: AtomicBool,
    metrics: Arc<RunnerMetrics>,
    /// Where finished sagas' durations go (`commerce_saga_duration_seconds`).
    kernel_metrics: Arc<crate::metrics::Metrics>,
    /// Keeps this process's reserve and confirm steps on one product from
    /// racing each other for its stock stream.
    stock_gate: StockGate,
}

impl SagaRunner {
    pub fn new(sagas: Sagas, registry: Arc<PluginRegistry>, settings: RunnerSettings) -> Self {
        let context = CommandContext {
            actor: Some(format!("saga-runner:{}", settings.node_id)),
            correlation_id: None,
        };
        SagaRunner {
            sagas,
            registry,
            settings,
            context,
            driving: Arc::default(),
            passed_over: Mutex::default(),
            panics: Mutex::default(),
            stopping: AtomicBool::new(false),
            metrics: Arc::default(),
            kernel_metrics: Arc::default(),
            stock_gate: StockGate::default(),
        }
    }

    /// Records finished sagas' durations in `metrics` and counts into
    /// `counters` (by default the runner's own, which nothing reads).
    pub fn with_metrics(
        mut self,
        metrics: Arc<crate::metrics::Metrics>,
        counters: Arc<RunnerMetrics>,
    ) -> Self {
        self.kernel_metrics = metrics;
        self.metrics = counters;
        self
    }

    /// The sagas to pass over when claiming now.
    fn passed_over(&self) -> Vec<Uuid> {
        let now = Instant::now();
        let mut passed = self
            .passed_over
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        passed.retain(|_, until| *until > now);
        passed.keys().copied().collect()
    }

    /// The runner's counters.
    pub fn metrics(&self) -> Arc<RunnerMetrics> {
        Arc::clone(&self.metrics)
    }

    fn commerce(&self) -> &Commerce {
        self.sagas.commerce()
    }

    fn store(&self) -> &Arc<dyn SagaStore> {
        self.sagas.store()
    }

    /// Claims and drives sagas until `stop` turns true; then gives back
    /// every saga it holds so another process can go on at once.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let store = Arc::clone(self.store());
        let permits = Arc::new(Semaphore::new(self.settings.max_concurrent.max(1)));
        let mut drives = JoinSet::new();
        let heartbeat = tokio::spawn(Arc::clone(&self).heartbeat());
        let sweeper = tokio::spawn(Arc::clone(&self).sweep_orphans());
        let wake = Arc::clone(self.sagas.wake());
        loop {
            while drives.try_join_next().is_some() {}
            let free = permits.available_permits();
            let mut claimed_all = false;
            if free > 0 {
                let skip = self.passed_over();
                match store
                    .claim(
                        &self.settings.node_id,
                        self.settings.lease,
                        free as u32,
                        &skip,
                    )
                    .await
                {
                    Ok(claims) => {
                        claimed_all = claims.len() == free;
                        for claim in claims {
                            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                                break;
                            };
                            let guard = self.driving.enter(claim);
                            let runner = Arc::clone(&self);
                            let span = drive_span(&claim);
                            drives.spawn(
                                async move {
                                    let driven =
                                        AssertUnwindSafe(runner.drive(claim)).catch_unwind();
                                    match driven.await {
                                        Ok(()) => runner.forget_panics(claim.saga_id),
                                        Err(panic) => {
                                            runner.after_panic(claim, panic_message(panic)).await;
                                        }
                                    }
                                    drop(guard);
                                    drop(permit);
                                }
                                .instrument(span),
                            );
                        }
                    }
                    Err(error) => tracing::warn!(%error, "could not claim sagas"),
                }
            }
            if claimed_all {
                // There may be more due: look again once a slot frees up.
                tokio::select! {
                    _ = drives.join_next() => {}
                    _ = stop.changed() => break,
                }
                continue;
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(self.settings.poll_interval) => {}
                _ = stop.changed() => break,
            }
            if *stop.borrow() {
                break;
            }
        }
        // Drives stop at their next step boundary and give their saga back;
        // a plugin call in flight ends within its deadline. Those still
        // mid-step after the grace are stopped where they are and keep
        // their lease (which covers a call in flight) until it lapses, so
        // no other process acts on a call that may still land.
        sweeper.abort();
        self.stopping.store(true, Ordering::SeqCst);
        let drained = tokio::time::timeout(self.settings.shutdown_grace, async {
            while drives.join_next().await.is_some() {}
        })
        .await;
        let mid_step = self.driving.sagas();
        if drained.is_err() {
            tracing::warn!(
                sagas = mid_step.len(),
                "stopping with sagas mid-step; their leases lapse instead of being given back"
            );
        }
        drives.shutdown().await;
        heartbeat.abort();
        if mid_step.len() > MAX_KEPT_ON_STOP {
            // Too many to name: every lease lapses instead.
            return;
        }
        match store.release_all(&self.settings.node_id, &mid_step).await {
            Ok(released) if released > 0 => tracing::info!(released, "gave back sagas"),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "could not give back sagas"),
        }
    }

    /// Extends the leases of the sagas being driven, three times per lease
    /// period. A saga no task drives any more is not renewed: its lease
    /// lapses and any process takes it up again.
    async fn heartbeat(self: Arc<Self>) {
        let mut interval = tokio::time::interval(self.settings.lease / 3);
        loop {
            interval.tick().await;
            let sagas = self.driving.sagas();
            if sagas.is_empty() {
                continue;
            }
            if let Err(error) = self
                .store()
                .heartbeat(&self.settings.node_id, &sagas, self.settings.lease)
                .await
            {
                tracing::warn!(%error, "saga lease heartbeat failed");
            }
        }
    }

    /// A drive task panicked: say which saga, and leave its lease to lapse
    /// (the heartbeat no longer renews it), so that no process takes it up
    /// before a call the drive may have had in flight is past its deadline
    /// by the database's clock. A saga whose drives panic [`MAX_PANICS`]
    /// times in a row on this process is parked: a bug, not a passing fault,
    /// and retrying it would loop.
    async fn after_panic(&self, claim: Claim, message: String) {
        self.metrics.panics.fetch_add(1, Ordering::Relaxed);
        let panics = {
            let mut panics = self.panics.lock().unwrap_or_else(PoisonError::into_inner);
            if panics.len() > MAX_PANIC_RECORDS {
                // Sagas that went on elsewhere leave entries behind.
                panics.clear();
            }
            let count = panics.entry(claim.saga_id).or_default();
            *count += 1;
            *count
        };
        tracing::error!(saga_id = %claim.saga_id, panics, panic = %message, "a saga drive task panicked; its lease will lapse");
        if panics < MAX_PANICS {
            return;
        }
        let reason = summarize(
            &format!("the runner failed on this saga {panics} times in a row: {message}"),
            MAX_REASON_CHARS,
        );
        // Parking reads and writes the saga too, which may be what panics.
        let parked = AssertUnwindSafe(self.park(claim, ParkCause::DriveFailed, reason))
            .catch_unwind()
            .await;
        if parked.is_err() {
            tracing::error!(saga_id = %claim.saga_id, "parking the saga panicked too; leaving it to other processes for a while");
            self.passed_over
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(claim.saga_id, Instant::now() + DEFERRAL_BACKOFF_CAP);
        }
    }

    fn forget_panics(&self, saga_id: Uuid) {
        self.panics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&saga_id);
    }

    /// Starts sagas for orders a process placed but stopped before starting
    /// their saga (a crash between the two writes).
    async fn sweep_orphans(self: Arc<Self>) {
        let mut interval = tokio::time::interval(ORPHAN_SWEEP_INTERVAL);
        loop {
            interval.tick().await;
            let orphans = match self
                .store()
                .orders_without_saga(Utc::now() - ORPHAN_AGE, 100)
                .await
            {
                Ok(orphans) => orphans,
                Err(error) => {
                    tracing::warn!(%error, "could not look for orders without a saga");
                    continue;
                }
            };
            for order_id in orphans {
                match self.sagas.start_if_missing(order_id, &self.context).await {
                    Ok(Some(saga_id)) => {
                        tracing::info!(%order_id, %saga_id, "started a missing saga");
                    }
                    Ok(None) => {
                        tracing::debug!(%order_id, "the missing saga was started elsewhere");
                    }
                    Err(error) => tracing::warn!(%order_id, %error, "could not start a saga"),
                }
            }
        }
    }

    /// Drives one claimed saga until it waits, ends, or the claim is lost.
    async fn drive(&self, claim: Claim) {
        let mut retry = WriteRetry::new(MAX_WRITE_RETRIES);
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                if let Err(error) = self
                    .store()
                    .release(claim, None, Some(Utc::now()), Utc::now())
                    .await
                {
                    tracing::warn!(saga_id = %claim.saga_id, %error, "could not give a saga back while stopping");
                }
                return;
            }
            let error = match self.step(claim).await {
                Ok(Flow::Continue) => {
                    retry = WriteRetry::new(MAX_WRITE_RETRIES);
                    continue;
                }
                Ok(Flow::Stop) => return,
                Err(error) => error,
            };
            // A conflict or a failed write: the next try reads the stream.
            self.driving.forget(claim);
            if retry.wait(&self.metrics, claim.saga_id, &error).await {
                continue;
            }
            if let WriteFailure::Refused = classify(&error) {
                self.park_refused(claim, &error).await;
                return;
            }
            self.metrics.write_retries.fetch_add(1, Ordering::Relaxed);
            let wait = write_backoff(MAX_WRITE_RETRIES + 1);
            tracing::warn!(saga_id = %claim.saga_id, wait_ms = wait.as_millis() as u64, %error, "saga step could not be recorded; giving the saga back for later");
            let later = Utc::now() + to_chrono(wait);
            if let Err(error) = self
                .store()
                .release(claim, None, Some(later), Utc::now())
                .await
            {
                tracing::warn!(saga_id = %claim.saga_id, %error, "could not give the saga back; its lease will lapse");
            }
            return;
        }
    }

    /// Parks a saga whose write was refused for a reason retrying cannot
    /// fix, with that reason, so a person looks instead of every process
    /// retrying it forever.
    async fn park_refused(&self, claim: Claim, refusal: &CommandError) {
        let reason = summarize(
            &format!("a saga write was refused: {refusal}"),
            MAX_REASON_CHARS,
        );
        self.park(claim, ParkCause::WriteRefused, reason).await;
    }

    /// Records `Parked` (fenced by the claim) and gives the claim back; if
    /// even that fails, the saga is given back for later.
    async fn park(&self, claim: Claim, cause: ParkCause, reason: String) {
        let parked = async {
            let loaded = self.sagas.load(claim.saga_id).await?;
            if loaded.state.status.is_some_and(|s| s.is_final()) {
                return Ok(Flow::Stop);
            }
            let step = loaded
                .state
                .current_step()
                .map(|s| s.name().to_string())
                .unwrap_or_default();
            tracing::error!(saga_id = %claim.saga_id, %reason, %cause, "saga parked: needs manual intervention");
            let events = [SagaEvent::Parked {
                step,
                reason: reason.clone(),
                cause,
            }];
            self.record(claim, loaded, &events, Vec::new()).await
        };
        match parked.await {
            // Parked, and given back by that same write; or final already.
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(saga_id = %claim.saga_id, %error, "could not park the saga; giving it back for later");
                let later = Utc::now() + to_chrono(WRITE_BACKOFF_CAP);
                let _ = self
                    .store()
                    .release(claim, None, Some(later), Utc::now())
                    .await;
            }
        }
    }

    /// Does the next thing the saga's record calls for.
    async fn step(&self, claim: Claim) -> Result<Flow, CommandError> {
        let saga_id = claim.saga_id;
        let loaded = match self.driving.take_kept(claim) {
            Some(kept) => kept,
            None => self.sagas.load(saga_id).await?,
        };
        tracing::Span::current().record(
            "correlation_id",
            tracing::field::display(loaded.state.order_id),
        );
        let now = Utc::now();
        match loaded.state.next(now) {
            Next::Idle => {
                self.store()
                    .release(claim, Some(loaded.version), None, now)
                    .await?;
                Ok(Flow::Stop)
            }
            Next::Wait(at) if at - now <= SHORT_WAIT => {
                tokio::time::sleep((at - now).to_std().unwrap_or_default()).await;
                self.driving.keep(claim, loaded);
                Ok(Flow::Continue)
            }
            Next::Wait(at) => {
                self.store()
                    .release(claim, Some(loaded.version), Some(at), now)
                    .await?;
                Ok(Flow::Stop)
            }
            Next::BeginCompensation(CompensationCause {
                reason,
                cancel,
                order_reason,
            }) => {
                tracing::info!(%saga_id, %reason, "saga compensating");
                let events = [SagaEvent::CompensationStarted {
                    reason,
                    cancel,
                    order_reason: Some(order_reason),
                }];
                self.record(claim, loaded, &events, Vec::new()).await
            }
            Next::Forward { step, attempt } => {
                let span = step_span("forward", &loaded.state, step, attempt);
                self.forward(claim, loaded, step, attempt)
                    .instrument(span)
                    .await
            }
            Next::Compensate { step, attempt } => {
                let span = step_span("compensate", &loaded.state, step, attempt);
                self.compensate(claim, loaded, step, attempt)
                    .instrument(span)
                    .await
            }
            Next::FinishCompensation(cause) => self.finish(claim, loaded, cause).await,
        }
    }

    /// Appends `events` (and `other_streams`) under the claim. A write that
    /// ends the drive ([`ends_drive`]) gives the saga back with it, and the
    /// drive stops.
    async fn record(
        &self,
        claim: Claim,
        loaded: Loaded<Saga>,
        events: &[SagaEvent],
        other_streams: Vec<crate::event_store::StreamAppend>,
    ) -> Result<Flow, CommandError> {
        self.record_holding(claim, loaded, events, other_streams, None)
            .await
    }

    /// [`Self::record`], making the lease last at least `hold` longer in
    /// the same write (refused if it already ran out).
    async fn record_holding(
        &self,
        claim: Claim,
        loaded: Loaded<Saga>,
        events: &[SagaEvent],
        other_streams: Vec<crate::event_store::StreamAppend>,
        hold: Option<Duration>,
    ) -> Result<Flow, CommandError> {
        let was_final = loaded.state.status.is_some_and(SagaStatus::is_final);
        let (committed, written) = self
            .sagas
            .commit(
                Some(claim),
                hold,
                claim.saga_id,
                loaded,
                events,
                other_streams,
                &self.context,
            )
            .await?;
        match committed {
            Committed::Written(_) => {
                for event in events {
                    if let SagaEvent::Parked { cause, .. } = event {
                        self.metrics.count_park(*cause);
                    }
                }
                if let (false, Some(status), Some(started_at)) =
                    (was_final, written.state.status, written.state.started_at)
                    && status.is_final()
                {
                    let elapsed = (Utc::now() - started_at).to_std().unwrap_or_default();
                    self.kernel_metrics.record_saga_finished(status, elapsed);
                }
                if ends_drive(&written.state) {
                    // Given back by that write.
                    return Ok(Flow::Stop);
                }
                self.driving.keep(
                    claim,
                    Loaded {
                        state: written.state,
                        version: written.version,
                    },
                );
                Ok(Flow::Continue)
            }
            Committed::LeaseLost => {
                self.metrics.leases_lost.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(saga_id = %claim.saga_id, "lost the saga's lease; another process drives it now");
                Ok(Flow::Stop)
            }
        }
    }

    async fn load_order(&self, order_id: Uuid) -> Result<Loaded<Order>, CommandError> {
        Ok(self.commerce().repository::<Order>().load(order_id).await?)
    }

    /// The order as `claim`'s drive kept it, else as its stream says
    /// ([`Driving`]), and whether it was kept; taken: a step that writes
    /// keeps what it leaves.
    ///
    /// A kept order's version is checked by the write of the order's next
    /// events, but a refusal is recorded without the order's stream: a
    /// refusal decided on a kept order is decided again on the order read
    /// afresh before it is written.
    async fn order_for(
        &self,
        claim: Claim,
        order_id: Uuid,
    ) -> Result<(Loaded<Order>, bool), CommandError> {
        match self.driving.take_order(claim) {
            Some(kept) => Ok((kept, true)),
            None => Ok((self.load_order(order_id).await?, false)),
        }
    }

    /// [`Self::record`], keeping `order` (what the write leaves of it) for
    /// the drive's next step once the write is in.
    async fn record_with_order(
        &self,
        claim: Claim,
        loaded: Loaded<Saga>,
        events: &[SagaEvent],
        other_streams: Vec<crate::event_store::StreamAppend>,
        order: Loaded<Order>,
    ) -> Result<Flow, CommandError> {
        let flow = self.record(claim, loaded, events, other_streams).await?;
        if let Flow::Continue = flow {
            self.driving.keep_order(claim, order);
        }
        Ok(flow)
    }

    /// The plugin a step calls, if it is active on this process.
    fn plugin(&self, step: &StepState) -> Result<Arc<LoadedPlugin>, PluginError> {
        let name = step.definition.action.plugin().unwrap_or_default();
        self.registry.active(name)
    }

    /// Gives the saga back for another process: this one does not run the
    /// plugin the step needs (yet). Nothing is recorded on the saga.
    async fn defer(&self, claim: Claim, step: &StepState) -> Result<Flow, CommandError> {
        let wait = deferral_backoff(claim.deferrals);
        self.metrics.deferrals.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            saga_id = %claim.saga_id,
            step = step.name(),
            plugin = step.definition.action.plugin().unwrap_or_default(),
            deferrals = claim.deferrals + 1,
            wait_ms = wait.as_millis() as u64,
            "the step's plugin is not active on this process; giving the saga back"
        );
        self.store().defer(claim, wait).await?;
        // Left to the others for a while: a process without the plugin
        // must not keep winning the saga back.
        self.passed_over
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(claim.saga_id, Instant::now() + PASS_OVER.max(wait));
        Ok(Flow::Stop)
    }

    /// Makes sure the lease holds for a call of up to `timeout`; `false`
    /// (and nothing called) when another process holds the saga now.
    async fn hold_for_call(&self, claim: Claim, timeout: Duration) -> Result<bool, CommandError> {
        if self
            .store()
            .hold(claim, timeout + CALL_LEASE_MARGIN)
            .await?
        {
            return Ok(true);
        }
        self.metrics.leases_lost.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(saga_id = %claim.saga_id, "the saga's lease is gone; not calling the plugin");
        Ok(false)
    }

    /// Runs step `index` forward.
    async fn forward(
        &self,
        claim: Claim,
        loaded: Loaded<Saga>,
        index: usize,
        attempt: u32,
    ) -> Result<Flow, CommandError> {
        let step = loaded.state.steps[index].clone();
        let order_id = loaded.state.order_id;
        let local = match &step.definition.action {
            StepAction::ReserveInventory => Some(OrderTransition::ReserveInventory),
            StepAction::Confirm => Some(OrderTransition::Confirm),
            _ => None,
        };
        if let Some(transition) = local {
            return self
                .forward_locally(claim, loaded, &step, attempt, transition)
                .await;
        }
        let Ok(plugin) = self.plugin(&step) else {
            return self.defer(claim, &step).await;
        };

        // A call: record its start first, so a crash during it is known.
        // That write is also where a decision taken on a kept saga that a
        // request has since moved past fails its version check, and it
        // makes the lease last over the call (or, if it already ran out,
        // is refused: then nothing is called).
        self.settings.hooks.at("before-start", step.name()).await;
        let timeout = step.definition.retry.timeout();
        // Read before the write, so that nothing but the call follows it.
        let (order, kept) = self.order_for(claim, order_id).await?;
        let mut loaded = loaded;
        let events = [SagaEvent::StepStarted {
            step: step.name().to_string(),
            phase: Phase::Forward,
            attempt,
            at: Utc::now(),
            plugin_version: Some(plugin.manifest().version.clone()),
            reaches_outside: plugin.reaches_outside(),
        }];
        let held_from = Instant::now();
        let flow = self
            .record_holding(
                claim,
                loaded.clone(),
                &events,
                Vec::new(),
                Some(timeout + CALL_LEASE_MARGIN),
            )
            .await?;
        if let Flow::Stop = flow {
            return Ok(flow);
        }
        advance(&mut loaded, &events);
        self.settings.hooks.at("before-call", step.name()).await;
        // The lease covers the call only if it starts right after that
        // write. Anything that held this process up since (a pause of the
        // whole process, say) eats into the margin: then the lease is
        // checked and extended again, or nothing is called.
        if held_from.elapsed() > CALL_LEASE_MARGIN / 2
            && !self.hold_for_call(claim, timeout).await?
        {
            return Ok(Flow::Stop);
        }
        let outcome = match tokio::time::timeout(
            timeout,
            self.invoke_forward(&plugin, claim.saga_id, &loaded.state, &step, &order.state),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_) => Err(deadline(timeout)),
        };
        self.settings.hooks.at("after-call", step.name()).await;
        match self
            .record_outcome(claim, index, attempt, &outcome, (loaded, order, kept))
            .await
        {
            Err(error) if !matches!(classify(&error), WriteFailure::Refused) => {
                // Still failing: give the saga back rather than call again
                // here. Whoever drives it next repeats the call with its key.
                tracing::warn!(saga_id = %claim.saga_id, %error, "a call's outcome could not be recorded; giving the saga back");
                let later = Utc::now() + to_chrono(WRITE_BACKOFF_CAP);
                if let Err(error) = self
                    .store()
                    .release(claim, None, Some(later), Utc::now())
                    .await
                {
                    tracing::warn!(saga_id = %claim.saga_id, %error, "could not give the saga back; its lease will lapse");
                }
                Ok(Flow::Stop)
            }
            recorded => recorded,
        }
    }

    /// Records a call's outcome, retrying the write (never the call) in
    /// place: the call may have moved money, and its outcome must not be
    /// lost to a failing store while this process holds the saga. A
    /// conflict (a request arrived meanwhile) reloads the saga and records
    /// the outcome on top, as long as this attempt is still the open one.
    /// The first try uses the saga and the order as the call started.
    async fn record_outcome(
        &self,
        claim: Claim,
        index: usize,
        attempt: u32,
        outcome: &Attempt,
        as_called: (Loaded<Saga>, Loaded<Order>, bool),
    ) -> Result<Flow, CommandError> {
        let mut retry = WriteRetry::new(MAX_OUTCOME_WRITE_RETRIES);
        let mut as_called = Some(as_called);
        loop {
            let error = match self
                .try_record_outcome(claim, index, attempt, outcome, as_called.take())
                .await
            {
                Ok(flow) => return Ok(flow),
                Err(error) => error,
            };
            if !retry.wait(&self.metrics, claim.saga_id, &error).await {
                return Err(error);
            }
        }
    }

    async fn try_record_outcome(
        &self,
        claim: Claim,
        index: usize,
        attempt: u32,
        outcome: &Attempt,
        as_called: Option<(Loaded<Saga>, Loaded<Order>, bool)>,
    ) -> Result<Flow, CommandError> {
        let (loaded, mut order, kept) = match as_called {
            Some(all) => all,
            None => {
                let loaded = self.sagas.load(claim.saga_id).await?;
                let order = self.load_order(loaded.state.order_id).await?;
                (loaded, order, false)
            }
        };
        let Some(step) = loaded.state.steps.get(index).cloned() else {
            return Err(
                StoreError::Corrupt(format!("saga {} lost step {index}", claim.saga_id)).into(),
            );
        };
        if step.status != StepStatus::Running || step.attempts != attempt {
            // Another owner moved the step on; its record stands, and what
            // this drive kept is behind it.
            self.driving.forget(claim);
            return Ok(Flow::Continue);
        }
        let order_id = loaded.state.order_id;
        let (events, streams, order_events) = match outcome {
            Ok(output) => {
                let mut effect = self.order_effect(order_id, &order, &step, output).await;
                if kept && matches!(effect, Err(CommandError::Domain(_))) {
                    order = self.load_order(order_id).await?;
                    effect = self.order_effect(order_id, &order, &step, output).await;
                }
                match effect {
                    Ok((streams, order_events)) => (
                        vec![SagaEvent::StepSucceeded {
                            step: step.name().to_string(),
                            output: output.clone(),
                        }],
                        streams,
                        order_events,
                    ),
                    Err(CommandError::Domain(refused)) => {
                        // The call worked but its answer does not fit the order
                        // (a different amount, say): undo it.
                        let error =
                            StepError::new("unusable_result", &refused.to_string(), false, true);
                        (
                            vec![forward_failure(&step, attempt, error)],
                            Vec::new(),
                            Vec::new(),
                        )
                    }
                    Err(other) => return Err(other),
                }
            }
            Err(error) => (
                vec![forward_failure(&step, attempt, error.clone())],
                Vec::new(),
                Vec::new(),
            ),
        };
        let order_after = order_after(order, &order_events);
        self.record_with_order(claim, loaded, &events, streams, order_after)
            .await
    }

    /// A built-in step: the step's record and the order's change in one append.
    async fn forward_locally(
        &self,
        claim: Claim,
        loaded: Loaded<Saga>,
        step: &StepState,
        attempt: u32,
        transition: OrderTransition,
    ) -> Result<Flow, CommandError> {
        let started = SagaEvent::StepStarted {
            step: step.name().to_string(),
            phase: Phase::Forward,
            attempt,
            at: Utc::now(),
            plugin_version: None,
            reaches_outside: false,
        };
        let order_id = loaded.state.order_id;
        let (mut order, kept) = self.order_for(claim, order_id).await?;
        // Held until the step is recorded: the next stock step on these
        // products in this process plans on what this one wrote.
        let stock_products: Vec<Uuid> = match transition {
            OrderTransition::ReserveInventory => order
                .state
                .quantities_by_product()
                .into_iter()
                .map(|(product, _)| product)
                .collect(),
            _ => order
                .state
                .reservations
                .iter()
                .map(|reserved| reserved.product_id)
                .collect(),
        };
        let held = self.stock_gate.enter(stock_products, STOCK_PATIENCE).await;
        if !held.all_held() {
            self.metrics
                .stock_turns_skipped
                .fetch_add(1, Ordering::Relaxed);
        }
        let mut stock = Some(held);
        let mut planned = self
            .commerce()
            .plan_transition(order_id, &order, &transition)
            .await;
        if kept && matches!(planned, Err(CommandError::Domain(_))) {
            order = self.load_order(order_id).await?;
            planned = self
                .commerce()
                .plan_transition(order_id, &order, &transition)
                .await;
        }
        if planned.is_err() {
            // Refused: no stock is written, the next step may go.
            stock.take();
        }
        let mut kept_order = None;
        let (events, streams) = match planned {
            Ok(planned) => {
                let after = order_after(order.clone(), &planned.events);
                let output = match &transition {
                    OrderTransition::ReserveInventory => {
                        json!({ "reservations": after.state.reservations })
                    }
                    _ => json!({}),
                };
                kept_order = Some(after);
                let mut events = vec![
                    started,
                    SagaEvent::StepSucceeded {
                        step: step.name().to_string(),
                        output,
                    },
                ];
                if matches!(transition, OrderTransition::Confirm) {
                    events.push(SagaEvent::Completed);
                }
                (events, planned.streams)
            }
            Err(CommandError::Domain(refused)) => {
                // Out of stock, a deactivated product, an order no longer
                // able to move: retrying gives the same answer.
                let error =
                    StepError::new(domain_code(&refused), &refused.to_string(), false, false);
                (
                    vec![started, forward_failure(step, attempt, error)],
                    Vec::new(),
                )
            }
            Err(CommandError::Store(store_error)) => {
                let error = StepError::new("store", &store_error.to_string(), true, false);
                (
                    vec![started, forward_failure(step, attempt, error)],
                    Vec::new(),
                )
            }
            Err(other) => return Err(other),
        };
        // Refused: the order is as it was.
        let kept_order = kept_order.unwrap_or(order);
        let flow = self
            .record_with_order(claim, loaded, &events, streams, kept_order)
            .await;
        drop(stock);
        flow
    }

    /// The order's events that record a call's result (paid, shipped).
    async fn order_effect(
        &self,
        order_id: Uuid,
        order: &Loaded<Order>,
        step: &StepState,
        output: &Value,
    ) -> Result<(Vec<crate::event_store::StreamAppend>, Vec<OrderEvent>), CommandError> {
        let transition = match &step.definition.action {
            StepAction::Payment { .. } => OrderTransition::MarkPaid {
                payment_reference: text(output, "reference"),
                amount: output_money(output)?,
            },
            StepAction::Shipment { .. } => OrderTransition::Ship {
                shipment_reference: text(output, "reference"),
            },
            _ => return Ok((Vec::new(), Vec::new())),
        };
        let planned = self
            .commerce()
            .plan_transition(order_id, order, &transition)
            .await?;
        Ok((planned.streams, planned.events))
    }

    /// A plugin step's forward call: the charge (captured, if the provider
    /// only authorized), the shipment, or the custom step's `execute`.
    async fn invoke_forward(
        &self,
        plugin: &LoadedPlugin,
        saga_id: Uuid,
        saga: &Saga,
        step: &StepState,
        order: &Order,
    ) -> Attempt {
        let Some(placed) = &order.placed else {
            return Err(StepError::new(
                "order_missing",
                &format!("order {} does not exist", saga.order_id),
                false,
                false,
            ));
        };
        let plugin_order = plugin_order(saga.order_id, placed);
        let key = Saga::step_key(saga_id, step.name());
        match &step.definition.action {
            StepAction::Payment { .. } => {
                let payment = charge(plugin, key, placed, plugin_order).await?;
                let payment = match payment.status {
                    host::PaymentStatus::Captured => payment,
                    host::PaymentStatus::Authorized => {
                        // Only authorized: take the order's total now, under
                        // a key of its own, once the authorization is seen
                        // to be for it. If that fails, an authorization
                        // exists, and compensation cancels it.
                        if !same_money(&payment.amount, &placed.total) {
                            return Err(StepError::new(
                                "unusable_result",
                                &format!(
                                    "the provider authorized {} {}, not the order's {}",
                                    payment.amount.amount, payment.amount.currency, placed.total
                                ),
                                false,
                                true,
                            ));
                        }
                        let captured = plugin
                            .capture(
                                Saga::capture_key(saga_id, step.name()),
                                payment.reference.clone(),
                                plugin_money(&placed.total),
                            )
                            .await
                            .map_err(|error| StepError {
                                effect_possible: true,
                                ..step_error(error)
                            })?;
                        if !matches!(captured.status, host::PaymentStatus::Captured) {
                            return Err(unexpected_status("capture", captured.status));
                        }
                        captured
                    }
                    other => return Err(unexpected_status("charge", other)),
                };
                Ok(payment_output(&payment))
            }
            StepAction::Shipment { service, .. } => {
                let shipment = plugin
                    .create_shipment(key, plugin_order, service.clone())
                    .await
                    .map_err(step_error)?;
                Ok(shipment_output(&shipment))
            }
            StepAction::Custom { .. } => {
                let context = step_context(saga_id, saga, step, key, plugin_order);
                let output = plugin.execute_step(context).await.map_err(step_error)?;
                serde_json::from_str(&output).map_err(|error| {
                    StepError::new("invalid_output", &error.to_string(), false, true)
                })
            }
            StepAction::ReserveInventory | StepAction::Confirm => Err(StepError::new(
                "not_a_call",
                "built-in steps run locally",
                false,
                false,
            )),
        }
    }

    /// Undoes step `index`: finds out what the forward call did if its
    /// outcome was never recorded, then undoes that.
    async fn compensate(
        &self,
        claim: Claim,
        mut loaded: Loaded<Saga>,
        index: usize,
        attempt: u32,
    ) -> Result<Flow, CommandError> {
        let step = loaded.state.steps[index].clone();
        let plugin = match self.plugin(&step) {
            Ok(plugin) => plugin,
            Err(_) if claim.deferrals >= MAX_COMPENSATION_DEFERRALS => {
                let plugin = step.definition.action.plugin().unwrap_or_default();
                let reason = format!(
                    "compensating {} needs plugin {plugin}, which was not active on any process \
                     that took the saga ({} times in a row)",
                    step.name(),
                    claim.deferrals
                );
                tracing::error!(saga_id = %claim.saga_id, %reason, "saga parked: needs manual intervention");
                let events = [SagaEvent::Parked {
                    step: step.name().to_string(),
                    reason,
                    cause: ParkCause::PluginUnavailable,
                }];
                return self.record(claim, loaded, &events, Vec::new()).await;
            }
            Err(_) => return self.defer(claim, &step).await,
        };
        let started = [SagaEvent::StepStarted {
            step: step.name().to_string(),
            phase: Phase::Compensation,
            attempt,
            at: Utc::now(),
            plugin_version: Some(plugin.manifest().version.clone()),
            reaches_outside: plugin.reaches_outside(),
        }];
        if let Flow::Stop = self
            .record(claim, loaded.clone(), &started, Vec::new())
            .await?
        {
            return Ok(Flow::Stop);
        }
        advance(&mut loaded, &started);

        self.driving.take_order(claim);
        let order = self.load_order(loaded.state.order_id).await?;
        let retry = loaded
            .state
            .compensation_retry
            .unwrap_or(step.definition.retry);
        self.settings
            .hooks
            .at("before-compensation", step.name())
            .await;
        if !self.hold_for_call(claim, retry.timeout()).await? {
            return Ok(Flow::Stop);
        }
        let outcome = match tokio::time::timeout(
            retry.timeout(),
            self.undo(&plugin, claim.saga_id, &loaded.state, &step, &order.state),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_) => Err(UndoFailure {
                error: deadline(retry.timeout()),
                outcome_unknown: step.outcome_unknown(),
                not_before: None,
            }),
        };
        self.settings
            .hooks
            .at("after-compensation", step.name())
            .await;

        let events = match outcome {
            Ok(output) => vec![SagaEvent::StepCompensated {
                step: step.name().to_string(),
                output,
            }],
            Err(UndoFailure {
                error,
                outcome_unknown,
                not_before,
            }) => {
                // A call that may still be in flight is waited for, not
                // given up on.
                let exhausted =
                    not_before.is_none() && loaded.state.compensation_exhausted(attempt);
                let retry_at = (!exhausted).then(|| {
                    let backoff = Utc::now() + to_chrono(retry.backoff(attempt, random()));
                    not_before.map_or(backoff, |at| at.max(backoff))
                });
                let (cause, reason) = if outcome_unknown {
                    (
                        ParkCause::OutcomeUnknown,
                        format!(
                            "whether {} had its effect could not be learned in {attempt} attempts \
                             ({}); check with the provider before retrying",
                            step.name(),
                            error.summary()
                        ),
                    )
                } else {
                    (
                        ParkCause::CompensationFailed,
                        format!(
                            "compensating {} failed {attempt} times: {}",
                            step.name(),
                            error.summary()
                        ),
                    )
                };
                let mut events = vec![SagaEvent::StepFailed {
                    step: step.name().to_string(),
                    phase: Phase::Compensation,
                    attempt,
                    error,
                    retry_at,
                }];
                if exhausted {
                    let reason = summarize(&reason, MAX_REASON_CHARS);
                    tracing::error!(saga_id = %claim.saga_id, %reason, %cause, "saga parked: needs manual intervention");
                    events.push(SagaEvent::Parked {
                        step: step.name().to_string(),
                        reason,
                        cause,
                    });
                }
                events
            }
        };
        self.record(claim, loaded, &events, Vec::new()).await
    }

    /// Undoes what the step's forward call did, and only that.
    async fn undo(
        &self,
        plugin: &LoadedPlugin,
        saga_id: Uuid,
        saga: &Saga,
        step: &StepState,
        order: &Order,
    ) -> Result<Value, UndoFailure> {
        let output = match &step.output {
            Some(output) => output.clone(),
            None => match self
                .learn_outcome(plugin, saga_id, saga, step, order)
                .await?
            {
                Some(output) => output,
                None => {
                    return Ok(json!({
                        "undone": false,
                        "reason": "the provider has no record of the call",
                    }));
                }
            },
        };
        let failed = |error: PluginError| UndoFailure {
            error: step_error(error),
            outcome_unknown: false,
            not_before: None,
        };
        let key = Saga::compensation_key(saga_id, step.name());
        match &step.definition.action {
            StepAction::Payment { .. } => {
                let reference = text(&output, "reference");
                match text(&output, "status").as_str() {
                    "captured" => {
                        let amount = host::Money {
                            amount: text(&output, "amount"),
                            currency: text(&output, "currency"),
                        };
                        let refund = plugin
                            .refund(key, reference, amount)
                            .await
                            .map_err(failed)?;
                        if !matches!(refund.status, host::PaymentStatus::Refunded) {
                            return Err(UndoFailure {
                                error: unexpected_status("refund", refund.status),
                                outcome_unknown: false,
                                not_before: None,
                            });
                        }
                        Ok(json!({ "refund": refund.reference, "amount": refund.amount.amount }))
                    }
                    "authorized" => {
                        let cancelled = plugin
                            .cancel_payment(key, reference.clone())
                            .await
                            .map_err(failed)?;
                        if !matches!(cancelled.status, host::PaymentStatus::Cancelled) {
                            return Err(UndoFailure {
                                error: unexpected_status("cancel", cancelled.status),
                                outcome_unknown: false,
                                not_before: None,
                            });
                        }
                        Ok(json!({ "cancelled_authorization": reference }))
                    }
                    status @ ("refunded" | "cancelled") => Ok(json!({
                        "undone": false,
                        "reason": format!("the payment is already {status}"),
                    })),
                    other => Err(UndoFailure {
                        error: StepError::new(
                            "unexpected_payment_status",
                            &format!("the payment to undo is {other:?}"),
                            false,
                            true,
                        ),
                        outcome_unknown: false,
                        not_before: None,
                    }),
                }
            }
            StepAction::Shipment { .. } => {
                let reference = text(&output, "reference");
                plugin
                    .cancel_shipment(key, reference.clone())
                    .await
                    .map_err(failed)?;
                Ok(json!({ "cancelled": reference }))
            }
            StepAction::Custom { .. } => {
                let Some(placed) = &order.placed else {
                    return Ok(json!({ "undone": false, "reason": "no order" }));
                };
                let context = step_context(
                    saga_id,
                    saga,
                    step,
                    key,
                    plugin_order(saga.order_id, placed),
                );
                plugin
                    .compensate_step(context, output.to_string())
                    .await
                    .map_err(failed)?;
                Ok(json!({}))
            }
            StepAction::ReserveInventory | StepAction::Confirm => Ok(json!({})),
        }
    }

    /// What a forward call whose outcome was never recorded did: the
    /// output to undo, or `None` when it did nothing. It never guesses: when
    /// it cannot find out, it fails, and the compensation is retried and
    /// in the end parked.
    async fn learn_outcome(
        &self,
        plugin: &LoadedPlugin,
        saga_id: Uuid,
        saga: &Saga,
        step: &StepState,
        order: &Order,
    ) -> Result<Option<Value>, UndoFailure> {
        let unknown = |error: StepError| UndoFailure {
            error,
            outcome_unknown: true,
            not_before: None,
        };
        let key = Saga::step_key(saga_id, step.name());
        match &step.definition.action {
            StepAction::Payment { .. } if plugin.supports_lookup() => {
                let found = plugin
                    .lookup_payment(key)
                    .await
                    .map_err(|error| unknown(step_error(error)))?;
                match found {
                    Some(payment) => Ok(Some(payment_output(&payment))),
                    None => nothing_or_in_flight(step),
                }
            }
            StepAction::Shipment { .. } if plugin.supports_lookup() => {
                let found = plugin
                    .lookup_shipment(key)
                    .await
                    .map_err(|error| unknown(step_error(error)))?;
                match found {
                    Some(shipment) => Ok(Some(shipment_output(&shipment))),
                    None => nothing_or_in_flight(step),
                }
            }
            // Its plugin could reach nothing outside the kernel: whatever
            // happened to the call changed nothing there. Its `compensate`
            // is told the outcome is unknown (`null`).
            StepAction::Custom { .. } if step.had_no_outside_reach() => Ok(Some(Value::Null)),
            // A payment plugin of contract 0.1 has no lookup: the charge is
            // repeated with its key, which the provider answers with what
            // the first one did (for a charge that never reached it, this
            // makes it; the refund that follows undoes it). The capture is
            // not repeated: an authorization found is cancelled.
            StepAction::Payment { .. } => {
                let Some(placed) = &order.placed else {
                    return Ok(None);
                };
                let plugin_order = plugin_order(saga.order_id, placed);
                charge(plugin, key, placed, plugin_order)
                    .await
                    .map(|payment| Some(payment_output(&payment)))
                    .map_err(unknown)
            }
            // Likewise a shipping plugin of 0.1, and a custom step that calls
            // out: the call is repeated with its key.
            _ => self
                .invoke_forward(plugin, saga_id, saga, step, order)
                .await
                .map(Some)
                .map_err(unknown),
        }
    }

    /// Fails or cancels the order (releasing its stock) and ends the saga.
    async fn finish(
        &self,
        claim: Claim,
        loaded: Loaded<Saga>,
        cause: CompensationCause,
    ) -> Result<Flow, CommandError> {
        let order_id = loaded.state.order_id;
        self.driving.take_order(claim);
        let order = self.load_order(order_id).await?;
        // Checked by the order like any reason: cleaned first, so the
        // saga's own last write is never refused for its wording.
        let reason = match summarize(&cause.order_reason, MAX_REASON_CHARS) {
            reason if reason.is_empty() => "the order could not be completed".to_string(),
            reason => reason,
        };
        let transition = if cause.cancel {
            OrderTransition::Cancel { reason }
        } else {
            OrderTransition::Fail { reason }
        };
        let streams = match self
            .commerce()
            .plan_transition(order_id, &order, &transition)
            .await
        {
            Ok(planned) => planned.streams,
            // Already final or gone: nothing left to change on the order.
            Err(CommandError::Domain(
                DomainError::IllegalTransition { .. } | DomainError::NotFound { .. },
            )) => Vec::new(),
            Err(other) => return Err(other),
        };
        tracing::info!(saga_id = %claim.saga_id, %order_id, reason = %cause.reason, "saga compensated");
        self.record(claim, loaded, &[SagaEvent::Compensated], streams)
            .await
    }
}

/// A lookup found nothing. That means nothing happened only once the last
/// forward call can no longer be in flight: a call abandoned at its
/// deadline (or by a process that stopped) may still reach the provider
/// shortly after. Until then the outcome stays unknown, and the
/// compensation is tried again after that time.
fn nothing_or_in_flight(step: &StepState) -> Result<Option<Value>, UndoFailure> {
    let in_flight_until = step
        .last_started_at
        .map(|started| started + to_chrono(step.definition.retry.timeout() + CALL_LEASE_MARGIN));
    match in_flight_until {
        Some(until) if until > Utc::now() => Err(UndoFailure {
            error: StepError::new(
                "call_in_flight",
                &format!(
                    "the provider has no record of the call yet, which may still reach it until {until}"
                ),
                true,
                true,
            ),
            outcome_unknown: true,
            not_before: Some(until),
        }),
        _ => Ok(None),
    }
}

/// The span of one drive of a saga, on whichever process claimed it: it
/// continues the trace of the request that started the saga, so one trace
/// shows an order from its request to its last step.
fn drive_span(claim: &Claim) -> tracing::Span {
    let span = tracing::info_span!(
        target: telemetry::TARGET,
        "saga",
        saga_id = %claim.saga_id,
        trace_id = tracing::field::Empty,
        correlation_id = tracing::field::Empty,
    );
    telemetry::continue_trace(&span, claim.trace);
    span
}

/// The span of one attempt at one step, forward or back.
fn step_span(direction: &'static str, saga: &Saga, step: usize, attempt: u32) -> tracing::Span {
    tracing::info_span!(
        target: telemetry::TARGET,
        "saga_step",
        direction,
        step = saga.steps.get(step).map(|s| s.name()).unwrap_or_default(),
        attempt,
    )
}

/// What a panic said.
fn panic_message(panic: Box<dyn Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|text| text.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// A failed forward attempt, due again after the step's back-off if the
/// error may pass and attempts are left; otherwise compensation follows.
fn forward_failure(step: &StepState, attempt: u32, error: StepError) -> SagaEvent {
    let retry = &step.definition.retry;
    let retry_at = (error.retryable && attempt < retry.max_attempts)
        .then(|| Utc::now() + to_chrono(retry.backoff(attempt, random())));
    SagaEvent::StepFailed {
        step: step.name().to_string(),
        phase: Phase::Forward,
        attempt,
        error,
        retry_at,
    }
}

/// `order` with `events` (the next ones of its stream) folded in: what a
/// write of them leaves.
fn order_after(mut order: Loaded<Order>, events: &[OrderEvent]) -> Loaded<Order> {
    for event in events {
        crate::domain::Aggregate::apply(&mut order.state, event);
        order.version += 1;
    }
    order
}

/// `loaded` after `events` were appended to it.
fn advance(loaded: &mut Loaded<Saga>, events: &[SagaEvent]) {
    for event in events {
        crate::domain::Aggregate::apply(&mut loaded.state, event);
    }
    loaded.version += events.len() as u32;
}

fn random() -> u64 {
    Uuid::new_v4().as_u128() as u64
}

fn to_chrono(wait: Duration) -> chrono::Duration {
    chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::seconds(60))
}

/// `base` doubled `exponent` times, capped, with equal jitter: the
/// back-off of a step's retries ([`StepRetry::backoff`]).
fn jittered_backoff(base: Duration, exponent: u32, cap: Duration) -> Duration {
    let policy = StepRetry {
        max_attempts: 1,
        initial_backoff_ms: base.as_millis() as u64,
        max_backoff_ms: cap.as_millis() as u64,
        timeout_ms: 1,
    };
    policy.backoff(exponent.saturating_add(1), random())
}

/// The wait after the `conflicts`-th version conflict in a row.
fn conflict_backoff(conflicts: u32) -> Duration {
    jittered_backoff(
        CONFLICT_BACKOFF,
        conflicts.saturating_sub(1),
        CONFLICT_BACKOFF_CAP,
    )
}

/// The wait after the `failures`-th failed saga write in a row.
fn write_backoff(failures: u32) -> Duration {
    jittered_backoff(WRITE_BACKOFF, failures.saturating_sub(1), WRITE_BACKOFF_CAP)
}

/// The wait before a saga deferred `deferrals` times before is due again.
fn deferral_backoff(deferrals: u32) -> Duration {
    jittered_backoff(DEFERRAL_BACKOFF, deferrals, DEFERRAL_BACKOFF_CAP)
}

fn deadline(timeout: Duration) -> StepError {
    StepError::new(
        "deadline",
        &format!("no answer within {} ms", timeout.as_millis()),
        true,
        true,
    )
}

/// A payment answered with a status the call cannot have: not a payment.
/// Something may exist at the provider, so compensation looks it up.
fn unexpected_status(call: &str, status: host::PaymentStatus) -> StepError {
    StepError::new(
        "unexpected_payment_status",
        &format!(
            "the provider answered {call} with a payment that is {}",
            payment_status(status)
        ),
        false,
        true,
    )
}

/// A plugin error as a step error.
fn step_error(error: PluginError) -> StepError {
    // Refused before running, or a failure the plugin itself calls
    // permanent (a decline): nothing happened. Anything else (a timeout, a
    // trap after a request went out, ...) may have had its effect.
    let effect_possible = !matches!(
        &error,
        PluginError::NotActive { .. }
            | PluginError::WrongKind { .. }
            | PluginError::Unsupported { .. }
    ) && !matches!(&error, PluginError::Failed { failure, .. } if failure.permanent);
    let code = match &error {
        PluginError::Failed { failure, .. } => failure.code.clone(),
        other => other.kind().as_str().to_string(),
    };
    StepError::new(
        &code,
        &error.to_string(),
        error.is_retryable(),
        effect_possible,
    )
}

/// The charge of the order's total, with the step's key.
async fn charge(
    plugin: &LoadedPlugin,
    idempotency_key: String,
    placed: &PlacedOrder,
    order: host::Order,
) -> Result<host::Payment, StepError> {
    let request = host::PaymentRequest {
        idempotency_key,
        amount: plugin_money(&placed.total),
        payment_method: placed.payment_method.clone(),
        order,
    };
    plugin.charge(request).await.map_err(step_error)
}

/// Whether a provider's amount is `expected` (same currency, same value).
fn same_money(amount: &host::Money, expected: &Money) -> bool {
    amount.currency == expected.currency().code()
        && amount
            .amount
            .parse::<rust_decimal::Decimal>()
            .is_ok_and(|value| value == expected.amount())
}

/// A payment as a step records it.
fn payment_output(payment: &host::Payment) -> Value {
    json!({
        "reference": payment.reference,
        "status": payment_status(payment.status),
        "amount": payment.amount.amount,
        "currency": payment.amount.currency,
    })
}

/// A shipment as a step records it.
fn shipment_output(shipment: &host::Shipment) -> Value {
    json!({
        "reference": shipment.reference,
        "tracking_number": shipment.tracking_number,
        "label_url": shipment.label_url,
    })
}

fn domain_code(error: &DomainError) -> &'static str {
    match error {
        DomainError::InsufficientStock { .. } => "insufficient_stock",
        DomainError::ProductInactive { .. } => "product_inactive",
        DomainError::IllegalTransition { .. } => "illegal_transition",
        DomainError::NotFound { .. } => "not_found",
        _ => "refused",
    }
}

fn text(value: &Value, field: &str) -> String {
    value
        .get(field)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn output_money(output: &Value) -> Result<Money, CommandError> {
    let amount = text(output, "amount")
        .parse()
        .map_err(|_| DomainError::invalid("amount", "the payment's amount is not a decimal"))?;
    Ok(Money::new(
        amount,
        Currency::parse(&text(output, "currency"))?,
    )?)
}

fn payment_status(status: host::PaymentStatus) -> &'static str {
    match status {
        host::PaymentStatus::Authorized => "authorized",
        host::PaymentStatus::Captured => "captured",
        host::PaymentStatus::Refunded => "refunded",
        host::PaymentStatus::Cancelled => "cancelled",
    }
}

fn plugin_money(money: &Money) -> host::Money {
    host::Money {
        amount: money.amount().to_string(),
        currency: money.currency().code().to_string(),
    }
}

/// The order as plugins see it.
fn plugin_order(order_id: Uuid, placed: &PlacedOrder) -> host::Order {
    let address = &placed.shipping_address;
    host::Order {
        id: order_id.to_string(),
        customer_id: placed.customer_id.to_string(),
        lines: placed
            .lines
            .iter()
            .map(|line| host::OrderLine {
                product_id: line.product_id.to_string(),
                sku: line.sku.clone(),
                name: line.name.clone(),
                quantity: line.quantity,
                unit_price: plugin_money(&line.unit_price),
                line_total: plugin_money(&line.line_total),
            })
            .collect(),
        total: plugin_money(&placed.total),
        shipping_address: host::Address {
            name: address.name.clone(),
            line1: address.line1.clone(),
            line2: address.line2.clone(),
            city: address.city.clone(),
            postal_code: address.postal_code.clone(),
            region: address.region.clone(),
            country: address.country.clone(),
        },
        payment_method: placed.payment_method.clone(),
    }
}

fn step_context(
    saga_id: Uuid,
    saga: &Saga,
    step: &StepState,
    idempotency_key: String,
    order: host::Order,
) -> host::StepContext {
    host::StepContext {
        saga_id: saga_id.to_string(),
        step: step.name().to_string(),
        idempotency_key,
        order,
        prior_outputs: saga
            .steps
            .iter()
            .filter(|s| s.status == StepStatus::Succeeded)
            .filter_map(|s| {
                s.output.as_ref().map(|output| host::StepOutput {
                    step: s.name().to_string(),
                    output: output.to_string(),
                })
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoffs_grow_stay_capped_and_spread() {
        for _ in 0..100 {
            let first = write_backoff(1);
            assert!(
                first >= WRITE_BACKOFF / 2 && first <= WRITE_BACKOFF,
                "{first:?}"
            );
            let late = write_backoff(40);
            assert!(
                late >= WRITE_BACKOFF_CAP / 2 && late <= WRITE_BACKOFF_CAP,
                "{late:?}"
            );
            let deferred = deferral_backoff(0);
            assert!(deferred <= DEFERRAL_BACKOFF, "{deferred:?}");
            assert!(deferral_backoff(u32::MAX) <= DEFERRAL_BACKOFF_CAP);
        }
    }

    #[test]
    fn only_store_failures_are_retried_and_refusals_park() {
        let database = CommandError::Store(StoreError::Database(sqlx::Error::PoolTimedOut));
        assert!(matches!(classify(&database), WriteFailure::Transient));
        let conflict = CommandError::VersionConflict {
            aggregate_id: Uuid::nil(),
            expected: 1,
            actual: 2,
        };
        assert!(matches!(classify(&conflict), WriteFailure::Conflict));
        for refused in [
            CommandError::Domain(DomainError::invalid(
                "reason",
                "must not contain control characters",
            )),
            CommandError::Store(StoreError::Codec("unreadable".into())),
            CommandError::Store(StoreError::Corrupt("no row".into())),
        ] {
            assert!(
                matches!(classify(&refused), WriteFailure::Refused),
                "{refused}"
            );
        }
    }
}
