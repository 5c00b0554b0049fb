"""evaluate-cls crops as `run` does: the side is detected, never taken from dataset.json; each
case records the detected and the dataset's side, a wrong side counts against the result, and
the metrics JSON says which code, template and segmentation model made the crops."""

from __future__ import annotations

import json

import pytest
import torch

from AnkleFractureLib.classification import crops as crops_mod
from AnkleFractureLib.classification.model_io import save_classifier
from AnkleFractureLib.classification.network import build_classifier
from AnkleFractureLib.classification.plans import ClsPlans
from AnkleFractureLib.cli.main import main
from AnkleFractureLib.dataset import Dataset
from AnkleFractureLib.evaluation.evaluate_cls import (evaluate_classifier, format_report,
                                                      side_summary)
from AnkleFractureLib.phantom import generate_case


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two phantoms: a left ankle that dataset.json wrongly calls right, a right one called
    right; an untrained tiny classifier."""
    root = tmp_path_factory.mktemp("eval_side")
    ds = Dataset.create(root / "ds")
    cases = {"wrong": generate_case(21, "A", "left", spacing="fast"),
             "right": generate_case(22, "C", "right", spacing="fast")}
    ds.add_case("wrong", cases["wrong"].ct, cases["wrong"].label, weber="A", side="right")
    ds.add_case("right", cases["right"].ct, cases["right"].label, weber="C", side="right")
    torch.manual_seed(0)
    plans = ClsPlans.make(widths=[4, 8, 8, 16], downsample=2, tta=2)
    save_classifier(root / "model", build_classifier(plans.network), plans)
    return {"root": root, "ds": ds.root, "model": root / "model", "cases": cases}


def test_evaluation_detects_the_side_and_records_the_mismatch(data, tmp_path):
    out = tmp_path / "m.json"
    assert main(["evaluate-cls", str(data["ds"]), "--model", str(data["model"]), "--out",
                 str(out), "--device", "cpu", "--quiet",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    m = json.loads(out.read_text())
    cases = {c["id"]: c for c in m["per_case"]}
    assert cases["wrong"]["side_detected"] == "left" and cases["wrong"]["side_dataset"] == "right"
    assert cases["wrong"]["side_match"] is False and cases["right"]["side_match"] is True
    assert cases["wrong"]["masks"] == "dataset"
    assert m["n"] == 2  # the wrongly labelled side is scored, not dropped
    assert m["side"] == {"policy": "detect", "n_checked": 2, "n_wrong": 1, "n_unknown": 0,
                         "n_not_cropped": 0, "wrong": ["wrong"]}
    key = m["crop_key"]
    assert key["crop_code_version"] == crops_mod.CROP_CODE_VERSION
    assert key["side_policy"] == "detect" and len(key["template_sha256"]) == 64
    assert m["masks"] == "dataset"
    assert "wrong on 1 of 2 cases" in format_report(m)


def test_predicted_masks_crop_every_case_with_the_segmentation_model(data, tmp_path,
                                                                     monkeypatch):
    import AnkleFractureLib.segmentation.inference as inference

    calls = []

    def fake_segment(ct, model_dir=None, *args, **kwargs):
        """The phantom's own labels (counted), standing in for the network."""
        calls.append(model_dir)
        for case in data["cases"].values():
            if case.ct.array.shape == ct.array.shape and (case.ct.array == ct.array).all():
                return case.label
        raise AssertionError("unknown CT")

    monkeypatch.setattr(inference, "segment_ct", fake_segment)
    res = evaluate_classifier(data["ds"], data["model"], device="cpu",
                              cache_dir=tmp_path / "cache", predicted_masks=True)
    assert len(calls) == 2 and res["masks"] == "predicted"
    assert {c["masks"] for c in res["per_case"]} == {"model"}
    assert res["side"]["n_wrong"] == 1
    assert len(res["crop_key"]["seg_model_sha256"]) == 64


def test_side_summary_counts_unknown_sides():
    s = side_summary([{"side_match": None, "side_policy": "detect"},
                      {"side_match": True, "side_policy": "detect"}], {"x": "no side"})
    assert s == {"policy": "detect", "n_checked": 1, "n_wrong": 0, "n_unknown": 1,
                 "n_not_cropped": 1}


def test_training_crops_use_the_dataset_side_and_say_so(data, tmp_path):
    out = tmp_path / "cls"
    assert main(["train-cls", str(data["ds"]), "--out", str(out), "--method", "supervised",
                 "--steps", "2", "--batch-size", "2", "--val-fraction", "0", "--downsample", "2",
                 "--widths", "4", "8", "8", "16", "--no-model-masks", "--device", "cpu",
                 "--quiet", "--cache-dir", str(tmp_path / "cache")]) == 0
    crops = json.loads((out / "training.json").read_text())["crops"]
    assert crops["side_policy"] == "dataset"
    assert crops["crop_code_version"] == crops_mod.CROP_CODE_VERSION
    cached = crops_mod.load_crops(Dataset.load(data["ds"]), tmp_path / "cache", side="dataset",
                                  ids=["wrong"])
    assert cached.info[0]["side"] == "right" and cached.info[0]["side_policy"] == "dataset"
