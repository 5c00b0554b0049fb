#!/usr/bin/env python3
"""How much of a fracture gap the 1.5 mm crop grid keeps, measured on a phantom set.

For every fractured case the phantom's true fibular fracture plane (``meta["fracture"]``:
centre and normal, patient LPS mm) is read, and the fibular cortex points of the true label map
within 1 mm of the plane and 7 mm of its centre are kept where bone lies 3 mm away on both
sides (CT > 700 HU). Along the plane's normal through each point the CT is sampled every 0.1 mm
from -4 to +4 mm; the gap's contrast is ``1 - (lowest value within 1.5 mm of the plane) / (mean
value 2.5-4 mm away)`` (0: no gap seen; 1: the gap reads as air). It is measured twice:

* ``native``: on the CT itself (linear interpolation between its voxels);
* ``grid_1_5mm``: on the CT first resampled (linearly) on a 1.5 mm grid aligned with the
  phantom's anatomy frame, then read the same way: what a crop voxel grid like the
  localiser's keeps of the gap. Where the grid's planes fall relative to the gap matters, so
  it is the mean over 4 grid phases (0, 1/4, 1/2, 3/4 of a voxel along each axis), with the
  lowest and highest of the 4 beside it.

The medians over a case's cortex points are written per case with the localiser's answer from
an evaluation file when one is given. No model is run; this tests the input, not a network.

Usage:
    python scripts/hairline_visibility.py /work/data/frac_heldout_vh2 \
        --evaluation docs/fracture/heldout_vh2.json \
        --out docs/fracture/experiments/v18_sub_voxel_ct/hairline_visibility_vh2.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

Sampler = Callable[[np.ndarray], np.ndarray]
#: Grid phases (fractions of a voxel, along each axis) of the 1.5 mm resampling.
PHASES = (0.0, 0.25, 0.5, 0.75)
#: Offsets (mm) along the plane's normal at which the CT is read.
OFFSETS_MM = np.round(np.arange(-4.0, 4.01, 0.1), 2)


def _sampler(volume: Any) -> Sampler:
    """LPS points (n, 3) -> linearly interpolated values of ``volume``."""
    from scipy.ndimage import map_coordinates

    scale = np.asarray(volume.direction, float).reshape(3, 3) * np.asarray(volume.spacing)[None]
    inv, origin = np.linalg.inv(scale), np.asarray(volume.origin, float)
    arr = np.asarray(volume.array, np.float32)

    def read(points: np.ndarray) -> np.ndarray:
        ijk = (points - origin) @ inv.T
        return map_coordinates(arr, [ijk[:, 2], ijk[:, 1], ijk[:, 0]], order=1, mode="nearest")
    return read


def _grid_sampler(native: Sampler, centre: np.ndarray, axes: np.ndarray, step: float = 1.5,
                  half: float = 20.0, phase: float = 0.0) -> Sampler:
    """``native`` resampled on a ``step`` mm grid (anatomy axes ``axes``, columns) around
    ``centre``, then read linearly: what a crop grid keeps."""
    from scipy.ndimage import map_coordinates

    ticks = np.arange(-half, half + 1e-6, step)
    offsets = np.stack(np.meshgrid(ticks, ticks, ticks, indexing="ij"), -1).reshape(-1, 3)
    offsets = offsets + phase * step
    n = len(ticks)
    values = native(centre + offsets @ axes.T).reshape(n, n, n)

    def read(points: np.ndarray) -> np.ndarray:
        q = (points - centre) @ axes
        idx = (q - phase * step - ticks[0]) / step
        return map_coordinates(values, [idx[:, 0], idx[:, 1], idx[:, 2]], order=1,
                               mode="nearest")
    return read


def _contrast(read: Sampler, points: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Gap contrast (n,) at each point (see the module docstring)."""
    profile = np.stack([read(points + t * normal) for t in OFFSETS_MM], axis=1)
    near = np.abs(OFFSETS_MM) < 1.5
    far = (np.abs(OFFSETS_MM) > 2.5) & (np.abs(OFFSETS_MM) < 4.0)
    base = profile[:, far].mean(axis=1)
    return 1.0 - profile[:, near].min(axis=1) / np.maximum(base, 1.0)


def _cortex_points(label: Any, read: Sampler, centre: np.ndarray, normal: np.ndarray
                   ) -> np.ndarray:
    """Fibula points (LPS mm) on the plane, within 7 mm of its centre, with bone 3 mm away
    on both sides."""
    kji = np.argwhere(np.asarray(label.array) == 2)
    scale = np.asarray(label.direction, float).reshape(3, 3) * np.asarray(label.spacing)[None]
    pts = np.asarray(label.origin, float) + kji[:, ::-1] @ scale.T
    dist = (pts - centre) @ normal
    on_plane = pts - np.outer(dist, normal)
    keep = (np.abs(dist) < 1.0) & (np.linalg.norm(on_plane - centre, axis=1) < 7.0)
    pts = on_plane[keep]
    if not len(pts):
        return pts
    both = np.minimum(read(pts + 3.0 * normal), read(pts - 3.0 * normal))
    return pts[both > 700.0]


def measure_case(root: Path, case: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The case's row, or None when it has no fibular fracture."""
    from AnkleFractureLib.io.files import read_image

    meta = case.get("meta") or {}
    frac = meta.get("fracture")
    if not frac:
        return None
    axes = np.asarray(meta["anatomy_to_patient"], float)[:3, :3]
    centre = np.asarray(frac["centre_lps"], float)
    normal = axes @ np.asarray(frac["normal_anatomical"], float)
    normal /= np.linalg.norm(normal)
    native = _sampler(read_image(root / case["image"]))
    points = _cortex_points(read_image(root / case["segmentation"]), native, centre, normal)
    look = meta.get("appearance") or {}  # the analytic family records none (one kernel, no metal)
    row = {"id": case["id"], "weber": frac.get("weber"), "height_mm": round(frac["height_mm"], 1),
           "gap_mm": frac.get("gap_mm"), "displacement_mm": frac.get("displacement_mm"),
           "slice_mm": meta["grid"]["spacing"][2], "kernel": look.get("kernel"),
           "metal": look.get("metal"), "cortex_points": int(len(points))}
    if len(points) >= 5:
        row["native"] = round(float(np.median(_contrast(native, points, normal))), 3)
        per_phase = [float(np.median(_contrast(_grid_sampler(native, centre, axes, phase=ph),
                                               points, normal))) for ph in PHASES]
        row["grid_1_5mm"] = round(float(np.mean(per_phase)), 3)
        row["grid_1_5mm_range"] = [round(min(per_phase), 3), round(max(per_phase), 3)]
    return row


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dataset", type=Path, help="phantom dataset folder (dataset.json)")
    p.add_argument("--evaluation", type=Path, help="evaluate-fracture JSON of the same set")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = p.parse_args(argv)
    cases = json.loads((args.dataset / "dataset.json").read_text())["cases"]
    answers = {}
    if args.evaluation:
        answers = {c["id"]: c for c in json.loads(args.evaluation.read_text())["cases"]}
    rows = []
    for case in cases:
        row = measure_case(args.dataset, case)
        if row is None:
            continue
        got = answers.get(case["id"])
        if got:
            row.update(found=bool(got.get("found")), answer=got.get("predicted"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"command": "python scripts/hairline_visibility.py " + " ".join(argv or sys.argv[1:]),
           "dataset": str(args.dataset), "cases": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
