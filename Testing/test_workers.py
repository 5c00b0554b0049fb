"""Work in parallel processes: ``phantom --workers`` and ``evaluate-fracture --workers`` give
the same results as one process."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from AnkleFractureLib.cli.main import main
from AnkleFractureLib.errors import CancelledError
from AnkleFractureLib.phantom.dataset_writer import write_phantom_dataset


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_workers_write_the_same_bytes_as_one(tmp_path):
    args = ["phantom", "--n", "3", "--seed", "23", "--preview", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    assert main(args + ["--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    one, two = _digest(tmp_path / "one"), _digest(tmp_path / "two")
    assert len(one) == 1 + 3 * 3  # index + image, label and preview per case
    assert one == two
    index = json.loads((tmp_path / "two" / "dataset.json").read_text())
    assert [c["weber"] for c in index["cases"]] == ["none", "A", "B"]  # plan order kept


@pytest.mark.parametrize("workers", [1, 2])
def test_cancel_keeps_the_cases_written_so_far(tmp_path, workers):
    polls = []

    def cancel_after_two() -> bool:
        polls.append(1)
        return len(polls) > 2

    with pytest.raises(CancelledError, match="after 2 of 4"):
        write_phantom_dataset(tmp_path / "ds", n=4, seed=5, workers=workers,
                              should_cancel=cancel_after_two)
    index = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert [c["id"] for c in index["cases"]] == ["phantom_5_0000", "phantom_5_0001"]
    assert sorted(p.name for p in (tmp_path / "ds" / "images").iterdir()) == [
        "phantom_5_0000.nii.gz", "phantom_5_0001.nii.gz"]


def test_bad_worker_counts_are_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="workers must be at least 1"):
        write_phantom_dataset(tmp_path / "ds", n=1, seed=0, workers=0)
    with pytest.raises(SystemExit, match="--workers must be at least 1"):
        main(["phantom", "--out", str(tmp_path / "cli"), "--workers", "0", "--quiet"])
    assert not (tmp_path / "cli").exists()


@pytest.mark.slow
def test_evaluate_fracture_scores_the_same_with_two_workers(tmp_path):
    """``evaluate-fracture --workers 2``: the same rows, summary and models as one process."""
    data = tmp_path / "ds"
    assert main(["phantom", "--out", str(data), "--n", "2", "--seed", "77", "--quiet"]) == 0
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}.json"
        assert main(["evaluate-fracture", str(data), "--out", str(out), "--quiet",
                     "--workers", workers]) == 0
        outs.append(json.loads(out.read_text()))
    assert [r["id"] for r in outs[0]["cases"]] == ["phantom_77_0000", "phantom_77_0001"]
    for key in ("cases", "summary", "models"):
        assert outs[0][key] == outs[1][key]


def test_evaluate_fracture_refuses_a_bad_worker_count(tmp_path):
    from AnkleFractureLib.pipeline.evaluate import evaluate_fracture

    with pytest.raises(SystemExit, match="--workers must be at least 1"):
        main(["evaluate-fracture", str(tmp_path), "--workers", "0", "--quiet"])
    with pytest.raises(ValueError, match="workers must be at least 1"):
        evaluate_fracture(tmp_path, workers=0)


def test_fracture_crops_are_the_same_with_two_workers(tmp_path):
    """``train-fracture --workers``: the crop cache files hold the same arrays for any N, and a
    case that cannot be cropped is reported, not fatal."""
    import numpy as np

    from AnkleFractureLib.dataset import Dataset
    from AnkleFractureLib.training.fracture_data import build_fracture_crops, load_crop_file

    data = tmp_path / "ds"
    write_phantom_dataset(data, n=3, seed=31)
    ds = Dataset.load(data)
    first = ds.cases[0]
    from AnkleFractureLib.io import read_image

    ct = read_image(ds.path(first.image))
    label = read_image(ds.path(first.segmentation))
    ds.add_case("empty", ct, label.with_array(np.zeros(label.shape, np.uint8)), weber="none",
                side="right", source="test")
    results = {}
    for workers in (1, 2):
        paths, failed = build_fracture_crops(data, tmp_path / f"cache{workers}", "dataset",
                                             workers=workers)
        assert list(failed) == ["empty"]
        results[workers] = [load_crop_file(p) for p in paths]
    assert [r["info"]["id"] for r in results[1]] == [c.id for c in ds.cases[:3]]
    for a, b in zip(results[1], results[2]):
        assert a["info"] == b["info"]
        for key in ("channels", "target", "patient_to_template"):
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="workers must be at least 1"):
        build_fracture_crops(data, tmp_path / "cache0", "dataset", workers=0)


def test_in_processes_keeps_the_order_and_raises_a_tasks_error():
    from AnkleFractureLib.parallel import in_processes

    assert list(in_processes(pow, [(2, k) for k in range(7)], 2, ahead=3)) == [
        2 ** k for k in range(7)]
    results = in_processes(int, [("1",), ("x",), ("3",)], 2)
    assert next(results) == 1
    with pytest.raises(ValueError, match="invalid literal"):
        next(results)
