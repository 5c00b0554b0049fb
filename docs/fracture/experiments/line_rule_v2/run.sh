#!/usr/bin/env bash
# Regenerates study.json and README.md here (and the shipped localiser's rule with --write-plans)
# from the evaluations beside this file. The line model and the weights of the two experts
# (classifier, lines) are fitted on the three validation sets only; the held-out sets are scored.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
D=docs/fracture/experiments/line_rule_v2
.venv/bin/python scripts/fracture_rule_study.py --fit $D/val.json $D/val_conf.json $D/val_vh.json \
    --shipped $D/previous_rule \
    --score "held-out vh=$D/heldout_vh.json" "held-out analytic=$D/heldout_an.json" \
    "held-out mimics=$D/heldout_conf.json" --out $D \
    --data-command "ankle-fracture phantom --out /work/data/frac_val --n 48 --seed 601 --family mixed --fractures varied --spacing fast" \
    --data-command "ankle-fracture phantom --out /work/data/frac_val_conf --n 24 --seed 701 --family mixed --fractures varied --confounders 0.8 --spacing fast" \
    --data-command "ankle-fracture phantom --out /work/data/frac_val_vh --n 32 --seed 801 --family vh --fractures varied --spacing fast" \
    --data-command "ankle-fracture evaluate-fracture /work/data/frac_val --out $D/val.json (likewise frac_val_conf -> val_conf.json, frac_val_vh -> val_vh.json, and the held-out sets of docs/fracture/commands.json -> heldout_vh.json, heldout_an.json, heldout_conf.json), the validation sets run with the previous rule (previous_rule/plans.json), the held-out sets with the fitted one, all with segmentation post-processing rule 0; the study replays both rules on the candidate lines each file lists" \
    "$@"
