"""The plain-torch twins of :mod:`AnkleFractureLib.networks` against MONAI itself.

For every twin: the same ``state_dict`` keys (in the same order) and shapes as MONAI's
network, the same module tree, the same initial weights under the same seed (modules are
created in MONAI's order and none of the non-convolution layers draws random numbers), a
strict load of MONAI's weights and the same outputs in eval and train mode. The shipped
segmentation and fracture weights load strictly into twins built from their plans.json, and
the twin of ``sliding_window_inference`` gives MONAI's windows, predictor calls and blend.
Finally a fresh interpreter uses the twins without ``monai`` ever entering ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest
import torch
from monai.data.utils import compute_importance_map as monai_importance_map
from monai.data.utils import dense_patch_slices as monai_dense_patch_slices
from monai.inferers import sliding_window_inference as monai_sliding_window
from monai.networks import blocks as monai_blocks
from monai.networks import nets as monai_nets

from AnkleFractureLib import networks as twins
from conftest import REPO_ROOT

ATOL = 1e-5
MODELS = Path(REPO_ROOT) / "Resources" / "Models"
FRACTURE_NORM = ("instance", {"affine": True})  # as AnkleFractureLib.fracture.network builds it
FRACTURE_ACT = ("LeakyReLU", {"negative_slope": 0.1})

torch.set_num_threads(2)


# ------------------------------------------------------------------------------------ helpers
def _build_pair(make_monai: Callable[[], torch.nn.Module], make_twin: Callable[[], torch.nn.Module],
                seed: int = 0) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """MONAI's network and the twin, each built right after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    ref = make_monai()
    torch.manual_seed(seed)
    return ref, make_twin()


def _assert_same_structure(ref: torch.nn.Module, twin: torch.nn.Module) -> None:
    """Same state_dict keys in the same order, same shapes, same module names and leaf types."""
    ref_sd, twin_sd = ref.state_dict(), twin.state_dict()
    assert list(twin_sd) == list(ref_sd)
    assert {k: v.shape for k, v in twin_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    assert [n for n, _ in twin.named_modules()] == [n for n, _ in ref.named_modules()]
    # Leaves are torch layers in both: same class and same constructor arguments (repr).
    def leaves(net: torch.nn.Module) -> Dict[str, Tuple[type, str]]:
        return {n: (type(m), repr(m)) for n, m in net.named_modules() if not list(m.children())}

    assert leaves(twin) == leaves(ref)


def _assert_same_init(ref: torch.nn.Module, twin: torch.nn.Module) -> None:
    twin_sd = twin.state_dict()
    for key, value in ref.state_dict().items():
        assert torch.equal(twin_sd[key], value), f"initial {key} differs"


def _randomise(net: torch.nn.Module, seed: int = 1) -> None:
    """Random values in every parameter and buffer (norm affines and PReLU slopes start
    constant; random running variances stay positive), so outputs test every weight."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in net.state_dict().items():
            if not value.is_floating_point():
                continue
            noise = torch.rand(value.shape, generator=gen)
            value.copy_(noise + 0.5 if name.endswith("running_var") else 0.5 * (noise - 0.5))


def _max_diff_after_load(ref: torch.nn.Module, twin: torch.nn.Module, x: torch.Tensor,
                         train: bool = False) -> float:
    """Load MONAI's (randomised) weights into the twin strictly; max |output difference|."""
    _randomise(ref)
    twin.load_state_dict(ref.state_dict(), strict=True)
    ref.train(train)
    twin.train(train)
    with torch.no_grad():
        a, b = ref(x.clone()), twin(x.clone())
    assert a.shape == b.shape
    return float((a - b).abs().max())


def _check_pair(make_monai: Callable[[], torch.nn.Module],
                make_twin: Callable[[], torch.nn.Module], x: torch.Tensor,
                train_too: bool = True) -> None:
    ref, twin = _build_pair(make_monai, make_twin)
    _assert_same_structure(ref, twin)
    _assert_same_init(ref, twin)
    assert _max_diff_after_load(ref, twin, x) <= ATOL
    if train_too:  # instance/batch norm use batch statistics in train mode
        assert _max_diff_after_load(ref, twin, x, train=True) <= ATOL
        twin_sd = twin.state_dict()  # batch norm running statistics moved the same way
        for key, value in ref.state_dict().items():
            assert torch.allclose(twin_sd[key], value, atol=ATOL), key


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------------------------- UNet
SEG_SHIPPED = dict(spatial_dims=3, in_channels=1, out_channels=3, channels=(16, 32, 64, 128, 256),
                   strides=(2, 2, 2, 2), num_res_units=2, norm="instance", dropout=0.0)

UNET_CASES = {
    "shipped_seg": (SEG_SHIPPED, (1, 1, 32, 32, 32)),
    **{f"tiny_res{n}": (dict(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16),
                             strides=(2, 2), num_res_units=n), (2, 1, 16, 12, 8))
       for n in (0, 1, 2)},
    "tiny_2d_res0": (dict(spatial_dims=2, in_channels=2, out_channels=2, channels=(4, 8, 16),
                          strides=(2, 2), num_res_units=0), (2, 2, 16, 12)),
    "tiny_2d_res2": (dict(spatial_dims=2, in_channels=2, out_channels=2, channels=(4, 8, 16),
                          strides=(2, 2), num_res_units=2), (2, 2, 16, 12)),
    "affine_relu": (dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8),
                         strides=(2,), num_res_units=1, norm=("instance", {"affine": True}),
                         act="relu"), (1, 1, 8, 8, 8)),
    "batch_leaky": (dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 8),
                         strides=(2, 1), num_res_units=2, norm="batch",
                         act=("LeakyReLU", {"negative_slope": 0.1})), (2, 1, 8, 8, 8)),
}


@pytest.mark.parametrize("case", sorted(UNET_CASES))
def test_unet_twin_matches_monai(case: str) -> None:
    kwargs, shape = UNET_CASES[case]
    _check_pair(lambda: monai_nets.UNet(**kwargs), lambda: twins.UNet(**kwargs), _rand(*shape))


def test_unet_twin_with_dropout_has_monai_keys_and_eval_output() -> None:
    kwargs = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16),
                  strides=(2, 2), num_res_units=2, dropout=0.2)
    _check_pair(lambda: monai_nets.UNet(**kwargs), lambda: twins.UNet(**kwargs),
                _rand(1, 1, 8, 8, 8), train_too=False)  # dropout masks are random in train mode


def test_unet_arguments_after_strides_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        twins.UNet(3, 1, 2, (4, 8), (2,), 3)  # MONAI's 6th argument is kernel_size


# --------------------------------------------------------------------------------- BasicUNet
FRACTURE_SHIPPED = dict(spatial_dims=3, in_channels=3, out_channels=1,
                        features=(6, 12, 24, 48, 48, 6), norm=FRACTURE_NORM, act=FRACTURE_ACT,
                        dropout=0.0)
TINY = (4, 4, 8, 8, 8, 4)

BASIC_CASES = {
    "shipped_fracture": (FRACTURE_SHIPPED, (1, 3, 48, 40, 40), True),
    # Odd sizes: 33 -> 16 and 9 -> 4, 5 -> 2 on the way down; the decoder pads by one voxel.
    "shipped_fracture_odd": (FRACTURE_SHIPPED, (1, 3, 33, 18, 20), True),
    "tiny_default_norm_act_odd": (dict(features=TINY, in_channels=1), (1, 1, 35, 18, 21), True),
    # 20 x 18 x 22 ends at 1 x 1 x 1: instance norm refuses that (MONAI too), batch norm in eval
    # mode does not.
    "tiny_batch_20x18x22": (dict(spatial_dims=3, in_channels=3, out_channels=2, features=TINY,
                                 norm="batch", act="relu"), (1, 3, 20, 18, 22), False),
    "tiny_2d_odd": (dict(spatial_dims=2, in_channels=1, out_channels=2, features=TINY,
                         norm=FRACTURE_NORM, act=FRACTURE_ACT), (2, 1, 35, 20), True),
}


@pytest.mark.parametrize("case", sorted(BASIC_CASES))
def test_basic_unet_twin_matches_monai(case: str) -> None:
    kwargs, shape, train_too = BASIC_CASES[case]
    _check_pair(lambda: monai_nets.BasicUNet(**kwargs), lambda: twins.BasicUNet(**kwargs),
                _rand(*shape), train_too=train_too)


def test_basic_unet_twin_with_dropout_and_no_bias() -> None:
    kwargs = dict(spatial_dims=3, in_channels=1, out_channels=1, features=TINY, dropout=0.3,
                  bias=False)
    _check_pair(lambda: monai_nets.BasicUNet(**kwargs), lambda: twins.BasicUNet(**kwargs),
                _rand(1, 1, 32, 16, 16), train_too=False)


# ---------------------------------------------------------------------- classifier blocks
CONV_CASES = {
    f"3d_{cin}to{cout}_s{s}_k{k}_{act}": (dict(spatial_dims=3, in_channels=cin, out_channels=cout,
                                               strides=s, kernel_size=k, act=act, norm="batch",
                                               bias=False), (2, cin, 8, 6, 7))
    for cin, cout, s, k, act in [(3, 8, 2, 3, "relu"), (8, 8, 1, 3, None), (4, 8, 2, 1, None),
                                 (8, 8, 1, 3, "relu")]
}
CONV_CASES.update({
    "1d_relation_conv1": (dict(spatial_dims=1, in_channels=2, out_channels=8, strides=2,
                               kernel_size=3, act="relu", norm="batch", bias=False), (4, 2, 16)),
    "1d_relation_conv2": (dict(spatial_dims=1, in_channels=8, out_channels=8, strides=1,
                               kernel_size=3, act=None, norm="batch", bias=False), (4, 8, 8)),
    "3d_transposed": (dict(spatial_dims=3, in_channels=4, out_channels=2, strides=2,
                           is_transposed=True, dropout=0.0), (1, 4, 3, 4, 5)),
    "2d_transposed_conv_only": (dict(spatial_dims=2, in_channels=4, out_channels=2, strides=2,
                                     is_transposed=True, conv_only=True), (1, 4, 3, 5)),
    "3d_no_adn": (dict(spatial_dims=3, in_channels=2, out_channels=3, act=None, norm=None),
                  (1, 2, 4, 4, 4)),
})


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_convolution_twin_matches_monai(case: str) -> None:
    kwargs, shape = CONV_CASES[case]
    _check_pair(lambda: monai_blocks.Convolution(**kwargs),
                lambda: twins.Convolution(**kwargs), _rand(*shape))


RESIDUAL_CASES = {
    "strided": dict(in_channels=4, out_channels=8, strides=2, subunits=2),
    "identity": dict(in_channels=4, out_channels=4, subunits=3),
    "channels_only": dict(in_channels=4, out_channels=8, subunits=1),
    "last_conv_only": dict(in_channels=4, out_channels=4, subunits=2, last_conv_only=True),
}


@pytest.mark.parametrize("case", sorted(RESIDUAL_CASES))
def test_residual_unit_twin_matches_monai(case: str) -> None:
    kwargs = dict(spatial_dims=3, **RESIDUAL_CASES[case])
    _check_pair(lambda: monai_blocks.ResidualUnit(**kwargs),
                lambda: twins.ResidualUnit(**kwargs), _rand(2, 4, 6, 6, 6))


@pytest.mark.parametrize("dims,channels,r", [(3, 8, 2), (3, 16, 8), (1, 8, 4), (2, 6, 3)])
def test_channel_se_twin_matches_monai(dims: int, channels: int, r: int) -> None:
    shape = (2, channels) + (5, 4, 3)[:dims]
    _check_pair(lambda: monai_blocks.ChannelSELayer(dims, channels, r=r),
                lambda: twins.ChannelSELayer(dims, channels, r=r), _rand(*shape))


# ------------------------------------------------------------------------- shipped weights
def _shipped(stage: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    ckpt = torch.load(MODELS / stage / "model.pt", map_location="cpu", weights_only=True)
    plans = json.loads((MODELS / stage / "plans.json").read_text(encoding="utf-8"))
    return {k: v.float() for k, v in ckpt["state_dict"].items()}, plans["network"]


def _load_both(ref: torch.nn.Module, twin: torch.nn.Module, state: Dict[str, torch.Tensor],
               x: torch.Tensor) -> None:
    ref.load_state_dict(state, strict=True)
    twin.load_state_dict(state, strict=True)
    with torch.no_grad():
        diff = (ref.eval()(x) - twin.eval()(x)).abs().max()
    assert float(diff) <= ATOL


def test_shipped_segmentation_weights_load_into_the_twin() -> None:
    from AnkleFractureLib.segmentation.network import build_network  # the MONAI factory

    state, net = _shipped("segmentation")
    assert net["architecture"] == "unet"
    twin = twins.UNet(int(net["spatial_dims"]), int(net["in_channels"]), int(net["out_channels"]),
                      channels=tuple(net["channels"]), strides=tuple(net["strides"]),
                      num_res_units=int(net["num_res_units"]), norm=net["norm"],
                      dropout=float(net["dropout"]))
    _load_both(build_network(net), twin, state, _rand(1, 1, 32, 32, 32))


def test_shipped_fracture_weights_load_into_the_twin() -> None:
    from AnkleFractureLib.fracture.network import build_localiser  # the MONAI factory

    state, net = _shipped("fracture")
    assert net["architecture"] == "basic_unet"
    twin = twins.BasicUNet(int(net["spatial_dims"]), int(net["in_channels"]),
                           int(net["out_channels"]), features=tuple(net["features"]),
                           norm=FRACTURE_NORM, act=FRACTURE_ACT, dropout=float(net["dropout"]))
    _load_both(build_localiser(net), twin, state, _rand(1, 3, 48, 40, 40))


# --------------------------------------------------------------------------- sliding window
def _recording_predictor(calls: List[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A fixed 3-D conv (1 -> 2 channels, same size) that records every batch it gets."""
    torch.manual_seed(3)
    conv = torch.nn.Conv3d(1, 2, 3, padding=1)

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.clone())
        with torch.no_grad():
            return conv(batch)

    return predictor


SW_IMAGES = {
    "larger": ((1, 1, 40, 36, 30), (16, 16, 16)),
    "smaller": ((1, 1, 10, 12, 9), (16, 16, 16)),
    "mixed_batch2": ((2, 1, 37, 10, 21), (16, 12, 16)),
    "non_multiple": ((1, 1, 37, 29, 21), (16, 12, 10)),
}


@pytest.mark.parametrize("image", sorted(SW_IMAGES))
@pytest.mark.parametrize("overlap", [0.25, 0.5])
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("sw_batch_size", [1, 3])
def test_sliding_window_twin_matches_monai(image: str, overlap: float, mode: str,
                                           sw_batch_size: int) -> None:
    shape, roi = SW_IMAGES[image]
    x = _rand(*shape, seed=5)
    ref_calls: List[torch.Tensor] = []
    twin_calls: List[torch.Tensor] = []
    ref = monai_sliding_window(x, roi, sw_batch_size, _recording_predictor(ref_calls),
                               overlap=overlap, mode=mode, padding_mode="constant", cval=0.0)
    out = twins.sliding_window_inference(x, roi, sw_batch_size, _recording_predictor(twin_calls),
                                         overlap=overlap, mode=mode, padding_mode="constant",
                                         cval=0.0)
    assert len(twin_calls) == len(ref_calls)
    assert all(torch.equal(a, b) for a, b in zip(twin_calls, ref_calls))  # same windows
    assert out.dtype == torch.float32 and out.shape == (shape[0], 2) + shape[2:]
    assert float((out - torch.as_tensor(ref)).abs().max()) <= ATOL


def test_sliding_window_pads_with_cval_as_monai_does() -> None:
    x = _rand(1, 1, 6, 7, 5)
    ref = monai_sliding_window(x, (8, 8, 8), 1, lambda w: w, padding_mode="constant", cval=-2.0,
                               mode="gaussian")
    out = twins.sliding_window_inference(x, (8, 8, 8), 1, lambda w: w, padding_mode="constant",
                                         cval=-2.0, mode="gaussian")
    assert float((out - torch.as_tensor(ref)).abs().max()) <= ATOL


@pytest.mark.parametrize("size", [(16, 16, 16), (128, 128, 128), (7, 12, 5), (9,), (10, 3)])
@pytest.mark.parametrize("mode,sigma", [("gaussian", 0.125), ("gaussian", (0.5, 0.1, 0.3)),
                                        ("constant", 0.125)])
def test_importance_map_equals_monai(size: Tuple[int, ...], mode: str, sigma) -> None:
    if isinstance(sigma, tuple):
        sigma = sigma[:len(size)] + (0.2,) * (len(size) - len(sigma))
    ref = monai_importance_map(size, mode=mode, sigma_scale=sigma)
    assert torch.equal(twins.compute_importance_map(size, mode, sigma), torch.as_tensor(ref))


@pytest.mark.parametrize("image,patch,step", [((40, 36, 30), (16, 16, 16), (12, 12, 12)),
                                              ((37, 29), (16, 12), (8, 6)),
                                              ((16, 5), (16, 5), (16, 5)), ((9,), (4,), (1,))])
def test_dense_patch_slices_equal_monai(image, patch, step) -> None:
    assert twins.dense_patch_slices(image, patch, step) == [
        tuple(s) for s in monai_dense_patch_slices(image, patch, step)]


# ---------------------------------------------------------------------------- no MONAI import
NO_MONAI_SCRIPT = """
import sys, torch
from AnkleFractureLib import networks as nw
x = torch.zeros(1, 1, 16, 16, 16)
nw.UNet(3, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=2).eval()(x)
nw.BasicUNet(3, 1, 1, features=(4, 4, 8, 8, 8, 4)).eval()(torch.zeros(1, 1, 32, 16, 16))
nw.Convolution(3, 1, 4, strides=2, act="relu", norm="batch", bias=False).eval()(x)
nw.ChannelSELayer(3, 4, r=2)(torch.zeros(1, 4, 4, 4, 4))
nw.sliding_window_inference(torch.zeros(1, 1, 20, 20, 20), (16, 16, 16), 2, lambda w: w,
                            mode="gaussian")
assert "monai" not in sys.modules, sorted(m for m in sys.modules if m.startswith("monai"))
print("ok")
"""


def test_the_twins_run_without_importing_monai() -> None:
    result = subprocess.run([sys.executable, "-c", NO_MONAI_SCRIPT], cwd=str(REPO_ROOT),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ------------------------------------------------------------- the stages' network factories
def _factories():
    from AnkleFractureLib.classification.network import build_classifier
    from AnkleFractureLib.fracture.network import build_localiser
    from AnkleFractureLib.segmentation.network import build_network

    def plans(stage: str) -> dict:
        return json.loads((MODELS / stage / "plans.json").read_text())["network"]

    return {"segmentation": (build_network, plans("segmentation"), (1, 1, 32, 32, 32)),
            "fracture": (build_localiser, plans("fracture"), (1, 3, 48, 40, 40)),
            "classification": (build_classifier, plans("classification"), (2, 3, 96, 48, 64))}


@pytest.mark.parametrize("stage", ["segmentation", "fracture", "classification"])
def test_factories_build_the_same_network_from_either_implementation(stage: str) -> None:
    """Training builds MONAI's network, inference the twin: with the shipped weights both
    give the same outputs, and under one seed both start from the same weights (a model
    trained today is the model trained before the twins)."""
    factory, config, shape = _factories()[stage]
    ref, twin = _build_pair(lambda: factory(config, implementation="monai"),
                            lambda: factory(config, implementation="torch"), seed=7)
    for key, value in ref.state_dict().items():
        assert torch.equal(twin.state_dict()[key], value), key
    payload = torch.load(MODELS / stage / "model.pt", map_location="cpu", weights_only=True)
    state = {k: v.float() if v.is_floating_point() else v
             for k, v in payload["state_dict"].items()}
    ref.load_state_dict(state, strict=True)
    twin.load_state_dict(state, strict=True)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(twin.eval()(x), ref.eval()(x))


def test_factories_refuse_an_unknown_implementation() -> None:
    from AnkleFractureLib.segmentation.network import build_network

    with pytest.raises(ValueError, match="unknown network implementation 'tensorflow'"):
        build_network({"channels": [4, 8], "strides": [2]}, implementation="tensorflow")
