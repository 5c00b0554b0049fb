"""Benchmark: the whole pipeline on a large CT, 512 x 512 x 1500 voxels, within 4 GB.

Usage: .venv/bin/python bench/large_ct.py [--slices 1500] [--fill shaft|air] [--seed 11]
                                         [--device auto] [--keep DIR] [--ct FILE]

A clinical-size phantom (512 x 512 x >= 350, Weber B, right ankle; bench/_common.py) is made
into a long scan of ``--slices`` slices, so the grid has 512 x 512 x 1500 voxels:

* ``--fill shaft`` (a whole-leg CT): the slices above the phantom repeat its top slice, so the
  tibial and fibular shafts run on for the whole scan (the segmentation's bone region spans
  every slice);
* ``--fill air``: the slices above the phantom are air (-1024 HU), a long scan with the ankle
  at one end.

The phantom and the long CT are built and written in a child process, so neither their time
nor their memory is counted here.

Then, in this process: ``read_image`` -> ``Pipeline.run`` (segmentation, registration, crop,
classification, Grad-CAM) -> ``write_outputs`` (report.png included), with the models loaded
first (not timed). It prints the wall time of each stage, the process's peak resident memory
(``ru_maxrss``) and, from a sampler thread (every 20 ms, /proc/self/statm), the highest resident
memory seen during each stage, so a peak above the goal can be traced to its stage; and what a
viewer pays to load ``gradcam.nii.gz`` (a fresh process reading it).

Goal: peak resident memory <= 4 GB (issue 15 item 6).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import peak_rss_mb, write_clinical_ct  # noqa: E402

#: Goal: peak resident memory of the whole run (MB).
GOAL_RSS_MB = 4096.0


def make_long_ct(folder: str, seed: int, slices: int, fill: str = "shaft") -> str:
    """Write ``folder/large_ct.nii.gz``: the clinical phantom extended to ``slices`` slices.

    Args:
        folder: Output folder.
        seed: First phantom seed tried (:func:`_common.write_clinical_ct`).
        slices: Slices (z) of the long CT.
        fill: "shaft" (repeat the top slice) or "air" (-1024 HU).

    Returns:
        The file's path.
    """
    import numpy as np

    from AnkleFractureLib.geometry.volume import Volume
    from AnkleFractureLib.io import read_image, write_image

    ct = read_image(write_clinical_ct(folder, seed))
    arr = ct.array  # (z, y, x); numpy z runs along ITK k, the leg's axis
    extra = max(0, slices - arr.shape[0])
    # Which end of k is proximal: the end where the bones' cross-section is smaller (shaft).
    bone = (arr > 300).reshape(arr.shape[0], -1).sum(axis=1)
    top_first = bone[: arr.shape[0] // 4].mean() < bone[-arr.shape[0] // 4:].mean()
    pad = ((extra, 0), (0, 0), (0, 0)) if top_first else ((0, extra), (0, 0), (0, 0))
    long_arr = (np.pad(arr, pad, mode="edge") if fill == "shaft"
                else np.pad(arr, pad, mode="constant", constant_values=-1024))
    origin = ct.index_to_physical(np.array([[0.0, 0.0, -extra if top_first else 0.0]]))[0]
    long_ct = Volume(long_arr, ct.spacing, origin, ct.direction, {})
    path = os.path.join(folder, "large_ct.nii.gz")
    write_image(long_ct, path)
    os.remove(os.path.join(folder, "clinical_ct.nii.gz"))
    print(f"long CT: {long_ct.size} voxels (x, y, z) at "
          f"{tuple(round(v, 3) for v in long_ct.spacing)} mm, {long_arr.dtype}, "
          f"{extra} slices of {fill} added {'before' if top_first else 'after'} the phantom")
    return path


class RssSampler:
    """Samples this process's resident memory in a thread; keeps the maximum per stage."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.stage = "start"
        self.peaks: Dict[str, float] = {}
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss_mb(self) -> float:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * self._page / 2 ** 20

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self._rss_mb()
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


#: Reads one image and prints: seconds, peak RSS (MB), array MB. The peak is VmHWM of the new
#: process's memory map: ``ru_maxrss`` of a child of a large process starts at the parent's
#: high-water mark (see bench/pipeline.py).
_READ_BACK = """
import re, sys, time
from AnkleFractureLib.io import read_image
t0 = time.perf_counter()
vol = read_image(sys.argv[1])
hwm = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
print(time.perf_counter() - t0, hwm / 1024, vol.array.nbytes / 2 ** 20)
"""


def read_back_cost(path: str) -> str:
    """What a viewer pays to load an output: read time, peak RSS and array size of a fresh
    process that reads ``path`` (e.g. gradcam.nii.gz, as Slicer does)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _READ_BACK, path], check=True, text=True,
                         capture_output=True, cwd=root).stdout.split()
    return (f"{os.path.basename(path)} read back in {float(out[0]):.1f} s, peak RSS "
            f"{float(out[1]):.0f} MB, array {float(out[2]):.0f} MB")


def _stage_of(message: str) -> str:
    """A progress message's stage name (its first words)."""
    for key in ("segment", "regist", "crop", "classif", "check"):
        if key in message.lower():
            return {"regist": "register", "classif": "classify", "check": "checks"}.get(key, key)
    return message.split(":")[0][:30]


def run(ct_path: str, device: str, out: str) -> None:
    """Read, run and write once with a sampler; print the numbers."""
    from AnkleFractureLib.io import read_image
    from AnkleFractureLib.pipeline.pipeline import Pipeline, PipelineOptions, write_outputs

    pipe = Pipeline(PipelineOptions(device=device))
    t0 = time.perf_counter()
    _ = pipe.segmentation_model, pipe.classifier  # load the models (not timed)
    print(f"models loaded in {time.perf_counter() - t0:.1f} s; RSS {peak_rss_mb():.0f} MB")
    marks: List[str] = []
    with RssSampler() as sampler:
        def progress(_fraction: float, message: str) -> None:
            sampler.stage = _stage_of(message)
            if not marks or marks[-1] != sampler.stage:
                marks.append(sampler.stage)

        t0 = time.perf_counter()
        sampler.stage = "read"
        ct = read_image(ct_path)
        t_read = time.perf_counter() - t0
        result = pipe.run(ct, progress=progress)
        sampler.stage = "write"
        t1 = time.perf_counter()
        write_outputs(result, out, ct)
        t_write = time.perf_counter() - t1
        total = time.perf_counter() - t0
    print(f"CT {ct.size} (x, y, z), {ct.array.dtype}, {ct.array.nbytes / 2 ** 20:.0f} MB")
    print(f"total {total:.1f} s: read {t_read:.1f} s, write {t_write:.1f} s, stages "
          + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items() if k != "total"))
    print("highest RSS per stage (MB): "
          + ", ".join(f"{k} {sampler.peaks[k]:.0f}" for k in ["read"] + marks + ["write"]
                      if k in sampler.peaks))
    peak = peak_rss_mb()
    gated = result.gated
    heat = result.gradcam
    print(f"result: side {result.side}, prediction {gated['prediction']}, refused: "
          f"{result.refusal}; heatmap {None if heat is None else heat.shape} "
          f"{'' if heat is None else heat.array.dtype} "
          f"({0 if heat is None else heat.array.nbytes / 2 ** 20:.0f} MB)")
    print(f"peak RSS {peak:.0f} MB: goal <= {GOAL_RSS_MB / 1024:.0f} GB "
          f"{'met' if peak <= GOAL_RSS_MB else 'NOT met'}")
    if heat is not None:
        print(read_back_cost(os.path.join(out, "gradcam.nii.gz")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--fill", default="shaft", choices=["shaft", "air"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--keep", metavar="DIR", help="write the CT and outputs here")
    parser.add_argument("--ct", metavar="FILE", help="use this CT instead of building one "
                        "(e.g. DIR/large_ct.nii.gz of an earlier --keep run)")
    parser.add_argument("--make-ct", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_ct:  # the child process
        print(make_long_ct(args.make_ct, args.seed, args.slices, args.fill))
        return
    import torch

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or tmp
        os.makedirs(folder, exist_ok=True)
        if args.ct:
            run(args.ct, args.device, os.path.join(folder, "out"))
            return
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--make-ct", folder,
                               "--seed", str(args.seed), "--slices", str(args.slices),
                               "--fill", args.fill],
                              check=True, capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        print("\n".join(lines[:-1]))
        print(f"built in {time.perf_counter() - t0:.0f} s (another process, not counted)")
        run(lines[-1], args.device, os.path.join(folder, "out"))


if __name__ == "__main__":
    main()
