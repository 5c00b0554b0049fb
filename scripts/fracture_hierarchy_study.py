#!/usr/bin/env python3
"""Fit the hierarchical product of experts on validation runs, then replay the held-out sets.

Usage:
    python scripts/fracture_hierarchy_study.py docs/fracture/experiments/hierarchical_experts

The folder holds ``criterion.json`` ({"grid": {"classifier_weight": [...],
"localiser_weight": [...]}, "validation": [evaluate-fracture outputs of the shipped pipeline,
relative to the folder], "why", "fit", "criterion", "command"}). The two exponents of
:func:`~AnkleFractureLib.fracture.weber_height.hierarchical_product` are fitted on those
validation runs alone (most answers right; ties: found rate minus found-on-intact rate, then
the shipped exponents, then the grid order); every other part of the rule shipped when the
study was made (``shipped_rule.json`` in the folder, the ``decision`` of
``Resources/Models/fracture/plans.json`` then: line model, floor, line threshold) is kept. The
held-out evaluations of the shipped pipeline are then replayed with the shipped and
the fitted rule (``baseline/heldout_<set>.json`` in the folder: ``docs/fracture``'s files when
the study was made): each case's answer from its classifier probabilities and candidate
lines, as the pipeline combines them. Writes ``study.json`` and ``README.md`` in the folder; nothing on
the page is typed by hand.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from fracture_rule_study import evaluation_rows, score  # noqa: E402
from heldout_replay import no_worse, replay, shipped_rule, study_main, table  # noqa: E402

def _measures(rows: List[Dict[str, Any]], rule: Dict[str, Any]) -> Dict[str, Any]:
    s = score(rows, rule)
    return {"right": round(s["accuracy"] * s["n"]), "n": s["n"],
            "found_rate": s["found_rate"], "found_on_none_rate": s["found_on_none_rate"]}


def fit(rows: List[Dict[str, Any]], shipped: Dict[str, Any], grid: Dict[str, List[float]]
        ) -> Dict[str, Any]:
    """Every grid point's validation measures and the fitted exponents."""
    points = []
    for a, b in itertools.product(grid["classifier_weight"], grid["localiser_weight"]):
        rule = {**shipped, "combination": "hierarchical", "classifier_weight": a,
                "localiser_weight": b}
        points.append({"classifier_weight": a, "localiser_weight": b, **_measures(rows, rule)})
    own = (shipped.get("classifier_weight", 1.0), shipped.get("localiser_weight", 1.0))

    def key(i: int) -> tuple:
        p = points[i]
        return (p["right"], (p["found_rate"] or 0.0) - (p["found_on_none_rate"] or 0.0),
                (p["classifier_weight"], p["localiser_weight"]) == own, -i)

    best = points[max(range(len(points)), key=key)]
    return {"grid": points, "fitted": {k: best[k] for k in ("classifier_weight",
                                                            "localiser_weight")}}


def study(folder: Path) -> Dict[str, Any]:
    """The fit on the folder's validation runs, the held-out replay and the verdict."""
    spec = json.loads((folder / "criterion.json").read_text())
    # The rule shipped when the study was made, kept beside it, so that the page stays
    # reproducible after the study's own rule is shipped.
    shipped = shipped_rule(folder)
    val = evaluation_rows([str(folder / f) for f in spec["validation"]])
    fitted = fit(val, shipped, spec["grid"])
    rule = {**shipped, "combination": "hierarchical", **fitted["fitted"]}
    base_val, new_val = _measures(val, shipped), _measures(val, rule)
    sets = replay({"shipped": shipped, "fitted": rule}, folder / "baseline")
    ok_val = (new_val["right"] >= base_val["right"]
              and new_val["found_rate"] >= base_val["found_rate"]
              and new_val["found_on_none_rate"] <= base_val["found_on_none_rate"])
    ok_held = no_worse(sets)
    gain = any(s["fitted"]["accuracy"] > s["shipped"]["accuracy"] for s in sets.values())
    return {"validation": {"shipped": base_val, "fitted": new_val}, "fit": fitted,
            "rule": {k: rule[k] for k in ("combination", "classifier_weight",
                                          "localiser_weight")},
            "heldout": sets, "validation_no_worse": bool(ok_val), "heldout_no_worse": ok_held,
            "heldout_gain": bool(gain), "criterion_met": bool(ok_val and ok_held and gain)}


def _verdict(result: Dict[str, Any]) -> str:
    if result["criterion_met"]:
        return "met: shipped (plans.json decision)"
    why = [text for ok, text in ((result["validation_no_worse"], "the validation sets are worse"),
                                 (result["heldout_no_worse"], "a held-out set is worse"),
                                 (result["heldout_gain"], "no held-out set gains"))
           if not ok]
    return "not met: " + "; ".join(why)


def page(folder: Path, result: Dict[str, Any]) -> str:
    spec = json.loads((folder / "criterion.json").read_text())
    lines = [f"# {spec['title']}", "",
             f"Generated by `{spec['command']}` from `criterion.json`, the validation runs it "
             f"names ({', '.join(f'`{f}`' for f in spec['validation'])}) and the held-out "
             "evaluations in `baseline/` (`docs/fracture`'s when the study was made; do not "
             "edit).", "", spec["why"], "",
             "Validation runs: " + "; ".join(f"`{c}`" for c in spec["validation_commands"]),
             "", "## Fit (validation sets)", "",
             "| classifier exponent | lines exponent | answers right | found on fractured | "
             "found on intact |", "|---|---|---|---|---|"]
    for p in result["fit"]["grid"]:
        lines.append(f"| {p['classifier_weight']} | {p['localiser_weight']} | {p['right']} of "
                     f"{p['n']} | {100 * p['found_rate']:.1f} % | "
                     f"{100 * p['found_on_none_rate']:.1f} % |")
    v = result["validation"]
    lines += ["", f"Fitted: {result['rule']}. Shipped flat rule on the same runs: "
                  f"{v['shipped']['right']} of {v['shipped']['n']} right, found "
                  f"{100 * v['shipped']['found_rate']:.1f} %, found on intact "
                  f"{100 * v['shipped']['found_on_none_rate']:.1f} %.", "",
              "## Held-out sets, replayed", ""]
    lines += table(result["heldout"], "rule")
    lines += ["", "Criterion: " + spec["criterion"], "", f"Verdict: {_verdict(result)}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    study_main(__doc__, study, page, ("validation", "rule", "criterion_met"))


if __name__ == "__main__":
    main()
