"""Fixation hardware on training patches (training/seg_hardware.py) and metal phantoms."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from AnkleFractureLib.training.seg_hardware import add_hardware, draw_hardware
from AnkleFractureLib.training.seg_randomise import (COMPONENTS, draw_randomisation,
                                                     randomise_config, randomise_patch)

FULL = randomise_config("full")


def leg_patch(n: int = 64):
    """Normalised-unit patch (z, y, x): soft tissue, a tibia (label 1) and a fibula (2)."""
    _, y, x = np.meshgrid(*[np.arange(n, dtype=float) for _ in range(3)], indexing="ij")
    img = np.full((n, n, n), 1040.0 / 3000.0, np.float32)  # 40 HU in the [-1000, 2000] window
    lab = np.zeros((n, n, n), np.uint8)
    tib, fib = np.hypot(y - 32, x - 40) < 11, np.hypot(y - 34, x - 14) < 5
    img[tib | fib] = 2500.0 / 3000.0  # 1500 HU
    lab[tib], lab[fib] = 1, 2
    return img, lab


def params(seed: int = 0, **kw):
    p = draw_hardware(np.random.default_rng(seed), 1.0, (64, 64, 64))
    p.update(kw)
    return p


def test_plate_lies_on_the_chosen_bone_and_screws_cross_it():
    img, lab = leg_patch()
    out = add_hardware(img.copy(), lab, **params(0, prefer_fibula=True, gap=1.0,
                                                 streak_amplitude=0.0))
    metal = out > 0.93
    fib, tib = lab == 2, lab == 1
    outside = metal & (lab == 0)
    assert outside.sum() > 300  # the plate (and screw tips) outside the bones
    # The plate touches the fibula: within gap + a voxel of it, not of the tibia.
    d_fib = ndimage.distance_transform_edt(~fib)
    d_tib = ndimage.distance_transform_edt(~tib)
    assert np.median(d_fib[outside]) < np.median(d_tib[outside])
    assert (outside & (d_fib <= 2.5)).sum() > 50
    # Screws run through the fibula: metal inside it, on several levels.
    inside = metal & fib
    assert len(np.unique(np.nonzero(inside)[0])) >= 4


def test_labels_kept_no_bone_no_change_and_deterministic():
    img, lab = leg_patch()
    p = params(3)
    a = add_hardware(img.copy(), lab, **p)
    b = add_hardware(img.copy(), lab, **p)
    assert np.array_equal(a, b) and not np.array_equal(a, img)
    empty = np.zeros_like(lab)
    assert np.array_equal(add_hardware(img.copy(), empty, **p), img)
    # Through the randomiser: the image changes, the label does not.
    out, out_lab = randomise_patch(img, lab, np.random.default_rng(1), FULL.only("hardware"))
    assert np.array_equal(out_lab, lab) and (out > 0.93).sum() > (img > 0.93).sum()
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_tibia_plate_when_no_fibula_and_streaks_darken_and_brighten():
    img, lab = leg_patch()
    lab[lab == 2] = 0
    out = add_hardware(img.copy(), lab, **params(5, prefer_fibula=True,
                                                 streak_amplitude=0.2))
    diff = out - img
    assert diff.min() < -0.05 and diff.max() > 0.5  # dark streaks, bright metal
    assert ((out > 0.93) & (lab == 1)).any()


def test_off_in_the_presets_and_appending_it_keeps_the_other_draws():
    assert FULL.p_hardware == 0.0 and randomise_config("light").p_hardware == 0.0
    assert COMPONENTS[-1] == "hardware"
    img, _ = leg_patch()
    on = dataclasses.replace(FULL, p_hardware=1.0)
    a = draw_randomisation(np.random.default_rng(7), FULL, img.shape)
    b = draw_randomisation(np.random.default_rng(7), on, img.shape)
    assert "hardware" not in a and "hardware" in b
    assert all(a[k] == b[k] for k in a)


def test_train_seg_hardware_flag_needs_randomisation():
    from AnkleFractureLib.cli import train_seg_cmd
    from AnkleFractureLib.errors import InputError

    parser = argparse.ArgumentParser(prog="ankle-fracture")
    train_seg_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["train-seg", "d", "--out", "m", "--randomise", "full",
                              "--hardware", "0.3"])
    cfg = train_seg_cmd._randomise(args)
    assert cfg.p_hardware == 0.3 and cfg.level == "full+hardware" and cfg.p_remap == FULL.p_remap
    plain = parser.parse_args(["train-seg", "d", "--out", "m", "--randomise", "full"])
    assert train_seg_cmd._randomise(plain) == "full"
    for bad in (["--hardware", "0.3"], ["--randomise", "full", "--hardware", "2"]):
        with pytest.raises(InputError, match="--hardware"):
            train_seg_cmd._randomise(parser.parse_args(["train-seg", "d", "--out", "m", *bad]))


# ------------------------------------------------------------------------ metal phantoms
def test_phantom_metal_probability():
    from AnkleFractureLib.phantom.generator import check_metal, generate_case

    always = generate_case(2, weber="C", side="left", family="vh", fractures="varied",
                           metal=1.0)
    assert always.info["appearance"]["metal"] in ("plate", "screws")
    assert always.info["metal_probability"] == 1.0
    assert (always.ct.array >= 2500).sum() > 50
    never = generate_case(2, weber="C", side="left", family="vh", fractures="varied",
                          metal=0.0)
    assert never.info["appearance"]["metal"] == "none" and (never.ct.array >= 2900).sum() == 0
    # The bones and the fracture do not depend on the hardware draw.
    assert np.array_equal(always.label.array, never.label.array)
    assert always.info["fracture"] == never.info["fracture"]
    with pytest.raises(ValueError, match="metal must be a probability"):
        check_metal(1.5)
