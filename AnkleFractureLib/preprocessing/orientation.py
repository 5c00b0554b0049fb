"""Reorientation to the canonical axis order without interpolation.

A scan may be stored with its index axes in any order or sense (a sagittal acquisition, a
feet-first series with flipped slices). :func:`to_canonical` permutes and flips the voxel array
so that index axis i runs along +x (patient left), j along +y (posterior) and k along +z
(superior), i.e. the direction matrix becomes the closest signed permutation to identity ("LPS"
orientation in ITK's naming). The voxels are unchanged (an exact permutation), so
:meth:`OrientationChange.undo` restores the original grid bit for bit. An oblique residual
rotation is kept in the direction matrix.

Example:
    >>> import numpy as np
    >>> d = np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]])   # a sagittal-like grid
    >>> v = Volume(np.arange(24).reshape(2, 3, 4), spacing=(1, 2, 3), direction=d)
    >>> c, change = to_canonical(v)
    >>> np.round(c.direction).astype(int).tolist()
    [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    >>> bool(np.array_equal(change.undo(c).array, v.array))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations
from typing import Tuple

import numpy as np

from AnkleFractureLib.errors import GeometryError
from AnkleFractureLib.geometry.volume import Volume


@dataclass(frozen=True)
class OrientationChange:
    """How :func:`to_canonical` reordered a grid, so the change can be undone exactly.

    Attributes:
        perm: ``perm[a]`` is the output index axis (0=i/x, 1=j/y, 2=k/z) that input index axis
            ``a`` became.
        flips: ``flips[a]`` is True when input index axis ``a`` was reversed.
        size: Original ITK size (nx, ny, nz).
        spacing: Original spacing (x, y, z) in mm.
        origin: Original origin (x, y, z) in LPS mm.
        direction: Original 3x3 direction (columns = index axes in LPS).
    """

    perm: Tuple[int, int, int]
    flips: Tuple[bool, bool, bool]
    size: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: np.ndarray

    @property
    def is_identity(self) -> bool:
        """True when the grid was already canonical (no permutation, no flip)."""
        return self.perm == (0, 1, 2) and not any(self.flips)

    def undo(self, volume: Volume) -> Volume:
        """Map a Volume on the canonical grid back onto the original grid (exact, no interpolation)."""
        xyz = volume.array.transpose(2, 1, 0)
        expected = tuple(self.size[self.perm.index(p)] for p in range(3))
        if xyz.shape != expected:
            raise GeometryError(
                f"volume of size {xyz.shape} is not on the canonical grid of size {expected}")
        # Undo the flips (they act on the output axes), then the permutation.
        for a, flipped in enumerate(self.flips):
            if flipped:
                xyz = np.flip(xyz, axis=self.perm[a])
        xyz = xyz.transpose(self.perm)
        return Volume(np.ascontiguousarray(xyz.transpose(2, 1, 0)), self.spacing, self.origin,
                      self.direction.copy(), dict(volume.meta))


def physical_axis_of_index(direction: np.ndarray) -> Tuple[int, int, int]:
    """The physical axis (0 x, 1 y, 2 z) each ITK index axis (i, j, k) runs along most.

    The assignment is a permutation even for 45-degree obliques: the one of the six that
    maximises the summed ``|direction[physical, index]|``: a 3 x 3 linear assignment, solved by
    trying all six (SciPy's ``linear_sum_assignment`` gives the same answer but importing
    :mod:`scipy.optimize` costs a cold run 0.14 s). An exact tie (an exact 45-degree oblique)
    goes to the first permutation in lexicographic order; SciPy may pick the other one, and
    either is a valid canonical grid.

    Args:
        direction: (3, 3) ITK direction matrix (columns are the index axes in LPS).

    Returns:
        ``perm`` with ``perm[index_axis] = physical_axis``.

    Example:
        >>> physical_axis_of_index(np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]]))
        (1, 2, 0)
    """
    weight = np.abs(np.asarray(direction, dtype=float))
    best, best_sum = (0, 1, 2), -1.0
    for perm in permutations(range(3)):
        total = float(sum(weight[perm[a], a] for a in range(3)))
        if total > best_sum + 1e-12:
            best, best_sum = perm, total
    return (int(best[0]), int(best[1]), int(best[2]))


def to_canonical(volume: Volume) -> Tuple[Volume, OrientationChange]:
    """Permute and flip ``volume`` so its index axes follow +x, +y, +z (LPS) as closely as possible.

    Args:
        volume: Any Volume.

    Returns:
        (canonical Volume, the change that :meth:`OrientationChange.undo` reverses). The
        physical position of every voxel is unchanged.
    """
    d = volume.direction
    perm = list(physical_axis_of_index(d))
    flips = [bool(d[perm[a], a] < 0) for a in range(3)]
    inv = [perm.index(p) for p in range(3)]

    size = volume.size
    start = [size[a] - 1 if flips[a] else 0 for a in range(3)]
    origin = volume.index_to_physical(np.array([start]))[0]
    new_dir = np.zeros((3, 3))
    for p in range(3):
        a = inv[p]
        new_dir[:, p] = (-1.0 if flips[a] else 1.0) * d[:, a]
    new_spacing = tuple(volume.spacing[inv[p]] for p in range(3))

    xyz = volume.array.transpose(2, 1, 0).transpose(inv)
    for p in range(3):
        if flips[inv[p]]:
            xyz = np.flip(xyz, axis=p)
    canonical = Volume(np.ascontiguousarray(xyz.transpose(2, 1, 0)), new_spacing, origin, new_dir,
                       dict(volume.meta))
    change = OrientationChange(tuple(perm), tuple(flips), volume.size, volume.spacing,
                               volume.origin, volume.direction.copy())
    return canonical, change
