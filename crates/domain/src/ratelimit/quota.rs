//! Request rate limiting for ext_authz: GCRA (the generic cell rate
//! algorithm, a leaky bucket without a background drip) shared across
//! replicas, with leases as the local fast path.
//!
//! # Semantics
//!
//! A [`Limit`] of `requests` per `per_secs` with `burst` allows `burst`
//! requests at once and then one every `per_secs / requests` (the emission
//! interval T). The shared state per key is one number, the theoretical
//! arrival time (TAT); a request conforms if `max(TAT, now) + T - T*burst <=
//! now`. There is no window edge to game, unlike a fixed window.
//!
//! # Leases (the fast path)
//!
//! Asking the shared store on every request would put Redis on the hot path,
//! so a replica takes a *lease* of `lease` tokens in one atomic call and
//! spends it locally; only when the lease is spent or expired does it ask
//! again. The shared store never grants more than GCRA allows, so leasing
//! never admits more than the exact algorithm plus the tokens a replica holds
//! unspent (at most `lease`, spendable for max(T × lease, 250 ms)); it may
//! admit up to `lease` fewer per replica (tokens leased but unused when they
//! expire, or held by a replica the traffic left). A
//! key found over the limit is remembered locally until its retry-after, so
//! refused traffic does not reach Redis either.
//!
//! Error bound with R replicas: admitted requests for a key over any interval
//! are within `lease × R` of what one exact GCRA would admit.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use moka::sync::Cache;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::error::BackendError;

/// `requests` per `per_secs`, bursts of up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    pub requests: u32,
    pub per_secs: u64,
    pub burst: u32,
}

impl Limit {
    /// The emission interval T in microseconds (at least 1).
    pub fn interval_us(&self) -> u64 {
        (self.per_secs.saturating_mul(1_000_000) / u64::from(self.requests.max(1))).max(1)
    }

    /// Tokens taken per shared-store call: a tenth of the burst, 1 to 50.
    pub fn lease(&self) -> u32 {
        (self.burst / 10).clamp(1, 50)
    }

    /// Each error names its own key, relative to this limit.
    pub fn validate(&self) -> Result<(), crate::error::ConfigError> {
        use crate::error::require;
        require(self.requests > 0, "requests", "must be positive")?;
        require(self.per_secs > 0, "per_secs", "must be positive")?;
        require(self.burst > 0, "burst", "must be positive")
    }
}

/// What the shared store granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Tokens taken (0 to `want`).
    pub granted: u32,
    /// When nothing was granted: how long until one token conforms.
    pub retry_after: Duration,
}

/// The shared GCRA state (Redis in production, in process otherwise).
#[async_trait]
pub trait QuotaStore: Send + Sync + 'static {
    /// Takes up to `want` conforming tokens for `key` atomically.
    async fn acquire(&self, key: &str, limit: &Limit, want: u32) -> Result<Grant, BackendError>;

    /// In this process: no round trip to save, so no leases in front.
    fn is_local(&self) -> bool {
        false
    }
}

/// One GCRA step on a stored TAT (µs); returns the new TAT and the grant.
pub fn gcra(stored_tat: Option<u64>, now: u64, limit: &Limit, want: u32) -> (u64, Grant) {
    let t = limit.interval_us();
    let tau = t.saturating_mul(u64::from(limit.burst));
    let tat = stored_tat.unwrap_or(now).max(now);
    let available = (now + tau).saturating_sub(tat) / t;
    let granted = u32::try_from(available.min(u64::from(want))).unwrap_or(want);
    if granted > 0 {
        (
            tat + u64::from(granted) * t,
            Grant {
                granted,
                retry_after: Duration::ZERO,
            },
        )
    } else {
        let wait = (tat + t).saturating_sub(tau).saturating_sub(now);
        (
            tat,
            Grant {
                granted: 0,
                retry_after: Duration::from_micros(wait.max(1)),
            },
        )
    }
}

fn now_us() -> u64 {
    u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000).unwrap_or(0)
}

/// GCRA in process: the embedded default, and the per-replica fallback when
/// Redis is unreachable and the rate limit fails open.
///
/// A key's entry lives until its TAT: from then on its state is the same as
/// no state at all (a full burst), so memory holds only the keys that are
/// still paying off recent requests, not every address ever seen. The keys
/// sit in sharded hash maps; a shard that has seen as many new keys since its
/// last sweep as it kept then drops its caught-up keys (amortised O(1) per
/// new key, also when it is full) and gives memory back when it shrank to a
/// quarter. (A moka cache with per-entry expiry did
/// this first; under churn, every request from a new address, its memory
/// grew for as long as the churn lasted: `bench/run soak`.) At `capacity`
/// keys a new key is not remembered: it gets a full burst, as it would after
/// an eviction.
pub struct MemoryQuota {
    shards: Box<[std::sync::Mutex<Shard>]>,
    per_shard: usize,
    hasher: std::hash::RandomState,
}

#[derive(Default)]
struct Shard {
    tats: std::collections::HashMap<Box<str>, u64>,
    /// New keys seen (stored or not) since the last sweep.
    new_keys: usize,
    /// Sweep when `new_keys` reaches this: the keys kept by the last sweep.
    sweep_after: usize,
}

const QUOTA_SHARDS: usize = 16;
/// The fewest new keys between two sweeps.
const MIN_SWEEP: usize = 64;

impl Shard {
    /// Drops caught-up keys; the next sweep comes after as many new keys as
    /// are kept (at least `MIN_SWEEP`, or the shard's capacity if smaller).
    fn sweep(&mut self, now: u64, capacity: usize) {
        self.tats.retain(|_, tat| *tat > now);
        if self.tats.capacity() > 4 * self.tats.len().max(MIN_SWEEP) {
            self.tats.shrink_to_fit();
        }
        self.new_keys = 0;
        self.sweep_after = self.tats.len().max(MIN_SWEEP.min(capacity));
    }
}

impl MemoryQuota {
    pub fn new(capacity: u64) -> Self {
        Self {
            shards: (0..QUOTA_SHARDS)
                .map(|_| std::sync::Mutex::new(Shard::default()))
                .collect(),
            per_shard: usize::try_from(capacity)
                .unwrap_or(usize::MAX)
                .div_ceil(QUOTA_SHARDS)
                .max(1),
            hasher: std::hash::RandomState::new(),
        }
    }

    /// Keys held now (caught-up ones not yet swept included).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).tats.len())
            .sum()
    }
}

#[async_trait]
impl QuotaStore for MemoryQuota {
    async fn acquire(&self, key: &str, limit: &Limit, want: u32) -> Result<Grant, BackendError> {
        use std::hash::BuildHasher as _;
        let now = now_us();
        let shard = &self.shards[self.hasher.hash_one(key) as usize % QUOTA_SHARDS];
        // Never poisoned in practice (nothing here panics); if it were, the
        // map is still consistent: every write is one insert or remove.
        let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        let stored = shard.tats.get(key).copied().filter(|&tat| tat > now);
        let (tat, grant) = gcra(stored, now, limit, want);
        if tat <= now {
            shard.tats.remove(key);
        } else if let Some(entry) = shard.tats.get_mut(key) {
            *entry = tat;
        } else {
            shard.new_keys += 1;
            if shard.new_keys >= shard.sweep_after {
                shard.sweep(now, self.per_shard);
            }
            if shard.tats.len() < self.per_shard {
                shard.tats.insert(key.into(), tat);
            }
        }
        Ok(grant)
    }

    fn is_local(&self) -> bool {
        true
    }
}

/// How long an untouched lease is kept. Dropping one loses at most its
/// unspent tokens (stricter, never looser) and a cached denial (the shared
/// store denies again), so a short time keeps memory to the active keys.
const LEASE_IDLE: Duration = Duration::from_secs(5);

/// The shortest time leased tokens stay spendable.
const MIN_LEASE_LIFETIME: Duration = Duration::from_millis(250);

/// One key's lease on this replica: its state behind a short synchronous
/// lock (the fast path spends a token or reads a denial, never awaiting),
/// and a second, asynchronous lock held across a refill from the shared
/// store, so concurrent checks of the key wait for the one refill instead
/// of each taking (and discarding) a lease of its own.
#[derive(Debug, Default)]
struct Lease {
    state: std::sync::Mutex<LeaseState>,
    refill: Mutex<()>,
}

#[derive(Debug, Default)]
struct LeaseState {
    tokens: u32,
    valid_until: Option<Instant>,
    denied_until: Option<Instant>,
}

impl Lease {
    fn state(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl LeaseState {
    /// The decision this lease can make on its own, spending a token if it
    /// allows; `None` when it must be refilled from the shared store.
    fn decide(&mut self, now: Instant) -> Option<RateDecision> {
        if let Some(until) = self.denied_until {
            if until > now {
                crate::held_counter!("ratelimit_local_decisions_total", "result" => "limited")
                    .increment(1);
                return Some(RateDecision::Limited {
                    retry_after: until - now,
                });
            }
            self.denied_until = None;
        }
        if self.tokens > 0 && self.valid_until.is_some_and(|v| v > now) {
            self.tokens -= 1;
            crate::held_counter!("ratelimit_local_decisions_total", "result" => "allowed")
                .increment(1);
            return Some(RateDecision::Allowed);
        }
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    Allowed,
    Limited { retry_after: Duration },
}

/// Leases in front of the shared [`QuotaStore`].
pub struct RateLimiter {
    shared: Arc<dyn QuotaStore>,
    /// Set when the limit fails open: used while the shared store is down.
    fallback: Option<MemoryQuota>,
    leases: Cache<String, Arc<Lease>>,
}

impl RateLimiter {
    pub fn new(shared: Arc<dyn QuotaStore>, fail_open: bool, capacity: u64) -> Self {
        Self {
            shared,
            fallback: fail_open.then(|| MemoryQuota::new(capacity)),
            leases: Cache::builder()
                .max_capacity(capacity)
                .time_to_idle(LEASE_IDLE)
                .build(),
        }
    }

    pub async fn check(&self, key: &str, limit: &Limit) -> Result<RateDecision, BackendError> {
        if self.shared.is_local() {
            let grant = self.shared.acquire(key, limit, 1).await?;
            return Ok(if grant.granted == 0 {
                RateDecision::Limited {
                    retry_after: grant.retry_after,
                }
            } else {
                RateDecision::Allowed
            });
        }
        let lease = self.leases.get_with_by_ref(key, Arc::default);
        if let Some(decision) = lease.state().decide(Instant::now()) {
            return Ok(decision);
        }
        // Spent or expired: one refill per key at a time on this replica;
        // whoever waited for another's refill decides on its result.
        let _refilling = lease.refill.lock().await;
        if let Some(decision) = lease.state().decide(Instant::now()) {
            return Ok(decision);
        }
        let grant = match self.shared.acquire(key, limit, limit.lease()).await {
            Ok(grant) => grant,
            Err(error) => match &self.fallback {
                Some(local) => {
                    tracing::warn!(%error, "rate-limit store unavailable: limiting locally (fail open)");
                    metrics::counter!("ratelimit_fallback_total").increment(1);
                    local.acquire(key, limit, 1).await?
                }
                None => return Err(error),
            },
        };
        let now = Instant::now();
        let mut l = lease.state();
        if grant.granted == 0 {
            l.tokens = 0;
            l.denied_until = Some(now + grant.retry_after);
            return Ok(RateDecision::Limited {
                retry_after: grant.retry_after,
            });
        }
        // This request takes one token; the rest are the lease, valid for
        // as long as they represent (T per token) but at least
        // MIN_LEASE_LIFETIME, so a high rate does not turn every request into
        // a Redis call. A replica never holds more than `lease` unspent
        // tokens, which is what bounds the error.
        l.tokens = grant.granted - 1;
        let represented =
            Duration::from_micros(limit.interval_us().saturating_mul(u64::from(grant.granted)));
        l.valid_until = Some(now + represented.max(MIN_LEASE_LIFETIME));
        Ok(RateDecision::Allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Limit = Limit {
        requests: 10,
        per_secs: 1,
        burst: 5,
    };

    /// A shared store that answers slowly and counts its calls (the exact
    /// GCRA of [`MemoryQuota`] behind it, with leases in front as for Redis).
    struct SlowShared {
        exact: MemoryQuota,
        calls: std::sync::atomic::AtomicU32,
    }

    #[async_trait]
    impl QuotaStore for SlowShared {
        async fn acquire(
            &self,
            key: &str,
            limit: &Limit,
            want: u32,
        ) -> Result<Grant, BackendError> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.exact.acquire(key, limit, want).await
        }
    }

    /// Two requests racing between the read that decides and the write that
    /// acts, a hundred times over: concurrent checks of one key on one
    /// replica wait for one refill at a time instead of each taking a lease
    /// of its own from the shared store (which would spend the key's budget
    /// on leases nobody uses).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_checks_of_one_key_share_one_refill_at_a_time() {
        let shared = Arc::new(SlowShared {
            exact: MemoryQuota::new(1000),
            calls: Default::default(),
        });
        let limiter = Arc::new(RateLimiter::new(shared.clone(), false, 1000));
        let limit = Limit {
            requests: 1000,
            per_secs: 1,
            burst: 100,
        };
        assert_eq!(limit.lease(), 10);
        let checks: Vec<_> = (0..100)
            .map(|_| {
                let limiter = limiter.clone();
                tokio::spawn(async move { limiter.check("user:racer", &limit).await.unwrap() })
            })
            .collect();
        let mut allowed = 0;
        for check in checks {
            if check.await.unwrap() == RateDecision::Allowed {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 100, "the burst covers every check");
        let calls = shared.calls.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            calls, 10,
            "one lease of 10 per refill, one refill at a time"
        );
    }

    #[tokio::test]
    async fn memory_quota_forgets_caught_up_keys_under_churn() {
        // One request per key, a 1 ms interval: every key has caught up
        // 1 ms later, so a churn of new keys does not pile up.
        let quota = MemoryQuota::new(1_000_000);
        let limit = Limit {
            requests: 1000,
            per_secs: 1,
            burst: 1,
        };
        for round in 0..20 {
            for i in 0..1000 {
                let grant = quota
                    .acquire(&format!("ip:{round}:{i}"), &limit, 1)
                    .await
                    .unwrap();
                assert_eq!(grant.granted, 1);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(
            quota.len() < 3000,
            "{} keys held after 20 000 distinct ones",
            quota.len()
        );
        // A key still paying off its burst is remembered.
        let strict = Limit {
            requests: 1,
            per_secs: 3600,
            burst: 1,
        };
        assert_eq!(quota.acquire("busy", &strict, 1).await.unwrap().granted, 1);
        for i in 0..5000 {
            quota
                .acquire(&format!("other:{i}"), &limit, 1)
                .await
                .unwrap();
        }
        assert_eq!(quota.acquire("busy", &strict, 1).await.unwrap().granted, 0);
    }

    #[tokio::test]
    async fn a_full_memory_quota_makes_room_once_its_keys_have_caught_up() {
        // One key per shard at most; every slot taken by keys that catch up
        // within a millisecond.
        let quota = MemoryQuota::new(QUOTA_SHARDS as u64);
        let fast = Limit {
            requests: 1000,
            per_secs: 1,
            burst: 1,
        };
        for i in 0..1000 {
            quota.acquire(&format!("fast:{i}"), &fast, 1).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        // New strict keys are remembered again (each allowed once, then
        // limited): the caught-up keys were swept to make room.
        let strict = Limit {
            requests: 1,
            per_secs: 3600,
            burst: 1,
        };
        let mut limited = 0;
        for round in 0..(2 * MIN_SWEEP) {
            let key = format!("strict:{round}");
            assert_eq!(quota.acquire(&key, &strict, 1).await.unwrap().granted, 1);
            limited += usize::from(quota.acquire(&key, &strict, 1).await.unwrap().granted == 0);
        }
        assert!(
            limited >= QUOTA_SHARDS / 2,
            "only {limited} strict keys remembered"
        );
    }

    #[test]
    fn a_full_memory_quota_gives_new_keys_a_full_burst_and_keeps_its_own() {
        let quota = MemoryQuota::new(16);
        let strict = Limit {
            requests: 1,
            per_secs: 3600,
            burst: 1,
        };
        let run = |key: &str| {
            futures::executor::block_on(quota.acquire(key, &strict, 1))
                .unwrap()
                .granted
        };
        for i in 0..64 {
            assert_eq!(run(&format!("k{i}")), 1);
        }
        assert!(quota.len() <= 16 + QUOTA_SHARDS, "{}", quota.len());
        let kept = (0..64).filter(|i| run(&format!("k{i}")) == 0).count();
        assert!(kept >= 1 && kept <= quota.len(), "kept {kept}");
    }

    #[test]
    fn gcra_allows_the_burst_then_one_per_interval() {
        let t = LIMIT.interval_us();
        let mut tat = None;
        let now = 1_000_000_000;
        for _ in 0..5 {
            let (next, g) = gcra(tat, now, &LIMIT, 1);
            assert_eq!(g.granted, 1);
            tat = Some(next);
        }
        let (_, g) = gcra(tat, now, &LIMIT, 1);
        assert_eq!(g.granted, 0);
        assert_eq!(g.retry_after, Duration::from_micros(t));
        let (_, g) = gcra(tat, now + t, &LIMIT, 1);
        assert_eq!(g.granted, 1, "one interval later one more conforms");
    }

    #[test]
    fn gcra_grants_part_of_a_lease_when_only_part_conforms() {
        let (tat, g) = gcra(None, 0, &LIMIT, 3);
        assert_eq!(g.granted, 3);
        let (_, g) = gcra(Some(tat), 0, &LIMIT, 3);
        assert_eq!(g.granted, 2);
    }

    #[tokio::test]
    async fn the_limiter_admits_exactly_the_burst_at_once() {
        let limiter = RateLimiter::new(Arc::new(MemoryQuota::new(100)), true, 100);
        let slow = Limit {
            requests: 1,
            per_secs: 3600,
            burst: 20,
        };
        let mut allowed = 0;
        for _ in 0..50 {
            if limiter.check("k", &slow).await.unwrap() == RateDecision::Allowed {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 20);
        assert!(
            matches!(
                limiter.check("other", &slow).await.unwrap(),
                RateDecision::Allowed
            ),
            "keys are independent"
        );
    }

    struct Down;

    #[async_trait]
    impl QuotaStore for Down {
        async fn acquire(&self, _: &str, _: &Limit, _: u32) -> Result<Grant, BackendError> {
            Err(BackendError::unavailable("redis", "down"))
        }
    }

    #[tokio::test]
    async fn a_down_store_fails_open_to_local_limiting_or_closed_when_configured() {
        let open = RateLimiter::new(Arc::new(Down), true, 100);
        let limit = Limit {
            requests: 1,
            per_secs: 3600,
            burst: 2,
        };
        assert_eq!(
            open.check("k", &limit).await.unwrap(),
            RateDecision::Allowed
        );
        assert_eq!(
            open.check("k", &limit).await.unwrap(),
            RateDecision::Allowed
        );
        assert!(
            matches!(
                open.check("k", &limit).await.unwrap(),
                RateDecision::Limited { .. }
            ),
            "still limited locally"
        );
        let closed = RateLimiter::new(Arc::new(Down), false, 100);
        assert!(closed.check("k", &limit).await.is_err());
    }

    #[tokio::test]
    async fn an_in_process_store_keeps_a_key_only_while_it_pays_off_requests() {
        let limiter = RateLimiter::new(Arc::new(MemoryQuota::new(100)), true, 100);
        for _ in 0..5 {
            assert_eq!(
                limiter.check("ip:a", &LIMIT).await.unwrap(),
                RateDecision::Allowed
            );
        }
        assert!(matches!(
            limiter.check("ip:a", &LIMIT).await.unwrap(),
            RateDecision::Limited { .. }
        ));
        limiter.leases.run_pending_tasks();
        assert_eq!(
            limiter.leases.entry_count(),
            0,
            "no leases in front of a store in this process"
        );
        // The TAT is at most burst x interval (500 ms) ahead; after it the
        // key's state is a full burst again, and the entry is gone.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let store = MemoryQuota::new(100);
        store.acquire("ip:b", &LIMIT, 1).await.unwrap();
        assert_eq!(store.len(), 1);
        // Swept once caught up (memory_quota_forgets_caught_up_keys_under_churn).
        for _ in 0..5 {
            assert_eq!(
                limiter.check("ip:a", &LIMIT).await.unwrap(),
                RateDecision::Allowed,
                "a full burst again"
            );
        }
    }
}
