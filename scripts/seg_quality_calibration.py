#!/usr/bin/env python
"""How often the label-free segmentation check cries wolf, and how often it catches a bad map.

Usage:
    .venv/bin/python scripts/seg_quality_calibration.py DATASET [DATASET ...] --out FILE.json \
        [--limit N] [--label NOTE]
    .venv/bin/python scripts/seg_quality_calibration.py --table FILE.json [FILE.json ...]

For every case of each labelled dataset (``ankle-fracture phantom`` layout: dataset.json,
images/, labels/): the label-free agreement
(:func:`AnkleFractureLib.segmentation.quality.label_free_agreement`) of the correct label map,
which must not be "low" (a false alarm: the pipeline would flag a good segmentation unsure), and
of each corruption in :mod:`AnkleFractureLib.evaluation.label_corruptions`, which must be "low"
(a miss). Cases are grouped by family (the case id's prefix: ``phantom`` = analytic anatomy,
``vh`` = real bone shapes). The JSON keeps every measure of every case; ``--table`` prints a
Markdown table of several such files (``docs/seg_quality/run.sh`` builds its page with it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from AnkleFractureLib.evaluation.label_corruptions import KINDS, corrupt_labels
from AnkleFractureLib.io.atomic import atomic_write_json
from AnkleFractureLib.io.files import read_image
from AnkleFractureLib.segmentation.quality import label_free_agreement

KEYS = ("level", "dice_tibia_mean", "dice_tibia_distal", "dice_fibula_mean",
        "dice_fibula_distal", "poor_slice_fraction", "label_off_bone", "label_on_other_bone",
        "slices", "problems")


def _brief(q: Dict[str, Any]) -> Dict[str, Any]:
    return {k: q.get(k) for k in KEYS}


def measure_case(root: Path, entry: Dict[str, Any]) -> Dict[str, Any]:
    """The check on one case's correct labels and on each corruption."""
    ct = read_image(root / entry["image"])
    label = read_image(root / entry["segmentation"])
    row: Dict[str, Any] = {"id": entry["id"], "family": entry["id"].split("_")[0],
                           "true": _brief(label_free_agreement(ct, label))}
    for kind in KINDS:
        row[kind] = _brief(label_free_agreement(ct, corrupt_labels(ct, label, kind)))
    return row


def summarise(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per family: false-alarm rate on correct labels and detection rate per corruption."""
    out: Dict[str, Any] = {}
    for fam in sorted({r["family"] for r in rows}) + ["all"]:
        sub = [r for r in rows if fam in ("all", r["family"])]
        true_levels = [r["true"]["level"] for r in sub]
        out[fam] = {
            "cases": len(sub),
            "false_alarm": round(float(np.mean([lv == "low" for lv in true_levels])), 4),
            "not_assessable": round(float(np.mean([lv == "not_assessable"
                                                   for lv in true_levels])), 4),
            "detected": {k: round(float(np.mean([r[k]["level"] == "low" for r in sub])), 4)
                         for k in KINDS},
        }
    return out


def page(files: List[str]) -> str:
    """A Markdown table of the summaries of calibration JSON files (one row per file and
    family), with each file's command."""
    lines = ["| file | family | cases | false alarm on correct labels | not assessable | "
             + " | ".join(f"{k} caught" for k in KINDS) + " |",
             "|---|---|---|---|---|" + "---|" * len(KINDS)]
    commands = []
    for f in files:
        result = json.loads(Path(f).read_text())
        commands.append(f"- `{Path(f).name}`: `{result['command']}`")
        for fam, s in result["summary"].items():
            lines.append(f"| {Path(f).stem} | {fam} | {s['cases']} | "
                         f"{100 * s['false_alarm']:.1f} % | {100 * s['not_assessable']:.1f} % | "
                         + " | ".join(f"{100 * s['detected'][k]:.1f} %" for k in KINDS) + " |")
    return "\n".join(lines + ["", "Commands:", ""] + commands) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("datasets", nargs="*")
    ap.add_argument("--out", help="the calibration JSON to write")
    ap.add_argument("--limit", type=int, default=None, help="at most N cases per dataset")
    ap.add_argument("--table", nargs="+", metavar="JSON", default=None,
                    help="print a Markdown table of these calibration files instead")
    ap.add_argument("--label", default="",
                    help="a note appended to the command recorded in the JSON")
    args = ap.parse_args()
    if args.table:
        print(page(args.table), end="")
        return
    if not args.datasets or not args.out:
        ap.error("DATASET ... and --out are needed (or --table JSON ...)")
    t0 = time.time()
    rows = []
    for ds in args.datasets:
        root = Path(ds)
        cases = json.loads((root / "dataset.json").read_text())["cases"][:args.limit]
        for entry in cases:
            rows.append(measure_case(root, entry))
            r = rows[-1]
            print(r["id"], r["true"]["level"], r["true"]["dice_tibia_distal"],
                  r["true"]["dice_fibula_distal"], [r[k]["level"] for k in KINDS], flush=True)
    command = ("python scripts/seg_quality_calibration.py " + " ".join(args.datasets)
               + f" --out {Path(args.out).name}" + (f"   # {args.label}" if args.label else ""))
    result = {"command": command, "datasets": args.datasets, "summary": summarise(rows),
              "seconds": round(time.time() - t0, 1), "cases": rows}
    atomic_write_json(args.out, result)
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
