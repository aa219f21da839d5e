//! Catalog, inventory and order queries and mutations.
//!
//! Queries read the projections (`crate::projections`), never the event
//! store; the exceptions are an order's event history and an order "as of" a
//! past version or time, which are the log by definition. Mutations run a
//! command, then wait (bounded by [`READ_YOUR_WRITES_TIMEOUT`]) until the
//! projections have applied it, so the payload and any query that follows
//! show the change.

use std::time::Duration;

use async_graphql::connection::{Connection, Edge};
use async_graphql::{Context, Enum, InputObject, Object, SimpleObject};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use uuid::Uuid;

use super::access::{self, AdminOnly, command_context};
use super::error::{UserError, user_error};
use super::{ApiError, ErrorCode, Event, Page, TotalCount, page_size};
use crate::commerce::{CommandError, Commerce, NewProduct};
use crate::domain::Aggregate;
use crate::domain::catalog::ProductUpdate;
use crate::domain::money::{Currency, Money as DomainMoney};
use crate::domain::order::Order as OrderAggregate;
use crate::event_store::repository::{AggregateRepository, decode};
use crate::event_store::{Position, RecordedEvent, StreamSelection};
use crate::projections::{
    InventoryView, OrderFilter, OrderView, ProductView, ProjectionName, Projector, ReservationView,
};

/// Longest a mutation waits for the read models to show its change.
pub const READ_YOUR_WRITES_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest `rebuildProjections` waits for a rebuild to swap before returning
/// (it goes on in the background after that). Below the default request
/// timeout (`COMMERCE_REQUEST_TIMEOUT_SECS`, 30 s), so that the admin reads
/// "still being rebuilt" instead of a bare 408; a request timeout set below
/// it answers 408 first (the rebuilds go on all the same).
pub const REBUILD_TIMEOUT: Duration = Duration::from_secs(20);

pub(super) fn commerce<'a>(ctx: &Context<'a>) -> &'a Commerce {
    ctx.data_unchecked::<Commerce>()
}

pub(super) fn projector<'a>(ctx: &Context<'a>) -> &'a Projector {
    ctx.data_unchecked::<Projector>()
}

pub(super) fn version_argument(field: &str, version: Option<i32>) -> Result<Option<u32>, ApiError> {
    version
        .map(|v| u32::try_from(v).map_err(|_| ApiError::invalid(field, "must not be negative")))
        .transpose()
}

/// Waits until `projections` show `position`; the lag error when they don't.
pub(super) async fn read_your_writes(
    ctx: &Context<'_>,
    projections: &[ProjectionName],
    position: Option<Position>,
) -> Result<Option<UserError>, ApiError> {
    let Some(position) = position else {
        return Ok(None);
    };
    if projector(ctx)
        .wait_for(projections, position, READ_YOUR_WRITES_TIMEOUT)
        .await?
    {
        Ok(None)
    } else {
        Ok(Some(UserError::new(
            ErrorCode::ReadModelLagging,
            None,
            "saved, but the read model has not caught up yet; read again shortly",
        )))
    }
}

/// An amount of money. `amount` is a decimal string such as "19.99".
#[derive(SimpleObject)]
pub struct Money {
    pub amount: Decimal,
    /// ISO 4217 code.
    pub currency: String,
}

impl From<DomainMoney> for Money {
    /// Shown with the currency's minor units: "24.90" EUR, "300" JPY.
    fn from(money: DomainMoney) -> Self {
        let mut amount = money.amount();
        // Money never has more decimals than its currency, so this only pads.
        amount.rescale(money.currency().minor_units());
        Money {
            amount,
            currency: money.currency().code().to_string(),
        }
    }
}

#[derive(InputObject)]
pub struct MoneyInput {
    /// A decimal string; no more decimals than the currency has (2 for EUR).
    pub amount: Decimal,
    /// ISO 4217 code, upper case.
    pub currency: String,
}

impl MoneyInput {
    fn to_money(&self) -> Result<DomainMoney, CommandError> {
        let currency = Currency::parse(&self.currency)?;
        Ok(DomainMoney::new(self.amount, currency)?)
    }
}

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
#[graphql(remote = "crate::domain::order::OrderStatus")]
pub enum OrderStatus {
    Pending,
    InventoryReserved,
    Paid,
    Shipped,
    Confirmed,
    Cancelled,
    Failed,
}

pub struct Product(ProductView);

#[Object]
impl Product {
    async fn id(&self) -> Uuid {
        self.0.product_id
    }
    async fn sku(&self) -> &str {
        &self.0.sku
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    /// The catalog price: the only price orders are charged.
    async fn price(&self) -> Money {
        self.0.price.into()
    }
    async fn active(&self) -> bool {
        self.0.active
    }
    /// The product stream's version, for `updateProduct(expectedVersion)`.
    async fn version(&self) -> u32 {
        self.0.version
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    async fn updated_at(&self) -> DateTime<Utc> {
        self.0.updated_at
    }
    /// Stock of this product (`null` before its first stock adjustment).
    /// Read in one batch for a whole page of products.
    async fn inventory(&self, ctx: &Context<'_>) -> Result<Option<Inventory>, ApiError> {
        Ok(super::loaders::inventory(ctx, self.0.product_id)
            .await?
            .map(Inventory))
    }
}

pub struct Inventory(InventoryView);

#[Object]
impl Inventory {
    async fn product_id(&self) -> Uuid {
        self.0.product_id
    }
    async fn on_hand(&self) -> u32 {
        self.0.on_hand
    }
    async fn reserved(&self) -> u32 {
        self.0.reserved
    }
    /// On hand minus reserved: what can still be reserved.
    async fn available(&self) -> u32 {
        self.0.available()
    }
    /// The inventory stream's version, for `expectedVersion` arguments.
    async fn version(&self) -> u32 {
        self.0.version
    }
    async fn updated_at(&self) -> DateTime<Utc> {
        self.0.updated_at
    }
}

#[derive(SimpleObject)]
pub struct Reservation {
    pub id: Uuid,
    pub product_id: Uuid,
    pub owner: String,
    pub quantity: u32,
    pub expires_at: Option<DateTime<Utc>>,
}

impl From<ReservationView> for Reservation {
    fn from(view: ReservationView) -> Self {
        Reservation {
            id: view.reservation_id,
            product_id: view.product_id,
            owner: view.owner,
            quantity: view.quantity,
            expires_at: view.expires_at,
        }
    }
}

#[derive(SimpleObject)]
pub struct OrderLine {
    pub product_id: Uuid,
    pub sku: String,
    pub name: String,
    pub quantity: u32,
    /// Catalog price when the order was placed.
    pub unit_price: Money,
    pub line_total: Money,
}

#[derive(SimpleObject)]
pub struct Address {
    pub name: String,
    pub line1: String,
    pub line2: Option<String>,
    pub city: String,
    pub postal_code: String,
    pub region: Option<String>,
    /// ISO 3166-1 alpha-2.
    pub country: String,
}

pub struct Order(pub(super) OrderView);

#[Object]
impl Order {
    async fn id(&self) -> Uuid {
        self.0.order_id
    }
    async fn customer_id(&self) -> Uuid {
        self.0.customer_id
    }
    async fn status(&self) -> OrderStatus {
        self.0.status.into()
    }
    /// Why the order was cancelled or failed, in words fit for its
    /// customer (the saga's `reason` has the details, for admins).
    async fn reason(&self) -> Option<String> {
        self.0
            .reason
            .as_deref()
            .map(super::customer_view::reason_text)
    }
    async fn total(&self) -> Money {
        self.0.total.into()
    }
    async fn lines(&self) -> Vec<OrderLine> {
        self.0
            .lines
            .iter()
            .map(|line| OrderLine {
                product_id: line.product_id,
                sku: line.sku.clone(),
                name: line.name.clone(),
                quantity: line.quantity,
                unit_price: line.unit_price.into(),
                line_total: line.line_total.into(),
            })
            .collect()
    }
    async fn shipping_address(&self) -> Address {
        let a = &self.0.shipping_address;
        Address {
            name: a.name.clone(),
            line1: a.line1.clone(),
            line2: a.line2.clone(),
            city: a.city.clone(),
            postal_code: a.postal_code.clone(),
            region: a.region.clone(),
            country: a.country.clone(),
        }
    }
    async fn payment_method(&self) -> &str {
        &self.0.payment_method
    }
    /// The email given at checkout (domain lowercased), if any.
    async fn email(&self) -> Option<&str> {
        self.0.email.as_deref()
    }
    /// The order stream's version.
    async fn version(&self) -> u32 {
        self.0.version
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    async fn updated_at(&self) -> DateTime<Utc> {
        self.0.updated_at
    }
    /// The saga fulfilling the order, step by step; null for an order
    /// placed without one. Read in one batch for a whole page of orders.
    async fn saga(&self, ctx: &Context<'_>) -> Result<Option<super::sagas::Saga>, ApiError> {
        use crate::domain::saga::{ORDER_FULFILMENT, Saga as SagaRecord};
        let saga_id = SagaRecord::id_for(ORDER_FULFILMENT, self.0.order_id);
        let events = super::loaders::stream(ctx, saga_id).await?;
        let loaded = AggregateRepository::<SagaRecord>::fold(saga_id, &events)?;
        Ok(loaded
            .state
            .status
            .is_some()
            .then(|| super::sagas::Saga::new(saga_id, loaded)))
    }
    /// Every event of this order, in order, up to the version shown. Read in
    /// one batch for a whole page of orders; counted against the complexity
    /// limit as ten events.
    #[graphql(complexity = "ORDER_EVENTS_COST * child_complexity")]
    async fn events(&self, ctx: &Context<'_>) -> Result<Vec<Event>, ApiError> {
        let events = super::loaders::stream(ctx, self.0.order_id).await?;
        Ok(events
            .iter()
            .filter(|event| event.version <= self.0.version)
            .cloned()
            .map(Event)
            .collect())
    }
}

/// What an order's event list counts against the complexity limit: an order
/// of a few lines has about this many events.
const ORDER_EVENTS_COST: usize = 10;

/// An order rebuilt from its events (for "as of" reads), shaped like its view.
fn order_from_history(
    order_id: Uuid,
    events: &[RecordedEvent],
) -> Result<Option<OrderView>, ApiError> {
    let (Some(first), Some(last)) = (events.first(), events.last()) else {
        return Ok(None);
    };
    let mut order = OrderAggregate::default();
    for event in events {
        order.apply(&decode(event)?);
    }
    let (Some(placed), Some(status)) = (order.placed, order.status) else {
        return Ok(None);
    };
    Ok(Some(OrderView {
        order_id,
        customer_id: placed.customer_id,
        status,
        total: placed.total,
        reason: order.reason,
        lines: placed.lines,
        shipping_address: placed.shipping_address,
        payment_method: placed.payment_method,
        email: placed.email,
        version: last.version,
        created_at: first.created_at,
        updated_at: last.created_at,
    }))
}

#[derive(SimpleObject)]
pub struct ProjectionStatus {
    pub name: String,
    /// Cursor (log position) of the last event applied.
    pub checkpoint: String,
    /// Cursor of the newest readable event of the whole log.
    pub head: String,
    /// Events of this projection's type not applied yet (capped at 500).
    pub pending_events: u32,
}

async fn projection_statuses(ctx: &Context<'_>) -> Result<Vec<ProjectionStatus>, ApiError> {
    Ok(projector(ctx)
        .lag()
        .await?
        .into_iter()
        .map(|lag| ProjectionStatus {
            name: lag.projection.as_str().to_string(),
            checkpoint: lag.checkpoint.to_string(),
            head: lag.head.to_string(),
            pending_events: lag.pending_events,
        })
        .collect())
}

#[derive(Default)]
pub struct CommerceQuery;

#[Object]
impl CommerceQuery {
    async fn product(&self, ctx: &Context<'_>, id: Uuid) -> Result<Option<Product>, ApiError> {
        Ok(projector(ctx).views().product(id).await?.map(Product))
    }

    /// Products in creation order: for admins all of them, for everyone else
    /// (customers, guests, no token) those on sale. `product(id)` still
    /// answers for a product taken off sale, with `active: false`, so old
    /// links and order histories keep working.
    #[graphql(complexity = "super::page_cost(first, child_complexity)")]
    async fn products(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Page size (default 50, at most the server's maximum page size).")]
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Page<Product>, ApiError> {
        let first = page_size(ctx, first)?;
        let after_id = cursor_id("after", after.as_deref())?;
        // An anonymous request has no principal: not an admin either.
        let active_only = !access::principal(ctx).is_ok_and(|principal| principal.is_admin());
        let mut page = projector(ctx)
            .views()
            .products(after_id, first + 1, active_only)
            .await?;
        let has_next = page.len() > first as usize;
        page.truncate(first as usize);
        let views = projector(ctx).views().clone();
        let total = TotalCount::new(move || {
            let views = views.clone();
            Box::pin(async move { views.count_products(active_only).await })
        });
        let mut connection = Connection::with_additional_fields(after.is_some(), has_next, total);
        connection.edges.extend(
            page.into_iter()
                .map(|p| Edge::new(p.product_id.to_string(), Product(p))),
        );
        Ok(connection)
    }

    async fn inventory(
        &self,
        ctx: &Context<'_>,
        product_id: Uuid,
    ) -> Result<Option<Inventory>, ApiError> {
        Ok(projector(ctx)
            .views()
            .inventory(product_id)
            .await?
            .map(Inventory))
    }

    /// A stock reservation. For admins.
    #[graphql(guard = "AdminOnly")]
    async fn reservation(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
    ) -> Result<Option<Reservation>, ApiError> {
        Ok(projector(ctx)
            .views()
            .reservation(id)
            .await?
            .map(Into::into))
    }

    /// An order as it is now (from the read model), or as it was at
    /// `asOfVersion` or at time `asOf` (rebuilt from its events). Null when
    /// there is none, or when it is another customer's.
    async fn order(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
        as_of_version: Option<i32>,
        as_of: Option<DateTime<Utc>>,
    ) -> Result<Option<Order>, ApiError> {
        let order = self.order_as_of(ctx, id, as_of_version, as_of).await?;
        match order {
            Some(view) if access::may_access(ctx, view.customer_id)? => Ok(Some(Order(view))),
            _ => Ok(None),
        }
    }

    /// Orders, newest first, optionally of one status. A customer sees their
    /// own orders only; an admin sees everyone's, or one customer's with
    /// `customerId`.
    #[graphql(complexity = "super::page_cost(first, child_complexity)")]
    async fn orders(
        &self,
        ctx: &Context<'_>,
        status: Option<OrderStatus>,
        #[graphql(desc = "For admins: only this customer's orders.")] customer_id: Option<Uuid>,
        #[graphql(
            desc = "Only orders whose checkout email is this one, in any letter case (a customer's own orders only, as always)."
        )]
        email: Option<String>,
        #[graphql(desc = "Page size (default 50, at most the server's maximum page size).")]
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Page<Order>, ApiError> {
        let first = page_size(ctx, first)?;
        let before = cursor_id("after", after.as_deref())?;
        let principal = access::principal(ctx)?;
        if email.as_ref().is_some_and(|e| e.len() > 1024) {
            return Err(ApiError::invalid("email", "at most 1024 bytes"));
        }
        let filter = OrderFilter {
            email,
            status: status.map(Into::into),
            customer_id: if principal.is_admin() {
                customer_id
            } else {
                // A customer asking for someone else's orders gets their own:
                // the same answer as for a customer without orders.
                principal.customer_id()
            },
        };
        if !principal.is_admin() && filter.customer_id.is_none() {
            return Err(ApiError::Forbidden);
        }
        let views = projector(ctx).views().clone();
        let mut page = views.orders(&filter, before, first + 1).await?;
        let has_next = page.len() > first as usize;
        page.truncate(first as usize);
        let total = TotalCount::new(move || {
            let views = views.clone();
            let filter = filter.clone();
            Box::pin(async move { views.count_orders(&filter).await })
        });
        let mut connection = Connection::with_additional_fields(after.is_some(), has_next, total);
        connection.edges.extend(
            page.into_iter()
                .map(|o| Edge::new(o.order_id.to_string(), Order(o))),
        );
        Ok(connection)
    }

    /// Each read model's position against the head of the log. For admins.
    #[graphql(guard = "AdminOnly")]
    async fn projections(&self, ctx: &Context<'_>) -> Result<Vec<ProjectionStatus>, ApiError> {
        projection_statuses(ctx).await
    }
}

impl CommerceQuery {
    /// The order's view now, or rebuilt from its events as of a version or time.
    async fn order_as_of(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
        as_of_version: Option<i32>,
        as_of: Option<DateTime<Utc>>,
    ) -> Result<Option<OrderView>, ApiError> {
        let to_version = version_argument("asOfVersion", as_of_version)?;
        if to_version.is_none() && as_of.is_none() {
            return Ok(projector(ctx).views().order(id).await?);
        }
        let events = commerce(ctx)
            .store()
            .read_stream(
                id,
                StreamSelection {
                    to_version,
                    until: as_of,
                    ..StreamSelection::default()
                },
            )
            .await?;
        if events
            .iter()
            .any(|e| e.aggregate_type != OrderAggregate::AGGREGATE_TYPE)
        {
            return Ok(None);
        }
        order_from_history(id, &events)
    }
}

fn cursor_id(field: &str, cursor: Option<&str>) -> Result<Option<Uuid>, ApiError> {
    cursor
        .map(|c| {
            Uuid::parse_str(c).map_err(|_| ApiError::invalid(field, "not a cursor of this list"))
        })
        .transpose()
}

#[derive(InputObject)]
pub struct CreateProductInput {
    pub sku: String,
    pub name: String,
    pub price: MoneyInput,
    #[graphql(default = true)]
    pub active: bool,
}

#[derive(InputObject)]
pub struct UpdateProductInput {
    pub id: Uuid,
    pub name: Option<String>,
    pub price: Option<MoneyInput>,
    pub active: Option<bool>,
    /// Compare-and-swap: refuse with VERSION_CONFLICT unless the product is at this version.
    pub expected_version: Option<i32>,
}

#[derive(InputObject)]
pub struct AdjustInventoryInput {
    pub product_id: Uuid,
    /// Units added (restock) or removed (write-off).
    pub delta: i64,
    pub reason: String,
    pub expected_version: Option<i32>,
}

#[derive(SimpleObject, Default)]
pub struct ProductPayload {
    pub product: Option<Product>,
    pub errors: Vec<UserError>,
}

#[derive(SimpleObject, Default)]
pub struct InventoryPayload {
    pub inventory: Option<Inventory>,
    pub reservation: Option<Reservation>,
    pub errors: Vec<UserError>,
}

#[derive(SimpleObject, Default)]
pub struct OrderPayload {
    pub order: Option<Order>,
    /// The order's saga, when the mutation went through it.
    pub saga: Option<super::sagas::Saga>,
    pub errors: Vec<UserError>,
}

#[derive(SimpleObject, Default)]
pub struct RebuildProjectionsPayload {
    pub projections: Vec<ProjectionStatus>,
    pub errors: Vec<UserError>,
}

/// Runs `command`; a refusal becomes the payload's error list.
pub(super) async fn refused<T>(
    command: impl std::future::Future<Output = Result<T, CommandError>>,
) -> Result<Result<T, Vec<UserError>>, ApiError> {
    match command.await {
        Ok(value) => Ok(Ok(value)),
        Err(error) => Ok(Err(vec![user_error(error)?])),
    }
}

async fn product_payload(
    ctx: &Context<'_>,
    product_id: Uuid,
    position: Option<Position>,
) -> Result<ProductPayload, ApiError> {
    let lag = read_your_writes(ctx, &[ProjectionName::Products], position).await?;
    Ok(ProductPayload {
        product: projector(ctx)
            .views()
            .product(product_id)
            .await?
            .map(Product),
        errors: lag.into_iter().collect(),
    })
}

async fn inventory_payload(
    ctx: &Context<'_>,
    product_id: Uuid,
    reservation_id: Option<Uuid>,
    position: Option<Position>,
) -> Result<InventoryPayload, ApiError> {
    let lag = read_your_writes(ctx, &[ProjectionName::Inventory], position).await?;
    let views = projector(ctx).views();
    let reservation = match reservation_id {
        Some(id) => views.reservation(id).await?.map(Into::into),
        None => None,
    };
    Ok(InventoryPayload {
        inventory: views.inventory(product_id).await?.map(Inventory),
        reservation,
        errors: lag.into_iter().collect(),
    })
}

#[derive(Default)]
pub struct CommerceMutation;

#[Object]
impl CommerceMutation {
    /// Creates a product. SKUs are unique regardless of case (DUPLICATE_SKU). For admins.
    #[graphql(guard = "AdminOnly")]
    async fn create_product(
        &self,
        ctx: &Context<'_>,
        input: CreateProductInput,
    ) -> Result<ProductPayload, ApiError> {
        let context = command_context(ctx)?;
        let command = async {
            let product = NewProduct {
                sku: input.sku,
                name: input.name,
                price: input.price.to_money()?,
                active: input.active,
            };
            commerce(ctx).create_product(product, &context).await
        };
        match refused(command).await? {
            Ok(created) => product_payload(ctx, created.id, created.position).await,
            Err(errors) => Ok(ProductPayload {
                product: None,
                errors,
            }),
        }
    }

    /// Renames, reprices or (de)activates a product. Every price change is
    /// kept in the product's event history. For admins.
    #[graphql(guard = "AdminOnly")]
    async fn update_product(
        &self,
        ctx: &Context<'_>,
        input: UpdateProductInput,
    ) -> Result<ProductPayload, ApiError> {
        let expected = version_argument("expectedVersion", input.expected_version)?;
        let context = command_context(ctx)?;
        let command = async {
            let update = ProductUpdate {
                name: input.name,
                price: input.price.as_ref().map(MoneyInput::to_money).transpose()?,
                active: input.active,
            };
            commerce(ctx)
                .update_product(input.id, update, expected, &context)
                .await
        };
        match refused(command).await? {
            Ok(updated) => product_payload(ctx, updated.id, updated.position).await,
            Err(errors) => Ok(ProductPayload {
                product: None,
                errors,
            }),
        }
    }

    /// Restocks (positive delta) or writes off (negative delta) stock. For admins.
    #[graphql(guard = "AdminOnly")]
    async fn adjust_inventory(
        &self,
        ctx: &Context<'_>,
        input: AdjustInventoryInput,
    ) -> Result<InventoryPayload, ApiError> {
        let expected = version_argument("expectedVersion", input.expected_version)?;
        let context = command_context(ctx)?;
        let command = commerce(ctx).adjust_inventory(
            input.product_id,
            input.delta,
            &input.reason,
            expected,
            &context,
        );
        match refused(command).await? {
            Ok(change) => inventory_payload(ctx, input.product_id, None, change.position).await,
            Err(errors) => Ok(InventoryPayload {
                errors,
                ..InventoryPayload::default()
            }),
        }
    }

    /// Holds stock for an owner (an order, a cart). Repeating it with the same
    /// owner returns the same reservation. With `ttlSeconds`, the kernel
    /// releases the reservation when it expires. For admins.
    #[graphql(guard = "AdminOnly")]
    async fn reserve_inventory(
        &self,
        ctx: &Context<'_>,
        product_id: Uuid,
        quantity: i32,
        #[graphql(desc = "Who holds the stock, e.g. \"cart:<id>\"; a fresh owner when omitted.")]
        owner: Option<String>,
        expected_version: Option<i32>,
        ttl_seconds: Option<i32>,
    ) -> Result<InventoryPayload, ApiError> {
        let expected = version_argument("expectedVersion", expected_version)?;
        let quantity = u32::try_from(quantity)
            .map_err(|_| ApiError::invalid("quantity", "must be positive"))?;
        let ttl = ttl_seconds.map(|s| chrono::Duration::seconds(i64::from(s)));
        let owner = owner.unwrap_or_else(|| format!("api:{}", Uuid::now_v7()));
        let context = command_context(ctx)?;
        let command =
            commerce(ctx).reserve_inventory(product_id, &owner, quantity, ttl, expected, &context);
        match refused(command).await? {
            Ok(made) => {
                inventory_payload(
                    ctx,
                    product_id,
                    Some(made.reservation_id),
                    made.inventory.position,
                )
                .await
            }
            Err(errors) => Ok(InventoryPayload {
                errors,
                ..InventoryPayload::default()
            }),
        }
    }

    /// Gives a reservation's stock back. For admins.
    #[graphql(guard = "AdminOnly")]
    async fn release_inventory(
        &self,
        ctx: &Context<'_>,
        reservation_id: Uuid,
    ) -> Result<InventoryPayload, ApiError> {
        let context = command_context(ctx)?;
        let command = commerce(ctx).release_reservation(reservation_id, &context);
        match refused(command).await? {
            // The command reports the reservation's product as its id.
            Ok(change) => inventory_payload(ctx, change.id, None, change.position).await,
            Err(errors) => Ok(InventoryPayload {
                errors,
                ..InventoryPayload::default()
            }),
        }
    }

    /// Cancels an order. An order with a saga is cancelled by its saga,
    /// which first undoes what it did (cancels the shipment, refunds the
    /// payment) and then cancels the order and releases its stock: the
    /// payload shows the order as it is now and the saga compensating. An
    /// order whose saga has not started yet gets it now, asked to cancel
    /// before any step. A confirmed, failed or cancelled order is refused
    /// (ILLEGAL_TRANSITION).
    async fn cancel_order(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
        reason: String,
    ) -> Result<OrderPayload, ApiError> {
        if let Some(refusal) = access::order_refusal(ctx, id).await? {
            return Ok(OrderPayload {
                errors: vec![refusal],
                ..OrderPayload::default()
            });
        }
        let context = command_context(ctx)?;
        let command = super::sagas::sagas(ctx).cancel_order(id, &reason, &context);
        match refused(command).await? {
            Ok(saga) => Ok(OrderPayload {
                order: projector(ctx).views().order(id).await?.map(Order),
                saga: Some(super::sagas::Saga::new(
                    saga.id,
                    crate::event_store::repository::Loaded {
                        state: saga.state,
                        version: saga.version,
                    },
                )),
                errors: Vec::new(),
            }),
            Err(errors) => Ok(OrderPayload {
                order: None,
                saga: None,
                errors,
            }),
        }
    }

    /// Rebuilds a read model (or all, without `name`) from the event log
    /// while the service keeps running: replayed into shadow tables, then
    /// swapped in at once, so queries never see it half-built. Returns once
    /// swapped; one still replaying after the request's wait is reported
    /// and goes on in the background. For admins.
    #[graphql(guard = "AdminOnly")]
    async fn rebuild_projections(
        &self,
        ctx: &Context<'_>,
        name: Option<String>,
    ) -> Result<RebuildProjectionsPayload, ApiError> {
        let projections = match name.as_deref() {
            None => ProjectionName::ALL.to_vec(),
            Some(name) => match ProjectionName::parse(name) {
                Some(projection) => vec![projection],
                None => {
                    let known: Vec<&str> = ProjectionName::ALL.iter().map(|p| p.as_str()).collect();
                    return Ok(RebuildProjectionsPayload {
                        projections: Vec::new(),
                        errors: vec![UserError::new(
                            ErrorCode::NotFound,
                            Some("name"),
                            format!("no projection {name:?}; known: {}", known.join(", ")),
                        )],
                    });
                }
            },
        };
        // All at once, waited for together: one deadline for the request.
        let rebuilt = futures_util::future::join_all(
            projections
                .iter()
                .map(|&projection| projector(ctx).rebuild(projection, REBUILD_TIMEOUT)),
        )
        .await;
        let mut errors = Vec::new();
        for (projection, rebuilt) in projections.into_iter().zip(rebuilt) {
            if !rebuilt? {
                errors.push(UserError::new(
                    ErrorCode::ReadModelLagging,
                    Some("name"),
                    format!(
                        "{} is still being rebuilt, in the background",
                        projection.as_str()
                    ),
                ));
            }
        }
        Ok(RebuildProjectionsPayload {
            projections: projection_statuses(ctx).await?,
            errors,
        })
    }
}
