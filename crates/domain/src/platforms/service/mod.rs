//! The platform-account use cases.
//!
//! **Refresh.** GetPlatformAccessToken answers from the stored token while it
//! is valid for longer than the skew (one read, one decryption, no platform
//! call). Otherwise one caller takes the account's refresh lease in the
//! database (a conditional UPDATE on the row's token version, so exactly one
//! replica wins) and refreshes; the others answer with the current token if
//! it stays valid for another minute, else wait for the row's version to
//! move and answer with the token the winner stored. The refresh runs in a task of
//! its own, so a caller that gives up (deadline, disconnect) never abandons
//! a rotated refresh token between the platform's answer and the database:
//! the new tokens are stored before any access token is returned.

mod access;
mod callbacks;
mod grants;
mod keepalive;
mod link;
mod reseal;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    AccountStatus, Platform, PlatformAccount, PlatformError,
    api::{CallError, Grant, PlatformApi},
    store::{
        LinkOutcome, LinkState, PendingRevocation, PlatformStore, SealedTokens, StoredAccount,
    },
    vault::Vault,
    webhooks,
};
use crate::{
    error::FieldViolation,
    events::{OutboxEvent, RequestContext},
    model::account::Role,
    platforms::config::PlatformsConfig,
    tokens::Principal,
};

/// Longest `state` and `code` accepted (platform codes are far shorter).
const MAX_STATE_LEN: usize = 256;
const MAX_CODE_LEN: usize = 2048;
/// No platform's access token is longer (Twitch's are 30 characters,
/// Google's and Facebook's a few hundred).
const MAX_PLATFORM_TOKEN_BYTES: usize = 4096;
/// While another caller refreshes, a token valid for at least this long is
/// handed out instead of waiting for the new one.
const STILL_USABLE: Duration = Duration::from_secs(60);
/// How often a caller waiting on another replica's refresh looks again.
const LEASE_POLL: Duration = Duration::from_millis(20);

/// Proof that the caller is an internal service: a user token holding the
/// `service` role, or a verified client certificate whose configured
/// identity holds it.
#[derive(Debug, Clone)]
pub enum ServiceCaller {
    Token(Principal),
    Peer(String),
}

impl ServiceCaller {
    pub fn check(principal: Principal) -> Result<Self, PlatformError> {
        if principal.has_role(Role::SERVICE) {
            Ok(Self::Token(principal))
        } else {
            Err(PlatformError::Forbidden(
                "the service role is required to read platform tokens",
            ))
        }
    }

    /// A peer identity (`services.<identity>.roles`).
    pub fn peer(identity: &str, roles: &[String]) -> Result<Self, PlatformError> {
        if roles.iter().any(|r| r == Role::SERVICE) {
            Ok(Self::Peer(identity.to_owned()))
        } else {
            Err(PlatformError::Forbidden(
                "this service identity does not hold the service role",
            ))
        }
    }

    /// Who is asking, for logs.
    pub fn name(&self) -> String {
        match self {
            Self::Token(p) => p.user_id.to_string(),
            Self::Peer(identity) => identity.clone(),
        }
    }
}

/// What StartPlatformLink returns.
#[derive(Debug)]
pub struct StartedLink {
    pub authorization_url: String,
    pub state: String,
    pub expires_at: OffsetDateTime,
    pub pkce: bool,
}

/// A usable platform access token.
#[derive(Debug)]
pub struct AccessGrant {
    pub access_token: SecretString,
    pub expires_at: Option<OffsetDateTime>,
    pub platform_user_id: String,
    pub scopes: Vec<String>,
}

/// What a verified EventSub message asks of the endpoint.
#[derive(Debug, PartialEq, Eq)]
pub enum EventSubReply {
    /// `webhook_callback_verification`: answer the raw challenge.
    Challenge(String),
    /// Handled (or deliberately ignored).
    Accepted,
    /// A message id seen before: acknowledged, nothing done again.
    Duplicate,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// This webhook is not configured here (404).
    #[error("webhook not configured")]
    NotConfigured,
    /// Missing, bad or stale signature (403); nothing changed.
    #[error("{0}")]
    Forbidden(&'static str),
    /// The signed body is not what the platform sends (400).
    #[error("{0}")]
    Malformed(&'static str),
    /// The database could not record or apply it (503: the platform retries).
    #[error("temporarily unavailable")]
    Unavailable,
}

/// Counts of one round of deleted users' grant revocations.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GrantRevocationReport {
    /// The platform revoked the grant.
    pub revoked: u32,
    /// The platform answered that the grant was already dead.
    pub already_dead: u32,
    /// The platform has no revocation endpoint (SOOP).
    pub unsupported: u32,
    /// No answer this time (down, 5xx, 429, a refusal of our client, a
    /// platform turned off here, tokens that do not open): tried again
    /// later, the row kept.
    pub retrying: u32,
    /// Of those, rows without an answer for [`GRANT_REVOCATION_OVERDUE`]
    /// attempts or more: each logged at warn level and counted in
    /// `platform_grant_revocations_overdue_total`, for an operator to look
    /// at (a platform gone for hours, credentials revoked, a vault key lost).
    pub overdue: u32,
}

/// How a deleted user's grant ended at its platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantRevocation {
    Revoked,
    AlreadyDead,
    Unsupported,
}

impl GrantRevocation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Revoked => "revoked",
            Self::AlreadyDead => "already_dead",
            Self::Unsupported => "unsupported",
        }
    }
}

/// The first retry of a grant revocation without an answer comes this long
/// after it; each next one twice as long, up to [`GRANT_REVOCATION_MAX_WAIT`].
pub const GRANT_REVOCATION_BACKOFF: Duration = Duration::from_secs(30);
pub const GRANT_REVOCATION_MAX_WAIT: Duration = Duration::from_secs(3600);
/// Attempts without an answer after which a queued revocation is reported
/// as overdue (about 6 hours of waits: 30 s doubling, then hourly).
pub const GRANT_REVOCATION_OVERDUE: i32 = 12;
/// How long a replica holds a claimed grant revocation, and how many it
/// claims at once: a batch's calls (each bounded by `http_timeout_ms` and
/// `retry_attempts`, at most a refresh and two revocations) end well within
/// the claim.
const GRANT_REVOCATION_CLAIM: Duration = Duration::from_secs(300);
const GRANT_REVOCATION_BATCH: i64 = 10;

/// Counts of one keep-alive round.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KeepaliveReport {
    pub extended: u32,
    pub validated: u32,
    pub reauth_required: u32,
    pub failed: u32,
    /// Platforms skipped: cooling down after a 429 (`platform_cooldowns`).
    pub rate_limited: u32,
}

impl KeepaliveReport {
    /// Counts a leased refresh's outcome (`ok` on success).
    fn count(
        &mut self,
        outcome: Option<Result<AccessGrant, PlatformError>>,
        ok: impl FnOnce(&mut Self),
    ) {
        match outcome {
            None => {}
            Some(Ok(_)) => ok(self),
            Some(Err(PlatformError::ReauthRequired { .. })) => self.reauth_required += 1,
            Some(Err(_)) => self.failed += 1,
        }
    }
}

/// The vault in force, replaced when its key directory changes.
type VaultCell = Arc<arc_swap::ArcSwap<Vault>>;

pub struct PlatformService {
    store: Arc<dyn PlatformStore>,
    vault: VaultCell,
    providers: BTreeMap<Platform, Arc<dyn PlatformApi>>,
    config: PlatformsConfig,
}

fn sha256(value: &str) -> [u8; 32] {
    Sha256::digest(value.as_bytes()).into()
}

/// Associated data binding a sealed token to its row and role.
fn token_aad(user_id: Uuid, platform: Platform, role: &str) -> Vec<u8> {
    format!("{user_id}:{platform}:{role}").into_bytes()
}

fn invalid(field: &'static str, description: impl Into<String>) -> PlatformError {
    PlatformError::Invalid(vec![FieldViolation::new(field, description.into())])
}

fn unavailable(platform: Platform) -> PlatformError {
    PlatformError::Unavailable {
        platform,
        retry_after: Duration::from_secs(1),
    }
}

impl PlatformService {
    /// `providers`: the platforms with a client configured (the adapter
    /// builds them from `config`; a platform without one is disabled).
    pub fn new(
        store: Arc<dyn PlatformStore>,
        vault: Arc<Vault>,
        config: &PlatformsConfig,
        providers: impl IntoIterator<Item = Arc<dyn PlatformApi>>,
    ) -> Self {
        Self {
            store,
            vault: Arc::new(arc_swap::ArcSwap::new(vault)),
            providers: providers.into_iter().map(|p| (p.platform(), p)).collect(),
            config: config.clone(),
        }
    }

    /// Puts a reloaded vault in force: new seals use its current key;
    /// tokens sealed under any of its keys open.
    pub fn replace_vault(&self, vault: Vault) {
        self.vault.store(Arc::new(vault));
    }

    /// When a vault key published ahead of its time starts to seal.
    pub fn next_vault_activation(&self) -> Option<time::OffsetDateTime> {
        self.vault.load().next_activation()
    }

    /// The platforms with a client configured.
    pub fn enabled(&self) -> Vec<Platform> {
        self.providers.keys().copied().collect()
    }

    fn provider(&self, platform: Platform) -> Result<&Arc<dyn PlatformApi>, PlatformError> {
        self.providers
            .get(&platform)
            .ok_or(PlatformError::Disabled(platform))
    }
}

/// The headers an EventSub call carries.
#[derive(Debug, Default)]
pub struct EventSubHeaders<'a> {
    pub message_id: Option<&'a str>,
    pub timestamp: Option<&'a str>,
    pub signature: Option<&'a str>,
    pub message_type: Option<&'a str>,
}

fn verifier_aad(user_id: Uuid, platform: Platform, state_hash: &[u8; 32]) -> Vec<u8> {
    format!("{user_id}:{platform}:pkce:{}", hex::encode(state_hash)).into_bytes()
}

fn open_tokens(
    vault: &Vault,
    stored: &StoredAccount,
) -> Result<(SecretString, Option<SecretString>), super::vault::VaultError> {
    open_sealed(
        vault,
        stored.account.user_id,
        stored.account.platform,
        &stored.tokens,
    )
}

fn open_sealed(
    vault: &Vault,
    user: Uuid,
    platform: Platform,
    tokens: &SealedTokens,
) -> Result<(SecretString, Option<SecretString>), super::vault::VaultError> {
    let access = vault.open(
        &tokens.key_id,
        &tokens.access,
        &token_aad(user, platform, "access"),
    )?;
    let refresh = tokens
        .refresh
        .as_ref()
        .map(|r| vault.open(&tokens.key_id, r, &token_aad(user, platform, "refresh")))
        .transpose()?;
    Ok((access, refresh))
}

fn seal_tokens(
    vault: &Vault,
    user_id: Uuid,
    platform: Platform,
    access: &SecretString,
    refresh: Option<&SecretString>,
    expires_at: Option<OffsetDateTime>,
) -> SealedTokens {
    let access = vault.seal(
        access.expose_secret(),
        &token_aad(user_id, platform, "access"),
    );
    let refresh = refresh.map(|r| {
        vault
            .seal(r.expose_secret(), &token_aad(user_id, platform, "refresh"))
            .bytes
    });
    SealedTokens {
        key_id: access.key_id,
        access: access.bytes,
        refresh,
        expires_at,
    }
}

/// A platform failure during linking: nothing is stored.
fn link_error(platform: Platform, error: CallError) -> PlatformError {
    match error {
        CallError::RateLimited { retry_after } => PlatformError::Unavailable {
            platform,
            retry_after,
        },
        CallError::InvalidGrant(reason) | CallError::Refused(reason) => {
            PlatformError::Refused { platform, reason }
        }
        CallError::Transient(why) => {
            tracing::warn!(%platform, why, "platform unavailable during link");
            unavailable(platform)
        }
    }
}

/// Everything one refresh needs, owned, so it can run detached.
struct Refresher {
    store: Arc<dyn PlatformStore>,
    vault: VaultCell,
    provider: Arc<dyn PlatformApi>,
}

impl Refresher {
    /// Refreshes `stored`, whose lease the caller holds: stores the new
    /// tokens (the rotated refresh token included) before returning the
    /// access token; marks the account `reauth_required` on `invalid_grant`;
    /// releases the lease on a transient failure.
    async fn refresh(
        &self,
        stored: StoredAccount,
        ctx: &RequestContext,
    ) -> Result<AccessGrant, PlatformError> {
        let platform = stored.account.platform;
        let user_id = stored.account.user_id;
        let count = |outcome: &'static str| {
            metrics::counter!("platform_token_refreshes_total", "platform" => platform.as_str(), "outcome" => outcome)
                .increment(1);
        };
        let (access, refresh) = match open_tokens(&self.vault.load(), &stored) {
            Ok(tokens) => tokens,
            Err(error) => {
                self.store
                    .release_refresh_lease(user_id, platform, stored.version)
                    .await?;
                return Err(error.into());
            }
        };
        match self.provider.refresh(refresh.as_ref(), &access).await {
            Ok(Grant {
                access_token,
                refresh_token,
                expires_in,
                scopes,
            }) => {
                // A platform that does not rotate keeps the old token valid.
                let refresh = refresh_token.or(refresh);
                let expires_at = expires_in.map(|d| crate::now_micros() + d);
                let tokens = seal_tokens(
                    &self.vault.load(),
                    user_id,
                    platform,
                    &access_token,
                    refresh.as_ref(),
                    expires_at,
                );
                let stored_ok = self
                    .store
                    .replace_tokens(
                        user_id,
                        platform,
                        stored.version,
                        &tokens,
                        scopes.as_deref(),
                    )
                    .await?;
                if !stored_ok {
                    // Re-linked or disconnected meanwhile: the new tokens
                    // belong to a row that no longer exists.
                    count("superseded");
                    return Err(PlatformError::NotLinked(platform));
                }
                count("refreshed");
                Ok(AccessGrant {
                    access_token,
                    expires_at,
                    platform_user_id: stored.account.platform_user_id,
                    scopes: scopes.unwrap_or(stored.account.scopes),
                })
            }
            Err(CallError::InvalidGrant(reason)) => {
                count("reauth_required");
                tracing::info!(%platform, %user_id, reason, "platform refused the refresh: re-link required");
                let event = OutboxEvent::platform_reauth_required(
                    &stored.account,
                    AccountStatus::ReauthRequired,
                    "refresh_refused",
                    ctx,
                );
                self.store
                    .set_status(user_id, platform, AccountStatus::ReauthRequired, &event)
                    .await?;
                Err(PlatformError::ReauthRequired {
                    platform,
                    status: AccountStatus::ReauthRequired.as_str(),
                })
            }
            Err(CallError::RateLimited { retry_after }) => {
                count("rate_limited");
                // Every replica waits as the platform asked, not only this one.
                let until = OffsetDateTime::now_utc() + retry_after;
                tracing::warn!(%platform, ?retry_after, "platform rate limit: no calls before its reset");
                self.store
                    .set_platform_cooldown(platform.as_str(), until)
                    .await?;
                self.store
                    .release_refresh_lease(user_id, platform, stored.version)
                    .await?;
                Err(PlatformError::Unavailable {
                    platform,
                    retry_after,
                })
            }
            Err(error) => {
                count("failed");
                tracing::warn!(%platform, %error, "platform refresh failed");
                self.store
                    .release_refresh_lease(user_id, platform, stored.version)
                    .await?;
                Err(unavailable(platform))
            }
        }
    }
}
