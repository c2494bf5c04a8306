//! The consortium's base model for the notes demo: a byte-level BPE tokenizer and a small
//! Llama-style decoder pretrained on public text (tinyshakespeare), built once with
//! `tutela-node tokenizer train` and `tutela-node lm pretrain` and cached under a digest of
//! everything that shapes it ([`BaseRecipe::key`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};

use super::{CORPUS, run_quiet, run_step};

/// How the cached base is made. Everything here, and the corpus's bytes, is in the cache key.
struct BaseRecipe {
    vocab_size: u32,
    /// The decoder's Hugging Face config.json.
    config: &'static str,
    steps: u32,
    seq_len: u32,
    batch_size: u32,
    lr: f64,
}

/// Chosen so that the build takes one to two minutes on 2 CPU cores in a debug build, and the
/// base still scores notes far better than chance (it has learnt English spelling and layout).
const BASE: BaseRecipe = BaseRecipe {
    vocab_size: 512,
    config: r#"{"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": true, "rms_norm_eps": 1e-6, "initializer_range": 0.02}"#,
    steps: 150,
    seq_len: 64,
    batch_size: 16,
    lr: 5e-3,
};

impl BaseRecipe {
    /// SHA-256 over the recipe and the corpus, in hex: the cache entry's name.
    fn key(&self, corpus: &[u8]) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(
            format!(
                "tutela demo notes base v1\nvocab {}\nconfig {}\nsteps {} seq_len {} batch {} lr {}\n",
                self.vocab_size, self.config, self.steps, self.seq_len, self.batch_size, self.lr
            )
            .as_bytes(),
        );
        ctx.update(corpus);
        hex::encode(ctx.finish().as_ref())
    }
}

/// The cached base: its tokenizer.json and its checkpoint directory.
pub(super) struct Base {
    pub(super) tokenizer: PathBuf,
    pub(super) model: PathBuf,
}

pub(super) fn default_cache_dir() -> Result<PathBuf> {
    // tutela runs from <target>/<profile>/tutela: the cache sits beside the profiles.
    let exe = std::env::current_exe()?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .with_context(|| format!("{} has no target directory", exe.display()))?;
    Ok(target.join("demo-cache"))
}

/// The cached base for `BASE` on this corpus, built first when absent.
pub(super) fn cached_base(node: &Path, data_dir: &Path, cache_dir: &Path) -> Result<Base> {
    let corpus_path = data_dir.join(CORPUS);
    let corpus = std::fs::read(&corpus_path)
        .with_context(|| format!("cannot read {}", corpus_path.display()))?;
    let entry = cache_dir.join(format!("notes-base-{}", &BASE.key(&corpus)[..16]));
    let base = Base {
        tokenizer: entry.join("tokenizer").join("tokenizer.json"),
        model: entry.join("base"),
    };
    if base.tokenizer.is_file() && base.model.join("model.safetensors").is_file() {
        println!("base model: cached in {}", entry.display());
        return Ok(base);
    }
    // Built aside and renamed into place, so an interrupted build is never taken for a cache hit.
    let started = Instant::now();
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("cannot create {}", cache_dir.display()))?;
    let building = cache_dir.join(format!(".building-{}", std::process::id()));
    if building.exists() {
        std::fs::remove_dir_all(&building)?;
    }
    std::fs::create_dir_all(&building)?;
    println!(
        "base model: not cached; building it once (tokenizer and {} pretraining steps on {CORPUS}) into {}",
        BASE.steps,
        entry.display()
    );
    run_quiet(
        Command::new(node)
            .args(["tokenizer", "train", "--quiet", "--input"])
            .arg(&corpus_path)
            .arg("--vocab-size")
            .arg(BASE.vocab_size.to_string())
            .arg("--output")
            .arg(building.join("tokenizer")),
        "training the tokenizer",
    )?;
    let config = building.join("config.json");
    std::fs::write(&config, BASE.config)?;
    run_step(
        Command::new(node)
            .args(["lm", "pretrain", "--text"])
            .arg(&corpus_path)
            .arg("--tokenizer")
            .arg(building.join("tokenizer").join("tokenizer.json"))
            .arg("--config")
            .arg(&config)
            .arg("--output")
            .arg(building.join("base"))
            .args(["--steps", &BASE.steps.to_string()])
            .args(["--seq-len", &BASE.seq_len.to_string()])
            .args(["--batch-size", &BASE.batch_size.to_string()])
            .args(["--lr", &BASE.lr.to_string()]),
        "pretraining the base model",
    )?;
    if entry.exists() {
        std::fs::remove_dir_all(&entry)?;
    }
    std::fs::rename(&building, &entry)
        .with_context(|| format!("cannot move the built base to {}", entry.display()))?;
    println!(
        "base model: built in {:.1}s and cached",
        started.elapsed().as_secs_f64()
    );
    Ok(base)
}
