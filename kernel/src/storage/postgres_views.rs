//! The read models on Postgres (migrations/postgres/0003).
//!
//! Amounts are NUMERIC, bound as decimal strings and read back as text, so no
//! value ever passes through a float.

use super::connection_shelf::ConnectionShelf;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{ConnectOptions as _, PgConnection};
use uuid::Uuid;

use super::views::{
    FINAL_STATUSES, KPI_STATUSES, ViewTables, count, email_condition, from_json, kpi_statuses,
    money, no_checkpoint, shadow_table, status, swap_statements, tables, to_json,
};
use crate::domain::order::OrderStatus;
use crate::event_store::{Position, StoreError, validate_stream_ids};
use crate::projections::{
    InventoryView, OrderFilter, OrderKpis, OrderView, ProductView, ProjectionBatch, ProjectionName,
    ReservationView, ShadowView, ViewChange, ViewStore, email_key, nearest_rank, net,
};

/// [`ViewStore`] on Postgres.
#[derive(Clone, Debug)]
pub struct PostgresViewStore {
    connections: ConnectionShelf,
}

impl PostgresViewStore {
    pub fn new(connections: ConnectionShelf) -> Self {
        PostgresViewStore { connections }
    }
}

type ProductRow = (
    Uuid,
    String,
    String,
    String,
    String,
    bool,
    i32,
    DateTime<Utc>,
    DateTime<Utc>,
);
const PRODUCT_COLUMNS: &str =
    "product_id, sku, name, price_amount::text, currency, active, version, created_at, updated_at";

fn product_view(row: ProductRow) -> Result<ProductView, StoreError> {
    let (product_id, sku, name, amount, currency, active, version, created_at, updated_at) = row;
    Ok(ProductView {
        product_id,
        sku,
        name,
        price: money(&amount, &currency)?,
        active,
        version: count(version.into(), "version")?,
        created_at,
        updated_at,
    })
}

type ReservationRow = (
    Uuid,
    Uuid,
    String,
    i32,
    Option<DateTime<Utc>>,
    DateTime<Utc>,
);
const RESERVATION_COLUMNS: &str =
    "reservation_id, product_id, owner, quantity, expires_at, created_at";

fn reservation_view(row: ReservationRow) -> Result<ReservationView, StoreError> {
    let (reservation_id, product_id, owner, quantity, expires_at, created_at) = row;
    Ok(ReservationView {
        reservation_id,
        product_id,
        owner,
        quantity: count(quantity.into(), "quantity")?,
        expires_at,
        created_at,
    })
}

#[derive(sqlx::FromRow)]
struct OrderRow {
    order_id: Uuid,
    customer_id: Uuid,
    status: String,
    total_amount: String,
    currency: String,
    reason: Option<String>,
    lines: Value,
    shipping_address: Value,
    payment_method: String,
    email: Option<String>,
    version: i32,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}
const ORDER_COLUMNS: &str = "order_id, customer_id, status, total_amount::text AS total_amount, \
     currency, reason, lines, shipping_address, payment_method, email, version, created_at, updated_at";

fn order_view(row: OrderRow) -> Result<OrderView, StoreError> {
    Ok(OrderView {
        order_id: row.order_id,
        customer_id: row.customer_id,
        status: status(&row.status)?,
        total: money(&row.total_amount, &row.currency)?,
        reason: row.reason,
        lines: from_json(row.lines, "order lines")?,
        shipping_address: from_json(row.shipping_address, "shipping address")?,
        payment_method: row.payment_method,
        email: row.email,
        version: count(row.version.into(), "version")?,
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

async fn apply_change(
    tx: &mut PgConnection,
    change: &ViewChange,
    tables: ViewTables,
) -> Result<(), StoreError> {
    match change {
        ViewChange::InsertProduct(p) => {
            sqlx::query(&tables.sql("INSERT INTO product_views (product_id, sku, name, price_amount, currency, active, \
                 version, created_at, updated_at) VALUES ($1, $2, $3, $4::numeric, $5, $6, $7, $8, $9)"))
            .bind(p.product_id)
            .bind(&p.sku)
            .bind(&p.name)
            .bind(p.price.amount().to_string())
            .bind(p.price.currency().code())
            .bind(p.active)
            .bind(p.version as i32)
            .bind(p.created_at)
            .bind(p.updated_at)
            .execute(tx)
            .await?;
        }
        ViewChange::UpdateProduct {
            product_id,
            name,
            price,
            active,
            version,
            at,
        } => {
            sqlx::query(&tables.sql(
                "UPDATE product_views SET name = coalesce($2, name), \
                 price_amount = coalesce($3::numeric, price_amount), \
                 currency = coalesce($4, currency), active = coalesce($5, active), \
                 version = $6, updated_at = $7 WHERE product_id = $1",
            ))
            .bind(product_id)
            .bind(name)
            .bind(price.map(|p| p.amount().to_string()))
            .bind(price.map(|p| p.currency().code().to_string()))
            .bind(active)
            .bind(*version as i32)
            .bind(at)
            .execute(tx)
            .await?;
        }
        ViewChange::AdjustInventory {
            product_id,
            on_hand_delta,
            reserved_delta,
            version,
            at,
        } => {
            sqlx::query(&tables.sql(
                "INSERT INTO inventory_views (product_id, on_hand, reserved, version, updated_at) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (product_id) DO UPDATE SET \
                 on_hand = inventory_views.on_hand + excluded.on_hand, \
                 reserved = inventory_views.reserved + excluded.reserved, \
                 version = excluded.version, updated_at = excluded.updated_at",
            ))
            .bind(product_id)
            .bind(on_hand_delta)
            .bind(reserved_delta)
            .bind(*version as i32)
            .bind(at)
            .execute(tx)
            .await?;
        }
        ViewChange::InsertReservation(r) => {
            sqlx::query(&tables.sql(&format!(
                "INSERT INTO reservation_views ({RESERVATION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"
            )))
            .bind(r.reservation_id)
            .bind(r.product_id)
            .bind(&r.owner)
            .bind(r.quantity as i32)
            .bind(r.expires_at)
            .bind(r.created_at)
            .execute(tx)
            .await?;
        }
        ViewChange::DeleteReservation { reservation_id } => {
            sqlx::query(&tables.sql("DELETE FROM reservation_views WHERE reservation_id = $1"))
                .bind(reservation_id)
                .execute(tx)
                .await?;
        }
        ViewChange::InsertOrder(o) => {
            sqlx::query(&tables.sql(
                "INSERT INTO order_views (order_id, customer_id, status, total_amount, currency, \
                 reason, lines, shipping_address, payment_method, version, created_at, updated_at, \
                 email, email_key) \
                 VALUES ($1, $2, $3, $4::numeric, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
            ))
            .bind(o.order_id)
            .bind(o.customer_id)
            .bind(o.status.as_str())
            .bind(o.total.amount().to_string())
            .bind(o.total.currency().code())
            .bind(&o.reason)
            .bind(to_json(&o.lines)?)
            .bind(to_json(&o.shipping_address)?)
            .bind(&o.payment_method)
            .bind(o.version as i32)
            .bind(o.created_at)
            .bind(o.updated_at)
            .bind(&o.email)
            .bind(o.email.as_deref().map(email_key))
            .execute(tx)
            .await?;
        }
        ViewChange::SetOrderStatus {
            order_id,
            status,
            reason,
            version,
            at,
        } => {
            sqlx::query(&tables.sql(
                "UPDATE order_views SET status = $2, reason = coalesce($3, reason), version = $4, \
                 updated_at = $5 WHERE order_id = $1",
            ))
            .bind(order_id)
            .bind(status.as_str())
            .bind(reason)
            .bind(*version as i32)
            .bind(at)
            .execute(tx)
            .await?;
        }
    }
    Ok(())
}

/// Writes `changes`, netted by [`net`] (each row at most once per kind),
/// kind by kind: one statement for all stock rows, one for the new
/// reservations, one for the released ones, one for all order status
/// changes. Product changes and new orders go row by row (one of each per
/// product or order created, never per step).
async fn apply_netted(
    tx: &mut PgConnection,
    changes: Vec<ViewChange>,
    tables: ViewTables,
) -> Result<(), StoreError> {
    let mut stock = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut reserved = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let mut released: Vec<Uuid> = Vec::new();
    let mut statuses = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for change in changes {
        match change {
            ViewChange::InsertProduct(_)
            | ViewChange::UpdateProduct { .. }
            | ViewChange::InsertOrder(_) => apply_change(&mut *tx, &change, tables).await?,
            ViewChange::AdjustInventory {
                product_id,
                on_hand_delta,
                reserved_delta,
                version,
                at,
            } => {
                stock.0.push(product_id);
                stock.1.push(on_hand_delta);
                stock.2.push(reserved_delta);
                stock.3.push(version as i32);
                stock.4.push(at);
            }
            ViewChange::InsertReservation(r) => {
                reserved.0.push(r.reservation_id);
                reserved.1.push(r.product_id);
                reserved.2.push(r.owner);
                reserved.3.push(r.quantity as i32);
                reserved.4.push(r.expires_at);
                reserved.5.push(r.created_at);
            }
            ViewChange::DeleteReservation { reservation_id } => released.push(reservation_id),
            ViewChange::SetOrderStatus {
                order_id,
                status,
                reason,
                version,
                at,
            } => {
                statuses.0.push(order_id);
                statuses.1.push(status.as_str());
                statuses.2.push(reason);
                statuses.3.push(version as i32);
                statuses.4.push(at);
            }
        }
    }
    if !stock.0.is_empty() {
        sqlx::query(&tables.sql(
            "INSERT INTO inventory_views (product_id, on_hand, reserved, version, updated_at) \
             SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::integer[], \
             $5::timestamptz[]) \
             ON CONFLICT (product_id) DO UPDATE SET \
             on_hand = inventory_views.on_hand + excluded.on_hand, \
             reserved = inventory_views.reserved + excluded.reserved, \
             version = excluded.version, updated_at = excluded.updated_at",
        ))
        .bind(stock.0)
        .bind(stock.1)
        .bind(stock.2)
        .bind(stock.3)
        .bind(stock.4)
        .execute(&mut *tx)
        .await?;
    }
    if !reserved.0.is_empty() {
        sqlx::query(&tables.sql(&format!(
            "INSERT INTO reservation_views ({RESERVATION_COLUMNS}) \
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::integer[], \
             $5::timestamptz[], $6::timestamptz[])"
        )))
        .bind(reserved.0)
        .bind(reserved.1)
        .bind(reserved.2)
        .bind(reserved.3)
        .bind(reserved.4)
        .bind(reserved.5)
        .execute(&mut *tx)
        .await?;
    }
    if !released.is_empty() {
        sqlx::query(&tables.sql("DELETE FROM reservation_views WHERE reservation_id = ANY($1)"))
            .bind(released)
            .execute(&mut *tx)
            .await?;
    }
    if !statuses.0.is_empty() {
        sqlx::query(&tables.sql(
            "UPDATE order_views o SET status = n.status, reason = coalesce(n.reason, o.reason), \
             version = n.version, updated_at = n.updated_at \
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::integer[], $5::timestamptz[]) \
             AS n(order_id, status, reason, version, updated_at) \
             WHERE o.order_id = n.order_id",
        ))
        .bind(statuses.0)
        .bind(statuses.1)
        .bind(statuses.2)
        .bind(statuses.3)
        .bind(statuses.4)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Locks the checkpoint row of `projection` (waiting for a batch in
/// progress) and returns it.
async fn lock_checkpoint(
    tx: &mut PgConnection,
    projection: ProjectionName,
) -> Result<Option<Position>, StoreError> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT transaction_id, sequence FROM projection_checkpoints WHERE name = $1 FOR UPDATE",
    )
    .bind(projection.as_str())
    .fetch_optional(tx)
    .await?;
    Ok(row.map(|(transaction_id, sequence)| Position {
        transaction_id,
        sequence,
    }))
}

async fn set_checkpoint(
    tx: &mut PgConnection,
    projection: ProjectionName,
    to: Position,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE projection_checkpoints SET transaction_id = $2, sequence = $3, updated_at = now() \
         WHERE name = $1",
    )
    .bind(projection.as_str())
    .bind(to.transaction_id)
    .bind(to.sequence)
    .execute(tx)
    .await?;
    Ok(())
}

/// A rebuild's shadow tables on Postgres ([`ShadowView`]).
struct PostgresShadow {
    connection: PgConnection,
    projection: ProjectionName,
}

#[async_trait]
impl ShadowView for PostgresShadow {
    async fn apply(&mut self, changes: Vec<ViewChange>) -> Result<(), StoreError> {
        apply_netted(&mut self.connection, changes, ViewTables::Shadow).await
    }

    async fn lock_live(&mut self) -> Result<Position, StoreError> {
        sqlx::query("BEGIN").execute(&mut self.connection).await?;
        lock_checkpoint(&mut self.connection, self.projection)
            .await?
            .ok_or_else(|| no_checkpoint(self.projection))
    }

    async fn swap(mut self: Box<Self>, at: Position) -> Result<(), StoreError> {
        let connection = &mut self.connection;
        for table in tables(self.projection) {
            // The table's columns, its name resolved as the statements
            // below resolve it (the search path).
            let columns: Vec<String> = sqlx::query_scalar(
                "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::regclass \
                 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            )
            .bind(table)
            .fetch_all(&mut *connection)
            .await?;
            // Readers keep seeing the old rows until the commit. `*<>`
            // compares the rows' bytes: 10.5 and 10.50 differ, as they
            // would in the text a query reads.
            let differs = format!("({table}.*) *<> (excluded.*)");
            for statement in
                swap_statements(table, table, &shadow_table(table), &columns, &differs)?
            {
                sqlx::query(&statement).execute(&mut *connection).await?;
            }
        }
        set_checkpoint(connection, self.projection, at).await?;
        sqlx::query("COMMIT").execute(&mut *connection).await?;
        sqlx::Connection::close(self.connection).await?;
        Ok(())
    }
}

#[async_trait]
impl ViewStore for PostgresViewStore {
    async fn checkpoint(&self, projection: ProjectionName) -> Result<Position, StoreError> {
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT transaction_id, sequence FROM projection_checkpoints WHERE name = $1",
        )
        .bind(projection.as_str())
        .fetch_optional(&self.connections)
        .await?;
        let (transaction_id, sequence) = row.ok_or_else(|| no_checkpoint(projection))?;
        Ok(Position {
            transaction_id,
            sequence,
        })
    }

    async fn apply(&self, batches: &[ProjectionBatch]) -> Result<bool, StoreError> {
        if batches.is_empty() {
            return Ok(true);
        }
        let names: Vec<&str> = batches.iter().map(|b| b.projection.as_str()).collect();
        let mut tx = self.connections.pool().begin().await?;
        // SKIP LOCKED: a process applying any of these makes this one give
        // up at once (and read again later) rather than wait and then find
        // its batch stale.
        let locked: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT name, transaction_id, sequence FROM projection_checkpoints \
             WHERE name = ANY($1) FOR UPDATE SKIP LOCKED",
        )
        .bind(&names)
        .fetch_all(&mut *tx)
        .await?;
        for batch in batches {
            let at = locked
                .iter()
                .find(|(name, ..)| name == batch.projection.as_str())
                .map(|&(_, transaction_id, sequence)| Position {
                    transaction_id,
                    sequence,
                });
            if at != Some(batch.from) {
                return Ok(false);
            }
        }
        apply_netted(
            &mut tx,
            net(batches.iter().flat_map(|batch| &batch.changes)),
            ViewTables::Live,
        )
        .await?;
        let transaction_ids: Vec<i64> = batches.iter().map(|b| b.to.transaction_id).collect();
        let sequences: Vec<i64> = batches.iter().map(|b| b.to.sequence).collect();
        sqlx::query(
            "UPDATE projection_checkpoints c SET transaction_id = n.transaction_id, \
             sequence = n.sequence, updated_at = now() \
             FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS n(name, transaction_id, sequence) \
             WHERE c.name = n.name",
        )
        .bind(&names)
        .bind(&transaction_ids)
        .bind(&sequences)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn reset(&self, projection: ProjectionName) -> Result<(), StoreError> {
        let mut tx = self.connections.pool().begin().await?;
        lock_checkpoint(&mut tx, projection).await?;
        for table in tables(projection) {
            sqlx::query(&format!("DELETE FROM {table}"))
                .execute(&mut *tx)
                .await?;
        }
        set_checkpoint(&mut tx, projection, Position::START).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn shadow(&self, projection: ProjectionName) -> Result<Box<dyn ShadowView>, StoreError> {
        // A connection outside the pool: its temporary tables and its
        // transaction end with it, however the rebuild ends.
        let mut connection = self.connections.pool().connect_options().connect().await?;
        for table in tables(projection) {
            sqlx::query(&format!(
                "CREATE TEMPORARY TABLE {} (LIKE {table} INCLUDING ALL)",
                shadow_table(table)
            ))
            .execute(&mut connection)
            .await?;
        }
        Ok(Box::new(PostgresShadow {
            connection,
            projection,
        }))
    }

    async fn product(&self, product_id: Uuid) -> Result<Option<ProductView>, StoreError> {
        let row: Option<ProductRow> = sqlx::query_as(&format!(
            "SELECT {PRODUCT_COLUMNS} FROM product_views WHERE product_id = $1"
        ))
        .bind(product_id)
        .fetch_optional(&self.connections)
        .await?;
        row.map(product_view).transpose()
    }

    async fn products(
        &self,
        after: Option<Uuid>,
        limit: u32,
        active_only: bool,
    ) -> Result<Vec<ProductView>, StoreError> {
        let rows: Vec<ProductRow> = sqlx::query_as(&format!(
            "SELECT {PRODUCT_COLUMNS} FROM product_views \
             WHERE ($1::uuid IS NULL OR product_id > $1) AND (NOT $3 OR active) \
             ORDER BY product_id LIMIT $2"
        ))
        .bind(after)
        .bind(i64::from(limit))
        .bind(active_only)
        .fetch_all(&self.connections)
        .await?;
        rows.into_iter().map(product_view).collect()
    }

    async fn inventory(&self, product_id: Uuid) -> Result<Option<InventoryView>, StoreError> {
        let row: Option<(i64, i64, i32, DateTime<Utc>)> = sqlx::query_as(
            "SELECT on_hand, reserved, version, updated_at FROM inventory_views WHERE product_id = $1",
        )
        .bind(product_id)
        .fetch_optional(&self.connections)
        .await?;
        row.map(|(on_hand, reserved, version, updated_at)| {
            inventory_view((product_id, on_hand, reserved, version, updated_at))
        })
        .transpose()
    }

    async fn inventories(&self, product_ids: &[Uuid]) -> Result<Vec<InventoryView>, StoreError> {
        validate_stream_ids(product_ids)?;
        let rows: Vec<(Uuid, i64, i64, i32, DateTime<Utc>)> = sqlx::query_as(
            "SELECT product_id, on_hand, reserved, version, updated_at FROM inventory_views \
             WHERE product_id = ANY($1)",
        )
        .bind(product_ids)
        .fetch_all(&self.connections)
        .await?;
        rows.into_iter().map(inventory_view).collect()
    }

    async fn inventory_snapshot(
        &self,
        product_ids: &[Uuid],
    ) -> Result<(Vec<InventoryView>, Vec<ReservationView>), StoreError> {
        validate_stream_ids(product_ids)?;
        let mut tx = self.connections.pool().begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let stock: Vec<(Uuid, i64, i64, i32, DateTime<Utc>)> = sqlx::query_as(
            "SELECT product_id, on_hand, reserved, version, updated_at FROM inventory_views \
             WHERE product_id = ANY($1)",
        )
        .bind(product_ids)
        .fetch_all(&mut *tx)
        .await?;
        let reservations: Vec<ReservationRow> = sqlx::query_as(&format!(
            "SELECT {RESERVATION_COLUMNS} FROM reservation_views WHERE product_id = ANY($1)"
        ))
        .bind(product_ids)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((
            stock
                .into_iter()
                .map(inventory_view)
                .collect::<Result<_, _>>()?,
            reservations
                .into_iter()
                .map(reservation_view)
                .collect::<Result<_, _>>()?,
        ))
    }

    async fn reservation(
        &self,
        reservation_id: Uuid,
    ) -> Result<Option<ReservationView>, StoreError> {
        let row: Option<ReservationRow> = sqlx::query_as(&format!(
            "SELECT {RESERVATION_COLUMNS} FROM reservation_views WHERE reservation_id = $1"
        ))
        .bind(reservation_id)
        .fetch_optional(&self.connections)
        .await?;
        row.map(reservation_view).transpose()
    }

    async fn expired_reservations(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<ReservationView>, StoreError> {
        let rows: Vec<ReservationRow> = sqlx::query_as(&format!(
            "SELECT {RESERVATION_COLUMNS} FROM reservation_views \
             WHERE expires_at IS NOT NULL AND expires_at <= $1 ORDER BY expires_at LIMIT $2"
        ))
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.connections)
        .await?;
        rows.into_iter().map(reservation_view).collect()
    }

    async fn order(&self, order_id: Uuid) -> Result<Option<OrderView>, StoreError> {
        let row: Option<OrderRow> = sqlx::query_as(&format!(
            "SELECT {ORDER_COLUMNS} FROM order_views WHERE order_id = $1"
        ))
        .bind(order_id)
        .fetch_optional(&self.connections)
        .await?;
        row.map(order_view).transpose()
    }

    async fn orders(
        &self,
        filter: &OrderFilter,
        before: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<OrderView>, StoreError> {
        let email = email_condition(filter, "$5::text");
        let rows: Vec<OrderRow> = sqlx::query_as(&format!(
            "SELECT {ORDER_COLUMNS} FROM order_views \
             WHERE ($1::text IS NULL OR status = $1) AND ($2::uuid IS NULL OR customer_id = $2) \
               AND ($3::uuid IS NULL OR order_id < $3) AND {email} \
             ORDER BY order_id DESC LIMIT $4"
        ))
        .bind(filter.status.map(OrderStatus::as_str))
        .bind(filter.customer_id)
        .bind(before)
        .bind(i64::from(limit))
        .bind(filter.email.as_deref().map(email_key))
        .fetch_all(&self.connections)
        .await?;
        rows.into_iter().map(order_view).collect()
    }

    async fn count_products(&self, active_only: bool) -> Result<u64, StoreError> {
        let count: i64 =
            sqlx::query_scalar("SELECT count(*) FROM product_views WHERE NOT $1 OR active")
                .bind(active_only)
                .fetch_one(&self.connections)
                .await?;
        Ok(count.max(0) as u64)
    }

    async fn order_kpis(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<OrderKpis, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(KPI_STATUSES)
            .bind(from)
            .bind(to)
            .fetch_all(&self.connections)
            .await?;
        let (by_status, finals) = kpi_statuses(rows)?;
        // NUMERIC sums exactly.
        let sums: Vec<(String, String)> = sqlx::query_as(
            "SELECT currency, SUM(total_amount)::text FROM order_views \
             WHERE status = 'CONFIRMED' AND created_at >= $1 AND created_at < $2 \
             GROUP BY currency ORDER BY currency",
        )
        .bind(from)
        .bind(to)
        .fetch_all(&self.connections)
        .await?;
        let revenue = sums
            .iter()
            .map(|(currency, amount)| money(amount, currency))
            .collect::<Result<_, _>>()?;
        let final_p95 = if finals == 0 {
            None
        } else {
            let micros: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT (EXTRACT(EPOCH FROM (updated_at - created_at)) * 1000000)::bigint \
                 FROM order_views WHERE status IN {FINAL_STATUSES} \
                   AND created_at >= $1 AND created_at < $2 ORDER BY 1 LIMIT 1 OFFSET $3"
            ))
            .bind(from)
            .bind(to)
            .bind(i64::try_from(nearest_rank(finals, 95)).unwrap_or(i64::MAX))
            .fetch_optional(&self.connections)
            .await?;
            micros
                .map(|micros| std::time::Duration::from_micros(u64::try_from(micros).unwrap_or(0)))
        };
        Ok(OrderKpis {
            by_status,
            revenue,
            final_p95,
        })
    }

    async fn count_orders(&self, filter: &OrderFilter) -> Result<u64, StoreError> {
        let email = email_condition(filter, "$3::text");
        let count: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM order_views \
             WHERE ($1::text IS NULL OR status = $1) AND ($2::uuid IS NULL OR customer_id = $2) \
               AND {email}"
        ))
        .bind(filter.status.map(OrderStatus::as_str))
        .bind(filter.customer_id)
        .bind(filter.email.as_deref().map(email_key))
        .fetch_one(&self.connections)
        .await?;
        Ok(count.max(0) as u64)
    }
}

/// An `inventory_views` row: product id, on hand, reserved, version, updated at.
fn inventory_view(
    (product_id, on_hand, reserved, version, updated_at): (Uuid, i64, i64, i32, DateTime<Utc>),
) -> Result<InventoryView, StoreError> {
    Ok(InventoryView {
        product_id,
        on_hand: count(on_hand, "on hand")?,
        reserved: count(reserved, "reserved")?,
        version: count(version.into(), "version")?,
        updated_at,
    })
}
