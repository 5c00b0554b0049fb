#!/usr/bin/env python
"""Write docs/seg_v2/README.md: segmentation on real bone shapes (v1-v4, rules), from artefacts.

Usage:
    .venv/bin/python scripts/seg_progress_page.py [--dir docs/seg_v2]

Reads every ``heldout_<family>_<model>.json`` (ankle-fracture evaluate-seg output),
``label_free_real_<model>.json`` (scripts/seg_label_free_real.py) and ``training_<model>.json``
in the folder, and ``commands.json`` (the command behind each file), and writes a table per
held-out set. Nothing is typed by hand: rerun the commands, then this script.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("Targets (issue 13): real-shape (vh) phantoms Dice >= 0.95 tibia / 0.92 fibula; the "
           "analytic family with no regression: Dice >= 0.97 / 0.95, HD95 <= 2 mm.")


NOT_SHIPPED = ("Rows marked `v4-not-shipped` are a fine-tuning of v3 with 40 more real-shape "
               "cases whose forefoot (cuneiforms, metatarsals, phalanges) is in view, to stop "
               "metatarsal shafts being labelled; it did not: on the forefoot held-out set the "
               "same three scans keep a foot bone or the other leg's bones labelled fibula, and "
               "the real foot series keeps about the same labelled volumes. The shipped model "
               "stays v3.")
RULE4 = ("Rows marked `v3-rule4` are the shipped v3 network with post-processing rule 4 "
         "(`AnkleFractureLib/segmentation/postprocess.py`): a large piece isolated from both "
         "bones and lying wholly more than 10 mm beyond the end of the tibia, along its long "
         "axis, is a foot bone and is removed. It clears the metatarsal labelled fibula in two "
         "of the three failing forefoot scans; the third (both legs in view) keeps the other "
         "leg's bone. Analytic and real-shape held-out sets are unchanged, case for case.")


RULE5 = ("Rows marked `v3-rule5` add post-processing rule 5: with the CT given (as the "
         "pipeline does), a large isolated piece in which fewer than 5 % of the voxels reach "
         "1000 HU has no cortex and is removed (a cast or splint whose corners the network "
         "called bone), and such a piece is never taken for a second leg. It answered a "
         "held-out real-shape fracture scan refused before (a splint labelled tibia threw the "
         "registration far off the ankle joint); the three held-out sets below are unchanged, case "
         "for case.")

RULE0 = ("Rows marked `v3-rule0` add post-processing rule 0: with the CT given, metal (2500 HU "
         "and more) and the voxel next to it leave the labels (a plate on the fibula that the "
         "network labelled fibula stayed in a real-shape validation scan's map). On the "
         "real-shape held-out set it raises the fibula's Dice and lowers its HD95 (the scans "
         "with plates and screws); the analytic phantom renders no metal and its cortex stays "
         "below 2500 HU, so that family is unchanged by construction (not measured again).")


def _f(v, nd=3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def _heldout(path: Path) -> list:
    m = json.loads(path.read_text())
    _, family, model = path.stem.split("_", 2)
    rows = [f"| {model} | {family} | {m.get('n_cases')} | "
            + " | ".join(_f((m.get(sub) or {}).get(bone, {}).get(key), 3 if key == "dice" else 2)
                         for sub in ("mean",) for bone in ("tibia", "fibula")
                         for key in ("dice", "hd95_mm"))
            + f" | {_f((m.get('mean_fractured') or {}).get('fibula', {}).get('dice'))} |"]
    return rows

RULE6 = ("Rows marked `v3-rule6` add post-processing rule 6 (`rule6.json`: why, and the "
         "shipping criterion written before these runs): with the CT given, a piece of 1 ml or "
         "more without cortex that lies against air (a cast or splint) leaves the labels before "
         "the legs and the main components are chosen. Before it, a cast piece larger than the "
         "fibula was taken for the main fibula and the true fibula took the tibia's label. On "
         "the new held-out set where every scan wears a cast or splint (`cast`), it mends the "
         "two scans whose fibula was lost that way (and one tibia) and changes no other case; "
         "the analytic, real-shape and forefoot sets are unchanged case for case (one analytic "
         "case's tibia differs by a few voxels, run-to-run arithmetic of the network: the rule "
         "only removes voxels, and that case has none to remove); rows `v3-rule0` of the "
         "forefoot and cast sets are the code just before it. Through the whole pipeline on "
         "the five held-out fracture sets (`rule6_pipeline/`, against "
         "`docs/fracture/experiments/v9_bone_window/shipped`) no answer changes but one: vh2 "
         "vh_9311_0019, refused before, is answered; vh3 vh_9321_0002 is no longer refused for "
         "a failed registration but for too little fibula at the syndesmosis (a plate the "
         "network leaves half unlabelled). The real foot series is unchanged.")


def _rule_page(folder: Path, name: str, marker: str, page: str = "") -> List[str]:
    """The paragraph of a post-processing amendment, from its JSON file's own words (title,
    verdict): nothing typed here. ``page``: the amendment's own results page, when its
    figures are there rather than in this page's rows."""
    path = folder / name
    if not path.is_file():
        return []
    spec = json.loads(path.read_text())
    where = (f"Post-processing `{marker}`, results on its own page `{page}`"
             if page else f"Rows marked `{marker}`")
    return [f"{where}: {spec['title']} (`{name}`: why, the shipping criterion "
            f"written before the runs, and the commands). "
            f"{spec.get('verdict', 'Verdict pending: not all of its runs are done.')}", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=str(ROOT / "docs/seg_v2"))
    args = ap.parse_args()
    folder = Path(args.dir)
    commands = json.loads((folder / "commands.json").read_text())
    lines = ["# Segmentation on real bone shapes: where it stands", "",
             "Generated by `python scripts/seg_progress_page.py` from the JSON files in this "
             "folder. " + TARGETS, "", NOT_SHIPPED, "", RULE4, "", RULE5, "", RULE0, "", RULE6, ""]
    lines += _rule_page(folder, "rule6b.json", "v3-rule6b")
    lines += _rule_page(folder, "rule7.json", "v3-rule7", "rule7/README.md")
    lines += _rule_page(folder, "rule7b8.json", "v3-rule7b8", "rule7b8/README.md")
    lines += _rule_page(folder, "rule9.json", "v3-rule9", "rule9/README.md")
    lines += _rule_page(folder, "rule10.json", "v3-rule10", "rule10/README.md")
    lines += _rule_page(folder, "rule10b.json", "v3-rule10b", "rule10b/README.md")
    lines += ["## Held-out Dice and HD95 (mean over cases)", "",
             "| model | family | cases | Dice tibia | HD95 tibia (mm) | Dice fibula | "
             "HD95 fibula (mm) | Dice fractured fibula |",
             "|---|---|---|---|---|---|---|---|"]
    for path in sorted(folder.glob("heldout_*.json")):
        lines += _heldout(path)
    lines += ["", "## Label-free agreement on the real foot series (no labels exist)", "",
              "| model | level | labelled tibia (ml) | labelled fibula (ml) | label off bone |",
              "|---|---|---|---|---|"]
    for path in sorted(folder.glob("label_free_real_*.json")):
        model = path.stem.split("_", 3)[3]
        for r in json.loads(path.read_text()).values():
            q = r["agreement"]
            lines.append(f"| {model} | {q['level']} | {_f(r['tibia_ml'], 1)} | "
                         f"{_f(r['fibula_ml'], 1)} | {_f(q.get('label_off_bone'))} |")
    lines += ["", "## Training runs", ""]
    for path in sorted(folder.glob("training_*.json")):
        t = json.loads(path.read_text())
        lines.append(f"- {path.stem[9:]}: {t.get('status')}, {t.get('steps_run')} steps, "
                     f"best validation Dice {_f(t.get('best_val_dice'))} (epoch "
                     f"{t.get('best_epoch')}), {_f(t.get('wall_seconds', 0) / 60, 0)} min on "
                     f"{t.get('device')}; command `{' '.join(map(str, t.get('command', [])))}`")
    lines += ["", "## Commands", ""] + [f"- `{k}`: `{v}`" for k, v in sorted(commands.items())]
    (folder / "README.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {folder / 'README.md'}")


if __name__ == "__main__":
    main()
