"""Preview of the segmentation training's domain randomisation: docs/seg_randomise_examples.png.

Usage: .venv/bin/python scripts/seg_randomise_figure.py [--out docs/seg_randomise_examples.png]
       [--level full] [--draws 7] [--seed 1]

One phantom case is prepared as training prepares it (1 mm grid, HU window [-1000, 2000]); an
80^3 patch centred on the distal tibia is shown as it is (first column) and under ``--draws``
random appearances (:func:`~AnkleFractureLib.training.seg_randomise.randomise_patch`). Top
row: axial slice; bottom row: coronal slice; the label (tibia red, fibula cyan) is outlined,
so a field-of-view cut shows as a cut in both. Column titles list the components applied.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from AnkleFractureLib.training.seg_randomise import (apply_randomisation,  # noqa: E402
                                                     draw_randomisation, randomise_config)

SHORT = {"remap": "remap", "blobs": "blobs", "bias": "bias", "lowres": "thick",
         "blur": "blur", "streaks": "streaks", "noise": "noise", "sharpen": "sharp",
         "gamma": "gamma", "fov": "FOV"}


def phantom_patch(size: int = 80, seed: int = 3) -> Tuple[np.ndarray, np.ndarray]:
    """(image float32 normalised (z, y, x), label uint8 (z, y, x)) of a prepared phantom,
    ``size``^3, centred 15 mm above the tibia's lowest voxel (the distal tibia and fibula)."""
    from AnkleFractureLib.phantom import generate_case
    from AnkleFractureLib.segmentation.plans import SegPlans
    from AnkleFractureLib.segmentation.preprocess import prepare_case
    from AnkleFractureLib.training.seg_data import crop_padded

    case = generate_case(seed, weber="B", side="right", spacing="fast")
    image, label = prepare_case(case.ct, case.label, SegPlans())
    tib = np.argwhere(label.array == 1)
    centre = tib.mean(axis=0)
    # Canonical z runs inferior -> superior (LPS +z): the lowest tibia slice is the plafond.
    centre[0] = tib[:, 0].min() + 15
    start = [int(c) - size // 2 for c in centre]
    return (crop_padded(image.array.astype(np.float32), start, (size,) * 3, 0.0),
            crop_padded(label.array, start, (size,) * 3, 0))


def _show(ax, img2d: np.ndarray, lab2d: np.ndarray, title: str = "") -> None:
    ax.imshow(img2d, cmap="gray", vmin=0.0, vmax=1.0, origin="lower", interpolation="nearest")
    for value, colour in ((1, "red"), (2, "cyan")):
        if (lab2d == value).any():
            ax.contour(lab2d == value, levels=[0.5], colors=colour, linewidths=0.6,
                       origin="lower")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/seg_randomise_examples.png")
    ap.add_argument("--level", default="full", help="light or full (default full)")
    ap.add_argument("--draws", type=int, default=7)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, label = phantom_patch()
    cfg = randomise_config(args.level)
    rng = np.random.default_rng(args.seed)
    columns = [("phantom (as is)", image, label)]
    for _ in range(args.draws):
        params = draw_randomisation(rng, cfg, image.shape)
        img, lab = apply_randomisation(image, label, params, cfg)
        columns.append((", ".join(SHORT[k] for k in params) or "(nothing)", img, lab))
    z, y = image.shape[0] // 2, image.shape[1] // 2
    fig, axes = plt.subplots(2, len(columns), figsize=(2.0 * len(columns), 4.3), dpi=130)
    for col, (title, img, lab) in enumerate(columns):
        _show(axes[0, col], img[z], lab[z], title)
        _show(axes[1, col], img[:, y, :], lab[:, y, :])
    axes[0, 0].set_ylabel("axial", fontsize=8)
    axes[1, 0].set_ylabel("coronal", fontsize=8)
    fig.suptitle(f"Domain randomisation of 80^3 training patches (level '{args.level}', "
                 f"seed {args.seed}); red tibia, cyan fibula", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
