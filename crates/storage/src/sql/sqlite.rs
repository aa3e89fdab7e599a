//! The stores on SQLite (the embedded default): the bodies in
//! `sql/{accounts,platforms,service_accounts}.rs` with `DB` = SQLite, and
//! the statements that differ on it.

pub(super) type DB = sqlx::Sqlite;
use super::SqlStore;

/// SQLite has one writer at a time and no row locks: none needed.
macro_rules! share_lock {
    () => {
        ""
    };
}
const SHARE_LOCK: &str = share_lock!();
const LEASE: &str = super::LEASE_SQLITE;
/// No cross-process notification: other processes' rows are found by
/// the relay's idle poll.
fn listen(_: &SqlStore<DB>) {}
const CLAIM: &str = super::CLAIM_SQLITE;
const CLAIM_REVOCATIONS: &str = super::CLAIM_REVOCATIONS_SQLITE;
const COOLDOWN_UPSERT: &str = super::COOLDOWN_UPSERT_SQLITE;

#[path = "accounts.rs"]
#[allow(clippy::duplicate_mod, reason = "one body, compiled once per driver")]
mod accounts;
#[path = "platforms.rs"]
#[allow(clippy::duplicate_mod, reason = "one body, compiled once per driver")]
mod platforms;
#[path = "service_accounts.rs"]
#[allow(clippy::duplicate_mod, reason = "one body, compiled once per driver")]
mod service_accounts;
