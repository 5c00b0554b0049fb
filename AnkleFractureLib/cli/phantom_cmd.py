"""``ankle-fracture phantom``: write a synthetic ankle CT dataset."""

from __future__ import annotations

import argparse

from AnkleFractureLib.cli.progress import ProgressBar

DESCRIPTION = """\
Generate synthetic ankle CT cases (the project's phantom) as a dataset folder:
DIR/dataset.json, DIR/images/<id>.nii.gz (HU), DIR/labels/<id>.nii.gz (0 background,
1 tibia, 2 fibula), with --preview DIR/previews/<id>.png and, with --dicom, each CT also as a
DICOM series in DIR/dicom/<id>/ (to try the DICOM path of 'run' and 'batch'). Same seed, same
images.
Classes cycle none/A/B/C and sides alternate unless --weber / --side fix them."""

EXAMPLES = """\
examples:
  ankle-fracture phantom --out data/phantoms --n 40 --seed 1
  ankle-fracture phantom --out data/weber_b --n 4 --seed 7 --weber B --side left --preview
  ankle-fracture phantom --out data/big --n 2 --seed 3 --spacing clinical
  ankle-fracture phantom --out data/vh_train --n 96 --seed 11 --family vh --workers 2
  ankle-fracture phantom --out data/dicom_demo --n 2 --dicom"""


def add_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("phantom", help="generate synthetic ankle CT cases (dataset layout)",
                       description=DESCRIPTION, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR", help="dataset folder to write (created)")
    p.add_argument("--n", type=int, default=4, help="number of cases (default 4)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--weber", choices=["none", "A", "B", "C"],
                   help="Danis-Weber class of every case (default: cycle the four)")
    p.add_argument("--side", choices=["left", "right"], help="side of every case (default: alternate)")
    p.add_argument("--spacing", choices=["fast", "clinical", "mixed"], default="fast",
                   help="voxel grids: fast (~0.7-1.0 mm, seconds), clinical (~0.35 mm, 512x512x300-400) "
                        "or mixed (every fifth case clinical); default fast")
    p.add_argument("--family", choices=["analytic", "vh", "mixed"], default="analytic",
                   help="anatomy: analytic (the original implicit phantom), vh (real Visible "
                        "Human bone shapes, deformed, realistic appearance, varied field of "
                        "view) or mixed (blocks of four cases alternate); default analytic")
    p.add_argument("--fractures", choices=["classic", "varied", "heldout", "calibration"],
                   default="classic",
                   help="fracture morphology: classic (0.5-2 mm gaps, 1-4 mm displacement), "
                        "varied (hairline to 6 mm displaced, curved lines, with or without "
                        "widening; for training), heldout (a differently parameterised "
                        "family: test only) or calibration (a third family, parameterised "
                        "differently from both: for fitting the decision after the networks, "
                        "never for training a network or testing); default classic")
    p.add_argument("--confounders", type=float, default=0.0, metavar="P",
                   help="probability (0-1) that a case carries fracture mimics on intact bone: "
                        "an os subfibulare (accessory ossicle below the lateral malleolus, "
                        "unlabelled), a healed fibular fracture (sclerotic band with callus), "
                        "a nutrient canal (thin lucent channel through the cortex) or a physeal "
                        "scar; they look like fractures but are not (recorded in the case "
                        "meta). Default 0: none, cases as before")
    p.add_argument("--forefoot", type=float, default=0.0, metavar="P",
                   help="probability (0-1) that a vh case whose foot is in view carries the "
                        "forefoot as unlabelled distractors (cuneiforms, metatarsals I-V, "
                        "proximal phalanges), 40 %% of them in strong plantarflexion (40-68 "
                        "degrees: axial slices then cut the metatarsals as rows of rings); "
                        "recorded in the case meta. The analytic family ignores it. Default "
                        "0: none, cases as before")
    p.add_argument("--metal", type=float, default=None, metavar="P",
                   help="probability (0-1) that a vh case carries fixation hardware, as "
                        "post-operative and some trauma CTs do: a lateral fibular plate with "
                        "screws through the fibula (60 %%) or medial malleolar screws (40 %%), "
                        "with metal streaks; recorded in the case meta. The analytic family "
                        "ignores it. Default: 15 %% of fractured and 4 %% of intact ankles, "
                        "cases as before")
    p.add_argument("--cast", type=float, default=None, metavar="P",
                   help="probability (0-1) that a vh case wears a plaster cast or a posterior "
                        "splint (150-700 HU, 3-10 mm off the skin), as trauma CTs often do; "
                        "recorded in the case meta. The analytic family ignores it. Default: "
                        "12 %%, cases as before")
    p.add_argument("--fracture-faces", choices=["corticated", "raw"], default="corticated",
                   help="how fracture faces are drawn: raw (cancellous bone or marrow up to "
                        "the gap, as in an acute fracture, whose margins carry no cortex) or "
                        "corticated (a cortex on every face: a hairline then shows as a dense "
                        "band, the look of a healed fracture). Default corticated: cases as "
                        "before; recorded in the case meta when raw")
    p.add_argument("--preview", action="store_true", help="also write one PNG preview per case")
    p.add_argument("--dicom", action="store_true",
                   help="also write each CT as a DICOM series in DIR/dicom/<id>/")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="cases generated at once, each in its own process (default 1); the "
                        "dataset is the same for any N. A vh case takes one core 15-25 s at "
                        "fast spacing; 2 workers on 2 cores made 16 of them in 3 min (12 s a "
                        "case)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from AnkleFractureLib.phantom.dataset_writer import write_phantom_dataset

    if args.n < 1:
        raise SystemExit("ankle-fracture phantom: error: --n must be at least 1")
    if not 0.0 <= args.confounders <= 1.0:
        raise SystemExit("ankle-fracture phantom: error: --confounders must be in [0, 1]")
    if not 0.0 <= args.forefoot <= 1.0:
        raise SystemExit("ankle-fracture phantom: error: --forefoot must be in [0, 1]")
    if args.metal is not None and not 0.0 <= args.metal <= 1.0:
        raise SystemExit("ankle-fracture phantom: error: --metal must be in [0, 1]")
    if args.cast is not None and not 0.0 <= args.cast <= 1.0:
        raise SystemExit("ankle-fracture phantom: error: --cast must be in [0, 1]")
    if args.workers < 1:
        raise SystemExit("ankle-fracture phantom: error: --workers must be at least 1")
    ds = write_phantom_dataset(args.out, n=args.n, seed=args.seed, weber=args.weber,
                               side=args.side, spacing=args.spacing, preview=args.preview,
                               dicom=args.dicom, family=args.family, fractures=args.fractures,
                               confounders=args.confounders, forefoot=args.forefoot,
                               metal=args.metal, cast=args.cast, workers=args.workers,
                               fracture_faces=args.fracture_faces,
                               progress=ProgressBar("phantom", enabled=not args.quiet))
    counts = ds.counts()
    print(f"{ds.root}: {counts['cases']} cases "
          f"(none {counts['weber_none']}, A {counts['weber_A']}, B {counts['weber_B']}, "
          f"C {counts['weber_C']})")
    return 0
