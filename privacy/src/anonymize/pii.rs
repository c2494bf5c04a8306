//! Free-text PII detection and redaction.
//!
//! Candidates come from regular expressions; numbers that carry a check digit are kept only when
//! it validates (US SSN structure, IBAN mod-97, payment cards Luhn + issuer prefix), IP addresses
//! only when they parse, dates only when the calendar date exists. Overlaps are resolved longest
//! first (a URL that contains an IP address is one URL), then by type priority.
//!
//! Dates: every date with day precision is treated as PII, following HIPAA Safe Harbor (all
//! elements of dates except the year). Bare years, times, fractions and version numbers are kept.
//!
//! Names: dictionary words (the configured list plus the text of the dataset's direct-identifier
//! columns), matched as capitalized whole words; adjacent names merge into one span. Names that
//! are also common capitalized words (May, Will, Bill) should be left out of the dictionary.
//! Optionally ([`PiiRedactor::with_digit_suffixed_names`]) a capitalized word with digits appended
//! (`Sumiko254`, `Larue605`: how Synthea and some record exports write names) is a name too,
//! whatever the dictionary says; it is off by default because product and lab codes (`Tylenol500`)
//! share the shape, and a text dataset turns it on in its configuration.
//!
//! Digit boundaries: a numeric match must not continue a longer number: the character next to
//! it may not be alphanumeric, nor a separator (`-`, `.`, `/`, `,`, space) that touches another
//! digit. This stops a phone pattern from matching a piece of an (invalid) card number.

use std::collections::HashSet;
use std::fmt;

use regex::Regex;
use serde::{Deserialize, Serialize};

use super::AnonymizeError;

/// The PII types and their placeholders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PiiKind {
    Url,
    Email,
    Iban,
    Card,
    Ssn,
    Ip,
    Phone,
    Date,
    Name,
}

impl PiiKind {
    pub const ALL: [PiiKind; 9] = [
        PiiKind::Url,
        PiiKind::Email,
        PiiKind::Iban,
        PiiKind::Card,
        PiiKind::Ssn,
        PiiKind::Ip,
        PiiKind::Phone,
        PiiKind::Date,
        PiiKind::Name,
    ];

    /// The typed placeholder, e.g. `[EMAIL]`.
    pub fn placeholder(self) -> &'static str {
        match self {
            PiiKind::Url => "[URL]",
            PiiKind::Email => "[EMAIL]",
            PiiKind::Iban => "[IBAN]",
            PiiKind::Card => "[CARD]",
            PiiKind::Ssn => "[SSN]",
            PiiKind::Ip => "[IP]",
            PiiKind::Phone => "[PHONE]",
            PiiKind::Date => "[DATE]",
            PiiKind::Name => "[NAME]",
        }
    }
}

impl fmt::Display for PiiKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.placeholder().trim_matches(['[', ']']))
    }
}

/// A detected (or labelled) PII span: byte offsets into the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PiiSpan {
    pub start: usize,
    pub end: usize,
    pub kind: PiiKind,
}

/// US SSN structural rules: area not 000, 666 or 900-999; group not 00; serial not 0000.
pub fn valid_ssn(digits: &str) -> bool {
    let d: Vec<u32> = digits.chars().filter_map(|c| c.to_digit(10)).collect();
    if d.len() != 9 {
        return false;
    }
    let area = d[0] * 100 + d[1] * 10 + d[2];
    let group = d[3] * 10 + d[4];
    let serial = d[5] * 1000 + d[6] * 100 + d[7] * 10 + d[8];
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

/// Luhn check over the digits of `s` (separators ignored).
pub fn luhn(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if digits.is_empty() {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// A payment card: 13-19 digits, a known issuer prefix (Visa, Mastercard, Amex, Discover, JCB,
/// Diners), Luhn-valid.
pub fn valid_card(s: &str) -> bool {
    let d: String = s.chars().filter(char::is_ascii_digit).collect();
    if !(13..=19).contains(&d.len()) {
        return false;
    }
    let p2: u32 = d[..2].parse().unwrap_or(0);
    let p4: u32 = d[..4].parse().unwrap_or(0);
    let issuer = d.starts_with('4')
        || (51..=55).contains(&p2)
        || (2221..=2720).contains(&p4)
        || p2 == 34
        || p2 == 37
        || p4 == 6011
        || p2 == 65
        || (3528..=3589).contains(&p4)
        || p2 == 36
        || p2 == 38;
    issuer && luhn(&d)
}

/// IBAN: 15-34 alphanumerics, country letters, check digits, mod-97 of the rearranged number = 1.
pub fn valid_iban(s: &str) -> bool {
    let c: Vec<char> = s.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&c.len())
        || !c[0].is_ascii_uppercase()
        || !c[1].is_ascii_uppercase()
        || !c[2].is_ascii_digit()
        || !c[3].is_ascii_digit()
        || !c
            .iter()
            .all(|x| x.is_ascii_digit() || x.is_ascii_uppercase())
    {
        return false;
    }
    let mut rem: u32 = 0;
    for ch in c[4..].iter().chain(&c[..4]) {
        let v = if ch.is_ascii_digit() {
            *ch as u32 - '0' as u32
        } else {
            *ch as u32 - 'A' as u32 + 10
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

fn valid_ymd(y: u32, m: u32, d: u32) -> bool {
    (1..=12).contains(&m)
        && d >= 1
        && d <= super::schema::days_in_month(y as i32, m)
        && (1900..=2100).contains(&y)
}

fn month_number(name: &str) -> Option<u32> {
    let n = name.get(..3)?.to_ascii_lowercase();
    const M: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    M.iter().position(|m| *m == n).map(|i| i as u32 + 1)
}

/// Validates a date candidate by the regex group that matched it.
fn valid_date(caps: &regex::Captures<'_>) -> bool {
    let num = |n: &str| caps.name(n).and_then(|m| m.as_str().parse::<u32>().ok());
    if let (Some(y), Some(m), Some(d)) = (num("iy"), num("im"), num("id")) {
        return valid_ymd(y, m, d);
    }
    if let (Some(a), Some(b), Some(y)) = (num("na"), num("nb"), num("ny")) {
        // Numeric day/month order is ambiguous (US vs European): either reading may be valid.
        return valid_ymd(y, a, b) || valid_ymd(y, b, a);
    }
    if let (Some(d), Some(mn), Some(y)) = (num("dd"), caps.name("dm"), num("dy")) {
        return month_number(mn.as_str()).is_some_and(|m| valid_ymd(y, m, d));
    }
    if let (Some(mn), Some(d), Some(y)) = (caps.name("mm"), num("md"), num("my")) {
        return month_number(mn.as_str()).is_some_and(|m| valid_ymd(y, m, d));
    }
    false
}

fn digit_count(s: &str) -> usize {
    s.chars().filter(char::is_ascii_digit).count()
}

/// See the module docs: the match must not be a piece of a longer number.
fn clean_digit_boundary(text: &str, start: usize, end: usize) -> bool {
    let b = text.as_bytes();
    let sep = |c: u8| matches!(c, b'-' | b'.' | b'/' | b',' | b' ' | b':');
    if start > 0 {
        let c = b[start - 1];
        if c.is_ascii_alphanumeric() || c == b'+' {
            return false;
        }
        if sep(c) && start >= 2 && b[start - 2].is_ascii_digit() {
            return false;
        }
    }
    if end < b.len() {
        let c = b[end];
        if c.is_ascii_alphanumeric() {
            return false;
        }
        if sep(c) && end + 1 < b.len() && b[end + 1].is_ascii_digit() {
            return false;
        }
    }
    true
}

/// The compiled detectors plus the name dictionary.
pub struct PiiRedactor {
    email: Regex,
    url: Regex,
    ipv4: Regex,
    ipv6: Regex,
    ssn: Regex,
    iban: Regex,
    card: Regex,
    phones: Vec<Regex>,
    date: Regex,
    word: Regex,
    names: HashSet<String>,
    digit_suffixed_names: bool,
}

impl PiiRedactor {
    /// Compiles the detectors; `names` is the name dictionary (case-sensitive, whole words).
    pub fn new<I, S>(names: I) -> Result<Self, AnonymizeError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let re = |p: &str| Regex::new(p).map_err(|e| AnonymizeError::Parse(format!("regex: {e}")));
        let mut dict = HashSet::new();
        for n in names {
            // Multi-word entries ("Anna Maria") contribute each capitalized word.
            for w in n.as_ref().split_whitespace() {
                let w = w.trim_matches(|c: char| !c.is_alphanumeric());
                if w.chars().count() >= 2 && w.chars().next().is_some_and(char::is_uppercase) {
                    dict.insert(w.to_string());
                }
            }
        }
        const MONTHS: &str = "(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)";
        Ok(PiiRedactor {
            email: re(
                r"(?i)\b[a-z0-9][a-z0-9._%+-]*@[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*\.[a-z]{2,}\b",
            )?,
            url: re(r#"(?i)\b(?:https?://|www\.)[^\s<>"'()\[\]]+"#)?,
            ipv4: re(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b")?,
            ipv6: re(r"(?i)[0-9a-f:]*:[0-9a-f:]*:[0-9a-f:.]*")?,
            ssn: re(r"\b\d{3}[- ]\d{2}[- ]\d{4}\b")?,
            iban: re(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")?,
            card: re(r"\b\d(?:[ -]?\d){12,18}\b")?,
            phones: vec![
                // International, E.164 with optional (0) and separators.
                re(r"\+[1-9]\d{0,2}(?:[ .-]?\(0?\d{1,4}\))?(?:[ .-]?\d{1,4}){2,5}\b")?,
                // North American (555) 123-4567, 555-123-4567, 555.123.4567.
                re(r"\(\d{3}\) ?\d{3}[-. ]\d{4}\b")?,
                re(r"\b\d{3}[-.]\d{3}[-.]\d{4}\b")?,
                // UK: 020 7946 0958, 0161 496 0123, 01632 960 123.
                re(r"\b0\d{2,4} \d{3,4} \d{3,4}\b")?,
                // France: 01 23 45 67 89, 06.12.34.56.78.
                re(r"\b0[1-9](?:[ .]\d{2}){4}\b")?,
                // Germany: 030 12345678, 089/1234567, 0221-4711.
                re(r"\b0\d{2,4}[ /-]\d{4,8}\b")?,
            ],
            date: re(&format!(
                r"\b(?:(?P<iy>\d{{4}})-(?P<im>\d{{1,2}})-(?P<id>\d{{1,2}})|(?P<na>\d{{1,2}})[/.](?P<nb>\d{{1,2}})[/.](?P<ny>\d{{4}})|(?P<dd>\d{{1,2}})(?:st|nd|rd|th)? (?P<dm>{MONTHS})\.? (?P<dy>\d{{4}})|(?P<mm>{MONTHS})\.? (?P<md>\d{{1,2}})(?:st|nd|rd|th)?,? (?P<my>\d{{4}}))\b"
            ))?,
            // A capitalized word, optionally with digits appended (see the module docs).
            word: re(r"\b\p{Lu}[\p{L}'-]+\d*\b")?,
            names: dict,
            digit_suffixed_names: false,
        })
    }

    /// Also treats a capitalized word with digits appended (`Sumiko254`) as a name: one capital,
    /// then at least one lower-case letter and nothing but letters, then one or more digits.
    pub fn with_digit_suffixed_names(mut self, on: bool) -> Self {
        self.digit_suffixed_names = on;
        self
    }

    /// Whether a word the `word` pattern matched is a name: in the dictionary, or (when enabled)
    /// of the digit-suffixed shape.
    fn is_name(&self, word: &str) -> bool {
        if self.names.contains(word) {
            return true;
        }
        if !self.digit_suffixed_names {
            return false;
        }
        let letters = word.trim_end_matches(|c: char| c.is_ascii_digit());
        let mut rest = letters.chars().skip(1);
        letters.len() < word.len()
            && letters.chars().next().is_some_and(char::is_uppercase)
            && rest.clone().next().is_some()
            && rest.all(char::is_lowercase)
    }

    /// Adds names to the dictionary.
    pub fn add_names<I, S>(&mut self, names: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        for n in names {
            for w in n.as_ref().split_whitespace() {
                let w = w.trim_matches(|c: char| !c.is_alphanumeric());
                if w.chars().count() >= 2 && w.chars().next().is_some_and(char::is_uppercase) {
                    self.names.insert(w.to_string());
                }
            }
        }
    }

    /// All PII spans in `text`, sorted by position, non-overlapping.
    pub fn detect(&self, text: &str) -> Vec<PiiSpan> {
        let mut cands: Vec<PiiSpan> = Vec::new();
        let mut push = |start: usize, end: usize, kind: PiiKind| {
            cands.push(PiiSpan { start, end, kind });
        };
        for m in self.url.find_iter(text) {
            // Trailing sentence punctuation is not part of a URL.
            let s = m.as_str().trim_end_matches(['.', ',', ';', ':', '!', '?']);
            push(m.start(), m.start() + s.len(), PiiKind::Url);
        }
        for m in self.email.find_iter(text) {
            push(m.start(), m.end(), PiiKind::Email);
        }
        for m in self.iban.find_iter(text) {
            if valid_iban(m.as_str()) {
                push(m.start(), m.end(), PiiKind::Iban);
            }
        }
        for m in self.card.find_iter(text) {
            if valid_card(m.as_str()) && clean_digit_boundary(text, m.start(), m.end()) {
                push(m.start(), m.end(), PiiKind::Card);
            }
        }
        for m in self.ssn.find_iter(text) {
            if valid_ssn(m.as_str()) && clean_digit_boundary(text, m.start(), m.end()) {
                push(m.start(), m.end(), PiiKind::Ssn);
            }
        }
        for m in self.ipv4.find_iter(text) {
            let ok = m.as_str().split('.').all(|o| {
                o.parse::<u32>().is_ok_and(|v| v <= 255) && (o.len() == 1 || !o.starts_with('0'))
            });
            if ok && clean_digit_boundary(text, m.start(), m.end()) {
                push(m.start(), m.end(), PiiKind::Ip);
            }
        }
        for m in self.ipv6.find_iter(text) {
            // The regex is a loose net; std's parser decides. A trailing '.' ends a sentence.
            let s = m.as_str().trim_end_matches('.');
            let start = m.start();
            let before_ok = start == 0 || !text.as_bytes()[start - 1].is_ascii_alphanumeric();
            if before_ok && s.matches(':').count() >= 2 && s.parse::<std::net::Ipv6Addr>().is_ok() {
                push(start, start + s.len(), PiiKind::Ip);
            }
        }
        for re in &self.phones {
            for m in re.find_iter(text) {
                let n = digit_count(m.as_str());
                if (7..=15).contains(&n) && clean_digit_boundary(text, m.start(), m.end()) {
                    push(m.start(), m.end(), PiiKind::Phone);
                }
            }
        }
        for c in self.date.captures_iter(text) {
            if let Some(m) = c.get(0)
                && valid_date(&c)
                && clean_digit_boundary(text, m.start(), m.end())
            {
                push(m.start(), m.end(), PiiKind::Date);
            }
        }
        if !self.names.is_empty() || self.digit_suffixed_names {
            let mut run: Option<(usize, usize)> = None;
            for m in self.word.find_iter(text) {
                // Dictionary entries have no digits, so a digit-suffixed word (which the pattern
                // now matches whole, where it used to match nothing) is never a dictionary hit.
                if !self.is_name(m.as_str()) {
                    continue;
                }
                run = match run {
                    // Adjacent dictionary words separated by one space are one name.
                    Some((s, e)) if &text[e..m.start()] == " " => Some((s, m.end())),
                    Some((s, e)) => {
                        push(s, e, PiiKind::Name);
                        Some((m.start(), m.end()))
                    }
                    None => Some((m.start(), m.end())),
                };
            }
            if let Some((s, e)) = run {
                push(s, e, PiiKind::Name);
            }
        }
        // Longest first, then type priority (the enum order), then position.
        cands.sort_by(|a, b| {
            (b.end - b.start)
                .cmp(&(a.end - a.start))
                .then(a.kind.cmp(&b.kind))
                .then(a.start.cmp(&b.start))
        });
        let mut chosen: Vec<PiiSpan> = Vec::new();
        for c in cands {
            if chosen.iter().all(|o| c.end <= o.start || c.start >= o.end) {
                chosen.push(c);
            }
        }
        chosen.sort_by_key(|s| s.start);
        chosen
    }

    /// Replaces every detected span by its placeholder; returns the text and the spans found.
    pub fn redact(&self, text: &str) -> (String, Vec<PiiSpan>) {
        let spans = self.detect(text);
        let mut out = String::with_capacity(text.len());
        let mut last = 0;
        for s in &spans {
            out.push_str(&text[last..s.start]);
            out.push_str(s.kind.placeholder());
            last = s.end;
        }
        out.push_str(&text[last..]);
        (out, spans)
    }
}
