"""``ankle-fracture demo``: the whole pipeline with the shipped models on one phantom per class,
both sides; the table sets each answer beside the truth, and a second run reuses the results."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from AnkleFractureLib.cli.main import main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    return out


def test_demo_classifies_one_phantom_per_class_on_both_sides(demo, capsys):
    index = json.loads((demo / "phantoms" / "dataset.json").read_text())
    truth = {c["id"]: (c["weber"], c["side"]) for c in index["cases"]}
    assert sorted(w for w, _ in truth.values()) == ["A", "B", "C", "none"]
    assert {s for _, s in truth.values()} == {"left", "right"}
    with open(demo / "results" / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["id"] for r in rows] == list(truth)
    for row in rows:
        assert row["status"] == "ok" and not row["error"]
        p = [float(row[f"p_{c}"]) for c in ("none", "A", "B", "C")]
        assert sum(p) == pytest.approx(1.0, abs=1e-3)
        # The shipped models get every demo phantom's class and side right.
        assert (row["prediction"], row["side"]) == truth[row["id"]]
        assert (demo / "results" / row["id"] / "report.png").is_file()
        assert (demo / "phantoms" / "previews" / f"{row['id']}.png").is_file()


def test_demo_prints_the_table_and_a_second_run_reuses_everything(demo, capsys):
    results = sorted((demo / "results").glob("*/result.json"))
    stamps = [p.stat().st_mtime_ns for p in results]
    images = sorted((demo / "phantoms" / "images").glob("*.nii.gz"))
    image_stamps = [p.stat().st_mtime_ns for p in images]
    capsys.readouterr()
    assert main(["demo", "--out", str(demo), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "4 of 4 classified as their true class" in out
    assert "not for clinical use" in out
    for line in ("true", "answer", "found side"):
        assert line in out
    assert [p.stat().st_mtime_ns for p in results] == stamps
    assert [p.stat().st_mtime_ns for p in images] == image_stamps
