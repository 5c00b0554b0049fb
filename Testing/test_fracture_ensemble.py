"""A localiser folder that lists ensemble members loads as the mean of their probabilities."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from AnkleFractureLib.errors import InputError
from AnkleFractureLib.fracture.model_io import default_plans, load_localiser, save_localiser
from AnkleFractureLib.fracture.network import MeanProbability, build_localiser
from AnkleFractureLib.segmentation.model_io import folder_sha256, sha256_file

FEATURES = [4, 4, 8, 8, 8, 4]


def _ensemble(tmp_path: Path) -> Path:
    """A model folder: model.pt and member_b.pt (another network's weights) listed in plans."""
    plans = default_plans(FEATURES)
    torch.manual_seed(1)
    save_localiser(tmp_path / "a", build_localiser(plans["network"]), plans)
    torch.manual_seed(2)
    save_localiser(tmp_path / "b", build_localiser(plans["network"]), plans)
    folder = tmp_path / "a"
    (tmp_path / "b" / "model.pt").rename(folder / "member_b.pt")
    plans["members"] = [{"file": "member_b.pt", "network": plans["network"]}]
    (folder / "plans.json").write_text(json.dumps(plans))
    return folder


def test_ensemble_folder_averages_its_members_probabilities(tmp_path) -> None:
    folder = _ensemble(tmp_path)
    net, plans = load_localiser(folder)
    assert isinstance(net, MeanProbability) and len(net.members) == 2
    x = torch.rand(1, len(plans["channels"]), 32, 16, 16)
    with torch.no_grad():
        mean = (torch.sigmoid(net.members[0](x)) + torch.sigmoid(net.members[1](x))) / 2
        assert torch.allclose(torch.sigmoid(net(x)), mean, atol=1e-5)
        # the members differ, so the mean is neither of them
        assert not torch.allclose(torch.sigmoid(net.members[0](x)), mean, atol=1e-4)
    # the folder's identity covers every member's weights
    assert plans["_sha256"] == folder_sha256(folder) != sha256_file(folder / "model.pt")


def test_single_model_folder_keeps_the_weights_file_hash(tmp_path) -> None:
    plans = default_plans(FEATURES)
    save_localiser(tmp_path, build_localiser(plans["network"]), plans)
    net, loaded = load_localiser(tmp_path)
    assert not isinstance(net, MeanProbability)
    assert loaded["_sha256"] == sha256_file(tmp_path / "model.pt")


@pytest.mark.parametrize("entry, names", [({"file": "../outside.pt"}, "plans.json"),
                                          ({"file": "missing.pt"}, "missing.pt"),
                                          ("member_b.pt", "plans.json")])
def test_bad_ensemble_member_is_refused_naming_the_file(tmp_path, entry, names) -> None:
    folder = _ensemble(tmp_path)
    plans = json.loads((folder / "plans.json").read_text())
    plans["members"] = [entry]
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(InputError, match=names.replace(".", r"\.")):
        load_localiser(folder)


def test_folder_hash_is_none_when_a_member_is_missing(tmp_path) -> None:
    folder = _ensemble(tmp_path)
    (folder / "member_b.pt").unlink()
    assert folder_sha256(folder) is None


def _with_upper(tmp_path: Path, channels=("ct", "tibia")) -> Path:
    """A model folder whose plans name an upper-window network (upper.pt, reading
    ``channels``) for a crop 24 mm taller."""
    plans = default_plans(FEATURES)
    torch.manual_seed(1)
    save_localiser(tmp_path / "a", build_localiser(plans["network"]), plans)
    up_plans = default_plans(FEATURES, channels)
    torch.manual_seed(2)
    save_localiser(tmp_path / "b", build_localiser(up_plans["network"]), up_plans)
    folder = tmp_path / "a"
    (tmp_path / "b" / "model.pt").rename(folder / "upper.pt")
    plans["inference"] = {"extend_top_mm": 24.0, "upper_window": {
        "file": "upper.pt", "network": up_plans["network"], "channels": list(channels)}}
    (folder / "plans.json").write_text(json.dumps(plans))
    return folder


def test_upper_window_network_reads_only_above_the_box(tmp_path) -> None:
    """An upper-window network of its own: the box's output is the localiser's own network's,
    voxel for voxel; above it, the upper network's on the top box height (its own channels);
    the folder's identity covers both weight files."""
    import numpy as np

    from AnkleFractureLib.fracture.localise import FractureLocaliser

    folder = _with_upper(tmp_path)
    loc = FractureLocaliser.load(folder, device="cpu")
    assert loc.upper is not None and loc.upper[1] == ("ct", "tibia")
    assert loc.plans["_sha256"] == folder_sha256(folder) != sha256_file(folder / "model.pt")
    rng = np.random.default_rng(5)
    box, extra = 32, 16
    tall = rng.random((3, box + extra, 48, 48)).astype(np.float32)
    tall[2] = 0.0
    tall[2, :, 20:28, 10:18] = 1.0
    both, _ = loc.heatmap(tall, box)
    plain = FractureLocaliser(loc.network, loc.plans, "cpu")
    on_box, _ = plain.heatmap(tall[:, :box])
    assert np.array_equal(both[:box], on_box)
    up_alone = FractureLocaliser(loc.upper[0], {**loc.plans, "channels": ["ct", "tibia"]},
                                 "cpu")
    upper, _ = up_alone.heatmap(tall[:, extra:])
    assert np.allclose(both[box:], upper[box - extra:], atol=1e-6)
    same_net, _ = FractureLocaliser(loc.network, {**loc.plans, "inference": {
        "extend_top_mm": 24.0, "upper_window": True}}, "cpu").heatmap(tall, box)
    assert not np.allclose(same_net[box:], both[box:], atol=1e-4)  # the upper network read it


def test_bad_upper_window_network_is_refused_naming_the_file(tmp_path) -> None:
    folder = _with_upper(tmp_path)
    (folder / "upper.pt").unlink()
    with pytest.raises(InputError, match=r"upper\.pt"):
        from AnkleFractureLib.fracture.localise import FractureLocaliser

        FractureLocaliser.load(folder, device="cpu")
    folder = _with_upper(tmp_path / "two", channels=("ct", "femur"))
    with pytest.raises(InputError, match="femur"):
        FractureLocaliser.load(folder, device="cpu")


def test_an_upper_network_reading_the_bone_window_asks_for_it(tmp_path) -> None:
    """The crop arrays a localiser asks for cover its upper network's too: a three-array crop
    is refused, naming the bone-window CT, when only the upper network reads it."""
    import numpy as np

    from AnkleFractureLib.fracture.localise import FractureLocaliser

    folder = _with_upper(tmp_path, channels=("ct", "tibia", "fibula", "ct_bone"))
    loc = FractureLocaliser.load(folder, device="cpu")
    assert loc.channels == ("ct", "tibia", "fibula")
    with pytest.raises(InputError, match="ct_bone"):
        loc.heatmap(np.zeros((3, 48, 48, 48), np.float32), 32)
    prob, _ = loc.heatmap(np.zeros((4, 48, 48, 48), np.float32), 32)
    assert prob.shape == (48, 48, 48)
