"""Weber classification of a syndesmosis crop: probabilities, uncertainty, Grad-CAM.

``WeberClassifier.load()`` reads a model folder (the shipped one by default);
``classify(crop)`` returns a :class:`ClassificationResult`: calibrated probabilities for
none / A / B / C (softmax of logits / T, T fitted on validation data at training time), the
prediction, a test-time-augmentation uncertainty and the Grad-CAM heatmap on the crop grid.
:func:`classify_ct` runs registration + crop + classification on a CT and its bone label map
and maps the heatmap onto the CT's voxel lattice through the crop inverse, kept to the box the
crop covers (:func:`~AnkleFractureLib.crop.syndesmosis.crop_to_ct_box`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from AnkleFractureLib.classification.plans import CLASSES, ClsPlans
from AnkleFractureLib.geometry.volume import Volume

PathLike = Union[str, "os.PathLike[str]"]
ProgressCallback = Callable[[float, str], None]
MODEL_NAME = "classification"


def default_model_dir() -> Path:
    """The shipped classifier folder (``Resources/Models/classification``)."""
    from AnkleFractureLib.resources import resource_path

    return resource_path("Models", MODEL_NAME)


@dataclass
class ClassificationResult:
    """The classifier's answer for one crop.

    Attributes:
        probabilities: {"none", "A", "B", "C"} -> probability (sum 1); the TTA mean when TTA
            ran, else the single forward pass.
        prediction: The class with the highest probability.
        uncertainty: The TTA summary (``UncertaintySummary.to_json()``): confidence,
            normalised entropy, mutual information, agreement, ``unsure`` and its reasons.
        gradcam: float32 (nz, ny, nx) on the crop grid, [0, 1], 1 = most important, for
            ``gradcam_class``; None when not computed.
        gradcam_class: Class the heatmap explains.
        timings: Seconds per step.
        gradcam_info: How the heatmap was made: {"method", "layers", "cell_mm" ((z, y, x) mm
            of the finest layer's cells, None when the crop's spacing was not given)}; None
            when not computed.
    """

    probabilities: Dict[str, float]
    prediction: str
    uncertainty: Dict[str, Any]
    gradcam: Optional[np.ndarray] = None
    gradcam_class: Optional[str] = None
    timings: Dict[str, float] = field(default_factory=dict)
    gradcam_info: Optional[Dict[str, Any]] = None

    def to_json(self) -> Dict[str, Any]:
        return {"probabilities": {k: round(float(v), 6) for k, v in self.probabilities.items()},
                "prediction": self.prediction, "uncertainty": self.uncertainty,
                "gradcam_class": self.gradcam_class, "gradcam": self.gradcam_info,
                "timings_s": {k: round(float(v), 4) for k, v in self.timings.items()}}


class WeberClassifier:
    """A loaded classifier (network in eval mode + plans).

    Example:
        >>> import tempfile, torch
        >>> from AnkleFractureLib.classification.model_io import save_classifier
        >>> from AnkleFractureLib.classification.network import build_classifier
        >>> plans = ClsPlans.make(widths=[4, 8, 8, 16], downsample=2, tta=2)
        >>> folder = tempfile.mkdtemp()
        >>> _ = save_classifier(folder, build_classifier(plans.network), plans)
        >>> clf = WeberClassifier.load(folder, device="cpu")
        >>> res = clf.classify_channels(np.zeros((3, 32, 16, 16), np.float32))
        >>> round(sum(res.probabilities.values()), 6), res.gradcam.shape
        (1.0, (32, 16, 16))
    """

    def __init__(self, network: Any, plans: ClsPlans, device: Any, model_dir: Optional[Path] = None
                 ) -> None:
        self.network = network
        self.plans = plans
        self.device = device
        self.model_dir = model_dir

    @classmethod
    def load(cls, model_dir: Optional[PathLike] = None, device: str = "auto"
             ) -> "WeberClassifier":
        """Load a model folder (default: the shipped classifier) on ``device``
        ("auto" = CUDA when available, "cpu", "cuda")."""
        from AnkleFractureLib.classification.model_io import load_classifier
        from AnkleFractureLib.segmentation.inference import resolve_device

        folder = Path(model_dir) if model_dir is not None else default_model_dir()
        dev = resolve_device(device)
        net, plans = load_classifier(folder, dev)
        return cls(net, plans, dev, folder)

    # ------------------------------------------------------------------ batch prediction
    def predict_inputs(self, x: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """Calibrated probabilities (N, K) of prepared inputs (N, C, z, y, x)."""
        import torch

        out: List[np.ndarray] = []
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                xb = torch.from_numpy(np.asarray(x[i:i + batch_size], np.float32)).to(self.device)
                logits = self.network(xb).float() / float(self.plans.temperature)
                out.append(torch.softmax(logits, dim=1).cpu().numpy().astype(np.float64))
        return np.concatenate(out) if out else np.zeros((0, len(CLASSES)))

    def predict_crops(self, crops: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """Probabilities (N, K) of crop channels (N, 3, nz, ny, nx)."""
        return self.predict_inputs(self.plans.prepare(np.asarray(crops)), batch_size)

    # ------------------------------------------------------------------ one case
    def classify_channels(self, channels: np.ndarray, tta: Optional[int] = None,
                          gradcam: bool = True, gradcam_class: Optional[str] = None,
                          seed: int = 0, spacing_zyx: Optional[Sequence[float]] = None
                          ) -> ClassificationResult:
        """Classify one crop given as channels (3, nz, ny, nx).

        Args:
            channels: Crop channels (CT [0, 1], tibia, fibula).
            tta: Test-time augmentations (None: the plans' default; 0 or 1: none).
            gradcam: Also compute the Grad-CAM heatmap (on the crop grid), with the layers and
                method of :data:`~.gradcam.SHIPPED_LAYERS` / :data:`~.gradcam.SHIPPED_METHOD`.
            gradcam_class: Class to explain (default: the prediction).
            seed: TTA seed (results are deterministic).
            spacing_zyx: The crop's voxel size (z, y, x) in mm, for the heatmap's cell size.
        """
        from AnkleFractureLib.classification.gradcam import (SHIPPED_LAYERS, SHIPPED_METHOD,
                                                             grad_cam)
        from AnkleFractureLib.classification.uncertainty import summarize_probabilities, tta_batch

        timings: Dict[str, float] = {}
        t = time.perf_counter()
        x = self.plans.prepare(channels)
        n = self.plans.tta if tta is None else int(tta)
        ct_index = 0 if "ct" in self.plans.channels else None
        samples = tta_batch(x, max(1, n), seed=seed, ct_channel=ct_index) if n > 1 else x[None]
        probs = self.predict_inputs(samples)
        summary = summarize_probabilities(probs)
        timings["classify"] = time.perf_counter() - t
        mean = np.asarray(summary.mean_probabilities, dtype=np.float64)
        probabilities = {c: float(p) for c, p in zip(CLASSES, mean)}
        prediction = CLASSES[int(np.argmax(mean))]
        heat = None
        target = None
        info = None
        if gradcam:
            t = time.perf_counter()
            target = gradcam_class or prediction
            if target not in CLASSES:
                raise ValueError(f"gradcam_class must be one of {CLASSES}, got {target!r}")
            res = grad_cam(self.network, x[None], target_class=CLASSES.index(target),
                           layer=SHIPPED_LAYERS, output_shape=tuple(np.shape(channels)[1:]),
                           method=SHIPPED_METHOD)
            heat = res.heatmap.astype(np.float32)
            # Cells in crop voxels: the network may see a pooled crop (plans.downsample).
            scale = np.asarray(np.shape(channels)[1:], float) / np.asarray(x.shape[1:], float)
            cell = None if spacing_zyx is None else [
                round(float(c * f * s), 3)
                for c, f, s in zip(res.cell_voxels, scale, spacing_zyx)]
            info = {"method": res.method, "layers": list(res.layers), "cell_mm": cell}
            timings["gradcam"] = time.perf_counter() - t
        return ClassificationResult(probabilities, prediction, summary.to_json(), heat, target,
                                    timings, info)

    def classify(self, crop: Any, **kwargs: Any) -> ClassificationResult:
        """Classify a :class:`~AnkleFractureLib.crop.syndesmosis.SyndesmosisCrop` (keyword
        arguments as :meth:`classify_channels`)."""
        kwargs.setdefault("spacing_zyx", tuple(float(v) for v in crop.grid.spacing[::-1]))
        return self.classify_channels(crop.channels, **kwargs)


def classify_ct(ct: Volume, label: Volume, classifier: Optional[WeberClassifier] = None,
                registration: Any = None, template: Any = None, side: str = "auto",
                tta: Optional[int] = None, gradcam_class: Optional[str] = None,
                progress: Optional[ProgressCallback] = None) -> Dict[str, Any]:
    """Register (unless given), crop and classify one CT; Grad-CAM on the CT's grid.

    Args:
        ct: CT (HU).
        label: Bone label map on the CT's grid (1 tibia, 2 fibula).
        classifier: Loaded classifier (the shipped one when None).
        registration: A :class:`~AnkleFractureLib.registration.register.Registration` of
            ``label`` (computed when None).
        template: Template (the shipped one when None).
        side: "auto", "left" or "right" (used when registering).
        tta: Test-time augmentations (None: the model's default).
        gradcam_class: Class the heatmap explains (default: the prediction).
        progress: Callback (fraction, message).

    Returns:
        {"result": ClassificationResult, "gradcam": float32 Volume on the CT's lattice
        covering the crop's box (``paste_on_grid`` expands it), "crop": SyndesmosisCrop,
        "registration": Registration}.
    """
    from AnkleFractureLib.crop.syndesmosis import crop_raw_ct, crop_syndesmosis, crop_to_ct_box
    from AnkleFractureLib.registration.register import register_to_template
    from AnkleFractureLib.registration.template import load_template

    def report(f: float, m: str) -> None:
        if progress is not None:
            progress(f, m)

    classifier = classifier or WeberClassifier.load()
    timings: Dict[str, float] = {}
    t = time.perf_counter()
    if classifier.plans.crop == "raw":
        crop = crop_raw_ct(ct)
    else:
        template = template or load_template()
        if registration is None:
            report(0.05, "registering to the template")
            registration = register_to_template(label, template, side=side, ct=ct)
        report(0.4, "cropping the syndesmosis")
        crop = crop_syndesmosis(ct, label, registration.patient_to_template, template)
    timings["crop"] = time.perf_counter() - t
    report(0.5, "classifying")
    result = classifier.classify(crop, tta=tta, gradcam=True, gradcam_class=gradcam_class)
    t = time.perf_counter()
    # Only the crop's box on the CT's lattice: a whole-grid float32 copy is ~370 MB for a
    # clinical CT (1.6 GB for 512 x 512 x 1500), almost all zeros.
    heat = crop_to_ct_box(result.gradcam, crop, ct, interpolation="linear", default_value=0.0,
                          clip=(0.0, 1.0))
    heat = heat.with_array(heat.array, meta={"source": "gradcam", "class": result.gradcam_class})
    timings["gradcam_to_ct"] = time.perf_counter() - t
    result.timings.update(timings)
    report(1.0, f"prediction {result.prediction}")
    return {"result": result, "gradcam": heat, "crop": crop, "registration": registration}
