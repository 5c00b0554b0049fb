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
