"""Randomised ankle anatomy as implicit (signed-distance) shapes in the canonical frame.

The canonical anatomical frame is that of a **right** ankle, in millimetres, with LPS axes:
x towards the patient's left (for a right ankle: *medial*), y posterior, z superior. The centre
of the tibial plafond (the apex of the distal tibial articular surface) is the origin. A left
ankle is produced later by mirroring x, so every shape here is built once, for the right side.

Every shape is a function ``f(x, y, z) -> d`` on 1-D float32 arrays of anatomical coordinates
that returns an approximate signed distance in mm (negative inside). Approximate is enough:
the distance is used for the inside test (exact sign), for cortical shells (thickness in mm)
and for partial-volume anti-aliasing over about one voxel.

Anatomical layout (right ankle, mm): the tibial metaphysis is an ellipse of about 24 x 20 mm
(x, y) radius at the plafond, flaring from a 13 x 11 mm shaft; the medial malleolus hangs
12-15 mm below the plafond at +x; the fibula lies lateral (-x) and slightly posterior (+y), in
the fibular notch 2-5 mm from the tibia, and its lateral malleolus reaches 20-28 mm below the
plafond; the talar dome sits under the plafond with a ~3 mm joint space.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import numpy as np

#: Anatomical z range (mm) that tabulated profiles cover; beyond it they are held constant.
PROFILE_Z = np.arange(-80.0, 181.0, 1.0)


# ---------------------------------------------------------------------- SDF primitives
def smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Cubic Hermite step: 0 below ``lo``, 1 above ``hi``, C1-smooth in between."""
    t = np.clip((np.asarray(x) - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum (smooth union of two SDFs), blend width ``k`` mm."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def smax(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth maximum (smooth intersection), blend width ``k`` mm."""
    return -smin(-a, -b, k)


def ellipse_sdf(dx: np.ndarray, dy: np.ndarray, rx, ry) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipse with radii ``rx``, ``ry`` (mm).

    Uses the first-order estimate k0 * (k0 - 1) / k1 (k0 = |p / r|, k1 = |p / r^2|), which is
    exact on the boundary to first order and never wildly off inside, unlike (k0 - 1) * r.
    """
    ux, uy = dx / rx, dy / ry
    k0 = np.sqrt(ux * ux + uy * uy)
    vx, vy = ux / rx, uy / ry
    k1 = np.sqrt(vx * vx + vy * vy)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def ellipsoid_sdf(dx: np.ndarray, dy: np.ndarray, dz: np.ndarray,
                  r: Tuple[float, float, float]) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned ellipsoid with radii ``r`` (mm)."""
    ux, uy, uz = dx / r[0], dy / r[1], dz / r[2]
    k0 = np.sqrt(ux * ux + uy * uy + uz * uz)
    vx, vy, vz = ux / r[0], uy / r[1], uz / r[2]
    k1 = np.sqrt(vx * vx + vy * vy + vz * vz)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


# ---------------------------------------------------------------------- parameters
@dataclass
class AnatomyParams:
    """Sampled anatomy of one right ankle (all lengths mm, densities HU).

    Field groups: ``tib_*`` tibia, ``mm_*`` medial malleolus, ``fib_*`` fibula, ``tal_*`` talus,
    ``leg_*`` skin outline, ``*_hu`` tissue densities.
    """

    tib_shaft_rx: float
    tib_shaft_ry: float
    tib_meta_rx: float
    tib_meta_ry: float
    tib_shaft_cx: float
    tib_shaft_cy: float
    tib_flare_top: float
    tib_cortex_shaft: float
    tib_cortex_meta: float
    tib_lip: float
    mm_depth: float
    mm_rx: float
    mm_ry: float
    mm_cy: float
    synd_gap: float
    notch_depth: float
    fib_shaft_r: float
    fib_mal_rx: float
    fib_mal_ry: float
    fib_mal_z: float
    fib_tip_depth: float
    fib_y0: float
    fib_x0: float
    fib_drift_x: float
    fib_drift_y: float
    fib_cortex_shaft: float
    fib_cortex_mal: float
    tal_radius: float
    joint_space: float
    tal_y: float
    tal_x_lat: float
    tal_x_med: float
    leg_x_lat0: float
    leg_x_med0: float
    leg_y_ant0: float
    leg_y_post0: float
    leg_rx_top: float
    leg_ry_top: float
    leg_cx_top: float
    leg_cy_top: float
    skin_mm: float
    fat_mm: float
    cortex_hu: float
    marrow_hu: float
    trab_hu: float
    trab_amp: float
    muscle_hu: float
    fat_hu: float
    skin_hu: float
    tendon_hu: float
    vessel_hu: float

    def to_dict(self) -> Dict[str, float]:
        """Plain JSON-serialisable dict of the parameters (floats rounded to 0.001)."""
        return {k: round(float(v), 3) for k, v in asdict(self).items()}


def sample_anatomy(rng: np.random.Generator) -> AnatomyParams:
    """Draw one plausible adult right ankle.

    Args:
        rng: Source of randomness (consumed in a fixed order, so results are reproducible).

    Returns:
        The parameters; dependent quantities (fibula position, talus width, leg outline at the
        plafond) are derived so that bones never collide and joint spaces stay 2-5 mm.
    """
    scale = _u(rng, 0.92, 1.08)  # overall body size
    tib_meta_rx = 24.0 * scale * _u(rng, 0.95, 1.05)
    tib_meta_ry = 20.0 * scale * _u(rng, 0.95, 1.05)
    synd_gap = _u(rng, 2.0, 4.5)
    notch_depth = _u(rng, 3.0, 5.0)
    fib_mal_rx = _u(rng, 7.0, 8.5) * scale
    fib_mal_ry = _u(rng, 10.0, 12.5) * scale
    fib_mal_z = _u(rng, -8.0, -4.0)
    fib_y0 = _u(rng, 5.0, 9.0) * scale
    # Radius of the fibula at z = 0, from the same profile the shape uses.
    fib_rx0 = float(np.interp(0.0, [fib_mal_z, 18.0], [fib_mal_rx, 7.0 * scale]))
    # Lateral edge of the un-notched tibial ellipse at the fibula's y; the fibula is pushed
    # into it so that, after carving the notch with the gap, the notch is notch_depth deep.
    x_edge = -tib_meta_rx * np.sqrt(max(0.0, 1.0 - (fib_y0 / tib_meta_ry) ** 2))
    fib_x0 = float(x_edge + notch_depth - fib_rx0 - synd_gap)
    mm_rx = _u(rng, 5.0, 6.5)
    joint = _u(rng, 2.6, 3.4)
    tal_x_med = tib_meta_rx - 2.0 * mm_rx + 1.0 - joint
    tal_x_lat = fib_x0 - 0.5 + fib_mal_rx + joint
    leg_x_lat0 = fib_x0 - fib_mal_rx - _u(rng, 5.0, 9.0)
    leg_x_med0 = tib_meta_rx + _u(rng, 4.0, 7.0)
    return AnatomyParams(
        tib_shaft_rx=_u(rng, 12.0, 14.0) * scale,
        tib_shaft_ry=_u(rng, 10.0, 12.0) * scale,
        tib_meta_rx=tib_meta_rx,
        tib_meta_ry=tib_meta_ry,
        tib_shaft_cx=_u(rng, -2.0, 2.0),
        tib_shaft_cy=_u(rng, -3.0, 1.0),
        tib_flare_top=_u(rng, 60.0, 80.0),
        tib_cortex_shaft=_u(rng, 2.0, 4.0),
        tib_cortex_meta=_u(rng, 0.8, 1.2),
        tib_lip=_u(rng, 3.5, 6.0),
        mm_depth=_u(rng, 12.0, 15.0),
        mm_rx=mm_rx,
        mm_ry=_u(rng, 9.0, 12.0),
        mm_cy=_u(rng, -4.0, 0.0),
        synd_gap=synd_gap,
        notch_depth=notch_depth,
        fib_shaft_r=7.0 * scale,
        fib_mal_rx=fib_mal_rx,
        fib_mal_ry=fib_mal_ry,
        fib_mal_z=fib_mal_z,
        fib_tip_depth=_u(rng, 20.0, 28.0),
        fib_y0=fib_y0,
        fib_x0=fib_x0,
        fib_drift_x=_u(rng, -6.0, -2.0),
        fib_drift_y=_u(rng, 0.0, 5.0),
        fib_cortex_shaft=_u(rng, 1.8, 2.8),
        fib_cortex_mal=_u(rng, 0.8, 1.2),
        tal_radius=_u(rng, 20.0, 24.0),
        joint_space=joint,
        tal_y=_u(rng, -1.5, 1.5),
        tal_x_lat=tal_x_lat,
        tal_x_med=tal_x_med,
        leg_x_lat0=leg_x_lat0,
        leg_x_med0=leg_x_med0,
        leg_y_ant0=-tib_meta_ry - _u(rng, 9.0, 13.0),
        leg_y_post0=tib_meta_ry + _u(rng, 20.0, 28.0),
        leg_rx_top=_u(rng, 42.0, 49.0) * scale,
        leg_ry_top=_u(rng, 44.0, 52.0) * scale,
        leg_cx_top=_u(rng, -8.0, -3.0),
        leg_cy_top=_u(rng, 14.0, 20.0),
        skin_mm=_u(rng, 1.2, 2.0),
        fat_mm=_u(rng, 3.0, 7.0),
        cortex_hu=_u(rng, 1500.0, 1800.0),
        marrow_hu=_u(rng, 0.0, 60.0),
        trab_hu=_u(rng, 260.0, 380.0),
        trab_amp=_u(rng, 60.0, 100.0),
        muscle_hu=_u(rng, 35.0, 50.0),
        fat_hu=_u(rng, -115.0, -85.0),
        skin_hu=_u(rng, 50.0, 90.0),
        tendon_hu=_u(rng, 85.0, 110.0),
        vessel_hu=_u(rng, 40.0, 60.0),
    )


# ---------------------------------------------------------------------- profiles
class Profiles:
    """z-tabulated centre lines and radii (mm) of tibia, fibula and leg, for fast lookup.

    Evaluating the smooth flare formulas on millions of voxels would dominate the runtime;
    a 1 mm table plus ``np.interp`` is exact enough (profiles vary over tens of mm).
    """

    def __init__(self, p: AnatomyParams) -> None:
        z = PROFILE_Z
        self.z = z
        # Tibia: trumpet-shaped flare, fast near the plafond (power 1.6), done at flare_top.
        s = np.clip(z / p.tib_flare_top, 0.0, 1.0)
        w = (1.0 - s) ** 1.6
        self.tib_rx = p.tib_shaft_rx + (p.tib_meta_rx - p.tib_shaft_rx) * w
        self.tib_ry = p.tib_shaft_ry + (p.tib_meta_ry - p.tib_shaft_ry) * w
        self.tib_cx = p.tib_shaft_cx * (1.0 - w)
        self.tib_cy = p.tib_shaft_cy * (1.0 - w)
        self.tib_cortex = p.tib_cortex_meta + (p.tib_cortex_shaft - p.tib_cortex_meta) * \
            smoothstep(z, 0.25 * p.tib_flare_top, 0.9 * p.tib_flare_top)
        # Fraction of trabecular (vs fatty marrow) bone inside the tibial cortex.
        self.tib_trab = 1.0 - smoothstep(z, 25.0, 65.0)
        # Fibula: straight in the notch, diverging laterally/posteriorly above the syndesmosis.
        up = smoothstep(z, 30.0, 170.0)
        self.fib_cx = p.fib_x0 + p.fib_drift_x * up + np.minimum(z, 0.0) * 0.05
        self.fib_cy = p.fib_y0 + p.fib_drift_y * up
        t = smoothstep(z, p.fib_mal_z, 18.0)
        self.fib_rx = p.fib_mal_rx + (p.fib_shaft_r - p.fib_mal_rx) * t
        self.fib_ry = p.fib_mal_ry + (p.fib_shaft_r * 1.1 - p.fib_mal_ry) * t
        self.fib_cortex = p.fib_cortex_mal + (p.fib_cortex_shaft - p.fib_cortex_mal) * \
            smoothstep(z, 5.0, 40.0)
        self.fib_trab = 1.0 - smoothstep(z, 5.0, 40.0)
        # Leg outline: ellipse through the malleoli at the ankle, widening to the calf.
        cx0 = 0.5 * (p.leg_x_lat0 + p.leg_x_med0)
        rx0 = 0.5 * (p.leg_x_med0 - p.leg_x_lat0)
        cy0 = 0.5 * (p.leg_y_ant0 + p.leg_y_post0)
        ry0 = 0.5 * (p.leg_y_post0 - p.leg_y_ant0)
        g = smoothstep(z, 15.0, 150.0)
        self.leg_cx = cx0 + (p.leg_cx_top - cx0) * g
        self.leg_cy = cy0 + (p.leg_cy_top - cy0) * g
        self.leg_rx = rx0 + (p.leg_rx_top - rx0) * g
        self.leg_ry = ry0 + (p.leg_ry_top - ry0) * g

    def at(self, name: str, z: np.ndarray) -> np.ndarray:
        """Profile ``name`` (an attribute such as ``"tib_rx"``) interpolated at heights ``z``."""
        return uniform_interp(z, float(self.z[0]), 1.0, getattr(self, name))

    def lookup(self, z: np.ndarray, *names: str) -> List[np.ndarray]:
        """Several profiles at heights ``z`` (one shared index computation)."""
        n = self.z.shape[0]
        t = np.clip(z - np.float32(self.z[0]), 0.0, n - 1.001).astype(np.float32)
        i = t.astype(np.int32)
        w = t - i
        out = []
        for name in names:
            tab = getattr(self, "_f32_" + name, None)
            if tab is None:
                tab = np.asarray(getattr(self, name), dtype=np.float32)
                setattr(self, "_f32_" + name, tab)
                setattr(self, "_d32_" + name, np.append(np.diff(tab), np.float32(0)))
            out.append(tab[i] + w * getattr(self, "_d32_" + name)[i])
        return out


def uniform_interp(z: np.ndarray, z0: float, dz: float, table: np.ndarray) -> np.ndarray:
    """Linear interpolation (float32) in a table sampled every ``dz`` from ``z0``, held at the ends.

    Much faster than ``np.interp`` on millions of points (no binary search).
    """
    n = table.shape[0]
    t = np.clip((z - np.float32(z0)) * np.float32(1.0 / dz), 0.0, n - 1.001).astype(np.float32)
    i = t.astype(np.int32)
    w = t - i
    tab = np.asarray(table, dtype=np.float32)
    lo = tab[i]
    return lo + w * (tab[np.minimum(i + 1, n - 1)] - lo)


# ---------------------------------------------------------------------- shapes
class Anatomy:
    """The implicit shapes of one (unfractured) right ankle.

    Args:
        params: Sampled parameters.
    """

    def __init__(self, params: AnatomyParams) -> None:
        self.p = params
        self.prof = Profiles(params)
        p = params
        # Talar dome: cylinder along x; the plafond is the same cylinder grown by the joint.
        self.dome_cz = -p.joint_space - p.tal_radius
        self.mm_centre = (p.tib_meta_rx - p.mm_rx + 0.5, p.mm_cy, 0.0)
        self.tal_cx = 0.5 * (p.tal_x_lat + p.tal_x_med)
        self.tal_hw = 0.5 * (p.tal_x_med - p.tal_x_lat)

    def _coronal_drop(self, x: np.ndarray) -> np.ndarray:
        """Gentle coronal convexity of the talar dome (and the matching plafond), in mm."""
        dx = np.clip(x - self.tal_cx, -self.tal_hw - 4.0, self.tal_hw + 4.0)
        return 0.006 * dx * dx

    # -- fibula ---------------------------------------------------------------------------
    def fibula(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Intact fibula SDF (mm): tabulated elliptical shaft plus an ellipsoidal malleolus tip."""
        p, pr = self.p, self.prof
        cx, cy, rx, ry = pr.lookup(z, "fib_cx", "fib_cy", "fib_rx", "fib_ry")
        shaft = ellipse_sdf(x - cx, y - cy, rx, ry)
        shaft = np.maximum(shaft, p.fib_mal_z - z)
        mx = float(np.interp(p.fib_mal_z, pr.z, pr.fib_cx))
        my = float(np.interp(p.fib_mal_z, pr.z, pr.fib_cy))
        tip = ellipsoid_sdf(x - mx, y - my, z - p.fib_mal_z,
                            (p.fib_mal_rx, p.fib_mal_ry, p.fib_tip_depth + p.fib_mal_z))
        return smin(shaft, tip, 2.0)

    # -- tibia ----------------------------------------------------------------------------
    def tibia(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Intact tibia SDF (mm): flared shaft, concave plafond, medial malleolus, fibular notch."""
        p, pr = self.p, self.prof
        cx, cy, rx, ry = pr.lookup(z, "tib_cx", "tib_cy", "tib_rx", "tib_ry")
        body = ellipse_sdf(x - cx, y - cy, rx, ry)
        rp = p.tal_radius + p.joint_space
        dy = y - p.tal_y
        dz = z - self.dome_cz + self._coronal_drop(x)
        plafond = rp - np.sqrt(dy * dy + dz * dz)  # outside the dome cylinder = bone
        body = smax(body, plafond, 1.0)
        body = smax(body, -(z + p.tib_lip), 1.5)  # anterior/posterior lips stop here
        mx, my, _ = self.mm_centre
        mal = ellipsoid_sdf(x - mx, y - my, z, (p.mm_rx, p.mm_ry, p.mm_depth))
        mal = np.maximum(mal, -x + (mx - p.mm_rx + 0.2))  # flat articular face toward talus
        body = smin(body, mal, 2.5)
        # Fibular notch: carve the fibula grown by the syndesmotic gap, only where the fibula
        # sits against the tibia (fades out 30-45 mm above the plafond).
        notch = self.fibula(x, y, z) - p.synd_gap + 30.0 * smoothstep(z, 30.0, 45.0)
        return smax(body, -notch, 1.0)

    # -- hindfoot (not labelled) ----------------------------------------------------------
    def talus(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Talus SDF (mm): dome (cylinder along x) between the malleoli, neck and head anteriorly."""
        p = self.p
        dy = y - p.tal_y
        dz = z - self.dome_cz + self._coronal_drop(x)
        body = np.sqrt(dy * dy + dz * dz) - p.tal_radius
        # Trochlea: flat medial/lateral facets (against the malleoli), slightly wider anteriorly,
        # inside a rounded axial outline, with rounded shoulders and base.
        hw = self.tal_hw - 0.08 * dy
        body = smax(body, np.abs(x - self.tal_cx) - hw, 2.5)
        body = smax(body, ellipse_sdf(x - self.tal_cx, dy + 2.0, self.tal_hw * 1.3, 24.0), 3.0)
        body = smax(body, -(z + 33.0), 5.0)
        head = ellipsoid_sdf(x - self.tal_cx - 4.0, y - p.tal_y + 27.0, z + 21.0, (11.0, 13.0, 9.0))
        return smin(body, head, 4.0)

    def hindfoot(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Calcaneus and navicular SDF (mm), the bones seen in the lowest slices."""
        p = self.p
        calc = ellipsoid_sdf(x - self.tal_cx + 2.0, y - p.tal_y - 16.0, z + 57.0, (17.0, 33.0, 19.0))
        nav = ellipsoid_sdf(x - self.tal_cx - 6.0, y - p.tal_y + 45.0, z + 23.0, (13.0, 5.5, 10.0))
        return np.minimum(calc, nav)

    # -- soft tissue ----------------------------------------------------------------------
    def leg(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Skin surface SDF (mm): tapering elliptical leg, heel pad and the start of the foot."""
        pr = self.prof
        cx, cy, rx, ry = pr.lookup(z, "leg_cx", "leg_cy", "leg_rx", "leg_ry")
        d = ellipse_sdf(x - cx, y - cy, rx, ry)
        tx = self.tal_cx
        heel = ellipsoid_sdf(x - tx + 2.0, y - self.p.tal_y - 18.0, z + 60.0, (29.0, 44.0, 32.0))
        foot = ellipsoid_sdf(x - tx - 4.0, y - self.p.tal_y + 45.0, z + 58.0, (36.0, 70.0, 30.0))
        return smin(smin(d, heel, 8.0), foot, 10.0)

    def leg_bounds(self, z_lo: float, z_hi: float, n: int = 24) -> np.ndarray:
        """Points (N, 3) on the leg outline between ``z_lo`` and ``z_hi`` (foot excluded).

        Used to choose an image grid that holds the leg cross-section; the forefoot is allowed
        to leave the field of view in the lowest slices, as in a real leg-centred ankle scan.
        """
        pr = self.prof
        out: List[np.ndarray] = []
        ang = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
        for z in np.linspace(z_lo, z_hi, n):
            cx, cy = np.interp(z, pr.z, pr.leg_cx), np.interp(z, pr.z, pr.leg_cy)
            rx, ry = np.interp(z, pr.z, pr.leg_rx), np.interp(z, pr.z, pr.leg_ry)
            out.append(np.stack([cx + rx * np.cos(ang), cy + ry * np.sin(ang),
                                 np.full_like(ang, z)], axis=1))
        return np.concatenate(out)

    def tubes(self) -> List["Tube"]:
        """Tendons and vessels as tubes along z-monotonic poly-lines (right-ankle frame)."""
        p, pr = self.p, self.prof

        def fib(z: float) -> Tuple[float, float]:
            return float(np.interp(z, pr.z, pr.fib_cx)), float(np.interp(z, pr.z, pr.fib_cy))

        def leg(z: float) -> Tuple[float, float, float, float]:
            return tuple(float(np.interp(z, pr.z, getattr(pr, n)))  # type: ignore[return-value]
                         for n in ("leg_cx", "leg_cy", "leg_rx", "leg_ry"))

        inset = p.skin_mm + p.fat_mm
        tubes: List[Tube] = []
        # Achilles tendon: flat, just under the posterior fat, inserting on the calcaneus.
        pts = []
        for z in (150.0, 100.0, 60.0, 20.0, 0.0, -20.0, -38.0):
            cx, cy, _, ry = leg(z)
            pts.append((cx + 2.0, cy + ry - inset - 4.5, z))
        tubes.append(Tube("achilles", pts, (8.0, 3.5), p.tendon_hu))
        # Peroneal tendons (longus, brevis) behind the lateral malleolus, turning forward.
        tip = -p.fib_tip_depth
        for name, dx, dy, r in (("peroneus_brevis", 1.5, 2.5, 2.2), ("peroneus_longus", -2.0, 5.0, 2.5)):
            pts = []
            for z in (150.0, 60.0, 20.0, 0.0, tip + 6.0):
                fx, fy = fib(z)
                pts.append((fx + dx, fy + float(np.interp(z, pr.z, pr.fib_ry)) + dy, z))
            fx, fy = fib(tip)
            pts.append((fx + dx - 2.0, fy - 6.0, tip - 8.0))
            pts.append((fx + dx - 1.0, fy - 30.0, tip - 25.0))
            tubes.append(Tube(name, pts, (r, r * 1.2), p.tendon_hu))
        # Tibialis posterior and flexor digitorum longus behind the medial malleolus.
        mx, my, _ = self.mm_centre
        for name, dx, dy, r in (("tibialis_posterior", -2.0, 3.0, 2.8), ("fdl", -6.0, 7.0, 2.0)):
            pts = [(2.0 + dx, 16.0 + dy, 150.0), (mx + dx - 3.0, my + p.mm_ry + dy, 10.0),
                   (mx + dx + 1.0, my + p.mm_ry + dy - 3.0, -10.0),
                   (mx + dx + 4.0, my - 8.0, -30.0), (mx + dx + 4.0, my - 30.0, -45.0)]
            tubes.append(Tube(name, pts, (r, r), p.tendon_hu))
        # Anterior compartment tendons: tibialis anterior, extensor hallucis, extensor digitorum.
        for name, x0, r in (("tibialis_anterior", 8.0, 3.2), ("ehl", -2.0, 2.0), ("edl", -12.0, 2.4)):
            pts = []
            for z in (150.0, 60.0, 20.0, 0.0):
                _, cy, _, ry = leg(z)
                pts.append((x0 + 0.1 * z * (x0 < 0), cy - ry + inset + r + 2.0, z))
            pts.append((x0 + (4.0 if x0 > 0 else 0.0), -p.tib_meta_ry - 14.0, -25.0))
            tubes.append(Tube(name, pts, (r, r * 0.8), p.tendon_hu))
        # Vessels: posterior tibial artery + vein, anterior tibial artery, saphenous veins.
        pts = [(0.0, 20.0, 150.0), (mx - 9.0, my + p.mm_ry + 9.0, 10.0), (mx - 4.0, my + 4.0, -30.0)]
        tubes.append(Tube("posterior_tibial_artery", pts, (1.6, 1.6), p.vessel_hu))
        tubes.append(Tube("posterior_tibial_vein",
                          [(a + 2.5, b + 2.0, c) for a, b, c in pts], (2.2, 1.8), p.vessel_hu - 5.0))
        pts = [(-3.0, -p.tib_shaft_ry - 6.0, 150.0), (0.0, -p.tib_meta_ry - 6.0, 10.0),
               (2.0, -p.tib_meta_ry - 12.0, -30.0)]
        tubes.append(Tube("anterior_tibial_artery", pts, (1.4, 1.4), p.vessel_hu))
        pts = []
        for z in (150.0, 60.0, 20.0, 0.0, -15.0):
            cx, cy, rx, _ = leg(z)
            pts.append((cx + rx - p.skin_mm - 0.5 * p.fat_mm - 1.0, cy - 0.35 * rx, z))
        tubes.append(Tube("great_saphenous_vein", pts, (1.8, 1.8), p.vessel_hu))
        pts = []
        for z in (150.0, 60.0, 20.0, 0.0, -15.0):
            cx, cy, rx, ry = leg(z)
            pts.append((cx - 0.45 * rx, cy + 0.8 * ry, z))
        tubes.append(Tube("small_saphenous_vein", pts, (1.5, 1.5), p.vessel_hu))
        return tubes


class Tube:
    """A tube of elliptical cross-section (radii in mm) along a poly-line sorted by z.

    The distance is measured in the axial (x, y) plane at each z, which is accurate for the
    nearly vertical tendons and vessels of the distal leg.
    """

    def __init__(self, name: str, points, radii: Tuple[float, float], hu: float) -> None:
        pts = np.asarray(sorted(points, key=lambda q: q[2]), dtype=float)
        self.name = name
        self.z = pts[:, 2]
        self.x = pts[:, 0]
        self.y = pts[:, 1]
        # Centre line resampled every 0.5 mm of z for fast uniform interpolation.
        self._zt = np.arange(self.z[0], self.z[-1] + 0.5, 0.5)
        self._xt = np.interp(self._zt, self.z, self.x)
        self._yt = np.interp(self._zt, self.z, self.y)
        self.radii = radii
        self.hu = float(hu)
        pad = max(radii) + 2.0
        self.box = (self.x.min() - pad, self.x.max() + pad, self.y.min() - pad, self.y.max() + pad,
                    self.z.min(), self.z.max())

    def sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Approximate signed distance (mm); far outside beyond the poly-line's z range."""
        cx = uniform_interp(z, float(self._zt[0]), 0.5, self._xt)
        cy = uniform_interp(z, float(self._zt[0]), 0.5, self._yt)
        d = ellipse_sdf(x - cx, y - cy, self.radii[0], self.radii[1])
        return np.maximum(d, np.maximum(self.z[0] - z, z - self.z[-1]))
