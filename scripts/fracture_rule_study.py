"""Fit the localiser's "found" rule and line choice on a validation set, then score it elsewhere.

Usage:
    python scripts/fracture_rule_study.py --fit VAL.json [VAL2.json ...] \
        [--score NAME=EVAL.json ...] [--out DIR]

Reads ``evaluate-fracture`` outputs whose rows carry the localiser's candidate lines
(``result.json["fracture"]["candidates"]``: voxels, peak probability, summed probability,
section ratio, height) and the classifier's probabilities, and replays the decision offline:

* which lines qualify: peak >= ``found_threshold``, at least ``min_voxels`` voxels and at least
  ``min_section`` line voxels per voxel of the fibula's cross-section
  (:func:`~AnkleFractureLib.fracture.localise.section_ratio`);
* ``select="strongest"``: the strongest line (largest summed probability) is tested (the
  shipped rule); ``"qualified"``: the strongest qualifying line; ``"mixture"``: every qualifying
  line speaks, weighted by its summed probability (a tip line and a true line both count, and
  the classifier breaks the tie);
* ``select="scored"``: a logistic line model (size, section ratio, cut, mean probability;
  fitted on the ``--fit`` sets) gives each line its probability of being the fracture;
* the combination with the classifier is the pipeline's (:func:`~AnkleFractureLib.fracture.
  weber_height.combine_lines`).

The rule is fitted on ``--fit`` sets only (never on a held-out family): the grid point with the
best combined accuracy, ties broken by found rate minus found-on-intact rate, then by the
simplest rule (grid order). ``--score`` sets are then scored with the shipped rule and the
fitted one. Writes ``DIR/study.json`` and prints a table. ``--line-model-only`` fits nothing
but the line model and keeps the rest of the ``--shipped`` rule (:func:`refit_line_model`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from AnkleFractureLib.evaluation.cls_metrics import classification_report  # noqa: E402
from AnkleFractureLib.fracture.weber_height import (CLASSES, FEATURES,  # noqa: E402
                                                    LINE_FEATURES, combine_lines,
                                                    line_features)

#: The grid searched (grid order: simplest first).
GRID = {"select": ("strongest", "qualified", "mixture"),
        "found_threshold": (0.5, 0.7, 0.9),
        "min_voxels": (30, 100, 200, 400),
        "min_section": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)}
#: The line model's labels: a candidate this close (mm) to the true line's height is it.
LINE_TOLERANCE_MM = 10.0
#: L2 penalty of the line model's logistic regression.
LINE_L2 = 1.0
#: A line is reported when its probability of being the fracture reaches this.
MIN_LINE_PROBABILITY = 0.5
#: The line model's combination with the classifier searched (grid order: the plain product of
#: experts and the earlier threshold first): exponents of the classifier's and the lines'
#: probabilities, and the line probability at which a line is reported.
EXPERT_GRID = {"classifier_weight": (1.0, 0.75, 0.5),
               "localiser_weight": (1.0, 1.5, 2.0),
               "min_line_probability": (MIN_LINE_PROBABILITY, 0.4, 0.3)}
#: The gap gates tried with ``--gap-gate`` (after the ungated rules, in this order): a line
#: whose CT reads above ``max_hu`` (HU) across it, no gap, has its probability times
#: ``factor`` (:func:`~AnkleFractureLib.fracture.weber_height.candidate_probability`).
GAP_GATE_GRID = {"max_hu": (0.0, -5.0, -10.0, -20.0), "factor": (0.0, 0.25)}
#: The decision keys the fit sets; ``--keep-decision`` keeps the others of the ``--shipped``
#: decision in force while fitting (as the pipeline will run the rule).
RULE_KEYS = set(GRID) | set(EXPERT_GRID) | {"line_model", "gap_gate"}
#: The shipped rule (Resources/Models/fracture/plans.json before this study).
SHIPPED = {"select": "strongest", "found_threshold": 0.5, "min_voxels": 400, "min_section": 0.0}


def replay(row: Dict[str, Any], rule: Dict[str, Any]) -> Dict[str, Any]:
    """The combined answer of one evaluation row under ``rule``."""
    opinion, line = combine_lines(row["classifier_probabilities"], row.get("candidates") or [],
                                  rule, float(row.get("size_factor") or 1.0))
    found = line is not None
    err = None
    if found and row.get("height_true_mm") is not None:
        err = abs(float(line["height_mm"]) - float(row["height_true_mm"]))
    return {"true": row["true"], "refused": row["refused"], "probs": opinion.probabilities,
            "pred": opinion.prediction, "found": found, "err": err}


def _round4(value: float | None) -> float | None:
    """``value`` to 4 decimals; None (an AUROC of a class absent from the rows) stays None."""
    return None if value is None else round(float(value), 4)


def score(rows: Sequence[Dict[str, Any]], rule: Dict[str, Any]) -> Dict[str, Any]:
    """Accuracy, macro AUROC, found rates and median |height error| of ``rule`` on ``rows``."""
    out = []
    for r in rows:
        if r["refused"]:  # a refused case stays wrong (uniform), as in the evaluation
            out.append({"true": r["true"], "probs": {c: 0.25 for c in CLASSES},
                        "found": False, "err": None})
        else:
            out.append(replay(r, rule))
    y = [CLASSES.index(o["true"]) for o in out]
    p = np.array([[o["probs"][c] for c in CLASSES] for o in out])
    rep = classification_report(y, p, CLASSES)
    frac = [o for o in out if o["true"] != "none"]
    none = [o for o in out if o["true"] == "none"]
    errs = [o["err"] for o in frac if o["err"] is not None]
    return {"n": len(out), "accuracy": round(float(rep["accuracy"]), 4),
            "macro_auroc": _round4(rep["macro"]["auroc"]),
            "auroc": {c: _round4(rep["per_class"][c]["auroc"]) for c in CLASSES},
            "found_rate": round(float(np.mean([o["found"] for o in frac])), 4) if frac else None,
            "found_on_none_rate": (round(float(np.mean([o["found"] for o in none])), 4)
                                   if none else None),
            "median_abs_height_error_mm": round(float(np.median(errs)), 2) if errs else None}


def _key(s: Dict[str, Any]) -> tuple:
    return (s["accuracy"], (s["found_rate"] or 0.0) - (s["found_on_none_rate"] or 0.0))


def _logistic(x: np.ndarray, y: np.ndarray, l2: float, iterations: int = 50) -> np.ndarray:
    """Weights of an L2-penalised logistic regression (Newton steps; the bias is not penalised)."""
    w = np.zeros(x.shape[1])
    pen = np.diag(np.r_[0.0, np.full(x.shape[1] - 1, l2)])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -50, 50)))
        grad = x.T @ (p - y) + pen @ w
        hess = x.T @ (x * (p * (1 - p))[:, None]) + pen + 1e-9 * np.eye(len(w))
        w -= np.linalg.solve(hess, grad)
    return w


def _standardised_logistic(x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """:func:`_logistic` fitted on z-scored features (column 0, the bias, kept), its weights
    mapped back to the raw features, so the model is used exactly as an unstandardised one.

    Why: the L2 penalty acts on each weight alike, so a feature of small spread (a line's mean
    probability spans about 0.75-0.97) needs a large weight to matter and is shrunk towards
    nothing, whatever it tells; on z-scored features every feature pays the same for the same
    effect.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> f = rng.uniform(0.8, 1.0, 400); y = (f > 0.9).astype(float)
        >>> x = np.c_[np.ones(400), f]
        >>> raw, std = _logistic(x, y, 10.0), _standardised_logistic(x, y, 10.0)
        >>> acc = lambda w: float(np.mean(((x @ w) > 0) == (y > 0)))
        >>> acc(raw) < 0.6 < 0.95 < acc(std)
        True
    """
    mean, sd = x[:, 1:].mean(axis=0), x[:, 1:].std(axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    z = np.c_[x[:, :1], (x[:, 1:] - mean) / sd]
    w = _logistic(z, y, l2)
    out = np.r_[w[0] - float(np.sum(w[1:] * mean / sd)), w[1:] / sd]
    return out


def fit_line_model(rows: Sequence[Dict[str, Any]],
                   features: Sequence[str] = LINE_FEATURES,
                   standardise: bool = False) -> Dict[str, Any]:
    """The logistic line model on ``features`` (names of
    :data:`~AnkleFractureLib.fracture.weber_height.FEATURES`): a candidate line of a fractured
    case whose height is within :data:`LINE_TOLERANCE_MM` of the true line's is a fracture
    line; every other candidate (those of intact cases among them) is not. ``standardise``:
    fit on z-scored features (:func:`_standardised_logistic`); the weights stay on the raw
    features, so the pipeline uses the model unchanged."""
    x, y = [], []
    for r in rows:
        if r["refused"]:
            continue
        h_true = r.get("height_true_mm")
        for c in r.get("candidates") or []:
            x.append(line_features(c, features))
            y.append(float(r["true"] != "none" and h_true is not None
                           and abs(float(c["height_mm"]) - float(h_true)) <= LINE_TOLERANCE_MM))
    if not x or len(set(y)) < 2:
        raise SystemExit("the fit sets need candidate lines that are and are not fracture lines")
    fitter = _standardised_logistic if standardise else _logistic
    w = fitter(np.array(x), np.array(y), LINE_L2)
    out = {"features": list(features), "weights": [round(float(v), 4) for v in w],
           "tolerance_mm": LINE_TOLERANCE_MM, "l2": LINE_L2, "lines": len(y),
           "fracture_lines": int(sum(y))}
    if standardise:
        out["standardised"] = True
    return out


def _gates(gap_gate: bool) -> List[Optional[Dict[str, float]]]:
    """No gate, then (with ``gap_gate``) every point of :data:`GAP_GATE_GRID`."""
    gates: List[Optional[Dict[str, float]]] = [None]
    if gap_gate:
        gates += [{"max_hu": t, "factor": f} for t, f in
                  itertools.product(GAP_GATE_GRID["max_hu"], GAP_GATE_GRID["factor"])]
    return gates


def fit(rows: Sequence[Dict[str, Any]], features: Sequence[str] = LINE_FEATURES,
        standardise: bool = False, gap_gate: bool = False,
        fixed: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The rule with the best :func:`_key` on ``rows``: the grid points (first in grid order on
    ties), then the line model (:func:`fit_line_model` on ``features``, fitted on the same
    rows, on z-scored features when ``standardise``), without and (``gap_gate``) with each gap
    gate of :data:`GAP_GATE_GRID`. ``fixed``: decision keys in force for every rule tried
    (not part of the returned rule)."""
    best = None
    fixed = dict(fixed or {})
    names = list(GRID)
    rules = [dict(zip(names, values)) for values in itertools.product(*(GRID[k] for k in names))]
    line_model = fit_line_model(rows, features, standardise)
    for gate, (a, b, q) in itertools.product(
            _gates(gap_gate), itertools.product(*(EXPERT_GRID[k] for k in EXPERT_GRID))):
        rule = {"select": "scored", "line_model": line_model, "min_line_probability": q}
        if (a, b) != (1.0, 1.0):  # the plain product keeps the rule as it was
            rule.update(classifier_weight=a, localiser_weight=b)
        if gate is not None:
            rule["gap_gate"] = gate
        rules.append(rule)
    for rule in rules:
        s = score(rows, {**fixed, **rule})
        if best is None or _key(s) > _key(best[1]):
            best = (rule, s)
    return {"rule": best[0], "fit_scores": best[1]}


def refit_line_model(rows: Sequence[Dict[str, Any]], decision: Dict[str, Any],
                     features: Sequence[str] = LINE_FEATURES,
                     standardise: bool = False) -> Dict[str, Any]:
    """``decision``'s rule with only its line model fitted again (:func:`fit_line_model` on
    ``features``); every other key (the gate, the combination, the reporting threshold) stays.

    Why: a full refit searches the combination grid and the gap gates with the line model, and
    on about 200 validation lines a small change in the measure moved that rule a long way
    (v26); a line model on fewer features, refitted alone, changes only what it learns.

    Returns:
        {"rule": the rule's keys of ``decision`` with the new "line_model", "fit_scores":
        :func:`score` of the whole decision with it on ``rows``}.
    """
    if decision.get("select") != "scored":
        raise SystemExit("--line-model-only refits the line model of a decision that uses one "
                         f"(select 'scored'); --shipped has select {decision.get('select')!r}")
    rule = {k: v for k, v in decision.items() if k in RULE_KEYS}
    rule["line_model"] = fit_line_model(rows, features, standardise)
    return {"rule": rule, "fit_scores": score(rows, {**decision, **rule})}


def evaluation_rows(paths: Sequence[str]) -> List[Dict[str, Any]]:
    """The case rows of ``evaluate-fracture`` files, in order; exits naming a file whose rows
    lack the candidate lines the studies replay (made by an older version)."""
    rows = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        missing = [r["id"] for r in data["cases"] if not r["refused"] and "candidates" not in r]
        if missing:
            raise SystemExit(f"{p}: rows without candidate lines ({missing[:3]}...): evaluate "
                             "again with this version (evaluate-fracture)")
        rows.extend(data["cases"])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", nargs="+", required=True, help="validation evaluations")
    parser.add_argument("--score", nargs="*", default=[], metavar="NAME=EVAL.json")
    parser.add_argument("--out", default=None, help="folder for study.json")
    parser.add_argument("--data-command", action="append", default=[],
                        help="how a set was made (listed on the page; repeatable)")
    parser.add_argument("--shipped", default=None, metavar="MODEL_DIR",
                        help="compare with the rule in MODEL_DIR/plans.json (default: the rule "
                             "shipped before the first study, select=strongest)")
    parser.add_argument("--features", default=",".join(LINE_FEATURES),
                        help="the line model's features, comma-separated (default: the shipped "
                             f"set {','.join(LINE_FEATURES)}; others: "
                             f"{','.join(sorted(set(FEATURES) - set(LINE_FEATURES)))})")
    parser.add_argument("--standardise", action="store_true",
                        help="fit the line model on z-scored features (the L2 penalty then "
                             "weighs every feature alike; the stored weights stay on the raw "
                             "features)")
    parser.add_argument("--gap-gate", action="store_true",
                        help="also try each gap gate of the grid with the line model (a line "
                             "whose CT does not read as a gap is discounted); needs evaluations "
                             "whose candidates carry gap_hu")
    parser.add_argument("--keep-decision", action="store_true",
                        help="fit and score with the --shipped decision's other keys "
                             "(classifier_override, ring_check, ...) in force, as the pipeline "
                             "runs the written rule")
    parser.add_argument("--line-model-only", action="store_true",
                        help="refit only the line model (on --features) of the --shipped "
                             "decision, every other key as it is (implies --keep-decision)")
    parser.add_argument("--write-plans", default=None, metavar="MODEL_DIR",
                        help="write the fitted rule into MODEL_DIR/plans.json (decision) and "
                             "record it in MODEL_DIR/training.json (decision_refit)")
    args = parser.parse_args(argv)
    features = [f.strip() for f in args.features.split(",") if f.strip()]
    unknown = sorted(set(features) - set(FEATURES))
    if unknown:
        parser.error(f"unknown --features {unknown}; known: {sorted(FEATURES)}")
    if (args.keep_decision or args.line_model_only) and not args.shipped:
        parser.error("--keep-decision and --line-model-only need --shipped MODEL_DIR")
    shipped = SHIPPED
    if args.shipped:
        shipped = json.loads(Path(args.shipped, "plans.json").read_text())["decision"]
    fixed = ({k: v for k, v in shipped.items() if k not in RULE_KEYS}
             if args.keep_decision or args.line_model_only else {})
    fit_rows = evaluation_rows(args.fit)
    if args.line_model_only:
        fitted = refit_line_model(fit_rows, shipped, features, args.standardise)
    else:
        fitted = fit(fit_rows, features, args.standardise, args.gap_gate, fixed)
    result = {"command": "python scripts/fracture_rule_study.py " + shlex.join(
        sys.argv[1:] if argv is None else argv), "grid": GRID, "expert_grid": EXPERT_GRID,
        "shipped_rule": shipped,
        "fitted_rule": fitted["rule"], "fit_sets": list(args.fit), "sets": {}}
    if args.gap_gate and not args.line_model_only:
        result["gap_gate_grid"] = GAP_GATE_GRID
    if args.line_model_only:  # no grid was searched: only the line model was fitted
        result["line_model_only"] = True
    if fixed:
        result["kept_decision"] = fixed
    sets = {"fit (validation)": fit_rows}
    for item in args.score:
        name, _, path = item.partition("=")
        sets[name] = evaluation_rows([path])
    print(f"fitted rule: {fitted['rule']}")
    print(f"{'set':<28} {'rule':<8} {'acc':>6} {'AUROC':>6} {'AUROC C':>8} {'found':>6} "
          f"{'f.none':>6} {'|h err|':>7}")
    for name, rows in sets.items():
        result["sets"][name] = {}
        for label, rule in (("shipped", shipped), ("fitted", {**fixed, **fitted["rule"]})):
            s = score(rows, rule)
            result["sets"][name][label] = s
            print(f"{name:<28} {label:<8} {s['accuracy']:6.3f} {s['macro_auroc']:6.3f} "
                  f"{s['auroc']['C']:8.3f} {s['found_rate'] or 0:6.3f} "
                  f"{s['found_on_none_rate'] or 0:6.3f} {s['median_abs_height_error_mm'] or 0:7.2f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        result["data_commands"] = list(args.data_command)
        Path(args.out, "study.json").write_text(json.dumps(result, indent=1) + "\n")
        Path(args.out, "README.md").write_text(page(result, _record(Path(args.out))))
    if args.write_plans:
        write_rule(Path(args.write_plans), fitted, result["command"])
    return 0


def page(result: Dict[str, Any], record: Optional[Dict[str, Any]] = None) -> str:
    """The experiment page (markdown) of a study.json, with the experiment's own record
    (``criterion.json`` in the output folder: "why", "change", "criterion", written before the
    runs, and "verdict", written after them) when there is one."""
    record = record or {}
    md = ["# Line rule of the fracture localiser, fitted on validation cases", "",
          "Generated by `scripts/fracture_rule_study.py` from `study.json` and the evaluations "
          "beside it (each `evaluate-fracture` output lists every candidate line of every case)"
          + (" and `criterion.json`" if record else "") + "; do not edit by hand.", "",
          f"Command: `{result['command']}`", ""]
    for key, title in (("why", "Why"), ("change", "What changes"),
                       ("criterion", "Shipping criterion")):
        if record.get(key):
            md += [f"**{title}** ({record.get('written', '')}): {record[key]}" if key ==
                   "criterion" else f"**{title}**: {record[key]}", ""]
    md += [f"- data: `{c}`" for c in result.get("data_commands", [])]
    md += ["", f"Fitted on: {', '.join(f'`{p}`' for p in result['fit_sets'])} (validation "
           "cases of the training family, never a held-out family). Shipped rule before: "
           f"`{json.dumps(result['shipped_rule'])}`. Fitted rule: "
           f"`{json.dumps(result['fitted_rule'])}`."
           + (f" Gap gates tried: `{json.dumps(result['gap_gate_grid'])}`."
              if result.get("gap_gate_grid") else "")
           + (" Only the line model was fitted; the rest of the rule is the shipped one."
              if result.get("line_model_only") else "")
           + (f" Kept in force while fitting (the shipped decision's other keys): "
              f"`{json.dumps(result['kept_decision'])}`." if result.get("kept_decision") else ""),
           "",
           "| set | rule | accuracy | macro AUROC | AUROC C | found | found on intact | "
           "median abs height error (mm) |", "|---|---|---|---|---|---|---|---|"]
    for name, rules in result["sets"].items():
        for label, s in rules.items():
            md.append(f"| {name} | {label} | {s['accuracy']:.3f} | {s['macro_auroc']:.3f} | "
                      f"{s['auroc']['C']:.3f} | {s['found_rate'] or 0:.3f} | "
                      f"{s['found_on_none_rate'] or 0:.3f} | "
                      f"{s['median_abs_height_error_mm'] or 0:.2f} |")
    if record.get("verdict"):
        md += ["", "## Verdict", "", record["verdict"]]
    return "\n".join(md) + "\n"


def _record(folder: Path) -> Dict[str, Any]:
    """The experiment's ``criterion.json`` in ``folder`` ({} when there is none)."""
    path = folder / "criterion.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_rule(model_dir: Path, fitted: Dict[str, Any], command: str) -> None:
    """The fitted rule into plans.json's ``decision`` (the decision's keys outside
    :data:`RULE_KEYS` kept); training.json keeps the training record and gets
    ``decision_refit`` (the command, the rule, its validation scores, the trained rule as
    "previous", and the records of earlier refits as "earlier")."""
    from AnkleFractureLib.io import atomic_write_json

    plans = json.loads((model_dir / "plans.json").read_text())
    training = json.loads((model_dir / "training.json").read_text())
    previous = dict(plans.get("decision", {}))
    if "decision_refit" in training:  # refitted again: "previous" stays the trained rule
        previous = dict(training["decision_refit"]["previous"])
    # the earlier keys stay: "threshold" makes the lines, and "min_voxels" is also the size
    # at which a line cut off by the scan's edge is a warning (checks.fracture_line_findings)
    # the current plans' own settings beside the rule (measure_density, density_grid_mm, ...)
    # stay too: set on the model folder before the refit, they are not the trained rule's
    kept = {k: v for k, v in plans.get("decision", {}).items() if k not in RULE_KEYS}
    plans["decision"] = {**previous, **kept, **fitted["rule"]}
    if "decision_refit" in training:  # the earlier refits stay on record, oldest first
        earlier = {k: v for k, v in training["decision_refit"].items() if k != "earlier"}
        history = list(training["decision_refit"].get("earlier", [])) + [earlier]
    else:
        history = []
    training["decision_refit"] = {"command": command, "rule": fitted["rule"],
                                  "validation": fitted["fit_scores"], "previous": previous,
                                  "earlier": history}
    atomic_write_json(model_dir / "training.json", training)
    atomic_write_json(model_dir / "plans.json", plans)
    print(f"written the rule into {model_dir / 'plans.json'}")


if __name__ == "__main__":
    sys.exit(main())
