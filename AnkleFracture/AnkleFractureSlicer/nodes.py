"""MRML nodes from and to the library's images, transforms and results.

Axis orders and frames: ``slicer.util.arrayFromVolume`` and :class:`Volume.array` are both
numpy (z, y, x), i.e. (k, j, i). A volume node's geometry is its IJKToRAS matrix (RAS mm);
the library's is the IJK -> LPS affine. The conversion happens in
:mod:`AnkleFractureLib.geometry.frames` only, never here.

Everything works on the node's *own* frame: a parent transform of the CT is ignored while
analysing and given to every output node, so the results stay aligned with the CT however the
user has moved it.

Only MRML and VTK are used (no Qt): the functions run inside Slicer and under pytest with the
``slicer-core`` package.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from AnkleFractureLib.errors import InputError
from AnkleFractureLib.geometry.frames import (lps_affine_to_ras, lps_matrix_to_ras,
                                              lps_points_to_ras, ras_affine_to_lps,
                                              ras_matrix_to_lps)
from AnkleFractureLib.geometry.volume import Volume

from AnkleFractureSlicer.terminology import BONES, Bone, boneForSegmentName

#: Attribute that marks the nodes this module made, and which output each one is.
ROLE_ATTRIBUTE = "AnkleFracture.Role"
#: Table attribute holding the whole result.json (the panel is restored from it).
RESULT_ATTRIBUTE = "AnkleFracture.Result"
#: Attribute naming the CT node (its ID) a result node was made for.
CT_ATTRIBUTE = "AnkleFracture.CT"
#: The four classes, in the classifier's order, and how the panel names them.
CLASS_NAMES = (("none", "No fracture"), ("A", "Weber A"), ("B", "Weber B"), ("C", "Weber C"))

_SEG_LOGICS: Dict[int, Any] = {}


# ---------------------------------------------------------------------- scene services
def segmentationsLogic(scene: Any) -> Any:
    """The Segmentations module logic for ``scene``.

    Inside Slicer this is the application's; with ``slicer-core`` alone one is created for the
    scene (creating it registers the representation converters that segmentations need).
    """
    import slicer

    modules = getattr(slicer, "modules", None)
    if modules is not None and hasattr(modules, "segmentations"):
        return modules.segmentations.logic()
    key = id(scene)
    logic = _SEG_LOGICS.get(key)
    if logic is None or logic.GetMRMLScene() is not scene:
        logic = slicer.vtkSlicerSegmentationsModuleLogic()
        logic.SetMRMLScene(scene)
        _SEG_LOGICS[key] = logic
    return logic


def _vtkMatrix(array: np.ndarray) -> Any:
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def _npMatrix(matrix: Any) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _copyParentTransform(node: Any, reference: Any) -> None:
    """Place ``node`` under ``reference``'s parent transform (see the module docstring)."""
    node.SetAndObserveTransformNodeID(reference.GetTransformNodeID() if reference else None)


# ---------------------------------------------------------------------- volumes
def volumeFromNode(node: Any) -> Volume:
    """The node's voxels and geometry as a library :class:`Volume` (LPS).

    Args:
        node: A scalar (or labelmap) volume node with image data.

    Returns:
        A Volume whose array is a copy of the node's, in (z, y, x) order; ``meta`` names the
        node.

    Raises:
        InputError: The node has no image data, or is not a single-component 3D image.
    """
    name = node.GetName() if node is not None else None
    if node is None or node.GetImageData() is None:
        raise InputError(name, "the volume node has no image data (load a CT first)")
    image = node.GetImageData()
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(name, f"the volume has {image.GetNumberOfScalarComponents()} "
                               "components per voxel; a CT has one")
    dims = image.GetDimensions()
    if min(dims) < 1 or image.GetPointData().GetScalars() is None:
        raise InputError(name, "the volume is empty")
    from vtk.util.numpy_support import vtk_to_numpy

    array = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1]).copy()
    return geometryFromNode(node).with_array(
        array, meta={"source": f"Slicer node {name}", "format": "mrml", "node": name})


def geometryFromNode(node: Any) -> Volume:
    """A Volume with the node's grid and geometry (LPS) and a zero-strided placeholder array
    (no voxel copy): use ``.with_array`` to put voxels on the node's grid."""
    name = node.GetName() if node is not None else None
    if node is None or node.GetImageData() is None:
        raise InputError(name, "the volume node has no image data (load a CT first)")
    dims = node.GetImageData().GetDimensions()
    lps = ras_affine_to_lps(_npMatrix(_ijkToRas(node)))
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise InputError(name, f"the volume has a zero spacing {spacing.tolist()}")
    placeholder = np.broadcast_to(np.zeros(1, np.uint8), tuple(dims[::-1]))
    return Volume(placeholder, spacing=spacing, origin=lps[:3, 3],
                  direction=lps[:3, :3] / spacing, meta={"node": name})


def _ijkToRas(node: Any) -> Any:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return m


def updateNodeFromVolume(node: Any, volume: Volume) -> Any:
    """Give ``node`` the volume's voxels and geometry (LPS -> RAS); returns the node."""
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk

    array = np.ascontiguousarray(volume.array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = vtk.vtkImageData()
    image.SetDimensions(*volume.size)  # VTK is x-fastest: the (z, y, x) array's C order
    scalars = numpy_to_vtk(array.reshape(-1), deep=True)
    image.GetPointData().SetScalars(scalars)
    # Display nodes are the caller's business (temporary nodes need none).
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(_vtkMatrix(lps_affine_to_ras(volume.affine)))
    return node


def addVolumeNode(scene: Any, volume: Volume, name: str,
                  className: str = "vtkMRMLScalarVolumeNode") -> Any:
    """A new volume node in ``scene`` holding ``volume``, with display nodes."""
    node = scene.AddNewNodeByClass(className, name)
    updateNodeFromVolume(node, volume)
    node.CreateDefaultDisplayNodes()
    return node


# ---------------------------------------------------------------------- segmentations
#: Attribute of a segmentation node keeping the user's choice of which segments are the tibia
#: and the fibula (JSON {segment id: 1 | 2}), for segments not named after the bones.
SEGMENT_MAPPING_ATTRIBUTE = "AnkleFracture.SegmentMapping"
_BONE_BY_WORD = {**{b.name.lower(): b.label for b in BONES},
                 **{str(b.label): b.label for b in BONES}}
_IGNORE_WORDS = ("", "none", "ignore", "0")


def segmentList(segmentationNode: Any) -> List[Any]:
    """[(segment id, segment name)] of a segmentation node, in its order."""
    segmentation = segmentationNode.GetSegmentation()
    return [(segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i).GetName() or "")
            for i in range(segmentation.GetNumberOfSegments())]


def normalizeSegmentMapping(segmentationNode: Any, mapping: Dict[str, Any]) -> Dict[str, int]:
    """A user's mapping as {segment id: bone label (1 tibia, 2 fibula)}.

    Args:
        segmentationNode: The segmentation the ids belong to.
        mapping: {segment id: "tibia" | "fibula" | 1 | 2}; None, "none" or "ignore" leave a
            segment out. Several segments may map to one bone (fracture fragments).

    Raises:
        InputError: An id the segmentation does not have, or a value that is not a bone; the
            message names them and the segmentation's segments.
    """
    present = dict(segmentList(segmentationNode))
    out: Dict[str, int] = {}
    unknown, bad = [], []
    for segmentId, value in dict(mapping).items():
        if segmentId not in present:
            unknown.append(segmentId)
            continue
        word = "" if value is None else str(value).strip().lower()
        if word in _IGNORE_WORDS:
            continue
        if word not in _BONE_BY_WORD:
            bad.append(f"{segmentId!r}: {value!r}")
            continue
        out[segmentId] = _BONE_BY_WORD[word]
    name = segmentationNode.GetName()
    if unknown:
        raise InputError(name, f"no segment with id {', '.join(map(repr, unknown))}; its "
                               f"segments are {_describeSegments(list(present.items()))}")
    if bad:
        raise InputError(name, f"a segment maps to 'tibia' or 'fibula' (or None to leave it "
                               f"out), got {', '.join(bad)}")
    return out


def setSegmentMapping(segmentationNode: Any, mapping: Optional[Dict[str, Any]]) -> Dict[str, int]:
    """Remember which segments are the tibia and fibula on the node (saved with the scene);
    None or {} forgets it. The segments themselves are not touched."""
    normalized = normalizeSegmentMapping(segmentationNode, mapping or {})
    segmentationNode.SetAttribute(SEGMENT_MAPPING_ATTRIBUTE,
                                  json.dumps(normalized) if normalized else None)
    return normalized


def segmentMapping(segmentationNode: Any) -> Dict[str, int]:
    """The remembered mapping ({} when none), limited to segments the node still has."""
    text = segmentationNode.GetAttribute(SEGMENT_MAPPING_ATTRIBUTE)
    if not text:
        return {}
    try:
        stored = json.loads(text)
    except ValueError:
        return {}
    present = {sid for sid, _ in segmentList(segmentationNode)}
    labels = {b.label for b in BONES}
    return {str(k): int(v) for k, v in (stored.items() if isinstance(stored, dict) else [])
            if str(k) in present and v in labels}


def boneSegmentIds(segmentationNode: Any,
                   mapping: Optional[Dict[str, Any]] = None) -> Dict[int, List[str]]:
    """Segment ids per bone label (1 tibia, 2 fibula), fragments included.

    With a mapping (given, else the one remembered on the node by :func:`setSegmentMapping`)
    exactly the mapped segments count; without one, segments count by name
    (:func:`boneForSegmentName`).
    """
    out: Dict[int, List[str]] = {b.label: [] for b in BONES}
    chosen = (normalizeSegmentMapping(segmentationNode, mapping) if mapping
              else segmentMapping(segmentationNode))
    for segmentId, name in segmentList(segmentationNode):
        if chosen:
            label = chosen.get(segmentId)
        else:
            bone = boneForSegmentName(name)
            label = bone.label if bone is not None else None
        if label is not None:
            out[label].append(segmentId)
    return out


def unmatchedSegments(segmentationNode: Any,
                      mapping: Optional[Dict[str, Any]] = None) -> List[Any]:
    """The node's segments [(id, name)] when none of them is a bone (by name, or by the given
    or remembered mapping): the user must say which is which. [] when some segment is a bone,
    or when the node has no segments (nothing to use, nothing to lose)."""
    if segmentationNode is None:
        return []
    segments = segmentList(segmentationNode)
    if not segments or any(boneSegmentIds(segmentationNode, mapping).values()):
        return []
    return segments


def _describeSegments(segments: Sequence[Any]) -> str:
    return ", ".join(repr(name) if name == sid else f"{name!r} (id {sid})"
                     for sid, name in segments) or "none"


def isModuleSegmentation(segmentationNode: Any) -> bool:
    """True for a segmentation a run of this module made (its segments may be rewritten by the
    next Segment); False for the user's own."""
    return segmentationNode.GetAttribute(ROLE_ATTRIBUTE) == "segmentation"


def segmentTag(segment: Any, name: str) -> str:
    """A segment's tag value ("" when absent)."""
    import vtk

    value = vtk.mutable("")
    return str(value) if segment.GetTag(name, value) else ""


def _styleSegment(segment: Any, bone: Bone) -> None:
    segment.SetName(bone.name)
    segment.SetColor(*bone.color)
    segment.SetTag(segment.GetTerminologyEntryTagName(), bone.terminologyEntry())


def updateSegmentationFromLabelMap(segmentationNode: Any, label: Volume, ctNode: Any,
                                   scene: Any) -> Dict[str, str]:
    """Write a tibia (1) / fibula (2) label map into ``Tibia`` and ``Fibula`` segments.

    Existing segments of those names are updated in place (their ids, and any other segments,
    are kept); missing ones are created with the bones' colours and SNOMED CT terminology. The
    segmentation references ``ctNode`` as its source geometry.

    Args:
        segmentationNode: The output segmentation node.
        label: uint8 label map on the CT's grid.
        ctNode: The CT volume node.
        scene: The MRML scene.

    Returns:
        {"Tibia": segment id, "Fibula": segment id}.
    """
    segmentationsLogic(scene)  # first: it registers the representation converters
    segmentation = segmentationNode.GetSegmentation()
    _referenceCt(segmentationNode, ctNode)
    ids: Dict[str, str] = {}
    for bone in BONES:
        segmentId = segmentation.GetSegmentIdBySegmentName(bone.name)
        if not segmentId:
            segmentId = segmentation.AddEmptySegment("", bone.name, list(bone.color))
        _styleSegment(segmentation.GetSegment(segmentId), bone)
        ids[bone.name] = segmentId
    _importLabels(segmentationNode, label, [ids[bone.name] for bone in BONES], scene)
    return ids


def _referenceCt(segmentationNode: Any, ctNode: Any) -> None:
    """Make ``ctNode`` the segmentation's source geometry and copy its parent transform."""
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(ctNode)
    segmentationNode.SetNodeReferenceID(segmentationNode.GetReferenceImageGeometryReferenceRole(),
                                        ctNode.GetID())
    _copyParentTransform(segmentationNode, ctNode)


def _importLabels(segmentationNode: Any, label: Volume, segmentIds: Sequence[str],
                  scene: Any) -> None:
    """Import a label map into existing segments: value v updates ``segmentIds[v - 1]`` in
    place. The label map keeps its own geometry (e.g. a sub-box of the CT's lattice)."""
    import vtk

    labelNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "AnkleFracture temp labels")
    try:
        values = np.asarray(label.array)
        if values.dtype != np.uint8:
            values = values.astype(np.uint8)
        updateNodeFromVolume(labelNode, label.with_array(values))
        updated = vtk.vtkStringArray()
        for segmentId in segmentIds:
            updated.InsertNextValue(segmentId)
        if not segmentationsLogic(scene).ImportLabelmapToSegmentationNode(
                labelNode, segmentationNode, updated):
            raise RuntimeError("Slicer could not import the label map into the segmentation")
    finally:
        scene.RemoveNode(labelNode)
    if segmentationNode.GetDisplayNode() is None:
        segmentationNode.CreateDefaultDisplayNodes()


# ---------------------------------------------------------------------- located fracture
#: The located fibular fracture line's segment (in its own segmentation node, never among the
#: bones: a segment named "Fibula ..." counts as fibula there, see :func:`boneForSegmentName`).
FRACTURE_SEGMENT_NAME = "Fibula fracture"
#: Its colour: bright green, apart from the bones' beige and the heatmap's red-to-yellow ramp.
#: No terminology: neither the shipped term.json nor Slicer's general anatomy list has a code
#: for a fracture line, and none is made up here.
FRACTURE_COLOR = (0.1, 1.0, 0.3)


def updateFractureSegmentation(segmentationNode: Any, line: Volume, ctNode: Any,
                               scene: Any) -> str:
    """Write the located fracture line into the node's one ``Fibula fracture`` segment.

    Args:
        segmentationNode: The fracture segmentation node (other segments are removed).
        line: uint8 mask, non-zero on the line, on the CT's voxel lattice (any sub-box of it,
            with its own origin, like ``fracture_line.nii.gz``).
        ctNode: The CT volume node (the segmentation's source geometry).
        scene: The MRML scene.

    Returns:
        The segment's id (kept across updates).
    """
    segmentationsLogic(scene)
    segmentation = segmentationNode.GetSegmentation()
    _referenceCt(segmentationNode, ctNode)
    segmentId = segmentation.GetSegmentIdBySegmentName(FRACTURE_SEGMENT_NAME)
    for otherId, _ in segmentList(segmentationNode):
        if otherId != segmentId:
            segmentation.RemoveSegment(otherId)
    if not segmentId:
        segmentId = segmentation.AddEmptySegment("", FRACTURE_SEGMENT_NAME, list(FRACTURE_COLOR))
    segment = segmentation.GetSegment(segmentId)
    segment.SetName(FRACTURE_SEGMENT_NAME)
    segment.SetColor(*FRACTURE_COLOR)
    mask = (np.asarray(line.array) > 0).astype(np.uint8)
    _importLabels(segmentationNode, line.with_array(mask), [segmentId], scene)
    return segmentId


def fractureMarkerLabel(heightMm: Optional[float]) -> str:
    """The marker's label: "Fibula fracture +14.2 mm" (above the plafond; "-" below), or
    "Fibula fracture" when no height was measured.

    Example:
        >>> fractureMarkerLabel(14.23), fractureMarkerLabel(-3.0), fractureMarkerLabel(None)
        ('Fibula fracture +14.2 mm', 'Fibula fracture -3.0 mm', 'Fibula fracture')
    """
    if heightMm is None:
        return FRACTURE_SEGMENT_NAME
    return f"{FRACTURE_SEGMENT_NAME} {float(heightMm):+.1f} mm"


def setFractureMarker(markupsNode: Any, centerLps: Sequence[float], label: str,
                      parentReference: Any = None, description: str = "") -> Any:
    """One locked control point at the fracture's centre (patient LPS -> RAS), labelled.

    Args:
        markupsNode: A ``vtkMRMLMarkupsFiducialNode`` (its other points are removed).
        centerLps: The centre (x, y, z) in the CT's patient LPS mm (``result.json``).
        label: The point's label (see :func:`fractureMarkerLabel`).
        parentReference: The CT node: the marker goes under its parent transform.
        description: The point's description (e.g. the probability).
    """
    centre = lps_points_to_ras(np.asarray(centerLps, dtype=float)[None])[0]
    markupsNode.RemoveAllControlPoints()
    index = markupsNode.AddControlPoint([float(v) for v in centre], label)
    markupsNode.SetNthControlPointDescription(index, description)
    markupsNode.SetLocked(True)  # measured on the CT: moving it means nothing
    _copyParentTransform(markupsNode, parentReference)
    if markupsNode.GetDisplayNode() is None:
        markupsNode.CreateDefaultDisplayNodes()
    display = markupsNode.GetDisplayNode()
    if display is not None:
        display.SetSelectedColor(*FRACTURE_COLOR)
        display.SetColor(*FRACTURE_COLOR)
    return markupsNode


def labelMapFromSegmentation(segmentationNode: Any, ctNode: Any, scene: Any,
                             direct: bool = True,
                             mapping: Optional[Dict[str, Any]] = None) -> Optional[Volume]:
    """The tibia/fibula label map of a (possibly corrected) segmentation, on the CT's grid.

    Segments are assigned to a bone by the user's mapping (``mapping``, else the one remembered
    on the node), else by name (:func:`boneForSegmentName`): "Tibia", "Fibula", and fragments
    such as "Fibula fragment" keep their parent bone's label. Other segments (e.g. a talus)
    are ignored. Where segments overlap, the fibula wins (it is the bone the Weber class is
    read from).

    Args:
        segmentationNode: The segmentation (None: no label map).
        ctNode: The CT; the label map is on its grid.
        scene: The MRML scene.
        direct: Read segments that lie on the CT's grid straight from their labelmaps (exact,
            fast); False always uses Slicer's export (the reference the tests compare with).
        mapping: {segment id: "tibia" | "fibula"} (see :func:`normalizeSegmentMapping`).

    Returns:
        uint8 Volume (0 background, 1 tibia, 2 fibula) with exactly the CT's geometry, or None
        when the node has no tibia or fibula voxels.
    """
    import vtk

    if segmentationNode is None:
        return None
    groups = boneSegmentIds(segmentationNode, mapping)
    ordered = [(bone.label, sid) for bone in BONES for sid in groups[bone.label]]
    if not ordered:
        return None
    ct = geometryFromNode(ctNode)  # the grid only: no copy of the CT's voxels
    fast = (_labelsFromBinaryLabelmaps(segmentationNode, ordered, ctNode, ct.shape)
            if direct else None)
    if fast is not None:
        if not fast.any():
            return None
        return ct.with_array(fast, meta={"source": f"Slicer segmentation "
                                                   f"{segmentationNode.GetName()}"})
    ids = vtk.vtkStringArray()
    for _, sid in ordered:
        ids.InsertNextValue(sid)
    labelNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "AnkleFracture temp export")
    try:
        if not segmentationsLogic(scene).ExportSegmentsToLabelmapNode(segmentationNode, ids,
                                                                      labelNode, ctNode):
            raise InputError(segmentationNode.GetName(), "Slicer could not export the segments "
                                                         "onto the CT's grid")
        exported = volumeFromNode(labelNode)
    finally:
        scene.RemoveNode(labelNode)
    if exported.shape != ct.shape:
        raise InputError(segmentationNode.GetName(), "the exported segments are not on the "
                                                     "CT's grid")
    # Exported values are 1..n in the order of ``ids``: map each back to its bone.
    lut = np.zeros(len(ordered) + 1, np.uint8)
    for i, (bone_label, _) in enumerate(ordered, start=1):
        lut[i] = bone_label
    values = lut[np.clip(exported.array.astype(np.int64), 0, len(ordered))]
    if not values.any():
        return None
    return ct.with_array(values, meta={"source": f"Slicer segmentation "
                                                 f"{segmentationNode.GetName()}"})


def _labelsFromBinaryLabelmaps(segmentationNode: Any, ordered: List[Any], ctNode: Any,
                               shape: Sequence[int]) -> Optional[np.ndarray]:
    """The label map read straight from the segments' binary labelmaps (no resampling), or
    None when a segment is not a labelmap on the CT's voxel lattice (the CT's grid or a part
    of it, shifted by whole voxels).

    Segments made here, or edited in Segment Editor with this CT as source, live on the CT's
    grid: reading them directly is exact and ~20x faster than Slicer's export (seconds on a
    clinical CT). Anything else (another grid, a transform between the two, surfaces) goes
    through :meth:`ExportSegmentsToLabelmapNode`.
    """
    import slicer
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    if segmentationNode.GetTransformNodeID() != ctNode.GetTransformNodeID():
        return None
    reference = _npMatrix(_ijkToRas(ctNode))
    name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    segmentation = segmentationNode.GetSegmentation()
    out = np.zeros(tuple(shape), np.uint8)
    nz, ny, nx = out.shape
    for bone_label, segment_id in ordered:  # in order: later bones overwrite earlier ones
        segment = segmentation.GetSegment(segment_id)
        image = segment.GetRepresentation(name) if segment is not None else None
        if image is None:
            return None
        x0, x1, y0, y1, z0, z1 = image.GetExtent()
        if x1 < x0 or y1 < y0 or z1 < z0 or image.GetPointData().GetScalars() is None:
            continue  # an empty segment
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        # The segment's voxel (i, j, k) in CT voxels: must be the same lattice, shifted by
        # whole voxels (a segment stored on a sub-grid of the CT's grid).
        to_ct = np.linalg.solve(reference, _npMatrix(matrix))
        shift = np.rint(to_ct[:3, 3])
        if not (np.allclose(to_ct[:3, :3], np.eye(3), atol=1e-6)
                and np.allclose(to_ct[:3, 3], shift, atol=1e-4)):
            return None
        values = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(
            z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1)
        mask = values == segment.GetLabelValue()
        lo = np.array([x0, y0, z0]) + shift.astype(int)   # (i, j, k) in the CT
        hi = np.array([x1, y1, z1]) + shift.astype(int)
        clo, chi = np.maximum(lo, 0), np.minimum(hi, [nx - 1, ny - 1, nz - 1])
        if np.any(chi < clo):
            continue  # entirely outside the CT
        a, b = clo - lo, chi - lo  # the part of the segment's box inside the CT
        part = mask[a[2]:b[2] + 1, a[1]:b[1] + 1, a[0]:b[0] + 1]
        out[clo[2]:chi[2] + 1, clo[1]:chi[1] + 1, clo[0]:chi[0] + 1][part] = bone_label
    return out


def addTemplateSegmentation(scene: Any, templateLabels: Volume, transformNode: Any,
                            node: Any = None) -> Any:
    """The healthy template's bones as a segmentation under the registration transform.

    The template lives in its own frame; under ``transformNode`` (template -> patient) it
    overlays the patient's bones. Shown as outlines in the slices and translucent in 3D.
    """
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Healthy template")
        node.SetAttribute(ROLE_ATTRIBUTE, "template")
    reference = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "AnkleFracture temp template")
    try:
        updateNodeFromVolume(reference, templateLabels)
        updateSegmentationFromLabelMap(node, templateLabels, reference, scene)
    finally:
        scene.RemoveNode(reference)
    node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), None)
    node.SetAndObserveTransformNodeID(transformNode.GetID() if transformNode else None)
    display = node.GetDisplayNode()
    if display is not None:
        display.SetOpacity2DFill(0.0)
        display.SetOpacity3D(0.35)
    return node


# ---------------------------------------------------------------------- transforms and ROI
def setTransformFromLps(transformNode: Any, templateToPatientLps: np.ndarray,
                        parentReference: Any = None) -> Any:
    """Set a linear transform node from a template -> patient matrix in LPS.

    Slicer's "to parent" matrix maps the child's (template) RAS coordinates to the parent's
    (patient) RAS coordinates, which is this matrix expressed in RAS.
    """
    transformNode.SetMatrixTransformToParent(
        _vtkMatrix(lps_matrix_to_ras(np.asarray(templateToPatientLps, dtype=float))))
    _copyParentTransform(transformNode, parentReference)
    return transformNode


def transformToLps(transformNode: Any) -> np.ndarray:
    """The node's "to parent" matrix as a point transform in LPS (inverse of the above)."""
    import vtk

    m = vtk.vtkMatrix4x4()
    transformNode.GetMatrixTransformToParent(m)
    return ras_matrix_to_lps(_npMatrix(m))


def setRoiFromBox(roiNode: Any, centreLps: Sequence[float], axesLps: np.ndarray,
                  sizeMm: Sequence[float], transformNode: Any) -> Any:
    """An ROI markup of a template-frame box, shown on the patient through ``transformNode``.

    Args:
        roiNode: A ``vtkMRMLMarkupsROINode``.
        centreLps: Box centre (x, y, z) in template mm (the template frame is LPS-like).
        axesLps: 3x3, columns = the box's x, y, z axes in the template frame.
        sizeMm: Edge lengths (x, y, z) in mm.
        transformNode: The template -> patient transform (the ROI's parent).
    """
    centre = lps_points_to_ras(np.asarray(centreLps, dtype=float)[None])[0]
    # The same box in RAS: each axis flips with the frame; conjugating keeps a rotation.
    axes = lps_matrix_to_ras(_homogeneous(np.asarray(axesLps, dtype=float)))
    orientation = np.eye(4)
    orientation[:3, :3] = axes[:3, :3]
    orientation[:3, 3] = centre
    roiNode.SetAndObserveObjectToNodeMatrix(_vtkMatrix(orientation))
    roiNode.SetCenter(*centre.tolist())
    roiNode.SetSize(*[float(v) for v in sizeMm])
    roiNode.SetAndObserveTransformNodeID(transformNode.GetID() if transformNode else None)
    roiNode.SetLocked(True)  # the box is defined on the template; moving it means nothing
    return roiNode


def _homogeneous(rotation: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rotation
    return m


def jumpSlicesToRoi(scene: Any, roiNode: Any) -> np.ndarray:
    """Centre every slice view on the ROI (the syndesmosis, where the class is read).

    Returns:
        The ROI's centre in world RAS mm (its transform applied).
    """
    import slicer

    centre = [0.0, 0.0, 0.0]
    roiNode.GetCenterWorld(centre)
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *centre,
                                          slicer.vtkMRMLSliceNode.CenteredJumpSlice)
    return np.asarray(centre)


# ---------------------------------------------------------------------- heatmap
def heatmapColorNode(scene: Any) -> Any:
    """The module's heatmap colour table (created once per scene): dark red -> yellow -> white."""
    name = "AnkleFracture heatmap"
    existing = scene.GetFirstNodeByName(name)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    for i in range(256):
        t = i / 255.0  # a "hot" ramp: black-red, red-yellow, yellow-white
        r, g, b = min(1.0, 3 * t), min(1.0, max(0.0, 3 * t - 1)), min(1.0, max(0.0, 3 * t - 2))
        node.SetColor(i, f"{t:.2f}", r, g, b, 1.0)
    node.SetAttribute(ROLE_ATTRIBUTE, "heatmap-colors")
    return node


def styleHeatmap(heatmapNode: Any, scene: Any, threshold: float = 0.2) -> None:
    """Show a [0, 1] heatmap with the heatmap colours; values below ``threshold`` transparent."""
    if heatmapNode.GetDisplayNode() is None:
        heatmapNode.CreateDefaultDisplayNodes()
    display = heatmapNode.GetDisplayNode()
    display.SetAndObserveColorNodeID(heatmapColorNode(scene).GetID())
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetApplyThreshold(True)
    display.SetLowerThreshold(threshold)
    display.SetUpperThreshold(1.0)


def showHeatmapInSlices(scene: Any, ctNode: Any, heatmapNode: Any, visible: bool,
                        opacity: float) -> int:
    """CT as background and the heatmap as foreground (or none) in every slice view.

    Returns:
        How many slice views were set (0 without views, e.g. a bare test scene).
    """
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    composites.UnRegister(None)  # a new collection, owned here (as slicer.util.getNodesByClass)
    count = 0
    for i in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(i)
        if ctNode is not None:
            composite.SetBackgroundVolumeID(ctNode.GetID())
        composite.SetForegroundVolumeID(heatmapNode.GetID() if (visible and heatmapNode)
                                        else None)
        composite.SetForegroundOpacity(float(opacity))
        count += 1
    return count


# ---------------------------------------------------------------------- results table
def updateTableFromResult(tableNode: Any, result: Dict[str, Any]) -> Any:
    """Fill a table with the four probabilities and keep the whole result as an attribute.

    Columns: "Class" (No fracture, Weber A, B, C), "Probability" (0..1). A refused or
    withheld result has an empty probability column and says why in the "Note" column.
    """
    import vtk

    table = tableNode.GetTable()
    table.Initialize()
    names = vtk.vtkStringArray()
    names.SetName("Class")
    probs = vtk.vtkDoubleArray()
    probs.SetName("Probability")
    notes = vtk.vtkStringArray()
    notes.SetName("Note")
    p = result.get("probabilities") or {}
    for key, title in CLASS_NAMES:
        names.InsertNextValue(title)
        probs.InsertNextValue(float(p[key]) if key in p else float("nan"))
        note = ""
        if result.get("prediction") == key:
            note = "prediction" + (" (unsure)" if (result.get("uncertainty") or {}).get("unsure")
                                   else "")
        elif not p:
            note = result.get("refusal") or result.get("withheld_reason") or "not classified"
        notes.InsertNextValue(note)
    table.AddColumn(names)
    table.AddColumn(probs)
    table.AddColumn(notes)
    tableNode.SetAttribute(RESULT_ATTRIBUTE, json.dumps(result))
    tableNode.Modified()
    return tableNode


def probabilitiesFromTable(tableNode: Any) -> Dict[str, float]:
    """The probabilities a results table holds ({} when it holds none)."""
    table = tableNode.GetTable()
    column = table.GetColumnByName("Probability")
    if column is None:
        return {}
    out = {}
    for row, (key, _) in enumerate(CLASS_NAMES):
        value = column.GetValue(row)
        if np.isfinite(value):
            out[key] = float(value)
    return out


def resultFromTable(tableNode: Any) -> Optional[Dict[str, Any]]:
    """The result.json dict stored on a results table (None when absent)."""
    if tableNode is None:
        return None
    text = tableNode.GetAttribute(RESULT_ATTRIBUTE)
    return json.loads(text) if text else None
