//! The stores on SQL: PostgreSQL in production, SQLite for the embedded
//! default. The tables, columns and statements are the same on both (see
//! `migrations/`), so each store's body is written once, in `sql/*.rs`,
//! and compiled once per driver: [`postgres`] and [`sqlite`] each declare
//! those files as modules of their own, with `DB` naming the driver and the
//! few statements that differ (row locks, `SKIP LOCKED`, `GREATEST`)
//! beside it. Each copy is type-checked against its own driver's encodings
//! (uuid/bytea/jsonb/timestamptz on PostgreSQL, blob/text on SQLite).
//!
//! Not a generic over `sqlx::Database`: that needs every function to
//! restate, as where-clauses, how the driver encodes and decodes each Rust
//! type it binds or reads (about twenty bounds, on each of sixteen impls
//! and helpers, because such bounds are not implied); the two concrete
//! copies need none.

use std::{marker::PhantomData, sync::Arc};

use sqlx::{FromRow, Pool, types::Json};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{
    accounts::model::{Credentials, User},
    error::BackendError,
};

/// A store over one sqlx pool.
pub struct SqlStore<DB: sqlx::Database> {
    pub(crate) pool: Pool<DB>,
    /// Signalled after every commit that wrote an outbox row, so this
    /// process's relay publishes at once instead of at its next poll.
    outbox_written: Arc<tokio::sync::Notify>,
    /// Signalled likewise for the revocation feed (any process's commit on
    /// PostgreSQL, through LISTEN; this process's on SQLite).
    pub(crate) log_written: Arc<tokio::sync::Notify>,
    /// Set once the cross-process wake-up (PostgreSQL LISTEN) is running.
    listening: std::sync::Once,
    _db: PhantomData<DB>,
}

impl<DB: sqlx::Database> SqlStore<DB> {
    pub fn new(pool: Pool<DB>) -> Self {
        Self {
            pool,
            outbox_written: Arc::new(tokio::sync::Notify::new()),
            log_written: Arc::new(tokio::sync::Notify::new()),
            listening: std::sync::Once::new(),
            _db: PhantomData,
        }
    }

    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    /// Commits a transaction that wrote outbox rows, then wakes the relay.
    pub(crate) async fn commit_events(
        &self,
        tx: sqlx::Transaction<'_, DB>,
    ) -> Result<(), BackendError> {
        tx.commit().await.map_err(db_error)?;
        self.outbox_written.notify_one();
        self.log_written.notify_one();
        Ok(())
    }
}

#[derive(FromRow)]
pub(crate) struct UserRow {
    id: Uuid,
    email: String,
    username: String,
    password_hash: String,
    roles: Json<Vec<String>>,
    status: String,
    created_at: OffsetDateTime,
    security_version: i64,
}

impl UserRow {
    pub(crate) fn into_credentials(self) -> Result<Credentials, BackendError> {
        let user = User::from_stored(
            self.id,
            self.email,
            self.username,
            self.roles.0,
            &self.status,
            self.created_at,
        )
        .map_err(|e| BackendError::failed("database", e))?;
        Ok(Credentials {
            user,
            password_hash: self.password_hash,
            security_version: self.security_version,
        })
    }
}

/// Connection failures and timeouts are worth a retry (Unavailable); what
/// the database answered about the request itself is not (Internal). A
/// conversation broken off mid-message (`Protocol`: a connection cut while a
/// reply was on its way) is a connection failure too: the pool drops that
/// connection. So are PostgreSQL's answers that say the server, not the
/// request, is the matter ([`server_unavailable`]).
pub(crate) fn db_error(error: sqlx::Error) -> BackendError {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => BackendError::unavailable("database", error),
        sqlx::Error::Database(ref db) if db.code().is_some_and(|c| server_unavailable(&c)) => {
            BackendError::unavailable("database", error)
        }
        other => BackendError::failed("database", other),
    }
}

/// SQLSTATEs that say the server cannot serve now: connection exceptions
/// (class 08), the server shutting down or terminating the session, as in a
/// failover or a restart (57P01–57P05), and insufficient resources (class
/// 53: too many connections, out of memory or disk).
fn server_unavailable(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("57P") || code.starts_with("53")
}

/// Which unique field a violation is about, from the constraint name
/// (PostgreSQL: `users_email_key`) or the message (SQLite:
/// `UNIQUE constraint failed: users.email`).
pub(crate) fn conflicting_field(error: &sqlx::Error) -> Option<&'static str> {
    let db = error.as_database_error()?;
    if !db.is_unique_violation() {
        return None;
    }
    let text = db
        .constraint()
        .map(str::to_owned)
        .unwrap_or_else(|| db.message().to_owned());
    if text.contains("email") {
        Some("email")
    } else if text.contains("username") {
        Some("username")
    } else {
        Some("id")
    }
}

/// The columns [`UserRow`] reads, in its order.
macro_rules! user_columns {
    () => {
        "id, email, username, password_hash, roles, status, created_at, security_version"
    };
}

/// Takes the rows in one statement; `SKIP LOCKED` lets concurrent relays
/// pass over rows another relay is leasing right now instead of waiting.
const LEASE_POSTGRES: &str = "UPDATE outbox SET lease_until = $3, attempts = attempts + 1 \
     WHERE id IN (SELECT id FROM outbox WHERE published_at IS NULL AND (lease_until IS NULL OR lease_until < $2) \
                  ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) \
     RETURNING id, event_type, user_id, occurred_at, payload, traceparent, attempts";

/// SQLite has one writer at a time: the statement is atomic as it is.
const LEASE_SQLITE: &str = "UPDATE outbox SET lease_until = $3, attempts = attempts + 1 \
     WHERE id IN (SELECT id FROM outbox WHERE published_at IS NULL AND (lease_until IS NULL OR lease_until < $2) \
                  ORDER BY id LIMIT $1) \
     RETURNING id, event_type, user_id, occurred_at, payload, traceparent, attempts";

/// Wakes this process's relay whenever any process commits outbox rows
/// (the trigger in `migrations/postgres/0002_outbox_notify.sql`). The task
/// ends with the store.
fn listen_postgres(store: &SqlStore<sqlx::Postgres>) {
    let pool = store.pool.clone();
    let wake = Arc::downgrade(&store.outbox_written);
    let log = Arc::downgrade(&store.log_written);
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            let listener = async {
                let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
                listener.listen("auth_outbox").await?;
                Ok::<_, sqlx::Error>(listener)
            };
            match listener.await {
                Ok(mut listener) => {
                    failures = 0;
                    // Rows committed before LISTEN took effect sent their
                    // notification to nobody: look once now.
                    match wake.upgrade() {
                        Some(wake) => wake.notify_one(),
                        None => return,
                    }
                    if let Some(log) = log.upgrade() {
                        log.notify_one();
                    }
                    loop {
                        // Ok(None): the connection dropped and will be made
                        // again; a notification may have been missed, so
                        // wake the relay anyway.
                        let received = listener.try_recv().await;
                        let Some(wake) = wake.upgrade() else { return };
                        wake.notify_one();
                        if let Some(log) = log.upgrade() {
                            log.notify_one();
                        }
                        if received.is_err() {
                            break;
                        }
                    }
                }
                Err(error) => {
                    failures += 1;
                    tracing::debug!(%error, "outbox LISTEN failed; the relay polls meanwhile");
                }
            }
            if wake.strong_count() == 0 {
                return;
            }
            tokio::time::sleep(crate::events_backoff(failures)).await;
        }
    });
}

/// The columns `stored_account` reads, in its order.
macro_rules! account_columns {
    () => {
        "user_id, platform, platform_user_id, login, display_name, scopes, status, key_id, \
         access_token, refresh_token, token_expires_at, token_version, refresh_lease_until, connected_at"
    };
}

/// Claims rows for validation; `SKIP LOCKED` passes over rows a concurrent
/// replica is claiming, and the outer condition is re-checked after a wait.
const CLAIM_POSTGRES: &str = concat!(
    "UPDATE platform_accounts SET validated_at = $3 \
     WHERE (user_id, platform) IN (SELECT user_id, platform FROM platform_accounts \
        WHERE platform = $1 AND status = 'active' AND (validated_at IS NULL OR validated_at < $2) \
        ORDER BY validated_at NULLS FIRST LIMIT $4 FOR UPDATE SKIP LOCKED) \
     AND (validated_at IS NULL OR validated_at < $2) RETURNING ",
    account_columns!()
);

/// SQLite has one writer at a time: the statement is atomic as it is.
const CLAIM_SQLITE: &str = concat!(
    "UPDATE platform_accounts SET validated_at = $3 \
     WHERE (user_id, platform) IN (SELECT user_id, platform FROM platform_accounts \
        WHERE platform = $1 AND status = 'active' AND (validated_at IS NULL OR validated_at < $2) \
        ORDER BY validated_at NULLS FIRST LIMIT $4) \
     RETURNING ",
    account_columns!()
);

/// The columns of a claimed grant revocation, in `claim_grant_revocations`'
/// order.
macro_rules! revocation_columns {
    () => {
        "user_id, platform, queued_at, platform_user_id, scopes, key_id, access_token, refresh_token, \
         token_expires_at, attempts, reason"
    };
}

/// Claims due grant revocations (moves their next attempt to `$2`);
/// `SKIP LOCKED` passes over rows another replica is claiming.
const CLAIM_REVOCATIONS_POSTGRES: &str = concat!(
    "UPDATE platform_grant_revocations SET next_attempt_at = $2 \
     WHERE (user_id, platform, queued_at) IN (SELECT user_id, platform, queued_at FROM platform_grant_revocations \
        WHERE next_attempt_at <= $1 ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED) \
     AND next_attempt_at <= $1 RETURNING ",
    revocation_columns!()
);

/// SQLite has one writer at a time: the statement is atomic as it is.
const CLAIM_REVOCATIONS_SQLITE: &str = concat!(
    "UPDATE platform_grant_revocations SET next_attempt_at = $2 \
     WHERE (user_id, platform, queued_at) IN (SELECT user_id, platform, queued_at FROM platform_grant_revocations \
        WHERE next_attempt_at <= $1 ORDER BY next_attempt_at LIMIT $3) \
     RETURNING ",
    revocation_columns!()
);

/// A cooldown only ever grows: a shorter wait met by another replica does
/// not shorten a longer one already stored.
const COOLDOWN_UPSERT_POSTGRES: &str = "INSERT INTO platform_cooldowns (platform, until) VALUES ($1, $2) \
     ON CONFLICT (platform) DO UPDATE SET until = GREATEST(platform_cooldowns.until, excluded.until)";
/// SQLite's `max()` of two timestamps in one text format orders them.
const COOLDOWN_UPSERT_SQLITE: &str = "INSERT INTO platform_cooldowns (platform, until) VALUES ($1, $2) \
     ON CONFLICT (platform) DO UPDATE SET until = max(platform_cooldowns.until, excluded.until)";

pub(crate) mod postgres;
pub(crate) mod sqlite;

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    /// A database's answer with SQLSTATE `code`.
    #[derive(Debug)]
    struct Answer(&'static str);

    impl std::fmt::Display for Answer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }

    impl std::error::Error for Answer {}

    impl sqlx::error::DatabaseError for Answer {
        fn message(&self) -> &str {
            self.0
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn mapped(code: &'static str) -> BackendError {
        db_error(sqlx::Error::Database(Box::new(Answer(code))))
    }

    /// Failure class: a backend that goes away mid-call. A server that
    /// terminates the session (a failover, a restart: 57P01), cannot take
    /// a connection (08006, 57P03) or has none left (53300) is worth a
    /// retry; an answer about the request itself is not.
    #[test]
    fn answers_about_the_server_are_unavailable_and_about_the_request_internal() {
        for code in [
            "57P01", "57P02", "57P03", "08006", "08001", "53300", "53200",
        ] {
            assert!(
                matches!(mapped(code), BackendError::Unavailable { .. }),
                "{code} should be Unavailable"
            );
        }
        for code in ["23505", "42P01", "22P02", "40001", "XX000"] {
            assert!(
                matches!(mapped(code), BackendError::Failed { .. }),
                "{code} should be Internal"
            );
        }
    }
}
