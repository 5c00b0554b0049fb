"""Bringing a segmentation onto its CT's grid before registration."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from AnkleFractureLib.errors import InputError
from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.preprocessing.resample import resample_like


def check_overlap(label: Volume, ct: Volume, where: Optional[object] = None) -> None:
    """Refuse a segmentation whose field of view does not overlap the CT's."""
    if not label.overlaps(ct):
        raise InputError(where if where is not None else label.meta.get("source"),
                         "the segmentation does not overlap the CT (their fields of view are "
                         "disjoint in physical space); was it made for another scan?")


def labels_on_ct_grid(label: Volume, ct: Volume) -> Tuple[Volume, Optional[str]]:
    """Return the label map on exactly the CT's grid, and a note when it had to be resampled.

    A segmentation saved on another grid (cropped, or at another spacing) is resampled with
    nearest-neighbour interpolation; one that does not overlap the CT at all is refused.

    Raises:
        InputError: The label map does not overlap the CT.
    """
    if label.same_geometry(ct, atol=1e-4):
        return label, None
    check_overlap(label, ct)
    arr = label.array
    if not np.issubdtype(arr.dtype, np.integer):
        label = label.with_array(np.rint(arr).astype(np.int16))
    on_ct = resample_like(label, ct, "nearest", default_value=0)
    return on_ct, "the segmentation was not on the CT's grid and was resampled onto it (nearest)"
