"""Benchmark: the segmentation post-processing (``clean_labels``) on a clinical-size CT.

Usage: .venv/bin/python bench/postprocess.py [--runs 5] [--seed 11]

Generates one clinical-size phantom (512 x 512 x >= 350, about 0.35-0.45 mm in-plane; not
timed), runs the shipped network once without post-processing (not timed), then measures on
the network's bone region, as the inference path calls it (CT and superior direction given):

* ``clean_labels`` (all rules), median of ``--runs`` runs and its peak numpy/Python allocation;
* rule 9's test alone (:func:`AnkleFractureLib.segmentation.distal_tibia.judge` on the main
  tibia), median of ``--runs`` runs: what that rule adds to a scan with a distal tibia.

The post-processing is part of the pipeline's segmentation share (goal of the whole pipeline:
6 s warm on 2 CPU cores, ``bench/pipeline.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import peak_rss_mb, time_runs, write_clinical_ct  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()

    from AnkleFractureLib.io import read_image
    from AnkleFractureLib.segmentation.distal_tibia import judge
    from AnkleFractureLib.segmentation.inference import SegmentationModel
    from AnkleFractureLib.segmentation.postprocess import _components, clean_labels

    with tempfile.TemporaryDirectory() as folder:
        ct = read_image(write_clinical_ct(folder, args.seed))
    raw = SegmentationModel.load(None, device="cpu").predict(ct, postprocess=False)
    roi = tuple(slice(a, b) for a, b in raw.meta["segmentation"]["roi_zyx"])
    labels = np.ascontiguousarray(np.asarray(raw.array)[roi])
    ct_roi = np.ascontiguousarray(np.asarray(ct.array)[roi])
    up = ct.superior_zyx()
    sp_zyx = np.asarray(ct.spacing[::-1], dtype=float)
    print(f"bone region (z, y, x): {labels.shape}, spacing (x, y, z) mm "
          f"{tuple(round(float(s), 3) for s in ct.spacing)}")

    def clean() -> object:
        return clean_labels(labels, ct.spacing, ct_hu=ct_roi, superior_zyx=up)

    tibia = _components(labels, 1)[0]
    offset = [s.start for s in tibia.box]

    def rule9() -> object:
        return judge(tibia.mask(), offset, ct_roi, sp_zyx, up)

    whole = time_runs(clean, runs=args.runs)
    alone = time_runs(rule9, runs=args.runs)
    print(f"clean_labels: median {whole['median_s']:.3f} s (min {whole['min_s']:.3f}, max "
          f"{whole['max_s']:.3f}; {whole['runs']} runs), peak allocation "
          f"{whole['peak_alloc_mb']:.0f} MB")
    print(f"rule 9 alone: median {alone['median_s'] * 1000:.1f} ms, verdict {rule9()}")
    print(f"peak RSS of this process: {peak_rss_mb():.0f} MB (network run included)")


if __name__ == "__main__":
    main()
