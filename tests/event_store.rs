//! The event store suite. Every case runs on the embedded SQLite backend and,
//! when `COMMERCE_TEST_DATABASE_URL` is set, on Postgres (see support/mod.rs).

#[macro_use]
mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use chrono::Utc;
use commerce_kernel::domain::{Aggregate, DomainEvent};
use commerce_kernel::event_store::{
    AggregateCache, AggregateRepository, AppendOutcome, AppendRequest, EventFilter, EventMetadata,
    EventStore, Loaded, NewEvent, Position, RecordedEvent, StoreError, StreamAppend,
    StreamSelection,
};
use commerce_kernel::storage::Database;
use commerce_kernel::storage::connection_shelf::{ConnectionShelf, SHELF_IDLE_LIMIT};
use serde::{Deserialize, Serialize};
use serde_json::json;
use support::{BackendKind, TestDatabase, run_suite_except, wait_until_readable};
use uuid::Uuid;

fn main() {
    run_suite_except(
        &cases![
            append_and_read_back,
            stale_expected_version_is_a_typed_conflict,
            concurrent_appends_at_one_version_have_one_winner,
            multi_stream_append_is_all_or_nothing,
            multi_stream_conflicts_are_typed,
            batch_keeps_its_order_in_the_log,
            idempotent_append_returns_the_original_outcome,
            idempotent_appends_racing_write_once,
            out_of_order_commits_are_never_skipped,
            log_followers_see_every_event_once_under_concurrent_writers,
            replay_equals_live_state,
            cached_loads_read_only_what_is_new_and_see_other_writers,
            streams_read_after_versions_in_log_order_saying_what_is_readable,
            streams_read_as_of_version_and_time,
            filters_narrow_the_log,
            invalid_appends_are_rejected_and_write_nothing,
            statements_shelve_only_connections_they_left_clean,
            shelved_connections_unused_for_a_while_are_checked_or_given_back,
        ],
        &[
            "statements_shelve_only_connections_they_left_clean",
            "shelved_connections_unused_for_a_while_are_checked_or_given_back",
        ],
    );
}

fn event(event_type: &str, data: serde_json::Value) -> NewEvent {
    NewEvent::new(event_type, data)
}

fn single(id: Uuid, expected: u32, events: Vec<NewEvent>) -> AppendRequest {
    AppendRequest::single(id, "account", expected, events)
}

/// Every event of the log, once readers can see `through` (see [`wait_until_readable`]).
async fn whole_log(
    store: &dyn EventStore,
    through: Position,
) -> anyhow::Result<Vec<RecordedEvent>> {
    wait_until_readable(store, through).await?;
    let mut all: Vec<RecordedEvent> = Vec::new();
    let mut cursor = Position::START;
    loop {
        let page = store.read_all(cursor, 100).await?;
        let Some(last) = page.last() else {
            return Ok(all);
        };
        cursor = last.position;
        all.extend(page);
    }
}

async fn append_and_read_back(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let store = db.event_store();
    let id = Uuid::now_v7();
    let metadata = EventMetadata {
        correlation_id: Some(Uuid::now_v7()),
        causation_id: Some(Uuid::now_v7()),
        actor: Some("admin:alice".into()),
        trace_parent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?),
    };
    let mut events = vec![
        event("Opened", json!({"owner": "alice", "limit": "100.00"})),
        event("Deposited", json!({"amount": "12.50"})),
        event("Deposited", json!({"amount": "0.01", "note": "ünïcödé ✓"})),
    ];
    events[2].schema_version = 3;
    let sent = events.clone();
    let before = Utc::now();
    let outcome = store
        .append(single(id, 0, events).with_metadata(metadata.clone()))
        .await?;
    ensure!(!outcome.replayed);
    ensure!(outcome.stream_versions.len() == 1 && outcome.stream_versions[0].version == 3);

    let stream = store.read_stream(id, StreamSelection::default()).await?;
    ensure!(stream.len() == 3, "read {} events", stream.len());
    for (i, (stored, original)) in stream.iter().zip(&sent).enumerate() {
        ensure!(stored.id == original.id);
        ensure!(stored.event_type == original.event_type);
        ensure!(stored.data == original.data, "data of event {i}");
        ensure!(stored.schema_version == original.schema_version);
        ensure!(stored.version == i as u32 + 1);
        ensure!(stored.aggregate_id == id && stored.aggregate_type == "account");
        ensure!(stored.metadata == metadata);
        ensure!(stored.created_at >= before - chrono::Duration::seconds(5));
    }
    ensure!(stream[2].position == outcome.last_position);
    ensure!(store.stream_version(id).await? == 3);
    ensure!(store.stream_version(Uuid::now_v7()).await? == 0);
    ensure!(whole_log(store.as_ref(), outcome.last_position).await? == stream);
    ensure!(store.head().await? == outcome.last_position);
    ensure!(
        store
            .read_stream(Uuid::now_v7(), StreamSelection::default())
            .await?
            .is_empty()
    );

    // The metadata survives the other append statements too: one event
    // alone, several streams at once, an idempotency key.
    let (one, other) = (Uuid::now_v7(), Uuid::now_v7());
    let shapes = [
        single(one, 0, vec![event("Opened", json!({}))]),
        AppendRequest {
            streams: vec![
                single(one, 1, vec![event("Deposited", json!({}))])
                    .streams
                    .remove(0),
                single(other, 0, vec![event("Opened", json!({}))])
                    .streams
                    .remove(0),
            ],
            metadata: EventMetadata::default(),
            idempotency_key: None,
        },
        single(other, 1, vec![event("Deposited", json!({}))])
            .with_idempotency_key(format!("metadata-{other}")),
    ];
    for shape in shapes {
        store.append(shape.with_metadata(metadata.clone())).await?;
    }
    for stream in [one, other] {
        let events = store
            .read_stream(stream, StreamSelection::default())
            .await?;
        ensure!(events.len() == 2);
        ensure!(events.iter().all(|e| e.metadata == metadata), "{events:?}");
    }
    Ok(())
}

async fn stale_expected_version_is_a_typed_conflict(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let store = db.event_store();
    let id = Uuid::now_v7();
    let opened = store
        .append(single(id, 0, vec![event("Opened", json!({}))]))
        .await?;

    for (expected, actual) in [(0, 1), (5, 1)] {
        match store
            .append(single(id, expected, vec![event("Deposited", json!({}))]))
            .await
        {
            Err(StoreError::VersionConflict {
                aggregate_id,
                expected: e,
                actual: a,
            }) => ensure!(aggregate_id == id && e == expected && a == actual),
            other => bail!("expected a conflict at {expected}, got {other:?}"),
        }
    }
    match store
        .append(single(
            Uuid::now_v7(),
            2,
            vec![event("Deposited", json!({}))],
        ))
        .await
    {
        Err(StoreError::VersionConflict { actual: 0, .. }) => {}
        other => bail!("appending past a missing stream should conflict, got {other:?}"),
    }
    ensure!(
        store
            .read_stream(id, StreamSelection::default())
            .await?
            .len()
            == 1
    );
    ensure!(
        whole_log(store.as_ref(), opened.last_position).await?.len() == 1,
        "a conflict wrote something"
    );
    Ok(())
}

async fn concurrent_appends_at_one_version_have_one_winner(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    const WRITERS: usize = 24;
    let store = db.event_store();
    let id = Uuid::now_v7();
    store
        .append(single(id, 0, vec![event("Opened", json!({}))]))
        .await?;

    let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS));
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let store = Arc::clone(&store);
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            store
                .append(single(
                    id,
                    1,
                    vec![event("Deposited", json!({ "writer": writer }))],
                ))
                .await
        }));
    }
    let (mut won, mut conflicted) = (0, 0);
    for task in tasks {
        match task.await? {
            Ok(outcome) => {
                ensure!(outcome.stream_versions[0].version == 2);
                won += 1;
            }
            Err(StoreError::VersionConflict {
                expected: 1,
                actual: 2,
                ..
            }) => conflicted += 1,
            Err(other) => bail!("unexpected error: {other}"),
        }
    }
    ensure!(
        won == 1 && conflicted == WRITERS - 1,
        "{won} won, {conflicted} conflicted"
    );
    let stream = store.read_stream(id, StreamSelection::default()).await?;
    ensure!(stream.len() == 2 && store.stream_version(id).await? == 2);
    Ok(())
}

async fn multi_stream_append_is_all_or_nothing(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let store = db.event_store();
    let (fresh, existing) = (Uuid::now_v7(), Uuid::now_v7());
    store
        .append(single(existing, 0, vec![event("Opened", json!({}))]))
        .await?;

    let request = |existing_expected: u32| AppendRequest {
        streams: vec![
            StreamAppend {
                aggregate_id: fresh,
                aggregate_type: "order".into(),
                expected_version: 0,
                events: vec![event("Placed", json!({})), event("Priced", json!({}))],
            },
            StreamAppend {
                aggregate_id: existing,
                aggregate_type: "account".into(),
                expected_version: existing_expected,
                events: vec![event("Withdrawn", json!({}))],
            },
        ],
        metadata: EventMetadata::default(),
        idempotency_key: None,
    };
    match store.append(request(0)).await {
        Err(StoreError::VersionConflict { aggregate_id, .. }) => ensure!(aggregate_id == existing),
        other => bail!("expected a conflict on the second stream, got {other:?}"),
    }
    ensure!(
        store.stream_version(fresh).await? == 0,
        "first stream written despite the conflict"
    );
    ensure!(
        store
            .read_stream(fresh, StreamSelection::default())
            .await?
            .is_empty()
    );

    let outcome = store.append(request(1)).await?;
    let versions: Vec<(Uuid, u32)> = outcome
        .stream_versions
        .iter()
        .map(|v| (v.aggregate_id, v.version))
        .collect();
    ensure!(versions == vec![(fresh, 2), (existing, 2)], "{versions:?}");
    let log = whole_log(store.as_ref(), outcome.last_position).await?;
    ensure!(log.len() == 4);
    let transaction = log[1].position.transaction_id;
    ensure!(
        log[1..]
            .iter()
            .all(|e| e.position.transaction_id == transaction),
        "one append, one transaction"
    );
    Ok(())
}

/// Appends that span several streams (or carry an idempotency key) take a
/// different path on Postgres than single-stream ones; their conflicts must be
/// just as typed: a stream behind, ahead (also when racing) or of another type.
async fn multi_stream_conflicts_are_typed(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    const WRITERS: usize = 12;
    let store = db.event_store();
    let account = Uuid::now_v7();
    store
        .append(single(account, 0, vec![event("Opened", json!({}))]))
        .await?;
    let two_streams = |account_type: &str, expected: u32| AppendRequest {
        streams: vec![
            StreamAppend {
                aggregate_id: Uuid::now_v7(),
                aggregate_type: "order".into(),
                expected_version: 0,
                events: vec![event("Placed", json!({}))],
            },
            StreamAppend {
                aggregate_id: account,
                aggregate_type: account_type.into(),
                expected_version: expected,
                events: vec![event("Withdrawn", json!({}))],
            },
        ],
        metadata: EventMetadata::default(),
        idempotency_key: None,
    };

    match store.append(two_streams("account", 3)).await {
        Err(StoreError::VersionConflict {
            aggregate_id,
            expected: 3,
            actual: 1,
        }) if aggregate_id == account => {}
        other => bail!("expected a conflict (behind), got {other:?}"),
    }
    match store.append(two_streams("wallet", 1)).await {
        Err(StoreError::AggregateTypeMismatch {
            existing,
            requested,
            ..
        }) if existing == "account" && requested == "wallet" => {}
        other => bail!("expected a type mismatch, got {other:?}"),
    }

    let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS));
    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
        let request = two_streams("account", 1);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            store.append(request).await
        }));
    }
    let (mut won, mut conflicted) = (0, 0);
    for task in tasks {
        match task.await? {
            Ok(_) => won += 1,
            Err(StoreError::VersionConflict {
                expected: 1,
                actual: 2,
                ..
            }) => conflicted += 1,
            Err(other) => bail!("unexpected error: {other:?}"),
        }
    }
    ensure!(
        won == 1 && conflicted == WRITERS - 1,
        "{won} won, {conflicted} conflicted"
    );
    ensure!(store.stream_version(account).await? == 2);
    Ok(())
}

async fn batch_keeps_its_order_in_the_log(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let store = db.event_store();
    let id = Uuid::now_v7();
    let events: Vec<NewEvent> = (0..50)
        .map(|i| event("Deposited", json!({ "n": i })))
        .collect();
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let outcome = store.append(single(id, 0, events)).await?;
    let log = whole_log(store.as_ref(), outcome.last_position).await?;
    ensure!(
        log.iter().map(|e| e.id).collect::<Vec<_>>() == ids,
        "log order differs from append order"
    );
    ensure!(log.iter().map(|e| e.version).eq(1..=50));
    ensure!(log.windows(2).all(|w| w[0].position < w[1].position));
    ensure!(log.last().map(|e| e.position) == Some(outcome.last_position));
    Ok(())
}

async fn idempotent_append_returns_the_original_outcome(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let store = db.event_store();
    let id = Uuid::now_v7();
    let first = store
        .append(single(id, 0, vec![event("Opened", json!({}))]).with_idempotency_key("open:42"))
        .await?;
    ensure!(!first.replayed);
    let deposit = store
        .append(single(id, 1, vec![event("Deposited", json!({}))]))
        .await?;

    // The retry carries new event ids and a now-stale expected version: it must
    // still get the first outcome, not a conflict, and write nothing.
    let retry = store
        .append(single(id, 0, vec![event("Opened", json!({}))]).with_idempotency_key("open:42"))
        .await?;
    ensure!(retry.replayed);
    ensure!(retry.stream_versions == first.stream_versions);
    ensure!(retry.last_position == first.last_position);
    ensure!(
        store
            .read_stream(id, StreamSelection::default())
            .await?
            .len()
            == 2
    );

    // A key is global: reused for another aggregate it still returns the first outcome.
    let elsewhere = store
        .append(
            single(Uuid::now_v7(), 0, vec![event("Opened", json!({}))])
                .with_idempotency_key("open:42"),
        )
        .await?;
    ensure!(elsewhere.replayed && elsewhere.stream_versions[0].aggregate_id == id);
    ensure!(
        whole_log(store.as_ref(), deposit.last_position)
            .await?
            .len()
            == 2
    );
    Ok(())
}

async fn idempotent_appends_racing_write_once(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    const RACERS: usize = 16;
    let store = db.event_store();
    // Like a client retrying "place order": each attempt mints a new order id;
    // only one order may come to exist, and every attempt must learn which.
    let barrier = Arc::new(tokio::sync::Barrier::new(RACERS));
    let mut tasks = Vec::new();
    for _ in 0..RACERS {
        let store = Arc::clone(&store);
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            let request =
                AppendRequest::single(Uuid::now_v7(), "order", 0, vec![event("Placed", json!({}))])
                    .with_idempotency_key("place-order:client-7:attempt-1");
            barrier.wait().await;
            store.append(request).await
        }));
    }
    let mut outcomes: Vec<AppendOutcome> = Vec::new();
    for task in tasks {
        outcomes.push(task.await?.context("a racing idempotent append failed")?);
    }
    let fresh = outcomes.iter().filter(|o| !o.replayed).count();
    ensure!(fresh == 1, "{fresh} appends wrote");
    let winner = outcomes.iter().find(|o| !o.replayed).context("no writer")?;
    for outcome in &outcomes {
        ensure!(outcome.stream_versions == winner.stream_versions);
        ensure!(outcome.last_position == winner.last_position);
    }
    let log = whole_log(store.as_ref(), winner.last_position).await?;
    ensure!(log.len() == 1 && log[0].aggregate_id == winner.stream_versions[0].aggregate_id);
    Ok(())
}

async fn out_of_order_commits_are_never_skipped(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let store = db.event_store();
    let seed = store
        .append(single(Uuid::now_v7(), 0, vec![event("Opened", json!({}))]))
        .await?;
    let cursor = seed.last_position;

    // T1 appends and stays open; T2 starts after it and tries to commit first.
    let held = db
        .hold_append(single(Uuid::now_v7(), 0, vec![event("Early", json!({}))]))
        .await?;
    let later = tokio::spawn({
        let store = Arc::clone(&store);
        async move {
            store
                .append(single(Uuid::now_v7(), 0, vec![event("Late", json!({}))]))
                .await
        }
    });
    let later_committed_first = tokio::time::timeout(Duration::from_millis(500), async {
        while !later.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .is_ok();
    match db.kind {
        // The case under test: T2 committed while T1, with an earlier position, is open.
        BackendKind::Postgres => {
            ensure!(later_committed_first, "T2 did not commit while T1 was open")
        }
        // SQLite's single writer makes T2 wait for T1: the log cannot reorder.
        BackendKind::Sqlite => ensure!(
            !later_committed_first,
            "T2 wrote while T1 held the write lock"
        ),
    }

    // A follower must not move past T1's position while T1 may still commit.
    let visible = store.read_all(cursor, 100).await?;
    ensure!(
        visible.is_empty(),
        "read {:?} while an earlier transaction was open",
        visible.iter().map(|e| &e.event_type).collect::<Vec<_>>()
    );

    held.commit().await?;
    later.await??;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let caught_up = loop {
        let events = store.read_all(cursor, 100).await?;
        if events.len() >= 2 || tokio::time::Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let types: Vec<&str> = caught_up.iter().map(|e| e.event_type.as_str()).collect();
    ensure!(types == ["Early", "Late"], "follower read {types:?}");
    ensure!(caught_up[0].position < caught_up[1].position);
    Ok(())
}

async fn log_followers_see_every_event_once_under_concurrent_writers(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    const WRITERS: usize = 6;
    const APPENDS: usize = 40;
    let store = db.event_store();
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let store = Arc::clone(&store);
        writers.push(tokio::spawn(async move {
            let id = Uuid::now_v7();
            let mut version = 0;
            for append in 0..APPENDS {
                // Mix single events and small batches.
                let count = 1 + (writer + append) % 3;
                let events = (0..count)
                    .map(|i| event("Deposited", json!({"w": writer, "a": append, "i": i})))
                    .collect();
                version = store
                    .append(single(id, version, events))
                    .await?
                    .stream_versions[0]
                    .version;
            }
            Ok::<u32, StoreError>(version)
        }));
    }
    let follower = tokio::spawn({
        let store = Arc::clone(&store);
        async move {
            let mut seen = Vec::new();
            let mut cursor = Position::START;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let page = store.read_all(cursor, 7).await?;
                if let Some(last) = page.last() {
                    cursor = last.position;
                }
                let empty = page.is_empty();
                seen.extend(page);
                if empty {
                    if tokio::time::Instant::now() > deadline || seen.len() >= expected_total() {
                        return Ok::<_, StoreError>(seen);
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    });
    let mut total = 0u64;
    for writer in writers {
        total += u64::from(writer.await??);
    }
    ensure!(total as usize == expected_total());
    let seen = follower.await??;

    let unique: HashSet<Uuid> = seen.iter().map(|e| e.id).collect();
    ensure!(
        unique.len() == seen.len(),
        "the follower read an event twice"
    );
    ensure!(
        seen.len() == expected_total(),
        "the follower saw {} of {} events",
        seen.len(),
        expected_total()
    );
    let mut versions: HashMap<Uuid, u32> = HashMap::new();
    for event in &seen {
        let last = versions
            .insert(event.aggregate_id, event.version)
            .unwrap_or(0);
        ensure!(
            event.version == last + 1,
            "stream {} read out of order",
            event.aggregate_id
        );
    }
    ensure!(seen.windows(2).all(|w| w[0].position < w[1].position));
    return Ok(());

    fn expected_total() -> usize {
        (0..WRITERS)
            .map(|w| (0..APPENDS).map(|a| 1 + (w + a) % 3).sum::<usize>())
            .sum()
    }
}

/// A small aggregate for replay tests: an account with a balance in cents.
#[derive(Debug, Default, Clone, PartialEq)]
struct Account {
    owner: Option<String>,
    balance_cents: i64,
    frozen: bool,
    transactions: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
enum AccountEvent {
    Opened { owner: String },
    Deposited { cents: i64 },
    Withdrawn { cents: i64 },
    Frozen,
}

impl DomainEvent for AccountEvent {}

impl Aggregate for Account {
    const AGGREGATE_TYPE: &'static str = "account";
    type Event = AccountEvent;

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened { owner } => self.owner = Some(owner.clone()),
            AccountEvent::Deposited { cents } => {
                self.balance_cents += cents;
                self.transactions += 1;
            }
            AccountEvent::Withdrawn { cents } => {
                self.balance_cents -= cents;
                self.transactions += 1;
            }
            AccountEvent::Frozen => self.frozen = true,
        }
    }
}

async fn replay_equals_live_state(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let repository = AggregateRepository::<Account>::new(db.event_store());
    let id = Uuid::now_v7();
    let mut live = Account::default();
    let mut history = vec![live.clone()];
    let mut version = 0;
    let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut pending = vec![AccountEvent::Opened {
        owner: "alice".into(),
    }];
    for _ in 0..40 {
        for _ in 0..=(next() % 3) {
            let cents = (next() % 10_000) as i64;
            pending.push(match next() % 10 {
                0 => AccountEvent::Frozen,
                1..=5 => AccountEvent::Deposited { cents },
                _ => AccountEvent::Withdrawn { cents },
            });
        }
        let outcome = repository
            .append(id, version, &pending, EventMetadata::default(), None)
            .await?;
        for event in pending.drain(..) {
            live.apply(&event);
            history.push(live.clone());
        }
        version = outcome.stream_versions[0].version;
    }
    let loaded = repository.load(id).await?;
    ensure!(loaded.version == version && loaded.version as usize == history.len() - 1);
    ensure!(
        loaded.state == live,
        "replayed {:?} but live state is {:?}",
        loaded.state,
        live
    );
    for at in [0, 1, 7, version / 2, version] {
        let past = repository.load_at_version(id, at).await?;
        ensure!(
            past.version == at && past.state == history[at as usize],
            "state at version {at}"
        );
    }
    Ok(())
}

/// A repository with an [`AggregateCache`] folds only the events after the
/// cached version, and still sees what another process (another cache)
/// wrote; an append from a stale load is refused as always.
async fn cached_loads_read_only_what_is_new_and_see_other_writers(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let store = db.event_store();
    let ours = AggregateRepository::<Account>::cached(
        Arc::clone(&store),
        Arc::new(AggregateCache::new(100)),
    );
    let theirs = AggregateRepository::<Account>::cached(
        Arc::clone(&store),
        Arc::new(AggregateCache::new(100)),
    );
    let uncached = AggregateRepository::<Account>::new(Arc::clone(&store));
    let id = Uuid::now_v7();
    let deposit = |cents| AccountEvent::Deposited { cents };
    let mut opening = vec![AccountEvent::Opened {
        owner: "carol".into(),
    }];
    opening.extend((1..=9).map(deposit));
    ours.append(id, 0, &opening, EventMetadata::default(), None)
        .await?;
    let first = ours.load(id).await?;
    ensure!(
        first.version == 10 && first.state.balance_cents == 45,
        "{first:?}"
    );

    // Another process moves the stream on; our next load sees it.
    theirs
        .append(
            id,
            10,
            &[deposit(100), deposit(200)],
            EventMetadata::default(),
            None,
        )
        .await?;
    let second = ours.load(id).await?;
    let replayed = uncached.load(id).await?;
    ensure!(
        second == replayed && second.version == 12,
        "{second:?} vs {replayed:?}"
    );
    let stale = ours
        .append(id, 10, &[deposit(1)], EventMetadata::default(), None)
        .await;
    ensure!(
        matches!(stale, Err(StoreError::VersionConflict { actual: 12, .. })),
        "{stale:?}"
    );

    // Only the events after the cached version are read: a cache that
    // (wrongly) says the balance was a million shows through.
    let cache = Arc::new(AggregateCache::new(100));
    let mut marked = replayed.clone();
    marked.state.balance_cents = 1_000_000;
    cache.put(id, &marked);
    theirs
        .append(id, 12, &[deposit(5)], EventMetadata::default(), None)
        .await?;
    let incremental =
        AggregateRepository::<Account>::cached(Arc::clone(&store), Arc::clone(&cache))
            .load(id)
            .await?;
    ensure!(
        incremental
            == Loaded {
                state: Account {
                    balance_cents: 1_000_005,
                    transactions: marked.state.transactions + 1,
                    ..marked.state.clone()
                },
                version: 13,
            },
        "{incremental:?}"
    );

    // Several at once, in the order asked (a repeat and a missing stream
    // among them), each from its cached version: the same as one by one.
    let other = Uuid::now_v7();
    theirs
        .append(other, 0, &opening, EventMetadata::default(), None)
        .await?;
    theirs
        .append(id, 13, &[deposit(7)], EventMetadata::default(), None)
        .await?;
    let missing = Uuid::now_v7();
    let many = ours.load_many(&[id, other, missing, id]).await?;
    let mut one_by_one = Vec::new();
    for each in [id, other, missing, id] {
        one_by_one.push(uncached.load(each).await?);
    }
    ensure!(many == one_by_one, "{many:?} vs {one_by_one:?}");
    let marked_many = AggregateRepository::<Account>::cached(Arc::clone(&store), cache)
        .load_many(&[id])
        .await?;
    ensure!(
        marked_many
            .first()
            .is_some_and(|loaded| loaded.version == 14 && loaded.state.balance_cents == 1_000_012),
        "only what is new read onto the cached state: {marked_many:?}"
    );
    Ok(())
}

/// What an order's live feed reads at each wake-up: several streams after
/// known versions in one read, in log order, each event saying whether the
/// global log shows it yet.
async fn streams_read_after_versions_in_log_order_saying_what_is_readable(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let store = db.event_store();
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    store
        .append(single(a, 0, vec![event("A1", json!({}))]))
        .await?;
    store
        .append(single(b, 0, vec![event("B1", json!({}))]))
        .await?;
    let last = store
        .append(single(a, 1, vec![event("A2", json!({}))]))
        .await?;
    wait_until_readable(store.as_ref(), last.last_position).await?;
    let read = |after: [(Uuid, u32); 2]| {
        let store = Arc::clone(&store);
        async move {
            let events = store.read_streams_after(&after).await?;
            anyhow::Ok(
                events
                    .into_iter()
                    .map(|(event, readable)| (event.event_type, readable))
                    .collect::<Vec<_>>(),
            )
        }
    };
    let all = read([(a, 0), (b, 0)]).await?;
    ensure!(
        all == [
            ("A1".into(), true),
            ("B1".into(), true),
            ("A2".into(), true)
        ],
        "{all:?}"
    );
    let newer = read([(a, 1), (b, 1)]).await?;
    ensure!(newer == [("A2".to_string(), true)], "{newer:?}");

    if db.kind == BackendKind::Postgres {
        // An append committed behind an open transaction: read, but not
        // readable until that transaction ends.
        let held = db
            .hold_append(single(Uuid::now_v7(), 0, vec![event("Held", json!({}))]))
            .await?;
        let behind = store
            .append(single(b, 1, vec![event("B2", json!({}))]))
            .await?;
        let waiting = read([(a, 2), (b, 1)]).await?;
        ensure!(waiting == [("B2".to_string(), false)], "{waiting:?}");
        held.commit().await?;
        wait_until_readable(store.as_ref(), behind.last_position).await?;
        let shown = read([(a, 2), (b, 1)]).await?;
        ensure!(shown == [("B2".to_string(), true)], "{shown:?}");
    }
    Ok(())
}

async fn streams_read_as_of_version_and_time(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let store = db.event_store();
    let repository = AggregateRepository::<Account>::new(Arc::clone(&store));
    let id = Uuid::now_v7();
    let opened = [
        AccountEvent::Opened {
            owner: "bob".into(),
        },
        AccountEvent::Deposited { cents: 500 },
    ];
    repository
        .append(id, 0, &opened, EventMetadata::default(), None)
        .await?;
    tokio::time::sleep(Duration::from_millis(30)).await;
    let between = Utc::now();
    tokio::time::sleep(Duration::from_millis(30)).await;
    repository
        .append(
            id,
            2,
            &[AccountEvent::Withdrawn { cents: 200 }],
            EventMetadata::default(),
            None,
        )
        .await?;

    let then = repository.load_as_of(id, between).await?;
    ensure!(
        then.version == 2 && then.state.balance_cents == 500,
        "{then:?}"
    );
    let now = repository.load_as_of(id, Utc::now()).await?;
    ensure!(now.version == 3 && now.state.balance_cents == 300);
    let before_anything = repository
        .load_as_of(id, between - chrono::Duration::days(1))
        .await?;
    ensure!(before_anything.version == 0 && before_anything.state == Account::default());
    let by_version = store
        .read_stream(
            id,
            StreamSelection {
                to_version: Some(1),
                ..StreamSelection::default()
            },
        )
        .await?;
    ensure!(by_version.len() == 1 && by_version[0].event_type == "Opened");
    let after_first = store
        .read_stream(
            id,
            StreamSelection {
                after_version: Some(1),
                to_version: Some(2),
                ..StreamSelection::default()
            },
        )
        .await?;
    ensure!(after_first.len() == 1 && after_first[0].version == 2);
    // Asking past the end gives the whole stream.
    ensure!(repository.load_at_version(id, 99).await?.version == 3);
    Ok(())
}

async fn filters_narrow_the_log(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let store = db.event_store();
    let correlation = Uuid::now_v7();
    let (account, order) = (Uuid::now_v7(), Uuid::now_v7());
    store
        .append(single(
            account,
            0,
            vec![event("Opened", json!({})), event("Deposited", json!({}))],
        ))
        .await?;
    store
        .append(
            AppendRequest::single(order, "order", 0, vec![event("Placed", json!({}))])
                .with_metadata(EventMetadata {
                    correlation_id: Some(correlation),
                    ..EventMetadata::default()
                }),
        )
        .await?;
    let last = store
        .append(single(
            Uuid::now_v7(),
            0,
            vec![event("Deposited", json!({}))],
        ))
        .await?;
    // Another case may hold a transaction open, which pauses log readers.
    wait_until_readable(store.as_ref(), last.last_position).await?;

    let count = |filter: EventFilter| {
        let store = Arc::clone(&store);
        async move {
            anyhow::Ok(
                store
                    .read_all_matching(&filter, Position::START, 100)
                    .await?
                    .len(),
            )
        }
    };
    ensure!(
        count(EventFilter {
            aggregate_type: Some("account".into()),
            ..Default::default()
        })
        .await?
            == 3
    );
    ensure!(
        count(EventFilter {
            event_type: Some("Deposited".into()),
            ..Default::default()
        })
        .await?
            == 2
    );
    ensure!(
        count(EventFilter {
            aggregate_id: Some(account),
            ..Default::default()
        })
        .await?
            == 2
    );
    ensure!(
        count(EventFilter {
            correlation_id: Some(correlation),
            ..Default::default()
        })
        .await?
            == 1
    );
    ensure!(
        count(EventFilter {
            aggregate_id: Some(account),
            event_type: Some("Placed".into()),
            ..Default::default()
        })
        .await?
            == 0
    );
    // Paging a filtered read with a small limit still reaches every match.
    let first = store
        .read_all_matching(
            &EventFilter {
                aggregate_type: Some("account".into()),
                ..Default::default()
            },
            Position::START,
            2,
        )
        .await?;
    let rest = store
        .read_all_matching(
            &EventFilter {
                aggregate_type: Some("account".into()),
                ..Default::default()
            },
            first[1].position,
            2,
        )
        .await?;
    ensure!(first.len() == 2 && rest.len() == 1);
    Ok(())
}

async fn invalid_appends_are_rejected_and_write_nothing(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let store = db.event_store();
    let id = Uuid::now_v7();
    let opened = event("Opened", json!({}));
    let first = store.append(single(id, 0, vec![opened.clone()])).await?;

    for expected in [0, 1] {
        let as_order =
            AppendRequest::single(id, "order", expected, vec![event("Placed", json!({}))]);
        match store.append(as_order).await {
            Err(StoreError::AggregateTypeMismatch {
                aggregate_id,
                existing,
                requested,
            }) => {
                ensure!(aggregate_id == id && existing == "account" && requested == "order");
            }
            other => bail!("expected a type mismatch at {expected}, got {other:?}"),
        }
    }
    let reused_id = single(Uuid::now_v7(), 0, vec![opened]);
    ensure!(
        matches!(
            store.append(reused_id).await,
            Err(StoreError::InvalidInput { field: "id", .. })
        ),
        "an event id was stored twice"
    );
    let nul = single(
        Uuid::now_v7(),
        0,
        vec![event("Opened", json!({"name": "a\u{0}b"}))],
    );
    ensure!(matches!(
        store.append(nul).await,
        Err(StoreError::InvalidInput { field: "data", .. })
    ));
    let empty = single(Uuid::now_v7(), 0, vec![]);
    ensure!(matches!(
        store.append(empty).await,
        Err(StoreError::InvalidInput {
            field: "events",
            ..
        })
    ));

    ensure!(
        whole_log(store.as_ref(), first.last_position).await?.len() == 1,
        "a rejected append wrote events"
    );
    ensure!(store.stream_version(id).await? == 1);
    Ok(())
}

/// Postgres: a statement that ran to its end, or that the server refused,
/// leaves its connection on the shelf for the next one (no round trip back
/// to the pool); a cancelled one gives it back to the pool, which checks
/// it; the shelf holds no more than its capacity and lets the pool close.
async fn statements_shelve_only_connections_they_left_clean(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let Database::Postgres(postgres) = &db.database else {
        bail!("a Postgres case");
    };
    let shelf = own_shelf(&db, SHELF_IDLE_LIMIT).await?;
    let backend = "SELECT pg_backend_pid()";

    let (first,): (i32,) = sqlx::query_as(backend).fetch_one(&shelf).await?;
    ensure!(
        shelf.shelved() == 1,
        "a finished statement shelves its connection"
    );
    let (second,): (i32,) = sqlx::query_as(backend).fetch_one(&shelf).await?;
    ensure!(
        first == second,
        "the next statement takes the shelved connection"
    );
    let rows: Vec<(i32,)> = sqlx::query_as("SELECT generate_series(1, 3)")
        .fetch_all(&shelf)
        .await?;
    ensure!(
        rows == vec![(1,), (2,), (3,)],
        "every row arrives: {rows:?}"
    );
    sqlx::query("SELECT 1").execute(&shelf).await?;
    ensure!(shelf.shelved() == 1, "each kind of statement shelves");

    // The server's refusal leaves the connection in a known state: kept,
    // and the next statement on it reads its own answer.
    let refused = sqlx::query("SELECT 1 / 0").execute(&shelf).await;
    ensure!(
        matches!(refused, Err(sqlx::Error::Database(_))),
        "division by zero is refused: {refused:?}"
    );
    ensure!(
        shelf.shelved() == 1,
        "a refused statement's connection is kept"
    );
    let (after_refusal, answer): (i32, i32) = sqlx::query_as("SELECT pg_backend_pid(), 7")
        .fetch_one(&shelf)
        .await?;
    ensure!(
        after_refusal == first && answer == 7,
        "the kept connection answers its next statement"
    );
    let cancelled = tokio::time::timeout(
        Duration::from_millis(50),
        sqlx::query("SELECT pg_sleep(0.5)").execute(&shelf),
    )
    .await;
    ensure!(cancelled.is_err(), "the sleep outlasts the timeout");
    ensure!(
        shelf.shelved() == 0,
        "a statement dropped half-way gives its connection back to the pool"
    );
    let (one,): (i32,) = sqlx::query_as("SELECT 1").fetch_one(&shelf).await?;
    ensure!(one == 1, "the next statement gets a clean connection");

    statements_at_once(&shelf, 5).await?;
    ensure!(
        shelf.shelved() == 2,
        "at most the shelf's capacity waits on it, not {}",
        shelf.shelved()
    );

    tokio::time::timeout(Duration::from_secs(5), shelf.close())
        .await
        .context("closing with connections on the shelf")?;
    ensure!(shelf.shelved() == 0);
    ensure!(
        sqlx::query("SELECT 1").execute(&shelf).await.is_err(),
        "a closed shelf runs nothing"
    );

    // sqlx's close waits for the connections in use, which shelved ones are
    // to it: the database's close gives them back first.
    for _ in 0..3 {
        sqlx::query("SELECT 1")
            .execute(postgres.connections())
            .await?;
    }
    ensure!(postgres.connections().shelved() >= 1);
    tokio::time::timeout(Duration::from_secs(5), db.database.close())
        .await
        .context("closing the database with connections on its shelf")?;
    Ok(())
}

/// Postgres: a shelved connection unused past the shelf's idle limit is
/// pinged before its next statement, so one whose server process is gone
/// (a restart, a failover) is replaced without failing the statement; a
/// connection whose session the server ended is not kept; and the other
/// stale ones go back to the pool as a take passes them.
async fn shelved_connections_unused_for_a_while_are_checked_or_given_back(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let Database::Postgres(postgres) = &db.database else {
        bail!("a Postgres case");
    };
    // Long enough that the steps meant to find a connection fresh do so on
    // a busy machine.
    let idle_limit = Duration::from_secs(1);
    let shelf = own_shelf(&db, idle_limit).await?;
    let backend = "SELECT pg_backend_pid()";

    let (victim,): (i32,) = sqlx::query_as(backend).fetch_one(&shelf).await?;
    ensure!(shelf.shelved() == 1);
    let (terminated,): (bool,) = sqlx::query_as("SELECT pg_terminate_backend($1)")
        .bind(victim)
        .fetch_one(postgres.pool())
        .await?;
    ensure!(terminated, "the shelved connection's server process ends");
    tokio::time::sleep(idle_limit + Duration::from_millis(100)).await;
    let (replacement,): (i32,) = sqlx::query_as(backend)
        .fetch_one(&shelf)
        .await
        .context("a statement after its shelved connection's server went away")?;
    ensure!(replacement != victim, "the dead connection is not used");

    // Ended while fresh on the shelf: its next statement fails (the server
    // ended the session), and the connection is not shelved again.
    ensure!(shelf.shelved() == 1);
    let (terminated,): (bool,) = sqlx::query_as("SELECT pg_terminate_backend($1)")
        .bind(replacement)
        .fetch_one(postgres.pool())
        .await?;
    ensure!(terminated);
    let failed = sqlx::query(backend).execute(&shelf).await;
    ensure!(
        failed.is_err(),
        "a statement on a connection whose session ended fails"
    );
    ensure!(
        shelf.shelved() == 0,
        "a connection whose session ended is not kept: {failed:?}"
    );

    statements_at_once(&shelf, 2).await?;
    ensure!(shelf.shelved() == 2);
    tokio::time::sleep(idle_limit + Duration::from_millis(100)).await;
    sqlx::query("SELECT 1").execute(&shelf).await?;
    ensure!(
        shelf.shelved() == 1,
        "the stale connection the statement did not use went back to the pool, {} left",
        shelf.shelved()
    );
    shelf.close().await;
    Ok(())
}

/// A shelf of capacity 2 over a pool of 4 connections of its own to `db`.
async fn own_shelf(db: &TestDatabase, idle_limit: Duration) -> anyhow::Result<ConnectionShelf> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&db.url())
        .await?;
    Ok(ConnectionShelf::new(pool, 2, idle_limit))
}

/// Runs `count` short statements at once through `shelf`, so that each
/// takes a connection of its own.
async fn statements_at_once(shelf: &ConnectionShelf, count: usize) -> anyhow::Result<()> {
    let sleepers = (0..count).map(|_| sqlx::query("SELECT pg_sleep(0.05)").execute(shelf));
    for slept in futures_util::future::join_all(sleepers).await {
        slept?;
    }
    Ok(())
}
