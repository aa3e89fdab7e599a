//! The event side as one unit: topic creation, the outbox relay and the
//! lifecycle consumer. It runs in the `auth-service events` process (by
//! default a child that `serve` supervises, or a deployment of its own), so a
//! crash or a hang in the Kafka client library never stops the gRPC API or
//! ext_authz.
//!
//! [`Supervisor`] is the serving side of that arrangement: it starts the
//! worker process, restarts it with backoff whenever it exits, and stops it
//! with the server. The worker watches its standard input, a pipe from the
//! supervisor: end-of-file (the supervisor stopping it, or dying, even by
//! SIGKILL) makes it shut down, so a worker never outlives its server.

use std::{ffi::OsString, path::PathBuf, process::Stdio, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::io::AsyncReadExt as _;
use tokio_util::sync::CancellationToken;

use crate::{accounts::service::UserLifecycle, config::KafkaConfig, events::RelayStore};
use crate::{consumer::LifecycleConsumer, kafka, relay::Relay};

/// Runs topic creation (when configured), the consumer (when enabled) and
/// the relay until `stop`. Until Kafka answers, events wait in the outbox.
pub async fn run(
    brokers: String,
    config: KafkaConfig,
    store: Arc<dyn RelayStore>,
    accounts: Arc<dyn UserLifecycle>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let producer = kafka::producer(&brokers, &config).context("kafka producer (kafka.*)")?;
    let consumer = if config.consumer_enabled {
        Some(
            LifecycleConsumer::new(&brokers, &config, accounts)
                .context("kafka consumer (kafka.*)")?,
        )
    } else {
        None
    };
    if config.create_topics {
        let topics = kafka::all_topics(&config);
        let mut attempts = 0;
        while let Err(error) = kafka::ensure_topics(&brokers, &config, &topics).await {
            attempts += 1;
            tracing::warn!(%error, attempts, "Kafka topics not created yet; retrying");
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = tokio::time::sleep(crate::relay::backoff(attempts)) => {}
            }
        }
    }
    let consumer = consumer.map(|c| tokio::spawn(c.run(stop.clone())));
    tracing::info!(%brokers, "Kafka relay started");
    Relay::new(store, producer, brokers, config).run(stop).await;
    if let Some(consumer) = consumer {
        let _ = consumer.await;
    }
    Ok(())
}

/// Cancels `stop` when standard input reaches end-of-file: the supervising
/// server closed the pipe, or is gone.
pub fn stop_on_stdin_eof(stop: CancellationToken) {
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        tracing::info!("supervising server gone: stopping the event worker");
        stop.cancel();
    });
}

/// The command that starts the worker process.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl WorkerCommand {
    /// This very executable with `events --supervised`, and the same
    /// configuration file; `AUTH_*` variables are inherited.
    pub fn current_exe(config_file: Option<&std::path::Path>) -> std::io::Result<Self> {
        let mut args: Vec<OsString> = Vec::new();
        if let Some(file) = config_file {
            args.push("--config".into());
            args.push(file.as_os_str().to_owned());
        }
        args.extend(["events".into(), "--supervised".into()]);
        Ok(Self {
            program: std::env::current_exe()?,
            args,
        })
    }
}

/// How long a stopping worker may take before it is killed: the relay's
/// final flush (5 s) and the consumer leaving its group (5 s) run together.
const STOP_GRACE: Duration = Duration::from_secs(8);

/// A worker that ran this long before exiting counts as healthy: the restart
/// backoff starts again from its shortest delay.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Keeps one worker process running until `stop`.
pub struct Supervisor {
    command: WorkerCommand,
}

impl Supervisor {
    pub fn new(command: WorkerCommand) -> Self {
        Self { command }
    }

    /// Starts the worker, restarts it after every exit (backoff 100 ms
    /// doubling to 30 s, reset after a healthy run), and on `stop` closes its
    /// pipe and waits for it to finish (killing it after a grace period).
    pub async fn run(self, stop: CancellationToken) {
        let mut failures = 0u32;
        while !stop.is_cancelled() {
            let started = std::time::Instant::now();
            let mut child = match tokio::process::Command::new(&self.command.program)
                .args(&self.command.args)
                .stdin(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
            {
                Ok(child) => child,
                Err(error) => {
                    failures += 1;
                    tracing::error!(%error, program = %self.command.program.display(), "cannot start the event worker");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(crate::relay::backoff(failures)) => continue,
                    }
                }
            };
            let pid = child.id();
            tracing::info!(?pid, "event worker started");
            metrics::gauge!("events_worker_up").set(1.0);
            // Held, never written: dropping it is the stop request.
            let pipe = child.stdin.take();
            let status = tokio::select! {
                status = child.wait() => status,
                () = stop.cancelled() => {
                    drop(pipe);
                    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
                        Ok(status) => {
                            tracing::info!(?status, "event worker stopped");
                        }
                        Err(_) => {
                            tracing::warn!("event worker did not stop in time; killing it");
                            let _ = child.kill().await;
                        }
                    }
                    metrics::gauge!("events_worker_up").set(0.0);
                    return;
                }
            };
            drop(pipe);
            metrics::gauge!("events_worker_up").set(0.0);
            let reason = exit_reason(&status);
            metrics::counter!("events_worker_restarts_total", "reason" => reason.0).increment(1);
            if started.elapsed() >= HEALTHY_RUN {
                failures = 0;
            }
            failures += 1;
            let delay = crate::relay::backoff(failures);
            tracing::error!(?pid, exit = %reason.1, ?delay, "event worker exited; restarting it (the API is unaffected)");
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// A metric label and a description of how the worker ended.
fn exit_reason(status: &std::io::Result<std::process::ExitStatus>) -> (&'static str, String) {
    match status {
        Err(error) => ("wait_failed", error.to_string()),
        Ok(status) => {
            #[cfg(unix)]
            if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(status) {
                return ("signal", format!("killed by signal {signal}"));
            }
            match status.code() {
                Some(0) => ("exited", "exit code 0".into()),
                Some(code) => ("failed", format!("exit code {code}")),
                None => ("unknown", status.to_string()),
            }
        }
    }
}
