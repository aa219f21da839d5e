//! The [`StreamReadBatcher`]: concurrent reads of streams merged into one
//! statement, by a [`Batcher`].
//!
//! Under load most of a kernel's reads are of a few streams: a live order
//! feed catching up after a wake-up, a command loading its aggregates from
//! their cached versions. On Postgres two such statements may run at once
//! per process ([`MAX_IN_FLIGHT`]); reads asked for meanwhile queue and go
//! as one statement over the union of their streams, each stream from the
//! lowest version asked, and each caller gets its own part. Readability
//! (whether the global log shows an event yet) is decided by that
//! statement's snapshot, as it would be for a read of its own at that
//! moment.

use std::collections::HashMap;

use async_trait::async_trait;
use uuid::Uuid;

use crate::event_store::{MAX_STREAMS_PER_READ, RecordedEvent, StoreError};
use crate::storage::batcher::{Batcher, Lost, Merge};

/// Statements of stream reads running at once, per process. Two keeps both
/// of this machine's cores busy while the rest queue, and the queue is what
/// gets merged.
pub const MAX_IN_FLIGHT: usize = 2;

/// Most reads merged into one statement.
const MAX_READS_PER_STATEMENT: usize = 256;

/// Events of streams after given versions, each with whether the global
/// log shows it yet: the contract of
/// [`EventStore::read_streams_after`](crate::event_store::EventStore::read_streams_after)
/// for streams named once each, as one statement of a backend.
#[async_trait]
pub trait StreamsAfter: Send + Sync + 'static {
    async fn read(&self, streams: &[(Uuid, u32)])
    -> Result<Vec<(RecordedEvent, bool)>, StoreError>;
}

type Events = Vec<(RecordedEvent, bool)>;

/// Merges concurrent stream reads into shared statements (see the module
/// docs).
pub struct StreamReadBatcher<R: StreamsAfter> {
    batcher: Batcher<MergedReads<R>>,
}

impl<R: StreamsAfter> std::fmt::Debug for StreamReadBatcher<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReadBatcher")
            .field("statements", &self.statements())
            .finish_non_exhaustive()
    }
}

impl<R: StreamsAfter> StreamReadBatcher<R> {
    pub fn new(reader: R) -> Self {
        StreamReadBatcher {
            batcher: Batcher::new(MergedReads(reader)),
        }
    }

    /// Statements run so far for reads, alone or merged (a read run again
    /// on its own after a merged statement failed is not counted).
    pub fn statements(&self) -> u64 {
        self.batcher.statements()
    }

    /// The events of each of `streams` (each named once) after its
    /// version, in log order, each with whether the global log shows it
    /// yet: what [`StreamsAfter::read`] returns for `streams` alone.
    pub async fn read(&self, streams: &[(Uuid, u32)]) -> Result<Events, StoreError> {
        match self.batcher.run(streams.to_vec()).await {
            Ok(events) => events,
            // The batcher's task ended with its runtime while this read
            // waited: read on this one.
            Err(Lost) => self.batcher.merge().0.read(streams).await,
        }
    }
}

/// Reads as the [`Batcher`] merges them.
struct MergedReads<R>(R);

#[async_trait]
impl<R: StreamsAfter> Merge for MergedReads<R> {
    type Request = Vec<(Uuid, u32)>;
    type Answer = Events;
    /// Streams in the statement so far.
    type Fill = usize;

    const IN_FLIGHT: usize = MAX_IN_FLIGHT;
    const MAX_PER_STATEMENT: usize = MAX_READS_PER_STATEMENT;

    fn admit(&self, streams: &mut usize, read: &Self::Request) -> bool {
        if *streams > 0 && *streams + read.len() > MAX_STREAMS_PER_READ {
            return false;
        }
        *streams += read.len();
        true
    }

    async fn one(&self, read: Self::Request) -> Result<Events, StoreError> {
        self.0.read(&read).await
    }

    /// Reads the union of `reads`' streams, each from the lowest version any
    /// of them asked for, and gives each read its own part.
    async fn merged(
        &self,
        reads: &[Self::Request],
    ) -> Result<Vec<Result<Events, StoreError>>, StoreError> {
        let mut merged: HashMap<Uuid, u32> = HashMap::new();
        for read in reads {
            for &(stream, after) in read {
                merged
                    .entry(stream)
                    .and_modify(|lowest| *lowest = (*lowest).min(after))
                    .or_insert(after);
            }
        }
        let streams: Vec<(Uuid, u32)> = merged.into_iter().collect();
        let events = self.0.read(&streams).await?;
        Ok(reads
            .iter()
            .map(|read| Ok(part_of(&events, read)))
            .collect())
    }
}

/// The events of `events` (in log order) that a read of `streams` returns:
/// those of its streams after its versions, in the same order.
fn part_of(events: &[(RecordedEvent, bool)], streams: &[(Uuid, u32)]) -> Events {
    let after: HashMap<Uuid, u32> = streams.iter().copied().collect();
    events
        .iter()
        .filter(|(event, _)| {
            after
                .get(&event.aggregate_id)
                .is_some_and(|after| event.version > *after)
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use chrono::Utc;
    use futures_util::FutureExt as _;
    use futures_util::future::join_all;

    use super::*;
    use crate::event_store::{EventMetadata, Position};

    /// Streams in memory, read as a backend would read them: what a read
    /// returns is what the log held when it started. Counts its reads;
    /// each read ends only with a pass (`passes`, plenty unless a test
    /// takes them away).
    struct Memory {
        log: Mutex<Vec<(RecordedEvent, bool)>>,
        reads: AtomicU64,
        passes: tokio::sync::Semaphore,
        /// Reads of more streams than this fail (one caller's reads here
        /// are of 3 streams: only merged ones fail), with this error.
        fail_over: Mutex<Option<usize>>,
        failure: fn() -> StoreError,
        /// Reads running now, the most at once, the most streams in one.
        in_flight: AtomicUsize,
        most_in_flight: AtomicUsize,
        widest: AtomicUsize,
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
                log: Mutex::new(log),
                reads: AtomicU64::new(0),
                passes: tokio::sync::Semaphore::new(tokio::sync::Semaphore::MAX_PERMITS),
                fail_over: Mutex::new(None),
                failure: || StoreError::Corrupt("the statement failed".into()),
                in_flight: AtomicUsize::new(0),
                most_in_flight: AtomicUsize::new(0),
                widest: AtomicUsize::new(0),
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
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_in_flight.fetch_max(now, Ordering::SeqCst);
            self.widest.fetch_max(streams.len(), Ordering::SeqCst);
            let seen = self.log();
            // Yield as a round trip would, so reads queue meanwhile.
            tokio::task::yield_now().await;
            if let Ok(pass) = self.passes.acquire().await {
                pass.forget();
            }
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            if let Ok(fail_over) = self.fail_over.lock()
                && fail_over.is_some_and(|most| streams.len() > most)
            {
                return Err((self.failure)());
            }
            Ok(alone(&seen, streams))
        }
    }

    impl Memory {
        fn log(&self) -> Vec<(RecordedEvent, bool)> {
            self.log.lock().expect("log").clone()
        }

        /// Appends the next event of `stream`.
        fn append(&self, stream: Uuid) -> Uuid {
            let mut log = self.log.lock().expect("log");
            let mut event = log
                .iter()
                .rev()
                .find(|(event, _)| event.aggregate_id == stream)
                .map(|(event, _)| event.clone())
                .expect("an existing stream");
            let sequence = log.len() as i64 + 1;
            event.id = Uuid::now_v7();
            event.version += 1;
            event.position = Position {
                transaction_id: sequence,
                sequence,
            };
            let id = event.id;
            log.push((event, true));
            id
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
            let alone = alone(&memory.log(), read);
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
            assert_eq!(ids(&answer), ids(&alone(&memory.log(), &read)));
        }
        assert_eq!(memory.reads.load(Ordering::Relaxed), 4);
        assert_eq!(batcher.statements(), 4);
        // Nothing had to queue: the batcher's task never started.
        assert!(!batcher.batcher.task_started());
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
            assert_eq!(ids(&answer), ids(&alone(&memory.log(), read)));
        }
        // Two reads alone, the failed merged statement of the other 14,
        // then each of those on its own.
        assert_eq!(batcher.statements(), MAX_IN_FLIGHT as u64 + 1);
        let retried = memory.reads.load(Ordering::Relaxed) - batcher.statements();
        assert_eq!(retried, 16 - MAX_IN_FLIGHT as u64);
        // The retries ran in the failed statement's slot.
        assert!(memory.most_in_flight.load(Ordering::SeqCst) <= MAX_IN_FLIGHT);
        assert_eq!(batcher.batcher.queued(), 0);
    }

    #[tokio::test]
    async fn a_merged_statement_that_could_not_reach_the_database_is_not_retried() {
        let streams: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
        let mut memory = Memory::with(&streams, 3, 0);
        memory.failure = || StoreError::Database(sqlx::Error::PoolTimedOut);
        let memory = Arc::new(memory);
        *memory.fail_over.lock().expect("lock") = Some(3);
        let batcher = StreamReadBatcher::new(Arc::clone(&memory));
        let reads = overlapping_reads(&streams, 16);

        let answers = join_all(reads.iter().map(|read| batcher.read(read))).await;

        let timed_out = answers
            .iter()
            .filter(|answer| matches!(answer, Err(StoreError::Database(sqlx::Error::PoolTimedOut))))
            .count();
        assert_eq!(timed_out, 16 - MAX_IN_FLIGHT);
        assert_eq!(memory.reads.load(Ordering::Relaxed), batcher.statements());
    }

    #[tokio::test]
    async fn a_merged_statement_reads_at_most_max_streams_per_read() {
        let streams: Vec<Uuid> = (0..1_200).map(|_| Uuid::now_v7()).collect();
        let memory = Arc::new(Memory::with(&streams, 1, 0));
        let batcher = StreamReadBatcher::new(Arc::clone(&memory));
        let reads: Vec<Vec<(Uuid, u32)>> = streams
            .chunks(400)
            .map(|chunk| chunk.iter().map(|&stream| (stream, 0)).collect())
            .collect();
        let small = [(streams[0], 0)];
        let running = occupy_both_slots(&batcher, &small).await;

        let (answers, _) = futures_util::future::join(
            join_all(reads.iter().map(|read| batcher.read(read))),
            join_all(running),
        )
        .await;

        for (read, answer) in reads.iter().zip(answers) {
            assert_eq!(
                ids(&answer.expect("read")),
                ids(&alone(&memory.log(), read))
            );
        }
        assert!(memory.widest.load(Ordering::SeqCst) <= MAX_STREAMS_PER_READ);
        // 400 + 400 together, the last 400 in a statement of its own.
        assert_eq!(batcher.statements(), MAX_IN_FLIGHT as u64 + 2);
        assert_eq!(batcher.batcher.queued(), 0);
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
            assert_eq!(
                ids(&answer.expect("read")),
                ids(&alone(&memory.log(), &read))
            );
        }
        assert_eq!(batcher.statements(), MAX_IN_FLIGHT as u64 + 1);
        assert_eq!(memory.reads.load(Ordering::Relaxed), batcher.statements());
        assert_eq!(batcher.batcher.queued(), 0);
    }

    /// Lets the spawned tasks run until `done` holds (at most 1,000 turns).
    async fn until(done: impl Fn() -> bool) {
        for _ in 0..1_000 {
            if done() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("never happened");
    }

    #[tokio::test]
    async fn a_read_queued_while_a_merged_statement_runs_waits_for_the_next_one() {
        let streams: Vec<Uuid> = (0..2).map(|_| Uuid::now_v7()).collect();
        let memory = Arc::new(Memory::with(&streams, 2, 0));
        let batcher = StreamReadBatcher::new(Arc::clone(&memory));
        memory
            .passes
            .forget_permits(tokio::sync::Semaphore::MAX_PERMITS);
        let read = [(streams[0], 0), (streams[1], 0)];
        let running = occupy_both_slots(&batcher, &read).await;
        let mut first = Box::pin(batcher.read(&read));
        assert!((&mut first).now_or_never().is_none());
        until(|| memory.reads.load(Ordering::Relaxed) == 2).await;
        // One slot frees: the queued read's statement starts, and holds.
        memory.passes.add_permits(1);
        until(|| memory.reads.load(Ordering::Relaxed) == 3).await;

        let appended = memory.append(streams[0]);
        let mut second = Box::pin(batcher.read(&read));
        assert!((&mut second).now_or_never().is_none());
        memory.passes.add_permits(100);
        let (first, second, _) =
            futures_util::future::join3(first, second, join_all(running)).await;

        let saw = |answer: Result<Events, StoreError>| {
            answer
                .expect("read")
                .iter()
                .any(|(event, _)| event.id == appended)
        };
        assert!(
            !saw(first),
            "the statement under way started before the append"
        );
        assert!(saw(second), "a read asked for after the append must see it");
        assert_eq!(batcher.statements(), MAX_IN_FLIGHT as u64 + 2);
    }
}
