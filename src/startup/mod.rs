//! Building the application (backends, services, bound listeners) and running
//! it until a shutdown signal. `build` binds both listeners first, so port 0
//! works and callers learn the real addresses before serving starts.

mod process;
mod serve;
mod services;

pub use process::{reload_keys_on_sighup, run_events_worker, shutdown_signal};
pub use services::{Services, WorkerServices};

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use envoy_types::pb::envoy::service::extension::v3::extension_config_discovery_service_server::ExtensionConfigDiscoveryServiceServer;

use crate::{
    accounts::{
        password::PasswordHasher, service::AccountService, service_accounts::ServiceAccounts,
    },
    authz::Authorizer,
    background::Background,
    config::{ClientAuth, Config, EventsWorker},
    envoy::ExtAuthz,
    events::worker::{self, WorkerCommand},
    grpc::{
        AuthApi, PeerPolicy, UseCases,
        pb::{self, auth_service_server::AuthServiceServer},
        stack,
    },
    http::{self, AdminState},
    platforms::{service::PlatformService, vault::Vault},
    ratelimit::LoginLockout,
    ratelimit::quota::RateLimiter,
    reload,
    revocation::{Revocations, feed::RevocationFeed},
    storage::redis::RedisStore,
    storage::{Database, Ping, open_database, open_fast_state},
    telemetry, tls,
    tokens::TokenService,
};

/// How often the gRPC health status follows the database.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);

pub struct Application {
    config: Config,
    grpc_listener: TcpListener,
    http_listener: TcpListener,
    /// Only when `authz.check_addr` is set.
    check_listener: Option<TcpListener>,
    /// Only when `health_addr` is set.
    health_listener: Option<TcpListener>,
    /// Only when `metrics_addr` is set.
    metrics_listener: Option<TcpListener>,
    services: Services,
    /// How a supervised event worker is started (`kafka.worker = supervised`).
    worker_command: Option<WorkerCommand>,
    /// TLS on the gRPC listeners, when `tls.cert` is set.
    tls: Option<tls::Reloadable>,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        // Bad certificate files stop start-up before anything else.
        let tls = match &config.tls.cert {
            Some(_) => Some(tls::Reloadable::load(&config.tls)?),
            None => None,
        };
        let services = Services::build(&config).await?;
        let grpc_listener = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("binding grpc_addr {}", config.grpc_addr))?;
        let http_listener = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("binding http_addr {}", config.http_addr))?;
        let check_listener = match config.authz.check_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding authz.check_addr {addr}"))?,
            ),
            None => None,
        };
        let health_listener = match config.health_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding health_addr {addr}"))?,
            ),
            None => None,
        };
        let metrics_listener = match config.metrics_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding metrics_addr {addr}"))?,
            ),
            None => None,
        };
        Ok(Self {
            config,
            grpc_listener,
            http_listener,
            check_listener,
            health_listener,
            metrics_listener,
            services,
            worker_command: None,
            tls,
        })
    }

    /// The command that starts the supervised event worker (needed when
    /// `kafka.worker = "supervised"`).
    pub fn with_worker_command(mut self, command: WorkerCommand) -> Self {
        self.worker_command = Some(command);
        self
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The monitoring listener, when configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The plaintext health listener, when configured.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The separate ext_authz listener, when configured.
    pub fn check_addr(&self) -> Option<SocketAddr> {
        self.check_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    pub fn tokens(&self) -> Arc<TokenService> {
        self.services.tokens.clone()
    }

    pub fn accounts(&self) -> Arc<AccountService> {
        self.services.accounts.clone()
    }

    pub fn platforms(&self) -> Arc<PlatformService> {
        self.services.platforms.clone()
    }

    pub fn database(&self) -> Database {
        self.services.database.clone()
    }

    /// The revocation log's feed (for waiting until the recent revocations
    /// are applied at start: [`crate::revocation::feed::RevocationFeed::replayed`]).
    pub fn revocation_feed(&self) -> Arc<crate::revocation::feed::RevocationFeed> {
        self.services.revocation_feed.clone()
    }
}
