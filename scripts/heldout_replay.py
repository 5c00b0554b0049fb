"""The held-out sets replayed offline with other decision rules (for the decision studies).

Each ``docs/seg_v2/rule6_pipeline/heldout_<set>.json`` row holds the classifier's probabilities
and every candidate line the localiser saw, so a rule's combined answer is replayed exactly as
the pipeline combines them (:func:`fracture_rule_study.score`), without running the pipeline.
Used by ``fracture_floor_study.py`` and ``fracture_calibration_study.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from fracture_rule_study import evaluation_rows, score  # noqa: E402

#: The held-out sets, in the order they are reported.
HELDOUT = ("vh2", "vh", "vh3", "analytic", "confounders")
#: Their evaluations by the shipped pipeline.
BASELINE = ROOT / "docs" / "seg_v2" / "rule6_pipeline"
#: The measures kept per set and rule.
MEASURES = ("accuracy", "found_rate", "found_on_none_rate", "macro_auroc")
#: The shipped localiser's plans (its ``decision`` is the shipped rule).
SHIPPED_PLANS = ROOT / "Resources" / "Models" / "fracture" / "plans.json"


def shipped_rule(folder: Path) -> Dict[str, Any]:
    """The rule a study compared against: ``folder/shipped_rule.json`` (the shipped plans'
    ``decision`` when the study was made, kept so that its page stays reproducible after the
    shipped rule changes), else the shipped plans' ``decision`` now."""
    pinned = Path(folder) / "shipped_rule.json"
    source = pinned if pinned.is_file() else SHIPPED_PLANS
    return json.loads(source.read_text())["decision"]


def answers_right(rows: List[Dict[str, Any]], rule: Dict[str, Any]) -> int:
    """How many of ``rows`` the rule answers right (refused rows count as wrong)."""
    s = score(rows, rule)
    return round(s["accuracy"] * s["n"])


def replay(rules: Dict[str, Dict[str, Any]], baseline: Path = BASELINE
           ) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{set: {label: {measure: value}}} of each labelled rule on every held-out set (the
    evaluations ``baseline/heldout_<set>.json``)."""
    out = {}
    for name in HELDOUT:
        rows = evaluation_rows([str(baseline / f"heldout_{name}.json")])
        out[name] = {label: {k: score(rows, rule)[k] for k in MEASURES}
                     for label, rule in rules.items()}
    return out


def no_worse(sets: Dict[str, Dict[str, Dict[str, float]]]) -> bool:
    """Whether "fitted" keeps accuracy and found rate and adds no 'found' on intact cases,
    compared with "shipped", on every set."""
    return all(s["fitted"]["accuracy"] >= s["shipped"]["accuracy"]
               and s["fitted"]["found_rate"] >= s["shipped"]["found_rate"]
               and s["fitted"]["found_on_none_rate"] <= s["shipped"]["found_on_none_rate"]
               for s in sets.values())


def table(sets: Dict[str, Dict[str, Dict[str, float]]], rule_column: str) -> List[str]:
    """The markdown table of :func:`replay`'s result (one row per set and rule)."""
    lines = [f"| set | {rule_column} | accuracy | found on fractured | found on intact | "
             "macro AUROC |", "|---|---|---|---|---|---|"]
    for name, both in sets.items():
        for label, m in both.items():
            lines.append(f"| {name} | {label} | {100 * m['accuracy']:.1f} % | "
                         f"{100 * m['found_rate']:.1f} % | {100 * m['found_on_none_rate']:.1f} % "
                         f"| {m['macro_auroc']:.3f} |")
    return lines


def study_main(doc: str, study: Callable[[Path], Dict[str, Any]],
               page: Callable[[Path, Dict[str, Any]], str], keys: Sequence[str]) -> None:
    """The command line of a decision study: ``SCRIPT FOLDER`` runs ``study(folder)``, writes
    ``study.json`` and ``README.md`` (``page``) in the folder and prints ``keys`` of the
    result as JSON."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("folder")
    folder = Path(ap.parse_args().folder)
    result = study(folder)
    (folder / "study.json").write_text(json.dumps(result, indent=1) + "\n")
    (folder / "README.md").write_text(page(folder, result))
    print(json.dumps({k: result[k] for k in keys}))
