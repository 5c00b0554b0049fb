"""One stage of the pipeline as a job (:mod:`AnkleFractureLib.pipeline.job`): the request file,
the progress protocol, each stage's output files, and the separate process the Slicer module
starts (JSON progress lines on stdout, ``job_error.json``, exit codes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from AnkleFractureLib.crop.syndesmosis import box_on_grid
from AnkleFractureLib.errors import CancelledError, InputError
from AnkleFractureLib.io import read_image, write_image
from AnkleFractureLib.phantom import generate_case
from AnkleFractureLib.pipeline.job import (ERROR_FILE, STAGES, JobRequest, load_handoff,
                                           parse_progress, progress_line, run_job, run_stage)
from AnkleFractureLib.pipeline.pipeline import Pipeline, PipelineOptions

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def _files(folder: Path) -> set:
    return {p.name for p in folder.iterdir() if p.is_file()}


def _job_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m AnkleFractureLib.pipeline.job ARGS`` with the checkout on the path."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "AnkleFractureLib.pipeline.job", *args],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=cwd)


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def case():
    """A fast Weber B left phantom."""
    return generate_case(10, "B", "left", spacing="fast")


@pytest.fixture(scope="module")
def pipe(tiny_cls) -> Pipeline:
    """One pipeline for every in-process stage (its models load once)."""
    return Pipeline(PipelineOptions(device="cpu", cls_model_dir=tiny_cls, tta=0))


@pytest.fixture(scope="module")
def ct_file(case, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("job_ct") / "ct.nii.gz"
    write_image(case.ct, path)
    return path


# ------------------------------------------------------------------------------ the request
def test_request_round_trips_through_its_file(tmp_path):
    """Every field survives write -> read, and the file is plain JSON of to_json()."""
    req = JobRequest(stage="classify", ct="in/ct.nii.gz", out="out dir", label="in/label.nii.gz",
                     side="left", device="cpu", tta=3, seg_model_dir="models/seg",
                     cls_model_dir="models/cls", report_pdf=True)
    path = tmp_path / "request.json"
    req.write(path)
    assert JobRequest.read(path) == req
    assert json.loads(path.read_text()) == req.to_json()
    assert JobRequest.from_json(req.to_json()) == req
    # Only the three required keys: the rest take their defaults.
    short = JobRequest.from_json({"stage": "all", "ct": "a", "out": "b"})
    assert (short.label, short.side, short.device, short.tta, short.report_pdf) == (
        None, "auto", "auto", None, False)
    opts = req.options()
    assert (opts.side, opts.device, opts.tta, opts.seg_model_dir, opts.cls_model_dir) == (
        "left", "cpu", 3, "models/seg", "models/cls")


@pytest.mark.parametrize("data, words", [
    ({"stage": "segment", "ct": "a", "out": "b", "ouput": "c"}, "unknown job request keys: ouput"),
    ({"stage": "segment", "out": "b"}, "lacks ct"),
    ({"ct": "a"}, "lacks stage, out"),
    (["segment", "a", "b"], "must be a JSON object"),
])
def test_bad_request_names_the_file(tmp_path, data, words):
    path = tmp_path / "request.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=words) as exc:
        JobRequest.read(path)
    assert exc.value.path == str(path) and str(path) in str(exc.value)


def test_bad_stage_in_a_request_file_names_the_file(tmp_path):
    path = tmp_path / "request.json"
    path.write_text(json.dumps({"stage": "everything", "ct": "a", "out": "b"}))
    with pytest.raises(InputError, match="stage must be one of") as exc:
        JobRequest.read(path)
    assert str(path) in str(exc.value)


def test_bad_stage_is_an_input_error():
    with pytest.raises(InputError, match="stage must be one of segment, register, classify, all"):
        JobRequest(stage="everything", ct="a", out="b")
    with pytest.raises(InputError, match="stage must be one of"):
        JobRequest.from_json({"stage": "Segment", "ct": "a", "out": "b"})


def test_unreadable_request_file_names_the_path(tmp_path):
    missing = tmp_path / "no such request.json"
    with pytest.raises(InputError, match="does not exist") as exc:
        JobRequest.read(missing)
    assert str(missing) in str(exc.value)
    broken = tmp_path / "broken.json"
    broken.write_text('{"stage": "segment", "ct": ')
    with pytest.raises(InputError, match="not readable JSON") as exc:
        JobRequest.read(broken)
    assert str(broken) in str(exc.value)


# ------------------------------------------------------------------------------ progress
def test_parse_progress_takes_the_last_complete_record():
    lines = [progress_line(0.1, "a"), progress_line(0.42, "b"), '{"progress": 0.9, "mess']
    assert parse_progress(lines) == {"progress": 0.42, "message": "b"}
    assert parse_progress(lines[:1]) == {"progress": 0.1, "message": "a"}
    # Lines that are JSON but not progress records (or not JSON at all) do not count.
    assert parse_progress(['{"other": 1}', "warning: something", "[0.5]"]) is None
    assert parse_progress([]) is None
    assert parse_progress(['{"progr']) is None


def test_progress_line_is_one_json_line():
    line = progress_line(0.123456, 'reading "ct"\nnow')
    assert "\n" not in line
    assert json.loads(line) == {"progress": 0.1235, "message": 'reading "ct"\nnow'}


# ------------------------------------------------------------------------------ stages
@pytest.fixture(scope="module")
def segmented(pipe, case, tmp_path_factory):
    """The "segment" stage once, with its progress."""
    out = tmp_path_factory.mktemp("stage_segment")
    seen = []
    result = run_stage("segment", case.ct, out, pipeline=pipe,
                       progress=lambda f, m: seen.append(f))
    return out, result, seen


def test_segment_stage_writes_only_the_segmentation(segmented, case):
    out, result, seen = segmented
    assert _files(out) == {"result.json", "segmentation.nii.gz"}
    assert json.loads((out / "result.json").read_text()) == result
    assert not result["refused"], result["refusal"]
    assert result["files"] == ["segmentation.nii.gz"]
    assert result["registration"] is None and result["prediction"] is None
    assert seen and seen == sorted(seen) and seen[-1] == 1.0
    label = read_image(out / "segmentation.nii.gz")
    assert label.same_geometry(case.ct, atol=1e-4) and label.array.dtype == np.uint8
    assert set(np.unique(label.array)) == {0, 1, 2}


def test_register_stage_uses_the_given_label(pipe, case, tmp_path):
    out = tmp_path / "register"
    result = run_stage("register", case.ct, out, label=case.label, pipeline=pipe)
    assert not result["refused"], result["refusal"]
    assert _files(out) == {"result.json", "segmentation.nii.gz", "transform.json",
                           "transform.tfm", "syndesmosis_crop.nii.gz"}
    used = read_image(out / "segmentation.nii.gz")
    assert used.same_geometry(case.ct, atol=1e-4)
    assert np.array_equal(used.array, case.label.array)  # not re-segmented
    assert result["prediction"] is None and result["probabilities"] is None
    assert result["side"] == "left" and result["registration"] is not None
    assert 0.9 < result["crop_coverage"] <= 1.0
    assert json.loads((out / "result.json").read_text())["prediction"] is None


def test_classify_stage_writes_heatmap_report_and_probabilities(pipe, case, tmp_path):
    out = tmp_path / "classify"
    result = run_stage("classify", case.ct, out, label=case.label, pipeline=pipe)
    assert not result["refused"], result["refusal"]
    # fracture_line.nii.gz only when the localiser found a line.
    line = {"fracture_line.nii.gz"} if result["fracture"]["found"] else set()
    assert {"gradcam.nii.gz", "report.png", "result.json", "segmentation.nii.gz",
            "transform.json", "transform.tfm", "syndesmosis_crop.nii.gz"} | line == _files(out)
    probs = result["probabilities"]
    assert list(probs) == ["none", "A", "B", "C"]
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
    assert result["prediction"] in probs
    heat = read_image(out / "gradcam.nii.gz")
    assert box_on_grid(heat, case.ct, atol=1e-4) is not None  # the crop's box on the CT grid
    assert 0.0 <= heat.array.min() and heat.array.max() <= 1.0
    assert np.array_equal(read_image(out / "segmentation.nii.gz").array, case.label.array)

    # Register again into the same folder: the heatmap and report of the old run go.
    again = run_stage("register", case.ct, out, label=case.label, pipeline=pipe)
    assert again["prediction"] is None
    assert "gradcam.nii.gz" not in _files(out) and "report.png" not in _files(out)


def test_handoff_arrays_equal_the_written_files_and_never_go_stale(pipe, case, tmp_path):
    """The raw arrays handed to the Slicer module are the NIfTI outputs' voxels (the heatmap
    saved inside its non-zero box only); a later stage that makes no heatmap leaves no old
    heatmap behind."""
    out, handoff = tmp_path / "out", tmp_path / "handoff"
    run_stage("classify", case.ct, out, label=case.label, pipeline=pipe, handoff=handoff)
    assert sorted(p.name for p in handoff.iterdir()) == ["gradcam.npz", "segmentation.npz"]
    for key, file in (("label", "segmentation.nii.gz"), ("gradcam", "gradcam.nii.gz")):
        raw = load_handoff(handoff, key)
        written = read_image(out / file)
        assert raw.dtype == written.array.dtype and np.array_equal(raw, written.array)
    from AnkleFractureLib.geometry.arrays import bounding_box

    box = bounding_box(written.array)
    with np.load(handoff / "gradcam.npz") as data:  # only the heatmap's non-zero box
        assert data["values"].shape == tuple(b.stop - b.start for b in box)
        assert data["values"].size < written.array.size
    run_stage("register", case.ct, out, label=case.label, pipeline=pipe, handoff=handoff)
    assert sorted(p.name for p in handoff.iterdir()) == ["segmentation.npz"]
    assert load_handoff(handoff, "gradcam") is None


def test_stage_names_and_cancel(pipe, case, tmp_path):
    assert STAGES == ("segment", "register", "classify", "all")
    with pytest.raises(InputError, match="stage must be one of"):
        run_stage("crop", case.ct, tmp_path / "x", pipeline=pipe)
    with pytest.raises(InputError, match="stop_after"):
        pipe.run(case.ct, stop_after="bogus")
    with pytest.raises(CancelledError):
        run_stage("register", case.ct, tmp_path / "c", label=case.label, pipeline=pipe,
                  should_cancel=lambda: True)
    assert not (tmp_path / "c" / "result.json").exists()
    assert not (tmp_path / "x").exists()


def test_run_job_reads_the_request_files(pipe, case, ct_file, tmp_path):
    """run_job reads the CT and the label map the request names; "segment" ignores the label."""
    label_file = tmp_path / "label.nii.gz"
    write_image(case.label, label_file)
    req = JobRequest(stage="register", ct=str(ct_file), out=str(tmp_path / "out"),
                     label=str(label_file), device="cpu", tta=0)
    seen = []
    result = run_job(req, pipeline=pipe, progress=lambda f, m: seen.append((f, m)))
    assert seen[0] == (0.0, "reading the CT") and seen[-1][0] == 1.0
    assert not result["refused"] and result["registration"] is not None
    assert result["input"]["ct"] == os.path.abspath(ct_file)
    missing = JobRequest(stage="register", ct=str(ct_file), out=str(tmp_path / "out2"),
                         label=str(tmp_path / "missing.nii.gz"))
    with pytest.raises(InputError, match="missing.nii.gz"):
        run_job(missing, pipeline=pipe)


# ------------------------------------------------------------------------------ the process
def test_process_missing_ct_exits_2_and_writes_job_error(tmp_path):
    missing = tmp_path / "no such ct.nii.gz"
    out = tmp_path / "out"
    request = tmp_path / "request.json"
    JobRequest(stage="segment", ct=str(missing), out=str(out), device="cpu").write(request)
    proc = _job_process(str(request), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr
    error = json.loads((out / ERROR_FILE).read_text())
    assert error["kind"] == "input" and str(missing) in error["error"]
    assert not (out / "result.json").exists()


def test_process_bad_request_file_exits_2(tmp_path):
    broken = tmp_path / "request.json"
    broken.write_text("{not json")
    proc = _job_process(str(broken), cwd=tmp_path)
    assert proc.returncode == 2
    assert str(broken) in proc.stderr and "Traceback" not in proc.stderr


def test_process_segment_streams_progress_and_writes_the_segmentation(ct_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ERROR_FILE).write_text('{"kind": "input", "error": "an older failed run"}')
    request = tmp_path / "request.json"
    JobRequest(stage="segment", ct=str(ct_file), out=str(out), device="cpu").write(request)
    proc = _job_process(str(request), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) > 3
    records = [json.loads(line) for line in lines]  # every line is one JSON record
    assert all(set(r) == {"progress", "message"} for r in records)
    fractions = [r["progress"] for r in records]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert parse_progress(lines) == records[-1]
    assert (out / "segmentation.nii.gz").is_file()
    assert not (out / ERROR_FILE).exists()  # the stale error of an earlier run is gone
    result = json.loads((out / "result.json").read_text())
    assert result["files"] == ["segmentation.nii.gz"] and not result["refused"]


def test_process_help_and_usage(tmp_path):
    proc = _job_process("--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "usage: python -m AnkleFractureLib.pipeline.job REQUEST.json" in proc.stderr
    proc = _job_process(cwd=tmp_path)
    assert proc.returncode == 2 and "usage:" in proc.stderr
    proc = _job_process("a.json", "b.json", cwd=tmp_path)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_serve_answers_requests_one_after_another(tmp_path, ct_file):
    """``--serve``: one process, requests on stdin, a done record per request (bad ones too)."""
    good1 = JobRequest(stage="segment", ct=str(ct_file), out=str(tmp_path / "out1"),
                       device="cpu")
    bad = JobRequest(stage="segment", ct=str(tmp_path / "missing.nii.gz"),
                     out=str(tmp_path / "out_bad"), device="cpu")
    good2 = JobRequest(stage="segment", ct=str(ct_file), out=str(tmp_path / "out2"),
                       device="cpu")
    lines = []
    for name, req in (("r1", good1), ("bad", bad), ("r2", good2)):
        req.write(tmp_path / f"{name}.json")
        lines.append(f"{tmp_path / f'{name}.json'}\t{tmp_path / f'{name}.jsonl'}\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "AnkleFractureLib.pipeline.job", "--serve"],
                          input="".join(lines), capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    done = {}
    for name in ("r1", "bad", "r2"):
        records = [json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert records[-1]["done"] is True
        done[name] = records[-1]
        fractions = [r["progress"] for r in records[:-1]]
        assert fractions == sorted(fractions)
    assert done["r1"]["exit"] == 0 and done["r2"]["exit"] == 0
    assert done["bad"]["exit"] == 2 and "missing.nii.gz" in done["bad"]["error"]
    assert (tmp_path / "out1" / "segmentation.nii.gz").is_file()
    assert (tmp_path / "out2" / "segmentation.nii.gz").is_file()
