//! One order's story as the log tells it: the order's own events and its
//! saga's, merged in log order, each with the state it leads to.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::Aggregate;
use crate::domain::order::Order;
use crate::domain::saga::{ORDER_FULFILMENT, Saga, SagaEvent};
use crate::event_store::repository::{Loaded, decode};
use crate::event_store::{
    EventFilter, EventStore, Position, RecordedEvent, StoreError, StreamSelection,
};

/// Events read per page.
const PAGE: u32 = 500;

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

/// Follows one order. Each [`OrderFeed::poll`] reads only what became
/// readable since the last one, so following costs two indexed reads per
/// wake-up, whatever the log's size.
pub struct OrderFeed {
    store: Arc<dyn EventStore>,
    order_id: Uuid,
    saga_id: Uuid,
    /// Everything at or before this position has been folded in.
    cursor: Position,
    /// Changes at or before this position are folded in but not returned.
    resume_after: Position,
    order: Order,
    /// The order stream's version folded in.
    order_version: u32,
    saga: Loaded<Saga>,
}

impl OrderFeed {
    /// A feed of `order_id` returning changes after `resume_after`
    /// ([`Position::START`] for the whole story).
    pub fn new(store: Arc<dyn EventStore>, order_id: Uuid, resume_after: Position) -> Self {
        OrderFeed {
            store,
            order_id,
            saga_id: Saga::id_for(ORDER_FULFILMENT, order_id),
            cursor: Position::START,
            resume_after,
            order: Order::default(),
            order_version: 0,
            saga: Loaded {
                state: Saga::default(),
                version: 0,
            },
        }
    }

    /// The aggregate ids whose changes concern this feed.
    pub fn aggregate_ids(&self) -> [Uuid; 2] {
        [self.order_id, self.saga_id]
    }

    /// The order as folded so far.
    pub fn order(&self) -> &Order {
        &self.order
    }

    /// Whether nothing can happen to the order any more: its status is
    /// final and its saga, if any, completed or compensated. A PARKED saga
    /// may still be retried, so it keeps the feed open.
    pub fn is_finished(&self) -> bool {
        let order_final = self.order.status.is_some_and(|s| s.is_final());
        let saga_done = self.saga.state.status.is_none_or(|s| s.is_final());
        order_final && saga_done
    }

    /// The changes that became readable since the last call, in log order.
    ///
    /// Both streams are read up to the same horizon (the log head read
    /// first): positions at or below it are final, so nothing can appear
    /// behind the cursor later.
    pub async fn poll(&mut self) -> Result<Vec<OrderChange>, StoreError> {
        let horizon = self.store.head().await?;
        if horizon <= self.cursor {
            return Ok(Vec::new());
        }
        let mut events = self.read(self.order_id, horizon).await?;
        events.extend(self.read(self.saga_id, horizon).await?);
        events.sort_by_key(|event| event.position);
        let mut changes = Vec::new();
        for event in events {
            let step = if event.aggregate_id == self.order_id {
                if event.aggregate_type != Order::AGGREGATE_TYPE {
                    // Not an order's id: nothing to follow.
                    continue;
                }
                self.order.apply(&decode(&event)?);
                self.order_version = event.version;
                None
            } else {
                let saga_event: SagaEvent = decode(&event)?;
                self.saga.state.apply(&saga_event);
                self.saga.version = event.version;
                step_of(&saga_event)
            };
            if event.position > self.resume_after && self.order.placed.is_some() {
                changes.push(OrderChange {
                    order_id: self.order_id,
                    position: event.position,
                    event_type: event.event_type.clone(),
                    occurred_at: event.created_at,
                    order: self.order.clone(),
                    saga: self.saga.state.status.is_some().then(|| self.saga.clone()),
                    step,
                });
            }
        }
        self.cursor = horizon;
        Ok(changes)
    }

    /// Where the latest committed event of the order or its saga stands in
    /// the log, if there is one this feed has not folded in yet: it may not
    /// be readable in the global log yet (see [`crate::event_store::LogHorizon`]).
    pub async fn latest_unread(&self) -> Result<Option<Position>, StoreError> {
        let mut latest = None;
        for (stream, version) in [
            (self.order_id, self.order_version),
            (self.saga_id, self.saga.version),
        ] {
            let selection = StreamSelection {
                after_version: Some(version).filter(|version| *version > 0),
                ..StreamSelection::default()
            };
            let unread = self.store.read_stream(stream, selection).await?;
            latest = latest.max(unread.last().map(|event| event.position));
        }
        Ok(latest.filter(|position| *position > self.cursor))
    }

    /// One stream's events after the cursor, up to `horizon`.
    async fn read(
        &self,
        aggregate_id: Uuid,
        horizon: Position,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let filter = EventFilter {
            aggregate_id: Some(aggregate_id),
            ..EventFilter::default()
        };
        let mut after = self.cursor;
        let mut events = Vec::new();
        loop {
            let page = self.store.read_all_matching(&filter, after, PAGE).await?;
            let full = page.len() == PAGE as usize;
            for event in page {
                if event.position > horizon {
                    return Ok(events);
                }
                after = event.position;
                events.push(event);
            }
            if !full {
                return Ok(events);
            }
        }
    }
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
