"""scripts/merge_datasets.py: linked cases, unique ids, and --twice's model-mask copies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "merge_datasets.py"


def _dataset(folder: Path, ids: list) -> Path:
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    cases = []
    for i in ids:
        (folder / "images" / f"{i}.nii.gz").write_bytes(b"image " + i.encode())
        (folder / "labels" / f"{i}.nii.gz").write_bytes(b"label " + i.encode())
        cases.append({"id": i, "image": f"images/{i}.nii.gz",
                      "segmentation": f"labels/{i}.nii.gz", "weber": "B", "side": "left"})
    (folder / "dataset.json").write_text(json.dumps({"format_version": 1, "cases": cases}))
    return folder


def _merge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60)


def test_merge_links_cases_and_lists_twice_without_labels(tmp_path):
    a = _dataset(tmp_path / "a", ["a0", "a1"])
    b = _dataset(tmp_path / "b", ["b0"])
    out = tmp_path / "merged"
    res = _merge(str(a), str(b), "--out", str(out), "--twice", str(b))
    assert res.returncode == 0, res.stderr
    cases = json.loads((out / "dataset.json").read_text())["cases"]
    assert [c["id"] for c in cases] == ["a0", "a1", "b0", "b0_predseg"]
    copy = cases[-1]
    assert copy["segmentation"] is None and copy["image"] == "images/b0.nii.gz"
    assert copy["weber"] == "B" and copy["side"] == "left"
    assert (out / "images" / "b0.nii.gz").read_bytes() == b"image b0"
    assert (out / "labels" / "a1.nii.gz").is_symlink()


def test_merge_refuses_clashing_ids_and_unknown_twice(tmp_path):
    a = _dataset(tmp_path / "a", ["x"])
    b = _dataset(tmp_path / "b", ["x"])
    res = _merge(str(a), str(b), "--out", str(tmp_path / "m"))
    assert res.returncode != 0 and "case id x is in both" in res.stderr
    res = _merge(str(a), "--out", str(tmp_path / "m2"), "--twice", str(b))
    assert res.returncode != 0 and "not inputs" in res.stderr
