//! The mixture-of-experts MLP of DeepSeek-MoE as transformers' `Qwen2MoeSparseMoeBlock` has it:
//! a softmax router picks each token's top-k routed experts (SwiGLU MLPs), and a shared expert,
//! scaled by a sigmoid gate, sees every token.
//!
//! Every token is processed by all k of its experts: there is no capacity factor, so no token is
//! ever dropped, whatever the routing's balance. The load-balancing loss
//! ([`load_balancing_loss`], Switch Transformer's, as transformers computes it) pushes the
//! router towards balance instead.
//!
//! On disk transformers writes one tensor per expert (`mlp.experts.3.gate_proj.weight`); the
//! variables here have exactly those names.

use tch::{Kind, Tensor, nn};

use super::config::MoeConfig;
use super::error::LmError;
use super::llama::{SwiGlu, dim};

#[derive(Debug)]
pub struct SparseMoe {
    /// The router, `[num_experts, hidden]` (`mlp.gate.weight`).
    gate: Tensor,
    experts: Vec<SwiGlu>,
    shared_expert: Option<SwiGlu>,
    /// `[1, hidden]` (`mlp.shared_expert_gate.weight`).
    shared_expert_gate: Option<Tensor>,
    top_k: i64,
    norm_topk_prob: bool,
    hidden: i64,
}

impl SparseMoe {
    /// `vs` is the layer's `mlp` path.
    pub fn new(vs: &nn::Path, hidden: usize, moe: &MoeConfig) -> SparseMoe {
        let gate = (vs / "gate").var(
            "weight",
            &[dim(moe.num_experts), dim(hidden)],
            nn::Init::Const(0.0),
        );
        let experts = (0..moe.num_experts)
            .map(|e| {
                SwiGlu::new(
                    &(vs / "experts" / e),
                    hidden,
                    moe.moe_intermediate_size,
                    false,
                )
            })
            .collect();
        let shared = moe.shared_expert_intermediate_size > 0;
        SparseMoe {
            gate,
            experts,
            shared_expert: shared.then(|| {
                SwiGlu::new(
                    &(vs / "shared_expert"),
                    hidden,
                    moe.shared_expert_intermediate_size,
                    false,
                )
            }),
            shared_expert_gate: shared.then(|| {
                (vs / "shared_expert_gate").var("weight", &[1, dim(hidden)], nn::Init::Const(0.0))
            }),
            top_k: dim(moe.num_experts_per_tok),
            norm_topk_prob: moe.norm_topk_prob,
            hidden: dim(hidden),
        }
    }

    /// `xs: [batch, time, hidden]` → (output of the same shape, router logits
    /// `[batch * time, num_experts]`).
    pub fn forward(&self, xs: &Tensor) -> Result<(Tensor, Tensor), LmError> {
        let shape = xs.size();
        let rows = xs.reshape([-1, self.hidden]);
        let router_logits = rows.linear::<Tensor>(&self.gate, None);
        let probs = router_logits.softmax(-1, Kind::Float);
        let (mut top_weights, top_experts) = probs.topk(self.top_k, -1, true, true);
        if self.norm_topk_prob {
            top_weights = &top_weights / top_weights.sum_dim_intlist(-1, true, Kind::Float);
        }
        let top_weights = top_weights.to_kind(rows.kind());

        let mut out = rows.zeros_like();
        for (e, expert) in self.experts.iter().enumerate() {
            // (token, slot) pairs that chose expert e; a token chooses an expert at most once.
            let chosen = top_experts.eq(e as i64).nonzero();
            if chosen.size()[0] == 0 {
                continue;
            }
            let tokens = chosen.select(1, 0);
            let slots = chosen.select(1, 1);
            let weights = top_weights.index(&[Some(&tokens), Some(&slots)]);
            let expert_out =
                expert.forward(&rows.index_select(0, &tokens))? * weights.unsqueeze(-1);
            out = out.index_add(0, &tokens, &expert_out);
        }
        if let (Some(shared), Some(shared_gate)) = (&self.shared_expert, &self.shared_expert_gate) {
            let gate = rows.linear::<Tensor>(shared_gate, None).sigmoid();
            out = out + gate * shared.forward(&rows)?;
        }
        Ok((out.reshape(shape.as_slice()), router_logits))
    }
}

/// The auxiliary load-balancing loss over every sparse layer's router logits: `num_experts ×
/// Σ_e f_e P_e`, where `f_e` is the share of top-k assignments that went to expert `e` and `P_e`
/// its mean routing probability, both over non-padding tokens (transformers'
/// `load_balancing_loss_func`). It is 1·k when routing is perfectly balanced.
pub fn load_balancing_loss(
    router_logits: &[Tensor],
    num_experts: usize,
    top_k: usize,
    attention_mask: Option<&Tensor>,
) -> Tensor {
    let experts = dim(num_experts);
    let Some(first) = router_logits.first() else {
        return Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
    };
    let device = first.device();
    let mut assignments = Tensor::zeros([experts], (Kind::Float, device));
    let mut probabilities = Tensor::zeros([experts], (Kind::Float, device));
    let mut rows = Tensor::zeros([], (Kind::Float, device));
    let flat_mask = attention_mask.map(|m| m.reshape([-1]).to_kind(Kind::Float));
    for logits in router_logits {
        let probs = logits.softmax(-1, Kind::Float);
        let (_, selected) = probs.topk(dim(top_k), -1, true, true);
        let (weight, probs_weighted, count) = match &flat_mask {
            Some(mask) => (
                mask.repeat_interleave_self_int(dim(top_k), None, None),
                &probs * mask.unsqueeze(-1),
                mask.sum(Kind::Float),
            ),
            None => (
                Tensor::ones([selected.numel() as i64], (Kind::Float, device)),
                probs.shallow_clone(),
                Tensor::from(probs.size()[0] as f32).to_device(device),
            ),
        };
        assignments = assignments.scatter_add(0, &selected.reshape([-1]), &weight);
        probabilities = probabilities + probs_weighted.sum_dim_intlist(0, false, Kind::Float);
        rows = rows + count;
    }
    let tokens_per_expert = assignments / &rows;
    let router_prob_per_expert = probabilities / &rows;
    (tokens_per_expert * router_prob_per_expert).sum(Kind::Float) * (num_experts as f64)
}
