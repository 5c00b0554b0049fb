"""Fixation hardware painted onto segmentation training patches: a plate with screws.

Trauma and follow-up ankle CT often shows a lateral fibular plate with screws through the
fibula, or screws in the medial malleolus. On such scans the shipped segmentation lost most of
the fibula along the plate (a validation phantom with a plate: fibula Dice 0.70, the fibula
missing at every screw level), and the registration then failed. The randomisation's bright
blobs and streaks (:mod:`~AnkleFractureLib.training.seg_randomise`) are isolated points and
lines; a plate is a long dense strip lying on the bone's surface, with screws that cross the
bone and streak artefacts in the screws' slices. This component draws exactly that on a patch,
from the patch's own label: the plate follows the chosen bone's surface on one side, the
screws run from the plate through the bone's centre to its far side.

The label is not changed: a screw inside the bone stays bone (as in the phantom's labels: the
label covers the bone's whole cross-section) and the plate outside it stays background, so
the network learns that metal next to a bone is not bone and that the bone under a plate is.

Units and shapes as in :mod:`~AnkleFractureLib.training.seg_randomise`: a patch is float32
(z, y, x) in normalised units (0 air, 1 the top of the HU window, where metal clips), voxels
of the model spacing (about 1 mm).

Example:
    >>> img = np.full((32, 40, 40), 0.35, np.float32)
    >>> lab = np.zeros((32, 40, 40), np.uint8); lab[:, 15:25, 15:25] = 2
    >>> p = draw_hardware(np.random.default_rng(0), 1.0, lab.shape)
    >>> out = add_hardware(img.copy(), lab, **p)
    >>> bool((out > 0.9).sum() > 100 and (out[lab == 0] > 0.9).any())
    True
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np

#: Plate size (voxels ~ mm): thickness, width, length range; gap between plate and bone.
PLATE_T, PLATE_W, PLATE_LEN, PLATE_GAP = (2.0, 3.5), (9.0, 13.0), (40.0, 110.0), (0.0, 2.0)
#: Screw radius (voxels ~ mm) and how far past the bone's far side a screw reaches (a
#: syndesmotic screw goes on into the tibia).
SCREW_R, SCREW_PAST = (1.4, 2.1), (0.0, 15.0)


def draw_hardware(rng: np.random.Generator, strength: float, shape: Sequence[int]
                  ) -> Dict[str, Any]:
    """Parameters of one plate (label-free: where it lies is decided on the patch's label).

    Args:
        rng: Random generator.
        strength: Randomisation strength in [0, 1]: scales the streak amplitude (250-700 HU
            at 1, as the phantom's metal streaks).
        shape: Patch shape (z, y, x).

    Returns:
        Keyword arguments of :func:`add_hardware`.
    """
    n_screws = int(rng.integers(2, 7))
    return {
        "prefer_fibula": bool(rng.random() < 0.7),
        "angle": float(rng.uniform(0.0, 2.0 * np.pi)),
        "z_fraction": float(rng.uniform(0.0, 1.0)),
        "length": float(rng.uniform(*PLATE_LEN)),
        "thickness": float(rng.uniform(*PLATE_T)),
        "width": float(rng.uniform(*PLATE_W)),
        "gap": float(rng.uniform(*PLATE_GAP)),
        "screw_radius": float(rng.uniform(*SCREW_R)),
        "screw_past": float(rng.uniform(*SCREW_PAST)),
        "n_screws": n_screws,
        "value": float(rng.uniform(0.95, 1.0)),
        "streak_amplitude": float(rng.uniform(0.08, 0.23) * strength),
        "streak_seed": int(rng.integers(2 ** 31)),
    }


def _bone_slices(label: np.ndarray, prefer_fibula: bool) -> "tuple[int, np.ndarray] | None":
    """(bone label, z indices of the slices that show it), or None without tibia or fibula."""
    order = (2, 1) if prefer_fibula else (1, 2)
    for bone in order:
        zs = np.flatnonzero((label == bone).reshape(label.shape[0], -1).any(axis=1))
        if zs.size >= 3:
            return bone, zs
    return None


def _section(mask2d: np.ndarray) -> "tuple[np.ndarray, float]":
    """(centroid (y, x), equivalent radius) of a 2-D mask, voxels."""
    yy, xx = np.nonzero(mask2d)
    return np.array([yy.mean(), xx.mean()]), float(np.sqrt(yy.size / np.pi))


def _paint(image2d: np.ndarray, inside: np.ndarray, value: float) -> None:
    """Raise ``image2d`` towards ``value`` by the soft occupancy ``inside`` (0-1), in place."""
    np.maximum(image2d, image2d * (1.0 - inside) + np.float32(value) * inside, out=image2d)


def add_hardware(image: np.ndarray, label: np.ndarray, *, prefer_fibula: bool, angle: float,
                 z_fraction: float, length: float, thickness: float, width: float, gap: float,
                 screw_radius: float, screw_past: float, n_screws: int, value: float,
                 streak_amplitude: float, streak_seed: int) -> np.ndarray:
    """Paint a plate on one side of a bone and screws through it, with streaks, in place.

    The plate runs along z over ``length`` voxels centred at ``z_fraction`` of the bone's
    extent in the patch; in each slice it is a ``thickness`` x ``width`` rectangle whose
    inner face lies ``gap`` voxels outside the bone's equivalent circle, in the in-plane
    direction ``angle``. ``n_screws`` screws, evenly spaced along the plate, run from the
    plate's outer face through the bone's centre to ``screw_past`` voxels beyond its far
    side (cylinders of ``screw_radius``); each gets 2-5 streaks through its middle.

    Args:
        image: float32 (z, y, x) normalised units; modified and returned.
        label: uint8 (z, y, x) (1 tibia, 2 fibula): where the bone is; not modified.
        prefer_fibula: Plate the fibula when the patch shows it (else the tibia).
        angle, z_fraction, length, thickness, width, gap, screw_radius, screw_past,
        n_screws, value, streak_amplitude, streak_seed: See :func:`draw_hardware`.

    Returns:
        ``image`` (unchanged when the patch shows neither bone).
    """
    found = _bone_slices(label, prefer_fibula)
    if found is None:
        return image
    bone, zs = found
    zc = zs[0] + z_fraction * (zs[-1] - zs[0])
    z0, z1 = max(int(zs[0]), int(zc - length / 2)), min(int(zs[-1]), int(zc + length / 2))
    d = np.array([np.sin(angle), np.cos(angle)])  # in-plane (y, x) direction to the plate
    perp = np.array([-d[1], d[0]])
    ny, nx = image.shape[1:]
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    screw_z = np.linspace(z0, z1, n_screws + 2)[1:-1] if z1 > z0 else []
    screws: List[tuple] = []
    for z in range(z0, z1 + 1):
        mask = label[z] == bone
        if not mask.any():
            continue
        c, r = _section(mask)
        pc = c + d * (r + gap + thickness / 2.0)
        u = (yy - pc[0]) * d[0] + (xx - pc[1]) * d[1]
        v = (yy - pc[0]) * perp[0] + (xx - pc[1]) * perp[1]
        inside = np.clip(0.5 + thickness / 2.0 - np.abs(u), 0.0, 1.0) * \
            np.clip(0.5 + width / 2.0 - np.abs(v), 0.0, 1.0)
        _paint(image[z], inside.astype(np.float32), value)
        for sz in screw_z:
            if abs(z - sz) < 0.5:
                screws.append((z, c + d * (r + gap + thickness), c - d * (r + screw_past)))
    _screws(image, screws, screw_radius, value, yy, xx)
    _streaks(image, screws, streak_amplitude, streak_seed)
    return image


def _screws(image: np.ndarray, screws: Sequence[tuple], radius: float, value: float,
            yy: np.ndarray, xx: np.ndarray) -> None:
    """Cylinders of ``radius`` along in-plane segments (z, head (y, x), tip (y, x))."""
    for z, head, tip in screws:
        ab = tip - head
        t = np.clip(((yy - head[0]) * ab[0] + (xx - head[1]) * ab[1]) / max(ab @ ab, 1e-6),
                    0.0, 1.0)
        dist = np.hypot(yy - (head[0] + t * ab[0]), xx - (head[1] + t * ab[1]))
        for dz in range(-int(np.ceil(radius)), int(np.ceil(radius)) + 1):
            k = z + dz
            if not 0 <= k < image.shape[0]:
                continue
            half = np.sqrt(max(radius ** 2 - dz ** 2, 0.0))  # the cylinder's half-width there
            inside = np.clip(0.5 + half - dist, 0.0, 1.0).astype(np.float32)
            _paint(image[k], inside, value)


def _streaks(image: np.ndarray, screws: Sequence[tuple], amplitude: float, seed: int) -> None:
    """2-5 bright and dark streaks through each screw's middle, in the screw's slices."""
    from AnkleFractureLib.training.seg_randomise import add_streaks

    if amplitude <= 0:
        return
    rng = np.random.default_rng(seed)
    for z, head, tip in screws:
        n = int(rng.integers(2, 6))
        amps = amplitude * rng.uniform(0.5, 1.0, n) * rng.choice([-1.0, 1.0], n)
        add_streaks(image, 0.5 * (head + tip), rng.uniform(0.0, np.pi, n).tolist(),
                    amps.tolist(), float(rng.uniform(0.5, 1.5)), float(z),
                    float(rng.uniform(0.7, 2.0)))
