//! Redis-backed shared state: revocations and login-failure counters.
//!
//! Every call has a hard timeout (`redis_timeout_ms`); a timeout or a lost
//! connection is `BackendError::Unavailable`, which callers turn into an
//! explicit decision (ValidateToken and Login answer Unavailable: they fail
//! closed rather than accept a possibly revoked token or an unlimited
//! password guess).

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use futures::{FutureExt as _, TryFutureExt as _};
use redis::{
    AsyncCommands, RedisError, Script,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use tracing::Instrument as _;
use uuid::Uuid;

use super::sentinel::SentinelConn;
use crate::{
    config::RedisMode,
    error::BackendError,
    ratelimit::{
        FailureCounter,
        quota::{Grant, Limit, QuotaStore},
    },
    revocation::{Notice, RevocationKeys, RevocationSnapshot, RevocationStore, Revocations},
    unix_now,
};

#[derive(Clone)]
pub struct RedisStore {
    /// Plain clients for the revocation channel: the server, or every seed
    /// node of a cluster (a cluster forwards PUBLISH to every node, so a
    /// subscription on any one of them hears all).
    pubsub: Vec<redis::Client>,
    conn: Conn,
    prefix: String,
    timeout: Duration,
    raise_epoch: Script,
    gcra: Script,
}

/// One multiplexed, reconnecting handle for either topology. Every command
/// this store sends touches one slot (keys of one user share a hash tag;
/// per-key pipelines otherwise), so the cluster client can route each.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
    Sentinel(Arc<SentinelConn>),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(s) => Box::pin(s.query(cmd)),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(s) => Box::pin(s.query_pipeline(pipeline, offset, count)),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(_) => 0,
        }
    }
}

/// GCRA with leases (see `ratelimit::quota`): takes up to ARGV[3] tokens;
/// returns {granted, retry_after_us}. Time comes from Redis so replicas with
/// skewed clocks agree. KEYS[1] holds the TAT in microseconds.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = interval * tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local available = math.floor((now + tau - tat) / interval)
local granted = math.min(want, available)
if granted > 0 then
  tat = tat + granted * interval
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  return {granted, 0}
end
return {0, tat + interval - tau - now}
";

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
    // A cluster whose node serving the slot is gone answers MOVED to that
    // node, CLUSTERDOWN, TRYAGAIN or MASTERDOWN, or the client finds no
    // connection for it: the backend is down for that key, not broken.
    let cluster_unavailable = error.is_cluster_error()
        || matches!(
            error.kind(),
            redis::ErrorKind::ClusterConnectionNotFound
                | redis::ErrorKind::Server(redis::ServerErrorKind::MasterDown)
        );
    if error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || cluster_unavailable
    {
        BackendError::unavailable("redis", error)
    } else {
        BackendError::failed("redis", error)
    }
}

impl RedisStore {
    pub async fn connect(
        url: &str,
        mode: RedisMode,
        sentinel_master: &str,
        prefix: &str,
        timeout: Duration,
        tls: &crate::config::RedisTlsConfig,
    ) -> Result<Self, BackendError> {
        let certificates = if tls.ca.is_some() || tls.cert.is_some() {
            let read = |path: &std::path::Path| {
                std::fs::read(path).map_err(|e| {
                    BackendError::failed(
                        "redis",
                        format!("redis_tls: reading {}: {e}", path.display()),
                    )
                })
            };
            let client_tls = match (&tls.cert, &tls.key) {
                (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                    client_cert: read(cert)?,
                    client_key: read(key)?,
                }),
                _ => None,
            };
            let root_cert = tls.ca.as_deref().map(read).transpose()?;
            Some(redis::TlsCertificates {
                client_tls,
                root_cert,
            })
        } else {
            None
        };
        let client = |url: &str| {
            match &certificates {
                Some(certs) => redis::Client::build_with_tls(url, certs.clone()),
                None => redis::Client::open(url),
            }
            .map_err(|e| BackendError::failed("redis", e))
        };
        let (pubsub, connecting) = match mode {
            RedisMode::Standalone => {
                let client = client(url)?;
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(timeout))
                    .set_connection_timeout(Some(timeout))
                    .set_number_of_retries(1);
                let connecting = ConnectionManager::new_with_config(client.clone(), config)
                    .map_ok(Conn::Single)
                    .boxed();
                (vec![client], connecting)
            }
            RedisMode::Cluster => {
                let seeds: Vec<&str> = url.split(',').map(str::trim).collect();
                let pubsub = seeds
                    .iter()
                    .map(|seed| client(seed))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut builder = redis::cluster::ClusterClient::builder(seeds)
                    .response_timeout(timeout)
                    .connection_timeout(timeout)
                    .retries(1);
                if let Some(certs) = &certificates {
                    builder = builder.certs(certs.clone());
                }
                let cluster = builder
                    .build()
                    .map_err(|e| BackendError::failed("redis", e))?;
                let connecting = async move { cluster.get_async_connection().await }
                    .map_ok(Conn::Cluster)
                    .boxed();
                (pubsub, connecting)
            }
            RedisMode::Sentinel => {
                let sentinels = url
                    .split(',')
                    .map(|u| client(u.trim()))
                    .collect::<Result<Vec<_>, _>>()?;
                // Data nodes are reached like the sentinels: same scheme,
                // same certificates.
                let scheme = if url.trim_start().starts_with("rediss://") {
                    "rediss"
                } else {
                    "redis"
                };
                let certificates = certificates.clone();
                let node: super::sentinel::NodeClient = Box::new(move |host, port| {
                    let url = format!("{scheme}://{host}:{port}/");
                    match &certificates {
                        Some(certs) => redis::Client::build_with_tls(url, certs.clone()),
                        None => redis::Client::open(url),
                    }
                });
                // Below the store's own call timeout, so a master that
                // stopped answering is noticed (and resolved again) there.
                let conn = Arc::new(SentinelConn::new(
                    sentinels,
                    sentinel_master.to_owned(),
                    node,
                    timeout * 3 / 4,
                ));
                let connecting = async move {
                    conn.connection().await?;
                    Ok(Conn::Sentinel(conn))
                }
                .boxed();
                (Vec::new(), connecting)
            }
        };
        let conn = tokio::time::timeout(timeout * 4, connecting)
            .await
            .map_err(|e| BackendError::unavailable("redis", e))?
            .map_err(redis_error)?;
        Ok(Self {
            pubsub,
            conn,
            prefix: prefix.to_owned(),
            timeout,
            raise_epoch: Script::new(RAISE_EPOCH),
            gcra: Script::new(GCRA),
        })
    }

    /// One bounded Redis call; `operation` names its span in a traced call.
    async fn run<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, BackendError> {
        let started = std::time::Instant::now();
        let span = crate::child_span!(
            "redis",
            otel.name = operation,
            otel.kind = "client",
            db.system.name = "redis",
            db.operation.name = operation,
        );
        let result = tokio::time::timeout(self.timeout, call)
            .instrument(span)
            .await;
        metrics::histogram!("redis_call_duration_seconds").record(started.elapsed().as_secs_f64());
        match result {
            Ok(r) => r.map_err(redis_error),
            Err(elapsed) => Err(BackendError::unavailable("redis", elapsed)),
        }
    }

    fn key(&self, rest: std::fmt::Arguments<'_>) -> String {
        format!("{}{}", self.prefix, rest)
    }

    /// A revocation key of `user_id`'s: every one carries the hash tag
    /// `{<user id>}`, so one user's keys share a cluster slot and the lookup
    /// is one single-slot MGET.
    fn user_key(&self, user_id: Uuid, rest: std::fmt::Arguments<'_>) -> String {
        format!("{}rv:{{{user_id}}}:{rest}", self.prefix)
    }

    /// `maxmemory-policy` as CONFIG GET answers it: from the server (the
    /// master behind Sentinel), or from every seed node of a cluster. An
    /// error when a node refuses the command (managed Redis often does) or
    /// cannot be asked.
    pub async fn maxmemory_policies(&self) -> Result<Vec<String>, BackendError> {
        async fn ask(
            conn: &mut impl redis::aio::ConnectionLike,
        ) -> Result<Option<String>, RedisError> {
            let mut answer: std::collections::HashMap<String, String> = redis::cmd("CONFIG")
                .arg("GET")
                .arg("maxmemory-policy")
                .query_async(conn)
                .await?;
            Ok(answer.remove("maxmemory-policy"))
        }
        let missing = || BackendError::failed("redis", "CONFIG GET maxmemory-policy: no answer");
        match &self.conn {
            Conn::Cluster(_) => {
                let mut policies = Vec::new();
                for client in &self.pubsub {
                    let policy = self
                        .run("CONFIG GET", async {
                            let mut conn = client.get_multiplexed_async_connection().await?;
                            ask(&mut conn).await
                        })
                        .await?;
                    policies.push(policy.ok_or_else(missing)?);
                }
                Ok(policies)
            }
            _ => {
                let mut conn = self.conn.clone();
                let policy = self
                    .run("CONFIG GET", async move { ask(&mut conn).await })
                    .await?;
                Ok(vec![policy.ok_or_else(missing)?])
            }
        }
    }

    pub async fn ping(&self) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        self.run("PING", async move {
            redis::cmd("PING").query_async::<String>(&mut conn).await
        })
        .await
        .map(drop)
    }
}

fn ttl_secs(until: i64) -> u64 {
    u64::try_from(until - unix_now()).unwrap_or(0).max(1)
}

impl RedisStore {
    fn channel(&self) -> String {
        self.key(format_args!("revocations"))
    }

    /// Sets `key` until `until`, then tells every replica. Two commands,
    /// not one MULTI: in a cluster the channel and the key are in different
    /// slots. The key is written first, so a replica that hears the notice
    /// finds it; a notice lost after the write is covered by the other
    /// replicas' cache TTL, as any missed notice is.
    async fn set_and_announce(
        &self,
        key: String,
        value: i64,
        until: i64,
        notice: Notice,
    ) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        let channel = self.channel();
        self.run("SET PUBLISH", async move {
            redis::cmd("SET")
                .arg(&key)
                .arg(value)
                .arg("EX")
                .arg(ttl_secs(until))
                .exec_async(&mut conn)
                .await?;
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(notice.encode())
                .exec_async(&mut conn)
                .await
        })
        .await
    }

    /// Applies every revocation published by any replica to `revocations`
    /// until `stop`. After a (re)subscription the cached "not revoked"
    /// answers are dropped, since notices may have been missed meanwhile.
    pub async fn follow_revocations(
        self,
        revocations: Revocations,
        stop: tokio_util::sync::CancellationToken,
    ) {
        use futures::StreamExt;
        let channel = self.channel();
        let mut backoff = Duration::from_millis(100);
        // The next node to subscribe on: each failure moves to another seed
        // node of a cluster (one server: always the same).
        let mut attempt = 0usize;
        let mut subscribed_before = false;
        while !stop.is_cancelled() {
            let seed =
                (!self.pubsub.is_empty()).then(|| self.pubsub[attempt % self.pubsub.len()].clone());
            attempt += 1;
            let subscribed = async {
                // Behind Sentinel: on the master of the moment (a replica
                // would hear PUBLISH too, but the master is what is known).
                let client = match (&self.conn, seed) {
                    (Conn::Sentinel(sentinel), _) => sentinel.master_client().await?,
                    (_, Some(client)) => client,
                    (_, None) => unreachable!("standalone and cluster modes have seed clients"),
                };
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                Ok::<_, RedisError>(pubsub)
            };
            let mut pubsub = match tokio::time::timeout(self.timeout * 4, subscribed).await {
                Ok(Ok(pubsub)) => pubsub,
                Ok(Err(error)) => {
                    if let Conn::Sentinel(sentinel) = &self.conn {
                        sentinel.forget();
                    }
                    tracing::warn!(%error, "revocation channel: subscribe failed; retrying");
                    tokio::select! { () = stop.cancelled() => return, () = tokio::time::sleep(backoff) => {} }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
                Err(_) => {
                    tracing::warn!("revocation channel: subscribe timed out; retrying");
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            revocations.forget_negative_answers();
            // Subscribed again: Redis may be back without its state.
            if subscribed_before {
                revocations.store_reconnected();
            }
            subscribed_before = true;
            tracing::info!(%channel, "following revocations");
            let mut messages = pubsub.on_message();
            loop {
                let message = tokio::select! {
                    () = stop.cancelled() => return,
                    m = messages.next() => m,
                };
                let Some(message) = message else { break };
                match message
                    .get_payload::<String>()
                    .ok()
                    .as_deref()
                    .and_then(Notice::parse)
                {
                    Some(notice) => revocations.apply(&notice),
                    None => tracing::warn!("revocation channel: ignoring a malformed notice"),
                }
            }
            // Behind Sentinel the channel's connection is to the master: it
            // closing means the master is gone (or restarted), so the
            // command connection is asked for again too.
            if let Conn::Sentinel(sentinel) = &self.conn {
                sentinel.forget();
            }
            tracing::warn!("revocation channel closed; resubscribing");
        }
    }
}

#[async_trait]
impl RevocationStore for RedisStore {
    async fn revoke_token(&self, user_id: Uuid, jti: Uuid, until: i64) -> Result<(), BackendError> {
        let key = self.user_key(user_id, format_args!("jti:{jti}"));
        self.set_and_announce(key, 1, until, Notice::Token { jti, until })
            .await
    }

    async fn revoke_session(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        until: i64,
    ) -> Result<(), BackendError> {
        let key = self.user_key(user_id, format_args!("sid:{session_id}"));
        self.set_and_announce(key, 1, until, Notice::Session { session_id, until })
            .await
    }

    async fn raise_user_epoch(
        &self,
        user_id: Uuid,
        epoch_ms: i64,
        until: i64,
    ) -> Result<(), BackendError> {
        let key = self.user_key(user_id, format_args!("user"));
        let mut conn = self.conn.clone();
        let script = self.raise_epoch.clone();
        let notice = Notice::User {
            user_id,
            epoch_ms,
            until,
        }
        .encode();
        let channel = self.channel();
        self.run("EVALSHA PUBLISH", async move {
            script
                .key(key)
                .arg(epoch_ms)
                .arg(ttl_secs(until))
                .invoke_async::<i64>(&mut conn)
                .await?;
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(notice)
                .query_async::<i64>(&mut conn)
                .await
        })
        .await
        .map(drop)
    }

    async fn lookup(&self, keys: &RevocationKeys) -> Result<RevocationSnapshot, BackendError> {
        let names = [
            self.user_key(keys.user_id, format_args!("jti:{}", keys.jti)),
            self.user_key(keys.user_id, format_args!("sid:{}", keys.session_id)),
            self.user_key(keys.user_id, format_args!("user")),
        ];
        let mut conn = self.conn.clone();
        let (jti, sid, epoch): (Option<i64>, Option<i64>, Option<i64>) = self
            .run("MGET", async move {
                redis::cmd("MGET").arg(&names).query_async(&mut conn).await
            })
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
    /// One pipeline per key (each in one slot), all in flight at once: the
    /// multiplexed connection writes them back to back, and a cluster routes
    /// each to its node.
    async fn counts(&self, keys: &[String]) -> Result<Vec<(u32, Duration)>, BackendError> {
        let reads = keys.iter().map(|key| {
            let key = self.key(format_args!("{key}"));
            let mut conn = self.conn.clone();
            async move {
                // The count (nil when absent), then PTTL (negative when absent).
                let (count, left): (Option<i64>, i64) = redis::pipe()
                    .cmd("GET")
                    .arg(&key)
                    .cmd("PTTL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await?;
                Ok::<_, RedisError>((
                    count.and_then(|c| u32::try_from(c).ok()).unwrap_or(0),
                    Duration::from_millis(u64::try_from(left).unwrap_or(0)),
                ))
            }
        });
        self.run("GET PTTL", futures::future::try_join_all(reads))
            .await
    }

    async fn add_failure(
        &self,
        keys: &[String],
        window: Duration,
    ) -> Result<Vec<(u32, Duration)>, BackendError> {
        let writes = keys.iter().map(|key| {
            let key = self.key(format_args!("{key}"));
            let mut conn = self.conn.clone();
            async move {
                // EXPIRE … NX: the window starts at the first failure and
                // later failures do not stretch it. Atomic per key, so no key
                // is left counting without an expiry.
                let (count, left): (i64, i64) = redis::pipe()
                    .atomic()
                    .cmd("INCR")
                    .arg(&key)
                    .cmd("EXPIRE")
                    .arg(&key)
                    .arg(window.as_secs())
                    .arg("NX")
                    .ignore()
                    .cmd("PTTL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await?;
                Ok::<_, RedisError>((
                    u32::try_from(count).unwrap_or(u32::MAX),
                    Duration::from_millis(u64::try_from(left).unwrap_or(0)),
                ))
            }
        });
        self.run(
            "MULTI INCR EXPIRE PTTL",
            futures::future::try_join_all(writes),
        )
        .await
    }

    async fn remove_failure(&self, keys: &[String]) -> Result<(), BackendError> {
        // Only a counter that still exists (a DECR of a missing key would
        // create one at -1 with no expiry); one key per script, so each
        // runs on its own slot's node.
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                "if redis.call('EXISTS', KEYS[1]) == 1 and tonumber(redis.call('GET', KEYS[1])) > 0 \
                 then return redis.call('DECR', KEYS[1]) end return 0",
            )
        });
        let writes = keys.iter().map(|key| {
            let key = self.key(format_args!("{key}"));
            let mut conn = self.conn.clone();
            async move {
                SCRIPT
                    .key(&key)
                    .invoke_async::<i64>(&mut conn)
                    .await
                    .map(drop)
            }
        });
        self.run("EVALSHA DECR", futures::future::try_join_all(writes))
            .await
            .map(drop)
    }

    async fn clear(&self, key: &str) -> Result<(), BackendError> {
        let key = self.key(format_args!("{key}"));
        let mut conn = self.conn.clone();
        self.run("DEL", async move { conn.del::<_, ()>(key).await })
            .await
    }
}

#[async_trait]
impl QuotaStore for RedisStore {
    async fn acquire(&self, key: &str, limit: &Limit, want: u32) -> Result<Grant, BackendError> {
        let key = self.key(format_args!("rl:{key}"));
        let mut conn = self.conn.clone();
        let script = self.gcra.clone();
        let (granted, retry_us): (i64, i64) = self
            .run("EVALSHA", async move {
                script
                    .key(key)
                    .arg(limit.interval_us())
                    .arg(limit.burst)
                    .arg(want)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(Grant {
            granted: u32::try_from(granted).unwrap_or(0),
            retry_after: Duration::from_micros(u64::try_from(retry_us).unwrap_or(0).max(1)),
        })
    }
}
