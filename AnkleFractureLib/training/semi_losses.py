"""Losses and helpers of the semi-supervised Weber classifier (and its baselines).

The reference method (methods.md, "Semi-supervised classification") alternates two steps:

(a) train the Relation Weight Network (:class:`~AnkleFractureLib.classification.relation.
    RelationWeightNetwork`) on [labelled feature ++ class prototype] pairs against the true
    label: :func:`class_prototypes`, :func:`relation_loss`;
(b) train the backbone on ``L_total = L_l + L_u + lambda * L_MMD``: ``L_l`` the cross-entropy
    on labelled data, ``L_u`` the pseudo-label cross-entropy of unlabelled data weighted by the
    RWN relation weight ``w_i`` (:func:`relation_weights`, :func:`weighted_pseudo_label_loss`),
    ``L_MMD`` the Gaussian-RBF maximum mean discrepancy (:func:`gaussian_mmd`) between the
    confident labelled and confident unlabelled features (:func:`select_confident`), each set
    extended with a buffer of recently selected confident examples (:class:`FeatureBuffer`).

Baselines of the paper's comparison: hard pseudo-labelling (:func:`pseudo_label_loss`, Lee
2013) and FixMatch (:func:`fixmatch_loss`, Sohn et al. 2020).

All tensors are torch; features are pooled embeddings (N, D), logits (N, K), labels (N,) int64
with class ids 0 none, 1 A, 2 B, 3 C (or 0..2 for the 3-class A/B/C protocol).

Example:
    >>> import torch
    >>> feats, labels = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    >>> protos = class_prototypes(feats, labels, num_classes=3)
    >>> protos.shape
    torch.Size([3, 4])
    >>> float(gaussian_mmd(feats, feats))
    0.0
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

#: Bandwidth multipliers of the default multi-kernel MMD (times the median squared distance).
MMD_BANDWIDTH_FACTORS: Tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)


def _zero_like_graph(*tensors: torch.Tensor) -> torch.Tensor:
    """A scalar 0 that depends on ``tensors`` (so ``backward`` works and gives zero grads)."""
    out = tensors[0].sum() * 0.0
    for t in tensors[1:]:
        out = out + t.sum() * 0.0
    return out


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     previous: Optional[torch.Tensor] = None,
                     momentum: float = 0.0) -> torch.Tensor:
    """Class prototypes: the mean feature of the labelled samples of each class.

    A class with no sample in ``labels`` keeps ``previous[k]`` (zeros when ``previous`` is
    None), so that a small batch lacking a class does not reset its prototype. With
    ``previous`` given, present classes follow an exponential moving average
    ``new = momentum * previous + (1 - momentum) * batch_mean`` (``momentum = 0``: plain batch
    mean). The result is detached: prototypes are targets, not a path for gradients.

    Args:
        features: (N, D) labelled embeddings.
        labels: (N,) int class ids in [0, num_classes).
        num_classes: K.
        previous: (K, D) previous prototypes, or None.
        momentum: EMA momentum in [0, 1); only used with ``previous``.

    Returns:
        (K, D) prototypes, detached, dtype/device of ``features``.

    Example:
        >>> f = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
        >>> class_prototypes(f, torch.tensor([0, 0, 1]), 3).tolist()
        [[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]]
        >>> prev = torch.ones(3, 2)
        >>> class_prototypes(f, torch.tensor([0, 0, 1]), 3, prev, momentum=0.5).tolist()
        [[1.5, 0.5], [0.5, 1.5], [1.0, 1.0]]
    """
    if features.ndim != 2 or labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"need features (N, D) and labels (N,), got {tuple(features.shape)} "
                         f"and {tuple(labels.shape)}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    feats = features.detach()
    labels = labels.to(device=feats.device, dtype=torch.long)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {labels.tolist()}")
    d = feats.shape[1]
    sums = torch.zeros(num_classes, d, dtype=feats.dtype, device=feats.device)
    sums.index_add_(0, labels, feats)
    counts = torch.bincount(labels, minlength=num_classes).to(feats.dtype)
    present = counts > 0
    means = sums / counts.clamp_min(1.0)[:, None]
    if previous is None:
        return torch.where(present[:, None], means, torch.zeros_like(means))
    prev = previous.detach().to(device=feats.device, dtype=feats.dtype)
    if prev.shape != (num_classes, d):
        raise ValueError(f"previous must be ({num_classes}, {d}), got {tuple(prev.shape)}")
    updated = momentum * prev + (1.0 - momentum) * means
    return torch.where(present[:, None], updated, prev)


def relation_loss(rwn: nn.Module, features: torch.Tensor, labels: torch.Tensor,
                  prototypes: torch.Tensor) -> torch.Tensor:
    """RWN loss (step a): binary cross-entropy of all (labelled feature, prototype) pairs.

    Pair (i, k) has target 1 if ``k == labels[i]`` else 0. The N * K pairs are scored in one
    batch (:meth:`RelationWeightNetwork.relation_matrix`) and the BCE is averaged over all of
    them, with the positive pairs weighted by ``pos_weight = K - 1``: there are N positive and
    N (K - 1) negative pairs, so positives and negatives then count equally and the RWN cannot
    win by answering "no" everywhere. Features and prototypes are detached: this step trains
    the RWN only.

    Args:
        rwn: The relation network (logits via ``relation_matrix(..., return_logits=True)``).
        features: (N, D) labelled embeddings.
        labels: (N,) class ids in [0, K).
        prototypes: (K, D).

    Returns:
        Scalar loss (0, still differentiable w.r.t. the RWN, when N == 0).

    Example:
        >>> from AnkleFractureLib.classification.relation import RelationWeightNetwork
        >>> rwn = RelationWeightNetwork(8, channels=4)
        >>> loss = relation_loss(rwn, torch.randn(4, 8), torch.tensor([0, 1, 2, 0]),
        ...                      torch.randn(3, 8))
        >>> loss.ndim, bool(loss > 0)
        (0, True)
    """
    k = prototypes.shape[0]
    if features.shape[0] == 0:
        return _zero_like_graph(*rwn.parameters())
    logits = rwn.relation_matrix(features.detach(), prototypes.detach(), return_logits=True)
    targets = F.one_hot(labels.to(device=logits.device, dtype=torch.long), k).to(logits.dtype)
    pos_weight = torch.tensor(float(max(k - 1, 1)), dtype=logits.dtype, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight)


@torch.no_grad()
def relation_weights(rwn: nn.Module, features_u: torch.Tensor, pseudo: torch.Tensor,
                     prototypes: torch.Tensor) -> torch.Tensor:
    """Relation weight ``w_i`` of each unlabelled sample: score(feature_i, prototype[pseudo_i]).

    Evaluated with the RWN in eval mode (BatchNorm running statistics, gathered on the labelled
    pairs of step a) and restored to its previous mode afterwards, so that a weight does not
    depend on which other unlabelled samples share the batch. Detached (no gradient).

    Args:
        rwn: The relation network.
        features_u: (M, D) unlabelled embeddings.
        pseudo: (M,) pseudo-labels in [0, K).
        prototypes: (K, D).

    Returns:
        (M,) weights in [0, 1].

    Example:
        >>> from AnkleFractureLib.classification.relation import RelationWeightNetwork
        >>> rwn = RelationWeightNetwork(8, channels=4)
        >>> relation_weights(rwn, torch.randn(5, 8), torch.tensor([0, 1, 1, 2, 0]),
        ...                  torch.randn(3, 8)).shape
        torch.Size([5])
    """
    if features_u.shape[0] == 0:
        return features_u.new_zeros(0)
    was_training = rwn.training
    rwn.eval()
    try:
        protos = prototypes.detach()[pseudo.to(device=prototypes.device, dtype=torch.long)]
        return rwn(features_u.detach(), protos.to(features_u.device)).detach()
    finally:
        rwn.train(was_training)


def weighted_pseudo_label_loss(logits_u: torch.Tensor, pseudo: torch.Tensor,
                               weights: torch.Tensor) -> torch.Tensor:
    """L_u: relation-weighted cross-entropy on pseudo-labels, ``sum_i w_i CE_i / M``.

    The sum is divided by M (all unlabelled samples), not by ``sum_i w_i``: low weights lower
    the loss rather than being renormalised away, so a batch of doubtful pseudo-labels pulls
    the backbone less. Weights are detached.

    Args:
        logits_u: (M, K) backbone logits of the unlabelled samples.
        pseudo: (M,) pseudo-labels.
        weights: (M,) weights (e.g. :func:`relation_weights`, 0 for unselected samples).

    Returns:
        Scalar (0 with a valid graph when M == 0).

    Example:
        >>> lg = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> float(weighted_pseudo_label_loss(lg, torch.tensor([0, 1]), torch.zeros(2)))
        0.0
    """
    m = logits_u.shape[0]
    if m == 0:
        return _zero_like_graph(logits_u)
    ce = F.cross_entropy(logits_u, pseudo.to(device=logits_u.device, dtype=torch.long),
                         reduction="none")
    return (weights.detach().to(ce.dtype) * ce).sum() / m


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances (n, m), clamped at 0 (rounding of the expansion)."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.t())
    return d.clamp_min(0.0)


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor,
                 bandwidths: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Squared maximum mean discrepancy with a (multi-)Gaussian RBF kernel.

    ``MMD^2 = mean k(x, x') + mean k(y, y') - 2 mean k(x, y)``, the biased V-statistic (the
    diagonal terms are kept), so that ``MMD(X, X) == 0`` exactly and the value is >= 0 (it is
    clamped at 0 against rounding). The kernel is ``k(a, b) = mean_h exp(-|a - b|^2 / h)``
    over the bandwidths ``h`` (squared-distance units). Default: the median heuristic, ``h =
    median pairwise squared distance of the pooled sample (x ++ y, off-diagonal) times (0.25,
    0.5, 1, 2, 4)``, computed without gradient (1 if that median is 0).

    Args:
        x: (n, D) first set (e.g. confident labelled features + buffer).
        y: (m, D) second set (confident unlabelled features + buffer).
        bandwidths: Explicit bandwidths ``h``, or None for the median heuristic.

    Returns:
        Scalar, differentiable w.r.t. ``x`` and ``y``; a zero that keeps the graph valid when
        either set is empty.

    Example:
        >>> a = torch.zeros(4, 3)
        >>> round(float(gaussian_mmd(a, a + 1.0, bandwidths=[3.0])), 4)  # 2 - 2 exp(-1)
        1.2642
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need x (n, D) and y (m, D), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0 or y.shape[0] == 0:
        return _zero_like_graph(x, y)
    y = y.to(dtype=x.dtype, device=x.device)
    if bandwidths is None:
        with torch.no_grad():
            z = torch.cat([x, y]).detach()
            d = _sq_dists(z, z)
            n = z.shape[0]
            off = d[~torch.eye(n, dtype=torch.bool, device=d.device)]
            med = float(off.median()) if off.numel() else 0.0
            if not med > 0.0:
                med = 1.0
        hs = [med * f for f in MMD_BANDWIDTH_FACTORS]
    else:
        hs = [float(h) for h in bandwidths]
        if not hs or min(hs) <= 0:
            raise ValueError(f"bandwidths must be positive, got {bandwidths}")

    def kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = _sq_dists(a, b)
        return torch.stack([torch.exp(-d / h) for h in hs]).mean(0).mean()

    # Three separate Gram matrices (not blocks of one pooled matrix): for y == x they are
    # computed identically, so the V-statistic cancels to exactly 0.
    mmd = kernel_mean(x, x) + kernel_mean(y, y) - 2.0 * kernel_mean(x, y)
    return mmd.clamp_min(0.0)


class FeatureBuffer:
    """FIFO of the features of recently selected confident examples (extends the MMD sets).

    Features are stored detached, on the device of the last push (or ``device`` if given);
    when more than ``capacity`` rows have been pushed the oldest are dropped.

    Args:
        capacity: Maximum number of rows kept (0: always empty).
        feature_dim: D.
        device: Fixed storage device (e.g. "cpu"), or None to follow the pushed features.

    Example:
        >>> buf = FeatureBuffer(3, 2)
        >>> buf.push(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        >>> buf.push(torch.tensor([[2.0, 2.0], [3.0, 3.0]]))
        >>> len(buf), buf.get()[:, 0].tolist()
        (3, [1.0, 2.0, 3.0])
    """

    def __init__(self, capacity: int, feature_dim: int,
                 device: Optional[torch.device | str] = None) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self.feature_dim = int(feature_dim)
        self.device = torch.device(device) if device is not None else None
        self._data = torch.zeros(0, self.feature_dim, device=self.device)

    def push(self, features: torch.Tensor) -> None:
        """Append (n, D) features (detached), dropping the oldest beyond ``capacity``."""
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"need (n, {self.feature_dim}) features, got {tuple(features.shape)}")
        new = features.detach()
        if self.device is not None:
            new = new.to(self.device)
        old = self._data.to(device=new.device, dtype=new.dtype)
        self._data = torch.cat([old, new])[max(0, old.shape[0] + new.shape[0] - self.capacity):]

    def get(self) -> torch.Tensor:
        """The stored features, oldest first, (m, D) with m <= capacity."""
        return self._data

    def clear(self) -> None:
        """Drop everything."""
        self._data = self._data[:0]

    def __len__(self) -> int:
        return int(self._data.shape[0])


def select_confident(probs: torch.Tensor, weights: Optional[torch.Tensor] = None,
                     threshold: float = 0.5) -> torch.Tensor:
    """Sample-selection rule: relation weight > threshold, else max probability > threshold.

    Args:
        probs: (M, K) softmax probabilities.
        weights: (M,) relation weights, or None.
        threshold: Selection threshold (0.5 in the reference method).

    Returns:
        (M,) bool mask of the selected samples.

    Example:
        >>> p = torch.tensor([[0.9, 0.1], [0.55, 0.45]])
        >>> select_confident(p, threshold=0.6).tolist()
        [True, False]
        >>> select_confident(p, torch.tensor([0.2, 0.8])).tolist()
        [False, True]
    """
    if weights is not None:
        return weights.detach() > threshold
    return probs.detach().max(dim=1).values > threshold


def pseudo_label_loss(logits_u: torch.Tensor,
                      threshold: float = 0.7) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-labelling baseline (Lee 2013): CE on the argmax of confident samples.

    Samples with max softmax probability >= ``threshold`` get their (detached) argmax as
    target; the masked cross-entropy is averaged over ALL M samples (as in FixMatch), so the
    loss shrinks when few samples are confident.

    Args:
        logits_u: (M, K) logits of the unlabelled samples.
        threshold: Confidence threshold.

    Returns:
        (scalar loss, (M,) bool mask of the samples used).

    Example:
        >>> loss, mask = pseudo_label_loss(torch.tensor([[3.0, 0.0], [0.1, 0.0]]))
        >>> mask.tolist()
        [True, False]
    """
    return _masked_hard_ce(logits_u, logits_u, threshold)


def fixmatch_loss(logits_weak: torch.Tensor, logits_strong: torch.Tensor,
                  threshold: float = 0.95) -> Tuple[torch.Tensor, torch.Tensor]:
    """FixMatch unlabelled loss (Sohn et al. 2020).

    Pseudo-labels are the argmax of the (detached) weak-view probabilities; samples whose max
    weak probability >= ``threshold`` contribute the cross-entropy of their strong-view logits
    against that pseudo-label; the sum is divided by M (all samples).

    Args:
        logits_weak: (M, K) logits of the weakly augmented view (no gradient flows into them).
        logits_strong: (M, K) logits of the strongly augmented view.
        threshold: Confidence threshold.

    Returns:
        (scalar loss, (M,) bool mask).

    Example:
        >>> loss, mask = fixmatch_loss(torch.tensor([[5.0, 0.0]]), torch.tensor([[0.0, 0.0]]))
        >>> round(float(loss), 4), mask.tolist()
        (0.6931, [True])
    """
    return _masked_hard_ce(logits_weak, logits_strong, threshold)


def _masked_hard_ce(logits_target: torch.Tensor, logits_pred: torch.Tensor,
                    threshold: float) -> Tuple[torch.Tensor, torch.Tensor]:
    if logits_target.shape != logits_pred.shape or logits_pred.ndim != 2:
        raise ValueError(f"need two (M, K) logits, got {tuple(logits_target.shape)} and "
                         f"{tuple(logits_pred.shape)}")
    m = logits_pred.shape[0]
    with torch.no_grad():
        conf, pseudo = torch.softmax(logits_target.detach(), dim=1).max(dim=1)
        mask = conf >= threshold
    if m == 0:
        return _zero_like_graph(logits_pred), mask
    ce = F.cross_entropy(logits_pred, pseudo, reduction="none")
    return (ce * mask.to(ce.dtype)).sum() / m, mask
