//! The content filter: a site's blocklist of terms, and the documents or lines that contain one.
//!
//! A term matches case-insensitively as whole words: `hiv` matches "HIV positive" but not
//! "archived"; a multi-word term matches its words separated by any run of whitespace. The
//! blocklist file holds one term per line; blank lines and lines starting with `#` are ignored.
//!
//! The report counts what was dropped, never which term matched: a blocklist may itself name
//! people (a VIP list) or conditions, and the report leaves the site.

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

use crate::anonymize::AnonymizeError;

/// What a blocklisted term removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FilterScope {
    /// The whole document (the default: a document that mentions a blocked term is not trained
    /// on at all).
    #[default]
    Document,
    /// Only the lines that contain a term; the rest of the document stays.
    Line,
}

/// The compiled blocklist.
#[derive(Debug, Clone)]
pub struct Blocklist {
    pattern: Option<Regex>,
    terms: usize,
}

impl Blocklist {
    /// Parses a blocklist file's text (see the module docs). `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Blocklist, AnonymizeError> {
        Blocklist::from_terms(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#')),
            origin,
        )
    }

    /// A blocklist of `terms`.
    pub fn from_terms<I, S>(terms: I, origin: &str) -> Result<Blocklist, AnonymizeError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut alternatives = Vec::new();
        for (i, term) in terms.into_iter().enumerate() {
            let words: Vec<String> = term
                .as_ref()
                .split_whitespace()
                .map(regex::escape)
                .collect();
            if words.is_empty() {
                return Err(AnonymizeError::InvalidConfig {
                    column: origin.to_string(),
                    reason: format!("term {} is empty", i + 1),
                });
            }
            // Whole words: \b only where the term starts or ends with a word character, so a
            // term like "c++" or "#tag" still matches.
            let joined = words.join(r"\s+");
            let first = term.as_ref().trim().chars().next();
            let last = term.as_ref().trim().chars().last();
            let word_char = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
            alternatives.push(format!(
                "{}{joined}{}",
                if word_char(first) { r"\b" } else { "" },
                if word_char(last) { r"\b" } else { "" }
            ));
        }
        let terms = alternatives.len();
        let pattern = if alternatives.is_empty() {
            None
        } else {
            Some(
                RegexBuilder::new(&format!("(?:{})", alternatives.join("|")))
                    .case_insensitive(true)
                    .size_limit(64 << 20)
                    .build()
                    .map_err(|e| AnonymizeError::InvalidConfig {
                        column: origin.to_string(),
                        reason: format!("cannot compile the blocklist: {e}"),
                    })?,
            )
        };
        Ok(Blocklist { pattern, terms })
    }

    /// Number of terms.
    pub fn len(&self) -> usize {
        self.terms
    }

    pub fn is_empty(&self) -> bool {
        self.terms == 0
    }

    /// Whether `text` contains a blocked term.
    pub fn matches(&self, text: &str) -> bool {
        self.pattern.as_ref().is_some_and(|p| p.is_match(text))
    }

    /// `text` without its lines that contain a blocked term, and how many lines went. Line ends
    /// are kept as they were on the lines that stay.
    pub fn drop_lines(&self, text: &str) -> (String, usize) {
        let mut out = String::with_capacity(text.len());
        let mut dropped = 0;
        for line in text.split_inclusive('\n') {
            if self.matches(line) {
                dropped += 1;
            } else {
                out.push_str(line);
            }
        }
        (out, dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_words_case_insensitive_multiword() {
        let b = Blocklist::parse("# comment\nHIV\n\nsubstance  abuse\nc++\n", "blocklist").unwrap();
        assert_eq!(b.len(), 3);
        assert!(b.matches("Patient is hiv positive"));
        assert!(!b.matches("Records archived."));
        assert!(b.matches("history of Substance\n  Abuse"));
        assert!(!b.matches("substance-free"));
        assert!(b.matches("writes C++ code"));
        let (kept, n) = b.drop_lines("line one\nHIV test\nline three");
        assert_eq!((kept.as_str(), n), ("line one\nline three", 1));
        assert!(
            !Blocklist::parse("# nothing\n", "b")
                .unwrap()
                .matches("anything")
        );
    }
}
