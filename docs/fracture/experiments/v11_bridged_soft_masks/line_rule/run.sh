#!/usr/bin/env bash
# The line rule of localiser v11 (../README.md): see ../../model_rule_study.sh.
set -euo pipefail
"$(dirname "$0")/../../model_rule_study.sh" docs/fracture/experiments/v11_bridged_soft_masks /work/models/frac_v11 "$@"
