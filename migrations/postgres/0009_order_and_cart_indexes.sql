-- Indexes for the checkout email search (orders(email:)) and the
-- `kpis(from, to)` report (orders and carts by creation time). Same indexes
-- as migrations/sqlite/0007 and 0008.
--
-- Built in the migration's transaction, which blocks writes to the table
-- while it runs: quick on a young shop, long on a big one. There, create
-- them beforehand with CREATE INDEX CONCURRENTLY and the same names (see
-- docs/runbooks.md, "Upgrading"); IF NOT EXISTS then leaves them be.
CREATE INDEX IF NOT EXISTS order_views_email
    ON order_views (email_key, order_id) WHERE email_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS order_views_created ON order_views (created_at);
CREATE INDEX IF NOT EXISTS cart_activity_created ON cart_activity (created_at);
