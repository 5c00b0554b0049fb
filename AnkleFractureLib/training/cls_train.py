"""Train the Weber classifier: supervised, pseudo-label, FixMatch or the reference semi method.

Cases with a ``weber`` class are labelled, the others unlabelled. ``label_fraction`` < 1 hides
the class of all but a stratified, seeded share of the labelled cases (they join the
unlabelled pool), which is how the label-scarcity experiment is run.

Methods (all share the backbone, the augmentation, the optimiser and a supervised warm-up):

* ``supervised``: cross-entropy on labelled crops only.
* ``pseudolabel`` (Lee 2013): + cross-entropy on the argmax of unlabelled predictions whose
  confidence is >= 0.7 (hard threshold), averaged over the whole unlabelled batch.
* ``fixmatch`` (Sohn et al. 2020): pseudo-labels from a weakly augmented view (confidence
  >= 0.95) supervise a strongly augmented view.
* ``semi``: the reference method (methods.md): class prototypes (mean labelled features), a
  relation weight network (RWN) trained on [labelled feature ++ prototype] pairs, pseudo-labels
  weighted by the RWN relation weight, and a Gaussian-RBF MMD between the confident labelled
  and confident unlabelled features (each extended with a buffer of recent confident
  examples): L = L_l + L_u + 15 L_MMD, selection threshold 0.5. The RWN and the backbone are
  updated alternately every step; inference uses the backbone alone.

Deviations from the paper, and why: training starts from scratch (no 3D ImageNet weights
offline), and from scratch SGD (momentum 0.9) learns the thin fracture gap several times more
slowly than AdamW within a CPU step budget (on the synthetic test crops: loss 1.51 -> 0.89 in 60
steps with SGD lr 0.05, 1.35 -> 0.40 with Adam), so the default optimiser is AdamW at the
reference's lr 1e-3 with cosine decay (``optimizer="sgd"`` restores the reference); the run is
measured in optimiser steps (CPU budget) rather than 500 epochs; the unlabelled terms start
after a supervised warm-up (20 % of the steps), because pseudo-labels of an untrained
network are noise.

The run writes ``OUT/plans.json`` + ``OUT/model.pt`` (the backbone), ``OUT/training.json``
(every setting, the labelled ids, timings, the validation metrics and the fitted calibration
temperature) and ``OUT/training_log.csv``. Under ``torchrun`` every rank draws its own batches,
the backbone is wrapped in DistributedDataParallel, the RWN's gradients and the prototypes are
averaged across ranks, and rank 0 writes the files.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from AnkleFractureLib.errors import InputError

METHODS = ("supervised", "pseudolabel", "fixmatch", "semi")
ProgressCallback = Callable[[float, str], None]
LogCallback = Callable[[str], None]


@dataclass
class ClsTrainConfig:
    """Settings of one training run (recorded in training.json).

    Attributes:
        method: One of :data:`METHODS`.
        label_fraction: Share of the labelled cases whose class is used (stratified per class,
            at least one case per class); the rest join the unlabelled pool.
        seed: Seed of the label selection, the split, the weights and every batch.
        steps: Optimiser steps.
        batch_size: Labelled crops per step (per process).
        unlabelled_batch_size: Unlabelled crops per step (semi-supervised methods).
        lr: Initial learning rate (cosine decay to 0).
        optimizer: "adamw" (default) or "sgd" (momentum ``momentum``, the reference's choice).
        momentum: SGD momentum (0.9 as in the reference).
        weight_decay: Weight decay.
        warmup_fraction: Share of the steps trained on labelled data only.
        val_fraction: Share of the labelled cases held out for validation and temperature
            calibration (0 = none).
        lambda_mmd: Weight of the MMD term (15 in the reference).
        select_threshold: Sample-selection threshold of the semi method (0.5).
        pl_threshold: Confidence threshold of pseudo-labelling (0.7).
        fixmatch_threshold: Confidence threshold of FixMatch (0.95).
        buffer_size: Confident examples kept per buffer for the MMD.
        prototype_momentum: EMA momentum of the class prototypes across steps.
        affine_prob: Share of the samples of the weak view that are rotated/scaled/shifted
            (None: :func:`~AnkleFractureLib.training.cls_augment.weak_config`'s 0.3).
        model_masks: Also train on each labelled training case cropped with the segmentation
            model's masks (registered crops of cases that have a label map). The pipeline
            classifies the model's masks: trained on reference masks alone, the shipped
            classifier's first version scored 82.5 % on them against 99.5 % on its own.
        bridge_prob: Share of the training crops (every view) whose mask channels are closed
            across gaps of 3-6 mm (:func:`~AnkleFractureLib.training.cls_augment.close_masks`),
            as a segmentation that bridges the fracture line does, so that the classifier
            reads the fracture in the CT and not in a hole of the mask (0: never, the recipe
            of the classifiers before it).
    """

    method: str = "semi"
    label_fraction: float = 1.0
    seed: int = 0
    steps: int = 600
    batch_size: int = 16
    unlabelled_batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.2
    val_fraction: float = 0.1
    lambda_mmd: float = 15.0
    select_threshold: float = 0.5
    pl_threshold: float = 0.7
    fixmatch_threshold: float = 0.95
    buffer_size: int = 64
    prototype_momentum: float = 0.9
    affine_prob: Optional[float] = None
    model_masks: bool = False
    bridge_prob: float = 0.0

    def check(self) -> None:
        """Raise InputError (one line per problem) on bad settings."""
        problems = []
        if self.method not in METHODS:
            problems.append(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if not 0.0 < self.label_fraction <= 1.0:
            problems.append(f"label fraction must be in (0, 1], got {self.label_fraction}")
        if self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1 or self.unlabelled_batch_size < 1:
            problems.append("batch sizes must be >= 1")
        if self.optimizer not in ("adamw", "sgd"):
            problems.append(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if not self.lr > 0:
            problems.append(f"learning rate must be > 0, got {self.lr}")
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"val fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.bridge_prob <= 1.0:
            problems.append(f"bridge probability must be in [0, 1], got {self.bridge_prob}")
        if not 0.0 <= self.warmup_fraction <= 1.0:
            problems.append(f"warm-up fraction must be in [0, 1], got {self.warmup_fraction}")
        if problems:
            raise InputError(None, "; ".join(problems))


# ---------------------------------------------------------------------- data selection
#: Suffix of the ids of the model-mask crops added by ``ClsTrainConfig.model_masks``.
MODEL_MASK_SUFFIX = "+model_masks"


def select_labelled(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of the cases whose label is kept: a stratified, seeded share per class.

    Args:
        y: (N,) class index, -1 = unlabelled.
        fraction: Share kept per class (rounded, at least 1 per present class).
        seed: Seed.

    Returns:
        Sorted int64 indices into ``y``.

    Example:
        >>> y = np.array([0, 0, 0, 0, 1, 1, 1, 1, -1])
        >>> select_labelled(y, 0.5, seed=0).size
        4
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 4099]))
    keep: List[int] = []
    for k in np.unique(y[y >= 0]):
        idx = np.flatnonzero(y == k)
        n = max(1, int(round(fraction * idx.size)))
        keep.extend(rng.permutation(idx)[:n].tolist())
    return np.asarray(sorted(keep), dtype=np.int64)


def split_validation(labelled: np.ndarray, y: np.ndarray, fraction: float, seed: int
                     ) -> Tuple[np.ndarray, np.ndarray]:
    """Stratified (train, validation) split of labelled indices; no validation when a class
    would be left with fewer than 2 training cases."""
    if fraction <= 0:
        return labelled, np.zeros(0, np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7919]))
    train: List[int] = []
    val: List[int] = []
    for k in np.unique(y[labelled]):
        idx = rng.permutation(labelled[y[labelled] == k])
        n_val = int(round(fraction * idx.size))
        if idx.size - n_val < 2:
            n_val = 0
        val.extend(idx[:n_val].tolist())
        train.extend(idx[n_val:].tolist())
    return np.asarray(sorted(train), np.int64), np.asarray(sorted(val), np.int64)


# ---------------------------------------------------------------------- helpers
def _cosine_lr(base: float, step: int, total: int) -> float:
    return 0.5 * base * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))


def fit_temperature(logits: np.ndarray, y: np.ndarray, lower: float = 1.0,
                    upper: float = 10.0) -> float:
    """Temperature T minimising the validation negative log-likelihood of softmax(logits / T).

    A 1-D search over T in [``lower``, ``upper``] (log grid, then refined): calibration that
    never changes the predicted class. T < 1 (sharpening) is not allowed by default: a small
    validation set that the model gets entirely right drives the fit to T -> 0, i.e. to
    claiming certainty; a clinical tool may soften an over-confident network, never harden it.

    Example:
        >>> logits = np.array([[4.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
        >>> fit_temperature(logits, np.array([0, 1, 1, 0])) > 1.0  # over-confident -> T > 1
        True
        >>> fit_temperature(logits, np.array([0, 0, 1, 0]))  # all right: no sharpening
        1.0
    """
    logits = np.asarray(logits, np.float64)
    y = np.asarray(y, np.int64)
    if logits.size == 0:
        return 1.0

    def nll(t: float) -> float:
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(y)), y].mean())

    grid = np.exp(np.linspace(np.log(lower), np.log(upper), 61))
    best = float(grid[int(np.argmin([nll(t) for t in grid]))])
    fine = np.clip(np.linspace(best / 1.08, best * 1.08, 21), lower, upper)
    return round(float(fine[int(np.argmin([nll(t) for t in fine]))]), 4)


def _versions() -> Dict[str, str]:
    import monai
    import torch

    return {"torch": torch.__version__, "monai": monai.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0]}



def _forward_module(backbone: Any) -> Any:
    """A module whose ``forward`` returns (features, logits): DDP syncs gradients only for
    calls through ``forward``, and the semi-supervised losses need both outputs."""
    import torch

    class FeaturesAndLogits(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            f = self.net.features(x)
            return f, self.net.classify(f)

    return FeaturesAndLogits(backbone)


def predict_logits(network: Any, x: np.ndarray, device: Any = "cpu", batch_size: int = 16
                   ) -> np.ndarray:
    """Logits (N, K) of prepared inputs (N, C, z, y, x) (float16 or float32), eval mode."""
    import torch

    was_training = network.training
    network.eval()
    out = []
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                xb = torch.from_numpy(np.asarray(x[i:i + batch_size], np.float32)).to(device)
                out.append(network(xb).float().cpu().numpy())
    finally:
        network.train(was_training)
    k = getattr(network, "num_classes", 4)
    return np.concatenate(out) if out else np.zeros((0, k), np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _average_gradients(module: Any, ctx: Any) -> None:
    """All-reduce (mean) the gradients of a module that is not wrapped in DDP."""
    if not ctx.distributed:
        return
    import torch.distributed as dist

    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= ctx.world_size


def _all_reduce_mean_tensor(t: Any, ctx: Any) -> Any:
    if not ctx.distributed:
        return t
    import torch.distributed as dist

    t = t.clone()
    dist.all_reduce(t)
    return t / ctx.world_size


# ---------------------------------------------------------------------- public API
def train_classifier(dataset_dir: "os.PathLike[str] | str", out_dir: "os.PathLike[str] | str",
                     config: Optional[ClsTrainConfig] = None, *, plans: Any = None,
                     cache_dir: "os.PathLike[str] | str | None" = None,
                     crops: Any = None, workers: int = 1, device: str = "auto",
                     seg_model_dir: "os.PathLike[str] | str | None" = None,
                     num_threads: Optional[int] = None, max_minutes: Optional[float] = None,
                     progress: Optional[ProgressCallback] = None,
                     log: Optional[LogCallback] = print,
                     should_cancel: Optional[Callable[[], bool]] = None,
                     command: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train a Weber classifier on a dataset's crops.

    Args:
        dataset_dir: Dataset folder (cases with ``weber`` are labelled).
        out_dir: Model folder to write (must be empty or absent).
        config: Training settings (default :class:`ClsTrainConfig`).
        plans: :class:`~AnkleFractureLib.classification.plans.ClsPlans` (crop kind, channels,
            resolution, network); default ``ClsPlans()`` (registered crop, full resolution).
        cache_dir: Crop cache folder (default ``dataset_dir/.crop_cache``).
        crops: A preloaded :class:`~AnkleFractureLib.classification.crops.CropSet` of this
            dataset (skips loading; used by the experiment script). Crops loaded here use the
            dataset's side when a case has one (side policy "dataset"; detection otherwise),
            recorded with the crop code version and hashes under ``crops`` in training.json.
        workers: Processes computing missing crops.
        device: "auto", "cpu" or "cuda".
        seg_model_dir: Segmentation model for the cases without a label map (the shipped
            one when None): the model the pipeline will run with.
        num_threads: torch CPU threads per process.
        max_minutes: Wall-clock budget; training stops after the step that exceeds it and
            saves (status "max_minutes").
        progress: Callback (fraction, message) on rank 0.
        log: One line per logging interval (rank 0); None for silence.
        should_cancel: Polled every step; the run stops, saves nothing and raises
            CancelledError when it returns True.
        command: Command line recorded in training.json (default ``sys.argv``).

    Returns:
        The summary written to ``training.json``.

    Raises:
        InputError: Bad settings, no labelled case, or a non-empty output folder.
    """
    from AnkleFractureLib.classification.plans import ClsPlans
    from AnkleFractureLib.training.determinism import deterministic_training
    from AnkleFractureLib.training.distributed import cleanup_distributed, init_distributed

    config = config or ClsTrainConfig()
    config.check()
    plans = plans or ClsPlans()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise InputError(out, "the output model folder is not empty (choose a new folder)")
    # Deterministic kernels before the device is set up: cuBLAS reads its workspace setting
    # when it first starts (see training.determinism).
    with deterministic_training(config.seed) as determinism:
        ctx = init_distributed(device, num_threads)
        try:
            return _train(ctx, Path(dataset_dir), out, config, plans, cache_dir, crops, workers,
                          max_minutes, progress if ctx.is_main else None,
                          (log or (lambda _m: None)) if ctx.is_main else (lambda _m: None),
                          should_cancel, list(sys.argv if command is None else command),
                          seg_model_dir, determinism)
        finally:
            cleanup_distributed(ctx)


def _train(ctx: Any, dataset_dir: Path, out: Path, cfg: ClsTrainConfig, plans: Any,
           cache_dir: Any, crops: Any, workers: int, max_minutes: Optional[float],
           progress: Optional[ProgressCallback], log: LogCallback,
           should_cancel: Optional[Callable[[], bool]], command: List[str],
           seg_model_dir: Any = None, determinism: Optional[Dict[str, Any]] = None
           ) -> Dict[str, Any]:
    """Load and split the crops, train, and write the model folder (rank 0)."""
    t0 = time.monotonic()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    cache = Path(cache_dir) if cache_dir is not None else dataset_dir / ".crop_cache"
    loader = _CropLoader(ctx, dataset_dir, cache, plans, workers, progress, seg_model_dir)
    if crops is None:
        # Training crops use the dataset's side when it has one (labelled training data knows
        # it; evaluation detects it as `run` does), else detection: recorded in training.json.
        crops = loader.load(None, model_masks=False)
    data = _split_data(crops, cfg, log, dataset_dir)
    if cfg.model_masks and plans.crop == "registered":
        data = _add_model_mask_twins(data, loader, log)
    if cfg.method != "supervised" and data.unlabelled.size == 0:
        log("note: no unlabelled case: the unlabelled terms are skipped")
    # Prepared network inputs for every case, once (channels, resolution), kept as float16.
    data.x = np.stack([plans.prepare(data.crops.x[i])
                       for i in range(len(data.crops))]).astype(np.float16)
    run = _ClsRun(ctx, cfg, plans, data, log)
    run.train(t0, max_minutes, progress, should_cancel)
    if not ctx.is_main:
        return {}
    return _write_model_folder(run, out, dataset_dir, command, started, t0, progress,
                               determinism)


@dataclass
class _CropLoader:
    """Loads this dataset's crops: on rank 0 behind a barrier under torchrun (computed once)."""

    ctx: Any
    dataset_dir: Path
    cache: Path
    plans: Any
    workers: int
    progress: Optional[ProgressCallback]
    seg_model_dir: Any

    def load(self, ids: Optional[List[str]], model_masks: bool, what: str = "") -> Any:
        """The crops of ``ids`` (all cases when None), side policy "dataset"; progress 0-0.1."""
        from AnkleFractureLib.classification.crops import load_crops_once
        from AnkleFractureLib.dataset.layout import Dataset

        progress = self.progress
        return load_crops_once(
            Dataset.load(self.dataset_dir), self.cache, self.plans.crop,
            rank=self.ctx.rank, world_size=self.ctx.world_size, workers=self.workers,
            progress=(lambda f, m: progress(0.1 * f, what + m)) if progress else None,
            seg_model_dir=self.seg_model_dir, side="dataset", model_masks=model_masks,
            **({} if ids is None else {"ids": ids}))


@dataclass
class _Data:
    """The crops and how they are used.

    Attributes:
        crops: The :class:`~AnkleFractureLib.classification.crops.CropSet`.
        y: (N,) class index of every crop, -1 = unlabelled (hidden labels included).
        train_l: Indices of the labelled training crops.
        val_idx: Indices of the validation crops.
        unlabelled: Indices of the unlabelled crops (hidden labels included).
        n_twins: Crops added with the segmentation model's masks.
        x: float16 (N, C, z, y, x) prepared network inputs (set after the split).
    """

    crops: Any
    y: np.ndarray
    train_l: np.ndarray
    val_idx: np.ndarray
    unlabelled: np.ndarray
    n_twins: int = 0
    x: Optional[np.ndarray] = None


def _split_data(crops: Any, cfg: ClsTrainConfig, log: LogCallback, dataset_dir: Path) -> _Data:
    """Kept labels (``label_fraction``), the validation split and the unlabelled pool.

    Raises:
        InputError: No labelled crop.
    """
    from AnkleFractureLib.classification.plans import CLASSES

    for cid, reason in crops.failed.items():
        log(f"skipped case {cid}: {reason}")
    y_all = crops.y
    labelled_all = np.flatnonzero(y_all >= 0)
    if labelled_all.size == 0:
        raise InputError(dataset_dir, "no case has a Weber class: at least one labelled case "
                                      "per class is needed")
    missing = [c for k, c in enumerate(CLASSES) if not np.any(y_all == k)]
    if missing:
        log(f"warning: no labelled case of class {', '.join(missing)}")
    kept = labelled_all[np.isin(labelled_all, labelled_all[
        select_labelled(y_all[labelled_all], cfg.label_fraction, cfg.seed)])]
    train_l, val_idx = split_validation(kept, y_all, cfg.val_fraction, cfg.seed)
    unlabelled = np.setdiff1d(np.arange(len(y_all)), np.concatenate([kept]))
    return _Data(crops, y_all, train_l, val_idx, unlabelled)


def _add_model_mask_twins(data: _Data, loader: _CropLoader, log: LogCallback) -> _Data:
    """The same labelled training cases once more, with the segmentation model's masks.

    Validation and unlabelled cases are left as they are: no leak across the split.
    """
    crops = data.crops
    own = [crops.ids[i] for i in data.train_l if crops.info and
           (crops.info[i] or {}).get("masks") == "dataset"]
    if not own:
        return data
    twins = loader.load(own, model_masks=True, what="model masks: ")
    for cid, reason in twins.failed.items():
        log(f"no model-mask crop of case {cid}: {reason}")
    twins.failed = {}
    base = len(crops)
    crops = crops.concat(twins, suffix=MODEL_MASK_SUFFIX)
    train_l = np.concatenate([data.train_l, base + np.arange(len(twins), dtype=np.int64)])
    return _Data(crops, crops.y, train_l, data.val_idx, data.unlabelled, len(twins))


@dataclass
class _Batch:
    """One step's forward pass: labelled (l) and unlabelled weak (u) / strong (s) views."""

    yl: Any
    f_l: Any
    lg_l: Any
    f_u: Any = None
    lg_u: Any = None
    lg_s: Any = None


class _ClsRun:
    """The networks, optimisers, random streams and semi-supervised state of one run, and its
    steps (forward, method losses, update, log)."""

    def __init__(self, ctx: Any, cfg: ClsTrainConfig, plans: Any, data: _Data,
                 log: LogCallback) -> None:
        import torch

        from AnkleFractureLib.classification.network import build_classifier
        from AnkleFractureLib.classification.plans import CLASSES
        from AnkleFractureLib.classification.relation import RelationWeightNetwork
        from AnkleFractureLib.training import semi_losses as sl
        from AnkleFractureLib.training.cls_augment import strong_config, weak_config
        from AnkleFractureLib.training.distributed import seed_everything

        self.ctx, self.cfg, self.plans, self.data, self.log = ctx, cfg, plans, data, log
        seed_everything(cfg.seed, ctx.rank)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.dev = dev = ctx.device
        self.backbone = build_classifier(plans.network, implementation="monai").to(dev)
        self.model = _forward_module(self.backbone)
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.model, device_ids=[dev.index] if dev.type == "cuda" else None)
        self.rwn = RelationWeightNetwork(self.backbone.feature_dim).to(dev)
        self.opt = self._make_opt(self.model.parameters())
        self.opt_rwn = self._make_opt(self.rwn.parameters())
        self.gen = torch.Generator().manual_seed(int(cfg.seed) * 1000 + ctx.rank)
        self.rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), 31, ctx.rank]))
        flips = (2,) if plans.crop == "raw" else ()
        self.weak, self.strong = weak_config(flips), strong_config(flips)
        if cfg.affine_prob is not None:
            import dataclasses

            self.weak = dataclasses.replace(self.weak, affine_prob=float(cfg.affine_prob))
        if cfg.bridge_prob > 0:
            import dataclasses

            self.weak = dataclasses.replace(self.weak, bridge_prob=float(cfg.bridge_prob))
            self.strong = dataclasses.replace(self.strong, bridge_prob=float(cfg.bridge_prob))
        self.k = len(CLASSES)
        self.prototypes = torch.zeros(self.k, self.backbone.feature_dim, device=dev)
        self.buf_l = sl.FeatureBuffer(cfg.buffer_size, self.backbone.feature_dim)
        self.buf_u = sl.FeatureBuffer(cfg.buffer_size, self.backbone.feature_dim)
        self.warmup = int(round(cfg.warmup_fraction * cfg.steps))
        self.log_rows: List[Dict[str, Any]] = []
        self.first_loss: Optional[float] = None
        self.status = "completed"
        self.step = 0

    def _make_opt(self, params: Any) -> Any:
        import torch

        cfg = self.cfg
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _batch(self, idx: np.ndarray, size: int) -> np.ndarray:
        return self.rng.choice(idx, size=size, replace=idx.size < size)

    def _to_dev(self, index: np.ndarray) -> Any:
        import torch

        assert self.data.x is not None
        return torch.from_numpy(self.data.x[index].astype(np.float32)).to(self.dev)

    def train(self, t0: float, max_minutes: Optional[float],
              progress: Optional[ProgressCallback],
              should_cancel: Optional[Callable[[], bool]]) -> None:
        """Run the steps (until ``cfg.steps``, the time budget or a cancel)."""
        from AnkleFractureLib.errors import CancelledError
        from AnkleFractureLib.training.distributed import all_reduce_max

        cfg, data = self.cfg, self.data
        twins_note = f" (of them {data.n_twins} with the model's masks)" if data.n_twins else ""
        self.log(f"{cfg.method}: {data.train_l.size} labelled training crops{twins_note}, "
                 f"{data.val_idx.size} validation, {data.unlabelled.size} unlabelled; "
                 f"{cfg.steps} steps; device {self.dev}")
        self.model.train()
        self.rwn.train()
        window: Dict[str, List[float]] = {}
        for step in range(1, cfg.steps + 1):
            self.step = step
            if should_cancel is not None and should_cancel():
                raise CancelledError(f"training cancelled at step {step}")
            lr = _cosine_lr(cfg.lr, step - 1, cfg.steps)
            for group in list(self.opt.param_groups) + list(self.opt_rwn.param_groups):
                group["lr"] = lr
            stats = self._train_step(step)
            if self.first_loss is None:
                self.first_loss = stats["loss"]
            for key, v in stats.items():
                window.setdefault(key, []).append(v)
            window = self._log_window(step, lr, window, t0)
            if progress is not None:
                progress(0.1 + 0.85 * step / cfg.steps, f"step {step}/{cfg.steps}")
            over = max_minutes is not None and (time.monotonic() - t0) / 60.0 > max_minutes
            if all_reduce_max([1.0 if over else 0.0], self.ctx)[0] > 0:
                self.status = "max_minutes"
                self.log(f"stopping at step {step}: --max-minutes {max_minutes} reached")
                break

    def _log_window(self, step: int, lr: float, window: Dict[str, List[float]], t0: float
                    ) -> Dict[str, List[float]]:
        """Every ``steps // 20`` steps (1-25) and at the end, a log row of the window's means;
        the window to go on with."""
        every = max(1, min(25, self.cfg.steps // 20))
        if not (step % every == 0 or step == self.cfg.steps):
            return window
        row = {"step": step, "lr": round(lr, 6), "minutes": round((time.monotonic() - t0) / 60, 3)}
        row.update({key: round(float(np.mean(v)), 5) for key, v in window.items()})
        self.log_rows.append(row)
        self.log(" ".join(f"{key} {val}" for key, val in row.items()))
        return {}

    def _train_step(self, step: int) -> Dict[str, float]:
        """One optimiser step of the backbone (and of the RWN for "semi"); the step's stats."""
        import torch.nn.functional as F

        from AnkleFractureLib.training import semi_losses as sl

        cfg, data = self.cfg, self.data
        unl_on = (cfg.method != "supervised" and data.unlabelled.size > 0
                  and step > self.warmup)
        stats: Dict[str, float] = {}
        b = self._forward(unl_on, stats)
        loss_l = F.cross_entropy(b.lg_l, b.yl)
        loss = loss_l
        stats["loss_l"] = float(loss_l.detach())
        if cfg.method == "semi":
            terms = self._semi_terms(step, b, unl_on, stats)
            if terms is not None:
                loss = loss + terms[0] + cfg.lambda_mmd * terms[1]
        elif cfg.method == "pseudolabel" and unl_on:
            loss_u, mask = sl.pseudo_label_loss(b.lg_u, cfg.pl_threshold)
            loss = loss + loss_u
            stats.update(loss_u=float(loss_u.detach()), mask=float(mask.float().mean()))
        elif cfg.method == "fixmatch" and unl_on:
            loss_u, mask = sl.fixmatch_loss(b.lg_u, b.lg_s, cfg.fixmatch_threshold)
            loss = loss + loss_u
            stats.update(loss_u=float(loss_u.detach()), mask=float(mask.float().mean()))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        stats["loss"] = float(loss.detach())
        return stats

    def _forward(self, unl_on: bool, stats: Dict[str, float]) -> _Batch:
        """Draw and augment the step's batches and run them through the backbone together."""
        import torch

        from AnkleFractureLib.training.cls_augment import augment_batch

        cfg, data = self.cfg, self.data
        il = self._batch(data.train_l, cfg.batch_size)
        yl = torch.from_numpy(data.y[il]).to(self.dev)
        xl = augment_batch(self._to_dev(il), self.weak, self.gen)
        if not unl_on:
            f_l, lg_l = self.model(xl)
            return _Batch(yl, f_l, lg_l)
        iu = self._batch(data.unlabelled, cfg.unlabelled_batch_size)
        xu_raw = self._to_dev(iu)
        xu = augment_batch(xu_raw, self.weak, self.gen)
        parts = [xl, xu]
        if cfg.method == "fixmatch":
            parts.append(augment_batch(xu_raw, self.strong, self.gen))
        feats, logits = self.model(torch.cat(parts))
        nl, nu = xl.shape[0], xu.shape[0]
        # Diagnostic only: the hidden class of an unlabelled case, when it has one.
        hidden = data.y[iu]
        known = hidden >= 0
        if known.any():
            stats["pseudo_acc"] = float((logits[nl:nl + nu].argmax(1).cpu().numpy()[known]
                                         == hidden[known]).mean())
        return _Batch(yl, feats[:nl], logits[:nl], feats[nl:nl + nu], logits[nl:nl + nu],
                      logits[nl + nu:])

    def _semi_terms(self, step: int, b: _Batch, unl_on: bool, stats: Dict[str, float]
                    ) -> Optional[Tuple[Any, Any]]:
        """The reference method's step: (a) prototypes and an RWN update on detached
        features; (b) with unlabelled data, (weighted pseudo-label loss, MMD) of the backbone.
        """
        import torch

        from AnkleFractureLib.training import semi_losses as sl

        cfg, ctx = self.cfg, self.ctx
        batch_protos = sl.class_prototypes(b.f_l.detach(), b.yl, self.k, previous=self.prototypes,
                                           momentum=cfg.prototype_momentum if step > 1 else 0.0)
        self.prototypes = _all_reduce_mean_tensor(batch_protos, ctx)
        self.opt_rwn.zero_grad(set_to_none=True)
        loss_rwn = sl.relation_loss(self.rwn, b.f_l.detach(), b.yl, self.prototypes)
        loss_rwn.backward()
        _average_gradients(self.rwn, ctx)
        self.opt_rwn.step()
        stats["loss_rwn"] = float(loss_rwn.detach())
        if not unl_on:
            return None
        with torch.no_grad():
            probs_u = torch.softmax(b.lg_u, 1)
            pseudo = probs_u.argmax(1)
            self.rwn.eval()
            w = sl.relation_weights(self.rwn, b.f_u.detach(), pseudo, self.prototypes)
            self.rwn.train()
            probs_l = torch.softmax(b.lg_l, 1)
            conf_l = (probs_l.argmax(1) == b.yl) & (probs_l.max(1).values > cfg.select_threshold)
        conf_u = sl.select_confident(probs_u, w, cfg.select_threshold)
        loss_u = sl.weighted_pseudo_label_loss(b.lg_u, pseudo, w)
        set_l = torch.cat([b.f_l[conf_l], self.buf_l.get().to(self.dev)])
        set_u = torch.cat([b.f_u[conf_u], self.buf_u.get().to(self.dev)])
        loss_mmd = sl.gaussian_mmd(set_l, set_u)
        self.buf_l.push(b.f_l[conf_l].detach())
        self.buf_u.push(b.f_u[conf_u].detach())
        stats.update(loss_u=float(loss_u.detach()), loss_mmd=float(loss_mmd.detach()),
                     mask=float(conf_u.float().mean()), weight=float(w.mean()))
        return loss_u, loss_mmd


def _write_model_folder(run: _ClsRun, out: Path, dataset_dir: Path, command: List[str],
                        started: str, t0: float, progress: Optional[ProgressCallback],
                        determinism: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Fit the temperature on the validation crops, save the backbone, training.json and
    training_log.csv (rank 0); the summary."""
    from AnkleFractureLib.classification.model_io import save_classifier
    from AnkleFractureLib.io import atomic_write_json, atomic_write_text

    cfg, plans, data = run.cfg, run.plans, run.data
    temperature = 1.0
    val: Dict[str, Any] = {}
    if data.val_idx.size:
        assert data.x is not None
        logits = predict_logits(run.backbone, data.x[data.val_idx], run.dev)
        temperature = fit_temperature(logits, data.y[data.val_idx])
        pred = logits.argmax(1)
        val = {"n": int(data.val_idx.size),
               "accuracy": round(float((pred == data.y[data.val_idx]).mean()), 4),
               "temperature": temperature}
    plans.temperature = temperature
    save_classifier(out, run.backbone, plans, {"epoch": run.step, "method": cfg.method})
    crops, log_rows = data.crops, run.log_rows
    summary: Dict[str, Any] = {
        "status": run.status, "method": cfg.method, "config": cfg.__dict__.copy(),
        "plans": plans.to_json(), "dataset": str(dataset_dir), "command": command,
        "steps_done": run.step, "first_loss": run.first_loss,
        "last_loss": log_rows[-1]["loss"] if log_rows else None,
        "cases": {"labelled_train": [crops.ids[i] for i in data.train_l],
                  "validation": [crops.ids[i] for i in data.val_idx],
                  "unlabelled": int(data.unlabelled.size), "failed": crops.failed},
        "crops": dict(getattr(crops, "meta", {}) or {}),  # code version, hashes, side
        "validation": val, "started": started,
        "minutes": round((time.monotonic() - t0) / 60.0, 2),
        "world_size": run.ctx.world_size, "device": str(run.dev), "versions": _versions(),
    }
    if determinism is not None:
        summary["determinism"] = determinism
    atomic_write_json(out / "training.json", summary)
    if log_rows:
        keys: List[str] = []
        for r in log_rows:
            keys += [key for key in r if key not in keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(log_rows)
        atomic_write_text(out / "training_log.csv", buf.getvalue())
    if progress is not None:
        progress(1.0, f"saved {out}")
    return summary
