"""``ankle-fracture evaluate-cls``: accuracy and calibration of a Weber classifier on a dataset."""

from __future__ import annotations

import argparse

from AnkleFractureLib.cli.progress import ProgressBar

DESCRIPTION = """\
Classify every case of DATASET that has a Weber class ('weber' in dataset.json; the others
are ignored) and score the classifier: accuracy, per-class sensitivity, specificity,
precision, F1 and one-vs-rest AUROC, the confusion matrix (rows true, columns predicted),
expected calibration error, Brier score and log loss. Prints a table and writes everything,
with every case's probabilities, as JSON (undefined values are null).

Each case's syndesmosis crop is cut as 'ankle-fracture run' cuts it: the side is detected
automatically from the anatomy, never taken from dataset.json, so a wrongly detected side
counts against the result as it would for a user; every case records the side detected, the
dataset's side and whether they match. Cases whose masks come from a label map use it; with
--predicted-masks every case is segmented by the segmentation model first (--seg-model, the
pipeline's path). The crops are cached in DATASET/.crop_cache (or --cache-dir), keyed by the
case files, the template's content, the segmentation model's sha256, the side policy and the
crop code version. With --tta N every case is classified N times under random augmentations:
the mean probabilities are scored, and the cases the uncertainty flags as unsure are counted,
with the accuracy among the confident and the unsure cases."""

EXAMPLES = """\
examples:
  ankle-fracture evaluate-cls data/phantoms
  ankle-fracture evaluate-cls data/test_set --model models/cls --out results/cls.json
  ankle-fracture evaluate-cls data/test_set --model models/cls --tta 8 --workers 2
  ankle-fracture evaluate-cls data/test_set --predicted-masks --tta 8 --out cls_pipeline.json"""

DEFAULT_OUT = "cls_metrics.json"


def add_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("evaluate-cls", help="accuracy / AUROC / calibration of a Weber classifier",
                       description=DESCRIPTION, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", metavar="DATASET", help="dataset folder (with dataset.json)")
    p.add_argument("--model", metavar="MODEL_DIR",
                   help="classifier folder (plans.json + model.pt); default: the shipped model")
    p.add_argument("--out", metavar="JSON", default=DEFAULT_OUT,
                   help=f"metrics file to write (default: {DEFAULT_OUT} in the current folder)")
    p.add_argument("--tta", type=int, default=0, metavar="N",
                   help="test-time augmentations per case (default 0: one forward pass); "
                        "N > 1 also reports the unsure cases")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="crop cache folder (default DATASET/.crop_cache)")
    p.add_argument("--seg-model", metavar="DIR",
                   help="segmentation model for the cases without a label map (default: the "
                        "shipped one; use the model 'run' will use)")
    p.add_argument("--predicted-masks", action="store_true",
                   help="crop every case with the segmentation model's masks (as 'run' does), "
                        "not the dataset's label maps")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes computing missing crops (default 1)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto (default: CUDA when available), cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from AnkleFractureLib.dataset import Dataset
    from AnkleFractureLib.errors import InputError
    from AnkleFractureLib.evaluation.evaluate_cls import evaluate_classifier, format_report
    from AnkleFractureLib.io import atomic_write_json

    if args.tta < 0:
        raise InputError(None, f"--tta must be >= 0, got {args.tta}")
    if args.workers < 1:
        raise InputError(None, f"--workers must be >= 1, got {args.workers}")
    if os.path.isdir(args.out):
        raise InputError(args.out, "--out must be a JSON file name, not a folder")
    # Read the index first: a wrong folder fails at once, before the model is loaded.
    Dataset.load(args.dataset)
    bar = ProgressBar("evaluate-cls", enabled=not args.quiet)
    result = evaluate_classifier(args.dataset, args.model, device=args.device,
                                 cache_dir=args.cache_dir, workers=args.workers, tta=args.tta,
                                 progress=bar, seg_model_dir=args.seg_model,
                                 predicted_masks=args.predicted_masks)
    atomic_write_json(args.out, result)
    print(format_report(result))
    print(f"metrics written to {args.out}")
    return 0
