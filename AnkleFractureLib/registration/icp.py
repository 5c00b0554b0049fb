"""Robust similarity ICP between labelled bone surface point clouds.

The method registers a *source* cloud (e.g. the mirrored healthy-side or patient bones) to a
*target* cloud (e.g. the template) with a similarity transform ``y = s R x + t`` (rotation R
with det +1, isotropic scale s, translation t; all in LPS mm):

* several initialisations (centroid alignment, principal-axes alignments, small rotations about
  the long axis) guard against the local minima of ICP;
* correspondences come from one KD-tree per label, so tibia points only match tibia points and
  fibula points only fibula points (with a single tree the two parallel bones slide into each
  other);
* correspondences are *trimmed*: only the ``trim_fraction`` closest pairs feed the fit, so a
  displaced fracture fragment or a different field of view does not drag the transform;
* each fit is the closed-form least-squares similarity of Umeyama (1991), with the scale
  clamped to ``scale_bounds``.

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
#: Small rotations (degrees) about the long axis added to the starts.
LONG_AXIS_ANGLES_DEG = (-15.0, 15.0)


@dataclass
class IcpResult:
    """Outcome of :func:`similarity_icp`.

    Attributes:
        matrix: 4x4 similarity mapping source points to target points (LPS mm), i.e.
            ``target ~ (matrix @ [x, y, z, 1])[:3]``.
        rms_mm: RMS distance (mm) of the inlier (trimmed) correspondences at the end.
        inlier_fraction: Fraction of source points kept as inliers at the end.
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
                    target_labels: Optional[np.ndarray] = None) -> List[np.ndarray]:
    """A few 4x4 similarity starts for ICP, most plausible first.

    All starts share the scale ``rms_radius(target) / rms_radius(source)``. In order:

    0. identity rotation, centroid alignment (with labels: the mean of the per-label centroids,
       so a bone with many more points does not dominate the translation);
    1. with >= 3 common labels: Umeyama rotation on the label centroids; with 2 labels: the
       smallest rotation aligning the vector between the two label centroids (skipped when it
       exceeds 45 degrees, where the centroids are too unreliable, e.g. different fields of view);
    2-5. principal-axes alignments, the 4 proper sign combinations;
    then rotations of start 0 by +-15 degrees about the target's long axis.

    Args:
        source: Source points (N, 3), LPS mm.
        target: Target points (M, 3), LPS mm.
        source_labels: Optional labels (N,) of the source points.
        target_labels: Optional labels (M,) of the target points (required with source_labels).

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
    long_axis = pt_ax[:, 0]
    for ang in LONG_AXIS_ANGLES_DEG:
        starts.append(centred(_axis_rotation(long_axis, ang)))
    return starts


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
    matrix: np.ndarray
    rms: float
    inlier_fraction: float
    iterations: int
    converged: bool
    scale: float
    at_bound: bool


def _run_icp(src: np.ndarray, labels: Optional[np.ndarray], matcher: _Matcher, init: np.ndarray,
             max_iterations: int, tolerance: float, trim_fraction: float, with_scale: bool,
             scale_bounds: Tuple[float, float], target_normals: Optional[np.ndarray] = None,
             point_weights: Optional[np.ndarray] = None) -> _Run:
    """Trimmed similarity ICP from one start: point-to-point (Umeyama) steps, or weighted
    point-to-plane steps when ``target_normals`` are given."""
    nearest = _NearestCache(matcher, labels, len(src))
    n = len(src)
    n_keep = min(n, max(3, int(np.ceil(trim_fraction * n))))
    matrix = np.array(init, dtype=float)
    prev_mse = np.inf
    converged = False
    iterations = 0
    lo, hi = scale_bounds
    scale = matrix_scale(matrix)
    at_bound = False
    for it in range(1, max_iterations + 1):
        iterations = it
        d2, nn = nearest.match(_apply(matrix, src))
        keep = np.argpartition(d2, n_keep - 1)[:n_keep] if n_keep < n else np.arange(n)
        mse = float(d2[keep].mean())
        # The error of the current matrix is measured before refitting; a change below the
        # tolerance means the correspondences (and hence the fit) no longer move.
        if abs(prev_mse - mse) < tolerance:
            converged = True
            break
        prev_mse = mse
        if target_normals is not None:
            w = np.ones(len(keep)) if point_weights is None else point_weights[keep]
            update = _point_to_plane_step(_apply(matrix, src[keep]), matcher.target[nn[keep]],
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
        # One more lookup so that rms describes the returned matrix.
        d2, _ = nearest.match(_apply(matrix, src))
        mse = float(np.partition(d2, n_keep - 1)[:n_keep].mean()) if n_keep < n else float(d2.mean())
    return _Run(matrix, float(np.sqrt(mse)), n_keep / n, iterations, converged, scale,
                bool(with_scale and at_bound))


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


def similarity_icp(source: np.ndarray, target: np.ndarray, *,
                   source_labels: Optional[np.ndarray] = None,
                   target_labels: Optional[np.ndarray] = None,
                   max_iterations: int = 50, tolerance: float = 1e-8, trim_fraction: float = 0.85,
                   with_scale: bool = True, scale_bounds: Tuple[float, float] = (0.6, 1.6),
                   init: Optional[np.ndarray] = None, n_starts: Optional[int] = None,
                   target_normals: Optional[np.ndarray] = None,
                   label_weights: Optional[Dict[int, float]] = None) -> IcpResult:
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
        trim_fraction: Fraction (0, 1] of the closest correspondences used in each fit.
        with_scale: Estimate an isotropic scale (False: rigid ICP).
        scale_bounds: (low, high) allowed scale; the scale is clamped during the iterations and
            a final scale at a bound is refused.
        init: Optional 4x4 start; when given, only this start is used.
        n_starts: Use only the first ``n_starts`` of :func:`initial_guesses` (all by default).
        target_normals: Optional (M, 3) unit surface normals of the target points. With them the
            final full-resolution run uses weighted point-to-plane steps, which converge in a few
            iterations where point-to-point ICP creeps along long bones for hundreds.
        label_weights: Optional {label: weight} for the point-to-plane steps, e.g.
            ``{1: 1.0, 2: 0.3}`` to anchor the fit on the tibia when the fibula is fractured or
            the syndesmosis widened (needs labels).

    Returns:
        The :class:`IcpResult` of the start with the lowest final trimmed RMS.

    Raises:
        GeometryError: Empty or non-finite points, mismatched labels, a source label absent
            from the target, bad parameters, or a final scale stuck at ``scale_bounds`` (the
            clouds are probably not the same anatomy, or not in the same units).
    """
    source, target, source_labels, target_labels, bounds = _validate(
        source, target, source_labels, target_labels, max_iterations, tolerance, trim_fraction,
        scale_bounds)
    max_iterations = int(max_iterations)
    if init is not None:
        m = np.asarray(init, dtype=float)
        if m.shape != (4, 4) or not np.all(np.isfinite(m)):
            raise GeometryError(f"init must be a finite 4x4 matrix, got shape {m.shape}")
        starts = [m]
    else:
        starts = initial_guesses(source, target, source_labels, target_labels)
        if n_starts is not None:
            if int(n_starts) < 1:
                raise GeometryError(f"n_starts must be >= 1, got {n_starts}")
            starts = starts[:int(n_starts)]
    # A start's scale must be admissible: clamp it (rigid: set it to 1), keeping the image of
    # the source centroid so the start stays centred on the target.
    centroid = source.mean(axis=0)
    starts = [_rescale_start(m, centroid, bounds if with_scale else (1.0, 1.0)) for m in starts]
    matcher = _Matcher(target, target_labels, source_labels)

    # Coarse to fine, because each full-resolution iteration queries every source point:
    # every start runs a few iterations on a small label-stratified subsample, the most
    # promising ones continue there, and only the best one or two are refined on all points
    # with the caller's iteration cap and tolerance.
    n_src = len(source)
    candidates: Dict[int, np.ndarray] = dict(enumerate(starts))
    if len(starts) > 1:
        sub = _coarse_subset(n_src, source_labels, COARSE_POINTS)
        sub_src = source[sub]
        sub_labels = None if source_labels is None else source_labels[sub]
        for iters, keep_n in ((COARSE_FIRST_ITERATIONS, 3), (COARSE_ITERATIONS, 2)):
            stage = {i: _run_icp(sub_src, sub_labels, matcher, m, min(iters, max_iterations),
                                 max(tolerance, 1e-6), trim_fraction, with_scale, bounds)
                     for i, m in candidates.items()}
            # Prefer fits whose scale stayed inside the bounds (a clamped fit is not trusted);
            # keep runners-up only while they are close to the best, since the subsample may
            # not separate them.
            order = sorted(stage, key=lambda i: (stage[i].at_bound, stage[i].rms, i))
            best = stage[order[0]].rms
            kept = [order[0]] + [i for i in order[1:keep_n]
                                 if not stage[i].at_bound and stage[i].rms <= 1.2 * best + 0.05]
            candidates = _distinct({i: stage[i].matrix for i in kept}, sub_src)
    normals = None
    weights = None
    if target_normals is not None:
        normals = np.asarray(target_normals, dtype=float)
        if normals.shape != target.shape or not np.all(np.isfinite(normals)):
            raise GeometryError(f"target_normals must be finite and shaped like the target "
                                f"{target.shape}, got {normals.shape}")
        norms = np.linalg.norm(normals, axis=1, keepdims=True)
        normals = normals / np.maximum(norms, 1e-12)
        if label_weights is not None:
            if source_labels is None:
                raise GeometryError("label_weights need source and target labels")
            weights = np.array([float(label_weights.get(int(k), 1.0)) for k in source_labels])
            if np.any(weights < 0) or weights.sum() <= 0:
                raise GeometryError(f"label_weights must be non-negative, got {label_weights}")
    runs = {i: _run_icp(source, source_labels, matcher, m, max_iterations, tolerance, trim_fraction,
                        with_scale, bounds, normals, weights) for i, m in candidates.items()}
    winner = min(runs, key=lambda i: (runs[i].at_bound, runs[i].rms, i))
    run = runs[winner]
    if run.at_bound:
        raise GeometryError(
            f"the registration scale ran into its bounds {bounds} (final scale {run.scale:.3f}): "
            f"the source and target surfaces do not look like the same anatomy at the same size "
            f"(wrong bones, wrong units, or a very different field of view)")
    return IcpResult(matrix=run.matrix, rms_mm=run.rms, inlier_fraction=run.inlier_fraction,
                     iterations=run.iterations, converged=run.converged, scale=matrix_scale(run.matrix),
                     start=int(winner))
