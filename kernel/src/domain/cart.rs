//! Shopping carts: lines of (product, quantity), one currency, a version, a
//! time to live, and a small state machine for checkout.
//!
//! ```text
//! OPEN ──begin──> CHECKING_OUT ──finish──> CHECKED_OUT (final, immutable)
//!   ^                  │
//!   └──────abort───────┘  (only when no order was placed)
//! ```
//!
//! A cart is not event-sourced: it is short-lived, written often and thrown
//! away, so it lives whole in a cart store (Redis or embedded, see
//! `crate::carts`) and every change here returns the next state of the whole
//! cart. The store writes it with compare-and-swap on [`Cart::version`], so
//! the rules below are the only place cart rules live. Prices are not stored:
//! they come from the catalog whenever the cart is read ([`price_lines`]).

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::money::{Currency, Money};
use super::order::{MAX_LINE_QUANTITY, MAX_LINES};
use super::{DomainError, clean_text};

/// Namespace of the ids of orders placed from carts (UUIDv5 of the cart id).
const CART_ORDER_NAMESPACE: Uuid = Uuid::from_u128(0x6f2b_1c9e_8a4d_4f57_9e21_03c4_d5a6_b7c8);
/// Namespace of guest customer ids derived from anonymous sessions.
const GUEST_CUSTOMER_NAMESPACE: Uuid = Uuid::from_u128(0x1d0e_5b7a_3c2f_4e81_a9b6_7d4c_2e1f_0a93);

/// Longest anonymous session id accepted.
pub const MAX_SESSION_ID_CHARS: usize = 128;

/// Who a cart belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum CartOwner {
    Customer(Uuid),
    /// An anonymous visitor, known by the frontend's session id.
    Session(String),
}

impl CartOwner {
    /// A session owner with its id checked and trimmed.
    pub fn session(id: &str) -> Result<CartOwner, DomainError> {
        clean_text("sessionId", id, MAX_SESSION_ID_CHARS).map(CartOwner::Session)
    }

    /// The customer an order from this cart belongs to. Anonymous sessions
    /// check out as a guest customer whose id is derived from the session, so
    /// one session's orders share one customer id.
    pub fn order_customer_id(&self) -> Uuid {
        match self {
            CartOwner::Customer(id) => *id,
            CartOwner::Session(session) => {
                Uuid::new_v5(&GUEST_CUSTOMER_NAMESPACE, session.as_bytes())
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CartStatus {
    Open,
    /// Frozen while its order is being placed.
    CheckingOut,
    /// Its order exists; the cart can no longer change.
    CheckedOut,
}

impl CartStatus {
    pub const ALL: [CartStatus; 3] = [
        CartStatus::Open,
        CartStatus::CheckingOut,
        CartStatus::CheckedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CartStatus::Open => "OPEN",
            CartStatus::CheckingOut => "CHECKING_OUT",
            CartStatus::CheckedOut => "CHECKED_OUT",
        }
    }

    pub fn parse(text: &str) -> Option<CartStatus> {
        CartStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

impl fmt::Display for CartStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Limits every cart obeys, from configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CartLimits {
    /// Most distinct products in one cart; at most [`MAX_LINES`], so every
    /// cart can become an order.
    pub max_lines: usize,
    /// How long a cart lives after its last change.
    pub ttl: Duration,
}

impl Default for CartLimits {
    fn default() -> Self {
        CartLimits {
            max_lines: MAX_LINES,
            ttl: Duration::days(7),
        }
    }
}

/// How an item's quantity combines with what the cart holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantityMode {
    /// The line holds exactly this quantity; 0 removes it.
    Set,
    /// This quantity is added to the line (1 or more).
    Add,
}

/// One requested change of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemChange {
    pub product_id: Uuid,
    pub quantity: u32,
    pub mode: QuantityMode,
    /// The currency of the product's catalog price; `None` only when the
    /// change removes the line (Set 0), which needs no price.
    pub currency: Option<Currency>,
}

impl ItemChange {
    /// Whether the change can only remove a line, so the product need not be
    /// sellable (a discontinued product can always be taken out).
    pub fn removes(&self) -> bool {
        self.mode == QuantityMode::Set && self.quantity == 0
    }
}

/// A cart as the store keeps it. Every change returns a new value with
/// `version` one higher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cart {
    pub id: Uuid,
    pub owner: CartOwner,
    /// The currency every line is priced in; `None` while empty, unless one
    /// was asked for at creation.
    pub currency: Option<Currency>,
    /// The currency asked for at creation, which the cart keeps when emptied.
    pub requested_currency: Option<Currency>,
    /// Quantity per product.
    pub lines: BTreeMap<Uuid, u32>,
    pub status: CartStatus,
    /// Set once checked out.
    pub order_id: Option<Uuid>,
    /// 1 when created, one more per change.
    pub version: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When the cart disappears unless changed before.
    pub expires_at: DateTime<Utc>,
    pub checkout_started_at: Option<DateTime<Utc>>,
}

impl Cart {
    /// A new cart holding `items` (which may be empty).
    pub fn create(
        id: Uuid,
        owner: CartOwner,
        currency: Option<Currency>,
        items: &[ItemChange],
        limits: &CartLimits,
        now: DateTime<Utc>,
    ) -> Result<Cart, DomainError> {
        let empty = Cart {
            id,
            owner,
            currency,
            requested_currency: currency,
            lines: BTreeMap::new(),
            status: CartStatus::Open,
            order_id: None,
            version: 0,
            created_at: now,
            updated_at: now,
            expires_at: now,
            checkout_started_at: None,
        };
        if items.is_empty() {
            Ok(empty.touched(limits, now))
        } else {
            empty.change_items(items, limits, now)
        }
    }

    /// Applies `items` all together, or refuses them all.
    pub fn change_items(
        &self,
        items: &[ItemChange],
        limits: &CartLimits,
        now: DateTime<Utc>,
    ) -> Result<Cart, DomainError> {
        self.require_open()?;
        if items.is_empty() {
            return Err(DomainError::invalid("items", "name at least one item"));
        }
        let mut next = self.clone();
        for (index, item) in items.iter().enumerate() {
            if items[..index]
                .iter()
                .any(|earlier| earlier.product_id == item.product_id)
            {
                return Err(DomainError::invalid(
                    "items",
                    format!("product {} is named twice", item.product_id),
                ));
            }
            let current = next.lines.get(&item.product_id).copied().unwrap_or(0);
            let quantity = match item.mode {
                QuantityMode::Set if item.quantity > MAX_LINE_QUANTITY => {
                    return Err(quantity_error(item.product_id, item.quantity));
                }
                QuantityMode::Set => item.quantity,
                QuantityMode::Add if item.quantity == 0 || item.quantity > MAX_LINE_QUANTITY => {
                    return Err(DomainError::invalid(
                        "items.quantity",
                        format!("adds 1 to {MAX_LINE_QUANTITY} units"),
                    ));
                }
                QuantityMode::Add => match current.checked_add(item.quantity) {
                    Some(total) if total <= MAX_LINE_QUANTITY => total,
                    _ => {
                        return Err(quantity_error(
                            item.product_id,
                            current.saturating_add(item.quantity),
                        ));
                    }
                },
            };
            if quantity == 0 {
                next.lines.remove(&item.product_id);
                continue;
            }
            let Some(currency) = item.currency else {
                return Err(DomainError::invalid(
                    "items",
                    format!("product {} has no price", item.product_id),
                ));
            };
            match next.currency {
                Some(expected) if expected != currency => {
                    return Err(DomainError::CurrencyMismatch {
                        expected,
                        found: currency,
                    });
                }
                _ => next.currency = Some(currency),
            }
            next.lines.insert(item.product_id, quantity);
        }
        if next.lines.len() > limits.max_lines {
            return Err(DomainError::invalid(
                "items",
                format!("a cart holds at most {} lines", limits.max_lines),
            ));
        }
        Ok(next.touched(limits, now))
    }

    /// Takes a product's line out of the cart.
    pub fn remove_line(
        &self,
        product_id: Uuid,
        limits: &CartLimits,
        now: DateTime<Utc>,
    ) -> Result<Cart, DomainError> {
        self.require_open()?;
        let mut next = self.clone();
        if next.lines.remove(&product_id).is_none() {
            return Err(DomainError::NotFound {
                kind: "cart line for product",
                id: product_id,
            });
        }
        Ok(next.touched(limits, now))
    }

    /// Removes every line.
    pub fn clear(&self, limits: &CartLimits, now: DateTime<Utc>) -> Result<Cart, DomainError> {
        self.require_open()?;
        let mut next = self.clone();
        next.lines.clear();
        Ok(next.touched(limits, now))
    }

    /// Freezes the cart while its order is placed.
    pub fn begin_checkout(
        &self,
        limits: &CartLimits,
        now: DateTime<Utc>,
    ) -> Result<Cart, DomainError> {
        self.require_open()?;
        if self.lines.is_empty() {
            return Err(DomainError::invalid("cartId", "the cart is empty"));
        }
        let mut next = self.clone();
        next.status = CartStatus::CheckingOut;
        next.checkout_started_at = Some(now);
        Ok(next.touched(limits, now))
    }

    /// Records the order the cart became; final.
    pub fn finish_checkout(
        &self,
        order_id: Uuid,
        limits: &CartLimits,
        now: DateTime<Utc>,
    ) -> Result<Cart, DomainError> {
        if self.status != CartStatus::CheckingOut {
            return Err(self.not_open());
        }
        let mut next = self.clone();
        next.status = CartStatus::CheckedOut;
        next.order_id = Some(order_id);
        Ok(next.touched(limits, now))
    }

    /// Reopens a cart whose order could not be placed.
    pub fn abort_checkout(
        &self,
        limits: &CartLimits,
        now: DateTime<Utc>,
    ) -> Result<Cart, DomainError> {
        if self.status != CartStatus::CheckingOut {
            return Err(self.not_open());
        }
        let mut next = self.clone();
        next.status = CartStatus::Open;
        next.checkout_started_at = None;
        Ok(next.touched(limits, now))
    }

    /// The id of the one order this cart can become. Deriving it from the
    /// cart makes placing it idempotent: a second attempt finds the stream
    /// already written.
    pub fn order_id(&self) -> Uuid {
        Uuid::new_v5(&CART_ORDER_NAMESPACE, self.id.as_bytes())
    }

    /// Units across all lines.
    pub fn item_count(&self) -> u32 {
        self.lines.values().sum()
    }

    /// Whether the cart has passed its time to live at `now`.
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at <= now
    }

    fn require_open(&self) -> Result<(), DomainError> {
        if self.status == CartStatus::Open {
            Ok(())
        } else {
            Err(self.not_open())
        }
    }

    fn not_open(&self) -> DomainError {
        DomainError::CartNotOpen {
            cart_id: self.id,
            status: self.status,
        }
    }

    /// Bumps the version and the clocks; an emptied cart returns to the
    /// currency it was created with.
    fn touched(mut self, limits: &CartLimits, now: DateTime<Utc>) -> Cart {
        if self.lines.is_empty() {
            self.currency = self.requested_currency;
        }
        self.version += 1;
        self.updated_at = now;
        self.expires_at = now + limits.ttl;
        self
    }
}

fn quantity_error(product_id: Uuid, quantity: u32) -> DomainError {
    DomainError::invalid(
        "items.quantity",
        format!("product {product_id}: {quantity} units; a line holds 1 to {MAX_LINE_QUANTITY}"),
    )
}

/// What the catalog says about a product in a cart at read time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogEntry {
    Sellable {
        sku: String,
        name: String,
        unit_price: Money,
    },
    /// Deactivated, deleted, or priced in another currency since it was added.
    Unavailable { reason: String },
}

/// A cart line with its price as of now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PricedLine {
    pub product_id: Uuid,
    pub quantity: u32,
    pub sku: Option<String>,
    pub name: Option<String>,
    pub unit_price: Option<Money>,
    pub line_total: Option<Money>,
    /// Why the line cannot be bought now; `None` when it can.
    pub unavailable_reason: Option<String>,
}

/// Prices every line of `cart` from `catalog` (looked up per product). Lines
/// the catalog cannot sell now are listed without a price and left out of
/// the subtotal, which is `None` only for a cart without a currency.
pub fn price_lines(
    cart: &Cart,
    catalog: impl Fn(Uuid) -> CatalogEntry,
) -> Result<(Vec<PricedLine>, Option<Money>), DomainError> {
    let mut subtotal = cart.currency.map(Money::zero);
    let mut lines = Vec::with_capacity(cart.lines.len());
    for (&product_id, &quantity) in &cart.lines {
        let mut line = PricedLine {
            product_id,
            quantity,
            sku: None,
            name: None,
            unit_price: None,
            line_total: None,
            unavailable_reason: None,
        };
        match catalog(product_id) {
            CatalogEntry::Sellable {
                sku,
                name,
                unit_price,
            } => {
                line.sku = Some(sku);
                line.name = Some(name);
                if Some(unit_price.currency()) == cart.currency {
                    let line_total = unit_price.times(quantity)?;
                    subtotal = subtotal.map(|s| s.checked_add(&line_total)).transpose()?;
                    line.unit_price = Some(unit_price);
                    line.line_total = Some(line_total);
                } else {
                    line.unavailable_reason = Some(format!(
                        "now priced in {}, the cart is in {}",
                        unit_price.currency(),
                        cart.currency
                            .map_or("no currency".into(), |c| c.to_string())
                    ));
                }
            }
            CatalogEntry::Unavailable { reason } => line.unavailable_reason = Some(reason),
        }
        lines.push(line);
    }
    Ok((lines, subtotal))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur() -> Currency {
        Currency::parse("EUR").expect("EUR")
    }

    fn limits(max_lines: usize) -> CartLimits {
        CartLimits {
            max_lines,
            ttl: Duration::hours(1),
        }
    }

    fn set(product_id: Uuid, quantity: u32) -> ItemChange {
        ItemChange {
            product_id,
            quantity,
            mode: QuantityMode::Set,
            currency: Some(eur()),
        }
    }

    fn add(product_id: Uuid, quantity: u32) -> ItemChange {
        ItemChange {
            mode: QuantityMode::Add,
            ..set(product_id, quantity)
        }
    }

    fn empty_cart() -> Cart {
        Cart::create(
            Uuid::now_v7(),
            CartOwner::Customer(Uuid::now_v7()),
            None,
            &[],
            &limits(3),
            Utc::now(),
        )
        .expect("empty cart")
    }

    #[test]
    fn set_add_and_zero_follow_their_rules() {
        let now = Utc::now();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let cart = empty_cart();
        assert_eq!(cart.version, 1);
        assert_eq!(cart.expires_at, cart.updated_at + Duration::hours(1));
        let cart = cart
            .change_items(&[set(a, 2), add(b, 3)], &limits(3), now)
            .expect("items");
        let cart = cart
            .change_items(&[add(a, 5)], &limits(3), now)
            .expect("add");
        assert_eq!(cart.lines.get(&a), Some(&7));
        assert_eq!(cart.currency, Some(eur()));
        let cart = cart
            .change_items(&[set(b, 0)], &limits(3), now)
            .expect("remove");
        assert!(!cart.lines.contains_key(&b));
        assert_eq!(cart.version, 4);
        assert_eq!(cart.item_count(), 7);
        // Emptied: the currency goes back to none.
        let cart = cart.clear(&limits(3), now).expect("clear");
        assert_eq!(cart.currency, None);
    }

    #[test]
    fn refusals_change_nothing_and_say_why() {
        let now = Utc::now();
        let a = Uuid::now_v7();
        let cart = empty_cart()
            .change_items(&[set(a, 998)], &limits(2), now)
            .expect("set");
        let refused = |changes: &[ItemChange]| {
            cart.change_items(changes, &limits(2), now)
                .expect_err("refused")
        };
        assert!(matches!(
            refused(&[add(a, 2)]),
            DomainError::Invalid {
                field: "items.quantity",
                ..
            }
        ));
        assert!(matches!(
            refused(&[set(a, 1000)]),
            DomainError::Invalid {
                field: "items.quantity",
                ..
            }
        ));
        assert!(matches!(
            refused(&[add(a, 0)]),
            DomainError::Invalid {
                field: "items.quantity",
                ..
            }
        ));
        assert!(matches!(
            refused(&[set(a, 1), set(a, 2)]),
            DomainError::Invalid { field: "items", .. }
        ));
        assert!(matches!(
            refused(&[]),
            DomainError::Invalid { field: "items", .. }
        ));
        let too_many = [set(Uuid::now_v7(), 1), set(Uuid::now_v7(), 1)];
        assert!(matches!(
            refused(&too_many),
            DomainError::Invalid { field: "items", .. }
        ));
        let usd = ItemChange {
            currency: Some(Currency::parse("USD").expect("USD")),
            ..set(Uuid::now_v7(), 1)
        };
        assert!(matches!(
            refused(&[usd]),
            DomainError::CurrencyMismatch { .. }
        ));
        assert!(matches!(
            cart.remove_line(Uuid::now_v7(), &limits(2), now),
            Err(DomainError::NotFound { .. })
        ));
    }

    #[test]
    fn checkout_freezes_the_cart_for_good() {
        let now = Utc::now();
        let a = Uuid::now_v7();
        let empty = empty_cart();
        assert!(matches!(
            empty.begin_checkout(&limits(3), now),
            Err(DomainError::Invalid {
                field: "cartId",
                ..
            })
        ));
        let cart = empty
            .change_items(&[set(a, 1)], &limits(3), now)
            .expect("set");
        let frozen = cart.begin_checkout(&limits(3), now).expect("begin");
        assert_eq!(frozen.status, CartStatus::CheckingOut);
        assert!(matches!(
            frozen.change_items(&[set(a, 2)], &limits(3), now),
            Err(DomainError::CartNotOpen {
                status: CartStatus::CheckingOut,
                ..
            })
        ));
        let reopened = frozen.abort_checkout(&limits(3), now).expect("abort");
        assert_eq!(reopened.status, CartStatus::Open);
        let done = frozen
            .finish_checkout(cart.order_id(), &limits(3), now)
            .expect("finish");
        assert_eq!(done.order_id, Some(cart.order_id()));
        for refused in [
            done.clear(&limits(3), now),
            done.begin_checkout(&limits(3), now),
            done.abort_checkout(&limits(3), now),
            done.finish_checkout(Uuid::now_v7(), &limits(3), now),
        ] {
            assert!(matches!(
                refused,
                Err(DomainError::CartNotOpen {
                    status: CartStatus::CheckedOut,
                    ..
                })
            ));
        }
    }

    #[test]
    fn guests_and_orders_get_stable_ids() {
        let guest = CartOwner::session("  visitor-1 ").expect("session");
        assert_eq!(guest, CartOwner::Session("visitor-1".into()));
        assert_eq!(
            guest.order_customer_id(),
            CartOwner::Session("visitor-1".into()).order_customer_id()
        );
        assert!(CartOwner::session(" ").is_err());
        let cart = empty_cart();
        assert_eq!(cart.order_id(), cart.clone().order_id());
        assert_ne!(cart.order_id(), empty_cart().order_id());
    }

    #[test]
    fn prices_come_from_the_catalog_and_skip_unsellable_lines() {
        let now = Utc::now();
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let cart = empty_cart()
            .change_items(&[set(a, 3), set(b, 7), set(c, 1)], &limits(3), now)
            .expect("items");
        let price =
            |amount: &str| Money::new(amount.parse().expect("decimal"), eur()).expect("money");
        let (lines, subtotal) = price_lines(&cart, |id| {
            if id == a {
                CatalogEntry::Sellable {
                    sku: "A".into(),
                    name: "A".into(),
                    unit_price: price("19.99"),
                }
            } else if id == b {
                CatalogEntry::Sellable {
                    sku: "B".into(),
                    name: "B".into(),
                    unit_price: price("0.10"),
                }
            } else {
                CatalogEntry::Unavailable {
                    reason: "inactive".into(),
                }
            }
        })
        .expect("priced");
        assert_eq!(subtotal, Some(price("60.67")));
        let line_a = lines.iter().find(|l| l.product_id == a).expect("line a");
        assert_eq!(line_a.line_total, Some(price("59.97")));
        let line_c = lines.iter().find(|l| l.product_id == c).expect("line c");
        assert_eq!(line_c.line_total, None);
        assert_eq!(line_c.unavailable_reason.as_deref(), Some("inactive"));
    }
}
