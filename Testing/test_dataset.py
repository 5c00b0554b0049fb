"""The dataset layout: write, update without duplicates, validate on load."""

from __future__ import annotations

import json

import numpy as np
import pytest

from AnkleFractureLib.dataset import Dataset
from AnkleFractureLib.errors import InputError
from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.io import read_image


def _case(seed=0):
    rng = np.random.default_rng(seed)
    ct = Volume(rng.integers(-1000, 1500, (6, 7, 8)).astype(np.int16), (0.8, 0.8, 1.5), (1, 2, 3))
    lab = ct.with_array((ct.array > 800).astype(np.uint8) + (ct.array > 1200))
    return ct, lab


def test_add_load_and_update_in_place(tmp_path):
    ds = Dataset.create(tmp_path / "ds", name="t")
    ct, lab = _case()
    ds.add_case("c1", ct, lab, weber="B", side="left", source="test", meta={"k": 1})
    ds.add_case("c2", ct, None, weber=None, side=None, source="test")
    loaded = Dataset.load(tmp_path / "ds")
    assert [c.id for c in loaded] == ["c1", "c2"]
    assert loaded.get("c1").weber == "B" and loaded.get("c1").meta == {"k": 1}
    assert loaded.get("c2").segmentation is None
    assert loaded.counts()["unlabelled"] == 1 and loaded.counts()["segmented"] == 1
    img = read_image(loaded.path(loaded.get("c1").image))
    assert img.same_geometry(ct) and np.array_equal(img.array, ct.array)
    seg = read_image(loaded.path(loaded.get("c1").segmentation))
    assert seg.array.dtype == np.uint8 and np.array_equal(seg.array, lab.array)

    # The same case again is updated, not duplicated.
    ct2, _ = _case(1)
    loaded.add_case("c1", ct2, None, weber="C", side="left", source="test")
    again = Dataset.load(tmp_path / "ds")
    assert [c.id for c in again] == ["c1", "c2"]
    assert again.get("c1").weber == "C" and again.get("c1").segmentation is None
    assert not (tmp_path / "ds" / "labels" / "c1.nii.gz").exists()
    data = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert data["labels"] == {"background": 0, "tibia": 1, "fibula": 2}
    assert data["classes"] == ["none", "A", "B", "C"]
    # No temporary files are left behind by the atomic writes.
    leftovers = [p.name for p in (tmp_path / "ds").rglob("*") if "tmp" in p.name]
    assert leftovers == []


@pytest.mark.parametrize("kwargs, word", [
    ({"case_id": "bad id!"}, "case id"),
    ({"weber": "D"}, "weber"),
    ({"side": "middle"}, "side"),
])
def test_bad_case_fields_are_refused(tmp_path, kwargs, word):
    ds = Dataset.create(tmp_path)
    ct, lab = _case()
    args = {"case_id": "ok", "image": ct, "label": lab}
    args.update(kwargs)
    with pytest.raises(InputError, match=word):
        ds.add_case(**args)
    assert len(Dataset.load(tmp_path)) == 0


def test_label_off_grid_or_bad_values_refused(tmp_path):
    ds = Dataset.create(tmp_path)
    ct, lab = _case()
    shifted = Volume(lab.array, lab.spacing, (9, 9, 9))
    with pytest.raises(InputError, match="grid"):
        ds.add_case("a", ct, shifted)
    with pytest.raises(InputError, match="label values"):
        ds.add_case("a", ct, lab.with_array(np.full(lab.shape, 7, np.uint8)))


@pytest.mark.parametrize("content, word", [
    ("{not json", "cannot read"),
    ('{"cases": 3}', "cases"),
    ('{"cases": [{"id": "x"}]}', "image"),
    ('{"cases": [], "labels": {"bone": 1}}', "labels"),
    ('{"cases": [{"id": "a", "image": "i"}, {"id": "a", "image": "j"}]}', "twice"),
])
def test_load_rejects_bad_index(tmp_path, content, word):
    (tmp_path / "dataset.json").write_text(content)
    with pytest.raises(InputError, match=word) as err:
        Dataset.load(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_load_missing(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        Dataset.load(tmp_path / "nope")
    with pytest.raises(InputError, match="dataset.json is missing"):
        Dataset.load(tmp_path)
