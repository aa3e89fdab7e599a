//! The one integration-test binary: the real server over gRPC on port 0,
//! against SQLite + in-process state and against PostgreSQL + Redis.

mod support;

mod accounts;
mod adversarial;
mod adversarial_low;
mod authz;
mod edge;
mod events_worker;
mod fake_platform;
mod fuzz;
mod gateway;
mod k8s;
mod kafka;
mod operations;
mod overload;
mod platforms;
mod process;
mod redis_cluster;
mod redis_sentinel;
mod revocation_feed;
mod service_accounts;
mod stack;
mod store_contract;
mod tls;
mod tokens;
mod traces;
