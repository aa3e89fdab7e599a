//! The route policy (`authz.routes`, the one ext_authz decides by) as the
//! edge applies it to the paths it checks itself (`/api/*` in
//! `envoy/edge.yaml`), carried in front of the recent map so that it is
//! pushed by the same auth-service that decides ext_authz's Checks.
//!
//! Envoy cannot check roles or service identities from the request alone,
//! so a rule that needs them is refused at the edge ("needs-ext-authz":
//! route such paths through ext_authz); a rule that needs only a valid,
//! unrevoked token goes on to the deny maps; a request no rule matches is
//! refused, as ext_authz refuses it. The edge is never more permissive than
//! ext_authz, only stricter: it also wants a token for a `public` rule under
//! its paths (jwt_authn requires one there), it matches a refusing rule's
//! path in any case (a backend may route without case) and refuses a path
//! an allowing rule matches only in another case (ext_authz refuses a path
//! whose rule changes with case), and whenever the
//! policy decides by path or method there, it refuses every request target
//! ext_authz refuses as ambiguous ([`auth_domain::authz::target`]), in a
//! stricter form Envoy can match: a path (after Envoy's normalisation) with
//! anything but plain path characters — no `%` at all, no `;`, no segment
//! ending in `.` —, a method that is not an upper-case token, a
//! method-override header, or a query parameter that may name `_method`
//! (any name holding a `%` included). Otherwise a backend that decodes,
//! drops `;` parameters, trims a trailing dot or honours an override would
//! serve another path or method than the one decided on.

use envoy_types::pb::xds::r#type::matcher::v3::{
    Matcher, StringMatcher,
    matcher::{
        MatcherList, MatcherType,
        matcher_list::{
            FieldMatcher, Predicate,
            predicate::{MatchType, PredicateList, SinglePredicate, single_predicate},
        },
    },
    string_matcher::MatchPattern,
};

use auth_domain::authz::target::{METHOD_OVERRIDE_HEADERS, PLAIN_PUNCTUATION};

use crate::authz::policy::{Access, RoutePolicy};

use super::{deny, header_input, nested};

/// The first path segment of the routes `envoy/edge.yaml` checks itself.
pub const EDGE_SEGMENT: &str = "api";

#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    /// A valid token suffices: on to the deny maps.
    Continue,
    /// Roles or a service identity: only ext_authz can decide.
    NeedsExtAuthz,
}

#[derive(Debug, Clone, PartialEq)]
struct EdgeRule {
    methods: Vec<String>,
    regex: String,
    verdict: Verdict,
}

/// The policy's rules that can match under [`EDGE_SEGMENT`], in order.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgePolicy {
    rules: Vec<EdgeRule>,
}

impl EdgePolicy {
    /// `None` when every path under the edge's segment is decided by one
    /// rule that needs a valid token and nothing more (the default policy's
    /// `/**`): the deny maps alone are the policy there.
    pub fn from(policy: &RoutePolicy) -> Option<Self> {
        let rules: Vec<EdgeRule> = policy
            .routes()
            .iter()
            .filter(|r| r.may_match_under(EDGE_SEGMENT))
            .map(|r| {
                let verdict = match (&r.access, r.services.is_empty()) {
                    (Access::Public | Access::Authenticated, true) => Verdict::Continue,
                    _ => Verdict::NeedsExtAuthz,
                };
                let mut methods = r.methods().to_vec();
                if methods.iter().any(|m| m == "GET") && !methods.iter().any(|m| m == "HEAD") {
                    methods.push("HEAD".to_owned());
                }
                EdgeRule {
                    methods,
                    regex: r.path_regex(),
                    verdict,
                }
            })
            .collect();
        let trivial = rules.first().is_some_and(|r| {
            r.verdict == Verdict::Continue
                && r.methods.is_empty()
                && r.regex == "^(/[^?]*)?/*([?].*)?$"
        });
        (!trivial).then_some(Self { rules })
    }

    /// `then` behind the policy: the matcher Envoy runs on a request.
    pub fn wrap(&self, then: Matcher) -> Matcher {
        let mut matchers = vec![
            FieldMatcher {
                predicate: Some(not(path_matches(&plain_target()))),
                on_match: Some(deny("ambiguous-path")),
            },
            FieldMatcher {
                predicate: Some(not(single(
                    ":method",
                    MatchPattern::SafeRegex(re2(METHOD_TOKEN)),
                ))),
                on_match: Some(deny("ambiguous-method")),
            },
            FieldMatcher {
                predicate: Some(Predicate {
                    match_type: Some(MatchType::OrMatcher(PredicateList {
                        predicate: METHOD_OVERRIDE_HEADERS
                            .iter()
                            .map(|h| single(h, MatchPattern::SafeRegex(re2(".*"))))
                            .chain([path_matches(METHOD_IN_QUERY)])
                            .collect(),
                    })),
                }),
                on_match: Some(deny("method-override")),
            },
        ];
        for rule in &self.rules {
            let exact = path_matches(&rule.regex);
            let any_case = path_matches(&format!("(?i){}", rule.regex));
            let for_methods = |path: Predicate| {
                if rule.methods.is_empty() {
                    path
                } else {
                    all([method_in(&rule.methods), path])
                }
            };
            match rule.verdict {
                Verdict::Continue => {
                    // ext_authz refuses a path whose rule changes with case
                    // (a backend may route without case): one this rule
                    // matches only in another case is refused here, before
                    // any later rule is tried, as ext_authz refuses it.
                    matchers.push(FieldMatcher {
                        predicate: Some(for_methods(all([any_case, not(exact.clone())]))),
                        on_match: Some(deny("ambiguous-case")),
                    });
                    matchers.push(FieldMatcher {
                        predicate: Some(for_methods(exact)),
                        on_match: Some(nested(then.clone())),
                    });
                }
                Verdict::NeedsExtAuthz => matchers.push(FieldMatcher {
                    predicate: Some(for_methods(any_case)),
                    on_match: Some(deny("needs-ext-authz")),
                }),
            }
        }
        Matcher {
            matcher_type: Some(MatcherType::MatcherList(MatcherList { matchers })),
            on_no_match: Some(Box::new(deny("no-rule"))),
        }
    }
}

fn single(header: &str, pattern: MatchPattern) -> Predicate {
    Predicate {
        match_type: Some(MatchType::SinglePredicate(SinglePredicate {
            input: Some(header_input(header)),
            matcher: Some(single_predicate::Matcher::ValueMatch(StringMatcher {
                match_pattern: Some(pattern),
                ignore_case: false,
            })),
        })),
    }
}

/// The request targets the edge lets on to the rules (Envoy matches a
/// whole `:path`): segments of the characters ext_authz's rule reads as
/// themselves ([`PLAIN_PUNCTUATION`], letters, digits: no `%`, no `;`),
/// none empty or ending in `.`, an optional trailing `/`, any query.
/// Everything ext_authz resolves to another path than it reads, or
/// refuses, falls outside ([`auth_domain::authz::target::canonical_path`]).
fn plain_target() -> String {
    // In an RE2 class these stand for themselves; `-` goes last.
    let punctuation: String = PLAIN_PUNCTUATION.chars().filter(|c| *c != '-').collect();
    let last: String = punctuation.chars().filter(|c| *c != '.').collect();
    format!("^(/[A-Za-z0-9{punctuation}-]*[A-Za-z0-9{last}-])*/?([?].*)?$")
}

/// A method ext_authz decides on: an upper-case token
/// ([`auth_domain::authz::target::canonical_method`]).
const METHOD_TOKEN: &str = "^[A-Z_-]+$";

/// A query with a parameter that may read `_method` to a framework that
/// honours it ([`auth_domain::authz::target::query_overrides_method`]):
/// pairs split on `&` or `;`, a name of `_`, `.`, `[` or `+` then `method`
/// in any case, or any name holding an escape (which could spell it).
pub(crate) const METHOD_IN_QUERY: &str =
    r"^[^?]*[?](.*[&;])?([_.+\[](?i:method)[+]*|[^=&;]*%[^=&;]*)([=&;].*)?$";

fn re2(regex: &str) -> envoy_types::pb::xds::r#type::matcher::v3::RegexMatcher {
    use envoy_types::pb::xds::r#type::matcher::v3::{
        RegexMatcher,
        regex_matcher::{EngineType, GoogleRe2},
    };
    RegexMatcher {
        regex: regex.to_owned(),
        engine_type: Some(EngineType::GoogleRe2(GoogleRe2 {})),
    }
}

fn path_matches(regex: &str) -> Predicate {
    single(":path", MatchPattern::SafeRegex(re2(regex)))
}

fn all<const N: usize>(predicates: [Predicate; N]) -> Predicate {
    Predicate {
        match_type: Some(MatchType::AndMatcher(PredicateList {
            predicate: predicates.into(),
        })),
    }
}

fn not(predicate: Predicate) -> Predicate {
    Predicate {
        match_type: Some(MatchType::NotMatcher(Box::new(predicate))),
    }
}

fn method_in(methods: &[String]) -> Predicate {
    let each: Vec<Predicate> = methods
        .iter()
        .map(|m| single(":method", MatchPattern::Exact(m.clone())))
        .collect();
    if each.len() == 1 {
        return each.into_iter().next().unwrap_or_default();
    }
    Predicate {
        match_type: Some(MatchType::OrMatcher(PredicateList { predicate: each })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::policy::{AccessKind, RouteRule, default_rules};

    fn rule(methods: &[&str], path: &str, access: AccessKind, roles: &[&str]) -> RouteRule {
        RouteRule::new(methods, path, access, roles, "default")
    }

    /// The path allowlist, built from ext_authz's set of plain characters.
    #[test]
    fn the_plain_target_is_ext_authzs_set_of_plain_characters() {
        assert_eq!(
            plain_target(),
            r"^(/[A-Za-z0-9._~!$&'()*+,=:@-]*[A-Za-z0-9_~!$&'()*+,=:@-])*/?([?].*)?$"
        );
    }

    #[test]
    fn the_default_policy_needs_nothing_but_the_deny_maps_under_api() {
        let policy = RoutePolicy::compile(&default_rules(), &["default", "public"]).unwrap();
        assert_eq!(EdgePolicy::from(&policy), None);
    }

    /// The regex each rule gets matches the paths the policy's own matcher
    /// matches, for the forms Envoy hands on (normalised, query kept).
    #[test]
    fn rule_regexes_match_as_the_policy_does() {
        let mut rules = vec![
            rule(&[], "/api/reports/**", AccessKind::Roles, &["admin"]),
            rule(
                &["POST"],
                "/api/videos/*/publish",
                AccessKind::Authenticated,
                &[],
            ),
            rule(&[], "/api/a.b/*", AccessKind::Authenticated, &[]),
        ];
        rules.extend(default_rules());
        let policy = RoutePolicy::compile(&rules, &["default", "public"]).unwrap();
        let edge = EdgePolicy::from(&policy).unwrap();
        let re = |i: usize| regex_lite(&edge.rules[i].regex);
        for (path, rule, expected) in [
            ("/api/reports", 0, true),
            ("/api/reports/", 0, true),
            ("/api/reports/x/y?z=1", 0, true),
            ("/api/reportsx", 0, false),
            ("/api/videos/12/publish", 1, true),
            ("/api/videos/12/publish/", 1, true),
            ("/api/videos/publish", 1, false),
            ("/api/videos/1/2/publish", 1, false),
            ("/api/a.b/x", 2, true),
            ("/api/aXb/x", 2, false),
        ] {
            assert_eq!(re(rule)(path), expected, "{path} against rule {rule}");
            let policy_says = policy
                .route(
                    if rule == 1 { "POST" } else { "GET" },
                    path.split('?').next().unwrap(),
                )
                .is_some_and(|r| r.path_regex() == edge.rules[rule].regex);
            assert_eq!(policy_says, expected, "the policy on {path}");
        }
        assert_eq!(edge.rules[0].verdict, Verdict::NeedsExtAuthz);
        assert_eq!(edge.rules[1].methods, ["POST"]);
    }

    /// A small matcher for the RE2 subset the regexes use (anchors,
    /// literals, escapes, `[^/?]`, `[?]`, `/+`, `/*`, `.*`, `(…)?`), so the
    /// test needs no regex crate: it backtracks over the pattern.
    fn regex_lite(pattern: &str) -> impl Fn(&str) -> bool + '_ {
        move |text: &str| {
            let p: Vec<char> = pattern
                .trim_start_matches('^')
                .trim_end_matches('$')
                .chars()
                .collect();
            let t: Vec<char> = text.chars().collect();
            matches_here(&p, &t)
        }
    }

    fn atom_len(p: &[char]) -> usize {
        match p[0] {
            '\\' => 2,
            '[' => p.iter().position(|c| *c == ']').unwrap() + 1,
            '(' => {
                let mut depth = 0;
                for (i, c) in p.iter().enumerate() {
                    match c {
                        '(' => depth += 1,
                        ')' => {
                            depth -= 1;
                            if depth == 0 {
                                return i + 1;
                            }
                        }
                        _ => {}
                    }
                }
                unreachable!()
            }
            _ => 1,
        }
    }

    fn atom_matches(atom: &[char], c: char) -> bool {
        match atom[0] {
            '\\' => atom[1] == c,
            '.' => true,
            '[' if atom[1] == '^' => !atom[2..atom.len() - 1].contains(&c),
            '[' => atom[1..atom.len() - 1].contains(&c),
            other => other == c,
        }
    }

    fn matches_here(p: &[char], t: &[char]) -> bool {
        if p.is_empty() {
            return t.is_empty();
        }
        let n = atom_len(p);
        let (atom, rest) = p.split_at(n);
        let quant = rest.first().copied();
        if atom[0] == '(' {
            let inner = &atom[1..atom.len() - 1];
            // Only `(…)?` is used.
            let rest = &rest[1..];
            let with: Vec<char> = inner.iter().chain(rest.iter()).copied().collect();
            return matches_here(&with, t) || matches_here(rest, t);
        }
        match quant {
            Some('*') | Some('+') => {
                let rest = &rest[1..];
                let min = usize::from(quant == Some('+'));
                let mut i = 0;
                loop {
                    if i >= min && matches_here(rest, &t[i..]) {
                        return true;
                    }
                    if i < t.len() && atom_matches(atom, t[i]) {
                        i += 1;
                    } else {
                        return false;
                    }
                }
            }
            Some('?') => {
                let rest = &rest[1..];
                (!t.is_empty() && atom_matches(atom, t[0]) && matches_here(rest, &t[1..]))
                    || matches_here(rest, t)
            }
            _ => !t.is_empty() && atom_matches(atom, t[0]) && matches_here(rest, &t[1..]),
        }
    }
}
