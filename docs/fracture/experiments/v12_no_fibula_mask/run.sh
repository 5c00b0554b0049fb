#!/usr/bin/env bash
# Localiser v12 (README.md): see ../localiser_experiment.sh. Usage: run.sh validation | heldout | page
# (the rule: line_rule/run.sh)
set -euo pipefail
"$(dirname "$0")/../localiser_experiment.sh" docs/fracture/experiments/v12_no_fibula_mask /work/models/frac_v12 "$@"
