-- Indexes for the runbook commands (kernel/src/storage/maintenance.rs,
-- kernel/src/commerce/reconciliation.rs), so that they find their rows
-- without reading whole tables. Same as migrations/postgres/0011.

-- Idempotency keys by age: written once per key, never updated.
CREATE INDEX IF NOT EXISTS idempotency_keys_created ON idempotency_keys (created_at);

-- Cart activity by its last activity (carts never checked out have an index
-- of their own already, so updates cost no more than before).
CREATE INDEX IF NOT EXISTS cart_activity_last_activity ON cart_activity (last_activity_at);

-- Finished sagas by creation (on Postgres, an index on their last update
-- would cost every step's write; the same index here keeps one schema).
-- Pruning looks for rows created before its cut-off and checks their last
-- update (never earlier than their creation) on each.
CREATE INDEX IF NOT EXISTS saga_instances_finished_created
    ON saga_instances (created_at) WHERE status IN ('COMPLETED', 'COMPENSATED');

-- A product's reservations, which the inventory reconciliation reads.
CREATE INDEX IF NOT EXISTS reservation_views_product ON reservation_views (product_id);
