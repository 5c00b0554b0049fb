"""The dense-band test of a candidate line (AnkleFractureLib.fracture.line_density)."""

from __future__ import annotations

import numpy as np
import pytest

from AnkleFractureLib.fracture.line_density import (LineDensity, band_contrast, demo_line_points,
                                                    demo_shaft)
from AnkleFractureLib.fracture.weber_height import candidate_probability
from AnkleFractureLib.geometry.volume import Volume


def test_dense_band_reads_brighter_than_the_bone_around():
    ct, fib, axis = demo_shaft(band_hu=900.0, bone_hu=300.0)
    out = band_contrast(ct, fib, demo_line_points(ct), axis)
    assert out["band_hu"] == pytest.approx(600.0, abs=60.0)
    assert out["interior_points"] > 100


def test_gap_reads_darker_and_intact_bone_reads_flat():
    ct, fib, axis = demo_shaft(band_hu=60.0, bone_hu=300.0)
    gap = band_contrast(ct, fib, demo_line_points(ct), axis)
    assert gap["band_hu"] <= 10.0 and gap["dip_hu"] == pytest.approx(-240.0, abs=40.0)
    ct, fib, axis = demo_shaft(band_hu=300.0, bone_hu=300.0)
    flat = band_contrast(ct, fib, demo_line_points(ct), axis)
    assert abs(flat["band_hu"]) < 10.0 and abs(flat["dip_hu"]) < 10.0


def test_the_cortex_does_not_count():
    """A line through the cortex alone (the ring of points 5-6 mm off the axis): no interior
    point, no measure, however dense the cortex."""
    ct, fib, axis = demo_shaft(band_hu=900.0)
    pts = demo_line_points(ct)
    r = np.hypot(pts[:, 1] - 10.0, pts[:, 0] - 10.0)
    out = band_contrast(ct, fib, pts[r > 5.2], axis)
    assert out["band_hu"] is None and out["interior_points"] < 10


def test_line_off_the_bone_is_not_measured():
    ct, fib, axis = demo_shaft()
    pts = demo_line_points(ct) + np.array([0.0, 0.0, 0.0])
    pts[:, 0] += 30.0  # beside the bone
    assert band_contrast(ct, fib, pts, axis)["band_hu"] is None


def test_line_density_maps_a_crop_mask_through_the_registration():
    """A mask on a crop grid (template mm) is read where the registration puts it: the
    template is the patient moved 7 mm along x."""
    ct, fib, axis = demo_shaft(band_hu=900.0)
    shift = np.eye(4)
    shift[0, 3] = 7.0  # patient -> template
    grid = Volume(np.zeros(ct.shape, np.float32), spacing=ct.spacing,
                  origin=tuple(np.asarray(ct.origin) + np.array([7.0, 0.0, 0.0])))
    mask = np.zeros(ct.shape, bool)
    k = ct.shape[0] // 2
    zz, yy, xx = np.mgrid[k:k + 1, :40, :40] * 0.5
    mask[k] = np.hypot(yy[0] - 10.0, xx[0] - 10.0) <= 6.0
    out = LineDensity(ct, fib, shift, axis)(mask, grid)
    assert out["band_hu"] == pytest.approx(600.0, abs=60.0)
    coarse = LineDensity(ct, fib, shift, axis, grid_mm=1.0)
    assert coarse.depth.stride == (2, 2, 2) and coarse.closed.stride == (2, 2, 2)
    assert coarse(mask, grid)["band_hu"] == pytest.approx(out["band_hu"], abs=10.0)
    assert LineDensity(ct, np.zeros_like(fib), shift, axis)(mask, grid)["band_hu"] is None


def test_a_dense_band_lowers_the_line_probability_only_under_the_rule():
    rule = {"line_model": {"features": ["bias"], "weights": [3.0]}}
    line = {"voxels": 500, "mass": 400.0, "band_hu": 600.0}
    q = candidate_probability(line, rule)
    assert q > 0.9
    rule["dense_band"] = {"min_hu": 250.0, "factor": 0.2}
    assert candidate_probability(line, rule) == pytest.approx(0.2 * q)
    assert candidate_probability({**line, "band_hu": 100.0}, rule) == pytest.approx(q)
    assert candidate_probability({**line, "band_hu": None}, rule) == pytest.approx(q)


def test_gap_contrast_sees_a_hairline_the_profile_median_misses():
    """A 0.5 mm gap of 100 HU in 300 HU bone, with a line drawn 1.5 mm thick around it (as the
    network draws one): the median profile hardly moves, each ray's darkest value does."""
    from AnkleFractureLib.fracture.line_density import gap_contrast

    ct, fib, axis = demo_shaft(band_hu=100.0, bone_hu=300.0, band_mm=0.6)
    pts = demo_line_points(ct)
    thick = np.concatenate([pts + np.array([0.0, 0.0, dz]) for dz in (-0.75, 0.0, 0.75)])
    assert gap_contrast(ct, fib, thick, axis) < -60.0
    assert band_contrast(ct, fib, thick, axis)["dip_hu"] > -60.0
    flat, _, _ = demo_shaft(band_hu=300.0, bone_hu=300.0)
    assert abs(gap_contrast(flat, fib, thick, axis)) < 5.0
    dense, _, _ = demo_shaft(band_hu=900.0, bone_hu=300.0)
    assert gap_contrast(dense, fib, thick, axis) >= 0.0


def test_gap_contrast_reads_across_a_gap_the_label_leaves_out():
    """The fibula label does not cover the fracture gap; the rays must still cross it (the
    label is closed over gaps before the interior test). Near the bone's end (the malleolus
    tip) the window beyond it stands in for both; with no window inside, nothing is read."""
    from AnkleFractureLib.fracture.line_density import gap_contrast

    ct, fib, axis = demo_shaft(band_hu=60.0, bone_hu=300.0, band_mm=1.0)
    label = fib & (np.asarray(ct.array) > 80.0)  # the gap's blood is not fibula
    assert (fib & ~label).any()
    assert gap_contrast(ct, label, demo_line_points(ct), axis) < -150.0
    short = label.copy()
    short[:30] = False  # the bone ends 5 mm below the line: the window above alone
    assert gap_contrast(ct, short, demo_line_points(ct), axis) < -150.0
    flat, _, _ = demo_shaft(band_hu=300.0, bone_hu=300.0)
    assert abs(gap_contrast(flat, short, demo_line_points(ct), axis)) < 5.0
    stub = short.copy()
    stub[55:] = False  # and 7.5 mm above it: neither window lies inside the bone
    assert gap_contrast(ct, stub, demo_line_points(ct), axis) is None


def test_depth_maps_on_a_coarser_grid_read_the_same_line_and_the_box_is_the_masks() -> None:
    """decision.density_grid_mm: the depth maps on every k-th voxel (CT numbers still read on
    the CT's grid) give the line the same reading as the full grid, within a few HU, on a
    gap, on intact bone and on a dense band; the fibula's box is the mask's bounding box."""
    from AnkleFractureLib.fracture.line_density import depth_maps, gap_contrast, grid_stride
    from AnkleFractureLib.geometry.arrays import bounding_box

    for band_hu, band_mm in ((60.0, 1.0), (300.0, 2.0), (900.0, 2.0)):
        ct, fib, axis = demo_shaft(band_hu=band_hu, bone_hu=300.0, band_mm=band_mm)
        pts = demo_line_points(ct)
        fine = depth_maps(fib, (0.5, 0.5, 0.5), None)
        coarse = depth_maps(fib, (0.5, 0.5, 0.5), 1.0)
        assert fine[0].stride == (1, 1, 1) and coarse[0].stride == (2, 2, 2)
        assert coarse[0].array.shape == tuple((n + 1) // 2 for n in fib.shape)
        g_fine = gap_contrast(ct, fib, pts, axis, fine[1])
        g_coarse = gap_contrast(ct, fib, pts, axis, coarse[1])
        assert abs(g_fine - g_coarse) < 10.0, (band_hu, g_fine, g_coarse)
        b_fine = band_contrast(ct, fib, pts, axis, fine[0])["band_hu"]
        b_coarse = band_contrast(ct, fib, pts, axis, coarse[0])["band_hu"]
        assert abs(b_fine - b_coarse) < 10.0, (band_hu, b_fine, b_coarse)
    assert grid_stride((2.0, 0.4, 0.4), 1.2) == (1, 3, 3)
    mask = np.zeros((10, 12, 14), bool)
    mask[3:5, 4, 6:9] = True
    box = bounding_box(mask, np.array([1, 10, 0]))  # the margin LineDensity gives, per axis
    assert box == (slice(2, 6), slice(0, 12), slice(6, 9))
    assert bounding_box(np.zeros((4, 4, 4), bool), np.array([1, 1, 1])) is None
