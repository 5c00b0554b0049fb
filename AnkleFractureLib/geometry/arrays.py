"""Small array helpers shared by every stage (no geometry beyond index space)."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np

Slices = Tuple[slice, slice, slice]


def bounding_box(mask: np.ndarray, pad: Union[int, Sequence[int]] = 0) -> Optional[Slices]:
    """Index slices (z, y, x) of the smallest box holding every non-zero voxel, or None.

    Args:
        mask: 3D array (z, y, x); any dtype, non-zero counts (no full-size boolean copy of a
            label map is made).
        pad: Voxels added on every side (clipped to the array): one number, or one per axis
            (z, y, x).

    Example:
        >>> m = np.zeros((4, 5, 6), np.uint8); m[1, 2:4, 3] = 2
        >>> bounding_box(m)
        (slice(1, 2, None), slice(2, 4, None), slice(3, 4, None))
        >>> bounding_box(m, (1, 0, 9))
        (slice(0, 3, None), slice(2, 4, None), slice(0, 6, None))
    """
    # Reduce along two axes at a time instead of np.nonzero: on a 512 x 512 x 350 label map this
    # is ~20 ms instead of ~1 s, and the second reduction only visits the occupied slab.
    z = np.flatnonzero(mask.any(axis=(1, 2)))
    if z.size == 0:
        return None
    yx = mask[z[0]:z[-1] + 1].any(axis=0)
    y = np.flatnonzero(yx.any(axis=1))
    x = np.flatnonzero(yx.any(axis=0))
    lo = (int(z[0]), int(y[0]), int(x[0]))
    hi = (int(z[-1]) + 1, int(y[-1]) + 1, int(x[-1]) + 1)
    pads = [int(pad)] * 3 if np.ndim(pad) == 0 else [int(v) for v in pad]  # type: ignore
    return tuple(slice(max(a - p, 0), min(b + p, n))  # type: ignore[return-value]
                 for a, b, p, n in zip(lo, hi, pads, mask.shape))


def affine_matrix_problem(matrix: object) -> Optional[str]:
    """Why ``matrix`` is not a finite, invertible 4x4 affine matrix (last row 0 0 0 1), or None.

    Callers raise their own error with the reason: a transform file gives an InputError naming
    the file, an in-memory matrix a GeometryError.

    Example:
        >>> affine_matrix_problem(np.eye(4)) is None, affine_matrix_problem(np.zeros((4, 4)))
        (True, 'the last row must be (0, 0, 0, 1), got [0.0, 0.0, 0.0, 0.0]')
    """
    m = np.asarray(matrix, dtype=float)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        return f"expected a finite 4x4 matrix, got shape {m.shape}"
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0]):
        return f"the last row must be (0, 0, 0, 1), got {m[3].tolist()}"
    if abs(np.linalg.det(m[:3, :3])) < 1e-6:
        return "the matrix is singular"
    return None
