-- Runbook checks every kernel process schedules (the inventory
-- reconciliation's report): when one last started, and what it found, so
-- that one process runs it per interval and every process reports its
-- result (kernel/src/storage/maintenance.rs). Times are microseconds on the
-- database's clock. Same as migrations/postgres/0012.
CREATE TABLE IF NOT EXISTS runbook_checks (
    name        TEXT    NOT NULL PRIMARY KEY,
    started_at  BIGINT  NOT NULL,
    found       BIGINT
);
