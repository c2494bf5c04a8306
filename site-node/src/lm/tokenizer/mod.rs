//! The site's tokenizer: byte-level BPE with the Hugging Face `tokenizers` crate, stored as the
//! `tokenizer.json` that Python's `tokenizers` and `transformers` load unchanged.
//!
//! - [`train`]: training from text files or JSON Lines (`tutela-node tokenizer train`), writing
//!   `tokenizer.json` and the `tokenizer_config.json` that `transformers.AutoTokenizer` needs.
//! - [`TextTokenizer`]: a loaded tokenizer and its control tokens (bos, eos, pad): text ⇄ ids,
//!   byte-exact decoding, and padded batches with attention masks ([`batch`]).
//! - [`site`]: the tokenizer files a site holds, matched against the SHA-256 digest a job names
//!   (`[model] tokenizer_sha256`) before the node reads any data.
//!
//! # The choices, and why
//!
//! - **Byte level, with the whole byte alphabet.** Every one of the 256 byte values has a token
//!   of its own whatever the training text held, so any UTF-8 text encodes (no unknown token,
//!   nothing silently dropped) and decodes back to the same bytes. [`TextTokenizer::from_bytes`]
//!   refuses a tokenizer that lacks one.
//! - **Site text never becomes a control id.** A note that contains the string `<|eos|>` must not
//!   end a sequence, nor a crafted one inject a control token: every [`TextTokenizer`] encodes
//!   special-token strings as ordinary text (`encode_special_tokens`). That setting is not part of
//!   `tokenizer.json`, so `tokenizer_config.json` says `split_special_tokens = true`, which makes
//!   `transformers` do the same.
//! - **A beginning-of-sequence token, as Llama's.** The post-processor is the template
//!   `<|bos|> $A`: [`TextTokenizer::encode_prompt`], Python's `Tokenizer.encode(text)` and
//!   `AutoTokenizer(text)` all give the same ids, bos first. A training document also ends with
//!   eos ([`TextTokenizer::encode_document`]), so the model learns where a note stops.
//! - **The roles of the control tokens are a convention** ([`SpecialTokens`], `<|bos|>`,
//!   `<|eos|>`, `<|pad|>` by default), not read from `tokenizer_config.json`: the job approves
//!   the digest of `tokenizer.json` only, and nothing that changes what the model sees may come
//!   from an unapproved file.

pub mod batch;
pub mod bench;
pub mod site;
pub mod train;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tokenizers::Tokenizer;

pub use batch::Batch;

/// What a tokenizer operation could not do. Paths are the site's own (these errors are shown
/// at the site, by the CLI or in its log); a task's refusal uses [`site::TokenizerRefusal`],
/// which carries none.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A training input that cannot be read as the format its name says.
    #[error("{}: line {line}: {problem}", .path.display())]
    Input {
        path: PathBuf,
        line: u64,
        problem: String,
    },
    /// An option out of its range, naming the option.
    #[error("{0}")]
    Options(String),
    /// An error of the `tokenizers` library, with what we were doing.
    #[error("{what}: {source}")]
    Library {
        what: String,
        #[source]
        source: tokenizers::Error,
    },
    #[error(
        "the tokenizer has no special token {token:?} for its {role} token (train it with that \
         token, or name the one it has)"
    )]
    MissingSpecialToken { role: &'static str, token: String },
    #[error(
        "the tokenizer is not byte-complete: byte 0x{byte:02x} has no token of its own, so some \
         text could not be encoded; train it with `tutela-node tokenizer train`, which keeps \
         the whole byte alphabet"
    )]
    NotByteComplete { byte: u8 },
    #[error("token id {id} is not in the tokenizer's vocabulary of {vocab_size}")]
    UnknownId { id: u32, vocab_size: usize },
}

impl TokenizerError {
    fn library(what: impl Into<String>) -> impl FnOnce(tokenizers::Error) -> TokenizerError {
        let what = what.into();
        move |source| TokenizerError::Library { what, source }
    }
}

/// The control tokens of a tokenizer by role, and any other special tokens it carries.
///
/// Special tokens take the first ids, in the order of [`SpecialTokens::all`]: bos 0, eos 1,
/// pad 2 with the defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning of a sequence: the post-processor puts it first.
    pub bos: String,
    /// End of a document.
    pub eos: String,
    /// Padding, masked out by the attention mask.
    pub pad: String,
    /// Further special tokens (e.g. a separator for a later chat format), after the three.
    pub extra: Vec<String>,
}

impl Default for SpecialTokens {
    fn default() -> Self {
        SpecialTokens {
            bos: "<|bos|>".into(),
            eos: "<|eos|>".into(),
            pad: "<|pad|>".into(),
            extra: Vec::new(),
        }
    }
}

/// The longest special token, in bytes.
const MAX_SPECIAL_TOKEN_BYTES: usize = 64;

impl SpecialTokens {
    /// bos, eos, pad, then the extra tokens: the order of their ids.
    pub fn all(&self) -> Vec<&str> {
        let mut all = vec![self.bos.as_str(), self.eos.as_str(), self.pad.as_str()];
        all.extend(self.extra.iter().map(String::as_str));
        all
    }

    /// Each token is 1 to 64 bytes without whitespace (the post-processor's template is split on
    /// whitespace) and does not start with `$` (a template variable); no two are equal.
    pub fn validate(&self) -> Result<(), TokenizerError> {
        let all = self.all();
        for (i, token) in all.iter().enumerate() {
            let problem = if token.is_empty() || token.len() > MAX_SPECIAL_TOKEN_BYTES {
                Some(format!("must be 1 to {MAX_SPECIAL_TOKEN_BYTES} bytes"))
            } else if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                Some("must not contain whitespace or control characters".to_string())
            } else if token.starts_with('$') {
                Some("must not start with '$'".to_string())
            } else if all[..i].contains(token) {
                Some("is given twice (bos, eos, pad and the extra tokens must differ)".to_string())
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(TokenizerError::Options(format!(
                    "special token {token:?} {problem}"
                )));
            }
        }
        Ok(())
    }
}

/// The GPT-2 byte-level alphabet: the printable character standing for each byte value in a
/// byte-level token (printable bytes stand for themselves; the others are shifted past U+00FF).
/// The same table as `tokenizers`' ByteLevel, which does not export it.
fn byte_chars() -> &'static [char; 256] {
    static TABLE: OnceLock<[char; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u32| {
            (u32::from(b'!')..=u32::from(b'~')).contains(&b)
                || (0xA1..=0xAC).contains(&b)
                || (0xAE..=0xFF).contains(&b)
        };
        let mut table = ['\0'; 256];
        let mut shifted = 0u32;
        for (b, slot) in table.iter_mut().enumerate() {
            let b = b as u32;
            let code = if printable(b) {
                b
            } else {
                shifted += 1;
                255 + shifted
            };
            *slot = char::from_u32(code).unwrap_or('\u{FFFD}');
        }
        table
    })
}

fn char_bytes() -> &'static HashMap<char, u8> {
    static MAP: OnceLock<HashMap<char, u8>> = OnceLock::new();
    MAP.get_or_init(|| {
        byte_chars()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect()
    })
}

/// SHA-256 of `bytes` as 64 lowercase hex digits, the spelling of every digest in a job spec.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

/// SHA-256 of a file's bytes: the digest a job names a tokenizer by.
pub fn file_sha256_hex(path: &Path) -> Result<String, TokenizerError> {
    let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(sha256_hex(&bytes))
}

/// Parses a `tokenizer.json` and checks that every byte value has a token of its own.
pub fn check_tokenizer_json(json: &[u8]) -> Result<(), TokenizerError> {
    let tokenizer =
        Tokenizer::from_bytes(json).map_err(TokenizerError::library("reading tokenizer.json"))?;
    check_byte_complete(&tokenizer)
}

fn check_byte_complete(tokenizer: &Tokenizer) -> Result<(), TokenizerError> {
    match byte_chars()
        .iter()
        .position(|c| tokenizer.token_to_id(&c.to_string()).is_none())
    {
        Some(byte) => Err(TokenizerError::NotByteComplete { byte: byte as u8 }),
        None => Ok(()),
    }
}

/// A loaded byte-level tokenizer with the ids of its control tokens; encodes site text with
/// special-token strings as plain text.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    special: SpecialTokens,
    bos: u32,
    eos: u32,
    pad: u32,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .finish()
    }
}

impl TextTokenizer {
    /// Loads a `tokenizer.json`'s text; `special` names the control tokens it must have.
    pub fn from_bytes(
        json: &[u8],
        special: &SpecialTokens,
    ) -> Result<TextTokenizer, TokenizerError> {
        let mut inner = Tokenizer::from_bytes(json)
            .map_err(TokenizerError::library("reading tokenizer.json"))?;
        // Not stored in tokenizer.json: set on every load (see the module doc).
        inner.set_encode_special_tokens(true);
        let id = |role: &'static str, token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| TokenizerError::MissingSpecialToken {
                    role,
                    token: token.to_string(),
                })
        };
        let (bos, eos, pad) = (
            id("bos", &special.bos)?,
            id("eos", &special.eos)?,
            id("pad", &special.pad)?,
        );
        check_byte_complete(&inner)?;
        Ok(TextTokenizer {
            inner,
            special: special.clone(),
            bos,
            eos,
            pad,
        })
    }

    /// Loads a `tokenizer.json` file.
    pub fn from_file(
        path: &Path,
        special: &SpecialTokens,
    ) -> Result<TextTokenizer, TokenizerError> {
        let json = std::fs::read(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&json, special)
    }

    /// The number of ids, special tokens included: the model's embedding rows.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Whether `id` is one of the special tokens (control ids text never encodes to).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .id_to_token(id)
            .is_some_and(|t| self.special.all().contains(&t.as_str()))
    }

    /// The `tokenizers` tokenizer itself, for what this type does not wrap.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// The ids of `text` alone, with no control token.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(TokenizerError::library("encoding"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// bos, then the ids of `text`: what Python's `Tokenizer.encode(text)` and
    /// `AutoTokenizer(text)` give, and what a model is prompted with.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode_fast(text, true)
            .map_err(TokenizerError::library("encoding"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// A training document: bos, the ids of `text`, eos.
    pub fn encode_document(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = self.encode_prompt(text)?;
        ids.push(self.eos);
        Ok(ids)
    }

    /// The ids of each text, with no control token, encoded in parallel.
    pub fn encode_many(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, TokenizerError> {
        let encodings = self
            .inner
            .encode_batch_fast(texts.to_vec(), false)
            .map_err(TokenizerError::library("encoding"))?;
        Ok(encodings.iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Training documents ([`encode_document`](Self::encode_document) each), padded on the right
    /// to the longest (or cut to `max_len` ids), with attention masks.
    pub fn batch(&self, texts: &[&str], max_len: Option<usize>) -> Result<Batch, TokenizerError> {
        let documents = texts
            .iter()
            .map(|t| self.encode_document(t))
            .collect::<Result<Vec<_>, _>>()?;
        batch::pad(&documents, self.pad, max_len)
    }

    /// The text of `ids`; with `skip_special`, control tokens are left out. Bytes that are not
    /// whole UTF-8 (a sequence cut inside a character) become U+FFFD: use
    /// [`decode_bytes`](Self::decode_bytes) to keep them.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.check_ids(ids)?;
        self.inner
            .decode(ids, skip_special)
            .map_err(TokenizerError::library("decoding"))
    }

    /// The exact bytes `ids` stand for (special tokens as their text), even when they end
    /// inside a UTF-8 character: what streaming generation needs.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>, TokenizerError> {
        let mut out = Vec::new();
        for &id in ids {
            let token = self
                .inner
                .id_to_token(id)
                .ok_or(TokenizerError::UnknownId {
                    id,
                    vocab_size: self.vocab_size(),
                })?;
            if self.special.all().contains(&token.as_str()) {
                out.extend_from_slice(token.as_bytes());
                continue;
            }
            for c in token.chars() {
                match char_bytes().get(&c) {
                    Some(&b) => out.push(b),
                    // Only an added non-special token can hold other characters: its text as is.
                    None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
        }
        Ok(out)
    }

    /// The id of the token that stands for byte `b` alone.
    pub fn byte_id(&self, b: u8) -> u32 {
        // `from_bytes` checked that every byte has a token.
        self.inner
            .token_to_id(&byte_chars()[usize::from(b)].to_string())
            .unwrap_or(self.pad)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<(), TokenizerError> {
        let vocab_size = self.vocab_size();
        match ids.iter().find(|&&id| id as usize >= vocab_size) {
            Some(&id) => Err(TokenizerError::UnknownId { id, vocab_size }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_table_is_the_byte_level_alphabet() {
        let ours: std::collections::HashSet<char> = byte_chars().iter().copied().collect();
        let theirs: std::collections::HashSet<char> =
            tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
                .into_iter()
                .collect();
        assert_eq!(ours.len(), 256);
        assert_eq!(ours, theirs);
        assert_eq!(byte_chars()[usize::from(b'a')], 'a');
        assert_eq!(byte_chars()[usize::from(b' ')], 'Ġ');
        assert_eq!(byte_chars()[usize::from(b'\n')], 'Ċ');
    }

    #[test]
    fn special_tokens_are_checked() {
        assert!(SpecialTokens::default().validate().is_ok());
        let with = |f: fn(&mut SpecialTokens)| {
            let mut s = SpecialTokens::default();
            f(&mut s);
            s.validate().unwrap_err().to_string()
        };
        assert!(with(|s| s.pad = s.eos.clone()).contains("twice"));
        assert!(with(|s| s.bos = String::new()).contains("1 to 64"));
        assert!(with(|s| s.extra = vec!["<a b>".into()]).contains("whitespace"));
        assert!(with(|s| s.eos = "$A".into()).contains("'$'"));
    }

    #[test]
    fn sha256_hex_is_lowercase_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
