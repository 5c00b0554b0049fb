"""The located fibular fracture in the Slicer module, against real MRML (``slicer-core``).

An output folder is built by hand (a CT, its bones, ``fracture_line.nii.gz`` on a sub-box of
the CT's lattice, a ``result.json`` with a ``fracture``) and loaded with
:meth:`AnkleFractureSceneLogic.loadResults`: the line must become one "Fibula fracture" segment
voxel for voxel at the right place, its centre a labelled marker, and both must go when a
later run locates no line. No model runs here.
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

from conftest import rotation  # noqa: E402

from AnkleFractureLib.errors import InputError  # noqa: E402
from AnkleFractureLib.geometry.volume import Volume  # noqa: E402
from AnkleFractureLib.io import read_image, write_image  # noqa: E402

from AnkleFractureSlicer import nodes as N  # noqa: E402
from AnkleFractureSlicer.logic import (AnkleFractureSceneLogic, ResultNodes,  # noqa: E402
                                       describeResult)
from AnkleFractureSlicer.terminology import BONES  # noqa: E402

#: Where the line's box lies on the CT's grid (z, y, x), away from every border.
BOX = (slice(3, 10), slice(4, 13), slice(5, 16))


# ------------------------------------------------------------------------------ helpers
def _ct() -> Volume:
    """A small anisotropic CT with an oblique, axis-flipped direction (nothing lines up)."""
    rng = np.random.default_rng(3)
    array = rng.integers(-1000, 2000, size=(14, 17, 20)).astype(np.int16)
    direction = rotation("z", 25) @ rotation("x", -10) @ np.diag([1.0, -1.0, -1.0])
    return Volume(array, spacing=(0.45, 0.6, 1.3), origin=(-20.5, 35.25, 90.0),
                  direction=direction)


def _line_mask(shape, offset: int = 0) -> np.ndarray:
    """An oblique, one-voxel-thick surface inside :data:`BOX` on the CT's (z, y, x) grid."""
    full = np.zeros(shape, np.uint8)
    box = full[BOX]
    k, j, i = np.indices(box.shape)
    box[np.abs(i - j + k - 3 - offset) < 1] = 1
    assert box.any() and not box.all()
    return full


def _line_volume(ct: Volume, mask: np.ndarray) -> Volume:
    """The line as the pipeline writes it: only its box, with the box's own origin."""
    return ct.region(BOX).with_array(mask[BOX].copy())


def _centre_lps(ct: Volume, mask: np.ndarray) -> list:
    kji = np.argwhere(mask > 0).mean(axis=0)
    return ct.index_to_physical(kji[::-1][None])[0].tolist()


def _result(fracture=None, weber_from_height=None) -> dict:
    """The keys of result.json that loadResults and the panel read."""
    return {"prediction": "B", "probabilities": {"none": 0.02, "A": 0.03, "B": 0.91, "C": 0.04},
            "uncertainty": {"unsure": False, "entropy": 0.4, "reasons": []}, "warnings": [],
            "refused": False, "findings": [], "fracture": fracture,
            "weber_from_height": weber_from_height}


def _found(centre, height=14.23, probability=0.93) -> dict:
    return {"found": True, "probability": probability, "height_mm": height,
            "center_lps": centre,
            "extent": {"length_mm": 21.0, "height_min_mm": height - 4, "height_max_mm": height + 4,
                       "voxels": 40},
            "size_factor": 1.0, "model": {"name": "test"}}


def _write_folder(folder: Path, ct: Volume, result: dict, line: Volume = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_image(ct, folder / "ct.nii.gz")
    bones = np.zeros(ct.shape, np.uint8)
    bones[:, :8, :9] = 1
    bones[:, 10:, 12:] = 2
    write_image(ct.with_array(bones), folder / "segmentation.nii.gz")
    if line is not None:
        write_image(line, folder / "fracture_line.nii.gz")
    (folder / "result.json").write_text(json.dumps(result), encoding="utf-8")
    return folder


def _export(segmentationNode, segmentId, ctNode, scene) -> Volume:
    """Slicer's own export of one segment onto the CT's grid (the reference)."""
    import vtk

    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentId)
    labelNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "test export")
    try:
        assert N.segmentationsLogic(scene).ExportSegmentsToLabelmapNode(
            segmentationNode, ids, labelNode, ctNode)
        return N.volumeFromNode(labelNode)
    finally:
        scene.RemoveNode(labelNode)


def _the_segment(node):
    segments = N.segmentList(node)
    assert [name for _, name in segments] == ["Fibula fracture"], segments
    return segments[0][0]


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture()
def scene():
    scene = slicer.vtkMRMLScene()
    N.segmentationsLogic(scene)
    return scene


@pytest.fixture()
def logic(scene, tmp_path):
    logic = AnkleFractureSceneLogic(scene, tmp_path / "results")
    yield logic
    logic.shutdown()


@pytest.fixture()
def ct(tmp_path):
    """The CT as a file reads back (so the node has exactly the written geometry)."""
    path = tmp_path / "source" / "ct.nii.gz"
    write_image(_ct(), path)
    return read_image(path)


@pytest.fixture(params=["file", "memory"])
def ct_node(request, scene, ct):
    """The CT node as loaded from the file, or as the user's in-memory volume (float64
    geometry, while the run's files hold float32: the background worker's case)."""
    return N.addVolumeNode(scene, ct if request.param == "file" else _ct(), "AnkleCT")


@pytest.fixture()
def loaded(logic, ct, ct_node, tmp_path):
    """A run's folder with a located line, loaded into the scene."""
    mask = _line_mask(ct.shape)
    centre = _centre_lps(ct, mask)
    folder = _write_folder(tmp_path / "run1", ct, _result(
        _found(centre), {"height_class": "B", "classifier_prediction": "B", "agree": True,
                         "reasons": []}), _line_volume(ct, mask))
    out = logic.loadResults(folder, ct_node)
    return out, mask, centre


# ------------------------------------------------------------------------------ tests
def test_line_becomes_one_segment_voxel_for_voxel(loaded, ct, ct_node, scene):
    out, mask, _ = loaded
    node = out.nodes.fracture
    assert node is not None and node.GetName() == "AnkleCT fibula fracture"
    assert node.GetAttribute(N.ROLE_ATTRIBUTE) == "fracture"
    assert node.GetAttribute(N.CT_ATTRIBUTE) == ct_node.GetID()
    segmentId = _the_segment(node)
    segment = node.GetSegmentation().GetSegment(segmentId)
    assert np.allclose(segment.GetColor(), N.FRACTURE_COLOR)
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is ct_node
    # Slicer's export onto the CT's grid: the line's voxels, at their place, nothing else.
    exported = _export(node, segmentId, ct_node, scene)
    assert exported.same_geometry(ct, atol=1e-5)
    assert np.array_equal(exported.array > 0, mask > 0)
    # And the segment is stored on the CT's own lattice (no resampling happened).
    direct = N._labelsFromBinaryLabelmaps(node, [(1, segmentId)], ct_node, ct.shape)
    assert direct is not None and np.array_equal(direct > 0, mask > 0)
    # The file written is indeed only a sub-box (the test covers the box's own origin).
    line = read_image(out.folder / "fracture_line.nii.gz")
    assert line.shape != ct.shape and not np.allclose(line.origin, ct.origin)


def test_bones_segmentation_never_holds_the_fracture(loaded):
    out, _, _ = loaded
    bones = out.nodes.segmentation
    assert bones is not None and bones is not out.nodes.fracture
    assert sorted(name for _, name in N.segmentList(bones)) == sorted(b.name for b in BONES)


def test_marker_at_the_centre_with_the_height(loaded, ct_node):
    out, _, centre = loaded
    marker = out.nodes.fractureMarker
    assert marker is not None and marker.IsA("vtkMRMLMarkupsFiducialNode")
    assert marker.GetName() == "AnkleCT fracture"
    assert marker.GetAttribute(N.ROLE_ATTRIBUTE) == "fracture_marker"
    assert marker.GetAttribute(N.CT_ATTRIBUTE) == ct_node.GetID()
    assert marker.GetNumberOfControlPoints() == 1
    position = [0.0, 0.0, 0.0]
    marker.GetNthControlPointPosition(0, position)
    x, y, z = centre
    assert np.allclose(position, [-x, -y, z], atol=1e-9)
    assert marker.GetNthControlPointLabel(0) == "Fibula fracture +14.2 mm"
    assert "93 %" in marker.GetNthControlPointDescription(0)
    assert marker.GetLocked()


def test_a_later_run_updates_in_place_and_without_a_line_removes_both(loaded, logic, ct,
                                                                        ct_node, scene,
                                                                        tmp_path):
    out, _, _ = loaded
    nodes = out.nodes
    fracture, marker = nodes.fracture, nodes.fractureMarker
    segmentId = _the_segment(fracture)
    # A new line, below the plafond: the same nodes and segment id, the new voxels and label.
    mask = _line_mask(ct.shape, offset=2)
    centre = _centre_lps(ct, mask)
    folder = _write_folder(tmp_path / "run2", ct, _result(_found(centre, height=-3.46)),
                           _line_volume(ct, mask))
    again = logic.loadResults(folder, ct_node, nodes)
    assert again.nodes.fracture is fracture and again.nodes.fractureMarker is marker
    assert _the_segment(fracture) == segmentId
    assert np.array_equal(_export(fracture, segmentId, ct_node, scene).array > 0, mask > 0)
    assert marker.GetNthControlPointLabel(0) == "Fibula fracture -3.5 mm"
    assert marker.GetNumberOfControlPoints() == 1

    # A caller that kept no fracture nodes (fresh ResultNodes) gets this CT's back: no twin.
    fresh = logic.loadResults(folder, ct_node, ResultNodes())
    assert fresh.nodes.fracture is fracture and fresh.nodes.fractureMarker is marker
    assert len([n for n in _nodes(scene) if n.GetAttribute(N.ROLE_ATTRIBUTE) == "fracture"]) == 1

    # No line this time: both nodes leave the scene.
    none = {"found": False, "probability": 0.12, "height_mm": None, "center_lps": None,
            "extent": None, "size_factor": 1.0, "model": {"name": "test"}}
    folder = _write_folder(tmp_path / "run3", ct, _result(none))
    gone = logic.loadResults(folder, ct_node, nodes)
    assert gone.nodes.fracture is None and gone.nodes.fractureMarker is None
    assert scene.GetNodeByID(fracture.GetID()) is None
    assert scene.GetNodeByID(marker.GetID()) is None


def test_null_fracture_makes_no_nodes(logic, ct, ct_node, tmp_path):
    """An older result (or a refused run): no localiser output, no fracture nodes."""
    out = logic.loadResults(_write_folder(tmp_path / "old", ct, _result(None)), ct_node)
    assert out.nodes.fracture is None and out.nodes.fractureMarker is None


def _nodes(scene):
    return [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]


def test_another_ct_never_takes_over_the_fracture_nodes(loaded, logic, scene, ct, ct_node,
                                                       tmp_path):
    out, _, _ = loaded
    own = logic.nodesFor(ct_node, out.nodes)
    assert own.fracture is out.nodes.fracture and own.fractureMarker is out.nodes.fractureMarker
    other = N.addVolumeNode(scene, ct, "Other CT")
    fresh = logic.nodesFor(other, out.nodes)
    assert fresh.fracture is None and fresh.fractureMarker is None
    # A run on the other CT without a line leaves the first CT's nodes alone.
    logic.loadResults(_write_folder(tmp_path / "other", ct, _result(None)), other, fresh)
    assert scene.GetNodeByID(out.nodes.fracture.GetID()) is out.nodes.fracture
    assert scene.GetNodeByID(out.nodes.fractureMarker.GetID()) is out.nodes.fractureMarker


def test_outputs_follow_the_ct_parent_transform(logic, ct, ct_node, scene, tmp_path):
    moved = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    ct_node.SetAndObserveTransformNodeID(moved.GetID())
    mask = _line_mask(ct.shape)
    folder = _write_folder(tmp_path / "moved", ct, _result(_found(_centre_lps(ct, mask))),
                           _line_volume(ct, mask))
    out = logic.loadResults(folder, ct_node)
    assert out.nodes.fracture.GetTransformNodeID() == moved.GetID()
    assert out.nodes.fractureMarker.GetTransformNodeID() == moved.GetID()


def test_in_process_volume_is_used_instead_of_the_file(logic, ct, ct_node, scene, tmp_path):
    """runStage hands the line over as a Volume (arrays["fracture_line"]): no file read."""
    written, given = _line_mask(ct.shape), _line_mask(ct.shape, offset=3)
    folder = _write_folder(tmp_path / "inproc", ct, _result(_found(_centre_lps(ct, given))),
                           _line_volume(ct, written))
    out = logic.loadResults(folder, ct_node, arrays={"fracture_line": _line_volume(ct, given)})
    segmentId = _the_segment(out.nodes.fracture)
    exported = _export(out.nodes.fracture, segmentId, ct_node, scene)
    assert np.array_equal(exported.array > 0, given > 0)


def test_fracture_segmentation_is_refused_as_the_bones(loaded, logic, ct_node):
    out, _, _ = loaded
    with pytest.raises(InputError, match="fracture line, not the bones"):
        logic.userLabelMap(out.nodes.fracture, ct_node)


# ------------------------------------------------------------------------------ panel texts
def test_describe_found_not_found_and_null():
    agree = {"height_class": "B", "classifier_prediction": "B", "agree": True, "reasons": []}
    text = describeResult(_result(_found([1.0, 2.0, 3.0]), agree))
    assert text["fracture"] == ("Fibula fracture: 14.2 mm above the plafond (Weber B level), "
                                "probability 93 %")
    assert text["prediction"] == "Weber B (91 %)"
    below = describeResult(_result(_found([1.0, 2.0, 3.0], height=-6.04, probability=0.8),
                                   dict(agree, height_class="A")))
    assert below["fracture"] == ("Fibula fracture: 6.0 mm below the plafond (Weber A level), "
                                 "probability 80 %")
    none = {"found": False, "probability": 0.12, "height_mm": None, "center_lps": None,
            "extent": None}
    assert describeResult(_result(none))["fracture"] == \
        "Fibula fracture: none located (probability 12 %)"
    assert describeResult(_result(None))["fracture"] == ""
    assert describeResult(None)["fracture"] == ""
    # Refused and withheld results carry the key too.
    assert describeResult(dict(_result(None), refused=True, refusal="no bone"))["fracture"] == ""
    withheld = dict(_result(none), prediction=None, probabilities=None)
    assert describeResult(withheld)["fracture"].startswith("Fibula fracture: none located")
    # With the line model, candidates the answer did not report are named on a second line.
    lines = [{"found": False, "height_mm": 52.3, "line_probability": 0.41},
             {"found": False, "height_mm": -9.0, "line_probability": 0.03}]
    missed = describeResult(_result({"found": False, "probability": 0.41,
                                     "candidates": lines}, agree))["fracture"]
    assert missed == ("Fibula fracture: none located (probability 41 %)\n"
                      "Other candidate lines: 52.3 mm above (41 %)")


def test_disagreement_reasons_are_not_repeated():
    """The pipeline already warns when the height's class and the classifier disagree."""
    reason = "the fracture lies 20 mm above the plafond (Weber C level) but the network says B"
    result = _result(_found([1.0, 2.0, 3.0], height=20.0),
                     {"height_class": "C", "classifier_prediction": "B", "agree": False,
                      "reasons": [reason]})
    result["warnings"] = [reason]
    text = describeResult(result)
    assert reason not in text["fracture"]
    assert text["fracture"] == ("Fibula fracture: 20.0 mm above the plafond (Weber C level), "
                                "probability 93 %")
    assert sum(v.count(reason) for v in text.values()) == 1


# ------------------------------------------------------------------------------ a real run
SHIPPED_LOCALISER = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "fracture"


@pytest.mark.skipif(not (SHIPPED_LOCALISER / "model.pt").is_file(),
                    reason="no shipped fracture localiser")
def test_run_all_in_process_shows_the_located_line(logic, scene):
    """Run all on a phantom (the shipped models): the line the run wrote is the segment, voxel
    for voxel on the CT's grid (the in-process Volume path), the marker sits at its centre."""
    import torch

    from AnkleFractureLib.crop.syndesmosis import box_on_grid
    from AnkleFractureLib.phantom import generate_case
    from AnkleFractureSlicer.logic import StageSettings

    torch.set_num_threads(2)
    case = generate_case(10, "B", "left", spacing="fast")
    ctNode = N.addVolumeNode(scene, case.ct, "PhantomCT")
    out = logic.runStage("all", ctNode, None, StageSettings(device="cpu"))
    fracture = out.result["fracture"]
    assert fracture is not None
    if not fracture["found"]:
        assert out.nodes.fracture is None and out.nodes.fractureMarker is None
        assert describeResult(out.result)["fracture"].startswith("Fibula fracture: none")
        return
    line = read_image(out.folder / "fracture_line.nii.gz")
    box = box_on_grid(line, case.ct, atol=1e-3)  # the file holds float32 geometry
    assert box is not None
    expected = np.zeros(case.ct.shape, bool)
    expected[box] = line.array > 0
    segmentId = _the_segment(out.nodes.fracture)
    assert np.array_equal(_export(out.nodes.fracture, segmentId, ctNode, scene).array > 0,
                          expected)
    direct = N._labelsFromBinaryLabelmaps(out.nodes.fracture, [(1, segmentId)], ctNode,
                                          case.ct.shape)
    assert direct is not None and np.array_equal(direct > 0, expected)
    position = [0.0, 0.0, 0.0]
    out.nodes.fractureMarker.GetNthControlPointPosition(0, position)
    x, y, z = fracture["center_lps"]
    assert np.allclose(position, [-x, -y, z])
    assert out.nodes.fractureMarker.GetNthControlPointLabel(0) == \
        N.fractureMarkerLabel(fracture["height_mm"])
    assert describeResult(out.result)["fracture"].startswith("Fibula fracture: ")


def test_panel_says_when_the_located_line_settled_the_classifiers_doubt():
    base = {"refused": False, "prediction": "A",
            "probabilities": {"none": 0.03, "A": 0.95, "B": 0.01, "C": 0.01}, "warnings": []}
    settled = {"unsure": False, "reasons": [], "classifier_reasons": ["only 58 %"],
               "settled_by": "the classifier alone was unsure, but the fibular fracture line "
                             "located -8.0 mm from the plafond lies at the Weber A level"}
    text = describeResult({**base, "uncertainty": settled})["uncertainty"]
    assert text.startswith("confident: the classifier alone was unsure") and "-8.0 mm" in text
    plain = describeResult({**base, "uncertainty": {"unsure": False, "entropy": 0.2}})
    assert plain["uncertainty"] == "confident (entropy 0.20)"
