//! The [`Batcher`]: concurrent requests of one kind (stream reads, saga
//! commits) merged into shared statements.
//!
//! Under load most of a kernel's statements are small: a read of a few
//! streams, a saga's step recorded. Each costs a round trip and the
//! database's per-statement work (and a write, a commit with its WAL
//! flush), which at this size is most of its cost. A batcher lets a few
//! statements of its kind run at once ([`Merge::IN_FLIGHT`] per process).
//! A request that finds a slot free and nobody queued runs at once, alone.
//! Otherwise it queues; the batcher's task takes every request queued,
//! waits for the next free slot, and runs those that fit together
//! ([`Merge::admit`]) as one statement ([`Merge::merged`]); the others wait
//! for the next. An idle kernel's requests therefore go out at once, alone,
//! as before; a busy one's share statements.
//!
//! Every statement runs in a task of its own, which holds its slot until
//! the statement ends: a caller that stops polling (a subscription whose
//! client reads slowly) cannot keep a slot from the others.
//!
//! A queued request is only ever put into a statement that starts after it
//! was queued, never onto one already running: a read sees everything
//! committed before it was asked for.
//!
//! When a merged statement fails, its requests are run again one by one in
//! the same slot, so each caller gets the answer its own request gives
//! (and none is lost when the failure was another caller's doing), unless
//! the database could not be reached at all: then each gets an error of
//! the same kind. When the batcher's task is gone (its runtime shut down),
//! the next request starts another. A statement that panics passes the
//! panic on to the caller of a request that ran alone at once; the callers
//! of a queued statement get [`Lost`] instead (their replies are dropped
//! with the task), as when its runtime shuts down.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::event_store::StoreError;

/// How a kind of request runs, alone or merged with others.
#[async_trait]
pub trait Merge: Send + Sync + 'static {
    type Request: Send + 'static;
    type Answer: Send + 'static;
    /// What a statement being filled holds so far, for [`Self::admit`].
    type Fill: Default + Send;

    /// Statements of this kind running at once, per process.
    const IN_FLIGHT: usize;
    /// Most requests in one statement.
    const MAX_PER_STATEMENT: usize;

    /// Whether `request` may go into the statement that holds `fill` so
    /// far; if so, counts it in. Must admit any request into an empty
    /// statement.
    fn admit(&self, fill: &mut Self::Fill, request: &Self::Request) -> bool;

    /// Runs `request` alone.
    async fn one(&self, request: Self::Request) -> Result<Self::Answer, StoreError>;

    /// Runs `requests` (admitted together) as one statement: an answer per
    /// request, in order, or the error that failed the statement as a
    /// whole (every request is then run again alone).
    async fn merged(
        &self,
        requests: &[Self::Request],
    ) -> Result<Vec<Result<Self::Answer, StoreError>>, StoreError>;
}

/// The batcher's task ended (its runtime shut down) before the request was
/// answered: it may or may not have run.
#[derive(Debug)]
pub struct Lost;

type Reply<M> = oneshot::Sender<Result<<M as Merge>::Answer, StoreError>>;

struct Queued<M: Merge> {
    request: M::Request,
    reply: Reply<M>,
    /// `None` once the request is in a statement.
    waiting: Option<Waiting>,
}

/// Merges concurrent requests into shared statements (see the module
/// docs). Its task starts on the first request that has to queue, on that
/// request's runtime, and ends when the batcher is dropped.
pub struct Batcher<M: Merge> {
    shared: Arc<Shared<M>>,
    queue: Mutex<Option<mpsc::UnboundedSender<Queued<M>>>>,
}

/// What the callers, the batcher's task and the statements' tasks share.
struct Shared<M> {
    merge: M,
    /// A permit per statement that may run now.
    slots: Arc<Semaphore>,
    /// Requests queued and not yet in a running statement.
    queued: Arc<AtomicUsize>,
    statements: AtomicU64,
}

impl<M: Merge> fmt::Debug for Batcher<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batcher")
            .field("statements", &self.statements())
            .finish_non_exhaustive()
    }
}

impl<M: Merge> Batcher<M> {
    pub fn new(merge: M) -> Self {
        Batcher {
            shared: Arc::new(Shared {
                merge,
                slots: Arc::new(Semaphore::new(M::IN_FLIGHT)),
                queued: Arc::new(AtomicUsize::new(0)),
                statements: AtomicU64::new(0),
            }),
            queue: Mutex::new(None),
        }
    }

    /// What runs the statements.
    pub fn merge(&self) -> &M {
        &self.shared.merge
    }

    /// Statements run so far, alone or merged (a request run again on its
    /// own after a merged statement failed is not counted).
    pub fn statements(&self) -> u64 {
        self.shared.statements.load(Ordering::Relaxed)
    }

    /// Requests queued and not yet in a statement.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::SeqCst)
    }

    /// Whether the batcher's task was ever started.
    #[cfg(test)]
    pub(crate) fn task_started(&self) -> bool {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// Runs `request`, alone or merged with others: its answer is what
    /// [`Merge::one`] gives for it (or, when the database could not be
    /// reached, an error of the same kind).
    pub async fn run(&self, request: M::Request) -> Result<Result<M::Answer, StoreError>, Lost> {
        // A free slot and nobody waiting: the request goes out now, without
        // a hand-over to the batcher's task (which costs wake-ups).
        if self.shared.queued.load(Ordering::Acquire) == 0
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
            && let Ok(slot) = Arc::clone(&self.shared.slots).try_acquire_owned()
        {
            self.shared.statements.fetch_add(1, Ordering::Relaxed);
            let shared = Arc::clone(&self.shared);
            let statement = runtime.spawn(async move {
                let answer = shared.merge.one(request).await;
                drop(slot);
                answer
            });
            return match statement.await {
                Ok(answer) => Ok(answer),
                Err(ended) if ended.is_panic() => std::panic::resume_unwind(ended.into_panic()),
                // Cancelled: its runtime is shutting down.
                Err(_) => Err(Lost),
            };
        }
        let (reply, answer) = oneshot::channel();
        let queued = Queued {
            request,
            reply,
            waiting: Some(Waiting::new(&self.shared.queued)),
        };
        match self.enqueue(queued) {
            Ok(()) => answer.await.map_err(|_| Lost),
            // No runtime to run a task on: run it here.
            Err(request) => Ok(self.shared.merge.one(request).await),
        }
    }

    /// Hands `queued` to the batcher's task, starting one if there is none
    /// (or it ended with its runtime); gives the request back outside a
    /// Tokio runtime.
    fn enqueue(&self, queued: Queued<M>) -> Result<(), M::Request> {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let queued = match queue.as_ref() {
            Some(sender) => match sender.send(queued) {
                Ok(()) => return Ok(()),
                // Its task ended with its runtime.
                Err(mpsc::error::SendError(queued)) => queued,
            },
            None => queued,
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Err(queued.request);
        };
        let (sender, receiver) = mpsc::unbounded_channel();
        runtime.spawn(serve(Arc::clone(&self.shared), receiver));
        let sent = sender.send(queued).map_err(|e| e.0.request);
        *queue = Some(sender);
        sent
    }
}

/// Counts a request in `queued` from the moment it is queued until it goes
/// into a statement or is dropped, wherever it is then (in the channel, in
/// the batcher's task, or gone with a runtime that shut down).
struct Waiting(Arc<AtomicUsize>);

impl Waiting {
    fn new(queued: &Arc<AtomicUsize>) -> Waiting {
        queued.fetch_add(1, Ordering::AcqRel);
        Waiting(Arc::clone(queued))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The batcher's task: takes the requests queued, waits for a free slot,
/// and runs those that fit together, with every request queued by then, as
/// one statement in a task of its own.
async fn serve<M: Merge>(shared: Arc<Shared<M>>, mut receiver: mpsc::UnboundedReceiver<Queued<M>>) {
    // Requests left over from statements they did not fit in, oldest first.
    let mut waiting: VecDeque<Queued<M>> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            let mut requests = Vec::new();
            if receiver
                .recv_many(&mut requests, M::MAX_PER_STATEMENT)
                .await
                == 0
            {
                // Every sender is gone: the batcher was dropped.
                return;
            }
            waiting.extend(requests);
        }
        let Ok(slot) = Arc::clone(&shared.slots).acquire_owned().await else {
            return;
        };
        // Those queued while every slot was busy go too.
        while let Ok(queued) = receiver.try_recv() {
            waiting.push_back(queued);
        }
        let mut fill = M::Fill::default();
        let mut statement = Vec::new();
        let mut left = VecDeque::with_capacity(waiting.len());
        for mut queued in waiting.drain(..) {
            if queued.reply.is_closed() {
                // Its caller gave up before it went out: nobody waits for it.
                continue;
            }
            if statement.len() < M::MAX_PER_STATEMENT
                && (shared.merge.admit(&mut fill, &queued.request) || statement.is_empty())
            {
                // The statement starts now: no longer waiting.
                queued.waiting = None;
                statement.push(queued);
            } else {
                left.push_back(queued);
            }
        }
        waiting = left;
        if statement.is_empty() {
            continue;
        }
        shared.statements.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(run_statement(Arc::clone(&shared), statement, slot));
    }
}

/// Runs `statement`'s requests, alone or merged, and answers each; if a
/// merged statement fails, runs each request on its own, still in `slot`.
async fn run_statement<M: Merge>(
    shared: Arc<Shared<M>>,
    statement: Vec<Queued<M>>,
    slot: OwnedSemaphorePermit,
) {
    if statement.len() == 1 {
        if let Some(queued) = statement.into_iter().next() {
            let answer = shared.merge.one(queued.request).await;
            // A caller that gave up no longer listens: nothing to do.
            let _ = queued.reply.send(answer);
        }
        drop(slot);
        return;
    }
    let (requests, replies): (Vec<M::Request>, Vec<Reply<M>>) =
        statement.into_iter().map(|q| (q.request, q.reply)).unzip();
    match shared.merge.merged(&requests).await {
        Ok(answers) => {
            let mut answers = answers.into_iter();
            for reply in replies {
                let answer = answers.next().unwrap_or_else(|| {
                    Err(StoreError::Corrupt(
                        "a merged statement gave fewer answers than it had requests".into(),
                    ))
                });
                let _ = reply.send(answer);
            }
        }
        Err(error) => match Unreachable::of(&error) {
            // The database is out of reach: each request alone would fail
            // the same way, each after as long a wait, all in this slot.
            Some(unreachable) => {
                for reply in replies {
                    let _ = reply.send(Err(unreachable.error()));
                }
            }
            None => {
                tracing::warn!(%error, requests = requests.len(), "a merged statement failed; running its requests one by one");
                for (request, reply) in requests.into_iter().zip(replies) {
                    if reply.is_closed() {
                        continue;
                    }
                    let answer = shared.merge.one(request).await;
                    let _ = reply.send(answer);
                }
            }
        },
    }
    drop(slot);
}

/// A failure that says the database could not be reached (no connection
/// in time, the pool closed, the connection broken): every request merged
/// into the failed statement gets an error of the same kind.
enum Unreachable {
    PoolTimedOut,
    PoolClosed,
    Io(std::io::ErrorKind, String),
}

impl Unreachable {
    fn of(error: &StoreError) -> Option<Unreachable> {
        match error {
            StoreError::Database(sqlx::Error::PoolTimedOut) => Some(Unreachable::PoolTimedOut),
            StoreError::Database(sqlx::Error::PoolClosed) => Some(Unreachable::PoolClosed),
            StoreError::Database(sqlx::Error::Io(io)) => {
                Some(Unreachable::Io(io.kind(), io.to_string()))
            }
            _ => None,
        }
    }

    fn error(&self) -> StoreError {
        StoreError::Database(match self {
            Unreachable::PoolTimedOut => sqlx::Error::PoolTimedOut,
            Unreachable::PoolClosed => sqlx::Error::PoolClosed,
            Unreachable::Io(kind, text) => {
                sqlx::Error::Io(std::io::Error::new(*kind, text.clone()))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt as _;

    use super::*;

    /// Requests `(key, tag)`: two with the same key never share a
    /// statement. Records the tags of every statement; each statement ends
    /// only with a pass.
    struct Keyed {
        statements: Mutex<Vec<Vec<&'static str>>>,
        passes: Semaphore,
    }

    #[async_trait]
    impl Merge for Arc<Keyed> {
        type Request = (u32, &'static str);
        type Answer = &'static str;
        type Fill = Vec<u32>;

        const IN_FLIGHT: usize = 1;
        const MAX_PER_STATEMENT: usize = 3;

        fn admit(&self, keys: &mut Vec<u32>, request: &Self::Request) -> bool {
            if keys.contains(&request.0) {
                return false;
            }
            keys.push(request.0);
            true
        }

        async fn one(&self, request: Self::Request) -> Result<&'static str, StoreError> {
            let answers = self.merged(&[request]).await?;
            answers.into_iter().next().unwrap_or(Ok("none"))
        }

        async fn merged(
            &self,
            requests: &[Self::Request],
        ) -> Result<Vec<Result<&'static str, StoreError>>, StoreError> {
            self.statements
                .lock()
                .expect("statements")
                .push(requests.iter().map(|(_, tag)| *tag).collect());
            if let Ok(pass) = self.passes.acquire().await {
                pass.forget();
            }
            Ok(requests.iter().map(|(_, tag)| Ok(*tag)).collect())
        }
    }

    #[tokio::test]
    async fn requests_that_cannot_share_a_statement_wait_for_the_next_without_holding_up_others() {
        let keyed = Arc::new(Keyed {
            statements: Mutex::new(Vec::new()),
            passes: Semaphore::new(0),
        });
        let batcher = Batcher::new(Arc::clone(&keyed));
        let mut first = Box::pin(batcher.run((1, "first")));
        assert!(
            (&mut first).now_or_never().is_none(),
            "held in its statement"
        );
        let mut queued = Vec::new();
        for request in [
            (1, "a"),
            (1, "b"),
            (2, "c"),
            (4, "gives up"),
            (3, "d"),
            (5, "e"),
        ] {
            let mut run = Box::pin(batcher.run(request));
            assert!((&mut run).now_or_never().is_none(), "queued");
            queued.push((request.1, run));
        }
        assert_eq!(batcher.queued(), 6);
        // A caller that gives up before its statement starts is not run.
        queued.retain(|(tag, _)| *tag != "gives up");
        keyed.passes.add_permits(100);

        assert_eq!(first.await.expect("not lost").expect("answer"), "first");
        for (tag, run) in queued {
            assert_eq!(run.await.expect("not lost").expect("answer"), tag);
        }
        let statements = keyed.statements.lock().expect("statements").clone();
        // "b" cannot go with "a"; "c" and "d" do not wait for it. At most
        // three a statement, so "e" goes with "b".
        assert_eq!(
            statements,
            vec![vec!["first"], vec!["a", "c", "d"], vec!["b", "e"]]
        );
        assert_eq!(batcher.statements(), 3);
        assert_eq!(batcher.queued(), 0);
    }
}
