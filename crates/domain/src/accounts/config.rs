//! The `password` section: argon2id parameters and the hashing pool's admission.

use crate::error::{ConfigError, require};

use serde::{Deserialize, Serialize};

/// argon2id parameters and the password policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordConfig {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    /// Hashes run on at most this many blocking threads at once; 0 means one
    /// per CPU core.
    pub max_concurrent_hashes: usize,
    /// Minimum length in characters.
    pub min_length: usize,
    /// Maximum length in characters; anything longer is refused before hashing.
    pub max_length: usize,
    /// Hashing jobs waiting at most; 0 means 16 per hashing thread. Beyond
    /// it a login or sign-up is refused at once (Unavailable, retry-after).
    pub max_queued: usize,
    /// Hashing jobs one client address may have waiting.
    pub max_queued_per_source: usize,
    /// The longest a job waits to start hashing before it is refused, in
    /// milliseconds (the caller's own gRPC deadline, when sooner, wins).
    pub max_wait_ms: u64,
    /// The hashing threads' nice value (0 to 19; Linux: per thread). Above
    /// 0, argon2 yields the CPU to the rest of the process (ext_authz Checks,
    /// refusals of an overloaded queue, the runtime's I/O) whenever both
    /// want it, and still takes every cycle nothing else needs.
    pub worker_nice: i32,
    /// One more hashing thread, at the process's own priority (not
    /// `worker_nice`), that takes logins presenting a valid device token: a
    /// known device does not wait for a worker busy with a flood.
    pub device_lane: bool,
    /// The lane also takes jobs from quiet client addresses (less than one
    /// hash recently) while they are a minority of the demand: under a flood
    /// from a few addresses, someone new is not hashed behind the flood.
    pub quiet_sources_in_lane: bool,
    /// A login or sign-up refused without hashing (at capacity, locked out)
    /// is answered after this many milliseconds, so a client that sends
    /// again as soon as it is answered does not spin on refusals (0: at
    /// once). Never past the caller's own deadline.
    pub refusal_hold_ms: u64,
    /// Refusals held at once at most; past that they are answered at once.
    pub max_held_refusals: usize,
}

impl Default for PasswordConfig {
    fn default() -> Self {
        Self {
            memory_kib: 19 * 1024,
            iterations: 2,
            parallelism: 1,
            max_concurrent_hashes: 0,
            min_length: 8,
            max_length: 128,
            max_queued: 0,
            max_queued_per_source: 8,
            max_wait_ms: 500,
            worker_nice: 10,
            device_lane: true,
            quiet_sources_in_lane: true,
            refusal_hold_ms: 1000,
            max_held_refusals: 512,
        }
    }
}

impl PasswordConfig {
    /// Each error names its own key, relative to this section.
    pub fn validate(&self) -> Result<(), ConfigError> {
        require(self.iterations > 0, "iterations", "argon2 needs at least 1")?;
        require(
            self.parallelism > 0,
            "parallelism",
            "argon2 needs at least 1",
        )?;
        require(
            self.memory_kib >= 8 * self.parallelism,
            "memory_kib",
            "argon2 needs at least 8 KiB per lane (8 * parallelism)",
        )?;
        require(self.min_length > 0, "min_length", "must be positive")?;
        require(
            (self.min_length..=1024).contains(&self.max_length),
            "max_length",
            "must be between min_length and 1024",
        )?;
        require(
            self.max_queued_per_source > 0,
            "max_queued_per_source",
            "must be positive",
        )?;
        require(self.max_wait_ms > 0, "max_wait_ms", "must be positive")?;
        require(
            self.refusal_hold_ms <= 10_000,
            "refusal_hold_ms",
            "must be at most 10000 (a refusal says when to retry; holding it longer only delays that)",
        )?;
        require(
            self.max_held_refusals <= 1_000_000,
            "max_held_refusals",
            "must be at most 1000000",
        )
    }

    /// How long a refusal is held ([`crate::accounts::hold`]).
    pub fn refusal_hold(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.refusal_hold_ms)
    }
}
