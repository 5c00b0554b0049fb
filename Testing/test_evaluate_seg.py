"""Dataset-level segmentation evaluation and the ``evaluate-seg`` command (fake predictors)."""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from AnkleFractureLib.cli import evaluate_seg_cmd
from AnkleFractureLib.dataset import Dataset
from AnkleFractureLib.errors import GeometryError, InputError
from AnkleFractureLib.evaluation.evaluate_seg import evaluate_segmentation_dataset, format_report
from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.io import read_image
from AnkleFractureLib.phantom.dataset_writer import write_phantom_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Two fast phantoms: one intact ("none") and one Weber A."""
    root = tmp_path_factory.mktemp("seg_eval") / "ds"
    write_phantom_dataset(root, n=2, seed=5)
    return root


def _truth_of(ct: Volume) -> Volume:
    """The reference labels of a dataset CT (found from the path the CT was read from)."""
    src = Path(ct.meta["source"])
    return read_image(src.parent.parent / "labels" / src.name)


def identity(ct: Volume) -> Volume:
    return _truth_of(ct)


def erode_fibula(ct: Volume) -> Volume:
    lab = _truth_of(ct).array.copy()
    fib = lab == 2
    lab[fib & ~ndi.binary_erosion(fib)] = 0
    return ct.with_array(lab)


def no_fibula(ct: Volume) -> Volume:
    lab = _truth_of(ct).array.copy()
    lab[lab == 2] = 0
    return ct.with_array(lab)


def _strict_json(path: Path) -> dict:
    def bad(token: str) -> None:
        raise ValueError(f"invalid JSON constant {token}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=bad)


def test_identity_predictor_scores_perfectly(dataset, tmp_path):
    out = tmp_path / "res" / "metrics.json"
    calls = []
    res = evaluate_segmentation_dataset(dataset, identity, out_json=out,
                                        progress=lambda f, m: calls.append(f))
    assert res["n_cases"] == 2
    assert [c["weber"] for c in res["cases"]] == ["none", "A"]
    assert [c["fractured"] for c in res["cases"]] == [False, True]
    for case in res["cases"]:
        for bone in ("tibia", "fibula"):
            assert case[bone]["dice"] == 1.0 and case[bone]["hd95_mm"] == 0.0
            assert case[bone]["volume_ml_pred"] == case[bone]["volume_ml_true"] > 0
        assert len(case["spacing_mm"]) == 3 and case["seconds"] >= 0
    assert res["mean"]["fibula"]["dice"] == 1.0
    assert res["mean_fractured"]["n_cases"] == 1 and res["mean_intact"]["n_cases"] == 1
    assert calls[0] == 0.0 and calls[-1] == 1.0
    assert _strict_json(out) == res
    # Atomic write: no temporary file left beside the result.
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]


def test_damaged_fibula_lowers_only_the_fibula(dataset):
    res = evaluate_segmentation_dataset(dataset, erode_fibula)
    for case in res["cases"]:
        assert case["tibia"]["dice"] == 1.0
        assert 0.7 < case["fibula"]["dice"] < 1.0
        assert case["fibula"]["hd95_mm"] > 0
        assert case["fibula"]["volume_ml_pred"] < case["fibula"]["volume_ml_true"]
    assert 0.7 < res["mean"]["fibula"]["dice"] < 1.0
    assert res["mean_intact"]["fibula"]["dice"] == res["cases"][0]["fibula"]["dice"]


def test_missing_bone_gives_null_distances_and_valid_json(dataset, tmp_path):
    out = tmp_path / "m.json"
    res = evaluate_segmentation_dataset(dataset, no_fibula, out_json=out)
    data = _strict_json(out)
    assert data["cases"][0]["fibula"]["hd95_mm"] is None
    assert data["mean"]["fibula"]["dice"] == 0.0
    assert data["mean"]["fibula"]["hd95_mm"] is None
    assert data["mean"]["fibula"]["n_undefined_distance"] == 2
    assert "-" in format_report(res)


def test_a_failing_predictor_leaves_the_previous_result(dataset, tmp_path):
    out = tmp_path / "m.json"
    out.write_text("{\"previous\": true}\n")

    def broken(ct: Volume) -> Volume:
        return Volume(np.zeros((2, 2, 2), np.uint8))

    with pytest.raises(GeometryError):
        evaluate_segmentation_dataset(dataset, broken, out_json=out)
    assert _strict_json(out) == {"previous": True}


def test_dataset_without_segmentations_is_a_clear_error(tmp_path):
    ds = Dataset.create(tmp_path / "unlabelled")
    ds.add_case("c1", Volume(np.zeros((4, 4, 4), np.int16)))
    with pytest.raises(InputError, match="no case"):
        evaluate_segmentation_dataset(ds.root, identity)
    with pytest.raises(InputError):
        evaluate_segmentation_dataset(tmp_path / "missing", identity)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ankle-fracture")
    evaluate_seg_cmd.add_parser(parser.add_subparsers())
    return parser


def test_command_prints_a_table_and_writes_json(dataset, tmp_path, monkeypatch, capsys):
    seen = {}

    class FakeModel:
        device = "cpu"

        @classmethod
        def load(cls, model_dir=None, device="auto"):
            seen["load"] = (model_dir, device)
            return cls()

        def predict(self, ct, progress=None, should_cancel=None):
            if progress is not None:
                progress(0.5, "network")
            return erode_fibula(ct)

    # The real inference module is another stage's work: the command must only use its API.
    fake = types.ModuleType("AnkleFractureLib.segmentation.inference")
    fake.SegmentationModel = FakeModel
    monkeypatch.setitem(sys.modules, "AnkleFractureLib.segmentation.inference", fake)
    monkeypatch.chdir(tmp_path)
    args = _parser().parse_args(["evaluate-seg", str(dataset), "--model", "my_model",
                                 "--device", "cpu", "--quiet"])
    assert args.func(args) == 0
    assert seen["load"] == ("my_model", "cpu")
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.startswith("phantom_5_0000") and " none " in line for line in lines)
    assert any(line.startswith("mean (fractured)") for line in lines)
    assert "seg_metrics.json" in out
    data = _strict_json(tmp_path / "seg_metrics.json")
    assert data["n_cases"] == 2 and 0.7 < data["mean"]["fibula"]["dice"] < 1.0


def test_command_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["evaluate-seg", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and "--out" in out and "seg_metrics.json" in out
