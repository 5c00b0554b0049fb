"""Domain randomisation of segmentation training patches (SynthSeg-style appearance draws for CT).

Anchor: Billot et al., "SynthSeg: Segmentation of brain MRI scans of any contrast and
resolution without retraining", Medical Image Analysis 86 (2023) 102789. A network trained on
images whose appearance (tissue intensities, bias field, resolution, noise) is redrawn for every
sample cannot rely on one scanner's look and learns shape and edges instead. Our network is
trained on synthetic phantoms and fails on real CT in ways that show it learned the phantom's
exact HU (the distal tibia's cancellous interior labelled as a separate blob, the talus labelled
tibia), so each training patch gets a random appearance here.

Units and shapes: a patch is float32 (z, y, x) in the model's *normalised units*, exactly what
:class:`~AnkleFractureLib.training.seg_data.PreparedCase` holds: the HU window
``[lo, hi]`` (plans, default [-1000, 2000]) mapped linearly to [0, 1]. So 0 is air
(-1000 HU), 1/3 is water and the unit is proportional to attenuation above air, which makes a
multiplicative bias field a change of attenuation that keeps air at air. Tissue bands are given
in HU and converted with the window. The output is clipped to [0, 1], as
:func:`~AnkleFractureLib.preprocessing.normalize_hu` clips a real CT. The label (uint8 (z, y, x))
is only changed by the one spatial component, the field-of-view truncation, which cuts image and
label identically (what the scan does not show cannot be labelled).

Components, applied in this order (each with its own probability; see :class:`RandomiseConfig`):

* ``remap``: per-tissue intensities without tissue labels: a random piecewise-linear HU -> HU
  map through control points in the tissue bands (air, fat, soft tissue/muscle, cancellous
  bone, cortical bone). Mostly monotone; a share of draws is non-monotone (fat brighter than
  muscle, cancellous bone darker than soft tissue, as in fatty or osteoporotic marrow), but the
  cortical band always stays >= 300 HU above soft tissue and fat: in CT the order of
  attenuation is physics (calcium), real scanners never invert it, and the cortical shell is
  the edge that defines the label. Inverting it would train for a contrast that never occurs.
* ``blobs``: very bright small spheres (metal, contrast, calcifications), not labelled.
* ``hardware``: a fixation plate on one side of the fibula (or tibia) with screws through the
  bone and streaks in the screws' slices (:mod:`~AnkleFractureLib.training.seg_hardware`);
  the label is kept (a screw in the bone stays bone, the plate stays background). Off in the
  presets (``p_hardware`` 0): ``train-seg --hardware P`` switches it on.
* ``bias``: smooth multiplicative field (MONAI ``RandBiasField``, Legendre degree 3): cupping,
  scatter, calibration drift.
* ``lowres``: slice thickness: box average along z over 1.5-3 mm slices and linear
  interpolation back (MONAI's ``RandSimulateLowResolution`` zooms all axes alike, so this is own).
* ``blur``: anisotropic Gaussian point-spread function (``scipy.ndimage``: MONAI's
  ``GaussianSmooth`` costs 9 ms at sigma 1 and 70 ms at sigma 2 per 80^3 patch on one core).
* ``streaks``: metal-like bright/dark lines radiating in a few axial slices, not labelled.
* ``noise``: white Gaussian noise and/or correlated (low-pass) noise, as CT kernels colour it.
* ``sharpen``: unsharp mask (a bone-kernel look; after the noise, so it sharpens that too).
* ``gamma``: MONAI ``AdjustContrast``.
* ``fov``: field-of-view truncation: a slab at a patch edge (scan range or in-plane field of
  view) or the outside of a reconstruction circle becomes air and background, so the network
  sees bones cut by the scan edge.

Every draw comes from one ``numpy.random.Generator``: each component gets a child generator
seeded from it (in a fixed order), so a patch depends only on the generator's state, and
changing one component's probability leaves the other components' draws unchanged.

Example:
    >>> img = np.full((16, 16, 16), 1000.0 / 3000.0, np.float32)   # water
    >>> lab = np.zeros((16, 16, 16), np.uint8)
    >>> out, lab2 = randomise_patch(img, lab, np.random.default_rng(0), randomise_config("full"))
    >>> out.shape, str(out.dtype), bool(out.min() >= 0.0 and out.max() <= 1.0)
    ((16, 16, 16), 'float32', True)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from AnkleFractureLib.segmentation.plans import SegPlans

#: Names accepted by :func:`randomise_config` (and ``train-seg --randomise``).
LEVELS = ("off", "light", "full")

#: Control points of the intensity remap: (tissue band, HU knot, monotone target range HU,
#: non-monotone target range HU). Air (-1000 HU) stays fixed: it is what the scan shows outside
#: the body, the padding outside a case and the sliding-window padding at inference.
TISSUE_BANDS: Tuple[Tuple[str, float, Tuple[float, float], Tuple[float, float]], ...] = (
    ("fat", -100.0, (-300.0, 50.0), (-300.0, 200.0)),
    ("soft_tissue", 40.0, (-100.0, 200.0), (-150.0, 250.0)),
    ("cancellous_bone", 300.0, (0.0, 800.0), (-150.0, 800.0)),
    ("cortical_bone", 1500.0, (500.0, 2000.0), (500.0, 2000.0)),
    ("dense_top", 2000.0, (1200.0, 2000.0), (1200.0, 2000.0)),
)
#: Minimum HU by which the cortical band stays above soft tissue and fat in every draw.
CORTICAL_MARGIN_HU = 300.0
#: Entries of the remap look-up table over [0, 1] (0.73 HU steps for a 3000 HU window).
LUT_SIZE = 4097

# "hardware" comes last in this tuple (it is applied after "blobs"): each component's child
# generator is spawned by position, so appending keeps every earlier component's draws.
COMPONENTS = ("remap", "blobs", "bias", "lowres", "blur", "streaks", "noise", "sharpen",
              "gamma", "fov", "hardware")
Params = Dict[str, Dict[str, Any]]


# ------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class RandomiseConfig:
    """Probabilities and strength of the domain randomisation (all per patch).

    Attributes:
        level: Name of the preset it came from ("light", "full" or "custom"); recorded only.
        strength: Scales every amplitude in [0, 1]: 0 changes nothing, 1 is the full range
            (documented per component in :func:`draw_randomisation`).
        p_remap: Probability of the per-tissue intensity remap.
        p_nonmonotone: Share of the remaps that are non-monotone.
        p_bias: Probability of a multiplicative bias field.
        p_lowres: Probability of a thick-slice simulation along z.
        p_blur: Probability of a Gaussian blur.
        p_streaks: Probability of metal-like streaks.
        p_noise: Probability of white Gaussian noise.
        p_corr_noise: Probability of correlated noise (independent of ``p_noise``).
        p_sharpen: Probability of an unsharp mask.
        p_gamma: Probability of a gamma change.
        p_blobs: Probability of bright unlabelled blobs.
        p_fov: Probability of a field-of-view truncation (image and label).
        p_hardware: Probability of a fixation plate with screws (label kept); 0 in the
            presets, so that models trained before it existed keep their configuration.
        hu_window: (lower, upper) HU of the normalisation (the plans' ``hu_window``).
        spacing_mm: Patch voxel size (x, y, z) in mm (the plans' ``model_spacing_mm``).
    """

    level: str = "custom"
    strength: float = 1.0
    p_remap: float = 0.8
    p_nonmonotone: float = 0.25
    p_bias: float = 0.4
    p_lowres: float = 0.3
    p_blur: float = 0.3
    p_streaks: float = 0.1
    p_noise: float = 0.5
    p_corr_noise: float = 0.3
    p_sharpen: float = 0.2
    p_gamma: float = 0.3
    p_blobs: float = 0.15
    p_fov: float = 0.2
    p_hardware: float = 0.0
    hu_window: Tuple[float, float] = (-1000.0, 2000.0)
    spacing_mm: Tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        bad = [f.name for f in dataclasses.fields(self)
               if f.name.startswith("p_") and not 0.0 <= getattr(self, f.name) <= 1.0]
        if bad or not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"probabilities and strength must be in [0, 1]: {bad or 'strength'}")
        if not self.hu_window[1] > self.hu_window[0] or min(self.spacing_mm) <= 0:
            raise ValueError("hu_window must be increasing and spacing_mm positive")

    @classmethod
    def none(cls) -> "RandomiseConfig":
        """Every probability 0: the patch is only clipped to [0, 1] (for tests)."""
        return cls(**{f.name: 0.0 for f in dataclasses.fields(cls) if f.name.startswith("p_")})

    def only(self, component: str, **overrides: Any) -> "RandomiseConfig":
        """This config with every component off but ``component`` (probability 1).

        ``component`` is one of :data:`COMPONENTS`; "noise" switches on white and correlated
        noise. ``overrides`` set further fields (e.g. ``p_nonmonotone=1.0``).
        """
        if component not in COMPONENTS:
            raise ValueError(f"unknown component {component!r}; one of {COMPONENTS}")
        probs = {f.name: 0.0 for f in dataclasses.fields(self) if f.name.startswith("p_")}
        probs.pop("p_nonmonotone")
        probs[f"p_{component}"] = 1.0
        if component == "noise":
            probs["p_corr_noise"] = 1.0
        return dataclasses.replace(self, **{**probs, **overrides})

    def to_json(self) -> Dict[str, Any]:
        """Plain dict (lists, floats, str) for training.json and checkpoints."""
        d = dataclasses.asdict(self)
        d["hu_window"], d["spacing_mm"] = list(self.hu_window), list(self.spacing_mm)
        return d

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "RandomiseConfig":
        """Inverse of :meth:`to_json` (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        for key in ("hu_window", "spacing_mm"):
            if key in kw:
                kw[key] = tuple(float(v) for v in kw[key])
        return cls(**kw)


def randomise_config(level: "str | RandomiseConfig | Dict[str, Any] | None",
                     plans: Optional["SegPlans"] = None) -> Optional[RandomiseConfig]:
    """The config of a preset name (or a config / its JSON), on the plans' window and spacing.

    Args:
        level: "off" or None (no randomisation), "light" (half strength, about half the
            probabilities, no non-monotone remaps and no streaks), "full" (the
            :class:`RandomiseConfig` defaults), a :class:`RandomiseConfig` or its
            :meth:`~RandomiseConfig.to_json` dict.
        plans: Segmentation plans whose ``hu_window`` and ``model_spacing_mm`` replace the
            config's (None: keep them).

    Returns:
        The config, or None for "off".

    Raises:
        ValueError: Unknown level name.
    """
    if level is None or level == "off":
        return None
    if isinstance(level, RandomiseConfig):
        cfg = level
    elif isinstance(level, dict):
        cfg = RandomiseConfig.from_json(level)
    elif level == "full":
        cfg = RandomiseConfig(level="full")
    elif level == "light":
        cfg = RandomiseConfig(level="light", strength=0.5, p_remap=0.5, p_nonmonotone=0.0,
                              p_bias=0.25, p_lowres=0.2, p_blur=0.2, p_streaks=0.0, p_noise=0.3,
                              p_corr_noise=0.15, p_sharpen=0.1, p_gamma=0.2, p_blobs=0.05,
                              p_fov=0.1)
    else:
        raise ValueError(f"randomise must be one of {list(LEVELS)}, got {level!r}")
    if plans is not None:
        cfg = dataclasses.replace(cfg, hu_window=tuple(float(v) for v in plans.hu_window),
                                  spacing_mm=tuple(float(v) for v in plans.model_spacing_mm))
    return cfg


def hu_to_unit(hu: "float | np.ndarray", window: Sequence[float]) -> "float | np.ndarray":
    """HU -> normalised units of ``window`` (lower -> 0, upper -> 1), not clipped."""
    return (hu - window[0]) / (window[1] - window[0])


# ------------------------------------------------------------------------------ components
def remap_intensity(image: np.ndarray, knots_hu: Sequence[float], targets_hu: Sequence[float],
                    window: Sequence[float]) -> np.ndarray:
    """Piecewise-linear HU -> HU map through control points, applied by a look-up table.

    Args:
        image: float32 (z, y, x), normalised units of ``window``.
        knots_hu: Increasing control-point positions (HU); the window's ends are added as
            fixed points where missing (air -> air; the upper end maps like the last knot).
        targets_hu: Target HU of each knot (any order: non-monotone maps are allowed).
        window: (lower, upper) HU of the normalisation.

    Returns:
        float32 (z, y, x), normalised units.
    """
    xs = [float(window[0])] + [float(k) for k in knots_hu]
    ys = [float(window[0])] + [float(t) for t in targets_hu]
    if xs[-1] < window[1]:
        xs.append(float(window[1]))
        ys.append(ys[-1])
    grid = np.linspace(0.0, 1.0, LUT_SIZE)
    lut = hu_to_unit(np.interp(window[0] + grid * (window[1] - window[0]), xs, ys), window)
    # A table of 4097 entries costs ~1 ms per 80^3 patch where np.interp costs ~9 ms.
    idx = np.clip(image * (LUT_SIZE - 1) + 0.5, 0, LUT_SIZE - 1).astype(np.int32)
    return lut.astype(np.float32)[idx]


def add_blobs(image: np.ndarray, centres: Sequence[Sequence[float]], radii: Sequence[float],
              values: Sequence[float]) -> np.ndarray:
    """Paint bright spheres (soft one-voxel edge) where brighter than the image, in place.

    Args:
        image: float32 (z, y, x), normalised units (modified and returned).
        centres: (k, 3) centres, (z, y, x) voxels.
        radii: k radii in voxels.
        values: k intensities (normalised units).
    """
    for c, r, v in zip(centres, radii, values):
        lo = [max(0, int(np.floor(ci - r - 1))) for ci in c]
        hi = [min(n, int(np.ceil(ci + r + 2))) for ci, n in zip(c, image.shape)]
        if any(h <= l for l, h in zip(lo, hi)):
            continue
        zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
        w = np.clip(r + 0.5 - d, 0.0, 1.0).astype(np.float32)
        box = image[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        np.maximum(box, box * (1.0 - w) + np.float32(v) * w, out=box)
    return image


def apply_bias_field(image: np.ndarray, coeff_max: float, seed: int) -> np.ndarray:
    """Multiply by ``exp(field)``, a degree-3 Legendre field of MONAI ``RandBiasField`` whose 20
    coefficients are uniform in [-coeff_max, coeff_max] (drawn from ``seed``)."""
    from monai.transforms import RandBiasField

    t = RandBiasField(degree=3, coeff_range=(-coeff_max, coeff_max), prob=1.0)
    t.set_random_state(seed=int(seed) % (2 ** 32))
    return _numpy(t(image[None]))[0]


def simulate_slice_thickness(image: np.ndarray, factor: float) -> np.ndarray:
    """Thick slices along z: box average to ``nz / factor`` slices, linear back to ``nz``.

    Args:
        image: float32 (z, y, x).
        factor: Slice thickness / z voxel size (> 1 loses resolution along z).
    """
    t = torch.from_numpy(np.ascontiguousarray(image))[None, None]
    nz = image.shape[0]
    low = F.interpolate(t, size=(max(2, int(round(nz / factor))),) + image.shape[1:],
                        mode="area")
    return F.interpolate(low, size=image.shape, mode="trilinear",
                         align_corners=False)[0, 0].numpy()


def gaussian_blur(image: np.ndarray, sigma_zyx: Sequence[float]) -> np.ndarray:
    """Gaussian blur, sigma (z, y, x) in voxels (truncated at 2.5 sigma, edges reflected)."""
    from scipy import ndimage

    return ndimage.gaussian_filter(image, sigma=tuple(float(s) for s in sigma_zyx),
                                   truncate=2.5)


def add_streaks(image: np.ndarray, centre_yx: Sequence[float], angles: Sequence[float],
                amplitudes: Sequence[float], width: float, z_centre: float,
                z_half: float) -> np.ndarray:
    """Add metal-like straight streaks through one in-plane point, in a few axial slices.

    Args:
        image: float32 (z, y, x), modified in place and returned.
        centre_yx: In-plane source (y, x) in voxels (may lie outside the patch).
        angles: Line directions (radians, in the y-x plane).
        amplitudes: Signed intensity of each line (bright > 0, dark < 0), normalised units.
        width: Gaussian half-width of a line (voxels).
        z_centre: Slice the streaks are strongest in (voxels).
        z_half: Gaussian fall-off along z (voxels).
    """
    ny, nx = image.shape[1:]
    yy = np.arange(ny, dtype=np.float32)[:, None] - np.float32(centre_yx[0])
    xx = np.arange(nx, dtype=np.float32)[None, :] - np.float32(centre_yx[1])
    pattern = np.zeros((ny, nx), np.float32)
    for a, amp in zip(angles, amplitudes):
        d = -np.sin(a) * xx + np.cos(a) * yy  # distance to the line through the source
        pattern += np.float32(amp) * np.exp(-0.5 * (d / width) ** 2)
    z0 = max(0, int(np.floor(z_centre - 3 * z_half)))
    z1 = min(image.shape[0], int(np.ceil(z_centre + 3 * z_half)) + 1)
    if z1 > z0:
        prof = np.exp(-0.5 * ((np.arange(z0, z1) - z_centre) / z_half) ** 2).astype(np.float32)
        image[z0:z1] += prof[:, None, None] * pattern[None]
    return image


def add_noise(image: np.ndarray, white_sd: float, corr_sd: float, seed: int) -> np.ndarray:
    """Add white Gaussian noise (sd ``white_sd``) and correlated noise (white noise on a grid of
    half the resolution, trilinear up, scaled to sd ``corr_sd``), in normalised units."""
    gen = torch.Generator().manual_seed(int(seed))
    out = torch.from_numpy(image)
    if white_sd > 0:
        # torch.randn is ~2.5x faster than numpy's generator on 80^3 and seeded from our draw.
        out = out + torch.randn(image.shape, generator=gen) * float(white_sd)
    if corr_sd > 0:
        low = torch.randn(tuple(n // 2 + 1 for n in image.shape), generator=gen)
        up = F.interpolate(low[None, None], size=image.shape, mode="trilinear",
                           align_corners=True)[0, 0]
        out = out + up * (float(corr_sd) / float(up.std().clamp_min(1e-6)))
    return out.numpy()


def unsharp_mask(image: np.ndarray, sigma: float, amount: float) -> np.ndarray:
    """``image + amount * (image - blur(image, sigma))``: edge enhancement of a sharp
    (bone) reconstruction kernel (sigma in voxels)."""
    return image + np.float32(amount) * (image - gaussian_blur(image, (sigma,) * 3))


def adjust_gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    """MONAI ``AdjustContrast``: ``((x - min) / range) ** gamma * range + min``."""
    from monai.transforms import AdjustContrast

    return _numpy(AdjustContrast(gamma=float(gamma))(image[None]))[0]


def truncate_fov(image: np.ndarray, label: np.ndarray, kind: str, **geometry: Any
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """Set what lies outside a simulated field of view to air (0) and background (0), in place.

    Args:
        image: float32 (z, y, x), normalised units.
        label: uint8 (z, y, x).
        kind: "slab": ``geometry`` has ``axis`` (0 z, 1 y, 2 x), ``side`` ("low"/"high") and
            ``depth`` (voxels cut from that edge). "circle": ``centre_yx`` and ``radius``
            (voxels); everything outside the in-plane circle is cut (reconstruction circle).

    Returns:
        (image, label), the same arrays.
    """
    if kind == "slab":
        axis, depth = int(geometry["axis"]), int(geometry["depth"])
        n = image.shape[axis]
        sl = [slice(None)] * 3
        sl[axis] = slice(0, depth) if geometry["side"] == "low" else slice(n - depth, n)
        mask: "np.ndarray | Tuple[slice, ...]" = tuple(sl)
    elif kind == "circle":
        cy, cx = geometry["centre_yx"]
        yy = np.arange(image.shape[1])[:, None] - cy
        xx = np.arange(image.shape[2])[None, :] - cx
        outside = (yy ** 2 + xx ** 2) > float(geometry["radius"]) ** 2
        mask = (slice(None), outside)
    else:
        raise ValueError(f"unknown field-of-view kind {kind!r}")
    image[mask] = 0.0
    label[mask] = 0
    return image, label


def _numpy(x: Any) -> np.ndarray:
    """A MONAI output (MetaTensor, tensor or array) as a float32 numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        return x.numpy().astype(np.float32, copy=False)
    return np.asarray(x, dtype=np.float32)


# ---------------------------------------------------------------------------------- draws
def _draw_remap(rng: np.random.Generator, cfg: RandomiseConfig, shape: Sequence[int]
                ) -> Dict[str, Any]:
    """Targets of the tissue knots. Strength s moves each target from the identity (s = 0) to
    the drawn value (s = 1); both satisfy the constraints, so every mix does too."""
    nonmonotone = bool(rng.random() < cfg.p_nonmonotone)
    knots = np.array([b[1] for b in TISSUE_BANDS])
    ranges = np.array([b[3] if nonmonotone else b[2] for b in TISSUE_BANDS])
    drawn = rng.uniform(ranges[:, 0], ranges[:, 1])
    if nonmonotone:
        # Cortical (and denser) bone stays CORTICAL_MARGIN_HU above fat and soft tissue.
        floor = max(drawn[0], drawn[1]) + CORTICAL_MARGIN_HU
        drawn[3] = max(drawn[3], floor)
        drawn[4] = max(drawn[4], drawn[3])
    else:
        drawn = np.maximum.accumulate(drawn)
    targets = knots + cfg.strength * (drawn - knots)
    return {"knots_hu": knots.tolist(), "targets_hu": targets.tolist(),
            "monotone": not nonmonotone}


def _draw_blobs(rng: np.random.Generator, cfg: RandomiseConfig, shape: Sequence[int]
                ) -> Dict[str, Any]:
    """1 to 1 + 3 s spheres of radius 0.7-2.5 voxels at 0.8-1.0 (1400-2000+ HU)."""
    k = 1 + int(rng.integers(1 + int(round(3 * cfg.strength))))
    return {"centres": (rng.random((k, 3)) * np.asarray(shape)).tolist(),
            "radii": rng.uniform(0.7, 2.5, k).tolist(), "values": rng.uniform(0.8, 1.0, k).tolist()}


def _draw_bias(rng: np.random.Generator, cfg: RandomiseConfig, shape: Sequence[int]
               ) -> Dict[str, Any]:
    """Coefficients up to 0.05 s: at s = 1 the field's log has sd ~0.05 over the patch and
    spans about +-0.2 (a field of roughly 0.8-1.25; measured over 30 draws on 80^3)."""
    return {"coeff_max": 0.05 * cfg.strength, "seed": int(rng.integers(2 ** 31))}


def _draw_lowres(rng: np.random.Generator, cfg: RandomiseConfig, shape: Sequence[int]
                 ) -> Dict[str, Any]:
    """Slice thickness 1.5 to 1.5 + 1.5 s mm (1.5-3 mm at s = 1)."""
    thickness = rng.uniform(1.5, 1.5 + 1.5 * cfg.strength)
    return {"factor": max(1.0, thickness / cfg.spacing_mm[2]), "thickness_mm": thickness}


def _draw_blur(rng: np.random.Generator, cfg: RandomiseConfig, shape: Sequence[int]
               ) -> Dict[str, Any]:
    """Sigma 0.25 to 0.25 + s mm, one in-plane (y = x: a CT's in-plane PSF is round), one in z."""
    s_inplane, s_z = rng.uniform(0.25, 0.25 + cfg.strength, 2)
    sp = cfg.spacing_mm
    return {"sigma_zyx": [s_z / sp[2], s_inplane / sp[1], s_inplane / sp[0]]}


def _draw_streaks(rng: np.random.Generator, cfg: RandomiseConfig, shape: Sequence[int]
                  ) -> Dict[str, Any]:
    """2-6 lines of +-(0.02 to 0.02 + 0.08 s) (60-300 HU at s = 1) from a point in the patch."""
    n = int(rng.integers(2, 7))
    amp = rng.uniform(0.02, 0.02 + 0.08 * cfg.strength, n) * rng.choice([-1.0, 1.0], n)
    return {"centre_yx": (rng.random(2) * np.asarray(shape[1:])).tolist(),
            "angles": rng.uniform(0.0, np.pi, n).tolist(), "amplitudes": amp.tolist(),
            "width": float(rng.uniform(0.5, 1.5)), "z_centre": float(rng.uniform(0, shape[0])),
            "z_half": float(rng.uniform(0.5, 3.0))}


def _draw_noise(rng: np.random.Generator, cfg: RandomiseConfig, shape: Sequence[int]
                ) -> Optional[Dict[str, Any]]:
    """White sd up to 0.003 + 0.03 s (~100 HU), correlated sd up to 0.003 + 0.02 s (~70 HU)."""
    s = cfg.strength
    white = rng.uniform(0.003, 0.003 + 0.03 * s) if rng.random() < cfg.p_noise else 0.0
    corr = rng.uniform(0.003, 0.003 + 0.02 * s) if rng.random() < cfg.p_corr_noise else 0.0
    if white == 0.0 and corr == 0.0:
        return None
    return {"white_sd": float(white), "corr_sd": float(corr), "seed": int(rng.integers(2 ** 62))}


def _draw_sharpen(rng: np.random.Generator, cfg: RandomiseConfig, shape: Sequence[int]
                  ) -> Dict[str, Any]:
    """Unsharp mask: sigma 0.7-1.5 voxels, amount 0.2 to 0.2 + 1.3 s."""
    return {"sigma": float(rng.uniform(0.7, 1.5)),
            "amount": float(rng.uniform(0.2, 0.2 + 1.3 * cfg.strength))}


def _draw_gamma(rng: np.random.Generator, cfg: RandomiseConfig, shape: Sequence[int]
                ) -> Dict[str, Any]:
    """log(gamma) uniform in +-0.4 s (gamma 0.67-1.49 at s = 1)."""
    return {"gamma": float(np.exp(rng.uniform(-0.4, 0.4) * cfg.strength))}


def _draw_fov(rng: np.random.Generator, cfg: RandomiseConfig, shape: Sequence[int]
              ) -> Dict[str, Any]:
    """A slab (3 in 4; half of them at a z end: the scan range cuts the leg most often) of
    10 to 10 + 35 s % of the patch, or the outside of an off-centre reconstruction circle."""
    s = cfg.strength
    if rng.random() < 0.75:
        axis = int(rng.choice([0, 0, 1, 2]))
        depth = int(round(rng.uniform(0.1, 0.1 + 0.35 * s) * shape[axis]))
        return {"kind": "slab", "axis": axis, "side": str(rng.choice(["low", "high"])),
                "depth": max(1, depth)}
    n = max(shape[1:])
    centre = (np.asarray(shape[1:]) / 2.0 + rng.uniform(-0.25, 0.25, 2) * n).tolist()
    return {"kind": "circle", "centre_yx": centre,
            "radius": float(rng.uniform(0.8 - 0.45 * s, 0.8) * n)}


def _draw_hardware(rng: np.random.Generator, cfg: RandomiseConfig, shape: Sequence[int]
                   ) -> Dict[str, Any]:
    """A plate with 2-6 screws (:func:`~AnkleFractureLib.training.seg_hardware.draw_hardware`)."""
    from AnkleFractureLib.training.seg_hardware import draw_hardware

    return draw_hardware(rng, cfg.strength, shape)


_DRAWS: Dict[str, Callable[..., Optional[Dict[str, Any]]]] = {
    "remap": _draw_remap, "blobs": _draw_blobs, "bias": _draw_bias, "lowres": _draw_lowres,
    "blur": _draw_blur, "streaks": _draw_streaks, "noise": _draw_noise,
    "sharpen": _draw_sharpen, "gamma": _draw_gamma, "fov": _draw_fov,
    "hardware": _draw_hardware}


def draw_randomisation(rng: np.random.Generator, cfg: RandomiseConfig,
                       shape: Sequence[int]) -> Params:
    """Draw which components apply to one patch and their parameters.

    Each component of :data:`COMPONENTS` gets a child generator seeded from ``rng`` (exactly
    one draw of ``rng`` in all), so its draws do not depend on the other components' settings.

    Args:
        rng: The generator (the training step's).
        cfg: The configuration.
        shape: Patch shape (z, y, x).

    Returns:
        Component name -> parameters, for the components that apply, in application order.
    """
    seeds = np.random.SeedSequence(int(rng.integers(2 ** 63))).spawn(len(COMPONENTS))
    params: Params = {}
    for name, seed in zip(COMPONENTS, seeds):
        sub = np.random.default_rng(seed)
        # Noise has two probabilities of its own; every other component one.
        if name != "noise" and not sub.random() < getattr(cfg, f"p_{name}"):
            continue
        drawn = _DRAWS[name](sub, cfg, tuple(int(n) for n in shape))
        if drawn is not None:
            params[name] = drawn
    return params


# --------------------------------------------------------------------------------- apply
def apply_randomisation(image: np.ndarray, label: np.ndarray, params: Params,
                        cfg: RandomiseConfig) -> Tuple[np.ndarray, np.ndarray]:
    """Apply drawn parameters (:func:`draw_randomisation`) to one patch.

    Args:
        image: float32 (z, y, x), normalised units of ``cfg.hu_window``; not modified.
        label: uint8 (z, y, x); not modified.
        params: Component -> parameters.
        cfg: The configuration (window and spacing).

    Returns:
        (image float32 (z, y, x) clipped to [0, 1], label uint8 (z, y, x)), new arrays. The
        label differs from the input only where ``fov`` cut the patch (set to 0 there).
    """
    img = np.array(image, dtype=np.float32)  # a writable copy; the caller's array is kept
    lab = np.array(label, dtype=np.uint8)
    p = params
    if "remap" in p:
        img = remap_intensity(img, p["remap"]["knots_hu"], p["remap"]["targets_hu"],
                              cfg.hu_window)
    if "blobs" in p:
        img = add_blobs(img, **p["blobs"])
    if "hardware" in p:  # after the remap: metal is the densest thing in any scan
        from AnkleFractureLib.training.seg_hardware import add_hardware

        img = add_hardware(img, lab, **p["hardware"])
    if "bias" in p:
        img = apply_bias_field(img, **p["bias"])
    if "lowres" in p:
        img = simulate_slice_thickness(img, p["lowres"]["factor"])
    if "blur" in p:
        img = gaussian_blur(img, p["blur"]["sigma_zyx"])
    if "streaks" in p:
        img = add_streaks(np.ascontiguousarray(img), **p["streaks"])
    if "noise" in p:
        img = add_noise(np.ascontiguousarray(img), **p["noise"])
    if "sharpen" in p:
        img = unsharp_mask(img, **p["sharpen"])
    # Gamma needs [0, 1] (a power of a negative value is undefined), as does the output.
    img = np.clip(img, 0.0, 1.0)
    if "gamma" in p:
        img = np.clip(adjust_gamma(img, p["gamma"]["gamma"]), 0.0, 1.0)
    if "fov" in p:
        img, lab = truncate_fov(img, lab, **p["fov"])
    return np.ascontiguousarray(img, dtype=np.float32), lab


def randomise_patch(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                    cfg: Optional[RandomiseConfig]) -> Tuple[np.ndarray, np.ndarray]:
    """Draw and apply a random appearance to one training patch.

    Args:
        image: float32 (z, y, x), normalised units of ``cfg.hu_window`` (0 = air).
        label: uint8 (z, y, x), 0 background, 1 tibia, 2 fibula.
        rng: Generator; exactly one value is drawn from it (when ``cfg`` is not None).
        cfg: The configuration; None returns the inputs unchanged and draws nothing.

    Returns:
        (image float32 in [0, 1], label uint8), each (z, y, x).
    """
    if cfg is None:
        return image, label
    return apply_randomisation(image, label, draw_randomisation(rng, cfg, image.shape), cfg)


class DomainRandomiser:
    """Callable form of :func:`randomise_patch` with its own seeded generator.

    Args:
        config: A :class:`RandomiseConfig`, a level name of :data:`LEVELS` or None ("off").
        seed: Seed of the generator used when a call passes none.

    Example:
        >>> img, lab = np.zeros((8, 8, 8), np.float32), np.zeros((8, 8, 8), np.uint8)
        >>> a, _ = DomainRandomiser("full", seed=1)(img + 0.4, lab)
        >>> b, _ = DomainRandomiser("full", seed=1)(img + 0.4, lab)
        >>> bool(np.array_equal(a, b))
        True
    """

    def __init__(self, config: "RandomiseConfig | str | None", seed: int = 0) -> None:
        self.config = randomise_config(config)
        self.rng = np.random.default_rng(seed)

    def __call__(self, image: np.ndarray, label: np.ndarray,
                 rng: Optional[np.random.Generator] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Randomise one patch (see :func:`randomise_patch`), drawing from ``rng`` or, when it
        is None, from this object's generator."""
        return randomise_patch(image, label, self.rng if rng is None else rng, self.config)
