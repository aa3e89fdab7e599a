//! The `lockout` section: login failure counters.

use crate::error::{ConfigError, require};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockoutConfig {
    /// Failures allowed per (account, client IP) within the window.
    pub max_failures_per_account_ip: u32,
    /// Failures allowed per client IP, over all accounts, within the window.
    pub max_failures_per_ip: u32,
    /// Failures allowed per account, over all IPs, within the window. Higher
    /// than the per-pair limit so one IP can never lock an account out from
    /// elsewhere; it caps distributed guessing.
    pub max_failures_per_account: u32,
    pub window_secs: u64,
}

impl Default for LockoutConfig {
    fn default() -> Self {
        Self {
            max_failures_per_account_ip: 5,
            max_failures_per_ip: 20,
            max_failures_per_account: 100,
            window_secs: 60,
        }
    }
}

impl LockoutConfig {
    /// Each error names its own key, relative to this section.
    pub fn validate(&self) -> Result<(), ConfigError> {
        require(self.window_secs > 0, "window_secs", "must be positive")?;
        require(
            self.max_failures_per_account_ip > 0,
            "max_failures_per_account_ip",
            "must be positive",
        )?;
        require(
            self.max_failures_per_ip > 0,
            "max_failures_per_ip",
            "must be positive",
        )?;
        require(
            self.max_failures_per_account > 0,
            "max_failures_per_account",
            "must be positive",
        )
    }
}
