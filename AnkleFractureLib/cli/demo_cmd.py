"""``ankle-fracture demo``: the whole pipeline on the embedded default (the ankle CT phantom).

Generates one synthetic ankle CT per Danis-Weber class (none, A, B, C; sides alternate, so both
sides are covered), runs the pipeline on them with :func:`~AnkleFractureLib.pipeline.batch.
run_batch` (the same code as ``ankle-fracture batch``) and prints a table that sets each
answer beside the phantom's true class and side.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional

from AnkleFractureLib.cli.progress import ProgressBar

DESCRIPTION = """\
Run the whole pipeline (segment, register, crop, classify, Grad-CAM, report) on synthetic
ankle CT phantoms: one per Danis-Weber class (none, A, B, C), left and right ankles. Needs no
input data and no network; about 10 s per case on a laptop CPU. Writes:
  DIR/phantoms/         the phantoms (dataset layout: images/, labels/, dataset.json,
                        previews/, and with --dicom each CT as a DICOM series in dicom/)
  DIR/results/<case>/   each case's outputs, as 'ankle-fracture run' writes them
  DIR/results/results.csv  one row per case, as 'ankle-fracture batch' writes it
A second run with the same --out and --seed reuses the finished cases."""

EXAMPLES = """\
examples:
  ankle-fracture demo
  ankle-fracture demo --out demo_output --dicom --pdf
  ankle-fracture demo --n 8 --seed 7 --device cuda"""


def add_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("demo", help="the whole pipeline on synthetic ankle CT phantoms",
                       description=DESCRIPTION, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_output", metavar="DIR",
                   help="output folder (default: demo_output)")
    p.add_argument("--n", type=int, default=4,
                   help="number of phantoms (default 4: one per class; classes cycle)")
    p.add_argument("--seed", type=int, default=2026, help="phantom seed (default 2026)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto (default: CUDA when available), cpu or cuda")
    p.add_argument("--dicom", action="store_true",
                   help="write the phantoms as DICOM series too and analyse those "
                        "(exercises the DICOM reader)")
    p.add_argument("--pdf", action="store_true", help="also write report.pdf per case")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _answer(row: Dict[str, str]) -> str:
    """The table's answer cell: 'B 97%', 'B 55% unsure', 'refused', 'error'."""
    if row.get("status") == "ok":
        p = row.get(f"p_{row['prediction']}") or "0"
        unsure = " unsure" if row.get("unsure") in ("True", "true", "1") else ""
        return f"{row['prediction']} {100.0 * float(p):.0f}%{unsure}"
    return row.get("status") or "?"


def _records(ds: Any, n: int, seed: int) -> List[Any]:
    """The dataset's first ``n`` phantoms of ``seed``, in index order."""
    return [rec for rec in ds if rec.meta.get("dataset_seed") == seed
            and rec.meta.get("dataset_index", n) < n]


def _existing_phantoms(folder: Path, n: int, seed: int, dicom: bool) -> Optional[Any]:
    """The dataset in ``folder`` when it already holds these ``n`` phantoms (files included)."""
    from AnkleFractureLib.dataset import Dataset
    from AnkleFractureLib.errors import InputError

    if not (folder / "dataset.json").is_file():
        return None
    try:
        ds = Dataset.load(folder)
    except InputError:
        return None
    records = _records(ds, n, seed)
    if len(records) < n or not all((ds.root / rec.image).is_file() for rec in records):
        return None
    if dicom and not all((ds.root / "dicom" / rec.id).is_dir() for rec in records):
        return None
    return ds


def run(args: argparse.Namespace) -> int:
    from AnkleFractureLib.errors import InputError
    from AnkleFractureLib.phantom.dataset_writer import write_phantom_dataset
    from AnkleFractureLib.pipeline.batch import BatchCase, run_batch
    from AnkleFractureLib.pipeline.pipeline import PipelineOptions

    if args.n < 1:
        raise InputError(None, f"--n must be at least 1, got {args.n}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "--out must be a folder, but a file of that name exists")
    ds = _existing_phantoms(out / "phantoms", args.n, args.seed, args.dicom)
    if ds is None:  # same seed, same images: a second demo reuses them (and their results)
        gen = ProgressBar("phantoms", enabled=not args.quiet)
        ds = write_phantom_dataset(out / "phantoms", n=args.n, seed=args.seed, spacing="fast",
                                   preview=True, dicom=args.dicom, progress=gen)
    records = _records(ds, args.n, args.seed)
    cases: List[BatchCase] = []
    for rec in records:
        if args.dicom:
            cases.append(BatchCase(rec.id, (ds.root / "dicom" / rec.id).resolve(), "dicom"))
        else:
            cases.append(BatchCase(rec.id, (ds.root / rec.image).resolve(), "file"))
    bar = ProgressBar("pipeline", enabled=not args.quiet)
    summary = run_batch(cases, out / "results", PipelineOptions(device=args.device),
                        report_pdf=args.pdf, progress=bar)

    rows = {row["id"]: row for row in summary.rows}
    header = (f"{'case':<18} {'true':<5} {'side':<6} {'answer':<15} {'found side':<11} "
              f"{'time':>6}  report")
    print(f"\nAnkleFracture demo: {len(records)} synthetic ankle CT cases\n")
    print(header)
    print("-" * len(header))
    correct = 0
    for rec in records:
        row = rows.get(rec.id, {})
        answer = _answer(row)
        if row.get("status") == "ok" and row.get("prediction") == rec.weber:
            correct += 1
        seconds = row.get("seconds") or ""
        seconds = f"{float(seconds):5.1f}s" if seconds else ""
        report = out / "results" / rec.id / "report.png"
        print(f"{rec.id:<18} {rec.weber or '-':<5} {rec.side or '-':<6} {answer:<15} "
              f"{row.get('side') or '-':<11} {seconds:>6}  {report if report.exists() else '-'}")
        if row.get("status") == "error":
            print(f"  error: {row.get('error')}")
        elif row.get("status") == "refused":
            print(f"  refused: {row.get('refusal')}")
    print(f"\n{correct} of {len(records)} classified as their true class. "
          f"Table: {summary.csv_path}")
    print("Synthetic phantoms and phantom-trained models: a demonstration, not patient data "
          "and not for clinical use.")
    return 0
