"""``ankle-fracture classify``: Danis-Weber class, uncertainty and Grad-CAM of one ankle CT."""

from __future__ import annotations

import argparse
import os

from AnkleFractureLib.cli.common import check_out_dir, check_tta
from AnkleFractureLib.cli.progress import ProgressBar
from AnkleFractureLib.cli.run_cmd import summary_lines

DESCRIPTION = """\
Classify the ankle fracture of a CT as Danis-Weber none / A / B / C from a given tibia/fibula
segmentation SEG (on exactly the CT's grid, e.g. from 'ankle-fracture segment', or corrected by
hand). It is 'ankle-fracture run' without the segmentation network: the same sanity checks run
on the CT, the segmentation, the registration and the crop, and when the scan cannot support an
answer (voxels over 5 mm, the syndesmosis outside the field of view, no fibula, both legs and
no --side, a failed registration) no Weber class is given and the reason is said (exit status
0: a refusal is a result). Otherwise SEG is registered to the healthy template (a left ankle
is mirrored first), the syndesmosis region is cropped and classified; test-time augmentation
(--tta) gives an uncertainty that flags unsure cases, and Grad-CAM shows where the network
looked. CT is an image file or a DICOM folder. Writes into DIR what 'run' writes (each file
atomically, result.json last; files of stages that did not run are not written):
  DIR/result.json     probabilities (none, A, B, C; sum 1), prediction, uncertainty (unsure
                      flag and reasons), side, registration, crop coverage, findings and
                      warnings, refusal, models (folders and SHA-256 of the weights), timings,
                      input (CT and SEG); the same schema as 'run' and 'batch'
  DIR/gradcam.nii.gz  Grad-CAM heatmap (float32, 0..1, 1 = most important) on the CT's own
                      grid: load it over the CT in 3D Slicer
  DIR/segmentation.nii.gz, transform.json, transform.tfm, syndesmosis_crop.nii.gz,
  report.png          as 'run' writes them (the segmentation is SEG as used)
Research software, not for clinical use."""

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


def run(args: argparse.Namespace) -> int:
    from AnkleFractureLib.errors import InputError
    from AnkleFractureLib.io import read_image
    from AnkleFractureLib.pipeline.pipeline import Pipeline, PipelineOptions, write_outputs

    check_tta(args.tta)
    out = check_out_dir(args.out)
    bar = ProgressBar("classify", enabled=not args.quiet)
    bar(0.0, "reading the CT")
    ct = read_image(args.ct)
    bar(0.04, "reading the segmentation")
    seg = read_image(args.seg)
    if not seg.same_geometry(ct, atol=1e-4):
        raise InputError(args.seg, "the segmentation is not on the CT's grid (shape "
                                   f"{seg.shape} vs {ct.shape}, or spacing / origin / direction "
                                   "differ); use the label map made for this CT (e.g. by "
                                   "'ankle-fracture segment')")
    pipeline = Pipeline(PipelineOptions(side=args.side, device=args.device, tta=args.tta,
                                        cls_model_dir=args.model,
                                        gradcam_class=args.gradcam_class))
    bar(0.06, "loading the classifier")
    _ = pipeline.classifier  # a missing or unreadable model is an error before any work

    def progress(fraction: float, message: str) -> None:
        bar(0.08 + 0.88 * fraction, message)

    # The same run as 'ankle-fracture run', with SEG instead of the segmentation network:
    # every check between the stages applies, refusals included.
    result = pipeline.run(ct, progress=progress, label=seg)
    result.input["seg"] = os.path.abspath(args.seg)
    bar(0.96, "writing")
    data = write_outputs(result, out, ct)
    bar(1.0, "done")
    print("\n".join(summary_lines(data, out)))
    if data.get("gradcam_class"):
        print(f"Grad-CAM of class {data['gradcam_class']}: {out / 'gradcam.nii.gz'}")
    return 0
