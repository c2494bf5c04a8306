//! Classification metrics an officer needs on unbalanced clinical labels, beside accuracy: ROC
//! AUC (ties counted half), F1, the confusion matrix, and calibration (expected calibration
//! error over equal-width confidence bins, with its reliability table). Pure functions of the
//! predicted class probabilities and the labels, so they are tested without a model.
//!
//! Binary tasks report the positive class (class 1); with more classes, AUC and F1 are the
//! unweighted means over classes, each class against the rest (one-vs-rest).

use serde::Serialize;

/// Bins of the reliability table.
pub const CALIBRATION_BINS: usize = 10;

/// One row of the reliability table: predictions whose top-class confidence falls in
/// `[lower, upper)` (the last bin includes 1).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReliabilityBin {
    pub lower: f64,
    pub upper: f64,
    pub count: usize,
    /// Mean top-class probability of the bin's rows.
    pub confidence: f64,
    /// Fraction of the bin's rows predicted right.
    pub accuracy: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassificationReport {
    pub n: usize,
    pub accuracy: f64,
    /// ROC AUC (binary: class 1 against 0; more classes: macro one-vs-rest). `None` when a
    /// class it needs has no rows (AUC is undefined).
    pub auc: Option<f64>,
    /// F1 (binary: of class 1; more classes: macro).
    pub f1: f64,
    /// `confusion[actual][predicted]`.
    pub confusion: Vec<Vec<usize>>,
    /// Expected calibration error: Σ over bins of (rows in bin / n)·|accuracy − confidence|.
    pub expected_calibration_error: f64,
    pub reliability: Vec<ReliabilityBin>,
    /// Set when the model predicts one class for every row (it learnt the majority class only).
    pub single_class_predicted: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricsError {
    #[error("{probabilities} probability rows for {labels} labels")]
    Lengths { probabilities: usize, labels: usize },
    #[error("row {row}: label {label} is not one of the model's {classes} classes")]
    Label {
        row: usize,
        label: usize,
        classes: usize,
    },
    #[error("row {row}: {found} class probabilities, the model has {classes} classes")]
    Width {
        row: usize,
        found: usize,
        classes: usize,
    },
    #[error("no rows to evaluate")]
    Empty,
}

fn argmax(p: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in p.iter().enumerate() {
        if *v > p[best] {
            best = i;
        }
    }
    best
}

/// ROC AUC of `scores` for `positive[i]`: the probability that a random positive outscores a
/// random negative, ties counted half (the Mann–Whitney statistic with mid-ranks). `None` when
/// either side is empty.
pub fn roc_auc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (mut rank_sum, mut pos, mut neg) = (0f64, 0usize, 0usize);
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        // Ranks i+1..=j+1 share their mean.
        let mid_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            if positive[k] {
                rank_sum += mid_rank;
                pos += 1;
            } else {
                neg += 1;
            }
        }
        i = j + 1;
    }
    if pos == 0 || neg == 0 {
        return None;
    }
    let (p, n) = (pos as f64, neg as f64);
    Some((rank_sum - p * (p + 1.0) / 2.0) / (p * n))
}

fn f1_of(confusion: &[Vec<usize>], class: usize) -> f64 {
    let tp = confusion[class][class] as f64;
    let predicted: usize = confusion.iter().map(|row| row[class]).sum();
    let actual: usize = confusion[class].iter().sum();
    let denominator = predicted as f64 + actual as f64;
    if denominator == 0.0 {
        0.0
    } else {
        2.0 * tp / denominator
    }
}

/// The report of `probabilities` (one row of class probabilities per example) against `labels`.
pub fn classification_report(
    probabilities: &[Vec<f32>],
    labels: &[usize],
    classes: usize,
) -> Result<ClassificationReport, MetricsError> {
    if probabilities.len() != labels.len() {
        return Err(MetricsError::Lengths {
            probabilities: probabilities.len(),
            labels: labels.len(),
        });
    }
    if labels.is_empty() {
        return Err(MetricsError::Empty);
    }
    for (row, (p, &label)) in probabilities.iter().zip(labels).enumerate() {
        if p.len() != classes {
            return Err(MetricsError::Width {
                row,
                found: p.len(),
                classes,
            });
        }
        if label >= classes {
            return Err(MetricsError::Label {
                row,
                label,
                classes,
            });
        }
    }
    let n = labels.len();
    let predicted: Vec<usize> = probabilities.iter().map(|p| argmax(p)).collect();
    let mut confusion = vec![vec![0usize; classes]; classes];
    for (&actual, &guess) in labels.iter().zip(&predicted) {
        confusion[actual][guess] += 1;
    }
    let correct: usize = (0..classes).map(|c| confusion[c][c]).sum();

    let auc_of = |class: usize| {
        let scores: Vec<f64> = probabilities.iter().map(|p| f64::from(p[class])).collect();
        let positive: Vec<bool> = labels.iter().map(|&l| l == class).collect();
        roc_auc(&scores, &positive)
    };
    let (auc, f1) = if classes == 2 {
        (auc_of(1), f1_of(&confusion, 1))
    } else {
        let aucs: Option<Vec<f64>> = (0..classes).map(auc_of).collect();
        (
            aucs.map(|a| a.iter().sum::<f64>() / classes as f64),
            (0..classes).map(|c| f1_of(&confusion, c)).sum::<f64>() / classes as f64,
        )
    };

    let mut bins: Vec<(usize, f64, usize)> = vec![(0, 0.0, 0); CALIBRATION_BINS];
    for ((p, &guess), &actual) in probabilities.iter().zip(&predicted).zip(labels) {
        let confidence = f64::from(p[guess]).clamp(0.0, 1.0);
        let bin = ((confidence * CALIBRATION_BINS as f64) as usize).min(CALIBRATION_BINS - 1);
        bins[bin].0 += 1;
        bins[bin].1 += confidence;
        bins[bin].2 += usize::from(guess == actual);
    }
    let mut ece = 0.0;
    let reliability = bins
        .iter()
        .enumerate()
        .map(|(i, &(count, confidence_sum, hits))| {
            let (confidence, accuracy) = if count == 0 {
                (0.0, 0.0)
            } else {
                (confidence_sum / count as f64, hits as f64 / count as f64)
            };
            ece += count as f64 / n as f64 * (accuracy - confidence).abs();
            ReliabilityBin {
                lower: i as f64 / CALIBRATION_BINS as f64,
                upper: (i + 1) as f64 / CALIBRATION_BINS as f64,
                count,
                confidence,
                accuracy,
            }
        })
        .collect();
    let single_class_predicted = predicted
        .iter()
        .all(|&g| g == predicted[0])
        .then_some(predicted[0]);
    Ok(ClassificationReport {
        n,
        accuracy: correct as f64 / n as f64,
        auc,
        f1,
        confusion,
        expected_calibration_error: ece,
        reliability,
        single_class_predicted,
    })
}

/// The report as people read it: numbers rounded to 3 significant digits, the confusion matrix
/// with class names, and the reliability table's non-empty bins.
pub fn render(report: &ClassificationReport, class_names: &[String]) -> String {
    use std::fmt::Write;
    let r = |v: f64| tutela_protocol::human::significant(v, 3);
    let name = |c: usize| class_names.get(c).cloned().unwrap_or_else(|| c.to_string());
    let mut out = String::new();
    let _ = writeln!(out, "rows: {}", report.n);
    let _ = writeln!(out, "accuracy: {}", r(report.accuracy));
    let what = if report.confusion.len() == 2 {
        format!(" (positive class: {})", name(1))
    } else {
        " (macro, one-vs-rest)".into()
    };
    let _ = writeln!(
        out,
        "ROC AUC{what}: {}",
        report
            .auc
            .map_or_else(|| "undefined (a class has no rows)".into(), r)
    );
    let _ = writeln!(out, "F1{what}: {}", r(report.f1));
    let _ = writeln!(
        out,
        "expected calibration error ({CALIBRATION_BINS} bins): {}",
        r(report.expected_calibration_error)
    );
    let _ = writeln!(out, "confusion matrix (rows: actual, columns: predicted):");
    let header: Vec<String> = (0..report.confusion.len()).map(name).collect();
    let _ = writeln!(
        out,
        "  {:>12} {}",
        "",
        header
            .iter()
            .map(|h| format!("{h:>10}"))
            .collect::<String>()
    );
    for (c, row) in report.confusion.iter().enumerate() {
        let cells: String = row.iter().map(|v| format!("{v:>10}")).collect();
        let _ = writeln!(out, "  {:>12} {cells}", name(c));
    }
    let _ = writeln!(
        out,
        "reliability (confidence bin: rows, mean confidence, accuracy):"
    );
    for b in report.reliability.iter().filter(|b| b.count > 0) {
        let _ = writeln!(
            out,
            "  [{:.1}, {:.1}): {}, {}, {}",
            b.lower,
            b.upper,
            b.count,
            r(b.confidence),
            r(b.accuracy)
        );
    }
    if let Some(c) = report.single_class_predicted {
        let _ = writeln!(
            out,
            "WARNING: the model predicts {} for every row: it has learnt the majority class only",
            name(c)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p2(v: f32) -> Vec<f32> {
        vec![1.0 - v, v]
    }

    #[test]
    fn auc_counts_ties_half_and_matches_a_hand_computed_case() {
        // Positives 0.8, 0.4; negatives 0.4, 0.1: pairs (0.8>0.4)=1, (0.8>0.1)=1, (0.4=0.4)=½,
        // (0.4>0.1)=1 → 3.5 / 4.
        let auc = roc_auc(&[0.8, 0.4, 0.4, 0.1], &[true, true, false, false]).unwrap();
        assert!((auc - 0.875).abs() < 1e-12, "{auc}");
        // All scores tied: ½.
        assert_eq!(roc_auc(&[0.5; 4], &[true, false, true, false]), Some(0.5));
        assert_eq!(roc_auc(&[0.1, 0.9], &[false, true]), Some(1.0));
        assert_eq!(roc_auc(&[0.1, 0.9], &[true, true]), None);
    }

    #[test]
    fn a_binary_report_has_f1_confusion_and_calibration() {
        let probs = [p2(0.9), p2(0.8), p2(0.3), p2(0.2), p2(0.6)];
        let labels = [1, 1, 1, 0, 0];
        let r = classification_report(&probs, &labels, 2).unwrap();
        // Predicted: 1, 1, 0, 0, 1.
        assert_eq!(r.confusion, vec![vec![1, 1], vec![1, 2]]);
        assert!((r.accuracy - 0.6).abs() < 1e-12);
        // Class 1: tp 2, predicted 3, actual 3 → F1 = 4/6.
        assert!((r.f1 - 2.0 / 3.0).abs() < 1e-12);
        // Positives 0.9, 0.8, 0.3 vs negatives 0.2, 0.6: 5 of 6 pairs.
        assert!((r.auc.unwrap() - 5.0 / 6.0).abs() < 1e-12);
        // Confidences 0.9 (right), 0.8 (right), 0.7 (wrong), 0.8 (right), 0.6 (wrong); in f32
        // 0.9 and 0.7 fall just below their bins' edges: bin [0.8, 0.9) holds 0.9, 0.8, 0.8
        // (3 right, confidence 2.5), bin [0.6, 0.7) holds 0.7, 0.6 (0 right, confidence 1.3):
        // (|3 − 2.5| + |0 − 1.3|) / 5 = 0.36.
        assert!(
            (r.expected_calibration_error - 1.8 / 5.0).abs() < 1e-6,
            "{}",
            r.expected_calibration_error
        );
        assert_eq!(r.reliability.iter().map(|b| b.count).sum::<usize>(), 5);
        assert_eq!(r.single_class_predicted, None);
        let text = render(&r, &["benign".into(), "malignant".into()]);
        for needle in [
            "accuracy: 0.6",
            "ROC AUC (positive class: malignant): 0.833",
            "F1",
            "malignant",
            "[0.8, 0.9): 3, 0.833, 1",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
    }

    #[test]
    fn a_majority_class_model_is_flagged() {
        let probs = [p2(0.2), p2(0.3), p2(0.1)];
        let r = classification_report(&probs, &[0, 0, 1], 2).unwrap();
        assert_eq!(r.single_class_predicted, Some(0));
        assert_eq!(r.f1, 0.0);
        assert!(render(&r, &[]).contains("predicts 0 for every row"));
    }

    #[test]
    fn three_classes_report_macro_scores_and_bad_input_is_named() {
        let probs = [
            vec![0.7, 0.2, 0.1],
            vec![0.1, 0.8, 0.1],
            vec![0.2, 0.2, 0.6],
        ];
        let r = classification_report(&probs, &[0, 1, 2], 3).unwrap();
        assert_eq!(r.auc, Some(1.0));
        assert_eq!(r.f1, 1.0);
        assert_eq!(
            classification_report(&probs, &[0, 1, 3], 3),
            Err(MetricsError::Label {
                row: 2,
                label: 3,
                classes: 3
            })
        );
        assert_eq!(
            classification_report(&probs[..2], &[0, 1, 2], 3),
            Err(MetricsError::Lengths {
                probabilities: 2,
                labels: 3
            })
        );
    }
}
