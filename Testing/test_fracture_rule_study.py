"""scripts/fracture_rule_study.py: the rule is fitted on the validation rows only, replays the
pipeline's combination, and is written into a model folder with its record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "fracture_rule_study.py"

TIP = {"voxels": 900, "mass": 700.0, "probability": 0.99, "section_ratio": 0.5,
       "cut_fraction": 0.0, "height_mm": -7.0, "found": True}


def _line(height: float, voxels: int = 250, section: float = 2.5) -> dict:
    return {"voxels": voxels, "mass": 0.8 * voxels, "probability": 0.97,
            "section_ratio": section, "cut_fraction": 1.0, "height_mm": height, "found": False}


def _row(i: int, true: str, cls: str, lines: list, h_true=None) -> dict:
    probs = {c: (0.7 if c == cls else 0.1) for c in ("none", "A", "B", "C")}
    return {"id": f"c{i}", "true": true, "refused": False, "classifier_probabilities": probs,
            "height_true_mm": h_true, "size_factor": 1.0, "candidates": lines}


def _evaluation(path: Path, rows: list) -> str:
    path.write_text(json.dumps({"cases": rows, "summary": {}}))
    return str(path)


def _rows() -> list:
    """C and B cases whose true line is smaller than a tip line the shipped rule picks, A cases
    with only the tip line, intact cases with the tip line or nothing."""
    rows = []
    for i in range(4):
        rows.append(_row(i, "C", "C", [dict(TIP), _line(45.0)], 45.5))
        rows.append(_row(10 + i, "B", "B", [dict(TIP), _line(12.0)], 11.0))
        rows.append(_row(20 + i, "A", "A", [dict(TIP, height_mm=-6.0, section_ratio=2.0)], -5.0))
        rows.append(_row(30 + i, "none", "none", [] if i % 2 else [_line(20.0, 40, 0.3)]))
    return rows


def test_the_fitted_rule_beats_the_shipped_one_and_is_written_with_its_record(tmp_path) -> None:
    val = _evaluation(tmp_path / "val.json", _rows())
    other = _evaluation(tmp_path / "other.json", _rows()[:8])
    model = tmp_path / "model"
    model.mkdir()
    (model / "plans.json").write_text(json.dumps({"decision": {"threshold": 0.5,
                                                               "found_threshold": 0.5,
                                                               "min_voxels": 400}}))
    (model / "training.json").write_text(json.dumps({"command": "train it", "decision_fit": {}}))
    done = subprocess.run([sys.executable, str(SCRIPT), "--fit", val, "--score",
                           f"other={other}", "--out", str(tmp_path / "study"),
                           "--write-plans", str(model)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    study = json.loads((tmp_path / "study" / "study.json").read_text())
    fit = study["sets"]["fit (validation)"]
    assert fit["shipped"]["accuracy"] == pytest.approx(0.5)  # B and C called A: the tip wins
    assert fit["fitted"]["accuracy"] == 1.0 and fit["fitted"]["found_rate"] == 1.0
    assert fit["fitted"]["found_on_none_rate"] == 0.0
    assert study["fitted_rule"]["select"] in ("qualified", "mixture")
    assert set(study["sets"]) == {"fit (validation)", "other"}
    plans = json.loads((model / "plans.json").read_text())
    assert plans["decision"] == {"threshold": 0.5, "found_threshold": 0.5, "min_voxels": 400,
                                 **study["fitted_rule"]}
    record = json.loads((model / "training.json").read_text())
    assert record["command"] == "train it"  # the training record is kept
    assert record["decision_refit"]["previous"]["min_voxels"] == 400
    assert record["decision_refit"]["validation"]["accuracy"] == 1.0
    page = (tmp_path / "study" / "README.md").read_text()
    assert "| fit (validation) | fitted | 1.000 |" in page and "| other | shipped |" in page
    # fitted again: the record still names the rule the model was trained with
    again = subprocess.run([sys.executable, str(SCRIPT), "--fit", val, "--write-plans",
                            str(model)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    record = json.loads((model / "training.json").read_text())
    assert record["decision_refit"]["previous"] == {"threshold": 0.5, "found_threshold": 0.5,
                                                    "min_voxels": 400}
    # a setting put on the model folder between refits stays; the rule's own keys are refitted
    plans = json.loads((model / "plans.json").read_text())
    plans["decision"].update(density_grid_mm=1.2, min_section=99.0)
    (model / "plans.json").write_text(json.dumps(plans))
    third = subprocess.run([sys.executable, str(SCRIPT), "--fit", val, "--write-plans",
                            str(model)], capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr
    decision = json.loads((model / "plans.json").read_text())["decision"]
    assert decision["density_grid_mm"] == 1.2
    assert decision.get("min_section") == study["fitted_rule"].get("min_section")


def test_rows_without_candidates_are_refused_with_the_file_named(tmp_path) -> None:
    rows = _rows()
    del rows[0]["candidates"]
    val = _evaluation(tmp_path / "old.json", rows)
    done = subprocess.run([sys.executable, str(SCRIPT), "--fit", val], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "old.json" in done.stderr and "candidate" in done.stderr


def test_the_floor_of_the_product_of_experts_is_a_rule_parameter() -> None:
    """``rule["floor"]`` raises each expert's probabilities before the product (default
    FLOOR): with no line located, a higher floor gives the classifier's class more weight."""
    from AnkleFractureLib.fracture.weber_height import FLOOR, combine_lines

    cls = {"none": 0.1, "A": 0.02, "B": 0.03, "C": 0.85}
    tip = [{"voxels": 80, "mass": 30.0, "probability": 0.6, "height_mm": -9.0,
            "section_ratio": 0.5, "cut_fraction": 0.0}]
    rule = {"select": "mixture", "found_threshold": 0.9}  # the tip line does not qualify
    plain, _ = combine_lines(cls, tip, rule)
    same, _ = combine_lines(cls, tip, {**rule, "floor": FLOOR})
    high, _ = combine_lines(cls, tip, {**rule, "floor": 0.3})
    assert plain.probabilities == same.probabilities and plain.prediction == "none"
    assert high.probabilities["C"] > 2 * plain.probabilities["C"]
    assert abs(sum(high.probabilities.values()) - 1.0) < 1e-9


def _rerun_study(tmp_path: Path, name: str, script: str) -> tuple:
    """Run a decision study script on a copy of its committed experiment folder (the
    validation runs it names beside it); assert the page is the committed one and the held-out
    replay of the shipped rule gives the shipped pipeline's own accuracy on every set (the
    replay combines as the pipeline does). Returns (the copy, its study.json)."""
    import shutil

    experiments = REPO / "docs" / "fracture" / "experiments"
    src = experiments / name
    copy = tmp_path / name
    shutil.copytree(src, copy)
    runs = tmp_path / "v13_upper_window"
    runs.mkdir()
    for f in (experiments / "v13_upper_window").glob("baseline_val*.json"):
        shutil.copy(f, runs / f.name)
    subprocess.run([sys.executable, str(REPO / "scripts" / script), str(copy)], check=True,
                   cwd=REPO, capture_output=True)
    assert (copy / "README.md").read_text() == (src / "README.md").read_text()
    study = json.loads((copy / "study.json").read_text())
    for set_name, both in study["heldout"].items():
        run = json.loads((REPO / "docs" / "seg_v2" / "rule6_pipeline"
                          / f"heldout_{set_name}.json").read_text())
        assert both["shipped"]["accuracy"] == pytest.approx(
            run["summary"]["combined"]["accuracy"], abs=1e-4)
    return copy, study


def test_floor_study_page_is_the_rendering_of_the_committed_runs(tmp_path) -> None:
    """scripts/fracture_floor_study.py reproduces its committed page from the committed runs."""
    _, study = _rerun_study(tmp_path, "floor_refit", "fracture_floor_study.py")
    assert study["fitted_floor"] in (0.02, 0.05, 0.1, 0.2)


def test_calibration_study_page_is_the_rendering_of_the_committed_runs(tmp_path) -> None:
    """scripts/fracture_calibration_study.py reproduces its committed page from the committed
    runs, and the rule reaches a model folder only when the criterion is met."""
    import shutil

    copy, study = _rerun_study(tmp_path, "v15_calibration_family",
                               "fracture_calibration_study.py")
    assert study["n_validation"] == 104 and study["n_calibration"] == 48
    model = tmp_path / "model"
    model.mkdir()
    shipped_plans = REPO / "Resources" / "Models" / "fracture" / "plans.json"
    shutil.copy(shipped_plans, model / "plans.json")
    (model / "training.json").write_text(json.dumps({"command": "train it"}))
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "fracture_calibration_study.py"),
                           str(copy), "--write-plans", str(model)], cwd=REPO,
                          capture_output=True, text=True)
    written = json.loads((model / "plans.json").read_text())["decision"]
    if study["criterion_met"]:
        assert done.returncode == 0 and written == {**written, **study["fitted"]["rule"]}
    else:
        assert done.returncode == 1 and "not written" in done.stderr
        assert written == json.loads(shipped_plans.read_text())["decision"]


def test_line_model_features_are_chosen_and_the_record_is_on_the_page(tmp_path) -> None:
    """--features fits the line model on the named features (cut_depth among them), an unknown
    name is refused, and the experiment's criterion.json (why, criterion, verdict) is on the
    page."""
    val = _evaluation(tmp_path / "val.json", _rows())
    out = tmp_path / "study"
    out.mkdir()
    (out / "criterion.json").write_text(json.dumps({
        "written": "before the runs", "why": "thin bridges", "criterion": "ship if better",
        "verdict": "Not shipped: worse."}))
    done = subprocess.run([sys.executable, str(SCRIPT), "--fit", val, "--out", str(out),
                           "--features", "bias,log_voxels,cut_depth"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    import importlib.util

    spec = importlib.util.spec_from_file_location("fracture_rule_study", SCRIPT)
    study_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study_module)
    model = study_module.fit_line_model(_rows(), ["bias", "log_voxels", "cut_depth"])
    assert model["features"] == ["bias", "log_voxels", "cut_depth"] and len(model["weights"]) == 3
    page = (out / "README.md").read_text()
    assert "thin bridges" in page and "ship if better" in page and "Not shipped: worse." in page
    bad = subprocess.run([sys.executable, str(SCRIPT), "--fit", val, "--features",
                          "bias,shape"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown --features" in bad.stderr


def test_hierarchy_study_page_is_the_rendering_of_the_committed_runs(tmp_path) -> None:
    """scripts/fracture_hierarchy_study.py reproduces its committed page from the committed
    validation runs, and its replay of the flat rule it compared with gives the pipeline's own
    held-out accuracies in the evaluations it replays (baseline/, docs/fracture's when it was
    made), so the replay combines as the pipeline did."""
    import shutil

    src = REPO / "docs" / "fracture" / "experiments" / "hierarchical_experts"
    copy = tmp_path / src.name
    shutil.copytree(src, copy)
    subprocess.run([sys.executable, str(REPO / "scripts" / "fracture_hierarchy_study.py"),
                    str(copy)], check=True, cwd=REPO, capture_output=True)
    assert (copy / "README.md").read_text() == (src / "README.md").read_text()
    study = json.loads((copy / "study.json").read_text())
    assert study["validation"]["fitted"]["n"] == 104
    assert len(study["fit"]["grid"]) == 12
    for set_name, both in study["heldout"].items():
        run = json.loads((src / "baseline" / f"heldout_{set_name}.json").read_text())
        assert both["shipped"]["accuracy"] == pytest.approx(
            run["summary"]["combined"]["accuracy"], abs=1e-4)


def test_standardised_fit_uses_a_feature_of_small_spread_and_keeps_raw_weights():
    """--standardise: the L2 penalty no longer shrinks a feature that spans 0.8-1.0 to nothing
    (it separates the lines where the raw fit does not), and the stored weights act on the
    raw features: raw features times them give the z-scored fit's own logits."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fracture_rule_study", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng(3)
    f = rng.uniform(0.8, 1.0, 300)
    y = (f > 0.9).astype(float)
    x = np.c_[np.ones_like(f), f, rng.normal(5.0, 2.0, 300)]
    raw, std = mod._logistic(x, y, 10.0), mod._standardised_logistic(x, y, 10.0)
    acc = lambda w: float(np.mean(((x @ w) > 0) == (y > 0)))  # noqa: E731
    assert acc(raw) < 0.7 and acc(std) > 0.95
    mean, sd = x[:, 1:].mean(axis=0), x[:, 1:].std(axis=0)
    z = np.c_[x[:, :1], (x[:, 1:] - mean) / sd]
    np.testing.assert_allclose(x @ std, z @ mod._logistic(z, y, 10.0), rtol=1e-6, atol=1e-6)


def test_a_gap_gate_is_fitted_when_lines_that_read_no_gap_fool_the_line_model(tmp_path) -> None:
    """Intact ankles whose only line looks like a fracture to the network but reads no gap on
    the CT (gap_hu +10 HU), beside fractures whose lines read -90 HU: the line model on the
    network's features cannot tell them apart, a gap gate can. --keep-decision keeps the
    shipped decision's other keys in force and on record, never in the fitted rule."""
    def gap_line(height: float, gap: float) -> dict:
        return {**_line(height, 900, 12.0), "gap_hu": gap}

    rows = []
    for i in range(6):
        rows.append(_row(i, "B", "none", [gap_line(10.0, -90.0)], 10.5))
        rows.append(_row(10 + i, "none", "none", [gap_line(10.0, 10.0)]))
        rows.append(_row(20 + i, "A", "none", [gap_line(-10.0, -90.0)], -10.5))
        rows.append(_row(30 + i, "C", "none", [gap_line(45.0, -90.0)], 45.5))
    val = _evaluation(tmp_path / "val.json", rows)
    model = tmp_path / "model"
    model.mkdir()
    (model / "plans.json").write_text(json.dumps({"decision": {
        "threshold": 0.5, "min_voxels": 400, "classifier_override": 0.99}}))
    out = tmp_path / "study"
    ungated = load_script("fracture_rule_study").fit(rows)["fit_scores"]
    assert ungated["accuracy"] < 1.0 and ungated["found_on_none_rate"] > 0.0
    done = subprocess.run([sys.executable, str(SCRIPT), "--fit", val, "--gap-gate",
                           "--shipped", str(model), "--keep-decision", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    study = json.loads((out / "study.json").read_text())
    fit = study["sets"]["fit (validation)"]["fitted"]
    assert fit["accuracy"] == 1.0 and fit["found_on_none_rate"] == 0.0
    assert study["fitted_rule"]["gap_gate"]["max_hu"] < 10.0
    assert study["kept_decision"] == {"threshold": 0.5, "classifier_override": 0.99}
    assert "classifier_override" not in study["fitted_rule"]
    assert "Gap gates tried" in (out / "README.md").read_text()
    bad = subprocess.run([sys.executable, str(SCRIPT), "--fit", val, "--keep-decision"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--shipped" in bad.stderr


def test_line_model_only_refits_the_line_model_and_keeps_the_rest_of_the_rule(tmp_path) -> None:
    """--line-model-only: the fitted rule is the shipped one with a new line model on the
    features asked for; the gate, the combination and the reporting threshold are untouched,
    and a decision without a line model is refused with the reason."""
    rows = _rows()
    val = _evaluation(tmp_path / "val.json", rows)
    model = tmp_path / "model"
    model.mkdir()
    old = {"features": ["bias", "log_voxels"], "weights": [-9.0, 0.0]}  # reports no line
    decision = {"threshold": 0.5, "min_voxels": 400, "select": "scored", "line_model": old,
                "min_line_probability": 0.4, "classifier_weight": 0.75,
                "localiser_weight": 2.0, "gap_gate": {"max_hu": -20.0, "factor": 0.0},
                "classifier_override": 0.8, "density_grid_mm": 1.2}
    (model / "plans.json").write_text(json.dumps({"decision": decision}))
    (model / "training.json").write_text(json.dumps({"command": "train it"}))
    out = tmp_path / "study"
    done = subprocess.run([sys.executable, str(SCRIPT), "--fit", val, "--shipped", str(model),
                           "--line-model-only", "--features", "bias,section_ratio_over_10",
                           "--out", str(out), "--write-plans", str(model)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    study = json.loads((out / "study.json").read_text())
    rule = study["fitted_rule"]
    assert {k: v for k, v in rule.items() if k != "line_model"} == {
        k: decision[k] for k in ("min_voxels", "select", "min_line_probability",
                                 "classifier_weight", "localiser_weight", "gap_gate")}
    assert rule["line_model"]["features"] == ["bias", "section_ratio_over_10"]
    assert rule["line_model"]["weights"][1] > 0  # the true lines are the wide ones
    fit = study["sets"]["fit (validation)"]
    assert fit["shipped"]["found_rate"] == 0.0 and fit["fitted"]["found_rate"] > 0.5
    assert study["line_model_only"] and "gap_gate_grid" not in study
    written = json.loads((model / "plans.json").read_text())["decision"]
    assert written == {**decision, "line_model": rule["line_model"]}
    (model / "plans.json").write_text(json.dumps({"decision": {"select": "strongest"}}))
    bad = subprocess.run([sys.executable, str(SCRIPT), "--fit", val, "--shipped", str(model),
                          "--line-model-only"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "select 'scored'" in bad.stderr
