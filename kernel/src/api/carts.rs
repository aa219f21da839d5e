//! Cart queries and mutations, checkout (`placeOrder`) and the abandoned-cart
//! report.
//!
//! Carts are read from the cart store, not from a projection, so a cart
//! mutation's payload shows its change at once. Prices are the catalog's at
//! the time of the read.

use std::sync::Arc;

use async_graphql::connection::{Connection, Edge, EmptyFields};
use async_graphql::{Context, Enum, InputObject, Object, SimpleObject};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::access::{self, AdminOnly, command_context};
use super::commerce::{Money, Order, projector, read_your_writes, refused, version_argument};
use super::error::UserError;
use super::{ApiError, ErrorCode, page_size};
use crate::carts::{AbandonedCart as AbandonedCartRecord, AbandonedCursor, CartActivityLog};
use crate::commerce::{CartItem, Carts, CheckoutInput, CommandError, NewCart, PricedCart};
use crate::domain::DomainError;
use crate::domain::cart::{CartOwner, PricedLine, QuantityMode};
use crate::domain::money::Currency;
use crate::domain::order::Address as DomainAddress;
use crate::projections::ProjectionName;

/// Longest idle time `abandonedCarts` accepts: ten years, in hours.
const MAX_ABANDONED_HOURS: f64 = 87_600.0;

fn carts<'a>(ctx: &Context<'a>) -> &'a Carts {
    ctx.data_unchecked::<Carts>()
}

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
#[graphql(remote = "crate::domain::cart::CartStatus")]
pub enum CartStatus {
    Open,
    /// Frozen while its order is being placed.
    CheckingOut,
    /// Its order exists; the cart can no longer change.
    CheckedOut,
}

/// How an item's quantity combines with the cart's line.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
#[graphql(remote = "crate::domain::cart::QuantityMode")]
pub enum CartItemMode {
    /// The line holds exactly `quantity`; 0 removes it.
    Set,
    /// `quantity` (1 or more) is added to the line.
    Add,
}

/// A cart, priced from the catalog as of this read.
pub struct Cart(PricedCart);

fn owner_ids(owner: &CartOwner) -> (Option<Uuid>, Option<&str>) {
    match owner {
        CartOwner::Customer(id) => (Some(*id), None),
        CartOwner::Session(session) => (None, Some(session)),
    }
}

#[Object]
impl Cart {
    async fn id(&self) -> Uuid {
        self.0.cart.id
    }
    /// Set for a customer's cart.
    async fn customer_id(&self) -> Option<Uuid> {
        owner_ids(&self.0.cart.owner).0
    }
    /// Set for an anonymous session's cart.
    async fn session_id(&self) -> Option<&str> {
        owner_ids(&self.0.cart.owner).1
    }
    async fn status(&self) -> CartStatus {
        self.0.cart.status.into()
    }
    /// ISO 4217 code every line is priced in; null while the cart is empty,
    /// unless one was chosen at creation.
    async fn currency(&self) -> Option<&str> {
        self.0.cart.currency.as_ref().map(Currency::code)
    }
    async fn lines(&self) -> Vec<CartLine> {
        self.0.lines.iter().map(CartLine::from).collect()
    }
    /// Sum of the lines that can be bought now.
    async fn subtotal(&self) -> Option<Money> {
        self.0.subtotal.map(Money::from)
    }
    /// Units across all lines.
    async fn item_count(&self) -> u32 {
        self.0.cart.item_count()
    }
    /// One more per change; pass it as `expectedVersion` to change only this state.
    async fn version(&self) -> u32 {
        self.0.cart.version
    }
    /// The order the cart became, once checked out.
    async fn order_id(&self) -> Option<Uuid> {
        self.0.cart.order_id
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.cart.created_at
    }
    async fn updated_at(&self) -> DateTime<Utc> {
        self.0.cart.updated_at
    }
    /// When the cart disappears unless it changes before.
    async fn expires_at(&self) -> DateTime<Utc> {
        self.0.cart.expires_at
    }
}

#[derive(SimpleObject)]
pub struct CartLine {
    pub product_id: Uuid,
    pub quantity: u32,
    pub sku: Option<String>,
    pub name: Option<String>,
    /// The catalog's price now; null when the product cannot be bought.
    pub unit_price: Option<Money>,
    pub line_total: Option<Money>,
    pub available: bool,
    /// Why the line cannot be bought now (inactive product, say).
    pub unavailable_reason: Option<String>,
}

impl From<&PricedLine> for CartLine {
    fn from(line: &PricedLine) -> Self {
        CartLine {
            product_id: line.product_id,
            quantity: line.quantity,
            sku: line.sku.clone(),
            name: line.name.clone(),
            unit_price: line.unit_price.map(Money::from),
            line_total: line.line_total.map(Money::from),
            available: line.unavailable_reason.is_none(),
            unavailable_reason: line.unavailable_reason.clone(),
        }
    }
}

#[derive(InputObject)]
pub struct CartItemInput {
    pub product_id: Uuid,
    /// 0 to 999 with SET (0 removes the line), 1 to 999 with ADD; a line
    /// never holds more than 999.
    pub quantity: i32,
    #[graphql(default_with = "CartItemMode::Set")]
    pub mode: CartItemMode,
}

impl CartItemInput {
    fn to_item(&self) -> Result<CartItem, CommandError> {
        let quantity = u32::try_from(self.quantity)
            .map_err(|_| DomainError::invalid("items.quantity", "must not be negative"))?;
        Ok(CartItem {
            product_id: self.product_id,
            quantity,
            mode: QuantityMode::from(self.mode),
        })
    }
}

fn items(inputs: &[CartItemInput]) -> Result<Vec<CartItem>, CommandError> {
    inputs.iter().map(CartItemInput::to_item).collect()
}

/// A new cart. A customer's cart is always their own: `customerId` may be
/// left out (or must be theirs) and `sessionId` is for admins, who create
/// carts for a customer or for an anonymous session (exactly one of the two).
#[derive(InputObject)]
pub struct CreateCartInput {
    pub customer_id: Option<Uuid>,
    pub session_id: Option<String>,
    /// Fixes the cart's currency; otherwise the first product added decides.
    pub currency: Option<String>,
    #[graphql(default)]
    pub items: Vec<CartItemInput>,
}

#[derive(InputObject)]
pub struct AddressInput {
    pub name: String,
    pub line1: String,
    pub line2: Option<String>,
    pub city: String,
    pub postal_code: String,
    pub region: Option<String>,
    /// ISO 3166-1 alpha-2, such as "DE".
    pub country: String,
}

impl From<AddressInput> for DomainAddress {
    fn from(input: AddressInput) -> Self {
        DomainAddress {
            name: input.name,
            line1: input.line1,
            line2: input.line2,
            city: input.city,
            postal_code: input.postal_code,
            region: input.region,
            country: input.country,
        }
    }
}

#[derive(InputObject)]
pub struct PlaceOrderInput {
    pub cart_id: Uuid,
    pub payment_method: String,
    pub shipping_address: AddressInput,
    /// Recorded on the order and handed to the payment provider. The cart
    /// itself makes checkout exactly-once: placing its order again returns
    /// the same order.
    pub idempotency_key: Option<String>,
    /// How the shop reaches the buyer about this order: for a guest, the
    /// only contact it has. Must look like `name@example.com`; the domain
    /// is lowercased. Admins find orders by it (`orders(email:)`).
    pub email: Option<String>,
}

#[derive(SimpleObject, Default)]
pub struct CartPayload {
    pub cart: Option<Cart>,
    pub errors: Vec<UserError>,
}

#[derive(SimpleObject, Default)]
pub struct PlaceOrderPayload {
    pub order: Option<Order>,
    pub cart: Option<Cart>,
    pub errors: Vec<UserError>,
}

/// A cart untouched for the hours asked for and never checked out.
#[derive(SimpleObject)]
pub struct AbandonedCart {
    pub cart_id: Uuid,
    pub customer_id: Option<Uuid>,
    pub session_id: Option<String>,
    pub line_count: u32,
    pub created_at: DateTime<Utc>,
    pub last_activity_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// Past its time to live: the cart itself is gone.
    pub expired: bool,
}

impl AbandonedCart {
    fn new(record: AbandonedCartRecord, now: DateTime<Utc>) -> Self {
        let (customer_id, session_id) = owner_ids(&record.owner);
        AbandonedCart {
            cart_id: record.cart_id,
            customer_id,
            session_id: session_id.map(str::to_string),
            line_count: record.line_count,
            created_at: record.created_at,
            last_activity_at: record.last_activity_at,
            expires_at: record.expires_at,
            expired: record.expires_at <= now,
        }
    }
}

/// Abandoned carts (oldest activity first, one page at a time) and the
/// abandonment rate. The record is filled in the background, within about
/// a second of each cart change.
#[derive(SimpleObject)]
pub struct AbandonedCartStats {
    /// Carts idle since this time and not checked out are abandoned.
    pub cutoff: DateTime<Utc>,
    /// Abandoned carts in the whole list, on every page together.
    pub total_count: u64,
    pub abandoned_count: u64,
    pub checked_out_count: u64,
    /// Carts touched since the cutoff and not checked out: undecided, so
    /// not part of the rate.
    pub active_count: u64,
    /// abandoned / (abandoned + checked out); null when both are 0.
    pub abandonment_rate: Option<f64>,
    /// The abandoned carts by how long they have been idle: under a day, a
    /// day to a week, a week to 30 days, 30 days or more.
    pub by_idle_age: Vec<IdleAgeCount>,
    /// Abandoned carts past their expiry (the cart store has let them go;
    /// only this record of them is left, until pruned).
    pub expired_count: u64,
}

/// How many abandoned carts have been idle this long.
#[derive(SimpleObject)]
pub struct IdleAgeCount {
    /// Idle at least this many hours…
    pub idle_from_hours: u32,
    /// …and less than this many; null: no upper bound.
    pub idle_under_hours: Option<u32>,
    pub count: u64,
}

/// The report's idle-age counts with their bounds, in hours.
fn idle_ages(counts: [u64; 4]) -> Vec<IdleAgeCount> {
    let hours: Vec<u32> = crate::carts::IDLE_AGE_BOUNDS
        .iter()
        .map(|bound| u32::try_from(bound.as_secs() / 3_600).unwrap_or(u32::MAX))
        .collect();
    counts
        .into_iter()
        .enumerate()
        .map(|(slot, count)| IdleAgeCount {
            idle_from_hours: slot
                .checked_sub(1)
                .and_then(|below| hours.get(below).copied())
                .unwrap_or(0),
            idle_under_hours: hours.get(slot).copied(),
            count,
        })
        .collect()
}

fn cursor_text(cart: &AbandonedCartRecord) -> String {
    format!(
        "{}_{}",
        cart.last_activity_at.timestamp_micros(),
        cart.cart_id
    )
}

fn parse_cursor(text: &str) -> Result<AbandonedCursor, ApiError> {
    let invalid = || ApiError::invalid("after", "not a cursor of this list");
    let (micros, id) = text.split_once('_').ok_or_else(invalid)?;
    Ok(AbandonedCursor {
        last_activity_at: micros
            .parse::<i64>()
            .ok()
            .and_then(DateTime::from_timestamp_micros)
            .ok_or_else(invalid)?,
        cart_id: Uuid::parse_str(id).map_err(|_| invalid())?,
    })
}

/// Prices a cart for a payload; a refusal of the pricing itself is an error.
async fn priced(ctx: &Context<'_>, cart: crate::domain::cart::Cart) -> Result<Cart, ApiError> {
    match carts(ctx).price(cart).await {
        Ok(priced) => Ok(Cart(priced)),
        Err(error) => Err(super::error::command_failure(error)),
    }
}

/// The payload of the cart mutation `operation`, which is counted in the
/// metrics when it succeeded.
async fn cart_payload(
    ctx: &Context<'_>,
    operation: &'static str,
    outcome: Result<crate::domain::cart::Cart, Vec<UserError>>,
) -> Result<CartPayload, ApiError> {
    match outcome {
        Ok(cart) => {
            count_cart_operation(ctx, operation);
            Ok(CartPayload {
                cart: Some(priced(ctx, cart).await?),
                errors: Vec::new(),
            })
        }
        Err(errors) => Ok(CartPayload { cart: None, errors }),
    }
}

/// Runs the cart command `command` builds, once the caller is known to own
/// the cart; a stranger's cart is refused like a missing one, before its
/// arguments are even looked at.
async fn change_own_cart<F>(
    ctx: &Context<'_>,
    operation: &'static str,
    cart_id: Uuid,
    command: impl FnOnce() -> Result<F, ApiError>,
) -> Result<CartPayload, ApiError>
where
    F: std::future::Future<Output = Result<crate::domain::cart::Cart, CommandError>>,
{
    if let Some(refusal) = access::cart_refusal(ctx, cart_id).await? {
        return Ok(CartPayload {
            cart: None,
            errors: vec![refusal],
        });
    }
    cart_payload(ctx, operation, refused(command()?).await?).await
}

fn count_cart_operation(ctx: &Context<'_>, operation: &'static str) {
    if let Some(metrics) = ctx.data_opt::<std::sync::Arc<crate::metrics::Metrics>>() {
        metrics.count_cart_operation(operation);
    }
}

#[derive(Default)]
pub struct CartQuery;

#[Object]
impl CartQuery {
    /// A cart; null when it does not exist, has expired, or is another
    /// customer's.
    async fn cart(&self, ctx: &Context<'_>, id: Uuid) -> Result<Option<Cart>, ApiError> {
        let found = carts(ctx)
            .cart(id)
            .await
            .map_err(super::error::command_failure)?;
        match found {
            Some(cart) if access::may_access(ctx, cart.owner.order_customer_id())? => {
                Ok(Some(priced(ctx, cart).await?))
            }
            _ => Ok(None),
        }
    }

    /// Carts untouched for `hours` (fractions allowed) and never checked
    /// out, expired ones included, oldest activity first, with the
    /// abandonment rate. For admins.
    #[graphql(
        guard = "AdminOnly",
        complexity = "super::page_cost(first, child_complexity)"
    )]
    async fn abandoned_carts(
        &self,
        ctx: &Context<'_>,
        hours: f64,
        #[graphql(desc = "Page size (default 50, at most the server's maximum page size).")]
        first: Option<i32>,
        #[graphql(desc = "Cursor of the last cart already seen.")] after: Option<String>,
    ) -> Result<Connection<String, AbandonedCart, AbandonedCartStats, EmptyFields>, ApiError> {
        if !(hours > 0.0 && hours <= MAX_ABANDONED_HOURS) {
            return Err(ApiError::invalid(
                "hours",
                format!("must be more than 0 and at most {MAX_ABANDONED_HOURS}"),
            ));
        }
        let first = page_size(ctx, first)?;
        let after_cart = after.as_deref().map(parse_cursor).transpose()?;
        let now = Utc::now();
        let idle = chrono::Duration::milliseconds((hours * 3_600_000.0) as i64);
        let cutoff = now - idle;
        // One more than asked for tells whether another page follows.
        let mut report = ctx
            .data_unchecked::<Arc<dyn CartActivityLog>>()
            .abandoned(now, cutoff, after_cart, first + 1)
            .await?;
        let has_next = report.carts.len() > first as usize;
        report.carts.truncate(first as usize);
        let stats = AbandonedCartStats {
            cutoff,
            total_count: report.abandoned,
            abandoned_count: report.abandoned,
            checked_out_count: report.checked_out,
            active_count: report.active,
            abandonment_rate: report.abandonment_rate(),
            by_idle_age: idle_ages(report.by_idle_age),
            expired_count: report.expired,
        };
        let mut connection = Connection::with_additional_fields(after.is_some(), has_next, stats);
        connection.edges.extend(
            report
                .carts
                .into_iter()
                .map(|cart| Edge::new(cursor_text(&cart), AbandonedCart::new(cart, now))),
        );
        Ok(connection)
    }
}

#[derive(Default)]
pub struct CartMutation;

#[Object]
impl CartMutation {
    /// Creates a cart for a customer or an anonymous session, optionally with items.
    async fn create_cart(
        &self,
        ctx: &Context<'_>,
        input: CreateCartInput,
    ) -> Result<CartPayload, ApiError> {
        let principal = access::principal(ctx)?;
        let customer_id = match principal.customer_id() {
            None => input.customer_id,
            // A customer's cart is theirs, whatever the input says otherwise.
            Some(me) => {
                let refusal = if input.session_id.is_some() {
                    Some((
                        "sessionId",
                        "a customer's cart belongs to the customer; leave sessionId out",
                    ))
                } else if input.customer_id.is_some_and(|named| named != me) {
                    Some(("customerId", "a customer creates carts for themselves only"))
                } else {
                    None
                };
                if let Some((field, message)) = refusal {
                    return Ok(CartPayload {
                        cart: None,
                        errors: vec![UserError::new(
                            ErrorCode::InvalidInput,
                            Some(field),
                            message,
                        )],
                    });
                }
                Some(me)
            }
        };
        let command = async {
            let owner = match (customer_id, input.session_id.as_deref()) {
                (Some(customer), None) => CartOwner::Customer(customer),
                (None, Some(session)) => CartOwner::session(session)?,
                _ => {
                    return Err(DomainError::invalid(
                        "customerId",
                        "give exactly one of customerId and sessionId",
                    )
                    .into());
                }
            };
            let currency = input.currency.as_deref().map(Currency::parse).transpose()?;
            let new = NewCart {
                owner,
                currency,
                items: items(&input.items)?,
            };
            carts(ctx).create_cart(new).await
        };
        cart_payload(ctx, "createCart", refused(command).await?).await
    }

    /// Sets (SET, the default) or adds to (ADD) the quantities of several
    /// lines at once: all of them or, with an error, none.
    async fn upsert_cart_items(
        &self,
        ctx: &Context<'_>,
        cart_id: Uuid,
        items: Vec<CartItemInput>,
        #[graphql(desc = "Refuse with VERSION_CONFLICT unless the cart is at this version.")]
        expected_version: Option<i32>,
    ) -> Result<CartPayload, ApiError> {
        change_own_cart(ctx, "upsertCartItems", cart_id, || {
            let expected = version_argument("expectedVersion", expected_version)?;
            Ok(async move {
                let items = self::items(&items)?;
                carts(ctx).change_items(cart_id, &items, expected).await
            })
        })
        .await
    }

    async fn remove_cart_item(
        &self,
        ctx: &Context<'_>,
        cart_id: Uuid,
        product_id: Uuid,
        expected_version: Option<i32>,
    ) -> Result<CartPayload, ApiError> {
        change_own_cart(ctx, "removeCartItem", cart_id, || {
            let expected = version_argument("expectedVersion", expected_version)?;
            Ok(carts(ctx).remove_item(cart_id, product_id, expected))
        })
        .await
    }

    async fn clear_cart(
        &self,
        ctx: &Context<'_>,
        cart_id: Uuid,
        expected_version: Option<i32>,
    ) -> Result<CartPayload, ApiError> {
        change_own_cart(ctx, "clearCart", cart_id, || {
            let expected = version_argument("expectedVersion", expected_version)?;
            Ok(carts(ctx).clear(cart_id, expected))
        })
        .await
    }

    /// Turns the cart into an order (PENDING), exactly once: placing it again,
    /// even concurrently, returns the same order. The cart is then CHECKED_OUT
    /// and cannot change. Starts the order's fulfilment saga and returns at
    /// once; follow it with `order(id) { status saga { ... } }`.
    async fn place_order(
        &self,
        ctx: &Context<'_>,
        input: PlaceOrderInput,
    ) -> Result<PlaceOrderPayload, ApiError> {
        if let Some(refusal) = access::cart_refusal(ctx, input.cart_id).await? {
            return Ok(PlaceOrderPayload {
                errors: vec![refusal],
                ..PlaceOrderPayload::default()
            });
        }
        let checkout = CheckoutInput {
            cart_id: input.cart_id,
            payment_method: input.payment_method,
            shipping_address: input.shipping_address.into(),
            idempotency_key: input.idempotency_key,
            email: input.email,
        };
        let context = command_context(ctx)?;
        let done = match refused(carts(ctx).checkout(&checkout, &context)).await? {
            Ok(done) => done,
            Err(errors) => {
                return Ok(PlaceOrderPayload {
                    errors,
                    ..PlaceOrderPayload::default()
                });
            }
        };
        // The saga runs in the background; this returns at once. Starting it
        // is idempotent, so a repeated placeOrder also heals an order whose
        // saga a crash kept from starting.
        if let Err(error) = super::sagas::sagas(ctx)
            .start_for_order(done.order.id, &context)
            .await
        {
            return Err(super::error::command_failure(error));
        }
        count_cart_operation(ctx, "placeOrder");
        let lag = read_your_writes(ctx, &[ProjectionName::Orders], done.order.position).await?;
        Ok(PlaceOrderPayload {
            order: projector(ctx)
                .views()
                .order(done.order.id)
                .await?
                .map(Order),
            cart: Some(priced(ctx, done.cart).await?),
            errors: lag.into_iter().collect(),
        })
    }
}
