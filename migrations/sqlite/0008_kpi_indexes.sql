-- The `kpis(from, to)` report reads orders and carts by when they were
-- created. Same indexes as migrations/postgres/0009.
CREATE INDEX order_views_created ON order_views (created_at);
CREATE INDEX cart_activity_created ON cart_activity (created_at);
