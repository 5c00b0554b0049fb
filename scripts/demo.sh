#!/usr/bin/env bash
# Install everything into ./.venv and run the main job on the embedded default (the phantom demo).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/ankle-fracture demo --out demo_output "$@"
