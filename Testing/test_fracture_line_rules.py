"""Which localiser lines can be a fibular fracture: lines that cut the fibula, not lines at the
scan's edge or next to metal; the crop's in-scan and metal masks; the found rule refitted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from AnkleFractureLib.fracture.localise import (cut_depth, cut_fraction, drop_touching,
                                                ignored_zones, strongest_line)
from AnkleFractureLib.geometry.volume import Volume


def _fibula_and_lines():
    """A fibula column (z 10-59) with a tip at z 10; a line crossing it at z 35 (60 voxels),
    and a larger blob hugging the tip's outer surface (z 8-14, beside and below the bone)."""
    fib = np.zeros((60, 20, 20), bool)
    fib[10:, 6:12, 6:12] = True
    prob = np.zeros(fib.shape, np.float32)
    prob[35:37, 5:13, 5:13] = 0.95  # crossing line: cuts the bone below it off
    prob[6:16, 12:15, 4:14] = 0.99  # surface of the tip (a joint, a screw): shaves the bone
    prob[6:10, 4:14, 4:14] = 0.99
    return fib, prob


def test_cut_depth_sees_a_line_that_leaves_a_thin_bridge_of_bone() -> None:
    """The segmentation fills part of a hairline's gap: the line leaves a corner of the
    section (a one-voxel-wide bridge along z), so the bone stays connected (cut_fraction 0),
    but the line goes 97 % of the way through (cut_depth); a shaving line and the tip stay
    near 0 on both."""
    fib, prob = _fibula_and_lines()
    bridged = np.zeros_like(fib)
    bridged[35:37] = prob[35:37] > 0.5
    fib_b = fib.copy()
    fib_b[:, 5, 5] = fib_b[:, 6, 6]  # a corner voxel column that the grown line misses...
    bridged[:, 3:8, 3:8] = False     # ...and the line stops short of it
    assert cut_fraction(fib_b, bridged) == 0.0
    assert cut_depth(fib_b, bridged, grow=0) > 0.5
    crossing = np.zeros_like(fib)
    crossing[35:37] = prob[35:37] > 0.5
    assert cut_depth(fib, crossing) == pytest.approx(1.0)
    shaving = (prob > 0.5) & ~crossing
    assert cut_depth(fib, shaving) == 0.0  # it reaches below the fibula: the tip
    groove = np.zeros_like(fib)
    groove[30:33, 6:12, 6] = True  # one column of the section's side, 3 slices
    assert 0.0 < cut_depth(fib, groove, grow=0) < 0.2
    top = np.zeros_like(fib)
    top[57:60, 5:13, 5:13] = True
    assert cut_depth(fib, top) == 1.0


def test_cut_fraction_tells_a_crossing_line_from_a_shaving_one() -> None:
    fib, prob = _fibula_and_lines()
    crossing = np.zeros_like(fib)
    crossing[35:37] = prob[35:37] > 0.5
    shaving = (prob > 0.5) & ~crossing
    assert cut_fraction(fib, crossing) == pytest.approx(1.0)
    assert cut_fraction(fib, shaving) < 0.1
    # nothing below the line (the tip itself), or no fibula at all: no cut
    tip = np.zeros_like(fib)
    tip[10:12, 5:13, 5:13] = True
    assert cut_fraction(fib, tip) == 0.0
    assert cut_fraction(np.zeros_like(fib), crossing) == 0.0
    # a line that reaches the crop's last slice cannot be tested: it is not rejected
    top = np.zeros_like(fib)
    top[57:60, 5:13, 5:13] = True
    assert cut_fraction(fib, top) == 1.0


def test_strongest_line_with_a_cut_rule_skips_the_larger_shaving_blob() -> None:
    fib, prob = _fibula_and_lines()
    big, _ = strongest_line(prob, 0.5)
    assert big[8].any() and not big[35].any()  # size alone: the blob wins
    mask, peak = strongest_line(prob, 0.5, fib, min_cut=0.5)
    assert mask[35].any() and not mask[8].any() and peak == pytest.approx(0.95)
    none, _ = strongest_line(np.where(mask, 0.0, prob), 0.5, fib, min_cut=0.5)
    assert not none.any()  # only the shaving blob left: no candidate


def test_lines_at_the_scan_edge_are_dropped_and_metal_voxels_masked() -> None:
    in_scan = np.ones((40, 10, 10), bool)
    in_scan[30:] = False  # the scan ends at slice 30
    metal = np.zeros_like(in_scan)
    metal[10, 4:6, 4:6] = True
    zones = ignored_zones(in_scan, metal, 1.5)
    prob = np.zeros(in_scan.shape, np.float32)
    prob[24:29, 2:8, 2:8] = 0.9  # reaches within 4.5 mm of the edge: the bone's cut face
    prob[15, 2:8, 2:8] = 0.9     # a line well inside the scan
    dropped = drop_touching(prob, 0.5, zones["scan_edge"])
    assert dropped == 5 * 36
    assert not prob[24:29].any() and np.allclose(prob[15, 2:8, 2:8], 0.9)
    assert zones["metal"][10, 4, 4] and zones["metal"][12, 4, 4] and not zones["metal"][14, 4, 4]
    # a crop wholly inside the scan, without metal: nothing to ignore
    assert ignored_zones(np.ones((5, 5, 5), bool), np.zeros((5, 5, 5), bool), 1.5) == {}
    assert ignored_zones(None, None, 1.5) == {}


def test_crop_knows_where_the_scan_ends_and_where_metal_is() -> None:
    """A CT that ends 20 mm above the plafond, with a 3000 HU screw: the crop's in-scan mask
    ends there and its metal mask holds the screw, both on the crop grid."""
    from AnkleFractureLib.crop.syndesmosis import crop_syndesmosis
    from AnkleFractureLib.registration.template import load_template

    template = load_template()
    arr = np.full((40, 120, 140), -50.0, np.float32)  # z from -40 to +39 mm (1 mm), soft tissue
    arr[30:33, 50:54, 40:44] = 3000.0  # a screw at z -10..-8 mm
    ct = Volume(arr, (1.0, 1.0, 1.0), (-70.0, -60.0, -40.0), np.eye(3))
    crop = crop_syndesmosis(ct, None, np.eye(4), template)
    nz = crop.channels.shape[1]
    z_mm = crop.grid.origin[2] + crop.grid.spacing[2] * np.arange(nz)
    assert crop.in_scan.shape == crop.channels.shape[1:]
    assert crop.in_scan[z_mm < -1.0].any() and not crop.in_scan[z_mm > 0.5].any()
    assert crop.coverage == pytest.approx(float(crop.in_scan.mean()))
    kk = np.nonzero(crop.metal)[0]
    assert kk.size > 0 and np.all(np.abs(z_mm[kk] + 9.0) < 3.0)


def test_refit_decision_records_the_new_rule_and_keeps_the_training_record(tmp_path,
                                                                             monkeypatch):
    from test_fracture_localise import _line_samples

    from AnkleFractureLib.training import fracture_train as ft

    monkeypatch.setattr(ft, "load_samples", lambda paths: _line_samples(6))
    cfg = ft.FractureTrainConfig(steps=4, batch_size=2, eval_every=2, val_fraction=0.34,
                                 seed=5, threads=1, device="cpu", features=(4, 4, 8, 8, 8, 4))
    ft.train_localiser([], tmp_path, cfg, command="train")
    before = json.loads((tmp_path / "training.json").read_text())
    fit = ft.refit_decision(tmp_path, [], command="refit", device="cpu", cut_rule=True)
    after = json.loads((tmp_path / "training.json").read_text())
    plans = json.loads((tmp_path / "plans.json").read_text())
    assert set(fit) >= {"found_threshold", "min_voxels", "min_cut", "found_rate"}
    assert plans["decision"]["min_cut"] == fit["min_cut"] in ft.DECISION_GRID["min_cut"]
    assert after["command"] == before["command"] == "train"
    assert after["decision_refit"]["command"] == "refit"
    assert after["decision_refit"]["previous"]["min_voxels"] == before["decision_fit"]["min_voxels"]
    # without the cut rule the fit never turns it on
    assert ft.refit_decision(tmp_path, [], device="cpu")["min_cut"] == 0.0


def test_candidates_list_every_line_strongest_first_with_its_cut_and_section() -> None:
    from AnkleFractureLib.fracture.localise import line_candidates, section_ratio

    fib, prob = _fibula_and_lines()
    prob[50, 7:9, 7:9] = 0.9  # a 4-voxel speck: below the listing size
    found = line_candidates(prob, 0.5, fib, min_voxels=30)
    assert len(found) == 2
    (tip_mask, tip), (line_mask, line) = found
    assert tip["mass"] > line["mass"] and tip["voxels"] > line["voxels"]
    assert line["voxels"] == 2 * 8 * 8 and line["probability"] == pytest.approx(0.95)
    assert line["cut_fraction"] == pytest.approx(1.0) and tip["cut_fraction"] < 0.1
    # 128 voxels over a 36-voxel section: a complete line about 2 voxels thick / cos(tilt)
    assert line["section_ratio"] == pytest.approx(128 / 36, abs=1e-3)
    assert section_ratio(fib, line_mask) == pytest.approx(line["section_ratio"], abs=1e-3)
    assert line_candidates(prob, 0.5, fib, min_voxels=30, limit=1)[0][1] == tip
    assert line_candidates(np.zeros_like(prob), 0.5, fib) == []
    # without a fibula mask, only the line's own figures
    assert set(line_candidates(prob, 0.5, None)[0][1]) == {"voxels", "mass", "probability"}
    # no fibula where the line is: no section to compare with
    assert section_ratio(np.zeros_like(fib), line_mask) == 0.0


def test_mixture_of_lines_lets_the_classifier_choose_between_a_tip_line_and_a_true_one() -> None:
    from AnkleFractureLib.fracture.weber_height import combine, combine_lines

    tip = {"voxels": 900, "mass": 700.0, "probability": 0.99, "height_mm": -6.0,
           "section_ratio": 0.6}
    high = {"voxels": 350, "mass": 300.0, "probability": 0.97, "height_mm": 45.0,
            "section_ratio": 2.4}
    says_c = {"none": 0.05, "A": 0.1, "B": 0.15, "C": 0.7}
    says_a = {"none": 0.05, "A": 0.7, "B": 0.15, "C": 0.1}
    strongest = {"select": "strongest", "found_threshold": 0.5, "min_voxels": 30}
    # the shipped rule: the tip line alone speaks, and A outweighs the classifier's C
    o, line = combine_lines(says_c, [tip, high], strongest)
    assert (o.prediction, line) == ("A", tip)
    ref = combine(says_c, True, 0.99, -6.0)  # same answer as the one-line combination
    assert o.probabilities == pytest.approx(ref.probabilities)
    assert not o.agree and "Weber A level" in o.reasons[0]
    # the mixture keeps both heights; the classifier decides, and the reported line follows
    mixture = {**strongest, "select": "mixture"}
    o, line = combine_lines(says_c, [tip, high], mixture)
    assert (o.prediction, line, o.agree, o.reasons) == ("C", high, True, [])
    o, line = combine_lines(says_a, [tip, high], mixture)
    assert (o.prediction, line) == ("A", tip)
    assert sum(o.probabilities.values()) == pytest.approx(1.0)
    # a section rule drops the tip line, which shaves rather than crosses the bone
    o, line = combine_lines(says_a, [tip, high], {**mixture, "min_section": 1.0})
    assert line == high and o.height_class == "C" and not o.agree
    # "qualified": the strongest line that passes; no line passes: "none" from the localiser
    o, line = combine_lines(says_c, [tip, high], {**strongest, "select": "qualified",
                                                  "min_section": 1.0})
    assert (o.prediction, line) == ("C", high)
    o, line = combine_lines(says_c, [tip, high], {**strongest, "min_voxels": 1000})
    assert line is None and o.height_class is None and o.probabilities["none"] > 0.05
    assert "no fibular fracture line was located" in o.reasons[0]


def test_a_localiser_with_a_line_rule_reports_the_line_the_combination_chose() -> None:
    from AnkleFractureLib.fracture.localise import FractureFinding, FractureLocaliser

    fib, prob = _fibula_and_lines()
    rule = {"select": "mixture", "found_threshold": 0.5, "min_voxels": 30, "min_section": 0.0}
    loc = FractureLocaliser(None, {"decision": rule}, "cpu")
    lines = line_candidates_with_heights(prob, fib, {0: -8.0, 1: 40.0})  # tip, crossing
    crossing = lines[1][0]
    says_c = {"none": 0.05, "A": 0.1, "B": 0.15, "C": 0.7}
    mask, peak = loc._chosen_line(prob, lines, says_c, 1.0)
    assert np.array_equal(mask, crossing) and peak == pytest.approx(0.95)
    # without the classifier: the strongest qualifying line (the larger blob)
    mask, peak = loc._chosen_line(prob, lines, None, 1.0)
    assert np.array_equal(mask, lines[0][0])
    # no line qualifies: nothing found, the map's peak
    strict = FractureLocaliser(None, {"decision": {**rule, "min_voxels": 10 ** 6}}, "cpu")
    mask, peak = strict._chosen_line(prob, lines, says_c, 1.0)
    assert not mask.any() and peak == pytest.approx(float(prob.max()))
    # the opinion uses every candidate with a rule, the found line alone without one
    finding = FractureFinding(True, 0.99, 40.0, [0.0, 0.0, 0.0], None, candidates=[
        st for _, st in lines])
    assert loc.opinion(says_c, finding).prediction == "C"
    legacy = FractureLocaliser(None, {"decision": {"min_voxels": 30}}, "cpu")
    finding.height_mm = -8.0
    assert legacy.opinion(says_c, finding).prediction == "A"


def line_candidates_with_heights(prob, fib, heights):
    """line_candidates with a made-up height per line (the crop grid is not needed here)."""
    from AnkleFractureLib.fracture.localise import line_candidates

    lines = line_candidates(prob, 0.5, fib, min_voxels=30)
    for k, (_, st) in enumerate(lines):
        st["height_mm"] = heights[k]
    return lines


def test_a_line_model_weighs_each_line_by_its_probability_of_being_the_fracture() -> None:
    from AnkleFractureLib.fracture.weber_height import (LINE_FEATURES, combine_lines,
                                                        line_probability)

    # weights fitted on a validation set (scripts/fracture_rule_study.py), rounded
    model = {"features": list(LINE_FEATURES), "weights": [-9.85, 1.27, 2.21, 0.82, 0.14]}
    rule = {"select": "scored", "line_model": model, "min_line_probability": 0.5}
    tip = {"voxels": 250, "mass": 230.0, "probability": 0.99, "height_mm": -9.0,
           "section_ratio": 1.1, "cut_fraction": 0.0}
    true = {"voxels": 330, "mass": 300.0, "probability": 0.99, "height_mm": 47.0,
            "section_ratio": 8.5, "cut_fraction": 1.0}
    q_tip, q_true = line_probability(tip, model), line_probability(true, model)
    assert q_tip < 0.5 < q_true
    unsure = {"none": 0.3, "A": 0.2, "B": 0.15, "C": 0.35}
    o, line = combine_lines(unsure, [tip, true], rule)
    assert (o.prediction, line) == ("C", true)
    # the intact case: only the tip-surface line, and the classifier says none
    o, line = combine_lines({"none": 0.8, "A": 0.1, "B": 0.05, "C": 0.05}, [tip], rule)
    assert (o.prediction, line, o.agree) == ("none", None, True)
    # no candidate line at all: the localiser says none
    o, line = combine_lines(unsure, [], rule)
    assert o.prediction == "none" and line is None
    assert sum(o.probabilities.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="features"):
        line_probability(tip, {"features": ["bias", "shape"], "weights": [1.0, 1.0]})
    with pytest.raises(ValueError, match="weight per feature"):
        line_probability(tip, {"features": ["bias", "cut_depth"], "weights": [1.0]})


def test_a_line_model_on_cut_depth_scores_a_near_complete_cut_as_a_fracture() -> None:
    """A segmentation that fills part of a hairline's gap leaves a few fibula voxels beside the
    line: cut_fraction 0, cut_depth near 1. A model with cut_depth tells the line from a
    groove along the surface, which the shipped features cannot; an older result without
    cut_depth is read with its cut_fraction."""
    from AnkleFractureLib.fracture.weber_height import line_probability

    model = {"features": ["bias", "log_voxels", "cut_depth"], "weights": [-6.0, 1.0, 4.0]}
    hairline = {"voxels": 99, "mass": 79.3, "cut_fraction": 0.008, "cut_depth": 0.96}
    groove = {"voxels": 99, "mass": 79.3, "cut_fraction": 0.008, "cut_depth": 0.2}
    old = {"voxels": 99, "mass": 79.3, "cut_fraction": 1.0}
    assert line_probability(hairline, model) > 0.9 > 0.5 > line_probability(groove, model)
    assert line_probability(old, model) == pytest.approx(
        line_probability({**old, "cut_depth": 1.0}, model))


def test_a_line_model_on_the_ct_tells_a_gap_from_bone_and_reads_unmeasured_as_neutral() -> None:
    """dip_hu (the CT across the line against the bone 5-10 mm away, :mod:`line_density`): a
    gap of blood in cancellous bone dips a hundred HU or more; a line the network drew on
    intact bone does not. A line too small to measure (None) reads 0, and values far out are
    clipped so that one streak cannot decide alone."""
    from AnkleFractureLib.fracture.weber_height import (line_features, line_probability,
                                                        measures_density)

    model = {"features": ["bias", "log_voxels", "dip_hu_over_100"], "weights": [-7.5, 1.0, -2.0]}
    base = {"voxels": 1100, "mass": 900.0}
    gap, intact = {**base, "dip_hu": -180.0}, {**base, "dip_hu": -5.0}
    assert line_probability(gap, model) > 0.5 > line_probability(intact, model)
    assert line_features({**base, "dip_hu": None}, model["features"])[2] == 0.0
    assert line_features({**base, "dip_hu": -5000.0}, model["features"])[2] == -4.0
    assert line_features({**base, "band_hu": 2000.0}, ["band_hu_over_100"])[0] == 8.0
    assert measures_density({"line_model": model})
    assert measures_density({"measure_density": True, "line_model": {"features": ["bias"]}})
    assert not measures_density({"line_model": {"features": ["bias", "log_voxels"]}})
    assert measures_density({"line_model": {"features": ["bias"]},
                             "gap_gate": {"max_hu": -5.0, "factor": 0.0}})


def test_a_gap_gate_discounts_a_network_line_that_reads_no_gap_and_nothing_else() -> None:
    """Under a gap gate a line reading no gap (above max_hu) is discounted by the factor; a
    gap, an unmeasured line and a cortical-ring line keep their probability."""
    from AnkleFractureLib.fracture.weber_height import candidate_probability

    rule = {"line_model": {"features": ["bias"], "weights": [1.0]},
            "gap_gate": {"max_hu": -10.0, "factor": 0.25}}
    base = {"voxels": 900, "mass": 800.0}
    plain = candidate_probability(base, {"line_model": rule["line_model"]})
    assert candidate_probability({**base, "gap_hu": -60.0}, rule) == pytest.approx(plain)
    assert candidate_probability({**base, "gap_hu": None}, rule) == pytest.approx(plain)
    assert candidate_probability({**base, "gap_hu": -9.0}, rule) == pytest.approx(0.25 * plain)
    ring = {"cortex_ring": 1, "line_probability": 0.9, "gap_hu": 30.0}
    assert candidate_probability(ring, rule) == pytest.approx(0.9)


def test_expert_weights_let_a_located_line_outweigh_a_doubtful_classifier() -> None:
    from AnkleFractureLib.fracture.weber_height import LINE_FEATURES, combine_lines

    model = {"features": list(LINE_FEATURES), "weights": [-9.85, 1.27, 2.21, 0.82, 0.14]}
    high = {"voxels": 300, "mass": 265.0, "probability": 0.99, "height_mm": 90.0,
            "section_ratio": 10.0, "cut_fraction": 1.0}  # a thin-shaft Weber C line, q ~ 0.63
    said_none = {"none": 0.70, "A": 0.02, "B": 0.03, "C": 0.25}
    plain = {"select": "scored", "line_model": model, "min_line_probability": 0.5}
    o, line = combine_lines(said_none, [high], plain)
    assert (o.prediction, line) == ("none", None)
    # Weights 1 / 1 are the plain product of experts.
    same, _ = combine_lines(said_none, [high],
                            {**plain, "classifier_weight": 1.0, "localiser_weight": 1.0})
    assert same.probabilities == pytest.approx(o.probabilities)
    # Trusting the lines more than the classifier, the located line decides.
    o, line = combine_lines(said_none, [high],
                            {**plain, "classifier_weight": 0.5, "localiser_weight": 2.0})
    assert (o.prediction, line) == ("C", high)
    assert sum(o.probabilities.values()) == pytest.approx(1.0)
    # ... but not where the classifier is right and no line is convincing.
    tip = {"voxels": 250, "mass": 230.0, "probability": 0.99, "height_mm": -9.0,
           "section_ratio": 1.1, "cut_fraction": 0.0}
    o, line = combine_lines(said_none, [tip],
                            {**plain, "classifier_weight": 0.5, "localiser_weight": 2.0})
    assert (o.prediction, line) == ("none", None)


def test_hierarchical_product_asks_whether_there_is_a_fracture_before_which_class() -> None:
    """Both experts say fracture but not the same class: the flat product over the four
    classes answers "none", which neither said; the hierarchical one answers a fracture, of the
    class the line's height gives when the classifier hardly tells the classes apart."""
    from AnkleFractureLib.fracture.weber_height import combine_lines, hierarchical_product

    line = {"voxels": 600, "mass": 500.0, "probability": 0.6, "height_mm": -7.0,
            "section_ratio": 2.0}
    cls = {"none": 0.17, "A": 0.04, "B": 0.59, "C": 0.2}
    rule = {"select": "mixture", "found_threshold": 0.5, "classifier_weight": 0.75,
            "localiser_weight": 2.0}
    flat, _ = combine_lines(cls, [line], rule)
    hier, reported = combine_lines(cls, [line], {**rule, "combination": "hierarchical"})
    assert flat.prediction == "none"
    assert hier.prediction != "none" and hier.probabilities["none"] < 0.2
    assert sum(hier.probabilities.values()) == pytest.approx(1.0)
    assert reported is line  # the line is reported with the fracture it gives
    # P(fracture) is each expert's odds multiplied: two experts at 0.8 give 16:1
    both = hierarchical_product({"none": 0.2, "A": 0.8, "B": 0.0, "C": 0.0},
                                {"none": 0.2, "A": 0.8, "B": 0.0, "C": 0.0}, 1.0, 1.0)
    assert both["none"] == pytest.approx(1.0 / 17.0)
    # no line: the lines say nothing about the class (uniform), so the classifier's stands
    quiet = hierarchical_product({"none": 0.3, "A": 0.05, "B": 0.05, "C": 0.6},
                                 {"none": 0.9, "A": 0.0, "B": 0.0, "C": 0.0}, 0.75, 2.0)
    assert max(("A", "B", "C"), key=quiet.get) == "C" and quiet["none"] > 0.9
    # two experts sure of no fracture stay sure
    sure = hierarchical_product({"none": 0.97, "A": 0.01, "B": 0.01, "C": 0.01},
                                {"none": 0.99, "A": 0.0, "B": 0.01, "C": 0.0}, 0.75, 2.0)
    assert sure["none"] > 0.999
    with pytest.raises(ValueError, match="unknown combination"):
        combine_lines(cls, [line], {**rule, "combination": "sum"})


def test_classifier_override_answers_a_fracture_the_localiser_did_not_find() -> None:
    """With ``classifier_override`` t, a product that says "none" only because no line speaks
    gives way to a classifier whose P(fracture) >= t (marked unsure, with the reason); below
    t, with a located line, or without the key, the product stands."""
    from AnkleFractureLib.fracture.weber_height import LINE_FEATURES, combine_lines

    model = {"features": list(LINE_FEATURES), "weights": [-8.86, 0.98, 2.59, 1.55, 0.16]}
    shipped = {"select": "scored", "line_model": model, "min_line_probability": 0.5,
               "classifier_weight": 0.75, "localiser_weight": 2.0}
    sure_c = {"none": 0.02, "A": 0.0, "B": 0.03, "C": 0.95}  # conf3's missed C, rounded
    o, line = combine_lines(sure_c, [], shipped)
    assert o.prediction == "none"  # no line outweighs a classifier 98 % sure of a fracture
    o, line = combine_lines(sure_c, [], {**shipped, "classifier_override": 0.8})
    assert (o.prediction, line, o.agree) == ("C", None, False)
    assert o.probabilities == pytest.approx(sure_c)
    assert o.reasons == ["the classifier says Weber C (95 %), but no fibular fracture line "
                         "was located"]
    # a classifier below the threshold does not override
    doubtful = {"none": 0.3, "A": 0.05, "B": 0.05, "C": 0.6}
    o, _ = combine_lines(doubtful, [], {**shipped, "classifier_override": 0.8})
    assert o.prediction == "none"
    # a located line keeps the product's answer (here the line's own class, A)
    tip_a = {"voxels": 2000, "mass": 1900.0, "probability": 0.99, "height_mm": -8.0,
             "section_ratio": 9.0, "cut_fraction": 1.0, "mean_probability": 0.95}
    base, _ = combine_lines(sure_c, [tip_a], shipped)
    over, _ = combine_lines(sure_c, [tip_a], {**shipped, "classifier_override": 0.8})
    assert over.probabilities == pytest.approx(base.probabilities)
    # a classifier that says "none" is never overridden into a fracture
    o, _ = combine_lines({"none": 0.9, "A": 0.05, "B": 0.03, "C": 0.02}, [],
                         {**shipped, "classifier_override": 0.0})
    assert o.prediction == "none"
