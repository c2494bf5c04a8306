# shellcheck shell=bash
# Build environment for the crates that link libtorch (tutela-site-node).
#
# Source it from the repository root or from any script:  . scripts/torch-env.sh
# It points torch-sys at the libtorch inside the repository's .venv (made by
# scripts/setup-torch.sh). LIBTORCH_USE_PYTORCH=1 makes torch-sys ask that venv's python where
# libtorch lives and check that its version is the one tch 0.24 expects (2.11.0); setting
# LIBTORCH=<dir> instead would skip that check.

_tutela_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
export VIRTUAL_ENV="$_tutela_root/.venv"
case ":$PATH:" in
  *":$VIRTUAL_ENV/bin:"*) ;;
  *) export PATH="$VIRTUAL_ENV/bin:$PATH" ;;
esac
export LIBTORCH_USE_PYTORCH=1
unset _tutela_root
