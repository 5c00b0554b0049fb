"""Surface point clouds of labelled bones, for surface registration.

A bone's surface is sampled as the centres of its *boundary voxels*: the voxels of the mask that
are not in its 6-connected erosion (a voxel with at least one face neighbour outside the mask,
or on the edge of the image). Points are returned in physical LPS millimetres, (N, 3) in
(x, y, z) order, so they can be compared across images with different grids or directions.

Speed matters because clinical volumes are 512 x 512 x ~350 voxels: the mask is cropped to its
bounding box before any morphology, and the erosion is done with array slicing (no
``scipy.ndimage`` structuring-element pass over the full volume).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from AnkleFractureLib.geometry.arrays import bounding_box
from AnkleFractureLib.geometry.volume import Volume

#: Label values of the bones (0 is background).
TIBIA = 1
FIBULA = 2


def boundary_voxels(mask: np.ndarray) -> np.ndarray:
    """Boundary of a boolean mask: mask minus its 6-connected erosion.

    Voxels outside the array count as background, so a mask touching the image edge has a
    boundary there too (the cut surface of a bone at the edge of the field of view).

    Args:
        mask: Boolean array, shape (nz, ny, nx).

    Returns:
        Boolean array of the same shape, True on boundary voxels.
    """
    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    core = padded[1:-1, 1:-1, 1:-1]
    eroded = core.copy()
    # A voxel survives the erosion only if all six face neighbours are in the mask.
    eroded &= padded[:-2, 1:-1, 1:-1]
    eroded &= padded[2:, 1:-1, 1:-1]
    eroded &= padded[1:-1, :-2, 1:-1]
    eroded &= padded[1:-1, 2:, 1:-1]
    eroded &= padded[1:-1, 1:-1, :-2]
    eroded &= padded[1:-1, 1:-1, 2:]
    return core & ~eroded


def surface_points(label: Volume, value: int, max_points: int = 4000, seed: int = 0,
                   exclude_edges: bool = False) -> np.ndarray:
    """Points on the boundary of the mask ``label.array == value``, in LPS mm.

    Args:
        label: Label map, array (z, y, x).
        value: Label value of the structure (1 tibia, 2 fibula).
        max_points: Upper bound on the number of returned points (>= 0). When the boundary has
            more voxels, a deterministic random subset (without replacement) is returned.
        seed: Seed of the subsampling; the same inputs and seed give the same points.
        exclude_edges: Leave out the boundary voxels on the outer faces of the image: there
            the field of view cut the bone, which is not a bone surface (registration uses
            this; the subset is drawn after the exclusion).

    Returns:
        Array (N, 3) of LPS (x, y, z) mm positions of boundary-voxel centres, N <= max_points,
        ordered by voxel index (z, y, x). Shape (0, 3) when the mask is empty.
    """
    max_points = int(max_points)
    if max_points < 0:
        raise ValueError(f"max_points must be >= 0, got {max_points}")
    arr = label.array
    mask = arr == value
    box = bounding_box(mask)
    if box is None or max_points == 0:
        return np.zeros((0, 3), dtype=float)
    boundary = boundary_voxels(mask[box])
    if exclude_edges:
        # Only the faces of the bounding box that are also faces of the image can hold them.
        for axis, sl in enumerate(box):
            index = [slice(None)] * 3
            if sl.start == 0:
                index[axis] = 0
                boundary[tuple(index)] = False
            if sl.stop == arr.shape[axis]:
                index[axis] = -1
                boundary[tuple(index)] = False
    kji = np.argwhere(boundary)  # (M, 3) in (z, y, x) order, sorted
    if kji.shape[0] > max_points:
        rng = np.random.default_rng(int(seed))
        keep = np.sort(rng.choice(kji.shape[0], size=max_points, replace=False))
        kji = kji[keep]
    offset = np.array([box[0].start, box[1].start, box[2].start])
    ijk = (kji + offset)[:, ::-1]  # to ITK (i, j, k) = (x, y, z) index order
    return label.index_to_physical(ijk)


def labelled_surface_points(label: Volume, max_points_per_bone: int = 4000, seed: int = 0,
                            exclude_edges: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Surface points of the tibia (1) and fibula (2) with their labels.

    Args:
        label: Label map, array (z, y, x): 0 background, 1 tibia, 2 fibula.
        max_points_per_bone: Upper bound on the points of each bone.
        seed: Subsampling seed (the fibula uses ``seed + 1`` so the two draws are independent).
        exclude_edges: Leave out the cut faces at the image's edges (see :func:`surface_points`).

    Returns:
        (points, point_labels): points (N, 3) LPS mm, tibia points first; point_labels (N,) int
        with 1 for tibia and 2 for fibula. A missing bone contributes no points.
    """
    tib = surface_points(label, TIBIA, max_points_per_bone, seed, exclude_edges)
    fib = surface_points(label, FIBULA, max_points_per_bone, seed + 1, exclude_edges)
    points = np.concatenate([tib, fib], axis=0)
    labels = np.concatenate([np.full(len(tib), TIBIA, dtype=int), np.full(len(fib), FIBULA, dtype=int)])
    return points, labels


#: Surface points of one bone closer than this (mm) belong to one piece: a fracture fragment
#: (gap 0.5-2 mm, displaced up to about 8 mm) joins its bone, while a stray blob a segmentation
#: put far away (e.g. a foot bone labelled tibia 50 mm below the joint) stays apart.
LINK_MM = 12.0


def main_pieces(points: np.ndarray, point_labels: np.ndarray, link_mm: float = LINK_MM
                ) -> np.ndarray:
    """Mask of the points that belong to the largest piece of their bone.

    Points of one label are linked when closer than ``link_mm``; per label, only the linked
    group with the most points is kept. Registration uses it so that a stray false-positive
    blob far from the bone cannot pull the fit (a 766-voxel foot-bone blob labelled tibia,
    57 mm below the plafond, dragged a fit 37 mm along the shaft).

    Args:
        points: (N, 3) mm.
        point_labels: (N,) labels.
        link_mm: Linking distance (mm).

    Returns:
        (N,) bool, True for the points to keep.

    Example:
        >>> pts = np.array([[0, 0, 0], [5, 0, 0], [9, 0, 0], [80, 0, 0], [0, 0, 0.0]])
        >>> main_pieces(pts, np.array([1, 1, 1, 1, 2])).tolist()
        [True, True, True, False, True]
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    points = np.asarray(points, dtype=float)
    point_labels = np.asarray(point_labels).reshape(-1)
    keep = np.zeros(len(points), dtype=bool)
    for value in np.unique(point_labels):
        idx = np.flatnonzero(point_labels == value)
        pairs = cKDTree(points[idx]).query_pairs(link_mm, output_type="ndarray")
        graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])),
                           shape=(len(idx), len(idx)))
        _, comp = connected_components(graph, directed=False)
        keep[idx[comp == np.bincount(comp).argmax()]] = True
    return keep


def surface_normals(label: Volume, points: np.ndarray, point_labels: np.ndarray,
                    sigma_mm: float = 1.0) -> np.ndarray:
    """Unit surface normals (N, 3), LPS, at surface points of a label map.

    The normal of a point of bone ``v`` is the gradient of the bone's mask smoothed with a
    Gaussian of ``sigma_mm``, taken in physical space (so anisotropic spacing and any direction
    matrix are handled) and interpolated at the point. Its sign (inward) does not matter for
    point-to-plane ICP.

    Args:
        label: Label map (0 background, 1 tibia, 2 fibula).
        points: (N, 3) LPS mm points on the bones' surfaces.
        point_labels: (N,) label of each point.
        sigma_mm: Smoothing in mm.
    """
    from scipy import ndimage

    points = np.asarray(points, dtype=float)
    point_labels = np.asarray(point_labels).reshape(-1)
    normals = np.zeros_like(points)
    sx, sy, sz = label.spacing
    for value in np.unique(point_labels).tolist():
        rows = np.flatnonzero(point_labels == value)
        mask = label.array == value
        box = bounding_box(mask)
        if box is None:
            continue
        pad = [int(np.ceil(3 * sigma_mm / s)) + 1 for s in (sz, sy, sx)]
        box = tuple(slice(max(b.start - p, 0), min(b.stop + p, n))
                    for b, p, n in zip(box, pad, mask.shape))
        smooth = ndimage.gaussian_filter(mask[box].astype(np.float32),
                                         [sigma_mm / s for s in (sz, sy, sx)])
        gk, gj, gi = np.gradient(smooth, sz, sy, sx)  # per mm along the k, j, i index axes
        ijk = label.physical_to_index(points[rows]) - np.array([box[2].start, box[1].start,
                                                                box[0].start])
        coords = ijk[:, ::-1].T  # (3, n) in array (k, j, i) order
        g = np.stack([ndimage.map_coordinates(c, coords, order=1, mode="nearest")
                      for c in (gi, gj, gk)], axis=1)
        normals[rows] = g @ label.direction.T  # index-axis derivatives -> LPS gradient
    norms = np.linalg.norm(normals, axis=1, keepdims=True)
    return normals / np.maximum(norms, 1e-12)
