"""Fracture localisation: line extraction, height measurement, Weber from height, training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from AnkleFractureLib.fracture.localise import measure_line, strongest_line
from AnkleFractureLib.fracture.weber_height import (combine, height_class,
                                                    height_class_probabilities)
from AnkleFractureLib.geometry.volume import Volume


def _grid(shape=(60, 20, 20), spacing=1.5, origin=(-15.0, -15.0, -30.0)) -> Volume:
    return Volume(np.zeros(shape, np.float32), (spacing,) * 3, origin, np.eye(3))


def test_strongest_line_picks_the_largest_evidence() -> None:
    p = np.zeros((30, 10, 10), np.float32)
    p[5, 2:5, 2:5] = 0.9          # small, strong
    p[20, :, :] = 0.7             # large line
    mask, peak = strongest_line(p, 0.5)
    assert mask[20].all() and not mask[5].any()
    assert peak == pytest.approx(0.7)
    empty, peak0 = strongest_line(np.full((4, 4, 4), 0.2, np.float32), 0.5)
    assert not empty.any() and peak0 == pytest.approx(0.2)


@pytest.mark.parametrize("scale", [0.9, 1.0, 1.15])
def test_height_is_measured_in_patient_mm_above_the_plafond(scale: float) -> None:
    """A line at template z = 12 mm, template 'scale' x the patient: the patient height is
    12 / scale mm above the plafond whatever the pose."""
    grid = _grid()
    k = int(round((12.0 - grid.origin[2]) / 1.5))
    mask = np.zeros(grid.shape, bool)
    mask[k, 5:15, 5:15] = True
    # patient -> template: rotation about y by 20 degrees, scale, translation.
    a = np.deg2rad(20.0)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    p2t = np.eye(4)
    p2t[:3, :3] = scale * rot
    p2t[:3, 3] = [5.0, -3.0, 40.0]
    centre, height, extent, size_factor = measure_line(mask, mask.astype(float), grid, p2t,
                                                       np.zeros(3))
    z_t = grid.origin[2] + 1.5 * k
    assert height == pytest.approx(z_t / scale, abs=1e-6)
    assert size_factor == pytest.approx(1.0 / scale)
    back = p2t[:3, :3] @ centre + p2t[:3, 3]
    assert back[2] == pytest.approx(z_t, abs=1e-6)
    assert extent["height_max_mm"] - extent["height_min_mm"] < 1e-6
    assert extent["voxels"] == 100


def test_weber_class_from_height_and_soft_boundaries() -> None:
    assert [height_class(h) for h in (-10.0, 5.0, 20.0, 60.0)] == ["A", "B", "B", "C"]
    p = height_class_probabilities(30.0)
    assert p["B"] == pytest.approx(p["C"], abs=1e-6)   # on the boundary: even
    assert height_class(33.0, size_factor=1.2) == "B"   # a tall patient's syndesmosis is higher
    assert sum(height_class_probabilities(7.0).values()) == pytest.approx(1.0)


def test_combination_agrees_or_says_why_not() -> None:
    cls = {"none": 0.05, "A": 0.05, "B": 0.85, "C": 0.05}
    ok = combine(cls, True, 0.95, 12.0)
    assert ok.agree and ok.prediction == "B" and not ok.reasons
    assert sum(ok.probabilities.values()) == pytest.approx(1.0)
    miss = combine(cls, False, 0.1, None)
    assert not miss.agree and "no fibular fracture line" in miss.reasons[0]
    high = combine(cls, True, 0.95, 60.0)
    assert not high.agree and high.height_class == "C" and "+60.0 mm" in high.reasons[0]
    intact = combine({"none": 0.9, "A": 0.04, "B": 0.03, "C": 0.03}, False, 0.05, None)
    assert intact.agree and intact.prediction == "none"


def test_training_pair_shapes_and_patch_over_the_line() -> None:
    from AnkleFractureLib.training.fracture_train import Sample, training_pair

    ch = np.zeros((3, 96, 48, 64), np.float16)
    ch[2, :, 20:30, 15:25] = 1.0
    target = np.zeros((96, 48, 64), np.uint8)
    target[70, 20:30, 15:25] = 1
    s = Sample(ch, target, np.eye(4), {"id": "x", "weber": "C"})
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(20):
        x, y = training_pair(s, rng, shift=4, patch_z=48)
        assert x.shape == (3, 48, 40, 40) and y.shape == (1, 48, 40, 40)
        hits += int(y.sum() > 0)
    assert hits >= 8  # most patches hold the line (70 % aimed at it)
    # Crops with the bone-window CT: the input holds the named arrays in that order.
    four = np.concatenate([ch, np.full((1, 96, 48, 64), 0.25, np.float16)])
    x, _ = training_pair(Sample(four, target, np.eye(4), {"id": "x", "weber": "C"}), rng,
                         shift=0, patch_z=48, channels=("ct_bone", "fibula"))
    assert x.shape == (2, 48, 40, 40)
    assert 0.05 < float(np.median(x[0])) < 0.6 and x[1].max() == 1.0  # augmented 0.25, the mask


def test_a_window_cut_by_a_scan_edge_shows_air_and_no_line_beyond_it_and_old_draws_stay() -> None:
    """--edge-cut: some windows end at a tilted plane, beyond which every CT array reads the
    crop's outside value exactly (air, no noise), the masks and the line are 0, as in the crop
    of a scan that ends inside the box; without it the draws are those of the shipped recipe."""
    from AnkleFractureLib.crop.syndesmosis import OUTSIDE_HU
    from AnkleFractureLib.preprocessing.intensity import BONE_HU_WINDOW, normalize_hu
    from AnkleFractureLib.training.fracture_train import Sample, training_pair

    ch = np.zeros((4, 96, 48, 64), np.float16)
    ch[0] = 0.6
    ch[3] = 0.5
    ch[2, :, 20:30, 15:25] = 1.0
    target = np.zeros((96, 48, 64), np.uint8)
    target[40:56, 20:30, 15:25] = 1
    s = Sample(ch, target, np.eye(4), {"id": "x", "weber": "C"})
    names = ("ct", "ct_bone", "fibula")
    air_ct = float(normalize_hu(np.array([OUTSIDE_HU]))[0])
    air_bone = float(normalize_hu(np.array([OUTSIDE_HU]), BONE_HU_WINDOW)[0])
    cut = 0
    for seed in range(12):
        x, y = training_pair(s, np.random.default_rng(seed), 4, patch_z=48, channels=names,
                             edge_cut_prob=1.0)
        out = (x[0] == air_ct) & (x[1] == air_bone)  # exact air: only the cut makes it
        assert out.any() and not out.all()
        assert x[2][out].max() == 0.0 and y[0][out].max() == 0.0
        assert np.median(x[0][~out]) > 0.3  # the scan's side keeps its (augmented) CT
        cut += int(out[-1].mean() > 0.5)  # the scan ended above the plane
    assert 6 <= cut <= 12  # three in four end above
    plain = training_pair(s, np.random.default_rng(3), 4, patch_z=48, channels=names)
    off = training_pair(s, np.random.default_rng(3), 4, patch_z=48, channels=names,
                        edge_cut_prob=0.0)
    assert all(np.array_equal(a, b) for a, b in zip(plain, off))


def test_training_pair_augments_the_sub_voxel_arrays_as_one_ct_and_keeps_the_old_draws() -> None:
    """The 8 sub-voxel arrays are one CT at twice the resolution: one intensity draw for all
    (equal inputs stay equal up to the noise); and a localiser that does not read them gets
    exactly the pairs it got from the shorter crop files (the shipped recipe reproduces)."""
    from AnkleFractureLib.crop.syndesmosis import SUB_CHANNELS
    from AnkleFractureLib.training.fracture_train import Sample, training_pair

    rng = np.random.default_rng(3)
    five = rng.uniform(0.0, 1.0, (5, 40, 48, 64)).astype(np.float16)
    five[1:3] = 0.0
    five[2, :, 20:30, 15:25] = 1.0
    target = np.zeros((40, 48, 64), np.uint8)
    target[20, 20:30, 15:25] = 1
    ramp = np.linspace(0.1, 0.9, 64, dtype=np.float16)[None, None, None, :]
    sub = np.broadcast_to(ramp, (8, 40, 48, 64))
    all13 = np.concatenate([five, sub])
    info = {"id": "x", "weber": "C"}
    old = training_pair(Sample(five, target, np.eye(4), info), np.random.default_rng(7), 2,
                        patch_z=24)
    new = training_pair(Sample(all13, target, np.eye(4), info), np.random.default_rng(7), 2,
                        patch_z=24)
    assert np.array_equal(old[0], new[0]) and np.array_equal(old[1], new[1])
    x, _ = training_pair(Sample(all13, target, np.eye(4), info), np.random.default_rng(7), 2,
                         patch_z=24, channels=("fibula",) + SUB_CHANNELS)
    assert x.shape == (9, 24, 40, 40)
    # One gamma, scale and offset for the 8 (independent noise only, sd <= 0.03): their means
    # agree (8 separate draws differ by 0.05-0.2) and so do their voxels, up to the noise.
    assert np.ptp(x[1:].mean(axis=(1, 2, 3))) < 0.01
    assert float(np.median(np.abs(x[1] - x[2]))) < 0.05


def _broken_fibula_window() -> np.ndarray:
    """(3, 30, 12, 12) float32: a soft-edged fibula rod with a 2-slice fracture gap."""
    ch = np.zeros((3, 30, 12, 12), np.float32)
    ch[2, :, 4:9, 4:9] = 1.0
    ch[2, :, 3, 4:9] = 0.4  # the linearly interpolated edge of the crop's mask
    ch[2, 14:16] = 0.0
    return ch


def test_mask_augmentation_keeps_the_shipped_recipe_and_can_stay_soft() -> None:
    from AnkleFractureLib.training.fracture_train import _augment_masks

    # Shipped recipe (bridge 0.4, thresholded): the fibula is binary whatever is drawn.
    for seed in range(12):
        out = _augment_masks(_broken_fibula_window(), np.random.default_rng(seed))
        assert set(np.unique(out[2])) <= {0.0, 1.0}
    # Soft masks: left as the crop gives them when nothing is drawn, bridged when closed.
    kept = bridged = 0
    for seed in range(40):
        ch = _broken_fibula_window()
        out = _augment_masks(ch.copy(), np.random.default_rng(seed), bridge_prob=0.5,
                             soft=True)
        assert 0.0 <= out[2].min() and out[2].max() <= 1.0
        if np.array_equal(out[2], ch[2]):
            kept += 1
        if (out[2, 14:16, 5:8, 5:8] == 1.0).all():
            bridged += 1
            assert (out[2] >= ch[2]).all()  # a closing only adds
    assert kept >= 4 and bridged >= 10  # 25 % left, 50 % closed (of 40)


def test_hard_negative_term_adds_the_hardest_background_voxels_only_when_asked() -> None:
    """--negative-topk K: the cross-entropy of each window's K highest background logits is
    added (a false line's bright voxels, which the window's mean dilutes); line voxels never
    count as background; K = 0 leaves the shipped loss as it was."""
    import torch
    import torch.nn.functional as F

    from AnkleFractureLib.training.fracture_train import _loss

    logits = torch.full((2, 1, 4, 8, 8), -6.0)
    target = torch.zeros_like(logits)
    logits[0, 0, 1, 2:4, 2:4] = 3.0            # a false line: 4 bright voxels, intact window
    target[1, 0, 2, 3:5, 3:5] = 1.0            # a true line in the second window
    logits[1, 0, 2, 3:5, 3:5] = 4.0            # found: bright, but not background
    plain = _loss(logits, target, 3.0)
    assert torch.equal(plain, _loss(logits, target, 3.0, 0, 5.0))
    hard = _loss(logits, target, 3.0, negative_topk=4, negative_weight=2.0)
    expected = (F.softplus(torch.tensor(3.0)) * 4 + F.softplus(torch.tensor(-6.0)) * 4) / 8
    assert torch.isclose(hard - plain, 2.0 * expected, atol=1e-5)


@pytest.mark.parametrize("option, value", [("--negative-topk", "-1"),
                                           ("--negative-weight", "-0.5")])
def test_train_fracture_refuses_a_negative_hard_negative_option(tmp_path, option, value) -> None:
    from AnkleFractureLib.cli.main import main

    with pytest.raises(SystemExit, match="must not be negative"):
        main(["train-fracture", str(tmp_path / "data"), "--out", str(tmp_path / "m"),
              "--cache-dir", str(tmp_path / "cache"), option, value])
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("option, value", [("--bridge-masks", "0.9"), ("--bridge-masks", "-0.1"),
                                           ("--crop-shift-mm", "-5"),
                                           ("--crop-shift-mm", "150"), ("--edge-cut", "1.5")])
def test_train_fracture_refuses_a_bad_share_or_shift(tmp_path, option, value) -> None:
    from AnkleFractureLib.cli.main import main

    with pytest.raises(SystemExit, match=f"{option} must be in"):
        main(["train-fracture", str(tmp_path / "data"), "--out", str(tmp_path / "m"),
              "--cache-dir", str(tmp_path / "cache"), option, value])
    assert not (tmp_path / "cache").exists()


def test_localiser_round_trip_and_errors(tmp_path) -> None:
    from AnkleFractureLib.errors import InputError
    from AnkleFractureLib.fracture.localise import FractureLocaliser
    from AnkleFractureLib.fracture.model_io import default_plans, save_localiser
    from AnkleFractureLib.fracture.network import build_localiser

    plans = default_plans([4, 4, 8, 8, 8, 4], channels=("ct", "tibia", "fibula", "ct_bone"))
    assert plans["network"]["in_channels"] == 4
    save_localiser(tmp_path / "m", build_localiser(plans["network"]), plans)
    loc = FractureLocaliser.load(tmp_path / "m", device="cpu")
    heat, win = loc.heatmap(np.zeros((4, 32, 48, 64), np.float32))
    assert heat.shape == (32, 48, 64) and 0.0 <= heat.min() and heat.max() <= 1.0
    with pytest.raises(InputError, match="reads the crop arrays .*ct_bone"):
        loc.heatmap(np.zeros((3, 8, 8, 8), np.float32))  # no bone-window CT
    old = default_plans([4, 4, 8, 8, 8, 4])  # the three crop channels, as shipped
    assert old["channels"] == ["ct", "tibia", "fibula"] and old["network"]["in_channels"] == 3
    save_localiser(tmp_path / "old", build_localiser(old["network"]), old)
    heat, _ = FractureLocaliser.load(tmp_path / "old", device="cpu").heatmap(
        np.zeros((3, 32, 48, 64), np.float32))  # a localiser of the three crop channels
    assert heat.shape == (32, 48, 64)
    bad = {**old, "channels": ["ct", "tibia", "femur"]}
    save_localiser(tmp_path / "bad", build_localiser(old["network"]), bad)
    with pytest.raises(InputError, match="plans.json.*femur"):
        FractureLocaliser.load(tmp_path / "bad")
    (tmp_path / "m" / "model.pt").write_bytes(b"broken")
    with pytest.raises(InputError, match="model.pt"):
        FractureLocaliser.load(tmp_path / "m")
    with pytest.raises(InputError, match="does not exist"):
        FractureLocaliser.load(tmp_path / "missing")


def test_model_mask_crops_are_cached_per_segmentation_model(tmp_path, monkeypatch):
    """Crops made with a segmentation model's masks are keyed by its weights and by the
    post-processing version: a new model or rule never gets the old one's crops."""
    import hashlib

    from AnkleFractureLib.segmentation import postprocess
    from AnkleFractureLib.training.fracture_data import _seg_model_tag

    tags = []
    for k, payload in enumerate((b"weights one", b"weights two")):
        folder = tmp_path / f"model{k}"
        folder.mkdir()
        (folder / "model.pt").write_bytes(payload)
        tags.append(_seg_model_tag(str(folder)))
        assert tags[-1] == (f"{hashlib.sha256(payload).hexdigest()[:12]}"
                            f"-pp{postprocess.POSTPROCESS_VERSION}")
    assert tags[0] != tags[1]
    monkeypatch.setattr(postprocess, "POSTPROCESS_VERSION", postprocess.POSTPROCESS_VERSION + 1)
    assert _seg_model_tag(str(tmp_path / "model1")) != tags[1]


def test_crops_are_made_again_for_a_case_written_again_or_another_template(tmp_path,
                                                                          monkeypatch) -> None:
    """The crop cache is keyed by the case's files and the template's content too: a dataset
    regenerated in place (same ids, new files) or another template never gets the old crops,
    and an unchanged case is not cropped twice."""
    import os

    from AnkleFractureLib.classification import crops
    from AnkleFractureLib.dataset.layout import Dataset
    from AnkleFractureLib.training import fracture_data as fd

    ds = Dataset.create(tmp_path / "ds")
    for k in range(2):
        ds.add_case(f"c{k}", Volume(np.full((4, 5, 6), 100.0 * k, np.float32), (1.0, 1.0, 1.0)))
    cropped = []

    def fake_crop(ds_, todo, *args, **kwargs):
        for record, path in todo:
            cropped.append(record.id)
            path.write_bytes(b"crop")
            yield None

    monkeypatch.setattr(fd, "_crop_errors", fake_crop)
    monkeypatch.setattr(crops, "template_content_key", lambda folder: f"content of {folder}")
    template = type("T", (), {"meta": {"path": "template one"}})()

    def build(tpl=template):
        cropped.clear()
        fd.build_fracture_crops(tmp_path / "ds", tmp_path / "cache", template=tpl)
        return sorted(cropped)

    assert build() == ["c0", "c1"]
    assert build() == []  # reused
    ds = Dataset.load(tmp_path / "ds")
    ds.add_case("c1", Volume(np.full((4, 5, 6), 7.0, np.float32), (1.0, 1.0, 1.0)))
    image = ds.path(ds.get("c1").image)
    os.utime(image, ns=(1, 1))  # written again: another modification time
    assert build() == ["c1"]
    assert build(type("T", (), {"meta": {"path": "template two"}})()) == ["c0", "c1"]


def _line_samples(n: int) -> list:
    """Synthetic crop samples on the template grid (96, 48, 64): a bright fibula column with a
    dark transverse line at a case-dependent level (the target), and intact columns; the
    fourth array (bone-window CT) is the CT rescaled."""
    from AnkleFractureLib.training.fracture_train import Sample

    rng = np.random.default_rng(3)
    out = []
    for k in range(n):
        ch = np.zeros((4, 96, 48, 64), np.float16)
        ch[0] = rng.normal(0.0, 0.05, (96, 48, 64))
        ch[0, :, 20:30, 15:25] += 1.0
        ch[2, :, 20:30, 15:25] = 1.0
        target = np.zeros((96, 48, 64), np.uint8)
        weber = "none" if k % 3 == 0 else "B"
        if weber == "B":
            z = 40 + 4 * k
            ch[0, z:z + 2, 20:30, 15:25] = 0.0
            target[z:z + 2, 20:30, 15:25] = 1
        ch[3] = ch[0] * 0.6 + 0.2
        out.append(Sample(ch, target, np.eye(4), {"id": f"c{k}", "weber": weber,
                                                  "height_true_mm": None}))
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="no CUDA device"))])
def test_localiser_training_writes_a_model_and_repeats_with_its_seed(tmp_path, monkeypatch,
                                                                     device) -> None:
    """train-fracture's loop on synthetic crops: the model folder is complete, the device and
    the determinism settings are recorded, and the same seed gives the same weights, down to
    the bytes of model.pt (its sha256 is what a model card quotes)."""
    import hashlib
    import json

    import torch

    from AnkleFractureLib.training import fracture_train as ft

    monkeypatch.setattr(ft, "load_samples", lambda paths: _line_samples(6))
    cfg = ft.FractureTrainConfig(steps=6, batch_size=2, eval_every=3, val_fraction=0.34,
                                 seed=5, threads=1, device=device, features=(4, 4, 8, 8, 8, 4),
                                 channels=("ct", "tibia", "fibula", "ct_bone"))
    weights = []
    for run in ("a", "b"):
        report = ft.train_localiser([], tmp_path / run, cfg, command="test")
        assert {p.name for p in (tmp_path / run).iterdir()} >= {
            "plans.json", "model.pt", "training.json", "training_log.csv"}
        assert report["device"].startswith(device) and report["determinism"]["enabled"]
        assert report["steps_run"] == 6 and len(report["val_cases"]) == 2
        plans = json.loads((tmp_path / run / "plans.json").read_text())
        assert set(plans["decision"]) >= {"found_threshold", "min_voxels"}
        assert plans["channels"][-1] == "ct_bone" and plans["network"]["in_channels"] == 4
        weights.append(torch.load(tmp_path / run / "model.pt", map_location="cpu")["state_dict"])
    assert torch.are_deterministic_algorithms_enabled() is False  # restored after the run
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name
    digests = {hashlib.sha256((tmp_path / run / "model.pt").read_bytes()).hexdigest()
               for run in ("a", "b")}
    assert len(digests) == 1  # torch.save once named the archive after a random temp file


def _left_leg_and_both_legs():
    """(CT, labels) of a fast Weber B left phantom, and the same beside its mirror image (a
    right leg at smaller LPS x): a scan with both legs in view."""
    from AnkleFractureLib.geometry.volume import Volume
    from AnkleFractureLib.phantom import generate_case

    case = generate_case(10, "B", "left", spacing="fast")
    ct, lab = case.ct, case.label
    two_ct = Volume(np.concatenate([np.flip(ct.array, axis=2), ct.array], axis=2), ct.spacing,
                    ct.origin)
    two_lab = Volume(np.concatenate([np.flip(lab.array, axis=2), lab.array], axis=2),
                     lab.spacing, lab.origin)
    return ct, lab, two_ct, two_lab


def test_training_crops_are_registered_as_run_does_with_both_legs_in_view():
    """A both-legs scan is refused by side detection; the training crops then register the
    dataset's leg alone, as a user who gives the side after that refusal gets."""
    from AnkleFractureLib.errors import AnkleFractureError
    from AnkleFractureLib.registration.template import load_template
    from AnkleFractureLib.registration.leg import register_as_run

    ct, lab, two_ct, two_lab = _left_leg_and_both_legs()
    template = load_template()
    one, reg = register_as_run(ct, lab, template, "left")
    assert one is lab and reg.side == "left" and reg.rms_mm < 3.0
    with pytest.raises(AnkleFractureError, match="both legs"):
        register_as_run(two_ct, two_lab, template, None)
    leg, reg2 = register_as_run(two_ct, two_lab, template, "left")
    assert reg2.side == "left" and reg2.rms_mm < 3.0
    assert 0 < int((leg.array > 0).sum()) < int((two_lab.array > 0).sum())
    # The same leg, the same pose: the left leg sits in the second half of the x axis.
    shift = np.eye(4)
    shift[0, 3] = ct.shape[2] * ct.spacing[0]
    moved = reg2.patient_to_template @ shift
    assert np.allclose(moved[:3, :3], reg.patient_to_template[:3, :3], atol=0.02)
    assert np.allclose(moved[:3, 3], reg.patient_to_template[:3, 3], atol=2.0)  # mm


def test_an_annotated_fracture_line_trains_like_the_phantoms_exact_surface(tmp_path):
    """A reader's line (a mask on the CT, stored in the dataset as ``fracture_line``) gives
    the localiser nearly the target that the phantom's exact fracture surface gives."""
    from AnkleFractureLib.dataset import Dataset
    from AnkleFractureLib.errors import InputError
    from AnkleFractureLib.fracture.targets import fracture_line_target
    from AnkleFractureLib.phantom import generate_case
    from AnkleFractureLib.registration.template import load_template
    from AnkleFractureLib.training.fracture_data import crop_one

    case = generate_case(21, "B", "right", spacing="fast")
    ct, lab = case.ct, case.label
    meta = case.info
    # The line a reader would draw: the exact band, 1 mm wide, on the CT's own grid.
    drawn = fracture_line_target(meta["fracture"], meta["anatomy_to_patient"], ct, np.eye(4),
                                 lab.array == 2, half_width_mm=0.5)
    assert drawn.sum() > 50
    ds = Dataset.create(tmp_path / "ds")
    ds.add_case("exact", ct, lab, weber="B", side="right", source="phantom", meta=meta)
    ds.add_case("drawn", ct, lab, weber="B", side="right", source="reader",
                fracture_line=ct.with_array(drawn))
    ds = Dataset.load(tmp_path / "ds")
    assert ds.get("drawn").fracture_line == "fracture_lines/drawn.nii.gz"
    assert ds.counts()["fracture_lines"] == 1
    template = load_template()
    _, exact, _, info_e = crop_one(ds, ds.get("exact"), "dataset", template)
    _, annotated, _, info_a = crop_one(ds, ds.get("drawn"), "dataset", template)
    assert (info_e["line_source"], info_a["line_source"]) == ("phantom", "annotated")
    dice = 2 * int((exact & annotated).sum()) / int(exact.sum() + annotated.sum())
    assert dice > 0.7, dice
    with pytest.raises(InputError, match="fracture line mask is not on the image's grid"):
        ds.add_case("bad", ct, lab, fracture_line=ct.region((slice(0, 5),) * 3))


def test_classifier_crops_of_a_both_legs_scan_show_one_leg_whichever_side_policy():
    """crop_case on a scan with both legs: with the side detected (refused, then the dataset's
    side, as a user answers) and with the side given, the crop is the same leg's."""
    from AnkleFractureLib.classification.crops import crop_case

    ct, lab, two_ct, two_lab = _left_leg_and_both_legs()
    one, _ = crop_case(ct, lab, side="left")
    detected, info_d = crop_case(two_ct, two_lab, side="auto", both_legs_side="left")
    given, info_g = crop_case(two_ct, two_lab, side="left")
    assert info_d["side"] == info_g["side"] == "left"
    for crop in (detected, given):  # the fibula channel: that of the one-leg scan
        inter = float(np.minimum(crop[2], one[2]).sum())
        assert 2 * inter / float(crop[2].sum() + one[2].sum()) > 0.9


def test_the_localiser_reads_a_crop_taller_at_its_top_when_its_plans_ask() -> None:
    """plans.json ``inference.extend_top_mm``: the same box grid (spacing, axes, bottom),
    24 mm (16 slices) taller; the lower slices are the classifier's crop voxel for voxel, the
    added ones continue the fibular shaft."""
    from AnkleFractureLib.crop.syndesmosis import crop_syndesmosis
    from AnkleFractureLib.fracture.localise import FractureLocaliser
    from AnkleFractureLib.phantom import generate_case
    from AnkleFractureLib.registration import load_template, register_to_template

    case = generate_case(7, "C", "right", spacing="fast")
    template = load_template()
    reg = register_to_template(case.label, template, side="right", ct=case.ct)
    crop = crop_syndesmosis(case.ct, case.label, reg.patient_to_template, template)
    plain = FractureLocaliser(None, {"decision": {}}, "cpu")
    assert plain.extend_top_mm == 0.0
    assert plain.crop_for(case.ct, case.label, reg.patient_to_template, template, crop) is crop
    tall = FractureLocaliser(None, {"decision": {}, "inference": {"extend_top_mm": 24.0}}, "cpu")
    ext = tall.crop_for(case.ct, case.label, reg.patient_to_template, template, crop)
    nz = crop.channels.shape[1]
    assert ext.channels.shape == (3, nz + 16) + crop.channels.shape[2:]
    assert np.allclose(ext.grid.origin, crop.grid.origin) and ext.grid.spacing == crop.grid.spacing
    assert np.allclose(ext.channels[:, :nz], crop.channels, atol=1e-5)
    assert ext.channels[2, nz:].sum() > 0.5 * ext.channels[2, nz - 16:nz].sum()  # more fibula
    # The window is centred on the fibula of the classifier's box, as without the extension.
    assert ext.meta["box_slices"] == nz
    from AnkleFractureLib.fracture.window import fibula_window
    assert fibula_window(ext.channels[2][:nz]) == fibula_window(crop.channels[2])


def test_localiser_training_chooses_its_checkpoint_on_a_validation_set_of_its_own(
        tmp_path, monkeypatch) -> None:
    """With validation crops of their own (train-fracture --val-dataset), every training case
    trains, the checkpoint is chosen on the given cases only, and a case in both is refused."""
    import json

    from AnkleFractureLib.training import fracture_train as ft

    train, val = _line_samples(6), _line_samples(9)[6:]
    for s in val:
        s.info["id"] = "val_" + s.info["id"]
    monkeypatch.setattr(ft, "load_samples",
                        lambda paths: val if paths and str(paths[0]) == "val" else train)
    cfg = ft.FractureTrainConfig(steps=4, batch_size=2, eval_every=2, val_fraction=0.5,
                                 seed=5, threads=1, device="cpu", features=(4, 4, 8, 8, 8, 4))
    report = ft.train_localiser([Path("train")], tmp_path, cfg, command="test",
                                val_paths=[Path("val")])
    assert report["train_cases"] == sorted(s.info["id"] for s in train)
    assert report["val_cases"] == sorted(s.info["id"] for s in val)
    log = (tmp_path / "training_log.csv").read_text().splitlines()
    assert "val_found_rate" in log[0] and json.loads(
        (tmp_path / "training.json").read_text())["best_step"] in (2, 4)
    for s in val:
        s.info["id"] = s.info["id"].removeprefix("val_")
    val[0].info["id"] = train[0].info["id"]
    with pytest.raises(ValueError, match="both the training and the validation"):
        ft.train_localiser([Path("train")], tmp_path / "b", cfg, val_paths=[Path("val")])


def test_train_fracture_refuses_a_dataset_that_both_trains_and_validates(tmp_path, capsys) -> None:
    from AnkleFractureLib.cli.main import main

    (tmp_path / "d").mkdir()
    with pytest.raises(SystemExit, match="both a training and a validation dataset"):
        main(["train-fracture", str(tmp_path / "d"), "--val-dataset", str(tmp_path / "d" / "."),
              "--out", str(tmp_path / "m"), "--cache-dir", str(tmp_path / "c")])
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("names", ["ct,femur", "ct,ct", ""])
def test_train_fracture_refuses_unknown_channels_before_any_work(tmp_path, capsys, names):
    from AnkleFractureLib.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["train-fracture", str(tmp_path / "data"), "--out", str(tmp_path / "m"),
              "--cache-dir", str(tmp_path / "cache"), "--channels", names])
    assert "--channels takes distinct names of ct, tibia, fibula, ct_bone" in str(exc.value)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "m").exists()


def test_upper_window_leaves_the_box_output_unchanged_and_reads_the_shaft_above() -> None:
    """plans.json ``inference.upper_window``: below the box's top the line probability is
    the box's own, voxel for voxel; above it a window of the box's height reads the shaft;
    a window whose new slices hold no fibula is not read."""
    import torch

    from AnkleFractureLib.fracture.localise import FractureLocaliser
    from AnkleFractureLib.fracture.model_io import default_plans
    from AnkleFractureLib.fracture.network import build_localiser

    torch.manual_seed(0)
    plans = default_plans([4, 4, 8, 8, 8, 4])
    net = build_localiser(plans["network"]).eval()
    rng = np.random.default_rng(3)
    box, extra = 32, 24
    tall = rng.random((3, box + extra, 48, 48)).astype(np.float32)
    tall[2] = 0.0
    tall[2, :, 20:28, 10:18] = 1.0  # a fibular shaft through every slice
    plain = FractureLocaliser(net, plans, "cpu")
    stacked = FractureLocaliser(net, {**plans, "inference": {"extend_top_mm": 36.0,
                                                              "upper_window": True}}, "cpu")
    assert stacked.upper_window and not plain.upper_window
    on_box, _ = plain.heatmap(tall[:, :box])
    both, _ = stacked.heatmap(tall, box)
    assert np.array_equal(both[:box], on_box)
    upper, _ = plain.heatmap(tall[:, extra:])  # the upper window: the crop's top box height
    assert np.allclose(both[box:], upper[box - extra:], atol=1e-6)
    assert both[box:].max() > 0.0
    # Without the flag the taller crop is one input: the box's slices change.
    one, _ = plain.heatmap(tall, box)
    assert not np.allclose(one[:box], on_box, atol=1e-4)
    # No fibula above the box (the leg ends): nothing is read there.
    short = tall.copy()
    short[2, box:] = 0.0
    none_above, _ = stacked.heatmap(short, box)
    assert np.array_equal(none_above[:box], on_box) and not none_above[box:].any()


def test_the_box_moved_up_is_the_taller_crops_upper_window() -> None:
    """train-fracture --crop-shift-mm S crops the box moved S mm up: voxel for voxel the top
    box height of the crop S mm taller that a localiser with ``inference.extend_top_mm`` S
    reads, i.e. the upper window an upper-window network is run on."""
    from AnkleFractureLib.crop.syndesmosis import crop_syndesmosis
    from AnkleFractureLib.fracture.localise import FractureLocaliser
    from AnkleFractureLib.phantom import generate_case
    from AnkleFractureLib.registration import load_template, register_to_template
    from AnkleFractureLib.training.fracture_data import shifted_box_template

    case = generate_case(7, "C", "right", spacing="fast")
    template = load_template()
    assert shifted_box_template(template, 0.0) is template
    reg = register_to_template(case.label, template, side="right", ct=case.ct)
    tall = FractureLocaliser(None, {"decision": {}, "inference": {"extend_top_mm": 24.0}},
                             "cpu").crop_for(case.ct, case.label, reg.patient_to_template,
                                             template)
    up = crop_syndesmosis(case.ct, case.label, reg.patient_to_template,
                          shifted_box_template(template, 24.0))
    nz = up.channels.shape[1]
    assert tall.channels.shape[1] == nz + 16
    assert np.allclose(tall.channels[:, 16:], up.channels, atol=1e-5)


def test_a_moved_up_crop_is_scored_on_its_own_grid_above_its_cut_edge() -> None:
    """Checkpoint choice of an upper-window network (score_samples): a crop of the box moved
    up is measured on the moved grid, its lowest shift mm (where the crop cuts the fibula
    across) count as outside the scan; a box crop is measured as before."""
    from types import SimpleNamespace

    from AnkleFractureLib.registration import load_template
    from AnkleFractureLib.training.fracture_train import Sample, crop_grid, score_samples

    template = load_template()
    nz, ny, nx = (int(v) for v in template.box.grid()[0][::-1])
    seen = []

    class Recorder:
        def locate(self, crop, plafond):
            seen.append(crop)
            return SimpleNamespace(found=False, height_mm=None, size_factor=1.0,
                                   probability=0.0)

    def sample(shift):
        return Sample(np.zeros((4, nz, ny, nx), np.float16), np.zeros((nz, ny, nx), np.uint8),
                      np.eye(4), {"id": f"s{shift}", "weber": "none", "box_shift_mm": shift})

    summary, _ = score_samples(Recorder(), [sample(0.0), sample(24.0)], template)
    assert summary["n_none"] == 2 and summary["found_on_none_rate"] == 0.0
    box, moved = seen
    assert box.in_scan is None
    assert np.allclose(box.grid.origin, crop_grid(template).origin)
    assert np.allclose(np.asarray(moved.grid.origin) - np.asarray(box.grid.origin),
                       24.0 * template.box.axes[:, 2])
    rows = moved.in_scan.any(axis=(1, 2))
    assert not rows[:16].any() and rows[16:].all()


def test_a_localiser_reading_the_min_pooled_ct_gets_it_and_old_crop_files_gain_it(tmp_path):
    """A localiser whose plans name ``ct_bone_min`` (or the sub-voxel arrays) has it added to
    its crop (only then: it costs a 27 (8) times finer sampling of the CT), and a training
    cache file written before it existed gets it from the CT and the file's own registration,
    equal to a fresh crop's."""
    from AnkleFractureLib.crop.syndesmosis import (crop_syndesmosis, min_pooled_bone,
                                                   sub_sampled_bone)
    from AnkleFractureLib.dataset.layout import Dataset
    from AnkleFractureLib.fracture.localise import FractureLocaliser
    from AnkleFractureLib.phantom.dataset_writer import write_phantom_dataset
    from AnkleFractureLib.registration import load_template
    from AnkleFractureLib.training.fracture_data import (_save, add_min_pooled,
                                                         build_fracture_crops, load_crop_file)

    write_phantom_dataset(tmp_path / "ds", n=1, seed=11, weber="B")
    ds = Dataset.load(tmp_path / "ds")
    template = load_template()
    paths, failed = build_fracture_crops(ds.root, tmp_path / "cache", "dataset", template)
    assert not failed
    fresh = load_crop_file(paths[0])
    assert fresh["channels"].shape[0] == 13
    for have, asked in ((4, ("ct", "ct_bone_min", "fibula")), (5, ("ct", "ct_bone_sub7"))):
        _save(paths[0], fresh["channels"][:have], fresh["target"],
              fresh["patient_to_template"], fresh["info"])  # as written before the later arrays
        build_fracture_crops(ds.root, tmp_path / "cache", "dataset", template)
        assert load_crop_file(paths[0])["channels"].shape[0] == have  # not asked for: left alone
        build_fracture_crops(ds.root, tmp_path / "cache", "dataset", template, channels=asked)
        again = load_crop_file(paths[0])["channels"]
        assert np.array_equal(again, fresh["channels"])
    assert not add_min_pooled(ds, ds.cases[0], paths[0], template)  # already there

    from AnkleFractureLib.io import read_image

    ct = read_image(ds.path(ds.cases[0].image))
    label = read_image(ds.path(ds.cases[0].segmentation))
    crop = crop_syndesmosis(ct, label, fresh["patient_to_template"], template)
    plain = FractureLocaliser(None, {"decision": {}}, "cpu")
    assert plain.crop_for(ct, label, fresh["patient_to_template"], template, crop).ct_bone_min \
        is None
    reads = FractureLocaliser(None, {"decision": {}, "channels": ["ct", "ct_bone_min",
                                                                   "fibula"]}, "cpu")
    got = reads.crop_for(ct, label, fresh["patient_to_template"], template, crop)
    assert np.array_equal(got.ct_bone_min, min_pooled_bone(ct, crop))
    assert reads.inputs(got).shape == (5,) + crop.channels.shape[1:]
    assert np.all(got.ct_bone_min <= got.ct_bone + 1e-6)  # the lowest sample, never above
    assert got.ct_bone_sub is None  # not read by this localiser: not computed
    fine = FractureLocaliser(None, {"decision": {}, "channels": ["ct", "fibula",
                                                                  "ct_bone_sub0"]}, "cpu")
    got = fine.crop_for(ct, label, fresh["patient_to_template"], template,
                        crop_syndesmosis(ct, label, fresh["patient_to_template"], template))
    assert np.array_equal(got.ct_bone_sub, sub_sampled_bone(ct, crop))
    assert fine.inputs(got).shape == (6,) + crop.channels.shape[1:]


def test_grid_phases_read_the_box_moved_by_a_fraction_of_a_voxel_and_map_back() -> None:
    """plans.json ``inference.phases_mm``: the box is cropped again with its grid moved by
    the offset; moved back, a CT ramp reads as on the box's own grid, and a localiser with a
    zero offset gives its own map; a 0.5 mm gap half-way between the box's sample planes is
    missed by the box's samples and read by the phase's."""
    import dataclasses

    import torch

    from AnkleFractureLib.crop.syndesmosis import crop_syndesmosis
    from AnkleFractureLib.errors import InputError
    from AnkleFractureLib.fracture.localise import FractureLocaliser
    from AnkleFractureLib.fracture.model_io import default_plans
    from AnkleFractureLib.fracture.network import build_localiser
    from AnkleFractureLib.fracture.phases import back_on_grid
    from AnkleFractureLib.registration import load_template
    from AnkleFractureLib.registration.template import SyndesmosisBox

    template = load_template()
    box = SyndesmosisBox(np.zeros(3), np.eye(3), np.array([36.0, 36.0, 24.0]),
                         np.array([1.5, 1.5, 1.5]))
    small = dataclasses.replace(template, box=box)
    z = np.arange(60, dtype=np.float32)[:, None, None] * 0.5 - 14.75   # 0.5 mm planes
    arr = np.broadcast_to(40.0 * z + 500.0, (60, 90, 90)).astype(np.float32).copy()
    ct = Volume(arr, (0.5, 0.5, 0.5), (-22.25, -22.25, -14.75), np.eye(3))
    lab = ct.with_array(np.zeros(arr.shape, np.uint8))
    lab.array[:, 40:50, 40:50] = 2  # a fibula for the window
    torch.manual_seed(0)
    plans = default_plans([4, 4, 8, 8, 8, 4])
    net = build_localiser(plans["network"]).eval()
    phased = FractureLocaliser(net, {**plans, "inference": {"phases_mm": [[0.0, 0.0, 0.75]]}},
                               "cpu")
    crop = crop_syndesmosis(ct, lab, np.eye(4), small)
    got = phased.crop_for(ct, lab, np.eye(4), small, crop)
    (shift, moved), = got.phases
    assert np.allclose(shift, [0.5, 0.0, 0.0])
    assert np.allclose(moved.grid.origin, np.add(crop.grid.origin, [0.0, 0.0, 0.75]))
    back = back_on_grid(moved.channels[0], shift)
    assert np.allclose(back[1:-1], crop.channels[0][1:-1], atol=1e-4)  # the ramp, realigned
    assert not np.allclose(moved.channels[0], crop.channels[0], atol=1e-3)
    # A zero offset: the combined map is the localiser's own.
    same = FractureLocaliser(net, {**plans, "inference": {"phases_mm": [[0.0, 0.0, 0.0]]}},
                             "cpu")
    own = FractureLocaliser(net, plans, "cpu")
    c0 = same.crop_for(ct, lab, np.eye(4), small, crop)
    assert np.allclose(same._phase_heatmap(c0), own._phase_heatmap(crop), atol=1e-6)
    assert own.crop_for(ct, lab, np.eye(4), small, crop) is crop  # no phases: the crop itself
    with pytest.raises(InputError, match="phases_mm"):
        _ = FractureLocaliser(net, {**plans, "inference": {"phases_mm": [[1.0, 2.0]]}},
                              "cpu").phases_mm
    # The hairline: bone with a 0.5 mm gap at z = 0, the box's planes at -0.75 and +0.75 mm.
    bone = np.full(arr.shape, 1500.0, np.float32)
    bone[29:31] = -100.0  # planes -0.25 and +0.25 mm
    ct2 = ct.with_array(bone)
    hair = phased.crop_for(ct2, lab, np.eye(4), small,
                           crop_syndesmosis(ct2, lab, np.eye(4), small))
    base = hair.channels[0]
    assert base.min() > 0.95 * base.max()  # every sample of the box's grid reads bone
    (_, moved2), = hair.phases
    assert moved2.channels[0].min() < 0.5 * base.min()  # the phase's planes meet the gap
