//! One order's story as the log tells it: the order's own events and its
//! saga's, merged in log order, each with the state it leads to.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::Aggregate;
use crate::domain::order::{Order, OrderEvent};
use crate::domain::saga::{ORDER_FULFILMENT, Saga, SagaEvent};
use crate::event_store::repository::{Loaded, decode};
use crate::event_store::{EventStore, Position, StoreError};

/// What one event of the order or its saga changed.
#[derive(Debug, Clone)]
pub struct OrderChange {
    pub order_id: Uuid,
    /// The event's log position: pass it back as `after` to resume.
    pub position: Position,
    pub event_type: String,
    pub occurred_at: DateTime<Utc>,
    /// The order after this event.
    pub order: Order,
    /// The saga after this event; `None` until it started.
    pub saga: Option<Loaded<Saga>>,
    /// The saga step this event is about, if any.
    pub step: Option<String>,
}

/// Follows one order. Each [`OrderFeed::poll`] reads only what was
/// appended since the last one, so following costs one indexed read per
/// wake-up (two when the log does not show the news yet), whatever the
/// log's size.
pub struct OrderFeed {
    store: Arc<dyn EventStore>,
    order_id: Uuid,
    saga_id: Uuid,
    /// Changes at or before this position are folded in but not returned.
    resume_after: Position,
    folded: Folded,
}

/// The order and its saga as far as a feed has read them.
struct Folded {
    order: Order,
    /// The order stream's version folded in.
    order_version: u32,
    saga: Loaded<Saga>,
}

impl Default for Folded {
    fn default() -> Self {
        Folded {
            order: Order::default(),
            order_version: 0,
            saga: Loaded {
                state: Saga::default(),
                version: 0,
            },
        }
    }
}

impl OrderFeed {
    /// A feed of `order_id` returning changes after `resume_after`
    /// ([`Position::START`] for the whole story).
    pub fn new(store: Arc<dyn EventStore>, order_id: Uuid, resume_after: Position) -> Self {
        OrderFeed {
            store,
            order_id,
            saga_id: Saga::id_for(ORDER_FULFILMENT, order_id),
            resume_after,
            folded: Folded::default(),
        }
    }

    /// The aggregate ids whose changes concern this feed.
    pub fn aggregate_ids(&self) -> [Uuid; 2] {
        [self.order_id, self.saga_id]
    }

    /// The order as folded so far.
    pub fn order(&self) -> &Order {
        &self.folded.order
    }

    /// Whether nothing can happen to the order any more: its status is
    /// final and its saga, if any, completed or compensated. A PARKED saga
    /// may still be retried, so it keeps the feed open.
    pub fn is_finished(&self) -> bool {
        let order_final = self.folded.order.status.is_some_and(|s| s.is_final());
        let saga_done = self.folded.saga.state.status.is_none_or(|s| s.is_final());
        order_final && saga_done
    }

    /// The changes that became readable since the last call, in log order,
    /// and the position of the newest event already committed but not
    /// readable in the global log yet, if any: wait until the log shows it
    /// ([`crate::event_store::LogHorizon`]) and poll again.
    ///
    /// One read of both streams after the versions folded in: an event is
    /// folded in only once the log shows it, so the feed keeps log order
    /// (nothing can appear later before a readable event).
    pub async fn poll(&mut self) -> Result<(Vec<OrderChange>, Option<Position>), StoreError> {
        let streams = [
            (self.order_id, self.folded.order_version),
            (self.saga_id, self.folded.saga.version),
        ];
        let events = self.store.read_streams_after(&streams).await?;
        if events.is_empty() {
            return Ok((Vec::new(), None));
        }
        // Every readable event decoded before any is folded in: a failed
        // poll leaves the feed where it was, to be read again whole.
        let mut readable = Vec::new();
        let mut unread = None;
        for (event, shown) in events {
            // Readable events come first; whatever follows an unreadable
            // one waits with it, so log order holds whatever the backend.
            if !shown || unread.is_some() {
                unread = unread.max(Some(event.position));
                continue;
            }
            let decoded = if event.aggregate_id == self.order_id {
                if event.aggregate_type != Order::AGGREGATE_TYPE {
                    // Not an order's id: nothing to follow.
                    continue;
                }
                FeedEvent::Order(decode(&event)?)
            } else {
                FeedEvent::Saga(decode(&event)?)
            };
            readable.push((event, decoded));
        }
        let folded = &mut self.folded;
        let mut changes = Vec::new();
        for (event, decoded) in readable {
            let step = match decoded {
                FeedEvent::Order(order_event) => {
                    folded.order.apply(&order_event);
                    folded.order_version = event.version;
                    None
                }
                FeedEvent::Saga(saga_event) => {
                    folded.saga.state.apply(&saga_event);
                    folded.saga.version = event.version;
                    step_of(&saga_event)
                }
            };
            if event.position > self.resume_after && folded.order.placed.is_some() {
                changes.push(OrderChange {
                    order_id: self.order_id,
                    position: event.position,
                    event_type: event.event_type,
                    occurred_at: event.created_at,
                    order: folded.order.clone(),
                    saga: folded
                        .saga
                        .state
                        .status
                        .is_some()
                        .then(|| folded.saga.clone()),
                    step,
                });
            }
        }
        Ok((changes, unread))
    }
}

/// A decoded event of the order or of its saga.
enum FeedEvent {
    Order(OrderEvent),
    Saga(SagaEvent),
}

fn step_of(event: &SagaEvent) -> Option<String> {
    match event {
        SagaEvent::StepStarted { step, .. }
        | SagaEvent::StepSucceeded { step, .. }
        | SagaEvent::StepFailed { step, .. }
        | SagaEvent::StepCompensated { step, .. }
        | SagaEvent::Parked { step, .. } => Some(step.clone()),
        _ => None,
    }
}
