"""The dense-band test inside the pipeline (plans.json ``decision.dense_band``).

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


def _model(tmp_path_factory, rule):
    folder = tmp_path_factory.mktemp("band") / "fracture"
    shutil.copytree(resources_dir() / "Models" / "fracture", folder)
    plans = json.loads((folder / "plans.json").read_text())
    plans["decision"]["dense_band"] = rule
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
