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

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    AccountStatus, Platform, PlatformAccount, PlatformError,
    provider::{CallError, Grant, Provider},
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
    providers: BTreeMap<Platform, Arc<Provider>>,
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
    pub fn new(
        store: Arc<dyn PlatformStore>,
        vault: Arc<Vault>,
        config: &PlatformsConfig,
    ) -> anyhow::Result<Self> {
        let mut providers = BTreeMap::new();
        let timeout = Duration::from_millis(config.http_timeout_ms);
        for platform in Platform::ALL {
            if let Some(provider) = Provider::new(
                platform,
                config.provider(platform),
                timeout,
                config.retry_attempts,
            )? {
                providers.insert(platform, Arc::new(provider));
            }
        }
        Ok(Self {
            store,
            vault: Arc::new(arc_swap::ArcSwap::new(vault)),
            providers,
            config: config.clone(),
        })
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

    fn provider(&self, platform: Platform) -> Result<&Arc<Provider>, PlatformError> {
        self.providers
            .get(&platform)
            .ok_or(PlatformError::Disabled(platform))
    }

    /// A single-use state bound to the caller, the platform and its redirect
    /// URI, and the platform's authorization URL carrying it (and the PKCE
    /// challenge where supported).
    pub async fn start_link(
        &self,
        caller: &Principal,
        platform: Platform,
    ) -> Result<StartedLink, PlatformError> {
        let provider = self.provider(platform)?;
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).expect("the OS random source works");
        let state = URL_SAFE_NO_PAD.encode(raw);
        let state_hash = sha256(&state);
        let (authorization_url, verifier) = provider.authorization_url(&state);
        let aad = verifier_aad(caller.user_id, platform, &state_hash);
        let expires_at = crate::now_micros() + Duration::from_secs(self.config.state_ttl_secs);
        let link = LinkState {
            user_id: caller.user_id,
            platform,
            redirect_uri: provider.redirect_uri().to_owned(),
            verifier: verifier
                .as_ref()
                .map(|v| self.vault.load().seal(v.expose_secret(), &aad)),
            expires_at,
        };
        self.store.insert_link_state(&state_hash, &link).await?;
        metrics::counter!("platform_links_total", "platform" => platform.as_str(), "outcome" => "started")
            .increment(1);
        Ok(StartedLink {
            authorization_url,
            state,
            expires_at,
            pkce: verifier.is_some(),
        })
    }

    /// Completes a link: spends the state, exchanges the code (with the PKCE
    /// verifier), reads the platform identity and stores the account with
    /// its `platform_connected` event. `platform_error` is the `error` the
    /// platform put on the redirect instead of a code (`access_denied`).
    pub async fn connect(
        &self,
        caller: &Principal,
        platform: Platform,
        code: &str,
        state: &str,
        platform_error: &str,
        ctx: &RequestContext,
    ) -> Result<PlatformAccount, PlatformError> {
        let provider = self.provider(platform)?;
        let mut violations = Vec::new();
        if state.is_empty() {
            violations.push(FieldViolation::new("state", "is required"));
        } else if state.len() > MAX_STATE_LEN {
            violations.push(FieldViolation::new("state", "is too long"));
        }
        if platform_error.is_empty() && code.is_empty() {
            violations.push(FieldViolation::new("code", "is required"));
        } else if code.len() > MAX_CODE_LEN || platform_error.len() > MAX_STATE_LEN {
            violations.push(FieldViolation::new("code", "is too long"));
        }
        if !violations.is_empty() {
            return Err(PlatformError::Invalid(violations));
        }
        // A platform cooling down after a 429 is not called, for a link as
        // for a refresh; the state is kept for the retry.
        let now = OffsetDateTime::now_utc();
        if let Some(until) = self
            .store
            .platform_cooldown(platform.as_str())
            .await?
            .filter(|until| *until > now)
        {
            return Err(PlatformError::Unavailable {
                platform,
                retry_after: (until - now).try_into().unwrap_or(Duration::from_secs(1)),
            });
        }
        let outcome = |o: &'static str| {
            metrics::counter!("platform_links_total", "platform" => platform.as_str(), "outcome" => o)
                .increment(1);
        };
        let state_hash = sha256(state);
        // Taken (deleted) whatever follows: a state is good for one try.
        let link = self
            .store
            .take_link_state(&state_hash)
            .await?
            .ok_or_else(|| invalid("state", "is unknown or was already used"))?;
        if link.user_id != caller.user_id || link.platform != platform {
            outcome("wrong_party");
            return Err(invalid(
                "state",
                "was issued to another user or for another platform",
            ));
        }
        if link.expires_at < OffsetDateTime::now_utc() {
            outcome("expired");
            return Err(invalid("state", "has expired; start the link again"));
        }
        if link.redirect_uri != provider.redirect_uri() {
            return Err(invalid(
                "state",
                "was issued for another redirect URI; start the link again",
            ));
        }
        if !platform_error.is_empty() {
            outcome("denied");
            return Err(PlatformError::Refused {
                platform,
                reason: platform_error.to_owned(),
            });
        }
        let verifier = match &link.verifier {
            Some(sealed) => Some(self.vault.load().open(
                &sealed.key_id,
                &sealed.bytes,
                &verifier_aad(caller.user_id, platform, &state_hash),
            )?),
            None => None,
        };
        let grant = match provider.exchange_code(code, verifier.as_ref()).await {
            Ok(grant) => grant,
            Err(e) => {
                outcome("refused");
                return Err(self.link_error(platform, e).await);
            }
        };
        let identity = match provider.identity(&grant.access_token).await {
            Ok(identity) => identity,
            Err(e) => return Err(self.link_error(platform, e).await),
        };
        let now = crate::now_micros();
        let account = PlatformAccount {
            user_id: caller.user_id,
            platform,
            platform_user_id: identity.platform_user_id,
            login: identity.login,
            display_name: identity.display_name,
            scopes: grant
                .scopes
                .clone()
                .unwrap_or_else(|| provider.scopes().to_vec()),
            status: AccountStatus::Active,
            connected_at: now,
            token_expires_at: grant.expires_in.map(|d| now + d),
        };
        let tokens = self.seal(
            caller.user_id,
            platform,
            &grant.access_token,
            grant.refresh_token.as_ref(),
            account.token_expires_at,
        );
        // Distinct from any version a previous link of this row had.
        let version = i64::try_from(now.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX);
        let event = OutboxEvent::platform_connected(&account, ctx);
        match self
            .store
            .link_account(
                &account,
                &tokens,
                version,
                &event,
                platform.revocation_ends_every_grant(),
                ctx,
            )
            .await?
        {
            LinkOutcome::Linked => {
                outcome("linked");
                Ok(account)
            }
            LinkOutcome::LinkedElsewhere => {
                outcome("linked_elsewhere");
                // The grant just obtained is of no use: hand it back.
                let provider = provider.clone();
                tokio::spawn(async move {
                    let _ = provider
                        .revoke(&grant.access_token, grant.refresh_token.as_ref())
                        .await;
                });
                Err(PlatformError::LinkedElsewhere(platform))
            }
        }
    }

    /// The caller's linked accounts (never tokens).
    pub async fn list(&self, caller: &Principal) -> Result<Vec<PlatformAccount>, PlatformError> {
        Ok(self.store.accounts_of(caller.user_id).await?)
    }

    /// Revokes the grant at the platform and deletes the account. When the
    /// platform answers at once (revoked, already dead, or no revocation
    /// endpoint), the account goes with its `platform_disconnected` event;
    /// when it does not (down, 5xx, 429), the account goes at once and its
    /// grant waits in `platform_grant_revocations`, revoked by the
    /// keep-alive task like a deleted user's, which writes the event when
    /// the platform answers. Returns whether the platform revoked it now.
    pub async fn disconnect(
        &self,
        caller: &Principal,
        platform: Platform,
        ctx: &RequestContext,
    ) -> Result<bool, PlatformError> {
        self.provider(platform)?;
        let stored = self
            .store
            .find_account(caller.user_id, platform)
            .await?
            .ok_or(PlatformError::NotLinked(platform))?;
        let now = OffsetDateTime::now_utc();
        let mut pending = PendingRevocation::of(&stored, now, "disconnected");
        let gone = match self.revoke_grant(&mut pending, now).await {
            Ok(outcome) => {
                let event =
                    OutboxEvent::platform_disconnected(&stored.account, outcome.as_str(), ctx);
                metrics::counter!("platform_grant_revocations_total", "platform" => platform.as_str(), "outcome" => outcome.as_str()).increment(1);
                self.store
                    .delete_account(
                        caller.user_id,
                        platform,
                        stored.account.connected_at,
                        &event,
                    )
                    .await?
                    .then_some(outcome == GrantRevocation::Revoked)
            }
            Err(next) => {
                metrics::counter!("platform_grant_revocations_total", "platform" => platform.as_str(), "outcome" => "retrying").increment(1);
                self.store
                    .queue_grant_revocation(&pending, stored.account.connected_at, next)
                    .await?
                    .then_some(false)
            }
        };
        gone.ok_or(PlatformError::NotLinked(platform))
    }

    /// A valid access token of `user_id`'s account on `platform`, refreshed
    /// first when it expires within the skew.
    /// `rejected`: the token the caller was given and the platform refused
    /// (401). It forces one refresh only while it is still the stored token;
    /// a token that is not the current one (refreshed meanwhile, or never
    /// ours) is answered with the current token and no refresh, so a caller
    /// cannot force refreshes at will.
    pub async fn access_token(
        &self,
        caller: &ServiceCaller,
        user_id: &str,
        platform: Platform,
        rejected: Option<&str>,
        ctx: &RequestContext,
    ) -> Result<AccessGrant, PlatformError> {
        let user_id =
            Uuid::parse_str(user_id.trim()).map_err(|_| invalid("user_id", "must be a UUID"))?;
        if rejected.is_some_and(|t| t.len() > MAX_PLATFORM_TOKEN_BYTES) {
            return Err(invalid(
                "rejected_token",
                "is longer than any platform token",
            ));
        }
        tracing::debug!(caller = caller.name(), %user_id, %platform, "platform token requested");
        let provider = self.provider(platform)?.clone();
        let skew = Duration::from_secs(self.config.refresh_skew_secs);
        let lease = Duration::from_millis(self.config.refresh_lease_ms);
        // Waiting for another replica's refresh is bounded by its lease.
        let give_up = tokio::time::Instant::now() + lease + Duration::from_millis(500);
        loop {
            let stored = self
                .store
                .find_account(user_id, platform)
                .await?
                .ok_or(PlatformError::NotLinked(platform))?;
            if !stored.user_active {
                // A suspended or deleted user's platform tokens are not
                // handed out.
                return Err(PlatformError::UserInactive);
            }
            if stored.account.status != AccountStatus::Active {
                return Err(PlatformError::ReauthRequired {
                    platform,
                    status: stored.account.status.as_str(),
                });
            }
            let now = OffsetDateTime::now_utc();
            // The caller saw the stored token refused: it is dead, whatever
            // its expiry says. Compared in constant time.
            let dead = match rejected {
                Some(r) => {
                    let (current, _) = self.open(&stored)?;
                    subtle::ConstantTimeEq::ct_eq(r.as_bytes(), current.expose_secret().as_bytes())
                        .into()
                }
                None => false,
            };
            if dead {
                metrics::counter!("platform_token_rejections_total", "platform" => platform.as_str())
                    .increment(1);
            }
            if !dead && stored.tokens.expires_at.is_none_or(|e| e > now + skew) {
                metrics::counter!("platform_token_reads_total", "platform" => platform.as_str(), "path" => "fresh")
                    .increment(1);
                return self.grant_from(&stored);
            }
            let leased = stored.lease_until.is_some_and(|until| until > now);
            if leased
                && !dead
                && stored
                    .tokens
                    .expires_at
                    .is_some_and(|e| e > now + STILL_USABLE)
            {
                // Another caller is refreshing; the current token is still
                // good for a while: no need to wait for the new one.
                metrics::counter!("platform_token_reads_total", "platform" => platform.as_str(), "path" => "during_refresh")
                    .increment(1);
                return self.grant_from(&stored);
            }
            // A platform that answered 429 is not called by any replica
            // before its time: the current token while it is still good,
            // else Unavailable with the platform's own wait.
            if !leased
                && let Some(until) = self
                    .store
                    .platform_cooldown(platform.as_str())
                    .await?
                    .filter(|until| *until > now)
            {
                if !dead
                    && stored
                        .tokens
                        .expires_at
                        .is_some_and(|e| e > now + STILL_USABLE)
                {
                    return self.grant_from(&stored);
                }
                metrics::counter!("platform_token_reads_total", "platform" => platform.as_str(), "path" => "rate_limited")
                    .increment(1);
                return Err(PlatformError::Unavailable {
                    platform,
                    retry_after: Duration::try_from(until - now)
                        .unwrap_or(Duration::from_secs(1))
                        .max(Duration::from_secs(1)),
                });
            }
            if !leased
                && self
                    .store
                    .take_refresh_lease(user_id, platform, stored.version, now, now + lease)
                    .await?
            {
                // Detached: it finishes and stores even if this call is
                // dropped.
                let this = self.refresher(provider.clone());
                let ctx = ctx.clone();
                let refresh = async move { this.refresh(stored, &ctx).await };
                return tokio::spawn(tracing::Instrument::in_current_span(refresh))
                    .await
                    .map_err(|_| unavailable(platform))?;
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(unavailable(platform));
            }
            tokio::time::sleep(LEASE_POLL).await;
        }
    }

    fn refresher(&self, provider: Arc<Provider>) -> Refresher {
        Refresher {
            store: self.store.clone(),
            vault: self.vault.clone(),
            provider,
        }
    }

    fn grant_from(&self, stored: &StoredAccount) -> Result<AccessGrant, PlatformError> {
        let (access, _) = self.open(stored)?;
        Ok(AccessGrant {
            access_token: access,
            expires_at: stored.tokens.expires_at,
            platform_user_id: stored.account.platform_user_id.clone(),
            scopes: stored.account.scopes.clone(),
        })
    }

    fn open(
        &self,
        stored: &StoredAccount,
    ) -> Result<(SecretString, Option<SecretString>), super::vault::VaultError> {
        open_tokens(&self.vault.load(), stored)
    }

    fn seal(
        &self,
        user_id: Uuid,
        platform: Platform,
        access: &SecretString,
        refresh: Option<&SecretString>,
        expires_at: Option<OffsetDateTime>,
    ) -> SealedTokens {
        seal_tokens(
            &self.vault.load(),
            user_id,
            platform,
            access,
            refresh,
            expires_at,
        )
    }

    /// The platform says the user removed this application: mark the
    /// account revoked with a `platform_reauth_required` event. False when
    /// no account matches or it was already revoked.
    pub async fn revoked_at_platform(
        &self,
        platform: Platform,
        platform_user_id: &str,
        reason: &str,
        ctx: &RequestContext,
    ) -> Result<bool, PlatformError> {
        let Some(stored) = self
            .store
            .find_by_platform_user(platform, platform_user_id)
            .await?
        else {
            return Ok(false);
        };
        let event = OutboxEvent::platform_reauth_required(
            &stored.account,
            AccountStatus::Revoked,
            reason,
            ctx,
        );
        Ok(self
            .store
            .set_status(
                stored.account.user_id,
                platform,
                AccountStatus::Revoked,
                &event,
            )
            .await?)
    }

    /// The key a platform's webhook is signed with; the webhook exists only
    /// for an enabled platform with that key configured.
    fn webhook_secret<'a>(
        &self,
        platform: Platform,
        secret: &'a Option<SecretString>,
    ) -> Result<&'a SecretString, WebhookError> {
        secret
            .as_ref()
            .filter(|_| self.providers.contains_key(&platform))
            .ok_or(WebhookError::NotConfigured)
    }

    /// Twitch EventSub over the webhook transport: signature, age, replay,
    /// then the message.
    pub async fn eventsub(
        &self,
        headers: &EventSubHeaders<'_>,
        body: &[u8],
    ) -> Result<EventSubReply, WebhookError> {
        let secret = self.webhook_secret(Platform::Twitch, &self.config.twitch.webhook_secret)?;
        let (Some(id), Some(timestamp), Some(signature), Some(kind)) = (
            headers.message_id,
            headers.timestamp,
            headers.signature,
            headers.message_type,
        ) else {
            return Err(WebhookError::Forbidden("missing EventSub headers"));
        };
        if !webhooks::eventsub_signature_valid(
            secret.expose_secret().as_bytes(),
            id,
            timestamp,
            body,
            signature,
        ) {
            metrics::counter!("webhook_messages_total", "source" => "twitch", "outcome" => "bad_signature").increment(1);
            return Err(WebhookError::Forbidden("signature does not match"));
        }
        let now = OffsetDateTime::now_utc();
        let max_age = Duration::from_secs(self.config.webhook_max_age_secs);
        if !webhooks::eventsub_timestamp(timestamp)
            .is_some_and(|at| webhooks::fresh(at, now, max_age))
        {
            metrics::counter!("webhook_messages_total", "source" => "twitch", "outcome" => "stale")
                .increment(1);
            return Err(WebhookError::Forbidden(
                "message is older than the replay window",
            ));
        }
        let message: serde_json::Value = serde_json::from_slice(body)
            .map_err(|_| WebhookError::Malformed("body is not JSON"))?;
        let first = self
            .store
            .record_webhook_message("twitch", id, now)
            .await
            .map_err(|_| WebhookError::Unavailable)?;
        if !first {
            metrics::counter!("webhook_messages_total", "source" => "twitch", "outcome" => "duplicate").increment(1);
            return Ok(EventSubReply::Duplicate);
        }
        metrics::counter!("webhook_messages_total", "source" => "twitch", "outcome" => "accepted")
            .increment(1);
        match kind {
            "webhook_callback_verification" => message
                .get("challenge")
                .and_then(|c| c.as_str())
                .map(|c| EventSubReply::Challenge(c.to_owned()))
                .ok_or(WebhookError::Malformed("verification without challenge")),
            "revocation" => {
                let status = message
                    .pointer("/subscription/status")
                    .and_then(|s| s.as_str())
                    .unwrap_or("unknown");
                tracing::warn!(status, "Twitch revoked an EventSub subscription");
                Ok(EventSubReply::Accepted)
            }
            "notification" => {
                let subscription = message
                    .pointer("/subscription/type")
                    .and_then(|s| s.as_str());
                if subscription == Some("user.authorization.revoke") {
                    let user = message
                        .pointer("/event/user_id")
                        .and_then(|s| s.as_str())
                        .ok_or(WebhookError::Malformed("revoke without event.user_id"))?;
                    let applied = self
                        .revoked_at_platform(
                            Platform::Twitch,
                            user,
                            "authorization_revoked",
                            &RequestContext::default(),
                        )
                        .await;
                    if let Err(error) = applied {
                        tracing::warn!(%error, "EventSub revoke not applied; Twitch will retry");
                        // Forgotten so that the retry is applied.
                        let _ = self.store.forget_webhook_message("twitch", id).await;
                        return Err(WebhookError::Unavailable);
                    }
                }
                Ok(EventSubReply::Accepted)
            }
            _ => Ok(EventSubReply::Accepted),
        }
    }

    /// Facebook's deauthorize callback (`signed_request` form field).
    pub async fn facebook_deauthorize(&self, signed_request: &str) -> Result<(), WebhookError> {
        // Facebook signs with the app secret.
        let secret =
            self.webhook_secret(Platform::Facebook, &self.config.facebook.client_secret)?;
        let request = webhooks::facebook_signed_request_verified(
            signed_request,
            secret.expose_secret().as_bytes(),
        )
        .map_err(|e| {
            metrics::counter!("webhook_messages_total", "source" => "facebook", "outcome" => "bad_signature").increment(1);
            match e {
                webhooks::SignedRequestError::BadSignature => {
                    WebhookError::Forbidden("signature does not match")
                }
                _ => WebhookError::Forbidden("malformed signed_request"),
            }
        })?;
        // Fresh and first, like EventSub: a captured callback replayed
        // later (after the user linked again) must not unlink them.
        let now = OffsetDateTime::now_utc();
        let max_age = Duration::from_secs(self.config.webhook_max_age_secs);
        if !request
            .issued_at
            .and_then(|at| OffsetDateTime::from_unix_timestamp(at).ok())
            .is_some_and(|at| webhooks::fresh(at, now, max_age))
        {
            metrics::counter!("webhook_messages_total", "source" => "facebook", "outcome" => "stale")
                .increment(1);
            return Err(WebhookError::Forbidden(
                "signed_request is older than the replay window (issued_at)",
            ));
        }
        let first = self
            .store
            .record_webhook_message("facebook", &request.id, now)
            .await
            .map_err(|_| WebhookError::Unavailable)?;
        if !first {
            metrics::counter!("webhook_messages_total", "source" => "facebook", "outcome" => "duplicate").increment(1);
            return Ok(());
        }
        metrics::counter!("webhook_messages_total", "source" => "facebook", "outcome" => "accepted").increment(1);
        let applied = self
            .revoked_at_platform(
                Platform::Facebook,
                &request.user_id,
                "deauthorized",
                &RequestContext::default(),
            )
            .await;
        if applied.is_err() {
            // Forgotten so that Facebook's retry is applied.
            let _ = self
                .store
                .forget_webhook_message("facebook", &request.id)
                .await;
            return Err(WebhookError::Unavailable);
        }
        Ok(())
    }

    /// One keep-alive round: re-exchange Facebook tokens nearing expiry and
    /// validate Twitch tokens not validated within the hour, a bounded batch
    /// each (replicas share the work through the database), then purge
    /// spent link states and old webhook ids.
    pub async fn keepalive(&self) -> Result<KeepaliveReport, PlatformError> {
        let mut report = KeepaliveReport::default();
        let now = OffsetDateTime::now_utc();
        let lease = Duration::from_millis(self.config.refresh_lease_ms);
        let ctx = RequestContext::default();
        for (&platform, provider) in &self.providers {
            // A platform that answered 429 is left alone until its reset,
            // by this round as by callers.
            if self
                .store
                .platform_cooldown(platform.as_str())
                .await?
                .is_some_and(|until| until > now)
            {
                report.rate_limited += 1;
                continue;
            }
            let refresher = self.refresher(provider.clone());
            if provider.profile.refresh == super::provider::RefreshModel::ExchangeLongLived {
                let due = self
                    .store
                    .expiring(
                        platform,
                        now + Duration::from_secs(self.config.extend_ahead_secs),
                        now,
                        self.config.keepalive_batch,
                    )
                    .await?;
                for stored in due {
                    let outcome = self
                        .leased_refresh(&refresher, stored, now, lease, &ctx)
                        .await?;
                    report.count(outcome, |r| r.extended += 1);
                }
            }
            if self.config.provider(platform).validate_url.is_some() && platform == Platform::Twitch
            {
                let cutoff = now - Duration::from_secs(self.config.validate_interval_secs);
                let due = self
                    .store
                    .claim_validation(platform, cutoff, now, self.config.keepalive_batch)
                    .await?;
                for stored in due {
                    let Ok((access, _)) = self.open(&stored) else {
                        report.failed += 1;
                        continue;
                    };
                    match provider.validate(&access).await {
                        Ok(true) => report.validated += 1,
                        Ok(false) => {
                            // Invalid before its time: refresh now; a dead
                            // refresh token marks the account.
                            let outcome = self
                                .leased_refresh(&refresher, stored, now, lease, &ctx)
                                .await?;
                            report.count(outcome, |r| r.validated += 1);
                        }
                        Err(CallError::RateLimited { retry_after }) => {
                            // Every replica's round and every caller waits.
                            self.store
                                .set_platform_cooldown(
                                    platform.as_str(),
                                    OffsetDateTime::now_utc() + retry_after,
                                )
                                .await?;
                            report.failed += 1;
                            break;
                        }
                        Err(error) => {
                            tracing::debug!(%platform, %error, "token validation failed");
                            report.failed += 1;
                        }
                    }
                }
            }
        }
        let max_age = Duration::from_secs(self.config.webhook_max_age_secs);
        self.store
            .purge_platform_state(now, now - max_age * 2)
            .await?;
        Ok(report)
    }

    /// Refreshes `stored` if this replica takes its lease (`None`: another
    /// replica has it, or the row moved on).
    async fn leased_refresh(
        &self,
        refresher: &Refresher,
        stored: StoredAccount,
        now: OffsetDateTime,
        lease: Duration,
        ctx: &RequestContext,
    ) -> Result<Option<Result<AccessGrant, PlatformError>>, PlatformError> {
        let taken = self
            .store
            .take_refresh_lease(
                stored.account.user_id,
                stored.account.platform,
                stored.version,
                now,
                now + lease,
            )
            .await?;
        Ok(match taken {
            true => Some(refresher.refresh(stored, ctx).await),
            false => None,
        })
    }

    /// Runs [`keepalive`](Self::keepalive) every `keepalive_interval_secs`
    /// (with jitter) until `stop`.
    pub async fn run_keepalive(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let period = Duration::from_secs(self.config.keepalive_interval_secs);
        if period.is_zero() || self.providers.is_empty() {
            return;
        }
        loop {
            let mut jitter = [0u8; 2];
            let _ = getrandom::fill(&mut jitter);
            let pause =
                period + period.mul_f64(f64::from(u16::from_le_bytes(jitter)) / 65535.0 / 4.0);
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
            match self.keepalive().await {
                Ok(report) if report != KeepaliveReport::default() => {
                    tracing::info!(?report, "platform keep-alive round")
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "platform keep-alive round failed"),
            }
            match self.revoke_pending_grants(OffsetDateTime::now_utc()).await {
                Ok(report) if report != GrantRevocationReport::default() => {
                    tracing::info!(?report, "deleted users' grants revoked at the platforms")
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "revoking deleted users' grants failed"),
            }
        }
    }

    /// Revokes at their platforms the queued grants (deleted users', and
    /// disconnects the platform did not answer at once) that are due
    /// at `now` (a bounded batch, claimed so that replicas share the work):
    /// each one the platform answers for — revoked, already dead, or no
    /// revocation endpoint — leaves the queue with its
    /// `platform_disconnected` event in one transaction; one without an
    /// answer is tried again after a doubling wait (a 429's own wait, shared
    /// with every replica through `platform_cooldowns`). Nothing is dropped
    /// without an answer.
    pub async fn revoke_pending_grants(
        &self,
        now: OffsetDateTime,
    ) -> Result<GrantRevocationReport, PlatformError> {
        let mut report = GrantRevocationReport::default();
        let claimed = self
            .store
            .claim_grant_revocations(
                now,
                now + GRANT_REVOCATION_CLAIM,
                self.config.keepalive_batch.min(GRANT_REVOCATION_BATCH),
            )
            .await?;
        for mut pending in claimed {
            match self.revoke_grant(&mut pending, now).await {
                Ok(outcome) => {
                    let event = OutboxEvent::platform_grant_revoked(
                        pending.user_id,
                        pending.platform,
                        &pending.platform_user_id,
                        &pending.scopes,
                        outcome.as_str(),
                        &pending.reason,
                        &RequestContext::default(),
                    );
                    self.store.finish_grant_revocation(&pending, &event).await?;
                    metrics::counter!("platform_grant_revocations_total", "platform" => pending.platform.as_str(), "outcome" => outcome.as_str()).increment(1);
                    match outcome {
                        GrantRevocation::Revoked => report.revoked += 1,
                        GrantRevocation::AlreadyDead => report.already_dead += 1,
                        GrantRevocation::Unsupported => report.unsupported += 1,
                    }
                }
                Err(next) => {
                    self.store.retry_grant_revocation(&pending, next).await?;
                    metrics::counter!("platform_grant_revocations_total", "platform" => pending.platform.as_str(), "outcome" => "retrying").increment(1);
                    report.retrying += 1;
                    // Still retried (nothing is dropped without an answer),
                    // but no longer quietly.
                    if pending.attempts + 1 >= GRANT_REVOCATION_OVERDUE {
                        report.overdue += 1;
                        metrics::counter!("platform_grant_revocations_overdue_total", "platform" => pending.platform.as_str()).increment(1);
                        tracing::warn!(
                            platform = %pending.platform,
                            attempts = pending.attempts + 1,
                            queued_at = %pending.queued_at,
                            reason = %pending.reason,
                            "a grant still waits for its revocation at the platform"
                        );
                    }
                }
            }
        }
        Ok(report)
    }

    /// One attempt at revoking `pending`'s grant: how it ended, or when to
    /// try again.
    async fn revoke_grant(
        &self,
        pending: &mut PendingRevocation,
        now: OffsetDateTime,
    ) -> Result<GrantRevocation, OffsetDateTime> {
        let platform = pending.platform;
        let wait = GRANT_REVOCATION_BACKOFF
            .saturating_mul(1 << pending.attempts.clamp(0, 16))
            .min(GRANT_REVOCATION_MAX_WAIT);
        // From when this attempt ends, not when the batch began.
        let later = now.max(OffsetDateTime::now_utc()) + wait;
        let Ok(provider) = self.provider(platform) else {
            tracing::warn!(%platform, "a deleted user's grant waits: the platform is not configured here");
            return Err(later);
        };
        match self.store.platform_cooldown(platform.as_str()).await {
            Ok(Some(until)) if until > now => return Err(until),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%platform, %error, "platform cooldown unreadable; the grant revocation waits");
                return Err(later);
            }
        }
        let (access, refresh) = match open_sealed(
            &self.vault.load(),
            pending.user_id,
            platform,
            &pending.tokens,
        ) {
            Ok(tokens) => tokens,
            Err(error) => {
                tracing::error!(%platform, %error, "a deleted user's tokens do not open (vault key missing?); the grant revocation waits");
                return Err(later);
            }
        };
        match provider.revoke(&access, refresh.as_ref()).await {
            Ok(true) => Ok(GrantRevocation::Revoked),
            Ok(false) => Ok(GrantRevocation::Unsupported),
            // A platform that revokes by access token (Twitch) no longer
            // knows an expired one while the refresh token lives on — and
            // Twitch's refresh answer documents no `expires_in`, so the
            // expiry is not always known: refresh, and revoke the new one.
            Err(CallError::InvalidGrant(_))
                if refresh.is_some() && provider.revokes_by_access_token() =>
            {
                let grant = match provider.refresh(refresh.as_ref(), &access).await {
                    Ok(grant) => grant,
                    Err(CallError::InvalidGrant(_)) => return Ok(GrantRevocation::AlreadyDead),
                    Err(error) => {
                        return Err(self.retry_after_failure(platform, error, later).await);
                    }
                };
                let refresh = grant.refresh_token.or(refresh);
                // Twitch rotates the refresh token: a retry needs the new ones.
                pending.tokens = seal_tokens(
                    &self.vault.load(),
                    pending.user_id,
                    platform,
                    &grant.access_token,
                    refresh.as_ref(),
                    grant.expires_in.map(|ttl| crate::now_micros() + ttl),
                );
                pending.refreshed = true;
                match provider.revoke(&grant.access_token, refresh.as_ref()).await {
                    Ok(true) => Ok(GrantRevocation::Revoked),
                    Ok(false) => Ok(GrantRevocation::Unsupported),
                    Err(CallError::InvalidGrant(_)) => Ok(GrantRevocation::AlreadyDead),
                    Err(error) => Err(self.retry_after_failure(platform, error, later).await),
                }
            }
            Err(CallError::InvalidGrant(_)) => Ok(GrantRevocation::AlreadyDead),
            Err(error) => Err(self.retry_after_failure(platform, error, later).await),
        }
    }

    /// A platform failure during linking: nothing is stored, and a 429
    /// starts the platform's cooldown for every replica.
    async fn link_error(&self, platform: Platform, error: CallError) -> PlatformError {
        if let CallError::RateLimited { retry_after } = &error
            && let Err(e) = self
                .store
                .set_platform_cooldown(platform.as_str(), OffsetDateTime::now_utc() + *retry_after)
                .await
        {
            tracing::warn!(%platform, error = %e, "could not record the platform's 429");
        }
        link_error(platform, error)
    }

    /// When to try a platform call again after `error`: when a 429 said
    /// (stored for every replica), else `later`.
    async fn retry_after_failure(
        &self,
        platform: Platform,
        error: CallError,
        later: OffsetDateTime,
    ) -> OffsetDateTime {
        match error {
            CallError::RateLimited { retry_after } => {
                let until = OffsetDateTime::now_utc() + retry_after;
                if let Err(error) = self
                    .store
                    .set_platform_cooldown(platform.as_str(), until)
                    .await
                {
                    tracing::warn!(%platform, %error, "could not record the platform's 429");
                }
                until
            }
            error => {
                tracing::warn!(%platform, %error, "revoking a deleted user's grant got no answer; trying again later");
                later
            }
        }
    }

    /// Re-seals every account not under the current vault key; returns how
    /// many rows moved. Safe to run while serving (version-checked writes).
    pub async fn reseal_all(&self) -> Result<u64, PlatformError> {
        let mut moved = 0;
        let mut stuck = 0;
        loop {
            let rows = self
                .store
                .sealed_with_other_key(self.vault.load().current_key_id(), 100)
                .await?;
            if rows.len() <= stuck {
                return Ok(moved);
            }
            stuck = 0;
            for stored in rows {
                let (access, refresh) = self.open(&stored)?;
                let tokens = self.seal(
                    stored.account.user_id,
                    stored.account.platform,
                    &access,
                    refresh.as_ref(),
                    stored.tokens.expires_at,
                );
                if self
                    .store
                    .replace_tokens(
                        stored.account.user_id,
                        stored.account.platform,
                        stored.version,
                        &tokens,
                        None,
                    )
                    .await?
                {
                    moved += 1;
                } else {
                    stuck += 1;
                }
            }
        }
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
    provider: Arc<Provider>,
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
