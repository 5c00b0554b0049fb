#!/usr/bin/env python
"""Build the healthy right-ankle template (reproducibly: same arguments -> identical bytes).

Examples::

    # the shipped template (healthy phantom, seed 186 = the most typical anatomy of seeds 0-299)
    python scripts/build_template.py --out Resources/Templates/healthy_right_ankle \
        --preview docs/template/template.png
    # the mean of the real-shape (vh) phantom family (Visible Human bone surfaces, CC BY 4.0)
    python scripts/build_template.py --source vh --out Resources/Templates/healthy_right_ankle_vh \
        --preview docs/template/template_vh.png
    # a hospital's own template from the healthy cases of a dataset in the project layout
    python scripts/build_template.py --dataset data/hospital --out my_template

With ``--dataset``, every case with ``weber == "none"``, a segmentation and a side is used; the
cases are registered to the first one with the team's similarity ICP, and the result is
oriented on the shipped template (``--reference``, default the shipped one) so its
syndesmosis box keeps its meaning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from AnkleFractureLib.errors import AnkleFractureError  # noqa: E402
from AnkleFractureLib.registration.template import (  # noqa: E402
    TEMPLATE_SEED, VH_TEMPLATE_CASES, Template, build_template_from_cases,
    build_template_from_phantom, build_template_from_vh, load_template, save_template)


def typical_seeds(n: int = 300, top: int = 5) -> List[int]:
    """Seeds 0..n-1 ranked by how close their anatomy is to the population mean.

    Score: RMS over the geometric anatomy parameters (HU values excluded) of the z-score
    against the empirical mean/std over the n seeds. Used to choose :data:`TEMPLATE_SEED`.
    """
    from AnkleFractureLib.phantom.generator import plan_grid

    rows = []
    names = None
    for s in range(n):
        p = plan_grid(s, "right", "fast")[0].p.to_dict()
        if names is None:
            names = [k for k in p if not k.endswith("_hu") and k != "trab_amp"]
        rows.append([p[k] for k in names])
    x = np.asarray(rows)
    z = (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-9)
    score = np.sqrt((z ** 2).mean(axis=1))
    return [int(i) for i in np.argsort(score)[:top]]


def build_from_dataset(root: Path, reference: Optional[Template]) -> Template:
    """Template from the healthy segmented cases of a dataset folder."""
    from AnkleFractureLib.dataset.layout import Dataset
    from AnkleFractureLib.io import read_image

    ds = Dataset.load(root)
    cases = [c for c in ds if c.weber == "none" and c.segmentation and c.side]
    if not cases:
        raise AnkleFractureError(f"{root}: no healthy (weber 'none') case with a segmentation "
                                 "and a side")
    labels = [read_image(ds.path(c.segmentation)) for c in cases]
    labels = [v.with_array(v.array.astype(np.uint8)) for v in labels]
    return build_template_from_cases(labels, [c.side for c in cases], reference=reference,
                                     case_ids=[c.id for c in cases])


def write_preview(template: Template, path: Path) -> None:
    """Coronal (through the fibula) and axial (syndesmosis level) slices with the box drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from AnkleFractureLib.io import atomic_output

    lab = template.labels
    arr = lab.array
    ox, oy, oz = lab.origin
    sx, sy, sz = lab.spacing
    nz, ny, nx = arr.shape
    lo = template.box.corners().min(axis=0)
    hi = template.box.corners().max(axis=0)
    fib = lab.index_to_physical(np.argwhere(arr == 2)[:, ::-1])
    y_cut = float(np.median(fib[(fib[:, 2] > -5) & (fib[:, 2] < 30), 1]))
    j = int(round((y_cut - oy) / sy))
    z_cut = 10.0
    k = int(round((z_cut - oz) / sz))
    ext_xz = [ox - sx / 2, ox + (nx - 0.5) * sx, oz - sz / 2, oz + (nz - 0.5) * sz]
    ext_xy = [ox - sx / 2, ox + (nx - 0.5) * sx, oy - sy / 2, oy + (ny - 0.5) * sy]
    fig, axes = plt.subplots(1, 2, figsize=(10, 6), gridspec_kw={"width_ratios": [1, 1]})
    ax = axes[0]
    ax.imshow(arr[:, j, :], origin="lower", extent=ext_xz, cmap="viridis", vmin=0, vmax=2)
    ax.add_patch(Rectangle((lo[0], lo[2]), hi[0] - lo[0], hi[2] - lo[2], fill=False,
                           edgecolor="red", lw=2))
    for zz, name in ((-20.0, "A"), (0.0, "B"), (25.0, ""), (35.0, "C"), (100.0, "")):
        ax.axhline(zz, color="white", lw=0.5, ls="--")
    ax.plot([0], [0], "r+", ms=12)
    ax.set_xlim(min(ext_xz[0], lo[0]) - 5, max(ext_xz[1], hi[0]) + 5)
    ax.set_ylim(min(ext_xz[2], lo[2]) - 5, max(ext_xz[3], hi[2]) + 5)
    ax.set_title(f"coronal y = {y_cut:.0f} mm (x: medial +, z: superior +)")
    ax.set_xlabel("x mm (template)")
    ax.set_ylabel("z mm")
    ax = axes[1]
    ax.imshow(arr[k], origin="lower", extent=ext_xy, cmap="viridis", vmin=0, vmax=2)
    ax.add_patch(Rectangle((lo[0], lo[1]), hi[0] - lo[0], hi[1] - lo[1], fill=False,
                           edgecolor="red", lw=2))
    ax.set_xlim(min(ext_xy[0], lo[0]) - 5, max(ext_xy[1], hi[0]) + 5)
    ax.set_ylim(min(ext_xy[2], lo[1]) - 5, max(ext_xy[3], hi[1]) + 5)
    ax.set_title(f"axial z = {z_cut:.0f} mm (y: posterior +)")
    ax.set_xlabel("x mm")
    ax.set_ylabel("y mm")
    built = template.meta.get("built_from")
    src = (f"phantom seed {template.meta.get('phantom_seed')}" if built == "phantom"
           else f"mean of {template.meta.get('n_cases')} vh anatomies" if built == "vh_mean"
           else f"{template.meta.get('n_cases')} cases")
    fig.suptitle(f"Healthy right-ankle template ({src}); red: syndesmosis box; dashed lines: "
                 "Weber A (-20..-3), B (0..25), C (35..100 mm)", fontsize=9)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png", metadata={"Software": None})
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", required=True, type=Path, help="output template folder")
    ap.add_argument("--seed", type=int, default=TEMPLATE_SEED,
                    help=f"phantom seed (default {TEMPLATE_SEED}, the most typical anatomy)")
    ap.add_argument("--source", choices=("phantom", "vh"), default="phantom",
                    help="phantom: one analytic phantom (--seed); vh: the mean of "
                         "--n-cases healthy anatomies of the real-shape family")
    ap.add_argument("--n-cases", type=int, default=VH_TEMPLATE_CASES,
                    help=f"anatomies averaged with --source vh (default {VH_TEMPLATE_CASES})")
    ap.add_argument("--dataset", type=Path, default=None,
                    help="build from the healthy segmented cases of this dataset instead")
    ap.add_argument("--reference", type=Path, default=None,
                    help="template whose frame and box a --dataset build adopts "
                         "(default: the shipped template)")
    ap.add_argument("--preview", type=Path, default=None, help="also write a PNG preview here")
    ap.add_argument("--rank-seeds", action="store_true",
                    help="print the 5 most typical phantom seeds of 0-299 and exit")
    args = ap.parse_args(argv)
    try:
        if args.rank_seeds:
            print(" ".join(str(s) for s in typical_seeds()))
            return 0
        if args.dataset is not None:
            reference = load_template(args.reference)
            template = build_from_dataset(args.dataset, reference)
        elif args.source == "vh":
            template = build_template_from_vh(args.n_cases)
        else:
            template = build_template_from_phantom(args.seed)
        save_template(template, args.out)
        if args.preview is not None:
            write_preview(template, args.preview)
    except AnkleFractureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"template written to {args.out} ({template.labels.shape} voxels (z, y, x), "
          f"{len(template.points)} surface points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
