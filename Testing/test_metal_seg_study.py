"""The fixation-hardware study script (scripts/metal_seg_study.py) and its committed page."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "docs" / "metal"


def _script():
    return load_script("metal_seg_study")


def test_page_is_the_rendering_of_the_committed_files(monkeypatch):
    monkeypatch.chdir(ROOT)  # the page names its folder as given (repository-relative)
    mod = _script()
    assert (FOLDER / "README.md").read_text() == mod.page(Path("docs/metal"))
    commands = json.loads((FOLDER / "commands.json").read_text())
    for f in FOLDER.glob("*.json"):
        if f.name not in ("commands.json", "experiment.json"):
            assert f.name in commands, f"{f.name} has no command in commands.json"


def test_plated_slices_dice_and_summary():
    mod = _script()
    ct = np.zeros((10, 30, 30), np.float32)
    lab = np.zeros((10, 30, 30), np.uint8)
    lab[:, 10:15, 10:15] = 2
    ct[3:5, 10:15, 17:19] = 3000.0  # a plate 2 voxels from the fibula, slices 3-4
    ct[8, 0:2, 28:30] = 3000.0      # metal far away (28 mm at 1 mm voxels): not a plated slice
    plated = mod.plated_slices(ct, lab, (1.0, 1.0, 1.0))
    assert plated.tolist() == [False] * 3 + [True] * 2 + [False] * 5
    assert mod.dice(lab == 2, lab == 2) == 1.0 and mod.dice(lab == 1, lab == 1) is None
    rows = [{"hardware": "plate", "tibia_dice": 0.9, "fibula_dice": 0.5, "fibula_dice_plated": 0.4},
            {"hardware": "screws", "tibia_dice": 0.95, "fibula_dice": 0.9,
             "fibula_dice_plated": None}]
    s = mod.summary(rows)
    assert s["n_plate"] == 1 and s["fibula_dice_plate_cases"] == 0.5
    assert s["fibula_dice"] == 0.7 and s["fibula_dice_plated_slices"] == 0.4
    assert s["fibula_dice_min"] == 0.5


def test_last_weights_of_a_run_become_a_model_folder(tmp_path):
    import subprocess
    import sys

    import torch
    from test_seg_training import TINY_PLANS

    from AnkleFractureLib.segmentation.model_io import load_model
    from AnkleFractureLib.segmentation.network import build_network

    run = tmp_path / "run"
    run.mkdir()
    (run / "plans.json").write_text(json.dumps(TINY_PLANS.to_json()))
    torch.manual_seed(3)
    net = build_network(TINY_PLANS.network)
    torch.save({"model": net.state_dict(), "epoch": 4, "global_step": 200},
               run / "checkpoint.pt")
    out = tmp_path / "last"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "seg_checkpoint_to_model.py"),
                           str(run), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    state = load_model(out)[0].state_dict()
    for key, value in net.state_dict().items():
        assert torch.allclose(state[key].float(), value.half().float(), atol=1e-3), key
    missing = subprocess.run([sys.executable, str(ROOT / "scripts" / "seg_checkpoint_to_model.py"),
                              str(tmp_path), "--out", str(out)], capture_output=True, text=True)
    assert missing.returncode != 0 and "no checkpoint" in missing.stderr
