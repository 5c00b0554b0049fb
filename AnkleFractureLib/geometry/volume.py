"""The one image type of the library: voxels that carry their physical geometry.

Conventions (used everywhere in AnkleFractureLib):

* ``Volume.array`` is a numpy array in **(z, y, x)** order, i.e. ``array[k, j, i]`` is the
  voxel with ITK index ``(i, j, k)``. This is the order of ``SimpleITK.GetArrayFromImage``.
* ``spacing``, ``origin`` and ``size`` are in **ITK (x, y, z)** order. Spacing and origin are in
  millimetres.
* The physical frame is **LPS** (x towards the patient's left, y posterior, z superior), as in
  ITK and DICOM. Slicer's RAS frame appears only in :mod:`AnkleFractureLib.geometry.frames`.
* ``direction`` is a 3x3 matrix whose *columns* are the unit vectors of the i, j, k index axes in
  LPS (ITK's convention; ``SimpleITK.Image.GetDirection()`` is this matrix flattened row-major).

The physical position of ITK index ``(i, j, k)`` is::

    p = origin + direction @ (spacing * (i, j, k))

Example:
    >>> import numpy as np
    >>> v = Volume(np.zeros((4, 5, 6), np.int16), spacing=(0.5, 0.5, 2.0))
    >>> v.size
    (6, 5, 4)
    >>> v.index_to_physical([[2, 0, 1]]).tolist()
    [[1.0, 0.0, 2.0]]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from AnkleFractureLib.errors import GeometryError

Vec3 = Tuple[float, float, float]


def _vec3(values: Sequence[float], name: str) -> Vec3:
    arr = np.asarray(values, dtype=float).reshape(-1)
    if arr.shape != (3,):
        raise GeometryError(f"{name} must have 3 components (x, y, z), got {list(arr)}")
    if not np.all(np.isfinite(arr)):
        raise GeometryError(f"{name} must be finite, got {list(arr)}")
    return (float(arr[0]), float(arr[1]), float(arr[2]))


@dataclass
class Volume:
    """A 3D image with spacing, origin and direction in LPS millimetres.

    Args:
        array: Voxel values, shape (nz, ny, nx). CT volumes hold Hounsfield units; label maps
            hold small integers (0 background, 1 tibia, 2 fibula).
        spacing: Voxel size (x, y, z) in mm, all > 0.
        origin: LPS position (x, y, z) in mm of the centre of voxel (0, 0, 0).
        direction: 3x3 direction cosines, columns = i, j, k axes in LPS. Identity by default.
        meta: Free-form provenance (source path, modality, series UID, reader warnings).
    """

    array: np.ndarray
    spacing: Vec3 = (1.0, 1.0, 1.0)
    origin: Vec3 = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise GeometryError(f"a Volume needs a 3D array (z, y, x), got shape {self.array.shape}")
        self.spacing = _vec3(self.spacing, "spacing")
        if min(self.spacing) <= 0:
            raise GeometryError(f"spacing must be positive, got {self.spacing}")
        self.origin = _vec3(self.origin, "origin")
        d = np.asarray(self.direction, dtype=float)
        if d.size != 9:
            raise GeometryError(f"direction must be 3x3, got {d.size} values")
        d = d.reshape(3, 3)
        if not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
            raise GeometryError(f"direction must be orthonormal, got {d.tolist()}")
        self.direction = d

    # ------------------------------------------------------------------ shape and geometry
    @property
    def shape(self) -> Tuple[int, int, int]:
        """Array shape (nz, ny, nx)."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def size(self) -> Tuple[int, int, int]:
        """ITK size (nx, ny, nz)."""
        nz, ny, nx = self.shape
        return (nx, ny, nz)

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous ITK index (i, j, k, 1) to LPS mm."""
        a = np.eye(4)
        a[:3, :3] = self.direction @ np.diag(self.spacing)
        a[:3, 3] = self.origin
        return a

    def index_to_physical(self, ijk: np.ndarray) -> np.ndarray:
        """Map ITK indices (N, 3) in (i, j, k) order (may be fractional) to LPS mm (N, 3)."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        return ijk @ (self.direction @ np.diag(self.spacing)).T + np.asarray(self.origin)

    def physical_to_index(self, points: np.ndarray) -> np.ndarray:
        """Map LPS points (N, 3) in mm to continuous ITK indices (N, 3) in (i, j, k) order."""
        points = np.atleast_2d(np.asarray(points, dtype=float))
        m = self.direction @ np.diag(self.spacing)
        return np.linalg.solve(m, (points - np.asarray(self.origin)).T).T

    def superior_zyx(self) -> np.ndarray:
        """The patient's superior direction (LPS +z) per array axis, in numpy (z, y, x) order.

        A voxel at array index (k, j, i) lies ``(np.array([k, j, i]) * spacing[::-1]) @
        superior_zyx()`` mm above the voxel (0, 0, 0) (unit vector; direction row 2, reversed).

        Example:
            >>> v = Volume(np.zeros((4, 3, 2)), direction=np.diag([1.0, 1.0, -1.0]))
            >>> v.superior_zyx().tolist()
            [-1.0, 0.0, 0.0]
        """
        return np.asarray(self.direction, dtype=float)[2, ::-1].copy()

    def physical_extent(self) -> Tuple[np.ndarray, np.ndarray]:
        """Axis-aligned LPS bounding box (min, max) in mm of the voxel centres."""
        nx, ny, nz = self.size
        corners = np.array([[i, j, k] for i in (0, nx - 1) for j in (0, ny - 1) for k in (0, nz - 1)])
        pts = self.index_to_physical(corners)
        return pts.min(axis=0), pts.max(axis=0)

    def overlaps(self, other: "Volume") -> bool:
        """True when the two grids' axis-aligned LPS bounding boxes intersect (mm)."""
        lo1, hi1 = self.physical_extent()
        lo2, hi2 = other.physical_extent()
        return bool(np.all(hi1 >= lo2) and np.all(hi2 >= lo1))

    def same_geometry(self, other: "Volume", atol: float = 1e-5) -> bool:
        """True when ``other`` has the same grid (shape, spacing, origin, direction)."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )

    def region(self, box: Tuple[slice, slice, slice]) -> "Volume":
        """The sub-volume of the index box ``box`` (z, y, x slices with steps of 1): a view of
        the array with the origin moved so every voxel keeps its physical position."""
        start = np.array([box[2].start or 0, box[1].start or 0, box[0].start or 0], dtype=float)
        origin = self.index_to_physical(start[None, :])[0]
        return Volume(self.array[box], self.spacing, origin, self.direction.copy(),
                      dict(self.meta))

    def with_array(self, array: np.ndarray, meta: Optional[Dict[str, Any]] = None) -> "Volume":
        """A new Volume on this grid holding ``array`` (same shape required)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise GeometryError(f"array shape {array.shape} does not match the grid {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy(),
                      dict(self.meta if meta is None else meta))

    def copy(self) -> "Volume":
        """A deep copy (array and meta)."""
        return Volume(self.array.copy(), self.spacing, self.origin, self.direction.copy(), dict(self.meta))

    # ------------------------------------------------------------------ SimpleITK bridge
    def to_sitk(self) -> "Any":
        """Convert to a ``SimpleITK.Image`` with the same geometry (array is copied)."""
        import SimpleITK as sitk

        arr = self.array
        if arr.dtype == bool:
            arr = arr.astype(np.uint8)
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(tuple(float(v) for v in self.direction.reshape(-1)))
        return img

    @classmethod
    def from_sitk(cls, image: "Any", meta: Optional[Dict[str, Any]] = None) -> "Volume":
        """Build a Volume from a 3D ``SimpleITK.Image`` (single component)."""
        import SimpleITK as sitk

        if image.GetDimension() != 3:
            raise GeometryError(f"expected a 3D image, got {image.GetDimension()}D")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise GeometryError(
                f"expected one value per voxel, got {image.GetNumberOfComponentsPerPixel()}")
        return cls(
            sitk.GetArrayFromImage(image),
            spacing=image.GetSpacing(),
            origin=image.GetOrigin(),
            direction=np.asarray(image.GetDirection(), dtype=float).reshape(3, 3),
            meta=dict(meta or {}),
        )

    def __repr__(self) -> str:
        return (f"Volume(shape(z,y,x)={self.shape}, dtype={self.array.dtype}, "
                f"spacing={tuple(round(s, 4) for s in self.spacing)}, "
                f"origin={tuple(round(o, 3) for o in self.origin)})")
