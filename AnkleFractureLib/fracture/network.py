"""The fracture localiser network: a small 3D U-Net on the fibula window of the crop.

MONAI's ``BasicUNet`` (``spatial_dims`` factory style): input (B, 3, z, y, x) = the crop's CT,
tibia and fibula channels inside the fibula window (:mod:`AnkleFractureLib.fracture.window`);
output (B, 1, z, y, x) logits of "this voxel is on the fibular fracture line".

Example:
    >>> import torch
    >>> net = build_localiser({"features": [4, 4, 8, 8, 8, 4]})
    >>> net(torch.zeros(1, 3, 32, 16, 16)).shape
    torch.Size([1, 1, 32, 16, 16])
"""

from __future__ import annotations

from typing import Any, Dict

from torch import nn

#: Default network configuration (plans.json "network").
DEFAULT_NETWORK: Dict[str, Any] = {"architecture": "basic_unet", "spatial_dims": 3,
                                   "in_channels": 3, "out_channels": 1,
                                   "features": [8, 16, 32, 64, 64, 8], "dropout": 0.0}


def build_localiser(config: Dict[str, Any]) -> nn.Module:
    """A ``BasicUNet`` from a plans "network" dict (missing keys take :data:`DEFAULT_NETWORK`).

    Args:
        config: {"features": 6 ints, "in_channels", "out_channels", "spatial_dims", "dropout"}.

    Returns:
        The network (untrained).
    """
    from monai.networks.nets import BasicUNet

    cfg = {**DEFAULT_NETWORK, **(config or {})}
    if cfg["architecture"] != "basic_unet":
        raise ValueError(f"unknown localiser architecture {cfg['architecture']!r}")
    return BasicUNet(spatial_dims=int(cfg["spatial_dims"]), in_channels=int(cfg["in_channels"]),
                     out_channels=int(cfg["out_channels"]), features=tuple(cfg["features"]),
                     norm=("instance", {"affine": True}),
                     act=("LeakyReLU", {"negative_slope": 0.1}), dropout=float(cfg["dropout"]))
