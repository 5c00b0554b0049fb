"""Evaluation through the whole pipeline: what a user runs, scored against the phantom's truth.

``ankle-fracture evaluate-fracture`` calls :func:`evaluate_fracture`; the scores are
:mod:`AnkleFractureLib.evaluation.evaluate_fracture`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, Optional

from AnkleFractureLib.evaluation.evaluate_fracture import case_row, summarise_rows, truth_of


def _run_case(pipeline: Any, ct: Any, record: Any) -> Dict[str, Any]:
    """One case as a user runs it: side detected; a scan refused only because both legs are
    in view is run again with the side given, as the refusal asks (counted in the row)."""
    from AnkleFractureLib.pipeline.pipeline import Pipeline, PipelineOptions

    result = pipeline.run(ct).to_json()
    codes = {f["code"] for f in result["findings"] if f["level"] == "refusal"}
    if codes == {"both_legs"} and record.side in ("left", "right"):
        opts = PipelineOptions(**{**pipeline.options.__dict__, "side": record.side})
        again = Pipeline(opts)
        again._seg_model, again._classifier = pipeline._seg_model, pipeline._classifier
        again._localiser, again._template = pipeline._localiser, pipeline._template
        result = again.run(ct).to_json()
        result["_side_given"] = True
    return result


def evaluate_fracture(dataset_dir: "os.PathLike[str] | str", pipeline: Any = None,
                      progress: Optional[Callable[[float, str], None]] = None
                      ) -> Dict[str, Any]:
    """Run the pipeline on every labelled case of a dataset and score it.

    Args:
        dataset_dir: Dataset folder (cases with a Weber class; phantoms carry the fracture).
        pipeline: A :class:`~AnkleFractureLib.pipeline.pipeline.Pipeline` (default options:
            shipped models, side detected).
        progress: Called with (fraction, message).

    Returns:
        {"dataset", "summary", "cases": rows, "seconds"}.
    """
    from AnkleFractureLib.dataset.layout import Dataset
    from AnkleFractureLib.io import read_image
    from AnkleFractureLib.pipeline.pipeline import Pipeline

    ds = Dataset.load(dataset_dir)
    pipeline = pipeline or Pipeline()
    records = [r for r in ds.cases if r.weber is not None]
    rows, t0 = [], time.time()
    for k, record in enumerate(records):
        if progress is not None:
            progress(k / max(1, len(records)), f"case {record.id}")
        result = _run_case(pipeline, read_image(ds.path(record.image)), record)
        row = case_row(record.id, truth_of(record), result)
        row["side_given_after_both_legs"] = bool(result.get("_side_given"))
        rows.append(row)
    return {"dataset": os.path.abspath(os.fspath(dataset_dir)), "summary": summarise_rows(rows),
            "cases": rows, "seconds": round(time.time() - t0, 1)}
