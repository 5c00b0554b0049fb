"""Label maps spoilt in the ways a segmentation fails, to test a label-free quality check.

A check that compares labels with the CT (:mod:`AnkleFractureLib.segmentation.quality`) must
pass correct labels and flag wrong ones. These corruptions of a correct tibia (1) / fibula (2)
label map are the wrong ones it is measured on (``scripts/seg_quality_calibration.py``) and
tested with (``Testing/test_seg_quality.py``):

* ``eroded``: a blob inside each bone (tibia eroded 4 voxels, fibula 2): cortex and much of the
  marrow left out, what the first network did on real distal tibiae;
* ``swapped``: tibia and fibula swapped on 3 slices of every 10 along the leg;
* ``shifted``: the whole map moved 5 mm to the patient's left;
* ``foot``: every bone voxel (HU > 250) more than 2 mm below the tibia's lowest point labelled
  fibula (foot bones taken for leg);
* ``grown``: both bones grown 3 voxels into the soft tissue.

Geometry: arrays are numpy (z, y, x); the axes of the leg (LPS z) and of the patient's left
(LPS x) are found from the direction matrix, so any grid orientation works.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
from scipy import ndimage

from AnkleFractureLib.geometry.volume import Volume

#: The corruption kinds, in the order the calibration reports them.
KINDS: Tuple[str, ...] = ("eroded", "swapped", "shifted", "foot", "grown")


def numpy_axis(vol: Volume, lps: int) -> int:
    """The numpy axis of ``vol`` closest to LPS axis ``lps`` (0 x, 1 y, 2 z)."""
    return 2 - int(np.argmax(np.abs(vol.direction[lps])))


def lps_z(vol: Volume) -> np.ndarray:
    """LPS z (mm) of every voxel centre, broadcastable to the (z, y, x) array."""
    m = vol.direction @ np.diag(vol.spacing)
    nz, ny, nx = vol.shape
    return (vol.origin[2] + m[2, 0] * np.arange(nx)[None, None, :]
            + m[2, 1] * np.arange(ny)[None, :, None] + m[2, 2] * np.arange(nz)[:, None, None])


def corrupt_labels(ct: Volume, label: Volume, kind: str) -> Volume:
    """A correct label map spoilt in one way (see the module docstring).

    Args:
        ct: The CT (HU), numpy (z, y, x).
        label: Its correct label map (1 tibia, 2 fibula) on the CT's grid.
        kind: One of :data:`KINDS`.

    Returns:
        The corrupted label map (same grid, uint8).

    Raises:
        ValueError: Unknown kind.

    Example:
        >>> lab = np.zeros((10, 20, 20), np.uint8); lab[:, 4:12, 4:12] = 1
        >>> ct = Volume(np.where(lab > 0, 1200, 0).astype(np.int16))
        >>> int((corrupt_labels(ct, Volume(lab), "grown").array == 1).sum()) > int(lab.sum())
        True
    """
    if kind not in KINDS:
        raise ValueError(f"unknown corruption {kind!r}; expected one of {list(KINDS)}")
    lab = label.array.astype(np.uint8, copy=True)
    if kind == "eroded":
        out = np.zeros_like(lab)
        for value, it in ((1, 4), (2, 2)):
            out[ndimage.binary_erosion(lab == value, iterations=it)] = value
        lab = out
    elif kind == "swapped":
        view = np.moveaxis(lab, numpy_axis(ct, 2), 0)
        idx = np.arange(view.shape[0]) % 10 < 3
        sub = view[idx]
        view[idx] = np.where(sub == 1, 2, np.where(sub == 2, 1, sub))
    elif kind == "shifted":
        x = numpy_axis(ct, 0)
        lab = np.roll(lab, int(round(5.0 / ct.spacing[2 - x])), axis=x)
    elif kind == "foot":
        z = np.broadcast_to(lps_z(ct), lab.shape)
        tibia = lab == 1
        if tibia.any():
            bottom = float(z[tibia].min())
            lab[(ct.array > 250) & (z < bottom - 2.0) & (lab == 0)] = 2
    else:  # grown
        for value in (1, 2):
            grown = ndimage.binary_dilation(label.array == value, iterations=3)
            lab[grown & (lab == 0)] = value
    return label.with_array(lab)
