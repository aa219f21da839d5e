-- The event store: the source of truth for every aggregate in the kernel.
--
-- Global order. Identity values are handed out before commit, so a reader that
-- advances by `sequence` alone can skip an event whose transaction commits late.
-- Every event therefore also records the id of the transaction that wrote it,
-- and the log is read in (transaction_id, sequence) order, only up to the oldest
-- transaction still running (see `read_all` in kernel/src/event_store/postgres.rs).

CREATE TABLE events (
    -- Global position, part two: allocation order inside the log.
    sequence        BIGINT GENERATED ALWAYS AS IDENTITY,
    -- Global position, part one: the writing transaction (xid8 as bigint).
    transaction_id  BIGINT      NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    id              UUID        NOT NULL PRIMARY KEY,
    aggregate_id    UUID        NOT NULL,
    aggregate_type  TEXT        NOT NULL,
    event_type      TEXT        NOT NULL,
    -- Version of the payload's shape, so old events can be upcast on read.
    schema_version  INTEGER     NOT NULL,
    event_data      JSONB       NOT NULL,
    version         INTEGER     NOT NULL CHECK (version > 0),
    correlation_id  UUID,
    causation_id    UUID,
    actor           TEXT,
    created_at      TIMESTAMPTZ NOT NULL,
    UNIQUE (aggregate_id, version)
);

CREATE UNIQUE INDEX events_global_order ON events (transaction_id, sequence);
CREATE INDEX events_correlation ON events (correlation_id) WHERE correlation_id IS NOT NULL;
CREATE INDEX events_type_order ON events (aggregate_type, transaction_id, sequence);

-- One row per stream: its type and current version. Appends compare-and-set the
-- version here, so concurrent writers to one stream queue on a row lock instead
-- of failing on the unique index after doing their work.
CREATE TABLE streams (
    aggregate_id    UUID    NOT NULL PRIMARY KEY,
    aggregate_type  TEXT    NOT NULL,
    version         INTEGER NOT NULL CHECK (version > 0)
);

-- The outcome of every append that carried an idempotency key; a repeated key
-- returns this instead of writing again.
CREATE TABLE idempotency_keys (
    key                 TEXT        NOT NULL PRIMARY KEY,
    -- [{"aggregate_id": "...", "version": n}, ...]: each stream's version after the append.
    stream_versions     JSONB       NOT NULL,
    -- The append's last event, to recover its global position.
    last_aggregate_id   UUID        NOT NULL,
    last_version        INTEGER     NOT NULL,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Appends events to one or more streams in a single statement (one round trip),
-- atomically: either every stream is at its expected version and every event is
-- written, or nothing is.
--
-- Streams are given as parallel arrays (p_stream_*); events likewise (p_event_*),
-- each naming its stream by aggregate id and carrying its new version, which the
-- caller computes as expected_version + 1, + 2, ...
--
-- Raises SQLSTATE 'CK001' (detail: "<aggregate_id> <actual_version>") when a
-- stream is not at its expected version, and 'CK002' (detail:
-- "<aggregate_id> <existing_type> <requested_type>") when a stream exists with
-- another type. Type names never contain spaces (the kernel validates them).
--
-- Returns one row: `replayed` is true when the idempotency key was used before,
-- in which case nothing was written and `stream_versions` holds the original
-- outcome. `transaction_id`/`sequence` are the global position of the last event.
CREATE FUNCTION append_events(
    p_idempotency_key    TEXT,
    p_stream_ids         UUID[],
    p_stream_types       TEXT[],
    p_expected_versions  INTEGER[],
    p_event_ids          UUID[],
    p_event_streams      UUID[],
    p_event_types        TEXT[],
    p_event_versions     INTEGER[],
    p_schema_versions    INTEGER[],
    p_event_data         JSONB[],
    p_correlation_id     UUID,
    p_causation_id       UUID,
    p_actor              TEXT
) RETURNS TABLE (
    replayed         BOOLEAN,
    transaction_id   BIGINT,
    sequence         BIGINT,
    stream_versions  JSONB
)
LANGUAGE plpgsql
AS $$
DECLARE
    i                INTEGER;
    v_count          INTEGER;
    v_actual         INTEGER;
    v_existing_type  TEXT;
    v_created_at     TIMESTAMPTZ := clock_timestamp();
    v_last           INTEGER := array_length(p_event_ids, 1);
    v_stored         idempotency_keys%ROWTYPE;
BEGIN
    IF p_idempotency_key IS NOT NULL THEN
        -- A concurrent holder of the same key makes this wait for its commit
        -- (then the row exists) or rollback (then this insert wins).
        INSERT INTO idempotency_keys (key, stream_versions, last_aggregate_id, last_version)
        SELECT p_idempotency_key,
               jsonb_agg(jsonb_build_object(
                   'aggregate_id', s.id,
                   'version', s.expected + (SELECT count(*) FROM unnest(p_event_streams) e(id) WHERE e.id = s.id))),
               p_event_streams[v_last],
               p_event_versions[v_last]
        FROM unnest(p_stream_ids, p_expected_versions) AS s(id, expected)
        ON CONFLICT (key) DO NOTHING;

        IF NOT FOUND THEN
            SELECT * INTO v_stored FROM idempotency_keys k WHERE k.key = p_idempotency_key;
            RETURN QUERY
                SELECT true, e.transaction_id, e.sequence, v_stored.stream_versions
                FROM events e
                WHERE e.aggregate_id = v_stored.last_aggregate_id
                  AND e.version = v_stored.last_version;
            RETURN;
        END IF;
    END IF;

    FOR i IN 1 .. array_length(p_stream_ids, 1) LOOP
        SELECT count(*) INTO v_count FROM unnest(p_event_streams) e(id) WHERE e.id = p_stream_ids[i];

        IF p_expected_versions[i] = 0 THEN
            INSERT INTO streams (aggregate_id, aggregate_type, version)
            VALUES (p_stream_ids[i], p_stream_types[i], v_count)
            ON CONFLICT (aggregate_id) DO NOTHING;
        ELSE
            UPDATE streams
            SET version = version + v_count
            WHERE aggregate_id = p_stream_ids[i]
              AND version = p_expected_versions[i]
              AND aggregate_type = p_stream_types[i];
        END IF;

        IF NOT FOUND THEN
            SELECT s.version, s.aggregate_type INTO v_actual, v_existing_type
            FROM streams s WHERE s.aggregate_id = p_stream_ids[i];

            IF v_existing_type IS NOT NULL AND v_existing_type <> p_stream_types[i] THEN
                RAISE EXCEPTION 'stream % is a %, not a %', p_stream_ids[i], v_existing_type, p_stream_types[i]
                    USING ERRCODE = 'CK002',
                          DETAIL = p_stream_ids[i]::text || ' ' || v_existing_type || ' ' || p_stream_types[i];
            END IF;
            RAISE EXCEPTION 'stream % is at version %, expected %',
                    p_stream_ids[i], coalesce(v_actual, 0), p_expected_versions[i]
                USING ERRCODE = 'CK001', DETAIL = p_stream_ids[i]::text || ' ' || coalesce(v_actual, 0)::text;
        END IF;
    END LOOP;

    RETURN QUERY
        WITH inserted AS (
            -- Rows are inserted in `ord` order, so within one append the
            -- sequence follows the order the caller gave the events in.
            INSERT INTO events AS ev (id, aggregate_id, aggregate_type, event_type, schema_version, event_data,
                                      version, correlation_id, causation_id, actor, created_at)
            SELECT e.id, e.stream, s.type, e.type, e.schema_version, e.data,
                   e.version, p_correlation_id, p_causation_id, p_actor, v_created_at
            FROM unnest(p_event_ids, p_event_streams, p_event_types, p_event_versions, p_schema_versions, p_event_data)
                     WITH ORDINALITY AS e(id, stream, type, version, schema_version, data, ord)
            JOIN unnest(p_stream_ids, p_stream_types) AS s(id, type) ON s.id = e.stream
            ORDER BY e.ord
            RETURNING ev.transaction_id, ev.sequence
        )
        SELECT false, i.transaction_id, i.sequence, NULL::jsonb
        FROM inserted i
        ORDER BY i.sequence DESC
        LIMIT 1;
END;
$$;
