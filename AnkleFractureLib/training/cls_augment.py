"""Batched, device-agnostic augmentation of classification crops (torch).

A crop batch ``x`` is (B, C, z, y, x) float: channel ``ct_channel`` (0) is the CT, HU window
[-1000, 1000] normalised to [0, 1] (so 0 = air), the other channels are soft masks in [0, 1]
(tibia, fibula); a batch may hold the CT channel only. methods.md lists rotation, shift, random
crop, flips and intensity jitter; here:

* **geometry** -- one trilinear resampling per batch (``affine_grid`` + ``grid_sample``,
  ``align_corners=False``, zero padding = air for the CT and background for masks), each sample
  with its own random rotation about the z, y and x axes, isotropic scale and shift. The
  *random crop* is the combination of the two last ones: a scale s > 1 with a shift shows a
  window of size/s at a random offset, resampled to the crop size. The transform is built in
  voxel units, so a rotation stays a rotation on non-cubic crops.
* **flips** -- exact index flips, per sample with probability ``flip_prob``, along
  ``flip_axes``; none by default (see :class:`AugmentConfig`).
* **intensity** (CT channel only) -- optional gamma, multiplicative contrast, additive
  brightness, Gaussian noise, then a clamp to [0, 1].
* **cutout** -- random boxes set to 0 in every channel (the FixMatch strong view).
* **bridged masks** -- optional (``bridge_prob``): the mask channels closed (grey-level
  dilation then erosion with a cube of radius 1-2 voxels, 1.5-3 mm) across gaps, as a
  segmentation that bridges a fracture line does. On the phantoms a reference mask leaves the
  fracture gap empty, and a network trained on such masks can read the fracture from the hole
  in the mask rather than from the CT, which a segmentation's bridged mask no longer shows
  (``scripts/mask_reliance_study.py`` measures it through the pipeline).

:func:`augment_batch` draws the parameters (:func:`sample_params`) and applies them
(:func:`apply_augmentation`); draws come from ``generator`` (CPU or the device's), so a seeded
generator gives the same augmentation. :func:`weak_config` / :func:`strong_config` are the two
views of FixMatch.

Example:
    >>> import torch
    >>> x = torch.rand(2, 3, 16, 8, 12)
    >>> g = torch.Generator().manual_seed(0)
    >>> y = augment_batch(x, strong_config(), generator=g)
    >>> y.shape, y.dtype, bool(y.min() >= 0) and bool(y.max() <= 1)
    (torch.Size([2, 3, 16, 8, 12]), torch.float32, True)
    >>> torch.equal(augment_batch(x, AugmentConfig.identity()), x)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace  # noqa: F401  (replace: tweak a frozen config)
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation ranges. Spatial axes are numbered 0 = z, 1 = y, 2 = x (array order).

    Attributes:
        rotate_deg: Rotation about each of the z, y, x axes, uniform in +-rotate_deg degrees.
        scale: (min, max) isotropic scale; s > 1 magnifies the content (zoom in, i.e. a random
            crop of size/s), s < 1 shrinks it.
        shift_vox: Shift per axis, uniform in +-shift_vox voxels (converted to the normalised
            grid as a fraction of each axis' size). Sign convention: a shift of +d along an
            axis moves the content towards higher indices, so a voxel at index i ends up at
            i + d.
        flip_axes: Axes that may be flipped (each with probability ``flip_prob``). Default ():
            the registered crop has a fixed anatomical orientation (right ankle in the template
            frame), so a left-right flip would teach the network a mirror-image ankle that never
            occurs. The raw-CT control, whose side is not normalised, uses ``(2,)`` (x).
        flip_prob: Probability of flipping each axis in ``flip_axes``.
        contrast: (min, max) multiplicative factor of the CT channel (1 +- 0.1 by default).
        brightness: Additive CT offset, uniform in +-brightness (window units).
        gamma: Optional (min, max) gamma of the CT channel, drawn log-uniformly (symmetric
            around 1 for (0.8, 1.25)); None: no gamma.
        noise_std: Standard deviation of Gaussian noise added to the CT channel.
        cutout: Number of random boxes set to 0 in all channels (the FixMatch strong view).
        cutout_fraction: Maximum box size per axis, as a fraction of that axis (1/4).
        ct_channel: Index of the CT channel (intensity jitter); None when there is none. All
            other channels are masks (resampled, never jittered).
        affine_prob: Probability that a sample gets the rotation/scale/shift at all. The
            trilinear resampling is most of the augmentation's cost on a CPU (~40 ms per
            3 x 96 x 24 x 32 crop, as much as the network's step), and the registered crop is
            already pose-normalised, so the weak view resamples half of the samples.
        bridge_prob: Probability that a sample's mask channels are closed across gaps
            (0: never, and no random number is drawn for it, so earlier recipes keep their
            exact draws).
        bridge_vox: (min, max) radius in voxels of the closing's cube (a radius r bridges
            gaps up to 2r voxels).
    """

    rotate_deg: float = 10.0
    scale: Tuple[float, float] = (0.9, 1.1)
    shift_vox: float = 4.0
    flip_axes: Tuple[int, ...] = ()
    flip_prob: float = 0.5
    contrast: Tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.05
    gamma: Optional[Tuple[float, float]] = None
    noise_std: float = 0.0
    cutout: int = 0
    cutout_fraction: float = 0.25
    ct_channel: Optional[int] = 0
    affine_prob: float = 1.0
    bridge_prob: float = 0.0
    bridge_vox: Tuple[int, int] = (1, 2)

    def __post_init__(self) -> None:
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            raise ValueError(f"flip_axes must be spatial axes 0 (z), 1 (y), 2 (x): "
                             f"{self.flip_axes}")
        if self.scale[0] <= 0 or self.scale[0] > self.scale[1]:
            raise ValueError(f"scale must be 0 < min <= max, got {self.scale}")
        if self.gamma is not None and (self.gamma[0] <= 0 or self.gamma[0] > self.gamma[1]):
            raise ValueError(f"gamma must be 0 < min <= max, got {self.gamma}")
        if not 0.0 <= self.bridge_prob <= 1.0:
            raise ValueError(f"bridge_prob must be in [0, 1], got {self.bridge_prob}")
        if not 1 <= self.bridge_vox[0] <= self.bridge_vox[1]:
            raise ValueError(f"bridge_vox must be 1 <= min <= max, got {self.bridge_vox}")

    @classmethod
    def identity(cls) -> "AugmentConfig":
        """No augmentation (``augment_batch`` returns a copy of its input)."""
        return cls(rotate_deg=0.0, scale=(1.0, 1.0), shift_vox=0.0, flip_axes=(),
                   contrast=(1.0, 1.0), brightness=0.0, gamma=None, noise_std=0.0, cutout=0)


def weak_config(flip_axes: Sequence[int] = ()) -> AugmentConfig:
    """The weak view (also plain supervised augmentation): rotation 5 deg, shift 1 voxel,
    scale 0.95-1.05 on 30 % of the samples, contrast 1 +- 0.1, brightness +- 0.05;
    ``flip_axes=(2,)`` for raw CT.

    Why so small: the registered crop puts the plafond at a fixed height, and the Weber class
    *is* the height of the fracture line relative to it (A below, B at, C above the
    syndesmosis, ~10-30 mm apart). Shifts of several voxels (4 voxels = 6-12 mm) erase that cue;
    on the synthetic test crops a 4-voxel weak view stopped a tiny network from learning at
    all in 48 steps. The ranges mimic registration error (~1-2 mm, ~1-5 deg) instead. Even
    then resampling blurs thin structures (a 1-voxel shift of a 3-voxel rod), and resampling
    every sample slowed learning there (loss after 60 steps 1.10 vs 0.49 with intensity
    jitter only), so most samples keep their exact voxels.
    """
    return AugmentConfig(rotate_deg=5.0, scale=(0.95, 1.05), shift_vox=1.0,
                         flip_axes=tuple(flip_axes), affine_prob=0.3)


def strong_config(flip_axes: Sequence[int] = ()) -> AugmentConfig:
    """The FixMatch strong view: rotation 10 deg, shift 2 voxels, scale 0.9-1.1, contrast
    1 +- 0.2, brightness +- 0.1, gamma 0.8-1.25, noise 0.03, one cutout box."""
    return AugmentConfig(rotate_deg=10.0, scale=(0.9, 1.1), shift_vox=2.0,
                         flip_axes=tuple(flip_axes), contrast=(0.8, 1.2), brightness=0.1,
                         gamma=(0.8, 1.25), noise_std=0.03, cutout=1)


@dataclass
class AugmentParams:
    """Per-sample parameters of one augmentation (CPU tensors, B = batch size).

    Attributes:
        angles_deg: (B, 3) rotation about the z, y, x axes, degrees.
        scale: (B,) isotropic scale (> 1 magnifies).
        shift_vox: (B, 3) content shift along z, y, x in voxels (+ = towards higher indices).
        flip: (B, 3) bool, flip along z, y, x.
        contrast: (B,) CT multiplicative factor.
        brightness: (B,) CT additive offset.
        gamma: (B,) CT gamma (1 = none).
        cutout_start: (B, n, 3) int64 first voxel (z, y, x) of each cutout box.
        cutout_size: (B, n, 3) int64 box sizes.
        noise_std: CT noise standard deviation.
        bridge: (B,) int64 radius (voxels) of the closing of the mask channels; 0 = none
            (None: no sample is closed).
    """

    angles_deg: torch.Tensor
    scale: torch.Tensor
    shift_vox: torch.Tensor
    flip: torch.Tensor
    contrast: torch.Tensor
    brightness: torch.Tensor
    gamma: torch.Tensor
    cutout_start: torch.Tensor
    cutout_size: torch.Tensor
    noise_std: float = 0.0
    bridge: Optional[torch.Tensor] = None

    @classmethod
    def identity(cls, batch: int, n_cutout: int = 0) -> "AugmentParams":
        """Parameters that change nothing (edit fields to build a specific transform)."""
        return cls(angles_deg=torch.zeros(batch, 3, dtype=torch.float64),
                   scale=torch.ones(batch, dtype=torch.float64),
                   shift_vox=torch.zeros(batch, 3, dtype=torch.float64),
                   flip=torch.zeros(batch, 3, dtype=torch.bool),
                   contrast=torch.ones(batch, dtype=torch.float64),
                   brightness=torch.zeros(batch, dtype=torch.float64),
                   gamma=torch.ones(batch, dtype=torch.float64),
                   cutout_start=torch.zeros(batch, n_cutout, 3, dtype=torch.long),
                   cutout_size=torch.zeros(batch, n_cutout, 3, dtype=torch.long))


def _uniform(shape: Tuple[int, ...], lo: float, hi: float,
             generator: Optional[torch.Generator]) -> torch.Tensor:
    """U(lo, hi) float64 on the CPU, drawn from ``generator`` (on whatever device it lives)."""
    dev = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(shape, generator=generator, device=dev, dtype=torch.float64).cpu()
    return lo + (hi - lo) * u


def sample_params(batch: int, spatial_shape: Sequence[int], config: AugmentConfig,
                  generator: Optional[torch.Generator] = None) -> AugmentParams:
    """Draw per-sample augmentation parameters.

    Args:
        batch: B.
        spatial_shape: (z, y, x) crop size in voxels (bounds the cutout boxes).
        config: Ranges.
        generator: Random source (None: torch's global RNG).

    Returns:
        :class:`AugmentParams` (CPU tensors).

    Example:
        >>> p = sample_params(4, (16, 8, 8), AugmentConfig(), torch.Generator().manual_seed(1))
        >>> p.angles_deg.shape, bool(p.angles_deg.abs().max() <= 10)
        (torch.Size([4, 3]), True)
    """
    b = int(batch)
    angles = _uniform((b, 3), -config.rotate_deg, config.rotate_deg, generator)
    scale = _uniform((b,), config.scale[0], config.scale[1], generator)
    shift = _uniform((b, 3), -config.shift_vox, config.shift_vox, generator)
    if config.affine_prob < 1.0:
        still = _uniform((b,), 0.0, 1.0, generator) >= config.affine_prob
        angles[still] = 0.0
        scale[still] = 1.0
        shift[still] = 0.0
    flip = _uniform((b, 3), 0.0, 1.0, generator) < config.flip_prob
    allowed = torch.zeros(3, dtype=torch.bool)
    allowed[list(config.flip_axes)] = True
    flip &= allowed[None, :]
    contrast = _uniform((b,), config.contrast[0], config.contrast[1], generator)
    brightness = _uniform((b,), -config.brightness, config.brightness, generator)
    if config.gamma is not None:
        # Log-uniform: (0.8, 1.25) is then symmetric (darker and brighter equally likely).
        lg = _uniform((b,), math.log(config.gamma[0]), math.log(config.gamma[1]), generator)
        gamma = torch.exp(lg)
    else:
        gamma = torch.ones(b, dtype=torch.float64)
    n = int(config.cutout)
    dims = torch.tensor([int(s) for s in spatial_shape], dtype=torch.float64)
    max_size = torch.clamp(torch.floor(dims * config.cutout_fraction), min=1.0)
    size = torch.clamp(torch.floor(_uniform((b, n, 3), 0.0, 1.0, generator) * max_size) + 1,
                       max=max_size)
    start = torch.floor(_uniform((b, n, 3), 0.0, 1.0, generator) * (dims - size + 1))
    bridge = None
    if config.bridge_prob > 0:  # drawn last and only when asked: older draws stay the same
        lo, hi = config.bridge_vox
        radius = torch.floor(_uniform((b,), lo, hi + 1, generator)).clamp(max=hi).long()
        bridge = torch.where(_uniform((b,), 0.0, 1.0, generator) < config.bridge_prob,
                             radius, torch.zeros_like(radius))
    return AugmentParams(angles_deg=angles, scale=scale, shift_vox=shift, flip=flip,
                         contrast=contrast, brightness=brightness, gamma=gamma,
                         cutout_start=start.long(), cutout_size=size.long(),
                         noise_std=float(config.noise_std), bridge=bridge)


def close_masks(x: torch.Tensor, radius: int, ct_channel: Optional[int] = 0) -> torch.Tensor:
    """Grey-level closing of the mask channels (every channel but ``ct_channel``).

    Dilation (max over a cube of side 2r+1) then erosion (min over the same cube); outside the
    crop counts as neither, so the result is never below the input and a gap up to 2r voxels
    wide between two mask parts is filled, as a segmentation that bridges a fracture line does.

    Args:
        x: (B, C, z, y, x) float crops.
        radius: Cube radius r in voxels (>= 1).
        ct_channel: Index of the CT channel, left as it is (None: every channel is a mask).

    Returns:
        A new tensor, same shape and dtype.

    Example:
        >>> m = torch.zeros(1, 1, 9, 3, 3); m[0, 0, :4] = 1.0; m[0, 0, 6:] = 1.0
        >>> close_masks(m, 1, ct_channel=None)[0, 0, :, 1, 1].tolist()
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    """
    k = 2 * int(radius) + 1
    masks = [c for c in range(x.shape[1]) if c != ct_channel]
    out = x.clone()
    if not masks:
        return out
    m = x[:, masks]
    b, c = m.shape[:2]
    flat = m.reshape(b * c, 1, *m.shape[2:])
    dil = F.max_pool3d(flat, k, stride=1, padding=int(radius))
    closed = -F.max_pool3d(-dil, k, stride=1, padding=int(radius))
    out[:, masks] = torch.maximum(closed, flat).reshape(m.shape)
    return out


def rotation_matrices_zyx(angles_deg: torch.Tensor) -> torch.Tensor:
    """(B, 3) angles about the z, y, x axes (degrees) -> (B, 3, 3) rotations in (z, y, x)
    coordinates, ``Rz @ Ry @ Rx`` (each rotates the plane of the two other axes).

    Example:
        >>> r = rotation_matrices_zyx(torch.tensor([[90.0, 0.0, 0.0]], dtype=torch.float64))
        >>> r[0].round().tolist()  # about z: the (y, x) plane turns
        [[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]
    """
    a = torch.deg2rad(angles_deg.to(torch.float64))
    c, s = torch.cos(a), torch.sin(a)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])

    def mat(rows):
        return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)

    rz = mat([[one, zero, zero], [zero, c[:, 0], -s[:, 0]], [zero, s[:, 0], c[:, 0]]])
    ry = mat([[c[:, 1], zero, s[:, 1]], [zero, one, zero], [-s[:, 1], zero, c[:, 1]]])
    rx = mat([[c[:, 2], -s[:, 2], zero], [s[:, 2], c[:, 2], zero], [zero, zero, one]])
    return rz @ ry @ rx


def affine_theta(params: AugmentParams, spatial_shape: Sequence[int]) -> torch.Tensor:
    """The (B, 3, 4) ``affine_grid`` matrices (x, y, z order, align_corners=False) of the
    rotation, scale and shift in ``params``.

    In voxel offsets v from the crop centre (z, y, x), output voxel v samples the input at
    ``R v / s - shift`` (so the content is rotated, magnified by s and moved by +shift). With
    D = diag(n / 2) the voxel size of the normalised grid, theta = D^-1 (R / s) D and the
    translation is -2 shift / n, then both are reordered to (x, y, z).

    Example:
        >>> p = AugmentParams.identity(1)
        >>> p.shift_vox[0] = torch.tensor([0.0, 0.0, 2.0])
        >>> affine_theta(p, (4, 4, 8))[0, 0].tolist()  # x row: -2 voxels of 8 = -0.5
        [1.0, 0.0, 0.0, -0.5]
    """
    n = torch.tensor([float(s) for s in spatial_shape], dtype=torch.float64)
    a = rotation_matrices_zyx(params.angles_deg) / params.scale.to(torch.float64)[:, None, None]
    half = n / 2.0
    lin = a * half[None, None, :] / half[None, :, None]          # D^-1 A D
    trans = -params.shift_vox.to(torch.float64) / half[None, :]  # (B, 3) normalised
    perm = [2, 1, 0]                                             # (z, y, x) -> (x, y, z)
    lin = lin[:, perm][:, :, perm]
    trans = trans[:, perm]
    return torch.cat([lin, trans[:, :, None]], dim=2)


def apply_augmentation(x: torch.Tensor, params: AugmentParams, ct_channel: Optional[int] = 0,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Apply ``params`` to a crop batch: flips, one affine resampling, CT intensity, bridged
    masks, cutout.

    Args:
        x: (B, C, z, y, x) float crops; CT channel in [0, 1], mask channels in [0, 1].
        params: From :func:`sample_params` (or built by hand).
        ct_channel: CT channel index (None: no CT channel).
        generator: Random source of the noise.

    Returns:
        A new tensor, same shape/dtype/device; every channel clamped to [0, 1] where touched.
    """
    if x.ndim != 5:
        raise ValueError(f"need (B, C, z, y, x) crops, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"need a float tensor, got {x.dtype}")
    b, c = x.shape[:2]
    if ct_channel is not None and not 0 <= ct_channel < c:
        raise ValueError(f"ct_channel {ct_channel} out of range for {c} channels")
    out = x
    dev = x.device

    # Flips: exact index reversal (before the resampling; random parameters are symmetric, so
    # the order does not change the distribution).
    flip = params.flip.to(dev)
    for axis in range(3):
        if bool(flip[:, axis].any()):
            out = torch.where(flip[:, axis, None, None, None, None], out.flip(2 + axis), out)

    moved = ((params.angles_deg != 0).any(dim=1) | (params.scale != 1)
             | (params.shift_vox != 0).any(dim=1))
    geometric = bool(moved.any())
    if geometric:
        theta = affine_theta(params, x.shape[2:]).to(device=dev, dtype=x.dtype)
        # Only the samples that move are resampled (the resampling dominates the cost).
        idx = torch.nonzero(moved, as_tuple=False).flatten().to(dev)
        sub = out[idx]
        grid = F.affine_grid(theta[idx], list(sub.shape), align_corners=False)
        # Trilinear = convex combination: masks stay in [0, 1]; zeros outside = air/background.
        sub = F.grid_sample(sub, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)
        out = out.clone()
        out[idx] = sub

    if ct_channel is not None:
        gamma = params.gamma.to(device=dev, dtype=x.dtype)[:, None, None, None]
        contrast = params.contrast.to(device=dev, dtype=x.dtype)[:, None, None, None]
        brightness = params.brightness.to(device=dev, dtype=x.dtype)[:, None, None, None]
        jitter = bool((params.gamma != 1).any() or (params.contrast != 1).any()
                      or (params.brightness != 0).any()) or params.noise_std > 0
        if jitter:
            ct = out[:, ct_channel].clamp(0.0, 1.0)
            if bool((params.gamma != 1).any()):
                ct = ct ** gamma
            ct = ct * contrast + brightness
            if params.noise_std > 0:
                gdev = generator.device if generator is not None else dev
                noise = torch.randn(ct.shape, generator=generator, device=gdev, dtype=ct.dtype)
                ct = ct + params.noise_std * noise.to(dev)
            out = out.clone() if out is x else out
            out[:, ct_channel] = ct.clamp(0.0, 1.0)
    if geometric:
        out = out.clamp(0.0, 1.0)  # rounding of the interpolation only

    if params.bridge is not None and bool((params.bridge > 0).any()):
        out = _bridge(out, params.bridge.to(dev), ct_channel)

    if params.cutout_start.shape[1] > 0:
        start = params.cutout_start.to(dev)
        stop = start + params.cutout_size.to(dev)
        keep = torch.ones((b, 1) + tuple(x.shape[2:]), dtype=torch.bool, device=dev)
        for j in range(start.shape[1]):
            inside = []
            for axis in range(3):
                r = torch.arange(x.shape[2 + axis], device=dev)[None, :]
                inside.append((r >= start[:, j, axis, None]) & (r < stop[:, j, axis, None]))
            box = (inside[0][:, :, None, None] & inside[1][:, None, :, None]
                   & inside[2][:, None, None, :])
            keep &= ~box[:, None]
        out = out * keep.to(out.dtype)

    return out.clone() if out is x else out


def _bridge(x: torch.Tensor, radius: torch.Tensor, ct_channel: Optional[int]) -> torch.Tensor:
    """:func:`close_masks` on the samples with a radius > 0, each with its own radius."""
    out = x.clone()
    for r in torch.unique(radius[radius > 0]).tolist():
        idx = torch.nonzero(radius == r, as_tuple=False).flatten()
        out[idx] = close_masks(x[idx], int(r), ct_channel)
    return out


def augment_batch(x: torch.Tensor, config: AugmentConfig,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Augment a crop batch, each sample with its own random transform.

    Args:
        x: (B, C, z, y, x) float crops (CT in channel ``config.ct_channel``, masks elsewhere).
        config: Ranges (:func:`weak_config`, :func:`strong_config`, :class:`AugmentConfig`).
        generator: Seeded generator for reproducible draws (None: global RNG).

    Returns:
        Augmented crops, same shape, dtype and device; the identity config returns a copy.

    Example:
        >>> x = torch.zeros(1, 1, 4, 4, 4); x[0, 0, 1, 1, 1] = 1.0
        >>> cfg = replace(AugmentConfig.identity(), flip_axes=(2,), flip_prob=1.0)
        >>> augment_batch(x, cfg)[0, 0, 1, 1].tolist()
        [0.0, 0.0, 1.0, 0.0]
    """
    if x.ndim != 5:
        raise ValueError(f"need (B, C, z, y, x) crops, got shape {tuple(x.shape)}")
    ct = config.ct_channel
    if ct is not None and not 0 <= ct < x.shape[1]:
        raise ValueError(f"ct_channel {ct} out of range for {x.shape[1]} channels")
    params = sample_params(x.shape[0], x.shape[2:], config, generator)
    return apply_augmentation(x, params, ct, generator)


__all__ = ["AugmentConfig", "AugmentParams", "weak_config", "strong_config", "sample_params",
           "rotation_matrices_zyx", "affine_theta", "apply_augmentation", "augment_batch",
           "close_masks"]
