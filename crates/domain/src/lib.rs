//! The domain kernel of the ImmersiVerse Auth Service: what the service
//! decides, with no gRPC server, database, broker or HTTP client in its
//! dependency tree (`scripts/check-layers` checks that with `cargo tree`);
//! the streaming platforms are reached through a port
//! ([`platforms::api::PlatformApi`]) that the `auth-platform-http` crate
//! implements. A unit test (`layers.rs`) keeps its contexts' imports in
//! layers.
//!
//! * [`accounts`] — value types, argon2 hashing pool, the account store
//!   port, sign-up/login/password/admin use cases;
//! * [`tokens`] — signing keys and JWKS, access-token issue and
//!   verification, refresh-token sessions and their store port;
//! * [`revocation`] — token, session and per-user revocation with a moka
//!   cache in front of the shared store, and the revocation log's feed;
//! * [`ratelimit`] — login lockout counters, and request rate limits (GCRA
//!   shared through the quota store with local leases);
//! * [`authz`] — the ext_authz decision: route policy, token, revocation,
//!   roles, rate limit;
//! * [`platforms`] — streaming-platform accounts: OAuth 2.0 + PKCE
//!   linking per platform, the sealed token vault, refresh on demand with
//!   one refresh per account across replicas, webhooks;
//! * [`events`] — domain events written to the transactional outbox, and
//!   the outbox's ports;
//! * [`error`] — field violations and backend errors shared by the contexts;
//! * [`trace`] — trace context and sampling; [`pause`] — the test hook that
//!   holds a request between its read and its write.
//!
//! Each context owns its configuration section (`<context>::config`); the
//! binary assembles them.

#![forbid(unsafe_code)]

pub mod accounts;
pub mod authz;
pub mod error;
pub mod events;
pub mod health;
pub mod model;
pub mod pause;
pub mod platforms;
pub mod ratelimit;
pub mod revocation;
pub mod tokens;
pub mod trace;

#[doc(hidden)]
pub use metrics as __metrics;

/// A counter handle looked up once and then held, for the hot paths (the
/// ext_authz Check, token validation): each call then pays one atomic add
/// instead of a registry lookup (a key built, its label set hashed, a
/// shard locked). Name and labels are literals. The handle is taken at its
/// first use, so that use must come after the process installs its
/// recorder: the binary installs it first thing when it builds its services
/// (`Services::build`, `WorkerServices::build`); a handle taken earlier
/// would count nowhere.
#[macro_export]
macro_rules! held_counter {
    ($name:literal $(, $k:literal => $v:literal)* $(,)?) => {{
        static HELD: ::std::sync::OnceLock<$crate::__metrics::Counter> = ::std::sync::OnceLock::new();
        HELD.get_or_init(|| $crate::__metrics::counter!($name $(, $k => $v)*))
    }};
}

/// [`held_counter!`] for a histogram.
#[macro_export]
macro_rules! held_histogram {
    ($name:literal $(, $k:literal => $v:literal)* $(,)?) => {{
        static HELD: ::std::sync::OnceLock<$crate::__metrics::Histogram> = ::std::sync::OnceLock::new();
        HELD.get_or_init(|| $crate::__metrics::histogram!($name $(, $k => $v)*))
    }};
}

/// Current unix time in seconds.
pub fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Now, at the precision every store keeps (PostgreSQL: microseconds), so
/// a value returned by a write equals the one read back later.
pub fn now_micros() -> time::OffsetDateTime {
    let now = time::OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000 * 1_000)
        .unwrap_or(now)
}

/// Delay before the `attempts`-th retry: 100 ms doubling up to 30 s, with
/// up to 50% random jitter so replicas do not retry in lockstep.
pub fn backoff(attempts: u32) -> std::time::Duration {
    let base = std::time::Duration::from_millis(100)
        .saturating_mul(1 << attempts.min(9))
        .min(std::time::Duration::from_secs(30));
    let mut r = [0u8; 2];
    let _ = getrandom::fill(&mut r);
    let jitter = f64::from(u16::from_le_bytes(r)) / f64::from(u16::MAX) * 0.5;
    base.mul_f64(1.0 + jitter)
}

#[cfg(test)]
mod layers;
