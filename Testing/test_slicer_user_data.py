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
from AnkleFractureLib.geometry.volume import Volume  # noqa: E402
from AnkleFractureLib.io import read_image  # noqa: E402

from AnkleFractureSlicer import nodes as N  # noqa: E402
from AnkleFractureSlicer.logic import (AnkleFractureSceneLogic, CaseExistsError,  # noqa: E402
                                       describeCase)


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
