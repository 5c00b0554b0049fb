"""Left/right detection from the tibia/fibula label map (and the CT's leg count)."""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import pytest

from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.phantom.generator import PhantomCase, generate_case
from AnkleFractureLib.registration.side import SideDetection, count_legs, detect_side

#: (seed, weber, side): both sides, all four classes; seeds 4 and 11 have a coronal direction,
#: 5 a flipped one and 7 an oblique one (see phantom.imaging.sample_direction).
CASES = [
    (0, "none", "right"),
    (1, "A", "left"),
    (4, "B", "right"),
    (5, "C", "left"),
    (7, "B", "left"),
    (11, "A", "right"),
    (2, "C", "right"),
]


@pytest.fixture(scope="module")
def phantoms() -> Dict[Tuple[int, str, str], PhantomCase]:
    return {key: generate_case(key[0], key[1], key[2], "fast") for key in CASES}


def _flip_x_storage(vol: Volume) -> Volume:
    """The same physical image stored with the i (x index) axis reversed."""
    nx = vol.array.shape[2]
    origin = np.asarray(vol.origin) + vol.direction[:, 0] * vol.spacing[0] * (nx - 1)
    direction = vol.direction.copy()
    direction[:, 0] *= -1.0
    return Volume(vol.array[:, :, ::-1].copy(), vol.spacing, origin, direction)


def _mirror(vol: Volume) -> Volume:
    """The mirror image: array flipped along i, geometry kept."""
    return vol.with_array(vol.array[:, :, ::-1].copy())


def test_side_of_phantoms(phantoms):
    for key, case in phantoms.items():
        res = detect_side(case.label, case.ct)
        assert isinstance(res, SideDetection)
        assert res.side == key[2], (key, res)
        assert res.confidence > 0.8, (key, res)
        assert res.legs == 1
        assert f"patient's {key[2]}" in res.reason
        # Without the CT the answer is the same.
        assert detect_side(case.label).side == key[2]
    assert any(not np.allclose(c.label.direction, np.eye(3)) for c in phantoms.values())


def test_same_physical_image_stored_flipped_keeps_side(phantoms):
    for key in [(4, "B", "right"), (5, "C", "left"), (0, "none", "right")]:
        case = phantoms[key]
        flipped = _flip_x_storage(case.label)
        # Sanity: the flip preserves physical positions of voxels.
        np.testing.assert_allclose(flipped.index_to_physical([[0, 3, 2]]),
                                   case.label.index_to_physical([[case.label.size[0] - 1, 3, 2]]))
        res = detect_side(flipped, _flip_x_storage(case.ct))
        assert res.side == key[2] and res.confidence > 0.8, (key, res)


def test_mirrored_image_swaps_side(phantoms):
    for key in [(1, "A", "left"), (2, "C", "right"), (11, "A", "right")]:
        case = phantoms[key]
        res = detect_side(_mirror(case.label), _mirror(case.ct))
        other = "left" if key[2] == "right" else "right"
        # Flipping i mirrors through the plane perpendicular to the i axis, which for these
        # cases (identity and coronal directions) is the patient's left-right axis.
        assert abs(case.label.direction[0, 0]) > 0.99
        assert res.side == other and res.confidence > 0.8, (key, res)


def test_missing_bones(phantoms):
    case = phantoms[(0, "none", "right")]
    no_fib = case.label.with_array(np.where(case.label.array == 2, 0, case.label.array))
    res = detect_side(no_fib)
    assert res.side is None and res.confidence == 0.0 and "no fibula" in res.reason
    assert res.legs == 1
    no_tib = case.label.with_array(np.where(case.label.array == 1, 0, case.label.array))
    res = detect_side(no_tib, case.ct)
    assert res.side is None and "no tibia" in res.reason
    empty = case.label.with_array(np.zeros_like(case.label.array))
    res = detect_side(empty)
    assert res.side is None and res.legs == 0


def test_too_small_separation():
    """A fibula straight behind the tibia: no left-right offset to go by."""
    y, x = np.ogrid[:80, :80]
    arr = np.zeros((60, 80, 80), np.uint8)
    arr[:, (x - 40) ** 2 + (y - 30) ** 2 < 12 ** 2] = 1
    arr[:, (x - 40) ** 2 + (y - 60) ** 2 < 5 ** 2] = 2
    res = detect_side(Volume(arr, spacing=(1.0, 1.0, 1.0)))
    assert res.side is None and res.confidence == 0.0 and "apart left-right" in res.reason
    # Move the fibula 20 voxels to +x (patient's left): a left ankle.
    arr2 = np.zeros_like(arr)
    arr2[:, (x - 40) ** 2 + (y - 30) ** 2 < 12 ** 2] = 1
    arr2[:, (x - 60) ** 2 + (y - 45) ** 2 < 5 ** 2] = 2
    res = detect_side(Volume(arr2, spacing=(1.0, 1.0, 1.0)))
    assert res.side == "left" and res.confidence > 0.9


def _two_legs(case: PhantomCase, gap_mm: float = 150.0) -> Tuple[Volume, Volume]:
    """The phantom and its mirror side by side in one wider volume (identity geometry)."""
    ct, lab = case.ct.array, case.label.array
    nz, ny, nx = ct.shape
    shift = nx + int(round(max(0.0, gap_mm - nx * case.ct.spacing[0]) / case.ct.spacing[0]))
    big_ct = np.full((nz, ny, shift + nx), -1024, np.int16)
    big_lab = np.zeros((nz, ny, shift + nx), np.uint8)
    big_ct[:, :, :nx] = ct
    big_lab[:, :, :nx] = lab
    big_ct[:, :, shift:] = ct[:, :, ::-1]
    big_lab[:, :, shift:] = lab[:, :, ::-1]
    return (Volume(big_ct, case.ct.spacing, case.ct.origin),
            Volume(big_lab, case.ct.spacing, case.ct.origin))


def test_two_legs_are_refused(phantoms):
    ct2, lab2 = _two_legs(phantoms[(0, "none", "right")])
    legs, sep = count_legs(ct2)
    assert legs == 2 and sep > 100.0
    res = detect_side(lab2, ct2)
    assert res.side is None and res.legs == 2 and "both legs" in res.reason
    # Without the CT, the two separate tibiae in the mask give the same refusal.
    res = detect_side(lab2)
    assert res.side is None and res.legs == 2 and "two separate tibiae" in res.reason
    # One leg of the pair alone is fine.
    assert count_legs(phantoms[(0, "none", "right")].ct)[0] == 1


def test_real_series_with_both_feet(shared_ct_dir):
    from AnkleFractureLib.io import read_image

    ct = read_image(shared_ct_dir)
    label = ct.with_array((ct.array > 300).astype(np.uint8))  # all bone as "tibia"
    res = detect_side(label, ct)
    assert res.side is None and res.confidence == 0.0
    assert "both legs" in res.reason or "no fibula" in res.reason
    assert res.legs == 2
