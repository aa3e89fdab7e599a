//! Service accounts, for callers outside the mesh (no client certificate):
//! an admin creates one with roles and gets its secret once; the service
//! exchanges id + secret for a short-lived access token (OAuth 2.0 client
//! credentials semantics) that is verified and revoked by the same code as
//! user tokens (`sub` is the account id). Secrets are 256-bit randoms stored
//! only as SHA-256 and compared in constant time. Rotating the secret or
//! deleting the account revokes every token it was issued.

use std::sync::Arc;

use async_trait::async_trait;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    AccountError,
    model::{Role, normalise_roles},
    service::AdminCaller,
};
use crate::{
    accounts::store::UserStore,
    error::{BackendError, FieldViolation, Violations},
    events::{EventType, OutboxEvent, RequestContext},
    ratelimit::{Attempt, LoginLockout, ServiceSecret},
    tokens::TokenService,
};

/// Secrets start with this, so a leaked one is recognisable (secret
/// scanners) and never mistaken for a JWT.
const SECRET_PREFIX: &str = "ivsa_";

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceAccount {
    pub id: Uuid,
    pub name: String,
    pub roles: Vec<String>,
    pub created_at: OffsetDateTime,
    pub secret_rotated_at: OffsetDateTime,
}

#[async_trait]
pub trait ServiceAccountStore: Send + Sync + 'static {
    /// False when the name is taken. Every change writes its event in the
    /// same transaction (the outbox), and only when it happened.
    async fn insert_service_account(
        &self,
        account: &ServiceAccount,
        secret_hash: &[u8; 32],
        event: &OutboxEvent,
    ) -> Result<bool, BackendError>;
    async fn service_accounts(&self) -> Result<Vec<ServiceAccount>, BackendError>;
    async fn service_account(
        &self,
        id: Uuid,
    ) -> Result<Option<(ServiceAccount, [u8; 32])>, BackendError>;
    async fn set_service_secret(
        &self,
        id: Uuid,
        secret_hash: &[u8; 32],
        at: OffsetDateTime,
        event: &OutboxEvent,
    ) -> Result<bool, BackendError>;
    async fn delete_service_account(
        &self,
        id: Uuid,
        event: &OutboxEvent,
    ) -> Result<bool, BackendError>;
    /// The write a token issue rests on: true if the account still has
    /// `secret_hash`, in a write ordered with rotations and deletions by
    /// the account's row. A rotation that committed first makes it false;
    /// one that commits after it takes its revocation's time later than
    /// this write.
    async fn confirm_service_secret(
        &self,
        id: Uuid,
        secret_hash: &[u8; 32],
    ) -> Result<bool, BackendError>;
}

/// A service token as IssueServiceToken returns it.
#[derive(Debug)]
pub struct ServiceToken {
    pub access_token: SecretString,
    pub expires_in: i64,
    pub account: ServiceAccount,
}

pub struct ServiceAccounts {
    store: Arc<dyn ServiceAccountStore>,
    tokens: Arc<TokenService>,
    /// A secret check is throttled like a login: per (account, address),
    /// per address and per account, reserved before it is compared.
    lockout: LoginLockout,
    /// Where a refused secret is audited (`login_failed`).
    audit_log: Arc<dyn UserStore>,
}

fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn new_secret() -> (SecretString, [u8; 32]) {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).expect("the OS random source works");
    let secret = format!("{SECRET_PREFIX}{}", URL_SAFE_NO_PAD.encode(raw));
    let digest = hash(&secret);
    (SecretString::from(secret), digest)
}

fn parse_id(raw: &str) -> Result<Uuid, AccountError> {
    Uuid::parse_str(raw.trim())
        .map_err(|_| AccountError::Invalid(vec![FieldViolation::new("id", "must be a UUID")]))
}

/// The audit event of a change to `account` made by `admin` (the nil id for
/// an operator's client-certificate identity).
fn audit(
    event_type: EventType,
    account: &ServiceAccount,
    admin: &AdminCaller,
    ctx: &RequestContext,
) -> OutboxEvent {
    OutboxEvent::service_account(
        event_type,
        account.id,
        &account.name,
        &account.roles,
        admin.by(),
        ctx,
    )
}

impl ServiceAccounts {
    pub fn new(
        store: Arc<dyn ServiceAccountStore>,
        tokens: Arc<TokenService>,
        lockout: LoginLockout,
        audit_log: Arc<dyn UserStore>,
    ) -> Self {
        Self {
            store,
            tokens,
            lockout,
            audit_log,
        }
    }

    /// The account `id` names, or NotFound.
    async fn existing(&self, id: &str) -> Result<ServiceAccount, AccountError> {
        let id = parse_id(id)?;
        self.store
            .service_account(id)
            .await?
            .map(|(account, _)| account)
            .ok_or(AccountError::NotFound)
    }

    /// Creates an account; its secret is returned here and never again.
    pub async fn create(
        &self,
        admin: &AdminCaller,
        name: &str,
        roles: &[String],
        ctx: &RequestContext,
    ) -> Result<(ServiceAccount, SecretString), AccountError> {
        let mut violations = Violations::default();
        let name = name.trim();
        if name.len() < 3
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            violations.push(FieldViolation::new(
                "name",
                "must be 3 to 64 characters of a-z, 0-9 and -",
            ));
        }
        let parsed: Vec<Role> = roles
            .iter()
            .filter_map(|r| violations.check(Role::parse("roles", r)))
            .collect();
        if roles.is_empty() {
            violations.push(FieldViolation::new(
                "roles",
                "at least one role is required",
            ));
        }
        violations.finish().map_err(AccountError::Invalid)?;
        let now = crate::now_micros();
        let account = ServiceAccount {
            id: Uuid::now_v7(),
            name: name.to_owned(),
            roles: normalise_roles(parsed)
                .iter()
                .map(|r| r.as_str().to_owned())
                .collect(),
            created_at: now,
            secret_rotated_at: now,
        };
        let (secret, digest) = new_secret();
        let event = audit(EventType::ServiceAccountCreated, &account, admin, ctx);
        if !self
            .store
            .insert_service_account(&account, &digest, &event)
            .await?
        {
            return Err(AccountError::AlreadyExists("name"));
        }
        tracing::info!(id = %account.id, name = account.name, "service account created");
        Ok((account, secret))
    }

    pub async fn list(&self, _admin: &AdminCaller) -> Result<Vec<ServiceAccount>, AccountError> {
        Ok(self.store.service_accounts().await?)
    }

    /// A new secret; the old one stops working and every token issued to
    /// the account is revoked.
    pub async fn rotate(
        &self,
        admin: &AdminCaller,
        id: &str,
        ctx: &RequestContext,
    ) -> Result<SecretString, AccountError> {
        let account = self.existing(id).await?;
        let id = account.id;
        let (secret, digest) = new_secret();
        let event = audit(EventType::ServiceAccountSecretRotated, &account, admin, ctx);
        if !self
            .store
            .set_service_secret(id, &digest, crate::now_micros(), &event)
            .await?
        {
            return Err(AccountError::NotFound);
        }
        // Committed: the old tokens end here at once and in the fast
        // state as soon as it answers (never a half-done change).
        self.tokens.revoke_user_after_change(id).await;
        Ok(secret)
    }

    /// Deletes the account and revokes every token it was issued.
    pub async fn delete(
        &self,
        admin: &AdminCaller,
        id: &str,
        ctx: &RequestContext,
    ) -> Result<(), AccountError> {
        let account = self.existing(id).await?;
        let id = account.id;
        let event = audit(EventType::ServiceAccountDeleted, &account, admin, ctx);
        if !self.store.delete_service_account(id, &event).await? {
            return Err(AccountError::NotFound);
        }
        // Committed: the old tokens end here at once and in the fast
        // state as soon as it answers (never a half-done change).
        self.tokens.revoke_user_after_change(id).await;
        Ok(())
    }

    /// Client credentials: id + secret → a short-lived access token with the
    /// account's roles. Any mismatch is the same Unauthenticated answer.
    pub async fn issue_token(
        &self,
        client_id: &str,
        client_secret: &str,
        ctx: &RequestContext,
    ) -> Result<ServiceToken, AccountError> {
        // The token's issue time is when the request read the account: a
        // rotation or deletion that commits after the read raises the
        // account's epoch past it, so the token dies with the old secret.
        let started = OffsetDateTime::now_utc();
        // Keyed by the id itself, whichever of its spellings was sent.
        let subject = match Uuid::parse_str(client_id.trim()) {
            Ok(id) => format!("service-account:{id}"),
            Err(_) => format!("service-account:{}", client_id.trim()),
        };
        let subject = ServiceSecret(&subject);
        let attempt = Attempt::From(ctx.client_ip.as_deref().unwrap_or("unknown"));
        self.lockout.reserve(&subject, attempt).await?;
        let presented = hash(client_secret);
        let found = match Uuid::parse_str(client_id.trim()) {
            Ok(id) => self.store.service_account(id).await?,
            Err(_) => None,
        };
        // Compared in constant time; an unknown id compares against zeros so
        // both paths cost the same.
        let (account, stored) = match found {
            Some((account, stored)) => (Some(account), stored),
            None => (None, [0u8; 32]),
        };
        let matches: bool = presented.ct_eq(&stored).into();
        let Some(account) = account.filter(|_| matches) else {
            metrics::counter!("service_tokens_total", "outcome" => "refused").increment(1);
            self.audit_log
                .append_event(&OutboxEvent::login_failed(None, "bad_service_secret", ctx))
                .await?;
            return Err(AccountError::InvalidCredentials);
        };
        self.lockout.record_success(&subject, attempt).await?;
        // The read above decided on a secret a rotation may be replacing
        // right now: the token rests on a write conditional on it (as a
        // login's session rests on the user's security version). Either
        // the rotation committed first and this refuses, or it commits
        // after and its revocation is logged later than `started`.
        crate::pause::point("service_token.before_confirm").await;
        if !self
            .store
            .confirm_service_secret(account.id, &stored)
            .await?
        {
            metrics::counter!("service_tokens_total", "outcome" => "refused").increment(1);
            return Err(AccountError::InvalidCredentials);
        }
        crate::pause::point("service_token.before_sign").await;
        let (access_token, expires_in) =
            self.tokens
                .issue_service_token(account.id, &account.roles, started)?;
        metrics::counter!("service_tokens_total", "outcome" => "issued").increment(1);
        Ok(ServiceToken {
            access_token,
            expires_in,
            account,
        })
    }
}

/// The secret's hash (tests read the table with it).
pub fn secret_hash(secret: &SecretString) -> [u8; 32] {
    hash(secret.expose_secret())
}
