"""Benchmark: ``segment`` on a clinical-size CT, end to end from the file to the written labelmap.

Usage: .venv/bin/python bench/segment.py [--runs 3] [--model MODEL_DIR] [--device auto]

Generates one clinical-size phantom (512 x 512 x >= 350, about 0.35-0.45 mm in-plane; not timed)
as a NIfTI file, then measures:

* in-process (model loaded once, as in Slicer or ``batch``): read CT -> predict -> write labels,
  median of ``--runs`` runs, with the share of each step;
* command line: ``python -m AnkleFractureLib segment CT -o SEG`` in a fresh process (imports and
  model loading included), median wall time and the peak resident memory of that process.

Goal on 2 CPU cores: <= 10 s and <= 3 GB peak; on a GPU <= 1 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import peak_rss_mb, write_clinical_ct  # noqa: E402


def _child_run(args_list):
    """Wall time (s) and peak RSS (MB) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args_list, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"segment failed: {err}")
    return wall, usage.ru_maxrss / 1024.0


def _import_seconds() -> float:
    """Wall time of importing torch and the inference networks (the plain-torch twins of
    :mod:`AnkleFractureLib.networks`, no MONAI) in a new process."""
    code = "import torch; from AnkleFractureLib.networks import UNet, sliding_window_inference"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--model", help="model folder (default: the shipped model)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from AnkleFractureLib.io import read_image, write_image
    from AnkleFractureLib.segmentation.inference import SegmentationModel

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ct_path = write_clinical_ct(tmp, args.seed)
        print(f"phantom generated and written in {time.perf_counter() - t0:.1f} s (not timed)")
        model = SegmentationModel.load(args.model, args.device)
        out = os.path.join(tmp, "seg.nii.gz")

        steps = {"read": [], "predict": [], "write": [], "total": []}
        inner = {}
        for run in range(args.runs + 1):  # the first run warms up
            t = time.perf_counter()
            ct = read_image(ct_path)
            t_read = time.perf_counter()
            labels = model.predict(ct)
            t_pred = time.perf_counter()
            write_image(labels, out)
            t_write = time.perf_counter()
            if run == 0:
                continue
            steps["read"].append(t_read - t)
            steps["predict"].append(t_pred - t_read)
            steps["write"].append(t_write - t_pred)
            steps["total"].append(t_write - t)
            for k, v in labels.meta["segmentation"]["timings"].items():
                inner.setdefault(k, []).append(v)
        total = statistics.median(steps["total"])
        print(f"\nin-process on {model.device} (model loaded once), median of {args.runs} runs:")
        for k in ("read", "predict", "write", "total"):
            med = statistics.median(steps[k])
            print(f"  {k:<10} {med:7.2f} s  ({med / total:4.0%})")
        print("  predict breakdown: " + ", ".join(
            f"{k[:-2]} {statistics.median(v):.2f} s" for k, v in inner.items() if k != "total_s"))
        print(f"  process peak RSS so far {peak_rss_mb():.0f} MB (includes phantom generation)")

        cmd = [sys.executable, "-m", "AnkleFractureLib", "segment", ct_path, "-o", out,
               "--quiet", "--device", args.device] + (["--model", args.model] if args.model else [])
        walls, peaks = [], []
        for _ in range(args.runs):
            w, p = _child_run(cmd)
            walls.append(w)
            peaks.append(p)
        print(f"\ncommand line (fresh process: imports + model load + read + predict + write), "
              f"median of {args.runs} runs: {statistics.median(walls):.2f} s, "
              f"peak RSS {max(peaks):.0f} MB")
        t_imp = _import_seconds()
        print(f"  of which importing torch + the networks in a fresh interpreter: {t_imp:.1f} s")
        ok_in = total <= 10
        ok_cli = statistics.median(walls) <= 10 and max(peaks) <= 3072
        print(f"goal on 2 CPU cores (<= 10 s, <= 3 GB): file -> labels in process "
              f"{'met' if ok_in else 'NOT met'}; cold command line {'met' if ok_cli else 'NOT met'}")


if __name__ == "__main__":
    main()
