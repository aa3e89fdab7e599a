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

use crate::{
    authz::policy::{RoutePolicy, RouteRule, default_rules},
    events::envelope::EventFormat,
    ratelimit::quota::Limit,
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

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Migrations {
    Apply,
    Wait,
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

/// TLS on the gRPC listeners (AuthService and ext_authz).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain; with `key`, the gRPC listeners serve TLS.
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// PEM bundle of the CAs that issue client certificates.
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
    /// How often the files are checked for changes (rotation by
    /// cert-manager or a mesh); new handshakes use new files.
    pub reload_interval_secs: u64,
    /// Behind a mesh sidecar that terminates mTLS (Istio): the addresses
    /// that sidecar connects from (Istio: `127.0.0.6`). A call from one of
    /// them is the caller named by the `x-forwarded-client-cert` the
    /// sidecar set (its SPIFFE URI, else its DNS name), with that
    /// identity's `services` roles; from any other address the header is
    /// ignored. Empty (the default): never read.
    #[serde(default)]
    pub xfcc_from: Vec<std::net::IpAddr>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// No client certificate is asked for.
    None,
    /// A certificate is verified when presented; callers without one are
    /// anonymous peers.
    Optional,
    /// Every caller presents a certificate from `client_ca` (mTLS).
    Required,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceIdentity {
    pub roles: Vec<String>,
}

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

/// Bounds on what a caller may send to the gRPC listeners. Larger input is
/// refused with a clear error before it is buffered or parsed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest AuthService request message, in bytes (its requests are a few
    /// hundred bytes; a password is at most 4 KiB). Larger: OutOfRange.
    pub max_api_message_bytes: usize,
    /// Largest ext_authz CheckRequest, in bytes (it carries the HTTP headers
    /// Envoy forwards; Envoy's own header limit is 60 KiB).
    pub max_check_message_bytes: usize,
    /// Largest HTTP/2 header block (gRPC metadata) a caller may send, in
    /// bytes. The default (64 KiB) is above the HTTP/2 server's own 16 KiB so
    /// that whatever the gateway admits (32 KiB of client headers, plus what
    /// Envoy adds) reaches the service; larger is refused before any handler.
    pub max_header_bytes: u32,
    /// Every AuthService call ends within this many milliseconds (Unavailable
    /// otherwise), whatever a backend does — a database that stops answering
    /// on an open connection included. 0: `database_timeout_ms` +
    /// `password.max_wait_ms` + 1000, so the more specific answers come first.
    pub request_timeout_ms: u64,
}

/// What the gRPC layer stack does around every call (`grpc::stack`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpcConfig {
    /// One structured line per call (target `access`): request id, method,
    /// code, latency, principal and client address, never a secret.
    pub access_log: AccessLog,
    /// Calls per session for the AuthService methods named (seed 6.2), e.g.
    /// `GetPlatformAccessToken = { requests = 60, per_secs = 60, burst = 20 }`:
    /// counted per session id of the bearer token, shared by every replica
    /// through the rate-limit store; past it the call is answered
    /// ResourceExhausted with `retry-after`.
    pub session_limits: BTreeMap<String, Limit>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AccessLog {
    /// Every call on every listener, ext_authz Checks included.
    All,
    /// AuthService calls (not health probes, reflection or Checks, which
    /// Envoy's own access log records with the decision).
    #[default]
    Api,
    Off,
}

/// The largest `kafka.relay_batch` (see its validation).
pub const MAX_RELAY_BATCH: i64 = 10_000;

/// Event publishing and consuming (used when `kafka_brokers` is set).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Prepended to every topic name, e.g. `prod.`.
    pub topic_prefix: String,
    /// Create missing topics at start.
    pub create_topics: bool,
    pub topic_partitions: i32,
    pub topic_replication: i32,
    pub format: EventFormat,
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub security_protocol: String,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` (with a SASL protocol).
    pub sasl_mechanism: Option<String>,
    pub sasl_username: Option<String>,
    /// Redacted in Debug output, never serialized back out.
    #[serde(default, skip_serializing)]
    pub sasl_password: Option<secrecy::SecretString>,
    pub ssl_ca_location: Option<PathBuf>,
    pub ssl_certificate_location: Option<PathBuf>,
    pub ssl_key_location: Option<PathBuf>,
    /// Rows leased per relay round.
    pub relay_batch: i64,
    /// Pause when the outbox is empty, in milliseconds.
    pub relay_idle_ms: u64,
    /// How long a leased row is reserved for one relay.
    pub relay_lease_secs: u64,
    /// Published rows are deleted after this long.
    pub retention_secs: u64,
    /// Consume user-lifecycle events (suspended/deleted).
    pub consumer_enabled: bool,
    pub consumer_group: String,
    /// How often the lifecycle consumer refreshes topic metadata
    /// (librdkafka `topic.metadata.refresh.interval.ms`). Short, so topics
    /// created after start are noticed within seconds.
    pub consumer_metadata_refresh_ms: u64,
    pub user_suspended_topic: String,
    pub user_deleted_topic: String,
    pub dlq_topic: String,
    /// Attempts for a message about an unknown user before it goes to the DLQ.
    pub max_unknown_user_attempts: u32,
    /// Where the event side (relay and consumer) runs; see [`EventsWorker`].
    pub worker: EventsWorker,
    /// The `events` process serves `/healthz` and `/metrics` here when set.
    pub worker_http_addr: Option<SocketAddr>,
}

/// Where the Kafka side runs. The Kafka client is a C library; a crash or a
/// hang inside it must not take the gRPC API and ext_authz with it, so by
/// default it runs in a process of its own.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EventsWorker {
    /// `serve` starts `auth-service events` as a child process, restarts it
    /// with backoff when it exits, and stops it when it stops.
    Supervised,
    /// `serve` runs no event side: the deployment runs `auth-service events`
    /// on its own (a Deployment of its own in Kubernetes).
    External,
    /// The relay and consumer run inside the serving process. No fault
    /// isolation: for tests and tools, not for production.
    InProcess,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            topic_prefix: String::new(),
            create_topics: true,
            topic_partitions: 3,
            topic_replication: 1,
            format: EventFormat::Json,
            security_protocol: "plaintext".into(),
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            ssl_ca_location: None,
            ssl_certificate_location: None,
            ssl_key_location: None,
            relay_batch: 256,
            relay_idle_ms: 100,
            relay_lease_secs: 30,
            retention_secs: 7 * 24 * 3600,
            consumer_enabled: true,
            consumer_group: "auth-service".into(),
            consumer_metadata_refresh_ms: 2000,
            user_suspended_topic: "user.events.user_suspended".into(),
            user_deleted_topic: "user.events.user_deleted".into(),
            dlq_topic: "auth.events.dlq".into(),
            max_unknown_user_attempts: 5,
            worker: EventsWorker::Supervised,
            worker_http_addr: None,
        }
    }
}

/// Envoy ext_authz: route policy, rate limits and failure modes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzConfig {
    /// Also serve `envoy.service.auth.v3.Authorization` on this listener
    /// (it is always served on `grpc_addr`).
    pub check_addr: Option<SocketAddr>,
    /// Rules in order, first match wins (see `authz::policy`).
    pub routes: Vec<RouteRule>,
    /// Rate-limit classes named by the rules.
    pub rate_limits: BTreeMap<String, RateClass>,
    /// When the revocation store is unreachable: `false` (default) denies
    /// with 503 unless this replica's cache still knows the answer.
    pub revocation_fail_open: bool,
    /// When the rate-limit store is unreachable: `true` (default) limits per
    /// replica instead; `false` denies with 503.
    pub rate_limit_fail_open: bool,
    /// Keys tracked by the local rate limiter.
    pub rate_limit_capacity: u64,
}

/// Limits of one class; a missing limit is not enforced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateClass {
    pub per_user: Option<Limit>,
    pub per_ip: Option<Limit>,
}

impl Default for AuthzConfig {
    fn default() -> Self {
        let limit = |requests, burst| {
            Some(Limit {
                requests,
                per_secs: 1,
                burst,
            })
        };
        Self {
            check_addr: None,
            routes: default_rules(),
            rate_limits: BTreeMap::from([
                (
                    "default".to_owned(),
                    RateClass {
                        per_user: limit(50, 100),
                        per_ip: limit(100, 200),
                    },
                ),
                (
                    "public".to_owned(),
                    RateClass {
                        per_user: None,
                        per_ip: limit(20, 40),
                    },
                ),
            ]),
            revocation_fail_open: false,
            rate_limit_fail_open: true,
            rate_limit_capacity: 1_000_000,
        }
    }
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

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// argon2id parameters and the password policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordConfig {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    /// Hashes run on at most this many blocking threads at once; 0 means one
    /// per CPU core.
    pub max_concurrent_hashes: usize,
    /// Minimum length in characters.
    pub min_length: usize,
    /// Maximum length in characters; anything longer is refused before hashing.
    pub max_length: usize,
    /// Hashing jobs waiting at most; 0 means 16 per hashing thread. Beyond
    /// it a login or sign-up is refused at once (Unavailable, retry-after).
    pub max_queued: usize,
    /// Hashing jobs one client address may have waiting.
    pub max_queued_per_source: usize,
    /// The longest a job waits to start hashing before it is refused, in
    /// milliseconds (the caller's own gRPC deadline, when sooner, wins).
    pub max_wait_ms: u64,
    /// The hashing threads' nice value (0 to 19; Linux: per thread). Above
    /// 0, argon2 yields the CPU to the rest of the process (ext_authz Checks,
    /// refusals of an overloaded queue, the runtime's I/O) whenever both
    /// want it, and still takes every cycle nothing else needs.
    pub worker_nice: i32,
    /// One more hashing thread, at the process's own priority (not
    /// `worker_nice`), that takes logins presenting a valid device token: a
    /// known device does not wait for a worker busy with a flood.
    pub device_lane: bool,
    /// The lane also takes jobs from quiet client addresses (less than one
    /// hash recently) while they are a minority of the demand: under a flood
    /// from a few addresses, someone new is not hashed behind the flood.
    pub quiet_sources_in_lane: bool,
}

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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockoutConfig {
    /// Failures allowed per (account, client IP) within the window.
    pub max_failures_per_account_ip: u32,
    /// Failures allowed per client IP, over all accounts, within the window.
    pub max_failures_per_ip: u32,
    /// Failures allowed per account, over all IPs, within the window. Higher
    /// than the per-pair limit so one IP can never lock an account out from
    /// elsewhere; it caps distributed guessing.
    pub max_failures_per_account: u32,
    pub window_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationConfig {
    /// How long a replica may answer "not revoked" from its own cache before
    /// asking the shared store again. Revocations made on this replica are
    /// visible at once; this bounds how stale another replica's view can be.
    pub cache_ttl_ms: u64,
    /// Entries in the revocation cache.
    pub cache_capacity: u64,
    /// How long WatchRevocations can resume from: older log rows are
    /// deleted (hourly), and a cursor before them is refused.
    pub log_retention_secs: u64,
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
            password: PasswordConfig {
                memory_kib: 19 * 1024,
                iterations: 2,
                parallelism: 1,
                max_concurrent_hashes: 0,
                min_length: 8,
                max_length: 128,
                max_queued: 0,
                max_queued_per_source: 8,
                max_wait_ms: 500,
                worker_nice: 10,
                device_lane: true,
                quiet_sources_in_lane: true,
            },
            tokens: TokenConfig {
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
            },
            lockout: LockoutConfig {
                max_failures_per_account_ip: 5,
                max_failures_per_ip: 20,
                max_failures_per_account: 100,
                window_secs: 60,
            },
            revocation: RevocationConfig {
                cache_ttl_ms: 1000,
                cache_capacity: 1_000_000,
                log_retention_secs: 7 * 24 * 3600,
            },
            authz: AuthzConfig::default(),
            kafka_brokers: None,
            kafka: KafkaConfig::default(),
            limits: LimitsConfig {
                max_api_message_bytes: 64 * 1024,
                max_check_message_bytes: 256 * 1024,
                max_header_bytes: 64 * 1024,
                request_timeout_ms: 0,
            },
            rpc: RpcConfig::default(),
            platforms: PlatformsConfig::default(),
            tls: TlsConfig {
                cert: None,
                key: None,
                client_ca: None,
                client_auth: ClientAuth::None,
                reload_interval_secs: 10,
                xfcc_from: Vec::new(),
            },
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
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        if let Some(url) = &self.database_url
            && !(url.starts_with("postgres://")
                || url.starts_with("postgresql://")
                || url.starts_with("sqlite:"))
        {
            return fail(
                "database_url (AUTH_DATABASE_URL)",
                "must start with postgres:// or sqlite:",
            );
        }
        if let Some(url) = &self.redis_url {
            let urls: Vec<&str> = match self.redis_mode {
                RedisMode::Standalone => vec![url.as_str()],
                RedisMode::Cluster | RedisMode::Sentinel => url.split(',').map(str::trim).collect(),
            };
            if urls
                .iter()
                .any(|u| !(u.starts_with("redis://") || u.starts_with("rediss://")))
            {
                return fail(
                    "redis_url (AUTH_REDIS_URL)",
                    "must start with redis:// or rediss:// (in cluster and sentinel modes: each comma-separated node)",
                );
            }
        }
        let p = &self.password;
        if p.memory_kib < 8 * p.parallelism.max(1) || p.iterations == 0 || p.parallelism == 0 {
            return fail(
                "password",
                "argon2 needs iterations >= 1, parallelism >= 1 and memory_kib >= 8 * parallelism",
            );
        }
        if p.min_length == 0 || p.max_length < p.min_length || p.max_length > 1024 {
            return fail(
                "password.max_length",
                "needs 0 < min_length <= max_length <= 1024",
            );
        }
        if p.max_queued_per_source == 0 {
            return fail("password.max_queued_per_source", "must be positive");
        }
        if p.max_wait_ms == 0 {
            return fail("password.max_wait_ms", "must be positive");
        }
        let t = &self.tokens;
        if t.access_ttl_secs == 0 || t.refresh_idle_ttl_secs == 0 || t.device_ttl_secs == 0 {
            return fail("tokens.access_ttl_secs", "token lifetimes must be positive");
        }
        if t.refresh_absolute_ttl_secs < t.refresh_idle_ttl_secs {
            return fail(
                "tokens.refresh_absolute_ttl_secs",
                "must be at least refresh_idle_ttl_secs",
            );
        }
        if t.issuer.is_empty() || t.audience.is_empty() {
            return fail("tokens.issuer", "issuer and audience must not be empty");
        }
        for platform in crate::platforms::Platform::ALL {
            let p = self.platforms.provider(platform);
            let key = |field: &str| format!("platforms.{platform}.{field}");
            if p.client_id.as_deref().is_some_and(str::is_empty) {
                return Err(ConfigError(format!(
                    "{}: must not be empty",
                    key("client_id")
                )));
            }
            if p.client_id.is_some() {
                if p.client_secret.is_none() {
                    return Err(ConfigError(format!(
                        "{}: required when client_id is set",
                        key("client_secret")
                    )));
                }
                let urls = [
                    ("redirect_uri", p.redirect_uri.as_deref()),
                    ("auth_url", Some(p.auth_url.as_str())),
                    ("token_url", Some(p.token_url.as_str())),
                    ("api_url", Some(p.api_url.as_str())),
                    (
                        "revoke_url",
                        p.revoke_url.as_deref().or(Some("http://unset")),
                    ),
                    (
                        "validate_url",
                        p.validate_url.as_deref().or(Some("http://unset")),
                    ),
                ];
                for (field, value) in urls {
                    let ok = value
                        .and_then(|v| url::Url::parse(v).ok())
                        .is_some_and(|u| matches!(u.scheme(), "http" | "https"));
                    if !ok {
                        return Err(ConfigError(format!("{}: needs an http(s) URL", key(field))));
                    }
                }
            }
        }
        if !(0.0..=1.0).contains(&self.otel.sampling_ratio) || self.otel.max_queue_size == 0 {
            return fail(
                "otel.sampling_ratio",
                "sampling_ratio is between 0 and 1, max_queue_size positive",
            );
        }
        let rt = &self.redis_tls;
        if rt.cert.is_some() != rt.key.is_some() {
            return fail(
                "redis_tls.cert",
                "redis_tls.cert and redis_tls.key go together",
            );
        }
        if (rt.ca.is_some() || rt.cert.is_some())
            && !self
                .redis_url
                .as_deref()
                .is_some_and(|u| u.starts_with("rediss://"))
        {
            return fail("redis_tls", "needs a rediss:// redis_url");
        }
        let tls = &self.tls;
        if tls.cert.is_some() != tls.key.is_some() {
            return fail("tls.cert", "tls.cert and tls.key go together");
        }
        if tls.client_auth != ClientAuth::None && (tls.client_ca.is_none() || tls.cert.is_none()) {
            return fail(
                "tls.client_auth",
                "client certificates need tls.client_ca, tls.cert and tls.key",
            );
        }
        if tls.reload_interval_secs == 0 {
            return fail("tls.reload_interval_secs", "must be positive");
        }
        let pl = &self.platforms;
        if pl.http_timeout_ms == 0 || pl.retry_attempts == 0 || pl.refresh_lease_ms == 0 {
            return fail(
                "platforms.http_timeout_ms",
                "http_timeout_ms, retry_attempts and refresh_lease_ms must be positive",
            );
        }
        if pl.state_ttl_secs == 0 || pl.keepalive_batch <= 0 {
            return fail(
                "platforms.state_ttl_secs",
                "state_ttl_secs and keepalive_batch must be positive",
            );
        }
        let l = &self.lockout;
        if l.window_secs == 0
            || l.max_failures_per_account_ip == 0
            || l.max_failures_per_ip == 0
            || l.max_failures_per_account == 0
        {
            return fail("lockout", "limits and window must be positive");
        }
        if self.redis_timeout_ms == 0 {
            return fail(
                "redis_timeout_ms (AUTH_REDIS_TIMEOUT_MS)",
                "must be positive",
            );
        }
        for (name, class) in &self.authz.rate_limits {
            for (which, limit) in [("per_user", &class.per_user), ("per_ip", &class.per_ip)] {
                if let Some(limit) = limit {
                    limit
                        .validate(&format!("authz.rate_limits.{name}.{which}"))
                        .map_err(ConfigError)?;
                }
            }
        }
        for (method, limit) in &self.rpc.session_limits {
            limit
                .validate(&format!("rpc.session_limits.{method}"))
                .map_err(ConfigError)?;
        }
        let classes: Vec<&str> = self.authz.rate_limits.keys().map(String::as_str).collect();
        RoutePolicy::compile(&self.authz.routes, &classes)
            .map_err(|e| ConfigError(e.to_string()))?;
        if !["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"]
            .contains(&self.kafka.security_protocol.as_str())
        {
            return fail(
                "kafka.security_protocol",
                "must be plaintext, ssl, sasl_plaintext or sasl_ssl",
            );
        }
        if self.kafka.security_protocol.starts_with("sasl_") {
            // Refused at start, not at the first publish.
            match self.kafka.sasl_mechanism.as_deref() {
                Some("PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512") => {}
                _ => {
                    return fail(
                        "kafka.sasl_mechanism (AUTH_KAFKA__SASL_MECHANISM)",
                        "SASL needs PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
                    );
                }
            }
            if self
                .kafka
                .sasl_username
                .as_deref()
                .is_none_or(str::is_empty)
            {
                return fail(
                    "kafka.sasl_username (AUTH_KAFKA__SASL_USERNAME)",
                    "SASL needs a user name",
                );
            }
            if self.kafka.sasl_password.is_none() {
                return fail(
                    "kafka.sasl_password (AUTH_KAFKA__SASL_PASSWORD)",
                    "SASL needs a password",
                );
            }
        }
        // Each error names its own key. A batch is marked published in one
        // statement with a bind per row: kept well inside SQLite's 32,766
        // and PostgreSQL's 65,535 bind parameters.
        if !(1..=MAX_RELAY_BATCH).contains(&self.kafka.relay_batch) {
            return fail(
                "kafka.relay_batch",
                "must be between 1 and 10000 (rows marked published in one statement)",
            );
        }
        if self.kafka.relay_lease_secs == 0 {
            return fail("kafka.relay_lease_secs", "must be positive");
        }
        if self.kafka.topic_partitions <= 0 {
            return fail("kafka.topic_partitions", "must be positive");
        }
        // The lifecycle consumer in its own process needs no Redis: what it
        // revokes goes into the database's revocation log, which every
        // serving process applies to its own revocation state
        // (revocation::feed::apply_log).
        if self.database_timeout_ms == 0 {
            return fail(
                "database_timeout_ms (AUTH_DATABASE_TIMEOUT_MS)",
                "must be positive",
            );
        }
        let m = &self.limits;
        if m.max_api_message_bytes < 8 * 1024
            || m.max_check_message_bytes < 8 * 1024
            || m.max_header_bytes < 8 * 1024
        {
            return fail("limits", "message and header limits must be at least 8 KiB");
        }
        if self.database_max_connections == 0 {
            return fail("database_max_connections", "must be positive");
        }
        Ok(())
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
