#!/usr/bin/env python3
"""Write MODEL_DIR/model_card.md and model_card.json from the training and evaluation records.

Usage:
    python scripts/write_model_card.py MODEL_DIR --metrics held_out_metrics.json \
        --data-command "ankle-fracture phantom --out ... --n ... --seed ..." \
        --eval-command "ankle-fracture evaluate-seg ... --model MODEL_DIR --out ..." \
        [--heldout NAME METRICS_JSON COMMAND]... [--label-free JSON COMMAND] [--note "..."]

``--heldout`` adds one more held-out set (e.g. another phantom family) with its own table;
``--label-free`` adds the label-free agreement on real scans (scripts/seg_label_free_real.py).

The card states what data trained the model, the exact commands (data, training, evaluation),
the seed, epochs, model spacing, the measured held-out metrics and the sha256 of the weights, so
anyone can check that the shipped file is the one that was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from AnkleFractureLib.segmentation.model_io import sha256_file


def _fmt(v) -> str:
    return "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def _rows(metrics: dict) -> list:
    out = ["| subset | Dice tibia | Dice fibula | HD95 tibia (mm) | HD95 fibula (mm) |",
           "|---|---|---|---|---|"]
    for name, key in (("all", "mean"), ("fractured", "mean_fractured"), ("intact", "mean_intact")):
        sub = metrics.get(key) or {}
        t, f = sub.get("tibia", {}), sub.get("fibula", {})
        out.append(f"| {name} | {_fmt(t.get('dice'))} | {_fmt(f.get('dice'))} | "
                   f"{_fmt(t.get('hd95_mm'))} | {_fmt(f.get('hd95_mm'))} |")
    return out


def _table(name: str, metrics: dict, command: str) -> list:
    return ["", f"## Held-out evaluation: {name}", "", f"Command: `{command}`", "",
            f"{metrics.get('n_cases', '?')} cases (a seed never used in training).", ""] + _rows(metrics)


def _label_free(results: dict, command: str) -> list:
    lines = ["", "## Label-free agreement on real CT", "",
             "No labels exist for the real series; the check compares the predicted labels with "
             "the bone the CT itself shows (AnkleFractureLib.segmentation.quality).", "",
             f"Command: `{command}`", "",
             "| series | level | two-bone slices | Dice tibia | Dice fibula | off bone | on other bone | foot-bone label (ml) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        q = r.get("agreement", {})
        lines.append(f"| {name} | {q.get('level')} | {q.get('slices')} | "
                     f"{_fmt(q.get('dice_tibia_mean'))} | {_fmt(q.get('dice_fibula_mean'))} | "
                     f"{_fmt(q.get('label_off_bone'))} | {_fmt(q.get('label_on_other_bone'))} | "
                     f"{_fmt(r.get('labelled_ml'))} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--metrics", required=True, help="evaluate-seg JSON on the held-out set")
    ap.add_argument("--data-command", action="append", default=[],
                    help="command that generated the training/held-out data (repeatable)")
    ap.add_argument("--eval-command", default="", help="command that produced --metrics")
    ap.add_argument("--heldout", nargs=3, action="append", default=[],
                    metavar=("NAME", "METRICS_JSON", "COMMAND"),
                    help="another held-out set: its name, evaluate-seg JSON and command")
    ap.add_argument("--label-free", nargs=2, metavar=("JSON", "COMMAND"),
                    help="label-free agreement on real scans and the command that measured it")
    ap.add_argument("--credit", action="append", default=[], help="data credit (repeatable)")
    ap.add_argument("--note", action="append", default=[], help="free text (repeatable)")
    args = ap.parse_args()

    model_dir = Path(args.model_dir)
    weights = model_dir / "model.pt"
    training = json.loads((model_dir / "training.json").read_text())
    plans = json.loads((model_dir / "plans.json").read_text())
    metrics = json.loads(Path(args.metrics).read_text())
    digest = sha256_file(weights)
    card = {
        "name": model_dir.name,
        "task": "tibia (1) and fibula (2) segmentation of ankle CT",
        "weights": {"file": "model.pt", "sha256": digest, "bytes": os.path.getsize(weights)},
        "plans": plans,
        "training": training,
        "data_commands": args.data_command,
        "evaluation_command": args.eval_command,
        "held_out_metrics": {k: metrics.get(k) for k in ("n_cases", "mean", "mean_fractured",
                                                         "mean_intact")},
        "other_held_out": {name: {k: json.loads(Path(path).read_text()).get(k)
                                  for k in ("n_cases", "mean", "mean_fractured", "mean_intact")}
                           | {"command": cmd} for name, path, cmd in args.heldout},
        "label_free_real": (None if not args.label_free else
                            {"results": json.loads(Path(args.label_free[0]).read_text()),
                             "command": args.label_free[1]}),
        "credits": args.credit,
        "notes": args.note,
        "intended_use": "Demonstration model trained on the project's synthetic phantom. "
                        "Not validated on patient data; not for clinical use.",
    }
    (model_dir / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")

    m = metrics.get("mean", {})
    lines = [f"# Model card: {model_dir.name}", "",
             "Tibia (label 1) and fibula (label 2) segmentation of ankle CT; fracture fragments",
             "carry their parent bone's label.", "",
             "**Demonstration model, trained on synthetic phantoms only. Not validated on patient",
             "data; not for clinical use.** Retrain on your own data with `ankle-fracture train-seg`.",
             "", "## Weights", "",
             f"- file: `model.pt` ({os.path.getsize(weights) / 1e6:.1f} MB, float16 state dict)",
             f"- sha256: `{digest}`", "",
             "## Model", "",
             f"- network: MONAI {plans['network']['architecture']} {plans['network']}",
             f"- model spacing: {plans['model_spacing_mm']} mm, HU window {plans['hu_window']},"
             f" patch {plans['patch_size']} (z, y, x)", "",
             "## Training", ""]
    for c in args.data_command:
        lines.append(f"- data: `{c}`")
    if "command" in training:
        lines.append("- command: `" + " ".join(str(c) for c in training["command"]) + "`")
    for key in ("seed", "status", "epochs_run", "steps_run", "best_val_dice", "best_epoch",
                "wall_seconds", "device", "versions"):
        if key in training:
            lines.append(f"- {key}: `{training[key]}`")
    for key in ("train_cases", "val_cases"):
        if key in training:
            lines.append(f"- {key}: {len(training[key])} cases")
    lines += ["", "## Held-out evaluation", ""]
    if args.eval_command:
        lines.append(f"Command: `{args.eval_command}`")
        lines.append("")
    lines.append(f"{metrics.get('n_cases', '?')} cases (a seed never used in training).")
    lines.append("")
    lines.append("| subset | Dice tibia | Dice fibula | HD95 tibia (mm) | HD95 fibula (mm) |")
    lines.append("|---|---|---|---|---|")
    for name, key in (("all", "mean"), ("fractured", "mean_fractured"), ("intact", "mean_intact")):
        sub = metrics.get(key) or {}
        t, f = sub.get("tibia", {}), sub.get("fibula", {})
        lines.append(f"| {name} | {_fmt(t.get('dice'))} | {_fmt(f.get('dice'))} | "
                     f"{_fmt(t.get('hd95_mm'))} | {_fmt(f.get('hd95_mm'))} |")
    for name, path, cmd in args.heldout:
        lines += _table(name, json.loads(Path(path).read_text()), cmd)
    if args.label_free:
        lines += _label_free(json.loads(Path(args.label_free[0]).read_text()), args.label_free[1])
    lines += ["", "Targets (issue 3): mean Dice tibia >= 0.97, fibula >= 0.95, mean HD95 <= 2 mm.",
              "Published reference (methods.md): tibia 0.9619, fibula 0.9233, HD95 3.69 mm "
              "(real CT; not directly comparable to phantoms)."]
    for n in args.note:
        lines += ["", n]
    if args.credit:
        lines += ["", "## Data credit", ""] + [f"- {c}" for c in args.credit]
    (model_dir / "model_card.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {model_dir / 'model_card.md'} and model_card.json (sha256 {digest})")
    del m


if __name__ == "__main__":
    sys.exit(main())
