#!/usr/bin/env python3
"""Write the classifier's MODEL_DIR/model_card.md and model_card.json from the artefacts beside it.

Usage:
    python scripts/write_cls_model_card.py MODEL_DIR [--notes NOTES_JSON] [--out-dir DIR]

Every figure in the card comes from a JSON artefact committed in MODEL_DIR: ``training.json``
(settings, cases, minutes, versions), ``plans.json``, the evaluation files listed in
``model_card.notes.json`` (``evaluate-cls`` output: accuracy, per-class metrics, confusion
matrix, calibration, unsure cases, errors) and the sha256 of ``model.pt``. The notes JSON holds
the text only (data commands, descriptions, re-measure commands, targets and literature values
as data); a figure inside a note is a placeholder ``{FILE:key.path:format}`` (``FILE@COMMIT``
reads the file as committed then), formats ``pct`` (x 100, 1 decimal), ``f1``, ``f3``, ``int``,
``len``, ``str``.

An evaluation file made before automatic side detection in evaluation (no ``crop_key`` in it)
is marked as such in the card, with the command that re-measures it; so is a training.json
whose crops predate crop versioning.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from AnkleFractureLib.segmentation.model_io import sha256_file  # noqa: E402

NAMES = ["none", "A", "B", "C"]
NOTES_FILE = "model_card.notes.json"
#: ``{FILE[@COMMIT]:key.path:format}`` inside a note.
PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_.\-]+\.json)(?:@([0-9a-f]{7,40}))?:([A-Za-z0-9_.\-]+)"
                         r":(pct|f1|f3|int|len|str)\}")
FORMATS: Dict[str, Callable[[Any], str]] = {
    "pct": lambda v: f"{100 * v:.1f}", "f1": lambda v: f"{v:.1f}", "f3": lambda v: f"{v:.3f}",
    "int": lambda v: str(int(v)), "len": lambda v: str(len(v)), "str": str}


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _f3(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.3f}"


class Artefacts:
    """The JSON files of a model folder (and of its committed history), read once."""

    def __init__(self, model_dir: Path, repo: Path, repo_path: str) -> None:
        self.model_dir, self.repo, self.repo_path = model_dir, repo, repo_path
        self._cache: Dict[str, Any] = {}

    def get(self, name: str, commit: Optional[str] = None) -> Any:
        """The parsed JSON file ``name`` (from git at ``commit`` when given)."""
        key = f"{name}@{commit}"
        if key not in self._cache:
            if commit is None:
                text = (self.model_dir / name).read_text()
            else:
                text = subprocess.run(["git", "-C", str(self.repo), "show",
                                       f"{commit}:{self.repo_path}/{name}"], check=True,
                                      capture_output=True, text=True).stdout
            self._cache[key] = json.loads(text)
        return self._cache[key]


def lookup(data: Any, path: str) -> Any:
    """``data`` at a dotted key path (integers index lists)."""
    for part in path.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def render(text: str, art: Artefacts) -> str:
    """``text`` with every placeholder replaced by its value from the artefacts."""
    def one(m: "re.Match[str]") -> str:
        return FORMATS[m.group(4)](lookup(art.get(m.group(1), m.group(2)), m.group(3)))

    return PLACEHOLDER.sub(one, text)


def provenance(m: Dict[str, Any], spec: Dict[str, Any]) -> List[str]:
    """What the evaluation file says about how its crops were made, and whether it must be
    re-measured (read from the file itself)."""
    key = m.get("crop_key")
    if not key:
        return ["**Predates automatic side detection in evaluation and the current "
                "registration:** this file has no `crop_key`, so its crops were cut with the "
                "dataset's side and the registration of that time. Re-measure with:", "",
                f"    {spec['remeasure']}", ""]
    side = m.get("side") or {}
    return [f"Crops: side detected as `run` does (policy `{key.get('side_policy')}`; wrong on "
            f"{side.get('n_wrong')} of {side.get('n_checked')} cases with a dataset side, "
            f"{side.get('n_not_cropped')} not cropped), crop code version "
            f"{key.get('crop_code_version')}, template sha256 `{key.get('template_sha256')}`, "
            f"segmentation model sha256 `{key.get('seg_model_sha256')}`. Re-measure with "
            f"`{spec['remeasure']}`.", ""]


def _errors(m: Dict[str, Any]) -> List[str]:
    """One line per misclassified case (true -> predicted, unsure flag)."""
    wrong = [c for c in m.get("per_case", []) if c.get("true") != c.get("predicted")]
    if not wrong:
        return ["No case misclassified."]
    out = []
    for c in wrong:
        p = c.get("probabilities", {}).get(c.get("predicted"))
        flag = {True: "flagged unsure", False: "not flagged unsure"}.get(c.get("unsure"), "")
        out.append(f"- `{c['id']}`: {c['true']} called {c['predicted']} ({_pct(p)} %)"
                   + (f", {flag}" if flag else ""))
    return out


def metrics_section(m: Dict[str, Any], spec: Dict[str, Any]) -> List[str]:
    """The markdown of one evaluation file: headline, per-class table, confusion, errors."""
    mac = m.get("macro", {})
    lines = [f"### {spec['title']} (`{spec['file']}`)", "", spec["description"], "",
             f"Dataset `{m.get('dataset')}`, model `{m.get('model')}`, {m.get('tta')} TTA copies."
             f" {m.get('n')} cases, 4-class accuracy **{_pct(m.get('accuracy'))} %**, macro "
             f"AUROC {_f3(mac.get('auroc'))}, ECE {_f3(m.get('ece'))}, Brier "
             f"{_f3(m.get('brier'))}.", ""]
    lines += provenance(m, spec)
    lines += ["| class | sensitivity % | specificity % | precision % | AUROC | n |",
              "|---|---|---|---|---|---|"]
    for name in NAMES:
        c = m.get("per_class", {}).get(name, {})
        lines.append(f"| {name} | {_pct(c.get('sensitivity'))} | {_pct(c.get('specificity'))} | "
                     f"{_pct(c.get('precision'))} | {_f3(c.get('auroc'))} | {c.get('support')} |")
    lines.append(f"| macro | {_pct(mac.get('sensitivity'))} | {_pct(mac.get('specificity'))} | "
                 f"{_pct(mac.get('precision'))} | {_f3(mac.get('auroc'))} | |")
    lines += ["", "Confusion matrix (rows true, columns predicted):", "",
              "| true \\ predicted | " + " | ".join(NAMES) + " |", "|---|---|---|---|---|"]
    for name, row in zip(NAMES, m.get("confusion_matrix") or []):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    u = m.get("unsure")
    if u:
        lines += ["", f"Unsure (TTA): {u['n_unsure']} of {m.get('n')} cases flagged; accuracy "
                      f"{_pct(u['accuracy_confident'])} % on the confident, "
                      f"{_pct(u['accuracy_unsure'])} % on the unsure ones."]
    return lines + ["", "Errors:", ""] + _errors(m) + [""]


def targets_line(m: Dict[str, Any], notes: Dict[str, Any]) -> str:
    """The targets and literature values (notes data) against the main evaluation."""
    t, lit = notes["targets"], notes["literature"]
    aucs = [c.get("auroc") for c in m.get("per_class", {}).values()]
    acc_ok = (m.get("accuracy") or 0) >= t["accuracy"]
    auc_ok = bool(aucs) and all(a is not None and a >= t["per_class_auroc"] for a in aucs)
    return (f"Targets ({t['source']}): accuracy >= {_pct(t['accuracy'])} % "
            f"({'met' if acc_ok else 'not met'}), every per-class AUROC >= "
            f"{t['per_class_auroc']:.2f} ({'met' if auc_ok else 'not met'}), on "
            f"`{notes['evaluations'][0]['file']}`. Literature ({lit['source']}): accuracy "
            f"{_pct(lit['accuracy'])} %, AUC {lit['auroc_min']:.2f}-{lit['auroc_max']:.2f}.")


def training_section(training: Dict[str, Any], plans: Dict[str, Any], notes: Dict[str, Any],
                     art: Artefacts) -> List[str]:
    """The markdown of the training: data, command, settings, cases, crop provenance."""
    cfg = training.get("config", {})
    cases = training.get("cases", {})
    lines = ["## Training", ""]
    lines += [f"- data: `{c}`" for c in notes.get("data_commands", [])]
    if "command" in training:
        lines.append("- command: `" + " ".join(str(c) for c in training["command"]) + "`")
    lines.append(f"- method `{cfg.get('method')}`, seed `{cfg.get('seed')}`, steps "
                 f"{training.get('steps_done')} ({cfg.get('optimizer')}), batch "
                 f"{cfg.get('batch_size')}, lr {cfg.get('lr')}")
    for key in ("status", "minutes", "device", "versions", "validation"):
        if key in training:
            lines.append(f"- {key}: `{training[key]}`")
    lines.append(f"- cases: {len(cases.get('labelled_train', []))} labelled training, "
                 f"{len(cases.get('validation', []))} validation (temperature), "
                 f"{cases.get('unlabelled', 0)} unlabelled")
    crops = training.get("crops")
    if crops:
        lines.append(f"- crops: side policy `{crops.get('side_policy')}`, crop code version "
                     f"{crops.get('crop_code_version')}, template sha256 "
                     f"`{crops.get('template_sha256')}`")
    else:
        lines.append("- crops: training.json has no `crops` record, so the training crops "
                     "predate crop versioning (registration of that time; the dataset's side, "
                     "which training may use). Retraining with the command above on the "
                     "current code records it.")
    if notes.get("training_note"):
        lines += ["", render(notes["training_note"], art)]
    return lines + [""]


def card_json(model_dir: Path, digest: str, training: Dict[str, Any], plans: Dict[str, Any],
              notes: Dict[str, Any], art: Artefacts) -> Dict[str, Any]:
    """model_card.json: the same facts as the markdown, machine-readable."""
    keep = ("n", "accuracy", "macro", "per_class", "confusion_matrix", "ece", "brier",
            "log_loss", "unsure", "tta", "dataset", "side", "crop_key", "masks")
    evals = [{"file": e["file"], "title": e["title"], "remeasure": e["remeasure"],
              "predates_side_detection": "crop_key" not in art.get(e["file"]),
              "metrics": {k: art.get(e["file"]).get(k) for k in keep
                          if k in art.get(e["file"])}} for e in notes["evaluations"]]
    weights = model_dir / "model.pt"
    return {"name": model_dir.name,
            "task": "Danis-Weber classification (none, A, B, C) of the registered syndesmosis "
                    "crop",
            "weights": {"file": "model.pt", "sha256": digest,
                        "bytes": os.path.getsize(weights)},
            "plans": plans,
            "training": {k: v for k, v in training.items() if k != "cases"},
            "training_cases": {k: (len(v) if isinstance(v, list) else v)
                               for k, v in training.get("cases", {}).items()},
            "data_commands": notes.get("data_commands", []),
            "test_metrics": evals[0]["metrics"], "evaluations": evals,
            "targets": notes["targets"], "literature": notes["literature"],
            "notes": [render(n, art) for n in notes.get("notes", [])],
            "intended_use": notes["intended_use"],
            "generated_by": "scripts/write_cls_model_card.py from " + ", ".join(
                ["training.json", "plans.json", NOTES_FILE]
                + [e["file"] for e in notes["evaluations"]])}


def card_markdown(model_dir: Path, digest: str, training: Dict[str, Any],
                  plans: Dict[str, Any], notes: Dict[str, Any], art: Artefacts) -> str:
    """model_card.md."""
    weights = model_dir / "model.pt"
    lines = [f"# Model card: {model_dir.name}", "",
             "<!-- Generated by scripts/write_cls_model_card.py from the JSON files beside it "
             f"({NOTES_FILE}, training.json, plans.json, the metrics files); do not edit. -->",
             "", notes["title"], "",
             f"**{notes['intended_use']}** Retrain on your own data with `ankle-fracture "
             "train-cls`.", "", "## Weights", "",
             f"- file: `model.pt` ({os.path.getsize(weights) / 1e6:.1f} MB, float16 state dict)",
             f"- sha256: `{digest}`", "", "## Model", "",
             f"- network: {plans['network']}",
             f"- crop: {plans['crop']}, channels {plans['channels']}, downsample "
             f"{plans['downsample']}, temperature {plans['temperature']}, TTA copies "
             f"{plans['tta']}", ""]
    lines += training_section(training, plans, notes, art)
    lines += ["## Test evaluation", ""]
    for spec in notes["evaluations"]:
        lines += metrics_section(art.get(spec["file"]), spec)
    lines.append(targets_line(art.get(notes["evaluations"][0]["file"]), notes))
    for n in notes.get("notes", []):
        lines += ["", render(n, art)]
    return "\n".join(lines) + "\n"


def write_card(model_dir: Path, notes_file: Optional[Path] = None,
               out_dir: Optional[Path] = None, repo: Path = ROOT) -> Path:
    """Write model_card.md and model_card.json of ``model_dir`` into ``out_dir`` (default the
    model folder); returns the markdown's path."""
    notes_file = notes_file or model_dir / NOTES_FILE
    notes = json.loads(notes_file.read_text())
    art = Artefacts(model_dir, repo, notes.get("repo_path", ""))
    training, plans = art.get("training.json"), art.get("plans.json")
    digest = sha256_file(model_dir / "model.pt")
    out_dir = out_dir or model_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    card = card_json(model_dir, digest, training, plans, notes, art)
    (out_dir / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    md = out_dir / "model_card.md"
    md.write_text(card_markdown(model_dir, digest, training, plans, notes, art))
    return md


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--notes", help=f"notes JSON (default MODEL_DIR/{NOTES_FILE})")
    ap.add_argument("--out-dir", help="where to write the card (default MODEL_DIR)")
    args = ap.parse_args(argv)
    md = write_card(Path(args.model_dir), Path(args.notes) if args.notes else None,
                    Path(args.out_dir) if args.out_dir else None)
    print(f"wrote {md} and model_card.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
