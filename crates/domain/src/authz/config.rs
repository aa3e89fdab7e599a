//! The `authz` section: the route policy and request rate limits of ext_authz.

use std::{collections::BTreeMap, net::SocketAddr};

use crate::error::ConfigError;

use serde::{Deserialize, Serialize};

use crate::{
    authz::policy::{RoutePolicy, RouteRule, default_rules},
    ratelimit::quota::Limit,
};

/// Envoy ext_authz: route policy, rate limits and failure modes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzConfig {
    /// Also serve `envoy.service.auth.v3.Authorization` on this listener
    /// (it is always served on `grpc_addr`).
    pub check_addr: Option<SocketAddr>,
    /// Rules in order, first match wins (see `authz::policy`).
    pub routes: Vec<RouteRule>,
    /// Rate-limit classes named by the rules.
    pub rate_limits: BTreeMap<String, RateClass>,
    /// When the revocation store is unreachable: `false` (default) denies
    /// with 503 unless this replica's cache still knows the answer.
    pub revocation_fail_open: bool,
    /// When the rate-limit store is unreachable: `true` (default) limits per
    /// replica instead; `false` denies with 503.
    pub rate_limit_fail_open: bool,
    /// Keys tracked by the local rate limiter.
    pub rate_limit_capacity: u64,
}

/// Limits of one class; a missing limit is not enforced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateClass {
    pub per_user: Option<Limit>,
    pub per_ip: Option<Limit>,
}

impl Default for AuthzConfig {
    fn default() -> Self {
        let limit = |requests, burst| {
            Some(Limit {
                requests,
                per_secs: 1,
                burst,
            })
        };
        Self {
            check_addr: None,
            routes: default_rules(),
            rate_limits: BTreeMap::from([
                (
                    "default".to_owned(),
                    RateClass {
                        per_user: limit(50, 100),
                        per_ip: limit(100, 200),
                    },
                ),
                (
                    "public".to_owned(),
                    RateClass {
                        per_user: None,
                        per_ip: limit(20, 40),
                    },
                ),
            ]),
            revocation_fail_open: false,
            rate_limit_fail_open: true,
            rate_limit_capacity: 1_000_000,
        }
    }
}

impl AuthzConfig {
    /// Each error names its own key, relative to this section: a rate
    /// class's limit (`rate_limits.<class>.per_user.burst`) or the route
    /// that does not compile (`routes[3]`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, class) in &self.rate_limits {
            for (which, limit) in [("per_user", &class.per_user), ("per_ip", &class.per_ip)] {
                if let Some(limit) = limit {
                    limit
                        .validate()
                        .map_err(|e| e.within(which).within(name).within("rate_limits"))?;
                }
            }
        }
        let classes: Vec<&str> = self.rate_limits.keys().map(String::as_str).collect();
        RoutePolicy::compile(&self.routes, &classes)
            .map_err(|e| ConfigError::new(format!("routes[{}]", e.index), e.reason))?;
        Ok(())
    }
}
