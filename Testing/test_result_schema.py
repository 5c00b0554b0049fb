"""One result.json schema: every command that analyses a CT writes a result.json that validates.

Commands: ``run``, ``classify``, ``batch`` (each case folder), ``demo`` and the Slicer module's
job (:mod:`AnkleFractureLib.pipeline.job`), each on an analysed phantom and, where it takes a
CT, on a 6 mm-slice scan that the checks refuse.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from AnkleFractureLib.cli.main import main
from AnkleFractureLib.errors import InputError
from AnkleFractureLib.io import write_image
from AnkleFractureLib.phantom.generator import generate_case
from AnkleFractureLib.pipeline.result_schema import (RESULT_SCHEMA, check_result_file,
                                                     result_problems, validate)
from AnkleFractureLib.preprocessing.resample import resample_to_spacing


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """A fast Weber B phantom (CT + labels) and the same at 6 mm slices."""
    root = tmp_path_factory.mktemp("schema_scans")
    case = generate_case(10, "B", "left", spacing="fast")
    coarse = (case.ct.spacing[0], case.ct.spacing[1], 6.0)
    paths = {"root": root, "ct": root / "ct.nii.gz", "seg": root / "seg.nii.gz",
             "ct6": root / "ct6.nii.gz", "seg6": root / "seg6.nii.gz"}
    write_image(case.ct, paths["ct"])
    write_image(case.label, paths["seg"])
    write_image(resample_to_spacing(case.ct, coarse), paths["ct6"])
    write_image(resample_to_spacing(case.label, coarse, interpolation="nearest"), paths["seg6"])
    return paths


def _valid(path: Path) -> dict:
    data = check_result_file(path)  # raises InputError listing every problem
    return data


# ------------------------------------------------------------------------ the validator itself
def test_schema_uses_only_supported_keywords():
    allowed = {"$schema", "$id", "title", "type", "enum", "properties", "required",
               "additionalProperties", "items", "minItems", "maxItems", "minimum", "maximum",
               "pattern"}

    def walk(node):
        assert isinstance(node, dict) and set(node) <= allowed, sorted(set(node) - allowed)
        for sub in node.get("properties", {}).values():
            walk(sub)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key])

    walk(RESULT_SCHEMA)
    json.dumps(RESULT_SCHEMA)  # plain JSON


def test_validator_catches_type_enum_range_and_extra_keys():
    schema = {"type": "object", "required": ["a"], "additionalProperties": False,
              "properties": {"a": {"enum": ["x", None]}, "b": {"type": "integer", "minimum": 1},
                             "c": {"type": "array", "items": {"type": "string"},
                                   "maxItems": 1}}}
    assert validate({"a": None, "b": 2, "c": ["s"]}, schema) == []
    problems = validate({"a": "y", "b": True, "c": ["s", 3], "d": 1}, schema)
    assert any("$.a" in p and "not one of" in p for p in problems)
    assert any("$.b" in p and "integer" in p for p in problems)  # a bool is not an integer
    assert any("$.c" in p and "more than 1" in p for p in problems)
    assert any("$.c[1]" in p for p in problems)
    assert any("unexpected key d" in p for p in problems)
    assert validate({}, schema) == ["$: missing key a"]


def test_old_classify_layout_and_inconsistent_results_are_refused(scans, tmp_path):
    old = {"probabilities": {"none": 0.2, "A": 0.1, "B": 0.6, "C": 0.1}, "prediction": "B",
           "uncertainty": {"unsure": False}, "model": {"dir": None, "sha256": None}}
    problems = result_problems(old)
    assert "$: unexpected key model" in problems and "$: missing key refused" in problems
    path = tmp_path / "result.json"
    path.write_text(json.dumps(old))
    with pytest.raises(InputError, match="not a valid result.json") as exc:
        check_result_file(path)
    assert str(path) in str(exc.value)


# ------------------------------------------------------------------------ every command
def test_run_result_validates(scans, tiny_cls, tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(scans["ct"]), "--out", str(out), "--cls-model", str(tiny_cls),
                 "--tta", "0", "--device", "cpu", "--quiet"]) == 0
    data = _valid(out / "result.json")
    assert data["prediction"] in ("none", "A", "B", "C") and not data["refused"]
    out6 = tmp_path / "run6"
    assert main(["run", str(scans["ct6"]), "--out", str(out6), "--quiet"]) == 0
    assert _valid(out6 / "result.json")["refused_stage"] == "input"


def test_classify_result_validates_and_refuses_the_6mm_scan_as_run_does(scans, tiny_cls,
                                                                        tmp_path, capsys):
    out = tmp_path / "cls"
    assert main(["classify", str(scans["ct"]), "--seg", str(scans["seg"]), "--out", str(out),
                 "--model", str(tiny_cls), "--tta", "0", "--class", "C", "--device", "cpu",
                 "--quiet"]) == 0
    data = _valid(out / "result.json")
    assert data["prediction"] in ("none", "A", "B", "C") and data["gradcam_class"] == "C"
    assert data["models"]["classification"]["used"] is True
    assert data["models"]["segmentation"]["used"] is False  # SEG was given
    assert Path(data["input"]["seg"]) == scans["seg"].resolve()
    assert (out / "gradcam.nii.gz").is_file()
    capsys.readouterr()

    out6 = tmp_path / "cls6"
    assert main(["classify", str(scans["ct6"]), "--seg", str(scans["seg6"]), "--out",
                 str(out6), "--model", str(tiny_cls), "--quiet"]) == 0
    stdout = capsys.readouterr().out
    data6 = _valid(out6 / "result.json")
    assert data6["refused"] and data6["refused_stage"] == "input"
    assert data6["prediction"] is None and data6["probabilities"] is None
    assert "too coarse to show fracture lines" in data6["refusal"]
    assert [f["code"] for f in data6["findings"]] == ["spacing_too_coarse"]
    assert "NO WEBER CLASS" in stdout and "too coarse" in stdout
    assert not (out6 / "gradcam.nii.gz").exists()


def test_batch_case_results_validate(scans, tiny_cls, tmp_path):
    inputs = tmp_path / "cts"
    inputs.mkdir()
    for name in ("ct", "ct6"):
        (inputs / scans[name].name).write_bytes(scans[name].read_bytes())
    out = tmp_path / "batch"
    assert main(["batch", str(inputs), "--out", str(out), "--cls-model", str(tiny_cls),
                 "--tta", "0", "--device", "cpu", "--quiet"]) == 0
    results = sorted(out.glob("*/result.json"))
    assert len(results) == 2
    refused = [_valid(p)["refused"] for p in results]
    assert sorted(refused) == [False, True]


def test_demo_case_results_validate(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "1", "--device", "cpu", "--quiet"]) == 0
    results = sorted((out / "results").glob("*/result.json"))
    assert len(results) == 1
    _valid(results[0])


@pytest.mark.parametrize("stage", ["segment", "classify"])
def test_slicer_job_results_validate(scans, tiny_cls, tmp_path, stage):
    from AnkleFractureLib.pipeline.job import JobRequest, run_job

    out = tmp_path / stage
    request = JobRequest(stage=stage, ct=str(scans["ct"]), out=str(out),
                         label=str(scans["seg"]), device="cpu", tta=0,
                         cls_model_dir=str(tiny_cls))
    returned = run_job(request)
    data = _valid(out / "result.json")
    assert data == json.loads(json.dumps(returned))
    assert (data["prediction"] is None) == (stage == "segment")
