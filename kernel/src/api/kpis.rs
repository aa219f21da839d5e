//! `kpis(from, to)`: the shop's business and technical figures over a time
//! range, for admins. Read from the order and cart read models (orders and
//! carts created in the range, as they stand now), never from the event log.

use std::sync::Arc;

use async_graphql::{Context, Object, SimpleObject};
use chrono::{DateTime, Utc};

use super::ApiError;
use super::access::AdminOnly;
use super::commerce::{Money, OrderStatus};
use crate::carts::{CartActivityLog, CartKpis};
use crate::domain::order::OrderStatus as DomainOrderStatus;
use crate::projections::{OrderKpis, Projector};

/// Longest range one report covers.
const MAX_RANGE_DAYS: i64 = 366;
/// Idle time after which `kpis` counts an open cart as abandoned, unless asked otherwise.
const DEFAULT_ABANDONED_AFTER_HOURS: f64 = 1.0;

#[derive(Default)]
pub struct KpiQuery;

#[Object]
impl KpiQuery {
    /// Orders and carts created in `[from, to)`, as they stand now. For admins.
    #[graphql(guard = "AdminOnly")]
    async fn kpis(
        &self,
        ctx: &Context<'_>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        #[graphql(
            desc = "An open cart idle this long counts as abandoned (default 1; at most 720)."
        )]
        abandoned_after_hours: Option<f64>,
    ) -> Result<Kpis, ApiError> {
        if to - from < chrono::Duration::seconds(1) {
            return Err(ApiError::invalid(
                "to",
                "must be at least a second after `from`",
            ));
        }
        if to - from > chrono::Duration::days(MAX_RANGE_DAYS) {
            return Err(ApiError::invalid(
                "to",
                format!("a report covers at most {MAX_RANGE_DAYS} days"),
            ));
        }
        let hours = abandoned_after_hours.unwrap_or(DEFAULT_ABANDONED_AFTER_HOURS);
        if !(hours > 0.0 && hours <= 720.0) {
            return Err(ApiError::invalid(
                "abandonedAfterHours",
                "must be more than 0 and at most 720",
            ));
        }
        let cutoff = Utc::now() - chrono::Duration::milliseconds((hours * 3_600_000.0) as i64);
        let orders = ctx
            .data_unchecked::<Projector>()
            .views()
            .order_kpis(from, to)
            .await?;
        let carts = ctx
            .data_unchecked::<Arc<dyn CartActivityLog>>()
            .cart_kpis(from, to, cutoff)
            .await?;
        Ok(Kpis::new(from, to, &orders, carts))
    }
}

/// How many orders are in one status.
#[derive(SimpleObject)]
pub struct OrderStatusCount {
    pub status: OrderStatus,
    pub count: u64,
}

/// What `kpis` reports. Rates are fractions (0.25 is 25%) and null where
/// nothing was there to count.
#[derive(SimpleObject)]
pub struct Kpis {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Orders placed in the range.
    pub orders_placed: u64,
    /// Of those, how many are in each status now.
    pub orders_by_status: Vec<OrderStatusCount>,
    /// Orders placed per hour of the range.
    pub orders_per_hour: f64,
    /// Totals of the CONFIRMED orders, per currency, summed exactly.
    pub revenue: Vec<Money>,
    /// CONFIRMED among the orders that reached a final status: FAILED ones
    /// count against it (declines and stock-outs among them), and so do
    /// CANCELLED ones (cancelled by their customer or an admin). Each order
    /// has one saga, which completes exactly when it is confirmed.
    pub saga_success_rate: Option<f64>,
    /// Placed to final status, 95th percentile (nearest rank), in seconds.
    pub p95_saga_duration_seconds: Option<f64>,
    /// Carts created in the range.
    pub carts_created: u64,
    pub carts_checked_out: u64,
    /// Open carts idle longer than `abandonedAfterHours`.
    pub carts_abandoned: u64,
    /// Carts checked out over carts created.
    pub conversion_rate: Option<f64>,
    /// Abandoned carts over decided ones (abandoned or checked out), as
    /// `abandonedCarts` counts it.
    pub cart_abandonment_rate: Option<f64>,
}

impl Kpis {
    fn new(from: DateTime<Utc>, to: DateTime<Utc>, orders: &OrderKpis, carts: CartKpis) -> Kpis {
        let count_of = |wanted: DomainOrderStatus| {
            orders
                .by_status
                .iter()
                .find(|(status, _)| *status == wanted)
                .map_or(0, |(_, count)| *count)
        };
        let placed: u64 = orders.by_status.iter().map(|(_, count)| count).sum();
        let finished: u64 = orders
            .by_status
            .iter()
            .filter(|(status, _)| status.is_final())
            .map(|(_, count)| count)
            .sum();
        let ratio = |part: u64, whole: u64| (whole > 0).then(|| part as f64 / whole as f64);
        let hours = (to - from).num_milliseconds() as f64 / 3_600_000.0;
        Kpis {
            from,
            to,
            orders_placed: placed,
            orders_by_status: DomainOrderStatus::ALL
                .into_iter()
                .map(|status| OrderStatusCount {
                    status: status.into(),
                    count: count_of(status),
                })
                .collect(),
            orders_per_hour: placed as f64 / hours,
            revenue: orders.revenue.iter().copied().map(Money::from).collect(),
            saga_success_rate: ratio(count_of(DomainOrderStatus::Confirmed), finished),
            p95_saga_duration_seconds: orders.final_p95.map(|p95| p95.as_secs_f64()),
            carts_created: carts.created,
            carts_checked_out: carts.checked_out,
            carts_abandoned: carts.abandoned,
            conversion_rate: ratio(carts.checked_out, carts.created),
            cart_abandonment_rate: ratio(carts.abandoned, carts.abandoned + carts.checked_out),
        }
    }
}
