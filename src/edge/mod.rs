//! Edge mode: auth-service as the control plane of Envoys that enforce JWT,
//! revocation and per-user limits themselves, with no call to auth-service
//! per request (README, "Edge mode").
//!
//! Envoy verifies the JWT (`jwt_authn`, the JWKS from the HTTP port) and
//! copies its `sid`, `sub` and `jti` into request headers; an RBAC filter
//! whose configuration this module serves over ECDS ([`ecds`]) refuses the
//! revoked ones by hash lookups:
//!
//! 1. a token without `sid` or `jti` (none this service issues) — refused;
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
        Matcher, RegexMatcher, StringMatcher,
        matcher::{
            MatcherList, MatcherTree, MatcherType, OnMatch,
            matcher_list::{
                FieldMatcher, Predicate,
                predicate::{MatchType, PredicateList, SinglePredicate, single_predicate},
            },
            matcher_tree::{MatchMap, TreeType},
            on_match,
        },
        regex_matcher::{EngineType, GoogleRe2},
        string_matcher::MatchPattern,
    },
};
use prost::{Message, Name};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::revocation::feed::{FeedError, LoggedRevocation, RevocationFeed};

/// The ECDS resource name of the revocation filter's configuration
/// (`config_discovery` in `envoy/edge.yaml`).
pub const RESOURCE_NAME: &str = "immersiverse.auth.revocations";
/// The request headers `jwt_authn` writes the verified claims into
/// (`claim_to_headers`), named as ext_authz names them for the upstream;
/// the edge strips client-sent ones first.
pub const SID_HEADER: &str = "x-session-id";
pub const SUB_HEADER: &str = "x-user-id";
pub const JTI_HEADER: &str = "x-token-id";
/// Envoy's `jwt_authn` accepts tokens up to this long past `exp` by
/// default (`clock_skew_seconds`); revocations are kept that much longer.
const EDGE_CLOCK_SKEW: Duration = Duration::from_secs(60);
/// Rows arriving within this long of the first are pushed together: a
/// revocation storm becomes a few pushes, not one per row.
pub const COALESCE: Duration = Duration::from_millis(5);

/// The revocations that can still matter: those of the last access-token
/// lifetime (plus Envoy's clock skew), in log order.
#[derive(Debug)]
pub struct DenyList {
    window: Duration,
    rows: VecDeque<Arc<LoggedRevocation>>,
    /// The log's sequence number of the last row applied.
    seq: i64,
}

/// One version of the map as Envoy receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The log's sequence number the map is complete up to.
    pub version: i64,
    /// The `TypedExtensionConfig` resource (name [`RESOURCE_NAME`], an RBAC
    /// filter configuration), encoded once and shared by every stream.
    pub resource: Any,
    pub sessions: usize,
    pub users: usize,
    /// Map entries in all (sessions, users and their jti prefixes).
    pub entries: usize,
}

impl DenyList {
    /// `access_ttl`: the access tokens' lifetime.
    pub fn new(access_ttl: Duration, seq: i64) -> Self {
        Self {
            window: access_ttl + EDGE_CLOCK_SKEW,
            rows: VecDeque::new(),
            seq,
        }
    }

    pub fn seq(&self) -> i64 {
        self.seq
    }

    /// Applies a row of the log (rows at or below the last one are skipped),
    /// then forgets the rows older than the window before the newest row's
    /// time — the newest *row's*, not the clock's, so that a version's
    /// content depends on the log alone.
    pub fn apply(&mut self, row: Arc<LoggedRevocation>) {
        if row.seq <= self.seq {
            return;
        }
        self.seq = row.seq;
        self.rows.push_back(row);
        let newest = self
            .rows
            .iter()
            .map(|r| r.occurred_at)
            .max()
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let horizon = newest - self.window;
        self.rows.retain(|r| r.occurred_at >= horizon);
    }

    /// What the rows revoke: sessions, and users as a whole (the latest
    /// epoch, in milliseconds, of each).
    fn revoked(&self) -> (BTreeSet<Uuid>, BTreeMap<Uuid, i64>) {
        let mut sessions = BTreeSet::new();
        let mut users = BTreeMap::new();
        for row in &self.rows {
            let Some(user_id) = row.user_id else { continue };
            if row.event_type == "token_revoked" {
                if let Some(session) = row
                    .data
                    .get("session_id")
                    .and_then(|s| s.as_str())
                    .and_then(|s| Uuid::parse_str(s).ok())
                {
                    sessions.insert(session);
                }
            } else {
                // As `revocation::feed::apply_log`: every other kind ends all
                // the user's tokens issued before it.
                let epoch_ms =
                    i64::try_from(row.occurred_at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
                let epoch = users.entry(user_id).or_insert(epoch_ms);
                *epoch = (*epoch).max(epoch_ms);
            }
        }
        (sessions, users)
    }

    /// The map as an RBAC filter configuration for Envoy.
    pub fn snapshot(&self) -> Snapshot {
        let (sessions, users) = self.revoked();
        let window_ms = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        let mut entries = sessions.len();
        let users_tree: BTreeMap<String, OnMatch> = users
            .iter()
            .map(|(user, epoch_ms)| {
                let hi = u64::try_from(*epoch_ms).unwrap_or(0).saturating_sub(1);
                let prefixes = jti_prefixes(hi.saturating_sub(window_ms), hi);
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
        let matcher = Matcher {
            matcher_type: Some(MatcherType::MatcherList(MatcherList {
                matchers: vec![FieldMatcher {
                    predicate: Some(Predicate {
                        match_type: Some(MatchType::OrMatcher(PredicateList {
                            predicate: vec![absent(SID_HEADER), absent(JTI_HEADER)],
                        })),
                    }),
                    on_match: Some(deny("no-session")),
                }],
            })),
            on_no_match: Some(Box::new(after_guard)),
        };
        let rbac = Rbac {
            matcher: Some(matcher),
            rules_stat_prefix: "revocation_".to_owned(),
            ..Default::default()
        };
        // The resource is Envoy's own TypedExtensionConfig (the matcher's
        // inputs and actions above are xds.core's).
        let resource = envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig {
            name: RESOURCE_NAME.to_owned(),
            typed_config: Some(any(&rbac)),
        };
        Snapshot {
            version: self.seq,
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

fn deny(name: &str) -> OnMatch {
    action(name, RbacAction::Deny)
}

fn allow() -> OnMatch {
    action("not-revoked", RbacAction::Allow)
}

fn nested(matcher: Matcher) -> OnMatch {
    OnMatch {
        on_match: Some(on_match::OnMatch::Matcher(Box::new(matcher))),
        keep_matching: false,
    }
}

fn header_input(header: &str) -> TypedExtensionConfig {
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

/// Matches a request without `header` (or with it empty).
fn absent(header: &str) -> Predicate {
    let present = Predicate {
        match_type: Some(MatchType::SinglePredicate(SinglePredicate {
            input: Some(header_input(header)),
            matcher: Some(single_predicate::Matcher::ValueMatch(StringMatcher {
                match_pattern: Some(MatchPattern::SafeRegex(RegexMatcher {
                    regex: ".+".to_owned(),
                    engine_type: Some(EngineType::GoogleRe2(GoogleRe2 {})),
                })),
                ignore_case: false,
            })),
        })),
    };
    Predicate {
        match_type: Some(MatchType::NotMatcher(Box::new(present))),
    }
}

/// Hex digits of a UUIDv7's timestamp (48 bits).
const TS_DIGITS: u32 = 12;

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
    current: watch::Sender<Option<Arc<Snapshot>>>,
}

impl ControlPlane {
    pub fn new(access_ttl: Duration) -> Arc<Self> {
        let (current, _) = watch::channel(None);
        Arc::new(Self {
            access_ttl,
            current,
        })
    }

    /// The latest map; `None` until the first is complete (an Envoy asking
    /// before then waits: its listener stays warming, fail closed).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Snapshot>>> {
        self.current.subscribe()
    }

    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.current.borrow().clone()
    }

    fn publish(&self, list: &DenyList) {
        let snapshot = list.snapshot();
        metrics::gauge!("edge_deny_map_version").set(snapshot.version as f64);
        metrics::gauge!("edge_deny_map_entries").set(snapshot.entries as f64);
        metrics::gauge!("edge_deny_map_bytes").set(snapshot.resource.value.len() as f64);
        self.current.send_if_modified(|current| {
            let newer = current
                .as_ref()
                .is_none_or(|c| c.version < snapshot.version);
            if newer {
                *current = Some(Arc::new(snapshot));
            }
            newer
        });
    }

    /// Follows the revocation log until `stop`: replays the last lifetime's
    /// rows, publishes the first map once it has passed the log's head, then
    /// publishes a new version for each batch of rows (coalesced within
    /// [`COALESCE`]). On a read failure it keeps the last map and resumes
    /// from where it was; if the log no longer holds that point, it starts
    /// over from the window.
    pub async fn run(self: Arc<Self>, feed: Arc<RevocationFeed>, stop: CancellationToken) {
        let mut list: Option<DenyList> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            let since = OffsetDateTime::now_utc() - self.access_ttl - EDGE_CLOCK_SKEW;
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
                match row {
                    Some(Ok(row)) => list.apply(row),
                    Some(Err(error)) => break error.to_string(),
                    None => break "the feed closed".to_owned(),
                }
                // Coalesce: whatever arrives within the window joins this
                // version.
                let until = tokio::time::Instant::now() + COALESCE;
                let mut failed = None;
                loop {
                    tokio::select! {
                        () = tokio::time::sleep_until(until) => break,
                        row = rows.recv() => match row {
                            Some(Ok(row)) => list.apply(row),
                            Some(Err(error)) => { failed = Some(error.to_string()); break }
                            None => { failed = Some("the feed closed".to_owned()); break }
                        },
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
            data: match session {
                Some(s) => serde_json::json!({ "session_id": s.to_string() }),
                None => serde_json::json!({}),
            },
        })
    }

    /// The map holds the window before its newest row, whatever the clock
    /// says, and the version is the last row's number: two replicas that
    /// applied the same rows serve the same bytes under the same version.
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
        // (Same content; the encoded bytes may differ in map order.)
        assert_eq!(a.revoked(), b.revoked());
        let (sa, sb) = (a.snapshot(), b.snapshot());
        assert_eq!(
            (sa.version, sa.sessions, sa.users, sa.entries),
            (sb.version, sb.sessions, sb.users, sb.entries)
        );
        assert_eq!(sa.version, 3);
        // Rows 1 and 2 are more than 960 s before row 3: gone.
        assert_eq!((sa.sessions, sa.users), (1, 0));
        let mut c = DenyList::new(ttl, 0);
        c.apply(rows[0].clone());
        c.apply(rows[1].clone());
        let sc = c.snapshot();
        assert_eq!((sc.version, sc.sessions, sc.users), (2, 1, 1));
        assert!(sc.entries > 2, "bob's jti prefixes: {}", sc.entries);
    }

    /// The served configuration decodes as Envoy's RBAC filter with the
    /// guard first and the session map below it.
    #[test]
    fn the_resource_is_an_rbac_filter_named_for_ecds() {
        let mut list = DenyList::new(Duration::from_secs(900), 0);
        let at = OffsetDateTime::now_utc();
        let session = Uuid::now_v7();
        list.apply(row(7, "token_revoked", Uuid::now_v7(), at, Some(session)));
        let snapshot = list.snapshot();
        assert_eq!(
            snapshot.resource.type_url,
            "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
        );
        let resource = envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig::decode(
            snapshot.resource.value.as_slice(),
        )
        .unwrap();
        assert_eq!(resource.name, RESOURCE_NAME);
        let config = resource.typed_config.unwrap();
        assert_eq!(
            config.type_url,
            "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
        );
        let rbac = Rbac::decode(config.value.as_slice()).unwrap();
        let matcher = rbac.matcher.unwrap();
        let Some(MatcherType::MatcherList(guard)) = matcher.matcher_type else {
            panic!("guard first")
        };
        assert_eq!(guard.matchers.len(), 1);
        let Some(on_match::OnMatch::Matcher(sessions)) = matcher.on_no_match.unwrap().on_match
        else {
            panic!("the session map next")
        };
        let Some(MatcherType::MatcherTree(tree)) = sessions.matcher_type else {
            panic!("a tree")
        };
        let Some(TreeType::ExactMatchMap(map)) = tree.tree_type else {
            panic!("exact")
        };
        assert!(map.map.contains_key(&session.to_string()));
    }
}
