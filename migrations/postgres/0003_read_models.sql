-- CQRS read models (kernel/src/projections). Every table here is derived from
-- the event log and can be emptied and replayed (`rebuildProjections`).

-- Position of the last event each projection has applied, written in the same
-- transaction as the projection's rows. The row is locked while a batch is
-- applied, so with several kernel processes one applies and the others skip.
CREATE TABLE projection_checkpoints (
    name            TEXT        NOT NULL PRIMARY KEY,
    transaction_id  BIGINT      NOT NULL DEFAULT 0,
    sequence        BIGINT      NOT NULL DEFAULT 0,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO projection_checkpoints (name) VALUES ('products'), ('inventory'), ('orders');

CREATE TABLE product_views (
    product_id    UUID        NOT NULL PRIMARY KEY,
    -- Unique by construction (SKU claim streams); not enforced here, so a
    -- projection can never get stuck on a constraint the log already upholds.
    sku           TEXT        NOT NULL,
    name          TEXT        NOT NULL,
    price_amount  NUMERIC     NOT NULL,
    currency      TEXT        NOT NULL,
    active        BOOLEAN     NOT NULL,
    version       INTEGER     NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL
);
CREATE INDEX product_views_sku ON product_views (sku);

CREATE TABLE inventory_views (
    product_id  UUID        NOT NULL PRIMARY KEY,
    on_hand     BIGINT      NOT NULL,
    reserved    BIGINT      NOT NULL,
    version     INTEGER     NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);

CREATE TABLE reservation_views (
    reservation_id  UUID        NOT NULL PRIMARY KEY,
    product_id      UUID        NOT NULL,
    owner           TEXT        NOT NULL,
    quantity        INTEGER     NOT NULL,
    expires_at      TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL
);
CREATE INDEX reservation_views_expiry ON reservation_views (expires_at) WHERE expires_at IS NOT NULL;

-- The design documents' order_views, plus what order(id) shows without
-- touching the event store: currency, reason, lines and address.
CREATE TABLE order_views (
    order_id          UUID        NOT NULL PRIMARY KEY,
    customer_id       UUID        NOT NULL,
    status            TEXT        NOT NULL,
    total_amount      NUMERIC     NOT NULL,
    currency          TEXT        NOT NULL,
    reason            TEXT,
    lines             JSONB       NOT NULL,
    shipping_address  JSONB       NOT NULL,
    payment_method    TEXT        NOT NULL,
    version           INTEGER     NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL,
    updated_at        TIMESTAMPTZ NOT NULL
);
CREATE INDEX order_views_status ON order_views (status, order_id);
CREATE INDEX order_views_customer ON order_views (customer_id, order_id);
