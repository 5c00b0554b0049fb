"""The segments' terminology tag resolves against the terminology the extension ships.

The tag (``TerminologyEntry``) names a context, a category and a type. Slicer resolves it only
when a loaded terminology file has that context name (its ``SegmentationCategoryTypeContextName``)
with that category and type codes. The tag is read here from segments made on a ``slicer-core``
scene, parsed, checked against ``Resources/Terminology/AnkleFracture.term.json``, and then
resolved by Slicer's own terminology logic after loading that file, as the module does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (pip install slicer-core) is needed")

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "AnkleFracture"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from AnkleFractureSlicer import nodes as N  # noqa: E402
from AnkleFractureSlicer.terminology import BONES, CONTEXT_NAME  # noqa: E402

TERMINOLOGY = ROOT / "Resources" / "Terminology" / "AnkleFracture.term.json"
#: Slicer's built-in anatomic context (the tag names it, with an empty region).
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


def _parseTag(tag: str) -> dict:
    """A Slicer terminology entry string, field by field.

    Format: context~category~type~typeModifier~anatomicContext~region~regionModifier, each
    coded field as CodingSchemeDesignator^CodeValue^CodeMeaning.
    """
    fields = tag.split("~")
    assert len(fields) == 7, f"a terminology entry has 7 fields, got {len(fields)}: {tag!r}"

    def code(text: str) -> tuple:
        parts = text.split("^")
        assert len(parts) == 3, f"a coded field has 3 parts, got {text!r}"
        return tuple(parts)

    return {"context": fields[0], "category": code(fields[1]), "type": code(fields[2]),
            "typeModifier": code(fields[3]), "anatomicContext": fields[4],
            "region": code(fields[5]), "regionModifier": code(fields[6])}


@pytest.fixture(scope="module")
def tags():
    """{bone name: the TerminologyEntry tag on the segment the module wrote}."""
    from AnkleFractureLib.geometry.volume import Volume

    scene = slicer.vtkMRMLScene()
    N.segmentationsLogic(scene)
    labels = np.zeros((6, 7, 8), np.uint8)
    labels[1:4, 1:3, 1:3] = 1
    labels[1:4, 4:6, 4:6] = 2
    ct = Volume(labels.astype(np.int16), spacing=(1.0, 1.0, 2.0))
    ct_node = N.addVolumeNode(scene, ct, "CT")
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "bones")
    ids = N.updateSegmentationFromLabelMap(seg_node, ct.with_array(labels), ct_node, scene)
    segmentation = seg_node.GetSegmentation()
    out = {}
    for bone in BONES:
        segment = segmentation.GetSegment(ids[bone.name])
        out[bone.name] = N.segmentTag(segment, segment.GetTerminologyEntryTagName())
    return out


def test_the_tag_names_the_shipped_context_category_and_type(tags):
    doc = json.loads(TERMINOLOGY.read_text(encoding="utf-8"))
    context = doc["SegmentationCategoryTypeContextName"]
    assert context == CONTEXT_NAME
    categories = {(c["CodingSchemeDesignator"], c["CodeValue"]): c
                  for c in doc["SegmentationCodes"]["Category"]}
    for bone in BONES:
        entry = _parseTag(tags[bone.name])
        assert entry["context"] == context, (
            f"{bone.name}: the tag's context {entry['context']!r} is not the shipped one "
            f"{context!r}: Slicer would resolve it to nothing")
        category = categories.get(entry["category"][:2])
        assert category is not None, f"{bone.name}: category {entry['category']} not shipped"
        types = {(t["CodingSchemeDesignator"], t["CodeValue"]): t for t in category["Type"]}
        assert entry["type"][:2] == ("SCT", bone.code)
        assert entry["type"][:2] in types, f"{bone.name}: type {entry['type']} not shipped"
        assert types[entry["type"][:2]]["CodeMeaning"] == entry["type"][2] == bone.name
        assert entry["anatomicContext"] == ANATOMIC_CONTEXT
        assert entry["typeModifier"] == entry["region"] == entry["regionModifier"] == ("", "", "")


def test_slicers_terminology_logic_resolves_the_tag(tags):
    """After loading the shipped file (as the module does), Slicer finds each segment's entry
    in the context its tag names."""
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    assert logic.LoadTerminologyFromFile(str(TERMINOLOGY)) == CONTEXT_NAME
    assert logic.IsTerminologyContextLoaded(CONTEXT_NAME)
    for bone in BONES:
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(tags[bone.name], entry)
        context = entry.GetTerminologyContextName()  # the context the tag names
        assert logic.IsTerminologyContextLoaded(context), (
            f"{bone.name}: the tag names {context!r}, which no loaded terminology defines")
        category, typ = entry.GetCategoryObject(), entry.GetTypeObject()
        found = logic.FindTerminologyNames(
            category.GetCodingSchemeDesignator(), category.GetCodeValue(),
            typ.GetCodingSchemeDesignator(), typ.GetCodeValue(), "", "", [context])
        assert context in found, f"{bone.name}: Slicer does not resolve {tags[bone.name]!r}"
        # The type Slicer finds there is the bone.
        count = logic.GetNumberOfTypesInTerminologyCategory(context, category)
        shipped = []
        for i in range(count):
            t = slicer.vtkSlicerTerminologyType()
            logic.GetNthTypeInTerminologyCategory(context, category, i, t)
            shipped.append((t.GetCodeValue(), t.GetCodeMeaning()))
        assert (bone.code, bone.name) in shipped
    # The check can fail: a code the file lacks is not found.
    assert CONTEXT_NAME not in logic.FindTerminologyNames("SCT", "123037004", "SCT", "71341001",
                                                          "", "", [CONTEXT_NAME])
