//! What a round's metrics say under central DP (security review 2026-12-07): the site charges
//! no metrics release to its ledger in `mode = "central"`, so none leaves exact — not the
//! validation loss, accuracy or count, not the training loss, not the one-class flag (before,
//! all left exact, kept in the coordinator's round record and shown by `tutela job status`).

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_central_dp_round_sends_no_exact_metric() {
    let mut h = Harness::start("").await;
    let spec = job_spec("breast_cancer", "mlp")
        + "[privacy]\nmode = \"central\"\ndelta = 1e-5\n\
           [privacy.central]\nclip_norm = 1.0\nnoise_multiplier = 1.0\n";
    h.send(task("init-c", pb::TaskKind::Initialize, &spec, "", "{}"))
        .await;
    let (_, initial) = h.update().await;
    let model_id = h.offer_model("train-c", &initial);
    h.send(task("train-c", pb::TaskKind::Train, &spec, &model_id, "{}"))
        .await;
    let (manifest, _) = loop {
        match h.next_event().await {
            Event::Fetched { .. } => continue,
            Event::Update { manifest, tensors } => break (manifest, tensors),
            other => panic!("expected the central round's update, got {other:?}"),
        }
    };
    let m = &manifest.metadata;
    for key in [
        meta::TRAIN_LOSS,
        meta::EVAL_LOSS,
        meta::EVAL_ACCURACY,
        meta::EVAL_SAMPLES,
        meta::EVAL_PERPLEXITY,
        meta::SINGLE_CLASS_PREDICTED,
    ] {
        assert!(
            !m.contains_key(key),
            "{key} left exact under central DP: {m:?}"
        );
    }
    // The training rows are announced as in every mode (the coordinator weighs updates by them).
    assert!(m.contains_key(meta::SAMPLES), "{m:?}");
    h.shutdown().await;
}
