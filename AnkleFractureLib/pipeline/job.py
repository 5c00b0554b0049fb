"""One button of the Slicer module as a job: a stage of the pipeline from files to files.

The 3D Slicer module runs its Segment, Register, Classify and Run all buttons through this
module, either in its own process (so that Slicer stays responsive and Cancel really stops the
work) or in process (the Logic's blocking calls for scripts). A job reads the CT and, when
given, a corrected label map, runs :meth:`~.pipeline.Pipeline.run` with its sanity checks up to
the stage asked for, and writes ``run``'s output files into a folder, ``result.json`` last:

==========  ============================================  ==================================
stage       runs                                          writes
==========  ============================================  ==================================
segment     segmentation + its checks                     segmentation.nii.gz, result.json
register    registration + crop (from ``label`` if given,  + transform.json/.tfm,
            else segmenting first) + their checks          syndesmosis_crop.nii.gz
classify    the rest (from ``label`` if given)            + gradcam.nii.gz, report.png
all         every stage from the CT alone                 every file
==========  ============================================  ==================================

In a separate process::

    python -m AnkleFractureLib.pipeline.job REQUEST.json

prints one JSON line per progress step on stdout (``{"progress": 0.42, "message": "..."}``),
writes ``job_error.json`` into the output folder when it fails, and exits with 0 (done; a
refusal by the checks is a result), 2 (bad input: the message names the file) or 1 (an
unexpected error; the traceback is on stderr). ``--serve`` keeps one process, and its loaded
models, for many requests read from stdin (:func:`serve`).

Example:
    >>> req = JobRequest(stage="segment", ct="ct.nii.gz", out="out")
    >>> JobRequest.from_json(req.to_json()) == req
    True
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

from AnkleFractureLib.errors import AnkleFractureError, CancelledError, InputError
from AnkleFractureLib.geometry.volume import Volume

PathLike = Union[str, "os.PathLike[str]"]

#: The job stages and where :meth:`Pipeline.run` stops for each.
STAGES = ("segment", "register", "classify", "all")
_STOP_AFTER = {"segment": "segment", "register": "crop", "classify": None, "all": None}
#: Written into the output folder when a job fails.
ERROR_FILE = "job_error.json"
#: Raw arrays a job hands to its caller besides the NIfTI outputs (numpy (z, y, x), on the CT's
#: grid): the caller has the CT's geometry already, and reading these takes a fraction of a
#: second where decompressing the .nii.gz files takes seconds on a clinical CT.
HANDOFF_FILES = {"label": "segmentation.npz", "gradcam": "gradcam.npz"}


@dataclass
class JobRequest:
    """What one job does (``REQUEST.json``).

    Attributes:
        stage: One of :data:`STAGES`.
        ct: CT image file or DICOM folder.
        out: Output folder (created).
        label: Label map (0 background, 1 tibia, 2 fibula) on the CT's grid, e.g. a
            segmentation corrected in Slicer; used by "register" and "classify" (ignored by
            "segment" and "all", which segment the CT).
        side: "auto", "left" or "right".
        device: "auto", "cpu" or "cuda".
        tta: Classifier test-time augmentations (None: the model's default).
        seg_model_dir: Segmentation model folder (None: the shipped one).
        cls_model_dir: Classifier folder (None: the shipped one).
        report_pdf: Also write report.pdf.
        handoff: Folder for :data:`HANDOFF_FILES` (see :func:`run_stage`), or None.
    """

    stage: str
    ct: str
    out: str
    label: Optional[str] = None
    side: str = "auto"
    device: str = "auto"
    tta: Optional[int] = None
    seg_model_dir: Optional[str] = None
    cls_model_dir: Optional[str] = None
    report_pdf: bool = False
    handoff: Optional[str] = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise InputError(None, f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.side not in ("auto", "left", "right"):
            raise InputError(None, f"side must be auto, left or right, got {self.side!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InputError(None, f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.tta is not None and (isinstance(self.tta, bool) or not isinstance(self.tta, int)
                                     or self.tta < 0):
            raise InputError(None, f"tta must be a whole number >= 0, got {self.tta!r}")

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Dict[str, Any], where: Optional[PathLike] = None) -> "JobRequest":
        """Build a request from its JSON dict (unknown keys are an error, not ignored)."""
        if not isinstance(data, dict):
            raise InputError(where, "a job request must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(where, f"unknown job request keys: {', '.join(unknown)}")
        missing = [k for k in ("stage", "ct", "out") if k not in data]
        if missing:
            raise InputError(where, f"the job request lacks {', '.join(missing)}")
        try:
            return cls(**data)
        except InputError as exc:
            if exc.path is None:  # a bad value: name the request file it came from
                raise InputError(where, exc.reason) from None
            raise

    def write(self, path: PathLike) -> None:
        """Write the request as JSON (atomically)."""
        from AnkleFractureLib.io import atomic_write_json

        atomic_write_json(path, self.to_json())

    @classmethod
    def read(cls, path: PathLike) -> "JobRequest":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(path, "the job request file does not exist") from None
        except (OSError, ValueError) as exc:
            raise InputError(path, f"the job request is not readable JSON: {exc}") from None
        return cls.from_json(data, path)

    def options(self) -> Any:
        """The :class:`~.pipeline.PipelineOptions` of this request."""
        from AnkleFractureLib.pipeline.pipeline import PipelineOptions

        return PipelineOptions(side=self.side, device=self.device, tta=self.tta,
                               seg_model_dir=self.seg_model_dir,
                               cls_model_dir=self.cls_model_dir)


def run_stage_result(stage: str, ct: Volume, out: PathLike, label: Optional[Volume] = None,
                     pipeline: Any = None,
                     progress: Optional[Callable[[float, str], None]] = None,
                     should_cancel: Optional[Callable[[], bool]] = None,
                     report_pdf: bool = False, handoff: Optional[PathLike] = None
                     ) -> Tuple[Any, Dict[str, Any]]:
    """:func:`run_stage`, also returning the in-memory
    :class:`~.pipeline.PipelineResult` (the Slicer module's blocking call uses its volumes
    without reading any file back)."""
    from AnkleFractureLib.pipeline.pipeline import Pipeline, write_outputs

    if stage not in STAGES:
        raise InputError(None, f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    pipe = pipeline if pipeline is not None else Pipeline()
    if handoff is not None:
        Path(handoff).mkdir(parents=True, exist_ok=True)
        for name in HANDOFF_FILES.values():
            (Path(handoff) / name).unlink(missing_ok=True)
    use_label = label if stage in ("register", "classify") else None
    result = pipe.run(ct, progress=progress, should_cancel=should_cancel, label=use_label,
                      stop_after=_STOP_AFTER[stage])
    # The one-page report only means something once there is a class (or a refusal to give one).
    with_report = stage in ("classify", "all") or result.refused
    data = write_outputs(result, out, ct if with_report else None, report_pdf=report_pdf)
    if handoff is not None:
        save_handoff(result, handoff)
    return result, data


def run_stage(stage: str, ct: Volume, out: PathLike, label: Optional[Volume] = None,
              pipeline: Any = None, progress: Optional[Callable[[float, str], None]] = None,
              should_cancel: Optional[Callable[[], bool]] = None,
              report_pdf: bool = False, handoff: Optional[PathLike] = None) -> Dict[str, Any]:
    """Run one stage on in-memory volumes and write its files.

    Args:
        stage: One of :data:`STAGES`.
        ct: The CT (HU, any grid).
        out: Output folder (created; stale files of stages that did not run are removed).
        label: Corrected label map for "register" / "classify" (None: segment the CT).
        pipeline: A :class:`~.pipeline.Pipeline` to reuse (its models stay loaded).
        progress: Called with (fraction in [0, 1], message).
        should_cancel: Polled; True raises :class:`~AnkleFractureLib.errors.CancelledError`.
        report_pdf: Also write report.pdf (classify / all).
        handoff: Also save the label map and the heatmap as raw arrays into this folder
            (:func:`save_handoff`); stale ones are removed first.

    Returns:
        The ``result.json`` dict.
    """
    return run_stage_result(stage, ct, out, label, pipeline, progress, should_cancel,
                            report_pdf, handoff)[1]


def save_handoff(result: Any, folder: PathLike) -> None:
    """Save a result's label map and heatmap as raw arrays (:data:`HANDOFF_FILES`).

    The label map is saved whole (uint8); the heatmap only inside the box of its non-zero
    voxels (it is zero outside the syndesmosis box: a few percent of a clinical CT's grid),
    with that box's start and the full shape. Each file is written atomically.
    """
    import numpy as np

    from AnkleFractureLib.geometry.arrays import bounding_box

    folder = Path(folder)
    arrays: Dict[str, Dict[str, Any]] = {}
    if result.label is not None:
        arrays["label"] = {"values": np.ascontiguousarray(result.label.array)}
    if result.gradcam is not None:
        heat = result.gradcam.array
        box = bounding_box(heat) or (slice(0, 0),) * 3
        arrays["gradcam"] = {"values": np.ascontiguousarray(heat[box]),
                             "start": np.array([b.start for b in box]),
                             "shape": np.array(heat.shape)}
    for key, content in arrays.items():
        name = HANDOFF_FILES[key]
        tmp = folder / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, **content)
        os.replace(tmp, folder / name)


def load_handoff(folder: PathLike, key: str) -> Any:
    """The full (z, y, x) array that :func:`save_handoff` saved for ``key`` ("label" or
    "gradcam"), or None when there is none."""
    import numpy as np

    path = Path(folder) / HANDOFF_FILES[key]
    if not path.is_file():
        return None
    with np.load(path) as data:
        values = data["values"]
        if "start" not in data:
            return values
        full = np.zeros(tuple(int(v) for v in data["shape"]), values.dtype)
        z, y, x = (int(v) for v in data["start"])
        full[z:z + values.shape[0], y:y + values.shape[1], x:x + values.shape[2]] = values
        return full


def run_job(request: JobRequest, pipeline: Any = None,
            progress: Optional[Callable[[float, str], None]] = None,
            should_cancel: Optional[Callable[[], bool]] = None) -> Dict[str, Any]:
    """Read the request's files and run :func:`run_stage`; returns the ``result.json`` dict."""
    from AnkleFractureLib.io import read_image
    from AnkleFractureLib.pipeline.pipeline import Pipeline

    if progress is not None:
        progress(0.0, "reading the CT")
    ct = read_image(request.ct)
    label = None
    if request.label and request.stage in ("register", "classify"):
        label = read_image(request.label)
    pipe = pipeline if pipeline is not None else Pipeline(request.options())
    return run_stage(request.stage, ct, request.out, label, pipe, progress, should_cancel,
                     request.report_pdf, request.handoff)


def progress_line(fraction: float, message: str) -> str:
    """One progress line of the process protocol (JSON, no newline)."""
    return json.dumps({"progress": round(float(fraction), 4), "message": str(message)})


def parse_progress(lines: List[str]) -> Optional[Dict[str, Any]]:
    """The last well-formed progress record among ``lines`` (None when there is none).

    Example:
        >>> parse_progress(['{"progress": 0.5, "message": "a"}', '{"progr'])
        {'progress': 0.5, 'message': 'a'}
    """
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line still being written
        if isinstance(record, dict) and "progress" in record:
            return record
    return None


def execute(request_path: PathLike, progress: Callable[[float, str], None],
            pipelines: Optional[Dict[Any, Any]] = None) -> Tuple[int, Optional[str], str]:
    """Run one request file; never raises.

    Args:
        request_path: The ``REQUEST.json``.
        progress: Called with (fraction, message).
        pipelines: A cache of loaded pipelines (one kept, keyed by the request's options), so a
            serving process loads the models once.

    Returns:
        (exit code, error kind or None, message): 0 done; 2 bad input; 3 cancelled;
        1 unexpected (the traceback goes to stderr). A failure also writes ``job_error.json``
        into the request's output folder when it is known.
    """
    out: Optional[Path] = None

    def fail(kind: str, message: str, code: int) -> Tuple[int, Optional[str], str]:
        print(f"ankle-fracture job: {message}", file=sys.stderr, flush=True)
        if out is not None:
            from AnkleFractureLib.io import atomic_write_json

            try:
                out.mkdir(parents=True, exist_ok=True)
                atomic_write_json(out / ERROR_FILE, {"kind": kind, "error": message})
            except OSError:
                pass  # the exit status and stderr still say it
        return code, kind, message

    try:
        request = JobRequest.read(request_path)
        out = Path(request.out)
        (out / ERROR_FILE).unlink(missing_ok=True)
        pipeline = None
        if pipelines is not None:
            from AnkleFractureLib.pipeline.pipeline import Pipeline

            key = (request.side, request.device, request.tta, request.seg_model_dir,
                   request.cls_model_dir)
            if key not in pipelines:
                pipelines.clear()  # one set of models in memory at a time
                pipelines[key] = Pipeline(request.options())
            pipeline = pipelines[key]
        run_job(request, pipeline=pipeline, progress=progress)
    except CancelledError as exc:
        return fail("cancelled", str(exc), 3)
    except AnkleFractureError as exc:
        return fail("input", str(exc), 2)
    except Exception as exc:  # noqa: BLE001 - reported with its traceback, never silently
        traceback.print_exc()
        return fail("unexpected", f"{type(exc).__name__}: {exc}", 1)
    progress(1.0, "done")
    return 0, None, "done"


def serve(lines: Iterable[str]) -> int:
    """Serve requests, one per line ``REQUEST.json<TAB>PROGRESS.jsonl``, until the input ends.

    Each request's progress records are appended to its PROGRESS file, the last one with
    ``"done": true``, its ``"exit"`` code and, on failure, ``"kind"`` and ``"error"``. The
    models stay loaded between requests: this is the Slicer module's warm worker (a click pays
    the Python start-up, the imports and the model loading once). Cancelling a request means
    ending the process.
    """
    pipelines: Dict[Any, Any] = {}
    for line in lines:
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split("\t")  # a tab: paths may hold spaces
        if len(parts) != 2:
            print(f"ankle-fracture job: ignored a request line {line.strip()!r} (expected "
                  "'REQUEST.json<TAB>PROGRESS.jsonl')", file=sys.stderr, flush=True)
            continue
        request_path, progress_path = parts
        with open(progress_path, "a", encoding="utf-8") as fh:
            def progress(fraction: float, message: str) -> None:
                fh.write(progress_line(fraction, message) + "\n")
                fh.flush()

            code, kind, message = execute(request_path, progress, pipelines)
            record: Dict[str, Any] = {"progress": 1.0 if code == 0 else None,
                                      "message": message, "done": True, "exit": code}
            if code:
                record.update(kind=kind, error=message)
            fh.write(json.dumps(record) + "\n")
            fh.flush()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Process entry point (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--serve"]:
        return serve(sys.stdin)
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m AnkleFractureLib.pipeline.job REQUEST.json\n"
              "       python -m AnkleFractureLib.pipeline.job --serve   (requests on stdin)\n\n"
              + (__doc__ or "").split("\n\n")[0], file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2

    def progress(fraction: float, message: str) -> None:
        print(progress_line(fraction, message), flush=True)

    return execute(argv[0], progress)[0]


if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess in the tests
    sys.exit(main())
