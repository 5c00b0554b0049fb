"""Benchmark: CPU cost of the segmentation training's domain randomisation per patch.

Usage: .venv/bin/python bench/seg_randomise.py [--patch 80] [--n 60] [--threads 1]

Prepares one phantom case exactly as training does (1 mm model grid, HU window [-1000, 2000]),
cuts a patch centred on the tibia, then times :func:`randomise_patch` on it:

* per level ("light", "full"): median / 90th percentile / max over ``--n`` fresh draws (each
  patch draws its own components, as in training), and the mean number of components applied;
* per component (that component alone, probability 1): median over ``--n`` // 3 draws;
* everything on at once (the worst case).

Memory: the peak of Python-heap allocations (tracemalloc; numpy and scipy arrays, not torch's
own buffers) of one "everything on" patch, and the process' peak resident memory.

Goal (issue 13): under ~30 ms added per 80^3 patch on one core of the 2-core training machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import tracemalloc
from typing import Dict, List, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import peak_rss_mb  # noqa: E402

from AnkleFractureLib.training.seg_randomise import (COMPONENTS, draw_randomisation,  # noqa: E402
                                                     randomise_config, randomise_patch)


def phantom_patch(size: int, seed: int = 3) -> Tuple[np.ndarray, np.ndarray]:
    """A (size^3) patch of a prepared phantom centred on the tibia: (image float32 normalised
    (z, y, x), label uint8 (z, y, x))."""
    from AnkleFractureLib.phantom import generate_case
    from AnkleFractureLib.segmentation.plans import SegPlans
    from AnkleFractureLib.segmentation.preprocess import prepare_case
    from AnkleFractureLib.training.seg_data import crop_padded

    case = generate_case(seed, weber="B", side="right", spacing="fast")
    image, label = prepare_case(case.ct, case.label, SegPlans())
    centre = np.argwhere(label.array == 1).mean(axis=0).astype(int)
    start = [int(c) - size // 2 for c in centre]
    return (crop_padded(image.array.astype(np.float32), start, (size,) * 3, 0.0),
            crop_padded(label.array, start, (size,) * 3, 0))


def _times(image: np.ndarray, label: np.ndarray, cfg, n: int, seed: int) -> Dict[str, float]:
    rng = np.random.default_rng(seed)
    randomise_patch(image, label, rng, cfg)  # warm-up (imports, first allocations)
    times: List[float] = []
    applied: List[int] = []
    for _ in range(n):
        state = rng.bit_generator.state
        applied.append(len(draw_randomisation(rng, cfg, image.shape)))
        rng.bit_generator.state = state  # time the same draw the count came from
        t0 = time.perf_counter()
        randomise_patch(image, label, rng, cfg)
        times.append(time.perf_counter() - t0)
    ms = sorted(1e3 * t for t in times)
    return {"median": statistics.median(ms), "p90": ms[int(0.9 * (len(ms) - 1))],
            "max": ms[-1], "components": float(np.mean(applied))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch", type=int, default=80, help="patch edge in voxels (default 80)")
    ap.add_argument("--n", type=int, default=60, help="patches per level (default 60)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    image, label = phantom_patch(args.patch)
    print(f"patch {image.shape} float32, torch threads {torch.get_num_threads()}")
    full = randomise_config("full")
    every = full.only("remap", **{f"p_{c}": 1.0 for c in COMPONENTS if c != "remap"},
                      p_corr_noise=1.0)
    randomise_patch(image, label, np.random.default_rng(0), every)  # imports out of the timing
    for level in ("light", "full"):
        r = _times(image, label, randomise_config(level), args.n, seed=1)
        print(f"level {level:5s}: median {r['median']:6.1f} ms  p90 {r['p90']:6.1f} ms  "
              f"max {r['max']:6.1f} ms  ({r['components']:.1f} components per patch on average)")
    for name in COMPONENTS:
        r = _times(image, label, full.only(name), max(3, args.n // 3), seed=2)
        print(f"  {name:8s} alone: median {r['median']:6.2f} ms")
    r = _times(image, label, every, max(3, args.n // 3), seed=3)
    print(f"everything on: median {r['median']:6.1f} ms  max {r['max']:6.1f} ms")
    tracemalloc.start()
    randomise_patch(image, label, np.random.default_rng(4), every)
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    print(f"peak Python-heap allocation of one patch (everything on): {peak:.1f} MB "
          f"(the patch itself is {image.nbytes / 1e6:.1f} MB); process peak RSS "
          f"{peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
