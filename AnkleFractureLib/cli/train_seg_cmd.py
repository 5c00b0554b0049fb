"""``ankle-fracture train-seg``: train the tibia/fibula segmentation network on a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from AnkleFractureLib.cli.progress import ProgressBar

DESCRIPTION = """\
Train the tibia/fibula segmentation network (MONAI 3D U-Net, nnU-Net-style recipe) on the
segmented cases of a dataset folder (see 'ankle-fracture phantom'). Cases are split into
training and validation by case (from --seed); every epoch is validated by sliding-window
inference on the whole validation cases, and the best model by mean Dice is kept.

MODEL_DIR receives:
  plans.json, model.pt   the model (what 'ankle-fracture segment' needs; float16 weights)
  training_log.csv       one row per epoch (loss, validation Dice, learning rate, seconds)
  training.json          command, split, seed, versions, best Dice, status, wall time
  checkpoint.pt          full state for --resume (kept unless --no-keep-checkpoint; large,
                         not needed to ship the model)

--max-minutes stops cleanly (finishes the step, validates, saves); Ctrl-C saves a checkpoint.
Both can be continued with --resume. Uses the GPU when there is one (--device auto).
Under torchrun each process trains on its own patches (DistributedDataParallel; NCCL on
GPUs, Gloo on CPUs); --batch-size and --steps-per-epoch are per process."""

EXAMPLES = """\
examples:
  ankle-fracture phantom --out data/phantoms --n 40 --seed 1
  ankle-fracture train-seg data/phantoms --out models/seg
  ankle-fracture train-seg data/phantoms --out models/seg_quick --epochs 20 --max-minutes 30
  ankle-fracture train-seg data/phantoms --out models/seg --resume --epochs 300
  ankle-fracture train-seg data/phantoms --out models/seg_sgd --optimizer sgd --lr 0.01
  ankle-fracture train-seg data/phantoms --out models/seg_dr --randomise full
  torchrun --nproc_per_node=4 -m AnkleFractureLib train-seg data/ --out models/seg"""


def add_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("train-seg", help="train the tibia/fibula segmentation network",
                       description=DESCRIPTION, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", metavar="DATASET", help="dataset folder (with dataset.json)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR",
                   help="model folder to write (must be new unless --resume)")
    p.add_argument("--epochs", type=int, default=200, help="total epochs (default 200)")
    p.add_argument("--steps-per-epoch", type=int, default=50, metavar="N",
                   help="optimiser steps per epoch (default 50)")
    p.add_argument("--batch-size", type=int, default=2, metavar="N",
                   help="patches per step and process (default 2)")
    p.add_argument("--lr", type=float, default=None,
                   help="initial learning rate, decayed polynomially to 0 "
                        "(default 1e-3 for adamw, 1e-2 for sgd)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                   help="adamw (weight decay 1e-5) or sgd (Nesterov momentum 0.99, as "
                        "nnU-Net); default adamw")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("Z", "Y", "X"),
                   help="training patch / validation window in voxels at model spacing, "
                        "multiples of 16 (default from the plans: 96 96 96)")
    p.add_argument("--plans", metavar="PLANS_JSON",
                   help="start from these segmentation plans instead of the defaults")
    p.add_argument("--randomise", choices=["off", "light", "full"], default=None,
                   help="domain randomisation of the training patches (SynthSeg-style random "
                        "tissue intensities, bias field, slice thickness, blur, noise, kernel, "
                        "metal, field-of-view cuts) so that a phantom-trained model relies on "
                        "shape rather than the phantoms' exact HU; default off for a new run "
                        "(as the shipped model was trained), the checkpoint's on --resume")
    p.add_argument("--hard-negatives", type=float, default=0.0, metavar="P",
                   help="share of training patches centred on bone that carries no label "
                        "(talus, foot bones, the other leg), so that the model learns they "
                        "are not tibia or fibula; 0 to 1 (default 0, as earlier versions)")
    p.add_argument("--hardware", type=float, default=0.0, metavar="P",
                   help="share of training patches that get a fixation plate with screws "
                        "through the bone and metal streaks, painted on the tibia or fibula of "
                        "the patch (label kept: the bone under the plate stays bone), so that "
                        "a plate does not erase the bone it lies on; 0 to 1, needs --randomise "
                        "light or full (default 0, as earlier versions)")
    p.add_argument("--val-fraction", type=float, default=0.15, metavar="F",
                   help="share of cases held out for validation (default 0.15, >= 1 case)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the split, the initial weights and the patches (default 0)")
    p.add_argument("--max-minutes", type=float, default=None, metavar="M",
                   help="stop cleanly after M minutes of wall time (resume later)")
    p.add_argument("--init-from", metavar="MODEL_DIR",
                   help="start from this model's weights (fine-tuning, e.g. the shipped model "
                        "on your own cases); its plans.json is used unless --plans is given")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in MODEL_DIR from its checkpoint.pt")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto uses CUDA when available (default)")
    p.add_argument("--num-workers", type=int, default=0, metavar="N",
                   help="data loader processes making patches (default 0: in the trainer)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads per process (default: cores / processes)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="cache prepared cases here as .npz (faster restarts)")
    p.add_argument("--keep-checkpoint", action=argparse.BooleanOptionalAction, default=True,
                   help="keep MODEL_DIR/checkpoint.pt after a completed run (default: keep)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from AnkleFractureLib.errors import InputError
    from AnkleFractureLib.segmentation.plans import SegPlans
    from AnkleFractureLib.training.distributed import env_ranks
    from AnkleFractureLib.training.seg_train import train_segmentation

    plans = SegPlans.load(args.plans) if args.plans else None
    if args.init_from and plans is None and not args.resume:
        plans = SegPlans.load(Path(args.init_from) / "plans.json")
    if args.patch_size:
        if any(v < 16 or v % 16 for v in args.patch_size):
            raise InputError(None, f"--patch-size must be multiples of 16, got {args.patch_size}")
        plans = dataclasses.replace(plans or SegPlans(), patch_size=tuple(args.patch_size))
    if not 0.0 <= args.hard_negatives <= 1.0:
        raise InputError(None, f"--hard-negatives must be in [0, 1], got {args.hard_negatives}")
    randomise = _randomise(args)
    augment = None
    if args.hard_negatives > 0:
        from AnkleFractureLib.training.seg_data import AugmentConfig

        augment = AugmentConfig(p_unlabelled_bone=args.hard_negatives)
    lr = args.lr if args.lr is not None else (1e-2 if args.optimizer == "sgd" else 1e-3)
    main_rank = env_ranks()[0] == 0
    summary = train_segmentation(
        args.dataset, args.out, plans=plans, epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, lr=lr,
        val_fraction=args.val_fraction, seed=args.seed, max_minutes=args.max_minutes,
        resume=args.resume, device=args.device, num_workers=args.num_workers,
        cache_dir=args.cache_dir, optimizer=args.optimizer, num_threads=args.threads,
        keep_checkpoint=args.keep_checkpoint, randomise=randomise,
        init_weights=args.init_from, augment=augment,
        progress=ProgressBar("train-seg", enabled=main_rank and not args.quiet),
        log=print if main_rank else None)
    if main_rank:
        best = summary["best_val_dice"]
        print(f"{summary['model_dir']}: {summary['status']}, {summary['steps_run']} steps, "
              f"best mean validation Dice {'n/a' if best is None else f'{best:.4f}'}")
    return 0


def _randomise(args: argparse.Namespace) -> Any:
    """The ``randomise`` setting: the level name, or its config with ``p_hardware`` set.

    Raises:
        InputError: ``--hardware`` outside [0, 1], or without a randomisation level.
    """
    import dataclasses

    from AnkleFractureLib.errors import InputError
    from AnkleFractureLib.training.seg_randomise import randomise_config

    if not 0.0 <= args.hardware <= 1.0:
        raise InputError(None, f"--hardware must be in [0, 1], got {args.hardware}")
    if args.hardware == 0.0:
        return args.randomise
    if args.randomise in (None, "off"):
        raise InputError(None, "--hardware needs --randomise light or full (the plate is part "
                               "of the domain randomisation)")
    return dataclasses.replace(randomise_config(args.randomise), p_hardware=args.hardware,
                               level=f"{args.randomise}+hardware")
