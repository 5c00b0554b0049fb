#!/usr/bin/env bash
# Create ./.venv (if missing) and install AnkleFractureLib with its dependencies (Python 3.10+).
#
# torch 2.13.0 is installed first, so that the torch range in pyproject.toml is already
# satisfied when the library is installed:
#   - from the PyTorch CPU wheel index (https://download.pytorch.org/whl/cpu) when it answers
#     within 5 s: the CPU build, about 200 MB;
#   - otherwise (no internet, a proxy, an offline mirror) with a plain `pip install
#     torch==2.13.0` from the configured package index, and a message saying so. From pypi.org
#     on Linux x86_64 that is the CUDA build (several GB with its nvidia-* wheels); on macOS and
#     Windows it is the CPU build; a local mirror serves whatever it holds.
#   - not at all when torch 2.13.0 is already in .venv (e.g. a CUDA build installed on purpose).
# TORCH_INDEX_URL=<url> picks another wheel index (e.g. https://download.pytorch.org/whl/cu126
# for CUDA 12.6); TORCH_INDEX_URL=default uses the configured index directly.
#
# Usage: scripts/install.sh [extra]        e.g. scripts/install.sh test
#        (the test extra brings the distributed extra (Ray) too, so that its tests run)
#        scripts/install.sh --torch-plan   print which torch install would run, change nothing
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="torch==2.13.0"
CPU_INDEX="https://download.pytorch.org/whl/cpu"
PY="${PYTHON:-python3}"

# Exit status 0 when the URL answers within 5 s (connect and read; 8 s in all, name lookup
# included), else 1.
reachable() {
  "$PY" - "$1" <<'EOF'
import os
import sys
import threading
import urllib.request

answered = []


def probe() -> None:
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=5) as response:
            answered.append(response.status < 400)
    except Exception:
        pass


thread = threading.Thread(target=probe, daemon=True)
thread.start()
thread.join(8)  # a hanging DNS lookup is not bounded by the socket timeout
os._exit(0 if answered and answered[0] else 1)
EOF
}

# Print the pip arguments that install torch (one per line), and a message on stderr.
torch_plan() {
  local index="${TORCH_INDEX_URL:-$CPU_INDEX}"
  if [ "$index" = "default" ]; then
    echo "install.sh: installing $TORCH_SPEC from the configured package index" >&2
    printf '%s\n' "$TORCH_SPEC"
  elif reachable "$index/torch/"; then
    echo "install.sh: installing $TORCH_SPEC from $index" >&2
    printf '%s\n' --index-url "$index" "$TORCH_SPEC"
  else
    echo "install.sh: $index is not reachable; falling back to a plain 'pip install" \
         "$TORCH_SPEC' from the configured package index (from pypi.org on Linux x86_64" \
         "that is the CUDA build, several GB)" >&2
    printf '%s\n' "$TORCH_SPEC"
  fi
}

if [ "${1:-}" = "--torch-plan" ]; then
  torch_plan
  exit 0
fi

extra="${1:-}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  version="$("$PY" -c 'import platform; print(platform.python_version())' 2>/dev/null || true)"
  echo "install.sh: $PY is Python ${version:-(not runnable)}; AnkleFractureLib needs 3.10 or" \
       "newer (torch 2.13 and monai 1.6 do). Set PYTHON, e.g. PYTHON=python3.11." >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PY=.venv/bin/python
"$PY" -m pip install --quiet --upgrade pip
installed="$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)"
if [ "${installed%%+*}" = "${TORCH_SPEC#torch==}" ]; then
  echo "install.sh: torch $installed is already installed; keeping it"
else
  torch_args=()
  while IFS= read -r arg; do torch_args+=("$arg"); done < <(torch_plan)
  "$PY" -m pip install --quiet "${torch_args[@]}"
fi
if [ "$extra" = "test" ]; then
  extra="test,distributed"
fi
if [ -n "$extra" ]; then
  "$PY" -m pip install --quiet -e ".[$extra]"
else
  "$PY" -m pip install --quiet -e .
fi
