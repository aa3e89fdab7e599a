//! The port every backend answers for health and readiness.

use async_trait::async_trait;

use crate::error::BackendError;

/// Liveness of a backend, for health and readiness.
#[async_trait]
pub trait Ping: Send + Sync + 'static {
    async fn ping(&self) -> Result<(), BackendError>;
}
