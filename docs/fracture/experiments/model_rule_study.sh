#!/usr/bin/env bash
# The line rule of an experiment's localiser, fitted as the shipped localiser's was
# (line_rule_v2): on the three validation evaluations in D/line_rule only (run with MODEL_DIR),
# compared with the shipped rule (D/line_rule/previous_rule/plans.json) replayed on the same
# candidate lines; D's held-out evaluations (D/heldout_*.json, run after the fit with the
# fitted rule), when present, are scored afterwards. Writes D/line_rule/study.json and
# README.md; add --write-plans MODEL_DIR to write the fitted rule into a model folder.
# With CLS_MODEL set, the validation evaluations were run with that classifier.
# Usage: [CLS_MODEL=DIR] model_rule_study.sh D MODEL_DIR [extra study arguments]
set -euo pipefail
D=$1
MODEL=$2
shift 2
cd "$(dirname "$0")/../../.."
SCORE=()
for pair in "held-out vh=$D/heldout_vh.json" "held-out analytic=$D/heldout_analytic.json" \
            "held-out mimics=$D/heldout_confounders.json"; do
    [ -f "${pair#*=}" ] && SCORE+=("$pair")
done
.venv/bin/python scripts/fracture_rule_study.py \
    --fit $D/line_rule/val.json $D/line_rule/val_conf.json $D/line_rule/val_vh.json \
    --shipped $D/line_rule/previous_rule ${SCORE:+--score "${SCORE[@]}"} --out $D/line_rule \
    --data-command "ankle-fracture evaluate-fracture /work/data/frac_val --fracture-model $MODEL${CLS_MODEL:+ --cls-model $CLS_MODEL} --out $D/line_rule/val.json (likewise frac_val_conf -> val_conf.json, frac_val_vh -> val_vh.json; data as in docs/fracture/experiments/line_rule_v2), before the fit" \
    "$@"
