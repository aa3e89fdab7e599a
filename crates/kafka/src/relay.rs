//! The outbox relay: publishes committed outbox rows to Kafka.
//!
//! Each round leases a batch (so replicas relaying at once take disjoint
//! rows), sends every row with the idempotent producer, and marks a row
//! published only after its delivery report. A row whose send failed is
//! retried after an exponential backoff with jitter; a relay that dies
//! mid-batch leaves leases that expire, and those rows are sent again
//! (at-least-once: consumers dedupe by event id). While Kafka is down the API
//! keeps working; rows wait in the outbox.

use std::{sync::Arc, time::Duration};

use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord, Producer},
};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{
    config::KafkaConfig,
    envelope::{self, EventFormat},
    events::{RelayStore, StoredEvent},
    kafka::{self, topic_for},
    trace as telemetry,
};

pub struct Relay {
    store: Arc<dyn RelayStore>,
    producer: FutureProducer,
    brokers: String,
    config: KafkaConfig,
    /// When the outbox was last counted (`outbox_depth`), in milliseconds
    /// since `started`.
    counted_at_ms: std::sync::atomic::AtomicU64,
    started: std::time::Instant,
}

/// An idle relay counts the outbox (`outbox_depth`) at most this often; a
/// round that leased rows counts it every time.
const IDLE_COUNT_EVERY: Duration = Duration::from_secs(10);

/// Consecutive rounds that delivered nothing before the producer is
/// replaced.
const RENEW_AFTER_FAILED_ROUNDS: u32 = 2;

/// Why a round published nothing.
#[derive(Debug)]
pub enum RoundError {
    /// The outbox could not be read or updated.
    Store(String),
    /// No row of the batch was delivered. `unknown_topic`: the broker does
    /// not know (some of) the topics.
    Undelivered {
        count: usize,
        first_error: String,
        unknown_topic: bool,
        /// The broker lacked topics and they were created again.
        topics_recreated: bool,
    },
    /// Every row of the batch that was not delivered has no wire form
    /// (and none was delivered): the broker is not at fault.
    Unencodable { count: usize, first_error: String },
}

impl std::fmt::Display for RoundError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Store(e) => write!(f, "outbox store: {e}"),
            Self::Undelivered {
                count, first_error, ..
            } => write!(f, "{count} events not delivered: {first_error}"),
            Self::Unencodable { count, first_error } => {
                write!(f, "{count} events kept in the outbox: {first_error}")
            }
        }
    }
}

pub use auth_domain::backoff;

fn to_time(d: Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

impl Relay {
    pub fn new(
        store: Arc<dyn RelayStore>,
        producer: FutureProducer,
        brokers: String,
        config: KafkaConfig,
    ) -> Self {
        Self {
            store,
            producer,
            brokers,
            config,
            counted_at_ms: std::sync::atomic::AtomicU64::new(0),
            started: std::time::Instant::now(),
        }
    }

    /// Relays until `stop`, then flushes what is in flight. Between rounds
    /// it waits `relay_idle_ms` (the poll that finds rows other replicas
    /// wrote, or leases that expired), or less: a commit in this process
    /// wakes it at once. After a failure it waits out the backoff.
    pub async fn run(mut self, stop: CancellationToken) {
        let idle = Duration::from_millis(self.config.relay_idle_ms);
        let written = self.store.outbox_written();
        let mut failures = 0u32;
        let mut last_purge = std::time::Instant::now();
        while !stop.is_cancelled() {
            let pause = match self.round().await {
                Ok(0) => idle,
                Ok(_) => {
                    failures = 0;
                    Duration::ZERO
                }
                Err(error) => {
                    failures += 1;
                    metrics::counter!("outbox_relay_failures_total").increment(1);
                    // One line per backoff, however many rows failed.
                    tracing::warn!(%error, failures, "outbox relay round failed; backing off");
                    if let RoundError::Undelivered {
                        unknown_topic: true,
                        ..
                    } = error
                        && !self.config.create_topics
                    {
                        metrics::counter!("outbox_topics_missing_total").increment(1);
                        tracing::error!(
                            "the broker does not know the event topics and kafka.create_topics is off: create them, events wait in the outbox"
                        );
                    }
                    if let Some(reason) = self.producer_fatal_error() {
                        self.renew_producer(&reason);
                    } else if let RoundError::Undelivered {
                        topics_recreated: true,
                        ..
                    } = error
                    {
                        // A producer that saw its topics vanish goes on
                        // timing out every send after they are back.
                        self.renew_producer("the broker had lost its topics");
                    } else if failures.is_multiple_of(RENEW_AFTER_FAILED_ROUNDS)
                        && matches!(error, RoundError::Undelivered { .. })
                    {
                        // The same wedge when another relay re-created the
                        // topics first (this one then creates none).
                        self.renew_producer("no delivery in several rounds");
                    }
                    backoff(failures)
                }
            };
            if last_purge.elapsed() > Duration::from_secs(60) {
                last_purge = std::time::Instant::now();
                self.purge().await;
            }
            if !pause.is_zero() {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(pause) => {}
                    () = written.notified(), if failures == 0 => {}
                }
            }
        }
        // flush blocks its thread until the broker acknowledged (at most 5 s).
        let producer = self.producer.clone();
        let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await;
    }

    async fn purge(&self) {
        let before =
            OffsetDateTime::now_utc() - to_time(Duration::from_secs(self.config.retention_secs));
        match self.store.purge_published(before).await {
            Ok(n) if n > 0 => tracing::info!(purged = n, "purged published outbox rows"),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "outbox purge failed"),
        }
    }

    /// An idempotent producer that hit a fatal error (the broker lost its
    /// producer state) refuses every later send.
    fn producer_fatal_error(&self) -> Option<String> {
        self.producer
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("fatal error {code:?}: {reason}"))
    }

    /// Replaces the producer with a new one (new connections, metadata and
    /// producer id). Rows it had not delivered stay leased and are sent
    /// again by the new one.
    fn renew_producer(&mut self, why: &str) {
        tracing::warn!(why, "creating a new Kafka producer");
        match kafka::producer(&self.brokers, &self.config) {
            Ok(producer) => {
                metrics::counter!("outbox_producer_renewals_total").increment(1);
                let old = std::mem::replace(&mut self.producer, producer);
                // Dropping purges and destroys the client, which may wait
                // on its threads: not on a runtime worker.
                tokio::task::spawn_blocking(move || drop(old));
            }
            Err(error) => tracing::error!(%error, "cannot create a new Kafka producer"),
        }
    }

    /// Creates whichever topics the broker lacks (it may have lost them);
    /// `true` when it created any.
    async fn recreate_topics(&self) -> bool {
        let topics = kafka::all_topics(&self.config);
        match kafka::ensure_topics(&self.brokers, &self.config, &topics).await {
            Ok(0) => false,
            Ok(created) => {
                metrics::counter!("outbox_topics_recreated_total").increment(1);
                tracing::warn!(
                    created,
                    "the broker had lost event topics: created them again"
                );
                true
            }
            Err(error) => {
                tracing::debug!(%error, "checking the event topics failed");
                false
            }
        }
    }

    /// Sets `outbox_depth`: after a round's batch is marked published, or
    /// when idle at most every [`IDLE_COUNT_EVERY`] (counting is a scan of the pending
    /// rows; an idle relay polls every `relay_idle_ms`).
    async fn count_depth(&self, busy: bool) {
        use std::sync::atomic::Ordering;
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.counted_at_ms.load(Ordering::Relaxed);
        if !busy && last != 0 && now.saturating_sub(last) < IDLE_COUNT_EVERY.as_millis() as u64 {
            return;
        }
        self.counted_at_ms.store(now.max(1), Ordering::Relaxed);
        if let Ok(depth) = self.store.unpublished_count().await {
            metrics::gauge!("outbox_depth").set(depth as f64);
        }
    }

    /// One batch; returns how many rows it leased.
    pub async fn round(&self) -> Result<usize, RoundError> {
        let store = |e: crate::error::BackendError| RoundError::Store(e.to_string());
        let now = OffsetDateTime::now_utc();
        let lease_until = now + to_time(Duration::from_secs(self.config.relay_lease_secs));
        let batch = self
            .store
            .lease(self.config.relay_batch, now, lease_until)
            .await
            .map_err(store)?;
        if batch.is_empty() {
            self.count_depth(false).await;
            return Ok(0);
        }
        // An event without a wire form is not sent (an empty payload marked
        // published would lose it): it stays in the outbox, retried after a
        // backoff like a failed send, and is counted and logged.
        let (mut sendable, mut encoded, mut unencodable) = (Vec::new(), Vec::new(), Vec::new());
        for event in &batch {
            match self.encode(event) {
                Ok(out) => {
                    sendable.push(event);
                    encoded.push(out);
                }
                Err(error) => {
                    metrics::counter!("outbox_encode_failures_total").increment(1);
                    tracing::error!(event_id = %event.id, event_type = event.event_type, attempts = event.attempts, %error, "event cannot be encoded; kept in the outbox");
                    unencodable.push((event, error));
                }
            }
        }
        for (event, _) in &unencodable {
            let retry_at = OffsetDateTime::now_utc()
                + to_time(backoff(u32::try_from(event.attempts).unwrap_or(0)));
            self.store
                .retry_later(&[event.id], retry_at)
                .await
                .map_err(store)?;
        }
        // Enqueued in id order: one user's events keep their order on the
        // partition their key maps to (the idempotent producer keeps it
        // through retries).
        let sends = encoded.iter().map(|out| {
            let record = FutureRecord::to(&out.topic)
                .key(&out.key)
                .payload(&out.payload)
                .headers(out.headers.clone());
            self.producer
                .send(record, Duration::from_secs(5))
                .instrument(out.span.clone())
        });
        let results = futures::future::join_all(sends).await;
        // The send spans end with their delivery reports.
        drop(encoded);
        let (mut published, mut failed) = (Vec::new(), Vec::new());
        let (mut first_error, mut unknown_topic) = (
            unencodable
                .first()
                .map(|(_, e)| format!("not encodable: {e}")),
            false,
        );
        for (event, result) in sendable.into_iter().zip(results) {
            match result {
                Ok(_) => {
                    published.push(event.id);
                    let lag = (OffsetDateTime::now_utc() - event.occurred_at).as_seconds_f64();
                    metrics::histogram!("outbox_publish_lag_seconds").record(lag);
                }
                Err((error, _)) => {
                    tracing::debug!(event_id = %event.id, %error, "event not delivered; will retry");
                    unknown_topic |= kafka::is_unknown_topic(&error);
                    first_error.get_or_insert_with(|| error.to_string());
                    failed.push(event);
                }
            }
        }
        self.store
            .mark_published(&published, OffsetDateTime::now_utc())
            .await
            .map_err(store)?;
        metrics::counter!("outbox_published_total").increment(published.len() as u64);
        self.count_depth(true).await;
        // A broker that lost its topics answers "unknown topic", or lets the
        // messages time out (librdkafka waits for the topic to appear): with
        // creation on, any undelivered row makes sure the topics exist
        // (idempotent). When that created one, the rows go again at once.
        let recreated =
            !failed.is_empty() && self.config.create_topics && self.recreate_topics().await;
        for event in &failed {
            let retry_at = if recreated {
                OffsetDateTime::now_utc()
            } else {
                OffsetDateTime::now_utc()
                    + to_time(backoff(u32::try_from(event.attempts).unwrap_or(0)))
            };
            self.store
                .retry_later(&[event.id], retry_at)
                .await
                .map_err(store)?;
        }
        if published.is_empty() && failed.is_empty() {
            return Err(RoundError::Unencodable {
                count: unencodable.len(),
                first_error: first_error.unwrap_or_default(),
            });
        }
        if published.is_empty() {
            return Err(RoundError::Undelivered {
                count: failed.len() + unencodable.len(),
                first_error: first_error.unwrap_or_default(),
                unknown_topic,
                topics_recreated: recreated,
            });
        }
        Ok(batch.len())
    }

    fn encode(&self, event: &StoredEvent) -> Result<Outgoing, envelope::EncodeError> {
        let format: EventFormat = self.config.format;
        let payload = envelope::encode(event, format)?;
        let topic = topic_for(&self.config, &event.event_type);
        let span = telemetry::kafka_span(
            telemetry::KafkaSide::Send,
            &topic,
            event.traceparent.as_deref(),
        );
        span.record("messaging.message.id", tracing::field::display(event.id));
        let event_id = event.id.to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: "content-type",
                value: Some(format.content_type()),
            })
            .insert(Header {
                key: "event-type",
                value: Some(event.event_type.as_str()),
            })
            .insert(Header {
                key: "event-id",
                value: Some(event_id.as_str()),
            });
        // The send span's context when the send is traced, so a consumer
        // continues from the send; else the stored one as it came.
        let traceparent = telemetry::traceparent_of(&span).or_else(|| event.traceparent.clone());
        if let Some(traceparent) = &traceparent {
            headers = headers.insert(Header {
                key: "traceparent",
                value: Some(traceparent.as_str()),
            });
        }
        // One user's events share a key, hence a partition, hence an order.
        let key = event
            .user_id
            .map_or_else(|| event_id.clone(), |u| u.to_string());
        Ok(Outgoing {
            payload,
            topic,
            key,
            headers,
            span,
        })
    }
}

/// One event ready to send.
struct Outgoing {
    topic: String,
    key: String,
    payload: Vec<u8>,
    headers: OwnedHeaders,
    /// Open until the delivery report (`Span::none()` when untraced).
    span: tracing::Span,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_with_bounded_jitter() {
        for attempts in 0..20 {
            let d = backoff(attempts);
            let base = Duration::from_millis(100)
                .saturating_mul(1 << attempts.min(9))
                .min(Duration::from_secs(30));
            assert!(d >= base && d <= base.mul_f64(1.5), "{attempts}: {d:?}");
        }
        assert!(backoff(3) > backoff(0));
    }
}
