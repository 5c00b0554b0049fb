"""The post-processing study script (scripts/seg_postprocess_study.py) and its committed page."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["rule7", "rule7b8", "rule9"])
def test_page_is_the_rendering_of_the_committed_files(monkeypatch, name):
    monkeypatch.chdir(ROOT)  # the page names its folder as given (repository-relative)
    mod = load_script("seg_postprocess_study")
    folder = Path("docs/seg_v2") / name
    assert (ROOT / folder / "README.md").read_text() == mod.page(folder)


def test_bone_row_counts_far_and_swapped_voxels():
    mod = load_script("seg_postprocess_study")
    truth = np.zeros((20, 20, 40), np.uint8)
    truth[:, 5:10, 5:10] = 1
    truth[:, 5:10, 12:14] = 2
    pred = truth.copy()
    pred[0:2, 5:10, 12:14] = 1           # 20 fibula voxels called tibia
    pred[:, 15:17, 30:35] = 2            # 200 voxels 16+ mm from the true fibula
    row = mod.bone_row(pred, truth, 2, (1.0, 1.0, 1.0), 0.001)
    assert row["swapped_ml"] == pytest.approx(0.02) and row["far_ml"] == pytest.approx(0.2)
    tib = mod.bone_row(pred, truth, 1, (1.0, 1.0, 1.0), 0.001)
    assert tib["far_ml"] == 0.0 and tib["swapped_ml"] == 0.0 and tib["dice"] < 1.0


def test_compare_names_the_changed_cases_and_the_largest_fall():
    mod = load_script("seg_postprocess_study")

    def case(i, sha, fib):
        return {"id": f"c{i}", "labels_sha1": sha, "tibia": {"dice": 0.95},
                "fibula": {"dice": fib}}

    before = {"cases": [case(0, "a", 0.9), case(1, "b", 0.5)]}
    after = {"cases": [case(0, "a", 0.9), case(1, "c", 0.45)]}
    assert mod.compare(before, after) == {"changed": ["c1"], "largest_dice_fall": 0.05}
    with pytest.raises(ValueError, match="case lists differ"):
        mod.compare(before, {"cases": [case(1, "b", 0.5), case(0, "a", 0.9)]})


def test_real_runs_reads_both_run_folders(tmp_path):
    """--real-runs: refusals, volumes and voxel counts of each run, and whether the maps are
    the same, from the files `ankle-fracture run` writes."""
    import json

    from AnkleFractureLib.geometry.volume import Volume
    from AnkleFractureLib.io import write_image

    mod = load_script("seg_postprocess_study")
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, 1, 1:4] = 1
    labels[2, 3, 3] = 2
    for name, arr in (("before", labels), ("after", np.zeros_like(labels))):
        folder = tmp_path / name
        folder.mkdir()
        write_image(Volume(arr, (1.0, 1.0, 2.0)), folder / "segmentation.nii.gz")
        (folder / "result.json").write_text(json.dumps(
            {"refused": True, "bones_ml": {"tibia": 0.006 if name == "before" else 0.0},
             "refusals": [f"{name} reason", "second"]}))
    got = mod.real_runs(tmp_path / "before", tmp_path / "after")
    assert got["runs"]["before"]["labelled_voxels"] == {"tibia": 3, "fibula": 1}
    assert got["runs"]["after"]["labelled_voxels"] == {"tibia": 0, "fibula": 0}
    assert got["runs"]["after"]["refusals"][0] == "after reason"
    assert got["label_maps_identical"] is False
    same = mod.real_runs(tmp_path / "after", tmp_path / "after")
    assert same["label_maps_identical"] is True
