"""``generate_case``: one synthetic ankle CT with tibia/fibula labels and its ground truth.

Pipeline: sample a right-ankle anatomy and a Danis-Weber fracture (canonical anatomical frame,
mm), pick a rigid pose (mirror for a left ankle, rotation up to 15 degrees per axis, a few cm of
translation), pick a voxel grid that covers the leg, then rasterise (see
:mod:`AnkleFractureLib.phantom.imaging`).

Every random draw comes from generators seeded by ``seed`` (one independent stream per
concern: anatomy, fracture, pose, grid, texture, noise), so a case depends only on its
arguments, and changing, say, the spacing mode does not change the anatomy of a seed.

``confounders=P`` adds fracture mimics on intact bone to a share P of the cases (os
subfibulare, healed fracture, nutrient canal, physeal scar; see
:mod:`AnkleFractureLib.phantom.confounders`), drawn from their own stream: with P = 0 (the
default) nothing is drawn and every case is bit-identical to one made before they existed.

``forefoot=P`` (real-shape family only; the analytic family ignores it) gives a share P of the
cases whose foot is in view the cuneiforms, metatarsals and proximal phalanges as unlabelled
distractors, 40 % of them in strong plantarflexion (:mod:`AnkleFractureLib.phantom.forefoot`);
own stream, nothing drawn at P = 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.phantom import confounders as conf_mod
from AnkleFractureLib.phantom import imaging
from AnkleFractureLib.phantom.anatomy import Anatomy, sample_anatomy
from AnkleFractureLib.phantom.fractures import WEBER_CLASSES, check_faces, sample_fracture

SIDES = ("left", "right")
SPACING_MODES = ("fast", "clinical")
#: Phantom families: "analytic" (implicit ellipse-based bones, the original phantom) and "vh"
#: (real Visible Human bone shapes, deformed, with a realistic appearance; see real_generator).
FAMILIES = ("analytic", "vh")

#: Independent random streams per concern: np.random.default_rng([seed, STREAM[...]]).
STREAM = {"anatomy": 1, "fracture": 2, "pose": 3, "grid": 4, "texture": 5, "noise": 6,
          "confounder": 7}


@dataclass
class PhantomCase:
    """One phantom case.

    Attributes:
        ct: CT volume, int16 HU clipped to [-1024, 3071], array (z, y, x).
        label: uint8 label map on the same grid: 0 background, 1 tibia, 2 fibula (fracture
            fragments keep their parent bone's label; talus etc. are 0).
        info: JSON-serialisable ground truth (see :func:`generate_case`).
    """

    ct: Volume
    label: Volume
    info: Dict[str, Any]


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), STREAM[stream]])


def _validate(seed: Any, weber: Any, side: Any, spacing: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if weber not in WEBER_CLASSES:
        raise ValueError(f"weber must be one of {WEBER_CLASSES}, got {weber!r}")
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    if spacing not in SPACING_MODES:
        raise ValueError(f"spacing must be one of {SPACING_MODES}, got {spacing!r}")


def sample_pose(rng: np.random.Generator, side: str) -> np.ndarray:
    """4x4 anatomy -> patient LPS matrix: mirror (left only), then rotation and translation.

    Rotation: up to 15 degrees about each LPS axis; translation: up to 40 mm per axis.
    """
    ang = np.deg2rad(rng.uniform(-15.0, 15.0, size=3))
    t = rng.uniform(-40.0, 40.0, size=3)
    r = np.eye(3)
    for axis, a in enumerate(ang):
        r = r @ imaging._rot(axis, np.rad2deg(a))
    mirror = np.diag([-1.0, 1.0, 1.0]) if side == "left" else np.eye(3)
    m = np.eye(4)
    m[:3, :3] = r @ mirror
    m[:3, 3] = t
    return m


def plan_grid(seed: int, side: str, spacing: str, anatomy_seed: Optional[int] = None):
    """Anatomy, pose and grid of a case without rendering (cheap; used by tests).

    Args:
        seed: Case seed (pose, grid, and the anatomy unless ``anatomy_seed`` is given).
        side: "left" or "right".
        spacing: "fast" or "clinical".
        anatomy_seed: Seed of the anatomy alone (default ``seed``): the same anatomy can be
            posed, imaged and fractured in many ways (registration tests use it).

    Returns:
        (anatomy, anatomy_to_patient 4x4, GridSpec).
    """
    _validate(seed, "none", side, spacing)
    if anatomy_seed is None:
        anatomy_seed = seed
    _validate(anatomy_seed, "none", side, spacing)
    anatomy = Anatomy(sample_anatomy(_rng(anatomy_seed, "anatomy")))
    a2p = sample_pose(_rng(seed, "pose"), side)
    rng = _rng(seed, "grid")
    direction, kind = imaging.sample_direction(rng)
    margin = float(rng.uniform(8.0, 15.0))  # air around the skin, mm
    pts = anatomy.leg_bounds(*imaging.Z_COVER)
    # Grow the outline radially (in its axial plane) by the air margin; cover z with margin.
    cx = np.interp(pts[:, 2], anatomy.prof.z, anatomy.prof.leg_cx)
    cy = np.interp(pts[:, 2], anatomy.prof.z, anatomy.prof.leg_cy)
    v = pts[:, :2] - np.stack([cx, cy], axis=1)
    v *= (1.0 + margin / np.maximum(np.linalg.norm(v, axis=1), 1.0))[:, None]
    pts[:, :2] = np.stack([cx, cy], axis=1) + v
    pts[:, 2] += np.where(pts[:, 2] > 0, 2.0, -2.0)
    lps = pts @ a2p[:3, :3].T + a2p[:3, 3]
    try:
        grid = imaging.choose_grid(rng, spacing, lps, direction, kind)
    except ValueError:
        # Rare: a permuted direction whose in-plane extent cannot fit 512 voxels of 0.45 mm.
        grid = imaging.choose_grid(rng, spacing, lps, np.eye(3), "identity")
    return anatomy, a2p, grid


def generate_case(seed: int, weber: str = "none", side: str = "right",
                  spacing: str = "fast", anatomy_seed: Optional[int] = None,
                  family: str = "analytic", fractures: str = "classic",
                  confounders: float = 0.0,
                  confounder_kinds: Optional[Sequence[str]] = None,
                  forefoot: float = 0.0, metal: Optional[float] = None,
                  cast: Optional[float] = None,
                  fracture_faces: str = "corticated") -> PhantomCase:
    """Generate one synthetic ankle CT, fully determined by the arguments.

    Args:
        seed: Non-negative integer seed.
        weber: Danis-Weber class: "none", "A", "B" or "C".
        side: "left" or "right" ankle.
        spacing: "fast" (in-plane 0.7-1.0 mm, slices 1.0-1.5 mm, ~130x130x150 voxels) or
            "clinical" (512 x 512 x 300-400, 0.3-0.45 mm in-plane, 0.5-0.7 mm slices).
        anatomy_seed: Seed of the anatomy alone (default: ``seed``). Cases that share it have
            the same bones under different poses, grids, fractures and noise.
        family: "analytic" (default) or "vh" (:data:`FAMILIES`). A "vh" case's ``info`` also
            holds ``family``, ``base_shape``, ``shape``, ``appearance``, ``fov_mm``,
            ``both_legs``, ``foot_in_view`` and the shapes' ``credit``.
        fractures: A fracture morphology of :mod:`AnkleFractureLib.phantom.fracture_styles`
            ("classic" by default); ``info["fracture_style"]``.
        confounders: Probability (0-1) that the case carries fracture mimics on intact bone
            (os subfibulare, healed fracture, nutrient canal, physeal scar; each kind
            independently, at least one), whatever its class. 0 (default): none, and no
            random number is drawn for them.
        confounder_kinds: Kinds allowed (default all of
            :data:`~AnkleFractureLib.phantom.confounders.KINDS`); one kind alone is always
            present in a case that carries confounders.
        forefoot: Probability (0-1) that a "vh" case whose foot is in view carries the
            forefoot (cuneiforms, metatarsals I-V, proximal phalanges; unlabelled), in strong
            plantarflexion (40-68 degrees) in 40 % of those. 0 (default): none and nothing
            drawn; with P > 0 ``info["forefoot"]`` holds ``present``,
            ``plantarflexion_deg`` and, when present, the bones' sizes. The "analytic"
            family ignores it (it has no forefoot).
        metal: Probability (0-1) that a "vh" case carries fixation hardware (60 % a lateral
            fibular plate with screws through the fibula, 40 % medial malleolar screws), with
            its streaks; None (default): 15 % of fractured and 4 % of intact ankles, as
            before. Given, ``info["metal_probability"]`` records it. The "analytic" family
            ignores it (it has no metal).
        cast: Probability (0-1) that a "vh" case wears a plaster cast or a posterior splint
            (150-700 HU, 3-10 mm off the skin), as trauma CTs often do; None (default): 12 %,
            as before. Given, ``info["cast_probability"]`` records it; the drawn kind is
            ``info["appearance"]["cast"]``. The "analytic" family ignores it.
        fracture_faces: How the fracture faces are drawn
            (:data:`~AnkleFractureLib.phantom.fractures.FACES`): "raw" (cancellous bone or
            marrow up to the gap, as in an acute fracture) or "corticated" (default: a cortex
            on every face, the earlier datasets' look, in which a hairline is a dense band).
            "raw" is recorded as ``info["fracture"]["faces"]``; it draws no random number.

    Returns:
        The case. ``info`` holds: seed, weber, side, spacing_mode, ``anatomy_to_patient``
        (4x4 row-major list mapping canonical right-ankle anatomical mm to patient LPS mm; it
        includes the x mirror for a left ankle, so its determinant is negative),
        ``plafond_lps`` (LPS mm of the plafond centre), ``fracture`` (None for "none"),
        ``anatomy`` (sampled parameters), ``noise_sd_hu`` and ``grid``; with
        ``confounders`` > 0 also ``confounders`` (a list, empty when the case drew none:
        ``kind``, ``bone``, ``center_lps`` in patient LPS mm, ``center_anatomical`` and the
        kind's sizes, see :mod:`~AnkleFractureLib.phantom.confounders`) and
        ``confounder_probability``.

    Raises:
        ValueError: For an unknown class, side or spacing mode, or a bad seed, a probability
            outside [0, 1] or an unknown confounder kind.
    """
    _validate(seed, weber, side, spacing)
    check_faces(fracture_faces)
    confounders = conf_mod.check_probability(confounders)
    conf_mod.check_kinds(confounder_kinds)
    forefoot, metal, cast = check_vh_options(forefoot, metal, cast)
    from AnkleFractureLib.phantom.fracture_styles import STYLE_NAMES

    if fractures not in STYLE_NAMES:
        raise ValueError(f"fractures must be one of {STYLE_NAMES}, got {fractures!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if family == "vh":
        return _generate_vh(seed, weber, side, spacing, anatomy_seed, fractures,
                            confounders, confounder_kinds, forefoot, metal, cast,
                            fracture_faces)
    return _generate_analytic(seed, weber, side, spacing, anatomy_seed, fractures, confounders,
                              confounder_kinds, fracture_faces)


def _generate_analytic(seed: int, weber: str, side: str, spacing: str,
                       anatomy_seed: Optional[int], fractures: str, confounders: float,
                       confounder_kinds: Optional[Sequence[str]], fracture_faces: str
                       ) -> PhantomCase:
    """A case of the analytic family (arguments checked by :func:`generate_case`)."""
    anatomy, a2p, grid = plan_grid(seed, side, spacing, anatomy_seed)
    prof = anatomy.prof

    def fib_centre_at(z: float) -> np.ndarray:
        return np.array([np.interp(z, prof.z, prof.fib_cx), np.interp(z, prof.z, prof.fib_cy), z])

    fracture = sample_fracture(_rng(seed, "fracture"), weber, anatomy.p, fib_centre_at,
                               style=fractures)
    fracture.faces = fracture_faces
    conf = conf_mod.Confounders([])
    if confounders > 0:  # no draw at all otherwise: earlier cases stay bit-identical
        conf = conf_mod.draw_confounders(_rng(seed, "confounder"), confounders,
                                         conf_mod.analytic_anchors(anatomy, imaging.Z_COVER),
                                         confounder_kinds)
    voxel = float(np.prod(grid.spacing) ** (1.0 / 3.0))
    renderer = imaging.Renderer(anatomy, fracture, _rng(seed, "texture"), voxel,
                                label_band_mm=1.05 * max(grid.spacing), confounders=conf)
    noise_sd = float(_rng(seed, "noise").uniform(15.0, 40.0))
    p2a = np.linalg.inv(a2p)
    ct_arr, lab_arr = imaging.rasterise(renderer, grid, p2a, noise_sd, 
                                          noise_key=(int(seed), STREAM["noise"], 1))
    meta = {"source": "AnkleFractureLib.phantom", "seed": int(seed), "weber": weber, "side": side}
    info = _case_info(seed, anatomy_seed, weber, side, spacing, a2p, a2p[:3, 3], grid)
    info.update(fracture=fracture.to_dict(a2p), anatomy=anatomy.p.to_dict(),
                noise_sd_hu=round(noise_sd, 3), fracture_style=fractures)
    if confounders > 0:
        info.update(confounders=conf.to_list(a2p), confounder_probability=confounders)
    return _case(ct_arr, lab_arr, grid, meta, info)


def check_optional_probability(p: Optional[float], name: str) -> Optional[float]:
    """``p`` as a float probability, or None (the option's default rate).

    Raises:
        ValueError: ``p`` is not None and not in [0, 1] (the message names ``name``).

    Example:
        >>> check_optional_probability(None, "cast") is None, check_optional_probability(1, "metal")
        (True, 1.0)
    """
    from AnkleFractureLib.phantom.confounders import check_probability

    return None if p is None else check_probability(p, name)


def check_metal(p: Optional[float]) -> Optional[float]:
    """The fixation-hardware probability checked, or None (the default rates)."""
    return check_optional_probability(p, "metal")


def check_cast(p: Optional[float]) -> Optional[float]:
    """The cast-or-splint probability checked, or None (the default rate)."""
    return check_optional_probability(p, "cast")


def check_vh_options(forefoot: float, metal: Optional[float], cast: Optional[float]
                      ) -> Tuple[float, Optional[float], Optional[float]]:
    """The vh family's forefoot, metal and cast probabilities, checked (ValueError if bad)."""
    from AnkleFractureLib.phantom.forefoot import check_probability as check_forefoot

    return check_forefoot(forefoot), check_metal(metal), check_cast(cast)


def _case(ct_arr: np.ndarray, lab_arr: np.ndarray, grid: Any, meta: Dict[str, Any],
          info: Dict[str, Any]) -> PhantomCase:
    """A PhantomCase of rendered CT (int16) and label (uint8) arrays (z, y, x) on ``grid``."""
    ct = Volume(ct_arr, grid.spacing, grid.origin, grid.direction.copy(), dict(meta, modality="CT"))
    label = Volume(lab_arr, grid.spacing, grid.origin, grid.direction.copy(),
                   dict(meta, modality="label"))
    return PhantomCase(ct, label, info)


def _case_info(seed: int, anatomy_seed: Optional[int], weber: str, side: str, spacing: str,
               a2p: np.ndarray, plafond_lps: np.ndarray, grid: Any) -> Dict[str, Any]:
    """The ground-truth fields both families share (see :func:`generate_case`)."""
    return {
        "seed": int(seed),
        "anatomy_seed": int(seed if anatomy_seed is None else anatomy_seed),
        "weber": weber,
        "side": side,
        "spacing_mode": spacing,
        "anatomy_to_patient": [[round(float(v), 9) for v in row] for row in a2p],
        "plafond_lps": [round(float(v), 4) for v in plafond_lps],
        "grid": imaging.spacing_summary(grid),
    }


def _generate_vh(seed: int, weber: str, side: str, spacing: str,
                 anatomy_seed: Optional[int], fractures: str = "classic",
                 confounders: float = 0.0,
                 confounder_kinds: Optional[Sequence[str]] = None,
                 forefoot: float = 0.0, metal: Optional[float] = None,
                 cast: Optional[float] = None, fracture_faces: str = "corticated"
                 ) -> PhantomCase:
    """A case of the real-shape family (see :mod:`AnkleFractureLib.phantom.real_generator`)."""
    from AnkleFractureLib.phantom.real_generator import render_real

    ct_arr, lab_arr, (anatomy, a2p, grid, fracture), extra = render_real(
        seed, weber, side, spacing, anatomy_seed, fractures, confounders, confounder_kinds,
        forefoot, metal, cast, fracture_faces)
    meta = {"source": "AnkleFractureLib.phantom", "family": "vh", "seed": int(seed),
            "weber": weber, "side": side}
    # The smooth displacement field moves the joint off the frame's origin (up to ~6 mm):
    # the true plafond is where the warped bone's plafond lies, and the fracture's height is
    # measured from it, as the pipeline measures it (the fracture was placed in the warped
    # frame, so its height above the frame's origin is not its height above the joint).
    plafond = anatomy.plafond()
    info = _case_info(seed, anatomy_seed, weber, side, spacing, a2p,
                      a2p[:3, :3] @ plafond + a2p[:3, 3], grid)
    info.update(plafond_anatomical=[round(float(v), 4) for v in plafond],
                fracture=fracture.to_dict(a2p, plafond), anatomy=_vh_landmarks(anatomy),
                fracture_style=fractures)
    info.update(extra)
    return _case(ct_arr, lab_arr, grid, meta, info)


def _vh_landmarks(anatomy: Any) -> Dict[str, float]:
    """Landmarks of a vh anatomy under the analytic family's names (previews read them):
    fibular axis at the plafond (``fib_x0``, ``fib_y0``), medial malleolus (``tib_meta_rx``,
    ``mm_rx``, ``mm_cy``) and the lateral malleolus tip depth, mm in the anatomical frame."""
    from dataclasses import asdict

    out = {k: round(float(v), 4) for k, v in asdict(anatomy.fracture_anchors()).items()}
    fx, fy, _ = anatomy.fib_centre_at(0.0)
    out.update(fib_x0=round(float(fx), 4), fib_y0=round(float(fy), 4))
    return out
