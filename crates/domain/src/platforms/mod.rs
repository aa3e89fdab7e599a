//! Streaming-platform accounts (the seed's section 4 and scenario 5.3): a
//! user links a Twitch, YouTube, Facebook or SOOP account through OAuth 2.0
//! authorization code (+ PKCE where the platform supports it); the service
//! keeps that platform's tokens sealed at rest ([`vault`]) and fresh, and
//! hands a valid access token to internal services.
//!
//! * [`api`] — the port to a platform ([`api::PlatformApi`]: authorization
//!   URL, code and refresh grants, identity, validation, revocation) and how
//!   a call can fail ([`api::CallError`]). The platforms' wire formats and
//!   the HTTP client live in the `auth-platform-http` adapter crate.
//! * [`store`] — the store role: single-use link states, linked accounts with
//!   sealed tokens, the refresh lease that makes one refresh per account
//!   across replicas, and webhook message ids (replay protection).
//! * [`service`] — the use cases: start, connect, list, disconnect, access
//!   token (refresh on demand), keep-alive, and platform-side revocation.
//! * [`webhooks`] — Twitch EventSub and Facebook deauthorize verification.

pub mod api;
pub mod config;
pub mod service;
pub mod store;
pub mod vault;
pub mod webhooks;

pub use crate::model::platform::{AccountStatus, Identity, Platform, PlatformAccount};

use std::time::Duration;

use crate::error::{BackendError, FieldViolation};

#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// No client id configured for the platform.
    #[error("{0} is not configured on this service")]
    Disabled(Platform),
    #[error("invalid request")]
    Invalid(Vec<FieldViolation>),
    #[error("no {0} account is linked")]
    NotLinked(Platform),
    /// The platform account is linked to another user.
    #[error("this {0} account is already linked to another user")]
    LinkedElsewhere(Platform),
    /// The platform refused the authorization (the user denied it, the code
    /// is bad or spent, the redirect URI does not match). Nothing is linked.
    #[error("{platform} refused the authorization: {reason}")]
    Refused { platform: Platform, reason: String },
    /// The account must be linked again (or was revoked at the platform).
    #[error("the {platform} account needs to be linked again ({status})")]
    ReauthRequired {
        platform: Platform,
        status: &'static str,
    },
    /// The platform did not answer usefully in time; worth a retry.
    #[error("{platform} is unavailable")]
    Unavailable {
        platform: Platform,
        retry_after: Duration,
    },
    /// The account's owner is suspended or deleted.
    #[error("the user is not active")]
    UserInactive,
    /// The caller may not do this (not the service role).
    #[error("{0}")]
    Forbidden(&'static str),
    /// Stored ciphertext that no configured key opens.
    #[error("sealed platform tokens cannot be opened")]
    Sealed(#[from] vault::VaultError),
    #[error(transparent)]
    Token(#[from] crate::tokens::TokenError),
    #[error(transparent)]
    Backend(#[from] BackendError),
}
