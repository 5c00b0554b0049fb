"""The experiment pages under docs/fracture/experiments are the rendering of their committed
files, and a classifier experiment's page names the classifier and its training cases."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "docs" / "fracture" / "experiments"


def _render():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from fracture_experiment_page import render
    finally:
        sys.path.pop(0)
    return render


def _pages():
    return sorted(p.parent for p in EXPERIMENTS.glob("*/experiment.json")
                  if (p.parent / "README.md").is_file() and (p.parent / "training.json").is_file())


@pytest.mark.parametrize("folder", _pages(), ids=lambda p: p.name)
def test_experiment_page_is_the_rendering_of_its_files(folder: Path) -> None:
    assert (folder / "README.md").read_text() == _render()(folder.relative_to(ROOT)), \
        f"{folder}/README.md is stale: python scripts/fracture_experiment_page.py {folder}"


def _summary(acc: float, alone: float, unsure: float) -> dict:
    per = {k: {"auroc": 0.9} for k in ("none", "A", "B", "C")}
    return {"n": 10, "refused": 0, "unsure_rate": unsure,
            "combined": {"accuracy": acc, "per_class": per},
            "classifier_only": {"accuracy": alone},
            "fracture": {"found_rate": 0.9, "found_on_none_rate": 0.1,
                         "median_abs_height_error_mm": 1.5}}


def test_classifier_experiment_names_the_classifier_and_its_cases(tmp_path) -> None:
    folder = tmp_path / "exp"
    base = tmp_path / "base"
    folder.mkdir()
    base.mkdir()
    models = {"classification": {"sha256": "c1" * 32}, "fracture": {"sha256": "f0" * 32}}
    (base / "heldout_vh.json").write_text(json.dumps(
        {"summary": _summary(0.8, 0.6, 0.5), "models": models}))
    mine = dict(models, classification={"sha256": "c2" * 32})
    (folder / "heldout_vh.json").write_text(json.dumps(
        {"summary": _summary(0.9, 0.85, 0.2), "models": mine}))
    (folder / "experiment.json").write_text(json.dumps(
        {"title": "t", "why": "w", "model": "classification", "commands": {"train": "x"},
         "verdict": "v", "baseline": str(base)}))
    (folder / "training.json").write_text(json.dumps(
        {"method": "supervised", "steps_done": 7, "minutes": 1.0, "device": "cpu",
         "config": {"batch_size": 4, "lr": 0.01},
         "cases": {"labelled_train": 5, "failed": {"vh_1_0001_predseg": "no fit"}}}))
    (folder / "plans.json").write_text(json.dumps({"decision": {}}))
    (folder / "cases.json").write_text(json.dumps(
        ["phantom_1_0000", "vh_1_0001", "vh_1_0002", "vh_1_0001_predseg"]))
    page = _render()(folder)
    assert "| classifier (sha256) |" in page
    assert f"| shipped (`{'c1' * 6}`) | 10 | 0 | 80.0 % |" in page
    assert f"| this experiment (`{'c2' * 6}`) | 10 | 0 | 90.0 % |" in page
    assert "| 85.0 % | 20.0 % |" in page  # classifier alone, unsure
    assert "analytic 1, real-shape 2; 1 of them cropped a second time" in page
    assert "1 not cropped (vh_1_0001_predseg)" in page
    assert "5 training crops" in page
    train = json.loads((folder / "training.json").read_text())
    train["cases"]["labelled_train"] = ["a", "b", "c"]  # newer training.json lists the ids
    (folder / "training.json").write_text(json.dumps(train))
    assert "3 training crops" in _render()(folder)


def test_totals_add_up_the_cases_of_every_set(tmp_path) -> None:
    """experiment.json "totals": one row per localiser with the held-out sets' case counts
    (a refusal is a wrong answer; found lines counted on fractured and intact cases)."""
    def case(true, predicted, found):
        return {"true": true, "predicted": predicted, "found": found}

    folder, base = tmp_path / "exp", tmp_path / "base"
    folder.mkdir()
    base.mkdir()
    sets = {"vh": ([case("C", "C", True), case("none", "none", False), case("B", None, False)],
                   [case("C", "C", True), case("none", "C", True), case("B", "B", True)]),
            "analytic": ([case("A", "A", True)], [case("A", "none", False)])}
    for name, (shipped, mine) in sets.items():
        for where, rows in ((base, shipped), (folder, mine)):
            (where / f"heldout_{name}.json").write_text(json.dumps(
                {"summary": _summary(0.5, 0.5, 0.5), "models": {}, "cases": rows}))
    (folder / "experiment.json").write_text(json.dumps(
        {"title": "t", "why": "w", "commands": {}, "verdict": "v", "baseline": str(base),
         "totals": True}))
    (folder / "training.json").write_text(json.dumps({}))
    (folder / "plans.json").write_text(json.dumps({"decision": {}}))
    page = _render()(folder)
    assert "| right per set (vh, analytic) |" in page
    assert "| shipped | 4 | 3 | 2 / 1 | 2 of 3 | 1 of 2 | 0 of 1 |" in page
    assert "| this experiment | 4 | 2 | 2 / 0 | 2 of 3 | 2 of 2 | 1 of 1 |" in page


def test_warning_counts_count_the_cases_that_carry_each_warning_and_those_right(tmp_path) -> None:
    """experiment.json "warning_counts": one row per pipeline, pooled over the held-out sets
    both ran: how many cases carry each warning, and how many of those were answered right."""
    def case(true, predicted, codes):
        return {"true": true, "predicted": predicted, "found": False, "warning_codes": codes}

    folder, base = tmp_path / "exp", tmp_path / "base"
    folder.mkdir()
    base.mkdir()
    edge, fov = "fracture_line_at_scan_edge", "fov_short_above"
    shipped = [case("none", "none", [edge, fov]), case("B", "A", [edge]), case("C", "C", [])]
    mine = [case("none", "none", [fov]), case("B", "B", []), case("C", "C", [])]
    for where, rows in ((base, shipped), (folder, mine)):
        (where / "heldout_vh.json").write_text(json.dumps(
            {"summary": _summary(0.5, 0.5, 0.5), "models": {}, "cases": rows}))
    (folder / "experiment.json").write_text(json.dumps(
        {"title": "t", "why": "w", "commands": {}, "verdict": "v", "baseline": str(base),
         "warning_counts": [edge, fov]}))
    (folder / "training.json").write_text(json.dumps({}))
    (folder / "plans.json").write_text(json.dumps({"decision": {}}))
    page = _render()(folder)
    assert f"| localiser | `{edge}` (right) | `{fov}` (right) |" in page
    assert "| shipped | 2 of 3 (1) | 1 of 3 (1) |" in page
    assert "| this experiment | 0 of 3 (0) | 1 of 3 (1) |" in page


def test_two_model_experiment_names_both_and_both_trainings(tmp_path) -> None:
    """experiment.json "model": ["classification", "fracture"] with "classifier_training": each
    row names both models' sha256, and the page has a localiser and a classifier training
    section, then the commands once."""
    folder, base = tmp_path / "exp", tmp_path / "base"
    folder.mkdir()
    base.mkdir()
    models = {"classification": {"sha256": "c1" * 32}, "fracture": {"sha256": "f1" * 32}}
    (base / "heldout_vh.json").write_text(json.dumps(
        {"summary": _summary(0.6, 0.5, 0.5), "models": models}))
    (folder / "heldout_vh.json").write_text(json.dumps(
        {"summary": _summary(0.9, 0.8, 0.1),
         "models": {"classification": {"sha256": "c2" * 32}, "fracture": {"sha256": "f2" * 32}}}))
    (folder / "experiment.json").write_text(json.dumps(
        {"title": "t", "why": "w", "model": ["classification", "fracture"],
         "classifier_training": "cls_training.json", "commands": {"train": "x"},
         "verdict": "v", "baseline": str(base)}))
    (folder / "training.json").write_text(json.dumps(
        {"steps_run": 40, "minutes": 2.0, "best_step": 20, "train_cases": ["vh_1_0001"],
         "val_cases": []}))
    (folder / "cls_training.json").write_text(json.dumps(
        {"method": "supervised", "steps_done": 9, "minutes": 1.0, "device": "cpu",
         "config": {"batch_size": 4, "lr": 0.01}, "cases": {"labelled_train": 6}}))
    (folder / "plans.json").write_text(json.dumps({"decision": {"found_threshold": 0.5}}))
    page = _render()(folder)
    assert "| classifier / localiser (sha256) |" in page
    assert f"| shipped (`{'c1' * 6} / {'f1' * 6}`) | 10 | 0 | 60.0 % |" in page
    assert f"| this experiment (`{'c2' * 6} / {'f2' * 6}`) | 10 | 0 | 90.0 % |" in page
    assert "40 steps in 2.0 min" in page and "best validation step 20" in page
    assert "## Classifier training" in page and "9 steps (batch 4" in page
    assert "6 training crops" in page
    assert page.count("## Commands") == 1 and page.count("## Training") == 1
    assert "- train: `x`" in page
    assert "## Erratum" not in page
    exp = json.loads((folder / "experiment.json").read_text())
    (folder / "experiment.json").write_text(json.dumps({**exp, "erratum": "the data was off"}))
    page = _render()(folder)
    assert page.index("## Verdict") < page.index("## Erratum\n\nthe data was off")
