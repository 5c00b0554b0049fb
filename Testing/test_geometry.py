"""The Volume type and the LPS/RAS frames."""

from __future__ import annotations

import numpy as np
import pytest

from AnkleFractureLib.errors import GeometryError
from AnkleFractureLib.geometry import frames
from AnkleFractureLib.geometry.volume import Volume


def test_index_to_physical_matches_simpleitk(oblique_volume):
    img = oblique_volume.to_sitk()
    rng = np.random.default_rng(1)
    idx = rng.uniform(0, 6, size=(20, 3))
    ours = oblique_volume.index_to_physical(idx)
    theirs = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(map(float, i))) for i in idx])
    np.testing.assert_allclose(ours, theirs, atol=1e-9)
    np.testing.assert_allclose(oblique_volume.physical_to_index(ours), idx, atol=1e-9)


def test_array_order_is_zyx(oblique_volume):
    img = oblique_volume.to_sitk()
    assert img.GetSize() == oblique_volume.size == (11, 9, 7)
    # ITK index (i, j, k) = array[k, j, i]
    assert img.GetPixel(3, 2, 1) == oblique_volume.array[1, 2, 3]


def test_sitk_round_trip_is_exact(oblique_volume):
    back = Volume.from_sitk(oblique_volume.to_sitk())
    assert back.same_geometry(oblique_volume, atol=0)
    assert np.array_equal(back.array, oblique_volume.array)


def test_affine_maps_index_to_lps(oblique_volume):
    ijk = np.array([2.0, 5.0, 1.0, 1.0])
    np.testing.assert_allclose((oblique_volume.affine @ ijk)[:3],
                               oblique_volume.index_to_physical(ijk[:3])[0])


@pytest.mark.parametrize("kwargs, word", [
    ({"array": np.zeros((3, 3))}, "3D"),
    ({"array": np.zeros((2, 2, 2)), "spacing": (1, 0, 1)}, "positive"),
    ({"array": np.zeros((2, 2, 2)), "spacing": (1, 1)}, "3 components"),
    ({"array": np.zeros((2, 2, 2)), "direction": np.ones((3, 3))}, "orthonormal"),
    ({"array": np.zeros((2, 2, 2)), "origin": (0, np.nan, 0)}, "finite"),
])
def test_bad_geometry_is_refused(kwargs, word):
    with pytest.raises(GeometryError, match=word):
        Volume(**kwargs)


def test_with_array_requires_same_shape(oblique_volume):
    with pytest.raises(GeometryError):
        oblique_volume.with_array(np.zeros((2, 2, 2)))
    same = oblique_volume.with_array(np.zeros(oblique_volume.shape, np.uint8))
    assert same.same_geometry(oblique_volume)


def test_lps_ras_conversions_are_consistent():
    rng = np.random.default_rng(2)
    pts = rng.normal(size=(5, 3)) * 50
    m = np.eye(4)
    m[:3, :3] = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    m[:3, 3] = [10.0, -4.0, 7.0]
    moved_lps = pts @ m[:3, :3].T + m[:3, 3]
    m_ras = frames.lps_matrix_to_ras(m)
    moved_ras = frames.lps_points_to_ras(pts) @ m_ras[:3, :3].T + m_ras[:3, 3]
    np.testing.assert_allclose(frames.ras_points_to_lps(moved_ras), moved_lps, atol=1e-9)
    np.testing.assert_allclose(frames.ras_matrix_to_lps(m_ras), m)
    # Right of the patient is -x in LPS and +x in RAS.
    assert frames.lps_points_to_ras(np.array([[-10.0, 0, 0]]))[0, 0] == 10.0
