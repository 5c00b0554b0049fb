"""Classification metrics on hand-made examples whose answers are worked out in the comments."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from AnkleFractureLib.evaluation.cls_metrics import (
    auroc_one_vs_rest,
    brier_score,
    check_probabilities,
    classification_report,
    confusion_matrix,
    expected_calibration_error,
    format_report,
    log_loss,
    macro_auroc,
    per_class_metrics,
    reliability_bins,
)

# A fixed 4-class example, N = 14 (class ids 0 none, 1 A, 2 B, 3 C).
# Confusion matrix (rows true, columns predicted):
#            none  A  B  C   | row sum (support)
#   none       4   1  0  0   | 5
#   A          1   2  0  0   | 3
#   B          0   1  3  0   | 4
#   C          0   0  1  1   | 2
#   col sum    5   4  4  1   | 14
Y_TRUE = [0] * 5 + [1] * 3 + [2] * 4 + [3] * 2
Y_PRED = [0, 0, 0, 0, 1] + [0, 1, 1] + [1, 2, 2, 2] + [2, 3]
CM = [[4, 1, 0, 0], [1, 2, 0, 0], [0, 1, 3, 0], [0, 0, 1, 1]]


def _onehotish(y_pred, k=4, top=0.7):
    """Probabilities whose argmax is y_pred: `top` on it, the rest shared equally."""
    p = np.full((len(y_pred), k), (1.0 - top) / (k - 1))
    p[np.arange(len(y_pred)), y_pred] = top
    return p


# ------------------------------------------------------------------------- confusion matrix

def test_confusion_matrix_counts():
    cm = confusion_matrix(Y_TRUE, Y_PRED)
    assert cm.dtype == np.int64 and cm.shape == (4, 4)
    assert cm.tolist() == CM
    # Numpy input and integral floats give the same answer.
    assert confusion_matrix(np.array(Y_TRUE), np.array(Y_PRED, float)).tolist() == CM
    assert confusion_matrix([], [], 3).tolist() == [[0] * 3] * 3


@pytest.mark.parametrize("t, p, match", [
    ([0, 1], [0], "same length"),
    ([0, 4], [0, 1], r"\[0, 3\]"),
    ([0, -1], [0, 1], r"\[0, 3\]"),
    ([0, 1], [0, 1.5], "integer"),
    (["a", "b"], [0, 1], "integer"),
    ([[0, 1]], [[0, 1]], "1-D"),
])
def test_confusion_matrix_rejects_bad_input(t, p, match):
    with pytest.raises(ValueError, match=match):
        confusion_matrix(t, p)


def test_confusion_matrix_rejects_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix([0], [0], num_classes=0)


# ------------------------------------------------------------------------ per-class metrics

def test_per_class_metrics_by_hand():
    m = per_class_metrics(CM)
    # One-vs-rest counts (N = 14): TP = diagonal, FN = row - TP, FP = column - TP,
    # TN = N - TP - FN - FP.
    #   none: TP 4, FN 1, FP 1, TN 8  -> sens 4/5, spec 8/9,   prec 4/5, F1 8/(8+1+1) = 4/5
    #   A:    TP 2, FN 1, FP 2, TN 9  -> sens 2/3, spec 9/11,  prec 2/4, F1 4/(4+2+1) = 4/7
    #   B:    TP 3, FN 1, FP 1, TN 9  -> sens 3/4, spec 9/10,  prec 3/4, F1 6/(6+1+1) = 3/4
    #   C:    TP 1, FN 1, FP 0, TN 12 -> sens 1/2, spec 12/12, prec 1/1, F1 2/(2+0+1) = 2/3
    sens = [4 / 5, 2 / 3, 3 / 4, 1 / 2]
    spec = [8 / 9, 9 / 11, 9 / 10, 1.0]
    prec = [4 / 5, 2 / 4, 3 / 4, 1.0]
    f1 = [4 / 5, 4 / 7, 3 / 4, 2 / 3]
    np.testing.assert_allclose(m["sensitivity"], sens, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m["specificity"], spec, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m["precision"], prec, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m["f1"], f1, rtol=0, atol=1e-12)
    # F1 is also the harmonic mean of precision and recall.
    np.testing.assert_allclose(m["f1"], [2 * p * r / (p + r) for p, r in zip(prec, sens)])
    assert m["support"].tolist() == [5, 3, 4, 2]
    assert m["n"] == 14
    # Accuracy = trace / N = (4 + 2 + 3 + 1) / 14 = 10/14.
    assert m["accuracy"] == pytest.approx(10 / 14, abs=1e-12)
    # Macro = plain mean over the four classes:
    #   sens (0.8 + 0.6667 + 0.75 + 0.5) / 4 = 0.679167
    #   spec (0.8889 + 0.8182 + 0.9 + 1) / 4 = 0.901768
    #   prec (0.8 + 0.5 + 0.75 + 1) / 4     = 0.7625
    assert m["macro"]["sensitivity"] == pytest.approx((0.8 + 2 / 3 + 0.75 + 0.5) / 4, abs=1e-12)
    assert m["macro"]["specificity"] == pytest.approx((8 / 9 + 9 / 11 + 0.9 + 1) / 4, abs=1e-12)
    assert m["macro"]["precision"] == pytest.approx(0.7625, abs=1e-12)
    assert m["macro"]["f1"] == pytest.approx((0.8 + 4 / 7 + 0.75 + 2 / 3) / 4, abs=1e-12)


def test_absent_class_gives_nan_and_is_ignored_by_macro():
    # No case of C (3) in truth or prediction:
    #   none: TP 2 FN 0 FP 1 -> sens 1, prec 2/3;  A: TP 1 FN 1 FP 0 -> sens 1/2, prec 1
    #   B: TP 1 FN 0 FP 0 -> sens 1, prec 1;       C: TP FN FP all 0 -> sens, prec, F1 = 0/0
    #   C's specificity is 4/4 = 1 (every case is a true negative).
    m = per_class_metrics(confusion_matrix([0, 0, 1, 1, 2], [0, 0, 0, 1, 2]))
    assert math.isnan(m["sensitivity"][3])
    assert math.isnan(m["precision"][3])
    assert math.isnan(m["f1"][3])
    assert m["specificity"][3] == 1.0
    assert m["macro"]["sensitivity"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["macro"]["precision"] == pytest.approx((2 / 3 + 1 + 1) / 3)


def test_present_class_never_predicted():
    # Class 1 has 2 cases, never predicted: sensitivity 0, precision 0/0 = nan, F1 = 0
    # (2 TP / (2 TP + FP + FN) = 0 / 2).
    m = per_class_metrics(confusion_matrix([0, 1, 1], [0, 0, 0], 2))
    assert m["sensitivity"][1] == 0.0
    assert math.isnan(m["precision"][1])
    assert m["f1"][1] == 0.0


def test_empty_confusion_matrix():
    m = per_class_metrics(np.zeros((4, 4), int))
    assert math.isnan(m["accuracy"])
    assert math.isnan(m["macro"]["sensitivity"])


@pytest.mark.parametrize("cm", [np.zeros((2, 3)), [[1, -1], [0, 1]], [[0.5, 0], [0, 1]]])
def test_per_class_metrics_rejects_bad_cm(cm):
    with pytest.raises(ValueError, match="cm"):
        per_class_metrics(cm)


# -------------------------------------------------------------------------------- AUROC

def _auroc_pairs(pos, neg):
    """Brute force: fraction of (positive, negative) pairs ordered correctly, ties 1/2."""
    s = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return s / (len(pos) * len(neg))


def test_auroc_hand_example_with_tie():
    # Class 1 scores: positives (y = 1) {0.5, 0.5}, negatives (y = 0) {0.5, 0.1}.
    # Pairs: (0.5, 0.5) tie 1/2, (0.5, 0.1) 1, (0.5, 0.5) tie 1/2, (0.5, 0.1) 1 -> 3 / 4.
    # Class 0's scores are 1 - those of class 1 with the roles swapped: also 0.75.
    y = [1, 1, 0, 0]
    s1 = np.array([0.5, 0.5, 0.5, 0.1])
    probs = np.stack([1 - s1, s1], axis=1)
    assert auroc_one_vs_rest(y, probs) == pytest.approx([0.75, 0.75], abs=1e-12)
    assert macro_auroc(y, probs) == pytest.approx(0.75, abs=1e-12)


def test_auroc_perfect_and_inverted():
    y = [0, 0, 1, 1]
    good = [[0.9, 0.1], [0.6, 0.4], [0.4, 0.6], [0.2, 0.8]]
    assert auroc_one_vs_rest(y, good) == [1.0, 1.0]
    bad = [[0.1, 0.9], [0.4, 0.6], [0.6, 0.4], [0.8, 0.2]]
    assert auroc_one_vs_rest(y, bad) == [0.0, 0.0]
    # All scores tied: every pair counts 1/2.
    assert auroc_one_vs_rest(y, [[0.5, 0.5]] * 4) == [0.5, 0.5]


def test_auroc_nan_for_absent_class():
    # 4 classes, no case of C: its AUROC is undefined, the macro ignores it.
    y = [0, 1, 2, 0]
    probs = np.array([[.7, .1, .1, .1], [.1, .7, .1, .1], [.1, .1, .7, .1], [.4, .3, .2, .1]])
    auc = auroc_one_vs_rest(y, probs)
    assert auc[:3] == [1.0, 1.0, 1.0]
    assert math.isnan(auc[3])
    assert macro_auroc(y, probs) == 1.0
    # Only one class present: no negatives anywhere.
    assert all(math.isnan(a) for a in auroc_one_vs_rest([1, 1], [[.5, .5], [.2, .8]]))


def test_auroc_matches_pairwise_brute_force_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 60)
    probs = rng.dirichlet(np.ones(4), 60).round(1)  # rounding creates many ties
    auc = auroc_one_vs_rest(y, probs)
    for k in range(4):
        expected = _auroc_pairs(probs[y == k, k], probs[y != k, k])
        assert auc[k] == pytest.approx(expected, abs=1e-12)


def test_auroc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 50)
    probs = rng.dirichlet(np.ones(4), 50).round(2)
    auc = auroc_one_vs_rest(y, probs)
    for k in range(4):
        assert auc[k] == pytest.approx(metrics.roc_auc_score(y == k, probs[:, k]), abs=1e-12)


# ----------------------------------------------------------------------------- calibration

def test_ece_hand_example_two_bins():
    # n_bins = 2: bins (0, 0.5] and (0.5, 1]. Top-label confidence / correct:
    #   [.9 .1] y0 -> 0.9 right;  [.8 .2] y1 -> 0.8 wrong;  [.6 .4] y0 -> 0.6 right;
    #   [.5 .5] y0 -> 0.5 (argmax picks class 0 on the tie) right, and 0.5 is in the LOW bin.
    # Bin (0.5, 1]: 3 cases, mean conf 2.3/3, accuracy 2/3 -> gap 0.3/3 = 0.1, weight 3/4.
    # Bin (0, 0.5]: 1 case, conf 0.5, accuracy 1 -> gap 0.5, weight 1/4.
    # ECE = 0.75 * 0.1 + 0.25 * 0.5 = 0.075 + 0.125 = 0.2.
    y = [0, 1, 0, 0]
    probs = [[.9, .1], [.8, .2], [.6, .4], [.5, .5]]
    assert expected_calibration_error(y, probs, n_bins=2) == pytest.approx(0.2, abs=1e-12)
    b = reliability_bins(y, probs, n_bins=2)
    assert b["edges"].tolist() == [0.0, 0.5, 1.0]
    assert b["count"].tolist() == [1, 3]
    np.testing.assert_allclose(b["confidence"], [0.5, 2.3 / 3])
    np.testing.assert_allclose(b["accuracy"], [1.0, 2 / 3])


def test_ece_zero_when_perfectly_calibrated():
    # 10 cases at confidence 0.7 of which exactly 7 are right, 4 at confidence 1 all right:
    # every non-empty bin has accuracy == mean confidence.
    probs = np.array([[0.7, 0.1, 0.1, 0.1]] * 10 + [[0.0, 0.0, 1.0, 0.0]] * 4)
    y = [0] * 7 + [1, 2, 3] + [2] * 4
    assert expected_calibration_error(y, probs) == pytest.approx(0.0, abs=1e-12)
    b = reliability_bins(y, probs)
    assert b["count"].sum() == 14
    assert b["count"][-1] == 4                       # confidence 1.0 lands in (14/15, 1]
    assert np.isnan(b["accuracy"][0])                # empty bins are nan


def _ece_brute_force(y, probs, n_bins):
    n = len(y)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i in range(n) if lo < probs[i].max() <= hi]
        if members:
            conf = np.mean([probs[i].max() for i in members])
            acc = np.mean([float(np.argmax(probs[i]) == y[i]) for i in members])
            total += len(members) / n * abs(acc - conf)
    return total


@pytest.mark.parametrize("n_bins", [1, 5, 15])
def test_ece_matches_brute_force(n_bins):
    rng = np.random.default_rng(n_bins)
    probs = rng.dirichlet(np.full(4, 0.5), 200)
    y = rng.integers(0, 4, 200)
    expected = _ece_brute_force(y, probs, n_bins)
    assert expected_calibration_error(y, probs, n_bins) == pytest.approx(expected, abs=1e-12)


def test_brier_and_log_loss_by_hand():
    # Case 1: p = [.7 .2 .1 0], y 0 -> (.3)^2 + .2^2 + .1^2 + 0 = .09 + .04 + .01 = .14
    # Case 2: p = [.25] * 4,   y 3 -> 3 * .0625 + .75^2 = .1875 + .5625 = .75
    # Brier = (.14 + .75) / 2 = .445;  log loss = -(ln .7 + ln .25) / 2.
    probs = [[0.7, 0.2, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25]]
    y = [0, 3]
    assert brier_score(y, probs) == pytest.approx(0.445, abs=1e-12)
    assert log_loss(y, probs) == pytest.approx(-(math.log(0.7) + math.log(0.25)) / 2, abs=1e-12)
    # A true class with probability 0 is clipped at 1e-12: -ln(1e-12) = 27.631.
    assert log_loss([3], [[0.7, 0.2, 0.1, 0.0]]) == pytest.approx(-math.log(1e-12))
    # Perfect one-hot predictions: both scores 0; the worst confident mistake: Brier 2.
    assert brier_score([1], [[0, 1, 0, 0]]) == 0.0
    assert log_loss([1], [[0, 1, 0, 0]]) == 0.0
    assert brier_score([0], [[0, 1, 0, 0]]) == 2.0


@pytest.mark.parametrize("probs, match", [
    ([[0.5, 0.4, 0.0, 0.0]], "sum to 1"),
    ([[0.5, 0.5, 0.1, 0.0]], "sum to 1"),
    ([[np.nan, 0.5, 0.5, 0.0]], "finite"),
    ([[1.2, -0.2, 0.0, 0.0]], "non-negative"),
    ([0.25, 0.25, 0.25, 0.25], "shape"),
])
def test_invalid_probabilities_raise(probs, match):
    for fn in (expected_calibration_error, brier_score, log_loss, classification_report):
        with pytest.raises(ValueError, match=match):
            fn([0], probs)


def test_row_sum_tolerance_and_lengths():
    check_probabilities([[0.5, 0.50005]])                  # within 1e-4
    with pytest.raises(ValueError, match="sum to 1"):
        check_probabilities([[0.5, 0.5002]])
    with pytest.raises(ValueError, match="4 columns"):
        check_probabilities([[0.5, 0.5]], num_classes=4)
    with pytest.raises(ValueError, match="rows"):
        brier_score([0, 1], [[1.0, 0.0]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        log_loss([2], [[1.0, 0.0]])


# --------------------------------------------------------------------------------- report

def _report_inputs():
    probs = _onehotish(Y_PRED)
    ids = [f"case{i:02d}" for i in range(len(Y_TRUE))]
    return probs, ids


def test_report_values_and_json():
    probs, ids = _report_inputs()
    r = classification_report(Y_TRUE, probs, ids=ids)
    text = json.dumps(r, allow_nan=False)               # plain JSON, no NaN tokens
    assert json.loads(text) == r
    assert r["n"] == 14
    assert r["accuracy"] == pytest.approx(10 / 14)
    assert r["confusion_matrix"] == CM
    assert list(r["per_class"]) == ["none", "A", "B", "C"]
    a = r["per_class"]["A"]
    assert a["sensitivity"] == pytest.approx(2 / 3)
    assert a["specificity"] == pytest.approx(9 / 11)
    assert a["precision"] == pytest.approx(0.5)
    assert a["support"] == 3
    assert r["macro"]["precision"] == pytest.approx(0.7625)
    assert r["macro"]["auroc"] == pytest.approx(np.mean(auroc_one_vs_rest(Y_TRUE, probs)))
    # Every case has confidence 0.7 (one bin), accuracy 10/14: ECE = |10/14 - 0.7| = 1/70.
    assert r["ece"] == pytest.approx(abs(10 / 14 - 0.7), abs=1e-12)
    assert r["brier"] == pytest.approx(brier_score(Y_TRUE, probs))
    assert r["log_loss"] == pytest.approx(log_loss(Y_TRUE, probs))
    assert len(r["per_case"]) == 14
    case = r["per_case"][4]                              # true none, predicted A
    assert case["id"] == "case04" and case["true"] == "none" and case["predicted"] == "A"
    assert case["probabilities"]["A"] == pytest.approx(0.7)
    assert sum(case["probabilities"].values()) == pytest.approx(1.0)


def test_report_nan_becomes_none_and_numpy_ids():
    # No case of C: its sensitivity/precision/F1/AUROC are undefined -> None.
    y = np.array([0, 1, 2, 0])
    probs = _onehotish([0, 1, 2, 1])
    r = classification_report(y, probs, ids=np.array([10, 11, 12, 13]))
    json.dumps(r, allow_nan=False)
    c = r["per_class"]["C"]
    assert c["sensitivity"] is None and c["precision"] is None and c["auroc"] is None
    assert c["specificity"] == 1.0 and c["support"] == 0
    assert r["per_case"][0]["id"] == 10 and type(r["per_case"][0]["id"]) is int
    assert "per_case" not in classification_report(y, probs)


def test_report_rejects_bad_input():
    probs, ids = _report_inputs()
    with pytest.raises(ValueError, match="ids"):
        classification_report(Y_TRUE, probs, ids=ids[:-1])
    with pytest.raises(ValueError, match="columns"):
        classification_report(Y_TRUE, probs, class_names=("none", "A", "B"))
    with pytest.raises(ValueError, match="at least one"):
        classification_report([], np.zeros((0, 4)))


def test_format_report():
    probs, ids = _report_inputs()
    r = classification_report(Y_TRUE, probs, ids=ids)
    for report in (r, json.loads(json.dumps(r))):
        text = format_report(report)
        for name in ("none", "A", "B", "C", "macro"):
            assert name in text
        assert "accuracy = 71.4%" in text                 # 10/14 = 71.43 %
        assert "true \\ predicted" in text
        lines = text.splitlines()
        row_a = next(l for l in lines if l.startswith("A "))
        # A: sens 66.7 %, spec 81.8 %, prec 50.0 %, F1 4/7 = 0.571, support 3.
        assert row_a.split() == ["A", "66.7%", "81.8%", "50.0%", "0.571",
                                 f"{r['per_class']['A']['auroc']:.3f}", "3"]
        cm_header = next(i for i, l in enumerate(lines) if l.startswith("true \\ predicted"))
        assert lines[cm_header].split()[3:] == ["none", "A", "B", "C"]
        assert lines[cm_header + 2].split() == ["A", "1", "2", "0", "0"]
        assert f"ECE (15 bins) = {r['ece']:.3f}" in text
        assert "Brier" in text
    # Undefined values print as n/a.
    r2 = classification_report([0, 1, 2, 0], _onehotish([0, 1, 2, 1]))
    assert "n/a" in format_report(r2)
