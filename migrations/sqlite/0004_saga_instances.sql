-- The saga runner's work queue and index; same shape as
-- migrations/postgres/0005. UUIDs are 16-byte BLOBs, timestamps
-- microseconds since the Unix epoch.

CREATE TABLE saga_instances (
    saga_id           BLOB     NOT NULL PRIMARY KEY,
    saga_type         TEXT     NOT NULL,
    correlation_id    BLOB     NOT NULL,
    status            TEXT     NOT NULL,
    current_step      TEXT,
    version           INTEGER  NOT NULL,
    next_run_at       INTEGER,
    lease_owner       TEXT,
    lease_expires_at  INTEGER,
    fencing_token     INTEGER  NOT NULL DEFAULT 0,
    created_at        INTEGER  NOT NULL,
    updated_at        INTEGER  NOT NULL
);

CREATE INDEX saga_instances_due ON saga_instances (next_run_at) WHERE next_run_at IS NOT NULL;
CREATE INDEX saga_instances_correlation ON saga_instances (correlation_id, saga_id);
CREATE INDEX saga_instances_status ON saga_instances (status, saga_id);
CREATE INDEX saga_instances_lease_owner ON saga_instances (lease_owner) WHERE lease_owner IS NOT NULL;
