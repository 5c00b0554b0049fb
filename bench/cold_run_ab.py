"""Cold ``ankle-fracture run`` of two checkouts, interleaved on the same host.

The cold-run goal (<= 9 s on 2 cores, ``bench/pipeline.py``) is measured on a shared host whose
speed drifts by 20-30 % between hours: a figure from one day and another from the next cannot
say whether the code or the host moved. This runs a baseline checkout and this one in
alternation (A B A B ...) on one clinical-size phantom, each as a fresh
``python -m AnkleFractureLib run`` with ``PYTHONPATH`` set to its checkout, and prints each
run's wall time and peak memory, the medians and the change.

Usage::

    git worktree add /tmp/baseline <commit>
    .venv/bin/python bench/cold_run_ab.py --baseline /tmp/baseline --pairs 5

The phantom is ``bench/pipeline.py``'s (seed 19, 512 x 512 x 365 at 0.37 x 0.37 x 0.51 mm),
generated once in a child process (not timed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from typing import List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pipeline import _LAUNCHER, _phantom_in_child  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cold_run(checkout: str, ct_path: str, out: str, err_path: str) -> Tuple[float, float]:
    """Wall time (s) and peak RSS (MB) of one cold run of ``checkout``'s library."""
    env = dict(os.environ, PYTHONPATH=checkout)
    args = [sys.executable, "-m", "AnkleFractureLib", "run", ct_path, "--out", out, "--quiet"]
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", _LAUNCHER, err_path] + args,
                          check=True, capture_output=True, text=True, env=env, cwd=checkout)
    wall, rss_kib, code = proc.stdout.split()
    if int(code) != 0:
        with open(err_path, encoding="utf-8", errors="replace") as fh:
            raise SystemExit(f"{checkout}: run failed (exit {code}): {fh.read()[-2000:]}")
    return float(wall), float(rss_kib) / 1024.0


def _library_of(checkout: str) -> str:
    """Where ``checkout``'s PYTHONPATH makes ``AnkleFractureLib`` come from (a check that the
    run really uses that checkout, not an installed copy)."""
    code = "import AnkleFractureLib, os; print(os.path.dirname(AnkleFractureLib.__file__))"
    env = dict(os.environ, PYTHONPATH=checkout)
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True, env=env, cwd=checkout).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="checkout to compare with (a folder)")
    parser.add_argument("--pairs", type=int, default=5, help="baseline/this run pairs")
    parser.add_argument("--seed", type=int, default=19)
    args = parser.parse_args()
    trees = {"baseline": os.path.abspath(args.baseline), "this": REPO}
    for name, tree in trees.items():
        lib = _library_of(tree)
        if os.path.realpath(lib) != os.path.realpath(os.path.join(tree, "AnkleFractureLib")):
            raise SystemExit(f"{name}: PYTHONPATH={tree} imports AnkleFractureLib from {lib}")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        ct_path = _phantom_in_child(tmp, args.seed)
        walls: dict = {name: [] for name in trees}
        for i in range(args.pairs):
            for name, tree in trees.items():
                wall, rss = _cold_run(tree, ct_path, os.path.join(tmp, f"out_{name}_{i}"),
                                      os.path.join(tmp, "stderr.txt"))
                walls[name].append(wall)
                print(f"pair {i + 1} {name:8s} {wall:6.2f} s  peak RSS {rss:5.0f} MB", flush=True)
    med = {name: statistics.median(v) for name, v in walls.items()}
    runs: List[str] = [f"{name} ({trees[name]}) median {med[name]:.2f} s "
                       f"(min {min(walls[name]):.2f}, max {max(walls[name]):.2f})"
                       for name in trees]
    print("\n".join(runs))
    print(f"change: {med['this'] - med['baseline']:+.2f} s "
          f"({100 * (med['this'] / med['baseline'] - 1):+.0f} %) on the same host")
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
