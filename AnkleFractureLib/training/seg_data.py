"""Training data of the segmentation network: prepared cases, patch sampling, augmentation.

Every case goes through :func:`AnkleFractureLib.segmentation.preprocess.prepare_case` exactly
once (the same preprocessing inference uses), and the prepared arrays stay in memory; with a
cache folder they are also stored as ``.npz`` keyed by the case files and the plans, so a resumed
or repeated run starts in seconds.

Patches are drawn like nnU-Net: 2/3 centred on a random bone voxel (tibia and fibula equally
often, because the fibula is smaller and harder) and 1/3 anywhere, then augmented with one
random rotation (+-15 deg about each axis) and isotropic scaling (0.9-1.1) applied as a single
resampling, a left-right flip, contrast/brightness jitter, Gaussian noise and a light blur.
Optionally (``randomise``, off by default) each patch then gets a random appearance
(:mod:`AnkleFractureLib.training.seg_randomise`: SynthSeg-style per-tissue intensities, bias
field, resolution, noise, kernel, metal, field-of-view cuts), so the network learns shape and
edges rather than the phantoms' exact HU.

Every random choice of training step ``s`` comes from a generator seeded with
(seed, rank, s), so a batch depends only on those three numbers: the same seed gives the same
first batches, a resumed run continues with exactly the batches it would have drawn, and data
loader workers can make batches in any order.

Arrays are (z, y, x); spacings (x, y, z) in mm.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from AnkleFractureLib.dataset.layout import CaseRecord, Dataset, file_key
from AnkleFractureLib.errors import InputError

if TYPE_CHECKING:
    from AnkleFractureLib.segmentation.plans import SegPlans
    from AnkleFractureLib.training.seg_randomise import RandomiseConfig

#: Version of the cache file content; bump when preparation changes meaning.
CACHE_VERSION = 1
ProgressCallback = Callable[[float, str], None]


# ---------------------------------------------------------------------------------------- cases
@dataclass
class PreparedCase:
    """One training case on the model grid.

    Attributes:
        case_id: The dataset case id.
        image: float32 (z, y, x), CT windowed to [0, 1].
        label: uint8 (z, y, x), 0 background, 1 tibia, 2 fibula.
        spacing: Voxel size (x, y, z) in mm (the plans' model spacing).
        foreground: Label value -> flat indices (into ``label.ravel()``) of its voxels, used to
            centre foreground patches.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: Tuple[float, float, float]
    foreground: Dict[int, np.ndarray] = field(default_factory=dict)
    #: (level, flat indices) of :meth:`unlabelled_bone`, computed on first use.
    _unlabelled: Optional[Tuple[float, np.ndarray]] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.foreground:
            flat = self.label.ravel()
            # int32 halves the memory; any volume the readers accept fits (MAX_VOXELS < 2**31).
            dtype = np.int32 if flat.size < 2 ** 31 else np.int64
            self.foreground = {c: np.flatnonzero(flat == c).astype(dtype) for c in (1, 2)}

    def unlabelled_bone(self, level: float, limit: int = 200_000) -> np.ndarray:
        """Flat indices of voxels at or above ``level`` (windowed units) with label 0.

        Computed once per case and level; at most ``limit`` of them (an even subsample), so
        a case with much unlabelled bone costs at most ~1 MB.
        """
        cached = self._unlabelled
        if cached is None or cached[0] != level:
            idx = np.flatnonzero((self.image.ravel() >= level) & (self.label.ravel() == 0))
            if idx.size > limit:
                idx = idx[np.linspace(0, idx.size - 1, limit).astype(np.int64)]
            cached = (level, idx.astype(np.int32 if self.label.size < 2 ** 31 else np.int64))
            self._unlabelled = cached
        return cached[1]


def segmented_cases(dataset: Dataset) -> List[CaseRecord]:
    """The cases of ``dataset`` that have a segmentation, sorted by id.

    Raises:
        InputError: No case has a segmentation.
    """
    cases = sorted((c for c in dataset.cases if c.segmentation), key=lambda c: c.id)
    if not cases:
        raise InputError(dataset.root, f"no case has a segmentation ({len(dataset.cases)} cases, "
                                       "none with a 'segmentation' label map); segmentation "
                                       "training needs labelled cases")
    return cases


def split_cases(case_ids: Sequence[str], val_fraction: float, seed: int
                ) -> Tuple[List[str], List[str]]:
    """Deterministic train/validation split by case.

    Args:
        case_ids: All case ids (order does not matter: they are sorted first).
        val_fraction: Fraction of cases for validation in [0, 1); at least one validation case
            when there are >= 2 cases and the fraction is > 0, and always >= 1 training case.
        seed: Split seed.

    Returns:
        (train ids, validation ids), each sorted.

    Example:
        >>> split_cases(["a", "b", "c", "d"], 0.25, seed=0)
        (['a', 'b', 'c'], ['d'])
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(None, f"val_fraction must be in [0, 1), got {val_fraction}")
    ids = sorted(set(case_ids))
    n = len(ids)
    n_val = 0
    if n >= 2 and val_fraction > 0:
        n_val = min(n - 1, max(1, int(round(n * val_fraction))))
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 7919])).permutation(n)
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return train, val



def cache_key(dataset: Dataset, record: CaseRecord, plans: "SegPlans") -> str:
    """Hex key of a case's prepared arrays: its files (path, size, mtime) and the plans fields
    that change preprocessing."""
    parts = {
        "version": CACHE_VERSION,
        "image": file_key(dataset.path(record.image)),
        "label": file_key(dataset.path(record.segmentation)),
        "spacing": list(plans.model_spacing_mm),
        "window": list(plans.hu_window),
        "roi": [plans.roi_bone_hu, plans.roi_margin_mm],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def load_case(dataset: Dataset, record: CaseRecord, plans: "SegPlans",
              cache_dir: "os.PathLike[str] | str | None" = None) -> PreparedCase:
    """Read a case and prepare it on the model grid (or load it from the cache).

    Args:
        dataset: The dataset.
        record: A case with a segmentation.
        plans: Model plans (spacing, HU window, bone region).
        cache_dir: Optional folder for ``<id>-<key>.npz`` files.

    Returns:
        The :class:`PreparedCase`.

    Raises:
        InputError: A file is missing/unreadable, the label is not on the image grid or has
            values other than 0, 1, 2.
    """
    from AnkleFractureLib.io import atomic_output, read_image
    from AnkleFractureLib.segmentation.preprocess import prepare_case

    image_path = dataset.path(record.image)
    label_path = dataset.path(record.segmentation)
    for p in (image_path, label_path):
        if not p.is_file():
            raise InputError(p, f"file of case {record.id} does not exist")
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"{record.id}-{cache_key(dataset, record, plans)}.npz"
        if cache_file.is_file():
            try:
                with np.load(cache_file) as z:
                    return PreparedCase(record.id, z["image"], z["label"],
                                        tuple(float(v) for v in z["spacing"]))
            except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt, not fatal
                pass
    ct = read_image(image_path)
    label = read_image(label_path)
    if not label.same_geometry(ct, atol=1e-3):
        raise InputError(label_path, f"label map of case {record.id} is not on its image's grid")
    values = np.unique(label.array)
    if not set(values.tolist()) <= {0, 1, 2}:
        raise InputError(label_path, f"label values must be 0, 1 or 2, got {values.tolist()}")
    image, lab = prepare_case(ct, label, plans)
    case = PreparedCase(record.id, np.ascontiguousarray(image.array, dtype=np.float32),
                        np.ascontiguousarray(lab.array, dtype=np.uint8),
                        tuple(float(v) for v in image.spacing))
    if cache_file is not None:
        with atomic_output(cache_file) as tmp:
            np.savez_compressed(tmp, image=case.image, label=case.label,
                                spacing=np.asarray(case.spacing))
    return case


def load_cases(dataset: Dataset, ids: Sequence[str], plans: "SegPlans",
               cache_dir: "os.PathLike[str] | str | None" = None,
               progress: Optional[ProgressCallback] = None) -> List[PreparedCase]:
    """:func:`load_case` for each id, in order, reporting progress."""
    out = []
    for k, cid in enumerate(ids):
        if progress is not None:
            progress(k / max(1, len(ids)), f"preparing case {cid}")
        rec = dataset.get(cid)
        if rec is None or not rec.segmentation:
            raise InputError(dataset.index_path, f"case {cid!r} (from the training split) is not "
                                                 "a segmented case of this dataset")
        out.append(load_case(dataset, rec, plans, cache_dir))
    if progress is not None:
        progress(1.0, f"{len(ids)} cases prepared")
    return out


# ------------------------------------------------------------------------------- augmentation
@dataclass
class AugmentConfig:
    """Probabilities and ranges of the training augmentation (all applied per patch).

    Attributes:
        p_affine: Probability of a random rotation + scaling (one resampling).
        rotation_deg: Maximum absolute rotation (degrees) about each of the three axes.
        scale: (min, max) isotropic scale factor (>1 shows a larger region, bones look smaller).
        p_flip_x: Probability of a left-right flip (x, the last array axis). A flipped right
            ankle looks like a left one and both occur clinically; z is never flipped.
        p_contrast: Probability of multiplying intensities by U(contrast).
        contrast: (min, max) multiplicative factor.
        p_brightness: Probability of adding U(brightness).
        brightness: (min, max) additive offset (windowed units, 1 = the whole HU window).
        p_noise: Probability of Gaussian noise with sd U(0, noise_sd).
        noise_sd: Maximum noise standard deviation (windowed units).
        p_blur: Probability of a Gaussian blur with sigma U(blur_sigma) voxels.
        blur_sigma: (min, max) blur sigma in voxels.
        p_unlabelled_bone: Probability that a patch is centred on bone that carries no label
            (the talus, foot bones, the other leg): hard negatives, the bones a model trained
            on tibia-centred patches mistakes for tibia. 0 (default) draws the patches of
            earlier versions exactly.
    """

    p_affine: float = 0.5
    rotation_deg: float = 15.0
    scale: Tuple[float, float] = (0.9, 1.1)
    p_flip_x: float = 0.5
    p_contrast: float = 0.5
    contrast: Tuple[float, float] = (0.9, 1.1)
    p_brightness: float = 0.5
    brightness: Tuple[float, float] = (-0.05, 0.05)
    p_noise: float = 0.3
    noise_sd: float = 0.02
    p_blur: float = 0.1
    blur_sigma: Tuple[float, float] = (0.5, 1.0)
    p_unlabelled_bone: float = 0.0

    @classmethod
    def none(cls) -> "AugmentConfig":
        """No augmentation at all (plain crops; for tests and overfitting checks)."""
        return cls(p_affine=0.0, p_flip_x=0.0, p_contrast=0.0, p_brightness=0.0, p_noise=0.0,
                   p_blur=0.0)


def rotation_matrix_zyx(angles_rad: Sequence[float]) -> np.ndarray:
    """3x3 rotation in (z, y, x) coordinates: rotations about the z, y and x axes, composed."""
    az, ay, ax = (float(a) for a in angles_rad)
    cz, sz, cy, sy, cx, sx = np.cos(az), np.sin(az), np.cos(ay), np.sin(ay), np.cos(ax), np.sin(ax)
    # Coordinates are ordered (z, y, x); each matrix rotates the plane of the two other axes.
    rz = np.array([[1, 0, 0], [0, cz, -sz], [0, sz, cz]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[cx, -sx, 0], [sx, cx, 0], [0, 0, 1]])
    return rz @ ry @ rx


def crop_padded(array: np.ndarray, start: Sequence[int], size: Sequence[int],
                fill: float = 0) -> np.ndarray:
    """``array[start : start + size]`` in 3D, filled with ``fill`` where it leaves the array.

    Example:
        >>> crop_padded(np.ones((2, 2, 2)), (-1, 0, 1), (2, 2, 2))[:, 0, :].tolist()
        [[0.0, 0.0], [1.0, 0.0]]
    """
    out = np.full(tuple(size), fill, dtype=array.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, array.shape):
        lo, hi = max(int(s), 0), min(int(s) + int(n), dim)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(s), hi - int(s)))
    out[tuple(dst)] = array[tuple(src)]
    return out


def sample_affine(case: PreparedCase, center: np.ndarray, size: Sequence[int],
                  matrix: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Resample a patch whose voxel ``o`` (centred offsets) maps to ``center + matrix @ o``.

    Args:
        case: The case.
        center: Patch centre in (z, y, x) voxel coordinates of the case.
        size: Patch size (z, y, x).
        matrix: 3x3 map from patch voxel offsets to case voxel offsets, (z, y, x) order.

    Returns:
        (image float32 trilinear, label uint8 nearest), each of shape ``size``; 0 (air /
        background) outside the case.
    """
    axes = [np.arange(n, dtype=np.float32) - (n - 1) / 2.0 for n in size]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    coords = grid @ matrix.T.astype(np.float32) + center.astype(np.float32)  # (N, 3) z, y, x
    shape = np.asarray(case.image.shape, dtype=np.float32)
    # grid_sample wants (x, y, z) in [-1, 1] with align_corners=True: -1 is voxel 0's centre.
    norm = 2.0 * coords / np.maximum(shape - 1.0, 1.0) - 1.0
    g = torch.from_numpy(np.ascontiguousarray(norm[:, ::-1])).reshape(1, *size, 3)
    vol = torch.from_numpy(case.image)[None, None]
    img = F.grid_sample(vol, g, mode="bilinear", padding_mode="zeros", align_corners=True)
    # Nearest neighbour for labels by direct indexing: exact, and no float copy of the volume.
    idx = np.rint(coords).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.asarray(case.label.shape)), axis=1)
    lab = np.zeros(idx.shape[0], np.uint8)
    i = idx[inside]
    lab[inside] = case.label[i[:, 0], i[:, 1], i[:, 2]]
    return img.numpy().reshape(tuple(size)), lab.reshape(tuple(size))


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (1, 1, z, y, x) tensor (sigma in voxels, edge padding)."""
    r = max(1, int(np.ceil(2.5 * sigma)))
    x = torch.arange(-r, r + 1, dtype=img.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    out = img
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k.reshape(shape))
    return out


class PatchSampler:
    """Draws augmented training batches; batch ``s`` depends only on (seed, rank, s).

    Args:
        cases: Training cases (model grid).
        patch_size: Patch size (z, y, x) in voxels.
        seed: Run seed.
        rank: Process rank (different ranks draw different patches).
        foreground_fraction: Share of patches centred on a bone voxel (tibia and fibula
            equally often); the rest are centred anywhere in the volume.
        augment: Augmentation settings (None: :class:`AugmentConfig` defaults).
        randomise: Domain randomisation applied last to every patch
            (:class:`~AnkleFractureLib.training.seg_randomise.RandomiseConfig`; its
            ``hu_window`` must be the cases' window). None (default): none, and the patches
            are exactly those of earlier versions.
        bone_level: Windowed intensity from which a voxel is bone, for the patches centred on
            unlabelled bone (``augment.p_unlabelled_bone``); 0.4 is 200 HU in the default
            window [-1000, 2000] HU.

    Example:
        >>> lab = np.zeros((20, 20, 20), np.uint8)
        >>> lab[5:15, 5:10, 5:10] = 1; lab[5:15, 12:14, 12:14] = 2
        >>> img = np.random.default_rng(0).random((20, 20, 20), np.float32)
        >>> case = PreparedCase("c", img, lab, (1.0, 1.0, 1.0))
        >>> img, seg = PatchSampler([case], (16, 16, 16), seed=0).batch(0, 2)
        >>> img.shape, seg.shape, str(img.dtype), str(seg.dtype)
        ((2, 1, 16, 16, 16), (2, 1, 16, 16, 16), 'float32', 'int64')
    """

    def __init__(self, cases: Sequence[PreparedCase], patch_size: Sequence[int], seed: int,
                 rank: int = 0, foreground_fraction: float = 2.0 / 3.0,
                 augment: Optional[AugmentConfig] = None,
                 randomise: Optional["RandomiseConfig"] = None,
                 bone_level: float = 0.4) -> None:
        if not cases:
            raise InputError(None, "no training cases")
        self.cases = list(cases)
        self.patch_size = tuple(int(v) for v in patch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.foreground_fraction = float(foreground_fraction)
        self.augment = augment if augment is not None else AugmentConfig()
        self.randomise = randomise
        self.bone_level = float(bone_level)

    def rng(self, step: int) -> np.random.Generator:
        """The generator of training step ``step``."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.rank, int(step)]))

    def _center(self, case: PreparedCase, rng: np.random.Generator) -> np.ndarray:
        shape = case.label.shape
        # Drawn only when asked for, so that the default keeps earlier versions' patches.
        p_hard = self.augment.p_unlabelled_bone
        if p_hard > 0 and rng.random() < p_hard:
            hard = case.unlabelled_bone(self.bone_level)
            if hard.size:
                flat = hard[int(rng.integers(hard.size))]
                return np.asarray(np.unravel_index(int(flat), shape), dtype=float)
        if rng.random() < self.foreground_fraction:
            present = [c for c in (1, 2) if case.foreground[c].size]
            if present:
                # Tibia and fibula equally often, whatever their size.
                cls = present[int(rng.integers(len(present)))]
                flat = case.foreground[cls][int(rng.integers(case.foreground[cls].size))]
                return np.asarray(np.unravel_index(int(flat), shape), dtype=float)
        return np.array([rng.integers(n) for n in shape], dtype=float)

    def patch(self, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        """One augmented (image float32, label uint8) patch, each of shape ``patch_size``."""
        aug = self.augment
        case = self.cases[int(rng.integers(len(self.cases)))]
        center = self._center(case, rng)
        size = self.patch_size
        if rng.random() < aug.p_affine:
            angles = np.deg2rad(rng.uniform(-aug.rotation_deg, aug.rotation_deg, 3))
            scale = rng.uniform(*aug.scale)
            # Rotate in millimetres, not voxels, so anisotropic model spacings rotate rigidly.
            sp = np.asarray(case.spacing[::-1], dtype=float)  # (z, y, x)
            matrix = np.diag(1.0 / sp) @ rotation_matrix_zyx(angles) @ np.diag(sp) * scale
            img, lab = sample_affine(case, center, size, matrix)
        else:
            start = [int(c) - n // 2 for c, n in zip(center, size)]
            img = crop_padded(case.image, start, size, 0.0)
            lab = crop_padded(case.label, start, size, 0)
        if rng.random() < aug.p_flip_x:
            img, lab = img[:, :, ::-1], lab[:, :, ::-1]
        img = np.array(img, dtype=np.float32)  # a writable copy for the intensity changes
        if rng.random() < aug.p_contrast:
            img *= rng.uniform(*aug.contrast)
        if rng.random() < aug.p_brightness:
            img += rng.uniform(*aug.brightness)
        if rng.random() < aug.p_noise:
            sd = rng.uniform(0.0, aug.noise_sd)
            img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sd)
        if rng.random() < aug.p_blur:
            sigma = rng.uniform(*aug.blur_sigma)
            img = _gaussian_blur(torch.from_numpy(img)[None, None], sigma)[0, 0].numpy()
        if self.randomise is not None:
            from AnkleFractureLib.training.seg_randomise import randomise_patch

            # Last, after every earlier draw of the patch (so those stay as without it); it
            # ends with the clip to [0, 1] and cuts the label with the image.
            img, lab = randomise_patch(img, np.ascontiguousarray(lab), rng, self.randomise)
        return img, np.ascontiguousarray(lab)

    def batch(self, step: int, batch_size: int) -> Tuple[np.ndarray, np.ndarray]:
        """The batch of training step ``step``.

        Returns:
            (image float32 (B, 1, z, y, x), label int64 (B, 1, z, y, x)).
        """
        rng = self.rng(step)
        pairs = [self.patch(rng) for _ in range(int(batch_size))]
        img = np.stack([p[0] for p in pairs])[:, None]
        lab = np.stack([p[1] for p in pairs])[:, None].astype(np.int64)
        return img, lab


def iterate_batches(sampler: PatchSampler, first_step: int, n_steps: int, batch_size: int,
                    num_workers: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Batches of steps ``first_step .. first_step + n_steps - 1``, in order, as CPU tensors.

    With ``num_workers > 0`` a torch DataLoader makes them in worker processes (worker ``w``
    makes every ``num_workers``-th step; the loader returns them round-robin, i.e. in order).
    """
    if num_workers <= 0:
        for s in range(first_step, first_step + n_steps):
            img, lab = sampler.batch(s, batch_size)
            yield torch.from_numpy(img), torch.from_numpy(lab)
        return
    stream = _BatchStream(sampler, first_step, n_steps, batch_size)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                         pin_memory=torch.cuda.is_available())
    yield from loader


class _BatchStream(torch.utils.data.IterableDataset):
    """Iterable dataset behind :func:`iterate_batches`: worker ``w`` of ``n`` makes steps
    ``first + w, first + w + n, ...``."""

    def __init__(self, sampler: PatchSampler, first: int, n_steps: int, batch_size: int) -> None:
        super().__init__()
        self.sampler, self.first = sampler, first
        self.n_steps, self.batch_size = n_steps, batch_size

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        for s in range(self.first + wid, self.first + self.n_steps, nw):
            img, lab = self.sampler.batch(s, self.batch_size)
            yield torch.from_numpy(img), torch.from_numpy(lab)
