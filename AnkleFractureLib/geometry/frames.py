"""The single place where LPS (ITK, DICOM, this library) meets RAS (3D Slicer).

Both frames share the superior axis; RAS flips x (right vs left) and y (anterior vs
posterior). Every conversion in the project goes through these helpers.

Example:
    >>> import numpy as np
    >>> lps_points_to_ras(np.array([[1.0, 2.0, 3.0]])).tolist()
    [[-1.0, -2.0, 3.0]]
"""

from __future__ import annotations

import numpy as np

#: Homogeneous 4x4 matrix that maps LPS coordinates to RAS (and, being its own inverse, back).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
RAS_TO_LPS = LPS_TO_RAS


def lps_points_to_ras(points: np.ndarray) -> np.ndarray:
    """Convert points (N, 3) in LPS mm to RAS mm."""
    return np.asarray(points, dtype=float) * np.array([-1.0, -1.0, 1.0])


def ras_points_to_lps(points: np.ndarray) -> np.ndarray:
    """Convert points (N, 3) in RAS mm to LPS mm."""
    return lps_points_to_ras(points)


def lps_matrix_to_ras(matrix: np.ndarray) -> np.ndarray:
    """Express a 4x4 point transform given in LPS as the same transform in RAS."""
    return LPS_TO_RAS @ np.asarray(matrix, dtype=float) @ RAS_TO_LPS


def ras_matrix_to_lps(matrix: np.ndarray) -> np.ndarray:
    """Express a 4x4 point transform given in RAS as the same transform in LPS."""
    return RAS_TO_LPS @ np.asarray(matrix, dtype=float) @ LPS_TO_RAS


def lps_affine_to_ras(affine: np.ndarray) -> np.ndarray:
    """A 4x4 voxel-index -> LPS mm affine as the index -> RAS mm affine (Slicer's IJKToRAS)."""
    return LPS_TO_RAS @ np.asarray(affine, dtype=float)


def ras_affine_to_lps(affine: np.ndarray) -> np.ndarray:
    """A 4x4 voxel-index -> RAS mm affine (Slicer's IJKToRAS) as the index -> LPS mm affine."""
    return RAS_TO_LPS @ np.asarray(affine, dtype=float)
