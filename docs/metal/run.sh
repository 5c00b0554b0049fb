#!/usr/bin/env bash
# The fixation-hardware experiment, stage by stage (see experiment.json and README.md).
#   bash docs/metal/run.sh validation        # v5 (best-val and last weights) on metal_val
#   bash docs/metal/run.sh heldout MODEL     # the chosen model and the shipped one on the held-out sets
#   bash docs/metal/run.sh page              # README.md from the files here
set -euo pipefail
cd "$(dirname "$0")/../.."
AF=.venv/bin/ankle-fracture
PY=.venv/bin/python
D=docs/metal
case "${1:-}" in
  validation)
    $PY scripts/seg_checkpoint_to_model.py /work/models/seg_v5 --out /work/models/seg_v5_last
    $PY scripts/metal_seg_study.py /work/data/metal_val --model /work/models/seg_v5 --label "v5 (best validation epoch)" --out $D/seg_val_v5.json
    $PY scripts/metal_seg_study.py /work/data/metal_val --model /work/models/seg_v5_last --label "v5 (last weights)" --out $D/seg_val_v5_last.json
    ;;
  heldout)
    M=${2:?the chosen model folder}
    $PY scripts/metal_seg_study.py /work/data/metal_heldout --model Resources/Models/segmentation --label "shipped (v3)" --out $D/seg_heldout_shipped.json
    $PY scripts/metal_seg_study.py /work/data/metal_heldout --model "$M" --label "v5 ($(basename "$M"))" --out $D/seg_heldout_v5.json
    for s in seg2_heldout_vh:vh seg_heldout:analytic seg_ff_heldout:forefoot; do
      $AF evaluate-seg /work/data/${s%%:*} --out $D/segsets_${s##*:}_shipped.json --device cpu --quiet
      $AF evaluate-seg /work/data/${s%%:*} --model "$M" --out $D/segsets_${s##*:}_v5.json --device cpu --quiet
    done
    $AF evaluate-fracture /work/data/metal_heldout --out $D/pipeline_heldout_shipped.json --quiet
    $AF evaluate-fracture /work/data/metal_heldout --seg-model "$M" --out $D/pipeline_heldout_v5.json --quiet
    for s in vh2 vh3 conf2; do
      $AF evaluate-fracture /work/data/frac_heldout_$s --seg-model "$M" --out $D/pipeline_${s}_v5.json --quiet
    done
    ;;
  page)
    $PY scripts/metal_seg_study.py --page $D
    ;;
  *) echo "usage: $0 validation | heldout MODEL | page" >&2; exit 2 ;;
esac
