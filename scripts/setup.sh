#!/usr/bin/env bash
# Sets up everything Tutela needs on a fresh Debian machine with Rust and Python 3, then builds the
# workspace. Idempotent, and quick the second time: each step checks before it installs.
#
#   - .venv/: a Python virtualenv with the test suite's packages (tests/python/requirements.txt)
#     and the torch==2.11.0 wheel whose libtorch the site node links (scripts/setup-torch.sh);
#   - .venv-deploy/: the Helm chart check's packages (scripts/setup-deploy-check.sh);
#   - cargo-fuzz, for the short fuzzing run of scripts/test.sh (scripts/fuzz.sh);
#   - the workspace's binaries (cargo build), in target/debug.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 not found: apt-get install python3 python3-venv" >&2; exit 1; }

# The virtualenv. Debian's python3 needs python3-venv for `-m venv`.
if [ ! -x .venv/bin/python ]; then
    say "creating the Python virtualenv .venv"
    if ! python3 -m venv .venv 2>/dev/null; then
        if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
            rm -rf .venv && python3 -m venv .venv
        else
            echo "python3 -m venv failed: install python3-venv" >&2; exit 1
        fi
    fi
fi

# Python packages, re-installed only when the requirements file changes.
req_stamp=".venv/.tutela-requirements.sha256"
req_hash=$(sha256sum tests/python/requirements.txt | cut -d' ' -f1)
if [ "$(cat "$req_stamp" 2>/dev/null)" != "$req_hash" ]; then
    say "installing Python test packages"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir -r tests/python/requirements.txt
    echo "$req_hash" > "$req_stamp"
fi

# libtorch for the site node: the torch==2.11.0 wheel in the same virtualenv, and the build
# environment that points torch-sys at it.
scripts/setup-torch.sh
# shellcheck source=scripts/torch-env.sh
source scripts/torch-env.sh

# The deploy check's own virtualenv (.venv-deploy): Helm's engine and the Kubernetes schemas, for
# scripts/check_deploy.py.
scripts/setup-deploy-check.sh

# peft (the reference for our LoRA adapter files) with --no-deps: its declared dependencies would
# pull another torch over the pinned one. Installed only when the pinned version is absent.
peft_version="0.21.2"
if ! .venv/bin/python -c "import importlib.metadata as m; assert m.version('peft') == '$peft_version'" >/dev/null 2>&1; then
    say "installing peft==$peft_version (--no-deps)"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps "peft==$peft_version"
fi

# Incremental compilation caches are for an edit-rebuild loop; for these scripts' one-shot builds
# they only cost disk (1.5 GB on a clean build). A developer's own `cargo build` is unaffected.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# cargo-fuzz (scripts/fuzz.sh). About a minute to build the first time; skipped once installed.
CARGO_FUZZ_VERSION=0.13.2
if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
    say "installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" --quiet
fi

say "building the workspace"
cargo build --workspace --bins --quiet
