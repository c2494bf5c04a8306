//! `tutela job status`'s rendering for people and as JSON: a job's state, approvals, rounds and
//! each site's metrics, or a statistics job's result.

use super::*;

/// A language model's validation perplexity, for people: two decimals, or a whole number when
/// it is large (an untrained model's is about its vocabulary size).
pub(super) fn perplexity(p: f64) -> String {
    if p >= 1000.0 {
        format!("{p:.0}")
    } else {
        format!("{p:.2}")
    }
}

/// One site's round metrics for people. Under DP they are noised releases (the site's
/// `tutela_privacy::metrics`, stddev > 0): shown clamped to their range, with ± one standard
/// deviation rounded for people and marked "noised"; no training loss is sent then.
pub(super) fn site_metrics_line(m: &pb::SiteMetrics) -> String {
    let noised = m.eval_loss_stddev > 0.0;
    if !noised {
        let eval = if m.eval_perplexity > 0.0 {
            format!("eval perplexity {}", perplexity(m.eval_perplexity))
        } else {
            format!("eval acc {:.4}", m.eval_accuracy)
        };
        return format!(
            "{eval} loss {:.4} (n={})  train loss {:.4} on {} samples in {:.2}s",
            m.eval_loss, m.eval_samples, m.train_loss, m.train_samples, m.train_seconds
        );
    }
    let loss = m.eval_loss.max(0.0);
    let eval = if m.eval_perplexity > 0.0 {
        // exp(loss ± s): the interval, as perplexity is not symmetric.
        format!(
            "eval perplexity {} (noised, {}..{})",
            perplexity(loss.exp()),
            perplexity((loss - m.eval_loss_stddev).max(0.0).exp()),
            perplexity((loss + m.eval_loss_stddev).exp()),
        )
    } else {
        format!(
            "eval acc {} ± {} (noised)",
            round_for_people(m.eval_accuracy.clamp(0.0, 1.0)),
            round_for_people(m.eval_accuracy_stddev),
        )
    };
    format!(
        "{eval} loss {} ± {} (noised, n≈{})  trained on {} samples in {:.2}s",
        round_for_people(loss),
        round_for_people(m.eval_loss_stddev),
        m.eval_samples,
        m.train_samples,
        m.train_seconds
    )
}

/// Two significant digits: a noised figure's precision is its ±, not its last decimal.
pub(super) fn round_for_people(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let digits = (1 - x.abs().log10().floor() as i32).max(0) as usize;
    format!("{x:.digits$}")
}

/// The round's quality as people read it: the sites' perplexity for a language model (each
/// site's, reported as the round's global model scored on its validation split), the mean
/// accuracy otherwise.
pub(super) fn round_quality(r: &pb::RoundSummary) -> String {
    let ppl: Vec<f64> = r
        .metrics
        .iter()
        .map(|m| m.eval_perplexity)
        .filter(|p| *p > 0.0)
        .collect();
    if ppl.is_empty() {
        format!("accuracy {:.4}", r.eval_accuracy)
    } else {
        let mean = ppl.iter().sum::<f64>() / ppl.len() as f64;
        format!("perplexity {}", perplexity(mean))
    }
}

pub fn print_status(s: &pb::JobStatus) {
    println!("job      {} ({})", s.job_id, s.name);
    println!(
        "state    {}{}",
        s.state,
        if s.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", s.reason)
        }
    );
    if !s.waiting_reason.is_empty() {
        println!("waiting  {}", s.waiting_reason);
    }
    if s.kind == "statistics" {
        println!("kind     consortium statistics (one release per site)");
    }
    println!("rounds   {}/{}", s.rounds_completed, s.rounds_total);
    if let Some(stats) = &s.statistics {
        println!("result   statistics file {}", stats.sha256);
        println!("         {}", super::stats::summary_line(stats));
        println!(
            "         `tutela job stats {}` prints it and writes the file",
            s.job_id
        );
    }
    println!("spec     {}", s.spec_digest);
    if !s.submitted_by.is_empty() {
        println!("by       {}", s.submitted_by);
    }
    if !s.approvals.is_empty() || !s.approvals_missing.is_empty() {
        println!("approvals");
        for a in &s.approvals {
            println!("  {:<48} {}", a.signer, a.standing);
        }
        for g in &s.approvals_gathered {
            println!("  gathered: {g}");
        }
        for m in &s.approvals_missing {
            println!("  missing:  {m}");
        }
    }
    println!(
        "model    {}",
        if s.model_id.is_empty() {
            "-"
        } else {
            &s.model_id
        }
    );
    println!("sites    {}", s.connected_sites.join(", "));
    for r in &s.rounds {
        println!(
            "  round {:>3} attempt {} {} sites {} ({:.1}s)",
            r.round,
            r.attempt,
            round_quality(r),
            r.participants.join(","),
            r.seconds
        );
        for m in &r.metrics {
            println!("    {:<16} {}", m.site, site_metrics_line(m));
            if m.dp_delta > 0.0 {
                println!(
                    "    {:<16} DP-SGD: ε {:.3} this round, ε {:.3} for the job so far (δ = {:e})",
                    "", m.dp_round_epsilon, m.dp_job_epsilon, m.dp_delta
                );
            }
            for warning in site_warnings(m) {
                println!("    {:<16} WARNING: {warning}", "");
            }
            if !m.dataset_commitment.is_empty() {
                println!(
                    "    {:<16} dataset commitment {}  anonymization {}",
                    "",
                    m.dataset_commitment,
                    if m.deid_config_sha256.is_empty() {
                        "none"
                    } else {
                        &m.deid_config_sha256
                    }
                );
            }
        }
        if let Some(c) = &r.central_dp {
            println!(
                "    {:<16} ε {:.3} this round, ε {:.3} for the job so far (δ = {:e}); noise \
                 multiplier {:.4}, clip {:.4}{}, {} of {} updates within the clip",
                "central DP:",
                c.round_epsilon,
                c.job_epsilon,
                c.delta,
                c.noise_multiplier,
                c.clip,
                if c.next_clip == c.clip {
                    String::new()
                } else {
                    format!(" (next round {:.4})", c.next_clip)
                },
                c.unclipped,
                c.sites
            );
        }
        if let Some(a) = &r.robust_aggregation {
            let most: Vec<String> = a
                .trimmed
                .iter()
                .filter(|t| t.fraction > 0.0)
                .take(3)
                .map(|t| format!("{} {:.1}%", t.site, 100.0 * t.fraction))
                .collect();
            println!(
                "    {:<16} {}; excluded: {}; trimmed most: {}",
                "aggregation:",
                a.rule,
                if a.excluded.is_empty() {
                    "none".to_string()
                } else {
                    a.excluded.join(", ")
                },
                if most.is_empty() {
                    "none".to_string()
                } else {
                    most.join(", ")
                }
            );
        }
        for x in &r.refused {
            println!("    {:<16} REFUSED: {}", x.site, x.reason);
        }
    }
}

pub(super) fn status_json(s: &pb::JobStatus) -> serde_json::Value {
    serde_json::json!({
        "job_id": s.job_id,
        "name": s.name,
        "state": s.state,
        "reason": s.reason,
        "rounds_total": s.rounds_total,
        "rounds_completed": s.rounds_completed,
        "spec_digest": s.spec_digest,
        "model_id": s.model_id,
        "model_path": s.model_path,
        "connected_sites": s.connected_sites,
        "submitted_by": s.submitted_by,
        "kind": s.kind,
        "statistics": s.statistics.as_ref().map(|t| serde_json::json!({
            "sha256": t.sha256, "sites": t.sites, "epsilon_per_site": t.epsilon_per_site,
            "delta": t.delta, "accountant": t.accountant, "confidence": t.confidence,
            "rows": t.rows,
        })),
        "waiting_reason": s.waiting_reason,
        "approvals_gathered": s.approvals_gathered,
        "approvals_missing": s.approvals_missing,
        "approvals": s.approvals.iter().map(|a| serde_json::json!({
            "signer": a.signer, "spec_digest": a.spec_digest, "standing": a.standing,
            "signed_at_unix_ms": a.signed_at_unix_ms, "expires_at_unix_ms": a.expires_at_unix_ms,
        })).collect::<Vec<_>>(),
        "rounds": s.rounds.iter().map(|r| serde_json::json!({
            "round": r.round,
            "attempt": r.attempt,
            "participants": r.participants,
            "eval_accuracy": r.eval_accuracy,
            "model_id": r.model_id,
            "seconds": r.seconds,
            "metrics": r.metrics.iter().map(site_metrics_json).collect::<Vec<_>>(),
            "refused": r.refused.iter().map(|x| serde_json::json!({"site": x.site, "reason": x.reason})).collect::<Vec<_>>(),
            "central_dp": r.central_dp.as_ref().map(|c| serde_json::json!({
                "noise_multiplier": c.noise_multiplier, "clip": c.clip, "next_clip": c.next_clip,
                "round_epsilon": c.round_epsilon, "job_epsilon": c.job_epsilon, "delta": c.delta,
                "sites": c.sites, "unclipped": c.unclipped,
            })),
            "robust_aggregation": r.robust_aggregation.as_ref().map(|a| serde_json::json!({
                "rule": a.rule, "excluded": a.excluded,
                "trimmed": a.trimmed.iter().map(|t| serde_json::json!({"site": t.site, "fraction": t.fraction})).collect::<Vec<_>>(),
            })),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(metrics: &[(f64, f64)]) -> pb::RoundSummary {
        pb::RoundSummary {
            eval_accuracy: 0.5,
            metrics: metrics
                .iter()
                .map(|&(accuracy, perplexity)| pb::SiteMetrics {
                    eval_accuracy: accuracy,
                    eval_perplexity: perplexity,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn status_warns_of_swamping_noise_and_a_single_predicted_class() {
        let healthy = pb::SiteMetrics {
            dp_noise_multiplier: 1.1,
            dp_expected_batch: 64.0,
            ..Default::default()
        };
        assert!(site_warnings(&healthy).is_empty());
        // A 100-row site at batch 4 with σ = 5: σ/B = 1.25.
        let swamped = pb::SiteMetrics {
            dp_noise_multiplier: 5.0,
            dp_expected_batch: 4.0,
            single_class_predicted: Some(0),
            ..Default::default()
        };
        let w = site_warnings(&swamped);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("σ/B = 1.250 > 1"), "{w:?}");
        assert!(
            w[1].contains("predicts class 0 for every validation row"),
            "{w:?}"
        );
        // No DP: nothing to weigh.
        assert!(site_warnings(&pb::SiteMetrics::default()).is_empty());
    }

    #[test]
    fn a_language_model_s_round_shows_perplexity_and_others_accuracy() {
        assert_eq!(round_quality(&round(&[(0.5, 0.0)])), "accuracy 0.5000");
        assert_eq!(
            round_quality(&round(&[(0.0, 12.0), (0.0, 14.5)])),
            "perplexity 13.25"
        );
        // An untrained model's perplexity is about its vocabulary size: no decimals then.
        assert_eq!(round_quality(&round(&[(0.0, 4095.7)])), "perplexity 4096");
    }

    /// Noised metrics read as noised, clamped for display, with a ± rounded for people; exact
    /// metrics read as before.
    #[test]
    fn noised_metrics_are_shown_clamped_with_their_plus_minus() {
        let exact = pb::SiteMetrics {
            site: "a".into(),
            eval_loss: 0.25,
            eval_accuracy: 0.9,
            eval_samples: 100,
            ..Default::default()
        };
        let line = site_metrics_line(&exact);
        assert!(
            line.contains("eval acc 0.9000 loss 0.2500") && !line.contains("noised"),
            "{line}"
        );
        let noised = pb::SiteMetrics {
            eval_loss: -0.3,
            eval_accuracy: 1.07,
            eval_loss_stddev: 0.8123,
            eval_accuracy_stddev: 0.0412,
            ..exact.clone()
        };
        let line = site_metrics_line(&noised);
        assert!(line.contains("eval acc 1.0 ± 0.041 (noised)"), "{line}");
        assert!(line.contains("loss 0 ± 0.81 (noised"), "{line}");
        let lm = pb::SiteMetrics {
            eval_loss: 2.0,
            eval_perplexity: 2f64.exp(),
            eval_loss_stddev: 0.5,
            ..exact
        };
        let line = site_metrics_line(&lm);
        assert!(
            line.contains("eval perplexity") && line.contains("(noised, "),
            "{line}"
        );
    }
}
