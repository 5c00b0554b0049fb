"""A randomised ankle built from real bone shapes (the "vh" phantom family).

One of the real legs of :mod:`AnkleFractureLib.phantom.shapes` is deformed so that no two cases
share a shape, then completed with what a real ankle CT holds around it:

* **deformation** (anatomically bounded; every draw is in :class:`RealShapeParams`): length
  (x0.88-1.12) and width (x0.88-1.12) scaling, a smooth random displacement field (1-2.5 mm,
  wavelengths of several cm), metaphyseal flare (-10 to +14 % width at the plafond, fading out
  60 mm above), incisura depth (-1.5 to +2 mm), tibiofibular gap (-0.7 to +1.5 mm), lateral
  malleolus length (x0.88-1.15), fibular twist (-8 to +8 degrees at the tip), and the foot's
  pose (talus and foot bones rotated -15 to +20 degrees about the ankle's axis);
* **distractor bones**: calcaneus, navicular and cuboid (smooth implicit shapes placed around
  the real talus; unlabelled), on request the forefoot (cuneiforms, metatarsals, proximal
  phalanges; :mod:`~AnkleFractureLib.phantom.forefoot`, attached by
  :meth:`RealAnatomy.attach_forefoot`), and in some cases the other leg (a real leg of the
  other side, labelled like the main one);
* the **leg outline** (skin) around all of it: ankle-sized at the malleoli, calf-sized above.

All coordinates are the canonical right-ankle frame (mm, LPS axes, plafond centre at the origin,
lateral is -x); every shape is a signed distance function ``f(x, y, z) -> d`` (mm, negative
inside) on 1-D float32 arrays, like :mod:`AnkleFractureLib.phantom.anatomy`. Distances under the
deformation are approximate (scaled by the mean scale), which is all rendering needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage

from AnkleFractureLib.phantom import forefoot as ff_mod
from AnkleFractureLib.phantom.anatomy import ellipse_sdf, ellipsoid_sdf, smin, smoothstep
from AnkleFractureLib.phantom.shapes import BaseShape, ShapeGrid

Sdf = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


@dataclass
class RealShapeParams:
    """The draws that make one real-shape anatomy (lengths mm, angles degrees)."""

    base: int
    other_base: int
    length_scale: float
    width_scale: float
    field_mm: float
    flare: float
    incisura_mm: float
    gap_mm: float
    malleolus_scale: float
    twist_deg: float
    foot_deg: float
    joint_extra_mm: float
    other_leg: bool
    other_dx: float
    other_dy: float
    habitus: float
    calc_r: Tuple[float, float, float]
    nav_r: Tuple[float, float, float]
    cub_r: Tuple[float, float, float]

    def to_dict(self) -> Dict[str, object]:
        """JSON-friendly copy (rounded)."""
        out = {}
        for k, v in asdict(self).items():
            if isinstance(v, (tuple, list)):
                out[k] = [round(float(x), 3) for x in v]
            elif isinstance(v, (bool, int, np.integer)) and not isinstance(v, float):
                out[k] = v if isinstance(v, bool) else int(v)
            else:
                out[k] = round(float(v), 4)
        return out


def sample_real_params(rng: np.random.Generator, n_bases: int) -> RealShapeParams:
    """Draw the deformation and context of one case (see the module docstring for ranges)."""
    base = int(rng.integers(0, n_bases))
    other = int(rng.integers(0, n_bases))
    return RealShapeParams(
        base=base, other_base=other,
        length_scale=_u(rng, 0.88, 1.12), width_scale=_u(rng, 0.88, 1.12),
        field_mm=_u(rng, 1.0, 2.5), flare=_u(rng, -0.10, 0.14),
        incisura_mm=_u(rng, -1.5, 2.0), gap_mm=_u(rng, -0.7, 1.5),
        malleolus_scale=_u(rng, 0.88, 1.15), twist_deg=_u(rng, -8.0, 8.0),
        foot_deg=_u(rng, -15.0, 20.0), joint_extra_mm=_u(rng, 0.0, 0.8),
        other_leg=bool(rng.uniform() < 0.25), other_dx=_u(rng, 140.0, 230.0),
        other_dy=_u(rng, -30.0, 30.0), habitus=_u(rng, 0.85, 1.25),
        calc_r=(_u(rng, 17, 22), _u(rng, 30, 38), _u(rng, 14, 19)),
        nav_r=(_u(rng, 14, 18), _u(rng, 7, 10), _u(rng, 11, 14)),
        cub_r=(_u(rng, 11, 14), _u(rng, 11, 14), _u(rng, 10, 13)))


class SmoothField:
    """Smooth random displacement field (mm) on an 8 mm lattice, trilinearly sampled.

    Args:
        rng: Random generator.
        lo, hi: Lattice corners (x, y, z) mm.
        amplitude_mm: Root-mean-square displacement per axis.
        wavelength_mm: Correlation length of the field.
    """

    def __init__(self, rng: np.random.Generator, lo, hi, amplitude_mm: float,
                 wavelength_mm: float = 50.0) -> None:
        self.lo = np.asarray(lo, float)
        self.step = 8.0
        shape = tuple(int(np.ceil((h - l) / self.step)) + 1 for l, h in zip(lo[::-1], hi[::-1]))
        sig = wavelength_mm / (2.0 * self.step)
        comps = []
        for _ in range(3):
            f = ndimage.gaussian_filter(rng.standard_normal(shape), sig, mode="wrap")
            comps.append((f * (amplitude_mm / max(float(f.std()), 1e-9))).astype(np.float32))
        self.comps = comps  # each (z, y, x)

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> List[np.ndarray]:
        """Displacement (dx, dy, dz) mm at points (mm)."""
        c = np.stack([(z - self.lo[2]) / self.step, (y - self.lo[1]) / self.step,
                      (x - self.lo[0]) / self.step])
        return [ndimage.map_coordinates(f, c, order=1, mode="nearest", output=np.float32)
                for f in self.comps]


def _centreline(grid: ShapeGrid, z: np.ndarray) -> np.ndarray:
    """Centroid (x, y) mm of a bone's cross-section at each height ``z`` (NaN where absent)."""
    out = np.full((z.size, 2), np.nan)
    lo, _ = grid.bounds()
    ys, xs = np.mgrid[0:grid.sdf.shape[1], 0:grid.sdf.shape[2]]
    for i, zz in enumerate(z):
        k = int(round((zz - lo[2]) / grid.step))
        if 0 <= k < grid.sdf.shape[0]:
            m = grid.sdf[k] < 0
            if m.sum() > 3:
                out[i] = [lo[0] + grid.step * xs[m].mean(), lo[1] + grid.step * ys[m].mean()]
    return out


def _rot_x(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[1.0, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


#: Heights (mm, base frame) at which centrelines are tabulated.
_ZTAB = np.arange(-60.0, 420.0, 2.0)
#: Soft tissue (mm) that always covers the tibia and fibula below :data:`COVER_TOP_MM`: the
#: skin outline (ellipses and the hindfoot's ellipsoids) is grown around a malleolus that would
#: reach it. Without it the outline clipped the lateral malleolus of many shapes flat (up to
#: 3 ml of bone rendered as air): a cortical break at the tip that both networks read as a
#: Weber A fracture on intact ankles.
BONE_COVER_MM = 4.0
#: Height (mm above the plafond) below which the cover is enforced (the calf is wide above).
COVER_TOP_MM = 60.0


def _fill_nan(a: np.ndarray) -> np.ndarray:
    """Replace NaN rows by the nearest valid row (ends held constant)."""
    ok = ~np.isnan(a[:, 0])
    idx = np.arange(len(a))
    return np.stack([np.interp(idx, idx[ok], a[ok, j]) for j in range(a.shape[1])], axis=1)


def _inside_box(grid: ShapeGrid) -> Tuple[np.ndarray, np.ndarray]:
    """(lo, hi) corners (x, y, z) mm of a bone's inside voxels."""
    k, j, i = np.nonzero(grid.sdf < 0)
    idx = np.stack([i, j, k], axis=1)
    return grid.origin + grid.step * idx.min(axis=0), grid.origin + grid.step * idx.max(axis=0)


class RealAnatomy:
    """A deformed real leg with its foot, skin and (sometimes) the other leg.

    Args:
        params: The case's draws.
        library: Base shapes (:func:`AnkleFractureLib.phantom.shapes.shipped_library`).
        rng: Random generator for the displacement field.
    """

    def __init__(self, params: RealShapeParams, library: List[BaseShape],
                 rng: np.random.Generator) -> None:
        p = self.p = params
        self.g = library[p.base].bones
        self.other = library[p.other_base].bones if p.other_leg else None
        self.sw, self.sl = p.width_scale, p.length_scale
        self.scale = (2.0 * self.sw + self.sl) / 3.0
        self.tib_c = _fill_nan(_centreline(self.g["tibia"], _ZTAB))
        self.fib_c = _fill_nan(_centreline(self.g["fibula"], _ZTAB))
        v = self.fib_c[np.searchsorted(_ZTAB, 10.0)] - self.tib_c[np.searchsorted(_ZTAB, 10.0)]
        self.n_lat = v / np.linalg.norm(v)
        tlo, thi = _inside_box(self.g["talus"])
        self.talus_box = (tlo, thi)
        tc = 0.5 * (tlo + thi)
        self.ankle_centre = np.array([tc[0], tc[1], thi[2] - 18.0])
        self.foot_rot = _rot_x(p.foot_deg)
        self.foot_parts = self._foot_parts(tlo, thi)
        lo, hi = self._extent()
        self.field = SmoothField(rng, lo - 20.0, hi + 20.0, p.field_mm)
        self.fib_tab = self._forward_fibula()
        self.forefoot: Optional[ff_mod.Forefoot] = None

    # ------------------------------------------------------------------ forefoot (opt-in)
    def attach_forefoot(self, forefoot: ff_mod.Forefoot) -> None:
        """Add the forefoot bones: the foot takes the forefoot's pose (its plantarflexion)
        and the cuboid the shape fitted to the forefoot."""
        self.forefoot = forefoot
        self.p.foot_deg = float(forefoot.plantarflexion_deg)
        self.foot_rot = _rot_x(self.p.foot_deg)
        if forefoot.cuboid is not None:
            self.foot_parts[2] = forefoot.cuboid

    def forefoot_bones(self, x, y, z) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(signed distance mm, cortex mm, trabecular fraction) of the forefoot bones."""
        q = self._foot_base(*self._common(x, y, z))
        d, cortex, trab = ff_mod.bones_sdf(self.forefoot, *q, neighbours=self.foot_parts[1:])
        return d * self.scale, cortex, trab

    def foot_to_anatomy(self, pts: np.ndarray) -> np.ndarray:
        """Base talus frame points (m, 3) mm -> anatomy frame (pose, joint, scaling; not the
        smooth field, a few mm)."""
        q = (pts - self.ankle_centre) @ self.foot_rot.T + self.ankle_centre
        q[:, 2] -= self.p.joint_extra_mm
        return q * np.array([self.sw, self.sw, self.sl])

    def forefoot_corners(self) -> np.ndarray:
        """Points (m, 3) mm around the forefoot's soft tissue, anatomy frame (none: empty)."""
        if self.forefoot is None:
            return np.zeros((0, 3))
        return self.foot_to_anatomy(ff_mod.outline_points(self.forefoot))

    # ------------------------------------------------------------------ warps
    def _common(self, x, y, z) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Anatomy -> base frame, before the bone-specific part (field, then scale)."""
        ux, uy, uz = self.field(x, y, z)
        return (x - ux) / self.sw, (y - uy) / self.sw, (z - uz) / self.sl

    def _centre(self, table: np.ndarray, z: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        return (np.interp(z, _ZTAB, table[:, 0]).astype(np.float32),
                np.interp(z, _ZTAB, table[:, 1]).astype(np.float32))

    def _tibia_base(self, x, y, z):
        """Base-frame points of the tibia: undo the incisura and the metaphyseal flare."""
        p = self.p
        cx, cy = self._centre(self.tib_c, z)
        dx, dy = x - cx, y - cy
        lat = dx * self.n_lat[0] + dy * self.n_lat[1]
        w = np.exp(-((z - 15.0) / 18.0) ** 2) * smoothstep(lat, 5.0, 15.0)
        dx = dx + p.incisura_mm * self.n_lat[0] * w
        dy = dy + p.incisura_mm * self.n_lat[1] * w
        f = 1.0 + p.flare * smoothstep(z, 60.0, 0.0)
        return cx + dx / f, cy + dy / f, z

    def _fibula_base(self, x, y, z):
        """Base-frame points of the fibula: undo the gap, the malleolus length, the twist."""
        p = self.p
        x = x - p.gap_mm * self.n_lat[0]
        y = y - p.gap_mm * self.n_lat[1]
        z = np.where(z < 0.0, z / p.malleolus_scale, z).astype(np.float32)
        cx, cy = self._centre(self.fib_c, z)
        th = -np.deg2rad(p.twist_deg) * smoothstep(z, 80.0, -20.0)
        c, s = np.cos(th), np.sin(th)
        dx, dy = x - cx, y - cy
        return cx + c * dx - s * dy, cy + s * dx + c * dy, z

    def _foot_base(self, x, y, z):
        """Base-frame points of the talus and foot: undo the joint space and the foot pose."""
        q = np.stack([x, y, z + self.p.joint_extra_mm], axis=1) - self.ankle_centre
        q = q @ self.foot_rot + self.ankle_centre  # row-vector form of R.T @ q
        return q[:, 0].astype(np.float32), q[:, 1].astype(np.float32), q[:, 2].astype(np.float32)

    # ------------------------------------------------------------------ bones
    def tibia(self, x, y, z) -> np.ndarray:
        """Signed distance (mm) to the tibia."""
        return self.g["tibia"](*self._tibia_base(*self._common(x, y, z))) * self.scale

    def fibula(self, x, y, z) -> np.ndarray:
        """Signed distance (mm) to the fibula."""
        return self.g["fibula"](*self._fibula_base(*self._common(x, y, z))) * self.scale

    def talus(self, x, y, z) -> np.ndarray:
        """Signed distance (mm) to the talus."""
        return self.g["talus"](*self._foot_base(*self._common(x, y, z))) * self.scale

    def foot(self, x, y, z) -> np.ndarray:
        """Signed distance (mm) to the calcaneus, navicular and cuboid (unlabelled)."""
        q = self._foot_base(*self._common(x, y, z))
        d = np.full(x.shape, 1e3, np.float32)
        for centre, radii in self.foot_parts:
            d = np.minimum(d, ellipsoid_sdf(q[0] - centre[0], q[1] - centre[1], q[2] - centre[2], radii))
        # Keep a joint space between the foot bones and the talus.
        d = np.maximum(d, 1.5 - self.g["talus"](*q))
        return d * self.scale

    def other_leg(self, x, y, z) -> Dict[str, np.ndarray]:
        """Signed distances (mm) to the other leg's tibia, fibula and talus (mirrored, shifted)."""
        qx = -(x - self.p.other_dx) / self.sw
        qy, qz = (y - self.p.other_dy) / self.sw, z / self.sl
        return {b: self.other[b](qx, qy, qz) * self.scale for b in ("tibia", "fibula", "talus")}

    def _foot_parts(self, tlo: np.ndarray, thi: np.ndarray):
        """(centre, radii) of the calcaneus, navicular and cuboid, in the base talus frame."""
        p = self.p
        tc = 0.5 * (tlo + thi)
        calc = np.array([tc[0] - 3.0, tc[1] + 12.0, tlo[2] - 10.0])
        nav = np.array([tc[0] + 8.0, tlo[1] - p.nav_r[1] + 3.0, tlo[2] + 12.0])
        cub = np.array([tc[0] - 16.0, calc[1] - p.calc_r[1] - p.cub_r[1] + 8.0, calc[2] + 2.0])
        return [(calc, p.calc_r), (nav, p.nav_r), (cub, p.cub_r)]

    # ------------------------------------------------------------------ outline and extent
    def _extent(self) -> Tuple[np.ndarray, np.ndarray]:
        """Corners (x, y, z) mm of a box that holds every bone of the main leg and its foot."""
        s = np.array([self.sw, self.sw, self.sl])
        los, his = zip(*[g.bounds() for g in self.g.values()])
        lo, hi = np.min(los, axis=0) * s, np.max(his, axis=0) * s
        lo = np.minimum(lo, lo * 1.2) - 40.0  # foot bones, flare and pose
        return np.minimum(lo, -80.0), hi + 20.0

    def _forward_fibula(self) -> np.ndarray:
        """Fibular centreline in the anatomy frame, (n, 3) mm sorted by z."""
        p = self.p
        z = np.where(_ZTAB < 0.0, _ZTAB * p.malleolus_scale, _ZTAB)
        pts = np.stack([self.fib_c[:, 0] + p.gap_mm * self.n_lat[0],
                        self.fib_c[:, 1] + p.gap_mm * self.n_lat[1], z], axis=1)
        pts = pts * np.array([self.sw, self.sw, self.sl])
        u = self.field(*[pts[:, i].astype(np.float32) for i in range(3)])
        return pts + np.stack(u, axis=1)

    def plafond(self) -> np.ndarray:
        """The plafond centre (3,) mm in the anatomy frame: the base shapes' origin moved by the
        scaling and the smooth displacement field (so the true joint, not the frame origin)."""
        p = np.zeros(3)
        for _ in range(20):  # fixed point of p = u(p): the inverse warp maps p to the origin
            u = self.field(*[np.array([v], np.float32) for v in p])
            p = np.array([float(c[0]) for c in u])
        return p

    def fib_centre_at(self, z: float) -> np.ndarray:
        """Fibular axis point (3,) mm at anatomical height ``z``."""
        t = self.fib_tab
        return np.array([np.interp(z, t[:, 2], t[:, 0]), np.interp(z, t[:, 2], t[:, 1]), float(z)])

    def _leg_ellipse(self, x, y, z, cx, cy) -> np.ndarray:
        """Skin outline of one leg around tibial centre (cx, cy): ankle-sized below, calf above."""
        h = self.p.habitus * self.sw
        w = smoothstep(z, 30.0, 130.0)
        dx = x - (cx - 5.0 - 3.0 * w)
        dy = y - (cy + 4.0 + 6.0 * w)
        ry = np.where(dy < 0, h * (32.0 - 2.0 * w), h * (40.0 + 25.0 * w))
        return ellipse_sdf(dx, dy, h * (35.0 + 15.0 * w), ry)

    def _foot_outline(self, x, y, z) -> np.ndarray:
        """Soft-tissue outline of the hindfoot (ellipsoids around the foot bones and talus)."""
        q = self._foot_base(x / self.sw, y / self.sw, z / self.sl)
        lo, hi = self.talus_box
        d = ellipsoid_sdf(q[0] - 0.5 * (lo[0] + hi[0]), q[1] - 0.5 * (lo[1] + hi[1]),
                          q[2] - 0.5 * (lo[2] + hi[2]), tuple(0.5 * (hi - lo) + 9.0))
        for centre, radii in self.foot_parts:
            r = tuple(np.asarray(radii) + 11.0 * self.p.habitus)
            d = np.minimum(d, ellipsoid_sdf(q[0] - centre[0], q[1] - centre[1], q[2] - centre[2], r))
        if self.forefoot is not None:
            d = smin(d, ff_mod.envelope_sdf(self.forefoot, *q), 8.0)
        return d * self.scale

    def leg(self, x, y, z) -> np.ndarray:
        """Signed distance (mm) to the skin (negative inside the leg or foot)."""
        zb = z / self.sl
        cx, cy = self._centre(self.tib_c, zb)
        d = self._leg_ellipse(x, y, z, cx * self.sw, cy * self.sw)
        low = z < 25.0
        if low.any():
            d[low] = smin(d[low], self._foot_outline(x[low], y[low], z[low]), 12.0)
        d = self._cover_bones(x, y, z, d)
        if self.other is not None:
            ox, oy = self._other_centre(zb)
            d = np.minimum(d, self._leg_ellipse(x, y, z, ox, oy))
        return d.astype(np.float32)

    def _cover_box(self) -> Tuple[np.ndarray, np.ndarray]:
        """Anatomical box (lo, hi) mm of the distal tibia and fibula, grown by the cover."""
        if not hasattr(self, "_cover_box_cache"):
            s = np.array([self.sw, self.sw, self.sl])
            pad = 8.0 + 3.0 * self.p.field_mm + BONE_COVER_MM + 4.0
            los, his = zip(*(self.g[b].bounds() for b in ("tibia", "fibula")))
            lo = np.minimum(np.min(los, axis=0) * s, np.min(los, axis=0) * s * 1.2) - pad
            hi = np.max(his, axis=0) * s + pad
            hi[2] = min(hi[2], COVER_TOP_MM)
            self._cover_box_cache = (lo.astype(np.float32), hi.astype(np.float32))
        return self._cover_box_cache

    def _cover_bones(self, x, y, z, d: np.ndarray) -> np.ndarray:
        """``d`` with the skin grown to :data:`BONE_COVER_MM` around the distal tibia and
        fibula wherever they come closer to it (smooth union; only points in their box)."""
        lo, hi = self._cover_box()
        sel = np.nonzero((x > lo[0]) & (x < hi[0]) & (y > lo[1]) & (y < hi[1])
                         & (z > lo[2]) & (z < hi[2]))[0]
        if sel.size == 0:
            return d
        xs, ys, zs = x[sel], y[sel], z[sel]
        bone = np.minimum(self.fibula(xs, ys, zs), self.tibia(xs, ys, zs)) - BONE_COVER_MM
        # Above the cover's top the bones fade out of it smoothly (no step in the outline).
        bone = bone + 40.0 * smoothstep(zs, COVER_TOP_MM - 15.0, COVER_TOP_MM)
        d = d.copy()
        d[sel] = smin(d[sel], bone, 3.0)
        return d

    def _other_centre(self, zb: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        if not hasattr(self, "_other_tib_c"):
            self._other_tib_c = _fill_nan(_centreline(self.other["tibia"], _ZTAB))
        cx, cy = self._centre(self._other_tib_c, zb)
        return self.p.other_dx - cx * self.sw, self.p.other_dy + cy * self.sw

    def leg_bounds(self, z_lo: float, z_hi: float, n: int = 24) -> np.ndarray:
        """Points (m, 3) mm on the outline between heights ``z_lo`` and ``z_hi`` (grid planning)."""
        pts = []
        for z in np.linspace(z_lo, z_hi, n):
            zb = np.array([z / self.sl], np.float32)
            cx, cy = self._centre(self.tib_c, zb)
            centres = [(float(cx[0]) * self.sw, float(cy[0]) * self.sw)]
            if self.other is not None:
                ox, oy = self._other_centre(zb)
                centres.append((float(ox[0]), float(oy[0])))
            h = self.p.habitus * self.sw
            w = float(smoothstep(np.array(z), 30.0, 130.0))
            rx, ra, rp = h * (35 + 15 * w), h * (32 - 2 * w), h * (40 + 25 * w)
            for c0, c1 in centres:
                ex, ey = c0 - 5 - 3 * w, c1 + 4 + 6 * w
                pts += [(ex - rx, ey, z), (ex + rx, ey, z), (ex, ey - ra, z), (ex, ey + rp, z)]
        if z_lo < 25.0:
            pts += [tuple(q) for q in self._foot_corners() if z_lo - 5 <= q[2]]
            pts += [tuple(q) for q in self.forefoot_corners() if z_lo - 5 <= q[2] <= z_hi + 5]
        out = np.asarray(pts, float)
        out[:, 2] = np.clip(out[:, 2], z_lo, z_hi)
        return out

    def _foot_corners(self) -> np.ndarray:
        """Corners (m, 3) mm of boxes around the foot's soft tissue, in the anatomy frame."""
        boxes = [(c, np.asarray(r) + 11.0 * self.p.habitus) for c, r in self.foot_parts]
        lo, hi = self.talus_box
        boxes.append((0.5 * (lo + hi), 0.5 * (hi - lo) + 9.0))
        corners = []
        for c, r in boxes:
            for sx in (-1, 1):
                for sy in (-1, 1):
                    for sz in (-1, 1):
                        q = c + np.array([sx, sy, sz]) * r - self.ankle_centre
                        q = self.foot_rot @ q + self.ankle_centre - [0.0, 0.0, self.p.joint_extra_mm]
                        corners.append(q * np.array([self.sw, self.sw, self.sl]))
        return np.asarray(corners)

    # ------------------------------------------------------------------ landmarks
    def fracture_anchors(self) -> "FractureAnchors":
        """What :func:`~AnkleFractureLib.phantom.fractures.sample_fracture` reads of an anatomy."""
        p = self.p
        tip = _inside_box(self.g["fibula"])[0][2] * p.malleolus_scale * self.sl
        g = self.g["tibia"]
        k = int(round((-4.0 - g.origin[2]) / g.step))
        jj, ii = np.nonzero(g.sdf[k] < 0)
        xs, ys = g.origin[0] + g.step * ii, g.origin[1] + g.step * jj
        c0 = self.tib_c[np.searchsorted(_ZTAB, 0.0)]
        med = xs > c0[0]
        if not med.any():  # no malleolus at that level: a generic medial face
            xs, ys, med = np.array([c0[0] + 10.0, c0[0] + 20.0]), np.array([c0[1]] * 2), np.ones(2, bool)
        f = (1.0 + p.flare) * self.sw
        x_in, x_out = (c0[0] + (xs[med].min() - c0[0]) * f), (c0[0] + (xs[med].max() - c0[0]) * f)
        return FractureAnchors(fib_tip_depth=float(-tip), tib_meta_rx=float(x_out),
                               mm_rx=float(0.5 * (x_out - x_in)), mm_cy=float(ys[med].mean() * self.sw))


@dataclass
class FractureAnchors:
    """Anatomy values the fracture sampler needs (mm, anatomy frame).

    ``fib_tip_depth``: depth of the lateral malleolus tip below the plafond; ``tib_meta_rx``: x
    of the medial malleolus' outer face; ``mm_rx``: half its width in x; ``mm_cy``: its y.
    """

    fib_tip_depth: float
    tib_meta_rx: float
    mm_rx: float
    mm_cy: float
