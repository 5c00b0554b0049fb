"""The Grad-CAM heatmap is kept compact: the crop's box on the CT's voxel lattice, expanded onto
the whole grid only for display (issue 15 item 6)."""

from __future__ import annotations

import numpy as np
import pytest

from AnkleFractureLib.crop.syndesmosis import (SyndesmosisCrop, box_on_grid, crop_to_ct,
                                               crop_to_ct_box, paste_on_grid)
from AnkleFractureLib.errors import GeometryError
from AnkleFractureLib.geometry.volume import Volume


def _rotation(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0, 0, 1.0]])


@pytest.fixture
def ct_and_crop():
    """A 0.7 x 0.6 x 1.25 mm CT with an oblique direction (120 x 100 x 90 voxels, x, y, z) and
    a 1.5 mm crop grid, 20 degrees rotated, well inside it."""
    ct = Volume(np.zeros((90, 100, 120), np.int16), spacing=(0.7, 0.6, 1.25),
                origin=(-30.0, 12.0, 40.0), direction=_rotation(10.0))
    centre = ct.index_to_physical(np.array([[60.0, 50.0, 45.0]]))[0]
    grid = Volume(np.zeros((16, 12, 20), np.float32), spacing=(1.5, 1.5, 1.5),
                  origin=(-14.0, -8.0, -12.0), direction=np.eye(3))
    p2t = np.eye(4)
    p2t[:3, :3] = _rotation(20.0)
    p2t[:3, 3] = -p2t[:3, :3] @ centre  # the CT point ``centre`` is the crop frame's origin
    rng = np.random.default_rng(0)
    heat = rng.random((16, 12, 20)).astype(np.float32)
    crop = SyndesmosisCrop(np.zeros((3, 16, 12, 20), np.float32), grid, p2t)
    return ct, crop, heat


def test_the_box_lies_on_the_ct_lattice_and_pastes_back_to_crop_to_ct(ct_and_crop):
    ct, crop, heat = ct_and_crop
    box = crop_to_ct_box(heat, crop, ct, clip=(0.0, 1.0))
    sub = box_on_grid(box, ct)
    assert sub is not None and box.array.dtype == np.float32
    assert [[s.start, s.stop] for s in sub] == box.meta["ct_box"]
    # Same spacing and direction; each box voxel sits on the CT voxel it stands for.
    np.testing.assert_allclose(box.spacing, ct.spacing)
    first = np.array([[sub[2].start, sub[1].start, sub[0].start]], float)
    np.testing.assert_allclose(box.origin, ct.index_to_physical(first)[0], atol=1e-9)
    assert box.array.size < 0.5 * ct.array.size  # compact: only the crop's box
    full = crop_to_ct(heat, crop, ct, clip=(0.0, 1.0))
    assert full.same_geometry(ct)
    np.testing.assert_array_equal(paste_on_grid(box, ct).array, full.array)
    np.testing.assert_array_equal(full.array[sub], box.array)
    outside = np.ones(ct.shape, bool)
    outside[sub] = False
    assert not full.array[outside].any()  # nothing of the map lies outside the box
    assert box.array.max() > 0.5


def test_paste_scales_a_quantised_map(ct_and_crop):
    ct, crop, heat = ct_and_crop
    box = crop_to_ct_box(heat, crop, ct, clip=(0.0, 1.0))
    q = box.with_array(np.rint(box.array * 255).astype(np.uint8))
    full = paste_on_grid(q, ct, scale=1 / 255)
    assert full.array.dtype == np.float32
    np.testing.assert_allclose(full.array[box_on_grid(box, ct)], box.array, atol=0.5 / 255)


def test_a_box_off_the_lattice_is_refused(ct_and_crop):
    ct, crop, heat = ct_and_crop
    box = crop_to_ct_box(heat, crop, ct)
    half = ct.index_to_physical(np.array([[0.5, 0.0, 0.0]]))[0] - ct.origin
    shifted = Volume(box.array, box.spacing, np.asarray(box.origin) + half, box.direction)
    assert box_on_grid(shifted, ct) is None
    coarse = Volume(box.array, tuple(2 * s for s in box.spacing), box.origin, box.direction)
    assert box_on_grid(coarse, ct) is None
    too_big = Volume(np.zeros((ct.shape[0] + 1,) + ct.shape[1:], np.float32), ct.spacing,
                     ct.origin, ct.direction)
    assert box_on_grid(too_big, ct) is None
    with pytest.raises(GeometryError, match="voxel grid"):
        paste_on_grid(shifted, ct)


def test_a_crop_outside_the_ct_gives_one_empty_voxel(ct_and_crop):
    ct, crop, heat = ct_and_crop
    far = crop.patient_to_template.copy()
    far[:3, 3] += 1000.0
    away = SyndesmosisCrop(crop.channels, crop.grid, far)
    box = crop_to_ct_box(heat, away, ct)
    assert box.shape == (1, 1, 1) and box.array.max() == 0.0
    assert box_on_grid(box, ct) is not None
    assert not crop_to_ct(heat, away, ct).array.any()
