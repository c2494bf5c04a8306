//! What a round's metrics say when they leave the site.
//!
//! Without DP they are exact. Under DP (`privacy.mode = "local"`) every metric that leaves is a
//! DP release charged to the ledger with the round (`tutela_privacy::metrics`,
//! `SiteLedgers::record`): the validation loss, accuracy and unit count are replaced by their
//! noised values, the perplexity is `exp` of the noised loss, and what has no DP release is
//! withheld: the training loss (per-example losses of the training data, outside DP-SGD's
//! clipped and noised sums), and the "predicts one class" flag (a function of every validation
//! row). A round whose metrics were not charged (no step ran, no ledger) releases none.
//!
//! Under `mode = "central"` (DP-FedAvg at the coordinator) the site charges no round to its own
//! ledger, so no metric has a DP release: they are all withheld. The coordinator is trusted with
//! the raw update, but it keeps a site's metrics in the round record that `tutela job status`
//! shows to every operator, and its central accountant charges the noised model, not metrics:
//! an exact metric there would be a per-site output outside any ε (security review 2026-12-07).
//! `mode = "distributed"` is the distributed-DP rewrite's to decide (branch `dist-row`).

use std::collections::BTreeMap;

use tutela_privacy::metrics::MetricsRelease;
use tutela_protocol::federation::meta;
use tutela_protocol::job::PrivacySpec;

use super::round::RoundResult;

/// Below ln(f64::MAX) ≈ 709.8: the perplexity of any noised loss is a finite number.
const MAX_EXP_ARGUMENT: f64 = 700.0;

/// Whether a job of this privacy mode sends only DP releases of its metrics (and none when its
/// round charged none): DP-SGD at the site (`local`), DP at the coordinator (`central`: its
/// rounds charge no metrics, so none leave), and record-level distributed DP (`distributed`,
/// charged like `local`).
pub fn withholds_exact_metrics(mode: tutela_protocol::job::PrivacyMode) -> bool {
    use tutela_protocol::job::PrivacyMode;
    matches!(
        mode,
        PrivacyMode::Local | PrivacyMode::Central | PrivacyMode::Distributed
    )
}

/// Rewrites the metrics in `metadata` (the exact ones, as [`super::worker`] wrote them) for a
/// DP job: noised as charged, or withheld. `spec` is the job's privacy section.
pub fn release_under_dp(
    metadata: &mut BTreeMap<String, String>,
    result: &RoundResult,
    spec: &PrivacySpec,
) -> Result<(), String> {
    for key in [
        meta::TRAIN_LOSS,
        meta::EVAL_LOSS,
        meta::EVAL_ACCURACY,
        meta::EVAL_SAMPLES,
        meta::EVAL_PERPLEXITY,
        meta::SINGLE_CLASS_PREDICTED,
    ] {
        metadata.remove(key);
    }
    let charged = result
        .privacy
        .as_ref()
        .and_then(|p| p.charge)
        .and_then(|c| c.metrics);
    let Some(charged) = charged else {
        return Ok(());
    };
    let loss_max = spec
        .metrics_loss_max
        .unwrap_or(tutela_privacy::metrics::DEFAULT_METRICS_LOSS_MAX);
    // The σ charged, not one recomputed: what the ledger and the trail say is what was drawn.
    let release =
        MetricsRelease::new(charged.noise_multiplier, loss_max).map_err(|e| e.to_string())?;
    let m = release
        .release(&result.eval_units)
        .map_err(|e| e.to_string())?;
    metadata.insert(meta::EVAL_LOSS.to_string(), m.loss_mean.to_string());
    metadata.insert(
        meta::EVAL_LOSS_STDDEV.to_string(),
        m.loss_mean_stddev.to_string(),
    );
    metadata.insert(
        meta::EVAL_SAMPLES.to_string(),
        (m.units.max(0.0) as u64).to_string(),
    );
    if result.eval_perplexity.is_some() {
        // exp of the noised loss (post-processing): below 1 when the noise made the loss
        // negative. Capped only where exp would overflow, so ln(perplexity) = loss.
        let ppl = m.loss_mean.min(MAX_EXP_ARGUMENT).exp();
        metadata.insert(meta::EVAL_PERPLEXITY.to_string(), ppl.to_string());
    } else {
        metadata.insert(meta::EVAL_ACCURACY.to_string(), m.accuracy.to_string());
        metadata.insert(
            meta::EVAL_ACCURACY_STDDEV.to_string(),
            m.accuracy_stddev.to_string(),
        );
    }
    Ok(())
}
