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
