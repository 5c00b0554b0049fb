"""AnkleFracture: ankle CT -> tibia/fibula segmentation, template registration, Weber class.

The 3D Slicer module file: the module description, the panel (widget), a thin logic over
:mod:`AnkleFractureSlicer.logic` (itself a thin layer over the ``AnkleFractureLib`` library)
and the module's self-test. Research software, not for clinical use.
"""

import logging
import pathlib
import sys
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import (vtkMRMLLinearTransformNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode, vtkMRMLTableNode)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

MODULE_DIR = pathlib.Path(__file__).resolve().parent


def _findLibraryRoot() -> pathlib.Path:
    """The folder holding AnkleFractureLib: beside this file once installed as an extension, the
    repository root when the source folder was added as a module path (Developer Tools)."""
    for candidate in (MODULE_DIR, MODULE_DIR.parent):
        if (candidate / "AnkleFractureLib" / "__init__.py").is_file():
            return candidate
    raise RuntimeError(f"AnkleFractureLib was not found next to {MODULE_DIR}")


def resourcesDir() -> pathlib.Path:
    """Resources (UI, icons, models, template, terminology): installed beside the module file,
    or at the repository root in a source checkout."""
    for candidate in (MODULE_DIR / "Resources", MODULE_DIR.parent / "Resources"):
        if (candidate / "UI" / "AnkleFracture.ui").is_file():
            return candidate
    return MODULE_DIR / "Resources"


_root = str(_findLibraryRoot())
if _root not in sys.path:
    sys.path.insert(0, _root)


def loadTerminology() -> None:
    """Load the Tibia / Fibula terminology (Resources/Terminology/AnkleFracture.term.json) into
    Slicer's Terminologies module: its context name is the one the segments' tags use, so
    their category and type resolve (also in a scene reopened before this panel is shown)."""
    path = resourcesDir() / "Terminology" / "AnkleFracture.term.json"
    try:
        slicer.modules.terminologies.logic().LoadTerminologyFromFile(str(path))
    except Exception as exc:  # noqa: BLE001 - colours and names still work without it
        logging.warning(f"AnkleFracture: terminology {path} not loaded: {exc}")


#
# AnkleFracture
#
class AnkleFracture(ScriptedLoadableModule):
    """The module's description (title, category, help)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Ankle Fracture"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["AnkleFracture developers"]
        self.parent.helpText = (
            "Ankle CT: segments the tibia and fibula (MONAI), registers them to a healthy "
            "template (a left ankle is mirrored first), crops the tibiofibular syndesmosis and "
            "classifies Danis-Weber none / A / B / C with a Grad-CAM heatmap. Safety checks "
            "refuse scans that cannot support an answer. <b>Research software, not for clinical "
            "use.</b> The shipped models were trained on a synthetic phantom (demonstration); "
            "train on your own data with the annotation-refinement section or the "
            "<tt>ankle-fracture</tt> command line. "
            '<a href="https://github.com/AnkleFracture/SlicerAnkleFracture">Documentation</a>.')
        self.parent.acknowledgementText = (
            "Built on 3D Slicer, MONAI, PyTorch and SimpleITK.")
        self.parent.icon = qt.QIcon(str(resourcesDir() / "Icons" / "AnkleFracture.png"))
        # The segments' terminology resolves from start-up on, not only once the panel is shown.
        slicer.app.connect("startupCompleted()", loadTerminology)


#
# Parameter node: the panel's state, saved with the scene
#
@parameterNodeWrapper
class AnkleFractureParameterNode:
    """The panel's state (a saved scene restores it).

    Inputs: inputVolume, side, device, outputSegmentation, demoWeber (class of the demo
    phantom). Results (made by a run):
    outputTransform, templateSegmentation, syndesmosisRoi, gradcamVolume, resultTable.
    Display: showGradcam, gradcamOpacity, showTemplate. Refinement: datasetFolder, caseId,
    weberLabel, trainingMinutes. Advanced: segModelFolder, clsModelFolder (empty: the shipped
    models), tta, resultsFolder (empty: a temporary folder).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    side: Annotated[str, Choice(["auto", "left", "right"])] = "auto"
    device: Annotated[str, Choice(["auto", "gpu", "cpu"])] = "auto"
    outputSegmentation: vtkMRMLSegmentationNode
    demoWeber: Annotated[str, Choice(["none", "A", "B", "C"])] = "B"
    outputTransform: vtkMRMLLinearTransformNode
    templateSegmentation: vtkMRMLSegmentationNode
    syndesmosisRoi: vtkMRMLMarkupsROINode
    gradcamVolume: vtkMRMLScalarVolumeNode
    resultTable: vtkMRMLTableNode
    showGradcam: bool = True
    gradcamOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.4
    showTemplate: bool = False
    datasetFolder: pathlib.Path
    caseId: str = ""
    weberLabel: Annotated[str, Choice(["unknown", "none", "A", "B", "C"])] = "unknown"
    trainingMinutes: Annotated[int, WithinRange(1, 1440)] = 30
    segModelFolder: pathlib.Path
    clsModelFolder: pathlib.Path
    tta: Annotated[int, WithinRange(0, 32)] = 8
    resultsFolder: pathlib.Path


def _pathOrNone(value) -> Optional[str]:
    """An optional folder parameter: empty path fields read back as "."."""
    text = str(value) if value is not None else ""
    return None if text in ("", ".") else text


#
# Widget
#
class AnkleFractureWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: inputs, the four buttons, results, annotation refinement."""

    POLL_MS = 300

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None          # a BackgroundStage while a stage runs
        self._training = None     # (kind, BackgroundProcess, outFolder) while training
        self._newModel = None     # (kind, folder) of a finished training
        self._timer = None
        self._displayState = None  # (heatmap, CT, shown, opacity) last put in the slice views

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(str(resourcesDir() / "UI" / "AnkleFracture.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AnkleFractureLogic()
        self._loadTerminology()

        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.connect("timeout()", self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentButton.connect("clicked(bool)", lambda: self.onStage("segment"))
        self.ui.registerButton.connect("clicked(bool)", lambda: self.onStage("register"))
        self.ui.classifyButton.connect("clicked(bool)", lambda: self.onStage("classify"))
        self.ui.runAllButton.connect("clicked(bool)", lambda: self.onStage("all"))
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.saveReportButton.connect("clicked(bool)", self.onSaveReport)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.trainSegButton.connect("clicked(bool)", lambda: self.onTrain("seg"))
        self.ui.trainClsButton.connect("clicked(bool)", lambda: self.onTrain("cls"))
        self.ui.useNewModelsButton.connect("clicked(bool)", self.onUseNewModel)
        self.ui.loadPhantomButton.connect("clicked(bool)", self.onLoadPhantom)
        self.ui.deviceStatusLabel.text = ""
        # Finding the GPU imports torch (seconds): after the panel is shown, not before.
        qt.QTimer.singleShot(0, self._describeDevice)

        self.initializeParameterNode()

    def _describeDevice(self) -> None:
        self.ui.deviceStatusLabel.text = (self.logic.sceneLogic.deviceDescription()
                                          if self.logic.dependenciesReady()
                                          else "Python packages not installed yet")

    def _loadTerminology(self) -> None:
        loadTerminology()  # again: harmless, and covers a module loaded after start-up

    # ------------------------------------------------------------------ parameter node
    def cleanup(self) -> None:
        # The poll timer would otherwise keep calling onPoll on a widget that is gone.
        if self._timer is not None:
            self._timer.stop()
            self._timer.disconnect("timeout()", self.onPoll)
            self._timer = None
        self.removeObservers()
        if self._job is not None:
            self._job.cancel()
        if self._training is not None:
            self._training[1].cancel()
        self.logic.sceneLogic.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self._updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:
            self.onCancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.GetAttribute("AnkleFracture.Role"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._updateGui()

    def _updateGui(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        busy = self._job is not None
        hasCt = bool(p.inputVolume)
        for button in (self.ui.segmentButton, self.ui.registerButton, self.ui.classifyButton,
                       self.ui.runAllButton):
            button.enabled = hasCt and not busy
        training = self._training is not None
        self.ui.cancelButton.enabled = busy or training  # a stage first, else the training
        self.ui.exportButton.enabled = (hasCt and not busy
                                        and _pathOrNone(p.datasetFolder) is not None)
        self.ui.trainSegButton.enabled = not training and self._datasetCounts() is not None
        self.ui.trainClsButton.enabled = self.ui.trainSegButton.enabled
        self.ui.useNewModelsButton.enabled = self._newModel is not None
        self._updateDatasetLabel()
        self._showResult(self._ownResult())
        self._updateDisplay()

    # ------------------------------------------------------------------ display
    def _updateDisplay(self) -> None:
        p = self._parameterNode
        from AnkleFractureSlicer import nodes as N

        # Only when the heatmap settings change: the user may have put other volumes in the views.
        state = (p.gradcamVolume.GetID() if p.gradcamVolume else None,
                 p.inputVolume.GetID() if p.inputVolume else None, p.showGradcam,
                 round(p.gradcamOpacity, 3))
        if p.gradcamVolume and state != self._displayState:
            N.showHeatmapInSlices(slicer.mrmlScene, p.inputVolume, p.gradcamVolume,
                                  p.showGradcam, p.gradcamOpacity)
        self._displayState = state
        template = p.templateSegmentation
        if template and template.GetDisplayNode():
            template.GetDisplayNode().SetVisibility(p.showTemplate)

    def _showResult(self, result) -> None:
        bars = {"none": self.ui.probabilityNoneBar, "A": self.ui.probabilityABar,
                "B": self.ui.probabilityBBar, "C": self.ui.probabilityCBar}
        probabilities = (result or {}).get("probabilities") or {}
        for key, bar in bars.items():
            bar.value = round(100 * probabilities.get(key, 0.0))
            bar.enabled = key in probabilities
        text = self.logic.describe(result)
        self.ui.predictionLabel.text = text["prediction"]
        self.ui.uncertaintyLabel.text = text["uncertainty"]
        self.ui.fractureLabel.text = text["fracture"]
        self.ui.fractureLabel.visible = bool(text["fracture"])
        self.ui.warningsLabel.text = text["warnings"]
        self.ui.saveReportButton.enabled = bool(result and result.get("folder") and (
            pathlib.Path(result["folder"]) / "report.png").is_file())

    @staticmethod
    def _attempt(message: str, func):
        """Run ``func``; an error is shown to the user (with details) and None returned."""
        try:
            with slicer.util.tryWithErrorDisplay(message, waitCursor=True):
                return func()
        except Exception:  # noqa: BLE001 - already shown, and logged with its traceback
            logging.exception(message)
            return None

    # ------------------------------------------------------------------ running a stage
    def _settings(self):
        from AnkleFractureSlicer.logic import StageSettings

        p = self._parameterNode
        return StageSettings(side=p.side, device=p.device, tta=p.tta,
                             segModelDir=_pathOrNone(p.segModelFolder),
                             clsModelDir=_pathOrNone(p.clsModelFolder), reportPdf=True)

    def onStage(self, stage: str) -> None:
        if self._job is not None or not self.logic.ensureDependencies():
            return
        p = self._parameterNode
        # Results of another CT stay with it: this CT gets its own nodes.
        self._storeNodes(self.logic.sceneLogic.nodesFor(p.inputVolume, self._currentNodes()))
        if not p.outputSegmentation and stage in ("segment", "all"):
            p.outputSegmentation = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", f"{p.inputVolume.GetName()} bones")
        self.logic.sceneLogic.resultsRoot = _pathOrNone(p.resultsFolder)
        nodes = self._currentNodes()
        mapping = None
        if stage in ("register", "classify"):  # they use the chosen segmentation's bones
            go, mapping = self._askSegmentMapping(nodes.segmentation)
            if not go:
                return
        self._job = self._attempt("Could not start the analysis.",
                                  lambda: self.logic.sceneLogic.startStage(
                                      stage, p.inputVolume, nodes, self._settings(),
                                      segmentMapping=mapping))
        if self._job is None:
            return
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = {"segment": "Segmenting...", "register": "Registering...",
                                    "classify": "Classifying...",
                                    "all": "Running all stages..."}[stage]
        self._timer.start()
        self._updateGui()

    def _askSegmentMapping(self, segmentationNode):
        """When none of the segmentation's segments is named Tibia / Fibula, ask which one is
        which (the segments are never renamed or changed).

        Returns:
            (go on, mapping): (True, None) when no question was needed, (True, {segment id:
            "tibia" | "fibula"}) after the answer, (False, None) when the user cancelled.
        """
        from AnkleFractureSlicer import nodes as N

        segments = N.unmatchedSegments(segmentationNode)
        if not segments:
            return True, None
        none = "(no segment)"
        titles = [name if name == sid else f"{name} ({sid})" for sid, name in segments]
        mapping = {}
        for index, bone in enumerate(("tibia", "fibula")):
            choice = qt.QInputDialog.getItem(
                slicer.util.mainWindow(), "Which segment is the " + bone + "?",
                f"None of the segments of '{segmentationNode.GetName()}' is named Tibia or "
                f"Fibula.\nWhich one is the {bone}? (Your segments are left as they are.)",
                titles + [none], min(index, len(titles) - 1), False)
            if not choice:
                return False, None  # cancelled
            if choice != none:
                segmentId = segments[titles.index(choice)][0]
                if segmentId in mapping:
                    slicer.util.errorDisplay("The tibia and the fibula must be different "
                                             "segments.")
                    return False, None
                mapping[segmentId] = bone
        if not mapping:
            slicer.util.errorDisplay("No segment was chosen: choose the tibia and fibula, or "
                                     "no segmentation to segment the CT.")
            return False, None
        return True, mapping

    def onLoadPhantom(self) -> None:
        """The project's synthetic ankle CT, for trying the module without patient data."""
        p = self._parameterNode
        node = self._attempt("Could not make the demo phantom.",
                             lambda: self.logic.sceneLogic.loadDemoPhantom(p.demoWeber))
        if node is not None:
            p.inputVolume = node
            slicer.util.setSliceViewerLayers(background=node, foreground=None, fit=True)
            self.ui.statusLabel.text = (f"Loaded {node.GetName()}: synthetic, the ground truth "
                                        "is in its name. Click Run all.")

    def onCancel(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self.ui.statusLabel.text = "Cancelling..."
        elif self._training is not None:
            self._training[1].cancel()
            self.ui.trainingStatusLabel.text = "Cancelling the training..."

    def onPoll(self) -> None:
        if self._job is not None:
            self._pollStage()
        if self._training is not None:
            self._pollTraining()
        if self._job is None and self._training is None:
            self._timer.stop()

    def _pollStage(self) -> None:
        state = self._job.poll()
        if state.fraction is not None:
            self.ui.progressBar.value = round(100 * state.fraction)
        if state.running:
            self.ui.statusLabel.text = f"{state.message} ({self._job.process.elapsed:.0f} s)"
            return
        job, self._job = self._job, None
        if not state.succeeded:
            job.cleanup()
        if state.cancelled:
            self.ui.statusLabel.text = "Cancelled: nothing was changed."
            self.ui.progressBar.value = 0
        elif not state.succeeded:
            self.ui.statusLabel.text = "Failed."
            slicer.util.errorDisplay(f"The analysis failed: {state.error}")
        else:
            out = self._attempt("Could not load the results.", job.finish)
            if out is not None:
                self._storeNodes(out.nodes)
                seconds = out.result.get("timings_s", {}).get("total", job.process.elapsed)
                self.ui.statusLabel.text = f"Done in {seconds:.1f} s ({job.stage})."
                self.ui.progressBar.value = 100
                if out.nodes.gradcam is None:
                    slicer.util.setSliceViewerLayers(background=job.ctNode, foreground=None)
                if out.nodes.roi is not None and job.stage in ("classify", "all"):
                    from AnkleFractureSlicer import nodes as N

                    N.jumpSlicesToRoi(slicer.mrmlScene, out.nodes.roi)  # show the syndesmosis
                if job.stage in ("segment", "all") and out.nodes.segmentation is not None:
                    # The bones in 3D too (a second or two on a clinical CT).
                    out.nodes.segmentation.CreateClosedSurfaceRepresentation()
        self._updateGui()

    def _ownResult(self):
        """The result shown: the last run's on the selected CT (None for another CT)."""
        p = self._parameterNode
        own = self.logic.sceneLogic.nodesFor(p.inputVolume, self._currentNodes())
        return self.logic.sceneLogic.resultOf(own.table)

    def _currentNodes(self):
        from AnkleFractureSlicer.logic import ResultNodes

        p = self._parameterNode
        return ResultNodes(p.outputSegmentation, p.outputTransform, p.templateSegmentation,
                           p.syndesmosisRoi, p.gradcamVolume, p.resultTable)

    def _storeNodes(self, nodes) -> None:
        p = self._parameterNode
        p.outputSegmentation = nodes.segmentation
        p.outputTransform = nodes.transform
        p.templateSegmentation = nodes.template
        p.syndesmosisRoi = nodes.roi
        p.gradcamVolume = nodes.gradcam
        p.resultTable = nodes.table

    def onSaveReport(self) -> None:
        result = self._ownResult()
        if not result or not result.get("folder"):
            return
        path = qt.QFileDialog.getSaveFileName(self.parent, "Save report",
                                              f"{self._parameterNode.inputVolume.GetName()}"
                                              "_report.png", "PNG (*.png);;PDF (*.pdf)")
        if not path:
            return
        if self._attempt("Could not save the report.",
                         lambda: self.logic.saveReport(result, path)) is not None:
            self.ui.statusLabel.text = f"Report saved to {path}"

    # ------------------------------------------------------------------ annotation refinement
    def _datasetCounts(self):
        folder = _pathOrNone(self._parameterNode.datasetFolder) if self._parameterNode else None
        try:
            return self.logic.sceneLogic.datasetCounts(folder) if folder else None
        except Exception:  # noqa: BLE001 - a broken dataset.json shows as "no dataset"
            return None

    def _updateDatasetLabel(self) -> None:
        counts = self._datasetCounts()
        if counts is None:
            self.ui.datasetCountsLabel.text = "No dataset in this folder yet: export a case."
            return
        self.ui.datasetCountsLabel.text = (
            f"{counts['cases']} cases: {counts['segmented']} with a segmentation, "
            f"{counts['classified']} with a Weber class (none {counts['weber_none']}, "
            f"A {counts['weber_A']}, B {counts['weber_B']}, C {counts['weber_C']}), "
            f"{counts['unlabelled']} unlabelled.")

    def onExport(self) -> None:
        p = self._parameterNode
        if not self.logic.ensureDependencies():
            return
        result = self._ownResult() or {}
        side = p.side if p.side != "auto" else result.get("side")
        sceneLogic = self.logic.sceneLogic
        folder = _pathOrNone(p.datasetFolder)
        # A case id the dataset holds may be another patient's: replace it only if the user says so.
        caseId = sceneLogic.exportCaseId(p.inputVolume, p.caseId or None) if p.inputVolume else None
        existing = self._attempt("Could not read the dataset.",
                                 lambda: sceneLogic.existingCase(folder, caseId) or {})
        if existing is None:
            return
        overwrite = False
        if existing:
            from AnkleFractureSlicer.logic import describeCase

            if not slicer.util.confirmOkCancelDisplay(
                    f"The dataset already has a case '{caseId}' ({describeCase(existing)}).\n\n"
                    "Replace it with this CT? Its image, segmentation and Weber class are "
                    "overwritten. Cancel, then set another case id, to keep it.",
                    windowTitle="Case id already exported"):
                self.ui.statusLabel.text = f"Not exported: case {caseId} already exists."
                return
            overwrite = True
        go, mapping = self._askSegmentMapping(p.outputSegmentation)
        if not go:
            return
        info = self._attempt("Could not export the case.",
                             lambda: sceneLogic.exportTrainingCase(
                                 folder, p.inputVolume, p.outputSegmentation, p.weberLabel,
                                 p.caseId or None, side, overwrite=overwrite,
                                 segmentMapping=mapping,
                                 fractureNode=sceneLogic.fractureNodeFor(p.inputVolume)))
        if info is not None:
            self.ui.statusLabel.text = (f"{'Updated' if info['updated'] else 'Added'} case "
                                        f"{info['caseId']} in {info['dataset']}.")
        self._updateGui()

    def onTrain(self, kind: str) -> None:
        import time

        p = self._parameterNode
        dataset = _pathOrNone(p.datasetFolder)
        out = pathlib.Path(dataset) / "models" / f"{kind}_{time.strftime('%Y%m%d_%H%M%S')}"
        process = self._attempt("Could not start the training.",
                                lambda: self.logic.sceneLogic.startTraining(
                                    kind, dataset, out, p.trainingMinutes))
        if process is not None:
            self._training = (kind, process, out)
            self.ui.trainingStatusLabel.text = (
                f"Training the {'segmentation' if kind == 'seg' else 'classifier'} into {out} "
                f"(at most {p.trainingMinutes} min)...")
            self._timer.start()
        self._updateGui()

    def _pollTraining(self) -> None:
        kind, process, out = self._training
        state = process.poll()
        if state.running:
            self.ui.trainingStatusLabel.text = f"{state.message} ({process.elapsed / 60:.1f} min)"
            return
        self._training = None
        if state.succeeded and (out / "model.pt").is_file():
            self._newModel = (kind, out)
            self.ui.trainingStatusLabel.text = (f"Trained: {out}. Click 'Use the new model' to "
                                                "analyse with it.")
        elif state.cancelled:
            self.ui.trainingStatusLabel.text = "Training cancelled."
        else:
            self.ui.trainingStatusLabel.text = f"Training failed: {state.error}"
        self._updateGui()

    def onUseNewModel(self) -> None:
        if self._newModel is None:
            return
        kind, folder = self._newModel
        if kind == "seg":
            self._parameterNode.segModelFolder = folder
        else:
            self._parameterNode.clsModelFolder = folder
        self.ui.trainingStatusLabel.text = f"Now using {folder}."
        self._newModel = None
        self._updateGui()


#
# Logic
#
class AnkleFractureLogic(ScriptedLoadableModuleLogic):
    """The module logic: ``AnkleFractureSlicer.logic.AnkleFractureSceneLogic`` on Slicer's scene.

    From the Python console (blocking)::

        logic = slicer.util.getModuleLogic("AnkleFracture")
        out = logic.run("all", getNode("AnkleCT"))
        print(out.result["prediction"], out.result["probabilities"])
        summary = logic.runBatch("/data/ankle_cts", "/data/results")   # as 'ankle-fracture batch'
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from AnkleFractureSlicer.logic import AnkleFractureSceneLogic

        self.sceneLogic = AnkleFractureSceneLogic(slicer.mrmlScene)

    def getParameterNode(self):
        return AnkleFractureParameterNode(super().getParameterNode())

    # Blocking calls for scripts
    def run(self, stage, ctNode, segmentationNode=None, settings=None, progress=None,
            segmentMapping=None):
        """Run "segment", "register", "classify" or "all" on ``ctNode`` and return the
        StageOutput (its ``nodes`` hold the segmentation, transform, heatmap and table).
        ``segmentMapping`` ({segment id: "tibia" | "fibula"}) says which segments of
        ``segmentationNode`` are the bones when they are not named Tibia / Fibula."""
        from AnkleFractureSlicer.logic import ResultNodes

        return self.sceneLogic.runStage(stage, ctNode, ResultNodes(segmentation=segmentationNode),
                                        settings, progress, segmentMapping=segmentMapping)

    def runBatch(self, inputs, outDir, settings=None, resume=True, progress=None):
        """``ankle-fracture batch`` from the console: same per-case files and results.csv."""
        return self.sceneLogic.runBatch(inputs, outDir, settings, workers=1, resume=resume,
                                        progress=progress)

    @staticmethod
    def describe(result):
        """The panel's texts for a result: prediction, uncertainty, fracture, warnings (plain
        words)."""
        from AnkleFractureSlicer.logic import describeResult

        return describeResult(result)

    @staticmethod
    def saveReport(result, path):
        """Copy the run's report (report.png, or report.pdf made on demand) to ``path``."""
        from AnkleFractureSlicer.logic import saveReport

        saveReport(result, path)

    # Dependencies
    @staticmethod
    def dependenciesReady() -> bool:
        from AnkleFractureSlicer import dependencies as D

        requirements = D.readRequirements(resourcesDir() / "requirements.txt")
        return D.torchAvailable() and not D.missingRequirements(requirements)

    def ensureDependencies(self, ask: bool = True) -> bool:
        """Install what is missing (after asking): torch through the PyTorch extension, the
        rest with pip under constraints that keep Slicer's numpy and SimpleITK and the
        PyTorch extension's torch (and torchvision)."""
        from AnkleFractureSlicer import dependencies as D

        if not D.torchAvailable():
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay("AnkleFracture needs PyTorch. Install the 'PyTorch' "
                                         "extension from the Extensions Manager, restart "
                                         "Slicer and try again.")
                return False
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=ask) is None:
                return False
        requirements = D.readRequirements(resourcesDir() / "requirements.txt")
        missing = D.missingRequirements(requirements)
        if not missing:
            return True
        if ask and not slicer.util.confirmOkCancelDisplay(
                "AnkleFracture needs these Python packages: " + ", ".join(missing)
                + ". Install them now? (a few minutes; Slicer's numpy and SimpleITK and "
                  "the PyTorch extension's torch are kept)"):
            return False
        constraints = pathlib.Path(slicer.app.temporaryPath) / "AnkleFracture-constraints.txt"
        constraints.write_text(D.constraintsText(), encoding="utf-8")
        try:
            with slicer.util.tryWithErrorDisplay("Could not install the Python packages.",
                                                 waitCursor=True):
                pydeps = self._pipEnsureModule()
                if pydeps is not None:  # Slicer >= 5.11
                    from packaging.requirements import Requirement

                    pydeps.pip_ensure([Requirement(r) for r in missing],
                                      constraints=str(constraints), requester="AnkleFracture")
                else:
                    slicer.util.pip_install(D.pipArguments(missing, constraints))
        except Exception:  # noqa: BLE001 - shown to the user
            logging.exception("AnkleFracture: installing the Python packages failed")
            return False
        return not D.missingRequirements(requirements)

    @staticmethod
    def _pipEnsureModule():
        """Slicer's pip_ensure module (slicer.pydeps, 5.11+; slicer.packaging in some builds)."""
        import importlib

        for name in ("slicer.pydeps", "slicer.packaging"):
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            if hasattr(module, "pip_ensure"):
                return module
        return None


#
# Test
#
class AnkleFractureTest(ScriptedLoadableModuleTest):
    """The whole flow inside Slicer on a phantom volume (Developer Tools > Reload and Test)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_WholeFlowOnAPhantom()
        self.setUp()
        self.test_PanelClicks()

    def test_WholeFlowOnAPhantom(self):
        import tempfile

        import numpy as np

        from AnkleFractureLib.phantom import generate_case
        from AnkleFractureSlicer import nodes as N

        self.delayDisplay("Making a Weber B left phantom")
        case = generate_case(10, "B", "left", spacing="fast")
        ctNode = N.addVolumeNode(slicer.mrmlScene, case.ct, "AnklePhantom")
        logic = AnkleFractureLogic()
        logic.sceneLogic.resultsRoot = tempfile.mkdtemp(prefix="AnkleFractureTest-")

        self.delayDisplay("Run all (blocking)")
        out = logic.run("all", ctNode)
        self.assertFalse(out.result["refused"], out.result.get("refusal"))
        probabilities = N.probabilitiesFromTable(out.nodes.table)
        self.assertAlmostEqual(sum(probabilities.values()), 1.0, places=5)
        # The heatmap node covers the crop's box on the CT's voxel lattice (its own origin).
        from AnkleFractureLib.crop.syndesmosis import box_on_grid

        self.assertIsNotNone(box_on_grid(N.volumeFromNode(out.nodes.gradcam), case.ct))
        label = N.labelMapFromSegmentation(out.nodes.segmentation, ctNode, slicer.mrmlScene)
        truth = case.label.array
        for value in (1, 2):
            a, b = label.array == value, truth == value
            self.assertGreater(2 * (a & b).sum() / (a.sum() + b.sum()), 0.9)

        self.delayDisplay("Classify again in the background")
        job = logic.sceneLogic.startStage("classify", ctNode, out.nodes)
        while job.poll().running:
            slicer.app.processEvents()
            qt.QThread.msleep(100)
        again = job.finish()
        self.assertEqual(again.result["prediction"], out.result["prediction"])

        self.delayDisplay("Export as a training case, twice (the second time overwriting)")
        from AnkleFractureSlicer.logic import CaseExistsError

        dataset = tempfile.mkdtemp(prefix="AnkleFractureDataset-")
        logic.sceneLogic.exportTrainingCase(dataset, ctNode, out.nodes.segmentation, "B")
        with self.assertRaises(CaseExistsError):
            logic.sceneLogic.exportTrainingCase(dataset, ctNode, out.nodes.segmentation, "B")
        info = logic.sceneLogic.exportTrainingCase(dataset, ctNode, out.nodes.segmentation, "B",
                                                   overwrite=True)
        self.assertTrue(info["updated"])
        self.assertEqual(info["counts"]["cases"], 1)
        self.assertTrue(np.isfinite(list(probabilities.values())).all())
        self.delayDisplay("Test passed")

    def test_PanelClicks(self):
        """The panel as a user drives it: demo phantom, Run all in the background, results."""
        import time

        slicer.util.selectModule("AnkleFracture")
        widget = slicer.modules.AnkleFractureWidget
        parameters = widget._parameterNode
        self.delayDisplay("Load a Weber C demo phantom")
        parameters.demoWeber = "C"
        widget.ui.loadPhantomButton.click()
        self.assertIsNotNone(parameters.inputVolume)
        self.assertTrue(widget.ui.runAllButton.enabled)

        self.delayDisplay("Run all (background)")
        widget.ui.runAllButton.click()
        self.assertTrue(widget.ui.cancelButton.enabled)
        deadline = time.monotonic() + 600
        while widget._job is not None and time.monotonic() < deadline:
            slicer.app.processEvents()  # the panel's timer polls the worker
            qt.QThread.msleep(50)
        self.assertIsNone(widget._job, "Run all did not finish in 10 minutes")
        result = widget.logic.sceneLogic.resultOf(parameters.resultTable)
        self.assertIsNotNone(result)
        self.assertFalse(result["refused"], result.get("refusal"))
        bars = [widget.ui.probabilityNoneBar, widget.ui.probabilityABar,
                widget.ui.probabilityBBar, widget.ui.probabilityCBar]
        self.assertAlmostEqual(sum(bar.value for bar in bars), 100, delta=2)
        self.assertTrue(widget.ui.predictionLabel.text)
        self.assertIsNotNone(parameters.gradcamVolume)
        self.assertIsNotNone(parameters.outputTransform)
        self.assertFalse(widget.ui.cancelButton.enabled)
        self.delayDisplay("Panel test passed")
