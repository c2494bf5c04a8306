#!/usr/bin/env bash
# Installs libtorch 2.11.0 (the PyPI wheel torch==2.11.0, the version tch 0.24 links against)
# into .venv at the repository root, plus safetensors and numpy for the Python-side tests.
#
# Idempotent: the second run checks the installed versions and returns in about a second,
# printing nothing. Afterwards build with the environment from scripts/torch-env.sh:
#
#   scripts/setup-torch.sh && . scripts/torch-env.sh && cargo test -p tutela-site-node
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
torch_version="2.11.0"

if [ ! -x "$venv/bin/python" ]; then
  echo "setup-torch: creating $venv" >&2
  python3 -m venv "$venv"
fi
py="$venv/bin/python"

if ! "$py" -c "import torch; assert torch.__version__.startswith('$torch_version')" >/dev/null 2>&1; then
  echo "setup-torch: installing torch==$torch_version into $venv (about 4.6 GB with its CUDA wheels)" >&2
  # --no-cache-dir: pip would otherwise keep a second copy of the ~4 GB of wheels in its cache.
  "$py" -m pip install --quiet --disable-pip-version-check --no-cache-dir "torch==$torch_version"
fi

if ! "$py" -c "import safetensors, numpy" >/dev/null 2>&1; then
  echo "setup-torch: installing safetensors and numpy into $venv" >&2
  "$py" -m pip install --quiet --disable-pip-version-check --no-cache-dir safetensors numpy
fi
