//! [`SagaCommits`]: saga steps of many sagas recorded in one statement and
//! one commit (group commit), on Postgres, by a [`Batcher`].
//!
//! Each step a runner records is a gated append: the saga's row is updated
//! (fenced by the runner's claim) and the step's events appended, together
//! or not at all. Alone that is one statement and one commit, with its WAL
//! flush, per step. The batcher runs two such statements at a time per
//! process; the steps recorded meanwhile queue and go together as one
//! statement, in which each keeps its own all-or-nothing and gets the
//! answer it would get alone:
//! - each item's streams are checked in the statement's snapshot (each at
//!   its expected version and not past it); an item with one that is not
//!   writes nothing, and its caller looks the conflict up afterwards;
//! - each item's row is updated only if its streams are ready and its
//!   fence holds; its events are inserted only if its row was;
//! - items in one statement share no stream and no saga ([`Merge::admit`]),
//!   so they cannot conflict with each other.
//!
//! Only steps that write nothing but their saga's and their order's
//! streams are queued; a step that also writes stock goes out at once on
//! its own ([`shares_streams`]). So the runner's statements never write
//! the same stream: each saga has one step in flight at a time. A request
//! on a saga through the API (cancel, retry: no fence) can, and so can
//! another process: if it takes a saga stream's next version after a
//! statement's snapshot, that statement fails as a whole. It is run once
//! more (its new snapshot shows that write, so that step alone is
//! refused), and if that fails too, the batcher records each of its steps
//! again on its own.
//!
//! The SQLite store does not use this: it has a single writer, and its
//! commits are already short.

use std::collections::HashSet;

use super::connection_shelf::ConnectionShelf;
use async_trait::async_trait;
use uuid::Uuid;

use super::batcher::{Batcher, Lost, Merge};
use super::postgres::{
    EventColumns, Gated, GatedRun, PostgresEventStore, gated_streams, is_stream_version_taken,
    validate_gated,
};
use super::sagas::{POSTGRES, bind_update, holds, offset, releases};
use crate::domain::Aggregate as _;
use crate::domain::order::Order;
use crate::domain::saga::Saga;
use crate::event_store::{AppendOutcome, AppendRequest, Position, StoreError};
use crate::sagas::{Claim, InstanceUpdate, LeaseChange};

/// Step statements running at once, per process: while one commits, the
/// next fills. Steps that write streams other sagas write go out on their
/// own instead ([`shares_streams`]), so the runner's statements do not race
/// each other.
const IN_FLIGHT: usize = 2;

/// Most steps recorded in one statement.
const MAX_STEPS_PER_STATEMENT: usize = 64;

/// Most events in one statement (a step that alone has more goes alone).
const MAX_EVENTS_PER_STATEMENT: usize = 1_000;

/// A saga step to record: its row's new state and its events, fenced by
/// the claim it was decided under (none: a request from the API).
#[derive(Debug)]
pub(crate) struct SagaCommit {
    pub fence: Option<Claim>,
    pub update: InstanceUpdate,
    pub request: AppendRequest,
}

/// Many sagas' steps in one statement, each item's row written as
/// `UPDATE_FENCED` (or without a fence `UPDATE`) in `storage/sagas.rs`
/// writes it alone. Parameters: the items (one per step, numbered by
/// ordinality from 1), their streams and their events, each tied to its
/// item by number.
const MERGED: &str = "\
WITH items AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::bigint[],
                         $6::bigint[], $7::uuid[], $8::uuid[], $9::text[], $10::boolean[],
                         $11::bigint[], $23::text[])
        WITH ORDINALITY AS i(saga_id, status, step, version, due_in, fence,
                             correlation_id, causation_id, actor, release, hold, trace_parent, item)
),
streams AS (
    SELECT * FROM unnest($12::bigint[], $13::uuid[], $14::text[], $15::integer[])
        AS s(item, id, type, expected)
),
checks AS (
    SELECT i.item,
        NOT EXISTS (
            SELECT 1 FROM streams s
            WHERE s.item = i.item AND s.expected > 0 AND NOT EXISTS (
                SELECT 1 FROM events p
                WHERE p.aggregate_id = s.id AND p.version = s.expected
                  AND p.aggregate_type = s.type)) AS at_expected,
        NOT EXISTS (
            SELECT 1 FROM streams s
            JOIN events n ON n.aggregate_id = s.id AND n.version = s.expected + 1
            WHERE s.item = i.item) AS not_past,
        EXISTS (
            SELECT 1 FROM saga_instances r
            WHERE r.saga_id = i.saga_id
              AND (i.fence IS NULL OR (r.fencing_token = i.fence
                                       AND (i.hold IS NULL OR r.lease_expires_at > {NOW})))
        ) AS fence_holds
    FROM items i
),
gate AS (
    UPDATE saga_instances r
    SET status = i.status, current_step = i.step, version = i.version,
        next_run_at = CASE WHEN i.due_in IS NULL THEN NULL
            ELSE COALESCE({LEAST}(r.next_run_at, {NOW} + i.due_in), {NOW} + i.due_in) END,
        updated_at = {NOW}, deferrals = 0,
        lease_owner = CASE WHEN i.release THEN NULL ELSE r.lease_owner END,
        lease_expires_at = CASE WHEN i.release THEN NULL WHEN i.hold IS NULL THEN r.lease_expires_at
            ELSE {GREATEST}(r.lease_expires_at, {NOW} + i.hold) END
    FROM items i JOIN checks c USING (item)
    WHERE r.saga_id = i.saga_id AND c.at_expected AND c.not_past
      AND (i.fence IS NULL OR (r.fencing_token = i.fence
                               AND (i.hold IS NULL OR r.lease_expires_at > {NOW})))
    RETURNING i.item
),
inserted AS (
    INSERT INTO events (id, aggregate_id, aggregate_type, event_type, schema_version, event_data,
                        version, correlation_id, causation_id, actor, trace_parent, created_at)
    SELECT e.id, e.stream, s.type, e.type, e.schema_version, e.data,
           e.version, i.correlation_id, i.causation_id, i.actor, i.trace_parent, statement_timestamp()
    FROM unnest($16::bigint[], $17::uuid[], $18::uuid[], $19::text[], $20::integer[],
                $21::integer[], $22::jsonb[])
             WITH ORDINALITY AS e(item, id, stream, type, version, schema_version, data, ord)
    JOIN streams s ON s.item = e.item AND s.id = e.stream
    JOIN items i ON i.item = e.item
    WHERE e.item IN (SELECT item FROM gate)
    ORDER BY e.ord
    RETURNING aggregate_id, transaction_id, sequence
)
SELECT i.item, c.at_expected, c.not_past, c.fence_holds, g.item IS NOT NULL,
       max(x.transaction_id), max(x.sequence)
FROM items i
JOIN checks c USING (item)
LEFT JOIN gate g ON g.item = i.item
LEFT JOIN streams s ON s.item = i.item
LEFT JOIN inserted x ON x.aggregate_id = s.id
GROUP BY i.item, c.at_expected, c.not_past, c.fence_holds, g.item
ORDER BY i.item";

/// A row of [`MERGED`]: item; its streams all at their expected versions
/// and none past them; its fence holds; its row written; its last position.
type MergedRow = (i64, bool, bool, bool, bool, Option<i64>, Option<i64>);

/// Records saga steps on Postgres, one at a time or many in one statement
/// (see the module docs).
pub(crate) struct SagaCommits {
    connections: ConnectionShelf,
    /// One step alone: the gated append of the store, unfenced and fenced.
    single: String,
    single_fenced: String,
    merged: String,
}

impl SagaCommits {
    /// With the store's statements for one step alone.
    pub fn new(connections: ConnectionShelf, single: String, single_fenced: String) -> Self {
        SagaCommits {
            connections,
            single,
            single_fenced,
            merged: POSTGRES.fill(MERGED),
        }
    }

    /// The batcher that runs them, [`IN_FLIGHT`] statements at a time.
    pub fn batcher(self) -> Batcher<SagaCommits> {
        Batcher::new(self)
    }

    pub fn connections(&self) -> &ConnectionShelf {
        &self.connections
    }
}

/// Records `commit` through `batcher`: written, refused (the fence no
/// longer holds, or the row is missing), or the conflict of a stream.
pub(crate) async fn record(
    batcher: &Batcher<SagaCommits>,
    commit: SagaCommit,
) -> Result<Gated, StoreError> {
    let outcome = if shares_streams(&commit) {
        batcher.merge().one(commit).await?
    } else {
        match batcher.run(commit).await {
            Ok(outcome) => outcome?,
            // Unknown whether it was written: the caller reloads the saga,
            // and its versions tell.
            Err(Lost) => return Err(StoreError::Database(sqlx::Error::WorkerCrashed)),
        }
    };
    match outcome {
        GatedRun::Done(gated) => Ok(gated),
        GatedRun::Conflict(streams) => {
            Err(PostgresEventStore::first_conflict(batcher.merge().connections(), &streams).await)
        }
    }
}

/// Whether `commit` writes a stream other sagas write too: any but its
/// own and its order's (stock, when a step reserves, commits or releases
/// it). Such a step goes out at once, on its own, as it was decided: many
/// orders write a popular product's stock, and a step that waited for a
/// statement would more often find that another wrote first.
fn shares_streams(commit: &SagaCommit) -> bool {
    commit.request.streams.iter().any(|s| {
        s.aggregate_type != Saga::AGGREGATE_TYPE && s.aggregate_type != Order::AGGREGATE_TYPE
    })
}

/// Stream and saga ids in a statement so far, and its events.
#[derive(Default)]
pub(crate) struct Fill {
    ids: HashSet<Uuid>,
    events: usize,
}

#[async_trait]
impl Merge for SagaCommits {
    type Request = SagaCommit;
    type Answer = GatedRun;
    type Fill = Fill;

    const IN_FLIGHT: usize = IN_FLIGHT;
    const MAX_PER_STATEMENT: usize = MAX_STEPS_PER_STATEMENT;

    fn admit(&self, fill: &mut Fill, commit: &SagaCommit) -> bool {
        let events = commit.request.event_count();
        if fill.events > 0 && fill.events + events > MAX_EVENTS_PER_STATEMENT {
            return false;
        }
        let mut ids = commit
            .request
            .streams
            .iter()
            .map(|s| s.aggregate_id)
            .chain([commit.update.saga_id]);
        if ids.any(|id| fill.ids.contains(&id)) {
            return false;
        }
        fill.ids.extend(
            commit
                .request
                .streams
                .iter()
                .map(|s| s.aggregate_id)
                .chain([commit.update.saga_id]),
        );
        fill.events += events;
        true
    }

    async fn one(&self, commit: SagaCommit) -> Result<GatedRun, StoreError> {
        let SagaCommit {
            fence,
            update,
            request,
        } = commit;
        let statement = match fence {
            Some(_) => &self.single_fenced,
            None => &self.single,
        };
        PostgresEventStore::run_gated(&self.connections, statement, request, |query| {
            bind_update!(query, update, fence)
        })
        .await
    }

    async fn merged(
        &self,
        commits: &[SagaCommit],
    ) -> Result<Vec<Result<GatedRun, StoreError>>, StoreError> {
        let mut answers: Vec<Option<Result<GatedRun, StoreError>>> = Vec::new();
        // The valid ones, by saga id: the rows are then usually locked in
        // the order the heartbeat locks them too (the plan decides), which
        // makes a deadlock between the two rare; one is retried.
        let mut valid = Vec::new();
        for (index, commit) in commits.iter().enumerate() {
            match validate_gated(&commit.request) {
                Ok(()) => {
                    answers.push(None);
                    valid.push(index);
                }
                Err(invalid) => answers.push(Some(Err(invalid))),
            }
        }
        valid.sort_by_key(|&index| commits[index].update.saga_id);
        if !valid.is_empty() {
            let rows = self.run_merged(commits, &valid).await?;
            // The statement committed: from here on, every step gets an
            // answer of its own, never the statement's error (which would
            // have the batcher run written steps again).
            if rows.len() == valid.len() {
                for (row, &index) in rows.into_iter().zip(&valid) {
                    answers[index] = Some(item_outcome(row, &commits[index].request));
                }
            }
        }
        Ok(answers
            .into_iter()
            .map(|answer| {
                answer.unwrap_or_else(|| {
                    Err(StoreError::Corrupt(
                        "a merged saga commit left a step unanswered".into(),
                    ))
                })
            })
            .collect())
    }
}

impl SagaCommits {
    /// Runs [`MERGED`] for `commits[valid]`, in that order. Once more when
    /// a writer outside it took a stream's next version first (its snapshot
    /// then shows that write, so only that step is refused), or when it
    /// was chosen to end a deadlock.
    async fn run_merged(
        &self,
        commits: &[SagaCommit],
        valid: &[usize],
    ) -> Result<Vec<MergedRow>, StoreError> {
        let mut tries = 0;
        loop {
            let mut args = MergedArguments::default();
            for &index in valid {
                args.push(&commits[index]);
            }
            let result = args
                .bind_to(sqlx::query_as(&self.merged))
                .fetch_all(&self.connections)
                .await;
            match result {
                Ok(rows) => return Ok(rows),
                Err(error) if tries == 0 && worth_another_try(&error) => tries += 1,
                Err(error) => return Err(error.into()),
            }
        }
    }
}

/// A failure of a merged statement that it may not meet again.
fn worth_another_try(error: &sqlx::Error) -> bool {
    is_stream_version_taken(error)
        || error
            .as_database_error()
            .and_then(|e| e.code())
            .is_some_and(|code| code == DEADLOCK_DETECTED)
}

/// SQLSTATE of a transaction ended to break a deadlock.
const DEADLOCK_DETECTED: &str = "40P01";

/// What a [`MERGED`] row says of its item's `request`: the answer the
/// step's statement alone gives (`GATED_APPEND` in `postgres.rs`), where a
/// stream behind its expected version is a conflict whatever the fence, a
/// fence that no longer holds refuses the step before a stream ahead of it
/// would make the insert fail.
fn item_outcome(row: MergedRow, request: &AppendRequest) -> Result<GatedRun, StoreError> {
    Ok(match row {
        (_, _, _, _, true, Some(transaction_id), Some(sequence)) => {
            GatedRun::Done(Gated::Written(AppendOutcome {
                stream_versions: request.resulting_versions(),
                last_position: Position {
                    transaction_id,
                    sequence,
                },
                replayed: false,
            }))
        }
        (_, false, _, _, _, _, _) | (_, true, false, true, _, _, _) => {
            GatedRun::Conflict(gated_streams(request))
        }
        (_, _, _, _, true, _, _) => {
            return Err(StoreError::Corrupt(
                "a merged saga commit wrote a row without its events".into(),
            ));
        }
        // The fence failed, in the snapshot or when the row was updated.
        _ => GatedRun::Done(Gated::Refused),
    })
}

/// [`MERGED`]'s parameters: parallel arrays per item, per stream, per event.
#[derive(Default)]
struct MergedArguments {
    saga_ids: Vec<Uuid>,
    statuses: Vec<String>,
    steps: Vec<Option<String>>,
    versions: Vec<i64>,
    due_in: Vec<Option<i64>>,
    fences: Vec<Option<i64>>,
    correlation_ids: Vec<Option<Uuid>>,
    causation_ids: Vec<Option<Uuid>>,
    actors: Vec<Option<String>>,
    releases: Vec<bool>,
    holds: Vec<Option<i64>>,
    stream_items: Vec<i64>,
    stream_ids: Vec<Uuid>,
    stream_types: Vec<String>,
    expected_versions: Vec<i32>,
    event_items: Vec<i64>,
    events: EventColumns,
    /// `$23`, after the events: added last, so the others kept their numbers.
    trace_parents: Vec<Option<String>>,
}

impl MergedArguments {
    fn items(&self) -> usize {
        self.saga_ids.len()
    }

    /// Adds a validated `commit` as the next item.
    fn push(&mut self, commit: &SagaCommit) {
        let item = self.items() as i64 + 1;
        let update = &commit.update;
        self.saga_ids.push(update.saga_id);
        self.statuses.push(update.status.as_str().to_string());
        self.steps.push(update.current_step.clone());
        self.versions.push(i64::from(update.version));
        self.due_in.push(offset(update.next_run_at, update.now));
        self.fences
            .push(commit.fence.map(|claim| claim.fencing_token));
        let metadata = &commit.request.metadata;
        self.correlation_ids.push(metadata.correlation_id);
        self.causation_ids.push(metadata.causation_id);
        self.actors.push(metadata.actor.clone());
        self.trace_parents
            .push(metadata.trace_parent.map(|trace| trace.to_string()));
        // Without a fence the lease is left alone.
        let lease = match commit.fence {
            Some(_) => update.lease,
            None => LeaseChange::Keep,
        };
        self.releases.push(releases(lease));
        self.holds.push(holds(lease));
        for stream in &commit.request.streams {
            // Validated: every version fits in an `i32`.
            let expected = stream.expected_version as i32;
            self.stream_items.push(item);
            self.stream_ids.push(stream.aggregate_id);
            self.stream_types.push(stream.aggregate_type.clone());
            self.expected_versions.push(expected);
            self.event_items
                .extend(std::iter::repeat_n(item, stream.events.len()));
            self.events
                .push(stream.aggregate_id, expected, stream.events.iter().cloned());
        }
    }

    fn bind_to<'q>(
        self,
        query: sqlx::query::QueryAs<'q, sqlx::Postgres, MergedRow, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, MergedRow, sqlx::postgres::PgArguments> {
        let query = query
            .bind(self.saga_ids)
            .bind(self.statuses)
            .bind(self.steps)
            .bind(self.versions)
            .bind(self.due_in)
            .bind(self.fences)
            .bind(self.correlation_ids)
            .bind(self.causation_ids)
            .bind(self.actors)
            .bind(self.releases)
            .bind(self.holds)
            .bind(self.stream_items)
            .bind(self.stream_ids)
            .bind(self.stream_types)
            .bind(self.expected_versions)
            .bind(self.event_items);
        self.events.bind_to(query).bind(self.trace_parents)
    }
}
