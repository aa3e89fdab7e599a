//! The Kafka side of the ImmersiVerse Auth Service: the relay publishing
//! the transactional outbox ([`relay`]), the user-lifecycle consumer
//! ([`consumer`]), the wire envelope of both ([`envelope`]), the clients'
//! settings ([`kafka`], [`config`]), and the event worker running both,
//! by default a process of its own ([`worker`]).

#![forbid(unsafe_code)]

pub mod config;
pub mod consumer;
pub mod envelope;
pub mod kafka;
pub mod relay;
pub mod worker;

// The domain's modules, under the names this crate uses.
use auth_domain::{accounts, error, events, trace};
