//! Cells to feature values: the encoding a schema's feature column declares, compiled once
//! ([`ColumnEncoder::compile`]) and applied to every record the same way, whatever the source.
//!
//! A source gives each cell as a [`Cell`]: text (CSV, JSON, SQL `text`, Parquet strings), a
//! number, a boolean or a date (typed sources). The encoders accept both forms, so the same data
//! read from a CSV file, a Parquet file or a database yields the same features: a number is
//! parsed as f64 and then kept as f32 whichever way it came, a category, level or boolean
//! spelling is matched by [`LevelKey`] (a number by its value, so `1`, `1.0` and a Parquet `1`
//! are one level; other text exactly), a typed date skips the text format.

use std::collections::HashMap;

use tutela_privacy::anonymize::Date;

use super::schema::{FeatureColumn, FeatureKind, MissingRule, UnseenRule};

/// One cell as a source gives it. Text is trimmed by the reader; empty text is [`Cell::Missing`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cell<'a> {
    Missing,
    Text(&'a str),
    Number(f64),
    Bool(bool),
    Date(Date),
}

/// An owned [`Cell`], for sources that decode whole batches (Parquet, SQL, anonymized tables).
#[derive(Debug, Clone, PartialEq)]
pub enum OwnedCell {
    Missing,
    Text(String),
    Number(f64),
    Bool(bool),
    Date(Date),
}

impl OwnedCell {
    pub fn as_cell(&self) -> Cell<'_> {
        match self {
            OwnedCell::Missing => Cell::Missing,
            OwnedCell::Text(t) => Cell::text(t),
            OwnedCell::Number(x) => Cell::Number(*x),
            OwnedCell::Bool(b) => Cell::Bool(*b),
            OwnedCell::Date(d) => Cell::Date(*d),
        }
    }
}

impl<'a> Cell<'a> {
    /// A text cell, trimmed; empty text is missing.
    pub fn text(text: &'a str) -> Cell<'a> {
        let text = text.trim();
        if text.is_empty() {
            Cell::Missing
        } else {
            Cell::Text(text)
        }
    }

    /// The cell's text as a category, level or spelling is matched against: text as it is, a
    /// number in its shortest form (an integer without `.0`), a boolean as `true`/`false`, a date
    /// as `YYYY-MM-DD`.
    pub fn canonical(&self) -> String {
        match *self {
            Cell::Missing => String::new(),
            Cell::Text(t) => t.to_string(),
            Cell::Number(x) => {
                if x.fract() == 0.0 && x.abs() < 1e15 {
                    format!("{}", x as i64)
                } else {
                    format!("{x}")
                }
            }
            Cell::Bool(b) => b.to_string(),
            Cell::Date(d) => d.to_string(),
        }
    }
}

/// What a category, level or boolean spelling is matched by: text that parses as a finite number
/// by that number (so `1.0` written by pandas, a Parquet `1` and PostgreSQL's `1.00` are one
/// level, whichever side spells it how), any other text exactly as written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LevelKey {
    /// The number's bits, with -0 as 0.
    Number(u64),
    Text(String),
}

impl LevelKey {
    /// The key of a level as the schema spells it (or of a text cell).
    pub fn of_text(text: &str) -> LevelKey {
        match text.parse::<f64>() {
            Ok(x) if x.is_finite() => LevelKey::of_number(x),
            _ => LevelKey::Text(text.to_string()),
        }
    }

    fn of_number(x: f64) -> LevelKey {
        LevelKey::Number(if x == 0.0 { 0 } else { x.to_bits() })
    }

    /// The key of a cell: a number by its value, a boolean as `true`/`false`, a date as
    /// `YYYY-MM-DD`, text as [`of_text`](Self::of_text).
    pub fn of_cell(cell: Cell<'_>) -> LevelKey {
        match cell {
            Cell::Number(x) if x.is_finite() => LevelKey::of_number(x),
            Cell::Text(t) => LevelKey::of_text(t),
            other => LevelKey::Text(other.canonical()),
        }
    }
}

/// Why a present cell cannot be encoded (the reader adds file, line and column).
#[derive(Debug, Clone, PartialEq)]
pub enum CellProblem {
    /// Missing, and the column's rule is `refuse`.
    Missing,
    NotNumeric(String),
    NotFinite(String),
    /// A category not in the schema (`known`, abbreviated), and the column's `unseen` rule is
    /// `refuse`.
    UnknownCategory {
        value: String,
        known: String,
    },
    /// Not a level, a spelling or a date of the column; `expected` says what would be.
    Invalid {
        value: String,
        expected: String,
    },
}

/// A date format: `%Y` (four digits), `%m` and `%d` (one or two digits) and literal characters.
#[derive(Debug, Clone, PartialEq)]
pub struct DateFormat {
    text: String,
}

impl DateFormat {
    pub fn parse(format: &str) -> Result<DateFormat, String> {
        let mut chars = format.chars();
        let (mut year, mut month, mut day) = (0, 0, 0);
        while let Some(c) = chars.next() {
            if c == '%' {
                match chars.next() {
                    Some('Y') => year += 1,
                    Some('m') => month += 1,
                    Some('d') => day += 1,
                    other => {
                        return Err(format!(
                            "date format {format:?}: %{} is not supported (use %Y, %m and %d)",
                            other.map(String::from).unwrap_or_default()
                        ));
                    }
                }
            }
        }
        if (year, month, day) != (1, 1, 1) {
            return Err(format!(
                "date format {format:?} must have each of %Y, %m and %d exactly once"
            ));
        }
        Ok(DateFormat {
            text: format.to_string(),
        })
    }

    /// The date `text` spells in this format, if it is one.
    pub fn read(&self, text: &str) -> Option<Date> {
        let mut rest = text;
        let (mut year, mut month, mut day) = (0i32, 0u32, 0u32);
        let mut format = self.text.chars();
        while let Some(c) = format.next() {
            if c != '%' {
                rest = rest.strip_prefix(c)?;
                continue;
            }
            let (min, max) = match format.clone().next() {
                Some('Y') => (4, 4),
                _ => (1, 2),
            };
            let digits = rest
                .bytes()
                .take(max)
                .take_while(u8::is_ascii_digit)
                .count();
            if digits < min {
                return None;
            }
            let value: u32 = rest[..digits].parse().ok()?;
            rest = &rest[digits..];
            match format.next() {
                Some('Y') => year = i32::try_from(value).ok()?,
                Some('m') => month = value,
                _ => day = value,
            }
        }
        if !rest.is_empty() {
            return None;
        }
        Date::from_ymd(year, month, day)
    }
}

/// How a present value becomes features.
#[derive(Debug, Clone)]
enum ValueEncoding {
    Numeric {
        scale: Option<f32>,
    },
    Categorical {
        index: HashMap<LevelKey, usize>,
        known: String,
        unseen: UnseenRule,
        width: usize,
    },
    Ordinal {
        index: HashMap<LevelKey, usize>,
        known: String,
    },
    Boolean {
        /// Each spelling's key and the value it spells.
        spellings: HashMap<LevelKey, bool>,
        truthy: Vec<String>,
        falsy: Vec<String>,
    },
    Date {
        format: DateFormat,
        epoch: Date,
    },
}

/// What a missing cell becomes, compiled: the imputed value's features.
#[derive(Debug, Clone)]
enum Missing {
    Refuse,
    Impute(Vec<f32>),
    ImputeWithIndicator(Vec<f32>),
}

/// One feature column's compiled encoding.
#[derive(Debug, Clone)]
pub struct ColumnEncoder {
    name: String,
    value: ValueEncoding,
    missing: Missing,
    feature_names: Vec<String>,
}

/// Refuses a key that belongs to another type.
fn only_for(present: bool, key: &str, kind: &str, column_kind: FeatureKind) -> Result<(), String> {
    if present && format!("{column_kind:?}").to_lowercase() != kind {
        return Err(format!("`{key}` is for type = \"{kind}\" columns only"));
    }
    Ok(())
}

fn listed(values: &[String], key: &str) -> Result<(HashMap<LevelKey, usize>, String), String> {
    if values.is_empty() {
        return Err(format!("`{key}` is empty"));
    }
    let mut index = HashMap::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        if v.trim() != v || v.is_empty() {
            return Err(format!(
                "`{key}` has {v:?}: values are compared trimmed, so none may be empty or have surrounding spaces"
            ));
        }
        if index.insert(LevelKey::of_text(v), i).is_some() {
            return Err(format!(
                "`{key}` lists {v:?} twice (numbers are compared by value: `1` and `1.0` are one)"
            ));
        }
    }
    Ok((index, abbreviated(values)))
}

/// A list of values for a message; long lists are cut short.
pub(crate) fn abbreviated(values: &[String]) -> String {
    const SHOWN: usize = 12;
    let mut text = values
        .iter()
        .take(SHOWN)
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    if values.len() > SHOWN {
        text.push_str(&format!(", ... ({} in all)", values.len()));
    }
    text
}

impl ColumnEncoder {
    /// Compiles a column's declaration; the error says which key is wrong and why. `pixel_scale`
    /// divides numeric values (image schemas).
    pub fn compile(column: &FeatureColumn, pixel_scale: Option<f32>) -> Result<Self, String> {
        use FeatureKind::*;
        let kind = column.kind;
        only_for(
            column.categories.is_some(),
            "categories",
            "categorical",
            kind,
        )?;
        only_for(column.unseen.is_some(), "unseen", "categorical", kind)?;
        only_for(column.levels.is_some(), "levels", "ordinal", kind)?;
        only_for(column.true_values.is_some(), "true_values", "boolean", kind)?;
        only_for(
            column.false_values.is_some(),
            "false_values",
            "boolean",
            kind,
        )?;
        only_for(column.format.is_some(), "format", "date", kind)?;
        only_for(column.epoch.is_some(), "epoch", "date", kind)?;
        let name = &column.name;
        let (value, mut feature_names) = match kind {
            Numeric => (
                ValueEncoding::Numeric { scale: pixel_scale },
                vec![name.clone()],
            ),
            Categorical => {
                let categories = column
                    .categories
                    .as_deref()
                    .ok_or("a categorical column needs `categories`, the consortium's list")?;
                let (index, known) = listed(categories, "categories")?;
                let unseen = column.unseen.unwrap_or_default();
                let mut names: Vec<String> =
                    categories.iter().map(|c| format!("{name}={c}")).collect();
                if unseen == UnseenRule::Other {
                    names.push(format!("{name}=(other)"));
                }
                (
                    ValueEncoding::Categorical {
                        index,
                        known,
                        unseen,
                        width: names.len(),
                    },
                    names,
                )
            }
            Ordinal => {
                let levels = column
                    .levels
                    .as_deref()
                    .ok_or("an ordinal column needs `levels`, in order")?;
                let (index, known) = listed(levels, "levels")?;
                (ValueEncoding::Ordinal { index, known }, vec![name.clone()])
            }
            Boolean => {
                let truthy = column
                    .true_values
                    .clone()
                    .unwrap_or_else(|| vec!["true".into(), "1".into()]);
                let falsy = column
                    .false_values
                    .clone()
                    .unwrap_or_else(|| vec!["false".into(), "0".into()]);
                let (true_keys, _) = listed(&truthy, "true_values")?;
                let (false_keys, _) = listed(&falsy, "false_values")?;
                let mut spellings: HashMap<LevelKey, bool> =
                    true_keys.into_keys().map(|k| (k, true)).collect();
                for (key, i) in false_keys {
                    if spellings.insert(key, false).is_some() {
                        return Err(format!("{:?} is both a true and a false value", falsy[i]));
                    }
                }
                (
                    ValueEncoding::Boolean {
                        spellings,
                        truthy,
                        falsy,
                    },
                    vec![name.clone()],
                )
            }
            Date => {
                let format = DateFormat::parse(
                    column
                        .format
                        .as_deref()
                        .ok_or("a date column needs `format`, e.g. \"%Y-%m-%d\"")?,
                )?;
                let epoch = column
                    .epoch
                    .as_deref()
                    .ok_or("a date column needs `epoch`, the day that is 0, as YYYY-MM-DD")?;
                let epoch = tutela_privacy::anonymize::Date::parse_iso(epoch)
                    .ok_or_else(|| format!("`epoch` {epoch:?} is not a date (YYYY-MM-DD)"))?;
                (ValueEncoding::Date { format, epoch }, vec![name.clone()])
            }
        };
        let mut encoder = ColumnEncoder {
            name: name.clone(),
            value,
            missing: Missing::Refuse,
            feature_names: Vec::new(),
        };
        encoder.missing = match (column.missing, &column.impute) {
            (MissingRule::Refuse, None) => Missing::Refuse,
            (MissingRule::Refuse, Some(_)) => {
                return Err(
                    "`impute` needs `missing = \"impute\"` or \"impute_with_indicator\"".into(),
                );
            }
            (_, None) => {
                return Err(
                    "`missing` imputes, so the column needs `impute = { statistic = ..., value = ... }`"
                        .into(),
                );
            }
            (rule, Some(imputation)) => {
                let mut values = Vec::new();
                encoder
                    .encode_value(imputation.value.to_cell().as_cell(), &mut values)
                    .map_err(|p| format!("`impute.value` cannot be encoded: {}", describe(&p)))?;
                if rule == MissingRule::Impute {
                    Missing::Impute(values)
                } else {
                    feature_names.push(format!("{name}(missing)"));
                    Missing::ImputeWithIndicator(values)
                }
            }
        };
        encoder.feature_names = feature_names;
        Ok(encoder)
    }

    /// The column's name in the source.
    pub fn column(&self) -> &str {
        &self.name
    }

    /// The names of the features the column becomes, in order.
    pub fn feature_names(&self) -> &[String] {
        &self.feature_names
    }

    pub fn width(&self) -> usize {
        self.feature_names.len()
    }

    /// Appends the cell's features to `out` (exactly [`width`](Self::width) values when it
    /// succeeds; nothing is appended when it fails).
    pub fn encode(&self, cell: Cell<'_>, out: &mut Vec<f32>) -> Result<(), CellProblem> {
        let start = out.len();
        let indicator = match (&self.missing, cell) {
            (Missing::Refuse, Cell::Missing) => return Err(CellProblem::Missing),
            (Missing::Impute(v), Cell::Missing) => {
                out.extend_from_slice(v);
                return Ok(());
            }
            (Missing::ImputeWithIndicator(v), Cell::Missing) => {
                out.extend_from_slice(v);
                out.push(1.0);
                return Ok(());
            }
            (Missing::ImputeWithIndicator(_), _) => Some(0.0),
            _ => None,
        };
        if let Err(problem) = self.encode_value(cell, out) {
            out.truncate(start);
            return Err(problem);
        }
        out.extend(indicator);
        Ok(())
    }

    /// Appends a present cell's value features only (no imputation, no indicator): what the
    /// consortium statistics count (`data::stats`). A missing cell is [`CellProblem::Missing`].
    pub(crate) fn encode_present(
        &self,
        cell: Cell<'_>,
        out: &mut Vec<f32>,
    ) -> Result<(), CellProblem> {
        let start = out.len();
        let result = self.encode_value(cell, out);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    fn encode_value(&self, cell: Cell<'_>, out: &mut Vec<f32>) -> Result<(), CellProblem> {
        if cell == Cell::Missing {
            return Err(CellProblem::Missing);
        }
        let invalid = |expected: String| CellProblem::Invalid {
            value: cell.canonical(),
            expected,
        };
        match &self.value {
            ValueEncoding::Numeric { scale } => {
                let x = match cell {
                    Cell::Number(x) => x,
                    Cell::Bool(b) => f64::from(u8::from(b)),
                    Cell::Text(t) => t
                        .parse::<f64>()
                        .map_err(|_| CellProblem::NotNumeric(t.to_string()))?,
                    Cell::Date(_) | Cell::Missing => {
                        return Err(CellProblem::NotNumeric(cell.canonical()));
                    }
                };
                // Parsed as f64 and then narrowed whichever way the number came, so a text "0.1"
                // and a Parquet double 0.1 give the same f32.
                let value = x as f32;
                if !value.is_finite() {
                    return Err(CellProblem::NotFinite(cell.canonical()));
                }
                out.push(scale.map_or(value, |s| value * s));
            }
            ValueEncoding::Categorical {
                index,
                unseen,
                width,
                known,
            } => {
                let start = out.len();
                out.resize(start + width, 0.0);
                match (index.get(&LevelKey::of_cell(cell)), unseen) {
                    (Some(&i), _) => out[start + i] = 1.0,
                    (None, UnseenRule::Other) => out[start + width - 1] = 1.0,
                    (None, UnseenRule::Ignore) => {}
                    (None, UnseenRule::Refuse) => {
                        out.truncate(start);
                        return Err(CellProblem::UnknownCategory {
                            value: cell.canonical(),
                            known: known.clone(),
                        });
                    }
                }
            }
            ValueEncoding::Ordinal { index, known } => {
                let &level = index
                    .get(&LevelKey::of_cell(cell))
                    .ok_or_else(|| invalid(format!("one of the schema's levels ({known})")))?;
                out.push(level as f32);
            }
            ValueEncoding::Boolean {
                spellings,
                truthy,
                falsy,
            } => {
                let value = match cell {
                    Cell::Bool(b) => b,
                    _ => *spellings.get(&LevelKey::of_cell(cell)).ok_or_else(|| {
                        invalid(format!(
                            "a boolean the schema spells ({} for true, {} for false)",
                            abbreviated(truthy),
                            abbreviated(falsy)
                        ))
                    })?,
                };
                out.push(if value { 1.0 } else { 0.0 });
            }
            ValueEncoding::Date { format, epoch } => {
                let date = match cell {
                    Cell::Date(d) => d,
                    Cell::Text(t) => format.read(t).ok_or_else(|| {
                        invalid(format!("a date in the format {:?}", format.text))
                    })?,
                    _ => return Err(invalid(format!("a date in the format {:?}", format.text))),
                };
                // In i64: two i32 day counts (a Parquet date32 may be any i32) can differ by more
                // than an i32 holds.
                out.push((i64::from(date.0) - i64::from(epoch.0)) as f32);
            }
        }
        Ok(())
    }
}

/// A problem in words, for schema errors (the imputed value is the consortium's, not data).
fn describe(problem: &CellProblem) -> String {
    match problem {
        CellProblem::Missing => "it is empty".into(),
        CellProblem::NotNumeric(v) => format!("{v:?} is not a number"),
        CellProblem::NotFinite(v) => format!("{v:?} is not a finite number"),
        CellProblem::UnknownCategory { value, .. } => {
            format!("{value:?} is not one of the categories")
        }
        CellProblem::Invalid { value, expected } => format!("{value:?} is not {expected}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::schema::{Imputation, ImputeValue, Statistic};

    fn column(toml_text: &str) -> FeatureColumn {
        toml::from_str(toml_text).unwrap()
    }

    fn encode(encoder: &ColumnEncoder, cell: Cell<'_>) -> Result<Vec<f32>, CellProblem> {
        let mut out = Vec::new();
        encoder.encode(cell, &mut out).map(|()| out)
    }

    #[test]
    fn categorical_one_hot_in_the_listed_order_with_each_unseen_rule() {
        let refuse = ColumnEncoder::compile(
            &column("name = \"sex\"\ntype = \"categorical\"\ncategories = [\"M\", \"F\"]"),
            None,
        )
        .unwrap();
        assert_eq!(refuse.feature_names(), ["sex=M", "sex=F"]);
        assert_eq!(encode(&refuse, Cell::text("F")).unwrap(), [0.0, 1.0]);
        assert!(matches!(
            encode(&refuse, Cell::text("X")),
            Err(CellProblem::UnknownCategory { value, .. }) if value == "X"
        ));
        let other = ColumnEncoder::compile(
            &column("name = \"s\"\ntype = \"categorical\"\ncategories = [\"M\", \"F\"]\nunseen = \"other\""),
            None,
        )
        .unwrap();
        assert_eq!(other.feature_names(), ["s=M", "s=F", "s=(other)"]);
        assert_eq!(encode(&other, Cell::text("X")).unwrap(), [0.0, 0.0, 1.0]);
        let ignore = ColumnEncoder::compile(
            &column("name = \"s\"\ntype = \"categorical\"\ncategories = [\"1\", \"2\"]\nunseen = \"ignore\""),
            None,
        )
        .unwrap();
        assert_eq!(encode(&ignore, Cell::text("9")).unwrap(), [0.0, 0.0]);
        // A number from a typed source matches the category spelt as an integer.
        assert_eq!(encode(&ignore, Cell::Number(2.0)).unwrap(), [0.0, 1.0]);
    }

    #[test]
    fn ordinal_boolean_and_date() {
        let ordinal = ColumnEncoder::compile(
            &column("name = \"stage\"\ntype = \"ordinal\"\nlevels = [\"I\", \"II\", \"III\"]"),
            None,
        )
        .unwrap();
        assert_eq!(encode(&ordinal, Cell::text("III")).unwrap(), [2.0]);
        assert!(matches!(
            encode(&ordinal, Cell::text("IV")),
            Err(CellProblem::Invalid { .. })
        ));
        let boolean = ColumnEncoder::compile(
            &column("name = \"smoker\"\ntype = \"boolean\"\ntrue_values = [\"yes\"]\nfalse_values = [\"no\"]"),
            None,
        )
        .unwrap();
        assert_eq!(encode(&boolean, Cell::text("yes")).unwrap(), [1.0]);
        assert_eq!(encode(&boolean, Cell::Bool(false)).unwrap(), [0.0]);
        assert!(encode(&boolean, Cell::text("true")).is_err());
        let date = ColumnEncoder::compile(
            &column(
                "name = \"seen\"\ntype = \"date\"\nformat = \"%d/%m/%Y\"\nepoch = \"2000-01-01\"",
            ),
            None,
        )
        .unwrap();
        assert_eq!(encode(&date, Cell::text("02/01/2000")).unwrap(), [1.0]);
        assert_eq!(encode(&date, Cell::text("31/12/1999")).unwrap(), [-1.0]);
        let typed = Date::from_ymd(2000, 1, 11).unwrap();
        assert_eq!(encode(&date, Cell::Date(typed)).unwrap(), [10.0]);
        assert!(encode(&date, Cell::text("2000-01-02")).is_err());
        assert!(encode(&date, Cell::text("31/02/2000")).is_err());
    }

    #[test]
    fn levels_match_numbers_by_value_and_text_exactly() {
        let grade = ColumnEncoder::compile(
            &column("name = \"g\"\ntype = \"categorical\"\ncategories = [\"1\", \"1.5\", \"n/a\"]"),
            None,
        )
        .unwrap();
        for one in [
            Cell::text("1.0"),
            Cell::text("1"),
            Cell::text("1e0"),
            Cell::Number(1.0),
        ] {
            assert_eq!(encode(&grade, one).unwrap(), [1.0, 0.0, 0.0], "{one:?}");
        }
        for half in [Cell::text("1.50"), Cell::Number(1.5)] {
            assert_eq!(encode(&grade, half).unwrap(), [0.0, 1.0, 0.0], "{half:?}");
        }
        assert_eq!(encode(&grade, Cell::text("n/a")).unwrap(), [0.0, 0.0, 1.0]);
        assert!(encode(&grade, Cell::text("N/A")).is_err());
        assert!(encode(&grade, Cell::text("inf")).is_err());
        // pandas writes a boolean column with gaps as 1.0/0.0: the default spellings match.
        let flag =
            ColumnEncoder::compile(&column("name = \"f\"\ntype = \"boolean\""), None).unwrap();
        assert_eq!(encode(&flag, Cell::text("1.0")).unwrap(), [1.0]);
        assert_eq!(encode(&flag, Cell::Number(0.0)).unwrap(), [0.0]);
        assert!(encode(&flag, Cell::text("True")).is_err());
        let e = ColumnEncoder::compile(
            &column(
                "name = \"f\"\ntype = \"boolean\"\ntrue_values = [\"1\"]\nfalse_values = [\"1.0\"]",
            ),
            None,
        )
        .unwrap_err();
        assert!(e.contains("both"), "{e}");
    }

    #[test]
    fn days_since_the_epoch_do_not_overflow() {
        let date = ColumnEncoder::compile(
            &column("name = \"d\"\ntype = \"date\"\nformat = \"%Y-%m-%d\"\nepoch = \"2000-01-01\""),
            None,
        )
        .unwrap();
        let epoch = i64::from(Date::parse_iso("2000-01-01").unwrap().0);
        assert_eq!(
            encode(&date, Cell::Date(Date(i32::MIN))).unwrap(),
            [(i64::from(i32::MIN) - epoch) as f32]
        );
    }

    #[test]
    fn missing_rules() {
        let mut spec = column("name = \"hb\"");
        let refuse = ColumnEncoder::compile(&spec, None).unwrap();
        assert_eq!(encode(&refuse, Cell::text("  ")), Err(CellProblem::Missing));
        spec.missing = MissingRule::ImputeWithIndicator;
        spec.impute = Some(Imputation {
            statistic: Statistic::Median,
            value: ImputeValue::Number(12.5),
        });
        let indicator = ColumnEncoder::compile(&spec, None).unwrap();
        assert_eq!(indicator.feature_names(), ["hb", "hb(missing)"]);
        assert_eq!(encode(&indicator, Cell::Missing).unwrap(), [12.5, 1.0]);
        assert_eq!(encode(&indicator, Cell::text("11")).unwrap(), [11.0, 0.0]);
        spec.missing = MissingRule::Impute;
        let impute = ColumnEncoder::compile(&spec, None).unwrap();
        assert_eq!(encode(&impute, Cell::Missing).unwrap(), [12.5]);
        // An imputed value the column cannot encode is refused when the schema is read.
        spec.impute = Some(Imputation {
            statistic: Statistic::Mode,
            value: ImputeValue::Text("high".into()),
        });
        let e = ColumnEncoder::compile(&spec, None).unwrap_err();
        assert!(e.contains("impute.value"), "{e}");
    }

    #[test]
    fn keys_of_another_type_and_bad_formats_are_refused() {
        let e =
            ColumnEncoder::compile(&column("name = \"a\"\nlevels = [\"x\"]"), None).unwrap_err();
        assert!(e.contains("`levels` is for type = \"ordinal\""), "{e}");
        let e = ColumnEncoder::compile(
            &column("name = \"d\"\ntype = \"date\"\nformat = \"%Y-%m\"\nepoch = \"1970-01-01\""),
            None,
        )
        .unwrap_err();
        assert!(e.contains("exactly once"), "{e}");
        let e = ColumnEncoder::compile(
            &column("name = \"c\"\ntype = \"categorical\"\ncategories = [\"a\", \"a\"]"),
            None,
        )
        .unwrap_err();
        assert!(e.contains("twice"), "{e}");
    }
}
