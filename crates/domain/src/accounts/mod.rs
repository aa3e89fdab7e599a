//! Accounts: sign-up, password login with lockout, password change, the
//! admin operations on users, and service accounts (client credentials).

pub mod config;
pub mod hold;
pub mod password;
pub mod service;
pub mod service_accounts;
pub mod store;

/// The account value types ([`crate::model::account`]), under the name the
/// use cases and adapters have always used.
pub use crate::model::account as model;

use std::time::Duration;

use crate::{
    error::{BackendError, FieldViolation},
    tokens::TokenError,
};

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("invalid request")]
    Invalid(Vec<FieldViolation>),
    #[error("{0} already exists")]
    AlreadyExists(&'static str),
    /// Wrong login or password; never says which.
    #[error("invalid credentials")]
    InvalidCredentials,
    #[error("too many failed logins")]
    LockedOut { retry_after: Duration },
    /// Refused without trying: password hashing is at capacity.
    #[error("overloaded")]
    Overloaded { retry_after: Duration },
    /// Correct password, but the account is suspended or deleted.
    #[error("account is not active")]
    Disabled,
    #[error("user not found")]
    NotFound,
    #[error("admin role required")]
    Forbidden,
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Hash(#[from] password::HashError),
}

impl From<crate::ratelimit::LockoutError> for AccountError {
    fn from(error: crate::ratelimit::LockoutError) -> Self {
        match error {
            crate::ratelimit::LockoutError::Locked { retry_after } => {
                Self::LockedOut { retry_after }
            }
            crate::ratelimit::LockoutError::Backend(e) => Self::Backend(e),
        }
    }
}
