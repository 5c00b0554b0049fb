"""Benchmark: cases per minute of ``batch`` with the local engine and with Ray, on the same cases.

Usage: .venv/bin/python bench/batch_engines.py [--cases 8] [--runs 1] [--device cpu]
       [--mode cli|api|both]

Generates ``--cases`` phantoms (fast grid, Weber classes and sides varied; not timed) as NIfTI
files, then runs the whole batch into a fresh folder (no resume, the shipped models) with:

* local, 1 worker: one Pipeline in the batch's own process, torch on every core;
* local, 2 workers: two ``spawn`` worker processes, one torch thread each;
* ray, 2 workers: a local Ray runtime with 2 CPUs started and shut down by the batch, two
  actors with one torch thread each;
* ray, runtime kept (``api`` only): the same, with the Ray runtime started once by this process
  (``ray.init``, its time printed apart), which ``run_batch`` then uses and leaves running: what
  a notebook that runs several batches does.

Two ways of timing it:

* ``cli`` (what a user runs): the wall time of the whole ``ankle-fracture batch SCANS --out
  DIR --engine E --workers N --device D --quiet`` command, a fresh Python process each time
  (interpreter start, imports, Ray runtime or worker start-up, model loading, shut-down);
* ``api``: ``run_batch`` called again and again in this one process (what a notebook does):
  the imports and the file cache are warm after the first call, which favours the engine with
  the smaller per-call start-up (the local one: Ray starts and stops a runtime every call).

Each figure is the median over ``--runs`` runs (the engines interleaved) as cases per minute.
Ray's overhead is its time relative to the local engine with the same number of workers (goal:
within 15 %). Other engineers may share the cores: the load average is printed at the start and
the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Allowed slowdown of the Ray engine against the local engine with as many workers.
GOAL_OVERHEAD = 0.15
#: (name, engine, workers) of the configurations measured.
#: What each timing mode measures (printed with its figures).
MODES = {"cli": "each run a fresh 'ankle-fracture batch' command (what a user runs)",
         "api": "run_batch called again in one warm process (what a notebook does)"}
#: The "runtime kept" configuration of the ``api`` mode.
KEPT = ("ray, runtime kept", "ray", 2)
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


def _one_cli_run(scans: str, out: str, engine: str, workers: int, device: str
                 ) -> Tuple[float, Dict[str, int]]:
    """Wall seconds of one ``ankle-fracture batch`` command, and its counts (results.csv)."""
    import csv

    cmd = [sys.executable, "-m", "AnkleFractureLib", "batch", scans, "--out", out, "--engine",
           engine, "--workers", str(workers), "--device", device, "--no-resume", "--quiet"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    with open(os.path.join(out, "results.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    counts = {k: sum(r["status"] == s for r in rows)
              for k, s in (("ok", "ok"), ("refused", "refused"), ("error", "error"))}
    for message in sorted({r["error"] for r in rows if r["error"]}):
        print(f"    {engine} x{workers} failed case: {message[:300]}")
    return wall, counts


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


def _measure(mode: str, scans: str, tmp: str, configs: Sequence[Tuple[str, str, int]],
             runs: int, device: str) -> Tuple[Dict[str, List[float]], Dict[str, Dict[str, int]]]:
    """Wall times and counts per configuration, the engines interleaved run after run (the
    "runtime kept" runs of the ``api`` mode come after, in one block, with their runtime)."""
    one = _one_cli_run if mode == "cli" else _one_run
    walls: Dict[str, List[float]] = {name: [] for name, _, _ in configs}
    counts = {name: {"ok": 0, "refused": 0, "error": 0} for name, _, _ in configs}

    def measure(name: str, engine: str, workers: int, k: int) -> None:
        out = os.path.join(tmp, f"out_{mode}_{name.replace(' ', '').replace(',', '_')}_{k}")
        wall, got = one(scans, out, engine, workers, device)
        walls.setdefault(name, []).append(wall)
        for key, value in got.items():
            counts.setdefault(name, {"ok": 0, "refused": 0, "error": 0})[key] += value

    for k in range(runs):  # interleaved, so that a change of load hits every engine
        for name, engine, workers in configs:
            measure(name, engine, workers, k)
    if mode == "api" and any(engine == "ray" for _, engine, _ in configs):
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=KEPT[2], include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
        print(f"  (the Ray runtime of '{KEPT[0]}' started once in {time.perf_counter() - t0:.1f}"
              " s, not counted in its runs)")
        try:
            for k in range(runs):
                measure(*KEPT, k)
        finally:
            ray.shutdown()
    return walls, counts


def _print(mode: str, walls: Dict[str, List[float]], counts: Dict[str, Dict[str, int]],
           configs: Sequence[Tuple[str, str, int]], cases: int, runs: int) -> None:
    medians = {name: statistics.median(w) for name, w in walls.items()}
    print(f"{mode}: {MODES[mode]}")
    for name in walls:
        c = counts[name]
        print(f"  {name:<17} {60.0 * cases / medians[name]:6.2f} cases/min  (median "
              f"{medians[name]:.1f} s over {runs} run{'s' if runs > 1 else ''}, "
              f"{min(walls[name]):.1f}-{max(walls[name]):.1f} s; over all runs {c['ok']} "
              f"ok, {c['refused']} refused, {c['error']} failed)")
    if "ray, 2 workers" in medians:
        overhead = medians["ray, 2 workers"] / medians["local, 2 workers"] - 1.0
        verdict = "met" if overhead <= GOAL_OVERHEAD else "NOT met"
        print(f"  {mode}: ray overhead against local with 2 workers: {100 * overhead:+.1f} % "
              f"(goal <= {100 * GOAL_OVERHEAD:.0f} %: {verdict})")
    if KEPT[0] in medians:
        overhead = medians[KEPT[0]] / medians["local, 2 workers"] - 1.0
        print(f"  {mode}: ray with the runtime kept against local with 2 workers: "
              f"{100 * overhead:+.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--mode", default="both", choices=["cli", "api", "both"])
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
    modes = ("cli", "api") if args.mode == "both" else (args.mode,)
    with tempfile.TemporaryDirectory() as tmp:
        scans = os.path.join(tmp, "scans")
        os.makedirs(scans)
        t0 = time.perf_counter()
        _phantoms(scans, args.cases)
        print(f"{args.cases} phantoms generated in {time.perf_counter() - t0:.1f} s (not timed)")
        configs = [c for c in CONFIGS if c[1] != "ray" or ray_version is not None]
        if len(configs) < len(CONFIGS):
            print("  ray, 2 workers    skipped: ray is not installed")
        for mode in modes:
            walls, counts = _measure(mode, scans, tmp, configs, args.runs, args.device)
            _print(mode, walls, counts, configs, args.cases, args.runs)
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
