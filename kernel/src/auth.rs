//! Who is calling: JSON Web Tokens, checked against the configured keys.
//!
//! Two key sources:
//! - **HS256 with a shared secret** (`COMMERCE_JWT_SECRET`), for development
//!   and for deployments that mint their own tokens. On the embedded default
//!   with no secret configured, a random secret is created once in the data
//!   directory (`jwt-secret`), so `cargo run` works and no well-known secret
//!   ever exists. `commerce-kernel token` mints tokens with it.
//! - **RS256 through a JWKS URL** (`COMMERCE_JWKS_URL`), for production behind
//!   an identity provider. Keys are fetched at start, refetched when a token
//!   names an unknown key id (at most every [`JWKS_MIN_REFRESH`]) and when the
//!   cached set is older than [`JWKS_MAX_AGE`].
//!
//! Each source accepts its one algorithm only, so a token cannot choose how
//! it is checked (no `alg: none`, no HS256 signed with a public key).
//! `iss`, `aud`, `exp` and `sub` are required and checked; `roles` must hold
//! `customer` or `admin`.
//!
//! A customer's id comes from their token's subject ([`customer_id_of`]):
//! a `sub` that is a UUID is the customer id itself (tokens of
//! `commerce-kernel token`, Keycloak's subjects), and any other subject
//! (Auth0's `auth0|64f…`, Cognito's, Google's digits) maps to a UUIDv5 of
//! the issuer and the subject, the pair OpenID Connect makes unique. The
//! mapping never changes, so a customer keeps their carts and orders from
//! token to token; the subject itself is on record as the `actor` of every
//! event the customer's requests write (`customer:<sub>`).
//!
//! **Guest sessions.** A shop without an identity provider still sells to
//! guests: [`Authenticator::mint_guest`] signs a short-lived customer token
//! for a new random customer id, marked `"guest": true`, with the HS256
//! secret, or, when an identity provider signs the other tokens, with
//! `COMMERCE_GUEST_TOKEN_SECRET` (HS256 is then accepted for guest tokens
//! alone, never for admins). A guest token grants what a customer token
//! grants, for its own id only; its actor is `guest:<id>`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, RwLock};
use uuid::Uuid;

/// Shortest HS256 secret accepted, in bytes (RFC 7518 §3.2: at least the hash size).
pub const MIN_SECRET_BYTES: usize = 32;
/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY: Duration = Duration::from_secs(30);
/// Least time between two JWKS fetches caused by unknown key ids.
pub const JWKS_MIN_REFRESH: Duration = Duration::from_secs(30);
/// Age after which the cached JWKS is fetched again before use.
pub const JWKS_MAX_AGE: Duration = Duration::from_secs(600);
/// Longest a JWKS fetch may take.
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest token subject accepted, in bytes.
pub const MAX_SUBJECT_BYTES: usize = 256;
/// Name of the generated development secret inside the data directory.
pub const SECRET_FILE: &str = "jwt-secret";

/// What a token lets its bearer do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Their own carts and orders, and the catalog.
    Customer,
    /// Everything: catalog, inventory, sagas, events, projections, plugins,
    /// analytics, and any customer's carts and orders.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "customer" => Some(Role::Customer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Namespace of the customer ids of subjects that are not UUIDs.
const CUSTOMER_SUBJECT_NAMESPACE: Uuid = Uuid::from_u128(0x3c8e_61d4_0b7a_4f59_a2e1_7d5c_90f4_1b28);

/// The customer id of the subject `subject` of tokens from `issuer`: the
/// subject itself when it is a UUID in its usual form (lowercase, with
/// hyphens), else UUIDv5 of `<issuer> <subject>`. Only the one form passes
/// through, so two spellings of a UUID never name one customer.
pub fn customer_id_of(issuer: &str, subject: &str) -> Uuid {
    Uuid::parse_str(subject)
        .ok()
        .filter(|id| id.hyphenated().to_string() == subject)
        .unwrap_or_else(|| {
            Uuid::new_v5(
                &CUSTOMER_SUBJECT_NAMESPACE,
                format!("{issuer} {subject}").as_bytes(),
            )
        })
}

/// The authenticated caller of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`.
    pub subject: String,
    /// The strongest role the token grants.
    pub role: Role,
    /// For customers, the id their subject maps to ([`customer_id_of`]).
    customer: Option<Uuid>,
    /// A guest session's token ([`Authenticator::mint_guest`]).
    guest: bool,
}

impl Principal {
    pub fn admin(subject: impl Into<String>) -> Self {
        Principal {
            subject: subject.into(),
            role: Role::Admin,
            customer: None,
            guest: false,
        }
    }

    /// A customer whose token's subject is their id.
    pub fn customer(customer_id: Uuid) -> Self {
        Principal {
            subject: customer_id.to_string(),
            role: Role::Customer,
            customer: Some(customer_id),
            guest: false,
        }
    }

    /// Whether the token is a guest session's.
    pub fn is_guest(&self) -> bool {
        self.guest
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Whether this caller may see what belongs to `customer_id`.
    pub fn may_access(&self, customer_id: Uuid) -> bool {
        self.is_admin() || self.customer_id() == Some(customer_id)
    }

    /// The customer this caller is, for customer tokens.
    pub fn customer_id(&self) -> Option<Uuid> {
        match self.role {
            Role::Customer => self.customer,
            Role::Admin => None,
        }
    }

    /// How commands record this caller (`admin:<sub>`, `customer:<sub>`,
    /// `guest:<id>`).
    pub fn actor(&self) -> String {
        let kind = if self.guest {
            "guest"
        } else {
            self.role.as_str()
        };
        format!("{kind}:{}", self.subject)
    }
}

/// Where the keys come from, as configured.
#[derive(Clone, PartialEq, Eq)]
pub enum KeySource {
    /// HS256 with this secret.
    Secret(String),
    /// HS256 with the secret in this file, created (random, mode 0600) when missing.
    SecretFile(PathBuf),
    /// RS256 with the keys published at this URL.
    Jwks(String),
}

impl std::fmt::Debug for KeySource {
    // Never print a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Secret(_) => f.write_str("Secret(..)"),
            KeySource::SecretFile(path) => f.debug_tuple("SecretFile").field(path).finish(),
            KeySource::Jwks(url) => f.debug_tuple("Jwks").field(url).finish(),
        }
    }
}

/// How tokens are checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthConfig {
    pub keys: KeySource,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (one of the token's audiences).
    pub audience: String,
    /// Signs and checks guest tokens (HS256) when the other tokens come
    /// from a JWKS; with an HS256 secret, that secret signs them.
    pub guest_secret: Option<String>,
}

/// Why a request was not authenticated (401) or not authorized (403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token: send `Authorization: Bearer <token>`")]
    Missing,
    #[error("the token was refused: {0}")]
    Invalid(String),
    #[error("the token grants none of the roles customer, admin")]
    NoRole,
    #[error("the signing keys are unavailable: {0}")]
    KeysUnavailable(String),
}

impl AuthError {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::NoRole => 403,
            AuthError::KeysUnavailable(_) => 503,
            AuthError::Missing | AuthError::Invalid(_) => 401,
        }
    }
}

/// Why the keys could not be set up at start.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("cannot read or create the token secret {path}: {source}")]
    SecretFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the token secret in {path} is shorter than {MIN_SECRET_BYTES} bytes")]
    SecretTooShort { path: PathBuf },
    #[error("{0}")]
    Mint(String),
}

/// The claims the kernel reads and writes.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    roles: Vec<String>,
    // iss, aud, exp and nbf are checked by `Validation`; minted tokens carry them.
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    /// A guest session's token.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    guest: bool,
}

/// A guest session: its token, the customer it names, and when it ends.
#[derive(Debug, Clone)]
pub struct GuestSession {
    /// The signed bearer token.
    pub token: String,
    /// The new customer id the token names (its `sub`).
    pub customer_id: Uuid,
    /// The token's `exp`.
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

/// Checks tokens; cheap to clone and share.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    keys: Keys,
    validation: Validation,
    /// HS256 keys for guest tokens when `keys` is a JWKS, and their checks.
    guest_keys: Option<(DecodingKey, EncodingKey, Validation)>,
    issuer: String,
    audience: String,
}

enum Keys {
    Hs256 {
        decoding: DecodingKey,
        encoding: EncodingKey,
    },
    Jwks(JwksCache),
}

impl Authenticator {
    /// Sets up the key source: reads (or creates) the secret, or fetches the
    /// JWKS once. An unreachable JWKS is logged, not fatal: tokens are refused
    /// with [`AuthError::KeysUnavailable`] until a fetch succeeds.
    pub async fn open(config: &AuthConfig) -> Result<Self, AuthSetupError> {
        let (keys, algorithm) = match &config.keys {
            KeySource::Secret(secret) => (Keys::hs256(secret.as_bytes()), Algorithm::HS256),
            KeySource::SecretFile(path) => {
                let secret = read_or_create_secret(path)?;
                (Keys::hs256(secret.as_bytes()), Algorithm::HS256)
            }
            KeySource::Jwks(url) => {
                let cache = JwksCache::new(url.clone());
                if let Err(error) = cache.refresh().await {
                    tracing::error!(%error, url, "cannot fetch the JWKS; tokens are refused until it can be fetched");
                }
                (Keys::Jwks(cache), Algorithm::RS256)
            }
        };
        let validation = validation(algorithm, config);
        let guest_keys = match (&keys, &config.guest_secret) {
            (Keys::Jwks(_), Some(secret)) => Some((
                DecodingKey::from_secret(secret.as_bytes()),
                EncodingKey::from_secret(secret.as_bytes()),
                self::validation(Algorithm::HS256, config),
            )),
            _ => None,
        };
        Ok(Authenticator {
            inner: Arc::new(Inner {
                keys,
                validation,
                guest_keys,
                issuer: config.issuer.clone(),
                audience: config.audience.clone(),
            }),
        })
    }

    /// The caller named by an `Authorization` header value (`Bearer <token>`).
    pub async fn authenticate_header(&self, header: Option<&str>) -> Result<Principal, AuthError> {
        let header = header.map(str::trim).filter(|h| !h.is_empty());
        let Some(header) = header else {
            return Err(AuthError::Missing);
        };
        let token = match header.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            _ => {
                return Err(AuthError::Invalid(
                    "the Authorization header must be `Bearer <token>`".into(),
                ));
            }
        };
        self.verify(token).await
    }

    /// The caller a token names, once its signature and claims check out.
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let inner = &self.inner;
        let claims = match &inner.keys {
            Keys::Hs256 { decoding, .. } => decode(token, decoding, &inner.validation)?,
            Keys::Jwks(cache) => {
                let header = jsonwebtoken::decode_header(token).map_err(refusal)?;
                if header.alg == Algorithm::HS256
                    && let Some((decoding, _, validation)) = &inner.guest_keys
                {
                    let claims = decode(token, decoding, validation)?;
                    if !claims.guest {
                        return Err(AuthError::Invalid(
                            "HS256 is accepted for guest tokens only".into(),
                        ));
                    }
                    return principal(claims, &inner.issuer);
                }
                if header.alg != Algorithm::RS256 {
                    return Err(AuthError::Invalid(format!(
                        "algorithm {:?} is not accepted (RS256 only)",
                        header.alg
                    )));
                }
                let key = cache.key(header.kid.as_deref()).await?;
                decode(token, &key, &inner.validation)?
            }
        };
        principal(claims, &inner.issuer)
    }

    /// Whether [`mint_guest`](Self::mint_guest) can sign guest sessions.
    pub fn signs_guest_sessions(&self) -> bool {
        matches!(self.inner.keys, Keys::Hs256 { .. }) || self.inner.guest_keys.is_some()
    }

    /// A guest session for a new customer id, valid for `ttl`. Refused when
    /// the tokens come from an identity provider and no guest secret is set.
    pub fn mint_guest(&self, ttl: Duration) -> Result<GuestSession, AuthSetupError> {
        let encoding = match (&self.inner.keys, &self.inner.guest_keys) {
            (Keys::Hs256 { encoding, .. }, _) => encoding,
            (Keys::Jwks(_), Some((_, encoding, _))) => encoding,
            (Keys::Jwks(_), None) => {
                return Err(AuthSetupError::Mint(
                    "guest sessions need COMMERCE_GUEST_TOKEN_SECRET when an identity provider \
                     signs the tokens (COMMERCE_JWKS_URL)"
                        .into(),
                ));
            }
        };
        let customer_id = Uuid::new_v4();
        let now = chrono::Utc::now();
        let expires_at = now + chrono::Duration::seconds(ttl.as_secs().min(i64::MAX as u64) as i64);
        let claims = Claims {
            sub: customer_id.to_string(),
            roles: vec![Role::Customer.as_str().to_string()],
            iss: Some(self.inner.issuer.clone()),
            aud: Some(serde_json::Value::String(self.inner.audience.clone())),
            exp: Some(expires_at.timestamp().max(0) as u64),
            iat: Some(now.timestamp().max(0) as u64),
            guest: true,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, encoding)
            .map_err(|e| AuthSetupError::Mint(e.to_string()))?;
        Ok(GuestSession {
            token,
            customer_id,
            expires_at,
        })
    }

    /// A signed HS256 token for `subject` with `role`, valid for `ttl`.
    /// Refused when the keys come from a JWKS: the identity provider mints those.
    pub fn mint(&self, subject: &str, role: Role, ttl: Duration) -> Result<String, AuthSetupError> {
        let Keys::Hs256 { encoding, .. } = &self.inner.keys else {
            return Err(AuthSetupError::Mint(
                "tokens are signed by your identity provider when COMMERCE_JWKS_URL is set".into(),
            ));
        };
        let subject = subject.trim();
        if subject.is_empty() || subject.len() > MAX_SUBJECT_BYTES {
            return Err(AuthSetupError::Mint(format!(
                "a subject is 1 to {MAX_SUBJECT_BYTES} bytes"
            )));
        }
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        let claims = Claims {
            sub: subject.to_string(),
            roles: vec![role.as_str().to_string()],
            iss: Some(self.inner.issuer.clone()),
            aud: Some(serde_json::Value::String(self.inner.audience.clone())),
            exp: Some(now + ttl.as_secs()),
            iat: Some(now),
            guest: false,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, encoding)
            .map_err(|e| AuthSetupError::Mint(e.to_string()))
    }
}

impl Keys {
    fn hs256(secret: &[u8]) -> Keys {
        Keys::Hs256 {
            decoding: DecodingKey::from_secret(secret),
            encoding: EncodingKey::from_secret(secret),
        }
    }
}

/// The checks every token passes: `algorithm`, the configured issuer and
/// audience, the registered claims present, `exp` and `nbf` with leeway.
fn validation(algorithm: Algorithm, config: &AuthConfig) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.set_issuer(&[&config.issuer]);
    validation.set_audience(&[&config.audience]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    validation.leeway = LEEWAY.as_secs();
    validation.validate_nbf = true;
    validation
}

fn decode(token: &str, key: &DecodingKey, validation: &Validation) -> Result<Claims, AuthError> {
    jsonwebtoken::decode::<Claims>(token, key, validation)
        .map(|data| data.claims)
        .map_err(refusal)
}

fn principal(claims: Claims, issuer: &str) -> Result<Principal, AuthError> {
    let roles: Vec<Role> = claims.roles.iter().filter_map(|r| Role::parse(r)).collect();
    let role = if roles.contains(&Role::Admin) {
        Role::Admin
    } else if roles.contains(&Role::Customer) {
        Role::Customer
    } else {
        return Err(AuthError::NoRole);
    };
    let subject = claims.sub.trim();
    if subject.is_empty() || subject.len() > MAX_SUBJECT_BYTES {
        return Err(AuthError::Invalid(format!(
            "`sub` must be 1 to {MAX_SUBJECT_BYTES} bytes"
        )));
    }
    if subject.chars().any(char::is_control) {
        return Err(AuthError::Invalid(
            "`sub` must not hold control characters".into(),
        ));
    }
    if claims.guest && (role != Role::Customer || Uuid::parse_str(subject).is_err()) {
        return Err(AuthError::Invalid(
            "a guest token names one customer id and grants nothing else".into(),
        ));
    }
    Ok(Principal {
        subject: subject.to_string(),
        role,
        customer: (role == Role::Customer).then(|| customer_id_of(issuer, subject)),
        guest: claims.guest,
    })
}

/// Says why a token was refused, without echoing the token.
fn refusal(error: jsonwebtoken::errors::Error) -> AuthError {
    let reason = match error.kind() {
        ErrorKind::ExpiredSignature => "it has expired".to_string(),
        ErrorKind::ImmatureSignature => "it is not valid yet (nbf)".to_string(),
        ErrorKind::InvalidIssuer => "wrong issuer (iss)".to_string(),
        ErrorKind::InvalidAudience => "wrong audience (aud)".to_string(),
        ErrorKind::InvalidSignature => "bad signature".to_string(),
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
            "its algorithm is not accepted".to_string()
        }
        ErrorKind::MissingRequiredClaim(claim) => format!("claim `{claim}` is missing"),
        ErrorKind::InvalidClaimFormat(claim) => format!("claim `{claim}` is malformed"),
        _ => "it is not a well-formed JWT".to_string(),
    };
    AuthError::Invalid(reason)
}

/// Reads the development secret, creating it on first use. Two processes
/// starting at once agree: only one file creation can succeed.
fn read_or_create_secret(path: &Path) -> Result<String, AuthSetupError> {
    let io = |source| AuthSetupError::SecretFile {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let secret = text.trim().to_string();
            if secret.len() < MIN_SECRET_BYTES {
                return Err(AuthSetupError::SecretTooShort {
                    path: path.to_path_buf(),
                });
            }
            return Ok(secret);
        }
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(io(error)),
        Err(_) => {}
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    // Three v4 UUIDs: 366 bits from the OS's random source, as hex.
    let secret: String = (0..3)
        .map(|_| Uuid::new_v4().simple().to_string())
        .collect();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(mut file) => {
            std::io::Write::write_all(&mut file, secret.as_bytes()).map_err(io)?;
            tracing::info!(path = %path.display(), "created a development token secret");
            Ok(secret)
        }
        // Another process created it first: use theirs.
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            read_or_create_secret(path)
        }
        Err(error) => Err(io(error)),
    }
}

/// The RS256 keys of a JWKS URL, by key id.
struct JwksCache {
    url: String,
    http: reqwest::Client,
    keys: RwLock<CachedKeys>,
    /// Held while fetching, so concurrent misses cause one fetch.
    fetching: Mutex<()>,
}

#[derive(Default)]
struct CachedKeys {
    by_id: HashMap<String, DecodingKey>,
    /// Keys published without a `kid`; used for tokens without one.
    unnamed: Vec<DecodingKey>,
    fetched_at: Option<Instant>,
    /// Last fetch attempt, successful or not (paces refetches).
    attempted_at: Option<Instant>,
}

impl JwksCache {
    fn new(url: String) -> Self {
        JwksCache {
            url,
            http: reqwest::Client::builder()
                .timeout(JWKS_FETCH_TIMEOUT)
                .build()
                .unwrap_or_default(),
            keys: RwLock::new(CachedKeys::default()),
            fetching: Mutex::new(()),
        }
    }

    /// The key for `kid`, fetching the set again when it is stale or lacks the id.
    async fn key(&self, kid: Option<&str>) -> Result<DecodingKey, AuthError> {
        if let Some(key) = self.cached(kid, false).await {
            return Ok(key);
        }
        let _fetching = self.fetching.lock().await;
        // Someone else may have fetched while this waited.
        if let Some(key) = self.cached(kid, false).await {
            return Ok(key);
        }
        let recently_tried = self
            .keys
            .read()
            .await
            .attempted_at
            .is_some_and(|at| at.elapsed() < JWKS_MIN_REFRESH);
        if !recently_tried && let Err(error) = self.refresh().await {
            tracing::warn!(%error, url = %self.url, "JWKS fetch failed");
            // A stale key still beats refusing everyone while the IdP is down.
            if let Some(key) = self.cached(kid, true).await {
                return Ok(key);
            }
            return Err(error);
        }
        match self.cached(kid, true).await {
            Some(key) => Ok(key),
            None if self.keys.read().await.fetched_at.is_none() => Err(AuthError::KeysUnavailable(
                "the JWKS has not been fetched yet".into(),
            )),
            None => Err(AuthError::Invalid(match kid {
                Some(kid) => format!("unknown key id {kid:?}"),
                None => "the token names no key id (kid)".into(),
            })),
        }
    }

    async fn cached(&self, kid: Option<&str>, allow_stale: bool) -> Option<DecodingKey> {
        let keys = self.keys.read().await;
        let fresh = keys
            .fetched_at
            .is_some_and(|at| at.elapsed() < JWKS_MAX_AGE);
        if !fresh && !allow_stale {
            return None;
        }
        match kid {
            Some(kid) => keys.by_id.get(kid).cloned(),
            None => match (keys.unnamed.as_slice(), keys.by_id.len()) {
                ([only], _) => Some(only.clone()),
                ([], 1) => keys.by_id.values().next().cloned(),
                _ => None,
            },
        }
    }

    async fn refresh(&self) -> Result<(), AuthError> {
        self.keys.write().await.attempted_at = Some(Instant::now());
        let unavailable = |e: reqwest::Error| AuthError::KeysUnavailable(e.to_string());
        let set: JwkSet = self
            .http
            .get(&self.url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(unavailable)?
            .json()
            .await
            .map_err(unavailable)?;
        let mut fresh = CachedKeys {
            attempted_at: Some(Instant::now()),
            fetched_at: Some(Instant::now()),
            ..CachedKeys::default()
        };
        for jwk in &set.keys {
            let signing = !matches!(
                jwk.common.public_key_use,
                Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
            );
            let rs256 = matches!(jwk.common.key_algorithm, None | Some(KeyAlgorithm::RS256));
            if !signing || !rs256 || !matches!(jwk.algorithm, AlgorithmParameters::RSA(_)) {
                continue;
            }
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            match &jwk.common.key_id {
                Some(kid) => {
                    fresh.by_id.insert(kid.clone(), key);
                }
                None => fresh.unnamed.push(key),
            }
        }
        tracing::info!(url = %self.url, keys = fresh.by_id.len() + fresh.unnamed.len(), "JWKS fetched");
        *self.keys.write().await = fresh;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(secret: &str) -> AuthConfig {
        AuthConfig {
            keys: KeySource::Secret(secret.into()),
            issuer: "iss-a".into(),
            audience: "aud-a".into(),
            guest_secret: None,
        }
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[tokio::test]
    async fn minted_tokens_verify_and_name_their_caller() {
        let auth = Authenticator::open(&config(SECRET)).await.unwrap();
        let customer = Uuid::now_v7();
        let token = auth
            .mint(
                &customer.to_string(),
                Role::Customer,
                Duration::from_secs(60),
            )
            .unwrap();
        let principal = auth.verify(&token).await.unwrap();
        assert_eq!(principal, Principal::customer(customer));
        assert!(principal.may_access(customer));
        assert!(!principal.may_access(Uuid::now_v7()));
        let header = format!("bearer {token}");
        assert_eq!(
            auth.authenticate_header(Some(&header)).await.unwrap(),
            principal
        );
        let admin = auth
            .mint("ops", Role::Admin, Duration::from_secs(60))
            .unwrap();
        let admin = auth.verify(&admin).await.unwrap();
        assert!(admin.is_admin() && admin.may_access(customer));
        assert_eq!(admin.actor(), "admin:ops");
    }

    #[tokio::test]
    async fn foreign_expired_and_malformed_tokens_are_refused() {
        let auth = Authenticator::open(&config(SECRET)).await.unwrap();
        let other_secret = Authenticator::open(&config("another-secret-another-secret-xx"))
            .await
            .unwrap();
        let forged = other_secret
            .mint("ops", Role::Admin, Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            auth.verify(&forged).await,
            Err(AuthError::Invalid("bad signature".into()))
        );
        let mut elsewhere = config(SECRET);
        elsewhere.issuer = "iss-b".into();
        let wrong_issuer = Authenticator::open(&elsewhere)
            .await
            .unwrap()
            .mint("ops", Role::Admin, Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            auth.verify(&wrong_issuer).await,
            Err(AuthError::Invalid("wrong issuer (iss)".into()))
        );
        let mut elsewhere = config(SECRET);
        elsewhere.audience = "aud-b".into();
        let wrong_audience = Authenticator::open(&elsewhere)
            .await
            .unwrap()
            .mint("ops", Role::Admin, Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            auth.verify(&wrong_audience).await,
            Err(AuthError::Invalid("wrong audience (aud)".into()))
        );

        let expired = Claims {
            sub: "ops".into(),
            roles: vec!["admin".into()],
            iss: Some("iss-a".into()),
            aud: Some("aud-a".into()),
            exp: Some(1_000),
            iat: None,
            guest: false,
        };
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &expired,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(
            auth.verify(&expired).await,
            Err(AuthError::Invalid("it has expired".into()))
        );

        for garbage in ["", "a.b.c", "not a token", "eyJhbGciOiJub25lIn0.e30."] {
            assert!(matches!(
                auth.verify(garbage).await,
                Err(AuthError::Invalid(_))
            ));
        }
        assert_eq!(
            auth.authenticate_header(None).await,
            Err(AuthError::Missing)
        );
        assert!(matches!(
            auth.authenticate_header(Some("Basic b3BzOnB3")).await,
            Err(AuthError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn roles_and_subjects_are_checked() {
        let auth = Authenticator::open(&config(SECRET)).await.unwrap();
        let sign = |sub: &str, roles: &[&str]| {
            let claims = Claims {
                sub: sub.into(),
                roles: roles.iter().map(|r| r.to_string()).collect(),
                iss: Some("iss-a".into()),
                aud: Some(serde_json::json!(["other", "aud-a"])),
                exp: Some(chrono::Utc::now().timestamp() as u64 + 60),
                iat: None,
                guest: false,
            };
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(SECRET.as_bytes()),
            )
            .unwrap()
        };
        assert_eq!(
            auth.verify(&sign("ops", &["viewer"])).await,
            Err(AuthError::NoRole)
        );
        for refused in ["", "   ", "a\u{0}b", &"x".repeat(MAX_SUBJECT_BYTES + 1)] {
            assert!(
                matches!(
                    auth.verify(&sign(refused, &["customer"])).await,
                    Err(AuthError::Invalid(_))
                ),
                "{refused:?}"
            );
        }
        // Admin wins over customer; an audience list containing ours passes.
        let both = auth.verify(&sign("ops", &["customer", "admin"])).await;
        assert_eq!(both, Ok(Principal::admin("ops")));
        assert!(
            auth.mint(
                &"x".repeat(MAX_SUBJECT_BYTES + 1),
                Role::Customer,
                Duration::from_secs(1)
            )
            .is_err()
        );
    }

    /// An identity provider's subject that is not a UUID (Auth0's
    /// `auth0|…`) names a customer: the same one on every token, another
    /// one for another subject or issuer; a UUID subject is its own id.
    #[tokio::test]
    async fn any_subject_maps_to_a_stable_customer_id() {
        let auth = Authenticator::open(&config(SECRET)).await.unwrap();
        let subject = "auth0|64f1c0ffee0123456789abcd";
        let first = auth
            .verify(
                &auth
                    .mint(subject, Role::Customer, Duration::from_secs(60))
                    .unwrap(),
            )
            .await
            .unwrap();
        let again = auth
            .verify(
                &auth
                    .mint(subject, Role::Customer, Duration::from_secs(60))
                    .unwrap(),
            )
            .await
            .unwrap();
        let customer = first.customer_id().expect("a customer id");
        assert_eq!(again.customer_id(), Some(customer));
        assert_eq!(customer, customer_id_of("iss-a", subject));
        assert_eq!(customer.get_version_num(), 5);
        assert_eq!(first.subject, subject);
        assert_eq!(first.actor(), format!("customer:{subject}"));
        assert!(first.may_access(customer) && !first.may_access(Uuid::now_v7()));
        assert_ne!(customer_id_of("iss-a", "auth0|other"), customer);
        assert_ne!(customer_id_of("iss-b", subject), customer);
        let id = Uuid::now_v7();
        assert_eq!(customer_id_of("iss-a", &id.to_string()), id);
        // Other spellings of the same UUID are other subjects.
        for spelling in [
            id.to_string().to_uppercase(),
            id.simple().to_string(),
            id.urn().to_string(),
        ] {
            assert_ne!(customer_id_of("iss-a", &spelling), id, "{spelling}");
        }
        // An admin token has no customer id, whatever its subject.
        let admin = auth
            .verify(
                &auth
                    .mint(subject, Role::Admin, Duration::from_secs(60))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(admin.customer_id(), None);
    }

    #[test]
    fn the_development_secret_is_created_once_and_kept_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join(SECRET_FILE);
        let first = read_or_create_secret(&path).unwrap();
        assert!(first.len() >= MIN_SECRET_BYTES);
        assert_eq!(read_or_create_secret(&path).unwrap(), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "readable by others: {mode:o}");
        }
        std::fs::write(&path, "short").unwrap();
        assert!(matches!(
            read_or_create_secret(&path),
            Err(AuthSetupError::SecretTooShort { .. })
        ));
    }
}
