//! The platform-account store (tables: `migrations/*/…platform_accounts.sql`):
//! one body, compiled once per driver (see `sql`).

use async_trait::async_trait;
use sqlx::{Database, types::Json};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{CLAIM, CLAIM_REVOCATIONS, COOLDOWN_UPSERT, DB, accounts::insert_event};
use crate::{
    error::BackendError,
    events::{OutboxEvent, RequestContext},
    sql::{SqlStore, db_error},
};
use auth_domain::platforms::{
    AccountStatus, Platform, PlatformAccount,
    store::{
        LinkOutcome, LinkState, PendingRevocation, PlatformStore, SealedTokens, StoredAccount,
    },
    vault::Sealed,
};

fn stored_account(row: &<DB as Database>::Row) -> Result<StoredAccount, BackendError> {
    use sqlx::Row as _;
    let platform: String = row.try_get(1).map_err(db_error)?;
    let status: String = row.try_get(6).map_err(db_error)?;
    let corrupt = |what: &str| {
        BackendError::failed("database", format!("unknown {what} in platform_accounts"))
    };
    let expires_at: Option<OffsetDateTime> = row.try_get(10).map_err(db_error)?;
    Ok(StoredAccount {
        account: PlatformAccount {
            user_id: row.try_get(0).map_err(db_error)?,
            platform: Platform::parse(&platform).ok_or_else(|| corrupt("platform"))?,
            platform_user_id: row.try_get(2).map_err(db_error)?,
            login: row.try_get(3).map_err(db_error)?,
            display_name: row.try_get(4).map_err(db_error)?,
            scopes: row.try_get::<Json<Vec<String>>, _>(5).map_err(db_error)?.0,
            status: AccountStatus::parse(&status).ok_or_else(|| corrupt("status"))?,
            connected_at: row.try_get(13).map_err(db_error)?,
            token_expires_at: expires_at,
        },
        tokens: SealedTokens {
            key_id: row.try_get(7).map_err(db_error)?,
            access: row.try_get(8).map_err(db_error)?,
            refresh: row.try_get(9).map_err(db_error)?,
            expires_at,
        },
        version: row.try_get(11).map_err(db_error)?,
        lease_until: row.try_get(12).map_err(db_error)?,
        user_active: true,
    })
}

impl SqlStore<DB> {
    async fn accounts_where(
        &self,
        sql: &'static str,
        bind: impl FnOnce(
            sqlx::query::Query<'_, DB, <DB as Database>::Arguments>,
        ) -> sqlx::query::Query<'_, DB, <DB as Database>::Arguments>,
    ) -> Result<Vec<StoredAccount>, BackendError> {
        let rows = bind(sqlx::query(sql))
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        rows.iter().map(stored_account).collect()
    }
}

#[async_trait]
impl PlatformStore for SqlStore<DB> {
    async fn insert_link_state(
        &self,
        state_hash: &[u8; 32],
        state: &LinkState,
    ) -> Result<(), BackendError> {
        crate::in_db_span(DB::NAME, "insert_link_state", async move {
            sqlx::query(
                "INSERT INTO platform_link_states (state_hash, user_id, platform, \
                 redirect_uri, verifier_key, verifier, expires_at) VALUES ($1, $2, $3, \
                 $4, $5, $6, $7)",
            )
            .bind(&state_hash[..])
            .bind(state.user_id)
            .bind(state.platform.as_str())
            .bind(&state.redirect_uri)
            .bind(state.verifier.as_ref().map(|v| v.key_id.as_str()))
            .bind(state.verifier.as_ref().map(|v| v.bytes.as_slice()))
            .bind(state.expires_at)
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    async fn take_link_state(
        &self,
        state_hash: &[u8; 32],
    ) -> Result<Option<LinkState>, BackendError> {
        crate::in_db_span(DB::NAME, "take_link_state", async move {
            // DELETE … RETURNING: of two concurrent uses exactly one
            // gets the row.
            let row = sqlx::query(
                "DELETE FROM platform_link_states WHERE state_hash = $1 \
                 RETURNING user_id, platform, redirect_uri, verifier_key, verifier, expires_at",
            )
            .bind(&state_hash[..])
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?;
            let Some(row) = row else { return Ok(None) };
            use sqlx::Row as _;
            let platform: String = row.try_get(1).map_err(db_error)?;
            let key: Option<String> = row.try_get(3).map_err(db_error)?;
            let verifier: Option<Vec<u8>> = row.try_get(4).map_err(db_error)?;
            Ok(Some(LinkState {
                user_id: row.try_get(0).map_err(db_error)?,
                platform: Platform::parse(&platform).ok_or_else(|| {
                    BackendError::failed("database", "unknown platform in platform_link_states")
                })?,
                redirect_uri: row.try_get(2).map_err(db_error)?,
                verifier: key
                    .zip(verifier)
                    .map(|(key_id, bytes)| Sealed { key_id, bytes }),
                expires_at: row.try_get(5).map_err(db_error)?,
            }))
        })
        .await
    }

    async fn link_account(
        &self,
        account: &PlatformAccount,
        tokens: &SealedTokens,
        version: i64,
        event: &OutboxEvent,
        ends_every_grant: bool,
        ctx: &RequestContext,
    ) -> Result<LinkOutcome, BackendError> {
        crate::in_db_span(DB::NAME, "link_account", async move {
            use sqlx::Row as _;
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            let owner = sqlx::query(
                "SELECT user_id FROM platform_accounts WHERE platform = $1 AND \
                platform_user_id = $2",
            )
            .bind(account.platform.as_str())
            .bind(&account.platform_user_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_error)?;
            if let Some(owner) = owner {
                let owner: Uuid = owner.try_get(0).map_err(db_error)?;
                if owner != account.user_id {
                    return Ok(LinkOutcome::LinkedElsewhere);
                }
            }
            // Re-linking replaces the user's account on this platform.
            sqlx::query("DELETE FROM platform_accounts WHERE user_id = $1 AND platform = $2")
                .bind(account.user_id)
                .bind(account.platform.as_str())
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            let inserted = sqlx::query(
                "INSERT INTO platform_accounts (user_id, platform, platform_user_id, \
                 login, display_name, scopes, status, key_id, access_token, \
                 refresh_token, token_expires_at, token_version, validated_at, \
                 connected_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, \
                 $10, $11, $12, $13, $13, $13)",
            )
            .bind(account.user_id)
            .bind(account.platform.as_str())
            .bind(&account.platform_user_id)
            .bind(&account.login)
            .bind(&account.display_name)
            .bind(Json(&account.scopes))
            .bind(account.status.as_str())
            .bind(&tokens.key_id)
            .bind(&tokens.access)
            .bind(tokens.refresh.as_deref())
            .bind(tokens.expires_at)
            .bind(version)
            .bind(account.connected_at)
            .execute(&mut *tx)
            .await;
            if let Err(error) = inserted {
                // A concurrent link of the same platform account by
                // another user won the unique constraint.
                if error
                    .as_database_error()
                    .is_some_and(|e| e.is_unique_violation())
                {
                    return Ok(LinkOutcome::LinkedElsewhere);
                }
                return Err(db_error(error));
            }
            // A claimed row may be at the platform right now:
            // its revocation can still land after this consent
            // (README, "Platform accounts").
            let settle = if ends_every_grant {
                "DELETE FROM platform_grant_revocations WHERE platform = $1 AND \
                 platform_user_id = $2 RETURNING user_id, scopes, reason, queued_at"
            } else {
                "SELECT user_id, scopes, reason, queued_at FROM platform_grant_revocations \
                 WHERE platform = $1 AND platform_user_id = $2 AND reason <> 'relinked'"
            };
            let queued = sqlx::query(settle)
                .bind(account.platform.as_str())
                .bind(&account.platform_user_id)
                .fetch_all(&mut *tx)
                .await
                .map_err(db_error)?;
            let mut queued = queued
                .iter()
                .map(|row| -> Result<_, BackendError> {
                    Ok((
                        row.try_get::<OffsetDateTime, _>(3).map_err(db_error)?,
                        row.try_get::<Uuid, _>(0).map_err(db_error)?,
                        row.try_get::<Json<Vec<String>>, _>(1).map_err(db_error)?.0,
                        row.try_get::<String, _>(2).map_err(db_error)?,
                    ))
                })
                .collect::<Result<Vec<_>, _>>()?;
            queued.sort_by_key(|row| row.0);
            let mut settled = false;
            for (queued_at, user_id, scopes, reason) in queued {
                if !ends_every_grant {
                    // Announced once, whoever marks it first.
                    let marked = sqlx::query(
                        "UPDATE platform_grant_revocations SET reason = 'relinked' WHERE user_id \
                         = $1 AND platform = $2 AND queued_at = $3 AND reason <> 'relinked'",
                    )
                    .bind(user_id)
                    .bind(account.platform.as_str())
                    .bind(queued_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?
                    .rows_affected();
                    if marked == 0 {
                        continue;
                    }
                }
                let ended = OutboxEvent::platform_grant_revoked(
                    user_id,
                    account.platform,
                    &account.platform_user_id,
                    &scopes,
                    if ends_every_grant {
                        "superseded"
                    } else {
                        "queued"
                    },
                    &reason,
                    ctx,
                );
                insert_event(&mut tx, &ended).await?;
                settled = true;
            }
            // The outbox is ordered by event id (UUIDv7): the
            // link's event, built before, is written after.
            let later;
            let event = if settled {
                later = OutboxEvent {
                    id: Uuid::now_v7(),
                    ..event.clone()
                };
                &later
            } else {
                event
            };
            insert_event(&mut tx, event).await?;
            self.commit_events(tx).await?;
            Ok(LinkOutcome::Linked)
        })
        .await
    }

    async fn accounts_of(&self, user_id: Uuid) -> Result<Vec<PlatformAccount>, BackendError> {
        crate::in_db_span(DB::NAME, "accounts_of", async move {
            let rows = self
                .accounts_where(
                    concat!(
                        "SELECT ",
                        account_columns!(),
                        " FROM platform_accounts WHERE user_id = $1 ORDER BY platform"
                    ),
                    |q| q.bind(user_id),
                )
                .await?;
            Ok(rows.into_iter().map(|r| r.account).collect())
        })
        .await
    }

    async fn find_account(
        &self,
        user_id: Uuid,
        platform: Platform,
    ) -> Result<Option<StoredAccount>, BackendError> {
        crate::in_db_span(DB::NAME, "find_account", async move {
            // With the owner's status, in the same read.
            let row = sqlx::query(concat!(
                "SELECT ",
                account_columns!(),
                ", (SELECT status FROM users WHERE users.id = platform_accounts.user_id) \
                 FROM platform_accounts WHERE user_id = $1 AND platform = $2"
            ))
            .bind(user_id)
            .bind(platform.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?;
            let Some(row) = row else { return Ok(None) };
            let mut stored = stored_account(&row)?;
            use sqlx::Row as _;
            let owner: Option<String> = row.try_get(14).map_err(db_error)?;
            stored.user_active = owner.as_deref() == Some("active");
            Ok(Some(stored))
        })
        .await
    }

    async fn find_by_platform_user(
        &self,
        platform: Platform,
        platform_user_id: &str,
    ) -> Result<Option<StoredAccount>, BackendError> {
        crate::in_db_span(DB::NAME, "find_by_platform_user", async move {
            let row = sqlx::query(concat!(
                "SELECT ",
                account_columns!(),
                " FROM platform_accounts WHERE platform = $1 AND platform_user_id = $2"
            ))
            .bind(platform.as_str())
            .bind(platform_user_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?;
            row.as_ref().map(stored_account).transpose()
        })
        .await
    }

    async fn delete_account(
        &self,
        user_id: Uuid,
        platform: Platform,
        connected_at: OffsetDateTime,
        event: &OutboxEvent,
    ) -> Result<bool, BackendError> {
        crate::in_db_span(DB::NAME, "delete_account", async move {
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            let deleted = sqlx::query(
                "DELETE FROM platform_accounts WHERE user_id = $1 AND platform = $2 AND \
                connected_at = $3",
            )
            .bind(user_id)
            .bind(platform.as_str())
            .bind(connected_at)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?
            .rows_affected();
            if deleted == 0 {
                return Ok(false);
            }
            insert_event(&mut tx, event).await?;
            self.commit_events(tx).await?;
            Ok(true)
        })
        .await
    }

    async fn take_refresh_lease(
        &self,
        user_id: Uuid,
        platform: Platform,
        version: i64,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, BackendError> {
        crate::in_db_span(DB::NAME, "take_refresh_lease", async move {
            // One conditional UPDATE: on PostgreSQL a concurrent one
            // waits for the row lock, then re-checks the condition and
            // finds the lease taken.
            let taken = sqlx::query(
                "UPDATE platform_accounts SET refresh_lease_until = $5 \
                 WHERE user_id = $1 AND platform = $2 AND token_version = $3 AND status = 'active' \
                 AND (refresh_lease_until IS NULL OR refresh_lease_until < $4)",
            )
            .bind(user_id)
            .bind(platform.as_str())
            .bind(version)
            .bind(now)
            .bind(until)
            .execute(&self.pool)
            .await
            .map_err(db_error)?
            .rows_affected();
            Ok(taken == 1)
        })
        .await
    }

    async fn replace_tokens(
        &self,
        user_id: Uuid,
        platform: Platform,
        version: i64,
        tokens: &SealedTokens,
        scopes: Option<&[String]>,
    ) -> Result<bool, BackendError> {
        crate::in_db_span(DB::NAME, "replace_tokens", async move {
            let now = OffsetDateTime::now_utc();
            let updated = sqlx::query(
                "UPDATE platform_accounts SET key_id = $4, access_token = $5, \
                 refresh_token = $6, token_expires_at = $7, scopes = COALESCE($8, \
                 scopes), token_version = token_version + 1, refresh_lease_until = NULL, \
                 validated_at = $9, updated_at = $9 WHERE user_id = $1 AND platform = $2 \
                 AND token_version = $3",
            )
            .bind(user_id)
            .bind(platform.as_str())
            .bind(version)
            .bind(&tokens.key_id)
            .bind(&tokens.access)
            .bind(tokens.refresh.as_deref())
            .bind(tokens.expires_at)
            .bind(scopes.map(Json))
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(db_error)?
            .rows_affected();
            Ok(updated == 1)
        })
        .await
    }

    async fn release_refresh_lease(
        &self,
        user_id: Uuid,
        platform: Platform,
        version: i64,
    ) -> Result<(), BackendError> {
        crate::in_db_span(DB::NAME, "release_refresh_lease", async move {
            sqlx::query(
                "UPDATE platform_accounts SET refresh_lease_until = NULL \
                 WHERE user_id = $1 AND platform = $2 AND token_version = $3",
            )
            .bind(user_id)
            .bind(platform.as_str())
            .bind(version)
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    async fn set_status(
        &self,
        user_id: Uuid,
        platform: Platform,
        status: AccountStatus,
        event: &OutboxEvent,
    ) -> Result<bool, BackendError> {
        crate::in_db_span(DB::NAME, "set_status", async move {
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            let changed = sqlx::query(
                "UPDATE platform_accounts SET status = $3, refresh_lease_until = NULL, \
                 updated_at = $4 WHERE user_id = $1 AND platform = $2 AND status <> $3",
            )
            .bind(user_id)
            .bind(platform.as_str())
            .bind(status.as_str())
            .bind(event.occurred_at)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?
            .rows_affected();
            if changed == 0 {
                return Ok(false);
            }
            insert_event(&mut tx, event).await?;
            self.commit_events(tx).await?;
            Ok(true)
        })
        .await
    }

    async fn expiring(
        &self,
        platform: Platform,
        before: OffsetDateTime,
        now: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<StoredAccount>, BackendError> {
        crate::in_db_span(DB::NAME, "expiring", async move {
            self.accounts_where(
                concat!(
                    "SELECT ",
                    account_columns!(),
                    " FROM platform_accounts \
                     WHERE platform = $1 AND status = 'active' AND token_expires_at < $2 \
                     AND (refresh_lease_until IS NULL OR refresh_lease_until < $3) \
                     ORDER BY token_expires_at LIMIT $4"
                ),
                |q| q.bind(platform.as_str()).bind(before).bind(now).bind(limit),
            )
            .await
        })
        .await
    }

    async fn claim_validation(
        &self,
        platform: Platform,
        cutoff: OffsetDateTime,
        now: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<StoredAccount>, BackendError> {
        crate::in_db_span(DB::NAME, "claim_validation", async move {
            self.accounts_where(CLAIM, |q| {
                q.bind(platform.as_str()).bind(cutoff).bind(now).bind(limit)
            })
            .await
        })
        .await
    }

    async fn sealed_with_other_key(
        &self,
        key_id: &str,
        limit: i64,
    ) -> Result<Vec<StoredAccount>, BackendError> {
        crate::in_db_span(DB::NAME, "sealed_with_other_key", async move {
            let key_id = key_id.to_owned();
            self.accounts_where(
                concat!(
                    "SELECT ",
                    account_columns!(),
                    " FROM platform_accounts WHERE key_id <> $1 LIMIT $2"
                ),
                |q| q.bind(key_id).bind(limit),
            )
            .await
        })
        .await
    }

    async fn record_webhook_message(
        &self,
        source: &str,
        message_id: &str,
        now: OffsetDateTime,
    ) -> Result<bool, BackendError> {
        crate::in_db_span(DB::NAME, "record_webhook_message", async move {
            let inserted = sqlx::query(
                "INSERT INTO webhook_messages (source, message_id, received_at) VALUES \
                 ($1, $2, $3) ON CONFLICT (source, message_id) DO NOTHING",
            )
            .bind(source)
            .bind(message_id)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(db_error)?
            .rows_affected();
            Ok(inserted == 1)
        })
        .await
    }

    async fn set_platform_cooldown(
        &self,
        platform: &str,
        until: OffsetDateTime,
    ) -> Result<(), BackendError> {
        crate::in_db_span(DB::NAME, "set_platform_cooldown", async move {
            sqlx::query(COOLDOWN_UPSERT)
                .bind(platform)
                .bind(until)
                .execute(&self.pool)
                .await
                .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    async fn platform_cooldown(
        &self,
        platform: &str,
    ) -> Result<Option<OffsetDateTime>, BackendError> {
        crate::in_db_span(DB::NAME, "platform_cooldown", async move {
            let row: Option<(OffsetDateTime,)> =
                sqlx::query_as("SELECT until FROM platform_cooldowns WHERE platform = $1")
                    .bind(platform)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db_error)?;
            Ok(row.map(|(until,)| until))
        })
        .await
    }

    async fn forget_webhook_message(
        &self,
        source: &str,
        message_id: &str,
    ) -> Result<(), BackendError> {
        crate::in_db_span(DB::NAME, "forget_webhook_message", async move {
            sqlx::query("DELETE FROM webhook_messages WHERE source = $1 AND message_id = $2")
                .bind(source)
                .bind(message_id)
                .execute(&self.pool)
                .await
                .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    async fn claim_grant_revocations(
        &self,
        now: OffsetDateTime,
        until: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<PendingRevocation>, BackendError> {
        crate::in_db_span(DB::NAME, "claim_grant_revocations", async move {
            use sqlx::Row as _;
            let rows = sqlx::query(CLAIM_REVOCATIONS)
                .bind(now)
                .bind(until)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
                .map_err(db_error)?;
            rows.iter()
                .map(|row| {
                    let platform: String = row.try_get(1).map_err(db_error)?;
                    Ok(PendingRevocation {
                        user_id: row.try_get(0).map_err(db_error)?,
                        platform: Platform::parse(&platform).ok_or_else(|| {
                            BackendError::failed(
                                "database",
                                "unknown platform in platform_grant_revocations",
                            )
                        })?,
                        queued_at: row.try_get(2).map_err(db_error)?,
                        platform_user_id: row.try_get(3).map_err(db_error)?,
                        scopes: row.try_get::<Json<Vec<String>>, _>(4).map_err(db_error)?.0,
                        tokens: SealedTokens {
                            key_id: row.try_get(5).map_err(db_error)?,
                            access: row.try_get(6).map_err(db_error)?,
                            refresh: row.try_get(7).map_err(db_error)?,
                            expires_at: row.try_get(8).map_err(db_error)?,
                        },
                        attempts: row.try_get(9).map_err(db_error)?,
                        reason: row.try_get(10).map_err(db_error)?,
                        refreshed: false,
                    })
                })
                .collect()
        })
        .await
    }

    async fn queue_grant_revocation(
        &self,
        pending: &PendingRevocation,
        connected_at: OffsetDateTime,
        next_attempt_at: OffsetDateTime,
    ) -> Result<bool, BackendError> {
        crate::in_db_span(DB::NAME, "queue_grant_revocation", async move {
            use sqlx::Row as _;
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            // The DELETE takes the row: of two at once, the
            // second finds nothing and queues nothing.
            let row = sqlx::query(
                "DELETE FROM platform_accounts WHERE user_id = $1 AND platform = $2 AND \
                 connected_at = $3 RETURNING platform_user_id, scopes, key_id, \
                 access_token, refresh_token, token_expires_at",
            )
            .bind(pending.user_id)
            .bind(pending.platform.as_str())
            .bind(connected_at)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_error)?;
            let Some(row) = row else { return Ok(false) };
            let (key_id, access, refresh, expires_at) = if pending.refreshed {
                let t = &pending.tokens;
                (
                    t.key_id.clone(),
                    t.access.clone(),
                    t.refresh.clone(),
                    t.expires_at,
                )
            } else {
                (
                    row.try_get::<String, _>(2).map_err(db_error)?,
                    row.try_get::<Vec<u8>, _>(3).map_err(db_error)?,
                    row.try_get::<Option<Vec<u8>>, _>(4).map_err(db_error)?,
                    row.try_get::<Option<OffsetDateTime>, _>(5)
                        .map_err(db_error)?,
                )
            };
            sqlx::query(
                "INSERT INTO platform_grant_revocations (user_id, platform, queued_at, \
                 platform_user_id, scopes, key_id, access_token, refresh_token, \
                 token_expires_at, attempts, next_attempt_at, reason) VALUES ($1, $2, $3, \
                 $4, $5, $6, $7, $8, $9, 1, $10, $11)",
            )
            .bind(pending.user_id)
            .bind(pending.platform.as_str())
            .bind(pending.queued_at)
            .bind(row.try_get::<String, _>(0).map_err(db_error)?)
            .bind(row.try_get::<Json<Vec<String>>, _>(1).map_err(db_error)?)
            .bind(key_id)
            .bind(access)
            .bind(refresh)
            .bind(expires_at)
            .bind(next_attempt_at)
            .bind(&pending.reason)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
            tx.commit().await.map_err(db_error)?;
            Ok(true)
        })
        .await
    }

    async fn finish_grant_revocation(
        &self,
        pending: &PendingRevocation,
        event: &OutboxEvent,
    ) -> Result<bool, BackendError> {
        crate::in_db_span(DB::NAME, "finish_grant_revocation", async move {
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            use sqlx::Row as _;
            let deleted = sqlx::query(
                "DELETE FROM platform_grant_revocations WHERE user_id = $1 AND platform = \
                 $2 AND queued_at = $3 RETURNING reason",
            )
            .bind(pending.user_id)
            .bind(pending.platform.as_str())
            .bind(pending.queued_at)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_error)?;
            let Some(deleted) = deleted else {
                return Ok(false);
            };
            // A re-link announced this grant's end already (the
            // row read now, not at the claim: the link may have
            // come while the platform was being called).
            let reason: String = deleted.try_get(0).map_err(db_error)?;
            if reason != "relinked" {
                insert_event(&mut tx, event).await?;
            }
            self.commit_events(tx).await?;
            Ok(true)
        })
        .await
    }

    async fn retry_grant_revocation(
        &self,
        pending: &PendingRevocation,
        next_attempt_at: OffsetDateTime,
    ) -> Result<(), BackendError> {
        crate::in_db_span(DB::NAME, "retry_grant_revocation", async move {
            let t = &pending.tokens;
            sqlx::query(
                "UPDATE platform_grant_revocations SET attempts = attempts + 1, \
                 next_attempt_at = $4, key_id = $5, access_token = $6, refresh_token = \
                 $7, token_expires_at = $8 WHERE user_id = $1 AND platform = $2 AND \
                 queued_at = $3",
            )
            .bind(pending.user_id)
            .bind(pending.platform.as_str())
            .bind(pending.queued_at)
            .bind(next_attempt_at)
            .bind(&t.key_id)
            .bind(&t.access)
            .bind(&t.refresh)
            .bind(t.expires_at)
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    async fn purge_platform_state(
        &self,
        now: OffsetDateTime,
        before: OffsetDateTime,
    ) -> Result<(), BackendError> {
        crate::in_db_span(DB::NAME, "purge_platform_state", async move {
            sqlx::query("DELETE FROM platform_link_states WHERE expires_at < $1")
                .bind(now)
                .execute(&self.pool)
                .await
                .map_err(db_error)?;
            sqlx::query("DELETE FROM webhook_messages WHERE received_at < $1")
                .bind(before)
                .execute(&self.pool)
                .await
                .map_err(db_error)?;
            Ok(())
        })
        .await
    }
}
