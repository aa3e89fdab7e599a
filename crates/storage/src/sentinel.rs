//! Redis behind Sentinel: the master is whatever the sentinels say it is,
//! asked again whenever the connection to it fails.
//!
//! Resolution asks each sentinel in turn for `SENTINEL
//! GET-MASTER-ADDR-BY-NAME <master>`, connects to the address it names and
//! checks with `ROLE` that the node considers itself master (a sentinel that
//! has not yet seen a failover may name a demoted node). The connection is
//! kept until a call on it fails in a way that means the node is gone or no
//! longer master — an I/O error, a timeout, a refused or dropped connection,
//! `READONLY` (the old master came back as a replica), `MASTERDOWN` — and the
//! next call resolves again. One resolution runs at a time; calls that fail
//! meanwhile are Unavailable like any Redis outage, and callers apply their
//! documented fail modes.

use std::time::Duration;

use redis::{
    AsyncConnectionConfig, RedisError, RedisResult, Value,
    aio::{ConnectionLike, MultiplexedConnection},
};

/// Builds a client for `host:port` (same scheme and TLS settings as the
/// sentinels).
pub type NodeClient = Box<dyn Fn(&str, u16) -> RedisResult<redis::Client> + Send + Sync>;

pub struct SentinelConn {
    sentinels: Vec<redis::Client>,
    master: String,
    node: NodeClient,
    /// Each step of a resolution, and every call on the master, is bounded
    /// by this (below the store's own call timeout, so the failure is seen
    /// here and the next call resolves again).
    timeout: Duration,
    current: std::sync::Mutex<Option<MultiplexedConnection>>,
    resolving: tokio::sync::Mutex<()>,
}

fn node_is_gone(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || matches!(
            error.kind(),
            redis::ErrorKind::Server(
                redis::ServerErrorKind::ReadOnly | redis::ServerErrorKind::MasterDown
            )
        )
}

fn timed_out() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "redis sentinel: no answer in time",
    ))
}

impl SentinelConn {
    pub fn new(
        sentinels: Vec<redis::Client>,
        master: String,
        node: NodeClient,
        timeout: Duration,
    ) -> Self {
        Self {
            sentinels,
            master,
            node,
            timeout,
            current: std::sync::Mutex::new(None),
            resolving: tokio::sync::Mutex::new(()),
        }
    }

    fn config(&self) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
    }

    async fn bounded<T>(&self, call: impl Future<Output = RedisResult<T>>) -> RedisResult<T> {
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or_else(|_| Err(timed_out()))
    }

    fn cached(&self) -> Option<MultiplexedConnection> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Drops the master's connection: the next call asks the sentinels
    /// again. Also called when the revocation channel's connection to the
    /// master closes, so a dead master is noticed before a call fails on it.
    pub fn forget(&self) {
        *self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// The master's connection, resolving it when there is none.
    pub async fn connection(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(conn) = self.cached() {
            return Ok(conn);
        }
        let _one = self.resolving.lock().await;
        if let Some(conn) = self.cached() {
            return Ok(conn);
        }
        let (client, conn) = self.resolve().await?;
        tracing::info!(
            master = %self.master,
            address = %client.get_connection_info().addr(),
            "redis sentinel: connected to the master"
        );
        *self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(conn.clone());
        Ok(conn)
    }

    /// A client for the current master (for a pub/sub subscription).
    pub async fn master_client(&self) -> RedisResult<redis::Client> {
        let _one = self.resolving.lock().await;
        self.resolve().await.map(|(client, _)| client)
    }

    async fn resolve(&self) -> RedisResult<(redis::Client, MultiplexedConnection)> {
        let mut last = None;
        for sentinel in &self.sentinels {
            match self.ask(sentinel).await {
                Ok(found) => return Ok(found),
                Err(error) => {
                    tracing::debug!(%error, "redis sentinel: no master from this sentinel");
                    last = Some(error);
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "redis sentinel: no sentinel configured",
            ))
        }))
    }

    async fn ask(
        &self,
        sentinel: &redis::Client,
    ) -> RedisResult<(redis::Client, MultiplexedConnection)> {
        let config = self.config();
        let mut conn = self
            .bounded(sentinel.get_multiplexed_async_connection_with_config(&config))
            .await?;
        let address: Option<(String, u16)> = self
            .bounded(
                redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(&self.master)
                    .query_async(&mut conn),
            )
            .await?;
        let (host, port) = address.ok_or_else(|| {
            RedisError::from((
                redis::ErrorKind::Io,
                "redis sentinel: the master name is not monitored by this sentinel",
            ))
        })?;
        let client = (self.node)(&host, port)?;
        let mut master = self
            .bounded(client.get_multiplexed_async_connection_with_config(&config))
            .await?;
        let role: Vec<Value> = self
            .bounded(redis::cmd("ROLE").query_async(&mut master))
            .await?;
        match role.first() {
            Some(Value::BulkString(r)) if r.as_slice() == b"master" => Ok((client, master)),
            Some(Value::SimpleString(r)) if r == "master" => Ok((client, master)),
            _ => Err(RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
                "redis sentinel: the named node is not (yet) master",
            ))),
        }
    }

    /// `call` on the master; a failure that means the master is gone or
    /// demoted drops the connection so the next call resolves again.
    async fn on_master<T>(
        &self,
        call: impl AsyncFnOnce(&mut MultiplexedConnection) -> RedisResult<T>,
    ) -> RedisResult<T> {
        let mut conn = self.connection().await?;
        let result = self.bounded(call(&mut conn)).await;
        if let Err(error) = &result
            && node_is_gone(error)
        {
            tracing::warn!(%error, "redis sentinel: the master failed; resolving again");
            self.forget();
        }
        result
    }

    pub async fn query(&self, cmd: &redis::Cmd) -> RedisResult<Value> {
        self.on_master(async |c| c.req_packed_command(cmd).await)
            .await
    }

    pub async fn query_pipeline(
        &self,
        pipeline: &redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        self.on_master(async |c| c.req_packed_commands(pipeline, offset, count).await)
            .await
    }
}
