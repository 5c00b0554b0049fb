"""SE-ResNet-18 for 3D crops, built from MONAI blocks (``spatial_dims`` factory style).

A ResNet-18 layout (four stages of two basic residual blocks) whose every block ends with a
squeeze-and-excitation layer (MONAI ``ChannelSELayer``) before the residual sum, as in
Hu et al.'s SE-ResNet. Widths are configurable; the default (32, 64, 128, 256) keeps the
network small, under the 20 MB budget, and fast enough
to train on CPU.

Input: (B, C, z, y, x) float, e.g. the syndesmosis crop (3, 96, 48, 64): CT [0, 1], tibia
mask, fibula mask. Output: (B, num_classes) logits.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import torch
from torch import nn

from AnkleFractureLib.networks import check_implementation

#: Name of the last convolutional stage: Grad-CAM hooks onto it.
GRADCAM_LAYER = "layer4"


def _blocks(implementation: str) -> Tuple[Any, Any]:
    """(ChannelSELayer, Convolution) classes from MONAI or from their plain-torch twins."""
    if check_implementation(implementation) == "monai":
        from monai.networks.blocks import ChannelSELayer, Convolution
    else:
        from AnkleFractureLib.networks import ChannelSELayer, Convolution
    return ChannelSELayer, Convolution


class GlobalAvgPool(nn.Module):
    """Mean over the spatial axes, keeping them as size 1: ``AdaptiveAvgPool(1)`` without its
    CUDA backward pass, which sums with atomic adds and so differs between runs with the same
    seed (a mean's backward is a broadcast: deterministic). Same forward values.

    Example:
        >>> GlobalAvgPool()(torch.ones(2, 3, 4, 5, 6)).shape
        torch.Size([2, 3, 1, 1, 1])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)


class MaxPool3x3Stride2(nn.Module):
    """Max-pooling, kernel 3, stride 2, padding 1, in any number of spatial axes, done one axis
    at a time with strided slices and ``torch.maximum``.

    The forward values are those of ``MaxPool3d(3, 2, 1)``; the backward pass is made of slice
    and maximum gradients that autograd adds in a fixed order, whereas the CUDA backward of
    ``max_pool3d`` scatters with atomic adds (it differs between runs with the same seed, and
    PyTorch has no deterministic kernel for it). Ties share the gradient instead of giving it to
    one voxel; training does not care.

    Example:
        >>> x = torch.randn(1, 2, 7, 6, 5)
        >>> torch.equal(MaxPool3x3Stride2()(x), torch.nn.MaxPool3d(3, 2, 1)(x))
        True
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for dim in range(2, x.ndim):
            x = self._along(x, dim)
        return x

    @staticmethod
    def _along(x: torch.Tensor, dim: int) -> torch.Tensor:
        n_out = (x.shape[dim] - 1) // 2 + 1
        pad = [0, 0] * (x.ndim - 2)
        pad[2 * (x.ndim - 1 - dim):2 * (x.ndim - 1 - dim) + 2] = [1, 1]
        x = nn.functional.pad(x, pad, value=float("-inf"))

        every_other = (slice(None),) * dim + (slice(None, None, 2),)

        def taps(start: int) -> torch.Tensor:  # window element `start` of each output voxel
            return x.narrow(dim, start, 2 * n_out - 1)[every_other]

        return torch.maximum(torch.maximum(taps(0), taps(1)), taps(2))


class SEBasicBlock(nn.Module):
    """Basic residual block (two 3^d convs) with a squeeze-and-excitation layer.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first conv (2 halves every spatial size).
        se_reduction: SE bottleneck ratio ``r`` (channels / r in the excitation MLP).
        norm: MONAI norm name, e.g. "batch" or "instance".
        implementation: Blocks from "torch" (the twins of :mod:`AnkleFractureLib.networks`,
            inference) or "monai" (training); same weights and outputs.

    Example:
        >>> blk = SEBasicBlock(3, 4, 8, stride=2)
        >>> blk(torch.zeros(2, 4, 8, 8, 8)).shape
        torch.Size([2, 8, 4, 4, 4])
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1,
                 se_reduction: int = 8, norm: str = "batch", implementation: str = "torch"
                 ) -> None:
        super().__init__()
        ChannelSELayer, Convolution = _blocks(implementation)

        self.conv1 = Convolution(spatial_dims, in_channels, out_channels, strides=stride,
                                 kernel_size=3, act="relu", norm=norm, bias=False)
        self.conv2 = Convolution(spatial_dims, out_channels, out_channels, strides=1,
                                 kernel_size=3, act=None, norm=norm, bias=False)
        # MONAI needs r < channels: tiny test networks get a smaller ratio.
        self.se = ChannelSELayer(spatial_dims, out_channels,
                                 r=max(1, min(se_reduction, out_channels // 2)))
        self.se.avg_pool = GlobalAvgPool()  # same values, deterministic on CUDA (no weights)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = Convolution(spatial_dims, in_channels, out_channels,
                                                   strides=stride, kernel_size=1, act=None,
                                                   norm=norm, bias=False)
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.se(self.conv2(self.conv1(x))) + self.shortcut(x))


class SEResNet(nn.Module):
    """SE-ResNet classifier: stem, four stages, global average pooling, linear head.

    ``features(x)`` returns the pooled embedding (B, widths[-1]) that the semi-supervised
    training uses (prototypes, relation network, MMD); ``forward`` returns logits.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels (3 for the syndesmosis crop).
        num_classes: Output classes (4: none, A, B, C).
        widths: Channels of the four stages.
        blocks: Blocks per stage ((2, 2, 2, 2) = ResNet-18).
        se_reduction: SE ratio.
        dropout: Dropout before the head.
        norm: Normalisation ("batch" as in ResNet).
        implementation: "torch" (inference) or "monai" (training), as in :class:`SEBasicBlock`.

    Example:
        >>> net = SEResNet(3, 3, 4, widths=(4, 8, 8, 16))
        >>> net(torch.zeros(2, 3, 32, 16, 24)).shape
        torch.Size([2, 4])
        >>> net.features(torch.zeros(2, 3, 32, 16, 24)).shape
        torch.Size([2, 16])
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 3, num_classes: int = 4,
                 widths: Sequence[int] = (32, 64, 128, 256), blocks: Sequence[int] = (2, 2, 2, 2),
                 se_reduction: int = 8, dropout: float = 0.2, norm: str = "batch",
                 stem_kernel: int = 3, stage_strides: Sequence[int] = (1, 2, 2, 1),
                 implementation: str = "torch") -> None:
        super().__init__()
        _, Convolution = _blocks(implementation)

        if len(widths) != 4 or len(blocks) != 4:
            raise ValueError(f"widths and blocks need 4 stages, got {widths} and {blocks}")
        self.spatial_dims = spatial_dims
        # Stem: conv stride 2 + max-pool, so the crop (96 x 48 x 64 at 1.5 mm) is 24 x 12 x 16
        # before the stages. The last stage keeps stride 1 (default ``stage_strides``): its
        # 6 x 3 x 4 cells (~24 mm) still separate the malleolar tip, the plafond level and the
        # shaft above the syndesmosis, which a Grad-CAM needs; a standard stride 2 there would
        # leave 3 x 2 x 2 cells for +25 % compute saved.
        self.stem = nn.Sequential(
            Convolution(spatial_dims, in_channels, widths[0], strides=2, kernel_size=stem_kernel,
                        act="relu", norm=norm, bias=False),
            MaxPool3x3Stride2(),  # = MaxPool(3, 2, 1), deterministic on CUDA (no weights)
        )
        stages = []
        cin = widths[0]
        for w, n, st in zip(widths, blocks, stage_strides):
            layers = [SEBasicBlock(spatial_dims, cin, w, stride=int(st),
                                   se_reduction=se_reduction, norm=norm,
                                   implementation=implementation)]
            layers += [SEBasicBlock(spatial_dims, w, w, 1, se_reduction, norm, implementation)
                       for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = GlobalAvgPool()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[-1], num_classes)
        self.feature_dim = int(widths[-1])
        self.num_classes = int(num_classes)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last convolutional stage, (B, widths[-1], z/32, y/32, x/32)."""
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (B, widths[-1])."""
        return torch.flatten(self.pool(self.feature_maps(x)), 1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from embeddings (B, widths[-1]) -> (B, num_classes)."""
        return self.fc(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


def build_classifier(config: Dict[str, Any], implementation: str = "torch") -> SEResNet:
    """Build the classifier described by ``config`` (``ClsPlans.network``).

    Args:
        config: {"architecture": "se_resnet18", "spatial_dims", "in_channels", "num_classes",
            "widths", "blocks", "se_reduction", "dropout", "norm"}.
        implementation: "torch" (inference) or "monai" (training), as in :class:`SEBasicBlock`.

    Returns:
        The network (logits out).

    Example:
        >>> net = build_classifier({"architecture": "se_resnet18", "widths": [4, 8, 8, 16]})
        >>> net(torch.zeros(1, 3, 32, 16, 16)).shape
        torch.Size([1, 4])
    """
    arch = config.get("architecture", "se_resnet18")
    if arch != "se_resnet18":
        raise ValueError(f"unknown classifier architecture {arch!r} (supported: 'se_resnet18')")
    return SEResNet(spatial_dims=int(config.get("spatial_dims", 3)),
                    in_channels=int(config.get("in_channels", 3)),
                    num_classes=int(config.get("num_classes", 4)),
                    widths=tuple(int(w) for w in config.get("widths", (32, 64, 128, 256))),
                    blocks=tuple(int(b) for b in config.get("blocks", (2, 2, 2, 2))),
                    se_reduction=int(config.get("se_reduction", 8)),
                    dropout=float(config.get("dropout", 0.2)),
                    norm=str(config.get("norm", "batch")),
                    stem_kernel=int(config.get("stem_kernel", 3)),
                    stage_strides=tuple(int(v) for v in config.get("stage_strides", (1, 2, 2, 1))),
                    implementation=implementation)


def parameter_count(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return int(sum(p.numel() for p in net.parameters() if p.requires_grad))


def feature_grid(shape: Sequence[int], stem_kernel: int = 3,
                 stage_strides: Sequence[int] = (1, 2, 2, 1)) -> Tuple[int, ...]:
    """Spatial size of :meth:`SEResNet.feature_maps` for an input of ``shape`` (z, y, x).

    Example:
        >>> feature_grid((96, 48, 64))
        (6, 3, 4)
    """
    out = []
    for s in shape:
        s = (s + 2 * (stem_kernel // 2) - stem_kernel) // 2 + 1  # stem conv
        s = (s + 2 - 3) // 2 + 1                                   # max-pool
        for st in stage_strides:
            s = (s + 2 - 3) // st + 1
        out.append(s)
    return tuple(out)
