//! Edge mode: auth-service as the control plane of Envoys that enforce JWT,
//! revocation and per-user limits themselves, with no call to auth-service
//! per request (README, "Edge mode").
//!
//! Envoy verifies the JWT (`jwt_authn`, the JWKS from the HTTP port) and
//! copies its `sid`, `sub` and `jti` into request headers; an RBAC filter
//! whose configuration this module serves over ECDS ([`ecds`]) refuses the
//! revoked ones by hash lookups:
//!
//! 1. a token without `sid` or `jti` (none this service issues), or a
//!    request with more than one value in an identity header — refused;
//! 2. `x-session-id` (`sid`) in the revoked sessions (Logout, RevokeToken,
//!    a refresh family ended) — refused;
//! 3. `x-user-id` (`sub`) in the users revoked as a whole (suspension,
//!    deletion, password or role change, RevokeUserSessions), then
//!    `x-token-id` (`jti`) by
//!    prefix: a jti is a UUIDv7 whose first 48 bits are its issue time in
//!    milliseconds, so "issued before the revocation" is a set of hex
//!    prefixes (a longest-prefix trie in Envoy), the same rule and
//!    precision as ext_authz's per-user epoch — a token issued after it
//!    (the user's next login) passes;
//! 4. everything else is allowed.
//!
//! The map is built from the database's revocation log, the truth every
//! replica shares: the rows of the last access-token lifetime (older
//! revocations only end tokens that have expired). Its version is the log's
//! sequence number of the last row it holds, so it never goes backwards,
//! and the content of a version is a function of the log alone: every
//! replica serves the same map under the same version.

pub mod ecds;
pub mod policy;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::{
    envoy::config::rbac::v3::{Action, rbac::Action as RbacAction},
    envoy::extensions::filters::http::rbac::v3::Rbac,
    envoy::r#type::matcher::v3::HttpRequestHeaderMatchInput,
    google::protobuf::Any,
    xds::core::v3::TypedExtensionConfig,
    xds::r#type::matcher::v3::{
        Matcher, StringMatcher,
        matcher::{
            MatcherList, MatcherTree, MatcherType, OnMatch,
            matcher_list::{
                FieldMatcher, Predicate,
                predicate::{MatchType, PredicateList, SinglePredicate, single_predicate},
            },
            matcher_tree::{MatchMap, TreeType},
            on_match,
        },
        string_matcher::MatchPattern,
    },
};
use prost::{Message, Name};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::revocation::feed::{FeedError, LoggedRevocation, RevocationFeed, Revoked};
use crate::tokens;

/// The ECDS resource name of the revocation filter's configuration
/// (`config_discovery` in `envoy/edge.yaml`).
pub const RESOURCE_NAME: &str = "immersiverse.auth.revocations";
/// The ECDS resource name of the recent map's filter ([`DenyList`]).
pub const RECENT_NAME: &str = "immersiverse.auth.revocations.recent";
/// The ECDS resource of the edge's jwt_authn filter: the issuer, audience
/// and **keys** tokens are verified with. Pushed whenever the keys change,
/// so a key removed from auth-service (the answer to a leaked key) stops
/// verifying at the edge within [`KEYS_POLL`], and the tokens jwt_authn had
/// verified with it go too: its cache of verified tokens belongs to the
/// filter's configuration, and a new configuration starts with an empty one.
/// A JWKS fetched by Envoy itself would keep a removed key for its cache
/// duration and every token verified with it until its own `exp`.
pub const JWT_NAME: &str = "immersiverse.auth.jwt";
/// How often the keys are compared with those last pushed.
const KEYS_POLL: Duration = Duration::from_secs(1);
/// The request headers `jwt_authn` writes the verified claims into
/// (`claim_to_headers`), named as ext_authz names them for the upstream;
/// the edge strips client-sent ones first.
pub const SID_HEADER: &str = "x-session-id";
pub const SUB_HEADER: &str = "x-user-id";
pub const JTI_HEADER: &str = "x-token-id";
pub const ROLES_HEADER: &str = "x-user-roles";
/// Revocations are kept this much longer than an access token lives: the
/// edge's jwt_authn accepts a token `tokens.leeway_secs` past `exp` (its
/// `clock_skew_seconds`, [`jwt_snapshot`]), which may not exceed this.
const EDGE_CLOCK_SKEW: Duration = Duration::from_secs(tokens::config::MAX_LEEWAY_SECS);
/// Rows arriving within this long of the first are pushed together: a
/// revocation storm becomes a few pushes, not one per row.
pub const COALESCE: Duration = Duration::from_millis(5);
/// Once a version has gathered this many rows, a storm is arriving: its
/// rows come in runs (a page of the log at a time; a task's share of the
/// runtime, 128 channel operations, at a time) with gaps longer than
/// [`COALESCE`] between them on a loaded node. The version then waits up to
/// [`STORM_QUIET`] after each row for the next, and is published at the
/// latest [`STORM_MAX`] after its first row: a storm becomes a push every
/// quarter second at most, instead of one per run. A lone revocation is
/// pushed within [`COALESCE`] as before.
const STORM_ROWS: usize = 64;
const STORM_QUIET: Duration = Duration::from_millis(50);
const STORM_MAX: Duration = Duration::from_millis(250);

/// How the log is cut into the large, rarely pushed base map and the small
/// recent one: a cut falls between two consecutive rows (in log order) of
/// different 30-second periods of their time.
pub const BASE_PERIOD: Duration = Duration::from_secs(30);

/// The revocations that can still matter: those of the last access-token
/// lifetime (plus Envoy's clock skew), in log order, split in two maps so
/// that a revocation pushes a small map and the large one moves rarely:
///
/// * **base** ([`RESOURCE_NAME`]): the rows up to the latest cut, with the
///   guard; pushed once per cut (at most every [`BASE_PERIOD`]);
/// * **recent** ([`RECENT_NAME`]): every row after the *previous* cut;
///   pushed at each revocation.
///
/// The recent map overlaps the base by one period, so an Envoy holds every
/// revocation whether its base map is the latest or the one before (its two
/// streams may reach different replicas, or apply out of order), and the
/// cuts are a function of the log alone: each replica that replayed the
/// window finds the same cuts and serves the same maps under the same
/// versions.
#[derive(Debug)]
pub struct DenyList {
    window: Duration,
    rows: VecDeque<Arc<LoggedRevocation>>,
    /// The log's sequence number of the last row applied.
    seq: i64,
    /// The period of the last row applied.
    last_period: Option<i64>,
    /// The newest row time so far.
    newest: Option<OffsetDateTime>,
    /// The latest cut (base holds the rows up to it) and the newest row
    /// time up to it; `None` before the first cut: the base is empty.
    base: Option<(i64, OffsetDateTime)>,
    /// The cut before it: recent holds the rows after it.
    previous_base: Option<i64>,
}

/// One version of one map as Envoy receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The log's sequence number the map is complete up to.
    pub version: i64,
    /// The `TypedExtensionConfig` resource (an RBAC filter configuration),
    /// encoded once and shared by every stream.
    pub resource: Any,
    pub sessions: usize,
    pub users: usize,
    /// Map entries in all (sessions, users and their jti prefixes).
    pub entries: usize,
}

/// The two maps of one moment, and the keys to verify with.
#[derive(Debug, Clone)]
pub struct Maps {
    pub base: Arc<Snapshot>,
    pub recent: Arc<Snapshot>,
    /// The jwt_authn configuration ([`JWT_NAME`]); its version is taken
    /// from the keys' JWKS, so replicas with the same keys agree.
    pub keys: Arc<Snapshot>,
}

impl Maps {
    /// Puts newer maps in `current` (under the channel's lock); whether it
    /// did. The keys are [`ControlPlane::watch_keys`]'s alone to change:
    /// the maps keep the keys they hold, and only the first maps take
    /// `first_keys` — a set read before the lock could be older than one
    /// pushed meanwhile, and would put a removed key back.
    fn advance(
        current: &mut Option<Maps>,
        base: Arc<Snapshot>,
        recent: Arc<Snapshot>,
        first_keys: impl FnOnce() -> Arc<Snapshot>,
    ) -> bool {
        let newer = current
            .as_ref()
            .is_none_or(|c| c.recent.version < recent.version || c.base.version < base.version);
        if newer {
            let keys = current.as_ref().map_or_else(first_keys, |c| c.keys.clone());
            *current = Some(Maps { base, recent, keys });
        }
        newer
    }

    /// The resources a discovery request names, in its order (unknown
    /// names skipped); none named asks for all there are (xDS wildcard).
    pub fn wanted(&self, names: &[String]) -> Vec<&Arc<Snapshot>> {
        if names.is_empty() {
            return vec![&self.base, &self.recent, &self.keys];
        }
        names
            .iter()
            .filter_map(|name| match name.as_str() {
                RESOURCE_NAME => Some(&self.base),
                RECENT_NAME => Some(&self.recent),
                JWT_NAME => Some(&self.keys),
                _ => None,
            })
            .collect()
    }
}

/// The edge's jwt_authn configuration for the keys in `jwks`: tokens read
/// from `authorization: Bearer` only, verified against the issuer,
/// audience and clock skew auth-service itself verifies with, an `exp`
/// required, the identity copied into the headers ext_authz would set
/// (client-sent ones are stripped before, `envoy/edge.yaml`), verified
/// tokens cached (100,000 per worker), on every path under `/api/`.
pub fn jwt_snapshot(config: &tokens::config::TokenConfig, jwks: &str) -> Snapshot {
    use envoy_types::pb::envoy::{
        config::core::v3::{DataSource, data_source},
        config::route::v3::{RouteMatch, route_match::PathSpecifier},
        extensions::filters::http::jwt_authn::v3::{
            JwtAuthentication, JwtCacheConfig, JwtClaimToHeader, JwtHeader, JwtProvider,
            JwtRequirement, RequirementRule, jwt_provider::JwksSourceSpecifier,
            jwt_requirement::RequiresType, requirement_rule::RequirementType,
        },
    };
    const PROVIDER: &str = "immersiverse";
    let provider = JwtProvider {
        issuer: config.issuer.clone(),
        audiences: vec![config.audience.clone()],
        require_expiration: true,
        forward: true,
        from_headers: vec![JwtHeader {
            name: "authorization".to_owned(),
            value_prefix: "Bearer ".to_owned(),
        }],
        clock_skew_seconds: u32::try_from(config.leeway_secs).unwrap_or(u32::MAX),
        jwt_cache_config: Some(JwtCacheConfig {
            jwt_cache_size: 100_000,
            ..Default::default()
        }),
        claim_to_headers: [
            (SUB_HEADER, "sub"),
            (SID_HEADER, "sid"),
            (JTI_HEADER, "jti"),
            (ROLES_HEADER, "roles_csv"),
        ]
        .into_iter()
        .map(|(header, claim)| JwtClaimToHeader {
            header_name: header.to_owned(),
            claim_name: claim.to_owned(),
            ..Default::default()
        })
        .collect(),
        jwks_source_specifier: Some(JwksSourceSpecifier::LocalJwks(DataSource {
            specifier: Some(data_source::Specifier::InlineString(jwks.to_owned())),
            ..Default::default()
        })),
        ..Default::default()
    };
    let jwt = JwtAuthentication {
        providers: [(PROVIDER.to_owned(), provider)].into_iter().collect(),
        rules: vec![RequirementRule {
            r#match: Some(RouteMatch {
                path_specifier: Some(PathSpecifier::Prefix(format!("/{}/", policy::EDGE_SEGMENT))),
                ..Default::default()
            }),
            requirement_type: Some(RequirementType::Requires(JwtRequirement {
                requires_type: Some(RequiresType::ProviderName(PROVIDER.to_owned())),
            })),
        }],
        ..Default::default()
    };
    let resource = envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig {
        name: JWT_NAME.to_owned(),
        typed_config: Some(any(&jwt)),
    };
    Snapshot {
        version: jwks_version(jwks),
        resource: any(&resource),
        sessions: 0,
        users: 0,
        entries: 0,
    }
}

/// The version of [`jwt_snapshot`]'s resource: the first 64 bits of the
/// JWKS's SHA-256, positive so it reads like the maps' versions. A function
/// of the keys alone: replicas with the same keys agree.
fn jwks_version(jwks: &str) -> i64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(jwks.as_bytes());
    let mut version = [0u8; 8];
    version.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(version) & i64::MAX
}

fn period_of(at: OffsetDateTime) -> i64 {
    at.unix_timestamp()
        .div_euclid(i64::try_from(BASE_PERIOD.as_secs()).unwrap_or(30))
}

impl DenyList {
    /// `access_ttl`: the access tokens' lifetime.
    pub fn new(access_ttl: Duration, seq: i64) -> Self {
        Self {
            window: access_ttl + EDGE_CLOCK_SKEW,
            rows: VecDeque::new(),
            seq,
            last_period: None,
            newest: None,
            base: None,
            previous_base: None,
        }
    }

    pub fn seq(&self) -> i64 {
        self.seq
    }

    /// The latest cut (the base map's version).
    pub fn base_seq(&self) -> i64 {
        self.base.map_or(0, |(seq, _)| seq)
    }

    /// Applies a row of the log (rows at or below the last one are skipped):
    /// a row of a later period than the one before it cuts the log there.
    /// Rows older than the window before the newest row's time are
    /// forgotten — the newest *row's*, not the clock's, so that a version's
    /// content depends on the log alone.
    pub fn apply(&mut self, row: Arc<LoggedRevocation>) {
        if row.seq <= self.seq {
            return;
        }
        let period = period_of(row.occurred_at);
        if let (Some(last), Some(newest)) = (self.last_period, self.newest)
            && period > last
        {
            self.previous_base = self.base.map(|(seq, _)| seq);
            self.base = Some((self.seq, newest));
        }
        self.last_period = Some(period);
        self.seq = row.seq;
        self.newest = Some(
            self.newest
                .map_or(row.occurred_at, |n| n.max(row.occurred_at)),
        );
        self.rows.push_back(row);
        // Kept while the base or the recent map may hold them.
        let horizon = self
            .base
            .map_or(self.newest, |(_, at)| Some(at))
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
            - self.window;
        while self.rows.front().is_some_and(|r| r.occurred_at < horizon) {
            self.rows.pop_front();
        }
    }

    /// What `rows` revoke: sessions, and users as a whole (the latest
    /// epoch, in milliseconds, of each).
    fn revoked<'a>(
        rows: impl Iterator<Item = &'a Arc<LoggedRevocation>>,
    ) -> (BTreeSet<Uuid>, BTreeMap<Uuid, i64>) {
        let mut sessions = BTreeSet::new();
        let mut users = BTreeMap::new();
        for row in rows {
            match row.revoked {
                Revoked::Session { session_id, .. } => {
                    sessions.insert(session_id);
                }
                // As `revocation::feed::apply_log`: every other kind ends all
                // the user's tokens issued before it.
                Revoked::User { user_id } => {
                    let epoch = users.entry(user_id).or_insert(row.at_ms());
                    *epoch = (*epoch).max(row.at_ms());
                }
                Revoked::Nothing => {}
            }
        }
        (sessions, users)
    }

    /// Everything revoked in the window, in one set (tests, and the union
    /// the two maps must hold).
    pub fn all_revoked(&self) -> (BTreeSet<Uuid>, BTreeMap<Uuid, i64>) {
        let horizon = self.newest.unwrap_or(OffsetDateTime::UNIX_EPOCH) - self.window;
        Self::revoked(self.rows.iter().filter(|r| r.occurred_at >= horizon))
    }

    /// What the base map holds: the rows up to the latest cut.
    pub fn base_revoked(&self) -> (BTreeSet<Uuid>, BTreeMap<Uuid, i64>) {
        match self.base {
            Some((cut, at)) => {
                let horizon = at - self.window;
                Self::revoked(
                    self.rows
                        .iter()
                        .filter(|r| r.seq <= cut && r.occurred_at >= horizon),
                )
            }
            None => Default::default(),
        }
    }

    /// What the recent map holds: the rows after the previous cut.
    pub fn recent_revoked(&self) -> (BTreeSet<Uuid>, BTreeMap<Uuid, i64>) {
        let from = self.previous_base.unwrap_or(i64::MIN);
        let horizon = self.newest.unwrap_or(OffsetDateTime::UNIX_EPOCH) - self.window;
        Self::revoked(
            self.rows
                .iter()
                .filter(|r| r.seq > from && r.occurred_at >= horizon),
        )
    }

    /// The base map, with the guard.
    pub fn base_snapshot(&self) -> Snapshot {
        let (sessions, users) = self.base_revoked();
        self.map(
            RESOURCE_NAME,
            self.base_seq(),
            &sessions,
            &users,
            true,
            None,
        )
    }

    /// The recent map.
    pub fn recent_snapshot(&self) -> Snapshot {
        self.recent_snapshot_behind(None)
    }

    /// The recent map behind the route policy's share for the edge's paths
    /// ([`policy::EdgePolicy`]).
    pub fn recent_snapshot_behind(&self, policy: Option<&policy::EdgePolicy>) -> Snapshot {
        let (sessions, users) = self.recent_revoked();
        self.map(RECENT_NAME, self.seq, &sessions, &users, false, policy)
    }

    /// One map as an RBAC filter configuration named `name`.
    fn map(
        &self,
        name: &str,
        version: i64,
        sessions: &BTreeSet<Uuid>,
        users: &BTreeMap<Uuid, i64>,
        guard: bool,
        policy: Option<&policy::EdgePolicy>,
    ) -> Snapshot {
        let window_ms = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        let mut entries = sessions.len();
        let users_tree: BTreeMap<String, OnMatch> = users
            .iter()
            .map(|(user, epoch_ms)| {
                let prefixes = issued_by(*epoch_ms, window_ms);
                entries += 1 + prefixes.len();
                let issued_before = prefixes
                    .into_iter()
                    .map(|p| (p, deny("revoked-user")))
                    .collect();
                (
                    user.to_string(),
                    nested(tree(
                        JTI_HEADER,
                        TreeType::PrefixMatchMap,
                        issued_before,
                        allow(),
                    )),
                )
            })
            .collect();
        let after_sessions = if users_tree.is_empty() {
            allow()
        } else {
            nested(tree(
                SUB_HEADER,
                TreeType::ExactMatchMap,
                users_tree,
                allow(),
            ))
        };
        let after_guard = if sessions.is_empty() {
            after_sessions
        } else {
            let map = sessions
                .iter()
                .map(|s| (s.to_string(), deny("revoked-session")))
                .collect();
            nested(tree(
                SID_HEADER,
                TreeType::ExactMatchMap,
                map,
                after_sessions,
            ))
        };
        let matcher = if guard {
            Matcher {
                matcher_type: Some(MatcherType::MatcherList(MatcherList {
                    matchers: vec![FieldMatcher {
                        predicate: Some(Predicate {
                            match_type: Some(MatchType::OrMatcher(PredicateList {
                                predicate: vec![
                                    absent(SID_HEADER),
                                    absent(JTI_HEADER),
                                    // Two values joined into one header (two
                                    // tokens verified for one request) match
                                    // no entry: refused, never looked up.
                                    several(SID_HEADER),
                                    several(JTI_HEADER),
                                    several(SUB_HEADER),
                                ],
                            })),
                        }),
                        on_match: Some(deny("no-session")),
                    }],
                })),
                on_no_match: Some(Box::new(after_guard)),
            }
        } else {
            match after_guard.on_match {
                Some(on_match::OnMatch::Matcher(matcher)) => *matcher,
                // Nothing recent: a matcher of its default answer alone
                // (Envoy refuses an empty map).
                other => Matcher {
                    matcher_type: None,
                    on_no_match: Some(Box::new(OnMatch {
                        on_match: other,
                        keep_matching: false,
                    })),
                },
            }
        };
        let matcher = match policy {
            Some(policy) => policy.wrap(matcher),
            None => matcher,
        };
        let rbac = Rbac {
            matcher: Some(matcher),
            rules_stat_prefix: if guard {
                "revocation_"
            } else {
                "revocation_recent_"
            }
            .to_owned(),
            ..Default::default()
        };
        // The resource is Envoy's own TypedExtensionConfig (the matcher's
        // inputs and actions above are xds.core's).
        let resource = envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig {
            name: name.to_owned(),
            typed_config: Some(any(&rbac)),
        };
        Snapshot {
            version,
            resource: any(&resource),
            sessions: sessions.len(),
            users: users.len(),
            entries,
        }
    }
}

fn any<T: Message + Name>(message: &T) -> Any {
    Any {
        type_url: T::type_url(),
        value: message.encode_to_vec(),
    }
}

fn action(name: &str, action: RbacAction) -> OnMatch {
    OnMatch {
        on_match: Some(on_match::OnMatch::Action(TypedExtensionConfig {
            name: "envoy.filters.rbac.action".to_owned(),
            typed_config: Some(any(&Action {
                name: name.to_owned(),
                action: action as i32,
            })),
        })),
        keep_matching: false,
    }
}

pub(crate) fn deny(name: &str) -> OnMatch {
    action(name, RbacAction::Deny)
}

fn allow() -> OnMatch {
    action("not-revoked", RbacAction::Allow)
}

pub(crate) fn nested(matcher: Matcher) -> OnMatch {
    OnMatch {
        on_match: Some(on_match::OnMatch::Matcher(Box::new(matcher))),
        keep_matching: false,
    }
}

pub(crate) fn header_input(header: &str) -> TypedExtensionConfig {
    TypedExtensionConfig {
        name: header.to_owned(),
        typed_config: Some(any(&HttpRequestHeaderMatchInput {
            header_name: header.to_owned(),
        })),
    }
}

fn tree(
    header: &str,
    kind: fn(MatchMap) -> TreeType,
    map: BTreeMap<String, OnMatch>,
    on_no_match: OnMatch,
) -> Matcher {
    Matcher {
        matcher_type: Some(MatcherType::MatcherTree(MatcherTree {
            input: Some(header_input(header)),
            tree_type: Some(kind(MatchMap {
                map: map.into_iter().collect(),
            })),
        })),
        on_no_match: Some(Box::new(on_no_match)),
    }
}

/// Matches a request without `header`, or whose value is no UUID.
fn absent(header: &str) -> Predicate {
    let present = Predicate {
        match_type: Some(MatchType::SinglePredicate(SinglePredicate {
            input: Some(header_input(header)),
            matcher: Some(single_predicate::Matcher::ValueMatch(StringMatcher {
                // Every id this service issues is a hyphenated UUID; a
                // substring test costs less per request than a regex.
                match_pattern: Some(MatchPattern::Contains("-".to_owned())),
                ignore_case: false,
            })),
        })),
    };
    Predicate {
        match_type: Some(MatchType::NotMatcher(Box::new(present))),
    }
}

/// Matches a request whose `header` holds more than one value (Envoy joins
/// repeated headers with commas).
fn several(header: &str) -> Predicate {
    Predicate {
        match_type: Some(MatchType::SinglePredicate(SinglePredicate {
            input: Some(header_input(header)),
            matcher: Some(single_predicate::Matcher::ValueMatch(StringMatcher {
                match_pattern: Some(MatchPattern::Contains(",".to_owned())),
                ignore_case: false,
            })),
        })),
    }
}

/// Hex digits of a UUIDv7's timestamp (48 bits).
const TS_DIGITS: u32 = 12;

/// The jti prefixes of the tokens a user-wide revocation at `epoch_ms`
/// ends: issued within `window_ms` before it, up to and in its own
/// millisecond (ext_authz's epoch rule: a token of that millisecond may
/// have been decided on the state the change replaced; fail closed).
fn issued_by(epoch_ms: i64, window_ms: u64) -> Vec<String> {
    let hi = u64::try_from(epoch_ms).unwrap_or(0);
    jti_prefixes(hi.saturating_sub(window_ms), hi)
}

/// The jti prefixes (UUIDv7 text, lowercase, the hyphen after the eighth
/// digit) of exactly the tokens issued in `[lo, hi]` milliseconds, give or
/// take below: `lo` is first rounded down to a multiple of 16⁴ ms (65.5 s),
/// which only adds tokens that expired long ago and saves most prefixes.
pub fn jti_prefixes(lo: u64, hi: u64) -> Vec<String> {
    let max = (1u64 << 48) - 1;
    let hi = hi.min(max);
    let mut x = lo & !0xffff;
    let mut out = Vec::new();
    while x <= hi {
        // The largest aligned block starting at x that stays within hi.
        let mut k = 0;
        while k < TS_DIGITS {
            let size = 16u64.pow(k + 1);
            if !x.is_multiple_of(size) || x + (size - 1) > hi {
                break;
            }
            k += 1;
        }
        let digits = format!("{x:012x}");
        let kept = &digits[..(TS_DIGITS - k) as usize];
        out.push(if kept.len() > 8 {
            format!("{}-{}", &kept[..8], &kept[8..])
        } else {
            kept.to_owned()
        });
        match x.checked_add(16u64.pow(k)) {
            Some(next) => x = next,
            None => break,
        }
    }
    out
}

/// Builds the deny map from the revocation log and publishes each version
/// to the ECDS streams.
pub struct ControlPlane {
    access_ttl: Duration,
    /// The route policy's share for the edge's paths, carried in front of
    /// the recent map.
    policy: Option<policy::EdgePolicy>,
    /// Where the keys come from ([`Self::watch_keys`]).
    tokens: Arc<tokens::TokenService>,
    /// The jwt_authn configuration for the keys last seen.
    keys: std::sync::Mutex<Arc<Snapshot>>,
    current: watch::Sender<Option<Maps>>,
}

impl ControlPlane {
    pub fn new(
        access_ttl: Duration,
        policy: &crate::authz::policy::RoutePolicy,
        tokens: Arc<tokens::TokenService>,
    ) -> Arc<Self> {
        let (current, _) = watch::channel(None);
        let keys = Arc::new(jwt_snapshot(tokens.config(), &tokens.jwks_json()));
        Arc::new(Self {
            access_ttl,
            policy: policy::EdgePolicy::from(policy),
            tokens,
            keys: std::sync::Mutex::new(keys),
            current,
        })
    }

    fn keys(&self) -> Arc<Snapshot> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Until `stop`: compares the keys auth-service verifies with (they
    /// change on rotation, on a reload, and when one is removed) with those
    /// last pushed, every [`KEYS_POLL`], and pushes jwt_authn's new
    /// configuration when they differ.
    pub async fn watch_keys(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(KEYS_POLL) => {}
            }
            let jwks = self.tokens.jwks_json();
            if jwks_version(&jwks) == self.keys().version {
                continue;
            }
            let keys = Arc::new(jwt_snapshot(self.tokens.config(), &jwks));
            tracing::info!(
                version = keys.version,
                "edge: the signing keys changed; pushing jwt_authn's configuration"
            );
            metrics::counter!("edge_jwt_key_updates_total").increment(1);
            // Stored first: the first maps, published after this, read it.
            *self.keys.lock().unwrap_or_else(|e| e.into_inner()) = keys.clone();
            self.current.send_if_modified(|current| match current {
                Some(maps) if maps.keys.version != keys.version => {
                    maps.keys = keys;
                    true
                }
                _ => false,
            });
        }
    }

    /// The latest maps; `None` until the first are complete (an Envoy
    /// asking before then waits: its listener stays warming, fail closed).
    pub fn subscribe(&self) -> watch::Receiver<Option<Maps>> {
        self.current.subscribe()
    }

    pub fn current(&self) -> Option<Maps> {
        self.current.borrow().clone()
    }

    fn publish(&self, list: &DenyList) {
        let base = match self.current.borrow().as_ref() {
            Some(maps) if maps.base.version == list.base_seq() => maps.base.clone(),
            _ => {
                let base = Arc::new(list.base_snapshot());
                metrics::gauge!("edge_deny_map_entries", "map" => "base").set(base.entries as f64);
                metrics::gauge!("edge_deny_map_bytes", "map" => "base")
                    .set(base.resource.value.len() as f64);
                base
            }
        };
        let recent = Arc::new(list.recent_snapshot_behind(self.policy.as_ref()));
        metrics::gauge!("edge_deny_map_version").set(recent.version as f64);
        metrics::gauge!("edge_deny_map_entries", "map" => "recent").set(recent.entries as f64);
        metrics::gauge!("edge_deny_map_bytes", "map" => "recent")
            .set(recent.resource.value.len() as f64);
        self.current
            .send_if_modified(|current| Maps::advance(current, base, recent, || self.keys()));
    }

    /// Follows the revocation log until `stop`: replays the last lifetime's
    /// rows, publishes the first map once it has passed the log's head, then
    /// publishes a new version for each batch of rows (coalesced within
    /// [`COALESCE`]; a storm's within `STORM_MAX`). On a read failure it
    /// keeps the last map and resumes from where it was; if the log no
    /// longer holds that point, it starts over from the window.
    pub async fn run(self: Arc<Self>, feed: Arc<RevocationFeed>, stop: CancellationToken) {
        let mut list: Option<DenyList> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            // Two periods more than the window: the cuts before the latest
            // are found again as every replica found them.
            let since =
                OffsetDateTime::now_utc() - self.access_ttl - EDGE_CLOCK_SKEW - 2 * BASE_PERIOD;
            let (cursor, head) = match &list {
                Some(list) => (list.seq(), list.seq()),
                None => match feed.cursor_since(since).await {
                    Ok(start) => start,
                    Err(error) => {
                        tracing::warn!(%error, "edge deny map: revocation log unavailable");
                        if pause(&stop, &mut backoff).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            let mut rows = match feed.watch(Some(cursor)).await {
                Ok(rows) => rows,
                Err(FeedError::BadCursor(_)) => {
                    // Purged past where we were: rebuild from the window.
                    list = None;
                    continue;
                }
                Err(error) => {
                    tracing::warn!(%error, "edge deny map: revocation log unavailable");
                    if pause(&stop, &mut backoff).await {
                        return;
                    }
                    continue;
                }
            };
            let list = list.get_or_insert_with(|| DenyList::new(self.access_ttl, cursor));
            if list.seq() >= head {
                self.publish(list);
            }
            let failed = loop {
                let row = tokio::select! {
                    () = stop.cancelled() => return,
                    row = rows.recv() => row,
                };
                let mut failed = take(list, row);
                // Coalesce: whatever arrives within the window joins this
                // version; in a storm, the window stretches (STORM_ROWS).
                let first = tokio::time::Instant::now();
                let mut until = first + COALESCE;
                let mut gathered = 1;
                while failed.is_none() {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep_until(until) => break,
                        row = rows.recv() => {
                            failed = take(list, row);
                            gathered += 1;
                            if gathered >= STORM_ROWS {
                                let quiet = tokio::time::Instant::now() + STORM_QUIET;
                                until = quiet.min(first + STORM_MAX);
                            }
                        }
                    }
                }
                if list.seq() >= head {
                    self.publish(list);
                    backoff = Duration::from_millis(100);
                }
                if let Some(failed) = failed {
                    break failed;
                }
            };
            tracing::warn!(error = %failed, seq = list.seq(), "edge deny map: following the revocation log failed; resuming");
            metrics::counter!("edge_deny_map_feed_failures_total").increment(1);
            if pause(&stop, &mut backoff).await {
                return;
            }
        }
    }
}

/// Applies what the feed yielded; why it ended, when it did.
fn take(
    list: &mut DenyList,
    row: Option<Result<Arc<LoggedRevocation>, FeedError>>,
) -> Option<String> {
    match row {
        Some(Ok(row)) => {
            list.apply(row);
            None
        }
        Some(Err(error)) => Some(error.to_string()),
        None => Some("the feed closed".to_owned()),
    }
}

/// Waits `backoff` (doubling it up to 5 s); `true` when stopped meanwhile.
async fn pause(stop: &CancellationToken, backoff: &mut Duration) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(wait) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn matches(prefixes: &[String], ms: u64) -> bool {
        let uuid = format!("{ms:012x}");
        let text = format!("{}-{}-7abc-8def-0123456789ab", &uuid[..8], &uuid[8..]);
        prefixes.iter().any(|p| text.starts_with(p.as_str()))
    }

    /// A new version of the maps keeps the keys the maps hold, whatever
    /// set the publisher read before (a review found an older set written
    /// back: a removed key verified again until the next revocation).
    #[test]
    fn newer_maps_keep_the_keys_they_hold() {
        let snapshot = |version| {
            Arc::new(Snapshot {
                version,
                resource: Any::default(),
                sessions: 0,
                users: 0,
                entries: 0,
            })
        };
        let mut current = None;
        assert!(Maps::advance(
            &mut current,
            snapshot(1),
            snapshot(1),
            || snapshot(100)
        ));
        assert_eq!(
            current.as_ref().unwrap().keys.version,
            100,
            "the first maps take them"
        );
        // watch_keys pushed a newer set (200); the publisher had read 100.
        current.as_mut().unwrap().keys = snapshot(200);
        assert!(Maps::advance(
            &mut current,
            snapshot(1),
            snapshot(2),
            || snapshot(100)
        ));
        let maps = current.as_ref().unwrap();
        assert_eq!((maps.recent.version, maps.keys.version), (2, 200));
        assert!(
            !Maps::advance(&mut current, snapshot(1), snapshot(2), || snapshot(100)),
            "not newer"
        );
    }

    /// The rule ext_authz's epoch follows: a token of the revocation's own
    /// millisecond is refused, one of the next passes.
    #[test]
    fn a_user_wide_revocation_ends_the_tokens_of_its_own_millisecond() {
        let epoch = 0x0193_a1b2_c3d4_i64;
        let prefixes = issued_by(epoch, 960_000);
        let ms = epoch as u64;
        assert!(matches(&prefixes, ms), "its own millisecond");
        assert!(matches(&prefixes, ms - 1));
        assert!(matches(&prefixes, ms - 959_000));
        assert!(!matches(&prefixes, ms + 1), "the next millisecond");
    }

    #[test]
    fn jti_prefixes_render_the_uuid_text() {
        let ms = 0x0193_a1b2_c3d4_u64;
        let prefixes = jti_prefixes(ms, ms);
        assert!(
            prefixes.contains(&"0193a1b2-c3d4".to_owned()),
            "{prefixes:?}"
        );
        assert!(matches(&prefixes, ms));
        assert!(!matches(&prefixes, ms + 1));
    }

    proptest! {
        /// Every token issued in [lo, hi] matches, none after hi, none
        /// earlier than lo rounded down to 16⁴ ms.
        #[test]
        fn jti_prefixes_cover_exactly_the_range(
            lo in 1_600_000_000_000u64..1_900_000_000_000,
            width in 0u64..2_000_000,
            probe in -3_000_000i64..3_000_000,
        ) {
            let hi = lo + width;
            let prefixes = jti_prefixes(lo, hi);
            prop_assert!(prefixes.len() <= 15 * 2 * 5 + 2, "{}", prefixes.len());
            let x = (hi as i64 + probe) as u64;
            let expected = x <= hi && x >= (lo & !0xffff);
            prop_assert_eq!(matches(&prefixes, x), expected, "x={:x} lo={:x} hi={:x}", x, lo, hi);
            prop_assert!(matches(&prefixes, hi));
            prop_assert!(!matches(&prefixes, hi + 1));
            prop_assert!(matches(&prefixes, lo));
        }
    }

    fn row(
        seq: i64,
        kind: &str,
        user: Uuid,
        at: OffsetDateTime,
        session: Option<Uuid>,
    ) -> Arc<LoggedRevocation> {
        Arc::new(LoggedRevocation {
            seq,
            event_id: Uuid::now_v7(),
            event_type: kind.to_owned(),
            user_id: Some(user),
            occurred_at: at,
            revoked: match session {
                Some(session_id) => Revoked::Session {
                    user_id: user,
                    session_id,
                },
                None => Revoked::User { user_id: user },
            },
            reason: None,
        })
    }

    /// The maps hold the window before the newest row, whatever the clock
    /// says, and their versions are log numbers: two replicas that applied
    /// the same rows serve the same maps under the same versions.
    #[test]
    fn a_version_is_a_function_of_the_log() {
        let ttl = Duration::from_secs(900);
        let t0 = OffsetDateTime::from_unix_timestamp(1_765_000_000).unwrap();
        let (alice, bob) = (Uuid::now_v7(), Uuid::now_v7());
        let (s1, s2) = (Uuid::now_v7(), Uuid::now_v7());
        let rows = [
            row(1, "token_revoked", alice, t0, Some(s1)),
            row(
                2,
                "password_changed",
                bob,
                t0 + Duration::from_secs(10),
                None,
            ),
            row(
                3,
                "token_revoked",
                alice,
                t0 + Duration::from_secs(2000),
                Some(s2),
            ),
        ];
        let mut a = DenyList::new(ttl, 0);
        let mut b = DenyList::new(ttl, 0);
        for r in &rows {
            a.apply(r.clone());
        }
        // b sees one row twice and an old one again: both skipped.
        for r in [&rows[0], &rows[1], &rows[1], &rows[2], &rows[0]] {
            b.apply(r.clone());
        }
        assert_eq!(a.all_revoked(), b.all_revoked());
        assert_eq!(a.base_revoked(), b.base_revoked());
        assert_eq!(a.recent_revoked(), b.recent_revoked());
        assert_eq!((a.seq(), a.base_seq()), (b.seq(), b.base_seq()));
        assert_eq!(a.recent_snapshot().version, 3);
        // Rows 1 and 2 are more than 960 s before row 3: gone.
        let (sessions, users) = a.all_revoked();
        assert_eq!((sessions.len(), users.len()), (1, 0));
        let mut c = DenyList::new(ttl, 0);
        c.apply(rows[0].clone());
        c.apply(rows[1].clone());
        let recent = c.recent_snapshot();
        assert_eq!((recent.version, recent.sessions, recent.users), (2, 1, 1));
        assert!(recent.entries > 2, "bob's jti prefixes: {}", recent.entries);
    }

    /// Failure class: two streams of one Envoy applied out of order, or
    /// served by two replicas a cut apart. Over a log of many periods, the
    /// recent map together with the latest base *or the one before* holds
    /// every revocation of the window; the recent map stays at about two
    /// periods of rows; and a replica that joined late (replaying from the
    /// window's start) finds the same cuts and maps.
    #[test]
    fn the_base_and_recent_maps_cover_the_window_whichever_base_an_envoy_holds() {
        let ttl = Duration::from_secs(900);
        let t0 = OffsetDateTime::from_unix_timestamp(1_765_000_007).unwrap();
        let users: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
        let mut early = DenyList::new(ttl, 0);
        let mut late: Option<DenyList> = None;
        let mut previous_base = early.base_revoked();
        let mut rows = Vec::new();
        for i in 0..3000i64 {
            // One row every 0.9 s (about 33 per period); a few user-wide.
            let at = t0 + Duration::from_millis(900 * i as u64);
            let kind = if i % 97 == 0 {
                "password_changed"
            } else {
                "token_revoked"
            };
            let r = row(i + 1, kind, users[i as usize % 5], at, Some(Uuid::now_v7()));
            rows.push(r.clone());
            let base_before = early.base_seq();
            let base_revoked_before = early.base_revoked();
            early.apply(r.clone());
            if early.base_seq() != base_before {
                previous_base = base_revoked_before;
            }
            if i % 5 != 0 && i != 2999 {
                if let Some(joined) = late.as_mut() {
                    joined.apply(r);
                }
                continue;
            }
            let (all_sessions, all_users) = early.all_revoked();
            let (recent_sessions, recent_users) = early.recent_revoked();
            for (base_sessions, base_users) in [early.base_revoked(), previous_base.clone()] {
                let sessions: BTreeSet<Uuid> =
                    base_sessions.union(&recent_sessions).copied().collect();
                assert!(all_sessions.is_subset(&sessions), "row {i}");
                for (user, epoch) in &all_users {
                    let held = base_users.get(user).max(recent_users.get(user));
                    assert_eq!(held, Some(epoch), "row {i}: user epoch");
                }
            }
            assert!(
                recent_sessions.len() <= 80,
                "row {i}: recent {}",
                recent_sessions.len()
            );
            // A replica starting at row 2000 replays the window from there.
            if i == 2000 {
                let start = early.seq() - 1100;
                let mut joined = DenyList::new(ttl, start);
                for r in &rows[usize::try_from(start).unwrap()..] {
                    joined.apply(r.clone());
                }
                late = Some(joined);
            } else if let Some(joined) = late.as_mut() {
                joined.apply(r);
            }
        }
        let late = late.unwrap();
        assert_eq!(
            (late.seq(), late.base_seq()),
            (early.seq(), early.base_seq())
        );
        assert_eq!(late.base_revoked(), early.base_revoked());
        assert_eq!(late.recent_revoked(), early.recent_revoked());
    }

    /// The served configurations decode as Envoy's RBAC filter: the base
    /// with the guard first and the session map below it, the recent map
    /// without the guard, and an empty recent map as its default answer
    /// alone (Envoy refuses an empty map).
    #[test]
    fn the_resources_are_rbac_filters_named_for_ecds() {
        let mut list = DenyList::new(Duration::from_secs(900), 0);
        let at = OffsetDateTime::from_unix_timestamp(1_765_000_000).unwrap();
        let (early, late) = (Uuid::now_v7(), Uuid::now_v7());
        list.apply(row(7, "token_revoked", Uuid::now_v7(), at, Some(early)));
        list.apply(row(
            8,
            "token_revoked",
            Uuid::now_v7(),
            at + BASE_PERIOD,
            Some(late),
        ));
        assert_eq!(list.base_seq(), 7);
        let decode = |snapshot: &Snapshot, name: &str| {
            assert_eq!(
                snapshot.resource.type_url,
                "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
            );
            let resource = envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig::decode(
                snapshot.resource.value.as_slice(),
            )
            .unwrap();
            assert_eq!(resource.name, name);
            let config = resource.typed_config.unwrap();
            assert_eq!(
                config.type_url,
                "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
            );
            Rbac::decode(config.value.as_slice())
                .unwrap()
                .matcher
                .unwrap()
        };
        let sessions_of = |matcher: Matcher| -> Vec<String> {
            let Some(MatcherType::MatcherTree(tree)) = matcher.matcher_type else {
                panic!("a tree")
            };
            let Some(TreeType::ExactMatchMap(map)) = tree.tree_type else {
                panic!("exact")
            };
            map.map.into_keys().collect()
        };
        let base = decode(&list.base_snapshot(), RESOURCE_NAME);
        let Some(MatcherType::MatcherList(guard)) = base.matcher_type else {
            panic!("guard first")
        };
        assert_eq!(guard.matchers.len(), 1);
        let Some(on_match::OnMatch::Matcher(sessions)) = base.on_no_match.unwrap().on_match else {
            panic!("the session map next")
        };
        assert_eq!(sessions_of(*sessions), [early.to_string()]);
        let recent = decode(&list.recent_snapshot(), RECENT_NAME);
        let mut held = sessions_of(recent);
        held.sort();
        let mut both = vec![early.to_string(), late.to_string()];
        both.sort();
        assert_eq!(held, both, "the recent map overlaps the base by a period");
        let empty = DenyList::new(Duration::from_secs(900), 0);
        let nothing = decode(&empty.recent_snapshot(), RECENT_NAME);
        assert!(nothing.matcher_type.is_none());
        assert!(nothing.on_no_match.is_some());
    }
}
