"""``ankle-fracture demo``: the main job on the embedded default (the ankle CT phantom).

For now the demo generates one phantom case per Danis-Weber class (both sides) with previews
and prints a summary table. Later stages (segmentation, registration, classification) extend it
to the whole pipeline.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from AnkleFractureLib.cli.progress import ProgressBar


def add_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("demo", help="run the demo on synthetic ankle CT phantoms",
                       description="Generate one synthetic ankle CT per Danis-Weber class "
                                   "(none, A, B, C; both sides) with PNG previews, and print a "
                                   "summary. Needs no input data and no network.",
                       epilog="example:\n  ankle-fracture demo --out demo_output",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_output", metavar="DIR",
                   help="output folder (default: demo_output)")
    p.add_argument("--seed", type=int, default=2026, help="phantom seed (default 2026)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from AnkleFractureLib.phantom.dataset_writer import write_phantom_dataset

    out = Path(args.out)
    ds = write_phantom_dataset(out / "phantoms", n=4, seed=args.seed, spacing="fast",
                               preview=True, progress=ProgressBar("demo", enabled=not args.quiet))
    print(f"\nAnkleFracture demo: {len(ds)} synthetic ankle CT cases in {ds.root}\n")
    header = f"{'case':<20} {'weber':<6} {'side':<6} {'size (x,y,z)':<16} {'spacing mm':<20} preview"
    print(header)
    print("-" * len(header))
    for rec in ds:
        size = "x".join(str(s) for s in rec.meta.get("size_xyz", [])) or "?"
        spacing = ",".join(f"{s:.2f}" for s in rec.meta.get("spacing_mm", [])) or "?"
        preview = ds.root / "previews" / f"{rec.id}.png"
        print(f"{rec.id:<20} {rec.weber or '-':<6} {rec.side or '-':<6} {size:<16} {spacing:<20} "
              f"{preview}")
    print("\nSynthetic phantoms, not patient data. Research software, not for clinical use.")
    return 0
