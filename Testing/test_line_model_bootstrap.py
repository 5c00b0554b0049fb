"""scripts/line_model_bootstrap.py: the bootstrap of the line model reproduces v28's committed
figures, separates a steady feature set from a noisy one, and refuses bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "line_model_bootstrap.py"
EXPERIMENTS = REPO / "docs" / "fracture" / "experiments"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_the_committed_bootstrap_is_reproduced_from_the_committed_runs(tmp_path) -> None:
    """v28's line_model_bootstrap.json, rerun from v26's validation runs and v27's decision
    (its committed plans.json), gives the same weights and out-of-bag figures for the three- and
    seven-feature sets, and the three-feature model is the steadier one (the page's claim)."""
    committed = json.loads((EXPERIMENTS / "v28_steady_line_model"
                            / "line_model_bootstrap.json").read_text())
    shutil.copy(EXPERIMENTS / "v27_v25_rule_fast_measure" / "plans.json", tmp_path / "plans.json")
    wanted = {k: committed["sets"][k] for k in ("three", "full7")}
    features = [f"{k}={','.join(v['features'])}" for k, v in wanted.items()]
    out = tmp_path / "boot.json"
    done = _run("--fit", *committed["fit_sets"], "--shipped", str(tmp_path), "--features",
                *features, "--boots", str(committed["boots"]), "--seed",
                str(committed["seed"]), "--out", str(out))
    assert done.returncode == 0, done.stderr
    again = json.loads(out.read_text())
    assert again["cases"] == committed["cases"] == 104
    assert again["sets"] == wanted
    three, full = again["sets"]["three"], again["sets"]["full7"]
    assert three["weights_sd"][0] < full["weights_sd"][0]
    assert three["oob_mean"]["found_on_none_rate"] < full["oob_mean"]["found_on_none_rate"]
    assert 0.0 <= three["oob_mean"]["accuracy"] <= 1.0 and three["oob_sd"]["accuracy"] > 0


def test_the_same_seed_gives_the_same_figures_and_another_seed_other_ones(tmp_path) -> None:
    shutil.copy(EXPERIMENTS / "v27_v25_rule_fast_measure" / "plans.json", tmp_path / "plans.json")
    fit = [str(EXPERIMENTS / "v26_fast_gap_measure" / "val.json")]
    runs = []
    for seed in ("3", "3", "4"):
        out = tmp_path / f"b{len(runs)}.json"
        done = _run("--fit", *fit, "--shipped", str(tmp_path), "--features",
                    "two=bias,section_ratio_over_10", "--boots", "5", "--seed", seed,
                    "--out", str(out))
        assert done.returncode == 0, done.stderr
        runs.append(json.loads(out.read_text())["sets"]["two"])
    assert runs[0] == runs[1]
    assert runs[0]["weights"] == runs[2]["weights"]  # the fit on every row: no resampling
    assert runs[0]["oob_mean"] != runs[2]["oob_mean"]


@pytest.mark.parametrize("args, message", [
    (["--features", "x=bias,shape"], "--features 'x=bias,shape'"),
    (["--features", "=bias"], "--features '=bias'"),
    (["--features", "x=bias", "--boots", "1"], "--boots must be at least 2"),
])
def test_bad_arguments_are_refused_with_the_reason(tmp_path, args, message) -> None:
    shutil.copy(EXPERIMENTS / "v27_v25_rule_fast_measure" / "plans.json", tmp_path / "plans.json")
    done = _run("--fit", str(EXPERIMENTS / "v26_fast_gap_measure" / "val.json"), "--shipped",
                str(tmp_path), *args)
    assert done.returncode == 2 and message in done.stderr


def test_a_decision_without_a_scored_line_model_is_refused(tmp_path) -> None:
    (tmp_path / "plans.json").write_text(json.dumps({"decision": {"select": "strongest"}}))
    done = _run("--fit", str(EXPERIMENTS / "v26_fast_gap_measure" / "val.json"), "--shipped",
                str(tmp_path), "--features", "two=bias,section_ratio_over_10")
    assert done.returncode != 0 and "select 'scored'" in done.stderr
    assert "Traceback" not in done.stderr
