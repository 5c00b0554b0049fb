"""Is the bone a network labelled "tibia" a distal tibia? (post-processing rule 9)

A foot scan (toes to the talar dome, no tibial shaft in view) shows long, tubular foot bones
that a network trained on ankles may call tibia and fibula: the plantarflexed metatarsals of
the real foot series in ``../shared/data/vhf_ankle_ct`` came out as a 12 ml "tibia". The
other post-processing rules judge every piece against the main tibia, so they cannot see it
when the main tibia is itself a foot bone. Two properties of a distal tibia can:

* **its cross-section**: at the plafond a distal tibia is one region of about 8-13 cm^2 in
  the axial plane (every analytic and real-shape phantom: 11.8 cm^2 or more), while a
  metatarsal's is 1-2 cm^2 even when the slice cuts it obliquely (the real foot series'
  "tibia": 4.75 cm^2 at most, where several bases touch);
* **where it ends**: every tibia of an ankle CT runs out of the top of the field of view,
  so its top is the top of the bone in view. A foot bone ends below the tarsal bones
  (the real foot series' 12 ml "tibia" 57 mm below the talar dome).

A tibia is taken for a distal tibia when either holds (:func:`judge`), so a real tibia the
network labels only in part (a blob inside the bone, seen on real leg CTs) keeps its labels
while it reaches the top of the scan, and a scan reaching the knee (the tibial plateau below
the femur) keeps them by the plateau's large section.

Both are measured across the array axis nearest the patient's superior direction (the axis
the slices cut; an axial CT's z): heights in mm along that axis, sections in the slices
across it.

Example:
    >>> tib = np.zeros((40, 40, 40), bool); tib[10:40, 5:35, 5:35] = True   # 9 cm^2 slices
    >>> ct = np.where(tib, 1200.0, 0.0)
    >>> judge(tib, (0, 0, 0), ct, (1.0, 1.0, 1.0), (1.0, 0.0, 0.0))["distal_tibia"]
    True
    >>> bone = np.zeros((50, 40, 40), bool); bone[5:20, 18:22, 18:22] = True  # a metatarsal
    >>> ct = np.where(bone, 1200.0, 0.0); ct[30:50, 5:35, 5:35] = 1200.0      # tarsals above
    >>> v = judge(bone, (0, 0, 0), ct, (1.0, 1.0, 1.0), (1.0, 0.0, 0.0))
    >>> v["distal_tibia"], v["section_cm2"], v["below_top_mm"]
    (False, 0.16, 30.0)
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np
from scipy import ndimage as ndi

# Cortical bone is what post-processing rule 5 calls cortex (one value; postprocess imports
# this module only inside rule 9's function, so the import below is not circular).
from AnkleFractureLib.segmentation.postprocess import CORTEX_HU

#: A tibia with a single-region cross-section of at least this (mm^2) is a distal tibia: the
#: plafond's is about 8-13 cm^2, a metatarsal's 1-2 cm^2 (4.75 cm^2 where bases touch).
MIN_SECTION_MM2 = 600.0
#: ... or when its top lies within this (mm) of the top of the bone in view.
TOP_GAP_MM = 20.0
#: The top of the bone in view is the highest slice holding at least this many cortical
#: voxels, so that a few noisy or streak voxels above the bone do not count.
TOP_MIN_VOXELS = 10
_EIGHT = np.ones((3, 3), dtype=bool)


def slice_axis(up_zyx: Sequence[float]) -> tuple:
    """(array axis nearest the superior direction ``up_zyx`` (z, y, x), +1 or -1: whether a
    higher index along it is higher in the patient)."""
    up = np.asarray(up_zyx, dtype=float).reshape(3)
    axis = int(np.argmax(np.abs(up)))
    return axis, (1 if up[axis] >= 0 else -1)


def largest_section_mm2(mask: np.ndarray, spacing_zyx: Sequence[float], axis: int,
                        enough_mm2: Optional[float] = None) -> float:
    """Area (mm^2) of the largest single connected region (8-connected) of ``mask`` in one
    slice across ``axis``.

    Args:
        mask: Boolean array (z, y, x).
        spacing_zyx: Voxel size (z, y, x) in mm.
        axis: The array axis the slices cut.
        enough_mm2: Stop at the first region this large (slices taken fullest first).

    Example:
        >>> m = np.zeros((3, 10, 10), bool); m[1, :4, :4] = True; m[1, 6:, 6:] = True
        >>> largest_section_mm2(m, (1.0, 0.5, 0.5), 0)
        4.0
    """
    sp = [float(s) for s in spacing_zyx]
    pixel_mm2 = float(np.prod([s for i, s in enumerate(sp) if i != axis]))
    stack = np.moveaxis(np.asarray(mask, dtype=bool), axis, 0)
    counts = stack.reshape(stack.shape[0], -1).sum(axis=1)
    best = 0
    for k in np.argsort(-counts, kind="stable"):
        if counts[k] <= best:
            break  # fullest first: no later slice can hold a larger region
        labelled, n = ndi.label(stack[k], structure=_EIGHT)
        best = max(best, int(np.bincount(labelled.ravel())[1:].max()))
        if enough_mm2 is not None and best * pixel_mm2 >= enough_mm2:
            break
    return best * pixel_mm2


def bone_top_index(ct_hu: np.ndarray, axis: int, sign: int) -> Optional[int]:
    """Index along ``axis`` of the highest slice (by ``sign``) holding at least
    :data:`TOP_MIN_VOXELS` cortical voxels (>= :data:`CORTEX_HU`) of ``ct_hu`` (z, y, x),
    or None when no slice does."""
    other = tuple(i for i in range(3) if i != axis)
    counts = np.count_nonzero(np.asarray(ct_hu) >= CORTEX_HU, axis=other)
    rows = np.nonzero(counts >= TOP_MIN_VOXELS)[0]
    if rows.size == 0:
        return None
    return int(rows.max() if sign > 0 else rows.min())


def judge(mask: np.ndarray, offset_zyx: Sequence[int], ct_hu: np.ndarray,
          spacing_zyx: Sequence[float], up_zyx: Sequence[float]) -> Dict[str, Any]:
    """Whether a labelled tibia is a distal tibia, and the two measurements behind it.

    Args:
        mask: Boolean array (z, y, x) of the tibia over a box of ``ct_hu``'s grid.
        offset_zyx: Index in ``ct_hu`` of the box's first voxel.
        ct_hu: CT (z, y, x) in HU; its cortical bone gives the top of the bone in view.
        spacing_zyx: Voxel size (z, y, x) in mm.
        up_zyx: The patient's superior direction per array axis (z, y, x).

    Returns:
        ``{"distal_tibia": bool, "section_cm2": float, "below_top_mm": float or None}``:
        the largest single-region section (cm^2) and how far (mm) the tibia's top lies below
        the top of the bone in view (None when it was not needed: the section decided).
    """
    axis, sign = slice_axis(up_zyx)
    section = largest_section_mm2(mask, spacing_zyx, axis, enough_mm2=MIN_SECTION_MM2)
    out: Dict[str, Any] = {"distal_tibia": True, "section_cm2": round(section / 100.0, 2),
                           "below_top_mm": None}
    if section >= MIN_SECTION_MM2:
        return out
    rows = np.nonzero(np.asarray(mask).any(axis=tuple(i for i in range(3) if i != axis)))[0]
    if rows.size == 0:
        return out  # nothing labelled: nothing to judge
    top = int(offset_zyx[axis]) + int(rows.max() if sign > 0 else rows.min())
    bone_top = bone_top_index(ct_hu, axis, sign)
    if bone_top is None:
        return out  # no cortical bone to compare with: leave the labels to the other rules
    gap = max(0.0, (bone_top - top) * sign * float(spacing_zyx[axis]))
    out["below_top_mm"] = round(gap, 1)
    out["distal_tibia"] = gap <= TOP_GAP_MM
    return out
