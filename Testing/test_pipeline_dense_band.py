"""The CT across every candidate line inside the pipeline: the dense-band test (plans.json
``decision.dense_band``) and a line model that reads the CT (``dip_hu_over_100``).

With the rule in the localiser's plans every candidate line carries ``band_hu`` (the CT across
it inside the fibula, on the CT's own grid) and its line probability is the rule's; a rule
that takes every line for a dense band leaves no network line to report.
"""

from __future__ import annotations

import json
import shutil

import pytest

from AnkleFractureLib.fracture.weber_height import candidate_probability
from AnkleFractureLib.phantom.generator import generate_case
from AnkleFractureLib.pipeline.pipeline import Pipeline, PipelineOptions
from AnkleFractureLib.resources import resources_dir


@pytest.fixture(scope="module")
def case():
    """An analytic Weber B phantom with a 0.5-2 mm gap: the shipped localiser finds it."""
    return generate_case(3, "B", "right", spacing="fast")


def _model(tmp_path_factory, rule, line_model=None):
    folder = tmp_path_factory.mktemp("band") / "fracture"
    shutil.copytree(resources_dir() / "Models" / "fracture", folder)
    plans = json.loads((folder / "plans.json").read_text())
    if rule is not None:
        plans["decision"]["dense_band"] = rule
    if line_model is not None:
        plans["decision"]["line_model"] = line_model
    plans["decision"].pop("ring_check", None)
    (folder / "plans.json").write_text(json.dumps(plans))
    return folder


def _run(case, folder):
    pipe = Pipeline(PipelineOptions(device="cpu", side="right", fracture_model_dir=folder))
    res = pipe.run(case.ct, label=case.label)
    assert not res.refused
    return res, pipe.localiser.decision


def test_every_line_is_measured_and_weighed_by_the_rule(case, tmp_path_factory):
    res, decision = _run(case, _model(tmp_path_factory, {"min_hu": 1e9, "factor": 1.0}))
    lines = res.fracture.candidates
    assert lines and res.fracture.found
    assert all("band_hu" in c for c in lines)
    assert any(c["band_hu"] is not None for c in lines)
    for c in lines:
        assert c["line_probability"] == pytest.approx(candidate_probability(c, decision),
                                                      abs=1e-4)


def test_a_rule_that_finds_every_line_dense_leaves_none(case, tmp_path_factory):
    res, _ = _run(case, _model(tmp_path_factory, {"min_hu": -1e9, "factor": 0.0}))
    measured = [c for c in res.fracture.candidates if c["band_hu"] is not None]
    assert measured and all(c["line_probability"] == 0.0 for c in measured)
    assert not any(c["found"] for c in measured)


@pytest.fixture(scope="module")
def raw_case():
    """The same Weber B draw with raw faces: a 0.5 mm gap of blood, displaced 2 mm."""
    return generate_case(3, "B", "right", spacing="fast", fracture_faces="raw")


def test_a_line_model_that_reads_the_ct_has_every_line_measured(raw_case, tmp_path_factory):
    """No dense-band test, but a line model on gap_hu: the pipeline measures every candidate,
    and the line at the true fracture reads as a gap (darker than the bone around it)."""
    from AnkleFractureLib.fracture.weber_height import line_features

    model = {"features": ["bias", "log_voxels", "gap_hu_over_100"],
             "weights": [-4.0, 0.5, -1.0]}
    res, decision = _run(raw_case, _model(tmp_path_factory, None, model))
    assert "dense_band" not in decision
    lines = res.fracture.candidates
    assert lines and all({"gap_hu", "dip_hu", "band_hu"} <= set(c) for c in lines)
    for c in lines:
        assert c["line_probability"] == pytest.approx(candidate_probability(c, decision),
                                                      abs=1e-4)
    true_h = raw_case.info["fracture"]["height_mm"]
    at_fracture = min(lines, key=lambda c: abs(c["height_mm"] - true_h))
    assert abs(at_fracture["height_mm"] - true_h) < 3.0
    assert at_fracture["gap_hu"] is not None and at_fracture["gap_hu"] < -25.0
    assert line_features(at_fracture, model["features"])[2] < -0.25
