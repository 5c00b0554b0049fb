"""``ankle-fracture batch``: input discovery, one shared batch run (good, corrupt and missing
inputs), resume, cancellation, the command line end to end, and worker processes (slow)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from AnkleFractureLib.classification.plans import CLASSES
from AnkleFractureLib.cli.main import main
from AnkleFractureLib.errors import CancelledError, InputError
from AnkleFractureLib.io import read_image, write_image
from AnkleFractureLib.phantom import generate_case
from AnkleFractureLib.pipeline import batch as B
from AnkleFractureLib.pipeline import pipeline as P
from AnkleFractureLib.pipeline.batch import BatchCase, discover_inputs, run_batch
from AnkleFractureLib.pipeline.pipeline import PipelineOptions
from io_corpus import write_ct_series

torch.set_num_threads(1)

#: The phantoms of the shared batch: (file stem, seed, class, side).
PHANTOMS = (("ankle_a", 1, "B", "right"), ("ankle_b", 10, "B", "left"))


def read_csv(path: Path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """scans/ with two good phantoms and a corrupt ``bad.nii.gz`` (text)."""
    root = tmp_path_factory.mktemp("batch_in") / "scans"
    for stem, seed, weber, side in PHANTOMS:
        write_image(generate_case(seed, weber, side, spacing="fast").ct, root / f"{stem}.nii.gz")
    (root / "bad.nii.gz").write_text("this is not a CT scan\n" * 10)
    return root


@pytest.fixture(scope="module")
def options(tiny_cls) -> PipelineOptions:
    return PipelineOptions(device="cpu", cls_model_dir=tiny_cls, tta=0)


@pytest.fixture(scope="module")
def batch(scans, options, tmp_path_factory):
    """One batch over scans/ plus a missing path, shared by the tests below."""
    out = tmp_path_factory.mktemp("batch_out") / "results"
    cases = discover_inputs([scans, scans.parent / "gone.nii.gz"])
    progress = []
    summary = run_batch(cases, out, options, progress=lambda f, m: progress.append((f, m)))
    return SimpleNamespace(cases=cases, out=out, summary=summary, progress=progress,
                           csv_text=(out / "results.csv").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def rerun(batch, options):
    """The same batch again (resume): the good cases are skipped, the errored one retried."""
    def mtimes():
        return {p.relative_to(batch.out).as_posix(): p.stat().st_mtime_ns
                for p in batch.out.rglob("*") if p.is_file()}

    before = mtimes()
    progress = []
    summary = run_batch(batch.cases, batch.out, options,
                        progress=lambda f, m: progress.append((f, m)))
    return SimpleNamespace(summary=summary, progress=progress, before=before, after=mtimes())


# ------------------------------------------------------------------------------ discovery
def test_discovery_of_files_folders_and_dicom(tmp_path):
    root = tmp_path / "data"
    for rel in ("a.nii.gz", "z_last.nrrd", "sub/ct one #2.nii.gz", "sub/deeper/a.nii.gz",
                "sub/vol.mhd", "sub/vol.raw", "sub/vol2.mhd", "sub/vol2.zraw", "notes.txt",
                ".hidden/x.nii.gz", "sub/.partial.nii.gz", "sub/A.nrrd"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / "empty_dir").mkdir()
    series = write_ct_series(root / "dicom_series")
    # Files without an extension: found by the DICM magic at byte 128.
    for k, p in enumerate(series["paths"]):
        p.rename(p.parent / f"IM{k:04d}")
    (root / "dicom_series" / "nested").mkdir()
    (root / "dicom_series" / "nested" / "not_a_case.nii.gz").write_bytes(b"x")
    write_ct_series(tmp_path / "other series")  # .dcm files, given directly
    cases = discover_inputs([root, tmp_path / "other series", root / "a.nii.gz",
                             str(tmp_path / "gone.nii.gz"), root / "sub" / ".." / "a.nii.gz"])
    got = [(c.id, c.kind, c.path.relative_to(tmp_path).as_posix()) for c in cases]
    assert got == [
        ("a", "file", "data/a.nii.gz"),
        ("dicom_series", "dicom", "data/dicom_series"),
        ("A_2", "file", "data/sub/A.nrrd"),  # unique regardless of the case of letters
        ("ct_one__2", "file", "data/sub/ct one #2.nii.gz"),
        ("a_3", "file", "data/sub/deeper/a.nii.gz"),
        ("vol", "file", "data/sub/vol.mhd"),  # its .raw is not a case
        ("vol2", "file", "data/sub/vol2.mhd"),
        ("z_last", "file", "data/z_last.nrrd"),
        ("other_series", "dicom", "other series"),
        ("gone", "missing", "gone.nii.gz"),  # the same a.nii.gz given twice is one case
    ]
    assert all(c.path.is_absolute() for c in cases)
    assert len({c.id.lower() for c in cases}) == len(cases)
    assert read_image(cases[1].path).shape == (12, 16, 16)  # the DICOM case is readable
    assert discover_inputs([root / "dicom_series"])[0].kind == "dicom"
    # The batch's own output folder inside an input folder is not searched.
    assert [c.id for c in discover_inputs([root / "sub"], exclude=[root / "sub" / "deeper"])
            ] == ["A", "ct_one__2", "vol", "vol2"]
    # Nothing usable: an error naming the folder, unless another input has a case.
    with pytest.raises(InputError, match="no CT image files or DICOM folders found") as exc:
        discover_inputs([root / "empty_dir"])
    assert exc.value.path == str(root / "empty_dir")
    assert [c.kind for c in discover_inputs([root / "empty_dir", tmp_path / "x.nrrd"])] == [
        "missing"]
    with pytest.raises(InputError):
        discover_inputs([])


# ------------------------------------------------------------------------------ the batch
def test_batch_rows_for_good_corrupt_and_missing_inputs(batch, scans):
    summary = batch.summary
    rows = read_csv(batch.out / "results.csv")
    assert batch.csv_text.splitlines()[0] == ",".join(B.CSV_COLUMNS)
    assert rows == summary.rows and summary.csv_path == batch.out / "results.csv"
    assert [r["id"] for r in rows] == ["ankle_a", "ankle_b", "bad", "gone"]
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "error"]
    assert (summary.n_ok, summary.n_refused, summary.n_error, summary.n_skipped) == (2, 0, 2, 0)
    assert summary.seconds > 0 and summary.warnings == []
    sides = {stem: side for stem, _, _, side in PHANTOMS}
    for r in rows[:2]:
        probs = {c: float(r[f"p_{c}"]) for c in CLASSES}
        assert abs(sum(probs.values()) - 1.0) <= 1e-3
        assert r["prediction"] in CLASSES and probs[r["prediction"]] == max(probs.values())
        assert r["unsure"] in ("true", "false") and r["side"] == sides[r["id"]]
        assert r["error"] == "" and r["refusal"] == "" and float(r["seconds"]) > 0
        folder = batch.out / r["id"]
        for name in ("result.json", "segmentation.nii.gz", "gradcam.nii.gz"):
            assert (folder / name).is_file(), name
        assert not (folder / "error.txt").exists()
        data = json.loads((folder / "result.json").read_text())
        assert data["input"]["ct"] == r["path"] == str(scans / f"{r['id']}.nii.gz")
        assert data["prediction"] == r["prediction"]
    bad, gone = rows[2], rows[3]
    assert str(scans / "bad.nii.gz") in bad["error"] and not bad["error"].startswith("internal")
    assert "gone.nii.gz" in gone["error"] and "does not exist" in gone["error"]
    for r in (bad, gone):
        assert r["prediction"] == r["p_none"] == r["unsure"] == ""
        assert bad["error"] in (batch.out / "bad" / "error.txt").read_text()
        assert not (batch.out / r["id"] / "result.json").exists()
    assert not [p for p in batch.out.rglob(".*")]  # no temporary files left


def test_batch_progress_is_monotonic_and_names_cases_and_stages(batch):
    fractions = [f for f, _ in batch.progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert all(0.0 <= f <= 1.0 for f in fractions)
    messages = [m for _, m in batch.progress]
    for cid in ("ankle_a", "ankle_b", "bad", "gone"):
        assert any(m.startswith(f"{cid} (") for m in messages), cid
    assert any(m.startswith("ankle_b (2/4): segmentation") for m in messages)
    # The second case's stage messages lie in the second quarter of the batch.
    second = [f for f, m in batch.progress if m.startswith("ankle_b (")]
    assert 0.25 <= min(second) and max(second) <= 0.5


def test_rerun_skips_finished_cases_and_retries_errors(batch, rerun):
    summary = rerun.summary
    assert summary.n_skipped == 2 and (summary.n_ok, summary.n_error) == (2, 2)
    for cid in ("ankle_a", "ankle_b"):
        for name in ("result.json", "segmentation.nii.gz", "gradcam.nii.gz"):
            key = f"{cid}/{name}"
            assert rerun.after[key] == rerun.before[key], key
        assert not any(m.startswith(f"{cid} (") for _, m in rerun.progress)
    assert rerun.after["bad/error.txt"] != rerun.before["bad/error.txt"]  # retried
    assert any(m.startswith("bad (3/4)") for _, m in rerun.progress)
    # The rebuilt rows equal the first run's (seconds: the analysis time of result.json).
    first = list(csv.DictReader(io.StringIO(batch.csv_text)))
    for old, new in zip(first, summary.rows):
        assert {k: v for k, v in old.items() if k != "seconds"} == \
            {k: v for k, v in new.items() if k != "seconds"}
    assert read_csv(batch.out / "results.csv") == summary.rows


def test_resume_runs_again_what_changed(batch, tmp_path):
    # A result.json for another input, or older than its input, does not count as finished.
    case = batch.cases[0]
    data = json.loads((batch.out / case.id / "result.json").read_text())
    assert B._finished_result(case, batch.out, {}) is not None
    moved = BatchCase(case.id, tmp_path / "elsewhere.nii.gz", "file")
    shutil.copy(case.path, moved.path)
    os.utime(moved.path, (0, 0))
    assert B._finished_result(moved, batch.out, {}) is None
    assert B._finished_result(case, batch.out, {"classification": "0" * 64}) is None
    assert data["models"]["classification"]["used"] is True
    fake_out = tmp_path / "out"
    (fake_out / case.id).mkdir(parents=True)
    data["input"]["ct"] = str(moved.path)
    (fake_out / case.id / "result.json").write_text(json.dumps(data))
    os.utime(moved.path, (0, 0))
    assert B._finished_result(moved, fake_out, {}) is not None
    os.utime(moved.path, None)  # the input is newer than its result
    os.utime(fake_out / case.id / "result.json", (1, 1))
    assert B._finished_result(moved, fake_out, {}) is None


def test_cancel_and_interrupt_keep_the_finished_rows(options, tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not a scan\n")
    cases = discover_inputs([bad, tmp_path / "gone1.nrrd", tmp_path / "gone2.nrrd"])
    calls = []

    def should_cancel() -> bool:  # polled before each case: cancel before the second
        calls.append(1)
        return len(calls) >= 2

    out = tmp_path / "out"
    with pytest.raises(CancelledError):
        run_batch(cases, out, options, should_cancel=should_cancel)
    assert [r["id"] for r in read_csv(out / "results.csv")] == ["bad"]

    def interrupt(fraction: float, message: str) -> None:
        if message.startswith("gone1"):
            raise KeyboardInterrupt

    with pytest.raises(CancelledError):
        run_batch(cases, out, options, progress=interrupt)
    assert [r["id"] for r in read_csv(out / "results.csv")] == ["bad"]


def test_internal_errors_are_rows_with_a_traceback(options, scans, tmp_path, monkeypatch):
    def boom(self, ct, progress=None, should_cancel=None, **kwargs):
        raise ZeroDivisionError("the pipeline broke")

    monkeypatch.setattr(P.Pipeline, "run", boom)
    case = BatchCase("x", scans / "ankle_a.nii.gz", "file")
    summary = run_batch([case], tmp_path / "out", options)
    row = summary.rows[0]
    assert row["status"] == "error"
    assert row["error"] == "internal error: ZeroDivisionError: the pipeline broke"
    text = (tmp_path / "out" / "x" / "error.txt").read_text()
    assert "Traceback" in text and "ZeroDivisionError" in text


# ------------------------------------------------------------------------------ command line
def test_batch_command_end_to_end(scans, tiny_cls, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["batch", str(scans / "ankle_a.nii.gz"), str(tmp_path / "gone.nii.gz"),
               "--out", str(out), "--cls-model", str(tiny_cls), "--device", "cpu",
               "--tta", "0", "--quiet", "--pdf"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    stdout = captured.out
    rows = read_csv(out / "results.csv")
    assert [(r["id"], r["status"]) for r in rows] == [("ankle_a", "ok"), ("gone", "error")]
    assert f"wrote {out / 'results.csv'}" in stdout
    assert "2 cases: 1 classified, 0 refused, 1 failed" in stdout
    pred = rows[0]["prediction"]
    assert ("no fracture" if pred == "none" else f"Weber {pred}") in stdout
    assert "does not exist" in stdout
    assert (out / "ankle_a" / "report.pdf").read_bytes()[:5] == b"%PDF-"
    # Again: resumed, nothing to run for the finished case.
    assert main(["batch", str(scans / "ankle_a.nii.gz"), "--out", str(out), "--quiet",
                 "--cls-model", str(tiny_cls), "--device", "cpu", "--tta", "0"]) == 0
    assert "1 of them from a previous run" in capsys.readouterr().out


def test_batch_command_user_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["batch", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no CT image files or DICOM folders found" in capsys.readouterr().err
    assert main(["batch", str(tmp_path), "--out", str(tmp_path / "o"), "--workers", "0"]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_batch_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["batch", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for key in ("--out", "--workers", "--side", "--device", "--tta", "--seg-model",
                "--cls-model", "--template", "--no-resume", "--pdf", "--quiet", "results.csv",
                "refused", "example", "--engine", "--ray-address", "--gpus-per-worker",
                "--cpus-per-worker", "--max-retries", "--shard", "--collect",
                "AnkleFractureLib[distributed]", "results.shard-K-of-N.csv"):
        assert key in out, key


def test_ray_engine_without_ray_says_how_to_install_it(options, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # "import ray" now fails as if not installed
    hint = 'pip install "AnkleFractureLib[distributed]"'
    assert main(["batch", str(tmp_path), "--out", str(tmp_path / "o"), "--engine", "ray"]) == 2
    assert hint in capsys.readouterr().err
    with pytest.raises(InputError, match=re.escape(hint)):
        run_batch(discover_inputs([tmp_path / "gone.nrrd"]), tmp_path / "o", options,
                  engine="ray")
    assert not (tmp_path / "o").exists()  # nothing written
    # The local engine does not need Ray.
    summary = run_batch(discover_inputs([tmp_path / "gone.nrrd"]), tmp_path / "o", options)
    assert [r["status"] for r in summary.rows] == ["error"] and summary.engine == "local"


def test_engine_and_shard_option_errors(options, tmp_path, capsys):
    (tmp_path / "a.nii.gz").write_text("x")
    base = ["batch", str(tmp_path / "a.nii.gz"), "--out", str(tmp_path / "o")]
    for extra, message in ((["--gpus-per-worker", "1"], "--gpus-per-worker: only with --engine "
                                                         "ray"),
                           (["--ray-address", "auto"], "--ray-address: only with --engine ray"),
                           (["--shard", "3/2"], "shard 3/2: K must lie in 1..N"),
                           (["--shard", "1-2"], "--shard must be K/N"),
                           (["--shard", "1/2", "--collect"], "--collect gathers every shard")):
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    with pytest.raises(SystemExit):
        main(base + ["--engine", "spark"])
    capsys.readouterr()
    assert not (tmp_path / "o").exists()
    with pytest.raises(InputError, match="unknown batch engine 'spark'"):
        run_batch(discover_inputs([tmp_path / "a.nii.gz"]), tmp_path / "o", options,
                  engine="spark")


# ------------------------------------------------------------------------------ workers
@pytest.mark.slow
def test_workers_give_the_same_rows(batch, scans, options, tmp_path):
    cases = discover_inputs([scans, scans.parent / "gone.nii.gz"])
    progress = []
    summary = run_batch(cases, tmp_path / "out", options, workers=2,
                        progress=lambda f, m: progress.append((f, m)))
    assert [r["id"] for r in summary.rows] == ["ankle_a", "ankle_b", "bad", "gone"]
    assert read_csv(tmp_path / "out" / "results.csv") == summary.rows
    first = {r["id"]: r for r in batch.summary.rows}
    for r in summary.rows:
        assert r["status"] == first[r["id"]]["status"] and r["error"] == first[r["id"]]["error"]
        if r["status"] == "ok":
            assert r["prediction"] == first[r["id"]]["prediction"]
            for c in CLASSES:
                assert abs(float(r[f"p_{c}"]) - float(first[r["id"]][f"p_{c}"])) < 0.02
            assert (tmp_path / "out" / r["id"] / "gradcam.nii.gz").is_file()
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
