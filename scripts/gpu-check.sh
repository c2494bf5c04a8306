#!/usr/bin/env bash
# The checks that need a CUDA GPU (CI has none): DP noise drawn on the GPU against the CPU
# sampler bit for bit over >= 10^7 values, GPU and CPU draws/s, DP-SGD steps on CUDA with the
# noise drawn on the GPU, and (with --lm) LM tokens/s for a ~100M-parameter llama and DP-LoRA on
# a ~0.5B one. The program is site-node/examples/gpu_check.rs; docs/architecture.md ("DP noise on
# a GPU") says what each check shows.
#
# Two steps, because the device machine has no Rust toolchain and no network:
#
#   1. Here (the dev machine, with the repository's .venv):
#        scripts/gpu-check.sh build
#      builds the example and copies it to target/gpu-check/ (about 10 MB; git ignores target/).
#   2. On the device machine, through the device tool's `run`, carrying that folder:
#        run(command="scripts/gpu-check.sh run --lm", carry=["target/gpu-check"], timeout_s=540)
#      It links against the device's own libtorch (python3's torch 2.11.0, the version tch 0.24
#      was built against here), writes everything to $OUT/gpu-check.log (JSON lines from the
#      program after the nvidia-smi header), and exits non-zero if a check failed.
#      The program itself is limited to 450 s; without --lm it takes well under a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
bin_dir=target/gpu-check

case "${1:-}" in
build)
    # shellcheck source=torch-env.sh
    . scripts/torch-env.sh
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
    cargo build -p tutela-site-node --example gpu_check
    mkdir -p "$bin_dir"
    cp "$CARGO_TARGET_DIR/debug/examples/gpu_check" "$bin_dir/gpu_check"
    strip "$bin_dir/gpu_check" 2>/dev/null || true
    ls -la "$bin_dir"
    echo "now, on the device machine: scripts/gpu-check.sh run --lm (carry target/gpu-check)"
    ;;
run)
    shift
    out="${OUT:-$PWD/gpu-check-out}"
    mkdir -p "$out"
    log="$out/gpu-check.log"
    if [ ! -x "$bin_dir/gpu_check" ]; then
        echo "no $bin_dir/gpu_check: run 'scripts/gpu-check.sh build' on the dev machine and carry $bin_dir" | tee "$log"
        exit 2
    fi
    # libtorch, and libnvrtc for the noise kernel, from the device's python3 torch (the binary's
    # RUNPATH names the dev machine's venv, absent here; LD_LIBRARY_PATH is searched first).
    torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
    site=$(dirname "$(dirname "$torch_lib")")
    nvidia_libs=$(find "$site/nvidia" -maxdepth 3 -type d -name lib 2>/dev/null | tr '\n' ':')
    export LD_LIBRARY_PATH="$torch_lib:${nvidia_libs}/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
    {
        echo "# $(date -u +%FT%TZ) $(uname -m) torch $(python3 -c 'import torch; print(torch.__version__)')"
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
        echo "# cores: $(nproc)"
    } | tee "$log"
    set +e
    timeout 450 "$bin_dir/gpu_check" "$@" 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
    set -e
    echo "# exit status $status" | tee -a "$log"
    exit "$status"
    ;;
*)
    echo "usage: scripts/gpu-check.sh build | run [ELEMENTS] [--lm]" >&2
    exit 2
    ;;
esac
