//! The declarative configuration and its pure per-cell transforms.
//!
//! TOML form (every key):
//! ```toml
//! person_column = "patient_id"      # whose id seeds per-person date shifts (raw value)
//!
//! [columns.name]
//! action = "drop"
//! [columns.patient_id]
//! action = "pseudonymize"
//! length = 16                       # hex characters kept, 8..=64 (default 16 = 64 bits)
//! [columns.age]
//! action = "bin"
//! width = 10                        # or: edges = [0, 18, 40, 65]
//! [columns.birth]
//! action = "date_truncate"
//! to = "month"                      # or "year"
//! [columns.zip]
//! action = "prefix"
//! keep = 3
//! [columns.diagnosis]
//! action = "hierarchy"
//! hierarchy = "icd"
//! levels = 1                        # steps up the tree (default 1)
//! [columns.admitted]
//! action = "date_shift"
//! max_days = 30                     # shift uniformly in [-30, 30], per person
//! [columns.notes]
//! action = "redact"
//!
//! [hierarchies.icd]                 # child = parent; the root is any value without a parent
//! I10 = "Circulatory"
//! Circulatory = "*"
//!
//! [redaction]
//! names = ["Alice", "Smith"]        # extra name dictionary (identifier columns are added)
//!
//! [k_anonymity]                     # see kanon::KAnonConfig
//! ```
//! The site secret is *not* part of the configuration: the configuration is hashed into the
//! report and may be shared; the secret never leaves the site.

use std::collections::{BTreeMap, HashMap};

use ring::hmac;
use serde::{Deserialize, Serialize};

use super::AnonymizeError;
use super::kanon::KAnonConfig;
use super::schema::{ColumnType, Value};

/// Default pseudonym length in hex characters (64 bits): for a million distinct identifiers the
/// chance of any collision is about n²/2⁶⁵ ≈ 3·10⁻⁸.
pub const DEFAULT_PSEUDONYM_HEX: usize = 16;

/// The minimum site-secret length: an HMAC key should carry at least 128 bits.
pub const MIN_SECRET_LEN: usize = 16;

/// The site's HMAC key for pseudonyms and date shifts. Kept out of the configuration.
pub struct SiteSecret(hmac::Key);

impl SiteSecret {
    /// Wraps raw key bytes (at least [`MIN_SECRET_LEN`]).
    pub fn new(bytes: &[u8]) -> Result<Self, AnonymizeError> {
        if bytes.len() < MIN_SECRET_LEN {
            return Err(AnonymizeError::WeakSecret {
                min: MIN_SECRET_LEN,
                got: bytes.len(),
            });
        }
        Ok(SiteSecret(hmac::Key::new(hmac::HMAC_SHA256, bytes)))
    }

    /// HMAC over a domain-separation label and the input, so that a pseudonym never equals the
    /// bytes a date shift was derived from.
    fn tag(&self, domain: &[u8], input: &[u8]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(domain);
        ctx.update(&[0]);
        ctx.update(input);
        ctx.sign()
    }

    /// The keyed pseudonym of `input`: the first `hex_len` hex characters of
    /// HMAC-SHA-256(secret, "tutela/pseudonym/v1" ‖ 0 ‖ input).
    pub fn pseudonym(&self, input: &str, hex_len: usize) -> String {
        let tag = self.tag(b"tutela/pseudonym/v1", input.as_bytes());
        let mut h = hex::encode(tag.as_ref());
        h.truncate(hex_len);
        h
    }

    /// The per-person date shift in days, uniform in `[-max_days, max_days]`: the first 8 bytes of
    /// HMAC-SHA-256(secret, "tutela/date-shift/v1" ‖ 0 ‖ person) modulo 2·max+1 (bias below 2⁻⁴⁰).
    pub fn date_shift_days(&self, person: &str, max_days: u32) -> i32 {
        let tag = self.tag(b"tutela/date-shift/v1", person.as_bytes());
        let mut b = [0u8; 8];
        b.copy_from_slice(&tag.as_ref()[..8]);
        let span = 2 * u64::from(max_days) + 1;
        (u64::from_le_bytes(b) % span) as i32 - max_days as i32
    }
}

/// Precision of a date truncation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatePrecision {
    /// `YYYY-MM`.
    Month,
    /// `YYYY`.
    Year,
}

fn default_pseudonym_len() -> usize {
    DEFAULT_PSEUDONYM_HEX
}
fn one() -> usize {
    1
}

/// What to do with one column (or, in a k-anonymity lattice, one generalization level).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Transform {
    /// Leave the column as it is (the default for unconfigured columns).
    Keep,
    /// Remove the column.
    Drop,
    /// Replace each value by its keyed pseudonym (hex, `length` characters).
    Pseudonymize {
        #[serde(default = "default_pseudonym_len")]
        length: usize,
    },
    /// Numeric bins: fixed `width` (`40-49`) or explicit ascending `edges` (`18-39`, `<0`, `>=65`).
    Bin {
        #[serde(default)]
        width: Option<f64>,
        #[serde(default)]
        edges: Option<Vec<f64>>,
    },
    /// Dates to month or year.
    DateTruncate { to: DatePrecision },
    /// Keep the first `keep` characters and mark the cut with `*` (postcodes).
    Prefix { keep: usize },
    /// Replace a category by its ancestor `levels` steps up a hierarchy.
    Hierarchy {
        hierarchy: String,
        #[serde(default = "one")]
        levels: usize,
    },
    /// Replace every value by `*` (the top of every generalization lattice).
    Suppress,
    /// Shift dates by a per-person offset in `[-max_days, max_days]`.
    DateShift { max_days: u32 },
    /// Redact PII in free text with typed placeholders.
    Redact,
}

impl Transform {
    /// A short description for reports.
    pub fn describe(&self) -> String {
        match self {
            Transform::Keep => "keep".into(),
            Transform::Drop => "drop".into(),
            Transform::Pseudonymize { length } => {
                format!("pseudonymize (HMAC-SHA-256, {length} hex)")
            }
            Transform::Bin { width: Some(w), .. } => format!("bin width {w}"),
            Transform::Bin { edges, .. } => {
                format!("bin edges {:?}", edges.as_deref().unwrap_or(&[]))
            }
            Transform::DateTruncate { to } => format!("date to {to:?}").to_lowercase(),
            Transform::Prefix { keep } => format!("prefix {keep}"),
            Transform::Hierarchy { hierarchy, levels } => {
                format!("hierarchy {hierarchy} +{levels}")
            }
            Transform::Suppress => "suppress".into(),
            Transform::DateShift { max_days } => format!("date shift ±{max_days} days"),
            Transform::Redact => "redact PII".into(),
        }
    }

    /// Whether this transform is a generalization (allowed as a k-anonymity level).
    pub fn is_generalization(&self) -> bool {
        matches!(
            self,
            Transform::Bin { .. }
                | Transform::DateTruncate { .. }
                | Transform::Prefix { .. }
                | Transform::Hierarchy { .. }
                | Transform::Suppress
        )
    }

    /// Checks parameters and the column type; `column` names the column in errors.
    pub fn validate(
        &self,
        column: &str,
        ty: ColumnType,
        hierarchies: &Hierarchies,
    ) -> Result<(), AnonymizeError> {
        let bad = |reason: String| AnonymizeError::InvalidConfig {
            column: column.to_string(),
            reason,
        };
        match self {
            Transform::Pseudonymize { length } if !(8..=64).contains(length) => {
                Err(bad(format!("pseudonym length {length} not in 8..=64")))
            }
            Transform::Bin { width, edges } => {
                if !matches!(ty, ColumnType::Int | ColumnType::Float) {
                    return Err(bad(format!("bin needs a numeric column, not {ty:?}")));
                }
                match (width, edges) {
                    (Some(w), None) if *w > 0.0 && w.is_finite() => Ok(()),
                    (None, Some(e))
                        if !e.is_empty()
                            && e.iter().all(|x| x.is_finite())
                            && e.windows(2).all(|p| p[0] < p[1]) =>
                    {
                        Ok(())
                    }
                    _ => Err(bad(
                        "bin needs exactly one of a positive `width` or strictly ascending `edges`"
                            .into(),
                    )),
                }
            }
            Transform::DateTruncate { .. } | Transform::DateShift { .. }
                if ty != ColumnType::Date =>
            {
                Err(bad(format!(
                    "{} needs a date column, not {ty:?}",
                    self.describe()
                )))
            }
            Transform::Prefix { .. } if !matches!(ty, ColumnType::Text | ColumnType::Int) => Err(
                bad(format!("prefix needs a text or int column, not {ty:?}")),
            ),
            Transform::Hierarchy { hierarchy, .. } if !hierarchies.contains(hierarchy) => {
                Err(bad(format!("unknown hierarchy `{hierarchy}`")))
            }
            Transform::Redact if ty != ColumnType::Text => {
                Err(bad(format!("redact needs a text column, not {ty:?}")))
            }
            _ => Ok(()),
        }
    }
}

/// Redaction settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedactionConfig {
    /// Extra name dictionary (the text of direct-identifier columns is added at run time).
    #[serde(default)]
    pub names: Vec<String>,
}

/// The whole anonymization configuration (see the module docs for the TOML form).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnonymizeConfig {
    /// The column whose raw value identifies the person for date shifting.
    #[serde(default)]
    pub person_column: Option<String>,
    /// Per-column transforms; unlisted columns are kept.
    #[serde(default)]
    pub columns: BTreeMap<String, Transform>,
    /// Category hierarchies: name → (child → parent).
    #[serde(default)]
    pub hierarchies: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    pub redaction: RedactionConfig,
    #[serde(default)]
    pub k_anonymity: Option<KAnonConfig>,
}

impl AnonymizeConfig {
    /// Parses a TOML configuration (no semantic checks: see [`super::Pipeline::new`]).
    pub fn from_toml(text: &str) -> Result<Self, AnonymizeError> {
        toml::from_str(text).map_err(|e| AnonymizeError::Parse(format!("config: {e}")))
    }

    /// The transform configured for a column (`Keep` when absent).
    pub fn transform_for(&self, column: &str) -> &Transform {
        self.columns.get(column).unwrap_or(&Transform::Keep)
    }

    /// SHA-256 of the canonical JSON form of the configuration (maps are sorted, so whitespace,
    /// comments and key order in the TOML do not change it), hex.
    pub fn digest(&self) -> String {
        // Serializing plain data into a Vec cannot fail; an empty buffer would still hash.
        let json = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(ring::digest::digest(&ring::digest::SHA256, &json).as_ref())
    }
}

/// Validated category hierarchies, ready for lookups.
#[derive(Debug, Clone, Default)]
pub struct Hierarchies {
    parents: HashMap<String, HashMap<String, String>>,
}

impl Hierarchies {
    /// Validates (no cycles) and indexes the configured hierarchies.
    pub fn new(
        config: &BTreeMap<String, BTreeMap<String, String>>,
    ) -> Result<Self, AnonymizeError> {
        let mut parents = HashMap::new();
        for (name, map) in config {
            for start in map.keys() {
                // Walking up at most |map| steps must reach a root; otherwise there is a cycle.
                let mut node = start;
                let mut steps = 0;
                while let Some(p) = map.get(node) {
                    node = p;
                    steps += 1;
                    if steps > map.len() {
                        return Err(AnonymizeError::BadHierarchy {
                            hierarchy: name.clone(),
                            reason: format!("cycle through `{start}`"),
                        });
                    }
                }
            }
            let m: HashMap<String, String> =
                map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            parents.insert(name.clone(), m);
        }
        Ok(Hierarchies { parents })
    }

    /// Whether a hierarchy of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.parents.contains_key(name)
    }

    /// The ancestor `levels` steps above `value` (the root if the tree is shorter); `None` if the
    /// value is not in the hierarchy at all.
    pub fn ancestor<'a>(&'a self, name: &str, value: &'a str, levels: usize) -> Option<&'a str> {
        let map = self.parents.get(name)?;
        let is_member = map.contains_key(value) || map.values().any(|p| p == value);
        if !is_member {
            return None;
        }
        let mut node = value;
        for _ in 0..levels {
            match map.get(node) {
                Some(p) => node = p,
                None => break,
            }
        }
        Some(node)
    }
}

fn fmt_num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

/// The bin label of a number. Integer cells get closed integer ranges (`40-49`); float cells get
/// half-open ranges (`[40, 50)`), because their upper end is not representable as "hi - 1".
fn bin_label(x: f64, is_int: bool, width: Option<f64>, edges: Option<&[f64]>) -> Option<String> {
    let (lo, hi) = match (width, edges) {
        (Some(w), _) => {
            let lo = (x / w).floor() * w;
            (lo, lo + w)
        }
        (None, Some(e)) => {
            let first = *e.first()?;
            let last = *e.last()?;
            if x < first {
                return Some(format!("<{}", fmt_num(first)));
            }
            if x >= last {
                return Some(format!(">={}", fmt_num(last)));
            }
            let i = e.partition_point(|b| *b <= x);
            (e[i - 1], e[i])
        }
        (None, None) => return None,
    };
    Some(if is_int && lo.fract() == 0.0 && hi.fract() == 0.0 {
        format!("{}-{}", fmt_num(lo), fmt_num(hi - 1.0))
    } else {
        format!("[{}, {})", fmt_num(lo), fmt_num(hi))
    })
}

/// Applies a generalization (bin, date truncation, prefix, hierarchy, suppress; `Keep` is the
/// identity) to one cell. `column`/`row` only name the cell in errors. Nulls stay null: a missing
/// value reveals nothing a generalization could hide.
pub fn generalize(
    t: &Transform,
    v: &Value,
    hierarchies: &Hierarchies,
    column: &str,
    row: usize,
) -> Result<Value, AnonymizeError> {
    let bad = |reason: String| AnonymizeError::BadCell {
        column: column.to_string(),
        row,
        reason,
    };
    if matches!(v, Value::Null) {
        return Ok(Value::Null);
    }
    Ok(match t {
        Transform::Keep => v.clone(),
        Transform::Suppress => Value::Text("*".into()),
        Transform::Bin { width, edges } => {
            let (x, is_int) = match v {
                Value::Int(i) => (*i as f64, true),
                Value::Float(f) if f.is_finite() => (*f, false),
                other => return Err(bad(format!("cannot bin a {} cell `{other}`", other.kind()))),
            };
            let label = bin_label(x, is_int, *width, edges.as_deref())
                .ok_or_else(|| bad("bin has neither width nor edges".into()))?;
            Value::Text(label)
        }
        Transform::DateTruncate { to } => {
            let (y, m, _) = match v {
                Value::Date(d) => d.ymd(),
                other => {
                    return Err(bad(format!(
                        "cannot truncate a {} cell as a date",
                        other.kind()
                    )));
                }
            };
            Value::Text(match to {
                DatePrecision::Month => format!("{y:04}-{m:02}"),
                DatePrecision::Year => format!("{y:04}"),
            })
        }
        Transform::Prefix { keep } => {
            let s = v.canonical();
            if s.chars().count() <= *keep {
                Value::Text(s)
            } else {
                let mut p: String = s.chars().take(*keep).collect();
                p.push('*');
                Value::Text(p)
            }
        }
        Transform::Hierarchy { hierarchy, levels } => {
            let s = v.canonical();
            match hierarchies.ancestor(hierarchy, &s, *levels) {
                Some(a) => Value::Text(a.to_string()),
                None => {
                    return Err(AnonymizeError::NotInHierarchy {
                        column: column.to_string(),
                        row,
                        value: s,
                        hierarchy: hierarchy.clone(),
                    });
                }
            }
        }
        other => {
            return Err(bad(format!(
                "`{}` is not a generalization",
                other.describe()
            )));
        }
    })
}
