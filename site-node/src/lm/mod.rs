//! Language models at the site (issue 17): text datasets, the tokenizer, a Llama-architecture
//! decoder (with an optional Qwen2-MoE-style mixture-of-experts MLP) in tch with checkpoints in
//! the Hugging Face layout and what needs only token ids (causal-LM loss, perplexity, generation
//! with a KV cache: [`llama`], [`moe`], [`hf`], [`config`], [`generate`], [`registry`]), and
//! LoRA adapters.
//!
//! - [`text_source`]: reading documents from JSON Lines or plain text, streaming, with a bound on
//!   every line and document, and errors that name file and line locally.
//! - [`text_dataset`]: `[text_datasets.<name>]` of node.toml and [`text_dataset::TextDataset`]:
//!   `prepare` at node start (no record read), `load` through the text protection pipeline
//!   (`tutela_privacy::anonymize::text`) into protected train/validation documents in memory,
//!   with the de-identification report and a dataset commitment.
//! - [`tokenizer`]: byte-level BPE with the Hugging Face `tokenizers` crate, files Python loads
//!   unchanged, and the gate that admits a job only with the tokenizer its spec names by digest.
//! - [`lora`]: LoRA adapters on frozen Linear layers (FFA-LoRA: `A` shared and frozen, `B`
//!   trained), their PEFT files, and DP-SGD on them without a per-example loop; the decoder
//!   takes them in place of its projections (`llama::adapters`).
//! - [`round`]: the site's language-model training round as a library (the adapters of a job
//!   trained on a text dataset, DP-SGD over privacy units charged to the ledger).
//!
//! - [`base`]: the base checkpoints a site holds (node.toml `base_models`), by digest, and the
//!   check that a job's `model.base_sha256` is one of them.
//! - [`base_cache`]: the bases a site fetched from the coordinator, verified by digest before
//!   anything is kept, cached by digest encrypted at rest, bounded with LRU eviction.
//!
//! The agent runs them through its round seam (`crate::agent::language`): see
//! `docs/architecture.md`, "Site node", "Text datasets" and "LoRA adapters under DP".

pub mod base;
pub mod base_cache;
pub mod central;
pub mod config;
pub mod error;
pub mod generate;
pub mod hf;
pub mod llama;
pub mod lora;
pub mod moe;
pub mod registry;
pub mod round;
pub mod text_dataset;
pub mod text_source;
pub mod tokenizer;
