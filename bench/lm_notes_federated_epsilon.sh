#!/usr/bin/env bash
# BENCHMARKS.md, "Language model: federated held-out perplexity against ε": `tutela demo
# --dataset notes` (three hospitals, LoRA under DP-SGD, FedAvg of the adapters' B) once per ε,
# the same split seed, with the demo's own base-model and central fine-tune scores beside the
# federated one. Everything with the demo as it ships; one run per cell, one run at a time.
#
#   . scripts/torch-env.sh && cargo build -p tutela-cli -p tutela-site-node \
#       -p tutela-coordinator -p tutela-audit --bins
#   bench/lm_notes_federated_epsilon.sh [WORK_DIR]
#
# Environment:
#   RUNS   "EPSILON:SEED ..." (default "inf:7 8:7 3:7 1:7 8:8 3:8"; EPSILON `inf` = no DP)
#   BIN    the directory holding tutela, tutela-node, tutela-coordinator, tutela-audit (default
#          target/debug). The binaries are copied into WORK_DIR/bin first, so a rebuild while
#          the runs go cannot change them half-way.
#   NICE   the niceness of every run (default 10: a shared machine).
#   DEMO_ARGS  more arguments for every run, e.g. "--skip-central" (the central baseline takes
#          longer than the federated rounds: 45+ minutes at ε = 8 on the loaded 2-core VM).
# Output: WORK_DIR/run-EPSILON-SEED.log per run, and WORK_DIR/table.md (appended as each run
# finishes): base, federated and central held-out perplexity, wall time, load average.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(realpath -m "${1:-$(mktemp -d)}")
runs=${RUNS:-"inf:7 8:7 3:7 1:7 8:8 3:8"}
bin=${BIN:-$repo/target/debug}
niceness=${NICE:-10}
read -r -a demo_args <<< "${DEMO_ARGS:-}"
mkdir -p "$work/bin"
for b in tutela tutela-node tutela-coordinator tutela-audit; do
    cp "$bin/$b" "$work/bin/$b"
done
table=$work/table.md
if [ ! -f "$table" ]; then
    {
        echo "| ε per site | seed | base | federated (3 sites) | central (pooled) | base/federated | wall s | load avg (1 min) start → end |"
        echo "|---|---:|---:|---:|---:|---:|---:|---|"
    } > "$table"
fi
echo "work dir: $work; $(date -u +%FT%TZ); $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"
for run in $runs; do
    eps=${run%%:*}
    seed=${run##*:}
    log=$work/run-$eps-$seed.log
    load_start=$(cut -d' ' -f1 /proc/loadavg)
    start=$(date +%s)
    echo "== ε = $eps, seed $seed: $(date -u +%FT%TZ), load $load_start"
    # The base is built once into the shared cache and reused by every run.
    if ! nice -n "$niceness" "$work/bin/tutela" demo --dataset notes --data-dir "$repo/data" \
        --epsilon "$eps" --seed "$seed" --dir "$work/demo-$eps-$seed" \
        --cache-dir "$work/cache" "${demo_args[@]}" > "$log" 2>&1; then
        echo "   FAILED: see $log"
        echo "| $eps | $seed | failed: see run-$eps-$seed.log | | | | $(( $(date +%s) - start )) | $load_start → $(cut -d' ' -f1 /proc/loadavg) |" >> "$table"
        continue
    fi
    wall=$(( $(date +%s) - start ))
    load_end=$(cut -d' ' -f1 /proc/loadavg)
    # The demo's score lines: "  base model (...)  X", "  federated, ...  X  (Rx lower)",
    # "  central, ...  X  (Rx lower)".
    base=$(awk '/^  base model \(/ {print $NF}' "$log")
    fed=$(awk '/^  federated, 3 hospitals/ {print $(NF-2)}' "$log")
    ratio=$(awk '/^  federated, 3 hospitals/ {print $(NF-1)}' "$log" | tr -d '(')
    central=$(awk '/^  central, pooled notes/ {print $(NF-2)}' "$log")
    central=${central:-skipped}
    echo "| $eps | $seed | $base | $fed | $central | $ratio | $wall | $load_start → $load_end |" >> "$table"
    echo "   base $base, federated $fed ($ratio), central $central; ${wall}s, load $load_start → $load_end"
done
cat "$table"
