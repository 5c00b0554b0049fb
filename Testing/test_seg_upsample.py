"""Tests of AnkleFractureLib.segmentation.upsample: labels from coarse probabilities equal those
of interpolating the whole fine grid with PyTorch and comparing every voxel."""

from __future__ import annotations

from typing import Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from AnkleFractureLib.segmentation.upsample import source_index, upsample_labels


def _probabilities(shape: Tuple[int, int, int], seed: int) -> np.ndarray:
    """Smooth softmax probabilities (3, z, y, x) float32 with bone-like blobs and ties."""
    rng = np.random.default_rng(seed)
    logits = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 1.5) * 12.0
                       for _ in range(3)]).astype(np.float32)
    logits[0] += 0.5  # more background, as in a scan
    e = np.exp(logits - logits.max(axis=0))
    probs = (e / e.sum(axis=0)).astype(np.float32)
    probs[1:, 0, 0, :3] = 0.5  # exact ties between tibia and fibula: fibula wins
    probs[0, 0, 0, :3] = 0.0
    return probs


def _reference(probs: np.ndarray, shape: Tuple[int, int, int]) -> np.ndarray:
    """The whole-grid computation the pipeline used before (PyTorch trilinear, every voxel)."""
    fg = torch.from_numpy(np.ascontiguousarray(probs[1:3]))[None]
    up = F.interpolate(fg, size=shape, mode="trilinear", align_corners=False)[0]
    p_tib, p_fib = up[0], up[1]
    background = 1.0 - p_tib - p_fib
    out = torch.zeros(p_tib.shape, dtype=torch.uint8)
    out[(p_tib > p_fib) & (p_tib > background)] = 1
    out[(p_fib >= p_tib) & (p_fib > background)] = 2
    return out.numpy()


@pytest.mark.parametrize("coarse, fine", [
    ((20, 14, 11), (39, 37, 29)),   # about 2 and 2.7 times finer, as on clinical CT
    ((9, 8, 7), (9, 24, 10)),       # one axis unchanged, non-integer ratios
    ((12, 10, 9), (7, 31, 9)),      # one axis coarser (a thick-slice CT)
])
def test_labels_equal_the_whole_grid_interpolation(coarse, fine) -> None:
    for seed in range(3):
        probs = _probabilities(coarse, seed)
        ref = _reference(probs, fine)
        out = upsample_labels(probs[1], probs[2], fine)
        assert out.dtype == np.uint8 and out.shape == fine
        assert set(np.unique(ref).tolist()) == {0, 1, 2}  # all classes and their borders
        assert int((out != ref).sum()) == 0


def test_source_index_matches_pytorch_along_one_axis() -> None:
    for n_in, n_out in ((5, 13), (13, 5), (7, 7), (1, 4)):
        ramp = np.arange(n_in, dtype=np.float32) ** 2
        ref = F.interpolate(torch.from_numpy(ramp)[None, None], size=n_out, mode="linear",
                            align_corners=False)[0, 0].numpy()
        i0, i1, w1 = source_index(n_in, n_out)
        np.testing.assert_allclose((1 - w1) * ramp[i0] + w1 * ramp[i1], ref, rtol=1e-6,
                                   atol=1e-5)


def test_bad_shapes_are_refused() -> None:
    p = np.zeros((4, 4, 4), np.float32)
    with pytest.raises(ValueError, match="one shape"):
        upsample_labels(p, np.zeros((4, 4, 5), np.float32), (8, 8, 8))
    with pytest.raises(ValueError, match="3-D"):
        upsample_labels(p, p, (8, 8))
