//! A labelled synthetic corpus for measuring PII redaction, generated from a fixed seed.
//!
//! Each document is a few sentences; each sentence embeds one PII value of a random type (with
//! its exact span recorded) or is a hard negative: numbers that look like PII but are not
//! (invalid SSNs, IBANs with a wrong check, Luhn-failing card numbers, impossible dates, invalid
//! IPv4 octets, times, version numbers, prices, fractions, bare years, capitalized non-names).
//! The generator is a self-contained SplitMix64 so that the corpus never changes with a
//! dependency's version.

use super::pii::{PiiKind, PiiSpan, luhn};

/// A document and its gold spans.
#[derive(Debug, Clone)]
pub struct LabelledText {
    pub text: String,
    pub spans: Vec<PiiSpan>,
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, stable.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
    pub fn digits(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| char::from(b'0' + self.below(10) as u8))
            .collect()
    }
}

/// First names in the dictionary (none is also a common English word).
pub const FIRST_NAMES: &[&str] = &[
    "Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiroshi", "Ingrid", "Jamal",
    "Katarina", "Lars", "Maria", "Nadia", "Oskar", "Priya", "Rafael", "Sofia", "Tomasz", "Yusuf",
];
/// Surnames in the dictionary.
pub const SURNAMES: &[&str] = &[
    "Garcia",
    "Nakamura",
    "Kowalski",
    "Okafor",
    "Lindqvist",
    "Rossi",
    "Petrov",
    "Haddad",
    "Schneider",
    "Fernandes",
    "Novak",
    "Jansen",
    "Moreau",
    "Svensson",
    "Tanaka",
    "Dubois",
];

/// Every dictionary name the corpus uses.
pub fn corpus_names() -> Vec<&'static str> {
    FIRST_NAMES.iter().chain(SURNAMES).copied().collect()
}

const MONTHS: &[&str] = &[
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

pub(super) fn gen_value(rng: &mut SplitMix64, kind: PiiKind) -> String {
    match kind {
        PiiKind::Email => {
            let f = rng.pick(FIRST_NAMES).to_lowercase();
            let l = rng.pick(SURNAMES).to_lowercase();
            let dom = rng.pick(&[
                "example.com",
                "mail.example.org",
                "clinic-north.co.uk",
                "uni.edu",
            ]);
            match rng.below(3) {
                0 => format!("{f}.{l}@{dom}"),
                1 => format!("{f}{}@{dom}", rng.below(100)),
                _ => format!("{}_{l}+lab@{dom}", &f[..1]),
            }
        }
        PiiKind::Phone => match rng.below(7) {
            0 => format!("+44 20 {} {}", rng.digits(4), rng.digits(4)),
            1 => format!(
                "+1 ({}) {}-{}",
                200 + rng.below(800),
                200 + rng.below(800),
                rng.digits(4)
            ),
            2 => format!(
                "({}) {}-{}",
                200 + rng.below(800),
                200 + rng.below(800),
                rng.digits(4)
            ),
            3 => format!(
                "{}-{}-{}",
                200 + rng.below(800),
                200 + rng.below(800),
                rng.digits(4)
            ),
            4 => format!(
                "0{} {} {}",
                100 + rng.below(900),
                100 + rng.below(900),
                rng.digits(4)
            ),
            5 => format!(
                "0{} {} {} {} {}",
                1 + rng.below(9),
                rng.digits(2),
                rng.digits(2),
                rng.digits(2),
                rng.digits(2)
            ),
            _ => format!("+49 30 {}", rng.digits(8)),
        },
        PiiKind::Ssn => {
            let area = loop {
                let a = 1 + rng.below(899);
                if a != 666 {
                    break a;
                }
            };
            format!(
                "{area:03}-{:02}-{:04}",
                1 + rng.below(99),
                1 + rng.below(9999)
            )
        }
        PiiKind::Iban => {
            let ib = make_iban(rng, true);
            if rng.below(2) == 0 { group4(&ib) } else { ib }
        }
        PiiKind::Card => {
            let c = make_card(rng, true);
            match rng.below(3) {
                0 => c,
                1 => group4(&c),
                _ => group4(&c).replace(' ', "-"),
            }
        }
        PiiKind::Date => {
            let (y, m, d) = (1940 + rng.below(85), 1 + rng.below(12), 1 + rng.below(28));
            match rng.below(5) {
                0 => format!("{y}-{m:02}-{d:02}"),
                1 => format!("{m:02}/{d:02}/{y}"),
                2 => format!("{d:02}.{m:02}.{y}"),
                3 => format!("{d} {} {y}", MONTHS[m as usize - 1]),
                _ => format!("{} {d}, {y}", MONTHS[m as usize - 1]),
            }
        }
        PiiKind::Url => {
            let host = rng.pick(&[
                "www.example.org",
                "portal.clinic-north.net",
                "records.example.com",
            ]);
            match rng.below(3) {
                0 => format!("https://{host}/patients/{}", rng.digits(5)),
                1 => format!("http://{host}/view?id={}&tab=notes", rng.digits(6)),
                _ => format!("www.example-health.com/p/{}", rng.digits(4)),
            }
        }
        PiiKind::Ip => match rng.below(3) {
            0 | 1 => format!(
                "{}.{}.{}.{}",
                1 + rng.below(254),
                rng.below(256),
                rng.below(256),
                1 + rng.below(254)
            ),
            _ => format!(
                "2001:db8:{:x}::{:x}",
                rng.below(0xffff),
                1 + rng.below(0xfffe)
            ),
        },
        PiiKind::Name => format!("{} {}", rng.pick(FIRST_NAMES), rng.pick(SURNAMES)),
    }
}

fn group4(s: &str) -> String {
    s.as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A German IBAN (DE + check + 18 digits) with a correct, or deliberately wrong, check number.
fn make_iban(rng: &mut SplitMix64, valid: bool) -> String {
    let bban = rng.digits(18);
    // Check digits: 98 - (BBAN ‖ "DE00" as digits) mod 97; D=13, E=14.
    let mut rem: u64 = 0;
    for ch in format!("{bban}131400").chars() {
        rem = (rem * 10 + u64::from(ch.to_digit(10).unwrap_or(0))) % 97;
    }
    let mut check = 98 - rem;
    if !valid {
        check = (check + 1 + rng.below(96)) % 97;
        if check < 2 {
            check += 2;
        }
    }
    format!("DE{check:02}{bban}")
}

/// A 16-digit Visa/Mastercard number, Luhn-valid or with a wrong check digit.
fn make_card(rng: &mut SplitMix64, valid: bool) -> String {
    let prefix = if rng.below(2) == 0 {
        "4".to_string()
    } else {
        format!("5{}", 1 + rng.below(5))
    };
    let body = format!("{prefix}{}", rng.digits(15 - prefix.len()));
    let check = (0..10).find(|d| luhn(&format!("{body}{d}"))).unwrap_or(0);
    let d = if valid {
        check
    } else {
        (check + 1 + rng.below(9) as u32) % 10
    };
    format!("{body}{d}")
}

fn hard_negative(rng: &mut SplitMix64) -> String {
    match rng.below(14) {
        0 => {
            // Structurally invalid SSNs.
            let s = match rng.below(5) {
                0 => format!("000-{:02}-{}", 1 + rng.below(99), rng.digits(4)),
                1 => format!("666-{:02}-{}", 1 + rng.below(99), rng.digits(4)),
                2 => format!(
                    "9{}-{:02}-{}",
                    rng.digits(2),
                    1 + rng.below(99),
                    rng.digits(4)
                ),
                3 => format!("{}-00-{}", 100 + rng.below(500), rng.digits(4)),
                _ => format!("{}-{:02}-0000", 100 + rng.below(500), 1 + rng.below(99)),
            };
            format!("The form listed {s}, which is not a valid number.")
        }
        1 => format!(
            "Rejected account {} (bad check digits).",
            make_iban(rng, false)
        ),
        2 => {
            let c = make_card(rng, false);
            format!("Tracking reference {} was scanned twice.", group4(&c))
        }
        3 => format!(
            "We upgraded to version {}.{}.{} last week.",
            rng.below(20),
            rng.below(30),
            rng.below(100)
        ),
        4 => format!(
            "The device costs ${},{:03}.{:02} before tax.",
            1 + rng.below(9),
            rng.below(1000),
            rng.below(100)
        ),
        5 => format!(
            "The meeting starts at {}:{:02} sharp.",
            8 + rng.below(10),
            rng.below(60)
        ),
        6 => format!(
            "About {}/{} of the cohort responded.",
            1 + rng.below(3),
            4 + rng.below(6)
        ),
        7 => format!(
            "The trial ran from {} to {}.",
            1990 + rng.below(20),
            2011 + rng.below(14)
        ),
        8 => format!(
            "Invalid date {}-{}-{} was rejected.",
            2000 + rng.below(25),
            13 + rng.below(6),
            10 + rng.below(20)
        ),
        9 => format!(
            "Address {}.{}.{}.{} is out of range.",
            256 + rng.below(700),
            rng.below(256),
            rng.below(256),
            rng.below(256)
        ),
        10 => "The Board met in Boston with Doctor Who fans on Monday.".to_string(),
        11 => format!(
            "Dose: {} mg twice daily, {} mL saline.",
            5 * (1 + rng.below(100)),
            rng.below(500)
        ),
        12 => format!(
            "Order #{} shipped in {} boxes.",
            rng.digits(7),
            2 + rng.below(9)
        ),
        _ => format!(
            "Log timestamp {}:{:02}:{:02} shows a retry.",
            rng.below(24),
            rng.below(60),
            rng.below(60)
        ),
    }
}

const TEMPLATES: &[(&str, &str)] = &[
    ("Please contact ", " for the follow-up."),
    ("The record shows ", " as of the last visit."),
    ("Value on file: ", "."),
    ("According to the intake form, ", " was provided."),
    ("Updated (", ") after review."),
];

/// Generates `docs` documents of 1-4 sentences each; about 70 % of sentences carry PII.
pub fn generate_corpus(seed: u64, docs: usize) -> Vec<LabelledText> {
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::with_capacity(docs);
    for _ in 0..docs {
        let mut text = String::new();
        let mut spans = Vec::new();
        for i in 0..1 + rng.below(4) {
            if i > 0 {
                text.push(' ');
            }
            if rng.below(10) < 7 {
                let kind = *rng.pick(&PiiKind::ALL);
                let (pre, post) = *rng.pick(TEMPLATES);
                let v = gen_value(&mut rng, kind);
                text.push_str(pre);
                let start = text.len();
                text.push_str(&v);
                spans.push(PiiSpan {
                    start,
                    end: text.len(),
                    kind,
                });
                text.push_str(post);
            } else {
                text.push_str(&hard_negative(&mut rng));
            }
        }
        out.push(LabelledText { text, spans });
    }
    out
}

/// Precision, recall and counts for one PII type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    pub kind: PiiKind,
    pub true_pos: usize,
    pub false_pos: usize,
    pub false_neg: usize,
}

impl Score {
    pub fn precision(&self) -> f64 {
        let d = self.true_pos + self.false_pos;
        if d == 0 {
            1.0
        } else {
            self.true_pos as f64 / d as f64
        }
    }
    pub fn recall(&self) -> f64 {
        let d = self.true_pos + self.false_neg;
        if d == 0 {
            1.0
        } else {
            self.true_pos as f64 / d as f64
        }
    }
}

/// Scores detections against gold spans: a true positive is an exact span with the same type.
pub fn score(corpus: &[LabelledText], detect: impl Fn(&str) -> Vec<PiiSpan>) -> Vec<Score> {
    let mut scores: Vec<Score> = PiiKind::ALL
        .iter()
        .map(|&kind| Score {
            kind,
            true_pos: 0,
            false_pos: 0,
            false_neg: 0,
        })
        .collect();
    let ix = |k: PiiKind| PiiKind::ALL.iter().position(|x| *x == k).unwrap_or(0);
    for doc in corpus {
        let found = detect(&doc.text);
        for f in &found {
            if doc.spans.contains(f) {
                scores[ix(f.kind)].true_pos += 1;
            } else {
                scores[ix(f.kind)].false_pos += 1;
            }
        }
        for g in &doc.spans {
            if !found.contains(g) {
                scores[ix(g.kind)].false_neg += 1;
            }
        }
    }
    scores
}
