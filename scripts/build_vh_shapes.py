#!/usr/bin/env python
"""Rebuild Resources/Phantom/vh_shapes.npz from the Visible Human bone surfaces.

Usage:
    .venv/bin/python scripts/build_vh_shapes.py [../shared/data/vh_bone_surfaces] [--out PATH]

The meshes (CC BY 4.0) are not in this repository; see AnkleFractureLib/phantom/shapes.py for
the credit and what is derived from them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from AnkleFractureLib.phantom.shapes import build_vh_library, save_library

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", default=str(ROOT.parent / "shared/data/vh_bone_surfaces"))
    ap.add_argument("--out", default=str(ROOT / "Resources/Phantom/vh_shapes.npz"))
    ap.add_argument("--step", type=float, default=1.0, help="stored voxel size, mm")
    args = ap.parse_args()
    t0 = time.time()
    shapes = build_vh_library(args.folder, args.step)
    save_library(args.out, shapes)
    for s in shapes:
        print(s.name, {b: g.sdf.shape for b, g in s.bones.items()})
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB) in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
