"""Scores of the Weber answer and the located fracture, from ``result.json`` contents.

:func:`AnkleFractureLib.pipeline.evaluate.evaluate_fracture` runs every case of a dataset through
exactly what a user runs (the shipped segmentation, automatic side detection, the checks,
registration, crop, classifier, localiser); this module scores what it returns. A case's
``result.json`` content is compared with the phantom's truth
(``meta["fracture"]``): the Weber class, the fracture's height above the plafond and its
centre. A refused case counts as wrong (its probabilities are taken as uniform) and is listed.

Metrics: accuracy, per-class AUROC, ECE and the confusion matrix of the combined answer, of
the classifier alone and of the measured height alone; fracture found rate on fractured cases,
"found" on intact cases, median |height error| (mm) and median centre distance (mm); how
far the Grad-CAM heatmap's maximum lies from the fracture centre (median, and the share
within :data:`GRADCAM_HIT_MM`); where
the truth knows the plafond, how far the registration put the template's plafond from it (in
3-D and along the template's superior axis).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

CLASSES = ("none", "A", "B", "C")


def case_row(case_id: str, truth: Dict[str, Any], result: Dict[str, Any]) -> Dict[str, Any]:
    """One evaluation row from a case's truth and its ``result.json`` dict.

    Args:
        case_id: Case id.
        truth: {"weber", "height_mm" (None for none), "center_lps" (None for none),
            "plafond_lps" (optional, (3,) LPS mm)}.
        result: The pipeline's ``result.json`` content.

    Returns:
        The row (JSON-ready).
    """
    frac = result.get("fracture") or {}
    probs = result.get("probabilities")
    uniform = {c: 0.25 for c in CLASSES}
    found = bool(frac.get("found"))
    h, h_true = frac.get("height_mm"), truth.get("height_mm")
    err = None if (not found or h is None or h_true is None) else abs(float(h) - float(h_true))
    dist = None
    if found and frac.get("center_lps") and truth.get("center_lps"):
        dist = float(np.linalg.norm(np.subtract(frac["center_lps"], truth["center_lps"])))
    peak = (result.get("gradcam") or {}).get("peak_lps")
    cam = None
    if peak and truth.get("center_lps"):
        cam = float(np.linalg.norm(np.subtract(peak, truth["center_lps"])))
    weber = result.get("weber_from_height") or {}
    return {"id": case_id, "true": truth["weber"], "refused": bool(result.get("refused")),
            "refusal": result.get("refusal"), "predicted": result.get("prediction"),
            "probabilities": probs or uniform,
            "classifier_probabilities": result.get("classifier_probabilities") or uniform,
            "height_class": weber.get("height_class") or ("none" if not found else None),
            "unsure": bool((result.get("uncertainty") or {}).get("unsure")),
            "warning_codes": sorted({str(f.get("code")) for f in result.get("findings") or []
                                     if f.get("level") == "warning"}),
            "found": found, "found_probability": frac.get("probability"),
            "height_mm": h, "height_true_mm": h_true,
            "abs_height_error_mm": None if err is None else round(err, 2),
            "center_distance_mm": None if dist is None else round(dist, 2),
            "gradcam_peak_distance_mm": None if cam is None else round(cam, 2),
            "size_factor": frac.get("size_factor"),
            "candidates": list(frac.get("candidates") or []),
            "registration": _registration_row(result.get("registration"),
                                              truth.get("plafond_lps"))}


def _registration_row(reg: Optional[Dict[str, Any]], plafond_true: Optional[Sequence[float]]
                      ) -> Optional[Dict[str, Any]]:
    """The fit's RMS, inliers and scale, and how far (mm) it put the template's plafond (at the
    template's origin, as in both shipped templates) from the true plafond, when known, with
    the true plafond's position in the template frame (its offset from the template's)."""
    if not reg or reg.get("patient_to_template") is None:
        return None
    row = {k: reg.get(k) for k in ("rms_mm", "inlier_fraction", "scale")}
    if plafond_true is not None:
        m = np.asarray(reg["patient_to_template"], float)
        mapped = np.linalg.solve(m[:3, :3], -m[:3, 3])
        row["plafond_error_mm"] = round(float(np.linalg.norm(mapped - np.asarray(
            plafond_true, float))), 2)
        # Where the true plafond lands in the template (template mm: x medial, y posterior,
        # z superior; a left ankle mirrored): which way the fit is off, not only how far.
        in_template = m[:3, :3] @ np.asarray(plafond_true, float) + m[:3, 3]
        row["plafond_offset_template_mm"] = [round(float(v), 2) for v in in_template]
    return row


def _class_report(rows: Sequence[Dict[str, Any]], key: str) -> Dict[str, Any]:
    from AnkleFractureLib.evaluation.cls_metrics import classification_report

    y = [CLASSES.index(r["true"]) for r in rows]
    p = np.array([[float(r[key][c]) for c in CLASSES] for r in rows])
    p = p / p.sum(axis=1, keepdims=True)
    rep = classification_report(y, p, CLASSES)
    return {k: rep[k] for k in ("n", "accuracy", "macro", "per_class", "confusion_matrix", "ece")}


def _median(values: List[float]) -> Optional[float]:
    return round(float(np.median(values)), 2) if values else None


def _warning_rates(answered: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """Share of the answered cases that carry each warning code (rows without the codes, from
    before they were recorded, count as none)."""
    codes = sorted({c for r in answered for c in r.get("warning_codes", [])})
    return {c: round(float(np.mean([c in r.get("warning_codes", []) for r in answered])), 4)
            for c in codes}


def _registration_summary(answered: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """How far the fits put the template's plafond from the true one (mm): in 3-D, and along
    the template's z (superior) axis alone, which is what the Weber height depends on; None
    when no row knows the true plafond."""
    regs = [r.get("registration") or {} for r in answered]
    err = [g["plafond_error_mm"] for g in regs if g.get("plafond_error_mm") is not None]
    if not err:
        return None
    along = [abs(g["plafond_offset_template_mm"][2]) for g in regs
             if g.get("plafond_offset_template_mm")]
    return {"n": len(err), "median_plafond_error_mm": _median(err),
            "max_plafond_error_mm": round(float(np.max(err)), 2),
            "plafond_within_2mm": round(float(np.mean(np.asarray(err) <= 2.0)), 4),
            "median_plafond_height_error_mm": _median(along),
            "max_plafond_height_error_mm": round(float(np.max(along)), 2) if along else None}


def registration_line(summary: Dict[str, Any]) -> Optional[str]:
    """One line of text on the registration's plafond error (None when the summary has none).

    Example:
        >>> line = registration_line({"registration": {"n": 3, "median_plafond_error_mm": 2.1,
        ...     "max_plafond_error_mm": 4.4, "plafond_within_2mm": 0.5,
        ...     "median_plafond_height_error_mm": 1.0, "max_plafond_height_error_mm": 3.8}})
        >>> for part in line.split("; "):
        ...     print(part)
        plafond from the true one: median 2.1 mm, max 4.4 mm, 50 % within 2 mm
        along the long axis median 1.0 mm, max 3.8 mm (3 fits)
    """
    reg = summary.get("registration")
    if not reg:
        return None
    return (f"plafond from the true one: median {reg['median_plafond_error_mm']} mm, max "
            f"{reg['max_plafond_error_mm']} mm, {100 * reg['plafond_within_2mm']:.0f} % within "
            f"2 mm; along the long axis median {reg['median_plafond_height_error_mm']} mm, max "
            f"{reg['max_plafond_height_error_mm']} mm ({reg['n']} fits)")


def summarise_rows(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The evaluation summary of :func:`case_row` rows."""
    frac = [r for r in rows if r["true"] != "none"]
    none = [r for r in rows if r["true"] == "none"]
    answered = [r for r in rows if not r["refused"]]
    height_acc = [r["height_class"] == r["true"] for r in answered if r["height_class"]]
    return {
        "n": len(rows), "refused": sum(r["refused"] for r in rows),
        "combined": _class_report(rows, "probabilities"),
        "classifier_only": _class_report(rows, "classifier_probabilities"),
        "height_only_accuracy": round(float(np.mean(height_acc)), 4) if height_acc else None,
        "unsure_rate": round(float(np.mean([r["unsure"] for r in answered])), 4) if answered else None,
        "warning_rates": _warning_rates(answered),
        "registration": _registration_summary(answered),
        "fracture": {
            "n_fractured": len(frac), "n_none": len(none),
            "found_rate": round(float(np.mean([r["found"] for r in frac])), 4) if frac else None,
            "found_on_none_rate": round(float(np.mean([r["found"] for r in none])), 4) if none else None,
            "median_abs_height_error_mm": _median([r["abs_height_error_mm"] for r in frac
                                                   if r["abs_height_error_mm"] is not None]),
            "median_center_distance_mm": _median([r["center_distance_mm"] for r in frac
                                                  if r["center_distance_mm"] is not None])},
        "gradcam": _gradcam_summary(frac),
    }


#: The Grad-CAM "pointing game": the heatmap's maximum within this distance (mm) of the
#: fracture's centre is a hit (as docs/gradcam_localisation.md scores it).
GRADCAM_HIT_MM = 15.0


def _gradcam_summary(fractured: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Where the heatmap's maximum lies relative to the true fracture centre, over the
    fractured cases that have both (rows written before ``peak_lps`` existed have neither)."""
    d = [float(r["gradcam_peak_distance_mm"]) for r in fractured
         if r.get("gradcam_peak_distance_mm") is not None]
    if not d:
        return None
    return {"n": len(d), "median_peak_distance_mm": _median(d),
            "hit_rate": round(float(np.mean([v <= GRADCAM_HIT_MM for v in d])), 4),
            "hit_mm": GRADCAM_HIT_MM}


def truth_of(record: Any) -> Dict[str, Any]:
    """The truth of a dataset case (Weber class, fracture height and centre from the meta)."""
    from AnkleFractureLib.dataset import true_fracture_height

    frac = (record.meta or {}).get("fracture") or {}
    return {"weber": record.weber, "height_mm": true_fracture_height(record.meta),
            "center_lps": frac.get("centre_lps"),
            "plafond_lps": (record.meta or {}).get("plafond_lps")}
