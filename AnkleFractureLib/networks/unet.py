"""Twin of MONAI's ``UNet`` (the segmentation network), in plain torch.

Architecture reference: ``monai.networks.nets.UNet`` (Project MONAI, Apache-2.0), itself
after Kerfoot et al. 2018 (residual units). The network is built recursively as MONAI builds
it: ``model = Sequential(down, SkipConnection(inner), up)``, where ``inner`` is the same
structure one level deeper and the innermost one is the bottom layer, so ``state_dict`` keys
(``model.1.submodule.1.submodule...``) match MONAI's and MONAI weights load with
``strict=True``. Modules are created in MONAI's order (innermost block first), so the same
``torch.manual_seed`` gives the same initial weights.

Input (B, C, z, y, x) in 3-D (every spatial size divisible by the product of the strides).

Example:
    >>> import torch
    >>> net = UNet(3, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=2)
    >>> net(torch.zeros(1, 1, 16, 16, 16)).shape
    torch.Size([1, 3, 16, 16, 16])
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

from AnkleFractureLib.networks.layers import Convolution, IntOrSeq, LayerSpec, ResidualUnit


class SkipConnection(nn.Module):
    """``cat([x, submodule(x)], dim)`` (or their sum / product): twin of MONAI's
    ``SkipConnection``; the wrapped block is the child ``submodule``.

    Args:
        submodule: The branch (keeps the spatial size of its input).
        dim: Concatenation axis (1: channels of (B, C, *spatial)).
        mode: "cat", "add" or "mul".

    Example:
        >>> import torch
        >>> SkipConnection(nn.Identity())(torch.zeros(1, 2, 3, 3)).shape
        torch.Size([1, 4, 3, 3])
    """

    def __init__(self, submodule: nn.Module, dim: int = 1, mode: str = "cat") -> None:
        super().__init__()
        if mode not in ("cat", "add", "mul"):
            raise ValueError(f"mode must be 'cat', 'add' or 'mul', got {mode!r}")
        self.submodule = submodule
        self.dim = dim
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, *spatial) -> x combined with ``submodule(x)``."""
        y = self.submodule(x)
        if self.mode == "cat":
            return torch.cat([x, y], dim=self.dim)
        return torch.add(x, y) if self.mode == "add" else torch.mul(x, y)


class UNet(nn.Module):
    """U-Net with optional residual units: twin of ``monai.networks.nets.UNet``.

    Each level: a down block (strided :class:`Convolution`, or :class:`ResidualUnit` when
    ``num_res_units > 0``), the deeper levels behind a :class:`SkipConnection` (channel
    concatenation) and an up block (transposed convolution, followed by a one-subunit
    residual unit when ``num_res_units > 0``). The top up block ends without norm/activation
    (raw logits).

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels (logits).
        channels: Channels per level, top first (at least 2).
        strides: Stride per down step (``len(channels) - 1`` used).
        num_res_units: Subunits of the residual units (0: plain convolutions).
        norm: Norm spec ("instance" = ``InstanceNorm`` without affine, as in MONAI).
        dropout: Dropout ratio (0.0 adds ``Dropout(p=0)`` children, as MONAI does).
        act: Activation spec (MONAI's default PReLU: one parameter, init 0.25).
        kernel_size: Kernel of the convolutions.
        up_kernel_size: Kernel of the transposed convolutions.
        bias: Whether the convolutions have a bias.
        adn_ordering: Order of norm, dropout and activation.

    The arguments after ``strides`` are keyword-only: their positional order differs from
    MONAI's (where ``kernel_size`` follows ``strides``), so a positional call fails instead of
    binding the wrong parameter.

    Example:
        >>> import torch
        >>> net = UNet(2, 1, 2, channels=(4, 8), strides=(2,)).eval()
        >>> net(torch.zeros(1, 1, 8, 6)).shape
        torch.Size([1, 2, 8, 6])
        >>> list(net.state_dict())[:2]
        ['model.0.conv.weight', 'model.0.conv.bias']
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 channels: Sequence[int], strides: Sequence[int], *, num_res_units: int = 0,
                 norm: LayerSpec = "instance", dropout: float = 0.0,
                 act: LayerSpec = "prelu", kernel_size: IntOrSeq = 3,
                 up_kernel_size: IntOrSeq = 3, bias: bool = True,
                 adn_ordering: str = "NDA") -> None:
        super().__init__()
        _check_arguments(spatial_dims, channels, strides, kernel_size, up_kernel_size)
        self.dimensions = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        self.strides = strides
        self.kernel_size = kernel_size
        self.up_kernel_size = up_kernel_size
        self.num_res_units = num_res_units
        self.act = act
        self.norm = norm
        self.dropout = dropout
        self.bias = bias
        self.adn_ordering = adn_ordering
        self.model = self._level(in_channels, out_channels, list(channels), list(strides), True)

    def _level(self, cin: int, cout: int, channels: Sequence[int], strides: Sequence[int],
               is_top: bool) -> nn.Module:
        """One level and, recursively, all below it. The inner levels are built before this
        level's down and up blocks, as in MONAI: that order fixes which random numbers each
        convolution's initial weights get."""
        c, s = channels[0], strides[0]
        if len(channels) > 2:
            inner = self._level(c, c, channels[1:], strides[1:], False)
            up_in = c * 2  # this level's skip + the inner level's up output (c channels)
        else:
            inner = self._down(c, channels[1], 1)  # the bottom layer (stride 1)
            up_in = c + channels[1]
        down = self._down(cin, c, s)
        up = self._up(up_in, cout, s, is_top)
        return nn.Sequential(down, SkipConnection(inner), up)

    def _down(self, cin: int, cout: int, stride: int) -> nn.Module:
        """Encoder block: a residual unit, or a single convolution without residual units."""
        common = dict(strides=stride, kernel_size=self.kernel_size, act=self.act,
                      norm=self.norm, dropout=self.dropout, bias=self.bias,
                      adn_ordering=self.adn_ordering)
        if self.num_res_units > 0:
            return ResidualUnit(self.dimensions, cin, cout, subunits=self.num_res_units,
                                **common)
        return Convolution(self.dimensions, cin, cout, **common)

    def _up(self, cin: int, cout: int, stride: int, is_top: bool) -> nn.Module:
        """Decoder block: transposed convolution, then a one-subunit residual unit (whose
        convolution is bare at the top) when the network has residual units."""
        conv = Convolution(self.dimensions, cin, cout, strides=stride,
                           kernel_size=self.up_kernel_size, act=self.act, norm=self.norm,
                           dropout=self.dropout, bias=self.bias,
                           conv_only=is_top and self.num_res_units == 0, is_transposed=True,
                           adn_ordering=self.adn_ordering)
        if self.num_res_units <= 0:
            return conv
        ru = ResidualUnit(self.dimensions, cout, cout, strides=1, kernel_size=self.kernel_size,
                          subunits=1, act=self.act, norm=self.norm, dropout=self.dropout,
                          bias=self.bias, last_conv_only=is_top, adn_ordering=self.adn_ordering)
        return nn.Sequential(conv, ru)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, z, y, x) -> (B, out_channels, z, y, x) logits."""
        return self.model(x)


def _check_arguments(spatial_dims: int, channels: Sequence[int], strides: Sequence[int],
                     kernel_size: Union[int, Sequence[int]],
                     up_kernel_size: Optional[Union[int, Sequence[int]]]) -> None:
    """MONAI's argument checks (same errors, same warning for unused strides)."""
    if len(channels) < 2:
        raise ValueError("the length of `channels` should be no less than 2.")
    delta = len(strides) - (len(channels) - 1)
    if delta < 0:
        raise ValueError("the length of `strides` should equal to `len(channels) - 1`.")
    if delta > 0:
        warnings.warn(f"`len(strides) > len(channels) - 1`, the last {delta} values of "
                      "strides will not be used.")
    for name, ks in (("kernel_size", kernel_size), ("up_kernel_size", up_kernel_size)):
        if isinstance(ks, Sequence) and len(ks) != spatial_dims:
            raise ValueError(f"the length of `{name}` should equal to `dimensions`.")
