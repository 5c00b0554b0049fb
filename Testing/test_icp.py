"""Surface point extraction and the robust similarity ICP (registration maths)."""

from __future__ import annotations

from typing import Tuple

import numpy as np
import pytest
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from AnkleFractureLib.errors import AnkleFractureError, GeometryError
from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.registration.icp import (MAX_AXIS_ANGLE_DEG, IcpResult, inlier_fraction,
                                               initial_guesses, matrix_scale, similarity_icp,
                                               umeyama)
from AnkleFractureLib.registration.surface import labelled_surface_points, surface_points


# ---------------------------------------------------------------------------------------- helpers
def ellipsoid(rng: np.random.Generator, n: int, centre, axes) -> np.ndarray:
    """n points on an ellipsoid surface (mm)."""
    v = rng.normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1)[:, None]
    return v * np.asarray(axes, float) + np.asarray(centre, float)


def bones(rng: np.random.Generator, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """Tibia-like (1) and fibula-like (2) elongated ellipsoids; the fibula is offset laterally,
    posteriorly and distally, which breaks every rotational symmetry of the pair."""
    tib = ellipsoid(rng, n, (0.0, 0.0, 0.0), (14.0, 11.0, 50.0))
    fib = ellipsoid(rng, n, (-22.0, 4.0, -12.0), (6.0, 5.0, 55.0))
    return np.vstack([tib, fib]), np.repeat([1, 2], n)


def random_similarity(rng: np.random.Generator) -> np.ndarray:
    rot = Rotation.from_euler("xyz", rng.uniform(-20.0, 20.0, 3), degrees=True).as_matrix()
    m = np.eye(4)
    m[:3, :3] = rng.uniform(0.85, 1.15) * rot
    m[:3, 3] = rng.uniform(-40.0, 40.0, 3)
    return m


def apply(m: np.ndarray, p: np.ndarray) -> np.ndarray:
    return p @ m[:3, :3].T + m[:3, 3]


def errors(found: np.ndarray, truth: np.ndarray, points: np.ndarray) -> Tuple[float, float]:
    """(rotation error in degrees, RMS point displacement in mm over ``points``)."""
    r1 = found[:3, :3] / matrix_scale(found)
    r2 = truth[:3, :3] / matrix_scale(truth)
    angle = np.rad2deg(np.arccos(np.clip((np.trace(r1.T @ r2) - 1.0) / 2.0, -1.0, 1.0)))
    disp = np.sqrt(np.mean(np.sum((apply(found, points) - apply(truth, points)) ** 2, axis=1)))
    return float(angle), float(disp)


# ---------------------------------------------------------------------------------------- umeyama
def test_umeyama_exact_on_noiseless_data():
    rng = np.random.default_rng(3)
    src = rng.normal(size=(50, 3)) * 20
    truth = random_similarity(rng)
    m = umeyama(src, apply(truth, src))
    np.testing.assert_allclose(m, truth, atol=1e-9)
    assert np.linalg.det(m[:3, :3]) > 0


def test_umeyama_rigid_and_weighted():
    rng = np.random.default_rng(4)
    src = rng.normal(size=(40, 3)) * 10
    truth = random_similarity(rng)
    truth[:3, :3] /= matrix_scale(truth)
    dst = apply(truth, src)
    np.testing.assert_allclose(umeyama(src, dst, with_scale=False), truth, atol=1e-9)
    # Weights: a zero-weight outlier must not move the fit.
    dst_bad = dst.copy()
    dst_bad[0] += 100.0
    w = np.ones(len(src))
    w[0] = 0.0
    np.testing.assert_allclose(umeyama(src, dst_bad, weights=w, with_scale=False), truth, atol=1e-9)


def test_umeyama_returns_proper_rotation_for_mirrored_points():
    rng = np.random.default_rng(5)
    src = rng.normal(size=(30, 3)) * [30, 10, 3]
    dst = src * [-1.0, 1.0, 1.0]  # a reflection: the best proper rotation is still det +1
    m = umeyama(src, dst)
    assert np.linalg.det(m[:3, :3]) > 0


# ---------------------------------------------------------------------------------------- ICP
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_icp_recovers_known_similarity(seed):
    rng = np.random.default_rng(seed)
    src, sl = bones(rng, 4000)
    canon, tl = bones(rng, 5000)  # a different sampling of the same surfaces
    truth = random_similarity(rng)
    res = similarity_icp(src, apply(truth, canon), source_labels=sl, target_labels=tl)
    assert isinstance(res, IcpResult)
    angle, disp = errors(res.matrix, truth, src)
    assert angle < 0.5, angle
    assert disp < 0.3, disp
    assert res.scale == pytest.approx(matrix_scale(truth), rel=3e-3)
    # Inliers are measured after the fit (within 2.5 mm), not the trimmed share: all of them.
    assert res.inlier_fraction > 0.99
    assert res.rms_mm < 1.0
    assert 1 <= res.iterations <= 50


def test_icp_without_labels_on_identical_clouds_is_exact():
    rng = np.random.default_rng(11)
    src, _ = bones(rng, 1500)
    truth = random_similarity(rng)
    res = similarity_icp(src, apply(truth, src), trim_fraction=1.0)
    angle, disp = errors(res.matrix, truth, src)
    assert angle < 1e-3 and disp < 1e-3
    assert res.rms_mm < 1e-3
    assert res.converged


def test_trimming_resists_a_displaced_fragment():
    rng = np.random.default_rng(7)
    src, sl = bones(rng, 4000)
    canon, tl = bones(rng, 5000)
    truth = random_similarity(rng)
    target = apply(truth, canon)
    # "Fracture": the distal 25% of the source fibula is displaced 8 mm laterally and 4 mm
    # posteriorly (away from every surface).
    fib = np.flatnonzero(sl == 2)
    distal = fib[np.argsort(src[fib, 2])[: len(fib) // 4]]
    moved = src.copy()
    moved[distal] += [-8.0, 4.0, 0.0]
    intact = np.setdiff1d(np.arange(len(src)), distal)
    trimmed = similarity_icp(moved, target, source_labels=sl, target_labels=tl)
    a_t, d_t = errors(trimmed.matrix, truth, src[intact])
    assert a_t < 1.0 and d_t < 1.0, (a_t, d_t)
    untrimmed = similarity_icp(moved, target, source_labels=sl, target_labels=tl, trim_fraction=1.0)
    a_u, d_u = errors(untrimmed.matrix, truth, src[intact])
    assert d_u > 2.0 * d_t and d_u > 0.5, (d_u, d_t)


def test_labels_keep_bones_apart():
    """Per-label trees: each source bone lands on its own target bone."""
    rng = np.random.default_rng(8)
    src, sl = bones(rng, 2000)
    canon, tl = bones(rng, 3000)
    truth = random_similarity(rng)
    target = apply(truth, canon)
    res = similarity_icp(src, target, source_labels=sl, target_labels=tl)
    moved = apply(res.matrix, src)
    tree = cKDTree(target)
    _, j = tree.query(moved)
    assert np.mean(tl[j] == sl) > 0.99


def test_icp_is_deterministic():
    rng = np.random.default_rng(9)
    src, sl = bones(rng, 2000)
    canon, tl = bones(rng, 3000)
    target = apply(random_similarity(rng), canon)
    a = similarity_icp(src, target, source_labels=sl, target_labels=tl)
    b = similarity_icp(src, target, source_labels=sl, target_labels=tl)
    np.testing.assert_array_equal(a.matrix, b.matrix)
    assert (a.rms_mm, a.iterations, a.start) == (b.rms_mm, b.iterations, b.start)


def test_icp_rigid_keeps_unit_scale():
    rng = np.random.default_rng(10)
    src, sl = bones(rng, 2000)
    canon, tl = bones(rng, 3000)
    truth = random_similarity(rng)
    truth[:3, :3] /= matrix_scale(truth)
    res = similarity_icp(src, apply(truth, canon), source_labels=sl, target_labels=tl,
                         with_scale=False)
    assert res.scale == pytest.approx(1.0, abs=1e-9)
    angle, disp = errors(res.matrix, truth, src)
    assert angle < 0.5 and disp < 0.3


def test_icp_with_explicit_init():
    rng = np.random.default_rng(12)
    src, sl = bones(rng, 2000)
    canon, tl = bones(rng, 3000)
    truth = random_similarity(rng)
    res = similarity_icp(src, apply(truth, canon), source_labels=sl, target_labels=tl, init=truth)
    assert res.start == 0
    angle, disp = errors(res.matrix, truth, src)
    assert angle < 0.5 and disp < 0.3


def test_initial_guesses_shapes_and_proper_rotations():
    rng = np.random.default_rng(13)
    src, sl = bones(rng, 500)
    tgt, tl = bones(rng, 600)
    tgt = apply(random_similarity(rng), tgt)
    starts = initial_guesses(src, tgt, sl, tl)
    assert len(starts) >= 7
    for m in starts:
        assert m.shape == (4, 4)
        assert np.linalg.det(m[:3, :3]) > 0
        np.testing.assert_allclose(m[3], [0, 0, 0, 1])
    # The first start is the identity rotation with the RMS-radius scale.
    s = matrix_scale(starts[0])
    np.testing.assert_allclose(starts[0][:3, :3] / s, np.eye(3), atol=1e-12)


@pytest.mark.parametrize("factor, bounds", [(0.5, (0.6, 1.6)), (0.3, (0.6, 1.6)), (1.5, (0.8, 1.25))])
def test_scale_hitting_bounds_is_refused(factor, bounds):
    rng = np.random.default_rng(14)
    src, sl = bones(rng, 1000)
    tgt, tl = bones(rng, 1000)
    with pytest.raises(GeometryError, match="scale ran into its bounds"):
        similarity_icp(src, factor * tgt, source_labels=sl, target_labels=tl, scale_bounds=bounds)
    # The same pair inside the bounds registers fine.
    res = similarity_icp(src, 1.1 * tgt, source_labels=sl, target_labels=tl, scale_bounds=bounds)
    assert res.scale == pytest.approx(1.1, rel=0.01)


@pytest.mark.parametrize("kwargs, match", [
    (dict(source=np.zeros((0, 3))), "source is empty"),
    (dict(target=np.zeros((0, 3))), "target is empty"),
    (dict(source=np.full((10, 3), np.nan)), "NaN"),
    (dict(source=np.zeros((10, 2))), r"\(N, 3\)"),
    (dict(source_labels=np.ones(5, int)), "source_labels has 5 entries"),
    (dict(target_labels=np.ones(7, int)), "target_labels has 7 entries"),
    (dict(source_labels=np.r_[np.ones(10, int), np.full(10, 2)], target_labels=np.ones(20, int)),
     r"label\(s\) \[2\] present in the source"),
    (dict(target_labels=None), "both source and target"),
    (dict(trim_fraction=0.0), "trim_fraction"),
    (dict(scale_bounds=(1.2, 2.0)), "scale_bounds"),
    (dict(max_iterations=0), "max_iterations"),
    (dict(init=np.eye(3)), "4x4"),
    (dict(label_trim={1: 0.0}), "label_trim"),
    (dict(label_trim={1: 0.9}, source_labels=None, target_labels=None), "label_trim"),
    (dict(long_axis=np.zeros(3)), "long_axis"),
    (dict(long_axis=[0.0, 1.0]), "long_axis"),
    (dict(source_axis=[0.0, 0.0, 1.0]), "source_axis needs long_axis"),
])
def test_bad_inputs_raise_geometry_error(kwargs, match):
    rng = np.random.default_rng(15)
    pts = rng.normal(size=(20, 3)) * 10
    args = dict(source=pts, target=pts + 1.0, source_labels=np.ones(20, int),
                target_labels=np.ones(20, int))
    args.update(kwargs)
    with pytest.raises(GeometryError, match=match):
        similarity_icp(args.pop("source"), args.pop("target"), **args)
    assert issubclass(GeometryError, AnkleFractureError)


def test_inlier_fraction_is_measured_after_the_fit():
    """Not the trimmed share: the (weighted) share of points on the target surface."""
    rng = np.random.default_rng(17)
    src, sl = bones(rng, 3000)
    canon, tl = bones(rng, 4000)
    truth = random_similarity(rng)
    target = apply(truth, canon)
    kw = dict(source_labels=sl, target_labels=tl)
    res = similarity_icp(src, target, **kw)
    assert res.inlier_fraction > 0.99
    assert inlier_fraction(res.matrix, src, target, **kw) == pytest.approx(res.inlier_fraction)
    # The same fit 5 or 10 mm off: most points leave the 2.5 mm band.
    for shift, at_most in ((5.0, 0.6), (10.0, 0.3)):
        off = res.matrix.copy()
        off[:3, 3] += [shift, 0.0, 0.0]
        assert inlier_fraction(off, src, target, **kw) < at_most
    # A fibula displaced by 8 mm at the right pose: most of its points are off, but weighted
    # like a tibia-anchored fit (fibula 0.1) the fraction stays high.
    moved = src.copy()
    moved[sl == 2] += [-8.0, 0.0, 0.0]
    plain = inlier_fraction(res.matrix, moved, target, **kw)
    weighted = inlier_fraction(res.matrix, moved, target, label_weights={1: 1.0, 2: 0.1}, **kw)
    assert plain < 0.7 < 0.9 < weighted
    assert inlier_fraction(res.matrix, moved, target, inlier_distance_mm=20.0, **kw) == 1.0


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_long_axis_copes_with_fields_of_view_of_different_lengths(seed):
    """A source that ends lower on the bones than the target (a short scan), or reaches past
    the target's end: centroid starts and whole-cloud matching slide and shrink the fit along
    the long axis; anchored starts and the overlap restriction keep it in place."""
    rng = np.random.default_rng(seed)
    canon, tl = bones(rng, 5000)  # the target, in its own frame: long axis +z
    full, sl = bones(rng, 4000)
    truth = random_similarity(rng)  # source -> target
    inv = np.linalg.inv(truth)
    axis = np.array([0.0, 0.0, 1.0])
    short = full[:, 2] < 15.0
    cut = canon[:, 2] < 15.0
    judged = full[:, 2] < 10.0  # where both clouds have surface in the second case
    cases = [(apply(inv, full[short]), sl[short], canon, tl, short[short]),
             (apply(inv, full), sl, canon[cut], tl[cut], judged)]
    for src, src_labels, tgt, tgt_labels, where in cases:
        kw = dict(source_labels=src_labels, target_labels=tgt_labels)
        anchored = similarity_icp(src, tgt, long_axis=axis, **kw)
        angle, disp = errors(anchored.matrix, truth, src[where])
        # (Ellipsoids are a weak test of the axial position: a cup scaled by 1 % and shifted
        # fits almost as well, hence 1.5 mm.)
        assert angle < 0.5 and disp < 1.5, (angle, disp)
        assert anchored.inlier_fraction > 0.99
        plain = similarity_icp(src, tgt, **kw)
        assert errors(plain.matrix, truth, src[where])[1] > 5.0


def test_source_axis_drops_upside_down_starts():
    rng = np.random.default_rng(23)
    src, sl = bones(rng, 800)
    tgt, tl = bones(rng, 900)
    up = np.array([0.0, 0.0, 1.0])
    all_starts = initial_guesses(src, tgt, sl, tl, long_axis=up)
    upright = initial_guesses(src, tgt, sl, tl, long_axis=up, source_axis=up)
    assert 1 <= len(upright) < len(all_starts)

    def angle(m: np.ndarray) -> float:
        r = m[:3, :3] / matrix_scale(m)
        return float(np.degrees(np.arccos(np.clip((r @ up) @ up, -1.0, 1.0))))

    assert max(angle(m) for m in all_starts) > MAX_AXIS_ANGLE_DEG
    assert max(angle(m) for m in upright) < MAX_AXIS_ANGLE_DEG


def test_icp_full_size_clouds_8000_vs_10000_points():
    # The benchmark size (bench/register.py times it); here only the result is checked.
    rng = np.random.default_rng(16)
    src, sl = bones(rng, 4000)
    canon, tl = bones(rng, 5000)
    truth = random_similarity(rng)
    target = apply(truth, canon)
    res = similarity_icp(src, target, source_labels=sl, target_labels=tl)
    assert res.rms_mm < 1.0 and 1 <= res.iterations <= 50


# ---------------------------------------------------------------------------------------- surface
def _cylinders(shape=(40, 50, 60), spacing=(0.8, 0.7, 1.3), direction=None) -> Volume:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    arr = np.zeros(shape, np.uint8)
    arr[((x - 20) ** 2 + (y - 25) ** 2 < 10 ** 2) & (z >= 3)] = 1
    arr[((x - 45) ** 2 + (y - 27) ** 2 < 4 ** 2) & (z < 35)] = 2
    return Volume(arr, spacing=spacing, origin=(-10.0, 5.0, 20.0),
                  direction=np.eye(3) if direction is None else direction)


def test_surface_points_lie_on_the_boundary():
    from conftest import rotation

    vol = _cylinders(direction=rotation("z", 30) @ np.diag([1.0, -1.0, -1.0]))
    pts = surface_points(vol, 1, max_points=500, seed=1)
    assert pts.shape == (500, 3)
    # Every point is the centre of a mask voxel that touches the background.
    ijk = np.rint(vol.physical_to_index(pts)).astype(int)
    np.testing.assert_allclose(vol.index_to_physical(ijk), pts, atol=1e-6)
    assert np.all(vol.array[ijk[:, 2], ijk[:, 1], ijk[:, 0]] == 1)
    mask = vol.array == 1
    padded = np.pad(mask, 1)
    k, j, i = ijk[:, 2] + 1, ijk[:, 1] + 1, ijk[:, 0] + 1
    inner = (padded[k - 1, j, i] & padded[k + 1, j, i] & padded[k, j - 1, i] & padded[k, j + 1, i]
             & padded[k, j, i - 1] & padded[k, j, i + 1])
    assert not inner.any()
    # ...and the cloud hugs the mask: within one voxel diagonal of its voxel centres.
    centres = vol.index_to_physical(np.argwhere(mask)[:, ::-1])
    d, _ = cKDTree(centres).query(pts)
    assert d.max() <= np.linalg.norm(vol.spacing) + 1e-9


def test_surface_points_count_determinism_and_empty():
    vol = _cylinders()
    all_pts = surface_points(vol, 2, max_points=10 ** 7)
    few = surface_points(vol, 2, max_points=100, seed=3)
    assert few.shape == (100, 3) and len(all_pts) > 100
    np.testing.assert_array_equal(few, surface_points(vol, 2, max_points=100, seed=3))
    assert not np.array_equal(few, surface_points(vol, 2, max_points=100, seed=4))
    assert surface_points(vol, 7).shape == (0, 3)
    # Every sampled point is one of the boundary points.
    assert len(np.unique(np.vstack([all_pts, few]), axis=0)) == len(all_pts)


def test_surface_points_can_leave_out_the_cut_faces():
    # The tibia cylinder runs into the top of the image (k = 39): its cut face there is where the
    # field of view ended, not a bone surface; its lower end (k = 3) is a real one.
    vol = _cylinders()
    every = surface_points(vol, 1, max_points=10 ** 7)
    cut = surface_points(vol, 1, max_points=10 ** 7, exclude_edges=True)
    k_every = np.rint(vol.physical_to_index(every)[:, 2]).astype(int)
    k_cut = np.rint(vol.physical_to_index(cut)[:, 2]).astype(int)
    assert np.count_nonzero(k_every == 39) > 200 and not np.any(k_cut == 39)
    assert np.count_nonzero(k_cut == 3) == np.count_nonzero(k_every == 3) > 200
    assert len(np.unique(np.vstack([every, cut]), axis=0)) == len(every)  # a subset
    pts, labels = labelled_surface_points(vol, max_points_per_bone=300, exclude_edges=True)
    assert pts.shape == (600, 3) and set(labels.tolist()) == {1, 2}


def test_labelled_surface_points():
    vol = _cylinders()
    pts, labels = labelled_surface_points(vol, max_points_per_bone=300)
    assert pts.shape == (600, 3) and labels.shape == (600,)
    assert set(labels.tolist()) == {1, 2}
    assert np.all(labels[:300] == 1)
    only_tibia = vol.with_array(np.where(vol.array == 2, 0, vol.array))
    pts, labels = labelled_surface_points(only_tibia, max_points_per_bone=300)
    assert pts.shape == (300, 3) and np.all(labels == 1)


def test_surface_points_fast_on_clinical_size_mask():
    z, y, x = np.ogrid[:350, :512, :512]
    arr = np.zeros((350, 512, 512), np.uint8)
    arr[((x - 200) ** 2 + (y - 250) ** 2 < 60 ** 2) & (z > 20)] = 1
    arr[((x - 330) ** 2 + (y - 260) ** 2 < 20 ** 2) & (z > 5)] = 2
    vol = Volume(arr, spacing=(0.4, 0.4, 0.6))
    for value, radius, centre in ((1, 60, (200, 250)), (2, 20, (330, 260))):
        pts = surface_points(vol, value)
        assert pts.shape == (4000, 3)
        # Boundary points of a cylinder: on its wall (within a voxel) or on its end caps.
        r = np.hypot(pts[:, 0] / 0.4 - centre[0], pts[:, 1] / 0.4 - centre[1])
        on_wall = np.abs(r - radius) < 1.5
        k = pts[:, 2] / 0.6
        on_cap = (k < 22) | (k > 348)
        assert np.all(on_wall | on_cap)
