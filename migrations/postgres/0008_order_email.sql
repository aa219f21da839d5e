-- The email a buyer gives at checkout (a guest's only contact), and its
-- search key (projections::email_key: the address lowercased, computed by
-- the kernel so both backends match alike). Orders placed before have
-- neither; their events carry no email, so a rebuild agrees.
ALTER TABLE order_views ADD COLUMN email TEXT;
ALTER TABLE order_views ADD COLUMN email_key TEXT;
CREATE INDEX order_views_email ON order_views (email_key, order_id) WHERE email_key IS NOT NULL;
