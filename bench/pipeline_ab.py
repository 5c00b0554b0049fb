"""Warm pipeline runs of two model sets, interleaved in one process on the same CTs.

The warm-run goal (``bench/pipeline.py``) is read on a shared host whose speed drifts by 10-30 %
between back-to-back runs: two separate ``bench/pipeline.py`` runs, one per model set, cannot
tell a 0.3 s change of the models from the host's drift. Here both pipelines are loaded in one
process and run in alternation on the same CT (A B B A A B B A ...: each pair's order is
swapped, so that neither set always runs first after the other), and the change is read as the
median of the paired differences B - A, stage by stage.

Each model set's stages depend on the case: a localiser that finds no line runs the cortical
ring check, which one that finds the line skips. So the pairs run on two clinical-size
phantoms that differ only in the fracture's faces: ``corticated`` (the phantom's default and
``bench/pipeline.py``'s case) and ``raw`` (no cortex on the faces, as a fresh fracture shows).

Usage::

    .venv/bin/python bench/pipeline_ab.py --b-cls /work/models/cls_v24 \\
        --b-fracture /work/models/frac_v29_model [--pairs 4] [--faces corticated raw]

A is the shipped models unless ``--a-cls`` / ``--a-fracture`` say otherwise; the segmentation
model and the template are the shipped ones for both. Prints, per phantom, each set's median
total, the median paired difference with its range, each stage's median difference and each
set's result (prediction, line found, ring check run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import peak_rss_mb  # noqa: E402
from pipeline import STAGES, _one_run, _phantom_in_child  # noqa: E402

#: Order of the two sets in pair i: A first in even pairs, B first in odd ones.
ORDERS = (("A", "B"), ("B", "A"))


def _pipelines(args: argparse.Namespace) -> Dict[str, Any]:
    """The two pipelines ("A", "B"), each with its classifier and localiser folders."""
    from AnkleFractureLib.pipeline.pipeline import Pipeline, PipelineOptions

    return {"A": Pipeline(PipelineOptions(device=args.device, cls_model_dir=args.a_cls,
                                          fracture_model_dir=args.a_fracture)),
            "B": Pipeline(PipelineOptions(device=args.device, cls_model_dir=args.b_cls,
                                          fracture_model_dir=args.b_fracture))}


def _summary(result: Any) -> str:
    """One line of a run's answer: prediction, the line found or not, the ring check's time
    (near 0 when the localiser's line made it unnecessary)."""
    gated = result.gated
    f = result.fracture
    line = ("no localiser" if f is None else
            f"line {'found' if f.found else 'not found'}"
            + ("" if not f.found or f.height_mm is None else f" at {f.height_mm:+.1f} mm"))
    ring = float(result.timings.get("ring_check", 0.0))
    return f"prediction {gated['prediction']}, {line}, ring check {ring:.2f} s"


def pair_runs(pipes: Dict[str, Any], ct_path: str, out: str, pairs: int
              ) -> Tuple[Dict[str, List[Dict[str, float]]], Dict[str, Any]]:
    """Stage timings (seconds, :func:`pipeline._one_run`'s keys) of ``pairs`` interleaved
    runs of each pipeline on ``ct_path``, after one warm-up run each (not kept), and each
    pipeline's last result."""
    runs: Dict[str, List[Dict[str, float]]] = {"A": [], "B": []}
    last: Dict[str, Any] = {}
    for name in ("A", "B"):
        _one_run(pipes[name], ct_path, out)
    for i in range(pairs):
        for name in ORDERS[i % 2]:
            steps, last[name] = _one_run(pipes[name], ct_path, out)
            runs[name].append(steps)
    return runs, last


def _report(runs: Dict[str, List[Dict[str, float]]]) -> None:
    """Print the medians of each set and the paired differences B - A (seconds)."""
    tot = {k: [r["total"] for r in v] for k, v in runs.items()}
    diff = [b - a for a, b in zip(tot["A"], tot["B"])]
    print(f"  total: A median {statistics.median(tot['A']):.2f} s, B median "
          f"{statistics.median(tot['B']):.2f} s; paired B - A median "
          f"{statistics.median(diff):+.2f} s (min {min(diff):+.2f}, max {max(diff):+.2f}, "
          f"{len(diff)} pairs)")
    print(f"  {'stage':<12} {'A median s':>10} {'B median s':>10} {'B - A':>7}")
    for k in STAGES + ("other",):
        a = [r[k] for r in runs["A"]]
        b = [r[k] for r in runs["B"]]
        d = statistics.median(y - x for x, y in zip(a, b))
        print(f"  {k:<12} {statistics.median(a):10.2f} {statistics.median(b):10.2f} {d:+7.2f}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a-cls", default=None, help="A's classifier (default: shipped)")
    parser.add_argument("--a-fracture", default=None, help="A's localiser (default: shipped)")
    parser.add_argument("--b-cls", default=None, help="B's classifier (default: shipped)")
    parser.add_argument("--b-fracture", default=None, help="B's localiser (default: shipped)")
    parser.add_argument("--pairs", type=int, default=4, help="interleaved pairs per phantom")
    parser.add_argument("--faces", nargs="+", default=["corticated", "raw"],
                        choices=["corticated", "raw"], help="the phantoms' fracture faces")
    parser.add_argument("--seed", type=int, default=11, help="bench/pipeline.py's seed")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min)")
    print(f"A: classifier {args.a_cls or 'shipped'}, localiser {args.a_fracture or 'shipped'}")
    print(f"B: classifier {args.b_cls or 'shipped'}, localiser {args.b_fracture or 'shipped'}")
    pipes = _pipelines(args)
    with tempfile.TemporaryDirectory() as tmp:
        for faces in args.faces:
            folder = os.path.join(tmp, faces)
            os.makedirs(folder)
            t0 = time.perf_counter()
            print(f"\n{faces} fracture faces:")
            ct_path = _phantom_in_child(folder, args.seed, faces)
            print(f"  phantom written in {time.perf_counter() - t0:.1f} s (not timed)")
            runs, last = pair_runs(pipes, ct_path, os.path.join(folder, "out"), args.pairs)
            _report(runs)
            for name in ("A", "B"):
                print(f"  {name}: {_summary(last[name])}")
    print(f"\nprocess peak RSS {peak_rss_mb():.0f} MB (both pipelines)")
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
