-- Trace context next to correlation and causation: the W3C `traceparent`
-- (00-<trace id>-<span id>-<flags>) of the span an event was appended in,
-- and of the request that started a saga, whose drives continue that trace
-- on whichever process claims it. See kernel/src/telemetry.rs.
--
-- Both columns are NULL for rows written before, and by kernels of an
-- earlier version during a rolling upgrade: their statements do not name
-- the column, and `append_events` keeps accepting their 13 arguments (the
-- new parameter has a default). Adding a nullable column without a default
-- changes only the catalog; the table is not rewritten.

ALTER TABLE events ADD COLUMN IF NOT EXISTS trace_parent TEXT;
ALTER TABLE saga_instances ADD COLUMN IF NOT EXISTS trace_parent TEXT;

-- As in 0002, with the trace context as a last, optional parameter.
DROP FUNCTION append_events(TEXT, UUID[], TEXT[], INTEGER[], UUID[], UUID[], TEXT[], INTEGER[],
                            INTEGER[], JSONB[], UUID, UUID, TEXT);

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
    p_actor              TEXT,
    p_trace_parent       TEXT DEFAULT NULL
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
                                          version, correlation_id, causation_id, actor, trace_parent,
                                          created_at)
                SELECT e.id, e.stream, s.type, e.type, e.schema_version, e.data,
                       e.version, p_correlation_id, p_causation_id, p_actor, p_trace_parent,
                       statement_timestamp()
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
