#!/usr/bin/env bash
# Localiser v8 (README.md): the ensemble folder, the validation runs, the held-out runs and the
# page. Usage: run.sh model | validation | heldout | page   (the rule: line_rule/run.sh)
set -euo pipefail
cd "$(dirname "$0")/../../../.."
D=docs/fracture/experiments/v8_two_seeds
M=/work/models/frac_v8
AF=.venv/bin/ankle-fracture
case "$1" in
model)  # v6's weights, seed 2's as a member, the shipped rule until line_rule/run.sh refits it
    rm -rf $M && mkdir -p $M
    cp /work/models/frac_v6/model.pt $M/model.pt
    cp /work/models/frac_v6s2/model.pt $M/member_seed2.pt
    cp /work/models/frac_v6s2/training.json /work/models/frac_v6s2/training_log.csv $M/
    .venv/bin/python - "$M" <<'PY'
import json, sys
from pathlib import Path
m = Path(sys.argv[1])
plans = json.loads(Path("/work/models/frac_v6s2/plans.json").read_text())
plans["decision"] = json.loads(Path("Resources/Models/fracture/plans.json").read_text())["decision"]
plans["members"] = [{"file": "member_seed2.pt", "network": plans["network"]}]
(m / "plans.json").write_text(json.dumps(plans, indent=2) + "\n")
PY
    ;;
validation)
    for s in val val_conf val_vh; do
        $AF evaluate-fracture /work/data/frac_$s --fracture-model $M --out $D/line_rule/$s.json --quiet
    done ;;
heldout)
    for pair in vh=heldout_vh an=heldout_analytic conf=heldout_confounders vh2=heldout_vh2; do
        $AF evaluate-fracture /work/data/frac_heldout_${pair%%=*} --fracture-model $M \
            --out $D/${pair#*=}.json --quiet
    done ;;
page)
    cp /work/models/frac_v6s2/training.json $D/training.json
    cp $M/plans.json $D/plans.json
    .venv/bin/python scripts/fracture_experiment_page.py $D ;;
*)
    echo "usage: run.sh model | validation | heldout | page" >&2; exit 2 ;;
esac
