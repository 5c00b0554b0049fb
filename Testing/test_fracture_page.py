"""docs/fracture/README.md and the localiser's model card are generated from the committed
evaluation files, and the shipped localiser behaves as measured."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "fracture"
MODEL = ROOT / "Resources" / "Models" / "fracture"


def test_page_is_the_rendering_of_the_committed_files() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from fracture_results_page import render
    finally:
        sys.path.pop(0)
    assert (DOCS / "README.md").read_text() == render(DOCS), \
        "docs/fracture/README.md is stale: python scripts/fracture_results_page.py"


def test_card_names_the_shipped_weights_and_is_regenerated_from_files(tmp_path) -> None:
    card = json.loads((MODEL / "model_card.json").read_text())
    sha = hashlib.sha256((MODEL / "model.pt").read_bytes()).hexdigest()
    assert card["weights"]["sha256"] == sha
    spec = json.loads((DOCS / "commands.json").read_text())
    assert card["training"]["command"] == spec["model_command"]
    copy = tmp_path / "fracture"
    shutil.copytree(MODEL, copy)
    args = [sys.executable, str(ROOT / "scripts" / "write_fracture_card.py"), str(copy)]
    args += [a for c in spec["card_args"] for a in c]
    subprocess.run(args, check=True, cwd=ROOT, capture_output=True)
    assert (copy / "model_card.md").read_text() == (MODEL / "model_card.md").read_text()


def test_heldout_figures_on_the_card_are_the_evaluation_files() -> None:
    card = json.loads((MODEL / "model_card.json").read_text())
    spec = json.loads((DOCS / "commands.json").read_text())
    for entry in spec["sets"]:
        data = json.loads((DOCS / entry["json"]).read_text())
        assert card["heldout"][entry["name"]]["summary"] == data["summary"]


@pytest.mark.parametrize("weber, side, seed", [("C", "left", 1972067172), ("none", "left", 1788015929)])
def test_shipped_localiser_on_held_out_family_cases(weber: str, side: str, seed: int) -> None:
    """Two cases of the held-out analytic set (phantom_9401_0003 and _0004, heldout fracture
    family): the displaced Weber C line is found within 4 mm of its true height; the intact
    fibula gives no line."""
    from AnkleFractureLib.crop.syndesmosis import crop_syndesmosis
    from AnkleFractureLib.fracture.localise import FractureLocaliser
    from AnkleFractureLib.phantom import generate_case
    from AnkleFractureLib.registration import load_template, register_to_template

    case = generate_case(seed, weber, side, "fast", fractures="heldout")
    template = load_template()
    reg = register_to_template(case.label, template, side="auto", ct=case.ct)
    crop = crop_syndesmosis(case.ct, case.label, reg.patient_to_template, template)
    found = FractureLocaliser.load(device="cpu").locate(crop, template.plafond)
    if weber == "none":
        assert not found.found and found.height_mm is None
    else:
        assert found.found
        assert abs(found.height_mm - case.info["fracture"]["height_mm"]) <= 4.0
        assert found.line.sum() == found.extent["voxels"]


def test_card_of_an_ensemble_lists_each_member_and_its_training(tmp_path) -> None:
    from AnkleFractureLib.segmentation.model_io import folder_sha256

    copy = tmp_path / "fracture"
    shutil.copytree(MODEL, copy)
    shutil.copy(copy / "model.pt", copy / "member_x.pt")
    record = json.loads((copy / "training.json").read_text())
    record["command"] = "ankle-fracture train-fracture member-x-data --seed 7"
    (copy / "member_x.training.json").write_text(json.dumps(record))
    plans = json.loads((copy / "plans.json").read_text())
    plans["members"] = [{"file": "member_x.pt"}]
    (copy / "plans.json").write_text(json.dumps(plans))
    subprocess.run([sys.executable, str(ROOT / "scripts" / "write_fracture_card.py"), str(copy)],
                   check=True, cwd=ROOT, capture_output=True)
    card = (copy / "model_card.md").read_text()
    sha = hashlib.sha256((copy / "member_x.pt").read_bytes()).hexdigest()
    assert "## Ensemble" in card and f"`member_x.pt`, sha256 `{sha}`" in card
    assert "training command: `ankle-fracture train-fracture member-x-data --seed 7`" in card
    assert json.loads((copy / "model_card.json").read_text())["weights"]["folder_sha256"] == \
        folder_sha256(copy) != sha


def test_card_of_a_localiser_with_an_upper_window_network_names_it(tmp_path) -> None:
    from AnkleFractureLib.segmentation.model_io import folder_sha256

    copy = tmp_path / "fracture"
    shutil.copytree(MODEL, copy)
    for stale in copy.glob("upper*"):
        stale.unlink()
    shutil.copy(copy / "model.pt", copy / "upper.pt")
    record = json.loads((copy / "training.json").read_text())
    record["command"] = "ankle-fracture train-fracture up-data --crop-shift-mm 24"
    (copy / "upper.training.json").write_text(json.dumps(record))
    plans = json.loads((copy / "plans.json").read_text())
    plans["inference"] = {"extend_top_mm": 24.0, "upper_window": {"file": "upper.pt"}}
    (copy / "plans.json").write_text(json.dumps(plans))
    subprocess.run([sys.executable, str(ROOT / "scripts" / "write_fracture_card.py"), str(copy)],
                   check=True, cwd=ROOT, capture_output=True)
    card = (copy / "model_card.md").read_text()
    sha = hashlib.sha256((copy / "upper.pt").read_bytes()).hexdigest()
    assert "## Above the box" in card and "24 mm taller" in card
    assert f"`upper.pt`, sha256 `{sha}`" in card
    assert "training command: `ankle-fracture train-fracture up-data --crop-shift-mm 24`" in card
    assert json.loads((copy / "model_card.json").read_text())["weights"]["folder_sha256"] == \
        folder_sha256(copy) != sha
