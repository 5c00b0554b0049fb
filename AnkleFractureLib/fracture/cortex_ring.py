"""The cortical ring check: a fracture line read round the fibular shaft, on the CT's own grid.

Above the syndesmosis the fibula is a tube of cortical bone. A fracture line, however thin,
crosses the whole tube: on the cortex's surface, unrolled into a map of height along the bone
by angle round it, it is a dark curve that closes on itself round all 360 degrees (a plane
through a cylinder is a sinusoid in that map, flat when the line is transverse, tall when it
is oblique). What mimics a fracture does not go round: a nutrient canal or a vessel groove
darkens a few degrees, a healed fracture brightens the cortex, and a screw's streaks are
removed with the metal.

The network localiser reads a 1.5 mm crop, where a 0.2-1 mm hairline between two sample
planes loses most of its contrast (``docs/fracture/experiments/v18_sub_voxel_ct``). Here the
CT is sampled at its own resolution along rays from the fibula's centre line, so a hairline
keeps the contrast the scanner gave it.

Steps (numpy (z, y, x) arrays; positions in "grid mm", index times spacing, an orthonormal
frame of the CT's own axes; heights in patient mm):

1. :func:`centre_line`: the fibula mask's centre line, a station every ``step_mm``;
2. :func:`unroll_cortex`: per station and angle, the brightest CT number along the ray from
   the centre line (the cortex) and its distance, read no further than 1.5 mm beyond the
   fibula mask (the tibia's cortex beside it is not read);
3. :func:`gap_contrast`: 1 - that value / its running median along the bone (0: intact,
   toward 1: a dark gap), stations within :data:`METAL_MARGIN_MM` of metal left out;
4. :func:`best_rings`: per station, the sinusoid round the bone with the highest mean
   contrast, and the fraction of angles where it is dark (``coverage``).

Example:
    >>> from AnkleFractureLib.fracture.cortex_ring import demo_tube
    >>> ct, mask, spacing = demo_tube(gap_at_mm=40.0)
    >>> rings = ring_breaks(ct, mask, spacing)
    >>> round(rings[0].station_mm), rings[0].coverage > 0.9
    (40, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage as ndi

from AnkleFractureLib.geometry.arrays import bounding_box

#: Distance (mm) between stations along the centre line.
STEP_MM = 0.5
#: Angles round the bone.
N_ANGLES = 72
#: Rays reach this far (mm) from the centre line; the fibular shaft's outer radius is 5-9 mm.
RAY_MM = 10.0
#: Step (mm) along a ray.
RAY_STEP_MM = 0.2
#: A ray is read this far (mm) beyond the fibula mask: the cortex's partial-volume rim, not
#: the tibia's cortex 1-3 mm away at the incisura.
GROW_MM = 1.5
#: Half-width (mm) of the running median along the bone that the contrast is measured against.
BASELINE_MM = 8.0
#: CT number (HU) of metal; stations this close (mm) to it are left out (a screw's streaks
#: darken the cortex round the whole bone).
METAL_HU = 2500.0
METAL_MARGIN_MM = 4.0
#: Stations this close (mm) to either end of the centre line are left out (the bone's end
#: and the field of view's edge darken every angle).
END_MARGIN_MM = 8.0
#: A station counts as dark at an angle when its contrast there reaches this.
DARK = 0.15
#: Largest rise (mm) of a line round the bone searched (a line at 60 degrees to the axis of a
#: 7 mm shaft rises about 12 mm either side of its centre).
MAX_RISE_MM = 20.0
RISE_STEP_MM = 0.5
N_PHASES = 16
#: Stations whose rays are read in one interpolation call (64 x 72 rays x 50 samples: about
#: 15 MB of sample points and coordinates).
STATIONS_PER_READ = 64


@dataclass
class RingBreak:
    """A dark closed curve round the fibular shaft.

    Attributes:
        station_mm: Position along the centre line (mm from its first station).
        centre_index: (z, y, x) continuous voxel index of the centre line there.
        score: Mean gap contrast along the curve (0-1).
        coverage: Fraction of the angles where the curve is dark (contrast >= :data:`DARK`).
        rise_mm: Half the curve's rise round the bone (0: transverse line).
        radius_mm: Median distance (mm) from the centre line to the cortex there.
        normal_zyx: Unit normal (grid mm, z, y, x) of the plane through the curve.
    """

    station_mm: float
    centre_index: Tuple[float, float, float]
    score: float
    coverage: float
    rise_mm: float
    radius_mm: float = 0.0
    normal_zyx: Tuple[float, float, float] = (0.0, 0.0, 1.0)


def centre_line(mask: np.ndarray, spacing_zyx: Sequence[float], step_mm: float = STEP_MM,
                slab_mm: float = 2.0, smooth_mm: float = 6.0
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre line of an elongated mask (the fibula).

    Args:
        mask: bool (z, y, x).
        spacing_zyx: Voxel size (mm) per array axis.
        step_mm: Distance between stations (mm).
        slab_mm: Half-thickness (mm) of the slab across the main axis whose centroid gives a
            station's point.
        smooth_mm: Gaussian smoothing (mm) of the points along the line.

    Returns:
        (stations (n,) mm along the main axis, points (n, 3) grid mm, unit tangents (n, 3)).

    Raises:
        ValueError: When the mask has fewer than 50 voxels.
    """
    sp = np.asarray(spacing_zyx, float)
    pts = np.argwhere(mask) * sp
    if len(pts) < 50:
        raise ValueError("the fibula mask is too small for a centre line")
    mean = pts.mean(axis=0)
    axis = np.linalg.svd(pts[:: max(1, len(pts) // 20000)] - mean, full_matrices=False)[2][0]
    along = (pts - mean) @ axis
    order = np.argsort(along)
    along, pts = along[order], pts[order]
    stations = np.arange(np.percentile(along, 0.5), np.percentile(along, 99.5), step_mm)
    lo = np.searchsorted(along, stations - slab_mm)
    hi = np.searchsorted(along, stations + slab_mm)
    csum = np.vstack([np.zeros(3), np.cumsum(pts, axis=0)])
    count = (hi - lo)[:, None]
    points = np.where(count > 5, (csum[hi] - csum[lo]) / np.maximum(count, 1), np.nan)
    ok = ~np.isnan(points[:, 0])
    for k in range(3):  # gaps (a displaced fracture) bridged linearly
        points[~ok, k] = np.interp(stations[~ok], stations[ok], points[ok, k])
    points = ndi.gaussian_filter1d(points, sigma=smooth_mm / step_mm, axis=0, mode="nearest")
    tangents = np.gradient(points, axis=0)
    tangents /= np.maximum(np.linalg.norm(tangents, axis=1, keepdims=True), 1e-9)
    return stations - stations[0], points, tangents


def _ray_frames(tangents: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`_ray_frame` of every row of ``tangents`` (n, 3): (u, v), each (n, 3)."""
    u = np.cross(tangents, [0.0, 1.0, 0.0])
    flat = np.linalg.norm(u, axis=1) < 1e-3
    u[flat] = np.cross(tangents[flat], [1.0, 0.0, 0.0])
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return u, np.cross(tangents, u)


def _ray_frame(tangent: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Two unit vectors across ``tangent``, fixed by the array's y axis (so that the angle
    0 of neighbouring stations points the same way)."""
    u = np.cross(tangent, [0.0, 1.0, 0.0])
    if np.linalg.norm(u) < 1e-3:
        u = np.cross(tangent, [1.0, 0.0, 0.0])
    u /= np.linalg.norm(u)
    return u, np.cross(tangent, u)


def unroll_cortex(ct: np.ndarray, spacing_zyx: Sequence[float], points: np.ndarray,
                  tangents: np.ndarray, mask: Optional[np.ndarray] = None,
                  n_angles: int = N_ANGLES, ray_mm: float = RAY_MM,
                  ray_step_mm: float = RAY_STEP_MM) -> Tuple[np.ndarray, np.ndarray]:
    """The brightest CT number along each ray from the centre line, and where it lies:
    ((stations, angles) HU, (stations, angles) mm from the centre line).

    Args:
        ct: (z, y, x) HU.
        spacing_zyx: Voxel size (mm) per array axis.
        points: (n, 3) grid mm of the centre line; ``tangents``: (n, 3) unit.
        mask: bool (z, y, x), the bone: a ray is read only to :data:`GROW_MM` beyond the
            last of its samples inside it (the cortex's partial-volume rim, not the tibia's
            cortex 1-3 mm away at the incisura); None reads the whole ray.
        n_angles: Angles round the bone; ``ray_mm``, ``ray_step_mm``: ray length and step.
    """
    sp = np.asarray(spacing_zyx, float)
    theta = np.arange(n_angles) * 2.0 * np.pi / n_angles
    radii = np.arange(0.0, ray_mm, ray_step_mm)
    out = np.empty((len(points), n_angles), np.float32)
    where = np.empty((len(points), n_angles), np.float32)
    mask_u8 = None if mask is None else np.asarray(mask, np.uint8)
    u, v = _ray_frames(np.asarray(tangents, float))
    # stations in batches, each read with one interpolation call: a call per station cost
    # most of the ring check's time on a clinical scan (about 300 stations)
    for lo in range(0, len(points), STATIONS_PER_READ):
        hi = min(lo + STATIONS_PER_READ, len(points))
        dirs = (np.cos(theta)[None, :, None] * u[lo:hi, None, :]
                + np.sin(theta)[None, :, None] * v[lo:hi, None, :])
        samples = points[lo:hi, None, None, :] + radii[None, None, :, None] * dirs[:, :, None, :]
        shape = (hi - lo, n_angles, len(radii))
        coords = (samples / sp).reshape(-1, 3).T
        values = ndi.map_coordinates(ct, coords, order=1, mode="nearest").reshape(shape)
        if mask_u8 is not None:
            inside = ndi.map_coordinates(mask_u8, coords, order=0, mode="constant",
                                         cval=0).reshape(shape) > 0
            met = inside.any(axis=2)
            last = np.where(met, len(radii) - 1 - np.argmax(inside[:, :, ::-1], axis=2), 0)
            reach = radii[last] + GROW_MM
            values = np.where(radii[None, None, :] <= reach[:, :, None], values, -np.inf)
        k = values.argmax(axis=2)
        best = np.take_along_axis(values, k[:, :, None], axis=2)[:, :, 0]
        if mask_u8 is not None:
            best = np.where(met, best, np.nan)  # a ray that never meets the bone
        out[lo:hi], where[lo:hi] = best, radii[k]
    return out, where


def gap_contrast(brightest: np.ndarray, step_mm: float = STEP_MM,
                 baseline_mm: float = BASELINE_MM) -> Tuple[np.ndarray, np.ndarray]:
    """(contrast (stations, angles) in [0, 1], usable stations (bool)): 1 - HU / the running
    median of the same angle along the bone; stations near metal are unusable, and metal is
    clipped out of the median. Rays that never met the bone (NaN) count as intact, and a
    station where more than a quarter of them did is unusable (the centre line left the
    bone)."""
    missing = np.isnan(brightest)
    off_bone = missing.mean(axis=1) > 0.25
    if missing.any():
        fill = np.nanmedian(brightest) if (~missing).any() else 0.0
        brightest = np.where(missing, fill, brightest)
    metal_rows = (brightest >= METAL_HU).any(axis=1)
    reach = int(np.ceil(METAL_MARGIN_MM / step_mm))
    near_metal = ndi.binary_dilation(metal_rows, iterations=reach) if reach and metal_rows.any() \
        else metal_rows
    clipped = np.minimum(brightest, METAL_HU)
    size = (2 * int(round(baseline_mm / step_mm)) + 1, 1)
    base = ndi.median_filter(clipped, size=size, mode="nearest")
    contrast = np.clip(1.0 - clipped / np.maximum(base, 1.0), 0.0, 1.0)
    contrast[missing] = 0.0
    return contrast.astype(np.float32), ~near_metal & ~off_bone


def best_rings(contrast: np.ndarray, step_mm: float = STEP_MM, max_rise_mm: float = MAX_RISE_MM
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per station: (score, coverage, rise mm, phase rad) of the best sinusoid centred there.

    The contrast is max-pooled over +-1 station first, so a curve is not lost between stations.
    A sinusoid ``station + rise * cos(angle - phase)`` is scored by its mean contrast;
    coverage is the fraction of its angles with contrast >= :data:`DARK`.
    """
    n, n_ang = contrast.shape
    pooled = ndi.maximum_filter(contrast, size=(3, 1), mode="nearest")
    # padded by the largest shift so that a curve reaching past either end reads 0 there
    reach = int(np.ceil(max_rise_mm / step_mm)) + 1
    padded = np.pad(pooled, ((reach, reach), (0, 0)))
    theta = np.arange(n_ang) * 2.0 * np.pi / n_ang
    rows, cols = np.arange(n)[None, :, None], np.arange(n_ang)[None, None, :]
    score = np.full(n, -1.0)
    coverage = np.zeros(n)
    rise = np.zeros(n)
    best_phase = np.zeros(n)
    # every phase of a rise in one gather (phases, stations, angles): a loop over the 641
    # (rise, phase) pairs cost 0.2 s on a clinical scan; the first best pair wins, as before
    for r in np.arange(0.0, max_rise_mm + 1e-9, RISE_STEP_MM):
        phases = np.arange(N_PHASES) * 2.0 * np.pi / N_PHASES if r > 0 else np.zeros(1)
        shift = np.round(r * np.cos(theta[None, :] - phases[:, None]) / step_mm).astype(int)
        values = padded[rows + reach + shift[:, None, :], cols]
        s = values.mean(axis=2)
        k = s.argmax(axis=0)
        s_best = s[k, np.arange(n)]
        better = s_best > score
        score[better] = s_best[better]
        chosen = values[k[better], np.flatnonzero(better)]
        coverage[better] = (chosen >= DARK).mean(axis=1)
        rise[better] = r
        best_phase[better] = phases[k[better]]
    return score, coverage, rise, best_phase


def ring_breaks(ct: np.ndarray, mask: np.ndarray, spacing_zyx: Sequence[float],
                min_score: float = 0.0, separation_mm: float = 5.0, limit: int = 5
                ) -> List[RingBreak]:
    """The strongest dark rings round a fibula, strongest first.

    Args:
        ct: (z, y, x) HU on the mask's grid.
        mask: bool (z, y, x): the fibula (one leg's, with its fragments).
        spacing_zyx: Voxel size (mm) per array axis.
        min_score: Rings scoring below this are not returned.
        separation_mm: Rings closer than this (mm along the bone) to a stronger one are not
            returned (the same line).
        limit: At most this many rings.

    Returns:
        Rings (:class:`RingBreak`), strongest first; none within :data:`END_MARGIN_MM` of the
        centre line's ends or :data:`METAL_MARGIN_MM` of metal.
    """
    sp = np.asarray(spacing_zyx, float)
    # from projections, not find_objects on a uint8 copy of the whole CT grid (0.2 s at 512^2)
    region = bounding_box(mask, [int(np.ceil(RAY_MM / s)) + 1 for s in sp])
    if region is None:
        return []
    sub = np.asarray(mask[region], bool)
    stations, points, tangents = centre_line(sub, sp)
    brightest, radius = unroll_cortex(np.asarray(ct[region]), sp, points, tangents, sub)
    contrast, usable = gap_contrast(brightest)
    score, coverage, rise, phase = best_rings(contrast)
    usable &= (stations >= END_MARGIN_MM) & (stations <= stations[-1] - END_MARGIN_MM)
    score = np.where(usable, score, -1.0)
    offset = np.array([s.start for s in region], float)
    found: List[RingBreak] = []
    for i in np.argsort(score)[::-1]:
        if score[i] <= 0.0 or score[i] < min_score or len(found) >= limit:
            break
        if any(abs(stations[i] - f.station_mm) < separation_mm for f in found):
            continue
        r_mm = float(np.median(radius[i]))
        found.append(RingBreak(float(stations[i]), tuple(points[i] / sp + offset),
                               float(score[i]), float(coverage[i]), float(rise[i]), r_mm,
                               _plane_normal(tangents[i], float(rise[i]), float(phase[i]), r_mm)))
    return found


def _plane_normal(tangent: np.ndarray, rise_mm: float, phase: float, radius_mm: float
                  ) -> Tuple[float, float, float]:
    """Normal (z, y, x) of the plane through the curve ``rise * cos(angle - phase)`` on a
    cylinder of ``radius_mm`` round ``tangent``: it leans from the tangent towards the angle
    where the curve is highest."""
    u, v = _ray_frame(tangent)
    toward = np.cos(phase) * u + np.sin(phase) * v
    n = tangent - (rise_mm / max(radius_mm, 1.0)) * toward
    n = n / np.linalg.norm(n)
    return float(n[0]), float(n[1]), float(n[2])


def ring_line_mask(ring: RingBreak, mask: np.ndarray, spacing_zyx: Sequence[float],
                   half_width_mm: float = 0.75) -> np.ndarray:
    """The ring's voxels: bool (z, y, x) of ``mask`` within ``half_width_mm`` of the ring's
    plane and within its radius plus 3 mm of its centre (what a reader sees as the line)."""
    sp = np.asarray(spacing_zyx, float)
    centre = np.asarray(ring.centre_index, float) * sp
    reach = ring.radius_mm + ring.rise_mm + 3.0
    lo = np.maximum(np.floor((centre - reach) / sp).astype(int), 0)
    hi = np.minimum(np.ceil((centre + reach) / sp).astype(int) + 1, mask.shape)
    out = np.zeros(mask.shape, bool)
    if np.any(hi <= lo):
        return out
    grids = np.meshgrid(*[np.arange(a, b) * s for a, b, s in zip(lo, hi, sp)], indexing="ij")
    rel = np.stack(grids, axis=-1) - centre
    near_plane = np.abs(rel @ np.asarray(ring.normal_zyx)) <= half_width_mm
    near_centre = np.linalg.norm(rel, axis=-1) <= ring.radius_mm + 3.0 + ring.rise_mm
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    out[box] = near_plane & near_centre & np.asarray(mask[box], bool)
    return out


def demo_tube(gap_at_mm: Optional[float] = 40.0, length_mm: float = 90.0,
              gap_mm: float = 0.5, spacing_zyx: Sequence[float] = (0.8, 0.5, 0.5)
              ) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]:
    """A fibular shaft along z (HU, mask, spacing): a 7 mm-radius tube with a 2.5 mm cortex
    (1500 HU) round fatty marrow (-50 HU) in muscle (50 HU), and a transverse gap ``gap_mm``
    wide at ``gap_at_mm`` from the first station (None: intact). For examples and tests."""
    sp = np.asarray(spacing_zyx, float)
    shape = (int(length_mm / sp[0]), int(24 / sp[1]), int(24 / sp[2]))
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, sp)], indexing="ij")
    r = np.hypot(y - 12.0, x - 12.0)
    ct = np.where(r < 4.5, -50.0, np.where(r < 7.0, 1500.0, 50.0)).astype(np.float32)
    mask = r < 7.0
    if gap_at_mm is not None:
        start = float(np.percentile(z[mask], 0.5))
        in_gap = np.abs(z - (start + gap_at_mm)) < gap_mm / 2.0
        ct[in_gap & (r >= 4.5) & (r < 7.0)] = 50.0
    ct = ndi.gaussian_filter(ct, sigma=0.6 / sp)
    return ct.astype(np.float32), mask, (float(sp[0]), float(sp[1]), float(sp[2]))
