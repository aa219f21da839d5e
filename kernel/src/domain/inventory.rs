//! Inventory: one aggregate per product, holding stock and reservations.
//!
//! `available = on_hand - reserved`, and `reserved` is always the sum of the
//! live reservations. A reservation holds stock for an owner (an order, a
//! cart) until it is released, committed (the sale happened: on hand and
//! reserved drop together) or expires. Expiry is an event like any other: the
//! kernel's sweeper appends it, and every reservation first expires whatever
//! is due, so held stock comes back even before the sweeper runs.
//!
//! Commands are checked against the state they were decided on; the caller
//! appends their events at that state's version, so two commands decided on
//! the same version cannot both be stored. That is what makes overselling
//! impossible.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Aggregate, DomainError, DomainEvent, clean_text};

/// Most units one reservation may hold.
pub const MAX_RESERVATION_QUANTITY: u32 = 1_000_000;
/// Largest change one adjustment may make, either way.
pub const MAX_ADJUSTMENT: i64 = 1_000_000_000;
/// Longest owner or reason text, in characters.
pub const MAX_TEXT_CHARS: usize = 200;

/// Why a reservation ended without a sale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReleaseReason {
    /// Its owner gave it back (a cart emptied, an order compensated).
    Released,
    /// Its expiry time passed.
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum InventoryEvent {
    StockAdjusted {
        product_id: Uuid,
        delta: i64,
        reason: String,
    },
    StockReserved {
        product_id: Uuid,
        reservation_id: Uuid,
        owner: String,
        quantity: u32,
        expires_at: Option<DateTime<Utc>>,
    },
    ReservationReleased {
        product_id: Uuid,
        reservation_id: Uuid,
        quantity: u32,
        reason: ReleaseReason,
    },
    ReservationCommitted {
        product_id: Uuid,
        reservation_id: Uuid,
        quantity: u32,
    },
}

impl DomainEvent for InventoryEvent {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub owner: String,
    pub quantity: u32,
    pub expires_at: Option<DateTime<Utc>>,
}

impl Reservation {
    fn is_due(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// Stock of one product.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    pub on_hand: u32,
    pub reserved: u32,
    pub reservations: BTreeMap<Uuid, Reservation>,
}

/// A request to hold stock for an owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveRequest {
    /// Used if a new reservation is made; ignored if the owner already holds one.
    pub reservation_id: Uuid,
    pub owner: String,
    pub quantity: u32,
    pub expires_at: Option<DateTime<Utc>>,
}

/// The outcome of a reservation command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    /// The reservation that holds the stock: new, or the owner's existing one.
    pub reservation_id: Uuid,
    /// Empty when the owner already held this reservation.
    pub events: Vec<InventoryEvent>,
}

impl Aggregate for Inventory {
    const AGGREGATE_TYPE: &'static str = "inventory";
    type Event = InventoryEvent;

    // Commands only emit events that keep the invariants; saturating
    // arithmetic keeps `apply` total even for a stream that was tampered with.
    fn apply(&mut self, event: &InventoryEvent) {
        match event {
            InventoryEvent::StockAdjusted { delta, .. } => {
                let on_hand = i64::from(self.on_hand).saturating_add(*delta);
                self.on_hand = u32::try_from(on_hand.max(0)).unwrap_or(u32::MAX);
            }
            InventoryEvent::StockReserved {
                reservation_id,
                owner,
                quantity,
                expires_at,
                ..
            } => {
                self.reserved = self.reserved.saturating_add(*quantity);
                self.reservations.insert(
                    *reservation_id,
                    Reservation {
                        owner: owner.clone(),
                        quantity: *quantity,
                        expires_at: *expires_at,
                    },
                );
            }
            InventoryEvent::ReservationReleased { reservation_id, .. } => {
                if let Some(reservation) = self.reservations.remove(reservation_id) {
                    self.reserved = self.reserved.saturating_sub(reservation.quantity);
                }
            }
            InventoryEvent::ReservationCommitted { reservation_id, .. } => {
                if let Some(reservation) = self.reservations.remove(reservation_id) {
                    self.reserved = self.reserved.saturating_sub(reservation.quantity);
                    self.on_hand = self.on_hand.saturating_sub(reservation.quantity);
                }
            }
        }
    }
}

/// Namespace of the name-based UUIDs of inventory streams.
const INVENTORY_NAMESPACE: Uuid = Uuid::from_u128(0x2b8e_51d4_0c6f_4a97_8e13_d5a0_7f62_c4e9);

impl Inventory {
    /// The inventory stream of a product. It cannot be the product's own id:
    /// a stream id names one aggregate, and the product's stream is the catalog's.
    pub fn stream_id(product_id: Uuid) -> Uuid {
        Uuid::new_v5(&INVENTORY_NAMESPACE, product_id.as_bytes())
    }

    pub fn available(&self) -> u32 {
        self.on_hand.saturating_sub(self.reserved)
    }

    /// Releases every reservation whose expiry has passed at `now`.
    pub fn expire(&self, product_id: Uuid, now: DateTime<Utc>) -> Vec<InventoryEvent> {
        self.reservations
            .iter()
            .filter(|(_, reservation)| reservation.is_due(now))
            .map(|(id, reservation)| InventoryEvent::ReservationReleased {
                product_id,
                reservation_id: *id,
                quantity: reservation.quantity,
                reason: ReleaseReason::Expired,
            })
            .collect()
    }

    /// Restocks (`delta > 0`) or writes off (`delta < 0`) stock. On hand can
    /// never drop below what is reserved.
    pub fn adjust(
        &self,
        product_id: Uuid,
        delta: i64,
        reason: &str,
    ) -> Result<Vec<InventoryEvent>, DomainError> {
        if delta == 0 || delta.abs() > MAX_ADJUSTMENT {
            return Err(DomainError::invalid(
                "delta",
                format!("must be non-zero and at most {MAX_ADJUSTMENT} either way"),
            ));
        }
        let reason = clean_text("reason", reason, MAX_TEXT_CHARS)?;
        let on_hand = i64::from(self.on_hand) + delta;
        if on_hand < i64::from(self.reserved) {
            return Err(DomainError::StockBelowReserved {
                product_id,
                reserved: self.reserved,
            });
        }
        if on_hand > i64::from(u32::MAX) {
            return Err(DomainError::invalid("delta", "on hand would overflow"));
        }
        Ok(vec![InventoryEvent::StockAdjusted {
            product_id,
            delta,
            reason,
        }])
    }

    /// Holds `quantity` units for an owner, after expiring what is due.
    ///
    /// Idempotent per owner: if the owner already holds a live reservation of
    /// the same quantity, that one is returned and nothing is written. A
    /// different quantity is refused; release the old reservation first.
    pub fn reserve(
        &self,
        product_id: Uuid,
        request: &ReserveRequest,
        now: DateTime<Utc>,
    ) -> Result<Reserved, DomainError> {
        if request.quantity == 0 || request.quantity > MAX_RESERVATION_QUANTITY {
            return Err(DomainError::invalid(
                "quantity",
                format!("must be 1 to {MAX_RESERVATION_QUANTITY}"),
            ));
        }
        let owner = clean_text("owner", &request.owner, MAX_TEXT_CHARS)?;
        if request.expires_at.is_some_and(|at| at <= now) {
            return Err(DomainError::invalid("expiresAt", "must be in the future"));
        }

        let existing = self
            .reservations
            .iter()
            .find(|(_, r)| r.owner == owner && !r.is_due(now));
        if let Some((id, reservation)) = existing {
            if reservation.quantity == request.quantity {
                return Ok(Reserved {
                    reservation_id: *id,
                    events: Vec::new(),
                });
            }
            return Err(DomainError::ReservationMismatch {
                owner,
                reservation_id: *id,
                quantity: reservation.quantity,
            });
        }
        if self.reservations.contains_key(&request.reservation_id) {
            return Err(DomainError::AlreadyExists {
                kind: "reservation",
                id: request.reservation_id,
            });
        }

        let mut events = self.expire(product_id, now);
        let mut after_expiry = self.clone();
        for event in &events {
            after_expiry.apply(event);
        }
        if after_expiry.available() < request.quantity {
            return Err(DomainError::InsufficientStock {
                product_id,
                requested: request.quantity,
                available: after_expiry.available(),
            });
        }
        events.push(InventoryEvent::StockReserved {
            product_id,
            reservation_id: request.reservation_id,
            owner,
            quantity: request.quantity,
            expires_at: request.expires_at,
        });
        Ok(Reserved {
            reservation_id: request.reservation_id,
            events,
        })
    }

    /// Gives a reservation's stock back.
    pub fn release(
        &self,
        product_id: Uuid,
        reservation_id: Uuid,
        reason: ReleaseReason,
    ) -> Result<Vec<InventoryEvent>, DomainError> {
        let Some(reservation) = self.reservations.get(&reservation_id) else {
            return Err(DomainError::ReservationNotFound { reservation_id });
        };
        Ok(vec![InventoryEvent::ReservationReleased {
            product_id,
            reservation_id,
            quantity: reservation.quantity,
            reason,
        }])
    }

    /// Turns a reservation into a sale: on hand and reserved drop together.
    pub fn commit(
        &self,
        product_id: Uuid,
        reservation_id: Uuid,
    ) -> Result<Vec<InventoryEvent>, DomainError> {
        let Some(reservation) = self.reservations.get(&reservation_id) else {
            return Err(DomainError::ReservationNotFound { reservation_id });
        };
        Ok(vec![InventoryEvent::ReservationCommitted {
            product_id,
            reservation_id,
            quantity: reservation.quantity,
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;
    use proptest::prelude::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).expect("valid time")
    }

    fn applied(mut inventory: Inventory, events: &[InventoryEvent]) -> Inventory {
        for event in events {
            inventory.apply(event);
        }
        inventory
    }

    fn request(owner: &str, quantity: u32, expires_at: Option<DateTime<Utc>>) -> ReserveRequest {
        ReserveRequest {
            reservation_id: Uuid::now_v7(),
            owner: owner.into(),
            quantity,
            expires_at,
        }
    }

    fn stocked(on_hand: i64) -> Inventory {
        let product = Uuid::now_v7();
        let events = Inventory::default()
            .adjust(product, on_hand, "restock")
            .expect("valid");
        applied(Inventory::default(), &events)
    }

    #[test]
    fn reservations_cannot_exceed_available_stock() {
        let product = Uuid::now_v7();
        let inventory = stocked(3);
        let first = inventory
            .reserve(product, &request("order-1", 2, None), at(0))
            .expect("enough stock");
        let inventory = applied(inventory, &first.events);
        assert_eq!((inventory.reserved, inventory.available()), (2, 1));
        assert_eq!(
            inventory.reserve(product, &request("order-2", 2, None), at(0)),
            Err(DomainError::InsufficientStock {
                product_id: product,
                requested: 2,
                available: 1
            })
        );
    }

    #[test]
    fn reserving_twice_for_one_owner_is_idempotent() {
        let product = Uuid::now_v7();
        let inventory = stocked(5);
        let first = inventory
            .reserve(product, &request("cart-7", 2, None), at(0))
            .expect("reserves");
        let inventory = applied(inventory, &first.events);
        let again = inventory
            .reserve(product, &request("cart-7", 2, None), at(1))
            .expect("idempotent");
        assert_eq!(again.reservation_id, first.reservation_id);
        assert!(again.events.is_empty());
        assert!(matches!(
            inventory.reserve(product, &request("cart-7", 3, None), at(1)),
            Err(DomainError::ReservationMismatch { quantity: 2, .. })
        ));
    }

    #[test]
    fn expired_reservations_give_stock_back() {
        let product = Uuid::now_v7();
        let inventory = stocked(1);
        let held = inventory
            .reserve(product, &request("cart-1", 1, Some(at(60))), at(0))
            .expect("reserves");
        let inventory = applied(inventory, &held.events);
        assert!(inventory.expire(product, at(59)).is_empty());
        assert_eq!(inventory.expire(product, at(60)).len(), 1);
        // A new buyer after the expiry gets the unit; the expiry is part of the command.
        let next = inventory
            .reserve(product, &request("cart-2", 1, None), at(61))
            .expect("expired stock is available");
        assert_eq!(
            next.events[0],
            InventoryEvent::ReservationReleased {
                product_id: product,
                reservation_id: held.reservation_id,
                quantity: 1,
                reason: ReleaseReason::Expired
            }
        );
        assert!(
            inventory
                .reserve(product, &request("cart-3", 1, Some(at(0))), at(10))
                .is_err(),
            "an expiry in the past is refused"
        );
    }

    #[test]
    fn commit_lowers_on_hand_and_reserved_together() {
        let product = Uuid::now_v7();
        let inventory = stocked(4);
        let held = inventory
            .reserve(product, &request("order-1", 3, None), at(0))
            .expect("reserves");
        let inventory = applied(inventory, &held.events);
        let sold = applied(
            inventory.clone(),
            &inventory
                .commit(product, held.reservation_id)
                .expect("commits"),
        );
        assert_eq!((sold.on_hand, sold.reserved, sold.available()), (1, 0, 1));
        assert!(matches!(
            sold.commit(product, held.reservation_id),
            Err(DomainError::ReservationNotFound { .. })
        ));
        assert_eq!(
            sold.adjust(product, -2, "damaged"),
            Err(DomainError::StockBelowReserved {
                product_id: product,
                reserved: 0
            })
        );
    }

    #[test]
    fn adjustments_never_undercut_reservations() {
        let product = Uuid::now_v7();
        let inventory = stocked(5);
        let held = inventory
            .reserve(product, &request("order-1", 4, None), at(0))
            .expect("reserves");
        let inventory = applied(inventory, &held.events);
        assert_eq!(
            inventory.adjust(product, -2, "damaged"),
            Err(DomainError::StockBelowReserved {
                product_id: product,
                reserved: 4
            })
        );
        assert!(inventory.adjust(product, -1, "damaged").is_ok());
        assert!(inventory.adjust(product, 0, "nothing").is_err());
        assert!(inventory.adjust(product, 1, " ").is_err());
    }

    #[derive(Debug, Clone)]
    enum Command {
        Adjust(i64),
        Reserve {
            owner: u8,
            quantity: u32,
            ttl: Option<i64>,
        },
        Release(usize),
        Commit(usize),
        Expire,
        Wait(i64),
    }

    fn command() -> impl Strategy<Value = Command> {
        prop_oneof![
            (-20i64..40).prop_map(Command::Adjust),
            (0u8..6, 0u32..12, proptest::option::of(1i64..100)).prop_map(
                |(owner, quantity, ttl)| Command::Reserve {
                    owner,
                    quantity,
                    ttl
                }
            ),
            (0usize..8).prop_map(Command::Release),
            (0usize..8).prop_map(Command::Commit),
            Just(Command::Expire),
            (1i64..80).prop_map(Command::Wait),
        ]
    }

    proptest! {
        /// Whatever commands arrive, in any order, the state keeps its
        /// invariants and replaying the emitted events rebuilds it exactly.
        #[test]
        fn invariants_hold_for_any_command_sequence(commands in proptest::collection::vec(command(), 1..80)) {
            let product = Uuid::now_v7();
            let mut now = at(0);
            let mut state = Inventory::default();
            let mut log: Vec<InventoryEvent> = Vec::new();
            for command in commands {
                let ids: Vec<Uuid> = state.reservations.keys().copied().collect();
                let pick = |i: usize| ids.get(i % ids.len().max(1)).copied().unwrap_or_else(Uuid::now_v7);
                let decided = match command {
                    Command::Adjust(delta) => state.adjust(product, delta, "count"),
                    Command::Reserve { owner, quantity, ttl } => state
                        .reserve(
                            product,
                            &request(&format!("owner-{owner}"), quantity, ttl.map(|s| now + Duration::seconds(s))),
                            now,
                        )
                        .map(|reserved| reserved.events),
                    Command::Release(i) => state.release(product, pick(i), ReleaseReason::Released),
                    Command::Commit(i) => state.commit(product, pick(i)),
                    Command::Expire => Ok(state.expire(product, now)),
                    Command::Wait(seconds) => {
                        now += Duration::seconds(seconds);
                        Ok(Vec::new())
                    }
                };
                // A refused command writes nothing, so only accepted events count.
                if let Ok(events) = decided {
                    for event in &events {
                        state.apply(event);
                    }
                    log.extend(events);
                }
                prop_assert!(state.on_hand >= state.reserved, "available below zero: {state:?}");
                let live: u32 = state.reservations.values().map(|r| r.quantity).sum();
                prop_assert_eq!(state.reserved, live);
                let mut owners: Vec<&str> = state
                    .reservations
                    .values()
                    .filter(|r| !r.is_due(now))
                    .map(|r| r.owner.as_str())
                    .collect();
                let count = owners.len();
                owners.sort_unstable();
                owners.dedup();
                prop_assert_eq!(owners.len(), count, "an owner holds two live reservations");
            }
            prop_assert_eq!(applied(Inventory::default(), &log), state);
        }
    }
}
