"""Write ``docs/gpu/README.md`` from ``docs/gpu/gpu_check.json`` (``bench/gpu_check.py``'s output).

Usage: python scripts/gpu_check_page.py [--json docs/gpu/gpu_check.json] [--out docs/gpu/README.md]

Every figure on the page is read from the JSON; nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]

HEADER = """# GPU check

CI has no GPU. The CUDA paths were run on a lent GPU machine by `bench/gpu_check.py`, whose
JSON output is `gpu_check.json` beside this page; this page is written from it by
`python scripts/gpu_check_page.py`. The machine ran the repository's code under its own
Python and PyTorch build (below), with SimpleITK, MONAI and pydicom carried as wheels.

Command (on the GPU machine, repository root):

    python bench/gpu_check.py --json docs/gpu/gpu_check.json
    # after a fix, one step again, the others kept:
    python bench/gpu_check.py --json docs/gpu/gpu_check.json --update --skip segment \\
        train-seg train-fracture pipeline tests
"""


def _environment(env: Dict[str, Any]) -> List[str]:
    return ["## Machine", "",
            f"- GPU: {env.get('gpu')} ({env.get('gpus')} visible), CUDA {env.get('cuda')}, "
            f"cuDNN {env.get('cudnn')}",
            f"- Python {env.get('python')}, torch {env.get('torch')}", ""]


def _segment(s: Dict[str, Any]) -> List[str]:
    if not s.get("ok"):
        return ["## Segmentation inference", "", f"Failed: {s.get('error')}", ""]
    x, y, z = s["ct_voxels_xyz"]
    d = s["dice_cpu_vs_gpu"]
    return ["## Segmentation inference (CPU vs GPU)", "",
            f"One clinical-size phantom ({x} x {y} x {z} voxels), the shipped model, sliding "
            "window with bf16/fp16 autocast on the GPU:", "",
            f"- GPU: median {s['gpu_seconds_median']} s over {len(s['gpu_seconds'])} warm runs "
            f"(model loaded once); CPU ({s['cpu_threads']} threads of that machine): "
            f"{s['cpu_seconds']} s",
            f"- agreement of the GPU label map with the CPU one: Dice tibia {d['tibia']}, "
            f"fibula {d['fibula']} ({s['voxels_differing']} voxels differ)", ""]


def _training(steps: Dict[str, Any]) -> List[str]:
    rows = ["## Training on the GPU: the same seed twice", "",
            "Each command ran twice with one seed on 4 small phantoms (short runs); the two "
            "`model.pt` files are compared tensor by tensor.", "",
            "| command | device | seconds (run 1, run 2) | weights identical | largest difference "
            "| PyTorch non-determinism warnings |", "| --- | --- | --- | --- | --- | --- |"]
    for name in ("train-seg", "train-cls", "train-fracture"):
        s = steps.get(name)
        if s is None:
            continue
        if not s.get("ok"):
            rows.append(f"| `{name}` | failed: {s.get('error', '')[:200]} | | | | |")
            continue
        w = s["weights"]
        warns = s.get("nondeterminism_warnings")
        rows.append(f"| `{name}` | {s.get('device')} | {s['seconds'][0]}, {s['seconds'][1]} | "
                    f"{'yes' if w['identical'] else 'no'} ({w['tensors']} tensors) | "
                    f"{w['max_abs_difference']:g} | "
                    f"{'not recorded' if warns is None else len(warns)} |")
    return rows + [""]


def _pipeline(s: Dict[str, Any]) -> List[str]:
    if not s.get("ok"):
        return ["## Whole pipeline", "", f"Failed: {s.get('error')}", ""]
    return ["## Whole pipeline (`bench/pipeline.py --device cuda --runs 3`)", "",
            "As printed on the GPU machine:", "", "```"] + s["printed"] + ["```", ""]


def _tests(s: Dict[str, Any]) -> List[str]:
    lines = ["## CUDA-only tests", "", "`" + s.get("summary", "") + "`"
             + (f", exit code {s.get('exit_code')}" if s.get("exit_code") else "")]
    lines += [f"- {ln}" for ln in s.get("failures", []) + s.get("skipped", [])]
    return lines + [""]


def render(results: Dict[str, Any]) -> str:
    steps = results["steps"]
    parts = [HEADER] + _environment(results["environment"])
    if "segment" in steps:
        parts += _segment(steps["segment"])
    parts += _training(steps)
    if "pipeline" in steps:
        parts += _pipeline(steps["pipeline"])
    if "tests" in steps:
        parts += _tests(steps["tests"])
    return "\n".join(parts).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=str(ROOT / "docs" / "gpu" / "gpu_check.json"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "gpu" / "README.md"))
    args = ap.parse_args()
    text = render(json.loads(Path(args.json).read_text()))
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
