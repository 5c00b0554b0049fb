"""CT appearance of the real-shape ("vh") phantom family.

Point-wise rendering in the canonical anatomical frame (mm), like
:class:`AnkleFractureLib.phantom.imaging.Renderer`, with an appearance closer to real ankle CT:

* **bone**: a cortex whose thickness varies along the bone (tibia 3.5-5.5 mm in the shaft,
  about 1 mm in the metaphysis, a 1.3-2 mm subchondral plate at the plafond; fibula 2-3 mm
  down to 0.8 mm at the malleolus), fatty marrow (-90 to -30 HU) in the shafts, band-pass
  trabecular texture in the metaphyses, epiphyses, talus and foot bones;
* **soft tissue**: skin, subcutaneous fat (its thickness follows the habitus), muscle with fatty
  septa above the ankle, fat and tendons (Achilles, tibialis anterior and posterior, peroneals)
  around the joint, a haematoma around a fracture;
* **context**: the joint spaces of the real shapes, the other leg in some scans, metal (a
  lateral fibular plate with screws, or medial malleolar screws) and a cast or splint in some;
* the **imaging chain** (see :func:`finish_image`): soft or bone reconstruction kernel,
  correlated noise, slice thickness 0.5-3 mm (thick slices averaged from thin ones), streaks
  from metal and, weakly, from dense cortex.

Labels: 1 tibia, 2 fibula (both legs; fracture fragments keep their bone's label, with the
unlabelled band of :class:`~AnkleFractureLib.phantom.imaging.Renderer`); a label covers the
whole bone cross-section (cortex and marrow). Talus, foot bones (the forefoot's too: thin
cortex, fatty marrow in the metatarsal shafts; :mod:`~AnkleFractureLib.phantom.forefoot`),
metal and cast are 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage

from AnkleFractureLib.phantom.anatomy import ellipse_sdf, smoothstep
from AnkleFractureLib.phantom.confounders import Confounders
from AnkleFractureLib.phantom.fractures import FractureModel, shell_sdf
from AnkleFractureLib.phantom.imaging import (AIR_HU, HU_MAX, HU_MIN, NoiseField,
                                               paint_haematoma, raw_face_material)
from AnkleFractureLib.phantom.real_anatomy import RealAnatomy, _u

METAL_HU = 3071.0


@dataclass
class Appearance:
    """Tissue densities (HU), thicknesses (mm) and the imaging chain of one case."""

    cortex_hu: float
    trab_hu: float
    trab_amp: float
    marrow_hu: float
    tib_cortex_shaft: float
    tib_cortex_meta: float
    plate_mm: float
    fib_cortex_shaft: float
    fib_cortex_mal: float
    skin_hu: float
    skin_mm: float
    fat_hu: float
    fat_mm: float
    muscle_hu: float
    tendon_hu: float
    kernel: str
    noise_sd: float
    psf_sigma_vox: float
    sharpen: float
    metal: str
    cast: str
    cast_gap_mm: float
    cast_mm: float
    cast_hu: float
    bone_streaks: float

    def to_dict(self) -> Dict[str, object]:
        """JSON-friendly copy (rounded)."""
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


#: Default probability of fixation hardware (a plate or screws) in a fractured and in an
#: intact ankle: metal is likelier in a fractured ankle (fixation).
METAL_PROBABILITY = {True: 0.15, False: 0.04}


#: Default probability of a cast or splint (40 % a circular cast, 60 % a posterior splint).
CAST_PROBABILITY = 0.12


def sample_appearance(rng: np.random.Generator, fractured: bool,
                      metal_probability: Optional[float] = None,
                      cast_probability: Optional[float] = None) -> Appearance:
    """Draw one case's appearance.

    Args:
        rng: Random generator (consumed the same way whatever ``metal_probability``, up to
            the hardware's kind).
        fractured: Whether the ankle is fractured (fixation hardware is likelier).
        metal_probability: Probability (0-1) of fixation hardware (60 % a lateral fibular
            plate with screws, 40 % medial malleolar screws); None: :data:`METAL_PROBABILITY`.
        cast_probability: Probability (0-1) of a cast or splint; None:
            :data:`CAST_PROBABILITY` (every draw as before). Drawn after the kernel and the
            hardware, which it never changes; the tissue values drawn after it may differ.
    """
    kernel = "bone" if rng.uniform() < 0.5 else "soft"
    u_metal, u_cast = rng.uniform(), rng.uniform()
    metal = "none"
    p_metal = METAL_PROBABILITY[bool(fractured)] if metal_probability is None \
        else float(metal_probability)
    if u_metal < p_metal:
        metal = "plate" if rng.uniform() < 0.6 else "screws"
    p_cast = CAST_PROBABILITY if cast_probability is None else float(cast_probability)
    cast = "none" if u_cast >= p_cast else ("cast" if rng.uniform() < 0.4 else "splint")
    return Appearance(
        cortex_hu=_u(rng, 1250, 1900), trab_hu=_u(rng, 170, 360), trab_amp=_u(rng, 70, 150),
        marrow_hu=_u(rng, -90, -30), tib_cortex_shaft=_u(rng, 3.5, 5.5),
        tib_cortex_meta=_u(rng, 0.8, 1.3), plate_mm=_u(rng, 1.3, 2.0),
        fib_cortex_shaft=_u(rng, 2.0, 3.0), fib_cortex_mal=_u(rng, 0.7, 1.1),
        skin_hu=_u(rng, 20, 70), skin_mm=_u(rng, 1.2, 2.5), fat_hu=_u(rng, -125, -80),
        fat_mm=_u(rng, 3.0, 12.0), muscle_hu=_u(rng, 35, 65), tendon_hu=_u(rng, 70, 110),
        kernel=kernel,
        noise_sd=_u(rng, 25, 60) if kernel == "bone" else _u(rng, 8, 25),
        psf_sigma_vox=_u(rng, 0.4, 0.6) if kernel == "bone" else _u(rng, 0.7, 1.0),
        sharpen=_u(rng, 0.4, 1.3) if kernel == "bone" else 0.0,
        metal=metal, cast=cast, cast_gap_mm=_u(rng, 3.0, 10.0), cast_mm=_u(rng, 3.0, 8.0),
        cast_hu=_u(rng, 150, 700), bone_streaks=_u(rng, 10, 35) if rng.uniform() < 0.3 else 0.0)


class _Envelope:
    """What :func:`~AnkleFractureLib.phantom.imaging.rasterise` culls with: the skin grown by
    the cast, so a cast's voxels are rendered too."""

    def __init__(self, anatomy: RealAnatomy, grow_mm: float) -> None:
        self.anatomy, self.grow = anatomy, grow_mm

    def leg(self, x, y, z) -> np.ndarray:
        return self.anatomy.leg(x, y, z) - self.grow


class RealRenderer:
    """Paints HU and labels at anatomical points of a real-shape case.

    Args:
        anatomy: The deformed real anatomy.
        fracture: Its fracture model.
        look: The appearance draws.
        rng: Random generator (texture lattices, metal placement).
        voxel_mm: Nominal voxel size (partial-volume ramp).
        label_band_mm: Unlabelled band across a fracture (see the old renderer).
        confounders: Fracture mimics on intact bone (:mod:`~AnkleFractureLib.phantom.confounders`);
            None or an empty set renders exactly as without.
    """

    def __init__(self, anatomy: RealAnatomy, fracture: FractureModel, look: Appearance,
                 rng: np.random.Generator, voxel_mm: float, label_band_mm: float = 0.0,
                 confounders: Optional[Confounders] = None) -> None:
        self.anatomy, self.f, self.look = anatomy, fracture, look
        self.conf = confounders if confounders is not None else Confounders([])
        self.h, self.label_band = float(voxel_mm), float(label_band_mm)
        lo, hi = anatomy._extent()
        if anatomy.other is not None:
            hi = hi.copy()
            hi[0] = anatomy.p.other_dx + 80.0
        step = 0.6 if voxel_mm < 0.6 else 0.9
        # The trabecular lattice covers the distal 140 mm and the foot (shafts hold marrow).
        self.trab = NoiseField(rng, lo, (hi[0], hi[1], min(hi[2], 140.0)), step, 0.55, 2.0)
        self.soft = NoiseField(rng, lo - 30.0, hi + 30.0, 3.0, 5.0)
        grow = look.cast_gap_mm + look.cast_mm + 1.0 if look.cast != "none" else 0.0
        self.a = _Envelope(anatomy, grow)
        self.metal = self._place_metal(rng)
        self.ff_box, self.ff_trab = None, None
        if anatomy.forefoot is not None:  # its own lattice and seed: nothing else changes
            pts = anatomy.forefoot_corners()
            pad = 8.0 + 3.0 * anatomy.p.field_mm
            self.ff_box = (pts.min(axis=0) - pad, pts.max(axis=0) + pad)
            self.ff_trab = NoiseField(np.random.default_rng(anatomy.forefoot.texture_seed),
                                      self.ff_box[0], self.ff_box[1], step, 0.55, 2.0)

    def _occ(self, d: np.ndarray) -> np.ndarray:
        return np.clip(0.5 - d / self.h, 0.0, 1.0).astype(np.float32)

    # ------------------------------------------------------------------ profiles
    def _profile(self, bone: str, z: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(cortex thickness mm, trabecular fraction) of a bone at anatomical heights ``z``."""
        lk = self.look
        if bone == "tibia":
            c = lk.tib_cortex_meta + (lk.tib_cortex_shaft - lk.tib_cortex_meta) * smoothstep(z, 45.0, 110.0)
            c = lk.plate_mm + (c - lk.plate_mm) * smoothstep(z, 2.0, 8.0)
            return c, 1.0 - smoothstep(z, 35.0, 85.0)
        if bone == "fibula":
            c = lk.fib_cortex_mal + (lk.fib_cortex_shaft - lk.fib_cortex_mal) * smoothstep(z, 10.0, 70.0)
            return c, 1.0 - smoothstep(z, 10.0, 50.0)
        return np.full(z.shape, 1.1, np.float32), np.ones(z.shape, np.float32)

    def _paint_bone(self, hu: np.ndarray, d: np.ndarray, src, bone: str,
                    cortex_mm: Optional[float] = None, profile=None, field=None,
                    shell: Optional[np.ndarray] = None) -> None:
        """Cortex (``cortex_mm`` thick, default the bone's profile), then trabecular bone or
        fatty marrow inside, in place. ``profile``: per-point (cortex mm, trabecular
        fraction) instead of the bone's; ``field``: texture lattice instead of ``self.trab``;
        ``shell``: the SDF whose depth sets the cortex (the intact bone's, for a fracture part
        with raw faces: :func:`~AnkleFractureLib.phantom.fractures.shell_sdf`), None: ``d``."""
        lk = self.look
        cortex, trab_frac = self._profile(bone, src[2]) if profile is None else profile
        if cortex_mm is not None:
            cortex = np.float32(cortex_mm)
        tex = (self.trab if field is None else field).sample(*src)
        trab = lk.trab_hu + lk.trab_amp * (tex + 0.35 * tex * tex - 0.35)
        inner = trab_frac * trab + (1.0 - trab_frac) * (lk.marrow_hu + 10.0 * tex)
        if shell is not None:  # raw faces: no cortex rim on the cut (raw_face_material)
            hu += self._occ(d) * (raw_face_material(self._occ, shell, cortex, lk.cortex_hu,
                                                    inner) - hu)
            return
        hu += self._occ(d) * (lk.cortex_hu - hu)
        hu += self._occ(d + cortex) * (inner - hu)

    # ------------------------------------------------------------------ soft tissue
    def _paint_soft(self, h, x, y, z, d_leg) -> None:
        """Skin, subcutaneous fat, muscle (above the ankle) or fat, then tendons, in place."""
        lk, a = self.look, self.anatomy
        soft = self.soft.sample(x, y, z)
        h += self._occ(d_leg) * (lk.skin_hu - h)
        d_fat = d_leg + lk.skin_mm
        h += self._occ(d_fat) * (lk.fat_hu + 8.0 * soft - h)
        d_deep = d_fat + lk.fat_mm * a.p.habitus * (1.0 + 0.3 * soft)
        w_muscle = smoothstep(z, 5.0, 50.0) * (soft < 1.2)
        deep = w_muscle * (lk.muscle_hu + 6.0 * soft) + (1.0 - w_muscle) * (lk.fat_hu + 20.0 + 12.0 * soft)
        h += self._occ(d_deep) * (deep - h)
        zb = z / a.sl
        tcx, tcy = a._centre(a.tib_c, zb)
        tcx, tcy = tcx * a.sw, tcy * a.sw
        fcx, fcy = a._centre(a.fib_c, zb)
        fcx, fcy = fcx * a.sw, fcy * a.sw
        band = (z > -30.0) & (z < 140.0)
        hab = a.p.habitus * a.sw
        tendons = [(tcx - 5.0, tcy + 4.0 + 31.0 * hab, 7.0, 3.2),   # Achilles
                   (tcx + 9.0, tcy - 24.0 * a.sw, 3.5, 3.0),        # tibialis anterior
                   (tcx + 17.0 * a.sw, tcy + 14.0 * a.sw, 2.6, 2.6),  # tibialis posterior
                   (fcx - 1.0, fcy + 10.0 * a.sw, 2.8, 2.4)]        # peroneals
        for cx, cy, rx, ry in tendons:
            d = np.where(band, ellipse_sdf(x - cx, y - cy, rx, ry), 1e3)
            h += self._occ(d) * (lk.tendon_hu + 5.0 * soft - h)

    def _paint_cast(self, hu, x, y, z, d_leg) -> None:
        """A circular cast, or a posterior splint, around the skin (in place)."""
        lk, a = self.look, self.anatomy
        d = np.maximum(lk.cast_gap_mm - d_leg, d_leg - (lk.cast_gap_mm + lk.cast_mm))
        if lk.cast == "splint":
            tcx, tcy = a._centre(a.tib_c, z / a.sl)
            d = np.maximum(d, (tcy * a.sw + 5.0) - y)  # posterior half only
        d = np.maximum(d, z - 160.0)
        hu += self._occ(d) * (lk.cast_hu - hu)

    def _paint_haematoma(self, h, x, y, z) -> None:
        if self.f.fibula is not None:
            paint_haematoma(h, x, y, z, self.f.fibula, self.anatomy.fibula, self._occ, 0.0)

    # ------------------------------------------------------------------ bones
    def _boxes(self) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
        """Anatomy-frame boxes (lo, hi) outside which a bone cannot be (culling)."""
        a = self.anatomy
        s = np.array([a.sw, a.sw, a.sl])
        pad = 8.0 + 3.0 * a.p.field_mm
        out = {}
        for b in ("tibia", "fibula"):
            lo, hi = a.g[b].bounds()
            lo, hi = np.minimum(lo * s, lo * s * 1.2), hi * s
            out[b] = (lo - pad - 4.0, hi + pad + 4.0)
        corners = a._foot_corners()
        out["foot"] = (corners.min(axis=0) - pad, corners.max(axis=0) + pad)
        if a.other is not None:
            lo = np.array([a.p.other_dx - 70.0, a.p.other_dy - 70.0, -80.0])
            out["other"] = (lo, np.array([a.p.other_dx + 70.0, a.p.other_dy + 70.0, 500.0]))
        return out

    @staticmethod
    def _in(x, y, z, box) -> np.ndarray:
        lo, hi = box
        return np.nonzero((x > lo[0]) & (x < hi[0]) & (y > lo[1]) & (y < hi[1])
                          & (z > lo[2]) & (z < hi[2]))[0]

    def _paint_unlabelled(self, h, lab, x, y, z, boxes) -> None:
        """Talus and foot bones, then the other leg's bones (its tibia and fibula labelled)."""
        a = self.anatomy
        sel = self._in(x, y, z, boxes["foot"])
        if sel.size:
            xs, ys, zs = x[sel], y[sel], z[sel]
            hs = h[sel]
            d = np.minimum(a.talus(xs, ys, zs), a.foot(xs, ys, zs))
            self._paint_bone(hs, d, (xs, ys, zs), "foot")
            h[sel] = hs
        if self.ff_box is not None:
            self._paint_forefoot(h, x, y, z)
        # Accessory ossicles: unlabelled cancellous bone with their own rim thickness.
        self.conf.paint_ossicles(h, x, y, z, lambda hs, d, src, cortex: self._paint_bone(
            hs, d, src, "foot", cortex))
        if "other" not in boxes:
            return
        sel = self._in(x, y, z, boxes["other"])
        if sel.size:
            xs, ys, zs = x[sel], y[sel], z[sel]
            hs, ls = h[sel], lab[sel]
            for bone, d in a.other_leg(xs, ys, zs).items():
                self._paint_bone(hs, d, (xs, ys, zs), bone)
                if bone in ("tibia", "fibula"):
                    ls[d < 0] = 1 if bone == "tibia" else 2
            h[sel], lab[sel] = hs, ls

    def _paint_forefoot(self, h, x, y, z) -> None:
        """Cuneiforms, metatarsals and phalanges (unlabelled), inside their box, in place."""
        sel = self._in(x, y, z, self.ff_box)
        if sel.size:
            xs, ys, zs = x[sel], y[sel], z[sel]
            hs = h[sel]
            d, cortex, trab = self.anatomy.forefoot_bones(xs, ys, zs)
            self._paint_bone(hs, d, (xs, ys, zs), "foot", profile=(cortex, trab),
                             field=self.ff_trab)
            h[sel] = hs

    def _paint_labelled(self, h, lab, x, y, z, box, label: int) -> None:
        """Tibia (label 1) or fibula (label 2) with their fracture fragments, in place."""
        a = self.anatomy
        cut = self.f.medial if label == 1 else self.f.fibula
        if cut is not None:
            pad = float(np.abs(cut.translation).max()) + 2.0
            box = (box[0] - pad, box[1] + pad)
        sel = self._in(x, y, z, box)
        if not sel.size:
            return
        xs, ys, zs = x[sel], y[sel], z[sel]
        hs, ls = h[sel], lab[sel]
        bone = "tibia" if label == 1 else "fibula"
        sdf = self.conf.wrap_sdf(a.tibia if label == 1 else a.fibula, bone)
        if cut is None:
            parts = [(sdf(xs, ys, zs), (xs, ys, zs), None)]
        else:
            band = 0.5 * max(cut.gap_mm, self.label_band)
            side = cut.side(xs, ys, zs)
            d, src = cut.fragment(sdf, xs, ys, zs)
            parts = [(cut.parent(sdf, xs, ys, zs), (xs, ys, zs), side > band), (d, src, side < -band)]
        for d, src, keep in parts:
            self._paint_bone(hs, d, src, bone, shell=shell_sdf(cut, sdf, src, self.f.faces))
            self.conf.paint_inside(hs, d, src, bone, self._occ)
            ls[(d < 0) if keep is None else ((d < 0) & keep)] = label
        h[sel] = hs
        lab[sel] = ls

    # ------------------------------------------------------------------ metal
    def _place_metal(self, rng: np.random.Generator) -> List[Tuple[str, tuple]]:
        """Fixation hardware: a lateral fibular plate with screws, or medial malleolar screws.

        Returns:
            Primitives ("capsule", (a, b, radius)) or ("box", (centre, axes 3x3, half sizes)),
            anatomy frame, mm.
        """
        a, kind = self.anatomy, self.look.metal
        if kind == "none":
            return []
        n_lat = np.array([a.n_lat[0], a.n_lat[1], 0.0])
        if kind == "screws":
            anc = a.fracture_anchors()
            x0 = anc.tib_meta_rx - anc.mm_rx
            prims = []
            for dy in (-5.0, 5.0):
                base = np.array([x0, anc.mm_cy + dy, -6.0])
                tip = base + np.array([-8.0, 0.0, 40.0])
                prims.append(("capsule", (base, tip, 1.9)))
            return prims
        zc = self.f.fibula.centre[2] if self.f.fibula is not None else _u(rng, 10.0, 50.0)
        length = _u(rng, 70.0, 110.0)
        c0 = a.fib_centre_at(zc)
        centre = c0 + n_lat * 9.0
        t = np.array([0.0, 0.0, 1.0])
        b = np.cross(t, n_lat)
        prims = [("box", (centre, np.stack([n_lat, b, t]), np.array([1.5, 6.0, 0.5 * length])))]
        for dz in np.linspace(-0.4 * length, 0.4 * length, int(rng.integers(4, 7))):
            p = a.fib_centre_at(zc + dz)
            prims.append(("capsule", (p + n_lat * 9.0, p - n_lat * _u(rng, 6.0, 20.0), 1.75)))
        return prims

    def _metal_sdf(self, x, y, z) -> np.ndarray:
        pts = np.stack([x, y, z], axis=1)
        d = np.full(x.shape, 1e3, np.float32)
        for kind, prm in self.metal:
            if kind == "capsule":
                a, b, r = prm
                ab = b - a
                t = np.clip((pts - a) @ ab / (ab @ ab), 0.0, 1.0)
                dd = np.linalg.norm(pts - (a + t[:, None] * ab), axis=1) - r
            else:
                c, axes, half = prm
                q = np.abs((pts - c) @ axes.T) - half
                dd = np.linalg.norm(np.maximum(q, 0.0), axis=1) + np.minimum(q.max(axis=1), 0.0)
            d = np.minimum(d, dd.astype(np.float32))
        return d

    # ------------------------------------------------------------------ all of it
    def render(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """HU (float32) and label (uint8) at anatomical points given as 1-D float32 arrays."""
        if not hasattr(self, "boxes"):
            self.boxes = self._boxes()
        hu = np.full(x.shape[0], AIR_HU, np.float32)
        lab = np.zeros(x.shape[0], np.uint8)
        d_leg = self.anatomy.leg(x, y, z)
        if self.look.cast != "none":
            near = np.nonzero(d_leg < self.a.grow + self.h)[0]
            hs = hu[near]
            self._paint_cast(hs, x[near], y[near], z[near], d_leg[near])
            hu[near] = hs
        inside = np.nonzero(d_leg < self.h)[0]
        if inside.size == 0:
            return hu, lab
        x, y, z, d_leg = x[inside], y[inside], z[inside], d_leg[inside]
        h, lab_in = hu[inside], lab[inside]
        self._paint_soft(h, x, y, z, d_leg)
        self._paint_haematoma(h, x, y, z)
        self._paint_unlabelled(h, lab_in, x, y, z, self.boxes)
        self._paint_labelled(h, lab_in, x, y, z, self.boxes["tibia"], 1)
        self._paint_labelled(h, lab_in, x, y, z, self.boxes["fibula"], 2)
        if self.metal:
            h += self._occ(self._metal_sdf(x, y, z)) * (METAL_HU - h)
        hu[inside], lab[inside] = h, lab_in
        return hu, lab


# ---------------------------------------------------------------------- imaging chain
def add_streaks(ct: np.ndarray, spacing_xy: float, rng: np.random.Generator,
                metal_amp: float, bone_amp: float, cortex_hu: float) -> None:
    """Streak artefacts in each axial (array z) slice, in place.

    Around metal (>= 2900 HU): alternating bright/dark lines through the metal's centre along
    a few random angles, decaying over ~60 mm; with ``bone_amp`` > 0 the same, weaker, through
    the densest cortex (beam hardening between the tibia and fibula).

    Args:
        ct: float32 HU array (z, y, x) (axial slices along the first axis).
        spacing_xy: In-plane voxel size (mm).
        rng: Random generator.
        metal_amp: Peak streak amplitude (HU) around metal.
        bone_amp: Peak amplitude (HU) around dense cortex (0: none).
        cortex_hu: The case's cortical density (dense-bone threshold is 85 % of it).
    """
    ny, nx = ct.shape[1:]
    jj, ii = np.mgrid[0:ny, 0:nx].astype(np.float32)
    angles = rng.uniform(0.0, np.pi, size=8)
    signs = rng.choice([-1.0, 1.0], size=8)
    for k in range(ct.shape[0]):
        for thr, amp in ((2900.0, metal_amp), (0.85 * cortex_hu, bone_amp)):
            if amp <= 0:
                continue
            m = ct[k] >= thr
            if m.sum() < 3:
                continue
            cj, ci = np.argwhere(m).mean(axis=0)
            r = np.hypot(jj - cj, ii - ci) * spacing_xy
            decay = np.exp(-r / 60.0) * (r > 3.0)
            for ang, sg in zip(angles, signs):
                dist = np.abs((ii - ci) * np.sin(ang) - (jj - cj) * np.cos(ang)) * spacing_xy
                ct[k] += sg * amp * decay * np.exp(-0.5 * (dist / 1.2) ** 2)


def finish_image(ct: np.ndarray, look: Appearance, spacing: Tuple[float, float, float],
                 rng: np.random.Generator) -> np.ndarray:
    """Reconstruction kernel and streaks on a rendered float32 HU volume (z, y, x); int16 out.

    The bone kernel's edge enhancement is an unsharp mask (``look.sharpen``, 1-voxel sigma).
    """
    if look.sharpen > 0:
        blur = ndimage.gaussian_filter(ct, 1.0, mode="nearest")
        ct += np.float32(look.sharpen) * (ct - blur)
        del blur
    metal_amp = _u(rng, 250.0, 700.0) if look.metal != "none" else 0.0
    if metal_amp or look.bone_streaks:
        add_streaks(ct, float(spacing[0]), rng, metal_amp, look.bone_streaks, look.cortex_hu)
    np.clip(np.rint(ct), HU_MIN, HU_MAX, out=ct)
    return ct.astype(np.int16)
