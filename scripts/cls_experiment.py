#!/usr/bin/env python
"""The label-scarcity experiment of issue 5: regenerates docs/results.md.

For every label fraction, seed and method it trains a classifier on the training pool (the
labels of all but a stratified share of the cases hidden, those cases unlabelled), evaluates it
on the fixed test set, and writes the table (accuracy mean +- sd over seeds, macro AUROC) with
the exact commands. Runs are cached in ``--runs`` (one folder per run with ``result.json``), so
an interrupted experiment resumes where it stopped; ``--report-only`` rewrites the page from
the finished runs, ``--from-json docs/results_runs.json`` from the committed runs file alone.
Every figure of the page comes from artefacts committed beside it: ``results_runs.json``
(options + runs), ``results_findings.md`` (the interpretation, a template whose figures are
``[[...]]`` placeholders filled from the runs), ``results_reference.json`` (the published
table) and the shipped model card's metrics files. Pool crops use the dataset's side; test
crops detect it as ``ankle-fracture run`` does (recorded in the options).

Data (phantoms; the commands are printed in the page):
    ankle-fracture phantom --out /work/data/cls_pool --n 400 --seed 202
    ankle-fracture phantom --out /work/data/cls_test --n 200 --seed 7001

Example (the configuration of the published page):
    python scripts/cls_experiment.py --pool /work/data/cls_pool --test /work/data/cls_test \\
        --runs /work/runs/cls_experiment --out docs/results.md --processes 2
    python scripts/cls_experiment.py --from-json docs/results_runs.json   # page only
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
            # Pool: the dataset's side (labelled training data knows it); test: detected as
            # `ankle-fracture run` does, so a wrong side counts against the result.
            cs = load_crops(ds, Path(opts["cache"]) / name, crop, workers=opts["workers"],
                            side=opts[f"{name}_side"])
            _STATE[(name, crop)] = cs
            print(f"{name} {crop}: {len(cs)} crops ({len(cs.failed)} failed) in "
                  f"{time.monotonic() - t:.0f} s", flush=True)


def _fmt(values: List[float]) -> str:
    if not values:
        return "n/a"
    a = 100.0 * np.asarray(values)
    sd = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return f"{a.mean():.1f} ± {sd:.1f}"


REFERENCE = ROOT / "docs" / "results_reference.json"
CARD_DIR = ROOT / "Resources" / "Models" / "classification"
CARD_FILES = ("test_metrics.json", "test_metrics_predicted_segmentation.json")
#: ``[[name:arg:...]]`` in the findings template (docs/results_findings.md).
FINDING = re.compile(r"\[\[([^\[\]]+)\]\]")


def _by(results: List[Dict[str, Any]]) -> Dict[Tuple[str, str, float], List[Dict[str, Any]]]:
    by: Dict[Tuple[str, str, float], List[Dict[str, Any]]] = {}
    for r in results:
        by.setdefault((r["method"], r["crop"], r["fraction"]), []).append(r)
    return by


def _means(by: Dict[Tuple[str, str, float], List[Dict[str, Any]]], methods: List[str],
           crop: str, fractions: Optional[Tuple[float, float]] = None) -> List[float]:
    """Mean accuracy (%) over seeds of each (method, fraction) cell."""
    return [100.0 * float(np.mean([r["accuracy"] for r in rs]))
            for (m, c, f), rs in by.items() if m in methods and c == crop
            and (fractions is None or fractions[0] <= f <= fractions[1])]


def _sds(by: Dict[Tuple[str, str, float], List[Dict[str, Any]]], crop: str) -> List[float]:
    return [100.0 * float(np.std([r["accuracy"] for r in rs], ddof=1))
            for (_, c, _), rs in by.items() if c == crop and len(rs) > 1]


def _card_value(name: str, path: str, fmt: str) -> str:
    data: Any = json.loads((CARD_DIR / name).read_text())
    for part in path.split("."):
        data = data[part]
    if fmt == "len":
        return str(len(data))
    return f"{100 * data:.1f}" if fmt == "pct" else str(int(data))


def _finding(spec: str, results: List[Dict[str, Any]], opts: Dict[str, Any],
             ref: Dict[str, Any]) -> str:
    """The value of one ``[[spec]]`` placeholder of the findings template."""
    name, *a = spec.split(":")
    by = _by(results)
    cell = lambda: by.get((a[0], a[1], float(a[2])), [])  # noqa: E731
    if name == "acc":
        return _fmt([r["accuracy"] for r in cell()])
    if name in ("mean", "min"):
        values = [100.0 * r["accuracy"] for r in cell()]
        return f"{(np.mean(values) if name == 'mean' else min(values)):.1f}"
    if name == "range":
        span = tuple(float(x) for x in a[2].split("-")) if len(a) > 2 else None
        v = _means(by, a[0].split("+"), a[1], span)  # type: ignore[arg-type]
        return f"{min(v):.1f}-{max(v):.1f}"
    if name in ("nlab", "nunlab"):
        key = "n_labelled" if name == "nlab" else "n_unlabelled"
        return ", ".join(str(n) for n in sorted({r[key] for r in results
                                                 if r["fraction"] == float(a[0])}))
    if name in ("sdrange", "sdmax"):
        v = _sds(by, a[0])
        return f"{min(v):.1f}-{max(v):.1f}" if name == "sdrange" else f"{max(v):.0f}"
    if name == "nseeds":
        return str(len(opts["seeds"]))
    if name == "opt":
        return str(opts[a[0]])
    if name == "ref":
        row = next(r for r in ref["rows"] if r["method"] == a[0])
        return f"{row['accuracy'][ref['fractions'].index(float(a[1]))]:.1f}"
    if name == "refval":
        return str(ref["values"][a[0]])
    if name == "card":
        return _card_value(a[0], a[1], a[2])
    if name == "cardstatus":
        old = [f for f in CARD_FILES if "crop_key" not in json.loads((CARD_DIR / f).read_text())]
        return (" (measured before automatic side detection in evaluation: the model card lists "
                "the commands that re-measure them)") if old else ""
    raise ValueError(f"unknown placeholder [[{spec}]] in the findings")


def render_findings(text: str, results: List[Dict[str, Any]], opts: Dict[str, Any],
                    ref: Dict[str, Any]) -> str:
    """The findings template with every ``[[...]]`` filled from the artefacts."""
    return FINDING.sub(lambda m: _finding(m.group(1), results, opts, ref), text)


def _command(opts: Dict[str, Any], runs: Optional[str] = None) -> str:
    """The experiment's command line from its options (the recorded one when there is one)."""
    if opts.get("command") and runs is None:
        return str(opts["command"])
    parts = ["python scripts/cls_experiment.py", "--pool", opts["pool"], "--test", opts["test"],
             "--runs", runs or opts["runs"], "--out docs/results.md", "--steps",
             str(opts["steps"])]
    return " ".join(parts)


def _side_lines(opts: Dict[str, Any]) -> List[str]:
    """How the crops' sides were chosen (from the options recorded with the runs)."""
    if opts.get("test_side") == "detect":
        return [f"- Sides: training-pool crops use the dataset's side ({opts.get('pool_side')}"
                "; labelled data knows it); test crops detect the side as `ankle-fracture run` "
                f"does (crop code version {opts.get('crop_code_version')})."]
    return ["- **These runs predate automatic side detection in evaluation:** the options "
            "recorded with them (`results_runs.json`) have no `test_side`, so the test crops, "
            "like the pool's, were registered with the dataset's side and the registration of "
            "that time. Re-measure (a new runs folder; the crop cache recomputes, its key "
            "covers the side policy and the crop code version):", "",
            f"      {_command(opts, runs=str(opts['runs']).rstrip('/') + '_side_detect')}"]


def _table_lines(results: List[Dict[str, Any]], fractions: List[float]) -> List[str]:
    """The accuracy and AUROC tables."""
    lines = ["## Accuracy (%), 4 classes, registered crops unless stated", "",
             "| method | " + " | ".join(f"{int(f * 100)}% labels" for f in fractions) + " |",
             "|---|" + "---|" * len(fractions)]
    rows = [("supervised (labelled only)", "supervised", "registered"),
            ("pseudo-label (0.7)", "pseudolabel", "registered"),
            ("FixMatch", "fixmatch", "registered"),
            ("semi (reference method)", "semi", "registered"),
            ("semi, raw CT", "semi", "raw")]
    by = _by(results)
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
    return lines + ["", "Labelled training cases per fraction: "
                    + ", ".join(f"{int(f * 100)}% -> {n_lab[f]}" for f in fractions) + ".", ""]


def _reference_lines(ref: Dict[str, Any]) -> List[str]:
    """The published table (docs/results_reference.json)."""
    fr = ref["fractions"]
    lines = [f"## Reference ({ref['source']})", "",
             "| method | " + " | ".join(f"{int(round(f * 100))}%" for f in fr) + " |",
             "|---|" + "---|" * len(fr)]
    lines += [f"| {r['method']} | " + " | ".join(f"{v:.2f}" for v in r["accuracy"]) + " |"
              for r in ref["rows"]]
    return lines + [""]


def build_report(results: List[Dict[str, Any]], opts: Dict[str, Any], findings: str,
                 ref: Dict[str, Any]) -> str:
    """The text of docs/results.md from the runs, their options, the findings template and
    the reference table (no figure typed here)."""
    lines = ["# Results: Weber classification under label scarcity (phantoms)", "",
             "Regenerated by `scripts/cls_experiment.py` (this page is its output; do not edit; "
             "`python scripts/cls_experiment.py --from-json docs/results_runs.json` rewrites it "
             "from the committed runs, `docs/results_findings.md` and "
             "`docs/results_reference.json`).",
             "These are **phantom** results: they test the method and the code, not clinical "
             "performance. Real-data figures need a hospital's own CTs (the training commands "
             "are the same).", "", "## Set-up", "",
             f"- Training pool: `{opts['pool']}` ({opts['n_pool']} phantom cases, classes "
             "none/A/B/C balanced, both sides). At label fraction *f* a stratified, seeded "
             "share *f* of the cases keeps its class; all the others are unlabelled.",
             f"- Test set: `{opts['test']}` ({opts['n_test']} cases, balanced, dataset seed never "
             "used in training).",
             "- Crops: *registered* = mirrored + ICP-registered syndesmosis crop (CT, tibia mask, "
             "fibula mask) from the dataset's label maps; *raw CT* = same-size box centred on "
             "the bone, CT only, no segmentation, registration or mirroring (x-flip "
             "augmentation, since its side is not normalised)."] + _side_lines(opts) + [
             f"- Network: SE-ResNet-18 widths {opts['widths']}, crops average-pooled by "
             f"{opts['downsample']} (the CPU budget: 2 = 3 mm voxels, [1, 2, 2] = 1.5 mm along "
             f"the leg and 3 mm across), {opts['steps']} AdamW steps (lr "
             f"{opts['lr']}, cosine decay; the reference's SGD learns too slowly from scratch "
             f"in a CPU step budget), batch {opts['batch_size']} labelled + "
             f"{opts['batch_size']} unlabelled, supervised warm-up 20 % of the steps; semi: "
             "L = L_l + L_u + 15 L_MMD, threshold 0.5; pseudo-label threshold 0.7; FixMatch 0.95.",
             f"- Seeds: {opts['seeds']}; accuracy is 4-class (none, A, B, C), mean ± sd over "
             "seeds, in %.", ""]
    lines += _table_lines(results, opts["fractions"]) + _reference_lines(ref)
    lines += ["## What we find", "", render_findings(findings.strip(), results, opts, ref), "",
              "(Interpretation: `results_findings.md`, written by hand as a template; every "
              "figure in it is filled in from `results_runs.json`, `results_reference.json` and "
              "the model card's metrics files.)", ""]
    lines += ["## Commands", "", "```", "ankle-fracture phantom --out /work/data/cls_pool --n "
              f"{opts['n_pool']} --seed 202 --spacing fast",
              f"ankle-fracture phantom --out /work/data/cls_test --n {opts['n_test']} --seed 7001 "
              "--spacing fast", _command(opts), "```", "",
              f"{len(results)} runs; total training time {sum(r['minutes'] for r in results):.0f} "
              "CPU-process minutes (2-core machine).", ""]
    return "\n".join(lines)


def write_report(results: List[Dict[str, Any]], opts: Dict[str, Any], path: Path,
                 write_runs: bool = True) -> None:
    """Write docs/results.md (and, after a run, docs/results_runs.json) from the runs."""
    from AnkleFractureLib.io import atomic_write_json, atomic_write_text

    findings = path.with_name(path.stem + "_findings.md")  # beside the page, else docs/'s
    findings = findings if findings.is_file() else ROOT / "docs" / "results_findings.md"
    text = findings.read_text() if findings.is_file() else "(no findings written yet)"
    ref = json.loads(REFERENCE.read_text())
    atomic_write_text(path, build_report(results, opts, text, ref))
    if write_runs:
        key = lambda r: (r["crop"], r["method"], r["fraction"], r["seed"])  # noqa: E731
        atomic_write_json(path.with_name(path.stem + "_runs.json"),
                          {"options": dict(opts), "runs": sorted(results, key=key)})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", help="training pool dataset")
    p.add_argument("--test", help="test dataset (labelled)")
    p.add_argument("--runs", help="folder for per-run results (resumable)")
    p.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    p.add_argument("--from-json", metavar="RUNS_JSON",
                   help="rewrite --out from a committed runs file (docs/results_runs.json: its "
                        "options and runs) without datasets or training")
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
    return p


def _options(args: argparse.Namespace, p: argparse.ArgumentParser,
             argv: Optional[List[str]]) -> Dict[str, Any]:
    """The experiment's options, recorded with the runs (sides, crop code version, command)."""
    from AnkleFractureLib.classification.crops import CROP_CODE_VERSION
    from AnkleFractureLib.dataset.layout import Dataset

    opts = {k: getattr(args, k) for k in ("pool", "test", "runs", "fractions", "seeds", "steps",
                                           "batch_size", "lr", "downsample", "widths",
                                           "threads", "workers")}
    if len(opts["downsample"]) == 1:
        opts["downsample"] = opts["downsample"][0]
    elif len(opts["downsample"]) != 3:
        p.error("--downsample takes one or three factors")
    opts["cache"] = args.cache or os.path.join(args.runs, "crops")
    opts["n_pool"] = len(Dataset.load(args.pool))
    opts["n_test"] = len(Dataset.load(args.test))
    opts.update({"pool_side": "dataset", "test_side": "detect",
                 "crop_code_version": CROP_CODE_VERSION})
    shown = [a for a in (argv or sys.argv[1:]) if a != "--report-only"]
    opts["command"] = "python " + " ".join(["scripts/cls_experiment.py"] + shown)
    return opts


def main(argv: Optional[List[str]] = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        write_report(data["runs"], data["options"], Path(args.out), write_runs=False)
        print(f"wrote {args.out} from {args.from_json} ({len(data['runs'])} runs)")
        return 0
    if not (args.pool and args.test and args.runs):
        p.error("--pool, --test and --runs are required (or --from-json)")
    opts = _options(args, p, argv)
    jobs = [(m, "registered", f, s, opts) for f in args.fractions for s in args.seeds
            for m in args.methods]
    if not args.no_raw:
        jobs += [("semi", "raw", f, s, opts) for f in args.fractions for s in args.seeds]
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
    write_report(results, opts, Path(args.out))
    print(f"wrote {args.out} ({len(results)} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
