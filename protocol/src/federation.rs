//! The vocabulary of `tutela.v1.Federation` beyond the protobuf messages: the manifest metadata
//! keys a node sets on a task's result. They travel inside the tensor stream's manifest, so the
//! stream digest covers them. One definition, used by the node that writes them and the
//! coordinator that reads them.

/// Manifest metadata keys of a task's result.
pub mod meta {
    /// The task the stream answers (required).
    pub const TASK: &str = "tutela.task";
    /// Training rows, the update's FedAvg weight (required for a TRAIN task).
    pub const SAMPLES: &str = "tutela.samples";
    /// Mean training loss over the round's local epochs.
    pub const TRAIN_LOSS: &str = "tutela.train.loss";
    /// Wall-clock seconds of local training.
    pub const TRAIN_SECONDS: &str = "tutela.train.seconds";
    /// The round's global model on the site's validation split, before training: loss.
    pub const EVAL_LOSS: &str = "tutela.eval.loss";
    /// ... accuracy.
    pub const EVAL_ACCURACY: &str = "tutela.eval.accuracy";
    /// Under DP (`tutela_privacy::metrics`), the standard deviation of the noised `EVAL_LOSS`
    /// (its ± for people); absent when the loss is exact.
    pub const EVAL_LOSS_STDDEV: &str = "tutela.eval.loss_stddev";
    /// ... and of the noised `EVAL_ACCURACY`.
    pub const EVAL_ACCURACY_STDDEV: &str = "tutela.eval.accuracy_stddev";
    /// ... and the number of validation rows (under DP: privacy units, noised).
    pub const EVAL_SAMPLES: &str = "tutela.eval.samples";
    /// A language model's perplexity on the validation split (exp of the mean per-token loss),
    /// before training; absent for other models.
    pub const EVAL_PERPLEXITY: &str = "tutela.eval.perplexity";
    /// The salted Merkle root (hex) over the site's anonymized dataset rows
    /// (`tutela_privacy::commitment`), for the model's lineage; absent when the node has no
    /// site secret.
    pub const DATASET_COMMITMENT: &str = "tutela.dataset.commitment";
    /// SHA-256 (hex) of the anonymization configuration the dataset went through (the
    /// de-identification report's `config_sha256`); absent for a dataset without one.
    pub const DEID_CONFIG: &str = "tutela.dataset.deid_config_sha256";
    /// ε this round's DP-SGD spent on the site's dataset (at [`DP_DELTA`]); absent without DP.
    pub const DP_ROUND_EPSILON: &str = "tutela.dp.round_epsilon";
    /// ε the job has spent on the site's dataset so far, rounds composed by the accountant.
    pub const DP_JOB_EPSILON: &str = "tutela.dp.job_epsilon";
    /// The δ both ε figures are stated at.
    pub const DP_DELTA: &str = "tutela.dp.delta";
    /// DP-SGD's noise multiplier σ as the round trained with it (after the noise grid's
    /// correction); absent without DP.
    pub const DP_NOISE_MULTIPLIER: &str = "tutela.dp.noise_multiplier";
    /// The expected batch size of the round's Poisson sampling (sample rate × training rows):
    /// with σ, the noise-to-signal ratio σ / B (`tutela_privacy::planning::noise_to_signal`).
    pub const DP_EXPECTED_BATCH: &str = "tutela.dp.expected_batch";
    /// Set when the trained model predicts one class for every validation row: that class's
    /// index in the schema's class list (it has learnt the majority class only).
    pub const SINGLE_CLASS_PREDICTED: &str = "tutela.train.single_class_predicted";
}
