"""scripts/hairline_visibility.py: a hairline gap through a cortical tube is seen in the CT
and mostly lost on a 1.5 mm grid; a wide gap is seen on both."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.io.files import write_image

ROOT = Path(__file__).resolve().parents[1]


def _measure():
    """scripts/hairline_visibility.py's measure_case (the script is not a package module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hairline_visibility",
                                                  ROOT / "scripts" / "hairline_visibility.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.measure_case


def _tube_case(root: Path, name: str, gap_mm: float) -> dict:
    """A 0.5 mm CT of a vertical cortical tube (fibula label) with a transverse gap at z = 0."""
    sp = 0.5
    n = 81  # a voxel plane at z = 0
    ax = (np.arange(n) - (n - 1) / 2.0) * sp
    z, y, x = np.meshgrid(ax, ax, ax, indexing="ij")
    r = np.hypot(x, y)
    ct = np.where(r < 6.0, np.where(r > 4.0, 1600.0, 200.0), 0.0).astype(np.float32)
    ct[(np.abs(z) <= gap_mm / 2.0 - sp / 2.0 + 1e-6) & (r < 6.0)] = 0.0  # planes inside the gap
    label = (r < 6.0).astype(np.uint8) * 2
    origin = (ax[0], ax[0], ax[0])
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    write_image(Volume(ct, (sp, sp, sp), origin), root / "images" / f"{name}.nii.gz")
    write_image(Volume(label, (sp, sp, sp), origin), root / "labels" / f"{name}.nii.gz")
    return {"id": name, "image": f"images/{name}.nii.gz", "segmentation": f"labels/{name}.nii.gz",
            "meta": {"anatomy_to_patient": np.eye(4).tolist(),
                     "grid": {"spacing": [sp, sp, sp]}, "appearance": {"kernel": "bone"},
                     "fracture": {"centre_lps": [5.0, 0.0, 0.0], "normal_anatomical": [0, 0, 1],
                                  "height_mm": 40.0, "weber": "C", "gap_mm": gap_mm}}}


def test_a_hairline_is_seen_in_the_ct_and_mostly_lost_on_the_1_5_mm_grid(tmp_path) -> None:
    measure = _measure()
    hair = measure(tmp_path, _tube_case(tmp_path, "hair", 0.5))
    wide = measure(tmp_path, _tube_case(tmp_path, "wide", 3.0))
    assert hair["cortex_points"] >= 5 and wide["cortex_points"] >= 5
    assert hair["native"] > 0.5  # the CT holds the gap
    assert hair["grid_1_5mm"] < 0.5 * hair["native"]  # the grid keeps less than half of it
    assert wide["native"] > 0.9 and wide["grid_1_5mm"] > 0.8  # a wide gap survives
    lo, hi = hair["grid_1_5mm_range"]
    assert lo <= hair["grid_1_5mm"] <= hi
    json.dumps(hair)  # a row is plain JSON
