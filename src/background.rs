//! The process's background tasks (platform keep-alive, the revocation
//! feed and the log's application, the edge control plane, key and
//! certificate watchers, health reports) in one `JoinSet`: a task that
//! panics is logged and counted when it happens, not lost in a detached
//! handle, and at shutdown every task is awaited — for a bounded time,
//! after which the stragglers are aborted and named.

use std::{collections::HashMap, future::Future, time::Duration};

use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
pub struct Background {
    tasks: JoinSet<()>,
    names: HashMap<Id, &'static str>,
}

/// How the tasks ended (for the log and the tests).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Ended {
    pub panicked: Vec<&'static str>,
    /// Still running when the grace ran out: aborted.
    pub aborted: Vec<&'static str>,
}

impl Background {
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let handle = self.tasks.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Watches the tasks until `stop` (reporting panics as they happen),
    /// then awaits them for up to `grace` and aborts the rest.
    pub async fn supervise(mut self, stop: CancellationToken, grace: Duration) -> Ended {
        let mut ended = Ended::default();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                joined = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    if let Some(joined) = joined {
                        self.report(joined, &mut ended);
                    }
                }
            }
        }
        let deadline = tokio::time::sleep(grace);
        tokio::pin!(deadline);
        while !self.tasks.is_empty() {
            tokio::select! {
                () = &mut deadline => {
                    let mut left: Vec<&'static str> = self.names.values().copied().collect();
                    left.sort_unstable();
                    tracing::warn!(tasks = ?left, "background tasks still running at shutdown: aborted");
                    ended.aborted = left;
                    self.tasks.abort_all();
                    while self.tasks.join_next().await.is_some() {}
                    break;
                }
                joined = self.tasks.join_next_with_id() => {
                    if let Some(joined) = joined {
                        self.report(joined, &mut ended);
                    }
                }
            }
        }
        ended
    }

    fn report(&mut self, joined: Result<(Id, ()), JoinError>, ended: &mut Ended) {
        match joined {
            Ok((id, ())) => {
                let name = self.names.remove(&id).unwrap_or("unknown");
                tracing::debug!(task = name, "background task ended");
            }
            Err(error) => {
                let name = self.names.remove(&error.id()).unwrap_or("unknown");
                if error.is_panic() {
                    metrics::counter!("background_task_panics_total", "task" => name).increment(1);
                    tracing::error!(
                        task = name,
                        "a background task panicked; the service goes on without it"
                    );
                    ended.panicked.push(name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Failure class: a background task that panics, and one that ignores
    /// the stop. The panic is reported when it happens (before the stop),
    /// a task that ends normally is not, and the one still running after
    /// the grace is aborted and named.
    #[tokio::test]
    async fn a_panicking_task_is_seen_and_a_stuck_one_aborted_at_shutdown() {
        let stop = CancellationToken::new();
        let mut background = Background::default();
        background.spawn("boom", async { panic!("boom") });
        background.spawn("polite", {
            let stop = stop.clone();
            async move { stop.cancelled().await }
        });
        background.spawn("stuck", std::future::pending());
        let supervisor =
            tokio::spawn(background.supervise(stop.clone(), Duration::from_millis(50)));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!supervisor.is_finished(), "supervises until the stop");
        stop.cancel();
        let ended = supervisor.await.unwrap();
        assert_eq!(
            ended,
            Ended {
                panicked: vec!["boom"],
                aborted: vec!["stuck"],
            }
        );
    }
}
