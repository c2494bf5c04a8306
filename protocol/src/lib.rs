//! The Tutela wire protocol and its security spine.
//!
//! - [`identity`]: principals and their SPIFFE-style identities.
//! - [`pki`]: the consortium CA: issuing, signing CSRs, revoking, CRLs (rcgen).
//! - [`tls`]: rustls server and client configurations (TLS 1.3 only, mutual authentication,
//!   revocation), reloaded from disk without a restart.
//! - [`health`]: the in-container probe of a server's gRPC health over its own mutual TLS.
//! - [`server`] and [`client`]: serving tonic services over that TLS with the caller's verified
//!   identity handed to every handler, and connecting to them.
//! - [`stream`]: chunked tensor streaming with an end-to-end SHA-256 digest.
//! - [`pb`]: the generated protobuf and gRPC code.
//! - `fuzzing` (feature `fuzzing`): the fuzz harnesses that `fuzz/` runs and the tests replay.
//! - [`lora`]: LoRA adapters as jobs state them and as they travel (PEFT names, FFA-LoRA's shared `A`).
//! - [`checkpoint`]: Hugging Face checkpoints tensor by tensor: LoRA merge, INT8 export and loader.
//! - [`checkpoint_digest`]: the digest that names a Hugging Face checkpoint (one implementation for
//!   the CLI, the coordinator and the site node).
//! - [`release`]: staged release of published models: stages, moves, the signed move message.
//! - [`base_model`]: a job's base checkpoint on the wire (upload by the operator, fetch by a site).
//! - [`secagg`]: SecAgg+ secure aggregation with dropout recovery, as typed client and server
//!   states (no network), and the sites' encoding for it (clipping, randomized rounding, distributed
//!   discrete Gaussian noise).

pub mod base_model;
pub mod bench;
pub mod canonical;
pub mod checkpoint;
pub mod checkpoint_digest;
pub mod client;
pub mod config_path;
pub mod config_range;
pub mod database;
pub mod federation;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod health;
pub mod human;
pub mod identity;
pub mod initial_model;
pub mod job;
pub mod logging;
pub mod lora;
pub mod metrics;
pub mod model_registry;
pub mod peft_export;
pub mod pki;
pub mod refusal;
pub mod release;
pub mod secagg;
pub mod server;
pub mod services;
pub mod stream;
pub mod tensor;
pub mod tls;
pub mod update_filter;
pub mod watermark;

/// Generated protobuf messages and tonic services of package `tutela.v1`.
pub mod pb {
    tonic::include_proto!("tutela.v1");
}

/// The encoded file descriptor set of every `.proto` file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tutela_descriptor.bin"));

pub use identity::{Identity, Principal, Role};
