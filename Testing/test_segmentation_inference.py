"""Segmentation inference: geometry, labels, progress, cancel, devices (tiny untrained network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from AnkleFractureLib.errors import CancelledError, InputError
from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.segmentation.inference import SegmentationModel, _window_count, resolve_device
from AnkleFractureLib.segmentation.network import build_network
from AnkleFractureLib.segmentation.plans import SegPlans
from AnkleFractureLib.segmentation.preprocess import bone_roi, prepare_case, prepare_ct
from conftest import rotation

TINY = {"architecture": "unet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
        "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    plans = SegPlans(model_spacing_mm=(2.0, 2.0, 2.0), patch_size=(32, 32, 32), network=TINY)
    return SegmentationModel(build_network(TINY).eval(), plans, torch.device("cpu"))


def _ct(direction=np.eye(3), spacing=(0.7, 0.6, 1.3)):
    """Air with two bone cylinders along the index k axis (a tibia and a fibula stand-in)."""
    arr = np.full((40, 50, 60), -1000, np.int16)
    k, j, i = np.indices(arr.shape)
    arr[(i - 35) ** 2 + (j - 25) ** 2 < 100] = 1200
    arr[(i - 15) ** 2 + (j - 25) ** 2 < 25] = 1200
    return Volume(arr, spacing, (10.0, -20.0, 5.0), direction)


@pytest.mark.parametrize("direction", [np.eye(3), rotation("z", 90) @ np.diag([1.0, -1.0, 1.0]),
                                       rotation("x", 20) @ rotation("z", 33)])
def test_output_has_the_ct_geometry_and_valid_labels(tiny_model, direction):
    ct = _ct(direction)
    labels = tiny_model.predict(ct, postprocess=False)
    assert labels.same_geometry(ct, atol=0)
    assert labels.array.dtype == np.uint8
    assert set(np.unique(labels.array).tolist()) <= {0, 1, 2}
    timings = labels.meta["segmentation"]["timings"]
    assert timings["total_s"] >= timings["network_s"] > 0


def test_progress_is_monotonic_and_reaches_one(tiny_model):
    seen = []
    tiny_model.predict(_ct(), progress=lambda f, m: seen.append((f, m)), postprocess=False)
    fractions = [f for f, _ in seen]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))
    assert any("patch" in m for _, m in seen)


def test_cancel_stops_the_work(tiny_model):
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(CancelledError):
        tiny_model.predict(_ct(), should_cancel=cancel, postprocess=False)


def test_bone_roi_and_model_grid():
    ct = _ct()
    roi = bone_roi(ct, 250, 5.0)
    sub = ct.array[roi]
    assert (sub > 250).sum() == (ct.array > 250).sum()  # every bone voxel kept
    assert sub.size < ct.array.size
    plans = SegPlans(model_spacing_mm=(1.0, 1.0, 1.0))
    model_input = prepare_ct(ct, plans)
    assert np.allclose(model_input.image.spacing, 1.0)
    assert 0.0 <= model_input.image.array.min() and model_input.image.array.max() <= 1.0
    # A label map prepared with the case lands on the same model grid.
    label = ct.with_array((ct.array > 250).astype(np.uint8))
    image, lab = prepare_case(ct, label, plans)
    assert image.same_geometry(lab) and set(np.unique(lab.array)) == {0, 1}


def test_window_count_matches_monai():
    assert _window_count((32, 32, 32), (32, 32, 32), 0.25) == 1
    assert _window_count((100, 32, 40), (32, 32, 32), 0.25) == 4 * 1 * 2


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA"):
            resolve_device("cuda")
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("tpu")


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        SegmentationModel.load(tmp_path / "nope", "cpu")
