"""Shared helpers of the benchmarks: timing (median of runs) and peak memory."""

from __future__ import annotations

import resource
import statistics
import time
import tracemalloc
from typing import Callable, Dict, List


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_runs(fn: Callable[[], object], runs: int = 5, warmup: int = 1) -> Dict[str, float]:
    """Median/min/max wall time (s) of ``fn`` over ``runs`` runs after ``warmup`` runs, and the
    peak Python-heap allocation (MB, tracemalloc; numpy arrays included) of one run."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "runs": runs, "peak_alloc_mb": peak / 1e6}


def write_clinical_ct(folder: str, seed: int, max_inplane_mm: float = 0.45,
                      fracture_faces: str = "corticated") -> str:
    """Write a clinical-size Weber B right phantom as ``folder/clinical_ct.nii.gz``.

    The first seed from ``seed`` whose clinical grid has >= 350 slices and an in-plane spacing
    <= ``max_inplane_mm`` is rendered (grids are planned without rendering any case), with the
    fracture's faces ``fracture_faces`` ("corticated", the phantom's default, or "raw").

    Returns:
        The file's path.
    """
    import os

    from AnkleFractureLib.io import write_image
    from AnkleFractureLib.phantom import generate_case
    from AnkleFractureLib.phantom.generator import plan_grid

    def clinical(s: int) -> bool:
        grid = plan_grid(s, "right", "clinical")[2]
        return grid.size[2] >= 350 and grid.spacing[0] <= max_inplane_mm

    s = next(s for s in range(seed, seed + 400) if clinical(s))
    case = generate_case(s, weber="B", side="right", spacing="clinical",
                         fracture_faces=fracture_faces)
    path = os.path.join(folder, "clinical_ct.nii.gz")
    write_image(case.ct, path)
    print(f"case seed {s}: {case.ct.size} voxels (x, y, z) at "
          f"{tuple(round(v, 3) for v in case.ct.spacing)} mm, Weber B, right ankle, "
          f"{fracture_faces} fracture faces")
    return path
