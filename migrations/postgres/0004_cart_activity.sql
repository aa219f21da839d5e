-- The lifecycle of every cart (kernel/src/carts): one row per cart, merged
-- from the cart stores' activity queues by the activity recorder. Same shape
-- as migrations/sqlite/0003; timestamps are microseconds since the Unix
-- epoch on both backends, so both run the same statements.

CREATE TABLE cart_activity (
    cart_id           UUID     NOT NULL PRIMARY KEY,
    owner_kind        TEXT     NOT NULL,
    owner_id          TEXT     NOT NULL,
    status            TEXT     NOT NULL,
    version           BIGINT   NOT NULL,
    line_count        INTEGER  NOT NULL,
    created_at        BIGINT   NOT NULL,
    last_activity_at  BIGINT   NOT NULL,
    expires_at        BIGINT   NOT NULL,
    checked_out_at    BIGINT,
    order_id          UUID
);

-- The abandoned-cart report walks carts never checked out, oldest activity first.
CREATE INDEX cart_activity_not_checked_out
    ON cart_activity (last_activity_at, cart_id)
    WHERE checked_out_at IS NULL;
