//! Consumes user-lifecycle events from the user-profile service
//! (`user.events.user_suspended`, `user.events.user_deleted`; JSON with a
//! `user_id`): the user gets that status and every session ends.
//!
//! Offsets are committed only after a message is handled (or parked in the
//! dead-letter topic), so a crash replays at most the message in hand;
//! handling is idempotent. Backend failures (database or Redis down) are
//! retried with backoff without moving on; a message that cannot be handled
//! (unparseable, or about a user still unknown after
//! `max_unknown_user_attempts`) goes to the dead-letter topic with headers
//! naming its origin and the error, and the consumer moves on.

use std::{sync::Arc, time::Duration};

use rdkafka::{
    Message,
    consumer::{CommitMode, Consumer, StreamConsumer},
    message::{BorrowedMessage, Header, Headers, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::{
    accounts::{AccountError, model::UserStatus, service::UserLifecycle},
    config::KafkaConfig,
};
use crate::{events::RequestContext, relay::backoff};

#[derive(Deserialize)]
struct LifecycleMessage {
    user_id: Uuid,
}

/// The user a lifecycle message is about (`{"user_id": "<uuid>"}`, other
/// fields ignored). Untrusted bytes from another service.
pub fn parse_lifecycle(payload: &[u8]) -> Result<Uuid, String> {
    serde_json::from_slice::<LifecycleMessage>(payload)
        .map(|m| m.user_id)
        .map_err(|e| e.to_string())
}

pub struct LifecycleConsumer {
    consumer: Closing,
    dlq: FutureProducer,
    accounts: Arc<dyn UserLifecycle>,
    config: KafkaConfig,
}

/// Why a message was parked.
enum Park {
    Unparseable(String),
    UnknownUser,
}

impl LifecycleConsumer {
    pub fn new(
        brokers: &str,
        config: &KafkaConfig,
        accounts: Arc<dyn UserLifecycle>,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let consumer: StreamConsumer = crate::kafka::client_config(brokers, config)
            .set("group.id", &config.consumer_group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set(
                "topic.metadata.refresh.interval.ms",
                config.consumer_metadata_refresh_ms.to_string(),
            )
            .create()?;
        Ok(Self {
            consumer: Closing(Some(consumer)),
            dlq: crate::kafka::producer(brokers, config)?,
            accounts,
            config: config.clone(),
        })
    }

    /// Subscribes (the topics exist by now: see `startup`) and consumes
    /// until `stop`, then leaves the group (waiting a few seconds for that).
    pub async fn run(mut self, stop: CancellationToken) {
        self.consume(&stop).await;
        let left = self.consumer.close();
        if tokio::time::timeout(CLOSE_WAIT, left).await.is_err() {
            tracing::warn!(
                "lifecycle consumer: leaving the group timed out; the broker will expire the membership"
            );
        }
    }

    async fn consume(&self, stop: &CancellationToken) {
        let topics = [
            self.config.user_suspended_topic.as_str(),
            self.config.user_deleted_topic.as_str(),
        ];
        if let Err(error) = self.consumer.subscribe(&topics) {
            tracing::error!(%error, "lifecycle consumer: subscribe failed; not consuming");
            return;
        }
        let mut failures = 0u32;
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => return,
                m = self.consumer.recv() => m,
            };
            let message = match message {
                Ok(m) => m,
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, "lifecycle consumer: receive failed");
                    tokio::time::sleep(backoff(failures)).await;
                    continue;
                }
            };
            failures = 0;
            if !self.handle(&message, stop).await {
                return;
            }
            // Async: the commit is queued here and sent by librdkafka's own
            // thread, so no runtime worker waits on the broker. If it is lost
            // (crash), the message is handled again, which is idempotent.
            if let Err(error) = self.consumer.commit_message(&message, CommitMode::Async) {
                tracing::warn!(%error, "lifecycle consumer: offset commit failed; the message may be handled again");
            }
        }
    }

    /// Handles or parks one message; `false` only when stopped mid-retry.
    async fn handle(&self, message: &BorrowedMessage<'_>, stop: &CancellationToken) -> bool {
        let deleted = message.topic() == self.config.user_deleted_topic;
        let parsed = message
            .payload()
            .ok_or_else(|| "empty payload".to_owned())
            .and_then(parse_lifecycle);
        let user_id = match parsed {
            Ok(user_id) => user_id,
            Err(reason) => return self.park(message, Park::Unparseable(reason), stop).await,
        };
        let status = if deleted {
            UserStatus::Deleted
        } else {
            UserStatus::Suspended
        };
        let received = message.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == "traceparent")
                .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
        });
        let span = crate::trace::kafka_span(
            crate::trace::KafkaSide::Process,
            message.topic(),
            received.as_deref(),
        );
        span.record(
            "messaging.consumer.group.name",
            self.config.consumer_group.as_str(),
        );
        let ctx = RequestContext {
            client_ip: None,
            deadline: None,
            // The events this writes continue the processing span (or the
            // producer's trace as received, when untraced here).
            traceparent: crate::trace::traceparent_of(&span).or(received),
        };
        let mut unknown = 0u32;
        let mut failures = 0u32;
        loop {
            match self
                .accounts
                .apply_lifecycle(user_id, status, message.topic(), &ctx)
                .instrument(span.clone())
                .await
            {
                Ok(changed) => {
                    metrics::counter!("lifecycle_events_total", "result" => if changed { "applied" } else { "already" }).increment(1);
                    return true;
                }
                Err(AccountError::NotFound) => {
                    unknown += 1;
                    if unknown >= self.config.max_unknown_user_attempts {
                        return self.park(message, Park::UnknownUser, stop).await;
                    }
                }
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, %user_id, "lifecycle event: transient failure; retrying");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return false,
                () = tokio::time::sleep(backoff(unknown + failures)) => {}
            }
        }
    }

    /// Sends the message to the dead-letter topic; keeps trying until it is
    /// there (moving on without it would lose the message).
    async fn park(
        &self,
        message: &BorrowedMessage<'_>,
        why: Park,
        stop: &CancellationToken,
    ) -> bool {
        let error = match why {
            Park::Unparseable(reason) => format!("unparseable: {reason}"),
            Park::UnknownUser => "unknown user".to_owned(),
        };
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let headers = [
            ("dlq-original-topic", message.topic()),
            ("dlq-original-partition", partition.as_str()),
            ("dlq-original-offset", offset.as_str()),
            ("dlq-error", error.as_str()),
        ]
        .into_iter()
        .fold(OwnedHeaders::new(), |headers, (key, value)| {
            headers.insert(Header {
                key,
                value: Some(value),
            })
        });
        let payload = message.payload().unwrap_or_default();
        let key = message.key().unwrap_or_default();
        let mut attempts = 0;
        loop {
            let record = FutureRecord::to(&self.config.dlq_topic)
                .payload(payload)
                .key(key)
                .headers(headers.clone());
            match self.dlq.send(record, Duration::from_secs(5)).await {
                Ok(_) => {
                    tracing::warn!(topic = message.topic(), offset = message.offset(), %error, "lifecycle event parked in the dead-letter topic");
                    metrics::counter!("lifecycle_events_total", "result" => "dead_lettered")
                        .increment(1);
                    return true;
                }
                Err((e, _)) => {
                    attempts += 1;
                    tracing::warn!(error = %e, "dead-letter publish failed; retrying");
                    tokio::select! {
                        // Not committed: the message is read again after a restart.
                        () = stop.cancelled() => return false,
                        () = tokio::time::sleep(backoff(attempts)) => {}
                    }
                }
            }
        }
    }
}

/// How long a stopping consumer waits to leave its group.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// A consumer that is closed on a thread of its own. Closing leaves the
/// group: librdkafka blocks the dropping thread until the broker answers the
/// final rebalance, and when the broker is gone that wait can last forever
/// (librdkafka#4041, rust-rdkafka#509). Dropping it on a runtime worker could
/// stall the runtime and its shutdown; here the close runs on a detached
/// thread, whether the consumer stops normally or its task is cancelled.
struct Closing(Option<StreamConsumer>);

impl Closing {
    /// Starts closing; the receiver resolves once the consumer left.
    fn close(&mut self) -> tokio::sync::oneshot::Receiver<()> {
        let (done, left) = tokio::sync::oneshot::channel();
        if let Some(consumer) = self.0.take() {
            let spawned = std::thread::Builder::new()
                .name("kafka-consumer-close".into())
                .spawn(move || {
                    drop(consumer);
                    let _ = done.send(());
                });
            if let Err(error) = spawned {
                tracing::warn!(%error, "could not start the consumer-close thread");
            }
        }
        left
    }
}

impl std::ops::Deref for Closing {
    type Target = StreamConsumer;

    fn deref(&self) -> &StreamConsumer {
        self.0.as_ref().expect("a consumer that is not closed yet")
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        drop(self.close());
    }
}
