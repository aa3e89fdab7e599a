//! The account store role. Every method that changes state takes the event
//! that records the change and writes both in one transaction.

use async_trait::async_trait;
use uuid::Uuid;

use super::model::{Credentials, LoginName, Role, User, UserStatus};
use crate::{error::BackendError, events::OutboxEvent};

#[derive(Debug, thiserror::Error)]
pub enum InsertUserError {
    /// The named unique field (`email` or `username`) is taken.
    #[error("{0} already exists")]
    Conflict(&'static str),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

#[async_trait]
pub trait UserStore: Send + Sync + 'static {
    async fn insert_user(
        &self,
        user: &User,
        password_hash: &str,
        event: &OutboxEvent,
    ) -> Result<(), InsertUserError>;

    async fn find_credentials(
        &self,
        login: &LoginName,
    ) -> Result<Option<Credentials>, BackendError>;

    async fn find_credentials_by_id(&self, id: Uuid) -> Result<Option<Credentials>, BackendError>;

    async fn find_user(&self, id: Uuid) -> Result<Option<User>, BackendError>;

    /// Replaces the hash only if it is still `old_hash` (a rehash after the
    /// argon2 parameters changed must not undo a concurrent password change).
    async fn upgrade_password_hash(
        &self,
        id: Uuid,
        old_hash: &str,
        new_hash: &str,
    ) -> Result<(), BackendError>;

    /// New hash, every session of the user revoked, and the event; one
    /// transaction. `false` when the user does not exist.
    async fn change_password(
        &self,
        id: Uuid,
        new_hash: &str,
        event: &OutboxEvent,
    ) -> Result<bool, BackendError>;

    /// New status, every session revoked, and the event; one transaction.
    /// `None` when the user does not exist.
    async fn set_status(
        &self,
        id: Uuid,
        status: UserStatus,
        event: &OutboxEvent,
    ) -> Result<Option<User>, BackendError>;

    /// New roles, every session revoked (so no token carries stale roles),
    /// and the event; one transaction. `None` when the user does not exist.
    async fn set_roles(
        &self,
        id: Uuid,
        roles: &[Role],
        event: &OutboxEvent,
    ) -> Result<Option<User>, BackendError>;

    /// An event with no state change of its own (a failed login).
    async fn append_event(&self, event: &OutboxEvent) -> Result<(), BackendError>;
}
