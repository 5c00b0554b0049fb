#!/usr/bin/env bash
# Classifier v4 (README.md): validation runs with the new classifier and the shipped localiser,
# the line rule refitted on them (written into a copy of the shipped localiser's folder), then
# the held-out runs with the fitted rule. Usage: run.sh validation | fit | heldout | page
set -euo pipefail
cd "$(dirname "$0")/../../../.."
D=docs/fracture/experiments/cls_v4_real_shapes
CLS=/work/models/cls_v4
LOC=/work/models/frac_cls4   # cp -r Resources/Models/fracture, its rule refitted by 'fit'
AF=.venv/bin/ankle-fracture
SCORE=()
for pair in "held-out vh=$D/heldout_vh.json" "held-out analytic=$D/heldout_analytic.json" \
            "held-out mimics=$D/heldout_confounders.json"; do
    [ -f "${pair#*=}" ] && SCORE+=("$pair")
done
case "$1" in
validation)
    for s in val val_conf val_vh; do
        $AF evaluate-fracture /work/data/frac_$s --cls-model $CLS --fracture-model $LOC \
            --out $D/line_rule/$s.json --quiet
    done ;;
fit)
    shift
    .venv/bin/python scripts/fracture_rule_study.py \
        --fit $D/line_rule/val.json $D/line_rule/val_conf.json $D/line_rule/val_vh.json \
        --shipped $D/line_rule/previous_rule ${SCORE:+--score "${SCORE[@]}"} --out $D/line_rule \
        --data-command "ankle-fracture evaluate-fracture /work/data/frac_val --cls-model $CLS --fracture-model $LOC --out $D/line_rule/val.json (likewise frac_val_conf -> val_conf.json, frac_val_vh -> val_vh.json; data as in docs/fracture/experiments/line_rule_v2), with the shipped rule (previous_rule/plans.json), before the fit" \
        "$@" ;;
heldout)
    for pair in vh=heldout_vh an=heldout_analytic conf=heldout_confounders; do
        $AF evaluate-fracture /work/data/frac_heldout_${pair%%=*} --cls-model $CLS \
            --fracture-model $LOC --out $D/${pair#*=}.json --quiet
    done ;;
page)
    cp $CLS/training.json $D/training.json
    cp $LOC/plans.json $D/plans.json
    .venv/bin/python -c "import json, sys; print(json.dumps([c['id'] for c in json.load(open(sys.argv[1]))['cases']]))" \
        /work/data/cls_mixed_v4/dataset.json > $D/cases.json
    .venv/bin/python scripts/fracture_experiment_page.py $D ;;
*)
    echo "usage: run.sh validation | fit [--write-plans $LOC] | heldout | page" >&2; exit 2 ;;
esac
