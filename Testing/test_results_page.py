"""docs/results.md is generated from the artefacts committed beside it (results_runs.json,
results_findings.md, results_reference.json, the model card's metrics files): regenerating it
gives the committed page, its tables match the runs, and the findings template types no
figure by hand."""

from __future__ import annotations

import json
import re

import numpy as np

from conftest import REPO_ROOT, load_script

DOCS = REPO_ROOT / "docs"


def _script():
    return load_script("cls_experiment")


def test_committed_page_is_the_scripts_output_from_the_committed_runs(tmp_path):
    out = tmp_path / "results.md"
    assert _script().main(["--from-json", str(DOCS / "results_runs.json"), "--out",
                           str(out)]) == 0
    assert out.read_text() == (DOCS / "results.md").read_text(), (
        "docs/results.md is stale: python scripts/cls_experiment.py --from-json "
        "docs/results_runs.json")


def test_accuracy_table_matches_the_runs():
    data = json.loads((DOCS / "results_runs.json").read_text())
    page = (DOCS / "results.md").read_text()
    rows = {"supervised (labelled only)": ("supervised", "registered"),
            "FixMatch": ("fixmatch", "registered"), "semi, raw CT": ("semi", "raw")}
    for title, (method, crop) in rows.items():
        line = next(ln for ln in page.splitlines() if ln.startswith(f"| {title} |") and "±" in ln)
        cells = [c.strip() for c in line.strip("|").split("|")[1:]]
        for cell, f in zip(cells, data["options"]["fractions"]):
            acc = 100 * np.array([r["accuracy"] for r in data["runs"] if r["method"] == method
                                  and r["crop"] == crop and r["fraction"] == f])
            assert cell == f"{acc.mean():.1f} ± {acc.std(ddof=1):.1f}", (title, f)


def test_findings_template_types_no_figure_by_hand():
    opts = json.loads((DOCS / "results_runs.json").read_text())["options"]
    settings = {round(100 * f) for f in opts["fractions"]} | {25}  # label fractions, chance
    bare = _script().FINDING.sub("X", (DOCS / "results_findings.md").read_text())
    assert "±" not in bare
    assert not re.findall(r"\d\.\d(?!\d* mm)", bare)  # decimals only in settings (1.5 mm)
    for value in re.findall(r"(\d+(?:\.\d+)?)\s*%", bare):
        assert float(value) in settings, f"hand-typed {value} % in results_findings.md"


def test_runs_before_side_detection_are_marked():
    opts = json.loads((DOCS / "results_runs.json").read_text())["options"]
    page = (DOCS / "results.md").read_text()
    if opts.get("test_side") != "detect":
        assert "These runs predate automatic side detection in evaluation" in page
        assert "--runs /work/runs/cls_experiment_side_detect" in page
