#!/usr/bin/env bash
# Localiser v10 (README.md): see ../localiser_experiment.sh. Usage: run.sh validation | heldout | page
# (the rule: line_rule/run.sh)
set -euo pipefail
"$(dirname "$0")/../localiser_experiment.sh" docs/fracture/experiments/v10_bone_window_real_shapes /work/models/frac_v10 "$@"
