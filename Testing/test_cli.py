"""The ankle-fracture command line: help, phantom datasets, demo, clear errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from AnkleFractureLib.cli.main import main
from AnkleFractureLib.phantom.dataset_writer import case_plan


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("cmd", [[], ["phantom"], ["demo"], ["info"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main(cmd + ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: ankle-fracture" in out
    if cmd:
        assert "example" in out


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "AnkleFractureLib", "--version"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0 and "ankle-fracture" in res.stdout


def test_info_missing_file_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope.nii.gz"
    assert main(["info", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err


def test_info_on_a_non_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "notes.nii.gz"
    bad.write_text("not an image")
    res = subprocess.run([sys.executable, "-m", "AnkleFractureLib", "info", str(bad)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 2
    assert str(bad) in res.stderr and "Traceback" not in res.stderr


def test_case_plan_balances_classes_and_alternates_sides():
    plan = case_plan(16, seed=3)
    assert Counter(c["weber"] for c in plan) == {"none": 4, "A": 4, "B": 4, "C": 4}
    by_class = {w: Counter(c["side"] for c in plan if c["weber"] == w) for w in "none A B C".split()}
    assert all(v == {"left": 2, "right": 2} for v in by_class.values())
    fixed = case_plan(4, seed=3, weber="B")
    assert [c["side"] for c in fixed] == ["right", "left", "right", "left"]
    assert {c["weber"] for c in fixed} == {"B"}
    assert {c["side"] for c in case_plan(3, seed=3, side="left")} == {"left"}
    assert len({c["seed"] for c in plan}) == 16
    mixed = case_plan(10, seed=1, spacing="mixed")
    assert [c["spacing"] for c in mixed].count("clinical") == 2


def test_phantom_command_writes_a_dataset_deterministically(tmp_path, capsys):
    args = ["phantom", "--n", "2", "--seed", "11", "--preview", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    index = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert [c["weber"] for c in index["cases"]] == ["none", "A"]
    assert [c["side"] for c in index["cases"]] == ["right", "left"]
    for c in index["cases"]:
        assert (tmp_path / "a" / c["image"]).is_file()
        assert (tmp_path / "a" / c["segmentation"]).is_file()
        assert (tmp_path / "a" / "previews" / f"{c['id']}.png").is_file()
    # Same seed, same bytes (images, labels, previews and the index).
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_preload_thread_imports_the_model_and_report_code():
    """`run` overlaps the torch / networks / matplotlib imports with reading the CT."""
    import sys

    from AnkleFractureLib.cli.common import preload_models_code

    thread = preload_models_code()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert {"torch", "AnkleFractureLib.networks", "matplotlib.figure"} <= set(sys.modules)


def test_run_never_imports_monai(tmp_path):
    """A cold ``ankle-fracture run`` (shipped models, all stages, the report) runs on the
    plain-torch twins of the MONAI networks: MONAI's ~2 s package import is never paid."""
    import subprocess
    import sys

    from AnkleFractureLib.io import write_image
    from AnkleFractureLib.phantom import generate_case

    write_image(generate_case(3, "B", "right", spacing="fast").ct, tmp_path / "ct.nii.gz")
    code = ("import sys; from AnkleFractureLib.cli.main import main; "
            "rc = main(['run', sys.argv[1], '--out', sys.argv[2], '--device', 'cpu', "
            "'--quiet']); "
            "print('MONAI:', sorted(m for m in sys.modules if m.split('.')[0] == 'monai')); "
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ct.nii.gz"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MONAI: []" in proc.stdout, proc.stdout[-2000:]
    assert (tmp_path / "out" / "result.json").is_file()
    assert (tmp_path / "out" / "report.png").is_file()


def test_run_waits_for_the_preloaded_imports_before_the_pipeline(tmp_path, monkeypatch):
    """``run`` imports torch and the networks in a background thread while it reads the CT;
    the pipeline (which imports them in the main thread) must start only after that thread
    finished, or a cross-thread import-lock cycle can hand it a partially initialised module."""
    import numpy as np

    from AnkleFractureLib.cli import run_cmd
    from AnkleFractureLib.geometry.volume import Volume
    from AnkleFractureLib.io import write_image
    from AnkleFractureLib.pipeline.pipeline import Pipeline

    events = []

    class Preload:
        def join(self, timeout=None):
            events.append("join")

    def fake_run(self, ct, **kwargs):
        events.append("run")
        raise KeyboardInterrupt  # stop here: only the order matters

    write_image(Volume(np.full((4, 4, 4), -1000, np.int16)), tmp_path / "ct.nii.gz")
    def preload(pipeline=False):
        events.append(f"preload (pipeline: {pipeline})")
        return Preload()

    monkeypatch.setattr(run_cmd, "preload_models_code", preload)
    monkeypatch.setattr(Pipeline, "run", fake_run)
    assert main(["run", str(tmp_path / "ct.nii.gz"), "--out", str(tmp_path / "out"),
                 "--quiet"]) != 0  # the CLI reports the interruption
    assert events == ["preload (pipeline: True)", "join", "run"]
