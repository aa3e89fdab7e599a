//! Compiles the protobuf API with `protox` (pure Rust, no system `protoc`) and
//! writes the descriptor set (with imports) that gRPC reflection and Envoy's
//! gRPC-JSON transcoder read, and the descriptor set of Envoy's ext_authz
//! API for reflection.

use std::{env, fs, path::PathBuf};

/// The API's `.proto` files, at the repository's root (`proto/`).
const PROTO: &str = "../../proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // The google.rpc files are not imported by the API but belong in the
    // descriptor set: the gateway renders error details with them.
    let protos = [
        "immersiverse/auth/v1/auth.proto",
        "immersiverse/auth/v1/events.proto",
        "google/rpc/status.proto",
        "google/rpc/error_details.proto",
    ]
    .map(|p| format!("{PROTO}/{p}"));
    println!("cargo:rerun-if-changed={PROTO}");

    let mut compiler = protox::Compiler::new([PROTO])?;
    compiler.include_imports(true).include_source_info(false);
    compiler.open_files(protos)?;
    // The encoded set keeps the custom options (google.api.http) that a
    // decoded prost `FileDescriptorSet` would drop as unknown fields.
    fs::write(
        out_dir.join("auth_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    let fds = compiler.file_descriptor_set();

    // ext_authz's own API: envoy-types generates its Rust code but ships no
    // descriptor set, so reflection gets one compiled here from the vendored
    // closure of external_auth.proto (no Rust code is generated from it).
    let vendor = format!("{PROTO}/vendor");
    let mut envoy = protox::Compiler::new([vendor.as_str(), PROTO])?;
    envoy.include_imports(true).include_source_info(false);
    envoy.open_files([format!(
        "{vendor}/envoy/service/auth/v3/external_auth.proto"
    )])?;
    fs::write(
        out_dir.join("authz_descriptor.bin"),
        envoy.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
