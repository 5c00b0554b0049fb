#!/usr/bin/env bash
# A localiser experiment's runs, after training: the three validation evaluations (before its
# line rule is fitted: model_rule_study.sh), the five held-out evaluations (after), the page.
# The page compares them with the shipped localiser's runs (experiment.json "baseline").
# With CLS_MODEL set, every run uses that classifier (a classifier experiment: MODEL_DIR is then
# a copy of the shipped localiser whose line rule is refitted for the new pair), and the page
# records the classifier's training.
# Usage: [CLS_MODEL=DIR] localiser_experiment.sh D MODEL_DIR validation | heldout | page
set -euo pipefail
D=$1
M=$2
cd "$(dirname "$0")/../../.."
AF=.venv/bin/ankle-fracture
CLS=()
[ -n "${CLS_MODEL:-}" ] && CLS=(--cls-model "$CLS_MODEL")
case "${3:-}" in
validation)
    for s in val val_conf val_vh; do
        $AF evaluate-fracture /work/data/frac_$s --fracture-model $M ${CLS[@]+"${CLS[@]}"} \
            --out $D/line_rule/$s.json --workers 2 --quiet
    done ;;
heldout)
    for pair in vh=heldout_vh vh2=heldout_vh2 vh3=heldout_vh3 an=heldout_analytic \
                conf=heldout_confounders; do
        $AF evaluate-fracture /work/data/frac_heldout_${pair%%=*} --fracture-model $M \
            ${CLS[@]+"${CLS[@]}"} --out $D/${pair#*=}.json --workers 2 --quiet
    done ;;
page)
    cp ${CLS_MODEL:-$M}/training.json $D/training.json
    if [ -n "${CLS_MODEL:-}" ]; then  # the classifier's training cases, for the counts by family
        .venv/bin/python -c "import json, sys; ds = json.load(open(sys.argv[1]))['dataset']; print(json.dumps([c['id'] for c in json.load(open(ds + '/dataset.json'))['cases']]))" \
            $CLS_MODEL/training.json > $D/cases.json
    fi
    cp $M/plans.json $D/plans.json
    .venv/bin/python scripts/fracture_experiment_page.py $D ;;
*)
    echo "usage: localiser_experiment.sh D MODEL_DIR validation | heldout | page" >&2; exit 2 ;;
esac
