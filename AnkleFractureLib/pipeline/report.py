"""The one-page ``report.png``: what a surgeon needs to see of one run, at a glance.

Layout (landscape, 12 x 6.5 in): an axial and a coronal CT slice through the fibula in a bone
window with the tibia (orange) and fibula (cyan) outlines and the Grad-CAM heatmap; the four
Danis-Weber probabilities as bars (or a "No classification" box when the answer was withheld or
refused); a text panel with the side, the registration error, the segmentation's label-free
agreement with the CT's bone, the uncertainty, every warning and the run time; the footer
"Research software - not for clinical use".

Orientation (radiological convention, derived from the direction matrix, never from the array
axes): the index axes are matched to the LPS physical axes as
:func:`~AnkleFractureLib.preprocessing.orientation.to_canonical` does, but with *views*
(transpose and reversed strides), so nothing is copied or resampled. On the canonical view,
axis x runs towards the patient's left, y posterior, z superior, so

* axial slice ``view[k]``: rows anterior -> posterior (anterior up), columns patient right ->
  left (patient's right on the image left);
* coronal slice ``view[::-1, j]``: rows superior -> inferior (superior up), columns patient
  right -> left.

An oblique residual rotation of the grid is shown as is (the letters are then approximate).
Only 2D slices are converted to float; the few full-volume passes (the heatmap's profile along
the leg, the bones' bounding boxes) read the arrays in place.

Example:
    >>> import numpy as np
    >>> from AnkleFractureLib.geometry.volume import Volume
    >>> ct = Volume(np.zeros((2, 3, 4), np.int16), direction=np.diag([-1.0, 1.0, 1.0]))
    >>> ct.array[0, 0, 0] = 1000            # index i = 0 lies at the patient's left (x = 0 max)
    >>> axial_slice_display(ct, 0)[0].tolist()
    [0.0, 0.0, 0.0, 1000.0]
"""

from __future__ import annotations

import os
import textwrap
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.io.atomic import atomic_output
from AnkleFractureLib.segmentation.quality import describe_agreement

#: Bone window (HU) of the CT panels: W 1500 / L 550.
BONE_WINDOW_HU = (-200.0, 1300.0)
#: Grad-CAM values below this are not drawn (the colour would only veil the bone).
GRADCAM_THRESHOLD = 0.2
#: Most opaque the heatmap gets (at a value of 1).
GRADCAM_MAX_ALPHA = 0.6
#: Outline colours of the label values 1 (tibia) and 2 (fibula).
BONE_COLOURS = {1: ("tibia", "#ff9f1c"), 2: ("fibula", "#2ec4f0")}
#: Classes in display order with their plain names.
CLASS_NAMES = (("none", "No fracture"), ("A", "Weber A"), ("B", "Weber B"), ("C", "Weber C"))
FOOTER = "Research software - not for clinical use"
FIGSIZE_IN = (12.0, 6.5)
#: Margin (mm) around the bones when the CT panels zoom onto them.
ZOOM_MARGIN_MM = 25.0
#: Height (mm) of the coronal panel's window above the lowest bone point.
CORONAL_HEIGHT_MM = 150.0
#: Label maps bigger than this are subsampled to find the bones' bounding boxes (speed).
_BOX_VOXELS = 12_000_000


# --------------------------------------------------------------------------------- orientation
@dataclass(frozen=True)
class _Canonical:
    """How to view a (z, y, x) array of a grid in canonical LPS order, without copying.

    Attributes:
        axes: ``axes[c]`` is the original numpy axis shown as canonical numpy axis ``c``
            (0 = z superior, 1 = y posterior, 2 = x patient left).
        flips: ``flips[c]`` is True when canonical numpy axis ``c`` runs against the original.
        shape: Canonical array shape (nz, ny, nx).
        spacing_zyx: Voxel size (mm) along the canonical numpy axes.
    """

    axes: Tuple[int, int, int]
    flips: Tuple[bool, bool, bool]
    shape: Tuple[int, int, int]
    spacing_zyx: Tuple[float, float, float]

    def view(self, array: np.ndarray) -> np.ndarray:
        """The canonical view of ``array`` (a numpy view: transpose and negative strides)."""
        v = array.transpose(self.axes)
        return v[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]

    def index(self, original_zyx: Sequence[int]) -> Tuple[int, int, int]:
        """Canonical (z, y, x) index of an original numpy (z, y, x) index."""
        out = []
        for c in range(3):
            v = int(original_zyx[self.axes[c]])
            out.append(self.shape[c] - 1 - v if self.flips[c] else v)
        return tuple(out)  # type: ignore[return-value]

    def span(self, original: Tuple[slice, slice, slice]) -> List[Tuple[int, int]]:
        """Canonical inclusive index ranges (lo, hi) per canonical axis of an original box."""
        out = []
        for c in range(3):
            s = original[self.axes[c]]
            lo, hi = int(s.start), int(s.stop) - 1
            if self.flips[c]:
                lo, hi = self.shape[c] - 1 - hi, self.shape[c] - 1 - lo
            out.append((lo, hi))
        return out


def _canonical(volume: Volume) -> _Canonical:
    """Match the index axes to the LPS axes as :func:`to_canonical` does (same assignment)."""
    from AnkleFractureLib.preprocessing.orientation import physical_axis_of_index

    d = volume.direction
    # physical axis (0 x, 1 y, 2 z) of ITK index axis (0 i, 1 j, 2 k)
    phys_of_index = list(physical_axis_of_index(d))
    index_of_phys = [phys_of_index.index(p) for p in range(3)]
    axes: List[int] = []
    flips: List[bool] = []
    shape: List[int] = []
    spacing: List[float] = []
    for c in range(3):  # canonical numpy axis c shows physical axis 2 - c
        a = index_of_phys[2 - c]
        axes.append(2 - a)  # ITK index axis a is numpy axis 2 - a
        flips.append(bool(d[2 - c, a] < 0))
        shape.append(volume.array.shape[2 - a])
        spacing.append(float(volume.spacing[a]))
    return _Canonical((axes[0], axes[1], axes[2]), (flips[0], flips[1], flips[2]),
                      (shape[0], shape[1], shape[2]), (spacing[0], spacing[1], spacing[2]))


def axial_slice_display(volume: Volume, k: int) -> np.ndarray:
    """The axial slice ``k`` (canonical, counted from inferior) as it is displayed.

    Args:
        volume: Any Volume (any direction matrix).
        k: Slice index along the canonical superior axis (0 = most inferior slice).

    Returns:
        float32 (ny, nx): row 0 is the most anterior row, column 0 the patient's rightmost
        column (radiological convention). Values unchanged.
    """
    frame = _canonical(volume)
    return np.asarray(frame.view(volume.array)[int(k)], dtype=np.float32)


def coronal_slice_display(volume: Volume, j: int) -> np.ndarray:
    """The coronal slice ``j`` (canonical, counted from anterior) as it is displayed.

    Args:
        volume: Any Volume (any direction matrix).
        j: Slice index along the canonical posterior axis (0 = most anterior slice).

    Returns:
        float32 (nz, nx): row 0 is the most superior row, column 0 the patient's rightmost
        column. Values unchanged.
    """
    frame = _canonical(volume)
    return np.asarray(frame.view(volume.array)[::-1, int(j), :], dtype=np.float32)


# --------------------------------------------------------------------------------- slice choice
@dataclass
class _Planes:
    """Where the two CT panels cut, in canonical indices, and why (for the panel titles)."""

    k: int
    j: int
    axial_reason: str
    coronal_reason: str
    #: Canonical inclusive index box (z, y, x) of the bones, or None without a label.
    bones: Optional[List[Tuple[int, int]]] = None


def _on_grid(volume: Optional[Volume], ct: Volume) -> bool:
    return volume is not None and volume.array.shape == ct.array.shape and ct.same_geometry(
        volume, atol=1e-3)


@dataclass(frozen=True)
class _HeatOnGrid:
    """A heatmap on the CT's grid or on a sub-box of its lattice, read as if it covered the
    whole grid (0 outside its box) without building that grid: pasting a Grad-CAM box of a
    clinical CT onto the whole grid cost 0.5-0.7 s of fresh memory for two slices.

    Attributes:
        array: The heatmap's values (z, y, x) on its box.
        sub: Numpy index slices (z, y, x) of the CT that the box covers.
        shape: The CT's array shape (z, y, x).
    """

    array: np.ndarray
    sub: Tuple[slice, slice, slice]
    shape: Tuple[int, int, int]

    @classmethod
    def of(cls, heat: Volume, ct: Volume) -> Optional["_HeatOnGrid"]:
        """The heatmap where it lies on ``ct``'s grid, or None when it is off its lattice."""
        if _on_grid(heat, ct):
            return cls(heat.array, tuple(slice(0, n) for n in ct.array.shape),
                       tuple(ct.array.shape))
        from AnkleFractureLib.crop.syndesmosis import box_on_grid

        sub = box_on_grid(heat, ct)
        return None if sub is None else cls(heat.array, sub, tuple(ct.array.shape))

    def slab(self, frame: _Canonical, c: int, index: int) -> np.ndarray:
        """The canonical view (3-D, float32) of the one-voxel slab at canonical ``index``
        along canonical axis ``c``, the whole grid wide (axis ``c`` of length 1)."""
        axis = frame.axes[c]
        i = frame.shape[c] - 1 - int(index) if frame.flips[c] else int(index)
        shape = list(self.shape)
        shape[axis] = 1
        out = np.zeros(shape, np.float32)
        s = self.sub[axis]
        if s.start <= i < s.stop:
            take = [slice(None)] * 3
            take[axis] = slice(i - s.start, i - s.start + 1)
            put = list(self.sub)
            put[axis] = slice(0, 1)
            out[tuple(put)] = self.array[tuple(take)]
        return frame.view(out)

    def axial(self, frame: _Canonical, k: int) -> np.ndarray:
        """Canonical axial slice ``k`` (ny, nx), as ``frame.view(full)[k]``."""
        return self.slab(frame, 0, k)[0]

    def coronal(self, frame: _Canonical, j: int) -> np.ndarray:
        """Canonical coronal slice ``j`` (nz, nx), superior row first, as
        ``frame.view(full)[::-1, j, :]``."""
        return self.slab(frame, 1, j)[::-1, 0, :]


def _heat_peak_k(heat: _HeatOnGrid, frame: _Canonical) -> Optional[int]:
    """Canonical axial index of the heatmap's peak along the leg, or None for an empty map."""
    z_axis = frame.axes[0]
    others = tuple(a for a in range(3) if a != z_axis)
    if heat.array.dtype.kind == "f":
        with warnings.catch_warnings():  # an all-NaN slice is simply empty here
            warnings.simplefilter("ignore", RuntimeWarning)
            inside = np.nanmax(heat.array, axis=others)
    else:
        inside = heat.array.max(axis=others)
    profile = np.zeros(heat.shape[z_axis], np.float64)  # 0 outside the heatmap's box
    profile[heat.sub[z_axis]] = np.nan_to_num(np.asarray(inside, dtype=np.float64), nan=0.0)
    if frame.flips[0]:
        profile = profile[::-1]
    top = float(profile.max()) if profile.size else 0.0
    if not top > 0:
        return None
    # The middle of the plateau: an upsampled coarse map has flat maxima over several slices.
    near = np.flatnonzero(profile >= 0.98 * top)
    return int(near[len(near) // 2])


def _choose_planes(ct: Volume, label: Optional[Volume], heat: Optional[_HeatOnGrid],
                   frame: _Canonical) -> _Planes:
    from scipy import ndimage

    nz, ny, nx = frame.shape
    sz = frame.spacing_zyx[0]
    boxes: Dict[int, List[Tuple[int, int]]] = {}
    if label is not None:
        # Bounding boxes on a strided subsample of a big label map (bones are many voxels
        # thick; a box one step too small only moves the zoom by a voxel), then widened back.
        lab = label.array
        step = max(1, int(np.ceil((lab.size / _BOX_VOXELS) ** (1.0 / 3.0))))
        sub = lab[::step, ::step, ::step]
        if sub.dtype.kind not in "iu":  # find_objects needs integers (bool / float maps)
            sub = sub.astype(np.int16)
        for value, box in enumerate(ndimage.find_objects(sub, max_label=2), start=1):
            if box is not None:
                full = tuple(slice(s.start * step, min(n, (s.stop - 1) * step + step))
                             for s, n in zip(box, lab.shape))
                boxes[value] = frame.span(full)  # type: ignore[arg-type]
    bones = None
    if boxes:
        bones = [(min(b[c][0] for b in boxes.values()), max(b[c][1] for b in boxes.values()))
                 for c in range(3)]

    k, reason = None, ""
    if heat is not None:
        k = _heat_peak_k(heat, frame)
        reason = "Grad-CAM peak"
    if k is None and 1 in boxes:
        # About 2 cm above the tip of the medial malleolus: the plafond / syndesmosis level.
        lo, hi = boxes[1][0]
        k, reason = int(min(hi, lo + round(20.0 / sz))), "plafond level"
    if k is None and 2 in boxes:
        lo, hi = boxes[2][0]
        k, reason = int(lo + (hi - lo) // 3), "distal third of the fibula"
    if k is None:
        k, reason = nz // 2, "middle slice"

    j, coronal_reason = None, "Coronal"
    if 2 in boxes and label is not None:
        # Coronal plane through the fibula's centre near the axial level (a 2 cm slab).
        (zlo, zhi), (ylo, yhi), (xlo, xhi) = boxes[2]
        half = max(1, int(round(10.0 / sz)))
        a, b = max(zlo, k - half), min(zhi, k + half)
        if a > b:
            a, b = zlo, zhi
        sub = frame.view(label.array)[a:b + 1, ylo:yhi + 1, xlo:xhi + 1] == 2
        rows = np.flatnonzero(sub.any(axis=(0, 2)))
        if rows.size:
            counts = sub.sum(axis=(0, 2))
            j = ylo + int(round(float((counts * np.arange(sub.shape[1])).sum() / counts.sum())))
            coronal_reason = "Coronal through the fibula"
    if j is None and heat is not None:
        sl = np.nan_to_num(heat.axial(frame, k))
        if sl.max() > 0:
            j = int(np.unravel_index(int(np.argmax(sl)), sl.shape)[0])
            coronal_reason = "Coronal through the Grad-CAM peak"
    if j is None and 1 in boxes:
        j = (boxes[1][1][0] + boxes[1][1][1]) // 2
    if j is None:
        j = ny // 2
    return _Planes(int(np.clip(k, 0, nz - 1)), int(np.clip(j, 0, ny - 1)), reason, coronal_reason,
                   bones)


# --------------------------------------------------------------------------------- drawing
def _letter(ax: Any, x: float, y: float, text: str, ha: str, va: str) -> None:
    from matplotlib import patheffects

    t = ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, color="white", fontsize=12,
                fontweight="bold", zorder=10)
    t.set_path_effects([patheffects.withStroke(linewidth=2.5, foreground="black")])


def _draw_panel(ax: Any, ct2d: np.ndarray, lab2d: Optional[np.ndarray],
                heat2d: Optional[np.ndarray], spacing_rc: Tuple[float, float],
                vertical_up: bool, letters: Tuple[str, str, str, str], title: str) -> Any:
    """One CT panel in mm coordinates; returns the heatmap's image (or None).

    ``vertical_up``: the data's vertical coordinate grows upwards (coronal: z) rather than
    downwards (axial: y, anterior at the top).
    """
    from matplotlib import colormaps

    nr, nc = ct2d.shape
    sr, sc = spacing_rc
    xs = np.arange(nc) * sc
    if vertical_up:
        ys = (nr - 1 - np.arange(nr)) * sr  # row 0 is the top = the largest coordinate
        extent = (-sc / 2, (nc - 0.5) * sc, -sr / 2, (nr - 0.5) * sr)
    else:
        ys = np.arange(nr) * sr
        extent = (-sc / 2, (nc - 0.5) * sc, (nr - 0.5) * sr, -sr / 2)
    ax.imshow(ct2d, cmap="gray", vmin=BONE_WINDOW_HU[0], vmax=BONE_WINDOW_HU[1], extent=extent,
              origin="upper", interpolation="bilinear")
    heat_img = None
    if heat2d is not None:
        h = np.clip(np.nan_to_num(heat2d, nan=0.0), 0.0, 1.0)
        rgba = colormaps["jet"](h).astype(np.float32)
        rgba[..., 3] = np.where(h >= GRADCAM_THRESHOLD, GRADCAM_MAX_ALPHA * h, 0.0)
        heat_img = ax.imshow(rgba, extent=extent, origin="upper", interpolation="bilinear")
    if lab2d is not None:
        for value, (_, colour) in BONE_COLOURS.items():
            m = lab2d == value
            if m.any():
                ax.contour(xs, ys, m.astype(np.float32), levels=[0.5], colors=[colour],
                           linewidths=1.1)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_facecolor("black")
    ax.set_title(title, fontsize=9.5)
    left, right, top, bottom = letters
    _letter(ax, 0.015, 0.5, left, "left", "center")
    _letter(ax, 0.985, 0.5, right, "right", "center")
    _letter(ax, 0.5, 0.985, top, "center", "top")
    _letter(ax, 0.5, 0.015, bottom, "center", "bottom")
    return heat_img


def _scale_bar(ax: Any, length_mm: float = 20.0) -> None:
    x0, x1 = sorted(ax.get_xlim())
    y0, y1 = ax.get_ylim()
    lo_y = max(y0, y1) if y0 > y1 else min(y0, y1)  # the bottom edge in data units
    dy = abs(y1 - y0)
    sign = -1.0 if y0 > y1 else 1.0  # +1: y grows upwards on screen
    x = x1 - 0.05 * (x1 - x0) - length_mm
    y = lo_y + sign * 0.06 * dy
    ax.plot([x, x + length_mm], [y, y], color="white", linewidth=2.5, solid_capstyle="butt",
            zorder=9)
    ax.text(x + length_mm / 2, y + sign * 0.015 * dy, f"{length_mm:.0f} mm", color="white",
            ha="center", va="bottom", fontsize=7.5, zorder=9)


def _fmt_pct(p: float) -> str:
    return f"{100.0 * p:.1f} %" if p < 0.995 else f"{100.0 * p:.0f} %"


def _withheld_reason(result: Dict[str, Any]) -> Optional[str]:
    """Why no class is shown, or None when the probabilities may be shown."""
    probs = result.get("probabilities")
    if result.get("refused") or not probs:
        return (result.get("refusal") or result.get("withheld_reason")
                or "the classification was withheld")
    return None


def _draw_probabilities(ax: Any, result: Dict[str, Any]) -> None:
    reason = _withheld_reason(result)
    if reason is not None:
        ax.set_axis_off()
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        lines = textwrap.wrap(str(reason), 46)
        if len(lines) > 7:  # the whole reason is in the text panel below
            lines = lines[:6] + ["..."]
        # Hung from the top of its cell, so that a long reason grows down, not over the title.
        ax.text(0.5, 0.9, "No classification:\n" + "\n".join(lines), ha="center", va="top",
                fontsize=10.5, color="#7a0000", wrap=False,
                bbox=dict(boxstyle="round,pad=0.8", facecolor="#fde8e8", edgecolor="#b00000",
                          linewidth=1.5))
        ax.set_title("Danis-Weber classification", fontsize=10.5, fontweight="bold")
        return
    probs = result["probabilities"]
    pred = result.get("prediction")
    unsure = bool((result.get("uncertainty") or {}).get("unsure"))
    names = [c for c, _ in CLASS_NAMES if c in probs] + [c for c in probs
                                                         if c not in dict(CLASS_NAMES)]
    label_of = dict(CLASS_NAMES)
    values = [float(probs[c]) for c in names]
    ypos = np.arange(len(names))[::-1]  # first class at the top
    highlight = "#e07b00" if unsure else "#1f6fb5"
    colours = [highlight if c == pred else "#b8c2cc" for c in names]
    ax.barh(ypos, values, color=colours, height=0.62)
    for y, c, v in zip(ypos, names, values):
        ax.text(min(v, 1.0) + 0.015, y, _fmt_pct(v), va="center", ha="left", fontsize=10,
                fontweight="bold" if c == pred else "normal")
    ax.set_yticks(ypos)
    ax.set_yticklabels([label_of.get(c, c) for c in names], fontsize=10)
    for tick, c in zip(ax.get_yticklabels(), names):
        if c == pred:
            tick.set_fontweight("bold")
            tick.set_color(highlight)
    ax.set_xlim(0, 1.22)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_xticklabels(["0", "25", "50", "75", "100 %"], fontsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    head = f"Prediction: {label_of.get(pred, pred)}" if pred is not None else "Probabilities"
    if unsure:
        head += "  (UNSURE)"
    ax.set_title(head, fontsize=11, fontweight="bold", color=highlight)


def _agreement_line(result: Dict[str, Any]) -> Optional[str]:
    """The label-free segmentation check's line (``segmentation_agreement``), or None."""
    for f in result.get("findings") or []:
        if isinstance(f, dict) and f.get("code") == "segmentation_agreement":
            return describe_agreement(f.get("details") or {})
    return None


def _shape_prior_line(result: Dict[str, Any]) -> Optional[str]:
    """What the template's shape prior took out of the labels (``segmentation_shape_prior``),
    or None."""
    from AnkleFractureLib.registration.shape_prior import describe_shape_prior

    for f in result.get("findings") or []:
        if isinstance(f, dict) and f.get("code") == "segmentation_shape_prior":
            return describe_shape_prior(f.get("details") or {})
    return None


def _info_lines(result: Dict[str, Any], notes: Sequence[str], width: int,
                heatmap_shown: bool = True) -> List[str]:
    lines: List[str] = []

    def add(text: str, indent: str = "") -> None:
        lines.extend(textwrap.wrap(text, width, initial_indent=indent,
                                   subsequent_indent=indent + "  ") or [indent])

    reason = _withheld_reason(result)
    if reason is not None:
        add(("Refused: " if result.get("refused") else "Withheld: ") + str(reason))
    side = result.get("side")
    add(f"Side: {side if side else 'unknown'}")
    reg = result.get("registration") or {}
    rms = reg.get("rms_mm") if isinstance(reg, dict) else None
    add("Registration RMS: " + (f"{float(rms):.2f} mm" if rms is not None else "n/a"))
    for line in (_agreement_line(result), _shape_prior_line(result)):
        if line:
            add(line)
    unc = result.get("uncertainty") or {}
    if result.get("probabilities") and not result.get("refused"):
        conf = unc.get("confidence")
        text = "Uncertainty: " + ("UNSURE" if unc.get("unsure") else "confident")
        if conf is not None:  # the classifier's own (test-time augmentation) confidence
            text += f" (classifier {_fmt_pct(float(conf))})"
        add(text)
        if unc.get("settled_by") and not unc.get("unsure"):
            add(f"- {unc['settled_by']}", "  ")
        shown = set(result.get("warnings") or [])  # listed below: not twice
        for r in unc.get("reasons") or []:
            if r not in shown:
                add(f"- {r}", "  ")
    fracture = _fracture_line(result)
    if fracture:
        add(fracture)
        from AnkleFractureLib.fracture.localise import describe_other_lines

        others = describe_other_lines(result.get("fracture"))
        if others:
            add(f"- {others}", "  ")
    if result.get("gradcam_class") and heatmap_shown:
        # Measured (docs/gradcam_localisation.md): the map shows where the network's evidence
        # lies, in cells of the size it names; the located fracture is the X, not the map.
        head, note = _heatmap_lines(result)
        add(head)
        add(f"- {note}", "  ")
    warns = list(result.get("warnings") or []) + list(notes)
    add(f"Warnings ({len(warns)}):" if warns else "Warnings: none")
    for w in warns:
        add(f"- {w}", "  ")
    total = (result.get("timings_s") or {}).get("total")
    if total is None and result.get("timings_s"):
        total = sum(float(v) for v in result["timings_s"].values())
    add("Run time: " + (f"{float(total):.1f} s" if total is not None else "n/a"))
    return lines


def _fracture_index(ct: Volume, frame: _Canonical, result: Dict[str, Any]
                    ) -> Optional[Tuple[int, int, int]]:
    """Canonical (z, y, x) index of the located fracture's centre, or None (not found, or
    outside the CT)."""
    frac = result.get("fracture") or {}
    if not frac.get("found") or not frac.get("center_lps"):
        return None
    ijk = np.rint(ct.physical_to_index(np.asarray(frac["center_lps"], float))[0]).astype(int)
    zyx = (int(ijk[2]), int(ijk[1]), int(ijk[0]))
    if any(v < 0 or v >= n for v, n in zip(zyx, ct.array.shape)):
        return None
    return frame.index(zyx)


def _fracture_line(result: Dict[str, Any]) -> Optional[str]:
    """The report's line about the located fibular fracture, or None (localiser not run)."""
    frac = result.get("fracture")
    if not frac or result.get("refused"):
        return None
    p = frac.get("probability")
    prob = "" if p is None else f", probability {_fmt_pct(float(p))}"
    if not frac.get("found"):
        return f"Fibula fracture: none located{prob}"
    h = float(frac["height_mm"])
    where = "above" if h >= 0 else "below"
    level = (result.get("weber_from_height") or {}).get("height_class")
    level = f" (Weber {level} level)" if level else ""
    ring = any(c.get("found") and c.get("cortex_ring") for c in frac.get("candidates") or [])
    how = "; found by the cortical ring check" if ring else ""
    return f"Fibula fracture: {abs(h):.1f} mm {where} the plafond{level}{prob}{how} (marker X)"


def _heatmap_lines(result: Dict[str, Any]) -> List[str]:
    cam = result.get("gradcam_class")
    info = result.get("gradcam") or {}
    cell = info.get("cell_mm") if isinstance(info, dict) else None
    size = f"~{max(float(c) for c in cell):.0f} mm cells" if cell else "coarse cells"
    return [f"Heatmap: Grad-CAM of class {cam} ({size})",
            "where the network's evidence lies; the X marks the located fracture line"]


def _figure_layout(withheld: bool) -> Tuple[Any, Dict[str, Any]]:
    """The empty figure and its axes: axial, coronal, probabilities, text; ``gs`` for the
    colour bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE_IN, facecolor="white")
    FigureCanvasAgg(fig)
    # Columns: axial | coronal | heatmap colour bar | probabilities over the text panel.
    gs = fig.add_gridspec(1, 4, width_ratios=[1.0, 1.0, 0.07, 0.95], left=0.012, right=0.99,
                          top=0.9, bottom=0.07, wspace=0.06)
    right = gs[0, 3].subgridspec(2, 2, width_ratios=[0.24, 1.0], height_ratios=[0.8, 1.2],
                                 hspace=0.2, wspace=0.0)
    # Bars leave the cell on their left to the class names; a "No classification" box spans both.
    axes = {"axial": fig.add_subplot(gs[0, 0]), "coronal": fig.add_subplot(gs[0, 1]),
            "probabilities": fig.add_subplot(right[0, :] if withheld else right[0, 1]),
            "text": fig.add_subplot(right[1, :]), "gs": gs}
    return fig, axes


def _zoom(ax_ax: Any, ax_co: Any, planes: _Planes, frame: _Canonical) -> None:
    """Zoom both CT panels onto the bones (axis limits only, no data touched)."""
    if planes.bones is None:
        return
    sz, sy, sx = frame.spacing_zyx
    (zlo, zhi), (ylo, yhi), (xlo, xhi) = planes.bones
    m = ZOOM_MARGIN_MM
    x0, x1 = max(-sx / 2, xlo * sx - m), min((frame.shape[2] - 0.5) * sx, xhi * sx + m)
    y0, y1 = max(-sy / 2, ylo * sy - m), min((frame.shape[1] - 0.5) * sy, yhi * sy + m)
    ax_ax.set_xlim(x0, x1)
    ax_ax.set_ylim(y1, y0)
    ax_co.set_xlim(x0, x1)
    z_mm = planes.k * sz
    z0 = max(-sz / 2, zlo * sz - 1.6 * m)  # more below: the talus is not labelled
    z1 = min((frame.shape[0] - 0.5) * sz, max(z0 + CORONAL_HEIGHT_MM, z_mm + m))
    ax_co.set_ylim(z0, min(z1, zhi * sz + m))


def _draw_ct_panels(axes: Dict[str, Any], ct: Volume, label: Optional[Volume],
                    gradcam: Optional[_HeatOnGrid], frame: _Canonical, planes: _Planes,
                    fracture: Optional[Tuple[int, int, int]]) -> Any:
    """Axial and coronal panels with the cross-reference lines and the fracture marker;
    returns the heatmap image (None without one)."""
    sz, sy, sx = frame.spacing_zyx
    k, j = planes.k, planes.j
    ax_ax, ax_co = axes["axial"], axes["coronal"]

    def axial(v: Optional[Volume], dtype: Any) -> Optional[np.ndarray]:
        return None if v is None else np.asarray(frame.view(v.array)[k], dtype=dtype)

    def coronal(v: Optional[Volume], dtype: Any) -> Optional[np.ndarray]:
        return None if v is None else np.asarray(frame.view(v.array)[::-1, j, :], dtype=dtype)

    heat_ax = None if gradcam is None else gradcam.axial(frame, k)
    heat_co = None if gradcam is None else gradcam.coronal(frame, j)
    heat_img = _draw_panel(ax_ax, axial(ct, np.float32), axial(label, np.uint8), heat_ax,
                           (sy, sx), False, ("R", "L", "A", "P"),
                           f"Axial ({planes.axial_reason}), slice {k + 1}/{frame.shape[0]}")
    _draw_panel(ax_co, coronal(ct, np.float32), coronal(label, np.uint8), heat_co, (sz, sx),
                True, ("R", "L", "S", "I"), planes.coronal_reason)
    # Cross-reference lines: where each panel cuts the other.
    ax_ax.axhline(j * sy, color="yellow", linestyle="--", linewidth=0.7, alpha=0.7)
    ax_co.axhline(k * sz, color="yellow", linestyle="--", linewidth=0.7, alpha=0.7)
    if fracture is not None:
        fz, fy, fx = fracture
        style = dict(marker="x", color="white", markersize=11, markeredgewidth=2.2, zorder=5)
        ax_ax.plot([fx * sx], [fy * sy], **style)
        ax_co.plot([fx * sx], [fz * sz], **style)
    _zoom(ax_ax, ax_co, planes, frame)
    _scale_bar(ax_ax)
    _scale_bar(ax_co)
    return heat_img


def _colour_bar(fig: Any, gs: Any) -> None:
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    sm = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=colormaps["jet"])
    cax = fig.add_subplot(gs[0, 2])
    pos = cax.get_position()  # a short bar beside the coronal panel; its ticks on the right
    cax.set_position([pos.x0 + pos.width * 0.05, pos.y0 + pos.height * 0.3,
                      pos.width * 0.3, pos.height * 0.4])
    cb = fig.colorbar(sm, cax=cax)
    cb.ax.set_title("Grad-CAM", fontsize=8, loc="left")
    cb.ax.tick_params(labelsize=7)
    cb.ax.axhspan(0.0, GRADCAM_THRESHOLD, color="white", alpha=0.7)


def _draw_text(ax_tx: Any, result: Dict[str, Any], notes: Sequence[str], heatmap: bool) -> None:
    """The text panel, wrapped to its width; the font shrinks when there are many lines."""
    ax_tx.set_axis_off()
    box = ax_tx.get_position()
    width_pt = box.width * FIGSIZE_IN[0] * 72.0
    height_pt = box.height * FIGSIZE_IN[1] * 72.0
    fs = 9.0
    for _ in range(4):
        lines = _info_lines(result, notes, max(20, int(width_pt / (0.58 * fs))),
                            heatmap_shown=heatmap)
        fit = height_pt / (1.3 * 1.2 * len(lines))  # line height ~1.2 em at linespacing 1.3
        if fit >= fs or fs <= 5.0:
            break
        fs = max(5.0, fit)
    ax_tx.text(0.02, 0.98, "\n".join(lines), transform=ax_tx.transAxes, ha="left", va="top",
               fontsize=fs, family="DejaVu Sans", linespacing=1.3)


def _titles(fig: Any, ct: Volume, result: Dict[str, Any]) -> None:
    side = result.get("side")
    title = "Ankle CT - Danis-Weber classification"
    if side:
        title += f" - {side} ankle"
    src = (ct.meta or {}).get("source")
    fig.suptitle(title, fontsize=13, fontweight="bold", x=0.015, ha="left", y=0.975)
    if src:
        fig.text(0.985, 0.965, os.path.basename(os.fspath(src)), ha="right", va="center",
                 fontsize=8, color="#555555")
    fig.text(0.5, 0.018, FOOTER, ha="center", va="center", fontsize=10, fontweight="bold",
             color="#b00000")


def report_figure(ct: Volume, label: Optional[Volume], gradcam: Optional[Volume],
                  result: Dict[str, Any]) -> Any:
    """Draw the one-page report (a ``matplotlib.figure.Figure``, not registered with pyplot).

    Args:
        ct: The CT (HU), any direction matrix.
        label: Segmentation on the CT's grid (uint8: 1 tibia, 2 fibula), or None.
        gradcam: Grad-CAM heatmap (float, 0..1) on the CT's grid or on a sub-box of its
            voxel lattice (as the pipeline keeps it, 0 outside the box), or None.
        result: The ``result.json`` dict (probabilities, prediction, uncertainty, side,
            registration, fracture, warnings, refused, refusal, timings_s; missing keys are
            tolerated).

    Returns:
        The Figure (12 x 6.5 in) with an Agg canvas. Its axes are, in order: axial, coronal,
        probabilities, text, then the heatmap's colour bar (when there is a heatmap). With a
        located fibular fracture both CT panels cut through it and mark it with an X.
    """
    from dataclasses import replace

    notes: List[str] = []
    if label is not None and not _on_grid(label, ct):
        notes.append("the segmentation is not on the CT's grid and is not shown")
        label = None
    heat = None if gradcam is None else _HeatOnGrid.of(gradcam, ct)
    if gradcam is not None and heat is None:
        notes.append("the Grad-CAM heatmap is not on the CT's grid and is not shown")
    frame = _canonical(ct)
    planes = _choose_planes(ct, label, heat, frame)
    fracture = _fracture_index(ct, frame, result)
    if fracture is not None:
        planes = replace(planes, k=fracture[0], j=fracture[1], axial_reason="located fracture",
                         coronal_reason="Coronal through the located fracture")
    fig, axes = _figure_layout(_withheld_reason(result) is not None)
    heat_img = _draw_ct_panels(axes, ct, label, heat, frame, planes, fracture)
    if heat_img is not None:
        _colour_bar(fig, axes["gs"])
    if label is not None:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=c, linewidth=2, label=n) for n, c in BONE_COLOURS.values()]
        axes["axial"].legend(handles=handles, loc="lower left", fontsize=8, framealpha=0.6)
    _draw_probabilities(axes["probabilities"], result)
    _draw_text(axes["text"], result, notes, heat is not None)
    _titles(fig, ct, result)
    return fig


def _write(fig_args: Tuple[Any, ...], path: Any, fmt: str, dpi: float) -> None:
    fig = report_figure(*fig_args)
    try:
        # PNG at zlib level 1: level 6 spent about a sixth of the drawing's time deflating, for a
        # file only 7 % smaller (the page is mostly flat colour).
        extra = {"pil_kwargs": {"compress_level": 1}} if fmt == "png" else {}
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, facecolor="white", **extra)
    finally:
        fig.clear()  # drop the artists now; nothing references the figure afterwards


def write_report_png(path: Any, ct: Volume, label: Optional[Volume], gradcam: Optional[Volume],
                     result: Dict[str, Any], dpi: float = 110) -> None:
    """Write the report as a PNG, atomically (temporary file in the same folder, then replace).

    Args:
        path: Destination ``.png`` (parent folders are created).
        ct, label, gradcam, result: As :func:`report_figure`.
        dpi: Resolution; the default gives 1320 x 715 pixels.
    """
    _write((ct, label, gradcam, result), path, "png", dpi)


def write_report_pdf(path: Any, ct: Volume, label: Optional[Volume], gradcam: Optional[Volume],
                     result: Dict[str, Any], dpi: float = 150) -> None:
    """Write the same report as a one-page PDF, atomically (see :func:`write_report_png`).

    Args:
        path: Destination ``.pdf``.
        ct, label, gradcam, result: As :func:`report_figure`.
        dpi: Resolution of the embedded CT images.
    """
    _write((ct, label, gradcam, result), path, "pdf", dpi)
