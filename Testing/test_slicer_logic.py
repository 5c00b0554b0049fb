"""The Slicer module's logic against real MRML (the ``slicer-core`` package), no application.

A phantom CT is loaded as a volume node and the panel's actions run through
:class:`AnkleFractureSlicer.logic.AnkleFractureSceneLogic` on a bare ``vtkMRMLScene``.
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

from AnkleFractureLib.crop.syndesmosis import box_on_grid  # noqa: E402
from AnkleFractureLib.dataset import Dataset  # noqa: E402
from AnkleFractureLib.errors import InputError  # noqa: E402
from AnkleFractureLib.geometry.frames import LPS_TO_RAS, lps_matrix_to_ras  # noqa: E402
from AnkleFractureLib.io import read_image  # noqa: E402
from AnkleFractureLib.phantom import generate_case  # noqa: E402
from AnkleFractureLib.registration.transform_io import read_transform_json  # noqa: E402

from AnkleFractureSlicer import nodes as N  # noqa: E402
from AnkleFractureSlicer.logic import (AnkleFractureSceneLogic, CaseExistsError,  # noqa: E402
                                       ResultNodes, StageSettings)
from AnkleFractureSlicer.terminology import BONES  # noqa: E402

torch.set_num_threads(2)
SETTINGS = StageSettings(device="cpu")


def _matrix(node_getter) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node_getter(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def case():
    """A fast Weber B left phantom (the shipped models are used: a real run)."""
    return generate_case(10, "B", "left", spacing="fast")


@pytest.fixture(scope="module")
def scene():
    scene = slicer.vtkMRMLScene()
    N.segmentationsLogic(scene)  # as Slicer does at start-up: segmentations need converters
    return scene


@pytest.fixture(scope="module")
def logic(scene, tmp_path_factory):
    logic = AnkleFractureSceneLogic(scene, tmp_path_factory.mktemp("results"))
    yield logic
    logic.shutdown()  # the warm background process ends with the module


@pytest.fixture(scope="module")
def ct_node(scene, case):
    return N.addVolumeNode(scene, case.ct, "AnkleCT")


@pytest.fixture(scope="module")
def run_all(logic, ct_node):
    """Run all once, in process (the Logic's blocking call)."""
    seen = []
    out = logic.runStage("all", ct_node, ResultNodes(), SETTINGS,
                         progress=lambda f, m: seen.append(f))
    out.progress = seen
    return out


# ------------------------------------------------------------------------------ geometry
def test_volume_node_round_trip_keeps_lps_geometry(oblique_volume, scene):
    node = N.addVolumeNode(scene, oblique_volume, "oblique")
    ijk_to_ras = _matrix(node.GetIJKToRASMatrix)
    assert np.allclose(ijk_to_ras, LPS_TO_RAS @ oblique_volume.affine, atol=1e-9)
    back = N.volumeFromNode(node)
    assert back.same_geometry(oblique_volume, atol=1e-9)
    assert np.array_equal(back.array, oblique_volume.array)
    assert back.array.dtype == oblique_volume.array.dtype
    scene.RemoveNode(node)


def test_volume_node_without_image_names_it(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Empty CT")
    with pytest.raises(InputError, match="Empty CT.*no image data"):
        N.volumeFromNode(node)
    scene.RemoveNode(node)


def test_segments_round_trip_voxel_for_voxel(oblique_volume, scene):
    """A label map into Tibia/Fibula segments and back is the same on an oblique grid."""
    ct_node = N.addVolumeNode(scene, oblique_volume, "oblique ct")
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=oblique_volume.shape).astype(np.uint8)
    label = oblique_volume.with_array(labels)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "bones")
    seg.GetSegmentation().AddEmptySegment("", "Talus", [0.5, 0.5, 0.5])  # kept, ignored
    ids = N.updateSegmentationFromLabelMap(seg, label, ct_node, scene)
    assert set(ids) == {"Tibia", "Fibula"}
    assert seg.GetSegmentation().GetNumberOfSegments() == 3
    back = N.labelMapFromSegmentation(seg, ct_node, scene)
    assert back.same_geometry(oblique_volume, atol=1e-6)
    assert np.array_equal(back.array, labels)
    # Updating again reuses the same segments (no duplicates).
    again = N.updateSegmentationFromLabelMap(seg, label.with_array(labels * 0 + 1), ct_node,
                                             scene)
    assert again == ids and seg.GetSegmentation().GetNumberOfSegments() == 3
    # A map with nothing labelled (a foot scan: post-processing rule 9) empties both segments.
    empty = N.updateSegmentationFromLabelMap(seg, label.with_array(labels * 0), ct_node, scene)
    assert empty == ids and seg.GetSegmentation().GetNumberOfSegments() == 3
    assert N.labelMapFromSegmentation(seg, ct_node, scene) is None  # no tibia or fibula voxel
    for node in (seg, ct_node):
        scene.RemoveNode(node)


def test_direct_read_of_segments_equals_slicers_export(oblique_volume, scene):
    """The fast path (segments read from their labelmaps) gives exactly Slicer's export, with
    overlapping fragments in other layers, a segment imported from a smaller grid, and a CT
    moved by a parent transform (where the export must be used)."""
    ct_node = N.addVolumeNode(scene, oblique_volume, "oblique ct 2")
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, size=oblique_volume.shape).astype(np.uint8)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "bones 2")
    N.updateSegmentationFromLabelMap(seg, oblique_volume.with_array(labels), ct_node, scene)
    logic = N.segmentationsLogic(scene)
    # An overlapping "Fibula fragment" (another layer) and a "Tibia tip" from a sub-grid.
    fragment = np.zeros_like(labels)
    fragment[2:5, 3:7, 4:9] = 1
    sub = oblique_volume.region((slice(1, 4), slice(2, 6), slice(0, 5)))
    tip = sub.with_array(np.ones(sub.shape, np.uint8))
    for name, volume in (("Fibula fragment", oblique_volume.with_array(fragment)),
                         ("Tibia tip", tip)):
        node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
        N.updateNodeFromVolume(node, volume)
        assert logic.ImportLabelmapToSegmentationNode(node, seg)
        s = seg.GetSegmentation()
        s.GetNthSegment(s.GetNumberOfSegments() - 1).SetName(name)
        scene.RemoveNode(node)
    groups = N.boneSegmentIds(seg)
    ordered = [(b, i) for b in (1, 2) for i in groups[b]]
    assert len(ordered) == 4
    # The direct read really happens here (no fallback to the export).
    assert N._labelsFromBinaryLabelmaps(seg, ordered, ct_node, labels.shape) is not None
    direct = N.labelMapFromSegmentation(seg, ct_node, scene)
    export = N.labelMapFromSegmentation(seg, ct_node, scene, direct=False)
    assert np.array_equal(direct.array, export.array)
    assert (direct.array == 2).sum() > (labels == 2).sum()  # the fragment counted as fibula
    # A parent transform on the CT only: the export handles it, the results still agree.
    moved = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    ct_node.SetAndObserveTransformNodeID(moved.GetID())
    assert N._labelsFromBinaryLabelmaps(seg, ordered, ct_node, labels.shape) is None
    assert np.array_equal(N.labelMapFromSegmentation(seg, ct_node, scene).array,
                          N.labelMapFromSegmentation(seg, ct_node, scene, direct=False).array)
    for node in (seg, ct_node, moved):
        scene.RemoveNode(node)


# ------------------------------------------------------------------------------ Run all
def test_run_all_fills_the_scene(run_all, case, ct_node, scene):
    res, nodes, folder = run_all.result, run_all.nodes, run_all.folder
    assert not res["refused"], res["refusal"]
    assert res["side"] == "left"
    # Progress went from 0 to 1 without going back.
    assert run_all.progress[-1] == 1.0 and run_all.progress == sorted(run_all.progress)

    # Segments: names, colours, SNOMED CT terminology, the CT as reference, voxel for voxel.
    segmentation = nodes.segmentation.GetSegmentation()
    for bone in BONES:
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(bone.name))
        assert segment is not None
        entry = N.segmentTag(segment, segment.GetTerminologyEntryTagName())
        assert f"SCT^{bone.code}^{bone.name}" in entry
        assert np.allclose(segment.GetColor(), bone.color)
    assert nodes.segmentation.GetNodeReference(
        nodes.segmentation.GetReferenceImageGeometryReferenceRole()) is ct_node
    exported = N.labelMapFromSegmentation(nodes.segmentation, ct_node, scene)
    written = read_image(folder / "segmentation.nii.gz")
    assert exported.same_geometry(written, atol=1e-6)
    assert np.array_equal(exported.array, written.array)
    # And the segmentation is a good one (the shipped model on a phantom).
    truth = case.label.array
    for value in (1, 2):
        a, b = exported.array == value, truth == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9

    # Transform: the node's matrix is transform.json's template -> patient after LPS -> RAS.
    reg = read_transform_json(folder / "transform.json")
    expected = lps_matrix_to_ras(np.linalg.inv(reg["patient_to_template"]))
    assert np.allclose(_matrix(nodes.transform.GetMatrixTransformToParent), expected, atol=1e-9)
    assert np.allclose(N.transformToLps(nodes.transform),
                       np.linalg.inv(reg["patient_to_template"]), atol=1e-9)
    assert nodes.template.GetTransformNodeID() == nodes.transform.GetID()
    assert nodes.roi.GetTransformNodeID() == nodes.transform.GetID()

    # Grad-CAM: a volume on the CT's voxel lattice covering the crop's box (its own origin),
    # values of gradcam.nii.gz in [0, 1].
    heat = N.volumeFromNode(nodes.gradcam)
    assert box_on_grid(heat, case.ct, atol=1e-6) is not None
    assert np.array_equal(heat.array, read_image(folder / "gradcam.nii.gz").array)
    assert 0.0 <= heat.array.min() and heat.array.max() <= 1.0 and heat.array.max() > 0.5
    display = nodes.gradcam.GetDisplayNode()
    assert display.GetColorNodeID() == N.heatmapColorNode(scene).GetID()

    # Table: four probabilities that sum to 1, the same as result.json's.
    probs = N.probabilitiesFromTable(nodes.table)
    assert list(probs) == ["none", "A", "B", "C"]
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
    assert probs == pytest.approx(res["probabilities"])
    assert N.resultFromTable(nodes.table)["prediction"] == res["prediction"]
    assert (folder / "report.png").is_file()


def test_run_all_answers_the_phantom_class(run_all):
    """The shipped models on a fast phantom: the Weber B case is called B."""
    assert run_all.result["prediction"] == "B", run_all.result["probabilities"]


def test_roi_is_the_template_box_on_the_patient(run_all, logic):
    """The ROI's centre, pushed through its transform, is the box centre mapped to the patient."""
    box = logic.template.box
    reg = read_transform_json(run_all.folder / "transform.json")
    t2p = np.linalg.inv(reg["patient_to_template"])
    centre_patient_lps = (t2p @ np.append(box.centre, 1.0))[:3]
    roi = run_all.nodes.roi
    centre_node = np.zeros(3)
    roi.GetCenter(centre_node)
    to_parent = _matrix(run_all.nodes.transform.GetMatrixTransformToParent)
    centre_world_ras = (to_parent @ np.append(centre_node, 1.0))[:3]
    assert np.allclose(centre_world_ras, centre_patient_lps * [-1, -1, 1], atol=1e-6)
    assert np.allclose(roi.GetSize(), box.size_mm)


def test_results_of_one_ct_are_not_reused_for_another(run_all, logic, scene, ct_node):
    nodes = run_all.nodes
    own = logic.nodesFor(ct_node, nodes)
    assert own.table is nodes.table and own.segmentation is nodes.segmentation
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "another CT")
    fresh = logic.nodesFor(other, nodes)
    assert all(getattr(fresh, k) is None for k in ("segmentation", "transform", "template",
                                                   "roi", "gradcam", "table"))
    # A segmentation the user chose (not made by a run) is kept for any CT.
    users = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn by hand")
    kept = logic.nodesFor(other, type(nodes)(segmentation=users, table=nodes.table))
    assert kept.segmentation is users and kept.table is None
    for node in (other, users):
        scene.RemoveNode(node)


def test_slice_views_jump_to_the_syndesmosis(run_all, scene):
    """After Classify the views are centred on the box, on the patient (transform applied)."""
    view = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    view.SetLayoutName("Red")
    view.SetOrientationToAxial()
    centre = N.jumpSlicesToRoi(scene, run_all.nodes.roi)
    m = view.GetSliceToRAS()
    assert np.allclose([m.GetElement(r, 3) for r in range(3)], centre, atol=1e-6)
    to_parent = _matrix(run_all.nodes.transform.GetMatrixTransformToParent)
    local = np.zeros(3)
    run_all.nodes.roi.GetCenter(local)
    assert np.allclose(centre, (to_parent @ np.append(local, 1.0))[:3], atol=1e-6)
    scene.RemoveNode(view)


def test_heatmap_becomes_the_foreground_of_every_slice_view(run_all, ct_node, scene):
    composites = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    n = N.showHeatmapInSlices(scene, ct_node, run_all.nodes.gradcam, True, 0.4)
    assert n == 3
    for c in composites:
        assert c.GetBackgroundVolumeID() == ct_node.GetID()
        assert c.GetForegroundVolumeID() == run_all.nodes.gradcam.GetID()
        assert c.GetForegroundOpacity() == pytest.approx(0.4)
    N.showHeatmapInSlices(scene, ct_node, run_all.nodes.gradcam, False, 0.4)
    assert all(c.GetForegroundVolumeID() is None for c in composites)
    for c in composites:
        scene.RemoveNode(c)


# ------------------------------------------------------------------------------ stages alone
def test_register_reuses_a_corrected_segmentation_and_leaves_it_alone(run_all, logic, ct_node,
                                                                      scene, case):
    """A clinician's fix (a fibula fragment segmented apart) is what Register uses."""
    nodes = run_all.nodes
    label = N.labelMapFromSegmentation(nodes.segmentation, ct_node, scene)
    fixed = label.array.copy()
    fibula = np.argwhere(fixed == 2)
    low = fibula[fibula[:, 0] < np.percentile(fibula[:, 0], 20)]  # the distal fifth
    fragment = np.zeros_like(fixed)
    fragment[tuple(low.T)] = 1
    fixed[tuple(low.T)] = 0
    N.updateSegmentationFromLabelMap(nodes.segmentation, label.with_array(fixed), ct_node, scene)
    frag_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "fragment")
    N.updateNodeFromVolume(frag_node, label.with_array(fragment))
    N.segmentationsLogic(scene).ImportLabelmapToSegmentationNode(frag_node, nodes.segmentation)
    scene.RemoveNode(frag_node)
    seg = nodes.segmentation.GetSegmentation()
    seg.GetNthSegment(seg.GetNumberOfSegments() - 1).SetName("Fibula fragment")
    n_segments = seg.GetNumberOfSegments()

    out = logic.runStage("register", ct_node, nodes, SETTINGS)
    # The job got the corrected map with the fragment back under the fibula's label.
    used = read_image(out.folder / "segmentation.nii.gz")
    assert np.array_equal(used.array, label.array)
    # The user's segments were not overwritten or merged.
    assert seg.GetNumberOfSegments() == n_segments
    assert (out.folder / "transform.json").is_file()
    # Register alone: no class yet, and the old heatmap is gone from the scene.
    assert out.result["prediction"] is None
    assert nodes.gradcam is None
    assert N.probabilitiesFromTable(nodes.table) == {}


def test_segment_stage_alone(logic, scene, case):
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "second CT")
    N.updateNodeFromVolume(ct, case.ct)
    out = logic.runStage("segment", ct, None, SETTINGS)
    assert out.nodes.segmentation is not None and out.nodes.transform is None
    assert set(json.loads(out.nodes.table.GetAttribute(N.RESULT_ATTRIBUTE))) >= {"warnings"}
    assert sorted(p.name for p in out.folder.iterdir() if p.is_file()) == [
        "result.json", "segmentation.nii.gz"]


def test_bad_inputs_are_clear(logic, tmp_path, ct_node):
    with pytest.raises(InputError, match="select a CT volume"):
        logic.runStage("all", None)
    with pytest.raises(InputError, match="stage must be one of"):
        logic.runStage("everything", ct_node)
    with pytest.raises(InputError, match="result.json"):
        logic.loadResults(tmp_path, ct_node)
    with pytest.raises(InputError, match="device"):
        StageSettings(device="tpu")


# ------------------------------------------------------------------------------ background
def test_background_classify_matches_the_blocking_call(run_all, logic, ct_node, scene):
    nodes = run_all.nodes
    blocking = logic.runStage("classify", ct_node, nodes, SETTINGS)
    job = logic.startStage("classify", ct_node, nodes, SETTINGS, python=sys.executable)
    fractions = []
    while True:
        state = job.process.wait(0.5)
        if state.fraction is not None:
            fractions.append(state.fraction)
        if not state.running:
            break
    assert state.succeeded, state.error
    out = job.finish()
    assert fractions and fractions[-1] == 1.0
    assert out.result["probabilities"] == pytest.approx(blocking.result["probabilities"],
                                                        abs=1e-5)
    assert not (out.folder / "inputs").exists()  # the job's copy of the CT is cleaned up
    # The next click goes to the same warm process (models already loaded).
    pid = logic.worker.pid
    again = logic.startStage("register", ct_node, nodes, SETTINGS, python=sys.executable)
    assert again.process.wait(300).succeeded
    assert logic.worker.pid == pid
    assert again.finish().result["prediction"] is None


@pytest.mark.parametrize("warm", [True, False], ids=["warm worker", "one-shot process"])
def test_cancel_stops_the_background_process(logic, ct_node, warm):
    job = logic.startStage("all", ct_node, ResultNodes(), SETTINGS, python=sys.executable,
                           warm=warm)
    job.cancel()
    state = job.poll()
    assert not state.running and state.cancelled
    with pytest.raises(InputError, match="cancelled"):
        job.finish()
    assert not (job.folder / "inputs").exists()
    if warm:
        assert not logic.worker.running  # Cancel ended the process: the work really stopped
        nxt = logic.startStage("segment", ct_node, ResultNodes(), SETTINGS,
                               python=sys.executable)
        assert nxt.process.wait(300).succeeded  # a fresh worker takes the next click
        nxt.finish()


# ------------------------------------------------------------------------------ refinement
def test_export_training_case_twice_updates_it(run_all, logic, ct_node, tmp_path):
    dataset = tmp_path / "dataset"
    first = logic.exportTrainingCase(dataset, ct_node, run_all.nodes.segmentation, "B",
                                     side="left")
    assert first["caseId"] == "AnkleCT" and not first["updated"]
    with pytest.raises(CaseExistsError):  # the collision test below has the details
        logic.exportTrainingCase(dataset, ct_node, run_all.nodes.segmentation, "C")
    second = logic.exportTrainingCase(dataset, ct_node, run_all.nodes.segmentation, "C",
                                      overwrite=True)
    assert second["updated"] and second["counts"]["cases"] == 1
    ds = Dataset.load(dataset)
    (rec,) = list(ds)
    assert rec.weber == "C" and rec.source == "slicer-export"
    image = read_image(ds.path(rec.image))
    label = read_image(ds.path(rec.segmentation))
    assert label.same_geometry(image, atol=1e-6)
    assert set(np.unique(label.array)) == {0, 1, 2}
    # An unlabelled case (no class, no segmentation) is counted as such.
    logic.exportTrainingCase(dataset, ct_node, None, "unknown", caseId="other case")
    counts = logic.datasetCounts(dataset)
    assert counts["cases"] == 2 and counts["unlabelled"] == 1 and counts["segmented"] == 1
    with pytest.raises(InputError, match="Weber class"):
        logic.exportTrainingCase(dataset, ct_node, None, "D")


# ------------------------------------------------------------------------------ batch
def test_batch_from_the_console_writes_the_command_line_outputs(logic, case, tmp_path, run_all):
    """runBatch over a folder: a sub-folder per case with run's files and results.csv."""
    import csv

    from AnkleFractureLib.io import write_image

    inputs = tmp_path / "cts"
    inputs.mkdir()
    write_image(case.ct, inputs / "ankle_b.nii.gz")
    (inputs / "notes.txt").write_text("not an image")  # skipped, as by 'ankle-fracture batch'
    summary = logic.runBatch(inputs, tmp_path / "out", SETTINGS)
    assert summary.n_ok == 1 and summary.n_error == 0
    with open(summary.csv_path, newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["id"] == "ankle_b" and row["status"] == "ok"
    assert row["prediction"] == run_all.result["prediction"]
    assert (tmp_path / "out" / "ankle_b" / "result.json").is_file()


def test_demo_phantom_loads_as_a_ct_node(logic, scene):
    node = logic.loadDemoPhantom("C", "right", seed=3)
    assert node.GetName() == "Ankle phantom (Weber C, right)"
    ct = N.volumeFromNode(node)
    assert ct.array.dtype == np.int16 and ct.array.max() > 1000  # HU, with bone
    with pytest.raises(InputError, match="demo phantom"):
        logic.loadDemoPhantom("D")
    scene.RemoveNode(node)


def test_results_root_is_the_chosen_folder_else_one_temporary_folder(scene, tmp_path):
    logic = AnkleFractureSceneLogic(scene)
    temporary = logic.resultsRoot
    logic.resultsRoot = None          # the panel's empty field, on every click
    assert logic.resultsRoot == temporary and temporary.is_dir()
    logic.resultsRoot = tmp_path
    assert logic.resultsRoot == tmp_path
    logic.resultsRoot = "."           # emptied again: back to the same temporary folder
    assert logic.resultsRoot == temporary


def test_panel_names_the_labels_the_shape_prior_took_out():
    from AnkleFractureSlicer.logic import describeResult

    finding = {"level": "info", "code": "segmentation_shape_prior", "message": "",
               "details": {"tibia_ml": 14.3, "fibula_ml": 0.4, "margin_tibia_mm": 10.0,
                           "margin_fibula_mm": 15.0}}
    result = {"prediction": "B", "probabilities": {"none": 0.02, "A": 0.03, "B": 0.91,
                                                   "C": 0.04},
              "uncertainty": {"unsure": False}, "warnings": [], "findings": [finding]}
    text = describeResult(result)["warnings"]
    assert "14.3 ml tibia" in text and "0.4 ml fibula" in text
    assert "14.3 ml" not in describeResult(dict(result, findings=[]))["warnings"]
