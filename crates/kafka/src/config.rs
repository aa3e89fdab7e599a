//! The `kafka` section: topics, the relay, the consumer and the worker.

use std::{net::SocketAddr, path::PathBuf};

use auth_domain::error::{ConfigError, require};
use serde::{Deserialize, Serialize};

use crate::envelope::EventFormat;

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

/// The largest `kafka.relay_batch`: a batch is marked published in one
/// statement with a bind per row, kept well inside SQLite's 32,766 and
/// PostgreSQL's 65,535 bind parameters.
pub const MAX_RELAY_BATCH: i64 = 10_000;

impl KafkaConfig {
    /// Each error names its own key, relative to this section. SASL is
    /// refused at start, not at the first publish.
    pub fn validate(&self) -> Result<(), ConfigError> {
        require(
            ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"]
                .contains(&self.security_protocol.as_str()),
            "security_protocol",
            "must be plaintext, ssl, sasl_plaintext or sasl_ssl",
        )?;
        if self.security_protocol.starts_with("sasl_") {
            require(
                matches!(
                    self.sasl_mechanism.as_deref(),
                    Some("PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512")
                ),
                "sasl_mechanism",
                "SASL needs PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
            )?;
            require(
                self.sasl_username.as_deref().is_some_and(|u| !u.is_empty()),
                "sasl_username",
                "SASL needs a user name",
            )?;
            require(
                self.sasl_password.is_some(),
                "sasl_password",
                "SASL needs a password",
            )?;
        }
        require(
            (1..=MAX_RELAY_BATCH).contains(&self.relay_batch),
            "relay_batch",
            "must be between 1 and 10000 (rows marked published in one statement)",
        )?;
        require(
            self.relay_lease_secs > 0,
            "relay_lease_secs",
            "must be positive",
        )?;
        require(
            self.topic_partitions > 0,
            "topic_partitions",
            "must be positive",
        )
    }
}
