//! The account, session, outbox and revocation-log stores: one body,
//! compiled once per driver (`sql::postgres`, `sql::sqlite`), where `DB`
//! names the driver and `LEASE`, `SHARE_LOCK` (`share_lock!`) and `listen` are its
//! dialect.
//! Each statement is type-checked against that driver's encodings.

use async_trait::async_trait;
use sqlx::{Database, FromRow as _, Row, types::Json};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{DB, LEASE, SHARE_LOCK, listen};
use crate::{
    accounts::{
        model::{Credentials, LoginName, Role, User, UserStatus},
        store::{InsertUserError, UserStore},
    },
    error::BackendError,
    events::{OutboxEvent, OutboxReader, RelayStore, StoredEvent},
    sql::{SqlStore, UserRow, conflicting_field, db_error},
    tokens::store::{
        NewRefreshToken, NewSession, RotateRequest, Rotation, SessionStore, TokenHash,
    },
};

/// Inserts `event` into the outbox on `conn` (a transaction's, or a pooled
/// connection's), and a revocation-type event into the revocation log too,
/// numbered by the one-row counter (whose row lock orders concurrent
/// writers by commit).
pub(in crate::sql) async fn insert_event(
    conn: &mut <DB as Database>::Connection,
    event: &OutboxEvent,
) -> Result<(), BackendError> {
    if event.event_type.is_revocation() {
        let seq: i64 = sqlx::query("UPDATE revocation_seq SET n = n + 1 WHERE id = 1 RETURNING n")
            .fetch_one(&mut *conn)
            .await
            .map_err(db_error)?
            .try_get(0)
            .map_err(db_error)?;
        sqlx::query(
            "INSERT INTO revocation_log (seq, event_id, event_type, user_id, occurred_at, payload) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(seq)
        .bind(event.id)
        .bind(event.event_type.as_str())
        .bind(event.user_id)
        // When it is logged: in the writing transaction, after the
        // account's row is held, so later than any racing request the
        // change was ordered after (the time every process raises the
        // user's epoch to; `apply_log`).
        .bind(OffsetDateTime::now_utc())
        .bind(Json(&event.data))
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    }
    sqlx::query(
        "INSERT INTO outbox (id, event_type, user_id, occurred_at, payload, traceparent) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(event.id)
    .bind(event.event_type.as_str())
    .bind(event.user_id)
    .bind(event.occurred_at)
    .bind(Json(&event.data))
    .bind(event.traceparent.as_deref())
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Revokes every live session of `user_id` on `conn`; how many it revoked.
async fn revoke_all_sessions(
    conn: &mut <DB as Database>::Connection,
    user_id: Uuid,
    now: OffsetDateTime,
    reason: &str,
) -> Result<u64, BackendError> {
    Ok(sqlx::query(
        "UPDATE sessions SET revoked_at = $2, revoked_reason = $3 \
         WHERE user_id = $1 AND revoked_at IS NULL",
    )
    .bind(user_id)
    .bind(now)
    .bind(reason)
    .execute(&mut *conn)
    .await
    .map_err(db_error)?
    .rows_affected())
}

impl SqlStore<DB> {
    async fn credentials_by(
        &self,
        sql: &'static str,
        key: &str,
    ) -> Result<Option<Credentials>, BackendError> {
        let row: Option<UserRow> = sqlx::query_as(sql)
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?;
        row.map(UserRow::into_credentials).transpose()
    }

    /// Runs `sql` (`$1` = id, `$2` = `at`) for each of `ids` in one transaction.
    /// `UPDATE outbox SET <set> = $1 … WHERE id IN (ids) <and>`, one
    /// statement for the whole batch (a relay batch is at most
    /// `relay_batch` rows, well inside both drivers' bind limits).
    async fn update_batch(
        &self,
        set: &'static str,
        and: &'static str,
        ids: &[Uuid],
        at: OffsetDateTime,
    ) -> Result<(), BackendError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut query = sqlx::QueryBuilder::<DB>::new("UPDATE outbox SET ");
        query.push(set).push_bind(at).push(" WHERE id IN (");
        let mut list = query.separated(", ");
        for id in ids {
            list.push_bind(*id);
        }
        query.push(")").push(and);
        query.build().execute(&self.pool).await.map_err(db_error)?;
        Ok(())
    }
}

#[async_trait]
impl UserStore for SqlStore<DB> {
    async fn insert_user(
        &self,
        user: &User,
        password_hash: &str,
        event: &OutboxEvent,
    ) -> Result<(), InsertUserError> {
        crate::in_db_span(DB::NAME, "insert_user", async move {
            let roles: Vec<&str> = user.roles.iter().map(Role::as_str).collect();
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            let inserted = sqlx::query(
                "INSERT INTO users (id, email, username, password_hash, roles, status, \
                 created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
            )
            .bind(user.id)
            .bind(user.email.as_str())
            .bind(user.username.as_str())
            .bind(password_hash)
            .bind(Json(roles))
            .bind(user.status.as_str())
            .bind(user.created_at)
            .execute(&mut *tx)
            .await;
            if let Err(error) = inserted {
                return Err(match conflicting_field(&error) {
                    Some(field) => InsertUserError::Conflict(field),
                    None => db_error(error).into(),
                });
            }
            insert_event(&mut tx, event).await?;
            self.commit_events(tx).await?;
            Ok(())
        })
        .await
    }

    async fn find_credentials(
        &self,
        login: &LoginName,
    ) -> Result<Option<Credentials>, BackendError> {
        crate::in_db_span(DB::NAME, "find_credentials", async move {
            match login {
                LoginName::Email(email) => {
                    self.credentials_by(
                        concat!("SELECT ", user_columns!(), " FROM users WHERE email = $1"),
                        email.as_str(),
                    )
                    .await
                }
                LoginName::Username(name) => {
                    self.credentials_by(
                        concat!(
                            "SELECT ",
                            user_columns!(),
                            " FROM users WHERE username = $1"
                        ),
                        name.as_str(),
                    )
                    .await
                }
            }
        })
        .await
    }

    async fn find_credentials_by_id(&self, id: Uuid) -> Result<Option<Credentials>, BackendError> {
        crate::in_db_span(DB::NAME, "find_credentials_by_id", async move {
            let row: Option<UserRow> = sqlx::query_as(concat!(
                "SELECT ",
                user_columns!(),
                " FROM users WHERE id = $1"
            ))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?;
            row.map(UserRow::into_credentials).transpose()
        })
        .await
    }

    async fn find_user(&self, id: Uuid) -> Result<Option<User>, BackendError> {
        crate::in_db_span(DB::NAME, "find_user", async move {
            Ok(self.find_credentials_by_id(id).await?.map(|c| c.user))
        })
        .await
    }

    async fn upgrade_password_hash(
        &self,
        id: Uuid,
        old_hash: &str,
        new_hash: &str,
    ) -> Result<(), BackendError> {
        crate::in_db_span(DB::NAME, "upgrade_password_hash", async move {
            sqlx::query("UPDATE users SET password_hash = $3 WHERE id = $1 AND password_hash = $2")
                .bind(id)
                .bind(old_hash)
                .bind(new_hash)
                .execute(&self.pool)
                .await
                .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    async fn change_password(
        &self,
        id: Uuid,
        new_hash: &str,
        event: &OutboxEvent,
    ) -> Result<bool, BackendError> {
        crate::in_db_span(DB::NAME, "change_password", async move {
            let now = event.occurred_at;
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            let changed = sqlx::query(
                "UPDATE users SET password_hash = $2, updated_at = $3, security_version \
                = security_version + 1 WHERE id = $1",
            )
            .bind(id)
            .bind(new_hash)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?
            .rows_affected();
            if changed == 0 {
                return Ok(false);
            }
            revoke_all_sessions(&mut tx, id, now, "password_changed").await?;
            insert_event(&mut tx, event).await?;
            self.commit_events(tx).await?;
            Ok(true)
        })
        .await
    }

    async fn set_status(
        &self,
        id: Uuid,
        status: UserStatus,
        event: &OutboxEvent,
    ) -> Result<Option<User>, BackendError> {
        crate::in_db_span(DB::NAME, "set_status", async move {
            let now = event.occurred_at;
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            let row: Option<UserRow> = sqlx::query_as(concat!(
                "UPDATE users SET status = $2, updated_at = $3, security_version = \
                    security_version + 1 WHERE id = $1 RETURNING ",
                user_columns!()
            ))
            .bind(id)
            .bind(status.as_str())
            .bind(now)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_error)?;
            let Some(row) = row else { return Ok(None) };
            revoke_all_sessions(&mut tx, id, now, status.as_str()).await?;
            if status == UserStatus::Deleted {
                // A deleted user's linked accounts leave with
                // the account, in the same transaction; their
                // grants wait in platform_grant_revocations
                // until each platform has revoked them.
                sqlx::query(
                    "INSERT INTO platform_grant_revocations (user_id, platform, queued_at, \
                     platform_user_id, scopes, key_id, access_token, refresh_token, \
                     token_expires_at, attempts, next_attempt_at) SELECT user_id, platform, \
                     $2, platform_user_id, scopes, key_id, access_token, refresh_token, \
                     token_expires_at, 0, $2 FROM platform_accounts WHERE user_id = $1",
                )
                .bind(id)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
                sqlx::query("DELETE FROM platform_accounts WHERE user_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
            }
            insert_event(&mut tx, event).await?;
            self.commit_events(tx).await?;
            Ok(Some(row.into_credentials()?.user))
        })
        .await
    }

    async fn set_roles(
        &self,
        id: Uuid,
        roles: &[Role],
        event: &OutboxEvent,
    ) -> Result<Option<User>, BackendError> {
        crate::in_db_span(DB::NAME, "set_roles", async move {
            let now = event.occurred_at;
            let names: Vec<&str> = roles.iter().map(Role::as_str).collect();
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            let row: Option<UserRow> = sqlx::query_as(concat!(
                "UPDATE users SET roles = $2, updated_at = $3, security_version = \
                    security_version + 1 WHERE id = $1 RETURNING ",
                user_columns!()
            ))
            .bind(id)
            .bind(Json(names))
            .bind(now)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_error)?;
            let Some(row) = row else { return Ok(None) };
            revoke_all_sessions(&mut tx, id, now, "roles_changed").await?;
            insert_event(&mut tx, event).await?;
            self.commit_events(tx).await?;
            Ok(Some(row.into_credentials()?.user))
        })
        .await
    }

    async fn append_event(&self, event: &OutboxEvent) -> Result<(), BackendError> {
        crate::in_db_span(DB::NAME, "append_event", async move {
            let mut conn = self.pool.acquire().await.map_err(db_error)?;
            insert_event(&mut conn, event).await?;
            self.outbox_written.notify_one();
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl SessionStore for SqlStore<DB> {
    async fn create_session(
        &self,
        session: &NewSession,
        token: &NewRefreshToken,
        event: &OutboxEvent,
    ) -> Result<bool, BackendError> {
        crate::in_db_span(DB::NAME, "create_session", async move {
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            // Only while the account is still as the login read
            // it: one statement, holding the account's row (on
            // PostgreSQL a share lock, which a security change's
            // UPDATE waits for; SQLite has one writer at a time).
            let created = sqlx::query(concat!(
                "INSERT INTO sessions (id, user_id, created_at, absolute_expires_at) \
                     SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM users \
                     WHERE id = $2 AND security_version = $5 AND status = 'active'",
                share_lock!(),
                ")"
            ))
            .bind(session.id)
            .bind(session.user_id)
            .bind(session.created_at)
            .bind(session.absolute_expires_at)
            .bind(session.security_version)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?
            .rows_affected();
            if created == 0 {
                return Ok(false);
            }
            sqlx::query(
                "INSERT INTO refresh_tokens (token_hash, session_id, created_at, \
                idle_expires_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(&token.hash[..])
            .bind(token.session_id)
            .bind(token.created_at)
            .bind(token.idle_expires_at)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
            insert_event(&mut tx, event).await?;
            self.commit_events(tx).await?;
            Ok(true)
        })
        .await
    }

    async fn rotate_refresh_token(
        &self,
        request: RotateRequest<'_>,
    ) -> Result<Rotation, BackendError> {
        crate::in_db_span(DB::NAME, "rotate_refresh_token", async move {
            let now = request.now;
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            // Spending first makes the rotation atomic: of two
            // concurrent presentations exactly one sees `used_at IS
            // NULL`; the other takes the reuse path below.
            let spent = sqlx::query(
                "UPDATE refresh_tokens SET used_at = $2 WHERE token_hash = $1 AND used_at IS NULL \
                 RETURNING session_id, idle_expires_at",
            )
            .bind(&request.presented[..])
            .bind(now)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_error)?;

            let Some(spent) = spent else {
                let owner = sqlx::query(
                    "SELECT s.id, s.user_id, s.revoked_at FROM refresh_tokens t \
                     JOIN sessions s ON s.id = t.session_id WHERE t.token_hash = $1",
                )
                .bind(&request.presented[..])
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_error)?;
                let Some(owner) = owner else {
                    return Ok(Rotation::Invalid);
                };
                let session_id: Uuid = owner.try_get(0).map_err(db_error)?;
                let user_id: Uuid = owner.try_get(1).map_err(db_error)?;
                let revoked_at: Option<OffsetDateTime> = owner.try_get(2).map_err(db_error)?;
                if revoked_at.is_none() {
                    // Conditional, so of several concurrent replays
                    // only one revokes and records the event.
                    let revoked = sqlx::query(
                        "UPDATE sessions SET revoked_at = $2, revoked_reason = \
                         'refresh_token_reuse' WHERE id = $1 AND revoked_at IS NULL",
                    )
                    .bind(session_id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?
                    .rows_affected();
                    if revoked == 0 {
                        return Ok(Rotation::Reused {
                            user_id,
                            session_id,
                        });
                    }
                    let event = OutboxEvent::token_revoked(
                        user_id,
                        session_id,
                        "refresh_token_reuse",
                        request.ctx,
                    );
                    insert_event(&mut tx, &event).await?;
                    self.commit_events(tx).await?;
                }
                return Ok(Rotation::Reused {
                    user_id,
                    session_id,
                });
            };

            let session_id: Uuid = spent.try_get(0).map_err(db_error)?;
            let idle_expires_at: OffsetDateTime = spent.try_get(1).map_err(db_error)?;
            if idle_expires_at <= now {
                return Ok(Rotation::Invalid);
            }
            // The account's row is held (shared) before it is
            // read, so a security change that commits after this
            // read waits for this rotation and then revokes its
            // result; one that committed before is seen below.
            // (SQLite has no row locks and needs none: this
            // transaction already holds its one write lock.)
            if !SHARE_LOCK.is_empty() {
                sqlx::query(concat!(
                    "SELECT u.id FROM users u WHERE u.id = (SELECT user_id FROM sessions \
                         WHERE id = $1)",
                    share_lock!()
                ))
                .bind(session_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_error)?;
            }
            let row = sqlx::query(
                "SELECT s.absolute_expires_at, s.revoked_at, u.id, u.email, u.username, \
                 u.password_hash, u.roles, u.status, u.created_at, u.security_version \
                 FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.id = $1",
            )
            .bind(session_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_error)?;
            let absolute_expires_at: OffsetDateTime = row.try_get(0).map_err(db_error)?;
            let revoked_at: Option<OffsetDateTime> = row.try_get(1).map_err(db_error)?;
            let user = UserRow::from_row(&row)
                .map_err(db_error)?
                .into_credentials()?
                .user;
            if revoked_at.is_some()
                || absolute_expires_at <= now
                || user.status != UserStatus::Active
            {
                return Ok(Rotation::Invalid);
            }
            crate::pause::point("refresh.after_read").await;
            let next_idle = (now + request.idle_ttl).min(absolute_expires_at);
            sqlx::query(
                "INSERT INTO refresh_tokens (token_hash, session_id, created_at, \
                idle_expires_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(&request.next[..])
            .bind(session_id)
            .bind(now)
            .bind(next_idle)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
            tx.commit().await.map_err(db_error)?;
            Ok(Rotation::Rotated {
                user,
                session_id,
                idle_expires_at: next_idle,
            })
        })
        .await
    }

    async fn refresh_token_owner(
        &self,
        presented: &TokenHash,
    ) -> Result<Option<(Uuid, Uuid)>, BackendError> {
        crate::in_db_span(DB::NAME, "refresh_token_owner", async move {
            let row = sqlx::query(
                "SELECT s.id, s.user_id FROM refresh_tokens t JOIN sessions s ON s.id = \
                t.session_id WHERE t.token_hash = $1",
            )
            .bind(&presented[..])
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?;
            row.map(|r| {
                Ok((
                    r.try_get(0).map_err(db_error)?,
                    r.try_get(1).map_err(db_error)?,
                ))
            })
            .transpose()
        })
        .await
    }

    async fn revoke_session(
        &self,
        session_id: Uuid,
        user_id: Uuid,
        now: OffsetDateTime,
        event: &OutboxEvent,
    ) -> Result<bool, BackendError> {
        crate::in_db_span(DB::NAME, "revoke_session", async move {
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            let revoked = sqlx::query(
                "UPDATE sessions SET revoked_at = $3, revoked_reason = 'logout' \
                 WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
            )
            .bind(session_id)
            .bind(user_id)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?
            .rows_affected();
            insert_event(&mut tx, event).await?;
            self.commit_events(tx).await?;
            Ok(revoked > 0)
        })
        .await
    }

    async fn revoke_user_sessions(
        &self,
        user_id: Uuid,
        now: OffsetDateTime,
        event: &OutboxEvent,
    ) -> Result<u64, BackendError> {
        crate::in_db_span(DB::NAME, "revoke_user_sessions", async move {
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            // The account's row first (its lock orders this
            // against logins and refreshes that read it).
            sqlx::query("UPDATE users SET security_version = security_version + 1 WHERE id = $1")
                .bind(user_id)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            let revoked = revoke_all_sessions(&mut tx, user_id, now, "admin_revoke").await?;
            insert_event(&mut tx, event).await?;
            self.commit_events(tx).await?;
            Ok(revoked)
        })
        .await
    }
}

#[async_trait]
impl crate::Ping for SqlStore<DB> {
    async fn ping(&self) -> Result<(), BackendError> {
        crate::in_db_span(DB::NAME, "ping", async move {
            sqlx::query("SELECT 1")
                .execute(&self.pool)
                .await
                .map_err(db_error)
                .map(drop)
        })
        .await
    }
}

fn stored_event(r: &<DB as Database>::Row) -> Result<StoredEvent, sqlx::Error> {
    Ok(StoredEvent {
        id: r.try_get(0)?,
        event_type: r.try_get(1)?,
        user_id: r.try_get(2)?,
        occurred_at: r.try_get(3)?,
        data: r.try_get::<Json<serde_json::Value>, _>(4)?.0,
        traceparent: r.try_get(5)?,
        attempts: r.try_get(6)?,
    })
}

#[async_trait]
impl RelayStore for SqlStore<DB> {
    async fn lease(
        &self,
        limit: i64,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
    ) -> Result<Vec<StoredEvent>, BackendError> {
        crate::in_db_span(DB::NAME, "lease", async move {
            let rows = sqlx::query(LEASE)
                .bind(limit)
                .bind(now)
                .bind(lease_until)
                .fetch_all(&self.pool)
                .await
                .map_err(db_error)?;
            let mut events = rows
                .iter()
                .map(stored_event)
                .collect::<Result<Vec<_>, _>>()
                .map_err(db_error)?;
            // RETURNING has no order; UUIDv7 ids sort by time.
            events.sort_by_key(|e| e.id);
            Ok(events)
        })
        .await
    }

    async fn mark_published(&self, ids: &[Uuid], at: OffsetDateTime) -> Result<(), BackendError> {
        crate::in_db_span(DB::NAME, "mark_published", async move {
            self.update_batch("lease_until = NULL, published_at = ", "", ids, at)
                .await
        })
        .await
    }

    async fn retry_later(
        &self,
        ids: &[Uuid],
        retry_at: OffsetDateTime,
    ) -> Result<(), BackendError> {
        crate::in_db_span(DB::NAME, "retry_later", async move {
            self.update_batch("lease_until = ", " AND published_at IS NULL", ids, retry_at)
                .await
        })
        .await
    }

    async fn purge_published(&self, before: OffsetDateTime) -> Result<u64, BackendError> {
        crate::in_db_span(DB::NAME, "purge_published", async move {
            Ok(sqlx::query(
                "DELETE FROM outbox WHERE published_at IS NOT NULL AND published_at < $1",
            )
            .bind(before)
            .execute(&self.pool)
            .await
            .map_err(db_error)?
            .rows_affected())
        })
        .await
    }

    async fn unpublished_count(&self) -> Result<i64, BackendError> {
        crate::in_db_span(DB::NAME, "unpublished_count", async move {
            let row = sqlx::query("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(&self.pool)
                .await
                .map_err(db_error)?;
            row.try_get::<i64, _>(0).map_err(db_error)
        })
        .await
    }

    fn outbox_written(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.listening.call_once(|| listen(self));
        self.outbox_written.clone()
    }
}

#[async_trait]
impl crate::revocation::feed::RevocationLog for SqlStore<DB> {
    async fn after(
        &self,
        seq: i64,
        limit: i64,
    ) -> Result<Vec<crate::revocation::feed::LoggedRevocation>, BackendError> {
        crate::in_db_span(DB::NAME, "after", async move {
            let rows = sqlx::query(
                "SELECT seq, event_id, event_type, user_id, occurred_at, payload FROM \
                 revocation_log WHERE seq > $1 ORDER BY seq LIMIT $2",
            )
            .bind(seq)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
            rows.iter()
                .map(|r| {
                    Ok(crate::revocation::feed::LoggedRevocation::from_stored(
                        r.try_get(0)?,
                        r.try_get(1)?,
                        r.try_get(2)?,
                        r.try_get(3)?,
                        r.try_get(4)?,
                        r.try_get::<Json<serde_json::Value>, _>(5)?.0,
                    ))
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(db_error)
        })
        .await
    }

    async fn head(&self) -> Result<i64, BackendError> {
        crate::in_db_span(DB::NAME, "head", async move {
            let row = sqlx::query("SELECT n FROM revocation_seq WHERE id = 1")
                .fetch_one(&self.pool)
                .await
                .map_err(db_error)?;
            row.try_get::<i64, _>(0).map_err(db_error)
        })
        .await
    }

    async fn oldest(&self) -> Result<Option<i64>, BackendError> {
        crate::in_db_span(DB::NAME, "oldest", async move {
            let row = sqlx::query("SELECT MIN(seq) FROM revocation_log")
                .fetch_one(&self.pool)
                .await
                .map_err(db_error)?;
            row.try_get::<Option<i64>, _>(0).map_err(db_error)
        })
        .await
    }

    async fn first_since(&self, at: OffsetDateTime) -> Result<Option<i64>, BackendError> {
        crate::in_db_span(DB::NAME, "first_since", async move {
            let row = sqlx::query("SELECT MIN(seq) FROM revocation_log WHERE occurred_at >= $1")
                .bind(at)
                .fetch_one(&self.pool)
                .await
                .map_err(db_error)?;
            row.try_get::<Option<i64>, _>(0).map_err(db_error)
        })
        .await
    }

    fn written(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.listening.call_once(|| listen(self));
        self.log_written.clone()
    }

    async fn purge_before(&self, before: OffsetDateTime) -> Result<u64, BackendError> {
        crate::in_db_span(DB::NAME, "purge_before", async move {
            Ok(
                sqlx::query("DELETE FROM revocation_log WHERE occurred_at < $1")
                    .bind(before)
                    .execute(&self.pool)
                    .await
                    .map_err(db_error)?
                    .rows_affected(),
            )
        })
        .await
    }
}

#[async_trait]
impl OutboxReader for SqlStore<DB> {
    async fn unpublished(&self, limit: i64) -> Result<Vec<StoredEvent>, BackendError> {
        crate::in_db_span(DB::NAME, "unpublished", async move {
            let rows = sqlx::query(
                "SELECT id, event_type, user_id, occurred_at, payload, traceparent, \
                 attempts FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT $1",
            )
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
            rows.iter()
                .map(stored_event)
                .collect::<Result<_, _>>()
                .map_err(db_error)
        })
        .await
    }
}
