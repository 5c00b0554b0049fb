"""The Ray engine of ``batch`` on a local Ray runtime with 2 CPUs: rows and folders as the local
engine's, a worker killed in the middle of a case (retried; or, after the last retry, an error
row), Ctrl+C keeping the finished rows, the runtime started and shut down, the command line.

Skipped when Ray is not installed (``pip install "AnkleFractureLib[distributed]"``; CI installs
it through ``scripts/install.sh test``)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from AnkleFractureLib.cli.main import main
from AnkleFractureLib.errors import CancelledError
from AnkleFractureLib.io import write_image
from AnkleFractureLib.phantom import generate_case
from AnkleFractureLib.pipeline import ray_engine as R
from AnkleFractureLib.pipeline.batch import CSV_COLUMNS, discover_inputs, run_batch
from AnkleFractureLib.pipeline.pipeline import PipelineOptions

ray = pytest.importorskip("ray")

torch.set_num_threads(1)

#: The good cases: copies of one small phantom (a Weber B left ankle), so that they are
#: generated once and must all get the same answer.
GOOD = ("ankle_a", "ankle_b", "ankle_c")


def read_csv(path: Path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def crash_hook(monkeypatch, case_id: str, flag: Path, times: int) -> None:
    """Make the Ray worker that runs ``case_id`` exit abruptly mid-case on its first
    ``times`` attempts (attempts are counted in the file ``flag``)."""
    monkeypatch.setenv(R.CRASH_HOOK_ENV, json.dumps({"case": case_id, "file": str(flag),
                                                     "times": times}))


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """scans/ with three copies of one phantom and a corrupt ``bad.nii.gz``."""
    root = tmp_path_factory.mktemp("ray_in") / "scans"
    root.mkdir()
    write_image(generate_case(10, "B", "left", spacing="fast").ct, root / f"{GOOD[0]}.nii.gz")
    for name in GOOD[1:]:
        shutil.copy(root / f"{GOOD[0]}.nii.gz", root / f"{name}.nii.gz")
    (root / "bad.nii.gz").write_text("this is not a CT scan\n" * 10)
    return root


@pytest.fixture(scope="module")
def options(tiny_cls) -> PipelineOptions:
    return PipelineOptions(device="cpu", cls_model_dir=tiny_cls, tta=0)


@pytest.fixture(scope="module")
def runtime():
    """A local Ray runtime with 2 CPUs shared by the tests below (the batch then joins it and
    leaves it running)."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_batch(runtime, scans, options, tmp_path_factory):
    """3 phantoms + 1 corrupt file on 2 Ray workers; the worker running ankle_c is killed in
    the middle of that case on its first attempt."""
    out = tmp_path_factory.mktemp("ray_out") / "results"
    flag = out.parent / "crash_attempts.txt"
    with pytest.MonkeyPatch.context() as mp:
        crash_hook(mp, "ankle_c", flag, times=1)
        progress = []
        summary = run_batch(discover_inputs([scans]), out, options, engine="ray", workers=2,
                            progress=lambda f, m: progress.append((f, m)))
    return SimpleNamespace(out=out, summary=summary, progress=progress, flag=flag)


# ------------------------------------------------------------------------------ tests
def test_local_runtime_is_started_and_shut_down_and_ctrl_c_keeps_rows(options, tmp_path):
    if ray.is_initialized():
        ray.shutdown()
    cases = discover_inputs([tmp_path / "gone1.nrrd", tmp_path / "gone2.nrrd",
                             tmp_path / "gone3.nrrd"])
    seen = []

    def interrupt(fraction: float, message: str) -> None:
        seen.append(ray.is_initialized())
        if message.startswith("gone1 ("):  # Ctrl+C once the first case has its row
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(CancelledError):
        run_batch(cases, out, options, engine="ray", workers=1, progress=interrupt)
    assert seen[-1] is True and not ray.is_initialized()  # started for the batch, then stopped
    rows = read_csv(out / "results.csv")
    assert [r["id"] for r in rows] == ["gone1"] and rows[0]["status"] == "error"
    assert "does not exist" in rows[0]["error"]


def test_ray_rows_match_the_local_engines_columns_and_folders(ray_batch, scans):
    summary = ray_batch.summary
    rows = read_csv(ray_batch.out / "results.csv")
    assert list(rows[0]) == list(CSV_COLUMNS) and rows == summary.rows
    assert [r["id"] for r in rows] == list(GOOD) + ["bad"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "error"]
    assert (summary.n_ok, summary.n_error, summary.engine) == (3, 1, "ray")
    assert str(scans / "bad.nii.gz") in rows[3]["error"]
    assert "header" in rows[3]["error"] or "readable" in rows[3]["error"]
    assert (ray_batch.out / "bad" / "error.txt").is_file()
    # The same input on different workers (one of them a fresh one): the same answer.
    first = rows[0]
    for r in rows[:3]:
        assert r["prediction"] == first["prediction"] and r["side"] == "left"
        assert all(abs(float(r[f"p_{c}"]) - float(first[f"p_{c}"])) < 1e-3
                   for c in ("none", "A", "B", "C"))
        folder = ray_batch.out / r["id"]
        for name in ("result.json", "segmentation.nii.gz", "gradcam.nii.gz", "report.png"):
            assert (folder / name).is_file(), f"{r['id']}/{name}"
        data = json.loads((folder / "result.json").read_text())
        assert data["prediction"] == r["prediction"] and data["input"]["ct"] == r["path"]
    assert not [p for p in ray_batch.out.rglob(".*")]  # no temporary files left


def test_a_worker_killed_mid_case_is_retried_and_the_batch_completes(ray_batch):
    assert ray_batch.flag.read_text() == "xx"  # attempt 1 died mid-case, attempt 2 lived
    assert ray_batch.summary.retried == 1
    died = [m for _, m in ray_batch.progress if "worker died" in m]
    assert len(died) == 1 and died[0].startswith("ankle_c: its Ray worker died")
    assert {r["id"]: r["status"] for r in ray_batch.summary.rows}["ankle_c"] == "ok"


def test_progress_counts_cases_over_the_cluster(ray_batch):
    fractions = [f for f, _ in ray_batch.progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    counted = [m for _, m in ray_batch.progress if "/4): " in m]
    assert [m.split("(")[1].split(")")[0] for m in counted] == ["1/4", "2/4", "3/4", "4/4"]
    assert any(m == "starting 2 Ray workers" for _, m in ray_batch.progress)


def test_a_case_whose_worker_keeps_dying_becomes_an_error_row(runtime, scans, options,
                                                              tmp_path, monkeypatch):
    flag = tmp_path / "attempts.txt"
    crash_hook(monkeypatch, "ankle_a", flag, times=99)
    cases = [c for c in discover_inputs([scans]) if c.id in ("ankle_a", "bad")]
    summary = run_batch(cases, tmp_path / "out", options, engine="ray", workers=1,
                        max_retries=1)
    rows = {r["id"]: r for r in read_csv(tmp_path / "out" / "results.csv")}
    assert flag.read_text() == "xx"  # the first try and one retry, then no more
    assert summary.retried == 1 and summary.n_error == 2
    assert rows["ankle_a"]["status"] == "error"
    assert "Ray worker running this case died 2 times" in rows["ankle_a"]["error"]
    assert rows["bad"]["status"] == "error" and "bad.nii.gz" in rows["bad"]["error"]


def test_batch_command_with_the_ray_engine(runtime, ray_batch, scans, tiny_cls, tmp_path,
                                           capsys):
    out = ray_batch.out
    args = ["batch", str(scans), str(tmp_path / "gone.nii.gz"), "--out", str(out),
            "--engine", "ray", "--workers", "2", "--cls-model", str(tiny_cls),
            "--device", "cpu", "--tta", "0", "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    # Resumed: the three phantoms were finished by the fixture's batch; bad and gone ran.
    assert "5 cases, 3 of them from a previous run: 3 classified, 0 refused, 2 failed" in stdout
    rows = read_csv(out / "results.csv")
    assert [(r["id"], r["status"]) for r in rows][-1] == ("gone", "error")
    gpu_args = args[:4] + [str(tmp_path / "gpu")] + args[5:] + ["--gpus-per-worker", "1"]
    assert main(gpu_args) == 2
    assert "--gpus-per-worker 1: the Ray cluster has 0 GPUs" in capsys.readouterr().err
