"""The ring check inside the pipeline: a fracture line the localiser network missed.

The localiser's answer is replaced by "no line" (what it answers for the Weber C hairlines it
misses); with ``ring_check`` in its plans.json the pipeline then finds the line round the
fibular shaft on the CT's own grid, reports its height, writes its voxels as the fracture line
and marks the answer unsure. Without ``ring_check`` nothing is found.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from AnkleFractureLib.fracture.localise import FractureLocaliser
from AnkleFractureLib.phantom.generator import generate_case
from AnkleFractureLib.pipeline.pipeline import Pipeline, PipelineOptions, write_outputs
from AnkleFractureLib.pipeline.result_schema import result_problems
from AnkleFractureLib.resources import resources_dir

RULE = {"min_height_mm": 20.0, "min_score": 0.15, "min_coverage": 0.75, "probability": 0.9}


@pytest.fixture(scope="module")
def case():
    """A fast real-shape Weber C phantom (both legs in view): its fibular line, 1.9 mm wide,
    about 40 mm above the plafond."""
    return generate_case(9, "C", "right", spacing="fast", family="vh", fractures="heldout")


@pytest.fixture(scope="module")
def ring_model(tmp_path_factory):
    """The shipped localiser with this test's ``ring_check`` in its plans."""
    folder = tmp_path_factory.mktemp("ring") / "fracture"
    shutil.copytree(resources_dir() / "Models" / "fracture", folder)
    plans = json.loads((folder / "plans.json").read_text())
    plans["decision"]["ring_check"] = RULE
    (folder / "plans.json").write_text(json.dumps(plans))
    return folder


@pytest.fixture
def network_misses(monkeypatch):
    """The localiser finds no line (its candidates gone), as for a missed hairline."""
    original = FractureLocaliser.locate

    def locate(self, crop, plafond_template, classifier=None, density=None):
        f = original(self, crop, plafond_template, classifier, density)
        f.found, f.height_mm, f.center_lps, f.extent, f.candidates = False, None, None, None, []
        f.line = np.zeros_like(f.line)
        return f

    monkeypatch.setattr(FractureLocaliser, "locate", locate)


def test_the_ring_check_finds_the_line_the_network_missed(case, ring_model, network_misses,
                                                          tmp_path):
    pipe = Pipeline(PipelineOptions(device="cpu", side="right", fracture_model_dir=ring_model))
    res = pipe.run(case.ct, label=case.label)
    assert not res.refused
    f = res.fracture
    true_h = case.info["fracture"]["height_mm"]
    assert f.found and abs(f.height_mm - true_h) <= 5.0, (f.height_mm, true_h)
    rings = [c for c in f.candidates if c.get("cortex_ring")]
    assert rings and any(c["found"] for c in rings)
    assert "fracture_line_by_ring_check" in [x.code for x in res.findings]
    line = np.asarray(res.fracture_line.array) > 0
    assert res.fracture_line.same_geometry(case.ct) and line.any()
    assert not (line & (np.asarray(case.label.array) != 2)).any()  # on the fibula only
    write_outputs(res, tmp_path / "out", case.ct)
    data = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result_problems(data) == []
    assert data["uncertainty"]["unsure"] and data["fracture"]["found"]
    assert "ring_check" in data["timings_s"]
    assert "fracture_line.nii.gz" in data["files"]


def test_without_the_rule_the_missed_line_stays_missed(case, network_misses, tmp_path):
    folder = tmp_path / "fracture"
    shutil.copytree(resources_dir() / "Models" / "fracture", folder)
    plans = json.loads((folder / "plans.json").read_text())
    plans["decision"].pop("ring_check", None)
    (folder / "plans.json").write_text(json.dumps(plans))
    res = Pipeline(PipelineOptions(device="cpu", side="right", fracture_model_dir=folder)).run(
        case.ct, label=case.label)
    assert not res.fracture.found
    assert not [c for c in res.fracture.candidates if c.get("cortex_ring")]
    assert "fracture_line_by_ring_check" not in [x.code for x in res.findings]
