//! Orders: lines priced from the catalog at order time, and a state machine.
//!
//! ```text
//! PENDING ──> INVENTORY_RESERVED ──> PAID ──> SHIPPED ──> CONFIRMED
//!    │                │               │          │
//!    ├──> CANCELLED <─┴───────────────┴──────────┤
//!    └──> FAILED <───────────────────────────────┘  (from any non-final state)
//! ```
//!
//! CONFIRMED, CANCELLED and FAILED are final. Every transition is one event;
//! any other transition is refused with [`DomainError::IllegalTransition`].

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::money::Money;
use super::{Aggregate, DomainError, DomainEvent, clean_text};

/// Most lines one order may have.
pub const MAX_LINES: usize = 100;
/// Largest quantity of one line.
pub const MAX_LINE_QUANTITY: u32 = 999;
/// Longest email address accepted, in bytes (RFC 5321's path limit).
pub const MAX_EMAIL_BYTES: usize = 254;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    Pending,
    InventoryReserved,
    Paid,
    Shipped,
    Confirmed,
    Cancelled,
    Failed,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 7] = [
        OrderStatus::Pending,
        OrderStatus::InventoryReserved,
        OrderStatus::Paid,
        OrderStatus::Shipped,
        OrderStatus::Confirmed,
        OrderStatus::Cancelled,
        OrderStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "PENDING",
            OrderStatus::InventoryReserved => "INVENTORY_RESERVED",
            OrderStatus::Paid => "PAID",
            OrderStatus::Shipped => "SHIPPED",
            OrderStatus::Confirmed => "CONFIRMED",
            OrderStatus::Cancelled => "CANCELLED",
            OrderStatus::Failed => "FAILED",
        }
    }

    pub fn parse(text: &str) -> Option<OrderStatus> {
        OrderStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// The status an order event of stored type `event_type` moves its order
    /// to ([`OrderEvent::status`], read from the type alone), if it is one.
    pub fn reached_by(event_type: &str) -> Option<OrderStatus> {
        Some(match event_type {
            "Placed" => OrderStatus::Pending,
            "InventoryReserved" => OrderStatus::InventoryReserved,
            "PaymentCaptured" => OrderStatus::Paid,
            "Shipped" => OrderStatus::Shipped,
            "Confirmed" => OrderStatus::Confirmed,
            "Cancelled" => OrderStatus::Cancelled,
            "Failed" => OrderStatus::Failed,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            OrderStatus::Confirmed | OrderStatus::Cancelled | OrderStatus::Failed
        )
    }

    /// The state machine's edges.
    pub fn can_become(self, next: OrderStatus) -> bool {
        use OrderStatus::*;
        match (self, next) {
            (Pending, InventoryReserved)
            | (InventoryReserved, Paid)
            | (Paid, Shipped)
            | (Shipped, Confirmed) => true,
            // A shipment not yet confirmed can still be called back: the
            // saga cancels it with the carrier before the order is cancelled.
            (Pending | InventoryReserved | Paid | Shipped, Cancelled) => true,
            (from, Failed) => !from.is_final(),
            _ => false,
        }
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A postal address. `country` is an ISO 3166-1 alpha-2 code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    pub name: String,
    pub line1: String,
    pub line2: Option<String>,
    pub city: String,
    pub postal_code: String,
    pub region: Option<String>,
    pub country: String,
}

impl Address {
    /// The address with every field checked and trimmed.
    pub fn validated(&self) -> Result<Address, DomainError> {
        let optional = |field, text: &Option<String>| -> Result<Option<String>, DomainError> {
            match text.as_deref().map(str::trim) {
                None | Some("") => Ok(None),
                Some(text) => clean_text(field, text, 200).map(Some),
            }
        };
        let country = self.country.trim().to_ascii_uppercase();
        if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(DomainError::invalid(
                "shippingAddress.country",
                "must be an ISO 3166-1 alpha-2 code such as DE",
            ));
        }
        Ok(Address {
            name: clean_text("shippingAddress.name", &self.name, 200)?,
            line1: clean_text("shippingAddress.line1", &self.line1, 200)?,
            line2: optional("shippingAddress.line2", &self.line2)?,
            city: clean_text("shippingAddress.city", &self.city, 100)?,
            postal_code: clean_text("shippingAddress.postalCode", &self.postal_code, 20)?,
            region: optional("shippingAddress.region", &self.region)?,
            country,
        })
    }
}

/// A product as the catalog prices it now: the only source of unit prices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogPrice {
    pub product_id: Uuid,
    pub sku: String,
    pub name: String,
    pub unit_price: Money,
}

/// A line as ordered, with the price captured at order time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub product_id: Uuid,
    pub sku: String,
    pub name: String,
    pub quantity: u32,
    pub unit_price: Money,
    pub line_total: Money,
}

/// One product's stock held for the order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservedStock {
    pub product_id: Uuid,
    pub reservation_id: Uuid,
    pub quantity: u32,
}

/// Everything needed to place an order; prices come with the lines, from the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaceOrder {
    pub customer_id: Uuid,
    pub lines: Vec<(CatalogPrice, u32)>,
    pub shipping_address: Address,
    pub payment_method: String,
    pub idempotency_key: Option<String>,
    /// Where the buyer wants to hear about the order; what links a guest's
    /// order to a person (see [`validated_email`]).
    pub email: Option<String>,
}

// `Placed` carries the whole order and the transitions almost nothing; events
// live briefly (decided, appended, applied), so boxing would buy little.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum OrderEvent {
    Placed {
        customer_id: Uuid,
        lines: Vec<OrderLine>,
        total: Money,
        shipping_address: Address,
        payment_method: String,
        idempotency_key: Option<String>,
        /// Absent in orders placed before checkout asked for one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        email: Option<String>,
    },
    InventoryReserved {
        reservations: Vec<ReservedStock>,
    },
    PaymentCaptured {
        payment_reference: String,
        amount: Money,
    },
    Shipped {
        shipment_reference: String,
    },
    Confirmed,
    Cancelled {
        reason: String,
    },
    Failed {
        reason: String,
    },
}

impl DomainEvent for OrderEvent {}

impl OrderEvent {
    /// The status an event moves the order to.
    pub fn status(&self) -> OrderStatus {
        match self {
            OrderEvent::Placed { .. } => OrderStatus::Pending,
            OrderEvent::InventoryReserved { .. } => OrderStatus::InventoryReserved,
            OrderEvent::PaymentCaptured { .. } => OrderStatus::Paid,
            OrderEvent::Shipped { .. } => OrderStatus::Shipped,
            OrderEvent::Confirmed => OrderStatus::Confirmed,
            OrderEvent::Cancelled { .. } => OrderStatus::Cancelled,
            OrderEvent::Failed { .. } => OrderStatus::Failed,
        }
    }
}

/// The order as placed; fixed once placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedOrder {
    pub customer_id: Uuid,
    pub lines: Vec<OrderLine>,
    pub total: Money,
    pub shipping_address: Address,
    pub payment_method: String,
    pub idempotency_key: Option<String>,
    pub email: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Order {
    /// `None` until placed.
    pub placed: Option<PlacedOrder>,
    pub status: Option<OrderStatus>,
    /// Why the order was cancelled or failed.
    pub reason: Option<String>,
    pub reservations: Vec<ReservedStock>,
    pub payment_reference: Option<String>,
    pub shipment_reference: Option<String>,
}

impl Aggregate for Order {
    const AGGREGATE_TYPE: &'static str = "order";
    type Event = OrderEvent;

    fn apply(&mut self, event: &OrderEvent) {
        self.status = Some(event.status());
        match event {
            OrderEvent::Placed {
                customer_id,
                lines,
                total,
                shipping_address,
                payment_method,
                idempotency_key,
                email,
            } => {
                self.placed = Some(PlacedOrder {
                    customer_id: *customer_id,
                    lines: lines.clone(),
                    total: *total,
                    shipping_address: shipping_address.clone(),
                    payment_method: payment_method.clone(),
                    idempotency_key: idempotency_key.clone(),
                    email: email.clone(),
                });
            }
            OrderEvent::InventoryReserved { reservations } => {
                self.reservations = reservations.clone();
            }
            OrderEvent::PaymentCaptured {
                payment_reference, ..
            } => self.payment_reference = Some(payment_reference.clone()),
            OrderEvent::Shipped { shipment_reference } => {
                self.shipment_reference = Some(shipment_reference.clone());
            }
            OrderEvent::Confirmed => {}
            OrderEvent::Cancelled { reason } | OrderEvent::Failed { reason } => {
                self.reason = Some(reason.clone());
            }
        }
    }
}

/// `text` as an email address to record, or a refusal. Accepted is the
/// common form: a local part of dot-separated atoms (ASCII letters, digits
/// and ``!#$%&'*+/=?^_`{|}~-``, or non-ASCII letters and digits), one `@`,
/// and a domain of two or more dot-separated labels of letters, digits and
/// inner hyphens; at most [`MAX_EMAIL_BYTES`] bytes. Quoted local parts,
/// comments and address literals are refused: nothing that could break out
/// of a mail header (`<>,;"()[]\`, spaces) or hide in one (invisible and
/// bidirectional formatting characters) is recorded. The domain is
/// lowercased; the local part is kept as given, since the mail server, not
/// this kernel, decides whether its case matters. This does not prove that
/// the address receives mail; only sending to it does.
pub fn validated_email(text: &str) -> Result<String, DomainError> {
    const FIELD: &str = "email";
    let malformed = || DomainError::invalid(FIELD, "must look like name@example.com");
    let text = text.trim();
    if text.is_empty() {
        return Err(DomainError::invalid(FIELD, "must not be empty"));
    }
    if text.len() > MAX_EMAIL_BYTES {
        return Err(DomainError::invalid(
            FIELD,
            format!("at most {MAX_EMAIL_BYTES} bytes"),
        ));
    }
    let Some((local, domain)) = text.split_once('@') else {
        return Err(malformed());
    };
    let atom_char = |c: char| {
        c.is_ascii_alphanumeric()
            || "!#$%&'*+/=?^_`{|}~-".contains(c)
            || (!c.is_ascii() && c.is_alphanumeric())
    };
    let local_ok = local
        .split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(atom_char));
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c == '-' || c.is_alphanumeric())
    };
    let domain_ok = domain.contains('.') && domain.split('.').all(label_ok);
    if !local_ok || !domain_ok {
        return Err(malformed());
    }
    Ok(format!("{local}@{}", domain.to_lowercase()))
}

impl Order {
    /// Prices the lines (catalog price times quantity) and totals them. All
    /// lines must share one currency.
    pub fn place(command: &PlaceOrder) -> Result<Vec<OrderEvent>, DomainError> {
        if command.lines.is_empty() || command.lines.len() > MAX_LINES {
            return Err(DomainError::invalid(
                "lines",
                format!("an order has 1 to {MAX_LINES} lines"),
            ));
        }
        let currency = command.lines[0].0.unit_price.currency();
        let mut total = Money::zero(currency);
        let mut lines = Vec::with_capacity(command.lines.len());
        for (price, quantity) in &command.lines {
            if *quantity == 0 || *quantity > MAX_LINE_QUANTITY {
                return Err(DomainError::invalid(
                    "quantity",
                    format!("must be 1 to {MAX_LINE_QUANTITY}"),
                ));
            }
            let line_total = price.unit_price.times(*quantity)?;
            total = total.checked_add(&line_total)?;
            lines.push(OrderLine {
                product_id: price.product_id,
                sku: price.sku.clone(),
                name: price.name.clone(),
                quantity: *quantity,
                unit_price: price.unit_price,
                line_total,
            });
        }
        let idempotency_key = match &command.idempotency_key {
            Some(key) => Some(clean_text("idempotencyKey", key, 200)?),
            None => None,
        };
        Ok(vec![OrderEvent::Placed {
            customer_id: command.customer_id,
            lines,
            total,
            shipping_address: command.shipping_address.validated()?,
            payment_method: clean_text("paymentMethod", &command.payment_method, 64)?,
            idempotency_key,
            // A blank field is no email, as a form left empty means.
            email: command
                .email
                .as_deref()
                .filter(|email| !email.trim().is_empty())
                .map(validated_email)
                .transpose()?,
        }])
    }

    /// Checks that the order exists and may move to `next`.
    fn transition(&self, order_id: Uuid, next: OrderStatus) -> Result<(), DomainError> {
        let Some(current) = self.status else {
            return Err(DomainError::NotFound {
                kind: "order",
                id: order_id,
            });
        };
        if current.can_become(next) {
            Ok(())
        } else {
            Err(DomainError::IllegalTransition {
                from: current,
                to: next,
            })
        }
    }

    /// Per product, the quantity the order needs (lines naming one product add up).
    pub fn quantities_by_product(&self) -> Vec<(Uuid, u32)> {
        let mut totals: Vec<(Uuid, u32)> = Vec::new();
        for line in self.placed.iter().flat_map(|p| &p.lines) {
            match totals.iter_mut().find(|(id, _)| *id == line.product_id) {
                Some((_, quantity)) => *quantity = quantity.saturating_add(line.quantity),
                None => totals.push((line.product_id, line.quantity)),
            }
        }
        totals
    }

    pub fn reserve_inventory(
        &self,
        order_id: Uuid,
        reservations: Vec<ReservedStock>,
    ) -> Result<Vec<OrderEvent>, DomainError> {
        self.transition(order_id, OrderStatus::InventoryReserved)?;
        Ok(vec![OrderEvent::InventoryReserved { reservations }])
    }

    /// The captured amount must be the order's total.
    pub fn mark_paid(
        &self,
        order_id: Uuid,
        payment_reference: &str,
        amount: Money,
    ) -> Result<Vec<OrderEvent>, DomainError> {
        self.transition(order_id, OrderStatus::Paid)?;
        if let Some(placed) = &self.placed
            && placed.total != amount
        {
            return Err(DomainError::invalid(
                "amount",
                format!("{amount} captured, the order totals {}", placed.total),
            ));
        }
        Ok(vec![OrderEvent::PaymentCaptured {
            payment_reference: clean_text("paymentReference", payment_reference, 200)?,
            amount,
        }])
    }

    pub fn ship(
        &self,
        order_id: Uuid,
        shipment_reference: &str,
    ) -> Result<Vec<OrderEvent>, DomainError> {
        self.transition(order_id, OrderStatus::Shipped)?;
        Ok(vec![OrderEvent::Shipped {
            shipment_reference: clean_text("shipmentReference", shipment_reference, 200)?,
        }])
    }

    pub fn confirm(&self, order_id: Uuid) -> Result<Vec<OrderEvent>, DomainError> {
        self.transition(order_id, OrderStatus::Confirmed)?;
        Ok(vec![OrderEvent::Confirmed])
    }

    pub fn cancel(&self, order_id: Uuid, reason: &str) -> Result<Vec<OrderEvent>, DomainError> {
        self.transition(order_id, OrderStatus::Cancelled)?;
        Ok(vec![OrderEvent::Cancelled {
            reason: clean_text("reason", reason, 500)?,
        }])
    }

    pub fn fail(&self, order_id: Uuid, reason: &str) -> Result<Vec<OrderEvent>, DomainError> {
        self.transition(order_id, OrderStatus::Failed)?;
        Ok(vec![OrderEvent::Failed {
            reason: clean_text("reason", reason, 500)?,
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::money::Currency;

    fn money(amount: &str, currency: &str) -> Money {
        Money::new(
            amount.parse().expect("decimal"),
            Currency::parse(currency).expect("currency"),
        )
        .expect("valid")
    }

    fn price(amount: &str, currency: &str) -> CatalogPrice {
        CatalogPrice {
            product_id: Uuid::now_v7(),
            sku: "SKU-1".into(),
            name: "Thing".into(),
            unit_price: money(amount, currency),
        }
    }

    fn address() -> Address {
        Address {
            name: "Ada Lovelace".into(),
            line1: "12 St James's Square".into(),
            line2: None,
            city: "London".into(),
            postal_code: "SW1Y 4JH".into(),
            region: Some(" ".into()),
            country: "gb".into(),
        }
    }

    fn command(lines: Vec<(CatalogPrice, u32)>) -> PlaceOrder {
        PlaceOrder {
            customer_id: Uuid::now_v7(),
            lines,
            shipping_address: address(),
            payment_method: "card".into(),
            idempotency_key: Some("checkout-1".into()),
            email: None,
        }
    }

    fn placed(lines: Vec<(CatalogPrice, u32)>) -> Order {
        let mut order = Order::default();
        for event in Order::place(&command(lines)).expect("valid order") {
            order.apply(&event);
        }
        order
    }

    #[test]
    fn totals_are_exact_decimal_sums_of_catalog_prices() {
        let order = placed(vec![(price("0.10", "EUR"), 3), (price("19.99", "EUR"), 2)]);
        let placed = order.placed.expect("placed");
        assert_eq!(placed.total, money("40.28", "EUR"));
        assert_eq!(placed.lines[0].line_total, money("0.30", "EUR"));
        assert_eq!(placed.shipping_address.country, "GB");
        assert_eq!(placed.shipping_address.region, None);
        assert_eq!(order.status, Some(OrderStatus::Pending));
    }

    #[test]
    fn bad_orders_are_refused() {
        assert!(Order::place(&command(vec![])).is_err());
        assert!(Order::place(&command(vec![(price("1", "EUR"), 0)])).is_err());
        assert!(Order::place(&command(vec![(price("1", "EUR"), 1000)])).is_err());
        assert!(matches!(
            Order::place(&command(vec![
                (price("1", "EUR"), 1),
                (price("1", "USD"), 1)
            ])),
            Err(DomainError::CurrencyMismatch { .. })
        ));
        let mut bad_country = command(vec![(price("1", "EUR"), 1)]);
        bad_country.shipping_address.country = "GBR".into();
        assert!(Order::place(&bad_country).is_err());
    }

    #[test]
    fn an_email_given_at_checkout_is_checked_and_kept() {
        let mut with_email = command(vec![(price("1", "EUR"), 1)]);
        with_email.email = Some("  Ada.Lovelace+shop@Example.CO.uk ".into());
        let events = Order::place(&with_email).expect("valid order");
        let OrderEvent::Placed { email, .. } = &events[0] else {
            panic!("placed first: {events:?}");
        };
        assert_eq!(email.as_deref(), Some("Ada.Lovelace+shop@example.co.uk"));

        with_email.email = Some("Zoë.Ñandú@Bücher.example".into());
        let events = Order::place(&with_email).expect("non-ASCII letters are letters");
        assert!(
            matches!(&events[0], OrderEvent::Placed { email: Some(e), .. } if e == "Zoë.Ñandú@bücher.example")
        );
        for blank in ["", "   "] {
            with_email.email = Some(blank.into());
            let events = Order::place(&with_email).expect("a blank email is none");
            assert!(matches!(&events[0], OrderEvent::Placed { email: None, .. }));
        }

        let long_local = format!("{}@example.com", "a".repeat(MAX_EMAIL_BYTES));
        // Within the limit in characters, beyond it in bytes.
        let long_in_bytes = format!("{}@example.com", "ä".repeat(125));
        for bad in [
            "ada",
            "@example.com",
            "ada@",
            "ada@localhost",
            "ada@@example.com",
            "ada@exa mple.com",
            "ada@example..com",
            "ada@-example.com",
            "ada\u{7}@example.com",
            "x>,<victim@evil.com",
            "\"ada lovelace\"@example.com",
            "ada(comment)@example.com",
            "ada@[127.0.0.1]",
            "ada;bob@example.com",
            "ada\u{200b}@example.com",
            "ada@exam\u{202e}ple.com",
            ".ada@example.com",
            "ada..lovelace@example.com",
            "ada@exa_mple.com",
            long_local.as_str(),
            long_in_bytes.as_str(),
        ] {
            with_email.email = Some(bad.into());
            assert!(
                matches!(
                    Order::place(&with_email),
                    Err(DomainError::Invalid { field: "email", .. })
                ),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn every_event_type_names_the_status_its_event_reaches() {
        let events = [
            OrderEvent::Placed {
                customer_id: Uuid::nil(),
                lines: Vec::new(),
                total: money("1", "EUR"),
                shipping_address: address(),
                payment_method: "card".into(),
                idempotency_key: None,
                email: None,
            },
            OrderEvent::InventoryReserved {
                reservations: Vec::new(),
            },
            OrderEvent::PaymentCaptured {
                payment_reference: "p".into(),
                amount: money("1", "EUR"),
            },
            OrderEvent::Shipped {
                shipment_reference: "s".into(),
            },
            OrderEvent::Confirmed,
            OrderEvent::Cancelled { reason: "r".into() },
            OrderEvent::Failed { reason: "r".into() },
        ];
        for event in events {
            let stored = serde_json::to_value(&event).expect("encodes");
            let event_type = stored["type"].as_str().expect("tagged");
            assert_eq!(OrderStatus::reached_by(event_type), Some(event.status()));
        }
        assert_eq!(OrderStatus::reached_by("SomethingElse"), None);
    }

    #[test]
    fn orders_placed_before_emails_were_asked_for_still_replay() {
        let old_event = serde_json::json!({
            "type": "Placed",
            "data": {
                "customer_id": Uuid::nil(),
                "lines": [],
                "total": money("0", "EUR"),
                "shipping_address": address(),
                "payment_method": "card",
                "idempotency_key": null,
            }
        });
        let event: OrderEvent = serde_json::from_value(old_event).expect("old Placed decodes");
        assert!(matches!(event, OrderEvent::Placed { email: None, .. }));
        // And an order without an email is written as before.
        let written = serde_json::to_value(&event).expect("encodes");
        assert!(written["data"].get("email").is_none());
    }

    #[test]
    fn the_happy_path_walks_the_state_machine() {
        let id = Uuid::now_v7();
        let mut order = placed(vec![(price("5", "EUR"), 2)]);
        type Step = Box<dyn Fn(&Order) -> Result<Vec<OrderEvent>, DomainError>>;
        let steps: Vec<Step> = vec![
            Box::new(move |o| o.reserve_inventory(id, vec![])),
            Box::new(move |o| o.mark_paid(id, "pay_1", money("10", "EUR"))),
            Box::new(move |o| o.ship(id, "ship_1")),
            Box::new(move |o| o.confirm(id)),
        ];
        for step in steps {
            for event in step(&order).expect("legal transition") {
                order.apply(&event);
            }
        }
        assert_eq!(order.status, Some(OrderStatus::Confirmed));
        assert!(matches!(
            order.cancel(id, "too late"),
            Err(DomainError::IllegalTransition {
                from: OrderStatus::Confirmed,
                to: OrderStatus::Cancelled
            })
        ));
    }

    #[test]
    fn illegal_transitions_are_refused() {
        let id = Uuid::now_v7();
        let order = placed(vec![(price("5", "EUR"), 1)]);
        assert!(matches!(
            order.ship(id, "s"),
            Err(DomainError::IllegalTransition { .. })
        ));
        assert!(matches!(
            order.mark_paid(id, "p", money("5", "EUR")),
            Err(DomainError::IllegalTransition { .. })
        ));
        assert!(matches!(
            Order::default().confirm(id),
            Err(DomainError::NotFound { .. })
        ));
        // Every pair not on the diagram is refused.
        use OrderStatus::*;
        let edges = [
            (Pending, InventoryReserved),
            (InventoryReserved, Paid),
            (Paid, Shipped),
            (Shipped, Confirmed),
            (Pending, Cancelled),
            (InventoryReserved, Cancelled),
            (Paid, Cancelled),
            (Shipped, Cancelled),
            (Pending, Failed),
            (InventoryReserved, Failed),
            (Paid, Failed),
            (Shipped, Failed),
        ];
        for from in OrderStatus::ALL {
            for to in OrderStatus::ALL {
                assert_eq!(
                    from.can_become(to),
                    edges.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn payment_must_match_the_total() {
        let id = Uuid::now_v7();
        let mut order = placed(vec![(price("5", "EUR"), 1)]);
        for event in order.reserve_inventory(id, vec![]).expect("legal") {
            order.apply(&event);
        }
        assert!(order.mark_paid(id, "p", money("4.99", "EUR")).is_err());
    }

    #[test]
    fn lines_naming_one_product_add_up() {
        let first = price("1", "EUR");
        let mut again = first.clone();
        again.name = "Thing (gift)".into();
        let order = placed(vec![(first.clone(), 2), (price("2", "EUR"), 1), (again, 3)]);
        let quantities = order.quantities_by_product();
        assert_eq!(quantities.len(), 2);
        assert_eq!(quantities[0], (first.product_id, 5));
    }
}
