#!/usr/bin/env python3
"""Gap evidence of candidate lines: gap_hu of the lines at a true fracture, of the other lines
on fractured cases, and of the lines on intact ankles.

Usage:
    python scripts/line_gap_summary.py EVAL.json [EVAL.json ...] --out SUMMARY.json

Reads ``ankle-fracture evaluate-fracture`` outputs whose candidates carry ``gap_hu``
(:func:`AnkleFractureLib.fracture.line_density.gap_contrast`, HU); a line counts as at the
fracture when its height is within ``--tolerance-mm`` of the true height. Writes the count and
the 10/25/50/75/90th percentiles (HU) of each group.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

GROUPS = ("at the fracture", "elsewhere on fractured", "on intact")


def group_of(row: Dict[str, Any], line: Dict[str, Any], tolerance_mm: float) -> str:
    """Which of :data:`GROUPS` a candidate line of one evaluation row falls in."""
    if row["true"] == "none":
        return GROUPS[2]
    h = row.get("height_true_mm")
    near = h is not None and abs(float(line["height_mm"]) - float(h)) <= tolerance_mm
    return GROUPS[0] if near else GROUPS[1]


def summarise(rows: Sequence[Dict[str, Any]], tolerance_mm: float = 10.0) -> Dict[str, Any]:
    """{group: {"n", "percentiles_hu": {10, 25, 50, 75, 90}}} over the measured lines."""
    values: Dict[str, List[float]] = {g: [] for g in GROUPS}
    for r in rows:
        if r.get("refused"):
            continue
        for c in r.get("candidates") or []:
            if c.get("gap_hu") is not None:
                values[group_of(r, c, tolerance_mm)].append(float(c["gap_hu"]))
    out = {}
    for g, v in values.items():
        q = np.percentile(v, [10, 25, 50, 75, 90]).round(1).tolist() if v else []
        out[g] = {"n": len(v), "percentiles_hu": dict(zip(("10", "25", "50", "75", "90"), q))}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("evaluations", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tolerance-mm", type=float, default=10.0)
    args = ap.parse_args(argv)
    rows = [r for p in args.evaluations for r in json.loads(Path(p).read_text())["cases"]]
    result = {"evaluations": list(args.evaluations), "tolerance_mm": args.tolerance_mm,
              "groups": summarise(rows, args.tolerance_mm)}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for g, s in result["groups"].items():
        print(f"{g:<24} n={s['n']:4d} median {s['percentiles_hu'].get('50')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
