"""Preprocessing shared by segmentation training and inference.

The network always sees the same thing: the bone region of the CT, reoriented to the canonical
axis order (index axes along +x, +y, +z LPS, exact permutation), resampled to the plans' model
spacing (linear, air outside) and windowed to [0, 1]. Training applies the identical steps to the
label map (nearest neighbour), so a hospital's data at any spacing or orientation trains the same
model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.preprocessing import (
    OrientationChange,
    normalize_hu,
    resample_like,
    resample_to_grid,
    to_canonical,
)
from AnkleFractureLib.segmentation.plans import SegPlans

#: HU used outside the CT's field of view (air).
AIR_HU = -1024.0

Box = Tuple[slice, slice, slice]


def bone_roi(ct: Volume, bone_hu: float, margin_mm: float) -> Box:
    """Index box (z, y, x slices) around the voxels above ``bone_hu`` plus ``margin_mm``.

    A coarse pass (every second voxel per axis) finds the bone; the box is the whole image when
    there is no bone, so the network still runs and says so.
    """
    step = 2
    coarse = ct.array[::step, ::step, ::step] > bone_hu
    if not coarse.any():
        return (slice(0, ct.shape[0]), slice(0, ct.shape[1]), slice(0, ct.shape[2]))
    box = []
    for axis, n in enumerate(ct.shape):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(coarse.any(axis=other))
        spacing_axis = ct.spacing[2 - axis]  # array axis 0 is z (ITK index k)
        margin = int(np.ceil(margin_mm / spacing_axis)) + step
        lo = max(int(idx[0]) * step - margin, 0)
        hi = min(int(idx[-1]) * step + step + margin, n)
        box.append(slice(lo, hi))
    return tuple(box)  # type: ignore[return-value]


@dataclass
class ModelInput:
    """The CT as the network sees it, and how to go back.

    Attributes:
        image: Volume on the model grid (canonical orientation, model spacing), float32 in
            [0, 1] after the HU window.
        roi: Index box (z, y, x slices) of the CT that was cropped.
        roi_volume: The CT restricted to ``roi`` (a view: its grid is where predictions return).
        canonical_shape: Shape (z, y, x) of the ROI in canonical orientation.
        orientation: The exact permutation/flip from the ROI to canonical orientation.

    The model grid tiles the canonical ROI exactly (same outer edges; the spacing is the plans'
    spacing adjusted by under half a voxel over the ROI so that the sizes are whole numbers), so
    a model-grid array maps back to the ROI with plain trilinear interpolation
    (``torch.nn.functional.interpolate``, ``align_corners=False``) and an exact axis permutation.
    """

    image: Volume
    roi: Box
    roi_volume: Volume
    canonical_shape: Tuple[int, int, int]
    orientation: OrientationChange


def prepare_ct(ct: Volume, plans: SegPlans, roi: Optional[Box] = None) -> ModelInput:
    """Crop to the bone region, reorient, resample to model spacing and window to [0, 1].

    Args:
        ct: CT in HU, any grid.
        plans: The model's plans.
        roi: Optional index box to use instead of the automatic bone region.

    Returns:
        The :class:`ModelInput`.
    """
    if roi is None:
        roi = bone_roi(ct, plans.roi_bone_hu, plans.roi_margin_mm)
    roi_volume = ct.region(roi)
    canonical, change = to_canonical(roi_volume)
    extent = np.asarray(canonical.size, dtype=float) * np.asarray(canonical.spacing)
    size = np.maximum(1, np.round(extent / np.asarray(plans.model_spacing_mm))).astype(int)
    # The model grid shares the ROI's outer edges: whole voxels of (almost) the model spacing.
    spacing = extent / size
    first_edge = canonical.index_to_physical(np.array([[-0.5, -0.5, -0.5]]))[0]
    origin = first_edge + canonical.direction @ (spacing / 2.0)
    resampled = resample_to_grid(canonical, size, spacing, origin, canonical.direction,
                                 "linear", AIR_HU)
    normalize_hu(resampled.array, plans.hu_window, out=resampled.array)
    return ModelInput(resampled, roi, roi_volume, canonical.shape, change)


def prepare_case(ct: Volume, label: Volume, plans: SegPlans) -> Tuple[Volume, Volume]:
    """Training pair on the model grid: (image float32 in [0, 1], label uint8), same geometry."""
    model_input = prepare_ct(ct, plans)
    lab_roi = label.region(model_input.roi)
    lab = resample_like(lab_roi, model_input.image, "nearest", 0)
    return model_input.image, lab.with_array(lab.array.astype(np.uint8))
