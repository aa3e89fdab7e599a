//! The live revocation feed behind WatchRevocations (seed 2.2): every
//! revocation-type event (token/session revoked, user suspended or deleted,
//! roles or password changed), as it happens on any replica, with a resume
//! cursor.
//!
//! Durable: the events are numbered in commit order in the database's
//! revocation log (see `auth_storage::sql`, `insert_event`), so a client that
//! reconnects with the cursor of the last event it saw gets everything after
//! it, from any replica. Live: one poller per process wakes on every commit
//! (this process's, and with PostgreSQL every process's through LISTEN, the
//! outbox's NOTIFY), at the latest every second, reads the rows after the
//! last it saw, and broadcasts them to the open streams.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use time::OffsetDateTime;
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    error::BackendError,
    revocation::{Revocations, TokenFacts},
};

/// One row of the revocation log.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedRevocation {
    /// Position in commit order; the client's resume cursor.
    pub seq: i64,
    pub event_id: Uuid,
    /// The event's type (`token_revoked`, `user_suspended`, …).
    pub event_type: String,
    pub user_id: Option<Uuid>,
    pub occurred_at: OffsetDateTime,
    /// What the row revokes.
    pub revoked: Revoked,
    /// Why, as the event recorded it (`logout`, `admin`, …), when it did.
    pub reason: Option<String>,
}

/// What one row of the log revokes, read once where the row is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    /// One session of the user (`token_revoked`).
    Session { user_id: Uuid, session_id: Uuid },
    /// Every token of the user issued before the row (every other kind:
    /// suspension, deletion, a password or role change, revoke-all, a
    /// service account's rotation or deletion).
    User { user_id: Uuid },
    /// A row that names no user: nothing to apply (the log never holds
    /// one; it is logged and counted).
    Nothing,
}

/// The part of a revocation event's payload the log reads.
#[derive(Debug, Default, serde::Deserialize)]
struct RevocationPayload {
    session_id: Option<Uuid>,
    reason: Option<String>,
}

impl LoggedRevocation {
    /// A row as stored: its event's type and JSON payload. Every row is
    /// read, so the feed never stalls on one; a row the log should never
    /// hold is logged and counted (`revocation_log_corrupt_rows_total`)
    /// and read towards revoking more, not less: a `token_revoked` whose
    /// session cannot be read revokes the user's earlier tokens as a
    /// whole, a payload of another shape is read as empty; only a row
    /// without a user revokes nothing.
    pub fn from_stored(
        seq: i64,
        event_id: Uuid,
        event_type: String,
        user_id: Option<Uuid>,
        occurred_at: OffsetDateTime,
        payload: serde_json::Value,
    ) -> Self {
        let corrupt = |why: &str| {
            metrics::counter!("revocation_log_corrupt_rows_total").increment(1);
            tracing::error!(seq, event_type = %event_type, why, "revocation log: malformed row");
        };
        let payload: RevocationPayload = serde_json::from_value(payload).unwrap_or_else(|e| {
            corrupt(&format!("payload: {e}"));
            RevocationPayload::default()
        });
        let revoked = match (user_id, payload.session_id) {
            (None, _) => {
                corrupt("no user");
                Revoked::Nothing
            }
            (Some(user_id), Some(session_id)) if event_type == "token_revoked" => {
                Revoked::Session {
                    user_id,
                    session_id,
                }
            }
            (Some(user_id), None) if event_type == "token_revoked" => {
                corrupt(
                    "token_revoked without a session_id: the user's earlier tokens are revoked",
                );
                Revoked::User { user_id }
            }
            (Some(user_id), _) => Revoked::User { user_id },
        };
        Self {
            seq,
            event_id,
            event_type,
            user_id,
            occurred_at,
            revoked,
            reason: payload.reason,
        }
    }

    /// When the row was written, in unix milliseconds: a user-wide row
    /// revokes the tokens issued before it.
    pub fn at_ms(&self) -> i64 {
        i64::try_from(self.occurred_at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
    }
}

#[async_trait]
pub trait RevocationLog: Send + Sync + 'static {
    /// Rows after `seq`, in order, at most `limit`.
    async fn after(&self, seq: i64, limit: i64) -> Result<Vec<LoggedRevocation>, BackendError>;
    /// The number of the last row written.
    async fn head(&self) -> Result<i64, BackendError>;
    /// The number of the oldest row kept (`None`: the log is empty).
    async fn oldest(&self) -> Result<Option<i64>, BackendError>;
    /// The number of the first row that occurred at or after `at` (`None`:
    /// none did).
    async fn first_since(&self, at: OffsetDateTime) -> Result<Option<i64>, BackendError>;
    /// Signalled after commits that may have written rows.
    fn written(&self) -> Arc<Notify>;
    /// Deletes rows older than `before`; how many.
    async fn purge_before(&self, before: OffsetDateTime) -> Result<u64, BackendError>;
}

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The cursor names rows that are no longer kept, or never were.
    #[error("cursor {0} is not in the revocation log")]
    BadCursor(i64),
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The token the stream was opened with expired or was revoked: the
    /// stream ends with it.
    #[error("the credential that opened the stream {0}")]
    CredentialEnded(&'static str),
}

const PAGE: i64 = 500;

/// The two passes of a replay over the log ([`RevocationFeed::replay_recent`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Learn,
    Owe,
}
/// How often a stream's token is checked against the revocation state
/// (besides every event about its user, and its expiry).
const CREDENTIAL_CHECK: Duration = Duration::from_secs(5);
/// Longest pause between two looks when no commit wakes the poller.
const POLL: Duration = Duration::from_secs(1);
/// How often rows past the retention are deleted (by every replica; the
/// statement is idempotent).
const PURGE_EVERY: Duration = Duration::from_secs(3600);
/// Longest one purge may take (a delete of a long backlog).
const PURGE_CALL: Duration = Duration::from_secs(300);
/// Longest the poller waits for one call to the log: a call that hangs
/// (a connection that never answers) is dropped and retried at the next
/// look, so the feed — which every replica's revocation state follows —
/// cannot stall behind it.
const LOG_CALL: Duration = Duration::from_secs(2);

/// `call`, or a timeout error once [`LOG_CALL`] has passed.
async fn bounded<T>(
    what: &'static str,
    call: impl std::future::Future<Output = Result<T, BackendError>>,
) -> Result<T, BackendError> {
    tokio::time::timeout(LOG_CALL, call)
        .await
        .unwrap_or_else(|_| {
            metrics::counter!("revocation_feed_call_timeouts_total", "call" => what).increment(1);
            Err(BackendError::Unavailable {
                backend: "database",
                source: format!("revocation log: {what} took longer than {LOG_CALL:?}").into(),
            })
        })
}

pub struct RevocationFeed {
    log: Arc<dyn RevocationLog>,
    retention: Duration,
    live: broadcast::Sender<Arc<LoggedRevocation>>,
    /// Set once the poller knows where it starts: a stream opened later
    /// starts at or after that point, so every row it needs is either
    /// replayed by it or broadcast by the poller.
    started: tokio::sync::watch::Sender<bool>,
    /// Set once [`Self::replay_recent`] has applied the recent rows: until
    /// then the process is not ready ([`crate::health::Ping`]).
    replayed: tokio::sync::watch::Sender<bool>,
}

/// Ready once the recent revocations have been replayed at start: a process
/// that serves before then could accept a token revoked while it was not
/// running.
#[async_trait]
impl crate::health::Ping for RevocationFeed {
    async fn ping(&self) -> Result<(), BackendError> {
        if *self.replayed.borrow() {
            Ok(())
        } else {
            Err(BackendError::Unavailable {
                backend: "revocation log",
                source: "the recent revocations are not yet applied".into(),
            })
        }
    }
}

impl RevocationFeed {
    /// `retention`: how long rows are kept for resuming streams.
    pub fn new(log: Arc<dyn RevocationLog>, retention: Duration) -> Arc<Self> {
        let (live, _) = broadcast::channel(1024);
        let (started, _) = tokio::sync::watch::channel(false);
        let (replayed, _) = tokio::sync::watch::channel(false);
        Arc::new(Self {
            log,
            retention,
            live,
            started,
            replayed,
        })
    }

    /// The poller; runs until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let wake = self.log.written();
        let mut last = loop {
            match bounded("head", self.log.head()).await {
                Ok(head) => {
                    self.started.send_replace(true);
                    break head;
                }
                Err(error) => {
                    tracing::debug!(%error, "revocation feed: head unavailable");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(POLL) => {}
                    }
                }
            }
        };
        // The purge runs on its own: a long delete never holds up the feed.
        tokio::spawn(self.clone().purge(stop.clone()));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = wake.notified() => {}
                () = tokio::time::sleep(POLL) => {}
            }
            loop {
                match bounded("after", self.log.after(last, PAGE)).await {
                    Ok(rows) => {
                        let full = rows.len() as i64 == PAGE;
                        for row in rows {
                            last = row.seq;
                            // No open stream is not an error.
                            let _ = self.live.send(Arc::new(row));
                        }
                        if !full {
                            break;
                        }
                    }
                    Err(error) => {
                        tracing::debug!(%error, "revocation feed: read failed; retrying");
                        break;
                    }
                }
            }
        }
    }

    /// Resolves once [`Self::replay_recent`] has applied the recent rows.
    pub async fn replayed(&self) {
        let mut replayed = self.replayed.subscribe();
        let _ = replayed.wait_for(|done| *done).await;
    }

    /// Deletes the rows past the retention, every [`PURGE_EVERY`] (by every
    /// replica: the statement is idempotent), each delete bounded by
    /// [`PURGE_CALL`]; a failure is logged and tried again at the next round.
    async fn purge(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let before = OffsetDateTime::now_utc() - self.retention;
            match tokio::time::timeout(PURGE_CALL, self.log.purge_before(before)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::info!(rows = n, "revocation log: old rows deleted"),
                Ok(Err(error)) => tracing::warn!(%error, "revocation log: purge failed"),
                Err(_) => tracing::warn!("revocation log: purge took longer than {PURGE_CALL:?}"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(PURGE_EVERY) => {}
            }
        }
    }

    /// Applies to `revocations` every row of the last `window` — at start,
    /// so that a process learns what was revoked while it was not running
    /// (a fast-state write its writer still owed when it stopped, or a
    /// Redis that came back without its state), and again whenever the
    /// store may lack rows (it reconnected, or owed writes were dropped at
    /// their bound: [`super::Revocations::replay_written`]). Waits until the poller
    /// knows where it starts, then reads to the log's end, so every row is
    /// seen here or by [`apply_log`]. Retries while the log cannot be read.
    pub async fn replay_recent(
        &self,
        window: Duration,
        revocations: &super::Revocations,
        stop: CancellationToken,
    ) {
        let mut started = self.started.subscribe();
        tokio::select! {
            () = stop.cancelled() => return,
            _ = started.wait_for(|s| *s) => {}
        }
        // Owed writes dropped before now are made good by this replay.
        let drops = revocations.replay_begins();
        let since = OffsetDateTime::now_utc() - window;
        // Two passes over the same rows: the first denies each here at
        // once (and then this process reports ready); the second owes each
        // its store write, paced by the writer, which a store refusing
        // writes may hold up for long.
        // Where the window starts and where the log ends now: rows past
        // that end are the poller's ([`apply_log`] owes them as they come),
        // so neither pass chases the head under steady traffic.
        let (start, head) = loop {
            match bounded("replay", self.cursor_since(since)).await {
                Ok(range) => break range,
                Err(error) => {
                    tracing::debug!(%error, "revocation log: replay read failed; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(POLL) => {}
                    }
                }
            }
        };
        let mut applied = 0u64;
        for pass in [Pass::Learn, Pass::Owe] {
            let mut cursor = start;
            while cursor < head {
                match bounded("replay", self.log.after(cursor, PAGE)).await {
                    Ok(rows) => {
                        let Some(last) = rows.last().map(|row| row.seq) else {
                            break;
                        };
                        for row in rows.iter().take_while(|row| row.seq <= head) {
                            match pass {
                                Pass::Learn => {
                                    revocations.learn_logged_only_here(row.revoked, row.at_ms());
                                    applied += 1;
                                }
                                Pass::Owe => {
                                    let owed =
                                        revocations.owe_logged_paced(row.revoked, row.at_ms());
                                    tokio::select! {
                                        () = stop.cancelled() => return,
                                        () = owed => {}
                                    }
                                }
                            }
                        }
                        cursor = last;
                    }
                    Err(error) => {
                        tracing::debug!(%error, "revocation log: replay read failed; retrying");
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(POLL) => {}
                        }
                    }
                }
            }
            if pass == Pass::Learn {
                self.replayed.send_replace(true);
                tracing::info!(rows = applied, "revocation log: recent revocations applied");
            }
        }
        // Written to the store once it takes them (a store that still
        // fails holds this task here; lookups that need it fail closed
        // anyway while writes were dropped).
        tokio::select! {
            () = stop.cancelled() => {}
            () = revocations.replay_written(drops) => {}
        }
    }

    /// Where to replay from to see every row that occurred at or after
    /// `since` (a cursor for [`Self::watch`]), and the log's head now: the
    /// replay has caught up once it has passed the head.
    pub async fn cursor_since(&self, since: OffsetDateTime) -> Result<(i64, i64), BackendError> {
        let head = self.log.head().await?;
        let cursor = match self.log.first_since(since).await? {
            Some(first) => (first - 1).min(head),
            None => head,
        };
        Ok((cursor, head))
    }

    /// The rows the poller reads from now on (for this process's own
    /// revocation state, [`apply_log`]).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LoggedRevocation>> {
        self.live.subscribe()
    }

    /// The events after `cursor` (`None`: from now on), then live ones, in
    /// order and without gaps, until the receiver is dropped.
    pub async fn watch(
        self: &Arc<Self>,
        cursor: Option<i64>,
    ) -> Result<mpsc::Receiver<Result<Arc<LoggedRevocation>, FeedError>>, FeedError> {
        let mut started = self.started.subscribe();
        tokio::time::timeout(Duration::from_secs(5), started.wait_for(|s| *s))
            .await
            .map_err(|e| BackendError::unavailable("database", e))?
            .map_err(|e| BackendError::unavailable("database", e))?;
        // Subscribed before reading, so nothing falls between replay and
        // live; what arrives twice is skipped by its number.
        let mut live = self.live.subscribe();
        let head = self.log.head().await?;
        let mut last = match cursor {
            None => head,
            Some(c) => {
                let oldest = self.log.oldest().await?;
                let kept_from = oldest.unwrap_or(head + 1);
                if c < 0 || c > head || c < kept_from - 1 {
                    return Err(FeedError::BadCursor(c));
                }
                c
            }
        };
        let (tx, rx) = mpsc::channel(256);
        let log = self.log.clone();
        tokio::spawn(async move {
            // Replays from the database until caught up with `upto`.
            async fn replay(
                log: &Arc<dyn RevocationLog>,
                last: &mut i64,
                upto: i64,
                tx: &mpsc::Sender<Result<Arc<LoggedRevocation>, FeedError>>,
            ) -> bool {
                while *last < upto {
                    match log.after(*last, PAGE).await {
                        Ok(rows) if rows.is_empty() => return true,
                        Ok(rows) => {
                            for row in rows {
                                *last = row.seq;
                                if tx.send(Ok(Arc::new(row))).await.is_err() {
                                    return false;
                                }
                            }
                        }
                        Err(error) => {
                            let _ = tx.send(Err(error.into())).await;
                            return false;
                        }
                    }
                }
                true
            }
            if !replay(&log, &mut last, head, &tx).await {
                return;
            }
            loop {
                let next = tokio::select! {
                    () = tx.closed() => return,
                    next = live.recv() => next,
                };
                match next {
                    Ok(row) if row.seq <= last => {}
                    Ok(row) if row.seq == last + 1 => {
                        last = row.seq;
                        if tx.send(Ok(row)).await.is_err() {
                            return;
                        }
                    }
                    // A gap (rows broadcast before this stream caught up),
                    // or this stream fell behind the broadcast: read them.
                    Ok(row) => {
                        let upto = row.seq;
                        if !replay(&log, &mut last, upto, &tx).await {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let upto = match log.head().await {
                            Ok(h) => h,
                            Err(error) => {
                                let _ = tx.send(Err(error.into())).await;
                                return;
                            }
                        };
                        if !replay(&log, &mut last, upto, &tx).await {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(rx)
    }
}

/// Applies every revocation in the database's log to this process's
/// revocation state, whichever process wrote it (another replica, an admin
/// command such as `auth-service set-roles`, the event worker): user-wide
/// events raise the user's epoch to the event's time, a session's
/// revocation revokes the session. So a revocation reaches every replica
/// through the database even when the fast-state backend is in process
/// (the embedded default) — within the poller's wake-up (at once on
/// PostgreSQL through LISTEN, within a second on SQLite across processes).
/// Idempotent: the writer's own process has applied the same already.
pub async fn apply_log(
    mut rows: broadcast::Receiver<Arc<LoggedRevocation>>,
    revocations: super::Revocations,
    stop: CancellationToken,
) {
    loop {
        let row = tokio::select! {
            () = stop.cancelled() => return,
            row = rows.recv() => row,
        };
        let row = match row {
            Ok(row) => row,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                // Missed here, but in the log: a replay of its window (the
                // one a store's reconnection runs) learns and owes them
                // again, in case their writer could not write them.
                metrics::counter!("revocation_log_apply_lagged_total").increment(missed);
                tracing::warn!(
                    missed,
                    "revocation log: rows missed by this replica; replaying the log"
                );
                revocations.forget_negative_answers();
                revocations.log_rows_missed();
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        // The row is committed: this process denies what it revokes at
        // once; the fast-state write goes on in the background.
        revocations.learn_logged(row.revoked, row.at_ms());
        metrics::counter!("revocation_log_rows_applied_total").increment(1);
    }
}

/// Whether `row` ends the token `token` names: an event of the log about
/// its user made after the token was issued (each kind the log holds
/// revokes every token of the user issued before it, except
/// `token_revoked`, which revokes one session).
fn ends(row: &LoggedRevocation, token: &TokenFacts) -> bool {
    row.at_ms() >= token.issued_at_ms
        && match row.revoked {
            Revoked::Session {
                user_id,
                session_id,
            } => user_id == token.keys.user_id && session_id == token.keys.session_id,
            Revoked::User { user_id } => user_id == token.keys.user_id,
            Revoked::Nothing => false,
        }
}

/// `rows` for as long as the token that opened the stream is valid. The
/// stream ends with [`FeedError::CredentialEnded`] at the token's expiry,
/// at the first event that revokes it, or when the periodic check finds it
/// revoked (a revocation the log does not show, or one made before the
/// stream's first row); with the backend's error when that check cannot
/// be made (fail closed: the client reconnects with its cursor).
pub fn while_valid(
    mut rows: mpsc::Receiver<Result<Arc<LoggedRevocation>, FeedError>>,
    token: TokenFacts,
    revocations: Revocations,
) -> mpsc::Receiver<Result<Arc<LoggedRevocation>, FeedError>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let left = u64::try_from(token.expires_at - crate::unix_now()).unwrap_or(0);
        let expiry = tokio::time::sleep(Duration::from_secs(left));
        tokio::pin!(expiry);
        let mut check = tokio::time::interval(CREDENTIAL_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = loop {
            tokio::select! {
                () = tx.closed() => return,
                () = &mut expiry => break Err(FeedError::CredentialEnded("expired")),
                _ = check.tick() => match revocations.is_revoked(&token).await {
                    Ok(false) => {}
                    Ok(true) => break Err(FeedError::CredentialEnded("was revoked")),
                    Err(error) => break Err(FeedError::Backend(error)),
                },
                row = rows.recv() => match row {
                    Some(Ok(row)) if ends(&row, &token) => {
                        break Err(FeedError::CredentialEnded("was revoked"));
                    }
                    Some(row) => {
                        let failed = row.is_err();
                        if tx.send(row).await.is_err() || failed {
                            return;
                        }
                    }
                    None => return,
                },
            }
        };
        tracing::info!(user_id = %token.keys.user_id, "revocation stream ended with its credential");
        let _ = tx.send(end).await;
    });
    rx
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn stored(
        event_type: &str,
        user: Option<Uuid>,
        payload: serde_json::Value,
    ) -> LoggedRevocation {
        LoggedRevocation::from_stored(
            7,
            Uuid::now_v7(),
            event_type.to_owned(),
            user,
            OffsetDateTime::now_utc(),
            payload,
        )
    }

    /// A row is read once, by its meaning: a session, or the user as a
    /// whole. Malformed input never stalls the feed and is read towards
    /// revoking more: a `token_revoked` whose session cannot be read
    /// revokes the user's earlier tokens; a payload of another shape is
    /// read as empty; only a row without a user revokes nothing.
    #[test]
    fn log_rows_are_read_by_meaning_and_malformed_ones_towards_revoking_more() {
        let (user, session) = (Uuid::now_v7(), Uuid::now_v7());
        let row = stored(
            "token_revoked",
            Some(user),
            json!({ "session_id": session, "reason": "logout" }),
        );
        assert_eq!(
            row.revoked,
            Revoked::Session {
                user_id: user,
                session_id: session
            }
        );
        assert_eq!(row.reason.as_deref(), Some("logout"));
        let row = stored("password_changed", Some(user), json!({}));
        assert_eq!(
            (row.revoked, row.reason),
            (Revoked::User { user_id: user }, None)
        );
        for (kind, payload) in [
            ("token_revoked", json!({ "reason": "logout" })),
            ("token_revoked", json!({ "session_id": "not-a-uuid" })),
            ("token_revoked", json!(["not", "an", "object"])),
            ("user_suspended", json!({ "reason": 42 })),
        ] {
            let row = stored(kind, Some(user), payload.clone());
            assert_eq!(
                row.revoked,
                Revoked::User { user_id: user },
                "{kind} {payload}"
            );
        }
        let row = stored("user_suspended", None, json!({ "reason": "x" }));
        assert_eq!(row.revoked, Revoked::Nothing);
    }
}
