//! Route policy: who may call which method and path, and which rate-limit
//! class applies. Rules are tried in order; the first match wins; a request
//! no rule matches is denied as forbidden (fail closed).
//!
//! Path patterns are matched segment by segment: `*` matches exactly one
//! segment, a trailing `**` matches any remainder (including nothing).
//! Requests are matched on their canonical target ([`super::target`]):
//! [`RoutePolicy::resolve`] is the one entry point for a raw request.

use serde::{Deserialize, Serialize};

use super::target::{self, Malformed};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessKind {
    /// No token needed; a valid one still identifies the caller.
    Public,
    /// Any valid, unrevoked access token.
    Authenticated,
    /// A valid token carrying every role in `roles`.
    Roles,
}

/// One rule as written in the configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    /// HTTP methods (upper case); empty means any.
    #[serde(default)]
    pub methods: Vec<String>,
    pub path: String,
    pub access: AccessKind,
    #[serde(default)]
    pub roles: Vec<String>,
    /// Rate-limit class (a key of `authz.rate_limits`).
    #[serde(default = "default_class")]
    pub rate_class: String,
    /// When set, only these service identities may call (a SPIFFE URI SAN
    /// such as `spiffe://immersiverse/ns/x/sa/y`, else a DNS SAN): the
    /// identity of the downstream client certificate Envoy verified and
    /// forwards (`include_peer_certificate`), in addition to `access`.
    #[serde(default)]
    pub services: Vec<String>,
}

fn default_class() -> String {
    "default".into()
}

impl RouteRule {
    pub fn new(
        methods: &[&str],
        path: &str,
        access: AccessKind,
        roles: &[&str],
        class: &str,
    ) -> Self {
        Self {
            methods: methods.iter().map(|m| (*m).to_owned()).collect(),
            path: path.into(),
            access,
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            rate_class: class.into(),
            services: Vec::new(),
        }
    }
}

/// The default policy: sign-up, login, refresh, `/.well-known/*` and health
/// paths are public; `/v1/admin/**` needs `admin`; everything else needs an
/// authenticated user.
pub fn default_rules() -> Vec<RouteRule> {
    use AccessKind::*;
    vec![
        RouteRule::new(&["POST"], "/v1/users", Public, &[], "public"),
        RouteRule::new(&["POST"], "/v1/auth/login", Public, &[], "public"),
        RouteRule::new(&["POST"], "/v1/auth/refresh", Public, &[], "public"),
        RouteRule::new(&["POST"], "/v1/auth/service-token", Public, &[], "public"),
        RouteRule::new(&[], "/.well-known/**", Public, &[], "public"),
        // Platform webhooks authenticate by their HMAC signature.
        RouteRule::new(&["POST"], "/webhooks/**", Public, &[], "public"),
        // Platform tokens are for internal services only, also when the
        // gRPC path is reached through a gateway.
        RouteRule::new(
            &[],
            "/immersiverse.auth.v1.AuthService/GetPlatformAccessToken",
            Roles,
            &["service"],
            "default",
        ),
        RouteRule::new(&["GET", "HEAD"], "/healthz", Public, &[], "public"),
        RouteRule::new(&["GET", "HEAD"], "/readyz", Public, &[], "public"),
        RouteRule::new(&[], "/v1/admin/**", Roles, &["admin"], "default"),
        RouteRule::new(&[], "/**", Authenticated, &[], "default"),
    ]
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    Rest,
}

/// What a matched rule requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Public,
    Authenticated,
    Roles(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct Route {
    methods: Vec<String>,
    pattern: Vec<Segment>,
    pub access: Access,
    pub rate_class: String,
    /// Service identities allowed; empty: any caller.
    pub services: Vec<String>,
}

impl Route {
    /// The methods the rule names (upper case; empty: any). `HEAD` is
    /// decided as `GET`.
    pub fn methods(&self) -> &[String] {
        &self.methods
    }

    /// An RE2 regular expression for Envoy's `:path` (query included) that
    /// matches the canonical paths this rule matches, as the policy does
    /// (empty segments dropped, a trailing `/`). Literal segments are
    /// matched as written; callers decide on case and on percent-encoding.
    pub fn path_regex(&self) -> String {
        let mut re = String::from("^");
        for segment in &self.pattern {
            match segment {
                Segment::Literal(literal) => {
                    re.push_str("/+");
                    for c in literal.chars() {
                        if "\\.+*?()|[]{}^$".contains(c) {
                            re.push('\\');
                        }
                        re.push(c);
                    }
                }
                Segment::One => re.push_str("/+[^/?]+"),
                Segment::Rest => re.push_str("(/[^?]*)?"),
            }
        }
        re.push_str("/*([?].*)?$");
        re
    }

    /// Whether the rule can match some path that starts with the segment
    /// `first` (such as `api`).
    pub fn may_match_under(&self, first: &str) -> bool {
        match self.pattern.first() {
            None => false,
            Some(Segment::Literal(literal)) => literal.eq_ignore_ascii_case(first),
            Some(Segment::One | Segment::Rest) => true,
        }
    }
}

/// Compiled rules.
#[derive(Debug, Clone)]
pub struct RoutePolicy {
    routes: Vec<Route>,
}

#[derive(Debug, thiserror::Error)]
#[error("authz.routes[{index}]: {reason}")]
pub struct PolicyError {
    pub index: usize,
    pub reason: String,
}

impl RoutePolicy {
    pub fn compile(rules: &[RouteRule], classes: &[&str]) -> Result<Self, PolicyError> {
        let routes = rules
            .iter()
            .enumerate()
            .map(|(index, rule)| {
                let fail = |reason: String| PolicyError { index, reason };
                if !rule.path.starts_with('/') {
                    return Err(fail(format!("path {:?} must start with '/'", rule.path)));
                }
                let segments: Vec<&str> = rule
                    .path
                    .split('/')
                    .skip(1)
                    .filter(|s| !s.is_empty())
                    .collect();
                let mut pattern = Vec::with_capacity(segments.len());
                for (i, s) in segments.iter().enumerate() {
                    pattern.push(match *s {
                        "**" if i + 1 == segments.len() => Segment::Rest,
                        "**" => return Err(fail("'**' may only end a path".into())),
                        "*" => Segment::One,
                        literal => Segment::Literal(literal.to_owned()),
                    });
                }
                let access = match rule.access {
                    AccessKind::Public => Access::Public,
                    AccessKind::Authenticated => Access::Authenticated,
                    AccessKind::Roles if rule.roles.is_empty() => {
                        return Err(fail(
                            "access = \"roles\" needs a non-empty roles list".into(),
                        ));
                    }
                    AccessKind::Roles => Access::Roles(rule.roles.clone()),
                };
                if let Some(bad) = rule
                    .services
                    .iter()
                    .find(|s| s.is_empty() || s.chars().any(char::is_whitespace))
                {
                    return Err(fail(format!("services: {bad:?} is not an identity")));
                }
                if !classes.contains(&rule.rate_class.as_str()) {
                    return Err(fail(format!(
                        "rate_class {:?} is not defined in authz.rate_limits",
                        rule.rate_class
                    )));
                }
                let methods: Vec<String> = rule
                    .methods
                    .iter()
                    .map(|m| m.to_ascii_uppercase())
                    .collect();
                if let Some(bad) = methods
                    .iter()
                    .find(|m| target::canonical_method(m).is_err())
                {
                    return Err(fail(format!("methods: {bad:?} is not an HTTP method")));
                }
                // HEAD is decided as GET (GET handlers serve it), so a rule
                // cannot treat the two differently.
                if methods.iter().any(|m| m == "HEAD") && !methods.iter().any(|m| m == "GET") {
                    return Err(fail(
                        "methods: HEAD is served by GET handlers and decided as GET; list GET"
                            .into(),
                    ));
                }
                Ok(Route {
                    methods,
                    pattern,
                    access,
                    rate_class: rule.rate_class.clone(),
                    services: rule.services.clone(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { routes })
    }

    /// The rules, in the order they are tried.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The rule for a request as received: `method` and `target` (Envoy's
    /// `:path`, query included) are first made canonical
    /// ([`super::target`]); a target whose meaning depends on who reads it
    /// is refused. `Ok(None)`: no rule matches (forbidden).
    pub fn resolve(&self, method: &str, target: &str) -> Result<Option<&Route>, Malformed> {
        let method = target::canonical_method(method)?;
        let (path, query) = target::split_query(target);
        if query.is_some_and(target::query_overrides_method) {
            return Err(Malformed::MethodOverride);
        }
        let path = target::canonical_path(path)?;
        let method = if method == "HEAD" { "GET" } else { method };
        // One pass: the first rule matching exactly and the first matching
        // without case. A backend that routes case-insensitively would
        // serve the path as the latter: it must be the same rule.
        let mut exact = None;
        let mut any_case = None;
        for (i, r) in self.routes.iter().enumerate() {
            if !(r.methods.is_empty() || r.methods.iter().any(|m| m == method)) {
                continue;
            }
            match match_case(&r.pattern, &path) {
                Match::No => continue,
                Match::Exact => {
                    exact.get_or_insert(i);
                    any_case.get_or_insert(i);
                    break;
                }
                Match::AnyCase => {
                    any_case.get_or_insert(i);
                }
            }
        }
        if any_case != exact {
            return Err(Malformed::AmbiguousCase);
        }
        Ok(exact.map(|i| &self.routes[i]))
    }

    /// The first rule matching `method` and `path`, both already canonical
    /// (see [`Self::resolve`] for a raw request).
    pub fn route(&self, method: &str, path: &str) -> Option<&Route> {
        self.position(method, path, false).map(|i| &self.routes[i])
    }

    fn position(&self, method: &str, path: &str, any_case: bool) -> Option<usize> {
        let method = if method == "HEAD" { "GET" } else { method };
        self.routes.iter().position(|r| {
            (r.methods.is_empty() || r.methods.iter().any(|m| m == method))
                && matches(&r.pattern, path, any_case)
        })
    }
}

enum Match {
    No,
    /// Matches only when case is ignored.
    AnyCase,
    Exact,
}

fn match_case(pattern: &[Segment], path: &str) -> Match {
    let mut segments = path.split('/').skip(1).filter(|s| !s.is_empty());
    let mut exact = true;
    for expected in pattern {
        match expected {
            Segment::Rest => break,
            Segment::One => {
                if segments.next().is_none() {
                    return Match::No;
                }
            }
            Segment::Literal(literal) => match segments.next() {
                Some(s) if s == literal => {}
                Some(s) if s.eq_ignore_ascii_case(literal) => exact = false,
                _ => return Match::No,
            },
        }
    }
    if !matches!(pattern.last(), Some(Segment::Rest)) && segments.next().is_some() {
        return Match::No;
    }
    if exact { Match::Exact } else { Match::AnyCase }
}

fn matches(pattern: &[Segment], path: &str, any_case: bool) -> bool {
    let mut segments = path.split('/').skip(1).filter(|s| !s.is_empty());
    for expected in pattern {
        match expected {
            Segment::Rest => return true,
            Segment::One => {
                if segments.next().is_none() {
                    return false;
                }
            }
            Segment::Literal(literal) => match segments.next() {
                Some(s) if s == literal => {}
                Some(s) if any_case && s.eq_ignore_ascii_case(literal) => {}
                _ => return false,
            },
        }
    }
    segments.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RoutePolicy {
        RoutePolicy::compile(&default_rules(), &["default", "public"]).unwrap()
    }

    #[test]
    fn the_default_policy_opens_only_sign_up_login_refresh_well_known_and_health() {
        let p = policy();
        assert_eq!(p.route("POST", "/v1/users").unwrap().access, Access::Public);
        assert_eq!(
            p.route("GET", "/v1/users").unwrap().access,
            Access::Authenticated,
            "only POST is public"
        );
        assert_eq!(
            p.route("POST", "/v1/auth/login").unwrap().access,
            Access::Public
        );
        assert_eq!(
            p.route("POST", "/v1/auth/refresh").unwrap().access,
            Access::Public
        );
        assert_eq!(
            p.route("POST", "/v1/auth/logout").unwrap().access,
            Access::Authenticated
        );
        assert_eq!(
            p.route("GET", "/.well-known/jwks.json").unwrap().access,
            Access::Public
        );
        assert_eq!(p.route("GET", "/healthz").unwrap().access, Access::Public);
        assert_eq!(
            p.route("PUT", "/v1/admin/users/1/roles").unwrap().access,
            Access::Roles(vec!["admin".into()])
        );
        assert_eq!(
            p.route("GET", "/v1/admin").unwrap().access,
            Access::Roles(vec!["admin".into()])
        );
        assert_eq!(
            p.route("GET", "/api/videos/1").unwrap().access,
            Access::Authenticated
        );
        assert_eq!(p.route("GET", "/").unwrap().access, Access::Authenticated);
    }

    #[test]
    fn paths_match_by_whole_segments() {
        let p = policy();
        assert_eq!(
            p.route("POST", "/v1/users/extra").unwrap().access,
            Access::Authenticated
        );
        assert_eq!(
            p.route("POST", "/v1/usersX").unwrap().access,
            Access::Authenticated
        );
        assert_eq!(
            p.route("GET", "/v1/adminx/a").unwrap().access,
            Access::Authenticated
        );
    }

    #[test]
    fn single_star_matches_one_segment() {
        let rules = vec![RouteRule::new(
            &[],
            "/a/*/c",
            AccessKind::Public,
            &[],
            "default",
        )];
        let p = RoutePolicy::compile(&rules, &["default"]).unwrap();
        assert!(p.route("GET", "/a/b/c").is_some());
        assert!(p.route("GET", "/a/c").is_none());
        assert!(p.route("GET", "/a/b/x/c").is_none());
    }

    #[test]
    fn a_raw_target_is_decided_on_the_path_the_backend_serves() {
        let p = policy();
        let access = |m: &str, t: &str| p.resolve(m, t).map(|r| r.map(|r| r.access.clone()));
        // Dot segments, raw or encoded, cannot lift a path into a public rule.
        assert_eq!(
            access("GET", "/.well-known/../api/orders"),
            Ok(Some(Access::Authenticated))
        );
        assert_eq!(
            access("GET", "/.well-known/%2e%2e/v1/admin/users"),
            Ok(Some(Access::Roles(vec!["admin".into()])))
        );
        assert_eq!(
            access("GET", "/api/../v1//admin/?x=1"),
            Ok(Some(Access::Roles(vec!["admin".into()])))
        );
        assert_eq!(
            access("GET", "/v1/admin;x/users"),
            Err(Malformed::PathParameter)
        );
        // Case that moves a path to another rule is refused; case that
        // does not is fine.
        assert_eq!(
            access("GET", "/V1/Admin/users"),
            Err(Malformed::AmbiguousCase)
        );
        assert_eq!(access("POST", "/V1/users"), Err(Malformed::AmbiguousCase));
        assert_eq!(
            access("GET", "/api/Videos/AbC"),
            Ok(Some(Access::Authenticated))
        );
        // HEAD is GET; lower-case methods and overrides are refused.
        assert_eq!(access("HEAD", "/healthz"), Ok(Some(Access::Public)));
        assert_eq!(access("get", "/healthz"), Err(Malformed::InvalidMethod));
        assert_eq!(
            access("POST", "/v1/users?_method=DELETE"),
            Err(Malformed::MethodOverride)
        );
    }

    #[test]
    fn a_rule_for_head_alone_or_a_bad_method_is_refused() {
        let head = vec![RouteRule::new(
            &["HEAD"],
            "/x",
            AccessKind::Public,
            &[],
            "default",
        )];
        let error = RoutePolicy::compile(&head, &["default"]).unwrap_err();
        assert!(error.to_string().contains("HEAD"), "{error}");
        let bad = vec![RouteRule::new(
            &["GE T"],
            "/x",
            AccessKind::Public,
            &[],
            "default",
        )];
        assert!(RoutePolicy::compile(&bad, &["default"]).is_err());
        // A GET rule covers HEAD.
        let get = vec![
            RouteRule::new(&["GET"], "/x", AccessKind::Roles, &["admin"], "default"),
            RouteRule::new(&[], "/**", AccessKind::Authenticated, &[], "default"),
        ];
        let p = RoutePolicy::compile(&get, &["default"]).unwrap();
        assert_eq!(
            p.resolve("HEAD", "/x").unwrap().unwrap().access,
            Access::Roles(vec!["admin".into()])
        );
    }

    #[test]
    fn bad_rules_are_refused_with_their_index() {
        let bad = vec![RouteRule::new(
            &[],
            "/**/x",
            AccessKind::Public,
            &[],
            "default",
        )];
        assert_eq!(
            RoutePolicy::compile(&bad, &["default"]).unwrap_err().index,
            0
        );
        let no_roles = vec![RouteRule::new(&[], "/x", AccessKind::Roles, &[], "default")];
        assert!(RoutePolicy::compile(&no_roles, &["default"]).is_err());
        let no_class = vec![RouteRule::new(&[], "/x", AccessKind::Public, &[], "nope")];
        assert!(
            RoutePolicy::compile(&no_class, &["default"])
                .unwrap_err()
                .to_string()
                .contains("nope")
        );
        for identity in ["", "spiffe://x/ns/a b"] {
            let mut rule = RouteRule::new(&[], "/x", AccessKind::Public, &[], "default");
            rule.services = vec![identity.into()];
            let error = RoutePolicy::compile(&[rule], &["default"]).unwrap_err();
            assert!(error.to_string().contains("services"), "{error}");
        }
    }
}
