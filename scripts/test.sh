#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the whole test suite: unit tests, integration
# tests over real loopback mutual TLS, and end-to-end tests with real processes and a Python client.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export TUTELA_PYTHON="$PWD/.venv/bin/python"
cargo test --workspace
