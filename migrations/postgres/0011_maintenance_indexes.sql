-- Indexes for the runbook commands (kernel/src/storage/maintenance.rs,
-- kernel/src/commerce/reconciliation.rs), so that they find their rows
-- without reading whole tables. Same as migrations/sqlite/0010. On a big
-- database, build them first with CREATE INDEX CONCURRENTLY under these
-- names (docs/runbooks.md, "Upgrading").

-- Idempotency keys by age: written once per key, never updated.
CREATE INDEX IF NOT EXISTS idempotency_keys_created ON idempotency_keys (created_at);

-- Cart activity by its last activity (carts never checked out have an index
-- of their own already, so updates cost no more than before).
CREATE INDEX IF NOT EXISTS cart_activity_last_activity ON cart_activity (last_activity_at);

-- Finished sagas by creation. Not by their last update: a saga's row is
-- rewritten at every step, and an index on `updated_at` would turn those
-- writes from in-place (HOT) updates into ones that write index entries.
-- `created_at` never changes, and `status`, in the predicate, is indexed
-- already. Pruning looks for rows created before its cut-off and checks
-- their last update (never earlier than their creation) on each.
CREATE INDEX IF NOT EXISTS saga_instances_finished_created
    ON saga_instances (created_at) WHERE status IN ('COMPLETED', 'COMPENSATED');

-- A product's reservations, which the inventory reconciliation reads.
CREATE INDEX IF NOT EXISTS reservation_views_product ON reservation_views (product_id);
