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
    MODEL_DIR/training.json      # command, split, seed, versions, best Dice, status, wall time
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from AnkleFractureLib import __version__
from AnkleFractureLib.dataset.layout import Dataset
from AnkleFractureLib.errors import InputError
from AnkleFractureLib.io import atomic_output, atomic_write_json, atomic_write_text
from AnkleFractureLib.segmentation.model_io import save_model, sha256_file
from AnkleFractureLib.segmentation.network import build_network
from AnkleFractureLib.segmentation.plans import SegPlans
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
        seed: Seed of the split, the initial weights and every batch.
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
    ctx = init_distributed(device, num_threads)
    try:
        with _sigterm_as_interrupt():
            return _train(ctx, Path(dataset_dir), Path(out_dir), plans=plans, epochs=epochs,
                          steps_per_epoch=steps_per_epoch, batch_size=batch_size, lr=lr,
                          val_fraction=val_fraction, seed=seed, max_minutes=max_minutes,
                          resume=resume, num_workers=num_workers, cache_dir=cache_dir,
                          progress=progress if ctx.is_main else None,
                          log=(log or (lambda _m: None)) if ctx.is_main else (lambda _m: None),
                          optimizer=optimizer, weight_decay=weight_decay,
                          keep_checkpoint=keep_checkpoint, augment=augment,
                          randomise=randomise, init_weights=init_weights,
                          command=list(sys.argv if command is None else command),
                          t_start=t_start, started=started)
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


def _train(ctx: DistContext, dataset_dir: Path, out: Path, *, plans: Optional[SegPlans],
           epochs: int, steps_per_epoch: int, batch_size: int, lr: float, val_fraction: float,
           seed: int, max_minutes: Optional[float], resume: bool, num_workers: int,
           cache_dir: "os.PathLike[str] | str | None", progress: Optional[ProgressCallback],
           log: LogCallback, optimizer: str, weight_decay: Optional[float],
           keep_checkpoint: bool, augment: Optional[AugmentConfig],
           randomise: "str | RandomiseConfig | None", command: List[str],
           t_start: float, started: str,
           init_weights: "os.PathLike[str] | str | None" = None) -> Dict[str, Any]:
    from monai.losses import DiceCELoss

    dataset = Dataset.load(dataset_dir)
    ckpt_path = out / CHECKPOINT_FILE
    ckpt: Optional[Dict[str, Any]] = None
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        hp = ckpt["hparams"]
        plans_ckpt = SegPlans.from_json(ckpt["plans"])
        if plans is not None and plans != plans_ckpt:
            log("note: resuming with the checkpoint's plans (the plans given now differ)")
        plans = plans_ckpt
        train_ids, val_ids = list(ckpt["train_ids"]), list(ckpt["val_ids"])
        changed = {k: v for k, v in (("steps_per_epoch", steps_per_epoch),
                                     ("batch_size", batch_size), ("lr", lr),
                                     ("optimizer", optimizer), ("seed", seed))
                   if hp.get(k) != v}
        if changed:
            log("note: resuming with the checkpoint's settings "
                + ", ".join(f"{k}={hp[k]}" for k in changed) + " (not "
                + ", ".join(f"{k}={v}" for k, v in changed.items()) + ")")
        steps_per_epoch, batch_size, lr = hp["steps_per_epoch"], hp["batch_size"], hp["lr"]
        optimizer, seed, weight_decay = hp["optimizer"], hp["seed"], hp["weight_decay"]
        val_fraction = hp["val_fraction"]
        # Checkpoints of earlier versions have no "randomise": they trained without it.
        randomise = _resumed_randomise(hp.get("randomise", "off"), randomise, plans, log)
        missing = [c for c in train_ids + val_ids
                   if dataset.get(c) is None or not dataset.get(c).segmentation]
        if missing:
            raise InputError(dataset.index_path, "cannot resume: cases of the checkpoint's split "
                                                 f"are not segmented cases here: {missing[:5]}")
    else:
        for name in (CHECKPOINT_FILE, "model.pt", SUMMARY_FILE):
            if (out / name).exists():
                raise InputError(out, f"the model folder already holds a training run ({name}); "
                                      "use --resume to continue it or choose another folder")
        plans = plans if plans is not None else SegPlans()
        cases = segmented_cases(dataset)
        train_ids, val_ids = split_cases([c.id for c in cases], val_fraction, seed)
        if weight_decay is None:
            weight_decay = 1e-5 if optimizer == "adamw" else 3e-5
    barrier(ctx)  # every rank has checked the folder before rank 0 writes into it
    patch = tuple(int(v) for v in plans.patch_size)
    cache = Path(cache_dir) if cache_dir is not None else None
    if not val_ids:
        log("note: no validation case (one segmented case or val_fraction 0): the model of the "
            "last epoch is kept")
    train_cases, val_cases = _load_split_cases(ctx, dataset, train_ids, val_ids, plans, cache,
                                               progress)

    # Same initial weights on every rank (DDP also broadcasts rank 0's), then per-rank streams.
    seed_everything(seed, 0)
    network = build_network(plans.network).to(ctx.device)
    init_info = None
    if init_weights is not None and ckpt is None:
        init_info = _load_initial_weights(network, Path(init_weights))
        log(f"starting from the weights of {init_info['path']}")
    seed_everything(seed, ctx.rank)
    model: torch.nn.Module = network
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            network, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = _make_optimizer(optimizer, network.parameters(), lr, weight_decay)
    total_steps = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: max(0.0, 1.0 - min(s, total_steps) / total_steps) ** POLY_EXPONENT)
    amp_dtype = _amp_dtype(ctx.device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    global_step = 0
    best: Optional[float] = None
    best_epoch: Optional[int] = None
    first_step_loss: Optional[float] = None
    wall_before = 0.0
    rows: List[Dict[str, Any]] = []
    if ckpt is not None:
        network.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        global_step = int(ckpt["global_step"])
        best, best_epoch = ckpt.get("best_metric"), ckpt.get("best_epoch")
        first_step_loss = ckpt.get("first_step_loss")
        wall_before = float(ckpt.get("wall_seconds_total", 0.0))
        if ctx.is_main:
            _set_rng_state(ckpt["rng"])
        rows = [r for r in read_log(out / LOG_FILE) if int(r["step"]) <= global_step]
        log(f"resuming {out} at step {global_step} (epoch {global_step / steps_per_epoch:g} "
            f"of {epochs})")

    randomise_cfg = randomise_config(randomise, plans)
    sampler = PatchSampler(train_cases, patch, seed=seed, rank=ctx.rank, augment=augment,
                           randomise=randomise_cfg)
    hparams = {"epochs": epochs, "steps_per_epoch": steps_per_epoch, "batch_size": batch_size,
               "lr": lr, "optimizer": optimizer, "weight_decay": weight_decay,
               "val_fraction": val_fraction, "seed": seed, "grad_clip": GRAD_CLIP,
               "lr_schedule": f"poly {POLY_EXPONENT}", "loss": "DiceCE (softmax)",
               "patch_size": list(patch), "world_size": ctx.world_size,
               "augment": vars(augment if augment is not None else AugmentConfig()),
               # Kept in the checkpoint too, so --resume goes on with the same setting.
               "randomise": "off" if randomise_cfg is None else randomise_cfg.to_json(),
               "init_weights": init_info}
    # epoch_losses: losses of the epoch in progress, kept in the checkpoint so that an epoch
    # interrupted by Ctrl-C is logged whole after --resume.
    state = {"status": "running", "global_step": global_step, "best": best,
             "best_epoch": best_epoch, "first_step_loss": first_step_loss,
             "last_val": None, "saved_step": global_step if ckpt is not None else -1,
             "epoch_losses": [] if ckpt is None else list(ckpt.get("epoch_losses", []))}

    def summary() -> Dict[str, Any]:
        weights = out / "model.pt"
        gs = state["global_step"]
        wall = time.monotonic() - t_start
        return {
            "format_version": 1,
            "status": state["status"],
            "command": command,
            "dataset": str(dataset.root.resolve()),
            "model_dir": str(out.resolve()),
            "train_cases": train_ids,
            "val_cases": val_ids,
            "seed": seed,
            "epochs_planned": epochs,
            "epochs_run": math.ceil(gs / steps_per_epoch),
            "epochs_completed": gs // steps_per_epoch,
            "steps_run": gs,
            "best_val_dice": state["best"],
            "best_epoch": state["best_epoch"],
            "last_val_dice": state["last_val"],
            "first_step_loss": state["first_step_loss"],
            "hparams": hparams,
            "plans": plans.to_json(),
            "device": str(ctx.device),
            "amp": None if amp_dtype is None else str(amp_dtype).replace("torch.", ""),
            "world_size": ctx.world_size,
            "versions": _versions(),
            "started": started,
            "finished": _now(),
            "wall_seconds": round(wall, 2),
            "wall_seconds_total": round(wall_before + wall, 2),
            "model_sha256": sha256_file(weights) if weights.is_file() else None,
            "checkpoint": str(ckpt_path.resolve()) if ckpt_path.is_file() else None,
        }

    def save_checkpoint() -> None:
        payload = {
            "checkpoint_version": CHECKPOINT_VERSION,
            "model": {k: v.detach().cpu() for k, v in network.state_dict().items()},
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "global_step": state["global_step"],
            "epoch": state["global_step"] // steps_per_epoch,
            "best_metric": state["best"],
            "best_epoch": state["best_epoch"],
            "first_step_loss": state["first_step_loss"],
            "epoch_losses": list(state["epoch_losses"]),
            "train_ids": train_ids,
            "val_ids": val_ids,
            "plans": plans.to_json(),
            "hparams": {k: v for k, v in hparams.items() if k != "augment"},
            "rng": _rng_state(),
            "wall_seconds_total": wall_before + time.monotonic() - t_start,
        }
        with atomic_output(ckpt_path) as tmp:
            torch.save(payload, tmp)
        state["saved_step"] = state["global_step"]

    def end_of_epoch(epoch: int, t_epoch: float) -> None:
        losses = state["epoch_losses"]
        loss_sum, n = all_reduce_sum([sum(losses), len(losses)], ctx)
        state["epoch_losses"] = []
        train_loss = loss_sum / n if n else float("nan")
        dice: Optional[List[float]] = None
        if val_ids:
            sums = all_reduce_sum(validate(network, val_cases, patch, ctx.device, amp_dtype), ctx)
            if sums[2] > 0:
                dice = [sums[0] / sums[2], sums[1] / sums[2]]
        mean = None if dice is None else (dice[0] + dice[1]) / 2.0
        state["last_val"] = None if dice is None else {"tibia": dice[0], "fibula": dice[1],
                                                       "mean": mean}
        improved = mean is None or state["best"] is None or mean > state["best"]
        if improved:
            state["best"], state["best_epoch"] = mean, epoch
        seconds = time.monotonic() - t_epoch
        lr_now = opt.param_groups[0]["lr"]
        if ctx.is_main:
            if improved:
                save_model(out, network, plans, {"epoch": epoch, "val_dice": mean,
                                                 "step": state["global_step"]})
            rows.append({"epoch": epoch, "step": state["global_step"],
                         "train_loss": _fmt(train_loss, 5),
                         "val_dice_tibia": _fmt(None if dice is None else dice[0]),
                         "val_dice_fibula": _fmt(None if dice is None else dice[1]),
                         "val_dice_mean": _fmt(mean), "lr": f"{lr_now:.3e}",
                         "seconds": f"{seconds:.1f}"})
            _write_log(out / LOG_FILE, rows)
            save_checkpoint()
            atomic_write_json(out / SUMMARY_FILE, summary())
        val_text = ("no validation" if dice is None else
                    f"val Dice tibia {dice[0]:.3f} fibula {dice[1]:.3f} mean {mean:.3f}")
        log(f"epoch {epoch:3d}/{epochs}  step {state['global_step']:6d}  loss {train_loss:.4f}  "
            f"{val_text}  lr {lr_now:.2e}  {seconds:5.1f}s" + ("  *" if improved and dice else ""))

    log(f"training on {len(train_ids)} cases, validating on {len(val_ids)}; patch {patch}, "
        f"batch {batch_size} x {ctx.world_size} process(es), {steps_per_epoch} steps/epoch, "
        f"device {ctx.device}" + (f", amp {amp_dtype}" if amp_dtype else ""))
    model.train()
    try:
        while ((state["global_step"] < total_steps or state["epoch_losses"])
               and state["status"] == "running"):
            first = state["global_step"]
            # An epoch whose steps all ran but which was not closed (interrupted before its
            # validation) is closed first, with no new steps.
            epoch = (-(-first // steps_per_epoch) if state["epoch_losses"]
                     else first // steps_per_epoch + 1)
            t_epoch = time.monotonic()
            losses = state["epoch_losses"]
            n_steps = epoch * steps_per_epoch - first
            for img, lab in iterate_batches(sampler, first, n_steps, batch_size, num_workers):
                img = img.to(ctx.device, non_blocking=True)
                lab = lab.to(ctx.device, non_blocking=True)
                opt.zero_grad(set_to_none=True)
                with _autocast(ctx.device, amp_dtype):
                    logits = model(img)
                # The loss in float32: softmax/log of half-precision logits loses the small
                # probabilities the Dice term of thin fibula voxels depends on.
                loss = loss_fn(logits.float(), lab)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(network.parameters(), GRAD_CLIP)
                scaler.step(opt)
                scaler.update()
                sched.step()
                value = float(loss.detach())
                losses.append(value)
                state["global_step"] += 1
                if state["first_step_loss"] is None:
                    state["first_step_loss"] = value
                if progress is not None:
                    progress(state["global_step"] / total_steps,
                             f"epoch {epoch}/{epochs} step {state['global_step']} "
                             f"loss {value:.4f}")
                if max_minutes is not None:
                    over = (time.monotonic() - t_start) / 60.0 >= max_minutes
                    # Every rank must stop at the same step, or DDP would wait forever.
                    if all_reduce_max([float(over)], ctx)[0] > 0:
                        state["status"] = "max_minutes"
                        break
            end_of_epoch(epoch, t_epoch)
        if state["status"] == "running":
            state["status"] = "completed"
        if state["status"] == "max_minutes":
            log(f"stopped after {max_minutes:g} minutes (--max-minutes) at step "
                f"{state['global_step']}; continue with --resume")
    except KeyboardInterrupt:
        state["status"] = "interrupted"
        if ctx.is_main:
            if state["saved_step"] != state["global_step"]:
                save_checkpoint()
            atomic_write_json(out / SUMMARY_FILE, summary())
            log(f"interrupted at step {state['global_step']}: checkpoint saved to {ckpt_path}; "
                "continue with --resume")
        raise
    if ctx.is_main:
        if state["status"] == "completed" and not keep_checkpoint and ckpt_path.exists():
            ckpt_path.unlink()
        if not (out / "model.pt").exists():  # nothing ran (resumed a finished run): still a model
            save_model(out, network, plans, {"epoch": state["global_step"] // steps_per_epoch})
        result = summary()
        atomic_write_json(out / SUMMARY_FILE, result)
        best_text = "n/a" if state["best"] is None else f"{state['best']:.4f}"
        log(f"{state['status']}: {state['global_step']} steps, best mean val Dice {best_text} "
            f"(epoch {state['best_epoch']}); model in {out}")
    else:
        result = summary()
    barrier(ctx)
    return result
