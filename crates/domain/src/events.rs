//! Domain events. Every state change builds its [`OutboxEvent`] and hands it
//! to the store, which writes it in the same transaction as the change (the
//! transactional outbox); the Kafka side (`auth-kafka`) relays committed rows
//! to Kafka through the [`RelayStore`] port.

use serde::Serialize;
use serde_json::Value;
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
    pub data: EventData,
    pub traceparent: Option<String>,
}

/// What an event says besides its type, user and time: one shape per kind
/// of event, serialised as the JSON object of the outbox row, the
/// revocation log and the envelope's `data`. Typed, so no constructor can
/// misspell or leave out a field of its kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EventData {
    UserCreated {
        email: String,
        username: String,
        roles: Vec<String>,
    },
    LoginSucceeded {
        session_id: Uuid,
        client_ip: Option<String>,
    },
    LoginFailed {
        reason: &'static str,
        client_ip: Option<String>,
    },
    TokenRevoked {
        session_id: Uuid,
        reason: &'static str,
    },
    ServiceAccount {
        name: String,
        roles: Vec<String>,
        by: Uuid,
    },
    /// A user-wide change by an admin (`by`), the user itself (`None`), or
    /// another service (`source`).
    UserChanged {
        by: Option<Uuid>,
        reason: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        source: Option<String>,
    },
    RolesChanged {
        by: Uuid,
        roles: Vec<String>,
    },
    PasswordChanged {},
    PlatformConnected {
        platform: &'static str,
        platform_user_id: String,
        login: String,
        scopes: Vec<String>,
    },
    PlatformDisconnected {
        platform: &'static str,
        platform_user_id: String,
        scopes: Vec<String>,
        revoked_at_platform: bool,
        revocation: String,
        reason: String,
    },
    PlatformReauthRequired {
        platform: &'static str,
        platform_user_id: String,
        scopes: Vec<String>,
        status: &'static str,
        reason: String,
    },
}

impl OutboxEvent {
    pub fn new(
        event_type: EventType,
        user_id: Option<Uuid>,
        data: EventData,
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
            EventData::UserCreated {
                email: user.email.as_str().to_owned(),
                username: user.username.as_str().to_owned(),
                roles: role_names(&user.roles),
            },
            ctx,
        )
    }

    pub fn login_succeeded(user_id: Uuid, session_id: Uuid, ctx: &RequestContext) -> Self {
        Self::new(
            EventType::LoginSucceeded,
            Some(user_id),
            EventData::LoginSucceeded {
                session_id,
                client_ip: ctx.client_ip.clone(),
            },
            ctx,
        )
    }

    /// `user_id` is set only when the account exists; the login name is not
    /// recorded, so the event stream is no account-enumeration oracle.
    pub fn login_failed(user_id: Option<Uuid>, reason: &'static str, ctx: &RequestContext) -> Self {
        Self::new(
            EventType::LoginFailed,
            user_id,
            EventData::LoginFailed {
                reason,
                client_ip: ctx.client_ip.clone(),
            },
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
            EventData::TokenRevoked { session_id, reason },
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
            EventData::ServiceAccount {
                name: name.to_owned(),
                roles: roles.to_vec(),
                by,
            },
            ctx,
        )
    }

    pub fn user_suspended(user_id: Uuid, by: Uuid, reason: &str, ctx: &RequestContext) -> Self {
        Self::new(
            EventType::UserSuspended,
            Some(user_id),
            EventData::UserChanged {
                by: Some(by),
                reason: reason.to_owned(),
                source: None,
            },
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
            EventData::UserChanged {
                by,
                reason: reason.to_owned(),
                source: None,
            },
            ctx,
        )
    }

    pub fn roles_changed(user_id: Uuid, by: Uuid, roles: &[Role], ctx: &RequestContext) -> Self {
        Self::new(
            EventType::RolesChanged,
            Some(user_id),
            EventData::RolesChanged {
                by,
                roles: role_names(roles),
            },
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
            EventData::UserChanged {
                by: None,
                reason: reason.to_owned(),
                source: Some(source.to_owned()),
            },
            ctx,
        )
    }

    pub fn password_changed(user_id: Uuid, ctx: &RequestContext) -> Self {
        Self::new(
            EventType::PasswordChanged,
            Some(user_id),
            EventData::PasswordChanged {},
            ctx,
        )
    }

    /// A streaming-platform account was linked (never its tokens).
    pub fn platform_connected(account: &PlatformAccount, ctx: &RequestContext) -> Self {
        Self::new(
            EventType::PlatformConnected,
            Some(account.user_id),
            EventData::PlatformConnected {
                platform: account.platform.as_str(),
                platform_user_id: account.platform_user_id.clone(),
                login: account.login.clone(),
                scopes: account.scopes.clone(),
            },
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
            EventData::PlatformDisconnected {
                platform: platform.as_str(),
                platform_user_id: platform_user_id.to_owned(),
                scopes: scopes.to_vec(),
                revoked_at_platform: revocation == "revoked",
                revocation: revocation.to_owned(),
                reason: reason.to_owned(),
            },
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
            EventData::PlatformReauthRequired {
                platform: account.platform.as_str(),
                platform_user_id: account.platform_user_id.clone(),
                scopes: account.scopes.clone(),
                status: status.as_str(),
                reason: reason.to_owned(),
            },
            ctx,
        )
    }
}

fn role_names(roles: &[Role]) -> Vec<String> {
    roles.iter().map(|r| r.as_str().to_owned()).collect()
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn data(event: OutboxEvent) -> Value {
        serde_json::to_value(event.data).unwrap()
    }

    /// The payloads' JSON is the event schema other services read: each
    /// kind keeps its fields and their names, `null` included.
    #[test]
    fn each_payload_has_its_documented_shape() {
        let (user, session, admin) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let ctx = RequestContext {
            client_ip: Some("203.0.113.9".into()),
            ..RequestContext::default()
        };
        assert_eq!(
            data(OutboxEvent::token_revoked(user, session, "logout", &ctx)),
            json!({ "session_id": session, "reason": "logout" })
        );
        assert_eq!(
            data(OutboxEvent::login_succeeded(user, session, &ctx)),
            json!({ "session_id": session, "client_ip": "203.0.113.9" })
        );
        assert_eq!(
            data(OutboxEvent::sessions_revoked(user, None, "user", &ctx)),
            json!({ "by": null, "reason": "user" })
        );
        assert_eq!(
            data(OutboxEvent::user_suspended(user, admin, "abuse", &ctx)),
            json!({ "by": admin, "reason": "abuse" })
        );
        assert_eq!(
            data(OutboxEvent::lifecycle(user, true, "auth.lifecycle", &ctx)),
            json!({ "by": null, "reason": "user_deleted", "source": "auth.lifecycle" })
        );
        assert_eq!(
            data(OutboxEvent::roles_changed(
                user,
                admin,
                &[Role::parse("roles", "admin").unwrap()],
                &ctx
            )),
            json!({ "by": admin, "roles": ["admin"] })
        );
        assert_eq!(data(OutboxEvent::password_changed(user, &ctx)), json!({}));
        assert_eq!(
            data(OutboxEvent::platform_grant_revoked(
                user,
                Platform::Twitch,
                "42",
                &["user:read:email".to_owned()],
                "already_dead",
                "user_deleted",
                &ctx,
            )),
            json!({
                "platform": "twitch",
                "platform_user_id": "42",
                "scopes": ["user:read:email"],
                "revoked_at_platform": false,
                "revocation": "already_dead",
                "reason": "user_deleted",
            })
        );
    }
}
