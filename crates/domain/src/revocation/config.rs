//! The `revocation` section: the local cache and the revocation log.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationConfig {
    /// How long a replica may answer "not revoked" from its own cache before
    /// asking the shared store again. Revocations made on this replica are
    /// visible at once; this bounds how stale another replica's view can be.
    pub cache_ttl_ms: u64,
    /// Entries in the revocation cache.
    pub cache_capacity: u64,
    /// How long WatchRevocations can resume from: older log rows are
    /// deleted (hourly), and a cursor before them is refused.
    pub log_retention_secs: u64,
}

impl Default for RevocationConfig {
    fn default() -> Self {
        Self {
            cache_ttl_ms: 1000,
            cache_capacity: 1_000_000,
            log_retention_secs: 7 * 24 * 3600,
        }
    }
}
