"""The cortical ring check as a candidate line (AnkleFractureLib.fracture.ring_check)."""

from __future__ import annotations

import numpy as np
import pytest

from AnkleFractureLib.errors import InputError
from AnkleFractureLib.fracture import ring_check
from AnkleFractureLib.fracture.cortex_ring import demo_tube
from AnkleFractureLib.fracture.localise import FractureFinding
from AnkleFractureLib.geometry.volume import Volume

RULE = {"min_height_mm": 20.0, "min_score": 0.25, "min_coverage": 0.75, "probability": 0.9}
#: The shipped line rule's shape: a line model, the lines' exponent 2.
DECISION = {"select": "scored", "min_line_probability": 0.5, "classifier_weight": 0.75,
            "localiser_weight": 2.0,
            "line_model": {"features": ["bias", "log_voxels"], "weights": [-8.0, 1.0]},
            "ring_check": RULE}


def _scene(gap_at_mm=40.0):
    """A shaft along the array's z axis (the patient's superior axis, identity direction), a
    gap ``gap_at_mm`` from its first station; the registration puts the plafond at the
    shaft's first station's height, so the gap lies about ``gap_at_mm`` above it."""
    ct, mask, sp = demo_tube(gap_at_mm=gap_at_mm)
    vol = Volume(ct, spacing=tuple(sp[::-1]))  # (x, y, z) mm
    first = float(np.argwhere(mask)[:, 0].min() * sp[0])
    p2t = np.eye(4)
    plafond = np.array([12.0, 12.0, first + 1.0])  # template = patient (x, y, z) mm
    return vol, mask, p2t, plafond


def _finding(candidates=()):
    return FractureFinding(False, 0.0, None, None, None, candidates=list(candidates))


def test_a_ring_becomes_the_finding_when_no_network_line_is_found() -> None:
    vol, mask, p2t, plafond = _scene()
    f = _finding()
    classifier = {"none": 0.3, "A": 0.1, "B": 0.2, "C": 0.4}
    line = ring_check.apply(vol, mask, p2t, plafond, f, classifier, DECISION)
    assert line is not None and f.found
    assert abs(f.height_mm - 39.0) <= 2.0
    assert f.extent["height_min_mm"] <= f.height_mm <= f.extent["height_max_mm"]
    ring = [c for c in f.candidates if c.get("cortex_ring")]
    assert len(ring) == 1 and ring[0]["found"] and ring[0]["line_probability"] == 0.9
    labelled = np.asarray(line.array) > 0
    assert labelled.sum() == f.extent["voxels"] > 50 and not (labelled & ~mask).any()
    assert line.same_geometry(vol)
    assert "ring check alone" in ring_check.message(f)


def test_no_ring_on_an_intact_shaft_or_below_the_rule_height() -> None:
    vol, mask, p2t, plafond = _scene(gap_at_mm=None)
    f = _finding()
    assert ring_check.apply(vol, mask, p2t, plafond, f, {"none": 0.9, "A": 0.05, "B": 0.03,
                                                         "C": 0.02}, DECISION) is None
    assert not f.found and not f.candidates
    vol, mask, p2t, plafond = _scene(gap_at_mm=15.0)  # 14 mm above the plafond: below 20
    f = _finding()
    assert ring_check.apply(vol, mask, p2t, plafond, f, {"none": 0.3, "A": 0.1, "B": 0.5,
                                                         "C": 0.1}, DECISION) is None
    assert not f.candidates


def test_the_ring_check_waits_for_a_missing_network_line() -> None:
    """A network line the line model trusts (q >= 0.5) leaves the ring check out."""
    vol, mask, p2t, plafond = _scene()
    network = {"voxels": 20000, "mass": 15000.0, "probability": 0.99, "height_mm": 5.0,
               "found": True, "line_probability": 0.99}
    f = _finding([network])
    assert ring_check.apply(vol, mask, p2t, plafond, f, {"none": 0.1, "A": 0.1, "B": 0.7,
                                                         "C": 0.1}, DECISION) is None
    assert f.candidates == [network]


def test_a_sure_classifier_can_outweigh_the_ring() -> None:
    """The ring is a candidate like any line: a classifier sure there is no fracture against a
    ring of probability 0.2 answers none, and the ring stays among the candidates, unreported."""
    vol, mask, p2t, plafond = _scene()
    f = _finding()
    weak = {**DECISION, "ring_check": {**RULE, "probability": 0.2}}
    line = ring_check.apply(vol, mask, p2t, plafond, f, {"none": 0.97, "A": 0.01, "B": 0.01,
                                                         "C": 0.01}, weak)
    assert line is None and not f.found
    assert [c["found"] for c in f.candidates if c.get("cortex_ring")] == [False]


@pytest.mark.parametrize("rule", [{"min_score": 0.2}, {**RULE, "probability": 1.0}, "on"])
def test_a_bad_rule_is_refused(rule) -> None:
    with pytest.raises(InputError, match="ring_check"):
        ring_check.check_rule(rule)
