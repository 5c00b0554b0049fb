#!/usr/bin/env python
"""The label-scarcity experiment of issue 5: regenerates docs/results.md.

For every label fraction, seed and method it trains a classifier on the training pool (the
labels of all but a stratified share of the cases hidden, those cases unlabelled), evaluates it
on the fixed test set, and writes the table (accuracy mean +- sd over seeds, macro AUROC) with
the exact commands. Runs are cached in ``--runs`` (one folder per run with ``result.json``), so
an interrupted experiment resumes where it stopped; ``--report-only`` rewrites the page from
the finished runs.

Data (phantoms; the commands are printed in the page):
    ankle-fracture phantom --out /work/data/cls_pool --n 400 --seed 202
    ankle-fracture phantom --out /work/data/cls_test --n 200 --seed 7001

Example (the configuration of the published page):
    python scripts/cls_experiment.py --pool /work/data/cls_pool --test /work/data/cls_test \\
        --runs /work/runs/cls_experiment --out docs/results.md --processes 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_STATE: Dict[str, Any] = {}  # crops shared with forked worker processes


def _run_name(method: str, crop: str, fraction: float, seed: int) -> str:
    return f"{method}-{crop}-f{int(round(fraction * 100)):03d}-s{seed}"


def _one_run(job: Tuple[str, str, float, int, Dict[str, Any]]) -> Dict[str, Any]:
    """Train one configuration and evaluate it on the test crops (in a worker process)."""
    import shutil

    import torch

    from AnkleFractureLib.classification.inference import WeberClassifier
    from AnkleFractureLib.classification.plans import ClsPlans
    from AnkleFractureLib.evaluation.cls_metrics import classification_report
    from AnkleFractureLib.io import atomic_write_json
    from AnkleFractureLib.training.cls_train import ClsTrainConfig, train_classifier

    method, crop, fraction, seed, opts = job
    torch.set_num_threads(int(opts["threads"]))
    run_dir = Path(opts["runs"]) / _run_name(method, crop, fraction, seed)
    result_file = run_dir / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    model_dir = run_dir / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    plans = ClsPlans.make(crop, downsample=opts["downsample"], widths=opts["widths"], tta=0)
    cfg = ClsTrainConfig(method=method, label_fraction=fraction, seed=seed, steps=opts["steps"],
                         batch_size=opts["batch_size"],
                         unlabelled_batch_size=opts["batch_size"], lr=opts["lr"],
                         val_fraction=0.0)
    t0 = time.monotonic()
    summary = train_classifier(opts["pool"], model_dir, cfg, plans=plans,
                               crops=_STATE[("pool", crop)], device="cpu",
                               num_threads=int(opts["threads"]), log=None,
                               command=["scripts/cls_experiment.py"])
    minutes = (time.monotonic() - t0) / 60.0
    clf = WeberClassifier.load(model_dir, device="cpu")
    test = _STATE[("test", crop)]
    keep = test.y >= 0
    probs = clf.predict_crops(test.x[keep])
    report = classification_report(test.y[keep], probs)
    out = {"method": method, "crop": crop, "fraction": fraction, "seed": seed,
           "accuracy": report["accuracy"], "macro_auroc": report["macro"]["auroc"],
           "ece": report["ece"], "n_test": int(keep.sum()),
           "n_labelled": len(summary["cases"]["labelled_train"]),
           "n_unlabelled": summary["cases"]["unlabelled"], "minutes": round(minutes, 2),
           "steps": summary["steps_done"], "confusion_matrix": report["confusion_matrix"]}
    atomic_write_json(result_file, out)
    shutil.rmtree(model_dir, ignore_errors=True)  # weights are not needed after evaluation
    return out


def _load_all(opts: Dict[str, Any], crops_needed: List[str]) -> None:
    from AnkleFractureLib.classification.crops import load_crops
    from AnkleFractureLib.dataset.layout import Dataset

    for name in ("pool", "test"):
        ds = Dataset.load(opts[name])
        for crop in crops_needed:
            t = time.monotonic()
            cs = load_crops(ds, Path(opts["cache"]) / name, crop, workers=opts["workers"])
            _STATE[(name, crop)] = cs
            print(f"{name} {crop}: {len(cs)} crops ({len(cs.failed)} failed) in "
                  f"{time.monotonic() - t:.0f} s", flush=True)


def _fmt(values: List[float]) -> str:
    if not values:
        return "n/a"
    a = 100.0 * np.asarray(values)
    sd = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return f"{a.mean():.1f} ± {sd:.1f}"


def write_report(results: List[Dict[str, Any]], opts: Dict[str, Any], path: Path,
                 command: str) -> None:
    """Write docs/results.md from the finished runs."""
    from AnkleFractureLib.io import atomic_write_text

    fractions = opts["fractions"]
    lines = ["# Results: Weber classification under label scarcity (phantoms)", "",
             "Regenerated by `scripts/cls_experiment.py` (this page is its output; do not edit).",
             "These are **phantom** results: they test the method and the code, not clinical "
             "performance. Real-data figures need a hospital's own CTs (the training commands "
             "are the same).", "",
             "## Set-up", "",
             f"- Training pool: `{opts['pool']}` ({opts['n_pool']} phantom cases, classes "
             "none/A/B/C balanced, both sides). At label fraction *f* a stratified, seeded "
             "share *f* of the cases keeps its class; all the others are unlabelled.",
             f"- Test set: `{opts['test']}` ({opts['n_test']} cases, balanced, dataset seed never "
             "used in training).",
             "- Crops: *registered* = mirrored + ICP-registered syndesmosis crop (CT, tibia mask, "
             "fibula mask) from the dataset's label maps; *raw CT* = same-size box centred on "
             "the bone, CT only, no segmentation, registration or mirroring (x-flip "
             "augmentation, since its side is not normalised).",
             f"- Network: SE-ResNet-18 widths {opts['widths']}, crops average-pooled by "
             f"{opts['downsample']} (the CPU budget: 2 = 3 mm voxels, [1, 2, 2] = 1.5 mm along "
             f"the leg and 3 mm across), {opts['steps']} AdamW steps (lr "
             f"{opts['lr']}, cosine decay; the reference's SGD learns too slowly from scratch "
             f"in a CPU step budget), batch {opts['batch_size']} labelled + "
             f"{opts['batch_size']} unlabelled, supervised warm-up 20 % of the steps; semi: "
             "L = L_l + L_u + 15 L_MMD, threshold 0.5; pseudo-label threshold 0.7; FixMatch 0.95.",
             f"- Seeds: {opts['seeds']}; accuracy is 4-class (none, A, B, C), mean ± sd over "
             "seeds, in %.", "",
             "## Accuracy (%), 4 classes, registered crops unless stated", "",
             "| method | " + " | ".join(f"{int(f * 100)}% labels" for f in fractions) + " |",
             "|---|" + "---|" * len(fractions)]
    rows = [("supervised (labelled only)", "supervised", "registered"),
            ("pseudo-label (0.7)", "pseudolabel", "registered"),
            ("FixMatch", "fixmatch", "registered"),
            ("semi (reference method)", "semi", "registered"),
            ("semi, raw CT", "semi", "raw")]
    by: Dict[Tuple[str, str, float], List[Dict[str, Any]]] = {}
    for r in results:
        by.setdefault((r["method"], r["crop"], r["fraction"]), []).append(r)
    for title, method, crop in rows:
        cells = [_fmt([r["accuracy"] for r in by.get((method, crop, f), [])]) for f in fractions]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines += ["", "Macro one-vs-rest AUROC (mean over seeds):", "",
              "| method | " + " | ".join(f"{int(f * 100)}%" for f in fractions) + " |",
              "|---|" + "---|" * len(fractions)]
    for title, method, crop in rows:
        cells = []
        for f in fractions:
            v = [r["macro_auroc"] for r in by.get((method, crop, f), [])
                 if r["macro_auroc"] is not None]
            cells.append(f"{np.mean(v):.3f}" if v else "n/a")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    n_lab = {f: sorted({r["n_labelled"] for r in results if r["fraction"] == f}) for f in fractions}
    lines += ["", "Labelled training cases per fraction: "
              + ", ".join(f"{int(f * 100)}% -> {n_lab[f]}" for f in fractions) + ".", ""]
    lines += ["## Reference (methods.md; 3 classes A/B/C, real CT, 612 cases)", "",
              "| method | 5% | 20% | 50% | 70% |", "|---|---|---|---|---|",
              "| FixMatch, masks | 62.04 | 62.60 | 67.61 | 70.49 |",
              "| pseudo-label, masks | 60.88 | 61.28 | 68.37 | 71.50 |",
              "| reference method, masks | 65.01 | 66.85 | 71.20 | 75.22 |",
              "| reference method, raw CT | 61.57 | 62.13 | 66.30 | 71.25 |", ""]
    lines += ["## What we find", "", "FINDINGS_PLACEHOLDER", "",
              f"(Interpretation: `{path.stem}_findings.md`, written by hand from the tables.)", ""]
    lines += ["## Commands", "", "```", "ankle-fracture phantom --out /work/data/cls_pool --n "
              f"{opts['n_pool']} --seed 202 --spacing fast",
              f"ankle-fracture phantom --out /work/data/cls_test --n {opts['n_test']} --seed 7001 "
              "--spacing fast", command, "```", "",
              f"{len(results)} runs; total training time {sum(r['minutes'] for r in results):.0f} "
              "CPU-process minutes (2-core machine).", ""]
    text = "\n".join(lines)
    # The interpretation is written by people, kept beside the page and pasted in.
    findings = path.with_name(path.stem + "_findings.md")
    if findings.is_file():
        text = text.replace("FINDINGS_PLACEHOLDER", findings.read_text().strip())
    atomic_write_text(path, text)
    from AnkleFractureLib.io import atomic_write_json

    key = lambda r: (r["crop"], r["method"], r["fraction"], r["seed"])  # noqa: E731
    atomic_write_json(path.with_name(path.stem + "_runs.json"),
                      {"options": {k: v for k, v in opts.items()}, "runs": sorted(results, key=key)})


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", required=True, help="training pool dataset")
    p.add_argument("--test", required=True, help="test dataset (labelled)")
    p.add_argument("--runs", required=True, help="folder for per-run results (resumable)")
    p.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    p.add_argument("--cache", help="crop cache folder (default RUNS/crops)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.2, 0.5, 0.7])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+",
                   default=["supervised", "pseudolabel", "fixmatch", "semi"])
    p.add_argument("--no-raw", action="store_true", help="skip semi on raw CT")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--downsample", type=int, nargs="+", default=[2],
                   help="crop pooling factor(s): one, or three (z, y, x)")
    p.add_argument("--widths", type=int, nargs=4, default=[8, 16, 32, 64])
    p.add_argument("--processes", type=int, default=2, help="runs in parallel (1 thread each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--workers", type=int, default=2, help="processes computing crops")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    opts = {k: getattr(args, k) for k in ("pool", "test", "runs", "fractions", "seeds", "steps",
                                           "batch_size", "lr", "downsample", "widths",
                                           "threads", "workers")}
    if len(opts["downsample"]) == 1:
        opts["downsample"] = opts["downsample"][0]
    elif len(opts["downsample"]) != 3:
        p.error("--downsample takes one or three factors")
    opts["cache"] = args.cache or os.path.join(args.runs, "crops")
    from AnkleFractureLib.dataset.layout import Dataset

    opts["n_pool"] = len(Dataset.load(args.pool))
    opts["n_test"] = len(Dataset.load(args.test))
    jobs = [(m, "registered", f, s, opts) for f in args.fractions for s in args.seeds
            for m in args.methods]
    if not args.no_raw:
        jobs += [("semi", "raw", f, s, opts) for f in args.fractions for s in args.seeds]
    shown = [a for a in (argv or sys.argv[1:]) if a != "--report-only"]
    command = "python " + " ".join(["scripts/cls_experiment.py"] + shown)
    results: List[Dict[str, Any]] = []
    if not args.report_only:
        _load_all(opts, ["registered"] + ([] if args.no_raw else ["raw"]))
        import multiprocessing as mp

        t0 = time.monotonic()
        ctx = mp.get_context("fork")  # workers share the loaded crops copy-on-write
        with ctx.Pool(args.processes) as pool:
            for i, r in enumerate(pool.imap_unordered(_one_run, jobs)):
                results.append(r)
                print(f"[{i + 1}/{len(jobs)} {(time.monotonic() - t0) / 60:.1f} min] "
                      f"{_run_name(r['method'], r['crop'], r['fraction'], r['seed'])}: "
                      f"accuracy {r['accuracy']:.3f} ({r['minutes']:.1f} min)", flush=True)
    else:
        for job in jobs:
            f = Path(args.runs) / _run_name(*job[:4]) / "result.json"
            if f.is_file():
                results.append(json.loads(f.read_text()))
    write_report(results, opts, Path(args.out), command)
    print(f"wrote {args.out} ({len(results)} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
