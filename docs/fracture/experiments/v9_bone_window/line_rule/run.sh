#!/usr/bin/env bash
# The line rule of localiser v9 (../README.md): see ../../model_rule_study.sh.
set -euo pipefail
"$(dirname "$0")/../../model_rule_study.sh" docs/fracture/experiments/v9_bone_window /work/models/frac_v9 "$@"
