#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), makes sure a PostgreSQL server is running for the store
# tests (scripts/test-postgres.sh) and headless Chromium for the console's (scripts/setup-chromium.sh),
# and runs the whole test suite: unit tests, integration tests
# over real loopback mutual TLS, end-to-end tests with real processes, real libtorch training and
# a Python client; the deploy check (scripts/check_deploy.py). Then a short fuzzing run
# (scripts/fuzz.sh: every cargo-fuzz target for a fixed $FUZZ_RUNS, 200,000, inputs each;
# TUTELA_SKIP_FUZZ=1 skips it). `cargo test` has already replayed the
# fuzz corpus through the same harnesses.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# shellcheck source=scripts/test-postgres.sh
source scripts/test-postgres.sh
# Headless Chromium for the audit console's browser tests, which then fail rather than skip if it
# is missing.
scripts/setup-chromium.sh
export TUTELA_REQUIRE_CHROMIUM=1
# promtool for the metrics tests (`promtool check metrics|rules`, `promtool test rules`), which
# then fail rather than skip if it is missing.
scripts/setup-promtool.sh
export TUTELA_REQUIRE_PROMTOOL=1
export TUTELA_PYTHON="$PWD/.venv/bin/python"
cargo test --workspace
# deploy/: the Helm chart rendered by Helm's engine for each values file and validated against the
# Kubernetes schemas, the Pod Security and NetworkPolicy rules, the Containerfiles' rules.
.venv-deploy/bin/python scripts/check_deploy.py
if [ -z "${TUTELA_SKIP_FUZZ:-}" ]; then
    scripts/fuzz.sh
fi
