"""Network factory of the segmentation stage (MONAI's UNet, ``spatial_dims`` style).

Training builds MONAI's own ``UNet``; inference builds its plain-torch twin
(:mod:`AnkleFractureLib.networks`: same module tree, weights and outputs), so that a cold run
does not pay MONAI's ~2 s package import.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from AnkleFractureLib.networks import check_implementation


def build_network(config: Dict[str, Any], implementation: str = "torch") -> torch.nn.Module:
    """Build the segmentation network described by ``config`` (see ``SegPlans.network``).

    Args:
        config: {"architecture": "unet", "spatial_dims", "in_channels", "out_channels",
            "channels", "strides", "num_res_units", "norm", "dropout"}.
        implementation: "torch" (the plain-torch twin, inference) or "monai" (training); the
            two have the same ``state_dict`` keys, the same initial weights under a seed and
            the same outputs.

    Returns:
        A ``torch.nn.Module`` mapping (B, in_channels, z, y, x) to (B, out_channels, z, y, x)
        logits.

    Example:
        >>> net = build_network({"architecture": "unet", "spatial_dims": 3, "in_channels": 1,
        ...                      "out_channels": 3, "channels": [4, 8], "strides": [2]})
        >>> net(torch.zeros(1, 1, 16, 16, 16)).shape
        torch.Size([1, 3, 16, 16, 16])
    """
    if check_implementation(implementation) == "monai":
        from monai.networks.nets import UNet
    else:
        from AnkleFractureLib.networks import UNet

    arch = config.get("architecture", "unet")
    if arch != "unet":
        raise ValueError(f"unknown segmentation architecture {arch!r} (supported: 'unet')")
    return UNet(spatial_dims=int(config.get("spatial_dims", 3)),
                in_channels=int(config.get("in_channels", 1)),
                out_channels=int(config.get("out_channels", 3)),
                channels=tuple(int(c) for c in config["channels"]),
                strides=tuple(int(s) for s in config["strides"]),
                num_res_units=int(config.get("num_res_units", 2)),
                norm=config.get("norm", "instance"),
                dropout=float(config.get("dropout", 0.0)))
