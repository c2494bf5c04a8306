#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ (see "Fuzzing" in docs/architecture.md).
#
#   scripts/fuzz.sh                        # every target for $FUZZ_RUNS (200000) inputs each: the
#                                          # short run scripts/test.sh does
#   scripts/fuzz.sh stream_frames 3600     # one target for an hour: a campaign
#
# Each target starts from its corpus in the repository (fuzz/corpus/<target>/, only read). A
# campaign keeps what it finds new in fuzz/target/corpus/<target>/ (ignored by git, kept between
# runs); the short run starts afresh each time, with a fixed seed and input count, so it is the same
# run on every machine. A panic (a
# harness's property broken included), an input that takes over $FUZZ_TIMEOUT seconds (10) or an
# allocation over $FUZZ_RSS_MB (2048) fails the run: the input is saved as
# fuzz/artifacts/<target>/crash-* (or timeout-*, oom-*), the script prints how to reproduce it and
# exits non-zero. To keep a finding: minimize it (`cargo fuzz tmin -s none <target> <file>`, from
# fuzz/), fix the code with a regression test, and add the minimized input to
# fuzz/corpus/<target>/ as crash-<what-it-was>, so that `cargo test` replays it from then on.
#
# The machine's toolchain is stable: `-s none` builds without a sanitizer, which needs no nightly
# (ASan's -Zsanitizer would need RUSTC_BOOTSTRAP=1; the code under test has no `unsafe`). The
# libFuzzer seed is fixed ($FUZZ_SEED, 1) so that a short run explores the same way each time.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS=(stream_frames stream_wire safetensors_file job_spec tabular_reader)
seconds="${FUZZ_SECONDS:-20}"
runs="${FUZZ_RUNS:-200000}"
campaign=0
# The short run builds with fuzz/'s dev profile (opt-level 1: a fraction of release's build time,
# which dominates a 20 s run); a campaign with release (opt-level 3, several times the executions
# a second). FUZZ_PROFILE=release|dev overrides.
profile="${FUZZ_PROFILE:-dev}"
if [ $# -ge 1 ]; then
    TARGETS=("$1")
    seconds="${2:-$seconds}"
    campaign=1
    profile="${FUZZ_PROFILE:-release}"
fi
case "$profile" in
    dev) build=(--dev) ;;
    release) build=(--release) ;;
    *) echo "FUZZ_PROFILE must be dev or release, not $profile" >&2; exit 1 ;;
esac

command -v cargo-fuzz >/dev/null || {
    echo "cargo-fuzz not found: run scripts/setup.sh (or cargo install cargo-fuzz --locked)" >&2
    exit 1
}

# The harnesses write their scratch files (stored models, gzipped inputs) through tempfile: on a
# tmpfs, fsync costs nothing, which makes the stream targets about 20 times faster.
if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then
    export TMPDIR=/dev/shm
fi

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

cd fuzz
# fuzz/ is its own workspace with its own target directory (instrumented release builds), whatever
# the caller's CARGO_TARGET_DIR.
export CARGO_TARGET_DIR="$PWD/target"
say "building the fuzz targets (cargo fuzz build -s none ${build[*]})"
cargo fuzz build -s none "${build[@]}"

failed=()
for target in "${TARGETS[@]}"; do
    artifacts="artifacts/$target"
    if [ "$campaign" = 1 ]; then
        # A campaign: for a time, growing the corpus it keeps between runs.
        work="target/corpus/$target"
        limit=(-max_total_time="$seconds")
        say "fuzzing $target for ${seconds}s"
    else
        # The short run: a fixed number of inputs from the repository's corpus alone, with a
        # fixed seed, so that it explores the same inputs on every machine whatever its speed:
        # what passes here passes in CI (a time limit would run further on a faster machine).
        work="target/corpus-short/$target"
        rm -rf "$work"
        limit=(-runs="$runs")
        say "fuzzing $target for $runs inputs"
    fi
    mkdir -p "$work" "$artifacts"
    log="target/fuzz-$target.log"
    if ! cargo fuzz run -s none "${build[@]}" "$target" "$work" "corpus/$target" -- \
        "${limit[@]}" \
        -seed="${FUZZ_SEED:-1}" \
        -timeout="${FUZZ_TIMEOUT:-10}" \
        -rss_limit_mb="${FUZZ_RSS_MB:-2048}" \
        -max_len=65536 \
        -artifact_prefix="$artifacts/" \
        -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log" >&2
        failed+=("$target")
        echo "$target: a finding was saved in fuzz/$artifacts/; reproduce it with" >&2
        echo "  (cd fuzz && cargo fuzz run -s none ${build[*]} $target $artifacts/<file>)" >&2
        continue
    fi
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)' "$log" |
        sed "s/^/  $target: /" >&2 || true
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing found problems in: ${failed[*]}" >&2
    exit 1
fi
