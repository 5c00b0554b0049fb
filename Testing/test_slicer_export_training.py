"""Acceptance: "Export as training case" in the Slicer module writes a dataset that
``train-seg`` and ``train-cls`` accept.

Fast phantoms are loaded as volume nodes on a bare ``slicer-core`` scene, their reference label
maps put into segmentation nodes, and each is exported with
:meth:`AnkleFractureSlicer.logic.AnkleFractureSceneLogic.exportTrainingCase` (one case with no
Weber class: unlabelled for the classifier). The training code's own readers must read the
export, and the panel's training commands must train real (tiny) models on it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (pip install slicer-core) is needed")

MODULE_DIR = Path(__file__).resolve().parents[1] / "AnkleFracture"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

import torch  # noqa: E402

from AnkleFractureLib.cli.main import build_parser, main  # noqa: E402
from AnkleFractureLib.dataset import Dataset  # noqa: E402
from AnkleFractureLib.dataset.layout import CLASSES  # noqa: E402
from AnkleFractureLib.io import read_image  # noqa: E402
from AnkleFractureLib.phantom import generate_case  # noqa: E402
from AnkleFractureLib.segmentation.plans import SegPlans  # noqa: E402

from AnkleFractureSlicer import nodes as N  # noqa: E402
from AnkleFractureSlicer.logic import AnkleFractureSceneLogic  # noqa: E402

torch.set_num_threads(1)

#: (case id, phantom seed, phantom class, side, class exported from the panel).
CASES = (("ankle_b", 1, "B", "left", "B"),
         ("ankle_none", 2, "none", "right", "none"),
         ("ankle_unknown", 3, "C", "right", "unknown"))
LABELLED = sorted(c[0] for c in CASES if c[4] != "unknown")
# The tiny network of the training tests: 2 mm spacing, 32^3 patches, seconds on a CPU.
TINY_SEG_PLANS = SegPlans(
    model_spacing_mm=(2.0, 2.0, 2.0), patch_size=(32, 32, 32),
    network={"architecture": "unet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
             "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1,
             "norm": "instance", "dropout": 0.0})
TINY_CLS = ["--widths", "4", "8", "8", "16", "--downsample", "2"]


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def phantoms():
    return {cid: generate_case(seed, weber, side, spacing="fast")
            for cid, seed, weber, side, _ in CASES}


@pytest.fixture(scope="module")
def exported(phantoms, tmp_path_factory):
    """Each phantom as a CT node + a Tibia/Fibula segmentation node, exported into one dataset."""
    scene = slicer.vtkMRMLScene()
    N.segmentationsLogic(scene)  # as Slicer does at start-up: segmentations need converters
    logic = AnkleFractureSceneLogic(scene, tmp_path_factory.mktemp("results"))
    folder = tmp_path_factory.mktemp("export") / "dataset"
    infos = {}
    for cid, _, _, side, weber in CASES:
        case = phantoms[cid]
        ct_node = N.addVolumeNode(scene, case.ct, f"CT {cid}")
        seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{cid} bones")
        N.updateSegmentationFromLabelMap(seg_node, case.label, ct_node, scene)
        infos[cid] = logic.exportTrainingCase(folder, ct_node, seg_node, weber, caseId=cid,
                                              side=side)
    return folder, infos


# ------------------------------------------------------------------------------ the export
def test_export_writes_the_dataset_layout(exported, phantoms):
    """dataset.json, counts, and each case's files voxel for voxel with the phantom's."""
    folder, infos = exported
    assert [i["caseId"] for i in infos.values()] == [c[0] for c in CASES]
    assert not any(i["updated"] for i in infos.values())
    counts = AnkleFractureSceneLogic.datasetCounts(folder)
    assert counts == {"cases": 3, "segmented": 3, "classified": 2, "unlabelled": 1,
                      "fracture_lines": 0,
                      "weber_none": 1, "weber_A": 0, "weber_B": 1, "weber_C": 0}
    ds = Dataset.load(folder)
    for (cid, _, _, side, weber), rec in zip(CASES, ds):
        case = phantoms[cid]
        assert rec.id == cid and rec.side == side and rec.source == "slicer-export"
        assert rec.weber == (None if weber == "unknown" else weber)
        image = read_image(ds.path(rec.image))
        label = read_image(ds.path(rec.segmentation))
        assert image.same_geometry(case.ct, atol=1e-4) and label.same_geometry(image, atol=1e-6)
        assert np.array_equal(image.array, case.ct.array)
        assert label.array.dtype == np.uint8 and np.array_equal(label.array, case.label.array)


def test_training_readers_accept_the_export(exported, tmp_path):
    """The exact readers of train-seg (prepared cases) and train-cls (registered crops)."""
    from AnkleFractureLib.classification.crops import load_crops
    from AnkleFractureLib.training.seg_data import load_case, segmented_cases, split_cases

    folder, _ = exported
    ds = Dataset.load(folder)
    records = segmented_cases(ds)
    assert [r.id for r in records] == sorted(c[0] for c in CASES)
    train, val = split_cases([r.id for r in records], 0.15, seed=0)
    assert len(train) == 2 and len(val) == 1
    for rec in records:
        prepared = load_case(ds, rec, TINY_SEG_PLANS)
        assert prepared.spacing == pytest.approx((2.0, 2.0, 2.0), abs=0.05)
        assert prepared.image.shape == prepared.label.shape
        assert set(np.unique(prepared.label)) == {0, 1, 2}
        assert 0.0 <= prepared.image.min() and prepared.image.max() <= 1.0

    # train-cls's default cache folder, so that the training test below reuses these crops.
    crops = load_crops(ds, folder / ".crop_cache", "registered")
    assert crops.failed == {}
    assert crops.ids == [c[0] for c in CASES]
    assert crops.y.tolist() == [CLASSES.index("B"), CLASSES.index("none"), -1]
    assert [i["masks"] for i in crops.info] == ["dataset"] * 3
    assert [i["side"] for i in crops.info] == [c[3] for c in CASES]
    assert crops.x.shape[:2] == (3, 3) and np.isfinite(crops.x.astype(np.float32)).all()
    assert all(i["coverage"] > 0.9 for i in crops.info)


def test_panel_classifier_command_is_complete(tmp_path):
    cmd = AnkleFractureSceneLogic.trainingCommand("cls", tmp_path / "ds", tmp_path / "m", 5)
    try:
        args = build_parser().parse_args(cmd[3:])
    except SystemExit as exc:
        pytest.fail(f"train-cls refuses the panel's command line (exit {exc.code}): {cmd}")
    assert args.command == "train-cls" and args.max_minutes == 5


# ------------------------------------------------------------------------------ training
def _panel_argv(kind: str, folder: Path, out: Path, extra) -> list:
    """The panel's training command line, as ``main`` takes it (without ``python -m``)."""
    cmd = AnkleFractureSceneLogic.trainingCommand(kind, folder, out, maxMinutes=10,
                                                  python=sys.executable, extra=extra)
    assert cmd[:4] == [sys.executable, "-m", "AnkleFractureLib", f"train-{kind}"]
    return cmd[3:]


def test_train_seg_and_train_cls_accept_the_export(exported, phantoms, tmp_path, capsys):
    """Real one-epoch / two-step trainings on the export give loadable, working models."""
    from AnkleFractureLib.classification.crops import load_crops
    from AnkleFractureLib.classification.inference import WeberClassifier
    from AnkleFractureLib.segmentation.inference import SegmentationModel

    folder, _ = exported
    ids = sorted(c[0] for c in CASES)

    # --- train-seg: every exported case has a segmentation (the unlabelled one too).
    plans_file = tmp_path / "tiny_plans.json"
    plans_file.write_text(json.dumps(TINY_SEG_PLANS.to_json()))
    seg_out = folder / "models" / "seg_test"  # where the panel puts its models
    assert main(_panel_argv("seg", folder, seg_out, [
        "--plans", str(plans_file), "--epochs", "1", "--steps-per-epoch", "2",
        "--batch-size", "1", "--device", "cpu", "--threads", "1", "--quiet",
        "--no-keep-checkpoint", "--cache-dir", str(tmp_path / "seg_cache")])) == 0, \
        capsys.readouterr().err
    assert {"plans.json", "model.pt", "training.json", "training_log.csv"} <= {
        p.name for p in seg_out.iterdir()}
    summary = json.loads((seg_out / "training.json").read_text())
    assert summary["status"] == "completed" and summary["steps_run"] == 2
    assert sorted(summary["train_cases"] + summary["val_cases"]) == ids
    assert len(summary["val_cases"]) == 1 and 0.0 <= summary["best_val_dice"] <= 1.0
    seg_model = SegmentationModel.load(seg_out, "cpu")
    assert seg_model.plans == TINY_SEG_PLANS
    ct = phantoms["ankle_b"].ct
    predicted = seg_model.predict(ct)
    assert predicted.same_geometry(ct, atol=1e-4) and predicted.array.dtype == np.uint8
    assert set(np.unique(predicted.array)) <= {0, 1, 2}

    # --- train-cls: two labelled cases, one unlabelled (used by the semi method).
    cls_out = folder / "models" / "cls_test"
    assert main(_panel_argv("cls", folder, cls_out, [
        "--method", "semi", "--steps", "2", "--batch-size", "2",
        "--unlabelled-batch-size", "2", "--val-fraction", "0", "--no-model-masks",
        *TINY_CLS, "--device", "cpu", "--threads", "1", "--quiet"])) == 0, \
        capsys.readouterr().err
    assert {"plans.json", "model.pt", "training.json", "training_log.csv"} <= {
        p.name for p in cls_out.iterdir()}
    info = json.loads((cls_out / "training.json").read_text())
    assert info["status"] == "completed" and info["method"] == "semi"
    assert info["steps_done"] == 2
    assert sorted(info["cases"]["labelled_train"]) == LABELLED
    assert info["cases"]["unlabelled"] == 1 and info["cases"]["failed"] == {}
    classifier = WeberClassifier.load(cls_out, "cpu")
    assert classifier.plans.network["widths"] == [4, 8, 8, 16]
    crops = load_crops(Dataset.load(folder), folder / ".crop_cache", "registered")
    answer = classifier.classify_channels(crops.x[0].astype(np.float32), tta=0, gradcam=False)
    assert list(answer.probabilities) == list(CLASSES)
    assert sum(answer.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    # The models beside the cases did not become cases.
    assert AnkleFractureSceneLogic.datasetCounts(folder)["cases"] == 3


def test_panel_trains_the_classifier_in_the_background(exported):
    """'Train classifier' runs train-cls in its own process (the panel polls it); the default
    method (semi-supervised) needs no flag from the panel, and the result is a model folder."""
    folder, _ = exported
    out = folder / "models" / "cls_background"
    logic = AnkleFractureSceneLogic(slicer.vtkMRMLScene())
    process = logic.startTraining("cls", folder, out, maxMinutes=5, python=sys.executable,
                                  extra=["--steps", "2", "--batch-size", "2",
                                         "--unlabelled-batch-size", "2", "--val-fraction", "0",
                                         "--no-model-masks", *TINY_CLS, "--device", "cpu",
                                         "--threads", "1"])
    state = process.wait(600)
    assert state.succeeded, state.error
    assert (out / "model.pt").is_file()
    assert json.loads((out / "training.json").read_text())["method"] == "semi"
    # Without a dataset there is nothing to train on: a clear error before any process.
    with pytest.raises(Exception, match="dataset.json"):
        logic.startTraining("seg", folder / "nothing_here", out, python=sys.executable)


def test_the_readers_fracture_line_is_exported_for_train_fracture(phantoms, tmp_path):
    """A (corrected) "Fibula fracture" segment exported with the case becomes the dataset's
    fracture line, voxel for voxel; a node without that segment is refused by name."""
    from AnkleFractureLib.errors import InputError

    scene = slicer.vtkMRMLScene()
    N.segmentationsLogic(scene)
    logic = AnkleFractureSceneLogic(scene, tmp_path / "results")
    case = phantoms["ankle_b"]
    ct_node = N.addVolumeNode(scene, case.ct, "CT ankle_b")
    line = np.zeros(case.ct.shape, np.uint8)
    fib = np.argwhere(case.label.array == 2)
    z = int(np.median(fib[:, 0]))
    line[z:z + 2][case.label.array[z:z + 2] == 2] = 1  # a two-slice line through the fibula
    fracture_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ankle_b fracture")
    fracture_node.SetAttribute(N.ROLE_ATTRIBUTE, "fracture")
    fracture_node.SetAttribute(N.CT_ATTRIBUTE, ct_node.GetID())
    N.updateFractureSegmentation(fracture_node, case.ct.with_array(line), ct_node, scene)
    assert logic.fractureNodeFor(ct_node) is fracture_node  # what the panel's export passes
    info = logic.exportTrainingCase(tmp_path / "ds", ct_node, None, "B", caseId="ankle_b",
                                    side="left", fractureNode=logic.fractureNodeFor(ct_node))
    assert info["counts"]["fracture_lines"] == 1
    record = Dataset.load(tmp_path / "ds").get("ankle_b")
    stored = read_image(tmp_path / "ds" / record.fracture_line)
    assert stored.same_geometry(case.ct, atol=1e-4)
    assert np.array_equal(stored.array > 0, line > 0)
    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "not a fracture")
    other.GetSegmentation().AddEmptySegment("", "Talus", [0.5, 0.5, 0.5])
    with pytest.raises(InputError, match="no 'Fibula fracture' segment.*'Talus'"):
        logic.exportTrainingCase(tmp_path / "ds", ct_node, None, "B", caseId="ankle_c",
                                 fractureNode=other)
    assert Dataset.load(tmp_path / "ds").get("ankle_c") is None  # nothing written
