//! The read models on SQLite (migrations/sqlite/0002). Amounts are decimal
//! strings, timestamps microseconds since the Unix epoch, JSON is text.
//! Batches are applied on the single writer connection (`BEGIN IMMEDIATE`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::pool::PoolConnection;
use sqlx::{ConnectOptions as _, Sqlite, SqliteConnection};
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

use super::sqlite::SqliteDatabase;

/// [`ViewStore`] on SQLite.
#[derive(Clone, Debug)]
pub struct SqliteViewStore {
    database: SqliteDatabase,
}

impl SqliteViewStore {
    pub fn new(database: SqliteDatabase) -> Self {
        SqliteViewStore { database }
    }
}

fn time(micros: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| StoreError::Corrupt(format!("timestamp out of range: {micros}")))
}

type ProductRow = (Uuid, String, String, String, String, bool, i32, i64, i64);
const PRODUCT_COLUMNS: &str =
    "product_id, sku, name, price_amount, currency, active, version, created_at, updated_at";

fn product_view(row: ProductRow) -> Result<ProductView, StoreError> {
    let (product_id, sku, name, amount, currency, active, version, created_at, updated_at) = row;
    Ok(ProductView {
        product_id,
        sku,
        name,
        price: money(&amount, &currency)?,
        active,
        version: count(version.into(), "version")?,
        created_at: time(created_at)?,
        updated_at: time(updated_at)?,
    })
}

type ReservationRow = (Uuid, Uuid, String, i32, Option<i64>, i64);
const RESERVATION_COLUMNS: &str =
    "reservation_id, product_id, owner, quantity, expires_at, created_at";

fn reservation_view(row: ReservationRow) -> Result<ReservationView, StoreError> {
    let (reservation_id, product_id, owner, quantity, expires_at, created_at) = row;
    Ok(ReservationView {
        reservation_id,
        product_id,
        owner,
        quantity: count(quantity.into(), "quantity")?,
        expires_at: expires_at.map(time).transpose()?,
        created_at: time(created_at)?,
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
    lines: String,
    shipping_address: String,
    payment_method: String,
    email: Option<String>,
    version: i32,
    created_at: i64,
    updated_at: i64,
}
const ORDER_COLUMNS: &str = "order_id, customer_id, status, total_amount, \
     currency, reason, lines, shipping_address, payment_method, email, version, created_at, updated_at";

fn parse(json: &str) -> Result<Value, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("view JSON: {e}")))
}

fn order_view(row: OrderRow) -> Result<OrderView, StoreError> {
    Ok(OrderView {
        order_id: row.order_id,
        customer_id: row.customer_id,
        status: status(&row.status)?,
        total: money(&row.total_amount, &row.currency)?,
        reason: row.reason,
        lines: from_json(parse(&row.lines)?, "order lines")?,
        shipping_address: from_json(parse(&row.shipping_address)?, "shipping address")?,
        payment_method: row.payment_method,
        email: row.email,
        version: count(row.version.into(), "version")?,
        created_at: time(row.created_at)?,
        updated_at: time(row.updated_at)?,
    })
}

async fn apply_change(
    tx: &mut SqliteConnection,
    change: &ViewChange,
    tables: ViewTables,
) -> Result<(), StoreError> {
    match change {
        ViewChange::InsertProduct(p) => {
            sqlx::query(&tables.sql(
                "INSERT INTO product_views (product_id, sku, name, price_amount, currency, active, \
                 version, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            ))
            .bind(p.product_id)
            .bind(&p.sku)
            .bind(&p.name)
            .bind(p.price.amount().to_string())
            .bind(p.price.currency().code())
            .bind(p.active)
            .bind(p.version as i32)
            .bind(p.created_at.timestamp_micros())
            .bind(p.updated_at.timestamp_micros())
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
                "UPDATE product_views SET name = coalesce(?2, name), \
                 price_amount = coalesce(?3, price_amount), \
                 currency = coalesce(?4, currency), active = coalesce(?5, active), \
                 version = ?6, updated_at = ?7 WHERE product_id = ?1",
            ))
            .bind(product_id)
            .bind(name)
            .bind(price.map(|p| p.amount().to_string()))
            .bind(price.map(|p| p.currency().code().to_string()))
            .bind(active)
            .bind(*version as i32)
            .bind(at.timestamp_micros())
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
                 VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (product_id) DO UPDATE SET \
                 on_hand = inventory_views.on_hand + excluded.on_hand, \
                 reserved = inventory_views.reserved + excluded.reserved, \
                 version = excluded.version, updated_at = excluded.updated_at",
            ))
            .bind(product_id)
            .bind(on_hand_delta)
            .bind(reserved_delta)
            .bind(*version as i32)
            .bind(at.timestamp_micros())
            .execute(tx)
            .await?;
        }
        ViewChange::InsertReservation(r) => {
            sqlx::query(&tables.sql(&format!(
                "INSERT INTO reservation_views ({RESERVATION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
            )))
            .bind(r.reservation_id)
            .bind(r.product_id)
            .bind(&r.owner)
            .bind(r.quantity as i32)
            .bind(r.expires_at.map(|t| t.timestamp_micros()))
            .bind(r.created_at.timestamp_micros())
            .execute(tx)
            .await?;
        }
        ViewChange::DeleteReservation { reservation_id } => {
            sqlx::query(&tables.sql("DELETE FROM reservation_views WHERE reservation_id = ?1"))
                .bind(reservation_id)
                .execute(tx)
                .await?;
        }
        ViewChange::InsertOrder(o) => {
            sqlx::query(&tables.sql(
                "INSERT INTO order_views (order_id, customer_id, status, total_amount, currency, \
                 reason, lines, shipping_address, payment_method, version, created_at, updated_at, \
                 email, email_key) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            ))
            .bind(o.order_id)
            .bind(o.customer_id)
            .bind(o.status.as_str())
            .bind(o.total.amount().to_string())
            .bind(o.total.currency().code())
            .bind(&o.reason)
            .bind(to_json(&o.lines)?.to_string())
            .bind(to_json(&o.shipping_address)?.to_string())
            .bind(&o.payment_method)
            .bind(o.version as i32)
            .bind(o.created_at.timestamp_micros())
            .bind(o.updated_at.timestamp_micros())
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
                "UPDATE order_views SET status = ?2, reason = coalesce(?3, reason), version = ?4, \
                 updated_at = ?5 WHERE order_id = ?1",
            ))
            .bind(order_id)
            .bind(status.as_str())
            .bind(reason)
            .bind(*version as i32)
            .bind(at.timestamp_micros())
            .execute(tx)
            .await?;
        }
    }
    Ok(())
}

/// The checkpoint of `projection`, read inside a write transaction (which
/// holds SQLite's single write lock, so nobody else can move it meanwhile).
async fn read_checkpoint(
    tx: &mut SqliteConnection,
    projection: ProjectionName,
) -> Result<Option<Position>, StoreError> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT transaction_id, sequence FROM projection_checkpoints WHERE name = ?1",
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
    tx: &mut SqliteConnection,
    projection: ProjectionName,
    to: Position,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE projection_checkpoints SET transaction_id = ?2, sequence = ?3, updated_at = CAST(strftime('%s', 'now') AS INTEGER) * 1000000 \
         WHERE name = ?1",
    )
    .bind(projection.as_str())
    .bind(to.transaction_id)
    .bind(to.sequence)
    .execute(tx)
    .await?;
    Ok(())
}

/// A rebuild's shadow tables on SQLite ([`ShadowView`]).
struct SqliteShadow {
    database: SqliteDatabase,
    connection: SqliteConnection,
    projection: ProjectionName,
    /// From [`ShadowView::lock_live`] to the swap's end: this process's
    /// single writer connection, held unused so that the process's other
    /// writers queue for it (as they do for any write) instead of meeting
    /// the file's lock and failing after its busy timeout.
    writer: Option<PoolConnection<Sqlite>>,
}

#[async_trait]
impl ShadowView for SqliteShadow {
    async fn apply(&mut self, changes: Vec<ViewChange>) -> Result<(), StoreError> {
        if self.writer.is_some() {
            // Inside the swap's transaction.
            for change in &changes {
                apply_change(&mut self.connection, change, ViewTables::Shadow).await?;
            }
            return Ok(());
        }
        // One transaction per batch, on the temp database alone. A failed
        // batch fails the rebuild, whose connection is then dropped.
        sqlx::query("BEGIN").execute(&mut self.connection).await?;
        for change in &changes {
            apply_change(&mut self.connection, change, ViewTables::Shadow).await?;
        }
        sqlx::query("COMMIT").execute(&mut self.connection).await?;
        Ok(())
    }

    async fn lock_live(&mut self) -> Result<Position, StoreError> {
        self.writer = Some(self.database.writer().acquire().await?);
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut self.connection)
            .await?;
        read_checkpoint(&mut self.connection, self.projection)
            .await?
            .ok_or_else(|| no_checkpoint(self.projection))
    }

    async fn swap(mut self: Box<Self>, at: Position) -> Result<(), StoreError> {
        let connection = &mut self.connection;
        for table in tables(self.projection) {
            let columns: Vec<String> =
                sqlx::query_scalar("SELECT name FROM pragma_table_info(?1, 'main') ORDER BY cid")
                    .bind(table)
                    .fetch_all(&mut *connection)
                    .await?;
            let list = |prefix: &str| {
                columns
                    .iter()
                    .map(|column| format!("{prefix}{column}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let differs = format!("({}) IS NOT ({})", list(""), list("excluded."));
            let (live, shadow) = (
                format!("main.{table}"),
                format!("temp.{}", shadow_table(table)),
            );
            for statement in swap_statements(table, &live, &shadow, &columns, &differs)? {
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
impl ViewStore for SqliteViewStore {
    async fn checkpoint(&self, projection: ProjectionName) -> Result<Position, StoreError> {
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT transaction_id, sequence FROM projection_checkpoints WHERE name = ?1",
        )
        .bind(projection.as_str())
        .fetch_optional(self.database.reader())
        .await?;
        let (transaction_id, sequence) = row.ok_or_else(|| no_checkpoint(projection))?;
        Ok(Position {
            transaction_id,
            sequence,
        })
    }

    async fn apply(&self, batches: &[ProjectionBatch]) -> Result<bool, StoreError> {
        let mut tx = self.database.begin_write().await?;
        for batch in batches {
            if read_checkpoint(&mut tx, batch.projection).await? != Some(batch.from) {
                return Ok(false);
            }
        }
        for change in net(batches.iter().flat_map(|batch| &batch.changes)) {
            apply_change(&mut tx, &change, ViewTables::Live).await?;
        }
        for batch in batches {
            set_checkpoint(&mut tx, batch.projection, batch.to).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn reset(&self, projection: ProjectionName) -> Result<(), StoreError> {
        let mut tx = self.database.begin_write().await?;
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
        // A connection of its own: its temporary tables (kept in this
        // connection's temp database, so building them takes no lock on
        // the file) and its transaction end with it.
        let mut connection = self.database.writer().connect_options().connect().await?;
        for table in tables(projection) {
            // The live table's definition (as every migration left it),
            // keys included, under the shadow's name.
            let (definition,): (String,) = sqlx::query_as(
                "SELECT sql FROM main.sqlite_master WHERE type = 'table' AND name = ?1",
            )
            .bind(table)
            .fetch_one(&mut connection)
            .await?;
            let columns = definition.find('(').ok_or_else(|| {
                StoreError::Corrupt(format!("the definition of {table}: {definition}"))
            })?;
            sqlx::query(&format!(
                "CREATE TEMPORARY TABLE {} {}",
                shadow_table(table),
                &definition[columns..]
            ))
            .execute(&mut connection)
            .await?;
        }
        Ok(Box::new(SqliteShadow {
            database: self.database.clone(),
            connection,
            projection,
            writer: None,
        }))
    }

    async fn product(&self, product_id: Uuid) -> Result<Option<ProductView>, StoreError> {
        let row: Option<ProductRow> = sqlx::query_as(&format!(
            "SELECT {PRODUCT_COLUMNS} FROM product_views WHERE product_id = ?1"
        ))
        .bind(product_id)
        .fetch_optional(self.database.reader())
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
             WHERE (?1 IS NULL OR product_id > ?1) AND (?3 = 0 OR active = 1) \
             ORDER BY product_id LIMIT ?2"
        ))
        .bind(after)
        .bind(i64::from(limit))
        .bind(active_only)
        .fetch_all(self.database.reader())
        .await?;
        rows.into_iter().map(product_view).collect()
    }

    async fn inventory(&self, product_id: Uuid) -> Result<Option<InventoryView>, StoreError> {
        let row: Option<(i64, i64, i32, i64)> = sqlx::query_as(
            "SELECT on_hand, reserved, version, updated_at FROM inventory_views WHERE product_id = ?1",
        )
        .bind(product_id)
        .fetch_optional(self.database.reader())
        .await?;
        row.map(|(on_hand, reserved, version, updated_at)| {
            inventory_view((product_id, on_hand, reserved, version, updated_at))
        })
        .transpose()
    }

    async fn inventories(&self, product_ids: &[Uuid]) -> Result<Vec<InventoryView>, StoreError> {
        validate_stream_ids(product_ids)?;
        if product_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut query = sqlx::QueryBuilder::<Sqlite>::new(
            "SELECT product_id, on_hand, reserved, version, updated_at FROM inventory_views \
             WHERE product_id IN (",
        );
        let mut ids = query.separated(", ");
        for id in product_ids {
            ids.push_bind(*id);
        }
        query.push(")");
        let rows: Vec<(Uuid, i64, i64, i32, i64)> = query
            .build_query_as()
            .fetch_all(self.database.reader())
            .await?;
        rows.into_iter().map(inventory_view).collect()
    }

    async fn inventory_snapshot(
        &self,
        product_ids: &[Uuid],
    ) -> Result<(Vec<InventoryView>, Vec<ReservationView>), StoreError> {
        validate_stream_ids(product_ids)?;
        if product_ids.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let placeholders = vec!["?"; product_ids.len()].join(", ");
        // One read transaction: both statements see the same snapshot.
        let mut tx = self.database.reader().begin().await?;
        let stock_sql = format!(
            "SELECT product_id, on_hand, reserved, version, updated_at FROM inventory_views \
             WHERE product_id IN ({placeholders})"
        );
        let reservations_sql = format!(
            "SELECT {RESERVATION_COLUMNS} FROM reservation_views WHERE product_id IN ({placeholders})"
        );
        let mut stock = sqlx::query_as::<_, (Uuid, i64, i64, i32, i64)>(&stock_sql);
        let mut reservations = sqlx::query_as::<_, ReservationRow>(&reservations_sql);
        for id in product_ids {
            stock = stock.bind(*id);
            reservations = reservations.bind(*id);
        }
        let stock = stock.fetch_all(&mut *tx).await?;
        let reservations = reservations.fetch_all(&mut *tx).await?;
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
            "SELECT {RESERVATION_COLUMNS} FROM reservation_views WHERE reservation_id = ?1"
        ))
        .bind(reservation_id)
        .fetch_optional(self.database.reader())
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
             WHERE expires_at IS NOT NULL AND expires_at <= ?1 ORDER BY expires_at LIMIT ?2"
        ))
        .bind(now.timestamp_micros())
        .bind(i64::from(limit))
        .fetch_all(self.database.reader())
        .await?;
        rows.into_iter().map(reservation_view).collect()
    }

    async fn order(&self, order_id: Uuid) -> Result<Option<OrderView>, StoreError> {
        let row: Option<OrderRow> = sqlx::query_as(&format!(
            "SELECT {ORDER_COLUMNS} FROM order_views WHERE order_id = ?1"
        ))
        .bind(order_id)
        .fetch_optional(self.database.reader())
        .await?;
        row.map(order_view).transpose()
    }

    async fn orders(
        &self,
        filter: &OrderFilter,
        before: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<OrderView>, StoreError> {
        let email = email_condition(filter, "?5");
        let rows: Vec<OrderRow> = sqlx::query_as(&format!(
            "SELECT {ORDER_COLUMNS} FROM order_views \
             WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR customer_id = ?2) \
               AND (?3 IS NULL OR order_id < ?3) AND {email} \
             ORDER BY order_id DESC LIMIT ?4"
        ))
        .bind(filter.status.map(OrderStatus::as_str))
        .bind(filter.customer_id)
        .bind(before)
        .bind(i64::from(limit))
        .bind(filter.email.as_deref().map(email_key))
        .fetch_all(self.database.reader())
        .await?;
        rows.into_iter().map(order_view).collect()
    }

    async fn count_products(&self, active_only: bool) -> Result<u64, StoreError> {
        let count: i64 =
            sqlx::query_scalar("SELECT count(*) FROM product_views WHERE ?1 = 0 OR active = 1")
                .bind(active_only)
                .fetch_one(self.database.reader())
                .await?;
        Ok(count.max(0) as u64)
    }

    async fn order_kpis(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<OrderKpis, StoreError> {
        use futures_util::TryStreamExt as _;
        let (from, to) = (from.timestamp_micros(), to.timestamp_micros());
        let reader = self.database.reader();
        let rows: Vec<(String, i64)> = sqlx::query_as(KPI_STATUSES)
            .bind(from)
            .bind(to)
            .fetch_all(reader)
            .await?;
        let (by_status, finals) = kpi_statuses(rows)?;
        // Amounts are decimal text here: summed in Rust, exactly, as they come.
        let mut sums: Vec<crate::domain::money::Money> = Vec::new();
        let mut amounts = sqlx::query_as::<_, (String, String)>(
            "SELECT currency, total_amount FROM order_views \
             WHERE status = 'CONFIRMED' AND created_at >= ?1 AND created_at < ?2",
        )
        .bind(from)
        .bind(to)
        .fetch(reader);
        while let Some((currency, amount)) = amounts.try_next().await? {
            let amount = money(&amount, &currency)?;
            match sums
                .iter_mut()
                .find(|sum| sum.currency() == amount.currency())
            {
                Some(sum) => {
                    *sum = sum
                        .checked_add(&amount)
                        .map_err(|e| StoreError::Corrupt(format!("revenue: {e}")))?;
                }
                None => sums.push(amount),
            }
        }
        sums.sort_by(|a, b| a.currency().code().cmp(b.currency().code()));
        let final_p95 = if finals == 0 {
            None
        } else {
            let micros: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT updated_at - created_at FROM order_views WHERE status IN {FINAL_STATUSES} \
                   AND created_at >= ?1 AND created_at < ?2 ORDER BY 1 LIMIT 1 OFFSET ?3"
            ))
            .bind(from)
            .bind(to)
            .bind(i64::try_from(nearest_rank(finals, 95)).unwrap_or(i64::MAX))
            .fetch_optional(reader)
            .await?;
            micros
                .map(|micros| std::time::Duration::from_micros(u64::try_from(micros).unwrap_or(0)))
        };
        Ok(OrderKpis {
            by_status,
            revenue: sums,
            final_p95,
        })
    }

    async fn count_orders(&self, filter: &OrderFilter) -> Result<u64, StoreError> {
        let email = email_condition(filter, "?3");
        let count: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM order_views \
             WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR customer_id = ?2) \
               AND {email}"
        ))
        .bind(filter.status.map(OrderStatus::as_str))
        .bind(filter.customer_id)
        .bind(filter.email.as_deref().map(email_key))
        .fetch_one(self.database.reader())
        .await?;
        Ok(count.max(0) as u64)
    }
}

/// An `inventory_views` row: product id, on hand, reserved, version, updated at.
fn inventory_view(
    (product_id, on_hand, reserved, version, updated_at): (Uuid, i64, i64, i32, i64),
) -> Result<InventoryView, StoreError> {
    Ok(InventoryView {
        product_id,
        on_hand: count(on_hand, "on hand")?,
        reserved: count(reserved, "reserved")?,
        version: count(version.into(), "version")?,
        updated_at: time(updated_at)?,
    })
}
