#!/usr/bin/env bash
# The localiser reading a crop 24 mm taller at its top (plans.json "inference":
# {"extend_top_mm": 24.0}, FractureLocaliser.crop_for), so that Weber C lines of small patients
# above the classifier's box can be found. NOT SHIPPED. On the three validation sets, with the
# shipped line rule (previous_rule/plans.json, line_rule_v2's), against line_rule_v2's figures
# on the classifier's box: accuracy the same, found and AUROC C higher, "found" on intact ankles
# higher (a false line in the new part, 107 mm up). The network's instance normalisation makes
# every output depend on the whole input, so the taller crop also changed lines far below its
# new part (Weber A lines lost, others found). Next: a second pass only for the part above the
# box, or a localiser trained on taller crops. The held-out sets were not evaluated with it.
# Evaluations: as line_rule_v2 (data commands on its page), with plans "inference" added.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
D=docs/fracture/experiments/line_rule_v3
.venv/bin/python scripts/fracture_rule_study.py --fit $D/val.json $D/val_conf.json $D/val_vh.json \
    --shipped $D/previous_rule --out $D \
    --data-command "ankle-fracture evaluate-fracture /work/data/frac_val --out $D/val.json (likewise frac_val_conf -> val_conf.json, frac_val_vh -> val_vh.json) with Resources/Models/fracture/plans.json holding \"inference\": {\"extend_top_mm\": 24.0}; data as in ../line_rule_v2"
