#!/usr/bin/env python
"""Preview figures of the real-shape ("vh") phantom family -> docs/phantom/vh_*.png.

Usage:
    .venv/bin/python scripts/vh_phantom_figure.py [--out docs/phantom]

One PNG per listed case (seed, class, side), drawn by AnkleFractureLib.phantom.preview:
axial slices at +40, +5 and -10 mm and a coronal slice through the fibula, bone and soft-tissue
windows, tibia / fibula label outlines.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from AnkleFractureLib.phantom.generator import generate_case
from AnkleFractureLib.phantom.preview import write_preview

#: (seed, Weber class, side): seed 37 carries a fibular plate, seed 7 a cast, seed 3 the foot.
CASES = ((3, "C", "right"), (37, "A", "right"), (7, "C", "right"), (2, "B", "left"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs/phantom"))
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for seed, weber, side in CASES:
        case = generate_case(seed, weber, side, "fast", family="vh")
        path = Path(args.out, f"vh_seed{seed}_weber_{weber}_{side}.png")
        write_preview(case, str(path))
        look = case.info["appearance"]
        print(f"{path}: metal {look['metal']}, cast {look['cast']}, kernel {look['kernel']}, "
              f"field of view {case.info['fov_mm']} mm")


if __name__ == "__main__":
    main()
