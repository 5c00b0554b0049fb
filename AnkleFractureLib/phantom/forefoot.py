"""Forefoot distractor bones of the real-shape ("vh") phantom family (opt-in).

A real foot CT holds more than the hindfoot: the three cuneiforms, the five metatarsals and the
phalanges. A network that never saw them labels the metatarsal shafts (thin tubes of cortex
with fatty marrow, 6-12 mm wide) as tibia or fibula, above all in a strongly plantarflexed foot
(a cadaver or a relaxed foot), where axial slices below the malleoli cut them as rows of small
rings. This module draws and shapes them; they are unlabelled (label 0).

Shapes (all in the **base talus frame** of :class:`~AnkleFractureLib.phantom.real_anatomy.
RealAnatomy`: mm, x medial for a right foot, y posterior, z superior, neutral foot; the foot
pose rotation and the anatomy's scaling move them with the talus):

* **cuneiforms** I-III: ellipsoids in a row across the navicular's anterior face (widths
  9-16 mm, lengths 14-25 mm, heights 18-32 mm), 1.5 mm joint spaces; the cuboid is refitted
  (lateral of cuneiform III, reaching 6 mm behind its front) to carry metatarsals IV and V;
* **metatarsals** I-V: a shaft (capsule, 9.6-12 mm wide for the first, 6-8.6 mm for the others,
  cortex 1-2 mm over fatty marrow in the middle 40 %, 0.8 mm over cancellous bone at the
  ends), a tall base (ellipsoid) on its cuneiform or the cuboid and a round head; 47-68 mm
  from base to head centre, fanned (yaw +6 to -11 degrees, +-2) and declined towards the sole
  (3-30 degrees) so that the heads rest near the plantar level of the calcaneus;
* **proximal phalanges** I-V: smaller tubes of the same make beyond the heads (15-31 mm).

Sizes are then multiplied by a per-case factor 0.92-1.08 (and by the anatomy's scaling).
The soft tissue (:func:`envelope_sdf`) pads each ray by 7 mm x habitus.

Every signed distance function takes 1-D float32 arrays ``x, y, z`` (mm, base frame) and is
negative inside; volumes elsewhere in the project are numpy arrays in (z, y, x) order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from AnkleFractureLib.phantom.anatomy import ellipsoid_sdf, smin, smoothstep

#: Joint space (mm) kept between forefoot bones and between them and the navicular/cuboid.
JOINT_MM = 1.5
#: Share of the forefoot cases drawn with a strongly plantarflexed foot, and its range (deg).
STRONG_SHARE = 0.4
STRONG_DEG = (40.0, 68.0)

Ellipsoid = Tuple[np.ndarray, Tuple[float, float, float]]


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


@dataclass
class LongBone:
    """A metatarsal or phalanx: shaft capsule from ``base`` to ``head`` (mm, base frame),
    shaft radius ``r_shaft``, base ellipsoid radii ``r_base`` (x, y, z), head sphere ``r_head``,
    shaft cortex ``cortex_mm`` (0.8 mm at the ends, where the bone is cancellous)."""

    name: str
    base: np.ndarray
    head: np.ndarray
    r_shaft: float
    r_base: Tuple[float, float, float]
    r_head: float
    cortex_mm: float

    @property
    def length(self) -> float:
        """Base centre to head centre, mm."""
        return float(np.linalg.norm(self.head - self.base))

    def box(self, pad: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
        """(lo, hi) corners (x, y, z) mm of a box around the bone, grown by ``pad``."""
        r = max(max(self.r_base), self.r_head, self.r_shaft) + pad
        return np.minimum(self.base, self.head) - r, np.maximum(self.base, self.head) + r

    def sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(signed distance mm, axial position t in [0, 1] from base to head) at points."""
        ab = (self.head - self.base).astype(np.float32)
        px, py, pz = x - self.base[0], y - self.base[1], z - self.base[2]
        t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / float(ab @ ab), 0.0, 1.0)
        shaft = np.sqrt((px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2)
        d = smin(shaft - self.r_shaft, ellipsoid_sdf(px, py, pz, self.r_base), 3.0)
        hx, hy, hz = x - self.head[0], y - self.head[1], z - self.head[2]
        d = smin(d, np.sqrt(hx * hx + hy * hy + hz * hz) - self.r_head, 3.0)
        return d.astype(np.float32), t.astype(np.float32)

    def profile(self, t: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(cortex mm, trabecular fraction) along the bone: thick cortex and fatty marrow in
        the shaft (t 0.3-0.7), thin cortex over cancellous bone at the base and head."""
        w = smoothstep(t, 0.12, 0.3) * (1.0 - smoothstep(t, 0.7, 0.88))
        return (0.8 + (self.cortex_mm - 0.8) * w).astype(np.float32), (1.0 - w).astype(np.float32)


@dataclass
class Forefoot:
    """One case's forefoot: cuneiforms, metatarsals, proximal phalanges (base frame, mm).

    ``plantarflexion_deg`` is the foot pose of the case (positive: plantarflexion) and
    ``strong`` whether it was drawn in the strong range; ``texture_seed`` seeds the
    trabecular texture lattice of the forefoot; ``pad_mm`` is the soft tissue around it.
    """

    cuneiforms: List[Ellipsoid]
    metatarsals: List[LongBone]
    phalanges: List[LongBone]
    plantarflexion_deg: float
    strong: bool
    texture_seed: int
    pad_mm: float
    cuboid: Optional[Ellipsoid] = None
    _env_box: Optional[Tuple[np.ndarray, np.ndarray]] = field(default=None, repr=False,
                                                              compare=False)

    def envelope_box(self, grow_mm: float = 25.0) -> Tuple[np.ndarray, np.ndarray]:
        """(lo, hi) corners (x, y, z) mm, base frame, of a box holding the soft tissue grown by
        ``grow_mm`` (25 mm: room for a cast around it); computed once."""
        if self._env_box is None:
            pts = outline_points(self)
            self._env_box = (pts.min(axis=0) - grow_mm, pts.max(axis=0) + grow_mm)
        return self._env_box

    @property
    def long_bones(self) -> List[LongBone]:
        return self.metatarsals + self.phalanges

    def to_info(self) -> Dict[str, Any]:
        """JSON-friendly summary (base-frame mm, rounded)."""
        def mt(b: LongBone) -> Dict[str, Any]:
            return {"name": b.name, "length_mm": round(b.length, 2),
                    "shaft_diameter_mm": round(2.0 * b.r_shaft, 2),
                    "cortex_mm": round(b.cortex_mm, 2)}

        return {"present": True, "plantarflexion_deg": round(self.plantarflexion_deg, 2),
                "strong_plantarflexion": bool(self.strong),
                "n_cuneiforms": len(self.cuneiforms), "n_metatarsals": len(self.metatarsals),
                "n_phalanges": len(self.phalanges),
                "metatarsals": [mt(b) for b in self.metatarsals]}


def check_probability(p: Any) -> float:
    """``p`` as a float in [0, 1], or ValueError."""
    from AnkleFractureLib.phantom.confounders import check_probability as check

    return check(p, "forefoot")


# ---------------------------------------------------------------------- sampling
def sample_cuneiforms(rng: np.random.Generator, nav: Ellipsoid, f: float) -> List[Ellipsoid]:
    """Cuneiforms I (medial), II, III as ellipsoids in a row in front of the navicular ``nav``
    (centre, radii; base frame mm); ``f`` scales their sizes."""
    c, r = np.asarray(nav[0], float), nav[1]
    w = [_u(rng, 13.0, 16.0) * f, _u(rng, 9.0, 11.0) * f, _u(rng, 10.0, 13.0) * f]
    ln = [_u(rng, 20.0, 25.0) * f, _u(rng, 14.0, 17.0) * f, _u(rng, 17.0, 21.0) * f]
    ht = [_u(rng, 26.0, 32.0) * f, _u(rng, 18.0, 22.0) * f, _u(rng, 19.0, 23.0) * f]
    dz = (-4.0, 1.0, -5.0)
    x = c[0] + 2.0 + 0.5 * (sum(w) + 2 * JOINT_MM) - 0.5 * w[0]
    out = []
    for i in range(3):
        if i:
            x -= 0.5 * w[i - 1] + JOINT_MM + 0.5 * w[i]
        y = c[1] - r[1] - JOINT_MM - 0.5 * ln[i]
        out.append((np.array([x, y, c[2] + dz[i]]), (0.5 * w[i], 0.5 * ln[i], 0.5 * ht[i])))
    return out


def fit_cuboid(cub: Ellipsoid, cune: List[Ellipsoid]) -> Ellipsoid:
    """The cuboid reshaped to meet the forefoot: lateral of cuneiform III (1.5 mm joint), its
    anterior face 6 mm behind that cuneiform's, posterior face kept (base frame mm)."""
    c, r = np.asarray(cub[0], float), cub[1]
    c3, r3 = cune[2]
    rx = min(float(r[0]), 11.5)
    post = c[1] + r[1]
    front = c3[1] - r3[1] + 6.0
    ry = max(0.5 * (post - front), float(r[1]))
    x = min(float(c[0]), c3[0] - r3[0] - JOINT_MM - rx)
    return np.array([x, post - ry, c[2]]), (rx, ry, float(r[2]))


def _direction(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """Unit vector pointing anteriorly (-y), ``yaw`` towards medial (+x), ``pitch`` down (-z)."""
    a, b = np.deg2rad(yaw_deg), np.deg2rad(pitch_deg)
    return np.array([np.sin(a) * np.cos(b), -np.cos(a) * np.cos(b), -np.sin(b)])


def sample_metatarsals(rng: np.random.Generator, cune: List[Ellipsoid], cub: Ellipsoid,
                       sole_z: float, f: float) -> List[LongBone]:
    """Metatarsals I-V: bases on cuneiforms I-III and the cuboid ``cub``, heads near the
    plantar level ``sole_z`` (base frame mm), in a fan; ``f`` scales their sizes."""
    length = [(47, 54), (60, 68), (57, 64), (54, 61), (53, 60)]
    yaw = [6.0, 2.0, -2.0, -6.0, -11.0]
    cc, cr = cub
    out: List[LongBone] = []
    x_lat = cune[2][0][0] - cune[2][1][0]
    for i in range(5):
        rs = (_u(rng, 4.8, 6.0) if i == 0 else _u(rng, 3.0, 4.2 if i < 4 else 4.3)) * f
        rb = (1.25 * rs, 1.2 * rs, 1.7 * rs)
        if i < 3:
            c, r = cune[i]
            base = np.array([c[0], c[1] - r[1] - JOINT_MM - rb[1], c[2] + (1.0 if i else -1.0)])
        else:
            x = x_lat - JOINT_MM - rb[0] if i == 3 else out[3].base[0] - out[3].r_base[0] - JOINT_MM - rb[0]
            base = np.array([x, cc[1] - cr[1] - JOINT_MM - rb[1], cc[2] + (3.0 if i == 3 else -1.0)])
        ln = _u(rng, *length[i]) * f
        rh = (1.45 if i == 0 else 1.35) * rs
        drop = base[2] - (sole_z + rh + 2.0)
        pitch = float(np.clip(np.rad2deg(np.arcsin(np.clip(drop / ln, -1, 1))), 3.0, 30.0))
        u = _direction(yaw[i] + _u(rng, -2.0, 2.0), pitch + _u(rng, -3.0, 3.0))
        cortex = _u(rng, 1.0, 1.8) + (0.2 if i == 0 else 0.0)
        out.append(LongBone(f"metatarsal_{'I II III IV V'.split()[i]}", base, base + ln * u,
                            rs, rb, rh, cortex))
    return out


def sample_phalanges(rng: np.random.Generator, mts: Sequence[LongBone], f: float) -> List[LongBone]:
    """Proximal phalanges beyond the metatarsal heads, pointing anteriorly and slightly up."""
    out = []
    for i, m in enumerate(mts):
        rs = (_u(rng, 3.8, 4.5) if i == 0 else _u(rng, 2.2, 2.8)) * f
        ln = (_u(rng, 26.0, 31.0) if i == 0 else _u(rng, 15.0, 19.0) if i == 4
              else _u(rng, 18.0, 24.0)) * f
        d = m.head - m.base
        yaw = float(np.rad2deg(np.arctan2(d[0], -d[1])))
        u = _direction(yaw, -_u(rng, 5.0, 15.0))
        rb = (1.4 * rs, 1.1 * rs, 1.3 * rs)
        base = m.head + u * (m.r_head + JOINT_MM + rb[1])
        out.append(LongBone(f"phalanx_{'I II III IV V'.split()[i]}", base, base + ln * u,
                            rs, rb, 1.15 * rs, _u(rng, 0.8, 1.2)))
    return out


def sample_forefoot(rng: np.random.Generator, nav: Ellipsoid, cub: Ellipsoid, sole_z: float,
                    foot_deg: float, habitus: float) -> Forefoot:
    """Draw a forefoot around the navicular ``nav`` and cuboid ``cub`` (centre, radii; base
    frame mm). ``sole_z`` is the plantar level of the calcaneus (base z, mm); ``foot_deg`` the
    pose drawn without a forefoot, replaced by 40-68 degrees of plantarflexion in
    :data:`STRONG_SHARE` of the cases; ``habitus`` scales the soft tissue."""
    strong = bool(rng.uniform() < STRONG_SHARE)
    deg = _u(rng, *STRONG_DEG) if strong else float(foot_deg)
    f = _u(rng, 0.92, 1.08)
    cune = sample_cuneiforms(rng, nav, f)
    cuboid = fit_cuboid(cub, cune)
    mts = sample_metatarsals(rng, cune, cuboid, sole_z, f)
    phal = sample_phalanges(rng, mts, f)
    seed = int(rng.integers(0, 2 ** 31 - 1))
    return Forefoot(cune, mts, phal, deg, strong, seed, 7.0 * habitus, cuboid)


# ---------------------------------------------------------------------- shapes
def _in_box(x, y, z, box) -> np.ndarray:
    lo, hi = box
    return np.nonzero((x > lo[0]) & (x < hi[0]) & (y > lo[1]) & (y < hi[1])
                      & (z > lo[2]) & (z < hi[2]))[0]


def bones_sdf(ff: Forefoot, x: np.ndarray, y: np.ndarray, z: np.ndarray,
              neighbours: Sequence[Ellipsoid] = ()) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signed distance mm, cortex mm, trabecular fraction) of the forefoot bones at base-frame
    points (1-D float32). Each bone is evaluated only inside its own box; bones closer than
    :data:`JOINT_MM` to another bone or to a ``neighbours`` ellipsoid (navicular, cuboid) are
    carved back, so every bone stays a separate piece."""
    n = x.shape[0]
    cune = [("e", c) for c in ff.cuneiforms]
    parts = cune + [("l", b) for b in ff.long_bones]
    dist = np.full((len(parts), n), 1e3, np.float32)
    cortex = np.full((len(parts), n), 1.0, np.float32)
    trab = np.ones((len(parts), n), np.float32)
    for i, (kind, p) in enumerate(parts):
        box = p.box(4.0) if kind == "l" else (p[0] - np.asarray(p[1]) - 4.0, p[0] + np.asarray(p[1]) + 4.0)
        sel = _in_box(x, y, z, box)
        if not sel.size:
            continue
        xs, ys, zs = x[sel], y[sel], z[sel]
        if kind == "e":
            dist[i, sel] = ellipsoid_sdf(xs - p[0][0], ys - p[0][1], zs - p[0][2], p[1])
        else:
            dist[i, sel], t = p.sdf(xs, ys, zs)
            cortex[i, sel], trab[i, sel] = p.profile(t)
    near = np.argmin(dist, axis=0)
    cols = np.arange(n)
    d1 = dist[near, cols]
    dist[near, cols] = 1e3
    other = dist.min(axis=0)
    for c, r in neighbours:
        other = np.minimum(other, ellipsoid_sdf(x - c[0], y - c[1], z - c[2], r))
    d = np.maximum(d1, JOINT_MM - other)
    return d.astype(np.float32), cortex[near, cols], trab[near, cols]


def envelope_sdf(ff: Forefoot, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Signed distance (mm) to the forefoot's soft-tissue outline (base frame): capsules around
    each ray (metatarsal and phalanx) and the cuneiforms, blended into one foot; 1e3 outside
    :meth:`Forefoot.envelope_box` (evaluated only inside it)."""
    out = np.full(x.shape, 1e3, np.float32)
    sel = _in_box(x, y, z, ff.envelope_box())
    if sel.size:
        out[sel] = _envelope(ff, x[sel], y[sel], z[sel])
    return out


def _envelope(ff: Forefoot, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    pad = ff.pad_mm
    d = np.full(x.shape, 1e3, np.float32)
    for c, r in ff.cuneiforms:
        d = np.minimum(d, ellipsoid_sdf(x - c[0], y - c[1], z - c[2], tuple(np.asarray(r) + pad)))
    for m, p in zip(ff.metatarsals, ff.phalanges):
        for a, b, rad in ((m.base, m.head, max(m.r_base[2], m.r_head) + pad),
                          (m.head, p.head, m.r_head + 0.6 * pad)):
            ab = b - a
            px, py, pz = x - a[0], y - a[1], z - a[2]
            t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / float(ab @ ab), 0.0, 1.0)
            e = np.sqrt((px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2) - rad
            d = smin(d, e.astype(np.float32), 6.0)
    return d.astype(np.float32)


def outline_points(ff: Forefoot, n: int = 12) -> np.ndarray:
    """Points (m, 3) mm in the base frame that bound the forefoot's soft tissue: along each
    ray and around each cuneiform, offset by the bone radius plus the padding in 6 directions."""
    pts = []
    offs = np.vstack([np.eye(3), -np.eye(3)])
    for c, r in ff.cuneiforms:
        pts.append(c + offs * (np.asarray(r) + ff.pad_mm))
    for b in ff.long_bones:
        rad = max(max(b.r_base), b.r_head) + ff.pad_mm + 2.0
        for t in np.linspace(0.0, 1.0, n):
            pts.append(b.base + t * (b.head - b.base) + offs * rad)
    return np.vstack(pts)
