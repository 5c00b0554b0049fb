"""The user's data is never replaced behind their back (slicer-core scene, no application).

* Export as training case: a case id the dataset already holds (possibly another patient's)
  is refused, naming that case, unless the caller says to overwrite it.
* A segmentation whose segments are not named Tibia / Fibula is neither ignored silently nor
  overwritten: Register / Classify / Export refuse, naming its segments, until the user says
  which segment is which bone; a new segmentation never goes into the user's segments.

Small synthetic volumes: these tests run no model.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (pip install slicer-core) is needed")

MODULE_DIR = Path(__file__).resolve().parents[1] / "AnkleFracture"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from AnkleFractureLib.dataset import Dataset  # noqa: E402
from AnkleFractureLib.errors import InputError  # noqa: E402
from AnkleFractureLib.geometry.volume import Volume  # noqa: E402
from AnkleFractureLib.io import read_image  # noqa: E402

from AnkleFractureSlicer import nodes as N  # noqa: E402
from AnkleFractureSlicer.logic import (AnkleFractureSceneLogic, CaseExistsError,  # noqa: E402
                                       ResultNodes, SegmentMappingError, describeCase)


def _labels(shift: int = 0) -> np.ndarray:
    labels = np.zeros((8, 9, 10), np.uint8)
    labels[1:7, 2:5, 1 + shift:4 + shift] = 1   # "tibia"
    labels[1:7, 6:8, 6:8] = 2                   # "fibula"
    return labels


def _ct(labels: np.ndarray, seed: int) -> Volume:
    rng = np.random.default_rng(seed)
    array = (rng.integers(-1000, -900, labels.shape) + 1400 * (labels > 0)).astype(np.int16)
    return Volume(array, spacing=(0.8, 0.8, 1.5), origin=(10.0, -5.0, 3.0))


@pytest.fixture()
def scene():
    scene = slicer.vtkMRMLScene()
    N.segmentationsLogic(scene)
    return scene


@pytest.fixture()
def logic(scene, tmp_path):
    return AnkleFractureSceneLogic(scene, tmp_path / "results")


def _patient(scene, name: str, seed: int, shift: int = 0):
    """A CT node and a Tibia/Fibula segmentation node for one synthetic patient."""
    labels = _labels(shift)
    ct = _ct(labels, seed)
    ct_node = N.addVolumeNode(scene, ct, name)
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} bones")
    N.updateSegmentationFromLabelMap(seg_node, ct.with_array(labels), ct_node, scene)
    return ct, labels, ct_node, seg_node


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ export
def test_export_refuses_a_case_id_that_exists_and_names_that_case(scene, logic, tmp_path):
    dataset = tmp_path / "dataset"
    ct_a, labels_a, node_a, seg_a = _patient(scene, "Patient A", seed=1)
    ct_b, labels_b, node_b, seg_b = _patient(scene, "Patient B", seed=2, shift=2)
    first = logic.exportTrainingCase(dataset, node_a, seg_a, "B", caseId="case 1", side="left")
    assert first["caseId"] == "case_1" and not first["updated"]
    before = _digest(dataset)

    # Another patient, the same case id: refused, nothing written.
    with pytest.raises(CaseExistsError) as err:
        logic.exportTrainingCase(dataset, node_b, seg_b, "C", caseId="case 1", side="right")
    message = str(err.value)
    assert "'case_1' already exists" in message
    assert "exported from node 'Patient A'" in message and "Weber B" in message
    assert "left side" in message and "with a segmentation" in message
    assert "overwrite=True" in message and "another case id" in message
    assert err.value.caseId == "case_1" and err.value.existing["node"] == "Patient A"
    assert _digest(dataset) == before
    (rec,) = list(Dataset.load(dataset))
    assert rec.weber == "B" and rec.meta["node"] == "Patient A"
    assert np.array_equal(read_image(Dataset.load(dataset).path(rec.image)).array, ct_a.array)

    # The default case id (the node's name) collides the same way.
    logic.exportTrainingCase(dataset, node_b, seg_b, "C")
    node_b2 = N.addVolumeNode(scene, ct_a, "Patient B")
    with pytest.raises(CaseExistsError, match="'Patient_B' already exists"):
        logic.exportTrainingCase(dataset, node_b2, None, "none")

    # Overwriting explicitly replaces the case with the new patient's data.
    replaced = logic.exportTrainingCase(dataset, node_b, seg_b, "C", caseId="case 1",
                                        side="right", overwrite=True)
    assert replaced["updated"] and replaced["counts"]["cases"] == 2
    ds = Dataset.load(dataset)
    rec = ds.get("case_1")
    assert rec.weber == "C" and rec.side == "right" and rec.meta["node"] == "Patient B"
    assert np.array_equal(read_image(ds.path(rec.image)).array, ct_b.array)
    assert np.array_equal(read_image(ds.path(rec.segmentation)).array, labels_b)


def test_existing_case_and_its_description(scene, logic, tmp_path):
    dataset = tmp_path / "dataset"
    assert logic.existingCase(dataset, "x") is None  # no dataset yet
    _, _, node, _ = _patient(scene, "CT 7", seed=3)
    logic.exportTrainingCase(dataset, node, None, "unknown")
    assert logic.exportCaseId(node) == "CT_7" and logic.exportCaseId(node, "a b") == "a_b"
    existing = logic.existingCase(dataset, "CT_7")
    assert existing == {"caseId": "CT_7", "node": "CT 7", "weber": None, "side": None,
                        "source": "slicer-export", "segmented": False}
    assert describeCase(existing) == ("exported from node 'CT 7', no Weber class, "
                                      "no segmentation")
    assert logic.existingCase(dataset, "other") is None
    assert json.loads((dataset / "dataset.json").read_text())["cases"][0]["id"] == "CT_7"


# ------------------------------------------------------------------------------ user's segments
def _users_segmentation(scene, ct, labels, ct_node):
    """A segmentation as a user might draw it: Segment Editor's default names, the fibula
    first, and a third segment that is neither bone."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my drawing")
    label_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "tmp")
    other = labels.copy()
    other[0, 0:2, 0:2] = 3  # a "talus"
    relabel = np.array([0, 2, 1, 3], np.uint8)  # fibula -> 1, tibia -> 2, talus 3
    N.updateNodeFromVolume(label_node, ct.with_array(relabel[other]))
    assert N.segmentationsLogic(scene).ImportLabelmapToSegmentationNode(label_node, node)
    scene.RemoveNode(label_node)
    segmentation = node.GetSegmentation()
    for i, name in enumerate(("Segment_1", "Segment_2", "Segment_3")):
        segmentation.GetNthSegment(i).SetName(name)
    node.SetReferenceImageGeometryParameterFromVolumeNode(ct_node)
    return node


def _snapshot(node, ct_node, scene):
    """Everything about the user's segments: ids, names, colours and voxels per segment."""
    out = {}
    for sid, name in N.segmentList(node):
        segment = node.GetSegmentation().GetSegment(sid)
        voxels = N.labelMapFromSegmentation(node, ct_node, scene, mapping={sid: "tibia"})
        out[sid] = (name, tuple(round(c, 6) for c in segment.GetColor()),
                    None if voxels is None else hashlib.sha256(voxels.array.tobytes()).hexdigest())
    return out


def test_segments_with_other_names_are_refused_by_name_not_ignored(scene, logic, tmp_path):
    """Register / Classify / Export on such a segmentation: a clear refusal naming its
    segments, not a silent fresh segmentation."""
    ct, labels, ct_node, _ = _patient(scene, "Patient", seed=4)
    users = _users_segmentation(scene, ct, labels, ct_node)
    before = _snapshot(users, ct_node, scene)
    assert N.unmatchedSegments(users) == [(sid, name) for sid, (name, _, _) in before.items()]
    for stage in ("register", "classify"):
        with pytest.raises(SegmentMappingError) as err:
            logic.runStage(stage, ct_node, ResultNodes(segmentation=users))
        message = str(err.value)
        assert message.startswith("my drawing: none of its segments")
        assert all(repr(name) in message for name, _, _ in before.values())
        assert "Tibia or Fibula" in message and "segmentMapping" in message
        assert err.value.segments == N.unmatchedSegments(users)
    with pytest.raises(SegmentMappingError):
        logic.startStage("classify", ct_node, ResultNodes(segmentation=users))
    with pytest.raises(SegmentMappingError):
        logic.exportTrainingCase(tmp_path / "dataset", ct_node, users, "B")
    assert not (tmp_path / "dataset").exists()  # nothing exported
    assert _snapshot(users, ct_node, scene) == before
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 2


def test_the_users_mapping_says_which_segment_is_which(scene, logic, tmp_path):
    ct, labels, ct_node, _ = _patient(scene, "Patient", seed=5)
    users = _users_segmentation(scene, ct, labels, ct_node)
    before = _snapshot(users, ct_node, scene)
    ids = [sid for sid, _ in N.segmentList(users)]
    mapping = {ids[0]: "fibula", ids[1]: "Tibia", ids[2]: None}  # the talus is left out

    # What Register / Classify hand to the job: the user's voxels, with the bones swapped back.
    ct_in, label = logic._inputs("register", ct_node, ResultNodes(segmentation=users), mapping)
    assert np.array_equal(label.array, labels)
    assert label.same_geometry(ct, atol=1e-6)
    # The choice is remembered on the node (saved with the scene) for the next clicks.
    assert N.segmentMapping(users) == {ids[0]: 2, ids[1]: 1}
    assert json.loads(users.GetAttribute(N.SEGMENT_MAPPING_ATTRIBUTE)) == {ids[0]: 2, ids[1]: 1}
    _, again = logic._inputs("classify", ct_node, ResultNodes(segmentation=users))
    assert np.array_equal(again.array, labels)

    # Export uses it too.
    info = logic.exportTrainingCase(tmp_path / "dataset", ct_node, users, "A")
    ds = Dataset.load(tmp_path / "dataset")
    assert np.array_equal(read_image(ds.path(ds.get(info["caseId"]).segmentation)).array, labels)
    # The segments themselves were not touched.
    assert _snapshot(users, ct_node, scene) == before

    # Bad mappings are named.
    with pytest.raises(InputError, match="no segment with id 'nope'"):
        logic.userLabelMap(users, ct_node, {"nope": "tibia"})
    with pytest.raises(InputError, match="'tibia' or 'fibula'"):
        logic.userLabelMap(users, ct_node, {ids[0]: "talus"})


def test_a_new_segmentation_never_goes_into_the_users_segments(scene, logic, tmp_path):
    """Segment / Run all with the user's segmentation selected: the run's Tibia / Fibula go
    into a new node; a run's own (or an empty) node is updated as before."""
    from AnkleFractureLib.io import write_image

    ct, labels, ct_node, _ = _patient(scene, "Patient", seed=6)
    users = _users_segmentation(scene, ct, labels, ct_node)
    before = _snapshot(users, ct_node, scene)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "result.json").write_text(json.dumps({"warnings": [], "refused": False}))
    write_image(ct.with_array(labels), folder / "segmentation.nii.gz")

    nodes = ResultNodes(segmentation=users)
    out = logic.loadResults(folder, ct_node, nodes, "segment")
    assert out.nodes.segmentation is not users and out.nodes.segmentation is not None
    assert N.isModuleSegmentation(out.nodes.segmentation)
    assert [name for _, name in N.segmentList(out.nodes.segmentation)] == ["Tibia", "Fibula"]
    assert np.array_equal(N.labelMapFromSegmentation(out.nodes.segmentation, ct_node,
                                                     scene).array, labels)
    assert _snapshot(users, ct_node, scene) == before  # untouched

    # The run's own node is updated in place (no new node each click) ...
    mine = out.nodes.segmentation
    again = logic.loadResults(folder, ct_node, out.nodes, "segment")
    assert again.nodes.segmentation is mine
    # ... and so is an empty node the user chose as the output.
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    filled = logic.loadResults(folder, ct_node, ResultNodes(segmentation=empty), "segment")
    assert filled.nodes.segmentation is empty
    assert [name for _, name in N.segmentList(empty)] == ["Tibia", "Fibula"]
    # A user's segmentation named Tibia / Fibula is not written into either.
    named = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "named by the user")
    N.updateSegmentationFromLabelMap(named, ct.with_array(labels), ct_node, scene)
    named_before = _snapshot(named, ct_node, scene)
    fresh = logic.loadResults(folder, ct_node, ResultNodes(segmentation=named), "all")
    assert fresh.nodes.segmentation is not named
    assert _snapshot(named, ct_node, scene) == named_before
