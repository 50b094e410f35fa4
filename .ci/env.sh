#!/usr/bin/env bash
# Creates .venv (Python 3.12) if there is none and installs jaxlm into it, with extras given as arguments
# (e.g. `bash .ci/env.sh test`). Idempotent: a second call only checks that the install is current.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  py=""
  for c in python3.12 "$HOME/.pyenv/versions/3.12"*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then py="$c"; break; fi
  done
  if [ -z "$py" ] && command -v pyenv >/dev/null 2>&1; then
    v=$(pyenv versions --bare | grep -E '^3\.12' | tail -n 1 || true)
    [ -n "$v" ] && py="$(pyenv root)/versions/$v/bin/python"
  fi
  [ -n "$py" ] || { echo "jaxlm setup: no Python 3.12 found (install it, e.g. 'pyenv install 3.12')" >&2; exit 1; }
  "$py" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
extras=""
[ $# -gt 0 ] && extras="[$(IFS=,; echo "$*")]"
stamp=".venv/.jaxlm-install-$(cat pyproject.toml .ci/constraints.txt | sha1sum | cut -c1-12)-${extras}"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q -c .ci/constraints.txt -e ".${extras}"
  # The kernel tests lower Mosaic GPU kernels for an H100: that needs the CUDA plugin's compiler module only, so it
  # comes without its dependencies (no CUDA runtime, no GPU backend on a CPU-only machine).
  case ",$*," in *,test,*) .venv/bin/python -m pip install -q --no-deps -c .ci/constraints.txt jax-cuda13-plugin ;; esac
  touch "$stamp"
fi
