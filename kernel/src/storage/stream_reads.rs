//! The [`StreamReadBatcher`]: concurrent reads of streams merged into one
//! statement.
//!
//! Under load most of a kernel's statements are small reads of a few
//! streams: a live order feed catching up after a wake-up, a command loading
//! its aggregates from their cached versions. Each costs a round trip and
//! the database's per-statement work, which at this size is most of its
//! cost. The batcher lets a few statements run at once ([`MAX_IN_FLIGHT`]).
//! A read that finds a slot free and nobody queued runs at once, from the
//! caller's own task. Otherwise it queues; the batcher's task takes every
//! read queued, waits for the next free slot, and runs them as one
//! statement over the union of their streams, each stream from the lowest
//! version asked. An idle kernel's reads therefore go out at once, alone,
//! as before; a busy one's share statements.
//!
//! Each read still sees everything committed before it was asked for: a
//! queued read is only ever put into a statement that starts after it was
//! queued, never onto one already running. Readability (whether the global
//! log shows an event yet) is decided by that statement's snapshot, as it
//! would be for a read of its own at that moment.
//!
//! When a merged statement fails, every read in it is run again on its own,
//! so each caller gets the error its own read gives (and none is lost when
//! the failure was another caller's doing). When the batcher's task is gone
//! (its runtime shut down), reads run on their own too.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use tokio::sync::{Semaphore, mpsc, oneshot};
use uuid::Uuid;

use crate::event_store::{RecordedEvent, StoreError};

/// Merged statements running at once. Two keeps both of this machine's
/// cores busy while the rest queue, and the queue is what gets merged.
pub const MAX_IN_FLIGHT: usize = 2;

/// Most reads merged into one statement.
const MAX_READS_PER_STATEMENT: usize = 256;

/// Events of streams after given versions, each with whether the global
/// log shows it yet: the contract of
/// [`EventStore::read_streams_after`](crate::event_store::EventStore::read_streams_after),
/// as one statement of a backend.
#[async_trait]
pub trait StreamsAfter: Send + Sync + 'static {
    async fn read(&self, streams: &[(Uuid, u32)])
    -> Result<Vec<(RecordedEvent, bool)>, StoreError>;
}

/// What a read gets back from the batcher: its events, or `None` when it
/// must read on its own (the merged statement failed).
type Reply = Option<Vec<(RecordedEvent, bool)>>;

struct QueuedRead {
    streams: Vec<(Uuid, u32)>,
    reply: oneshot::Sender<Reply>,
}

/// Merges concurrent stream reads into shared statements (see the module
/// docs). Its task starts on the first read that has to queue, on that
/// read's runtime, and ends when the batcher is dropped.
pub struct StreamReadBatcher<R: StreamsAfter> {
    shared: Arc<Shared<R>>,
    queue: OnceLock<mpsc::UnboundedSender<QueuedRead>>,
}

/// What the callers and the batcher's task share.
struct Shared<R> {
    reader: R,
    /// A permit per statement that may run now.
    slots: Arc<Semaphore>,
    /// Reads queued and not yet taken into a statement.
    queued: AtomicUsize,
    statements: AtomicU64,
}

impl<R: StreamsAfter> fmt::Debug for StreamReadBatcher<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamReadBatcher")
            .field("statements", &self.statements())
            .finish_non_exhaustive()
    }
}

impl<R: StreamsAfter> StreamReadBatcher<R> {
    pub fn new(reader: R) -> Self {
        StreamReadBatcher {
            shared: Arc::new(Shared {
                reader,
                slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
                queued: AtomicUsize::new(0),
                statements: AtomicU64::new(0),
            }),
            queue: OnceLock::new(),
        }
    }

    /// Statements run so far for reads, alone or merged (a read retried on
    /// its own after a merged statement failed is not counted).
    pub fn statements(&self) -> u64 {
        self.shared.statements.load(Ordering::Relaxed)
    }

    /// The events of each of `streams` after its version, in log order,
    /// each with whether the global log shows it yet: what
    /// [`StreamsAfter::read`] returns for `streams` alone.
    pub async fn read(
        &self,
        streams: &[(Uuid, u32)],
    ) -> Result<Vec<(RecordedEvent, bool)>, StoreError> {
        // A free slot and nobody waiting: the read goes out now, from this
        // task, without a hand-over to the batcher's (which costs wake-ups).
        if self.shared.queued.load(Ordering::Acquire) == 0
            && let Ok(_slot) = self.shared.slots.try_acquire()
        {
            self.shared.statements.fetch_add(1, Ordering::Relaxed);
            return self.shared.reader.read(streams).await;
        }
        let (reply, answer) = oneshot::channel();
        let queued = QueuedRead {
            streams: streams.to_vec(),
            reply,
        };
        if let Some(queue) = self.queue() {
            self.shared.queued.fetch_add(1, Ordering::AcqRel);
            match queue.send(queued) {
                Ok(()) => {
                    if let Ok(Some(events)) = answer.await {
                        return Ok(events);
                    }
                }
                Err(_) => {
                    self.shared.queued.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
        self.shared.reader.read(streams).await
    }

    /// The queue of the batcher's task, started now if this is the first
    /// read to queue; `None` outside a Tokio runtime.
    fn queue(&self) -> Option<&mpsc::UnboundedSender<QueuedRead>> {
        if let Some(queue) = self.queue.get() {
            return Some(queue);
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        Some(self.queue.get_or_init(|| {
            let (queue, queued) = mpsc::unbounded_channel();
            runtime.spawn(serve(Arc::clone(&self.shared), queued));
            queue
        }))
    }
}

/// The batcher's task: takes the reads queued, waits for a free slot, and
/// runs them, with every read queued by then, as one statement.
async fn serve<R: StreamsAfter>(
    shared: Arc<Shared<R>>,
    mut queued: mpsc::UnboundedReceiver<QueuedRead>,
) {
    loop {
        let mut reads = Vec::new();
        if queued.recv_many(&mut reads, MAX_READS_PER_STATEMENT).await == 0 {
            // Every sender is gone: the batcher was dropped.
            return;
        }
        let Ok(slot) = Arc::clone(&shared.slots).acquire_owned().await else {
            return;
        };
        // Those queued while every slot was busy go too.
        while reads.len() < MAX_READS_PER_STATEMENT {
            match queued.try_recv() {
                Ok(read) => reads.push(read),
                Err(_) => break,
            }
        }
        shared.queued.fetch_sub(reads.len(), Ordering::AcqRel);
        shared.statements.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            run_merged(&shared.reader, reads).await;
            drop(slot);
        });
    }
}

/// Reads the union of `reads`' streams, each from the lowest version any of
/// them asked for, and answers each read with its own part.
async fn run_merged<R: StreamsAfter>(reader: &R, reads: Vec<QueuedRead>) {
    let mut merged: HashMap<Uuid, u32> = HashMap::new();
    for read in &reads {
        for &(stream, after) in &read.streams {
            merged
                .entry(stream)
                .and_modify(|lowest| *lowest = (*lowest).min(after))
                .or_insert(after);
        }
    }
    let streams: Vec<(Uuid, u32)> = merged.into_iter().collect();
    let events = reader.read(&streams).await.ok();
    for read in reads {
        let part = events.as_ref().map(|events| part_of(events, &read.streams));
        // A caller that gave up no longer listens; nothing to do then.
        let _ = read.reply.send(part);
    }
}

/// The events of `events` (in log order) that a read of `streams` returns:
/// those of its streams after its versions, in the same order.
fn part_of(
    events: &[(RecordedEvent, bool)],
    streams: &[(Uuid, u32)],
) -> Vec<(RecordedEvent, bool)> {
    events
        .iter()
        .filter(|(event, _)| {
            streams
                .iter()
                .any(|&(stream, after)| event.aggregate_id == stream && event.version > after)
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Mutex;

    use chrono::Utc;
    use futures_util::FutureExt as _;
    use futures_util::future::join_all;

    use super::*;
    use crate::event_store::{EventMetadata, Position};

    /// Streams in memory, read as a backend would read them; counts its
    /// reads, and fails the next `fail` of them.
    #[derive(Default)]
    struct Memory {
        log: Vec<(RecordedEvent, bool)>,
        reads: AtomicU64,
        /// Reads of more streams than this fail (one caller's reads here
        /// are of 3 streams: only merged ones fail).
        fail_over: Mutex<Option<usize>>,
    }

    impl Memory {
        /// `per_stream` events in each of `streams`, interleaved in the log;
        /// the last `unreadable` of the log not shown yet.
        fn with(streams: &[Uuid], per_stream: u32, unreadable: usize) -> Memory {
            let mut log = Vec::new();
            for version in 1..=per_stream {
                for &stream in streams {
                    let sequence = log.len() as i64 + 1;
                    log.push((
                        RecordedEvent {
                            id: Uuid::now_v7(),
                            position: Position {
                                transaction_id: sequence,
                                sequence,
                            },
                            aggregate_id: stream,
                            aggregate_type: "thing".into(),
                            event_type: format!("E{version}"),
                            schema_version: 1,
                            data: serde_json::json!({ "version": version }),
                            version,
                            metadata: EventMetadata::default(),
                            created_at: Utc::now(),
                        },
                        true,
                    ));
                }
            }
            let shown = log.len().saturating_sub(unreadable);
            for (_, readable) in &mut log[shown..] {
                *readable = false;
            }
            Memory {
                log,
                ..Memory::default()
            }
        }
    }

    #[async_trait]
    impl StreamsAfter for Arc<Memory> {
        async fn read(
            &self,
            streams: &[(Uuid, u32)],
        ) -> Result<Vec<(RecordedEvent, bool)>, StoreError> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            // Yield as a round trip would, so reads queue meanwhile.
            tokio::task::yield_now().await;
            if let Ok(fail_over) = self.fail_over.lock()
                && fail_over.is_some_and(|most| streams.len() > most)
            {
                return Err(StoreError::Corrupt("the statement failed".into()));
            }
            Ok(alone(&self.log, streams))
        }
    }

    /// What a backend returns for `streams` alone, written apart from
    /// the batcher's own filter so that each checks the other.
    fn alone(log: &[(RecordedEvent, bool)], streams: &[(Uuid, u32)]) -> Vec<(RecordedEvent, bool)> {
        let mut events = Vec::new();
        for entry in log {
            let after = streams
                .iter()
                .filter(|(stream, _)| *stream == entry.0.aggregate_id)
                .map(|(_, after)| *after)
                .min();
            if after.is_some_and(|after| entry.0.version > after) {
                events.push(entry.clone());
            }
        }
        events
    }

    fn ids(events: &[(RecordedEvent, bool)]) -> Vec<(Uuid, bool)> {
        events
            .iter()
            .map(|(e, readable)| (e.id, *readable))
            .collect()
    }

    /// Reads of overlapping streams after different versions, 3 streams
    /// each out of 10, the i-th after version i % 4.
    fn overlapping_reads(streams: &[Uuid], count: usize) -> Vec<Vec<(Uuid, u32)>> {
        (0..count)
            .map(|i| {
                (0..3)
                    .map(|k| (streams[(i + k * 3) % streams.len()], (i % 4) as u32))
                    .collect()
            })
            .collect()
    }

    /// Two reads polled once: they take both slots and stay in flight.
    async fn occupy_both_slots<'a>(
        batcher: &'a StreamReadBatcher<Arc<Memory>>,
        read: &'a [(Uuid, u32)],
    ) -> Vec<Pin<Box<impl Future<Output = Result<Vec<(RecordedEvent, bool)>, StoreError>> + 'a>>>
    {
        let mut running = Vec::new();
        for _ in 0..MAX_IN_FLIGHT {
            let mut one = Box::pin(batcher.read(read));
            assert!((&mut one).now_or_never().is_none());
            running.push(one);
        }
        assert_eq!(batcher.statements(), MAX_IN_FLIGHT as u64);
        running
    }

    #[tokio::test]
    async fn concurrent_reads_share_statements_and_each_gets_what_it_asked_for() {
        let streams: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
        let memory = Arc::new(Memory::with(&streams, 6, 7));
        let batcher = StreamReadBatcher::new(Arc::clone(&memory));
        let reads = overlapping_reads(&streams, 64);

        let answers = join_all(reads.iter().map(|read| batcher.read(read))).await;

        // The first reads take the free slots; the rest queue meanwhile
        // and go together.
        let statements = memory.reads.load(Ordering::Relaxed);
        assert_eq!(
            statements,
            MAX_IN_FLIGHT as u64 + 1,
            "64 concurrent reads took {statements} statements"
        );
        assert_eq!(batcher.statements(), statements);
        for (read, answer) in reads.iter().zip(answers) {
            let answer = answer.expect("a merged read answers");
            let alone = alone(&memory.log, read);
            assert!(!alone.is_empty());
            assert_eq!(ids(&answer), ids(&alone), "read of {read:?}");
        }
    }

    #[tokio::test]
    async fn a_read_alone_goes_out_at_once_and_later_reads_see_later_events() {
        let streams: Vec<Uuid> = (0..2).map(|_| Uuid::now_v7()).collect();
        let memory = Arc::new(Memory::with(&streams, 3, 0));
        let batcher = StreamReadBatcher::new(Arc::clone(&memory));
        for after in 0..=3 {
            let read = [(streams[0], after), (streams[1], 0)];
            let answer = batcher.read(&read).await.expect("read");
            assert_eq!(ids(&answer), ids(&alone(&memory.log, &read)));
        }
        assert_eq!(memory.reads.load(Ordering::Relaxed), 4);
        assert_eq!(batcher.statements(), 4);
        // Nothing had to queue: the batcher's task never started.
        assert!(batcher.queue.get().is_none());
    }

    #[tokio::test]
    async fn a_failed_merged_statement_is_retried_read_by_read() {
        let streams: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
        let memory = Arc::new(Memory::with(&streams, 3, 0));
        *memory.fail_over.lock().expect("lock") = Some(3);
        let batcher = StreamReadBatcher::new(Arc::clone(&memory));
        let reads = overlapping_reads(&streams, 16);

        let answers = join_all(reads.iter().map(|read| batcher.read(read))).await;

        for (read, answer) in reads.iter().zip(answers) {
            let answer = answer.expect("the read on its own succeeds");
            assert_eq!(ids(&answer), ids(&alone(&memory.log, read)));
        }
        // Two reads alone, the failed merged statement of the other 14,
        // then each of those on its own.
        assert_eq!(batcher.statements(), MAX_IN_FLIGHT as u64 + 1);
        let retried = memory.reads.load(Ordering::Relaxed) - batcher.statements();
        assert_eq!(retried, 16 - MAX_IN_FLIGHT as u64);
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_does_not_hold_back_the_others_in_its_statement() {
        let streams: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
        let memory = Arc::new(Memory::with(&streams, 2, 0));
        let batcher = StreamReadBatcher::new(Arc::clone(&memory));
        let read = [(streams[0], 0), (streams[3], 1)];
        let running = occupy_both_slots(&batcher, &read).await;
        // Both queued while the slots are taken, so they share the next
        // statement; the first caller gives up before the answer.
        let mut given_up = Box::pin(batcher.read(&read));
        assert!((&mut given_up).now_or_never().is_none());
        let mut waiting = Box::pin(batcher.read(&read));
        assert!((&mut waiting).now_or_never().is_none());
        drop(given_up);
        let (answer, earlier) = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            futures_util::future::join(waiting, join_all(running)),
        )
        .await
        .expect("answered");
        for answer in earlier.into_iter().chain([answer]) {
            assert_eq!(ids(&answer.expect("read")), ids(&alone(&memory.log, &read)));
        }
        assert_eq!(batcher.statements(), MAX_IN_FLIGHT as u64 + 1);
        assert_eq!(memory.reads.load(Ordering::Relaxed), batcher.statements());
    }

    #[tokio::test]
    async fn a_read_waits_behind_queued_reads_instead_of_taking_a_freed_slot() {
        let streams: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
        let memory = Arc::new(Memory::with(&streams, 2, 0));
        let batcher = StreamReadBatcher::new(Arc::clone(&memory));
        let read = [(streams[1], 0)];
        let running = occupy_both_slots(&batcher, &read).await;
        let mut queued = Box::pin(batcher.read(&read));
        assert!((&mut queued).now_or_never().is_none());
        // A slot frees while a read is queued: a new read joins the queue.
        let mut running = running.into_iter();
        drop(running.next());
        let mut later = Box::pin(batcher.read(&read));
        assert!((&mut later).now_or_never().is_none());
        let (first, second, rest) =
            futures_util::future::join3(queued, later, join_all(running)).await;
        for answer in [first, second].into_iter().chain(rest) {
            assert_eq!(ids(&answer.expect("read")), ids(&alone(&memory.log, &read)));
        }
        assert_eq!(batcher.statements(), MAX_IN_FLIGHT as u64 + 1);
    }
}
