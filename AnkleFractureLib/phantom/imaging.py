"""From implicit anatomy to a CT volume: grid choice, tissue composition, partial volume, noise.

Rendering works point-wise in the canonical anatomical frame (mm): every voxel centre of the
target grid is mapped (ITK index -> patient LPS -> anatomical) and the tissues are painted back
to front (air, skin, fat, muscle, haematoma, tendons/vessels, bones), each with a fractional
coverage ``clip(0.5 - d / h, 0, 1)`` computed from its signed distance ``d`` and the voxel size
``h``: an analytic partial-volume effect that keeps 1 mm cortices visible on 1 mm voxels.
A Gaussian point-spread function (~0.5 voxel sigma) and Gaussian noise follow.

The volume is processed in slabs along the array's first axis (ITK k), so memory stays
bounded for 512 x 512 x 400 clinical grids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from AnkleFractureLib.phantom.anatomy import Anatomy, smoothstep
from AnkleFractureLib.phantom.confounders import Confounders
from AnkleFractureLib.phantom.fractures import FractureModel, shell_sdf

HU_MIN, HU_MAX = -1024, 3071
AIR_HU = -1000.0
HAEMATOMA_HU = 65.0

#: Voxel-size ranges (mm) per spacing mode: (in-plane lo, hi), (slice lo, hi).
SPACING_RANGES = {
    "fast": ((0.7, 1.0), (1.0, 1.5)),
    "clinical": ((0.3, 0.45), (0.5, 0.7)),
}
CLINICAL_INPLANE = 512
CLINICAL_SLICES = (300, 400)

#: Anatomical z range (mm) the grid must cover: below the malleolar tips to above C fractures.
Z_COVER = (-46.0, 132.0)


# ---------------------------------------------------------------------- grid choice
@dataclass
class GridSpec:
    """An image grid: ITK size (nx, ny, nz), spacing (x, y, z) mm, origin LPS mm, direction."""

    size: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: np.ndarray
    direction_kind: str


def _rot(axis: int, deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    r = np.eye(3)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    r[i, i] = r[j, j] = c
    r[i, j], r[j, i] = -s, s
    return r


def sample_direction(rng: np.random.Generator) -> Tuple[np.ndarray, str]:
    """Image direction (columns = i, j, k axes in LPS): identity ~70%, else flips/permutations/oblique."""
    u = rng.uniform()
    kind = int(rng.integers(0, 4))
    angles = rng.uniform(-12.0, 12.0, size=3)
    if u >= 0.3:
        return np.eye(3), "identity"
    if kind == 0:  # feet-first / flipped axial acquisition
        return np.diag([-1.0, -1.0, 1.0]) if angles[0] > 0 else np.diag([1.0, -1.0, -1.0]), "flipped"
    if kind == 1:  # sagittal: i = posterior, j = inferior, k = left
        return np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]), "sagittal"
    if kind == 2:  # coronal: i = left, j = inferior, k = posterior
        return np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]), "coronal"
    return _rot(0, angles[0]) @ _rot(1, angles[1]) @ _rot(2, angles[2]), "oblique"


def choose_grid(rng: np.random.Generator, mode: str, points_lps: np.ndarray,
                direction: np.ndarray, direction_kind: str) -> GridSpec:
    """Pick spacing, size and origin of a grid that holds ``points_lps`` (N, 3) with margin.

    Args:
        rng: Random generator.
        mode: "fast" or "clinical" (see :data:`SPACING_RANGES`).
        points_lps: Points (LPS mm) that must lie inside the grid (leg outline with air margin).
        direction: 3x3 direction cosines (columns = i, j, k in LPS).
        direction_kind: Label stored in the case info.

    Returns:
        The grid. "clinical" grids are 512 x 512 in-plane with 300-400 slices; the in-plane
        spacing is raised above its random draw (up to 0.45 mm) when the anatomy needs it, and
        the field of view is centred on the anatomy otherwise.
    """
    (ip_lo, ip_hi), (sl_lo, sl_hi) = SPACING_RANGES[mode]
    sp_in = float(rng.uniform(ip_lo, ip_hi))
    sp_sl = float(rng.uniform(sl_lo, sl_hi))
    jitter = rng.uniform(-1.0, 1.0, size=3)
    q = points_lps @ direction  # coordinates along the i, j, k axes
    qmin, qmax = q.min(axis=0), q.max(axis=0)
    ext = qmax - qmin
    if mode == "fast":
        spacing = np.array([sp_in, sp_in, sp_sl])
        size = np.ceil(ext / spacing).astype(int) + 1
    else:
        need_in = max(ext[0], ext[1]) / (CLINICAL_INPLANE - 1)
        sp_in = max(sp_in, need_in)
        need_sl = ext[2] / (CLINICAL_SLICES[1] - 1)
        sp_sl = max(sp_sl, need_sl)
        if sp_in > ip_hi + 1e-9 or sp_sl > sl_hi + 1e-9:
            raise ValueError(f"anatomy ({ext.round(1)} mm) does not fit a clinical grid")
        spacing = np.array([sp_in, sp_in, sp_sl])
        nz = int(np.clip(np.ceil(ext[2] / sp_sl) + 1, *CLINICAL_SLICES))
        size = np.array([CLINICAL_INPLANE, CLINICAL_INPLANE, nz])
    fov = (size - 1) * spacing
    slack = fov - ext  # >= 0; spread it around the anatomy, a little off-centre
    start = qmin - slack * (0.5 + 0.3 * jitter * (mode == "clinical"))
    origin = direction @ start
    return GridSpec(tuple(int(s) for s in size), tuple(float(s) for s in spacing),
                    tuple(float(o) for o in origin), direction, direction_kind)


# ---------------------------------------------------------------------- texture
class NoiseField:
    """Smooth random field (unit std) on a lattice in the anatomical frame, trilinearly sampled.

    Args:
        rng: Random generator.
        lo, hi: Lattice box corners (x, y, z) in anatomical mm.
        step: Lattice spacing in mm.
        sigma_mm: Low-pass scale (mm).
        highpass_mm: If given, subtract a blur at this scale (band-pass, trabecular look).
    """

    def __init__(self, rng: np.random.Generator, lo, hi, step: float, sigma_mm: float,
                 highpass_mm: Optional[float] = None) -> None:
        self.lo = np.asarray(lo, dtype=float)
        self.step = float(step)
        shape = tuple(int(np.ceil((h - l) / step)) + 1 for l, h in zip(lo, hi))  # (x, y, z)
        white = rng.standard_normal(size=shape, dtype=np.float32)
        f = ndimage.gaussian_filter(white, sigma_mm / step, mode="wrap")
        if highpass_mm is not None:
            f -= ndimage.gaussian_filter(f, highpass_mm / step, mode="wrap")
        f /= max(float(f.std()), 1e-6)
        self.field = f

    def sample(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Field value at anatomical points (mm); edge values outside the lattice."""
        coords = np.stack([(x - self.lo[0]) / self.step, (y - self.lo[1]) / self.step,
                           (z - self.lo[2]) / self.step])
        return ndimage.map_coordinates(self.field, coords, order=1, mode="nearest").astype(np.float32)


# ---------------------------------------------------------------------- tissue composition
class Renderer:
    """Paints HU and labels at anatomical points for one case.

    Args:
        anatomy: The intact anatomy.
        fracture: The fracture model.
        rng: Random generator for the texture lattices.
        voxel_mm: Nominal voxel size (mm) for the partial-volume ramp and texture scale.
        label_band_mm: Minimum width (mm) of the unlabelled band left across a fracture in the
            label map. The CT keeps the physical 0.5-2 mm gap, but at voxel level such a gap
            does not disconnect the fragments; with a band wider than the largest voxel step,
            fracture fragments are separate 6-connected label components (as in manual
            fragment-wise ground truth).
        confounders: Fracture mimics on intact bone (:mod:`~AnkleFractureLib.phantom.confounders`);
            None or an empty set renders exactly as without.
    """

    def __init__(self, anatomy: Anatomy, fracture: FractureModel, rng: np.random.Generator,
                 voxel_mm: float, label_band_mm: float = 0.0,
                 confounders: Optional[Confounders] = None) -> None:
        self.a = anatomy
        self.conf = confounders if confounders is not None else Confounders([])
        self.label_band = float(label_band_mm)
        self.f = fracture
        self.h = float(voxel_mm)
        self.tubes = anatomy.tubes()
        step = 0.6 if voxel_mm < 0.6 else 0.9
        self.trab = NoiseField(rng, (-60, -60, -85), (45, 70, 150), step, 0.55, 2.0)
        self.soft = NoiseField(rng, (-100, -130, -85), (90, 120, 175), 2.0, 4.0)
        p = anatomy.p
        # Boxes (anatomical mm) outside which a bone cannot be: skip those points entirely.
        fx = anatomy.prof.fib_cx
        self.box_tib = (-p.tib_meta_rx - 3, p.tib_meta_rx + 4, -p.tib_meta_ry - 3, p.tib_meta_ry + 3,
                        -p.mm_depth - 3, 200.0)
        self.box_fib = (fx.min() - 20, fx.max() + 20, p.fib_y0 - 20, p.fib_y0 + 25,
                        -p.fib_tip_depth - 8, 200.0)
        self.box_foot = (-60.0, 50.0, -80.0, 80.0, -100.0, 0.0)

    def _occ(self, d: np.ndarray) -> np.ndarray:
        return np.clip(0.5 - d / self.h, 0.0, 1.0).astype(np.float32)

    @staticmethod
    def _in_box(x, y, z, box) -> np.ndarray:
        return (x > box[0]) & (x < box[1]) & (y > box[2]) & (y < box[3]) & (z > box[4]) & (z < box[5])

    def _paint_bone(self, hu, d, src, cortex_mm, trab_frac, cortex_hu, shell=None) -> None:
        """Cortex (``cortex_mm`` thick) then textured cancellous/marrow inside, in place.
        ``shell``: the SDF whose depth sets the cortex (the intact bone's, for a fracture part
        with raw faces: :func:`~AnkleFractureLib.phantom.fractures.shell_sdf`); None: ``d``."""
        p = self.a.p
        tex = self.trab.sample(*src)
        # Trabecular bone: skewed texture (plates and rods brighter than the marrow between).
        trab = p.trab_hu + p.trab_amp * (tex + 0.35 * tex * tex - 0.35)
        inner = trab_frac * trab + (1.0 - trab_frac) * (p.marrow_hu + 12.0 * tex)
        if shell is not None:  # raw faces: the part's material, then its partial volume
            hu += self._occ(d) * (raw_face_material(self._occ, shell, cortex_mm, cortex_hu,
                                                    inner) - hu)
            return
        occ = self._occ(d)
        hu += occ * (cortex_hu - hu)
        occ = self._occ(d + cortex_mm)
        hu += occ * (inner - hu)

    def render(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """HU (float32) and label (uint8) at anatomical points given as 1-D float32 arrays."""
        a, p, f = self.a, self.a.p, self.f
        n = x.shape[0]
        hu = np.full(n, AIR_HU, np.float32)
        lab = np.zeros(n, np.uint8)
        d_leg = a.leg(x, y, z)
        inside = np.nonzero(d_leg < self.h)[0]
        if inside.size == 0:
            return hu, lab
        x, y, z, d_leg = x[inside], y[inside], z[inside], d_leg[inside]
        h = hu[inside]
        soft = self.soft.sample(x, y, z)
        # Skin, subcutaneous fat, then deep tissue: muscle above the ankle, fat + tendons below.
        h += self._occ(d_leg) * (p.skin_hu - h)
        d_fat = d_leg + p.skin_mm
        h += self._occ(d_fat) * (p.fat_hu + 8.0 * soft - h)
        d_deep = d_fat + p.fat_mm * (1.0 + 0.3 * soft)
        w_muscle = smoothstep(z, 0.0, 45.0) * (soft < 1.3)  # fatty septa where the field peaks
        deep = p.muscle_hu + 6.0 * soft
        deep = w_muscle * deep + (1.0 - w_muscle) * (p.fat_hu + 15.0 + 10.0 * soft)
        h += self._occ(d_deep) * (deep - h)
        # Fracture haematoma around the fibular fracture.
        if f.fibula is not None:
            paint_haematoma(h, x, y, z, f.fibula, a.fibula, self._occ, 8.0 * soft)
        # Tendons and vessels.
        for tube in self.tubes:
            sel = np.nonzero(self._in_box(x, y, z, tube.box))[0]
            if sel.size:
                d = tube.sdf(x[sel], y[sel], z[sel])
                hs = h[sel]
                hs += self._occ(d) * (tube.hu - hs)
                h[sel] = hs
        # Bones. Hindfoot (unlabelled) first, then tibia and fibula.
        sel = np.nonzero(self._in_box(x, y, z, self.box_foot))[0]
        if sel.size:
            xs, ys, zs = x[sel], y[sel], z[sel]
            hs = h[sel]
            d = np.minimum(a.talus(xs, ys, zs), a.hindfoot(xs, ys, zs))
            self._paint_bone(hs, d, (xs, ys, zs), 1.0, 1.0, p.cortex_hu - 150.0)
            h[sel] = hs
        # Accessory ossicles: unlabelled bone, as dense as the foot bones.
        self.conf.paint_ossicles(h, x, y, z, lambda hs, d, src, cortex: self._paint_bone(
            hs, d, src, cortex, 1.0, p.cortex_hu - 150.0))
        lab_in = lab[inside]
        self._paint_labelled(h, lab_in, x, y, z, self.box_tib, 1)
        self._paint_labelled(h, lab_in, x, y, z, self.box_fib, 2)
        hu[inside] = h
        lab[inside] = lab_in
        return hu, lab

    def _paint_labelled(self, h, lab, x, y, z, box, label: int) -> None:
        """Paint tibia (label 1) or fibula (label 2), with their fracture fragments, in place."""
        a, p = self.a, self.a.p
        cut = self.f.medial if label == 1 else self.f.fibula
        if cut is not None:
            pad = float(np.abs(cut.translation).max()) + 2.0
            box = (box[0] - pad, box[1] + pad, box[2] - pad, box[3] + pad, box[4] - pad, box[5])
        sel = np.nonzero(self._in_box(x, y, z, box))[0]
        if not sel.size:
            return
        xs, ys, zs = x[sel], y[sel], z[sel]
        hs, ls = h[sel], lab[sel]
        bone = "tibia" if label == 1 else "fibula"
        sdf = self.conf.wrap_sdf(a.tibia if label == 1 else a.fibula, bone)
        prefix = "tib" if label == 1 else "fib"
        parts = []
        if cut is None:
            parts.append((sdf(xs, ys, zs), (xs, ys, zs), None))
        else:
            band = 0.5 * max(cut.gap_mm, self.label_band)
            side = cut.side(xs, ys, zs)
            parts.append((cut.parent(sdf, xs, ys, zs), (xs, ys, zs), side > band))
            d, src = cut.fragment(sdf, xs, ys, zs)
            parts.append((d, src, side < -band))
        for d, src, keep in parts:
            zz = src[2]
            cortex, trab = a.prof.lookup(zz, prefix + "_cortex", prefix + "_trab")
            self._paint_bone(hs, d, src, cortex, trab, p.cortex_hu,
                             shell_sdf(cut, sdf, src, self.f.faces))
            self.conf.paint_inside(hs, d, src, bone, self._occ)
            ls[(d < 0) if keep is None else ((d < 0) & keep)] = label
        h[sel] = hs
        lab[sel] = ls


def raw_face_material(occ: Any, shell: np.ndarray, cortex_mm: Any, cortex_hu: Any,
                      inner: np.ndarray) -> np.ndarray:
    """HU of a fracture part's bone with raw faces, before its own partial volume: cortex
    within ``cortex_mm`` of the intact bone's surface (``shell``, its SDF in mm), ``inner``
    deeper. Painting the cortex over the whole part and then the inside (as for a whole bone)
    would leave, where a cut face is partly in a voxel, a quarter of the cortex's HU: a bright
    rim on every raw face, which a gap of a few tenths of a mm then shows as a dense line.

    Args:
        occ: The renderer's distance (mm) -> partial-volume coverage in [0, 1].
        shell: SDF (mm) of the intact bone at the part's source points (1-D).
        cortex_mm: Cortex thickness (mm; scalar or per point).
        cortex_hu: Cortex HU (scalar or per point).
        inner: Cancellous bone / marrow HU at the points (1-D).

    Example:
        >>> occ = lambda d: np.clip(0.5 - d / 0.5, 0.0, 1.0)
        >>> raw_face_material(occ, np.array([-0.2, -5.0]), 1.0, 1500.0, np.array([300.0, 300.0]))
        array([1500.,  300.])
    """
    return inner + (1.0 - occ(shell + cortex_mm)) * (cortex_hu - inner)


def paint_haematoma(h: np.ndarray, x, y, z, cut: "Any", fibula: "Any", occ: "Any",
                    texture: "np.ndarray | float") -> None:
    """Paint the haematoma (HU) that fills and surrounds a fibular fracture gap, in place.

    Args:
        h: HU at the points (1-D float32), modified in place.
        x, y, z: Anatomical points (mm).
        cut: The fibular :class:`~AnkleFractureLib.phantom.fractures.PlaneCut`.
        fibula: Signed distance function of the intact fibula (mm).
        occ: Distance (mm) -> partial-volume coverage in [0, 1].
        texture: HU variation added to :data:`HAEMATOMA_HU` (per point, or a constant).
    """
    sel = np.nonzero(np.abs(cut.side(x, y, z)) < cut.gap_mm + 6.0)[0]
    if not sel.size:
        return
    xs, ys, zs = x[sel], y[sel], z[sel]
    qx, qy, qz = cut.inverse_points(xs, ys, zs)
    near = np.minimum(fibula(xs, ys, zs), fibula(qx, qy, qz)) - 2.0
    near = np.maximum(near, np.abs(cut.side(xs, ys, zs)) - (0.5 * cut.gap_mm + 2.5))
    tex = texture[sel] if isinstance(texture, np.ndarray) else texture
    hs = h[sel]
    hs += occ(near) * (HAEMATOMA_HU + tex - hs)
    h[sel] = hs


# ---------------------------------------------------------------------- rasterisation
def psf_kernel_gain(sigma_vox: float) -> float:
    """Std reduction factor of white noise after a 1-D sampled Gaussian of ``sigma_vox``."""
    r = int(4.0 * sigma_vox + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_vox) ** 2)
    k /= k.sum()
    return float(np.sqrt((k * k).sum()))


def rasterise(renderer: Renderer, grid: GridSpec, patient_to_anatomy: np.ndarray,
              noise_sd: float, noise_key: Sequence[int], slab: int = 24,
              psf_sigma_vox: float = 0.5) -> Tuple[np.ndarray, np.ndarray]:
    """Render the CT (int16 HU) and label (uint8) arrays (z, y, x) of ``grid``.

    Args:
        renderer: Tissue model.
        grid: Target grid.
        patient_to_anatomy: 4x4 matrix LPS mm -> anatomical mm.
        noise_sd: Standard deviation of the final image noise (HU).
        noise_key: Seed prefix of the per-slice noise streams (slice ``k`` uses ``[*key, k]``).
        slab: Slices per slab (memory vs overhead).
        psf_sigma_vox: Gaussian point-spread sigma in voxels (each axis).

    Returns:
        (ct, label) arrays in numpy (z, y, x) order.
    """
    nx, ny, nz = grid.size
    m = patient_to_anatomy[:3, :3] @ grid.direction @ np.diag(grid.spacing)  # index -> anatomy
    b = patient_to_anatomy[:3, :3] @ np.asarray(grid.origin) + patient_to_anatomy[:3, 3]
    m = m.astype(np.float32)
    block = 8
    ct = np.empty((nz, ny, nx), np.int16)
    label = np.empty((nz, ny, nx), np.uint8)
    halo = int(np.ceil(4.0 * psf_sigma_vox)) if psf_sigma_vox > 0 else 0
    # Noise is added before the PSF (so it comes out spatially correlated, as in real CT),
    # scaled so that its std after the PSF is noise_sd.
    gain = psf_kernel_gain(psf_sigma_vox) ** 3 if psf_sigma_vox > 0 else 1.0
    for k0 in range(0, nz, slab):
        k1 = min(nz, k0 + slab)
        a0, a1 = max(0, k0 - halo), min(nz, k1 + halo)
        shape = (a1 - a0, ny, nx)
        # Cull air: test the skin SDF at the centres of 8 x 8 (x slab) voxel blocks and only
        # render blocks that can touch the leg (most of a clinical field of view is air).
        kc = 0.5 * (a0 + a1 - 1)
        ci = np.arange(nx // block + 1, dtype=np.float32) * block + 0.5 * (block - 1)
        cj = np.arange(ny // block + 1, dtype=np.float32) * block + 0.5 * (block - 1)
        cc = [(m[r, 0] * ci[None, :] + m[r, 1] * cj[:, None] + (m[r, 2] * kc + b[r])).ravel()
              for r in range(3)]
        half = 0.5 * np.linalg.norm(m @ np.array([block, block, a1 - a0], dtype=np.float32))
        near = renderer.a.leg(*[c.astype(np.float32) for c in cc]) < 1.5 * half + 2.0 * renderer.h
        near = near.reshape(cj.size, ci.size)
        near = np.repeat(np.repeat(near, block, axis=0), block, axis=1)[:ny, :nx]
        hu = np.full(shape, AIR_HU, np.float32)
        lab = np.zeros(shape, np.uint8)
        jv, iv = np.nonzero(near)
        if jv.size:
            kv = np.arange(a0, a1, dtype=np.float32)[:, None]
            iv32, jv32 = iv.astype(np.float32)[None, :], jv.astype(np.float32)[None, :]
            coords = [((m[r, 0] * iv32 + m[r, 1] * jv32) + (m[r, 2] * kv + np.float32(b[r]))).ravel()
                      for r in range(3)]
            h_act, l_act = renderer.render(*coords)
            del coords
            hu[:, jv, iv] = h_act.reshape(a1 - a0, jv.size)
            lab[:, jv, iv] = l_act.reshape(a1 - a0, jv.size)
            del h_act, l_act
        # One noise stream per slice ([*key, k]) so that halo slices get the same noise as in
        # their own slab: no seams at slab boundaries, and independent of the slab size.
        for k in range(a0, a1):
            rng = np.random.default_rng([*noise_key, k])
            noise = rng.standard_normal(size=(ny, nx), dtype=np.float32)
            noise *= np.float32(noise_sd / gain)
            hu[k - a0] += noise
        del noise
        if psf_sigma_vox > 0:
            hu = ndimage.gaussian_filter(hu, psf_sigma_vox, mode="nearest", truncate=4.0)
        out = hu[k0 - a0:k1 - a0]
        np.clip(np.rint(out), HU_MIN, HU_MAX, out=out)
        ct[k0:k1] = out.astype(np.int16)
        label[k0:k1] = lab[k0 - a0:k1 - a0]
    return ct, label


def spacing_summary(grid: GridSpec) -> Dict[str, object]:
    """Grid description for ``info`` (JSON-friendly)."""
    return {"size": list(grid.size), "spacing": [round(s, 5) for s in grid.spacing],
            "direction": [round(float(v), 6) for v in grid.direction.reshape(-1)],
            "direction_kind": grid.direction_kind}
