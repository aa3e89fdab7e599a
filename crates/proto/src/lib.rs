//! The generated protobuf types and gRPC stubs of the
//! `immersiverse.auth.v1` API (AuthService and the event envelope), and the
//! descriptor sets built beside them. The one module of generated code:
//! the transport adapters and the Kafka side both build on it, and nothing
//! in the domain does.

#![forbid(unsafe_code)]

tonic::include_proto!("immersiverse.auth.v1");

/// The descriptor set (with imports) for reflection and Envoy's
/// gRPC-JSON transcoder.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/auth_descriptor.bin"));

/// The descriptor set of Envoy's ext_authz v3 API
/// (`envoy.service.auth.v3`), for reflection only: its Rust types come
/// from `envoy-types`.
pub const AUTHZ_FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/authz_descriptor.bin"));
