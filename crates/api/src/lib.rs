//! The transport adapters of the ImmersiVerse Auth Service, at the edge of
//! the domain ([`auth_domain`]):
//!
//! * [`grpc`] — the AuthService API, error mapping to gRPC status, and
//!   `grpc::stack`: the one layer stack every gRPC listener serves behind,
//!   where call metadata is read;
//! * [`envoy`] — Envoy's ext_authz v3 `Check`;
//! * [`edge`] — the deny maps Envoys enforce themselves in edge mode,
//!   served over ECDS;
//! * [`http`] — the admin port (health, readiness, metrics, JWKS) and the
//!   platforms' webhooks;
//! * [`tls`] — rustls on the gRPC listeners, certificate reload, peer
//!   identities;
//! * [`trace`] — one server span per gRPC call.
//!
//! They share one layer stack and one `Call` (the caller as the stack
//! authenticated it), so they are one crate. [`config`] holds their
//! configuration sections.

#![forbid(unsafe_code)]

pub mod config;
pub mod edge;
pub mod envoy;
pub mod grpc;
pub mod http;
pub mod tls;
pub mod trace;

// The domain's modules, under the names the adapters use.
use auth_domain::{
    accounts, authz, error, events, health, platforms, ratelimit, revocation, tokens,
};

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
