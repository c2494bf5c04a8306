//! Compiles the `.proto` files with protox (pure Rust, so no `protoc` binary is needed anywhere)
//! and generates the tonic code. The encoded file descriptor set is kept for gRPC server reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/tutela/v1/tensor.proto",
        "proto/tutela/v1/transport.proto",
        "proto/tutela/v1/federation.proto",
        "proto/tutela/v1/audit.proto",
        "proto/tutela/v1/registry.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds_bytes = prost::Message::encode_to_vec(&fds);
    std::fs::write(out.join("tutela_descriptor.bin"), fds_bytes)?;
    tonic_prost_build::configure()
        // Clients connect through tutela_protocol::client (mutual TLS), never tonic's plain
        // `connect`, which would also clash with the Federation.Connect RPC.
        .build_transport(false)
        // Tensor payloads are `bytes::Bytes`, so a received chunk is sliced from the HTTP/2 frame
        // buffer instead of copied into a fresh Vec.
        .bytes(".tutela.v1.TensorChunk.data")
        .compile_fds(fds)?;
    Ok(())
}
