"""Evaluation rows and summary of ``evaluate-fracture`` (AnkleFractureLib.evaluation.evaluate_fracture)."""

from __future__ import annotations

import numpy as np
import pytest

from AnkleFractureLib.evaluation.evaluate_fracture import case_row, summarise_rows


def _result(matrix: np.ndarray, prediction: str = "B") -> dict:
    probs = {c: (0.7 if c == prediction else 0.1) for c in ("none", "A", "B", "C")}
    return {"prediction": prediction, "probabilities": probs, "classifier_probabilities": probs,
            "fracture": {"found": True, "height_mm": 10.0, "center_lps": [1.0, 2.0, 3.0]},
            "registration": {"patient_to_template": matrix.tolist(), "rms_mm": 1.0,
                             "inlier_fraction": 0.9, "scale": 1.0}}


def _pose(shift_lps: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """patient -> template: scale, a 90 degree turn about z, and a shift (template mm)."""
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    m = np.eye(4)
    m[:3, :3] = scale * rot
    m[:3, 3] = shift_lps
    return m


def test_registration_row_measures_the_plafond_error_in_both_frames() -> None:
    true_plafond = np.array([10.0, -20.0, 30.0])
    m = _pose(np.zeros(3), scale=2.0)
    # Put the template's origin 1.5 mm above and 2 mm beside the true plafond (template mm).
    m[:3, 3] = -(m[:3, :3] @ true_plafond) + np.array([2.0, 0.0, -1.5])
    row = case_row("c1", {"weber": "B", "height_mm": 9.0, "center_lps": [1.0, 2.0, 4.0],
                          "plafond_lps": true_plafond.tolist()}, _result(m))
    reg = row["registration"]
    assert reg["plafond_offset_template_mm"] == pytest.approx([2.0, 0.0, -1.5], abs=1e-6)
    # Patient mm: the template offset shrinks by the scale (2).
    assert reg["plafond_error_mm"] == pytest.approx(np.hypot(2.0, 1.5) / 2.0, abs=0.01)
    assert row["abs_height_error_mm"] == pytest.approx(1.0)


def test_summary_reports_plafond_errors_and_none_without_truth() -> None:
    rows = []
    for k, (dz, dx) in enumerate([(0.5, 0.0), (-1.0, 3.0), (3.0, 0.0)]):
        true_plafond = np.zeros(3)
        m = _pose(np.array([dx, 0.0, dz]))
        rows.append(case_row(f"c{k}", {"weber": "B", "height_mm": 10.0, "center_lps": None,
                                       "plafond_lps": true_plafond.tolist()}, _result(m)))
    summary = summarise_rows(rows)["registration"]
    assert summary["n"] == 3
    assert summary["median_plafond_error_mm"] == pytest.approx(3.0, abs=0.01)
    assert summary["max_plafond_error_mm"] == pytest.approx(np.hypot(1.0, 3.0), abs=0.01)
    assert summary["plafond_within_2mm"] == pytest.approx(1 / 3, abs=1e-3)
    assert summary["median_plafond_height_error_mm"] == pytest.approx(1.0)
    assert summary["max_plafond_height_error_mm"] == pytest.approx(3.0)
    no_truth = [case_row("x", {"weber": "B", "height_mm": 10.0, "center_lps": None},
                         _result(_pose(np.zeros(3))))]
    assert summarise_rows(no_truth)["registration"] is None


def test_registration_line_reads_the_summary_of_real_files() -> None:
    import json
    from pathlib import Path

    from AnkleFractureLib.evaluation.evaluate_fracture import registration_line

    data = json.loads((Path(__file__).resolve().parents[1] / "docs" / "fracture" /
                       "heldout_vh.json").read_text())
    line = registration_line(data["summary"])
    reg = data["summary"]["registration"]
    assert line is not None and f"median {reg['median_plafond_error_mm']} mm" in line
    assert f"({reg['n']} fits)" in line
    assert registration_line({"registration": None}) is None


def test_gradcam_peak_is_scored_against_the_fracture_centre() -> None:
    """The heatmap's maximum (result.json gradcam.peak_lps) is measured from the true fracture
    centre on fractured cases: median distance and the share within 15 mm; results without
    the peak (older files) give no Grad-CAM summary."""
    truth = {"weber": "B", "height_mm": 10.0, "center_lps": [0.0, 0.0, 0.0]}
    rows = []
    for k, dz in enumerate([5.0, 12.0, 40.0]):
        res = _result(_pose(np.zeros(3)))
        res["gradcam"] = {"method": "hirescam", "layers": ["layer1"], "cell_mm": None,
                          "ct_box": None, "peak_lps": [3.0, 4.0, dz]}
        rows.append(case_row(f"c{k}", truth, res))
    assert rows[0]["gradcam_peak_distance_mm"] == pytest.approx(np.sqrt(9 + 16 + 25), abs=0.01)
    intact = case_row("n", {"weber": "none", "height_mm": None, "center_lps": None},
                      _result(_pose(np.zeros(3)), "none"))
    assert intact["gradcam_peak_distance_mm"] is None
    cam = summarise_rows(rows + [intact])["gradcam"]
    assert cam["n"] == 3 and cam["hit_rate"] == pytest.approx(2 / 3, abs=1e-3)
    assert cam["median_peak_distance_mm"] == pytest.approx(np.sqrt(25 + 144), abs=0.01)
    old = [case_row("c", truth, _result(_pose(np.zeros(3))))]
    assert summarise_rows(old)["gradcam"] is None
