//! The port to a streaming platform: its OAuth 2.0 endpoints (authorization
//! URL, code and refresh grants, revocation) and the API calls the service
//! makes (identity, token validation). The kernel decides what to call and
//! what an answer means for the account; the adapter (`auth-platform-http`)
//! speaks each platform's wire format and classifies its answers into
//! [`CallError`]. No HTTP client is reachable from here.

use std::time::Duration;

use async_trait::async_trait;
use secrecy::SecretString;

use super::{Identity, Platform};

/// Tokens as a platform granted them.
#[derive(Debug)]
pub struct Grant {
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    pub expires_in: Option<Duration>,
    /// `None`: the platform did not say (the requested scopes stand).
    pub scopes: Option<Vec<String>>,
}

/// How a platform call failed. Messages never carry a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The grant is dead: revoked at the platform, expired, already used.
    #[error("invalid_grant: {0}")]
    InvalidGrant(String),
    /// Another refusal (bad client, redirect mismatch, missing scope).
    #[error("refused: {0}")]
    Refused(String),
    /// Worth a retry later: connection, timeout, 5xx, a garbled answer.
    #[error("transient: {0}")]
    Transient(String),
    /// 429: the platform is not to be called again before `retry_after`
    /// has passed (its `Retry-After`, or Twitch's `Ratelimit-Reset`; 1 s
    /// when it said neither). Never retried at once.
    #[error("rate limited for {retry_after:?}")]
    RateLimited { retry_after: Duration },
}

/// How a platform's access token is kept fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshModel {
    /// `grant_type=refresh_token`; the platform may rotate the token.
    RefreshToken,
    /// No refresh token: re-exchange the long-lived access token
    /// (`grant_type=fb_exchange_token`) while it is still valid.
    ExchangeLongLived,
}

/// One configured platform's endpoints.
#[async_trait]
pub trait PlatformApi: Send + Sync + std::fmt::Debug + 'static {
    fn platform(&self) -> Platform;

    /// How this platform's tokens are refreshed.
    fn refresh_model(&self) -> RefreshModel;

    /// The redirect URI registered with the platform.
    fn redirect_uri(&self) -> &str;

    /// The scopes requested at authorization.
    fn scopes(&self) -> &[String];

    /// The URL to send the user to, and the PKCE verifier to keep (when the
    /// platform supports PKCE).
    fn authorization_url(&self, state: &str) -> (String, Option<SecretString>);

    /// Exchanges an authorization code (never retried: a code is
    /// single-use).
    async fn exchange_code(
        &self,
        code: &str,
        verifier: Option<&SecretString>,
    ) -> Result<Grant, CallError>;

    /// A new access token from the stored grant: the refresh token, or the
    /// current long-lived token ([`RefreshModel::ExchangeLongLived`]).
    async fn refresh(
        &self,
        refresh_token: Option<&SecretString>,
        access_token: &SecretString,
    ) -> Result<Grant, CallError>;

    /// Who the token belongs to at the platform.
    async fn identity(&self, access_token: &SecretString) -> Result<Identity, CallError>;

    /// Whether the platform still takes the token (`Ok(true)` for a
    /// platform without a validation endpoint).
    async fn validate(&self, access_token: &SecretString) -> Result<bool, CallError>;

    /// Whether [`revoke`](Self::revoke) presents the access token, which the
    /// platform no longer knows once it has expired.
    fn revokes_by_access_token(&self) -> bool;

    /// Revokes the grant at the platform. `Ok(false)`: the platform has no
    /// revocation endpoint. `InvalidGrant`: the platform does not know the
    /// token (already revoked or expired): nothing is left to revoke.
    async fn revoke(
        &self,
        access_token: &SecretString,
        refresh_token: Option<&SecretString>,
    ) -> Result<bool, CallError>;
}
