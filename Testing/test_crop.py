"""Syndesmosis crop: content, left/right equivalence, inverse mapping, I/O and errors."""

from __future__ import annotations

import numpy as np
import pytest

from AnkleFractureLib.crop import (CHANNELS, crop_raw_ct, crop_syndesmosis, crop_to_ct,
                                   read_crop, write_crop)
from AnkleFractureLib.errors import AnkleFractureError, GeometryError
from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.preprocessing.resample import resample_to_grid
from AnkleFractureLib.registration.template import TEMPLATE_SEED, build_template_from_phantom


@pytest.fixture(scope="module")
def template():
    return build_template_from_phantom(TEMPLATE_SEED)


@pytest.fixture(scope="module")
def cases():
    from AnkleFractureLib.phantom.generator import generate_case

    return {side: generate_case(TEMPLATE_SEED, "none", side, "fast") for side in ("right", "left")}


def _p2t(case) -> np.ndarray:
    return np.linalg.inv(np.asarray(case.info["anatomy_to_patient"], dtype=float))


@pytest.fixture(scope="module")
def crops(template, cases):
    return {side: crop_syndesmosis(c.ct, c.label, _p2t(c), template) for side, c in cases.items()}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


def test_crop_channels_match_template(template, crops):
    crop = crops["right"]
    assert CHANNELS == ("ct", "tibia", "fibula")
    assert crop.channels.dtype == np.float32
    assert crop.channels.shape == (3,) + template.box.shape == (3, 96, 48, 64)
    assert crop.grid.shape == template.box.shape
    assert 0.0 <= crop.channels.min() and crop.channels.max() <= 1.0
    assert crop.coverage == pytest.approx(1.0)
    size, spacing, origin, direction = template.box.grid()
    assert crop.grid.size == size and np.allclose(crop.grid.origin, origin)
    # The template's own phantom, cropped with its true transform, reproduces the template.
    for value in (1, 2):
        mask = template.labels.with_array((template.labels.array == value).astype(np.uint8))
        ref = resample_to_grid(mask, size, spacing, origin, direction, "linear").array >= 0.5
        assert _dice(crop.channels[value] >= 0.5, ref) > 0.95
    # Bone is bright in the CT channel where the masks are.
    assert crop.channels[0][crop.channels[2] > 0.9].mean() > 0.6


def test_bone_window_keeps_the_cortex_the_reference_window_saturates(crops):
    """ct_bone is the same CT samples in the bone window: equal to ct's mapping below 1000 HU,
    and still graded where ct reads 1 (dense cortex)."""
    from AnkleFractureLib.crop import ALL_CHANNELS
    from AnkleFractureLib.errors import InputError

    crop = crops["right"]
    ct, bone = crop.channels[0], crop.ct_bone
    assert bone.shape == ct.shape and bone.dtype == np.float32
    mid = (ct > 0.01) & (ct < 0.99)
    hu = ct[mid] * 2000.0 - 1000.0  # reference window [-1000, 1000]
    assert np.allclose(bone[mid], np.clip((hu + 500.0) / 3000.0, 0, 1), atol=1e-4)
    cortex = bone[ct >= 1.0]
    assert cortex.size > 100 and cortex.min() >= 0.5 - 1e-4 and np.ptp(cortex) > 0.1
    stacked = crop.stacked(ALL_CHANNELS[:4])
    assert ALL_CHANNELS[:5] == ("ct", "tibia", "fibula", "ct_bone", "ct_bone_min")
    assert ALL_CHANNELS[5:] == tuple(f"ct_bone_sub{i}" for i in range(8))
    assert stacked.shape == (4,) + ct.shape and np.array_equal(stacked[3], bone)
    assert np.array_equal(crop.stacked(("fibula", "ct")), crop.channels[[2, 0]])
    with pytest.raises(InputError, match="unknown crop channel 'femur'"):
        crop.stacked(("femur",))
    import dataclasses

    with pytest.raises(InputError, match="no bone-window CT"):
        dataclasses.replace(crop, ct_bone=None).stacked(("ct_bone",))
    with pytest.raises(InputError, match="no min-pooled bone-window CT"):
        crop.stacked()  # ct_bone_min is computed on request only
    with pytest.raises(InputError, match="no sub-voxel bone-window CT"):
        crop.stacked(("ct_bone_sub3",))  # so are the sub-voxel samples


def test_min_pooling_keeps_a_hairline_gap_that_falls_between_the_crop_samples(template) -> None:
    """A 0.5 mm gap across a bone block, placed half-way between two crop sample planes
    (1.5 mm apart): the centre samples read intact bone; the min-pooled voxel holds the gap,
    and elsewhere min pooling reads the bone as it is."""
    import dataclasses

    from AnkleFractureLib.crop import ALL_CHANNELS, min_pooled_bone
    from AnkleFractureLib.registration.template import SyndesmosisBox

    box = SyndesmosisBox(np.zeros(3), np.eye(3), np.array([6.0, 6.0, 15.0]),
                         np.array([1.5, 1.5, 1.5]))  # 4 x 4 x 10 voxels, centres +-0.75 mm ...
    small = dataclasses.replace(template, box=box)
    arr = np.full((60, 24, 24), 1500.0, np.float32)  # 0.5 mm CT, points at -0.25, 0.25 ...
    arr[31] = -100.0  # the gap: z = 0.25 mm, between the sample planes at -0.75 and 0.75 mm
    ct = Volume(arr, (0.5, 0.5, 0.5), (-6.25, -6.25, -15.25), np.eye(3))
    crop = crop_syndesmosis(ct, None, np.eye(4), small)
    hu = crop.ct_bone * 3000.0 - 500.0
    assert hu.min() > 1400.0  # the centre samples miss the gap entirely
    low = min_pooled_bone(ct, crop) * 3000.0 - 500.0
    assert low.shape == hu.shape and low.dtype == np.float32
    per_slice = low.min(axis=(1, 2))
    assert per_slice[5] < 0.0 and np.all(np.delete(per_slice, 5) > 1400.0)
    crop.ct_bone_min = min_pooled_bone(ct, crop)
    assert crop.stacked(ALL_CHANNELS[:5]).shape == (5,) + hu.shape


def test_sub_voxel_samples_hold_a_hairline_gap_in_the_octants_that_cover_it(template) -> None:
    """The gap of the test above (0.5 mm, half-way between two crop sample planes): the 8
    octant samples of the voxel whose lower half holds it read it in the 4 lower octants only;
    everywhere else they read the bone as it is (no edge darkened, unlike min pooling), and
    the crop stacks them after the other arrays."""
    import dataclasses

    from AnkleFractureLib.crop import SUB_CHANNELS, min_pooled_bone, sub_sampled_bone
    from AnkleFractureLib.registration.template import SyndesmosisBox

    box = SyndesmosisBox(np.zeros(3), np.eye(3), np.array([6.0, 6.0, 15.0]),
                         np.array([1.5, 1.5, 1.5]))
    small = dataclasses.replace(template, box=box)
    arr = np.full((60, 24, 24), 1500.0, np.float32)
    arr[31] = -100.0  # z = 0.25 mm; crop planes at -0.75 and 0.75, octants at +-0.375 from them
    ct = Volume(arr, (0.5, 0.5, 0.5), (-6.25, -6.25, -15.25), np.eye(3))
    crop = crop_syndesmosis(ct, None, np.eye(4), small)
    sub = sub_sampled_bone(ct, crop) * 3000.0 - 500.0
    assert sub.shape == (8,) + crop.grid.shape and sub.dtype == np.float32
    assert np.all(sub[:4, 5] < 500.0) and np.all(sub[4:, 5] > 1400.0)  # lower octants (bz = 0)
    others = np.delete(sub, 5, axis=1)
    assert np.all(others > 1400.0)
    hu = crop.ct_bone * 3000.0 - 500.0
    assert hu.min() > 1400.0  # the centre sample misses the gap

    edge = np.full((30, 12, 12), -100.0, np.float32)
    edge[:, :, 6:] = 1500.0  # 1 mm CT, a bone face at x = 0 (a crop voxel boundary)
    ct_edge = Volume(edge, (1.0, 1.0, 1.0), (-5.5, -5.5, -14.5), np.eye(3))
    crop_edge = crop_syndesmosis(ct_edge, None, np.eye(4), small)
    sub_e = sub_sampled_bone(ct_edge, crop_edge) * 3000.0 - 500.0
    low_e = min_pooled_bone(ct_edge, crop_edge) * 3000.0 - 500.0
    inside = sub_e[:, :, :, 2]  # the voxel just inside the face: bone, read as bone
    assert np.all(inside > 1200.0) and low_e[:, :, 2].max() + 100.0 < inside.mean(axis=0).min()
    crop.ct_bone_sub = sub_sampled_bone(ct, crop)
    crop.ct_bone_min = min_pooled_bone(ct, crop)
    stacked = crop.stacked()
    assert stacked.shape == (13,) + hu.shape
    assert np.array_equal(crop.stacked(SUB_CHANNELS[2:3])[0], crop.ct_bone_sub[2])


def test_left_and_right_crops_agree(crops):
    left, right = crops["left"], crops["right"]
    assert np.linalg.det(left.patient_to_template[:3, :3]) < 0
    for c in range(3):
        r = np.corrcoef(left.channels[c].ravel(), right.channels[c].ravel())[0, 1]
        assert r >= 0.95, (CHANNELS[c], r)


@pytest.mark.parametrize("side", ["right", "left"])
def test_crop_to_ct_maps_points_back(crops, cases, side):
    crop, case = crops[side], cases[side]
    target = np.array([-30.0, 6.0, 20.0])  # template mm: the fibula at the syndesmosis
    ijk = np.rint(crop.grid.physical_to_index(target[None, :])[0]).astype(int)
    exact = crop.grid.index_to_physical(ijk[None, :].astype(float))[0]
    heat = np.zeros(crop.grid.shape, np.float32)
    heat[ijk[2] - 1:ijk[2] + 2, ijk[1] - 1:ijk[1] + 2, ijk[0] - 1:ijk[0] + 2] = 0.5
    heat[ijk[2], ijk[1], ijk[0]] = 1.0
    on_ct = crop_to_ct(heat, crop, case.ct)
    assert on_ct.same_geometry(case.ct) and on_ct.array.dtype == np.float32
    peak = np.unravel_index(int(np.argmax(on_ct.array)), on_ct.shape)
    p = case.ct.index_to_physical(np.array(peak[::-1], dtype=float)[None, :])[0]
    back = (crop.patient_to_template @ np.append(p, 1.0))[:3]
    assert np.linalg.norm(back - exact) <= 1.5
    assert on_ct.array.min() == 0.0  # default outside the box
    with pytest.raises(GeometryError, match="does not match the crop grid"):
        crop_to_ct(heat[:-1], crop, case.ct)


def test_crop_to_ct_clip_matches_clipping_the_output(crops, cases):
    crop, case = crops["right"], cases["right"]
    rng = np.random.default_rng(1)
    heat = rng.uniform(-0.5, 1.5, crop.grid.shape).astype(np.float32)
    plain = crop_to_ct(heat, crop, case.ct)
    clipped = crop_to_ct(heat, crop, case.ct, clip=(0.0, 1.0))
    assert clipped.same_geometry(case.ct) and clipped.array.dtype == np.float32
    np.testing.assert_array_equal(clipped.array, np.clip(plain.array, 0.0, 1.0))
    # A default value outside the clip range is clipped too, as np.clip of the output would.
    outside = crop_to_ct(heat, crop, case.ct, default_value=-2.0, clip=(0.0, 1.0))
    np.testing.assert_array_equal(
        outside.array, np.clip(crop_to_ct(heat, crop, case.ct, default_value=-2.0).array, 0, 1))


def test_write_read_round_trip(crops, tmp_path):
    crop = crops["left"]
    path = tmp_path / "crop.nii.gz"
    write_crop(crop, path)
    first = path.read_bytes()
    write_crop(crop, path)
    assert path.read_bytes() == first  # deterministic
    channels, grid = read_crop(path)
    assert channels.shape == crop.channels.shape
    assert np.allclose(channels, crop.channels)
    assert grid.same_geometry(crop.grid, atol=1e-4)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_box_outside_ct_raises(template, cases):
    case = cases["right"]
    shifted = _p2t(case)
    shifted[:3, 3] += [0.0, 0.0, 2000.0]  # template frame 2 m away from the scan
    with pytest.raises(AnkleFractureError, match="outside the CT's field of view"):
        crop_syndesmosis(case.ct, case.label, shifted, template)


def test_partial_coverage_reported(template, cases):
    case = cases["right"]
    shifted = _p2t(case)
    shifted[:3, 3] += [0.0, 0.0, -100.0]  # half of the box above the scan
    crop = crop_syndesmosis(case.ct, case.label, shifted, template)
    assert 0.05 < crop.coverage < 0.95


def test_label_off_grid_raises(template, cases):
    case = cases["right"]
    moved = Volume(case.label.array, case.label.spacing,
                   np.asarray(case.label.origin) + [5.0, 0.0, 0.0], case.label.direction)
    with pytest.raises(GeometryError, match="not on the CT's grid"):
        crop_syndesmosis(case.ct, moved, _p2t(case), template)


def test_raw_ct_control_crop(cases):
    case = cases["left"]
    crop = crop_raw_ct(case.ct)
    assert crop.channels.shape == (3, 96, 48, 64)
    assert np.all(crop.channels[1:] == 0.0)
    assert np.allclose(crop.patient_to_template, np.eye(4))
    assert crop.channels[0].max() > 0.6  # holds bone
    heat = np.zeros(crop.grid.shape, np.float32)
    heat[48, 24, 32] = 1.0
    on_ct = crop_to_ct(heat, crop, case.ct)
    peak = np.unravel_index(int(np.argmax(on_ct.array)), on_ct.shape)
    p = case.ct.index_to_physical(np.array(peak[::-1], dtype=float)[None, :])[0]
    assert np.linalg.norm(p - crop.grid.index_to_physical([[32, 24, 48]])[0]) <= 1.5
    img = crop_raw_ct(case.ct, centre="image")
    assert img.meta["centre"] == "image"
