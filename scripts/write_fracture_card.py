#!/usr/bin/env python3
"""Write MODEL_DIR/model_card.md and model_card.json of the fracture localiser.

Usage:
    python scripts/write_fracture_card.py MODEL_DIR \
        --data-command "ankle-fracture phantom --out ... --fractures varied ..." \
        --heldout NAME METRICS_JSON COMMAND [--heldout ...] [--credit TEXT] [--note TEXT]
    python scripts/write_fracture_card.py Resources/Models/fracture \
        --from-commands docs/fracture/commands.json      # the shipped card's options

Every figure comes from the files named: training.json (command, seed, validation), the
``evaluate-fracture`` JSON of each held-out set (through the whole pipeline) and the sha256 of
model.pt, so anyone can check that the shipped file is the one that was measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List

from AnkleFractureLib.io import atomic_write_json
from AnkleFractureLib.segmentation.model_io import folder_sha256, sha256_file


def _f(v: Any, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.1f} %" if pct else (f"{v:.2f}" if isinstance(v, float) else str(v))


def _heldout(name: str, metrics: Dict[str, Any], command: str) -> List[str]:
    s = metrics["summary"]
    fr, comb, clf = s["fracture"], s["combined"], s["classifier_only"]
    auroc = comb["per_class"]
    lines = ["", f"## Held-out: {name}", "", f"Command: `{command}`", "",
             f"{s['n']} cases through the whole pipeline (shipped segmentation, side detected, "
             f"checks); {s['refused']} refused (counted as wrong).", "",
             "| measure | value |", "|---|---|",
             f"| fracture found (fractured cases, n={fr['n_fractured']}) | {_f(fr['found_rate'], True)} |",
             f"| 'found' on intact cases (n={fr['n_none']}) | {_f(fr['found_on_none_rate'], True)} |",
             f"| median abs height error | {_f(fr['median_abs_height_error_mm'])} mm |",
             f"| median centre distance | {_f(fr['median_center_distance_mm'])} mm |"]
    cam = s.get("gradcam")
    if cam:  # files written before result.json recorded the heatmap's maximum have none
        lines += [f"| Grad-CAM maximum from the fracture centre, median (n={cam['n']}) | "
                  f"{_f(cam['median_peak_distance_mm'])} mm |",
                  f"| Grad-CAM maximum within {cam['hit_mm']:.0f} mm of it | "
                  f"{_f(cam['hit_rate'], True)} |"]
    lines += [f"| Weber accuracy, combined answer | {_f(comb['accuracy'], True)} |",
              f"| Weber accuracy, classifier alone | {_f(clf['accuracy'], True)} |",
              "| Weber accuracy, measured height alone (answered cases) | "
              f"{_f(s['height_only_accuracy'], True)} |",
              f"| ECE, combined | {_f(comb['ece'])} |",
              "| AUROC none / A / B / C, combined | " + " / ".join(
                  _f(auroc[c]["auroc"]) for c in ("none", "A", "B", "C")) + " |",
              "", "Confusion matrix of the combined answer (rows true none, A, B, C):", "",
              "```"]
    lines += [" ".join(f"{v:3d}" for v in row) for row in comb["confusion_matrix"]] + ["```"]
    return lines


def _members(folder: Path) -> list:
    """Card lines for the ensemble members plans.json lists (their weights' sha256 and, from
    ``<member>.training.json`` beside them, the command that trained them)."""
    plans = json.loads((folder / "plans.json").read_text())
    members = plans.get("members") or []
    if not members:
        return []
    md = ["", "## Ensemble", "",
          "plans.json lists more networks (`members`): the localiser's line probability is the "
          "mean of `model.pt`'s and theirs (`AnkleFractureLib.fracture.network.MeanProbability`); "
          f"the folder's sha256 over all of them (`folder_sha256`) is `{folder_sha256(folder)}`.",
          ""]
    for m in members:
        md.append(f"- `{m['file']}`, sha256 `{sha256_file(folder / m['file'])}`")
        md += _training_lines(folder, m["file"])
    return md


def _training_lines(folder: Path, weights: str) -> list:
    """Card lines from ``<weights stem>.training.json`` beside a weights file (the command
    that trained it, seed, steps, cases), none without it."""
    record = folder / (Path(weights).stem + ".training.json")
    if not record.is_file():
        return []
    t = json.loads(record.read_text())
    return [f"  - training command: `{t['command']}`",
            f"  - seed {t['config']['seed']}, {t['steps_run']} steps ({t['minutes']} min "
            f"on CPU), best validation step {t['best_step']}; training cases: "
            f"{len(t['train_cases'])}; validation cases: {len(t['val_cases'])}"]


def _upper(folder: Path) -> list:
    """Card lines for the upper-window network plans.json names (``inference.upper_window``
    with a weights file): its sha256 and, from ``<file stem>.training.json`` beside it, the
    command that trained it."""
    plans = json.loads((folder / "plans.json").read_text())
    inference = plans.get("inference") or {}
    entry = inference.get("upper_window")
    if not isinstance(entry, dict):
        return []
    md = ["", "## Above the box", "",
          f"The localiser reads a crop {inference.get('extend_top_mm', 0):g} mm taller than the "
          "classifier's box, in windows of the box's height: the box by `model.pt` (its output "
          "there is `model.pt`'s alone), the window above it by a network trained on the box "
          "moved up by that height (`train-fracture --crop-shift-mm`); the folder's sha256 over "
          f"both (`folder_sha256`) is `{folder_sha256(folder)}`.", "",
          f"- `{entry['file']}`, sha256 `{sha256_file(folder / entry['file'])}`"]
    return md + _training_lines(folder, entry["file"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--data-command", action="append", default=[])
    ap.add_argument("--heldout", nargs=3, action="append", default=[],
                    metavar=("NAME", "METRICS_JSON", "COMMAND"))
    ap.add_argument("--credit", action="append", default=[])
    ap.add_argument("--note", action="append", default=[])
    ap.add_argument("--from-commands", default=None, metavar="COMMANDS_JSON",
                    help="take the other options from COMMANDS_JSON's \"card_args\" "
                         "(docs/fracture/commands.json)")
    args = ap.parse_args()
    if args.from_commands:
        spec = json.loads(Path(args.from_commands).read_text())
        args = ap.parse_args([args.model_dir] + [a for pair in spec["card_args"] for a in pair])
    folder = Path(args.model_dir)
    training = json.loads((folder / "training.json").read_text())
    sha = sha256_file(folder / "model.pt")
    heldout = {name: json.loads(Path(path).read_text()) for name, path, _ in args.heldout}
    md = ["# Fracture localiser: model card", "",
          "Locates the fibular fracture line on the registered syndesmosis crop (fibula window, "
          "1.5 mm voxels) and measures its height above the tibial plafond. A demonstration "
          "trained on the project's synthetic phantoms only, not on patient data; it is not a "
          "medical device.", "",
          f"- weights: `model.pt`, sha256 `{sha}`",
          f"- training command: `{training['command']}`",
          f"- seed {training['config']['seed']}, {training['steps_run']} steps "
          f"({training['minutes']} min on CPU), best validation step {training['best_step']}",
          f"- training cases: {len(training['train_cases'])}; validation cases: "
          f"{len(training['val_cases'])}"]
    md += [f"- data: `{c}`" for c in args.data_command]
    md += ["", "Validation (cases held back from training, dataset masks, default found rule): `"
           + json.dumps(training.get("val_metrics")) + "`", "",
           "Found rule fitted after training on the training and validation cases (plans.json "
           "`decision`): `" + json.dumps(training.get("decision_fit")) + "`"]
    refit = training.get("decision_refit")
    if refit:
        md += ["", "Line rule refitted afterwards on a validation set of the training family "
               "(never on a held-out family), without retraining the weights; plans.json "
               "`decision` holds it:", "",
               f"- command: `{refit['command']}`",
               f"- rule: `{json.dumps(refit['rule'])}` (before: `{json.dumps(refit['previous'])}`)",
               f"- its validation scores: `{json.dumps(refit['validation'])}`"]
    md += _members(folder)
    md += _upper(folder)
    for name, path, command in args.heldout:
        md += _heldout(name, heldout[name], command)
    if args.credit:
        md += ["", "## Credit", ""] + [f"- {c}" for c in args.credit]
    if args.note:
        md += ["", "## Notes", ""] + [f"- {n}" for n in args.note]
    (folder / "model_card.md").write_text("\n".join(md) + "\n")
    atomic_write_json(folder / "model_card.json", {
        "name": "fracture", "weights": {"file": "model.pt", "sha256": sha,
                                        "folder_sha256": folder_sha256(folder)},
        "training": {k: training.get(k) for k in ("command", "config", "steps_run", "best_step",
                                                  "val_metrics", "decision_fit",
                                                  "decision_refit")},
        "data_commands": args.data_command,
        "heldout": {name: {"command": cmd, "summary": heldout[name]["summary"]}
                    for name, _, cmd in args.heldout},
        "credit": args.credit, "notes": args.note})
    print(f"written {folder / 'model_card.md'}")


if __name__ == "__main__":
    main()
