"""Training of the tibia/fibula segmentation network (MONAI 3D U-Net).

The method follows nnU-Net's recipe at a small scale: patches with foreground oversampling and
spatial/intensity augmentation (:mod:`AnkleFractureLib.training.seg_data`; optionally domain
randomisation, :mod:`AnkleFractureLib.training.seg_randomise`), Dice +
cross-entropy loss, a polynomial learning-rate decay, gradient clipping, validation by
sliding-window inference on whole held-out cases after every epoch, and the best model by mean
validation Dice kept in the model folder::

    MODEL_DIR/plans.json         # SegPlans (what inference needs besides the weights)
    MODEL_DIR/model.pt           # best weights, float16 (see segmentation.model_io)
    MODEL_DIR/training_log.csv   # one row per epoch
    MODEL_DIR/training.json      # command, split, seed, versions, best Dice, status, wall time,
                                 # determinism settings (training.determinism)
    MODEL_DIR/checkpoint.pt      # latest full state for --resume (float32 weights, optimizer,
                                 # scheduler, step, RNG); not needed for inference

``training_log.csv`` has one row per validation: ``epoch`` (1-based), ``step`` (optimiser steps
so far), ``train_loss`` (mean Dice+CE of the epoch's steps, all ranks), ``val_dice_tibia``,
``val_dice_fibula``, ``val_dice_mean`` (mean over validation cases, at model spacing), ``lr``
(after the epoch) and ``seconds`` (the epoch's wall time, validation included). A run stopped by
``--max-minutes`` closes its partial epoch with a row, so after ``--resume`` that epoch has a
second row with a larger ``step``.

It runs on one CPU or GPU, or on several processes started by ``torchrun`` (DDP: every rank
draws its own patches, gradients are averaged, validation cases are split across ranks, rank 0
writes the files). Arrays are (z, y, x); spacings (x, y, z) in mm.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import platform
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from AnkleFractureLib import __version__
from AnkleFractureLib.dataset.layout import Dataset
from AnkleFractureLib.errors import InputError
from AnkleFractureLib.io import atomic_torch_save, atomic_write_json, atomic_write_text
from AnkleFractureLib.segmentation.model_io import save_model, sha256_file
from AnkleFractureLib.segmentation.network import build_network
from AnkleFractureLib.segmentation.plans import SegPlans
from AnkleFractureLib.training.determinism import deterministic_training
from AnkleFractureLib.training.distributed import (DistContext, all_reduce_max, all_reduce_sum,
                                                   barrier, cleanup_distributed, init_distributed,
                                                   seed_everything)
from AnkleFractureLib.training.seg_data import (AugmentConfig, PatchSampler, PreparedCase,
                                                iterate_batches, load_cases, segmented_cases,
                                                split_cases)
from AnkleFractureLib.training.seg_randomise import LEVELS, RandomiseConfig, randomise_config

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "training_log.csv"
SUMMARY_FILE = "training.json"
CHECKPOINT_VERSION = 1
CSV_COLUMNS = ("epoch", "step", "train_loss", "val_dice_tibia", "val_dice_fibula",
               "val_dice_mean", "lr", "seconds")
OPTIMIZERS = ("adamw", "sgd")
#: Bone threshold (HU) of the patches centred on unlabelled bone (``--hard-negatives``).
BONE_HU = 200.0
#: Gradient-norm clip (nnU-Net's value): keeps the early, large Dice gradients from diverging.
GRAD_CLIP = 12.0
#: Exponent of the polynomial learning-rate decay lr * (1 - step / total) ** 0.9 (nnU-Net).
POLY_EXPONENT = 0.9

ProgressCallback = Callable[[float, str], None]
LogCallback = Callable[[str], None]


# ------------------------------------------------------------------------------------- helpers
def _versions() -> Dict[str, str]:
    try:
        import monai

        monai_version = monai.__version__
    except ImportError:  # pragma: no cover - monai is a dependency
        monai_version = "missing"
    return {"AnkleFractureLib": __version__, "torch": torch.__version__, "monai": monai_version,
            "numpy": np.__version__, "python": platform.python_version()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def dice_per_label(pred: torch.Tensor, target: torch.Tensor, labels: Sequence[int] = (1, 2)
                   ) -> List[float]:
    """Dice 2|P & G| / (|P| + |G|) of each label value (1.0 when both are empty).

    Args:
        pred: Integer label map (any shape).
        target: Integer label map of the same shape.
        labels: Label values.

    Example:
        >>> p = torch.tensor([0, 1, 1, 2]); g = torch.tensor([0, 1, 2, 2])
        >>> [round(d, 3) for d in dice_per_label(p, g)]
        [0.667, 0.667]
    """
    out = []
    for c in labels:
        p, g = pred == c, target == c
        denom = int(p.sum()) + int(g.sum())
        out.append(1.0 if denom == 0 else 2.0 * int((p & g).sum()) / denom)
    return out


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict_volume(network: torch.nn.Module, image: np.ndarray, patch_size: Sequence[int],
                   device: torch.device, amp_dtype: Optional[torch.dtype] = None,
                   sw_batch_size: int = 2) -> torch.Tensor:
    """Label map of a whole prepared volume by Gaussian-weighted sliding windows.

    Args:
        network: The (bare) network, in eval mode.
        image: float32 (z, y, x) on the model grid.
        patch_size: Window (z, y, x), overlap 0.25.
        device: Where to run.
        amp_dtype: Autocast dtype on CUDA, or None for float32.
        sw_batch_size: Windows per forward pass.

    Returns:
        uint8 tensor (z, y, x) on the CPU.
    """
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.ascontiguousarray(image))[None, None].to(device)
    with _autocast(device, amp_dtype):
        logits = sliding_window_inference(x, roi_size=tuple(int(v) for v in patch_size),
                                          sw_batch_size=sw_batch_size, predictor=network,
                                          overlap=0.25, mode="gaussian")
    return logits[0].argmax(0).to(torch.uint8).cpu()


def validate(network: torch.nn.Module, cases: Sequence[PreparedCase], patch_size: Sequence[int],
             device: torch.device, amp_dtype: Optional[torch.dtype] = None) -> List[float]:
    """Sum of the per-case Dice over ``cases``: [sum tibia, sum fibula, number of cases]."""
    was_training = network.training
    network.eval()
    sums = [0.0, 0.0, 0.0]
    try:
        for case in cases:
            pred = predict_volume(network, case.image, patch_size, device, amp_dtype)
            d = dice_per_label(pred, torch.from_numpy(case.label))
            sums[0] += d[0]
            sums[1] += d[1]
            sums[2] += 1.0
    finally:
        network.train(was_training)
    return sums


def read_log(path: Path) -> List[Dict[str, str]]:
    """Rows of ``training_log.csv`` (empty when it does not exist)."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write_log(path: Path, rows: Sequence[Dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in CSV_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def _fmt(value: Optional[float], digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Read a training checkpoint (weights-only unpickling).

    Raises:
        InputError: Missing or unreadable.
    """
    if not path.is_file():
        raise InputError(path, "no training checkpoint to resume from (checkpoint.pt missing; "
                               "was the run started with --no-keep-checkpoint?)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint is a user-level problem
        raise InputError(path, f"cannot read training checkpoint: {type(exc).__name__}: "
                               f"{(str(exc).splitlines() or [''])[0][:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("checkpoint_version") != CHECKPOINT_VERSION:
        raise InputError(path, "not a training checkpoint of this library version")
    return ckpt


def _rng_state() -> Dict[str, Any]:
    # Plain types only, so the checkpoint loads with weights_only=True.
    legacy = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [legacy[0], legacy[1].tolist(), int(legacy[2]), int(legacy[3]),
                      float(legacy[4])],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if state.get("cuda") and torch.cuda.is_available() and \
            len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while training (torchrun stops workers with SIGTERM
    on Ctrl-C), so every stop path saves a checkpoint."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    # nnU-Net's choice: SGD with Nesterov momentum 0.99.
    return torch.optim.SGD(params, lr=lr, momentum=0.99, nesterov=True, weight_decay=weight_decay)


def _amp_dtype(device: torch.device) -> Optional[torch.dtype]:
    if device.type != "cuda":
        return None  # float32 on the CPU: CPU autocast is slower for 3D convolutions
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ------------------------------------------------------------------------------------ training
def train_segmentation(dataset_dir: "os.PathLike[str] | str", out_dir: "os.PathLike[str] | str",
                       *, plans: Optional[SegPlans] = None, epochs: int = 200,
                       steps_per_epoch: int = 50, batch_size: int = 2, lr: float = 1e-3,
                       val_fraction: float = 0.15, seed: int = 0,
                       max_minutes: Optional[float] = None, resume: bool = False,
                       device: str = "auto", num_workers: int = 0,
                       cache_dir: "os.PathLike[str] | str | None" = None,
                       progress: Optional[ProgressCallback] = None,
                       log: Optional[LogCallback] = print, optimizer: str = "adamw",
                       weight_decay: Optional[float] = None, keep_checkpoint: bool = True,
                       augment: Optional[AugmentConfig] = None,
                       randomise: "str | RandomiseConfig | None" = None,
                       num_threads: Optional[int] = None,
                       command: Optional[Sequence[str]] = None,
                       init_weights: "os.PathLike[str] | str | None" = None) -> Dict[str, Any]:
    """Train the tibia/fibula segmentation network on a dataset's segmented cases.

    Args:
        dataset_dir: Dataset folder (:mod:`AnkleFractureLib.dataset.layout`); cases with a
            segmentation are used.
        out_dir: Model folder to write (see the module docstring). Must not hold a previous
            run unless ``resume``.
        plans: Model plans (default :class:`SegPlans`); ``plans.patch_size`` (z, y, x) is the
            training patch and the validation window. Ignored on resume (the checkpoint's win).
        epochs: Total number of epochs (on resume: the new total, counting the earlier ones).
        steps_per_epoch: Optimiser steps per epoch (per process).
        batch_size: Patches per step (per process).
        lr: Initial learning rate (decays polynomially to 0 over epochs * steps_per_epoch).
        val_fraction: Share of cases held out for validation, split by case from ``seed``
            (>= 1 case when there are >= 2 cases).
        seed: Seed of the split, the initial weights and every batch; training also runs
            with deterministic GPU kernels where torch has them
            (:func:`~AnkleFractureLib.training.determinism.deterministic_training`, recorded in
            training.json ``determinism``).
        max_minutes: Wall-clock budget (minutes, from the call); training stops after the
            step that exceeds it, validates, saves and records status "max_minutes".
        resume: Continue from ``out_dir/checkpoint.pt`` (same split, settings, step, RNG).
        device: "auto" (CUDA when available), "cpu" or "cuda".
        num_workers: Data loader processes making batches (0: in this process).
        cache_dir: Folder caching the prepared cases as .npz (None: no cache).
        progress: Called as progress(fraction in [0, 1], message) on rank 0.
        log: Called with one line per epoch and notes (rank 0); None for silence.
        optimizer: "adamw" (weight decay 1e-5) or "sgd" (Nesterov, momentum 0.99, weight
            decay 3e-5, as nnU-Net; use lr about 1e-2).
        weight_decay: Override of the optimiser's weight decay.
        keep_checkpoint: Keep ``checkpoint.pt`` after a completed run (it is always kept when
            the run stops early, so that it can resume). The shipped model needs only
            plans.json and model.pt.
        augment: Augmentation settings (None: :class:`AugmentConfig` defaults).
        randomise: Domain randomisation of the patches
            (:mod:`AnkleFractureLib.training.seg_randomise`): "off", "light", "full" or a
            :class:`~AnkleFractureLib.training.seg_randomise.RandomiseConfig` (its window and
            spacing are replaced by the plans'). None: "off" for a new run (what earlier
            versions trained, so the shipped model's documented command is unchanged), the
            checkpoint's setting on resume. Recorded in training.json ``hparams.randomise``.
        num_threads: torch CPU threads per process (None: cores // number of processes).
        command: Command line recorded in training.json (default ``sys.argv``).
        init_weights: Start from these weights (a model folder or its ``model.pt``) instead of
            a random initialisation: fine-tuning, e.g. the shipped model on a hospital's own
            cases. The network in ``plans`` must match them. Ignored on resume. Recorded in
            training.json ``hparams.init_weights`` with the file's sha256.

    Returns:
        The summary written to ``training.json`` (status, split, best Dice, first step loss,
        timings, versions, ...).

    Raises:
        InputError: Bad dataset (e.g. no segmented case), bad arguments, a non-empty model
            folder without ``resume``, or a missing/damaged checkpoint with ``resume``.
        KeyboardInterrupt: After saving a checkpoint, when interrupted (Ctrl-C / SIGTERM).
    """
    t_start = time.monotonic()
    started = _now()
    _check_args(epochs, steps_per_epoch, batch_size, lr, val_fraction, max_minutes, optimizer,
                num_workers, randomise)
    # Deterministic kernels before the device is set up: cuBLAS reads its workspace setting
    # when it first starts (see training.determinism).
    with deterministic_training(seed) as determinism:
        ctx = init_distributed(device, num_threads)
        try:
            with _sigterm_as_interrupt():
                return _train(ctx, Path(dataset_dir), Path(out_dir), plans=plans,
                              epochs=epochs, steps_per_epoch=steps_per_epoch,
                              batch_size=batch_size, lr=lr, val_fraction=val_fraction,
                              seed=seed, max_minutes=max_minutes, resume=resume,
                              num_workers=num_workers, cache_dir=cache_dir,
                              progress=progress if ctx.is_main else None,
                              log=((log or (lambda _m: None)) if ctx.is_main
                                   else (lambda _m: None)),
                              optimizer=optimizer, weight_decay=weight_decay,
                              keep_checkpoint=keep_checkpoint, augment=augment,
                              randomise=randomise, init_weights=init_weights,
                              command=list(sys.argv if command is None else command),
                              t_start=t_start, started=started, determinism=determinism)
        finally:
            cleanup_distributed(ctx)


def _load_initial_weights(network: torch.nn.Module, path: Path) -> Dict[str, str]:
    """Load a model.pt (or a model folder's) weights into ``network``; {path, sha256}."""
    import hashlib

    from AnkleFractureLib.segmentation.model_io import read_weights

    file = path / "model.pt" if path.is_dir() else path
    payload = read_weights(file)
    state = {k: v.float() for k, v in payload["state_dict"].items()}
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        first = (str(exc).splitlines() or [""])[0][:200]
        raise InputError(file, "these weights do not fit the network of the plans (train with "
                               f"the plans.json beside them): {first}") from None
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    return {"path": str(file), "sha256": digest}


def _check_args(epochs: int, steps_per_epoch: int, batch_size: int, lr: float,
                val_fraction: float, max_minutes: Optional[float], optimizer: str,
                num_workers: int, randomise: "str | RandomiseConfig | None" = None) -> None:
    problems = []
    if epochs < 1:
        problems.append(f"epochs must be >= 1, got {epochs}")
    if steps_per_epoch < 1:
        problems.append(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {batch_size}")
    if not (lr > 0 and math.isfinite(lr)):
        problems.append(f"lr must be a positive number, got {lr}")
    if not 0.0 <= val_fraction < 1.0:
        problems.append(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_minutes is not None and not max_minutes >= 0:
        problems.append(f"max_minutes must be >= 0, got {max_minutes}")
    if optimizer not in OPTIMIZERS:
        problems.append(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
    if num_workers < 0:
        problems.append(f"num_workers must be >= 0, got {num_workers}")
    if not (randomise is None or isinstance(randomise, RandomiseConfig) or randomise in LEVELS):
        problems.append(f"randomise must be one of {list(LEVELS)}, got {randomise!r}")
    if problems:
        raise InputError(None, "; ".join(problems))


def _resumed_randomise(stored: "str | Dict[str, Any]", given: "str | RandomiseConfig | None",
                       plans: SegPlans, log: LogCallback) -> "str | Dict[str, Any]":
    """The checkpoint's randomisation setting (a note when ``given`` asked for another)."""
    if given is not None:
        want = randomise_config(given, plans)
        have = randomise_config(stored, plans)
        if (want is None) != (have is None) or (want is not None and want != have):
            log(f"note: resuming with the checkpoint's randomise="
                f"{'off' if have is None else have.level} (not "
                f"{'off' if want is None else want.level})")
    return stored


def _load_split_cases(ctx: DistContext, dataset: Dataset, train_ids: List[str],
                      val_ids: List[str], plans: SegPlans, cache_dir: Optional[Path],
                      progress: Optional[ProgressCallback]
                      ) -> Tuple[List[PreparedCase], List[PreparedCase]]:
    """Training cases (all of them, every rank samples from all) and this rank's share of the
    validation cases (validation is split across ranks)."""
    my_val = val_ids[ctx.rank::ctx.world_size]
    if ctx.distributed and cache_dir is not None:
        # Each rank prepares its share into the cache first, so N ranks do the work once.
        everything = sorted(set(train_ids) | set(val_ids))
        load_cases(dataset, everything[ctx.rank::ctx.world_size], plans, cache_dir)
        barrier(ctx)
    train = load_cases(dataset, train_ids, plans, cache_dir, progress)
    val = load_cases(dataset, my_val, plans, cache_dir)
    return train, val


@dataclass
class _Settings:
    """The settings a run trains with: the caller's, or on resume the checkpoint's.

    Attributes:
        plans: Model plans (None until resolved).
        train_ids: Training case ids.
        val_ids: Validation case ids.
        epochs, steps_per_epoch, batch_size, lr, optimizer, seed, weight_decay, val_fraction,
            randomise: As in :func:`train_segmentation` (``weight_decay`` resolved from the
            optimiser when None).
    """

    plans: Optional[SegPlans]
    epochs: int
    steps_per_epoch: int
    batch_size: int
    lr: float
    optimizer: str
    seed: int
    weight_decay: Optional[float]
    val_fraction: float
    randomise: "str | RandomiseConfig | Dict[str, Any] | None"
    train_ids: List[str] = field(default_factory=list)
    val_ids: List[str] = field(default_factory=list)


def _settings_from_checkpoint(given: _Settings, ckpt: Dict[str, Any], dataset: Dataset,
                              log: LogCallback) -> _Settings:
    """The checkpoint's plans, split and settings (a note for each that ``given`` changes).

    Raises:
        InputError: A case of the checkpoint's split is not a segmented case of ``dataset``.
    """
    hp = ckpt["hparams"]
    plans = SegPlans.from_json(ckpt["plans"])
    if given.plans is not None and given.plans != plans:
        log("note: resuming with the checkpoint's plans (the plans given now differ)")
    train_ids, val_ids = list(ckpt["train_ids"]), list(ckpt["val_ids"])
    changed = {k: v for k, v in (("steps_per_epoch", given.steps_per_epoch),
                                 ("batch_size", given.batch_size), ("lr", given.lr),
                                 ("optimizer", given.optimizer), ("seed", given.seed))
               if hp.get(k) != v}
    if changed:
        log("note: resuming with the checkpoint's settings "
            + ", ".join(f"{k}={hp[k]}" for k in changed) + " (not "
            + ", ".join(f"{k}={v}" for k, v in changed.items()) + ")")
    # Checkpoints of earlier versions have no "randomise": they trained without it.
    randomise = _resumed_randomise(hp.get("randomise", "off"), given.randomise, plans, log)
    missing = [c for c in train_ids + val_ids
               if dataset.get(c) is None or not dataset.get(c).segmentation]
    if missing:
        raise InputError(dataset.index_path, "cannot resume: cases of the checkpoint's split "
                                             f"are not segmented cases here: {missing[:5]}")
    return _Settings(plans, given.epochs, hp["steps_per_epoch"], hp["batch_size"], hp["lr"],
                     hp["optimizer"], hp["seed"], hp["weight_decay"], hp["val_fraction"],
                     randomise, train_ids, val_ids)


def _fresh_settings(given: _Settings, out: Path, dataset: Dataset) -> _Settings:
    """``given`` with default plans and weight decay and a new split by case.

    Raises:
        InputError: ``out`` already holds a training run.
    """
    for name in (CHECKPOINT_FILE, "model.pt", SUMMARY_FILE):
        if (out / name).exists():
            raise InputError(out, f"the model folder already holds a training run ({name}); "
                                  "use --resume to continue it or choose another folder")
    plans = given.plans if given.plans is not None else SegPlans()
    cases = segmented_cases(dataset)
    train_ids, val_ids = split_cases([c.id for c in cases], given.val_fraction, given.seed)
    weight_decay = given.weight_decay
    if weight_decay is None:
        weight_decay = 1e-5 if given.optimizer == "adamw" else 3e-5
    return dataclasses.replace(given, plans=plans, weight_decay=weight_decay,
                               train_ids=train_ids, val_ids=val_ids)


def _train(ctx: DistContext, dataset_dir: Path, out: Path, *, plans: Optional[SegPlans],
           epochs: int, steps_per_epoch: int, batch_size: int, lr: float, val_fraction: float,
           seed: int, max_minutes: Optional[float], resume: bool, num_workers: int,
           cache_dir: "os.PathLike[str] | str | None", progress: Optional[ProgressCallback],
           log: LogCallback, optimizer: str, weight_decay: Optional[float],
           keep_checkpoint: bool, augment: Optional[AugmentConfig],
           randomise: "str | RandomiseConfig | None", command: List[str],
           t_start: float, started: str,
           init_weights: "os.PathLike[str] | str | None" = None,
           determinism: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Resolve the settings (fresh or resumed), load the cases, build the run and train it."""
    dataset = Dataset.load(dataset_dir)
    given = _Settings(plans, epochs, steps_per_epoch, batch_size, lr, optimizer, seed,
                      weight_decay, val_fraction, randomise)
    ckpt: Optional[Dict[str, Any]] = None
    if resume:
        ckpt = load_checkpoint(out / CHECKPOINT_FILE)
        settings = _settings_from_checkpoint(given, ckpt, dataset, log)
        hard = float(ckpt["hparams"].get("hard_negatives", 0.0))
        if augment is None and hard > 0:
            # The checkpoint keeps the share of hard-negative patches; go on with it.
            augment = AugmentConfig(p_unlabelled_bone=hard)
    else:
        settings = _fresh_settings(given, out, dataset)
    barrier(ctx)  # every rank has checked the folder before rank 0 writes into it
    if not settings.val_ids:
        log("note: no validation case (one segmented case or val_fraction 0): the model of the "
            "last epoch is kept")
    assert settings.plans is not None
    train_cases, val_cases = _load_split_cases(
        ctx, dataset, settings.train_ids, settings.val_ids, settings.plans,
        Path(cache_dir) if cache_dir is not None else None, progress)
    run = _SegRun(ctx, dataset, out, settings, ckpt, train_cases, val_cases,
                  _RunOptions(max_minutes, num_workers, progress, log, keep_checkpoint, augment,
                              init_weights, command, t_start, started, determinism))
    return run.train()


@dataclass
class _RunOptions:
    """How a run behaves besides its training settings (see :func:`train_segmentation`)."""

    max_minutes: Optional[float]
    num_workers: int
    progress: Optional[ProgressCallback]
    log: LogCallback
    keep_checkpoint: bool
    augment: Optional[AugmentConfig]
    init_weights: "os.PathLike[str] | str | None"
    command: List[str]
    t_start: float
    started: str
    determinism: Optional[Dict[str, Any]] = None


class _SegRun:
    """One training run: the network, optimiser and scheduler, the progress state, and the
    steps of the run (train an epoch, close it with validation and files, stop, finish).

    The state (``global_step``, ``best``, ``epoch_losses``, ...) is what a checkpoint keeps,
    so that ``--resume`` goes on exactly where the run stopped.
    """

    def __init__(self, ctx: DistContext, dataset: Dataset, out: Path, settings: _Settings,
                 ckpt: Optional[Dict[str, Any]], train_cases: List[PreparedCase],
                 val_cases: List[PreparedCase], options: _RunOptions) -> None:
        from monai.losses import DiceCELoss

        assert settings.plans is not None
        self.ctx, self.dataset, self.out, self.s, self.o = ctx, dataset, out, settings, options
        self.plans: SegPlans = settings.plans
        self.log = options.log
        self.ckpt_path = out / CHECKPOINT_FILE
        self.val_cases = val_cases
        self.patch = tuple(int(v) for v in self.plans.patch_size)
        self.network, self.model, init_info = self._build_model(ckpt is None)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.opt = _make_optimizer(settings.optimizer, self.network.parameters(), settings.lr,
                                   settings.weight_decay)
        self.total_steps = settings.epochs * settings.steps_per_epoch
        total = self.total_steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: max(0.0, 1.0 - min(s, total) / total) ** POLY_EXPONENT)
        self.amp_dtype = _amp_dtype(ctx.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        # epoch_losses: losses of the epoch in progress, kept in the checkpoint so that an
        # epoch interrupted by Ctrl-C is logged whole after --resume.
        self.status = "running"
        self.global_step = 0
        self.best: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.first_step_loss: Optional[float] = None
        self.last_val: Optional[Dict[str, float]] = None
        self.saved_step = -1
        self.epoch_losses: List[float] = []
        self.wall_before = 0.0
        self.rows: List[Dict[str, Any]] = []
        if ckpt is not None:
            self._restore(ckpt)
        randomise_cfg = randomise_config(settings.randomise, self.plans)
        lo, hi = self.plans.hu_window
        self.sampler = PatchSampler(train_cases, self.patch, seed=settings.seed, rank=ctx.rank,
                                    augment=options.augment, randomise=randomise_cfg,
                                    bone_level=(BONE_HU - lo) / (hi - lo))
        self.hparams = self._hparams(randomise_cfg, init_info)

    # ------------------------------------------------------------------------------- set-up
    def _build_model(self, fresh: bool
                     ) -> Tuple[torch.nn.Module, torch.nn.Module, Optional[Dict[str, str]]]:
        """(bare network, the module to train (DDP-wrapped under torchrun), init weights info).

        Same initial weights on every rank (DDP also broadcasts rank 0's), then per-rank
        random streams.
        """
        ctx, seed = self.ctx, self.s.seed
        seed_everything(seed, 0)
        network = build_network(self.plans.network, implementation="monai").to(ctx.device)
        init_info = None
        if self.o.init_weights is not None and fresh:
            init_info = _load_initial_weights(network, Path(self.o.init_weights))
            self.log(f"starting from the weights of {init_info['path']}")
        seed_everything(seed, ctx.rank)
        model: torch.nn.Module = network
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(
                network, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        return network, model, init_info

    def _restore(self, ckpt: Dict[str, Any]) -> None:
        """Weights, optimiser, scheduler, scaler, progress and RNG from a checkpoint."""
        self.network.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.global_step = int(ckpt["global_step"])
        self.best, self.best_epoch = ckpt.get("best_metric"), ckpt.get("best_epoch")
        self.first_step_loss = ckpt.get("first_step_loss")
        self.wall_before = float(ckpt.get("wall_seconds_total", 0.0))
        if self.ctx.is_main:
            _set_rng_state(ckpt["rng"])
        self.rows = [r for r in read_log(self.out / LOG_FILE)
                     if int(r["step"]) <= self.global_step]
        self.saved_step = self.global_step
        self.epoch_losses = list(ckpt.get("epoch_losses", []))
        self.log(f"resuming {self.out} at step {self.global_step} (epoch "
                 f"{self.global_step / self.s.steps_per_epoch:g} of {self.s.epochs})")

    def _hparams(self, randomise_cfg: Optional[RandomiseConfig],
                 init_info: Optional[Dict[str, str]]) -> Dict[str, Any]:
        s, augment = self.s, self.o.augment
        return {"epochs": s.epochs, "steps_per_epoch": s.steps_per_epoch,
                "batch_size": s.batch_size, "lr": s.lr, "optimizer": s.optimizer,
                "weight_decay": s.weight_decay, "val_fraction": s.val_fraction, "seed": s.seed,
                "grad_clip": GRAD_CLIP, "lr_schedule": f"poly {POLY_EXPONENT}",
                "loss": "DiceCE (softmax)", "patch_size": list(self.patch),
                "world_size": self.ctx.world_size,
                "augment": vars(augment if augment is not None else AugmentConfig()),
                "hard_negatives": (augment or AugmentConfig()).p_unlabelled_bone,
                # Kept in the checkpoint too, so --resume goes on with the same setting.
                "randomise": "off" if randomise_cfg is None else randomise_cfg.to_json(),
                "init_weights": init_info}

    # ------------------------------------------------------------------------------- records
    def summary(self) -> Dict[str, Any]:
        """What training.json holds now."""
        weights = self.out / "model.pt"
        gs, spe = self.global_step, self.s.steps_per_epoch
        wall = time.monotonic() - self.o.t_start
        out = {
            "format_version": 1,
            "status": self.status,
            "command": self.o.command,
            "dataset": str(self.dataset.root.resolve()),
            "model_dir": str(self.out.resolve()),
            "train_cases": self.s.train_ids,
            "val_cases": self.s.val_ids,
            "seed": self.s.seed,
            "epochs_planned": self.s.epochs,
            "epochs_run": math.ceil(gs / spe),
            "epochs_completed": gs // spe,
            "steps_run": gs,
            "best_val_dice": self.best,
            "best_epoch": self.best_epoch,
            "last_val_dice": self.last_val,
            "first_step_loss": self.first_step_loss,
            "hparams": self.hparams,
            "plans": self.plans.to_json(),
            "device": str(self.ctx.device),
            "amp": None if self.amp_dtype is None else str(self.amp_dtype).replace("torch.", ""),
            "world_size": self.ctx.world_size,
            "versions": _versions(),
            "started": self.o.started,
            "finished": _now(),
            "wall_seconds": round(wall, 2),
            "wall_seconds_total": round(self.wall_before + wall, 2),
            "model_sha256": sha256_file(weights) if weights.is_file() else None,
            "checkpoint": (str(self.ckpt_path.resolve()) if self.ckpt_path.is_file()
                           else None),
        }
        if self.o.determinism is not None:
            out["determinism"] = self.o.determinism
        return out

    def save_checkpoint(self) -> None:
        """Write checkpoint.pt: everything --resume needs (float32 weights, optimiser, RNG)."""
        payload = {
            "checkpoint_version": CHECKPOINT_VERSION,
            "model": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "global_step": self.global_step,
            "epoch": self.global_step // self.s.steps_per_epoch,
            "best_metric": self.best,
            "best_epoch": self.best_epoch,
            "first_step_loss": self.first_step_loss,
            "epoch_losses": list(self.epoch_losses),
            "train_ids": self.s.train_ids,
            "val_ids": self.s.val_ids,
            "plans": self.plans.to_json(),
            "hparams": {k: v for k, v in self.hparams.items() if k != "augment"},
            "rng": _rng_state(),
            "wall_seconds_total": self.wall_before + time.monotonic() - self.o.t_start,
        }
        atomic_torch_save(payload, self.ckpt_path)
        self.saved_step = self.global_step

    # ------------------------------------------------------------------------------- training
    def train(self) -> Dict[str, Any]:
        """Train epoch after epoch until done, out of time or interrupted; the summary."""
        s, ctx = self.s, self.ctx
        self.log(f"training on {len(s.train_ids)} cases, validating on {len(s.val_ids)}; "
                 f"patch {self.patch}, batch {s.batch_size} x {ctx.world_size} process(es), "
                 f"{s.steps_per_epoch} steps/epoch, device {ctx.device}"
                 + (f", amp {self.amp_dtype}" if self.amp_dtype else ""))
        self.model.train()
        try:
            while ((self.global_step < self.total_steps or self.epoch_losses)
                   and self.status == "running"):
                first = self.global_step
                # An epoch whose steps all ran but which was not closed (interrupted before
                # its validation) is closed first, with no new steps.
                epoch = (-(-first // s.steps_per_epoch) if self.epoch_losses
                         else first // s.steps_per_epoch + 1)
                t_epoch = time.monotonic()
                self._train_one_epoch(epoch, epoch * s.steps_per_epoch - first)
                self._end_of_epoch(epoch, t_epoch)
            if self.status == "running":
                self.status = "completed"
            if self.status == "max_minutes":
                self.log(f"stopped after {self.o.max_minutes:g} minutes (--max-minutes) at "
                         f"step {self.global_step}; continue with --resume")
        except KeyboardInterrupt:
            self._save_on_interrupt()
            raise
        return self._finish()

    def _train_one_epoch(self, epoch: int, n_steps: int) -> None:
        """Run ``n_steps`` optimiser steps (fewer when --max-minutes runs out)."""
        ctx, s = self.ctx, self.s
        for img, lab in iterate_batches(self.sampler, self.global_step, n_steps, s.batch_size,
                                        self.o.num_workers):
            value = self._step(img.to(ctx.device, non_blocking=True),
                               lab.to(ctx.device, non_blocking=True))
            self.epoch_losses.append(value)
            self.global_step += 1
            if self.first_step_loss is None:
                self.first_step_loss = value
            if self.o.progress is not None:
                self.o.progress(self.global_step / self.total_steps,
                                f"epoch {epoch}/{s.epochs} step {self.global_step} "
                                f"loss {value:.4f}")
            if self.o.max_minutes is not None:
                over = (time.monotonic() - self.o.t_start) / 60.0 >= self.o.max_minutes
                # Every rank must stop at the same step, or DDP would wait forever.
                if all_reduce_max([float(over)], ctx)[0] > 0:
                    self.status = "max_minutes"
                    break

    def _step(self, img: torch.Tensor, lab: torch.Tensor) -> float:
        """One optimiser step on a batch (N, 1, z, y, x); the loss (Dice + CE)."""
        opt, scaler = self.opt, self.scaler
        opt.zero_grad(set_to_none=True)
        with _autocast(self.ctx.device, self.amp_dtype):
            logits = self.model(img)
        # The loss in float32: softmax/log of half-precision logits loses the small
        # probabilities the Dice term of thin fibula voxels depends on.
        loss = self.loss_fn(logits.float(), lab)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), GRAD_CLIP)
        scaler.step(opt)
        scaler.update()
        self.sched.step()
        return float(loss.detach())

    def _validate(self) -> Optional[List[float]]:
        """Mean validation Dice [tibia, fibula] over all ranks' cases (None: no validation)."""
        if not self.s.val_ids:
            return None
        sums = all_reduce_sum(validate(self.network, self.val_cases, self.patch,
                                       self.ctx.device, self.amp_dtype), self.ctx)
        return [sums[0] / sums[2], sums[1] / sums[2]] if sums[2] > 0 else None

    def _end_of_epoch(self, epoch: int, t_epoch: float) -> None:
        """Validate, keep the best model, and write the log row, checkpoint and summary."""
        loss_sum, n = all_reduce_sum([sum(self.epoch_losses), len(self.epoch_losses)], self.ctx)
        self.epoch_losses = []
        train_loss = loss_sum / n if n else float("nan")
        dice = self._validate()
        mean = None if dice is None else (dice[0] + dice[1]) / 2.0
        self.last_val = None if dice is None else {"tibia": dice[0], "fibula": dice[1],
                                                   "mean": mean}
        improved = mean is None or self.best is None or mean > self.best
        if improved:
            self.best, self.best_epoch = mean, epoch
        seconds = time.monotonic() - t_epoch
        lr_now = self.opt.param_groups[0]["lr"]
        if self.ctx.is_main:
            if improved:
                save_model(self.out, self.network, self.plans,
                           {"epoch": epoch, "val_dice": mean, "step": self.global_step})
            self.rows.append({"epoch": epoch, "step": self.global_step,
                              "train_loss": _fmt(train_loss, 5),
                              "val_dice_tibia": _fmt(None if dice is None else dice[0]),
                              "val_dice_fibula": _fmt(None if dice is None else dice[1]),
                              "val_dice_mean": _fmt(mean), "lr": f"{lr_now:.3e}",
                              "seconds": f"{seconds:.1f}"})
            _write_log(self.out / LOG_FILE, self.rows)
            self.save_checkpoint()
            atomic_write_json(self.out / SUMMARY_FILE, self.summary())
        val_text = ("no validation" if dice is None else
                    f"val Dice tibia {dice[0]:.3f} fibula {dice[1]:.3f} mean {mean:.3f}")
        self.log(f"epoch {epoch:3d}/{self.s.epochs}  step {self.global_step:6d}  loss "
                 f"{train_loss:.4f}  {val_text}  lr {lr_now:.2e}  {seconds:5.1f}s"
                 + ("  *" if improved and dice else ""))

    # ------------------------------------------------------------------------------- endings
    def _save_on_interrupt(self) -> None:
        """Ctrl-C / SIGTERM: record the status and save what --resume needs (rank 0)."""
        self.status = "interrupted"
        if self.ctx.is_main:
            if self.saved_step != self.global_step:
                self.save_checkpoint()
            atomic_write_json(self.out / SUMMARY_FILE, self.summary())
            self.log(f"interrupted at step {self.global_step}: checkpoint saved to "
                     f"{self.ckpt_path}; continue with --resume")

    def _finish(self) -> Dict[str, Any]:
        """Final files (rank 0): drop the checkpoint if asked, make sure there is a model,
        write training.json; the summary after every rank got here."""
        if self.ctx.is_main:
            if (self.status == "completed" and not self.o.keep_checkpoint
                    and self.ckpt_path.exists()):
                self.ckpt_path.unlink()
            if not (self.out / "model.pt").exists():  # nothing ran (resumed a finished run)
                save_model(self.out, self.network, self.plans,
                           {"epoch": self.global_step // self.s.steps_per_epoch})
            result = self.summary()
            atomic_write_json(self.out / SUMMARY_FILE, result)
            best_text = "n/a" if self.best is None else f"{self.best:.4f}"
            self.log(f"{self.status}: {self.global_step} steps, best mean val Dice {best_text} "
                     f"(epoch {self.best_epoch}); model in {self.out}")
        else:
            result = self.summary()
        barrier(self.ctx)
        return result
