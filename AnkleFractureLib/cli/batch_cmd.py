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
(--no-resume runs everything).

Engines: 'local' (default) runs on this machine, in this process or in --workers processes.
'ray' runs on Ray actors, each with its own models, on a local Ray runtime started for the
batch or on a running cluster (--ray-address auto); a worker that dies (killed, out of memory)
has its case retried on a new worker (--max-retries). It needs the extra:
pip install "AnkleFractureLib[distributed]". On a cluster --out must be a shared folder.

Shards (any scheduler: a Slurm array, a Kubernetes job index, a loop over machines): --shard
K/N runs the K-th of N parts of the cases (sorted by id, every N-th from the K-th) into the
shared DIR and writes DIR/results.shard-K-of-N.csv. Then the same command without --shard
collects every finished case into DIR/results.csv without recomputing it (and runs only what
failed or never ran; --collect runs nothing). Research software, not for clinical use."""

EXAMPLES = """\
examples:
  ankle-fracture batch scans/ --out results/
  ankle-fracture batch a.nii.gz b.nrrd dicom/patient7/ --out results/ --side left
  ankle-fracture batch scans/ --out results/ --workers 4 --device cpu --quiet
  ankle-fracture batch scans/ --out results/ --no-resume --pdf --cls-model models/cls
  ankle-fracture batch scans/ --out results/ --engine ray --workers 2
  ankle-fracture batch scans/ --out /shared/res/ --engine ray --ray-address auto --gpus-per-worker 1
  ankle-fracture batch scans/ --out /shared/res/ --shard $SLURM_ARRAY_TASK_ID/10
  ankle-fracture batch scans/ --out /shared/res/ --collect"""


def add_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("batch", help="the whole pipeline on many CTs, with a results.csv",
                       description=DESCRIPTION, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUTS",
                   help="CT image files, DICOM folders, or folders holding them")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="cases analysed in parallel, each worker with its own models (default: "
                        "1 for the local engine; for ray as many as the cluster holds)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local (default: this machine) or ray (Ray actors; needs the "
                        "'distributed' extra)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="ray: the cluster to join (auto, ray://head:10001); default: a local "
                        "Ray runtime for this batch")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C",
                   help="ray: CPUs (and torch threads) of each worker (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G",
                   help="ray: GPUs of each worker (default 0: CPU-only workers; 0.5 shares a "
                        "GPU between two)")
    p.add_argument("--max-retries", type=int, default=2, metavar="R",
                   help="ray: times a case is run again after its worker died (default 2)")
    p.add_argument("--shard", metavar="K/N",
                   help="run only the K-th of N parts of the cases (1-based), with its own "
                        "DIR/results.shard-K-of-N.csv")
    p.add_argument("--collect", action="store_true",
                   help="run nothing: tabulate the finished cases (e.g. of every shard) in "
                        "DIR/results.csv")
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


def _check_args(args: argparse.Namespace) -> None:
    """InputError for an option out of range or one that the chosen engine does not use."""
    from AnkleFractureLib.errors import InputError

    if args.workers is not None and args.workers < 1:
        raise InputError(None, f"--workers must be >= 1, got {args.workers}")
    if args.tta is not None and args.tta < 0:
        raise InputError(None, f"--tta must be >= 0, got {args.tta}")
    if args.engine == "ray":
        from AnkleFractureLib.pipeline.ray_engine import import_ray

        import_ray()  # not installed: say how to install it, before searching the inputs
    else:
        ray_only = [name for name, value, default in (
            ("--ray-address", args.ray_address, None), ("--cpus-per-worker",
            args.cpus_per_worker, 1.0), ("--gpus-per-worker", args.gpus_per_worker, 0.0),
            ("--max-retries", args.max_retries, 2)) if value != default]
        if ray_only:
            raise InputError(None, f"{', '.join(ray_only)}: only with --engine ray")
    if args.collect and args.shard:
        raise InputError(None, "--collect gathers every shard: leave out --shard")


def run(args: argparse.Namespace) -> int:
    from AnkleFractureLib.pipeline.batch import discover_inputs, run_batch
    from AnkleFractureLib.pipeline.shards import parse_shard

    _check_args(args)
    shard = None if args.shard is None else parse_shard(args.shard)
    cases = discover_inputs(args.inputs, exclude=[args.out])  # outputs are no inputs
    options = pipeline_options(args)
    bar = ProgressBar("batch", enabled=not args.quiet)
    summary = run_batch(cases, args.out, options, workers=args.workers,
                        resume=not args.no_resume, report_pdf=args.pdf, progress=bar,
                        engine=args.engine, shard=shard, collect_only=args.collect,
                        ray_address=args.ray_address, cpus_per_worker=args.cpus_per_worker,
                        gpus_per_worker=args.gpus_per_worker, max_retries=args.max_retries)
    print("\n".join(table_lines(summary.rows)))
    for warning in summary.warnings:
        print(f"warning: {warning}")
    skipped = f", {summary.n_skipped} of them from a previous run" if summary.n_skipped else ""
    if summary.retried:
        skipped += f", {summary.retried} retried after a worker died"
    n = len(summary.rows)
    where = f"shard {summary.shard[0]}/{summary.shard[1]}: " if summary.shard else ""
    print(f"{where}{n} case{'' if n == 1 else 's'}{skipped}: {summary.n_ok} classified, "
          f"{summary.n_refused} refused, {summary.n_error} failed ({summary.seconds:.1f} s)")
    print(f"wrote {summary.csv_path}")
    print("research software, not for clinical use.")
    return 0
