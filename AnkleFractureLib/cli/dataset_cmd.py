"""``ankle-fracture dataset``: build a training dataset from a hospital's own CTs."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Optional

DESCRIPTION = """\
Put your own cases into the project's dataset layout, which train-seg, train-cls, evaluate-seg
and evaluate-cls read (DATASET/dataset.json, images/, labels/):
  add   copy one CT (image file or DICOM folder) into the dataset as NIfTI, with an optional
        tibia/fibula label map (0 background, 1 tibia, 2 fibula; on the CT's grid) and an
        optional Danis-Weber class. A case without --weber is unlabelled (train-cls --method
        semi uses it). Adding an existing id replaces that case, never duplicates it (give
        --seg again to keep its label map). --fracture-line adds the fibular fracture line a
        reader drew (a mask on the CT's grid), which train-fracture learns from.
        dataset.json is rewritten atomically.
  show  count the cases (segmented, classified, per class, unlabelled) and list them."""

EXAMPLES = """\
examples:
  ankle-fracture dataset add data/hospital dicom/patient_017/ --id case017 --weber B --side left
  ankle-fracture dataset add data/hospital ct_018.nii.gz --seg ct_018_seg.nii.gz --weber none
  ankle-fracture dataset add data/hospital ct_020.nii.gz --seg ct_020_seg.nii.gz --weber B \
      --fracture-line ct_020_fracture.nii.gz
  ankle-fracture dataset add data/hospital ct_019.nrrd               # unlabelled
  ankle-fracture dataset show data/hospital"""


def add_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("dataset", help="add your own cases to a training dataset, or list it",
                       description=DESCRIPTION, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    a = actions.add_parser("add", help="add (or update) one case",
                           description="Add one CT, with an optional label map and Weber "
                                       "class, to DATASET (created when missing).",
                           epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("dataset", metavar="DATASET", help="dataset folder (created when missing)")
    a.add_argument("ct", metavar="CT", help="CT image file or DICOM folder")
    a.add_argument("--seg", metavar="SEG",
                   help="label map on the CT's grid (0 background, 1 tibia, 2 fibula), e.g. "
                        "from 'ankle-fracture segment', corrected in 3D Slicer")
    a.add_argument("--fracture-line", metavar="MASK",
                   help="mask on the CT's grid, non-zero on the fibular fracture line (e.g. a "
                        "'Fibula fracture' segment corrected in 3D Slicer); train-fracture "
                        "learns to locate it")
    a.add_argument("--weber", choices=["none", "A", "B", "C"],
                   help="Danis-Weber class (omit for an unlabelled case)")
    a.add_argument("--side", choices=["left", "right"], help="ankle side (optional)")
    a.add_argument("--id", dest="case_id", metavar="ID",
                   help="case id (default: the file or folder name)")
    a.set_defaults(func=run_add)
    s = actions.add_parser("show", help="count and list the cases")
    s.add_argument("dataset", metavar="DATASET", help="dataset folder")
    s.set_defaults(func=run_show)


def default_case_id(path: str) -> str:
    """A case id from a file or folder name: extensions dropped, odd characters -> "_".

    Example:
        >>> default_case_id("/data/Patient 17/ct.nii.gz"), default_case_id("/dicom/P17/")
        ('ct', 'P17')
    """
    name = Path(path.rstrip("/\\")).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(ext):
            name = name[:-len(ext)]
            break
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "case"


def run_add(args: argparse.Namespace) -> int:
    from AnkleFractureLib.dataset import Dataset
    from AnkleFractureLib.errors import InputError
    from AnkleFractureLib.io import read_image

    ct = read_image(args.ct)

    def on_ct_grid(path: Optional[str], what: str, hint: str) -> Any:
        """The image at ``path`` (None when not given), refused unless on the CT's grid."""
        if not path:
            return None
        image = read_image(path)
        if not image.same_geometry(ct, atol=1e-4):
            raise InputError(path, f"the {what} is not on the CT's grid ({hint})")
        return image

    label = on_ct_grid(args.seg, "label map",
                       "use the one made for this CT, e.g. by 'ankle-fracture segment'")
    line = on_ct_grid(args.fracture_line, "fracture line mask", "draw it on this CT")
    case_id = args.case_id or default_case_id(args.ct)
    ds = Dataset.create(args.dataset)
    updated = ds.get(case_id) is not None
    ds.add_case(case_id, ct, label, weber=args.weber, side=args.side, source="user",
                meta={"original": str(Path(args.ct).resolve())}, fracture_line=line)
    counts = ds.counts()
    print(f"{'updated' if updated else 'added'} case {case_id} in {ds.root} "
          f"({'class ' + args.weber if args.weber else 'unlabelled'}"
          f"{', with segmentation' if label is not None else ''}"
          f"{', with a fracture line' if line is not None else ''}); the dataset holds "
          f"{counts['cases']} cases, {counts['segmented']} segmented, "
          f"{counts['classified']} classified, {counts['unlabelled']} unlabelled")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from AnkleFractureLib.dataset import Dataset

    ds = Dataset.load(args.dataset)
    c = ds.counts()
    print(f"{ds.root}: {c['cases']} cases; {c['segmented']} with a segmentation (train-seg); "
          f"{c['classified']} with a Weber class (none {c['weber_none']}, A {c['weber_A']}, "
          f"B {c['weber_B']}, C {c['weber_C']}); {c['unlabelled']} unlabelled; "
          f"{c['fracture_lines']} with an annotated fracture line (train-fracture)")
    print(f"{'id':<24} {'weber':<6} {'side':<6} {'segmentation':<13} source")
    for rec in ds:
        print(f"{rec.id:<24} {rec.weber or '-':<6} {rec.side or '-':<6} "
              f"{'yes' if rec.segmentation else '-':<13} {rec.source}")
    return 0
