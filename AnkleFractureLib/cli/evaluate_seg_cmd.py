"""``ankle-fracture evaluate-seg``: Dice and HD95 of a segmentation model on a dataset."""

from __future__ import annotations

import argparse

from AnkleFractureLib.cli.progress import ProgressBar
from AnkleFractureLib.geometry.volume import Volume

DESCRIPTION = """\
Segment every case of DATASET that has a reference label map (labels/<id>.nii.gz) and score
the prediction per bone: Dice, HD95 (95th percentile symmetric surface distance, mm) and ASSD
(mm). Prints one row per case, then the means over all, fractured (Weber A/B/C) and intact
(Weber none) cases, and writes everything as JSON (undefined values, e.g. the HD95 of a bone
the model missed, are null)."""

EXAMPLES = """\
examples:
  ankle-fracture evaluate-seg data/phantoms
  ankle-fracture evaluate-seg data/test_set --model models/my_seg_model --out results/seg.json
  ankle-fracture evaluate-seg data/test_set --device cpu --quiet"""

DEFAULT_OUT = "seg_metrics.json"


def add_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("evaluate-seg", help="Dice / HD95 of a segmentation model on a dataset",
                       description=DESCRIPTION, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", metavar="DATASET", help="dataset folder (with dataset.json)")
    p.add_argument("--model", metavar="MODEL_DIR",
                   help="model folder (plans.json + model.pt); default: the shipped model")
    p.add_argument("--out", metavar="JSON", default=DEFAULT_OUT,
                   help=f"metrics file to write (default: {DEFAULT_OUT} in the current folder)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto (default: CUDA when available), cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from AnkleFractureLib.dataset import Dataset
    from AnkleFractureLib.evaluation.evaluate_seg import (
        evaluate_segmentation_dataset,
        format_report,
    )
    from AnkleFractureLib.segmentation.inference import SegmentationModel

    bar = ProgressBar("evaluate-seg", enabled=not args.quiet)
    # Read the index first: a wrong folder fails at once, before the model is loaded.
    n = max(sum(c.segmentation is not None for c in Dataset.load(args.dataset).cases), 1)
    bar(0.0, "loading the model")
    model = SegmentationModel.load(args.model, args.device)
    state = {"fraction": 0.0, "case": ""}

    def on_case(fraction: float, message: str) -> None:
        state["fraction"], state["case"] = fraction, message
        bar(fraction, message)

    def predict(ct: Volume) -> Volume:
        # The network's own progress, scaled into this case's share of the bar.
        def stage(fraction: float, message: str) -> None:
            bar(state["fraction"] + fraction / n, f"{state['case']}: {message}")

        return model.predict(ct, progress=stage)

    result = evaluate_segmentation_dataset(args.dataset, predict, out_json=args.out,
                                           progress=on_case)
    print(format_report(result))
    print(f"metrics written to {args.out}")
    return 0
