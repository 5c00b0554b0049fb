"""Evaluate a Weber classifier on a dataset: accuracy, per-class metrics, calibration.

Every case of the dataset is cropped once (the crops are cached, see
:mod:`AnkleFractureLib.classification.crops`), the cases with a ``weber`` class are
classified, and :func:`AnkleFractureLib.evaluation.cls_metrics.classification_report` scores
the calibrated probabilities. With test-time augmentation (``tta`` > 1) each case is classified
``tta`` times under random augmentations; the mean probabilities are scored and the cases the
uncertainty summary flags as unsure are counted, with the accuracy among the confident and the
unsure cases (a useful flag makes more mistakes on the unsure ones).

The crops are cut as ``ankle-fracture run`` cuts them: the side is detected automatically
(never taken from the dataset), so a wrongly detected side gives the crop, and the answer, a
user would get, and counts against the result. Each case records the side detected, the
dataset's side and whether they match; ``side`` summarises them. With ``predicted_masks`` every
case is cropped with the segmentation model's masks (the pipeline's path), not its label map.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from AnkleFractureLib.errors import InputError

ProgressCallback = Callable[[float, str], None]

#: Share of the progress bar spent computing / loading crops (the rest is prediction).
_CROP_SHARE = 0.6


def _accuracy(correct: np.ndarray) -> Optional[float]:
    """Mean of a boolean array, None when it is empty (JSON null)."""
    return round(float(np.mean(correct)), 6) if correct.size else None


def unsure_summary(correct: np.ndarray, unsure: np.ndarray) -> Dict[str, Any]:
    """How many cases are flagged unsure and how accurate the confident / unsure ones are.

    Args:
        correct: (N,) bool, prediction == true class.
        unsure: (N,) bool, the uncertainty summary's ``unsure`` flag.

    Returns:
        {"n_unsure", "fraction_unsure", "accuracy_confident", "accuracy_unsure",
        "n_confident"}; accuracies are None for an empty group.

    Example:
        >>> s = unsure_summary(np.array([True, True, False, False]),
        ...                    np.array([False, False, True, False]))
        >>> s["n_unsure"], s["accuracy_confident"], s["accuracy_unsure"]
        (1, 0.666667, 0.0)
    """
    correct = np.asarray(correct, dtype=bool)
    unsure = np.asarray(unsure, dtype=bool)
    n = int(unsure.size)
    return {"n_unsure": int(unsure.sum()), "n_confident": int(n - unsure.sum()),
            "fraction_unsure": round(float(unsure.mean()), 6) if n else None,
            "accuracy_confident": _accuracy(correct[~unsure]),
            "accuracy_unsure": _accuracy(correct[unsure])}


def _reasons(uncertainty: Dict[str, Any]) -> List[str]:
    """The unsure reasons of an uncertainty summary (key name tolerant)."""
    for key in ("reasons", "unsure_reasons"):
        value = uncertainty.get(key)
        if value:
            return [str(r) for r in value]
    return []


def side_summary(infos: List[Dict[str, Any]], failed: Dict[str, str]) -> Dict[str, Any]:
    """How often automatic side detection agreed with the dataset's side.

    Args:
        infos: Crop infos of the scored cases (``side``, ``side_dataset``, ``side_match``).
        failed: {case id: reason} of the cases that could not be cropped.

    Returns:
        {"policy" ("detect" in evaluation), "n_checked" (cases with a dataset side),
        "n_wrong" (detected side differs from the dataset's), "n_unknown" (no dataset side),
        "n_not_cropped" (e.g. the side could not be told: ``run`` refuses those)}.

    Example:
        >>> side_summary([{"side_match": True}, {"side_match": False}, {}], {})["n_wrong"]
        1
    """
    matches = [i.get("side_match") for i in infos]
    policies = sorted({str(i.get("side_policy")) for i in infos if i.get("side_policy")})
    return {"policy": policies[0] if len(policies) == 1 else policies,
            "n_checked": sum(m is not None for m in matches),
            "n_wrong": sum(m is False for m in matches),
            "n_unknown": sum(m is None for m in matches),
            "n_not_cropped": len(failed)}


def _add_side(result: Dict[str, Any], infos: List[Dict[str, Any]]) -> None:
    """Copy each case's side fields into ``per_case`` and add the ``side`` summary."""
    for entry, info in zip(result["per_case"], infos):
        entry["side_detected"] = info.get("side")
        entry["side_dataset"] = info.get("side_dataset")
        entry["side_match"] = info.get("side_match")
        entry["masks"] = info.get("masks")
    result["side"] = side_summary(infos, result.get("failed") or {})
    result["side"]["wrong"] = [e["id"] for e in result["per_case"]
                               if e.get("side_match") is False]


def evaluate_classifier(dataset_dir: "os.PathLike[str] | str",
                        model_dir: "os.PathLike[str] | str | None" = None,
                        device: str = "auto",
                        cache_dir: "os.PathLike[str] | str | None" = None,
                        workers: int = 1, tta: int = 0,
                        progress: Optional[ProgressCallback] = None,
                        classifier: Any = None, crops: Any = None,
                        seg_model_dir: "os.PathLike[str] | str | None" = None,
                        predicted_masks: bool = False) -> Dict[str, Any]:
    """Classify every labelled case of a dataset and score the predictions.

    Args:
        dataset_dir: Dataset folder (cases with ``weber`` are scored, the others ignored).
        model_dir: Classifier folder (plans.json + model.pt); the shipped model when None.
        device: "auto" (CUDA when available), "cpu" or "cuda".
        cache_dir: Crop cache folder (default ``dataset_dir/.crop_cache``).
        workers: Processes computing missing crops.
        tta: Test-time augmentations per case; 0 or 1 = a single forward pass.
        progress: Callback (fraction in [0, 1], message).
        classifier: An already loaded
            :class:`~AnkleFractureLib.classification.inference.WeberClassifier` (then
            ``model_dir`` and ``device`` are ignored).
        crops: A preloaded :class:`~AnkleFractureLib.classification.crops.CropSet` of this
            dataset, of the classifier's crop kind (skips loading).
        seg_model_dir: Segmentation model for the cases without a label map (the shipped
            one when None).
        predicted_masks: Crop every case with the segmentation model's masks, as the pipeline
            does, ignoring the dataset's label maps.

    Returns:
        The :func:`~AnkleFractureLib.evaluation.cls_metrics.classification_report` dict (with
        ``per_case``, each with ``side_detected``, ``side_dataset``, ``side_match`` and
        ``masks``) plus ``model`` (folder), ``dataset``, ``crop`` (kind), ``tta``, ``failed``
        ({case id: reason} of cases that could not be cropped), ``side``
        (:func:`side_summary` + ``wrong`` ids), ``masks`` ("dataset" or "predicted"),
        ``crop_key`` (code version, template and segmentation model sha256, side policy;
        :func:`~AnkleFractureLib.classification.crops.crop_key_parts`) and, when tta > 1,
        ``unsure`` (:func:`unsure_summary`); with tta every ``per_case`` entry also carries
        ``unsure`` and ``unsure_reasons``.

    Raises:
        InputError: The dataset or model cannot be read, tta < 0, or no case has a class.
    """
    from AnkleFractureLib.classification.crops import load_crops
    from AnkleFractureLib.classification.inference import WeberClassifier
    from AnkleFractureLib.dataset import Dataset
    from AnkleFractureLib.evaluation.cls_metrics import classification_report

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(fraction, message)

    tta = int(tta)
    if tta < 0:
        raise InputError(None, f"the number of test-time augmentations must be >= 0, got {tta}")
    ds = Dataset.load(dataset_dir)
    if classifier is None:
        report(0.0, "loading the classifier")
        classifier = WeberClassifier.load(model_dir, device)
    plans = classifier.plans
    if crops is None:
        cache = Path(cache_dir) if cache_dir is not None else ds.root / ".crop_cache"
        # side="detect": as `ankle-fracture run`, never the dataset's side.
        crops = load_crops(ds, cache, kind=plans.crop, workers=workers,
                           progress=lambda f, m: report(_CROP_SHARE * f, m),
                           seg_model_dir=seg_model_dir, model_masks=predicted_masks,
                           side="detect")
    idx = crops.labelled
    if idx.size == 0:
        raise InputError(ds.root, "no case of this dataset has a Weber class ('weber' in "
                                  "dataset.json) to evaluate against")
    ids = [crops.ids[i] for i in idx]
    y = crops.y[idx]
    probs, unsure_flags, reasons = _predict(classifier, crops, idx, tta, report)
    result = classification_report(y, probs, class_names=plans.classes, ids=ids)
    result.update({"model": None if classifier.model_dir is None else str(classifier.model_dir),
                   "dataset": str(ds.root), "crop": plans.crop, "tta": tta,
                   "failed": dict(crops.failed),
                   "masks": "predicted" if predicted_masks else "dataset",
                   "crop_key": dict(getattr(crops, "meta", {}) or {})})
    if crops.info:
        _add_side(result, [crops.info[i] for i in idx])
    if tta > 1:
        correct = probs.argmax(axis=1) == y
        result["unsure"] = unsure_summary(correct, np.asarray(unsure_flags, dtype=bool))
        for entry, flag, why in zip(result["per_case"], unsure_flags, reasons):
            entry["unsure"] = flag
            entry["unsure_reasons"] = why
    report(1.0, f"{idx.size} cases evaluated")
    return result


def _predict(classifier: Any, crops: Any, idx: np.ndarray, tta: int,
             report: ProgressCallback) -> Tuple[np.ndarray, List[bool], List[List[str]]]:
    """Class probabilities (N, C) of the crops ``idx``, exactly normalised, and with tta > 1
    each case's unsure flag and reasons (empty lists without TTA)."""
    plans = classifier.plans
    unsure_flags: List[bool] = []
    reasons: List[List[str]] = []
    if tta > 1:
        rows = []
        for n, i in enumerate(idx):
            report(_CROP_SHARE + (1 - _CROP_SHARE) * n / idx.size,
                   f"classifying {crops.ids[i]} ({n + 1}/{idx.size}, {tta} augmentations)")
            res = classifier.classify_channels(np.asarray(crops.x[i], np.float32), tta=tta,
                                               gradcam=False)
            rows.append([res.probabilities[c] for c in plans.classes])
            unsure_flags.append(bool(res.uncertainty.get("unsure", False)))
            reasons.append(_reasons(res.uncertainty))
        probs = np.asarray(rows, dtype=np.float64)
    else:
        report(_CROP_SHARE, f"classifying {idx.size} cases")
        probs = np.asarray(classifier.predict_crops(crops.x[idx]), dtype=np.float64)
    # Float32 softmax / TTA means sum to 1 only to ~1e-7; renormalise so the report's check
    # (1e-4) and downstream consumers see exact probability vectors.
    return probs / probs.sum(axis=1, keepdims=True), unsure_flags, reasons


def format_report(result: Dict[str, Any]) -> str:
    """Plain-text summary of :func:`evaluate_classifier`'s result (also after a JSON round trip):
    the model and dataset, :func:`~AnkleFractureLib.evaluation.cls_metrics.format_report`'s
    table, the unsure flag's summary with TTA, and the cases that could not be cropped."""
    from AnkleFractureLib.evaluation.cls_metrics import format_report as metrics_table

    tta = int(result.get("tta") or 0)
    lines = [f"model {result.get('model')} on {result.get('dataset')} "
             f"({result.get('crop')} crops, "
             + (f"{tta} test-time augmentations)" if tta > 1 else "no test-time augmentation)"),
             "", metrics_table(result)]
    unsure = result.get("unsure")
    if unsure:
        def pct(x: Optional[float]) -> str:
            return "n/a" if x is None else f"{100.0 * x:.1f}%"

        lines.append(f"unsure: {unsure['n_unsure']} of {result['n']} cases; accuracy "
                     f"{pct(unsure['accuracy_confident'])} on the confident, "
                     f"{pct(unsure['accuracy_unsure'])} on the unsure ones")
    side = result.get("side")
    if side:
        wrong = side.get("wrong") or []
        lines.append(f"side detected automatically (as 'run' does): wrong on {side['n_wrong']} "
                     f"of {side['n_checked']} cases with a dataset side"
                     + (f" ({', '.join(wrong[:10])}{', ...' if len(wrong) > 10 else ''})"
                        if wrong else ""))
    failed = result.get("failed") or {}
    if failed:
        lines.append(f"{len(failed)} case(s) could not be cropped and were left out:")
        lines.extend(f"  {cid}: {why}" for cid, why in failed.items())
    return "\n".join(lines)
