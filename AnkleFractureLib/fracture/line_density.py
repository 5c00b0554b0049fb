"""Is a candidate line a gap or a dense band? The CT across it, inside the fibula.

An acute fracture line is a gap: blood (40-80 HU) between raw cancellous bone or marrow, darker
than the bone around it or, a hairline under the scan's resolution, no different from it. An
old healed fracture, a physeal scar or a bone island is a dense (sclerotic) band: brighter than
the bone a few mm above and below. Radiologists tell the two apart this way; the localiser
network, which reads a 1.5 mm crop, can take a dense band for a line.

:func:`band_contrast` reads the CT on its own grid along the bone's long axis through every
point of a candidate line that lies inside the fibula (at least :data:`INTERIOR_MM` from the
label's surface, so that the cortex does not count): the median CT number over those points at
each offset ``s`` along the axis gives a profile ``m(s)``; the line's band contrast is the
highest ``m`` within :data:`NEAR_MM` of the line less the median of ``m`` :data:`FAR_MM` away.
A gap gives a contrast near or below zero, a dense band several hundred HU.

That profile is a median over every point of the line at each offset, so a hairline (a gap of
0.2-1 mm, thinner than the 1.5 mm line the network draws, and oblique to the axis) moves it by
a few HU only. :func:`gap_contrast` asks each ray instead: along the axis through one line
point, the darkest CT number within :data:`GAP_NEAR_MM` of the line, less the darkest within a
window as long :data:`GAP_FAR_MM` above and below it (the mean of the two; the one that lies
inside the bone near the malleolus tip, where the other leaves it). Each ray crosses
the gap somewhere near the line, so its darkest value finds the gap whatever the line's slope
and thickness, and the bone's own darkest trabecular voxels, which every window holds alike,
cancel out; the median over the rays is the line's ``gap_hu``: near zero on intact bone,
negative across a gap.

Axis order: arrays are numpy (z, y, x); points are patient LPS mm (x, y, z); CT numbers HU.

Example:
    >>> import numpy as np
    >>> from AnkleFractureLib.geometry.volume import Volume
    >>> ct, fib, axis = demo_shaft(band_hu=900.0)
    >>> pts = demo_line_points(ct)
    >>> round(band_contrast(ct, fib, pts, axis)["band_hu"]) > 400
    True
    >>> ct, fib, axis = demo_shaft(band_hu=60.0)
    >>> band_contrast(ct, fib, pts, axis)["band_hu"] < 50
    True
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from AnkleFractureLib.geometry.arrays import bounding_box

#: Only line points this deep (mm) inside the fibula count: the cortex is dense everywhere.
INTERIOR_MM = 1.5
#: The band: offsets (mm) along the axis within this of the line.
NEAR_MM = 2.0
#: The bone around: offsets (mm) along the axis between these.
FAR_MM = (5.0, 10.0)
#: Profile step (mm) along the axis.
STEP_MM = 0.5
#: Fewest interior points for a profile value (fewer: not measured).
MIN_POINTS = 10
#: Gap contrast: offsets (mm) along the axis within this of the line, on each ray.
GAP_NEAR_MM = 2.5
#: Gap contrast: the two windows of the bone around start this far (mm) from the line.
GAP_FAR_MM = 6.0


def fibula_depth(fibula: np.ndarray, spacing_zyx: Tuple[float, float, float]) -> np.ndarray:
    """float32 (z, y, x): mm from each fibula voxel to the label's surface (0 outside)."""
    from scipy import ndimage

    return ndimage.distance_transform_edt(np.asarray(fibula, bool),
                                          sampling=tuple(float(s) for s in spacing_zyx)
                                          ).astype(np.float32)


class DepthMap:
    """A fibula depth map (mm, float32 (z, y, x)) on the CT's grid or on every ``stride``-th
    voxel of it, read at CT voxel coordinates.

    Why a stride: the depth only tells which samples lie :data:`INTERIOR_MM` inside the bone,
    and on a clinical CT's 0.4 mm grid the two distance transforms of the fibula's box cost
    seconds; on a grid near 1 mm, a few hundredths.

    Args:
        array: float32 (z, y, x) mm, the depth at CT voxels (0, 0, 0), stride, 2 * stride, ...
        stride: (z, y, x) voxels of the CT per voxel of ``array``.

    Example:
        >>> d = DepthMap(np.arange(8, dtype=np.float32).reshape(2, 2, 2), (2, 2, 2))
        >>> d.at(np.array([[2.0, 0.0, 2.0], [1.0, 1.0, 1.0]])).tolist()  # (x, y, z) indices
        [5.0, 3.5]
    """

    def __init__(self, array: np.ndarray, stride: Tuple[int, int, int] = (1, 1, 1)) -> None:
        self.array = np.asarray(array, np.float32)
        self.stride = tuple(int(v) for v in stride)

    def at(self, ijk: np.ndarray) -> np.ndarray:
        """Depth (mm, linear interpolation, 0 outside) at (n, 3) CT indices in (x, y, z)
        order (``Volume.physical_to_index``)."""
        from scipy import ndimage

        ijk = np.asarray(ijk, float).reshape(-1, 3)
        coords = [ijk[:, 2] / self.stride[0], ijk[:, 1] / self.stride[1],
                  ijk[:, 0] / self.stride[2]]
        return ndimage.map_coordinates(self.array, coords, order=1, cval=0.0)


def _depth_map(depth: Any) -> DepthMap:
    """``depth`` as a :class:`DepthMap` (an array is one on the CT's own grid)."""
    return depth if isinstance(depth, DepthMap) else DepthMap(depth)


def grid_stride(spacing_zyx: Tuple[float, float, float], grid_mm: Optional[float]
                ) -> Tuple[int, int, int]:
    """(z, y, x) strides that make a grid no coarser than ``grid_mm`` (mm) on each axis; every
    voxel (1, 1, 1) when ``grid_mm`` is None.

    Example:
        >>> grid_stride((0.56, 0.39, 0.39), 1.2), grid_stride((0.56, 0.39, 0.39), None)
        ((2, 3, 3), (1, 1, 1))
    """
    if grid_mm is None:
        return (1, 1, 1)
    return tuple(max(1, int(float(grid_mm) / float(s) + 1e-9)) for s in spacing_zyx)


def depth_maps(fibula: np.ndarray, spacing_zyx: Tuple[float, float, float],
               grid_mm: Optional[float] = None) -> Tuple[DepthMap, DepthMap]:
    """(plain, gap-closed) :class:`DepthMap` of the fibula (:func:`fibula_depth`,
    :func:`closed_depth`), on every :func:`grid_stride`-th voxel (the CT's own grid when
    ``grid_mm`` is None)."""
    stride = grid_stride(spacing_zyx, grid_mm)
    fib = np.asarray(fibula, bool)[::stride[0], ::stride[1], ::stride[2]]
    coarse = tuple(float(s) * k for s, k in zip(spacing_zyx, stride))
    return (DepthMap(fibula_depth(fib, coarse), stride),
            DepthMap(closed_depth(fib, coarse), stride))


def interior_profile(ct: Any, depth: Any, points_lps: np.ndarray, axis_lps: np.ndarray
                     ) -> Tuple[np.ndarray, np.ndarray]:
    """(offsets s mm (n,), median HU m(s) (n,), NaN where fewer than :data:`MIN_POINTS`
    points lie inside the fibula) along ``axis_lps`` through ``points_lps`` (k, 3)."""
    from scipy import ndimage

    arr = np.asarray(ct.array, np.float32)
    depth = _depth_map(depth)
    pts = np.asarray(points_lps, float).reshape(-1, 3)
    axis = np.asarray(axis_lps, float) / np.linalg.norm(axis_lps)
    offsets = np.arange(-FAR_MM[1], FAR_MM[1] + 1e-6, STEP_MM)
    out = np.full(offsets.shape, np.nan)
    for i, s in enumerate(offsets):
        ijk = ct.physical_to_index(pts + s * axis)
        coords = [ijk[:, 2], ijk[:, 1], ijk[:, 0]]
        inside = depth.at(ijk) >= INTERIOR_MM
        if int(inside.sum()) >= MIN_POINTS:
            hu = ndimage.map_coordinates(arr, [c[inside] for c in coords], order=1)
            out[i] = float(np.median(hu))
    return offsets, out


def band_contrast(ct: Any, fibula: np.ndarray, points_lps: np.ndarray, axis_lps: np.ndarray,
                  depth: Any = None) -> Dict[str, Any]:
    """The line's band contrast (see the module docstring).

    Args:
        ct: The CT (:class:`~AnkleFractureLib.geometry.volume.Volume`, HU).
        fibula: bool (z, y, x) on the CT's grid: the analysed leg's fibula.
        points_lps: (k, 3) patient LPS mm: the candidate line's points.
        axis_lps: (3,) the bone's long axis (the tibial axis; any length).
        depth: :func:`fibula_depth` of ``fibula`` (or its :class:`DepthMap`) when already
            computed.

    Returns:
        {"band_hu": near peak - far median (HU; None when not measured), "dip_hu": near
        lowest - far median, "interior_points": line points inside the fibula}.
    """
    if depth is None:
        depth = fibula_depth(fibula, tuple(ct.spacing[::-1]))
    pts = np.asarray(points_lps, float).reshape(-1, 3)
    n_in = int((_depth_map(depth).at(ct.physical_to_index(pts)) >= INTERIOR_MM).sum())
    s, m = interior_profile(ct, depth, pts, axis_lps)
    near, far = m[np.abs(s) <= NEAR_MM], m[np.abs(s) >= FAR_MM[0]]
    near, far = near[np.isfinite(near)], far[np.isfinite(far)]
    if n_in < MIN_POINTS or near.size == 0 or far.size == 0:
        return {"band_hu": None, "dip_hu": None, "interior_points": n_in}
    base = float(np.median(far))
    return {"band_hu": round(float(near.max()) - base, 1),
            "dip_hu": round(float(near.min()) - base, 1), "interior_points": n_in}


#: The fibula mask is closed over gaps this wide (mm) before :func:`gap_contrast` asks which
#: samples lie inside it: a gap is not part of the label, and it is what the rays look for.
CLOSE_MM = 3.0


def closed_depth(fibula: np.ndarray, spacing_zyx: Tuple[float, float, float]) -> np.ndarray:
    """float32 (z, y, x) mm: :func:`fibula_depth` of the fibula mask closed over gaps up to
    :data:`CLOSE_MM` wide (a fracture gap, which the label leaves out, counts as inside the
    bone); ``spacing_zyx`` in mm."""
    from scipy import ndimage

    steps = max(1, int(np.ceil(CLOSE_MM / 2.0 / min(spacing_zyx))))
    fib = np.asarray(fibula, bool)
    pad = np.pad(fib, steps)  # closing must not erode from the array's edges
    closed = ndimage.binary_closing(pad, ndimage.generate_binary_structure(3, 1), steps)
    inner = tuple(slice(steps, -steps) for _ in range(3))
    return fibula_depth(closed[inner] | fib, spacing_zyx)


def _ray_samples(ct: Any, depth: Any, points_lps: np.ndarray, axis: np.ndarray,
                 offsets: np.ndarray) -> np.ndarray:
    """HU (k, n) along the axis through each of k points at n offsets (mm); NaN where a sample
    lies less than :data:`INTERIOR_MM` inside the fibula."""
    from scipy import ndimage

    pts = points_lps[:, None, :] + offsets[None, :, None] * axis[None, None, :]
    ijk = ct.physical_to_index(pts.reshape(-1, 3))
    coords = [ijk[:, 2], ijk[:, 1], ijk[:, 0]]
    hu = ndimage.map_coordinates(np.asarray(ct.array, np.float32), coords, order=1)
    inside = _depth_map(depth).at(ijk) >= INTERIOR_MM
    return np.where(inside, hu, np.nan).reshape(len(points_lps), len(offsets))


def gap_contrast(ct: Any, fibula: np.ndarray, points_lps: np.ndarray, axis_lps: np.ndarray,
                 depth: Any = None) -> Optional[float]:
    """The line's gap contrast (HU; see the module docstring): the median over the rays through
    its points of (darkest within :data:`GAP_NEAR_MM` of the line) - (the darkest of the
    equally long windows :data:`GAP_FAR_MM` above and below, their mean when both lie inside
    the fibula, the one inside when the other leaves it); None when fewer than
    :data:`MIN_POINTS` rays lie inside the fibula near the line and in at least one window.

    Why one window may do: near the malleolus tip the window below a line leaves the bone, and
    asking for both left the lines of Weber A fractures unmeasured.

    Args: as :func:`band_contrast`; ``depth``: :func:`closed_depth` of ``fibula`` (or its
        :class:`DepthMap`) when already computed.

    Example:
        >>> ct, fib, axis = demo_shaft(band_hu=100.0, band_mm=0.6)
        >>> gap_contrast(ct, fib, demo_line_points(ct), axis) < -50
        True
        >>> ct, fib, axis = demo_shaft(band_hu=300.0)
        >>> abs(gap_contrast(ct, fib, demo_line_points(ct), axis)) < 5
        True
    """
    if depth is None:
        depth = closed_depth(fibula, tuple(ct.spacing[::-1]))
    axis = np.asarray(axis_lps, float) / np.linalg.norm(axis_lps)
    near = np.arange(-GAP_NEAR_MM, GAP_NEAR_MM + 1e-6, STEP_MM)
    span = 2.0 * GAP_NEAR_MM
    above = np.arange(GAP_FAR_MM, GAP_FAR_MM + span + 1e-6, STEP_MM)
    offsets = np.concatenate([near, above, -above])
    hu = _ray_samples(ct, depth, np.asarray(points_lps, float).reshape(-1, 3), axis, offsets)
    n, m = len(near), len(above)
    parts = (hu[:, :n], hu[:, n:n + m], hu[:, n + m:])
    ok = [np.isfinite(p).all(axis=1) for p in parts]
    use = ok[0] & (ok[1] | ok[2])
    if int(use.sum()) < MIN_POINTS:
        return None
    darkest = [np.where(k, np.min(np.where(np.isfinite(p), p, 0.0), axis=1), np.nan)
               for p, k in zip(parts, ok)]
    far = np.nanmean(np.stack(darkest[1:])[:, use], axis=0)
    return round(float(np.median(darkest[0][use] - far)), 1)


def demo_shaft(band_hu: float = 900.0, bone_hu: float = 300.0, band_mm: float = 2.0
               ) -> Tuple[Any, np.ndarray, np.ndarray]:
    """(CT, fibula mask, axis): a 12 mm wide bone along z (0.5 mm voxels) with a 1 mm thick
    cortex at 1500 HU, ``bone_hu`` inside, and a ``band_mm`` thick band at ``band_hu`` across
    it at the centre: a dense band (900) or a gap (60), for examples and tests."""
    from AnkleFractureLib.geometry.volume import Volume

    n, h = 80, 0.5
    zz, yy, xx = np.mgrid[:n, :40, :40].astype(float) * h
    r = np.hypot(yy - 10.0, xx - 10.0)
    fib = r <= 6.0
    arr = np.full(fib.shape, 40.0, np.float32)
    arr[fib] = bone_hu
    arr[fib & (r > 5.0)] = 1500.0
    arr[fib & (np.abs(zz - n * h / 2) <= band_mm / 2.0) & (r <= 5.0)] = band_hu
    ct = Volume(arr, spacing=(h, h, h), origin=(0.0, 0.0, 0.0))
    return ct, fib, np.array([0.0, 0.0, 1.0])


def demo_line_points(ct: Any) -> np.ndarray:
    """(k, 3) LPS points of a line across :func:`demo_shaft`'s bone at its band."""
    ys, xs = np.mgrid[0:41, 0:41] * 0.5
    keep = np.hypot(ys - 10.0, xs - 10.0) <= 6.5
    z = np.full(int(keep.sum()), ct.shape[0] * float(ct.spacing[2]) / 2.0)
    return np.stack([xs[keep], ys[keep], z], axis=1)


class LineDensity:
    """Band contrast of candidate lines on one CT (the fibula's depth maps computed once, on
    the fibula's bounding box only: a 512 x 512 x 365 scan's full grid would cost seconds).

    Args:
        ct: The CT (Volume, HU).
        fibula: bool (z, y, x) on the CT's grid: the analysed leg's fibula.
        patient_to_template: The registration (4x4 patient LPS mm -> template mm).
        axis_lps: (3,) the tibial long axis in patient LPS (:func:`~.localise.patient_axis`).
        grid_mm: The depth maps on a grid no coarser than this (mm; :func:`depth_maps`),
            plans.json ``decision.density_grid_mm``; None: on the CT's own grid (as v24 and
            v25 measured: about 3 s on a clinical 0.4 mm scan, against about 0.1 s at 1.2 mm).
            The CT numbers are always read on the CT's own grid.
    """

    def __init__(self, ct: Any, fibula: np.ndarray, patient_to_template: np.ndarray,
                 axis_lps: np.ndarray, grid_mm: Optional[float] = None) -> None:
        self.p2t = np.asarray(patient_to_template, float)
        self.axis = np.asarray(axis_lps, float)
        fib = np.asarray(fibula, bool)
        self.ct, self.fibula, self.depth, self.closed = None, None, None, None
        # the fibula's box from two projections: argwhere on a 512 x 512 x 365 mask costs a
        # third of a second
        box = bounding_box(fib, np.ceil((FAR_MM[1] + 2.0) / np.asarray(ct.spacing[::-1],
                                                                         float)).astype(int))
        if box is not None:
            # float32 once: every profile and ray read takes it so (two conversions of the
            # fibula's box per line otherwise)
            region = ct.region(box)
            self.ct, self.fibula = region.with_array(np.asarray(region.array, np.float32)), fib[box]
            self.depth, self.closed = depth_maps(self.fibula, tuple(ct.spacing[::-1]), grid_mm)

    def __call__(self, mask: np.ndarray, grid: Any) -> Dict[str, Any]:
        """:func:`band_contrast` and :func:`gap_contrast` (``"gap_hu"``) of a line given as a
        bool (z, y, x) mask on a crop grid."""
        from AnkleFractureLib.fracture.localise import crop_points

        if self.ct is None or not np.any(mask):
            return {"band_hu": None, "dip_hu": None, "gap_hu": None, "interior_points": 0}
        pts = crop_points(mask, grid, self.p2t)
        return {**band_contrast(self.ct, self.fibula, pts, self.axis, self.depth),
                "gap_hu": gap_contrast(self.ct, self.fibula, pts, self.axis, self.closed)}
