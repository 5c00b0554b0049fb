"""Segmentation metrics: Dice, HD95 and average symmetric surface distance (ASSD).

Definitions (as in the methods reference and the Medical Segmentation Decathlon):

* Dice = 2 |A ∩ B| / (|A| + |B|) on boolean masks.
* The *surface* of a mask is the mask minus its 6-connected erosion (voxels outside the array
  count as background, so a mask touching the array border has a surface there).
* The surface distances of A to B are, for every surface voxel of A, the Euclidean distance in
  mm from its centre to the nearest surface-voxel centre of B; the distances of B to A likewise.
* HD95 is the 95th percentile of the two sets of distances concatenated (symmetric); ASSD is
  their mean.

Empty masks: two empty masks agree perfectly (Dice 1, HD95 0, ASSD 0). When exactly one mask is
empty, Dice is 0 and the distances are undefined: :func:`hd95` and
:func:`average_surface_distance` return ``math.inf``, and :func:`segmentation_metrics`, whose
result goes into JSON reports, writes ``None`` (JSON ``null``) instead, so a report never
contains the invalid JSON tokens ``NaN`` or ``Infinity``.

Arrays are (z, y, x); spacings are (x, y, z) in mm as everywhere in the library.

Example:
    >>> a = np.zeros((10, 10, 10), bool); a[2:6, 2:6, 2:6] = True
    >>> b = np.zeros_like(a); b[2:6, 2:6, 3:7] = True
    >>> round(dice(a, b), 3), hd95(a, b, (1.0, 1.0, 1.0))
    (0.75, 1.0)
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from AnkleFractureLib.errors import GeometryError
from AnkleFractureLib.geometry.arrays import bounding_box
from AnkleFractureLib.geometry.volume import Volume

#: Label values scored by :func:`segmentation_metrics`.
BONES: Dict[str, int] = {"tibia": 1, "fibula": 2}

_SIX_CONNECTED = ndi.generate_binary_structure(3, 1)

Slices = Tuple[slice, slice, slice]

#: Radius (voxels) of the bounded k-d tree search of :func:`surface_distances`.
_NEAR_VOXELS = 8
#: Above this many points beyond that radius, the distance transform is used instead.
_MAX_FAR_QUERIES = 2000


def _as_mask(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 3:
        raise ValueError(f"{name} must be a 3D (z, y, x) mask, got shape {a.shape}")
    return a if a.dtype == bool else a != 0


def _check_pair(a: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    a = _as_mask(a, "a")
    b = _as_mask(b, "b")
    if a.shape != b.shape:
        raise GeometryError(f"masks have different shapes {a.shape} and {b.shape}")
    return a, b


def _zyx_spacing(spacing_xyz: Sequence[float]) -> np.ndarray:
    s = np.asarray(spacing_xyz, dtype=float).reshape(-1)
    if s.shape != (3,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"spacing must be 3 positive values (x, y, z) in mm, got {spacing_xyz}")
    return s[::-1].copy()


def _union_box(a: Optional[Slices], b: Optional[Slices]) -> Optional[Slices]:
    if a is None or b is None:
        return b if a is None else a
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop))  # type: ignore[return-value]
                 for x, y in zip(a, b))


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Boolean surface of a mask: the mask minus its 6-connected erosion.

    Voxels outside the array count as background (``border_value=0``), so a mask that touches
    the array border has surface voxels there.

    Args:
        mask: Boolean (z, y, x) array.

    Returns:
        Boolean array of the same shape.
    """
    mask = _as_mask(mask, "mask")
    if not mask.any():
        return np.zeros_like(mask)
    return mask & ~ndi.binary_erosion(mask, structure=_SIX_CONNECTED, border_value=0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap 2|A∩B| / (|A| + |B|) of two masks of the same shape.

    Args:
        a, b: Masks (z, y, x); non-zero = inside.

    Returns:
        Dice in [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is.
    """
    a, b = _check_pair(a, b)
    na = int(np.count_nonzero(a))
    nb = int(np.count_nonzero(b))
    if na + nb == 0:
        return 1.0
    box = bounding_box(a | b) if na and nb else None
    inter = int(np.count_nonzero(a[box] & b[box])) if box is not None else 0
    return 2.0 * inter / (na + nb)


def surface_distances(a: np.ndarray, b: np.ndarray,
                      spacing_xyz: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``a`` to ``b``'s surface, and back.

    Both masks are cropped to the bounding box of ``a | b`` plus one voxel of background (so
    that voxels on the array border still count as surface, and the work is independent of the
    field of view). The nearest-surface search uses a k-d tree of physical voxel-centre
    positions: this gives exactly the values of ``distance_transform_edt(~surface_b,
    sampling=(sz, sy, sx))`` read at ``a``'s surface, but is about six times faster on bone-sized
    crops, because only surface voxels are visited; when many surface voxels lie far from the
    other mask (a poor prediction), that distance transform is used instead (see
    :func:`_nearest`).

    Args:
        a, b: Masks (z, y, x) of the same shape; non-zero = inside.
        spacing_xyz: Voxel size (x, y, z) in mm.

    Returns:
        ``(d_ab, d_ba)``: float64 arrays (mm) with one entry per surface voxel of ``a`` (resp.
        ``b``). Both are empty when both masks are empty; when only ``b`` is empty, ``d_ab`` is
        all ``inf`` and ``d_ba`` is empty (and vice versa).
    """
    a, b = _check_pair(a, b)
    sp = _zyx_spacing(spacing_xyz)
    box = bounding_box(a | b)
    if box is None:
        return np.zeros(0), np.zeros(0)
    # One voxel of zero padding around the crop: the erosion then treats the crop border (and the
    # array border) as background, exactly as on the full array.
    sa = surface_voxels(np.pad(a[box], 1))
    sb = surface_voxels(np.pad(b[box], 1))
    ia, ib = np.argwhere(sa), np.argwhere(sb)
    if len(ia) == 0 or len(ib) == 0:
        return np.full(len(ia), np.inf), np.full(len(ib), np.inf)
    return _nearest(ia, ib, sb, sp), _nearest(ib, ia, sa, sp)


def _nearest(src: np.ndarray, dst: np.ndarray, dst_surface: np.ndarray,
             sp_zyx: np.ndarray) -> np.ndarray:
    """Distance (mm) from each voxel index in ``src`` to the nearest voxel index in ``dst``.

    A k-d tree search limited to :data:`_NEAR_VOXELS` voxels is fast whatever the shapes; the
    few points farther than that are searched without limit. When many points are far (a poor
    prediction), unbounded k-d tree searches become slow (tens of seconds on clinical crops), so
    the exact Euclidean distance transform of the crop, whose cost does not depend on the
    distances, is used instead.
    """
    p_src, p_dst = src * sp_zyx, dst * sp_zyx
    tree = cKDTree(p_dst)
    bound = _NEAR_VOXELS * float(sp_zyx.max())
    d = tree.query(p_src, k=1, distance_upper_bound=bound)[0]
    far = ~np.isfinite(d)
    n_far = int(np.count_nonzero(far))
    if n_far == 0:
        return d
    if n_far <= _MAX_FAR_QUERIES:
        d[far] = tree.query(p_src[far], k=1)[0]
        return d
    edt = ndi.distance_transform_edt(~dst_surface, sampling=tuple(sp_zyx))
    return edt[tuple(src.T)]


def _from_distances(d_ab: np.ndarray, d_ba: np.ndarray, what: str) -> float:
    if d_ab.size == 0 and d_ba.size == 0:
        return 0.0
    both = np.concatenate([d_ab, d_ba])
    if not np.all(np.isfinite(both)):
        return math.inf
    if what == "hd95":
        return float(np.percentile(both, 95))
    return float(both.mean())


def hd95(a: np.ndarray, b: np.ndarray, spacing_xyz: Sequence[float]) -> float:
    """95th percentile Hausdorff distance (mm) of the symmetric surface distances.

    Args:
        a, b: Masks (z, y, x) of the same shape.
        spacing_xyz: Voxel size (x, y, z) in mm.

    Returns:
        HD95 in mm (numpy's default linear percentile interpolation over the concatenated
        a->b and b->a distances); 0.0 when both masks are empty; ``math.inf`` when exactly one is
        empty.
    """
    return _from_distances(*surface_distances(a, b, spacing_xyz), "hd95")


def average_surface_distance(a: np.ndarray, b: np.ndarray, spacing_xyz: Sequence[float]) -> float:
    """Average symmetric surface distance (ASSD, mm).

    Args:
        a, b: Masks (z, y, x) of the same shape.
        spacing_xyz: Voxel size (x, y, z) in mm.

    Returns:
        Mean of the concatenated a->b and b->a surface distances in mm; 0.0 when both masks are
        empty; ``math.inf`` when exactly one is empty.
    """
    return _from_distances(*surface_distances(a, b, spacing_xyz), "assd")


def finite_or_none(value: Optional[float], digits: int = 4) -> Optional[float]:
    """``value`` rounded to ``digits``, or None when it is None, NaN or infinite (JSON null)."""
    if value is None:
        return None
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def segmentation_metrics(pred: Volume, truth: Volume) -> Dict[str, Dict[str, Optional[float]]]:
    """Dice, HD95, ASSD and volumes of the tibia and fibula of a predicted label map.

    Args:
        pred: Predicted label map (0 background, 1 tibia, 2 fibula), array (z, y, x).
        truth: Reference label map on exactly the same grid.

    Returns:
        ``{"tibia": {...}, "fibula": {...}}``, each with ``dice``, ``hd95_mm``, ``assd_mm``,
        ``volume_ml_pred`` and ``volume_ml_true`` (millilitres). Distances are None (JSON null)
        when exactly one of the two masks of that bone is empty. Values are rounded to 4 decimals
        (well below a voxel), so the dict can be written to JSON as is.

    Raises:
        GeometryError: When the two volumes do not share the same grid (shape, spacing, origin,
            direction).
    """
    if not pred.same_geometry(truth, atol=1e-4):
        raise GeometryError(f"the prediction {pred!r} is not on the reference grid {truth!r}")
    voxel_ml = float(np.prod(truth.spacing)) / 1000.0
    out: Dict[str, Dict[str, Optional[float]]] = {}
    # Crop once to the union of all bones: the clinical FOV is mostly air and soft tissue.
    box = _union_box(bounding_box(pred.array), bounding_box(truth.array))
    for name, value in BONES.items():
        if box is None:
            p = np.zeros((1, 1, 1), bool)
            t = p
        else:
            p = pred.array[box] == value
            t = truth.array[box] == value
        d_ab, d_ba = surface_distances(p, t, truth.spacing)
        out[name] = {
            "dice": finite_or_none(dice(p, t), 6),
            "hd95_mm": finite_or_none(_from_distances(d_ab, d_ba, "hd95")),
            "assd_mm": finite_or_none(_from_distances(d_ab, d_ba, "assd")),
            "volume_ml_pred": round(int(np.count_nonzero(p)) * voxel_ml, 4),
            "volume_ml_true": round(int(np.count_nonzero(t)) * voxel_ml, 4),
        }
    return out
