#!/usr/bin/env bash
# Install everything (with the test extras) into ./.venv and run the default test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh test
exec .venv/bin/python -m pytest -n 2 -q "$@"
