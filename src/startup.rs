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

use crate::{
    accounts::{password::PasswordHasher, service::AccountService},
    authz::Authorizer,
    config::Config,
    envoy::ExtAuthz,
    grpc::{
        AuthApi,
        pb::{self, auth_service_server::AuthServiceServer},
    },
    http::{self, AdminState},
    ratelimit::LoginLockout,
    ratelimit::quota::RateLimiter,
    revocation::Revocations,
    storage::redis::RedisStore,
    storage::{Database, Ping, open_database, open_fast_state},
    telemetry,
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
    accounts: Arc<AccountService>,
    tokens: Arc<TokenService>,
    authorizer: Arc<Authorizer>,
    database: Database,
    redis: Option<RedisStore>,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let database = open_database(&config).await?;
        let fast = open_fast_state(&config).await?;
        let revocations = Revocations::new(
            fast.revocations,
            config.revocation.cache_capacity,
            Duration::from_millis(config.revocation.cache_ttl_ms),
            config.tokens.access_ttl_secs,
        );
        let tokens = Arc::new(
            TokenService::new(
                config.tokens.clone(),
                config.keys_dir(),
                database.sessions.clone(),
                revocations,
            )
            .context("loading signing keys")?,
        );
        let hasher = PasswordHasher::new(&config.password, config.hash_workers())
            .await
            .context("argon2 parameters (password.*)")?;
        let lockout = LoginLockout::new(fast.failures, config.lockout.clone());
        let accounts = Arc::new(AccountService::new(
            database.users.clone(),
            hasher,
            lockout,
            tokens.clone(),
            config.password.clone(),
        ));
        let limiter = RateLimiter::new(
            fast.quota,
            config.authz.rate_limit_fail_open,
            config.authz.rate_limit_capacity,
        );
        let authorizer = Arc::new(
            Authorizer::new(&config.authz, tokens.clone(), limiter).context("authz.routes")?,
        );
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
        Ok(Self {
            config,
            grpc_listener,
            http_listener,
            check_listener,
            accounts,
            tokens,
            authorizer,
            database,
            redis: fast.redis,
        })
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

    /// The separate ext_authz listener, when configured.
    pub fn check_addr(&self) -> Option<SocketAddr> {
        self.check_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    pub fn tokens(&self) -> Arc<TokenService> {
        self.tokens.clone()
    }

    pub fn accounts(&self) -> Arc<AccountService> {
        self.accounts.clone()
    }

    pub fn database(&self) -> Database {
        self.database.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting, lets
    /// in-flight calls finish and returns.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let stop = CancellationToken::new();
        tokio::spawn({
            let stop = stop.clone();
            async move {
                shutdown.await;
                tracing::info!("shutting down: draining in-flight calls");
                stop.cancel();
            }
        });

        let (reporter, health_service) = tonic_health::server::health_reporter();
        let service_name = <AuthServiceServer<AuthApi> as tonic::server::NamedService>::NAME;
        let database = self.database.health.clone();
        let report = move |reporter: tonic_health::server::HealthReporter| {
            let database = database.clone();
            async move {
                let status = match database.ping().await {
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
        };
        // The first answer is known before the port serves: a probe never
        // sees the service unregistered (NOT_FOUND) during start-up.
        let mut reporter = report(reporter).await;
        tokio::spawn({
            let stop = stop.clone();
            async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(HEALTH_INTERVAL) => {}
                    }
                    reporter = report(reporter).await;
                }
            }
        });

        let kafka_tasks = match self.config.kafka_brokers.clone() {
            Some(brokers) => {
                start_kafka(
                    &brokers,
                    &self.config.kafka,
                    &self.database,
                    &self.accounts,
                    &stop,
                )
                .await?
            }
            None => Vec::new(),
        };

        if let Some(redis) = self.redis.clone() {
            tokio::spawn(redis.follow_revocations(self.tokens.revocations().clone(), stop.clone()));
        }

        let ext_authz = || {
            AuthorizationServer::new(ExtAuthz::new(
                self.authorizer.clone(),
                self.config.trusted_proxy_hops,
            ))
        };
        let check = match self.check_listener {
            Some(listener) => {
                let server = Server::builder()
                    .add_service(ext_authz())
                    .serve_with_incoming_shutdown(
                        incoming(listener),
                        stop.clone().cancelled_owned(),
                    );
                Some(tokio::spawn(server))
            }
            None => None,
        };

        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("building the reflection service")?;
        let api = AuthApi::new(
            self.accounts.clone(),
            self.tokens.clone(),
            self.config.trusted_proxy_hops,
        );
        let grpc = Server::builder()
            .add_service(health_service)
            .add_service(reflection)
            .add_service(AuthServiceServer::new(api))
            .add_service(ext_authz())
            .serve_with_incoming_shutdown(
                incoming(self.grpc_listener),
                stop.clone().cancelled_owned(),
            );

        let admin = http::router(AdminState {
            tokens: self.tokens.clone(),
            database: self.database.health.clone(),
            redis: self.redis.clone().map(|r| Arc::new(r) as Arc<dyn Ping>),
            metrics: telemetry::metrics_handle(),
        });
        let http = axum::serve(self.http_listener, admin)
            .with_graceful_shutdown(stop.clone().cancelled_owned());
        tracing::info!(grpc = %self.config.grpc_addr, http = %self.config.http_addr, "auth-service serving");

        let (grpc, http) = tokio::join!(grpc, async { http.await });
        grpc.context("gRPC server failed")?;
        http.context("HTTP admin server failed")?;
        if let Some(check) = check {
            check
                .await
                .context("ext_authz server panicked")?
                .context("ext_authz server failed")?;
        }
        // The relay flushes its producer when it stops; give it the time.
        for task in kafka_tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        Ok(())
    }
}

/// Accepted connections with TCP_NODELAY: gRPC writes small frames, and with
/// Nagle a response split over two writes waits for the peer's delayed ACK
/// (about 40 ms).
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Starts Kafka work in the background: topics are created (when configured)
/// with retries, then the lifecycle consumer and the outbox relay start. Until
/// Kafka answers, events wait in the outbox and the API is unaffected.
async fn start_kafka(
    brokers: &str,
    config: &crate::config::KafkaConfig,
    database: &Database,
    accounts: &Arc<AccountService>,
    stop: &CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    use crate::events::{consumer::LifecycleConsumer, kafka, relay::Relay};
    let producer = kafka::producer(brokers, config).context("kafka producer (kafka.*)")?;
    let consumer = if config.consumer_enabled {
        Some(
            LifecycleConsumer::new(brokers, config, accounts.clone())
                .context("kafka consumer (kafka.*)")?,
        )
    } else {
        None
    };
    let relay = Relay::new(database.relay.clone(), producer, config.clone());
    let (brokers, config, stop) = (brokers.to_owned(), config.clone(), stop.clone());
    let task = tokio::spawn(async move {
        if config.create_topics {
            let mut topics: Vec<String> = kafka::EVENT_TOPICS
                .iter()
                .map(|t| kafka::topic_for(&config, t))
                .collect();
            topics.extend([
                config.dlq_topic.clone(),
                config.user_suspended_topic.clone(),
                config.user_deleted_topic.clone(),
            ]);
            let mut attempts = 0;
            while let Err(error) = kafka::ensure_topics(&brokers, &config, &topics).await {
                attempts += 1;
                tracing::warn!(%error, attempts, "Kafka topics not created yet; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(crate::events::relay::backoff(attempts)) => {}
                }
            }
        }
        let consumer = consumer.map(|c| tokio::spawn(c.run(stop.clone())));
        tracing::info!(%brokers, "Kafka relay started");
        relay.run(stop).await;
        if let Some(consumer) = consumer {
            let _ = consumer.await;
        }
    });
    Ok(vec![task])
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
