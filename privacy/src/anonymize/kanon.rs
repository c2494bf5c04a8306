//! k-anonymity with optional distinct l-diversity, by a search of the generalization lattice
//! combined with bounded row suppression.
//!
//! **Lattice.** Each quasi-identifier (QI) has an ordered list of generalization levels; level 0
//! is the value itself and level `i` is `levels[i-1]`. Every level must be a coarsening of the one
//! below it (checked on the data: equal values at level `i-1` stay equal at level `i`), which
//! makes "k-anonymous with at most B rows suppressed" monotone: if a node satisfies it, so does
//! every more general node. A node is a vector of levels; its height is their sum.
//!
//! **Suppression.** At a node, every row of an equivalence class (rows with equal generalized QIs)
//! smaller than k, or with fewer than l distinct sensitive values, is suppressed (removed). The
//! node satisfies the requirement if at most `floor(max_suppression · rows)` rows are suppressed.
//!
//! **Search order (Samarati).** Binary search on height for the lowest height at which some node
//! satisfies; at that height, every node is evaluated and the one with the least information
//! loss (below) wins, ties broken by the lexicographically smallest level vector. Because of
//! monotonicity, no node strictly less general than the result (≤ in every QI, < in one) can
//! satisfy: it would have a lower height.
//!
//! **Information loss** (reported, and the tie-breaker within a height): a normalized certainty
//! penalty over the data's own domain. A cell generalized to `g` costs
//! `(distinct original values mapping to g − 1) / (distinct values of the column − 1)`: 0 when
//! exact, 1 when it could be anything. A suppressed row costs 1 per QI. The loss is the mean over
//! all rows and QIs, in [0, 1]. The discernibility metric (Σ class size² + suppressed · rows) is
//! reported too.
//!
//! **Cost.** Rows are collapsed once into distinct (QI, sensitive) tuples with counts; each
//! lattice node is then one pass over the tuples with a dense counting array when the product of
//! the generalized cardinalities is small, a hash map otherwise.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::AnonymizeError;
use super::schema::{ColumnType, Table, Value};
use super::transform::{Hierarchies, Transform, generalize};

/// One quasi-identifier and its generalization levels (most specific first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QiLevels {
    pub column: String,
    pub levels: Vec<Transform>,
}

/// `[k_anonymity]` in the configuration:
/// ```toml
/// [k_anonymity]
/// k = 5
/// l = 2                    # optional: distinct l-diversity of `sensitive`
/// sensitive = "diagnosis"
/// max_suppression = 0.02   # at most 2 % of rows removed
/// [[k_anonymity.qi]]
/// column = "age"
/// levels = [{ action = "bin", width = 5 }, { action = "bin", width = 10 }, { action = "suppress" }]
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KAnonConfig {
    pub k: usize,
    #[serde(default)]
    pub l: Option<usize>,
    #[serde(default)]
    pub sensitive: Option<String>,
    #[serde(default)]
    pub max_suppression: f64,
    #[serde(rename = "qi")]
    pub quasi_identifiers: Vec<QiLevels>,
}

/// The level chosen for one QI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChosenLevel {
    pub column: String,
    /// 0 = unchanged, i = `levels[i-1]`.
    pub level: usize,
    pub max_level: usize,
    pub description: String,
}

/// What the k-anonymity step did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KAnonResult {
    pub k_required: usize,
    pub l_required: Option<usize>,
    /// Smallest equivalence class after suppression (0 if every row was suppressed).
    pub k_achieved: usize,
    /// Fewest distinct sensitive values in a class after suppression (when a sensitive column
    /// is configured).
    pub l_achieved: Option<usize>,
    pub rows_in: usize,
    pub suppressed_rows: usize,
    pub suppression_budget: usize,
    pub equivalence_classes: usize,
    pub levels: Vec<ChosenLevel>,
    /// Normalized certainty penalty in [0, 1] (see the module docs).
    pub loss_ncp: f64,
    /// Σ class size² + suppressed · rows.
    pub discernibility: u128,
    pub lattice_size: usize,
    pub nodes_evaluated: usize,
    pub search: String,
}

/// Per-QI precomputation: codes of original values and their generalizations at every level.
struct QiData {
    col: usize,
    /// Level 0 is `Keep`.
    levels: Vec<Transform>,
    /// `gen[j][orig]` = code of the generalized value at level j.
    gen_code: Vec<Vec<u32>>,
    gen_values: Vec<Vec<Value>>,
    /// `loss[j][g]` = NCP of a cell generalized to g at level j.
    loss: Vec<Vec<f64>>,
}

#[derive(Debug, Clone)]
struct NodeEval {
    suppressed: usize,
    satisfies: bool,
    loss: f64,
    discernibility: u128,
    k_min: usize,
    l_min: Option<usize>,
    classes: usize,
}

struct Tuples {
    /// Flattened level-0 QI codes, `nq` per tuple.
    codes: Vec<u32>,
    sens: Vec<u32>,
    count: Vec<u32>,
}

/// Above this many possible classes a node uses a hash map instead of a dense array.
const DENSE_LIMIT: u128 = 1 << 22;

fn intern(map: &mut HashMap<Value, u32>, list: &mut Vec<Value>, v: &Value) -> u32 {
    if let Some(c) = map.get(v) {
        return *c;
    }
    let c = list.len() as u32;
    list.push(v.clone());
    map.insert(v.clone(), c);
    c
}

struct Lattice<'a> {
    qis: Vec<QiData>,
    tuples: Tuples,
    rows: usize,
    k: usize,
    l: Option<usize>,
    budget: usize,
    has_sensitive: bool,
    _table: &'a Table,
}

impl Lattice<'_> {
    /// Assigns each tuple its class index at `node`; returns (class of tuple, number of classes).
    fn classes(&self, node: &[usize]) -> (Vec<u32>, usize) {
        let nq = self.qis.len();
        let mut radix = Vec::with_capacity(nq);
        let mut product: Option<u128> = Some(1);
        for (q, &lvl) in self.qis.iter().zip(node) {
            let card = q.gen_values[lvl].len() as u128;
            radix.push(card);
            product = product.and_then(|p| p.checked_mul(card.max(1)));
        }
        let n = self.tuples.count.len();
        let key = |t: usize| -> u128 {
            let mut k: u128 = 0;
            for (qi, q) in self.qis.iter().enumerate() {
                let g = q.gen_code[node[qi]][self.tuples.codes[t * nq + qi] as usize];
                k = k.wrapping_mul(radix[qi]).wrapping_add(u128::from(g));
            }
            k
        };
        let mut out = Vec::with_capacity(n);
        let mut next = 0u32;
        match product {
            Some(p) if p <= DENSE_LIMIT => {
                let mut dense = vec![u32::MAX; p as usize];
                for t in 0..n {
                    let slot = &mut dense[key(t) as usize];
                    if *slot == u32::MAX {
                        *slot = next;
                        next += 1;
                    }
                    out.push(*slot);
                }
            }
            // When the product overflows u128, mixed-radix keys could collide: hash the full
            // code vector instead (pathological: needs dozens of high-cardinality QIs).
            None => {
                let mut map: HashMap<Vec<u32>, u32> = HashMap::new();
                for t in 0..n {
                    let v: Vec<u32> = (0..nq)
                        .map(|qi| {
                            self.qis[qi].gen_code[node[qi]][self.tuples.codes[t * nq + qi] as usize]
                        })
                        .collect();
                    let c = *map.entry(v).or_insert_with(|| {
                        next += 1;
                        next - 1
                    });
                    out.push(c);
                }
            }
            Some(_) => {
                let mut map: HashMap<u128, u32> = HashMap::with_capacity(n / 2);
                for t in 0..n {
                    let c = *map.entry(key(t)).or_insert_with(|| {
                        next += 1;
                        next - 1
                    });
                    out.push(c);
                }
            }
        }
        (out, next as usize)
    }

    /// Evaluates a node; also returns which classes are suppressed.
    fn eval(&self, node: &[usize]) -> (NodeEval, Vec<u32>, Vec<bool>) {
        let nq = self.qis.len();
        let (class_of, nclasses) = self.classes(node);
        let mut count = vec![0usize; nclasses];
        let mut loss = vec![0f64; nclasses];
        for (t, &c) in class_of.iter().enumerate() {
            let cnt = self.tuples.count[t] as usize;
            count[c as usize] += cnt;
            let mut l = 0.0;
            for (qi, q) in self.qis.iter().enumerate() {
                let g = q.gen_code[node[qi]][self.tuples.codes[t * nq + qi] as usize];
                l += q.loss[node[qi]][g as usize];
            }
            loss[c as usize] += l * cnt as f64;
        }
        let distinct: Option<Vec<usize>> = self.has_sensitive.then(|| {
            let mut pairs: Vec<u64> = class_of
                .iter()
                .zip(&self.tuples.sens)
                .map(|(&c, &s)| (u64::from(c) << 32) | u64::from(s))
                .collect();
            pairs.sort_unstable();
            pairs.dedup();
            let mut d = vec![0usize; nclasses];
            for p in pairs {
                d[(p >> 32) as usize] += 1;
            }
            d
        });
        let mut suppressed_class = vec![false; nclasses];
        let mut suppressed = 0usize;
        let (mut k_min, mut l_min) = (usize::MAX, usize::MAX);
        let mut total_loss = 0.0;
        let mut disc: u128 = 0;
        let mut kept_classes = 0;
        for c in 0..nclasses {
            let d = distinct.as_ref().map(|d| d[c]);
            let fails_l = matches!((self.l, d), (Some(l), Some(d)) if d < l);
            if count[c] < self.k || fails_l {
                suppressed_class[c] = true;
                suppressed += count[c];
            } else {
                kept_classes += 1;
                k_min = k_min.min(count[c]);
                if let Some(d) = d {
                    l_min = l_min.min(d);
                }
                total_loss += loss[c];
                disc += (count[c] as u128) * (count[c] as u128);
            }
        }
        total_loss += (suppressed * nq) as f64;
        disc += (suppressed as u128) * (self.rows as u128);
        let denom = (self.rows * nq).max(1) as f64;
        let ev = NodeEval {
            suppressed,
            satisfies: suppressed <= self.budget,
            loss: total_loss / denom,
            discernibility: disc,
            k_min: if kept_classes == 0 { 0 } else { k_min },
            l_min: self
                .has_sensitive
                .then_some(if kept_classes == 0 { 0 } else { l_min }),
            classes: kept_classes,
        };
        (ev, class_of, suppressed_class)
    }
}

/// All level vectors with the given height (sum), each level ≤ its maximum.
fn nodes_at(max: &[usize], height: usize) -> Vec<Vec<usize>> {
    fn rec(max: &[usize], i: usize, left: usize, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if i == max.len() {
            if left == 0 {
                out.push(cur.clone());
            }
            return;
        }
        let rest: usize = max[i + 1..].iter().sum();
        for l in 0..=max[i].min(left) {
            if left - l <= rest {
                cur.push(l);
                rec(max, i + 1, left - l, cur, out);
                cur.pop();
            }
        }
    }
    let mut out = Vec::new();
    rec(max, 0, height, &mut Vec::new(), &mut out);
    out
}

/// Makes `table` k-anonymous (and l-diverse) over the configured QIs: returns the generalized
/// table without the suppressed rows, and what was done.
pub fn anonymize_k(
    table: &Table,
    cfg: &KAnonConfig,
    hierarchies: &Hierarchies,
) -> Result<(Table, KAnonResult), AnonymizeError> {
    anonymize_k_indexed(table, cfg, hierarchies).map(|(t, r, _)| (t, r))
}

/// As [`anonymize_k`], also returning, for each output row, the index of its input row.
pub fn anonymize_k_indexed(
    table: &Table,
    cfg: &KAnonConfig,
    hierarchies: &Hierarchies,
) -> Result<(Table, KAnonResult, Vec<usize>), AnonymizeError> {
    let invalid = |column: &str, reason: String| AnonymizeError::InvalidConfig {
        column: column.to_string(),
        reason,
    };
    if cfg.k == 0 {
        return Err(invalid("k_anonymity", "k must be at least 1".into()));
    }
    if !(0.0..=1.0).contains(&cfg.max_suppression) {
        return Err(invalid(
            "k_anonymity",
            "max_suppression must be in [0, 1]".into(),
        ));
    }
    if cfg.quasi_identifiers.is_empty() {
        return Err(invalid("k_anonymity", "no quasi-identifiers".into()));
    }
    let sens_col = match (&cfg.sensitive, cfg.l) {
        (Some(s), _) => Some(table.schema.index_of(s)?),
        (None, Some(_)) => {
            return Err(invalid(
                "k_anonymity",
                "l-diversity needs a `sensitive` column".into(),
            ));
        }
        (None, None) => None,
    };
    if cfg.l == Some(0) {
        return Err(invalid("k_anonymity", "l must be at least 1".into()));
    }
    let rows = table.rows.len();
    let nq = cfg.quasi_identifiers.len();

    // Per-QI codes of the original values, and their generalizations at every level.
    let mut qis = Vec::with_capacity(nq);
    let mut row_codes: Vec<Vec<u32>> = Vec::with_capacity(nq);
    for qc in &cfg.quasi_identifiers {
        let col = table.schema.index_of(&qc.column)?;
        if cfg
            .quasi_identifiers
            .iter()
            .filter(|o| o.column == qc.column)
            .count()
            > 1
        {
            return Err(invalid(
                &qc.column,
                "listed twice as a quasi-identifier".into(),
            ));
        }
        let ty = table.schema.columns[col].ty;
        for t in &qc.levels {
            if !t.is_generalization() {
                return Err(invalid(
                    &qc.column,
                    format!("`{}` cannot be a generalization level", t.describe()),
                ));
            }
            t.validate(&qc.column, ty, hierarchies)?;
        }
        let mut map = HashMap::new();
        let mut distinct = Vec::new();
        let mut first_row = Vec::new();
        let mut codes = Vec::with_capacity(rows);
        for (r, row) in table.rows.iter().enumerate() {
            let v = row.get(col).ok_or(AnonymizeError::RowWidth {
                row: r,
                expected: table.schema.columns.len(),
                got: row.len(),
            })?;
            let before = distinct.len();
            let c = intern(&mut map, &mut distinct, v);
            if distinct.len() > before {
                first_row.push(r);
            }
            codes.push(c);
        }
        let mut levels = vec![Transform::Keep];
        levels.extend(qc.levels.iter().cloned());
        let d0 = distinct.len();
        let mut gen_code = Vec::with_capacity(levels.len());
        let mut gen_values = Vec::with_capacity(levels.len());
        let mut loss = Vec::with_capacity(levels.len());
        for (j, t) in levels.iter().enumerate() {
            let mut gmap = HashMap::new();
            let mut glist = Vec::new();
            let mut gc = Vec::with_capacity(d0);
            for (o, v) in distinct.iter().enumerate() {
                let g = generalize(t, v, hierarchies, &qc.column, first_row[o])?;
                gc.push(intern(&mut gmap, &mut glist, &g));
            }
            // Monotonicity check: level j must be a function of level j-1.
            if j > 0 {
                let prev: &Vec<u32> = &gen_code[j - 1];
                let mut up: HashMap<u32, u32> = HashMap::new();
                for (o, &g) in gc.iter().enumerate() {
                    if let Some(&seen) = up.get(&prev[o])
                        && seen != g
                    {
                        return Err(invalid(
                            &qc.column,
                            format!(
                                "level {j} (`{}`) splits values that level {} merged, e.g. `{}`; \
                                 levels must coarsen step by step",
                                t.describe(),
                                j - 1,
                                distinct[o]
                            ),
                        ));
                    }
                    up.insert(prev[o], g);
                }
            }
            let mut members = vec![0usize; glist.len()];
            for &g in &gc {
                members[g as usize] += 1;
            }
            let l: Vec<f64> = members
                .iter()
                .map(|&m| {
                    if d0 <= 1 {
                        0.0
                    } else {
                        (m - 1) as f64 / (d0 - 1) as f64
                    }
                })
                .collect();
            gen_code.push(gc);
            gen_values.push(glist);
            loss.push(l);
        }
        row_codes.push(codes);
        qis.push(QiData {
            col,
            levels,
            gen_code,
            gen_values,
            loss,
        });
    }

    // Collapse rows into distinct (QI codes, sensitive) tuples.
    let mut sens_map = HashMap::new();
    let mut sens_list = Vec::new();
    let mut tuple_ix: HashMap<Vec<u32>, u32> = HashMap::new();
    let mut tuples = Tuples {
        codes: Vec::new(),
        sens: Vec::new(),
        count: Vec::new(),
    };
    let mut row_tuple = Vec::with_capacity(rows);
    let mut key = vec![0u32; nq + 1];
    for r in 0..rows {
        for (qi, codes) in row_codes.iter().enumerate() {
            key[qi] = codes[r];
        }
        key[nq] = match sens_col {
            Some(c) => intern(&mut sens_map, &mut sens_list, &table.rows[r][c]),
            None => 0,
        };
        let t = match tuple_ix.get(&key) {
            Some(&t) => t,
            None => {
                let t = tuples.count.len() as u32;
                tuples.codes.extend_from_slice(&key[..nq]);
                tuples.sens.push(key[nq]);
                tuples.count.push(0);
                tuple_ix.insert(key.clone(), t);
                t
            }
        };
        tuples.count[t as usize] += 1;
        row_tuple.push(t);
    }
    drop(tuple_ix);
    drop(row_codes);

    let budget = (cfg.max_suppression * rows as f64).floor() as usize;
    let lattice = Lattice {
        qis,
        tuples,
        rows,
        k: cfg.k,
        l: cfg.l,
        budget,
        has_sensitive: sens_col.is_some(),
        _table: table,
    };
    let max: Vec<usize> = lattice.qis.iter().map(|q| q.levels.len() - 1).collect();
    let top: usize = max.iter().sum();
    let lattice_size: usize = max.iter().map(|m| m + 1).product();

    let mut cache: HashMap<Vec<usize>, NodeEval> = HashMap::new();
    let mut evaluate = |node: &Vec<usize>| -> NodeEval {
        if let Some(e) = cache.get(node) {
            return e.clone();
        }
        let (e, _, _) = lattice.eval(node);
        cache.insert(node.clone(), e.clone());
        e
    };
    let top_node = max.clone();
    let top_eval = evaluate(&top_node);
    if !top_eval.satisfies {
        return Err(AnonymizeError::Infeasible {
            suppressed: top_eval.suppressed,
            budget,
        });
    }
    // Binary search for the lowest satisfying height.
    let (mut lo, mut hi) = (0usize, top);
    while lo < hi {
        let mid = (lo + hi) / 2;
        let any = nodes_at(&max, mid).iter().any(|n| evaluate(n).satisfies);
        if any {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let mut best: Option<(Vec<usize>, NodeEval)> = None;
    for n in nodes_at(&max, lo) {
        let e = evaluate(&n);
        if !e.satisfies {
            continue;
        }
        let better = match &best {
            None => true,
            Some((bn, be)) => e.loss < be.loss || (e.loss == be.loss && n < *bn),
        };
        if better {
            best = Some((n, e));
        }
    }
    let nodes_evaluated = cache.len();
    let Some((node, _)) = best else {
        // Unreachable when the top satisfies, but reported rather than panicking.
        return Err(AnonymizeError::Infeasible {
            suppressed: top_eval.suppressed,
            budget,
        });
    };
    let (ev, class_of, suppressed_class) = lattice.eval(&node);

    // Build the output: generalized QIs, suppressed rows removed.
    let mut schema = table.schema.clone();
    for (q, &lvl) in lattice.qis.iter().zip(&node) {
        if lvl > 0 {
            schema.columns[q.col].ty = ColumnType::Text;
        }
    }
    let mut out_rows = Vec::with_capacity(rows - ev.suppressed);
    let mut kept = Vec::with_capacity(rows - ev.suppressed);
    for (r, row) in table.rows.iter().enumerate() {
        let t = row_tuple[r] as usize;
        if suppressed_class[class_of[t] as usize] {
            continue;
        }
        kept.push(r);
        let mut new = row.clone();
        for (qi, q) in lattice.qis.iter().enumerate() {
            let lvl = node[qi];
            if lvl > 0 {
                let g = q.gen_code[lvl][lattice.tuples.codes[t * nq + qi] as usize];
                new[q.col] = q.gen_values[lvl][g as usize].clone();
            }
        }
        out_rows.push(new);
    }
    let levels = lattice
        .qis
        .iter()
        .zip(&node)
        .zip(&cfg.quasi_identifiers)
        .map(|((q, &lvl), qc)| ChosenLevel {
            column: qc.column.clone(),
            level: lvl,
            max_level: q.levels.len() - 1,
            description: q.levels[lvl].describe(),
        })
        .collect();
    let result = KAnonResult {
        k_required: cfg.k,
        l_required: cfg.l,
        k_achieved: ev.k_min,
        l_achieved: ev.l_min,
        rows_in: rows,
        suppressed_rows: ev.suppressed,
        suppression_budget: budget,
        equivalence_classes: ev.classes,
        levels,
        loss_ncp: ev.loss,
        discernibility: ev.discernibility,
        lattice_size,
        nodes_evaluated,
        search: "binary search on lattice height (Samarati), least NCP at the lowest satisfying \
                 height, ties by smallest level vector"
            .into(),
    };
    Ok((
        Table {
            schema,
            rows: out_rows,
        },
        result,
        kept,
    ))
}
