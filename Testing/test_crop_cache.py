"""The classifier's crop cache: computed once, keyed by everything a crop depends on (the case
files, the segmentation model for model masks, the template's content, the crop code version,
the side policy): changing any one recomputes, unchanged ones hit the cache. Evaluation crops
detect the side as `run` does."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from AnkleFractureLib.classification import crops as crops_mod
from AnkleFractureLib.classification.crops import cache_key, load_crops, template_content_key
from AnkleFractureLib.dataset import Dataset
from AnkleFractureLib.phantom import generate_case
from AnkleFractureLib.registration.template import load_template
from AnkleFractureLib.resources import resource_path
from AnkleFractureLib.segmentation.inference import default_model_dir
from conftest import REPO_ROOT


def test_cache_key_covers_model_template_code_version_and_side(tmp_path, monkeypatch):
    case = generate_case(3, "B", "right", spacing="fast")
    ds = Dataset.create(tmp_path / "ds")
    ds.add_case("seg", case.ct, case.label, weber="B", side="right")
    ds.add_case("noseg", case.ct, None, weber="B", side="right")
    seg, noseg = ds.get("seg"), ds.get("noseg")

    # A case with a label map never depends on a segmentation model; one without does.
    assert cache_key(ds, seg, "registered", "t") == cache_key(ds, seg, "registered", "t", "m1")
    assert cache_key(ds, noseg, "registered", "t", "m1") != cache_key(ds, noseg, "registered",
                                                                      "t", "m2")
    # A new post-processing rule recomputes the model-mask crops only.
    model_masks = cache_key(ds, noseg, "registered", "t", "m1")
    monkeypatch.setattr(crops_mod, "POSTPROCESS_VERSION", crops_mod.POSTPROCESS_VERSION + 1)
    assert cache_key(ds, noseg, "registered", "t", "m1") != model_masks
    assert cache_key(ds, seg, "registered", "t", "m1") == cache_key(ds, seg, "registered", "t")
    monkeypatch.undo()
    base = cache_key(ds, seg, "registered", "t")
    assert cache_key(ds, seg, "registered", "t2") != base  # template content / box
    assert cache_key(ds, seg, "registered", "t", side="dataset") != base  # side policy
    monkeypatch.setattr(crops_mod, "CROP_CODE_VERSION", crops_mod.CROP_CODE_VERSION + 1)
    assert cache_key(ds, seg, "registered", "t") != base  # crop / registration code
    monkeypatch.undo()
    assert cache_key(ds, seg, "registered", "t") == base
    # Under "detect" the dataset's side is not used, so it is not in the key; under "dataset"
    # it is.
    other_side = dataclasses.replace(seg, side="left")
    assert cache_key(ds, other_side, "registered", "t") == base
    assert (cache_key(ds, other_side, "registered", "t", side="dataset")
            != cache_key(ds, seg, "registered", "t", side="dataset"))
    with pytest.raises(ValueError):
        cache_key(ds, seg, "registered", "t", side="given")


def test_template_key_hashes_the_files_of_the_template_in_use(tmp_path):
    shipped = Path(load_template().meta["path"])
    copy = tmp_path / "tpl"
    shutil.copytree(shipped, copy)
    # Same bytes elsewhere: same key (content, not path); one byte more: another key.
    assert template_content_key(copy) == template_content_key(None)
    index = copy / "template.json"
    data = json.loads(index.read_text())
    data.setdefault("meta", {})["edited"] = True
    index.write_text(json.dumps(data))
    assert template_content_key(copy) != template_content_key(None)
    for name in ("healthy_right_ankle", "healthy_right_ankle_vh"):
        if Path(resource_path("Templates", name)).is_dir():  # whatever templates are shipped
            folder = Path(resource_path("Templates", name))
            assert template_content_key(folder) == template_content_key(folder)


def _messages(ds, cache, **kwargs):
    """load_crops' progress messages and the crops."""
    messages = []
    out = load_crops(ds, cache, progress=lambda f, m: messages.append(m), **kwargs)
    return messages[0], out


def test_changing_any_key_part_recomputes_and_the_others_hit(tmp_path, monkeypatch):
    # The phantom is a LEFT ankle whose dataset record wrongly says right.
    case = generate_case(3, "B", "left", spacing="fast")
    ds = Dataset.create(tmp_path / "ds")
    ds.add_case("c", case.ct, case.label, weber="B", side="right")
    cache = tmp_path / "cache"

    first, crops = _messages(ds, cache)
    assert first == "0/1 crops cached"
    info = crops.info[0]
    # Detected as run does: left, and the mismatch with the dataset is recorded.
    assert info["side"] == "left" and info["side_policy"] == "detect"
    assert info["side_dataset"] == "right" and info["side_match"] is False
    assert crops.meta["side_policy"] == "detect"
    assert crops.meta["crop_code_version"] == crops_mod.CROP_CODE_VERSION
    assert _messages(ds, cache)[0] == "1/1 crops cached"

    # The dataset's side (training policy): another crop, mirrored the other way.
    msg, by_dataset = _messages(ds, cache, side="dataset")
    assert msg == "0/1 crops cached" and by_dataset.info[0]["side"] == "right"
    assert by_dataset.info[0]["side_match"] is True
    assert _messages(ds, cache, side="dataset")[0] == "1/1 crops cached"

    # A copy of the template hits; an edited template recomputes.
    tpl = tmp_path / "tpl"
    shutil.copytree(Path(load_template().meta["path"]), tpl)
    assert _messages(ds, cache, template_dir=tpl)[0] == "1/1 crops cached"
    data = json.loads((tpl / "template.json").read_text())
    data.setdefault("meta", {})["edited"] = True
    (tpl / "template.json").write_text(json.dumps(data))
    assert _messages(ds, cache, template_dir=tpl)[0] == "0/1 crops cached"
    assert _messages(ds, cache)[0] == "1/1 crops cached"  # the shipped one still hits

    # A new crop code version recomputes.
    monkeypatch.setattr(crops_mod, "CROP_CODE_VERSION", crops_mod.CROP_CODE_VERSION + 1)
    assert _messages(ds, cache)[0] == "0/1 crops cached"
    assert _messages(ds, cache)[0] == "1/1 crops cached"


def test_segmentation_model_hash_keys_model_mask_crops(tmp_path, monkeypatch):
    case = generate_case(4, "C", "right", spacing="fast")
    ds = Dataset.create(tmp_path / "ds")
    ds.add_case("c", case.ct, case.label, weber="C", side="right")
    calls = []

    def fake_segment(ct, model_dir=None, *args, **kwargs):
        calls.append(model_dir)
        return case.label

    import AnkleFractureLib.segmentation.inference as inference
    monkeypatch.setattr(inference, "segment_ct", fake_segment)
    model = tmp_path / "seg_model"
    model.mkdir()
    (model / "model.pt").write_bytes(b"weights one")
    (model / "plans.json").write_text("{}")
    cache = tmp_path / "cache"
    kwargs = {"seg_model_dir": model, "model_masks": True}
    msg, crops = _messages(ds, cache, **kwargs)
    assert msg == "0/1 crops cached" and crops.info[0]["masks"] == "model" and len(calls) == 1
    assert _messages(ds, cache, **kwargs)[0] == "1/1 crops cached" and len(calls) == 1
    # The label-map crop is another entry, and does not depend on the model.
    assert _messages(ds, cache, seg_model_dir=model)[0] == "0/1 crops cached"
    (model / "model.pt").write_bytes(b"weights two")  # retrained: new weights
    assert _messages(ds, cache, **kwargs)[0] == "0/1 crops cached" and len(calls) == 2
    assert _messages(ds, cache, seg_model_dir=model)[0] == "1/1 crops cached"
    (model / "plans.json").write_text('{"changed": 1}')  # other post-processing settings
    assert _messages(ds, cache, **kwargs)[0] == "0/1 crops cached" and len(calls) == 3
    # The shipped model, named or a copy of it, has its own key (its sha256), same for both.
    copy = tmp_path / "seg_copy"
    shutil.copytree(default_model_dir(), copy)
    assert _messages(ds, cache, model_masks=True)[0] == "0/1 crops cached"
    assert _messages(ds, cache, model_masks=True, seg_model_dir=copy)[0] == "1/1 crops cached"


def test_parallel_crops_after_torch_ran_do_not_hang(tmp_path):
    # evaluate-cls loads the classifier (torch threads) before cropping: forked workers inherited
    # locked OpenMP state and hung for ever segmenting the cases without a label map. The
    # workers are spawned now; run it in a subprocess with a timeout so a hang fails the test.
    import subprocess
    import sys
    import textwrap

    ds = Dataset.create(tmp_path / "ds")
    for i, weber in enumerate(("none", "C")):
        case = generate_case(40 + i, weber, "right", spacing="fast")
        ds.add_case(f"c{i}", case.ct, None, weber=weber, side="right")
    code = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(2)
        torch.ones(256, 256) @ torch.ones(256, 256)      # the OpenMP pool is running
        from AnkleFractureLib.classification.crops import load_crops
        from AnkleFractureLib.dataset import Dataset
        crops = load_crops(Dataset.load({str(ds.root)!r}), {str(tmp_path / "cache")!r},
                           workers=2)
        print("cropped", len(crops), sorted(i["masks"] for i in crops.info))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=str(REPO_ROOT))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cropped 2 ['model', 'model']" in out.stdout
