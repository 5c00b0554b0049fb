"""One CT of the real-shape ("vh") phantom family: anatomy, fracture, field of view, imaging.

The family's differences from the analytic one (:mod:`AnkleFractureLib.phantom.generator`):
real bone shapes with random deformation (:mod:`~AnkleFractureLib.phantom.real_anatomy`), a
realistic appearance (:mod:`~AnkleFractureLib.phantom.real_render`), and a field of view that
ends anywhere from 40 mm above the plafond up to the knee, with the foot in or out.

Slice thickness 0.5-3 mm: a slice thicker than 1.25 mm is the mean of thinner slices rendered
across it (a box slice profile: the partial-volume effect of a thick slice), and its label is
the central thin slice's.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from AnkleFractureLib.phantom import confounders as conf_mod
from AnkleFractureLib.phantom import forefoot as ff_mod
from AnkleFractureLib.phantom import imaging
from AnkleFractureLib.phantom.fractures import sample_fracture
from AnkleFractureLib.phantom.real_anatomy import RealAnatomy, sample_real_params
from AnkleFractureLib.phantom.real_render import RealRenderer, finish_image, sample_appearance
from AnkleFractureLib.phantom.shapes import VH_CREDIT, shipped_library

#: Streams of the vh family (distinct from the analytic family's, so seeds do not alias);
#: "confounder" is 20 because 17 is the noise's; "forefoot" (21) is only drawn from when a
#: forefoot probability above 0 is asked for.
STREAM = {"anatomy": 11, "field": 12, "fracture": 13, "pose": 14, "grid": 15, "texture": 16,
          "noise": 17, "look": 18, "metal": 19, "confounder": 20, "forefoot": 21}


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), STREAM[stream]])


def sample_fov(rng: np.random.Generator, anatomy: RealAnatomy) -> Tuple[float, float]:
    """(bottom, top) of the scanned range along the leg, anatomical z mm.

    Top: 40 mm above the plafond up to the knee, skewed towards short ankle scans (median
    ~110 mm). Bottom: foot in (half the cases: below the calcaneus) or out (through the talus,
    20-40 mm below the plafond).
    """
    knee = float(anatomy.g["tibia"].bounds()[1][2] * anatomy.sl) - 12.0
    top = 40.0 + (knee - 40.0) * float(rng.uniform()) ** 2
    if rng.uniform() < 0.5:
        bottom = float(anatomy._foot_corners()[:, 2].min()) + float(rng.uniform(0.0, 10.0))
    else:
        bottom = -float(rng.uniform(20.0, 40.0))
    return bottom, top


def choose_real_grid(rng: np.random.Generator, mode: str, points_lps: np.ndarray,
                     direction: np.ndarray, kind: str) -> imaging.GridSpec:
    """Grid holding ``points_lps``: slices 0.5-3 mm; in-plane 0.6-1.0 mm ("fast") or a
    512-wide matrix of at least 0.3 mm ("clinical", coarser when the field of view needs it)."""
    u = rng.uniform()
    sl = float(rng.uniform(0.5, 1.25) if u < 0.6 else rng.uniform(1.25, 2.0) if u < 0.85
               else rng.uniform(2.0, 3.0))
    q = points_lps @ direction
    ext = q.max(axis=0) - q.min(axis=0)
    if mode == "fast":
        sp_in = float(rng.uniform(0.6, 1.0))
    else:
        sp_in = max(float(rng.uniform(0.3, 0.45)), max(ext[0], ext[1]) / 511.0)
    spacing = np.array([sp_in, sp_in, sl])
    size = np.ceil(ext / spacing).astype(int) + 1
    if mode == "clinical":
        size[:2] = 512
    start = q.min(axis=0) - 0.5 * ((size - 1) * spacing - ext)
    return imaging.GridSpec(tuple(int(s) for s in size), tuple(float(s) for s in spacing),
                            tuple(float(o) for o in direction @ start), direction, kind)


def add_forefoot(rng: np.random.Generator, anatomy: RealAnatomy, bottom: float,
                 probability: float) -> float:
    """With ``probability``, give a foot-in-view anatomy its forefoot (drawn from ``rng``),
    and return the scan's bottom moved with the new foot pose (same distance below the
    hindfoot; the forefoot may reach below it, as a plantarflexed forefoot does)."""
    if bottom >= -45.0 or rng.uniform() >= probability:
        return bottom
    lowest = float(anatomy._foot_corners()[:, 2].min())
    calc, nav, cub = anatomy.foot_parts
    forefoot = ff_mod.sample_forefoot(rng, nav, cub, float(calc[0][2] - calc[1][2]),
                                      anatomy.p.foot_deg, anatomy.p.habitus)
    anatomy.attach_forefoot(forefoot)
    return float(anatomy._foot_corners()[:, 2].min()) + (bottom - lowest)


def plan_real(seed: int, side: str, spacing: str, anatomy_seed: Optional[int] = None,
              forefoot: float = 0.0, top_at_least: Optional[float] = None):
    """Anatomy, pose, grid and field of view of a vh case (no rendering; ``anatomy_seed``
    defaults to ``seed``; ``forefoot``: probability of the forefoot bones in a case whose
    foot is in view, drawn from the "forefoot" stream only when above 0; ``top_at_least``:
    the scan reaches at least this height (anatomical z mm), with the same random draws)."""
    from AnkleFractureLib.phantom.generator import sample_pose

    lib = shipped_library()
    a_seed = seed if anatomy_seed is None else anatomy_seed
    anatomy = RealAnatomy(sample_real_params(_rng(a_seed, "anatomy"), len(lib)), lib,
                          _rng(a_seed, "field"))
    a2p = sample_pose(_rng(seed, "pose"), side)
    rng = _rng(seed, "grid")
    bottom, top = sample_fov(rng, anatomy)
    if top_at_least is not None:
        top = max(top, float(top_at_least))
    if forefoot > 0:  # no draw at all otherwise: earlier cases stay bit-identical
        bottom = add_forefoot(_rng(seed, "forefoot"), anatomy, bottom, forefoot)
    direction, kind = imaging.sample_direction(rng)
    pts = anatomy.leg_bounds(bottom, top)
    centre = pts[:, :2].mean(axis=0)
    v = pts[:, :2] - centre
    margin = float(rng.uniform(8.0, 15.0)) + 15.0  # air, and room for a cast
    pts[:, :2] = centre + v * (1.0 + margin / np.maximum(np.linalg.norm(v, axis=1), 1.0))[:, None]
    grid = choose_real_grid(rng, spacing, pts @ a2p[:3, :3].T + a2p[:3, 3], direction, kind)
    return anatomy, a2p, grid, (bottom, top)


#: A fibular fracture's centre lies at least this far (mm) below the scan's upper end, so the
#: whole line (oblique and spiral lines span up to ~30 mm of height) is in view.
FRACTURE_TOP_MARGIN_MM = 25.0


def fracture_top_needed(fracture: Any) -> Optional[float]:
    """The lowest scan top (anatomical z mm) that shows ``fracture``'s fibular line, or None
    for an intact fibula."""
    if getattr(fracture, "fibula", None) is None:
        return None
    return float(fracture.fibula.centre[2]) + FRACTURE_TOP_MARGIN_MM


def _thin_grid(grid: imaging.GridSpec) -> Tuple[imaging.GridSpec, int]:
    """A grid with ``n`` thin slices per slice of ``grid`` (n = 1 up to 1.25 mm)."""
    n = int(np.ceil(grid.spacing[2] / 1.0)) if grid.spacing[2] > 1.25 else 1
    if n == 1:
        return grid, 1
    sp = (grid.spacing[0], grid.spacing[1], grid.spacing[2] / n)
    shift = -0.5 * (grid.spacing[2] - sp[2])
    origin = np.asarray(grid.origin) + grid.direction[:, 2] * shift
    size = (grid.size[0], grid.size[1], grid.size[2] * n)
    return imaging.GridSpec(size, sp, tuple(origin), grid.direction, grid.direction_kind), n


def render_real(seed: int, weber: str, side: str, spacing: str,
                anatomy_seed: Optional[int] = None, fractures: str = "classic",
                confounders: float = 0.0, confounder_kinds: Optional[Sequence[str]] = None,
                forefoot: float = 0.0, metal: Optional[float] = None,
                cast: Optional[float] = None, fracture_faces: str = "corticated"
                ) -> Tuple[np.ndarray, np.ndarray, Any, Dict[str, Any]]:
    """Render a vh case: (ct int16 (z, y, x), label uint8 (z, y, x), (anatomy, anatomy to
    patient 4x4, grid, fracture model), family-specific info dict).

    ``confounders`` (probability) and ``confounder_kinds``: see
    :func:`AnkleFractureLib.phantom.generator.generate_case`; the info dict then holds
    ``confounders`` and ``confounder_probability``. ``forefoot`` (probability, foot in view):
    see :func:`plan_real`; with ``forefoot`` > 0 the info dict holds ``forefoot``.
    ``metal``: probability of fixation hardware (None: the default rates of
    :func:`~AnkleFractureLib.phantom.real_render.sample_appearance`); the info dict then holds
    ``metal_probability``. ``cast``: probability of a cast or splint (None: the default
    rate); the info dict then holds ``cast_probability``. ``fracture_faces``: see
    :func:`~AnkleFractureLib.phantom.generator.generate_case`.
    """
    anatomy, a2p, grid, fov = plan_real(seed, side, spacing, anatomy_seed, forefoot)
    anchors = anatomy.fracture_anchors()
    fracture = sample_fracture(_rng(seed, "fracture"), weber, anchors,
                               anatomy.fib_centre_at, style=fractures)
    fracture.faces = fracture_faces
    need_top = fracture_top_needed(fracture)
    fov_raised = need_top is not None and need_top > fov[1]
    if fov_raised:  # the label must be visible: a class whose fracture is off the scan is noise
        anatomy, a2p, grid, fov = plan_real(seed, side, spacing, anatomy_seed, forefoot,
                                            top_at_least=need_top)
        anchors = anatomy.fracture_anchors()
    conf = conf_mod.Confounders([])
    if confounders > 0:  # no draw at all otherwise: earlier cases stay bit-identical
        conf = conf_mod.draw_confounders(
            _rng(seed, "confounder"), confounders,
            conf_mod.vh_anchors(anatomy, anchors.fib_tip_depth, fov), confounder_kinds)
    look = sample_appearance(_rng(seed, "look"), weber != "none", metal, cast)
    thin, n = _thin_grid(grid)
    voxel = float(np.prod(grid.spacing) ** (1.0 / 3.0))
    renderer = RealRenderer(anatomy, fracture, look, _rng(seed, "texture"), voxel,
                            label_band_mm=1.05 * max(thin.spacing), confounders=conf)
    ct, lab = imaging.rasterise(renderer, thin, np.linalg.inv(a2p), look.noise_sd,
                                noise_key=(int(seed), STREAM["noise"], 1),
                                psf_sigma_vox=look.psf_sigma_vox)
    ct = ct.astype(np.float32)
    if n > 1:
        ct = ct.reshape(grid.size[2], n, *ct.shape[1:]).mean(axis=1)
        lab = np.ascontiguousarray(lab[n // 2::n])
    ct = finish_image(ct, look, grid.spacing, _rng(seed, "metal"))
    info = {
        "family": "vh",
        "base_shape": [b.name for b in shipped_library()][anatomy.p.base],
        "shape": anatomy.p.to_dict(),
        "appearance": look.to_dict(),
        "fov_mm": [round(fov[0], 2), round(fov[1], 2)],
        "fov_raised_for_fracture": bool(fov_raised),
        "both_legs": bool(anatomy.p.other_leg),
        "foot_in_view": bool(fov[0] < -45.0),
        "credit": VH_CREDIT,
        "noise_sd_hu": round(look.noise_sd, 3),
    }
    if confounders > 0:
        info.update(confounders=conf.to_list(a2p), confounder_probability=float(confounders))
    if forefoot > 0:
        info["forefoot"] = forefoot_info(anatomy, forefoot)
    if metal is not None:
        info["metal_probability"] = float(metal)
    if cast is not None:
        info["cast_probability"] = float(cast)
    return ct, lab, (anatomy, a2p, grid, fracture), info


def forefoot_info(anatomy: RealAnatomy, probability: float) -> Dict[str, Any]:
    """``info["forefoot"]``: the forefoot's summary (:meth:`~AnkleFractureLib.phantom.forefoot.
    Forefoot.to_info`) or ``present`` False, with the foot pose (degrees, plantarflexion
    positive) and the probability asked for."""
    if anatomy.forefoot is not None:
        out = anatomy.forefoot.to_info()
    else:
        out = {"present": False, "plantarflexion_deg": round(float(anatomy.p.foot_deg), 2)}
    out["probability"] = float(probability)
    return out
