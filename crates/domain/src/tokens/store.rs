//! The session store role: refresh-token families ("sessions") and their
//! rotating tokens, stored only as SHA-256 hashes.

use async_trait::async_trait;
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use crate::{
    error::BackendError,
    events::{OutboxEvent, RequestContext},
    model::account::User,
};

/// SHA-256 of a refresh token; the token itself is never stored.
pub type TokenHash = [u8; 32];

#[derive(Debug, Clone)]
pub struct NewSession {
    pub id: Uuid,
    pub user_id: Uuid,
    pub created_at: OffsetDateTime,
    pub absolute_expires_at: OffsetDateTime,
    /// The account's security version the login read; the session is
    /// created only if it is still current and the account active.
    pub security_version: i64,
}

#[derive(Debug, Clone)]
pub struct NewRefreshToken {
    pub hash: TokenHash,
    pub session_id: Uuid,
    pub created_at: OffsetDateTime,
    pub idle_expires_at: OffsetDateTime,
}

/// What the caller asks of one rotation.
pub struct RotateRequest<'a> {
    pub presented: TokenHash,
    pub next: TokenHash,
    pub now: OffsetDateTime,
    pub idle_ttl: Duration,
    pub ctx: &'a RequestContext,
}

#[derive(Debug)]
pub enum Rotation {
    /// The presented token was live and is now spent; `next` is live until
    /// `idle_expires_at`.
    Rotated {
        user: User,
        session_id: Uuid,
        idle_expires_at: OffsetDateTime,
    },
    /// The presented token had already been spent: the whole family is now
    /// revoked (a `token_revoked` event was written with it).
    Reused { user_id: Uuid, session_id: Uuid },
    /// Unknown, expired, revoked, or the user is not active.
    Invalid,
}

#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// A new session with its first refresh token and the login event,
    /// atomically conditional on the account still being active at
    /// `session.security_version`; `false` (and nothing written) when a
    /// security change came between.
    async fn create_session(
        &self,
        session: &NewSession,
        token: &NewRefreshToken,
        event: &OutboxEvent,
    ) -> Result<bool, BackendError>;

    /// Spends `presented` and issues `next` in one transaction; detects reuse.
    async fn rotate_refresh_token(
        &self,
        request: RotateRequest<'_>,
    ) -> Result<Rotation, BackendError>;

    /// The (session, user) a refresh token belongs to, spent or not.
    async fn refresh_token_owner(
        &self,
        presented: &TokenHash,
    ) -> Result<Option<(Uuid, Uuid)>, BackendError>;

    /// Revokes one session of `user_id` with its event; `false` when it was
    /// unknown, another user's, or already revoked.
    async fn revoke_session(
        &self,
        session_id: Uuid,
        user_id: Uuid,
        now: OffsetDateTime,
        event: &OutboxEvent,
    ) -> Result<bool, BackendError>;

    /// Revokes every live session of the user with the event; returns how many.
    async fn revoke_user_sessions(
        &self,
        user_id: Uuid,
        now: OffsetDateTime,
        event: &OutboxEvent,
    ) -> Result<u64, BackendError>;
}
