#!/usr/bin/env python3
"""Score the segmentation post-processing rules on a phantom dataset, network run once.

Usage:
    python scripts/seg_postprocess_study.py DATASET --cache DIR [--model MODEL_DIR] --out FILE
    python scripts/seg_postprocess_study.py --page DIR

The network's raw labels (before :func:`~AnkleFractureLib.segmentation.postprocess.clean_labels`)
of every case are cached in ``DIR/<case id>.npz`` the first time (the slow part, ~3-60 s a case
on 2 cores); every later run only re-applies the post-processing of the code it runs with, on
exactly the region and CT the inference path gives it, so rules can be compared in seconds.

Per case and bone it writes the Dice against the phantom's labels and two volumes a surgeon
would see as errors: ``far_ml``, labelled voxels more than :data:`FAR_MM` from that bone in
the truth (a foot bone, the other leg's bone or a cast called tibia or fibula), and
``swapped_ml``, voxels of that bone labelled the other bone. ``--out`` gets the rows (with the
SHA-1 of each cleaned label map, so that two runs show which maps changed at all), their means
and the post-processing notes of each case.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: mm from the true bone beyond which a labelled voxel is another structure.
FAR_MM = 10.0


def dice(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    """Dice of two boolean masks (None when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else round(2.0 * float((a & b).sum()) / total, 4)


def raw_labels(model: Any, ct: Any, cache: Path) -> Dict[str, Any]:
    """{"labels": raw roi labels (z, y, x) uint8, "roi": [[start, stop]] * 3}, cached."""
    if cache.is_file():
        with np.load(cache) as f:
            return {"labels": f["labels"], "roi": f["roi"].tolist()}
    pred = model.predict(ct, postprocess=False)
    roi = pred.meta["segmentation"]["roi_zyx"]
    sl = tuple(slice(a, b) for a, b in roi)
    labels = np.asarray(pred.array)[sl].astype(np.uint8)
    tmp = cache.with_name(cache.stem + ".tmp.npz")
    np.savez_compressed(tmp, labels=labels, roi=np.asarray(roi))
    os.replace(tmp, cache)
    return {"labels": labels, "roi": roi}


def bone_row(pred: np.ndarray, truth: np.ndarray, value: int, sampling: Any,
             voxel_ml: float) -> Dict[str, Any]:
    """Dice, far_ml and swapped_ml of one bone (1 tibia, 2 fibula)."""
    from scipy import ndimage

    mine, true = pred == value, truth == value
    far = 0.0
    if mine.any():
        if true.any():
            dist = ndimage.distance_transform_edt(~true, sampling=sampling)
            far = float((mine & (dist > FAR_MM)).sum()) * voxel_ml
        else:
            far = float(mine.sum()) * voxel_ml
    swapped = float((true & (pred == 3 - value)).sum()) * voxel_ml
    return {"dice": dice(mine, true), "far_ml": round(far, 3), "swapped_ml": round(swapped, 3)}


def score_case(model: Any, ds: Any, case: Any, cache_dir: Path) -> Dict[str, Any]:
    """One row: the case's bones scored after the current post-processing."""
    from AnkleFractureLib.io.files import read_image
    from AnkleFractureLib.segmentation.postprocess import clean_labels

    ct = read_image(ds.path(case.image))
    truth = np.asarray(read_image(ds.path(case.segmentation)).array)
    raw = raw_labels(model, ct, cache_dir / f"{case.id}.npz")
    sl = tuple(slice(a, b) for a, b in raw["roi"])
    roi_ct = np.asarray(ct.array)[sl]
    kwargs = {}
    if "superior_zyx" in inspect.signature(clean_labels).parameters:  # rule 7 and later
        kwargs["superior_zyx"] = ct.superior_zyx()
    cleaned, report = clean_labels(raw["labels"], ct.spacing, ct_hu=roi_ct, **kwargs)
    pred = np.zeros(truth.shape, np.uint8)
    pred[sl] = cleaned
    sampling = tuple(float(s) for s in ct.spacing[::-1])  # (z, y, x) mm
    voxel_ml = float(np.prod(ct.spacing)) / 1000.0
    meta = case.meta or {}
    return {"id": case.id, "weber": case.weber, "side": case.side,
            "both_legs": meta.get("both_legs"), "foot_in_view": meta.get("foot_in_view"),
            "forefoot": bool((meta.get("forefoot") or {}).get("present")),
            "labels_sha1": hashlib.sha1(np.ascontiguousarray(cleaned).tobytes()).hexdigest(),
            "tibia": bone_row(pred, truth, 1, sampling, voxel_ml),
            "fibula": bone_row(pred, truth, 2, sampling, voxel_ml),
            "notes": report.get("notes", [])}


def summary(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Means over the cases, and the number of cases with more than 1 ml far or swapped."""
    out: Dict[str, Any] = {"n": len(rows)}
    for bone in ("tibia", "fibula"):
        d = [r[bone]["dice"] for r in rows if r[bone]["dice"] is not None]
        out[bone] = {"dice": round(float(np.mean(d)), 4) if d else None,
                     "dice_min": round(float(min(d)), 4) if d else None,
                     "far_ml": round(float(sum(r[bone]["far_ml"] for r in rows)), 2),
                     "cases_far_over_1ml": sum(r[bone]["far_ml"] > 1.0 for r in rows),
                     "swapped_ml": round(float(sum(r[bone]["swapped_ml"] for r in rows)), 2),
                     "cases_swapped_over_1ml": sum(r[bone]["swapped_ml"] > 1.0 for r in rows)}
    return out


def _pairs(folder: Path) -> List[tuple]:
    """(set name, before, after) of every ``<set>_before.json`` with its ``_after.json``."""
    out = []
    for before in sorted(folder.glob("*_before.json")):
        after = before.with_name(before.name.replace("_before.json", "_after.json"))
        if after.is_file():
            out.append((before.name[: -len("_before.json")], json.loads(before.read_text()),
                        json.loads(after.read_text())))
    return out


def compare(before: Dict[str, Any], after: Dict[str, Any]) -> Dict[str, Any]:
    """Cases whose label map changed, and the largest fall of a case's Dice (either bone)."""
    changed, worst = [], 0.0
    for b, a in zip(before["cases"], after["cases"]):
        if b["id"] != a["id"]:
            raise ValueError(f"case lists differ: {b['id']} against {a['id']}")
        same = (b.get("labels_sha1") == a.get("labels_sha1") if "labels_sha1" in b
                and "labels_sha1" in a else (b["tibia"], b["fibula"]) == (a["tibia"], a["fibula"]))
        if not same:
            changed.append(b["id"])
        for bone in ("tibia", "fibula"):
            if b[bone]["dice"] is not None and a[bone]["dice"] is not None:
                worst = max(worst, b[bone]["dice"] - a[bone]["dice"])
    return {"changed": changed, "largest_dice_fall": round(worst, 4)}


def _set_rows(pairs: List[tuple]) -> List[str]:
    lines = ["| set | dataset | cases | label maps changed | Dice tibia | Dice fibula | worst "
             "fibula | far ml tibia / fibula | swapped ml tibia / fibula | largest fall of a "
             "case's Dice |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, b, a in pairs:
        c = compare(b, a)
        sb, sa = b["summary"], a["summary"]

        def arrow(bone: str, key: str) -> str:
            return f"{sb[bone][key]} -> {sa[bone][key]}"

        lines.append(
            f"| {name} | `{a['dataset']}` | {sa['n']} | {len(c['changed'])} | "
            f"{arrow('tibia', 'dice')} | {arrow('fibula', 'dice')} | "
            f"{arrow('fibula', 'dice_min')} | {arrow('tibia', 'far_ml')} / "
            f"{arrow('fibula', 'far_ml')} | {arrow('tibia', 'swapped_ml')} / "
            f"{arrow('fibula', 'swapped_ml')} | {c['largest_dice_fall']} |")
    return lines


def _case_rows(pairs: List[tuple]) -> List[str]:
    lines = ["| set | case | Weber | Dice tibia | Dice fibula | what the rule did |",
             "|---|---|---|---|---|---|"]
    for name, b, a in pairs:
        rows = {r["id"]: r for r in b["cases"]}
        for case_id in compare(b, a)["changed"]:
            rb, ra = rows[case_id], next(r for r in a["cases"] if r["id"] == case_id)
            new = [n for n in ra["notes"] if n not in rb["notes"]] or ["(notes unchanged)"]
            lines.append(f"| {name} | {case_id} | {ra['weber']} | {rb['tibia']['dice']} -> "
                         f"{ra['tibia']['dice']} | {rb['fibula']['dice']} -> "
                         f"{ra['fibula']['dice']} | {'; '.join(new)} |")
    return lines


def page(folder: Path) -> str:
    """The text of ``folder/README.md``, from the before/after files in it (and
    ``../<folder name>.json``, when present: title, why, criterion, verdict)."""
    pairs = _pairs(folder)
    rule = folder.parent / f"{folder.name}.json"
    info = json.loads(rule.read_text()) if rule.is_file() else {}
    lines = [f"# {info.get('title', 'Post-processing study')}", "",
             f"Generated by `python scripts/seg_postprocess_study.py --page {folder}` from the "
             "JSON files in this folder, each written by `python scripts/seg_postprocess_study.py "
             "DATASET --cache DIR --out FILE` (before: the code before the rule; after: with it; "
             "both on the same cached network output, so only the post-processing differs). "
             f"'far': labelled voxels more than {FAR_MM:g} mm from that bone in the truth; "
             "'swapped': voxels of the bone labelled the other bone.", ""]
    for key, head in (("why", "Why"), ("criterion", "Criterion"), ("verdict", "Verdict"),
                      ("after_verdict", "Run after the verdict")):
        if key in info:
            lines += [f"**{head}.** {info[key]}", ""]
    if info.get("commands"):
        lines += ["## Commands", ""] + [f"- {k}: `{v}`" for k, v in info["commands"].items()]
        lines.append("")
    lines += ["## Per set (before -> after)", ""] + _set_rows(pairs)
    lines += ["", "## Cases whose label map changed", ""] + _case_rows(pairs)
    real = folder / "real_foot_series.json"
    if real.is_file():
        r = json.loads(real.read_text())
        lines += ["", "## The real foot series", ""]
        for k, run in r["runs"].items():
            lines.append(f"- {k}: refused {run['refused']}, labelled {run['bones_ml']} ml "
                         f"(`{r['commands'][k]}`)")
            if run.get("refusals"):
                lines.append(f"  - headline refusal: {run['refusals'][0]}")
        lines.append(f"- label maps identical: {r['label_maps_identical']}")
    return "\n".join(lines) + "\n"


def real_runs(before: Path, after: Path) -> Dict[str, Any]:
    """The real foot series' two ``ankle-fracture run`` output folders (code before and after
    a rule) as ``real_foot_series.json``: refused or not, refusals, labelled volumes (ml) and
    voxels, and whether the two label maps are identical."""
    from AnkleFractureLib.io.files import read_image

    runs, maps = {}, []
    for key, folder in (("before", before), ("after", after)):
        res = json.loads((folder / "result.json").read_text())
        labels = np.asarray(read_image(folder / "segmentation.nii.gz").array)
        maps.append(labels)
        runs[key] = {"refused": res["refused"], "bones_ml": res.get("bones_ml"),
                     "labelled_voxels": {"tibia": int(np.count_nonzero(labels == 1)),
                                         "fibula": int(np.count_nonzero(labels == 2))},
                     "refusals": res.get("refusals", [])}
    return {"what": "the real foot series through `ankle-fracture run` with the code before "
                    "and after the rule", "runs": runs,
            "label_maps_identical": bool(np.array_equal(maps[0], maps[1]))}


def write_page(folder: Path) -> Path:
    """Write :func:`page` to ``folder/README.md`` (atomically)."""
    out = folder / "README.md"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(page(folder))
    os.replace(tmp, out)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?")
    parser.add_argument("--cache", help="folder of the raw network labels")
    parser.add_argument("--model", default=None, help="segmentation model (default: shipped)")
    parser.add_argument("--out")
    parser.add_argument("--label", default="", help="name of this run on a page")
    parser.add_argument("--page", help="write DIR/README.md from the before/after files in it")
    parser.add_argument("--real-runs", nargs=2, metavar=("BEFORE", "AFTER"),
                        help="two `ankle-fracture run` output folders of the real foot series "
                             "(code before and after): write them to --out")
    parser.add_argument("--commands", nargs=2, metavar=("BEFORE", "AFTER"), default=None,
                        help="with --real-runs: the two commands, recorded in the file")
    args = parser.parse_args(argv)
    if args.page:
        print(write_page(Path(args.page)))
        return 0
    if args.real_runs:
        if not args.out:
            parser.error("--real-runs needs --out")
        out = real_runs(Path(args.real_runs[0]), Path(args.real_runs[1]))
        if args.commands:
            out["commands"] = dict(zip(("before", "after"), args.commands))
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        os.replace(tmp, args.out)
        return 0
    if not (args.dataset and args.cache and args.out):
        parser.error("DATASET, --cache and --out are needed (or --page DIR)")

    from AnkleFractureLib.dataset import Dataset
    from AnkleFractureLib.segmentation.inference import SegmentationModel
    from AnkleFractureLib.segmentation.postprocess import POSTPROCESS_VERSION

    ds = Dataset.load(args.dataset)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model = SegmentationModel.load(args.model, device="cpu")
    rows = []
    for case in ds.cases:
        r = score_case(model, ds, case, cache)
        rows.append(r)
        print(f"{r['id']} tibia {r['tibia']} fibula {r['fibula']}", flush=True)
    out = {"label": args.label, "dataset": str(args.dataset), "model": str(model.model_dir),
           "postprocess_version": POSTPROCESS_VERSION, "far_mm": FAR_MM,
           "summary": summary(rows), "cases": rows}
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps(out["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
