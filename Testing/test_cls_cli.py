"""The classification commands: classify, evaluate-cls and train-cls on a tiny phantom dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from AnkleFractureLib.cli.main import main
from AnkleFractureLib.crop.syndesmosis import box_on_grid
from AnkleFractureLib.classification.model_io import save_classifier
from AnkleFractureLib.classification.network import build_classifier
from AnkleFractureLib.classification.plans import CLASSES, ClsPlans
from AnkleFractureLib.io import read_image, write_image
from AnkleFractureLib.phantom.dataset_writer import write_phantom_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 4-case phantom dataset (one per class) and an untrained tiny classifier."""
    root = tmp_path_factory.mktemp("cls_cli")
    ds = write_phantom_dataset(root / "ds", n=4, seed=5, spacing="fast")
    torch.manual_seed(0)
    plans = ClsPlans.make(widths=[4, 8, 8, 16], downsample=2, tta=2)
    model = root / "model"
    save_classifier(model, build_classifier(plans.network), plans)
    case = ds.cases[0]
    return {"root": root, "ds": ds.root, "model": model, "ids": [c.id for c in ds.cases],
            "ct": ds.path(case.image), "seg": ds.path(case.segmentation)}


# ------------------------------------------------------------------------------ help
@pytest.mark.parametrize("cmd, keys", [
    ("classify", ["--seg", "--out", "--model", "--tta", "--class", "--side", "gradcam.nii.gz",
                  "result.json"]),
    ("evaluate-cls", ["--model", "--out", "--tta", "--cache-dir", "--workers"]),
    ("train-cls", ["--method", "--label-fraction", "--max-minutes", "--crop", "--widths",
                   "--model-masks", "--seg-model",
                   "--val-fraction", "semi", "fixmatch", "pseudolabel", "torchrun",
                   "unlabelled", ".crop_cache"]),
])
def test_help_mentions_key_options(cmd, keys, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: ankle-fracture {cmd}" in out and "example" in out
    for key in keys:
        assert key in out, key


# ------------------------------------------------------------------------------ classify
def test_classify_writes_result_and_gradcam_on_the_ct_grid(data, tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["classify", str(data["ct"]), "--seg", str(data["seg"]), "--out", str(out),
                 "--model", str(data["model"]), "--device", "cpu", "--quiet"]) == 0
    stdout = capsys.readouterr().out
    res = json.loads((out / "result.json").read_text())
    assert set(res["probabilities"]) == set(CLASSES)
    assert abs(sum(res["probabilities"].values()) - 1.0) < 1e-6
    assert res["prediction"] in CLASSES
    assert res["prediction"] == max(res["probabilities"], key=res["probabilities"].get)
    # The heatmap explains the classifier's own class; the prediction is the combined answer.
    assert res["gradcam_class"] == res["weber_from_height"]["classifier_prediction"]
    assert res["side"] in ("left", "right") and res["registration"]["side"] == res["side"]
    assert 0 < res["crop_coverage"] <= 1
    assert len(res["models"]["classification"]["sha256"]) == 64
    assert res["models"]["classification"]["used"] and not res["refused"]
    assert Path(res["input"]["seg"]) == Path(data["seg"]).resolve()
    assert "not for clinical use" in res["disclaimer"]
    assert "unsure" in res["uncertainty"]
    ct = read_image(data["ct"])
    heat = read_image(out / "gradcam.nii.gz")
    assert heat.array.dtype == np.float32
    assert box_on_grid(heat, ct, atol=1e-4) is not None  # the crop's box on the CT's lattice
    assert heat.array.min() >= 0.0 and heat.array.max() <= 1.0
    assert heat.array.max() > 0  # the crop lies in the CT: some voxels carry the heatmap
    assert "prediction" in stdout and "#" in stdout and f"wrote {out}/" in stdout
    assert "result.json" in stdout and str(out / "gradcam.nii.gz") in stdout


def test_classify_explains_the_requested_class(data, tmp_path):
    out = tmp_path / "res"
    assert main(["classify", str(data["ct"]), "--seg", str(data["seg"]), "--out", str(out),
                 "--model", str(data["model"]), "--class", "C", "--tta", "0", "--quiet"]) == 0
    assert json.loads((out / "result.json").read_text())["gradcam_class"] == "C"


def test_classify_refuses_a_segmentation_off_the_ct_grid(data, tmp_path, capsys):
    seg = read_image(data["seg"])
    moved = seg.region((slice(2, None), slice(None), slice(None)))  # other shape and origin
    bad = tmp_path / "cropped_seg.nii.gz"
    write_image(moved, bad)
    out = tmp_path / "res"
    assert main(["classify", str(data["ct"]), "--seg", str(bad), "--out", str(out),
                 "--model", str(data["model"]), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "grid" in err and "Traceback" not in err
    assert not out.exists()  # nothing half-written


def test_classify_missing_ct_is_a_clear_error(data, tmp_path, capsys):
    missing = tmp_path / "nope.nii.gz"
    assert main(["classify", str(missing), "--seg", str(data["seg"]), "--out",
                 str(tmp_path / "res"), "--model", str(data["model"]), "--quiet"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_classify_missing_model_is_a_clear_error(data, tmp_path, capsys):
    missing = tmp_path / "no_model"
    assert main(["classify", str(data["ct"]), "--seg", str(data["seg"]), "--out",
                 str(tmp_path / "res"), "--model", str(missing), "--quiet"]) == 2
    assert str(missing) in capsys.readouterr().err


# ------------------------------------------------------------------------------ evaluate-cls
def test_evaluate_cls_writes_metrics(data, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert main(["evaluate-cls", str(data["ds"]), "--model", str(data["model"]),
                 "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    stdout = capsys.readouterr().out
    res = json.loads(out.read_text())
    cm = np.asarray(res["confusion_matrix"])
    assert cm.shape == (4, 4) and cm.sum() == res["n"] == 4
    assert cm.sum(axis=1).tolist() == [1, 1, 1, 1]  # one phantom of each class
    assert 0.0 <= res["accuracy"] <= 1.0
    assert res["accuracy"] == pytest.approx(np.trace(cm) / 4)
    assert res["crop"] == "registered" and res["tta"] == 0 and res["failed"] == {}
    assert sorted(c["id"] for c in res["per_case"]) == sorted(data["ids"])
    assert "unsure" not in res
    assert "accuracy" in stdout and "confusion matrix" in stdout


def test_evaluate_cls_with_tta_counts_unsure_cases(data, tmp_path):
    out = tmp_path / "metrics.json"
    assert main(["evaluate-cls", str(data["ds"]), "--model", str(data["model"]),
                 "--out", str(out), "--tta", "2", "--quiet"]) == 0
    res = json.loads(out.read_text())
    u = res["unsure"]
    assert res["tta"] == 2 and u["n_unsure"] + u["n_confident"] == res["n"] == 4
    assert sum(c["unsure"] for c in res["per_case"]) == u["n_unsure"]


def test_evaluate_cls_missing_dataset_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "no_dataset"
    assert main(["evaluate-cls", str(missing), "--out", str(tmp_path / "m.json")]) == 2
    assert str(missing) in capsys.readouterr().err


# ------------------------------------------------------------------------------ train-cls
def _train_args(ds, out, method, *extra):
    return ["train-cls", str(ds), "--out", str(out), "--method", method, "--steps", "3",
            "--batch-size", "2", "--unlabelled-batch-size", "2", "--widths", "4", "8", "8",
            "16", "--downsample", "2", "--val-fraction", "0", "--threads", "1",
            "--device", "cpu", "--quiet", *extra]


def _check_model(out: Path, method: str) -> dict:
    assert {"plans.json", "model.pt", "training.json"} <= {p.name for p in out.iterdir()}
    info = json.loads((out / "training.json").read_text())
    assert info["method"] == method and info["steps_done"] == 3
    plans = ClsPlans.load(out / "plans.json")
    assert plans.network["widths"] == [4, 8, 8, 16] and plans.downsample == 2
    return info


def test_train_cls_supervised(data, tmp_path, capsys):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    out = tmp_path / "sup"
    assert main(_train_args(data["ds"], out, "supervised")) == 0  # --threads 1 as well
    info = _check_model(out, "supervised")
    # Each labelled case twice: with its label map and with the segmentation model's masks
    # (what the pipeline will classify).
    train = info["cases"]["labelled_train"]
    assert sorted(train) == sorted(data["ids"] + [i + "+model_masks" for i in data["ids"]])
    assert info["config"]["model_masks"] is True
    assert info["config"]["bridge_prob"] == 0.0  # the shipped recipe: masks as cropped
    assert str(out) in capsys.readouterr().out
    # --no-model-masks: the label maps only; --bridge-masks is recorded.
    out2 = tmp_path / "sup2"
    assert main(_train_args(data["ds"], out2, "supervised", "--no-model-masks",
                            "--bridge-masks", "0.5")) == 0
    info2 = _check_model(out2, "supervised")
    assert sorted(info2["cases"]["labelled_train"]) == sorted(data["ids"])
    assert info2["config"]["bridge_prob"] == 0.5


def test_train_cls_semi_uses_unlabelled_cases(data, tmp_path):
    # A copy of the dataset whose last two cases have no class. The images are symlinks, so
    # the crop cache of the original (keyed on the resolved files) is reused.
    src = Path(data["ds"])
    copy = tmp_path / "semi_ds"
    copy.mkdir()
    for sub in ("images", "labels"):
        (copy / sub).symlink_to(src / sub, target_is_directory=True)
    index = json.loads((src / "dataset.json").read_text())
    for case in index["cases"][2:]:
        case["weber"] = None
    (copy / "dataset.json").write_text(json.dumps(index))
    out = tmp_path / "semi"
    torch.manual_seed(0)
    torch.set_num_threads(1)
    assert main(_train_args(copy, out, "semi", "--label-fraction", "0.5",
                            "--cache-dir", str(src / ".crop_cache"))) == 0
    info = _check_model(out, "semi")
    assert info["cases"]["unlabelled"] == 2
    assert info["config"]["label_fraction"] == 0.5


@pytest.mark.parametrize("option, value", [("--label-fraction", "0"),
                                           ("--label-fraction", "1.5"),
                                           ("--bridge-masks", "1.5")])
def test_train_cls_refuses_a_bad_fraction(data, tmp_path, capsys, option, value):
    out = tmp_path / "m"
    assert main(_train_args(data["ds"], out, "semi", option, value)) == 2
    err = capsys.readouterr().err
    assert option in err and "Traceback" not in err
    assert not out.exists()


def test_train_cls_refuses_a_non_empty_output(data, tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(_train_args(data["ds"], out, "supervised")) == 2
    assert str(out) in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_train_cls_missing_dataset_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "no_dataset"
    assert main(_train_args(missing, tmp_path / "m", "supervised")) == 2
    assert str(missing) in capsys.readouterr().err
