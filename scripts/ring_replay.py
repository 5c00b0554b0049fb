#!/usr/bin/env python3
"""Replay the shipped line rule with and without the cortical ring check, case by case.

Usage:
    python scripts/ring_replay.py STUDY.jsonl [...] [--min-height 20] [--min-score 0.15]
        [--min-coverage 0.75] [--probability 0.9] [--plans Resources/Models/fracture/plans.json]

The input lines are ``scripts/ring_study.py``'s (the pipeline's candidate lines, classifier
probabilities and the rings of each case). The ring check is added exactly as
``AnkleFractureLib.fracture.ring_check`` adds it (only when no network line reaches the line
rule's ``min_line_probability``), and both answers come from
``weber_height.combine_lines``. Prints every case whose answer changes or whose line is a
ring, and the totals; ``--precision`` also prints how many qualifying rings lie within 5 mm
of the true fracture.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def qualifying(row: Dict[str, Any], rule: Dict[str, float]) -> List[Dict[str, Any]]:
    """The row's rings that the rule turns into candidate lines."""
    sf = row.get("size_factor") or 1.0
    return [g for g in row["rings"] if g["height_mm"] >= rule["min_height_mm"] * sf
            and g["score"] >= rule["min_score"] and g["coverage"] >= rule["min_coverage"]]


def answer(row: Dict[str, Any], decision: Dict[str, Any], rule: Optional[Dict[str, float]]
           ) -> Tuple[Optional[str], Optional[float]]:
    """(the combined class, the reported ring's height or None); (None, None) if refused."""
    from AnkleFractureLib.fracture.ring_check import needed
    from AnkleFractureLib.fracture.weber_height import combine_lines

    if row["refused"] or row["classifier_probabilities"] is None:
        return None, None
    candidates = [dict(c) for c in row["candidates"]]
    if rule is not None and needed(candidates, decision):
        candidates += [{"voxels": 0, "mass": 0.0, "probability": g["score"],
                        "height_mm": g["height_mm"], "found": False, "cortex_ring": 1,
                        "line_probability": rule["probability"]} for g in qualifying(row, rule)]
    opinion, line = combine_lines(row["classifier_probabilities"], candidates, decision,
                                  row.get("size_factor") or 1.0)
    ring_h = line["height_mm"] if line is not None and line.get("cortex_ring") else None
    return opinion.prediction, ring_h


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", nargs="+")
    ap.add_argument("--plans", default="Resources/Models/fracture/plans.json")
    ap.add_argument("--min-height", type=float, default=20.0)
    ap.add_argument("--min-score", type=float, default=0.15)
    ap.add_argument("--min-coverage", type=float, default=0.75)
    ap.add_argument("--probability", type=float, default=0.9)
    ap.add_argument("--precision", action="store_true")
    args = ap.parse_args(argv)
    decision = json.load(open(args.plans))["decision"]
    rule = {"min_height_mm": args.min_height, "min_score": args.min_score,
            "min_coverage": args.min_coverage, "probability": args.probability}
    rows: Dict[str, Dict[str, Any]] = {}
    for path in args.study:
        for line in open(path):
            if line.strip():
                row = json.loads(line)
                rows[row["id"]] = row
    right = [0, 0]
    false_fracture = [0, 0]
    for row in rows.values():
        before, _ = answer(row, decision, None)
        after, ring_h = answer(row, decision, rule)
        for k, pred in enumerate((before, after)):
            right[k] += pred == row["weber"]
            false_fracture[k] += row["weber"] == "none" and pred not in (None, "none")
        if before != after or ring_h is not None:
            print(f"{row['id']} {row['weber']}: shipped {before} -> with the ring {after}; "
                  f"ring line {ring_h} mm, true {row['true_height_mm']}")
    print(f"{len(rows)} cases: right {right[0]} -> {right[1]}; intact ankles answered as a "
          f"fracture {false_fracture[0]} -> {false_fracture[1]}")
    if args.precision:
        near = far = 0
        for row in rows.values():
            for g in qualifying(row, rule):
                th = row["true_height_mm"]
                if th is not None and abs(g["height_mm"] - th) <= 5.0:
                    near += 1
                else:
                    far += 1
        print(f"qualifying rings: {near} within 5 mm of the true fracture, {far} elsewhere")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
