//! The platform-account store role (implemented on SQL for PostgreSQL and
//! SQLite in `auth_storage::sql`).

use async_trait::async_trait;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{AccountStatus, Platform, PlatformAccount, vault::Sealed};
use crate::{
    error::BackendError,
    events::{OutboxEvent, RequestContext},
};

/// A started link, kept under the SHA-256 of its `state` until used once.
#[derive(Debug, Clone)]
pub struct LinkState {
    pub user_id: Uuid,
    pub platform: Platform,
    pub redirect_uri: String,
    /// The sealed PKCE verifier, for platforms with PKCE.
    pub verifier: Option<Sealed>,
    pub expires_at: OffsetDateTime,
}

/// Sealed tokens of one account; both under one key.
#[derive(Debug, Clone)]
pub struct SealedTokens {
    pub key_id: String,
    pub access: Vec<u8>,
    pub refresh: Option<Vec<u8>>,
    pub expires_at: Option<OffsetDateTime>,
}

/// An account row with what the refresh logic needs.
#[derive(Debug, Clone)]
pub struct StoredAccount {
    pub account: PlatformAccount,
    pub tokens: SealedTokens,
    /// Changes with every token write; a refresh writes only over the
    /// version it read.
    pub version: i64,
    /// Set while a replica refreshes this account.
    pub lease_until: Option<OffsetDateTime>,
    /// Whether the owning user is active (read by `find_account`; other
    /// reads leave it `true`).
    pub user_active: bool,
}

/// A deleted user's grant waiting to be revoked at its platform (its
/// linked account is gone; the sealed tokens wait here).
#[derive(Debug, Clone)]
pub struct PendingRevocation {
    pub user_id: Uuid,
    pub platform: Platform,
    /// When the user was deleted; with the two above, the row's key.
    pub queued_at: OffsetDateTime,
    pub platform_user_id: String,
    pub scopes: Vec<String>,
    pub tokens: SealedTokens,
    /// Attempts that did not get an answer from the platform so far.
    pub attempts: i32,
    /// `user_deleted`, or `disconnected` (the user's own disconnect, which
    /// the platform did not answer at once), or `relinked` (the platform
    /// account was linked again meanwhile and the grant's end announced
    /// then; only the old tokens' revocation is left).
    pub reason: String,
    /// `tokens` were refreshed during this attempt (Twitch rotates its
    /// refresh token: the old ones no longer work), and are what a retry
    /// must use.
    pub refreshed: bool,
}

impl PendingRevocation {
    /// `stored`'s grant, to be revoked for `reason`.
    pub fn of(stored: &StoredAccount, queued_at: OffsetDateTime, reason: &str) -> Self {
        Self {
            user_id: stored.account.user_id,
            platform: stored.account.platform,
            queued_at,
            platform_user_id: stored.account.platform_user_id.clone(),
            scopes: stored.account.scopes.clone(),
            tokens: stored.tokens.clone(),
            attempts: 0,
            reason: reason.to_owned(),
            refreshed: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkOutcome {
    Linked,
    /// The platform account belongs to another user; nothing changed.
    LinkedElsewhere,
}

#[async_trait]
pub trait PlatformStore: Send + Sync + 'static {
    async fn insert_link_state(
        &self,
        state_hash: &[u8; 32],
        state: &LinkState,
    ) -> Result<(), BackendError>;

    /// Deletes and returns the state (single use), expired or not; the
    /// caller checks the expiry and the binding.
    async fn take_link_state(
        &self,
        state_hash: &[u8; 32],
    ) -> Result<Option<LinkState>, BackendError>;

    /// Stores the account (replacing the user's previous account on this
    /// platform) and `event`, in one transaction — unless the platform
    /// account is linked to another user.
    ///
    /// A revocation still queued for this platform account (the user
    /// disconnected it, or a deleted user had it) is settled in the same
    /// transaction, its `platform_disconnected` written before `event` so
    /// consumers see the old link end before the new one starts:
    /// - `ends_every_grant` (Google, Facebook: revoking one grant ends all
    ///   the user gave the app, the one being linked too): the row goes,
    ///   `revocation: superseded`;
    /// - otherwise (Twitch, SOOP revoke the token presented): the row stays
    ///   to revoke the old tokens, marked `relinked` so that finishing it
    ///   writes no second event; `revocation: queued`.
    async fn link_account(
        &self,
        account: &PlatformAccount,
        tokens: &SealedTokens,
        version: i64,
        event: &OutboxEvent,
        ends_every_grant: bool,
        ctx: &RequestContext,
    ) -> Result<LinkOutcome, BackendError>;

    async fn accounts_of(&self, user_id: Uuid) -> Result<Vec<PlatformAccount>, BackendError>;

    async fn find_account(
        &self,
        user_id: Uuid,
        platform: Platform,
    ) -> Result<Option<StoredAccount>, BackendError>;

    async fn find_by_platform_user(
        &self,
        platform: Platform,
        platform_user_id: &str,
    ) -> Result<Option<StoredAccount>, BackendError>;

    /// Deletes the account linked at `connected_at` and writes `event`;
    /// false when there is none (gone, or linked again since).
    async fn delete_account(
        &self,
        user_id: Uuid,
        platform: Platform,
        connected_at: OffsetDateTime,
        event: &OutboxEvent,
    ) -> Result<bool, BackendError>;

    /// Takes the refresh lease until `until` if the row is still at
    /// `version`, active, and no live lease holds it.
    async fn take_refresh_lease(
        &self,
        user_id: Uuid,
        platform: Platform,
        version: i64,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, BackendError>;

    /// Replaces the tokens of the row at `version` (version + 1, lease
    /// released, `scopes` if given); false when the row moved on.
    async fn replace_tokens(
        &self,
        user_id: Uuid,
        platform: Platform,
        version: i64,
        tokens: &SealedTokens,
        scopes: Option<&[String]>,
    ) -> Result<bool, BackendError>;

    async fn release_refresh_lease(
        &self,
        user_id: Uuid,
        platform: Platform,
        version: i64,
    ) -> Result<(), BackendError>;

    /// Sets a non-active status, releases any lease and writes `event`, if
    /// the row is not already in that status; false otherwise.
    async fn set_status(
        &self,
        user_id: Uuid,
        platform: Platform,
        status: AccountStatus,
        event: &OutboxEvent,
    ) -> Result<bool, BackendError>;

    /// Active accounts of `platform` whose token expires before `before`
    /// and that no lease holds, soonest first.
    async fn expiring(
        &self,
        platform: Platform,
        before: OffsetDateTime,
        now: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<StoredAccount>, BackendError>;

    /// Claims up to `limit` active accounts of `platform` not validated
    /// since `cutoff` (marks them validated at `now`; a concurrent replica
    /// claims others).
    async fn claim_validation(
        &self,
        platform: Platform,
        cutoff: OffsetDateTime,
        now: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<StoredAccount>, BackendError>;

    /// Accounts whose tokens are sealed under a key other than `key_id`.
    async fn sealed_with_other_key(
        &self,
        key_id: &str,
        limit: i64,
    ) -> Result<Vec<StoredAccount>, BackendError>;

    /// Records a webhook message id; false when it was seen before (replay).
    async fn record_webhook_message(
        &self,
        source: &str,
        message_id: &str,
        now: OffsetDateTime,
    ) -> Result<bool, BackendError>;

    /// Forgets a recorded message id whose handling failed, so the
    /// platform's retry is applied.
    async fn forget_webhook_message(
        &self,
        source: &str,
        message_id: &str,
    ) -> Result<(), BackendError>;

    /// The platform answered 429: no replica calls it before `until`.
    async fn set_platform_cooldown(
        &self,
        platform: &str,
        until: OffsetDateTime,
    ) -> Result<(), BackendError>;

    /// Until when the platform is not to be called (`None`: never set).
    async fn platform_cooldown(
        &self,
        platform: &str,
    ) -> Result<Option<OffsetDateTime>, BackendError>;

    /// Deletes expired link states and webhook ids older than `before`.
    /// Deletes the account linked at `connected_at` and queues its grant
    /// for revocation as `pending` (first attempt at `next_attempt_at`; the
    /// account's tokens, or `pending`'s when it was refreshed), in one
    /// transaction; false when there is no such account (gone, or linked
    /// again since). Of two at once, one queues.
    async fn queue_grant_revocation(
        &self,
        pending: &PendingRevocation,
        connected_at: OffsetDateTime,
        next_attempt_at: OffsetDateTime,
    ) -> Result<bool, BackendError>;

    /// Claims up to `limit` grant revocations due at `now`, moving each
    /// one's next attempt to `until` so that no other replica takes it
    /// meanwhile.
    async fn claim_grant_revocations(
        &self,
        now: OffsetDateTime,
        until: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<PendingRevocation>, BackendError>;

    /// The platform answered: the row goes and `event` is written, in one
    /// transaction (no event when a re-link already wrote the grant's end:
    /// reason `relinked`). `false` when the row was already gone.
    async fn finish_grant_revocation(
        &self,
        pending: &PendingRevocation,
        event: &OutboxEvent,
    ) -> Result<bool, BackendError>;

    /// No answer this time: one more attempt counted, the next at
    /// `next_attempt_at`; with `pending.refreshed`, its new tokens kept.
    async fn retry_grant_revocation(
        &self,
        pending: &PendingRevocation,
        next_attempt_at: OffsetDateTime,
    ) -> Result<(), BackendError>;

    async fn purge_platform_state(
        &self,
        now: OffsetDateTime,
        before: OffsetDateTime,
    ) -> Result<(), BackendError>;
}
