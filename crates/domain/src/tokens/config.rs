//! The `tokens` section: issuer, audience, lifetimes and signing keys.

use std::path::PathBuf;

use crate::error::{ConfigError, require};

use serde::{Deserialize, Serialize};

/// The most clock skew `leeway_secs` may allow (see [`TokenConfig::validate`]).
pub const MAX_LEEWAY_SECS: u64 = 60;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub issuer: String,
    pub audience: String,
    pub access_ttl_secs: u64,
    /// A refresh token unused for this long expires.
    pub refresh_idle_ttl_secs: u64,
    /// A session (refresh-token family) ends this long after login, however used.
    pub refresh_absolute_ttl_secs: u64,
    /// Clock-skew allowance for exp/nbf checks.
    pub leeway_secs: u64,
    /// Directory of Ed25519 signing keys (PKCS#8 PEM, one per file, file stem
    /// is the `kid`). Unset: `<data_dir>/keys`.
    pub keys_dir: Option<PathBuf>,
    /// Generate a first key when the directory holds none (the embedded
    /// default); production mounts keys and sets this to false.
    pub generate_key_if_missing: bool,
    /// How often `keys_dir` is re-read (besides SIGHUP): a key added or
    /// removed there (a Secret updated in place) is used without a restart;
    /// 0: only at start and on SIGHUP.
    pub reload_interval_secs: u64,
    /// Memory bound of the verified-token cache, in bytes.
    pub verified_cache_bytes: u64,
    /// Lifetime of the device token a login returns.
    pub device_ttl_secs: u64,
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            issuer: "immersiverse-auth".into(),
            audience: "immersiverse".into(),
            access_ttl_secs: 15 * 60,
            refresh_idle_ttl_secs: 14 * 24 * 3600,
            refresh_absolute_ttl_secs: 60 * 24 * 3600,
            leeway_secs: 30,
            keys_dir: None,
            generate_key_if_missing: true,
            reload_interval_secs: 30,
            verified_cache_bytes: 64 * 1024 * 1024,
            device_ttl_secs: 90 * 24 * 3600,
        }
    }
}

impl TokenConfig {
    /// Each error names its own key, relative to this section.
    pub fn validate(&self) -> Result<(), ConfigError> {
        require(
            self.access_ttl_secs > 0,
            "access_ttl_secs",
            "must be positive",
        )?;
        // Revocations are kept an access-token lifetime plus 60 s (edge
        // mode's deny maps, the revocation floors): a token accepted past
        // its `exp` for longer would outlive its revocation.
        require(
            self.leeway_secs <= MAX_LEEWAY_SECS,
            "leeway_secs",
            "must be at most 60",
        )?;
        require(
            self.refresh_idle_ttl_secs > 0,
            "refresh_idle_ttl_secs",
            "must be positive",
        )?;
        require(
            self.device_ttl_secs > 0,
            "device_ttl_secs",
            "must be positive",
        )?;
        require(
            self.refresh_absolute_ttl_secs >= self.refresh_idle_ttl_secs,
            "refresh_absolute_ttl_secs",
            "must be at least refresh_idle_ttl_secs",
        )?;
        require(!self.issuer.is_empty(), "issuer", "must not be empty")?;
        require(!self.audience.is_empty(), "audience", "must not be empty")
    }
}
