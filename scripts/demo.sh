#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the three-site demo: a throwaway consortium, a
# coordinator and three hospital site nodes as separate processes on loopback mutual TLS, on
# embedded defaults (SQLite, local PKI, CPU when there is no GPU). Extra arguments go to
# `tutela demo` (e.g. `--dataset mnist`, or `--dataset notes`: a language model on clinical notes).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec target/debug/tutela demo "$@"
