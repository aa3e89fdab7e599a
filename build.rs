//! Compiles the protobuf API with `protox` (pure Rust, no system `protoc`) and
//! writes the descriptor set (with imports) that gRPC reflection and Envoy's
//! gRPC-JSON transcoder read.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let protos = ["proto/immersiverse/auth/v1/auth.proto"];
    println!("cargo:rerun-if-changed=proto");

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(false);
    compiler.open_files(protos)?;
    let fds = compiler.file_descriptor_set();
    fs::write(out_dir.join("auth_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
