"""Crop the tibiofibular syndesmosis region (template box) from a CT, and map results back.

The crop grid is the template's syndesmosis box (:class:`SyndesmosisBox`, template mm). A CT
is sampled on it through ``patient_to_template`` (4x4, patient LPS mm -> template mm; it holds
the x-mirror of a left ankle), so every crop shows a right ankle in the same anatomical frame:

* channel 0 ``ct``: HU, linear interpolation (-1024 HU outside the CT), then the reference
  window [-1000, 1000] HU mapped to [0, 1];
* channel 1 ``tibia`` and 2 ``fibula``: the binary masks, linearly interpolated, in [0, 1];
* beside them, ``ct_bone``: the same CT samples in the bone window
  (:data:`~AnkleFractureLib.preprocessing.intensity.BONE_HU_WINDOW`), which keeps the cortex
  that the reference window saturates (the fracture localiser reads it);
* on request (:func:`min_pooled_bone`), ``ct_bone_min``: the bone window again, each voxel the
  lowest of 27 samples spread over it instead of the one at its centre, so a fracture gap
  thinner than a voxel stays in the voxel that holds it;
* on request (:func:`sub_sampled_bone`), ``ct_bone_sub0`` ... ``ct_bone_sub7``: the bone window
  sampled at the 8 octant centres of each voxel (0.75 mm apart on the 1.5 mm grid), the CT at
  twice the crop's resolution folded into 8 arrays on the crop's grid (space to depth), so a
  network on the 1.5 mm grid sees what a 0.75 mm one would, edges as they are.

:func:`crop_to_ct_box` maps any array on the crop grid (e.g. a Grad-CAM heatmap) back onto the
CT's lattice, kept to the box the crop covers (how a heatmap is stored); :func:`paste_on_grid`
expands such a box onto the whole CT grid for display, and :func:`crop_to_ct` does both.
:func:`write_crop` stores a crop as one 3-component vector NIfTI (``.nii.gz``) that 3D Slicer
loads as a vector volume with the crop grid's geometry.

Speed: only the part of the CT under the mapped box (plus a 2-voxel halo) is handed to ITK,
so a clinical 512 x 512 x 350 CT costs about as much as a small one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from AnkleFractureLib.errors import AnkleFractureError, GeometryError, InputError, PathLike
from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.preprocessing.intensity import BONE_HU_WINDOW, normalize_hu
from AnkleFractureLib.preprocessing.resample import resample_to_grid
from AnkleFractureLib.registration.template import SyndesmosisBox, Template, default_box

#: Channel names, in the order of :attr:`SyndesmosisCrop.channels`.
CHANNELS = ("ct", "tibia", "fibula")
#: The 8 sub-voxel samples of :func:`sub_sampled_bone`, octant (z, y, x) = bits (4, 2, 1).
SUB_CHANNELS = tuple(f"ct_bone_sub{i}" for i in range(8))
#: :data:`CHANNELS` and the crop's other arrays a model may read, in the order of
#: :meth:`SyndesmosisCrop.stacked` (``ct_bone``: the CT in the bone window; ``ct_bone_min``:
#: the same, min-pooled over each voxel, :func:`min_pooled_bone`; :data:`SUB_CHANNELS`: the
#: same at 0.75 mm, :func:`sub_sampled_bone`).
ALL_CHANNELS = CHANNELS + ("ct_bone", "ct_bone_min") + SUB_CHANNELS
#: Samples per voxel edge of :func:`min_pooled_bone` (3: 27 per voxel, 0.5 mm apart on the
#: 1.5 mm crop grid).
MIN_POOL_FACTOR = 3
#: Samples per voxel edge of :func:`sub_sampled_bone` (2: 8 per voxel, 0.75 mm apart).
SUB_FACTOR = 2
#: CT value (HU) used where the crop grid leaves the CT's field of view (air).
OUTSIDE_HU = -1024.0
#: HU threshold of "bone" for the raw-CT control crop's centre.
BONE_HU = 300.0
#: HU above which a crop voxel is metal (implants: steel and titanium read 2500 HU and more,
#: saturating at 3071; cortical bone stays below ~2000 HU).
METAL_HU = 2500.0


@dataclass
class SyndesmosisCrop:
    """A syndesmosis crop.

    Attributes:
        channels: float32 (3, nz, ny, nx): normalised CT [0, 1], tibia mask, fibula mask.
        grid: Volume on the crop grid (template mm for :func:`crop_syndesmosis`); its array is
            the CT channel; spacing/origin/direction (x, y, z) describe the grid.
        patient_to_template: 4x4 matrix, patient LPS mm -> the crop grid's frame (mm).
        coverage: Fraction of crop voxels whose centre maps inside the CT's field of view.
        meta: Provenance ({"kind", "mirrored"}).
        in_scan: bool (nz, ny, nx): voxel centre inside the CT's field of view (None: unknown,
            e.g. a crop read back from a file).
        metal: bool (nz, ny, nx): the CT reads at least :data:`METAL_HU` there (None: unknown).
        ct_bone: float32 (nz, ny, nx): the CT in the bone window, [0, 1] (None: unknown).
        ct_bone_min: float32 (nz, ny, nx): :func:`min_pooled_bone` (None: not computed).
        ct_bone_sub: float32 (8, nz, ny, nx): :func:`sub_sampled_bone` (None: not computed).
        phases: The same box sampled with its grid moved by a fraction of a voxel, as
            (shift (z, y, x) voxels, crop) pairs, for a localiser that reads several grid
            phases (:mod:`AnkleFractureLib.fracture.phases`; empty otherwise).
    """

    channels: np.ndarray
    grid: Volume
    patient_to_template: np.ndarray
    coverage: float = 1.0
    meta: Dict[str, Any] = field(default_factory=dict)
    in_scan: Optional[np.ndarray] = field(default=None, repr=False)
    metal: Optional[np.ndarray] = field(default=None, repr=False)
    ct_bone: Optional[np.ndarray] = field(default=None, repr=False)
    ct_bone_min: Optional[np.ndarray] = field(default=None, repr=False)
    ct_bone_sub: Optional[np.ndarray] = field(default=None, repr=False)
    phases: List[Tuple[np.ndarray, "SyndesmosisCrop"]] = field(default_factory=list, repr=False)

    def stacked(self, names: Sequence[str] = ALL_CHANNELS) -> np.ndarray:
        """The named arrays (:data:`ALL_CHANNELS`) as float32 (len(names), nz, ny, nx).

        Raises:
            InputError: An unknown name, ``ct_bone`` asked of a crop that has none (one read
                back from a file: crop the CT again), or ``ct_bone_min`` or a sub-voxel
                array of a crop without it (:func:`min_pooled_bone`, :func:`sub_sampled_bone`).
        """
        parts = []
        for name in names:
            if name in CHANNELS:
                parts.append(self.channels[CHANNELS.index(name)])
            elif name in SUB_CHANNELS:
                if self.ct_bone_sub is None:
                    raise InputError(None, "this crop has no sub-voxel bone-window CT; add it "
                                           "with sub_sampled_bone(ct, crop)")
                parts.append(self.ct_bone_sub[SUB_CHANNELS.index(name)])
            elif name in ("ct_bone", "ct_bone_min") and getattr(self, name) is not None:
                parts.append(getattr(self, name))
            elif name == "ct_bone":
                raise InputError(None, "this crop has no bone-window CT (a crop read back from a "
                                       "file has only ct, tibia and fibula); crop the CT again")
            elif name == "ct_bone_min":
                raise InputError(None, "this crop has no min-pooled bone-window CT; add it with "
                                       "min_pooled_bone(ct, crop)")
            else:
                raise InputError(None, f"unknown crop channel {name!r}; known: "
                                       f"{', '.join(ALL_CHANNELS)}")
        return np.stack(parts).astype(np.float32, copy=False)


# ---------------------------------------------------------------------- helpers
def _check_matrix(matrix: np.ndarray) -> np.ndarray:
    from AnkleFractureLib.geometry.arrays import affine_matrix_problem

    problem = affine_matrix_problem(matrix)
    if problem:
        raise GeometryError(f"patient_to_template: {problem}")
    return np.asarray(matrix, dtype=float)


def _grid_points(size: Sequence[int], spacing: np.ndarray, origin: np.ndarray,
                 direction: np.ndarray) -> np.ndarray:
    """Voxel-centre positions (N, 3) of a grid, in its own frame, ITK index order."""
    nx, ny, nz = (int(s) for s in size)
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1).astype(float)
    return ijk @ (np.asarray(direction) @ np.diag(spacing)).T + np.asarray(origin)


def _inside(ct: Volume, points_lps: np.ndarray) -> np.ndarray:
    """bool (N,): LPS points inside the CT's field of view (voxel edges included)."""
    idx = ct.physical_to_index(points_lps)
    hi = np.asarray(ct.size, dtype=float) - 0.5
    return np.all((idx >= -0.5) & (idx <= hi), axis=1)


def _sub_box(ct: Volume, points_lps: np.ndarray, halo: int = 2
             ) -> Optional[Tuple[slice, slice, slice]]:
    """Index slices (z, y, x) of the CT covering ``points_lps`` plus a halo; None if disjoint."""
    idx = ct.physical_to_index(points_lps)
    lo = np.floor(idx.min(axis=0)).astype(int) - halo
    hi = np.ceil(idx.max(axis=0)).astype(int) + halo + 1
    size = np.asarray(ct.size)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, size)
    if np.any(hi <= lo):
        return None
    return slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0])


def _box_corner_points(size: Sequence[int], spacing: np.ndarray, origin: np.ndarray,
                       direction: np.ndarray) -> np.ndarray:
    """The 8 outer corners (voxel faces) of a grid, in its own frame."""
    n = np.asarray(size, dtype=float)
    c = np.array([[a, b, d] for a in (-0.5, n[0] - 0.5) for b in (-0.5, n[1] - 0.5)
                  for d in (-0.5, n[2] - 0.5)])
    return c @ (np.asarray(direction) @ np.diag(spacing)).T + np.asarray(origin)


def _sample(ct: Volume, label: Optional[Volume], t2p: np.ndarray, size: Sequence[int],
            spacing: np.ndarray, origin: np.ndarray, direction: np.ndarray
            ) -> Tuple[np.ndarray, float, np.ndarray, np.ndarray, np.ndarray]:
    """(channels (3, nz, ny, nx) float32, coverage, in-scan mask, metal mask, bone-window CT)
    of the grid mapped into the CT by ``t2p`` (masks bool, CT float32, (nz, ny, nx))."""
    nx, ny, nz = (int(s) for s in size)
    centres = _grid_points(size, spacing, origin, direction)
    in_scan = _inside(ct, centres @ t2p[:3, :3].T + t2p[:3, 3]).reshape(nz, ny, nx)
    coverage = float(in_scan.mean()) if in_scan.size else 0.0
    if coverage <= 0.0:
        raise AnkleFractureError(
            "the syndesmosis box lies outside the CT's field of view (no crop voxel maps inside "
            "the CT); check the registration (patient_to_template) and that the scan covers the "
            "distal tibia and fibula")
    corners = _box_corner_points(size, spacing, origin, direction)
    sub = _sub_box(ct, corners @ t2p[:3, :3].T + t2p[:3, 3])
    channels = np.zeros((3, nz, ny, nx), np.float32)
    if sub is None:  # pragma: no cover - coverage > 0 implies overlap
        air = np.full((nz, ny, nx), OUTSIDE_HU)
        channels[0] = normalize_hu(air)
        return (channels, coverage, in_scan, np.zeros_like(in_scan),
                normalize_hu(air, BONE_HU_WINDOW))
    ct_sub = ct.region(sub)
    ct_on = resample_to_grid(ct_sub, size, spacing, origin, direction, "linear", OUTSIDE_HU,
                             transform=t2p)
    metal = ct_on.array >= METAL_HU
    normalize_hu(ct_on.array, out=channels[0])
    ct_bone = normalize_hu(ct_on.array, BONE_HU_WINDOW)
    if label is not None:
        lab_sub = label.array[sub]
        for c, value in ((1, 1), (2, 2)):
            mask = label.region(sub).with_array((lab_sub == value).astype(np.uint8))
            on = resample_to_grid(mask, size, spacing, origin, direction, "linear", 0.0,
                                  transform=t2p)
            np.clip(on.array, 0.0, 1.0, out=channels[c])
    return channels, coverage, in_scan, metal, ct_bone


def _fine_bone(ct: Volume, crop: SyndesmosisCrop, factor: int) -> Optional[np.ndarray]:
    """The CT (HU) on the crop grid refined ``factor`` times along each axis, as
    (nz, f, ny, f, nx, f): voxel (k, j, i)'s samples at [k, :, j, :, i, :], evenly spread over
    it (a sample's offset from the centre is (s + 0.5) / f - 0.5 voxels, s = 0 ... f - 1).
    None when the box misses the CT."""
    size = tuple(int(n) for n in crop.grid.shape[::-1])
    spacing = np.asarray(crop.grid.spacing, float)
    direction = np.asarray(crop.grid.direction, float)
    fine = spacing / factor
    origin = np.asarray(crop.grid.origin, float) - direction @ (fine * (factor - 1) / 2.0)
    fine_size = [n * factor for n in size]
    t2p = np.linalg.inv(np.asarray(crop.patient_to_template, float))
    corners = _box_corner_points(size, spacing, np.asarray(crop.grid.origin, float), direction)
    sub = _sub_box(ct, corners @ t2p[:3, :3].T + t2p[:3, 3])
    if sub is None:
        return None
    nx, ny, nz = size
    on = resample_to_grid(ct.region(sub), fine_size, fine, origin, direction, "linear",
                          OUTSIDE_HU, transform=t2p).array
    return on.reshape(nz, factor, ny, factor, nx, factor)


def min_pooled_bone(ct: Volume, crop: SyndesmosisCrop, factor: int = MIN_POOL_FACTOR
                    ) -> np.ndarray:
    """The CT on the crop grid in the bone window, each voxel the lowest of ``factor``**3
    samples spread evenly over it.

    The crop samples the CT once per voxel, at its centre, 1.5 mm apart: a fracture gap
    thinner than that (a hairline, 0.2-1 mm) falls between two samples or onto one, depending
    on where the grid happens to lie, so the same line is sharp in one scan and gone in the
    next. The lowest of samples 0.5 mm apart keeps the gap in the voxel that holds it, whatever
    the grid's phase (at the price of darker voxels where bone meets soft tissue).

    Args:
        ct: The CT (HU) the crop was sampled from.
        crop: The crop (its grid and ``patient_to_template``).
        factor: Samples per voxel edge.

    Returns:
        float32 (nz, ny, nx) in [0, 1] (:data:`BONE_HU_WINDOW`; outside the CT: air).
    """
    fine = _fine_bone(ct, crop, factor)
    if fine is None:
        return np.zeros(crop.grid.shape, np.float32)
    return normalize_hu(fine.min(axis=(1, 3, 5)), BONE_HU_WINDOW)


def sub_sampled_bone(ct: Volume, crop: SyndesmosisCrop) -> np.ndarray:
    """The CT in the bone window at twice the crop's resolution, folded onto the crop grid.

    Each 1.5 mm crop voxel gets its 8 octant centres' samples (0.75 mm apart, offsets of a
    quarter voxel from its centre), array ``4 * bz + 2 * by + bx`` holding octant (bz, by, bx)
    (0: the lower half along that axis). Unlike :func:`min_pooled_bone` nothing is pooled: a
    gap thinner than a voxel shows in the octants that hold it, while a bone's edge stays an
    edge, and a network on the crop grid reads the CT at 0.75 mm (what the localiser's hairline
    lines need) for the cost of 8 input channels.

    Args:
        ct: The CT (HU) the crop was sampled from.
        crop: The crop (its grid and ``patient_to_template``).

    Returns:
        float32 (8, nz, ny, nx) in [0, 1] (:data:`BONE_HU_WINDOW`; outside the CT: air).

    Example:
        >>> import numpy as np
        >>> from types import SimpleNamespace
        >>> ramp = Volume(np.tile(np.arange(8.0) * 100, (8, 8, 1)).astype(np.float32))
        >>> grid = Volume(np.zeros((2, 2, 2), np.float32), (2, 2, 2), (2.5, 2.5, 2.5))
        >>> sub = sub_sampled_bone(ramp, SimpleNamespace(grid=grid, patient_to_template=np.eye(4)))
        >>> sub.shape, bool(sub[1, 0, 0, 0] > sub[0, 0, 0, 0])  # octant bx = 1 lies further along x
        ((8, 2, 2, 2), True)
    """
    f = SUB_FACTOR
    fine = _fine_bone(ct, crop, f)
    if fine is None:
        return np.zeros((f ** 3,) + tuple(crop.grid.shape), np.float32)
    octants = fine.transpose(1, 3, 5, 0, 2, 4).reshape((f ** 3,) + tuple(crop.grid.shape))
    return normalize_hu(np.ascontiguousarray(octants), BONE_HU_WINDOW)


# ---------------------------------------------------------------------- public API
def crop_syndesmosis(ct: Volume, label: Optional[Volume], patient_to_template: np.ndarray,
                     template: Template) -> SyndesmosisCrop:
    """Sample the CT and the bone masks on the template's syndesmosis box.

    Args:
        ct: CT volume (HU), any grid/direction.
        label: Label map on exactly the CT's grid (1 tibia, 2 fibula), or None (mask
            channels are then zero).
        patient_to_template: 4x4 patient LPS mm -> template mm (x-mirror included for a left
            ankle).
        template: The template (its ``box`` defines the crop grid).

    Returns:
        The crop: channels (3, nz, ny, nx) float32 with (nz, ny, nx) = ``template.box.shape``;
        ``grid`` on the box grid in template mm; ``coverage`` = fraction of crop voxels inside
        the CT (the pipeline should warn when it is well below 1).

    Raises:
        GeometryError: The label map is not on the CT's grid, or a bad matrix.
        AnkleFractureError: The box maps entirely outside the CT's field of view.
    """
    if label is not None and not label.same_geometry(ct, atol=1e-4):
        raise GeometryError(
            f"the label map is not on the CT's grid (label {label.shape} spacing "
            f"{label.spacing} origin {label.origin}; CT {ct.shape} spacing {ct.spacing} origin "
            f"{ct.origin}); resample it onto the CT first")
    p2t = _check_matrix(patient_to_template)
    t2p = np.linalg.inv(p2t)
    size, spacing, origin, direction = template.box.grid()
    channels, coverage, in_scan, metal, ct_bone = _sample(ct, label, t2p, size, spacing,
                                                          origin, direction)
    grid = Volume(channels[0], spacing, origin, direction,
                  {"frame": "template", "channels": list(CHANNELS)})
    mirrored = bool(np.linalg.det(p2t[:3, :3]) < 0)
    return SyndesmosisCrop(channels, grid, p2t, coverage,
                           {"kind": "syndesmosis", "mirrored": mirrored}, in_scan, metal, ct_bone)


def _bone_centre(ct: Volume) -> np.ndarray:
    """LPS centre of the bounding box of bone (HU > 300), robust to a few stray voxels.

    Uses every second voxel per axis and the 0.5th-99.5th percentiles of the bone voxel
    indices; falls back to the image centre when there is no bone.
    """
    arr = ct.array[::2, ::2, ::2]
    kji = np.argwhere(arr > BONE_HU)
    if kji.shape[0] < 10:
        return ct.index_to_physical(((np.asarray(ct.size) - 1) / 2.0)[None, :])[0]
    lo = np.percentile(kji, 0.5, axis=0)
    hi = np.percentile(kji, 99.5, axis=0)
    centre_kji = 2.0 * (lo + hi) / 2.0
    return ct.index_to_physical(centre_kji[::-1][None, :])[0]


def crop_raw_ct(ct: Volume, size_mm: Sequence[float] = (96.0, 72.0, 144.0),
                spacing_mm: Sequence[float] = (1.5, 1.5, 1.5),
                centre: str = "bone") -> SyndesmosisCrop:
    """The control crop: same size, no segmentation, no registration, no mirroring.

    An LPS-axis-aligned box of ``size_mm`` (the syndesmosis box's size by default) centred on
    the centre of the bounding box of bone (HU > 300; ``centre="bone"``, the default: tibia,
    fibula and hindfoot, so roughly the ankle joint) or on the image centre
    (``centre="image"``). The crop grid is in patient LPS mm, so ``patient_to_template`` is
    the identity and :func:`crop_to_ct` works on it unchanged. Mask channels are zero.

    Args:
        ct: CT volume (HU).
        size_mm: Box edge lengths (x, y, z) mm.
        spacing_mm: Grid spacing (x, y, z) mm.
        centre: "bone" or "image".

    Returns:
        The crop (``meta["centre_lps"]`` records the centre).
    """
    if centre not in ("bone", "image"):
        raise ValueError(f"centre must be 'bone' or 'image', got {centre!r}")
    if centre == "bone":
        c = _bone_centre(ct)
    else:
        c = ct.index_to_physical(((np.asarray(ct.size) - 1) / 2.0)[None, :])[0]
    box = SyndesmosisBox(c, np.eye(3), np.asarray(size_mm, float), np.asarray(spacing_mm, float))
    size, spacing, origin, direction = box.grid()
    channels, coverage, in_scan, metal, ct_bone = _sample(ct, None, np.eye(4), size, spacing,
                                                          origin, direction)
    grid = Volume(channels[0], spacing, origin, direction,
                  {"frame": "patient", "channels": list(CHANNELS)})
    return SyndesmosisCrop(channels, grid, np.eye(4), coverage,
                           {"kind": "raw", "centre": centre, "centre_lps": [float(v) for v in c]},
                           in_scan, metal, ct_bone)


def crop_to_ct_box(array: np.ndarray, crop: SyndesmosisCrop, ct: Volume,
                   interpolation: str = "linear", default_value: float = 0.0,
                   clip: Optional[Tuple[float, float]] = None) -> Volume:
    """Map an array on the crop grid onto the CT's grid, kept to the box the crop covers.

    The result lies on the CT's voxel lattice (same spacing and direction, origin moved to the
    box's first voxel, see :meth:`Volume.region`) and covers only the CT voxels under the
    mapped crop box plus one voxel: a few percent of a clinical grid. This is how a Grad-CAM
    heatmap is stored; :func:`paste_on_grid` expands it onto the whole CT grid for display.

    Args:
        array: (nz, ny, nx) values on ``crop.grid``.
        crop: The crop it belongs to (grid + patient_to_template).
        ct: The CT whose lattice the output takes (only its geometry is used).
        interpolation: "linear" or "nearest" (or "bspline").
        default_value: Value where the box's voxels fall outside the crop.
        clip: Optional (low, high) the mapped values are clipped to.

    Returns:
        float32 Volume on a sub-box of the CT's grid; meta ``ct_box`` = [[z0, z1], [y0, y1],
        [x0, x1]] (numpy index ranges on the CT). When the crop box misses the CT entirely, a
        single voxel at the CT's index (0, 0, 0) holding ``default_value``.

    Raises:
        GeometryError: ``array`` does not have the crop grid's shape.
    """
    arr = np.asarray(array)
    if arr.shape != crop.grid.shape:
        raise GeometryError(f"array shape {arr.shape} does not match the crop grid "
                            f"{crop.grid.shape} (nz, ny, nx)")
    src = crop.grid.with_array(arr.astype(np.float32, copy=False), meta={})
    p2t = _check_matrix(crop.patient_to_template)
    t2p = np.linalg.inv(p2t)
    corners = _box_corner_points(src.size, np.asarray(src.spacing), np.asarray(src.origin),
                                 src.direction)
    sub = _sub_box(ct, corners @ t2p[:3, :3].T + t2p[:3, 3], halo=1)
    if sub is None:
        sub = (slice(0, 1),) * 3
        values = np.full((1, 1, 1), default_value, np.float32)
    else:
        target = ct.region(sub)
        res = resample_to_grid(src, target.size, target.spacing, target.origin,
                               target.direction, interpolation, default_value, transform=p2t)
        values = np.ascontiguousarray(res.array, dtype=np.float32)
        if clip is not None:
            np.clip(values, clip[0], clip[1], out=values)
    # A view of the CT's array would be wrong here: only the geometry of the region is used.
    box = ct.region(sub)
    return Volume(values, box.spacing, box.origin, box.direction,
                  {"source": "crop_to_ct", "frame": "patient",
                   "ct_box": [[int(s.start), int(s.stop)] for s in sub]})


def box_on_grid(box: Volume, ct: Volume, atol: float = 1e-3
                ) -> Optional[Tuple[slice, slice, slice]]:
    """Where a sub-box volume lies on a CT's grid, or None when it is not on its lattice.

    Args:
        box: A volume such as :func:`crop_to_ct_box` returns.
        ct: The CT.
        atol: Tolerance (mm for spacing, voxel fraction for the origin's index).

    Returns:
        Numpy index slices (z, y, x) of the CT that ``box`` covers exactly, or None when the
        spacing or direction differ, the origin is not on a CT voxel centre, or the box does
        not fit inside the CT.
    """
    if not (np.allclose(box.spacing, ct.spacing, atol=atol)
            and np.allclose(box.direction, ct.direction, atol=atol)):
        return None
    start = ct.physical_to_index(np.asarray(box.origin, float)[None, :])[0]  # (i, j, k)
    first = np.rint(start).astype(int)
    if not np.allclose(start, first, atol=atol):
        return None
    stop = first + np.asarray(box.size)
    if np.any(first < 0) or np.any(stop > np.asarray(ct.size)):
        return None
    return (slice(int(first[2]), int(stop[2])), slice(int(first[1]), int(stop[1])),
            slice(int(first[0]), int(stop[0])))


def paste_on_grid(box: Volume, ct: Volume, default_value: float = 0.0,
                  scale: Optional[float] = None) -> Volume:
    """Expand a sub-box volume onto the whole CT grid (for display only).

    Args:
        box: A volume on a sub-box of the CT's lattice (:func:`box_on_grid`).
        ct: The CT (only its geometry is used).
        default_value: Value outside the box. For 0 the output is freshly zeroed memory that
            costs nothing until written, so only the box's pages are resident.
        scale: Optional factor applied to the box's values (e.g. 1/255 for a uint8 map).

    Returns:
        float32 Volume with exactly the CT's shape, spacing, origin and direction.

    Raises:
        GeometryError: ``box`` is not on the CT's lattice.
    """
    sub = box_on_grid(box, ct)
    if sub is None:
        raise GeometryError("the volume does not lie on the CT's voxel grid")
    if default_value == 0.0:
        out = np.zeros(ct.shape, np.float32)  # lazily zeroed pages: only the box is touched
    else:
        out = np.full(ct.shape, default_value, np.float32)
    out[sub] = box.array
    if scale is not None:
        out[sub] *= np.float32(scale)
    return Volume(out, ct.spacing, ct.origin, ct.direction.copy(), dict(box.meta))


def crop_to_ct(array: np.ndarray, crop: SyndesmosisCrop, ct: Volume,
               interpolation: str = "linear", default_value: float = 0.0,
               clip: Optional[Tuple[float, float]] = None) -> Volume:
    """Map an array on the crop grid (e.g. a Grad-CAM heatmap) onto the CT's whole grid.

    :func:`crop_to_ct_box` expanded by :func:`paste_on_grid`. Only the CT voxels under the
    mapped box are resampled and touched; the rest of the output is ``default_value`` (for 0,
    freshly zeroed memory that costs nothing until it is read or written). Prefer
    :func:`crop_to_ct_box` to keep a result: the full grid is ~1.6 GB of float32 for a
    512 x 512 x 1500 CT.

    Args:
        array: (nz, ny, nx) values on ``crop.grid``.
        crop: The crop it belongs to (grid + patient_to_template).
        ct: The CT whose grid the output takes (only its geometry is used).
        interpolation: "linear" or "nearest" (or "bspline").
        default_value: Value outside the crop box.
        clip: Optional (low, high): the mapped values are clipped to it (as ``np.clip`` of the
            whole output would, when ``default_value`` lies inside it, at the cost of the box).

    Returns:
        float32 Volume with exactly the CT's shape, spacing, origin and direction.

    Raises:
        GeometryError: ``array`` does not have the crop grid's shape.
    """
    box = crop_to_ct_box(array, crop, ct, interpolation, default_value, clip)
    if box_on_grid(box, ct) is None:  # pragma: no cover - crop_to_ct_box builds it on the grid
        raise GeometryError("internal: the mapped box is not on the CT's grid")
    if clip is not None and not clip[0] <= default_value <= clip[1]:
        default_value = float(np.clip(default_value, clip[0], clip[1]))
    out = paste_on_grid(box, ct, default_value)
    out.meta = {"source": "crop_to_ct", "frame": "patient"}
    return out


def write_crop(crop: SyndesmosisCrop, path: PathLike) -> None:
    """Write the 3 channels as one 3-component vector NIfTI with the crop grid's geometry.

    A vector image (not 4D) keeps the 3D spacing/origin/direction exact and loads in 3D Slicer
    as a vector volume (Volumes module; one component at a time or as RGB). The component
    order is :data:`CHANNELS`. Written atomically and deterministically (gzip mtime 0).

    Args:
        crop: The crop.
        path: Destination ``.nii.gz`` (or ``.nii``).
    """
    import SimpleITK as sitk

    from AnkleFractureLib.io import write_sitk_image

    spath = os.fspath(path)
    if not spath.lower().endswith((".nii.gz", ".nii")):
        raise InputError(spath, "a crop is written as NIfTI: use a .nii.gz or .nii name")
    ch = np.asarray(crop.channels, dtype=np.float32)
    if ch.ndim != 4 or ch.shape[0] != len(CHANNELS) or ch.shape[1:] != crop.grid.shape:
        raise GeometryError(f"crop channels must be (3, nz, ny, nx) on the grid {crop.grid.shape}, "
                            f"got {ch.shape}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(ch, 0, -1)), isVector=True)
    img.SetSpacing(crop.grid.spacing)
    img.SetOrigin(crop.grid.origin)
    img.SetDirection(tuple(float(v) for v in crop.grid.direction.reshape(-1)))
    write_sitk_image(img, spath)


def read_crop(path: PathLike) -> Tuple[np.ndarray, Volume]:
    """Read a crop written by :func:`write_crop`.

    Args:
        path: The ``.nii.gz`` file.

    Returns:
        (channels float32 (3, nz, ny, nx), grid Volume (array = channel 0) with the geometry).

    Raises:
        InputError: Missing, unreadable or not a 3-component 3D image.
    """
    import SimpleITK as sitk

    spath = os.fspath(path)
    if not os.path.isfile(spath):
        raise InputError(spath, "crop file does not exist")
    try:
        img = sitk.ReadImage(spath)
    except RuntimeError as exc:
        raise InputError(spath, f"cannot read crop: {str(exc).strip().splitlines()[-1]}") from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != len(CHANNELS):
        raise InputError(spath, f"not a crop: expected a 3D image with {len(CHANNELS)} components, "
                                f"got {img.GetDimension()}D with "
                                f"{img.GetNumberOfComponentsPerPixel()}")
    arr = sitk.GetArrayFromImage(img).astype(np.float32)  # (nz, ny, nx, 3)
    channels = np.ascontiguousarray(np.moveaxis(arr, -1, 0))
    grid = Volume(channels[0], img.GetSpacing(), img.GetOrigin(),
                  np.asarray(img.GetDirection(), dtype=float).reshape(3, 3),
                  {"source": spath, "channels": list(CHANNELS)})
    return channels, grid


__all__ = ["CHANNELS", "SyndesmosisCrop", "box_on_grid", "crop_raw_ct", "crop_syndesmosis",
           "crop_to_ct", "crop_to_ct_box", "paste_on_grid",
           "default_box", "read_crop", "write_crop"]
