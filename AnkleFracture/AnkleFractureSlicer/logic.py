"""Everything the AnkleFracture panel does, on an explicit MRML scene.

:class:`AnkleFractureSceneLogic` is the module's logic without Qt: the Slicer module's
``AnkleFractureLogic`` wraps it with ``slicer.mrmlScene``, and the tests run it on a
``slicer-core`` scene. Each button is one call:

=============================  ===========================================================
Segment / Register / Classify  :meth:`~AnkleFractureSceneLogic.runStage` (blocking, for
/ Run all                      scripts) or :meth:`~AnkleFractureSceneLogic.startStage` (in a
                               background process; poll it, then ``finish()``)
Export as training case        :meth:`~AnkleFractureSceneLogic.exportTrainingCase`
Train segmentation/classifier  :meth:`~AnkleFractureSceneLogic.startTraining`
Batch (Python console)         :meth:`~AnkleFractureSceneLogic.runBatch`
=============================  ===========================================================

Example (the Slicer Python console)::

    logic = slicer.modules.anklefracture.widgetRepresentation().self().logic
    out = logic.runStage("all", getNode("AnkleCT"))
    out.result["prediction"], out.result["probabilities"]
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from AnkleFractureLib.errors import InputError
from AnkleFractureLib.geometry.volume import Volume

from AnkleFractureSlicer import nodes as N
from AnkleFractureSlicer.background import BackgroundProcess, WorkerProcess, pythonExecutable

PathLike = Union[str, "os.PathLike[str]"]
ProgressCallback = Callable[[float, str], None]

STAGES = ("segment", "register", "classify", "all")
#: Device choices of the panel -> the library's device names.
DEVICES = {"auto": "auto", "gpu": "cuda", "cpu": "cpu"}


@dataclass
class StageSettings:
    """The panel's settings that change how a stage runs.

    Attributes:
        side: "auto", "left" or "right".
        device: "auto", "gpu" or "cpu".
        tta: Classifier test-time augmentations (None: the model's default).
        segModelDir: Segmentation model folder (None: the shipped one).
        clsModelDir: Classifier folder (None: the shipped one).
        reportPdf: Also write report.pdf.
    """

    side: str = "auto"
    device: str = "auto"
    tta: Optional[int] = None
    segModelDir: Optional[str] = None
    clsModelDir: Optional[str] = None
    reportPdf: bool = False

    def __post_init__(self) -> None:
        if self.side not in ("auto", "left", "right"):
            raise InputError(None, f"side must be auto, left or right, got {self.side!r}")
        if self.device not in DEVICES:
            raise InputError(None, f"device must be auto, gpu or cpu, got {self.device!r}")
        for name in ("segModelDir", "clsModelDir"):
            value = getattr(self, name)
            # The panel's empty path field reads as "." (pathlib): that means "the shipped one".
            setattr(self, name, None if value in (None, "", ".") else str(value))

    def pipelineOptions(self) -> Any:
        from AnkleFractureLib.pipeline.pipeline import PipelineOptions

        return PipelineOptions(side=self.side, device=DEVICES[self.device], tta=self.tta,
                               seg_model_dir=self.segModelDir, cls_model_dir=self.clsModelDir)


@dataclass
class ResultNodes:
    """The nodes one CT's results live in (None: not made yet)."""

    segmentation: Any = None
    transform: Any = None
    template: Any = None
    roi: Any = None
    gradcam: Any = None
    table: Any = None
    fracture: Any = None  # the located fibular fracture line (a segmentation node)
    fractureMarker: Any = None  # its centre (a markups fiducial node)


@dataclass
class StageOutput:
    """What a finished stage produced.

    Attributes:
        stage: The stage that ran.
        folder: Its output folder (``run``'s files: result.json, report.png, ...).
        result: The ``result.json`` dict.
        nodes: The nodes now holding the results.
    """

    stage: str
    folder: Path
    result: Dict[str, Any]
    nodes: ResultNodes


@dataclass
class BackgroundStage:
    """A stage running in a background process; poll ``process``, then call :meth:`finish`."""

    logic: "AnkleFractureSceneLogic"
    stage: str
    ctNode: Any
    nodes: ResultNodes
    folder: Path
    updateSegmentation: bool
    process: Any  # a BackgroundProcess, or a WorkerTask of the warm worker

    def poll(self) -> Any:
        return self.process.poll()

    def cancel(self) -> None:
        self.process.cancel()

    def finish(self) -> StageOutput:
        """Load the finished stage's files into the scene.

        Raises:
            InputError: The process failed or was cancelled (the message says why).
        """
        state = self.process.poll()
        if state.running:
            raise RuntimeError("the stage is still running")
        try:
            if state.cancelled:
                raise InputError(None, "the run was cancelled")
            if state.returncode != 0:
                raise InputError(None, state.error or "the run failed")
            return self.logic.loadResults(self.folder, self.ctNode, self.nodes, self.stage,
                                          self.updateSegmentation, self.folder / "inputs")
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        """Remove the copies of the CT and segmentation handed to the process."""
        if not self.process.poll().running:
            shutil.rmtree(self.folder / "inputs", ignore_errors=True)


def describeResult(result: Optional[Dict[str, Any]]) -> Dict[str, str]:
    """The panel's texts for a result.json dict, in plain words.

    Returns:
        {"prediction": ..., "uncertainty": ..., "warnings": ..., "fracture": ...}; "warnings"
        ends with the label-free segmentation check's line when the run made one; "fracture"
        is the located fibular fracture line (:func:`describeFracture`).

    Example:
        >>> describeResult({"prediction": "B", "probabilities": {"none": 0.02, "A": 0.03,
        ...     "B": 0.91, "C": 0.04}, "uncertainty": {"unsure": False, "entropy": 0.41},
        ...     "warnings": []})["prediction"]
        'Weber B (91 %)'
    """
    if not result:
        return {"prediction": "No result yet: click Run all (or Segment, Register, Classify).",
                "uncertainty": "", "warnings": "", "fracture": ""}
    return dict(_describeClass(result), fracture=describeFracture(result))


def _describeClass(result: Dict[str, Any]) -> Dict[str, str]:
    warnings = list(result.get("warnings") or [])
    if result.get("refused"):
        reasons = result.get("refusals") or [result.get("refusal") or "no reason given"]
        return {"prediction": "No Weber class: this scan cannot support one.",
                "uncertainty": "",
                "warnings": "\n".join(f"Refused: {r}" for r in reasons)
                + "".join(f"\nWarning: {w}" for w in warnings) + _agreementLine(result)}
    probabilities = result.get("probabilities") or {}
    prediction = result.get("prediction")
    titles = dict(N.CLASS_NAMES)
    if prediction is None or not probabilities:
        stage = result.get("stage")
        done = {"segment": "Segmented", "register": "Registered"}.get(stage or "", "Done")
        why = result.get("withheld_reason")
        text = f"{done}; no Weber class yet" + (f": {why}" if why else " (click Classify).")
        return {"prediction": text, "uncertainty": "",
                "warnings": ("\n".join(f"Warning: {w}" for w in warnings) or "No warnings.")
                + _agreementLine(result)}
    headline = f"{titles.get(prediction, prediction)} ({probabilities[prediction]:.0%})"
    headline = headline.replace("%)", " %)")
    unc = result.get("uncertainty") or {}
    if unc.get("unsure"):
        reasons = unc.get("reasons") or ["the uncertainty is high"]
        uncertainty = "UNSURE, review the CT: " + "; ".join(reasons)
    elif unc.get("settled_by"):  # the classifier's doubt, settled by the located line
        uncertainty = f"confident: {unc['settled_by']}"
    else:
        entropy = unc.get("entropy")
        uncertainty = "confident" + (f" (entropy {entropy:.2f})" if entropy is not None else "")
    return {"prediction": headline, "uncertainty": uncertainty,
            "warnings": ("\n".join(f"Warning: {w}" for w in warnings) or "No warnings.")
            + _agreementLine(result)}


def describeFracture(result: Optional[Dict[str, Any]]) -> str:
    """The located fibular fracture line in words, for the panel ("" when the localiser did
    not run: ``result["fracture"]`` is null or absent).

    A disagreement between the height's Weber level and the classifier is not repeated here:
    the pipeline already gives its reasons as a warning and in the uncertainty.

    Example:
        >>> describeFracture({"fracture": {"found": True, "probability": 0.93,
        ...     "height_mm": 14.23}, "weber_from_height": {"height_class": "B"}})
        'Fibula fracture: 14.2 mm above the plafond (Weber B level), probability 93 %'
        >>> describeFracture({"fracture": {"found": False, "probability": 0.12}})
        'Fibula fracture: none located (probability 12 %)'
        >>> describeFracture({"fracture": {"found": True, "probability": 0.9, "height_mm": 61.0,
        ...     "candidates": [{"found": True, "cortex_ring": 1, "height_mm": 61.0}]}})
        'Fibula fracture: 61.0 mm above the plafond, probability 90 %; found by the cortical ring check'
    """
    fracture = (result or {}).get("fracture")
    if not isinstance(fracture, dict):
        return ""
    probability = fracture.get("probability")
    percent = f"{100 * float(probability):.0f} %" if probability is not None else None
    if not fracture.get("found"):
        return ("Fibula fracture: none located" + (f" (probability {percent})" if percent else "")
                + _otherLines(fracture))
    height = fracture.get("height_mm")
    if height is None:
        where = "located (height not measured)"
    elif abs(float(height)) < 0.05:
        where = "at the level of the plafond"
    else:
        where = f"{abs(float(height)):.1f} mm {'above' if height > 0 else 'below'} the plafond"
    level = ((result or {}).get("weber_from_height") or {}).get("height_class")
    if level:
        where += f" (Weber {level} level)"
    ring = any(c.get("found") and c.get("cortex_ring") for c in fracture.get("candidates") or [])
    return (f"Fibula fracture: {where}" + (f", probability {percent}" if percent else "")
            + ("; found by the cortical ring check" if ring else "") + _otherLines(fracture))


def _otherLines(fracture: Dict[str, Any]) -> str:
    """A newline and the candidate lines the answer did not report (line model), or ""."""
    from AnkleFractureLib.fracture.localise import describe_other_lines

    text = describe_other_lines(fracture)
    return f"\n{text[0].upper()}{text[1:]}" if text else ""


def _agreementLine(result: Dict[str, Any]) -> str:
    """Newline-led lines of the label-free segmentation check (the finding
    ``segmentation_agreement``) and of the labels the template's shape prior took out
    (``segmentation_shape_prior``), or "" when the run has neither."""
    from AnkleFractureLib.registration.shape_prior import describe_shape_prior
    from AnkleFractureLib.segmentation.quality import describe_agreement

    describe = {"segmentation_agreement": describe_agreement,
                "segmentation_shape_prior": describe_shape_prior}
    lines = [describe[f["code"]](f.get("details") or {})
             for f in result.get("findings") or []
             if isinstance(f, dict) and f.get("code") in describe]
    return "".join("\n" + line for line in lines)


def saveReport(result: Dict[str, Any], path: PathLike) -> Path:
    """Save the run's one-page report (report.png, or report.pdf when the run made one)."""
    folder = Path(result.get("folder") or "")
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in (".png", ".pdf"):
        raise InputError(target, "the report is saved as .png or .pdf")
    source = folder / f"report{suffix}"
    if not source.is_file():
        raise InputError(source, f"the run wrote no report{suffix} (classify first"
                                 + (", or save it as .png)" if suffix == ".pdf" else ")"))
    from AnkleFractureLib.io import atomic_output

    with atomic_output(target) as tmp:
        shutil.copyfile(source, tmp)
    return target


def _readResult(path: Path) -> Dict[str, Any]:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "the run wrote no result.json (it did not finish)") from None
    except (OSError, ValueError) as exc:
        raise InputError(path, f"result.json is not readable: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(path, "result.json is not a JSON object")
    return data


def safeName(name: str) -> str:
    """A file-system safe folder name for a node name.

    Example:
        >>> safeName("CT: ankle / left")
        'CT_ankle_left'
    """
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9._-]", "_", name or "")).strip("_.") or "ct"


class CaseExistsError(InputError):
    """An export would replace a case the dataset already holds (possibly another patient's).

    Attributes:
        caseId: The case id.
        existing: What the dataset says of that case (:meth:`AnkleFractureSceneLogic.existingCase`).
    """

    def __init__(self, dataset: PathLike, caseId: str, existing: Dict[str, Any]) -> None:
        self.caseId = caseId
        self.existing = existing
        super().__init__(dataset, f"case {caseId!r} already exists in this dataset "
                                  f"({describeCase(existing)}); exporting would replace it. "
                                  "Choose another case id, or overwrite that case explicitly "
                                  "(overwrite=True; the panel asks first)")


def describeCase(existing: Dict[str, Any]) -> str:
    """A dataset case in a few words, e.g. "exported from node 'CT 7', Weber B, left side,
    with a segmentation".

    Example:
        >>> describeCase({"node": "CT 7", "weber": "B", "side": "left", "segmented": True,
        ...               "source": "slicer-export"})
        "exported from node 'CT 7', Weber B, left side, with a segmentation"
    """
    origin = (f"exported from node {existing['node']!r}" if existing.get("node")
              else f"source {existing.get('source') or 'unknown'}")
    weber = existing.get("weber")
    parts = [origin, ("no Weber class" if weber is None
                      else "no fracture" if weber == "none" else f"Weber {weber}")]
    if existing.get("side"):
        parts.append(f"{existing['side']} side")
    parts.append("with a segmentation" if existing.get("segmented") else "no segmentation")
    return ", ".join(parts)


class SegmentMappingError(InputError):
    """The user's segmentation has segments, but none named Tibia / Fibula (nor a mapping
    saying which is which): using none of them, or segmenting over them, would be wrong.

    Attributes:
        segments: [(segment id, segment name)] of the segmentation.
    """

    def __init__(self, segmentationNode: Any, segments: Sequence[Any]) -> None:
        self.segments = list(segments)
        listed = ", ".join(repr(name) if name == sid else f"{name!r} (id {sid})"
                           for sid, name in self.segments)
        super().__init__(segmentationNode.GetName(),
                         f"none of its segments ({listed}) is named Tibia or Fibula (or "
                         "'Tibia ...' / 'Fibula ...' for fragments). Say which segment is the "
                         "tibia and which the fibula (segmentMapping={segment id: 'tibia' or "
                         "'fibula'}; the panel asks), rename them, or choose no segmentation "
                         "to segment the CT. The segments were left as they are")


class AnkleFractureSceneLogic:
    """The module's logic on one MRML scene.

    Args:
        scene: The ``vtkMRMLScene`` (``slicer.mrmlScene`` inside Slicer).
        resultsRoot: Folder for each CT's output folder (default: a new temporary folder).
    """

    def __init__(self, scene: Any, resultsRoot: Optional[PathLike] = None) -> None:
        self.scene = scene
        N.segmentationsLogic(scene)  # segmentations need its converters (slicer-core alone)
        self._resultsRoot = Path(resultsRoot) if resultsRoot else None
        self._tempRoot: Optional[Path] = None
        self._pipeline: Any = None
        self._pipelineKey: Any = None
        self._template: Any = None
        self._worker: Optional[WorkerProcess] = None

    # ------------------------------------------------------------------ folders and models
    @property
    def resultsRoot(self) -> Path:
        """The chosen results folder, else one temporary folder for the whole session."""
        if self._resultsRoot is not None:
            return self._resultsRoot
        if self._tempRoot is None:
            self._tempRoot = Path(tempfile.mkdtemp(prefix="AnkleFracture-"))
        return self._tempRoot

    @resultsRoot.setter
    def resultsRoot(self, value: Optional[PathLike]) -> None:
        self._resultsRoot = Path(value) if value not in (None, "", ".") else None

    def resultsFolder(self, ctNode: Any) -> Path:
        """Where the runs on ``ctNode`` write their files (one folder per CT node)."""
        return self.resultsRoot / f"{safeName(ctNode.GetName())}_{safeName(ctNode.GetID())}"

    def pipeline(self, settings: Optional[StageSettings] = None) -> Any:
        """A :class:`~AnkleFractureLib.pipeline.Pipeline` for ``settings``; models stay loaded
        between runs with the same settings."""
        from AnkleFractureLib.pipeline.pipeline import Pipeline

        settings = settings or StageSettings()
        key = (settings.side, settings.device, settings.tta, settings.segModelDir,
               settings.clsModelDir)
        if self._pipeline is None or key != self._pipelineKey:
            self._pipeline = Pipeline(settings.pipelineOptions())
            self._pipelineKey = key
        return self._pipeline

    @property
    def template(self) -> Any:
        """The shipped healthy template (loaded once)."""
        if self._template is None:
            from AnkleFractureLib.registration.template import load_template

            self._template = load_template()
        return self._template

    @staticmethod
    def deviceDescription() -> str:
        """What hardware the models can use, in words (for the panel)."""
        try:
            import torch
        except ImportError:
            return "PyTorch is not installed"
        if torch.cuda.is_available():
            return f"GPU: {torch.cuda.get_device_name(0)}"
        return "CPU (no CUDA GPU found)"

    def loadDemoPhantom(self, weber: str = "B", side: str = "left", seed: int = 10) -> Any:
        """The project's synthetic ankle CT as a new volume node (for trying the module).

        Args:
            weber: Danis-Weber class of the phantom's fracture ("none", "A", "B", "C").
            side: "left" or "right".
            seed: Phantom seed (same seed, same CT).

        Returns:
            The volume node, named after its ground truth (e.g. "Ankle phantom (Weber B, left)").
        """
        from AnkleFractureLib.dataset.layout import CLASSES
        from AnkleFractureLib.phantom import generate_case

        if weber not in CLASSES or side not in ("left", "right"):
            raise InputError(None, f"a demo phantom needs a class in {CLASSES} and a side, got "
                                   f"{weber!r}, {side!r}")
        case = generate_case(seed, weber, side, spacing="fast")
        title = "no fracture" if weber == "none" else f"Weber {weber}"
        node = N.addVolumeNode(self.scene, case.ct, f"Ankle phantom ({title}, {side})")
        node.SetAttribute(N.ROLE_ATTRIBUTE + ".Demo", weber)
        return node

    # ------------------------------------------------------------------ stages
    def _inputs(self, stage: str, ctNode: Any, nodes: ResultNodes,
                segmentMapping: Optional[Dict[str, Any]] = None) -> Any:
        if stage not in STAGES:
            raise InputError(None, f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        if ctNode is None:
            raise InputError(None, "select a CT volume first")
        label = None
        if stage in ("register", "classify") and nodes.segmentation is not None:
            label = self.userLabelMap(nodes.segmentation, ctNode, segmentMapping)
        ct = N.volumeFromNode(ctNode)
        return ct, label

    def userLabelMap(self, segmentationNode: Any, ctNode: Any,
                     segmentMapping: Optional[Dict[str, Any]] = None) -> Any:
        """The tibia/fibula label map of a segmentation (None: no segmentation, or one without
        segments or voxels), by the segments' names or the user's mapping.

        Args:
            segmentationNode: The segmentation (the user's or a run's).
            ctNode: The CT (the label map is on its grid).
            segmentMapping: {segment id: "tibia" | "fibula"} for segments not named after the
                bones; it is remembered on the node (attribute
                :data:`~AnkleFractureSlicer.nodes.SEGMENT_MAPPING_ATTRIBUTE`) for the next
                clicks. The segments themselves are never changed.

        Raises:
            SegmentMappingError: The segmentation has segments, none is a bone by name and no
                mapping says which is which (the message names the segments).
        """
        if segmentationNode is None:
            return None
        if segmentationNode.GetAttribute(N.ROLE_ATTRIBUTE) == "fracture":
            raise InputError(segmentationNode.GetName(),
                             "this is the located fracture line, not the bones: choose the "
                             "bones segmentation (or none, to segment the CT)")
        if segmentMapping:
            N.setSegmentMapping(segmentationNode, segmentMapping)
        unmatched = N.unmatchedSegments(segmentationNode)
        if unmatched:
            raise SegmentMappingError(segmentationNode, unmatched)
        return N.labelMapFromSegmentation(segmentationNode, ctNode, self.scene)

    def runStage(self, stage: str, ctNode: Any, nodes: Optional[ResultNodes] = None,
                 settings: Optional[StageSettings] = None,
                 progress: Optional[ProgressCallback] = None,
                 shouldCancel: Optional[Callable[[], bool]] = None,
                 segmentMapping: Optional[Dict[str, Any]] = None) -> StageOutput:
        """Run one stage in this process and put its results into nodes (blocking).

        Args:
            stage: "segment", "register", "classify" or "all".
            ctNode: The CT volume node.
            nodes: Existing result nodes to update (``nodes.segmentation`` is the user's
                segmentation: Register and Classify reuse it, corrections included); missing
                ones are created.
            settings: Side, device, models (default :class:`StageSettings`).
            progress: Called with (fraction, message).
            shouldCancel: Polled; True stops the run
                (:class:`~AnkleFractureLib.errors.CancelledError`).
            segmentMapping: Which of the user's segments are the tibia and the fibula when
                they are not named so (see :meth:`userLabelMap`).

        Returns:
            The :class:`StageOutput` (``result`` is the result.json dict).

        Raises:
            SegmentMappingError: Register / Classify on a segmentation whose segments are not
                named after the bones, without a mapping.
        """
        from AnkleFractureLib.pipeline.job import run_stage_result

        nodes = nodes or ResultNodes()
        settings = settings or StageSettings()
        ct, label = self._inputs(stage, ctNode, nodes, segmentMapping)
        folder = self.resultsFolder(ctNode)
        result, _ = run_stage_result(stage, ct, folder, label, self.pipeline(settings),
                                     progress, shouldCancel, settings.reportPdf)
        # The volumes are in memory already: no file is read back. The heatmap goes as a
        # Volume: it covers only the crop's box, with its own origin.
        arrays: Dict[str, Any] = {}
        if result.label is not None:
            arrays["label"] = result.label.array
        if result.gradcam is not None:
            arrays["gradcam"] = result.gradcam
        if getattr(result, "fracture_line", None) is not None:  # a Volume on a sub-box, too
            arrays["fracture_line"] = result.fracture_line
        return self.loadResults(folder, ctNode, nodes, stage, updateSegmentation=label is None,
                                arrays=arrays)

    def startStage(self, stage: str, ctNode: Any, nodes: Optional[ResultNodes] = None,
                   settings: Optional[StageSettings] = None, python: Optional[str] = None,
                   warm: bool = True,
                   segmentMapping: Optional[Dict[str, Any]] = None) -> BackgroundStage:
        """Start one stage in a background process (see :class:`BackgroundStage`).

        With ``warm`` (the panel's way) the stage goes to this logic's
        :class:`~AnkleFractureSlicer.background.WorkerProcess`, which keeps the models loaded
        between clicks; otherwise a fresh process runs it alone. Cancel ends either process.

        The CT (and the current segmentation for Register / Classify) are written to the
        output folder's ``inputs/`` (removed by :meth:`BackgroundStage.finish`); the process runs
        :mod:`AnkleFractureLib.pipeline.job`. ``segmentMapping`` and the errors are as for
        :meth:`runStage`.
        """
        from AnkleFractureLib.io import write_image
        from AnkleFractureLib.pipeline.job import JobRequest

        nodes = nodes or ResultNodes()
        settings = settings or StageSettings()
        ct, label = self._inputs(stage, ctNode, nodes, segmentMapping)
        folder = self.resultsFolder(ctNode)
        inputs = folder / "inputs"
        inputs.mkdir(parents=True, exist_ok=True)
        # Uncompressed: a temporary hand-over to the child (a 512^2 x 365 CT: ~0.3 s, not ~2.5 s).
        write_image(ct, inputs / "ct.nii")
        labelPath = None
        if label is not None:
            labelPath = str(inputs / "label.nii")
            write_image(label, labelPath)
        request = JobRequest(stage=stage, ct=str(inputs / "ct.nii"), out=str(folder),
                             label=labelPath, side=settings.side,
                             device=DEVICES[settings.device], tta=settings.tta,
                             seg_model_dir=settings.segModelDir,
                             cls_model_dir=settings.clsModelDir, report_pdf=settings.reportPdf,
                             handoff=str(inputs))
        request.write(inputs / "request.json")
        python = python or pythonExecutable()
        process: Any
        if warm:
            process = self._workerFor(python).submit(inputs / "request.json",
                                                     inputs / "progress.jsonl", folder)
        else:
            process = BackgroundProcess(
                [python, "-m", "AnkleFractureLib.pipeline.job", str(inputs / "request.json")],
                workDir=inputs, outputDir=folder).start()
        return BackgroundStage(self, stage, ctNode, nodes, folder, label is None, process)

    def _workerFor(self, python: str) -> WorkerProcess:
        if self._worker is None or self._worker.python != python:
            self.shutdown()
            self._worker = WorkerProcess(python, self.resultsRoot / ".worker")
        return self._worker

    @property
    def worker(self) -> Optional[WorkerProcess]:
        """The warm background process (None before the first background stage)."""
        return self._worker

    def shutdown(self) -> None:
        """End the warm background process (the module calls this when it is closed)."""
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

        # ------------------------------------------------------------------ results -> nodes
    def loadResults(self, folder: PathLike, ctNode: Any, nodes: Optional[ResultNodes] = None,
                    stage: str = "all", updateSegmentation: bool = True,
                    handoff: Optional[PathLike] = None,
                    arrays: Optional[Dict[str, Any]] = None) -> StageOutput:
        """Put the files of a finished run (``run``'s output folder) into nodes.

        * segmentation.nii.gz -> ``Tibia`` / ``Fibula`` segments (unless the run started from
          the user's segmentation, which is then left exactly as it is). They go into
          ``nodes.segmentation`` only when a run made it or it is empty: a segmentation of the
          user's with segments is never written into, a new node takes the run's segments;
        * transform.json -> a linear transform node (template -> patient, in RAS), the healthy
          template as a segmentation under it, and the syndesmosis box as an ROI under it;
        * gradcam.nii.gz -> a scalar volume with the heatmap colours, with its own geometry:
          the crop's box on the CT's voxel lattice (a few percent of the CT's voxels), which
          Slicer overlays on the CT as the foreground layer;
        * fracture_line.nii.gz -> a segmentation "<CT> fibula fracture" with one segment,
          ``Fibula fracture`` (never among the bones: training export reads segments named
          "Fibula ..." as fibula), from the line's own box on the CT's lattice, with the CT as
          source geometry; result.json's ``fracture.center_lps`` (when found) -> a markups
          point "<CT> fracture" at the line's centre, labelled with its height above (+) or
          below (-) the plafond;
        * result.json -> a table with the four probabilities (the whole result is kept as
          an attribute, so a saved scene restores the panel).

        Nodes of outputs the run did not produce (e.g. a heatmap after a new Segment) are
        removed, so the scene never shows results of an older run beside newer ones. With
        ``arrays`` ("label" -> the array on the CT's grid, "gradcam" -> the heatmap Volume,
        "fracture_line" -> the line's Volume, from an in-process run) or
        ``handoff`` (the folder of the job's raw arrays,
        :func:`AnkleFractureLib.pipeline.job.save_handoff`) the voxels come from there instead
        of decompressing the NIfTI files (seconds on a clinical CT).
        """
        from AnkleFractureLib.io import read_image

        folder = Path(folder)
        nodes = nodes or ResultNodes()
        result = _readResult(folder / "result.json")
        scene = self.scene
        base = ctNode.GetName()

        def volume(key: str, fileName: str) -> Any:
            """The output on the CT's grid: given, or handed off, else read from its file."""
            from AnkleFractureLib.pipeline.job import load_handoff

            array = (arrays or {}).get(key)
            if isinstance(array, Volume):  # a volume with its own geometry (the heatmap's box)
                return array
            if array is None and handoff is not None:
                array = load_handoff(handoff, key)
            if array is not None:
                reference = N.geometryFromNode(ctNode)
                if array.shape == reference.shape:
                    return reference.with_array(array, meta={"source": str(folder / fileName)})
            return read_image(folder / fileName)

        if updateSegmentation and (folder / "segmentation.nii.gz").is_file():
            own = nodes.segmentation
            if own is not None and not N.isModuleSegmentation(own) and N.segmentList(own):
                nodes.segmentation = None  # the user's segments stay as they are
            if nodes.segmentation is None:
                nodes.segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                             f"{base} bones")
            nodes.segmentation.SetAttribute(N.ROLE_ATTRIBUTE, "segmentation")
            N.updateSegmentationFromLabelMap(nodes.segmentation,
                                             volume("label", "segmentation.nii.gz"),
                                             ctNode, scene)

        if (folder / "transform.json").is_file():
            from AnkleFractureLib.registration.transform_io import read_transform_json

            reg = read_transform_json(folder / "transform.json")
            templateToPatient = np.linalg.inv(reg["patient_to_template"])
            if nodes.transform is None:
                nodes.transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode",
                                                          f"{base} template to patient")
                nodes.transform.SetAttribute(N.ROLE_ATTRIBUTE, "transform")
            N.setTransformFromLps(nodes.transform, templateToPatient, ctNode)
            if nodes.template is None:
                nodes.template = N.addTemplateSegmentation(scene, self.template.labels,
                                                           nodes.transform)
            else:
                nodes.template.SetAndObserveTransformNodeID(nodes.transform.GetID())
            box = self.template.box
            if nodes.roi is None:
                nodes.roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode",
                                                    f"{base} syndesmosis box")
                nodes.roi.SetAttribute(N.ROLE_ATTRIBUTE, "roi")
            N.setRoiFromBox(nodes.roi, box.centre, box.axes, box.size_mm, nodes.transform)
        else:
            for name in ("roi", "template", "transform"):
                self._removeNode(nodes, name)

        if (folder / "gradcam.nii.gz").is_file():
            heat = volume("gradcam", "gradcam.nii.gz")
            if nodes.gradcam is None:
                nodes.gradcam = N.addVolumeNode(scene, heat, f"{base} Grad-CAM")
                nodes.gradcam.SetAttribute(N.ROLE_ATTRIBUTE, "gradcam")
            else:
                N.updateNodeFromVolume(nodes.gradcam, heat)
            nodes.gradcam.SetAndObserveTransformNodeID(ctNode.GetTransformNodeID())
            N.styleHeatmap(nodes.gradcam, scene)
        else:
            self._removeNode(nodes, "gradcam")

        self._loadFracture(folder, result, ctNode, nodes, arrays)

        if nodes.table is None:
            nodes.table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{base} Weber class")
            nodes.table.SetAttribute(N.ROLE_ATTRIBUTE, "table")
        result = dict(result, stage=stage, folder=str(folder))
        N.updateTableFromResult(nodes.table, result)
        for node in (nodes.segmentation, nodes.transform, nodes.template, nodes.roi,
                     nodes.gradcam, nodes.table, nodes.fracture, nodes.fractureMarker):
            if node is not None:
                node.SetAttribute(N.CT_ATTRIBUTE, ctNode.GetID())
        return StageOutput(stage, folder, result, nodes)

    @staticmethod
    def nodesFor(ctNode: Any, nodes: ResultNodes) -> ResultNodes:
        """The result nodes that belong to ``ctNode``; those made for another CT are dropped
        (None), so choosing another CT never overwrites the first one's results. A
        segmentation the user made or chose (not one of ours) is kept."""
        def mine(node: Any) -> Any:
            if node is None or ctNode is None:
                return None
            return node if node.GetAttribute(N.CT_ATTRIBUTE) == ctNode.GetID() else None

        segmentation = nodes.segmentation
        if segmentation is not None and segmentation.GetAttribute(N.CT_ATTRIBUTE) is not None:
            segmentation = mine(segmentation)
        return ResultNodes(segmentation, mine(nodes.transform), mine(nodes.template),
                           mine(nodes.roi), mine(nodes.gradcam), mine(nodes.table),
                           mine(nodes.fracture), mine(nodes.fractureMarker))

    def _loadFracture(self, folder: Path, result: Dict[str, Any], ctNode: Any,
                      nodes: ResultNodes, arrays: Optional[Dict[str, Any]]) -> None:
        """The located fracture line's segmentation and centre marker (see
        :meth:`loadResults`); both are removed when this run located none."""
        from AnkleFractureLib.io import read_image

        base = ctNode.GetName()
        # Callers that do not keep these nodes (the panel's parameter node holds the others)
        # get this CT's existing ones back: a new run never leaves a stale line beside its own.
        for name, role in (("fracture", "fracture"), ("fractureMarker", "fracture_marker")):
            if getattr(nodes, name) is None:
                setattr(nodes, name, self._ownNode(role, ctNode))
        path = folder / "fracture_line.nii.gz"
        if path.is_file():
            given = (arrays or {}).get("fracture_line")
            line = given if isinstance(given, Volume) else read_image(path)
            if nodes.fracture is None:
                nodes.fracture = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                              f"{base} fibula fracture")
                nodes.fracture.SetAttribute(N.ROLE_ATTRIBUTE, "fracture")
            N.updateFractureSegmentation(nodes.fracture, line, ctNode, self.scene)
        else:
            self._removeNode(nodes, "fracture")

        fracture = result.get("fracture") or {}
        centre = fracture.get("center_lps") if fracture.get("found") else None
        if centre is not None:
            if nodes.fractureMarker is None:
                nodes.fractureMarker = self.scene.AddNewNodeByClass(
                    "vtkMRMLMarkupsFiducialNode", f"{base} fracture")
                nodes.fractureMarker.SetAttribute(N.ROLE_ATTRIBUTE, "fracture_marker")
            N.setFractureMarker(nodes.fractureMarker, centre,
                                N.fractureMarkerLabel(fracture.get("height_mm")), ctNode,
                                describeFracture(result))
        else:
            self._removeNode(nodes, "fractureMarker")

    def fractureNodeFor(self, ctNode: Any) -> Any:
        """The located (and possibly corrected) fracture line's segmentation of ``ctNode``,
        which "Export as training case" stores as the case's fracture line (None: none)."""
        return None if ctNode is None else self._ownNode("fracture", ctNode)

    def _ownNode(self, role: str, ctNode: Any) -> Any:
        """The scene's last node with this ROLE made for ``ctNode`` (None when there is none)."""
        found = None
        for i in range(self.scene.GetNumberOfNodes()):
            node = self.scene.GetNthNode(i)
            if (node.GetAttribute(N.ROLE_ATTRIBUTE) == role
                    and node.GetAttribute(N.CT_ATTRIBUTE) == ctNode.GetID()):
                found = node
        return found

    @staticmethod
    def resultOf(tableNode: Any) -> Optional[Dict[str, Any]]:
        """The result a results table holds (None for no table or no result)."""
        return N.resultFromTable(tableNode) if tableNode is not None else None

    def _removeNode(self, nodes: ResultNodes, name: str) -> None:
        node = getattr(nodes, name)
        if node is not None and node.GetScene() is self.scene:
            self.scene.RemoveNode(node)
        setattr(nodes, name, None)

    # ------------------------------------------------------------------ annotation refinement
    @staticmethod
    def exportCaseId(ctNode: Any, caseId: Optional[str] = None) -> str:
        """The case id an export uses: ``caseId``, else the CT node's name (file-system safe)."""
        return safeName(caseId) if caseId else safeName(ctNode.GetName())

    @staticmethod
    def existingCase(datasetFolder: PathLike, caseId: str) -> Optional[Dict[str, Any]]:
        """What the dataset holds under ``caseId`` (None: no such case, or no dataset yet).

        Returns:
            {"caseId", "node" (the CT node it was exported from, if known), "weber", "side",
            "source", "segmented"}.
        """
        from AnkleFractureLib.dataset import Dataset

        if datasetFolder in (None, "", ".") or not (Path(datasetFolder) / "dataset.json").is_file():
            return None
        record = Dataset.load(datasetFolder).get(caseId)
        if record is None:
            return None
        return {"caseId": record.id, "node": (record.meta or {}).get("node"),
                "weber": record.weber, "side": record.side, "source": record.source,
                "segmented": record.segmentation is not None}

    def exportTrainingCase(self, datasetFolder: PathLike, ctNode: Any,
                           segmentationNode: Any = None, weber: Optional[str] = None,
                           caseId: Optional[str] = None,
                           side: Optional[str] = None,
                           overwrite: bool = False,
                           segmentMapping: Optional[Dict[str, Any]] = None,
                           fractureNode: Any = None) -> Dict[str, Any]:
        """Add the CT, its (corrected) segmentation and Weber class to a training dataset.

        The dataset uses the project's layout (``dataset.json``, ``images/``, ``labels/``)
        that ``train-seg`` and ``train-cls`` read; ``dataset.json`` is rewritten atomically.
        A case id the dataset already holds is refused (:class:`CaseExistsError`, naming
        that case), unless ``overwrite`` says to replace it (the panel asks the user first).

        Args:
            datasetFolder: The dataset folder (created when missing).
            ctNode: The CT volume node.
            segmentationNode: Segmentation whose Tibia / Fibula segments (fragments included,
                or the segments ``segmentMapping`` names) become the label map; None, or no
                segments: unlabelled for segmentation.
            weber: "none", "A", "B", "C", or None / "unknown" (unlabelled for classification).
            caseId: Case id (default: the CT node's name, made file-system safe).
            side: "left", "right" or None.
            overwrite: Replace a case with the same id (False: refuse).
            segmentMapping: {segment id: "tibia" | "fibula"} when the segments are not named
                after the bones (see :meth:`userLabelMap`).
            fractureNode: The fracture segmentation (a run's ``Fibula fracture`` segment, as
                corrected by the reader): stored as the case's fracture line, which
                ``train-fracture`` learns to locate; None or an empty segment: no line.

        Returns:
            {"caseId", "updated" (bool: an existing case was replaced), "counts" (the
            dataset's counts), "dataset" (path)}.

        Raises:
            CaseExistsError: The case id exists and ``overwrite`` is False (nothing written).
            SegmentMappingError: The segments are not named after the bones and no mapping
                says which is which (nothing written).
        """
        from AnkleFractureLib.dataset import Dataset
        from AnkleFractureLib.dataset.layout import CLASSES

        if ctNode is None:
            raise InputError(None, "select a CT volume first")
        if datasetFolder in (None, "", "."):
            raise InputError(None, "choose a dataset folder first")
        weber = None if weber in (None, "", "unknown") else weber
        if weber is not None and weber not in CLASSES:
            raise InputError(None, f"the Weber class must be one of {', '.join(CLASSES)} or "
                                   f"unknown, got {weber!r}")
        caseId = self.exportCaseId(ctNode, caseId)
        existing = self.existingCase(datasetFolder, caseId)
        if existing is not None and not overwrite:
            raise CaseExistsError(datasetFolder, caseId, existing)
        ct = N.volumeFromNode(ctNode)
        label = self.userLabelMap(segmentationNode, ctNode, segmentMapping)
        line = self.fractureLineMask(fractureNode, ctNode)
        dataset = Dataset.create(datasetFolder)
        updated = dataset.get(caseId) is not None
        dataset.add_case(caseId, ct, label, weber=weber,
                         side=side if side in ("left", "right") else None,
                         source="slicer-export",
                         meta={"node": ctNode.GetName(),
                               "segmentation": (segmentationNode.GetName()
                                                if segmentationNode is not None else None)},
                         fracture_line=line)
        return {"caseId": caseId, "updated": updated, "counts": dataset.counts(),
                "dataset": str(dataset.root)}

    def fractureLineMask(self, fractureNode: Any, ctNode: Any) -> Optional[Volume]:
        """The ``Fibula fracture`` segment of a fracture segmentation as a 0/1 mask on the
        CT's grid (None: no node, or an empty segment).

        Raises:
            InputError: The node has no ``Fibula fracture`` segment (the message names its
                segments).
        """
        if fractureNode is None:
            return None
        segmentId = fractureNode.GetSegmentation().GetSegmentIdBySegmentName(
            N.FRACTURE_SEGMENT_NAME)
        if not segmentId:
            names = ", ".join(repr(name) for _, name in N.segmentList(fractureNode)) or "none"
            raise InputError(fractureNode.GetName(), f"no '{N.FRACTURE_SEGMENT_NAME}' segment "
                                                     f"to export as the fracture line (its "
                                                     f"segments: {names})")
        # The segment read as if it were a fibula: the label map machinery gives 2 on it.
        lines = N.labelMapFromSegmentation(fractureNode, ctNode, self.scene,
                                           mapping={segmentId: "fibula"})
        return None if lines is None else lines.with_array((lines.array > 0).astype(np.uint8))

    @staticmethod
    def datasetCounts(datasetFolder: PathLike) -> Optional[Dict[str, int]]:
        """The dataset's counts (cases, segmented, classified, unlabelled, per class), or None
        when the folder holds no dataset yet."""
        from AnkleFractureLib.dataset import Dataset

        if datasetFolder in (None, "", ".") or not (Path(datasetFolder) / "dataset.json").is_file():
            return None
        return Dataset.load(datasetFolder).counts()

    @staticmethod
    def trainingCommand(kind: str, datasetFolder: PathLike, outFolder: PathLike,
                        maxMinutes: int = 30, python: Optional[str] = None,
                        extra: Sequence[str] = ()) -> List[str]:
        """The ``train-seg`` / ``train-cls`` command line for a dataset (shown and run)."""
        if kind not in ("seg", "cls"):
            raise InputError(None, f"kind must be seg or cls, got {kind!r}")
        args = [python or pythonExecutable(), "-m", "AnkleFractureLib", f"train-{kind}",
                str(datasetFolder), "--out", str(outFolder), "--max-minutes",
                str(int(maxMinutes))]
        if kind == "cls" and "--method" not in extra:
            # Semi-supervised: the exported cases without a Weber class count too.
            args += ["--method", "semi"]
        return args + list(extra)

    def startTraining(self, kind: str, datasetFolder: PathLike, outFolder: PathLike,
                      maxMinutes: int = 30, python: Optional[str] = None,
                      extra: Sequence[str] = ()) -> BackgroundProcess:
        """Start ``train-seg`` (kind "seg") or ``train-cls`` ("cls") in the background.

        When it succeeds, ``outFolder`` is a model folder that the panel offers to use (set it
        as the segmentation or classifier model).
        """
        if self.datasetCounts(datasetFolder) is None:
            raise InputError(datasetFolder, "no dataset.json here: export a case first")
        out = Path(outFolder)
        args = self.trainingCommand(kind, datasetFolder, out, maxMinutes, python, extra)
        return BackgroundProcess(args, workDir=out.parent / f".{out.name}_logs").start()

    # ------------------------------------------------------------------ batch
    @staticmethod
    def runBatch(inputs: Union[PathLike, Sequence[PathLike]], outDir: PathLike,
                 settings: Optional[StageSettings] = None, workers: int = 1,
                 resume: bool = True, progress: Optional[ProgressCallback] = None,
                 shouldCancel: Optional[Callable[[], bool]] = None) -> Any:
        """``ankle-fracture batch`` from the Slicer Python console.

        Args:
            inputs: A folder, a file, or a list of them (image files, DICOM folders, folders
                of them).
            outDir: Output folder: one sub-folder per case with ``run``'s files, and
                ``results.csv`` (the same outputs as the command line).
            settings: Side, device, models.
            workers: Processes (keep 1 inside Slicer: the models then load once).
            resume: Skip cases a previous batch into ``outDir`` finished.
            progress: Called with (fraction, message).
            shouldCancel: Polled; True stops after the current case.

        Returns:
            The :class:`~AnkleFractureLib.pipeline.batch.BatchSummary`.
        """
        from AnkleFractureLib.pipeline.batch import discover_inputs, run_batch

        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        settings = settings or StageSettings()
        cases = discover_inputs(list(inputs), exclude=[outDir])
        return run_batch(cases, outDir, settings.pipelineOptions(), workers=workers,
                         resume=resume, report_pdf=settings.reportPdf, progress=progress,
                         should_cancel=shouldCancel)
