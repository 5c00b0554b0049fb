#!/usr/bin/env python3
"""Write the classifier's MODEL_DIR/model_card.md and model_card.json.

Usage:
    python scripts/write_cls_model_card.py MODEL_DIR --metrics test_metrics.json \
        --data-command "ankle-fracture phantom ..." --eval-command "ankle-fracture evaluate-cls ..." \
        [--note "..."]

The card states the data, the exact commands (data, training, evaluation), the seed, the
measured test metrics (accuracy, per-class sensitivity/specificity/precision/AUROC, confusion
matrix, calibration) and the sha256 of the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from AnkleFractureLib.segmentation.model_io import sha256_file


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _f3(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--metrics", required=True, help="evaluate-cls JSON on the test set")
    ap.add_argument("--data-command", action="append", default=[])
    ap.add_argument("--eval-command", default="")
    ap.add_argument("--note", action="append", default=[])
    args = ap.parse_args()

    model_dir = Path(args.model_dir)
    weights = model_dir / "model.pt"
    training = json.loads((model_dir / "training.json").read_text())
    plans = json.loads((model_dir / "plans.json").read_text())
    m = json.loads(Path(args.metrics).read_text())
    digest = sha256_file(weights)
    keep = ("n", "accuracy", "macro", "per_class", "confusion_matrix", "ece", "brier", "log_loss",
            "unsure", "tta")
    card = {"name": model_dir.name,
            "task": "Danis-Weber classification (none, A, B, C) of the registered syndesmosis crop",
            "weights": {"file": "model.pt", "sha256": digest, "bytes": os.path.getsize(weights)},
            "plans": plans,
            "training": {k: v for k, v in training.items() if k != "cases"},
            "training_cases": {k: (len(v) if isinstance(v, list) else v)
                               for k, v in training.get("cases", {}).items()},
            "data_commands": args.data_command, "evaluation_command": args.eval_command,
            "test_metrics": {k: m.get(k) for k in keep if k in m}, "notes": args.note,
            "intended_use": "Demonstration model trained on the project's synthetic phantom. "
                            "Not validated on patient data; not for clinical use."}
    (model_dir / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")

    names = ["none", "A", "B", "C"]
    lines = [f"# Model card: {model_dir.name}", "",
             "Danis-Weber classification (No fracture / Weber A / B / C) of the registered "
             "tibiofibular syndesmosis crop (CT, tibia mask, fibula mask; template frame, "
             "1.5 mm), with Grad-CAM and a test-time-augmentation uncertainty.", "",
             "**Demonstration model, trained on synthetic phantoms only. Not validated on patient "
             "data; not for clinical use.** Retrain on your own data with `ankle-fracture "
             "train-cls`.", "", "## Weights", "",
             f"- file: `model.pt` ({os.path.getsize(weights) / 1e6:.1f} MB, float16 state dict)",
             f"- sha256: `{digest}`", "", "## Model", "",
             f"- network: {plans['network']}",
             f"- crop: {plans['crop']}, channels {plans['channels']}, downsample "
             f"{plans['downsample']}, temperature {plans['temperature']}, TTA copies "
             f"{plans['tta']}", "", "## Training", ""]
    for c in args.data_command:
        lines.append(f"- data: `{c}`")
    if "command" in training:
        lines.append("- command: `" + " ".join(str(c) for c in training["command"]) + "`")
    cfg = training.get("config", {})
    lines.append(f"- method `{cfg.get('method')}`, seed `{cfg.get('seed')}`, steps "
                 f"{training.get('steps_done')}, batch {cfg.get('batch_size')}, lr {cfg.get('lr')}")
    for key in ("status", "minutes", "device", "versions", "validation"):
        if key in training:
            lines.append(f"- {key}: `{training[key]}`")
    cases = training.get("cases", {})
    lines.append(f"- cases: {len(cases.get('labelled_train', []))} labelled training, "
                 f"{len(cases.get('validation', []))} validation (temperature), "
                 f"{cases.get('unlabelled', 0)} unlabelled")
    lines += ["", "## Test evaluation", ""]
    if args.eval_command:
        lines += [f"Command: `{args.eval_command}`", ""]
    lines += [f"{m.get('n')} cases (a dataset seed never used in training), 4-class accuracy "
              f"**{_pct(m.get('accuracy'))} %**, macro AUROC {_f3(m.get('macro', {}).get('auroc'))},"
              f" ECE {_f3(m.get('ece'))}, Brier {_f3(m.get('brier'))}.", "",
              "| class | sensitivity % | specificity % | precision % | AUROC | n |",
              "|---|---|---|---|---|---|"]
    for name in names:
        c = m.get("per_class", {}).get(name, {})
        lines.append(f"| {name} | {_pct(c.get('sensitivity'))} | {_pct(c.get('specificity'))} | "
                     f"{_pct(c.get('precision'))} | {_f3(c.get('auroc'))} | {c.get('support')} |")
    mac = m.get("macro", {})
    lines.append(f"| macro | {_pct(mac.get('sensitivity'))} | {_pct(mac.get('specificity'))} | "
                 f"{_pct(mac.get('precision'))} | {_f3(mac.get('auroc'))} | |")
    cm = m.get("confusion_matrix")
    if cm:
        lines += ["", "Confusion matrix (rows true, columns predicted):", "",
                  "| true \\ predicted | " + " | ".join(names) + " |", "|---|---|---|---|---|"]
        for name, row in zip(names, cm):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", "Targets (issue 5): accuracy >= 90 %, every per-class AUROC >= 0.95. "
              "Radiograph state of the art (methods.md): 89 %, AUC 0.93-0.99 (real data; not "
              "directly comparable to phantoms)."]
    for n in args.note:
        lines += ["", n]
    (model_dir / "model_card.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {model_dir / 'model_card.md'} and model_card.json (sha256 {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
