#!/usr/bin/env bash
# Makes .venv-deploy, the virtualenv of scripts/check_deploy.py (the Helm chart rendered by Helm's
# own engine and validated against the Kubernetes schemas; the Containerfiles' rules), from
# scripts/deploy-check-requirements.txt. Idempotent: re-installs only when that file changes.
# A virtualenv of its own, so that the test suite's .venv (torch, transformers) is never touched.
#
#   scripts/setup-deploy-check.sh && .venv-deploy/bin/python scripts/check_deploy.py
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TUTELA_DEPLOY_VENV:-$root/.venv-deploy}"
req="$root/scripts/deploy-check-requirements.txt"

if [ ! -x "$venv/bin/python" ]; then
  echo "setup-deploy-check: creating $venv" >&2
  python3 -m venv "$venv"
fi
stamp="$venv/.tutela-deploy-requirements.sha256"
hash=$(sha256sum "$req" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$hash" ]; then
  echo "setup-deploy-check: installing the chart check's packages into $venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir -r "$req"
  echo "$hash" > "$stamp"
fi
