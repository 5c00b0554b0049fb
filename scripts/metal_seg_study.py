#!/usr/bin/env python3
"""How well does a segmentation model keep the bones under fixation hardware?

Usage:
    python scripts/metal_seg_study.py DATASET --model MODEL_DIR --out FILE.json
    python scripts/metal_seg_study.py --page DIR

For every case of a phantom dataset made with ``ankle-fracture phantom ... --metal 1.0`` (each
case carries a fibular plate with screws or medial malleolar screws), the CT is segmented with
the model and scored against the phantom's labels: Dice per bone over the whole scan, and the
fibula's Dice over the *plated slices* alone (the slices where metal, >= 2500 HU, lies within
15 mm of the true fibula: the segment a plate covers, where a model that learned no plates
loses the bone). ``--suppress-metal`` first sets every metal voxel to soft tissue (40 HU), a
crude inference-time alternative to training with plates. Writes per-case rows and means to
``--out``. ``--page DIR`` writes DIR/README.md from the JSON files in DIR (each file's
``label`` names the model; nothing on the page is typed by hand).
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

#: HU at or above which a voxel is metal (the crop's METAL_HU); soft tissue HU that
#: ``--suppress-metal`` writes there; mm around the fibula within which metal marks a slice.
METAL_HU, SOFT_HU, NEAR_MM = 2500.0, 40.0, 15.0


def dice(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    """Dice of two boolean masks (None when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else round(2.0 * float((a & b).sum()) / total, 4)


def plated_slices(ct: np.ndarray, label: np.ndarray, spacing_xyz) -> np.ndarray:
    """bool (z,): slices where metal lies within :data:`NEAR_MM` of the true fibula."""
    from scipy import ndimage

    fib = label == 2
    if not fib.any():
        return np.zeros(ct.shape[0], bool)
    sampling = (spacing_xyz[2], spacing_xyz[1], spacing_xyz[0])  # (z, y, x) mm
    near = ndimage.distance_transform_edt(~fib, sampling=sampling) <= NEAR_MM
    return ((ct >= METAL_HU) & near).reshape(ct.shape[0], -1).any(axis=1)


def score_case(model: Any, ds: Any, case: Any, suppress: bool) -> Dict[str, Any]:
    """One row: Dice tibia / fibula, fibula Dice on the plated slices, the hardware drawn."""
    from AnkleFractureLib.io.files import read_image

    ct = read_image(ds.path(case.image))
    truth = np.asarray(read_image(ds.path(case.segmentation)).array)
    arr = np.asarray(ct.array)
    if suppress:
        ct = ct.with_array(np.where(arr >= METAL_HU, SOFT_HU, arr).astype(arr.dtype))
    t0 = time.perf_counter()
    pred = np.asarray(model.predict(ct).array)
    plated = plated_slices(arr, truth, ct.spacing)
    meta = case.meta or {}
    return {"id": case.id, "weber": case.weber,
            "hardware": (meta.get("appearance") or {}).get("metal"),
            "tibia_dice": dice(pred == 1, truth == 1), "fibula_dice": dice(pred == 2, truth == 2),
            "plated_slices": int(plated.sum()),
            "fibula_dice_plated": dice((pred == 2) & plated[:, None, None],
                                       (truth == 2) & plated[:, None, None]),
            "seconds": round(time.perf_counter() - t0, 2)}


def summary(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Means (and the worst fibula Dice) over the rows, all cases and plate cases alone."""
    def mean(key: str, sel: List[Dict[str, Any]]) -> Optional[float]:
        vals = [r[key] for r in sel if r[key] is not None]
        return round(float(np.mean(vals)), 4) if vals else None

    plates = [r for r in rows if r["hardware"] == "plate"]
    fib = [r["fibula_dice"] for r in rows if r["fibula_dice"] is not None]
    return {"n": len(rows), "n_plate": len(plates), "tibia_dice": mean("tibia_dice", rows),
            "fibula_dice": mean("fibula_dice", rows),
            "fibula_dice_plate_cases": mean("fibula_dice", plates),
            "fibula_dice_plated_slices": mean("fibula_dice_plated", rows),
            "fibula_dice_min": round(float(min(fib)), 4) if fib else None}


def run(args: argparse.Namespace) -> int:
    from AnkleFractureLib.dataset import Dataset
    from AnkleFractureLib.segmentation.inference import SegmentationModel

    ds = Dataset.load(args.dataset)
    model = SegmentationModel.load(args.model, device="cpu")
    rows = []
    for case in ds.cases:
        rows.append(score_case(model, ds, case, args.suppress_metal))
        r = rows[-1]
        print(f"{r['id']} {r['hardware']:7s} tibia {r['tibia_dice']} fibula {r['fibula_dice']} "
              f"plated {r['fibula_dice_plated']} ({r['plated_slices']} slices)", flush=True)
    out = {"label": args.label or Path(args.model).name, "dataset": str(args.dataset),
           "model": str(args.model), "suppress_metal": bool(args.suppress_metal),
           "summary": summary(rows), "cases": rows}
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps(out["summary"]))
    return 0


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100.0 * float(v):.1f} %"


def _seg_table(files: List[Path]) -> List[str]:
    lines = ["| file | model | dataset | metal suppressed | cases (plates) | Dice tibia | "
             "Dice fibula | fibula, plate cases | fibula, plated slices | worst fibula |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for f in files:
        d = json.loads(f.read_text())
        s = d["summary"]
        lines.append(f"| {f.name} | {d['label']} | `{d['dataset']}` | "
                     f"{'yes' if d['suppress_metal'] else 'no'} | {s['n']} ({s['n_plate']}) | "
                     f"{s['tibia_dice']} | {s['fibula_dice']} | {s['fibula_dice_plate_cases']} "
                     f"| {s['fibula_dice_plated_slices']} | {s['fibula_dice_min']} |")
    return lines


def _hardware_of(seg_files: List[Path]) -> Dict[str, Dict[str, str]]:
    """dataset -> {case id: hardware drawn} from the segmentation study files."""
    out: Dict[str, Dict[str, str]] = {}
    for f in seg_files:
        d = json.loads(f.read_text())
        out.setdefault(d["dataset"], {}).update({r["id"]: r["hardware"] for r in d["cases"]})
    return out


def _right(cases: List[Dict[str, Any]], hardware: Dict[str, str], kind: str) -> str:
    sel = [c for c in cases if hardware.get(c["id"]) == kind]
    return f"{sum(c['predicted'] == c['true'] for c in sel)} of {len(sel)}" if sel else "n/a"


def _pipeline_table(files: List[Path], seg_files: List[Path]) -> List[str]:
    hardware = _hardware_of(seg_files)
    lines = ["| file | segmentation (sha256) | dataset | cases | refused | accuracy | "
             "right, plates | right, screws | found | found on intact | "
             "median abs. height error |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in files:
        d = json.loads(f.read_text())
        s, fr = d["summary"], d["summary"]["fracture"]
        sha = d["models"]["segmentation"]["sha256"][:12]
        hw = hardware.get(d["dataset"], {})
        lines.append(f"| {f.name} | `{sha}` | `{d['dataset']}` | {s['n']} | {s['refused']} | "
                     f"{_pct(s['combined']['accuracy'])} | {_right(d['cases'], hw, 'plate')} | "
                     f"{_right(d['cases'], hw, 'screws')} | {_pct(fr['found_rate'])} | "
                     f"{_pct(fr['found_on_none_rate'])} | "
                     f"{fr['median_abs_height_error_mm']} mm |")
    return lines


def _segsets_table(files: List[Path]) -> List[str]:
    lines = ["| file | dataset | cases | Dice tibia | HD95 tibia (mm) | Dice fibula | "
             "HD95 fibula (mm) |", "|---|---|---|---|---|---|---|"]
    for f in files:
        d = json.loads(f.read_text())
        t, b = d["mean"]["tibia"], d["mean"]["fibula"]
        lines.append(f"| {f.name} | `{d['dataset']}` | {d['n_cases']} | {t['dice']:.4f} | "
                     f"{t['hd95_mm']:.2f} | {b['dice']:.4f} | {b['hd95_mm']:.2f} |")
    return lines


def page(folder: Path) -> str:
    """README.md text of ``folder``: its experiment.json (question, criterion, decision), a
    row per segmentation study JSON and a row per ``evaluate-fracture`` JSON."""
    exp_file = folder / "experiment.json"
    exp = json.loads(exp_file.read_text()) if exp_file.exists() else {}
    seg, pipe, segsets = [], [], []
    for f in sorted(folder.glob("*.json")):
        d = json.loads(f.read_text())
        if "suppress_metal" in d:
            seg.append(f)
        elif "models" in d and "summary" in d:
            pipe.append(f)
        elif "mean" in d and "n_cases" in d:
            segsets.append(f)
    lines = [f"# {exp.get('name', 'Segmentation under fixation hardware')}", "",
             f"Generated by `python scripts/metal_seg_study.py --page {folder}` from the files "
             "in this folder (nothing on it typed by hand). Segmentation rows: `python "
             "scripts/metal_seg_study.py DATASET --model MODEL --out FILE` (the script's "
             "docstring says what it measures); held-out segmentation sets: `ankle-fracture "
             "evaluate-seg`; pipeline rows: `ankle-fracture evaluate-fracture DATASET "
             "[--seg-model MODEL] --out FILE`; `bash docs/metal/run.sh` runs them and "
             "commands.json gives each file's command."]
    if exp:
        lines += ["", f"**Question.** {exp['question']}", "",
                  f"**Criterion** (written {exp['written']}):", ""]
        lines += [f"- {c}" for c in exp["criterion"]]
        for key in ("model_command", "model_choice", "training_data", "validation_data",
                    "heldout_data"):
            if key in exp:
                lines.append(f"- {key.replace('_', ' ')}: `{exp[key]}`")
        if exp.get("decision"):
            lines += ["", f"**Decision.** {exp['decision']}"]
    lines += ["", "## Segmentation", ""] + _seg_table(seg)
    if segsets:
        lines += ["", "## Segmentation held-out sets without metal on purpose "
                  "(`ankle-fracture evaluate-seg`, means over cases)", ""] + _segsets_table(segsets)
    lines += ["", "## Whole pipeline", ""] + _pipeline_table(pipe, seg)
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", nargs="?")
    p.add_argument("--model", default="Resources/Models/segmentation")
    p.add_argument("--label", help="name of the model on the page (default: its folder name)")
    p.add_argument("--out")
    p.add_argument("--suppress-metal", action="store_true")
    p.add_argument("--page", metavar="DIR")
    args = p.parse_args(argv)
    if args.page:
        (Path(args.page) / "README.md").write_text(page(Path(args.page)))
        return 0
    if not args.dataset or not args.out:
        p.error("DATASET and --out are needed (or --page DIR)")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
