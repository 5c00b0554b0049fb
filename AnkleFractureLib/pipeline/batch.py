"""Batch analysis of many ankle CTs: one output folder per case and one ``results.csv``.

::

    from AnkleFractureLib.pipeline.batch import discover_inputs, run_batch
    from AnkleFractureLib.pipeline.pipeline import PipelineOptions

    cases = discover_inputs(["/data/ankles/", "/data/extra/ct_017.nii.gz"])
    summary = run_batch(cases, "/data/ankle_results", PipelineOptions(device="auto"),
                        progress=lambda f, m: print(f"{100 * f:5.1f}% {m}"))
    print(summary.csv_path, summary.n_ok, summary.n_refused, summary.n_error)

The same two calls work in the 3D Slicer Python console (keep ``workers=1`` there: worker
processes are started with the ``spawn`` method, which needs a plain Python interpreter, and
a script that uses them must guard its top level with ``if __name__ == "__main__":``), and
``ankle-fracture batch INPUTS... --out DIR`` is their command line.

Inputs (:func:`discover_inputs`) are image files (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd),
DICOM folders (a folder that directly holds a file with the DICOM magic or a DICOM extension;
it is one case, read recursively by :func:`~AnkleFractureLib.io.read_dicom_series`), or plain
folders searched recursively for both. Every case gets a stable, file-system-safe id, which
names its output folder ``OUT/<id>/`` (the files of
:func:`~AnkleFractureLib.pipeline.pipeline.write_outputs`).

:func:`run_batch` never stops for a bad case: an unreadable file, a missing path or an
unexpected exception becomes a row with status ``error`` (the traceback of an unexpected one
goes to ``OUT/<id>/error.txt``), and a scan the safety checks refuse is a row with status
``refused`` and no class. ``OUT/results.csv`` is rewritten atomically after every finished
case, so an interrupted batch leaves a valid table of what finished. A second run resumes: a
case whose ``result.json`` exists, parses, names the same input and is newer than it, made with
the same model weights, is not run again (a changed ``side`` or ``tta`` is not noticed: pass
``resume=False``).

Engines: ``engine="local"`` (default) runs the cases in this process or in ``workers`` processes
of this machine; ``engine="ray"`` runs them on Ray actors, locally or on a cluster, with the
same folders and rows (:mod:`~AnkleFractureLib.pipeline.ray_engine`; the ``distributed``
extra). ``shard=(K, N)`` runs the K-th of N parts of the cases, for a Slurm array or any other
scheduler, into ``results.shard-K-of-N.csv``; a later run without a shard collects them
(:mod:`~AnkleFractureLib.pipeline.shards`).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import csv
import io
import json
import os
import re
import time
import traceback
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from AnkleFractureLib.errors import AnkleFractureError, CancelledError, InputError, PathLike
from AnkleFractureLib.io.atomic import atomic_write_text, split_extension
from AnkleFractureLib.io.dicom import DICOM_EXTENSIONS, has_dicom_magic
from AnkleFractureLib.io.files import SUPPORTED_EXTENSIONS
from AnkleFractureLib.pipeline.pipeline import PipelineOptions

ProgressCallback = Callable[[float, str], None]
CancelCheck = Callable[[], bool]

#: Columns of ``results.csv``, in order.
CSV_COLUMNS = ("id", "path", "status", "prediction", "p_none", "p_A", "p_B", "p_C", "unsure",
               "side", "warnings", "refusal", "error", "seconds")

#: Name of the summary table in the batch output folder.
CSV_NAME = "results.csv"

#: Weber classes in the order of the probability columns.
_CLASSES = ("none", "A", "B", "C")

#: Case ids that would clash with the batch's own files.
_RESERVED_IDS = {CSV_NAME.lower()}

#: Files that only index a DICOM medium (not images); they do not make a folder a DICOM case.
_DICOM_INDEX_NAMES = {"dicomdir"}


# ---------------------------------------------------------------------- discovery
@dataclass
class BatchCase:
    """One input of a batch.

    Attributes:
        id: File-system-safe, unique name of the case (its output folder's name).
        path: Absolute path of the image file or DICOM folder.
        kind: "file", "dicom" or "missing" (the given path does not exist).
    """

    id: str
    path: Path
    kind: str


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image_file(name: str) -> bool:
    return split_extension(name)[1] in SUPPORTED_EXTENSIONS


def _claims_dicom(path: str, name: str) -> bool:
    """True for a file with a DICOM extension or the DICM magic at byte 128 (132 bytes read)."""
    if name.lower() in _DICOM_INDEX_NAMES:
        return False
    if os.path.splitext(name)[1].lower() in DICOM_EXTENSIONS:
        return True
    return has_dicom_magic(path)


def _entries(folder: str) -> List[os.DirEntry]:
    """The folder's visible entries sorted by name (unreadable folders give none)."""
    try:
        with os.scandir(folder) as it:
            entries = [e for e in it if not _is_hidden(e.name)]
    except OSError:
        return []
    return sorted(entries, key=lambda e: e.name)


def _holds_dicom(entries: Sequence[os.DirEntry]) -> bool:
    """True when one of the folder's files is DICOM (stops at the first; image files skipped)."""
    for e in entries:
        with contextlib.suppress(OSError):
            if e.is_file() and not _is_image_file(e.name) and _claims_dicom(e.path, e.name):
                return True
    return False


def _scan_folder(folder: str, found: List[Tuple[str, str]], visited: Set[str]) -> None:
    """Append (absolute path, kind) of every case under ``folder`` to ``found``.

    ``visited`` holds the real paths of folders already searched or excluded.
    """
    real = os.path.realpath(folder)
    if real in visited:  # a symbolic link loop, the same folder reached twice, or excluded
        return
    visited.add(real)
    entries = _entries(folder)
    if _holds_dicom(entries):
        found.append((folder, "dicom"))
        # Image files beside the slices are cases of their own; sub-folders belong to the
        # series (the DICOM reader searches them).
        found.extend((e.path, "file") for e in entries
                     if _is_image_file(e.name) and e.is_file())
        return
    for e in entries:
        try:
            if e.is_dir():
                _scan_folder(e.path, found, visited)
            elif e.is_file() and _is_image_file(e.name):
                found.append((e.path, "file"))
        except OSError:
            continue


def _is_reserved(cid: str) -> bool:
    """True for an id that would clash with the batch's own tables."""
    from AnkleFractureLib.pipeline.shards import SHARD_CSV_RE

    return cid.lower() in _RESERVED_IDS or SHARD_CSV_RE.fullmatch(cid) is not None


def _base_id(path: str, kind: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    stem = name if kind == "dicom" or os.path.isdir(path) else split_extension(name)[0]
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".")
    return safe or "case"


def _unique_ids(items: Sequence[Tuple[str, str]]) -> List[str]:
    """Ids in discovery order; duplicates (case-insensitively) get "_2", "_3", ..."""
    used: Set[str] = set()
    ids = []
    for path, kind in items:
        base = _base_id(path, kind)
        cid, n = base, 1
        while cid.lower() in used or _is_reserved(cid):
            n += 1
            cid = f"{base}_{n}"
        used.add(cid.lower())
        ids.append(cid)
    return ids


def discover_inputs(inputs: Sequence[PathLike], *, exclude: Sequence[PathLike] = ()
                    ) -> List[BatchCase]:
    """Turn files and folders into the cases of a batch.

    Each input is an image file, a DICOM folder (a folder that directly holds a file with the
    DICOM magic ``DICM`` at byte 128 or a .dcm/.dicom/.ima extension; checked on the first such
    file only, nothing is parsed), or a plain folder searched recursively (sorted by name) for
    image files and DICOM folders. A DICOM folder is one case and is not searched further (its
    image files, if any, are cases too). Hidden files and folders, ``.raw``/``.zraw`` data files
    of ``.mhd``/``.nhdr`` headers and any other files inside searched folders are skipped; a
    file given explicitly is always a case (an unreadable one becomes an error row). A given
    path that does not exist becomes a case of kind "missing". The same path reached twice is
    one case.

    Args:
        inputs: Files and folders, in the order the cases should run.
        exclude: Folders not to search (e.g. the batch's output folder when it lies inside
            an input folder, so that its segmentations are not taken for CTs).

    Returns:
        The cases: inputs in the given order, each folder's cases sorted. Ids are the file name
        without its extension (".nii.gz" counts as one) or the folder's name, characters
        outside ``[A-Za-z0-9._-]`` replaced by "_", duplicates suffixed "_2", "_3", ...

    Raises:
        InputError: No inputs were given, or none of them holds a case (naming the first
            input folder where nothing was found).

    Example:
        >>> discover_inputs(["/no/such/ct.nii.gz"])[0].kind
        'missing'
    """
    found: List[Tuple[str, str]] = []
    visited: Set[str] = {os.path.realpath(os.fspath(x)) for x in exclude}
    empty: List[str] = []
    for item in inputs:
        path = os.path.abspath(os.fspath(item))
        if not os.path.exists(path):
            found.append((path, "missing"))
        elif os.path.isdir(path):
            before = len(found)
            _scan_folder(path, found, visited)
            if len(found) == before:
                empty.append(path)
        else:
            found.append((path, "file"))
    unique: List[Tuple[str, str]] = []
    seen: Set[str] = set()
    for path, kind in found:
        key = os.path.normcase(os.path.realpath(path))
        if key not in seen:
            seen.add(key)
            unique.append((path, kind))
    if not unique:
        if empty:
            raise InputError(empty[0], "no CT image files or DICOM folders found")
        raise InputError(None, "no inputs given")
    return [BatchCase(cid, Path(path), kind)
            for cid, (path, kind) in zip(_unique_ids(unique), unique)]


# ---------------------------------------------------------------------- rows
@dataclass
class BatchSummary:
    """What :func:`run_batch` did.

    Attributes:
        rows: One dict per case (keys :data:`CSV_COLUMNS`, string values), in case order;
            exactly the rows of ``results.csv``.
        csv_path: The ``results.csv`` written.
        n_ok: Cases classified (this run or resumed).
        n_refused: Cases the safety checks refused (no class).
        n_error: Cases that failed (unreadable, missing, or an unexpected exception).
        n_skipped: Cases not run again because a previous run (or another shard) finished
            them: their folders were reused as they were, nothing was recomputed.
        seconds: Wall-clock time of the whole batch (s).
        warnings: Notes about the batch as a whole.
        engine: "local" or "ray".
        shard: (K, N) when the batch ran one shard, else None.
        retried: Case attempts run again because their Ray worker died.
    """

    rows: List[Dict[str, str]]
    csv_path: Path
    n_ok: int = 0
    n_refused: int = 0
    n_error: int = 0
    n_skipped: int = 0
    seconds: float = 0.0
    warnings: List[str] = field(default_factory=list)
    engine: str = "local"
    shard: Optional[Tuple[int, int]] = None
    retried: int = 0


def _status_of(data: Dict[str, Any]) -> Optional[str]:
    """"refused" / "ok" for a result.json dict, None when it holds neither."""
    if data.get("refused"):
        return "refused"
    if data.get("prediction") is not None and data.get("probabilities"):
        return "ok"
    return None


def _row(case: BatchCase, data: Optional[Dict[str, Any]], error: Optional[str],
         seconds: float) -> Dict[str, str]:
    """The CSV row of a case from its result.json dict (or its error)."""
    row = {name: "" for name in CSV_COLUMNS}
    row.update(id=case.id, path=str(case.path), seconds=f"{float(seconds):.2f}")
    status = None if data is None else _status_of(data)
    if error is not None or data is None or status is None:
        row.update(status="error", error=error or "the result holds neither a class nor a "
                                                  "refusal")
        return row
    row["status"] = status
    probabilities = data.get("probabilities") or {}
    for name in _CLASSES:
        if probabilities.get(name) is not None:
            row[f"p_{name}"] = f"{float(probabilities[name]):.4f}"
    row["prediction"] = data.get("prediction") or ""
    unsure = (data.get("uncertainty") or {}).get("unsure")
    if status == "ok" and unsure is not None:
        row["unsure"] = "true" if unsure else "false"
    row["side"] = data.get("side") or ""
    row["warnings"] = " | ".join(str(w) for w in data.get("warnings") or [])
    row["refusal"] = data.get("refusal") or ""
    return row


def _write_csv(path: Path, rows: Sequence[Optional[Dict[str, str]]]) -> None:
    """Write the finished rows (None: not finished yet) atomically, in case order."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(r for r in rows if r is not None)
    atomic_write_text(path, buf.getvalue())


# ---------------------------------------------------------------------- resume
def _same_path(a: Any, b: Path) -> bool:
    if not isinstance(a, str) or not a:
        return False
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(str(b))


def _current_model_hashes(options: PipelineOptions) -> Dict[str, Optional[str]]:
    """SHA-256 of the weights the batch would use ({} when they cannot be told)."""
    from AnkleFractureLib.pipeline.pipeline import Pipeline

    try:
        info = Pipeline(options).model_info()
    except Exception:  # noqa: BLE001 - resume then trusts the folder; loading reports it later
        return {}
    return {name: (entry or {}).get("sha256") for name, entry in info.items()}


def _finished_result(case: BatchCase, out_dir: Path, hashes: Dict[str, Optional[str]]
                     ) -> Optional[Dict[str, Any]]:
    """The result.json dict of a case a previous run finished, else None."""
    if case.kind == "missing":
        return None
    path = out_dir / case.id / "result.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        newer = path.stat().st_mtime >= case.path.stat().st_mtime
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not newer or _status_of(data) is None:
        return None
    if not _same_path((data.get("input") or {}).get("ct"), case.path):
        return None
    for name, sha in hashes.items():  # made with other weights: run again
        entry = (data.get("models") or {}).get(name) or {}
        if entry.get("used") and sha and entry.get("sha256") != sha:
            return None
    return data


# ---------------------------------------------------------------------- one case
def _error_text(case: BatchCase, message: str, tb: Optional[str]) -> str:
    text = f"{case.path}\n{message}\n"
    return text + ("\n" + tb if tb else "")


def _process_case(pipeline: Any, case: BatchCase, out_dir: Path, report_pdf: bool,
                  progress: Optional[ProgressCallback] = None,
                  should_cancel: Optional[CancelCheck] = None) -> Dict[str, Any]:
    """Read, analyse and write one case; never raises except on cancellation.

    Returns:
        {"data": the result.json dict or None, "error": message or None, "seconds": wall s}.

    Raises:
        CancelledError: ``should_cancel`` returned True.
        KeyboardInterrupt: Passed through.
    """
    from AnkleFractureLib.io import read_image
    from AnkleFractureLib.pipeline.pipeline import write_outputs

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(fraction, message)

    t0 = time.perf_counter()
    case_dir = out_dir / case.id
    data: Optional[Dict[str, Any]] = None
    error: Optional[str] = None
    tb: Optional[str] = None
    try:
        if case.kind == "missing":
            raise InputError(case.path, "does not exist")
        report(0.0, "reading")
        ct = read_image(str(case.path))

        def stage(fraction: float, message: str) -> None:
            report(0.03 + 0.92 * fraction, message)

        result = pipeline.run(ct, progress=stage, should_cancel=should_cancel)
        report(0.96, "writing")
        data = write_outputs(result, case_dir, ct, report_pdf=report_pdf)
    except CancelledError:
        raise
    except AnkleFractureError as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad case must not stop the batch
        error = f"internal error: {type(exc).__name__}: {exc}"
        tb = traceback.format_exc()
    if error is not None:
        # The folder must not claim an older success beside this failure.
        with contextlib.suppress(OSError):
            os.remove(case_dir / "result.json")
        with contextlib.suppress(OSError, AnkleFractureError):
            atomic_write_text(case_dir / "error.txt", _error_text(case, error, tb))
    else:
        with contextlib.suppress(OSError):
            os.remove(case_dir / "error.txt")
    report(1.0, "error" if error else "refused" if data and data.get("refused") else "done")
    return {"data": data, "error": error, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------- worker processes
_WORKER: Dict[str, Any] = {}


def _worker_init(options: PipelineOptions, n_workers: int, cancel_event: Any) -> None:
    """Process-pool initializer: one Pipeline per worker, CPU threads shared out."""
    import signal

    from AnkleFractureLib.parallel import share_threads

    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the parent's to handle
    share_threads(n_workers)
    from AnkleFractureLib.pipeline.pipeline import Pipeline

    _WORKER["pipeline"] = Pipeline(options)
    _WORKER["cancel"] = cancel_event


def _worker_run(case: BatchCase, out_dir: str, report_pdf: bool) -> Dict[str, Any]:
    """One case in a worker process; returns plain data (see :func:`_process_case`)."""
    event = _WORKER.get("cancel")
    if event is not None and event.is_set():  # queued before the batch was cancelled
        return {"data": None, "error": None, "seconds": 0.0, "cancelled": True}
    try:
        return _process_case(_WORKER["pipeline"], case, Path(out_dir), report_pdf,
                             should_cancel=None if event is None else event.is_set)
    except CancelledError:
        return {"data": None, "error": None, "seconds": 0.0, "cancelled": True}


# ---------------------------------------------------------------------- the batch
def _check_models(options: PipelineOptions) -> None:
    """Fail before the batch when the device or a model folder cannot be used."""
    from dataclasses import replace

    from AnkleFractureLib.pipeline.pipeline import Pipeline
    from AnkleFractureLib.segmentation.inference import resolve_device

    resolve_device(options.device)
    probe = Pipeline(replace(options, device="cpu"))
    _ = (probe.segmentation_model, probe.classifier, probe.template)


#: Engines of :func:`run_batch`.
ENGINES = ("local", "ray")


def _check_cases(cases: Sequence[BatchCase]) -> None:
    """InputError unless the ids are unique and can name output folders."""
    ids = [c.id.lower() for c in cases]
    if len(set(ids)) != len(ids):
        raise InputError(None, "case ids are not unique")
    for c in cases:
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", c.id) or _is_reserved(c.id):
            raise InputError(c.path, f"case id {c.id!r} cannot name an output folder")


def _output_folder(out_dir: PathLike) -> Path:
    """The absolute output folder, created (InputError when a file has its name)."""
    out = Path(os.path.abspath(os.fspath(out_dir)))
    if out.exists() and not out.is_dir():
        raise InputError(out, "the output must be a folder, but a file of that name exists")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _reuse_finished(cases: Sequence[BatchCase], out: Path, options: PipelineOptions,
                    resume: bool, rows: List[Optional[Dict[str, str]]]) -> List[int]:
    """Fill ``rows`` for the cases a previous run finished; returns the indices left to run."""
    todo: List[int] = []
    hashes: Dict[str, Optional[str]] = {}
    if resume and any((out / c.id / "result.json").is_file() for c in cases):
        hashes = _current_model_hashes(options)
    for i, case in enumerate(cases):
        data = _finished_result(case, out, hashes) if resume else None
        if data is not None:
            seconds = float((data.get("timings_s") or {}).get("total", 0.0))
            rows[i] = _row(case, data, None, seconds)
        else:
            todo.append(i)
    return todo


def _collect_unfinished(cases: Sequence[BatchCase], todo: Sequence[int], out: Path,
                        rows: List[Optional[Dict[str, str]]]) -> List[int]:
    """``collect_only``: fill the rows of the unfinished cases of ``todo`` without running
    them; returns the cases left to run (none)."""
    from AnkleFractureLib.pipeline.shards import read_shard_rows

    shard_rows = read_shard_rows(out)
    for i in todo:
        rows[i] = _collected_row(cases[i], shard_rows)
    return []


def _collected_row(case: BatchCase, shard_rows: Dict[str, Dict[str, str]]) -> Dict[str, str]:
    """The row of a case that ``collect_only`` does not run: its shard's error row, or one
    saying that it has not run."""
    old = shard_rows.get(case.id.lower())
    if old is not None and old.get("status") == "error" and old.get("error"):
        return _row(case, None, old["error"], float(old.get("seconds") or 0.0))
    return _row(case, None, f"{case.path}: not analysed yet (no finished result in its "
                            f"folder {case.id}/); run the batch or its shard again", 0.0)


def _tally(summary: BatchSummary, rows: Sequence[Optional[Dict[str, str]]]) -> None:
    summary.rows = [r for r in rows if r is not None]
    for r in summary.rows:
        if r["status"] == "ok":
            summary.n_ok += 1
        elif r["status"] == "refused":
            summary.n_refused += 1
        else:
            summary.n_error += 1


def run_batch(cases: Sequence[BatchCase], out_dir: PathLike,
              options: Optional[PipelineOptions] = None, *, workers: Optional[int] = None,
              resume: bool = True, report_pdf: bool = False,
              progress: Optional[ProgressCallback] = None,
              should_cancel: Optional[CancelCheck] = None, engine: str = "local",
              shard: Optional[Tuple[int, int]] = None, collect_only: bool = False,
              ray_address: Optional[str] = None, cpus_per_worker: float = 1.0,
              gpus_per_worker: float = 0.0, max_retries: int = 2) -> BatchSummary:
    """Analyse every case into ``out_dir/<id>/`` and tabulate them in ``out_dir/results.csv``.

    Args:
        cases: From :func:`discover_inputs` (ids unique, made of ``[A-Za-z0-9._-]``).
        out_dir: Output folder (created).
        options: Pipeline settings, the same for every case (default: :class:`PipelineOptions`).
        workers: Local engine: None or 1: in this process with one :class:`Pipeline` for every
            case; N > 1: N ``spawn`` worker processes, each with its own Pipeline and
            ``cpu_count // N`` torch threads (not inside 3D Slicer). Ray engine: the number of
            Ray actors (None: as many as the cluster holds).
        resume: Skip cases a previous run finished (see the module docstring); False runs
            every case again.
        report_pdf: Also write ``report.pdf`` per case.
        progress: Called with (fraction of the whole batch in [0, 1], message naming the case).
        should_cancel: Polled between cases and, within a case, between the stages and the
            segmentation patches (Ray: about 4 times a second); True cancels.
        engine: "local" (this machine) or "ray" (Ray actors: see
            :mod:`~AnkleFractureLib.pipeline.ray_engine`; needs the ``distributed`` extra).
        shard: (K, N): only the K-th of N parts of ``cases`` (1-based; see
            :mod:`~AnkleFractureLib.pipeline.shards`), tabulated in
            ``results.shard-K-of-N.csv`` instead of ``results.csv``.
        collect_only: Run nothing: tabulate the finished cases (e.g. of every shard); the
            others get error rows (a shard's error, or "not analysed yet").
        ray_address: Ray engine: the cluster to join ("auto", "ray://head:10001"); None: the
            Ray already initialised in this process, else a local runtime for this batch.
        cpus_per_worker: Ray engine: CPUs (and torch threads) of each actor.
        gpus_per_worker: Ray engine: GPUs of each actor (0: CPU-only workers).
        max_retries: Ray engine: times a case is run again after its worker died.

    Returns:
        The :class:`BatchSummary`; the CSV holds the same rows.

    Raises:
        InputError: ``out_dir`` is a file, ``workers`` < 1, bad ids, an unknown engine or
            shard, Ray is not installed (engine "ray"), or the device or a model folder
            cannot be used (checked before the first case runs).
        CancelledError: Cancelled (``should_cancel`` or Ctrl+C); the CSV then holds the rows
            finished so far.
    """
    from AnkleFractureLib.pipeline.shards import check_shard, select_shard, shard_csv_name

    t0 = time.perf_counter()
    options = options or PipelineOptions()
    settings = _engine_settings(engine, ray_address, workers, cpus_per_worker,
                                gpus_per_worker, max_retries)
    shard = None if shard is None else check_shard(shard)
    cases = list(cases)
    _check_cases(cases)
    cases = select_shard(cases, shard)
    out = _output_folder(out_dir)
    summary = BatchSummary(rows=[], csv_path=out / shard_csv_name(shard), engine=engine,
                           shard=shard)

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(min(max(float(fraction), 0.0), 1.0), message)

    n = max(len(cases), 1)
    rows: List[Optional[Dict[str, str]]] = [None] * len(cases)
    todo = _reuse_finished(cases, out, options, resume or collect_only, rows)
    summary.n_skipped = len(cases) - len(todo)
    if collect_only:
        todo = _collect_unfinished(cases, todo, out, rows)
    _write_csv(summary.csv_path, rows)
    head = f"shard {shard[0]}/{shard[1]}: " if shard else ""
    report(summary.n_skipped / n, f"{head}{summary.n_skipped} of {len(cases)} cases already "
           f"done" if summary.n_skipped else f"{head}{len(cases)} cases")

    def finish(i: int, outcome: Dict[str, Any]) -> None:
        rows[i] = _row(cases[i], outcome.get("data"), outcome.get("error"),
                       outcome.get("seconds", 0.0))
        _write_csv(summary.csv_path, rows)

    if todo:
        _run_todo(cases, todo, out, options, workers, report_pdf, finish, report, n,
                  summary, should_cancel, settings)
    _tally(summary, rows)
    summary.seconds = time.perf_counter() - t0
    report(1.0, f"done: {summary.n_ok} classified, {summary.n_refused} refused, "
                f"{summary.n_error} failed")
    return summary


def _engine_settings(engine: str, address: Optional[str], workers: Optional[int],
                     cpus_per_worker: float, gpus_per_worker: float, max_retries: int) -> Any:
    """Check the engine and its settings; the Ray engine's settings (None for local)."""
    if engine not in ENGINES:
        raise InputError(None, f"unknown batch engine {engine!r}: use local or ray")
    if workers is not None and int(workers) < 1:
        raise InputError(None, f"workers must be >= 1, got {workers}")
    if engine != "ray":
        return None
    from AnkleFractureLib.pipeline.ray_engine import RaySettings, import_ray

    import_ray()  # not installed: say how to install it before anything is written
    settings = RaySettings(address=address, workers=workers,
                           cpus_per_worker=float(cpus_per_worker),
                           gpus_per_worker=float(gpus_per_worker), max_retries=int(max_retries))
    settings.check()
    return settings


def _run_todo(cases: Sequence[BatchCase], todo: Sequence[int], out: Path,
              options: PipelineOptions, workers: Optional[int], report_pdf: bool,
              finish: Callable[[int, Dict[str, Any]], None], report: ProgressCallback,
              n: int, summary: BatchSummary, should_cancel: Optional[CancelCheck],
              settings: Any) -> None:
    """Run the cases of ``todo`` with the summary's engine."""
    done = summary.n_skipped
    if summary.engine == "ray":
        from AnkleFractureLib.pipeline.ray_engine import run_on_ray

        info = run_on_ray(cases, todo, out, options, report_pdf, finish, report, n, done,
                          should_cancel, settings)
        summary.retried = info.retried
        summary.warnings.extend(info.warnings)
    elif not workers or int(workers) == 1 or len(todo) == 1:
        _run_here(cases, todo, out, options, report_pdf, finish, report, n, done,
                  should_cancel)
    else:
        _run_pool(cases, todo, out, options, int(workers), report_pdf, finish, report, n,
                  done, should_cancel)


def _run_here(cases: Sequence[BatchCase], todo: Sequence[int], out: Path,
              options: PipelineOptions, report_pdf: bool,
              finish: Callable[[int, Dict[str, Any]], None],
              report: ProgressCallback, n: int, done: int,
              should_cancel: Optional[CancelCheck]) -> None:
    """The cases of ``todo`` one after the other in this process, with one Pipeline."""
    from AnkleFractureLib.pipeline.pipeline import Pipeline

    pipeline = Pipeline(options)
    if any(cases[i].kind != "missing" for i in todo):
        report(done / n, "loading the models")  # a bad model folder stops the batch here
        _ = (pipeline.segmentation_model, pipeline.classifier, pipeline.template)
    try:
        for k, i in enumerate(todo):
            if should_cancel is not None and should_cancel():
                raise CancelledError("the batch was cancelled")
            case = cases[i]
            lo = (done + k) / n
            head = f"{case.id} ({done + k + 1}/{len(cases)})"

            def case_progress(fraction: float, message: str, lo: float = lo,
                              head: str = head) -> None:
                report(lo + fraction / n, f"{head}: {message}" if message else head)

            outcome = _process_case(pipeline, case, out, report_pdf, case_progress,
                                    should_cancel)
            finish(i, outcome)
    except KeyboardInterrupt:
        raise CancelledError("the batch was interrupted") from None


def _run_pool(cases: Sequence[BatchCase], todo: Sequence[int], out: Path,
              options: PipelineOptions, workers: int, report_pdf: bool,
              finish: Callable[[int, Dict[str, Any]], None],
              report: ProgressCallback, n: int, done: int,
              should_cancel: Optional[CancelCheck]) -> None:
    """The cases of ``todo`` in ``workers`` spawned processes; rows are written here."""
    import multiprocessing

    if any(cases[i].kind != "missing" for i in todo):
        report(done / n, "checking the models")
        _check_models(options)
    ctx = multiprocessing.get_context("spawn")
    cancel_event = ctx.Event()
    n_workers = min(workers, len(todo))
    report(done / n, f"starting {n_workers} worker processes")
    pool = cf.ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx,
                                  initializer=_worker_init,
                                  initargs=(options, n_workers, cancel_event))
    futures = {pool.submit(_worker_run, cases[i], str(out), report_pdf): i for i in todo}
    pending = set(futures)
    cancelled = False

    def outcome_of(fut: "cf.Future[Dict[str, Any]]") -> Dict[str, Any]:
        try:
            return fut.result()
        except BrokenProcessPool:
            return {"data": None, "seconds": 0.0,
                    "error": "internal error: the worker process stopped unexpectedly (out "
                             "of memory, or killed?); run the batch again to retry this case"}
        except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable result
            return {"data": None, "seconds": 0.0,
                    "error": f"internal error: {type(exc).__name__}: {exc}"}

    try:
        while pending:
            if should_cancel is not None and should_cancel():
                cancelled = True
                break
            finished, pending = cf.wait(pending, timeout=0.25,
                                        return_when=cf.FIRST_COMPLETED)
            for fut in sorted(finished, key=lambda f: futures[f]):
                i = futures[fut]
                outcome = outcome_of(fut)
                if outcome.get("cancelled"):
                    cancelled = True
                    continue
                finish(i, outcome)
                done += 1
                status = "error" if outcome.get("error") else "done"
                report(done / n, f"{cases[i].id} ({done}/{len(cases)}): {status}")
    except KeyboardInterrupt:
        cancelled = True
    finally:
        if pending:
            cancel_event.set()  # running cases stop between stages / segmentation patches
            for fut in pending:
                fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
    if cancelled:
        # Cases that finished while the pool wound down still get their rows.
        for fut in sorted(pending, key=lambda f: futures[f]):
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                outcome = fut.result()
                if not outcome.get("cancelled"):
                    finish(futures[fut], outcome)
        raise CancelledError("the batch was cancelled")
