//! The stores on PostgreSQL: the bodies in `sql/{accounts,platforms,service_accounts}.rs`
//! with `DB` = PostgreSQL, and the statements that differ on it.

pub(super) type DB = sqlx::Postgres;
use super::SqlStore;

/// Reads a row held against writers until the transaction ends (a
/// macro, so statements can `concat!` it).
macro_rules! share_lock {
    () => {
        " FOR SHARE"
    };
}
const SHARE_LOCK: &str = share_lock!();
const LEASE: &str = super::LEASE_POSTGRES;
fn listen(store: &SqlStore<DB>) {
    super::listen_postgres(store);
}
const CLAIM: &str = super::CLAIM_POSTGRES;
const CLAIM_REVOCATIONS: &str = super::CLAIM_REVOCATIONS_POSTGRES;
const COOLDOWN_UPSERT: &str = super::COOLDOWN_UPSERT_POSTGRES;

#[path = "accounts.rs"]
#[allow(clippy::duplicate_mod, reason = "one body, compiled once per driver")]
mod accounts;
#[path = "platforms.rs"]
#[allow(clippy::duplicate_mod, reason = "one body, compiled once per driver")]
mod platforms;
#[path = "service_accounts.rs"]
#[allow(clippy::duplicate_mod, reason = "one body, compiled once per driver")]
mod service_accounts;
