"""How steady the localiser's line model is: refit on bootstrap resamples of the validation cases.

Usage:
    python scripts/line_model_bootstrap.py --fit VAL.json [VAL2.json ...] --shipped MODEL_DIR \
        --features NAME=f1,f2,... [NAME=...] [--boots 40] [--seed 0] [--out FILE.json]

For each feature set and each resample (cases drawn with replacement), the line model alone is
fitted again (``fracture_rule_study.refit_line_model``: every other key of the MODEL_DIR
decision in force) and the whole decision is scored on the cases left out of the resample
(out of bag). A line model whose weights swing from resample to resample, or whose out-of-bag
answers fall below its in-sample ones, has learned the validation lines rather than the
fractures. Prints one line per feature set and writes the figures to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fracture_rule_study as study  # noqa: E402


def bootstrap(rows: Sequence[Dict[str, Any]], decision: Dict[str, Any],
              features: Sequence[str], boots: int, seed: int) -> Dict[str, Any]:
    """Weights and out-of-bag scores of the line model on ``features`` over ``boots``
    resamples of ``rows`` (seeded), beside the fit on every row.

    Returns:
        {"weights": the fit on all rows, "weights_sd": their spread over the resamples,
        "in_sample": score on all rows, "oob_mean" / "oob_sd": out-of-bag accuracy, found
        rate and found-on-intact rate}.
    """
    full = study.refit_line_model(rows, decision, features)  # first: refuses a rule without one
    rng = np.random.default_rng(seed)
    n = len(rows)
    weights: List[List[float]] = []
    oob: List[List[float]] = []
    for _ in range(boots):
        drawn = rng.integers(0, n, n)
        left = sorted(set(range(n)) - set(drawn.tolist()))
        # the line model alone: refit_line_model would also score the resample, unused here
        model = study.fit_line_model([rows[i] for i in drawn], features)
        s = study.score([rows[i] for i in left], {**decision, "line_model": model})
        weights.append(model["weights"])
        oob.append([s["accuracy"], s["found_rate"] or 0.0, s["found_on_none_rate"] or 0.0])
    w, o = np.array(weights), np.array(oob)
    return {"features": list(features), "weights": full["rule"]["line_model"]["weights"],
            "weights_sd": w.std(axis=0).round(3).tolist(), "in_sample": full["fit_scores"],
            "oob_mean": dict(zip(("accuracy", "found_rate", "found_on_none_rate"),
                                 o.mean(axis=0).round(4).tolist())),
            "oob_sd": dict(zip(("accuracy", "found_rate", "found_on_none_rate"),
                               o.std(axis=0).round(4).tolist()))}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", nargs="+", required=True, help="validation evaluations")
    parser.add_argument("--shipped", required=True, metavar="MODEL_DIR",
                        help="the decision (plans.json) whose line model is refitted")
    parser.add_argument("--features", nargs="+", required=True, metavar="NAME=f1,f2,...",
                        help="feature sets to compare (names of weber_height.FEATURES)")
    parser.add_argument("--boots", type=int, default=40, help="resamples (default 40)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file for the figures")
    args = parser.parse_args(argv)
    if args.boots < 2:
        parser.error("--boots must be at least 2")
    sets = {}
    for item in args.features:
        name, _, names = item.partition("=")
        feats = [f.strip() for f in names.split(",") if f.strip()]
        unknown = sorted(set(feats) - set(study.FEATURES))
        if not name or not feats or unknown:
            parser.error(f"--features {item!r}: give NAME=f1,f2,... from {sorted(study.FEATURES)}")
        sets[name] = feats
    decision = json.loads(Path(args.shipped, "plans.json").read_text())["decision"]
    rows = study.evaluation_rows(args.fit)
    result = {"command": "python scripts/line_model_bootstrap.py " + shlex.join(
        sys.argv[1:] if argv is None else argv), "boots": args.boots, "seed": args.seed,
        "fit_sets": list(args.fit), "cases": len(rows), "sets": {}}
    for name, feats in sets.items():
        r = bootstrap(rows, decision, feats, args.boots, args.seed)
        result["sets"][name] = r
        print(f"{name:<16} weights {r['weights']} sd {r['weights_sd']}; in sample "
              f"{r['in_sample']['accuracy']:.3f} / {r['in_sample']['found_on_none_rate']:.3f}; "
              f"out of bag accuracy {r['oob_mean']['accuracy']:.3f}, found "
              f"{r['oob_mean']['found_rate']:.3f}, on intact "
              f"{r['oob_mean']['found_on_none_rate']:.3f}", flush=True)
    if args.out:
        from AnkleFractureLib.io import atomic_write_json

        atomic_write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
