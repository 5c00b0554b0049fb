"""Building blocks of the twins: convolution + norm/dropout/activation, residual unit and
squeeze-and-excitation layer.

Plain-torch twins of ``monai.networks.blocks.Convolution``, ``ADN``, ``ResidualUnit`` and
``ChannelSELayer`` (architecture reference: MONAI, Project MONAI, Apache-2.0). Child modules
carry MONAI's names (``conv``, ``adn`` with ``N``/``D``/``A``, ``unit0``..., ``residual``,
``avg_pool``, ``fc``) and are created in MONAI's order, so ``state_dict`` keys and shapes are
identical (MONAI weights load with ``strict=True``) and, under the same ``torch.manual_seed``,
so are the initial weights.

Layer specifications follow MONAI's: a name (case-insensitive) or a ``(name, kwargs)`` pair,
e.g. ``"instance"``, ``("instance", {"affine": True})``, ``"prelu"``,
``("LeakyReLU", {"negative_slope": 0.1})``; a dropout is a float ratio (0.0 still adds a
``D`` child, as MONAI does). Tensors are (B, C, *spatial), i.e. (B, C, z, y, x) in 3-D.

Example:
    >>> import torch
    >>> conv = Convolution(3, 1, 4, strides=2)
    >>> conv(torch.zeros(1, 1, 8, 8, 8)).shape
    torch.Size([1, 4, 4, 4, 4])
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

#: A layer given as a name or as (name, constructor keyword arguments), as in MONAI.
LayerSpec = Union[str, Tuple[str, Dict[str, Any]]]
#: An int for every spatial axis, or one int for all of them.
IntOrSeq = Union[int, Sequence[int]]

_ACTIVATIONS = {
    "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "prelu": nn.PReLU, "elu": nn.ELU,
    "relu6": nn.ReLU6, "selu": nn.SELU, "celu": nn.CELU, "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "softmax": nn.Softmax, "logsoftmax": nn.LogSoftmax,
}
# Indexed by spatial_dims - 1, as MONAI's factories pick the 1-D/2-D/3-D class.
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = {
    "instance": (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
    "batch": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
}
_DROPOUTS = (nn.Dropout, nn.Dropout2d, nn.Dropout3d)
_POOL_AVG1 = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def conv_class(spatial_dims: int, transposed: bool = False) -> type:
    """The torch convolution class for ``spatial_dims`` (1, 2 or 3).

    Args:
        spatial_dims: Number of spatial axes.
        transposed: The transposed-convolution class instead.

    Returns:
        ``nn.Conv{n}d`` or ``nn.ConvTranspose{n}d``.

    Example:
        >>> conv_class(3, transposed=True).__name__
        'ConvTranspose3d'
    """
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
    return (_CONV_T if transposed else _CONV)[spatial_dims - 1]


def _split(spec: LayerSpec) -> Tuple[str, Dict[str, Any]]:
    """(lower-case name, kwargs copy) of a layer spec (MONAI matches names case-insensitively)."""
    if isinstance(spec, str):
        return spec.lower(), {}
    if (isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str)
            and isinstance(spec[1], dict)):
        return spec[0].lower(), dict(spec[1])
    raise TypeError(f"a layer is a name or a (name, kwargs dict) pair, got {spec!r}")


def _norm_layer(spec: LayerSpec, spatial_dims: int, channels: int) -> nn.Module:
    """The normalisation layer of ``spec``: torch defaults unless the kwargs say otherwise
    (so MONAI's "instance" is ``affine=False``, its "batch" affine with running statistics)."""
    name, kwargs = _split(spec)
    if name in _NORMS:
        kwargs.setdefault("num_features", channels)
        return _NORMS[name][spatial_dims - 1](**kwargs)
    if name == "group":
        kwargs.setdefault("num_channels", channels)
        return nn.GroupNorm(**kwargs)
    raise ValueError(f"unsupported norm {name!r} (supported: instance, batch, group)")


def _act_layer(spec: LayerSpec) -> nn.Module:
    """The activation of ``spec`` ("prelu" = ``nn.PReLU()``: one parameter, init 0.25)."""
    name, kwargs = _split(spec)
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r} (supported: {sorted(_ACTIVATIONS)})")
    return _ACTIVATIONS[name](**kwargs)


def _dropout_layer(spec: Union[float, LayerSpec], dropout_dim: int) -> nn.Module:
    """The dropout of ``spec``: a ratio means MONAI's default "dropout" type, whose class
    depends on ``dropout_dim`` (1: element-wise ``nn.Dropout``; 2/3: channel-wise)."""
    if isinstance(spec, (int, float)):
        name, kwargs = "dropout", {"p": float(spec)}
    else:
        name, kwargs = _split(spec)
    if name == "dropout":
        return _DROPOUTS[dropout_dim - 1](**kwargs)
    if name == "alphadropout":
        return nn.AlphaDropout(**kwargs)
    raise ValueError(f"unsupported dropout {name!r} (supported: dropout, alphadropout)")


def same_padding(kernel_size: IntOrSeq, dilation: IntOrSeq = 1) -> IntOrSeq:
    """Padding that keeps the size at stride 1 (``(k - 1) / 2 * d``), as MONAI computes it.

    Args:
        kernel_size: Kernel size, one int or one per axis.
        dilation: Dilation, one int or one per axis.

    Returns:
        An int when both arguments are ints (or 1-long), else a tuple.

    Example:
        >>> same_padding(3), same_padding((3, 1, 5))
        (1, (1, 0, 2))
    """
    ks = _as_list(kernel_size)
    dil = _as_list(dilation)
    n = max(len(ks), len(dil))
    ks, dil = ks * (n // len(ks)), dil * (n // len(dil))  # broadcast a 1-long list
    if any((k - 1) * d % 2 for k, d in zip(ks, dil)):
        raise NotImplementedError(f"no same padding for kernel_size={kernel_size} and "
                                  f"dilation={dilation}")
    pad = tuple(int((k - 1) / 2 * d) for k, d in zip(ks, dil))
    return pad if len(pad) > 1 else pad[0]


def _as_list(value: IntOrSeq) -> list:
    return [int(v) for v in value] if isinstance(value, Sequence) else [int(value)]


def _stride_minus_one(strides: IntOrSeq) -> IntOrSeq:
    """MONAI's default ``output_padding`` of a transposed conv: stride - 1 per axis, which
    makes the output exactly stride x the input size."""
    pad = tuple(s - 1 for s in _as_list(strides))
    return pad if len(pad) > 1 else pad[0]


class ADN(nn.Sequential):
    """Norm (N), dropout (D) and activation (A) in the order of ``ordering``; a layer whose
    spec is None is left out (its letter is skipped). Twin of MONAI's ``ADN``.

    Args:
        ordering: Letters of "A", "D", "N" (MONAI's default "NDA").
        in_channels: Channels C of the (B, C, *spatial) input (for the norm).
        act: Activation spec or None.
        norm: Norm spec or None.
        norm_dim: Spatial dims of the norm (1, 2, 3).
        dropout: Dropout ratio or spec, or None (0.0 still adds a ``D`` child).
        dropout_dim: Spatial dims of the dropout class (defaults to ``norm_dim``).

    Example:
        >>> adn = ADN("NDA", 4, act="prelu", norm="instance", norm_dim=3, dropout=0.0,
        ...           dropout_dim=1)
        >>> [(name, type(layer).__name__) for name, layer in adn.named_children()]
        [('N', 'InstanceNorm3d'), ('D', 'Dropout'), ('A', 'PReLU')]
    """

    def __init__(self, ordering: str = "NDA", in_channels: Optional[int] = None,
                 act: Optional[LayerSpec] = "relu", norm: Optional[LayerSpec] = None,
                 norm_dim: Optional[int] = None,
                 dropout: Optional[Union[float, LayerSpec]] = None,
                 dropout_dim: Optional[int] = None) -> None:
        super().__init__()
        # Created N, A, D as MONAI does: none draws random numbers, but keep the order anyway.
        layers: Dict[str, Optional[nn.Module]] = {"A": None, "D": None, "N": None}
        if norm is not None:
            layers["N"] = _norm_layer(norm, _need(norm_dim or dropout_dim), in_channels)
        if act is not None:
            layers["A"] = _act_layer(act)
        if dropout is not None:
            layers["D"] = _dropout_layer(dropout, _need(dropout_dim or norm_dim))
        for letter in ordering.upper():
            if letter not in layers:
                raise ValueError(f"ordering letters are A, D and N, got {letter!r}")
            if layers[letter] is not None:
                self.add_module(letter, layers[letter])


def _need(dims: Optional[int]) -> int:
    if dims is None:
        raise ValueError("norm_dim or dropout_dim needs to be specified")
    return dims


class Convolution(nn.Sequential):
    """A convolution (or transposed convolution) then norm/dropout/activation: twin of MONAI's
    ``Convolution``. Children: ``conv`` and, unless ``conv_only`` or all three of act, norm
    and dropout are None, ``adn`` (:class:`ADN`).

    Padding defaults to "same" (``(k - 1) / 2 * dilation``), so stride s gives ceil(n / s)
    sizes; a transposed conv's ``output_padding`` defaults to ``stride - 1``, so it gives
    exactly s x n.

    Args:
        spatial_dims: 1, 2 or 3 (input (B, C, z, y, x) in 3-D).
        in_channels: Input channels.
        out_channels: Output channels.
        strides: Stride, one int or one per axis.
        kernel_size: Kernel size, one int or one per axis.
        adn_ordering: Order of norm, dropout and activation (default "NDA").
        act: Activation spec or None (MONAI's default: PReLU).
        norm: Norm spec or None (MONAI's default: instance norm, affine=False).
        dropout: Dropout ratio/spec or None.
        dropout_dim: Spatial dims of the dropout class (1: element-wise).
        dilation: Dilation.
        groups: Convolution groups.
        bias: Whether the convolution has a bias.
        conv_only: Only the convolution (no ``adn`` child).
        is_transposed: A transposed convolution (upsampling).
        padding: Padding (default: same padding).
        output_padding: Transposed output padding (default: stride - 1).

    Example:
        >>> import torch
        >>> up = Convolution(2, 4, 2, strides=2, is_transposed=True, act="relu", norm="batch")
        >>> up(torch.zeros(1, 4, 5, 6)).shape
        torch.Size([1, 2, 10, 12])
        >>> [k for k in up.state_dict()][:3]
        ['conv.weight', 'conv.bias', 'adn.N.weight']
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 strides: IntOrSeq = 1, kernel_size: IntOrSeq = 3, adn_ordering: str = "NDA",
                 act: Optional[LayerSpec] = "prelu", norm: Optional[LayerSpec] = "instance",
                 dropout: Optional[Union[float, LayerSpec]] = None,
                 dropout_dim: Optional[int] = 1, dilation: IntOrSeq = 1, groups: int = 1,
                 bias: bool = True, conv_only: bool = False, is_transposed: bool = False,
                 padding: Optional[IntOrSeq] = None,
                 output_padding: Optional[IntOrSeq] = None) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.is_transposed = is_transposed
        if padding is None:
            padding = same_padding(kernel_size, dilation)
        kwargs: Dict[str, Any] = dict(kernel_size=kernel_size, stride=strides, padding=padding,
                                      dilation=dilation, groups=groups, bias=bias)
        if is_transposed:
            kwargs["output_padding"] = (_stride_minus_one(strides) if output_padding is None
                                        else output_padding)
        self.add_module("conv", conv_class(spatial_dims, is_transposed)(in_channels,
                                                                        out_channels, **kwargs))
        if conv_only or (act is None and norm is None and dropout is None):
            return
        self.add_module("adn", ADN(adn_ordering, out_channels, act=act, norm=norm,
                                   norm_dim=spatial_dims, dropout=dropout,
                                   dropout_dim=dropout_dim))


class ResidualUnit(nn.Module):
    """``subunits`` convolutions plus a residual path: twin of MONAI's ``ResidualUnit``.

    Children: ``conv`` (Sequential of ``unit0``, ``unit1``, ... :class:`Convolution`; only
    the first has ``strides`` and ``in_channels``) and ``residual``: ``nn.Identity`` when the
    stride product is 1 and the channel count is kept, else a plain convolution (kernel 1
    without padding when only the channels change, else the units' kernel and padding with
    the stride). Output: ``conv(x) + residual(x)``.

    Args:
        spatial_dims: 1, 2 or 3 (input (B, C, z, y, x) in 3-D).
        in_channels: Input channels.
        out_channels: Output channels.
        strides: Stride of the first unit and of the residual conv.
        kernel_size: Kernel size of the units.
        subunits: Number of convolutions (at least 1).
        adn_ordering: Order of norm, dropout and activation.
        act: Activation spec or None.
        norm: Norm spec or None.
        dropout: Dropout ratio/spec or None.
        dropout_dim: Spatial dims of the dropout class.
        dilation: Dilation of the units.
        bias: Whether the convolutions have a bias.
        last_conv_only: The last unit is a bare convolution (no ``adn``).
        padding: Padding of the units (default, and when 0: same padding, as in MONAI).

    Example:
        >>> import torch
        >>> ru = ResidualUnit(3, 2, 4, strides=2, subunits=2)
        >>> ru(torch.zeros(1, 2, 6, 6, 6)).shape
        torch.Size([1, 4, 3, 3, 3])
        >>> type(ru.residual).__name__, type(ResidualUnit(3, 4, 4).residual).__name__
        ('Conv3d', 'Identity')
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 strides: IntOrSeq = 1, kernel_size: IntOrSeq = 3, subunits: int = 2,
                 adn_ordering: str = "NDA", act: Optional[LayerSpec] = "prelu",
                 norm: Optional[LayerSpec] = "instance",
                 dropout: Optional[Union[float, LayerSpec]] = None,
                 dropout_dim: Optional[int] = 1, dilation: IntOrSeq = 1, bias: bool = True,
                 last_conv_only: bool = False, padding: Optional[IntOrSeq] = None) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.conv = nn.Sequential()
        self.residual: nn.Module = nn.Identity()
        if not padding:  # MONAI treats 0 like None here
            padding = same_padding(kernel_size, dilation)
        n_units = max(1, subunits)
        cin, stride = in_channels, strides
        for i in range(n_units):
            unit = Convolution(spatial_dims, cin, out_channels, strides=stride,
                               kernel_size=kernel_size, adn_ordering=adn_ordering, act=act,
                               norm=norm, dropout=dropout, dropout_dim=dropout_dim,
                               dilation=dilation, bias=bias,
                               conv_only=last_conv_only and i == n_units - 1, padding=padding)
            self.conv.add_module(f"unit{i:d}", unit)
            cin, stride = out_channels, 1
        strided = math.prod(_as_list(strides)) != 1
        if strided or in_channels != out_channels:
            # Created after the units, as in MONAI, so that seeded initial weights agree.
            rkernel, rpadding = (kernel_size, padding) if strided else (1, 0)
            self.residual = conv_class(spatial_dims)(in_channels, out_channels, rkernel, strides,
                                                     rpadding, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, *spatial) -> (B, out_channels, *spatial / strides)."""
        res = self.residual(x)
        return self.conv(x) + res


class ChannelSELayer(nn.Module):
    """Squeeze-and-excitation channel re-weighting: twin of MONAI's ``ChannelSELayer``.

    ``x * fc(avg_pool(x))`` where ``fc`` is Linear(C, C // r), ReLU, Linear(C // r, C),
    Sigmoid (keys ``fc.0.*``, ``fc.2.*``).

    Args:
        spatial_dims: 1, 2 or 3 (input (B, C, z, y, x) in 3-D).
        in_channels: Channels C.
        r: Reduction ratio (C // r must be positive).
        acti_type_1: Hidden activation spec (MONAI's default: in-place ReLU).
        acti_type_2: Output activation spec (default: sigmoid).
        add_residual: Return ``x * w + x`` instead of ``x * w``.

    Example:
        >>> import torch
        >>> se = ChannelSELayer(3, 8, r=2)
        >>> se(torch.ones(2, 8, 3, 4, 5)).shape, list(se.state_dict())[:2]
        (torch.Size([2, 8, 3, 4, 5]), ['fc.0.weight', 'fc.0.bias'])
    """

    def __init__(self, spatial_dims: int, in_channels: int, r: int = 2,
                 acti_type_1: LayerSpec = ("relu", {"inplace": True}),
                 acti_type_2: LayerSpec = "sigmoid", add_residual: bool = False) -> None:
        super().__init__()
        self.add_residual = add_residual
        self.avg_pool = _POOL_AVG1[spatial_dims - 1](1)
        hidden = int(in_channels // r)
        if hidden <= 0:
            raise ValueError(f"r must be positive and smaller than in_channels, got r={r} "
                             f"in_channels={in_channels}")
        self.fc = nn.Sequential(nn.Linear(in_channels, hidden, bias=True), _act_layer(acti_type_1),
                                nn.Linear(hidden, in_channels, bias=True),
                                _act_layer(acti_type_2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> same shape, each channel scaled by its excitation weight."""
        b, c = x.shape[:2]
        w = self.fc(self.avg_pool(x).view(b, c)).view([b, c] + [1] * (x.ndim - 2))
        out = x * w
        if self.add_residual:
            out = out + x
        return out
