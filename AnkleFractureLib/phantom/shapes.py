"""Real bone shapes as signed-distance grids in the canonical right-ankle frame.

The "vh" phantom family draws its tibia, fibula and talus from real bone surfaces: the Visible
Human Female's two legs (triangle meshes segmented from the cryosection photographs by the
Center for Orthopaedic Biomechanics, University of Denver; CC BY 4.0; credit: Andreassen TE,
Hume DR, Hamilton LD, Walker KE, Higinbotham SE, Shelburne KB, "Three-dimensional lower
extremity musculoskeletal geometry of the Visible Human Female and Male", Scientific Data 2022,
doi:10.1038/s41597-022-01905-2; data doi:10.56902/COB.vh.2022.0).

Each leg is brought into the canonical frame of :mod:`AnkleFractureLib.phantom.anatomy` (right
ankle, LPS axes, mm; origin at the plafond centre; z along the tibial shaft axis; a left leg is
mirrored in x), then each bone is voxelised and stored as a signed distance grid (mm, negative
inside) clamped to +-15.9 mm and quantised to 1/8 mm in int8: about 1 MB for all bones, shipped
as ``Resources/Phantom/vh_shapes.npz`` and rebuilt from the meshes by
``scripts/build_vh_shapes.py``.

Grids are numpy arrays in (z, y, x) order; their ``origin`` is the (x, y, z) position in mm of
voxel [0, 0, 0] and ``step`` the voxel size in mm.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from scipy import ndimage

from AnkleFractureLib.errors import InputError, PathLike
from AnkleFractureLib.io.mesh import read_stl

#: int8 quantisation step (mm) of the stored distance grids; range +-127 steps.
SDF_QUANTUM_MM = 0.125
SDF_CLAMP_MM = 127 * SDF_QUANTUM_MM
#: Bones of a base shape, as stored.
BONES = ("tibia", "fibula", "talus")
#: Credit the licence asks for, repeated wherever a derived artefact is described.
VH_CREDIT = ("Bone surfaces: Andreassen TE, Hume DR, Hamilton LD, Walker KE, Higinbotham SE, "
             "Shelburne KB. Three-dimensional lower extremity musculoskeletal geometry of the "
             "Visible Human Female and Male. Scientific Data 2022, doi:10.1038/s41597-022-01905-2; "
             "data doi:10.56902/COB.vh.2022.0 (CC BY 4.0).")


@dataclass
class ShapeGrid:
    """A signed distance field on a regular grid (canonical frame, mm).

    Attributes:
        sdf: float32 array (z, y, x), signed distance in mm (negative inside).
        origin: (x, y, z) mm of voxel [0, 0, 0].
        step: Voxel size in mm (isotropic).
    """

    sdf: np.ndarray
    origin: np.ndarray
    step: float

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Trilinear signed distance (mm) at canonical points (1-D arrays, mm).

        Points outside the grid get the clamp distance plus their distance to the grid box,
        so they are always outside the bone.
        """
        o, s = self.origin, self.step
        fz, fy, fx = (z - o[2]) / s, (y - o[1]) / s, (x - o[0]) / s
        n = self.sdf.shape
        d = ndimage.map_coordinates(self.sdf, np.stack([fz, fy, fx]), order=1, mode="nearest",
                                    output=np.float32)
        out = np.maximum.reduce([-fz, fz - (n[0] - 1), -fy, fy - (n[1] - 1), -fx, fx - (n[2] - 1)])
        far = out > 0
        if far.any():
            d[far] = SDF_CLAMP_MM + out[far] * s
        return d

    def bounds(self) -> Tuple[np.ndarray, np.ndarray]:
        """(lo, hi) corners (x, y, z) mm of the grid."""
        hi = self.origin + self.step * (np.array(self.sdf.shape[::-1]) - 1)
        return self.origin.copy(), hi

    def quantised(self) -> np.ndarray:
        """The grid as int8 steps of :data:`SDF_QUANTUM_MM` (for storage)."""
        q = np.rint(np.clip(self.sdf, -SDF_CLAMP_MM, SDF_CLAMP_MM) / SDF_QUANTUM_MM)
        return q.astype(np.int8)


# ---------------------------------------------------------------------- voxelisation
def _surface_points(triangles: np.ndarray, spacing: float) -> np.ndarray:
    """Points on every triangle, at most ``spacing`` mm apart (barycentric lattice)."""
    edges = np.linalg.norm(triangles - np.roll(triangles, 1, axis=1), axis=2).max(axis=1)
    pts: List[np.ndarray] = [triangles.reshape(-1, 3)]
    for k in np.unique(np.ceil(edges / spacing).astype(int)):
        if k < 2:
            continue
        tri = triangles[np.ceil(edges / spacing).astype(int) == k]
        i, j = np.meshgrid(np.arange(k + 1), np.arange(k + 1), indexing="ij")
        keep = (i + j) <= k
        a, b = i[keep] / k, j[keep] / k
        w = np.stack([1.0 - a - b, a, b], axis=1)  # (m, 3) barycentric weights
        pts.append(np.einsum("mv,tvc->tmc", w, tri).reshape(-1, 3))
    return np.concatenate(pts)


def voxelise(triangles: np.ndarray, step: float = 0.5, margin: float = 6.0) -> ShapeGrid:
    """Signed distance grid of a closed triangle surface.

    The surface is sampled densely and marked on a ``step`` grid; the inside is what a hole
    fill of that shell encloses; the distance is the Euclidean distance to the nearest marked
    voxel (accurate to about half a step), negative inside.

    Args:
        triangles: (n, 3, 3) triangles in mm (canonical frame).
        step: Voxel size (mm).
        margin: Empty border (mm) around the surface's bounding box.

    Returns:
        The grid, float32.
    """
    pts = _surface_points(triangles, 0.5 * step)
    lo = pts.min(axis=0) - margin
    shape = tuple(int(v) for v in np.ceil((pts.max(axis=0) + margin - lo) / step)[::-1] + 1)
    idx = np.rint((pts - lo) / step).astype(np.int64)[:, ::-1]  # (z, y, x)
    shell = np.zeros(shape, bool)
    shell[idx[:, 0], idx[:, 1], idx[:, 2]] = True
    inside = ndimage.binary_fill_holes(shell)
    # Small closed pockets (a nutrient canal, a mesh fold) are bone for the phantom: fill each
    # axial slice too, which a long bone's cross-sections allow.
    for k in range(shape[0]):
        inside[k] = ndimage.binary_fill_holes(inside[k])
    inside &= ~shell
    dist = ndimage.distance_transform_edt(~shell, sampling=step).astype(np.float32)
    dist[inside] *= -1.0
    return ShapeGrid(dist, lo.astype(np.float64), float(step))


def downsample(grid: ShapeGrid, factor: int) -> ShapeGrid:
    """Every ``factor``-th voxel of a grid (distances are smooth: no filtering needed)."""
    return ShapeGrid(np.ascontiguousarray(grid.sdf[::factor, ::factor, ::factor]),
                     grid.origin.copy(), grid.step * factor)


# ---------------------------------------------------------------------- canonical frame
def _rotation_to_z(d: np.ndarray) -> np.ndarray:
    """Smallest rotation (3x3) taking unit vector ``d`` to +z."""
    d = d / np.linalg.norm(d)
    v = np.cross(d, [0.0, 0.0, 1.0])
    c = float(d[2])
    if np.linalg.norm(v) < 1e-9:
        return np.eye(3)
    k = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + k + k @ k / (1.0 + c)


def canonical_transform(tibia: np.ndarray, cartilage: np.ndarray) -> np.ndarray:
    """4x4 matrix from a right leg's LPS-oriented frame to the canonical frame.

    z follows the tibial shaft axis (a line fitted through the centroids of 10 mm slabs of the
    tibia's surface 60-220 mm above the distal cartilage); the origin is the plafond centre:
    the lowest tibial surface point within 3 mm (in the axial plane) of the distal tibial
    cartilage's centroid. Rotation about z is kept from the input frame.

    Args:
        tibia: Tibia surface points (m, 3), mm, right leg, LPS axes.
        cartilage: Distal tibial cartilage points (k, 3), same frame.
    """
    z0 = float(cartilage[:, 2].mean())
    centres = []
    for h in np.arange(60.0, 221.0, 10.0):
        sl = tibia[np.abs(tibia[:, 2] - (z0 + h)) < 2.0]
        if len(sl) > 20:
            centres.append(sl.mean(axis=0))
    c = np.asarray(centres)
    axis = np.linalg.svd(c - c.mean(axis=0))[2][0]
    axis = axis if axis[2] > 0 else -axis
    r = _rotation_to_z(axis)
    tib_r, cart_r = tibia @ r.T, cartilage @ r.T
    cx, cy = cart_r[:, :2].mean(axis=0)
    col = tib_r[np.hypot(tib_r[:, 0] - cx, tib_r[:, 1] - cy) < 3.0]
    col = col[col[:, 2] < cart_r[:, 2].max() + 15.0]
    if len(col) == 0:
        raise ValueError("no tibial surface above the distal cartilage")
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = -np.array([cx, cy, col[:, 2].min()])
    return m


#: Cryosection frame -> LPS axes per subject (VHF: x to the right, y anterior, z up).
_VH_TO_LPS = {"VHF": np.diag([-1.0, -1.0, 1.0])}
#: Base shapes: (subject, leg). A left leg is mirrored in x into a right-ankle shape.
VH_BASES = (("VHF", "Right"), ("VHF", "Left"))


def _vh_file(folder: Path, subject: str, leg: str, part: str) -> Path:
    return folder / subject / leg / f"{subject}_{leg}_{part}_smooth.stl"


def load_vh_leg(folder: PathLike, subject: str, leg: str) -> Dict[str, np.ndarray]:
    """One leg's meshes in its canonical right-ankle frame.

    Args:
        folder: The ``vh_bone_surfaces`` folder (``VHF/Right/VHF_Right_Bone_Tibia_smooth.stl``...).
        subject: "VHF" (the only subject with a tibia).
        leg: "Right" or "Left".

    Returns:
        Triangles (n, 3, 3) in canonical mm per bone ("tibia", "fibula", "talus") and the
        4x4 ``"to_canonical"`` matrix (cryosection mm -> canonical mm).
    """
    folder = Path(folder)
    if subject not in _VH_TO_LPS:
        raise InputError(folder, f"subject {subject!r} has no tibia surface; use one of {list(_VH_TO_LPS)}")
    parts = {"tibia": "Bone_Tibia", "fibula": "Bone_Fibula", "talus": "Bone_Talus",
             "cartilage": "Cartilage_TibiaDistal"}
    tris = {k: read_stl(_vh_file(folder, subject, leg, v)) for k, v in parts.items()}
    to_lps = np.eye(4)
    to_lps[:3, :3] = _VH_TO_LPS[subject] @ (np.diag([-1.0, 1.0, 1.0]) if leg == "Left" else np.eye(3))
    flat = {k: t.reshape(-1, 3) @ to_lps[:3, :3].T for k, t in tris.items()}
    m = canonical_transform(flat["tibia"], flat["cartilage"]) @ to_lps
    out = {k: (t.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]).reshape(-1, 3, 3)
           for k, t in tris.items() if k != "cartilage"}
    out["to_canonical"] = m
    return out


# ---------------------------------------------------------------------- the shipped library
@dataclass
class BaseShape:
    """One real leg's bones in the canonical frame.

    Attributes:
        name: e.g. "VHF_Right".
        bones: Signed distance grid per bone ("tibia", "fibula", "talus").
    """

    name: str
    bones: Dict[str, ShapeGrid]


def build_vh_library(folder: PathLike, step: float = 1.0) -> List[BaseShape]:
    """Voxelise every base leg of :data:`VH_BASES` (0.5 mm voxelisation, stored at ``step``)."""
    if not Path(folder).is_dir():
        raise InputError(folder, "folder of Visible Human bone surfaces does not exist")
    factor = max(1, int(round(step / 0.5)))
    shapes = []
    for subject, leg in VH_BASES:
        meshes = load_vh_leg(folder, subject, leg)
        bones = {b: downsample(voxelise(meshes[b], 0.5), factor) for b in BONES}
        shapes.append(BaseShape(f"{subject}_{leg}", bones))
    return shapes


def save_library(path: PathLike, shapes: List[BaseShape]) -> None:
    """Write base shapes to one compressed ``.npz`` (int8 distances; see module docstring)."""
    from AnkleFractureLib.io.atomic import atomic_output

    arrays: Dict[str, np.ndarray] = {"names": np.array([s.name for s in shapes])}
    for i, s in enumerate(shapes):
        for b, g in s.bones.items():
            arrays[f"{i}_{b}_sdf"] = g.quantised()
            arrays[f"{i}_{b}_origin"] = g.origin
            arrays[f"{i}_{b}_step"] = np.array(g.step)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def load_library(path: PathLike) -> List[BaseShape]:
    """Read base shapes written by :func:`save_library`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(path, "phantom shape library does not exist; rebuild it with "
                               "scripts/build_vh_shapes.py")
    with np.load(path) as z:
        names = [str(n) for n in z["names"]]
        shapes = []
        for i, name in enumerate(names):
            bones = {b: ShapeGrid(z[f"{i}_{b}_sdf"].astype(np.float32) * SDF_QUANTUM_MM,
                                  z[f"{i}_{b}_origin"].astype(np.float64), float(z[f"{i}_{b}_step"]))
                     for b in BONES}
            shapes.append(BaseShape(name, bones))
    return shapes


_CACHE: Dict[str, List[BaseShape]] = {}


def shipped_library() -> List[BaseShape]:
    """The shipped base shapes (``Resources/Phantom/vh_shapes.npz``), loaded once per process."""
    from AnkleFractureLib.resources import resource_path

    path = str(resource_path("Phantom", "vh_shapes.npz"))
    if path not in _CACHE:
        _CACHE[path] = load_library(path)
    return _CACHE[path]
