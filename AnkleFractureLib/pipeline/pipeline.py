"""The whole analysis of one ankle CT in one call, and each stage alone.

::

    pipe = Pipeline(PipelineOptions(device="auto"))      # models load once, on first use
    result = pipe.run(ct, progress=cb, should_cancel=stop)
    write_outputs(result, "out/", ct)                    # result.json is written last

Stages: segment -> register -> crop -> classify (+ Grad-CAM on the CT's grid) -> localise (the
fibular fracture line, its height above the plafond, and the Weber class that height gives,
combined with the classifier's; a disagreement makes the answer *unsure*). Each is a method
that takes the previous stage's output, so a clinician can correct the segmentation and re-run
only the rest (``pipe.run(ct, label=corrected)``, or ``register`` / ``crop`` / ``classify``
one by one). :meth:`Pipeline.run` runs the sanity checks of :mod:`.checks` between the stages
and stops at the first stage whose checks refuse: the later outputs are None and the result
says which stage refused and why. A refusal is a result, not an error. Progress is one
fraction over the whole run; ``should_cancel`` is polled between stages and between the
segmentation network's patches and raises :class:`~AnkleFractureLib.errors.CancelledError`.

The pipeline never lets a confident Weber class out of a scan that cannot support one: refused
runs have no prediction and no probabilities, and warnings that can mislead the classifier mark
the delivered class *unsure* (:func:`~.checks.gate_classification`).
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from AnkleFractureLib.errors import AnkleFractureError, CancelledError, InputError
from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.pipeline import checks as C
from AnkleFractureLib.registration.leg import select_leg  # noqa: F401 - also the API's name

PathLike = Union[str, "os.PathLike[str]"]
ProgressCallback = Callable[[float, str], None]
CancelCheck = Callable[[], bool]

DISCLAIMER = "research software, not for clinical use"

#: Output files of :func:`write_outputs`, in the order they are written (result.json last).
OUTPUT_FILES = ("segmentation.nii.gz", "transform.json", "transform.tfm",
                "syndesmosis_crop.nii.gz", "gradcam.nii.gz", "fracture_line.nii.gz",
                "report.png", "report.pdf",
                "result.json")

#: Stages after which :meth:`Pipeline.run` can stop (None: run them all).
STOP_AFTER = (None, "segment", "crop")

#: Share of the overall progress of each stage (segmentation dominates on a CPU).
STAGE_SPAN = {"segment": (0.0, 0.65), "register": (0.65, 0.8), "crop": (0.8, 0.85),
              "classify": (0.85, 0.97), "localise": (0.97, 1.0)}

@dataclass
class PipelineOptions:
    """Settings of a :class:`Pipeline`.

    Attributes:
        side: "auto" (from the anatomy), "left" or "right". With both legs in the scan, the
            given side's leg is analysed alone.
        device: "auto" (CUDA when available), "cpu" or "cuda".
        tta: Test-time augmentations of the classifier (None: the model's default; 0: none).
        seg_model_dir: Segmentation model folder (None: the shipped one).
        cls_model_dir: Classifier folder (None: the shipped one).
        template_dir: Template folder (None: the shipped healthy right ankle).
        gradcam_class: Class the Grad-CAM heatmap explains (None: the prediction).
        fracture_model_dir: Fracture localiser folder (None: the shipped one).
        localise: Locate and measure the fibular fracture line after the classification.
        shape_prior: After the registration, take out of the labels the voxels that lie far
            from the registered healthy template's bone of the same label (foot bones the
            network called tibia or fibula; :mod:`~AnkleFractureLib.registration.shape_prior`),
            with an "info" finding that says how much. Applied to a label map the caller gives
            too, so that the Slicer module's step-by-step run (Segment, then Register with the
            segment's labels) analyses what Run all does; a corrected map rarely holds such
            voxels, and the finding names them when it does.
    """

    side: str = "auto"
    device: str = "auto"
    tta: Optional[int] = None
    seg_model_dir: Optional[PathLike] = None
    cls_model_dir: Optional[PathLike] = None
    template_dir: Optional[PathLike] = None
    gradcam_class: Optional[str] = None
    fracture_model_dir: Optional[PathLike] = None
    localise: bool = True
    shape_prior: bool = True

    def __post_init__(self) -> None:
        if self.side not in ("auto", "left", "right"):
            raise InputError(None, f"side must be auto, left or right, got {self.side!r}")
        if self.tta is not None and int(self.tta) < 0:
            raise InputError(None, f"tta must be >= 0, got {self.tta}")
        if self.gradcam_class not in (None, "none", "A", "B", "C"):
            raise InputError(None, "gradcam_class must be none, A, B or C, got "
                                   f"{self.gradcam_class!r}")


@dataclass
class ClassificationOutput:
    """What :meth:`Pipeline.classify` returns.

    Attributes:
        result: The classifier's answer (probabilities, prediction, uncertainty, heatmap on
            the crop grid, timings), before any gating by the checks.
        gradcam: float32 heatmap in [0, 1] on the CT's voxel lattice, kept to the box the
            crop covers (origin moved; :func:`~AnkleFractureLib.crop.syndesmosis.paste_on_grid`
            expands it onto the whole grid for display).
        crop: The crop that was classified.
    """

    result: Any
    gradcam: Volume
    crop: Any


@dataclass
class LocalisationOutput:
    """What :meth:`Pipeline.localise` returns.

    Attributes:
        finding: The :class:`~AnkleFractureLib.fracture.localise.FractureFinding`.
        line: uint8 fracture line (1) on the CT's voxel lattice, kept to the crop's box (as the
            heatmap), or None when no line was found.
    """

    finding: Any
    line: Optional[Volume]


@dataclass
class PipelineResult:
    """Everything one run produced; ``to_json()`` is ``result.json``.

    Attributes:
        input: Description of the CT (source, shape, spacing, ...).
        label: Segmentation (uint8, the CT's grid), or None when not reached.
        registration: The registration, or None.
        crop: The syndesmosis crop, or None.
        classification: The classifier's raw answer, or None (see :attr:`gated` for what may
            be shown).
        gradcam: Grad-CAM heatmap on the CT's lattice (the crop's box only), or None.
        findings: Every sanity-check finding, in order.
        refused_stage: The stage whose checks refused ("input", "segment", "register",
            "crop"), or None.
        side: The analysed side, or None.
        timings: Seconds per stage and "total".
        models: Model folders and SHA-256 of their weights.
        bones_ml: Labelled tibia and fibula volumes (ml).
        fracture: The located fibular fracture
            (:class:`~AnkleFractureLib.fracture.localise.FractureFinding`), or None.
        fracture_line: The found line on the CT's lattice (crop box), or None.
        weber: The combined opinion of the classifier and the measured height
            (:class:`~AnkleFractureLib.fracture.weber_height.WeberOpinion`), or None.
    """

    input: Dict[str, Any]
    label: Optional[Volume] = None
    registration: Any = None
    crop: Any = None
    classification: Any = None
    gradcam: Optional[Volume] = None
    findings: List[C.Finding] = field(default_factory=list)
    refused_stage: Optional[str] = None
    side: Optional[str] = None
    timings: Dict[str, float] = field(default_factory=dict)
    models: Dict[str, Any] = field(default_factory=dict)
    bones_ml: Optional[Dict[str, float]] = None
    fracture: Any = None
    fracture_line: Optional[Volume] = None
    weber: Any = None

    @property
    def refusals(self) -> List[C.Finding]:
        """The refusals, headline first."""
        return C.refusals(self.findings)

    @property
    def refused(self) -> bool:
        return bool(self.refusals)

    @property
    def refusal(self) -> Optional[str]:
        """All refusal reasons in plain words (headline first), or None."""
        r = self.refusals
        return "; ".join(f.message for f in r) if r else None

    @property
    def warnings(self) -> List[str]:
        return [f.message for f in self.findings if f.level == C.WARNING]

    @property
    def gated(self) -> Dict[str, Any]:
        """The classification as it may be shown (:func:`~.checks.gate_classification`): the
        combined answer of the classifier and the measured fracture height when the localiser
        ran, the classifier's alone otherwise."""
        result = self.classification
        if self.weber is not None and result is not None:
            w, f = self.weber, self.fracture
            confirmed = (f is not None and bool(f.found) and f.height_mm is not None
                         and w.prediction != "none" and w.height_class == w.prediction)
            uncertainty = (C.settled_by_line(result.uncertainty, w.prediction, f.height_mm)
                           if confirmed else result.uncertainty)
            result = {"probabilities": w.probabilities, "prediction": w.prediction,
                      "uncertainty": uncertainty, "gradcam_class": result.gradcam_class,
                      "line_confirms": confirmed}
        return C.gate_classification(self.findings, result)

    def _fracture_json(self) -> Dict[str, Any]:
        """``fracture``, ``weber_from_height`` and ``classifier_probabilities`` (None when the
        stages did not run or the run was refused)."""
        if self.refused or self.classification is None:
            return {"fracture": None, "weber_from_height": None, "classifier_probabilities": None}
        probs = self.classification.probabilities
        total = float(sum(probs.values()))
        w = self.weber
        return {"fracture": None if self.fracture is None else self.fracture.to_json(),
                "weber_from_height": None if w is None else {
                    "height_class": w.height_class, "classifier_prediction": w.classifier_class,
                    "agree": bool(w.agree), "reasons": list(w.reasons)},
                "classifier_probabilities": {k: float(v) / total for k, v in probs.items()}}

    def _gradcam_json(self) -> Optional[Dict[str, Any]]:
        """How the heatmap was made (method, layers, cell size in mm), where its box lies
        on the CT (``ct_box``: numpy index ranges [[z0, z1], [y0, y1], [x0, x1]]) and where
        its maximum is (``peak_lps``: [x, y, z] patient LPS mm, the centre of the hottest
        voxel), or None."""
        if self.gradcam is None:
            return None
        info = dict(getattr(self.classification, "gradcam_info", None) or {})
        info["ct_box"] = self.gradcam.meta.get("ct_box")
        heat = np.asarray(self.gradcam.array)
        try:  # one pass over the map (it is as large as the CT box)
            flat = int(np.nanargmax(heat)) if heat.size else None
        except ValueError:  # all NaN: no maximum
            flat = None
        if flat is not None:
            zyx = np.unravel_index(flat, heat.shape)
            peak = self.gradcam.index_to_physical(np.array([zyx[::-1]], dtype=float))[0]
            info["peak_lps"] = [round(float(v), 2) for v in peak]
        return info

    def to_json(self) -> Dict[str, Any]:
        """The ``result.json`` dict (plain JSON types)."""
        gated = self.gated
        crop_coverage = None if self.crop is None else round(float(self.crop.coverage), 4)
        data: Dict[str, Any] = {
            "probabilities": gated["probabilities"],
            "prediction": gated["prediction"],
            "uncertainty": gated["uncertainty"],
            "gradcam_class": gated["gradcam_class"] if self.gradcam is not None else None,
            "gradcam": self._gradcam_json(),
            **self._fracture_json(),
            "withheld_reason": gated["withheld_reason"],
            "side": self.side,
            "refused": self.refused,
            "refused_stage": self.refused_stage,
            "refusal": self.refusal,
            "refusals": [f.message for f in self.refusals],
            "warnings": self.warnings,
            "findings": [f.to_json() for f in self.findings],
            "registration": (None if self.registration is None
                             else self.registration.to_json()),
            "crop_coverage": crop_coverage,
            "bones_ml": self.bones_ml,
            "timings_s": {k: round(float(v), 4) for k, v in self.timings.items()},
            "models": self.models,
            "input": self.input,
            "version": _library_version(),
            "disclaimer": DISCLAIMER,
        }
        return data


def _library_version() -> str:
    from AnkleFractureLib import __version__

    return __version__


def describe_ct(ct: Volume) -> Dict[str, Any]:
    """The ``input`` entry of ``result.json``: where the CT came from and its grid."""
    src = ct.meta.get("source")
    return {
        "ct": None if src is None else os.path.abspath(os.fspath(src)),
        "format": ct.meta.get("format"),
        "series_uid": ct.meta.get("series_uid"),
        "size_xyz": list(ct.size),
        "spacing_mm": [round(float(s), 6) for s in ct.spacing],
        "origin_lps_mm": [round(float(o), 6) for o in ct.origin],
        "direction": [[round(float(v), 8) for v in row] for row in ct.direction],
        "reader_warnings": list(ct.meta.get("warnings", []) or []),
    }


class _Stages:
    """Maps a stage's own progress (0..1) onto the run's overall fraction and polls cancel."""

    def __init__(self, progress: Optional[ProgressCallback],
                 should_cancel: Optional[CancelCheck]) -> None:
        self.progress = progress
        self.should_cancel = should_cancel

    def callback(self, stage: str, label: str) -> ProgressCallback:
        lo, hi = STAGE_SPAN[stage]

        def report(fraction: float, message: str) -> None:
            f = min(max(float(fraction), 0.0), 1.0)
            self.report(lo + (hi - lo) * f, f"{label}: {message}" if message else label)
        return report

    def report(self, fraction: float, message: str) -> None:
        if self.progress is not None:
            self.progress(min(max(float(fraction), 0.0), 1.0), message)

    def check(self, where: str) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise CancelledError(f"cancelled {where}")


class _Run:
    """The state of one :meth:`Pipeline.run`: its result, timings, models used, progress."""

    def __init__(self, pipe: "Pipeline", ct: Volume, progress: Optional[ProgressCallback],
                 should_cancel: Optional[CancelCheck]) -> None:
        self.pipe = pipe
        self.stages = _Stages(progress, should_cancel)
        self.t_run = time.perf_counter()
        self.res = PipelineResult(input=describe_ct(ct))
        self.res.side = None if pipe.options.side == "auto" else pipe.options.side
        self.used = {"segmentation": False, "classification": False, "fracture": False}
        #: The side told from the analysed leg's labels by the checks, for the registration
        #: (None when the checks did not tell it on exactly those labels).
        self.side_detection: Any = None
        #: The registration's findings, and whether the pipeline made the fit itself (a
        #: caller's registration is never fitted again).
        self.registration_findings: List[C.Finding] = []
        self.fitted_here = False
        #: Time spent in the timed blocks inside each open timed block (:meth:`timed`).
        self._inner: List[float] = []

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Add the block's time to ``res.timings[name]``, less the time of the timed blocks
        inside it (the shape prior's second registration counts as "register", once), so
        the stages add up to the run."""
        t = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            spent = time.perf_counter() - t
            inner = self._inner.pop()
            self.res.timings[name] = self.res.timings.get(name, 0.0) + spent - inner
            if self._inner:
                self._inner[-1] += spent

    def finish(self, stage: Optional[str] = None) -> PipelineResult:
        """Close the run: the refusing stage (when refused), models, total time."""
        res = self.res
        if stage is not None and res.refused:
            res.refused_stage = stage
        res.models = self.pipe.model_info(self.used)
        res.timings["total"] = time.perf_counter() - self.t_run
        self.stages.report(1.0, "refused" if res.refused else "done")
        return res


class Pipeline:
    """The analysis pipeline with its models, loaded lazily and kept for the next case.

    Example:
        >>> pipe = Pipeline(PipelineOptions(device="cpu"))
        >>> pipe.options.side
        'auto'
    """

    def __init__(self, options: Optional[PipelineOptions] = None) -> None:
        self.options = options or PipelineOptions()
        self._seg_model: Any = None
        self._classifier: Any = None
        self._localiser: Any = None
        self._template: Any = None
        self._template_distances: Any = None
        self._hashes: Dict[str, Tuple[Optional[str], Optional[str]]] = {}

    # ------------------------------------------------------------------ models (lazy)
    @property
    def segmentation_model(self) -> Any:
        """The loaded :class:`~AnkleFractureLib.segmentation.inference.SegmentationModel`."""
        if self._seg_model is None:
            from AnkleFractureLib.segmentation.inference import SegmentationModel

            self._seg_model = SegmentationModel.load(self.options.seg_model_dir,
                                                     self.options.device)
        return self._seg_model

    @property
    def classifier(self) -> Any:
        """The loaded :class:`~AnkleFractureLib.classification.inference.WeberClassifier`."""
        if self._classifier is None:
            from AnkleFractureLib.classification.inference import WeberClassifier

            self._classifier = WeberClassifier.load(self.options.cls_model_dir,
                                                    self.options.device)
        return self._classifier

    @property
    def localiser(self) -> Any:
        """The loaded :class:`~AnkleFractureLib.fracture.localise.FractureLocaliser`."""
        if self._localiser is None:
            from AnkleFractureLib.fracture.localise import FractureLocaliser

            self._localiser = FractureLocaliser.load(self.options.fracture_model_dir,
                                                     self.options.device)
        return self._localiser

    @property
    def template(self) -> Any:
        """The healthy template (:func:`~AnkleFractureLib.registration.template.load_template`)."""
        if self._template is None:
            from AnkleFractureLib.registration.template import load_template

            self._template = load_template(self.options.template_dir)
        return self._template

    @property
    def template_distances(self) -> Any:
        """The template's :class:`~AnkleFractureLib.registration.shape_prior.TemplateDistances`
        (built once)."""
        if self._template_distances is None:
            from AnkleFractureLib.registration.shape_prior import TemplateDistances

            self._template_distances = TemplateDistances(self.template)
        return self._template_distances

    def _model_entry(self, folder: Optional[PathLike], default: Callable[[], Path],
                     loaded: bool) -> Dict[str, Any]:
        from AnkleFractureLib.segmentation.model_io import (PLANS_FILE, WEIGHTS_FILE,
                                                            folder_sha256, sha256_file)

        try:
            path = Path(folder) if folder is not None else default()
        except AnkleFractureError:
            return {"dir": None, "sha256": None, "plans_sha256": None, "used": loaded}
        weights, plans = path / WEIGHTS_FILE, path / PLANS_FILE
        key = str(weights.resolve()) if weights.exists() else str(weights)
        if key not in self._hashes:
            # The weights (an ensemble's members included) and, apart, the plans: two folders
            # with one network but another decision rule (a localiser's line model, its
            # thresholds) answer differently, and a result must say which it came from.
            self._hashes[key] = (folder_sha256(path),
                                 sha256_file(plans) if plans.is_file() else None)
        digest, plans_digest = self._hashes[key]
        return {"dir": str(path), "sha256": digest, "plans_sha256": plans_digest, "used": loaded}

    def model_info(self, used: Optional[Dict[str, bool]] = None) -> Dict[str, Any]:
        """{"segmentation" | "classification" | "fracture": {dir, sha256, used}}."""
        from AnkleFractureLib.classification.inference import default_model_dir as cls_default
        from AnkleFractureLib.fracture.localise import default_model_dir as frac_default
        from AnkleFractureLib.segmentation.inference import default_model_dir as seg_default

        used = used or {}
        seg_dir = (self._seg_model.model_dir if self._seg_model is not None
                   else self.options.seg_model_dir)
        cls_dir = (self._classifier.model_dir if self._classifier is not None
                   else self.options.cls_model_dir)
        return {"segmentation": self._model_entry(seg_dir, seg_default,
                                                  used.get("segmentation", False)),
                "classification": self._model_entry(cls_dir, cls_default,
                                                    used.get("classification", False)),
                "fracture": self._model_entry(
                    self._localiser.model_dir if self._localiser is not None
                    else self.options.fracture_model_dir, frac_default,
                    used.get("fracture", False))}

    # ------------------------------------------------------------------ stages
    def segment(self, ct: Volume, progress: Optional[ProgressCallback] = None,
                should_cancel: Optional[CancelCheck] = None) -> Volume:
        """Tibia (1) / fibula (2) label map, uint8 with exactly the CT's geometry."""
        return self.segmentation_model.predict(ct, progress, should_cancel)

    def register(self, ct: Volume, label: Volume, side: Optional[str] = None,
                 progress: Optional[ProgressCallback] = None,
                 plafond_hint: Optional[np.ndarray] = None, side_detection: Any = None) -> Any:
        """Mirror + ICP-register ``label`` to the template.

        Args:
            ct: The CT (for side detection: it notices both legs).
            label: Label map on the CT's grid (one leg; see :func:`select_leg`).
            side: "auto", "left", "right" (None: the options' side).
            progress: Callback (fraction, message).
            plafond_hint: The plafond (LPS mm) found on ``label``: a fit that slid along the
                shaft is tried again anchored on it (see
                :func:`~AnkleFractureLib.registration.register.register_to_template`).
            side_detection: ``detect_side(label, ct)`` when the caller has it (the checks
                tell it), so it is not computed again.

        Returns:
            The :class:`~AnkleFractureLib.registration.register.Registration`.

        Raises:
            InputError: The side cannot be told (pass it), or the label map cannot be
                registered.
        """
        from AnkleFractureLib.registration.register import register_to_template

        return register_to_template(label, self.template, side=side or self.options.side,
                                    ct=ct, progress=progress, plafond_hint=plafond_hint,
                                    side_detection=side_detection)

    def crop(self, ct: Volume, label: Optional[Volume], registration: Any) -> Any:
        """The syndesmosis crop (CT, tibia, fibula on the template's box grid)."""
        from AnkleFractureLib.crop.syndesmosis import crop_syndesmosis

        return crop_syndesmosis(ct, label, registration.patient_to_template, self.template)

    def classify(self, ct: Volume, label: Optional[Volume], registration: Any,
                 crop: Any = None, gradcam_class: Optional[str] = None) -> ClassificationOutput:
        """Classify the syndesmosis crop and map its Grad-CAM onto the CT's grid.

        Args:
            ct: The CT.
            label: Label map on the CT's grid (used when ``crop`` is None).
            registration: The registration (used when ``crop`` is None).
            crop: A crop from :meth:`crop` (computed when None). A classifier trained on raw
                CT crops (plans ``crop == "raw"``) gets its own crop.
            gradcam_class: Class the heatmap explains (default: the options' class, else the
                prediction).

        Returns:
            A :class:`ClassificationOutput`; ``result.timings`` has "classify", "gradcam".
        """
        from AnkleFractureLib.crop.syndesmosis import crop_raw_ct, crop_to_ct_box

        clf = self.classifier
        if clf.plans.crop == "raw":
            crop = crop_raw_ct(ct)
        elif crop is None:
            crop = self.crop(ct, label, registration)
        result = clf.classify(crop, tta=self.options.tta, gradcam=True,
                              gradcam_class=gradcam_class or self.options.gradcam_class)
        t = time.perf_counter()
        # Kept to the crop's box on the CT's lattice: the whole grid would be 1.6 GB of float32
        # for a 512 x 512 x 1500 CT, almost all of it zeros.
        heat = crop_to_ct_box(result.gradcam, crop, ct, interpolation="linear",
                              default_value=0.0, clip=(0.0, 1.0))
        heat = heat.with_array(heat.array, meta={"source": "gradcam",
                                                 "class": result.gradcam_class})
        result.timings["gradcam"] = result.timings.get("gradcam", 0.0) + time.perf_counter() - t
        return ClassificationOutput(result, heat, crop)

    def localise(self, ct: Volume, crop: Any, classifier: Optional[Dict[str, float]] = None,
                 label: Optional[Volume] = None, registration: Any = None
                 ) -> LocalisationOutput:
        """Locate and measure the fibular fracture line on a crop.

        Args:
            ct: The CT (the line is mapped onto its voxel lattice).
            crop: The syndesmosis crop of :meth:`crop`.
            classifier: The classifier's probabilities, which choose between candidate lines
                when the localiser's rule lets them (see ``FractureLocaliser.locate``).
            label, registration: The leg's label map and its registration; with them the
                localiser reads its own, taller crop when its plans ask for one
                (``FractureLocaliser.crop_for``), else ``crop``.

        Returns:
            A :class:`LocalisationOutput` (finding + the line on the CT's lattice, crop box).
        """
        from AnkleFractureLib.crop.syndesmosis import crop_to_ct_box

        density = None
        if label is not None and registration is not None:
            crop = self.localiser.crop_for(ct, label, registration.patient_to_template,
                                           self.template, crop)
            density = self.localiser.density_for(ct, label, registration.patient_to_template,
                                                 self.template.plafond)
        finding = self.localiser.locate(crop, self.template.plafond, classifier, density=density)
        line = None
        if finding.found:
            box = crop_to_ct_box(finding.line.astype(np.float32), crop, ct,
                                 interpolation="nearest", default_value=0.0)
            line = box.with_array((box.array > 0.5).astype(np.uint8),
                                  meta={"source": "fracture_line", "ct_box": box.meta.get("ct_box")})
        return LocalisationOutput(finding, line)

    # ------------------------------------------------------------------ the whole run
    def run(self, ct: Volume, progress: Optional[ProgressCallback] = None,
            should_cancel: Optional[CancelCheck] = None, label: Optional[Volume] = None,
            registration: Any = None, stop_after: Optional[str] = None) -> PipelineResult:
        """Run every stage with the sanity checks between them.

        Args:
            ct: The CT (HU).
            progress: Called with (overall fraction in [0, 1], message).
            should_cancel: Polled between stages and segmentation patches; True cancels.
            label: A (corrected) label map: skips the segmentation. A map on another grid is
                resampled onto the CT's (nearest), with a note.
            registration: A registration of ``label``: skips the registration.
            stop_after: "segment" or "crop" to stop after that stage and its checks (the
                Slicer module's Segment and Register buttons); None runs every stage.

        Returns:
            The :class:`PipelineResult` (refused runs included).

        Raises:
            CancelledError: ``should_cancel`` returned True.
            InputError: A model folder is missing or unreadable.
        """
        if stop_after not in STOP_AFTER:
            raise InputError(None, f"stop_after must be one of {STOP_AFTER}, got {stop_after!r}")
        run = _Run(self, ct, progress, should_cancel)
        res = run.res
        run.stages.check("before the start")
        with run.timed("checks"):
            res.findings.extend(C.check_ct(ct))
        if res.refused:
            return run.finish("input")
        leg_label, plafond = self._run_segment(run, ct, label)
        if res.refused or stop_after == "segment":
            return run.finish("segment")
        registration = self._run_register(run, ct, leg_label, registration, plafond)
        if registration is None or res.refused:
            return run.finish("register")
        if self.options.shape_prior:
            leg_label, registration = self._run_shape_prior(run, ct, leg_label, registration)
        crop = self._run_crop(run, ct, leg_label, registration)
        if crop is None or res.refused or stop_after == "crop":
            return run.finish("crop")
        self._run_classify(run, ct, leg_label, registration, crop)
        if self.options.localise:
            self._run_localise(run, ct, crop, leg_label, registration)
        return run.finish()

    def _run_segment(self, run: "_Run", ct: Volume, label: Optional[Volume]
                     ) -> Tuple[Volume, Any]:
        """Segment (unless given a label map) and check; returns (the analysed leg's label map,
        the plafond estimate for the registration check)."""
        res = run.res
        if label is None:
            if self._seg_model is None:
                with run.timed("load_models"):
                    _ = self.segmentation_model
            with run.timed("segment"):
                label = self.segment(ct, run.stages.callback("segment", "segmentation"),
                                     run.stages.should_cancel)
            run.used["segmentation"] = True
        else:
            label = self._label_on_ct(label, ct, res)
        res.label = label
        run.stages.check("after the segmentation")
        with run.timed("checks"):
            leg_label, plafond, found, run.side_detection = self._segmentation_checks(
                ct, label, res)
            res.findings.extend(found)
        return leg_label, plafond

    def _segmentation_checks(self, ct: Volume, label: Volume, res: PipelineResult
                             ) -> Tuple[Volume, Any, List[C.Finding], Any]:
        """(the analysed leg's labels, the plafond estimate, the findings, the side detection
        of those labels or None)."""
        from AnkleFractureLib.registration.side import detect_side

        res.bones_ml = C.bone_volumes_ml(label)
        found = C.check_segmentation(label, res.bones_ml)
        plafond: Any = C.ESTIMATE
        if not any(f.code in ("no_tibia", "bad_labels") for f in found):
            plafond = C.estimate_plafond(label)  # once: the registration check needs it too
            found += C.check_field_of_view(ct, label, plafond=plafond)
        leg_label, detection = label, None
        # The side is told even when the field of view is refused, so that a scan with both
        # legs says so too; not without both bones (detect_side would only repeat that).
        if not any(f.code.startswith("no_") or f.code == "bad_labels" for f in found):
            detection = detect_side(label, ct)
            found += C.check_side(detection, self.options.side)
            if detection.legs >= 2 and self.options.side in ("left", "right"):
                leg_label, _ = select_leg(label, self.options.side)
                found += [f for f in C.check_side(detect_side(leg_label), self.options.side)
                          if f.code == "side_conflict"]
        found += C.check_agreement(ct, leg_label)  # do the labels match the CT's bone?
        if leg_label is not label:
            return leg_label, C.ESTIMATE, found, None
        return leg_label, plafond, found, detection

    def _run_register(self, run: "_Run", ct: Volume, leg_label: Volume, registration: Any,
                      plafond: Any) -> Any:
        """Register (unless given) and check; None when the registration failed."""
        res = run.res
        run.stages.check("before the registration")
        if registration is None:
            if plafond is C.ESTIMATE:
                plafond = C.estimate_plafond(leg_label)  # the same the registration check uses
            hint = plafond if isinstance(plafond, np.ndarray) else None
            try:
                with run.timed("register"):
                    registration = self.register(ct, leg_label, self.options.side,
                                                 run.stages.callback("register", "registration"),
                                                 plafond_hint=hint,
                                                 side_detection=run.side_detection)
            except CancelledError:
                raise
            except AnkleFractureError as exc:
                res.findings.append(C.Finding(C.REFUSAL, "registration_failed",
                                              f"the registration to the template failed: "
                                              f"{getattr(exc, 'reason', exc)}"))
                return None
            run.fitted_here = True
        res.registration = registration
        res.side = registration.side
        with run.timed("checks"):
            run.registration_findings = C.check_registration(registration, leg_label,
                                                             self.template, plafond=plafond)
            res.findings.extend(run.registration_findings)
        return registration

    def _run_shape_prior(self, run: "_Run", ct: Volume, leg_label: Volume, registration: Any
                         ) -> Tuple[Volume, Any]:
        """(the analysed leg's labels without the voxels far from the registered template's
        bones, the registration): the scan's label map (``res.label``) loses the same voxels,
        with a note; when they come to ``REFIT_ML`` or more and this run made the fit, the leg
        is registered again on the cleaned labels
        (:func:`~AnkleFractureLib.registration.shape_prior.prior_and_refit`; the refit's
        findings then replace the first's)."""
        from AnkleFractureLib.registration.shape_prior import MARGIN_MM, prior_and_refit

        res = run.res
        checked: Dict[str, Any] = {}

        def register(label: Volume) -> Any:
            checked["plafond"] = C.estimate_plafond(label)
            with run.timed("register"):
                return self.register(ct, label, self.options.side, None,
                                     plafond_hint=checked["plafond"],
                                     side_detection=run.side_detection)

        def accept(refit: Any, label: Volume) -> bool:
            with run.timed("checks"):
                checked["findings"] = C.check_registration(refit, label, self.template,
                                                           plafond=checked["plafond"])
            return not any(f.level == C.REFUSAL for f in checked["findings"])

        with run.timed("shape_prior"):
            outcome = prior_and_refit(leg_label, registration,
                                      distances=self.template_distances,
                                      register=register if run.fitted_here else None,
                                      accept=accept)
        cleaned, removed = outcome.label, outcome.removed
        if cleaned is leg_label:
            return leg_label, registration
        _clear_removed(res, leg_label, cleaned)
        res.findings.append(C.Finding(
            C.INFO, "segmentation_shape_prior",
            f"{removed['tibia_ml']:.1f} ml labelled tibia and {removed['fibula_ml']:.1f} ml "
            f"labelled fibula lay more than {MARGIN_MM[1]:.0f} / {MARGIN_MM[2]:.0f} mm from the "
            f"registered healthy tibia / fibula (foot bones, the talus) and were taken out of "
            f"the labels", {**removed, "margin_tibia_mm": MARGIN_MM[1],
                            "margin_fibula_mm": MARGIN_MM[2],
                            "registered_again": outcome.registered_again}))
        if outcome.registered_again:
            refit = outcome.registration
            res.findings = ([f for f in res.findings if f not in run.registration_findings]
                            + checked["findings"])
            run.registration_findings = checked["findings"]
            res.registration = refit
            res.side = refit.side
        return cleaned, outcome.registration

    def _run_crop(self, run: "_Run", ct: Volume, leg_label: Volume, registration: Any) -> Any:
        """Crop and check; None when the syndesmosis is out of the field of view."""
        res = run.res
        run.stages.check("before the crop")
        run.stages.report(STAGE_SPAN["crop"][0], "cropping the syndesmosis")
        try:
            with run.timed("crop"):
                crop = self.crop(ct, leg_label, registration)
        except CancelledError:
            raise
        except AnkleFractureError as exc:
            res.findings.append(C.Finding(C.REFUSAL, "fov_coverage",
                                          f"the syndesmosis is not in the field of view: {exc}"))
            return None
        res.crop = crop
        with run.timed("checks"):
            res.findings.extend(C.check_field_of_view(ct, leg_label, registration, crop,
                                                      self.template))
        return crop

    def _run_classify(self, run: "_Run", ct: Volume, leg_label: Volume, registration: Any,
                      crop: Any) -> None:
        run.stages.check("before the classification")
        run.stages.report(STAGE_SPAN["classify"][0], "classifying")
        if self._classifier is None:
            with run.timed("load_models"):
                _ = self.classifier
        out = self.classify(ct, leg_label, registration, crop)
        run.used["classification"] = True
        for name in ("classify", "gradcam"):
            run.res.timings[name] = float(out.result.timings.get(name, 0.0))
        run.res.classification = out.result
        run.res.gradcam = out.gradcam
        run.stages.check("after the classification")

    def _run_localise(self, run: "_Run", ct: Volume, crop: Any, leg_label: Volume,
                      registration: Any) -> None:
        """Locate the fibular fracture; combine the class its height gives with the
        classifier's (a disagreement is an unsure-making warning with the reason)."""
        res = run.res
        if self.classifier.plans.crop != "registered":
            return  # a raw-CT classifier has no registered crop to read
        run.stages.report(STAGE_SPAN["localise"][0], "locating the fracture")
        if self._localiser is None:
            with run.timed("load_models"):
                _ = self.localiser
        with run.timed("localise"):
            out = self.localise(ct, crop, res.classification.probabilities, leg_label,
                                registration)
        run.used["fracture"] = True
        f = out.finding
        res.fracture, res.fracture_line = f, out.line
        if "ring_check" in self.localiser.decision and "select" in self.localiser.decision:
            self._run_ring_check(run, ct, leg_label, registration, f)
        res.weber = self.localiser.opinion(res.classification.probabilities, f)
        for reason in res.weber.reasons:
            res.findings.append(C.Finding(C.WARNING, "weber_disagreement", reason))
        res.findings.extend(C.fracture_line_findings(
            f.ignored, int(self.localiser.decision["min_voxels"]),
            float(np.min(crop.grid.spacing))))

    def _run_ring_check(self, run: "_Run", ct: Volume, leg_label: Volume, registration: Any,
                        finding: Any) -> None:
        """The cortical ring check when the localiser's plans ask for it
        (:mod:`~AnkleFractureLib.fracture.ring_check`): a line it reports is the finding, with
        an unsure-making warning."""
        from AnkleFractureLib.fracture import ring_check

        res = run.res
        with run.timed("ring_check"):
            line = ring_check.apply(ct, np.asarray(leg_label.array) == 2,
                                    registration.patient_to_template, self.template.plafond,
                                    finding, res.classification.probabilities,
                                    self.localiser.decision)
        if line is not None:
            res.fracture_line = line
            res.findings.append(C.Finding(C.WARNING, "fracture_line_by_ring_check",
                                          ring_check.message(finding),
                                          {"height_mm": round(float(finding.height_mm), 2)}))

    @staticmethod
    def _label_on_ct(label: Volume, ct: Volume, res: PipelineResult) -> Volume:
        """A caller's label map on exactly the CT's grid (resampled with a note if needed)."""
        from AnkleFractureLib.registration.labels import labels_on_ct_grid

        on_ct, note = labels_on_ct_grid(label, ct)
        if note:
            res.findings.append(C.Finding(C.WARNING, "label_resampled", note))
        arr = on_ct.array
        if arr.dtype != np.uint8 and arr.min() >= 0 and arr.max() <= 2:
            on_ct = on_ct.with_array(np.rint(arr).astype(np.uint8))
        return on_ct


def _clear_removed(res: PipelineResult, leg_label: Volume, cleaned: Volume) -> None:
    """``res``'s label map and bone volumes without what the shape prior took from the
    analysed leg (the other leg's labels, in a two-leg scan, stay)."""
    if res.label is leg_label:
        res.label = cleaned
    else:
        gone = (np.asarray(leg_label.array) > 0) & (np.asarray(cleaned.array) == 0)
        arr = np.array(res.label.array, copy=True)
        arr[gone] = 0
        res.label = res.label.with_array(arr)
    res.bones_ml = C.bone_volumes_ml(res.label)


# ---------------------------------------------------------------------- writing
def write_outputs(result: PipelineResult, out_dir: PathLike, ct: Optional[Volume] = None,
                  report_pdf: bool = False) -> Dict[str, Any]:
    """Write every available output into ``out_dir``, each atomically, ``result.json`` last.

    Files of stages that did not run are not written, and stale ones from an earlier run in the
    same folder are removed first (the old ``result.json`` before anything else), so a
    ``result.json`` always sits beside exactly its own files:

    * ``segmentation.nii.gz``: uint8 labels on the CT's grid;
    * ``transform.json`` / ``transform.tfm``: as ``ankle-fracture register`` writes them;
    * ``syndesmosis_crop.nii.gz``: the 3-channel crop on the template's box grid;
    * ``gradcam.nii.gz``: float32 heatmap in [0, 1] on the CT's voxel lattice, covering only
      the box of the syndesmosis crop (its origin is that box's first voxel; a viewer overlays
      it on the CT by its geometry);
    * ``fracture_line.nii.gz``: uint8, 1 on the located fibular fracture line, on the CT's
      voxel lattice kept to the crop's box (only when a line was found);
    * ``report.png``: a one-page summary (needs ``ct``), and with ``report_pdf`` the same page
      as ``report.pdf``;
    * ``result.json``: :meth:`PipelineResult.to_json` plus ``files``.

    Args:
        result: The run's result.
        out_dir: Output folder (created).
        ct: The CT (for the report; the heatmap's grid is checked against it).
        report_pdf: Also write ``report.pdf``.

    Returns:
        The dict written as ``result.json``.
    """
    from AnkleFractureLib.crop.syndesmosis import box_on_grid
    from AnkleFractureLib.io import atomic_write_json

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "the output must be a folder, but a file of that name exists")
    if ct is not None and result.gradcam is not None and box_on_grid(result.gradcam, ct,
                                                                     atol=1e-4) is None:
        raise RuntimeError("the Grad-CAM volume is not on the CT's grid")  # never misplace it
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(out / "result.json")
    data = result.to_json()
    # The images are compressed in a thread of their own while the report is drawn: ITK's
    # writer leaves the GIL while it compresses, and matplotlib holds it (about 0.5 s of the
    # 1 s the writing took one after the other on 2 cores).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-images") as pool:
        images = pool.submit(_write_images, result, out)
        written = _write_transforms(result, out)
        reports = _write_reports(result, out, ct, data, report_pdf)
        written = sorted(images.result() + written + reports, key=OUTPUT_FILES.index)
    for name in OUTPUT_FILES:
        if name not in written and name != "result.json":
            with contextlib.suppress(FileNotFoundError):
                os.remove(out / name)
    data["files"] = written
    atomic_write_json(out / "result.json", data)
    return data


def _write_images(result: PipelineResult, out: Path) -> List[str]:
    """Write the result's images into ``out`` (each atomically); their names."""
    from AnkleFractureLib.crop.syndesmosis import write_crop
    from AnkleFractureLib.io import write_image

    written: List[str] = []
    if result.label is not None:
        write_image(result.label, out / "segmentation.nii.gz")
        written.append("segmentation.nii.gz")
    if result.crop is not None:
        write_crop(result.crop, out / "syndesmosis_crop.nii.gz")
        written.append("syndesmosis_crop.nii.gz")
    if result.gradcam is not None:
        write_image(result.gradcam.with_array(result.gradcam.array.astype(np.float32,
                                                                          copy=False)),
                    out / "gradcam.nii.gz")
        written.append("gradcam.nii.gz")
    if result.fracture_line is not None:
        write_image(result.fracture_line, out / "fracture_line.nii.gz")
        written.append("fracture_line.nii.gz")
    return written


def _write_transforms(result: PipelineResult, out: Path) -> List[str]:
    """Write the registration as ``ankle-fracture register`` does; the names written."""
    from AnkleFractureLib.registration.transform_io import (write_itk_transform,
                                                            write_transform_json)

    if result.registration is None:
        return []
    tdata = result.registration.to_json()
    if result.crop is not None:
        tdata["crop_coverage"] = round(float(result.crop.coverage), 4)
    write_itk_transform(result.registration.template_to_patient, out / "transform.tfm")
    write_transform_json(tdata, out / "transform.json")
    return ["transform.json", "transform.tfm"]


def _write_reports(result: PipelineResult, out: Path, ct: Optional[Volume],
                   data: Dict[str, Any], report_pdf: bool) -> List[str]:
    """Draw ``report.png`` (and ``report.pdf``) when the CT is given; the names written. A
    figure that cannot be drawn adds a warning to ``data`` instead of losing the result."""
    if ct is None:
        return []
    from AnkleFractureLib.pipeline.report import write_report_pdf, write_report_png

    reports = [("report.png", write_report_png)]
    if report_pdf:
        reports.append(("report.pdf", write_report_pdf))
    written = []
    for name, writer in reports:
        try:  # the report reads the heatmap on its box (0 outside it)
            writer(out / name, ct, result.label, result.gradcam, data)
            written.append(name)
        except Exception as exc:  # noqa: BLE001 - a figure must not lose the result
            data["warnings"].append(f"{name} could not be drawn: "
                                    f"{type(exc).__name__}: {exc}")
    return written
