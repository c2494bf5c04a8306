"""Reference checkpoints and outputs from transformers for the site node's language-model tests.

    lm_reference.py build OUT_DIR
        Builds tiny random checkpoints (no download) with transformers, saves each under
        OUT_DIR/<name>/ (config.json + model.safetensors), and writes the reference outputs on
        fixed ids to OUT_DIR/<name>/reference.safetensors.
    lm_reference.py check DIR...
        Loads each directory (written by the Rust side) with AutoModelForCausalLM, refusing any
        missing or unexpected tensor, and writes its logits on DIR/ids.safetensors's "ids" to
        DIR/theirs.safetensors.

Weights are drawn with a large std (0.15) and norms and biases are perturbed: at transformers'
default init (std 0.02, unit norms) a wrong RoPE convention shows only ~1e-2 logit error
(STACK.md pitfall 9).
"""
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

torch.manual_seed(17)
VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, max_position_embeddings=128,
              initializer_range=0.15, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def configs():
    yield "llama_gqa_tied", LlamaForCausalLM, LlamaConfig(
        intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True, **COMMON)
    yield "llama_mha_untied_bias", LlamaForCausalLM, LlamaConfig(
        intermediate_size=40, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
        attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, **COMMON)
    yield "qwen2_moe", Qwen2MoeForCausalLM, Qwen2MoeConfig(
        intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        router_aux_loss_coef=0.01, **COMMON)


def perturb(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
            elif "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))


def build(out):
    ids = torch.randint(0, VOCAB, (1, 12))
    padded = torch.randint(0, VOCAB, (3, 12))
    lengths = [12, 9, 2]
    mask = torch.zeros(3, 12, dtype=torch.int64)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        padded[row, n:] = 0
    for name, cls, config in configs():
        model = cls(config)
        perturb(model)
        model.eval()
        model.save_pretrained(f"{out}/{name}")
        with torch.no_grad():
            single = model(ids, labels=ids)
            labels = padded.masked_fill(mask == 0, -100)
            batch = model(padded, attention_mask=mask, labels=labels,
                          output_router_logits=cls is Qwen2MoeForCausalLM)
            sequence = ids.clone()
            for _ in range(8):
                nxt = model(sequence).logits[0, -1].argmax()
                sequence = torch.cat([sequence, nxt.view(1, 1)], dim=1)
        reference = {
            "ids": ids, "logits": single.logits.contiguous(), "loss": single.loss.reshape(1),
            "padded_ids": padded, "padded_mask": mask, "padded_logits": batch.logits.contiguous(),
            # transformers adds router_aux_loss_coef * aux to the loss when it is asked for.
            "padded_loss": batch.loss.reshape(1),
            "greedy": sequence[0, 12:].contiguous(),
        }
        if getattr(batch, "aux_loss", None) is not None:
            reference["padded_aux_loss"] = batch.aux_loss.reshape(1)
        save_file(reference, f"{out}/{name}/reference.safetensors")
        print(name, "saved")


def check(dirs):
    for d in dirs:
        model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
        problems = {k: v for k, v in info.items() if v and k != "error_msgs" or (k == "error_msgs" and v)}
        if problems:
            sys.exit(f"{d}: transformers reported {problems}")
        model.eval()
        ids = load_file(f"{d}/ids.safetensors")["ids"]
        with torch.no_grad():
            logits = model(ids).logits
        save_file({"logits": logits.contiguous()}, f"{d}/theirs.safetensors")
        print(d, type(model).__name__)


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(sys.argv[2])
    elif sys.argv[1] == "check":
        check(sys.argv[2:])
    else:
        sys.exit(f"unknown command {sys.argv[1]!r}")
