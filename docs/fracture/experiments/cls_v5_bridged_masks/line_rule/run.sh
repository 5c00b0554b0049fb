#!/usr/bin/env bash
# The line rule of the shipped localiser with classifier v5 (../README.md): see
# ../../model_rule_study.sh.
set -euo pipefail
CLS_MODEL=/work/models/cls_v5 "$(dirname "$0")/../../model_rule_study.sh" \
    docs/fracture/experiments/cls_v5_bridged_masks /work/models/frac_cls5 "$@"
