//! The service-account store: one body, compiled once per driver (see
//! `sql`).

use async_trait::async_trait;
use sqlx::{Database, Row as _, types::Json};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{DB, accounts::insert_event};
use crate::{
    accounts::service_accounts::{ServiceAccount, ServiceAccountStore},
    error::BackendError,
    events::OutboxEvent,
    sql::{SqlStore, db_error},
};

/// The columns [`account`] reads, in its order.
macro_rules! select_accounts {
    () => {
        "SELECT id, name, roles, secret_hash, created_at, secret_rotated_at FROM service_accounts"
    };
}

fn account(r: &<DB as Database>::Row) -> Result<(ServiceAccount, [u8; 32]), BackendError> {
    let hash: Vec<u8> = r.try_get(3).map_err(db_error)?;
    let hash: [u8; 32] = hash.try_into().map_err(|_| {
        BackendError::failed("database", "service_accounts.secret_hash is not 32 bytes")
    })?;
    Ok((
        ServiceAccount {
            id: r.try_get(0).map_err(db_error)?,
            name: r.try_get(1).map_err(db_error)?,
            roles: r.try_get::<Json<Vec<String>>, _>(2).map_err(db_error)?.0,
            created_at: r.try_get(4).map_err(db_error)?,
            secret_rotated_at: r.try_get(5).map_err(db_error)?,
        },
        hash,
    ))
}

#[async_trait]
impl ServiceAccountStore for SqlStore<DB> {
    async fn insert_service_account(
        &self,
        a: &ServiceAccount,
        secret_hash: &[u8; 32],
        event: &OutboxEvent,
    ) -> Result<bool, BackendError> {
        crate::in_db_span(DB::NAME, "insert_service_account", async move {
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            let inserted = sqlx::query(
                "INSERT INTO service_accounts (id, name, roles, secret_hash, created_at, \
                 secret_rotated_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO \
                 NOTHING",
            )
            .bind(a.id)
            .bind(&a.name)
            .bind(Json(&a.roles))
            .bind(&secret_hash[..])
            .bind(a.created_at)
            .bind(a.secret_rotated_at)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?
            .rows_affected();
            if inserted != 1 {
                return Ok(false);
            }
            insert_event(&mut tx, event).await?;
            self.commit_events(tx).await?;
            Ok(true)
        })
        .await
    }

    async fn service_accounts(&self) -> Result<Vec<ServiceAccount>, BackendError> {
        crate::in_db_span(DB::NAME, "service_accounts", async move {
            let rows = sqlx::query(concat!(select_accounts!(), " ORDER BY name"))
                .fetch_all(&self.pool)
                .await
                .map_err(db_error)?;
            rows.iter().map(|r| account(r).map(|(a, _)| a)).collect()
        })
        .await
    }

    async fn service_account(
        &self,
        id: Uuid,
    ) -> Result<Option<(ServiceAccount, [u8; 32])>, BackendError> {
        crate::in_db_span(DB::NAME, "service_account", async move {
            let row = sqlx::query(concat!(select_accounts!(), " WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(db_error)?;
            row.as_ref().map(account).transpose()
        })
        .await
    }

    async fn set_service_secret(
        &self,
        id: Uuid,
        secret_hash: &[u8; 32],
        at: OffsetDateTime,
        event: &OutboxEvent,
    ) -> Result<bool, BackendError> {
        crate::in_db_span(DB::NAME, "set_service_secret", async move {
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            let updated = sqlx::query(
                "UPDATE service_accounts SET secret_hash = $2, secret_rotated_at = $3 \
                WHERE id = $1",
            )
            .bind(id)
            .bind(&secret_hash[..])
            .bind(at)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?
            .rows_affected();
            if updated != 1 {
                return Ok(false);
            }
            insert_event(&mut tx, event).await?;
            self.commit_events(tx).await?;
            Ok(true)
        })
        .await
    }

    async fn confirm_service_secret(
        &self,
        id: Uuid,
        secret_hash: &[u8; 32],
    ) -> Result<bool, BackendError> {
        crate::in_db_span(DB::NAME, "confirm_service_secret", async move {
            // A write, not a read: it waits on a rotation holding the row
            // and then sees the committed secret (PostgreSQL re-checks the
            // condition on the new row; SQLite has one writer at a time).
            let confirmed = sqlx::query(
                "UPDATE service_accounts SET secret_hash = secret_hash \
                 WHERE id = $1 AND secret_hash = $2",
            )
            .bind(id)
            .bind(&secret_hash[..])
            .execute(&self.pool)
            .await
            .map_err(db_error)?
            .rows_affected();
            Ok(confirmed == 1)
        })
        .await
    }

    async fn delete_service_account(
        &self,
        id: Uuid,
        event: &OutboxEvent,
    ) -> Result<bool, BackendError> {
        crate::in_db_span(DB::NAME, "delete_service_account", async move {
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            let deleted = sqlx::query("DELETE FROM service_accounts WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?
                .rows_affected();
            if deleted != 1 {
                return Ok(false);
            }
            insert_event(&mut tx, event).await?;
            self.commit_events(tx).await?;
            Ok(true)
        })
        .await
    }
}
