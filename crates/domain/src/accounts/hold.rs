//! Refusals held before they are answered: the service's own login tarpit.
//!
//! A login or sign-up refused without hashing (the hashing queue is at
//! capacity, or the lockout refuses it) costs the service microseconds, so a
//! closed-loop client — one that sends again as soon as it is answered —
//! spins on such refusals as fast as the machine can answer them and takes
//! the CPU from everyone else. The gateway holds the refusals of its own
//! login buckets for a second for that reason (`envoy/gateway.yaml`); a flood
//! spread over a new network per attempt never fills a bucket, so its
//! refusals come from here, and are held here the same way.
//!
//! A held refusal costs a timer and the open call. At most `max_held` are
//! held at once; past that a refusal is answered at once, as before. The
//! hold never outlasts the caller's own deadline: the refusal arrives before
//! the caller gives up, so it still learns when to retry.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::Semaphore;

/// How long before the caller's deadline a held refusal is answered.
const DEADLINE_MARGIN: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct RefusalHold {
    hold: Duration,
    max_held: usize,
    slots: Arc<Semaphore>,
}

impl RefusalHold {
    /// Holds each refusal for `hold`, at most `max_held` at once. A zero
    /// `hold` or `max_held` answers every refusal at once.
    pub fn new(hold: Duration, max_held: usize) -> Self {
        Self {
            hold,
            max_held,
            slots: Arc::new(Semaphore::new(max_held)),
        }
    }

    /// Waits before a refusal of a call that arrived at `arrived` is
    /// answered, so that it is answered `hold` after its arrival (time the
    /// call already spent, e.g. waiting in the hashing queue, counts), or
    /// shortly before `deadline` when that is sooner; not at all when
    /// `max_held` refusals are already held. Returns how long it held.
    pub async fn refusal(&self, arrived: Instant, deadline: Option<Instant>) -> Duration {
        if self.hold.is_zero() || self.max_held == 0 {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let mut until = arrived + self.hold;
        if let Some(deadline) = deadline {
            let latest = deadline.checked_sub(DEADLINE_MARGIN).unwrap_or(now);
            if latest < until {
                // A caller's own short deadline: it is answered at that
                // deadline anyway (the transport ends the call there). The
                // shipped gateways remove outside callers' `grpc-timeout`.
                metrics::counter!("refusals_held_total", "outcome" => "deadline").increment(1);
                until = latest;
            }
        }
        let hold = until.saturating_duration_since(now);
        if hold.is_zero() {
            return Duration::ZERO;
        }
        let Ok(_slot) = self.slots.try_acquire() else {
            metrics::counter!("refusals_held_total", "outcome" => "full").increment(1);
            return Duration::ZERO;
        };
        metrics::counter!("refusals_held_total", "outcome" => "held").increment(1);
        metrics::gauge!("refusals_held").increment(1.0);
        // Decremented when the call ends, however it ends (a caller that
        // hangs up drops this future mid-sleep).
        let _held = Held;
        tokio::time::sleep(hold).await;
        hold
    }

    /// Refusals held now.
    pub fn held(&self) -> usize {
        self.max_held - self.slots.available_permits()
    }
}

struct Held;

impl Drop for Held {
    fn drop(&mut self) {
        metrics::gauge!("refusals_held").decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Long enough that a test never sees a hold end by itself.
    const FOREVER: Duration = Duration::from_secs(3600);
    /// Long enough for a refusal answered at once on a loaded machine.
    const PATIENCE: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn a_refusal_is_held_and_its_slot_comes_back_when_the_caller_hangs_up() {
        let hold = RefusalHold::new(FOREVER, 4);
        let held = tokio::spawn({
            let hold = hold.clone();
            async move { hold.refusal(Instant::now(), None).await }
        });
        tokio::time::timeout(PATIENCE, async {
            while hold.held() == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the refusal was never held");
        assert!(!held.is_finished(), "a held refusal was answered");
        held.abort();
        let _ = held.await;
        assert_eq!(hold.held(), 0, "a caller that hung up keeps its slot");
    }

    #[tokio::test]
    async fn past_the_bound_a_refusal_is_answered_at_once() {
        let hold = RefusalHold::new(FOREVER, 1);
        let first = hold.refusal(Instant::now(), None);
        tokio::pin!(first);
        // Polled once: it takes the only slot and sleeps.
        assert!(
            futures::poll!(first.as_mut()).is_pending(),
            "the first refusal was not held"
        );
        assert_eq!(hold.held(), 1);
        tokio::time::timeout(PATIENCE, hold.refusal(Instant::now(), None))
            .await
            .expect("a refusal past the bound was held");
    }

    #[tokio::test]
    async fn a_hold_ends_before_the_callers_deadline() {
        let hold = RefusalHold::new(FOREVER, 4);
        let deadline = Instant::now() + Duration::from_millis(300);
        tokio::time::timeout(PATIENCE, hold.refusal(Instant::now(), Some(deadline)))
            .await
            .expect("the hold outlasted the caller's deadline");
        // A deadline closer than the margin: not held at all.
        let deadline = Instant::now() + DEADLINE_MARGIN / 2;
        tokio::time::timeout(PATIENCE, hold.refusal(Instant::now(), Some(deadline)))
            .await
            .expect("a refusal was held past a deadline inside the margin");
        assert_eq!(hold.held(), 0);
    }

    #[tokio::test]
    async fn time_the_call_already_spent_counts_toward_the_hold() {
        let hold = RefusalHold::new(Duration::from_secs(60), 4);
        let arrived = Instant::now() - Duration::from_secs(60);
        tokio::time::timeout(PATIENCE, hold.refusal(arrived, None))
            .await
            .expect("a call older than the hold was held again");
        assert_eq!(hold.held(), 0);
    }

    #[tokio::test]
    async fn a_zero_hold_or_bound_answers_at_once() {
        for hold in [
            RefusalHold::new(Duration::ZERO, 4),
            RefusalHold::new(FOREVER, 0),
        ] {
            tokio::time::timeout(PATIENCE, hold.refusal(Instant::now(), None))
                .await
                .expect("held although holding is off");
        }
    }
}
