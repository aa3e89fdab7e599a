//! Serving: the listeners bound by [`Application::build`] serve behind the
//! one layer stack until shutdown, the background tasks supervised beside
//! them; then the listeners drain and the tasks get their grace.

use super::*;

impl Application {
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
        // What was revoked while this process was not running (the last
        // access-token lifetime of the log), once, at start.
        let (feed, revocations) = (
            self.services.revocation_feed.clone(),
            self.services.tokens.revocations().clone(),
        );
        let window = Duration::from_secs(self.config.tokens.access_ttl_secs + 60);
        let replay_stop = stop.clone();
        background.spawn("revocation_log_replay", async move {
            feed.replay_recent(window, &revocations, replay_stop.clone())
                .await;
            // And whenever Redis answers again after a lost connection (it
            // may be back without its state), or takes writes again after
            // owed writes were dropped at their bound, or this process's
            // live feed of the log lagged: what is missing is in the log.
            loop {
                tokio::select! {
                    () = replay_stop.cancelled() => return,
                    () = revocations.store_reconnection() => {}
                }
                tracing::info!("writing the recent revocations to the fast state again");
                feed.replay_recent(window, &revocations, replay_stop.clone())
                    .await;
            }
        });

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
        // themselves, built from the revocation log (crates/api/src/edge).
        let plane = crate::edge::ControlPlane::new(
            std::time::Duration::from_secs(self.config.tokens.access_ttl_secs),
            self.services.authorizer.policy(),
            self.services.tokens.clone(),
        );
        background.spawn(
            "edge_control_plane",
            plane
                .clone()
                .run(self.services.revocation_feed.clone(), stop.clone()),
        );
        background.spawn("edge_keys", plane.clone().watch_keys(stop.clone()));
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
            revocation_log: self.services.revocation_feed.clone(),
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
