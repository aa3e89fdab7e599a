//! In-process stores for the embedded default: revocations and login-failure
//! counters in bounded moka maps whose entries expire at their own deadline.
//! They are per process, so they only fit a single replica.

use std::{
    hash::Hash,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use moka::{Expiry, sync::Cache};
use uuid::Uuid;

use crate::{
    error::BackendError,
    ratelimit::FailureCounter,
    revocation::{RevocationKeys, RevocationSnapshot, RevocationStore},
    unix_now,
};

/// A bounded map whose entries vanish at their own deadline.
pub struct ExpiringMap<K, V> {
    cache: Cache<K, (V, Instant)>,
}

struct UntilDeadline;

impl<K, V> Expiry<K, (V, Instant)> for UntilDeadline {
    fn expire_after_create(&self, _: &K, value: &(V, Instant), now: Instant) -> Option<Duration> {
        Some(value.1.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &K,
        value: &(V, Instant),
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.1.saturating_duration_since(now))
    }
}

impl<K, V> ExpiringMap<K, V>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub fn new(capacity: u64) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(capacity)
                .expire_after(UntilDeadline)
                .build(),
        }
    }

    pub fn insert(&self, key: K, value: V, ttl: Duration) {
        self.cache.insert(key, (value, Instant::now() + ttl));
    }

    /// The value and the time it has left.
    pub fn get(&self, key: &K) -> Option<(V, Duration)> {
        let (value, deadline) = self.cache.get(key)?;
        let left = deadline.checked_duration_since(Instant::now())?;
        Some((value, left))
    }

    pub fn remove(&self, key: &K) {
        self.cache.invalidate(key);
    }

    /// Atomically replaces the entry with `f(current)`; returns the new
    /// value and its deadline.
    pub fn update(
        &self,
        key: K,
        f: impl FnOnce(Option<(V, Instant)>) -> (V, Instant),
    ) -> (V, Instant) {
        self.cache
            .entry(key)
            .and_upsert_with(|current| f(current.map(|e| e.into_value())))
            .into_value()
    }
}

fn ttl_until(unix_secs: i64) -> Duration {
    Duration::from_secs(u64::try_from(unix_secs - unix_now()).unwrap_or(0).max(1))
}

#[derive(Hash, PartialEq, Eq, Clone)]
enum RevKey {
    Token(Uuid),
    Session(Uuid),
    User(Uuid),
}

/// Revocations in process (no Redis configured).
pub struct MemoryRevocations {
    map: ExpiringMap<RevKey, i64>,
}

impl MemoryRevocations {
    pub fn new(capacity: u64) -> Self {
        Self {
            map: ExpiringMap::new(capacity),
        }
    }
}

#[async_trait]
impl RevocationStore for MemoryRevocations {
    async fn revoke_token(
        &self,
        _user_id: Uuid,
        jti: Uuid,
        until: i64,
    ) -> Result<(), BackendError> {
        self.map.insert(RevKey::Token(jti), 1, ttl_until(until));
        Ok(())
    }

    async fn revoke_session(
        &self,
        _user_id: Uuid,
        session_id: Uuid,
        until: i64,
    ) -> Result<(), BackendError> {
        self.map
            .insert(RevKey::Session(session_id), 1, ttl_until(until));
        Ok(())
    }

    async fn raise_user_epoch(
        &self,
        user_id: Uuid,
        epoch_ms: i64,
        until: i64,
    ) -> Result<(), BackendError> {
        let deadline = Instant::now() + ttl_until(until);
        let _ = self
            .map
            .update(RevKey::User(user_id), |current| match current {
                Some((old, old_deadline)) if old >= epoch_ms => (old, old_deadline.max(deadline)),
                _ => (epoch_ms, deadline),
            });
        Ok(())
    }

    async fn lookup(&self, keys: &RevocationKeys) -> Result<RevocationSnapshot, BackendError> {
        Ok(RevocationSnapshot {
            token_revoked: self.map.get(&RevKey::Token(keys.jti)).is_some(),
            session_revoked: self.map.get(&RevKey::Session(keys.session_id)).is_some(),
            user_epoch_ms: self.map.get(&RevKey::User(keys.user_id)).map(|(v, _)| v),
        })
    }
}

/// Login-failure counters in process.
pub struct MemoryFailureCounter {
    map: ExpiringMap<String, u32>,
}

impl MemoryFailureCounter {
    pub fn new(capacity: u64) -> Self {
        Self {
            map: ExpiringMap::new(capacity),
        }
    }
}

#[async_trait]
impl FailureCounter for MemoryFailureCounter {
    async fn counts(&self, keys: &[String]) -> Result<Vec<(u32, Duration)>, BackendError> {
        Ok(keys
            .iter()
            .map(|k| self.map.get(k).unwrap_or((0, Duration::ZERO)))
            .collect())
    }

    async fn add_failure(
        &self,
        keys: &[String],
        window: Duration,
    ) -> Result<Vec<(u32, Duration)>, BackendError> {
        Ok(keys
            .iter()
            .map(|key| {
                // The window starts at the first failure and is not extended
                // by later ones (a fixed window per key, as with INCR +
                // EXPIRE NX).
                let (n, deadline) = self.map.update(key.clone(), |current| match current {
                    Some((n, deadline)) if deadline > Instant::now() => (n + 1, deadline),
                    _ => (1, Instant::now() + window),
                });
                (n, deadline.saturating_duration_since(Instant::now()))
            })
            .collect())
    }

    async fn remove_failure(&self, keys: &[String]) -> Result<(), BackendError> {
        for key in keys {
            if self.map.get(key).is_some() {
                let _ = self.map.update(key.clone(), |current| match current {
                    Some((n, deadline)) => (n.saturating_sub(1), deadline),
                    None => (0, Instant::now()),
                });
            }
        }
        Ok(())
    }

    async fn clear(&self, key: &str) -> Result<(), BackendError> {
        self.map.remove(&key.to_owned());
        Ok(())
    }
}

/// The revocation cache ([`Revocations`]) over the real in-process store:
/// what a slow or racing store may and may not leave in the cache.
#[cfg(test)]
mod revocation_cache {
    use std::{
        sync::{Arc, atomic::Ordering},
        time::Duration,
    };

    use async_trait::async_trait;
    use uuid::Uuid;

    use super::MemoryRevocations;
    use crate::{
        error::BackendError,
        revocation::{
            RevocationKeys, RevocationSnapshot, RevocationStore, Revocations, TokenFacts,
            unix_now_ms,
        },
        unix_now,
    };

    #[tokio::test]
    async fn forgetting_negative_answers_makes_the_next_check_ask_the_store() {
        let store = Arc::new(MemoryRevocations::new(100));
        let revocations = Revocations::new(store.clone(), 100, Duration::from_secs(60), 900);
        let (user, session, jti) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let facts = TokenFacts {
            keys: RevocationKeys {
                jti,
                session_id: session,
                user_id: user,
            },
            issued_at_ms: unix_now() * 1000,
            expires_at: unix_now() + 900,
        };
        assert!(!revocations.is_revoked(&facts).await.unwrap());
        // Revoked behind this cache's back (another replica, a missed notice).
        store
            .revoke_token(user, jti, unix_now() + 900)
            .await
            .unwrap();
        assert!(
            !revocations.is_revoked(&facts).await.unwrap(),
            "the cached answer stands for its TTL"
        );
        revocations.forget_negative_answers();
        assert!(revocations.is_revoked(&facts).await.unwrap());
    }

    /// The real in-process store with a hook: the first lookup reads its
    /// answer, then waits until the test lets it return (a slow store).
    struct HeldLookup {
        inner: MemoryRevocations,
        held: std::sync::atomic::AtomicBool,
        read: tokio::sync::Notify,
        release: tokio::sync::Notify,
    }

    impl HeldLookup {
        /// A fresh in-process store whose first lookup will be held.
        fn new() -> Arc<Self> {
            Arc::new(Self {
                inner: MemoryRevocations::new(100),
                held: false.into(),
                read: tokio::sync::Notify::new(),
                release: tokio::sync::Notify::new(),
            })
        }
    }

    #[async_trait]
    impl RevocationStore for HeldLookup {
        async fn revoke_token(&self, u: Uuid, j: Uuid, t: i64) -> Result<(), BackendError> {
            self.inner.revoke_token(u, j, t).await
        }
        async fn revoke_session(&self, u: Uuid, s: Uuid, t: i64) -> Result<(), BackendError> {
            self.inner.revoke_session(u, s, t).await
        }
        async fn raise_user_epoch(&self, u: Uuid, e: i64, t: i64) -> Result<(), BackendError> {
            self.inner.raise_user_epoch(u, e, t).await
        }
        async fn lookup(&self, keys: &RevocationKeys) -> Result<RevocationSnapshot, BackendError> {
            let snapshot = self.inner.lookup(keys).await?;
            if !self.held.swap(true, Ordering::SeqCst) {
                self.read.notify_one();
                self.release.notified().await;
            }
            Ok(snapshot)
        }
    }

    fn facts_of_new_token() -> TokenFacts {
        TokenFacts {
            keys: RevocationKeys {
                jti: Uuid::now_v7(),
                session_id: Uuid::now_v7(),
                user_id: Uuid::now_v7(),
            },
            issued_at_ms: unix_now_ms() - 1,
            expires_at: unix_now() + 900,
        }
    }

    /// Failure class: two requests racing between the read that decides
    /// and the write that acts — a slow lookup read "not revoked", a
    /// revocation was then made on this replica, and the lookup's stale
    /// answer must not overwrite it in the cache.
    #[tokio::test]
    async fn a_slow_lookup_does_not_cache_its_stale_answer_over_a_newer_revocation() {
        for revoke in ["session", "token", "user"] {
            let store = HeldLookup::new();
            // A long negative TTL: a stale entry would stand for the test.
            let revocations = Revocations::new(store.clone(), 100, Duration::from_secs(600), 900);
            let facts = facts_of_new_token();
            let checking = tokio::spawn({
                let revocations = revocations.clone();
                async move { revocations.is_revoked(&facts).await }
            });
            // The lookup has read "not revoked" and is held.
            store.read.notified().await;
            let k = facts.keys;
            match revoke {
                "session" => revocations.revoke_session(k.user_id, k.session_id).await,
                "token" => {
                    revocations
                        .revoke_token(k.user_id, k.jti, facts.expires_at)
                        .await
                }
                _ => revocations.revoke_user(k.user_id).await,
            }
            .unwrap();
            store.release.notify_one();
            // The racing check answers as of its read; that is its own call.
            let _ = checking.await.unwrap().unwrap();
            assert!(
                revocations.is_revoked(&facts).await.unwrap(),
                "{revoke}: the revocation stands after the slow lookup returned"
            );
        }
    }

    /// Failure class: backend comes back without the notices it missed —
    /// a lookup in flight across `forget_negative_answers` must not cache
    /// its answer from before the gap.
    #[tokio::test]
    async fn a_lookup_in_flight_across_a_notice_gap_caches_nothing() {
        let store = HeldLookup::new();
        let revocations = Revocations::new(store.clone(), 100, Duration::from_secs(600), 900);
        let facts = facts_of_new_token();
        let checking = tokio::spawn({
            let revocations = revocations.clone();
            async move { revocations.is_revoked(&facts).await }
        });
        store.read.notified().await;
        // Revoked behind this cache's back (a notice lost in the gap).
        let k = facts.keys;
        store
            .inner
            .revoke_session(k.user_id, k.session_id, unix_now() + 900)
            .await
            .unwrap();
        revocations.forget_negative_answers();
        store.release.notify_one();
        let _ = checking.await.unwrap().unwrap();
        assert!(revocations.is_revoked(&facts).await.unwrap());
    }
}
