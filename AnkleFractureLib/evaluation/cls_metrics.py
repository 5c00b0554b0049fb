"""Classification metrics for the Weber classifier, in plain numpy.

Definitions (methods reference, section "Metrics"; every per-class figure is one-vs-rest):

* Confusion matrix ``cm`` (K, K): rows are the true class, columns the predicted class.
* For class k: TP = cm[k, k], FN = row sum - TP, FP = column sum - TP, TN = N - TP - FN - FP.
  Sensitivity (recall) = TP / (TP + FN), specificity = TN / (TN + FP),
  precision = TP / (TP + FP), F1 = 2 TP / (2 TP + FP + FN) (the harmonic mean of precision and
  recall, written so that it is 0, not undefined, when a present class is never predicted).
  A ratio 0/0 is ``nan``; macro averages are the mean over classes ignoring ``nan``.
* Accuracy = trace(cm) / N.
* AUROC of class k: the Mann-Whitney U statistic of the scores ``probs[:, k]`` of the cases of
  class k against those of the other cases, i.e. the probability that a random positive scores
  higher than a random negative, ties counting 1/2. ``nan`` without positives or negatives.
* Predicted class = ``argmax(probs)`` (the lowest class id on ties), confidence = its probability.
* ECE (top-label, Guo et al. 2017): equal-width confidence bins (i/M, (i+1)/M], i = 0..M-1;
  ECE = sum over bins of |B| / N * |accuracy(B) - mean confidence(B)|.
* Brier score = mean over cases of sum over classes of (p_k - onehot_k)^2 (range [0, 2]).
* Log loss = mean of -ln(max(p_true, 1e-12)).

Class ids are 0 none, 1 A, 2 B, 3 C, as everywhere in the library. :func:`classification_report`
returns a JSON-serialisable dict in which undefined values are ``None`` (JSON ``null``), never
``NaN``; :func:`format_report` renders it as a plain-text table.

Example:
    >>> y = [0, 1, 2, 3, 2]
    >>> p = np.array([[.7, .1, .1, .1], [.1, .6, .2, .1], [.1, .2, .6, .1],
    ...               [.1, .1, .1, .7], [.1, .5, .3, .1]])
    >>> confusion_matrix(y, p.argmax(1)).tolist()
    [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]]
    >>> r = classification_report(y, p)
    >>> r["accuracy"], r["per_class"]["B"]["sensitivity"], r["per_class"]["B"]["auroc"]
    (0.8, 0.5, 1.0)
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

#: Default class names, indexed by class id.
CLASS_NAMES = ("none", "A", "B", "C")

#: Probabilities are clipped at this value before the logarithm of :func:`log_loss`.
LOG_EPS = 1e-12

#: Tolerance on the row sums of probability matrices.
PROB_SUM_ATOL = 1e-4


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------

def _as_labels(y: Any, name: str, num_classes: Optional[int] = None) -> np.ndarray:
    """Class ids as a 1-D int64 array, checked to be integers in [0, num_classes)."""
    a = np.asarray(y)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of class ids, got shape {a.shape}")
    if a.size == 0:
        return a.astype(np.int64)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name} must contain integer class ids, got dtype {a.dtype}")
    if not np.issubdtype(a.dtype, np.integer):
        # Integral floats (e.g. labels read back from CSV) are accepted, anything else is not.
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise ValueError(f"{name} must contain integer class ids, got non-integer values")
    a = a.astype(np.int64)
    if num_classes is not None:
        bad = (a < 0) | (a >= num_classes)
        if bad.any():
            raise ValueError(
                f"{name} must contain class ids in [0, {num_classes - 1}], "
                f"got {a[bad][0]} at position {int(np.flatnonzero(bad)[0])}")
    return a


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def _as_scores(probs: Any, name: str = "probs") -> np.ndarray:
    """(N, K) finite float64 array."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"{name} must have shape (N, K), got {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return p


def check_probabilities(probs: Any, num_classes: Optional[int] = None,
                        atol: float = PROB_SUM_ATOL) -> np.ndarray:
    """Validate a probability matrix.

    Args:
        probs: (N, K) class probabilities, one row per case.
        num_classes: expected K, or None to accept any.
        atol: tolerance on the row sums.

    Returns:
        probs as a float64 (N, K) array.

    Raises:
        ValueError: wrong shape, non-finite or negative entries, or a row whose sum differs
            from 1 by more than ``atol``.
    """
    p = _as_scores(probs)
    if num_classes is not None and p.shape[1] != num_classes:
        raise ValueError(f"probs must have {num_classes} columns (one per class), "
                         f"got shape {p.shape}")
    if np.any(p < 0):
        raise ValueError("probs must be non-negative")
    sums = p.sum(axis=1)
    bad = np.abs(sums - 1.0) > atol
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"each row of probs must sum to 1 (within {atol}); row {i} sums to "
                         f"{sums[i]:.6g} ({int(bad.sum())} bad rows)")
    return p


def _labels_and_probs(y_true: Any, probs: Any, check_sums: bool = True):
    p = check_probabilities(probs) if check_sums else _as_scores(probs)
    y = _as_labels(y_true, "y_true", p.shape[1])
    if len(y) != len(p):
        raise ValueError(f"y_true has {len(y)} cases but probs has {len(p)} rows")
    return y, p


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, nan where den == 0 (without a RuntimeWarning)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _nanmean(values: Any) -> float:
    """Mean ignoring nan; nan (without a RuntimeWarning) when every value is nan."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


# --------------------------------------------------------------------------------------------
# Confusion-matrix metrics
# --------------------------------------------------------------------------------------------

def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int],
                     num_classes: int = 4) -> np.ndarray:
    """Count matrix of true against predicted classes.

    Args:
        y_true: (N,) true class ids in [0, num_classes).
        y_pred: (N,) predicted class ids in [0, num_classes).
        num_classes: K.

    Returns:
        (K, K) int64 array; entry [i, j] counts cases of true class i predicted as j.

    Raises:
        ValueError: different lengths, non-integer ids or ids out of range.

    Example:
        >>> confusion_matrix([0, 1, 1], [0, 1, 0], num_classes=2).tolist()
        [[1, 0], [1, 1]]
    """
    k = _check_num_classes(num_classes)
    t = _as_labels(y_true, "y_true", k)
    p = _as_labels(y_pred, "y_pred", k)
    if len(t) != len(p):
        raise ValueError(f"y_true and y_pred must have the same length, got {len(t)} and "
                         f"{len(p)}")
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


def per_class_metrics(cm: Any) -> Dict[str, Any]:
    """One-vs-rest metrics of every class from a confusion matrix.

    Args:
        cm: (K, K) confusion matrix (rows true, columns predicted), non-negative integers.

    Returns:
        dict with ``n`` (int), ``accuracy`` (float, nan when N = 0), the (K,) float64 arrays
        ``sensitivity``, ``specificity``, ``precision``, ``f1`` (nan where a ratio is 0/0),
        ``support`` ((K,) int64, cases per true class) and ``macro``: a dict of the nan-ignoring
        means of the four ratios.

    Example:
        >>> m = per_class_metrics([[3, 1], [0, 2]])
        >>> m["sensitivity"].tolist(), m["precision"].tolist(), m["accuracy"]
        ([0.75, 1.0], [1.0, 0.6666666666666666], 0.8333333333333334)
    """
    c = np.asarray(cm)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 1:
        raise ValueError(f"cm must be a square (K, K) matrix, got shape {c.shape}")
    if not np.issubdtype(c.dtype, np.number) or not np.all(np.isfinite(c)) \
            or np.any(c < 0) or not np.all(c == np.round(c)):
        raise ValueError("cm must contain non-negative integer counts")
    c = c.astype(np.int64)
    n = int(c.sum())
    tp = np.diag(c)
    support = c.sum(axis=1)          # true cases of each class
    predicted = c.sum(axis=0)        # predictions of each class
    fn = support - tp
    fp = predicted - tp
    tn = n - tp - fn - fp
    out: Dict[str, Any] = {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else float("nan"),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "support": support.astype(np.int64),
    }
    out["macro"] = {key: _nanmean(out[key])
                    for key in ("sensitivity", "specificity", "precision", "f1")}
    return out


# --------------------------------------------------------------------------------------------
# Ranking metrics
# --------------------------------------------------------------------------------------------

def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, tied values sharing the mean of their ranks (= scipy rankdata)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]          # first element of each tie group
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(x)]                  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0             # mean of ranks start+1 .. end
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def _binary_auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    # Mann-Whitney: U = (sum of positive ranks) - n_pos (n_pos + 1) / 2 counts the
    # (positive, negative) pairs ordered correctly, ties 1/2; AUROC = U / (n_pos n_neg).
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auroc_one_vs_rest(y_true: Sequence[int], probs: Any) -> List[float]:
    """AUROC of each class against the others, from its column of scores.

    Args:
        y_true: (N,) true class ids in [0, K).
        probs: (N, K) scores, normally class probabilities; only their order within a column
            matters, so the rows need not sum to 1 here.

    Returns:
        K floats in [0, 1]; nan for a class with no positive or no negative case.

    Example:
        >>> auroc_one_vs_rest([0, 0, 1, 1], [[.9, .1], [.5, .5], [.5, .5], [.2, .8]])
        [0.875, 0.875]
    """
    y, p = _labels_and_probs(y_true, probs, check_sums=False)
    return [_binary_auroc(y == k, p[:, k]) for k in range(p.shape[1])]


def macro_auroc(y_true: Sequence[int], probs: Any) -> float:
    """Mean of :func:`auroc_one_vs_rest` over the classes where it is defined (nan if none)."""
    return _nanmean(auroc_one_vs_rest(y_true, probs))


# --------------------------------------------------------------------------------------------
# Calibration and proper scores
# --------------------------------------------------------------------------------------------

def reliability_bins(y_true: Sequence[int], probs: Any, n_bins: int = 15) -> Dict[str, np.ndarray]:
    """Top-label reliability table over equal-width confidence bins.

    Bin i holds the cases whose confidence (largest probability) lies in
    (edges[i], edges[i + 1]]; a confidence of exactly 0 (impossible for valid probabilities)
    would fall in the first bin.

    Args:
        y_true: (N,) true class ids.
        probs: (N, K) class probabilities (rows sum to 1).
        n_bins: number of bins M.

    Returns:
        dict with ``edges`` ((M + 1,) float64, 0..1), ``count`` ((M,) int64),
        ``confidence`` and ``accuracy`` ((M,) float64 means per bin, nan for empty bins).

    Example:
        >>> b = reliability_bins([0, 1], [[.9, .1], [.3, .7]], n_bins=2)
        >>> b["count"].tolist(), b["accuracy"].tolist()
        ([0, 2], [nan, 1.0])
    """
    y, p = _labels_and_probs(y_true, probs)
    m = _check_num_classes(n_bins)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, m + 1)
    # side="left" puts a value equal to an edge into the bin below it: bins are (lo, hi].
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, m - 1)
    count = np.bincount(idx, minlength=m).astype(np.int64)
    return {
        "edges": edges,
        "count": count,
        "confidence": _ratio(np.bincount(idx, weights=conf, minlength=m), count),
        "accuracy": _ratio(np.bincount(idx, weights=correct, minlength=m), count),
    }


def expected_calibration_error(y_true: Sequence[int], probs: Any, n_bins: int = 15) -> float:
    """Top-label expected calibration error (Guo et al. 2017), in [0, 1].

    Args:
        y_true: (N,) true class ids, N > 0.
        probs: (N, K) class probabilities (rows sum to 1).
        n_bins: number of equal-width confidence bins over (0, 1].

    Returns:
        sum over non-empty bins of |B| / N * |accuracy(B) - mean confidence(B)|.

    Example:
        >>> round(expected_calibration_error([0, 1], [[.9, .1], [.3, .7]], n_bins=2), 6)
        0.2
    """
    b = reliability_bins(y_true, probs, n_bins)
    n = int(b["count"].sum())
    if n == 0:
        raise ValueError("expected_calibration_error needs at least one case")
    full = b["count"] > 0
    gaps = np.abs(b["accuracy"][full] - b["confidence"][full])
    return float(np.sum(b["count"][full] / n * gaps))


def brier_score(y_true: Sequence[int], probs: Any) -> float:
    """Multi-class Brier score: mean over cases of sum_k (p_k - [y == k])^2, in [0, 2].

    Example:
        >>> round(brier_score([0], [[.8, .2]]), 6)
        0.08
    """
    y, p = _labels_and_probs(y_true, probs)
    if len(y) == 0:
        raise ValueError("brier_score needs at least one case")
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def log_loss(y_true: Sequence[int], probs: Any) -> float:
    """Mean negative natural log of the probability of the true class (clipped at 1e-12).

    Example:
        >>> round(log_loss([0, 1], [[.5, .5], [.5, .5]]), 6)
        0.693147
    """
    y, p = _labels_and_probs(y_true, probs)
    if len(y) == 0:
        raise ValueError("log_loss needs at least one case")
    p_true = np.clip(p[np.arange(len(y)), y], LOG_EPS, 1.0)
    return float(-np.mean(np.log(p_true)))


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _jf(x: Any) -> Optional[float]:
    """Plain float for JSON; None for nan/inf (which JSON cannot represent)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _jid(x: Any) -> Any:
    """A case id as a JSON value: numpy scalars unwrapped, str/int/float kept, others str()."""
    if isinstance(x, np.generic):
        x = x.item()
    if x is None or isinstance(x, (str, int, float)):
        return x
    return str(x)


def classification_report(y_true: Sequence[int], probs: Any,
                          class_names: Sequence[str] = CLASS_NAMES,
                          ids: Optional[Sequence[Any]] = None,
                          n_bins: int = 15) -> Dict[str, Any]:
    """All classification metrics as a JSON-serialisable dict.

    The predicted class of a case is the argmax of its probabilities.

    Args:
        y_true: (N,) true class ids, N > 0.
        probs: (N, K) class probabilities; K = len(class_names); rows sum to 1 within 1e-4.
        class_names: names of the classes, indexed by class id.
        ids: optional (N,) case ids; when given, the report lists every case.
        n_bins: bins of the expected calibration error.

    Returns:
        dict with ``n``, ``class_names``, ``accuracy``, ``macro`` {sensitivity, specificity,
        precision, f1, auroc}, ``per_class`` {name: {sensitivity, specificity, precision, f1,
        auroc, support}}, ``confusion_matrix`` (K lists of K ints, rows true), ``ece``,
        ``ece_bins``, ``brier``, ``log_loss`` and, with ids, ``per_case``: a list of
        {id, true, predicted, probabilities {name: p}} with class names for true/predicted.
        Values are plain Python ints/floats/lists; undefined ratios are None.

    Raises:
        ValueError: invalid probabilities or labels, no cases, or ids of the wrong length.
    """
    names = [str(n) for n in class_names]
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be unique, got {names}")
    k = len(names)
    p = check_probabilities(probs, num_classes=k)
    y = _as_labels(y_true, "y_true", k)
    if len(y) != len(p):
        raise ValueError(f"y_true has {len(y)} cases but probs has {len(p)} rows")
    if len(y) == 0:
        raise ValueError("classification_report needs at least one case")
    y_pred = p.argmax(axis=1)
    cm = confusion_matrix(y, y_pred, k)
    m = per_class_metrics(cm)
    auc = auroc_one_vs_rest(y, p)

    report: Dict[str, Any] = {
        "n": int(len(y)),
        "class_names": names,
        "accuracy": _jf(m["accuracy"]),
        "macro": {**{key: _jf(v) for key, v in m["macro"].items()}, "auroc": _jf(_nanmean(auc))},
        "per_class": {
            name: {
                "sensitivity": _jf(m["sensitivity"][i]),
                "specificity": _jf(m["specificity"][i]),
                "precision": _jf(m["precision"][i]),
                "f1": _jf(m["f1"][i]),
                "auroc": _jf(auc[i]),
                "support": int(m["support"][i]),
            }
            for i, name in enumerate(names)
        },
        "confusion_matrix": cm.tolist(),
        "ece": _jf(expected_calibration_error(y, p, n_bins)),
        "ece_bins": int(n_bins),
        "brier": _jf(brier_score(y, p)),
        "log_loss": _jf(log_loss(y, p)),
    }
    if ids is not None:
        ids = list(ids)
        if len(ids) != len(y):
            raise ValueError(f"ids has {len(ids)} entries but there are {len(y)} cases")
        report["per_case"] = [
            {
                "id": _jid(case_id),
                "true": names[int(y[i])],
                "predicted": names[int(y_pred[i])],
                "probabilities": {name: float(p[i, j]) for j, name in enumerate(names)},
            }
            for i, case_id in enumerate(ids)
        ]
    return report


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100.0 * x:.1f}%"


def _dec(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def format_report(report: Dict[str, Any]) -> str:
    """Render a :func:`classification_report` dict (also after a JSON round trip) as text.

    Sensitivity, specificity, precision and accuracy are percentages with one decimal; F1,
    AUROC, ECE, Brier score and log loss have three decimals; undefined values read ``n/a``.
    """
    names = list(report.get("class_names") or report["per_class"].keys())
    lines = [f"n = {report['n']}, accuracy = {_pct(report['accuracy'])}", ""]

    head = ("class", "sens.", "spec.", "prec.", "F1", "AUROC", "support")
    rows = []
    for name in names:
        c = report["per_class"][name]
        rows.append((name, _pct(c["sensitivity"]), _pct(c["specificity"]),
                     _pct(c["precision"]), _dec(c["f1"]), _dec(c["auroc"]), str(c["support"])))
    mac = report["macro"]
    rows.append(("macro", _pct(mac["sensitivity"]), _pct(mac["specificity"]),
                 _pct(mac["precision"]), _dec(mac["f1"]), _dec(mac["auroc"]), str(report["n"])))
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]

    def fmt(r):
        return "  ".join([r[0].ljust(widths[0])] +
                         [s.rjust(w) for s, w in zip(r[1:], widths[1:])])

    lines.append(fmt(head))
    lines.extend(fmt(r) for r in rows[:-1])
    lines.append("-" * len(fmt(head)))
    lines.append(fmt(rows[-1]))
    lines.append("")

    corner = "true \\ predicted"
    cm = report["confusion_matrix"]
    first = max([len(corner)] + [len(n) for n in names])
    col = max([len(n) for n in names] + [len(str(v)) for row in cm for v in row])
    lines.append("confusion matrix (rows: true class, columns: predicted class)")
    lines.append("  ".join([corner.ljust(first)] + [n.rjust(col) for n in names]))
    for name, row in zip(names, cm):
        lines.append("  ".join([name.ljust(first)] + [str(v).rjust(col) for v in row]))
    lines.append("")
    bins = report.get("ece_bins")
    ece_label = f"ECE ({bins} bins)" if bins else "ECE"
    lines.append(f"{ece_label} = {_dec(report['ece'])}, Brier = {_dec(report['brier'])}, "
                 f"log loss = {_dec(report['log_loss'])}")
    return "\n".join(lines)
