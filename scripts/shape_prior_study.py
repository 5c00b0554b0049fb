#!/usr/bin/env python3
"""Score the registered template's shape prior on phantom datasets, network run once.

Usage:
    python scripts/shape_prior_study.py DATASET --cache DIR --out FILE
    python scripts/shape_prior_study.py --page DIR

Per case, the network's raw labels (cached in ``DIR/<case id>.npz``, the cache of
``scripts/seg_postprocess_study.py``) are cleaned by the post-processing rules of the code
that runs, and the pipeline then runs on them exactly as after its own segmentation
(registration, checks, the shape prior of
:mod:`AnkleFractureLib.registration.shape_prior`), with the dataset's side (as a user answers a
both-legs refusal). Each bone is scored against the phantom's labels before and after the
prior: Dice, ``far_ml`` (labelled more than 10 mm from the true bone) and ``lost_true_ml``
(true bone the prior took out).

``--page DIR`` writes ``DIR/README.md`` from ``DIR/criterion.json``, the study files
``DIR/seg_*.json`` and the whole-pipeline evaluations ``DIR/pipeline/heldout_*.json`` against
``DIR/baseline/heldout_*.json`` (the code before the prior), then, with
``DIR/refit_criterion.json``, ``DIR/pipeline_refit/heldout_*.json`` (the prior followed by a
second registration) against ``DIR/pipeline/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from seg_postprocess_study import bone_row, raw_labels  # noqa: E402

BONES = ("tibia", "fibula")


def _pipelines() -> Dict[str, Any]:
    """A pipeline per side whose segmentation step is handed the labels (no network)."""
    from AnkleFractureLib.pipeline.pipeline import Pipeline, PipelineOptions

    pipes = {side: Pipeline(PipelineOptions(localise=False, side=side))
             for side in ("left", "right")}
    return pipes


def score_case(model: Any, pipes: Dict[str, Any], ds: Any, case: Any,
               cache_dir: Path) -> Dict[str, Any]:
    """One row: both bones before and after the prior."""
    from AnkleFractureLib.io.files import read_image
    from AnkleFractureLib.segmentation.postprocess import clean_labels

    ct = read_image(ds.path(case.image))
    truth = np.asarray(read_image(ds.path(case.segmentation)).array)
    raw = raw_labels(model, ct, cache_dir / f"{case.id}.npz")
    sl = tuple(slice(a, b) for a, b in raw["roi"])
    cleaned, _ = clean_labels(raw["labels"], ct.spacing, ct_hu=np.asarray(ct.array)[sl],
                              superior_zyx=ct.superior_zyx())
    before = np.zeros(truth.shape, np.uint8)
    before[sl] = cleaned
    pipe = pipes[case.side or "right"]
    label = ct.with_array(before, meta={"source": case.id})
    pipe.segment = lambda *_a, **_k: label  # the run's own segmentation step, cached
    res = pipe.run(ct, stop_after="crop")
    after = np.asarray(res.label.array)
    sampling = tuple(float(s) for s in ct.spacing[::-1])
    voxel_ml = float(np.prod(ct.spacing)) / 1000.0
    row: Dict[str, Any] = {"id": case.id, "weber": case.weber, "side": case.side,
                           "both_legs": (case.meta or {}).get("both_legs"),
                           "refused": res.refusal,
                           "prior": [f.details for f in res.findings
                                     if f.code == "segmentation_shape_prior"]}
    for value, bone in enumerate(BONES, start=1):
        lost = float(((before == value) & (after != value) & (truth == value)).sum()) * voxel_ml
        row[bone] = {"before": bone_row(before, truth, value, sampling, voxel_ml),
                     "after": bone_row(after, truth, value, sampling, voxel_ml),
                     "lost_true_ml": round(lost, 3)}
    return row


def summary(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {"n": len(rows), "refused": sum(bool(r["refused"]) for r in rows),
                           "changed": sum(bool(r["prior"]) for r in rows)}
    for bone in BONES:
        d = {k: [r[bone][k]["dice"] for r in rows if r[bone][k]["dice"] is not None]
             for k in ("before", "after")}
        fall = [r[bone]["before"]["dice"] - r[bone]["after"]["dice"] for r in rows
                if r[bone]["before"]["dice"] is not None and r[bone]["after"]["dice"] is not None]
        out[bone] = {
            "dice_before": round(float(np.mean(d["before"])), 4) if d["before"] else None,
            "dice_after": round(float(np.mean(d["after"])), 4) if d["after"] else None,
            "largest_dice_fall": round(float(max(fall, default=0.0)), 4),
            "far_ml_before": round(sum(r[bone]["before"]["far_ml"] for r in rows), 2),
            "far_ml_after": round(sum(r[bone]["after"]["far_ml"] for r in rows), 2),
            "lost_true_ml": round(sum(r[bone]["lost_true_ml"] for r in rows), 3),
            "largest_case_lost_ml": round(max((r[bone]["lost_true_ml"] for r in rows),
                                              default=0.0), 3)}
    return out


def run_study(dataset: str, cache: str, out: str) -> Dict[str, Any]:
    from AnkleFractureLib.dataset import Dataset
    from AnkleFractureLib.segmentation.inference import SegmentationModel

    ds = Dataset.load(dataset)
    cache_dir = Path(cache)
    cache_dir.mkdir(parents=True, exist_ok=True)
    model = None
    if any(not (cache_dir / f"{c.id}.npz").is_file() for c in ds.cases):
        model = SegmentationModel.load(None, "cpu")
    pipes = _pipelines()
    for pipe in pipes.values():
        pipe._seg_model = model or type("Cached", (), {"model_dir": None})()
    rows = [score_case(model, pipes, ds, case, cache_dir) for case in ds.cases]
    data = {"dataset": str(dataset), "summary": summary(rows), "cases": rows}
    Path(out).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return data


# ---------------------------------------------------------------------- the page
def _seg_table(folder: Path) -> List[str]:
    lines = ["| set | cases | refused | changed | Dice tibia | Dice fibula | far tibia (ml) "
             "| far fibula (ml) | true bone lost (ml; largest case) | largest Dice fall |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for f in sorted(folder.glob("seg_*.json")):
        s = json.loads(f.read_text())["summary"]
        t, b = s["tibia"], s["fibula"]
        lines.append(
            f"| {f.stem[4:]} | {s['n']} | {s['refused']} | {s['changed']} "
            f"| {t['dice_before']} -> {t['dice_after']} | {b['dice_before']} -> {b['dice_after']} "
            f"| {t['far_ml_before']} -> {t['far_ml_after']} "
            f"| {b['far_ml_before']} -> {b['far_ml_after']} "
            f"| {t['lost_true_ml'] + b['lost_true_ml']:.3f} "
            f"({max(t['largest_case_lost_ml'], b['largest_case_lost_ml']):.3f}) "
            f"| {max(t['largest_dice_fall'], b['largest_dice_fall']):.4f} |")
    return lines


def _pipeline_rates(path: Path) -> Dict[str, Any]:
    d = json.loads(path.read_text())
    cases = d["cases"]
    fractured = [c for c in cases if c["true"] != "none"]
    intact = [c for c in cases if c["true"] == "none"]
    right = sum(c["predicted"] == c["true"] for c in cases)
    plafond = [c["registration"]["plafond_error_mm"] for c in cases
               if (c.get("registration") or {}).get("plafond_error_mm") is not None]
    return {"n": len(cases), "right": right,
            "found": sum(bool(c["found"]) for c in fractured), "fractured": len(fractured),
            "found_intact": sum(bool(c["found"]) for c in intact), "intact": len(intact),
            "refused": sum(bool(c["refused"]) for c in cases),
            "plafond": round(float(np.median(plafond)), 2) if plafond else None}


def _pipeline_table(folder: Path, before_dir: str = "baseline", after_dir: str = "pipeline"
                    ) -> List[str]:
    lines = ["| set | answers right (before -> after) | found on fractured | found on intact "
             "| refused | median plafond error (mm) | cases whose answer changed |",
             "|---|---|---|---|---|---|---|"]
    for f in sorted((folder / after_dir).glob("heldout_*.json")):
        base = folder / before_dir / f.name
        if not base.is_file():
            continue
        a, b = _pipeline_rates(base), _pipeline_rates(f)
        before = {c["id"]: c["predicted"] for c in json.loads(base.read_text())["cases"]}
        changed = [f"{c['id']} ({before.get(c['id'])} -> {c['predicted']}, true {c['true']})"
                   for c in json.loads(f.read_text())["cases"]
                   if before.get(c["id"]) != c["predicted"]]
        lines.append(f"| {f.stem[8:]} | {a['right']}/{a['n']} -> {b['right']}/{b['n']} "
                     f"| {a['found']}/{a['fractured']} -> {b['found']}/{b['fractured']} "
                     f"| {a['found_intact']}/{a['intact']} -> {b['found_intact']}/{b['intact']} "
                     f"| {a['refused']} -> {b['refused']} | {a['plafond']} -> {b['plafond']} "
                     f"| {'; '.join(changed) or 'none'} |")
    return lines


def _refit_section(folder: Path) -> List[str]:
    """The second registration's criterion and table (``refit_criterion.json``,
    ``pipeline_refit/`` against ``pipeline/``), when the folder has them."""
    path = folder / "refit_criterion.json"
    if not path.is_file():
        return []
    crit = json.loads(path.read_text())
    out = [f"## Then: {crit['name']}", "", f"**Why.** {crit['why']}", "",
           f"**Change.** {crit['change']}", "",
           f"**Criterion.** {crit['criterion']} ({crit.get('written', '')})", ""]
    if crit.get("verdict"):
        out += [f"**Verdict.** {crit['verdict']}", ""]
    if (folder / "pipeline_refit").is_dir():
        out += ["`pipeline/`: the prior without the second registration; `pipeline_refit/`: "
                "with it (same command).", ""]
        out += _pipeline_table(folder, "pipeline", "pipeline_refit") + [""]
    return out


def page(folder: Path) -> str:
    crit = json.loads((folder / "criterion.json").read_text())
    out = [f"# {crit['name'][0].upper()}{crit['name'][1:]}", "",
           f"Generated by `python scripts/shape_prior_study.py --page {folder}` from the JSON "
           "files in this folder; do not edit by hand.", "",
           f"**Why.** {crit['why']}", "", f"**Change.** {crit['change']}", "",
           f"**Criterion.** {crit['criterion']} ({crit.get('written', '')})", ""]
    if crit.get("verdict"):
        out += [f"**Verdict.** {crit['verdict']}", ""]
    out += ["## Segmentation sets (network labels cached, post-processing rules 0-8, then the "
            "pipeline's registration and the prior)", "",
            "Commands: " + "; ".join(f"`{c}`" for c in crit.get("commands", [])), ""]
    out += _seg_table(folder) + [""]
    out += ["## Whole pipeline on the held-out fracture sets (`evaluate-fracture`, automatic "
            "side)", "", "`baseline/`: docs/fracture/heldout_*.json before the prior; "
            "`pipeline/`: the same command with it.", ""]
    out += _pipeline_table(folder) + [""]
    out += _refit_section(folder)
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?")
    parser.add_argument("--cache", help="folder of the raw network labels")
    parser.add_argument("--out", help="study file to write")
    parser.add_argument("--page", help="write DIR/README.md from the files in it")
    args = parser.parse_args(argv)
    if args.page:
        folder = Path(args.page)
        (folder / "README.md").write_text(page(folder), encoding="utf-8")
        return 0
    if not (args.dataset and args.cache and args.out):
        parser.error("DATASET, --cache and --out are needed (or --page DIR)")
    s = run_study(args.dataset, args.cache, args.out)["summary"]
    print(json.dumps(s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
