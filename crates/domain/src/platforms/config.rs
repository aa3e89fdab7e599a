//! The `platforms` section: each streaming platform's OAuth client, and the vault.

use std::path::PathBuf;

use crate::{
    error::{ConfigError, require},
    model::platform::Platform,
};

use serde::{Deserialize, Serialize};

/// Streaming-platform linking (`platforms.<name>.*` with `<name>` one of
/// `twitch`, `youtube`, `facebook`, `soop`; env
/// `AUTH_PLATFORMS__TWITCH__CLIENT_ID` and so on).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformsConfig {
    pub twitch: ProviderConfig,
    pub youtube: ProviderConfig,
    pub facebook: ProviderConfig,
    pub soop: ProviderConfig,
    /// GetPlatformAccessToken refreshes first when the access token expires
    /// within this many seconds.
    pub refresh_skew_secs: u64,
    /// How long a link state (StartPlatformLink → Connect) is valid.
    pub state_ttl_secs: u64,
    /// Bound on every call to a platform, in milliseconds.
    pub http_timeout_ms: u64,
    /// Attempts at a platform call that failed transiently (5xx, timeout,
    /// connection) before answering Unavailable; backoff doubles from 100 ms.
    pub retry_attempts: u32,
    /// How long one replica holds an account's refresh lease; others wait
    /// for its result meanwhile.
    pub refresh_lease_ms: u64,
    /// The token vault's key ring (`<id>.key` files); default
    /// `<data_dir>/platform-keys`.
    pub keys_dir: Option<PathBuf>,
    /// The key that seals; default: the greatest key id in the ring.
    pub current_key_id: Option<String>,
    /// Generate the first vault key when the ring is empty (the embedded
    /// default). Production mounts its keys and turns this off.
    pub generate_key_if_missing: bool,
    /// How often `keys_dir` is re-read: a key added or removed there (a
    /// Secret updated in place) is used without a restart; 0: only at start.
    pub reload_interval_secs: u64,
    /// Background keep-alive period (Facebook re-exchange, Twitch hourly
    /// validation); 0 turns the task off.
    pub keepalive_interval_secs: u64,
    /// Facebook long-lived tokens expiring within this many seconds are
    /// re-exchanged by the keep-alive task.
    pub extend_ahead_secs: u64,
    /// Twitch requires validating tokens in use hourly.
    pub validate_interval_secs: u64,
    /// Accounts handled per keep-alive round (spreads the load: no stampede).
    pub keepalive_batch: i64,
    /// Webhook messages older than this are refused (Twitch: 10 minutes).
    pub webhook_max_age_secs: u64,
}

/// One platform's OAuth client and endpoints. Without `client_id` the
/// platform is disabled.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub client_id: Option<String>,
    /// Redacted in Debug output, never serialized back out.
    #[serde(default, skip_serializing)]
    pub client_secret: Option<secrecy::SecretString>,
    /// Where the platform sends the user back (registered at the platform).
    pub redirect_uri: Option<String>,
    pub scopes: Vec<String>,
    pub auth_url: String,
    pub token_url: String,
    /// Base of the identity API (Helix, YouTube Data, Graph, SOOP openapi).
    pub api_url: String,
    pub revoke_url: Option<String>,
    /// Twitch only: the token validation endpoint.
    pub validate_url: Option<String>,
    /// Twitch only: the EventSub webhook secret (HMAC key). Facebook's
    /// deauthorize callback is signed with `client_secret`.
    #[serde(default, skip_serializing)]
    pub webhook_secret: Option<secrecy::SecretString>,
}

impl ProviderConfig {
    /// The real platform's endpoints and a minimal scope set.
    pub fn defaults(platform: crate::platforms::Platform) -> Self {
        use crate::platforms::Platform::*;
        let (auth, token, api, revoke, validate, scopes): (
            _,
            _,
            _,
            Option<&str>,
            Option<&str>,
            &[&str],
        ) = match platform {
            Twitch => (
                "https://id.twitch.tv/oauth2/authorize",
                "https://id.twitch.tv/oauth2/token",
                "https://api.twitch.tv/helix",
                Some("https://id.twitch.tv/oauth2/revoke"),
                Some("https://id.twitch.tv/oauth2/validate"),
                &["user:read:email"],
            ),
            Youtube => (
                "https://accounts.google.com/o/oauth2/v2/auth",
                "https://oauth2.googleapis.com/token",
                "https://www.googleapis.com",
                Some("https://oauth2.googleapis.com/revoke"),
                None,
                &["https://www.googleapis.com/auth/youtube.readonly"],
            ),
            Facebook => (
                "https://www.facebook.com/v19.0/dialog/oauth",
                "https://graph.facebook.com/v19.0/oauth/access_token",
                "https://graph.facebook.com/v19.0",
                Some("https://graph.facebook.com/v19.0/me/permissions"),
                None,
                &["public_profile"],
            ),
            Soop => (
                "https://openapi.sooplive.co.kr/auth/code",
                "https://openapi.sooplive.co.kr/auth/token",
                "https://openapi.sooplive.co.kr",
                None,
                None,
                &[],
            ),
        };
        Self {
            client_id: None,
            client_secret: None,
            redirect_uri: None,
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            auth_url: auth.into(),
            token_url: token.into(),
            api_url: api.into(),
            revoke_url: revoke.map(str::to_owned),
            validate_url: validate.map(str::to_owned),
            webhook_secret: None,
        }
    }
}

impl PlatformsConfig {
    pub fn provider(&self, platform: crate::platforms::Platform) -> &ProviderConfig {
        use crate::platforms::Platform::*;
        match platform {
            Twitch => &self.twitch,
            Youtube => &self.youtube,
            Facebook => &self.facebook,
            Soop => &self.soop,
        }
    }

    pub fn provider_mut(&mut self, platform: crate::platforms::Platform) -> &mut ProviderConfig {
        use crate::platforms::Platform::*;
        match platform {
            Twitch => &mut self.twitch,
            Youtube => &mut self.youtube,
            Facebook => &mut self.facebook,
            Soop => &mut self.soop,
        }
    }
}

impl Default for PlatformsConfig {
    fn default() -> Self {
        use crate::platforms::Platform;
        Self {
            twitch: ProviderConfig::defaults(Platform::Twitch),
            youtube: ProviderConfig::defaults(Platform::Youtube),
            facebook: ProviderConfig::defaults(Platform::Facebook),
            soop: ProviderConfig::defaults(Platform::Soop),
            refresh_skew_secs: 300,
            state_ttl_secs: 600,
            http_timeout_ms: 5000,
            retry_attempts: 3,
            refresh_lease_ms: 10_000,
            keys_dir: None,
            current_key_id: None,
            generate_key_if_missing: true,
            reload_interval_secs: 30,
            keepalive_interval_secs: 60,
            extend_ahead_secs: 7 * 24 * 3600,
            validate_interval_secs: 3600,
            keepalive_batch: 100,
            webhook_max_age_secs: 600,
        }
    }
}

impl ProviderConfig {
    /// Each error names its own key, relative to this platform's section.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let Some(client_id) = &self.client_id else {
            return Ok(()); // not configured: off
        };
        require(!client_id.is_empty(), "client_id", "must not be empty")?;
        require(
            self.client_secret.is_some(),
            "client_secret",
            "required when client_id is set",
        )?;
        let urls = [
            ("redirect_uri", self.redirect_uri.as_deref()),
            ("auth_url", Some(self.auth_url.as_str())),
            ("token_url", Some(self.token_url.as_str())),
            ("api_url", Some(self.api_url.as_str())),
            (
                "revoke_url",
                self.revoke_url.as_deref().or(Some("http://unset")),
            ),
            (
                "validate_url",
                self.validate_url.as_deref().or(Some("http://unset")),
            ),
        ];
        for (field, value) in urls {
            let http = value
                .and_then(|v| url::Url::parse(v).ok())
                .is_some_and(|u| matches!(u.scheme(), "http" | "https"));
            require(http, field, "needs an http(s) URL")?;
        }
        Ok(())
    }
}

impl PlatformsConfig {
    /// Each error names its own key, relative to this section
    /// (`twitch.client_secret`, `http_timeout_ms`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        for platform in Platform::ALL {
            self.provider(platform)
                .validate()
                .map_err(|e| e.within(platform.as_str()))?;
        }
        require(
            self.http_timeout_ms > 0,
            "http_timeout_ms",
            "must be positive",
        )?;
        require(
            self.retry_attempts > 0,
            "retry_attempts",
            "must be positive",
        )?;
        require(
            self.refresh_lease_ms > 0,
            "refresh_lease_ms",
            "must be positive",
        )?;
        require(
            self.state_ttl_secs > 0,
            "state_ttl_secs",
            "must be positive",
        )?;
        require(
            self.keepalive_batch > 0,
            "keepalive_batch",
            "must be positive",
        )
    }
}
