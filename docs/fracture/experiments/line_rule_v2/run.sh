#!/usr/bin/env bash
# Regenerates study.json and README.md here from the evaluations beside this file (see
# ../line_rule_study.sh; add --write-plans Resources/Models/fracture to write the rule).
set -euo pipefail
cd "$(dirname "$0")"
../line_rule_study.sh docs/fracture/experiments/line_rule_v2 "the validation sets run with the previous rule (previous_rule/plans.json), the held-out sets with the fitted one, all with segmentation post-processing rule 0; the study replays both rules on the candidate lines each file lists" "$@"
