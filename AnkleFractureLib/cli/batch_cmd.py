"""``ankle-fracture batch``: the whole pipeline on many CTs, one row per case in a CSV."""

from __future__ import annotations

import argparse
from typing import Any, Dict, List

from AnkleFractureLib.cli.common import add_pipeline_options, pipeline_options
from AnkleFractureLib.cli.progress import ProgressBar

DESCRIPTION = """\
Analyse many ankle CTs as 'ankle-fracture run' does, with the models loaded once. INPUTS are
image files (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd), DICOM folders (one case each) and
folders searched recursively for both (hidden files skipped). Each case gets an id (its file
name without the extension, or its folder's name, made unique) and writes into DIR/<id>/ the
files of 'ankle-fracture run' (segmentation.nii.gz, transform.json, transform.tfm,
syndesmosis_crop.nii.gz, gradcam.nii.gz, report.png, result.json), or error.txt when it fails.
DIR/results.csv has one row per case, rewritten after every case:
  id, path, status        status: ok (classified), refused (the safety checks refused the
                          scan: no Weber class, see 'refusal'), error (see 'error')
  prediction, p_none, p_A, p_B, p_C, unsure, side, warnings (joined by ' | '), refusal,
  error, seconds
A bad case never stops the batch, and the exit status is 0 when the batch ran, even when some
cases failed (the summary says how many). Running the same command again resumes: cases with a
result.json for the same input and models are not run again, failed ones are retried
(--no-resume runs everything). Research software, not for clinical use."""

EXAMPLES = """\
examples:
  ankle-fracture batch scans/ --out results/
  ankle-fracture batch a.nii.gz b.nrrd dicom/patient7/ --out results/ --side left
  ankle-fracture batch scans/ --out results/ --workers 4 --device cpu --quiet
  ankle-fracture batch scans/ --out results/ --no-resume --pdf --cls-model models/cls"""


def add_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("batch", help="the whole pipeline on many CTs, with a results.csv",
                       description=DESCRIPTION, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUTS",
                   help="CT image files, DICOM folders, or folders holding them")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="cases analysed in parallel, each worker process with its own models "
                        "(default 1)")
    add_pipeline_options(p, side_help="ankle side for every case (default auto: from the anatomy)")
    p.add_argument("--no-resume", action="store_true",
                   help="run every case again, even those a previous run finished")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def table_lines(rows: List[Dict[str, Any]], width: int = 100) -> List[str]:
    """A short readable table of ``results.csv`` rows (id, status, answer, unsure)."""
    id_w = min(max([len("id")] + [len(r["id"]) for r in rows]), 30)
    head = f"{'id':<{id_w}}  {'status':<8} {'unsure':<6}  result"
    lines = [head, "-" * len(head)]
    for r in rows:
        status = r["status"]
        if status == "ok":
            pred = r["prediction"]
            p = r.get(f"p_{pred}") or ""
            answer = ("no fracture" if pred == "none" else f"Weber {pred}") + \
                (f" ({100 * float(p):.1f}%)" if p else "")
        elif status == "refused":
            answer = "no class: " + (r.get("refusal") or "refused")
        else:
            answer = r.get("error") or "failed"
            prefix = f"{r.get('path')}: "
            if answer.startswith(prefix):  # the path is in the CSV; show the reason
                answer = answer[len(prefix):]
        unsure = "yes" if r.get("unsure") == "true" else ""
        lead = f"{_shorten(r['id'], id_w):<{id_w}}  {status:<8} {unsure:<6}  "
        lines.append(lead + _shorten(answer, max(20, width - len(lead))))
    return lines


def run(args: argparse.Namespace) -> int:
    from AnkleFractureLib.errors import InputError
    from AnkleFractureLib.pipeline.batch import discover_inputs, run_batch

    if args.workers < 1:
        raise InputError(None, f"--workers must be >= 1, got {args.workers}")
    if args.tta is not None and args.tta < 0:
        raise InputError(None, f"--tta must be >= 0, got {args.tta}")
    cases = discover_inputs(args.inputs, exclude=[args.out])  # outputs are no inputs
    options = pipeline_options(args)
    bar = ProgressBar("batch", enabled=not args.quiet)
    summary = run_batch(cases, args.out, options, workers=args.workers,
                        resume=not args.no_resume, report_pdf=args.pdf, progress=bar)
    print("\n".join(table_lines(summary.rows)))
    for warning in summary.warnings:
        print(f"warning: {warning}")
    skipped = f", {summary.n_skipped} of them from a previous run" if summary.n_skipped else ""
    n = len(summary.rows)
    print(f"{n} case{'' if n == 1 else 's'}{skipped}: {summary.n_ok} classified, "
          f"{summary.n_refused} refused, {summary.n_error} failed ({summary.seconds:.1f} s)")
    print(f"wrote {summary.csv_path}")
    print("research software, not for clinical use.")
    return 0
