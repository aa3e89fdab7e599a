//! argon2id hashing on a dedicated, bounded pool of worker threads.
//!
//! Hashing is CPU- and memory-bound for tens of milliseconds, so it never runs
//! on the async workers. `max_concurrent_hashes` OS threads (one per core by
//! default) take jobs from a bounded queue; each keeps its argon2 memory
//! (19 MiB at the defaults) from one job to the next instead of allocating
//! and faulting in a fresh buffer per hash, and gives it back after
//! [`RELEASE_MEMORY_AFTER`] without work. Unknown users are verified against a
//! dummy hash with the same parameters so a login for a missing account costs
//! the same as one for a real account.
//!
//! **Admission under overload.** Hashing capacity is fixed (about 75 hashes
//! per second per core at the defaults), so a flood of logins must not turn
//! into an ever-longer queue that every real user waits in. Jobs wait in a
//! bounded queue ([`AdmissionConfig`]):
//!
//! * a job that cannot be queued (queue full, or its source already has
//!   `max_queued_per_source` waiting) is refused at once with
//!   [`HashError::Overloaded`];
//! * a job that has not *started* within `max_wait` — or by its caller's own
//!   deadline, whichever is sooner — is refused, never hashed late; and one
//!   that would not start by then, judged from the jobs that would go before
//!   it and how long a hash takes now, is refused at once rather than after
//!   waiting for nothing;
//! * workers take jobs of **known devices** first (a valid device token for
//!   the account: see `TokenService::known_device`), then the job whose source has used
//!   the least hashing recently (usage decays with a half-life of
//!   [`USAGE_HALF_LIFE`]). A source flooding the service therefore queues
//!   behind everyone who has not, instead of in front of them. When the queue
//!   is full, a known device, or a source that has used at least one hash
//!   less than the heaviest source waiting, takes the place of that source's
//!   newest job;
//! * with `device_lane`, one more worker at the process's own priority (the
//!   others run at `worker_nice`) takes known devices first and then, while
//!   new addresses are a minority of the recent demand, jobs from **quiet
//!   sources** (less than one hash used recently): a concentrated flood
//!   (every attempt from one of a few addresses) leaves someone new a worker
//!   that is not busy with the flood; a distributed one (every attempt from a
//!   new address) is itself the new addresses, and the lane leaves it to the
//!   general workers (see [`QUIET_SHARE_MAX`]);
//! * every address is also counted in its **network** (its /24, or /48 for
//!   IPv6: see [`network_of`]): a source's weight is its own usage plus its
//!   network's recent attempts divided by [`NETWORK_SHARE`], and a source is
//!   quiet only while its network has made fewer than
//!   [`QUIET_NETWORK_ATTEMPTS`] attempts recently. A flood from a new address per attempt drawn from a few
//!   networks is then as heavy as a flood from a few addresses, and someone
//!   new from another network keeps the lane. A flood spread over more
//!   networks than it sends attempts per network (a botnet across the
//!   internet) still looks like newcomers: only device tokens tell a known
//!   user from it.

mod hasher;
mod phc;

pub use hasher::PasswordHasher;

use std::{
    collections::HashMap,
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use argon2::{
    Algorithm, Argon2, Block, Params, PasswordHash, Version,
    password_hash::{Output, ParamsString, SaltString},
};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;
use tracing::Instrument as _;

use super::model::Password;
use crate::accounts::config::PasswordConfig;

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("argon2 parameters are invalid: {0}")]
    Params(argon2::Error),
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("the hashing pool is shut down")]
    PoolClosed,
    /// Refused without hashing: the queue is full, this source has enough
    /// waiting, or the job could not start within its wait.
    #[error("password hashing is overloaded")]
    Overloaded { retry_after: Duration },
}

/// Bounds of the hashing queue.
#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    /// Jobs waiting at most (all sources together).
    pub max_queued: usize,
    /// Jobs one source may have waiting.
    pub max_queued_per_source: usize,
    /// The longest a job may wait to start.
    pub max_wait: Duration,
    /// One more worker that takes known-device jobs, at the process's own
    /// priority: a known device's login does not wait for a worker busy
    /// with a flood, nor run at the flood's lowered priority.
    pub device_lane: bool,
    /// The lane also takes jobs from quiet sources while they are a minority
    /// of the recent demand (see [`QUIET_SHARE_MAX`]).
    pub quiet_sources_in_lane: bool,
}

impl AdmissionConfig {
    /// Generous bounds for tools and tests: effectively no admission control.
    pub fn unbounded() -> Self {
        Self {
            max_queued: 1 << 20,
            max_queued_per_source: 1 << 20,
            max_wait: Duration::from_secs(3600),
            device_lane: false,
            quiet_sources_in_lane: false,
        }
    }
}

/// Which jobs a worker takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// Any job, known devices first.
    All,
    /// Known-device jobs, then (when enabled) jobs from quiet sources while
    /// quiet sources are a minority of the demand.
    Priority,
}

/// Who a hashing job is for, for admission.
#[derive(Debug, Clone, Default)]
pub struct Admission {
    /// The client address (None: an operator or internal caller).
    pub source: Option<Arc<str>>,
    /// The caller presented a valid device token for this account.
    pub known_device: bool,
    /// The caller's own deadline (gRPC `grpc-timeout`): a job still waiting
    /// then is refused.
    pub deadline: Option<Instant>,
}

/// How fast a source's recent hashing usage is forgotten.
pub const USAGE_HALF_LIFE: Duration = Duration::from_secs(10);

/// A source that has used less than this many hashes recently (decayed) is
/// quiet: someone new, or back after a while.
const QUIET_USAGE: f64 = 1.0;

/// ... and has made fewer than this many attempts recently (decayed like
/// usage), hashed or refused. Usage alone is not enough: under a flood
/// that is mostly refused (a closed loop, or addresses locked out), each
/// flooding address hashes little, and would look as quiet as a newcomer
/// while it sends tens of attempts a second. A person retrying a typo a
/// few times stays quiet.
const QUIET_ATTEMPTS: f64 = 4.0;

/// The lane takes quiet sources' jobs only while they are less than this
/// share of the recent demand (see [`Demand`]). Under a
/// flood from a few addresses the share is small and a new user's login goes
/// to the lane; under a flood from a new address per attempt nearly every
/// job is from a quiet source, and the lane keeps to known devices (a
/// flood job on the lane would make the next known device wait for it).
pub const QUIET_SHARE_MAX: f64 = 0.5;

/// A network's recent attempts (hashed or refused) count in the weight of
/// each of its addresses divided by this: a network weighs as one source
/// that has hashed once per this many attempts, so a few people logging in
/// from one office do not weigh on each other, and a flood that moves to a
/// new address per attempt within one network does — by its attempts, not
/// by what it got hashed, since most of a flood is refused.
pub const NETWORK_SHARE: f64 = 32.0;

/// A source is quiet only while its network has made fewer than this many
/// attempts recently (decayed like usage).
pub const QUIET_NETWORK_ATTEMPTS: f64 = 4.0;

/// The network of a client address, for admission: its /24 (IPv4, also
/// IPv4-mapped IPv6) or its /48 (IPv6), the smallest blocks routed on the
/// internet. `None` for what is not an address.
pub fn network_of(source: &str) -> Option<Arc<str>> {
    let v4 = |o: [u8; 4]| format!("{}.{}.{}.0/24", o[0], o[1], o[2]);
    let network = match source.parse::<std::net::IpAddr>().ok()? {
        std::net::IpAddr::V4(a) => v4(a.octets()),
        std::net::IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(a) => v4(a.octets()),
            None => {
                let s = a.segments();
                format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
            }
        },
    };
    Some(Arc::from(network))
}

/// Sources whose usage is remembered at most (the least used are dropped
/// first; a forgotten source simply counts as fresh).
const MAX_TRACKED_SOURCES: usize = 65_536;

/// The outcome of a verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verification {
    pub matches: bool,
    /// The stored hash used other parameters than the configured ones.
    pub needs_rehash: bool,
}

enum Job {
    Hash {
        password: SecretString,
        reply: oneshot::Sender<Result<String, HashError>>,
    },
    Verify {
        password: SecretString,
        hash: Arc<str>,
        reply: oneshot::Sender<Result<Verification, HashError>>,
    },
}

impl Job {
    fn refuse(self, error: HashError) {
        match self {
            Job::Hash { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Job::Verify { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }

    /// The caller stopped waiting (its call was cancelled).
    fn abandoned(&self) -> bool {
        match self {
            Job::Hash { reply, .. } => reply.is_closed(),
            Job::Verify { reply, .. } => reply.is_closed(),
        }
    }
}

struct Queued {
    job: Job,
    source: Option<Arc<str>>,
    /// `source`'s network ([`network_of`]).
    network: Option<Arc<str>>,
    known: bool,
    queued_at: Instant,
    deadline: Instant,
    seq: u64,
}

/// Recent hashing per source, decaying exponentially.
#[derive(Default)]
struct Usage {
    by_source: HashMap<Arc<str>, (f64, Instant)>,
}

impl Usage {
    fn decayed((value, at): (f64, Instant), now: Instant) -> f64 {
        let age = now.saturating_duration_since(at).as_secs_f64();
        value * 0.5f64.powf(age / USAGE_HALF_LIFE.as_secs_f64())
    }

    fn of(&self, source: Option<&Arc<str>>, now: Instant) -> f64 {
        source
            .and_then(|s| self.by_source.get(s))
            .map_or(0.0, |e| Self::decayed(*e, now))
    }

    fn add(&mut self, source: &Arc<str>, now: Instant) {
        if self.by_source.len() >= MAX_TRACKED_SOURCES && !self.by_source.contains_key(source) {
            // Forget what has decayed to almost nothing; if that frees
            // nothing, this source goes untracked (it counts as fresh).
            self.by_source.retain(|_, e| Self::decayed(*e, now) >= 0.05);
            if self.by_source.len() >= MAX_TRACKED_SOURCES {
                return;
            }
        }
        let entry = self.by_source.entry(source.clone()).or_insert((0.0, now));
        *entry = (Self::decayed(*entry, now) + 1.0, now);
    }
}

/// How fast the demand's mix is forgotten: short, so that a flood that
/// changes shape (from a few addresses to a new one per attempt) changes the
/// lane's choice within seconds.
const DEMAND_HALF_LIFE: Duration = Duration::from_secs(2);

/// Recent demand (attempts to queue a job), all and from quiet sources,
/// decaying with [`DEMAND_HALF_LIFE`].
#[derive(Default)]
struct Demand {
    all: f64,
    quiet: f64,
    at: Option<Instant>,
}

impl Demand {
    fn decay(&mut self, now: Instant) {
        if let Some(at) = self.at {
            let age = now.saturating_duration_since(at).as_secs_f64();
            let factor = 0.5f64.powf(age / DEMAND_HALF_LIFE.as_secs_f64());
            self.all *= factor;
            self.quiet *= factor;
        }
        self.at = Some(now);
    }

    fn add(&mut self, quiet: bool, now: Instant) {
        self.decay(now);
        self.all += 1.0;
        if quiet {
            self.quiet += 1.0;
        }
    }

    /// Whether quiet sources are a minority of the recent demand (the ratio
    /// does not change with decay, so none is applied here).
    fn quiet_are_few(&self) -> bool {
        self.quiet < QUIET_SHARE_MAX * self.all
    }
}

#[derive(Default)]
struct QueueState {
    waiting: Vec<Queued>,
    usage: Usage,
    /// Attempts per source (admitted or refused), decaying like `usage`.
    attempts: Usage,
    /// `attempts` per network ([`network_of`]).
    network_attempts: Usage,
    demand: Demand,
    /// How long a general worker takes per job now, wall clock (moving
    /// average): what the queue drains at, contention included.
    seconds_per_job: Option<f64>,
    seq: u64,
    closed: bool,
}

impl QueueState {
    /// Whether `source` is quiet: a client address that has hashed less
    /// than [`QUIET_USAGE`] and tried less than [`QUIET_ATTEMPTS`] recently,
    /// in a network that has tried less than [`QUIET_NETWORK_ATTEMPTS`], and
    /// has at most `waiting` jobs queued (operators' and internal jobs,
    /// without an address, are not).
    fn quiet(
        &self,
        source: Option<&Arc<str>>,
        network: Option<&Arc<str>>,
        now: Instant,
        waiting: usize,
    ) -> bool {
        source.is_some()
            && self.usage.of(source, now) < QUIET_USAGE
            && self.attempts.of(source, now) < QUIET_ATTEMPTS
            && self.network_attempts.of(network, now) < QUIET_NETWORK_ATTEMPTS
            && self
                .waiting
                .iter()
                .filter(|q| q.source.as_ref() == source)
                .nth(waiting)
                .is_none()
    }

    /// How much `source` has hashed recently, its network's attempts
    /// included: what the workers order by (least first).
    fn weight(&self, source: Option<&Arc<str>>, network: Option<&Arc<str>>, now: Instant) -> f64 {
        self.usage.of(source, now) + self.network_attempts.of(network, now) / NETWORK_SHARE
    }

    /// Counts an attempt to queue a job for `admission` in the demand.
    fn note_demand(&mut self, admission: &Admission, network: Option<&Arc<str>>, now: Instant) {
        if !admission.known_device
            && let Some(source) = &admission.source
        {
            let quiet = self.quiet(Some(source), network, now, 0);
            self.demand.add(quiet, now);
            self.attempts.add(source, now);
            if let Some(network) = network {
                self.network_attempts.add(network, now);
            }
        }
    }
}

struct Scheduler {
    state: Mutex<QueueState>,
    ready: Condvar,
    config: AdmissionConfig,
    /// General workers (the lane not counted): how many jobs start at once.
    workers: usize,
}

impl Scheduler {
    /// Whether the lane takes quiet sources' jobs now.
    fn quiet_in_lane(&self, state: &QueueState) -> bool {
        self.config.quiet_sources_in_lane && state.demand.quiet_are_few()
    }

    /// Whether a waiting job is the lane's: a known device, or a quiet
    /// source while the lane takes them (`quiet_too`).
    fn for_lane(&self, state: &QueueState, q: &Queued, quiet_too: bool, now: Instant) -> bool {
        q.known || (quiet_too && state.quiet(q.source.as_ref(), q.network.as_ref(), now, 1))
    }

    /// What a refused caller is told to wait: about one queue's worth.
    fn retry_after(&self) -> Duration {
        Duration::from_secs(1).max(self.config.max_wait)
    }

    fn overloaded(&self, reason: &'static str) -> HashError {
        metrics::counter!("password_hash_refused_total", "reason" => reason).increment(1);
        HashError::Overloaded {
            retry_after: self.retry_after(),
        }
    }

    /// The latest a job for `admission` may start: `max_wait` from now, or
    /// the caller's own deadline when sooner.
    fn deadline(&self, admission: &Admission, now: Instant) -> Instant {
        let deadline = now + self.config.max_wait;
        admission
            .deadline
            .map_or(deadline, |caller| deadline.min(caller))
    }

    /// A general worker finished a job that took `took`.
    fn record_job(&self, took: Duration) {
        if let Ok(mut state) = self.state.lock() {
            let took = took.as_secs_f64();
            state.seconds_per_job = Some(
                state
                    .seconds_per_job
                    .map_or(took, |average| average + 0.2 * (took - average)),
            );
        }
    }

    fn submit(&self, job: Job, admission: &Admission) -> Result<(), HashError> {
        let now = Instant::now();
        let deadline = self.deadline(admission, now);
        if deadline <= now {
            return Err(self.overloaded("deadline"));
        }
        let mut state = self.state.lock().map_err(|_| HashError::PoolClosed)?;
        if state.closed {
            return Err(HashError::PoolClosed);
        }
        let network = admission.source.as_deref().and_then(network_of);
        state.note_demand(admission, network.as_ref(), now);
        match self.place(&state, admission, network.as_ref(), now) {
            Err(reason) => return Err(self.overloaded(reason)),
            Ok(Some(victim)) => {
                let evicted = state.waiting.swap_remove(victim);
                evicted.job.refuse(self.overloaded("evicted"));
            }
            Ok(None) => {}
        }
        state.seq += 1;
        let seq = state.seq;
        state.waiting.push(Queued {
            job,
            source: admission.source.clone(),
            network,
            known: admission.known_device,
            queued_at: now,
            deadline,
            seq,
        });
        metrics::gauge!("password_hash_queue_depth").set(state.waiting.len() as f64);
        drop(state);
        // Every idle worker looks: the one woken must be one whose lane
        // takes this job (a device-lane worker leaves a flood job alone).
        self.ready.notify_all();
        Ok(())
    }

    /// Whether a job for `admission` can be queued now: `Ok(None)` into a
    /// free place, `Ok(Some(i))` in place of waiting job `i`, `Err(reason)`
    /// not at all. A full queue makes room for a known device, or for a
    /// source that has used at least one hash less than the heaviest source
    /// waiting, by dropping that source's newest job.
    fn place(
        &self,
        state: &QueueState,
        admission: &Admission,
        network: Option<&Arc<str>>,
        now: Instant,
    ) -> Result<Option<usize>, &'static str> {
        if let Some(source) = &admission.source
            && !admission.known_device
            && state
                .waiting
                .iter()
                .filter(|q| q.source.as_ref() == Some(source))
                .count()
                >= self.config.max_queued_per_source
        {
            return Err("source_queue_full");
        }
        let mine = state.weight(admission.source.as_ref(), network, now);
        // Would it start in time? The jobs that go before it (known devices,
        // and sources that weigh no more than this one) drain at the
        // general workers' current pace; a job for the lane waits only for
        // the lane's jobs ahead of it. Known devices have the lane.
        if !admission.known_device
            && let Some(per_job) = state.seconds_per_job
        {
            let quiet_too = self.quiet_in_lane(state);
            let lane = self.config.device_lane
                && quiet_too
                && state.quiet(admission.source.as_ref(), network, now, 0);
            let ahead = state
                .waiting
                .iter()
                .filter(|q| !lane || self.for_lane(state, q, quiet_too, now))
                .filter(|q| {
                    q.known || state.weight(q.source.as_ref(), q.network.as_ref(), now) <= mine
                })
                .count();
            let workers = if lane { 1 } else { self.workers.max(1) };
            let wait = per_job * ahead as f64 / workers as f64;
            if now + Duration::from_secs_f64(wait) >= self.deadline(admission, now) {
                return Err("would_wait_too_long");
            }
        }
        if state.waiting.len() < self.config.max_queued {
            return Ok(None);
        }
        let victim = state
            .waiting
            .iter()
            .enumerate()
            .filter(|(_, q)| !q.known)
            .map(|(i, q)| {
                let weight = state.weight(q.source.as_ref(), q.network.as_ref(), now);
                (i, weight, q.seq)
            })
            .max_by(|a, b| a.1.total_cmp(&b.1).then(a.2.cmp(&b.2)));
        match victim {
            Some((i, heaviest, _)) if admission.known_device || mine + 1.0 <= heaviest => {
                Ok(Some(i))
            }
            _ => Err("queue_full"),
        }
    }

    /// Whether a job for `admission` would be queued now: lets a caller
    /// refuse before doing any other work for it. Only the demand changes,
    /// for an attempt refused here (an admitted one is counted when it is
    /// submitted).
    fn admissible(&self, admission: &Admission) -> bool {
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        let now = Instant::now();
        let network = admission.source.as_deref().and_then(network_of);
        let admitted = self.place(&state, admission, network.as_ref(), now).is_ok();
        if !admitted {
            state.note_demand(admission, network.as_ref(), now);
        }
        admitted
    }

    /// The next job to run: known devices first (oldest first), then the
    /// least recently used source (oldest first among equals). Jobs past
    /// their deadline, or whose caller is gone, are dropped on the way.
    /// `None` when the pool is shut down. After `idle` without a job,
    /// `idle_hook` runs once (outside the lock) before waiting on.
    fn next(&self, lane: Lane, idle: Duration, idle_hook: &mut impl FnMut()) -> Option<Job> {
        let mut state = self.state.lock().ok()?;
        let mut hooked = false;
        loop {
            if state.closed {
                return None;
            }
            if let Some(job) = self.pick(&mut state, lane, Instant::now()) {
                return Some(job);
            }
            // Sleep until a job arrives. A job that expires meanwhile is
            // refused when a worker next looks, at most one hash later.
            if hooked {
                state = self.ready.wait(state).ok()?;
            } else {
                let (guard, waited) = self.ready.wait_timeout(state, idle).ok()?;
                state = guard;
                if waited.timed_out() {
                    hooked = true;
                    drop(state);
                    idle_hook();
                    state = self.state.lock().ok()?;
                }
            }
        }
    }

    fn pick(&self, state: &mut QueueState, lane: Lane, now: Instant) -> Option<Job> {
        let mut i = 0;
        while i < state.waiting.len() {
            if state.waiting[i].deadline <= now {
                let expired = state.waiting.swap_remove(i);
                expired.job.refuse(self.overloaded("wait_expired"));
            } else if state.waiting[i].job.abandoned() {
                state.waiting.swap_remove(i);
            } else {
                i += 1;
            }
        }
        let quiet_too = self.quiet_in_lane(state);
        let for_lane = |q: &Queued| self.for_lane(state, q, quiet_too, now);
        let weight = |q: &Queued| state.weight(q.source.as_ref(), q.network.as_ref(), now);
        let best_of = |take: &dyn Fn(&Queued) -> bool| {
            state
                .waiting
                .iter()
                .enumerate()
                .filter(|(_, q)| take(q))
                .min_by(|(_, a), (_, b)| {
                    b.known
                        .cmp(&a.known)
                        .then_with(|| weight(a).total_cmp(&weight(b)))
                        .then(a.seq.cmp(&b.seq))
                })
                .map(|(i, _)| i)
        };
        let best = match lane {
            Lane::Priority => best_of(&for_lane),
            // With a lane, its jobs are left to it while there is other
            // work: a general worker hashes at `worker_nice`, and under
            // load a known device's hash there would take many times as long
            // as on the lane.
            Lane::All if self.config.device_lane => {
                best_of(&|q| !for_lane(q)).or_else(|| best_of(&|_| true))
            }
            Lane::All => best_of(&|_| true),
        }?;
        let queued = state.waiting.swap_remove(best);
        if lane == Lane::Priority {
            let job = if queued.known {
                "known_device"
            } else {
                "quiet_source"
            };
            metrics::counter!("password_hash_lane_total", "job" => job).increment(1);
        }
        // A known device's hashing is not held against its address.
        if let Some(source) = queued.source.as_ref().filter(|_| !queued.known) {
            state.usage.add(source, now);
        }
        metrics::gauge!("password_hash_queue_depth").set(state.waiting.len() as f64);
        metrics::histogram!("password_hash_wait_seconds").record(
            now.saturating_duration_since(queued.queued_at)
                .as_secs_f64(),
        );
        Some(queued.job)
    }
}

#[cfg(test)]
mod tests {
    use argon2::PasswordVerifier;

    use super::{phc::worker, *};

    fn config(memory_kib: u32) -> PasswordConfig {
        PasswordConfig {
            memory_kib,
            iterations: 1,
            parallelism: 1,
            max_concurrent_hashes: 1,
            min_length: 8,
            max_length: 128,
            max_queued: 0,
            max_queued_per_source: 8,
            max_wait_ms: 500,
            worker_nice: 10,
            device_lane: true,
            ..PasswordConfig::default()
        }
    }

    #[tokio::test]
    async fn hashing_threads_run_at_the_configured_nice_value() {
        let config = PasswordConfig {
            worker_nice: 7,
            ..config(8)
        };
        let _hasher = PasswordHasher::new(&config, 1).await.unwrap();
        // /proc/self/task/<tid>/stat: "tid (comm) state …", nice is the 19th
        // field, the 17th after the name.
        let nices: Vec<i32> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| {
                let dir = task.ok()?.path();
                let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
                if comm.trim() != "argon2-0" {
                    return None;
                }
                let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
                let (_, after_name) = stat.rsplit_once(") ")?;
                after_name.split(' ').nth(16)?.parse().ok()
            })
            .collect();
        assert!(nices.contains(&7), "argon2 threads' nice values: {nices:?}");
    }

    fn password(s: &str) -> Password {
        Password::parse("password", s, 8, 128).unwrap()
    }

    #[tokio::test]
    async fn a_hash_verifies_its_password_only() {
        let hasher = PasswordHasher::new(&config(64), 1).await.unwrap();
        let hash = hasher
            .hash(&password("correct horse"), &Admission::default())
            .await
            .unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{hash}");
        assert!(
            hasher
                .verify(
                    &password("correct horse"),
                    Some(&hash),
                    &Admission::default()
                )
                .await
                .unwrap()
                .matches
        );
        assert!(
            !hasher
                .verify(
                    &password("wrong horse!"),
                    Some(&hash),
                    &Admission::default()
                )
                .await
                .unwrap()
                .matches
        );
    }

    #[tokio::test]
    async fn hashes_are_standard_phc_strings_both_ways() {
        let hasher = PasswordHasher::new(&config(64), 2).await.unwrap();
        // Ours verifies with the reference implementation…
        let ours = hasher
            .hash(&password("correct horse"), &Admission::default())
            .await
            .unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(
            Argon2::default()
                .verify_password(b"correct horse", &parsed)
                .is_ok()
        );
        // …and one made by the reference implementation verifies with ours.
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let theirs =
            argon2::PasswordHasher::hash_password(&Argon2::default(), b"correct horse", &salt)
                .unwrap()
                .to_string();
        assert!(
            hasher
                .verify(
                    &password("correct horse"),
                    Some(&theirs),
                    &Admission::default()
                )
                .await
                .unwrap()
                .matches
        );
    }

    #[tokio::test]
    async fn an_unknown_account_never_matches_even_the_dummy_password() {
        let hasher = PasswordHasher::new(&config(64), 1).await.unwrap();
        let v = hasher
            .verify(
                &password("dummy password that matches no account"),
                None,
                &Admission::default(),
            )
            .await
            .unwrap();
        assert!(!v.matches);
    }

    #[tokio::test]
    async fn changed_parameters_ask_for_a_rehash() {
        let old = PasswordHasher::new(&config(64), 1).await.unwrap();
        let hash = old
            .hash(&password("correct horse"), &Admission::default())
            .await
            .unwrap();
        let new = PasswordHasher::new(&config(128), 1).await.unwrap();
        let v = new
            .verify(
                &password("correct horse"),
                Some(&hash),
                &Admission::default(),
            )
            .await
            .unwrap();
        assert_eq!(
            v,
            Verification {
                matches: true,
                needs_rehash: true
            }
        );
        let same = old
            .verify(
                &password("correct horse"),
                Some(&hash),
                &Admission::default(),
            )
            .await
            .unwrap();
        assert!(!same.needs_rehash);
    }

    #[tokio::test]
    async fn a_malformed_stored_hash_is_an_error_not_a_match() {
        let hasher = PasswordHasher::new(&config(64), 1).await.unwrap();
        assert!(
            hasher
                .verify(
                    &password("correct horse"),
                    Some("$argon2id$garbage"),
                    &Admission::default()
                )
                .await
                .is_err()
        );
    }

    /// [`scheduler`] with its admission configuration changed by `change`.
    fn scheduler_with(change: impl FnOnce(&mut AdmissionConfig)) -> Scheduler {
        let mut s = scheduler(100, 100);
        change(&mut s.config);
        s
    }

    /// A scheduler without worker threads: jobs are taken by hand.
    fn scheduler(max_queued: usize, per_source: usize) -> Scheduler {
        Scheduler {
            state: Mutex::new(QueueState::default()),
            ready: Condvar::new(),
            config: AdmissionConfig {
                max_queued,
                max_queued_per_source: per_source,
                max_wait: Duration::from_secs(10),
                device_lane: false,
                quiet_sources_in_lane: true,
            },
            workers: 1,
        }
    }

    type Answer = oneshot::Receiver<Result<String, HashError>>;

    /// A job named by its password; the receiver sees its refusal.
    fn job(name: &str) -> (Job, Answer) {
        let (reply, answer) = oneshot::channel();
        let job = Job::Hash {
            password: SecretString::from(name.to_owned()),
            reply,
        };
        (job, answer)
    }

    fn from(source: &str) -> Admission {
        Admission {
            source: Some(Arc::from(source)),
            ..Admission::default()
        }
    }

    /// From `source`, with a valid device token.
    fn known(source: &str) -> Admission {
        Admission {
            known_device: true,
            ..from(source)
        }
    }

    fn name(job: Option<Job>) -> String {
        match job.expect("a job") {
            Job::Hash { password, .. } | Job::Verify { password, .. } => {
                password.expose_secret().to_owned()
            }
        }
    }

    fn refused(answer: &mut oneshot::Receiver<Result<String, HashError>>) -> bool {
        matches!(answer.try_recv(), Ok(Err(HashError::Overloaded { .. })))
    }

    #[test]
    fn a_full_queue_refuses_at_once_and_one_source_cannot_fill_it() {
        let s = scheduler(3, 2);
        let mut kept = Vec::new();
        for _ in 0..2 {
            let (j, a) = job("flood");
            s.submit(j, &from("10.0.0.1")).unwrap();
            kept.push(a);
        }
        let (j, _a) = job("flood");
        assert!(matches!(
            s.submit(j, &from("10.0.0.1")),
            Err(HashError::Overloaded { .. })
        ));
        let (j, _b) = job("other");
        s.submit(j, &from("10.0.0.2")).unwrap();
        let (j, _c) = job("third");
        assert!(
            matches!(
                s.submit(j, &from("10.0.0.3")),
                Err(HashError::Overloaded { .. })
            ),
            "the queue holds 3"
        );
    }

    #[test]
    fn the_least_used_source_goes_first_and_known_devices_before_all() {
        let s = scheduler(100, 100);
        let now = Instant::now();
        {
            let mut state = s.state.lock().unwrap();
            for _ in 0..20 {
                state.usage.add(&Arc::from("flood"), now);
            }
        }
        let mut answers = Vec::new();
        for (n, source) in [
            ("flood-1", "flood"),
            ("flood-2", "flood"),
            ("fresh", "fresh"),
        ] {
            let (j, a) = job(n);
            s.submit(j, &from(source)).unwrap();
            answers.push(a);
        }
        let (j, _k) = job("device");
        s.submit(j, &known("flood")).unwrap();
        let mut state = s.state.lock().unwrap();
        assert_eq!(name(s.pick(&mut state, Lane::All, now)), "device");
        assert_eq!(name(s.pick(&mut state, Lane::All, now)), "fresh");
        assert_eq!(
            name(s.pick(&mut state, Lane::All, now)),
            "flood-1",
            "oldest first"
        );
        assert_eq!(name(s.pick(&mut state, Lane::All, now)), "flood-2");
        assert!(s.pick(&mut state, Lane::All, now).is_none());
    }

    #[test]
    fn the_device_lane_takes_known_devices_only() {
        let s = scheduler(100, 100);
        let now = Instant::now();
        let (j, _f) = job("flood");
        s.submit(j, &from("flood")).unwrap();
        let mut state = s.state.lock().unwrap();
        assert!(
            s.pick(&mut state, Lane::Priority, now).is_none(),
            "a flood job waits for the general workers"
        );
        drop(state);
        let (j, _k) = job("device");
        s.submit(j, &known("flood")).unwrap();
        let mut state = s.state.lock().unwrap();
        assert_eq!(name(s.pick(&mut state, Lane::Priority, now)), "device");
        assert_eq!(name(s.pick(&mut state, Lane::All, now)), "flood");
    }

    /// `n` jobs queued, one from each of `sources` in turn, after each
    /// source has used `used` hashes.
    fn flood(s: &Scheduler, sources: &[&str], used: usize, n: usize) -> Vec<Answer> {
        let now = Instant::now();
        {
            let mut state = s.state.lock().unwrap();
            for source in sources {
                for _ in 0..used {
                    state.usage.add(&Arc::from(*source), now);
                }
            }
        }
        (0..n)
            .map(|i| {
                let (j, a) = job("flood");
                s.submit(j, &from(sources[i % sources.len()])).unwrap();
                a
            })
            .collect()
    }

    #[test]
    fn the_lane_takes_a_quiet_source_under_a_flood_from_few_addresses() {
        let s = scheduler(100, 100);
        let _flood = flood(&s, &["10.0.0.1", "10.0.0.2"], 5, 20);
        let now = Instant::now();
        let mut state = s.state.lock().unwrap();
        assert!(
            s.pick(&mut state, Lane::Priority, now).is_none(),
            "the flood's jobs are left to the general workers"
        );
        drop(state);
        let (j, _n) = job("newcomer");
        s.submit(j, &from("192.0.2.7")).unwrap();
        let (j, _k) = job("device");
        s.submit(j, &known("10.0.0.1")).unwrap();
        let mut state = s.state.lock().unwrap();
        assert_eq!(name(s.pick(&mut state, Lane::Priority, now)), "device");
        assert_eq!(name(s.pick(&mut state, Lane::Priority, now)), "newcomer");
        assert!(s.pick(&mut state, Lane::Priority, now).is_none());
    }

    #[test]
    fn the_lane_leaves_quiet_sources_alone_when_they_are_the_flood() {
        // A distributed flood: every job from an address never seen before,
        // each in a network never seen before.
        let s = scheduler(100, 100);
        let fresh: Vec<String> = (0..30).map(|i| format!("10.{i}.0.1")).collect();
        let fresh: Vec<&str> = fresh.iter().map(String::as_str).collect();
        let _flood = flood(&s, &fresh, 0, 30);
        let (j, _n) = job("newcomer");
        s.submit(j, &from("192.0.2.7")).unwrap();
        let now = Instant::now();
        let mut state = s.state.lock().unwrap();
        assert!(
            s.pick(&mut state, Lane::Priority, now).is_none(),
            "a newcomer is indistinguishable from this flood"
        );
        assert!(s.pick(&mut state, Lane::All, now).is_some());
    }

    #[test]
    fn a_flood_of_new_addresses_from_a_few_networks_weighs_as_those_networks() {
        // Every flood job from an address never seen before, all of them in
        // two /24s (and one /48): after a few attempts each network is as
        // heavy as one flooding address, and someone new from another network
        // gets the lane, goes first on the general workers, and takes a
        // flood job's place in a full queue.
        let s = scheduler(90, 100);
        let fresh: Vec<String> = (0..90)
            .map(|i| match i % 3 {
                0 => format!("203.0.113.{i}"),
                1 => format!("198.51.100.{i}"),
                _ => format!("2001:db8:7::{i:x}"),
            })
            .collect();
        let fresh: Vec<&str> = fresh.iter().map(String::as_str).collect();
        let mut flood_answers = flood(&s, &fresh, 0, 90);
        let now = Instant::now();
        {
            // The general workers have hashed some of the flood already.
            let mut state = s.state.lock().unwrap();
            for _ in 0..12 {
                assert_eq!(name(s.pick(&mut state, Lane::All, now)), "flood");
            }
        }
        flood_answers.extend(flood(&s, &fresh[..12], 0, 12));
        {
            let state = s.state.lock().unwrap();
            let flooding = Arc::from("203.0.113.250");
            let network = network_of(&flooding);
            assert!(
                !state.quiet(Some(&flooding), network.as_ref(), now, 0),
                "a new address of a flooding network is not quiet"
            );
            assert!(state.weight(Some(&flooding), network.as_ref(), now) >= 1.0);
        }
        let (j, _n) = job("newcomer");
        s.submit(j, &from("192.0.2.7")).unwrap();
        let mut state = s.state.lock().unwrap();
        assert!(
            state.demand.quiet_are_few(),
            "{} of {}",
            state.demand.quiet,
            state.demand.all
        );
        assert_eq!(name(s.pick(&mut state, Lane::Priority, now)), "newcomer");
        drop(state);
        let (j, _m) = job("another newcomer");
        s.submit(j, &from("2001:db8:99::1")).unwrap();
        let mut state = s.state.lock().unwrap();
        assert_eq!(name(s.pick(&mut state, Lane::All, now)), "another newcomer");
        assert!(
            flood_answers.iter_mut().any(refused),
            "the full queue made room by dropping a flood job"
        );
    }

    #[test]
    fn networks_are_slash_24_and_slash_48() {
        assert_eq!(network_of("203.0.113.9").as_deref(), Some("203.0.113.0/24"));
        assert_eq!(
            network_of("::ffff:203.0.113.9").as_deref(),
            Some("203.0.113.0/24")
        );
        assert_eq!(
            network_of("2001:db8:7:1::9").as_deref(),
            Some("2001:db8:7::/48")
        );
        assert_eq!(
            network_of("2001:db8:7:ffff::1"),
            network_of("2001:db8:7::2")
        );
        assert_eq!(network_of("not an address"), None);
    }

    #[test]
    fn with_quiet_sources_off_the_lane_takes_known_devices_only() {
        let s = scheduler_with(|c| c.quiet_sources_in_lane = false);
        let _flood = flood(&s, &["10.0.0.1"], 5, 10);
        let (j, _n) = job("newcomer");
        s.submit(j, &from("192.0.2.7")).unwrap();
        let mut state = s.state.lock().unwrap();
        assert!(s.pick(&mut state, Lane::Priority, Instant::now()).is_none());
    }

    #[test]
    fn with_a_lane_general_workers_leave_its_jobs_to_it_while_there_is_other_work() {
        let s = scheduler_with(|c| c.device_lane = true);
        let _flood = flood(&s, &["10.0.0.1"], 5, 2);
        let (j, _n) = job("newcomer");
        s.submit(j, &from("192.0.2.7")).unwrap();
        let (j, _k) = job("device");
        s.submit(j, &known("10.0.0.1")).unwrap();
        let now = Instant::now();
        let mut state = s.state.lock().unwrap();
        assert_eq!(name(s.pick(&mut state, Lane::All, now)), "flood");
        assert_eq!(name(s.pick(&mut state, Lane::All, now)), "flood");
        // Nothing else waits: a general worker takes the lane's jobs too,
        // known devices first.
        assert_eq!(name(s.pick(&mut state, Lane::All, now)), "device");
        assert_eq!(name(s.pick(&mut state, Lane::All, now)), "newcomer");
    }

    #[test]
    fn demand_forgets_a_past_flood() {
        let mut demand = Demand::default();
        let t0 = Instant::now();
        for _ in 0..100 {
            demand.add(true, t0);
        }
        assert!(!demand.quiet_are_few());
        // Ten half-lives later, a flood from few addresses has begun.
        let later = t0 + DEMAND_HALF_LIFE * 10;
        for _ in 0..20 {
            demand.add(false, later);
        }
        assert!(demand.quiet_are_few(), "{} of {}", demand.quiet, demand.all);
    }

    #[tokio::test]
    async fn a_device_lane_worker_hashes_known_devices_and_leaves_the_rest() {
        // Only a device-lane worker runs (as when every general worker is
        // busy): the known device is hashed, the flood job stays queued.
        let s = Arc::new(scheduler(100, 100));
        let params = Params::new(1024, 1, 1, None).unwrap();
        let lane = {
            let s = s.clone();
            thread::spawn(move || worker(&s, &params, Lane::Priority))
        };
        let (flood, _flood_answer) = job("flood");
        s.submit(flood, &from("flood")).unwrap();
        let (device, device_answer) = job("device");
        s.submit(device, &known("flood")).unwrap();
        let hashed = tokio::time::timeout(Duration::from_secs(30), device_answer).await;
        assert!(matches!(hashed, Ok(Ok(Ok(_)))), "{hashed:?}");
        {
            let state = s.state.lock().unwrap();
            assert_eq!(state.waiting.len(), 1);
            assert!(!state.waiting[0].known, "the flood job is left queued");
        }
        s.state.lock().unwrap().closed = true;
        s.ready.notify_all();
        lane.join().unwrap();
    }

    #[test]
    fn a_known_device_takes_the_place_of_the_heaviest_sources_newest_job() {
        let s = scheduler(2, 10);
        let now = Instant::now();
        s.state.lock().unwrap().usage.add(&Arc::from("flood"), now);
        let (j, mut first) = job("flood-1");
        s.submit(j, &from("flood")).unwrap();
        let (j, mut second) = job("flood-2");
        s.submit(j, &from("flood")).unwrap();
        let (j, _d) = job("device");
        s.submit(j, &known("elsewhere")).unwrap();
        assert!(refused(&mut second), "the newest flood job was evicted");
        assert!(!refused(&mut first));
        let mut state = s.state.lock().unwrap();
        assert_eq!(name(s.pick(&mut state, Lane::All, now)), "device");
        assert_eq!(name(s.pick(&mut state, Lane::All, now)), "flood-1");
    }

    #[test]
    fn a_quiet_source_takes_the_place_of_a_flooding_one_in_a_full_queue() {
        let s = scheduler(2, 10);
        let now = Instant::now();
        for _ in 0..5 {
            s.state.lock().unwrap().usage.add(&Arc::from("flood"), now);
        }
        let (j, mut first) = job("flood-1");
        s.submit(j, &from("flood")).unwrap();
        let (j, mut second) = job("flood-2");
        s.submit(j, &from("flood")).unwrap();
        assert!(!s.admissible(&from("flood")), "the flood itself is refused");
        assert!(s.admissible(&from("quiet")));
        let (j, _q) = job("quiet");
        s.submit(j, &from("quiet")).unwrap();
        assert!(refused(&mut second) && !refused(&mut first));
        let (j, _r) = job("fresh");
        s.submit(j, &from("fresh")).unwrap();
        assert!(refused(&mut first), "the last flood job made room too");
        // Equally fresh sources do not push each other out.
        let (j, _t) = job("another");
        assert!(s.submit(j, &from("another")).is_err());
    }

    #[test]
    fn a_job_that_would_not_start_in_time_is_refused_at_once() {
        let s = scheduler_with(|c| c.max_wait = Duration::from_millis(250));
        s.record_job(Duration::from_millis(100));
        let now = Instant::now();
        for _ in 0..3 {
            s.state.lock().unwrap().usage.add(&Arc::from("flood"), now);
        }
        // One worker at 100 ms a job: the third job waits about 200 ms,
        // the fourth would wait 300 ms, past its 250 ms.
        let mut kept = Vec::new();
        for _ in 0..3 {
            let (j, a) = job("flood");
            s.submit(j, &from("flood")).unwrap();
            kept.push(a);
        }
        assert!(!s.admissible(&from("flood")));
        let (j, _late) = job("flood");
        assert!(matches!(
            s.submit(j, &from("flood")),
            Err(HashError::Overloaded { .. })
        ));
        // A quieter source goes before the flood's jobs: it starts in time.
        assert!(s.admissible(&from("quiet")));
        // As the pace picks up (jobs now take 10 ms), the flood fits again.
        for _ in 0..30 {
            s.record_job(Duration::from_millis(10));
        }
        assert!(s.admissible(&from("flood")));
    }

    #[test]
    fn nothing_is_hashed_after_its_deadline_or_for_a_caller_that_left() {
        let s = scheduler(10, 10);
        let now = Instant::now();
        let (j, _a) = job("late");
        assert!(matches!(
            s.submit(
                j,
                &Admission {
                    deadline: Some(now),
                    ..from("a")
                }
            ),
            Err(HashError::Overloaded { .. })
        ));
        // A deadline far enough ahead that the job is admitted however
        // slowly this test runs (a 5 ms one was refused on a loaded
        // machine), and past by the time it is picked.
        let (j, mut expired) = job("expired");
        s.submit(
            j,
            &Admission {
                deadline: Some(now + Duration::from_secs(1)),
                ..from("a")
            },
        )
        .unwrap();
        let (j, gone) = job("gone");
        s.submit(j, &from("b")).unwrap();
        drop(gone);
        let (j, _c) = job("current");
        s.submit(j, &from("c")).unwrap();
        let mut state = s.state.lock().unwrap();
        let later = now + Duration::from_secs(2);
        assert_eq!(name(s.pick(&mut state, Lane::All, later)), "current");
        assert!(s.pick(&mut state, Lane::All, later).is_none());
        assert!(refused(&mut expired));
    }

    #[test]
    fn usage_decays_with_its_half_life() {
        let mut usage = Usage::default();
        let t0 = Instant::now();
        let source: Arc<str> = Arc::from("s");
        usage.add(&source, t0);
        usage.add(&source, t0);
        let later = usage.of(Some(&source), t0 + USAGE_HALF_LIFE);
        assert!((later - 1.0).abs() < 1e-9, "{later}");
        assert_eq!(usage.of(None, t0), 0.0);
    }
}
