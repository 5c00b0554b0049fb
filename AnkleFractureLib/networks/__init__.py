"""Plain-torch twins of the MONAI networks the pipeline runs, for inference without importing
MONAI.

``import monai`` costs about 2 s (its package ``__init__`` loads transforms, data, scipy and
matplotlib); a cold ``ankle-fracture run`` needs only three architectures and the sliding
window. The twins here have the same module trees as MONAI's (so MONAI-trained
``state_dict`` files load with ``strict=True``) and the same forward outputs. Training keeps
using MONAI. Architecture reference: MONAI (Project MONAI, Apache-2.0).

Example:
    >>> import torch
    >>> net = UNet(3, 1, 2, channels=(4, 8), strides=(2,)).eval()
    >>> sliding_window_inference(torch.zeros(1, 1, 12, 12, 12), (8, 8, 8), 2, net).shape
    torch.Size([1, 2, 12, 12, 12])
"""

from __future__ import annotations

from AnkleFractureLib.networks.basic_unet import BasicUNet, Down, TwoConv, UpCat
from AnkleFractureLib.networks.layers import ADN, ChannelSELayer, Convolution, ResidualUnit
from AnkleFractureLib.networks.sliding_window import (compute_importance_map, dense_patch_slices,
                                                      sliding_window_inference)
from AnkleFractureLib.networks.unet import SkipConnection, UNet

#: Where a stage's network factory takes its building blocks from: "torch" (these twins, the
#: inference default: no MONAI import) or "monai" (MONAI itself, what training uses).
IMPLEMENTATIONS = ("torch", "monai")


def check_implementation(implementation: str) -> str:
    """``implementation`` if it is one of :data:`IMPLEMENTATIONS`, else ValueError.

    Example:
        >>> check_implementation("monai")
        'monai'
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown network implementation {implementation!r} "
                         f"(supported: {', '.join(IMPLEMENTATIONS)})")
    return implementation

__all__ = [
    "IMPLEMENTATIONS",
    "ADN",
    "BasicUNet",
    "ChannelSELayer",
    "Convolution",
    "Down",
    "ResidualUnit",
    "SkipConnection",
    "TwoConv",
    "UNet",
    "UpCat",
    "check_implementation",
    "compute_importance_map",
    "dense_patch_slices",
    "sliding_window_inference",
]
