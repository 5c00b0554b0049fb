"""scripts/line_gap_summary.py: gap_hu of candidate lines grouped by where they lie."""

from __future__ import annotations

import json

from conftest import load_script


def test_lines_are_grouped_by_the_true_fracture_and_unmeasured_ones_left_out(tmp_path):
    rows = [{"true": "B", "refused": False, "height_true_mm": 5.0,
             "candidates": [{"height_mm": 6.0, "gap_hu": -120.0},
                            {"height_mm": 40.0, "gap_hu": -10.0},
                            {"height_mm": 5.0, "gap_hu": None}]},
            {"true": "none", "refused": False, "height_true_mm": None,
             "candidates": [{"height_mm": 4.0, "gap_hu": 3.0}]},
            {"true": "C", "refused": True, "candidates": [{"height_mm": 60.0, "gap_hu": -300.0}]}]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"cases": rows}))
    out = tmp_path / "s.json"
    assert load_script("line_gap_summary").main([str(path), "--out", str(out)]) == 0
    groups = json.loads(out.read_text())["groups"]
    assert groups["at the fracture"]["n"] == 1
    assert groups["at the fracture"]["percentiles_hu"]["50"] == -120.0
    assert groups["elsewhere on fractured"]["percentiles_hu"]["50"] == -10.0
    assert groups["on intact"]["n"] == 1 and groups["on intact"]["percentiles_hu"]["50"] == 3.0
