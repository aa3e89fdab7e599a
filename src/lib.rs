//! # ImmersiVerse Auth Service
//!
//! One binary serving the `immersiverse.auth.v1.AuthService` gRPC API
//! (sign-up, argon2id login with lockout, EdDSA JWT access tokens, rotating
//! refresh tokens, logout and revocation, admin operations), Envoy's ext_authz
//! v3 `Check` (so the gateway and every sidecar authorize each request), an
//! HTTP admin port (health, readiness, Prometheus metrics, JWKS), and the
//! Kafka side: an outbox relay publishing domain events and a consumer of
//! user-lifecycle events.
//!
//! # Layout
//!
//! A workspace whose layers the compiler keeps (each crate depends only on
//! those below it):
//!
//! | crate | what | depends on |
//! |---|---|---|
//! | `auth-proto` (`crates/proto`) | generated protobuf types, descriptor sets | — |
//! | `auth-domain` (`crates/domain`) | the kernel: contexts, domain events, store ports | — |
//! | `auth-storage` (`crates/storage`) | SQL, Redis and memory stores | domain |
//! | `auth-kafka` (`crates/kafka`) | outbox relay, lifecycle consumer, event worker | domain, proto |
//! | `auth-api` (`crates/api`) | gRPC, ext_authz, ECDS, HTTP, TLS adapters | domain, proto |
//! | `auth-platform-http` (`crates/platform-http`) | the streaming platforms' OAuth and API calls over HTTP | domain |
//! | `auth-service` (this crate) | the composition root: configuration, start-up, telemetry | all |
//!
//! This crate assembles them: [`config`] (each component's section,
//! loaded from file and environment and validated), [`startup`] (builds
//! backends and services, binds listeners, serves until shutdown, its
//! background tasks supervised by [`background`]) and [`telemetry`] (logs,
//! metrics, the trace exporter). The other crates' modules are re-exported
//! under their old names, so `auth_service::accounts` is
//! `auth_domain::accounts`.

#![forbid(unsafe_code)]

pub mod background;
pub mod config;
pub mod reload;
pub mod startup;
pub mod telemetry;

pub use auth_api::{bearer, client_ip, edge, envoy, grpc, http, tls};
pub use auth_domain::{
    accounts, authz, child_span, error, now_micros, pause, platforms, ratelimit, revocation,
    tokens, unix_now,
};
pub use auth_platform_http as platform_http;
pub use auth_proto as proto;
pub use auth_storage as storage;

/// Domain events ([`auth_domain::events`]) and the Kafka side
/// ([`auth_kafka`]) under one name.
pub mod events {
    pub use auth_domain::events::*;
    pub use auth_kafka::{config, consumer, envelope, kafka, relay, worker};
}
