"""Relation Weight Network (RWN) of the semi-supervised Weber classifier.

The RWN scores how well an embedding matches a class prototype: the input is the pair
[feature ++ prototype], the output a relation score in [0, 1]. During semi-supervised
training (see :mod:`AnkleFractureLib.training.semi_losses`) it is trained on labelled pairs
(target 1 for the sample's own class prototype, 0 otherwise) and its score for an unlabelled
sample and the prototype of its pseudo-label becomes the weight ``w_i`` of that sample's
pseudo-label loss. Inference never uses it (the backbone alone classifies).

Layout (methods.md, "Semi-supervised classification"): four convolutions with kernel 3, stride 2
only in the first, BatchNorm after every convolution, ReLU after convolutions 1 and 3 only, two
squeeze-and-excitation blocks, then global average pooling and a fully connected layer. Our
backbone embeddings are pooled vectors (B, D), so a pair is a 1D signal of length D with two
channels (feature, prototype) and the convolutions are 1D: each output position compares the
feature and the prototype over a window of three neighbouring embedding dimensions.

Example:
    >>> import torch
    >>> rwn = RelationWeightNetwork(feature_dim=16, channels=8)
    >>> f, p = torch.randn(5, 16), torch.randn(5, 16)
    >>> rwn(f, p).shape
    torch.Size([5])
    >>> rwn.relation_matrix(f, torch.randn(4, 16)).shape
    torch.Size([5, 4])
"""

from __future__ import annotations

import torch
from torch import nn


class RelationWeightNetwork(nn.Module):
    """Relation score of (feature, prototype) pairs, a small 1D SE-CNN.

    Structure, in order (``C = channels``)::

        conv1  2 -> C, kernel 3, stride 2, BatchNorm, ReLU
        conv2  C -> C, kernel 3, stride 1, BatchNorm
        se1    ChannelSELayer(1, C, r)
        conv3  C -> C, kernel 3, stride 1, BatchNorm, ReLU
        conv4  C -> C, kernel 3, stride 1, BatchNorm
        se2    ChannelSELayer(1, C, r)
        global average pooling over the D / 2 positions, fc C -> 1, sigmoid

    The reference only says "4 conv layers + 2 SE blocks". Each SE block is placed after a conv
    pair (conv2, conv4), i.e. at the end of each of the two conv -> ReLU -> conv units, which is
    where SE-ResNet puts them (before the block output, :mod:`.network`): the channel
    re-weighting then acts on the un-rectified output of each unit.

    Args:
        feature_dim: Embedding length D (the backbone's ``feature_dim``); inputs are checked
            against it. The network itself works for any D >= 2 (global pooling).
        channels: Channels C of every convolution.
        se_reduction: SE bottleneck ratio r (capped at C // 2, MONAI needs r < C).

    Example:
        >>> rwn = RelationWeightNetwork(8, channels=4)
        >>> s = rwn(torch.randn(3, 8), torch.randn(3, 8))
        >>> s.shape, bool(((s >= 0) & (s <= 1)).all())
        (torch.Size([3]), True)
    """

    def __init__(self, feature_dim: int, channels: int = 32, se_reduction: int = 4) -> None:
        super().__init__()
        from monai.networks.blocks import ChannelSELayer, Convolution

        if feature_dim < 2:
            raise ValueError(f"feature_dim must be >= 2, got {feature_dim}")
        self.feature_dim = int(feature_dim)
        self.channels = int(channels)
        r = max(1, min(int(se_reduction), self.channels // 2))

        def conv(cin: int, stride: int, relu: bool) -> nn.Module:
            # bias=False: the BatchNorm that follows has its own shift.
            return Convolution(1, cin, self.channels, strides=stride, kernel_size=3,
                               act="relu" if relu else None, norm="batch", bias=False)

        self.conv1 = conv(2, 2, True)
        self.conv2 = conv(self.channels, 1, False)
        self.se1 = ChannelSELayer(1, self.channels, r=r)
        self.conv3 = conv(self.channels, 1, True)
        self.conv4 = conv(self.channels, 1, False)
        self.se2 = ChannelSELayer(1, self.channels, r=r)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(self.channels, 1)

    def _check(self, features: torch.Tensor, prototypes: torch.Tensor) -> None:
        if features.ndim != 2 or features.shape != prototypes.shape:
            raise ValueError(f"features and prototypes must both be (B, D), got "
                             f"{tuple(features.shape)} and {tuple(prototypes.shape)}")
        if features.shape[1] != self.feature_dim:
            raise ValueError(f"feature length {features.shape[1]} != feature_dim "
                             f"{self.feature_dim}")

    def logits(self, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Relation logits (before the sigmoid) of paired rows.

        Args:
            features: (B, D) embeddings.
            prototypes: (B, D) prototype paired with each embedding.

        Returns:
            (B,) logits; ``torch.sigmoid`` of them is :meth:`forward`.
        """
        self._check(features, prototypes)
        x = torch.stack([features, prototypes], dim=1)  # (B, 2, D): two channels, length D
        x = self.se1(self.conv2(self.conv1(x)))
        x = self.se2(self.conv4(self.conv3(x)))
        return self.fc(torch.flatten(self.pool(x), 1)).squeeze(1)

    def forward(self, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Relation scores in [0, 1] of paired rows: (B, D), (B, D) -> (B,)."""
        return torch.sigmoid(self.logits(features, prototypes))

    def relation_matrix(self, features: torch.Tensor, prototypes: torch.Tensor,
                        return_logits: bool = False) -> torch.Tensor:
        """Score every embedding against every class prototype.

        The B * K pairs go through the network as one batch (so, in training mode, they share
        BatchNorm statistics).

        Args:
            features: (B, D) embeddings.
            prototypes: (K, D) class prototypes.
            return_logits: Return logits instead of sigmoid scores.

        Returns:
            (B, K); entry (i, k) = score(features[i], prototypes[k]).

        Example:
            >>> rwn = RelationWeightNetwork(8, channels=4).eval()
            >>> f, p = torch.randn(3, 8), torch.randn(2, 8)
            >>> m = rwn.relation_matrix(f, p)
            >>> torch.allclose(m[:, 1], rwn(f, p[1].expand(3, 8)), atol=1e-6)
            True
        """
        if features.ndim != 2 or prototypes.ndim != 2 or features.shape[1] != prototypes.shape[1]:
            raise ValueError(f"need features (B, D) and prototypes (K, D), got "
                             f"{tuple(features.shape)} and {tuple(prototypes.shape)}")
        b, k, d = features.shape[0], prototypes.shape[0], features.shape[1]
        f = features[:, None, :].expand(b, k, d).reshape(b * k, d)
        p = prototypes[None, :, :].expand(b, k, d).reshape(b * k, d)
        out = self.logits(f, p) if return_logits else self.forward(f, p)
        return out.reshape(b, k)
