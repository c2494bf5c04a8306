//! Decoder language models: a Llama-architecture decoder (with an optional Qwen2-MoE-style
//! mixture-of-experts MLP) in tch, checkpoints in the Hugging Face layout, and what needs only
//! token ids (causal-LM loss, perplexity, generation with a KV cache).

pub mod config;
pub mod error;
pub mod generate;
pub mod hf;
pub mod llama;
pub mod moe;
pub mod registry;
