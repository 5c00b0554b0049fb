#!/usr/bin/env bash
# Localiser v10 (README.md): the validation runs (before the line rule is fitted), the held-out
# runs (after) and the page. Usage: run.sh validation | heldout | page
# (the rule: line_rule/run.sh; the shipped localiser's held-out runs: shipped/)
set -euo pipefail
cd "$(dirname "$0")/../../../.."
D=docs/fracture/experiments/v10_bone_window_real_shapes
M=/work/models/frac_v10
AF=.venv/bin/ankle-fracture
case "$1" in
validation)
    for s in val val_conf val_vh; do
        $AF evaluate-fracture /work/data/frac_$s --fracture-model $M --out $D/line_rule/$s.json \
            --workers 2 --quiet
    done ;;
heldout)
    for pair in vh=heldout_vh vh2=heldout_vh2 vh3=heldout_vh3 an=heldout_analytic \
                conf=heldout_confounders; do
        $AF evaluate-fracture /work/data/frac_heldout_${pair%%=*} --fracture-model $M \
            --out $D/${pair#*=}.json --workers 2 --quiet
    done ;;
page)
    cp $M/training.json $D/training.json
    cp $M/plans.json $D/plans.json
    .venv/bin/python scripts/fracture_experiment_page.py $D ;;
*)
    echo "usage: run.sh validation | heldout | page" >&2; exit 2 ;;
esac
