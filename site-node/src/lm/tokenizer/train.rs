//! Training a byte-level BPE tokenizer and writing it as a Hugging Face tokenizer directory
//! (`tutela-node tokenizer train`).
//!
//! Inputs are read streaming, so a corpus larger than memory is fine (the word counts are what
//! stays in memory). A plain text file is fed line by line, each line with its line ending, as
//! Python's `Tokenizer.train(files)` does; a JSON Lines file (`.jsonl`, `.ndjson`) is fed one
//! document at a time, the string in each object's text field. The same inputs and options give
//! the same `tokenizer.json`, byte for byte, so a consortium can rebuild the file its officers
//! approved and check its digest.
//!
//! A tokenizer's vocabulary is made of strings frequent in its corpus. Trained on a site's own
//! notes, it can hold pieces of names or identifiers that recur there, and it travels with the
//! job: train it on public text or on text already through the site's redaction, and keep
//! `min_frequency` above 1.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerBuilder,
};

use super::{SpecialTokens, TextTokenizer, TokenizerError, sha256_hex};

/// The smallest vocabulary: the 256 byte tokens (special tokens come on top).
pub const BYTE_ALPHABET: usize = 256;
/// The largest vocabulary this command trains (ids are `u32`; embedding tables this large are
/// already far beyond a site's model).
pub const MAX_VOCAB_SIZE: usize = 1 << 22;

/// What to train.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrainOptions {
    /// Ids in all: the 256 byte tokens, the special tokens and the merges learned.
    pub vocab_size: usize,
    /// A pair of tokens is merged only if it occurs at least this often.
    pub min_frequency: u64,
    pub special: SpecialTokens,
    /// The field of each JSON Lines object that holds its text.
    pub text_field: String,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            vocab_size: 4096,
            min_frequency: 2,
            special: SpecialTokens::default(),
            text_field: "text".into(),
        }
    }
}

impl TrainOptions {
    /// Checks the options; errors name the option as the command line spells it.
    pub fn validate(&self) -> Result<(), TokenizerError> {
        self.special.validate()?;
        let floor = BYTE_ALPHABET + self.special.all().len();
        if self.vocab_size < floor || self.vocab_size > MAX_VOCAB_SIZE {
            return Err(TokenizerError::Options(format!(
                "--vocab-size {} must be at least {floor} (the {BYTE_ALPHABET} byte tokens and \
                 the {} special tokens) and at most {MAX_VOCAB_SIZE}",
                self.vocab_size,
                self.special.all().len()
            )));
        }
        if self.text_field.is_empty() {
            return Err(TokenizerError::Options(
                "--text-field must not be empty".into(),
            ));
        }
        Ok(())
    }
}

/// How an input file is read, from its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputFormat {
    /// Plain UTF-8 text, fed line by line.
    Text,
    /// One JSON object a line; its text field is one document.
    JsonLines,
}

impl InputFormat {
    pub fn of(path: &Path) -> InputFormat {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
            InputFormat::JsonLines
        } else {
            InputFormat::Text
        }
    }
}

/// Where training is, for a progress display.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrainProgress {
    /// Counting words: `done` of `total` input bytes read.
    Reading { done: u64, total: u64 },
    /// Every input read; learning the merges.
    Merging,
}

/// A trained tokenizer, not yet written.
#[derive(Clone, Debug)]
pub struct Trained {
    /// The `tokenizer.json` text, exactly as written (its digest is the tokenizer's).
    pub json: String,
    pub vocab_size: usize,
    /// Lines (text) and documents (JSON Lines) read.
    pub sequences: u64,
    pub bytes: u64,
}

impl Trained {
    /// SHA-256 of [`json`](Self::json): the digest a job names this tokenizer by.
    pub fn sha256(&self) -> String {
        sha256_hex(self.json.as_bytes())
    }
}

/// Trains a byte-level BPE on `inputs`; `progress` is called as the inputs are read, then once
/// when the merges start.
pub fn train(
    inputs: &[PathBuf],
    options: &TrainOptions,
    progress: &(dyn Fn(TrainProgress) + Sync),
) -> Result<Trained, TokenizerError> {
    options.validate()?;
    if inputs.is_empty() {
        return Err(TokenizerError::Options(
            "no input: give at least one --input FILE".into(),
        ));
    }
    let mut total = 0;
    for path in inputs {
        let meta = std::fs::metadata(path).map_err(|source| TokenizerError::Io {
            path: path.clone(),
            source,
        })?;
        total += meta.len();
    }

    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::default()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(byte_level)))
    .with_decoder(Some(DecoderWrapper::ByteLevel(byte_level)))
    .build()
    .map_err(TokenizerError::library("building the tokenizer"))?;

    // Without the whole alphabet, a byte absent from the corpus would have no token (STACK.md
    // pitfall 8).
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(options.vocab_size)
        .min_frequency(options.min_frequency)
        .special_tokens(
            options
                .special
                .all()
                .into_iter()
                .map(|t| AddedToken::from(t, true))
                .collect(),
        )
        .initial_alphabet(alphabet)
        .show_progress(false)
        .build();

    let failure = Mutex::new(None);
    let mut counters = (0u64, 0u64);
    {
        let sequences = Sequences {
            inputs,
            next_input: 0,
            open: None,
            text_field: &options.text_field,
            failure: &failure,
            progress,
            done: 0,
            total,
            sequences: &mut counters,
        };
        tokenizer
            .train(&mut trainer, sequences)
            .map_err(TokenizerError::library("training"))?;
    }
    // The reader stops at the first bad input and leaves its error here; training on the part
    // before it would be a tokenizer of some other corpus.
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    progress(TrainProgress::Merging);

    let bos_id = tokenizer.token_to_id(&options.special.bos).ok_or_else(|| {
        TokenizerError::MissingSpecialToken {
            role: "bos",
            token: options.special.bos.clone(),
        }
    })?;
    let bos = options.special.bos.as_str();
    let template = TemplateProcessing::builder()
        .try_single(format!("{bos} $A"))
        .and_then(|b| b.try_pair(format!("{bos} $A {bos}:1 $B:1")))
        .map_err(|e| TokenizerError::Options(format!("the bos template: {e}")))?
        .special_tokens(vec![(bos, bos_id)])
        .build()
        .map_err(|e| TokenizerError::Options(format!("the bos template: {e}")))?;
    tokenizer.with_post_processor(Some(PostProcessorWrapper::Template(template)));
    let json = tokenizer
        .to_string(true)
        .map_err(TokenizerError::library("serializing the tokenizer"))?;
    let vocab_size = tokenizer.get_vocab_size(true);
    Ok(Trained {
        json,
        vocab_size,
        sequences: counters.0,
        bytes: counters.1,
    })
}

/// The sequences training reads from `inputs` (lines of text files with their endings, the text
/// of JSON Lines documents), in order, in memory: for tests and benchmarks that encode a corpus
/// the way it was trained on.
pub fn read_sequences(inputs: &[PathBuf], text_field: &str) -> Result<Vec<String>, TokenizerError> {
    let failure = Mutex::new(None);
    let mut counters = (0, 0);
    let sequences: Vec<String> = Sequences {
        inputs,
        next_input: 0,
        open: None,
        text_field,
        failure: &failure,
        progress: &|_| {},
        done: 0,
        total: 0,
        sequences: &mut counters,
    }
    .collect();
    match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(sequences),
    }
}

/// The training inputs as one stream of sequences. On an unreadable input it records the error
/// in `failure` and ends.
struct Sequences<'a> {
    inputs: &'a [PathBuf],
    next_input: usize,
    open: Option<OpenInput<'a>>,
    text_field: &'a str,
    failure: &'a Mutex<Option<TokenizerError>>,
    progress: &'a (dyn Fn(TrainProgress) + Sync),
    done: u64,
    total: u64,
    /// (sequences, bytes) read.
    sequences: &'a mut (u64, u64),
}

struct OpenInput<'a> {
    path: &'a Path,
    format: InputFormat,
    reader: BufReader<File>,
    line: u64,
}

/// Progress is reported when at least this many bytes were read since the last report.
const PROGRESS_STEP: u64 = 1 << 20;

impl Sequences<'_> {
    fn fail(&mut self, e: TokenizerError) -> Option<String> {
        if let Ok(mut slot) = self.failure.lock() {
            slot.get_or_insert(e);
        }
        self.next_input = self.inputs.len();
        self.open = None;
        None
    }
}

impl Iterator for Sequences<'_> {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            if self.open.is_none() {
                let path = self.inputs.get(self.next_input)?;
                self.next_input += 1;
                match File::open(path) {
                    Ok(f) => {
                        self.open = Some(OpenInput {
                            path,
                            format: InputFormat::of(path),
                            reader: BufReader::with_capacity(1 << 20, f),
                            line: 0,
                        });
                    }
                    Err(source) => {
                        return self.fail(TokenizerError::Io {
                            path: path.clone(),
                            source,
                        });
                    }
                }
            }
            let input = self.open.as_mut()?;
            let mut raw = Vec::new();
            let read = match input.reader.read_until(b'\n', &mut raw) {
                Ok(n) => n as u64,
                Err(source) => {
                    let path = input.path.to_path_buf();
                    return self.fail(TokenizerError::Io { path, source });
                }
            };
            if read == 0 {
                self.open = None;
                continue;
            }
            input.line += 1;
            let (path, line, format) = (input.path, input.line, input.format);
            let before = self.done / PROGRESS_STEP;
            self.done += read;
            self.sequences.1 += read;
            if self.done / PROGRESS_STEP != before || self.done == self.total {
                (self.progress)(TrainProgress::Reading {
                    done: self.done,
                    total: self.total,
                });
            }
            let bad = |problem: String| TokenizerError::Input {
                path: path.to_path_buf(),
                line,
                problem,
            };
            let text = match String::from_utf8(raw) {
                Ok(t) => t,
                Err(e) => {
                    let at = e.utf8_error().valid_up_to();
                    return self.fail(bad(format!("is not UTF-8 (at byte {at} of the line)")));
                }
            };
            let sequence = match format {
                InputFormat::Text => text,
                InputFormat::JsonLines => {
                    if text.trim().is_empty() {
                        continue;
                    }
                    match document_text(&text, self.text_field) {
                        Ok(t) => t,
                        Err(problem) => return self.fail(bad(problem)),
                    }
                }
            };
            self.sequences.0 += 1;
            return Some(sequence);
        }
    }
}

/// The text field of one JSON Lines object. The problem names the field, never a value.
fn document_text(line: &str, field: &str) -> Result<String, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("is not JSON: {e}"))?;
    match value {
        serde_json::Value::Object(mut map) => match map.remove(field) {
            Some(serde_json::Value::String(text)) => Ok(text),
            Some(_) => Err(format!("field {field:?} is not a string")),
            None => Err(format!(
                "has no field {field:?} (choose the text field with --text-field)"
            )),
        },
        _ => Err("is not a JSON object".into()),
    }
}

/// `tokenizer_config.json`: what `transformers.AutoTokenizer` needs beside `tokenizer.json`
/// (the control tokens by role, and `split_special_tokens` so that it, too, encodes
/// special-token strings in text as text).
pub fn tokenizer_config_json(special: &SpecialTokens) -> String {
    let mut config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special.bos,
        "eos_token": special.eos,
        "pad_token": special.pad,
        "split_special_tokens": true,
        "clean_up_tokenization_spaces": false,
    });
    if !special.extra.is_empty() {
        config["extra_special_tokens"] = serde_json::json!(special.extra);
    }
    // A `json!` object of strings and booleans always serializes.
    serde_json::to_string_pretty(&config).unwrap_or_default()
}

/// What [`write_dir`] wrote.
#[derive(Clone, Debug)]
pub struct Written {
    pub tokenizer_json: PathBuf,
    pub tokenizer_config_json: PathBuf,
    /// SHA-256 of `tokenizer.json`.
    pub sha256: String,
}

/// Writes `tokenizer.json` and `tokenizer_config.json` into `dir` (created if absent). An
/// existing `tokenizer.json` is never replaced: it may be the one a job was approved with.
/// Checks first that the tokenizer loads back with its control tokens and byte alphabet.
pub fn write_dir(
    trained: &Trained,
    special: &SpecialTokens,
    dir: &Path,
) -> Result<Written, TokenizerError> {
    TextTokenizer::from_bytes(trained.json.as_bytes(), special)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TokenizerError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tokenizer_json = dir.join("tokenizer.json");
    let tokenizer_config_json = dir.join("tokenizer_config.json");
    for path in [&tokenizer_json, &tokenizer_config_json] {
        if path.exists() {
            return Err(TokenizerError::Options(format!(
                "{} exists already; it is not replaced (it may be the tokenizer a job was \
                 approved with): choose another --output directory or remove it",
                path.display()
            )));
        }
    }
    write_new(&tokenizer_json, trained.json.as_bytes())?;
    write_new(
        &tokenizer_config_json,
        self::tokenizer_config_json(special).as_bytes(),
    )?;
    Ok(Written {
        tokenizer_json,
        tokenizer_config_json,
        sha256: trained.sha256(),
    })
}

/// Writes a file that must not exist yet, through a temporary file and a rename, so that a
/// crash leaves either no file or the whole file.
fn write_new(path: &Path, bytes: &[u8]) -> Result<(), TokenizerError> {
    let io = |source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked() {
        let mut o = TrainOptions::default();
        assert!(o.validate().is_ok());
        o.vocab_size = 258;
        let e = o.validate().unwrap_err().to_string();
        assert!(e.contains("--vocab-size 258 must be at least 259"), "{e}");
        o.vocab_size = 300;
        o.text_field.clear();
        assert!(
            o.validate()
                .unwrap_err()
                .to_string()
                .contains("--text-field")
        );
    }

    #[test]
    fn input_formats_come_from_the_name() {
        assert_eq!(
            InputFormat::of(Path::new("a/notes.JSONL")),
            InputFormat::JsonLines
        );
        assert_eq!(
            InputFormat::of(Path::new("notes.ndjson")),
            InputFormat::JsonLines
        );
        assert_eq!(InputFormat::of(Path::new("plays.txt")), InputFormat::Text);
        assert_eq!(InputFormat::of(Path::new("jsonl")), InputFormat::Text);
    }

    #[test]
    fn json_lines_problems_name_the_field_not_the_value() {
        assert_eq!(document_text(r#"{"text":"a b"}"#, "text").unwrap(), "a b");
        let e = document_text(r#"{"note":"Jane Doe"}"#, "text").unwrap_err();
        assert!(
            e.contains("no field \"text\"") && !e.contains("Jane"),
            "{e}"
        );
        let e = document_text(r#"{"text":42}"#, "text").unwrap_err();
        assert!(e.contains("not a string"), "{e}");
        assert!(document_text("[1]", "text").unwrap_err().contains("object"));
    }
}
