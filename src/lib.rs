//! # ImmersiVerse Auth Service
//!
//! One binary serving the `immersiverse.auth.v1.AuthService` gRPC API
//! (sign-up, argon2id login with lockout, EdDSA JWT access tokens, rotating
//! refresh tokens, logout and revocation, admin operations) plus an HTTP admin
//! port (health, readiness, Prometheus metrics, JWKS).
//!
//! # Layout
//!
//! * [`config`] — typed configuration: defaults, TOML file, `AUTH_*` env.
//! * [`startup`] — builds backends and services, binds listeners, serves
//!   until shutdown; [`telemetry`] sets up logs and metrics.
//! * Contexts (domain code, no transport types):
//!   * [`accounts`] — value types, argon2 hashing pool, the account store
//!     role, sign-up/login/password/admin use cases;
//!   * [`tokens`] — signing keys and JWKS, access-token issue and
//!     verification, refresh-token sessions and their store role;
//!   * [`revocation`] — token, session and per-user revocation with a moka
//!     cache in front of the shared store;
//!   * [`ratelimit`] — login lockout counters;
//!   * [`events`] — domain events written to the transactional outbox.
//! * Adapters at the edge: [`grpc`] (AuthService, error mapping to gRPC
//!   status) and [`http`] (admin port).
//! * [`storage`] — backends behind the store roles: SQL (PostgreSQL and
//!   SQLite from one implementation), Redis, and in-process memory.
//! * [`error`] — field violations and backend errors shared by the contexts.

#![forbid(unsafe_code)]

pub mod accounts;
pub mod authz;
pub mod config;
pub mod envoy;
pub mod error;
pub mod events;
pub mod grpc;
pub mod http;
pub mod ratelimit;
pub mod revocation;
pub mod startup;
pub mod storage;
pub mod telemetry;
pub mod tokens;

/// Current unix time in seconds.
pub fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}
