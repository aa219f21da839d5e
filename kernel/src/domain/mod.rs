//! The commerce domain: aggregates, their events and the rules between them.
//!
//! Everything here is pure: no I/O, no clocks, no database. Aggregates decide
//! which events a command produces and fold events into state; the storage
//! adapters persist and replay them (see [`crate::event_store::repository`]).
//! Commands that depend on time take `now` as an argument.
//!
//! - [`money`]: decimal amounts with ISO 4217 currencies.
//! - [`catalog`]: products, their prices and SKU claims.
//! - [`inventory`]: stock per product, reservations, expiry.
//! - [`order`]: orders, their lines and their state machine.
//! - [`cart`]: shopping carts, their limits, checkout states and pricing.
//! - [`plugin`]: which plugin versions are installed and active.
//! - [`saga`]: saga definitions and the order-fulfilment saga's record.

pub mod cart;
pub mod catalog;
pub mod inventory;
pub mod money;
pub mod order;
pub mod plugin;
pub mod saga;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use uuid::Uuid;

use cart::CartStatus;
use money::Currency;
use order::OrderStatus;
use saga::SagaStatus;

/// Why a command was refused. Every refusal writes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{kind} {id} does not exist")]
    NotFound { kind: &'static str, id: Uuid },
    #[error("{kind} {id} already exists")]
    AlreadyExists { kind: &'static str, id: Uuid },
    #[error("SKU {sku} belongs to another product")]
    SkuTaken { sku: String },
    #[error("expected {expected}, found {found}")]
    CurrencyMismatch { expected: Currency, found: Currency },
    #[error("product {product_id}: {requested} requested, {available} available")]
    InsufficientStock {
        product_id: Uuid,
        requested: u32,
        available: u32,
    },
    #[error("product {product_id}: on hand cannot go below the {reserved} reserved")]
    StockBelowReserved { product_id: Uuid, reserved: u32 },
    #[error("reservation {reservation_id} does not exist or has ended")]
    ReservationNotFound { reservation_id: Uuid },
    #[error("{owner} already holds reservation {reservation_id} of {quantity} units")]
    ReservationMismatch {
        owner: String,
        reservation_id: Uuid,
        quantity: u32,
    },
    #[error("product {product_id} is not active")]
    ProductInactive { product_id: Uuid },
    #[error("an order cannot go from {from} to {to}")]
    IllegalTransition { from: OrderStatus, to: OrderStatus },
    #[error("cart {cart_id} is {status} and can no longer change")]
    CartNotOpen { cart_id: Uuid, status: CartStatus },
    #[error("saga {saga_id} has ended ({status})")]
    SagaEnded { saga_id: Uuid, status: SagaStatus },
}

impl DomainError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        DomainError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// Checks a free-text field: trimmed, not empty, at most `max` characters, no
/// control characters. Returns the trimmed text.
pub fn clean_text(field: &'static str, text: &str, max: usize) -> Result<String, DomainError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(DomainError::invalid(field, "must not be empty"));
    }
    if trimmed.chars().count() > max {
        return Err(DomainError::invalid(
            field,
            format!("at most {max} characters"),
        ));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(DomainError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(trimmed.to_string())
}

/// Makes text from outside (a provider's error message, a plugin's code)
/// safe to store and to show: every control character and run of whitespace
/// becomes one space, the ends are trimmed, and the result is cut to
/// `max_chars` characters, the cut marked with an ellipsis. Never fails, so
/// a write that records such text can never be refused because of it.
pub fn summarize(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars.saturating_mul(4)));
    let mut count = 0;
    let mut pending_space = false;
    for c in text.chars() {
        if is_invisible(c) {
            continue;
        }
        if c.is_control() || c.is_whitespace() {
            pending_space = count > 0;
            continue;
        }
        let needed = if pending_space { 2 } else { 1 };
        if count + needed > max_chars {
            // Leave room for the ellipsis.
            while count >= max_chars && out.pop().is_some() {
                count -= 1;
            }
            out.truncate(out.trim_end().len());
            if max_chars > 0 {
                out.push('…');
            }
            return out;
        }
        if pending_space {
            out.push(' ');
            count += 1;
            pending_space = false;
        }
        out.push(c);
        count += 1;
    }
    out
}

/// Zero-width and text-direction characters, which can make shown text
/// read differently from what is stored.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}'
    )
}

/// A consistency boundary whose state is the fold of its own event stream.
///
/// `apply` must be deterministic and total: replaying the same events always
/// yields the same state, which is what makes rebuilding by replay exact.
pub trait Aggregate: Default + Clone + Send + Sync + 'static {
    /// Stored with every event of the stream; also guards against reading one
    /// aggregate's stream as another's.
    const AGGREGATE_TYPE: &'static str;

    type Event: DomainEvent;

    fn apply(&mut self, event: &Self::Event);
}

/// An event type family of one aggregate, stored as `(event_type, data)`.
///
/// Implementations are serde enums tagged adjacently, `#[serde(tag = "type",
/// content = "data")]`: the tag becomes the stored event type and the content
/// the stored payload.
pub trait DomainEvent: Serialize + DeserializeOwned + Send + Sync {
    /// Current payload schema of `event_type`. Bump it when a payload's shape
    /// changes, and teach [`DomainEvent::upcast`] to rewrite older payloads.
    fn schema_version(_event_type: &str) -> u32 {
        1
    }

    /// Rewrites a payload stored at `stored_version` into the current schema.
    /// The default accepts only the current schema.
    fn upcast(event_type: &str, stored_version: u32, data: Value) -> Result<Value, String> {
        let current = Self::schema_version(event_type);
        if stored_version == current {
            Ok(data)
        } else {
            Err(format!(
                "no upcaster for {event_type} from schema {stored_version} to {current}"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::summarize;

    #[test]
    fn summarize_makes_any_text_one_bounded_line() {
        assert_eq!(
            summarize("Your card was declined.\nPlease try another card.", 100),
            "Your card was declined. Please try another card."
        );
        assert_eq!(summarize("  \t a \r\n\u{0}\u{1b}[31m b  ", 100), "a [31m b");
        assert_eq!(summarize("pay\u{202E}lap\u{200B}", 100), "paylap");
        assert_eq!(summarize("", 10), "");
        assert_eq!(summarize("\n\n", 10), "");
        assert_eq!(summarize("abcdef", 6), "abcdef");
        assert_eq!(summarize("abcdefg", 6), "abcde…");
        assert_eq!(summarize("abcd efg", 6), "abcd…");
        assert_eq!(summarize("abc", 0), "");
        let huge = "é".repeat(100_000);
        let short = summarize(&huge, 300);
        assert_eq!(short.chars().count(), 300);
        assert!(short.ends_with('…'));
        let html = "<html>\n<body><h1>502 Bad Gateway</h1></body>\n</html>";
        assert_eq!(
            summarize(html, 500),
            "<html> <body><h1>502 Bad Gateway</h1></body> </html>"
        );
    }
}
