#!/usr/bin/env bash
# Create ./.venv (if missing) and install AnkleFractureLib with its dependencies.
# torch 2.13.0 (CPU build) is installed first so the torch range in pyproject.toml is already
# satisfied and pip never pulls a multi-GB CUDA build. Usage: scripts/install.sh [extra]
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
if [ -n "$extra" ]; then
  .venv/bin/python -m pip install --quiet -e ".[$extra]"
else
  .venv/bin/python -m pip install --quiet -e .
fi
