"""Casts and splints on real-shape phantoms (``generate_case(..., cast=P)``, ``--cast P``)."""

from __future__ import annotations

import argparse
from dataclasses import asdict

import numpy as np
import pytest


def test_cast_probability_keeps_every_other_draw():
    from AnkleFractureLib.phantom.real_render import CAST_PROBABILITY, sample_appearance

    for seed in range(20):
        default = asdict(sample_appearance(np.random.default_rng(seed), True))
        same = asdict(sample_appearance(np.random.default_rng(seed), True, None,
                                        CAST_PROBABILITY))
        always = asdict(sample_appearance(np.random.default_rng(seed), True, None, 1.0))
        never = asdict(sample_appearance(np.random.default_rng(seed), True, None, 0.0))
        assert same == default
        assert always["cast"] in ("cast", "splint") and never["cast"] == "none"
        # The kernel and the hardware are drawn before the cast: they never change.
        for look in (always, never):
            assert look["kernel"] == default["kernel"] and look["metal"] == default["metal"]


def test_phantom_cast_is_drawn_outside_the_bones():
    from AnkleFractureLib.phantom.generator import check_cast, generate_case

    worn = generate_case(3, weber="B", side="right", family="vh", fractures="varied", cast=1.0)
    bare = generate_case(3, weber="B", side="right", family="vh", fractures="varied", cast=0.0)
    assert worn.info["appearance"]["cast"] in ("cast", "splint")
    assert worn.info["cast_probability"] == 1.0
    assert bare.info["appearance"]["cast"] == "none"
    # The bones and the fracture do not depend on the cast.
    assert np.array_equal(worn.label.array, bare.label.array)
    assert worn.info["fracture"] == bare.info["fracture"]
    # The cast (150-700 HU) lies in what is air without it, and is never labelled.
    hu = worn.info["appearance"]["cast_hu"]
    added = (bare.ct.array < -500) & (worn.ct.array > 0.5 * hu)
    assert added.sum() > 1000
    assert not np.any(worn.label.array[added])
    with pytest.raises(ValueError, match="cast must be a probability"):
        check_cast(-0.1)


@pytest.mark.parametrize("option, value", [("--cast", "2"), ("--metal", "1.5")])
def test_phantom_cli_rejects_a_bad_cast_or_metal_probability(tmp_path, option, value):
    from AnkleFractureLib.cli import phantom_cmd

    parser = argparse.ArgumentParser(prog="ankle-fracture")
    phantom_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["phantom", "--out", str(tmp_path / "d"), option, value])
    with pytest.raises(SystemExit, match=f"{option} must be in"):
        args.func(args)
    assert not (tmp_path / "d").exists()
