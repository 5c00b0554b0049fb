"""The shipped segmentation model: present, card matches the weights, works offline end to end."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from AnkleFractureLib.cli.main import main
from AnkleFractureLib.evaluation.seg_metrics import dice
from AnkleFractureLib.io import read_image, write_image
from AnkleFractureLib.phantom import generate_case
from AnkleFractureLib.segmentation.inference import default_model_dir

MODEL = default_model_dir()
pytestmark = pytest.mark.skipif(not (MODEL / "model.pt").is_file(),
                                reason="no shipped segmentation model")


def test_model_card_states_the_weights_sha256_and_size_limit():
    weights = MODEL / "model.pt"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    card = json.loads((MODEL / "model_card.json").read_text())
    assert card["weights"]["sha256"] == digest
    assert digest in (MODEL / "model_card.md").read_text()
    assert weights.stat().st_size < 20 * 1024 * 1024


def test_segment_command_with_the_default_model(tmp_path):
    # A held-out-style case (seed far from the training seeds), anisotropic grid.
    case = generate_case(987654, "B", "left", "fast")
    write_image(case.ct, tmp_path / "ct.nii.gz")
    assert main(["segment", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "seg.nrrd"),
                 "--device", "cpu", "--quiet"]) == 0
    seg = read_image(tmp_path / "seg.nrrd")
    assert seg.same_geometry(case.ct, atol=1e-6)
    assert seg.array.dtype == np.uint8 and set(np.unique(seg.array)) <= {0, 1, 2}
    # The shipped model must actually find the bones (not just run).
    assert dice(seg.array == 1, case.label.array == 1) > 0.85
    assert dice(seg.array == 2, case.label.array == 2) > 0.75


def test_segment_command_bad_inputs_are_clear(tmp_path, capsys):
    missing = tmp_path / "missing.nii.gz"
    assert main(["segment", str(missing), "-o", str(tmp_path / "seg.nii.gz"), "--quiet"]) == 2
    assert str(missing) in capsys.readouterr().err
    case = generate_case(5, "none", "right", "fast")
    write_image(case.ct, tmp_path / "ct.nii.gz")
    assert main(["segment", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "seg.png"),
                 "--quiet"]) == 2
    assert "seg.png" in capsys.readouterr().err
    assert not (tmp_path / "seg.nii.gz").exists() and not (tmp_path / "seg.png").exists()


def test_segment_command_says_why_a_foot_scan_has_no_labels(tmp_path, capsys, monkeypatch):
    """When post-processing rule 9 removed a foot scan's labels, `segment` prints its reason
    (what a user of the command alone would otherwise read as 'no tibia found')."""
    from AnkleFractureLib.segmentation import inference

    case = generate_case(5, "none", "right", "fast")
    write_image(case.ct, tmp_path / "ct.nii.gz")
    note = ("no distal tibia: the 12.2 ml 'tibia' has no cross-section of a distal tibia "
            "(largest 4.8 cm^2; at the plafond about 8-13) ...")

    def foot_scan(self, ct, progress=None, should_cancel=None, postprocess=True):
        meta = dict(ct.meta, segmentation={"postprocess": {
            "not_a_leg": [{"tibia_ml": 12.2, "section_cm2": 4.8, "below_top_mm": 57.0,
                           "note": note}],
            "notes": ["removed 3 isolated component(s)", note]}})
        return ct.with_array(np.zeros(ct.shape, np.uint8), meta=meta)

    monkeypatch.setattr(inference.SegmentationModel, "predict", foot_scan)
    assert main(["segment", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "seg.nii.gz"),
                 "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"warning: {note}" in out and "no tibia found" not in out
    assert "isolated component" not in out
    assert not read_image(tmp_path / "seg.nii.gz").array.any()
