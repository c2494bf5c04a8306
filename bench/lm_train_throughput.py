"""Training tokens/s of the `llama` decoder: Tutela's (tch, the site node's code) beside the same
model in PyTorch eager (transformers' LlamaForCausalLM, sdpa attention), same threads, same
configuration, same batch, AdamW, on random token ids. Both run in this one invocation,
alternating round by round, so that both see the same machine; a shared machine's speed drifts
by tens of percent within seconds, so the summary is the median of the rounds' ratios.

    . scripts/torch-env.sh
    cargo build --release -p tutela-site-node --example lm_train_throughput
    .venv/bin/python bench/lm_train_throughput.py [--threads 2] [--rounds 2] [--profile release]
"""
import argparse
import json
import os
import subprocess
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small Llama: 4 layers, hidden 256, 8 heads sharing 4 key/value heads (GQA), vocab 4096.
CONFIG = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
              tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def run_pytorch(threads, batch, seq, warmup, steps):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, CONFIG["vocab_size"], (batch, seq))

    def step():
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    first = [step() for _ in range(warmup)][0]
    start = time.perf_counter()
    for _ in range(steps):
        last = step()
    seconds = time.perf_counter() - start
    return {"impl": "PyTorch eager (transformers)", "threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "tokens_per_s": batch * seq * steps / seconds, "seconds_per_step": seconds / steps,
            "first_loss": first, "last_loss": last}


def run_tutela(binary, config_path, threads, batch, seq, warmup, steps):
    out = subprocess.run([binary, config_path, str(threads), str(batch), str(seq), str(warmup), str(steps)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", default="release")
    args = parser.parse_args()
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    binary = os.path.join(target, args.profile, "examples", "lm_train_throughput")
    with tempfile.TemporaryDirectory() as tmp:
        config_path = os.path.join(tmp, "config.json")
        LlamaConfig(**CONFIG).save_pretrained(tmp)
        shape = (args.threads, args.batch, args.seq, args.warmup, args.steps)
        ratios = []
        for r in range(args.rounds):
            ours = run_tutela(binary, config_path, *shape)
            theirs = run_pytorch(*shape)
            for result in (ours, theirs):
                print(f"round {r + 1}: {result['impl']:<30} {result['tokens_per_s']:>9.1f} tokens/s "
                      f"({result['seconds_per_step']:.3f} s/step, {result['threads']} threads, "
                      f"{result['parameters']} parameters, loss {result['first_loss']:.3f} -> "
                      f"{result['last_loss']:.3f})")
            ratios.append(ours["tokens_per_s"] / theirs["tokens_per_s"])
            print(f"round {r + 1}: tutela / pytorch = {ratios[-1]:.3f}")
        ratios.sort()
        print(f"median ratio over {len(ratios)} rounds: {ratios[len(ratios) // 2]:.3f} "
              f"(range {ratios[0]:.3f} to {ratios[-1]:.3f}; target >= 1.0)")


if __name__ == "__main__":
    main()
