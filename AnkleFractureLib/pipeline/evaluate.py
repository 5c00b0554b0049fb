"""Evaluation through the whole pipeline: what a user runs, scored against the phantom's truth.

``ankle-fracture evaluate-fracture`` calls :func:`evaluate_fracture`; the scores are
:mod:`AnkleFractureLib.evaluation.evaluate_fracture`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from AnkleFractureLib.evaluation.evaluate_fracture import case_row, summarise_rows, truth_of

#: The Pipeline of a worker process (see :func:`_init_worker`).
_WORKER: Dict[str, Any] = {}


def run_case(pipeline: Any, ct: Any, record: Any, label: Any = None) -> Dict[str, Any]:
    """One case as a user runs it: side detected; a scan refused only because both legs are
    in view is run again with the side given, as the refusal asks (counted in the row).

    Public so that a study runs its cases exactly as ``evaluate-fracture`` does
    (``scripts/mask_reliance_study.py``).

    Args:
        pipeline: A :class:`~AnkleFractureLib.pipeline.pipeline.Pipeline` (models loaded once).
        ct: The case's CT volume (HU).
        record: Its dataset record (``side``: the side to give after a both-legs refusal).
        label: A label map on the CT's grid to use instead of the segmentation (studies of its
            effect), or None.

    Returns:
        The pipeline's result JSON (``_side_given`` True when it was run again with the side).
    """
    from AnkleFractureLib.pipeline.pipeline import Pipeline, PipelineOptions

    result = pipeline.run(ct, label=label).to_json()
    codes = {f["code"] for f in result["findings"] if f["level"] == "refusal"}
    if codes == {"both_legs"} and record.side in ("left", "right"):
        opts = PipelineOptions(**{**pipeline.options.__dict__, "side": record.side})
        again = Pipeline(opts)
        again._seg_model, again._classifier = pipeline._seg_model, pipeline._classifier
        again._localiser, again._template = pipeline._localiser, pipeline._template
        result = again.run(ct, label=label).to_json()
        result["_side_given"] = True
    return result


def _case_row(pipeline: Any, root: str, record: Any) -> Dict[str, Any]:
    """The evaluation row of one dataset case."""
    from AnkleFractureLib.io import read_image

    result = run_case(pipeline, read_image(Path(root) / record.image), record)
    row = case_row(record.id, truth_of(record), result)
    row["side_given_after_both_legs"] = bool(result.get("_side_given"))
    return row


def _init_worker(options: Any, n_workers: int) -> None:
    """Process-pool initializer: one Pipeline per worker, the CPU threads shared out."""
    from AnkleFractureLib.parallel import share_threads
    from AnkleFractureLib.pipeline.pipeline import Pipeline

    share_threads(n_workers)
    _WORKER["pipeline"] = Pipeline(options)


def _worker_row(root: str, record: Any) -> Dict[str, Any]:
    return _case_row(_WORKER["pipeline"], root, record)


def _rows(root: str, records: List[Any], pipeline: Any, workers: int) -> Iterator[Dict[str, Any]]:
    """The rows in dataset order, computed here or in ``workers`` spawned processes."""
    if workers <= 1 or len(records) <= 1:
        for record in records:
            yield _case_row(pipeline, root, record)
        return
    from AnkleFractureLib.parallel import in_processes

    n = min(workers, len(records))
    yield from in_processes(_worker_row, [(root, record) for record in records], n,
                            initializer=_init_worker, initargs=(pipeline.options, n))


def evaluate_fracture(dataset_dir: "os.PathLike[str] | str", pipeline: Any = None,
                      progress: Optional[Callable[[float, str], None]] = None,
                      workers: int = 1) -> Dict[str, Any]:
    """Run the pipeline on every labelled case of a dataset and score it.

    Args:
        dataset_dir: Dataset folder (cases with a Weber class; phantoms carry the fracture).
        pipeline: A :class:`~AnkleFractureLib.pipeline.pipeline.Pipeline` (default options:
            shipped models, side detected). With ``workers`` > 1 only its options are used.
        progress: Called with (fraction, message).
        workers: Cases run at once, each worker a spawned process with its own Pipeline and
            an equal share of the CPU threads; the rows are the same for any number.

    Returns:
        {"dataset", "summary", "cases": rows, "seconds"}.

    Raises:
        ValueError: ``workers`` below 1.
    """
    from AnkleFractureLib.dataset.layout import Dataset
    from AnkleFractureLib.pipeline.pipeline import Pipeline

    if int(workers) < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    ds = Dataset.load(dataset_dir)
    pipeline = pipeline or Pipeline()
    records = [r for r in ds.cases if r.weber is not None]
    rows, t0 = [], time.time()
    for k, row in enumerate(_rows(str(ds.root), records, pipeline, int(workers))):
        rows.append(row)
        if progress is not None:
            progress((k + 1) / max(1, len(records)), f"case {row['id']}")
    return {"dataset": os.path.abspath(os.fspath(dataset_dir)), "summary": summarise_rows(rows),
            "cases": rows, "seconds": round(time.time() - t0, 1)}
