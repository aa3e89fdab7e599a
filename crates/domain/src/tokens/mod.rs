//! Tokens: short-lived EdDSA JWT access tokens and opaque rotating refresh
//! tokens grouped in sessions (token families).
//!
//! * Access token claims: iss, aud, sub (user id), exp, iat, nbf, jti, sid
//!   (session id), roles. `jti` is a UUIDv7 whose millisecond timestamp is the
//!   issue time compared with the per-user revocation epoch (`iat` has whole
//!   seconds only, too coarse to order a token against a revocation made in
//!   the same second).
//! * Verification accepts only `EdDSA` with a known `kid`, the configured
//!   issuer and audience, and exp/nbf within the leeway. `alg: none`, HS*,
//!   and every other algorithm are refused before any key is looked up.
//! * Refresh tokens are 256 random bits, base64url; only their SHA-256 is
//!   stored. Each use spends the token and issues the next one; presenting a
//!   spent one revokes its session (and only that session).

pub mod config;
pub mod keys;
pub mod store;

use std::{path::PathBuf, sync::Arc};

use arc_swap::ArcSwap;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, Header, Validation, errors::ErrorKind};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use self::{
    keys::{KeyError, KeyRing},
    store::{NewRefreshToken, NewSession, RotateRequest, Rotation, SessionStore, TokenHash},
};
use crate::{
    error::BackendError,
    events::{OutboxEvent, RequestContext},
    model::account::{Role, User},
    revocation::{RevocationKeys, Revocations, TokenFacts},
    tokens::config::TokenConfig,
};

/// Why a token was refused. Callers only ever learn "invalid token"; the
/// reason is for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidToken {
    #[error("malformed")]
    Malformed,
    #[error("algorithm not allowed")]
    Algorithm,
    #[error("unknown key id")]
    UnknownKey,
    #[error("bad signature")]
    Signature,
    #[error("expired")]
    Expired,
    #[error("not yet valid")]
    NotYetValid,
    #[error("wrong issuer")]
    Issuer,
    #[error("wrong audience")]
    Audience,
    #[error("revoked")]
    Revoked,
}

impl InvalidToken {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Algorithm => "algorithm",
            Self::UnknownKey => "unknown_kid",
            Self::Signature => "signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Issuer => "issuer",
            Self::Audience => "audience",
            Self::Revoked => "revoked",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("invalid access token: {0}")]
    InvalidAccess(InvalidToken),
    /// Unknown, spent, expired or revoked refresh token (one answer for all).
    #[error("invalid refresh token")]
    InvalidRefresh,
    #[error("signing failed")]
    Signing(String),
    /// A security change of the account (password, status, roles, revoke
    /// all) committed between the read a login decided on and the session
    /// it would have created: nothing was created.
    #[error("the account changed while the request was in flight")]
    Superseded,
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Access-token claims.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    pub sub: Uuid,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub jti: Uuid,
    pub sid: Uuid,
    pub roles: Vec<String>,
    /// `roles` joined by commas: the one claim form Envoy's `jwt_authn`
    /// copies into a header as it is (an array it would copy as base64 of
    /// its JSON), so in edge mode the upstream gets `x-user-roles` in the
    /// same form ext_authz sets. Only Envoy reads it; tokens without it
    /// (issued before it existed) verify as before.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub roles_csv: String,
}

impl Claims {
    /// `roles` and the same as one comma-separated claim.
    fn with_roles(mut self, roles: Vec<String>) -> Self {
        self.roles_csv = roles.join(",");
        self.roles = roles;
        self
    }
}

/// What is kept of a verified access token: one allocation, no strings of
/// its own (issuer and audience are the configured ones; role lists are
/// shared between tokens), so a large verified-token cache is compact and
/// does not fragment the heap.
#[derive(Debug)]
pub struct Verified {
    pub sub: Uuid,
    pub sid: Uuid,
    pub jti: Uuid,
    pub exp: i64,
    pub roles: Arc<[String]>,
}

/// What kind of account a verified access token speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalKind {
    /// A user, in one of its sessions (`session_id`).
    User,
    /// A service account ([`TokenService::issue_service_token`]): `user_id`
    /// is the account's id and it has no session.
    ServiceAccount,
}

impl PrincipalKind {
    /// The token format's encoding: a service account's token carries its
    /// id as both `sub` and `sid`, so revoking that id (rotation, deletion)
    /// revokes every such token. The one place that reads it.
    fn of(sub: Uuid, sid: Uuid) -> Self {
        if sub == sid {
            Self::ServiceAccount
        } else {
            Self::User
        }
    }
}

/// A caller proven by a valid, unrevoked access token.
#[derive(Debug, Clone)]
pub struct Principal {
    pub kind: PrincipalKind,
    pub user_id: Uuid,
    pub session_id: Uuid,
    pub jti: Uuid,
    pub roles: Vec<String>,
    /// Unix seconds.
    pub expires_at: i64,
}

impl Principal {
    /// The token as revocation checks see it (`None`: its `jti` carries no
    /// time, which a verified token's always does).
    pub fn token_facts(&self) -> Option<TokenFacts> {
        Some(TokenFacts {
            keys: RevocationKeys {
                jti: self.jti,
                session_id: self.session_id,
                user_id: self.user_id,
            },
            issued_at_ms: issued_at_ms(self.jti)?,
            expires_at: self.expires_at,
        })
    }

    /// The caller a verified token names (revocation is the caller's check).
    pub fn from_verified(token: &Verified) -> Self {
        Self {
            kind: PrincipalKind::of(token.sub, token.sid),
            user_id: token.sub,
            session_id: token.sid,
            jti: token.jti,
            roles: token.roles.to_vec(),
            expires_at: token.exp,
        }
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// What Login and RefreshToken hand out. The refresh token is secret.
#[derive(Debug)]
pub struct TokenPair {
    pub access_token: SecretString,
    pub refresh_token: SecretString,
    pub expires_in: i64,
    pub refresh_expires_in: i64,
    pub user: User,
    /// Set by login: marks the device as known to this account.
    pub device_token: Option<SecretString>,
}

/// Claims of a device token (OWASP's device-cookie defence against
/// credential stuffing): this device logged in to `sub` before. Its audience
/// is the access-token audience with `:device` appended, so it is never
/// accepted as an access token, nor an access token as a device token.
#[derive(Debug, Serialize, Deserialize)]
struct DeviceClaims {
    iss: String,
    aud: String,
    sub: Uuid,
    exp: i64,
    iat: i64,
    nbf: i64,
    /// The device id.
    jti: Uuid,
    /// The account's security version at issue: a security change since
    /// (password, status, roles, revoke all) ends the device's trust.
    #[serde(default)]
    sv: i64,
}

/// A UUIDv7 whose time is `at` (to the millisecond).
fn jti_at(at: OffsetDateTime) -> Uuid {
    let nanos = at.unix_timestamp_nanos().max(0);
    let secs = u64::try_from(nanos / 1_000_000_000).unwrap_or(0);
    let subsec = u32::try_from(nanos % 1_000_000_000).unwrap_or(0);
    Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, secs, subsec))
}

/// When a token was issued, to the millisecond: its jti is a UUIDv7.
fn issued_at_ms(jti: Uuid) -> Option<i64> {
    jti.get_timestamp().map(|t| {
        let (s, n) = t.to_unix();
        i64::try_from(s).unwrap_or(i64::MAX / 2_000) * 1000 + i64::from(n / 1_000_000)
    })
}

/// Resident cost of one verified-cache entry (bench/run memory).
const VERIFIED_ENTRY_BYTES: usize = 200;

/// Verified claims by token hash. An entry of an expired token is dropped
/// when read (or evicted by newer ones: the cache is bounded by weight).
///
/// quick_cache (S3-FIFO over a sharded hash table), not moka: under token
/// churn (every ext_authz request with a new token) moka's removed entries
/// went on holding memory and RSS grew by ~35 B per token for as long as
/// the churn lasted (bench/run soak; BENCHMARKS.md, "Memory").
type VerifiedCache = quick_cache::sync::Cache<TokenHash, Arc<Verified>, EntryWeight>;

/// Every entry weighs its measured resident cost (one table slot and one
/// `Verified`).
#[derive(Clone)]
struct EntryWeight;

impl quick_cache::Weighter<TokenHash, Arc<Verified>> for EntryWeight {
    fn weight(&self, _: &TokenHash, _: &Arc<Verified>) -> u64 {
        VERIFIED_ENTRY_BYTES as u64
    }
}

/// At most this many distinct role lists are shared; more (there are not,
/// as only this service signs tokens) are simply not shared.
const MAX_ROLE_SETS: usize = 1024;

fn device_audience(config: &TokenConfig) -> String {
    format!("{}:device", config.audience)
}

/// Issues, verifies, rotates and revokes tokens.
pub struct TokenService {
    keys: ArcSwap<KeyRing>,
    /// Signature and claim checks are done once per token; later checks of
    /// the same token (ext_authz sees it on every request) are a hash lookup.
    verified: VerifiedCache,
    role_sets: std::sync::Mutex<std::collections::HashMap<Vec<String>, Arc<[String]>>>,
    keys_dir: PathBuf,
    generate_keys: bool,
    config: TokenConfig,
    validation: Validation,
    device_validation: Validation,
    sessions: Arc<dyn SessionStore>,
    revocations: Revocations,
}

pub fn hash_refresh_token(raw: &str) -> TokenHash {
    Sha256::digest(raw.as_bytes()).into()
}

fn new_refresh_token() -> Result<(SecretString, TokenHash), TokenError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| TokenError::Signing(e.to_string()))?;
    let raw = URL_SAFE_NO_PAD.encode(bytes);
    bytes.fill(0);
    let hash = hash_refresh_token(&raw);
    Ok((SecretString::from(raw), hash))
}

fn secs(d: u64) -> Duration {
    Duration::seconds(i64::try_from(d).unwrap_or(i64::MAX / 4))
}

impl TokenService {
    pub fn new(
        config: TokenConfig,
        keys_dir: PathBuf,
        sessions: Arc<dyn SessionStore>,
        revocations: Revocations,
    ) -> Result<Self, KeyError> {
        let ring = KeyRing::load(&keys_dir, config.generate_key_if_missing)?;
        Ok(Self::with_ring(
            config,
            ring,
            keys_dir,
            sessions,
            revocations,
        ))
    }

    /// A service that holds no key: it signs and verifies nothing (both
    /// refuse) and serves revocation only. The event worker's, which must
    /// not read the signing keys.
    pub fn without_keys(
        config: TokenConfig,
        sessions: Arc<dyn SessionStore>,
        revocations: Revocations,
    ) -> Self {
        let mut config = config;
        config.generate_key_if_missing = false;
        Self::with_ring(
            config,
            KeyRing::empty(),
            PathBuf::new(),
            sessions,
            revocations,
        )
    }

    fn with_ring(
        config: TokenConfig,
        ring: KeyRing,
        keys_dir: PathBuf,
        sessions: Arc<dyn SessionStore>,
        revocations: Revocations,
    ) -> Self {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = config.leeway_secs;
        let mut device_validation = validation.clone();
        device_validation.set_audience(&[device_audience(&config)]);
        let verified = quick_cache::sync::Cache::with_weighter(
            usize::try_from(config.verified_cache_bytes / VERIFIED_ENTRY_BYTES as u64)
                .unwrap_or(usize::MAX)
                .max(16),
            config.verified_cache_bytes,
            EntryWeight,
        );
        Self {
            keys: ArcSwap::from_pointee(ring),
            verified,
            role_sets: std::sync::Mutex::default(),
            keys_dir,
            generate_keys: config.generate_key_if_missing,
            config,
            validation,
            device_validation,
            sessions,
            revocations,
        }
    }

    /// Re-reads the key directory (after `rotate-key`, on SIGHUP). On error
    /// the keys in use stay in use.
    pub fn reload_keys(&self) -> Result<String, KeyError> {
        let ring = KeyRing::load(&self.keys_dir, self.generate_keys)?;
        let kid = ring.signing_kid().to_owned();
        self.keys.store(Arc::new(ring));
        // A removed key must stop verifying at once, cached or not.
        self.verified.clear();
        Ok(kid)
    }

    /// When a key published ahead of its time starts to sign (the key
    /// directory must be reloaded then).
    pub fn next_key_activation(&self) -> Option<time::OffsetDateTime> {
        self.keys.load().next_activation()
    }

    pub fn keys_dir(&self) -> &std::path::Path {
        &self.keys_dir
    }

    pub fn jwks_json(&self) -> String {
        self.keys.load().jwks_json().to_owned()
    }

    pub fn config(&self) -> &TokenConfig {
        &self.config
    }

    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    fn sign(
        &self,
        user: &User,
        session_id: Uuid,
        now: OffsetDateTime,
    ) -> Result<(SecretString, i64), TokenError> {
        let ttl = i64::try_from(self.config.access_ttl_secs).unwrap_or(i64::MAX / 4);
        let iat = now.unix_timestamp();
        let claims = Claims {
            iss: self.config.issuer.clone(),
            aud: self.config.audience.clone(),
            sub: user.id,
            exp: iat + ttl,
            iat,
            nbf: iat,
            // Issued at `now`, the time the request read the state it was
            // decided on (before the store's write): a revocation epoch
            // raised after a racing change committed is later than it.
            jti: jti_at(now),
            sid: session_id,
            roles: Vec::new(),
            roles_csv: String::new(),
        }
        .with_roles(
            user.roles
                .iter()
                .map(Role::as_str)
                .map(str::to_owned)
                .collect(),
        );
        Ok((self.sign_claims(&claims)?, ttl))
    }

    /// An access token for a service account: `sub` and `sid` are its id, so
    /// revoking that "user" (rotation, deletion) revokes every such token.
    pub fn issue_service_token(
        &self,
        account_id: Uuid,
        roles: &[String],
        issued_at: OffsetDateTime,
    ) -> Result<(SecretString, i64), TokenError> {
        let ttl = i64::try_from(self.config.access_ttl_secs).unwrap_or(i64::MAX / 4);
        let iat = issued_at.unix_timestamp();
        let claims = Claims {
            iss: self.config.issuer.clone(),
            aud: self.config.audience.clone(),
            sub: account_id,
            exp: iat + ttl,
            iat,
            nbf: iat,
            jti: jti_at(issued_at),
            sid: account_id,
            roles: Vec::new(),
            roles_csv: String::new(),
        }
        .with_roles(roles.to_vec());
        Ok((self.sign_claims(&claims)?, ttl))
    }

    /// `claims` as a JWT signed with the current signing key (EdDSA, `kid`).
    fn sign_claims(&self, claims: &impl Serialize) -> Result<SecretString, TokenError> {
        let ring = self.keys.load();
        let key = ring
            .signing_key()
            .ok_or_else(|| TokenError::Signing("this process holds no signing key".into()))?;
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(ring.signing_kid().to_owned());
        jsonwebtoken::encode(&header, claims, key)
            .map(SecretString::from)
            .map_err(|e| TokenError::Signing(e.to_string()))
    }

    /// A device token for `user_id` (valid `tokens.device_ttl_secs`).
    pub fn issue_device_token(
        &self,
        user_id: Uuid,
        security_version: i64,
    ) -> Result<SecretString, TokenError> {
        let iat = crate::unix_now();
        let claims = DeviceClaims {
            iss: self.config.issuer.clone(),
            aud: device_audience(&self.config),
            sub: user_id,
            exp: iat + i64::try_from(self.config.device_ttl_secs).unwrap_or(i64::MAX / 4),
            iat,
            nbf: iat,
            jti: Uuid::now_v7(),
            sv: security_version,
        };
        self.sign_claims(&claims)
    }

    /// The device id when `token` is a valid device token of `user_id`;
    /// anything else (malformed, expired, another account's, an access
    /// token) is `None`.
    pub fn known_device(&self, token: &str, user_id: Uuid) -> Option<Uuid> {
        self.device_claims(token, user_id).map(|c| c.jti)
    }

    fn device_claims(&self, token: &str, user_id: Uuid) -> Option<DeviceClaims> {
        // A device token is a few hundred bytes; do not parse megabytes.
        if token.is_empty() || token.len() > 1024 {
            return None;
        }
        let claims: DeviceClaims = self.decode(token, &self.device_validation).ok()?;
        (claims.sub == user_id).then_some(claims)
    }

    /// [`TokenService::known_device`], issued at the account's current
    /// security version (`security_version`, as the login read it from the
    /// database): a password change, a suspension, a role change or "revoke
    /// all sessions" since ends the device's lane for good, whatever the
    /// fast-state backend remembers.
    pub fn trusted_device(
        &self,
        token: &str,
        user_id: Uuid,
        security_version: i64,
    ) -> Option<Uuid> {
        self.device_claims(token, user_id)
            .filter(|c| c.sv == security_version)
            .map(|c| c.jti)
    }

    /// Starts a session for a user who just proved who they are.
    /// Nothing is created, and [`TokenError::Superseded`] returned, when
    /// the account is no longer active at `security_version` (the version
    /// the caller read before it decided).
    pub async fn start_session(
        &self,
        user: User,
        security_version: i64,
        ctx: &RequestContext,
    ) -> Result<TokenPair, TokenError> {
        let now = OffsetDateTime::now_utc();
        let session = NewSession {
            id: Uuid::now_v7(),
            user_id: user.id,
            created_at: now,
            absolute_expires_at: now + secs(self.config.refresh_absolute_ttl_secs),
            security_version,
        };
        let (refresh, hash) = new_refresh_token()?;
        let idle_expires_at =
            (now + secs(self.config.refresh_idle_ttl_secs)).min(session.absolute_expires_at);
        let token = NewRefreshToken {
            hash,
            session_id: session.id,
            created_at: now,
            idle_expires_at,
        };
        let (access, expires_in) = self.sign(&user, session.id, now)?;
        let event = OutboxEvent::login_succeeded(user.id, session.id, ctx);
        if !self
            .sessions
            .create_session(&session, &token, &event)
            .await?
        {
            metrics::counter!("sessions_superseded_total").increment(1);
            return Err(TokenError::Superseded);
        }
        Ok(TokenPair {
            access_token: access,
            refresh_token: refresh,
            expires_in,
            refresh_expires_in: (idle_expires_at - now).whole_seconds(),
            user,
            device_token: None,
        })
    }

    /// Spends a refresh token for a new pair.
    pub async fn refresh(
        &self,
        raw: &SecretString,
        ctx: &RequestContext,
    ) -> Result<TokenPair, TokenError> {
        let now = OffsetDateTime::now_utc();
        let (next, next_hash) = new_refresh_token()?;
        let rotation = self
            .sessions
            .rotate_refresh_token(RotateRequest {
                presented: hash_refresh_token(raw.expose_secret()),
                next: next_hash,
                now,
                idle_ttl: secs(self.config.refresh_idle_ttl_secs),
                ctx,
            })
            .await?;
        match rotation {
            Rotation::Rotated {
                user,
                session_id,
                idle_expires_at,
            } => {
                let (access, expires_in) = self.sign(&user, session_id, now)?;
                Ok(TokenPair {
                    access_token: access,
                    refresh_token: next,
                    expires_in,
                    refresh_expires_in: (idle_expires_at - now).whole_seconds(),
                    user,
                    device_token: None,
                })
            }
            Rotation::Reused {
                user_id,
                session_id,
            } => {
                tracing::warn!(%user_id, %session_id, "refresh token reuse: session revoked");
                metrics::counter!("refresh_token_reuse_total").increment(1);
                // The family's access tokens die with it: at once on this
                // replica; in the store now or, if it is down, as soon as
                // it answers again (the database has revoked the family).
                self.revocations
                    .revoke_session_or_retry(user_id, session_id)
                    .await;
                Err(TokenError::InvalidRefresh)
            }
            Rotation::Invalid => Err(TokenError::InvalidRefresh),
        }
    }

    /// Signature and claims only (no revocation check), cached by token hash.
    pub fn verify(&self, token: &str) -> Result<Arc<Verified>, InvalidToken> {
        let hash: TokenHash = Sha256::digest(token.as_bytes()).into();
        if let Some(claims) = self.verified.get(&hash) {
            if claims.exp + i64::try_from(self.config.leeway_secs).unwrap_or(0) > crate::unix_now()
            {
                crate::held_counter!("jwt_cache_lookups_total", "result" => "hit").increment(1);
                return Ok(claims);
            }
            // Expired: decoding below refuses it; the entry goes now.
            self.verified.remove(&hash);
        }
        crate::held_counter!("jwt_cache_lookups_total", "result" => "miss").increment(1);
        let claims = self.verify_uncached(token)?;
        let verified = Arc::new(Verified {
            sub: claims.sub,
            sid: claims.sid,
            jti: claims.jti,
            exp: claims.exp,
            roles: self.shared_roles(claims.roles),
        });
        self.verified.insert(hash, verified.clone());
        Ok(verified)
    }

    /// One allocation per distinct role list, however many tokens carry it.
    fn shared_roles(&self, roles: Vec<String>) -> Arc<[String]> {
        let mut sets = self.role_sets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(shared) = sets.get(&roles) {
            return shared.clone();
        }
        let shared: Arc<[String]> = roles.clone().into();
        if sets.len() < MAX_ROLE_SETS {
            sets.insert(roles, shared.clone());
        }
        shared
    }

    fn verify_uncached(&self, token: &str) -> Result<Claims, InvalidToken> {
        self.decode(token, &self.validation)
    }

    /// Signature (EdDSA only, a known `kid`) and the claims `validation`
    /// asks for.
    fn decode<C: serde::de::DeserializeOwned>(
        &self,
        token: &str,
        validation: &Validation,
    ) -> Result<C, InvalidToken> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                InvalidToken::Algorithm
            }
            _ => InvalidToken::Malformed,
        })?;
        if header.alg != Algorithm::EdDSA {
            return Err(InvalidToken::Algorithm);
        }
        let ring = self.keys.load();
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| ring.verifying_key(kid))
            .ok_or(InvalidToken::UnknownKey)?;
        let data =
            jsonwebtoken::decode::<C>(token, key, validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => InvalidToken::Expired,
                ErrorKind::ImmatureSignature => InvalidToken::NotYetValid,
                ErrorKind::InvalidIssuer => InvalidToken::Issuer,
                ErrorKind::InvalidAudience => InvalidToken::Audience,
                ErrorKind::InvalidSignature => InvalidToken::Signature,
                ErrorKind::InvalidAlgorithm => InvalidToken::Algorithm,
                _ => InvalidToken::Malformed,
            })?;
        Ok(data.claims)
    }

    /// Full check: signature, claims, then revocation.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, TokenError> {
        let claims = self.verify(token).map_err(TokenError::InvalidAccess)?;
        let issued_at_ms =
            issued_at_ms(claims.jti).ok_or(TokenError::InvalidAccess(InvalidToken::Malformed))?;
        let facts = TokenFacts {
            keys: RevocationKeys {
                jti: claims.jti,
                session_id: claims.sid,
                user_id: claims.sub,
            },
            issued_at_ms,
            expires_at: claims.exp,
        };
        if self.revocations.is_revoked(&facts).await? {
            return Err(TokenError::InvalidAccess(InvalidToken::Revoked));
        }
        Ok(Principal::from_verified(&claims))
    }

    /// Ends the caller's session: the session (with every refresh token of
    /// it and every access token) is revoked, and the access token
    /// blacklisted until it expires. A refresh token of another session of
    /// the same user is revoked too; one of another user is refused.
    ///
    /// The database first, the fast state after: the logout is done once
    /// the database has it (the refresh tokens die there, and the
    /// revocation log carries it to every replica and Envoy). A database
    /// failure leaves the caller's own session untouched (it is revoked
    /// last; another session named by the refresh token may already be
    /// revoked), so the access token still works and the client's retry
    /// finishes the logout. A fast-state failure after the commit cannot
    /// undo it: this replica denies the tokens at once and owes the
    /// fast-state write until it is made.
    pub async fn logout(
        &self,
        caller: &Principal,
        refresh: Option<&SecretString>,
        ctx: &RequestContext,
    ) -> Result<(), TokenError> {
        let mut sessions = Vec::with_capacity(2);
        if let Some(raw) = refresh {
            match self
                .sessions
                .refresh_token_owner(&hash_refresh_token(raw.expose_secret()))
                .await?
            {
                Some((session_id, user_id)) if user_id == caller.user_id => {
                    sessions.push(session_id)
                }
                Some(_) => return Err(TokenError::InvalidRefresh),
                None => {}
            }
        }
        // The caller's own session last: until it is revoked, the access
        // token that can retry this call still works.
        sessions.retain(|s| *s != caller.session_id);
        sessions.push(caller.session_id);
        let now = OffsetDateTime::now_utc();
        for &session_id in &sessions {
            let event = OutboxEvent::token_revoked(caller.user_id, session_id, "logout", ctx);
            self.sessions
                .revoke_session(session_id, caller.user_id, now, &event)
                .await?;
        }
        for &session_id in &sessions {
            self.revocations
                .revoke_session_or_retry(caller.user_id, session_id)
                .await;
        }
        // The session's revocation already covers this token; its own entry
        // is for lookups that read the token's key alone.
        if let Err(error) = self
            .revocations
            .revoke_token(caller.user_id, caller.jti, caller.expires_at)
            .await
        {
            tracing::warn!(%error, "logout: the access token's own entry not written (its session's revocation covers it)");
        }
        Ok(())
    }
}

impl TokenService {
    /// Ends every session of the user: access tokens through the per-user
    /// epoch (first, so a failure there changes nothing), refresh tokens in
    /// the store with `event`. Returns the number of sessions revoked.
    pub async fn end_all_sessions(
        &self,
        user_id: Uuid,
        event: &OutboxEvent,
    ) -> Result<u64, TokenError> {
        self.revocations.revoke_user(user_id).await?;
        let revoked = self
            .sessions
            .revoke_user_sessions(user_id, event.occurred_at, event)
            .await?;
        self.revoke_user_after_change(user_id).await;
        Ok(revoked)
    }

    /// Raises the user's revocation epoch again once a security change has
    /// committed. The epoch raised before the change covers every token
    /// issued before it; this one also covers a login or refresh that read
    /// the account before the change and was ordered before it by the
    /// database (its token's issue time precedes the change's commit, and
    /// so this epoch, up to the clock skew between replicas).
    ///
    /// The change itself has committed, so a store failure here is not the
    /// caller's error: this replica denies the user's earlier tokens at
    /// once and owes the store write until it is made
    /// (`revocation_store_writes_owed`); the other replicas apply the
    /// change's row of the revocation log.
    pub async fn revoke_user_after_change(&self, user_id: Uuid) {
        self.revocations
            .revoke_user_at_or_retry(user_id, crate::revocation::unix_now_ms())
            .await;
    }
}

#[cfg(test)]
mod kind_tests {
    use super::*;

    /// A service account's token names its id as both `sub` and `sid`; a
    /// user's names a session of its own.
    #[test]
    fn the_principal_kind_is_read_from_the_token_format() {
        let (user, session) = (Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(PrincipalKind::of(user, session), PrincipalKind::User);
        assert_eq!(PrincipalKind::of(user, user), PrincipalKind::ServiceAccount);
    }
}
