"""Fracture morphology families: hairline to displaced, planar to curved, as in real trauma.

The "classic" draws of :func:`~AnkleFractureLib.phantom.fractures.sample_fracture` give every
fracture a 0.5-2 mm gap and 1-4 mm of displacement. Real ankle fractures range from hairline,
non-displaced lines (0.2-1 mm) to gapped, displaced and rotated ones (up to 6 mm), Weber B lines
run obliquely or spirally from antero-inferior at the joint to postero-superior, and a Weber C
fracture may or may not come with tibiofibular widening. A :class:`FractureStyle` holds the
ranges of one family:

* ``"varied"``: the training family;
* ``"heldout"``: a differently parameterised family (steeper and more curved lines, more
  hairlines, heights nearer the class edges, more rotation) that training never sees; it is the
  test set of the fracture localiser and the classifier;
* ``"calibration"``: a third family, parameterised differently from both, on which the
  decision that follows the networks (the line model and the weights that combine the
  localiser with the classifier) may be fitted, so that it is not fitted only on the family
  the networks learned. Where the held-out family is harder than the training family it goes
  further than either (more hairlines, steeper and more curved lines, heights still nearer
  the class edges), elsewhere it keeps ranges of its own (less displacement and rotation,
  fewer widened syndesmoses). Never used to train a network or to test.

All values are in the canonical anatomy frame (mm, LPS axes, plafond centre at the origin,
lateral -x). The Weber class is still defined by the height of the fibular line's centre
(:data:`~AnkleFractureLib.phantom.fractures.WEBER_HEIGHT_MM`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import numpy as np

from AnkleFractureLib.phantom.fractures import (WEBER_HEIGHT_MM, FractureModel, PlaneCut,
                                                _unit, rotation_matrix, sample_medial)

Range = Tuple[float, float]


@dataclass(frozen=True)
class FractureStyle:
    """Ranges (uniform unless said) of one morphology family.

    Attributes:
        hairline_prob: Probability of a hairline, non-displaced line.
        hairline_gap_mm: Gap of a hairline line (mm).
        gap_mm: Gap of any other line (mm).
        displacement_mm: Fragment displacement of a non-hairline line (mm).
        rotation_deg: Fragment rotation about the long axis of a non-hairline line (degrees).
        a_tilt_deg: Tilt of the near-transverse Weber A line from the horizontal (degrees).
        b_angle_deg: Inclination of the Weber B line (antero-inferior to postero-superior).
        c_oblique_prob: Probability that a Weber C line is oblique rather than transverse.
        c_tilt_deg: (transverse range, oblique range) of the Weber C line tilt (degrees).
        widening_prob: Probability of tibiofibular widening with a Weber C fracture.
        widening_mm: Widening (mm) when present.
        bend_per_mm: |curvature| (1/mm) of the fracture surface (0 = planar).
        height_beta: Beta(a, b) shape of the height within the class range (1, 1 = uniform;
            below 1 favours the class edges).
        medial_prob: Probability of a medial malleolus fracture with Weber B or C.
    """

    name: str
    hairline_prob: float
    hairline_gap_mm: Range
    gap_mm: Range
    displacement_mm: Range
    rotation_deg: Range
    a_tilt_deg: Range
    b_angle_deg: Range
    c_oblique_prob: float
    c_tilt_deg: Tuple[Range, Range]
    widening_prob: float
    widening_mm: Range
    bend_per_mm: Range
    height_beta: Range
    medial_prob: float


STYLES: Dict[str, FractureStyle] = {
    "varied": FractureStyle(
        name="varied", hairline_prob=0.35, hairline_gap_mm=(0.2, 0.6), gap_mm=(0.6, 3.0),
        displacement_mm=(0.0, 6.0), rotation_deg=(0.0, 10.0), a_tilt_deg=(0.0, 20.0),
        b_angle_deg=(30.0, 65.0), c_oblique_prob=0.5, c_tilt_deg=((0.0, 15.0), (25.0, 55.0)),
        widening_prob=0.7, widening_mm=(0.5, 6.0), bend_per_mm=(0.0, 0.04),
        height_beta=(1.0, 1.0), medial_prob=0.3),
    "heldout": FractureStyle(
        name="heldout", hairline_prob=0.5, hairline_gap_mm=(0.3, 1.0), gap_mm=(0.8, 2.5),
        displacement_mm=(0.5, 6.0), rotation_deg=(3.0, 15.0), a_tilt_deg=(5.0, 25.0),
        b_angle_deg=(40.0, 72.0), c_oblique_prob=0.7, c_tilt_deg=((3.0, 18.0), (30.0, 60.0)),
        widening_prob=0.5, widening_mm=(1.0, 6.0), bend_per_mm=(0.02, 0.06),
        height_beta=(0.7, 0.7), medial_prob=0.4),
    "calibration": FractureStyle(
        name="calibration", hairline_prob=0.6, hairline_gap_mm=(0.25, 0.8), gap_mm=(0.7, 2.0),
        displacement_mm=(0.2, 4.0), rotation_deg=(0.0, 8.0), a_tilt_deg=(0.0, 15.0),
        b_angle_deg=(45.0, 75.0), c_oblique_prob=0.6, c_tilt_deg=((0.0, 12.0), (35.0, 65.0)),
        widening_prob=0.4, widening_mm=(0.5, 4.0), bend_per_mm=(0.03, 0.07),
        height_beta=(0.6, 0.6), medial_prob=0.5),
}
#: Names accepted by ``sample_fracture(style=...)`` and ``ankle-fracture phantom --fractures``.
STYLE_NAMES = ("classic",) + tuple(STYLES)


def _u(rng: np.random.Generator, r: Range) -> float:
    return float(rng.uniform(r[0], r[1]))


def _height(rng: np.random.Generator, weber: str, p: Any, style: FractureStyle) -> float:
    """Height (mm above the plafond) of the line's centre, within the class range."""
    lo, hi = WEBER_HEIGHT_MM[weber]
    if weber == "A":
        lo = max(lo, -(p.fib_tip_depth - 6.0))  # keep a fragment of at least ~6 mm
    return lo + (hi - lo) * float(rng.beta(*style.height_beta))


def _normal(rng: np.random.Generator, weber: str, style: FractureStyle) -> np.ndarray:
    """Unit normal of the line (pointing to the proximal side)."""
    azimuth = rng.uniform(0.0, 2.0 * np.pi)
    oblique = rng.uniform() < style.c_oblique_prob
    if weber == "B":
        # The plane holds (0, cos th, sin th) (posterior and up): from antero-inferior at the
        # joint to postero-superior, the typical supination-external-rotation line.
        th = np.deg2rad(_u(rng, style.b_angle_deg))
        return _unit(np.array([rng.uniform(-0.2, 0.2), -np.sin(th), np.cos(th)]))
    tilt_range = style.a_tilt_deg if weber == "A" else style.c_tilt_deg[int(oblique)]
    tilt = np.deg2rad(_u(rng, tilt_range))
    return _unit(np.array([np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth),
                           np.cos(tilt)]))


def _motion(rng: np.random.Generator, normal: np.ndarray, hairline: bool,
            style: FractureStyle) -> Tuple[np.ndarray, np.ndarray]:
    """Fragment rotation (3x3) and translation (mm): lateral/posterior shear in the plane plus
    a little distraction; external rotation about the long axis."""
    shear = np.array([-1.0, rng.uniform(0.0, 1.0), -rng.uniform(0.0, 0.5)])
    shear = _unit(shear - normal * (shear @ normal))
    mag = _u(rng, style.displacement_mm)
    rot = _u(rng, style.rotation_deg)
    distraction = rng.uniform(0.1, 0.5)
    tilt_axis = rng.normal(size=3)
    tilt_axis[2] = 0.0
    tilt = rng.uniform(-1.5, 1.5)
    if hairline:  # non-displaced: the fragment stays in place (sub-millimetre)
        mag, rot, distraction, tilt = mag * 0.05, rot * 0.05, 0.0, 0.0
    translation = shear * mag - normal * distraction
    rotation = rotation_matrix(np.array([0.0, 0.0, 1.0]), -rot) @ \
        rotation_matrix(_unit(tilt_axis + [1e-6, 0.0, 0.0]), tilt)
    return rotation, translation


def sample_styled(rng: np.random.Generator, weber: str, p: Any,
                  fib_centre_at: Callable[[float], np.ndarray], style: str) -> FractureModel:
    """Draw a Weber ``weber`` fracture ("A", "B" or "C") of the morphology family ``style``.

    Args:
        rng: Random generator (consumed the same way for a given class and style).
        weber: "A", "B" or "C".
        p: Anatomy parameters or :class:`~AnkleFractureLib.phantom.real_anatomy.FractureAnchors`
            (``fib_tip_depth``, ``tib_meta_rx``, ``mm_rx``, ``mm_cy``; mm).
        fib_centre_at: z (mm) -> fibular axis point (3,) at that height.
        style: A key of :data:`STYLES`.

    Returns:
        The fracture model.

    Example:
        >>> from types import SimpleNamespace
        >>> p = SimpleNamespace(fib_tip_depth=25.0, tib_meta_rx=20.0, mm_rx=6.0, mm_cy=0.0)
        >>> f = sample_styled(np.random.default_rng(0), "B", p,
        ...                   lambda z: np.array([-20.0, 5.0, z]), "varied")
        >>> bool(0.0 <= f.fibula.centre[2] <= 25.0)
        True
    """
    if style not in STYLES:
        raise ValueError(f"fracture style must be one of {STYLE_NAMES}, got {style!r}")
    st = STYLES[style]
    h = _height(rng, weber, p, st)
    centre = np.asarray(fib_centre_at(h), dtype=float)
    normal = _normal(rng, weber, st)
    hairline = bool(rng.uniform() < st.hairline_prob)
    gap = _u(rng, st.hairline_gap_mm if hairline else st.gap_mm)
    rotation, translation = _motion(rng, normal, hairline, st)
    bend_dir = rng.normal(size=3)
    bend_dir = _unit(bend_dir - normal * (bend_dir @ normal))
    bend = _u(rng, st.bend_per_mm) * (1.0 if rng.uniform() < 0.5 else -1.0)
    widening = 0.0
    if weber == "C" and rng.uniform() < st.widening_prob:
        widening = _u(rng, st.widening_mm)
    draw_medial = rng.uniform() < st.medial_prob
    if weber == "C" and widening:
        translation = translation + np.array([-widening, 0.0, 0.0])
    fib = PlaneCut(centre, normal, gap, rotation, translation, bend=bend, bend_dir=bend_dir)
    medial = sample_medial(rng, p, weber in ("B", "C") and draw_medial)
    return FractureModel(weber, fib, medial, widening)
