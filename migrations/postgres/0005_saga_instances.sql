-- The saga runner's work queue and index (kernel/src/storage/sagas.rs). The
-- saga's record is its event stream; this row says who works on it and
-- when, and is written in the same transaction as the saga's events. Same
-- shape as migrations/sqlite/0004; times are microseconds since the Unix
-- epoch on both backends, so both run the same statements.

CREATE TABLE saga_instances (
    saga_id           UUID     NOT NULL PRIMARY KEY,
    saga_type         TEXT     NOT NULL,
    -- The order the saga fulfils.
    correlation_id    UUID     NOT NULL,
    status            TEXT     NOT NULL,
    current_step      TEXT,
    -- The saga stream's version this row reflects.
    version           INTEGER  NOT NULL,
    -- When a runner should look at it next; NULL when nothing is due ever
    -- again (finished, or parked until an admin retries it).
    next_run_at       BIGINT,
    -- The runner holding it, until when, and the token its writes must
    -- carry: every claim increments it, so a paused former owner's writes
    -- match no row and are refused.
    lease_owner       TEXT,
    lease_expires_at  BIGINT,
    fencing_token     BIGINT   NOT NULL DEFAULT 0,
    created_at        BIGINT   NOT NULL,
    updated_at        BIGINT   NOT NULL
);

CREATE INDEX saga_instances_due ON saga_instances (next_run_at) WHERE next_run_at IS NOT NULL;
CREATE INDEX saga_instances_correlation ON saga_instances (correlation_id, saga_id);
CREATE INDEX saga_instances_status ON saga_instances (status, saga_id);
CREATE INDEX saga_instances_lease_owner ON saga_instances (lease_owner) WHERE lease_owner IS NOT NULL;
