//! Redis-backed shared state: revocations and login-failure counters.
//!
//! Every call has a hard timeout (`redis_timeout_ms`); a timeout or a lost
//! connection is `BackendError::Unavailable`, which callers turn into an
//! explicit decision (ValidateToken and Login answer Unavailable: they fail
//! closed rather than accept a possibly revoked token or an unlimited
//! password guess).

use std::time::Duration;

use async_trait::async_trait;
use redis::{
    AsyncCommands, RedisError, Script,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use uuid::Uuid;

use crate::{
    error::BackendError,
    ratelimit::FailureCounter,
    revocation::{RevocationKeys, RevocationSnapshot, RevocationStore},
    unix_now,
};

#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    raise_epoch: Script,
}

/// Sets the epoch only if it moves forward; always keeps the key at least
/// until ARGV[2] seconds from now.
const RAISE_EPOCH: &str = r"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('EXPIRE', KEYS[1], ARGV[2], 'GT')
end
return 1
";

fn redis_error(error: RedisError) -> BackendError {
    if error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
    {
        BackendError::unavailable("redis", error)
    } else {
        BackendError::failed("redis", error)
    }
}

impl RedisStore {
    pub async fn connect(url: &str, prefix: &str, timeout: Duration) -> Result<Self, BackendError> {
        let client = redis::Client::open(url).map_err(|e| BackendError::failed("redis", e))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout))
            .set_number_of_retries(1);
        let conn = tokio::time::timeout(
            timeout * 4,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|e| BackendError::unavailable("redis", e))?
        .map_err(redis_error)?;
        Ok(Self {
            conn,
            prefix: prefix.to_owned(),
            timeout,
            raise_epoch: Script::new(RAISE_EPOCH),
        })
    }

    async fn run<T>(
        &self,
        call: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, BackendError> {
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(self.timeout, call).await;
        metrics::histogram!("redis_call_duration_seconds").record(started.elapsed().as_secs_f64());
        match result {
            Ok(r) => r.map_err(redis_error),
            Err(elapsed) => Err(BackendError::unavailable("redis", elapsed)),
        }
    }

    fn key(&self, rest: std::fmt::Arguments<'_>) -> String {
        format!("{}{}", self.prefix, rest)
    }

    pub async fn ping(&self) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        self.run(async move { redis::cmd("PING").query_async::<String>(&mut conn).await })
            .await
            .map(drop)
    }
}

fn ttl_secs(until: i64) -> u64 {
    u64::try_from(until - unix_now()).unwrap_or(0).max(1)
}

#[async_trait]
impl RevocationStore for RedisStore {
    async fn revoke_token(&self, jti: &str, until: i64) -> Result<(), BackendError> {
        let key = self.key(format_args!("rv:jti:{jti}"));
        let mut conn = self.conn.clone();
        self.run(async move { conn.set_ex::<_, _, ()>(key, 1, ttl_secs(until)).await })
            .await
    }

    async fn revoke_session(&self, session_id: Uuid, until: i64) -> Result<(), BackendError> {
        let key = self.key(format_args!("rv:sid:{session_id}"));
        let mut conn = self.conn.clone();
        self.run(async move { conn.set_ex::<_, _, ()>(key, 1, ttl_secs(until)).await })
            .await
    }

    async fn raise_user_epoch(
        &self,
        user_id: Uuid,
        epoch_ms: i64,
        until: i64,
    ) -> Result<(), BackendError> {
        let key = self.key(format_args!("rv:user:{user_id}"));
        let mut conn = self.conn.clone();
        let script = self.raise_epoch.clone();
        self.run(async move {
            script
                .key(key)
                .arg(epoch_ms)
                .arg(ttl_secs(until))
                .invoke_async::<i64>(&mut conn)
                .await
        })
        .await
        .map(drop)
    }

    async fn lookup(&self, keys: &RevocationKeys<'_>) -> Result<RevocationSnapshot, BackendError> {
        let names = [
            self.key(format_args!("rv:jti:{}", keys.jti)),
            self.key(format_args!("rv:sid:{}", keys.session_id)),
            self.key(format_args!("rv:user:{}", keys.user_id)),
        ];
        let mut conn = self.conn.clone();
        let (jti, sid, epoch): (Option<i64>, Option<i64>, Option<i64>) = self
            .run(async move { redis::cmd("MGET").arg(&names).query_async(&mut conn).await })
            .await?;
        Ok(RevocationSnapshot {
            token_revoked: jti.is_some(),
            session_revoked: sid.is_some(),
            user_epoch_ms: epoch,
        })
    }
}

#[async_trait]
impl FailureCounter for RedisStore {
    async fn counts(&self, keys: &[String]) -> Result<Vec<(u32, Duration)>, BackendError> {
        let mut pipe = redis::pipe();
        for key in keys {
            let key = self.key(format_args!("{key}"));
            pipe.cmd("GET").arg(&key).cmd("PTTL").arg(&key);
        }
        let mut conn = self.conn.clone();
        // Flat replies: count (nil when absent), then PTTL (negative when absent).
        let replies: Vec<Option<i64>> = self
            .run(async move { pipe.query_async(&mut conn).await })
            .await?;
        Ok(replies
            .chunks(2)
            .map(|pair| {
                let count = pair[0].and_then(|c| u32::try_from(c).ok()).unwrap_or(0);
                let left = pair
                    .get(1)
                    .copied()
                    .flatten()
                    .and_then(|ms| u64::try_from(ms).ok())
                    .unwrap_or(0);
                (count, Duration::from_millis(left))
            })
            .collect())
    }

    async fn add_failure(&self, keys: &[String], window: Duration) -> Result<(), BackendError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for key in keys {
            let key = self.key(format_args!("{key}"));
            // EXPIRE … NX: the window starts at the first failure and later
            // failures do not stretch it.
            pipe.cmd("INCR")
                .arg(&key)
                .ignore()
                .cmd("EXPIRE")
                .arg(&key)
                .arg(window.as_secs())
                .arg("NX")
                .ignore();
        }
        let mut conn = self.conn.clone();
        self.run(async move { pipe.query_async::<()>(&mut conn).await })
            .await
    }

    async fn clear(&self, key: &str) -> Result<(), BackendError> {
        let key = self.key(format_args!("{key}"));
        let mut conn = self.conn.clone();
        self.run(async move { conn.del::<_, ()>(key).await }).await
    }
}
