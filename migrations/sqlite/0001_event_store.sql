-- The event store on the embedded backend. Same shape as migrations/postgres;
-- SQLite has a single writer, so commit order is allocation order and the log
-- can never show a gap. `transaction_id` is still kept (one value per append)
-- so that readers see the same position type on both backends.
--
-- UUIDs are 16-byte BLOBs; timestamps are microseconds since the Unix epoch
-- (integers compare correctly, formatted text may not).

CREATE TABLE events (
    sequence        INTEGER PRIMARY KEY AUTOINCREMENT,
    transaction_id  INTEGER NOT NULL,
    id              BLOB    NOT NULL UNIQUE,
    aggregate_id    BLOB    NOT NULL,
    aggregate_type  TEXT    NOT NULL,
    event_type      TEXT    NOT NULL,
    schema_version  INTEGER NOT NULL,
    event_data      TEXT    NOT NULL,
    version         INTEGER NOT NULL CHECK (version > 0),
    correlation_id  BLOB,
    causation_id    BLOB,
    actor           TEXT,
    created_at      INTEGER NOT NULL,
    UNIQUE (aggregate_id, version)
);

CREATE UNIQUE INDEX events_global_order ON events (transaction_id, sequence);
CREATE INDEX events_correlation ON events (correlation_id) WHERE correlation_id IS NOT NULL;
CREATE INDEX events_type_order ON events (aggregate_type, transaction_id, sequence);

CREATE TABLE streams (
    aggregate_id    BLOB    NOT NULL PRIMARY KEY,
    aggregate_type  TEXT    NOT NULL,
    version         INTEGER NOT NULL CHECK (version > 0)
);

CREATE TABLE idempotency_keys (
    key                 TEXT    NOT NULL PRIMARY KEY,
    stream_versions     TEXT    NOT NULL,
    last_aggregate_id   BLOB    NOT NULL,
    last_version        INTEGER NOT NULL,
    created_at          INTEGER NOT NULL
);
