-- Optimistic concurrency without the `streams` table.
--
-- 0001 kept each stream's version in `streams` and compare-and-set it on every
-- append: one more row write, index entry and lock per append, in PL/pgSQL.
-- The events table already knows each stream's version and type, and its
-- UNIQUE (aggregate_id, version) constraint already refuses a second writer at
-- the same version. So an append at expected version N > 0 now only checks
-- that event N exists with the stream's type (versions are dense, so 1..N then
-- exist too) and inserts N+1, N+2, ...; a concurrent writer at the same
-- expected version waits on the unique index entry of the winner and then
-- fails with a unique violation, which is reported as a version conflict.
--
-- That check fits in one plain INSERT ... SELECT, which the kernel sends for
-- the common case (one stream, no idempotency key; see
-- kernel/src/storage/postgres.rs). `append_events` below keeps its signature
-- and serves the rest: several streams, idempotency keys, and appends inside
-- a caller's transaction.

DROP FUNCTION append_events(TEXT, UUID[], TEXT[], INTEGER[], UUID[], UUID[], TEXT[], INTEGER[],
                            INTEGER[], JSONB[], UUID, UUID, TEXT);
DROP TABLE streams;

-- Raises SQLSTATE 'CK001' (detail: "<aggregate_id> <actual_version>") when a
-- stream is not at its expected version, and 'CK002' (detail:
-- "<aggregate_id> <existing_type> <requested_type>") when a stream exists with
-- another type. Type names never contain spaces (the kernel validates them).
-- Any other unique violation (a reused event id) is raised unchanged.
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
    v_constraint     TEXT;
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
        IF p_expected_versions[i] > 0 AND NOT EXISTS (
            SELECT 1 FROM events e
            WHERE e.aggregate_id = p_stream_ids[i]
              AND e.version = p_expected_versions[i]
              AND e.aggregate_type = p_stream_types[i]
        ) THEN
            PERFORM raise_stream_conflict(p_stream_ids[i], p_stream_types[i], p_expected_versions[i]);
        END IF;
    END LOOP;

    BEGIN
        RETURN QUERY
            WITH inserted AS (
                -- Rows are inserted in `ord` order, so within one append the
                -- sequence follows the order the caller gave the events in.
                INSERT INTO events AS ev (id, aggregate_id, aggregate_type, event_type, schema_version, event_data,
                                          version, correlation_id, causation_id, actor, created_at)
                SELECT e.id, e.stream, s.type, e.type, e.schema_version, e.data,
                       e.version, p_correlation_id, p_causation_id, p_actor, statement_timestamp()
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
    EXCEPTION WHEN unique_violation THEN
        GET STACKED DIAGNOSTICS v_constraint = CONSTRAINT_NAME;
        IF v_constraint <> 'events_aggregate_id_version_key' THEN
            RAISE;
        END IF;
        -- Another writer got a version first and has committed (the insert
        -- waited for it). Each statement here sees it, so find the stream.
        FOR i IN 1 .. array_length(p_stream_ids, 1) LOOP
            IF EXISTS (
                SELECT 1 FROM events e
                WHERE e.aggregate_id = p_stream_ids[i]
                  AND e.version = p_expected_versions[i] + 1
            ) THEN
                PERFORM raise_stream_conflict(p_stream_ids[i], p_stream_types[i], p_expected_versions[i]);
            END IF;
        END LOOP;
        RAISE;
    END;
END;
$$;

-- Raises the typed error for a stream that is not at `p_expected` with type
-- `p_type`: CK002 when its latest event has another type, CK001 otherwise.
CREATE FUNCTION raise_stream_conflict(p_stream UUID, p_type TEXT, p_expected INTEGER)
RETURNS VOID
LANGUAGE plpgsql
AS $$
DECLARE
    v_actual         INTEGER;
    v_existing_type  TEXT;
BEGIN
    SELECT e.version, e.aggregate_type INTO v_actual, v_existing_type
    FROM events e
    WHERE e.aggregate_id = p_stream
    ORDER BY e.version DESC
    LIMIT 1;

    IF v_existing_type IS NOT NULL AND v_existing_type <> p_type THEN
        RAISE EXCEPTION 'stream % is a %, not a %', p_stream, v_existing_type, p_type
            USING ERRCODE = 'CK002',
                  DETAIL = p_stream::text || ' ' || v_existing_type || ' ' || p_type;
    END IF;
    RAISE EXCEPTION 'stream % is at version %, expected %', p_stream, coalesce(v_actual, 0), p_expected
        USING ERRCODE = 'CK001', DETAIL = p_stream::text || ' ' || coalesce(v_actual, 0)::text;
END;
$$;
