"""Danis-Weber fibular fractures (and the optional medial malleolus fracture) as implicit cuts.

All coordinates are in the canonical right-ankle anatomical frame (mm, LPS axes, plafond
centre at the origin; lateral is -x). A fracture is a plane through a centre ``c`` with a unit
normal ``n`` pointing to the proximal (parent) side. The distal fragment is moved rigidly::

    p_moved = R @ (p - c) + c + t

and its shape at a point ``p`` is the intact bone evaluated at the inverse-moved point
``q = R.T @ (p - c - t) + c``, kept where ``n . (q - c) < -gap / 2``; the proximal part keeps
the points with ``n . (p - c) > gap / 2``. The gap between them is haematoma.

Weber levels (height of ``c`` above the plafond):

* **A**: infra-syndesmotic, 3-20 mm below the plafond, nearly transverse;
* **B**: trans-syndesmotic, 0-25 mm above, oblique from antero-inferior to postero-superior;
* **C**: supra-syndesmotic, 35-100 mm above, oblique or transverse, with the distal fibula
  shifted laterally 2-5 mm (tibiofibular widening).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import numpy as np

from AnkleFractureLib.phantom.anatomy import AnatomyParams

#: The Danis-Weber classes the phantom can produce ("none" = intact fibula).
WEBER_CLASSES = ("none", "A", "B", "C")

#: How a fracture's faces are drawn: "raw" (the cut exposes cancellous bone or marrow, as in an
#: acute fracture, whose margins carry no cortex) or "corticated" (a cortex on every face, as
#: the renderers drew before 2026-12: a hairline then shows as a dense band of two cortical
#: plates, the look of a healed fracture; kept to reproduce the earlier datasets).
FACES = ("corticated", "raw")

#: Height range (mm, relative to the plafond) of the fibular fracture centre per class.
WEBER_HEIGHT_MM = {"A": (-20.0, -3.0), "B": (0.0, 25.0), "C": (35.0, 100.0)}

#: Reach (mm, along ``bend_dir``) of a curved fracture surface's bend (see :class:`PlaneCut`).
BEND_REACH_MM = 10.0

Sdf = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def rotation_matrix(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Right-handed rotation (3x3) of ``degrees`` about ``axis`` (Rodrigues)."""
    k = _unit(axis)
    a = np.deg2rad(degrees)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(a) * kx + (1 - np.cos(a)) * (kx @ kx)


@dataclass
class PlaneCut:
    """A fracture: plane cut plus rigid motion of the distal fragment.

    Attributes:
        centre: Point on the fracture plane (mm, anatomical frame).
        normal: Unit normal pointing to the parent (proximal) side.
        gap_mm: Width of the fracture gap (mm).
        rotation: 3x3 rotation of the fragment about ``centre``.
        translation: Fragment translation (mm).
        wedge_x: If not None, the fragment is also limited to ``x > wedge_x`` (used for the
            medial malleolus, so that the cut does not reach the lateral plafond).
        bend: Curvature (1/mm) of the fracture surface along ``bend_dir``: the surface is
            ``n . d + bend / 2 * clip(u . d, +-BEND_REACH_MM)^2 = 0`` with ``d = p - c``, a
            gently curved (spiral-like) line instead of a plane. 0 = plane.
        bend_dir: Unit vector ``u`` in the plane (None = no bend).
    """

    centre: np.ndarray
    normal: np.ndarray
    gap_mm: float
    rotation: np.ndarray
    translation: np.ndarray
    wedge_x: Optional[float] = None
    bend: float = 0.0
    bend_dir: Optional[np.ndarray] = None

    def side(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Signed distance (mm) to the fragment boundary: negative on the fragment side."""
        c, n = self.centre, self.normal
        s = (x - c[0]) * n[0] + (y - c[1]) * n[1] + (z - c[2]) * n[2]
        if self.bend and self.bend_dir is not None:
            u = self.bend_dir
            t = (x - c[0]) * u[0] + (y - c[1]) * u[1] + (z - c[2]) * u[2]
            # Clipped at BEND_REACH_MM (about the fibula's half width): an unbounded parabola
            # would come back and cut the shaft a second time a few cm away.
            t = np.clip(t, -BEND_REACH_MM, BEND_REACH_MM)
            s = s + np.float32(0.5 * self.bend) * t * t
        if self.wedge_x is not None:
            s = np.maximum(s, self.wedge_x - x)
        return s.astype(np.float32)

    def inverse_points(self, x: np.ndarray, y: np.ndarray, z: np.ndarray):
        """Where a fragment point now at (x, y, z) came from (inverse rigid motion)."""
        c, t, r = self.centre, self.translation, self.rotation
        dx, dy, dz = x - (c[0] + t[0]), y - (c[1] + t[1]), z - (c[2] + t[2])
        rt = r.T.astype(np.float32)
        qx = rt[0, 0] * dx + rt[0, 1] * dy + rt[0, 2] * dz + np.float32(c[0])
        qy = rt[1, 0] * dx + rt[1, 1] * dy + rt[1, 2] * dz + np.float32(c[1])
        qz = rt[2, 0] * dx + rt[2, 1] * dy + rt[2, 2] * dz + np.float32(c[2])
        return qx, qy, qz

    def parent(self, sdf: Sdf, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """SDF (mm) of the parent part of the bone ``sdf`` (half the gap removed)."""
        return np.maximum(sdf(x, y, z), 0.5 * self.gap_mm - self.side(x, y, z))

    def fragment(self, sdf: Sdf, x: np.ndarray, y: np.ndarray, z: np.ndarray):
        """SDF (mm) of the displaced fragment and the source points (for moving texture)."""
        qx, qy, qz = self.inverse_points(x, y, z)
        d = np.maximum(sdf(qx, qy, qz), self.side(qx, qy, qz) + 0.5 * self.gap_mm)
        return d, (qx, qy, qz)

    def to_dict(self, anatomy_to_patient: np.ndarray,
                plafond: Optional[np.ndarray] = None) -> Dict[str, Any]:
        """JSON-friendly description (anatomical mm, plus the centre in patient LPS mm).

        ``height_mm`` is the centre's height above ``plafond`` (anatomy frame (3,) mm; the
        frame's origin when None), along the frame's z (the tibial long axis).
        """
        a = np.asarray(anatomy_to_patient, dtype=float)
        base = 0.0 if plafond is None else float(np.asarray(plafond, float).reshape(3)[2])
        lps = a[:3, :3] @ self.centre + a[:3, 3]
        ang = float(np.degrees(np.arccos(np.clip((np.trace(self.rotation) - 1) / 2, -1, 1))))
        return {
            "centre_anatomical": [round(float(v), 3) for v in self.centre],
            "centre_lps": [round(float(v), 3) for v in lps],
            "height_mm": round(float(self.centre[2]) - base, 3),
            "normal_anatomical": [round(float(v), 4) for v in self.normal],
            "gap_mm": round(float(self.gap_mm), 3),
            "displacement_mm": round(float(np.linalg.norm(self.translation)), 3),
            "translation_anatomical": [round(float(v), 3) for v in self.translation],
            "rotation_deg": round(ang, 3),
            "rotation_anatomical": [round(float(v), 6) for v in self.rotation.reshape(-1)],
            "bend_per_mm": round(float(self.bend), 5),
            "bend_dir_anatomical": (None if self.bend_dir is None
                                    else [round(float(v), 4) for v in self.bend_dir]),
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "PlaneCut":
        """The cut back from :meth:`to_dict` (anatomical frame; older entries: no rotation
        matrix -> identity, which is within the <= 10 degree fragment rotation)."""
        rot = d.get("rotation_anatomical")
        bend_dir = d.get("bend_dir_anatomical")
        return cls(np.asarray(d["centre_anatomical"], float), _unit(d["normal_anatomical"]),
                   float(d.get("gap_mm", 0.0)),
                   np.eye(3) if rot is None else np.asarray(rot, float).reshape(3, 3),
                   np.asarray(d.get("translation_anatomical", [0.0, 0.0, 0.0]), float),
                   bend=float(d.get("bend_per_mm", 0.0) or 0.0),
                   bend_dir=None if bend_dir is None else np.asarray(bend_dir, float))


@dataclass
class FractureModel:
    """The fractures of one case: fibular (None for Weber "none") and medial malleolar."""

    weber: str
    fibula: Optional[PlaneCut]
    medial: Optional[PlaneCut]
    widening_mm: float = 0.0
    #: :data:`FACES`: how the renderers draw the fracture faces.
    faces: str = "corticated"

    def to_dict(self, anatomy_to_patient: np.ndarray,
                plafond: Optional[np.ndarray] = None) -> Optional[Dict[str, Any]]:
        """The ``info["fracture"]`` entry (None when there is no fracture); heights above
        ``plafond`` (anatomy frame mm; the frame's origin when None)."""
        if self.fibula is None:
            return None
        d = self.fibula.to_dict(anatomy_to_patient, plafond)
        d["weber"] = self.weber
        d["syndesmotic_widening_mm"] = round(float(self.widening_mm), 3)
        # Fragment displacement proper, without the lateral shift of the widening.
        own = self.fibula.translation + np.array([self.widening_mm, 0.0, 0.0])
        d["displacement_mm"] = round(float(np.linalg.norm(own)), 3)
        d["medial_malleolus_fracture"] = self.medial is not None
        if self.faces != "corticated":  # earlier datasets' entries stay as they were
            d["faces"] = self.faces
        if self.medial is not None:
            d["medial_malleolus"] = self.medial.to_dict(anatomy_to_patient, plafond)
        return d


def check_faces(faces: str) -> str:
    """``faces`` if it is one of :data:`FACES`; ValueError otherwise."""
    if faces not in FACES:
        raise ValueError(f"fracture faces must be one of {FACES}, got {faces!r}")
    return faces


def shell_sdf(cut: PlaneCut, sdf: Sdf, src: Any, faces: str) -> Optional[np.ndarray]:
    """The SDF (mm) whose depth sets a fracture part's cortex: the intact bone's at the part's
    source points for "raw" faces (so the cut face shows the bone's inside), None for
    "corticated" faces (the part's own SDF: a cortex on the cut too)."""
    return sdf(*src) if faces == "raw" and cut is not None else None


def sample_fracture(rng: np.random.Generator, weber: str, p: AnatomyParams,
                    fib_centre_at: Callable[[float], np.ndarray],
                    style: str = "classic") -> FractureModel:
    """Draw a fracture of Danis-Weber class ``weber``.

    Args:
        rng: Random generator (always consumed the same way for a given class and style).
        weber: One of :data:`WEBER_CLASSES`.
        p: Anatomy parameters (malleolus tip depth limits a Weber A height).
        fib_centre_at: Function z (mm) -> fibular axis point (3,) at that height.
        style: "classic" (the original draws, below), or a morphology family of
            :mod:`AnkleFractureLib.phantom.fracture_styles` ("varied" for training, "heldout",
            differently parameterised, for testing only, "calibration" for fitting decisions).

    Returns:
        The fracture model; ``fibula`` is None for "none".
    """
    if weber == "none":
        return FractureModel("none", None, None)
    if style != "classic":
        from AnkleFractureLib.phantom.fracture_styles import sample_styled

        return sample_styled(rng, weber, p, fib_centre_at, style)
    lo, hi = WEBER_HEIGHT_MM[weber]
    if weber == "A":
        lo = max(lo, -(p.fib_tip_depth - 6.0))  # keep a fragment of at least ~6 mm
    h = float(rng.uniform(lo, hi))
    centre = np.asarray(fib_centre_at(h), dtype=float)
    azimuth = rng.uniform(0.0, 2.0 * np.pi)
    if weber == "A":
        # Transverse avulsion-type line, tilted at most ~15 degrees.
        tilt = np.deg2rad(rng.uniform(0.0, 15.0))
        normal = np.array([np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth), np.cos(tilt)])
    elif weber == "B":
        # Oblique (spiral-like) line from antero-inferior to postero-superior: the plane holds
        # the direction (0, cos th, sin th) (posterior and up), so its normal leans anteriorly.
        th = np.deg2rad(rng.uniform(35.0, 60.0))
        normal = np.array([rng.uniform(-0.15, 0.15), -np.sin(th), np.cos(th)])
    else:
        if rng.uniform() < 0.5:
            tilt = np.deg2rad(rng.uniform(0.0, 12.0))
        else:
            tilt = np.deg2rad(rng.uniform(25.0, 50.0))
        normal = np.array([np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth), np.cos(tilt)])
    normal = _unit(normal)
    gap = float(rng.uniform(0.5, 2.0))
    # Displacement: mostly lateral/posterior shear in the fracture plane, plus a little
    # distraction (along -normal) so fragments do not interpenetrate.
    shear_dir = np.array([-1.0, rng.uniform(0.0, 1.0), -rng.uniform(0.0, 0.5)])
    shear_dir = _unit(shear_dir - normal * (shear_dir @ normal))
    mag = float(rng.uniform(1.0, 4.0))
    translation = shear_dir * mag * 0.9 - normal * rng.uniform(0.2, 0.6)
    translation = translation * (mag / np.linalg.norm(translation))
    # Rotation: mainly about the long axis (external rotation of the distal fibula), a little
    # tilt; smaller for the long Weber C fragment, whose tip would otherwise swing far.
    rot_deg = float(rng.uniform(2.0, 10.0 if weber != "C" else 5.0))
    tilt_axis = np.array([np.cos(azimuth), np.sin(azimuth), 0.0])
    rotation = rotation_matrix(np.array([0.0, 0.0, 1.0]), -rot_deg) @ \
        rotation_matrix(tilt_axis, rng.uniform(-1.5, 1.5))
    widening = 0.0
    if weber == "C":
        widening = float(rng.uniform(2.0, 5.0))
        translation = translation + np.array([-widening, 0.0, 0.0])
    fib = PlaneCut(centre, normal, gap, rotation, translation)
    medial = sample_medial(rng, p, weber in ("B", "C") and rng.uniform() < 0.3)
    return FractureModel(weber, fib, medial, widening)


def sample_medial(rng: np.random.Generator, p: Any, has_medial: bool) -> Optional[PlaneCut]:
    """A medial malleolus fracture (or None), in the anatomy frame.

    The parameters are always drawn so that the stream of random numbers does not depend on
    ``has_medial``.
    """
    m_phi = np.deg2rad(rng.uniform(0.0, 35.0))
    m_gap = float(rng.uniform(0.5, 1.5))
    m_t = np.array([rng.uniform(0.3, 1.5), rng.uniform(-0.8, 0.8), -rng.uniform(0.5, 2.0)])
    m_rot = float(rng.uniform(-6.0, 6.0))
    if not has_medial:
        return None
    mx_in = p.tib_meta_rx - 2.0 * p.mm_rx + 0.5  # articular (inner) face of the malleolus
    m_centre = np.array([mx_in, p.mm_cy, rng.uniform(-1.0, 2.0)])
    m_normal = _unit(np.array([-np.sin(m_phi), 0.0, np.cos(m_phi)]))
    return PlaneCut(m_centre, m_normal, m_gap, rotation_matrix(np.array([0.0, 1.0, 0.0]), m_rot),
                    m_t, wedge_x=mx_in - 1.0)
