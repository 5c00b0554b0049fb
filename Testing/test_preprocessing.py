"""HU windowing, resampling and canonical orientation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.preprocessing import (
    clip_hu,
    normalize_hu,
    resample_like,
    resample_to_grid,
    resample_to_spacing,
    to_canonical,
)
from conftest import rotation


def test_normalize_reference_window():
    hu = np.array([-3000, -1000, -500, 0, 500, 1000, 3071], dtype=np.int16)
    np.testing.assert_allclose(normalize_hu(hu), [0, 0, 0.25, 0.5, 0.75, 1, 1])
    assert normalize_hu(hu).dtype == np.float32
    np.testing.assert_array_equal(clip_hu(hu, (-100, 200)), [-100, -100, -100, 0, 200, 200, 200])
    with pytest.raises(ValueError):
        normalize_hu(hu, (100, 100))


def _ball(spacing, direction, radius=8.0, value=1):
    """A label ball of ``radius`` mm centred at LPS (0, 0, 0), on a grid covering +-20 mm."""
    n = [int(round(40 / s)) + 1 for s in spacing]
    vol = Volume(np.zeros(n[::-1], np.uint8), spacing, (0, 0, 0), direction)
    centre_index = vol.physical_to_index(np.zeros((1, 3)))[0]
    # shift origin so that the grid is centred on (0,0,0)
    origin = -vol.direction @ (np.asarray(spacing) * (np.asarray(n) - 1) / 2)
    vol = Volume(vol.array, spacing, origin, direction)
    k, j, i = np.indices(vol.shape)
    pts = vol.index_to_physical(np.stack([i.ravel(), j.ravel(), k.ravel()], 1))
    inside = (np.linalg.norm(pts, axis=1) <= radius).reshape(vol.shape)
    vol.array[inside] = value
    del centre_index
    return vol


def test_label_round_trip_keeps_labels_and_geometry():
    d = rotation("z", 25) @ rotation("y", -10)
    lab = _ball((0.4, 0.55, 1.3), d, value=2)
    iso = resample_to_spacing(lab, (1.0, 1.0, 1.0), "nearest")
    assert iso.array.dtype == np.uint8
    assert set(np.unique(iso.array)) <= {0, 2}
    back = resample_like(iso, lab, "nearest")
    assert back.same_geometry(lab)
    a, b = lab.array > 0, back.array > 0
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice > 0.9


def test_linear_resample_preserves_physical_position_of_values():
    # A linear ramp in physical x is reproduced exactly by linear interpolation.
    d = rotation("x", 20)
    vol = Volume(np.zeros((12, 14, 16), np.float32), (0.8, 0.6, 1.5), (5, -3, 2), d)
    k, j, i = np.indices(vol.shape)
    pts = vol.index_to_physical(np.stack([i.ravel(), j.ravel(), k.ravel()], 1))
    vol.array[:] = pts[:, 0].reshape(vol.shape)
    out = resample_to_spacing(vol, (1.1, 1.1, 1.1), "linear", default_value=np.nan)
    assert out.array.dtype == np.float32
    k, j, i = np.indices(out.shape)
    opts = out.index_to_physical(np.stack([i.ravel(), j.ravel(), k.ravel()], 1))
    vals = out.array.ravel()
    # Compare where the sample lies between input voxel centres (ITK clamps the half-voxel rim).
    cidx = vol.physical_to_index(opts)
    inside = np.all((cidx >= 0) & (cidx <= np.array(vol.size) - 1), axis=1)
    ok = np.isfinite(vals) & inside
    assert ok.mean() > 0.5
    np.testing.assert_allclose(vals[ok], opts[ok, 0], atol=1e-3)


@pytest.mark.parametrize("interpolation", ["linear", "bspline"])
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.uint16, bool])
def test_small_integer_input_resamples_as_its_float32_copy(interpolation, dtype):
    """An int16 CT or a uint8 mask is resampled without a cast first (resample_to_grid): the
    float32 output is bit for bit the one its float32 copy gives."""
    rng = np.random.default_rng(3)
    high = {np.int16: 3000, np.uint8: 255, np.uint16: 4000, bool: 2}[dtype]
    arr = rng.integers(-1000 if dtype is np.int16 else 0, high, (20, 18, 22)).astype(dtype)
    vol = Volume(arr, (0.4, 0.4, 0.6), (3.0, -2.0, 1.0), rotation("z", 15))
    as_float = vol.with_array(arr.astype(np.float32))
    t = np.eye(4)
    t[:3, :3] = rotation("y", 7)
    t[:3, 3] = (0.3, -0.2, 0.5)
    grid = ((15, 16, 12), (0.55, 0.5, 0.7), (3.5, -1.0, 1.5), np.eye(3))
    a = resample_to_grid(vol, *grid, interpolation, -5.0, transform=t)
    b = resample_to_grid(as_float, *grid, interpolation, -5.0, transform=t)
    assert a.array.dtype == np.float32 and np.array_equal(a.array, b.array)
    assert np.ptp(a.array) > 0


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
@pytest.mark.parametrize("signs", [(1, 1, 1), (-1, 1, -1), (1, -1, -1)])
def test_to_canonical_is_exact_and_reversible(perm, signs):
    d = np.zeros((3, 3))
    for a, p in enumerate(perm):
        d[p, a] = signs[a]
    d = rotation("z", 7) @ d  # a small oblique residual stays in the direction
    rng = np.random.default_rng(3)
    vol = Volume(rng.integers(0, 100, size=(3, 4, 5)).astype(np.int16), (0.5, 0.7, 1.9),
                 (4.0, -2.0, 9.0), d)
    can, change = to_canonical(vol)
    assert np.all(np.diag(can.direction) > 0.9)
    # Every voxel keeps its value at the same physical position.
    k, j, i = np.indices(can.shape)
    idx = np.stack([i.ravel(), j.ravel(), k.ravel()], 1)
    pts = can.index_to_physical(idx)
    src = np.rint(vol.physical_to_index(pts)).astype(int)
    np.testing.assert_array_equal(vol.array[src[:, 2], src[:, 1], src[:, 0]], can.array.ravel())
    back = change.undo(can)
    assert back.same_geometry(vol, atol=1e-9)
    assert np.array_equal(back.array, vol.array)
    assert change.is_identity == (perm == (0, 1, 2) and signs == (1, 1, 1))


def test_axis_assignment_equals_scipy_linear_sum_assignment():
    """The 3 x 3 assignment tried exhaustively gives SciPy's answer on random obliques (no
    tie), and an exact 45-degree tie goes to the lexicographically first permutation."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.transform import Rotation

    from AnkleFractureLib.preprocessing.orientation import physical_axis_of_index

    orders = list(itertools.permutations(range(3)))
    for seed in range(300):
        d = Rotation.random(random_state=seed).as_matrix() @ np.eye(3)[list(orders[seed % 6])]
        rows, cols = linear_sum_assignment(-np.abs(d))
        expected = [0, 0, 0]
        for p, a in zip(rows, cols):
            expected[int(a)] = int(p)
        assert physical_axis_of_index(d) == tuple(expected), seed
    c = np.sqrt(0.5)
    assert physical_axis_of_index(np.array([[c, c, 0], [c, -c, 0], [0, 0, 1]])) == (0, 1, 2)
