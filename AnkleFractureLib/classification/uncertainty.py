"""Cheap uncertainty estimate: test-time augmentation (TTA) and a summary of its predictions.

:func:`tta_batch` makes ``n`` slightly perturbed copies of a crop (copy 0 unchanged): integer
shifts of up to ``max_shift_vox`` voxels along each axis (edge-replicating, never wrapping) and
a small multiplicative + additive jitter on the CT channel only. There are no flips: the
registered crop has a fixed anatomical orientation and a left-right flip would turn a right
ankle into a left one. Masks are only shifted, so binary masks stay binary.

:func:`summarize_probabilities` turns the ``n`` softmax vectors into a mean prediction and
disagreement measures, and flags the case ``unsure`` (with reasons in plain words) when

* the mean probability of the predicted class is below :data:`CONFIDENCE_MIN` (0.6), or
* the predictive entropy, normalised by ``log(K)`` to [0, 1], is above :data:`ENTROPY_MAX`
  (0.5), or
* fewer than :data:`AGREEMENT_MIN` (80 %) of the copies vote for the predicted class.

The entropy rule is the strictest of the three for 4 classes: (0.775, 0.125, 0.05, 0.05)
already has a normalised entropy of 0.55 and is flagged although its confidence is 78 %.

Entropies and the mutual information are in nats (natural log); the mutual information
(entropy of the mean minus the mean entropy, the "epistemic" part, >= 0) is reported but not
thresholded: with a handful of shifted copies it is small and mostly a diagnostic.

Example:
    >>> import numpy as np
    >>> crop = np.zeros((3, 8, 6, 4), np.float32)
    >>> crop[0] = 0.5; crop[1, 2:5, 2:4, 1:3] = 1.0
    >>> batch = tta_batch(crop, n=4, seed=0)
    >>> batch.shape, batch.dtype, bool(np.array_equal(batch[0], crop))
    ((4, 3, 8, 6, 4), dtype('float32'), True)
    >>> sorted(np.unique(batch[:, 1]).tolist())
    [0.0, 1.0]
    >>> s = summarize_probabilities(np.array([[0.03, 0.91, 0.03, 0.03]] * 3
    ...                                      + [[0.06, 0.88, 0.03, 0.03]]))
    >>> s.prediction, round(s.confidence, 4), s.agreement, s.unsure
    (1, 0.9025, 1.0, False)
    >>> summarize_probabilities(np.array([[0.5, 0.5], [0.5, 0.5]])).reasons[0]
    'the most likely class has only 50% probability (below 60%)'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

__all__ = ["AGREEMENT_MIN", "CONFIDENCE_MIN", "ENTROPY_MAX", "UncertaintySummary",
           "summarize_probabilities", "tta_batch"]

#: Below this mean probability of the predicted class the case is flagged unsure.
CONFIDENCE_MIN = 0.6
#: Above this normalised predictive entropy (entropy / log K, in [0, 1]) the case is unsure.
# 0.65, not 0.5: with 4 classes (0.78, 0.12, 0.05, 0.05) already has a normalised entropy of
# 0.55, and a 78 % answer that every TTA copy agrees on is not one to flag.
ENTROPY_MAX = 0.65
#: Below this fraction of TTA copies voting for the predicted class the case is unsure.
AGREEMENT_MIN = 0.8
#: Tolerance on each probability row's sum (softmax in float32 is not exactly 1).
_ROW_SUM_TOL = 1e-3


def tta_batch(x: np.ndarray, n: int, seed: int = 0, max_shift_vox: int = 2,
              intensity_jitter: float = 0.03, ct_channel: Optional[int] = 0) -> np.ndarray:
    """Test-time augmented copies of one crop.

    Args:
        x: Crop (C, z, y, x), e.g. (3, 96, 48, 64): CT in [0, 1], tibia mask, fibula mask.
        n: Number of copies (>= 1); copy 0 is ``x`` unchanged.
        seed: Seed of the random shifts/jitter (same seed -> same batch).
        max_shift_vox: Largest shift, in voxels, along each axis (uniform integer in
            [-max_shift_vox, max_shift_vox]; copies 1.. never get a zero shift on all three axes
            when ``max_shift_vox > 0``). Borders are filled by replicating the edge voxel.
        intensity_jitter: Half-width ``j`` of the CT jitter: ``ct * a + b`` with
            ``a ~ U(1 - j, 1 + j)``, ``b ~ U(-j, j)``, then clipped to [0, 1]. 0 disables it.
        ct_channel: Index of the CT channel to jitter; None jitters nothing (all channels are
            masks or already-normalised maps).

    Returns:
        (n, C, z, y, x) float32.

    Raises:
        ValueError: Bad shape, non-finite values, or bad parameters.
    """
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must be (C, z, y, x), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("x contains NaN or inf")
    n = int(n)
    max_shift_vox = int(max_shift_vox)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if max_shift_vox < 0:
        raise ValueError(f"max_shift_vox must be >= 0, got {max_shift_vox}")
    if not (np.isfinite(intensity_jitter) and 0.0 <= intensity_jitter < 1.0):
        raise ValueError(f"intensity_jitter must be in [0, 1), got {intensity_jitter}")
    if ct_channel is not None and not 0 <= int(ct_channel) < x.shape[0]:
        raise ValueError(f"ct_channel {ct_channel} outside [0, {x.shape[0]})")

    x = x.astype(np.float32, copy=False)
    out = np.empty((n,) + x.shape, dtype=np.float32)
    out[0] = x
    if n == 1:
        return out
    m = max_shift_vox
    # Pad once; each copy is a window of the padded volume. out[i] = x[i - s] (content moves
    # by +s), and voxels shifted in from outside copy the nearest edge voxel.
    padded = np.pad(x, ((0, 0), (m, m), (m, m), (m, m)), mode="edge") if m else x
    rng = np.random.default_rng(int(seed))
    size = x.shape[1:]
    for i in range(1, n):
        shift = rng.integers(-m, m + 1, size=3) if m else np.zeros(3, dtype=int)
        while m and not shift.any():  # an unshifted copy would just duplicate copy 0
            shift = rng.integers(-m, m + 1, size=3)
        window = tuple(slice(m - int(s), m - int(s) + d) for s, d in zip(shift, size))
        out[i] = padded[(slice(None),) + window]
        # Always draw the jitter so the shifts of later copies do not depend on ct_channel.
        a = 1.0 + rng.uniform(-intensity_jitter, intensity_jitter)
        b = rng.uniform(-intensity_jitter, intensity_jitter)
        if ct_channel is not None and intensity_jitter > 0.0:
            c = int(ct_channel)
            out[i, c] = np.clip(out[i, c] * np.float32(a) + np.float32(b), 0.0, 1.0)
    return out


@dataclass
class UncertaintySummary:
    """Summary of ``n`` probability vectors of one case (see :func:`summarize_probabilities`).

    Attributes:
        mean_probabilities: (K,) mean over the copies, renormalised to sum to 1.
        prediction: Argmax of the mean (class id: 0 none, 1 A, 2 B, 3 C).
        confidence: Mean probability of the predicted class.
        entropy: Predictive entropy of the mean, divided by log(K): 0 certain, 1 uniform.
        mutual_information: Entropy of the mean minus the mean entropy of the copies, in nats
            (>= 0): how much the copies disagree beyond each one's own spread.
        std: Standard deviation (over the copies, ddof 0) of the predicted class's probability.
        agreement: Fraction of copies whose argmax equals ``prediction``.
        n_samples: Number of copies.
        unsure: True when any threshold (module constants) is crossed.
        reasons: Plain-language reasons, empty when not unsure.
    """

    mean_probabilities: np.ndarray
    prediction: int
    confidence: float
    entropy: float
    mutual_information: float
    std: float
    agreement: float
    n_samples: int
    unsure: bool
    reasons: List[str] = field(default_factory=list)

    def to_json(self) -> Dict[str, Any]:
        """Plain JSON types (floats, ints, lists, bool, str).

        Example:
            >>> import json
            >>> s = summarize_probabilities(np.array([[0.9, 0.1]]))
            >>> d = s.to_json(); json.loads(json.dumps(d))["prediction"], d["unsure"]
            (0, False)
        """
        return {
            "mean_probabilities": [float(p) for p in self.mean_probabilities],
            "prediction": int(self.prediction),
            "confidence": float(self.confidence),
            "entropy": float(self.entropy),
            "mutual_information": float(self.mutual_information),
            "std": float(self.std),
            "agreement": float(self.agreement),
            "n_samples": int(self.n_samples),
            "unsure": bool(self.unsure),
            "reasons": [str(r) for r in self.reasons],
        }


def _entropy(p: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats along the last axis, with 0 log 0 = 0."""
    logp = np.log(np.where(p > 0.0, p, 1.0))
    return -(p * logp).sum(axis=-1)


def summarize_probabilities(samples: np.ndarray) -> UncertaintySummary:
    """Mean prediction and disagreement of ``n`` probability vectors (e.g. from TTA copies).

    Args:
        samples: (n, K) probabilities (softmax outputs), n >= 1, K >= 2; every row must be
            finite, non-negative and sum to 1 (within 1e-3; rows are renormalised).

    Returns:
        :class:`UncertaintySummary`. With n == 1: mutual information 0, std 0, agreement 1.

    Raises:
        ValueError: Not 2D, empty, K < 2, non-finite, negative or rows not summing to ~1.

    Example:
        >>> s = summarize_probabilities(np.array([[0.9, 0.1], [0.5, 0.5]]))
        >>> round(s.entropy, 4), round(s.mutual_information, 4), s.prediction, s.agreement
        (0.8813, 0.1017, 0, 1.0)
    """
    p = np.asarray(samples, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"samples must be (n, K), got shape {p.shape}")
    n, k = p.shape
    if n < 1 or k < 2:
        raise ValueError(f"samples need n >= 1 rows and K >= 2 classes, got {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("samples contain NaN or inf")
    if np.any(p < 0.0):
        raise ValueError("samples contain negative probabilities")
    sums = p.sum(axis=1)
    if np.any(np.abs(sums - 1.0) > _ROW_SUM_TOL):
        raise ValueError(f"every row of samples must sum to 1, got sums {sums.tolist()}")
    p = p / sums[:, None]

    mean = p.mean(axis=0)
    mean = mean / mean.sum()
    pred = int(np.argmax(mean))
    conf = float(mean[pred])
    h_mean = float(_entropy(mean))
    entropy = float(np.clip(h_mean / np.log(k), 0.0, 1.0))
    # Mutual information >= 0 by concavity; clip the tiny negative rounding residue.
    mi = max(0.0, h_mean - float(_entropy(p).mean()))
    std = float(p[:, pred].std())
    agreement = float(np.mean(np.argmax(p, axis=1) == pred))

    reasons: List[str] = []
    if conf < CONFIDENCE_MIN:
        reasons.append(f"the most likely class has only {conf:.0%} probability "
                       f"(below {CONFIDENCE_MIN:.0%})")
    if entropy > ENTROPY_MAX:
        reasons.append(f"the probabilities are spread over several classes (normalised "
                       f"entropy {entropy:.2f}, above {ENTROPY_MAX:.2f})")
    if agreement < AGREEMENT_MIN:
        reasons.append(f"only {agreement:.0%} of the {n} slightly shifted copies give the same "
                       f"class (below {AGREEMENT_MIN:.0%})")
    return UncertaintySummary(mean_probabilities=mean, prediction=pred, confidence=conf,
                              entropy=entropy, mutual_information=mi, std=std,
                              agreement=agreement, n_samples=n, unsure=bool(reasons),
                              reasons=reasons)
