//! Domain events. Every state change builds its [`OutboxEvent`] and hands it
//! to the store, which writes it in the same transaction as the change (the
//! transactional outbox); the Kafka side (`auth-kafka`) relays committed rows
//! to Kafka through the [`RelayStore`] port.

use serde::Serialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{
    model::account::{Role, User},
    model::platform::{AccountStatus, Platform, PlatformAccount},
};

/// The event types and their topic suffixes (`auth.events.<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    UserCreated,
    LoginSucceeded,
    LoginFailed,
    TokenRevoked,
    UserSuspended,
    SessionsRevoked,
    RolesChanged,
    PasswordChanged,
    UserDeleted,
    PlatformConnected,
    PlatformDisconnected,
    PlatformReauthRequired,
    ServiceAccountCreated,
    ServiceAccountSecretRotated,
    ServiceAccountDeleted,
}

impl EventType {
    /// Events that end sessions or change what a token may do: also written
    /// to the revocation log (WatchRevocations).
    pub fn is_revocation(self) -> bool {
        matches!(
            self,
            Self::TokenRevoked
                | Self::UserSuspended
                | Self::SessionsRevoked
                | Self::RolesChanged
                | Self::PasswordChanged
                | Self::UserDeleted
                | Self::ServiceAccountSecretRotated
                | Self::ServiceAccountDeleted
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::UserCreated => "user_created",
            Self::LoginSucceeded => "login_succeeded",
            Self::LoginFailed => "login_failed",
            Self::TokenRevoked => "token_revoked",
            Self::UserSuspended => "user_suspended",
            Self::SessionsRevoked => "sessions_revoked",
            Self::RolesChanged => "roles_changed",
            Self::PasswordChanged => "password_changed",
            Self::UserDeleted => "user_deleted",
            Self::PlatformConnected => "platform_connected",
            Self::PlatformDisconnected => "platform_disconnected",
            Self::PlatformReauthRequired => "platform_reauth_required",
            Self::ServiceAccountCreated => "service_account_created",
            Self::ServiceAccountSecretRotated => "service_account_secret_rotated",
            Self::ServiceAccountDeleted => "service_account_deleted",
        }
    }
}

/// Where a request came from, carried into events and lockout decisions.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    /// Client address as the gateway saw it.
    pub client_ip: Option<String>,
    /// W3C trace context of the request, copied into the event headers.
    pub traceparent: Option<String>,
    /// The caller's deadline (gRPC `grpc-timeout`): work that cannot start
    /// before it is refused instead of done for nobody.
    pub deadline: Option<std::time::Instant>,
}

/// One outbox row. `data` never holds a secret (no password, token or hash).
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    pub id: Uuid,
    pub event_type: EventType,
    pub user_id: Option<Uuid>,
    pub occurred_at: OffsetDateTime,
    pub data: Value,
    pub traceparent: Option<String>,
}

impl OutboxEvent {
    pub fn new(
        event_type: EventType,
        user_id: Option<Uuid>,
        data: Value,
        ctx: &RequestContext,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            event_type,
            user_id,
            occurred_at: OffsetDateTime::now_utc(),
            data,
            traceparent: ctx.traceparent.clone(),
        }
    }

    pub fn user_created(user: &User, ctx: &RequestContext) -> Self {
        Self::new(
            EventType::UserCreated,
            Some(user.id),
            json!({ "email": user.email.as_str(), "username": user.username.as_str(), "roles": role_names(&user.roles) }),
            ctx,
        )
    }

    pub fn login_succeeded(user_id: Uuid, session_id: Uuid, ctx: &RequestContext) -> Self {
        Self::new(
            EventType::LoginSucceeded,
            Some(user_id),
            json!({ "session_id": session_id, "client_ip": ctx.client_ip }),
            ctx,
        )
    }

    /// `user_id` is set only when the account exists; the login name is not
    /// recorded, so the event stream is no account-enumeration oracle.
    pub fn login_failed(user_id: Option<Uuid>, reason: &'static str, ctx: &RequestContext) -> Self {
        Self::new(
            EventType::LoginFailed,
            user_id,
            json!({ "reason": reason, "client_ip": ctx.client_ip }),
            ctx,
        )
    }

    pub fn token_revoked(
        user_id: Uuid,
        session_id: Uuid,
        reason: &'static str,
        ctx: &RequestContext,
    ) -> Self {
        Self::new(
            EventType::TokenRevoked,
            Some(user_id),
            json!({ "session_id": session_id, "reason": reason }),
            ctx,
        )
    }

    /// Service-account changes (the audit trail of who may call as a
    /// service). Keyed by the account id, the `sub` of its tokens; never the
    /// secret or its hash.
    pub fn service_account(
        event_type: EventType,
        account_id: Uuid,
        name: &str,
        roles: &[String],
        by: Uuid,
        ctx: &RequestContext,
    ) -> Self {
        Self::new(
            event_type,
            Some(account_id),
            json!({ "name": name, "roles": roles, "by": by }),
            ctx,
        )
    }

    pub fn user_suspended(user_id: Uuid, by: Uuid, reason: &str, ctx: &RequestContext) -> Self {
        Self::new(
            EventType::UserSuspended,
            Some(user_id),
            json!({ "by": by, "reason": reason }),
            ctx,
        )
    }

    pub fn sessions_revoked(
        user_id: Uuid,
        by: Option<Uuid>,
        reason: &'static str,
        ctx: &RequestContext,
    ) -> Self {
        Self::new(
            EventType::SessionsRevoked,
            Some(user_id),
            json!({ "by": by, "reason": reason }),
            ctx,
        )
    }

    pub fn roles_changed(user_id: Uuid, by: Uuid, roles: &[Role], ctx: &RequestContext) -> Self {
        Self::new(
            EventType::RolesChanged,
            Some(user_id),
            json!({ "by": by, "roles": role_names(roles) }),
            ctx,
        )
    }

    /// A lifecycle change that came from another service (user-profile).
    pub fn lifecycle(user_id: Uuid, deleted: bool, source: &str, ctx: &RequestContext) -> Self {
        let (event_type, reason) = if deleted {
            (EventType::UserDeleted, "user_deleted")
        } else {
            (EventType::UserSuspended, "user_suspended")
        };
        Self::new(
            event_type,
            Some(user_id),
            json!({ "by": null, "reason": reason, "source": source }),
            ctx,
        )
    }

    pub fn password_changed(user_id: Uuid, ctx: &RequestContext) -> Self {
        Self::new(EventType::PasswordChanged, Some(user_id), json!({}), ctx)
    }

    /// A streaming-platform account was linked (never its tokens).
    pub fn platform_connected(account: &PlatformAccount, ctx: &RequestContext) -> Self {
        Self::new(
            EventType::PlatformConnected,
            Some(account.user_id),
            json!({
                "platform": account.platform.as_str(),
                "platform_user_id": account.platform_user_id,
                "login": account.login,
                "scopes": account.scopes,
            }),
            ctx,
        )
    }

    /// The user disconnected the account and the platform answered the
    /// revocation at once: `revocation` as in [`Self::platform_grant_revoked`];
    /// `revoked_at_platform` is whether it revoked the grant.
    pub fn platform_disconnected(
        account: &PlatformAccount,
        revocation: &str,
        ctx: &RequestContext,
    ) -> Self {
        Self::platform_grant_revoked(
            account.user_id,
            account.platform,
            &account.platform_user_id,
            &account.scopes,
            revocation,
            "disconnected",
            ctx,
        )
    }

    /// A linked account gone, once its platform answered the revocation of
    /// its grant: `revocation` is `revoked`, `already_dead` or `unsupported`
    /// (no revocation endpoint); `reason` is `user_deleted` or
    /// `disconnected`.
    pub fn platform_grant_revoked(
        user_id: Uuid,
        platform: Platform,
        platform_user_id: &str,
        scopes: &[String],
        revocation: &str,
        reason: &str,
        ctx: &RequestContext,
    ) -> Self {
        Self::new(
            EventType::PlatformDisconnected,
            Some(user_id),
            json!({
                "platform": platform.as_str(),
                "platform_user_id": platform_user_id,
                "scopes": scopes,
                "revoked_at_platform": revocation == "revoked",
                "revocation": revocation,
                "reason": reason,
            }),
            ctx,
        )
    }

    /// The account's tokens no longer work: `status` is `reauth_required`
    /// (the platform refused a refresh) or `revoked` (the user removed the
    /// application at the platform); `reason` says what happened.
    pub fn platform_reauth_required(
        account: &PlatformAccount,
        status: AccountStatus,
        reason: &str,
        ctx: &RequestContext,
    ) -> Self {
        Self::new(
            EventType::PlatformReauthRequired,
            Some(account.user_id),
            json!({
                "platform": account.platform.as_str(),
                "platform_user_id": account.platform_user_id,
                "scopes": account.scopes,
                "status": status.as_str(),
                "reason": reason,
            }),
            ctx,
        )
    }
}

fn role_names(roles: &[Role]) -> Vec<&str> {
    roles.iter().map(Role::as_str).collect()
}

/// An outbox row as read back (by the relay, and by tests).
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub id: Uuid,
    pub event_type: String,
    pub user_id: Option<Uuid>,
    pub occurred_at: OffsetDateTime,
    pub data: Value,
    pub traceparent: Option<String>,
    /// Publish attempts so far (the relay's backoff grows with it).
    pub attempts: i32,
}

/// The relay's side of the outbox. Rows are *leased* before publishing so
/// several replicas can relay at once without publishing a row twice in the
/// normal path; a lease that is not completed (crash, Kafka down) expires and
/// the row is published again later (at-least-once).
#[async_trait::async_trait]
pub trait RelayStore: Send + Sync + 'static {
    /// Leases up to `limit` unpublished rows that no live lease holds, oldest
    /// first, until `lease_until`.
    async fn lease(
        &self,
        limit: i64,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
    ) -> Result<Vec<StoredEvent>, crate::error::BackendError>;
    async fn mark_published(
        &self,
        ids: &[Uuid],
        at: OffsetDateTime,
    ) -> Result<(), crate::error::BackendError>;
    /// Keeps the rows leased until `retry_at` (backoff after a failure).
    async fn retry_later(
        &self,
        ids: &[Uuid],
        retry_at: OffsetDateTime,
    ) -> Result<(), crate::error::BackendError>;
    /// Deletes rows published before `before`; returns how many.
    async fn purge_published(
        &self,
        before: OffsetDateTime,
    ) -> Result<u64, crate::error::BackendError>;
    async fn unpublished_count(&self) -> Result<i64, crate::error::BackendError>;
    /// Signalled after this process commits an outbox row, so the relay can
    /// publish at once; rows other processes wrote are found by polling.
    fn outbox_written(&self) -> std::sync::Arc<tokio::sync::Notify>;
}

/// Read side of the outbox.
#[async_trait::async_trait]
pub trait OutboxReader: Send + Sync + 'static {
    /// Unpublished events, oldest first (UUIDv7 ids sort by time).
    async fn unpublished(&self, limit: i64)
    -> Result<Vec<StoredEvent>, crate::error::BackendError>;
}
