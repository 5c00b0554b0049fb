#!/usr/bin/env python3
"""Write an experiment folder's README.md: a localiser tried against the shipped one.

Usage:
    python scripts/fracture_experiment_page.py docs/fracture/experiments/v4_mimics

The folder holds ``experiment.json`` ({"title", "why", "commands": {...}, "verdict"}, and
optionally "baseline": a folder, relative to the repository, holding the shipped localiser's
``heldout_<set>.json`` measured on the same data, "data_note", and "erratum": what a later
experiment found wrong with this one's data or reading, shown after the verdict), the trained
model's
``training.json`` and ``plans.json``, and one ``heldout_<set>.json`` per held-out set
(``ankle-fracture evaluate-fracture`` output). The shipped localiser's figures are read from
the baseline folder (default ``docs/fracture``). Nothing on the page is typed by hand except
the words of experiment.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
SETS = ("vh", "confounders", "analytic", "vh2", "vh3", "conf2", "vh4", "conf3", "vh5", "conf4",
        "vh6", "conf5", "vh7", "conf6", "vh8", "conf7", "vh9", "conf8",
        "vh10raw", "conf9raw", "vh11raw", "conf10raw", "vh12raw", "conf11raw", "vh13raw",
        "conf12raw", "vh14raw", "conf13raw", "vh15raw", "conf14raw", "vh16raw",
        "conf15raw")
#: What a page calls each model an experiment may change (experiment.json "model").
NAMES = {"classification": "classifier", "fracture": "localiser"}


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def _row(label: str, metrics: Dict[str, Any], model: Any = "fracture") -> str:
    """One table row; ``model`` names the model (or a list of models) whose sha256 identifies
    the row."""
    s = metrics["summary"]
    c, f = s["combined"], s.get("fracture") or {}
    models = [model] if isinstance(model, str) else list(model)
    sha = " / ".join(((metrics.get("models") or {}).get(m) or {}).get("sha256", "")[:12]
                     for m in models)
    alone = (s.get("classifier_only") or {}).get("accuracy")
    return (f"| {label} (`{sha}`) | {s['n']} | {s['refused']} | {_pct(c['accuracy'])} | "
            + " / ".join(f"{c['per_class'][k]['auroc']:.2f}" for k in ("none", "A", "B", "C"))
            + f" | {_pct(alone)} | {_pct(s.get('unsure_rate'))} | {_pct(f.get('found_rate'))} | "
            f"{_pct(f.get('found_on_none_rate'))} | {f.get('median_abs_height_error_mm', 'n/a')} |")


def _families(ids: List[str]) -> str:
    """Case counts by phantom family, from the ids ("vh_451_0003": real-shape; "phantom_...":
    analytic)."""
    names = {"vh": "real-shape", "phantom": "analytic"}
    counts: Dict[str, int] = {}
    for i in ids:
        fam = names.get(i.split("_")[0], "other")
        counts[fam] = counts.get(fam, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def _classifier_alone(study: Dict[str, Any]) -> Any:
    """Accuracy of the classifier alone pooled over the study's fit files (None when one is
    missing): the rule does not touch it, so the evaluation files give it as they are."""
    right = n = 0
    for rel in study.get("fit_sets") or []:
        path = ROOT / rel
        if not path.is_file():
            return None
        s = json.loads(path.read_text())["summary"]
        alone = s.get("classifier_only") or {}
        if alone.get("accuracy") is None:
            return None
        right += alone["accuracy"] * s["n"]
        n += s["n"]
    return right / n if n else None


def _validation_table(folder: Path, studies: Any, what: str = "localiser") -> List[str]:
    """Rows of the validation sets, each pair with its own line rule fitted there
    (``experiment.json`` "validation": {"this experiment": study.json relative to the folder,
    "shipped": study.json relative to the repository})."""
    if not studies:
        return []
    out = ["", "## Validation sets (each with its line rule fitted on them)", "",
           f"| {what} | cases | accuracy | macro AUROC | AUROC C | classifier alone | "
           "found on fractured | found on intact | median height error (mm) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for label, rel in studies.items():
        path = folder / rel if label == "this experiment" else ROOT / rel
        study = json.loads(path.read_text())
        m = study["sets"]["fit (validation)"]["fitted"]
        out.append(f"| {label} (`{Path(rel).parent.as_posix()}`) | {m['n']} | "
                   f"{_pct(m['accuracy'])} | {m['macro_auroc']:.3f} | {m['auroc']['C']:.3f} | "
                   f"{_pct(_classifier_alone(study))} | "
                   f"{_pct(m['found_rate'])} | {_pct(m['found_on_none_rate'])} | "
                   f"{m['median_abs_height_error_mm']} |")
    return out


def _localiser_training(train: Dict[str, Any], plans: Dict[str, Any]) -> List[str]:
    """The Training section of a localiser experiment (its training.json and plans.json)."""
    lines: List[str] = []
    fit = (train.get("decision_refit") or {}).get("fit") or train.get("decision_fit") or {}
    cut = plans["decision"].get("min_cut", 0.0)
    cut_words = f", cutting >= {cut:.0%} of the fibula below it off" if cut else ""
    lines += ["", "## Training", "",
              f"- {train.get('steps_run')} steps in {train.get('minutes')} min on "
              f"{train.get('device', 'cpu')}; best validation step {train.get('best_step')}; "
              f"{len(train.get('train_cases', []))} training and "
              f"{len(train.get('val_cases', []))} validation cases",
              f"- training cases by family: {_families(train.get('train_cases', []))}; "
              f"validation: {_families(train.get('val_cases', []))}",
              f"- 'found' rule fitted on the training and validation crops: peak >= "
              f"{plans['decision'].get('found_threshold')} and line >= "
              f"{plans['decision'].get('min_voxels')} voxels{cut_words} (found "
              f"{_pct(fit.get('found_rate'))} "
              f"of fractured, {_pct(fit.get('found_on_none_rate'))} of intact crops, "
              f"{fit.get('cases')} crops)"]
    return lines


def _classifier_training(folder: Path, train: Dict[str, Any],
                         heading: str = "Training") -> List[str]:
    """The Training section of a classifier experiment: its training.json and, when present,
    ``cases.json`` (the ids of the training dataset's cases, for the counts by family)."""
    cases = train.get("cases") or {}
    failed = cases.get("failed") or {}
    cfg = train.get("config") or {}
    ids_file = folder / "cases.json"
    ids = json.loads(ids_file.read_text()) if ids_file.is_file() else []
    plain = [i for i in ids if not i.endswith("_predseg")]
    crops = cases.get("labelled_train")
    crops = len(crops) if isinstance(crops, list) else crops  # ids in newer training.json
    twins = len(ids) - len(plain)
    return ["", f"## {heading}", "",
            f"- {train.get('method')} training, {train.get('steps_done')} steps (batch "
            f"{cfg.get('batch_size')}, lr {cfg.get('lr')}) in {train.get('minutes')} min on "
            f"{train.get('device', 'cpu')}; {crops} training crops, "
            f"{len(failed)} not cropped ({', '.join(sorted(failed)) or 'none'})",
            f"- training cases by family: {_families(plain)}; {twins} of them cropped a second "
            "time with the shipped segmentation's masks"]


def _counts(result: Dict[str, Any]) -> Dict[str, int]:
    """Case counts of one evaluation file: right answers (a refusal is wrong), fractured and
    intact cases, lines found on each."""
    rows = result["cases"]
    frac = [r for r in rows if r["true"] != "none"]
    return {"cases": len(rows), "right": sum(r["predicted"] == r["true"] for r in rows),
            "fractured": len(frac), "found": sum(bool(r.get("found")) for r in frac),
            "intact": len(rows) - len(frac),
            "intact_found": sum(bool(r.get("found")) for r in rows if r["true"] == "none")}


def _totals(folder: Path, baseline: Path, what: str) -> List[str]:
    """The held-out sets added up, case by case (experiment.json ``"totals": true``): right
    answers in all and per set, fractures found on all sets and on the real-shape ones (vh*),
    intact ankles given a line."""
    pairs = [(name, folder / f"heldout_{name}.json", baseline / f"heldout_{name}.json")
             for name in SETS]
    pairs = [(n, m, b) for n, m, b in pairs if m.is_file() and b.is_file()]
    if not pairs:
        return []
    lines = ["", "### All held-out sets together (case counts)", "",
             f"| {what} | cases | right | right per set ({', '.join(n for n, _, _ in pairs)}) | "
             "fractures found | on the real-shape sets | intact ankles with a line |",
             "|---|---|---|---|---|---|---|"]
    for label, mine in (("shipped", False), ("this experiment", True)):
        per = {n: _counts(json.loads((m if mine else b).read_text())) for n, m, b in pairs}
        tot = {k: sum(c[k] for c in per.values()) for k in next(iter(per.values()))}
        real = [c for n, c in per.items() if n.startswith("vh")]
        lines.append(
            f"| {label} | {tot['cases']} | {tot['right']} | "
            f"{' / '.join(str(c['right']) for c in per.values())} | "
            f"{tot['found']} of {tot['fractured']} | {sum(c['found'] for c in real)} of "
            f"{sum(c['fractured'] for c in real)} | {tot['intact_found']} of {tot['intact']} |")
    return lines


def _warning_counts(folder: Path, baseline: Path, codes: Any, what: str) -> List[str]:
    """How many held-out cases carry each warning of ``codes`` (experiment.json
    ``"warning_counts": [code, ...]``), pooled over the sets both pipelines ran, and how many
    of those the combined answer got right."""
    if not codes:
        return []
    pairs = [(folder / f"heldout_{n}.json", baseline / f"heldout_{n}.json") for n in SETS]
    pairs = [(m, b) for m, b in pairs if m.is_file() and b.is_file()]
    if not pairs:
        return []
    out = ["", "### Warnings (cases of all held-out sets together)", "",
           f"| {what} | " + " | ".join(f"`{c}` (right)" for c in codes) + " |",
           "|---|" + "---|" * len(codes)]
    for label, mine in (("shipped", False), ("this experiment", True)):
        rows = [r for m, b in pairs for r in json.loads((m if mine else b).read_text())["cases"]]
        cells = []
        for code in codes:
            hit = [r for r in rows if code in (r.get("warning_codes") or [])]
            cells.append(f"{len(hit)} of {len(rows)} "
                         f"({sum(r['predicted'] == r['true'] for r in hit)})")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def _validation_runs(folder: Path, runs: Any, what: str) -> List[str]:
    """Rows of the validation sets run with the same line rule by both (experiment.json
    ``"validation_runs": {"shipped": [files], "this experiment": [files]}``, relative to the
    folder): case counts pooled over the files."""
    if not runs:
        return []
    out = ["", "## Validation sets (the same line rule for both)", "",
           f"| {what} | files | cases | right | fractures found | intact ankles with a line |",
           "|---|---|---|---|---|---|"]
    for label, files in runs.items():
        per = [_counts(json.loads((folder / f).read_text())) for f in files]
        tot = {k: sum(c[k] for c in per) for k in per[0]}
        out.append(f"| {label} | {', '.join(f'`{f}`' for f in files)} | {tot['cases']} | "
                   f"{tot['right']} | {tot['found']} of {tot['fractured']} | "
                   f"{tot['intact_found']} of {tot['intact']} |")
    return out


def render(folder: Path) -> str:
    exp = json.loads((folder / "experiment.json").read_text())
    train = json.loads((folder / "training.json").read_text())
    plans = json.loads((folder / "plans.json").read_text())
    baseline = ROOT / exp.get("baseline", "docs/fracture")
    # the model this experiment changes, or a list of them ("classification", "fracture")
    model = exp.get("model", "fracture")
    what = " / ".join(NAMES[m] for m in ([model] if isinstance(model, str) else model))
    lines: List[str] = [f"# {exp['title']}", "",
                        f"Generated by `python scripts/fracture_experiment_page.py {folder.as_posix()}` "
                        "from the JSON files in this folder and the shipped localiser's "
                        f"evaluation files in `{_shown(baseline)}`.", "",
                        exp["why"], "",
                        "## Through the whole pipeline (held-out sets)", ""]
    rows: List[str] = []
    for name in SETS:
        mine = folder / f"heldout_{name}.json"
        shipped = baseline / f"heldout_{name}.json"
        if not mine.is_file() or not shipped.is_file():
            continue
        rows.append(f"| **{name}** | | | | | | | | | |")
        rows.append(_row("shipped", json.loads(shipped.read_text()), model))
        rows.append(_row("this experiment", json.loads(mine.read_text()), model))
    if rows:
        lines += [f"| {what} (sha256) | cases | refused | accuracy | AUROC none / A / B / C | "
                  "classifier alone | unsure | found on fractured | found on intact | "
                  "median height error (mm) |", "|---|---|---|---|---|---|---|---|---|---|"]
        lines += rows
    else:
        lines.append("Not run (see the verdict).")
    if exp.get("totals"):
        lines += _totals(folder, baseline, what)
    lines += _warning_counts(folder, baseline, exp.get("warning_counts"), what)
    lines += _validation_table(folder, exp.get("validation"), what)
    lines += _validation_runs(folder, exp.get("validation_runs"), what)
    if exp.get("criterion"):
        lines += ["", "Shipping criterion: " + exp["criterion"]]
    if exp.get("data_note"):
        lines += ["", exp["data_note"]]
    if model == "classification":
        lines += _classifier_training(folder, train)
    else:
        lines += _localiser_training(train, plans)
    if exp.get("classifier_training"):  # both models changed: the classifier's record too
        cls_train = json.loads((folder / exp["classifier_training"]).read_text())
        lines += _classifier_training(folder, cls_train, "Classifier training")
    lines += ["", "## Commands", ""]
    lines += [f"- {k}: `{v}`" for k, v in exp["commands"].items()]
    lines += ["", "## Verdict", "", exp["verdict"]]
    if exp.get("erratum"):  # found after the verdict, by a later experiment: said, not hidden
        lines += ["", "## Erratum", "", exp["erratum"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    args = ap.parse_args()
    folder = Path(args.folder)
    (folder / "README.md").write_text(render(folder))
    print(f"wrote {folder / 'README.md'}")


if __name__ == "__main__":
    main()
