//! `verify-report`: what a report file is checked for, and how each failure is named.
//!
//! [`check_document`] needs nothing but the file: the manifest's format and digest, and that the
//! document is exactly what the manifest renders to. [`check_against_trail`] then needs the log's
//! key and the trail ([`Trail`]): the checkpoint's signature, its consistency with the trail's
//! current signed head, each cited event's inclusion with the content stated, and the content
//! rebuilt from the trail.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::Hash;
use crate::authority::AuthorityCheck;
use crate::checkpoint::{CheckpointError, SignedCheckpoint};
use crate::event::Event;
use crate::filter::EventFilter;
use crate::merkle::{ProofError, leaf_hash, verify_consistency, verify_inclusion};

use super::{CitedEvent, REPORT_FORMAT, ReportContent, ReportError, ReportManifest};

/// What a report file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DocumentKind {
    Html,
    Pdf,
}

impl std::fmt::Display for DocumentKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DocumentKind::Html => "HTML",
            DocumentKind::Pdf => "PDF",
        })
    }
}

/// Why a report does not hold.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("not a Tutela report: {0}")]
    NotAReport(String),
    #[error("the embedded manifest cannot be read: {0}")]
    Manifest(String),
    #[error("the manifest's format is {0:?}, not {REPORT_FORMAT}")]
    Format(String),
    #[error(
        "the content digest does not match: the manifest states {stated}, its content hashes to {computed} (the manifest was edited)"
    )]
    Digest { stated: String, computed: String },
    #[error(
        "the {kind} document is not what its manifest renders to (the visible report was edited): first difference at line {line}: the file has {file:?}, the manifest renders {expected:?}"
    )]
    Rendering {
        kind: DocumentKind,
        line: usize,
        file: String,
        expected: String,
    },
    #[error("the report's checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    #[error(
        "the report's checkpoint (size {report_size}) is not consistent with the trail's head (size {head_size}): {why}"
    )]
    Inconsistent {
        report_size: u64,
        head_size: u64,
        why: String,
    },
    #[error("cited event seq {seq}: {why}")]
    Cited { seq: u64, why: String },
    #[error(
        "the report states {path} = {stated}, but the trail up to its checkpoint says {trail} (the content was edited)"
    )]
    ContentDiffers {
        path: String,
        stated: String,
        trail: String,
    },
    #[error("reading the trail: {0}")]
    Trail(String),
    #[error("{0}")]
    Report(#[from] ReportError),
}

/// Reads the manifest out of a report file (HTML or PDF), checks its format and digest, and that
/// the document is exactly what the manifest renders to.
pub fn check_document(bytes: &[u8]) -> Result<(DocumentKind, ReportManifest), CheckError> {
    let (kind, text) = if bytes.starts_with(b"%PDF-") {
        let raw = super::pdf::manifest_bytes(bytes).ok_or_else(|| {
            CheckError::NotAReport(format!(
                "a PDF without the embedded file {}",
                super::PDF_MANIFEST_NAME
            ))
        })?;
        let text = std::str::from_utf8(raw)
            .map_err(|e| CheckError::Manifest(format!("not UTF-8: {e}")))?;
        (DocumentKind::Pdf, text)
    } else {
        let html = std::str::from_utf8(bytes)
            .map_err(|_| CheckError::NotAReport("neither a PDF nor UTF-8 HTML".into()))?;
        let text = super::html::manifest_text(html).ok_or_else(|| {
            CheckError::NotAReport(format!(
                "no <script type=\"application/json\" id=\"{}\"> block",
                super::HTML_MANIFEST_ID
            ))
        })?;
        (DocumentKind::Html, text)
    };
    let m: ReportManifest =
        serde_json::from_str(text).map_err(|e| CheckError::Manifest(e.to_string()))?;
    if m.format != REPORT_FORMAT {
        return Err(CheckError::Format(m.format));
    }
    let computed = m.digest()?;
    if computed != m.content_digest {
        return Err(CheckError::Digest {
            stated: m.content_digest.clone(),
            computed,
        });
    }
    let expected = match kind {
        DocumentKind::Html => super::html::render(&m)?.into_bytes(),
        DocumentKind::Pdf => super::pdf::render(&m)?,
    };
    if expected != bytes {
        return Err(first_difference(kind, bytes, &expected));
    }
    Ok((kind, m))
}

/// The first line where `file` and `expected` differ, shown as text (a PDF's literal strings
/// decoded from WinAnsi).
fn first_difference(kind: DocumentKind, file: &[u8], expected: &[u8]) -> CheckError {
    let show = |line: &[u8]| -> String {
        let s: String = line.iter().map(|&b| char::from(b)).collect();
        s.chars().take(200).collect()
    };
    let a: Vec<&[u8]> = file.split(|&b| b == b'\n').collect();
    let b: Vec<&[u8]> = expected.split(|&b| b == b'\n').collect();
    let n = a.len().max(b.len());
    for i in 0..n {
        let (x, y) = (a.get(i).copied(), b.get(i).copied());
        if x != y {
            return CheckError::Rendering {
                kind,
                line: i + 1,
                file: x.map_or_else(|| "(end of file)".into(), show),
                expected: y.map_or_else(|| "(end of file)".into(), show),
            };
        }
    }
    CheckError::Rendering {
        kind,
        line: n,
        file: "(same lines, different bytes)".into(),
        expected: String::new(),
    }
}

/// What `verify-report` reads from the trail: its signed head, proofs, and events.
#[allow(async_fn_in_trait)]
pub trait Trail {
    /// The trail's newest signed checkpoint.
    async fn head(&mut self) -> Result<SignedCheckpoint, String>;
    /// RFC 9162 consistency proof from `old` to `new`.
    async fn consistency(&mut self, old: u64, new: u64) -> Result<Vec<Hash>, String>;
    /// Event `seq` as stored, and its audit path in the tree of `tree_size`.
    async fn inclusion(&mut self, seq: u64, tree_size: u64) -> Result<(Event, Vec<Hash>), String>;
    /// Events matching `filter`, in seq order.
    async fn events(&mut self, filter: EventFilter) -> Result<Vec<Event>, String>;
}

/// What [`check_against_trail`] established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrailCheck {
    /// The head the report's checkpoint was proven consistent with.
    pub head_size: u64,
    /// Cited events proven included with the content stated.
    pub cited: usize,
}

/// Every event the report cites, once, by seq.
pub fn cited_events(m: &ReportManifest) -> Vec<&CitedEvent> {
    let mut by_seq: BTreeMap<u64, &CitedEvent> = BTreeMap::new();
    for s in &m.content.sections {
        for e in &s.evidence {
            by_seq.entry(e.seq).or_insert(e);
        }
    }
    by_seq.into_values().collect()
}

/// Checks the report's checkpoint against the log's `public_key` and the `trail`: signature,
/// consistency with the trail's head, each cited event's inclusion and content, and the content
/// rebuilt from the trail (believing what `check` believes) against what the report states.
pub async fn check_against_trail<T: Trail>(
    m: &ReportManifest,
    public_key: &[u8],
    trail: &mut T,
    check: &AuthorityCheck,
) -> Result<TrailCheck, CheckError> {
    let cp = &m.checkpoint.checkpoint;
    m.checkpoint.verify(public_key)?;
    if m.content.tree_size != cp.tree_size {
        return Err(CheckError::ContentDiffers {
            path: "content.tree_size".into(),
            stated: m.content.tree_size.to_string(),
            trail: format!("{} (the checkpoint's size)", cp.tree_size),
        });
    }
    let head = trail.head().await.map_err(CheckError::Trail)?;
    head.verify(public_key)?;
    let h = &head.checkpoint;
    if h.log_id != cp.log_id {
        return Err(CheckError::Checkpoint(CheckpointError::WrongLog {
            expected: h.log_id.clone(),
            got: cp.log_id.clone(),
        }));
    }
    let inconsistent = |why: String| CheckError::Inconsistent {
        report_size: cp.tree_size,
        head_size: h.tree_size,
        why,
    };
    if h.tree_size < cp.tree_size {
        return Err(inconsistent(
            "the trail's head is smaller than the report's checkpoint (the trail was truncated, or the checkpoint is not this trail's)".into(),
        ));
    }
    if h.tree_size == cp.tree_size {
        if h.root != cp.root {
            return Err(inconsistent(
                "same size, different root (a split view)".into(),
            ));
        }
    } else {
        let proof = trail
            .consistency(cp.tree_size, h.tree_size)
            .await
            .map_err(CheckError::Trail)?;
        verify_consistency(cp.tree_size, h.tree_size, &cp.root, &h.root, &proof)
            .map_err(|e: ProofError| inconsistent(e.to_string()))?;
    }
    let cited = cited_events(m);
    for c in &cited {
        let (event, path) = trail
            .inclusion(c.seq, cp.tree_size)
            .await
            .map_err(|why| CheckError::Cited { seq: c.seq, why })?;
        if event.compute_hash() != event.hash {
            return Err(CheckError::Cited {
                seq: c.seq,
                why: "the trail's row does not hash to its recorded hash (run tutela audit verify)"
                    .into(),
            });
        }
        verify_inclusion(
            c.seq,
            cp.tree_size,
            &leaf_hash(&event.hash),
            &path,
            &cp.root,
        )
        .map_err(|e| CheckError::Cited {
            seq: c.seq,
            why: format!("not included in the report's checkpoint: {e}"),
        })?;
        let trail_says = CitedEvent::of(&event);
        if &trail_says != *c {
            return Err(CheckError::Cited {
                seq: c.seq,
                why: first_json_difference(
                    "cited event",
                    &serde_json::to_value(c).map_err(ReportError::from)?,
                    &serde_json::to_value(&trail_says).map_err(ReportError::from)?,
                )
                .map_or_else(
                    || "differs from the trail".into(),
                    |(path, stated, trail)| {
                        format!("the report states {path} = {stated}, the trail holds {trail}")
                    },
                ),
            });
        }
    }
    // The content, rebuilt from the same events the maker read.
    let events = super::gather(&m.content.scope, cp.tree_size, async |f| {
        trail.events(f).await
    })
    .await
    .map_err(CheckError::Trail)?;
    let rebuilt = super::build_content(&events, &m.content.scope, cp.tree_size, check, &cp.log_id)?;
    compare_content(&m.content, &rebuilt)?;
    Ok(TrailCheck {
        head_size: h.tree_size,
        cited: cited.len(),
    })
}

/// `stated` against `rebuilt`, naming the first field that differs.
pub fn compare_content(stated: &ReportContent, rebuilt: &ReportContent) -> Result<(), CheckError> {
    if stated == rebuilt {
        return Ok(());
    }
    let a = serde_json::to_value(stated).map_err(ReportError::from)?;
    let b = serde_json::to_value(rebuilt).map_err(ReportError::from)?;
    let (path, stated, trail) = first_json_difference("content", &a, &b).unwrap_or_else(|| {
        (
            "content".into(),
            "(as stated)".into(),
            "(something else)".into(),
        )
    });
    Err(CheckError::ContentDiffers {
        path,
        stated,
        trail,
    })
}

/// The first path (`content.sections[2].evidence[0].actor`) where `a` and `b` differ, with both
/// values as JSON.
pub fn first_json_difference(path: &str, a: &Value, b: &Value) -> Option<(String, String, String)> {
    if a == b {
        return None;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let (va, vb) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                if let Some(d) = first_json_difference(&format!("{path}.{k}"), va, vb) {
                    return Some(d);
                }
            }
            None
        }
        (Value::Array(x), Value::Array(y)) => {
            for i in 0..x.len().max(y.len()) {
                let (va, vb) = (
                    x.get(i).unwrap_or(&Value::Null),
                    y.get(i).unwrap_or(&Value::Null),
                );
                if let Some(d) = first_json_difference(&format!("{path}[{i}]"), va, vb) {
                    return Some(d);
                }
            }
            None
        }
        _ => Some((path.to_string(), a.to_string(), b.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_json_difference_is_named_by_its_path() {
        let a = serde_json::json!({"facts": [{"label": "x", "value": "0.42"}], "n": 1});
        let b = serde_json::json!({"facts": [{"label": "x", "value": "0.43"}], "n": 1});
        assert_eq!(
            first_json_difference("content", &a, &b),
            Some((
                "content.facts[0].value".into(),
                "\"0.42\"".into(),
                "\"0.43\"".into()
            ))
        );
        assert_eq!(first_json_difference("c", &a, &a), None);
    }
}
