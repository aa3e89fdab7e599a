//! Building the application (backends, services, bound listeners) and running
//! it until a shutdown signal. `build` binds both listeners first, so port 0
//! works and callers learn the real addresses before serving starts.

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
        let platforms = Arc::new(
            PlatformService::new(
                database.platforms.clone(),
                Arc::new(vault),
                &config.platforms,
            )
            .context("platforms")?,
        );
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
fn revocations(config: &Config, store: Arc<dyn crate::revocation::RevocationStore>) -> Revocations {
    Revocations::new(
        store,
        config.revocation.cache_capacity,
        Duration::from_millis(config.revocation.cache_ttl_ms),
        config.tokens.access_ttl_secs,
    )
}

/// The account service on `tokens`.
async fn account_service(
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

    /// Serves until `shutdown` completes, then stops accepting, lets
    /// in-flight calls finish and returns.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        // On the signal: NOT_SERVING at once (`draining`), then after
        // `shutdown_delay_ms` stop accepting and let in-flight calls end.
        let draining = CancellationToken::new();
        let stop = CancellationToken::new();
        let delay = Duration::from_millis(self.config.shutdown_delay_ms);
        tokio::spawn({
            let stop = stop.clone();
            let draining = draining.clone();
            async move {
                shutdown.await;
                draining.cancel();
                if !delay.is_zero() {
                    tracing::info!(
                        delay_ms = delay.as_millis(),
                        "shutting down: reporting NOT_SERVING, still serving for shutdown_delay_ms"
                    );
                    tokio::time::sleep(delay).await;
                }
                tracing::info!("shutting down: draining in-flight calls");
                stop.cancel();
            }
        });

        let (reporter, health_service) = tonic_health::server::health_reporter();
        let service_name = <AuthServiceServer<AuthApi> as tonic::server::NamedService>::NAME;
        let database = self.services.database.health.clone();
        let report = {
            let draining = draining.clone();
            move |reporter: tonic_health::server::HealthReporter| {
                let database = database.clone();
                let draining = draining.clone();
                async move {
                    let status = match database.ping().await {
                        _ if draining.is_cancelled() => ServingStatus::NotServing,
                        Ok(()) => ServingStatus::Serving,
                        Err(error) => {
                            tracing::warn!(%error, "database check failed: NOT_SERVING");
                            ServingStatus::NotServing
                        }
                    };
                    reporter.set_service_status("", status).await;
                    reporter.set_service_status(service_name, status).await;
                    reporter
                }
            }
        };
        // The first answer is known before the port serves: a probe never
        // sees the service unregistered (NOT_FOUND) during start-up.
        let mut reporter = report(reporter).await;
        let mut background = Background::default();
        background.spawn("health_reports", {
            let stop = stop.clone();
            let draining = draining.clone();
            async move {
                let mut announced = false;
                loop {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = draining.cancelled(), if !announced => announced = true,
                        () = tokio::time::sleep(HEALTH_INTERVAL) => {}
                    }
                    reporter = report(reporter).await;
                }
            }
        });
        self.spawn_key_watchers(&mut background, &stop);

        let events = match (&self.config.kafka_brokers, self.config.kafka.worker) {
            (None, _) | (Some(_), EventsWorker::External) => None,
            (Some(brokers), EventsWorker::InProcess) => Some(tokio::spawn({
                let run = worker::run(
                    brokers.clone(),
                    self.config.kafka.clone(),
                    self.services.database.relay.clone(),
                    self.services.accounts.clone(),
                    stop.clone(),
                );
                async move {
                    if let Err(error) = run.await {
                        tracing::error!(error = %format!("{error:#}"), "event side failed");
                    }
                }
            })),
            (Some(_), EventsWorker::Supervised) => {
                // Set by `main`: only the auth-service executable can start
                // its own worker (a test binary's current_exe cannot).
                let command = self.worker_command.clone().context(
                    "kafka.worker = \"supervised\" needs the command that starts `auth-service events` (Application::with_worker_command)",
                )?;
                Some(tokio::spawn(
                    worker::Supervisor::new(command).run(stop.clone()),
                ))
            }
        };

        background.spawn(
            "platform_keepalive",
            self.services.platforms.clone().run_keepalive(stop.clone()),
        );
        // Subscribed before the poller starts, so no row it reads is missed.
        background.spawn(
            "revocation_log_apply",
            crate::revocation::feed::apply_log(
                self.services.revocation_feed.subscribe(),
                self.services.tokens.revocations().clone(),
                stop.clone(),
            ),
        );
        background.spawn(
            "revocation_feed",
            self.services.revocation_feed.clone().run(stop.clone()),
        );

        if let Some(redis) = self.services.redis.clone() {
            background.spawn(
                "redis_revocations",
                redis.follow_revocations(self.services.tokens.revocations().clone(), stop.clone()),
            );
        }

        let limits = self.config.limits.clone();
        let peers = PeerPolicy {
            services: Arc::new(self.config.services.clone()),
            // Identities come from client certificates or, behind a mesh
            // sidecar, from the header it sets: either way only a gateway
            // may forward a client's address.
            gateway_only_forwarding: self.config.tls.client_auth != ClientAuth::None
                || !self.config.tls.xfcc_from.is_empty(),
            xfcc_from: self.config.tls.xfcc_from.clone(),
        };
        // Edge mode: the deny map for Envoys that enforce revocation
        // themselves, built from the revocation log (src/edge).
        let plane = crate::edge::ControlPlane::new(
            std::time::Duration::from_secs(self.config.tokens.access_ttl_secs),
            self.services.authorizer.policy(),
        );
        background.spawn(
            "edge_control_plane",
            plane
                .clone()
                .run(self.services.revocation_feed.clone(), stop.clone()),
        );
        let identities_required = peers.gateway_only_forwarding;
        let ecds = || {
            ExtensionConfigDiscoveryServiceServer::new(crate::edge::ecds::Ecds::new(
                plane.clone(),
                identities_required,
                stop.clone(),
            ))
        };
        let ext_authz = || {
            AuthorizationServer::new(ExtAuthz::new(
                self.services.authorizer.clone(),
                self.config.trusted_proxy_hops,
            ))
            .max_decoding_message_size(limits.max_check_message_bytes)
        };
        // One layer stack for every listener (grpc::stack). Larger metadata
        // is refused by the HTTP/2 layer before any handler.
        let calls = stack::CallLayer::new(
            self.services.tokens.clone(),
            peers,
            self.config.trusted_proxy_hops,
            self.config.request_timeout(),
            &self.config.rpc,
            self.services.session_limiter.clone(),
        )
        .context("rpc.session_limits")?;
        let server = || {
            Server::builder()
                .http2_max_header_list_size(limits.max_header_bytes)
                .layer(stack::stack(calls.clone()))
        };
        if let Some(tls) = &self.tls {
            background.spawn("tls_reload", tls.clone().watch(stop.clone()));
        }
        let background = tokio::spawn(background.supervise(stop.clone(), BACKGROUND_GRACE));
        let check = match self.check_listener {
            Some(listener) => {
                let router = server().add_service(ext_authz()).add_service(ecds());
                Some(tokio::spawn(serve(
                    router,
                    listener,
                    self.tls.as_ref(),
                    stop.clone(),
                )))
            }
            None => None,
        };

        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(pb::AUTHZ_FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("building the reflection service")?;
        let api = AuthApi::new(UseCases {
            accounts: self.services.accounts.clone(),
            service_accounts: self.services.service_accounts.clone(),
            tokens: self.services.tokens.clone(),
            platforms: self.services.platforms.clone(),
            revocation_feed: self.services.revocation_feed.clone(),
        });
        let health = match self.health_listener {
            Some(listener) => {
                let router = server().add_service(health_service.clone());
                Some(tokio::spawn(serve(router, listener, None, stop.clone())))
            }
            None => None,
        };
        let grpc = server()
            .add_service(health_service)
            .add_service(reflection)
            .add_service(
                AuthServiceServer::new(api).max_decoding_message_size(limits.max_api_message_bytes),
            )
            .add_service(ext_authz())
            .add_service(ecds());
        let grpc = serve(grpc, self.grpc_listener, self.tls.as_ref(), stop.clone());

        let admin_state = AdminState {
            tokens: self.services.tokens.clone(),
            platforms: self.services.platforms.clone(),
            database: self.services.database.health.clone(),
            redis: self
                .services
                .redis
                .clone()
                .map(|r| Arc::new(r) as Arc<dyn Ping>),
            metrics: telemetry::metrics_handle(),
            draining: draining.clone(),
        };
        let monitoring = self.metrics_listener.map(|listener| {
            tokio::spawn(
                axum::serve(listener, http::metrics_router(admin_state.clone()))
                    .with_graceful_shutdown(stop.clone().cancelled_owned())
                    .into_future(),
            )
        });
        let admin = http::router(admin_state, monitoring.is_some());
        let http = axum::serve(self.http_listener, admin)
            .with_graceful_shutdown(stop.clone().cancelled_owned());
        tracing::info!(grpc = %self.config.grpc_addr, http = %self.config.http_addr, "auth-service serving");

        let (grpc, http) = tokio::join!(grpc, async { http.await });
        grpc.context("gRPC server failed")?;
        http.context("HTTP server failed")?;
        if let Some(monitoring) = monitoring {
            monitoring
                .await
                .context("metrics server panicked")?
                .context("metrics server failed")?;
        }
        for (name, task) in [("ext_authz", check), ("health", health)] {
            if let Some(task) = task {
                task.await
                    .with_context(|| format!("{name} server panicked"))?
                    .with_context(|| format!("{name} server failed"))?;
            }
        }
        // The relay flushes its producer when it stops (the supervisor
        // waits for its worker process); give it the time.
        if let Some(events) = events {
            let _ = tokio::time::timeout(Duration::from_secs(10), events).await;
        }
        let ended = background.await.context("background supervisor panicked")?;
        if !ended.panicked.is_empty() || !ended.aborted.is_empty() {
            tracing::warn!(panicked = ?ended.panicked, aborted = ?ended.aborted, "background tasks did not all end cleanly");
        }
        Ok(())
    }
}

impl Application {
    /// Polls the signing-key and vault-key directories (a Kubernetes Secret
    /// updated in place has no SIGHUP): see [`crate::reload`].
    fn spawn_key_watchers(&self, background: &mut Background, stop: &CancellationToken) {
        let tokens_every = self.config.tokens.reload_interval_secs;
        if tokens_every > 0 {
            let tokens = self.services.tokens.clone();
            background.spawn(
                "signing_key_reload",
                reload::watch_key_dir(
                    "signing",
                    self.config.keys_dir(),
                    "pem",
                    Duration::from_secs(tokens_every),
                    tokens.next_key_activation(),
                    move || {
                        let kid = tokens.reload_keys()?;
                        tracing::info!(kid, "signing key in use");
                        Ok(tokens.next_key_activation())
                    },
                    stop.clone(),
                ),
            );
        }
        let vault_every = self.config.platforms.reload_interval_secs;
        if vault_every > 0 {
            let platforms = self.services.platforms.clone();
            let dir = self.config.platform_keys_dir();
            let current = self.config.platforms.current_key_id.clone();
            background.spawn(
                "vault_key_reload",
                reload::watch_key_dir(
                    "platform_vault",
                    dir.clone(),
                    "key",
                    Duration::from_secs(vault_every),
                    platforms.next_vault_activation(),
                    move || {
                        let vault = Vault::load(&dir, current.as_deref(), false)?;
                        tracing::info!(key = vault.current_key_id(), "platform-token key sealing");
                        platforms.replace_vault(vault);
                        Ok(platforms.next_vault_activation())
                    },
                    stop.clone(),
                ),
            );
        }
    }
}

/// How long the background tasks get to end after the stop, once the
/// listeners have drained.
const BACKGROUND_GRACE: Duration = Duration::from_secs(5);

/// Serves `router` on `listener` until `stop`: over TLS when configured
/// (certificates reloaded by [`tls::Reloadable::watch`]), else plaintext.
/// Every gRPC listener's router: the services behind the one layer stack.
type GrpcRouter = tonic::transport::server::Router<
    tower::layer::util::Stack<stack::Stack, tower::layer::util::Identity>,
>;

fn serve(
    router: GrpcRouter,
    listener: TcpListener,
    tls: Option<&tls::Reloadable>,
    stop: CancellationToken,
) -> std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> {
    match tls {
        Some(tls) => Box::pin(router.serve_with_incoming_shutdown(
            tls.incoming(listener, stop.clone()),
            stop.cancelled_owned(),
        )),
        None => Box::pin(
            router.serve_with_incoming_shutdown(incoming(listener), stop.cancelled_owned()),
        ),
    }
}

/// Accepted connections with TCP_NODELAY: gRPC writes small frames, and with
/// Nagle a response split over two writes waits for the peer's delayed ACK
/// (about 40 ms).
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// The `events` process: the relay and the lifecycle consumer until
/// `shutdown` (or, when `supervised`, until the server's pipe closes), with
/// `/healthz` and `/metrics` on `kafka.worker_http_addr` when set.
pub async fn run_events_worker(
    config: Config,
    supervised: bool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let brokers = config.kafka_brokers.clone().context(
        "kafka_brokers (AUTH_KAFKA_BROKERS) is not set: the event worker has nothing to do",
    )?;
    let services = WorkerServices::build(&config).await?;
    let stop = CancellationToken::new();
    if supervised {
        worker::stop_on_stdin_eof(stop.clone());
    }
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.cancel();
        }
    });
    if let Some(addr) = config.kafka.worker_http_addr {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding kafka.worker_http_addr {addr}"))?;
        tokio::spawn(
            axum::serve(listener, http::worker_router(telemetry::metrics_handle()))
                .with_graceful_shutdown(stop.clone().cancelled_owned())
                .into_future(),
        );
    }
    tracing::info!(pid = std::process::id(), "event worker running");
    worker::run(
        brokers,
        config.kafka,
        services.database.relay.clone(),
        services.accounts.clone(),
        stop,
    )
    .await
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Re-reads the signing keys on every SIGHUP (after `rotate-key`).
pub fn reload_keys_on_sighup(tokens: Arc<TokenService>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            match tokens.reload_keys() {
                Ok(kid) => tracing::info!(kid, "signing keys reloaded"),
                Err(error) => tracing::error!(%error, "key reload failed; keeping the keys in use"),
            }
        }
    });
}
