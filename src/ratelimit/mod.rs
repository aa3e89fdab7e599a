//! Rate limits. This module: login lockout. [`quota`]: request rate limits for
//! ext_authz.
//!
//! Login lockout: failed password attempts are counted in fixed windows
//! (`lockout.window_secs`, starting at the first failure) under three keys:
//!
//! * the (account, client IP) pair, limit `max_failures_per_account_ip` (5):
//!   the ordinary guard. Because it is per pair, an attacker's IP can only
//!   lock the account *from that IP*; the owner elsewhere is unaffected;
//! * the client IP, limit `max_failures_per_ip` (20): one IP spraying many
//!   accounts;
//! * the account, limit `max_failures_per_account` (100): many IPs guessing
//!   one account. It is far above what one IP can contribute before its own
//!   IP limit stops it, so a single IP can never trigger it.
//!
//! Every lock ends when its window does; none outlives the attack by more
//! than one window. Counters are keyed by the *login name as typed*
//! (normalised and hashed), not by the user id, so locking behaves the same
//! for accounts that do not exist and reveals nothing.

pub mod quota;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use crate::{accounts::model::LoginName, config::LockoutConfig, error::BackendError};

/// Shared failure counters (Redis in production, in process otherwise).
#[async_trait]
pub trait FailureCounter: Send + Sync + 'static {
    /// For each key: failures in its current window and the time until that
    /// window ends (zero when there is none).
    async fn counts(&self, keys: &[String]) -> Result<Vec<(u32, Duration)>, BackendError>;
    /// One more failure under every key; a key's window starts at its first.
    async fn add_failure(&self, keys: &[String], window: Duration) -> Result<(), BackendError>;
    async fn clear(&self, key: &str) -> Result<(), BackendError>;
}

#[derive(Debug, thiserror::Error)]
pub enum LockoutError {
    #[error("too many failed logins; retry after {retry_after:?}")]
    Locked { retry_after: Duration },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

#[derive(Clone)]
pub struct LoginLockout {
    counter: Arc<dyn FailureCounter>,
    config: LockoutConfig,
}

struct Keys {
    pair: String,
    ip: String,
    account: String,
}

impl Keys {
    fn all(&self) -> [String; 3] {
        [self.pair.clone(), self.ip.clone(), self.account.clone()]
    }
}

impl LoginLockout {
    pub fn new(counter: Arc<dyn FailureCounter>, config: LockoutConfig) -> Self {
        Self { counter, config }
    }

    fn keys(login: &LoginName, client_ip: &str) -> Keys {
        // The login name is hashed so counter keys do not store emails.
        let account = hex::encode(&Sha256::digest(login.as_str().as_bytes())[..16]);
        Keys {
            pair: format!("lf:pair:{account}:{client_ip}"),
            ip: format!("lf:ip:{client_ip}"),
            account: format!("lf:acct:{account}"),
        }
    }

    /// Refuses the attempt while any of its keys is at its limit.
    pub async fn check(&self, login: &LoginName, client_ip: &str) -> Result<(), LockoutError> {
        let keys = Self::keys(login, client_ip);
        let counts = self.counter.counts(&keys.all()).await?;
        let limits = [
            self.config.max_failures_per_account_ip,
            self.config.max_failures_per_ip,
            self.config.max_failures_per_account,
        ];
        let retry_after = counts
            .iter()
            .zip(limits)
            .filter(|((count, _), limit)| count >= limit)
            .map(|((_, left), _)| *left)
            .max();
        match retry_after {
            Some(left) => Err(LockoutError::Locked {
                retry_after: left.max(Duration::from_secs(1)),
            }),
            None => Ok(()),
        }
    }

    pub async fn record_failure(
        &self,
        login: &LoginName,
        client_ip: &str,
    ) -> Result<(), BackendError> {
        let keys = Self::keys(login, client_ip);
        self.counter
            .add_failure(&keys.all(), Duration::from_secs(self.config.window_secs))
            .await
    }

    /// A correct password clears the pair counter (not the IP or account
    /// ones: a success must not reset an attack in progress elsewhere).
    pub async fn record_success(
        &self,
        login: &LoginName,
        client_ip: &str,
    ) -> Result<(), BackendError> {
        self.counter.clear(&Self::keys(login, client_ip).pair).await
    }
}
