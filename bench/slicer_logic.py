"""Benchmark: what the Slicer module adds around the pipeline, on a clinical-size CT.

Usage: .venv/bin/python bench/slicer_logic.py [--runs 3] [--device cpu] [--seed 19]

Needs ``slicer-core`` (real MRML, no application). One clinical-size phantom (512 x 512 x >= 350,
Weber B, right ankle; made in a child process so its time and memory are not counted) is loaded
as a volume node on a bare scene, then measured (median of ``--runs``):

* node <-> library conversions: ``volumeFromNode`` (CT), label map -> Tibia/Fibula segments,
  segments -> label map (what Register / Classify read from a corrected segmentation);
* ``runStage("all")`` in process (the Logic's blocking call; models loaded by a warm-up run):
  total, and the part spent loading the results into nodes (``loadResults``);
* ``startStage("all")`` in a background process: a one-shot process (``warm=False``: Python
  start, imports and model loading every time) and the panel's warm worker (models loaded
  once): wall time from the click to the nodes being filled, and its parts.

Prints the figures and the peak resident memory of this process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT, os.path.join(ROOT, "AnkleFracture")]
from _common import peak_rss_mb  # noqa: E402


def median_time(fn: Callable[[], object], runs: int) -> float:
    times: List[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["auto", "gpu", "cpu"])
    ap.add_argument("--seed", type=int, default=19)
    args = ap.parse_args()

    import slicer  # noqa: F401 - fails early and clearly without slicer-core

    from AnkleFractureLib.io import read_image
    from AnkleFractureSlicer import nodes as N
    from AnkleFractureSlicer.logic import AnkleFractureSceneLogic, ResultNodes, StageSettings

    print(f"load average at start: {os.getloadavg()[0]:.2f} (2 cores; compare runs at low load)")
    work = tempfile.mkdtemp(prefix="bench_slicer_")
    subprocess.run([sys.executable, "-c",
                    f"import sys; sys.path[:0] = {[HERE, ROOT]!r}; from _common import "
                    f"write_clinical_ct; write_clinical_ct({work!r}, {args.seed})"], check=True)
    ct = read_image(os.path.join(work, "clinical_ct.nii.gz"))

    scene = slicer.vtkMRMLScene()
    logic = AnkleFractureSceneLogic(scene, os.path.join(work, "results"))
    ct_node = N.addVolumeNode(scene, ct, "clinical CT")
    settings = StageSettings(device=args.device)
    figures: Dict[str, float] = {}

    figures["volumeFromNode (CT)"] = median_time(lambda: N.volumeFromNode(ct_node), args.runs)
    warm = logic.runStage("all", ct_node, ResultNodes(), settings)  # loads the models
    label = read_image(warm.folder / "segmentation.nii.gz")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "bench segments")
    figures["label map -> segments"] = median_time(
        lambda: N.updateSegmentationFromLabelMap(seg, label, ct_node, scene), args.runs)
    figures["segments -> label map"] = median_time(
        lambda: N.labelMapFromSegmentation(seg, ct_node, scene), args.runs)

    nodes = ResultNodes()
    figures["runStage('all') in process"] = median_time(
        lambda: logic.runStage("all", ct_node, nodes, settings), args.runs)
    figures["loadResults from the NIfTI files (no hand-off)"] = median_time(
        lambda: logic.loadResults(warm.folder, ct_node, nodes), args.runs)

    def background(warm: bool, parts: List) -> Callable[[], None]:
        def run() -> None:
            t0 = time.perf_counter()
            job = logic.startStage("all", ct_node, nodes, settings, python=sys.executable,
                                   warm=warm)
            started = time.perf_counter() - t0
            state = job.process.wait(900)
            if not state.succeeded:
                raise RuntimeError(state.error)
            child = job.process.elapsed
            job.finish()
            parts.append((started, child))
        return run

    cold: List = []
    figures["startStage('all', warm=False) click -> nodes"] = median_time(
        background(False, cold), args.runs)
    figures["  of which writing the CT for the child"] = statistics.median(p[0] for p in cold)
    figures["  of which the child (start, imports, models, run)"] = statistics.median(
        p[1] for p in cold)
    warm: List = []
    background(True, [])()  # starts the worker and loads its models
    figures["startStage('all') warm worker, click -> nodes"] = median_time(
        background(True, warm), args.runs)
    figures["  of which the worker's run"] = statistics.median(p[1] for p in warm)
    logic.shutdown()

    print(f"clinical CT {ct.size} voxels (x, y, z), device {args.device}, median of "
          f"{args.runs} runs:")
    for name, seconds in figures.items():
        print(f"  {name:<45} {seconds:7.2f} s")
    print(f"peak resident memory of this process: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
