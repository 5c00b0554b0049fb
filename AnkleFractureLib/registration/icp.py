"""Robust similarity ICP between labelled bone surface point clouds.

The method registers a *source* cloud (e.g. the mirrored healthy-side or patient bones) to a
*target* cloud (e.g. the template) with a similarity transform ``y = s R x + t`` (rotation R
with det +1, isotropic scale s, translation t; all in LPS mm):

* several initialisations (centroid alignment, principal-axes alignments, small rotations about
  the long axis) guard against the local minima of ICP;
* correspondences come from one KD-tree per label, so tibia points only match tibia points and
  fibula points only fibula points (with a single tree the two parallel bones slide into each
  other);
* correspondences are *trimmed*: only the ``trim_fraction`` closest pairs (or, with
  ``label_trim``, each label's own fraction) feed the fit, so a displaced fracture fragment
  or a different field of view does not drag the transform;
* with ``long_axis`` (the direction from the end both clouds contain up the long bones) the
  starts align the clouds' shared ends, and source points mapped beyond the target's far end
  are left out, so fields of view of different lengths neither shift nor shrink the fit;
* each fit is the closed-form least-squares similarity of Umeyama (1991), with the scale
  clamped to ``scale_bounds`` (or point-to-plane steps, with target normals);
* ``inlier_fraction`` is measured after the fit: the (weighted) share of source points within
  ``inlier_distance_mm`` of the target surface.

Speed: all starts are first run on a deterministic subsample of the source (coarse stage); only
the best start is refined with every source point. The target trees are built once.

Reference: S. Umeyama, "Least-squares estimation of transformation parameters between two point
patterns", IEEE TPAMI 13(4), 1991.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.spatial import cKDTree

from AnkleFractureLib.errors import GeometryError

#: Source points used per start in the coarse stage (the winner is refined with all points).
COARSE_POINTS = 500
#: Iterations per start in the coarse stage.
COARSE_ITERATIONS = 25
#: Iterations of every start before the less promising ones are dropped.
COARSE_FIRST_ITERATIONS = 8
#: Two coarse fits closer than this (mm, largest point displacement) are refined as one: on 94
#: phantom registrations all 44 pairs refined together (0.5-6.2 mm apart) converged to the same
#: full fit (within 0.05 mm); a second full-resolution run mostly cost time.
FINAL_DISTINCT_MM = 2.0
#: Small rotations (degrees) about the long axis added to the starts.
LONG_AXIS_ANGLES_DEG = (-15.0, 15.0)
#: Anchored starts (with ``long_axis``): the slab (mm along the axis, from the shared end) whose
#: centroid and size are aligned. 60 mm holds the malleoli, the plafond and the metaphysis, and
#: every ankle scan that can be classified reaches that far up (the pipeline refuses < 40 mm
#: above the joint, and the malleoli reach 12-28 mm below it).
ANCHOR_SLAB_MM = 60.0
#: Quantile of the heights along the axis taken as the shared (distal) end: the lowest 1 % of
#: the points, so a few stray voxels below the bones do not move it.
ANCHOR_QUANTILE = 0.01
#: Scale range of the anchored starts (the plausible adult range; ICP refines it).
ANCHOR_SCALE_RANGE = (0.75, 1.33)
#: With ``source_axis``: the largest angle (degrees) between it, mapped, and ``long_axis``. The
#: upside-down starts are 150-180 degrees off; a knee flexed beyond a right angle can put the
#: shin itself past 90 degrees from the patient's superior axis, hence not 90.
MAX_AXIS_ANGLE_DEG = 120.0
#: Margin (mm) below the top of the target's extent along ``long_axis``: mapped source points
#: above it take no part (the target's cut rim is no anatomy to match).
OVERLAP_MARGIN_MM = 2.0
#: When fewer than this fraction of the source points map inside the target's extent, the
#: restriction is dropped, so a fit that pushed the bones out of the target shows its error.
OVERLAP_MIN_FRACTION = 0.3
#: Default inlier distance (mm) of ``IcpResult.inlier_fraction``. 2.5 mm is above what a good
#: fit leaves: the nearest-point distance to the template's ~1.5 mm-spaced surface samples
#: (up to ~1 mm on a perfect fit), one voxel of segmentation boundary error and the residual
#: shape difference between ankles (good fits: median point distance 0.7-1.3 mm on the
#: phantoms); and below the misplacements that matter: the same fits moved 5 mm sideways keep
#: at most 55 % of the tibia within it, 20 mm along the shaft at most 67 %.
INLIER_DISTANCE_MM = 2.5


@dataclass
class IcpResult:
    """Outcome of :func:`similarity_icp`.

    Attributes:
        matrix: 4x4 similarity mapping source points to target points (LPS mm), i.e.
            ``target ~ (matrix @ [x, y, z, 1])[:3]``.
        rms_mm: RMS distance (mm) of the ``trim_fraction`` closest correspondences at the end.
        inlier_fraction: Fraction of the source points within ``inlier_distance_mm`` of the
            nearest target point of their label at the end (weighted by ``label_weights``;
            with ``long_axis``, over the points inside the target's extent), see
            :func:`inlier_fraction`.
        iterations: Iterations of the winning start in the final (full-resolution) stage.
        converged: True when the change in trimmed mean squared error fell below the tolerance
            before ``max_iterations``.
        scale: Isotropic scale factor of ``matrix``.
        start: Index (into :func:`initial_guesses` order, or 0 for a user ``init``) of the
            initialisation that won.
    """

    matrix: np.ndarray
    rms_mm: float
    inlier_fraction: float
    iterations: int
    converged: bool
    scale: float
    start: int


# ---------------------------------------------------------------------------------------- maths
def _as_points(points: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(points, dtype=float)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise GeometryError(f"{name} must be an (N, 3) array of LPS points in mm, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise GeometryError(f"{name} is empty: no surface points to register")
    if not np.all(np.isfinite(arr)):
        raise GeometryError(f"{name} contains NaN or infinite coordinates")
    return arr


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def _similarity(rotation: np.ndarray, scale: float, translation: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = scale * rotation
    m[:3, 3] = translation
    return m


def matrix_scale(matrix: np.ndarray) -> float:
    """Isotropic scale of a 4x4 similarity matrix (cube root of |det| of its 3x3 part)."""
    return float(abs(np.linalg.det(np.asarray(matrix, dtype=float)[:3, :3])) ** (1.0 / 3.0))


def _umeyama_parts(src: np.ndarray, dst: np.ndarray, with_scale: bool,
                   weights: Optional[np.ndarray]) -> Tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Rotation (3, 3), unclamped scale, and the two weighted centroids (3,)."""
    if weights is None:
        # Unweighted fast path (the ICP loop): plain means and one 3x3 matrix product.
        mu_s = src.mean(axis=0)
        mu_d = dst.mean(axis=0)
        xs = src - mu_s
        cov = (dst - mu_d).T @ xs / src.shape[0]  # (3, 3) = mean (d - mu_d)(s - mu_s)^T
        var_s = float(np.einsum("ij,ij->", xs, xs)) / src.shape[0]
    else:
        w = np.asarray(weights, dtype=float).reshape(-1)
        if w.shape[0] != src.shape[0] or np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
            raise GeometryError("weights must be finite, non-negative, one per point, not all zero")
        w = w / w.sum()
        mu_s = w @ src
        mu_d = w @ dst
        xs = src - mu_s
        cov = ((dst - mu_d) * w[:, None]).T @ xs
        var_s = float(w @ np.einsum("ij,ij->i", xs, xs))
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(3)
    # Force a proper rotation (det +1): flip the weakest axis when the best orthogonal fit is
    # a reflection (Umeyama's S matrix).
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[2] = -1.0
    rot = (u * d) @ vt
    if with_scale:
        scale = float((sig * d).sum() / var_s) if var_s > 0 else 1.0
    else:
        scale = 1.0
    return rot, scale, mu_s, mu_d


def umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool = True,
            weights: Optional[np.ndarray] = None) -> np.ndarray:
    """Least-squares similarity (or rigid) transform mapping ``src`` onto ``dst``.

    Minimises ``sum_i w_i |dst_i - (s R src_i + t)|^2`` over proper rotations R (det +1),
    scale s > 0 (fixed to 1 when ``with_scale`` is False) and translation t.

    Args:
        src: Source points (N, 3), mm.
        dst: Corresponding destination points (N, 3), mm.
        with_scale: Estimate an isotropic scale.
        weights: Optional non-negative weights (N,).

    Returns:
        4x4 matrix M with ``dst ~ src @ M[:3, :3].T + M[:3, 3]``.

    Raises:
        GeometryError: Bad shapes, fewer than one point, or non-finite values.
    """
    src = _as_points(src, "umeyama source")
    dst = _as_points(dst, "umeyama destination")
    if src.shape != dst.shape:
        raise GeometryError(f"umeyama needs matching point arrays, got {src.shape} and {dst.shape}")
    rot, scale, mu_s, mu_d = _umeyama_parts(src, dst, with_scale, weights)
    return _similarity(rot, scale, mu_d - scale * rot @ mu_s)


# ---------------------------------------------------------------------------------------- starts
def _principal_axes(points: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Centroid (3,) and principal axes (3, 3), columns sorted by decreasing variance."""
    c = points.mean(axis=0)
    x = points - c
    evals, evecs = np.linalg.eigh(x.T @ x / max(len(points), 1))
    return c, evecs[:, np.argsort(evals)[::-1]]


def _rms_radius(points: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.sum((points - points.mean(axis=0)) ** 2, axis=1))))


def _axis_rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rotation by ``degrees`` about the unit vector ``axis`` (Rodrigues)."""
    a = axis / np.linalg.norm(axis)
    th = np.deg2rad(degrees)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    return np.eye(3) + np.sin(th) * k + (1.0 - np.cos(th)) * (k @ k)


def _min_rotation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Smallest rotation taking direction ``a`` to direction ``b``."""
    a = a / np.linalg.norm(a)
    b = b / np.linalg.norm(b)
    v = np.cross(a, b)
    s = float(np.linalg.norm(v))
    c = float(np.dot(a, b))
    if s < 1e-12:
        if c > 0:
            return np.eye(3)
        # Opposite directions: half turn about any axis perpendicular to a.
        perp = np.cross(a, [1.0, 0.0, 0.0])
        if np.linalg.norm(perp) < 1e-6:
            perp = np.cross(a, [0.0, 1.0, 0.0])
        return _axis_rotation(perp, 180.0)
    return _axis_rotation(v, np.rad2deg(np.arctan2(s, c)))


def _label_centroids(points: np.ndarray, labels: Optional[np.ndarray],
                     keys: Sequence[int]) -> np.ndarray:
    return np.array([points[labels == k].mean(axis=0) for k in keys])


def initial_guesses(source: np.ndarray, target: np.ndarray,
                    source_labels: Optional[np.ndarray] = None,
                    target_labels: Optional[np.ndarray] = None,
                    long_axis: Optional[np.ndarray] = None,
                    source_axis: Optional[np.ndarray] = None) -> List[np.ndarray]:
    """A few 4x4 similarity starts for ICP, most plausible first.

    All starts share the scale ``rms_radius(target) / rms_radius(source)``. In order:

    0. identity rotation, centroid alignment (with labels: the mean of the per-label centroids,
       so a bone with many more points does not dominate the translation);
    1. with >= 3 common labels: Umeyama rotation on the label centroids; with 2 labels: the
       smallest rotation aligning the vector between the two label centroids (skipped when it
       exceeds 45 degrees, where the centroids are too unreliable, e.g. different fields of view);
    2-5. principal-axes alignments, the 4 proper sign combinations;
    then rotations of start 0 by +-15 degrees about the target's long axis.

    With ``long_axis`` every start keeps its rotation but is *anchored*: its scale and
    translation align the slab of :data:`ANCHOR_SLAB_MM` above the clouds' shared (lower) end
    instead of the whole clouds (see :func:`_anchored`), so a field of view that ends lower or
    higher up the leg than the target's does not shift the start along the shaft. With
    ``source_axis`` too, the starts that turn it too far from ``long_axis``
    (upside down, see :data:`MAX_AXIS_ANGLE_DEG`) are dropped.

    Args:
        source: Source points (N, 3), LPS mm.
        target: Target points (M, 3), LPS mm.
        source_labels: Optional labels (N,) of the source points.
        target_labels: Optional labels (M,) of the target points (required with source_labels).
        long_axis: Optional (3,) target-frame direction from the end both clouds contain (the
            ankle joint) towards the end where the fields of view may differ.
        source_axis: Optional (3,) source-frame direction that corresponds to ``long_axis``
            (e.g. the patient's superior, LPS +z), with ``long_axis``.

    Returns:
        List of 4x4 matrices mapping source to target.
    """
    source = _as_points(source, "source")
    target = _as_points(target, "target")
    scale = _rms_radius(target) / max(_rms_radius(source), 1e-9)
    keys: List[int] = []
    if source_labels is not None and target_labels is not None:
        source_labels = np.asarray(source_labels).reshape(-1)
        target_labels = np.asarray(target_labels).reshape(-1)
        keys = sorted(set(np.unique(source_labels).tolist()) & set(np.unique(target_labels).tolist()))
    if keys:
        cs_all = _label_centroids(source, source_labels, keys)
        ct_all = _label_centroids(target, target_labels, keys)
        cs, ct = cs_all.mean(axis=0), ct_all.mean(axis=0)
    else:
        cs, ct = source.mean(axis=0), target.mean(axis=0)

    def centred(rot: np.ndarray, c_src: np.ndarray = cs, c_tgt: np.ndarray = ct) -> np.ndarray:
        return _similarity(rot, scale, c_tgt - scale * rot @ c_src)

    starts = [centred(np.eye(3))]
    if len(keys) >= 3:
        m = umeyama(cs_all, ct_all, with_scale=False)
        starts.append(centred(m[:3, :3]))
    elif len(keys) == 2:
        ds = cs_all[1] - cs_all[0]
        dt = ct_all[1] - ct_all[0]
        if np.linalg.norm(ds) > 1e-6 and np.linalg.norm(dt) > 1e-6:
            rot = _min_rotation(ds, dt)
            angle = np.rad2deg(np.arccos(np.clip((np.trace(rot) - 1.0) / 2.0, -1.0, 1.0)))
            if 1e-3 < angle <= 45.0:
                starts.append(centred(rot))
    ps_c, ps_ax = _principal_axes(source)
    pt_c, pt_ax = _principal_axes(target)
    need = np.sign(np.linalg.det(pt_ax) * np.linalg.det(ps_ax))
    for signs in ((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)):
        d = np.array(signs, dtype=float) * need
        rot = (pt_ax * d) @ ps_ax.T
        starts.append(centred(rot, ps_c, pt_c))
    axis_t = pt_ax[:, 0]
    for ang in LONG_AXIS_ANGLES_DEG:
        starts.append(centred(_axis_rotation(axis_t, ang)))
    if long_axis is not None:
        axis = _unit(long_axis, "long_axis")
        starts = [_anchored(m, source, target, axis) for m in starts]
        if source_axis is not None:
            up = _unit(source_axis, "source_axis")
            upright = [m for m in starts if _upright(m, up, axis)]
            starts = upright or starts
    return starts


def _unit(vector: np.ndarray, name: str) -> np.ndarray:
    """``vector`` (3,) scaled to unit length; GeometryError when it is not a non-zero 3-vector."""
    v = np.asarray(vector, dtype=float).reshape(-1)
    norm = float(np.linalg.norm(v)) if v.shape == (3,) else np.nan
    if not np.isfinite(norm) or norm < 1e-9:
        raise GeometryError(f"{name} must be a non-zero 3-vector, got {vector}")
    return v / norm


def _upright(matrix: np.ndarray, source_axis: np.ndarray, target_axis: np.ndarray) -> bool:
    """Whether ``matrix`` turns the unit ``source_axis`` less than :data:`MAX_AXIS_ANGLE_DEG`
    from the unit ``target_axis``."""
    rot = matrix[:3, :3] / matrix_scale(matrix)
    return float((rot @ source_axis) @ target_axis) > np.cos(np.deg2rad(MAX_AXIS_ANGLE_DEG))


def _anchored(start: np.ndarray, source: np.ndarray, target: np.ndarray,
              axis: np.ndarray) -> np.ndarray:
    """``start``'s rotation, with the scale and translation that align the clouds' shared ends.

    The slab of :data:`ANCHOR_SLAB_MM` above the lower end (along the unit ``axis``, target
    frame) of the rotated source is matched to the same slab of the target: the slabs'
    centroids are aligned and the scale is the ratio of their RMS radii (the source slab's
    height follows the scale, hence two rounds). Whole-cloud centroids and radii depend on how
    far up the leg each field of view reaches: a scan ending 45 mm above the joint put the
    start 30-50 mm too high on the shaft, where ICP then slid and shrank the bones to fit.

    Args:
        start: 4x4 start (its rotation is kept).
        source: Source points (N, 3), mm.
        target: Target points (M, 3), mm.
        axis: (3,) unit vector, target frame, from the shared end up.

    Returns:
        The anchored 4x4 start (``start`` itself when a slab holds fewer than 10 points).
    """
    rot = start[:3, :3] / matrix_scale(start)
    ht = target @ axis
    t_lo = float(np.quantile(ht, ANCHOR_QUANTILE))
    t_slab = target[(ht >= t_lo) & (ht <= t_lo + ANCHOR_SLAB_MM)]
    q = source @ rot.T
    hq = q @ axis
    q_lo = float(np.quantile(hq, ANCHOR_QUANTILE))
    scale = 1.0
    for _ in range(2):
        q_slab = q[(hq >= q_lo) & (hq <= q_lo + ANCHOR_SLAB_MM / scale)]
        if len(q_slab) < 10 or len(t_slab) < 10:
            return start
        ratio = _rms_radius(t_slab) / max(_rms_radius(q_slab), 1e-9)
        scale = float(np.clip(ratio, *ANCHOR_SCALE_RANGE))
    return _similarity(rot, scale, t_slab.mean(axis=0) - scale * q_slab.mean(axis=0))


# ---------------------------------------------------------------------------------------- ICP
#: Candidate neighbours cached per source point (see :class:`_NearestCache`).
CACHE_NEIGHBOURS = 8
#: Median per-iteration coordinate motion (mm) below which the candidate cache is filled.
CACHE_START_MOTION_MM = 0.05
#: Smallest KD-tree query batch that is split over all CPU cores.
PARALLEL_QUERY_MIN = 3000


def _workers(n_queries: int) -> int:
    """Threads for a KD-tree query: threading only pays off for large batches."""
    return -1 if n_queries >= PARALLEL_QUERY_MIN else 1


class _Matcher:
    """Target KD-trees, one per label (built once and shared by every start and stage)."""

    def __init__(self, target: np.ndarray, target_labels: Optional[np.ndarray],
                 source_labels: Optional[np.ndarray]) -> None:
        self.target = target
        # key -> (global target indices of that label, tree over them); key None = no labels.
        self.trees: Dict[Optional[int], Tuple[np.ndarray, cKDTree]] = {}
        if source_labels is None or target_labels is None:
            self.trees[None] = (np.arange(len(target)), cKDTree(target))
        else:
            for key in np.unique(source_labels).tolist():
                idx = np.flatnonzero(target_labels == key)
                self.trees[int(key)] = (idx, cKDTree(target[idx]))


class _NearestCache:
    """Exact nearest same-label target point, with a cache of candidate neighbours.

    Each source point remembers where it was when last queried (``anchor``), its
    ``CACHE_NEIGHBOURS`` nearest targets there and the gap ``margin = d_k - d_1``. If the point
    has since moved by ``delta`` with ``2 * delta < margin``, its nearest target is still among
    the cached candidates (triangle inequality: the best candidate is at most ``d_1 + delta``
    away, any other target at least ``d_k - delta``), so only the points that moved too far are
    queried again. Late ICP iterations move points by micrometres, which makes them ~10x cheaper
    while giving exactly the same correspondences as a full KD-tree query.
    """

    def __init__(self, matcher: _Matcher, labels: Optional[np.ndarray], n: int) -> None:
        self.matcher = matcher
        self.labels = labels
        # (label key, source rows of that label), computed once per run.
        self.groups: List[Tuple[Optional[int], np.ndarray]] = (
            [(None, np.arange(n))] if labels is None else
            [(int(k), np.flatnonzero(labels == k)) for k in np.unique(labels).tolist()])
        self.k = min(CACHE_NEIGHBOURS, min(len(matcher.trees[key][0]) for key, _ in self.groups))
        self.anchor = np.full((n, 3), np.nan)
        self.cand = np.zeros((n, self.k), dtype=int)
        # Candidate coordinates as three (N, k) planes: elementwise products on them are
        # several times faster than an einsum over an (N, k, 3) array.
        self.cand_xyz = np.zeros((3, n, self.k))
        self.cand_sq = np.zeros((n, self.k))
        self.margin = np.full(n, -1.0)
        self.last: Optional[np.ndarray] = None

    def _refresh(self, moved: np.ndarray, rows: np.ndarray) -> None:
        """Query the trees again for the source points ``rows`` at their positions ``moved``."""
        if self.labels is None:
            groups: List[Tuple[Optional[int], np.ndarray]] = [(None, rows)]
        else:
            row_labels = self.labels[rows]
            groups = [(key, rows[row_labels == key]) for key, _ in self.groups]
        for key, sel in groups:
            if sel.size == 0:
                continue
            tidx, tree = self.matcher.trees[key]
            dist, j = tree.query(moved[sel], k=self.k, workers=_workers(len(sel)))
            if self.k == 1:
                dist, j = dist[:, None], j[:, None]
            self.anchor[sel] = moved[sel]
            cand = tidx[j]
            self.cand[sel] = cand
            pts = self.matcher.target[cand]
            self.cand_xyz[:, sel] = np.moveaxis(pts, 2, 0)
            self.cand_sq[sel] = np.einsum("ijk,ijk->ij", pts, pts)
            # With every target point of the label cached the candidates are always complete.
            self.margin[sel] = np.inf if self.k == len(tidx) else dist[:, -1] - dist[:, 0]

    def _plain(self, moved: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        d2 = np.empty(len(moved))
        nn = np.empty(len(moved), dtype=int)
        for key, sel in self.groups:
            tidx, tree = self.matcher.trees[key]
            dist, j = tree.query(moved[sel], k=1, workers=_workers(len(d2)))
            d2[sel] = dist * dist
            nn[sel] = tidx[j]
        return d2, nn

    def match(self, moved: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Squared distances (N,) and target indices (N,) of the nearest same-label targets."""
        step = moved - self.anchor
        delta = np.sqrt(np.einsum("ij,ij->i", step, step))
        stale = ~(2.0 * delta < self.margin)  # NaN anchors (first call) compare False -> stale
        last, self.last = self.last, moved
        if stale.mean() > 0.5:
            # Early iterations move most points far: a plain 1-NN query is cheaper than
            # filling the cache, which only pays off once the motion has slowed down.
            if last is None or np.median(np.abs(moved - last)) > CACHE_START_MOTION_MM:
                return self._plain(moved)
        if stale.any():
            self._refresh(moved, np.flatnonzero(stale))
        # |c - p|^2 = |c|^2 - 2 c.p + |p|^2, without building the (N, k, 3) difference array.
        cx, cy, cz = self.cand_xyz
        dot = cx * moved[:, 0:1]
        dot += cy * moved[:, 1:2]
        dot += cz * moved[:, 2:3]
        d2_all = self.cand_sq - 2.0 * dot
        best = np.argmin(d2_all, axis=1)
        rows = np.arange(len(moved))
        d2 = d2_all[rows, best] + np.einsum("ij,ij->i", moved, moved)
        return np.maximum(d2, 0.0), self.cand[rows, best]



def _rotation_from_vector(omega: np.ndarray) -> np.ndarray:
    """Rotation matrix of the axis-angle vector ``omega`` (radians)."""
    angle = float(np.linalg.norm(omega))
    if angle < 1e-12:
        return np.eye(3)
    return _axis_rotation(omega / angle, np.rad2deg(angle))


def _point_to_plane_step(moved: np.ndarray, targets: np.ndarray, normals: np.ndarray,
                         weights: np.ndarray, with_scale: bool) -> np.ndarray:
    """One Gauss-Newton step of the weighted point-to-plane similarity fit.

    Minimises ``sum_i w_i (n_i . (x_i' - q_i))^2`` over a small similarity update
    ``x' = c + tau + (1 + delta) R(omega) (x - c)`` linearised about the identity (c = weighted
    centroid of the moved points, for conditioning). Point-to-plane lets points slide along the
    surface, so ICP converges in a few iterations instead of creeping along the long bones.

    Returns:
        The 4x4 update to compose on the left of the current matrix.
    """
    w = weights / weights.sum()
    c = w @ moved
    y = moved - c
    r = np.einsum("ij,ij->i", normals, moved - targets)
    cols = [np.cross(y, normals), normals]
    if with_scale:
        cols.insert(0, np.einsum("ij,ij->i", normals, y)[:, None])
    jac = np.hstack(cols)
    jw = jac * w[:, None]
    lhs = jac.T @ jw
    # A light Levenberg damping keeps the step sane when a direction is unconstrained (a
    # perfect cylinder cannot fix the translation along its axis).
    lhs += 1e-6 * np.trace(lhs) / lhs.shape[0] * np.eye(lhs.shape[0])
    x = np.linalg.solve(lhs, -(jw.T @ r))
    delta = float(x[0]) if with_scale else 0.0
    omega, tau = x[-6:-3], x[-3:]
    a = (1.0 + delta) * _rotation_from_vector(omega)
    update = np.eye(4)
    update[:3, :3] = a
    update[:3, 3] = c + tau - a @ c
    return update


@dataclass
class _Run:
    """One ICP run: ``rms`` (mm) is what is reported, ``score`` (mm^2) what starts compete on."""

    matrix: np.ndarray
    rms: float
    score: float
    iterations: int
    converged: bool
    scale: float
    at_bound: bool


@dataclass
class _Overlap:
    """Restriction of the fit to the target's extent along its long axis.

    Attributes:
        axis: (3,) unit vector in the target frame, pointing from the end both clouds contain
            (the ankle joint) towards the end where the fields of view may differ.
        top: (N,) per source point, the highest allowed height (mm) along ``axis`` of its
            mapped position: the top of the target's points of the same label minus a margin.
    """

    axis: np.ndarray
    top: np.ndarray

    def inside(self, moved: np.ndarray) -> np.ndarray:
        """Boolean (N,) mask of the mapped source points within the target's extent."""
        return moved @ self.axis <= self.top


#: Trimming groups: (source rows, fraction of them kept), one per label or one for all points.
TrimGroups = List[Tuple[np.ndarray, float]]


def _trimmed(d2: np.ndarray, inside: Optional[np.ndarray], groups: TrimGroups) -> np.ndarray:
    """Indices of the closest pairs: in each group (source rows, keep fraction), the given
    fraction of its points ``inside`` the target's extent (all points when ``inside`` is None).
    """
    if inside is not None and not inside.all():
        # A fit that pushed nearly everything out of the target's extent is meaningless; keep
        # every point then so that its error shows.
        if np.count_nonzero(inside) < max(3, OVERLAP_MIN_FRACTION * len(d2)):
            inside = None
    out = []
    for rows, fraction in groups:
        if inside is not None:
            rows = rows[inside[rows]]
        n = len(rows)
        if n == 0:
            continue
        n_keep = min(n, max(3, int(np.ceil(fraction * n))))
        if n_keep < n:
            rows = rows[np.argpartition(d2[rows], n_keep - 1)[:n_keep]]
        out.append(rows)
    if not out:
        return np.arange(len(d2))
    return out[0] if len(out) == 1 else np.concatenate(out)


def _score(d2: np.ndarray, keep: np.ndarray, weights: Optional[np.ndarray]) -> float:
    """Mean squared distance of the kept pairs, weighted by ``weights`` when given."""
    w = None if weights is None else weights[keep]
    if w is None or w.sum() <= 0:
        return float(d2[keep].mean())
    return float(w @ d2[keep] / w.sum())


def _run_icp(src: np.ndarray, labels: Optional[np.ndarray], matcher: _Matcher, init: np.ndarray,
             max_iterations: int, tolerance: float, trim: TrimGroups, with_scale: bool,
             scale_bounds: Tuple[float, float], target_normals: Optional[np.ndarray] = None,
             point_weights: Optional[np.ndarray] = None, overlap: Optional[_Overlap] = None,
             report_fraction: float = 1.0) -> _Run:
    """Trimmed similarity ICP from one start.

    Point-to-point (Umeyama) steps, or weighted point-to-plane steps when ``target_normals``
    are given; ``trim`` says which closest pairs feed each step. With ``overlap``, source points
    mapped beyond the target's extent take no part. The returned ``rms`` is over the
    ``report_fraction`` closest pairs of all (overlapping) points, whatever ``trim`` is, so it
    reads the same for every caller; ``score`` is the (weighted) mean squared error of the
    pairs the fit used, the quantity the starts are compared on.
    """
    nearest = _NearestCache(matcher, labels, len(src))
    matrix = np.array(init, dtype=float)
    prev_mse = np.inf
    converged = False
    iterations = 0
    lo, hi = scale_bounds
    scale = matrix_scale(matrix)
    at_bound = False
    for it in range(1, max_iterations + 1):
        iterations = it
        moved = _apply(matrix, src)
        d2, nn = nearest.match(moved)
        inside = None if overlap is None else overlap.inside(moved)
        keep = _trimmed(d2, inside, trim)
        mse = float(d2[keep].mean())
        # The error of the current matrix is measured before refitting; a change below the
        # tolerance means the correspondences (and hence the fit) no longer move.
        if abs(prev_mse - mse) < tolerance:
            converged = True
            break
        prev_mse = mse
        if target_normals is not None:
            w = np.ones(len(keep)) if point_weights is None else point_weights[keep]
            update = _point_to_plane_step(moved[keep], matcher.target[nn[keep]],
                                          target_normals[nn[keep]], w, with_scale)
            matrix = update @ matrix
            s_now = matrix_scale(matrix)
            at_bound = with_scale and not (lo < s_now < hi)
            if at_bound:
                matrix = _rescale_start(matrix, src.mean(axis=0), (lo, hi))
            scale = matrix_scale(matrix)
            continue
        rot, s, mu_s, mu_d = _umeyama_parts(src[keep], matcher.target[nn[keep]], with_scale, None)
        if with_scale:
            # Clamp rather than reject mid-way: a wild early scale may recover; the final
            # scale is checked by the caller.
            at_bound = not (lo < s < hi)
            s = float(np.clip(s, lo, hi))
        else:
            s = 1.0
        scale = s
        matrix = _similarity(rot, s, mu_d - s * rot @ mu_s)
    if not converged:
        # One more lookup so that rms and score describe the returned matrix.
        moved = _apply(matrix, src)
        d2, _ = nearest.match(moved)
        inside = None if overlap is None else overlap.inside(moved)
        keep = _trimmed(d2, inside, trim)
    report = _trimmed(d2, inside, [(np.arange(len(src)), report_fraction)])
    return _Run(matrix, float(np.sqrt(d2[report].mean())), _score(d2, keep, point_weights),
                iterations, converged, scale, bool(with_scale and at_bound))


def _validate(source: np.ndarray, target: np.ndarray, source_labels, target_labels,
              max_iterations: int, tolerance: float, trim_fraction: float,
              scale_bounds) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray],
                                     Tuple[float, float]]:
    source = _as_points(source, "source")
    target = _as_points(target, "target")
    if (source_labels is None) != (target_labels is None):
        raise GeometryError("give labels for both source and target points, or for neither")
    if source_labels is not None:
        source_labels = np.asarray(source_labels).reshape(-1)
        target_labels = np.asarray(target_labels).reshape(-1)
        if source_labels.shape[0] != source.shape[0]:
            raise GeometryError(f"source_labels has {source_labels.shape[0]} entries for "
                                f"{source.shape[0]} source points")
        if target_labels.shape[0] != target.shape[0]:
            raise GeometryError(f"target_labels has {target_labels.shape[0]} entries for "
                                f"{target.shape[0]} target points")
        missing = sorted(set(np.unique(source_labels).tolist()) - set(np.unique(target_labels).tolist()))
        if missing:
            raise GeometryError(f"label(s) {missing} present in the source points but absent from the "
                                f"target: they have nothing to match")
    if int(max_iterations) < 1:
        raise GeometryError(f"max_iterations must be >= 1, got {max_iterations}")
    if not (np.isfinite(tolerance) and tolerance >= 0):
        raise GeometryError(f"tolerance must be a non-negative number, got {tolerance}")
    if not (0.0 < trim_fraction <= 1.0):
        raise GeometryError(f"trim_fraction must be in (0, 1], got {trim_fraction}")
    lo, hi = (float(v) for v in scale_bounds)
    if not (0.0 < lo <= 1.0 <= hi and np.isfinite(hi)):
        raise GeometryError(f"scale_bounds must satisfy 0 < low <= 1 <= high, got {scale_bounds}")
    return source, target, source_labels, target_labels, (lo, hi)


def _rescale_start(matrix: np.ndarray, centre: np.ndarray, bounds: Tuple[float, float]) -> np.ndarray:
    """``matrix`` with its scale clamped to ``bounds``, still mapping ``centre`` to the same point."""
    s = matrix_scale(matrix)
    s_new = float(np.clip(s, bounds[0], bounds[1]))
    if s_new == s:
        return matrix
    rot = matrix[:3, :3] / s
    return _similarity(rot, s_new, _apply(matrix, centre[None, :])[0] - s_new * rot @ centre)


def _coarse_subset(n: int, labels: Optional[np.ndarray], size: int) -> np.ndarray:
    """Deterministic, label-stratified subset of ``size`` source indices (all when n <= size)."""
    if n <= size:
        return np.arange(n)
    if labels is None:
        return np.linspace(0, n - 1, size).round().astype(int)
    out = []
    for key in np.unique(labels):
        rows = np.flatnonzero(labels == key)
        k = max(10, int(round(size * len(rows) / n)))
        k = min(k, len(rows))
        out.append(rows[np.linspace(0, len(rows) - 1, k).round().astype(int)])
    return np.sort(np.unique(np.concatenate(out)))


def _distinct(candidates: Dict[int, np.ndarray], points: np.ndarray,
              atol_mm: float = 0.5) -> Dict[int, np.ndarray]:
    """Drop candidates (later in insertion order) that move ``points`` within ``atol_mm`` of an
    earlier one: two starts that reached the same fit need not both be refined."""
    out: Dict[int, np.ndarray] = {}
    for i, m in candidates.items():
        moved = _apply(m, points)
        if all(np.max(np.linalg.norm(moved - _apply(o, points), axis=1)) > atol_mm for o in out.values()):
            out[i] = m
    return out


def _label_weights(source_labels: Optional[np.ndarray],
                   label_weights: Optional[Dict[int, float]]) -> Optional[np.ndarray]:
    """Per-point weights (N,) from ``{label: weight}`` (labels not listed weigh 1)."""
    if label_weights is None:
        return None
    if source_labels is None:
        raise GeometryError("label_weights need source and target labels")
    weights = np.array([float(label_weights.get(int(k), 1.0)) for k in source_labels])
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise GeometryError(f"label_weights must be non-negative and not all zero, got "
                            f"{label_weights}")
    return weights


def _trim_groups(n: int, labels: Optional[np.ndarray], trim_fraction: float,
                 label_trim: Optional[Dict[int, float]]) -> TrimGroups:
    """Trimming groups: all ``n`` points with ``trim_fraction``, or one group per label."""
    if label_trim is None:
        return [(np.arange(n), trim_fraction)]
    if labels is None:
        raise GeometryError("label_trim needs source and target labels")
    groups = [(np.flatnonzero(labels == k), float(label_trim.get(int(k), trim_fraction)))
              for k in np.unique(labels).tolist()]
    if not all(0.0 < f <= 1.0 for _, f in groups):
        raise GeometryError(f"label_trim fractions must be in (0, 1], got {label_trim}")
    return groups


def _overlap(source_labels: Optional[np.ndarray], n: int, target: np.ndarray,
             target_labels: Optional[np.ndarray], long_axis: np.ndarray) -> _Overlap:
    """The target's extent along ``long_axis`` (per label), for :class:`_Overlap`."""
    axis = _unit(long_axis, "long_axis")
    height = target @ axis
    if source_labels is None:
        top = np.full(n, float(height.max()) - OVERLAP_MARGIN_MM)
    else:
        top = np.empty(n)
        for key in np.unique(source_labels).tolist():
            top[source_labels == key] = (float(height[target_labels == key].max())
                                         - OVERLAP_MARGIN_MM)
    return _Overlap(axis, top)


def _surface_distances(matrix: np.ndarray, source: np.ndarray,
                       source_labels: Optional[np.ndarray], matcher: _Matcher) -> np.ndarray:
    """Distance (N,) mm from each mapped source point to its nearest same-label target point."""
    moved = _apply(matrix, source)
    out = np.empty(len(source))
    groups = ([(None, np.arange(len(source)))] if source_labels is None else
              [(int(k), np.flatnonzero(source_labels == k))
               for k in np.unique(source_labels).tolist()])
    for key, rows in groups:
        _, tree = matcher.trees[key]
        out[rows] = tree.query(moved[rows], k=1, workers=_workers(len(rows)))[0]
    return out


def _inlier_fraction(matrix: np.ndarray, source: np.ndarray, source_labels: Optional[np.ndarray],
                     matcher: _Matcher, weights: Optional[np.ndarray],
                     overlap: Optional[_Overlap], limit_mm: float) -> float:
    """:func:`inlier_fraction` with the target trees already built."""
    dist = _surface_distances(matrix, source, source_labels, matcher)
    # Points beyond the target's extent cannot be judged: they are left out, unless the fit put
    # (nearly) everything there, which is itself a failure.
    rows = np.ones(len(source), bool)
    if overlap is not None:
        inside = overlap.inside(_apply(matrix, source))
        if np.count_nonzero(inside) >= max(3, OVERLAP_MIN_FRACTION * len(source)):
            rows = inside
    ok = dist[rows] <= limit_mm
    if weights is None:
        return float(ok.mean())
    w = weights[rows]
    return float(w @ ok / w.sum()) if w.sum() > 0 else float(ok.mean())


def inlier_fraction(matrix: np.ndarray, source: np.ndarray, target: np.ndarray, *,
                    source_labels: Optional[np.ndarray] = None,
                    target_labels: Optional[np.ndarray] = None,
                    label_weights: Optional[Dict[int, float]] = None,
                    long_axis: Optional[np.ndarray] = None,
                    inlier_distance_mm: Optional[float] = None) -> float:
    """Fraction of source points that ``matrix`` puts on the target surface.

    A point is an inlier when its mapped position lies within ``inlier_distance_mm`` of the
    nearest target point of its label. With ``label_weights`` the fraction is weighted (the
    fit's own weighting: a displaced fibula that the fit deliberately discounts does not count
    as a poor fit); with ``long_axis`` the points mapped beyond the target's extent along it
    (a field of view longer than the target's) are left out. This is what
    :func:`similarity_icp` reports as ``IcpResult.inlier_fraction``; here for any matrix.

    Args:
        matrix: 4x4 source -> target similarity (mm).
        source: Source points (N, 3), mm.
        target: Target points (M, 3), mm.
        source_labels: Optional (N,) labels; then each point is judged against its own label.
        target_labels: Optional (M,) labels (required with ``source_labels``).
        label_weights: Optional {label: weight}.
        long_axis: Optional (3,) target-frame axis from the end both clouds share.
        inlier_distance_mm: Inlier distance; :data:`INLIER_DISTANCE_MM` by default.

    Returns:
        The fraction in [0, 1].
    """
    source, target, source_labels, target_labels, _ = _validate(
        source, target, source_labels, target_labels, 1, 0.0, 1.0, (1.0, 1.0))
    m = np.asarray(matrix, dtype=float)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise GeometryError(f"matrix must be a finite 4x4 matrix, got shape {m.shape}")
    matcher = _Matcher(target, target_labels, source_labels)
    overlap = (None if long_axis is None else
               _overlap(source_labels, len(source), target, target_labels, long_axis))
    limit = INLIER_DISTANCE_MM if inlier_distance_mm is None else float(inlier_distance_mm)
    return _inlier_fraction(m, source, source_labels, matcher,
                            _label_weights(source_labels, label_weights), overlap, limit)


def similarity_icp(source: np.ndarray, target: np.ndarray, *,
                   source_labels: Optional[np.ndarray] = None,
                   target_labels: Optional[np.ndarray] = None,
                   max_iterations: int = 50, tolerance: float = 1e-8, trim_fraction: float = 0.85,
                   with_scale: bool = True, scale_bounds: Tuple[float, float] = (0.6, 1.6),
                   init: Optional[np.ndarray] = None, n_starts: Optional[int] = None,
                   target_normals: Optional[np.ndarray] = None,
                   label_weights: Optional[Dict[int, float]] = None,
                   label_trim: Optional[Dict[int, float]] = None,
                   long_axis: Optional[np.ndarray] = None,
                   source_axis: Optional[np.ndarray] = None,
                   inlier_distance_mm: float = INLIER_DISTANCE_MM) -> IcpResult:
    """Register ``source`` points to ``target`` points with a trimmed similarity ICP.

    Args:
        source: Source points (N, 3), LPS mm.
        target: Target points (M, 3), LPS mm.
        source_labels: Optional (N,) integer labels (1 tibia, 2 fibula); with labels, each
            source point only matches target points of its own label.
        target_labels: Optional (M,) labels of the target points (required with source_labels).
        max_iterations: Iteration cap of each ICP run (the reference method uses 50).
        tolerance: Convergence threshold on the change of the trimmed mean squared error, mm^2
            (the reference method uses 1e-8).
        trim_fraction: Fraction (0, 1] of the closest correspondences used in each fit (and the
            fraction ``rms_mm`` is taken over).
        with_scale: Estimate an isotropic scale (False: rigid ICP).
        scale_bounds: (low, high) allowed scale; the scale is clamped during the iterations and
            a final scale at a bound is refused.
        init: Optional 4x4 start; when given, only this start is used.
        n_starts: Use only the first ``n_starts`` of :func:`initial_guesses` (all by default).
        target_normals: Optional (M, 3) unit surface normals of the target points. With them the
            final full-resolution run uses weighted point-to-plane steps, which converge in a few
            iterations where point-to-point ICP creeps along long bones for hundreds.
        label_weights: Optional {label: weight} for the point-to-plane steps and for comparing
            the starts, e.g. ``{1: 1.0, 2: 0.3}`` to anchor the fit on the tibia when the fibula
            is fractured or the syndesmosis widened (needs labels).
        label_trim: Optional {label: fraction} replacing ``trim_fraction`` per label: each label
            keeps its own closest fraction. Trimming all labels together lets a fit drop the
            distal tibia (plafond, malleolus: the only features that fix the position along the
            shaft) and slide, as long as the dropped points stay under the trimmed share; a
            per-label budget keeps them (needs labels).
        long_axis: Optional (3,) unit vector in the target frame along the long bones, pointing
            from the end both clouds contain (the ankle joint) to the end where the fields of
            view may differ (the proximal edge of the scan). Then the starts align the two
            clouds' shared ends instead of their centroids (see :func:`initial_guesses`), and
            source points mapped beyond the target's extent along it take no part in the fit
            nor in ``inlier_fraction`` (a scan reaching higher up the leg than the target).
        source_axis: Optional (3,) source-frame direction that must end up within
            :data:`MAX_AXIS_ANGLE_DEG` of ``long_axis`` (with it): e.g. the patient's superior,
            LPS +z. Upside-down starts
            are dropped and an upside-down fit loses to any upright one. Without it, a fit
            turned upside down can hide what does not match (a foot bone labelled tibia)
            beyond the target's end, where ``long_axis`` excludes points.
        inlier_distance_mm: Distance (mm) to the nearest same-label target point within which
            a source point counts as an inlier in ``IcpResult.inlier_fraction``.

    Returns:
        The :class:`IcpResult` of the start with the lowest final trimmed (label-weighted) mean
        squared error.

    Raises:
        GeometryError: Empty or non-finite points, mismatched labels, a source label absent
            from the target, bad parameters, or a final scale stuck at ``scale_bounds`` (the
            clouds are probably not the same anatomy, or not in the same units).
    """
    source, target, source_labels, target_labels, bounds = _validate(
        source, target, source_labels, target_labels, max_iterations, tolerance, trim_fraction,
        scale_bounds)
    n_src = len(source)
    weights = _label_weights(source_labels, label_weights)
    trim = _trim_groups(n_src, source_labels, trim_fraction, label_trim)
    overlap = (None if long_axis is None else
               _overlap(source_labels, n_src, target, target_labels, long_axis))
    if source_axis is not None and overlap is None:
        raise GeometryError("source_axis needs long_axis")
    up = None if source_axis is None else _unit(source_axis, "source_axis")
    normals = _unit_normals(target_normals, target)
    starts = _starts(source, target, source_labels, target_labels, init, n_starts, overlap, up,
                     bounds if with_scale else (1.0, 1.0))
    fit = _Fit(source, source_labels, _Matcher(target, target_labels, source_labels),
               int(max_iterations), tolerance, with_scale, bounds, weights, overlap, up)
    # Coarse to fine: short runs of every start on a subsample, then the best on all points.
    candidates: Dict[int, np.ndarray] = dict(enumerate(starts))
    if len(starts) > 1:
        candidates = _coarse_search(fit, candidates, trim_fraction, label_trim)
    winner, run = _refine(fit, candidates, trim, normals, trim_fraction)
    inliers = _inlier_fraction(run.matrix, source, source_labels, fit.matcher, weights, overlap,
                               float(inlier_distance_mm))
    return IcpResult(matrix=run.matrix, rms_mm=run.rms, inlier_fraction=inliers,
                     iterations=run.iterations, converged=run.converged,
                     scale=matrix_scale(run.matrix), start=int(winner))


def _unit_normals(target_normals: Optional[np.ndarray], target: np.ndarray
                  ) -> Optional[np.ndarray]:
    """``target_normals`` (M, 3) scaled to unit length, checked against ``target`` (M, 3).

    Raises:
        GeometryError: Non-finite or not shaped like the target.
    """
    if target_normals is None:
        return None
    normals = np.asarray(target_normals, dtype=float)
    if normals.shape != target.shape or not np.all(np.isfinite(normals)):
        raise GeometryError(f"target_normals must be finite and shaped like the target "
                            f"{target.shape}, got {normals.shape}")
    norms = np.linalg.norm(normals, axis=1, keepdims=True)
    return normals / np.maximum(norms, 1e-12)


def _starts(source: np.ndarray, target: np.ndarray, source_labels: Optional[np.ndarray],
            target_labels: Optional[np.ndarray], init: Optional[np.ndarray],
            n_starts: Optional[int], overlap: Optional[_Overlap], up: Optional[np.ndarray],
            bounds: Tuple[float, float]) -> List[np.ndarray]:
    """The 4x4 starts of :func:`similarity_icp`: ``init`` alone when given, else the first
    ``n_starts`` of :func:`initial_guesses` (all when None), each with its scale clamped to
    ``bounds`` (rigid ICP: (1, 1)).

    Raises:
        GeometryError: ``init`` not a finite 4x4 matrix, or ``n_starts`` < 1.
    """
    if init is not None:
        m = np.asarray(init, dtype=float)
        if m.shape != (4, 4) or not np.all(np.isfinite(m)):
            raise GeometryError(f"init must be a finite 4x4 matrix, got shape {m.shape}")
        starts = [m]
    else:
        starts = initial_guesses(source, target, source_labels, target_labels,
                                 long_axis=None if overlap is None else overlap.axis,
                                 source_axis=up)
        if n_starts is not None:
            if int(n_starts) < 1:
                raise GeometryError(f"n_starts must be >= 1, got {n_starts}")
            starts = starts[:int(n_starts)]
    # A start's scale must be admissible: clamp it, keeping the image of the source centroid
    # so the start stays centred on the target.
    centroid = source.mean(axis=0)
    return [_rescale_start(m, centroid, bounds) for m in starts]


@dataclass
class _Fit:
    """What every ICP run of one :func:`similarity_icp` call shares.

    Attributes:
        source: (N, 3) source points, mm.
        labels: (N,) source labels or None.
        matcher: Nearest-neighbour search in the target.
        max_iterations: The caller's iteration cap.
        tolerance: The caller's convergence threshold, mm^2.
        with_scale: Estimate an isotropic scale.
        bounds: (low, high) allowed scale.
        weights: (N,) per-point weights or None.
        overlap: The target's extent along its long axis, or None.
        up: (3,) source-frame direction that must stay upright against ``overlap.axis``,
            or None.
    """

    source: np.ndarray
    labels: Optional[np.ndarray]
    matcher: _Matcher
    max_iterations: int
    tolerance: float
    with_scale: bool
    bounds: Tuple[float, float]
    weights: Optional[np.ndarray]
    overlap: Optional[_Overlap]
    up: Optional[np.ndarray]

    def implausible(self, matrix: np.ndarray) -> bool:
        """Upside down against the long axis (only with ``up``)."""
        return (self.up is not None and self.overlap is not None
                and not _upright(matrix, self.up, self.overlap.axis))

    def rank(self, run: _Run, start: int) -> Tuple[bool, bool, float, int]:
        """Sort key of competing runs: fits whose scale stayed inside the bounds first (a
        clamped fit is not trusted), then upright ones, then the lowest score."""
        return run.at_bound, self.implausible(run.matrix), run.score, start


def _coarse_search(fit: _Fit, candidates: Dict[int, np.ndarray], trim_fraction: float,
                   label_trim: Optional[Dict[int, float]]) -> Dict[int, np.ndarray]:
    """The one or two most promising starts, after short runs on a subsample.

    Coarse to fine, because each full-resolution iteration queries every source point: every
    start runs a few iterations on a small label-stratified subsample, the most promising ones
    continue there, and only the best one or two are refined on all points. Starts are
    compared on the error the fit minimises (label-weighted, trimmed as the fit trims).

    Args:
        fit: The shared settings.
        candidates: {start index: 4x4 start}.
        trim_fraction, label_trim: As in :func:`similarity_icp`.

    Returns:
        {start index: 4x4 matrix after the coarse runs} of the survivors.
    """
    sub = _coarse_subset(len(fit.source), fit.labels, COARSE_POINTS)
    sub_src = fit.source[sub]
    sub_labels = None if fit.labels is None else fit.labels[sub]
    sub_trim = _trim_groups(len(sub), sub_labels, trim_fraction, label_trim)
    sub_weights = None if fit.weights is None else fit.weights[sub]
    sub_overlap = None if fit.overlap is None else _Overlap(fit.overlap.axis,
                                                            fit.overlap.top[sub])
    for iters, keep_n, same_mm in ((COARSE_FIRST_ITERATIONS, 3, 0.5),
                                   (COARSE_ITERATIONS, 2, FINAL_DISTINCT_MM)):
        stage = {i: _run_icp(sub_src, sub_labels, fit.matcher, m,
                             min(iters, fit.max_iterations), max(fit.tolerance, 1e-6), sub_trim,
                             fit.with_scale, fit.bounds, None, sub_weights, sub_overlap)
                 for i, m in candidates.items()}
        # Keep runners-up only while they are close to the best, since the subsample may not
        # separate them.
        order = sorted(stage, key=lambda i: fit.rank(stage[i], i))
        best = float(np.sqrt(stage[order[0]].score))
        kept = [order[0]] + [i for i in order[1:keep_n]
                             if not stage[i].at_bound and not fit.implausible(stage[i].matrix)
                             and np.sqrt(stage[i].score) <= 1.2 * best + 0.05]
        candidates = _distinct({i: stage[i].matrix for i in kept}, sub_src, same_mm)
    return candidates


def _refine(fit: _Fit, candidates: Dict[int, np.ndarray], trim: TrimGroups,
            normals: Optional[np.ndarray], report_fraction: float) -> Tuple[int, _Run]:
    """Run every candidate on all points, with the caller's iteration cap and tolerance
    (point-to-plane steps when there are ``normals``); (start index, run) of the best.

    Raises:
        GeometryError: The best fit's scale is stuck at a bound.
    """
    runs = {i: _run_icp(fit.source, fit.labels, fit.matcher, m, fit.max_iterations,
                        fit.tolerance, trim, fit.with_scale, fit.bounds, normals, fit.weights,
                        fit.overlap, report_fraction)
            for i, m in candidates.items()}
    winner = min(runs, key=lambda i: fit.rank(runs[i], i))
    run = runs[winner]
    if run.at_bound:
        raise GeometryError(
            f"the registration scale ran into its bounds {fit.bounds} (final scale "
            f"{run.scale:.3f}): the source and target surfaces do not look like the same anatomy "
            f"at the same size (wrong bones, wrong units, or a very different field of view)")
    return winner, run
