//! The Redis cart store: shared by every kernel process, carts expire by TTL.
//!
//! Keys, under a configurable prefix `P`:
//! - `P:cart:<id>`: a hash of the cart's metadata (version, owner, status,
//!   currency, order, timestamps in microseconds);
//! - `P:cart:<id>:lines`: a hash of product id to quantity (absent when empty);
//! - `P:cart-activity`: a stream of [`CartActivity`] entries, read by the
//!   consumer group `recorders`.
//!
//! Every write is one Lua script ([`SWAP_SCRIPT`]): it compares the stored
//! version, replaces both hashes, sets their TTL and appends the activity
//! entry, so a write is all of that or nothing, and costs one round trip.
//! The script touches a shared stream key, so it needs one Redis server (or a
//! primary with replicas), not Redis Cluster.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{RedisError, Script};
use uuid::Uuid;

use super::{CartActivity, CartStore, CartStoreError, QueuedActivity, Swap};
use crate::domain::cart::{Cart, CartOwner, CartStatus};
use crate::domain::money::Currency;

/// Loads both hashes in one atomic step, so a cart is never read half-written.
const LOAD_SCRIPT: &str = r"
local meta = redis.call('HGETALL', KEYS[1])
if #meta == 0 then return {} end
return {meta, redis.call('HGETALL', KEYS[2])}
";

/// KEYS: meta, lines, activity stream.
/// ARGV: expected version, TTL in ms, activity JSON, number of metadata
/// pairs, the metadata pairs, then the line pairs.
/// Returns -1 when written, else the stored version (0: no cart).
const SWAP_SCRIPT: &str = r"
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if stored ~= tonumber(ARGV[1]) then return stored end
redis.call('DEL', KEYS[1], KEYS[2])
local meta_end = 4 + 2 * tonumber(ARGV[4])
redis.call('HSET', KEYS[1], unpack(ARGV, 5, meta_end))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if #ARGV > meta_end then
  redis.call('HSET', KEYS[2], unpack(ARGV, meta_end + 1, #ARGV))
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
redis.call('XADD', KEYS[3], '*', 'activity', ARGV[3])
return -1
";

/// The consumer group of activity recorders.
const RECORDERS: &str = "recorders";
/// An entry handed to a recorder that has not acknowledged it for this long
/// is handed to another (the first one died or failed to record it).
const RECLAIM_AFTER: Duration = Duration::from_secs(30);
/// Longest a command waits for Redis.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct RedisCartStore {
    connection: ConnectionManager,
    prefix: String,
    activity_key: String,
    /// This process's name in the consumer group.
    consumer: String,
    load_script: Script,
    swap_script: Script,
}

fn unavailable(error: RedisError) -> CartStoreError {
    CartStoreError::Unavailable(error.to_string())
}

impl RedisCartStore {
    /// Connects (failing if Redis cannot be reached now; reconnecting by
    /// itself later) and makes sure the activity consumer group exists.
    pub async fn connect(url: &str, key_prefix: &str) -> Result<Self, CartStoreError> {
        let client = redis::Client::open(url).map_err(|e| {
            CartStoreError::Unavailable(format!("not a usable Redis URL ({:?})", e.kind()))
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(3);
        let connection = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(unavailable)?;
        let store = RedisCartStore {
            connection,
            prefix: key_prefix.to_string(),
            activity_key: format!("{key_prefix}cart-activity"),
            consumer: format!("kernel-{}", Uuid::now_v7().simple()),
            load_script: Script::new(LOAD_SCRIPT),
            swap_script: Script::new(SWAP_SCRIPT),
        };
        store.create_group().await?;
        Ok(store)
    }

    fn meta_key(&self, id: Uuid) -> String {
        format!("{}cart:{id}", self.prefix)
    }

    fn lines_key(&self, id: Uuid) -> String {
        format!("{}cart:{id}:lines", self.prefix)
    }

    async fn create_group(&self) -> Result<(), CartStoreError> {
        let created: Result<(), RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.activity_key)
            .arg(RECORDERS)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.connection.clone())
            .await;
        match created {
            Err(error) if error.code() != Some("BUSYGROUP") => Err(unavailable(error)),
            _ => Ok(()),
        }
    }

    async fn read_activity(&self, max: usize) -> Result<Vec<StreamId>, RedisError> {
        let mut connection = self.connection.clone();
        let reclaimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&self.activity_key)
            .arg(RECORDERS)
            .arg(&self.consumer)
            .arg(RECLAIM_AFTER.as_millis() as u64)
            .arg("0")
            .arg("COUNT")
            .arg(max)
            .query_async(&mut connection)
            .await?;
        let mut entries = reclaimed.claimed;
        if entries.len() < max {
            let fresh: Option<StreamReadReply> = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(RECORDERS)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(max - entries.len())
                .arg("STREAMS")
                .arg(&self.activity_key)
                .arg(">")
                .query_async(&mut connection)
                .await?;
            entries.extend(fresh.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids));
        }
        Ok(entries)
    }
}

#[async_trait]
impl CartStore for RedisCartStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn load(&self, id: Uuid, _now: DateTime<Utc>) -> Result<Option<Cart>, CartStoreError> {
        let reply: Vec<Vec<String>> = self
            .load_script
            .key(self.meta_key(id))
            .key(self.lines_key(id))
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(unavailable)?;
        match reply.as_slice() {
            [] => Ok(None),
            [meta, lines] => decode_cart(id, meta, lines).map(Some),
            _ => Err(CartStoreError::Corrupt(format!(
                "cart {id}: unexpected reply shape"
            ))),
        }
    }

    async fn swap(
        &self,
        cart: &Cart,
        expected_version: u32,
        now: DateTime<Utc>,
    ) -> Result<Swap, CartStoreError> {
        let ttl_ms = (cart.expires_at - now).num_milliseconds().max(1);
        let activity = serde_json::to_string(&CartActivity::of(cart))
            .map_err(|e| CartStoreError::Corrupt(e.to_string()))?;
        let meta = encode_meta(cart);
        let mut invocation = self.swap_script.prepare_invoke();
        invocation
            .key(self.meta_key(cart.id))
            .key(self.lines_key(cart.id))
            .key(&self.activity_key)
            .arg(expected_version)
            .arg(ttl_ms)
            .arg(activity)
            .arg(meta.len());
        for (field, value) in &meta {
            invocation.arg(*field).arg(value);
        }
        for (product_id, quantity) in &cart.lines {
            invocation.arg(product_id.to_string()).arg(*quantity);
        }
        let stored: i64 = invocation
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(unavailable)?;
        if stored < 0 {
            Ok(Swap::Written)
        } else {
            Ok(Swap::Conflict {
                actual: u32::try_from(stored).unwrap_or(u32::MAX),
            })
        }
    }

    async fn queued_activity(&self, max: usize) -> Result<Vec<QueuedActivity>, CartStoreError> {
        let entries = match self.read_activity(max).await {
            // The stream or its group was deleted (say, by FLUSHALL): start over.
            Err(error) if error.code() == Some("NOGROUP") => {
                self.create_group().await?;
                self.read_activity(max).await
            }
            other => other,
        }
        .map_err(unavailable)?;
        let mut queued = Vec::with_capacity(entries.len());
        let mut unreadable = Vec::new();
        for entry in entries {
            let parsed = entry
                .get::<String>("activity")
                .ok_or_else(|| "no activity field".to_string())
                .and_then(|json| serde_json::from_str(&json).map_err(|e| e.to_string()));
            match parsed {
                Ok(activity) => queued.push(QueuedActivity {
                    token: entry.id,
                    activity,
                }),
                Err(reason) => {
                    // Never written by this store; left queued it would come
                    // back forever and hold up the entries behind it.
                    tracing::error!(id = %entry.id, %reason, "dropping an unreadable cart activity entry");
                    unreadable.push(entry.id);
                }
            }
        }
        self.acknowledge_activity(&unreadable).await?;
        Ok(queued)
    }

    async fn acknowledge_activity(&self, tokens: &[String]) -> Result<(), CartStoreError> {
        if tokens.is_empty() {
            return Ok(());
        }
        redis::pipe()
            .cmd("XACK")
            .arg(&self.activity_key)
            .arg(RECORDERS)
            .arg(tokens)
            .ignore()
            .cmd("XDEL")
            .arg(&self.activity_key)
            .arg(tokens)
            .ignore()
            .query_async::<()>(&mut self.connection.clone())
            .await
            .map_err(unavailable)
    }

    async fn ping(&self) -> Result<(), CartStoreError> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.connection.clone())
            .await
            .map(|_| ())
            .map_err(unavailable)
    }
}

fn micros(time: DateTime<Utc>) -> String {
    time.timestamp_micros().to_string()
}

fn encode_meta(cart: &Cart) -> Vec<(&'static str, String)> {
    let (owner_kind, owner_id) = match &cart.owner {
        CartOwner::Customer(id) => ("customer", id.to_string()),
        CartOwner::Session(session) => ("session", session.clone()),
    };
    let mut meta = vec![
        ("version", cart.version.to_string()),
        ("owner_kind", owner_kind.to_string()),
        ("owner_id", owner_id),
        ("status", cart.status.as_str().to_string()),
        ("created_at", micros(cart.created_at)),
        ("updated_at", micros(cart.updated_at)),
        ("expires_at", micros(cart.expires_at)),
    ];
    if let Some(currency) = cart.currency {
        meta.push(("currency", currency.code().to_string()));
    }
    if let Some(currency) = cart.requested_currency {
        meta.push(("requested_currency", currency.code().to_string()));
    }
    if let Some(order_id) = cart.order_id {
        meta.push(("order_id", order_id.to_string()));
    }
    if let Some(started) = cart.checkout_started_at {
        meta.push(("checkout_started_at", micros(started)));
    }
    meta
}

fn decode_cart(id: Uuid, meta: &[String], lines: &[String]) -> Result<Cart, CartStoreError> {
    let corrupt = |what: &str| CartStoreError::Corrupt(format!("cart {id}: {what}"));
    let fields: BTreeMap<&str, &str> = meta
        .chunks_exact(2)
        .map(|pair| (pair[0].as_str(), pair[1].as_str()))
        .collect();
    let field = |name: &str| fields.get(name).copied().ok_or_else(|| corrupt(name));
    let optional = |name: &str| fields.get(name).copied();
    let time = |text: &str| {
        text.parse::<i64>()
            .ok()
            .and_then(DateTime::from_timestamp_micros)
            .ok_or_else(|| corrupt("timestamp"))
    };
    let currency = |text: Option<&str>| {
        text.map(|code| Currency::parse(code).map_err(|_| corrupt("currency")))
            .transpose()
    };
    let owner = match field("owner_kind")? {
        "customer" => CartOwner::Customer(
            Uuid::from_str(field("owner_id")?).map_err(|_| corrupt("owner_id"))?,
        ),
        "session" => CartOwner::Session(field("owner_id")?.to_string()),
        _ => return Err(corrupt("owner_kind")),
    };
    let mut cart_lines = BTreeMap::new();
    for pair in lines.chunks_exact(2) {
        let product_id = Uuid::from_str(&pair[0]).map_err(|_| corrupt("line product"))?;
        let quantity = pair[1]
            .parse::<u32>()
            .map_err(|_| corrupt("line quantity"))?;
        cart_lines.insert(product_id, quantity);
    }
    Ok(Cart {
        id,
        owner,
        currency: currency(optional("currency"))?,
        requested_currency: currency(optional("requested_currency"))?,
        lines: cart_lines,
        status: CartStatus::parse(field("status")?).ok_or_else(|| corrupt("status"))?,
        order_id: optional("order_id")
            .map(|text| Uuid::from_str(text).map_err(|_| corrupt("order_id")))
            .transpose()?,
        version: field("version")?.parse().map_err(|_| corrupt("version"))?,
        created_at: time(field("created_at")?)?,
        updated_at: time(field("updated_at")?)?,
        expires_at: time(field("expires_at")?)?,
        checkout_started_at: optional("checkout_started_at").map(time).transpose()?,
    })
}
