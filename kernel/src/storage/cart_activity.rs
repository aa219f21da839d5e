//! The cart lifecycle record ([`CartActivityLog`]) on both backends.
//!
//! One row per cart (`cart_activity`), merged from activity entries: the
//! newest version of a cart wins and a checkout, once recorded, stays. Both
//! backends store UUIDs natively and times as microseconds, so the statements
//! are built once, here, and only run per backend.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{Encode, QueryBuilder, Type};
use uuid::Uuid;

use super::postgres::PostgresDatabase;
use super::sqlite::SqliteDatabase;
use crate::carts::{
    AbandonedCart, AbandonedCursor, AbandonmentReport, CartActivity, CartActivityLog, CartKpis,
    IDLE_AGE_BOUNDS,
};
use crate::domain::cart::{CartOwner, CartStatus};
use crate::event_store::StoreError;

/// Columns of a listed abandoned cart, in the order [`AbandonedRow`] declares them.
const ABANDONED_COLUMNS: &str =
    "cart_id, owner_kind, owner_id, line_count, created_at, last_activity_at, expires_at";
type AbandonedRow = (Uuid, String, String, i32, i64, i64, i64);

/// Abandoned (idle since $1), checked out, active; the abandoned by idle
/// age (idle since $2, $3, $4: the bounds of [`IDLE_AGE_BOUNDS`] before
/// now), and those expired by $5 (now).
const COUNTS: &str = "SELECT \
     COALESCE(SUM(CASE WHEN checked_out_at IS NULL AND last_activity_at <= $1 THEN 1 ELSE 0 END), 0), \
     COALESCE(SUM(CASE WHEN checked_out_at IS NOT NULL THEN 1 ELSE 0 END), 0), \
     COALESCE(SUM(CASE WHEN checked_out_at IS NULL AND last_activity_at > $1 THEN 1 ELSE 0 END), 0), \
     COALESCE(SUM(CASE WHEN checked_out_at IS NULL AND last_activity_at <= $1 \
       AND last_activity_at > $2 THEN 1 ELSE 0 END), 0), \
     COALESCE(SUM(CASE WHEN checked_out_at IS NULL AND last_activity_at <= $1 \
       AND last_activity_at <= $2 AND last_activity_at > $3 THEN 1 ELSE 0 END), 0), \
     COALESCE(SUM(CASE WHEN checked_out_at IS NULL AND last_activity_at <= $1 \
       AND last_activity_at <= $3 AND last_activity_at > $4 THEN 1 ELSE 0 END), 0), \
     COALESCE(SUM(CASE WHEN checked_out_at IS NULL AND last_activity_at <= $1 \
       AND last_activity_at <= $4 THEN 1 ELSE 0 END), 0), \
     COALESCE(SUM(CASE WHEN checked_out_at IS NULL AND last_activity_at <= $1 \
       AND expires_at <= $5 THEN 1 ELSE 0 END), 0) \
     FROM cart_activity";

type Counts = (i64, i64, i64, i64, i64, i64, i64, i64);

/// [`COUNTS`] as of `now`, for carts idle since `cutoff`.
fn counts_query<'q, DB>(
    now: DateTime<Utc>,
    cutoff: i64,
) -> sqlx::query::QueryAs<'q, DB, Counts, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    i64: Encode<'q, DB> + Type<DB>,
    Counts: for<'r> sqlx::FromRow<'r, DB::Row>,
{
    // The bounds are constants of days; a bound too far back to compute
    // would count every abandoned cart as younger than it.
    let before = |age: std::time::Duration| {
        chrono::Duration::from_std(age)
            .ok()
            .and_then(|age| now.checked_sub_signed(age))
            .map_or(i64::MIN, |at| at.timestamp_micros())
    };
    sqlx::query_as(COUNTS)
        .bind(cutoff)
        .bind(before(IDLE_AGE_BOUNDS[0]))
        .bind(before(IDLE_AGE_BOUNDS[1]))
        .bind(before(IDLE_AGE_BOUNDS[2]))
        .bind(now.timestamp_micros())
}

/// Carts created in [$1, $2): all, checked out, idle since $3 and not
/// checked out.
const KPI_COUNTS: &str = "SELECT COUNT(*), \
     COALESCE(SUM(CASE WHEN checked_out_at IS NOT NULL THEN 1 ELSE 0 END), 0), \
     COALESCE(SUM(CASE WHEN checked_out_at IS NULL AND last_activity_at <= $3 THEN 1 ELSE 0 END), 0) \
     FROM cart_activity WHERE created_at >= $1 AND created_at < $2";

fn cart_kpis((created, checked_out, abandoned): (i64, i64, i64)) -> CartKpis {
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    CartKpis {
        created: count(created),
        checked_out: count(checked_out),
        abandoned: count(abandoned),
    }
}

/// Fields a newer version of the cart replaces.
const NEWER_WINS: [&str; 5] = [
    "status",
    "line_count",
    "last_activity_at",
    "expires_at",
    "version",
];

/// One entry per cart, the newest: a statement may not update a row twice.
fn newest_per_cart(entries: &[CartActivity]) -> Vec<&CartActivity> {
    let mut newest: HashMap<Uuid, &CartActivity> = HashMap::new();
    for entry in entries {
        newest
            .entry(entry.cart_id)
            .and_modify(|kept| {
                if entry.version > kept.version {
                    *kept = entry;
                }
            })
            .or_insert(entry);
    }
    newest.into_values().collect()
}

fn owner_columns(owner: &CartOwner) -> (&'static str, String) {
    match owner {
        CartOwner::Customer(id) => ("customer", id.to_string()),
        CartOwner::Session(session) => ("session", session.clone()),
    }
}

fn upsert<'args, DB>(entries: &[&CartActivity]) -> QueryBuilder<'args, DB>
where
    DB: sqlx::Database,
    i32: Encode<'args, DB> + Type<DB>,
    i64: Encode<'args, DB> + Type<DB>,
    Option<i64>: Encode<'args, DB> + Type<DB>,
    Uuid: Encode<'args, DB> + Type<DB>,
    Option<Uuid>: Encode<'args, DB> + Type<DB>,
    String: Encode<'args, DB> + Type<DB>,
{
    let mut query = QueryBuilder::new(
        "INSERT INTO cart_activity (cart_id, owner_kind, owner_id, status, version, line_count, \
         created_at, last_activity_at, expires_at, checked_out_at, order_id) ",
    );
    query.push_values(entries, |mut row, entry| {
        let (kind, id) = owner_columns(&entry.owner);
        let checked_out_at =
            (entry.status == CartStatus::CheckedOut).then(|| entry.updated_at.timestamp_micros());
        row.push_bind(entry.cart_id)
            .push_bind(kind.to_string())
            .push_bind(id)
            .push_bind(entry.status.as_str().to_string())
            .push_bind(i64::from(entry.version))
            .push_bind(i32::try_from(entry.line_count).unwrap_or(i32::MAX))
            .push_bind(entry.created_at.timestamp_micros())
            .push_bind(entry.updated_at.timestamp_micros())
            .push_bind(entry.expires_at.timestamp_micros())
            .push_bind(checked_out_at)
            .push_bind(entry.order_id);
    });
    query.push(" ON CONFLICT (cart_id) DO UPDATE SET ");
    for column in NEWER_WINS {
        query.push(format!(
            "{column} = CASE WHEN excluded.version > cart_activity.version \
             THEN excluded.{column} ELSE cart_activity.{column} END, "
        ));
    }
    query.push(
        "checked_out_at = COALESCE(cart_activity.checked_out_at, excluded.checked_out_at), \
         order_id = COALESCE(cart_activity.order_id, excluded.order_id)",
    );
    query
}

fn abandoned_list<'args, DB>(
    cutoff: i64,
    after: Option<AbandonedCursor>,
    limit: u32,
) -> QueryBuilder<'args, DB>
where
    DB: sqlx::Database,
    i64: Encode<'args, DB> + Type<DB>,
    Uuid: Encode<'args, DB> + Type<DB>,
{
    let mut query = QueryBuilder::new(format!(
        "SELECT {ABANDONED_COLUMNS} FROM cart_activity \
         WHERE checked_out_at IS NULL AND last_activity_at <= "
    ));
    query.push_bind(cutoff);
    if let Some(after) = after {
        let at = after.last_activity_at.timestamp_micros();
        query
            .push(" AND (last_activity_at > ")
            .push_bind(at)
            .push(" OR (last_activity_at = ")
            .push_bind(at)
            .push(" AND cart_id > ")
            .push_bind(after.cart_id)
            .push("))");
    }
    query
        .push(" ORDER BY last_activity_at, cart_id LIMIT ")
        .push_bind(i64::from(limit));
    query
}

fn time(micros: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| StoreError::Corrupt(format!("cart activity time {micros}")))
}

fn report(
    rows: Vec<AbandonedRow>,
    (abandoned, checked_out, active, day, week, month, older, expired): Counts,
) -> Result<AbandonmentReport, StoreError> {
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    let carts = rows
        .into_iter()
        .map(|(cart_id, kind, id, line_count, created, last, expires)| {
            let owner = match kind.as_str() {
                "customer" => CartOwner::Customer(
                    Uuid::parse_str(&id)
                        .map_err(|_| StoreError::Corrupt(format!("cart owner {id:?}")))?,
                ),
                "session" => CartOwner::Session(id),
                other => return Err(StoreError::Corrupt(format!("cart owner kind {other:?}"))),
            };
            Ok(AbandonedCart {
                cart_id,
                owner,
                line_count: u32::try_from(line_count).unwrap_or(0),
                created_at: time(created)?,
                last_activity_at: time(last)?,
                expires_at: time(expires)?,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    Ok(AbandonmentReport {
        carts,
        abandoned: count(abandoned),
        checked_out: count(checked_out),
        active: count(active),
        by_idle_age: [count(day), count(week), count(month), count(older)],
        expired: count(expired),
    })
}

/// The record in Postgres.
pub struct PostgresCartActivity {
    database: PostgresDatabase,
}

impl PostgresCartActivity {
    pub fn new(database: PostgresDatabase) -> Self {
        PostgresCartActivity { database }
    }
}

#[async_trait]
impl CartActivityLog for PostgresCartActivity {
    async fn record(&self, entries: &[CartActivity]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        upsert(&newest_per_cart(entries))
            .build()
            .execute(self.database.connections())
            .await?;
        Ok(())
    }

    async fn abandoned(
        &self,
        now: DateTime<Utc>,
        cutoff: DateTime<Utc>,
        after: Option<AbandonedCursor>,
        limit: u32,
    ) -> Result<AbandonmentReport, StoreError> {
        let cutoff = cutoff.timestamp_micros();
        let rows: Vec<AbandonedRow> = abandoned_list(cutoff, after, limit)
            .build_query_as()
            .fetch_all(self.database.connections())
            .await?;
        let counts = counts_query(now, cutoff)
            .fetch_one(self.database.connections())
            .await?;
        report(rows, counts)
    }

    async fn cart_kpis(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        cutoff: DateTime<Utc>,
    ) -> Result<CartKpis, StoreError> {
        let counts = sqlx::query_as(KPI_COUNTS)
            .bind(from.timestamp_micros())
            .bind(to.timestamp_micros())
            .bind(cutoff.timestamp_micros())
            .fetch_one(self.database.connections())
            .await?;
        Ok(cart_kpis(counts))
    }
}

/// The record in SQLite.
pub struct SqliteCartActivity {
    database: SqliteDatabase,
}

impl SqliteCartActivity {
    pub fn new(database: SqliteDatabase) -> Self {
        SqliteCartActivity { database }
    }
}

#[async_trait]
impl CartActivityLog for SqliteCartActivity {
    async fn record(&self, entries: &[CartActivity]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut transaction = self.database.begin_write().await?;
        upsert(&newest_per_cart(entries))
            .build()
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(())
    }

    async fn abandoned(
        &self,
        now: DateTime<Utc>,
        cutoff: DateTime<Utc>,
        after: Option<AbandonedCursor>,
        limit: u32,
    ) -> Result<AbandonmentReport, StoreError> {
        let cutoff = cutoff.timestamp_micros();
        let rows: Vec<AbandonedRow> = abandoned_list(cutoff, after, limit)
            .build_query_as()
            .fetch_all(self.database.reader())
            .await?;
        let counts = counts_query(now, cutoff)
            .fetch_one(self.database.reader())
            .await?;
        report(rows, counts)
    }

    async fn cart_kpis(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        cutoff: DateTime<Utc>,
    ) -> Result<CartKpis, StoreError> {
        let counts = sqlx::query_as(KPI_COUNTS)
            .bind(from.timestamp_micros())
            .bind(to.timestamp_micros())
            .bind(cutoff.timestamp_micros())
            .fetch_one(self.database.reader())
            .await?;
        Ok(cart_kpis(counts))
    }
}
