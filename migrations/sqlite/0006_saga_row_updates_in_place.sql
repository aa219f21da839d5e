-- No index on the lease, which every claim and release changes: a runner's
-- heartbeat finds its sagas by primary key, and giving back all of a
-- process's sagas happens once, at shutdown (a scan). Same shape as
-- migrations/postgres/0007 (where this keeps a saga's updates in place).
DROP INDEX saga_instances_lease_owner;
