"""Semi-supervised classifier parts: relation weight network, prototypes, relation-weighted
pseudo-label loss, Gaussian MMD, feature buffer, selection rule and the PL / FixMatch
baselines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from AnkleFractureLib.classification.relation import RelationWeightNetwork
from AnkleFractureLib.training.semi_losses import (FeatureBuffer, class_prototypes,
                                                   fixmatch_loss, gaussian_mmd,
                                                   pseudo_label_loss, relation_loss,
                                                   relation_weights, select_confident,
                                                   weighted_pseudo_label_loss)


def _f(t) -> float:
    """Python float of a (possibly grad-carrying) scalar tensor."""
    return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------- MMD

def test_mmd_identical_sets_is_zero():
    x = torch.randn(40, 8)
    assert _f(gaussian_mmd(x, x)) == 0.0
    assert _f(gaussian_mmd(x, x.clone())) < 1e-7
    assert _f(gaussian_mmd(x, x, bandwidths=[0.5, 2.0])) < 1e-7


def test_mmd_grows_with_mean_shift_and_is_symmetric():
    x, y = torch.randn(48, 8), torch.randn(48, 8)
    values = [_f(gaussian_mmd(x, y + s)) for s in (0.0, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[0] < 0.1 < values[-1]
    assert _f(gaussian_mmd(x, y + 1)) == pytest.approx(_f(gaussian_mmd(y + 1, x)), abs=1e-6)
    # Unequal set sizes work too, and stay non-negative.
    assert _f(gaussian_mmd(x[:10], y)) >= 0.0


def test_mmd_fixed_bandwidth_matches_hand_computation():
    x, y = torch.zeros(3, 2), torch.ones(5, 2)  # |x - y|^2 = 2
    expected = 1.0 + 1.0 - 2.0 * torch.exp(torch.tensor(-2.0 / 4.0))
    assert _f(gaussian_mmd(x, y, bandwidths=[4.0])) == pytest.approx(_f(expected), abs=1e-6)


def test_mmd_empty_set_is_zero_with_valid_graph():
    x = torch.randn(5, 4, requires_grad=True)
    empty = torch.zeros(0, 4, requires_grad=True)
    for a, b in ((x, empty), (empty, x)):
        v = gaussian_mmd(a, b)
        assert v.item() == 0.0
        v.backward()
    assert x.grad is not None and torch.all(x.grad == 0)


def test_mmd_gradient_flows_to_both_sets():
    x = torch.randn(16, 4, requires_grad=True)
    y = (torch.randn(16, 4) + 1.0).requires_grad_(True)
    before = _f(gaussian_mmd(x, y))
    gaussian_mmd(x, y).backward()
    assert x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0
    # A step against the gradient brings the sets closer.
    with torch.no_grad():
        after = _f(gaussian_mmd(x - 0.5 * x.grad / x.grad.norm(), y - 0.5 * y.grad / y.grad.norm()))
    assert after < before


# ----------------------------------------------------------------------------- prototypes

def test_prototypes_are_class_means():
    feats = torch.randn(10, 6, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 3, 3, 1])
    protos = class_prototypes(feats, labels, 4)
    assert protos.shape == (4, 6) and not protos.requires_grad
    for k in range(4):
        assert torch.allclose(protos[k], feats[labels == k].mean(0), atol=1e-6)


def test_prototypes_missing_class_keeps_previous_or_zero():
    feats = torch.randn(4, 3)
    labels = torch.tensor([0, 0, 2, 2])
    prev = torch.randn(4, 3)
    protos = class_prototypes(feats, labels, 4, previous=prev)
    assert torch.equal(protos[1], prev[1]) and torch.equal(protos[3], prev[3])
    assert torch.allclose(protos[0], feats[:2].mean(0))
    fresh = class_prototypes(feats, labels, 4)
    assert torch.equal(fresh[1], torch.zeros(3)) and torch.equal(fresh[3], torch.zeros(3))


def test_prototypes_ema():
    feats = torch.randn(6, 3)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    prev = torch.randn(3, 3)
    protos = class_prototypes(feats, labels, 3, previous=prev, momentum=0.9)
    for k in (0, 1):
        expected = 0.9 * prev[k] + 0.1 * feats[labels == k].mean(0)
        assert torch.allclose(protos[k], expected, atol=1e-6)
    assert torch.equal(protos[2], prev[2])
    with pytest.raises(ValueError):
        class_prototypes(feats, torch.tensor([0, 1, 0, 1, 0, 5]), 3)


# ----------------------------------------------------------------------------- RWN

def test_rwn_shapes_range_and_relation_matrix():
    rwn = RelationWeightNetwork(16, channels=8)
    f, p = torch.randn(6, 16) * 3, torch.randn(6, 16) * 3
    s = rwn(f, p)
    assert s.shape == (6,) and bool(((s >= 0) & (s <= 1)).all())
    rwn.eval()  # fixed BatchNorm statistics, so batch composition does not matter
    protos = torch.randn(4, 16)
    m = rwn.relation_matrix(f, protos)
    assert m.shape == (6, 4)
    for k in range(4):
        assert torch.allclose(m[:, k], rwn(f, protos[k].expand(6, 16)), atol=1e-6)
    with pytest.raises(ValueError):
        rwn(torch.randn(2, 8), torch.randn(2, 8))


def test_rwn_layer_structure():
    from monai.networks.blocks import ChannelSELayer

    rwn = RelationWeightNetwork(32)
    convs = [m for m in rwn.modules() if isinstance(m, nn.Conv1d)]
    assert len(convs) == 4
    assert [c.stride[0] for c in convs] == [2, 1, 1, 1]
    assert all(c.kernel_size[0] == 3 for c in convs) and convs[0].in_channels == 2
    assert sum(isinstance(m, nn.BatchNorm1d) for m in rwn.modules()) == 4
    assert sum(isinstance(m, ChannelSELayer) for m in rwn.modules()) == 2
    # ReLU after conv 1 and conv 3 only (the SE blocks' inner ReLUs aside).
    has_relu = [any(isinstance(m, nn.ReLU) for m in c.modules())
                for c in (rwn.conv1, rwn.conv2, rwn.conv3, rwn.conv4)]
    assert has_relu == [True, False, True, False]
    linears = [m for m in rwn.modules() if isinstance(m, nn.Linear) and m.out_features == 1]
    assert len(linears) == 1  # the final fully connected layer


def test_rwn_learns_separable_relations():
    k, d, n = 4, 16, 32
    centers = torch.randn(k, d) * 2.0
    labels = torch.arange(n) % k
    feats = centers[labels] + 0.3 * torch.randn(n, d)
    protos = class_prototypes(feats, labels, k)
    rwn = RelationWeightNetwork(d, channels=8)
    opt = torch.optim.Adam(rwn.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = relation_loss(rwn, feats, labels, protos)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])
    rwn.eval()
    with torch.no_grad():
        m = rwn.relation_matrix(feats, protos)
    own = m[torch.arange(n), labels]
    other = m.clone()
    other[torch.arange(n), labels] = -1.0
    assert (own > other.max(1).values).float().mean() >= 0.9
    # relation_weights = score with the pseudo-label's prototype, detached, mode restored.
    rwn.train()
    w = relation_weights(rwn, feats, labels, protos)
    assert rwn.training and not w.requires_grad and w.shape == (n,)
    assert torch.allclose(w, own, atol=1e-6)
    wrong = relation_weights(rwn, feats, (labels + 1) % k, protos)
    assert _f(w.mean()) > _f(wrong.mean()) + 0.5


def test_relation_loss_trains_rwn_only_and_balances_pairs():
    rwn = RelationWeightNetwork(8, channels=4)
    feats = torch.randn(6, 8, requires_grad=True)
    protos = torch.randn(3, 8, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = relation_loss(rwn, feats, labels, protos)
    loss.backward()
    assert feats.grad is None and protos.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in rwn.parameters())
    # Same value as a hand-written balanced BCE on the relation logits.
    with torch.no_grad():
        logits = rwn.relation_matrix(feats, protos, return_logits=True)
    target = F.one_hot(labels, 3).float()
    manual = -(2.0 * target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)).mean()
    assert _f(loss) == pytest.approx(_f(manual), rel=1e-5)
    empty = relation_loss(rwn, torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), protos)
    assert _f(empty) == 0.0
    empty.backward()


# ----------------------------------------------------------------------------- L_u

def test_weighted_pseudo_label_loss():
    logits = torch.randn(8, 4, requires_grad=True)
    pseudo = torch.randint(0, 4, (8,))
    zero = weighted_pseudo_label_loss(logits, pseudo, torch.zeros(8))
    assert _f(zero) == 0.0
    ones = weighted_pseudo_label_loss(logits, pseudo, torch.ones(8))
    assert _f(ones) == pytest.approx(_f(F.cross_entropy(logits, pseudo)), rel=1e-6)
    # Halving the weights halves the loss (mean over all M, not renormalised).
    half = weighted_pseudo_label_loss(logits, pseudo, torch.full((8,), 0.5))
    assert _f(half) == pytest.approx(0.5 * _f(ones), rel=1e-6)
    ones.backward()
    assert logits.grad.abs().sum() > 0
    empty = weighted_pseudo_label_loss(torch.zeros(0, 4, requires_grad=True),
                                       torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert _f(empty) == 0.0


# ----------------------------------------------------------------------------- selection, baselines

def test_select_confident_threshold():
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.45, 0.55], [0.2, 0.8]])
    assert select_confident(probs).tolist() == [True, False, True, True]
    assert select_confident(probs, threshold=0.7).tolist() == [True, False, False, True]
    w = torch.tensor([0.1, 0.6, 0.5, 0.99])
    # With weights the rule ignores the probabilities.
    assert select_confident(probs, w).tolist() == [False, True, False, True]
    assert select_confident(probs, w, threshold=0.05).tolist() == [True] * 4


def test_pseudo_label_loss_masks_unconfident():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 0.1, 0.0]],
                          requires_grad=True)
    loss, mask = pseudo_label_loss(logits, threshold=0.7)
    assert mask.tolist() == [True, False, True, False]
    ce = F.cross_entropy(logits, torch.tensor([0, 0, 2, 1]), reduction="none")
    assert _f(loss) == pytest.approx(_f((ce[0] + ce[2]) / 4), rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[1] == 0) and torch.all(logits.grad[3] == 0)
    none, m = pseudo_label_loss(torch.zeros(3, 3), threshold=0.7)
    assert _f(none) == 0.0 and not m.any()


def test_fixmatch_uses_weak_argmax_and_ignores_low_confidence():
    weak = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 10.0], [1.0, 0.9, 0.0]],
                        requires_grad=True)
    strong = torch.tensor([[0.0, 3.0, 0.0], [1.0, 0.0, 0.0], [5.0, 0.0, 0.0]],
                          requires_grad=True)
    loss, mask = fixmatch_loss(weak, strong, threshold=0.95)
    assert mask.tolist() == [True, True, False]
    # Targets are the weak argmax (0 and 2), not the strong view's own argmax.
    ce = F.cross_entropy(strong[:2], torch.tensor([0, 2]), reduction="sum")
    assert _f(loss) == pytest.approx(_f(ce) / 3, rel=1e-6)
    loss.backward()
    assert weak.grad is None  # no gradient through the pseudo-labels
    assert torch.all(strong.grad[2] == 0) and strong.grad[:2].abs().sum() > 0


# ----------------------------------------------------------------------------- buffer

def test_feature_buffer_fifo():
    buf = FeatureBuffer(5, 2)
    assert len(buf) == 0 and buf.get().shape == (0, 2)
    feats = torch.arange(16, dtype=torch.float32).reshape(8, 2).requires_grad_(True)
    buf.push(feats[:3])
    assert len(buf) == 3 and torch.equal(buf.get(), feats[:3].detach())
    buf.push(feats[3:7])
    assert len(buf) == 5 and torch.equal(buf.get(), feats[2:7].detach())
    assert not buf.get().requires_grad
    buf.push(feats)  # more than capacity at once: the newest 5 remain
    assert torch.equal(buf.get(), feats[3:].detach())
    buf.clear()
    assert len(buf) == 0
    with pytest.raises(ValueError):
        buf.push(torch.zeros(2, 3))
    assert len(FeatureBuffer(0, 2)) == 0
    zero = FeatureBuffer(0, 2)
    zero.push(feats)
    assert len(zero) == 0
    # Buffered features extend an MMD set.
    buf.push(feats[:4])
    assert gaussian_mmd(torch.cat([feats[4:], buf.get()]), feats).ndim == 0
