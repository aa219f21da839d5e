//! Pieces both backends' view stores share: turning stored text back into
//! domain values, and the tables of each projection.

use std::borrow::Cow;
use std::str::FromStr;

use rust_decimal::Decimal;

use crate::domain::money::{Currency, Money};
use crate::domain::order::OrderStatus;
use crate::event_store::StoreError;
use crate::projections::{OrderFilter, ProjectionName};

/// The tables a projection owns, emptied by a rebuild.
pub fn tables(projection: ProjectionName) -> &'static [&'static str] {
    match projection {
        ProjectionName::Products => &["product_views"],
        ProjectionName::Inventory => &["inventory_views", "reservation_views"],
        ProjectionName::Orders => &["order_views"],
    }
}

/// The primary key of a view's table (one column each).
pub fn key_column(table: &str) -> Result<&'static str, StoreError> {
    match table {
        "product_views" | "inventory_views" => Ok("product_id"),
        "reservation_views" => Ok("reservation_id"),
        "order_views" => Ok("order_id"),
        other => Err(StoreError::Corrupt(format!(
            "{other} is not a view's table"
        ))),
    }
}

/// The two statements that make a live table (`live`, named as the swap's
/// connection must name it) hold exactly its shadow's rows while writing
/// only the rows that differ: those the shadow lacks are deleted, the
/// others upserted where they differ. A rebuilt view is mostly what the
/// live one holds, so this writes little where a copy of the whole view
/// would write every row and index entry again, inside the transaction
/// that holds the live checkpoint. `differs` compares the row being
/// upserted (`excluded`) with the one in place.
pub fn swap_statements(
    table: &str,
    live: &str,
    shadow: &str,
    columns: &[String],
    differs: &str,
) -> Result<[String; 2], StoreError> {
    let key = key_column(table)?;
    if !columns.iter().any(|column| column == key) {
        // A column list read from somewhere else than the table swapped.
        return Err(StoreError::Corrupt(format!(
            "the columns found for {table} lack its key {key}: {columns:?}"
        )));
    }
    let set = columns
        .iter()
        .filter(|column| column.as_str() != key)
        .map(|column| format!("{column} = excluded.{column}"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok([
        // NOT EXISTS, not NOT IN: Postgres runs the latter row by row
        // against the subquery once it outgrows work_mem.
        format!(
            "DELETE FROM {live} WHERE NOT EXISTS \
             (SELECT 1 FROM {shadow} AS shadow WHERE shadow.{key} = {table}.{key})"
        ),
        // `WHERE true`: SQLite's grammar needs it before an upsert's
        // ON CONFLICT after a SELECT; Postgres ignores it.
        format!(
            "INSERT INTO {live} SELECT * FROM {shadow} WHERE true \
             ON CONFLICT ({key}) DO UPDATE SET {set} WHERE {differs}"
        ),
    ])
}

/// Which tables a projection's changes are written to: the live ones that
/// queries read, or a rebuild's shadow tables beside them (see
/// [`crate::projections::ShadowView`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewTables {
    Live,
    Shadow,
}

/// Every table of a view, each owned by one projection ([`tables`]).
const VIEW_TABLES: [&str; 4] = [
    "product_views",
    "inventory_views",
    "reservation_views",
    "order_views",
];

impl ViewTables {
    /// `sql`, written for the live tables, aimed at these. No view's name
    /// holds another's, so each is replaced on its own.
    pub fn sql(self, sql: &str) -> Cow<'_, str> {
        match self {
            ViewTables::Live => Cow::Borrowed(sql),
            ViewTables::Shadow => {
                Cow::Owned(VIEW_TABLES.iter().fold(sql.to_string(), |sql, table| {
                    sql.replace(table, &shadow_table(table))
                }))
            }
        }
    }
}

/// The name of `table`'s shadow: a temporary table, seen only by the
/// connection of the rebuild that made it and dropped with it.
pub fn shadow_table(table: &str) -> String {
    format!("shadow_{table}")
}

/// A projection's checkpoint row is missing (the migrations write one each).
pub fn no_checkpoint(projection: ProjectionName) -> StoreError {
    StoreError::Corrupt(format!("no checkpoint row for {}", projection.as_str()))
}

pub fn money(amount: &str, currency: &str) -> Result<Money, StoreError> {
    let amount = Decimal::from_str(amount)
        .map_err(|e| StoreError::Corrupt(format!("amount {amount:?}: {e}")))?;
    let currency =
        Currency::parse(currency).map_err(|e| StoreError::Corrupt(format!("currency: {e}")))?;
    Money::new(amount, currency).map_err(|e| StoreError::Corrupt(format!("amount: {e}")))
}

pub fn status(text: &str) -> Result<OrderStatus, StoreError> {
    OrderStatus::parse(text).ok_or_else(|| StoreError::Corrupt(format!("order status {text:?}")))
}

pub fn count(value: i64, what: &str) -> Result<u32, StoreError> {
    u32::try_from(value).map_err(|_| StoreError::Corrupt(format!("{what} out of range: {value}")))
}

pub fn from_json<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
    what: &str,
) -> Result<T, StoreError> {
    serde_json::from_value(value).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

pub fn to_json<T: serde::Serialize>(value: &T) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(value).map_err(|e| StoreError::Codec(e.to_string()))
}

/// Orders placed in [from, to), by status.
pub const KPI_STATUSES: &str = "SELECT status, COUNT(*) FROM order_views \
     WHERE created_at >= $1 AND created_at < $2 GROUP BY status";

/// The statuses whose orders `kpis` times from placement.
pub const FINAL_STATUSES: &str = "('CONFIRMED', 'FAILED', 'CANCELLED')";

/// Counts by status from `(status, count)` rows, and how many are final.
pub fn kpi_statuses(
    rows: Vec<(String, i64)>,
) -> Result<(Vec<(OrderStatus, u64)>, u64), StoreError> {
    let mut by_status = Vec::with_capacity(rows.len());
    for (text, count) in rows {
        by_status.push((status(&text)?, u64::try_from(count).unwrap_or(0)));
    }
    let finals = by_status
        .iter()
        .filter(|(status, _)| status.is_final())
        .map(|(_, count)| count)
        .sum();
    Ok((by_status, finals))
}

/// The `order_views` condition of an order search by email, `placeholder`
/// being the email key's parameter. Spelled `email_key = <placeholder>`
/// only when there is an email to look for, so that the planner sees a
/// plain equality it can answer from the partial index on `email_key`
/// (`<placeholder> IS NULL OR ...` would hide it from a generic plan); the
/// parameter is bound either way.
pub fn email_condition(filter: &OrderFilter, placeholder: &str) -> String {
    if filter.email.is_some() {
        format!("email_key = {placeholder}")
    } else {
        format!("{placeholder} IS NULL")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_statements_name_only_shadow_tables() {
        let live = "UPDATE order_views o SET n = 1 FROM reservation_views r \
             WHERE inventory_views.on_hand > 0 AND product_views.x = r.y";
        assert_eq!(ViewTables::Live.sql(live), live);
        assert_eq!(
            ViewTables::Shadow.sql(live),
            "UPDATE shadow_order_views o SET n = 1 FROM shadow_reservation_views r \
             WHERE shadow_inventory_views.on_hand > 0 AND shadow_product_views.x = r.y"
        );
    }
}
