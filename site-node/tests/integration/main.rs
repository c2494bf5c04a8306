//! Integration tests of the site node: agent, data, DP-SGD, keys, language models, LoRA, models,
//! data protection, site data (feature types, sources, the data check), text datasets, the
//! tokenizer, training, weights, consortium statistics from site data, and its readers on the
//! fuzz corpus.
//!
//! One test binary for the crate, with a module per area: every integration-test binary links the
//! whole dependency tree, so one instead of several keeps the clean build's link time and disk
//! use down (CI runs on 2 cores with a bounded disk).

mod agent;
mod base_cache;
mod base_fetch;
mod budget_keys;
mod common;
mod config_ranges;
mod data;
mod data_stays_home;
mod dp;
mod fed_stats;
mod fuzz_corpus;
mod gpu_noise;
mod job_check;
mod keys;
mod lm;
mod lm_adapters;
mod lm_admission;
mod lm_round;
mod lora;
mod models;
mod protection;
mod site_data;
mod text_data;
mod tokenizer;
mod training;
mod watermark;
mod weights;
