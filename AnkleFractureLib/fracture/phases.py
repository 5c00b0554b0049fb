"""Grid phases: the localiser read on the syndesmosis box sampled at sub-voxel offsets.

The crop samples the CT once per 1.5 mm voxel, at the voxel's centre. A hairline (0.2-1 mm)
that falls half-way between two sample planes is attenuated or lost, and one that falls on a
plane is sharp, so whether the same line is found depends on where the crop grid happens to
fall. Reading the box again with its grid moved by a fraction of a voxel (a *phase*), and
combining the line probabilities (mean or maximum) after moving each map back onto the box's
own grid, makes the answer depend less on that accident (test-time augmentation over the
sampling grid; the network and its training are unchanged).

Offsets are in the box frame (x, y, z) mm; maps and their shifts are numpy (z, y, x) voxels.
Off unless a localiser's plans ask for it (``plans.json`` ``inference.phases_mm``, a list of
offsets beside the box's own grid; ``inference.phase_combine``: "mean" (default) or "max").
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Sequence, Tuple

import numpy as np

from AnkleFractureLib.errors import InputError

#: How the maps of the phases are combined (plans.json ``inference.phase_combine``).
COMBINE = ("mean", "max")


def check_offsets(offsets_mm: Any) -> List[Tuple[float, float, float]]:
    """The plans' phase offsets as (x, y, z) mm tuples.

    Raises:
        InputError: Not a list of three finite numbers each.

    Example:
        >>> check_offsets([[0.75, 0.75, 0.75]])
        [(0.75, 0.75, 0.75)]
    """
    out = []
    for d in offsets_mm or []:
        v = np.asarray(d, dtype=float).reshape(-1)
        if v.shape != (3,) or not np.all(np.isfinite(v)):
            raise InputError(None, f"plans.json inference.phases_mm: each offset is [x, y, z] "
                                   f"mm, got {d!r}")
        out.append((float(v[0]), float(v[1]), float(v[2])))
    return out


def shifted_template(template: Any, offset_mm: Sequence[float]) -> Any:
    """The template with its syndesmosis box moved by ``offset_mm`` (x, y, z along the box's
    own axes, mm); size, axes and spacing unchanged."""
    box = template.box
    moved = dataclasses.replace(box, centre=box.centre + box.axes @ np.asarray(offset_mm, float))
    return dataclasses.replace(template, box=moved)


def offset_voxels(offset_mm: Sequence[float], spacing_xyz: Sequence[float]) -> np.ndarray:
    """An (x, y, z) mm offset as a numpy (z, y, x) shift in voxels of the crop grid."""
    v = np.asarray(offset_mm, float) / np.asarray(spacing_xyz, float)
    return v[::-1].copy()


def back_on_grid(prob: np.ndarray, shift_zyx: Sequence[float]) -> np.ndarray:
    """A map read on a grid moved by ``shift_zyx`` voxels, resampled onto the unmoved grid.

    Voxel ``m`` of the moved grid lies at ``m + shift`` of the unmoved one, so the unmoved
    grid's voxel ``m`` reads the moved map at ``m - shift`` (linear; the edge value beyond).

    Example:
        >>> ramp = np.arange(6, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2))
        >>> back_on_grid(ramp + 0.5, (0.5, 0.0, 0.0))[1:4, 0, 0].tolist()   # read 0.5 higher
        [1.0, 2.0, 3.0]
    """
    from scipy import ndimage

    return ndimage.shift(np.asarray(prob, np.float32), np.asarray(shift_zyx, float), order=1,
                         mode="nearest", prefilter=False)


def combine(maps: Sequence[np.ndarray], how: str = "mean") -> np.ndarray:
    """Combine the maps of the phases (all on the box's own grid).

    Raises:
        InputError: ``how`` not one of :data:`COMBINE`.

    Example:
        >>> a, b = np.array([0.9, 0.2]), np.array([0.3, 0.2])
        >>> [[round(float(v), 2) for v in combine([a, b], how)] for how in ("mean", "max")]
        [[0.6, 0.2], [0.9, 0.2]]
    """
    if how not in COMBINE:
        raise InputError(None, f"plans.json inference.phase_combine must be one of "
                               f"{list(COMBINE)}, got {how!r}")
    stack = np.stack([np.asarray(m, np.float32) for m in maps])
    return stack.mean(axis=0) if how == "mean" else stack.max(axis=0)
