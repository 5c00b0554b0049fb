"""The fracture localiser network: a small 3D U-Net on the fibula window of the crop.

MONAI's ``BasicUNet`` (``spatial_dims`` factory style): input (B, 3, z, y, x) = the crop's CT,
tibia and fibula channels inside the fibula window (:mod:`AnkleFractureLib.fracture.window`);
output (B, 1, z, y, x) logits of "this voxel is on the fibular fracture line".
:class:`MeanProbability` makes one localiser of several trained ones (an ensemble).

Example:
    >>> import torch
    >>> net = build_localiser({"features": [4, 4, 8, 8, 8, 4]})
    >>> net(torch.zeros(1, 3, 32, 16, 16)).shape
    torch.Size([1, 1, 32, 16, 16])
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
from torch import nn

from AnkleFractureLib.networks import check_implementation

#: Default network configuration (plans.json "network").
DEFAULT_NETWORK: Dict[str, Any] = {"architecture": "basic_unet", "spatial_dims": 3,
                                   "in_channels": 3, "out_channels": 1,
                                   "features": [8, 16, 32, 64, 64, 8], "dropout": 0.0}


def build_localiser(config: Dict[str, Any], implementation: str = "torch") -> nn.Module:
    """A ``BasicUNet`` from a plans "network" dict (missing keys take :data:`DEFAULT_NETWORK`).

    Args:
        config: {"features": 6 ints, "in_channels", "out_channels", "spatial_dims", "dropout"}.
        implementation: "torch" (the plain-torch twin of :mod:`AnkleFractureLib.networks`,
            inference) or "monai" (MONAI's ``BasicUNet``, training): same weights and outputs.

    Returns:
        The network (untrained).
    """
    if check_implementation(implementation) == "monai":
        from monai.networks.nets import BasicUNet
    else:
        from AnkleFractureLib.networks import BasicUNet

    cfg = {**DEFAULT_NETWORK, **(config or {})}
    if cfg["architecture"] != "basic_unet":
        raise ValueError(f"unknown localiser architecture {cfg['architecture']!r}")
    return BasicUNet(spatial_dims=int(cfg["spatial_dims"]), in_channels=int(cfg["in_channels"]),
                     out_channels=int(cfg["out_channels"]), features=tuple(cfg["features"]),
                     norm=("instance", {"affine": True}),
                     act=("LeakyReLU", {"negative_slope": 0.1}), dropout=float(cfg["dropout"]))


class MeanProbability(nn.Module):
    """Several localisers as one: the mean of their line probabilities, returned as a logit
    (so that ``sigmoid(output)`` is the mean probability, as for a single network).

    Networks trained on different data mark different lines (a line one misses another
    finds); averaging their probabilities keeps a line that most of them mark and fades one
    that only one marks.

    Args:
        members: The networks (each (B, 3, z, y, x) -> (B, 1, z, y, x) logits).

    Example:
        >>> import torch
        >>> a, b = (build_localiser({"features": [4, 4, 8, 8, 8, 4]}) for _ in range(2))
        >>> x = torch.zeros(1, 3, 32, 16, 16)
        >>> both = MeanProbability([a, b]).eval()
        >>> mean = (torch.sigmoid(a.eval()(x)) + torch.sigmoid(b.eval()(x))) / 2
        >>> bool(torch.allclose(torch.sigmoid(both(x)), mean, atol=1e-5))
        True
    """

    #: Probabilities are clipped to [EPS, 1 - EPS] before the logit (finite output).
    EPS = 1e-6

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one network")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prob = torch.stack([torch.sigmoid(m(x)) for m in self.members]).mean(dim=0)
        return torch.logit(prob, eps=self.EPS)
