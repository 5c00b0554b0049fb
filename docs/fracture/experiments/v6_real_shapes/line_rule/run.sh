#!/usr/bin/env bash
# The line rule of the localiser v6 (../README.md): see ../../model_rule_study.sh.
set -euo pipefail
"$(dirname "$0")/../../model_rule_study.sh" docs/fracture/experiments/v6_real_shapes /work/models/frac_v6 "$@"
