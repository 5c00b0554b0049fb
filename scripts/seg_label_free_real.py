#!/usr/bin/env python
"""Label-free agreement of a segmentation model on real CT series (no labels needed).

Usage:
    .venv/bin/python scripts/seg_label_free_real.py MODEL_DIR --out label_free_real.json \
        [SERIES ...]   # default: ../shared/data/vhf_ankle_ct

For each series: the model's labels, their label-free agreement with the CT's bone
(AnkleFractureLib.segmentation.quality.label_free_agreement) and the labelled volumes (ml).
The shared Visible Human series shows both feet and only the malleolar tips, so what a good
model labels there is a few ml of malleolus, not foot bones.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from AnkleFractureLib.io.atomic import atomic_write_json
from AnkleFractureLib.io.files import read_image
from AnkleFractureLib.segmentation.inference import segment_ct
from AnkleFractureLib.segmentation.quality import label_free_agreement

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("series", nargs="*", default=[str(ROOT.parent / "shared/data/vhf_ankle_ct")])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    results = {}
    for path in args.series:
        ct = read_image(path)
        t0 = time.time()
        label = segment_ct(ct, args.model_dir, device="cpu")
        voxel_ml = float(np.prod(ct.spacing)) / 1000.0
        arr = label.array
        results[Path(path).name] = {
            "agreement": label_free_agreement(ct, label),
            "tibia_ml": round(float((arr == 1).sum()) * voxel_ml, 2),
            "fibula_ml": round(float((arr == 2).sum()) * voxel_ml, 2),
            "labelled_ml": round(float((arr > 0).sum()) * voxel_ml, 2),
            "seconds": round(time.time() - t0, 2),
        }
        print(path, json.dumps(results[Path(path).name]))
    atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
