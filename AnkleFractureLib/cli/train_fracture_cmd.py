"""``ankle-fracture train-fracture``: train the fracture localiser on datasets with known lines."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from AnkleFractureLib.cli.progress import ProgressBar

DESCRIPTION = """\
Train the fibular fracture localiser: a small 3D U-Net that reads the fibula window of the
registered syndesmosis crop and marks the fracture line. Every case of each DATASET is cropped
as 'ankle-fracture run' would (side detected, never the dataset's) with its bone masks from
the dataset (--masks dataset), from the shipped segmentation model (--masks model) or both.
The target line comes from the phantom's exact fracture surface (meta["fracture"] written by
'ankle-fracture phantom'); cases without it are skipped. Crops are cached in --cache-dir.
Writes MODEL_DIR/plans.json, model.pt, training.json (command, seed, cases, validation
metrics) and training_log.csv. The same command with the same seed repeats the run on CPU."""

EXAMPLES = """\
examples:
  ankle-fracture phantom --out data/frac --n 128 --seed 401 --family mixed --fractures varied
  ankle-fracture train-fracture data/frac --out models/fracture --cache-dir cache/frac
  ankle-fracture train-fracture data/frac data/more --masks both --steps 3000 --seed 3 \\
      --out models/fracture2 --cache-dir cache/frac
  ankle-fracture train-fracture data/frac --val-dataset data/frac_val --masks both \\
      --out models/fracture3 --cache-dir cache/frac"""


def add_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("train-fracture", help="train the fibular fracture localiser",
                       description=DESCRIPTION, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("datasets", nargs="+", metavar="DATASET", help="dataset folder(s)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model folder to write")
    p.add_argument("--cache-dir", required=True, metavar="DIR", help="crop cache folder")
    p.add_argument("--masks", choices=["dataset", "model", "both"], default="dataset",
                   help="bone masks of the crops (default: dataset)")
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps (default 1500)")
    p.add_argument("--batch-size", type=int, default=2, help="windows per step (default 2)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--val-fraction", type=float, default=0.15,
                   help="cases held back for model selection (default 0.15)")
    p.add_argument("--val-dataset", action="append", default=[], metavar="DIR",
                   help="dataset used only to choose the checkpoint (repeatable; its crops take "
                        "the shipped segmentation's masks, as 'run' sees them); with it every "
                        "DATASET case trains and --val-fraction is not used")
    p.add_argument("--eval-every", type=int, default=150, help="validation interval (steps)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto uses CUDA when available (default); crops are made on the CPU")
    p.add_argument("--max-minutes", type=float, help="stop after this many minutes")
    p.add_argument("--refit-decision", action="store_true",
                   help="do not train: fit the 'found' rule of the model already in MODEL_DIR "
                        "again on these crops (plans.json 'decision'; training.json records "
                        "it as decision_refit)")
    p.add_argument("--try-cut-rule", action="store_true",
                   help="let the 'found' rule's fit also try requiring that a line cut the "
                        "fibula in two (off by default: see docs/fracture/experiments/cut_rule)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="cases cropped at once before training, each in its own process with "
                        "its own segmentation model and 1/N of the CPU threads (default 1); "
                        "the crops are the same for any N")
    p.add_argument("--channels", default="ct,tibia,fibula", metavar="NAMES",
                   help="comma-separated crop arrays the network reads, of ct (reference window "
                        "[-1000, 1000] HU), tibia, fibula, ct_bone (bone window [-500, 2500] HU, "
                        "where hairlines through the cortex show; not in the shipped localiser: "
                        "docs/fracture/experiments/v9_bone_window), ct_bone_min (the bone "
                        "window min-pooled over each voxel, so a gap thinner than a voxel is not "
                        "lost between samples; crops cached before it get it added), "
                        "ct_bone_sub (the bone window at 0.75 mm, each voxel's 8 octant samples "
                        "as 8 arrays ct_bone_sub0 ... ct_bone_sub7: hairlines at twice the "
                        "crop's resolution, edges unchanged); default ct,tibia,fibula")
    p.add_argument("--bridge-masks", type=float, default=0.4, metavar="P",
                   help="share (0-1) of the training windows whose fibula mask is closed "
                        "across gaps, as a segmentation that bridges the fracture line does "
                        "(default 0.4, the shipped localiser's recipe)")
    p.add_argument("--soft-masks", action="store_true",
                   help="keep the fibula mask soft in training (linearly interpolated, as the "
                        "pipeline's crop gives it); default: thresholded at 0.5, the shipped "
                        "localiser's recipe")
    p.add_argument("--crop-shift-mm", type=float, default=0.0, metavar="MM",
                   help="train on the template's box moved MM up its long axis (an upper-"
                        "window network, for a localiser whose plans.json reads a crop MM "
                        "taller: inference.extend_top_mm; default 0, the box itself)")
    p.add_argument("--negative-topk", type=int, default=0, metavar="K",
                   help="online hard-negative mining: add the cross-entropy of each training "
                        "window's K highest background voxels (false lines, e.g. at the "
                        "malleolus tip of an intact fibula, are a few hundred voxels the "
                        "window's mean dilutes; default 0: off, the shipped recipe)")
    p.add_argument("--negative-weight", type=float, default=1.0, metavar="W",
                   help="weight of that term (default 1)")
    p.add_argument("--edge-cut", type=float, default=0.0, metavar="P",
                   help="share (0-1) of the training windows that end at a random, tilted "
                        "scan edge (air beyond it, no line), so that the cut face of a scan "
                        "ending inside the crop is not read as a fracture (default 0: off, "
                        "the shipped recipe)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _channels(text: str) -> tuple:
    """--channels as crop array names; ``ct_bone_sub`` stands for its 8 arrays."""
    from AnkleFractureLib.crop.syndesmosis import ALL_CHANNELS, SUB_CHANNELS

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    names = tuple(m for n in names for m in (SUB_CHANNELS if n == "ct_bone_sub" else (n,)))
    bad = [n for n in names if n not in ALL_CHANNELS]
    if not names or bad or len(set(names)) != len(names):
        raise SystemExit(f"ankle-fracture train-fracture: error: --channels takes distinct names "
                         f"of {', '.join(ALL_CHANNELS)}, got {text!r}")
    return names


def _crops(datasets: list, masks_arg: str, cache_dir: str, bar: ProgressBar,
           workers: int = 1, shift_mm: float = 0.0, channels: tuple = ()) -> list:
    from AnkleFractureLib.training.fracture_data import build_fracture_crops

    sources = ["dataset", "model"] if masks_arg == "both" else [masks_arg]
    paths = []
    for ds in datasets:
        for masks in sources:
            got, failed = build_fracture_crops(ds, Path(cache_dir) / Path(ds).name, masks,
                                               progress=bar, workers=workers,
                                               shift_mm=shift_mm, channels=channels)
            for case, why in failed.items():
                print(f"skipped {case}: {why}", file=sys.stderr)
            paths += got
    return paths


def run(args: argparse.Namespace) -> int:
    from AnkleFractureLib.training.fracture_train import FractureTrainConfig, train_localiser

    if args.steps < 1 or args.batch_size < 1:
        raise SystemExit("ankle-fracture train-fracture: error: --steps and --batch-size must "
                         "be at least 1")
    both = ({Path(d).resolve() for d in args.datasets}
            & {Path(d).resolve() for d in args.val_dataset})
    if both:
        raise SystemExit(f"ankle-fracture train-fracture: error: {sorted(map(str, both))[0]} is "
                         "both a training and a validation dataset")
    bar = ProgressBar("crops", enabled=not args.quiet)
    if args.workers < 1:
        raise SystemExit("ankle-fracture train-fracture: error: --workers must be at least 1")
    if not 0.0 <= args.bridge_masks <= 0.75:
        raise SystemExit("ankle-fracture train-fracture: error: --bridge-masks must be in "
                         f"[0, 0.75] (dilation and erosion take the next 0.25), got "
                         f"{args.bridge_masks}")
    if args.negative_topk < 0 or args.negative_weight < 0:
        raise SystemExit("ankle-fracture train-fracture: error: --negative-topk and "
                         "--negative-weight must not be negative")
    if not 0.0 <= args.edge_cut <= 1.0:
        raise SystemExit("ankle-fracture train-fracture: error: --edge-cut must be in [0, 1], "
                         f"got {args.edge_cut}")
    if not 0.0 <= args.crop_shift_mm <= 100.0:
        raise SystemExit("ankle-fracture train-fracture: error: --crop-shift-mm must be in "
                         f"[0, 100] mm, got {args.crop_shift_mm}")
    channels = _channels(args.channels)
    paths = _crops(args.datasets, args.masks, args.cache_dir, bar, args.workers,
                   args.crop_shift_mm, channels)
    command = "ankle-fracture " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.refit_decision:
        return _refit(args, paths, command)
    # Only training chooses a checkpoint: a refit never needs the validation crops.
    val_paths = _crops(args.val_dataset, "model", args.cache_dir, bar, args.workers,
                       args.crop_shift_mm, channels)
    cfg = FractureTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                              val_fraction=args.val_fraction, eval_every=args.eval_every,
                              seed=args.seed, threads=args.threads, max_minutes=args.max_minutes,
                              device=args.device, cut_rule=args.try_cut_rule, channels=channels,
                              bridge_prob=args.bridge_masks, soft_masks=args.soft_masks,
                              crop_shift_mm=args.crop_shift_mm,
                              negative_topk=args.negative_topk,
                              negative_weight=args.negative_weight,
                              edge_cut_prob=args.edge_cut)
    report = train_localiser(paths, args.out, cfg, command,
                             ProgressBar("train-fracture", enabled=not args.quiet),
                             val_paths=val_paths or None)
    print(f"{args.out}: {report['steps_run']} steps, best step {report['best_step']}, "
          f"validation {report['val_metrics']}")
    return 0


def _refit(args: argparse.Namespace, paths: list, command: str) -> int:
    from AnkleFractureLib.errors import InputError
    from AnkleFractureLib.training.fracture_train import refit_decision

    if not (Path(args.out) / "model.pt").is_file():
        raise InputError(args.out, "--refit-decision needs a trained localiser there "
                                   "(model.pt is missing)")
    fit = refit_decision(args.out, paths, command, args.device, args.try_cut_rule)
    print(f"{args.out}: found rule {fit}")
    return 0
