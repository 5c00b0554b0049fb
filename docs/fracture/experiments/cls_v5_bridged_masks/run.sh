#!/usr/bin/env bash
# Classifier v5 (README.md): see ../localiser_experiment.sh (with the classifier set).
# Usage: run.sh validation | heldout | page (the rule: line_rule/run.sh)
set -euo pipefail
CLS_MODEL=/work/models/cls_v5 "$(dirname "$0")/../localiser_experiment.sh" \
    docs/fracture/experiments/cls_v5_bridged_masks /work/models/frac_cls5 "$@"
