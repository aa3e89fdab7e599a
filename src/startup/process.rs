//! The process around the server: the `events` worker process, and the
//! signals (SIGTERM/SIGINT to stop, SIGHUP to reload keys).

use super::*;

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
