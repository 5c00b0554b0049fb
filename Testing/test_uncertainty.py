"""Test-time augmentation and the uncertainty summary (classification/uncertainty.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from AnkleFractureLib.classification.uncertainty import (
    AGREEMENT_MIN, CONFIDENCE_MIN, ENTROPY_MAX, UncertaintySummary, summarize_probabilities,
    tta_batch)


def _crop(seed: int = 0) -> np.ndarray:
    """(3, 12, 10, 8): CT in [0, 1] (with exact 0 and 1 voxels), two binary masks."""
    rng = np.random.default_rng(seed)
    x = np.zeros((3, 12, 10, 8), np.float32)
    x[0] = rng.random((12, 10, 8))
    x[0, 0, 0, 0], x[0, -1, -1, -1] = 0.0, 1.0
    x[1, 3:8, 2:6, 2:5] = 1.0
    x[2, 5:11, 5:9, 4:7] = 1.0
    return x


def test_tta_batch_shapes_first_copy_and_value_ranges():
    x = _crop()
    b = tta_batch(x, n=6, seed=3)
    assert b.shape == (6,) + x.shape and b.dtype == np.float32
    np.testing.assert_array_equal(b[0], x)
    # CT jittered and clipped: stays in [0, 1]; masks are only shifted: still exactly binary.
    assert b[:, 0].min() >= 0.0 and b[:, 0].max() <= 1.0
    for c in (1, 2):
        assert set(np.unique(b[:, c]).tolist()) == {0.0, 1.0}
    assert np.all(np.isfinite(b))
    single = tta_batch(x, n=1)
    assert single.shape == (1,) + x.shape
    np.testing.assert_array_equal(single[0], x)


def test_tta_batch_is_deterministic_per_seed():
    x = _crop()
    np.testing.assert_array_equal(tta_batch(x, 5, seed=7), tta_batch(x, 5, seed=7))
    assert not np.array_equal(tta_batch(x, 5, seed=7), tta_batch(x, 5, seed=8))


def _find_shift(moved: np.ndarray, mask: np.ndarray, m: int):
    """The (dz, dy, dx) with |d| <= m that maps ``mask`` onto ``moved`` with edge padding."""
    padded = np.pad(mask, m, mode="edge")
    hits = []
    for dz in range(-m, m + 1):
        for dy in range(-m, m + 1):
            for dx in range(-m, m + 1):
                win = padded[m - dz:m - dz + mask.shape[0], m - dy:m - dy + mask.shape[1],
                             m - dx:m - dx + mask.shape[2]]
                if np.array_equal(win, moved):
                    hits.append((dz, dy, dx))
    return hits


def test_shifts_move_content_without_wrapping_and_jitter_only_the_ct():
    x = _crop()
    b = tta_batch(x, n=8, seed=1, max_shift_vox=2, intensity_jitter=0.0)
    centre0 = np.argwhere(x[1] > 0).mean(axis=0)
    for i in range(1, 8):
        # Copies 1.. are really shifted: the tibia mask centroid moves (the box is away from
        # the borders, so a shift moves it by exactly the shift).
        shift = np.argwhere(b[i, 1] > 0).mean(axis=0) - centre0
        assert np.abs(shift).max() >= 1.0 and np.abs(shift).max() <= 2.0
        np.testing.assert_allclose(shift, np.round(shift))
        # All channels got the same shift; without jitter the CT is shifted only, too.
        s = tuple(int(v) for v in np.round(shift))
        for c in range(3):
            assert s in _find_shift(b[i, c], x[c], 2)

    # Edge replication, not wrap-around: a slab on the top z face grows when shifted down
    # (the edge is replicated) and leaves when shifted up; np.roll would instead bring it in
    # at the bottom face.
    y = np.zeros((1, 6, 4, 4), np.float32)
    y[0, 0] = 1.0  # one-voxel-thick slab at z = 0
    bb = tta_batch(y, n=20, seed=0, max_shift_vox=2, ct_channel=None)
    seen = set()
    for i in range(1, 20):
        dz = {h[0] for h in _find_shift(bb[i, 0], y[0], 2)}
        assert dz, "copy is not an edge-padded shift of the input"
        assert not bb[i, 0, -1].any()     # nothing wrapped round to the bottom face
        covered = int(bb[i, 0].any(axis=(1, 2)).sum())
        if covered > 1:                   # shifted down by covered - 1: top face replicated
            assert bb[i, 0, :covered].all() and covered - 1 in dz
        seen.add(min(covered, 2))
    assert seen == {0, 1, 2}  # up-, un- and down-shifted in z among the copies

    # With jitter: only the CT channel changes beyond the shift; masks never jittered.
    j = tta_batch(x, n=8, seed=1, max_shift_vox=2, intensity_jitter=0.05)
    np.testing.assert_array_equal(j[:, 1:], b[:, 1:])  # same shifts for the same seed
    assert not np.array_equal(j[1:, 0], b[1:, 0])
    diff = np.abs(j[1:, 0] - b[1:, 0])
    assert diff.max() <= 0.1 + 1e-6                     # |x (a - 1) + b| <= 2 * 0.05
    none = tta_batch(x, n=8, seed=1, max_shift_vox=2, intensity_jitter=0.05, ct_channel=None)
    np.testing.assert_array_equal(none, b)


def test_zero_shift_copies_are_only_jittered():
    x = _crop()
    b = tta_batch(x, n=4, seed=0, max_shift_vox=0, intensity_jitter=0.05)
    np.testing.assert_array_equal(b[:, 1:], np.broadcast_to(x[1:], b[:, 1:].shape))
    assert not np.array_equal(b[1, 0], x[0])


@pytest.mark.parametrize("kwargs", [
    {"n": 0}, {"n": 3, "max_shift_vox": -1}, {"n": 3, "intensity_jitter": -0.1},
    {"n": 3, "ct_channel": 3},
])
def test_tta_batch_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        tta_batch(_crop(), **kwargs)


def test_tta_batch_rejects_bad_input():
    with pytest.raises(ValueError, match="C, z, y, x"):
        tta_batch(np.zeros((4, 4, 4), np.float32), 2)
    bad = _crop()
    bad[0, 1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tta_batch(bad, 2)


def test_identical_confident_samples_are_not_unsure():
    s = summarize_probabilities(np.tile([0.05, 0.85, 0.05, 0.05], (5, 1)))
    assert isinstance(s, UncertaintySummary)
    assert s.prediction == 1 and s.confidence == pytest.approx(0.85)
    assert s.mutual_information == pytest.approx(0.0, abs=1e-12)
    assert s.mutual_information >= 0.0
    assert s.std == pytest.approx(0.0, abs=1e-12)
    assert s.agreement == 1.0 and s.n_samples == 5
    assert not s.unsure and s.reasons == []
    np.testing.assert_allclose(s.mean_probabilities, [0.05, 0.85, 0.05, 0.05])


def test_disagreeing_samples_are_unsure_with_reasons():
    samples = np.array([[0.1, 0.9, 0.0, 0.0]] * 3 + [[0.1, 0.0, 0.9, 0.0]] * 2)
    s = summarize_probabilities(samples)
    assert s.prediction == 1
    assert s.agreement == pytest.approx(0.6) and s.agreement < AGREEMENT_MIN
    assert s.unsure
    assert any("shifted copies" in r for r in s.reasons)
    assert s.mutual_information > 0.1
    assert s.std == pytest.approx(np.std([0.9, 0.9, 0.9, 0.0, 0.0]))
    # Low confidence alone also flags it.
    low = summarize_probabilities(np.array([[0.55, 0.45]]))
    assert low.unsure and low.confidence < CONFIDENCE_MIN
    assert any("probability" in r for r in low.reasons)


def test_uniform_has_normalised_entropy_one():
    for k in (2, 4):
        s = summarize_probabilities(np.full((3, k), 1.0 / k))
        assert s.entropy == pytest.approx(1.0)
        assert s.entropy > ENTROPY_MAX and s.unsure
        assert len(s.reasons) == 2  # low confidence and high entropy; the copies agree
        assert s.agreement == 1.0


def test_hand_computed_two_sample_example():
    s = summarize_probabilities(np.array([[0.9, 0.1], [0.5, 0.5]]))
    h = lambda *p: -sum(q * math.log(q) for q in p)  # noqa: E731
    h_mean = h(0.7, 0.3)
    assert s.entropy == pytest.approx(h_mean / math.log(2))
    assert s.mutual_information == pytest.approx(h_mean - (h(0.9, 0.1) + h(0.5, 0.5)) / 2)
    assert s.prediction == 0 and s.confidence == pytest.approx(0.7)
    assert s.std == pytest.approx(0.2)
    # Copy 2 is a tie: argmax picks class 0, which agrees with the prediction.
    assert s.agreement == 1.0


def test_single_sample_and_zero_probabilities():
    s = summarize_probabilities(np.array([[1.0, 0.0, 0.0, 0.0]]))
    assert s.n_samples == 1 and s.agreement == 1.0
    assert s.mutual_information == 0.0 and s.std == 0.0
    assert s.entropy == 0.0 and not s.unsure
    # float32 softmax rows that sum to 1 within rounding are accepted and renormalised.
    p = np.array([[0.2, 0.3, 0.5 + 2e-4]], np.float32)
    assert summarize_probabilities(p).mean_probabilities.sum() == pytest.approx(1.0)


def test_to_json_is_plain():
    s = summarize_probabilities(np.array([[0.5, 0.5], [0.6, 0.4]]))
    d = s.to_json()
    assert json.loads(json.dumps(d)) == d
    assert isinstance(d["mean_probabilities"], list)
    assert all(type(v) is float for v in d["mean_probabilities"])
    assert type(d["unsure"]) is bool and type(d["prediction"]) is int
    assert d["unsure"] and all(isinstance(r, str) for r in d["reasons"])


@pytest.mark.parametrize("bad", [
    np.array([0.5, 0.5]),                      # 1D
    np.zeros((0, 2)),                          # no samples
    np.array([[1.0], [1.0]]),                  # K = 1
    np.array([[0.5, np.nan]]),                 # not finite
    np.array([[0.6, 0.6]]),                    # row sums to 1.2
    np.array([[1.2, -0.2]]),                   # negative
    np.array([[[0.5, 0.5]]]),                  # 3D
])
def test_summarize_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        summarize_probabilities(bad)
