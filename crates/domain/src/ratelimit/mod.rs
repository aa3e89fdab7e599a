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
//! A login that presents a valid device token for the account (a device
//! that logged in to it before) is counted only under its own (account,
//! device) key, with the per-pair limit: failures from elsewhere — a
//! distributed guessing run that locked the account or the IP — do not lock
//! out the owner's own devices.
//!
//! An attempt is counted as a failure *before* its password is hashed
//! ([`LoginLockout::reserve`]): the counters are incremented first, and an
//! attempt that took a counter past its limit is refused (and its increment
//! taken back). So parallel attempts cannot all pass a check made at the
//! same count: of eight wrong logins sent at once when the limit has room
//! for one more, exactly one is hashed. A success clears the attempt's own
//! counter and takes its increment back from the others; an attempt that
//! was admitted but not tried (hashing at capacity) takes it back from all.
//!
//! Every secret check of the service goes through the same lockout with its
//! own subject (`Subject`): logins by the login name as typed, a password
//! change's `current_password` by the account.
//!
//! Every lock ends when its window does; none outlives the attack by more
//! than one window. Counters are keyed by the *login name as typed*
//! (normalised and hashed), not by the user id, so locking behaves the same
//! for accounts that do not exist and reveals nothing.

pub mod config;
pub mod quota;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use crate::{error::BackendError, model::account::LoginName};
pub use config::LockoutConfig;

/// Shared failure counters (Redis in production, in process otherwise).
#[async_trait]
pub trait FailureCounter: Send + Sync + 'static {
    /// For each key: failures in its current window and the time until that
    /// window ends (zero when there is none).
    async fn counts(&self, keys: &[String]) -> Result<Vec<(u32, Duration)>, BackendError>;
    /// One more failure under every key; a key's window starts at its
    /// first. Returns each key's count after the increment and the time
    /// left in its window.
    async fn add_failure(
        &self,
        keys: &[String],
        window: Duration,
    ) -> Result<Vec<(u32, Duration)>, BackendError>;
    /// Takes one failure back from every key that still counts one.
    async fn remove_failure(&self, keys: &[String]) -> Result<(), BackendError>;
    async fn clear(&self, key: &str) -> Result<(), BackendError>;
}

#[derive(Debug, thiserror::Error)]
pub enum LockoutError {
    #[error("too many failed logins; retry after {retry_after:?}")]
    Locked { retry_after: Duration },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// What a secret check is about, as the lockout counts it: a login name
/// as typed, or another secret's owner (a service account's id).
pub trait Subject {
    fn subject(&self) -> &str;
}

impl Subject for LoginName {
    fn subject(&self) -> &str {
        self.as_str()
    }
}

/// The secret of a service account: counted under its own subject, apart
/// from any login name.
pub struct ServiceSecret<'a>(pub &'a str);

impl Subject for ServiceSecret<'_> {
    fn subject(&self) -> &str {
        self.0
    }
}

/// `ip` as the lockout counts it: an IPv6 address (not IPv4-mapped) by its
/// /64, anything else as it is.
fn network_of(ip: &str) -> std::borrow::Cow<'_, str> {
    match ip.parse::<std::net::Ipv6Addr>() {
        Ok(v6) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            std::borrow::Cow::Owned(format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3]))
        }
        _ => std::borrow::Cow::Borrowed(ip),
    }
}

#[derive(Clone)]
pub struct LoginLockout {
    counter: Arc<dyn FailureCounter>,
    config: LockoutConfig,
}

/// Who is attempting a login, as far as lockout is concerned.
#[derive(Debug, Clone, Copy)]
pub enum Attempt<'a> {
    /// From this client address.
    From(&'a str),
    /// From a device known to the account (a valid device token).
    KnownDevice(uuid::Uuid),
}

/// The counters an attempt is checked against, with their limits. The
/// first is the attempt's own (the pair, or the device): the one a success
/// clears.
struct Keys(Vec<(String, u32)>);

impl LoginLockout {
    pub fn new(counter: Arc<dyn FailureCounter>, config: LockoutConfig) -> Self {
        Self { counter, config }
    }

    fn account_key(subject: &str) -> String {
        // The subject is hashed so counter keys do not store emails.
        hex::encode(&Sha256::digest(subject.as_bytes())[..16])
    }

    fn keys(&self, login: &impl Subject, attempt: Attempt<'_>) -> Keys {
        let account = Self::account_key(login.subject());
        let network;
        let attempt = match attempt {
            // One IPv6 host holds a whole /64: counted as one address.
            Attempt::From(ip) => {
                network = network_of(ip);
                Attempt::From(network.as_ref())
            }
            other => other,
        };
        let c = &self.config;
        Keys(match attempt {
            Attempt::From(client_ip) => vec![
                (
                    format!("lf:pair:{account}:{client_ip}"),
                    c.max_failures_per_account_ip,
                ),
                (format!("lf:ip:{client_ip}"), c.max_failures_per_ip),
                (format!("lf:acct:{account}"), c.max_failures_per_account),
            ],
            Attempt::KnownDevice(device) => vec![(
                format!("lf:dev:{account}:{device}"),
                c.max_failures_per_account_ip,
            )],
        })
    }

    fn names(keys: &Keys) -> Vec<String> {
        keys.0.iter().map(|(k, _)| k.clone()).collect()
    }

    /// Counts the attempt as a failure before it is tried, and refuses it
    /// when that took any of its counters past its limit (taking the
    /// increment back, so refused attempts do not add up elsewhere, e.g. on
    /// the account-wide counter). An admitted attempt stays counted as a
    /// failure unless [`Self::record_success`] follows.
    pub async fn reserve(
        &self,
        login: &impl Subject,
        attempt: Attempt<'_>,
    ) -> Result<(), LockoutError> {
        let keys = self.keys(login, attempt);
        let names = Self::names(&keys);
        let counts = self
            .counter
            .add_failure(&names, Duration::from_secs(self.config.window_secs))
            .await?;
        let retry_after = counts
            .iter()
            .zip(&keys.0)
            .filter(|((count, _), (_, limit))| count > limit)
            .map(|((_, left), _)| *left)
            .max();
        match retry_after {
            Some(left) => {
                self.counter.remove_failure(&names).await?;
                Err(LockoutError::Locked {
                    retry_after: left.max(Duration::from_secs(1)),
                })
            }
            None => Ok(()),
        }
    }

    /// Takes back the failure [`Self::reserve`] counted for an attempt that
    /// was then not tried (refused for capacity before hashing).
    pub async fn release(
        &self,
        login: &impl Subject,
        attempt: Attempt<'_>,
    ) -> Result<(), BackendError> {
        let keys = self.keys(login, attempt);
        self.counter.remove_failure(&Self::names(&keys)).await
    }

    /// Refuses the attempt while any of its keys is at its limit (a check
    /// only: see [`Self::reserve`] for an attempt that will be tried).
    pub async fn check(
        &self,
        login: &impl Subject,
        attempt: Attempt<'_>,
    ) -> Result<(), LockoutError> {
        let keys = self.keys(login, attempt);
        let counts = self.counter.counts(&Self::names(&keys)).await?;
        let retry_after = counts
            .iter()
            .zip(&keys.0)
            .filter(|((count, _), (_, limit))| count >= limit)
            .map(|((_, left), _)| *left)
            .max();
        match retry_after {
            Some(left) => Err(LockoutError::Locked {
                retry_after: left.max(Duration::from_secs(1)),
            }),
            None => Ok(()),
        }
    }

    /// A correct password clears the attempt's own counter (the pair, or
    /// the device), and takes its reserved failure back from the IP and
    /// account ones (not more: a success must not reset an attack in
    /// progress elsewhere).
    pub async fn record_success(
        &self,
        login: &impl Subject,
        attempt: Attempt<'_>,
    ) -> Result<(), BackendError> {
        let keys = self.keys(login, attempt);
        self.counter.clear(&keys.0[0].0).await?;
        let others: Vec<String> = keys.0[1..].iter().map(|(k, _)| k.clone()).collect();
        if others.is_empty() {
            return Ok(());
        }
        self.counter.remove_failure(&others).await
    }
}

#[cfg(test)]
mod tests {
    use super::network_of;

    #[test]
    fn an_ipv6_host_is_counted_by_its_slash_64() {
        assert_eq!(network_of("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(network_of("2001:db8:1:2:bbbb::9"), "2001:db8:1:2::/64");
        assert_eq!(network_of("203.0.113.7"), "203.0.113.7");
        assert_eq!(network_of("::ffff:203.0.113.7"), "::ffff:203.0.113.7");
        assert_eq!(network_of("unknown"), "unknown");
    }
}
