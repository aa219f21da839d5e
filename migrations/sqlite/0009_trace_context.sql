-- Trace context next to correlation and causation: the W3C `traceparent`
-- of the span an event was appended in, and of the request that started a
-- saga (its drives continue that trace). See kernel/src/telemetry.rs.

ALTER TABLE events ADD COLUMN trace_parent TEXT;
ALTER TABLE saga_instances ADD COLUMN trace_parent TEXT;
