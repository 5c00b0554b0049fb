#!/usr/bin/env bash
# Both localisers on the fresh sets (README.md). Usage: run.sh SET... (vh3, conf2) | run.sh page
set -euo pipefail
cd "$(dirname "$0")/../../../.."
D=docs/fracture/experiments/v8_fresh_sets
if [ "$1" = page ]; then
    cp docs/fracture/experiments/v8_two_seeds/training.json docs/fracture/experiments/v8_two_seeds/plans.json $D/
    exec .venv/bin/python scripts/fracture_experiment_page.py $D
fi
mkdir -p $D/shipped
for s in "$@"; do  # the shipped localiser (baseline folder shipped/), then v8
    .venv/bin/ankle-fracture evaluate-fracture /work/data/frac_heldout_$s \
        --out $D/shipped/heldout_$s.json --quiet
    .venv/bin/ankle-fracture evaluate-fracture /work/data/frac_heldout_$s \
        --fracture-model /work/models/frac_v8 --out $D/heldout_$s.json --quiet
done
