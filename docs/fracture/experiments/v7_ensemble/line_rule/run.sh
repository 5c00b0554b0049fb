#!/usr/bin/env bash
# The line rule of the ensemble of the shipped localiser and v6 (../README.md): see ../../model_rule_study.sh.
set -euo pipefail
"$(dirname "$0")/../../model_rule_study.sh" docs/fracture/experiments/v7_ensemble /work/models/frac_ens "$@"
