//! Backends, chosen once at start-up from the configuration:
//!
//! | role | production | embedded default |
//! |---|---|---|
//! | accounts, sessions, outbox | PostgreSQL (`sql`) | SQLite (`sql`) |
//! | platform accounts, link states, webhook ids | PostgreSQL (`platforms`) | SQLite (`platforms`) |
//! | revocations, login counters | Redis (`redis`) | in process (`memory`) |

#![forbid(unsafe_code)]

pub mod config;
pub mod memory;
pub mod redis;
pub mod sentinel;
pub mod sql;

// The domain's modules, under the names the stores use.
use auth_domain::{
    accounts, backoff as events_backoff, child_span, error, events, pause, ratelimit, revocation,
    tokens, unix_now,
};

use std::{str::FromStr, sync::Arc, time::Duration};

use anyhow::Context as _;
use async_trait::async_trait;
use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

use self::{
    memory::{MemoryFailureCounter, MemoryRevocations},
    redis::RedisStore,
    sql::SqlStore,
};
use crate::{
    accounts::{service_accounts::ServiceAccountStore, store::UserStore},
    config::{DatabaseConfig, FastStateConfig, Migrations},
    error::BackendError,
    events::{OutboxReader, RelayStore},
    ratelimit::{
        FailureCounter,
        quota::{MemoryQuota, QuotaStore},
    },
    revocation::{RevocationStore, feed::RevocationLog},
    tokens::store::SessionStore,
};
use auth_domain::platforms::store::PlatformStore;

pub use auth_domain::health::Ping;

#[async_trait]
impl Ping for RedisStore {
    async fn ping(&self) -> Result<(), BackendError> {
        RedisStore::ping(self).await
    }
}

/// The database roles, all served by one store.
#[derive(Clone)]
pub struct Database {
    pub users: Arc<dyn UserStore>,
    pub sessions: Arc<dyn SessionStore>,
    pub outbox: Arc<dyn OutboxReader>,
    pub relay: Arc<dyn RelayStore>,
    pub platforms: Arc<dyn PlatformStore>,
    pub revocation_log: Arc<dyn RevocationLog>,
    pub service_accounts: Arc<dyn ServiceAccountStore>,
    pub health: Arc<dyn Ping>,
}

impl Database {
    fn from_store<
        S: UserStore
            + SessionStore
            + OutboxReader
            + RelayStore
            + PlatformStore
            + RevocationLog
            + ServiceAccountStore
            + Ping,
    >(
        store: S,
    ) -> Self {
        let store = Arc::new(store);
        Self {
            users: store.clone(),
            sessions: store.clone(),
            outbox: store.clone(),
            relay: store.clone(),
            platforms: store.clone(),
            revocation_log: store.clone(),
            service_accounts: store.clone(),
            health: store,
        }
    }
}

/// Connects to the configured database and brings its schema in step as
/// `database_migrations` says: applies pending migrations (`apply`), or
/// waits until someone else has (`wait`).
pub async fn open_database(config: &DatabaseConfig) -> anyhow::Result<Database> {
    let pool = SqlPool::connect(config).await?;
    match config.migrations {
        Migrations::Apply => {
            pool.apply_migrations().await?;
        }
        Migrations::Wait => {
            pool.wait_for_migrations(config.migrations_wait).await?;
        }
    }
    Ok(pool.into_database())
}

/// `auth-service migrate`: applies every pending migration and returns the
/// versions it applied (none when the schema was current).
pub async fn migrate(config: &DatabaseConfig) -> anyhow::Result<Vec<i64>> {
    SqlPool::connect(config).await?.apply_migrations().await
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

/// How long start-up tries to reach PostgreSQL through slow or failed
/// attempts (each bounded by `database_timeout_ms`).
const STARTUP_CONNECT_WINDOW: Duration = Duration::from_secs(15);
const STARTUP_CONNECT_PAUSE: Duration = Duration::from_millis(250);

/// How often a server in `wait` mode looks at the schema again.
const MIGRATION_POLL: Duration = Duration::from_secs(2);

enum SqlPool {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl SqlPool {
    async fn connect(config: &DatabaseConfig) -> anyhow::Result<Self> {
        let url = &config.url;
        if url.starts_with("sqlite:") {
            std::fs::create_dir_all(&config.data_dir)
                .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
            let options = SqliteConnectOptions::from_str(url)
                .context("database_url (AUTH_DATABASE_URL) is not a valid SQLite URL")?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .foreign_keys(true)
                .busy_timeout(Duration::from_secs(5));
            let pool = SqlitePoolOptions::new()
                .max_connections(config.max_connections.min(4))
                .acquire_timeout(config.acquire_timeout)
                .connect_with(options)
                .await
                .context("opening the SQLite database")?;
            Ok(Self::Sqlite(pool))
        } else {
            let options = PgConnectOptions::from_str(url)
                .context("database_url (AUTH_DATABASE_URL) is not a valid PostgreSQL URL")?;
            let pool = PgPoolOptions::new()
                .max_connections(config.max_connections)
                .acquire_timeout(config.acquire_timeout)
                .connect_lazy_with(options);
            // The first connection may be slow (a server starting, a loaded
            // node, a TLS handshake) or fail on the network: tried again
            // within a window instead of ending the process on one slow
            // attempt. Anything else (refused credentials, a missing
            // database) ends it at once.
            let started = std::time::Instant::now();
            loop {
                match pool.acquire().await {
                    Ok(_) => break,
                    Err(
                        error @ (sqlx::Error::PoolTimedOut
                        | sqlx::Error::Io(_)
                        | sqlx::Error::Tls(_)),
                    ) if started.elapsed() < STARTUP_CONNECT_WINDOW => {
                        tracing::warn!(%error, "PostgreSQL not reached yet; trying again");
                        tokio::time::sleep(STARTUP_CONNECT_PAUSE).await;
                    }
                    Err(error) => {
                        return Err(error).context("connecting to PostgreSQL (AUTH_DATABASE_URL)");
                    }
                }
            }
            Ok(Self::Postgres(pool))
        }
    }

    fn migrator(&self) -> &'static sqlx::migrate::Migrator {
        match self {
            Self::Sqlite(_) => &SQLITE_MIGRATIONS,
            Self::Postgres(_) => &POSTGRES_MIGRATIONS,
        }
    }

    /// Versions this binary knows and the database has not applied.
    async fn pending(&self) -> anyhow::Result<Vec<i64>> {
        const APPLIED: &str = "SELECT version FROM _sqlx_migrations WHERE success";
        let applied: Result<Vec<i64>, sqlx::Error> = match self {
            Self::Sqlite(pool) => sqlx::query_scalar(APPLIED).fetch_all(pool).await,
            Self::Postgres(pool) => sqlx::query_scalar(APPLIED).fetch_all(pool).await,
        };
        let applied = match applied {
            Ok(applied) => applied,
            // No bookkeeping table yet: nothing is applied.
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("42P01")
                    || e.message().contains("no such table") =>
            {
                Vec::new()
            }
            Err(e) => return Err(e).context("reading the applied schema migrations"),
        };
        Ok(self
            .migrator()
            .iter()
            .filter(|m| !m.migration_type.is_down_migration())
            .map(|m| m.version)
            .filter(|v| !applied.contains(v))
            .collect())
    }

    async fn apply_migrations(&self) -> anyhow::Result<Vec<i64>> {
        let pending = self.pending().await?;
        match self {
            Self::Sqlite(pool) => self
                .migrator()
                .run(pool)
                .await
                .context("applying SQLite migrations")?,
            Self::Postgres(pool) => self
                .migrator()
                .run(pool)
                .await
                .context("applying PostgreSQL migrations")?,
        }
        Ok(pending)
    }

    async fn wait_for_migrations(&self, patience: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut said = None::<tokio::time::Instant>;
        loop {
            let pending = self.pending().await?;
            if pending.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "the database schema lacks migrations {pending:?} that this version needs, and database_migrations = \"wait\": run `auth-service migrate` (the migrations Job)"
                );
            }
            if said.is_none_or(|at| at.elapsed() >= Duration::from_secs(30)) {
                tracing::warn!(
                    ?pending,
                    "waiting for schema migrations (`auth-service migrate`); not serving yet"
                );
                said = Some(tokio::time::Instant::now());
            }
            tokio::time::sleep(MIGRATION_POLL).await;
        }
    }

    fn into_database(self) -> Database {
        match self {
            Self::Sqlite(pool) => Database::from_store(SqlStore::new(pool)),
            Self::Postgres(pool) => Database::from_store(SqlStore::new(pool)),
        }
    }
}

/// The shared fast state: Redis when configured, else in process.
pub struct FastState {
    pub revocations: Arc<dyn RevocationStore>,
    pub failures: Arc<dyn FailureCounter>,
    pub quota: Arc<dyn QuotaStore>,
    /// Set with Redis: the handle that follows other replicas' revocations
    /// and answers readiness.
    pub redis: Option<RedisStore>,
}

pub async fn open_fast_state(config: &FastStateConfig) -> anyhow::Result<FastState> {
    match &config.redis_url {
        Some(url) => {
            let redis = RedisStore::connect(
                url,
                config.redis_mode,
                &config.redis_sentinel_master,
                &config.redis_key_prefix,
                config.redis_timeout,
                &config.redis_tls,
            )
            .await
            .context("connecting to Redis (AUTH_REDIS_URL)")?;
            check_eviction_policy(&redis, config.redis_allow_evicting_policy).await?;
            let shared = Arc::new(redis.clone());
            Ok(FastState {
                revocations: shared.clone(),
                failures: shared.clone(),
                quota: shared,
                redis: Some(redis),
            })
        }
        None => Ok(FastState {
            revocations: Arc::new(MemoryRevocations::new(config.revocation_capacity)),
            failures: Arc::new(MemoryFailureCounter::new(1_000_000)),
            quota: Arc::new(MemoryQuota::new(config.quota_capacity)),
            redis: None,
        }),
    }
}

/// Revocations live in Redis with a TTL each: a Redis that evicts keys
/// under memory pressure (`allkeys-*`, and `volatile-*`, which picks among
/// keys with a TTL) would silently un-revoke tokens. Such a policy stops
/// start-up unless `redis_allow_evicting_policy`; a Redis that will not say
/// (CONFIG refused by managed Redis) is started with a warning.
async fn check_eviction_policy(redis: &RedisStore, allow: bool) -> anyhow::Result<()> {
    let policies = match redis.maxmemory_policies().await {
        Ok(policies) => policies,
        Err(error) => {
            tracing::warn!(%error, "cannot read Redis's maxmemory-policy: make sure it is noeviction, or revocations may vanish under memory pressure");
            return Ok(());
        }
    };
    for policy in policies.iter().filter(|p| p.as_str() != "noeviction") {
        anyhow::ensure!(
            allow,
            "Redis maxmemory-policy is {policy}: under memory pressure Redis would delete revocations (revoked tokens would verify again). Set maxmemory-policy noeviction, or redis_allow_evicting_policy = true (AUTH_REDIS_ALLOW_EVICTING_POLICY) to start anyway"
        );
        tracing::warn!(
            policy,
            "Redis maxmemory-policy evicts keys: revocations may vanish under memory pressure (redis_allow_evicting_policy is on)"
        );
    }
    Ok(())
}

/// Runs one store operation (its statements, or its transaction) inside
/// its [`db_span`].
pub async fn in_db_span<T>(
    system: &'static str,
    operation: &'static str,
    work: impl std::future::Future<Output = T>,
) -> T {
    tracing::Instrument::instrument(work, db_span(system, operation)).await
}

/// A client span for one store operation (its statements, or its
/// transaction) in a traced call, by the OpenTelemetry database
/// conventions; `Span::none()` outside one, so untraced calls pay nothing.
/// `system` is sqlx's name of the database.
pub fn db_span(system: &'static str, operation: &'static str) -> tracing::Span {
    let system = match system {
        "PostgreSQL" => "postgresql",
        "SQLite" => "sqlite",
        other => other,
    };
    crate::child_span!(
        "db",
        otel.name = operation,
        otel.kind = "client",
        db.system.name = system,
        db.operation.name = operation,
    )
}
