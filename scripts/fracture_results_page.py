#!/usr/bin/env python3
"""Render docs/fracture/README.md from the evaluation files committed beside it.

Usage:
    python scripts/fracture_results_page.py [--docs docs/fracture]

``docs/fracture/commands.json`` lists the sets: {"sets": [{"name", "json", "command",
"data_command"}], "model_command": "..."}; each ``json`` is the output of
``ankle-fracture evaluate-fracture`` (through the whole pipeline). Nothing on the page is typed
by hand; Testing/test_fracture_page.py checks that the page is this script's rendering.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List

CLASSES = ("none", "A", "B", "C")


def _p(v: Any) -> str:
    return "n/a" if v is None else f"{100.0 * float(v):.1f} %"


def _mm(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.1f} mm"


def _summary(name: str, data: Dict[str, Any], entry: Dict[str, str]) -> List[str]:
    s = data["summary"]
    f, comb, clf = s["fracture"], s["combined"], s["classifier_only"]
    auc = " / ".join("n/a" if comb["per_class"][c]["auroc"] is None
                     else f"{comb['per_class'][c]['auroc']:.3f}" for c in CLASSES)
    auc_clf = " / ".join("n/a" if clf["per_class"][c]["auroc"] is None
                         else f"{clf['per_class'][c]['auroc']:.3f}" for c in CLASSES)
    out = [f"## {name}", "", f"Data: `{entry['data_command']}`", "",
           f"Evaluation: `{entry['command']}`", "",
           f"{s['n']} cases ({f['n_fractured']} fractured, {f['n_none']} intact), "
           f"{s['refused']} refused (counted as wrong); {data['seconds']} s.", "",
           "| measure | value |", "|---|---|",
           f"| fracture found, fractured cases | {_p(f['found_rate'])} |",
           f"| 'found' on intact cases | {_p(f['found_on_none_rate'])} |",
           f"| median abs height error | {_mm(f['median_abs_height_error_mm'])} |",
           f"| median distance of the located centre | {_mm(f['median_center_distance_mm'])} |",
           f"| accuracy, combined answer | {_p(comb['accuracy'])} |",
           f"| accuracy, classifier alone | {_p(clf['accuracy'])} |",
           f"| accuracy, measured height alone (answered) | {_p(s['height_only_accuracy'])} |",
           f"| unsure (answered cases) | {_p(s['unsure_rate'])} |",
           f"| ECE, combined / classifier | {comb['ece']:.3f} / {clf['ece']:.3f} |",
           f"| AUROC none / A / B / C, combined | {auc} |",
           f"| AUROC none / A / B / C, classifier | {auc_clf} |"]
    out += _registration(s.get("registration"))
    out += _gradcam(s.get("gradcam"))
    out += ["",
           "Confusion matrix of the combined answer (rows: true none, A, B, C; columns: "
           "predicted):", "", "| true \\ predicted | none | A | B | C |", "|---|---|---|---|---|"]
    out += [f"| {c} | " + " | ".join(str(v) for v in row) + " |"
            for c, row in zip(CLASSES, comb["confusion_matrix"])]
    return out + [""]


def _registration(reg: Any) -> List[str]:
    """Table rows of the registration's plafond error (evaluations that know the true plafond;
    none for files from before it was recorded)."""
    if not reg:
        return []
    return [f"| template plafond from the true plafond, median / max (3-D) | "
            f"{_mm(reg['median_plafond_error_mm'])} / {_mm(reg['max_plafond_error_mm'])} |",
            f"| the same along the template's long axis (what the height depends on) | "
            f"{_mm(reg['median_plafond_height_error_mm'])} / "
            f"{_mm(reg['max_plafond_height_error_mm'])} |",
            f"| plafond within 2 mm (3-D), answered cases | {_p(reg['plafond_within_2mm'])} |"]


def _gradcam(cam: Any) -> List[str]:
    """Table rows of where the Grad-CAM heatmap's maximum lies (evaluations from before
    ``peak_lps`` was recorded have none)."""
    if not cam:
        return []
    return [f"| Grad-CAM maximum from the fracture centre, median ({cam['n']} fractured "
            f"answered cases) | {_mm(cam['median_peak_distance_mm'])} |",
            f"| Grad-CAM maximum within {cam['hit_mm']:.0f} mm of it | {_p(cam['hit_rate'])} |"]


def _cases(data: Dict[str, Any]) -> List[str]:
    out = ["<details><summary>every case</summary>", "",
           "| case | true | answer | unsure | found | height | true height | error | refusal |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in data["cases"]:
        h = "" if r["height_mm"] is None else f"{r['height_mm']:+.1f}"
        t = "" if r["height_true_mm"] is None else f"{r['height_true_mm']:+.1f}"
        e = "" if r["abs_height_error_mm"] is None else f"{r['abs_height_error_mm']:.1f}"
        out.append(f"| {r['id']} | {r['true']} | {r['predicted'] or '-'} | "
                   f"{'yes' if r['unsure'] else ''} | {'yes' if r['found'] else 'no'} | {h} | "
                   f"{t} | {e} | {(r['refusal'] or '')[:80]} |")
    return out + ["", "</details>", ""]


def render(docs: Path) -> str:
    """The page's text."""
    spec = json.loads((docs / "commands.json").read_text())
    lines = ["# Fracture localisation and the Weber answer, through the whole pipeline", "",
             "Generated by `python scripts/fracture_results_page.py` from the evaluation files "
             "in this folder (do not edit). Phantom results: they test the method and the "
             "code, not clinical performance.", "",
             f"Localiser: `{spec['model_command']}`", "",
             "Every case runs as `ankle-fracture run` does: the shipped segmentation, automatic "
             "side detection, the checks, registration, crop, classifier and localiser. The "
             "held-out fracture family (`--fractures heldout`) is parameterised differently from "
             "the training family and was never trained on.", ""]
    for entry in spec["sets"]:
        data = json.loads((docs / entry["json"]).read_text())
        lines += _summary(entry["name"], data, entry) + _cases(data)
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", default="docs/fracture")
    args = ap.parse_args()
    docs = Path(args.docs)
    (docs / "README.md").write_text(render(docs))
    print(f"written {docs / 'README.md'}")


if __name__ == "__main__":
    main()
