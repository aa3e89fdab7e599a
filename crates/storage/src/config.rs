//! The stores' settings: the database and Redis.

use std::{path::PathBuf, time::Duration};

use auth_domain::error::{ConfigError, require};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Migrations {
    Apply,
    Wait,
}

/// TLS to Redis: the CA that issued its certificate (default: the system's
/// roots), and a client certificate when Redis requires one
/// (`tls-auth-clients yes`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisTlsConfig {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// How Redis is reached.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    #[default]
    Standalone,
    Cluster,
    Sentinel,
}

/// The database as the stores see it, assembled by the binary from its
/// `database_*` keys and `data_dir`. Its `Debug` never shows the URL (it
/// may hold a password).
#[derive(Clone)]
pub struct DatabaseConfig {
    /// `postgres://…` or `sqlite://…` (the binary fills in the embedded
    /// default's SQLite file).
    pub url: String,
    /// Where the embedded default's SQLite file lives (created if missing).
    pub data_dir: PathBuf,
    pub max_connections: u32,
    /// How long a call waits for a connection.
    pub acquire_timeout: Duration,
    pub migrations: Migrations,
    /// With [`Migrations::Wait`]: how long to wait for the schema.
    pub migrations_wait: Duration,
}

/// The fast state (revocations, login counters, request quotas): Redis
/// when `redis_url` is set, else in process. Its `Debug` never shows the
/// URL (it may hold a password).
#[derive(Clone)]
pub struct FastStateConfig {
    pub redis_url: Option<String>,
    pub redis_mode: RedisMode,
    pub redis_sentinel_master: String,
    pub redis_key_prefix: String,
    pub redis_timeout: Duration,
    pub redis_tls: RedisTlsConfig,
    pub redis_allow_evicting_policy: bool,
    /// In process: how many revocations are kept.
    pub revocation_capacity: u64,
    /// In process: how many request quotas are kept.
    pub quota_capacity: u64,
}

impl DatabaseConfig {
    /// Each error names the key it comes from (they are top-level keys).
    pub fn validate(&self) -> Result<(), ConfigError> {
        require(
            ["postgres://", "postgresql://", "sqlite:"]
                .iter()
                .any(|scheme| self.url.starts_with(scheme)),
            "database_url",
            "must start with postgres:// or sqlite:",
        )?;
        require(
            self.max_connections > 0,
            "database_max_connections",
            "must be positive",
        )?;
        require(
            !self.acquire_timeout.is_zero(),
            "database_timeout_ms",
            "must be positive",
        )
    }
}

impl FastStateConfig {
    /// Each error names the key it comes from (they are top-level keys).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.redis_url {
            let urls: Vec<&str> = match self.redis_mode {
                RedisMode::Standalone => vec![url.as_str()],
                RedisMode::Cluster | RedisMode::Sentinel => url.split(',').map(str::trim).collect(),
            };
            require(
                urls.iter()
                    .all(|u| u.starts_with("redis://") || u.starts_with("rediss://")),
                "redis_url",
                "must start with redis:// or rediss:// (in cluster and sentinel modes: each comma-separated node)",
            )?;
        }
        require(
            !self.redis_timeout.is_zero(),
            "redis_timeout_ms",
            "must be positive",
        )?;
        let tls = &self.redis_tls;
        require(
            tls.cert.is_some() == tls.key.is_some(),
            if tls.cert.is_some() {
                "redis_tls.key"
            } else {
                "redis_tls.cert"
            },
            "redis_tls.cert and redis_tls.key go together",
        )?;
        require(
            !(tls.ca.is_some() || tls.cert.is_some())
                || self
                    .redis_url
                    .as_deref()
                    .is_some_and(|u| u.starts_with("rediss://")),
            "redis_url",
            "redis_tls needs a rediss:// URL",
        )
    }
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &"<redacted>")
            .field("data_dir", &self.data_dir)
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("migrations", &self.migrations)
            .field("migrations_wait", &self.migrations_wait)
            .finish()
    }
}

impl std::fmt::Debug for FastStateConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastStateConfig")
            .field("redis_url", &self.redis_url.as_ref().map(|_| "<redacted>"))
            .field("redis_mode", &self.redis_mode)
            .field("redis_timeout", &self.redis_timeout)
            .field("revocation_capacity", &self.revocation_capacity)
            .field("quota_capacity", &self.quota_capacity)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The URLs may hold a password: `Debug` never shows them.
    #[test]
    fn the_store_settings_never_show_their_urls() {
        let database = DatabaseConfig {
            url: "postgres://auth:hunter2@db/auth".into(),
            data_dir: PathBuf::from("data"),
            max_connections: 1,
            acquire_timeout: Duration::from_secs(1),
            migrations: Migrations::Apply,
            migrations_wait: Duration::from_secs(1),
        };
        let fast = FastStateConfig {
            redis_url: Some("redis://:hunter2@redis:6379".into()),
            redis_mode: RedisMode::Standalone,
            redis_sentinel_master: "m".into(),
            redis_key_prefix: "auth:".into(),
            redis_timeout: Duration::from_secs(1),
            redis_tls: RedisTlsConfig::default(),
            redis_allow_evicting_policy: false,
            revocation_capacity: 1,
            quota_capacity: 1,
        };
        let shown = format!("{database:?} {fast:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("max_connections"), "{shown}");
    }
}
