-- CQRS read models (kernel/src/projections); same shape as
-- migrations/postgres/0003. Amounts are decimal strings, UUIDs 16-byte BLOBs,
-- timestamps microseconds since the Unix epoch.

CREATE TABLE projection_checkpoints (
    name            TEXT    NOT NULL PRIMARY KEY,
    transaction_id  INTEGER NOT NULL DEFAULT 0,
    sequence        INTEGER NOT NULL DEFAULT 0,
    updated_at      INTEGER NOT NULL DEFAULT 0
);
INSERT INTO projection_checkpoints (name) VALUES ('products'), ('inventory'), ('orders');

CREATE TABLE product_views (
    product_id    BLOB    NOT NULL PRIMARY KEY,
    sku           TEXT    NOT NULL,
    name          TEXT    NOT NULL,
    price_amount  TEXT    NOT NULL,
    currency      TEXT    NOT NULL,
    active        INTEGER NOT NULL,
    version       INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE INDEX product_views_sku ON product_views (sku);

CREATE TABLE inventory_views (
    product_id  BLOB    NOT NULL PRIMARY KEY,
    on_hand     INTEGER NOT NULL,
    reserved    INTEGER NOT NULL,
    version     INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

CREATE TABLE reservation_views (
    reservation_id  BLOB    NOT NULL PRIMARY KEY,
    product_id      BLOB    NOT NULL,
    owner           TEXT    NOT NULL,
    quantity        INTEGER NOT NULL,
    expires_at      INTEGER,
    created_at      INTEGER NOT NULL
);
CREATE INDEX reservation_views_expiry ON reservation_views (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE order_views (
    order_id          BLOB    NOT NULL PRIMARY KEY,
    customer_id       BLOB    NOT NULL,
    status            TEXT    NOT NULL,
    total_amount      TEXT    NOT NULL,
    currency          TEXT    NOT NULL,
    reason            TEXT,
    lines             TEXT    NOT NULL,
    shipping_address  TEXT    NOT NULL,
    payment_method    TEXT    NOT NULL,
    version           INTEGER NOT NULL,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
);
CREATE INDEX order_views_status ON order_views (status, order_id);
CREATE INDEX order_views_customer ON order_views (customer_id, order_id);
