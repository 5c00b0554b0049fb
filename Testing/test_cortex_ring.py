"""The cortical ring check (AnkleFractureLib.fracture.cortex_ring) on synthetic fibular shafts."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from AnkleFractureLib.fracture.cortex_ring import (METAL_MARGIN_MM, centre_line, demo_tube,
                                                   ring_breaks)


def _shaft(spacing=(0.8, 0.5, 0.5), tilt_deg=0.0, gap_normal_deg=0.0, gap_at=40.0,
           gap_mm=0.5, canal=False, screw_at=None):
    """A 90 mm shaft (7 mm radius, 2.5 mm cortex at 1500 HU) tilted by ``tilt_deg`` about the
    x axis, with a planar gap ``gap_mm`` wide whose normal leans ``gap_normal_deg`` from the
    shaft's axis (None: no gap), a 1.2 mm nutrient canal through one side of the cortex, and a
    screw (3000 HU) across the shaft ``screw_at`` mm along it. Returns (ct, mask, spacing)."""
    sp = np.asarray(spacing, float)
    shape = (int(100 / sp[0]), int(50 / sp[1]), int(30 / sp[2]))
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, sp)], indexing="ij")
    t = np.deg2rad(tilt_deg)
    # shaft frame: a along the shaft, b and c across it
    z0, y0, x0 = z - 50.0, y - 25.0, x - 15.0
    a = z0 * np.cos(t) + y0 * np.sin(t)
    b = -z0 * np.sin(t) + y0 * np.cos(t)
    c = x0
    r = np.hypot(b, c)
    inside = np.abs(a) < 45.0
    ct = np.where(inside & (r < 4.5), -50.0, np.where(inside & (r < 7.0), 1500.0, 50.0))
    mask = inside & (r < 7.0)
    cortex = inside & (r >= 4.5) & (r < 7.0)
    if gap_at is not None:
        g = np.deg2rad(gap_normal_deg)
        plane = (a - (gap_at - 45.0)) * np.cos(g) + b * np.sin(g)
        ct[cortex & (np.abs(plane) < gap_mm / 2.0)] = 50.0
    if canal:  # a canal through the cortex at one angle, 15 mm from the shaft's start
        ct[cortex & (np.hypot(a - (15.0 - 45.0), c) < 0.6) & (b > 0)] = 50.0
    if screw_at is not None:
        ct[inside & (np.hypot(a - (screw_at - 45.0), b) < 1.5) & (np.abs(c) < 9.0)] = 3000.0
    ct = ndi.gaussian_filter(ct.astype(np.float32), sigma=0.6 / sp)
    return ct, mask, tuple(float(s) for s in sp)


def test_demo_tube_gap_is_found_where_it_is() -> None:
    ct, mask, sp = demo_tube(gap_at_mm=40.0)
    rings = ring_breaks(ct, mask, sp)
    assert abs(rings[0].station_mm - 40.0) <= 1.0
    assert rings[0].coverage > 0.9 and rings[0].score > 0.3


def test_an_intact_shaft_has_no_ring() -> None:
    ct, mask, sp = _shaft(gap_at=None)
    rings = ring_breaks(ct, mask, sp)
    assert all(r.coverage < 0.3 for r in rings), [(r.station_mm, r.coverage) for r in rings]


@pytest.mark.parametrize("tilt", [0.0, 30.0])
def test_an_oblique_hairline_is_a_sinusoid_round_the_bone(tilt: float) -> None:
    """A 0.4 mm gap leaning 45 degrees to a shaft that is itself tilted in the volume: found at
    its centre, all the way round, with a rise of about the cortex radius (tan 45 x 5.7 mm)."""
    ct, mask, sp = _shaft(tilt_deg=tilt, gap_normal_deg=45.0, gap_mm=0.4)
    ring = ring_breaks(ct, mask, sp)[0]
    assert abs(ring.station_mm - 40.0) <= 2.0
    assert ring.coverage > 0.8
    assert 4.0 <= ring.rise_mm <= 8.0


def test_a_gap_thinner_than_the_slices_is_still_found() -> None:
    """A transverse 0.8 mm gap on 2 mm slices (rendered on 0.5 mm slices and averaged four
    by four, as a scanner integrates over its slice: about 40 % of the cortex lost) is found
    round the whole bone."""
    fine, mask, sp = _shaft(spacing=(0.5, 0.6, 0.6), gap_mm=0.8)
    n = fine.shape[0] // 4 * 4
    ct = fine[:n].reshape(n // 4, 4, *fine.shape[1:]).mean(axis=1)
    mask = mask[:n].reshape(n // 4, 4, *mask.shape[1:]).any(axis=1)
    ring = ring_breaks(ct, mask, (2.0, sp[1], sp[2]))[0]
    assert abs(ring.station_mm - 40.0) <= 2.0 and ring.coverage > 0.8


def test_a_nutrient_canal_is_no_ring() -> None:
    """A canal darkens one side of the cortex, not all of it: its ring covers few angles,
    while the true gap on the same shaft covers nearly all."""
    ct, mask, sp = _shaft(canal=True)
    rings = ring_breaks(ct, mask, sp)
    at_canal = [r for r in rings if abs(r.station_mm - 15.0) <= 3.0]
    assert all(r.coverage < 0.4 for r in at_canal)
    assert abs(rings[0].station_mm - 40.0) <= 1.0 and rings[0].coverage > 0.9


def test_stations_next_to_metal_are_left_out() -> None:
    """A screw across the intact shaft: its streak-free rendering still brightens and its
    surroundings are left out of the search (no ring within the metal margin)."""
    ct, mask, sp = _shaft(gap_at=None, screw_at=60.0)
    rings = ring_breaks(ct, mask, sp)
    assert all(abs(r.station_mm - 60.0) > METAL_MARGIN_MM for r in rings)


def test_centre_line_follows_a_tilted_shaft() -> None:
    ct, mask, sp = _shaft(tilt_deg=30.0, gap_at=None)
    stations, points, tangents = centre_line(mask, sp)
    assert 85.0 <= stations[-1] <= 92.0
    along = np.array([0.0, np.sin(np.deg2rad(30.0)), 0.0]) + np.array([np.cos(np.deg2rad(30.0)),
                                                                         0.0, 0.0])
    middle = tangents[len(tangents) // 2]
    assert abs(abs(middle @ along) - 1.0) < 0.01


def test_a_mask_too_small_is_refused() -> None:
    with pytest.raises(ValueError, match="too small"):
        centre_line(np.zeros((5, 5, 5), bool), (1.0, 1.0, 1.0))


def test_the_ring_plane_and_its_voxels_follow_an_oblique_gap() -> None:
    """The plane fitted through an oblique ring leans as the gap does (within 15 degrees), and
    the ring's voxels (what the reader is shown) lie on the gap, inside the fibula."""
    from AnkleFractureLib.fracture.cortex_ring import ring_line_mask

    ct, mask, sp = _shaft(gap_normal_deg=40.0, gap_mm=0.6)
    ring = ring_breaks(ct, mask, sp)[0]
    truth = np.array([np.cos(np.deg2rad(40.0)), np.sin(np.deg2rad(40.0)), 0.0])  # (z, y, x)
    cos = abs(float(np.dot(ring.normal_zyx, truth)))
    assert cos > np.cos(np.deg2rad(15.0)), ring
    line = ring_line_mask(ring, mask, sp)
    assert line.sum() > 100 and not (line & ~mask).any()
    z, y, x = (np.argwhere(line) * np.asarray(sp)).T
    plane = (z - 50.0 - (40.0 - 45.0)) * truth[0] + (y - 25.0) * truth[1]
    assert np.median(np.abs(plane)) < 1.5
