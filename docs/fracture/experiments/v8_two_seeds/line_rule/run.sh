#!/usr/bin/env bash
# The line rule of the two-seed v6 ensemble (../README.md): see ../../model_rule_study.sh.
set -euo pipefail
"$(dirname "$0")/../../model_rule_study.sh" docs/fracture/experiments/v8_two_seeds /work/models/frac_v8 "$@"
