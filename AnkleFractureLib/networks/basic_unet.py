"""Twin of MONAI's ``BasicUNet`` (the fracture localiser), in plain torch.

Architecture reference: ``monai.networks.nets.BasicUNet`` (Project MONAI, Apache-2.0), after
Falk et al. 2019 (Nature Methods 16, 67-70). Five encoder levels (two 3^d convolutions each,
max-pooling between them), four decoder levels (transposed-convolution upsampling, channel
concatenation with the encoder map, two convolutions) and a 1^d output convolution. Module
names (``conv_0``, ``down_1``..``down_4``, ``upcat_4``..``upcat_1``, ``final_conv``) and
creation order are MONAI's, so ``state_dict`` keys, shapes and seeded initial weights match.

Input (B, C, z, y, x) in 3-D. Sizes not divisible by 16 work as in MONAI: max-pooling floors
an odd size, and the decoder pads its upsampled map by one voxel (replicating the last slice)
on each axis where it is one short of the encoder map. Instance norm (without running
statistics, so in eval mode too) needs more than one voxel per channel at the bottom level
(1/16 of the size, floored): some axis must be at least 32.

Example:
    >>> import torch
    >>> net = BasicUNet(3, 3, 1, features=(4, 4, 8, 8, 8, 4))
    >>> net(torch.zeros(1, 3, 33, 18, 20)).shape
    torch.Size([1, 1, 33, 18, 20])
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence, Union

import torch
from torch import nn

from AnkleFractureLib.networks.layers import Convolution, LayerSpec, conv_class

_MAX_POOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


class TwoConv(nn.Sequential):
    """Two 3^d :class:`Convolution` blocks (padding 1), children ``conv_0`` and ``conv_1``.

    Args:
        spatial_dims: 1, 2 or 3 (input (B, C, z, y, x) in 3-D).
        in_chns: Input channels.
        out_chns: Output channels.
        act: Activation spec.
        norm: Norm spec.
        bias: Whether the convolutions have a bias.
        dropout: Dropout ratio (0.0 still adds ``Dropout(p=0)`` children, as MONAI does).

    Example:
        >>> import torch
        >>> TwoConv(2, 1, 4, "relu", "batch", True)(torch.zeros(2, 1, 5, 5)).shape
        torch.Size([2, 4, 5, 5])
    """

    def __init__(self, spatial_dims: int, in_chns: int, out_chns: int, act: LayerSpec,
                 norm: LayerSpec, bias: bool, dropout: Union[float, LayerSpec] = 0.0) -> None:
        super().__init__()
        conv_0 = Convolution(spatial_dims, in_chns, out_chns, act=act, norm=norm,
                             dropout=dropout, bias=bias, padding=1)
        conv_1 = Convolution(spatial_dims, out_chns, out_chns, act=act, norm=norm,
                             dropout=dropout, bias=bias, padding=1)
        self.add_module("conv_0", conv_0)
        self.add_module("conv_1", conv_1)


class Down(nn.Sequential):
    """Max-pooling (kernel 2: floors odd sizes) then :class:`TwoConv`; children
    ``max_pooling`` and ``convs``.

    Args:
        spatial_dims: 1, 2 or 3 (input (B, C, z, y, x) in 3-D).
        in_chns: Input channels.
        out_chns: Output channels.
        act: Activation spec.
        norm: Norm spec.
        bias: Whether the convolutions have a bias.
        dropout: Dropout ratio.

    Example:
        >>> import torch
        >>> Down(3, 2, 4, "relu", "instance", True)(torch.zeros(1, 2, 5, 6, 7)).shape
        torch.Size([1, 4, 2, 3, 3])
    """

    def __init__(self, spatial_dims: int, in_chns: int, out_chns: int, act: LayerSpec,
                 norm: LayerSpec, bias: bool, dropout: Union[float, LayerSpec] = 0.0) -> None:
        super().__init__()
        max_pooling = _MAX_POOL[spatial_dims - 1](kernel_size=2)
        convs = TwoConv(spatial_dims, in_chns, out_chns, act, norm, bias, dropout)
        self.add_module("max_pooling", max_pooling)
        self.add_module("convs", convs)


class UpCat(nn.Module):
    """Upsampling by a stride-2 transposed convolution, concatenation with the encoder map,
    then :class:`TwoConv`; children ``upsample`` (with child ``deconv``) and ``convs``.

    Where the upsampled map is shorter than the encoder map along an axis (the encoder size
    was odd), it is padded at the end of that axis by one voxel, replicating the last slice,
    as MONAI does (``is_pad``).

    Args:
        spatial_dims: 1, 2 or 3 (input (B, C, z, y, x) in 3-D).
        in_chns: Channels of the map to upsample.
        cat_chns: Channels of the encoder map.
        out_chns: Output channels.
        act: Activation spec.
        norm: Norm spec.
        bias: Whether the two convolutions have a bias (the transposed convolution always
            has one, as in MONAI).
        dropout: Dropout ratio.
        halves: The upsampling halves the channels (else keeps them).
        is_pad: Pad a one-voxel-short upsampled map (else concatenation needs equal sizes).

    Example:
        >>> import torch
        >>> up = UpCat(3, 8, 4, 4, "relu", "instance", True)
        >>> up(torch.zeros(1, 8, 2, 3, 3), torch.zeros(1, 4, 5, 6, 7)).shape
        torch.Size([1, 4, 5, 6, 7])
    """

    def __init__(self, spatial_dims: int, in_chns: int, cat_chns: int, out_chns: int,
                 act: LayerSpec, norm: LayerSpec, bias: bool,
                 dropout: Union[float, LayerSpec] = 0.0, halves: bool = True,
                 is_pad: bool = True) -> None:
        super().__init__()
        up_chns = in_chns // 2 if halves else in_chns
        # MONAI's UpSample("deconv"): kernel = stride = 2, no padding, bias always on.
        deconv = conv_class(spatial_dims, transposed=True)(
            in_chns, up_chns, kernel_size=2, stride=2, padding=0, output_padding=0, bias=True)
        self.upsample = nn.Sequential(OrderedDict(deconv=deconv))
        self.convs = TwoConv(spatial_dims, cat_chns + up_chns, out_chns, act, norm, bias,
                             dropout)
        self.is_pad = is_pad

    def forward(self, x: torch.Tensor, x_e: torch.Tensor | None) -> torch.Tensor:
        """Upsample ``x`` (B, in_chns, *s) and fuse it with ``x_e`` (B, cat_chns, *S), S = 2s
        or 2s + 1 per axis; without ``x_e`` only the upsampled map goes through the convs."""
        x_0 = self.upsample(x)
        if x_e is None:
            return self.convs(x_0)
        if self.is_pad:
            # F.pad lists the last axis first: entry 2i + 1 is the end of axis -(i + 1).
            pad = [0] * (2 * (x.ndim - 2))
            for i in range(x.ndim - 2):
                if x_e.shape[-i - 1] != x_0.shape[-i - 1]:
                    pad[2 * i + 1] = 1
            x_0 = nn.functional.pad(x_0, pad, "replicate")
        return self.convs(torch.cat([x_e, x_0], dim=1))


class BasicUNet(nn.Module):
    """Five-level U-Net: twin of ``monai.networks.nets.BasicUNet`` (``upsample="deconv"``).

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels (logits).
        features: Six ints: the five encoder widths, then the width after the last upsampling.
        act: Activation spec (MONAI's default: in-place LeakyReLU, slope 0.1).
        norm: Norm spec (MONAI's default: instance norm with affine parameters).
        bias: Whether the 3^d convolutions have a bias.
        dropout: Dropout ratio (0.0 still adds ``Dropout(p=0)`` children, as MONAI does).
        upsample: Only "deconv" (MONAI's default) is mirrored.

    Example:
        >>> import torch
        >>> net = BasicUNet(2, 1, 2, features=(4, 4, 8, 8, 8, 4)).eval()
        >>> net(torch.zeros(1, 1, 32, 17)).shape
        torch.Size([1, 2, 32, 17])
        >>> [n for n, _ in net.named_children()][-2:]
        ['upcat_1', 'final_conv']
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
                 features: Sequence[int] = (32, 32, 64, 128, 256, 32),
                 act: LayerSpec = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
                 norm: LayerSpec = ("instance", {"affine": True}), bias: bool = True,
                 dropout: Union[float, LayerSpec] = 0.0, upsample: str = "deconv") -> None:
        super().__init__()
        if upsample != "deconv":
            raise NotImplementedError(f"only upsample='deconv' is mirrored, got {upsample!r}")
        fea = tuple(int(f) for f in features)
        if len(fea) != 6:
            raise ValueError(f"features needs 6 ints, got {features}")
        args = (act, norm, bias, dropout)
        # Attribute order = MONAI's creation order (seeded initial weights agree).
        self.conv_0 = TwoConv(spatial_dims, in_channels, fea[0], *args)
        self.down_1 = Down(spatial_dims, fea[0], fea[1], *args)
        self.down_2 = Down(spatial_dims, fea[1], fea[2], *args)
        self.down_3 = Down(spatial_dims, fea[2], fea[3], *args)
        self.down_4 = Down(spatial_dims, fea[3], fea[4], *args)
        self.upcat_4 = UpCat(spatial_dims, fea[4], fea[3], fea[3], *args)
        self.upcat_3 = UpCat(spatial_dims, fea[3], fea[2], fea[2], *args)
        self.upcat_2 = UpCat(spatial_dims, fea[2], fea[1], fea[1], *args)
        self.upcat_1 = UpCat(spatial_dims, fea[1], fea[0], fea[5], *args, halves=False)
        self.final_conv = conv_class(spatial_dims)(fea[5], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, z, y, x) -> (B, out_channels, z, y, x) logits."""
        x0 = self.conv_0(x)
        x1 = self.down_1(x0)
        x2 = self.down_2(x1)
        x3 = self.down_3(x2)
        x4 = self.down_4(x3)
        u4 = self.upcat_4(x4, x3)
        u3 = self.upcat_3(u4, x2)
        u2 = self.upcat_2(u3, x1)
        u1 = self.upcat_1(u2, x0)
        return self.final_conv(u1)
