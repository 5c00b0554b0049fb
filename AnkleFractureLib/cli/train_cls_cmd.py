"""``ankle-fracture train-cls``: train the Danis-Weber classifier on a dataset's crops."""

from __future__ import annotations

import argparse

from AnkleFractureLib.cli.progress import ProgressBar

DESCRIPTION = """\
Train the Danis-Weber classifier (3D SE-ResNet) on the syndesmosis crops of a dataset
folder (see 'ankle-fracture phantom'). Cases with a 'weber' class in dataset.json are the
labelled ones; cases without it (weber null or absent) are the unlabelled ones, used by the
semi-supervised methods. --label-fraction F < 1 keeps the class of only a stratified, seeded
share F of the labelled cases (at least one per class) and moves the others to the unlabelled
pool (the label-scarcity experiment).

methods:
  supervised   cross-entropy on the labelled cases only
  semi         reference method: class prototypes + relation weight network weighting the
               pseudo-labels of unlabelled cases, + MMD aligning labelled/unlabelled features
  pseudolabel  + cross-entropy on confident (>= 0.7) argmax pseudo-labels (Lee 2013)
  fixmatch     weak-view pseudo-labels (>= 0.95) supervise a strong view (Sohn et al. 2020)

Each case's crop (registration to the template + syndesmosis crop, or the raw-CT control with
--crop raw) is computed once and cached in DATASET/.crop_cache (or --cache-dir); later runs
start at once. The labelled training cases that have a label map are also cropped with the
segmentation model's masks (--seg-model, default the shipped one) and trained on both, since
the pipeline classifies the model's masks (--no-model-masks: label maps only). Training crops
are registered with the side given in dataset.json when a case has one (labelled training data
knows it; detected otherwise), whereas 'evaluate-cls' detects the side as 'run' does; the policy,
the crop code version and the template's and segmentation model's sha256 go to training.json.
A share
--val-fraction of the labelled cases is held out to report the validation accuracy and to fit
the calibration temperature.

MODEL_DIR (must be new or empty) receives plans.json + model.pt (what 'ankle-fracture
classify' and 'evaluate-cls' need), training.json (settings, case split, validation metrics,
temperature, versions) and training_log.csv. --max-minutes stops cleanly and saves.
Uses the GPU when there is one (--device auto). For several processes run it under
  torchrun --nproc_per_node=N -m AnkleFractureLib train-cls ...
(DistributedDataParallel; --batch-size and --unlabelled-batch-size are per process)."""

EXAMPLES = """\
examples:
  ankle-fracture phantom --out data/phantoms --n 40 --seed 1
  ankle-fracture train-cls data/phantoms --out models/cls --method supervised
  ankle-fracture train-cls data/phantoms --out models/cls_semi20 --method semi \\
      --label-fraction 0.2 --seed 1 --max-minutes 30
  ankle-fracture train-cls data/phantoms --out models/cls_raw --method supervised --crop raw
  torchrun --nproc_per_node=4 -m AnkleFractureLib train-cls data/ --out models/cls --method semi"""


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(sub: "argparse._SubParsersAction") -> None:
    from AnkleFractureLib.training.cls_train import METHODS

    p = sub.add_parser("train-cls", help="train the Danis-Weber classifier (semi-supervised)",
                       description=DESCRIPTION, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", metavar="DATASET", help="dataset folder (with dataset.json)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR",
                   help="model folder to write (must be new or empty)")
    p.add_argument("--method", required=True, choices=list(METHODS),
                   help="training method (see above)")
    p.add_argument("--label-fraction", type=float, default=1.0, metavar="F",
                   help="share of the labelled cases whose class is used, in (0, 1] "
                        "(default 1)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the label selection, split, weights and batches (default 0)")
    p.add_argument("--max-minutes", type=float, default=None, metavar="M",
                   help="stop cleanly after M minutes of wall time and save")
    p.add_argument("--steps", type=int, default=600, metavar="N",
                   help="optimiser steps (default 600)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N",
                   help="labelled crops per step and process (default 16)")
    p.add_argument("--unlabelled-batch-size", type=int, default=16, metavar="N",
                   help="unlabelled crops per step and process (default 16)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="initial learning rate, cosine decay to 0 (default 1e-3)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                   help="adamw (default) or sgd with momentum 0.9 (the reference's choice; "
                        "slower from scratch, use --lr 0.01-0.05)")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="share of the labelled cases held out for validation and calibration, "
                        "in [0, 1) (default 0.1)")
    p.add_argument("--crop", choices=["registered", "raw"], default="registered",
                   help="registered syndesmosis crop (CT + tibia + fibula; default) or the "
                        "raw-CT control (no registration)")
    p.add_argument("--downsample", type=int, nargs="+", default=[1], metavar="D",
                   help="average-pool the 1.5 mm crop by D (default 1; 2 = 3 mm, faster), or "
                        "by three factors z y x (e.g. 1 2 2)")
    p.add_argument("--widths", type=int, nargs=4, metavar="W",
                   help="SE-ResNet stage widths (default from the plans: 16 32 64 128)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="crop cache folder (default DATASET/.crop_cache)")
    p.add_argument("--seg-model", metavar="DIR",
                   help="segmentation model for the cases without a label map (default: the "
                        "shipped one; use the model 'run' will use)")
    p.add_argument("--model-masks", action=argparse.BooleanOptionalAction, default=True,
                   help="also train on the labelled cases cropped with the segmentation "
                        "model's masks, which the pipeline will classify (default: yes)")
    p.add_argument("--bridge-masks", type=float, default=0.0, metavar="P",
                   help="share (0-1) of the training crops whose tibia and fibula masks are "
                        "closed across gaps of 3-6 mm, as a segmentation that bridges a "
                        "fracture line does, so the classifier reads the fracture in the CT "
                        "(default 0: off, the shipped classifier's recipe)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes computing missing crops (default 1)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto uses CUDA when available (default)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads per process (default: cores / processes)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no periodic log lines (the summary is printed)")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad arguments with one clear line, before any heavy work."""
    from AnkleFractureLib.errors import InputError

    problems = []
    if not 0.0 < args.label_fraction <= 1.0:
        problems.append(f"--label-fraction must be in (0, 1], got {args.label_fraction}")
    if not 0.0 <= args.val_fraction < 1.0:
        problems.append(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if len(args.downsample) not in (1, 3) or min(args.downsample) < 1:
        problems.append(f"--downsample takes 1 or 3 factors >= 1, got {args.downsample}")
    for name in ("steps", "batch_size", "unlabelled_batch_size", "workers"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.bridge_masks <= 1.0:
        problems.append(f"--bridge-masks must be in [0, 1], got {args.bridge_masks}")
    if not args.lr > 0:
        problems.append(f"--lr must be > 0, got {args.lr}")
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads must be >= 1, got {args.threads}")
    if args.max_minutes is not None and not args.max_minutes > 0:
        problems.append(f"--max-minutes must be > 0, got {args.max_minutes}")
    if args.widths is not None and any(w < 1 for w in args.widths):
        problems.append(f"--widths must be positive, got {args.widths}")
    if problems:
        raise InputError(None, "; ".join(problems))


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from AnkleFractureLib.classification.plans import ClsPlans
    from AnkleFractureLib.dataset import Dataset
    from AnkleFractureLib.errors import InputError
    from AnkleFractureLib.training.cls_train import ClsTrainConfig, train_classifier
    from AnkleFractureLib.training.distributed import env_ranks

    _check_args(args)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(out, "the output model folder must be new or empty")
    ds = Dataset.load(args.dataset)  # InputError naming a wrong folder, before any cropping
    if not any(c.weber is not None for c in ds.cases):
        raise InputError(ds.root, "no case has a Weber class ('weber' in dataset.json): "
                                  "training needs labelled cases")
    config = ClsTrainConfig(method=args.method, label_fraction=args.label_fraction,
                            seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                            unlabelled_batch_size=args.unlabelled_batch_size, lr=args.lr,
                            optimizer=args.optimizer, val_fraction=args.val_fraction,
                            model_masks=args.model_masks, bridge_prob=args.bridge_masks)
    config.check()
    try:
        down = args.downsample[0] if len(args.downsample) == 1 else list(args.downsample)
        plans = ClsPlans.make(args.crop, down, args.widths)
    except ValueError as exc:
        raise InputError(None, f"invalid classifier settings: {exc}") from None

    main_rank = env_ranks()[0] == 0
    verbose = main_rank and not args.quiet
    summary = train_classifier(
        args.dataset, out, config, plans=plans, cache_dir=args.cache_dir, workers=args.workers,
        seg_model_dir=args.seg_model,
        device=args.device, num_threads=args.threads, max_minutes=args.max_minutes,
        progress=ProgressBar("train-cls", enabled=verbose),
        log=print if verbose else (lambda _line: None))
    if main_rank:
        val = summary.get("validation") or {}
        if val.get("accuracy") is not None:
            val_text = (f"validation accuracy {100.0 * val['accuracy']:.1f}% on {val['n']} "
                        f"cases (temperature {val.get('temperature', 1.0):.3g})")
        else:
            val_text = "no validation cases"
        print(f"{out}: {summary['status']}, {summary['method']}, {summary['steps_done']} steps "
              f"in {summary['minutes']:.1f} min, {val_text}")
    return 0
