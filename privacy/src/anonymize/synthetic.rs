//! Synthetic identities for demos and tests: what `tutela demo` adds to each row of the public
//! demo data (names, national ID numbers, dates of birth, postcodes, a free-text note full of
//! PII) so that the sites have something real to anonymize, and the column declaration and
//! anonymization pipeline the demo's sites use for it. Every value is made up from a seed.

use super::corpus::{FIRST_NAMES, SURNAMES, SplitMix64};
use super::pii::PiiKind;

/// The identity columns, in the order [`SyntheticIdentity::cells`] gives them, with their
/// declared role and type (as in a column declaration file).
pub const IDENTITY_COLUMNS: [(&str, &str, &str); 6] = [
    ("record_number", "direct_identifier", "text"),
    ("name", "direct_identifier", "text"),
    ("national_id", "direct_identifier", "text"),
    ("date_of_birth", "quasi_identifier", "date"),
    ("postcode", "quasi_identifier", "text"),
    ("note", "free_text", "text"),
];

/// The demo's anonymization pipeline for the identity columns: identifiers dropped or
/// pseudonymized, the note redacted, and 5-anonymity over date of birth and postcode.
pub const DEMO_ANONYMIZE_TOML: &str = r#"# Anonymization of the demo's synthetic identity columns (see tutela_privacy::anonymize).
[columns.record_number]
action = "pseudonymize"
length = 16

[columns.name]
action = "drop"

[columns.national_id]
action = "drop"

[columns.note]
action = "redact"

[k_anonymity]
k = 5
max_suppression = 0.05

[[k_anonymity.qi]]
column = "date_of_birth"
levels = [{ action = "date_truncate", to = "year" }, { action = "suppress" }]

[[k_anonymity.qi]]
column = "postcode"
levels = [{ action = "prefix", keep = 3 }, { action = "prefix", keep = 1 }, { action = "suppress" }]
"#;

/// A column declaration (TOML) for a file whose columns are the identity columns followed by
/// `features` (floats) and the `label` (text).
pub fn declaration_toml(features: &[&str], label: &str) -> String {
    let mut out =
        String::from("# Every column of the data file, its type and its data-protection role.\n");
    let mut column = |name: &str, role: &str, ty: &str| {
        out.push_str(&format!(
            "\n[[column]]\nname = {name:?}\nrole = \"{role}\"\ntype = \"{ty}\"\n"
        ));
    };
    for (name, role, ty) in IDENTITY_COLUMNS {
        column(name, role, ty);
    }
    for f in features {
        column(f, "feature", "float");
    }
    column(label, "label", "text");
    out
}

/// Quotes a CSV field when it needs it (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// A synthetic person's identifying data: what `tutela demo` adds to each row of the public demo
/// data so that the sites have something real to anonymize. Every value is made up from the seed.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticIdentity {
    /// A hospital record number, e.g. `MRN-0004711`.
    pub record_number: String,
    /// `First Last` from the dictionary.
    pub name: String,
    /// A US SSN that passes the SSA's structural rules.
    pub national_id: String,
    /// `YYYY-MM-DD`, 1940..=1999.
    pub date_of_birth: String,
    /// Five digits from a few regional prefixes (so that truncated postcodes form groups).
    pub postcode: String,
    /// A clinician's free-text note naming the patient, with contact details and the SSN.
    pub note: String,
}

impl SyntheticIdentity {
    /// The identity's cells in the order of [`IDENTITY_COLUMNS`].
    pub fn cells(&self) -> [&str; 6] {
        [
            &self.record_number,
            &self.name,
            &self.national_id,
            &self.date_of_birth,
            &self.postcode,
            &self.note,
        ]
    }

    /// The cells as the start of a CSV line (each quoted as needed), ending in a comma.
    pub fn csv_prefix(&self) -> String {
        let mut out = String::new();
        for c in self.cells() {
            out.push_str(&csv_field(c));
            out.push(',');
        }
        out
    }
}

/// The header of the identity columns, ending in a comma, for [`SyntheticIdentity::csv_prefix`].
pub fn identity_header_prefix() -> String {
    IDENTITY_COLUMNS
        .iter()
        .map(|(n, _, _)| format!("{n},"))
        .collect()
}

/// `n` synthetic identities from `seed`; the same seed gives the same identities.
pub fn synthetic_identities(seed: u64, n: usize) -> Vec<SyntheticIdentity> {
    let mut rng = SplitMix64::new(seed ^ 0x1D_E471_7135);
    const PREFIXES: &[&str] = &["021", "100", "606", "941", "981"];
    (0..n)
        .map(|i| {
            let first = *rng.pick(FIRST_NAMES);
            let last = *rng.pick(SURNAMES);
            let name = format!("{first} {last}");
            let national_id = super::corpus::gen_value(&mut rng, PiiKind::Ssn);
            let (y, m, d) = (1940 + rng.below(60), 1 + rng.below(12), 1 + rng.below(28));
            let date_of_birth = format!("{y}-{m:02}-{d:02}");
            let postcode = format!("{}{}", rng.pick(PREFIXES), rng.digits(2));
            let email = format!(
                "{}.{}@example.com",
                first.to_lowercase(),
                last.to_lowercase()
            );
            let phone = super::corpus::gen_value(&mut rng, PiiKind::Phone);
            let note = match rng.below(3) {
                0 => format!(
                    "{name} seen in clinic; call back on {phone} or {email}. SSN {national_id} on file."
                ),
                1 => format!(
                    "Biopsy reviewed with {first}. Contact {email}, phone {phone}. Insurance ID {national_id}."
                ),
                _ => format!(
                    "Patient {last} ({name}) reached at {phone}; results sent to {email}."
                ),
            };
            SyntheticIdentity {
                record_number: format!("MRN-{:07}", 1000 + i as u64 * 7 + rng.below(7)),
                name,
                national_id,
                date_of_birth,
                postcode,
                note,
            }
        })
        .collect()
}

#[cfg(test)]
mod synthetic_tests {
    use super::*;

    #[test]
    fn identities_are_reproducible_and_valid() {
        let a = synthetic_identities(7, 200);
        assert_eq!(a, synthetic_identities(7, 200));
        assert_ne!(a, synthetic_identities(8, 200));
        let mut mrns = std::collections::HashSet::new();
        for p in &a {
            assert!(mrns.insert(p.record_number.clone()), "duplicate MRN");
            assert!(crate::anonymize::pii::valid_ssn(
                &p.national_id.replace('-', "")
            ));
            assert!(crate::anonymize::schema::Date::parse_iso(&p.date_of_birth).is_some());
            assert_eq!(p.postcode.len(), 5);
        }
    }

    #[test]
    fn notes_are_fully_redacted_with_the_names_of_the_identifier_column() {
        let people = synthetic_identities(11, 300);
        let redactor =
            crate::anonymize::pii::PiiRedactor::new(people.iter().map(|p| p.name.as_str()))
                .unwrap();
        for p in &people {
            let (clean, _) = redactor.redact(&p.note);
            let first = p.name.split(' ').next().unwrap();
            let last = p.name.split(' ').nth(1).unwrap();
            for secret in [p.national_id.as_str(), first, last] {
                assert!(!clean.contains(secret), "{secret} left in {clean:?}");
            }
            assert!(!clean.contains('@'), "{clean}");
        }
    }
}

#[cfg(test)]
mod pipeline_tests {
    use super::*;
    use crate::anonymize::{Pipeline, SiteSecret, reader};

    /// The demo's declaration and pipeline, over 190 synthetic people: no identifier, no PII of
    /// the note, 5-anonymity reached.
    #[test]
    fn the_demo_pipeline_anonymizes_synthetic_people() {
        let people = synthetic_identities(3, 190);
        let mut csv = format!("{}x,diagnosis\n", identity_header_prefix());
        for (i, p) in people.iter().enumerate() {
            csv.push_str(&format!(
                "{}{}.5,{}\n",
                p.csv_prefix(),
                i,
                if i % 3 == 0 { "M" } else { "B" }
            ));
        }
        let declaration = declaration_toml(&["x"], "diagnosis");
        let pipeline = Pipeline::from_toml(&declaration, DEMO_ANONYMIZE_TOML).unwrap();
        let raw = reader::read_csv(
            csv.as_bytes(),
            std::path::Path::new("demo.csv"),
            pipeline.schema(),
        )
        .unwrap();
        let secret = SiteSecret::new(&[9u8; 32]).unwrap();
        let (out, report) = pipeline.run(&raw, &secret).unwrap();
        let k = report.k_anonymity.as_ref().unwrap();
        assert!(k.k_achieved >= 5, "{k:?}");
        assert!(out.rows.len() >= 180, "{} rows left", out.rows.len());
        let text: String = out
            .rows
            .iter()
            .flat_map(|r| r.iter().map(|v| v.canonical() + "|"))
            .collect();
        for p in &people {
            for secret in [
                p.name.as_str(),
                p.national_id.as_str(),
                p.record_number.as_str(),
                p.date_of_birth.as_str(),
            ] {
                assert!(!text.contains(secret), "{secret} survived anonymization");
            }
        }
        let names: Vec<&str> = report.columns_out.iter().map(String::as_str).collect();
        assert!(
            !names.contains(&"name") && !names.contains(&"national_id"),
            "{names:?}"
        );
    }
}
