//! Revocation: of one access token (its `jti`, until it expires), of one
//! session (its `sid`: logout, refresh-token reuse) and of every session of a
//! user (a per-user "sessions valid after" epoch: suspend, revoke-all,
//! password or role change).
//!
//! The shared truth lives in a [`RevocationStore`] (Redis in production, in
//! process for the embedded default). [`Revocations`] puts a moka cache in
//! front: a revocation is cached until the token it concerns would expire
//! anyway (revocations are never undone), an "is not revoked" answer for
//! `revocation.cache_ttl_ms` only. Revocations made through this replica
//! update its cache at once.
//!
//! A lookup's answer may be older than a revocation that reaches the cache
//! while the lookup is in flight (a slow store). Every cache write is a
//! per-key compute that never turns "revoked" back into "not revoked" nor
//! moves an epoch back, and a lookup that started before the cache's
//! generation last moved (a revocation applied, negative answers forgotten)
//! caches nothing: its answer serves its own call only.

pub mod config;
pub mod feed;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use moka::{Expiry, ops::compute::Op, sync::Cache};
use uuid::Uuid;

use crate::{error::BackendError, unix_now};
use feed::Revoked;

/// The keys one access token is checked under.
#[derive(Debug, Clone, Copy)]
pub struct RevocationKeys {
    pub jti: Uuid,
    pub session_id: Uuid,
    pub user_id: Uuid,
}

/// What the store knows about those keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RevocationSnapshot {
    pub token_revoked: bool,
    pub session_revoked: bool,
    /// Tokens of this user issued before this instant (unix ms) are revoked.
    pub user_epoch_ms: Option<i64>,
}

/// The shared revocation state. `until` arguments are unix seconds after
/// which the entry is useless (every token it could concern has expired), so
/// stores can drop it.
#[async_trait]
pub trait RevocationStore: Send + Sync + 'static {
    /// `user_id` owns the token: stores keep one user's entries together
    /// (one Redis Cluster slot), so [`lookup`](Self::lookup) is one read.
    async fn revoke_token(&self, user_id: Uuid, jti: Uuid, until: i64) -> Result<(), BackendError>;
    async fn revoke_session(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        until: i64,
    ) -> Result<(), BackendError>;
    /// Moves the epoch forward to `epoch_ms`; never moves it back.
    async fn raise_user_epoch(
        &self,
        user_id: Uuid,
        epoch_ms: i64,
        until: i64,
    ) -> Result<(), BackendError>;
    /// All three answers in one round trip.
    async fn lookup(&self, keys: &RevocationKeys) -> Result<RevocationSnapshot, BackendError>;
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Token(Uuid),
    Session(Uuid),
    User(Uuid),
}

#[derive(Debug, Clone, Copy)]
enum Known {
    Revoked,
    NotRevoked,
    Epoch(Option<i64>),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    known: Known,
    until: Instant,
}

struct EntryExpiry;

impl Expiry<Key, Entry> for EntryExpiry {
    fn expire_after_create(&self, _: &Key, entry: &Entry, now: Instant) -> Option<Duration> {
        Some(entry.until.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &Key,
        entry: &Entry,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.until.saturating_duration_since(now))
    }
}

/// The token being checked, as revocation sees it.
#[derive(Debug, Clone, Copy)]
pub struct TokenFacts {
    pub keys: RevocationKeys,
    /// Unix ms the token was issued at.
    pub issued_at_ms: i64,
    /// Unix seconds the token expires at.
    pub expires_at: i64,
}

/// Cached revocation checks in front of a [`RevocationStore`].
#[derive(Clone)]
pub struct Revocations {
    store: Arc<dyn RevocationStore>,
    cache: Cache<Key, Entry>,
    negative_ttl: Duration,
    /// How long user epochs must be kept: the longest an access token lives.
    access_ttl_secs: i64,
    /// Moved before every revocation this cache learns (and before negative
    /// answers are forgotten): a lookup that began under an older value may
    /// predate that revocation, so its answer is not cached.
    generation: Arc<AtomicU64>,
    /// User-wide revocations committed in the database that this process
    /// knows of (made here, or read from the revocation log), kept until
    /// every token they concern has expired — whatever the lookup cache
    /// forgets and whatever a store that lost its state answers. Only
    /// `Key::User` entries holding `Known::Epoch(Some(_))`.
    floors: Cache<Key, Entry>,
    /// Revocations committed in the database whose store write is still to
    /// be made: written by a background task, retried until written or
    /// moot. At most [`Self::owed_bound`] of them (see [`Self::owe`]).
    unwritten: Arc<std::sync::Mutex<Unwritten>>,
    /// The bound on owed writes: the lookup cache's capacity.
    owed_bound: usize,
    /// Owed writes dropped at the bound, ever; and how many of them a
    /// completed replay of the log has written again (the drops before it
    /// began). While `dropped > rewritten` the store lacks revocations that
    /// were committed, so lookups that need it fail closed.
    dropped: Arc<AtomicU64>,
    rewritten: Arc<AtomicU64>,
    /// The drops a replay has been asked for already.
    replay_asked: Arc<AtomicU64>,
    /// Told when the store answers again after losing the connection (it
    /// may have come back without its state): the recent revocations are
    /// then written to it again (startup, `revocation_log_reapply`).
    store_back: Arc<tokio::sync::Notify>,
}

/// Store writes owed (one per session or user: a later one for the same
/// key is merged into it), and whether a task is writing them.
#[derive(Default)]
struct Unwritten {
    writes: std::collections::HashMap<Key, Owed>,
    writing: bool,
    /// Writes owed so far, ever; and how many of the first of them are
    /// known written (the count when a pass that then wrote every write it
    /// took began).
    added: u64,
    written: u64,
    /// The keys of the writes the writer has taken and not yet made (out
    /// of `writes` meanwhile; those it could not make go back in).
    in_flight: std::collections::HashSet<Key>,
}

impl Unwritten {
    fn add(&mut self, write: Owed) {
        use std::collections::hash_map::Entry as Slot;
        self.added += 1;
        match self.writes.entry(write.key()) {
            Slot::Vacant(slot) => {
                slot.insert(write);
            }
            Slot::Occupied(mut slot) => {
                let merged = slot.get().merged(write);
                slot.insert(merged);
            }
        }
        self.gauge();
    }

    /// Distinct keys owed: the bound's measure.
    fn len(&self) -> usize {
        self.writes.len() + self.in_flight.len()
    }

    /// Whether owing `key` takes a slot no key holds yet.
    fn is_new(&self, key: &Key) -> bool {
        !self.writes.contains_key(key) && !self.in_flight.contains(key)
    }

    fn gauge(&self) {
        metrics::gauge!("revocation_store_writes_owed").set(self.len() as f64);
    }
}

/// A revocation decided (committed in the database) whose store write is
/// owed. Ids only: nothing secret.
#[derive(Debug, Clone, Copy)]
enum Owed {
    Session {
        user_id: Uuid,
        session_id: Uuid,
        until: i64,
    },
    UserEpoch {
        user_id: Uuid,
        epoch_ms: i64,
        until: i64,
    },
}

impl Owed {
    /// When the write becomes moot: every token it concerns has expired.
    fn until(&self) -> i64 {
        match *self {
            Self::Session { until, .. } | Self::UserEpoch { until, .. } => until,
        }
    }

    fn key(&self) -> Key {
        match *self {
            Self::Session { session_id, .. } => Key::Session(session_id),
            Self::UserEpoch { user_id, .. } => Key::User(user_id),
        }
    }

    /// One write doing what both do (same key): the later expiry, the
    /// later epoch.
    fn merged(self, other: Owed) -> Owed {
        match (self, other) {
            (
                Self::UserEpoch {
                    user_id,
                    epoch_ms,
                    until,
                },
                Self::UserEpoch {
                    epoch_ms: other_epoch,
                    until: other_until,
                    ..
                },
            ) => Self::UserEpoch {
                user_id,
                epoch_ms: epoch_ms.max(other_epoch),
                until: until.max(other_until),
            },
            (
                Self::Session {
                    user_id,
                    session_id,
                    until,
                },
                other,
            ) => Self::Session {
                user_id,
                session_id,
                until: until.max(other.until()),
            },
            (this @ Self::UserEpoch { .. }, _) => this,
        }
    }
}

/// Longest pause between two attempts at the owed writes.
const UNWRITTEN_RETRY_MAX: Duration = Duration::from_secs(5);

/// How often a replay looks whether the owed writes left it room, or are
/// written.
const OWED_POLL: Duration = Duration::from_millis(20);

impl Revocations {
    pub fn new(
        store: Arc<dyn RevocationStore>,
        capacity: u64,
        negative_ttl: Duration,
        access_ttl_secs: u64,
    ) -> Self {
        Self {
            store,
            cache: Cache::builder()
                .max_capacity(capacity)
                .expire_after(EntryExpiry)
                // For `forget_negative_answers` (without it moka refuses
                // the predicate and nothing is forgotten).
                .support_invalidation_closures()
                .build(),
            negative_ttl,
            access_ttl_secs: i64::try_from(access_ttl_secs).unwrap_or(i64::MAX / 4),
            generation: Arc::new(AtomicU64::new(0)),
            floors: Cache::builder()
                .max_capacity(capacity)
                .expire_after(EntryExpiry)
                .build(),
            unwritten: Arc::default(),
            owed_bound: usize::try_from(capacity).unwrap_or(usize::MAX).max(1),
            dropped: Arc::default(),
            rewritten: Arc::default(),
            replay_asked: Arc::default(),
            store_back: Arc::default(),
        }
    }

    /// The owed writes, locked. A panic while they were held cannot have
    /// left them torn (every change is one map or counter step), so a
    /// poisoned lock is taken as it is.
    fn owed(&self) -> std::sync::MutexGuard<'_, Unwritten> {
        self.unwritten.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether owed writes were dropped at their bound and not yet written
    /// again by a replay of the log: the store lacks committed revocations.
    fn store_lacks_writes(&self) -> bool {
        self.dropped.load(Ordering::SeqCst) > self.rewritten.load(Ordering::SeqCst)
    }

    /// Called as a replay of the log begins: the drops it will make good.
    pub fn replay_begins(&self) -> u64 {
        self.dropped.load(Ordering::SeqCst)
    }

    /// Called when a replay that began at `drops` ([`Self::replay_begins`])
    /// has read the log to its end: waits until what it owed is written
    /// (while the store fails: until it answers), then counts those drops
    /// as made good.
    pub async fn replay_written(&self, drops: u64) {
        let owed_now = self.owed().added;
        loop {
            {
                let owed = self.owed();
                if owed.written >= owed_now || (owed.writes.is_empty() && !owed.writing) {
                    break;
                }
            }
            tokio::time::sleep(OWED_POLL).await;
        }
        let before = self.rewritten.fetch_max(drops, Ordering::SeqCst);
        if before < drops && !self.store_lacks_writes() {
            tracing::info!("the revocations dropped while the store fell behind are written again");
        }
    }

    /// The store answers again after its connection was lost (a Redis
    /// restart drops every connection): it may have come back without its
    /// state.
    pub fn store_reconnected(&self) {
        self.store_back.notify_one();
    }

    /// This process missed rows of the revocation log (its live feed
    /// lagged): they are replayed as after a reconnection.
    pub fn log_rows_missed(&self) {
        self.store_back.notify_one();
    }

    /// Resolves at the next [`Self::store_reconnected`] or
    /// [`Self::log_rows_missed`], or a request for a replay after dropped
    /// writes (or at once if one happened since the last wait).
    pub async fn store_reconnection(&self) {
        self.store_back.notified().await;
    }

    /// Records a revocation this cache learns (made here or announced):
    /// moves the generation first, so a lookup in flight cannot cache an
    /// answer older than it.
    fn remember_revocation(&self, key: Key, known: Known, until_unix: i64) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.remember(key, known, until_unix, None);
    }

    /// Writes what is known of `key`, serialised per key with every other
    /// write of it: "revoked" is never replaced by "not revoked", an epoch
    /// never moves back. `lookup_generation`: the generation a store lookup
    /// began under; its answer is dropped when the generation has moved.
    fn remember(&self, key: Key, known: Known, until_unix: i64, lookup_generation: Option<u64>) {
        let left = Duration::from_secs(u64::try_from(until_unix - unix_now()).unwrap_or(0));
        let ttl = match known {
            Known::Revoked => left,
            Known::NotRevoked | Known::Epoch(_) => self.negative_ttl.min(left),
        };
        if ttl.is_zero() {
            return;
        }
        let until = Instant::now() + ttl;
        self.cache.entry(key).and_compute_with(|existing| {
            if lookup_generation.is_some_and(|g| g != self.generation.load(Ordering::SeqCst)) {
                return Op::Nop;
            }
            let existing = existing.map(|e| e.into_value());
            let known = match (existing.map(|e| e.known), known) {
                (Some(Known::Revoked), Known::Revoked) => {
                    let kept = existing.map_or(until, |e| e.until);
                    return Op::Put(Entry {
                        known,
                        until: kept.max(until),
                    });
                }
                (Some(Known::Revoked), _) => return Op::Nop,
                (Some(Known::Epoch(Some(had))), Known::Epoch(new)) => {
                    Known::Epoch(Some(new.map_or(had, |new| new.max(had))))
                }
                (_, known) => known,
            };
            Op::Put(Entry { known, until })
        });
    }

    /// Whether the token has been revoked by any of the three means.
    pub async fn is_revoked(&self, token: &TokenFacts) -> Result<bool, BackendError> {
        let keys = token.keys;
        // A user-wide revocation this process knows was committed: no
        // store round trip, and no store that lost it, can undo it.
        if let Some(Entry {
            known: Known::Epoch(Some(floor)),
            ..
        }) = self.floors.get(&Key::User(keys.user_id))
            && token.issued_at_ms <= floor
        {
            return Ok(true);
        }
        let jti_key = Key::Token(keys.jti);
        let cached = |key: &Key| self.cache.get(key).map(|e| e.known);
        let (jti, sid, user) = (
            cached(&jti_key),
            cached(&Key::Session(keys.session_id)),
            cached(&Key::User(keys.user_id)),
        );
        if jti.is_some() && sid.is_some() && user.is_some() {
            crate::held_counter!("revocation_cache_lookups_total", "result" => "hit").increment(1);
        } else {
            crate::held_counter!("revocation_cache_lookups_total", "result" => "miss").increment(1);
        }
        if matches!(jti, Some(Known::Revoked)) || matches!(sid, Some(Known::Revoked)) {
            return Ok(true);
        }
        // A known epoch past the token's issue time revokes it whatever the
        // other keys say: no store round trip (nor a store failure) needed.
        if let Some(Known::Epoch(Some(epoch))) = user
            && token.issued_at_ms <= epoch
        {
            return Ok(true);
        }
        let epoch = match (jti, sid, user) {
            (Some(_), Some(_), Some(Known::Epoch(epoch))) => epoch,
            // The store lacks revocations that were committed (owed writes
            // dropped at their bound, not yet written again from the log):
            // its "not revoked" cannot be believed.
            _ if self.store_lacks_writes() => {
                metrics::counter!("revocation_lookups_refused_total").increment(1);
                return Err(BackendError::unavailable(
                    "revocation store",
                    "owed revocation writes were dropped; catching up from the revocation log",
                ));
            }
            _ => {
                let generation = Some(self.generation.load(Ordering::SeqCst));
                let snapshot = self.store.lookup(&keys).await?;
                let flag = |revoked| {
                    if revoked {
                        Known::Revoked
                    } else {
                        Known::NotRevoked
                    }
                };
                self.remember(
                    jti_key,
                    flag(snapshot.token_revoked),
                    token.expires_at,
                    generation,
                );
                self.remember(
                    Key::Session(keys.session_id),
                    flag(snapshot.session_revoked),
                    token.expires_at,
                    generation,
                );
                self.remember(
                    Key::User(keys.user_id),
                    Known::Epoch(snapshot.user_epoch_ms),
                    token.expires_at,
                    generation,
                );
                if snapshot.token_revoked || snapshot.session_revoked {
                    return Ok(true);
                }
                snapshot.user_epoch_ms
            }
        };
        // Inclusive: a token of the epoch's own millisecond may have been
        // decided on the state the change replaced (that resolution cannot
        // tell it from one issued just after); it is refused, fail closed.
        Ok(epoch.is_some_and(|epoch| token.issued_at_ms <= epoch))
    }

    /// Revokes one access token of `user_id` until it expires.
    pub async fn revoke_token(
        &self,
        user_id: Uuid,
        jti: Uuid,
        expires_at: i64,
    ) -> Result<(), BackendError> {
        self.store.revoke_token(user_id, jti, expires_at).await?;
        self.apply(&Notice::Token {
            jti,
            until: expires_at,
        });
        Ok(())
    }

    /// Revokes every access token of one session of `user_id`.
    pub async fn revoke_session(
        &self,
        user_id: Uuid,
        session_id: Uuid,
    ) -> Result<(), BackendError> {
        let until = unix_now() + self.access_ttl_secs + 60;
        self.store
            .revoke_session(user_id, session_id, until)
            .await?;
        self.apply(&Notice::Session { session_id, until });
        Ok(())
    }

    /// Revokes every access token of a session whose end is already
    /// committed in the database (a logout, a refresh-token reuse, a row of
    /// the revocation log): the caller cannot undo that, so this never
    /// fails. This replica denies the session's tokens at once; when the
    /// store cannot be written, the write is retried in the background until
    /// it succeeds or every token it concerns has expired, and the other
    /// replicas learn it then (or from the log, see
    /// [`feed::apply_log`]). A process that dies before then loses its
    /// retry; every other process applying the log owes the same write.
    pub async fn revoke_session_or_retry(&self, user_id: Uuid, session_id: Uuid) {
        let until = unix_now() + self.access_ttl_secs + 60;
        self.write_or_owe(Owed::Session {
            user_id,
            session_id,
            until,
        })
        .await;
    }

    /// Revokes every access token of the user issued before `epoch_ms`,
    /// after the change that calls for it has committed in the database:
    /// as [`Self::revoke_session_or_retry`], never fails.
    pub async fn revoke_user_at_or_retry(&self, user_id: Uuid, epoch_ms: i64) {
        let until = unix_now() + self.access_ttl_secs + 60;
        self.write_or_owe(Owed::UserEpoch {
            user_id,
            epoch_ms,
            until,
        })
        .await;
    }

    /// Learns a revocation that a row of the database's revocation log
    /// carries (committed by any process): denied here at once, and written
    /// to the store by the background writer — idempotent, since its writer
    /// wrote it too unless it died first — so a slow store never holds up
    /// the next row.
    pub fn learn_logged(&self, revoked: Revoked, at_ms: i64) {
        if let Some(owed) = self.remember_logged(revoked, at_ms) {
            self.owe(owed);
        }
    }

    /// Denies here at once what a row of the log revokes; returns the
    /// store write it calls for.
    fn remember_logged(&self, revoked: Revoked, at_ms: i64) -> Option<Owed> {
        let until = unix_now() + self.access_ttl_secs + 60;
        let owed = match revoked {
            Revoked::Session {
                user_id,
                session_id,
            } => Owed::Session {
                user_id,
                session_id,
                until,
            },
            Revoked::User { user_id } => Owed::UserEpoch {
                user_id,
                epoch_ms: at_ms,
                until,
            },
            Revoked::Nothing => return None,
        };
        self.remember_owed(owed);
        Some(owed)
    }

    /// A replay's first pass over a row: denied here at once, nothing owed
    /// yet ([`Self::owe_logged_paced`] is its second pass).
    pub fn learn_logged_only_here(&self, revoked: Revoked, at_ms: i64) {
        let _ = self.remember_logged(revoked, at_ms);
    }

    /// A replay's second pass over a row: denies it here (again: the
    /// cache may have let it go since the first pass) and owes its store
    /// write, but while half the bound is owed already, first waits for the
    /// writer to make room (checked and owed under one lock), so a replay
    /// never drops a write and leaves the other half to the revocations
    /// being made meanwhile.
    pub async fn owe_logged_paced(&self, revoked: Revoked, at_ms: i64) {
        let Some(write) = self.remember_logged(revoked, at_ms) else {
            return;
        };
        loop {
            {
                let mut owed = self.owed();
                if owed.len() < self.owed_bound.div_ceil(2) || !owed.is_new(&write.key()) {
                    self.owe_locked(&mut owed, write);
                    return;
                }
            }
            tokio::time::sleep(OWED_POLL).await;
        }
    }

    /// Remembers `owed` here, then writes it to the store or owes it.
    async fn write_or_owe(&self, owed: Owed) {
        self.remember_owed(owed);
        match self.write(&owed).await {
            // The store takes writes: what was dropped can be written again.
            Ok(()) => self.ask_replay_for_drops(),
            Err(error) => {
                metrics::counter!("revocation_store_write_failures_total").increment(1);
                tracing::warn!(%error, ?owed, "revocation not written to the store; retrying in the background");
                self.owe(owed);
            }
        }
    }

    fn remember_owed(&self, owed: Owed) {
        match owed {
            Owed::Session {
                session_id, until, ..
            } => self.remember_revocation(Key::Session(session_id), Known::Revoked, until),
            Owed::UserEpoch {
                user_id,
                epoch_ms,
                until,
            } => {
                self.raise_floor(user_id, epoch_ms, until);
                self.remember_revocation(Key::User(user_id), Known::Epoch(Some(epoch_ms)), until)
            }
        }
    }

    /// Records a committed user-wide revocation in [`Self::floors`]: the
    /// later epoch and the later expiry win.
    fn raise_floor(&self, user_id: Uuid, epoch_ms: i64, until_unix: i64) {
        let left = Duration::from_secs(u64::try_from(until_unix - unix_now()).unwrap_or(0));
        if left.is_zero() {
            return;
        }
        let until = Instant::now() + left;
        self.floors
            .entry(Key::User(user_id))
            .and_compute_with(|existing| {
                let (epoch, until) = match existing.map(|e| e.into_value()) {
                    Some(Entry {
                        known: Known::Epoch(Some(had)),
                        until: had_until,
                    }) => (had.max(epoch_ms), had_until.max(until)),
                    _ => (epoch_ms, until),
                };
                Op::Put(Entry {
                    known: Known::Epoch(Some(epoch)),
                    until,
                })
            });
    }

    async fn write(&self, owed: &Owed) -> Result<(), BackendError> {
        match *owed {
            Owed::Session {
                user_id,
                session_id,
                until,
            } => self.store.revoke_session(user_id, session_id, until).await,
            Owed::UserEpoch {
                user_id,
                epoch_ms,
                until,
            } => self.store.raise_user_epoch(user_id, epoch_ms, until).await,
        }
    }

    /// Owes `write` to the store. At most [`Self::owed_bound`] writes are
    /// owed (one per session or user); past that a new session's is dropped
    /// instead (a user's never is, see below), and counted: the revocation
    /// is still denied here (it was remembered first) and is in the
    /// database's revocation log, from which a replay writes it again once
    /// the store takes writes ([`Self::write_owed`] asks for one). Until
    /// then lookups that need the store fail closed.
    fn owe(&self, write: Owed) {
        let mut owed = self.owed();
        // A user-wide epoch is never dropped: the epoch written after a
        // security change commits is later than the log's row for it (it
        // also covers a login that read the account before the change and
        // signed after the row), so a replay of the log could not write it
        // again. One per user, merged: past the bound only by the users
        // revoked while the store refused writes.
        let user_wide = matches!(write, Owed::UserEpoch { .. });
        if !user_wide && owed.len() >= self.owed_bound && owed.is_new(&write.key()) {
            let uncovered = self
                .dropped
                .fetch_add(1, Ordering::SeqCst)
                .saturating_sub(self.rewritten.load(Ordering::SeqCst));
            metrics::counter!("revocation_store_writes_dropped_total").increment(1);
            if uncovered == 0 {
                tracing::error!(
                    owed = owed.len(),
                    "owed revocation writes at their bound: dropping new ones until the store \
                     takes writes again, then writing the revocation log to it again; lookups \
                     that need the store fail closed meanwhile"
                );
            }
            return;
        }
        self.owe_locked(&mut owed, write);
    }

    /// Owes `write` (the bound already decided), starting the writer if
    /// it is not running.
    fn owe_locked(&self, owed: &mut Unwritten, write: Owed) {
        owed.add(write);
        if !owed.writing {
            owed.writing = true;
            tokio::spawn(self.clone().write_owed());
        }
    }

    /// Writes the owed writes until none is left: at once, then, while the
    /// store fails, again after a growing pause. A pass stops at the first
    /// failure (the store is down: the rest would only wait their turn for
    /// the same answer). A write whose tokens have all expired is dropped
    /// (`revocation_store_writes_moot_total`).
    async fn write_owed(self) {
        let mut pause = Duration::from_millis(100);
        let mut failing = false;
        loop {
            // While the store fails, one write tells whether it is back
            // before the whole backlog is taken out and put back under the
            // lock that request paths take to owe.
            if failing {
                let probe = {
                    let mut owed = self.owed();
                    let key = owed.writes.keys().next().cloned();
                    let probe = key.and_then(|key| owed.writes.remove(&key));
                    if let Some(write) = &probe {
                        owed.in_flight.insert(write.key());
                    }
                    probe
                };
                if let Some(write) = probe {
                    let written = write.until() <= unix_now() || self.write(&write).await.is_ok();
                    {
                        let mut owed = self.owed();
                        owed.in_flight.remove(&write.key());
                        if written {
                            owed.gauge();
                        } else {
                            owed.add(write);
                        }
                    }
                    if !written {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(UNWRITTEN_RETRY_MAX);
                        continue;
                    }
                }
            }
            let (batch, taken_at): (Vec<Owed>, u64) = {
                let mut owed = self.owed();
                let taken_at = owed.added;
                let batch: Vec<Owed> = owed.writes.drain().map(|(_, write)| write).collect();
                owed.in_flight = batch.iter().map(Owed::key).collect();
                (batch, taken_at)
            };
            let mut batch = batch.into_iter();
            let mut failed = None;
            let mut written = 0u64;
            for write in batch.by_ref() {
                if write.until() <= unix_now() {
                    metrics::counter!("revocation_store_writes_moot_total").increment(1);
                } else {
                    match self.write(&write).await {
                        Ok(()) => written += 1,
                        Err(error) => {
                            failed = Some((write, error));
                            break;
                        }
                    }
                    // The store takes writes: what was dropped can be
                    // written again.
                    self.ask_replay_for_drops();
                }
                let mut owed = self.owed();
                owed.in_flight.remove(&write.key());
                owed.gauge();
            }
            if failing && written > 0 {
                tracing::info!(written, "owed revocations written to the store");
            }
            let retry = {
                let mut owed = self.owed();
                owed.in_flight.clear();
                if failed.is_none() {
                    owed.written = owed.written.max(taken_at);
                    // Also when every write was moot: nothing stands in the
                    // way of the replay.
                    self.ask_replay_for_drops();
                }
                let retry = if let Some((write, error)) = failed {
                    for write in std::iter::once(write).chain(batch) {
                        owed.add(write);
                    }
                    if !failing {
                        metrics::counter!("revocation_store_write_failures_total").increment(1);
                        tracing::error!(%error, owed = owed.len(), "revocations not written to the store; retrying");
                    }
                    failing = true;
                    true
                } else {
                    failing = false;
                    false
                };
                owed.gauge();
                if owed.writes.is_empty() {
                    owed.writing = false;
                    return;
                }
                retry
            };
            if retry {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(UNWRITTEN_RETRY_MAX);
            } else {
                pause = Duration::from_millis(100);
            }
        }
    }

    /// The store took a write: if owed writes were dropped since a replay
    /// was last asked for, asks for one (what runs replays after a
    /// reconnection runs it: [`Self::store_reconnection`]).
    fn ask_replay_for_drops(&self) {
        let dropped = self.dropped.load(Ordering::SeqCst);
        if dropped > self.rewritten.load(Ordering::SeqCst)
            && self.replay_asked.fetch_max(dropped, Ordering::SeqCst) < dropped
        {
            tracing::warn!("the store takes writes again: replaying the revocation log to it");
            self.store_back.notify_one();
        }
    }

    /// Revokes every access token of the user issued before now.
    pub async fn revoke_user(&self, user_id: Uuid) -> Result<(), BackendError> {
        self.revoke_user_at(user_id, unix_now_ms()).await
    }

    /// Revokes every access token of the user issued before `epoch_ms`
    /// (never moves the user's epoch back).
    pub async fn revoke_user_at(&self, user_id: Uuid, epoch_ms: i64) -> Result<(), BackendError> {
        let until = unix_now() + self.access_ttl_secs + 60;
        self.store
            .raise_user_epoch(user_id, epoch_ms, until)
            .await?;
        // Our own view may only move forward too (`remember` keeps the
        // larger epoch).
        self.remember_revocation(Key::User(user_id), Known::Epoch(Some(epoch_ms)), until);
        Ok(())
    }
}

pub fn unix_now_ms() -> i64 {
    i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
        .unwrap_or(i64::MAX)
}

/// A revocation as broadcast to every replica (Redis pub/sub), so each
/// replica's cache learns it at once instead of after its TTL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Token {
        jti: Uuid,
        until: i64,
    },
    Session {
        session_id: Uuid,
        until: i64,
    },
    User {
        user_id: Uuid,
        epoch_ms: i64,
        until: i64,
    },
}

impl Notice {
    pub fn encode(&self) -> String {
        match self {
            Self::Token { jti, until } => format!("jti {jti} {until}"),
            Self::Session { session_id, until } => format!("sid {session_id} {until}"),
            Self::User {
                user_id,
                epoch_ms,
                until,
            } => format!("user {user_id} {epoch_ms} {until}"),
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(' ');
        let notice = match (parts.next()?, parts.next()?) {
            ("jti", jti) => Self::Token {
                jti: jti.parse().ok()?,
                until: parts.next()?.parse().ok()?,
            },
            ("sid", sid) => Self::Session {
                session_id: sid.parse().ok()?,
                until: parts.next()?.parse().ok()?,
            },
            ("user", user) => Self::User {
                user_id: user.parse().ok()?,
                epoch_ms: parts.next()?.parse().ok()?,
                until: parts.next()?.parse().ok()?,
            },
            _ => return None,
        };
        parts.next().is_none().then_some(notice)
    }
}

impl Revocations {
    /// Applies a revocation made on another replica to this one's cache.
    pub fn apply(&self, notice: &Notice) {
        match notice {
            Notice::Token { jti, until } => {
                self.remember_revocation(Key::Token(*jti), Known::Revoked, *until)
            }
            Notice::Session { session_id, until } => {
                self.remember_revocation(Key::Session(*session_id), Known::Revoked, *until)
            }
            Notice::User {
                user_id,
                epoch_ms,
                until,
            } => {
                self.remember_revocation(Key::User(*user_id), Known::Epoch(Some(*epoch_ms)), *until)
            }
        }
        metrics::counter!("revocation_notices_applied_total").increment(1);
    }

    /// Forgets every cached "not revoked" answer (after a gap in the notice
    /// stream, when notices may have been missed).
    pub fn forget_negative_answers(&self) {
        // A lookup in flight may have missed the same notices.
        self.generation.fetch_add(1, Ordering::SeqCst);
        // Revoked entries stay: revocations are never undone.
        if let Err(error) = self
            .cache
            .invalidate_entries_if(|_, entry| !matches!(entry.known, Known::Revoked))
        {
            // Not reachable with the cache built in `new`; if it were,
            // dropping everything is the safe side.
            tracing::warn!(%error, "forgetting every cached revocation answer");
            self.cache.invalidate_all();
        }
        self.cache.run_pending_tasks();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store that is down: every call fails.
    struct Down;

    #[async_trait]
    impl RevocationStore for Down {
        async fn revoke_token(&self, _: Uuid, _: Uuid, _: i64) -> Result<(), BackendError> {
            Err(down())
        }
        async fn revoke_session(&self, _: Uuid, _: Uuid, _: i64) -> Result<(), BackendError> {
            Err(down())
        }
        async fn raise_user_epoch(&self, _: Uuid, _: i64, _: i64) -> Result<(), BackendError> {
            Err(down())
        }
        async fn lookup(&self, _: &RevocationKeys) -> Result<RevocationSnapshot, BackendError> {
            Err(down())
        }
    }

    fn down() -> BackendError {
        BackendError::Unavailable {
            backend: "redis",
            source: "down".into(),
        }
    }

    fn token(user_id: Uuid, issued_at_ms: i64) -> TokenFacts {
        TokenFacts {
            keys: RevocationKeys {
                jti: Uuid::now_v7(),
                session_id: Uuid::now_v7(),
                user_id,
            },
            issued_at_ms,
            expires_at: unix_now() + 600,
        }
    }

    /// Failure class: backend down. A revocation committed elsewhere (the
    /// database) while the store is down is denied here at once and owed
    /// to the store: a user-wide one refuses the user's earlier tokens
    /// without asking the store (which would fail), a later token is asked
    /// about as usual (and fails closed).
    #[tokio::test]
    async fn a_committed_revocation_is_denied_here_while_the_store_is_down() {
        let revocations = Revocations::new(Arc::new(Down), 100, Duration::from_secs(60), 900);
        let (user, session) = (Uuid::now_v7(), Uuid::now_v7());
        let now = unix_now_ms();
        revocations.revoke_user_at_or_retry(user, now).await;
        assert!(revocations.is_revoked(&token(user, now - 1)).await.unwrap());
        // The epoch's own millisecond: it may have been decided on the
        // state the change replaced (inclusive, fail closed).
        assert!(revocations.is_revoked(&token(user, now)).await.unwrap());
        assert!(revocations.is_revoked(&token(user, now + 1)).await.is_err());

        revocations.revoke_session_or_retry(user, session).await;
        let mut of_session = token(Uuid::now_v7(), now);
        of_session.keys.session_id = session;
        assert!(revocations.is_revoked(&of_session).await.unwrap());

        let owed = revocations.unwritten.lock().unwrap().writes.len();
        assert_eq!(owed, 2, "both writes are owed to the store");

        // The lookup cache forgets; the committed epoch stays.
        revocations.forget_negative_answers();
        revocations.cache.invalidate_all();
        assert!(revocations.is_revoked(&token(user, now - 1)).await.unwrap());
    }

    /// A store that is down or up at the test's word, and keeps the
    /// sessions written to it.
    #[derive(Default)]
    struct Switched {
        up: std::sync::atomic::AtomicBool,
        sessions: std::sync::Mutex<std::collections::HashSet<Uuid>>,
    }

    #[async_trait]
    impl RevocationStore for Switched {
        async fn revoke_token(&self, _: Uuid, _: Uuid, _: i64) -> Result<(), BackendError> {
            unreachable!("not used here")
        }
        async fn revoke_session(&self, _: Uuid, session: Uuid, _: i64) -> Result<(), BackendError> {
            if !self.up.load(Ordering::SeqCst) {
                return Err(down());
            }
            self.sessions.lock().unwrap().insert(session);
            Ok(())
        }
        async fn raise_user_epoch(&self, _: Uuid, _: i64, _: i64) -> Result<(), BackendError> {
            unreachable!("not used here")
        }
        async fn lookup(&self, keys: &RevocationKeys) -> Result<RevocationSnapshot, BackendError> {
            if !self.up.load(Ordering::SeqCst) {
                return Err(down());
            }
            Ok(RevocationSnapshot {
                token_revoked: false,
                session_revoked: self.sessions.lock().unwrap().contains(&keys.session_id),
                user_epoch_ms: None,
            })
        }
    }

    /// Each session's answer (its token made by `of`), with the lookup
    /// cache emptied first so that none comes from memory.
    async fn answers_from_the_store(
        revocations: &Revocations,
        of: &impl Fn(Uuid) -> TokenFacts,
        sessions: &[Uuid],
    ) -> Vec<Result<bool, BackendError>> {
        revocations.cache.invalidate_all();
        let mut answers = Vec::new();
        for session in sessions {
            answers.push(revocations.is_revoked(&of(*session)).await);
        }
        answers
    }

    /// A replay as `RevocationFeed::replay_recent` runs it, over `sessions`
    /// of `user` as rows of the log: each owed again, then waited for.
    async fn replay(revocations: &Revocations, user: Uuid, sessions: &[Uuid], drops: u64) {
        for session in sessions {
            revocations
                .owe_logged_paced(
                    Revoked::Session {
                        user_id: user,
                        session_id: *session,
                    },
                    unix_now_ms(),
                )
                .await;
        }
        tokio::time::timeout(Duration::from_secs(30), revocations.replay_written(drops))
            .await
            .expect("the replay's writes are written");
    }

    /// Failure class: a backend that is down for long, and comes back. The
    /// writes owed to it are bounded (by the cache's capacity, 4 here):
    /// past the bound a revocation is still denied here but its write is
    /// dropped, and from then on no lookup that needs the store is believed
    /// (fail closed), even once the store answers again, until a replay of
    /// the revocation log — asked for as soon as the store takes writes —
    /// has written the dropped revocations to it.
    #[tokio::test]
    async fn owed_writes_past_their_bound_are_dropped_and_the_store_is_not_believed_until_a_replay_wrote_them()
     {
        let store = Arc::new(Switched::default());
        let revocations = Revocations::new(store.clone(), 4, Duration::from_secs(60), 900);
        let user = Uuid::now_v7();
        let sessions: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
        for session in &sessions {
            revocations.revoke_session_or_retry(user, *session).await;
        }
        assert_eq!(
            revocations.unwritten.lock().unwrap().writes.len(),
            4,
            "owed up to the bound"
        );
        assert_eq!(
            revocations.dropped.load(Ordering::SeqCst),
            6,
            "the rest dropped"
        );
        let of = |session: Uuid| {
            let mut t = token(user, unix_now_ms());
            t.keys.session_id = session;
            t
        };

        // Back up: the owed writes are written, a replay is asked for, and
        // until it has run the store's "not revoked" is not believed.
        store.up.store(true, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(30), revocations.store_reconnection())
            .await
            .expect("a replay is asked for once the store takes writes");
        assert_eq!(
            store.sessions.lock().unwrap().len(),
            4,
            "what was owed is written"
        );
        for answer in answers_from_the_store(&revocations, &of, &sessions).await {
            assert!(
                answer.is_err(),
                "the store lacks dropped revocations: fail closed"
            );
        }
        assert!(revocations.is_revoked(&of(Uuid::now_v7())).await.is_err());

        // The replay (as `RevocationFeed::replay_recent` runs it): every
        // row of the log again, then wait until written.
        replay(&revocations, user, &sessions, revocations.replay_begins()).await;
        assert_eq!(
            store.sessions.lock().unwrap().len(),
            10,
            "every revocation in the store"
        );
        for answer in answers_from_the_store(&revocations, &of, &sessions).await {
            assert!(answer.unwrap(), "from the store");
        }
        assert!(
            !revocations.is_revoked(&of(Uuid::now_v7())).await.unwrap(),
            "the store is believed again"
        );
    }

    /// Two requests racing: writes dropped while a replay is running
    /// (begun, say, at a reconnection) are not made good by it — the store
    /// stays disbelieved after it — and the replay asked for when the store
    /// takes writes runs next and makes them good.
    #[tokio::test]
    async fn writes_dropped_during_a_replay_are_made_good_by_the_next_one() {
        let store = Arc::new(Switched::default());
        let revocations = Revocations::new(store.clone(), 2, Duration::from_secs(60), 900);
        let user = Uuid::now_v7();
        let sessions: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
        let unknown = || {
            let mut t = token(user, unix_now_ms());
            t.keys.session_id = Uuid::now_v7();
            t
        };
        for session in &sessions[..3] {
            revocations.revoke_session_or_retry(user, *session).await;
        }
        let first = revocations.replay_begins();
        for session in &sessions[3..] {
            revocations.revoke_session_or_retry(user, *session).await;
        }
        assert_eq!(revocations.dropped.load(Ordering::SeqCst), 3);

        store.up.store(true, Ordering::SeqCst);
        replay(&revocations, user, &sessions, first).await;
        assert!(
            revocations.is_revoked(&unknown()).await.is_err(),
            "two drops came after the first replay began: still not believed"
        );

        tokio::time::timeout(Duration::from_secs(30), revocations.store_reconnection())
            .await
            .expect("a second replay was asked for");
        replay(&revocations, user, &sessions, revocations.replay_begins()).await;
        assert_eq!(store.sessions.lock().unwrap().len(), 5);
        assert!(
            !revocations.is_revoked(&unknown()).await.unwrap(),
            "believed again"
        );
    }

    /// Past the bound, a user-wide revocation is still owed (its epoch,
    /// written after the change committed, is not in the log); a session's
    /// is dropped.
    #[tokio::test]
    async fn a_user_wide_revocation_is_owed_past_the_bound() {
        let revocations = Revocations::new(Arc::new(Down), 1, Duration::from_secs(60), 900);
        let user = Uuid::now_v7();
        revocations
            .revoke_session_or_retry(user, Uuid::now_v7())
            .await;
        revocations
            .revoke_session_or_retry(user, Uuid::now_v7())
            .await;
        revocations
            .revoke_user_at_or_retry(user, unix_now_ms())
            .await;
        assert_eq!(revocations.unwritten.lock().unwrap().writes.len(), 2);
        assert_eq!(
            revocations.dropped.load(Ordering::SeqCst),
            1,
            "the second session's"
        );
    }

    /// Failure class: input faster than this replica reads it — a burst of
    /// log rows past the live feed's capacity. The rows missed here are not
    /// left to their writers alone (one may have died owing its write): a
    /// replay of the log is asked for, the one a reconnection runs.
    #[tokio::test]
    async fn rows_missed_by_a_lagging_replica_ask_for_a_replay() {
        let revocations = Revocations::new(Arc::new(Down), 100, Duration::from_secs(60), 900);
        let (tx, rx) = tokio::sync::broadcast::channel(2);
        for seq in 0..5 {
            tx.send(Arc::new(feed::LoggedRevocation::from_stored(
                seq,
                Uuid::now_v7(),
                "token_revoked".to_owned(),
                Some(Uuid::now_v7()),
                time::OffsetDateTime::now_utc(),
                serde_json::json!({ "session_id": Uuid::now_v7().to_string() }),
            )))
            .unwrap();
        }
        let stop = tokio_util::sync::CancellationToken::new();
        let applying = tokio::spawn(feed::apply_log(rx, revocations.clone(), stop.clone()));
        tokio::time::timeout(Duration::from_secs(10), revocations.store_reconnection())
            .await
            .expect("a replay is asked for");
        stop.cancel();
        applying.await.unwrap();
    }

    #[test]
    fn notices_round_trip_and_garbage_is_refused() {
        let id = Uuid::now_v7();
        for n in [
            Notice::Token { jti: id, until: 5 },
            Notice::Session {
                session_id: id,
                until: 6,
            },
            Notice::User {
                user_id: id,
                epoch_ms: 7,
                until: 8,
            },
        ] {
            assert_eq!(Notice::parse(&n.encode()), Some(n));
        }
        for bad in [
            "",
            "jti",
            "sid nope 1",
            "user x 1 2",
            "jti a 1 extra",
            "other a 1",
        ] {
            assert_eq!(Notice::parse(bad), None, "{bad:?}");
        }
    }
}
