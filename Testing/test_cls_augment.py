"""Batched augmentation of classification crops: geometry conventions, intensity, flips,
cutout, determinism."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from AnkleFractureLib.training.cls_augment import (AugmentConfig, AugmentParams,
                                                   apply_augmentation, augment_batch,
                                                   close_masks, sample_params, strong_config,
                                                   weak_config)

IDENTITY = AugmentConfig.identity()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _cube_batch(shape=(24, 16, 20), lo=(9, 5, 7), size=6, channels=3, batch=2) -> torch.Tensor:
    """Zeros with a ``size``^3 cube of ones (all channels) starting at ``lo``."""
    x = torch.zeros(batch, channels, *shape)
    z, y, w = lo
    x[:, :, z:z + size, y:y + size, w:w + size] = 1.0
    return x


def _com(vol: torch.Tensor) -> torch.Tensor:
    """Centre of mass (z, y, x) in voxel indices of a 3D tensor."""
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in vol.shape],
                           indexing="ij")
    v = vol.to(torch.float64)
    return torch.stack([(g * v).sum() / v.sum() for g in grids])


def test_shape_dtype_device_kept():
    for dtype in (torch.float32, torch.float64):
        x = torch.rand(3, 3, 16, 8, 12, dtype=dtype)
        for cfg in (weak_config(), strong_config(), IDENTITY):
            y = augment_batch(x, cfg, torch.Generator().manual_seed(1))
            assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
            assert torch.isfinite(y).all()
    ct_only = torch.rand(2, 1, 8, 8, 8)
    assert augment_batch(ct_only, strong_config()).shape == ct_only.shape
    with pytest.raises(ValueError):
        augment_batch(torch.rand(2, 8, 8, 8), weak_config())
    with pytest.raises(ValueError):
        augment_batch(ct_only, replace(weak_config(), ct_channel=1))


def test_identity_config_is_identity():
    x = torch.rand(4, 3, 12, 10, 8)
    y = augment_batch(x, IDENTITY)
    assert torch.allclose(y, x, atol=1e-5)
    assert y is not x  # a copy, never the input itself
    # The resampling path with an identity-like transform (rotation by 360 degrees) too.
    p = AugmentParams.identity(4)
    p.angles_deg[:, 0] = 360.0
    assert torch.allclose(apply_augmentation(x, p), x, atol=1e-5)


def test_deterministic_with_seeded_generator():
    x = torch.rand(4, 3, 16, 8, 12)
    a = augment_batch(x, strong_config(), torch.Generator().manual_seed(7))
    b = augment_batch(x, strong_config(), torch.Generator().manual_seed(7))
    c = augment_batch(x, strong_config(), torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # Each sample gets its own transform: identical inputs give different outputs.
    same = x[:1].expand(4, -1, -1, -1, -1).contiguous()
    out = augment_batch(same, weak_config(), torch.Generator().manual_seed(3))
    assert not torch.allclose(out[0], out[1])


def test_small_rotation_keeps_masks_in_range_and_mass():
    x = _cube_batch(shape=(24, 24, 24), lo=(8, 8, 8), size=8, batch=4)
    cfg = replace(IDENTITY, rotate_deg=10.0)
    y = augment_batch(x, cfg, torch.Generator().manual_seed(0))
    masks = y[:, 1:]
    assert masks.min() >= 0.0 and masks.max() <= 1.0
    mass_in, mass_out = x[:, 1:].sum(dim=(1, 2, 3, 4)), masks.sum(dim=(1, 2, 3, 4))
    assert torch.allclose(mass_out, mass_in, rtol=0.15)
    assert not torch.allclose(y, x)  # it did rotate


def test_shift_moves_content_towards_higher_indices():
    x = _cube_batch()
    p = AugmentParams.identity(2)
    p.shift_vox[0] = torch.tensor([2.0, -3.0, 1.0])  # content moves by +shift (z, y, x)
    p.shift_vox[1] = torch.tensor([-1.0, 0.0, 4.0])
    y = apply_augmentation(x, p)
    for i in range(2):
        moved = _com(y[i, 1]) - _com(x[i, 1])
        assert torch.allclose(moved, p.shift_vox[i], atol=1e-4), moved
        # An integer shift is exact: the cube is merely moved.
        assert float(y[i, 1].sum()) == pytest.approx(float(x[i, 1].sum()), rel=1e-5)
    # augment_batch draws the same parameters as sample_params from the same seed.
    cfg = replace(IDENTITY, shift_vox=3.0)
    params = sample_params(2, x.shape[2:], cfg, torch.Generator().manual_seed(5))
    out = augment_batch(x, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(out, apply_augmentation(x, params))
    for i in range(2):
        moved = _com(out[i, 1]) - _com(x[i, 1])
        assert torch.allclose(moved, params.shift_vox[i], atol=0.05), (moved, params.shift_vox[i])


def test_rotation_is_in_voxel_space_on_non_cubic_crops():
    # 90 degrees about z turns the (y, x) plane; y and x have different sizes, so a rotation
    # built in normalised coordinates would also stretch the offset by 24 / 16.
    x = torch.zeros(1, 1, 8, 16, 24)
    x[0, 0, 3:5, 9:13, 10:14] = 1.0  # centre (3.5, 10.5, 11.5): offset (0, +3, 0)
    p = AugmentParams.identity(1)
    p.angles_deg[0, 0] = 90.0
    y = apply_augmentation(x, p, ct_channel=None)
    offset = _com(y[0, 0]) - torch.tensor([3.5, 7.5, 11.5], dtype=torch.float64)
    assert torch.allclose(offset.abs(), torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64),
                          atol=1e-4), offset
    assert float(y.sum()) == pytest.approx(float(x.sum()), rel=1e-4)


def test_scale_above_one_magnifies():
    x = _cube_batch(shape=(32, 32, 32), lo=(13, 13, 13), size=6, batch=1)
    p = AugmentParams.identity(1)
    p.scale[0] = 1.5
    y = apply_augmentation(x, p)
    ratio = float(y[0, 1].sum() / x[0, 1].sum())
    assert ratio == pytest.approx(1.5 ** 3, rel=0.15)


def test_ct_stays_in_unit_range_and_masks_are_not_jittered():
    x = torch.rand(6, 3, 12, 10, 8)
    x[:, 1:] = (x[:, 1:] > 0.5).float()
    jitter = replace(IDENTITY, contrast=(0.5, 1.5), brightness=0.3, gamma=(0.8, 1.25),
                     noise_std=0.1)
    y = augment_batch(x, jitter, torch.Generator().manual_seed(0))
    assert y[:, 0].min() >= 0.0 and y[:, 0].max() <= 1.0
    assert not torch.allclose(y[:, 0], x[:, 0])
    assert torch.equal(y[:, 1:], x[:, 1:])  # geometry identity: masks untouched
    s = augment_batch(x, strong_config(), torch.Generator().manual_seed(0))
    assert s.min() >= 0.0 and s.max() <= 1.0
    # No CT channel: intensity jitter is skipped entirely.
    none = augment_batch(x, replace(jitter, ct_channel=None))
    assert torch.equal(none, x)


def test_flip_along_x_mirrors_and_default_never_flips():
    x = torch.zeros(2, 2, 4, 5, 6)
    x[:, :, 1, 2, 0:2] = 1.0    # asymmetric along x
    x[:, :, 2, 1, 4] = 0.5
    cfg = replace(IDENTITY, flip_axes=(2,), flip_prob=1.0)
    y = augment_batch(x, cfg)
    assert torch.equal(y, x.flip(-1))
    assert y[0, 0, 1, 2, 4:].tolist() == [1.0, 1.0] and y[0, 0, 2, 1, 1] == 0.5
    # flip_prob applies per sample: with 0.5 over many samples some flip, some do not.
    many = x[:1].expand(32, -1, -1, -1, -1).contiguous()
    out = augment_batch(many, replace(cfg, flip_prob=0.5), torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, many[0].flip(-1)) for o in out])
    assert 0 < int(flipped.sum()) < 32
    # Registered crops (default flip_axes=()) are never mirrored, whatever flip_prob.
    assert weak_config().flip_axes == () and strong_config().flip_axes == ()
    assert torch.equal(augment_batch(x, replace(IDENTITY, flip_prob=1.0)), x)
    assert weak_config(flip_axes=(2,)).flip_axes == (2,)
    with pytest.raises(ValueError):
        AugmentConfig(flip_axes=(3,))


def test_cutout_zeros_a_box_in_all_channels():
    shape = (16, 12, 20)
    x = torch.ones(4, 3, *shape)
    cfg = replace(IDENTITY, cutout=1)
    params = sample_params(4, shape, cfg, torch.Generator().manual_seed(2))
    y = apply_augmentation(x, params)
    for i in range(4):
        zero = y[i] == 0
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])
        size = params.cutout_size[i, 0]
        assert int(zero[0].sum()) == int(size.prod()) > 0
        assert all(1 <= int(s) <= n // 4 for s, n in zip(size, shape))
        z0, y0, x0 = params.cutout_start[i, 0].tolist()
        dz, dy, dx = size.tolist()
        assert bool(zero[0, z0:z0 + dz, y0:y0 + dy, x0:x0 + dx].all())
    assert int((y == 1).sum()) > 0.9 * x.numel()


def test_realistic_batch_runs():
    x = torch.rand(16, 3, 48, 24, 32)
    for cfg in (weak_config(), strong_config(), weak_config(flip_axes=(2,))):
        y = augment_batch(x, cfg, torch.Generator().manual_seed(0))
        assert y.shape == x.shape and torch.isfinite(y).all()
        assert y.min() >= 0.0 and y.max() <= 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    x = torch.rand(4, 3, 16, 8, 12)
    cfg = replace(weak_config(), noise_std=0.0)
    cpu = augment_batch(x, cfg, torch.Generator().manual_seed(4))
    gpu = augment_batch(x.cuda(), cfg, torch.Generator().manual_seed(4))
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)


def _broken_rod(gap: int, channels: int = 3) -> torch.Tensor:
    """A fibula-like rod (z, 5 x 5 voxels) in the mask channels with a ``gap``-slice hole at
    its middle (a fracture the reference mask leaves empty); the CT channel 0 is random."""
    x = torch.zeros(2, channels, 30, 12, 12)
    x[:, 0] = torch.rand(2, 30, 12, 12)
    x[:, 1:, :, 4:9, 4:9] = 1.0
    x[:, 1:, 15:15 + gap] = 0.0
    return x


@pytest.mark.parametrize("radius, gap, bridged", [(1, 2, True), (2, 4, True), (1, 3, False)])
def test_close_masks_bridges_gaps_up_to_twice_the_radius(radius, gap, bridged):
    x = _broken_rod(gap)
    out = close_masks(x, radius)
    assert torch.equal(out[:, 0], x[:, 0])  # the CT is left as it is
    assert bool((out >= x).all())  # a closing never removes mask
    hole = out[:, 1:, 15:15 + gap, 4:9, 4:9]
    assert bool((hole == 1.0).all()) is bridged
    # The rod's outline is kept: nothing is added beside it.
    assert torch.equal(out[:, 1:, :, :4], x[:, 1:, :, :4])


def test_bridge_prob_closes_about_that_share_and_off_changes_no_draw():
    x = _broken_rod(2).repeat(32, 1, 1, 1, 1)
    cfg = replace(IDENTITY, bridge_prob=0.5, bridge_vox=(1, 2))
    params = sample_params(64, x.shape[2:], cfg, torch.Generator().manual_seed(3))
    assert params.bridge is not None and 20 <= int((params.bridge > 0).sum()) <= 44
    out = apply_augmentation(x, params)
    filled = (out[:, 2, 15:17, 4:9, 4:9] == 1.0).flatten(1).all(dim=1)
    assert torch.equal(filled, params.bridge > 0)
    # bridge_prob 0 draws nothing more: the same seed gives the recipe's earlier parameters.
    a = sample_params(4, x.shape[2:], weak_config(), torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    b = sample_params(4, x.shape[2:], replace(weak_config(), bridge_prob=0.0), g)
    assert a.bridge is None and torch.equal(a.angles_deg, b.angles_deg)


def test_bad_bridge_settings_are_refused():
    with pytest.raises(ValueError, match="bridge_prob"):
        AugmentConfig(bridge_prob=1.5)
    with pytest.raises(ValueError, match="bridge_vox"):
        AugmentConfig(bridge_vox=(0, 2))
