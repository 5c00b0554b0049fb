"""Which localiser lines can be a fibular fracture: lines that cut the fibula, not lines at the
scan's edge or next to metal; the crop's in-scan and metal masks; the found rule refitted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from AnkleFractureLib.fracture.localise import (cut_fraction, drop_touching, ignored_zones,
                                                strongest_line)
from AnkleFractureLib.geometry.volume import Volume


def _fibula_and_lines():
    """A fibula column (z 10-59) with a tip at z 10; a line crossing it at z 35 (60 voxels),
    and a larger blob hugging the tip's outer surface (z 8-14, beside and below the bone)."""
    fib = np.zeros((60, 20, 20), bool)
    fib[10:, 6:12, 6:12] = True
    prob = np.zeros(fib.shape, np.float32)
    prob[35:37, 5:13, 5:13] = 0.95  # crossing line: cuts the bone below it off
    prob[6:16, 12:15, 4:14] = 0.99  # surface of the tip (a joint, a screw): shaves the bone
    prob[6:10, 4:14, 4:14] = 0.99
    return fib, prob


def test_cut_fraction_tells_a_crossing_line_from_a_shaving_one() -> None:
    fib, prob = _fibula_and_lines()
    crossing = np.zeros_like(fib)
    crossing[35:37] = prob[35:37] > 0.5
    shaving = (prob > 0.5) & ~crossing
    assert cut_fraction(fib, crossing) == pytest.approx(1.0)
    assert cut_fraction(fib, shaving) < 0.1
    # nothing below the line (the tip itself), or no fibula at all: no cut
    tip = np.zeros_like(fib)
    tip[10:12, 5:13, 5:13] = True
    assert cut_fraction(fib, tip) == 0.0
    assert cut_fraction(np.zeros_like(fib), crossing) == 0.0
    # a line that reaches the crop's last slice cannot be tested: it is not rejected
    top = np.zeros_like(fib)
    top[57:60, 5:13, 5:13] = True
    assert cut_fraction(fib, top) == 1.0


def test_strongest_line_with_a_cut_rule_skips_the_larger_shaving_blob() -> None:
    fib, prob = _fibula_and_lines()
    big, _ = strongest_line(prob, 0.5)
    assert big[8].any() and not big[35].any()  # size alone: the blob wins
    mask, peak = strongest_line(prob, 0.5, fib, min_cut=0.5)
    assert mask[35].any() and not mask[8].any() and peak == pytest.approx(0.95)
    none, _ = strongest_line(np.where(mask, 0.0, prob), 0.5, fib, min_cut=0.5)
    assert not none.any()  # only the shaving blob left: no candidate


def test_lines_at_the_scan_edge_are_dropped_and_metal_voxels_masked() -> None:
    in_scan = np.ones((40, 10, 10), bool)
    in_scan[30:] = False  # the scan ends at slice 30
    metal = np.zeros_like(in_scan)
    metal[10, 4:6, 4:6] = True
    zones = ignored_zones(in_scan, metal, 1.5)
    prob = np.zeros(in_scan.shape, np.float32)
    prob[24:29, 2:8, 2:8] = 0.9  # reaches within 4.5 mm of the edge: the bone's cut face
    prob[15, 2:8, 2:8] = 0.9     # a line well inside the scan
    dropped = drop_touching(prob, 0.5, zones["scan_edge"])
    assert dropped == 5 * 36
    assert not prob[24:29].any() and np.allclose(prob[15, 2:8, 2:8], 0.9)
    assert zones["metal"][10, 4, 4] and zones["metal"][12, 4, 4] and not zones["metal"][14, 4, 4]
    # a crop wholly inside the scan, without metal: nothing to ignore
    assert ignored_zones(np.ones((5, 5, 5), bool), np.zeros((5, 5, 5), bool), 1.5) == {}
    assert ignored_zones(None, None, 1.5) == {}


def test_crop_knows_where_the_scan_ends_and_where_metal_is() -> None:
    """A CT that ends 20 mm above the plafond, with a 3000 HU screw: the crop's in-scan mask
    ends there and its metal mask holds the screw, both on the crop grid."""
    from AnkleFractureLib.crop.syndesmosis import crop_syndesmosis
    from AnkleFractureLib.registration.template import load_template

    template = load_template()
    arr = np.full((40, 120, 140), -50.0, np.float32)  # z from -40 to +39 mm (1 mm), soft tissue
    arr[30:33, 50:54, 40:44] = 3000.0  # a screw at z -10..-8 mm
    ct = Volume(arr, (1.0, 1.0, 1.0), (-70.0, -60.0, -40.0), np.eye(3))
    crop = crop_syndesmosis(ct, None, np.eye(4), template)
    nz = crop.channels.shape[1]
    z_mm = crop.grid.origin[2] + crop.grid.spacing[2] * np.arange(nz)
    assert crop.in_scan.shape == crop.channels.shape[1:]
    assert crop.in_scan[z_mm < -1.0].any() and not crop.in_scan[z_mm > 0.5].any()
    assert crop.coverage == pytest.approx(float(crop.in_scan.mean()))
    kk = np.nonzero(crop.metal)[0]
    assert kk.size > 0 and np.all(np.abs(z_mm[kk] + 9.0) < 3.0)


def test_refit_decision_records_the_new_rule_and_keeps_the_training_record(tmp_path,
                                                                             monkeypatch):
    from test_fracture_localise import _line_samples

    from AnkleFractureLib.training import fracture_train as ft

    monkeypatch.setattr(ft, "load_samples", lambda paths: _line_samples(6))
    cfg = ft.FractureTrainConfig(steps=4, batch_size=2, eval_every=2, val_fraction=0.34,
                                 seed=5, threads=1, device="cpu", features=(4, 4, 8, 8, 8, 4))
    ft.train_localiser([], tmp_path, cfg, command="train")
    before = json.loads((tmp_path / "training.json").read_text())
    fit = ft.refit_decision(tmp_path, [], command="refit", device="cpu", cut_rule=True)
    after = json.loads((tmp_path / "training.json").read_text())
    plans = json.loads((tmp_path / "plans.json").read_text())
    assert set(fit) >= {"found_threshold", "min_voxels", "min_cut", "found_rate"}
    assert plans["decision"]["min_cut"] == fit["min_cut"] in ft.DECISION_GRID["min_cut"]
    assert after["command"] == before["command"] == "train"
    assert after["decision_refit"]["command"] == "refit"
    assert after["decision_refit"]["previous"]["min_voxels"] == before["decision_fit"]["min_voxels"]
    # without the cut rule the fit never turns it on
    assert ft.refit_decision(tmp_path, [], device="cpu")["min_cut"] == 0.0
