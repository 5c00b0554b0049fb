"""``ankle-fracture register``: mirror + ICP to the healthy template, crop the syndesmosis."""

from __future__ import annotations

import argparse
from pathlib import Path

from AnkleFractureLib.cli.progress import ProgressBar

DESCRIPTION = """\
Register a tibia/fibula segmentation to the healthy right-ankle template (a left ankle is
mirrored first), then crop the tibiofibular syndesmosis region. Writes:
  DIR/transform.json          patient_to_template (4x4, row-major, LPS mm -> template mm), side,
                              mirrored, rms_mm, inlier_fraction, iterations, warnings
  DIR/transform.tfm           ITK transform (template -> patient, LPS); loaded in 3D Slicer it
                              moves the CT onto the template
  DIR/syndesmosis_crop.nii.gz the classifier's input: CT (HU window [-1000, 1000] -> [0, 1]),
                              tibia and fibula masks, 3 channels on the template's box grid"""

EXAMPLES = """\
examples:
  ankle-fracture register ct.nii.gz --seg seg.nii.gz --out reg/
  ankle-fracture register dicom_folder/ --seg seg.nrrd --out reg/ --side left"""


def add_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("register", help="mirror + ICP-register to the template, crop the syndesmosis",
                       description=DESCRIPTION, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ct", metavar="CT", help="CT image file or DICOM folder")
    p.add_argument("--seg", required=True, metavar="SEG",
                   help="label map on the CT (0 background, 1 tibia, 2 fibula)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--side", choices=["auto", "left", "right"], default="auto",
                   help="ankle side (default auto: detected from the anatomy)")
    p.add_argument("--template", metavar="DIR", help="template folder (default: the shipped one)")
    p.add_argument("--max-iterations", type=int, default=50, help="ICP iteration limit (default 50)")
    p.add_argument("--tolerance", type=float, default=1e-8,
                   help="ICP convergence threshold (default 1e-8)")
    p.add_argument("--trim", type=float, default=0.85,
                   help="fraction of closest correspondences kept by trimmed ICP (default 0.85)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from AnkleFractureLib.crop import crop_syndesmosis, write_crop
    from AnkleFractureLib.io import read_image
    from AnkleFractureLib.registration import load_template, register_to_template
    from AnkleFractureLib.registration.labels import labels_on_ct_grid
    from AnkleFractureLib.registration.transform_io import write_itk_transform, write_transform_json

    bar = ProgressBar("register", enabled=not args.quiet)
    bar(0.0, "reading")
    ct = read_image(args.ct)
    seg, note = labels_on_ct_grid(read_image(args.seg), ct)
    template = load_template(args.template)

    def stage(fraction: float, message: str) -> None:
        bar(0.1 + 0.7 * fraction, message)

    reg = register_to_template(seg, template, side=args.side, ct=ct,
                               max_iterations=args.max_iterations, tolerance=args.tolerance,
                               trim_fraction=args.trim, progress=stage)
    if note:
        reg.warnings.insert(0, note)
    bar(0.85, "cropping the syndesmosis")
    crop = crop_syndesmosis(ct, seg, reg.patient_to_template, template)
    if crop.coverage < 0.9:
        reg.warnings.append(f"only {crop.coverage:.0%} of the syndesmosis box lies inside the CT's "
                            "field of view")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = reg.to_json()
    data["crop_coverage"] = round(float(crop.coverage), 4)
    write_crop(crop, out / "syndesmosis_crop.nii.gz")
    write_itk_transform(reg.template_to_patient, out / "transform.tfm")
    write_transform_json(data, out / "transform.json")
    bar(1.0, "done")
    print(f"side {reg.side} ({reg.side_confidence:.0%}: {reg.side_reason}), "
          f"mirrored {reg.mirrored}, RMS {reg.rms_mm:.2f} mm, inliers {reg.inlier_fraction:.0%}, "
          f"{reg.iterations} iterations, scale {reg.scale:.3f}, box coverage {crop.coverage:.0%}")
    for w in reg.warnings:
        print(f"warning: {w}")
    print(f"wrote {out / 'transform.json'}, {out / 'transform.tfm'}, "
          f"{out / 'syndesmosis_crop.nii.gz'}")
    return 0
