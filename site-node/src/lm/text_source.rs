//! Reading a text dataset's documents from disk, streaming, with bounded memory per record.
//!
//! Two formats ([`TextFormat`]):
//! - **JSON Lines**: one object a line; the document is the string in `text_field`; `id_field`,
//!   `patient_field` and `date_field` (strings or numbers) are read when configured; every other
//!   key is ignored (it never reaches training). A line may be at most
//!   `2 × max_document_bytes + 64 KiB` bytes (room for JSON escapes and the other fields), and
//!   the decoded text at most `max_document_bytes`.
//! - **Plain text** (UTF-8), split into documents as `documents` says ([`DocumentSplit`]): one
//!   per line (blank lines skipped), one per block between delimiter lines (a line equal to
//!   `delimiter`; an empty delimiter means blank lines), or one per file when `path` is a
//!   directory (its regular files whose names do not start with `.`, in name order).
//!
//! A file whose name ends in `.gz` is gunzipped. A line or document longer than the limit is
//! refused without reading the rest of it into memory. Every error names the file and line here
//! at the site; [`TextSourceError::public_reason`] is what may leave the site (a code and the
//! field's name, never a value or a path).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tutela_privacy::anonymize::text::TextDocument;

/// The file format of a text dataset.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TextFormat {
    Jsonl,
    Text,
}

impl TextFormat {
    /// `.jsonl` / `.ndjson` (optionally `.gz`) is JSON Lines, anything else plain text.
    pub fn from_path(path: &Path) -> TextFormat {
        match tutela_privacy::anonymize::RecordFormat::from_path(path) {
            tutela_privacy::anonymize::RecordFormat::Jsonl => TextFormat::Jsonl,
            tutela_privacy::anonymize::RecordFormat::Csv => TextFormat::Text,
        }
    }
}

/// How a plain-text source is cut into documents.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DocumentSplit {
    /// One document per non-blank line.
    #[default]
    Line,
    /// Documents separated by lines equal to `delimiter`.
    Delimited,
    /// `path` is a directory; each file is one document.
    File,
}

/// Where and how to read the documents (the reading half of a text dataset's configuration).
#[derive(Clone, Debug, PartialEq)]
pub struct TextSource {
    pub path: PathBuf,
    pub format: TextFormat,
    pub text_field: String,
    pub id_field: Option<String>,
    pub patient_field: Option<String>,
    pub date_field: Option<String>,
    pub documents: DocumentSplit,
    pub delimiter: Option<String>,
    pub max_document_bytes: usize,
}

/// A text source that cannot be read as configured. Display names the file and line (local);
/// [`TextSourceError::public_reason`] is the form that may leave the site.
#[derive(Debug, thiserror::Error)]
pub enum TextSourceError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: the line is longer than {limit} bytes", .path.display())]
    LineTooLong {
        path: PathBuf,
        line: u64,
        limit: usize,
    },
    #[error("{}:{line}: the document is larger than max_document_bytes = {limit}", .path.display())]
    DocumentTooLarge {
        path: PathBuf,
        line: u64,
        limit: usize,
    },
    #[error("{}:{line}: not valid UTF-8", .path.display())]
    NotUtf8 { path: PathBuf, line: u64 },
    #[error("{}:{line}: not a JSON object: {detail}", .path.display())]
    BadJson {
        path: PathBuf,
        line: u64,
        detail: String,
    },
    /// A key given twice in a line's object: which value counts would be the parser's choice
    /// (`tutela_privacy::anonymize::json_line`).
    #[error("{}:{line}: the key `{field}` is given twice in the line's object; keep one", .path.display())]
    DuplicateField {
        path: PathBuf,
        line: u64,
        field: String,
    },
    #[error("{}:{line}: field `{field}` is missing or null", .path.display())]
    MissingField {
        path: PathBuf,
        line: u64,
        field: String,
    },
    #[error("{}:{line}: field `{field}` is not a {expected}", .path.display())]
    FieldType {
        path: PathBuf,
        line: u64,
        field: String,
        expected: &'static str,
    },
    #[error("{}: no document in the source", .path.display())]
    Empty { path: PathBuf },
}

impl TextSourceError {
    /// A stable code for the kind of problem.
    pub fn code(&self) -> &'static str {
        match self {
            TextSourceError::Io { .. } => "io",
            TextSourceError::LineTooLong { .. } => "line_too_long",
            TextSourceError::DocumentTooLarge { .. } => "document_too_large",
            TextSourceError::NotUtf8 { .. } => "not_utf8",
            TextSourceError::BadJson { .. } => "bad_json",
            TextSourceError::DuplicateField { .. } => "duplicate_field",
            TextSourceError::MissingField { .. } => "missing_field",
            TextSourceError::FieldType { .. } => "field_type",
            TextSourceError::Empty { .. } => "empty",
        }
    }

    /// The configured field the problem is about, where there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            TextSourceError::MissingField { field, .. }
            | TextSourceError::FieldType { field, .. } => Some(field),
            // Only a configured field is named: another key could be anything the export wrote.
            TextSourceError::DuplicateField { .. } => None,
            _ => None,
        }
    }

    /// What may leave the site: the code and the field's name (a configuration key's value, not
    /// data), never a cell value, a line of text, a line number or a path.
    pub fn public_reason(&self) -> String {
        match self.field() {
            Some(f) => format!("text dataset unreadable: {} (field `{f}`)", self.code()),
            None => format!("text dataset unreadable: {}", self.code()),
        }
    }
}

/// A JSON number as an id: `42`, `42.0` and `4.2e1` are one id, `"42"`, as one patient's serial
/// is when one export writes it as an integer and another as a float. Two spellings of one
/// patient would otherwise be two privacy units.
fn number_as_id(n: &serde_json::Number) -> String {
    // Integers beyond 2^53 are not exact as floats: those keep their own digits.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match n.as_f64() {
        Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < EXACT => format!("{}", f as i64),
        _ => n.to_string(),
    }
}

fn open(path: &Path) -> Result<Box<dyn BufRead>, TextSourceError> {
    let file = File::open(path).map_err(|source| TextSourceError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(if path.extension().is_some_and(|e| e == "gz") {
        Box::new(BufReader::new(flate2::read::GzDecoder::new(
            BufReader::new(file),
        )))
    } else {
        Box::new(BufReader::new(file))
    })
}

/// Reads one line into `buf` (without its `\n` / `\r\n`), reading at most `limit + 1` bytes of
/// it. `Ok(false)` at the end of the input; `Err(None)` when the line is longer than `limit`.
fn read_line(
    reader: &mut dyn BufRead,
    buf: &mut Vec<u8>,
    limit: usize,
) -> Result<bool, Option<std::io::Error>> {
    buf.clear();
    let n = reader
        .take(limit as u64 + 1)
        .read_until(b'\n', buf)
        .map_err(Some)?;
    if n == 0 {
        return Ok(false);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    } else if buf.len() > limit {
        return Err(None);
    }
    Ok(true)
}

impl TextSource {
    /// Checks what can be checked without reading a record: the path exists and is a file, or a
    /// directory for `documents = "file"`.
    pub fn check_present(&self) -> Result<(), TextSourceError> {
        let meta = std::fs::metadata(&self.path).map_err(|source| TextSourceError::Io {
            path: self.path.clone(),
            source,
        })?;
        let want_dir = self.format == TextFormat::Text && self.documents == DocumentSplit::File;
        if meta.is_dir() != want_dir {
            return Err(TextSourceError::Io {
                path: self.path.clone(),
                source: std::io::Error::other(if want_dir {
                    "documents = \"file\" needs a directory of documents"
                } else {
                    "is not a regular file"
                }),
            });
        }
        Ok(())
    }

    /// Reads every document.
    pub fn read(&self) -> Result<Vec<TextDocument>, TextSourceError> {
        let docs = match (self.format, self.documents) {
            (TextFormat::Jsonl, _) => self.read_jsonl()?,
            (TextFormat::Text, DocumentSplit::File) => self.read_directory()?,
            (TextFormat::Text, split) => self.read_text(split)?,
        };
        if docs.is_empty() {
            return Err(TextSourceError::Empty {
                path: self.path.clone(),
            });
        }
        Ok(docs)
    }

    fn read_jsonl(&self) -> Result<Vec<TextDocument>, TextSourceError> {
        let path = &self.path;
        let mut reader = open(path)?;
        let limit = self
            .max_document_bytes
            .saturating_mul(2)
            .saturating_add(64 << 10);
        let mut buf = Vec::new();
        let mut docs = Vec::new();
        let mut line = 0u64;
        loop {
            line += 1;
            match read_line(&mut *reader, &mut buf, limit) {
                Ok(false) => break,
                Ok(true) => {}
                Err(None) => {
                    return Err(TextSourceError::LineTooLong {
                        path: path.clone(),
                        line,
                        limit,
                    });
                }
                Err(Some(source)) => {
                    return Err(TextSourceError::Io {
                        path: path.clone(),
                        source,
                    });
                }
            }
            if buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let object = tutela_privacy::anonymize::json_line::parse_object(&buf).map_err(|e| {
                match e.duplicate_key() {
                    Some(field) => TextSourceError::DuplicateField {
                        path: path.clone(),
                        line,
                        field: field.to_string(),
                    },
                    None => TextSourceError::BadJson {
                        path: path.clone(),
                        line,
                        detail: e.to_string(),
                    },
                }
            })?;
            let get = |field: &str, required: bool| -> Result<Option<String>, TextSourceError> {
                match object.get(field) {
                    None | Some(serde_json::Value::Null) if required => {
                        Err(TextSourceError::MissingField {
                            path: path.clone(),
                            line,
                            field: field.to_string(),
                        })
                    }
                    None | Some(serde_json::Value::Null) => Ok(None),
                    Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                    // Ids and dates are sometimes numbers (a serial, a Unix time).
                    Some(serde_json::Value::Number(n)) if field != self.text_field => {
                        Ok(Some(number_as_id(n)))
                    }
                    Some(_) => Err(TextSourceError::FieldType {
                        path: path.clone(),
                        line,
                        field: field.to_string(),
                        expected: if field == self.text_field {
                            "string"
                        } else {
                            "string or number"
                        },
                    }),
                }
            };
            let text = get(&self.text_field, true)?.unwrap_or_default();
            if text.len() > self.max_document_bytes {
                return Err(TextSourceError::DocumentTooLarge {
                    path: path.clone(),
                    line,
                    limit: self.max_document_bytes,
                });
            }
            let optional = |f: &Option<String>| match f {
                Some(f) => get(f, true),
                None => Ok(None),
            };
            docs.push(TextDocument {
                line,
                id: optional(&self.id_field)?,
                patient: optional(&self.patient_field)?,
                date: optional(&self.date_field)?,
                text,
            });
        }
        Ok(docs)
    }

    fn read_text(&self, split: DocumentSplit) -> Result<Vec<TextDocument>, TextSourceError> {
        let path = &self.path;
        let mut reader = open(path)?;
        let limit = self.max_document_bytes;
        let delimiter = self.delimiter.as_deref().map(str::trim_end);
        let mut buf = Vec::new();
        let mut docs = Vec::new();
        let mut current = String::new();
        let mut first_line = 0u64;
        let mut line = 0u64;
        let flush = |docs: &mut Vec<TextDocument>, current: &mut String, first_line: u64| {
            if !current.trim().is_empty() {
                docs.push(TextDocument {
                    line: first_line,
                    id: None,
                    patient: None,
                    date: None,
                    text: std::mem::take(current),
                });
            }
            current.clear();
        };
        loop {
            line += 1;
            match read_line(&mut *reader, &mut buf, limit) {
                Ok(false) => break,
                Ok(true) => {}
                Err(None) => {
                    return Err(TextSourceError::DocumentTooLarge {
                        path: path.clone(),
                        line,
                        limit,
                    });
                }
                Err(Some(source)) => {
                    return Err(TextSourceError::Io {
                        path: path.clone(),
                        source,
                    });
                }
            }
            let text = std::str::from_utf8(&buf).map_err(|_| TextSourceError::NotUtf8 {
                path: path.clone(),
                line,
            })?;
            match split {
                DocumentSplit::Delimited => {
                    let is_delimiter = match delimiter {
                        Some("") | None => text.trim().is_empty(),
                        Some(d) => text.trim_end() == d,
                    };
                    if is_delimiter {
                        flush(&mut docs, &mut current, first_line);
                        continue;
                    }
                    if current.is_empty() {
                        first_line = line;
                    }
                    if current.len() + text.len() + 1 > limit {
                        return Err(TextSourceError::DocumentTooLarge {
                            path: path.clone(),
                            line: first_line,
                            limit,
                        });
                    }
                    current.push_str(text);
                    current.push('\n');
                }
                _ => {
                    current.push_str(text);
                    flush(&mut docs, &mut current, line);
                }
            }
        }
        flush(&mut docs, &mut current, first_line);
        Ok(docs)
    }

    fn read_directory(&self) -> Result<Vec<TextDocument>, TextSourceError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TextSourceError::Io { path, source }
        };
        let mut files: Vec<PathBuf> = Vec::new();
        for entry in std::fs::read_dir(&self.path).map_err(io(&self.path))? {
            let entry = entry.map_err(io(&self.path))?;
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            if !hidden && entry.file_type().map_err(io(&entry.path()))?.is_file() {
                files.push(entry.path());
            }
        }
        files.sort();
        let mut docs = Vec::with_capacity(files.len());
        for file in files {
            let mut bytes = Vec::new();
            open(&file)?
                .take(self.max_document_bytes as u64 + 1)
                .read_to_end(&mut bytes)
                .map_err(io(&file))?;
            if bytes.len() > self.max_document_bytes {
                return Err(TextSourceError::DocumentTooLarge {
                    path: file,
                    line: 1,
                    limit: self.max_document_bytes,
                });
            }
            let text = String::from_utf8(bytes).map_err(|_| TextSourceError::NotUtf8 {
                path: file.clone(),
                line: 1,
            })?;
            // The file's name is its id (local only: it orders near-duplicates and the split).
            let id = file.file_name().map(|n| n.to_string_lossy().into_owned());
            docs.push(TextDocument {
                line: 1,
                id,
                patient: None,
                date: None,
                text,
            });
        }
        Ok(docs)
    }
}
