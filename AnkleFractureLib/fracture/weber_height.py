"""The Danis-Weber class from the measured fracture height, and its agreement with the classifier.

Danis-Weber is defined by the level of the fibular fracture relative to the syndesmosis: **A**
below it (at or below the joint line), **B** at it, **C** above it. With the height ``h`` of the
fracture line's centre above the tibial plafond along the tibial long axis (mm, negative below):

* A: ``h < A_B_MM`` (below the joint line);
* B: ``A_B_MM <= h <= B_C_MM * s`` (the syndesmosis, about 30 mm high);
* C: ``h > B_C_MM * s``;

where ``s`` is the patient's size relative to the template (from the registration's scale), so
the syndesmosis level follows the patient's own anatomy. Near a boundary the class is soft
(logistic with :data:`SOFTNESS_MM`), so a line 1 mm from a boundary is honestly uncertain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

CLASSES = ("none", "A", "B", "C")
#: Boundary (mm above the plafond) between A (below the joint line) and B.
A_B_MM = -1.5
#: Top of the syndesmosis (mm above the plafond, template size): boundary between B and C.
B_C_MM = 30.0
#: Width (mm) of the soft boundary between classes.
SOFTNESS_MM = 2.0
#: Probabilities below this floor are raised to it before the two opinions are combined, so
#: that one confident opinion cannot veto the other outright.
FLOOR = 0.02


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def height_class_probabilities(height_mm: float, size_factor: float = 1.0) -> Dict[str, float]:
    """P(A), P(B), P(C) of a fracture line at ``height_mm`` (soft boundaries).

    Args:
        height_mm: Height of the line's centre above the plafond (mm; negative below).
        size_factor: Patient size / template size (1 / registration scale).

    Returns:
        {"A", "B", "C"} probabilities summing to 1.

    Example:
        >>> p = height_class_probabilities(12.0)
        >>> max(p, key=p.get), round(sum(p.values()), 6)
        ('B', 1.0)
    """
    top = B_C_MM * float(size_factor)
    above_ab = _sigmoid((height_mm - A_B_MM) / SOFTNESS_MM * 2.0)
    above_bc = _sigmoid((height_mm - top) / SOFTNESS_MM * 2.0)
    p = {"A": 1.0 - above_ab, "B": above_ab * (1.0 - above_bc), "C": above_ab * above_bc}
    total = sum(p.values())
    return {k: v / total for k, v in p.items()}


def height_class(height_mm: float, size_factor: float = 1.0) -> str:
    """The class whose height range holds ``height_mm`` ("A", "B" or "C")."""
    p = height_class_probabilities(height_mm, size_factor)
    return max(p, key=p.get)


@dataclass
class WeberOpinion:
    """The combined answer of the classifier and the measured fracture height.

    Attributes:
        probabilities: Combined probabilities per class (none, A, B, C), sum 1.
        prediction: The combined class.
        height_class: The class the measured height gives (None when no fracture was found).
        classifier_class: The classifier's own class.
        agree: Whether the two opinions name the same class.
        reasons: Plain-language reasons, one per disagreement.
    """

    probabilities: Dict[str, float]
    prediction: str
    height_class: Optional[str]
    classifier_class: str
    agree: bool
    reasons: List[str] = field(default_factory=list)


def _height_opinion(found_probability: float, height_mm: Optional[float],
                    size_factor: float) -> Dict[str, float]:
    """P(class) from the localiser alone: P(none) = 1 - P(found); the rest by height."""
    p_found = float(np.clip(found_probability, 0.0, 1.0)) if height_mm is not None else 0.0
    out = {"none": 1.0 - p_found}
    if height_mm is not None:
        for k, v in height_class_probabilities(height_mm, size_factor).items():
            out[k] = p_found * v
    else:
        out.update(A=0.0, B=0.0, C=0.0)
    return out


def combine(classifier: Dict[str, float], found: bool, found_probability: float,
            height_mm: Optional[float], size_factor: float = 1.0) -> WeberOpinion:
    """Combine the classifier's probabilities with the measured height (product of experts).

    Args:
        classifier: Classifier probabilities {"none", "A", "B", "C"}.
        found: Whether the localiser found a fibular fracture line.
        found_probability: The localiser's probability that there is one.
        height_mm: The line's height above the plafond (None when not found).
        size_factor: Patient size / template size.

    Returns:
        The opinion; ``agree`` is False (and ``reasons`` says why) when the classifier's class
        differs from the class the measurement gives.

    Example:
        >>> o = combine({"none": 0.1, "A": 0.7, "B": 0.15, "C": 0.05}, True, 0.9, 14.0)
        >>> o.agree, o.height_class, o.classifier_class
        (False, 'B', 'A')
    """
    cls_pred = max(CLASSES, key=lambda k: classifier.get(k, 0.0))
    measured = _height_opinion(found_probability, height_mm if found else None, size_factor)
    prod = {k: max(classifier.get(k, 0.0), FLOOR) * max(measured[k], FLOOR) for k in CLASSES}
    total = sum(prod.values())
    probs = {k: v / total for k, v in prod.items()}
    h_cls = height_class(height_mm, size_factor) if found and height_mm is not None else None
    measured_class = h_cls or "none"
    reasons = []
    if measured_class != cls_pred:
        reasons.append(_reason(cls_pred, classifier, h_cls, height_mm, size_factor))
    return WeberOpinion(probs, max(probs, key=probs.get), h_cls, cls_pred,
                        measured_class == cls_pred, reasons)


def qualifying_lines(candidates: Sequence[Dict[str, Any]], rule: Dict[str, Any]
                     ) -> List[Dict[str, Any]]:
    """The candidate lines that may be the fracture under ``rule`` (strongest first).

    Args:
        candidates: ``result.json["fracture"]["candidates"]`` entries, by decreasing "mass".
        rule: {"select": "strongest" | "qualified" | "mixture", "found_threshold",
            "min_voxels", "min_section"} (missing keys: 0, "strongest").

    Returns:
        "strongest": the strongest line alone, if it passes the thresholds (the rule of the
        first localisers); "qualified": the strongest line that passes; "mixture": every line
        that passes.

    Example:
        >>> lines = [{"voxels": 900, "mass": 700.0, "probability": 0.99, "section_ratio": 0.4},
        ...          {"voxels": 300, "mass": 250.0, "probability": 0.97, "section_ratio": 2.5}]
        >>> rule = {"found_threshold": 0.5, "min_voxels": 100, "min_section": 1.0}
        >>> [len(qualifying_lines(lines, {**rule, "select": s}))
        ...  for s in ("strongest", "qualified", "mixture")]
        [0, 1, 1]
    """
    def passes(c: Dict[str, Any]) -> bool:
        return (float(c["probability"]) >= float(rule.get("found_threshold", 0.0))
                and int(c["voxels"]) >= int(rule.get("min_voxels", 0))
                and float(c.get("section_ratio", np.inf)) >= float(rule.get("min_section", 0.0)))

    select = rule.get("select", "strongest")
    if select == "strongest":
        return [candidates[0]] if candidates and passes(candidates[0]) else []
    good = [c for c in candidates if passes(c)]
    return good[:1] if select == "qualified" else good


#: Features of a candidate line for the line model (``rule["line_model"]``), in order: the
#: shipped models' set. A model lists its own (``features``), any of :data:`FEATURES`.
LINE_FEATURES = ("bias", "log_voxels", "section_ratio_over_10", "cut_fraction",
                 "mean_probability")

#: Every feature a line model may use: name -> value of a candidate entry.
FEATURES = {
    "bias": lambda line: 1.0,
    "log_voxels": lambda line: float(np.log(max(int(line["voxels"]), 1))),
    "section_ratio_over_10": lambda line: min(float(line.get("section_ratio", 0.0)), 10.0) / 10,
    "cut_fraction": lambda line: float(line.get("cut_fraction", 0.0)),
    # A result written before cut_depth existed has none: its all-or-nothing cut stands in.
    "cut_depth": lambda line: float(line.get("cut_depth", line.get("cut_fraction", 0.0))),
    "mean_probability": lambda line: float(line["mass"]) / max(int(line["voxels"]), 1),
    # The CT's own evidence across the line inside the fibula, on the CT's grid
    # (:mod:`.line_density`; 0 where not measured): a gap is darker than the bone around it
    # (dip below 0; gap_hu asks each ray across the line, which sees a hairline), a dense band
    # brighter (band above 0). Clipped, in 100 HU.
    "dip_hu_over_100": lambda line: _clipped_hu(line.get("dip_hu"), -400.0, 200.0),
    "gap_hu_over_100": lambda line: _clipped_hu(line.get("gap_hu"), -400.0, 200.0),
    "band_hu_over_100": lambda line: _clipped_hu(line.get("band_hu"), -200.0, 800.0),
}
#: The features read from the CT across the line: a line model with any of them has the
#: pipeline measure every candidate (:func:`measures_density`).
DENSITY_FEATURES = ("dip_hu_over_100", "gap_hu_over_100", "band_hu_over_100")


def _clipped_hu(value: Optional[float], lo: float, hi: float) -> float:
    """``value`` (HU) clipped to [lo, hi], in units of 100 HU; 0 when not measured."""
    return 0.0 if value is None else float(np.clip(float(value), lo, hi)) / 100.0


def measures_density(decision: Dict[str, Any]) -> bool:
    """Whether a localiser's decision (plans.json) needs the CT across every candidate line:
    a dense-band test, a gap gate, a line model that reads :data:`DENSITY_FEATURES`, or
    ``"measure_density": true`` (measured and recorded only: how a rule study gets the
    measures before a line model reads them). ``decision.density_grid_mm`` sets the grid of
    the measure's depth maps (:class:`~.line_density.LineDensity`; absent: the CT's own).

    Example:
        >>> measures_density({"line_model": {"features": ["bias", "dip_hu_over_100"]}})
        True
        >>> measures_density({"line_model": {"features": ["bias"]}})
        False
    """
    features = (decision.get("line_model") or {}).get("features", ())
    return ("dense_band" in decision or "gap_gate" in decision
            or bool(decision.get("measure_density"))
            or any(f in DENSITY_FEATURES for f in features))


def line_features(line: Dict[str, Any], names: Sequence[str] = LINE_FEATURES) -> np.ndarray:
    """The features ``names`` (default :data:`LINE_FEATURES`) of a candidate line
    (``result.json`` candidate entry).

    Raises:
        ValueError: A name that is not in :data:`FEATURES`.

    Example:
        >>> line_features({"voxels": 100, "mass": 80.0, "section_ratio": 4.0,
        ...                "cut_fraction": 1.0}).round(3).tolist()
        [1.0, 4.605, 0.4, 1.0, 0.8]
        >>> line_features({"voxels": 100, "mass": 80.0, "cut_fraction": 0.0, "cut_depth": 0.96},
        ...               ("bias", "cut_depth")).tolist()
        [1.0, 0.96]
    """
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise ValueError(f"unknown line features {unknown}; known: {sorted(FEATURES)}")
    return np.array([FEATURES[n](line) for n in names], dtype=float)


def line_probability(line: Dict[str, Any], model: Dict[str, Any]) -> float:
    """P(this candidate is the fibular fracture line) from a fitted logistic line model.

    Args:
        line: A candidate entry (voxels, mass, section_ratio, cut_fraction, cut_depth).
        model: {"features": names from :data:`FEATURES`, "weights": [...]} (plans.json).

    Raises:
        ValueError: Unknown features, or as many weights as features missing.
    """
    names = tuple(model.get("features", ()))
    weights = np.asarray(model["weights"], float)
    if not names or weights.shape != (len(names),):
        raise ValueError(f"line model needs one weight per feature; got features {list(names)} "
                         f"and {weights.size} weights")
    z = float(line_features(line, names) @ weights)
    return float(1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0))))


def candidate_probability(line: Dict[str, Any], rule: Dict[str, Any]) -> float:
    """P(this candidate is the fracture line): a ring of the cortical ring check
    (``"cortex_ring": 1``, :mod:`.cortex_ring`) carries its own ``line_probability``; a
    network line's comes from the line model (:func:`line_probability`), times
    ``rule["dense_band"]["factor"]`` when the rule has a dense-band test and the CT across the
    line is a dense band (``band_hu`` at least ``rule["dense_band"]["min_hu"]``,
    :mod:`.line_density`): an old healed fracture or a scar, not a gap; and times
    ``rule["gap_gate"]["factor"]`` when the rule has a gap gate and the CT across the line
    does not read as a gap (``gap_hu`` above ``rule["gap_gate"]["max_hu"]``). An unmeasured
    line (None) passes both.

    Why a gate and not only a weight: an acute fracture separates bone, and the CT shows that
    as a gap (the median line at the fracture reads about -90 HU on the validation phantoms);
    as one weight among the network's own features, a line on intact bone that reads no gap
    (0 to +20 HU) still passed when the network drew it strongly.

    Example:
        >>> rule = {"line_model": {"features": ["bias"], "weights": [2.0]},
        ...         "dense_band": {"min_hu": 250.0, "factor": 0.1}}
        >>> [round(candidate_probability({"voxels": 1, "mass": 1.0, "band_hu": b}, rule), 3)
        ...  for b in (None, 40.0, 400.0)]
        [0.881, 0.881, 0.088]
        >>> rule = {"line_model": {"features": ["bias"], "weights": [2.0]},
        ...         "gap_gate": {"max_hu": -5.0, "factor": 0.0}}
        >>> [round(candidate_probability({"voxels": 1, "mass": 1.0, "gap_hu": g}, rule), 3)
        ...  for g in (None, -40.0, 10.0)]
        [0.881, 0.881, 0.0]
    """
    if line.get("cortex_ring"):
        return float(line["line_probability"])
    q = line_probability(line, rule["line_model"])
    band = rule.get("dense_band")
    if band is not None and line.get("band_hu") is not None \
            and float(line["band_hu"]) >= float(band["min_hu"]):
        q *= float(band["factor"])
    gate = rule.get("gap_gate")
    if gate is not None and line.get("gap_hu") is not None \
            and float(line["gap_hu"]) > float(gate["max_hu"]):
        q *= float(gate["factor"])
    return q


def _localiser_opinion(candidates: Sequence[Dict[str, Any]], rule: Dict[str, Any],
                       size_factor: float) -> Tuple[Dict[str, float], List[Dict[str, Any]],
                                                    List[float]]:
    """(P(class) from the lines alone, the lines that speak, their weights)."""
    if rule.get("select") == "scored":
        lines = list(candidates)
        weights = [candidate_probability(c, rule) for c in lines]
        p_none = float(np.prod([1.0 - q for q in weights])) if lines else 1.0
    else:
        lines = qualifying_lines(candidates, rule)
        weights = [max(float(c["mass"]), 1e-9) for c in lines]
        p_none = 1.0 - float(np.clip(max((float(c["probability"]) for c in lines),
                                         default=0.0), 0.0, 1.0))
    measured = {"none": p_none if lines else 1.0, "A": 0.0, "B": 0.0, "C": 0.0}
    total = sum(weights)
    if lines and total > 0:
        for w, c in zip(weights, lines):
            for k, v in height_class_probabilities(float(c["height_mm"]), size_factor).items():
                measured[k] += (1.0 - measured["none"]) * w / total * v
    return measured, lines, weights


def _line_of(cls: str, lines: Sequence[Dict[str, Any]], weights: Sequence[float],
             size_factor: float, min_weight: float) -> Optional[Dict[str, Any]]:
    """The heaviest line whose height gives ``cls`` (weight at least ``min_weight``)."""
    same = [(w, c) for w, c in zip(weights, lines)
            if height_class(float(c["height_mm"]), size_factor) == cls and w >= min_weight]
    return max(same, key=lambda t: t[0])[1] if same else None


def combine_lines(classifier: Dict[str, float], candidates: Sequence[Dict[str, Any]],
                  rule: Dict[str, Any], size_factor: float = 1.0
                  ) -> Tuple[WeberOpinion, Optional[Dict[str, Any]]]:
    """Combine the classifier with the candidate lines (product of experts).

    The localiser's opinion depends on ``rule["select"]``:

    * "strongest", "qualified", "mixture" (:func:`qualifying_lines`): P(none) = 1 - the
      highest peak probability of the qualifying lines; the rest is shared by the lines'
      height classes, each line weighted by its summed probability. The reported line is the
      heaviest qualifying line whose height gives the combined class (else the heaviest).
    * "scored": every candidate line has a probability q of being the fracture
      (:func:`line_probability`, a logistic model of its size, section ratio, cut and mean
      probability fitted on validation cases); P(none) = the product of (1 - q); the rest is
      shared by the lines' height classes in proportion to q. A line is reported only when
      the combined class is a fracture, as the most probable line of that class with q at
      least ``rule["min_line_probability"]`` (default 0.5).

    So a false line at the malleolus tip beside a true line higher up leaves both heights in
    play, and the classifier decides between them. The two opinions are multiplied with the
    exponents ``rule["classifier_weight"]`` and ``rule["localiser_weight"]`` (default 1 each:
    a plain product of experts; fitted on validation cases, they say how far each expert's
    probabilities are to be trusted), each probability first raised to at least
    ``rule["floor"]`` (default :data:`FLOOR`): over the four classes at once
    (``rule["combination"]`` "flat", the default) or first for fracture / none and then for
    the class given a fracture ("hierarchical", :func:`hierarchical_product`). With
    ``rule["classifier_override"]`` = t, a product that says "none" only because no line
    speaks gives way to the classifier when the classifier's P(fracture) is at least t
    (:func:`_classifier_overrides`).

    Args:
        classifier: Classifier probabilities {"none", "A", "B", "C"}.
        candidates: Candidate lines, strongest first, each with "height_mm".
        rule: See above.
        size_factor: Patient size / template size.

    Returns:
        (the opinion, the reported line or None).

    Example:
        >>> tip = {"voxels": 900, "mass": 700.0, "probability": 0.99, "height_mm": -6.0}
        >>> high = {"voxels": 500, "mass": 350.0, "probability": 0.95, "height_mm": 48.0}
        >>> o, line = combine_lines({"none": 0.05, "A": 0.05, "B": 0.2, "C": 0.7}, [tip, high],
        ...                         {"select": "mixture", "found_threshold": 0.5})
        >>> o.prediction, line["height_mm"]
        ('C', 48.0)
    """
    measured, lines, weights = _localiser_opinion(candidates, rule, size_factor)
    cls_pred = max(CLASSES, key=lambda k: classifier.get(k, 0.0))
    probs = _experts(classifier, measured, rule)
    if _classifier_overrides(classifier, measured, probs, rule):
        probs = {k: float(classifier.get(k, 0.0)) for k in CLASSES}
    prediction = max(probs, key=probs.get)
    if rule.get("select") == "scored":
        min_q = float(rule.get("min_line_probability", 0.5))
        line = (None if prediction == "none"
                else _line_of(prediction, lines, weights, size_factor, min_q))
        own = max(measured, key=measured.get)  # the lines' own class, for the agreement
        shown = None if own == "none" else _line_of(own, lines, weights, size_factor, 0.0)
    else:
        line = None
        if lines:
            line = _line_of(prediction, lines, weights, size_factor, 0.0) or lines[0]
        shown = line
    h = None if shown is None else float(shown["height_mm"])
    h_cls = None if h is None else height_class(h, size_factor)
    reasons = []
    if (h_cls or "none") != cls_pred:
        reasons.append(_reason(cls_pred, classifier, h_cls, h, size_factor))
    return WeberOpinion(probs, prediction, h_cls, cls_pred, (h_cls or "none") == cls_pred,
                        reasons), line


def _classifier_overrides(classifier: Dict[str, float], measured: Dict[str, float],
                          probs: Dict[str, float], rule: Dict[str, Any]) -> bool:
    """Whether the classifier's own probabilities replace the product: ``rule`` has
    ``"classifier_override": t``, the product says "none" only because the lines' opinion
    is "none" (no line, or none likely), and the classifier gives a fracture at least ``t``.

    Why: with the lines' exponent fitted at 2, "no line found" outweighs any classifier
    (a classifier 94 % sure of a Weber C times no line is "none"), yet the localiser misses
    thin Weber C lines high on the fibula that the classifier sees. Off (absent) by default.
    The answer then differs from the lines' ("none"), so it is marked unsure with the reason.
    """
    t = rule.get("classifier_override")
    if t is None or max(probs, key=probs.get) != "none":
        return False
    if max(measured, key=measured.get) != "none":
        return False
    return 1.0 - float(classifier.get("none", 0.0)) >= float(t)


def _experts(classifier: Dict[str, float], measured: Dict[str, float], rule: Dict[str, Any]
             ) -> Dict[str, float]:
    """The classifier's and the lines' probabilities combined as ``rule["combination"]`` says
    ("flat", the default: one product over the four classes; "hierarchical":
    :func:`hierarchical_product`)."""
    a = float(rule.get("classifier_weight", 1.0))
    b = float(rule.get("localiser_weight", 1.0))
    floor = float(rule.get("floor", FLOOR))
    how = rule.get("combination", "flat")
    if how == "hierarchical":
        return hierarchical_product(classifier, measured, a, b, floor)
    if how != "flat":
        raise ValueError(f"unknown combination {how!r}; known: 'flat', 'hierarchical'")
    prod = {k: max(classifier.get(k, 0.0), floor) ** a * max(measured[k], floor) ** b
            for k in CLASSES}
    total = sum(prod.values())
    return {k: v / total for k, v in prod.items()}


def hierarchical_product(classifier: Dict[str, float], measured: Dict[str, float], a: float,
                         b: float, floor: float = FLOOR) -> Dict[str, float]:
    """Two products of experts: whether there is a fracture, then which Weber class it is.

    The flat product over none / A / B / C lets two experts that agree there is a fracture
    but not on its class answer "no fracture": a classifier sure of a fracture (none 0.1) but
    whose Weber C gets only 0.02, times a located line at the C level (none 0.22), leaves
    "none" the largest product. Here the two questions are asked apart:

    * P(fracture) from the odds of each expert, ``(p / (1 - p))`` with p = 1 - P(none) kept
      in [floor, 1 - floor], raised to ``a`` (classifier) and ``b`` (lines) and multiplied;
    * P(class | fracture) from the classifier's class probabilities given a fracture and the
      lines' height classes, each line as sure as its probability, the part no line holds
      (P(none) of the lines: the fracture, if there is one, is a line the localiser missed)
      spread evenly over A, B and C; each floored at ``floor``, raised to ``a`` and ``b``.

    Args:
        classifier: Classifier probabilities {"none", "A", "B", "C"}.
        measured: The lines' probabilities (same keys; :func:`_localiser_opinion`).
        a: Exponent of the classifier's opinions.
        b: Exponent of the lines' opinions.
        floor: Lowest probability an opinion may give.

    Returns:
        {"none", "A", "B", "C"} summing to 1.

    Example:
        >>> cls = {"none": 0.9, "A": 0.07, "B": 0.01, "C": 0.02}
        >>> lines = {"none": 0.22, "A": 0.0, "B": 0.0, "C": 0.78}
        >>> p = hierarchical_product(cls, lines, 0.75, 2.0)
        >>> max(p, key=p.get), round(sum(p.values()), 6)
        ('C', 1.0)
    """
    def odds(p_none: float) -> float:
        p = float(np.clip(1.0 - p_none, floor, 1.0 - floor))
        return p / (1.0 - p)

    c_none = float(classifier.get("none", 0.0))
    m_none = float(measured["none"])
    o = odds(c_none) ** a * odds(m_none) ** b
    p_fracture = o / (1.0 + o)
    c_fx = max(1.0 - c_none, 1e-12)
    kinds = CLASSES[1:]
    prod = {k: max(float(classifier.get(k, 0.0)) / c_fx, floor) ** a
            * max(float(measured[k]) + m_none / len(kinds), floor) ** b for k in kinds}
    total = sum(prod.values())
    out = {"none": 1.0 - p_fracture}
    out.update({k: p_fracture * v / total for k, v in prod.items()})
    return out


def _range_text(cls: str, size_factor: float) -> str:
    top = B_C_MM * size_factor
    return {"A": f"below {A_B_MM:+.1f} mm, under the joint line",
            "B": f"{A_B_MM:+.1f} to {top:.0f} mm, at the syndesmosis",
            "C": f"above {top:.0f} mm, over the syndesmosis"}[cls]


def _reason(cls_pred: str, classifier: Dict[str, float], h_cls: Optional[str],
            height_mm: Optional[float], size_factor: float) -> str:
    said = ("no fracture" if cls_pred == "none" else f"Weber {cls_pred}")
    said = f"the classifier says {said} ({100.0 * classifier.get(cls_pred, 0.0):.0f} %)"
    if h_cls is None:
        return f"{said}, but no fibular fracture line was located"
    return (f"{said}, but the fibular fracture line was located {height_mm:+.1f} mm from the "
            f"plafond, the Weber {h_cls} level ({_range_text(h_cls, size_factor)})")


def classes_for(heights: Sequence[Optional[float]], size_factor: float = 1.0) -> List[str]:
    """Classes for a list of heights (None -> "none"); for evaluation tables."""
    return ["none" if h is None else height_class(h, size_factor) for h in heights]
