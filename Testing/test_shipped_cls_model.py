"""The shipped Weber classifier: present, card matches the weights, classifies phantoms offline,
end to end from a CT through segmentation to result.json + gradcam.nii.gz."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from AnkleFractureLib.classification.inference import (WeberClassifier, classify_ct,
                                                       default_model_dir)
from AnkleFractureLib.cli.main import main
from AnkleFractureLib.crop.syndesmosis import box_on_grid
from AnkleFractureLib.io import read_image, write_image
from AnkleFractureLib.phantom import generate_case

MODEL = default_model_dir()
pytestmark = pytest.mark.skipif(not (MODEL / "model.pt").is_file(),
                                reason="no shipped classification model")


def test_model_card_states_the_weights_sha256_and_size_limit():
    weights = MODEL / "model.pt"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    card = json.loads((MODEL / "model_card.json").read_text())
    assert card["weights"]["sha256"] == digest
    assert digest in (MODEL / "model_card.md").read_text()
    assert weights.stat().st_size < 20 * 1024 * 1024
    assert card["test_metrics"]["n"] >= 200


@pytest.fixture(scope="module")
def classifier():
    return WeberClassifier.load(device="cpu")


@pytest.mark.parametrize("weber,side,seed", [("none", "right", 424242), ("A", "left", 424243),
                                             ("B", "right", 424244), ("C", "left", 424245)])
def test_classifies_held_out_phantoms_with_reference_labels(classifier, weber, side, seed):
    case = generate_case(seed, weber, side, "fast")
    out = classify_ct(case.ct, case.label, classifier, side=side, tta=4)
    res = out["result"]
    assert abs(sum(res.probabilities.values()) - 1.0) < 1e-6
    assert res.prediction == weber, res.probabilities
    heat = out["gradcam"]
    assert box_on_grid(heat, case.ct, atol=1e-6) is not None  # the crop's box on the CT grid
    assert heat.array.dtype == np.float32 and heat.array.min() >= 0 and heat.array.max() <= 1
    assert heat.array.max() > 0.5  # the heatmap lands on the CT, inside the box


def test_classify_command_from_the_segment_command(tmp_path):
    case = generate_case(515151, "C", "right", "fast")
    write_image(case.ct, tmp_path / "ct.nii.gz")
    assert main(["segment", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "seg.nii.gz"),
                 "--device", "cpu", "--quiet"]) == 0
    assert main(["classify", str(tmp_path / "ct.nii.gz"), "--seg", str(tmp_path / "seg.nii.gz"),
                 "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"]) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert abs(sum(result["probabilities"].values()) - 1.0) < 1e-9
    assert result["prediction"] == "C"
    assert result["models"]["classification"]["sha256"] == hashlib.sha256(
        (MODEL / "model.pt").read_bytes()).hexdigest()
    heat = read_image(tmp_path / "out" / "gradcam.nii.gz")
    assert box_on_grid(heat, case.ct, atol=1e-5) is not None
