//! Stock commands: adjust, reserve (one product or several at once), release,
//! commit, and the expiry sweep.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use super::{CommandContext, CommandError, Commerce, ConflictCounter, Written, stream_append};
use crate::domain::DomainError;
use crate::domain::inventory::{Inventory, InventoryEvent, ReleaseReason, ReserveRequest};
use crate::domain::order::ReservedStock;
use crate::event_store::{AppendRequest, Position, StreamAppend};

pub type InventoryChange = Written<Inventory>;

/// A reservation that holds stock: new, or the owner's existing one.
#[derive(Debug, Clone, PartialEq)]
pub struct ReservationMade {
    pub reservation_id: Uuid,
    pub inventory: InventoryChange,
}

/// Longest a reservation may be held before it expires.
pub const MAX_RESERVATION_TTL: Duration = Duration::days(30);

fn expiry(now: DateTime<Utc>, ttl: Option<Duration>) -> Result<Option<DateTime<Utc>>, DomainError> {
    match ttl {
        None => Ok(None),
        Some(ttl) if ttl <= Duration::zero() || ttl > MAX_RESERVATION_TTL => Err(
            DomainError::invalid("ttlSeconds", "must be between 1 second and 30 days"),
        ),
        Some(ttl) => Ok(Some(now + ttl)),
    }
}

/// A planned multi-product reservation, not yet appended.
pub(super) struct ReservationPlan {
    pub streams: Vec<StreamAppend>,
    pub reservations: Vec<ReservedStock>,
}

impl Commerce {
    async fn require_product(&self, product_id: Uuid) -> Result<(), CommandError> {
        self.load_product(product_id).await.map(|_| ())
    }

    /// Restocks or writes off stock of an existing product.
    pub async fn adjust_inventory(
        &self,
        product_id: Uuid,
        delta: i64,
        reason: &str,
        expected_version: Option<u32>,
        context: &CommandContext,
    ) -> Result<InventoryChange, CommandError> {
        self.require_product(product_id).await?;
        self.decide_inventory(product_id, expected_version, context, |inventory| {
            inventory.adjust(product_id, delta, reason)
        })
        .await
    }

    /// Holds `quantity` units of one product for `owner`, optionally until
    /// `ttl` has passed. Repeating it for the same owner returns the same
    /// reservation.
    pub async fn reserve_inventory(
        &self,
        product_id: Uuid,
        owner: &str,
        quantity: u32,
        ttl: Option<Duration>,
        expected_version: Option<u32>,
        context: &CommandContext,
    ) -> Result<ReservationMade, CommandError> {
        self.require_product(product_id).await?;
        self.retrying(
            ConflictCounter::Inventory,
            expected_version.is_some(),
            || async {
                let loaded = self
                    .load_expecting::<Inventory>(Inventory::stream_id(product_id), expected_version)
                    .await?;
                let now = Utc::now();
                let request = ReserveRequest {
                    reservation_id: Uuid::now_v7(),
                    owner: owner.to_string(),
                    quantity,
                    expires_at: expiry(now, ttl)?,
                };
                let reserved = loaded.state.reserve(product_id, &request, now)?;
                if reserved.events.is_empty() {
                    return Ok(ReservationMade {
                        reservation_id: reserved.reservation_id,
                        inventory: Written::unchanged(product_id, loaded),
                    });
                }
                let outcome = self
                    .repository::<Inventory>()
                    .append(
                        Inventory::stream_id(product_id),
                        loaded.version,
                        &reserved.events,
                        context.metadata(),
                        None,
                    )
                    .await?;
                Ok(ReservationMade {
                    reservation_id: reserved.reservation_id,
                    inventory: Written::after(
                        product_id,
                        loaded,
                        &reserved.events,
                        outcome.last_position,
                    ),
                })
            },
        )
        .await
    }

    /// Plans reservations of several products for one owner, after adding up
    /// quantities per product. Nothing is written; the caller appends the
    /// streams (with any stream of its own) atomically, so either every
    /// product is reserved or none is.
    pub(super) async fn plan_reservations(
        &self,
        owner: &str,
        lines: &[(Uuid, u32)],
        ttl: Option<Duration>,
    ) -> Result<ReservationPlan, CommandError> {
        let mut per_product: BTreeMap<Uuid, u32> = BTreeMap::new();
        for (product_id, quantity) in lines {
            let total = per_product.entry(*product_id).or_default();
            *total = total
                .checked_add(*quantity)
                .ok_or_else(|| DomainError::invalid("quantity", "too large"))?;
        }
        let now = Utc::now();
        let expires_at = expiry(now, ttl)?;
        let mut plan = ReservationPlan {
            streams: Vec::with_capacity(per_product.len()),
            reservations: Vec::with_capacity(per_product.len()),
        };
        let streams: Vec<Uuid> = per_product
            .keys()
            .map(|&id| Inventory::stream_id(id))
            .collect();
        let stocks = self.repository::<Inventory>().load_many(&streams).await?;
        for ((product_id, quantity), loaded) in per_product.into_iter().zip(stocks) {
            let request = ReserveRequest {
                reservation_id: Uuid::now_v7(),
                owner: owner.to_string(),
                quantity,
                expires_at,
            };
            let reserved = loaded.state.reserve(product_id, &request, now)?;
            if !reserved.events.is_empty() {
                plan.streams.push(stream_append::<Inventory>(
                    Inventory::stream_id(product_id),
                    loaded.version,
                    &reserved.events,
                )?);
            }
            plan.reservations.push(ReservedStock {
                product_id,
                reservation_id: reserved.reservation_id,
                quantity,
            });
        }
        Ok(plan)
    }

    /// Reserves several products for one owner, all or nothing. Lines naming
    /// the same product are added up into one reservation.
    pub async fn reserve_all(
        &self,
        owner: &str,
        lines: &[(Uuid, u32)],
        ttl: Option<Duration>,
        context: &CommandContext,
    ) -> Result<(Vec<ReservedStock>, Option<Position>), CommandError> {
        if lines.is_empty() {
            return Err(DomainError::invalid("lines", "nothing to reserve").into());
        }
        self.retrying(ConflictCounter::Inventory, false, || async {
            let plan = self.plan_reservations(owner, lines, ttl).await?;
            if plan.streams.is_empty() {
                return Ok((plan.reservations, None));
            }
            let request = AppendRequest {
                streams: plan.streams,
                metadata: context.metadata(),
                idempotency_key: None,
            };
            let outcome = self.store.append(request).await?;
            Ok((plan.reservations, Some(outcome.last_position)))
        })
        .await
    }

    /// Gives a reservation's stock back. The product is found through the
    /// reservation read model.
    pub async fn release_reservation(
        &self,
        reservation_id: Uuid,
        context: &CommandContext,
    ) -> Result<InventoryChange, CommandError> {
        let Some(reservation) = self.views.reservation(reservation_id).await? else {
            return Err(DomainError::ReservationNotFound { reservation_id }.into());
        };
        self.decide_inventory(reservation.product_id, None, context, |inventory| {
            inventory.release(
                reservation.product_id,
                reservation_id,
                ReleaseReason::Released,
            )
        })
        .await
    }

    /// Turns a reservation into a sale.
    pub async fn commit_reservation(
        &self,
        product_id: Uuid,
        reservation_id: Uuid,
        context: &CommandContext,
    ) -> Result<InventoryChange, CommandError> {
        self.decide_inventory(product_id, None, context, |inventory| {
            inventory.commit(product_id, reservation_id)
        })
        .await
    }

    /// Loads a product's inventory, lets `decide` produce events and appends
    /// them; retried on conflicts unless the caller expects a version.
    pub(super) async fn decide_inventory<F>(
        &self,
        product_id: Uuid,
        expected_version: Option<u32>,
        context: &CommandContext,
        decide: F,
    ) -> Result<InventoryChange, CommandError>
    where
        F: Fn(&Inventory) -> Result<Vec<InventoryEvent>, DomainError>,
    {
        let stream = Inventory::stream_id(product_id);
        self.retrying(
            ConflictCounter::Inventory,
            expected_version.is_some(),
            || async {
                let loaded = self
                    .load_expecting::<Inventory>(stream, expected_version)
                    .await?;
                let events = decide(&loaded.state)?;
                let outcome = self
                    .repository::<Inventory>()
                    .append(
                        Inventory::stream_id(product_id),
                        loaded.version,
                        &events,
                        context.metadata(),
                        None,
                    )
                    .await?;
                Ok(Written::after(
                    product_id,
                    loaded,
                    &events,
                    outcome.last_position,
                ))
            },
        )
        .await
    }

    /// Releases reservations whose expiry has passed at `now`, found through
    /// the reservation read model (at most `limit` of them per call). Returns
    /// how many were released. Safe to run in several processes at once: an
    /// expiry is decided on the stream, so it is written once.
    pub async fn expire_reservations(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<usize, CommandError> {
        let due = self.views.expired_reservations(now, limit).await?;
        let mut products: Vec<Uuid> = due.iter().map(|r| r.product_id).collect();
        products.sort_unstable();
        products.dedup();
        let context = CommandContext {
            actor: Some("kernel:reservation-expiry".into()),
            correlation_id: None,
        };
        let mut released = 0;
        for product_id in products {
            let count = self
                .retrying(ConflictCounter::Inventory, false, || async {
                    let loaded = self
                        .repository::<Inventory>()
                        .load(Inventory::stream_id(product_id))
                        .await?;
                    let events = loaded.state.expire(product_id, now);
                    if events.is_empty() {
                        return Ok(0);
                    }
                    self.repository::<Inventory>()
                        .append(
                            Inventory::stream_id(product_id),
                            loaded.version,
                            &events,
                            context.metadata(),
                            None,
                        )
                        .await?;
                    Ok(events.len())
                })
                .await?;
            released += count;
        }
        Ok(released)
    }
}
