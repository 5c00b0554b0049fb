"""Classifier plans: everything that defines a Weber classifier besides its weights (JSON).

The choices that must agree between training and inference live in ``plans.json`` next to the
weights (as for segmentation): which crop the network sees (the registered syndesmosis crop
or the raw-CT control), which of its channels, at which resolution, the network, the class
order, and the calibration temperature fitted after training.

Example:
    >>> p = ClsPlans()
    >>> p.classes, p.crop, p.channels, p.downsample
    (['none', 'A', 'B', 'C'], 'registered', ['ct', 'tibia', 'fibula'], 1)
    >>> ClsPlans.from_json(p.to_json()) == p
    True
    >>> import numpy as np
    >>> raw = ClsPlans.make("raw", downsample=2)
    >>> raw.channels, raw.network["in_channels"]
    (['ct'], 1)
    >>> raw.prepare(np.zeros((3, 96, 48, 64), np.float32)).shape
    (1, 48, 24, 32)
    >>> ClsPlans.make(downsample=[1, 2, 2]).prepare(np.zeros((3, 96, 48, 64), np.float32)).shape
    (3, 96, 24, 32)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Tuple, Union

import numpy as np

from AnkleFractureLib.errors import InputError

#: Class order of every probability vector (index = class id).
CLASSES = ["none", "A", "B", "C"]
#: Crop channel names, in the order of ``SyndesmosisCrop.channels``.
CROP_CHANNELS = ["ct", "tibia", "fibula"]
#: Crop kinds: the registered syndesmosis crop, or the raw-CT control (no segmentation or
#: registration, an axis-aligned box of the same size centred on the bone).
CROP_KINDS = ("registered", "raw")


def default_network() -> Dict[str, Any]:
    """SE-ResNet-18 settings of the shipped classifier.

    Why this size: widths 16-32-64-128 give 2.1 M parameters (4.2 MB as float16) and a
    training step of 16 crops in ~2.7 s on 2 CPU cores; widths 32-256 (8.3 M) cost 7 times
    more per step for a task whose evidence is a fracture gap in a binary mask.
    """
    return {"architecture": "se_resnet18", "spatial_dims": 3, "in_channels": 3,
            "num_classes": 4, "widths": [16, 32, 64, 128], "blocks": [2, 2, 2, 2],
            "se_reduction": 8, "dropout": 0.2, "norm": "batch", "stem_kernel": 3,
            "stage_strides": [1, 2, 2, 1]}


@dataclass
class ClsPlans:
    """What a classifier expects.

    Attributes:
        classes: Class names in output order.
        crop: "registered" (syndesmosis crop in the template frame) or "raw" (control).
        channels: Crop channels fed to the network, a subset of :data:`CROP_CHANNELS` in order.
        downsample: Average-pooling factor applied to the crop: one integer for every axis
            (1 = the 1.5 mm grid, 2 = 3 mm) or three (z, y, x), e.g. [1, 2, 2] keeps 1.5 mm
            along the leg, where a Weber fracture line shows as a thin gap across the fibula,
            and pools the cross-section to 3 mm (the experiment's CPU runs).
        network: Arguments of :func:`AnkleFractureLib.classification.network.build_classifier`
            (``in_channels`` must equal ``len(channels)``).
        temperature: Softmax temperature (logits / T), fitted on validation data; 1 = none.
        tta: Default number of test-time augmentations for the uncertainty (0 = none).
    """

    classes: List[str] = field(default_factory=lambda: list(CLASSES))
    crop: str = "registered"
    channels: List[str] = field(default_factory=lambda: list(CROP_CHANNELS))
    downsample: Union[int, List[int]] = 1
    network: Dict[str, Any] = field(default_factory=default_network)
    temperature: float = 1.0
    tta: int = 8
    format_version: int = 1

    def __post_init__(self) -> None:
        if list(self.classes) != CLASSES:
            raise ValueError(f"classes must be {CLASSES}, got {self.classes}")
        if self.crop not in CROP_KINDS:
            raise ValueError(f"crop must be one of {list(CROP_KINDS)}, got {self.crop!r}")
        if not self.channels or any(c not in CROP_CHANNELS for c in self.channels):
            raise ValueError(f"channels must be a non-empty subset of {CROP_CHANNELS}, "
                             f"got {self.channels}")
        if isinstance(self.downsample, (list, tuple)):
            self.downsample = [int(v) for v in self.downsample]
            if len(self.downsample) != 3:
                raise ValueError(f"downsample needs 1 or 3 factors, got {self.downsample}")
        else:
            self.downsample = int(self.downsample)
        if min(self.factors) < 1:
            raise ValueError(f"downsample must be >= 1, got {self.downsample}")
        if int(self.network.get("in_channels", 3)) != len(self.channels):
            raise ValueError(f"network in_channels {self.network.get('in_channels')} != "
                             f"{len(self.channels)} channels {self.channels}")
        if not float(self.temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @classmethod
    def make(cls, crop: str = "registered", downsample: "Union[int, List[int]]" = 1,
             widths: "List[int] | None" = None, **kwargs: Any) -> "ClsPlans":
        """Plans for a crop kind: registered crops use CT + both masks, raw crops the CT only.

        Args:
            crop: "registered" or "raw".
            downsample: Average-pooling factor of the crop.
            widths: SE-ResNet stage widths (default :func:`default_network`'s).
            **kwargs: Other :class:`ClsPlans` fields.
        """
        channels = list(CROP_CHANNELS) if crop == "registered" else ["ct"]
        net = default_network()
        net["in_channels"] = len(channels)
        if widths is not None:
            net["widths"] = [int(w) for w in widths]
        return cls(crop=crop, channels=channels, downsample=downsample, network=net, **kwargs)

    @property
    def factors(self) -> Tuple[int, int, int]:
        """Pooling factors (z, y, x)."""
        d = self.downsample
        return tuple(int(v) for v in d) if isinstance(d, list) else (int(d),) * 3  # type: ignore

    @property
    def channel_indices(self) -> List[int]:
        """Indices of :attr:`channels` in the crop's channel axis."""
        return [CROP_CHANNELS.index(c) for c in self.channels]

    def prepare(self, crop_channels: np.ndarray) -> np.ndarray:
        """Network input from crop channels.

        Args:
            crop_channels: (3, nz, ny, nx) or (N, 3, nz, ny, nx) crop (CT in [0, 1], masks).

        Returns:
            float32 (len(channels), nz/d, ny/d, nx/d) (or with the leading N): the chosen
            channels, average-pooled by ``downsample`` = d (sizes must divide).
        """
        x = np.asarray(crop_channels, dtype=np.float32)
        batched = x.ndim == 5
        if not batched:
            x = x[None]
        if x.ndim != 5 or x.shape[1] != len(CROP_CHANNELS):
            raise ValueError(f"crop channels must be (3, z, y, x) or (N, 3, z, y, x), "
                             f"got {np.shape(crop_channels)}")
        x = x[:, self.channel_indices]
        dz, dy, dx = self.factors
        if max(dz, dy, dx) > 1:
            n, c, z, y, xx = x.shape
            if z % dz or y % dy or xx % dx:
                raise ValueError(f"crop size {(z, y, xx)} is not divisible by downsample "
                                 f"{self.downsample}")
            x = x.reshape(n, c, z // dz, dz, y // dy, dy, xx // dx, dx).mean(axis=(3, 5, 7))
        x = np.ascontiguousarray(x, dtype=np.float32)
        return x if batched else x[0]

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "ClsPlans":
        try:
            return cls(classes=list(data.get("classes", CLASSES)),
                       crop=str(data.get("crop", "registered")),
                       channels=list(data.get("channels", CROP_CHANNELS)),
                       downsample=data.get("downsample", 1),
                       network=dict(data.get("network") or default_network()),
                       temperature=float(data.get("temperature", 1.0)),
                       tta=int(data.get("tta", 8)),
                       format_version=int(data.get("format_version", 1)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid classifier plans: {exc}") from None

    @classmethod
    def load(cls, path: "os.PathLike[str] | str") -> "ClsPlans":
        """Read ``plans.json`` (InputError naming the file when it is missing or invalid)."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as fh:
                return cls.from_json(json.load(fh))
        except FileNotFoundError:
            raise InputError(path, "classifier plans (plans.json) not found") from None
        except (OSError, json.JSONDecodeError, ValueError) as exc:
            raise InputError(path, f"cannot read classifier plans: {exc}") from None
