//! Guest sessions: a shop without an identity provider still sells to
//! shoppers who never sign up. `createGuestSession` (open to requests
//! without a token, see [`super::access::AnonymousAccess`]) hands out a
//! short-lived customer token for a new customer id; with it a guest
//! creates a cart, checks out and watches the order like any customer, and
//! sees nothing of other guests. The order belongs to the session's
//! customer id.
//!
//! Each client address may start a bounded number of sessions per minute
//! (`COMMERCE_GUEST_SESSIONS_PER_MINUTE`; an IPv6 client counts as its /64),
//! counted by each kernel process on its own: behind a load balancer over N
//! processes a client may start up to N times as many.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use async_graphql::{Context, Object, SimpleObject};
use chrono::{DateTime, Utc};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use uuid::Uuid;

use super::ApiError;
use super::error::{ErrorCode, UserError};
use crate::auth::Authenticator;
use crate::config::GuestSessionConfig;

/// Client addresses the limiter remembers before it forgets those whose
/// minute has passed.
const TRACKED_ADDRESSES: usize = 10_000;
/// How many checks apart the limiter looks for addresses to forget.
const FORGET_EVERY: u64 = 1_024;

/// The address a request came from: the connection's peer, or the last
/// address a trusted proxy appended to `X-Forwarded-For`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddress(pub IpAddr);

/// Hands out guest sessions, within the per-address rate.
pub struct GuestSessions {
    /// `None` when guest sessions are off.
    on: Option<GuestSessionsOn>,
}

struct GuestSessionsOn {
    auth: Authenticator,
    config: GuestSessionConfig,
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    /// Checks so far, to forget stale addresses now and then rather than
    /// scanning the table on every request.
    checks: AtomicU64,
}

impl GuestSessions {
    /// Guest sessions signed by `auth`, or none when `config` is `None` or
    /// `auth` cannot sign them (an identity provider signs the tokens and
    /// no guest secret is set; logged).
    pub fn new(auth: Authenticator, config: Option<GuestSessionConfig>) -> Self {
        let Some(config) = config else {
            return Self::off();
        };
        if !auth.signs_guest_sessions() {
            tracing::warn!(
                "guest sessions are off: tokens come from COMMERCE_JWKS_URL and \
                 COMMERCE_GUEST_TOKEN_SECRET is not set"
            );
            return Self::off();
        }
        let per_minute = NonZeroU32::new(config.per_minute).unwrap_or(NonZeroU32::MIN);
        GuestSessions {
            on: Some(GuestSessionsOn {
                auth,
                config,
                limiter: RateLimiter::keyed(Quota::per_minute(per_minute)),
                checks: AtomicU64::new(0),
            }),
        }
    }

    /// No guest sessions: `createGuestSession` is refused.
    pub fn off() -> Self {
        GuestSessions { on: None }
    }
}

impl GuestSessionsOn {
    /// Whether `client` may start another session now.
    fn admit(&self, client: IpAddr) -> bool {
        let checks = self.checks.fetch_add(1, Ordering::Relaxed);
        if checks.is_multiple_of(FORGET_EVERY) && self.limiter.len() > TRACKED_ADDRESSES {
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&client).is_ok()
    }
}

/// A guest's session.
#[derive(SimpleObject)]
pub struct GuestSession {
    /// The bearer token: `Authorization: Bearer <token>` on requests, or
    /// `{"authorization": "Bearer <token>"}` in a subscription's
    /// `connection_init`.
    pub token: String,
    /// The guest's customer id: their carts and orders carry it.
    pub customer_id: Uuid,
    /// When the token stops working. A guest who comes back later starts a
    /// new session (and does not see the old one's orders).
    pub expires_at: DateTime<Utc>,
}

/// What `createGuestSession` answers.
#[derive(SimpleObject)]
pub struct CreateGuestSessionPayload {
    /// The new session; null when refused.
    pub session: Option<GuestSession>,
    /// `RATE_LIMITED` when this address started too many sessions in the
    /// last minute.
    pub errors: Vec<UserError>,
}

/// The guest-session mutation.
#[derive(Default)]
pub struct GuestMutation;

#[Object]
impl GuestMutation {
    /// Starts a guest session for a new customer, without an identity
    /// provider: no token needed. Refused (`FORBIDDEN`) where guest
    /// sessions are turned off.
    async fn create_guest_session(
        &self,
        ctx: &Context<'_>,
    ) -> Result<CreateGuestSessionPayload, ApiError> {
        let Some(sessions) = &ctx.data_unchecked::<GuestSessions>().on else {
            return Err(ApiError::Refused(UserError::new(
                ErrorCode::Forbidden,
                None,
                "guest sessions are turned off on this kernel",
            )));
        };
        // A request always carries its address (the server puts it there);
        // a schema run without one counts as one unknown client.
        let client = ctx
            .data_opt::<ClientAddress>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |address| address.0);
        if !sessions.admit(client) {
            return Ok(CreateGuestSessionPayload {
                session: None,
                errors: vec![UserError::new(
                    ErrorCode::RateLimited,
                    None,
                    format!(
                        "this address started {} guest sessions in the last minute; try again shortly",
                        sessions.config.per_minute
                    ),
                )],
            });
        }
        let minted = sessions
            .auth
            .mint_guest(sessions.config.ttl)
            .map_err(|error| {
                ApiError::Refused(UserError::new(
                    ErrorCode::Forbidden,
                    None,
                    error.to_string(),
                ))
            })?;
        Ok(CreateGuestSessionPayload {
            session: Some(GuestSession {
                token: minted.token,
                customer_id: minted.customer_id,
                expires_at: minted.expires_at,
            }),
            errors: Vec::new(),
        })
    }
}
