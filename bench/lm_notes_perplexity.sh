#!/usr/bin/env bash
# BENCHMARKS.md, "Language model: held-out perplexity against ε": a tiny Llama pretrained on
# tinyshakespeare.txt, then LoRA-fine-tuned by one site on the Synthea notes (split by patient,
# privacy unit the document) at ε ∈ {1, 3, 8, ∞}; the INT8 export's perplexity cost; adapter
# bytes against the model's. Everything with the site node's own commands, in one run:
#
#   . scripts/torch-env.sh && cargo build -p tutela-site-node --bin tutela-node -p tutela-cli
#   bench/lm_notes_perplexity.sh [WORK_DIR]
#
# Environment: STEPS (pretraining steps, default 400), EPOCHS (fine-tuning epochs, default 1),
# NODE and TUTELA (the binaries, default target/debug/...).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
node=${NODE:-$repo/target/debug/tutela-node}
tutela=${TUTELA:-$repo/target/debug/tutela}
steps=${STEPS:-400}
epochs=${EPOCHS:-1}
data=$repo/data
mkdir -p "$work"
cd "$work"
echo "work dir: $work; $(date -u +%FT%TZ); $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"

# The tokenizer: byte-level BPE on public text only.
[ -f tok/tokenizer.json ] || "$node" tokenizer train --input "$data/tinyshakespeare.txt" \
    --vocab-size 1024 --output tok --quiet >/dev/null
cat > config.json <<'EOF'
{"model_type": "llama", "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
 "max_position_embeddings": 256, "tie_word_embeddings": true, "rms_norm_eps": 1e-6,
 "initializer_range": 0.02}
EOF

# The base: every parameter trained on the first 90 % of tinyshakespeare; the last 10 % is
# held out (the pretraining reports its perplexity before and after).
if [ ! -f base/model.safetensors ]; then
    "$node" lm pretrain --text "$data/tinyshakespeare.txt" --tokenizer tok/tokenizer.json \
        --config config.json --output base --steps "$steps" --seq-len 128 --batch-size 16 \
        --lr 3e-3 --quiet
fi

# The INT8 export's cost: the held-out 10 % scored with the f32 base and the dequantized export.
bytes=$(wc -c < "$data/tinyshakespeare.txt")
tail -c $((bytes / 10)) "$data/tinyshakespeare.txt" > heldout.txt
"$tutela" model export-int8 --model base --output base-int8
for m in base base-int8; do
    echo "$m on held-out tinyshakespeare: $("$node" lm perplexity --model $m \
        --tokenizer tok/tokenizer.json --text heldout.txt --window 128 --stride 64 2>/dev/null)"
done

# One site's LoRA fine-tune on the notes at each ε (∞: no DP), the same split and seed.
for eps in inf 8 3 1; do
    dp=()
    [ "$eps" = inf ] || dp=(--epsilon "$eps")
    echo "== ε = $eps"
    "$node" lm finetune --base base --tokenizer tok/tokenizer.json \
        --dataset "$data/synthea_clinical_notes.jsonl" --patient-field patient_id \
        --unit document --rank 8 --alpha 16 --epochs "$epochs" --batch-size 16 --seq-len 128 \
        --lr 5e-3 --seed 1 --output "adapter-$eps" "${dp[@]}" --quiet 2>&1 \
        | grep -v "text dataset loaded"
done
ls -l base/model.safetensors base-int8/model.safetensors adapter-inf/adapter_model.safetensors
