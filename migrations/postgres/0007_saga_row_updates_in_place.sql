-- A runner rewrites a saga's row at every step. Postgres rewrites a row in
-- place (a HOT update: no new index entries, no index bloat) only when no
-- indexed column changes and the page has room. So:
-- - no index on the lease, which every claim and release changes: a
--   runner's heartbeat finds its sagas by primary key, and giving back all
--   of a process's sagas happens once, at shutdown (a scan);
-- - pages keep a fifth free for the new row versions.
-- Same shape as migrations/sqlite/0006 (which has no fill factor).
DROP INDEX saga_instances_lease_owner;
ALTER TABLE saga_instances SET (fillfactor = 80);
