//! Kafka clients from the configuration: one place for the security
//! settings every client shares, and topic creation.

use std::time::Duration;

use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    error::RDKafkaErrorCode,
    producer::FutureProducer,
};

use crate::config::KafkaConfig;

/// The event types published, i.e. the topic suffixes.
pub const EVENT_TOPICS: [&str; 15] = [
    "user_created",
    "login_succeeded",
    "login_failed",
    "token_revoked",
    "user_suspended",
    "sessions_revoked",
    "roles_changed",
    "password_changed",
    "user_deleted",
    "platform_connected",
    "platform_disconnected",
    "platform_reauth_required",
    "service_account_created",
    "service_account_secret_rotated",
    "service_account_deleted",
];

pub fn topic_for(config: &KafkaConfig, event_type: &str) -> String {
    format!("{}auth.events.{event_type}", config.topic_prefix)
}

/// Every topic this service writes or reads: the event topics, the
/// dead-letter topic and the two lifecycle topics it consumes.
pub fn all_topics(config: &KafkaConfig) -> Vec<String> {
    let mut topics: Vec<String> = EVENT_TOPICS.iter().map(|t| topic_for(config, t)).collect();
    topics.extend([
        config.dlq_topic.clone(),
        config.user_suspended_topic.clone(),
        config.user_deleted_topic.clone(),
    ]);
    topics
}

/// The broker does not know the topic: it never had it, or it came back
/// without its data (a rebuilt cluster, a failover to an empty one).
pub fn is_unknown_topic(error: &rdkafka::error::KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic)
    )
}

/// Bootstrap servers plus TLS/SASL; shared by producers and consumers.
pub fn client_config(brokers: &str, config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("security.protocol", &config.security_protocol);
    if let Some(mechanism) = &config.sasl_mechanism {
        c.set("sasl.mechanism", mechanism);
    }
    if let Some(user) = &config.sasl_username {
        c.set("sasl.username", user);
    }
    if let Some(password) = &config.sasl_password {
        c.set(
            "sasl.password",
            secrecy::ExposeSecret::expose_secret(password),
        );
    }
    for (key, path) in [
        ("ssl.ca.location", &config.ssl_ca_location),
        ("ssl.certificate.location", &config.ssl_certificate_location),
        ("ssl.key.location", &config.ssl_key_location),
    ] {
        if let Some(path) = path {
            c.set(key, path.display().to_string());
        }
    }
    c
}

/// Idempotent, acks=all: a retried send is never written twice by the
/// broker, and a delivery report means every in-sync replica has it.
pub fn producer(
    brokers: &str,
    config: &KafkaConfig,
) -> Result<FutureProducer, rdkafka::error::KafkaError> {
    client_config(brokers, config)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .set("linger.ms", "5")
        .create()
}

/// Creates whichever of `topics` are missing; returns how many it created.
pub async fn ensure_topics(
    brokers: &str,
    config: &KafkaConfig,
    topics: &[String],
) -> Result<usize, String> {
    let admin: AdminClient<DefaultClientContext> = client_config(brokers, config)
        .create()
        .map_err(|e| e.to_string())?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            NewTopic::new(
                t,
                config.topic_partitions,
                TopicReplication::Fixed(config.topic_replication),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(new.iter(), &options)
        .await
        .map_err(|e| e.to_string())?;
    let mut created = 0;
    for result in results {
        match result {
            Ok(_) => created += 1,
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(format!("creating topic {topic}: {code}")),
        }
    }
    Ok(created)
}
