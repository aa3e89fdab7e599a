//! Typed configuration: defaults, then an optional TOML file, then `AUTH_*`
//! environment variables (`__` separates nested keys, e.g.
//! `AUTH_PASSWORD__MEMORY_KIB`). Everything is checked once at start-up and a
//! bad value stops the process with a message naming the key.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};

// Each component owns its section; this file assembles them into the one
// configuration, loads it (file, `AUTH_*`, `*_FILE`) and validates it.
pub use auth_api::config::{
    AccessLog, ClientAuth, LimitsConfig, RpcConfig, ServiceIdentity, TlsConfig,
};
pub use auth_domain::{
    accounts::config::PasswordConfig,
    authz::config::{AuthzConfig, RateClass},
    platforms::config::{PlatformsConfig, ProviderConfig},
    ratelimit::config::LockoutConfig,
    revocation::config::RevocationConfig,
    tokens::config::TokenConfig,
};
pub use auth_kafka::config::{EventsWorker, KafkaConfig};
pub use auth_storage::config::{
    DatabaseConfig, FastStateConfig, Migrations, RedisMode, RedisTlsConfig,
};

const FILE_SUFFIX: &str = "_file";

/// `AUTH_<KEY>_FILE=<path>` gives `<KEY>` the content of the file (one
/// trailing line break dropped): how secrets mounted as files (Kubernetes
/// Secrets) reach the configuration without entering the environment, e.g.
/// `AUTH_DATABASE_URL_FILE`, `AUTH_PLATFORMS__TWITCH__CLIENT_SECRET_FILE`.
/// Returns `(dotted key, value)`; an unreadable file stops the start, naming
/// the variable and the path but never the content.
fn values_from_files(
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut values = Vec::new();
    for (name, path) in vars {
        let Some(name) = name.to_str() else { continue };
        let Some(key) = name
            .strip_prefix("AUTH_")
            .and_then(|k| k.strip_suffix("_FILE"))
            .filter(|k| !k.is_empty())
        else {
            continue;
        };
        let content = std::fs::read_to_string(&path).map_err(|e| {
            ConfigError(format!(
                "{name}: cannot read {}: {e}",
                std::path::Path::new(&path).display()
            ))
        })?;
        let value = content
            .strip_suffix('\n')
            .map(|v| v.strip_suffix('\r').unwrap_or(v))
            .unwrap_or(&content);
        values.push((key.to_lowercase().replace("__", "."), value.to_owned()));
    }
    values.sort();
    Ok(values)
}

/// The whole service configuration. Field names are the keys of the TOML file
/// and, upper-cased behind `AUTH_`, of the environment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// gRPC listener (AuthService, health, reflection). Port 0 picks a free port.
    pub grpc_addr: SocketAddr,
    /// HTTP listener: /healthz, /readyz, the JWKS, the platforms' webhooks,
    /// and /metrics unless `metrics_addr` is set.
    pub http_addr: SocketAddr,
    /// A listener serving only `/metrics`, `/healthz` and `/readyz` (then
    /// `/metrics` leaves `http_addr`), so monitoring and the gateway can be
    /// let in to different ports. Unset: `/metrics` is on `http_addr`.
    pub metrics_addr: Option<SocketAddr>,
    /// A plaintext gRPC listener serving only `grpc.health.v1` (no API), for
    /// probes that cannot speak TLS (the kubelet's gRPC probe) when
    /// `grpc_addr` requires client certificates. Unset: none.
    pub health_addr: Option<SocketAddr>,
    /// Where the embedded default keeps its SQLite file and generated keys.
    pub data_dir: PathBuf,
    /// `postgres://…` or `sqlite://…`; unset means SQLite in `data_dir`.
    pub database_url: Option<String>,
    /// `redis://…`; unset means revocations and login counters live in process.
    /// With `redis_mode = "cluster"`: the seed nodes, comma-separated
    /// (`redis://a:6379,redis://b:6379`).
    pub redis_url: Option<String>,
    /// `standalone` (one server, or a proxy in front of several),
    /// `cluster` (Redis Cluster: keys are hash-tagged so that no command
    /// spans two slots) or `sentinel` (`redis_url` lists the sentinels,
    /// comma-separated; the master named `redis_sentinel_master` is asked
    /// of them, and asked again after a failover).
    pub redis_mode: RedisMode,
    /// The master's name as the sentinels monitor it (`sentinel` mode).
    pub redis_sentinel_master: String,
    /// Prefix of every Redis key this service writes (lets deployments and
    /// tests share one Redis).
    pub redis_key_prefix: String,
    /// Hard upper bound on one Redis call, in milliseconds.
    pub redis_timeout_ms: u64,
    /// TLS to Redis (with a `rediss://` URL).
    pub redis_tls: RedisTlsConfig,
    /// Start even when Redis's `maxmemory-policy` evicts keys (anything but
    /// `noeviction`), with a warning. Off: such a Redis stops start-up, as
    /// under memory pressure it would delete revocations.
    pub redis_allow_evicting_policy: bool,
    /// Maximum connections in the database pool.
    pub database_max_connections: u32,
    /// How long a call waits for a database connection before answering
    /// Unavailable, in milliseconds.
    pub database_timeout_ms: u64,
    /// `apply`: the server applies pending schema migrations at start (the
    /// embedded default, one instance). `wait`: it never changes the schema
    /// and waits, not ready, until someone else (`auth-service migrate`, a
    /// Kubernetes Job) has applied every migration it knows: replicas never
    /// race to migrate, and the serving role needs no DDL rights.
    pub database_migrations: Migrations,
    /// With `wait`: how long to wait for the schema before giving up (exit).
    pub database_migrations_wait_secs: u64,
    /// On SIGTERM/SIGINT: how long the server keeps serving while it reports
    /// NOT_SERVING (gRPC health, `/readyz`) before it stops accepting, so
    /// load balancers and DNS stop sending first (Kubernetes removes a pod's
    /// endpoints asynchronously). In-flight calls then finish within
    /// `limits.request_timeout_ms`.
    pub shutdown_delay_ms: u64,
    /// How many proxies in front of the service append to `x-forwarded-for`.
    /// The client address is the entry that many places from the right;
    /// 0 ignores the header and uses the peer address.
    pub trusted_proxy_hops: usize,
    pub log_format: LogFormat,
    pub password: PasswordConfig,
    pub tokens: TokenConfig,
    pub lockout: LockoutConfig,
    pub revocation: RevocationConfig,
    pub authz: AuthzConfig,
    /// Kafka bootstrap servers (`host:port,...`); unset: Kafka off, events
    /// stay in the outbox.
    pub kafka_brokers: Option<String>,
    pub kafka: KafkaConfig,
    pub limits: LimitsConfig,
    pub rpc: RpcConfig,
    pub platforms: PlatformsConfig,
    pub tls: TlsConfig,
    pub otel: OtelConfig,
    /// Service identities (a client certificate's SPIFFE URI SAN, else its
    /// DNS SAN) and the roles they hold, e.g.
    /// `[services."spiffe://immersiverse/ns/edge/sa/gateway"] roles = ["gateway"]`.
    /// A key ending in `/*` gives its roles to every identity one segment
    /// below it (`spiffe://immersiverse/ns/apps/sa/*`); an exact key wins.
    /// Role `gateway`: `x-forwarded-for` from this peer is trusted (with
    /// client certificates on, from no one else). Role `service`: may read
    /// platform tokens. Role `admin`: admin RPCs (an operator tool).
    pub services: BTreeMap<String, ServiceIdentity>,
}

/// OpenTelemetry traces over OTLP (gRPC).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtelConfig {
    /// The collector, e.g. `http://otel-collector:4317`; unset: no traces.
    pub endpoint: Option<String>,
    pub service_name: String,
    /// Share of new traces sampled (0 to 1); a caller's sampled decision
    /// (the `traceparent` flag) is followed.
    pub sampling_ratio: f64,
    /// Extra resource attributes (`deployment.environment = "prod"`, …).
    pub resource_attributes: BTreeMap<String, String>,
    /// Finished spans waiting for export; beyond it new spans are dropped
    /// (never blocking a request, never growing memory).
    pub max_queue_size: usize,
}

pub use auth_kafka::config::MAX_RELAY_BATCH;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            grpc_addr: ([127, 0, 0, 1], 50051).into(),
            http_addr: ([127, 0, 0, 1], 8081).into(),
            health_addr: None,
            metrics_addr: None,
            data_dir: PathBuf::from("./data"),
            database_url: None,
            redis_url: None,
            redis_mode: RedisMode::Standalone,
            redis_sentinel_master: "mymaster".into(),
            redis_key_prefix: "auth:".into(),
            redis_timeout_ms: 250,
            redis_tls: RedisTlsConfig::default(),
            redis_allow_evicting_policy: false,
            database_max_connections: 16,
            database_timeout_ms: 5000,
            database_migrations: Migrations::Apply,
            database_migrations_wait_secs: 600,
            shutdown_delay_ms: 0,
            trusted_proxy_hops: 1,
            log_format: LogFormat::Text,
            password: PasswordConfig::default(),
            tokens: TokenConfig::default(),
            lockout: LockoutConfig::default(),
            revocation: RevocationConfig::default(),
            authz: AuthzConfig::default(),
            kafka_brokers: None,
            kafka: KafkaConfig::default(),
            limits: LimitsConfig::default(),
            rpc: RpcConfig::default(),
            platforms: PlatformsConfig::default(),
            tls: TlsConfig::default(),
            services: BTreeMap::new(),
            otel: OtelConfig {
                endpoint: None,
                service_name: "auth-service".into(),
                sampling_ratio: 1.0,
                resource_attributes: BTreeMap::new(),
                max_queue_size: 2048,
            },
        }
    }
}

/// A configuration value that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl From<auth_domain::error::ConfigError> for ConfigError {
    fn from(error: auth_domain::error::ConfigError) -> Self {
        Self(error.to_string())
    }
}

impl OtelConfig {
    /// Each error names its own key, relative to this section.
    pub fn validate(&self) -> Result<(), auth_domain::error::ConfigError> {
        use auth_domain::error::require;
        require(
            (0.0..=1.0).contains(&self.sampling_ratio),
            "sampling_ratio",
            "must be between 0 and 1",
        )?;
        require(
            self.max_queue_size > 0,
            "max_queue_size",
            "must be positive",
        )
    }
}

impl Config {
    /// Defaults, then `file` (if given), then the process environment.
    pub fn load(file: Option<&std::path::Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(
            Env::prefixed("AUTH_")
                .split("__")
                .ignore(&["config"])
                .filter(|key| !key.as_str().to_ascii_lowercase().ends_with(FILE_SUFFIX)),
        );
        for (key, value) in values_from_files(std::env::vars_os())? {
            figment = figment.merge(Serialized::default(&key, value));
        }
        Self::extract(figment)
    }

    /// Defaults, then `toml` (no environment): what a configuration file
    /// with this text gives.
    pub fn from_toml(toml: &str) -> Result<Self, ConfigError> {
        Self::extract(
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(toml)),
        )
    }

    fn extract(figment: Figment) -> Result<Self, ConfigError> {
        let config: Config = figment.extract().map_err(|e| ConfigError(describe(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Semantic checks that serde cannot express.
    /// Each component validates its own section; an error names its own
    /// key, placed under the section here, and the variable that sets it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.database().validate()?;
        self.fast_state().validate()?;
        self.password.validate().map_err(|e| e.within("password"))?;
        self.tokens.validate().map_err(|e| e.within("tokens"))?;
        self.lockout.validate().map_err(|e| e.within("lockout"))?;
        self.authz.validate().map_err(|e| e.within("authz"))?;
        self.platforms
            .validate()
            .map_err(|e| e.within("platforms"))?;
        self.kafka.validate().map_err(|e| e.within("kafka"))?;
        self.limits.validate().map_err(|e| e.within("limits"))?;
        // A held refusal must still be answered within the call's bound.
        auth_domain::error::require(
            self.password.refusal_hold() < self.request_timeout(),
            "password.refusal_hold_ms",
            "must be below the request timeout (limits.request_timeout_ms)",
        )?;
        self.rpc.validate().map_err(|e| e.within("rpc"))?;
        self.tls.validate().map_err(|e| e.within("tls"))?;
        self.otel.validate().map_err(|e| e.within("otel"))?;
        Ok(())
    }

    /// The database section as the stores take it.
    pub fn database(&self) -> DatabaseConfig {
        DatabaseConfig {
            url: self.effective_database_url(),
            data_dir: self.data_dir.clone(),
            max_connections: self.database_max_connections,
            acquire_timeout: Duration::from_millis(self.database_timeout_ms),
            migrations: self.database_migrations,
            migrations_wait: Duration::from_secs(self.database_migrations_wait_secs),
        }
    }

    /// Redis (or its in-process stand-in) as the stores take it.
    pub fn fast_state(&self) -> FastStateConfig {
        FastStateConfig {
            redis_url: self.redis_url.clone(),
            redis_mode: self.redis_mode,
            redis_sentinel_master: self.redis_sentinel_master.clone(),
            redis_key_prefix: self.redis_key_prefix.clone(),
            redis_timeout: self.redis_timeout(),
            redis_tls: self.redis_tls.clone(),
            redis_allow_evicting_policy: self.redis_allow_evicting_policy,
            revocation_capacity: self.revocation.cache_capacity,
            quota_capacity: self.authz.rate_limit_capacity,
        }
    }

    /// The database URL in force: the configured one, else SQLite in the data dir.
    pub fn effective_database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("auth.db").display()
            ),
        }
    }

    /// The platform-token vault's key ring.
    pub fn platform_keys_dir(&self) -> PathBuf {
        self.platforms
            .keys_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("platform-keys"))
    }

    pub fn keys_dir(&self) -> PathBuf {
        self.tokens
            .keys_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("keys"))
    }

    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }

    /// The bound on one AuthService call.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(match self.limits.request_timeout_ms {
            0 => self.database_timeout_ms + self.password.max_wait_ms + 1000,
            n => n,
        })
    }

    /// The hashing queue's bounds.
    pub fn hash_admission(&self) -> crate::accounts::password::AdmissionConfig {
        let p = &self.password;
        crate::accounts::password::AdmissionConfig {
            max_queued: match p.max_queued {
                0 => 16 * self.hash_workers(),
                n => n,
            },
            max_queued_per_source: p.max_queued_per_source,
            max_wait: Duration::from_millis(p.max_wait_ms),
            device_lane: p.device_lane,
            quiet_sources_in_lane: p.quiet_sources_in_lane,
        }
    }

    pub fn hash_workers(&self) -> usize {
        match self.password.max_concurrent_hashes {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            n => n,
        }
    }
}

/// Names each bad key as the operator wrote it: `AUTH_GRPC_ADDR` for the
/// environment, `grpc_addr` for the file.
fn describe(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|e| {
            let key = e.path.join(".").to_lowercase();
            let from_env = e
                .metadata
                .as_ref()
                .is_some_and(|m| m.name.contains("environment"));
            let source = if from_env {
                format!("AUTH_{}", e.path.join("__").to_uppercase())
            } else {
                e.metadata
                    .as_ref()
                    .map(|m| m.name.to_string())
                    .unwrap_or_default()
            };
            format!("{key} (from {source}): {}", e.kind)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
// figment's Jail closures must return figment's own (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn each_relay_setting_is_named_by_its_own_error() {
        for (adjust, key) in [
            (
                (|c: &mut Config| c.kafka.relay_batch = 0) as fn(&mut Config),
                "kafka.relay_batch",
            ),
            (
                |c| c.kafka.relay_batch = MAX_RELAY_BATCH + 1,
                "kafka.relay_batch",
            ),
            (|c| c.kafka.relay_lease_secs = 0, "kafka.relay_lease_secs"),
            (|c| c.kafka.topic_partitions = 0, "kafka.topic_partitions"),
        ] {
            let mut config = Config::default();
            adjust(&mut config);
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        let mut config = Config::default();
        config.kafka.relay_batch = MAX_RELAY_BATCH;
        config.validate().unwrap();
    }

    /// Every validation error names the key it is about and the variable
    /// that sets it, not a neighbour or its section.
    #[test]
    fn every_invalid_value_is_named_by_its_own_key() {
        type Adjust = fn(&mut Config);
        let cases: &[(Adjust, &str)] = &[
            (
                |c| c.database_url = Some("mysql://x".into()),
                "database_url",
            ),
            (
                |c| c.database_max_connections = 0,
                "database_max_connections",
            ),
            (|c| c.database_timeout_ms = 0, "database_timeout_ms"),
            (|c| c.redis_url = Some("http://x".into()), "redis_url"),
            (|c| c.redis_timeout_ms = 0, "redis_timeout_ms"),
            (|c| c.redis_tls.cert = Some("c".into()), "redis_tls.key"),
            (|c| c.redis_tls.key = Some("k".into()), "redis_tls.cert"),
            (|c| c.password.iterations = 0, "password.iterations"),
            (|c| c.password.parallelism = 0, "password.parallelism"),
            (|c| c.password.memory_kib = 4, "password.memory_kib"),
            (|c| c.password.min_length = 0, "password.min_length"),
            (|c| c.password.max_length = 2000, "password.max_length"),
            (|c| c.password.max_wait_ms = 0, "password.max_wait_ms"),
            (|c| c.tokens.access_ttl_secs = 0, "tokens.access_ttl_secs"),
            (
                |c| c.tokens.refresh_idle_ttl_secs = 0,
                "tokens.refresh_idle_ttl_secs",
            ),
            (|c| c.tokens.device_ttl_secs = 0, "tokens.device_ttl_secs"),
            (|c| c.tokens.leeway_secs = 61, "tokens.leeway_secs"),
            (
                |c| c.tokens.refresh_absolute_ttl_secs = 1,
                "tokens.refresh_absolute_ttl_secs",
            ),
            (|c| c.tokens.audience.clear(), "tokens.audience"),
            (|c| c.tokens.issuer.clear(), "tokens.issuer"),
            (|c| c.lockout.window_secs = 0, "lockout.window_secs"),
            (
                |c| c.lockout.max_failures_per_ip = 0,
                "lockout.max_failures_per_ip",
            ),
            (
                |c| {
                    c.platforms.twitch.client_id = Some("id".into());
                    c.platforms.twitch.client_secret = Some("s".to_owned().into());
                    c.platforms.twitch.redirect_uri = Some("ftp://x".into());
                },
                "platforms.twitch.redirect_uri",
            ),
            (
                |c| c.platforms.retry_attempts = 0,
                "platforms.retry_attempts",
            ),
            (
                |c| c.platforms.keepalive_batch = 0,
                "platforms.keepalive_batch",
            ),
            (
                |c| c.kafka.security_protocol = "tls".into(),
                "kafka.security_protocol",
            ),
            (|c| c.kafka.relay_lease_secs = 0, "kafka.relay_lease_secs"),
            (|c| c.limits.max_header_bytes = 1, "limits.max_header_bytes"),
            (
                |c| c.tls.reload_interval_secs = 0,
                "tls.reload_interval_secs",
            ),
            (|c| c.tls.key = Some("k".into()), "tls.cert"),
            (|c| c.otel.max_queue_size = 0, "otel.max_queue_size"),
            (|c| c.otel.sampling_ratio = 2.0, "otel.sampling_ratio"),
        ];
        for (adjust, key) in cases {
            let mut config = Config::default();
            adjust(&mut config);
            let err = config.validate().unwrap_err().to_string();
            let env = format!("AUTH_{}", key.replace('.', "__").to_ascii_uppercase());
            assert!(err.contains(&format!("{key} ({env}): ")), "{key}: {err}");
        }
    }

    /// The README's configuration examples are configurations this
    /// version loads and accepts, so a renamed or moved key breaks here
    /// first.
    #[test]
    fn the_readmes_configuration_examples_load_and_validate() {
        let readme = include_str!("../README.md");
        let blocks: Vec<&str> = readme
            .split("```toml\n")
            .skip(1)
            .map(|rest| rest.split("```").next().unwrap_or_default())
            .collect();
        assert!(blocks.len() >= 3, "found {} toml blocks", blocks.len());
        for block in blocks {
            let config = Config::from_toml(block).unwrap_or_else(|e| panic!("{e}\n{block}"));
            config.validate().unwrap_or_else(|e| panic!("{e}\n{block}"));
        }
    }

    #[test]
    fn a_bad_environment_value_names_its_key() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("AUTH_GRPC_ADDR", "not-an-address");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("grpc_addr"), "{err}");
            assert!(err.contains("AUTH_GRPC_ADDR"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn the_istio_overlays_sidecar_address_list_is_read_from_its_variable() {
        figment::Jail::expect_with(|jail| {
            // As k8s/overlays/istio/auth-service.yaml sets it.
            jail.set_env("AUTH_TLS__XFCC_FROM", "[127.0.0.6]");
            let config = Config::load(None).unwrap();
            assert_eq!(
                config.tls.xfcc_from,
                vec!["127.0.0.6".parse::<std::net::IpAddr>().unwrap()]
            );
            jail.set_env("AUTH_TLS__XFCC_FROM", "[not-an-address]");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("xfcc_from"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn nested_keys_come_from_double_underscore_variables() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("AUTH_PASSWORD__MEMORY_KIB", "4096");
            jail.set_env("AUTH_REDIS_URL", "redis://127.0.0.1:1/");
            let config = Config::load(None).unwrap();
            assert_eq!(config.password.memory_kib, 4096);
            assert_eq!(config.redis_url.as_deref(), Some("redis://127.0.0.1:1/"));
            Ok(())
        });
    }

    #[test]
    fn the_kafka_password_is_read_from_the_environment_and_redacted() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("AUTH_KAFKA__SASL_PASSWORD", "hunter2-secret");
            let config = Config::load(None).unwrap();
            let password = config.kafka.sasl_password.as_ref().unwrap();
            assert_eq!(
                secrecy::ExposeSecret::expose_secret(password),
                "hunter2-secret"
            );
            assert!(!format!("{config:?}").contains("hunter2"));
            Ok(())
        });
    }

    #[test]
    fn a_database_url_of_an_unknown_kind_is_refused() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("AUTH_DATABASE_URL", "mysql://x");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("AUTH_DATABASE_URL"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_platform_is_configured_from_the_environment_with_its_secrets_redacted() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("AUTH_PLATFORMS__TWITCH__CLIENT_ID", "abc123");
            jail.set_env("AUTH_PLATFORMS__TWITCH__CLIENT_SECRET", "twitch-s3cret");
            jail.set_env("AUTH_PLATFORMS__TWITCH__WEBHOOK_SECRET", "hook-s3cret");
            jail.set_env(
                "AUTH_PLATFORMS__TWITCH__REDIRECT_URI",
                "https://app.example/cb",
            );
            let config = Config::load(None).unwrap();
            let twitch = &config.platforms.twitch;
            assert_eq!(twitch.client_id.as_deref(), Some("abc123"));
            assert_eq!(twitch.token_url, "https://id.twitch.tv/oauth2/token");
            assert!(config.platforms.youtube.client_id.is_none());
            let shown = format!("{config:?}{}", serde_json::to_string(&config).unwrap());
            assert!(!shown.contains("s3cret"), "secrets never shown");
            Ok(())
        });
    }

    #[test]
    fn a_platform_with_a_client_id_needs_its_secret_and_valid_urls() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("AUTH_PLATFORMS__SOOP__CLIENT_ID", "abc");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("platforms.soop.client_secret"), "{err}");
            jail.set_env("AUTH_PLATFORMS__SOOP__CLIENT_SECRET", "x");
            jail.set_env(
                "AUTH_PLATFORMS__SOOP__REDIRECT_URI",
                "https://app.example/cb",
            );
            jail.set_env("AUTH_PLATFORMS__SOOP__TOKEN_URL", "ftp://nope");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("platforms.soop.token_url"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn secrets_come_from_files_named_by_file_variables() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("db-url", "postgres://auth:p4ss@db:5432/auth\n")?;
            jail.create_file("twitch-secret", "twitch-s3cret")?;
            jail.set_env("AUTH_DATABASE_URL_FILE", "db-url");
            jail.set_env("AUTH_PLATFORMS__TWITCH__CLIENT_ID", "abc123");
            jail.set_env(
                "AUTH_PLATFORMS__TWITCH__CLIENT_SECRET_FILE",
                "twitch-secret",
            );
            jail.set_env(
                "AUTH_PLATFORMS__TWITCH__REDIRECT_URI",
                "https://app.example/cb",
            );
            let config = Config::load(None).unwrap();
            assert_eq!(
                config.database_url.as_deref(),
                Some("postgres://auth:p4ss@db:5432/auth"),
                "one trailing line break is dropped"
            );
            let secret = config.platforms.twitch.client_secret.as_ref().unwrap();
            assert_eq!(
                secrecy::ExposeSecret::expose_secret(secret),
                "twitch-s3cret"
            );

            jail.set_env("AUTH_REDIS_URL_FILE", "missing-file");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("AUTH_REDIS_URL_FILE"), "{err}");
            assert!(err.contains("missing-file"), "{err}");
            assert!(!err.contains("p4ss") && !err.contains("s3cret"), "{err}");
            Ok(())
        });
    }
}
