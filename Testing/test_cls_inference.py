"""Classifier inference: model folder, calibrated probabilities, TTA uncertainty, Grad-CAM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from AnkleFractureLib.classification.inference import WeberClassifier
from AnkleFractureLib.classification.model_io import load_classifier, save_classifier
from AnkleFractureLib.classification.network import build_classifier, feature_grid
from AnkleFractureLib.classification.plans import ClsPlans
from AnkleFractureLib.errors import InputError

TINY = dict(widths=[4, 8, 8, 16], downsample=2, tta=4)
CROP = (3, 32, 16, 16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    plans = ClsPlans.make(**TINY)
    folder = tmp_path_factory.mktemp("cls_model")
    save_classifier(folder, build_classifier(plans.network), plans)
    return folder


def _crops(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n,) + CROP).astype(np.float32)


def test_probabilities_sum_to_one_and_temperature_keeps_the_argmax(model_dir, tmp_path):
    clf = WeberClassifier.load(model_dir, device="cpu")
    p1 = clf.predict_crops(_crops())
    assert p1.shape == (3, 4) and np.allclose(p1.sum(1), 1.0, atol=1e-6)
    clf.plans.temperature = 3.0
    p3 = clf.predict_crops(_crops())
    assert np.array_equal(p1.argmax(1), p3.argmax(1))
    assert p3.max(1).mean() <= p1.max(1).mean() + 1e-9  # softer
    entropy = lambda p: -(p * np.log(p)).sum(1)  # noqa: E731
    assert np.all(entropy(p3) >= entropy(p1) - 1e-9)


def test_classify_channels_gives_uncertainty_and_a_gradcam_on_the_crop_grid(model_dir):
    clf = WeberClassifier.load(model_dir, device="cpu")
    res = clf.classify_channels(_crops(1)[0])
    assert set(res.probabilities) == {"none", "A", "B", "C"}
    assert abs(sum(res.probabilities.values()) - 1.0) < 1e-6
    assert res.prediction == max(res.probabilities, key=res.probabilities.get)
    u = res.uncertainty
    assert u["n_samples"] == 4 and 0.0 <= u["agreement"] <= 1.0 and isinstance(u["unsure"], bool)
    assert res.gradcam.shape == CROP[1:] and res.gradcam.dtype == np.float32
    assert 0.0 <= res.gradcam.min() and res.gradcam.max() <= 1.0
    assert res.gradcam_class == res.prediction
    other = clf.classify_channels(_crops(1)[0], tta=0, gradcam_class="C")
    assert other.gradcam_class == "C" and other.uncertainty["n_samples"] == 1
    json.dumps(res.to_json())
    with pytest.raises(ValueError, match="gradcam_class"):
        clf.classify_channels(_crops(1)[0], gradcam_class="D")
    again = clf.classify_channels(_crops(1)[0])
    assert again.probabilities == res.probabilities  # deterministic TTA
    assert np.array_equal(again.gradcam, res.gradcam)


def test_model_folder_errors_name_the_file(model_dir, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_classifier(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "plans.json").write_text((model_dir / "plans.json").read_text())
    (bad / "model.pt").write_bytes(b"not a model")
    with pytest.raises(InputError, match="model.pt"):
        load_classifier(bad)
    plans = json.loads((model_dir / "plans.json").read_text())
    plans["network"]["widths"] = [8, 8, 8, 8]
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "plans.json").write_text(json.dumps(plans))
    (wrong / "model.pt").write_bytes((model_dir / "model.pt").read_bytes())
    with pytest.raises(InputError, match="do not fit"):
        load_classifier(wrong)


def test_plans_validate_and_pool_the_crop():
    with pytest.raises(ValueError, match="in_channels"):
        ClsPlans(channels=["ct"])
    with pytest.raises(ValueError, match="crop"):
        ClsPlans.make("cropped")
    p = ClsPlans.make(downsample=[1, 2, 2])
    x = np.arange(3 * 4 * 4 * 4, dtype=np.float32).reshape(3, 4, 4, 4)
    out = p.prepare(x)
    assert out.shape == (3, 4, 2, 2)
    assert out[0, 0, 0, 0] == pytest.approx(x[0, 0, :2, :2].mean())
    assert ClsPlans.from_json(json.loads(json.dumps(p.to_json()))) == p


def test_the_default_network_fits_the_budget_and_keeps_a_useful_gradcam_grid():
    net = build_classifier(ClsPlans().network)
    n = sum(p.numel() for p in net.parameters())
    assert 2 * n < 20e6  # float16 bytes under 20 MB
    assert feature_grid((96, 48, 64)) == (6, 3, 4)
    with torch.no_grad():
        assert net.feature_maps(torch.zeros(1, 3, 96, 48, 64)).shape[2:] == (6, 3, 4)
    from monai.networks.blocks import ChannelSELayer

    from AnkleFractureLib.networks import ChannelSELayer as TwinSELayer
    assert sum(isinstance(m, TwinSELayer) for m in net.modules()) == 8  # one per block
    trained = build_classifier(ClsPlans().network, implementation="monai")  # as training
    assert sum(isinstance(m, ChannelSELayer) for m in trained.modules()) == 8


def test_deterministic_pools_match_torch_values_and_gradients():
    """The classifier's own pools (deterministic backward on CUDA) give torch's max-pool and
    adaptive average pool values, and the same gradients where the maximum is unique."""
    from AnkleFractureLib.classification.network import GlobalAvgPool, MaxPool3x3Stride2

    torch.manual_seed(0)
    for shape in ((2, 3, 9, 8, 7), (1, 2, 6, 5)):
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        ref_pool = torch.nn.MaxPool3d(3, 2, 1) if x.ndim == 5 else torch.nn.MaxPool2d(3, 2, 1)
        ref = ref_pool(x)
        ours = MaxPool3x3Stride2()(x)
        assert torch.equal(ours, ref)
        w = torch.randn_like(ref)
        g_ref, = torch.autograd.grad((ref * w).sum(), x)
        g_ours, = torch.autograd.grad((ours * w).sum(), x)
        assert torch.allclose(g_ours, g_ref)
    y = torch.randn(2, 4, 3, 5, 6)
    avg = torch.nn.AdaptiveAvgPool3d(1)(y)
    assert torch.allclose(GlobalAvgPool()(y), avg, atol=1e-6) and avg.shape == (2, 4, 1, 1, 1)


def test_shipped_classifier_outputs_are_unchanged_by_the_deterministic_pools():
    """Swapping torch's pools back in gives the same logits for the shipped weights."""
    from AnkleFractureLib.classification.model_io import load_classifier as load
    from AnkleFractureLib.resources import resource_path

    net, _ = load(resource_path("Models", "classification"), "cpu")
    x = torch.rand(2, 3, 96, 48, 64)
    with torch.no_grad():
        ours = net(x)
        net.stem[1] = torch.nn.MaxPool3d(3, 2, 1)
        net.pool = torch.nn.AdaptiveAvgPool3d(1)
        for m in net.modules():
            if hasattr(m, "avg_pool"):
                m.avg_pool = torch.nn.AdaptiveAvgPool3d(1)
        assert torch.allclose(net(x), ours, atol=1e-4)
