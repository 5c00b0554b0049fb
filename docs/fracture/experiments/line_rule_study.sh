#!/usr/bin/env bash
# The line-rule study of one experiment folder D (called by D/run.sh): fits the localiser's line
# model and the weights of the two experts (classifier, lines) on D's three validation
# evaluations only, scores D's held-out evaluations, and writes D/study.json and D/README.md
# (with --write-plans MODEL_DIR, the fitted rule into MODEL_DIR/plans.json too).
# Usage: line_rule_study.sh D "how the evaluations were run" [extra study arguments]
set -euo pipefail
D=$1
HOW=$2
shift 2
cd "$(dirname "$0")/../../.."
.venv/bin/python scripts/fracture_rule_study.py --fit $D/val.json $D/val_conf.json $D/val_vh.json \
    --shipped $D/previous_rule \
    --score "held-out vh=$D/heldout_vh.json" "held-out analytic=$D/heldout_an.json" \
    "held-out mimics=$D/heldout_conf.json" --out $D \
    --data-command "ankle-fracture phantom --out /work/data/frac_val --n 48 --seed 601 --family mixed --fractures varied --spacing fast" \
    --data-command "ankle-fracture phantom --out /work/data/frac_val_conf --n 24 --seed 701 --family mixed --fractures varied --confounders 0.8 --spacing fast" \
    --data-command "ankle-fracture phantom --out /work/data/frac_val_vh --n 32 --seed 801 --family vh --fractures varied --spacing fast" \
    --data-command "ankle-fracture evaluate-fracture /work/data/frac_val --out $D/val.json (likewise frac_val_conf -> val_conf.json, frac_val_vh -> val_vh.json, and the held-out sets of docs/fracture/commands.json -> heldout_vh.json, heldout_an.json, heldout_conf.json): $HOW" \
    "$@"
