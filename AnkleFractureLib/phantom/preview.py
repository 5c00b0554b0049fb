"""PNG preview of a phantom case: upright axial and coronal slices with label outlines.

The case may be rotated and stored with any direction matrix, so the slices are resampled in
an upright "display" frame: the anatomical frame of the case with the left/right mirror undone
(a left ankle shows as a left ankle). Display axes are LPS-like in mm: axial panels have x
(patient left) to the right and anterior at the top (radiological convention); the coronal
panel has superior at the top.
"""

from __future__ import annotations

import os
import tempfile
from typing import Tuple

import numpy as np
from scipy import ndimage

from AnkleFractureLib.phantom.generator import PhantomCase

#: Axial preview heights relative to the plafond (mm): above, at and below the joint.
AXIAL_LEVELS_MM = (40.0, 5.0, -10.0)


def _sample(case: PhantomCase, pts_display: np.ndarray, shape: Tuple[int, int]):
    """CT (order 1) and label (nearest) at display-frame points (N, 3) in mm."""
    a2p = np.asarray(case.info["anatomy_to_patient"], dtype=float)
    mirror = np.diag([-1.0, 1.0, 1.0]) if case.info["side"] == "left" else np.eye(3)
    anat = pts_display @ mirror.T
    lps = anat @ a2p[:3, :3].T + a2p[:3, 3]
    ijk = case.ct.physical_to_index(lps)
    coords = ijk[:, ::-1].T  # (k, j, i) = numpy (z, y, x) axes
    ct = ndimage.map_coordinates(case.ct.array.astype(np.float32), coords, order=1,
                                 mode="constant", cval=-1024.0).reshape(shape)
    lab = ndimage.map_coordinates(case.label.array, coords, order=0, mode="constant",
                                  cval=0).reshape(shape)
    return ct, lab


def write_preview(case: PhantomCase, path: str) -> None:
    """Write a PNG with axial slices at +40, +5 and -10 mm and a coronal slice through the fibula.

    Top row: bone window (W 1800, L 400) with tibia (orange) and fibula (cyan) outlines and the
    fibular fracture centre (red cross); bottom row: soft-tissue window (W 400, L 40).
    The file is written atomically (temporary file in the same folder, then ``os.replace``).

    Args:
        case: A generated case.
        path: Output ``.png`` path; its folder must exist.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    info = case.info
    step = 0.4
    xs = np.arange(-70.0, 70.0 + step, step)
    ys = np.arange(-65.0, 75.0 + step, step)
    zs = np.arange(-55.0, 135.0 + step, step)
    sign = -1.0 if info["side"] == "left" else 1.0  # display x of an anatomical x
    frac = info.get("fracture")
    panels = []
    for zl in AXIAL_LEVELS_MM:
        gy, gx = np.meshgrid(ys, xs, indexing="ij")
        pts = np.stack([gx.ravel(), gy.ravel(), np.full(gx.size, zl)], axis=1)
        ct, lab = _sample(case, pts, gx.shape)
        panels.append((f"axial z = {zl:+.0f} mm", ct, lab, (xs[0], xs[-1], ys[-1], ys[0]), None,
                       (xs, ys)))
    # Mortise-like coronal plane: vertical, through the fibula and the medial malleolus.
    an = info["anatomy"]
    p0 = np.array([an["fib_x0"], an["fib_y0"]])
    p1 = np.array([an["tib_meta_rx"] - an["mm_rx"], an["mm_cy"]])
    u = (p1 - p0) / np.linalg.norm(p1 - p0)
    mid = 0.5 * (p0 + p1)
    ss = xs  # position along the plane (mm); patient left to the right, like the axials
    gz, gs = np.meshgrid(zs[::-1], ss, indexing="ij")
    ax_ = mid[0] + sign * gs.ravel() * u[0]  # anatomical x, y of the plane points
    ay_ = mid[1] + sign * gs.ravel() * u[1]
    pts = np.stack([sign * ax_, ay_, gz.ravel()], axis=1)  # display frame
    ct, lab = _sample(case, pts, gz.shape)
    mark = None
    if frac:
        c = np.asarray(frac["centre_anatomical"])
        mark = (sign * float((c[:2] - mid) @ u), float(c[2]))
    panels.append(("mortise-view coronal (through both malleoli)", ct, lab,
                   (ss[0], ss[-1], zs[0], zs[-1]), mark, (ss, zs[::-1])))

    fig, axes = plt.subplots(2, 4, figsize=(17, 9.5),
                             gridspec_kw={"width_ratios": [1, 1, 1, 1.1]})
    for col, (title, ct, lab, extent, mark, (xx, yy)) in enumerate(panels):
        for row, (lo, hi) in enumerate(((-500.0, 1300.0), (-160.0, 240.0))):
            ax = axes[row, col]
            ax.imshow(ct, cmap="gray", vmin=lo, vmax=hi, extent=extent, interpolation="bilinear")
            if row == 0:
                for value, colour in ((1, "orange"), (2, "cyan")):
                    m = (lab == value).astype(float)
                    if m.any():
                        ax.contour(xx, yy, m, levels=[0.5], colors=colour, linewidths=0.8)
                if mark is not None:
                    ax.plot(*mark, "r+", markersize=12, markeredgewidth=1.5)
            ax.set_title(title + (" (bone window)" if row == 0 else " (soft tissue)"), fontsize=9)
            ax.tick_params(labelsize=7)
    g = info.get("grid", {})
    size = "x".join(str(v) for v in g.get("size", []))
    sp = "x".join(f"{v:.2f}" for v in g.get("spacing", []))
    text = (f"phantom seed {info['seed']} | Weber {info['weber']} | {info['side']} ankle | "
            f"{info['spacing_mode']} grid {size} @ {sp} mm ({g.get('direction_kind', '?')} direction)")
    if frac:
        text += (f"\nfibular fracture {frac['height_mm']:+.1f} mm from plafond, gap "
                 f"{frac['gap_mm']:.1f} mm, displacement {frac['displacement_mm']:.1f} mm, "
                 f"rotation {frac['rotation_deg']:.1f} deg"
                 + (", + medial malleolus fracture" if frac["medial_malleolus_fracture"] else ""))
    fig.suptitle(text + "\norange = tibia (1), cyan = fibula (2); axial: anterior up, "
                 "patient left to the right", fontsize=10)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=folder)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=80, format="png")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a preview is meant to be shared
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
