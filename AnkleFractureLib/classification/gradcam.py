"""Grad-CAM for the 3D classifier: which part of the crop drove the decision.

Selvaraju et al.'s Grad-CAM, written out with hooks instead of ``monai.visualize.GradCAM``,
with HiResCAM (Draelos & Carin 2020) and several layers as options. What the pipeline shows is
:data:`SHIPPED_METHOD` on :data:`SHIPPED_LAYERS`: HiResCAM of ``layer1`` (cells of 4 crop
voxels, 6 mm) and of ``layer4`` (16 voxels, 24 mm; exact there, since the head is global
average pooling + linear), combined by their geometric mean. It was chosen among seven maps by
``scripts/gradcam_localisation.py`` (``docs/gradcam_localisation.md``), and
:func:`randomised_copy` / :func:`rank_correlation` serve the weight-randomisation sanity check
of Adebayo et al. 2018 (``Testing/test_gradcam.py``).

1. A forward hook on each named stage (default ``"layer4"``, :data:`.network.GRADCAM_LAYER`)
   captures its activation ``A`` (1, W, z', y', x').
2. The class score is the *logit* (pre-softmax) of ``target_class`` (default: the argmax).
   ``torch.autograd.grad(score, A)`` gives dScore/dA without touching any parameter's
   ``.grad`` (``.backward()`` would accumulate into them, and a caller that is training would
   silently get the Grad-CAM's gradients added to its own).
3. Grad-CAM: ``w_k = mean over (z', y', x') of dScore/dA_k``; ``cam = ReLU(sum_k w_k A_k)``.
   HiResCAM: ``cam = ReLU(sum_k dScore/dA_k * A_k)``, voxel by voxel.
4. The map is upsampled trilinearly (``align_corners=False``) to the input's spatial size (or
   ``output_shape``) and divided by its maximum, so **1 = most important**, 0 = no positive
   evidence; with several layers the normalised maps are multiplied and the product's
   n-th root normalised again. A map with no positive value (e.g. all-zero head weights) is returned as zeros
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
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .network import GRADCAM_LAYER

__all__ = ["METHODS", "SHIPPED_LAYERS", "SHIPPED_METHOD", "GradCamResult", "grad_cam",
           "randomised_copy", "rank_correlation", "upsample_to"]

#: Map methods: Grad-CAM (Selvaraju et al. 2017) and HiResCAM (Draelos & Carin 2020).
METHODS = ("gradcam", "hirescam")
#: The map the pipeline shows (``WeberClassifier.classify_channels``), chosen by measurement
#: (``docs/gradcam_localisation.md``); its finest layer's cells must be <= 6 mm on the crop.
#: HiResCAM of layer4 (exact for its pooled linear head: the cells add up to the logit) gives
#: *where* the evidence is; layer1's HiResCAM (6 mm cells) sharpens it.
SHIPPED_LAYERS: Tuple[str, ...] = ("layer1", "layer4")
SHIPPED_METHOD = "hirescam"


@dataclass
class GradCamResult:
    """Result of :func:`grad_cam`.

    Attributes:
        heatmap: (z, y, x) float32 in [0, 1] at the input resolution (or ``output_shape``);
            1 = most important voxel, all zeros when ``degenerate``.
        target_class: Class whose logit was explained.
        probabilities: (K,) softmax of the logits (eval mode).
        low_res: (z', y', x') float32, the map at the finest hooked layer's resolution,
            normalised the same way (divided by its maximum).
        degenerate: True when the map had no positive value (nothing to show).
        layers: The hooked stages, e.g. ``("layer1", "layer4")``.
        method: "gradcam" (channel weights = mean gradient) or "hirescam" (gradient times
            activation voxel by voxel, summed over channels).
        cell_voxels: (z, y, x) input voxels per cell of the finest hooked layer (the map's
            resolution): 4 for ``layer1`` of the shipped SE-ResNet, 16 for ``layer4``.
    """

    heatmap: np.ndarray
    target_class: int
    probabilities: np.ndarray
    low_res: np.ndarray
    degenerate: bool
    layers: Tuple[str, ...] = (GRADCAM_LAYER,)
    method: str = "gradcam"
    cell_voxels: Tuple[float, float, float] = (1.0, 1.0, 1.0)

    def cell_mm(self, spacing_zyx: Sequence[float]) -> Tuple[float, float, float]:
        """The finest layer's cell size (z, y, x) in mm for an input of ``spacing_zyx`` mm."""
        return tuple(float(c) * float(s) for c, s in zip(self.cell_voxels, spacing_zyx))

    def describe(self, spacing_zyx: Sequence[float]) -> Dict[str, Any]:
        """JSON summary: method, layers and the map's cell size (z, y, x) in mm."""
        return {"method": self.method, "layers": list(self.layers),
                "cell_mm": [round(v, 3) for v in self.cell_mm(spacing_zyx)]}


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


def _capture(network: nn.Module, layers: Sequence[str], captured: Dict[str, torch.Tensor]
             ) -> List[Any]:
    """Forward hooks that keep each named layer's output (first call only); returns handles."""
    handles = []
    for name in layers:
        module = _find_layer(network, name)

        def _hook(_module: nn.Module, _inputs: object, output: object, name: str = name
                  ) -> Optional[torch.Tensor]:
            if not isinstance(output, torch.Tensor):
                raise RuntimeError(f"layer {name!r} output is {type(output).__name__}, "
                                   "not a tensor")
            if name in captured:  # a layer run twice: explain its first use only
                return None
            captured[name] = output
            # Hand a copy downstream: an in-place op after the layer (e.g. ReLU(inplace=True))
            # would otherwise overwrite the activation we keep, and autograd.grad would then
            # differentiate with respect to the modified tensor.
            return output.clone()

        handles.append(module.register_forward_hook(_hook))
    return handles


def _layer_map(act: torch.Tensor, grad: Optional[torch.Tensor], method: str) -> np.ndarray:
    """ReLU of the class evidence at one layer, (z', y', x') float32.

    Grad-CAM weighs each channel by its mean gradient; HiResCAM multiplies gradient and
    activation voxel by voxel. For the last stage before global average pooling and a linear
    head, HiResCAM's map summed over the cells is exactly the class logit (minus the bias).
    """
    if grad is None:  # the score does not depend on this layer at all
        grad = torch.zeros_like(act)
    with torch.no_grad():
        if method == "gradcam":
            cam = (grad.mean(dim=(2, 3, 4), keepdim=True) * act).sum(dim=1)
        else:
            cam = (grad * act).sum(dim=1)
        cam = F.relu(cam)[0]
    return cam.detach().cpu().numpy().astype(np.float32)


def _forward_and_grads(network: nn.Module, xt: torch.Tensor, layers: Sequence[str],
                       target_class: Optional[int]
                       ) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]], int,
                                  np.ndarray]:
    """One forward pass with hooks and the class logit's gradient at each layer.

    Returns:
        (activations, gradients, explained class, softmax probabilities (K,)).
    """
    captured: Dict[str, torch.Tensor] = {}
    handles = _capture(network, layers, captured)
    modes = [(m, m.training) for m in network.modules()]
    try:
        network.eval()
        with torch.enable_grad():
            logits = network(xt)
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != 1:
                raise RuntimeError(f"network must return logits (1, K), got "
                                   f"{getattr(logits, 'shape', type(logits))}")
            missing = [name for name in layers if name not in captured]
            if missing:
                raise RuntimeError(f"layer {missing[0]!r} was not called by the forward pass")
            acts = [captured[name] for name in layers]
            for name, act in zip(layers, acts):
                if act.ndim != 5:
                    raise RuntimeError(f"layer {name!r} output must be (1, W, z', y', x'), "
                                       f"got {tuple(act.shape)}")
            k = int(logits.shape[1])
            cls = int(logits[0].argmax()) if target_class is None else int(target_class)
            if not 0 <= cls < k:
                raise ValueError(f"target_class {cls} outside [0, {k})")
            # Only the activations' gradients: no parameter .grad is written.
            grads = torch.autograd.grad(logits[0, cls], acts, allow_unused=True)
        probs = torch.softmax(logits.detach().double(), dim=1)[0].cpu().numpy()
    finally:
        for handle in handles:
            handle.remove()
        for m, was_training in modes:
            m.training = was_training
    return acts, list(grads), cls, probs


def grad_cam(network: nn.Module, x: Union[np.ndarray, torch.Tensor],
             target_class: Optional[int] = None,
             layer: Union[str, Sequence[str]] = GRADCAM_LAYER,
             output_shape: Optional[Sequence[int]] = None,
             method: str = "gradcam") -> GradCamResult:
    """Grad-CAM (or HiResCAM) heatmap of one volume for one class, at one or more layers.

    With several layers, each layer's map is upsampled to the output grid and divided by its
    maximum, and the maps are combined by their geometric mean: a voxel is hot only where
    every layer sees evidence, so the coarse exact map of the last stage decides *where* the
    evidence is and the finest layer sharpens it to its cell size.

    Args:
        network: Classifier returning logits (1, K), e.g. :class:`.network.SEResNet`, with
            submodules named as ``layer`` whose outputs are (1, W, z', y', x').
        x: Input (1, C, z, y, x) torch tensor or (C, z, y, x) numpy array / tensor, e.g. the
            crop (3, 96, 48, 64) or an average-pooled version of it.
        target_class: Class id to explain (0 none, 1 A, 2 B, 3 C); default: argmax of logits.
        layer: Name of the hooked submodule, or several names (default ``"layer4"``).
        output_shape: (z, y, x) of the returned heatmap; default the input's spatial size.
            Use the crop size (96, 48, 64) when the network saw a factor-2 pooled crop.
        method: "gradcam" or "hirescam" (:data:`METHODS`).

    Returns:
        :class:`GradCamResult` (heatmap in [0, 1], 1 = most important).

    Raises:
        ValueError: Bad input shape/values, unknown layer or method, target class out of
            range.
        RuntimeError: A layer was not run by the forward pass, or its output is not a tensor.
    """
    layers = (layer,) if isinstance(layer, str) else tuple(layer)
    if not layers or method not in METHODS:
        raise ValueError(f"need at least one layer and a method in {METHODS}, got "
                         f"{layers} and {method!r}")
    for name in layers:
        _find_layer(network, name)
    xt = _as_batch(x, network)
    spatial = tuple(int(s) for s in xt.shape[2:])
    out_shape = spatial if output_shape is None else tuple(int(s) for s in output_shape)
    if len(out_shape) != 3:
        raise ValueError(f"output_shape must be (z, y, x), got {output_shape}")
    acts, grads, cls, probs_np = _forward_and_grads(network, xt, layers, target_class)
    cams = [_layer_map(a, g, method) for a, g in zip(acts, grads)]
    if not all(np.all(np.isfinite(c)) for c in cams):
        raise RuntimeError("Grad-CAM map is not finite (NaN/inf in activations or gradients)")
    finest = int(np.argmax([c.size for c in cams]))
    cell = tuple(float(i) / float(c) for i, c in zip(spatial, cams[finest].shape))
    low_res, degenerate = _normalise_max(cams[finest])
    heat = np.ones(out_shape, np.float32)
    for cam in cams:
        up, degenerate_up = _normalise_max(upsample_to(cam, out_shape))
        degenerate = degenerate or degenerate_up
        heat *= up
    if len(cams) > 1:
        heat, _ = _normalise_max(heat ** np.float32(1.0 / len(cams)))
    if degenerate or not heat.max() > 0:
        degenerate = True
        low_res = np.zeros_like(low_res)
        heat = np.zeros(out_shape, dtype=np.float32)
    return GradCamResult(heatmap=heat, target_class=cls, probabilities=probs_np,
                         low_res=low_res, degenerate=degenerate, layers=layers, method=method,
                         cell_voxels=cell)


# ---------------------------------------------------------------------- sanity check
def randomised_copy(network: nn.Module, seed: int = 0,
                    modules: Optional[Sequence[str]] = None) -> nn.Module:
    """A copy of ``network`` with weights re-drawn at random (Adebayo et al. 2018).

    The model-parameter randomisation test: a map that explains the trained model must change
    when the model's weights are replaced by random ones. Weights of convolutions and linear
    layers are drawn from N(0, 2 / fan-in) (He initialisation), biases from N(0, 0.1^2),
    normalisation scales around 1; BatchNorm running statistics are reset to (0, 1).

    Args:
        network: The trained network (left untouched).
        seed: Seed of the random weights.
        modules: Names of the submodules to randomise, e.g. ``["fc", "layer4"]`` for a cascade
            from the top; None randomises every parameter.

    Returns:
        The randomised copy, in eval mode.

    Raises:
        ValueError: A name in ``modules`` is not a submodule.
    """
    import copy

    net = copy.deepcopy(network)
    targets = [net] if modules is None else [_find_layer(net, name) for name in modules]
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for target in targets:
            for module in target.modules():
                for name, param in module.named_parameters(recurse=False):
                    if param.ndim > 1:
                        std, mean = (2.0 / max(1, param[0].numel())) ** 0.5, 0.0
                    else:  # a bias, or a norm's scale (around 1) / shift
                        std, mean = 0.1, (1.0 if name == "weight" else 0.0)
                    noise = torch.randn(param.shape, generator=g, dtype=torch.float32)
                    param.copy_((noise * std + mean).to(param.dtype))
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.reset_running_stats()
    return net.eval()


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps of the same shape (ties: mean ranks).

    Returns 0 when either map is constant (no ranking to compare).

    Example:
        >>> x = np.arange(8.0).reshape(2, 2, 2)
        >>> rank_correlation(x, x ** 2), rank_correlation(x, -x)
        (1.0, -1.0)
    """
    from scipy.stats import rankdata

    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"maps differ in size: {a.size} and {b.size}")
    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return round(float(np.corrcoef(ra, rb)[0, 1]), 12)
