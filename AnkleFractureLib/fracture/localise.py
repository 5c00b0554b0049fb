"""Locate and measure the fibular fracture line on a syndesmosis crop.

The localiser network (:mod:`.network`) reads the fibula window of the crop (:mod:`.window`)
and returns, per voxel, the probability of lying on the fibular fracture line. From it:

* ``found`` / ``probability``: the strongest connected line (voxels above ``threshold``), its
  peak probability; found when it reaches ``found_threshold`` and ``min_voxels``;
* ``center_lps``: the probability-weighted centre of that line (patient LPS mm);
* ``height_mm``: its signed distance above the tibial plafond along the tibial long axis, both
  taken from the patient's registration to the template (template z axis and plafond mapped
  into the patient: true patient mm, the similarity's scale undone); negative below;
* ``extent``: the line's length along its main direction and the heights it spans (mm).

A model folder holds ``plans.json`` (network, window, thresholds) and ``model.pt``
(float16 weights, the format of every model of the project).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from AnkleFractureLib.errors import InputError, PathLike
from AnkleFractureLib.fracture.window import WINDOW_YX, Window, fibula_window

KIND = "fracture_localiser"
#: Default thresholds (plans.json "decision").
DEFAULT_DECISION = {"threshold": 0.5, "found_threshold": 0.5, "min_voxels": 6}


def default_model_dir() -> Path:
    """The shipped localiser (``Resources/Models/fracture``)."""
    from AnkleFractureLib.resources import resources_dir

    return resources_dir() / "Models" / "fracture"


@dataclass
class FractureFinding:
    """The located fibular fracture (``result.json["fracture"]``).

    Attributes:
        found: Whether a fibular fracture line was found.
        probability: Peak line probability of the strongest line (0-1).
        height_mm: Height of the line's centre above the plafond (mm), None if not found.
        center_lps: [x, y, z] patient LPS mm of the line's centre, None if not found.
        extent: {"length_mm", "height_min_mm", "height_max_mm", "voxels"} or None.
        heatmap: float32 (z, y, x) line probability on the crop grid (not in JSON).
        line: uint8 (z, y, x) the found line on the crop grid (not in JSON).
        size_factor: Patient size / template size (1 / registration scale).
        model: {"name", "sha256"} of the localiser.
    """

    found: bool
    probability: float
    height_mm: Optional[float]
    center_lps: Optional[List[float]]
    extent: Optional[Dict[str, float]]
    heatmap: np.ndarray = field(repr=False, default=None)
    line: np.ndarray = field(repr=False, default=None)
    size_factor: float = 1.0
    model: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        """The JSON-ready entry (no arrays)."""
        return {"found": bool(self.found), "probability": round(float(self.probability), 4),
                "height_mm": None if self.height_mm is None else round(float(self.height_mm), 2),
                "center_lps": None if self.center_lps is None else [round(float(v), 2)
                                                                   for v in self.center_lps],
                "extent": self.extent, "size_factor": round(float(self.size_factor), 4),
                "model": self.model}


def _components(prob: np.ndarray, threshold: float) -> Tuple[np.ndarray, int]:
    from scipy import ndimage

    return ndimage.label(prob > threshold, structure=np.ones((3, 3, 3), bool))


def strongest_line(prob: np.ndarray, threshold: float) -> Tuple[np.ndarray, float]:
    """The connected set of voxels above ``threshold`` with the largest summed probability.

    Args:
        prob: Probability map (z, y, x).
        threshold: Voxel threshold.

    Returns:
        (bool mask of that line (all False when none), its peak probability; the map's peak
        when no voxel passes).
    """
    lab, n = _components(prob, threshold)
    if n == 0:
        return np.zeros(prob.shape, bool), float(prob.max()) if prob.size else 0.0
    from scipy import ndimage

    sums = ndimage.sum_labels(prob, lab, index=np.arange(1, n + 1))
    best = int(np.argmax(sums)) + 1
    mask = lab == best
    return mask, float(prob[mask].max())


def measure_line(mask: np.ndarray, prob: np.ndarray, grid: Any, patient_to_template: np.ndarray,
                 plafond_template: np.ndarray) -> Tuple[np.ndarray, float, Dict[str, float], float]:
    """Centre (LPS), height above the plafond and extent of a line on the crop grid.

    Args:
        mask: bool (z, y, x) line voxels on the crop grid.
        prob: Probabilities (z, y, x) (weights of the centre).
        grid: The crop grid Volume (template mm).
        patient_to_template: 4x4 patient LPS mm -> template mm.
        plafond_template: (3,) template mm of the plafond.

    Returns:
        (centre LPS (3,), height mm, extent dict, size factor patient/template).
    """
    kk, jj, ii = np.nonzero(mask)
    w = prob[kk, jj, ii].astype(float)
    pts_t = grid.index_to_physical(np.stack([ii, jj, kk], axis=1).astype(float))
    t2p = np.linalg.inv(np.asarray(patient_to_template, float))
    pts = pts_t @ t2p[:3, :3].T + t2p[:3, 3]
    centre = (pts * w[:, None]).sum(axis=0) / w.sum()
    plafond = t2p[:3, :3] @ np.asarray(plafond_template, float) + t2p[:3, 3]
    axis = t2p[:3, :3] @ np.array([0.0, 0.0, 1.0])
    size_factor = float(np.linalg.norm(axis))
    axis = axis / size_factor
    heights = (pts - plafond) @ axis
    height = float((centre - plafond) @ axis)
    centred = pts - centre
    main = np.linalg.svd(centred, full_matrices=False)[2][0] if len(pts) > 1 else axis
    along = centred @ main
    extent = {"length_mm": round(float(along.max() - along.min()) if len(pts) else 0.0, 2),
              "height_min_mm": round(float(heights.min()), 2),
              "height_max_mm": round(float(heights.max()), 2), "voxels": int(len(pts))}
    return centre, height, extent, size_factor


class FractureLocaliser:
    """A loaded localiser.

    Args:
        network: The network (eval mode).
        plans: plans.json content ({"network", "window_yx", "decision", ...}).
        device: torch device.
        model_dir: Where it was loaded from.
    """

    def __init__(self, network: Any, plans: Dict[str, Any], device: Any,
                 model_dir: Optional[Path] = None) -> None:
        self.network, self.plans, self.device = network, plans, device
        self.model_dir = model_dir
        self.decision = {**DEFAULT_DECISION, **plans.get("decision", {})}
        self.window_yx = tuple(plans.get("window_yx", WINDOW_YX))

    @classmethod
    def load(cls, model_dir: Optional[PathLike] = None, device: str = "auto"
             ) -> "FractureLocaliser":
        """Load a model folder (the shipped one when None).

        Raises:
            InputError: Missing or damaged files (the message names the file).
        """
        from AnkleFractureLib.fracture.model_io import load_localiser
        from AnkleFractureLib.segmentation.inference import resolve_device

        folder = Path(model_dir) if model_dir is not None else default_model_dir()
        dev = resolve_device(device)
        network, plans = load_localiser(folder, dev)
        return cls(network, plans, dev, folder)

    def heatmap(self, channels: np.ndarray) -> Tuple[np.ndarray, Window]:
        """Line probability on the crop grid.

        Args:
            channels: Crop channels (3, z, y, x): CT [0, 1], tibia, fibula.

        Returns:
            (float32 (z, y, x) probability on the crop grid (0 outside the window), window).
        """
        import torch

        if channels.ndim != 4 or channels.shape[0] != 3:
            raise InputError(None, f"the localiser needs (3, z, y, x) crop channels, got "
                                   f"{tuple(channels.shape)}")
        win = fibula_window(channels[2], self.window_yx)
        x = torch.from_numpy(win.extract(np.asarray(channels, np.float32))[None]).to(self.device)
        with torch.no_grad():
            prob = torch.sigmoid(self.network(x))[0, 0].float().cpu().numpy()
        return win.paste(prob, channels.shape[1:]), win

    def locate(self, crop: Any, plafond_template: np.ndarray) -> FractureFinding:
        """Find and measure the fibular fracture line of a syndesmosis crop.

        Args:
            crop: A :class:`~AnkleFractureLib.crop.syndesmosis.SyndesmosisCrop`.
            plafond_template: (3,) template mm of the plafond (``template.plafond``).

        Returns:
            The finding (arrays on the crop grid).
        """
        prob, _ = self.heatmap(crop.channels)
        mask, peak = strongest_line(prob, self.decision["threshold"])
        found = bool(peak >= self.decision["found_threshold"]
                     and mask.sum() >= self.decision["min_voxels"])
        model = {"name": "fracture", "sha256": self.plans.get("_sha256")}
        scale = np.linalg.norm(np.asarray(crop.patient_to_template)[:3, 2])
        finding = FractureFinding(found, peak, None, None, None, prob, mask.astype(np.uint8),
                                  1.0 / float(scale), model)
        if found:
            c, h, ext, sf = measure_line(mask, prob, crop.grid, crop.patient_to_template,
                                         plafond_template)
            finding.center_lps, finding.height_mm, finding.extent = c.tolist(), h, ext
            finding.size_factor = sf
        else:
            finding.line = np.zeros(prob.shape, np.uint8)
        return finding
