"""``ankle-fracture evaluate-fracture``: the Weber answer and the located fracture, scored
through the whole pipeline on a phantom dataset."""

from __future__ import annotations

import argparse

from AnkleFractureLib.cli.progress import ProgressBar

DESCRIPTION = """\
Run every case of DATASET through exactly what 'ankle-fracture run' does (the shipped or given
models, automatic side detection, the checks) and score the answers against the phantom's
truth: accuracy, per-class AUROC, ECE and confusion matrix of the combined Weber answer, of the
classifier alone and of the class the measured fracture height gives; the fracture found rate on
fractured cases, 'found' on intact cases, the median |height error| and the median distance of
the located centre from the true one (mm); where the phantom records its plafond, how far the
registration put the template's plafond from it (3-D and along the long axis, mm). A refused
case counts as wrong. A scan refused only because both legs are in view is run again with its
side given, as the refusal asks (counted per case). Writes everything as JSON."""

EXAMPLES = """\
examples:
  ankle-fracture phantom --out data/heldout --n 32 --seed 9301 --family vh --fractures heldout
  ankle-fracture evaluate-fracture data/heldout --out results/fracture_heldout.json
  ankle-fracture evaluate-fracture data/heldout --out results/fracture_heldout.json --workers 2"""


def add_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("evaluate-fracture",
                       help="score the Weber answer and the located fracture on a phantom set",
                       description=DESCRIPTION, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", metavar="DATASET", help="dataset folder (with dataset.json)")
    p.add_argument("--out", metavar="JSON", default="fracture_metrics.json",
                   help="metrics file (default fracture_metrics.json)")
    p.add_argument("--seg-model", metavar="DIR", help="segmentation model (default: shipped)")
    p.add_argument("--cls-model", metavar="DIR", help="classifier (default: shipped)")
    p.add_argument("--fracture-model", metavar="DIR", help="fracture localiser (default: shipped)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="cases run at once, each in its own process with its own models and "
                        "an equal share of the CPU threads (default 1); the scores are the "
                        "same for any N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from AnkleFractureLib.evaluation.evaluate_fracture import registration_line
    from AnkleFractureLib.io import atomic_write_json
    from AnkleFractureLib.pipeline.evaluate import evaluate_fracture
    from AnkleFractureLib.pipeline.pipeline import Pipeline, PipelineOptions

    if args.workers < 1:
        raise SystemExit("ankle-fracture evaluate-fracture: error: --workers must be at least 1")
    pipe = Pipeline(PipelineOptions(device=args.device, seg_model_dir=args.seg_model,
                                    cls_model_dir=args.cls_model,
                                    fracture_model_dir=args.fracture_model))
    report = evaluate_fracture(args.dataset, pipe,
                               ProgressBar("evaluate-fracture", enabled=not args.quiet),
                               workers=args.workers)
    report["models"] = pipe.model_info({"segmentation": True, "classification": True,
                                        "fracture": True})
    atomic_write_json(args.out, report)
    s = report["summary"]
    f = s["fracture"]
    print(f"{s['n']} cases, {s['refused']} refused; accuracy combined "
          f"{s['combined']['accuracy']}, classifier only {s['classifier_only']['accuracy']}, "
          f"height only {s['height_only_accuracy']}")
    print(f"fracture found {f['found_rate']} of fractured, found on none {f['found_on_none_rate']}, "
          f"median |height error| {f['median_abs_height_error_mm']} mm, median centre distance "
          f"{f['median_center_distance_mm']} mm")
    reg = registration_line(s)
    if reg:
        print(reg)
    print(f"written {args.out}")
    return 0
