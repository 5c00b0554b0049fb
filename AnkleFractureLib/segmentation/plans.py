"""Segmentation plans: everything that defines a model besides its weights, as JSON data.

As in nnU-Net, the choices that must agree between training and inference (model spacing, HU
window, patch size, network, region of interest) live in ``plans.json`` next to the weights, so a
hospital that retrains with other choices ships them with its model.

Example:
    >>> p = SegPlans()
    >>> p.model_spacing_mm, p.patch_size
    ((1.0, 1.0, 1.0), (96, 96, 96))
    >>> SegPlans.from_json(p.to_json()) == p
    True
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Tuple

from AnkleFractureLib.errors import InputError

LABELS = {"background": 0, "tibia": 1, "fibula": 2}


def default_network() -> Dict[str, Any]:
    """MONAI ``UNet`` settings of the shipped model.

    Why this size: 4.8 M parameters (9.6 MB as float16), residual units, five levels, so the
    receptive field spans the whole distal leg cross-section at 1 mm (needed to tell the tibia,
    the fibula and the unlabelled talus apart), while a forward pass over a 112 x 112 x 176 mm
    bone region takes about 0.9 s on 2 CPU cores (MONAI 1.6, torch 2.13). SegResNet with 8
    filters was 3.6 times slower; 8-128 UNets were barely faster.
    """
    return {"architecture": "unet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
            "channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2,
            "norm": "instance", "dropout": 0.0}


@dataclass
class SegPlans:
    """What a segmentation model expects.

    Attributes:
        model_spacing_mm: Spacing (x, y, z) in mm at which the network sees the CT.
        hu_window: (lower, upper) HU mapped linearly to [0, 1] (clipped outside).
        patch_size: Training patch size (z, y, x) in voxels at model spacing; multiples of 16
            (four stride-2 levels).
        inference_patch_size: Sliding-window size (z, y, x) at inference, or None for
            ``patch_size``. The network is fully convolutional, so a larger window than the
            training patch covers the bone region in fewer, less-overlapping windows: on three
            held-out phantoms 128^3 windows gave the same Dice as 80^3 (0.971-0.984) with the
            network time down from 5.7 s to 1.7-3.2 s on 2 CPU cores.
        roi_bone_hu: HU above which voxels count as bone when cropping to the bone region.
        roi_margin_mm: Margin (mm) around the bone region kept for the network.
        network: Arguments of :func:`AnkleFractureLib.segmentation.network.build_network`.
        labels: Label values (background 0, tibia 1, fibula 2).
    """

    model_spacing_mm: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    hu_window: Tuple[float, float] = (-1000.0, 2000.0)
    patch_size: Tuple[int, int, int] = (96, 96, 96)
    inference_patch_size: Optional[Tuple[int, int, int]] = None
    roi_bone_hu: float = 250.0
    roi_margin_mm: float = 12.0
    network: Dict[str, Any] = field(default_factory=default_network)
    labels: Dict[str, int] = field(default_factory=lambda: dict(LABELS))
    format_version: int = 1

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        d["model_spacing_mm"] = list(self.model_spacing_mm)
        d["hu_window"] = list(self.hu_window)
        d["patch_size"] = list(self.patch_size)
        d["inference_patch_size"] = (None if self.inference_patch_size is None
                                     else list(self.inference_patch_size))
        return d

    @property
    def window_size(self) -> Tuple[int, int, int]:
        """The sliding-window size used at inference (z, y, x)."""
        return tuple(self.inference_patch_size or self.patch_size)  # type: ignore[return-value]

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "SegPlans":
        try:
            p = cls(model_spacing_mm=tuple(float(v) for v in data["model_spacing_mm"]),
                    hu_window=tuple(float(v) for v in data["hu_window"]),
                    patch_size=tuple(int(v) for v in data["patch_size"]),
                    inference_patch_size=(None if data.get("inference_patch_size") is None else
                                          tuple(int(v) for v in data["inference_patch_size"])),
                    roi_bone_hu=float(data.get("roi_bone_hu", 250.0)),
                    roi_margin_mm=float(data.get("roi_margin_mm", 12.0)),
                    network=dict(data.get("network") or default_network()),
                    labels=dict(data.get("labels") or LABELS),
                    format_version=int(data.get("format_version", 1)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid segmentation plans: {exc}") from None
        if len(p.model_spacing_mm) != 3 or min(p.model_spacing_mm) <= 0:
            raise ValueError(f"model_spacing_mm must be 3 positive values, got {p.model_spacing_mm}")
        for name in ("patch_size", "inference_patch_size"):
            size = getattr(p, name)
            if size is not None and (len(size) != 3 or any(s % 16 for s in size)):
                raise ValueError(f"{name} must be 3 multiples of 16, got {size}")
        if p.labels != LABELS:
            raise ValueError(f"labels must be {LABELS}, got {p.labels}")
        return p

    @classmethod
    def load(cls, path: "os.PathLike[str] | str") -> "SegPlans":
        """Read ``plans.json`` (InputError naming the file when it is missing or invalid)."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as fh:
                return cls.from_json(json.load(fh))
        except FileNotFoundError:
            raise InputError(path, "segmentation plans (plans.json) not found") from None
        except (OSError, json.JSONDecodeError, ValueError) as exc:
            raise InputError(path, f"cannot read segmentation plans: {exc}") from None
