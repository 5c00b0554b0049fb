#!/usr/bin/env bash
# Localiser v11 (README.md): see ../localiser_experiment.sh. Usage: run.sh validation | heldout | page
# (the rule: line_rule/run.sh)
set -euo pipefail
"$(dirname "$0")/../localiser_experiment.sh" docs/fracture/experiments/v11_bridged_soft_masks /work/models/frac_v11 "$@"
