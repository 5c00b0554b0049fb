"""Evaluate a segmentation model on a dataset: Dice, HD95 and ASSD per case and on average.

The model is injected as a plain function ``predict(ct) -> label Volume``, so the same code
scores the shipped network (``SegmentationModel.predict``), another model, or, in tests, a fake
predictor that damages the reference on purpose.

Example:
    >>> import tempfile
    >>> from AnkleFractureLib.dataset import Dataset
    >>> ds = Dataset.create(tempfile.mkdtemp())
    >>> lab = np.zeros((6, 6, 6), np.uint8); lab[1:5, 1:3, 1:5] = 1; lab[1:5, 4:5, 2:4] = 2
    >>> ct = Volume(np.where(lab > 0, 700, -50).astype(np.int16))
    >>> _ = ds.add_case("c1", ct, ct.with_array(lab), weber="none", side="left")
    >>> res = evaluate_segmentation_dataset(ds.root, lambda v: v.with_array(lab))
    >>> res["n_cases"], res["mean"]["fibula"]["dice"]
    (1, 1.0)
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from AnkleFractureLib.dataset import Dataset
from AnkleFractureLib.errors import CancelledError, GeometryError, InputError
from AnkleFractureLib.evaluation.seg_metrics import BONES, finite_or_none, segmentation_metrics
from AnkleFractureLib.geometry.volume import Volume

ProgressCallback = Callable[[float, str], None]
Predictor = Callable[[Volume], Volume]

#: Per-bone metrics that are averaged over cases.
MEAN_KEYS = ("dice", "hd95_mm", "assd_mm")


def _mean(values: List[Optional[float]], digits: int) -> Optional[float]:
    """Mean of the finite values, None when there are none (JSON null)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return finite_or_none(float(np.mean(finite)), digits) if finite else None


def summarise(cases: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean Dice / HD95 / ASSD per bone over ``cases`` (entries of the ``"cases"`` list).

    Returns:
        ``{"n_cases": N, "tibia": {"dice", "hd95_mm", "assd_mm", "n_undefined_distance"},
        "fibula": {...}}``. Distances that are undefined (one mask empty) are left out of the
        distance means and counted in ``n_undefined_distance``; their Dice (0) is averaged, so a
        missed bone still lowers the mean Dice. All values are None when ``cases`` is empty.
    """
    out: Dict[str, Any] = {"n_cases": len(cases)}
    for bone in BONES:
        entry: Dict[str, Any] = {k: _mean([c[bone][k] for c in cases], 6 if k == "dice" else 4)
                                 for k in MEAN_KEYS}
        entry["n_undefined_distance"] = sum(c[bone]["hd95_mm"] is None for c in cases)
        out[bone] = entry
    return out


def evaluate_segmentation_dataset(dataset_dir: "os.PathLike[str] | str", predict: Predictor,
                                  out_json: "Optional[os.PathLike[str] | str]" = None,
                                  progress: Optional[ProgressCallback] = None,
                                  should_cancel: Optional[Callable[[], bool]] = None
                                  ) -> Dict[str, Any]:
    """Run ``predict`` on every segmented case of a dataset and score it against the reference.

    Args:
        dataset_dir: Dataset folder (:mod:`AnkleFractureLib.dataset.layout`). Cases without a
            ``segmentation`` are skipped.
        predict: ``predict(ct) -> labels``: CT Volume (HU) in, uint8 label Volume (0/1/2) on the
            CT's grid out.
        out_json: Where to write the result as JSON (atomically); None writes nothing.
        progress: Called with (fraction in [0, 1], message) before each case and at the end.
        should_cancel: Polled before each case; returning True raises CancelledError (nothing is
            written).

    Returns:
        JSON-ready dict (no NaN or infinity: undefined values are None)::

            {"dataset": str, "n_cases": N,
             "cases": [{"id", "weber", "side", "fractured", "spacing_mm": [x, y, z],
                        "tibia": {"dice", "hd95_mm", "assd_mm", "volume_ml_pred",
                                  "volume_ml_true"},
                        "fibula": {...}, "seconds"}, ...],
             "mean": {"n_cases", "tibia": {"dice", "hd95_mm", "assd_mm",
                                           "n_undefined_distance"}, "fibula": {...}},
             "mean_fractured": {...}, "mean_intact": {...}}

        ``fractured`` is True for Weber A/B/C; ``mean_fractured`` averages those cases and
        ``mean_intact`` the cases labelled "none" (cases whose class is unknown, null, count
        only in ``mean``). ``seconds`` is the wall time of ``predict`` for the case.

    Raises:
        InputError: When the dataset cannot be read or no case has a segmentation.
        GeometryError: When ``predict`` returns labels that are not on the CT's grid.
        CancelledError: When ``should_cancel`` returns True.
    """
    from AnkleFractureLib.io import atomic_write_json, read_image

    ds = Dataset.load(dataset_dir)
    todo = [c for c in ds.cases if c.segmentation is not None]
    if not todo:
        raise InputError(ds.root, "no case of this dataset has a reference segmentation "
                                  "(labels/<id>.nii.gz) to evaluate against")
    rows: List[Dict[str, Any]] = []
    for k, case in enumerate(todo):
        if should_cancel is not None and should_cancel():
            raise CancelledError(f"evaluation cancelled after {k} of {len(todo)} cases")
        if progress is not None:
            progress(k / len(todo), f"case {case.id} ({k + 1}/{len(todo)})")
        ct = read_image(ds.path(case.image))
        truth = read_image(ds.path(case.segmentation))
        if not truth.same_geometry(ct, atol=1e-4):
            raise InputError(ds.path(case.segmentation), "the reference label map is not on the "
                                                         "grid of its CT image")
        t0 = time.perf_counter()
        pred = predict(ct)
        seconds = time.perf_counter() - t0
        if not isinstance(pred, Volume):
            raise TypeError(f"predict must return a Volume, got {type(pred).__name__}")
        if not pred.same_geometry(truth, atol=1e-4):
            raise GeometryError(f"case {case.id}: the predicted labels {pred!r} are not on the "
                                f"CT's grid {truth!r}")
        metrics = segmentation_metrics(pred, truth)
        rows.append({
            "id": case.id,
            "weber": case.weber,
            "side": case.side,
            "fractured": case.weber not in (None, "none"),
            "spacing_mm": [round(float(s), 4) for s in ct.spacing],
            "tibia": metrics["tibia"],
            "fibula": metrics["fibula"],
            "seconds": round(seconds, 3),
        })
    result: Dict[str, Any] = {
        "dataset": str(ds.root),
        "n_cases": len(rows),
        "cases": rows,
        "mean": summarise(rows),
        "mean_fractured": summarise([r for r in rows if r["fractured"]]),
        "mean_intact": summarise([r for r in rows if r["weber"] == "none"]),
    }
    if out_json is not None:
        atomic_write_json(out_json, result)
    if progress is not None:
        progress(1.0, f"{len(rows)} cases evaluated")
    return result


def _fmt(value: Optional[float], digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_report(result: Dict[str, Any]) -> str:
    """A plain-text table of a result of :func:`evaluate_segmentation_dataset`.

    One row per case (id, Weber class, side, Dice and HD95 in mm of tibia and fibula), then the
    means over all, fractured and intact cases. Undefined values print as ``-``.
    """
    width = max([len("mean (fractured)")] + [len(str(c["id"])) for c in result["cases"]])
    head = (f"{'case':<{width}}  {'weber':>5}  {'side':>5}  {'Dice tib':>8}  {'Dice fib':>8}  "
            f"{'HD95 tib':>8}  {'HD95 fib':>8}")
    lines = [head, "-" * len(head)]
    for c in result["cases"]:
        weber, side = str(c["weber"] or "?"), str(c["side"] or "?")
        lines.append(f"{c['id']:<{width}}  {weber:>5}  {side:>5}  "
                     f"{_fmt(c['tibia']['dice'], 4):>8}  {_fmt(c['fibula']['dice'], 4):>8}  "
                     f"{_fmt(c['tibia']['hd95_mm'], 2):>8}  {_fmt(c['fibula']['hd95_mm'], 2):>8}")
    lines.append("-" * len(head))
    for key, name in (("mean", "mean (all)"), ("mean_fractured", "mean (fractured)"),
                      ("mean_intact", "mean (intact)")):
        m = result[key]
        lines.append(f"{name:<{width}}  {'':>5}  {'n=' + str(m['n_cases']):>5}  "
                     f"{_fmt(m['tibia']['dice'], 4):>8}  {_fmt(m['fibula']['dice'], 4):>8}  "
                     f"{_fmt(m['tibia']['hd95_mm'], 2):>8}  {_fmt(m['fibula']['hd95_mm'], 2):>8}")
    lines.append("HD95 in mm; '-' = undefined (a bone missing from the prediction or the "
                 "reference).")
    return "\n".join(lines)
