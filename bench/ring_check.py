"""Benchmark: the cortical ring check (``cortex_ring.ring_breaks``) at clinical resolution.

Usage: .venv/bin/python bench/ring_check.py [--runs 5] [--seed 11]

Measures, median of ``--runs`` runs and peak numpy/Python allocation:

* a synthetic fibular shaft 250 mm long at 0.35 x 0.35 x 0.6 mm (``cortex_ring.demo_tube``
  in a 60 mm-wide field): the size the v21 criterion names;
* the segmented fibula of one clinical-size phantom (512 x 512 x >= 350, about 0.35-0.45 mm
  in-plane; generated and segmented by the shipped network, not timed), as the pipeline
  calls it (``ring_check.ring_candidates`` reads the analysed leg's fibula).

The ring check runs only when the localiser found no line (plans.json decision.ring_check).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import peak_rss_mb, time_runs, write_clinical_ct  # noqa: E402


def _report(name: str, stats: dict) -> None:
    print(f"{name}: median {stats['median_s']:.3f} s (min {stats['min_s']:.3f}, max "
          f"{stats['max_s']:.3f}; {stats['runs']} runs), peak allocation "
          f"{stats['peak_alloc_mb']:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()

    from AnkleFractureLib.fracture.cortex_ring import demo_tube, ring_breaks
    from AnkleFractureLib.io import read_image
    from AnkleFractureLib.segmentation.inference import SegmentationModel

    tube, mask, sp = demo_tube(gap_at_mm=100.0, length_mm=250.0, spacing_zyx=(0.6, 0.35, 0.35))
    field = np.zeros((tube.shape[0], 171, 171), np.float32)
    inside = np.zeros(field.shape, bool)
    field[:, 50:50 + tube.shape[1], 50:50 + tube.shape[2]] = tube
    inside[:, 50:50 + tube.shape[1], 50:50 + tube.shape[2]] = mask
    print(f"synthetic shaft: array (z, y, x) {field.shape}, spacing (z, y, x) mm {sp}")
    _report("ring check, synthetic 250 mm shaft",
            time_runs(lambda: ring_breaks(field, inside, sp, limit=64), runs=args.runs))

    with tempfile.TemporaryDirectory() as folder:
        ct = read_image(write_clinical_ct(folder, args.seed))
    labels = np.asarray(SegmentationModel.load(None, device="cpu").predict(ct).array)
    fibula = labels == 2
    spacing = tuple(float(s) for s in ct.spacing[::-1])
    print(f"clinical phantom: {ct.shape} (z, y, x), spacing (z, y, x) mm "
          f"{tuple(round(s, 3) for s in spacing)}, fibula {int(fibula.sum())} voxels")
    array = np.asarray(ct.array)
    _report("ring check, clinical phantom's fibula",
            time_runs(lambda: ring_breaks(array, fibula, spacing, limit=64), runs=args.runs))
    print(f"peak RSS of this process: {peak_rss_mb():.0f} MB (network run included)")


if __name__ == "__main__":
    main()
