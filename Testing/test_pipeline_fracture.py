"""The located fracture through the whole pipeline: result.json, outputs, the combined answer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from AnkleFractureLib.pipeline import checks as C


@pytest.fixture(scope="module")
def displaced_c():
    from AnkleFractureLib.phantom import generate_case

    return generate_case(21, "C", "right", "fast", fractures="varied")


@pytest.fixture(scope="module")
def run_c(displaced_c, tmp_path_factory):
    from AnkleFractureLib.pipeline.pipeline import Pipeline, PipelineOptions, write_outputs

    res = Pipeline(PipelineOptions(device="cpu")).run(displaced_c.ct)
    out = tmp_path_factory.mktemp("run_c")
    data = write_outputs(res, out, displaced_c.ct)
    return res, data, out


def test_result_holds_the_fracture_and_validates(run_c) -> None:
    from AnkleFractureLib.pipeline.result_schema import result_problems

    res, data, out = run_c
    assert not data["refused"]
    assert result_problems(json.loads((out / "result.json").read_text())) == []
    frac = data["fracture"]
    assert set(frac) >= {"found", "probability", "height_mm", "center_lps", "extent"}
    assert data["models"]["fracture"]["used"] is True
    assert len(data["models"]["fracture"]["sha256"]) == 64
    for name, entry in data["models"].items():  # each model's decision rules identified too
        plans = Path(entry["dir"]) / "plans.json"
        assert entry["plans_sha256"] == hashlib.sha256(plans.read_bytes()).hexdigest(), name
    assert frac["model"]["plans_sha256"] == data["models"]["fracture"]["plans_sha256"]
    assert sum(data["classifier_probabilities"].values()) == pytest.approx(1.0)
    assert sum(data["probabilities"].values()) == pytest.approx(1.0)
    assert data["weber_from_height"]["classifier_prediction"] in ("none", "A", "B", "C")
    assert ("fracture_line.nii.gz" in data["files"]) == frac["found"]
    chosen = [c for c in frac["candidates"] if c["found"]]
    assert len(chosen) == int(frac["found"])  # the found line is listed, once
    if chosen:
        assert chosen[0]["voxels"] == frac["extent"]["voxels"]
        assert chosen[0]["height_mm"] == pytest.approx(frac["height_mm"], abs=0.01)


def test_fracture_line_lies_on_the_ct_lattice_at_the_centre(run_c, displaced_c) -> None:
    from AnkleFractureLib.crop.syndesmosis import box_on_grid
    from AnkleFractureLib.io import read_image

    res, data, out = run_c
    if not data["fracture"]["found"]:
        pytest.skip("the shipped localiser found no line on this phantom")
    line = read_image(out / "fracture_line.nii.gz")
    assert box_on_grid(line, displaced_c.ct, atol=1e-4) is not None
    kji = np.argwhere(line.array > 0)
    pts = line.index_to_physical(kji[:, ::-1].astype(float))
    centre = np.asarray(data["fracture"]["center_lps"])
    assert np.linalg.norm(pts.mean(axis=0) - centre) < 10.0


def test_without_localisation_nothing_is_claimed(displaced_c, tmp_path) -> None:
    from AnkleFractureLib.pipeline.pipeline import Pipeline, PipelineOptions, write_outputs

    res = Pipeline(PipelineOptions(device="cpu", localise=False)).run(displaced_c.ct)
    data = write_outputs(res, tmp_path, None)
    assert data["fracture"] is None and data["weber_from_height"] is None
    assert data["probabilities"] == pytest.approx(data["classifier_probabilities"])
    assert "fracture_line.nii.gz" not in data["files"]


def test_disagreement_makes_the_answer_unsure_with_the_reason() -> None:
    from AnkleFractureLib.classification.inference import ClassificationResult
    from AnkleFractureLib.fracture.weber_height import combine
    from AnkleFractureLib.pipeline.pipeline import PipelineResult

    cls = ClassificationResult({"none": 0.05, "A": 0.8, "B": 0.1, "C": 0.05}, "A",
                               {"unsure": False, "reasons": []})
    res = PipelineResult(input={}, classification=cls)
    res.weber = combine(cls.probabilities, True, 0.97, 15.0)
    res.findings += [C.Finding(C.WARNING, "weber_disagreement", r) for r in res.weber.reasons]
    gated = res.gated
    assert gated["uncertainty"]["unsure"] is True
    assert any("+15.0 mm" in r for r in gated["uncertainty"]["reasons"])
    assert gated["probabilities"] == pytest.approx(res.weber.probabilities)
    refused = PipelineResult(input={}, classification=cls, weber=res.weber)
    refused.findings.append(C.Finding(C.REFUSAL, "no_fibula", "no fibula"))
    assert refused.to_json()["fracture"] is None and refused.gated["prediction"] is None


def test_a_scan_that_ends_on_the_fracture_warns_instead_of_measuring(displaced_c) -> None:
    """The scan cut 1 slice above the fracture centre: the line reaches the scan's edge, is
    not measured (not 'found'), and a warning makes the answer unsure."""
    from AnkleFractureLib.pipeline.pipeline import Pipeline, PipelineOptions

    ct = displaced_c.ct
    centre = np.asarray([displaced_c.info["fracture"]["centre_lps"]])
    k = int(round(ct.physical_to_index(centre)[0][2]))
    res = Pipeline(PipelineOptions(device="cpu")).run(ct.region((slice(0, k + 2), slice(None),
                                                                  slice(None))))
    assert res.fracture is not None and not res.fracture.found
    assert res.fracture.ignored["scan_edge"] >= 300  # a line as large as a found one
    codes = {f.code for f in res.findings}
    assert "fracture_line_at_scan_edge" in codes
    assert "fracture_line_at_scan_edge" in C.UNSURE_CODES


def test_a_located_line_settles_the_classifiers_doubt_but_not_a_warning() -> None:
    from AnkleFractureLib.pipeline import checks as C

    doubt = {"unsure": True, "reasons": ["the most likely class has only 55% probability"],
             "confidence": 0.55}
    u = C.settled_by_line(doubt, "A", -7.5)
    assert u["unsure"] is False and u["reasons"] == []
    assert u["classifier_reasons"] == doubt["reasons"] and "-7.5 mm" in u["settled_by"]
    assert doubt["unsure"] is True  # the input is not modified
    sure = {"unsure": False, "reasons": []}
    assert C.settled_by_line(sure, "B", 10.0) == sure
    # A warning still marks the settled answer unsure.
    res = {"probabilities": {"none": 0.05, "A": 0.9, "B": 0.03, "C": 0.02}, "prediction": "A",
           "uncertainty": u}
    g = C.gate_classification([C.Finding("warning", "metal", "metal in the scan")], res)
    assert g["uncertainty"]["unsure"] and g["uncertainty"]["reasons"] == ["metal in the scan"]
    assert C.gate_classification([], res)["uncertainty"]["unsure"] is False


def test_the_pipeline_result_settles_only_an_answer_its_line_confirms() -> None:
    from types import SimpleNamespace

    from AnkleFractureLib.fracture.weber_height import WeberOpinion
    from AnkleFractureLib.pipeline.pipeline import PipelineResult

    doubt = {"unsure": True, "reasons": ["only 58% of the shifted copies agree"]}
    cls = SimpleNamespace(probabilities={"none": 0.2, "A": 0.58, "B": 0.02, "C": 0.2},
                          prediction="A", uncertainty=doubt, gradcam_class="A")
    probs = {"none": 0.03, "A": 0.95, "B": 0.01, "C": 0.01}
    line = SimpleNamespace(found=True, height_mm=-8.0)
    res = PipelineResult(input={}, classification=cls, fracture=line,
                         weber=WeberOpinion(probs, "A", "A", "A", True, []))
    assert res.gated["uncertainty"]["unsure"] is False
    assert "settled_by" in res.gated["uncertainty"]
    # No line located ("none" answered): the classifier's doubt stays.
    res.fracture = SimpleNamespace(found=False, height_mm=None)
    res.weber = WeberOpinion({"none": 0.9, "A": 0.05, "B": 0.03, "C": 0.02}, "none", None, "A",
                             False, ["..."])
    assert res.gated["uncertainty"]["unsure"] is True
    # A line at another class's height than the answer settles nothing either.
    res.fracture = line
    res.weber = WeberOpinion(probs, "A", "B", "A", False, ["..."])
    assert res.gated["uncertainty"]["unsure"] is True


def test_a_located_a_or_b_line_settles_the_short_scan_warning_only() -> None:
    from AnkleFractureLib.pipeline import checks as C

    short = C.Finding("warning", "fov_short_above", "the scan ends 44 mm above the ankle joint")
    metal = C.Finding("warning", "metal", "metal in the scan")
    sure = {"unsure": False, "reasons": []}

    def gate(pred, confirms, findings):
        res = {"probabilities": {"none": 0.05, "A": 0.05, "B": 0.85, "C": 0.05},
               "prediction": pred, "uncertainty": sure, "line_confirms": confirms}
        return C.gate_classification(findings, res)["uncertainty"]

    assert gate("B", True, [short])["unsure"] is False          # the line says where it breaks
    assert gate("B", False, [short])["unsure"] is True          # no line located there
    assert gate("C", True, [short])["unsure"] is True           # a C line may go on higher up
    assert gate("none", False, [short])["unsure"] is True       # a high C may be out of view
    u = gate("A", True, [short, metal])                          # other warnings still count
    assert u["unsure"] is True and u["reasons"] == ["metal in the scan"]
