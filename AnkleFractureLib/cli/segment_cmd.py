"""``ankle-fracture segment``: tibia and fibula label map of a CT."""

from __future__ import annotations

import argparse
import time

import numpy as np

from AnkleFractureLib.cli.progress import ProgressBar

DESCRIPTION = """\
Segment the tibia and fibula of an ankle CT with the MONAI network (GPU when available).
CT is an image file (NIfTI, NRRD, MetaImage) or a DICOM folder. SEG is written as a uint8
label map (0 background, 1 tibia, 2 fibula; fracture fragments carry their bone's label) on
exactly the CT's grid, as .nii.gz, .nii, .nrrd or .mha."""

EXAMPLES = """\
examples:
  ankle-fracture segment ct.nii.gz -o seg.nii.gz
  ankle-fracture segment dicom_folder/ -o seg.nrrd --device cpu
  ankle-fracture segment ct.nii.gz -o seg.nii.gz --model models/my_seg_model"""


def add_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("segment", help="segment tibia and fibula (label map on the CT grid)",
                       description=DESCRIPTION, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ct", metavar="CT", help="CT image file or DICOM folder")
    p.add_argument("-o", "--output", required=True, metavar="SEG", help="output label map file")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto (default: CUDA when available), cpu or cuda")
    p.add_argument("--model", metavar="MODEL_DIR",
                   help="model folder (plans.json + model.pt); default: the shipped model")
    p.add_argument("--no-postprocess", action="store_true",
                   help="keep the raw network labels (no speck removal or fragment relabelling)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from AnkleFractureLib.errors import InputError
    from AnkleFractureLib.io import SUPPORTED_EXTENSIONS, read_image, write_image
    from AnkleFractureLib.io.atomic import split_extension
    from AnkleFractureLib.segmentation.inference import SegmentationModel

    # Refuse a bad output name before spending seconds on the network.
    if split_extension(args.output)[1] not in SUPPORTED_EXTENSIONS:
        raise InputError(args.output, "the label map must be written as one of "
                                      f"{', '.join(SUPPORTED_EXTENSIONS)}")
    t0 = time.perf_counter()
    bar = ProgressBar("segment", enabled=not args.quiet)
    bar(0.0, "reading the CT")
    ct = read_image(args.ct)
    model = SegmentationModel.load(args.model, args.device)

    def stage(fraction: float, message: str) -> None:
        bar(0.05 + 0.85 * fraction, message)

    labels = model.predict(ct, progress=stage, postprocess=not args.no_postprocess)
    bar(0.92, "writing")
    write_image(labels, args.output)
    bar(1.0, "done")
    voxel_ml = float(np.prod(ct.spacing)) / 1000.0
    tib = int(np.count_nonzero(labels.array == 1)) * voxel_ml
    fib = int(np.count_nonzero(labels.array == 2)) * voxel_ml
    print(f"{args.output}: tibia {tib:.1f} ml, fibula {fib:.1f} ml "
          f"({time.perf_counter() - t0:.1f} s on {model.device})")
    post = ((labels.meta or {}).get("segmentation") or {}).get("postprocess") or {}
    if post.get("not_a_leg"):  # post-processing rule 9: foot bones, not a leg, were removed
        for leg in post["not_a_leg"]:
            print(f"warning: {leg.get('note', 'no distal tibia in view')}")
    elif tib == 0 or fib == 0:
        print("warning: " + ("no tibia" if tib == 0 else "no fibula") + " found in this CT")
    return 0
