#!/usr/bin/env bash
# The line rule of localiser v10 (../README.md): see ../../model_rule_study.sh.
set -euo pipefail
"$(dirname "$0")/../../model_rule_study.sh" docs/fracture/experiments/v10_bone_window_real_shapes /work/models/frac_v10 "$@"
