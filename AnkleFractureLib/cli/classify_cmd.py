"""``ankle-fracture classify``: Danis-Weber class, uncertainty and Grad-CAM of one ankle CT."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any, Dict, List

from AnkleFractureLib.cli.common import bar_chart, check_out_dir, check_tta, prediction_line
from AnkleFractureLib.cli.progress import ProgressBar

DISCLAIMER = "research software, not for clinical use"

DESCRIPTION = """\
Classify the ankle fracture of a CT as Danis-Weber none / A / B / C. The tibia/fibula
segmentation SEG (on exactly the CT's grid, e.g. from 'ankle-fracture segment') is registered
to the healthy template (a left ankle is mirrored first), the syndesmosis region is cropped
and classified; test-time augmentation (--tta) gives an uncertainty that flags unsure cases,
and Grad-CAM shows where the network looked. CT is an image file or a DICOM folder. Writes:
  DIR/result.json     probabilities (none, A, B, C; sum 1), prediction, uncertainty (unsure
                      flag and reasons), side, registration, crop coverage, model (folder and
                      SHA-256 of model.pt), timings, inputs
  DIR/gradcam.nii.gz  Grad-CAM heatmap (float32, 0..1, 1 = most important) on the CT's own
                      grid: load it over the CT in 3D Slicer
Both are written only once everything is computed. Research software, not for clinical use."""

EXAMPLES = """\
examples:
  ankle-fracture segment ct.nii.gz -o seg.nii.gz
  ankle-fracture classify ct.nii.gz --seg seg.nii.gz --out result/
  ankle-fracture classify dicom_folder/ --seg seg.nrrd --out result/ --side left --tta 16
  ankle-fracture classify ct.nii.gz --seg seg.nii.gz --out result/ --class B --model models/cls"""


def add_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("classify", help="Danis-Weber class, uncertainty and Grad-CAM of a CT",
                       description=DESCRIPTION, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ct", metavar="CT", help="CT image file or DICOM folder")
    p.add_argument("--seg", required=True, metavar="SEG",
                   help="label map on the CT's grid (0 background, 1 tibia, 2 fibula)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--model", metavar="MODEL_DIR",
                   help="classifier folder (plans.json + model.pt); default: the shipped model")
    p.add_argument("--side", choices=["auto", "left", "right"], default="auto",
                   help="ankle side (default auto: detected from the anatomy)")
    p.add_argument("--tta", type=int, default=None, metavar="N",
                   help="test-time augmentations for the uncertainty (default: the model's; "
                        "0 = a single pass, no uncertainty)")
    p.add_argument("--class", dest="gradcam_class", choices=["none", "A", "B", "C"],
                   default=None,
                   help="the class Grad-CAM explains (default: the prediction)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto (default: CUDA when available), cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _unsure_reasons(uncertainty: Dict[str, Any]) -> List[str]:
    for key in ("reasons", "unsure_reasons"):
        if uncertainty.get(key):
            return [str(r) for r in uncertainty[key]]
    return []


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from AnkleFractureLib.classification.inference import WeberClassifier, classify_ct
    from AnkleFractureLib.classification.plans import CLASSES
    from AnkleFractureLib.errors import InputError
    from AnkleFractureLib.io import atomic_write_json, read_image, write_image
    from AnkleFractureLib.segmentation.model_io import WEIGHTS_FILE, sha256_file

    check_tta(args.tta)
    out = check_out_dir(args.out)
    t0 = time.perf_counter()
    bar = ProgressBar("classify", enabled=not args.quiet)
    bar(0.0, "reading the CT")
    ct = read_image(args.ct)
    bar(0.05, "reading the segmentation")
    seg = read_image(args.seg)
    if not seg.same_geometry(ct, atol=1e-4):
        raise InputError(args.seg, "the segmentation is not on the CT's grid (shape "
                                   f"{seg.shape} vs {ct.shape}, or spacing / origin / direction "
                                   "differ); use the label map made for this CT (e.g. by "
                                   "'ankle-fracture segment')")
    bar(0.08, "loading the classifier")
    classifier = WeberClassifier.load(args.model, args.device)

    def stage(fraction: float, message: str) -> None:
        bar(0.1 + 0.85 * fraction, message)

    output = classify_ct(ct, seg, classifier=classifier, side=args.side, tta=args.tta,
                         gradcam_class=args.gradcam_class, progress=stage)
    result = output["result"]
    heat = output["gradcam"]
    registration = output["registration"]
    crop = output["crop"]
    if not heat.same_geometry(ct, atol=1e-4):  # the contract of classify_ct; never write a
        raise RuntimeError("the Grad-CAM volume is not on the CT's grid")  # misplaced heatmap

    # Exact probability vector (the float32 softmax sums to 1 only to ~1e-7).
    p = np.asarray([float(result.probabilities[c]) for c in CLASSES], dtype=np.float64)
    p = p / p.sum()
    probabilities = {c: float(v) for c, v in zip(CLASSES, p)}
    warnings: List[str] = list(registration.warnings) if registration is not None else []
    coverage = float(getattr(crop, "coverage", 1.0))
    if coverage < 0.9:
        warnings.append(f"only {coverage:.0%} of the syndesmosis box lies inside the CT's "
                        "field of view")
    model_dir = classifier.model_dir
    timings = {k: round(float(v), 4) for k, v in result.timings.items()}
    timings["total"] = round(time.perf_counter() - t0, 4)
    data: Dict[str, Any] = {
        "probabilities": probabilities,
        "prediction": result.prediction,
        "uncertainty": result.uncertainty,
        "gradcam_class": result.gradcam_class,
        "side": registration.side if registration is not None else
        (None if args.side == "auto" else args.side),
        "registration": registration.to_json() if registration is not None else None,
        "crop": classifier.plans.crop,
        "crop_coverage": round(coverage, 4),
        "warnings": warnings,
        "model": {"dir": None if model_dir is None else str(model_dir),
                  "sha256": None if model_dir is None else sha256_file(model_dir / WEIGHTS_FILE)},
        "timings_s": timings,
        "input": {"ct": os.path.abspath(args.ct), "seg": os.path.abspath(args.seg)},
        "disclaimer": DISCLAIMER,
    }
    # Everything is computed: only now touch the output folder (each file atomically, the
    # result last, so a result.json always has its heatmap beside it).
    bar(0.97, "writing")
    out.mkdir(parents=True, exist_ok=True)
    write_image(heat.with_array(heat.array.astype(np.float32)), out / "gradcam.nii.gz")
    atomic_write_json(out / "result.json", data)
    bar(1.0, "done")

    print(f"Danis-Weber classification of {args.ct}"
          + (f" ({data['side']} ankle)" if data["side"] else ""))
    print("\n".join(bar_chart(probabilities, result.prediction)))
    print(prediction_line(probabilities, result.prediction))
    if result.uncertainty.get("unsure"):
        reasons = _unsure_reasons(result.uncertainty)
        print("UNSURE: " + ("; ".join(reasons) if reasons else "the uncertainty is high")
              + " - review the CT")
    for w in warnings:
        print(f"warning: {w}")
    print(f"wrote {out / 'result.json'} and {out / 'gradcam.nii.gz'} "
          f"(Grad-CAM of class {result.gradcam_class}; {timings['total']:.1f} s on "
          f"{classifier.device})")
    print(f"{DISCLAIMER}.")
    return 0
