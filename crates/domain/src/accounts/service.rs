//! The account use cases. Inputs arrive as raw strings and are parsed here
//! into the model's types; every violation of a request is reported at once.

use std::sync::Arc;

use secrecy::SecretString;
use uuid::Uuid;

use super::{
    AccountError,
    hold::RefusalHold,
    model::{Email, LoginName, Password, Role, User, UserStatus, Username, normalise_roles},
    password::{Admission, HashError, PasswordHasher},
    store::{InsertUserError, UserStore},
};
use crate::{
    accounts::config::PasswordConfig,
    error::{FieldViolation, Violations},
    events::{OutboxEvent, RequestContext},
    ratelimit::{Attempt, LoginLockout},
    tokens::{Principal, TokenPair, TokenService},
};

/// Proof that the caller holds the admin role. Only [`AdminCaller::check`]
/// and [`AdminCaller::peer`] make one, and every admin operation takes one,
/// so code that did not check cannot call them.
#[derive(Debug, Clone)]
pub enum AdminCaller {
    /// An access token holding `admin` (a user or a service account).
    Token(Principal),
    /// A client-certificate identity configured with `admin` (an operator
    /// tool): it acts as no account.
    Operator(String),
}

impl AdminCaller {
    pub fn check(principal: Principal) -> Result<Self, AccountError> {
        if principal.has_role(Role::ADMIN) {
            Ok(Self::Token(principal))
        } else {
            Err(AccountError::Forbidden)
        }
    }

    /// A client-certificate identity whose configured roles hold `admin`.
    pub fn peer(identity: &str, roles: &[String]) -> Result<Self, AccountError> {
        if !roles.iter().any(|r| r == Role::ADMIN) {
            return Err(AccountError::Forbidden);
        }
        tracing::info!(identity, "admin call by a service identity");
        Ok(Self::Operator(identity.to_owned()))
    }

    /// Who the events record as `by`: the account, or for an operator the
    /// nil id (the event schema's "no account"; see the README).
    pub fn by(&self) -> Uuid {
        match self {
            Self::Token(principal) => principal.user_id,
            Self::Operator(_) => Uuid::nil(),
        }
    }

    /// Who is asking, for logs: an account id or an identity.
    pub fn name(&self) -> String {
        match self {
            Self::Token(principal) => principal.user_id.to_string(),
            Self::Operator(identity) => identity.clone(),
        }
    }
}

pub struct AccountService {
    users: Arc<dyn UserStore>,
    hasher: PasswordHasher,
    lockout: LoginLockout,
    tokens: Arc<TokenService>,
    policy: PasswordConfig,
    refusals: RefusalHold,
}

/// A refusal of the hashing queue is an overload answer, not an internal
/// error.
fn overloaded(error: HashError) -> AccountError {
    match error {
        HashError::Overloaded { retry_after } => AccountError::Overloaded { retry_after },
        other => AccountError::Hash(other),
    }
}

/// A login refused because hashing is at capacity (counted as such).
fn login_overloaded(retry_after: std::time::Duration) -> AccountError {
    metrics::counter!("login_attempts_total", "outcome" => "overloaded").increment(1);
    AccountError::Overloaded { retry_after }
}

fn parse_user_id(raw: &str) -> Result<Uuid, AccountError> {
    Uuid::parse_str(raw.trim())
        .map_err(|_| AccountError::Invalid(vec![FieldViolation::new("user_id", "must be a UUID")]))
}

impl AccountService {
    pub fn new(
        users: Arc<dyn UserStore>,
        hasher: PasswordHasher,
        lockout: LoginLockout,
        tokens: Arc<TokenService>,
        policy: PasswordConfig,
    ) -> Self {
        Self {
            users,
            hasher,
            lockout,
            tokens,
            refusals: RefusalHold::new(policy.refusal_hold(), policy.max_held_refusals),
            policy,
        }
    }

    /// Hashing admission for a request without a device lane.
    fn admission(ctx: &RequestContext) -> Admission {
        Admission {
            source: ctx.client_ip.as_deref().map(Arc::from),
            known_device: false,
            deadline: ctx.deadline,
        }
    }

    fn new_password(&self, field: &'static str, raw: &str) -> Result<Password, FieldViolation> {
        Password::parse(field, raw, self.policy.min_length, self.policy.max_length)
    }

    /// A password as typed at login: only the upper bound applies (a
    /// too-short one is simply wrong, and saying so would leak the policy of
    /// older accounts).
    fn presented_password(
        &self,
        field: &'static str,
        raw: &str,
    ) -> Result<Password, FieldViolation> {
        Password::parse(field, raw, 1, self.policy.max_length)
    }

    /// Signs a new account up. Refused at capacity, the answer is held
    /// ([`RefusalHold`]).
    #[tracing::instrument(skip_all)]
    pub async fn sign_up(
        &self,
        email: &str,
        username: &str,
        password: &str,
        ctx: &RequestContext,
    ) -> Result<User, AccountError> {
        let arrived = std::time::Instant::now();
        let mut result = self.try_sign_up(email, username, password, ctx).await;
        self.hold_refusal(&mut result, arrived, ctx).await;
        result
    }

    /// Holds a refusal that cost no hashing until `hold` after the call
    /// `arrived`, so a closed-loop client cannot spin on it.
    /// The refusal's `retry_after` counts from its answer: the time held is
    /// taken off it (never below a second).
    async fn hold_refusal<T>(
        &self,
        result: &mut Result<T, AccountError>,
        arrived: std::time::Instant,
        ctx: &RequestContext,
    ) {
        if let Err(
            AccountError::Overloaded { retry_after } | AccountError::LockedOut { retry_after },
        ) = result
        {
            let held = self.refusals.refusal(arrived, ctx.deadline).await;
            *retry_after = retry_after
                .saturating_sub(held)
                .max(std::time::Duration::from_secs(1));
        }
    }

    async fn try_sign_up(
        &self,
        email: &str,
        username: &str,
        password: &str,
        ctx: &RequestContext,
    ) -> Result<User, AccountError> {
        let mut violations = Violations::default();
        let email = violations.check(Email::parse("email", email));
        let username = violations.check(Username::parse("username", username));
        let password = violations.check(self.new_password("password", password));
        violations.finish().map_err(AccountError::Invalid)?;
        let (Some(email), Some(username), Some(password)) = (email, username, password) else {
            unreachable!("finish() fails when any field was refused")
        };
        let hash = self
            .hasher
            .hash(&password, &Self::admission(ctx))
            .await
            .map_err(overloaded)?;
        let user = User {
            id: Uuid::now_v7(),
            email,
            username,
            roles: vec![Role::user()],
            status: UserStatus::Active,
            created_at: crate::now_micros(),
        };
        let event = OutboxEvent::user_created(&user, ctx);
        match self.users.insert_user(&user, &hash, &event).await {
            Ok(()) => {
                tracing::info!(user_id = %user.id, "user created");
                Ok(user)
            }
            Err(InsertUserError::Conflict(field)) => Err(AccountError::AlreadyExists(field)),
            Err(InsertUserError::Backend(e)) => Err(e.into()),
        }
    }

    /// Logs in with a password (and a device token, when the device has
    /// logged in to this account before). Refused without hashing (at
    /// capacity, locked out), the answer is held ([`RefusalHold`]).
    #[tracing::instrument(skip_all, fields(client_ip = ctx.client_ip.as_deref().unwrap_or("-")))]
    pub async fn login(
        &self,
        login: &str,
        password: &str,
        device_token: &str,
        ctx: &RequestContext,
    ) -> Result<TokenPair, AccountError> {
        let arrived = std::time::Instant::now();
        let mut result = self.try_login(login, password, device_token, ctx).await;
        self.hold_refusal(&mut result, arrived, ctx).await;
        result
    }

    async fn try_login(
        &self,
        login: &str,
        password: &str,
        device_token: &str,
        ctx: &RequestContext,
    ) -> Result<TokenPair, AccountError> {
        let mut violations = Violations::default();
        let login = violations.check(LoginName::parse("login", login));
        let password = violations.check(self.presented_password("password", password));
        violations.finish().map_err(AccountError::Invalid)?;
        let (Some(login), Some(password)) = (login, password) else {
            unreachable!("finish() fails when any field was refused")
        };
        let client_ip = ctx.client_ip.as_deref().unwrap_or("unknown");
        let mut admission = Self::admission(ctx);
        // Under overload an attempt without a device token is refused before
        // it costs a database read (with one, the token must be checked
        // against the account first).
        if device_token.is_empty() && !self.hasher.admissible(&admission) {
            return Err(login_overloaded(self.hasher.retry_after()));
        }

        let credentials = self.users.find_credentials(&login).await?;
        // A device that logged in to this very account before has a lane of
        // its own: counted apart from failures elsewhere, hashed first.
        let device = match &credentials {
            Some(c) if !device_token.is_empty() => {
                self.tokens
                    .trusted_device(device_token, c.user.id, c.security_version)
            }
            _ => None,
        };
        let attempt = device.map_or(Attempt::From(client_ip), Attempt::KnownDevice);
        // Counted as a failure before the hash, so parallel attempts cannot
        // all pass the limit's last free place.
        if let Err(locked) = self.lockout.reserve(&login, attempt).await {
            metrics::counter!("login_attempts_total", "outcome" => "locked_out").increment(1);
            return Err(locked.into());
        }
        admission.known_device = device.is_some();
        // Verify even when there is no account (against a dummy hash) so
        // both cases take the same time.
        let verification = match self
            .hasher
            .verify(
                &password,
                credentials.as_ref().map(|c| c.password_hash.as_str()),
                &admission,
            )
            .await
        {
            Err(HashError::Overloaded { retry_after }) => {
                // Not tried: not a failure.
                self.lockout.release(&login, attempt).await?;
                return Err(login_overloaded(retry_after));
            }
            other => other?,
        };
        let Some(credentials) = credentials.filter(|_| verification.matches) else {
            let user_id = None;
            self.users
                .append_event(&OutboxEvent::login_failed(user_id, "bad_credentials", ctx))
                .await?;
            metrics::counter!("login_attempts_total", "outcome" => "bad_credentials").increment(1);
            return Err(AccountError::InvalidCredentials);
        };
        self.lockout.record_success(&login, attempt).await?;
        let user = credentials.user;
        if user.status != UserStatus::Active {
            self.users
                .append_event(&OutboxEvent::login_failed(
                    Some(user.id),
                    "account_not_active",
                    ctx,
                ))
                .await?;
            metrics::counter!("login_attempts_total", "outcome" => "disabled").increment(1);
            return Err(AccountError::Disabled);
        }
        if verification.needs_rehash {
            // Best effort: the login stands even if the upgrade fails.
            match self.hasher.hash(&password, &admission).await {
                Ok(new_hash) => {
                    if let Err(error) = self
                        .users
                        .upgrade_password_hash(user.id, &credentials.password_hash, &new_hash)
                        .await
                    {
                        tracing::warn!(user_id = %user.id, %error, "password hash upgrade failed");
                    }
                }
                Err(error) => tracing::warn!(user_id = %user.id, %error, "password rehash failed"),
            }
        }
        let user_id = user.id;
        let version = credentials.security_version;
        // The session is created only if the account is still as read
        // above: a password change, suspension, role change or "revoke all"
        // that committed meanwhile makes this login fail (Aborted).
        crate::pause::point("login.before_session").await;
        let mut pair = self.tokens.start_session(user, version, ctx).await?;
        pair.device_token = Some(self.tokens.issue_device_token(user_id, version)?);
        metrics::counter!("login_attempts_total", "outcome" => "success").increment(1);
        tracing::info!(user_id = %pair.user.id, "login succeeded");
        Ok(pair)
    }

    pub async fn refresh(
        &self,
        refresh_token: &str,
        ctx: &RequestContext,
    ) -> Result<TokenPair, AccountError> {
        if refresh_token.trim().is_empty() {
            return Err(AccountError::Invalid(vec![FieldViolation::new(
                "refresh_token",
                "is required",
            )]));
        }
        // 43 base64url characters; anything much longer is not ours.
        if refresh_token.len() > 128 {
            return Err(AccountError::Token(
                crate::tokens::TokenError::InvalidRefresh,
            ));
        }
        Ok(self
            .tokens
            .refresh(&SecretString::from(refresh_token.to_owned()), ctx)
            .await?)
    }

    pub async fn me(&self, caller: &Principal) -> Result<User, AccountError> {
        self.users
            .find_user(caller.user_id)
            .await?
            .ok_or(AccountError::NotFound)
    }

    #[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
    pub async fn change_password(
        &self,
        caller: &Principal,
        current: &str,
        new: &str,
        ctx: &RequestContext,
    ) -> Result<(), AccountError> {
        let mut violations = Violations::default();
        let current = violations.check(self.presented_password("current_password", current));
        let new = violations.check(self.new_password("new_password", new));
        violations.finish().map_err(AccountError::Invalid)?;
        let (Some(current), Some(new)) = (current, new) else {
            unreachable!("finish() fails when any field was refused")
        };
        let credentials = self
            .users
            .find_credentials_by_id(caller.user_id)
            .await?
            .ok_or(AccountError::NotFound)?;
        let admission = Self::admission(ctx);
        // `current_password` is a secret check like a login's: the same
        // lockout (by the account's username and the client's address,
        // reserved before hashing) and the same audit event.
        let subject = LoginName::Username(credentials.user.username.clone());
        let attempt = Attempt::From(ctx.client_ip.as_deref().unwrap_or("unknown"));
        self.lockout.reserve(&subject, attempt).await?;
        let verification = match self
            .hasher
            .verify(&current, Some(&credentials.password_hash), &admission)
            .await
        {
            Err(error) => {
                self.lockout.release(&subject, attempt).await?;
                return Err(overloaded(error));
            }
            Ok(v) => v,
        };
        if !verification.matches {
            self.users
                .append_event(&OutboxEvent::login_failed(
                    Some(caller.user_id),
                    "bad_current_password",
                    ctx,
                ))
                .await?;
            metrics::counter!("login_attempts_total", "outcome" => "bad_current_password")
                .increment(1);
            return Err(AccountError::InvalidCredentials);
        }
        self.lockout.record_success(&subject, attempt).await?;
        let hash = self
            .hasher
            .hash(&new, &admission)
            .await
            .map_err(overloaded)?;
        // Revoke first: if the database write then fails, the user only has
        // to log in again; the other order could leave old tokens alive.
        self.tokens
            .revocations()
            .revoke_user(caller.user_id)
            .await?;
        let event = OutboxEvent::password_changed(caller.user_id, ctx);
        if !self
            .users
            .change_password(caller.user_id, &hash, &event)
            .await?
        {
            return Err(AccountError::NotFound);
        }
        self.tokens.revoke_user_after_change(caller.user_id).await;
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(admin = %admin.name()))]
    pub async fn suspend(
        &self,
        admin: &AdminCaller,
        user_id: &str,
        reason: &str,
        ctx: &RequestContext,
    ) -> Result<User, AccountError> {
        let user_id = parse_user_id(user_id)?;
        if reason.len() > 512 {
            return Err(AccountError::Invalid(vec![FieldViolation::new(
                "reason",
                "must be at most 512 bytes",
            )]));
        }
        self.tokens.revocations().revoke_user(user_id).await?;
        let event = OutboxEvent::user_suspended(user_id, admin.by(), reason, ctx);
        let user = self
            .users
            .set_status(user_id, UserStatus::Suspended, &event)
            .await?
            .ok_or(AccountError::NotFound)?;
        self.tokens.revoke_user_after_change(user_id).await;
        tracing::info!(%user_id, "user suspended");
        Ok(user)
    }

    #[tracing::instrument(skip_all, fields(admin = %admin.name()))]
    pub async fn revoke_sessions(
        &self,
        admin: &AdminCaller,
        user_id: &str,
        ctx: &RequestContext,
    ) -> Result<u64, AccountError> {
        let user_id = parse_user_id(user_id)?;
        self.users
            .find_user(user_id)
            .await?
            .ok_or(AccountError::NotFound)?;
        let event = OutboxEvent::sessions_revoked(user_id, Some(admin.by()), "admin", ctx);
        Ok(self.tokens.end_all_sessions(user_id, &event).await?)
    }

    #[tracing::instrument(skip_all, fields(admin = %admin.name()))]
    pub async fn set_roles(
        &self,
        admin: &AdminCaller,
        user_id: &str,
        roles: &[String],
        ctx: &RequestContext,
    ) -> Result<User, AccountError> {
        let mut violations = Violations::default();
        let user_id = violations.check(
            parse_user_id(user_id).map_err(|_| FieldViolation::new("user_id", "must be a UUID")),
        );
        if roles.len() > 32 {
            violations.push(FieldViolation::new("roles", "at most 32 roles"));
        }
        let parsed: Vec<Role> = roles
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                violations.check(
                    Role::parse("roles", r)
                        .map_err(|v| FieldViolation::new(format!("roles[{i}]"), v.description)),
                )
            })
            .collect();
        violations.finish().map_err(AccountError::Invalid)?;
        let Some(user_id) = user_id else {
            unreachable!("finish() fails when any field was refused")
        };
        let roles = normalise_roles(parsed);
        self.tokens.revocations().revoke_user(user_id).await?;
        let event = OutboxEvent::roles_changed(user_id, admin.by(), &roles, ctx);
        let user = self
            .users
            .set_roles(user_id, &roles, &event)
            .await?
            .ok_or(AccountError::NotFound)?;
        self.tokens.revoke_user_after_change(user_id).await;
        Ok(user)
    }

    /// Applies a lifecycle change reported by another service: the status,
    /// every session revoked, and the event. Idempotent: `false` when the
    /// user already has that status.
    pub async fn apply_lifecycle(
        &self,
        user_id: Uuid,
        status: UserStatus,
        source: &str,
        ctx: &RequestContext,
    ) -> Result<bool, AccountError> {
        let user = self
            .users
            .find_user(user_id)
            .await?
            .ok_or(AccountError::NotFound)?;
        if user.status == status {
            return Ok(false);
        }
        self.tokens.revocations().revoke_user(user_id).await?;
        let event = OutboxEvent::lifecycle(user_id, status == UserStatus::Deleted, source, ctx);
        self.users
            .set_status(user_id, status, &event)
            .await?
            .ok_or(AccountError::NotFound)?;
        self.tokens.revoke_user_after_change(user_id).await;
        tracing::info!(%user_id, status = status.as_str(), source, "lifecycle event applied");
        Ok(true)
    }
}

/// The port the Kafka side's lifecycle consumer calls: applies a lifecycle
/// change another service reported (see
/// [`AccountService::apply_lifecycle`]). The consumer knows this and
/// nothing else of the domain's use cases.
#[async_trait::async_trait]
pub trait UserLifecycle: Send + Sync + 'static {
    /// `Ok(false)` when the user already has that status;
    /// [`AccountError::NotFound`] for a user this service does not know.
    async fn apply_lifecycle(
        &self,
        user_id: Uuid,
        status: UserStatus,
        source: &str,
        ctx: &RequestContext,
    ) -> Result<bool, AccountError>;
}

#[async_trait::async_trait]
impl UserLifecycle for AccountService {
    async fn apply_lifecycle(
        &self,
        user_id: Uuid,
        status: UserStatus,
        source: &str,
        ctx: &RequestContext,
    ) -> Result<bool, AccountError> {
        AccountService::apply_lifecycle(self, user_id, status, source, ctx).await
    }
}
