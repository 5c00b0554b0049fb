"""``ankle-fracture run``: the whole pipeline on one CT, with its safety checks."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List

from AnkleFractureLib.cli.common import (add_pipeline_options, bar_chart, check_out_dir,
                                         check_tta, pipeline_options, prediction_line,
                                         preload_models_code)
from AnkleFractureLib.cli.progress import ProgressBar

DESCRIPTION = """\
Analyse one ankle CT end to end: segment the tibia and fibula, register them to the healthy
template (a left ankle is mirrored first), crop the syndesmosis, classify Danis-Weber
none / A / B / C with an uncertainty and a Grad-CAM heatmap, and locate the fibular fracture
line and its height above the plafond (the class that height gives is combined with the
classifier's; a disagreement makes the answer unsure). Sanity checks run between the
stages; when the scan cannot support an answer (the syndesmosis outside the field of view, no
fibula, both legs and no --side, a failed registration, voxels over 5 mm) the run stops and
says why: that is a result (exit status 0), not an error, and no Weber class is given.
Warnings (metal, coarse slices, a poor fit, ...) mark the answer unsure. CT is an image file or
a DICOM folder. Writes into DIR, each file atomically, result.json last:
  segmentation.nii.gz      tibia 1 / fibula 2 on the CT's grid
  transform.json           the registration (as 'ankle-fracture register'), and
  transform.tfm            the ITK transform (template -> patient, LPS) for 3D Slicer
  syndesmosis_crop.nii.gz  the classifier's input on the template's box grid
  gradcam.nii.gz           heatmap (float32, 0..1) on the CT's voxel lattice, the crop's box
  fracture_line.nii.gz     the located fibular fracture line (uint8), same lattice and box
  report.png               a one-page summary: slices through the located fracture (X) with
                           bone outlines and the heatmap, the four probabilities, the fracture
                           height, warnings (and report.pdf with --pdf)
  result.json              probabilities, prediction, uncertainty, fracture (found, height_mm,
                           center_lps, extent), side, registration quality,
                           findings and warnings, refusal, timings, model versions, input
Files of stages that did not run are not written. Research software, not for clinical use."""

EXAMPLES = """\
examples:
  ankle-fracture run ct.nii.gz --out result/
  ankle-fracture run dicom_folder/ --out result/ --side left --device cuda
  ankle-fracture run ct.nii.gz --out result/ --tta 16 --cls-model models/cls --quiet
  ankle-fracture run ct.nrrd --out result/ --pdf"""


def add_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("run", help="the whole pipeline on one CT (segment, register, classify)",
                       description=DESCRIPTION, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ct", metavar="CT", help="CT image file or DICOM folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    add_pipeline_options(p, side_help="ankle side (default auto: from the anatomy); with both "
                                      "legs in the scan, the leg to analyse")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def summary_lines(data: Dict[str, Any], out: Path) -> List[str]:
    """The readable summary of a ``result.json`` dict."""
    lines: List[str] = []
    src = (data.get("input") or {}).get("ct") or "the CT"
    side = f" ({data['side']} ankle)" if data.get("side") else ""
    lines.append(f"AnkleFracture analysis of {src}{side}")
    if data.get("refused"):
        stage = {"input": "image", "segment": "segmentation", "register": "registration",
                 "crop": "crop"}.get(data.get("refused_stage") or "", "")
        lines.append(f"NO WEBER CLASS: the {stage} checks refused this scan:".replace("  ", " "))
        for message in data.get("refusals") or [data.get("refusal") or "(no reason given)"]:
            lines.append(f"  - {message}")
    else:
        probabilities = data["probabilities"]
        prediction = data["prediction"]
        lines.extend(bar_chart(probabilities, prediction))
        lines.append(prediction_line(probabilities, prediction))
        unc = data.get("uncertainty") or {}
        if unc.get("unsure"):
            reasons = unc.get("reasons") or ["the uncertainty is high"]
            lines.append("UNSURE - review the CT:")
            lines.extend(f"  - {r}" for r in reasons)
        elif unc.get("settled_by"):
            lines.append(f"note: {unc['settled_by']}")
    reg = data.get("registration")
    if reg:
        lines.append(f"registration: RMS {reg['rms_mm']:.2f} mm, inliers "
                     f"{reg['inlier_fraction']:.0%}, scale {reg['scale']:.3f}"
                     + (f", box coverage {data['crop_coverage']:.0%}"
                        if data.get("crop_coverage") is not None else ""))
    for w in data.get("warnings", []):
        lines.append(f"warning: {w}")
    timings = data.get("timings_s", {})
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items() if k != "total")
    files = ", ".join(data.get("files", []) + ["result.json"])
    lines.append(f"wrote {out}/: {files} ({timings.get('total', 0.0):.1f} s: {stages})")
    lines.append(f"{data.get('disclaimer', 'research software, not for clinical use')}.")
    return lines


def run(args: argparse.Namespace) -> int:
    from AnkleFractureLib.io import read_image

    check_tta(args.tta)
    out = check_out_dir(args.out)
    # Overlaps importing the pipeline, torch and matplotlib with reading the CT.
    preload = preload_models_code(pipeline=True)
    bar = ProgressBar("run", enabled=not args.quiet)
    bar(0.0, "reading the CT")
    ct = read_image(args.ct)
    # Wait for those imports before this thread imports any of them itself: two threads
    # importing one package at once can see a partially initialised module (Python breaks an
    # import-lock cycle by handing one thread the unfinished module).
    preload.join()
    from AnkleFractureLib.pipeline.pipeline import Pipeline, write_outputs

    options = pipeline_options(args)
    pipeline = Pipeline(options)

    def progress(fraction: float, message: str) -> None:
        bar(0.02 + 0.93 * fraction, message)

    result = pipeline.run(ct, progress=progress)
    bar(0.96, "writing")
    data = write_outputs(result, out, ct, report_pdf=args.pdf)
    bar(1.0, "done")
    print("\n".join(summary_lines(data, out)))
    return 0
