"""The cortical ring check as a candidate line beside the localiser's (plans.json ``ring_check``).

When the localiser network finds no line (no candidate whose line probability reaches
``min_line_probability``), the ring check (:mod:`.cortex_ring`) reads the analysed leg's
fibula on the CT's own grid. Each ring above ``min_height_mm`` (times the patient's size
factor) that scores at least ``min_score`` round at least ``min_coverage`` of the bone becomes
a candidate line with ``line_probability`` = ``probability``; the line rule then weighs it
with the classifier like any other line (:func:`~.weber_height.combine_lines`). A ring that
becomes the reported line is the finding (height, centre, extent, its voxels as the fracture
line), and the answer is marked unsure: no network line backs it.

The rule (all keys required; off when ``ring_check`` is absent)::

    "ring_check": {"min_height_mm": 20.0, "min_score": 0.25, "min_coverage": 0.75,
                   "probability": 0.9}

Heights are measured as the localiser measures its lines (:func:`.localise.patient_axis`):
patient mm above the registered plafond along the registered tibial long axis.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from AnkleFractureLib.errors import InputError
from AnkleFractureLib.fracture.cortex_ring import RingBreak, ring_breaks
from AnkleFractureLib.fracture.localise import patient_axis

#: Keys of the rule, all required.
KEYS = ("min_height_mm", "min_score", "min_coverage", "probability")


def check_rule(rule: Any) -> Dict[str, float]:
    """The plans' ``ring_check`` as floats; InputError when a key is missing or out of range.

    Example:
        >>> check_rule({"min_height_mm": 20, "min_score": 0.25, "min_coverage": 0.75,
        ...             "probability": 0.9})["probability"]
        0.9
    """
    if not isinstance(rule, dict) or any(k not in rule for k in KEYS):
        raise InputError(None, f"plans.json decision.ring_check needs the keys {list(KEYS)}, "
                               f"got {rule!r}")
    out = {k: float(rule[k]) for k in KEYS}
    if not (0.0 < out["probability"] < 1.0 and 0.0 <= out["min_coverage"] <= 1.0):
        raise InputError(None, "plans.json decision.ring_check: probability must lie in (0, 1) "
                               f"and min_coverage in [0, 1], got {rule!r}")
    return out


def needed(candidates: Sequence[Dict[str, Any]], decision: Dict[str, Any]) -> bool:
    """Whether the ring check runs: no network line reaches the rule's
    ``min_line_probability`` (default 0.5)."""
    min_q = float(decision.get("min_line_probability", 0.5))
    return not any(float(c.get("line_probability", 0.0)) >= min_q for c in candidates
                   if not c.get("cortex_ring"))


def ring_candidates(ct: Any, fibula: np.ndarray, patient_to_template: np.ndarray,
                    plafond_template: np.ndarray, rule: Dict[str, float]
                    ) -> List[Tuple[Dict[str, Any], RingBreak]]:
    """The rings that qualify as candidate lines, strongest first.

    Args:
        ct: The CT (:class:`~AnkleFractureLib.geometry.volume.Volume`, HU).
        fibula: bool (z, y, x) on the CT's grid: the analysed leg's fibula.
        patient_to_template: 4x4 patient LPS mm -> template mm (the registration).
        plafond_template: (3,) template mm of the plafond.
        rule: :func:`check_rule`'s output.

    Returns:
        (candidate entry, ring) pairs; an entry has the keys of a localiser candidate
        (``voxels`` 0, ``mass`` 0, ``probability`` the ring's score, ``height_mm``,
        ``found``) and ``cortex_ring`` 1, ``line_probability``, ``coverage``, ``rise_mm``.
    """
    if int(np.count_nonzero(fibula)) < 200:
        return []
    plafond, axis, size_factor = patient_axis(patient_to_template, plafond_template)
    out = []
    # Every ring 5 mm apart (a 300 mm fibula has at most 60): the strongest rings of a bone
    # often lie at the malleolus, below the rule's height, and must not crowd out the shaft's.
    for ring in ring_breaks(np.asarray(ct.array), fibula, tuple(ct.spacing[::-1]), limit=64):
        centre = ct.index_to_physical(np.asarray(ring.centre_index[::-1], float))[0]
        height = float((centre - plafond) @ axis)
        if (height < rule["min_height_mm"] * size_factor or ring.score < rule["min_score"]
                or ring.coverage < rule["min_coverage"]):
            continue
        entry = {"voxels": 0, "mass": 0.0, "probability": round(min(ring.score, 1.0), 4),
                 "height_mm": round(height, 2), "found": False, "cortex_ring": 1,
                 "line_probability": rule["probability"], "coverage": round(ring.coverage, 3),
                 "rise_mm": round(ring.rise_mm, 2)}
        out.append((entry, ring))
    return out


def apply(ct: Any, fibula: np.ndarray, patient_to_template: np.ndarray,
          plafond_template: np.ndarray, finding: Any, classifier: Dict[str, float],
          decision: Dict[str, Any]) -> Any:
    """Run the ring check into a localiser finding (in place) when the network found no line.

    The qualifying rings join ``finding.candidates``; when the line rule then reports one of
    them, it becomes the finding: found, its height, centre, extent and line probability.

    Args:
        ct: The CT (Volume, HU).
        fibula: bool (z, y, x) on the CT's grid: the analysed leg's fibula.
        patient_to_template: The registration (4x4 patient LPS mm -> template mm).
        plafond_template: (3,) template mm of the plafond.
        finding: The localiser's :class:`~.localise.FractureFinding` (line rule "scored").
        classifier: The classifier's probabilities.
        decision: The localiser's plans.json ``decision`` with ``ring_check``.

    Returns:
        The reported ring's voxels as a uint8 Volume on the CT's grid, or None when no ring
        was reported (candidates may still have been added).
    """
    from AnkleFractureLib.fracture.cortex_ring import ring_line_mask
    from AnkleFractureLib.fracture.weber_height import combine_lines

    rule = check_rule(decision["ring_check"])
    if finding.found or not needed(finding.candidates, decision):
        return None
    rings = ring_candidates(ct, fibula, patient_to_template, plafond_template, rule)
    if not rings:
        return None
    finding.candidates = list(finding.candidates) + [entry for entry, _ in rings]
    _, line = combine_lines(classifier, finding.candidates, decision, finding.size_factor)
    hit = next(((entry, ring) for entry, ring in rings if line is entry), None)
    if hit is None:
        return None
    entry, ring = hit
    entry["found"] = True
    mask = ring_line_mask(ring, fibula, tuple(ct.spacing[::-1]))
    h, rise = float(entry["height_mm"]), float(ring.rise_mm)
    finding.found, finding.probability = True, float(entry["line_probability"])
    finding.height_mm = h
    finding.center_lps = [float(v) for v in
                          ct.index_to_physical(np.asarray(ring.centre_index[::-1], float))[0]]
    finding.extent = {"length_mm": round(2.0 * ring.radius_mm, 2),
                      "height_min_mm": round(h - rise, 2), "height_max_mm": round(h + rise, 2),
                      "voxels": int(mask.sum())}
    return ct.with_array(mask.astype(np.uint8), meta={"source": "fracture_line",
                                                      "method": "cortex_ring"})


def message(finding: Any) -> str:
    """The warning that goes with a line found by the ring check alone."""
    return (f"the fibular fracture line {finding.height_mm:+.1f} mm from the plafond was found "
            "by the cortical ring check alone (a dark line round the whole fibular shaft on the "
            "CT's own grid); the localiser network found no line: check it on the images")
