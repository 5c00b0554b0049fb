"""Sliding-window inference: twin of ``monai.inferers.sliding_window_inference`` for a
predictor that returns one tensor of the window's spatial size.

Architecture reference: MONAI (Project MONAI, Apache-2.0). Mirrored: the window positions
(scan interval ``int(roi * (1 - overlap))``, at least 1, or the whole axis when the ROI equals
it; the last window flush with the end of the image; windows in C order over the axes, the
image of the batch slowest), the centred padding of an image smaller than the ROI and its
removal afterwards, the importance maps (``"constant"``: ones; ``"gaussian"``: a separable,
unnormalised Gaussian of sigma ``sigma_scale * roi`` whose minimum is raised to
``max(min, 1e-3)``) and the weighted average ``sum(w * pred) / sum(w)``.

Not mirrored: MONAI computes in the input's dtype and scales a low-precision predictor
output in place in that precision; here the weights, the sums and the output are float32
(identical for float32 inputs and outputs). Tensors are (B, C, *spatial), i.e.
(B, C, z, y, x) in 3-D.

Example:
    >>> import torch
    >>> calls = []
    >>> def predictor(x):
    ...     calls.append(x.shape[0])
    ...     return 2 * x
    >>> out = sliding_window_inference(torch.ones(1, 1, 20, 9, 16), (8, 8, 8), 3, predictor)
    >>> out.shape, bool(torch.allclose(out, torch.full_like(out, 2.0))), calls
    (torch.Size([1, 1, 20, 9, 16]), True, [3, 3, 3, 3, 3, 3])
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

#: A window: one slice per spatial axis.
Window = Tuple[slice, ...]

_PAD_MODES = ("constant", "reflect", "replicate", "circular")


def sliding_window_inference(inputs: torch.Tensor, roi_size: Union[int, Sequence[int]],
                             sw_batch_size: int,
                             predictor: Callable[[torch.Tensor], torch.Tensor],
                             overlap: Union[float, Sequence[float]] = 0.25,
                             mode: str = "constant",
                             sigma_scale: Union[float, Sequence[float]] = 0.125,
                             padding_mode: str = "constant", cval: float = 0.0) -> torch.Tensor:
    """Run ``predictor`` on overlapping windows of ``inputs`` and blend their outputs.

    Args:
        inputs: (B, C, *spatial) images, e.g. (B, C, z, y, x).
        roi_size: Window size per spatial axis (one int for all); a None or non-positive
            entry means the whole axis.
        sw_batch_size: Most windows per predictor call (windows of different images of the
            batch may share a call, as in MONAI).
        predictor: (N, C, *roi_size) -> (N, C_out, *roi_size); it is called
            ``ceil(B * windows / sw_batch_size)`` times.
        overlap: Overlap fraction in [0, 1) per axis (one float for all).
        mode: "constant" (plain mean) or "gaussian" (window centres weigh more).
        sigma_scale: Gaussian sigma as a fraction of the window size, per axis or for all.
        padding_mode: F.pad mode for images smaller than the window ("constant", "reflect",
            "replicate", "circular").
        cval: Fill value of "constant" padding.

    Returns:
        (B, C_out, *spatial) float32 blended predictions on ``inputs``' device.

    Example:
        >>> import torch
        >>> x = torch.rand(2, 1, 6, 30, 17)
        >>> out = sliding_window_inference(x, (8, 16, 16), 4, lambda w: w + 1, mode="gaussian")
        >>> out.shape, bool(torch.allclose(out, x + 1, atol=1e-6))
        (torch.Size([2, 1, 6, 30, 17]), True)
    """
    n_dims = inputs.ndim - 2
    if n_dims < 1:
        raise ValueError(f"inputs must be (B, C, *spatial), got shape {tuple(inputs.shape)}")
    if isinstance(roi_size, Sequence) and len(roi_size) != n_dims:
        raise ValueError(f"roi_size {tuple(roi_size)} does not fit inputs of shape "
                         f"{tuple(inputs.shape)} (B, C, {n_dims} spatial axes)")
    shape = tuple(int(s) for s in inputs.shape[2:])
    roi = _roi(roi_size, shape)
    overlaps = _per_axis(overlap, n_dims)
    if any(o < 0 or o >= 1 for o in overlaps):
        raise ValueError(f"overlap must be >= 0 and < 1, got {overlap}")
    padded, lows = _pad_to_roi(inputs, roi, padding_mode, cval)
    image = tuple(int(s) for s in padded.shape[2:])
    windows = dense_patch_slices(image, roi, _scan_interval(image, roi, overlaps))
    weight = compute_importance_map(roi, mode, sigma_scale, device=inputs.device)
    out = _blend(padded, windows, sw_batch_size, predictor, weight)
    # Remove the padding: the original image starts at `lows` on the padded grid.
    keep = tuple(slice(lo, lo + n) for lo, n in zip(lows, shape))
    return out[(slice(None), slice(None)) + keep]


def _per_axis(value: Union[float, Sequence[float]], n: int) -> Tuple[float, ...]:
    """One value per axis from a scalar or an n-long sequence."""
    if isinstance(value, Sequence):
        if len(value) != n:
            raise ValueError(f"need {n} values (one per spatial axis), got {value}")
        return tuple(float(v) for v in value)
    return (float(value),) * n


def _roi(roi_size: Union[int, Sequence[Optional[int]]], shape: Tuple[int, ...]
         ) -> Tuple[int, ...]:
    """The window size: ``roi_size`` per axis, the image size where it is None or <= 0."""
    user = roi_size if isinstance(roi_size, Sequence) else (roi_size,) * len(shape)
    return tuple(int(r) if r and r > 0 else n for r, n in zip(user, shape))


def _pad_to_roi(inputs: torch.Tensor, roi: Tuple[int, ...], padding_mode: str,
                cval: float) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """``inputs`` padded to at least ``roi`` per axis (half of the missing voxels before, the
    rest after, as MONAI does), and the padding before each axis."""
    if padding_mode not in _PAD_MODES:
        raise ValueError(f"padding_mode must be one of {_PAD_MODES}, got {padding_mode!r}")
    lows: List[int] = []
    pad: List[int] = []
    for r, n in zip(roi, inputs.shape[2:]):
        diff = max(r - int(n), 0)
        lows.append(diff // 2)
        pad[:0] = [diff // 2, diff - diff // 2]  # F.pad lists the last axis first
    if not any(pad):
        return inputs, tuple(lows)
    if padding_mode == "constant":
        return F.pad(inputs, pad, mode="constant", value=cval), tuple(lows)
    return F.pad(inputs, pad, mode=padding_mode), tuple(lows)


def _scan_interval(image: Tuple[int, ...], roi: Tuple[int, ...],
                   overlaps: Tuple[float, ...]) -> Tuple[int, ...]:
    """Step between window starts per axis: the whole axis when the window fills it, else
    ``int(roi * (1 - overlap))`` and at least 1."""
    return tuple(r if r == n else max(int(r * (1 - o)), 1)
                 for n, r, o in zip(image, roi, overlaps))


def dense_patch_slices(image_size: Sequence[int], patch_size: Sequence[int],
                       scan_interval: Sequence[int]) -> List[Window]:
    """Window slices covering ``image_size``: starts every ``scan_interval`` voxels, the last
    one moved back to end flush with the image; C order (the last axis fastest).

    Args:
        image_size: Spatial size (z, y, x).
        patch_size: Window size (clipped to the image; 0 or None = the whole axis).
        scan_interval: Step between starts (0: a single window on that axis).

    Returns:
        One tuple of slices per window.

    Example:
        >>> dense_patch_slices((10,), (4,), (3,))
        [(slice(0, 4, None),), (slice(3, 7, None),), (slice(6, 10, None),)]
    """
    image = [int(n) for n in image_size]
    patch = [min(n, int(p) if p else n) for n, p in zip(image, patch_size)]
    starts = [_axis_starts(n, p, int(s)) for n, p, s in zip(image, patch, scan_interval)]
    return [tuple(slice(b, b + p) for b, p in zip(row, patch))
            for row in itertools.product(*starts)]


def _axis_starts(n: int, patch: int, step: int) -> List[int]:
    """Window starts along one axis: 0, step, 2 step... up to the first window that reaches
    the end, which is shifted back to end exactly at ``n``."""
    if step == 0:
        count = 1
    else:
        count = next((d + 1 for d in range(int(math.ceil(n / step)))
                      if d * step + patch >= n), 1)
    return [i * step - max(i * step + patch - n, 0) for i in range(count)]


def compute_importance_map(patch_size: Sequence[int], mode: str = "constant",
                           sigma_scale: Union[float, Sequence[float]] = 0.125,
                           device: Optional[Union[torch.device, str]] = None) -> torch.Tensor:
    """The per-window weights of the blend, as MONAI computes them (float32).

    "constant": ones. "gaussian": the product over axes of ``exp(-x^2 / (2 sigma^2))`` with x
    measured from the window centre and ``sigma = sigma_scale * size`` (not normalised: the
    peak is below 1 for even sizes). Then every weight below ``max(min, 1e-3)`` is raised to it
    (so the edges never get zero weight).

    Args:
        patch_size: Window size (z, y, x).
        mode: "constant" or "gaussian".
        sigma_scale: Sigma as a fraction of the size, per axis or for all.
        device: Device of the map.

    Returns:
        Tensor of shape ``patch_size``.

    Example:
        >>> w = compute_importance_map((5, 4), "gaussian", 0.125)
        >>> w.shape, round(float(w.max()), 4), round(float(w.min()), 6)
        (torch.Size([5, 4]), 0.6065, 0.001)
    """
    size = tuple(int(p) for p in patch_size)
    if mode == "constant":
        weights = torch.ones(size, dtype=torch.float32, device=device)
    elif mode == "gaussian":
        weights = _gaussian(size, _per_axis(sigma_scale, len(size)), device)
    else:
        raise ValueError(f"mode must be 'constant' or 'gaussian', got {mode!r}")
    floor = max(float(torch.min(weights).item()), 1e-3)
    return torch.clamp_(weights, min=floor)


def _gaussian(size: Tuple[int, ...], scales: Tuple[float, ...],
              device: Optional[Union[torch.device, str]]) -> torch.Tensor:
    """Separable Gaussian built axis by axis in float32, in MONAI's multiplication order (the
    rounding then agrees)."""
    weights: Optional[torch.Tensor] = None
    for n, scale in zip(size, scales):
        sigma = n * scale
        x = torch.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=torch.float32, device=device)
        g = torch.exp(x ** 2 / (-2 * sigma ** 2))
        weights = g if weights is None else weights.unsqueeze(-1) * g
    assert weights is not None  # size has at least one axis
    return weights


def _blend(inputs: torch.Tensor, windows: List[Window], sw_batch_size: int,
           predictor: Callable[[torch.Tensor], torch.Tensor],
           weight: torch.Tensor) -> torch.Tensor:
    """Weighted average of the predictions of all windows of all images of ``inputs``."""
    batch, n_win = int(inputs.shape[0]), len(windows)
    total = batch * n_win
    everything = (slice(None),)
    out: Optional[torch.Tensor] = None
    for first in range(0, total, max(int(sw_batch_size), 1)):
        ids = range(first, min(first + max(int(sw_batch_size), 1), total))
        # Window i is window i % n_win of image i // n_win (images slowest, as in MONAI).
        pieces = [inputs[(slice(i // n_win, i // n_win + 1),) + everything + windows[i % n_win]]
                  for i in ids]
        pred = predictor(pieces[0] if len(pieces) == 1 else torch.cat(pieces))
        _check_prediction(pred, len(pieces), tuple(weight.shape))
        if out is None:
            out = torch.zeros((batch, int(pred.shape[1])) + tuple(inputs.shape[2:]),
                              dtype=torch.float32, device=inputs.device)
        for i, p in zip(ids, pred):
            target = (i // n_win,) + everything + windows[i % n_win]
            out[target] += p.to(device=out.device, dtype=torch.float32) * weight
    assert out is not None  # there is always at least one window
    return out / _count_map(windows, weight, tuple(inputs.shape[2:]))


def _check_prediction(pred: torch.Tensor, n: int, roi: Tuple[int, ...]) -> None:
    if not isinstance(pred, torch.Tensor) or pred.ndim != len(roi) + 2 or pred.shape[0] != n \
            or tuple(pred.shape[2:]) != roi:
        got = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
        raise ValueError(f"the predictor must return one (N={n}, C, *{roi}) tensor, got {got}")


def _count_map(windows: List[Window], weight: torch.Tensor,
               image: Tuple[int, ...]) -> torch.Tensor:
    """Sum of the window weights at every voxel (the blend's denominator)."""
    count = torch.zeros(image, dtype=torch.float32, device=weight.device)
    for w in windows:
        count[w] += weight
    return count
