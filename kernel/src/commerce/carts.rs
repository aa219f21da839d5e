//! Cart commands and checkout.
//!
//! Carts follow the same compare-and-swap discipline as event streams: load
//! the cart, let the domain decide its next state, and swap it in at the
//! version loaded; a conflict is returned when the caller named a version,
//! and retried otherwise (so concurrent "add one" requests all count).
//!
//! Checkout places exactly one order per cart:
//! 1. everything that could refuse the order (prices, address, payment
//!    method) is checked while the cart is still OPEN;
//! 2. the cart is frozen (CHECKING_OUT) by a swap, so it cannot change under
//!    the order;
//! 3. the order is appended under an id derived from the cart, at stream
//!    version 0, so any number of concurrent or repeated attempts write it
//!    once and the others find it;
//! 4. the cart is marked CHECKED_OUT with the order's id.
//!
//! A crash between two steps leaves a state the next attempt continues from.

use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};
use uuid::Uuid;

use super::{CommandContext, CommandError, Commerce, ConflictCounter, OrderChange};
use crate::carts::{CartStore, Swap};
use crate::domain::DomainError;
use crate::domain::cart::{
    Cart, CartLimits, CartOwner, CartStatus, CatalogEntry, ItemChange, PricedLine, QuantityMode,
    price_lines,
};
use crate::domain::money::{Currency, Money};
use crate::domain::order::{Address, Order, PlaceOrder};

/// How long a checkout may sit in CHECKING_OUT before another attempt that
/// cannot place its order may reopen the cart.
const CHECKOUT_LEASE: chrono::Duration = chrono::Duration::seconds(30);

/// The time now, to the microsecond: what every store keeps.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// One requested line change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CartItem {
    pub product_id: Uuid,
    pub quantity: u32,
    pub mode: QuantityMode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCart {
    pub owner: CartOwner,
    /// Fixes the cart's currency up front; otherwise the first item's decides.
    pub currency: Option<Currency>,
    pub items: Vec<CartItem>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutInput {
    pub cart_id: Uuid,
    pub payment_method: String,
    pub shipping_address: Address,
    /// Recorded on the order, for the payment provider.
    pub idempotency_key: Option<String>,
    /// Recorded on the order: how the shop reaches a guest about it.
    pub email: Option<String>,
}

/// A cart with prices from the catalog as of now.
#[derive(Debug, Clone, PartialEq)]
pub struct PricedCart {
    pub cart: Cart,
    pub lines: Vec<PricedLine>,
    /// Sum of the lines that can be bought now; `None` for a cart without a currency.
    pub subtotal: Option<Money>,
}

/// A checked-out cart and its order.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkout {
    pub cart: Cart,
    pub order: OrderChange,
}

/// The cart commands, around one cart store.
#[derive(Clone)]
pub struct Carts {
    commerce: Commerce,
    store: Arc<dyn CartStore>,
    limits: CartLimits,
}

impl Carts {
    pub fn new(commerce: Commerce, store: Arc<dyn CartStore>, limits: CartLimits) -> Self {
        Carts {
            commerce,
            store,
            limits,
        }
    }

    pub fn store(&self) -> &Arc<dyn CartStore> {
        &self.store
    }

    /// Creates a cart, optionally with items.
    pub async fn create_cart(&self, new: NewCart) -> Result<Cart, CommandError> {
        let items = self.resolve(&new.items).await?;
        let now = now();
        let cart = Cart::create(
            Uuid::now_v7(),
            new.owner,
            new.currency,
            &items,
            &self.limits,
            now,
        )?;
        self.swap(&cart, 0, now).await?;
        Ok(cart)
    }

    /// The cart, or `None` when it does not exist or has expired.
    pub async fn cart(&self, id: Uuid) -> Result<Option<Cart>, CommandError> {
        let now = now();
        Ok(self
            .store
            .load(id, now)
            .await?
            .filter(|cart| !cart.is_expired(now)))
    }

    /// Sets or adds quantities, all items or none.
    pub async fn change_items(
        &self,
        cart_id: Uuid,
        items: &[CartItem],
        expected_version: Option<u32>,
    ) -> Result<Cart, CommandError> {
        let changes = self.resolve(items).await?;
        self.change(cart_id, expected_version, |cart, now| {
            cart.change_items(&changes, &self.limits, now)
        })
        .await
    }

    pub async fn remove_item(
        &self,
        cart_id: Uuid,
        product_id: Uuid,
        expected_version: Option<u32>,
    ) -> Result<Cart, CommandError> {
        self.change(cart_id, expected_version, |cart, now| {
            cart.remove_line(product_id, &self.limits, now)
        })
        .await
    }

    pub async fn clear(
        &self,
        cart_id: Uuid,
        expected_version: Option<u32>,
    ) -> Result<Cart, CommandError> {
        self.change(cart_id, expected_version, |cart, now| {
            cart.clear(&self.limits, now)
        })
        .await
    }

    /// Prices every line from the catalog as it is now.
    pub async fn price(&self, cart: Cart) -> Result<PricedCart, CommandError> {
        let ids: Vec<Uuid> = cart.lines.keys().copied().collect();
        let products = self.commerce.load_products(&ids).await?;
        let mut entries = Vec::with_capacity(ids.len());
        for (product_id, product) in ids.into_iter().zip(products) {
            let sellable = product.and_then(|product| {
                product
                    .state
                    .sellable_price(product_id)
                    .map(|details| CatalogEntry::Sellable {
                        sku: details.sku.clone(),
                        name: details.name.clone(),
                        unit_price: details.price,
                    })
            });
            let entry = sellable.unwrap_or_else(|refusal| CatalogEntry::Unavailable {
                reason: refusal.to_string(),
            });
            entries.push((product_id, entry));
        }
        let (lines, subtotal) = price_lines(&cart, |product_id| {
            entries
                .iter()
                .find(|(id, _)| *id == product_id)
                .map(|(_, entry)| entry.clone())
                .unwrap_or_else(|| CatalogEntry::Unavailable {
                    reason: "not in the catalog".into(),
                })
        })?;
        Ok(PricedCart {
            cart,
            lines,
            subtotal,
        })
    }

    /// Turns the cart into its one order (see the module docs). Repeating it,
    /// concurrently or later, returns the same order.
    pub async fn checkout(
        &self,
        input: &CheckoutInput,
        context: &CommandContext,
    ) -> Result<Checkout, CommandError> {
        self.commerce
            .retrying(ConflictCounter::Cart, false, || async {
                let now = now();
                let cart = self.existing(input.cart_id, now).await?;
                let (frozen, command) = match cart.status {
                    CartStatus::CheckedOut => {
                        let order_id = cart.order_id.unwrap_or_else(|| cart.order_id());
                        let order = self.commerce.load_order(order_id).await?;
                        return Ok(Checkout { cart, order });
                    }
                    CartStatus::Open => {
                        let frozen = cart.begin_checkout(&self.limits, now)?;
                        let command = self.order_command(&cart, input).await?;
                        // A dry run: refusals come back while the cart is still open.
                        Order::place(&command)?;
                        self.swap(&frozen, cart.version, now).await?;
                        (frozen, Ok(command))
                    }
                    CartStatus::CheckingOut => {
                        let command = self.order_command(&cart, input).await;
                        (cart, command)
                    }
                };
                let placed = match command {
                    Ok(command) => {
                        self.commerce
                            .place_priced_order(frozen.order_id(), &command, None, context)
                            .await
                    }
                    Err(refusal) => Err(refusal),
                };
                let order = match placed {
                    Ok(order) => order,
                    Err(CommandError::Domain(refusal)) => {
                        self.reopen_if_abandoned(&frozen, now).await?;
                        return Err(refusal.into());
                    }
                    Err(other) => return Err(other),
                };
                let done = frozen.finish_checkout(order.id, &self.limits, now)?;
                self.swap(&done, frozen.version, now).await?;
                Ok(Checkout { cart: done, order })
            })
            .await
    }

    /// The order a cart becomes, priced from the catalog now.
    async fn order_command(
        &self,
        cart: &Cart,
        input: &CheckoutInput,
    ) -> Result<PlaceOrder, CommandError> {
        let lines: Vec<(Uuid, u32)> = cart.lines.iter().map(|(id, qty)| (*id, *qty)).collect();
        Ok(PlaceOrder {
            customer_id: cart.owner.order_customer_id(),
            lines: self.commerce.catalog_prices(&lines).await?,
            shipping_address: input.shipping_address.clone(),
            payment_method: input.payment_method.clone(),
            idempotency_key: input.idempotency_key.clone(),
            email: input.email.clone(),
        })
    }

    /// A checkout frozen longer than [`CHECKOUT_LEASE`] whose order cannot
    /// be placed (its process died and the catalog changed since, say) goes
    /// back to OPEN, so the customer can fix the cart. A younger one is left
    /// alone: its own attempt may still be placing the order.
    async fn reopen_if_abandoned(
        &self,
        frozen: &Cart,
        now: DateTime<Utc>,
    ) -> Result<(), CommandError> {
        let started = frozen.checkout_started_at.unwrap_or(frozen.updated_at);
        if now - started < CHECKOUT_LEASE {
            return Ok(());
        }
        match self.commerce.load_order(frozen.order_id()).await {
            Err(CommandError::Domain(DomainError::NotFound { .. })) => {}
            // The order exists after all (or cannot be told): keep the cart frozen.
            _ => return Ok(()),
        }
        let reopened = frozen.abort_checkout(&self.limits, now)?;
        self.swap(&reopened, frozen.version, now).await
    }

    /// Checks each product named: it must exist and be sellable, unless the
    /// change only removes its line.
    async fn resolve(&self, items: &[CartItem]) -> Result<Vec<ItemChange>, CommandError> {
        let mut changes: Vec<ItemChange> = items
            .iter()
            .map(|item| ItemChange {
                product_id: item.product_id,
                quantity: item.quantity,
                mode: item.mode,
                currency: None,
            })
            .collect();
        let named: Vec<Uuid> = changes
            .iter()
            .filter(|change| !change.removes())
            .map(|change| change.product_id)
            .collect();
        let products = self.commerce.load_products(&named).await?;
        let named_changes = changes.iter_mut().filter(|change| !change.removes());
        for (change, product) in named_changes.zip(products) {
            let product = product?;
            let details = product.state.sellable_price(change.product_id)?;
            change.currency = Some(details.price.currency());
        }
        Ok(changes)
    }

    /// Loads, decides and swaps, retrying conflicts unless the caller named a version.
    async fn change(
        &self,
        cart_id: Uuid,
        expected_version: Option<u32>,
        decide: impl Fn(&Cart, DateTime<Utc>) -> Result<Cart, DomainError>,
    ) -> Result<Cart, CommandError> {
        self.commerce
            .retrying(
                ConflictCounter::Cart,
                expected_version.is_some(),
                || async {
                    let now = now();
                    let cart = self.existing(cart_id, now).await?;
                    if let Some(expected) = expected_version
                        && expected != cart.version
                    {
                        return Err(CommandError::VersionConflict {
                            aggregate_id: cart_id,
                            expected,
                            actual: cart.version,
                        });
                    }
                    let next = decide(&cart, now)?;
                    self.swap(&next, cart.version, now).await?;
                    Ok(next)
                },
            )
            .await
    }

    async fn existing(&self, cart_id: Uuid, now: DateTime<Utc>) -> Result<Cart, CommandError> {
        match self.store.load(cart_id, now).await? {
            Some(cart) if !cart.is_expired(now) => Ok(cart),
            _ => Err(DomainError::NotFound {
                kind: "cart",
                id: cart_id,
            }
            .into()),
        }
    }

    async fn swap(
        &self,
        cart: &Cart,
        expected: u32,
        now: DateTime<Utc>,
    ) -> Result<(), CommandError> {
        match self.store.swap(cart, expected, now).await? {
            Swap::Written => Ok(()),
            Swap::Conflict { actual } => Err(CommandError::VersionConflict {
                aggregate_id: cart.id,
                expected,
                actual,
            }),
        }
    }
}
