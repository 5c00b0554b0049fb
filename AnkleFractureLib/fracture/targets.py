"""Training targets of the fracture localiser: the fibular fracture line on the crop grid.

The phantom knows its fracture exactly (``meta["fracture"]``: the cut surface in the anatomy
frame, the fragment's rigid motion and ``anatomy_to_patient``). The target is the band of crop
voxels within ``half_width_mm`` of either fracture surface (the parent's, fixed, and the
displaced fragment's, moved) that lie in or next to the fibula, i.e. the fracture line through
the bone, not the whole plane.

Axis orders: crop arrays are numpy (z, y, x); points are (N, 3) in (x, y, z) mm.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
from scipy import ndimage

from AnkleFractureLib.geometry.volume import Volume

#: Half width (mm) of the target band around a fracture surface.
HALF_WIDTH_MM = 2.0
#: How far (mm) outside the fibula mask the band still counts (the gap and the fragment's
#: moved surface lie just outside the mask; the mask leaves an unlabelled band at the line).
MASK_MARGIN_MM = 3.0


def grid_points(grid: Volume) -> np.ndarray:
    """Voxel centres (N, 3), in (x, y, z) mm of the grid's frame, in numpy (z, y, x) ravel
    order."""
    nz, ny, nx = grid.shape
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1).astype(float)
    return grid.index_to_physical(ijk)


def _surface_distance(cut: Any, q: np.ndarray) -> np.ndarray:
    """|signed distance| (mm) of anatomy-frame points (N, 3) to the nearer of the two fracture
    surfaces (parent side and moved fragment side)."""
    x, y, z = (q[:, i].astype(np.float32) for i in range(3))
    d_parent = np.abs(cut.side(x, y, z))
    fx, fy, fz = cut.inverse_points(x, y, z)
    d_frag = np.abs(cut.side(fx, fy, fz))
    return np.minimum(d_parent, d_frag)


def fracture_line_target(fracture: Optional[Dict[str, Any]], anatomy_to_patient: Any,
                         grid: Volume, patient_to_grid: np.ndarray, fibula: np.ndarray,
                         half_width_mm: float = HALF_WIDTH_MM) -> np.ndarray:
    """The fibular fracture line as a binary map on a crop grid.

    Args:
        fracture: The phantom's ``meta["fracture"]`` (None or missing for an intact fibula).
        anatomy_to_patient: 4x4 anatomy mm -> patient LPS mm (``meta["anatomy_to_patient"]``).
        grid: The crop grid (its frame is the one ``patient_to_grid`` maps to, e.g. template
            mm), array shape (nz, ny, nx).
        patient_to_grid: 4x4 patient LPS mm -> grid frame mm.
        fibula: Fibula mask on the crop grid, float or bool (nz, ny, nx).
        half_width_mm: Half width of the band (patient mm).

    Returns:
        uint8 (nz, ny, nx): 1 on the fracture line through the fibula, 0 elsewhere (all zero
        without a fracture).
    """
    shape = grid.shape
    if not fracture:
        return np.zeros(shape, np.uint8)
    from AnkleFractureLib.phantom.fractures import PlaneCut

    cut = PlaneCut.from_dict(fracture)
    grid_to_anat = np.linalg.inv(np.asarray(anatomy_to_patient, float)) @ \
        np.linalg.inv(np.asarray(patient_to_grid, float))
    pts = grid_points(grid)
    q = pts @ grid_to_anat[:3, :3].T + grid_to_anat[:3, 3]
    near_surface = _surface_distance(cut, q).reshape(shape) <= half_width_mm + 0.5 * cut.gap_mm
    spacing = float(min(grid.spacing))
    steps = max(1, int(round(MASK_MARGIN_MM / spacing)))
    near_bone = ndimage.binary_dilation(np.asarray(fibula) > 0.5, iterations=steps)
    return (near_surface & near_bone).astype(np.uint8)


def annotated_line_target(line: Volume, grid: Volume, patient_to_grid: np.ndarray,
                          fibula: np.ndarray, half_width_mm: float = HALF_WIDTH_MM
                          ) -> np.ndarray:
    """A reader's fracture line (a mask on the CT) as the localiser's target on a crop grid.

    Every annotated voxel centre is mapped into the grid's frame; the target is the band of
    crop voxels within ``half_width_mm`` of one of them that lie in or next to the fibula,
    the same band :func:`fracture_line_target` draws around a phantom's exact fracture surface.
    A one-voxel-thin line on a fine CT still marks every crop voxel it passes through.

    Args:
        line: Mask on the CT's grid (numpy (z, y, x); non-zero on the line), patient LPS mm.
        grid: The crop grid (frame of ``patient_to_grid``, e.g. template mm), shape (nz, ny, nx).
        patient_to_grid: 4x4 patient LPS mm -> grid frame mm.
        fibula: Fibula mask on the crop grid, float or bool (nz, ny, nx).
        half_width_mm: Half width of the band (grid mm).

    Returns:
        uint8 (nz, ny, nx): 1 on the line's band through the fibula (all zero when the line is
        empty or outside the crop).

    Example:
        >>> ct = Volume(np.zeros((20, 20, 20), np.uint8), spacing=(1.0, 1.0, 1.0))
        >>> mask = np.zeros((20, 20, 20), np.uint8); mask[10, 5:15, 5:15] = 1
        >>> fib = np.ones((20, 20, 20), bool)
        >>> t = annotated_line_target(ct.with_array(mask), ct, np.eye(4), fib, 1.0)
        >>> int(t[10].sum()), int(t[12].sum())   # the line's slice is marked, 2 mm away is not
        (140, 0)
    """
    idx = np.argwhere(np.asarray(line.array) > 0)[:, ::-1].astype(float)  # (i, j, k)
    target = np.zeros(grid.shape, bool)
    if len(idx):
        p2g = np.asarray(patient_to_grid, float)
        pts = line.index_to_physical(idx) @ p2g[:3, :3].T + p2g[:3, 3]
        ijk = np.rint(grid.physical_to_index(pts)).astype(int)
        inside = np.all((ijk >= 0) & (ijk < np.array(grid.shape)[::-1]), axis=1)
        target[ijk[inside, 2], ijk[inside, 1], ijk[inside, 0]] = True
    if not target.any():
        return target.astype(np.uint8)
    radius = np.asarray(half_width_mm / np.asarray(grid.spacing, float)[::-1])  # (z, y, x) vox
    r = np.ceil(radius).astype(int)
    zz, yy, xx = np.ogrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1, -r[2]:r[2] + 1]
    ball = (zz / max(radius[0], 1e-6)) ** 2 + (yy / max(radius[1], 1e-6)) ** 2 + \
        (xx / max(radius[2], 1e-6)) ** 2 <= 1.0
    band = ndimage.binary_dilation(target, structure=ball)
    steps = max(1, int(round(MASK_MARGIN_MM / float(min(grid.spacing)))))
    near_bone = ndimage.binary_dilation(np.asarray(fibula) > 0.5, iterations=steps)
    return (band & near_bone).astype(np.uint8)
