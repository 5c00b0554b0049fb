"""The leg a label map shows: its plafond, one leg out of two, and registering it as ``run`` does.

Shared by the pipeline (``ankle-fracture run``) and the code that makes training crops, so that
a model is trained on crops registered exactly as the crops it will see:

* :func:`estimate_plafond`: the tibial plafond of the largest tibia, which anchors the fit
  (``register_to_template(..., plafond_hint=...)``);
* :func:`select_leg`: one leg's bones of a label map that holds both legs;
* :func:`register_as_run`: side detected, anchored on the plafond; a scan refused because both
  legs are in view is registered on a given side's leg alone, as a user answers that refusal.

Axis orders: label arrays are numpy (z, y, x); points are (N, 3) LPS mm (x, y, z).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from AnkleFractureLib.errors import AnkleFractureError
from AnkleFractureLib.geometry.volume import Volume

TIBIA = 1
#: Voxels examined per bone in the label-only estimates (larger masks are strided).
MAX_VOXELS = 2_000_000


def stride_for(shape: Sequence[int]) -> int:
    """Stride that brings a volume of ``shape`` to at most :data:`MAX_VOXELS` voxels."""
    n = float(np.prod(shape))
    return max(1, int(np.ceil((n / MAX_VOXELS) ** (1.0 / 3.0))))


def mask_points(label: Volume, mask: np.ndarray, stride: int) -> np.ndarray:
    """LPS mm (N, 3) of the true voxels of a strided mask of ``label``'s grid."""
    kji = np.argwhere(mask) * stride
    return label.index_to_physical(kji[:, ::-1]) if len(kji) else np.zeros((0, 3))


def main_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask."""
    comps, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask
    sizes = np.bincount(comps.reshape(-1))[1:]
    return comps == int(np.argmax(sizes)) + 1


def main_tibia(label: Volume) -> Tuple[np.ndarray, int]:
    """(strided mask of the largest tibia component, stride)."""
    stride = stride_for(label.shape)
    return main_component(label.array[::stride, ::stride, ::stride] == TIBIA), stride


def estimate_plafond(label: Volume) -> Optional[np.ndarray]:
    """The tibial plafond (LPS mm) of the label map's largest tibia, or None when not found.

    :func:`~AnkleFractureLib.registration.template.find_plafond` (within about 1 mm on the
    phantoms, medial malleolus fractures included) on the bounding box of the largest tibia
    component, so a second leg's tibia does not bend the axis.
    """
    from AnkleFractureLib.registration.template import find_plafond

    mask, stride = main_tibia(label)
    idx = np.argwhere(mask)
    if len(idx) < 10:
        return None
    lo = np.maximum(idx.min(axis=0) * stride - stride, 0)
    hi = np.minimum(idx.max(axis=0) * stride + 2 * stride, label.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    sub = label.region(box)  # type: ignore[arg-type]
    tibia = sub.with_array((sub.array == TIBIA).astype(np.uint8))
    try:
        return np.asarray(find_plafond(tibia), dtype=float)
    except (AnkleFractureError, ValueError, np.linalg.LinAlgError):
        return None


def select_leg(label: Volume, side: str) -> Tuple[Volume, Optional[float]]:
    """Keep the ``side`` leg's bones of a label map that holds both legs.

    The labelled voxels are split in two groups by their left-right (LPS x) position (1-D
    two-means); the patient's left leg lies at larger x. When the groups are closer than two
    legs can be (``LEGS_MIN_DISTANCE_MM``), the map holds one leg and is returned unchanged.

    Args:
        label: Label map (1 tibia, 2 fibula), any grid.
        side: "left" or "right".

    Returns:
        (label map with the other leg's voxels set to 0, split x in LPS mm or None).
    """
    from AnkleFractureLib.registration.side import LEGS_MIN_DISTANCE_MM

    stride = stride_for(label.shape)
    pts = mask_points(label, label.array[::stride, ::stride, ::stride] > 0, stride)
    if len(pts) < 20:
        return label, None
    x = pts[:, 0]
    a, b = np.percentile(x, 10), np.percentile(x, 90)
    for _ in range(30):  # 1-D two-means
        split = 0.5 * (a + b)
        lo, hi = x[x <= split], x[x > split]
        if not len(lo) or not len(hi):
            return label, None
        a2, b2 = float(lo.mean()), float(hi.mean())
        if abs(a2 - a) < 1e-3 and abs(b2 - b) < 1e-3:
            break
        a, b = a2, b2
    if b - a < LEGS_MIN_DISTANCE_MM:
        return label, None
    split = 0.5 * (a + b)
    kji = np.argwhere(label.array > 0)
    xs = label.index_to_physical(kji[:, ::-1])[:, 0]
    drop = kji[(xs <= split) if side == "left" else (xs > split)]
    arr = label.array.copy()
    arr[drop[:, 0], drop[:, 1], drop[:, 2]] = 0
    return label.with_array(arr), float(split)


def register_as_run(ct: Volume, label: Volume, template: Any, dataset_side: Optional[str]
                    ) -> Tuple[Volume, Any]:
    """Register a case's labels the way ``ankle-fracture run`` does (for training crops).

    The side is detected (never the dataset's), and the fit is anchored on the plafond found
    on the labels. A scan refused because both legs are in view is registered again with
    ``dataset_side`` on that leg's labels alone, as a user answers the refusal by giving the
    side (``evaluate-fracture`` does the same).

    Args:
        ct: The case's CT (HU).
        label: Its label map (1 tibia, 2 fibula) on the CT's grid.
        template: The registration template.
        dataset_side: "left"/"right" from the dataset, used only after a both-legs refusal.

    Returns:
        (the label map that was registered (one leg), the registration).

    Raises:
        AnkleFractureError: The registration failed (the message says why).
    """
    from AnkleFractureLib.registration.register import register_to_template

    try:
        return label, register_to_template(label, template, side="auto", ct=ct,
                                           plafond_hint=estimate_plafond(label))
    except AnkleFractureError as exc:
        if "both legs" not in str(exc) or dataset_side not in ("left", "right"):
            raise
    leg, _ = select_leg(label, dataset_side)
    return leg, register_to_template(leg, template, side=dataset_side, ct=ct,
                                     plafond_hint=estimate_plafond(leg))
