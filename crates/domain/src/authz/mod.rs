//! Request authorization for Envoy's ext_authz: the decision, independent of
//! any transport. Order: route policy → token (verified once, then cached)
//! → revocation (cached, shared store behind) → roles → rate limit (per
//! user and per client IP, leased from the shared GCRA).

pub mod config;
pub mod policy;
pub mod target;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use uuid::Uuid;

use self::policy::{Access, RoutePolicy};
use crate::{
    authz::config::{AuthzConfig, RateClass},
    ratelimit::quota::{Limit, RateDecision, RateLimiter},
    tokens::{InvalidToken, Principal, TokenError, TokenService},
};

/// The parts of an HTTP request a decision needs.
#[derive(Debug, Clone, Copy)]
pub struct AccessRequest<'a> {
    /// As received: canonicalised (or refused) by the decision.
    pub method: &'a str,
    /// The request target as received (`:path`, query included):
    /// canonicalised (or refused) by the decision, see [`target`].
    pub target: &'a str,
    /// The request carried a method-override header
    /// ([`target::METHOD_OVERRIDE_HEADERS`]).
    pub method_override: bool,
    /// The bearer token, if the request carried one.
    pub bearer: Option<&'a str>,
    pub client_ip: Option<&'a str>,
    /// The downstream client's verified service identity (from the client
    /// certificate the gateway or sidecar checked), if any.
    pub service: Option<&'a str>,
}

/// Who the upstream is told the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: Uuid,
    pub roles: Vec<String>,
    pub session_id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// 400: a request target or method whose meaning depends on who reads
    /// it (see [`target`]).
    BadRequest { reason: target::Malformed },
    /// 401: no token, or an invalid, expired or revoked one.
    Unauthenticated { reason: &'static str },
    /// 403: no rule matched or a required role is missing.
    Forbidden { reason: &'static str },
    /// 429.
    RateLimited { retry_after: Duration, limit: u32 },
    /// 503: a backend needed for the decision is down and fails closed.
    Unavailable { reason: &'static str },
}

impl Denial {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unauthenticated { reason }
            | Self::Forbidden { reason }
            | Self::Unavailable { reason } => reason,
            Self::RateLimited { .. } => "rate_limited",
            Self::BadRequest { reason } => reason.as_str(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; `None` for an anonymous caller of a public route.
    Allow(Option<Identity>),
    Deny(Denial),
}

pub struct Authorizer {
    policy: RoutePolicy,
    classes: BTreeMap<String, RateClass>,
    tokens: Arc<TokenService>,
    limiter: RateLimiter,
    revocation_fail_open: bool,
}

impl Authorizer {
    /// The route policy Checks are decided by (edge mode carries it too).
    pub fn policy(&self) -> &RoutePolicy {
        &self.policy
    }

    pub fn new(
        config: &AuthzConfig,
        tokens: Arc<TokenService>,
        limiter: RateLimiter,
    ) -> Result<Self, policy::PolicyError> {
        let classes: Vec<&str> = config.rate_limits.keys().map(String::as_str).collect();
        Ok(Self {
            policy: RoutePolicy::compile(&config.routes, &classes)?,
            classes: config.rate_limits.clone(),
            tokens,
            limiter,
            revocation_fail_open: config.revocation_fail_open,
        })
    }

    pub async fn decide(&self, request: &AccessRequest<'_>) -> Decision {
        if request.method_override {
            return Decision::Deny(Denial::BadRequest {
                reason: target::Malformed::MethodOverride,
            });
        }
        let route = match self.policy.resolve(request.method, request.target) {
            Ok(Some(route)) => route,
            Ok(None) => return Decision::Deny(Denial::Forbidden { reason: "no_route" }),
            Err(reason) => return Decision::Deny(Denial::BadRequest { reason }),
        };
        if !route.services.is_empty()
            && !request
                .service
                .is_some_and(|s| route.services.iter().any(|allowed| allowed == s))
        {
            return Decision::Deny(Denial::Forbidden {
                reason: "service_identity_required",
            });
        }
        let principal = match request.bearer {
            Some(token) => match self.authenticate(token).await {
                Ok(principal) => Some(principal),
                // A bad token on a public route is ignored, not an error
                // (a stale header must not break login).
                Err(_) if route.access == Access::Public => None,
                Err(denial) => return Decision::Deny(denial),
            },
            None if route.access == Access::Public => None,
            None => {
                return Decision::Deny(Denial::Unauthenticated {
                    reason: "missing_token",
                });
            }
        };
        if let Access::Roles(required) = &route.access {
            let holds_all = principal
                .as_ref()
                .is_some_and(|p| required.iter().all(|r| p.has_role(r)));
            if !holds_all {
                return Decision::Deny(Denial::Forbidden {
                    reason: "missing_role",
                });
            }
        }
        if let Some(class) = self.classes.get(&route.rate_class) {
            let user_key = principal.as_ref().map(|p| format!("user:{}", p.user_id));
            let ip_key = request.client_ip.map(|ip| format!("ip:{ip}"));
            for (key, limit) in [(user_key, class.per_user), (ip_key, class.per_ip)] {
                if let (Some(key), Some(limit)) = (key, limit)
                    && let Some(denial) = self.rate_limit(&key, &limit).await
                {
                    return Decision::Deny(denial);
                }
            }
        }
        Decision::Allow(principal.map(|p| Identity {
            user_id: p.user_id,
            roles: p.roles,
            session_id: p.session_id,
        }))
    }

    async fn authenticate(&self, token: &str) -> Result<Principal, Denial> {
        match self.tokens.authenticate(token).await {
            Ok(principal) => Ok(principal),
            Err(TokenError::InvalidAccess(reason)) => Err(Denial::Unauthenticated {
                reason: reason.as_str(),
            }),
            Err(TokenError::Backend(error)) if self.revocation_fail_open => {
                // Configured to fail open: a verified token passes unchecked
                // against revocation while the store is down.
                tracing::warn!(%error, "revocation store unavailable: failing open");
                let claims = self
                    .tokens
                    .verify(token)
                    .map_err(|r: InvalidToken| Denial::Unauthenticated { reason: r.as_str() })?;
                Ok(Principal::from_verified(&claims))
            }
            Err(error) => {
                tracing::warn!(%error, "revocation check failed: denying (fail closed)");
                Err(Denial::Unavailable {
                    reason: "revocation_unavailable",
                })
            }
        }
    }

    async fn rate_limit(&self, key: &str, limit: &Limit) -> Option<Denial> {
        match self.limiter.check(key, limit).await {
            Ok(RateDecision::Allowed) => None,
            Ok(RateDecision::Limited { retry_after }) => Some(Denial::RateLimited {
                retry_after,
                limit: limit.requests,
            }),
            Err(error) => {
                tracing::warn!(%error, "rate-limit store unavailable: denying (fail closed)");
                Some(Denial::Unavailable {
                    reason: "ratelimit_unavailable",
                })
            }
        }
    }
}
