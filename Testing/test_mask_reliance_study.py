"""scripts/mask_reliance_study.py: the closed fibula bridges a gap and nothing else; the page is
the rendering of the committed files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REPO_ROOT as ROOT
from conftest import load_script

FOLDER = ROOT / "docs" / "fracture" / "experiments" / "cls_v5_bridged_masks" / "mask_reliance"


@pytest.fixture(scope="module")
def study():
    return load_script("mask_reliance_study")


def test_closed_fibula_bridges_the_gap_and_leaves_the_tibia(study):
    lab = np.zeros((40, 20, 30), np.uint8)
    lab[:, 4:14, 2:12] = 1  # tibia
    lab[:, 6:11, 20:25] = 2  # fibula, 2 mm from nothing else
    lab[20:22, 6:11, 20:25] = 0  # a 2-slice (2 mm) fracture gap
    lab[5:8, 6:11, 13:15] = 0  # nothing there: the tibia is not touched anyway
    out = study.closed_fibula(lab, (1.0, 1.0, 1.0), close_mm=2.0)
    assert (out[20:22, 6:11, 20:25] == 2).all()  # the gap is bridged
    assert np.array_equal(out == 1, lab == 1)  # the tibia is unchanged
    assert ((out == 2) >= (lab == 2)).all()  # the fibula only grows
    assert (out == 2).sum() == (lab == 2).sum() + 2 * 5 * 5  # by the gap alone
    # A gap wider than twice the closing stays open.
    wide = lab.copy()
    wide[18:24, 6:11, 20:25] = 0
    assert (study.closed_fibula(wide, (1.0, 1.0, 1.0), 2.0)[18:24, 6:11, 20:25] == 0).any()


def test_page_is_the_rendering_of_the_committed_files(study, tmp_path):
    files = sorted(FOLDER.glob("*.json"))
    assert files, "no study file committed"
    for path in files:
        data = json.loads(path.read_text())
        assert data["n"] == len(data["cases"]) > 0
        for key in ("segmentation", "reference", "closed"):
            assert data["right"][key] == sum(c[key]["right"] for c in data["cases"])
        (tmp_path / path.name).write_text(path.read_text())
    shown = FOLDER.relative_to(ROOT).as_posix()
    text = study.write_page(tmp_path).read_text().replace(tmp_path.as_posix(), shown)
    assert (FOLDER / "README.md").read_text() == text, \
        f"stale: python scripts/mask_reliance_study.py --page {shown}"
