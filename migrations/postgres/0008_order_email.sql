-- The email a buyer gives at checkout (a guest's only contact), and its
-- search key (projections::email_key: the address lowercased, computed by
-- the kernel so both backends match alike). Orders placed before have
-- neither; their events carry no email, so a rebuild agrees. Nullable
-- columns without a default: a change of the catalog only, however large
-- the table. Its index comes with 0009.
ALTER TABLE order_views ADD COLUMN email TEXT;
ALTER TABLE order_views ADD COLUMN email_key TEXT;
