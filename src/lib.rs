//! # ImmersiVerse Auth Service
//!
//! One binary serving the `immersiverse.auth.v1.AuthService` gRPC API
//! (sign-up, argon2id login with lockout, EdDSA JWT access tokens, rotating
//! refresh tokens, logout and revocation, admin operations), Envoy's ext_authz
//! v3 `Check` (so the gateway and every sidecar authorize each request), an
//! HTTP admin port (health, readiness, Prometheus metrics, JWKS), and the
//! Kafka side: an outbox relay publishing domain events and a consumer of
//! user-lifecycle events.
//!
//! # Layout
//!
//! * [`config`] — typed configuration: defaults, TOML file, `AUTH_*` env.
//! * [`startup`] — builds backends and services, binds listeners, serves
//!   until shutdown, its background tasks supervised by [`background`]; [`telemetry`] sets up logs and metrics.
//! * Contexts (domain code, no transport types):
//!   * [`accounts`] — value types, argon2 hashing pool, the account store
//!     role, sign-up/login/password/admin use cases;
//!   * [`tokens`] — signing keys and JWKS, access-token issue and
//!     verification, refresh-token sessions and their store role;
//!   * [`revocation`] — token, session and per-user revocation with a moka
//!     cache in front of the shared store;
//!   * [`ratelimit`] — login lockout counters, and request rate limits (GCRA
//!     shared through Redis with local leases);
//!   * [`authz`] — the ext_authz decision: route policy, token, revocation,
//!     roles, rate limit;
//!   * [`platforms`] — streaming-platform accounts: OAuth 2.0 + PKCE
//!     linking per platform, the sealed token vault, refresh on demand with
//!     one refresh per account across replicas, webhooks;
//!   * [`events`] — domain events written to the transactional outbox, their
//!     wire envelope, the Kafka relay and the lifecycle consumer.
//! * Adapters at the edge: [`grpc`] (AuthService, error mapping to gRPC
//!   status, and `grpc::stack`: the one layer stack every gRPC listener
//!   serves behind, where call metadata is read), [`envoy`] (ext_authz Check), [`edge`] (the deny
//!   map Envoys enforce themselves in edge mode, served over ECDS), [`http`] (admin port and
//!   webhooks) and [`tls`] (rustls on the gRPC listeners, certificate
//!   reload, peer identities).
//! * [`storage`] — backends behind the store roles: SQL (PostgreSQL and
//!   SQLite from one implementation), Redis (standalone, Cluster or behind
//!   Sentinel), and in-process memory.
//! * [`error`] — field violations and backend errors shared by the contexts.

#![forbid(unsafe_code)]

pub mod accounts;
pub mod authz;
pub mod background;
pub mod config;
pub mod edge;
pub mod envoy;
pub mod error;
pub mod events;
pub mod grpc;
pub mod http;
pub mod pause;
pub mod platforms;
pub mod ratelimit;
pub mod reload;
pub mod revocation;
pub mod startup;
pub mod storage;
pub mod telemetry;
pub mod tls;
pub mod tokens;

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

/// The client address: the `x-forwarded-for` entry `hops` from the right
/// (appended by the trusted gateway), else Envoy's downstream peer.
pub fn client_ip<'a>(
    forwarded: Option<&'a str>,
    peer: Option<&'a str>,
    hops: usize,
) -> Option<&'a str> {
    if hops > 0
        && let Some(forwarded) = forwarded
    {
        let entries: Vec<&str> = forwarded
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if let Some(ip) = entries.len().checked_sub(hops).and_then(|i| entries.get(i))
            && ip.parse::<std::net::IpAddr>().is_ok()
        {
            return Some(ip);
        }
    }
    peer
}

/// The token of an `authorization: Bearer <token>` value (scheme case
/// insensitive); for gRPC metadata and for the headers inside a CheckRequest.
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    let (scheme, token) = authorization?.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_case_insensitively_and_never_empty() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(Some("Bearer")), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn the_client_ip_comes_from_the_trusted_hop_else_the_peer() {
        assert_eq!(
            client_ip(Some("1.1.1.1, 2.2.2.2"), Some("9.9.9.9"), 1),
            Some("2.2.2.2")
        );
        assert_eq!(client_ip(Some("junk"), Some("9.9.9.9"), 1), Some("9.9.9.9"));
        assert_eq!(
            client_ip(Some("1.1.1.1"), Some("9.9.9.9"), 0),
            Some("9.9.9.9")
        );
        assert_eq!(client_ip(None, None, 1), None);
    }
}
