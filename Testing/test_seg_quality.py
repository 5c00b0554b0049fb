"""The label-free segmentation check: labels against the bone the CT shows (no ground truth).

Correct phantom labels agree (mean Dice ~0.96 tibia, ~0.93 fibula); corrupted ones (eroded to
a core, tibia and fibula swapped on some slices, shifted 5 mm, foot bones labelled, grown into
the soft tissue) are flagged low; a scan without a leg above the ankle (the shared Visible
Human feet) is "not assessable". The finding reaches result.json, report.png and the panel.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # harmless once Testing/conftest.py does the same
    sys.path.insert(0, _HERE)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy import ndimage  # noqa: E402

from AnkleFractureLib.evaluation.label_corruptions import corrupt_labels, numpy_axis  # noqa: E402,E501
from AnkleFractureLib.evaluation.label_corruptions import lps_z as _lps_z  # noqa: E402
from AnkleFractureLib.geometry.volume import Volume  # noqa: E402
from AnkleFractureLib.phantom.generator import generate_case  # noqa: E402
from AnkleFractureLib.pipeline import checks as C  # noqa: E402
from AnkleFractureLib.pipeline.pipeline import Pipeline, PipelineOptions, write_outputs  # noqa: E402,E501
from AnkleFractureLib.pipeline.report import _info_lines  # noqa: E402
from AnkleFractureLib.segmentation import quality as Q  # noqa: E402

from conftest import REAL_CT_DIR as REAL_CT  # noqa: E402


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", params=[(10, "B", "left"), (4, "C", "right")],
                ids=["B-left", "C-right-coronal-grid"])
def case(request):
    """Phantoms: an identity grid, and one whose k axis runs anterior (leg along j)."""
    seed, weber, side = request.param
    return generate_case(seed, weber, side, "fast")


def corrupt(case, kind: str) -> Volume:
    """The phantom's label map spoilt in one of the ways a segmentation fails."""
    return corrupt_labels(case.ct, case.label, kind)


# ------------------------------------------------------------------------------ phantoms
def test_true_labels_agree(case):
    q = Q.label_free_agreement(case.ct, case.label)
    print(f"\ntrue labels: {q}")
    assert q["level"] == "ok" and q["assessable"] and q["problems"] == [] and q["reason"] == ""
    assert q["slices"] >= 50 and q["span_mm"] >= 80 and q["distal_slices"] >= 20
    # Measured on 48 phantoms: tibia 0.91-0.97, fibula 0.91-0.95 (means).
    assert q["dice_tibia_mean"] >= 0.9 and q["dice_tibia_distal"] >= 0.85
    assert q["dice_fibula_mean"] >= 0.88 and q["dice_fibula_distal"] >= 0.85
    assert q["poor_slice_fraction"] < 0.07 and q["swapped_slices"] == 0
    assert q["label_off_bone"] < 0.01 and q["label_on_other_bone"] < 0.01
    json.dumps(q)  # plain JSON values


@pytest.mark.parametrize("kind, problem", [
    ("eroded", "matches the bone on the CT poorly"),
    ("swapped", "tibia and fibula swapped"),
    ("shifted", "matches the bone on the CT poorly"),
    ("foot", "bone that is not the tibia or fibula"),
    ("grown", "lie on no bone"),
])
def test_corrupted_labels_are_flagged(case, kind, problem):
    q = Q.label_free_agreement(case.ct, corrupt(case, kind))
    print(f"\n{kind}: {q}")
    assert q["level"] == "low", q
    assert any(problem in p for p in q["problems"]), q["problems"]
    finding, = C.check_agreement(case.ct, corrupt(case, kind))
    assert (finding.level, finding.code) == ("warning", "segmentation_agreement")
    assert "segmentation_agreement" in C.UNSURE_CODES and problem in finding.message


def test_swapped_slices_are_counted(case):
    q = Q.label_free_agreement(case.ct, corrupt(case, "swapped"))
    ok = Q.label_free_agreement(case.ct, case.label)
    assert 0.2 * ok["slices"] <= q["swapped_slices"] <= 0.4 * ok["slices"]
    assert 0.2 <= q["poor_slice_fraction"] <= 0.4


def test_both_legs_labelled_assess_one_leg(case):
    # The other leg beside this one (the scan mirrored across the patient's left-right axis
    # and put next to it), both labelled: without choosing a leg, every slice would show four
    # sections and the map could not be assessed.
    x = numpy_axis(case.ct, 0)

    def wide(vol: Volume, arr: np.ndarray) -> Volume:
        return Volume(np.concatenate([arr, np.flip(arr, x)], axis=x), vol.spacing, vol.origin,
                      vol.direction)

    ct, lab = wide(case.ct, case.ct.array), wide(case.label, case.label.array)
    q = Q.label_free_agreement(ct, lab)
    assert q["level"] == "ok" and q["assessable"] and q["slices"] >= 50, q
    assert q["dice_tibia_mean"] >= 0.9 and q["dice_fibula_mean"] >= 0.88
    # ... and a wrong map of the assessed leg is still caught.
    lab_bad = wide(case.label, corrupt(case, "shifted").array)
    assert Q.label_free_agreement(ct, lab_bad)["level"] == "low"


def test_a_splint_does_not_hide_the_leg(case):
    # A posterior splint: a 3 mm plate of 900 HU across the whole scan, 8 mm behind the
    # bones (inside the working box's margin, cut by its sides). It is left out, not taken
    # for a third bone on every slice.
    y = numpy_axis(case.ct, 1)
    lab, arr = case.label.array, case.ct.array.copy()
    ys = np.flatnonzero(np.moveaxis(lab, y, 0).reshape(lab.shape[y], -1).any(axis=1))
    sign = 1 if case.ct.direction[1, 2 - y] > 0 else -1  # index direction of LPS +y
    back = ys.max() if sign > 0 else ys.min()
    step = int(round(8.0 / case.ct.spacing[2 - y])) * sign
    rows = [back + step + sign * k for k in range(int(round(3.0 / case.ct.spacing[2 - y])))]
    view = np.moveaxis(arr, y, 0)
    view[rows] = 900
    q = Q.label_free_agreement(case.ct.with_array(arr), case.label)
    assert q["level"] == "ok" and q["assessable"] and q["slices"] >= 50, q


def test_no_leg_in_view_is_not_assessable(case):
    # Only the foot and the malleoli: everything more than 5 mm above the plafond cut away.
    z = _lps_z(case.ct)
    below = np.broadcast_to(z < float(case.info["plafond_lps"][2]) + 5.0, case.ct.shape)
    ct = case.ct.with_array(np.where(below, case.ct.array, -1000).astype(np.int16))
    lab = case.label.with_array(np.where(below, case.label.array, 0).astype(np.uint8))
    q = Q.label_free_agreement(ct, lab)
    assert q["level"] == "not_assessable" and not q["assessable"]
    assert "no leg above the ankle" in q["reason"] and q["dice_tibia_mean"] is None
    finding, = C.check_agreement(ct, lab)
    assert finding.level == "info" and "not assessable" in finding.message


def test_degenerate_inputs_are_not_assessable():
    ct = Volume(np.full((20, 30, 30), -1000, np.int16))
    empty = Volume(np.zeros((20, 30, 30), np.uint8))
    assert Q.label_free_agreement(ct, empty)["reason"] == "no tibia or fibula labelled"
    other = Volume(np.ones((20, 30, 30), np.uint8), spacing=(2.0, 2.0, 2.0))
    q = Q.label_free_agreement(ct, other)
    assert q["level"] == "not_assessable" and "grid" in q["reason"]
    # Labels on air: low even without a leg to compare with.
    air = Q.label_free_agreement(ct, Volume(np.ones((20, 30, 30), np.uint8)))
    assert air["level"] == "low" and air["label_off_bone"] == 1.0
    assert Q.describe_agreement(air) == ("Segmentation vs CT bone: not assessable "
                                         "(labels on non-bone)")


def test_clinical_size_is_fast():
    """A 512 x 512 x 380 grid of 0.33 x 0.33 x 0.66 mm (the fast phantom, upsampled)."""
    c = generate_case(10, "none", "right", "fast")
    assert np.allclose(c.ct.direction, np.eye(3))
    zoom = (2, 3, 3)
    big = np.zeros((380, 512, 512), np.int16) - 1000
    lab = np.zeros((380, 512, 512), np.uint8)
    src = tuple(slice(0, min(n * f, b) // f) for n, f, b in zip(c.ct.shape, zoom, big.shape))
    for arr, out in ((c.ct.array, big), (c.label.array, lab)):
        up = arr[src].repeat(2, 0).repeat(3, 1).repeat(3, 2)
        out[:up.shape[0], :up.shape[1], :up.shape[2]] = up
    spacing = tuple(s / f for s, f in zip(c.ct.spacing, zoom[::-1]))
    ct_big, lab_big = Volume(big, spacing, c.ct.origin), Volume(lab, spacing, c.ct.origin)
    Q.label_free_agreement(ct_big, lab_big)  # warm-up (imports, page faults)
    t = time.perf_counter()
    q = Q.label_free_agreement(ct_big, lab_big)
    elapsed = time.perf_counter() - t
    print(f"\n512 x 512 x 380: {elapsed:.3f} s, {q['slices']} slices")
    assert q["level"] == "ok" and q["dice_tibia_mean"] > 0.9
    assert elapsed < 1.5  # ~0.2 s alone; generous for 2 shared cores


# ------------------------------------------------------------------------------ the real series
@pytest.fixture(scope="module")
def real_ct():
    if not REAL_CT.is_dir():
        pytest.skip(f"shared real CT not found at {REAL_CT}")
    from AnkleFractureLib.io import read_image

    return read_image(REAL_CT)


def _foot_label(ct: Volume, feet: str) -> Volume:
    """What the phantom-trained model makes of the feet: bone of the top 40 mm, the largest
    piece "tibia", the rest "fibula"; ``feet`` "one" (the patient's left, larger LPS x) or
    "both"."""
    bone = ct.array > 250
    bone[: ct.shape[0] - 40] = False  # identity direction, 1 mm slices: the top 40 mm
    if feet == "one":
        bone[:, :, : ct.shape[2] // 2] = False
    parts, n = ndimage.label(bone)
    sizes = np.bincount(parts.reshape(-1))[1:]
    lab = np.where(bone, 2, 0).astype(np.uint8)
    lab[parts == int(np.argmax(sizes)) + 1] = 1
    return ct.with_array(lab)


@pytest.mark.parametrize("feet", ["one", "both"])
def test_real_feet_are_not_assessable(real_ct, feet):
    """The Visible Human feet: no leg above the ankle, so nothing to compare the labels with."""
    lab = _foot_label(real_ct, feet)
    t = time.perf_counter()
    q = Q.label_free_agreement(real_ct, lab)
    print(f"\nVHF {feet} foot/feet: {time.perf_counter() - t:.2f} s {q}")
    assert q["level"] == "not_assessable" and q["slices"] == 0, q
    assert q["label_off_bone"] < 0.05  # the labels do lie on bone
    assert time.perf_counter() - t < 3.0


def test_real_feet_through_the_pipeline(real_ct, tmp_path):
    res = Pipeline(PipelineOptions(side="left", device="cpu")).run(
        real_ct, label=_foot_label(real_ct, "one"), stop_after="segment")
    agreement = [f for f in res.findings if f.code == "segmentation_agreement"]
    assert len(agreement) == 1 and agreement[0].level == "info"
    assert agreement[0].message.startswith("Segmentation vs CT bone: not assessable: ")
    assert res.refused  # the field of view check refuses the scan anyway


# ------------------------------------------------------------------------------ outputs
def test_result_json_report_and_panel_carry_the_agreement(tmp_path):
    c = generate_case(10, "B", "left", "fast")
    res = Pipeline(PipelineOptions(device="cpu")).run(c.ct, label=c.label, stop_after="segment")
    data = write_outputs(res, tmp_path, c.ct)
    saved = json.loads((tmp_path / "result.json").read_text())
    f, = [x for x in saved["findings"] if x["code"] == "segmentation_agreement"]
    assert f["level"] == "info" and f["details"]["level"] == "ok"
    assert f["details"]["dice_tibia_mean"] > 0.9 and f["details"]["slices"] > 50
    assert f["message"] not in saved["warnings"] and "report.png" in saved["files"]
    line = Q.describe_agreement(f["details"])
    assert line.startswith("Segmentation vs CT bone: tibia 0.9") and "(agrees)" in line
    assert line in _info_lines(data, [], 200)
    # A corrupted label: a warning that marks a delivered class unsure.
    bad = Pipeline(PipelineOptions(device="cpu")).run(
        c.ct, label=corrupt(c, "eroded"), stop_after="segment")
    warned = [x for x in bad.findings if x.code == "segmentation_agreement"]
    assert warned[0].level == "warning" and warned[0].message in bad.to_json()["warnings"]
    gated = C.gate_classification(bad.findings, {
        "probabilities": {"none": 0.1, "A": 0.1, "B": 0.7, "C": 0.1}, "prediction": "B",
        "uncertainty": {"unsure": False, "reasons": []}})
    assert gated["uncertainty"]["unsure"] and warned[0].message in gated["uncertainty"]["reasons"]
    # The panel (the Slicer module's logic; needs slicer-core).
    pytest.importorskip("slicer", reason="slicer-core is needed for the panel's logic")
    module_dir = Path(__file__).resolve().parents[1] / "AnkleFracture"
    if str(module_dir) not in sys.path:
        sys.path.insert(0, str(module_dir))
    from AnkleFractureSlicer.logic import describeResult

    assert describeResult(saved)["warnings"].endswith("\n" + line)
    assert "LOW agreement" in describeResult(bad.to_json())["warnings"]
