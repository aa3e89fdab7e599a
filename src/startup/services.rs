//! The backends and use cases, built once from the configuration: the
//! server's ([`Services`]) and the event worker's ([`WorkerServices`]).

use super::*;

/// The backends and use cases, without listeners: what `serve` and the
/// `events` worker both run on.
pub struct Services {
    pub accounts: Arc<AccountService>,
    pub service_accounts: Arc<ServiceAccounts>,
    pub revocation_feed: Arc<RevocationFeed>,
    pub platforms: Arc<PlatformService>,
    pub tokens: Arc<TokenService>,
    pub authorizer: Arc<Authorizer>,
    /// Per-session call limits (`rpc.session_limits`), on the same
    /// rate-limit store as ext_authz's.
    pub session_limiter: Arc<RateLimiter>,
    pub database: Database,
    pub redis: Option<RedisStore>,
}

impl Services {
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        // The metrics recorder before anything that counts: hot paths hold
        // their handles from first use (`auth_domain::held_counter!`).
        let _ = crate::telemetry::metrics_handle();
        let database = open_database(&config.database()).await?;
        let fast = open_fast_state(&config.fast_state()).await?;
        let revocations = revocations(config, fast.revocations);
        let tokens = Arc::new(
            TokenService::new(
                config.tokens.clone(),
                config.keys_dir(),
                database.sessions.clone(),
                revocations,
            )
            .context("loading signing keys")?,
        );
        let lockout = LoginLockout::new(fast.failures.clone(), config.lockout.clone());
        let accounts = account_service(config, &database, fast.failures, tokens.clone()).await?;
        let limiter = RateLimiter::new(
            fast.quota.clone(),
            config.authz.rate_limit_fail_open,
            config.authz.rate_limit_capacity,
        );
        let session_limiter = RateLimiter::new(
            fast.quota,
            config.authz.rate_limit_fail_open,
            config.authz.rate_limit_capacity,
        );
        let authorizer = Arc::new(
            Authorizer::new(&config.authz, tokens.clone(), limiter).context("authz.routes")?,
        );
        let vault = Vault::load(
            &config.platform_keys_dir(),
            config.platforms.current_key_id.as_deref(),
            config.platforms.generate_key_if_missing,
        )
        .context("loading the platform-token vault keys (platforms.keys_dir)")?;
        let platforms = Arc::new(PlatformService::new(
            database.platforms.clone(),
            Arc::new(vault),
            &config.platforms,
            auth_platform_http::configured(&config.platforms).context("platforms")?,
        ));
        Ok(Self {
            session_limiter: Arc::new(session_limiter),
            service_accounts: Arc::new(ServiceAccounts::new(
                database.service_accounts.clone(),
                tokens.clone(),
                lockout,
                database.users.clone(),
            )),
            revocation_feed: RevocationFeed::new(
                database.revocation_log.clone(),
                Duration::from_secs(config.revocation.log_retention_secs),
            ),
            accounts,
            platforms,
            tokens,
            authorizer,
            database,
            redis: fast.redis,
        })
    }
}

/// The revocation state on `store`, with this configuration's cache.
pub(super) fn revocations(
    config: &Config,
    store: Arc<dyn crate::revocation::RevocationStore>,
) -> Revocations {
    Revocations::new(
        store,
        config.revocation.cache_capacity,
        Duration::from_millis(config.revocation.cache_ttl_ms),
        config.tokens.access_ttl_secs,
    )
}

/// The account service on `tokens`.
pub(super) async fn account_service(
    config: &Config,
    database: &Database,
    failures: Arc<dyn crate::ratelimit::FailureCounter>,
    tokens: Arc<TokenService>,
) -> anyhow::Result<Arc<AccountService>> {
    let hasher = PasswordHasher::with_admission(
        &config.password,
        config.hash_workers(),
        config.hash_admission(),
    )
    .await
    .context("argon2 parameters (password.*)")?;
    let lockout = LoginLockout::new(failures, config.lockout.clone());
    Ok(Arc::new(AccountService::new(
        database.users.clone(),
        hasher,
        lockout,
        tokens,
        config.password.clone(),
    )))
}

/// What the `events` worker runs on: the outbox and the account service
/// its lifecycle consumer revokes through. The worker parses broker data
/// in a C library, so it is given no key material: its token service holds
/// no signing key (it signs and verifies nothing) and no platform-token
/// vault is opened. Neither key directory is read, nor a key generated.
pub struct WorkerServices {
    pub database: Database,
    pub accounts: Arc<AccountService>,
}

impl WorkerServices {
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        // The metrics recorder before anything that counts: hot paths hold
        // their handles from first use (`auth_domain::held_counter!`).
        let _ = crate::telemetry::metrics_handle();
        let database = open_database(&config.database()).await?;
        let fast = open_fast_state(&config.fast_state()).await?;
        let revocations = revocations(config, fast.revocations);
        let tokens = Arc::new(TokenService::without_keys(
            config.tokens.clone(),
            database.sessions.clone(),
            revocations,
        ));
        let accounts = account_service(config, &database, fast.failures, tokens).await?;
        Ok(Self { database, accounts })
    }
}
