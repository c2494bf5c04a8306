//! The site node: the agent a hospital or bank runs next to its data.
//!
//! This crate is the node's library; the `tutela-node` binary and its coordinator client build on
//! it. What is here is the local-training core, each concern in its own module:
//!
//! - [`data`]: dataset schemas (TOML), CSV loading with errors that name file, line and column,
//!   stratified splits, non-IID site shards for demos, feature standardisation.
//! - [`models`]: the model registry (`mlp`, `cnn`) and [`models::Model`], a network with its
//!   parameters, built deterministically from a name, a [`models::ModelSpec`] and a seed.
//! - [`lm`]: decoder language models (`llama`, with an optional mixture-of-experts MLP) in tch,
//!   Hugging Face checkpoints (`config.json` + safetensors), KV-cache generation, perplexity.
//! - [`train`]: local training (SGD/Adam, FedProx) behind a [`train::GradientStep`] seam that
//!   DP-SGD will implement, and evaluation.
//! - [`weights`]: a model's parameters as named little-endian tensors (the wire format of
//!   `tutela_protocol::tensor`), loading them back with checks, safetensors files, deltas.
//!
//! On top of the core, the node itself:
//!
//! - [`config`]: `node.toml` (every key documented in `deploy/config/node.toml`).
//! - [`local`]: the site's configured datasets, loaded once, split and standardised.
//! - [`data_check`]: `tutela-node data check` and the node's check of its datasets at start.
//! - [`lm`]: text datasets for language models, read through the text protection pipeline.
//! - [`jobspec`]: what the node reads of a task's job spec and strategy settings.
//! - [`agent`]: the agent loop: connect out over mutual TLS, check each task
//!   ([`agent::TaskGate::check_task`]), initialise, evaluate and train, filter the update
//!   ([`agent::UpdateFilter`]), upload; reconnect with backoff.
//! - [`lm`]: language models (issue 17); today the byte-level BPE tokenizer
//!   ([`lm::tokenizer`]) and the check of the tokenizer a job names by digest.
//! - [`offline`]: scoring a published model (`tutela-node evaluate`, `predict`) and the
//!   centralised baseline (`tutela-node centralized`).
//!
//! Everything runs on CUDA when [`tch::Cuda::is_available`], on the CPU otherwise; see
//! [`default_device`].

pub mod agent;
pub mod approvals;
pub mod at_rest;
pub mod audit_checkpoint;
pub mod budget_identity;
pub mod config;
pub mod data;
pub mod data_check;
pub mod dataset;
pub mod dp;
pub mod dp_bench;
pub mod failure;
pub mod gpu_noise;
pub mod jobspec;
pub mod ledger;
pub mod ledger_restore;
pub mod lm;
pub mod local;
pub mod metrics;
pub mod models;
pub mod node_metrics;
pub mod offline;
pub mod resend;
pub mod site_audit;
pub mod spend_anchor;
pub mod train;
pub mod weights;

/// The device training should use: the first CUDA GPU when libtorch sees one, the CPU otherwise.
///
/// libtorch_cuda is only visible when the binary keeps libtorch in its NEEDED list, which this
/// crate's build script arranges (`--no-as-needed -ltorch`).
pub fn default_device() -> tch::Device {
    tch::Device::cuda_if_available()
}
