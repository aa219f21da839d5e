//! Placing orders and moving them through their state machine.
//!
//! Transitions that touch stock write the order's event and the inventory
//! events in one atomic append: reserving stock moves the order to
//! INVENTORY_RESERVED, confirming commits the reservations, cancelling or
//! failing releases them. So an order's status and the stock it holds can
//! never disagree.

use uuid::Uuid;

use super::{CommandContext, CommandError, Commerce, ConflictCounter, Written, stream_append};
use crate::domain::DomainError;
use crate::domain::inventory::{Inventory, ReleaseReason};
use crate::domain::money::Money;
use crate::domain::order::{Address, CatalogPrice, Order, OrderEvent, PlaceOrder};
use crate::event_store::repository::Loaded;
use crate::event_store::{AppendRequest, StoreError, StreamAppend};

pub type OrderChange = Written<Order>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaceOrderInput {
    pub customer_id: Uuid,
    /// Product and quantity; prices come from the catalog.
    pub lines: Vec<(Uuid, u32)>,
    pub shipping_address: Address,
    pub payment_method: String,
    /// A repeated key returns the order the first call placed.
    pub idempotency_key: Option<String>,
    pub email: Option<String>,
}

/// A step of the order state machine (see [`crate::domain::order`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderTransition {
    /// Reserves every line's stock, all or nothing.
    ReserveInventory,
    MarkPaid {
        payment_reference: String,
        amount: Money,
    },
    Ship {
        shipment_reference: String,
    },
    /// Commits the reserved stock as sold.
    Confirm,
    /// Releases any reserved stock.
    Cancel {
        reason: String,
    },
    /// Releases any reserved stock.
    Fail {
        reason: String,
    },
}

/// A decided order transition, not yet appended.
pub(crate) struct PlannedTransition {
    pub events: Vec<OrderEvent>,
    /// The order's stream first, then the inventory streams it touches.
    pub streams: Vec<StreamAppend>,
}

/// The owner name of an order's reservations.
pub fn reservation_owner(order_id: Uuid) -> String {
    format!("order:{order_id}")
}

impl Commerce {
    /// Prices the lines from the catalog and places the order (PENDING).
    pub async fn place_order(
        &self,
        input: PlaceOrderInput,
        context: &CommandContext,
    ) -> Result<OrderChange, CommandError> {
        let command = PlaceOrder {
            customer_id: input.customer_id,
            lines: self.catalog_prices(&input.lines).await?,
            shipping_address: input.shipping_address,
            payment_method: input.payment_method,
            idempotency_key: input.idempotency_key.clone(),
            email: input.email,
        };
        let store_key = input
            .idempotency_key
            .map(|key| format!("place-order:{key}"));
        self.place_priced_order(Uuid::now_v7(), &command, store_key, context)
            .await
    }

    /// Each line's product as the catalog sells it now.
    pub(crate) async fn catalog_prices(
        &self,
        lines: &[(Uuid, u32)],
    ) -> Result<Vec<(CatalogPrice, u32)>, CommandError> {
        let ids: Vec<Uuid> = lines.iter().map(|(product_id, _)| *product_id).collect();
        let products = self.load_products(&ids).await?;
        let mut priced = Vec::with_capacity(lines.len());
        for ((product_id, quantity), product) in lines.iter().zip(products) {
            let product = product?;
            let details = product.state.sellable_price(*product_id)?;
            priced.push((
                CatalogPrice {
                    product_id: *product_id,
                    sku: details.sku.clone(),
                    name: details.name.clone(),
                    unit_price: details.price,
                },
                *quantity,
            ));
        }
        Ok(priced)
    }

    /// Places `command` as order `order_id`. If that order exists already
    /// (an earlier attempt placed it), returns it as it is: placing one id
    /// is idempotent. With `store_key`, a repeated key returns the order the
    /// key placed first.
    pub(crate) async fn place_priced_order(
        &self,
        order_id: Uuid,
        command: &PlaceOrder,
        store_key: Option<String>,
        context: &CommandContext,
    ) -> Result<OrderChange, CommandError> {
        let events = Order::place(command)?;
        let appended = self
            .repository::<Order>()
            .append(order_id, 0, &events, context.metadata(), store_key)
            .await;
        let outcome = match appended {
            Ok(outcome) => outcome,
            Err(StoreError::VersionConflict { .. }) => return self.load_order(order_id).await,
            Err(other) => return Err(other.into()),
        };
        if outcome.replayed {
            // The key placed an order before: return that one as it is now.
            let first_id = outcome
                .stream_versions
                .first()
                .map(|v| v.aggregate_id)
                .unwrap_or(order_id);
            let loaded = self.repository::<Order>().load(first_id).await?;
            let mut existing = Written::unchanged(first_id, loaded);
            existing.position = Some(outcome.last_position);
            return Ok(existing);
        }
        Ok(Written::after(
            order_id,
            Loaded {
                state: Order::default(),
                version: 0,
            },
            &events,
            outcome.last_position,
        ))
    }

    /// Moves an order one step through its state machine.
    pub async fn transition_order(
        &self,
        order_id: Uuid,
        transition: OrderTransition,
        expected_version: Option<u32>,
        context: &CommandContext,
    ) -> Result<OrderChange, CommandError> {
        self.retrying(
            ConflictCounter::Other,
            expected_version.is_some(),
            || async {
                let loaded = self
                    .load_expecting::<Order>(order_id, expected_version)
                    .await?;
                let planned = self.plan_transition(order_id, &loaded, &transition).await?;
                let request = AppendRequest {
                    streams: planned.streams,
                    metadata: context.metadata(),
                    idempotency_key: None,
                };
                let outcome = self.store.append(request).await?;
                Ok(Written::after(
                    order_id,
                    loaded.clone(),
                    &planned.events,
                    outcome.last_position,
                ))
            },
        )
        .await
    }

    /// The inventory of each product `order` holds a reservation of, in
    /// the order of its reservations, in one read.
    async fn reserved_stocks(&self, order: &Order) -> Result<Vec<Loaded<Inventory>>, CommandError> {
        let streams: Vec<Uuid> = order
            .reservations
            .iter()
            .map(|reserved| Inventory::stream_id(reserved.product_id))
            .collect();
        Ok(self.repository::<Inventory>().load_many(&streams).await?)
    }

    /// Decides a transition of the order `loaded`: its events, and every
    /// stream to append atomically (the order's at its loaded version, and
    /// the inventory streams the transition touches). Appends nothing, so the
    /// saga runner can append it together with its own record.
    pub(crate) async fn plan_transition(
        &self,
        order_id: Uuid,
        loaded: &Loaded<Order>,
        transition: &OrderTransition,
    ) -> Result<PlannedTransition, CommandError> {
        let order = &loaded.state;
        let mut inventory_streams: Vec<StreamAppend> = Vec::new();
        let events: Vec<OrderEvent> = match transition {
            OrderTransition::ReserveInventory => {
                // Check the transition first: no stock is planned for an order that cannot take it.
                order.reserve_inventory(order_id, Vec::new())?;
                let plan = self
                    .plan_reservations(
                        &reservation_owner(order_id),
                        &order.quantities_by_product(),
                        None,
                    )
                    .await?;
                inventory_streams = plan.streams;
                order.reserve_inventory(order_id, plan.reservations)?
            }
            OrderTransition::MarkPaid {
                payment_reference,
                amount,
            } => order.mark_paid(order_id, payment_reference, *amount)?,
            OrderTransition::Ship { shipment_reference } => {
                order.ship(order_id, shipment_reference)?
            }
            OrderTransition::Confirm => {
                let events = order.confirm(order_id)?;
                let stocks = self.reserved_stocks(order).await?;
                for (reserved, stock) in order.reservations.iter().zip(stocks) {
                    let sold = stock
                        .state
                        .commit(reserved.product_id, reserved.reservation_id)?;
                    inventory_streams.push(stream_append::<Inventory>(
                        Inventory::stream_id(reserved.product_id),
                        stock.version,
                        &sold,
                    )?);
                }
                events
            }
            OrderTransition::Cancel { reason } | OrderTransition::Fail { reason } => {
                let events = if matches!(transition, OrderTransition::Cancel { .. }) {
                    order.cancel(order_id, reason)?
                } else {
                    order.fail(order_id, reason)?
                };
                let stocks = self.reserved_stocks(order).await?;
                for (reserved, stock) in order.reservations.iter().zip(stocks) {
                    // Already gone (expired, say): nothing left to give back.
                    match stock.state.release(
                        reserved.product_id,
                        reserved.reservation_id,
                        ReleaseReason::Released,
                    ) {
                        Ok(released) => inventory_streams.push(stream_append::<Inventory>(
                            Inventory::stream_id(reserved.product_id),
                            stock.version,
                            &released,
                        )?),
                        Err(DomainError::ReservationNotFound { .. }) => {}
                        Err(other) => return Err(other.into()),
                    }
                }
                events
            }
        };
        let mut streams = vec![stream_append::<Order>(order_id, loaded.version, &events)?];
        streams.extend(inventory_streams);
        Ok(PlannedTransition { events, streams })
    }

    /// The order as its stream says it is now, at `version`, or as of a time.
    pub async fn load_order(&self, order_id: Uuid) -> Result<Written<Order>, CommandError> {
        let loaded = self.repository::<Order>().load(order_id).await?;
        if loaded.state.status.is_none() {
            return Err(DomainError::NotFound {
                kind: "order",
                id: order_id,
            }
            .into());
        }
        Ok(Written::unchanged(order_id, loaded))
    }
}
