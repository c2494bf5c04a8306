//! A site's share of the consortium statistics (`tutela_privacy::stats`): the schema's
//! `[statistics]` ranges make the query's layout ([`layout_of`], the same at every site and at
//! the coordinator), and a dataset's records, read through the schema's own column encoders,
//! become the site's exact sufficient statistics ([`site_statistics`]), to be noised and summed.
//! [`standardize_from`] turns the consortium's dictionary back into the schema's
//! `[standardize]` figures, per encoded feature.
//!
//! What a column counts: a missing cell as missing (whatever its imputation rule: the
//! statistics are of the data, not of the imputed data); a numeric, date or ordinal value as its
//! encoded number (days since the epoch, the level's position); a categorical value as its
//! category, a value not in the list as `(other)` whatever the `unseen` rule; a boolean as the
//! category `false` or `true`; the label as its class. A cell that cannot be read (text in a
//! numeric column, a date in another format) ends the read with the error a training task would
//! give: the statistics are of data that passes `tutela-node data check`.

use std::collections::HashMap;
use std::path::Path;

use tutela_privacy::stats::{
    ColumnDictionary, ColumnLayout, DataDictionary, SiteStatistics, StatsLayout, StatsPlan,
    StatsValue,
};
use tutela_protocol::job::StatisticsJobSpec;

use super::encode::{CellProblem, LevelKey};
use super::read::{FailFast, ResolvedColumns, cell_error, resolve_columns};
use super::schema::{DatasetSchema, FeatureColumn, FeatureKind, MissingRule, UnseenRule};
use super::source::RecordSource;
use super::{Cell, DataError, StandardizeSpec};

/// How a feature column's present value becomes a statistics value.
#[derive(Debug, Clone, Copy)]
enum Reading {
    Number,
    /// One-hot over this many categories (any further feature is `(other)`).
    OneHot(usize),
    Boolean,
}

fn reading_of(kind: FeatureKind, column: &FeatureColumn) -> Reading {
    match kind {
        FeatureKind::Categorical => Reading::OneHot(column.categories.as_ref().map_or(0, Vec::len)),
        FeatureKind::Boolean => Reading::Boolean,
        FeatureKind::Numeric | FeatureKind::Ordinal | FeatureKind::Date => Reading::Number,
    }
}

/// The feature columns the statistics cover, as the schema declares them (with
/// `all_other_columns`, one numeric column per range, in the file's order).
fn feature_columns(schema: &DatasetSchema) -> Vec<FeatureColumn> {
    if schema.features.all_other_columns {
        let ranges = schema
            .statistics
            .as_ref()
            .map_or(&[][..], |s| &s.ranges[..]);
        ranges
            .iter()
            .map(|r| {
                let mut c = FeatureColumn::numeric(&r.column);
                c.kind = schema.features.kind;
                c
            })
            .collect()
    } else {
        schema.features.columns.clone()
    }
}

/// The statistics query of `schema`: its label (as a categorical column of its classes), then
/// each feature column. Errors name the schema file and the key.
pub fn layout_of(schema: &DatasetSchema, origin: &Path) -> Result<StatsLayout, DataError> {
    let invalid = |reason: String| DataError::SchemaInvalid {
        path: origin.to_path_buf(),
        reason,
    };
    let Some(spec) = &schema.statistics else {
        return Err(invalid(
            "the schema has no [statistics] section: a statistics job needs each numeric and date \
             column's public range (docs/schema.md)"
                .into(),
        ));
    };
    if schema.features.all_other_columns && schema.features.kind != FeatureKind::Numeric {
        return Err(invalid(
            "statistics: with all_other_columns only type = \"numeric\" columns are covered; list \
             the columns instead"
                .into(),
        ));
    }
    let mut ranges: HashMap<&str, (f64, f64, u32)> = HashMap::new();
    for r in &spec.ranges {
        let bins = r.bins.unwrap_or(spec.bins);
        if ranges.insert(&r.column, (r.low, r.high, bins)).is_some() {
            return Err(invalid(format!(
                "statistics.ranges lists column {:?} twice",
                r.column
            )));
        }
    }
    let declared = feature_columns(schema);
    let unknown: Vec<&str> = spec
        .ranges
        .iter()
        .map(|r| r.column.as_str())
        .filter(|c| !declared.iter().any(|k| k.name == *c))
        .collect();
    if !unknown.is_empty() {
        return Err(invalid(format!(
            "statistics.ranges names columns that are not feature columns: {unknown:?}"
        )));
    }
    let mut columns = vec![ColumnLayout::Categorical {
        name: schema.label.column.clone(),
        categories: schema.label.classes.clone(),
    }];
    for column in declared {
        let range = ranges.get(column.name.as_str()).copied();
        columns.push(match column.kind {
            FeatureKind::Numeric | FeatureKind::Date => {
                let Some((low, high, bins)) = range else {
                    return Err(invalid(format!(
                        "statistics.ranges has no range for {:?} column {:?}: add \
                         {{ column = {:?}, low = ..., high = ... }} (the public range that bounds \
                         a row's influence)",
                        format!("{:?}", column.kind).to_lowercase(),
                        column.name,
                        column.name
                    )));
                };
                ColumnLayout::Numeric {
                    name: column.name.clone(),
                    low,
                    high,
                    bins,
                }
            }
            // A level's position: one bin per level, centred on it.
            FeatureKind::Ordinal => {
                let levels = column.levels.as_ref().map_or(1, Vec::len).max(1);
                ColumnLayout::Numeric {
                    name: column.name.clone(),
                    low: -0.5,
                    high: levels as f64 - 0.5,
                    bins: levels as u32,
                }
            }
            FeatureKind::Categorical => ColumnLayout::Categorical {
                name: column.name.clone(),
                categories: column.categories.clone().unwrap_or_default(),
            },
            FeatureKind::Boolean => ColumnLayout::Categorical {
                name: column.name.clone(),
                categories: vec!["false".into(), "true".into()],
            },
        });
        if range.is_some() && !matches!(column.kind, FeatureKind::Numeric | FeatureKind::Date) {
            return Err(invalid(format!(
                "statistics.ranges gives a range for column {:?}, which is not numeric or a date \
                 (its levels or categories are its range)",
                column.name
            )));
        }
    }
    StatsLayout::new(columns).map_err(|e| invalid(format!("statistics: {e}")))
}

/// The site's exact statistics of every record of `source` (module documentation), on the grid
/// of `scale` steps per unit. The first unreadable cell ends it with the error naming file, line
/// and column (for the site's log; what leaves the site is `site-node::failure`'s code).
pub fn site_statistics(
    source: &mut dyn RecordSource,
    schema: &DatasetSchema,
    scale: i64,
) -> Result<SiteStatistics, DataError> {
    let path = source.origin().to_path_buf();
    let layout = layout_of(schema, &path)?;
    let header = source.header().to_vec();
    let Some(ResolvedColumns { label, features }) =
        resolve_columns(&header, schema, &path, &mut FailFast)?
    else {
        return Err(DataError::NoRows { path });
    };
    let declared = feature_columns(schema);
    if schema.features.all_other_columns {
        // The ranges must name the file's feature columns in its order: the layout is the same
        // at every site, so a site whose file orders them otherwise must not add them crosswise.
        let file: Vec<&str> = features.iter().map(|(i, _)| header[*i].as_str()).collect();
        let named: Vec<&str> = declared.iter().map(|c| c.name.as_str()).collect();
        if file != named {
            return Err(DataError::Source {
                origin: path.display().to_string(),
                reason: format!(
                    "the schema's statistics.ranges name the feature columns {named:?}, the file \
                     has {file:?}; with all_other_columns they must be the same, in the same order"
                ),
            });
        }
    }
    let readings: Vec<Reading> = declared.iter().map(|c| reading_of(c.kind, c)).collect();
    let classes: HashMap<LevelKey, usize> = schema
        .label
        .classes
        .iter()
        .enumerate()
        .map(|(i, c)| (LevelKey::of_text(c), i))
        .collect();
    let mut stats = SiteStatistics::new(&layout, scale).map_err(|e| DataError::Source {
        origin: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut row = Vec::with_capacity(1 + features.len());
    let mut buf = Vec::new();
    let mut any = false;
    while let Some((line, record)) = source.next_record()? {
        any = true;
        if record.len() != header.len() {
            return Err(DataError::FieldCount {
                path,
                line,
                expected: header.len(),
                found: record.len(),
            });
        }
        row.clear();
        row.push(match record.cell(label) {
            Cell::Missing => StatsValue::Missing,
            cell => StatsValue::Category(classes.get(&LevelKey::of_cell(cell)).copied()),
        });
        for ((position, encoder), reading) in features.iter().zip(&readings) {
            buf.clear();
            let value = match encoder.encode_present(record.cell(*position), &mut buf) {
                Err(CellProblem::Missing) => StatsValue::Missing,
                Err(CellProblem::UnknownCategory { .. }) => StatsValue::Category(None),
                Err(problem) => return Err(cell_error(problem, &path, line, encoder.column())),
                Ok(()) => match reading {
                    Reading::Number => StatsValue::Number(f64::from(buf[0])),
                    Reading::Boolean => StatsValue::Category(Some(usize::from(buf[0] > 0.5))),
                    Reading::OneHot(k) => {
                        StatsValue::Category(buf[..*k].iter().position(|&x| x > 0.5))
                    }
                },
            };
            row.push(value);
        }
        stats.add_row(&row).map_err(|e| DataError::Source {
            origin: format!("{}, line {line}", path.display()),
            reason: e.to_string(),
        })?;
    }
    if !any {
        return Err(DataError::NoRows { path });
    }
    Ok(stats)
}

/// What a site releases for a consortium-statistics job (`kind = "statistics"`): its noised
/// sufficient statistics, to be uploaded as they are or masked (secure aggregation), and the
/// query and noise they were made under (for the ledger's charge and the coordinator's check
/// that every site used the same layout).
#[derive(Debug, Clone)]
pub struct StatsRelease {
    pub layout: StatsLayout,
    pub plan: StatsPlan,
    /// The exact statistics plus this site's noise (or its share of the noise, under secure
    /// aggregation), in grid units of `plan.scale()`.
    pub vector: Vec<i64>,
    /// Rows read (local: for the site's log, not part of the release).
    pub rows: u64,
}

/// The site's release for `job` over every record of `source`: the schema's layout, the job's
/// noise (`StatisticsJobSpec::plan`, the same derivation as the coordinator's), the exact
/// statistics, then the noise from the OS-keyed generator. Nothing is charged here: the caller
/// charges `plan.epsilon` to the ledger before the vector leaves the site. A cell that cannot be
/// read ends it with the error training gives (for the site's log).
pub fn release_for_job(
    source: &mut dyn RecordSource,
    schema: &DatasetSchema,
    job: &StatisticsJobSpec,
) -> Result<StatsRelease, DataError> {
    release_for_job_with(source, schema, job, None)
}

/// As [`release_for_job`], with the noise from `rng` when given (tests pass a seeded one).
pub fn release_for_job_with(
    source: &mut dyn RecordSource,
    schema: &DatasetSchema,
    job: &StatisticsJobSpec,
    rng: Option<tutela_privacy::noise::SecureRng>,
) -> Result<StatsRelease, DataError> {
    let origin = source.origin().to_path_buf();
    let failed = |e: tutela_privacy::stats::StatsError| DataError::Source {
        origin: origin.display().to_string(),
        reason: format!("statistics job: {e}"),
    };
    let layout = layout_of(schema, &origin)?;
    let plan = job.plan(&layout).map_err(failed)?;
    let stats = site_statistics(source, schema, plan.scale())?;
    let rows = stats.rows();
    let mut vector = stats.into_sums();
    match rng {
        Some(rng) => plan.noise_site_with(&mut vector, rng),
        None => plan.noise_site(&mut vector),
    }
    .map_err(failed)?;
    Ok(StatsRelease {
        layout,
        plan,
        vector,
        rows,
    })
}

/// The schema's `[standardize]` from the consortium's dictionary: the mean and population
/// standard deviation of every encoded feature, in encoded order, as the encoding makes them
/// (an imputed cell counts as the schema's imputed value, an indicator as the missing fraction,
/// a one-hot feature as its category's share). Refused, naming the feature, where the
/// dictionary gives no spread (a feature constant across the consortium cannot be scaled).
pub fn standardize_from(
    schema: &DatasetSchema,
    dictionary: &DataDictionary,
    origin: &Path,
) -> Result<StandardizeSpec, DataError> {
    let invalid = |reason: String| DataError::SchemaInvalid {
        path: origin.to_path_buf(),
        reason,
    };
    let mut mean = Vec::new();
    let mut std = Vec::new();
    let mut push = |name: String, m: f64, v: f64| -> Result<(), DataError> {
        let sd = v.max(0.0).sqrt();
        if !(sd > 0.0 && sd.is_finite() && m.is_finite()) {
            return Err(invalid(format!(
                "feature {name:?} has no spread in the consortium statistics (std {sd}): it \
                 cannot be standardized"
            )));
        }
        mean.push(m as f32);
        std.push(sd as f32);
        Ok(())
    };
    for column in feature_columns(schema) {
        let Some(entry) = dictionary.column(&column.name) else {
            return Err(invalid(format!(
                "the statistics have no column {:?}: they were computed for another schema",
                column.name
            )));
        };
        // The imputed value's features, encoded as any cell of the column.
        let imputed: Option<Vec<f32>> = match (&column.missing, &column.impute) {
            (MissingRule::Refuse, _) | (_, None) => None,
            (_, Some(imputation)) => {
                let encoder =
                    super::encode::ColumnEncoder::compile(&column, None).map_err(|reason| {
                        invalid(format!("features.columns {:?}: {reason}", column.name))
                    })?;
                let mut out = Vec::new();
                encoder
                    .encode_present(imputation.value.to_cell().as_cell(), &mut out)
                    .map_err(|_| {
                        invalid(format!(
                            "column {:?}: the imputed value does not encode",
                            column.name
                        ))
                    })?;
                Some(out)
            }
        };
        let indicator = column.missing == MissingRule::ImputeWithIndicator;
        match entry {
            ColumnDictionary::Numeric {
                present,
                missing,
                mean: m,
                std: s,
                ..
            } => {
                let (c, miss) = (present.max(0.0), missing.max(0.0));
                let (m1, m2) = match &imputed {
                    // Mixture of the present values and `missing` copies of the imputed one.
                    Some(v) => {
                        let x = f64::from(v[0]);
                        let n = c + miss;
                        let m1 = (c * m + miss * x) / n;
                        let m2 = (c * (s * s + m * m) + miss * x * x) / n;
                        (m1, m2)
                    }
                    None => (*m, s * s + m * m),
                };
                push(column.name.clone(), m1, m2 - m1 * m1)?;
                if indicator {
                    let p = miss / (c + miss);
                    push(format!("{}(missing)", column.name), p, p * (1.0 - p))?;
                }
            }
            ColumnDictionary::Categorical {
                categories,
                counts,
                other,
                missing,
                ..
            } => {
                let miss = missing.max(0.0);
                let counts: Vec<f64> = counts.iter().map(|c| c.max(0.0)).collect();
                let other = other.max(0.0);
                let n = counts.iter().sum::<f64>() + other + miss;
                let mut shares: Vec<(String, f64)> = categories
                    .iter()
                    .zip(&counts)
                    .map(|(cat, c)| (format!("{}={cat}", column.name), *c))
                    .collect();
                if column.kind == FeatureKind::Boolean {
                    // One feature: the share of `true`.
                    shares = vec![(column.name.clone(), counts[1])];
                } else if column.unseen == Some(UnseenRule::Other) {
                    shares.push((format!("{}=(other)", column.name), other));
                }
                if let Some(v) = &imputed {
                    for (share, x) in shares.iter_mut().zip(v) {
                        share.1 += miss * f64::from(*x);
                    }
                }
                for (name, count) in shares {
                    let p = count / n;
                    push(name, p, p * (1.0 - p))?;
                }
                if indicator {
                    let p = miss / n;
                    push(format!("{}(missing)", column.name), p, p * (1.0 - p))?;
                }
            }
        }
    }
    Ok(StandardizeSpec {
        mean,
        std,
        statistics: None,
        sha256: None,
    })
}

/// `[standardize] statistics = "FILE", sha256 = "..."`: reads the statistics file (relative to
/// the schema file's folder), checks its SHA-256 against the schema's, and fills `mean` and
/// `std` from its dictionary. Errors name the schema file and the key; a file with another
/// digest is refused naming both digests.
pub(super) fn resolve_standardize(
    schema: &mut DatasetSchema,
    origin: &Path,
) -> Result<(), DataError> {
    let invalid = |reason: String| DataError::SchemaInvalid {
        path: origin.to_path_buf(),
        reason,
    };
    let Some(spec) = &schema.standardize else {
        return Ok(());
    };
    let (file, digest) = match (&spec.statistics, &spec.sha256) {
        (None, None) => return Ok(()),
        (Some(file), Some(digest)) => (file.clone(), digest.clone()),
        (Some(_), None) => {
            return Err(invalid(
                "standardize.statistics needs standardize.sha256, the file's SHA-256 (so the \
                 schema's digest binds the statistics)"
                    .into(),
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                "standardize.sha256 is the digest of standardize.statistics, which is not set"
                    .into(),
            ));
        }
    };
    if !spec.mean.is_empty() || !spec.std.is_empty() {
        return Err(invalid(
            "standardize: give either mean and std, or statistics and sha256, not both".into(),
        ));
    }
    let path = origin.parent().unwrap_or(Path::new(".")).join(&file);
    let bytes = std::fs::read(&path).map_err(|source| DataError::Io {
        path: path.clone(),
        source,
    })?;
    let actual = hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes));
    if actual != digest.to_ascii_lowercase() {
        return Err(invalid(format!(
            "standardize.statistics {file:?} has SHA-256 {actual}, standardize.sha256 says {digest}: \
             the file is not the one the schema names"
        )));
    }
    let text = String::from_utf8_lossy(&bytes);
    let dictionary = DataDictionary::from_file_text(&text)
        .map_err(|e| invalid(format!("standardize.statistics {file:?}: {e}")))?;
    let resolved = standardize_from(schema, &dictionary, origin)?;
    if let Some(spec) = schema.standardize.as_mut() {
        spec.mean = resolved.mean;
        spec.std = resolved.std;
    }
    Ok(())
}
