"""Tests of the synthetic ankle CT phantom (AnkleFractureLib.phantom)."""

from __future__ import annotations

import json
import time
from functools import lru_cache

import numpy as np
import pytest
from scipy import ndimage

from AnkleFractureLib.phantom import WEBER_CLASSES, PhantomCase, generate_case, write_preview
from AnkleFractureLib.phantom.fractures import WEBER_HEIGHT_MM
from AnkleFractureLib.phantom.generator import plan_grid
from AnkleFractureLib.phantom.imaging import CLINICAL_SLICES, SPACING_RANGES


@lru_cache(maxsize=None)
def case(seed: int, weber: str = "none", side: str = "right") -> PhantomCase:
    """Fast-grid cases are cached: several tests look at the same ones."""
    return generate_case(seed, weber, side, "fast")


def anatomical_coords(c: PhantomCase, ijk: np.ndarray) -> np.ndarray:
    """Canonical right-ankle anatomical mm (N, 3) of ITK indices (N, 3) of the case grid."""
    a2p = np.asarray(c.info["anatomy_to_patient"], dtype=float)
    lps = c.ct.index_to_physical(ijk)
    return np.linalg.solve(a2p[:3, :3], (lps - a2p[:3, 3]).T).T


def label_coords(c: PhantomCase, value: int) -> np.ndarray:
    idx = np.argwhere(c.label.array == value)[:, ::-1]  # (z, y, x) -> (i, j, k)
    return anatomical_coords(c, idx)


# ---------------------------------------------------------------------- API and arguments
def test_weber_classes_constant():
    assert WEBER_CLASSES == ("none", "A", "B", "C")


@pytest.mark.parametrize("kwargs", [{"weber": "D"}, {"weber": "b"}, {"side": "both"},
                                    {"spacing": "fine"}, {"seed": -1}, {"seed": 1.5}])
def test_bad_arguments_raise_value_error(kwargs):
    args = {"seed": 0, "weber": "none", "side": "right", "spacing": "fast"}
    args.update(kwargs)
    with pytest.raises(ValueError):
        generate_case(**args)


def test_determinism():
    a = generate_case(5, "B", "left")
    b = generate_case(5, "B", "left")
    c = generate_case(6, "B", "left")
    assert np.array_equal(a.ct.array, b.ct.array)
    assert np.array_equal(a.label.array, b.label.array)
    assert a.ct.same_geometry(b.ct)
    assert a.info == b.info
    assert a.ct.shape != c.ct.shape or not np.array_equal(a.ct.array, c.ct.array)


# ---------------------------------------------------------------------- image content
@pytest.mark.parametrize("seed,weber,side", [(0, "none", "right"), (1, "B", "left")])
def test_types_ranges_and_geometry(seed, weber, side):
    c = case(seed, weber, side)
    assert c.ct.array.dtype == np.int16
    assert c.label.array.dtype == np.uint8
    assert c.ct.same_geometry(c.label)
    assert c.ct.array.min() >= -1024 and c.ct.array.max() <= 3071
    values = set(np.unique(c.label.array).tolist())
    assert values == {0, 1, 2}
    json.dumps(c.info)  # JSON-serialisable
    assert c.info["seed"] == seed and c.info["weber"] == weber and c.info["side"] == side
    assert c.info["spacing_mode"] == "fast"


@pytest.mark.parametrize("seed,weber,side", [(0, "none", "right"), (1, "B", "left"), (2, "C", "right")])
def test_labels_sit_on_bone(seed, weber, side):
    c = case(seed, weber, side)
    for value in (1, 2):
        hu = c.ct.array[c.label.array == value].astype(float)
        assert hu.mean() >= 300.0, (value, hu.mean())
        assert (hu > 150.0).mean() > 0.6, (value, (hu > 150.0).mean())


def test_air_outside_and_soft_tissue_present():
    c = case(0)
    anatomy, _, _ = plan_grid(0, "right", "fast")
    idx = np.argwhere(np.ones(c.ct.shape, bool))[::7][:, ::-1]
    an = anatomical_coords(c, idx).astype(np.float32)
    d_leg = anatomy.leg(an[:, 0], an[:, 1], an[:, 2])
    hu = c.ct.array[idx[:, 2], idx[:, 1], idx[:, 0]].astype(float)
    air = hu[d_leg > 4.0]
    assert air.size > 1000
    assert abs(np.median(air) + 1000.0) < 25.0
    assert abs(air.mean() + 1000.0) < 25.0
    lab = c.label.array[idx[:, 2], idx[:, 1], idx[:, 0]]
    inside = (d_leg < -3.0) & (lab == 0)
    soft = hu[inside]
    assert ((soft > -150) & (soft < 150)).mean() > 0.7  # fat, muscle, tendons
    assert ((soft > -150) & (soft < -50)).sum() > 500  # subcutaneous fat
    assert ((soft > 10) & (soft < 80)).sum() > 500  # muscle


@pytest.mark.parametrize("side", ["right", "left"])
def test_side_mirror_and_fibula_lateral(side):
    c = case(3, "none", side)
    a2p = np.asarray(c.info["anatomy_to_patient"], dtype=float)
    det = np.linalg.det(a2p[:3, :3])
    assert (det < 0) if side == "left" else (det > 0)
    assert np.allclose(abs(det), 1.0, atol=1e-6)
    tib, fib = label_coords(c, 1), label_coords(c, 2)
    # In the canonical RIGHT-ankle frame (LPS axes) medial is +x (towards the patient's left),
    # so the fibula, lateral, has the smaller x; for a left ankle the mirror in
    # anatomy_to_patient makes the same hold. It is also slightly posterior (+y).
    assert fib[:, 0].mean() < tib[:, 0].mean() - 15.0
    assert fib[:, 1].mean() > tib[:, 1].mean()
    # The plafond (origin of the anatomical frame) is at the bottom of the tibial shaft.
    assert abs(np.percentile(tib[:, 2], 1) - 0.0) < 16.0
    assert np.allclose(c.info["plafond_lps"], a2p[:3, 3], atol=1e-3)
    # In patient LPS, a right fibula lies towards -x (patient right) of the tibia, a left one +x.
    lps_dx = (a2p[:3, :3] @ np.array([-1.0, 0.0, 0.0]))[0]
    assert (lps_dx < 0) if side == "right" else (lps_dx > 0)


def test_left_is_mirror_of_right_in_anatomical_frame():
    right, left = case(3, "none", "right"), case(3, "none", "left")
    for value in (1, 2):
        cr, cl = label_coords(right, value).mean(axis=0), label_coords(left, value).mean(axis=0)
        assert np.allclose(cr, cl, atol=2.0), (value, cr, cl)


# ---------------------------------------------------------------------- fractures
@pytest.mark.parametrize("weber,seed", [("none", 4), ("A", 4), ("B", 7), ("C", 8)])
def test_fracture_level_and_fragments(weber, seed):
    c = case(seed, weber, "right" if seed % 2 else "left")
    frac = c.info["fracture"]
    fib = c.label.array == 2
    if weber == "none":
        assert frac is None
        assert ndimage.label(fib)[1] == 1
        return
    lo, hi = WEBER_HEIGHT_MM[weber]
    assert lo <= frac["height_mm"] <= hi
    assert 0.5 <= frac["gap_mm"] <= 2.0
    assert 1.0 <= frac["displacement_mm"] <= 4.0
    assert frac["rotation_deg"] <= 10.5
    assert isinstance(frac["medial_malleolus_fracture"], bool)
    if weber == "C":
        assert frac["syndesmotic_widening_mm"] >= 2.0
    # The fibula label splits into >= 2 components (6-connectivity) near the fracture height.
    idx = np.argwhere(fib)
    an = anatomical_coords(c, idx[:, ::-1])
    near = np.abs(an[:, 2] - frac["height_mm"]) < 15.0
    mask = np.zeros_like(fib)
    mask[tuple(idx[near].T)] = True
    assert ndimage.label(mask)[1] >= 2
    # The LPS fracture centre agrees with the anatomical one through anatomy_to_patient.
    a2p = np.asarray(c.info["anatomy_to_patient"], dtype=float)
    lps = a2p[:3, :3] @ np.asarray(frac["centre_anatomical"]) + a2p[:3, 3]
    assert np.allclose(lps, frac["centre_lps"], atol=1e-2)


def test_weber_c_widens_the_syndesmosis():
    intact, broken = case(8, "none", "left"), case(8, "C", "left")
    for c in (intact, broken):
        fib = label_coords(c, 2)
        c.lat = fib[np.abs(fib[:, 2] - 10.0) < 5.0, 0].mean()  # fibula x near the syndesmosis
    shift = broken.lat - intact.lat
    assert shift < -1.5  # lateral (-x in the right-ankle frame)


# ---------------------------------------------------------------------- grids
@pytest.mark.parametrize("mode", ["fast", "clinical"])
def test_grid_spacing_and_coverage(mode):
    (ip_lo, ip_hi), (sl_lo, sl_hi) = SPACING_RANGES[mode]
    kinds = []
    for seed in range(40):
        anatomy, a2p, grid = plan_grid(seed, "left" if seed % 2 else "right", mode)
        sx, sy, sz = grid.spacing
        assert sx == sy and ip_lo - 1e-9 <= sx <= ip_hi + 1e-9
        assert sl_lo - 1e-9 <= sz <= sl_hi + 1e-9
        if mode == "clinical":
            assert grid.size[:2] == (512, 512)
            assert CLINICAL_SLICES[0] <= grid.size[2] <= CLINICAL_SLICES[1]
        else:
            assert max(grid.size) < 300 and np.prod(grid.size) < 12e6
        # The tibial axis from -45 to +130 mm and the leg outline lie inside the grid.
        pts = np.array([[0.0, 0.0, z] for z in np.linspace(-45.0, 130.0, 15)])
        pts = np.concatenate([pts, anatomy.leg_bounds(-45.0, 130.0, 6)])
        lps = pts @ a2p[:3, :3].T + a2p[:3, 3]
        q = np.linalg.solve(grid.direction @ np.diag(grid.spacing), (lps - grid.origin).T).T
        assert (q > -0.5).all() and (q < np.asarray(grid.size) - 0.5).all()
        kinds.append(grid.direction_kind)
    non_identity = np.mean([k != "identity" for k in kinds])
    assert 0.1 <= non_identity <= 0.55


def test_write_preview(tmp_path):
    out = tmp_path / "preview.png"
    write_preview(case(1, "B", "left"), str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["preview.png"]  # no temp file left


@pytest.mark.slow
def test_clinical_case():
    t = time.perf_counter()
    c = generate_case(2, "C", "left", "clinical")
    elapsed = time.perf_counter() - t
    print(f"clinical phantom case: {elapsed:.2f} s, shape {c.ct.shape}")
    nz, ny, nx = c.ct.shape
    assert (nx, ny) == (512, 512) and CLINICAL_SLICES[0] <= nz <= CLINICAL_SLICES[1]
    assert c.ct.array.dtype == np.int16 and c.label.array.dtype == np.uint8
    for value in (1, 2):
        assert c.ct.array[c.label.array == value].mean() >= 300.0
