#!/usr/bin/env bash
# The line rule of the ensemble of the shipped localiser and v6 (../README.md), fitted as the shipped localiser's was
# (../../line_rule_v2): on the three validation evaluations here only (run with the ensemble and the shipped
# line rule), compared with the shipped rule (previous_rule/plans.json)
# replayed on the same candidate lines; the held-out sets (../heldout_*.json, run after the
# fit with the fitted rule) are scored afterwards. Add --write-plans MODEL_DIR to write the
# fitted rule into a model folder.
set -euo pipefail
cd "$(dirname "$0")/../../../../.."
D=docs/fracture/experiments/v7_ensemble
SCORE=()
for pair in "held-out vh=$D/heldout_vh.json" "held-out analytic=$D/heldout_analytic.json" \
            "held-out mimics=$D/heldout_confounders.json"; do
    [ -f "${pair#*=}" ] && SCORE+=("$pair")
done
.venv/bin/python scripts/fracture_rule_study.py \
    --fit $D/line_rule/val.json $D/line_rule/val_conf.json $D/line_rule/val_vh.json \
    --shipped $D/line_rule/previous_rule ${SCORE:+--score "${SCORE[@]}"} --out $D/line_rule \
    --data-command "ankle-fracture evaluate-fracture /work/data/frac_val --fracture-model /work/models/frac_ens --out $D/line_rule/val.json (likewise frac_val_conf -> val_conf.json, frac_val_vh -> val_vh.json; data as in ../../line_rule_v2), before the fit" \
    "$@"
