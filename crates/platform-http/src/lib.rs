//! The platforms' OAuth 2.0 endpoints, one [`Profile`] per platform over the
//! `oauth2` crate (authorization URL, PKCE S256, code and refresh grants) and
//! a rustls `reqwest` client (identity, validation, revocation, Facebook's
//! token exchange). Every call has the configured timeout; transient failures
//! (connection, timeout, 5xx) are retried with backoff where a retry is safe.
//!
//! | | PKCE | client auth | refresh model | identity |
//! |---|---|---|---|---|
//! | Twitch | no (not documented by Twitch) | secret in body | rotating refresh token; `/oauth2/validate` hourly | Helix `GET /users` with `Client-Id` |
//! | YouTube (Google) | S256 | secret in body | refresh token (`access_type=offline`, `prompt=consent`), kept across refreshes | `GET /youtube/v3/channels?part=snippet&mine=true` |
//! | Facebook | S256 | secret in body | none: the short-lived token is exchanged for a long-lived one (`fb_exchange_token`) and re-exchanged before it expires | `GET /me?fields=id,name` |
//! | SOOP | no | secret in body | refresh token | `POST /user/stationinfo` |
//!
//! Token responses differ: Twitch returns `scope` as a JSON array, the
//! others a space-delimited string or nothing; Facebook has no refresh token;
//! Twitch's errors are `{"status":400,"message":…}` rather than RFC 6749's
//! `{"error":…}`. [`PlatformTokenResponse`] and [`CallError`] absorb that.
//!
//! The kernel sees none of this: it calls [`PlatformApi`], which
//! [`Provider`] implements; [`configured`] builds one per configured
//! platform for the composition root.

#![forbid(unsafe_code)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicU16, Ordering},
    },
    time::Duration,
};

use oauth2::{
    AccessToken, AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken,
    EndpointNotSet, EndpointSet, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken,
    RequestTokenError, Scope, TokenResponse, TokenUrl,
    basic::{BasicRevocationErrorResponse, BasicTokenIntrospectionResponse},
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize};
use time::OffsetDateTime;

use async_trait::async_trait;
use auth_domain::platforms::{
    Identity, Platform,
    api::{CallError, Grant, PlatformApi, RefreshModel},
    config::{PlatformsConfig, ProviderConfig},
};

/// What differs between platforms beyond their URLs.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    pub pkce: bool,
    /// Extra parameters of the authorization request.
    pub auth_params: &'static [(&'static str, &'static str)],
    /// How scopes are joined in the authorization URL.
    pub scope_separator: &'static str,
    pub refresh: RefreshModel,
}

impl Profile {
    pub fn of(platform: Platform) -> Self {
        match platform {
            Platform::Twitch => Self {
                pkce: false,
                auth_params: &[],
                scope_separator: " ",
                refresh: RefreshModel::RefreshToken,
            },
            Platform::Youtube => Self {
                pkce: true,
                auth_params: &[("access_type", "offline"), ("prompt", "consent")],
                scope_separator: " ",
                refresh: RefreshModel::RefreshToken,
            },
            Platform::Facebook => Self {
                pkce: true,
                auth_params: &[],
                scope_separator: ",",
                refresh: RefreshModel::ExchangeLongLived,
            },
            Platform::Soop => Self {
                pkce: false,
                auth_params: &[],
                scope_separator: " ",
                refresh: RefreshModel::RefreshToken,
            },
        }
    }
}

/// How long a 429 asks to wait: `Retry-After` (delta-seconds or an
/// HTTP-date, RFC 9110 §10.2.3), else Twitch's `Ratelimit-Reset` (the Unix
/// time its bucket refills: dev.twitch.tv/docs/api/guide#twitch-rate-limits),
/// else 1 s; at most an hour.
pub fn retry_after_of(headers: &reqwest::header::HeaderMap, now: OffsetDateTime) -> Duration {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let from_retry_after = text("retry-after").and_then(|v| {
        v.parse::<u64>().ok().map(Duration::from_secs).or_else(|| {
            let at =
                OffsetDateTime::parse(v, &time::format_description::well_known::Rfc2822).ok()?;
            Some(Duration::try_from(at - now).unwrap_or(Duration::ZERO))
        })
    });
    let from_reset = || {
        let reset: i64 = text("ratelimit-reset")?.parse().ok()?;
        let at = OffsetDateTime::from_unix_timestamp(reset).ok()?;
        Some(Duration::try_from(at - now).unwrap_or(Duration::ZERO))
    };
    from_retry_after
        .or_else(from_reset)
        .unwrap_or(Duration::from_secs(1))
        .clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

/// A token response in any of the platforms' shapes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlatformTokenResponse {
    access_token: AccessToken,
    #[serde(default)]
    token_type: AnyTokenType,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    refresh_token: Option<RefreshToken>,
    #[serde(default, rename = "scope", deserialize_with = "scope_list")]
    scopes: Option<Vec<Scope>>,
}

/// Whatever `token_type` says (`bearer`, `Bearer`, or nothing).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AnyTokenType(Option<String>);
impl oauth2::TokenType for AnyTokenType {}

impl TokenResponse for PlatformTokenResponse {
    type TokenType = AnyTokenType;
    fn access_token(&self) -> &AccessToken {
        &self.access_token
    }
    fn token_type(&self) -> &AnyTokenType {
        &self.token_type
    }
    fn expires_in(&self) -> Option<Duration> {
        self.expires_in.map(Duration::from_secs)
    }
    fn refresh_token(&self) -> Option<&RefreshToken> {
        self.refresh_token.as_ref()
    }
    fn scopes(&self) -> Option<&Vec<Scope>> {
        self.scopes.as_ref()
    }
}

/// `"a b"` (RFC 6749), `["a","b"]` (Twitch), or null.
fn scope_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Scope>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Text(String),
        List(Vec<String>),
    }
    Ok(Option::<Form>::deserialize(d)?.map(|form| {
        let names: Vec<String> = match form {
            Form::Text(text) => text
                .split([' ', ','])
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            Form::List(list) => list,
        };
        names.into_iter().map(Scope::new).collect()
    }))
}

/// A token endpoint's error body, whatever its shape, kept whole so the
/// failure is classified by what it means ([`classify`]), not by whether
/// one parser happened to read it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ErrorBody(serde_json::Value);

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&message_of(&self.0))
    }
}

impl oauth2::ErrorResponse for ErrorBody {}

type OAuthClient = oauth2::Client<
    ErrorBody,
    PlatformTokenResponse,
    BasicTokenIntrospectionResponse,
    oauth2::StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// A transport failure or a 5xx, as the oauth2 crate's HTTP client error.
#[derive(Debug, thiserror::Error)]
enum HttpFailure {
    #[error("the platform answered HTTP {0}")]
    Status(u16),
    #[error("{0}")]
    Transport(String),
}

impl HttpFailure {
    /// reqwest's message without the URL (a query string may hold a token).
    fn transport(error: reqwest::Error) -> Self {
        let kind = if error.is_timeout() {
            "timed out"
        } else if error.is_connect() {
            "connection failed"
        } else {
            "request failed"
        };
        Self::Transport(format!("{kind}: {}", error.without_url()))
    }
}

/// One configured platform.
pub struct Provider {
    pub platform: Platform,
    pub profile: Profile,
    client_id: String,
    client_secret: SecretString,
    scopes: Vec<String>,
    redirect_uri: String,
    api_url: String,
    revoke_url: Option<String>,
    validate_url: Option<String>,
    token_url: String,
    oauth: OAuthClient,
    http: reqwest::Client,
    attempts: u32,
}

/// Every platform with a client configured in `config`, as the kernel's
/// port (a platform without a client id is left out: disabled).
pub fn configured(config: &PlatformsConfig) -> anyhow::Result<Vec<Arc<dyn PlatformApi>>> {
    let timeout = Duration::from_millis(config.http_timeout_ms);
    let mut providers: Vec<Arc<dyn PlatformApi>> = Vec::new();
    for platform in Platform::ALL {
        if let Some(provider) = Provider::new(
            platform,
            config.provider(platform),
            timeout,
            config.retry_attempts,
        )? {
            providers.push(Arc::new(provider));
        }
    }
    Ok(providers)
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("platform", &self.platform)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl Provider {
    /// `None` when the platform has no client id (disabled). The
    /// configuration was validated at load.
    pub fn new(
        platform: Platform,
        config: &ProviderConfig,
        timeout: Duration,
        attempts: u32,
    ) -> anyhow::Result<Option<Self>> {
        let (Some(client_id), Some(secret), Some(redirect)) = (
            config.client_id.clone(),
            config.client_secret.clone(),
            config.redirect_uri.clone(),
        ) else {
            return Ok(None);
        };
        let oauth = oauth2::Client::new(ClientId::new(client_id.clone()))
            .set_client_secret(ClientSecret::new(secret.expose_secret().to_owned()))
            .set_auth_uri(AuthUrl::new(config.auth_url.clone())?)
            .set_token_uri(TokenUrl::new(config.token_url.clone())?)
            .set_redirect_uri(RedirectUrl::new(redirect.clone())?)
            .set_auth_type(AuthType::RequestBody);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // A token endpoint that redirects is not followed (SSRF, and the
            // secret would go along).
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("immersiverse-auth/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Some(Self {
            platform,
            profile: Profile::of(platform),
            client_id,
            client_secret: secret,
            scopes: config.scopes.clone(),
            redirect_uri: redirect,
            api_url: config.api_url.trim_end_matches('/').to_owned(),
            revoke_url: config.revoke_url.clone(),
            validate_url: config.validate_url.clone(),
            token_url: config.token_url.clone(),
            oauth,
            http,
            attempts: attempts.max(1),
        }))
    }

    /// Facebook: `GET <token_url>?grant_type=fb_exchange_token&…`.
    async fn extend(&self, access_token: &SecretString) -> Result<Grant, CallError> {
        self.retrying(|| async move {
            let response = self
                .http
                .get(&self.token_url)
                .header_traced()
                .query(&[
                    ("grant_type", "fb_exchange_token"),
                    ("client_id", self.client_id.as_str()),
                    ("client_secret", self.client_secret.expose_secret()),
                    ("fb_exchange_token", access_token.expose_secret()),
                ])
                .send()
                .await
                .map_err(transport)?;
            let status = response.status().as_u16();
            if status == 429 {
                return Err(CallError::RateLimited {
                    retry_after: retry_after_of(response.headers(), OffsetDateTime::now_utc()),
                });
            }
            let body = response.bytes().await.map_err(transport)?;
            if status >= 400 {
                let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
                return Err(classify(status, json.as_ref()));
            }
            let parsed: PlatformTokenResponse = serde_json::from_slice(&body)
                .map_err(|_| CallError::Transient("unreadable token response".into()))?;
            Ok(Grant::from(&parsed))
        })
        .await
    }

    /// Runs `call` up to the configured attempts while it fails transiently,
    /// with backoff from 100 ms.
    async fn retrying<T, F, Fut>(&self, call: F) -> Result<T, CallError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, CallError>>,
    {
        let mut attempt = 1;
        loop {
            match call().await {
                Err(CallError::Transient(why)) if attempt < self.attempts => {
                    tracing::debug!(platform = %self.platform, attempt, why, "platform call failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 << (attempt - 1).min(5))).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

#[async_trait]
impl PlatformApi for Provider {
    fn platform(&self) -> Platform {
        self.platform
    }

    fn refresh_model(&self) -> RefreshModel {
        self.profile.refresh
    }

    fn redirect_uri(&self) -> &str {
        &self.redirect_uri
    }

    fn scopes(&self) -> &[String] {
        &self.scopes
    }

    /// The URL to send the user to, and the PKCE verifier to keep (when the
    /// platform supports PKCE).
    fn authorization_url(&self, state: &str) -> (String, Option<SecretString>) {
        let state = state.to_owned();
        let mut request = self.oauth.authorize_url(move || CsrfToken::new(state));
        if !self.scopes.is_empty() {
            // One joined parameter: Facebook takes commas.
            request = request.add_scope(Scope::new(self.scopes.join(self.profile.scope_separator)));
        }
        for (name, value) in self.profile.auth_params {
            request = request.add_extra_param(*name, *value);
        }
        let verifier = if self.profile.pkce {
            let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
            request = request.set_pkce_challenge(challenge);
            Some(SecretString::from(verifier.secret().clone()))
        } else {
            None
        };
        let (url, _) = request.url();
        (url.to_string(), verifier)
    }

    /// Exchanges an authorization code (not retried: a code is single-use).
    /// Facebook's short-lived token is exchanged for a long-lived one.
    async fn exchange_code(
        &self,
        code: &str,
        verifier: Option<&SecretString>,
    ) -> Result<Grant, CallError> {
        let status = AtomicU16::new(0);
        let mut request = self
            .oauth
            .exchange_code(AuthorizationCode::new(code.to_owned()));
        if let Some(verifier) = verifier {
            request =
                request.set_pkce_verifier(PkceCodeVerifier::new(verifier.expose_secret().into()));
        }
        let retry_after_ms = std::sync::atomic::AtomicU64::new(0);
        let sender = Sender {
            http: &self.http,
            status: &status,
            retry_after_ms: &retry_after_ms,
        };
        let grant = grant(
            request.request_async(&sender).await,
            &status,
            &retry_after_ms,
        )?;
        match self.profile.refresh {
            RefreshModel::RefreshToken => Ok(grant),
            RefreshModel::ExchangeLongLived => self.extend(&grant.access_token).await,
        }
    }

    /// A new access token from the stored grant: the refresh token, or for
    /// Facebook the current long-lived token.
    async fn refresh(
        &self,
        refresh_token: Option<&SecretString>,
        access_token: &SecretString,
    ) -> Result<Grant, CallError> {
        match self.profile.refresh {
            RefreshModel::ExchangeLongLived => self.extend(access_token).await,
            RefreshModel::RefreshToken => {
                let refresh_token = refresh_token.ok_or_else(|| {
                    CallError::InvalidGrant("no refresh token was granted".into())
                })?;
                self.retrying(|| async move {
                    let status = AtomicU16::new(0);
                    let retry_after_ms = std::sync::atomic::AtomicU64::new(0);
                    let token = RefreshToken::new(refresh_token.expose_secret().to_owned());
                    let sender = Sender {
                        http: &self.http,
                        status: &status,
                        retry_after_ms: &retry_after_ms,
                    };
                    let result = self
                        .oauth
                        .exchange_refresh_token(&token)
                        .request_async(&sender)
                        .await;
                    grant(result, &status, &retry_after_ms)
                })
                .await
            }
        }
    }

    /// Who the token belongs to.
    async fn identity(&self, access_token: &SecretString) -> Result<Identity, CallError> {
        self.retrying(|| async move {
            let token = access_token.expose_secret();
            let request = match self.platform {
                Platform::Twitch => self
                    .http
                    .get(format!("{}/users", self.api_url))
                    .bearer_auth(token)
                    .header("Client-Id", &self.client_id),
                Platform::Youtube => self
                    .http
                    .get(format!("{}/youtube/v3/channels", self.api_url))
                    .query(&[("part", "snippet"), ("mine", "true")])
                    .bearer_auth(token),
                Platform::Facebook => self
                    .http
                    .get(format!("{}/me", self.api_url))
                    .query(&[("fields", "id,name")])
                    .bearer_auth(token),
                Platform::Soop => self
                    .http
                    .post(format!("{}/user/stationinfo", self.api_url))
                    .bearer_auth(token)
                    .form(&[("client_id", self.client_id.as_str())]),
            };
            let body = checked(request.header_traced().send().await.map_err(transport)?).await?;
            if self.platform == Platform::Youtube && youtube_has_no_channel(&body) {
                // channels.list?mine=true answers "zero or more" channels:
                // a Google account without one has nothing to link.
                return Err(CallError::Refused(
                    "the Google account has no YouTube channel".into(),
                ));
            }
            parse_identity(self.platform, &body)
                .ok_or_else(|| CallError::Transient("unreadable identity response".into()))
        })
        .await
    }

    /// Twitch's `/oauth2/validate`: `Ok(false)` when the token is no longer
    /// valid. Platforms without the endpoint always answer `Ok(true)`.
    async fn validate(&self, access_token: &SecretString) -> Result<bool, CallError> {
        let Some(url) = &self.validate_url else {
            return Ok(true);
        };
        self.retrying(|| async move {
            let response = self
                .http
                .get(url)
                .header_traced()
                .header(
                    reqwest::header::AUTHORIZATION,
                    format!("OAuth {}", access_token.expose_secret()),
                )
                .send()
                .await
                .map_err(transport)?;
            match response.status().as_u16() {
                200..=299 => Ok(true),
                401 => Ok(false),
                429 => Err(CallError::RateLimited {
                    retry_after: retry_after_of(response.headers(), OffsetDateTime::now_utc()),
                }),
                s if s >= 500 => Err(CallError::Transient(format!("HTTP {s}"))),
                s => Err(CallError::Refused(format!("validate answered HTTP {s}"))),
            }
        })
        .await
    }

    /// Whether [`revoke`](Self::revoke) presents the access token (Twitch,
    /// Facebook), which the platform no longer knows once it has expired.
    fn revokes_by_access_token(&self) -> bool {
        matches!(self.platform, Platform::Twitch | Platform::Facebook)
    }

    /// Revokes the grant at the platform. `Ok(false)`: the platform has no
    /// revocation endpoint. `InvalidGrant`: the platform does not know the
    /// token (already revoked or expired): nothing is left to revoke.
    async fn revoke(
        &self,
        access_token: &SecretString,
        refresh_token: Option<&SecretString>,
    ) -> Result<bool, CallError> {
        let Some(url) = &self.revoke_url else {
            return Ok(false);
        };
        self.retrying(|| async move {
            let request = match self.platform {
                // Revoking the access token ends the authorization.
                Platform::Twitch => self.http.post(url).form(&[
                    ("client_id", self.client_id.as_str()),
                    ("token", access_token.expose_secret()),
                ]),
                // Revoking the refresh token revokes the whole grant.
                Platform::Youtube => self.http.post(url).form(&[(
                    "token",
                    refresh_token.unwrap_or(access_token).expose_secret(),
                )]),
                Platform::Facebook => self
                    .http
                    .delete(url)
                    .bearer_auth(access_token.expose_secret()),
                Platform::Soop => return Ok(false),
            };
            let response = request.header_traced().send().await.map_err(transport)?;
            let status = response.status().as_u16();
            if (200..300).contains(&status) {
                return Ok(true);
            }
            if status == 429 {
                return Err(CallError::RateLimited {
                    retry_after: retry_after_of(response.headers(), OffsetDateTime::now_utc()),
                });
            }
            let body = response.bytes().await.map_err(transport)?;
            Err(api_error(status, &body))
        })
        .await
    }
}

/// The oauth2 crate's HTTP client: reqwest, with 5xx turned into a
/// transport-level error (so it is told apart from a refusal) and the status
/// kept for classifying unparseable error bodies.
struct Sender<'a> {
    http: &'a reqwest::Client,
    status: &'a AtomicU16,
    /// A 429's wait, in milliseconds (0: none).
    retry_after_ms: &'a std::sync::atomic::AtomicU64,
}

type SendFuture<'c> =
    std::pin::Pin<Box<dyn Future<Output = Result<oauth2::HttpResponse, HttpFailure>> + Send + 'c>>;

impl<'c> oauth2::AsyncHttpClient<'c> for Sender<'_> {
    type Error = HttpFailure;
    type Future = SendFuture<'c>;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let response = self
                .http
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .header_traced()
                .body(body)
                .send()
                .await
                .map_err(HttpFailure::transport)?;
            let code = response.status();
            self.status.store(code.as_u16(), Ordering::Relaxed);
            if code.as_u16() == 429 {
                let wait = retry_after_of(response.headers(), OffsetDateTime::now_utc());
                self.retry_after_ms.store(
                    u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
            }
            if code.is_server_error() {
                return Err(HttpFailure::Status(code.as_u16()));
            }
            let mut builder = oauth2::http::Response::builder().status(code);
            for (name, value) in response.headers() {
                builder = builder.header(name, value);
            }
            let body = response.bytes().await.map_err(HttpFailure::transport)?;
            builder
                .body(body.to_vec())
                .map_err(|e| HttpFailure::Transport(e.to_string()))
        })
    }
}

/// Outbound calls continue the current trace (W3C `traceparent`).
trait Traced {
    fn header_traced(self) -> Self;
}

impl Traced for reqwest::RequestBuilder {
    fn header_traced(self) -> Self {
        match auth_domain::trace::current_traceparent() {
            Some(traceparent) => self.header("traceparent", traceparent),
            None => self,
        }
    }
}

impl From<&PlatformTokenResponse> for Grant {
    fn from(r: &PlatformTokenResponse) -> Self {
        Self {
            access_token: SecretString::from(r.access_token.secret().clone()),
            refresh_token: r
                .refresh_token
                .as_ref()
                .map(|t| SecretString::from(t.secret().clone())),
            expires_in: r.expires_in(),
            scopes: r
                .scopes
                .as_ref()
                .map(|s| s.iter().map(|s| s.to_string()).collect()),
        }
    }
}

/// Classifies the oauth2 crate's result.
fn grant(
    result: Result<PlatformTokenResponse, RequestTokenError<HttpFailure, ErrorBody>>,
    status: &AtomicU16,
    retry_after_ms: &std::sync::atomic::AtomicU64,
) -> Result<Grant, CallError> {
    if result.is_err() && status.load(Ordering::Relaxed) == 429 {
        return Err(CallError::RateLimited {
            retry_after: Duration::from_millis(retry_after_ms.load(Ordering::Relaxed))
                .max(Duration::from_secs(1)),
        });
    }
    match result {
        Ok(response) => Ok(Grant::from(&response)),
        Err(RequestTokenError::ServerResponse(body)) => {
            Err(classify(status.load(Ordering::Relaxed), Some(&body.0)))
        }
        Err(RequestTokenError::Request(e)) => Err(CallError::Transient(e.to_string())),
        Err(RequestTokenError::Parse(_, body)) => {
            let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
            Err(classify(status.load(Ordering::Relaxed), json.as_ref()))
        }
        // oauth2 answers a non-200 without a body with `Other` before any
        // parsing: a 4xx without a body is still a refusal, not a reason to
        // call again.
        Err(RequestTokenError::Other(e)) => match status.load(Ordering::Relaxed) {
            s @ 400..=499 => Err(classify(s, None)),
            _ => Err(CallError::Transient(e)),
        },
    }
}

fn transport(error: reqwest::Error) -> CallError {
    CallError::Transient(HttpFailure::transport(error).to_string())
}

/// The body of a 2xx answer of an API endpoint (identity, revocation);
/// otherwise what the failure means ([`api_error`]).
async fn checked(response: reqwest::Response) -> Result<Vec<u8>, CallError> {
    let status = response.status().as_u16();
    if status == 429 {
        return Err(CallError::RateLimited {
            retry_after: retry_after_of(response.headers(), OffsetDateTime::now_utc()),
        });
    }
    let body = response.bytes().await.map_err(transport)?;
    match status {
        200..=299 => Ok(body.to_vec()),
        s => Err(api_error(s, &body)),
    }
}

/// How long a Google API quota error keeps us away: `quotaExceeded` and
/// `dailyLimitExceeded` reset at midnight Pacific time, so an hour at most
/// is wasted; `rateLimitExceeded` is a per-minute limit (and
/// `userRateLimitExceeded` one user's, not the platform's).
pub const GOOGLE_QUOTA_WAIT: Duration = Duration::from_secs(3600);
pub const GOOGLE_RATE_WAIT: Duration = Duration::from_secs(60);

/// What a non-2xx answer of an API endpoint means: 401 a dead token, 5xx
/// transient; a Google API quota or rate error (a 403 with
/// `error.errors[].reason`, developers.google.com/youtube/v3/docs/errors) a
/// rate limit; otherwise the body read by [`classify`] (a Graph API
/// throttle code is a rate limit, code 190 a dead token) or, without one, a
/// refusal.
pub fn api_error(status: u16, body: &[u8]) -> CallError {
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let reason = json
        .as_ref()
        .and_then(|v| v.pointer("/error/errors/0/reason"))
        .and_then(serde_json::Value::as_str);
    match (status, reason) {
        (401, _) => CallError::InvalidGrant("the platform refused the token".into()),
        (s, _) if s >= 500 => CallError::Transient(format!("HTTP {s}")),
        (_, Some("quotaExceeded" | "dailyLimitExceeded")) => CallError::RateLimited {
            retry_after: GOOGLE_QUOTA_WAIT,
        },
        (_, Some("rateLimitExceeded")) => CallError::RateLimited {
            retry_after: GOOGLE_RATE_WAIT,
        },
        // One user's limit: that call later, not the platform for everyone.
        (_, Some("userRateLimitExceeded")) => {
            CallError::Transient("the user's rate limit at the platform".into())
        }
        (s, _) => classify(s, json.as_ref()),
    }
}

/// How long a Graph API throttle (codes 4, 32, 613) keeps us away: the
/// API names no reset, and its limits are counted over an hour's window.
pub const GRAPH_THROTTLE_WAIT: Duration = Duration::from_secs(300);

/// What a token endpoint's failure means, from its HTTP status and its body
/// in any of the platforms' documented shapes:
///
/// * RFC 6749 §5.2 (Google, SOOP): `{"error": "invalid_grant", …}` is a
///   dead grant; the other codes (`invalid_client`, `invalid_request`,
///   `unauthorized_client`, `redirect_uri_mismatch`, …) are refusals;
/// * Twitch (dev.twitch.tv/docs/authentication/refresh-tokens):
///   `{"error": "Bad Request", "status": 400, "message": "Invalid refresh
///   token"}` — a dead grant by its message (also without `error`);
///   `"invalid client secret"` and the like are refusals;
/// * the Graph API (developers.facebook.com/docs/graph-api/guides/error-handling):
///   `{"error": {"code": 190, …}}` (an invalid or expired token, whatever
///   its subcode) and code 100 with subcode 36007/36009 (a code expired or
///   already used) are dead grants; a message about the client secret or
///   the redirect URI is a refusal; codes 4, 32 and 613 (the app's rate
///   limits) wait; 17 (one user's limit), 1, 2, 341 and 368 (temporary)
///   are transient; anything else is a refusal;
/// * without a readable body: 429 and 5xx are transient, other 4xx a
///   refusal (never a dead grant on a guess: that would unlink accounts on
///   a platform's misconfiguration), anything else transient.
pub fn classify(status: u16, body: Option<&serde_json::Value>) -> CallError {
    use serde_json::Value;
    let text = || {
        body.map(message_of)
            .unwrap_or_else(|| format!("HTTP {status}"))
    };
    if let Some(body) = body {
        if let Some(code) = body.get("error").and_then(Value::as_str) {
            match code {
                // `invalid_token`: Google's revocation endpoint for a token
                // it no longer knows (developers.google.com/identity/
                // protocols/oauth2/web-server#tokenrevoke).
                "invalid_grant" | "invalid_token" => return CallError::InvalidGrant(text()),
                "invalid_client"
                | "unauthorized_client"
                | "invalid_request"
                | "invalid_scope"
                | "unsupported_grant_type"
                | "redirect_uri_mismatch"
                | "access_denied" => {
                    return CallError::Refused(text());
                }
                _ => {}
            }
        }
        if let Some(message) = body.get("message").and_then(Value::as_str) {
            let m = message.to_ascii_lowercase();
            // "Invalid token": Twitch's revocation endpoint for a token it
            // does not know (dev.twitch.tv/docs/authentication/revoke-tokens).
            if m.contains("invalid refresh token")
                || m == "invalid token"
                || m.contains("invalid authorization code")
                || m.contains("invalid code")
            {
                return CallError::InvalidGrant(text());
            }
            if (400..500).contains(&status) && status != 429 {
                return CallError::Refused(text());
            }
        }
        if let Some(error) = body.get("error").filter(|e| e.is_object()) {
            let code = error.get("code").and_then(Value::as_i64);
            let subcode = error.get("error_subcode").and_then(Value::as_i64);
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_ascii_lowercase();
            if message.contains("client secret") || message.contains("redirect_uri") {
                return CallError::Refused(text());
            }
            // developers.facebook.com/docs/graph-api/guides/error-handling:
            // 102 (API session) and 190 are a dead session; 4, 32 and 613
            // are the app's (or page's) rate limits (the Graph API answers
            // them in the body, never with a 429): the platform is not called
            // again for a while; 17 is one user's limit and 1, 2, 341 and 368
            // are temporary: that call is retried later, the platform is not
            // cooled down for everyone.
            return match (code, subcode) {
                (Some(190), _) | (Some(102), _) | (Some(100), Some(36007 | 36009)) => {
                    CallError::InvalidGrant(text())
                }
                (Some(4 | 32 | 613), _) => CallError::RateLimited {
                    retry_after: GRAPH_THROTTLE_WAIT,
                },
                (Some(1 | 2 | 17 | 341 | 368), _) => CallError::Transient(text()),
                _ => CallError::Refused(text()),
            };
        }
    }
    match status {
        429 | 500.. => CallError::Transient(text()),
        400..=499 => CallError::Refused(text()),
        _ => CallError::Transient(format!("unreadable token response (HTTP {status})")),
    }
}

/// The message of an error body in any platform's shape: Twitch
/// `{"status":400,"message":…}`, the Graph API `{"error":{"message":…}}`,
/// RFC 6749 `{"error":…,"error_description":…}`.
fn message_of(v: &serde_json::Value) -> String {
    Some(v)
        .and_then(|v| {
            ["/message", "/error/message", "/error_description", "/error"]
                .iter()
                .find_map(|p| v.pointer(p)?.as_str())
        })
        .map(|m| m.chars().take(200).collect())
        .unwrap_or_else(|| "the platform refused the grant".into())
}

/// The identity in each platform's response shape.
/// A well-formed channels.list answer with no channel (`items` empty or
/// absent, as the API omits empty lists).
fn youtube_has_no_channel(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| {
        v.get("kind").is_some()
            && v.get("items")
                .and_then(serde_json::Value::as_array)
                .is_none_or(Vec::is_empty)
    })
}

pub fn parse_identity(platform: Platform, body: &[u8]) -> Option<Identity> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let text = |v: &serde_json::Value, p: &str| v.pointer(p)?.as_str().map(str::to_owned);
    let identity = match platform {
        // {"data":[{"id":"141981764","login":"twitchdev","display_name":"TwitchDev",…}]}
        Platform::Twitch => Identity {
            platform_user_id: text(&v, "/data/0/id")?,
            login: text(&v, "/data/0/login")?,
            display_name: text(&v, "/data/0/display_name")?,
        },
        // {"items":[{"id":"UC…","snippet":{"title":"…","customUrl":"@…"}}]}
        Platform::Youtube => Identity {
            platform_user_id: text(&v, "/items/0/id")?,
            login: text(&v, "/items/0/snippet/customUrl").unwrap_or_default(),
            display_name: text(&v, "/items/0/snippet/title")?,
        },
        // {"id":"…","name":"…"}
        Platform::Facebook => Identity {
            platform_user_id: text(&v, "/id")?,
            login: String::new(),
            display_name: text(&v, "/name")?,
        },
        // {"result":1,"data":{"user_id":"…","user_nick":"…"}}
        Platform::Soop => Identity {
            platform_user_id: text(&v, "/data/user_id")?,
            login: text(&v, "/data/user_id")?,
            display_name: text(&v, "/data/user_nick").unwrap_or_default(),
        },
    };
    (!identity.platform_user_id.is_empty()).then_some(identity)
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_429_waits_as_long_as_the_platform_says() {
        use reqwest::header::{HeaderMap, HeaderValue};
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let with = |pairs: &[(&'static str, String)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_str(v).unwrap());
            }
            retry_after_of(&h, now)
        };
        assert_eq!(with(&[("retry-after", "7".into())]), Duration::from_secs(7));
        // An HTTP-date (RFC 9110), 30 s ahead.
        let date = (now + time::Duration::seconds(30))
            .format(&time::format_description::well_known::Rfc2822)
            .unwrap();
        assert_eq!(with(&[("retry-after", date)]), Duration::from_secs(30));
        // Twitch: the bucket's reset as a Unix time.
        assert_eq!(
            with(&[("ratelimit-reset", "1800000012".into())]),
            Duration::from_secs(12)
        );
        // Retry-After wins; nothing said: 1 s; never past an hour.
        assert_eq!(
            with(&[
                ("retry-after", "3".into()),
                ("ratelimit-reset", "1800000012".into())
            ]),
            Duration::from_secs(3)
        );
        assert_eq!(with(&[]), Duration::from_secs(1));
        assert_eq!(
            with(&[("retry-after", "999999".into())]),
            Duration::from_secs(3600)
        );
        assert_eq!(
            with(&[("ratelimit-reset", "1700000000".into())]),
            Duration::from_secs(1)
        );
    }

    /// Every documented error answer of every platform's token endpoint,
    /// through the one classifier: what it means, not which parser read it.
    #[test]
    fn api_errors_are_read_by_their_meaning() {
        let later = |e: CallError| match e {
            CallError::RateLimited { retry_after } => Some(retry_after),
            _ => None,
        };
        // developers.google.com/youtube/v3/docs/errors: quota and rate
        // errors are 403 with the reason in error.errors[0].reason.
        let quota = br#"{"error":{"code":403,"message":"The request cannot be completed because you have exceeded your quota.","errors":[{"message":"...","domain":"youtube.quota","reason":"quotaExceeded"}]}}"#;
        assert_eq!(later(api_error(403, quota)), Some(GOOGLE_QUOTA_WAIT));
        let rate = br#"{"error":{"code":403,"message":"Rate Limit Exceeded","errors":[{"domain":"usageLimits","reason":"rateLimitExceeded"}]}}"#;
        assert_eq!(later(api_error(403, rate)), Some(GOOGLE_RATE_WAIT));
        let forbidden = br#"{"error":{"code":403,"message":"Insufficient Permission","errors":[{"domain":"global","reason":"insufficientPermissions"}]}}"#;
        assert!(matches!(api_error(403, forbidden), CallError::Refused(_)));
        // Graph API: a throttle in the body, a dead token by code 190.
        let throttled = br#"{"error":{"message":"(#4) Application request limit reached","type":"OAuthException","code":4}}"#;
        assert_eq!(later(api_error(400, throttled)), Some(GRAPH_THROTTLE_WAIT));
        let dead = br#"{"error":{"message":"Error validating access token: Session has expired","type":"OAuthException","code":190,"error_subcode":463}}"#;
        assert!(matches!(api_error(400, dead), CallError::InvalidGrant(_)));
        assert!(matches!(api_error(401, b""), CallError::InvalidGrant(_)));
        assert!(matches!(api_error(503, b"busy"), CallError::Transient(_)));
        assert!(matches!(api_error(400, b""), CallError::Refused(_)));
        assert!(matches!(api_error(404, b"not json"), CallError::Refused(_)));
        // channels.list with no channel, in both documented forms.
        assert!(youtube_has_no_channel(
            br#"{"kind":"youtube#channelListResponse","items":[]}"#
        ));
        assert!(youtube_has_no_channel(
            br#"{"kind":"youtube#channelListResponse","pageInfo":{"totalResults":0}}"#
        ));
        assert!(!youtube_has_no_channel(
            br#"{"kind":"youtube#channelListResponse","items":[{"id":"UCx"}]}"#
        ));
        assert!(!youtube_has_no_channel(b"garbled"));
    }

    #[test]
    fn every_documented_token_error_is_classified_by_its_meaning() {
        use serde_json::json;
        #[derive(Debug, PartialEq)]
        enum Is {
            Dead,
            Refused,
            Transient,
            /// Rate limited: the platform is left alone for a while.
            Later,
        }
        let cases: Vec<(&str, u16, Option<serde_json::Value>, Is)> = vec![
            // dev.twitch.tv/docs/authentication/refresh-tokens ("if the
            // request fails"): a dead refresh token.
            (
                "twitch dead refresh (documented)",
                400,
                Some(
                    json!({"error": "Bad Request", "status": 400, "message": "Invalid refresh token"}),
                ),
                Is::Dead,
            ),
            (
                "twitch dead refresh (without error)",
                400,
                Some(json!({"status": 400, "message": "Invalid refresh token"})),
                Is::Dead,
            ),
            (
                "twitch bad code",
                400,
                Some(
                    json!({"error": "Bad Request", "status": 400, "message": "Invalid authorization code"}),
                ),
                Is::Dead,
            ),
            (
                "twitch bad client secret",
                403,
                Some(
                    json!({"error": "Forbidden", "status": 403, "message": "invalid client secret"}),
                ),
                Is::Refused,
            ),
            (
                "twitch bad redirect",
                400,
                Some(
                    json!({"error": "Bad Request", "status": 400, "message": "Parameter redirect_uri does not match registered URI"}),
                ),
                Is::Refused,
            ),
            (
                "twitch rate limit",
                429,
                Some(json!({"error": "Too Many Requests", "status": 429, "message": ""})),
                Is::Transient,
            ),
            // developers.google.com/identity/protocols/oauth2/web-server
            // (RFC 6749 §5.2 errors).
            (
                "google revoked",
                400,
                Some(
                    json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."}),
                ),
                Is::Dead,
            ),
            (
                "google bad client",
                401,
                Some(json!({"error": "invalid_client", "error_description": "Unauthorized"})),
                Is::Refused,
            ),
            (
                "google bad redirect",
                400,
                Some(json!({"error": "redirect_uri_mismatch", "error_description": "Bad Request"})),
                Is::Refused,
            ),
            (
                "google 5xx",
                503,
                Some(json!({"error": "internal_failure"})),
                Is::Transient,
            ),
            // developers.facebook.com/docs/graph-api/guides/error-handling.
            (
                "facebook expired session",
                400,
                Some(
                    json!({"error": {"message": "Error validating access token: Session has expired", "type": "OAuthException", "code": 190, "error_subcode": 463}}),
                ),
                Is::Dead,
            ),
            (
                "facebook password changed",
                400,
                Some(
                    json!({"error": {"message": "Error validating access token: The session has been invalidated because the user changed their password", "type": "OAuthException", "code": 190, "error_subcode": 460}}),
                ),
                Is::Dead,
            ),
            (
                "facebook code used",
                400,
                Some(
                    json!({"error": {"message": "This authorization code has been used.", "type": "OAuthException", "code": 100, "error_subcode": 36009}}),
                ),
                Is::Dead,
            ),
            (
                "facebook bad client secret",
                400,
                Some(
                    json!({"error": {"message": "Error validating client secret.", "type": "OAuthException", "code": 1}}),
                ),
                Is::Refused,
            ),
            (
                "facebook temporary",
                500,
                Some(
                    json!({"error": {"message": "An unknown error has occurred.", "type": "OAuthException", "code": 1}}),
                ),
                Is::Transient,
            ),
            (
                "facebook bad parameter",
                400,
                Some(
                    json!({"error": {"message": "Invalid verification code format.", "type": "OAuthException", "code": 100}}),
                ),
                Is::Refused,
            ),
            (
                "facebook app rate limit",
                400,
                Some(
                    json!({"error": {"message": "(#4) Application request limit reached", "type": "OAuthException", "code": 4}}),
                ),
                Is::Later,
            ),
            (
                "facebook user request limit (one user's)",
                400,
                Some(
                    json!({"error": {"message": "(#17) User request limit reached", "type": "OAuthException", "code": 17}}),
                ),
                Is::Transient,
            ),
            (
                "facebook api session",
                400,
                Some(
                    json!({"error": {"message": "API Session", "type": "OAuthException", "code": 102}}),
                ),
                Is::Dead,
            ),
            (
                "facebook application limit reached (temporary)",
                400,
                Some(
                    json!({"error": {"message": "Application limit reached", "type": "OAuthException", "code": 341}}),
                ),
                Is::Transient,
            ),
            // The revocation endpoints' answers (`revoke` reads them with
            // this classifier; 401 counts as dead there). Twitch:
            // dev.twitch.tv/docs/authentication/revoke-tokens.
            (
                "twitch revoke: unknown token (documented)",
                400,
                Some(json!({"status": 400, "message": "Invalid token"})),
                Is::Dead,
            ),
            (
                "twitch revoke: bad client id (documented)",
                404,
                Some(json!({"status": 404, "message": "client does not exist"})),
                Is::Refused,
            ),
            // Google (…/oauth2/web-server#tokenrevoke) shows no body for its
            // 400: the body its endpoint sends, and none at all (a refusal:
            // tried again later, never taken as revoked).
            (
                "google revoke: unknown token",
                400,
                Some(
                    json!({"error": "invalid_token", "error_description": "Token expired or revoked"}),
                ),
                Is::Dead,
            ),
            ("google revoke: 400 without a body", 400, None, Is::Refused),
            // SOOP documents no error body: RFC 6749 shapes and none at all.
            (
                "soop invalid_grant",
                400,
                Some(json!({"error": "invalid_grant"})),
                Is::Dead,
            ),
            ("no body, 400", 400, None, Is::Refused),
            ("no body, 401", 401, None, Is::Refused),
            ("no body, 429", 429, None, Is::Transient),
            ("no body, 502", 502, None, Is::Transient),
            (
                "unknown JSON, 400",
                400,
                Some(json!({"whatever": true})),
                Is::Refused,
            ),
        ];
        for (name, status, body, want) in cases {
            let got = match classify(status, body.as_ref()) {
                CallError::InvalidGrant(_) => Is::Dead,
                CallError::Refused(_) => Is::Refused,
                CallError::Transient(_) => Is::Transient,
                CallError::RateLimited { .. } => Is::Later,
            };
            assert_eq!(got, want, "{name}");
        }
    }

    use super::*;

    #[test]
    fn token_responses_of_every_shape_parse() {
        let twitch: PlatformTokenResponse = serde_json::from_str(
            r#"{"access_token":"a","refresh_token":"r","expires_in":14124,"scope":["chat:read","user:read:email"],"token_type":"bearer"}"#,
        )
        .unwrap();
        let g = Grant::from(&twitch);
        assert_eq!(
            g.scopes.unwrap(),
            vec!["chat:read".to_owned(), "user:read:email".to_owned()]
        );
        assert_eq!(g.expires_in, Some(Duration::from_secs(14124)));
        let google: PlatformTokenResponse = serde_json::from_str(
            r#"{"access_token":"a","expires_in":3599,"scope":"openid https://www.googleapis.com/auth/youtube.readonly","token_type":"Bearer"}"#,
        )
        .unwrap();
        assert_eq!(Grant::from(&google).scopes.unwrap().len(), 2);
        assert!(Grant::from(&google).refresh_token.is_none());
        let facebook: PlatformTokenResponse = serde_json::from_str(
            r#"{"access_token":"a","token_type":"bearer","expires_in":5183944}"#,
        )
        .unwrap();
        assert!(Grant::from(&facebook).scopes.is_none());
        let bare: PlatformTokenResponse = serde_json::from_str(r#"{"access_token":"a"}"#).unwrap();
        assert!(Grant::from(&bare).expires_in.is_none());
    }

    #[test]
    fn identities_are_read_from_each_platform_shape() {
        let t = parse_identity(
            Platform::Twitch,
            br#"{"data":[{"id":"141981764","login":"twitchdev","display_name":"TwitchDev"}]}"#,
        )
        .unwrap();
        assert_eq!(t.platform_user_id, "141981764");
        assert_eq!(t.login, "twitchdev");
        assert!(parse_identity(Platform::Twitch, br#"{"data":[]}"#).is_none());
        let y = parse_identity(
            Platform::Youtube,
            br#"{"items":[{"id":"UCabc","snippet":{"title":"Chan","customUrl":"@chan"}}]}"#,
        )
        .unwrap();
        assert_eq!(
            (y.platform_user_id.as_str(), y.login.as_str()),
            ("UCabc", "@chan")
        );
        assert!(parse_identity(Platform::Youtube, br#"{"items":[]}"#).is_none());
        let f = parse_identity(Platform::Facebook, br#"{"id":"10","name":"Ann"}"#).unwrap();
        assert_eq!(f.display_name, "Ann");
        let s = parse_identity(
            Platform::Soop,
            br#"{"result":1,"data":{"user_id":"soopy","user_nick":"Soopy"}}"#,
        )
        .unwrap();
        assert_eq!(s.platform_user_id, "soopy");
        assert!(parse_identity(Platform::Soop, b"not json").is_none());
    }
}
