"""Grad-CAM for the 3D classifier: which part of the crop drove the decision.

Selvaraju et al.'s Grad-CAM, written out with hooks instead of ``monai.visualize.GradCAM``:

1. A forward hook on the named stage (``"layer4"``, :data:`.network.GRADCAM_LAYER`) captures
   its activation ``A`` (1, W, z', y', x').
2. The class score is the *logit* (pre-softmax) of ``target_class`` (default: the argmax).
   ``torch.autograd.grad(score, A)`` gives dScore/dA without touching any parameter's
   ``.grad`` (``.backward()`` would accumulate into them, and a caller that is training would
   silently get the Grad-CAM's gradients added to its own).
3. ``w_k = mean over (z', y', x') of dScore/dA_k``; ``cam = ReLU(sum_k w_k A_k)``.
4. The map is upsampled trilinearly (``align_corners=False``) to the input's spatial size (or
   ``output_shape``) and divided by its maximum, so **1 = most important**, 0 = no positive
   evidence. A map with no positive value (e.g. all-zero head weights) is returned as zeros
   with ``degenerate=True`` instead of dividing by zero.

The network runs in eval mode (deterministic BatchNorm and dropout); every submodule's previous
``training`` flag is restored afterwards, also when an exception is raised, and the hook is
always removed. Gradients are enabled locally, so callers under ``torch.no_grad()`` work. No
parameter's ``requires_grad`` is changed: the input is given ``requires_grad`` instead (on a
copy), so a network with frozen parameters still has a differentiable activation.

MONAI's CAM normalisation (checked in MONAI 1.6.1,
``monai/visualize/class_activation_maps.py``): ``GradCAM``/``CAM`` default to
``postprocessing=default_normalizer``, which applies ``ScaleIntensity(minv=1.0, maxv=0.0)`` per
batch item, i.e. it maps the map's (min, max) to (1, 0). Its own docstring says "This will flip
magnitudes (i.e., smallest will become biggest and vice versa)": with MONAI's default output
the *least* important voxel is 1. It is also a min-max scaling (the minimum becomes an
endpoint), whereas this module divides by the maximum so that 0 keeps meaning "no positive
evidence". With ``postprocessing=lambda m: m`` MONAI returns the raw upsampled
``ReLU(sum_k w_k A_k)``, which equals ``heatmap * max`` of this module (tested in
``Testing/test_gradcam.py``). Other side effects of MONAI's wrapper that this module avoids:
its hooks are never removed, it calls ``model.zero_grad()`` and ``.backward()`` (parameter
``.grad`` left populated), and it switches ``inplace`` off on the hooked module.

Example:
    >>> import torch
    >>> from AnkleFractureLib.classification.network import build_classifier
    >>> _ = torch.manual_seed(0)
    >>> net = build_classifier({"widths": [4, 8, 8, 16], "num_classes": 2, "in_channels": 1})
    >>> res = grad_cam(net, torch.rand(1, 1, 32, 16, 16))
    >>> res.heatmap.shape, res.heatmap.dtype, res.probabilities.shape
    ((32, 16, 16), dtype('float32'), (2,))
    >>> bool(res.heatmap.min() >= 0.0 and res.heatmap.max() <= 1.0)
    True
    >>> grad_cam(net, torch.rand(1, 1, 32, 16, 16), output_shape=(64, 32, 32)).heatmap.shape
    (64, 32, 32)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .network import GRADCAM_LAYER

__all__ = ["GradCamResult", "grad_cam", "upsample_to"]


@dataclass
class GradCamResult:
    """Result of :func:`grad_cam`.

    Attributes:
        heatmap: (z, y, x) float32 in [0, 1] at the input resolution (or ``output_shape``);
            1 = most important voxel, all zeros when ``degenerate``.
        target_class: Class whose logit was explained.
        probabilities: (K,) softmax of the logits (eval mode).
        low_res: (z', y', x') float32, the map at the hooked layer's resolution, normalised
            the same way (divided by its maximum).
        degenerate: True when the map had no positive value (nothing to show).
    """

    heatmap: np.ndarray
    target_class: int
    probabilities: np.ndarray
    low_res: np.ndarray
    degenerate: bool


def _normalise_max(cam: np.ndarray) -> Tuple[np.ndarray, bool]:
    """Divide a non-negative map by its maximum; (zeros, True) when the maximum is not > 0."""
    m = float(cam.max()) if cam.size else 0.0
    if not np.isfinite(m) or m <= 0.0:
        return np.zeros(cam.shape, dtype=np.float32), True
    return (cam / m).astype(np.float32), False


def upsample_to(cam: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Trilinear (``align_corners=False``) resampling of a (z', y', x') map to ``shape``.

    No normalisation: a non-negative map stays non-negative (linear interpolation is a convex
    combination), but its maximum may shrink slightly.

    Args:
        cam: (z', y', x') map (any float dtype).
        shape: Target (z, y, x) size in voxels.

    Returns:
        (z, y, x) float32.

    Example:
        >>> upsample_to(np.ones((2, 1, 1), np.float32), (4, 2, 2)).shape
        (4, 2, 2)
        >>> float(upsample_to(np.array([[[0.0]], [[1.0]]]), (4, 1, 1))[:, 0, 0][-1])
        1.0
    """
    cam = np.asarray(cam)
    shape = tuple(int(s) for s in shape)
    if cam.ndim != 3 or len(shape) != 3:
        raise ValueError(f"upsample_to needs a (z, y, x) map and a 3-element shape, got "
                         f"{cam.shape} and {shape}")
    if any(s < 1 for s in shape):
        raise ValueError(f"output shape must be positive, got {shape}")
    t = torch.as_tensor(np.ascontiguousarray(cam, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=shape, mode="trilinear", align_corners=False)
    return out[0, 0].numpy().astype(np.float32)


def _find_layer(network: nn.Module, layer: str) -> nn.Module:
    for name, mod in network.named_modules():
        if name == layer:
            return mod
    raise ValueError(f"network has no submodule named {layer!r}")


def _as_batch(x: Union[np.ndarray, torch.Tensor], network: nn.Module) -> torch.Tensor:
    """(C, z, y, x) or (1, C, z, y, x), numpy or torch -> float (1, C, z, y, x) on the net's
    device, detached and requiring grad (a copy: the caller's tensor is untouched)."""
    t = torch.as_tensor(x) if isinstance(x, np.ndarray) else x
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"x must be a numpy array or torch tensor, got {type(x).__name__}")
    if t.ndim == 4:
        t = t[None]
    if t.ndim != 5 or t.shape[0] != 1:
        raise ValueError(f"x must be (C, z, y, x) or (1, C, z, y, x), got {tuple(t.shape)}")
    param = next(network.parameters(), None)
    device = param.device if param is not None else t.device
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    t = t.detach().to(device=device, dtype=dtype).clone()
    if not bool(torch.isfinite(t).all()):
        raise ValueError("x contains NaN or inf")
    return t.requires_grad_(True)


def grad_cam(network: nn.Module, x: Union[np.ndarray, torch.Tensor],
             target_class: Optional[int] = None, layer: str = GRADCAM_LAYER,
             output_shape: Optional[Sequence[int]] = None) -> GradCamResult:
    """Grad-CAM heatmap of one volume for one class.

    Args:
        network: Classifier returning logits (1, K), e.g. :class:`.network.SEResNet`, with a
            submodule named ``layer`` whose output is (1, W, z', y', x').
        x: Input (1, C, z, y, x) torch tensor or (C, z, y, x) numpy array / tensor, e.g. the
            crop (3, 96, 48, 64) or an average-pooled version of it.
        target_class: Class id to explain (0 none, 1 A, 2 B, 3 C); default: argmax of logits.
        layer: Name of the hooked submodule (default ``"layer4"``).
        output_shape: (z, y, x) of the returned heatmap; default the input's spatial size.
            Use the crop size (96, 48, 64) when the network saw a factor-2 pooled crop.

    Returns:
        :class:`GradCamResult` (heatmap in [0, 1], 1 = most important).

    Raises:
        ValueError: Bad input shape/values, unknown layer, target class out of range.
        RuntimeError: The layer was not run by the forward pass, or its output is not a tensor.
    """
    layer_module = _find_layer(network, layer)
    xt = _as_batch(x, network)
    spatial = tuple(int(s) for s in xt.shape[2:])
    out_shape = spatial if output_shape is None else tuple(int(s) for s in output_shape)
    if len(out_shape) != 3:
        raise ValueError(f"output_shape must be (z, y, x), got {output_shape}")

    captured: List[torch.Tensor] = []

    def _hook(_module: nn.Module, _inputs: object, output: object) -> Optional[torch.Tensor]:
        if not isinstance(output, torch.Tensor):
            raise RuntimeError(f"layer {layer!r} output is {type(output).__name__}, not a tensor")
        if captured:  # a layer run twice: explain its first use, leave the rest alone
            return None
        captured.append(output)
        # Hand a copy downstream: an in-place op after the layer (e.g. ReLU(inplace=True))
        # would otherwise overwrite the activation we keep, and autograd.grad would then
        # differentiate with respect to the modified tensor.
        return output.clone()

    modes = [(m, m.training) for m in network.modules()]
    handle = layer_module.register_forward_hook(_hook)
    try:
        network.eval()
        with torch.enable_grad():
            logits = network(xt)
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != 1:
                raise RuntimeError(f"network must return logits (1, K), got "
                                   f"{getattr(logits, 'shape', type(logits))}")
            if not captured:
                raise RuntimeError(f"layer {layer!r} was not called by the forward pass")
            act = captured[0]
            if act.ndim != 5:
                raise RuntimeError(f"layer {layer!r} output must be (1, W, z', y', x'), "
                                   f"got {tuple(act.shape)}")
            k = int(logits.shape[1])
            cls = int(logits[0].argmax()) if target_class is None else int(target_class)
            if not 0 <= cls < k:
                raise ValueError(f"target_class {cls} outside [0, {k})")
            # Only the activation's gradient: no parameter .grad is written.
            (grad,) = torch.autograd.grad(logits[0, cls], act, allow_unused=True)
        if grad is None:  # the score does not depend on this layer at all
            grad = torch.zeros_like(act)
        with torch.no_grad():
            weights = grad.mean(dim=(2, 3, 4), keepdim=True)            # (1, W, 1, 1, 1)
            cam = F.relu((weights * act).sum(dim=1))[0]                 # (z', y', x')
            probs = torch.softmax(logits.detach().double(), dim=1)[0]
        cam_np = cam.detach().cpu().numpy().astype(np.float32)
        probs_np = probs.cpu().numpy()
    finally:
        handle.remove()
        for m, was_training in modes:
            m.training = was_training

    if not np.all(np.isfinite(cam_np)):
        raise RuntimeError("Grad-CAM map is not finite (NaN/inf in activations or gradients)")
    low_res, degenerate = _normalise_max(cam_np)
    heat, degenerate_up = _normalise_max(upsample_to(cam_np, out_shape))
    degenerate = degenerate or degenerate_up
    if degenerate:
        low_res = np.zeros_like(low_res)
        heat = np.zeros(out_shape, dtype=np.float32)
    return GradCamResult(heatmap=heat, target_class=cls, probabilities=probs_np,
                         low_res=low_res, degenerate=degenerate)
