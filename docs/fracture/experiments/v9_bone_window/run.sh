#!/usr/bin/env bash
# Localiser v9 (README.md): see ../localiser_experiment.sh. Usage: run.sh validation | heldout | page
# (the rule: line_rule/run.sh)
set -euo pipefail
"$(dirname "$0")/../localiser_experiment.sh" docs/fracture/experiments/v9_bone_window /work/models/frac_v9 "$@"
