#!/usr/bin/env python3
"""The cortical ring check (AnkleFractureLib.fracture.cortex_ring) beside the shipped pipeline.

Usage:
    python scripts/ring_study.py DATASET --out FILE.jsonl

Every case runs as ``evaluate-fracture`` runs it (as ``pipeline.evaluate.run_case``: the shipped
segmentation, side detection, checks, registration, classifier and localiser); then the ring
check reads the analysed leg's fibula (label 2 within 60 mm of the tibial long axis through
the registered plafond) on the CT's own grid. Each line of ``--out`` holds the case's truth,
the pipeline's answer and line, and the rings with their height above the plafond (patient
mm along the tibial long axis, as the localiser measures), so that a decision rule can be
fitted and replayed offline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: The analysed leg's fibula lies within this (mm) of the tibial axis through the plafond.
LEG_RADIUS_MM = 60.0


def leg_fibula(label: np.ndarray, ct: Any, plafond_lps: np.ndarray, axis_lps: np.ndarray
               ) -> np.ndarray:
    """bool (z, y, x): fibula voxels within :data:`LEG_RADIUS_MM` of the tibial axis line."""
    idx = np.argwhere(label == 2)
    out = np.zeros(label.shape, bool)
    if not len(idx):
        return out
    pts = ct.index_to_physical(idx[:, ::-1].astype(float)) - plafond_lps
    across = pts - np.outer(pts @ axis_lps, axis_lps)
    keep = np.linalg.norm(across, axis=1) <= LEG_RADIUS_MM
    out[tuple(idx[keep].T)] = True
    return out


def ring_rows(ct: Any, label: np.ndarray, registration: Any, plafond_template: np.ndarray
              ) -> List[Dict[str, Any]]:
    """The rings of the analysed leg's fibula with their heights (patient mm)."""
    from AnkleFractureLib.fracture.cortex_ring import ring_breaks

    from AnkleFractureLib.fracture.localise import patient_axis

    plafond, axis, _ = patient_axis(registration.patient_to_template, plafond_template)
    fib = leg_fibula(label, ct, plafond, axis)
    if fib.sum() < 200:
        return []
    rings = ring_breaks(np.asarray(ct.array), fib, tuple(ct.spacing[::-1]), limit=8)
    rows = []
    for r in rings:
        lps = ct.index_to_physical(np.asarray(r.centre_index[::-1], float))[0]
        rows.append({"height_mm": round(float((lps - plafond) @ axis), 2),
                     "score": round(r.score, 4), "coverage": round(r.coverage, 3),
                     "rise_mm": r.rise_mm, "centre_lps": [round(float(v), 2) for v in lps]})
    return rows


def run_like_evaluate(pipe: Any, ct: Any, record: Any) -> Any:
    """The :class:`PipelineResult` of ``pipeline.evaluate.run_case``'s run: a scan refused only
    because both legs are in view is run again with the dataset's side."""
    from AnkleFractureLib.pipeline.pipeline import Pipeline, PipelineOptions

    res = pipe.run(ct)
    codes = {f.code for f in res.refusals}
    if codes == {"both_legs"} and record.side in ("left", "right"):
        again = Pipeline(PipelineOptions(**{**pipe.options.__dict__, "side": record.side}))
        again._seg_model, again._classifier = pipe._seg_model, pipe._classifier
        again._localiser, again._template = pipe._localiser, pipe._template
        res = again.run(ct)
    return res


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from AnkleFractureLib.dataset import Dataset
    from AnkleFractureLib.io.files import read_image
    from AnkleFractureLib.pipeline.pipeline import Pipeline

    ds = Dataset.load(args.dataset)
    pipe = Pipeline()
    done = set()
    out = Path(args.out)
    if out.is_file():
        done = {json.loads(line)["id"] for line in out.read_text().splitlines() if line}
    with out.open("a") as fh:
        for case in ds.cases:
            if case.id in done:
                continue
            t0 = time.perf_counter()
            ct = read_image(ds.path(case.image))
            res = run_like_evaluate(pipe, ct, case)
            result = res.to_json()
            rings: List[Dict[str, Any]] = []
            if res.registration is not None and res.label is not None:
                rings = ring_rows(ct, np.asarray(res.label.array), res.registration,
                                  pipe.template.plafond)
            fracture = (case.meta or {}).get("fracture") or {}
            f = result.get("fracture") or {}
            row = {"id": case.id, "weber": case.weber, "true_height_mm": fracture.get("height_mm"),
                   "refused": result.get("refused"), "prediction": result.get("prediction"),
                   "probabilities": result.get("probabilities"),
                   "classifier_probabilities": result.get("classifier_probabilities"),
                   "found": f.get("found"), "height_mm": f.get("height_mm"),
                   "size_factor": f.get("size_factor"), "rings": rings,
                   "candidates": f.get("candidates", []),
                   "seconds": round(time.perf_counter() - t0, 1)}
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            print(case.id, case.weber, row["prediction"], fracture.get("height_mm"),
                  [(r["height_mm"], r["score"], r["coverage"]) for r in rings[:3]], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
