-- Deferrals: how many times in a row a runner gave the saga back without
-- recording anything (its step's plugin was not active on that process).
-- The runner backs off by it and parks a compensation that keeps being
-- deferred; any recorded step resets it. Same shape as
-- migrations/sqlite/0005.
--
-- From this migration on, every time in saga_instances (lease expiry, due
-- times) is written and compared with the database's clock, not the
-- clocks of the kernel processes.
ALTER TABLE saga_instances ADD COLUMN deferrals INTEGER NOT NULL DEFAULT 0;
