#!/usr/bin/env bash
# The line rule of localiser v12 (../README.md): see ../../model_rule_study.sh.
set -euo pipefail
"$(dirname "$0")/../../model_rule_study.sh" docs/fracture/experiments/v12_no_fibula_mask /work/models/frac_v12 "$@"
