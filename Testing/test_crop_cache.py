"""The classifier's crop cache: computed once, keyed by the files, the template and, for cases
without a label map, the segmentation model that will make their masks."""

from __future__ import annotations

import shutil

import numpy as np

from AnkleFractureLib.classification.crops import cache_key, load_crops
from AnkleFractureLib.dataset import Dataset
from AnkleFractureLib.phantom import generate_case
from AnkleFractureLib.segmentation.inference import default_model_dir
from conftest import REPO_ROOT


def test_crops_are_cached_and_keyed_by_the_segmentation_model(tmp_path):
    case = generate_case(3, "B", "right", spacing="fast")
    ds = Dataset.create(tmp_path / "ds")
    ds.add_case("seg", case.ct, case.label, weber="B", side="right")
    ds.add_case("noseg", case.ct, None, weber="B", side="right")
    seg, noseg = ds.get("seg"), ds.get("noseg")

    # A case with a label map never depends on a segmentation model; one without does.
    assert cache_key(ds, seg, "registered", "t") == cache_key(ds, seg, "registered", "t", "m1")
    assert cache_key(ds, noseg, "registered", "t") != cache_key(ds, noseg, "registered", "t",
                                                                "m1")
    # The shipped model named explicitly, or a copy of it, gives the default's crops (same key).
    copy = tmp_path / "seg_copy"
    shutil.copytree(default_model_dir(), copy)
    messages = []
    first = load_crops(ds, tmp_path / "cache", ids=["seg"], seg_model_dir=copy,
                       progress=lambda f, m: messages.append(m))
    assert first.ids == ["seg"] and first.x.shape[1:] == (3, 96, 48, 64)
    assert messages[0] == "0/1 crops cached"
    files = sorted((tmp_path / "cache" / "registered").glob("*.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    messages.clear()
    again = load_crops(ds, tmp_path / "cache", ids=["seg"],
                       progress=lambda f, m: messages.append(m))
    assert messages == ["1/1 crops cached"] and files[0].stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.x, first.x)


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
