//! Live updates over WebSocket (`graphql-transport-ws`, and the legacy
//! `graphql-ws`, on `/graphql`).
//!
//! A subscription reads the event log itself; the wake-ups of
//! [`crate::live`] only tell it when to look again. So what it sends is
//! exactly the log, in log order: nothing skipped, nothing twice, also
//! across kernel processes and reconnects.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_graphql::{Context, Object, Subscription};
use chrono::{DateTime, Utc};
use futures_util::Stream;
use uuid::Uuid;

use super::access;
use super::commerce::OrderStatus;
use super::error::{ApiError, UserError};
use super::sagas::{Saga, SagaStep};
use super::{ErrorCode, event_store};
use crate::domain::DomainError;
use crate::domain::saga::{ORDER_FULFILMENT, Saga as SagaRecord};
use crate::event_store::{LogHorizon, Position};
use crate::live::{LiveUpdates, OrderChange, OrderFeed, Watch};

/// Longest a subscription waits without a wake-up before looking at the log
/// anyway: the last resort if every wake-up path failed.
const IDLE_RECHECK: Duration = Duration::from_secs(30);
/// Consecutive failed reads after which a subscription ends with an error.
const MAX_READ_FAILURES: u32 = 5;
/// Wait after a failed read before the next.
const READ_RETRY: Duration = Duration::from_secs(1);
/// Longest a subscription waits for committed events to become readable
/// in the global log before reading anyway.
const READABLE_WAIT: Duration = Duration::from_secs(5);

/// Every subscription; `Subscription` in the schema.
pub struct SubscriptionRoot;

#[Subscription(name = "Subscription")]
impl SubscriptionRoot {
    /// Every change of one order, in the order it happened: its status
    /// changes and each step of its saga. Starts from the beginning (the
    /// order placed, PENDING), or after `after`, the `cursor` of the last
    /// update a client saw, so a reconnecting client gets exactly what it
    /// missed. Ends once the order is CONFIRMED, FAILED or CANCELLED and its
    /// saga has finished. Another customer's order reads as NOT_FOUND.
    async fn order_status_changed(
        &self,
        ctx: &Context<'_>,
        order_id: Uuid,
        #[graphql(desc = "`cursor` of the last update already seen.")] after: Option<String>,
    ) -> Result<impl Stream<Item = async_graphql::Result<OrderStatusUpdate>> + use<>, ApiError>
    {
        let principal = access::principal(ctx)?.clone();
        let resume_after = match &after {
            None => Position::START,
            Some(cursor) => cursor
                .parse::<Position>()
                .map_err(|_| ApiError::invalid("after", "not a cursor of this subscription"))?,
        };
        let live = ctx.data_unchecked::<LiveUpdates>();
        let mut feed = OrderFeed::new(Arc::clone(event_store(ctx)), order_id, resume_after);
        // Registered before the first read, so nothing falls in between.
        let watch = live.watch(&feed.aggregate_ids());
        let (mut first, mut unread) = feed.poll().await?;
        // Committed but not shown by the log yet (just placed, say): worth
        // a short wait before deciding whether the order exists.
        if let Some(position) = unread {
            live.horizon()
                .wait_until_readable(position, READABLE_WAIT)
                .await;
            let (more, still_unread) = feed.poll().await?;
            first.extend(more);
            unread = still_unread;
        }
        let visible = feed
            .order()
            .placed
            .as_ref()
            .is_some_and(|placed| principal.may_access(placed.customer_id));
        if !visible {
            let missing = DomainError::NotFound {
                kind: "order",
                id: order_id,
            };
            return Err(ApiError::Refused(UserError::new(
                ErrorCode::NotFound,
                Some("orderId"),
                missing.to_string(),
            )));
        }
        let state = Following {
            feed,
            watch,
            horizon: live.horizon().clone(),
            pending: first.into(),
            unread,
            failures: 0,
            ended: false,
        };
        Ok(futures_util::stream::unfold(state, Following::next))
    }
}

struct Following {
    feed: OrderFeed,
    watch: Watch,
    horizon: LogHorizon,
    pending: VecDeque<OrderChange>,
    /// The newest event polled but not readable in the log yet.
    unread: Option<Position>,
    failures: u32,
    ended: bool,
}

impl Following {
    async fn next(mut self) -> Option<(async_graphql::Result<OrderStatusUpdate>, Self)> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Some((Ok(OrderStatusUpdate(change)), self));
            }
            if self.ended || self.feed.is_finished() {
                return None;
            }
            match self.unread {
                // Committed news the global log did not show yet: wait until
                // it does rather than for the next wake-up (which may never
                // come, the append having happened).
                Some(unread) => {
                    self.horizon
                        .wait_until_readable(unread, READABLE_WAIT)
                        .await;
                }
                None => {
                    let _ = tokio::time::timeout(IDLE_RECHECK, self.watch.changed()).await;
                }
            }
            match self.feed.poll().await {
                Ok((changes, unread)) => {
                    self.failures = 0;
                    self.pending.extend(changes);
                    self.unread = unread;
                }
                Err(error) => {
                    self.failures += 1;
                    if self.failures >= MAX_READ_FAILURES {
                        self.ended = true;
                        return Some((Err(ApiError::Store(error).into()), self));
                    }
                    tracing::warn!(%error, "order subscription: reading the log failed; retrying");
                    tokio::time::sleep(READ_RETRY).await;
                }
            }
        }
    }
}

/// One change of an order: an event of the order or of its saga, with the
/// state it led to.
pub struct OrderStatusUpdate(OrderChange);

#[Object]
impl OrderStatusUpdate {
    /// Pass as `after` when subscribing again to resume after this update.
    async fn cursor(&self) -> String {
        self.0.position.to_string()
    }
    async fn order_id(&self) -> Uuid {
        self.0.order_id
    }
    /// The event behind this update, such as `OrderPlaced`, `StepSucceeded`.
    async fn event_type(&self) -> &str {
        &self.0.event_type
    }
    async fn occurred_at(&self) -> DateTime<Utc> {
        self.0.occurred_at
    }
    /// The order's status after this change.
    async fn status(&self) -> Option<OrderStatus> {
        self.0.order.status.map(Into::into)
    }
    /// Why the order was cancelled or failed.
    async fn reason(&self) -> Option<&str> {
        self.0.order.reason.as_deref()
    }
    /// The saga step this change is about, as it is after it.
    async fn step(&self) -> Option<SagaStep> {
        let name = self.0.step.as_deref()?;
        let saga = self.0.saga.as_ref()?;
        saga.state
            .steps
            .iter()
            .find(|step| step.name() == name)
            .cloned()
            .map(SagaStep)
    }
    /// The order's saga after this change; null before it started.
    async fn saga(&self) -> Option<Saga> {
        let saga_id = SagaRecord::id_for(ORDER_FULFILMENT, self.0.order_id);
        self.0.saga.clone().map(|loaded| Saga::new(saga_id, loaded))
    }
}
