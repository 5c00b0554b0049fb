"""Benchmark: cases per minute of ``batch`` with the local engine and with Ray, on the same cases.

Usage: .venv/bin/python bench/batch_engines.py [--cases 8] [--runs 1] [--device cpu]

Generates ``--cases`` phantoms (fast grid, Weber classes and sides varied; not timed) as NIfTI
files, then runs the whole batch (``run_batch`` with ``resume=False`` into a fresh folder, the
shipped models) with:

* local, 1 worker: this process, one Pipeline, torch on every core;
* local, 2 workers: two ``spawn`` worker processes, one torch thread each;
* ray, 2 workers: a local Ray runtime with 2 CPUs started and shut down by the batch, two
  actors with one torch thread each.

Each figure is the median over ``--runs`` runs (the engines interleaved) of the wall time of the whole call (process or
runtime start-up and model loading included), as cases per minute. Ray's overhead is its time
relative to the local engine with the same number of workers (goal: within 15 %). Other
engineers may share the cores: the load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Allowed slowdown of the Ray engine against the local engine with as many workers.
GOAL_OVERHEAD = 0.15
#: (name, engine, workers) of the configurations measured.
CONFIGS: Tuple[Tuple[str, str, int], ...] = (("local, 1 worker", "local", 1),
                                             ("local, 2 workers", "local", 2),
                                             ("ray, 2 workers", "ray", 2))


def _phantoms(folder: str, n: int) -> None:
    """``n`` fast-grid phantoms in ``folder`` (classes and sides cycled)."""
    from AnkleFractureLib.io import write_image
    from AnkleFractureLib.phantom import generate_case

    classes, sides = ("none", "A", "B", "C"), ("right", "left")
    for k in range(n):
        case = generate_case(100 + k, classes[k % 4], sides[(k // 4) % 2], spacing="fast")
        write_image(case.ct, os.path.join(folder, f"ph{k:02d}.nii.gz"))


def _one_run(scans: str, out: str, engine: str, workers: int, device: str
             ) -> Tuple[float, Dict[str, int]]:
    """Wall seconds of one whole batch, and its counts (failed cases' errors are printed)."""
    from AnkleFractureLib.pipeline.batch import discover_inputs, run_batch
    from AnkleFractureLib.pipeline.pipeline import PipelineOptions

    cases = discover_inputs([scans])
    t0 = time.perf_counter()
    summary = run_batch(cases, out, PipelineOptions(device=device), workers=workers,
                        resume=False, engine=engine)
    wall = time.perf_counter() - t0
    counts = {"ok": summary.n_ok, "refused": summary.n_refused, "error": summary.n_error}
    for message in sorted({r["error"] for r in summary.rows if r["error"]}):
        print(f"    {engine} x{workers} failed case: {message[:300]}")
    return wall, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min)")
    try:
        import ray
        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    import torch

    missing = 'not installed (pip install "AnkleFractureLib[distributed]")'
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, ray "
          f"{ray_version or missing}")
    with tempfile.TemporaryDirectory() as tmp:
        scans = os.path.join(tmp, "scans")
        os.makedirs(scans)
        t0 = time.perf_counter()
        _phantoms(scans, args.cases)
        print(f"{args.cases} phantoms generated in {time.perf_counter() - t0:.1f} s (not timed)")
        configs = [c for c in CONFIGS if c[1] != "ray" or ray_version is not None]
        if len(configs) < len(CONFIGS):
            print("  ray, 2 workers    skipped: ray is not installed")
        walls: Dict[str, List[float]] = {name: [] for name, _, _ in configs}
        counts = {name: {"ok": 0, "refused": 0, "error": 0} for name, _, _ in configs}
        for k in range(args.runs):  # interleaved, so that a change of load hits every engine
            for name, engine, workers in configs:
                out = os.path.join(tmp, f"out_{engine}{workers}_{k}")
                wall, got = _one_run(scans, out, engine, workers, args.device)
                walls[name].append(wall)
                for key, value in got.items():
                    counts[name][key] += value
        medians = {name: statistics.median(w) for name, w in walls.items()}
        for name, _, _ in configs:
            c = counts[name]
            print(f"  {name:<17} {60.0 * args.cases / medians[name]:6.2f} cases/min  (median "
                  f"{medians[name]:.1f} s over {args.runs} run{'s' if args.runs > 1 else ''}, "
                  f"{min(walls[name]):.1f}-{max(walls[name]):.1f} s; over all runs {c['ok']} "
                  f"ok, {c['refused']} refused, {c['error']} failed)")
        if "ray, 2 workers" in medians:
            overhead = medians["ray, 2 workers"] / medians["local, 2 workers"] - 1.0
            verdict = "met" if overhead <= GOAL_OVERHEAD else "NOT met"
            print(f"ray overhead against local with 2 workers: {100 * overhead:+.1f} % "
                  f"(goal <= {100 * GOAL_OVERHEAD:.0f} %: {verdict})")
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
