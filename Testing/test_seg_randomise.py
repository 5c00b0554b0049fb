"""Domain randomisation of segmentation training patches (training/seg_randomise.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest

from AnkleFractureLib.segmentation.plans import SegPlans
from AnkleFractureLib.training.seg_data import PatchSampler, PreparedCase
from AnkleFractureLib.training.seg_randomise import (COMPONENTS, CORTICAL_MARGIN_HU,
                                                     DomainRandomiser, RandomiseConfig,
                                                     add_noise, adjust_gamma, apply_randomisation,
                                                     draw_randomisation, hu_to_unit,
                                                     randomise_config, randomise_patch,
                                                     truncate_fov)

WINDOW = (-1000.0, 2000.0)
FULL = randomise_config("full")


def toy_patch(n: int = 48) -> Tuple[np.ndarray, np.ndarray]:
    """A leg-like patch in normalised units: air, a fat ring, muscle, a tibia (1.5 mm
    1500 HU cortex around 300 HU cancellous bone, ending with a cortical plate at z = n / 4)
    and a small fibula; labels 1 and 2."""
    z, y, x = np.meshgrid(*[np.arange(n, dtype=float) for _ in range(3)], indexing="ij")
    c = (n - 1) / 2.0
    r_leg = np.hypot(y - c, x - c)
    r_tib = np.hypot(y - c, x - c - 4)
    r_fib = np.hypot(y - c, x - c + 12)
    hu = np.full((n, n, n), -1000.0)
    hu[r_leg < 0.45 * n] = -100.0
    hu[r_leg < 0.40 * n] = 40.0
    hu[r_tib < 9] = 1500.0
    hu[r_tib < 7.5] = 300.0
    hu[(r_tib < 9) & (z < n // 4)] = 40.0
    hu[(r_tib < 9) & ((z == n // 4) | (z == n // 4 + 1))] = 1500.0
    hu[r_fib < 3.5] = 1500.0
    hu[r_fib < 2.0] = 300.0
    label = np.zeros((n, n, n), np.uint8)
    label[(r_tib < 9) & (z >= n // 4)] = 1
    label[r_fib < 3.5] = 2
    return hu_to_unit(hu, WINDOW).astype(np.float32), label


def run(cfg: RandomiseConfig, seed: int, image=None, label=None):
    img, lab = toy_patch() if image is None else (image, label)
    return randomise_patch(img, lab, np.random.default_rng(seed), cfg)


# ---------------------------------------------------------------------------- config, seeds
def test_same_seed_same_patch_and_different_seeds_differ():
    img, lab = toy_patch()
    a = randomise_patch(img, lab, np.random.default_rng(11), FULL)
    b = randomise_patch(img, lab, np.random.default_rng(11), FULL)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    outs = [randomise_patch(img, lab, np.random.default_rng(s), FULL)[0] for s in range(6)]
    assert len({o.tobytes() for o in outs}) == 6
    r1, r2 = DomainRandomiser("full", seed=4), DomainRandomiser("full", seed=4)
    assert all(np.array_equal(r1(img, lab)[0], r2(img, lab)[0]) for _ in range(3))


def test_off_draws_nothing_and_changes_nothing():
    img, lab = toy_patch()
    assert randomise_config("off") is None and randomise_config(None) is None
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    out, out_lab = randomise_patch(img, lab, rng, None)
    assert out is img and out_lab is lab and rng.bit_generator.state == state
    # All probabilities 0: only the clip to [0, 1] (the toy is inside it already).
    out, out_lab = run(RandomiseConfig.none(), 0, img, lab)
    assert np.array_equal(out, img) and np.array_equal(out_lab, lab)


def test_one_component_does_not_shift_the_others():
    # Every component draws from its own child generator: switching one off leaves the rest.
    img, lab = toy_patch()
    rng_state = 5
    everything = FULL.only("remap", **{f"p_{c}": 1.0 for c in COMPONENTS}, p_corr_noise=1.0)
    a = draw_randomisation(np.random.default_rng(rng_state), everything, img.shape)
    b = draw_randomisation(np.random.default_rng(rng_state),
                           RandomiseConfig(**{**everything.__dict__, "p_blobs": 0.0}), img.shape)
    assert set(a) == set(COMPONENTS) and set(b) == set(COMPONENTS) - {"blobs"}
    assert all(a[k] == b[k] for k in b)


def test_config_presets_json_and_errors():
    light, full = randomise_config("light"), randomise_config("full")
    assert light.level == "light" and full.level == "full" and light.strength < full.strength
    assert RandomiseConfig.from_json(json.loads(json.dumps(full.to_json()))) == full
    plans = SegPlans(model_spacing_mm=(2.0, 2.0, 3.0), hu_window=(-1024.0, 3071.0))
    on_plans = randomise_config("full", plans)
    assert on_plans.spacing_mm == (2.0, 2.0, 3.0) and on_plans.hu_window == (-1024.0, 3071.0)
    with pytest.raises(ValueError, match="randomise must be one of"):
        randomise_config("strong")
    with pytest.raises(ValueError):
        RandomiseConfig(p_noise=1.5)
    with pytest.raises(ValueError):
        FULL.only("sparkles")


# --------------------------------------------------------------------- intensity components
@pytest.mark.parametrize("component", [c for c in COMPONENTS if c != "fov"])
def test_intensity_components_change_the_image_not_the_labels(component):
    img, lab = toy_patch()
    for seed in range(3):
        out, out_lab = run(FULL.only(component), seed, img, lab)
        assert out.shape == img.shape and out.dtype == np.float32
        assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
        assert np.array_equal(out_lab, lab) and out_lab.dtype == np.uint8
        changed = np.abs(out - img)
        # Blobs and streaks are local, thick slices change only edges across z; everything
        # else moves the whole patch.
        assert changed.max() > 0.01, (component, seed)
        if component not in ("blobs", "streaks", "lowres"):
            assert np.mean(changed > 1e-3) > 0.05, (component, seed)


def _value_at(out: np.ndarray, img: np.ndarray, hu: float) -> np.ndarray:
    return out[np.isclose(img, hu_to_unit(hu, WINDOW), atol=1e-4)]


def test_remap_sets_each_tissue_to_its_target_and_keeps_cortex_above_soft_tissue():
    img, lab = toy_patch()
    for nonmonotone in (0.0, 1.0):
        cfg = FULL.only("remap", p_nonmonotone=nonmonotone)
        spread = []
        for seed in range(25):
            params = draw_randomisation(np.random.default_rng(seed), cfg, img.shape)["remap"]
            out, _ = apply_randomisation(img, lab, {"remap": params}, cfg)
            t = dict(zip(params["knots_hu"], params["targets_hu"]))
            for hu in (-100.0, 40.0, 300.0, 1500.0):
                got = _value_at(out, img, hu)
                assert np.allclose(got, hu_to_unit(t[hu], WINDOW), atol=1e-3), (seed, hu)
            assert np.allclose(_value_at(out, img, -1000.0), 0.0, atol=1e-3)  # air stays air
            assert t[1500.0] >= max(t[-100.0], t[40.0]) + CORTICAL_MARGIN_HU - 1e-6
            if params["monotone"]:
                assert np.all(np.diff(params["targets_hu"]) >= 0)
            spread.append(t[300.0] - t[40.0])
        # Monotone: cancellous bone never darker than soft tissue; non-monotone: sometimes.
        assert (min(spread) < 0) == bool(nonmonotone), spread


def test_remap_strength_scales_the_change():
    img, lab = toy_patch()
    diffs = {}
    for s in (0.0, 0.5, 1.0):
        cfg = FULL.only("remap", strength=s)
        diffs[s] = np.mean([np.abs(run(cfg, k, img, lab)[0] - img).mean() for k in range(10)])
    assert diffs[0.0] < 1e-3 < diffs[0.5] < diffs[1.0]


def test_bias_field_is_smooth_multiplicative_and_moderate():
    img, lab = toy_patch()
    for seed in range(5):
        out, _ = run(FULL.only("bias"), seed, img, lab)
        inside = img > 0.1
        log_ratio = np.log(out[inside] / img[inside])
        # Coefficients up to 0.05 on 20 Legendre terms: a field of roughly +-10-40 %.
        assert 0.005 < log_ratio.std() < 0.3 and np.abs(log_ratio).max() < 1.0
        assert np.all(out[img == 0] == 0)  # air (0 attenuation above air) stays air


def test_slice_thickness_acts_along_z_only():
    img = np.zeros((32, 16, 16), np.float32)
    img[:, :, 8:] = 0.6  # varies along x only
    lab = np.zeros(img.shape, np.uint8)
    cfg = FULL.only("lowres")
    out, _ = run(cfg, 1, img, lab)
    assert np.allclose(out, img, atol=1e-5)
    img_z = np.zeros((32, 16, 16), np.float32)
    img_z[16:] = 0.6  # an edge along z
    params = draw_randomisation(np.random.default_rng(1), cfg, img_z.shape)
    out, _ = apply_randomisation(img_z, lab, params, cfg)
    assert 1.5 <= params["lowres"]["thickness_mm"] <= 3.0
    assert np.sum((out > 0.05) & (out < 0.55)) > 0  # the edge is no longer a step
    assert abs(out.mean() - img_z.mean()) < 0.02  # averaging keeps the mean


def test_noise_has_the_drawn_sd_and_correlated_noise_is_correlated():
    flat = np.full((48, 48, 48), 0.4, np.float32)
    white = add_noise(flat.copy(), 0.02, 0.0, seed=1) - 0.4
    corr = add_noise(flat.copy(), 0.0, 0.02, seed=1) - 0.4
    for noise in (white, corr):
        assert abs(noise.std() - 0.02) < 0.002
    def neighbour_corr(a):
        return np.corrcoef(a[:, :, :-1].ravel(), a[:, :, 1:].ravel())[0, 1]
    assert abs(neighbour_corr(white)) < 0.05 and neighbour_corr(corr) > 0.5
    # Through the config: sd within the documented range at full strength.
    params = draw_randomisation(np.random.default_rng(0), FULL.only("noise"), flat.shape)
    assert 0.003 <= params["noise"]["white_sd"] <= 0.033
    assert 0.003 <= params["noise"]["corr_sd"] <= 0.023


def test_blur_softens_and_sharpen_overshoots_an_edge():
    img = np.zeros((24, 24, 24), np.float32)
    img[:, :, 12:] = 0.6
    lab = np.zeros(img.shape, np.uint8)
    blurred, _ = run(FULL.only("blur"), 0, img, lab)
    assert blurred[12, 12, 11] > 0.01 and blurred[12, 12, 12] < 0.59
    assert np.allclose(blurred[:, :, :4], 0, atol=1e-4)  # far from the edge: unchanged
    sharp, _ = run(FULL.only("sharpen"), 0, img + 0.2, lab)
    # The over- and undershoot of a sharp kernel at the edge.
    assert sharp[12, 12, 12] > 0.8 + 0.01 and sharp[12, 12, 11] < 0.2 - 0.01


def test_gamma_is_monai_adjust_contrast():
    img, lab = toy_patch()
    cfg = FULL.only("gamma")
    params = draw_randomisation(np.random.default_rng(3), cfg, img.shape)
    out, _ = apply_randomisation(img, lab, params, cfg)
    g = params["gamma"]["gamma"]
    assert 0.66 < g < 1.5 and abs(np.log(g)) > 1e-3
    lo, hi = img.min(), img.max()
    expected = ((img - lo) / (hi - lo + 1e-7)) ** g * (hi - lo) + lo
    assert np.allclose(out, expected, atol=1e-5)
    assert np.allclose(adjust_gamma(img, 1.0), img, atol=1e-6)


def test_blobs_and_streaks_are_local_and_bright():
    img, lab = toy_patch()
    cfg = FULL.only("blobs")
    params = draw_randomisation(np.random.default_rng(2), cfg, img.shape)["blobs"]
    out, _ = apply_randomisation(img, lab, {"blobs": params}, cfg)
    for c, v in zip(params["centres"], params["values"]):
        i = tuple(min(int(round(ci)), n - 1) for ci, n in zip(c, img.shape))
        assert out[i] >= min(v, img[i]) - 0.35  # soft-edged sphere of radius >= 0.7 voxel
    assert out.max() >= 0.8 and np.mean(out != img) < 0.02
    cfg = FULL.only("streaks")
    params = draw_randomisation(np.random.default_rng(4), cfg, img.shape)["streaks"]
    out, _ = apply_randomisation(img, lab, {"streaks": params}, cfg)
    far = np.abs(np.arange(img.shape[0]) - params["z_centre"]) > 3 * params["z_half"] + 1
    assert np.array_equal(out[far], img[far]) and not np.array_equal(out, img)


# ----------------------------------------------------------------------------- field of view
def test_fov_slab_cuts_image_and_label_alike():
    img, lab = toy_patch()
    out, out_lab = truncate_fov(img.copy(), lab.copy(), "slab", axis=0, side="high", depth=10)
    assert np.all(out[-10:] == 0) and np.all(out_lab[-10:] == 0)
    assert np.array_equal(out[:-10], img[:-10]) and np.array_equal(out_lab[:-10], lab[:-10])
    out, out_lab = truncate_fov(img.copy(), lab.copy(), "slab", axis=2, side="low", depth=30)
    assert np.all(out[:, :, :30] == 0) and np.all(out_lab[:, :, :30] == 0)
    assert (lab[:, :, :30] > 0).any() and (out_lab > 0).any()  # a bone cut by the edge
    out, out_lab = truncate_fov(img.copy(), lab.copy(), "circle", centre_yx=(0.0, 0.0),
                                radius=30.0)
    yy, xx = np.meshgrid(np.arange(48), np.arange(48), indexing="ij")
    outside = yy ** 2 + xx ** 2 > 900
    assert np.all(out[:, outside] == 0) and np.all(out_lab[:, outside] == 0)
    assert np.array_equal(out[:, ~outside], img[:, ~outside])


def test_fov_draws_keep_labels_consistent_with_the_image():
    img, lab = toy_patch()
    cfg = FULL.only("fov")
    kinds, n_cut, n_bone_cut = set(), 0, 0
    for seed in range(30):
        params = draw_randomisation(np.random.default_rng(seed), cfg, img.shape)
        kinds.add(params["fov"]["kind"])
        out, out_lab = apply_randomisation(img, lab, params, cfg)
        cut = (out == 0) & (img > 0)  # a cut may fall in air only: nothing to see then
        n_cut += bool(cut.any())
        n_bone_cut += bool((cut & (lab > 0)).any())
        assert np.all(out_lab[cut] == 0)
        # Outside the cut the label is untouched (air voxels keep their label 0 anyway).
        kept = out == img
        assert np.array_equal(out_lab[kept], lab[kept])
    assert kinds == {"slab", "circle"} and n_cut >= 25 and n_bone_cut >= 10, (n_cut, n_bone_cut)


# ------------------------------------------------------------------------------- presets
def test_full_and_light_presets_stay_in_range_and_light_is_milder():
    img, lab = toy_patch()
    change = {}
    for level in ("light", "full"):
        cfg = randomise_config(level)
        diffs = []
        for seed in range(20):
            out, out_lab = run(cfg, seed, img, lab)
            assert np.isfinite(out).all() and 0.0 <= out.min() and out.max() <= 1.0
            assert set(np.unique(out_lab)) <= {0, 1, 2}
            assert np.all(out_lab <= lab)  # labels only ever cut (to 0), never added
            diffs.append(np.abs(out - img).mean())
        change[level] = np.mean(diffs)
    assert 0.0 < change["light"] < change["full"]


# ------------------------------------------------------------------------------- training
def test_patch_sampler_randomises_after_the_usual_draws():
    img, lab = toy_patch(40)
    case = PreparedCase("toy", img, lab, (1.0, 1.0, 1.0))
    plain = PatchSampler([case], (24, 24, 24), seed=3)
    rand = PatchSampler([case], (24, 24, 24), seed=3, randomise=FULL)
    rand2 = PatchSampler([case], (24, 24, 24), seed=3, randomise=FULL)
    a, b, c = plain.batch(0, 1), rand.batch(0, 1), rand2.batch(0, 1)
    assert np.array_equal(b[0], c[0]) and np.array_equal(b[1], c[1])
    assert not np.array_equal(a[0], b[0])
    # The first patch's spatial draws are those of the plain sampler: its labels agree except
    # where a field-of-view cut removed bone.
    assert np.all((b[1] == a[1]) | (b[1] == 0))
    assert b[0].min() >= 0.0 and b[0].max() <= 1.0


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from AnkleFractureLib.phantom.dataset_writer import write_phantom_dataset

    root = tmp_path_factory.mktemp("rand_phantoms")
    write_phantom_dataset(root, 3, seed=5)
    return root


def test_tiny_training_runs_with_randomisation_and_resumes_with_it(phantoms, tmp_path):
    from test_seg_training import FAST

    from AnkleFractureLib.training.seg_train import train_segmentation

    cache = tmp_path / "cache"
    plain = train_segmentation(phantoms, tmp_path / "plain", epochs=1, steps_per_epoch=1,
                               cache_dir=cache, **FAST)
    assert plain["hparams"]["randomise"] == "off"  # the default trains as before
    out = tmp_path / "model"
    s = train_segmentation(phantoms, out, epochs=1, steps_per_epoch=2, cache_dir=cache,
                           randomise="full", **FAST)
    assert s["status"] == "completed" and s["steps_run"] == 2
    assert np.isfinite(s["first_step_loss"])
    rec = json.loads((out / "training.json").read_text())["hparams"]["randomise"]
    assert rec["level"] == "full" and rec["spacing_mm"] == [2.0, 2.0, 2.0]
    notes = []
    fast = dict(FAST, log=notes.append)
    s2 = train_segmentation(phantoms, out, epochs=2, steps_per_epoch=2, cache_dir=cache,
                            resume=True, randomise="off", **fast)
    assert s2["status"] == "completed" and s2["steps_run"] == 4
    assert s2["hparams"]["randomise"]["level"] == "full"
    assert any("randomise=full" in n for n in notes), notes


def test_cli_flag(phantoms, tmp_path):
    from test_seg_training import TINY_PLANS

    from AnkleFractureLib.cli import train_seg_cmd

    parser = argparse.ArgumentParser(prog="ankle-fracture")
    sub = parser.add_subparsers()
    train_seg_cmd.add_parser(sub)
    assert parser.parse_args(["train-seg", "d", "--out", "m"]).randomise is None
    with pytest.raises(SystemExit):
        parser.parse_args(["train-seg", "d", "--out", "m", "--randomise", "strong"])
    assert "--randomise" in sub.choices["train-seg"].format_help()
    plans_file = tmp_path / "plans.json"
    plans_file.write_text(json.dumps(TINY_PLANS.to_json()))
    args = parser.parse_args(["train-seg", str(phantoms), "--out", str(tmp_path / "m"),
                              "--plans", str(plans_file), "--epochs", "1", "--steps-per-epoch",
                              "1", "--device", "cpu", "--threads", "1", "--quiet",
                              "--randomise", "light", "--no-keep-checkpoint"])
    assert args.func(args) == 0
    summary = json.loads((tmp_path / "m" / "training.json").read_text())
    assert summary["hparams"]["randomise"]["level"] == "light"
