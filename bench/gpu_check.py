"""GPU check: every CUDA path of the project run on a real GPU, with its figures.

Usage: python bench/gpu_check.py --json docs/gpu/gpu_check.json [--work DIR] [--skip STEP ...]
       [--update]

CI never has a GPU, so the CUDA paths (segmentation inference with autocast, the three training
commands with ``--device cuda`` and their deterministic mode, the CUDA-only tests) are run here
on a machine that has one. Each step is timed and its outcome recorded; a step that fails is
recorded with its error and the next one still runs. The JSON is rewritten after every step, so
a run cut short keeps what it measured.

Steps:

* ``tests``: the pytest files that hold CUDA-only tests (skipped elsewhere);
* ``segment``: one clinical-size phantom (512 x 512 x >= 350) segmented on the CPU and on the
  GPU: Dice between the two label maps per bone, GPU seconds (median of 3 warm runs, model
  loaded once) and CPU seconds (one run);
* ``pipeline``: ``bench/pipeline.py --device cuda`` (warm in-process runs and the cold command);
* ``train-seg``, ``train-cls``, ``train-fracture``: the same short run twice with one seed on
  the GPU (4 small phantoms); the weights of the two runs are compared (bit-identical, or the
  largest absolute difference) and the recorded determinism settings kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

#: Device of the training steps (``--device``; "cpu" only to try this script without a GPU).
DEVICE = "cuda"
STEPS = ("segment", "train-seg", "train-cls", "train-fracture", "pipeline", "tests")
#: pytest files with tests that run only where CUDA is available.
CUDA_TEST_FILES = ("Testing/test_fracture_localise.py", "Testing/test_cls_augment.py",
                   "Testing/test_segmentation_inference.py", "Testing/test_determinism.py")


def _cli(*args: str, timeout: float = 300) -> str:
    """Run ``python -m AnkleFractureLib ARGS``; its output, or RuntimeError with the tail."""
    proc = subprocess.run([sys.executable, "-m", "AnkleFractureLib", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} exit {proc.returncode}: "
                           f"{(proc.stdout + proc.stderr)[-1500:]}")
    return proc.stdout + proc.stderr


def environment() -> Dict[str, Any]:
    """Python, torch, CUDA, cuDNN and the GPU's name."""
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), gpus=torch.cuda.device_count())
    return env


def step_tests(work: Path) -> Dict[str, Any]:
    """The CUDA-only tests (and the rest of their files)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-rs", *CUDA_TEST_FILES], cwd=REPO, capture_output=True, text=True,
                          timeout=400)
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    return {"exit_code": proc.returncode, "summary": tail[-1] if tail else "",
            "skipped": [ln for ln in tail if ln.startswith("SKIPPED")][:20],
            "failures": [ln for ln in tail if ln.startswith(("FAILED", "ERROR"))][:20]}


def _dice(a: Any, b: Any, label: int) -> float:
    x, y = a == label, b == label
    denom = int(x.sum()) + int(y.sum())
    return 1.0 if denom == 0 else 2.0 * int((x & y).sum()) / denom


def step_segment(work: Path) -> Dict[str, Any]:
    """CPU vs GPU label maps of one clinical-size phantom, and their timings."""
    import torch
    from _common import write_clinical_ct

    from AnkleFractureLib.io import read_image
    from AnkleFractureLib.segmentation.inference import SegmentationModel

    ct = read_image(write_clinical_ct(str(work), 11, max_inplane_mm=0.38))
    cpu_model = SegmentationModel.load(device="cpu")
    t0 = time.perf_counter()
    cpu = cpu_model.predict(ct).array
    cpu_s = time.perf_counter() - t0
    gpu_model = SegmentationModel.load(device="cuda")
    gpu_model.predict(ct)  # warm-up: CUDA context, kernels
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gpu = gpu_model.predict(ct).array
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"ct_voxels_xyz": list(ct.size), "cpu_threads": torch.get_num_threads(),
            "cpu_seconds": round(cpu_s, 2), "gpu_seconds_median": round(statistics.median(times), 3),
            "gpu_seconds": [round(t, 3) for t in times],
            "dice_cpu_vs_gpu": {"tibia": round(_dice(cpu, gpu, 1), 5),
                                "fibula": round(_dice(cpu, gpu, 2), 5)},
            "voxels_differing": int((cpu != gpu).sum())}


def step_pipeline(work: Path) -> Dict[str, Any]:
    """``bench/pipeline.py --device cuda``: its printed figures."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "pipeline.py"), "--device",
                           "cuda", "--runs", "3"], cwd=REPO, capture_output=True, text=True,
                          timeout=400)
    if proc.returncode != 0:
        raise RuntimeError(f"bench/pipeline.py exit {proc.returncode}: {proc.stderr[-1500:]}")
    return {"printed": proc.stdout.strip().splitlines()[-30:]}


def _dataset(work: Path) -> Path:
    """Four small labelled phantoms (one per Weber class), made once."""
    data = work / "phantoms"
    if not (data / "dataset.json").is_file():
        _cli("phantom", "--out", str(data), "--n", "4", "--seed", "3", "--spacing", "fast",
             "--quiet")
    return data


def _compare_weights(a: Path, b: Path) -> Dict[str, Any]:
    """Bit-identical, or the largest absolute difference, between two model.pt files."""
    import torch

    sa = torch.load(a, map_location="cpu", weights_only=False)["state_dict"]
    sb = torch.load(b, map_location="cpu", weights_only=False)["state_dict"]
    diffs = [float((sa[k].float() - sb[k].float()).abs().max()) for k in sa
             if sa[k].is_floating_point()]
    return {"tensors": len(sa), "identical": all(torch.equal(sa[k], sb[k]) for k in sa),
            "max_abs_difference": max(diffs) if diffs else 0.0}


def _twice(work: Path, name: str, make_args: Callable[[Path], List[str]]) -> Dict[str, Any]:
    """Run one training command twice with the same seed on the GPU; compare the weights."""
    runs, seconds, warned = [], [], set()
    for tag in ("a", "b"):
        out = work / f"{name}_{tag}"
        t0 = time.perf_counter()
        printed = _cli(*make_args(out), timeout=300)
        # PyTorch's warnings for ops that have no deterministic CUDA kernel.
        warned |= {ln.strip()[:300] for ln in printed.splitlines() if "determinis" in ln}
        seconds.append(round(time.perf_counter() - t0, 1))
        runs.append(out)
    report = json.loads((runs[0] / "training.json").read_text())
    result = {"seconds": seconds, "weights": _compare_weights(runs[0] / "model.pt",
                                                              runs[1] / "model.pt")}
    for key in ("device", "determinism"):
        if key in report:
            result[key] = report[key]
    result["nondeterminism_warnings"] = sorted(warned)
    return result


def step_train_seg(work: Path) -> Dict[str, Any]:
    data = _dataset(work)
    return _twice(work, "seg", lambda out: [
        "train-seg", str(data), "--out", str(out), "--epochs", "2", "--steps-per-epoch", "5",
        "--patch-size", "64", "64", "64", "--val-fraction", "0.25", "--seed", "3",
        "--randomise", "full", "--device", DEVICE, "--quiet"])


def step_train_cls(work: Path) -> Dict[str, Any]:
    data = _dataset(work)
    return _twice(work, "cls", lambda out: [
        "train-cls", str(data), "--out", str(out), "--method", "supervised", "--steps", "10",
        "--batch-size", "4", "--val-fraction", "0.25", "--seed", "3", "--workers", "2",
        "--cache-dir", str(work / "cls_cache"), "--device", DEVICE, "--quiet"])


def step_train_fracture(work: Path) -> Dict[str, Any]:
    data = _dataset(work)
    return _twice(work, "frac", lambda out: [
        "train-fracture", str(data), "--out", str(out), "--cache-dir", str(work / "frac_cache"),
        "--steps", "20", "--eval-every", "10", "--val-fraction", "0.25", "--seed", "3",
        "--device", DEVICE, "--quiet"])


STEP_FUNCS = {"tests": step_tests, "segment": step_segment, "pipeline": step_pipeline,
              "train-seg": step_train_seg, "train-cls": step_train_cls,
              "train-fracture": step_train_fracture}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="results file (rewritten after each step)")
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    parser.add_argument("--skip", nargs="*", default=[], choices=STEPS)
    parser.add_argument("--update", action="store_true",
                        help="keep the other steps already in --json (rerun some steps only)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="device of the training steps (cpu: a dry run of this script)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = {"command": "python bench/gpu_check.py --json " + args.json,
                               "environment": environment(), "steps": {}}
    if args.update and Path(args.json).is_file():
        results["steps"] = json.loads(Path(args.json).read_text())["steps"]
    for name in STEPS:
        if name in args.skip:
            continue
        t0 = time.perf_counter()
        try:
            entry = {"ok": True, **STEP_FUNCS[name](work)}
        except Exception as exc:  # noqa: BLE001 - a failed step is a result; the next still runs
            entry = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-2000:],
                     "trace": traceback.format_exc()[-1500:]}
        entry["wall_s"] = round(time.perf_counter() - t0, 1)
        results["steps"][name] = entry
        print(f"{name}: {json.dumps(entry)[:1500]}", flush=True)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
