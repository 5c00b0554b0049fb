"""Left/right side of an ankle from its anatomy: the fibula is lateral to the tibia.

In LPS, +x points to the patient's LEFT. The lateral side of a RIGHT ankle is the patient's
right, so its fibula lies at smaller x than its tibia; a LEFT ankle's fibula lies at larger x.
Everything is computed in physical LPS millimetres (through the Volume's direction), so an image
stored with flipped or permuted axes gives the same answer as the same anatomy stored plainly.

The tibia-to-fibula offset is measured level by level along the leg (5 mm slabs perpendicular to
the tibial axis, over the length where both bones are present), and the median of the levels'
left-right components decides, so a displaced fragment or an odd level does not flip the answer.

The detector refuses to answer (``side=None``) when the label map has no tibia or no fibula,
when the bones are too close left-right to tell, when the levels disagree, and when the field of
view holds both legs (from the CT's body outline, or from two separate tibiae in the mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
from scipy import ndimage

from AnkleFractureLib.geometry.volume import Volume

TIBIA = 1
FIBULA = 2

#: HU threshold of the body (skin and everything denser) used to count the legs.
BODY_HU = -400.0
#: Smallest axial cross-section (mm^2) counted as a leg.
LEG_MIN_AREA_MM2 = 1500.0
#: Smallest mean width (area / longest extent, mm) of a leg cross-section; rejects a thin table.
LEG_MIN_WIDTH_MM = 20.0
#: Two leg cross-sections (or two tibiae) further apart than this (mm) are two legs.
LEGS_MIN_DISTANCE_MM = 60.0
#: Thickness (mm) of the level slabs along the leg.
LEVEL_MM = 5.0
#: Left-right separations below this (mm) are too small to call.
MIN_SEPARATION_MM = 3.0
#: Length scale (mm) of the confidence: 1 - exp(-|dx| / scale).
CONFIDENCE_SCALE_MM = 5.0
#: Upper bound on voxels examined per bone (larger masks are strided).
MAX_VOXELS_EXAMINED = 4_000_000


@dataclass
class SideDetection:
    """Result of :func:`detect_side`.

    Attributes:
        side: "left", "right", or None when the side cannot be told.
        confidence: 0..1 (0 when ``side`` is None).
        reason: Plain-language explanation, e.g. "fibula lies 24.1 mm to the patient's right of
            the tibia ..." or "both legs in the field of view ...".
        legs: Legs found in the CT (when a CT is given; 2 also when the mask has two separate
            tibiae); otherwise 1 when bone masks were found and 0 when not.
    """

    side: Optional[str]
    confidence: float
    reason: str
    legs: int


# ---------------------------------------------------------------------------------------- helpers
def _stride(shape: Tuple[int, ...]) -> int:
    """Isotropic index stride keeping roughly MAX_VOXELS_EXAMINED voxels."""
    n = float(np.prod(shape))
    return max(1, int(np.ceil((n / MAX_VOXELS_EXAMINED) ** (1.0 / 3.0))))


def _mask_points(label: Volume, value: int, stride: int) -> np.ndarray:
    """LPS mm centres (N, 3) of the voxels equal to ``value`` on a ``stride`` sub-grid."""
    kji = np.argwhere(label.array[::stride, ::stride, ::stride] == value) * stride
    return label.index_to_physical(kji[:, ::-1])


def _two_separate_tibiae(label: Volume, stride: int) -> Optional[float]:
    """Distance (mm) between two large, separate tibia components, or None if there is one.

    "Large" means each holds at least 15% of the tibia voxels, so a small stray island or a
    fracture fragment does not count as a second leg.
    """
    mask = label.array[::stride, ::stride, ::stride] == TIBIA
    comps, n = ndimage.label(mask)
    if n < 2:
        return None
    sizes = np.bincount(comps.ravel())[1:]
    order = np.argsort(sizes)[::-1][:2]
    if sizes[order[1]] < 0.15 * sizes.sum():
        return None
    centres = ndimage.center_of_mass(mask, comps, order + 1)
    pts = label.index_to_physical(np.asarray(centres)[:, ::-1] * stride)
    dist = float(np.linalg.norm(pts[0] - pts[1]))
    return dist if dist > LEGS_MIN_DISTANCE_MM else None


def count_legs(ct: Volume, n_slabs: int = 7, slab_mm: float = 5.0) -> Tuple[int, float]:
    """Number of legs in a CT from its body outline on a few axial slabs.

    Each slab (``slab_mm`` thick, perpendicular to the index axis closest to the patient's
    superior axis) is thresholded at BODY_HU; connected regions larger than LEG_MIN_AREA_MM2 and
    wider on average than LEG_MIN_WIDTH_MM are leg cross-sections. Regions whose centroids are
    within LEGS_MIN_DISTANCE_MM of each other count once. The answer is the largest count over
    the slabs, since touching feet can merge into one region on some slabs.

    Args:
        ct: CT volume in HU, array (z, y, x).
        n_slabs: Number of slabs, spread over 10%..90% of the axial extent.
        slab_mm: Slab thickness in mm.

    Returns:
        (legs, separation_mm): the count and, when two or more, the largest centroid distance.
    """
    arr = ct.array
    # Index axis (0 = i/x, 1 = j/y, 2 = k/z) best aligned with LPS z; array axes are reversed.
    idx_axis = int(np.argmax(np.abs(ct.direction[2, :])))
    arr_axis = 2 - idx_axis
    n_ax = arr.shape[arr_axis]
    thick = max(1, int(round(slab_mm / ct.spacing[idx_axis])))
    in_plane = [a for a in range(3) if a != arr_axis]
    step = max(1, int(np.ceil(max(arr.shape[a] for a in in_plane) / 256)))
    pix_mm2 = float(np.prod([ct.spacing[2 - a] for a in in_plane])) * step * step
    best, best_sep = 0, 0.0
    centres_at = np.linspace(0.1, 0.9, n_slabs) * (n_ax - 1)
    for c in np.unique(np.round(centres_at).astype(int)):
        lo = int(max(0, c - thick // 2))
        hi = int(min(n_ax, lo + thick))
        slab = np.take(arr, np.arange(lo, hi), axis=arr_axis)
        body = (slab > BODY_HU).any(axis=arr_axis)[::step, ::step]
        comps, n = ndimage.label(body)
        if n == 0:
            continue
        sizes = np.bincount(comps.ravel())[1:]
        legs: List[np.ndarray] = []
        for lab_id in np.flatnonzero(sizes * pix_mm2 > LEG_MIN_AREA_MM2) + 1:
            rc = np.argwhere(comps == lab_id) * step  # (M, 2) array indices of the 2 in-plane axes
            full = np.zeros((len(rc), 3))
            full[:, in_plane[0]] = rc[:, 0]
            full[:, in_plane[1]] = rc[:, 1]
            full[:, arr_axis] = 0.5 * (lo + hi - 1)
            pts = ct.index_to_physical(full[:, ::-1])
            extent = float(np.linalg.norm(pts.max(axis=0) - pts.min(axis=0)))
            area = len(rc) * pix_mm2
            if area / max(extent, 1e-6) < LEG_MIN_WIDTH_MM:
                continue  # thin and long: a table or a strap, not a leg
            legs.append(pts.mean(axis=0))
        # Merge regions whose centroids are close (one leg split by a gap in the threshold).
        distinct: List[np.ndarray] = []
        for p in legs:
            if all(np.linalg.norm(p - q) > LEGS_MIN_DISTANCE_MM for q in distinct):
                distinct.append(p)
        if len(distinct) > best:
            best = len(distinct)
            best_sep = max((float(np.linalg.norm(p - q)) for p in distinct for q in distinct), default=0.0)
    return best, best_sep


def _leg_axis(tibia: np.ndarray) -> np.ndarray:
    """Unit long axis of the tibia (LPS); the scanner's z axis when the tibia is too short."""
    c = tibia - tibia.mean(axis=0)
    evals, evecs = np.linalg.eigh(c.T @ c / len(c))
    axis = evecs[:, int(np.argmax(evals))]
    ev = np.sort(evals)[::-1]
    # A short distal tibia (field of view of a few cm) has no dominant long axis; patients lie
    # along the scanner's z, so fall back to it rather than trust a sideways principal axis.
    if ev[0] < 2.0 * ev[1] or abs(axis[2]) < np.cos(np.deg2rad(60.0)):
        return np.array([0.0, 0.0, 1.0])
    return axis if axis[2] >= 0 else -axis


def _level_offsets(tibia: np.ndarray, fibula: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """Left-right (LPS x) component of fibula-minus-tibia centroid offsets, one per level (mm).

    The offset is taken perpendicular to the leg axis, so a tilted leg does not leak its
    superior-inferior offset between the two centroids into x.
    """
    tt = tibia @ axis
    tf = fibula @ axis
    lo, hi = max(tt.min(), tf.min()), min(tt.max(), tf.max())
    out = []
    if hi - lo >= LEVEL_MM:
        edges = np.arange(lo, hi + 1e-9, LEVEL_MM)
        bt = np.digitize(tt, edges)
        bf = np.digitize(tf, edges)
        ct = np.bincount(bt, minlength=len(edges) + 1)
        cf = np.bincount(bf, minlength=len(edges) + 1)
        sums_t = np.stack([np.bincount(bt, tibia[:, d], len(edges) + 1) for d in range(3)], axis=1)
        sums_f = np.stack([np.bincount(bf, fibula[:, d], len(edges) + 1) for d in range(3)], axis=1)
        for b in range(1, len(edges)):
            if ct[b] >= 10 and cf[b] >= 5:
                diff = sums_f[b] / cf[b] - sums_t[b] / ct[b]
                out.append((diff - (diff @ axis) * axis)[0])
    if not out:
        # No common level (e.g. a tiny fibula remnant): fall back to the whole-bone centroids.
        diff = fibula.mean(axis=0) - tibia.mean(axis=0)
        out.append((diff - (diff @ axis) * axis)[0])
    return np.asarray(out)


# ---------------------------------------------------------------------------------------- API
def detect_side(label: Volume, ct: Optional[Volume] = None) -> SideDetection:
    """Tell a left from a right ankle from the tibia (1) and fibula (2) label map.

    Args:
        label: Label map, array (z, y, x): 0 background, 1 tibia, 2 fibula. Any direction.
        ct: Optional CT (HU) of the same patient, used to refuse scans with both legs in the
            field of view. Need not share the label's grid.

    Returns:
        A :class:`SideDetection`. ``side`` is None (with confidence 0 and a reason) when the
        side cannot be told.
    """
    legs_ct: Optional[int] = None
    if ct is not None:
        legs_ct, sep = count_legs(ct)
        if legs_ct >= 2:
            return SideDetection(None, 0.0,
                                 f"both legs in the field of view ({legs_ct} leg cross-sections, "
                                 f"{sep:.0f} mm apart): crop the scan to one ankle first", legs_ct)
    stride = _stride(label.shape)
    tibia = _mask_points(label, TIBIA, stride)
    fibula = _mask_points(label, FIBULA, stride)
    found = 1 if (len(tibia) or len(fibula)) else 0
    legs = found if legs_ct is None else max(legs_ct, found)
    if len(tibia) == 0:
        return SideDetection(None, 0.0, "no tibia in the mask", legs)
    two = _two_separate_tibiae(label, stride)
    if two is not None:
        return SideDetection(None, 0.0,
                             f"both legs in the field of view (two separate tibiae {two:.0f} mm "
                             f"apart in the mask): crop the scan to one ankle first", 2)
    if len(fibula) == 0:
        return SideDetection(None, 0.0, "no fibula in the mask", legs)
    axis = _leg_axis(tibia)
    dx = _level_offsets(tibia, fibula, axis)
    med = float(np.median(dx))
    if abs(med) < MIN_SEPARATION_MM:
        return SideDetection(None, 0.0,
                             f"fibula and tibia are only {abs(med):.1f} mm apart left-right "
                             f"(need {MIN_SEPARATION_MM:.0f} mm): cannot tell the side", legs)
    agree = float(np.mean(np.sign(dx) == np.sign(med)))
    if agree < 0.6:
        return SideDetection(None, 0.0,
                             f"the fibula is on different sides of the tibia at different levels "
                             f"({agree:.0%} agree): cannot tell the side", legs)
    side = "right" if med < 0 else "left"
    confidence = float((1.0 - np.exp(-abs(med) / CONFIDENCE_SCALE_MM)) * agree)
    reason = (f"fibula lies {abs(med):.1f} mm to the patient's {side} of the tibia "
              f"(median over {len(dx)} level(s) along the leg, {agree:.0%} agree)")
    return SideDetection(side, confidence, reason, legs)
