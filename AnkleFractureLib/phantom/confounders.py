"""Fracture mimics on intact bone: findings that fool a reader into calling a fracture.

A case that carries confounders (``generate_case(..., confounders=P)``) gets one or more of:

* **os subfibulare** (``"os_subfibulare"``): an accessory ossicle 1-4 mm below / antero-distal
  to the lateral malleolus tip, an ellipsoid 4-9 mm across with a ~1 mm dense rim (cortex)
  around cancellous bone. It is *not* part of the fibula (label 0) and mimics a Weber A
  avulsion fragment.
* **healed fracture** (``"healed_fracture"``): a sclerotic band 1.5-4 mm thick across the
  fibula at -10..+60 mm from the plafond (bone inside it raised to 700-1100 HU, a dense plane
  where an acute fracture has a lucent gap), with a fusiform callus bump of 0.5-2 mm on the
  surface. The fibula label stays whole; the callus is fibula too.
* **nutrient canal** (``"nutrient_canal"``): a lucent channel 0.6-1.2 mm in diameter
  (20-60 HU, a vessel in a canal) running 20-45 degrees from the long axis through the
  fibular or tibial cortex at +20..+90 mm. Labels unchanged.
* **physeal scar** (``"physeal_scar"``): a thin (0.5-1 mm) dense (500-800 HU) transverse line
  across the distal tibial metaphysis (15-25 mm above the plafond) and/or the distal fibula
  (-2..+4 mm), where the growth plate was. Labels unchanged.

All geometry is in the canonical right-ankle anatomical frame (mm, LPS axes, plafond centre
at the origin; lateral is -x, anterior -y, superior +z). The renderers
(:class:`~AnkleFractureLib.phantom.imaging.Renderer`,
:class:`~AnkleFractureLib.phantom.real_render.RealRenderer`) call :class:`Confounders`' three
hooks: :meth:`Confounders.wrap_sdf` (callus), :meth:`Confounders.paint_inside` (bands and
canals, after a bone's cortex and marrow are painted; fracture fragments carry them along),
and :meth:`Confounders.paint_ossicles` (unlabelled bone). Densities are absolute HU between
the families' trabecular (170-380 HU) and cortical (1250-1900 HU) values.

Example:
    >>> import numpy as np
    >>> o = OsSubfibulare(np.zeros(3), np.array([3.0, 2.0, 2.5]), np.eye(3), 1.0, 2.0)
    >>> pts = [np.array([0.5, 4.0], np.float32), np.zeros(2, np.float32), np.zeros(2, np.float32)]
    >>> [bool(d < 0) for d in o.sdf(*pts)]  # 0.5 mm off the centre: inside; 4 mm: outside
    [True, False]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from AnkleFractureLib.phantom.anatomy import ellipsoid_sdf

#: Confounder kinds, in the order their geometry is drawn.
KINDS = ("os_subfibulare", "healed_fracture", "nutrient_canal", "physeal_scar")
#: Chance of each kind in a case chosen to carry confounders (independent; at least one).
KIND_PROBABILITY = {"os_subfibulare": 0.5, "healed_fracture": 0.5, "nutrient_canal": 0.5,
                    "physeal_scar": 0.3}

Sdf = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
Occ = Callable[[np.ndarray], np.ndarray]
Points = Tuple[np.ndarray, np.ndarray, np.ndarray]


def _unit(v: Any) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def _f32(a: np.ndarray) -> List[np.ndarray]:
    """Columns of an (n, 3) point array as float32 x, y, z arrays (what the SDFs take)."""
    return [np.ascontiguousarray(a[:, i], dtype=np.float32) for i in range(3)]


def _r(v: Any, nd: int = 3) -> List[float]:
    return [round(float(t), nd) for t in np.asarray(v).reshape(-1)]


def _lps(a2p: np.ndarray, p: np.ndarray) -> List[float]:
    a = np.asarray(a2p, dtype=float)
    return _r(a[:3, :3] @ np.asarray(p, float) + a[:3, 3])


def _placement(item: Any, a2p: np.ndarray) -> Dict[str, Any]:
    """The ``info["confounders"]`` fields every kind shares: kind, bone, centre (LPS mm and
    anatomical mm) and height above the plafond (mm)."""
    return {"kind": item.kind, "bone": item.bone, "center_lps": _lps(a2p, item.centre),
            "center_anatomical": _r(item.centre), "height_mm": round(float(item.centre[2]), 3)}


def _dir_lps(a2p: np.ndarray, v: np.ndarray) -> List[float]:
    return _r(np.asarray(a2p, float)[:3, :3] @ np.asarray(v, float), 4)


# ---------------------------------------------------------------------- the confounders
@dataclass
class OsSubfibulare:
    """Accessory ossicle below the lateral malleolus (unlabelled bone).

    Attributes:
        centre: Centre (3,) mm, anatomical frame.
        radii: Semi-axes (3,) mm (2-4.5 mm: 4-9 mm across).
        axes: 3x3 rotation whose columns are the ellipsoid's axes in the anatomical frame.
        cortex_mm: Thickness of the dense rim (mm).
        gap_mm: Clearance to the intact fibula (mm, 1-4).
    """

    centre: np.ndarray
    radii: np.ndarray
    axes: np.ndarray
    cortex_mm: float
    gap_mm: float
    kind: str = field(default="os_subfibulare", init=False)
    bone: str = field(default="none", init=False)

    def sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Signed distance (mm, approximate) to the ossicle at anatomical points."""
        c, r = self.centre, self.axes.astype(np.float32)
        dx, dy, dz = x - np.float32(c[0]), y - np.float32(c[1]), z - np.float32(c[2])
        loc = [r[0, i] * dx + r[1, i] * dy + r[2, i] * dz for i in range(3)]
        return ellipsoid_sdf(*loc, tuple(float(v) for v in self.radii)).astype(np.float32)

    def to_dict(self, a2p: np.ndarray) -> Dict[str, Any]:
        """``info["confounders"]`` entry (LPS mm and anatomical mm)."""
        return {**_placement(self, a2p),
                "radii_mm": _r(self.radii), "size_mm": _r(2.0 * self.radii),
                "axes_anatomical": _r(self.axes, 6), "cortex_mm": round(self.cortex_mm, 3),
                "gap_mm": round(self.gap_mm, 3)}


@dataclass
class DenseBand:
    """A dense plane across a bone: a healed fracture (with callus) or a physeal scar.

    Attributes:
        kind: "healed_fracture" or "physeal_scar".
        bone: "fibula" or "tibia".
        centre: Point (3,) mm on the band's mid-plane, on the bone's axis.
        normal: Unit normal (3,) of the plane.
        thickness_mm: Band thickness (mm).
        band_hu: Density (HU) the bone inside the band is raised to (never lowered).
        callus_mm: Peak thickening (mm) of the bone surface at the band (0: none), tapering
            to 0 over ``thickness_mm / 2 + 4`` mm on each side.
    """

    kind: str
    bone: str
    centre: np.ndarray
    normal: np.ndarray
    thickness_mm: float
    band_hu: float
    callus_mm: float = 0.0

    def side(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Signed distance (mm) of points from the band's mid-plane."""
        c, n = self.centre, self.normal
        c, n = c.astype(np.float32), n.astype(np.float32)
        return (x - c[0]) * n[0] + (y - c[1]) * n[1] + (z - c[2]) * n[2]

    def callus(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Outward thickening (mm) of the bone at points: a smooth fusiform bump."""
        w = 0.5 * self.thickness_mm + 4.0
        t = np.clip(1.0 - (self.side(x, y, z) / np.float32(w)) ** 2, 0.0, 1.0)
        return (np.float32(self.callus_mm) * t * t).astype(np.float32)

    def to_dict(self, a2p: np.ndarray) -> Dict[str, Any]:
        """``info["confounders"]`` entry (LPS mm and anatomical mm)."""
        return {**_placement(self, a2p),
                "normal_anatomical": _r(self.normal, 4), "normal_lps": _dir_lps(a2p, self.normal),
                "thickness_mm": round(self.thickness_mm, 3), "band_hu": round(self.band_hu, 1),
                "callus_mm": round(self.callus_mm, 3)}


@dataclass
class NutrientCanal:
    """A lucent channel through a bone's cortex (label unchanged).

    Attributes:
        bone: "fibula" or "tibia".
        start: Outer end (3,) mm, ~1 mm outside the bone surface.
        end: Inner end (3,) mm, 3-6 mm deep (measured radially).
        radius_mm: Channel radius (mm, 0.3-0.6).
        canal_hu: Content density (HU); the channel only lowers bone denser than this.
        angle_deg: Angle between the channel and the bone's long axis (degrees).
    """

    bone: str
    start: np.ndarray
    end: np.ndarray
    radius_mm: float
    canal_hu: float
    angle_deg: float
    kind: str = field(default="nutrient_canal", init=False)

    @property
    def centre(self) -> np.ndarray:
        """Midpoint of the channel (mm): in the cortex."""
        return 0.5 * (np.asarray(self.start) + np.asarray(self.end))

    def sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Signed distance (mm) to the channel (a capsule)."""
        a = np.asarray(self.start, float)
        ab = np.asarray(self.end, float) - a
        inv = np.float32(1.0 / float(ab @ ab))
        a, ab = a.astype(np.float32), ab.astype(np.float32)
        px, py, pz = x - a[0], y - a[1], z - a[2]
        t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) * inv, 0.0, 1.0)
        qx, qy, qz = px - t * ab[0], py - t * ab[1], pz - t * ab[2]
        d = np.sqrt(qx * qx + qy * qy + qz * qz) - np.float32(self.radius_mm)
        return d.astype(np.float32)

    def to_dict(self, a2p: np.ndarray) -> Dict[str, Any]:
        """``info["confounders"]`` entry (LPS mm and anatomical mm)."""
        c = self.centre
        return {"kind": self.kind, "bone": self.bone, "center_lps": _lps(a2p, c),
                "center_anatomical": _r(c), "height_mm": round(float(c[2]), 3),
                "start_lps": _lps(a2p, self.start), "end_lps": _lps(a2p, self.end),
                "start_anatomical": _r(self.start), "end_anatomical": _r(self.end),
                "diameter_mm": round(2.0 * self.radius_mm, 3),
                "angle_deg": round(self.angle_deg, 2),
                "canal_hu": round(self.canal_hu, 1)}


Confounder = Union[OsSubfibulare, DenseBand, NutrientCanal]


def confounder_from_dict(d: Dict[str, Any]) -> Confounder:
    """A confounder back from its ``info["confounders"]`` entry (anatomical fields)."""
    if d["kind"] == "os_subfibulare":
        return OsSubfibulare(np.asarray(d["center_anatomical"], float),
                             np.asarray(d["radii_mm"], float),
                             np.asarray(d["axes_anatomical"], float).reshape(3, 3),
                             float(d["cortex_mm"]), float(d["gap_mm"]))
    if d["kind"] == "nutrient_canal":
        return NutrientCanal(d["bone"], np.asarray(d["start_anatomical"], float),
                             np.asarray(d["end_anatomical"], float), 0.5 * float(d["diameter_mm"]),
                             float(d["canal_hu"]), float(d["angle_deg"]))
    return DenseBand(d["kind"], d["bone"], np.asarray(d["center_anatomical"], float),
                     _unit(d["normal_anatomical"]), float(d["thickness_mm"]), float(d["band_hu"]),
                     float(d.get("callus_mm", 0.0)))


# ---------------------------------------------------------------------- rendering hooks
@dataclass
class Confounders:
    """The confounders of one case, and the renderers' hooks that draw them.

    An empty set changes nothing: every hook returns its input untouched (so a case without
    confounders is bit-identical to one rendered before they existed).
    """

    items: List[Confounder] = field(default_factory=list)

    def _of(self, cls: type, bone: Optional[str] = None) -> List[Any]:
        return [c for c in self.items if isinstance(c, cls) and (bone is None or c.bone == bone)]

    def wrap_sdf(self, sdf: Sdf, bone: str) -> Sdf:
        """``sdf`` of ``bone`` ("tibia"/"fibula") grown by the callus of its healed fractures.

        The renderers evaluate fracture fragments through this SDF too, so a callus moves
        with its fragment and the label (``d < 0``) covers it.
        """
        bands = [b for b in self._of(DenseBand, bone) if b.callus_mm > 0]
        if not bands:
            return sdf

        def grown(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
            d = sdf(x, y, z)
            for b in bands:
                d = d - b.callus(x, y, z)
            return d

        return grown

    def paint_inside(self, hu: np.ndarray, d: np.ndarray, src: Points, bone: str, occ: Occ) -> None:
        """Dense bands and lucent canals inside ``bone``, after its cortex and marrow, in place.

        Args:
            hu: HU at the points (1-D float32), modified in place.
            d: The bone's SDF (mm) at the points.
            src: Anatomical points (x, y, z) mm where the bone's texture comes from (a
                fracture fragment's source points, so the finding moves with the fragment).
            bone: "tibia" or "fibula".
            occ: Distance (mm) -> partial-volume coverage in [0, 1].
        """
        bands, canals = self._of(DenseBand, bone), self._of(NutrientCanal, bone)
        if not bands and not canals:
            return
        inside = occ(d)
        for b in bands:
            w = occ(np.abs(b.side(*src)) - np.float32(0.5 * b.thickness_mm)) * inside
            # Raise only: the dense cortex the band crosses stays as dense as it was.
            hu += w * np.maximum(np.float32(b.band_hu) - hu, 0.0)
        for c in canals:
            w = occ(c.sdf(*src)) * inside
            # Lower only: a vessel is lucent in bone, invisible in fatty marrow.
            hu += w * np.minimum(np.float32(c.canal_hu) - hu, 0.0)

    def paint_ossicles(self, hu: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray,
                       paint_bone: Callable[[np.ndarray, np.ndarray, Points, float], None]) -> None:
        """Paint the accessory ossicles (unlabelled bone), in place.

        Args:
            hu: HU at the anatomical points (1-D float32), modified in place.
            x, y, z: Anatomical points (mm).
            paint_bone: The renderer's ``(hu, sdf, source points, cortex mm) -> None`` that
                paints a cortex and cancellous bone inside.
        """
        for o in self._of(OsSubfibulare):
            reach = float(np.max(o.radii)) + 3.0
            c = o.centre
            sel = np.nonzero((np.abs(x - c[0]) < reach) & (np.abs(y - c[1]) < reach)
                             & (np.abs(z - c[2]) < reach))[0]
            if sel.size:
                xs, ys, zs = x[sel], y[sel], z[sel]
                hs = hu[sel]
                paint_bone(hs, o.sdf(xs, ys, zs), (xs, ys, zs), o.cortex_mm)
                hu[sel] = hs

    def to_list(self, a2p: np.ndarray) -> List[Dict[str, Any]]:
        """The ``info["confounders"]`` list (centres in patient LPS mm via ``a2p``)."""
        return [c.to_dict(a2p) for c in self.items]


# ---------------------------------------------------------------------- anatomy anchors
@dataclass
class ConfounderAnchors:
    """What the sampler reads of an anatomy (either family), anatomical frame, mm.

    Attributes:
        tibia, fibula: SDFs (mm) of the intact bones.
        other_bones: SDF of the unlabelled bones an ossicle must not touch (talus, foot).
        leg: Skin SDF (an ossicle stays inside the leg).
        tib_centre_at, fib_centre_at: Height z (mm) -> approximate axis point (3,).
        fib_tip_depth: Approximate depth (mm) of the lateral malleolus tip below the plafond.
        z_range: (bottom, top) anatomical z (mm) of the scanned range.
    """

    tibia: Sdf
    fibula: Sdf
    other_bones: Sdf
    leg: Sdf
    tib_centre_at: Callable[[float], np.ndarray]
    fib_centre_at: Callable[[float], np.ndarray]
    fib_tip_depth: float
    z_range: Tuple[float, float]


def analytic_anchors(anatomy: Any, z_range: Tuple[float, float]) -> ConfounderAnchors:
    """Anchors of an analytic :class:`~AnkleFractureLib.phantom.anatomy.Anatomy`."""
    prof = anatomy.prof

    def axis(cx: np.ndarray, cy: np.ndarray) -> Callable[[float], np.ndarray]:
        return lambda z: np.array([np.interp(z, prof.z, cx), np.interp(z, prof.z, cy), float(z)])

    return ConfounderAnchors(
        anatomy.tibia, anatomy.fibula,
        lambda x, y, z: np.minimum(anatomy.talus(x, y, z), anatomy.hindfoot(x, y, z)),
        anatomy.leg, axis(prof.tib_cx, prof.tib_cy), axis(prof.fib_cx, prof.fib_cy),
        float(anatomy.p.fib_tip_depth), z_range)


def vh_anchors(anatomy: Any, fib_tip_depth: float,
               z_range: Tuple[float, float]) -> ConfounderAnchors:
    """Anchors of a real-shape :class:`~AnkleFractureLib.phantom.real_anatomy.RealAnatomy`."""

    def tib_centre_at(z: float) -> np.ndarray:
        cx, cy = anatomy._centre(anatomy.tib_c, np.array([z / anatomy.sl], np.float32))
        return np.array([float(cx[0]) * anatomy.sw, float(cy[0]) * anatomy.sw, float(z)])

    return ConfounderAnchors(
        anatomy.tibia, anatomy.fibula,
        lambda x, y, z: np.minimum(anatomy.talus(x, y, z), anatomy.foot(x, y, z)),
        anatomy.leg, tib_centre_at, anatomy.fib_centre_at, float(fib_tip_depth), z_range)


# ---------------------------------------------------------------------- geometry helpers
def _section_centre(sdf: Sdf, approx: np.ndarray, z: float, half: float = 30.0) -> np.ndarray:
    """Centroid (3,) mm of the bone ``sdf`` in the axial plane at height ``z`` near ``approx``.

    The axis tables of both families are approximate (the vh displacement field moves the
    bone by a few mm); the centroid of the actual cross-section is where a band or canal
    must be centred.
    """
    g = np.arange(-half, half + 0.25, 0.5)
    gx, gy = np.meshgrid(approx[0] + g, approx[1] + g)
    pts = np.stack([gx.ravel(), gy.ravel(), np.full(gx.size, z)], axis=1)
    inside = sdf(*_f32(pts)) < 0
    if not inside.any():
        return np.array([approx[0], approx[1], z], float)
    return pts[inside].mean(axis=0)


def _surface_distance(sdf: Sdf, centre: np.ndarray, direction: np.ndarray) -> float:
    """Distance (mm) from ``centre`` along ``direction`` to where the bone ends."""
    t = np.arange(0.0, 40.0, 0.1)
    inside = sdf(*_f32(centre[None, :] + t[:, None] * direction[None, :])) < 0
    if not inside.any():
        return 0.0
    k0 = int(np.argmax(inside))
    out = ~inside[k0:]
    return float(t[k0 + int(np.argmax(out))]) if out.any() else float(t[-1])


def _fibula_tip(an: ConfounderAnchors) -> np.ndarray:
    """The lowest point (3,) mm of the intact fibula (the lateral malleolus tip)."""
    zt = -an.fib_tip_depth
    approx = an.fib_centre_at(zt + 6.0)
    g = np.arange(-18.0, 18.1, 0.75)
    gz = np.arange(zt - 12.0, zt + 8.1, 0.75)
    gx, gy, gzz = np.meshgrid(approx[0] + g, approx[1] + g, gz, indexing="ij")
    pts = np.stack([gx.ravel(), gy.ravel(), gzz.ravel()], axis=1)
    inside = an.fibula(*_f32(pts)) < 0
    if not inside.any():
        return np.array([approx[0], approx[1], zt])
    p = pts[inside]
    return p[p[:, 2] <= p[:, 2].min() + 0.75].mean(axis=0)


def _lateral(an: ConfounderAnchors) -> np.ndarray:
    """Unit axial vector from the tibia towards the fibula (lateral)."""
    v = an.fib_centre_at(10.0) - an.tib_centre_at(10.0)
    v[2] = 0.0
    return _unit(v)


def _random_axes(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation matrix (3x3)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))[None, :]
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _shell(radii: np.ndarray, axes: np.ndarray, n: int = 96) -> np.ndarray:
    """Points (n, 3) on an ellipsoid's surface, relative to its centre (Fibonacci sphere)."""
    k = np.arange(n) + 0.5
    phi = np.arccos(1.0 - 2.0 * k / n)
    th = np.pi * (1.0 + 5.0 ** 0.5) * k
    d = np.stack([np.cos(th) * np.sin(phi), np.sin(th) * np.sin(phi), np.cos(phi)], axis=1)
    return (d * radii[None, :]) @ axes.T


def _heights(an: ConfounderAnchors, lo: float, hi: float,
             margin: float = 8.0) -> Tuple[float, float]:
    """Height range [lo, hi] (mm) clipped to the scanned range less ``margin``."""
    return max(lo, an.z_range[0] + margin), min(hi, an.z_range[1] - margin)


# ---------------------------------------------------------------------- sampling
def _place_ossicle(an: ConfounderAnchors, tip: np.ndarray, u: np.ndarray, shell: np.ndarray,
                   gap: float) -> Tuple[np.ndarray, float]:
    """Centre (3,) mm along ``tip + s u`` where the ossicle first clears the fibula by ``gap``.

    Returns the centre and a score: >= 0 when it also stays 1 mm off the talus and foot bones
    and 2 mm inside the skin (negative: by how much it misses).
    """
    steps = np.arange(0.0, 25.0, 0.25)
    cen = tip[None, :] + steps[:, None] * u[None, :]
    pts = (cen[:, None, :] + shell[None, :, :]).reshape(-1, 3)
    d_fib = an.fibula(*_f32(pts)).reshape(steps.size, -1).min(axis=1)
    ok = np.nonzero(d_fib >= gap)[0]
    k = int(ok[0]) if ok.size else steps.size - 1
    # The clearance, measured on the surface only, is exact to ~0.25 mm (the step).
    centre = cen[k]
    surf = _f32(centre[None, :] + shell)
    score = min(float(an.other_bones(*surf).min()) - 1.0, -2.0 - float(an.leg(*surf).max()))
    return centre, score if ok.size else -1e3


def _sample_ossicle(rng: np.random.Generator, an: ConfounderAnchors,
                    tip: np.ndarray) -> OsSubfibulare:
    """An os subfibulare 1-4 mm below / antero-distal to the malleolus tip ``tip`` (mm)."""
    radii = rng.uniform(2.0, 4.5, size=3)
    axes = _random_axes(rng)
    cortex = float(rng.uniform(0.8, 1.2))
    gap = float(rng.uniform(1.0, 4.0))
    shell = _shell(radii, axes)
    lateral = _lateral(an)
    best: Optional[Tuple[np.ndarray, float]] = None
    for k in range(12):  # another direction when the talus, foot or skin is in the way
        # Later tries lean medially: under a malleolus close to the skin (vh family) the
        # ossicle must tuck in under the tip rather than bulge out of the skin.
        lat = rng.uniform(-0.1 - 0.05 * k, 0.5 - 0.07 * k)
        u = _unit(np.array([0.0, -rng.uniform(0.2, 0.9), -1.0]) + lat * lateral)
        centre, score = _place_ossicle(an, tip, u, shell, gap)
        if best is None or score > best[1]:
            best = (centre, score)
        if score >= 0.0:
            break
    return OsSubfibulare(best[0], radii, axes, cortex, gap)


def _band_normal(rng: np.random.Generator, max_tilt_deg: float) -> np.ndarray:
    """Unit plane normal tilted up to ``max_tilt_deg`` from the long (z) axis."""
    tilt, az = np.deg2rad(rng.uniform(0.0, max_tilt_deg)), rng.uniform(0.0, 2.0 * np.pi)
    return np.array([np.sin(tilt) * np.cos(az), np.sin(tilt) * np.sin(az), np.cos(tilt)])


def _sample_healed(rng: np.random.Generator, an: ConfounderAnchors) -> DenseBand:
    """A healed fibular fracture: sclerotic band at -10..+60 mm with a callus bump."""
    h = float(rng.uniform(*_heights(an, -10.0, 60.0)))
    normal = _band_normal(rng, 35.0)
    thick, band_hu = float(rng.uniform(1.5, 4.0)), float(rng.uniform(700.0, 1100.0))
    # In the fibular notch (below ~40 mm) a big callus would close the syndesmotic gap.
    callus = float(rng.uniform(0.5, 2.0 if h > 40.0 else 1.2))
    centre = _section_centre(an.fibula, an.fib_centre_at(h), h, half=20.0)
    return DenseBand("healed_fracture", "fibula", centre, normal, thick, band_hu, callus)


def _sample_canal(rng: np.random.Generator, an: ConfounderAnchors) -> NutrientCanal:
    """A nutrient canal through the fibular or tibial cortex at +20..+90 mm."""
    bone = "fibula" if rng.uniform() < 0.5 else "tibia"
    h = float(rng.uniform(*_heights(an, 20.0, 90.0)))
    ang = np.deg2rad(rng.uniform(20.0, 45.0))
    up = 1.0 if rng.uniform() < 0.5 else -1.0
    radius, depth = float(rng.uniform(0.3, 0.6)), float(rng.uniform(3.0, 6.0))
    canal_hu = float(rng.uniform(20.0, 60.0))
    sdf = an.fibula if bone == "fibula" else an.tibia
    c = _section_centre(sdf, (an.fib_centre_at if bone == "fibula" else an.tib_centre_at)(h), h)
    canal = None
    for _ in range(8):  # another azimuth where the surface is concave (the fibular notch)
        az = rng.uniform(0.0, 2.0 * np.pi)
        r = np.array([np.cos(az), np.sin(az), 0.0])
        big_r = _surface_distance(sdf, c, r)
        dep = min(depth, 0.6 * big_r)  # never through the whole bone
        u = -np.sin(ang) * r + np.cos(ang) * up * np.array([0.0, 0.0, 1.0])
        start = c + (big_r + 1.0) * r
        canal = NutrientCanal(bone, start, start + u * (dep + 1.0) / np.sin(ang), radius,
                              canal_hu, float(np.rad2deg(ang)))
        # Its middle and inner end must lie in bone, or the recorded centre shows nothing.
        if (sdf(*_f32(np.stack([canal.centre, canal.end]))) < -0.3).all():
            break
    return canal


def _sample_scars(rng: np.random.Generator, an: ConfounderAnchors) -> List[DenseBand]:
    """Physeal scars: tibia (60 %), fibula (20 %) or both (20 %)."""
    u = rng.uniform()
    bones = ("tibia",) if u < 0.6 else ("fibula",) if u < 0.8 else ("tibia", "fibula")
    out = []
    for bone in ("tibia", "fibula"):  # both drawn always: a fixed use of the stream
        h = float(rng.uniform(15.0, 25.0) if bone == "tibia" else rng.uniform(-2.0, 4.0))
        normal = _band_normal(rng, 8.0)
        thick, hu = float(rng.uniform(0.5, 1.0)), float(rng.uniform(500.0, 800.0))
        if bone in bones:
            sdf, at = ((an.tibia, an.tib_centre_at) if bone == "tibia"
                       else (an.fibula, an.fib_centre_at))
            centre = _section_centre(sdf, at(h), h)
            out.append(DenseBand("physeal_scar", bone, centre, normal, thick, hu))
    return out


def _feasible(kind: str, an: ConfounderAnchors, tip: Optional[np.ndarray]) -> bool:
    """Whether ``kind`` fits in the scanned range (a vh scan may end above the malleolus tip)."""
    if kind == "os_subfibulare":
        return tip is not None and tip[2] - 15.0 > an.z_range[0] + 1.0
    lo, hi = {"healed_fracture": (-10.0, 60.0), "nutrient_canal": (20.0, 90.0),
              "physeal_scar": (15.0, 25.0)}[kind]
    lo, hi = _heights(an, lo, hi)
    return hi > lo


def sample_confounders(rng: np.random.Generator, anchors: ConfounderAnchors,
                       kinds: Sequence[str] = KINDS) -> Confounders:
    """Draw the confounders of a case chosen to carry them (at least one).

    Each kind of ``kinds`` that fits the scanned range is present with
    :data:`KIND_PROBABILITY`; if none is, one of them is picked. Every kind draws its geometry
    from its own child stream, so which other kinds are present never changes it.

    Args:
        rng: The case's confounder stream (after the presence draw).
        anchors: The anatomy (see :func:`analytic_anchors`, :func:`vh_anchors`).
        kinds: Kinds allowed (subset of :data:`KINDS`).

    Returns:
        The confounders (empty only when no allowed kind fits the scanned range).
    """
    check_kinds(kinds)
    child = rng.integers(0, 2 ** 63, size=len(KINDS))
    u = rng.uniform(size=len(KINDS))
    tip = _fibula_tip(anchors) if "os_subfibulare" in kinds else None
    ok = [k for k in KINDS if k in kinds and _feasible(k, anchors, tip)]
    chosen = [k for i, k in enumerate(KINDS) if k in ok and u[i] < KIND_PROBABILITY[k]]
    if not chosen and ok:
        chosen = [ok[int(rng.integers(len(ok)))]]
    items: List[Confounder] = []
    for i, kind in enumerate(KINDS):
        if kind not in chosen:
            continue
        r = np.random.default_rng(int(child[i]))
        if kind == "os_subfibulare":
            items.append(_sample_ossicle(r, anchors, tip))
        elif kind == "healed_fracture":
            items.append(_sample_healed(r, anchors))
        elif kind == "nutrient_canal":
            items.append(_sample_canal(r, anchors))
        else:
            items.extend(_sample_scars(r, anchors))
    return Confounders(items)


def draw_confounders(rng: np.random.Generator, probability: float, anchors: ConfounderAnchors,
                     kinds: Optional[Sequence[str]] = None) -> Confounders:
    """With chance ``probability``, :func:`sample_confounders`; else an empty set.

    The presence draw comes first, so raising ``probability`` only adds confounders to more
    cases: a case that had them keeps the same ones.
    """
    if rng.uniform() >= probability:
        return Confounders([])
    return sample_confounders(rng, anchors, KINDS if kinds is None else tuple(kinds))


def check_kinds(kinds: Optional[Sequence[str]]) -> None:
    """ValueError unless ``kinds`` is None or a non-empty subset of :data:`KINDS`."""
    if kinds is None:
        return
    if isinstance(kinds, str) or not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"confounder kinds must be a non-empty subset of {KINDS}, got {kinds!r}")


def check_probability(p: Any, name: str = "confounders") -> float:
    """``p`` as a float in [0, 1], or ValueError naming the option ``name``."""
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)) \
            or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)
