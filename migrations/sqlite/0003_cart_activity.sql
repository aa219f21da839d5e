-- The lifecycle of every cart (kernel/src/carts); same shape as
-- migrations/postgres/0004. UUIDs are 16-byte BLOBs, timestamps microseconds
-- since the Unix epoch.

CREATE TABLE cart_activity (
    cart_id           BLOB     NOT NULL PRIMARY KEY,
    owner_kind        TEXT     NOT NULL,
    owner_id          TEXT     NOT NULL,
    status            TEXT     NOT NULL,
    version           INTEGER  NOT NULL,
    line_count        INTEGER  NOT NULL,
    created_at        INTEGER  NOT NULL,
    last_activity_at  INTEGER  NOT NULL,
    expires_at        INTEGER  NOT NULL,
    checked_out_at    INTEGER,
    order_id          BLOB
);

CREATE INDEX cart_activity_not_checked_out
    ON cart_activity (last_activity_at, cart_id)
    WHERE checked_out_at IS NULL;
