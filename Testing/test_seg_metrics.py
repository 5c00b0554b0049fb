"""Segmentation metrics on hand-made masks whose answers are known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from AnkleFractureLib.errors import GeometryError
from AnkleFractureLib.evaluation.seg_metrics import (
    average_surface_distance,
    dice,
    hd95,
    segmentation_metrics,
    surface_distances,
    surface_voxels,
)
from AnkleFractureLib.geometry.volume import Volume


def _cube(shape=(30, 30, 30), lo=(5, 5, 5), size=10) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[lo[0]:lo[0] + size, lo[1]:lo[1] + size, lo[2]:lo[2] + size] = True
    return m


def _ball(shape, centre, radius_vox) -> np.ndarray:
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius_vox ** 2


def test_identical_cubes():
    a = _cube()
    assert dice(a, a.copy()) == 1.0
    assert hd95(a, a.copy(), (0.5, 1.0, 2.0)) == 0.0
    assert average_surface_distance(a, a.copy(), (0.5, 1.0, 2.0)) == 0.0


def test_cubes_offset_along_x_respect_spacing():
    # 10^3 cubes shifted by 3 voxels along x (array axis 2): overlap 10*10*7.
    a = _cube()
    b = _cube(lo=(5, 5, 8))
    assert dice(a, b) == pytest.approx(2 * 700 / 2000)
    # Largest distance: the x face of a to the x face of b, 3 voxels of 0.5 mm, and this face
    # holds 100 of the 488 surface voxels (> 5 %), so it is the 95th percentile too.
    assert hd95(a, b, (0.5, 1.0, 2.0)) == pytest.approx(1.5)


def test_cubes_offset_along_z_use_the_z_spacing():
    a = _cube()
    b = _cube(lo=(8, 5, 5))
    assert hd95(a, b, (0.5, 1.0, 2.0)) == pytest.approx(6.0)
    # The same shift with isotropic spacing is 3 mm: the spacing order is (x, y, z).
    assert hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(3.0)


def test_ball_radius_r_vs_r_plus_two():
    shape = (40, 40, 40)
    a = _ball(shape, (20, 20, 20), 10)
    b = _ball(shape, (20, 20, 20), 12)
    s = 0.8
    value = hd95(a, b, (s, s, s))
    assert value == pytest.approx(2 * s, abs=0.5 * s)
    assert 0 < average_surface_distance(a, b, (s, s, s)) <= value
    assert dice(a, b) == pytest.approx(2 * a.sum() / (a.sum() + b.sum()))


@pytest.mark.parametrize("path", ["bounded k-d tree", "unbounded k-d tree", "distance transform"])
def test_surface_distances_match_a_distance_transform(path, monkeypatch):
    # Every search path gives exactly the values of the EDT of the other surface (methods
    # reference definition), whichever the implementation picks.
    import AnkleFractureLib.evaluation.seg_metrics as sm

    if path == "unbounded k-d tree":
        monkeypatch.setattr(sm, "_NEAR_VOXELS", 0)
        monkeypatch.setattr(sm, "_MAX_FAR_QUERIES", 10 ** 9)
    elif path == "distance transform":
        monkeypatch.setattr(sm, "_NEAR_VOXELS", 0)
        monkeypatch.setattr(sm, "_MAX_FAR_QUERIES", 0)
    rng = np.random.default_rng(4)
    a = ndi.binary_opening(rng.random((24, 26, 28)) > 0.45, iterations=1)
    b = ndi.binary_opening(rng.random((24, 26, 28)) > 0.45, iterations=1)
    spacing = (0.7, 1.1, 2.3)
    d_ab, d_ba = surface_distances(a, b, spacing)
    pa, pb = np.pad(a, 1), np.pad(b, 1)
    sa, sb = surface_voxels(pa), surface_voxels(pb)
    edt_b = ndi.distance_transform_edt(~sb, sampling=spacing[::-1])
    edt_a = ndi.distance_transform_edt(~sa, sampling=spacing[::-1])
    np.testing.assert_allclose(np.sort(d_ab), np.sort(edt_b[sa]), atol=1e-9)
    np.testing.assert_allclose(np.sort(d_ba), np.sort(edt_a[sb]), atol=1e-9)


def test_mask_on_the_array_border_has_a_surface_there():
    a = np.ones((6, 6, 6), bool)
    b = np.zeros_like(a)
    b[:, :, :5] = True
    assert hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(1.0)


def test_empty_masks():
    e = np.zeros((8, 8, 8), bool)
    a = _cube((8, 8, 8), (2, 2, 2), 3)
    assert dice(e, e) == 1.0
    assert hd95(e, e, (1, 1, 1)) == 0.0
    assert average_surface_distance(e, e, (1, 1, 1)) == 0.0
    assert dice(a, e) == 0.0 and dice(e, a) == 0.0
    assert math.isinf(hd95(a, e, (1, 1, 1))) and math.isinf(hd95(e, a, (1, 1, 1)))
    assert math.isinf(average_surface_distance(e, a, (1, 1, 1)))


def test_segmentation_metrics_volumes_and_json_null_for_missing_bone():
    spacing = (0.5, 0.8, 2.0)
    truth = np.zeros((12, 20, 20), np.uint8)
    truth[2:10, 2:12, 2:12] = 1
    truth[2:10, 14:18, 14:18] = 2
    pred = truth.copy()
    pred[pred == 2] = 0  # the model missed the fibula
    res = segmentation_metrics(Volume(pred, spacing), Volume(truth, spacing))
    assert res["tibia"]["dice"] == 1.0 and res["tibia"]["hd95_mm"] == 0.0
    assert res["tibia"]["volume_ml_true"] == pytest.approx(8 * 10 * 10 * 0.8 / 1000, abs=1e-4)
    assert res["fibula"]["dice"] == 0.0
    assert res["fibula"]["hd95_mm"] is None and res["fibula"]["assd_mm"] is None
    assert res["fibula"]["volume_ml_pred"] == 0.0
    json.dumps(res, allow_nan=False)  # valid JSON: no NaN / Infinity


def test_segmentation_metrics_all_background():
    z = Volume(np.zeros((5, 5, 5), np.uint8))
    res = segmentation_metrics(z, z.copy())
    assert res["tibia"] == {"dice": 1.0, "hd95_mm": 0.0, "assd_mm": 0.0,
                            "volume_ml_pred": 0.0, "volume_ml_true": 0.0}


@pytest.mark.parametrize("change", ["shape", "spacing", "origin", "direction"])
def test_geometry_mismatch_raises(change):
    arr = np.zeros((6, 7, 8), np.uint8)
    arr[2:4, 2:4, 2:4] = 1
    truth = Volume(arr, (1.0, 1.0, 1.0))
    if change == "shape":
        pred = Volume(np.zeros((6, 7, 9), np.uint8))
    elif change == "spacing":
        pred = Volume(arr, (1.0, 1.0, 1.5))
    elif change == "origin":
        pred = Volume(arr, (1.0, 1.0, 1.0), origin=(0.0, 0.0, 3.0))
    else:
        pred = Volume(arr, (1.0, 1.0, 1.0), direction=np.diag([-1.0, -1.0, 1.0]))
    with pytest.raises(GeometryError):
        segmentation_metrics(pred, truth)


def test_mask_shape_mismatch_raises():
    with pytest.raises(GeometryError):
        dice(np.zeros((3, 3, 3), bool), np.zeros((3, 3, 4), bool))
