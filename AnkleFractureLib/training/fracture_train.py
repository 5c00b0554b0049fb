"""Train the fracture localiser on crops with known fracture lines (one command, one seed).

Data: cache files of :mod:`AnkleFractureLib.training.fracture_data` (crop channels and the
phantom's exact fracture line). Each step takes ``batch_size`` fibula windows with:

* a random shift of the window (+-``shift`` voxels in y and x), as registration errs;
* CT intensity randomisation (gamma, contrast, offset, noise; each CT window on its own), as
  scanners and kernels differ;
* mask randomisation: the fibula mask closed across the fracture gap (as a segmentation that
  bridges the line does; ``bridge_prob`` of the windows), dilated or eroded, or the tibia mask
  dropped, so that the network reads the fracture in the CT, not in a hole of the mask
  (``soft_masks``: the fibula mask stays soft, as the pipeline's crop gives it).

Loss: binary cross-entropy (positives weighted) + soft Dice of the line. The validation split
(``val_fraction`` of the cases, by case) is scored every ``eval_every`` steps on what a surgeon
checks: line found on fractured cases, nothing found on intact ones, |height error|; the best
checkpoint is kept.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from AnkleFractureLib.fracture.window import WINDOW_YX, Window, fibula_window


@dataclass
class FractureTrainConfig:
    """Hyper-parameters (written to training.json)."""

    steps: int = 1500
    batch_size: int = 2
    lr: float = 2e-3
    weight_decay: float = 1e-4
    pos_weight: float = 3.0
    shift: int = 4
    patch_z: int = 32
    patch_yx: int = 32
    val_fraction: float = 0.15
    eval_every: int = 150
    seed: int = 0
    threads: int = 2
    max_minutes: Optional[float] = None
    #: "auto" (CUDA when there is one), "cpu" or "cuda"; the crops are prepared on the CPU.
    device: str = "auto"
    features: Tuple[int, ...] = (6, 12, 24, 48, 48, 6)
    #: Let the found rule's fit try the cut rule (see :func:`fit_decision`).
    cut_rule: bool = False
    #: The crop arrays the network reads (names of
    #: :data:`~AnkleFractureLib.crop.syndesmosis.ALL_CHANNELS`).
    channels: Tuple[str, ...] = ("ct", "tibia", "fibula")
    #: Share of the training windows whose fibula mask is closed across gaps (0.4: the shipped
    #: localiser's recipe).
    bridge_prob: float = 0.4
    #: Keep the fibula mask soft (linearly interpolated, as the pipeline's crop gives it) in
    #: training; False thresholds it at 0.5 (the shipped localiser's recipe).
    soft_masks: bool = False
    #: The crops' box moved this far up (mm; 0: the template's box): written to plans.json
    #: ``crop_shift_mm``, the network being an upper-window one for a taller crop.
    crop_shift_mm: float = 0.0
    #: Online hard-negative mining: per training window, the cross-entropy of its
    #: ``negative_topk`` highest background logits is added with ``negative_weight`` (a false
    #: line, such as one at the malleolus tip of an intact fibula, is a few hundred bright
    #: voxels that the mean over a whole window dilutes). 0: off, the shipped recipe.
    negative_topk: int = 0
    negative_weight: float = 1.0
    #: Share of the training windows cut by a scan edge (:func:`cut_by_scan_edge`): a scan
    #: that ends inside the crop shows the bone's cut face, which a network trained on raw
    #: fracture faces reads as a fracture. 0: off, the shipped recipe.
    edge_cut_prob: float = 0.0


@dataclass
class Sample:
    """One case in memory: the crop's arrays (4, z, y, x) float16 in the order of
    :data:`~AnkleFractureLib.crop.syndesmosis.ALL_CHANNELS`, target (z, y, x) uint8."""

    channels: np.ndarray
    target: np.ndarray
    p2t: np.ndarray
    info: Dict[str, Any]


def load_samples(paths: Sequence[Path]) -> List[Sample]:
    """Read cache files (those with a fracture target or a "none" class)."""
    from AnkleFractureLib.training.fracture_data import load_crop_file

    out = []
    for p in paths:
        d = load_crop_file(p)
        info = d["info"]
        if info.get("weber") is None:
            continue
        if info["weber"] != "none" and int(d["target"].sum()) == 0:
            continue  # a fracture whose line is outside the crop: nothing to learn from
        out.append(Sample(d["channels"], d["target"], d["patient_to_template"], info))
    return out


def split_cases(samples: Sequence[Sample], val_fraction: float, seed: int
                ) -> Tuple[List[int], List[int]]:
    """Train / validation indices, by case id (the same case with other masks stays together)."""
    ids = sorted({s.info["id"] for s in samples})
    rng = np.random.default_rng(seed)
    n_val = int(round(val_fraction * len(ids))) if val_fraction > 0 else 0
    val_ids = set(rng.permutation(ids)[:n_val].tolist())
    train = [i for i, s in enumerate(samples) if s.info["id"] not in val_ids]
    val = [i for i, s in enumerate(samples) if s.info["id"] in val_ids]
    return train, val


def _augment_masks(ch: np.ndarray, rng: np.random.Generator, bridge_prob: float = 0.4,
                   soft: bool = False) -> np.ndarray:
    """Randomise the mask channels of a (C, z, y, x) window in place (and return it).

    The fibula mask is closed across gaps (1-3 iterations of a 6-connected cross: a
    segmentation that bridges the fracture line) with probability ``bridge_prob``, else dilated
    (15 %) or eroded (10 %) by one voxel; the tibia mask is dropped 10 % of the time.
    ``soft=False`` (the shipped localiser's recipe) thresholds the fibula mask at 0.5 first, so
    every training window shows a binary fibula while the pipeline's crop holds the linearly
    interpolated (soft) one; ``soft=True`` keeps it soft (grey-level morphology), as the
    pipeline gives it.
    """
    from scipy import ndimage

    u = rng.uniform()
    op = ("close" if u < bridge_prob else "dilate" if u < bridge_prob + 0.15
          else "erode" if u < bridge_prob + 0.25 else None)
    k = int(rng.integers(1, 4)) if op == "close" else 1
    if soft:
        if op is not None:
            cross = ndimage.iterate_structure(ndimage.generate_binary_structure(3, 1), k)
            grey = {"close": ndimage.grey_closing, "dilate": ndimage.grey_dilation,
                    "erode": ndimage.grey_erosion}[op]
            ch[2] = grey(ch[2], footprint=cross)
    else:
        fib = ch[2] > 0.5
        if op == "close":
            fib = ndimage.binary_closing(fib, iterations=k)
        elif op == "dilate":
            fib = ndimage.binary_dilation(fib, iterations=1)
        elif op == "erode":
            fib = ndimage.binary_erosion(fib, iterations=1)
        ch[2] = fib
    if rng.uniform() < 0.1:
        ch[1] = 0.0
    return ch


def _augment_ct(ct: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = np.clip(ct, 0.0, 1.0) ** rng.uniform(0.7, 1.4)
    x = x * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)
    return x + rng.normal(0.0, rng.uniform(0.0, 0.03), size=x.shape).astype(np.float32)


def _fibula_tip_z(fibula: np.ndarray) -> Optional[int]:
    """Lowest slice of the fibula mask (the lateral malleolus tip), or None."""
    zs = np.flatnonzero(np.asarray(fibula).reshape(fibula.shape[0], -1).max(axis=1) > 0.5)
    return int(zs[0]) if zs.size else None


def _z_range(target: np.ndarray, patch_z: int, rng: np.random.Generator,
             tip_z: Optional[int] = None) -> slice:
    """Slices of a training patch: over the fracture line 60 % of the time (when there is one),
    over the malleolus tip 25 % (hard negatives: the end of the bone and the talofibular joint
    look like a transverse line), anywhere otherwise."""
    nz = target.shape[0]
    if patch_z <= 0 or patch_z >= nz:
        return slice(0, nz)
    zs = np.flatnonzero(target.reshape(nz, -1).any(axis=1))
    u = rng.uniform()
    jitter = int(rng.integers(-patch_z // 3, patch_z // 3 + 1))
    if zs.size and u < 0.6:
        z0 = int(rng.choice(zs)) + jitter - patch_z // 2
    elif tip_z is not None and u < 0.85:
        z0 = tip_z + jitter - patch_z // 4
    else:
        z0 = int(rng.integers(0, nz - patch_z + 1))
    z0 = int(np.clip(z0, 0, nz - patch_z))
    return slice(z0, z0 + patch_z)


#: Largest slope (tan of the tilt) of a training window's scan edge against the crop's axial
#: plane: the crop lies in the template frame, so a registered leg's axial scan edge crosses
#: it tilted by the leg's pose (about 17 degrees at most).
EDGE_TILT = 0.3


def cut_by_scan_edge(x: np.ndarray, y: np.ndarray, channels: Sequence[str],
                     rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """End a training window's scan at a random tilted plane, in place, as a scan that ends
    inside the crop does: beyond it every CT array holds the crop's outside value (air,
    :data:`~AnkleFractureLib.crop.syndesmosis.OUTSIDE_HU` normalised, no noise), the masks and
    the line target are 0.

    The plane crosses the window's middle half of slices, tilted up to :data:`EDGE_TILT`;
    the scan ends above it (the crop's z rises towards the knee) three times in four, below it
    otherwise (a scan that stops short of the malleolus tip).

    Args:
        x: (C, z, y, x) network input, its arrays named by ``channels``.
        y: (1, z, y, x) line target.
        channels: Names of ``x``'s arrays (:data:`~AnkleFractureLib.crop.syndesmosis.
            ALL_CHANNELS`).
        rng: The training generator.

    Returns:
        (x, y), cut.

    Example:
        >>> x = np.ones((3, 8, 4, 4), np.float32); y = np.ones((1, 8, 4, 4), np.float32)
        >>> x, y = cut_by_scan_edge(x, y, ("ct", "tibia", "fibula"), np.random.default_rng(1))
        >>> bool(y.min() == 0 and y.max() == 1 and x[1:].min() == 0 and x[0].min() == 0)
        True
    """
    from AnkleFractureLib.crop.syndesmosis import OUTSIDE_HU
    from AnkleFractureLib.preprocessing.intensity import BONE_HU_WINDOW, normalize_hu

    nz, ny, nx = x.shape[1:]
    level = rng.uniform(0.25 * nz, 0.75 * nz)
    ty, tx = rng.uniform(-EDGE_TILT, EDGE_TILT, size=2)
    zz, yy, xx = np.ogrid[:nz, :ny, :nx]
    side = (zz - level) + ty * (yy - ny / 2.0) + tx * (xx - nx / 2.0)
    outside = side > 0 if rng.uniform() < 0.75 else side < 0
    air = {"ct": float(normalize_hu(np.array([OUTSIDE_HU]))[0]),
           "bone": float(normalize_hu(np.array([OUTSIDE_HU]), BONE_HU_WINDOW)[0])}
    for c, name in enumerate(channels):
        if name in ("tibia", "fibula"):
            x[c][outside] = 0.0
        else:
            x[c][outside] = air["ct"] if name == "ct" else air["bone"]
    y[:, outside] = 0.0
    return x, y


def training_pair(sample: Sample, rng: np.random.Generator, shift: int,
                  window_yx: Tuple[int, int] = WINDOW_YX, patch_z: int = 0,
                  channels: Sequence[str] = ("ct", "tibia", "fibula"),
                  bridge_prob: float = 0.4, soft_masks: bool = False,
                  edge_cut_prob: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
    """One augmented (input (C, pz, wy, wx), target (1, pz, wy, wx)) pair (pz = patch_z, or
    every slice when 0; the input holds the named ``channels``; masks: see
    :func:`_augment_masks`; ``edge_cut_prob`` of the windows end at a scan edge,
    :func:`cut_by_scan_edge`)."""
    from AnkleFractureLib.crop.syndesmosis import ALL_CHANNELS, SUB_CHANNELS

    zr = _z_range(sample.target, patch_z, rng, _fibula_tip_z(sample.channels[2]))
    ch = sample.channels.astype(np.float32)
    win = fibula_window(ch[2], window_yx)
    dy, dx = (int(v) for v in rng.integers(-shift, shift + 1, size=2))
    win = Window(win.y0 + dy, win.x0 + dx, win.size)
    x = win.extract(ch)[:, zr]
    x = _augment_masks(x, rng, bridge_prob, soft_masks)
    for c, name in enumerate(ALL_CHANNELS[:len(x)]):
        if name in ("ct", "ct_bone", "ct_bone_min"):  # each its own draw, as always
            x[c] = _augment_ct(x[c], rng)
    subs = [ALL_CHANNELS.index(c) for c in SUB_CHANNELS if c in channels]
    if subs:  # one draw for all 8: they are one CT at twice the resolution
        x[subs] = _augment_ct(x[subs], rng)
    y = win.extract(sample.target[None].astype(np.float32))[:, zr]
    x = x[[ALL_CHANNELS.index(c) for c in channels]]
    # drawn last and only when asked, so the shipped recipe's draws stay the same
    if edge_cut_prob > 0 and rng.uniform() < edge_cut_prob:
        x, y = cut_by_scan_edge(x, y, channels, rng)  # x: a copy (fancy indexing)
    return x, y


def _hardest_negatives(logits: Any, target: Any, k: int) -> Any:
    """Mean over the batch of the cross-entropy (target 0) of each window's ``k`` highest
    background logits (voxels where ``target`` is 0); ``logits``, ``target``: (B, 1, z, y, x).

    Example:
        >>> import torch
        >>> lg = torch.full((1, 1, 2, 2, 2), -9.0); lg[0, 0, 0, 0, 0] = 2.0
        >>> round(float(_hardest_negatives(lg, torch.zeros_like(lg), 1)), 4)  # softplus(2)
        2.1269
    """
    import torch
    import torch.nn.functional as F

    flat = logits.flatten(1).masked_fill(target.flatten(1) > 0, float("-inf"))
    top = flat.topk(min(k, flat.shape[1]), dim=1).values
    return F.softplus(top[torch.isfinite(top)]).mean() if bool(torch.isfinite(top).any()) \
        else logits.sum() * 0.0


def _loss(logits: Any, target: Any, pos_weight: float, negative_topk: int = 0,
          negative_weight: float = 1.0) -> Any:
    """Weighted BCE + soft Dice of the line (windows with a line), plus, with
    ``negative_topk``, :func:`_hardest_negatives` times ``negative_weight``."""
    import torch
    import torch.nn.functional as F

    bce = F.binary_cross_entropy_with_logits(
        logits, target, pos_weight=torch.tensor(pos_weight, device=logits.device))
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(1, 2, 3, 4))
    denom = p.sum(dim=(1, 2, 3, 4)) + target.sum(dim=(1, 2, 3, 4))
    has = target.sum(dim=(1, 2, 3, 4)) > 0
    dice = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)
    dice = dice[has].mean() if bool(has.any()) else logits.sum() * 0.0
    if negative_topk > 0:
        return bce + dice + negative_weight * _hardest_negatives(logits, target, negative_topk)
    return bce + dice


def _batch(samples: List[Sample], idx: Sequence[int], rng: np.random.Generator,
           cfg: FractureTrainConfig) -> Tuple[Any, Any]:
    import torch

    pairs = [training_pair(samples[i], rng, cfg.shift, (cfg.patch_yx, cfg.patch_yx), cfg.patch_z,
                           cfg.channels, cfg.bridge_prob, cfg.soft_masks, cfg.edge_cut_prob)
             for i in idx]
    x = torch.from_numpy(np.stack([p[0] for p in pairs]).astype(np.float32))
    y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.float32))
    return x, y


def crop_grid(template: Any) -> Any:
    """The template's crop grid as an empty Volume (template mm)."""
    from AnkleFractureLib.geometry.volume import Volume

    size, spacing, origin, direction = template.box.grid()
    return Volume(np.zeros(tuple(int(s) for s in size[::-1]), np.float32), spacing, origin,
                  direction)


@dataclass
class _Crop:
    """The parts of a SyndesmosisCrop the localiser reads."""

    channels: np.ndarray
    grid: Any
    patient_to_template: np.ndarray
    #: bool (z, y, x): inside the scan (None: all of it); see ``fracture.localise.ignored_zones``.
    in_scan: Optional[np.ndarray] = None

    def stacked(self, names: Sequence[str]) -> np.ndarray:
        """The named arrays (as ``SyndesmosisCrop.stacked``)."""
        from AnkleFractureLib.crop.syndesmosis import ALL_CHANNELS

        return self.channels[[ALL_CHANNELS.index(n) for n in names]]


def score_samples(localiser: Any, samples: Sequence[Sample], template: Any
                  ) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """What a surgeon checks, over cases: found on fractured, found on intact, |height error|.

    A crop of the box moved up (``info["box_shift_mm"]``, train-fracture --crop-shift-mm) is
    measured on its own grid, and its lowest ``box_shift_mm`` count as outside the scan
    (a line touching them is not a line): there the crop cuts the distal fibula across, an
    edge that an upper-window network never reads in use (it speaks only above the box).

    Returns:
        (summary {"found_rate", "found_on_none_rate", "median_abs_height_error_mm",
        "height_class_accuracy", "n_fractured", "n_none"}, one row per case).
    """
    from AnkleFractureLib.fracture.weber_height import height_class
    from AnkleFractureLib.training.fracture_data import shifted_box_template

    rows = []
    grids: Dict[float, Any] = {}  # one grid per box position, not one per sample
    for s in samples:
        shift = float(s.info.get("box_shift_mm") or 0.0)
        if shift not in grids:
            grids[shift] = crop_grid(shifted_box_template(template, shift))
        grid = grids[shift]
        in_scan = None
        if shift:
            in_scan = np.ones(s.channels.shape[1:], bool)
            in_scan[:int(round(shift / float(np.min(grid.spacing))))] = False
        crop = _Crop(s.channels.astype(np.float32), grid, s.p2t, in_scan)
        f = localiser.locate(crop, template.plafond)
        truth = s.info.get("height_true_mm")
        err = None if (truth is None or f.height_mm is None) else abs(f.height_mm - truth)
        pred_cls = height_class(f.height_mm, f.size_factor) if f.found else "none"
        rows.append({"id": s.info["id"], "weber": s.info["weber"], "masks": s.info.get("masks"),
                     "found": f.found, "probability": round(f.probability, 4),
                     "height_mm": f.height_mm, "height_true_mm": truth,
                     "abs_height_error_mm": None if err is None else round(err, 2),
                     "height_class": pred_cls})
    return summarise(rows), rows


def summarise(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Summary of :func:`score_samples` rows."""
    frac = [r for r in rows if r["weber"] != "none"]
    none = [r for r in rows if r["weber"] == "none"]
    errs = [r["abs_height_error_mm"] for r in frac if r["found"] and r["abs_height_error_mm"] is not None]
    return {"n_fractured": len(frac), "n_none": len(none),
            "found_rate": round(float(np.mean([r["found"] for r in frac])), 4) if frac else None,
            "found_on_none_rate": round(float(np.mean([r["found"] for r in none])), 4) if none else None,
            "median_abs_height_error_mm": round(float(np.median(errs)), 2) if errs else None,
            "height_class_accuracy": round(float(np.mean([r["height_class"] == r["weber"]
                                                          for r in rows])), 4) if rows else None}


def _val_score(summary: Dict[str, Any]) -> float:
    found = summary["found_rate"] or 0.0
    false = summary["found_on_none_rate"] or 0.0
    err = summary["median_abs_height_error_mm"]
    return found - false + summary["height_class_accuracy"] - (0.0 if err is None else err / 50.0)


def _lr_at(step: int, cfg: FractureTrainConfig) -> float:
    warm = max(1, cfg.steps // 20)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * 0.5 * (1.0 + np.cos(np.pi * min(1.0, t)))


def _write_log(path: Path, rows: List[Dict[str, Any]]) -> None:
    from AnkleFractureLib.io import atomic_output

    keys = sorted({k for r in rows for k in r})
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)


def train_localiser(paths: Sequence[Path], out: "Path | str", cfg: FractureTrainConfig,
                    command: str = "", progress: Optional[Callable[[float, str], None]] = None,
                    val_paths: Optional[Sequence[Path]] = None) -> Dict[str, Any]:
    """Train and write the model folder ``out`` (plans.json, model.pt, training.json, log).

    Args:
        paths: Crop cache files.
        out: Model folder.
        cfg: Hyper-parameters (``seed`` makes the run repeatable on CPU; on a GPU it also
            switches on the deterministic kernels, see
            :func:`~AnkleFractureLib.training.determinism.deterministic_training`).
        command: The command line, recorded in training.json.
        progress: Called with (fraction, message).
        val_paths: Crop cache files that only choose the checkpoint (a validation set of its
            own); then every case of ``paths`` trains and ``cfg.val_fraction`` is not used.
            A split of a few dozen training cases holds about eight intact ones, too few to
            choose a checkpoint by (docs/fracture/experiments/v5_regenerated_data).

    Returns:
        training.json content.
    """
    from AnkleFractureLib.training.determinism import deterministic_training

    # Entered before the first CUDA use, so that cuBLAS reads the deterministic workspace.
    with deterministic_training(cfg.seed) as determinism:
        state = _train_loop(paths, Path(out), cfg, progress, val_paths)
    state["determinism"] = determinism
    state["decision"] = fit_decision(Path(out), state.pop("samples"), state["device"],
                                     cfg.cut_rule)
    return _finish(Path(out), cfg, command, state)


def _train_loop(paths: Sequence[Path], out: Path, cfg: FractureTrainConfig,
                progress: Optional[Callable[[float, str], None]],
                val_paths: Optional[Sequence[Path]] = None) -> Dict[str, Any]:
    """The optimiser loop with periodic validation; the best model is saved to ``out``.

    Returns:
        The run's state: best score/step/metrics, log rows, samples, split, device, start time.
    """
    import torch

    from AnkleFractureLib.fracture.localise import FractureLocaliser
    from AnkleFractureLib.fracture.model_io import default_plans, save_localiser
    from AnkleFractureLib.fracture.network import build_localiser
    from AnkleFractureLib.registration.template import load_template
    from AnkleFractureLib.segmentation.inference import resolve_device

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, cfg.threads))
    device = resolve_device(cfg.device)
    rng = np.random.default_rng(cfg.seed)
    samples, train_idx, val_idx = _split(paths, val_paths, cfg)
    _check_sample_channels(samples, cfg.channels)
    plans = default_plans(cfg.features, cfg.channels)
    if cfg.crop_shift_mm:
        plans["crop_shift_mm"] = float(cfg.crop_shift_mm)
    net = build_localiser(plans["network"], implementation="monai").to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"best": -np.inf, "best_step": None, "best_val": None, "log": [], "t0": time.time(),
             "samples": samples, "device": str(device),
             "train_cases": sorted({samples[i].info["id"] for i in train_idx}),
             "val_cases": sorted({samples[i].info["id"] for i in val_idx})}
    template = load_template()
    for step in range(cfg.steps):
        if cfg.max_minutes and time.time() - state["t0"] > 60.0 * cfg.max_minutes:
            break
        loss = _train_step(net, opt, samples, train_idx, rng, cfg, step)
        row = {"step": step + 1, "loss": round(loss, 5), "lr": round(_lr_at(step, cfg), 6)}
        if val_idx and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            net.eval()
            summary, _ = score_samples(FractureLocaliser(net, plans, device),
                                       [samples[i] for i in val_idx], template)
            net.train()
            row.update({f"val_{k}": v for k, v in summary.items()})
            if _val_score(summary) > state["best"]:
                state.update(best=_val_score(summary), best_step=step + 1, best_val=summary)
                save_localiser(out, net, plans, {"step": step + 1})
        state["log"].append(row)
        if progress is not None:
            progress((step + 1) / cfg.steps, f"step {step + 1}/{cfg.steps} loss {loss:.4f}")
    if not val_idx:
        save_localiser(out, net, plans, {"step": len(state["log"])})
    return state


def _check_sample_channels(samples: Sequence[Sample], channels: Sequence[str]) -> None:
    """ValueError unless every crop holds the arrays the network is to read."""
    from AnkleFractureLib.crop.syndesmosis import ALL_CHANNELS

    need = max(ALL_CHANNELS.index(c) for c in channels) + 1
    short = [s for s in samples if s.channels.shape[0] < need]
    if short:
        raise ValueError(f"the crops of {short[0].info['id']} (and {len(short) - 1} more) hold "
                         f"{short[0].channels.shape[0]} arrays, too few for {list(channels)}: "
                         "crops of an earlier crop version; build them again")


def _split(paths: Sequence[Path], val_paths: Optional[Sequence[Path]], cfg: FractureTrainConfig
           ) -> Tuple[List[Sample], List[int], List[int]]:
    """(samples, training indices, validation indices): ``val_paths`` when given, else a
    ``cfg.val_fraction`` split of the cases of ``paths``."""
    samples = load_samples(paths)
    if not samples:
        raise ValueError("no training crops with a Weber class and a fracture line")
    if not val_paths:
        return (samples, *split_cases(samples, cfg.val_fraction, cfg.seed))
    val = load_samples(val_paths)
    if not val:
        raise ValueError("no validation crops with a Weber class and a fracture line")
    ids = {s.info["id"] for s in samples} & {s.info["id"] for s in val}
    if ids:
        raise ValueError(f"case {sorted(ids)[0]} is in both the training and the validation "
                         "crops")
    n = len(samples)
    return samples + val, list(range(n)), list(range(n, n + len(val)))


#: Candidate "found" rules: peak probability, the strongest line's size (voxels) and how
#: completely it must cut the fibula (:func:`~AnkleFractureLib.fracture.localise.cut_fraction`).
#: The cut rule is tried only when asked (``cut_rule=True``, ``--try-cut-rule``): fitted on
#: the training crops it halved 'found' on intact bone, but on the held-out families it cost
#: found fractures on long oblique lines (docs/fracture/experiments/cut_rule).
DECISION_GRID = {"found_threshold": (0.5, 0.7, 0.9),
                 "min_voxels": (6, 50, 100, 200, 300, 400, 600, 800, 1200),
                 "min_cut": (0.0, 0.5)}


def _line_stats(localiser: Any, samples: Sequence[Sample], cuts: Sequence[float]
                ) -> List[Tuple[bool, Dict[float, Tuple[float, int]]]]:
    """(fractured, {min_cut: (peak probability, strongest line's voxels)}) per sample."""
    from AnkleFractureLib.fracture.localise import strongest_line

    rows = []
    for s in samples:
        prob, _ = localiser.heatmap(s.channels.astype(np.float32))
        fibula = s.channels[2] > 0.5
        per_cut = {}
        for cut in cuts:
            mask, peak = strongest_line(prob, localiser.decision["threshold"], fibula, cut)
            per_cut[cut] = (float(peak), int(mask.sum()))
        rows.append((s.info["weber"] != "none", per_cut))
    return rows


def _rate(rows: Sequence[Tuple[bool, Dict[float, Tuple[float, int]]]], t: float, v: int,
          cut: float) -> float:
    return float(np.mean([r[cut][0] >= t and r[cut][1] >= v for _, r in rows])) if rows else 0.0


def fit_decision(model_dir: Path, samples: Sequence[Sample], device: str = "cpu",
                 cut_rule: bool = False) -> Dict[str, Any]:
    """Choose the "found" rule on the training and validation cases and write it into
    plans.json: the (peak, size, cut) triple of :data:`DECISION_GRID` with the largest found
    rate on fractured cases minus the found rate on intact ones (ties: the first in grid
    order, the most permissive). Without ``cut_rule`` the cut stays 0 (off).

    Returns:
        {"found_threshold", "min_voxels", "min_cut", "found_rate", "found_on_none_rate",
        "cases"}.
    """
    from AnkleFractureLib.fracture.localise import FractureLocaliser
    from AnkleFractureLib.io import atomic_write_json

    loc = FractureLocaliser.load(model_dir, device=device)
    cuts = DECISION_GRID["min_cut"] if cut_rule else (0.0,)
    stats = _line_stats(loc, samples, cuts)
    frac = [r for r in stats if r[0]]
    none = [r for r in stats if not r[0]]
    best: Optional[Dict[str, Any]] = None
    for cut in cuts:
        for t in DECISION_GRID["found_threshold"]:
            for v in DECISION_GRID["min_voxels"]:
                fr, fn = _rate(frac, t, v, cut), _rate(none, t, v, cut)
                if best is None or fr - fn > best["found_rate"] - best["found_on_none_rate"] + 1e-9:
                    best = {"found_threshold": t, "min_voxels": v, "min_cut": cut,
                            "found_rate": round(fr, 4), "found_on_none_rate": round(fn, 4)}
    best["cases"] = len(stats)
    plans = {k: v for k, v in loc.plans.items() if not k.startswith("_")}
    plans["decision"] = {**plans.get("decision", {}),
                         **{k: best[k] for k in ("found_threshold", "min_voxels", "min_cut")}}
    atomic_write_json(Path(model_dir) / "plans.json", plans)
    return best


def _train_step(net: Any, opt: Any, samples: List[Sample], train_idx: List[int],
                rng: np.random.Generator, cfg: FractureTrainConfig, step: int) -> float:
    for g in opt.param_groups:
        g["lr"] = _lr_at(step, cfg)
    idx = rng.choice(train_idx, size=cfg.batch_size, replace=len(train_idx) < cfg.batch_size)
    x, y = _batch(samples, idx, rng, cfg)
    device = next(net.parameters()).device
    x, y = x.to(device), y.to(device)
    net.train()
    opt.zero_grad()
    loss = _loss(net(x), y, cfg.pos_weight, cfg.negative_topk, cfg.negative_weight)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _finish(out: Path, cfg: FractureTrainConfig, command: str, state: Dict[str, Any]
            ) -> Dict[str, Any]:
    from AnkleFractureLib.io import atomic_write_json

    _write_log(out / "training_log.csv", state["log"])
    report = {"kind": "fracture_localiser", "command": command, "config": asdict(cfg),
              "steps_run": len(state["log"]), "minutes": round((time.time() - state["t0"]) / 60, 2),
              "device": state["device"], "determinism": state.get("determinism"),
              "train_cases": state["train_cases"], "val_cases": state["val_cases"],
              "best_step": state["best_step"], "val_metrics": state["best_val"],
              "decision_fit": state.get("decision")}
    atomic_write_json(out / "training.json", report)
    return report


def refit_decision(model_dir: "Path | str", paths: Sequence[Path], command: str = "",
                   device: str = "cpu", cut_rule: bool = False) -> Dict[str, Any]:
    """Fit the "found" rule of a trained localiser again, without retraining its weights (a
    new rule, e.g. ``min_cut``, for a shipped model): plans.json gets the new ``decision``;
    training.json keeps the original training record and adds ``decision_refit``
    ({"command", "date", "fit", "previous"}).

    Args:
        model_dir: The trained model folder (plans.json, model.pt, training.json).
        paths: Crop cache files, as for training.
        command: The command line, recorded.
        device: torch device for the heatmaps.
        cut_rule: Try the cut rule too (see :func:`fit_decision`).

    Returns:
        The new fit (as :func:`fit_decision`).
    """
    import datetime

    from AnkleFractureLib.io import atomic_write_json

    folder = Path(model_dir)
    record_path = folder / "training.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    previous = json.loads((folder / "plans.json").read_text()).get("decision")
    fit = fit_decision(folder, load_samples(paths), device, cut_rule)
    record["decision_refit"] = {"command": command, "fit": fit, "previous": previous,
                                "date": datetime.date.today().isoformat()}
    atomic_write_json(record_path, record)
    return fit
