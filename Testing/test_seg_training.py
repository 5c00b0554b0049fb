"""Segmentation training: tiny real runs on phantoms (loss, files, resume, budget, seeds, DDP)."""

from __future__ import annotations

import argparse
import dataclasses
import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from AnkleFractureLib.dataset.layout import Dataset
from AnkleFractureLib.errors import InputError
from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.segmentation.model_io import load_model, save_model, sha256_file
from AnkleFractureLib.segmentation.network import build_network
from AnkleFractureLib.segmentation.plans import SegPlans
from AnkleFractureLib.training.seg_data import (AugmentConfig, PatchSampler, PreparedCase,
                                                split_cases)
from AnkleFractureLib.training.seg_train import train_segmentation

REPO = Path(__file__).resolve().parents[1]
TINY_NET = {"architecture": "unet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
            "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "norm": "instance",
            "dropout": 0.0}
# 2 mm model spacing and 32^3 patches keep every run to seconds on 2 shared CPU cores.
TINY_PLANS = SegPlans(model_spacing_mm=(2.0, 2.0, 2.0), patch_size=(32, 32, 32), network=TINY_NET)
# One thread: on a CPU shared with other jobs two torch threads can be ten times slower.
FAST = dict(plans=TINY_PLANS, batch_size=2, lr=3e-3, device="cpu", num_threads=1, log=None)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from AnkleFractureLib.phantom.dataset_writer import write_phantom_dataset

    root = tmp_path_factory.mktemp("seg_phantoms")
    write_phantom_dataset(root, 3, seed=5)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("seg_cache")


@pytest.fixture(scope="module")
def trained(phantoms, cache, tmp_path_factory):
    """One tiny run shared by several tests: 3 epochs x 6 steps."""
    out = tmp_path_factory.mktemp("run") / "model"
    summary = train_segmentation(phantoms, out, epochs=3, steps_per_epoch=6, cache_dir=cache,
                                 seed=1, **FAST)
    return out, summary


def _rows(out: Path):
    with open(out / "training_log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_tiny_run_learns_and_writes_the_model_folder(trained):
    out, summary = trained
    assert summary["status"] == "completed"
    assert summary["steps_run"] == 18 and summary["epochs_run"] == 3
    assert len(summary["train_cases"]) == 2 and len(summary["val_cases"]) == 1
    rows = _rows(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0] - 0.1, losses
    assert 0.0 <= summary["best_val_dice"] <= 1.0
    for name in ("plans.json", "model.pt", "training.json", "checkpoint.pt"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "training.json").read_text())
    assert on_disk["val_cases"] == summary["val_cases"]
    assert on_disk["model_sha256"] == sha256_file(out / "model.pt")
    assert set(on_disk["versions"]) >= {"AnkleFractureLib", "torch", "monai"}
    payload = torch.load(out / "model.pt", weights_only=True)
    assert payload["format_version"] == 1 and payload["epoch"] == summary["best_epoch"]
    assert all(v.dtype == torch.float16 for v in payload["state_dict"].values()
               if v.is_floating_point())

    net, plans = load_model(out)
    assert plans == TINY_PLANS and not net.training
    with torch.no_grad():
        y = net(torch.rand(1, 1, 32, 32, 32))
    assert y.shape == (1, 3, 32, 32, 32) and y.dtype == torch.float32


def test_resume_continues_the_same_run(trained, phantoms, cache, tmp_path):
    import shutil

    src, first = trained
    out = tmp_path / "model"
    shutil.copytree(src, out)
    summary = train_segmentation(phantoms, out, epochs=4, steps_per_epoch=6, cache_dir=cache,
                                 resume=True, seed=1, **FAST)
    assert summary["status"] == "completed"
    assert summary["steps_run"] == 24 and summary["epochs_run"] == 4
    assert summary["val_cases"] == first["val_cases"]
    assert summary["train_cases"] == first["train_cases"]
    assert summary["first_step_loss"] == first["first_step_loss"]
    assert [int(r["epoch"]) for r in _rows(out)] == [1, 2, 3, 4]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["global_step"] == 24 and ckpt["epoch"] == 4


def test_fresh_run_refuses_a_used_model_folder(trained, phantoms):
    out, _ = trained
    with pytest.raises(InputError, match="--resume"):
        train_segmentation(phantoms, out, epochs=1, steps_per_epoch=1, **FAST)


def test_max_minutes_stops_early_and_still_saves(phantoms, cache, tmp_path):
    out = tmp_path / "model"
    summary = train_segmentation(phantoms, out, epochs=50, steps_per_epoch=50, cache_dir=cache,
                                 max_minutes=0.0001, keep_checkpoint=False, **FAST)
    assert summary["status"] == "max_minutes"
    assert summary["steps_run"] == 1
    assert (out / "model.pt").is_file() and (out / "checkpoint.pt").is_file()
    assert json.loads((out / "training.json").read_text())["status"] == "max_minutes"
    assert len(_rows(out)) == 1


def test_same_seed_same_split_and_first_loss(phantoms, cache, tmp_path):
    a = train_segmentation(phantoms, tmp_path / "a", epochs=1, steps_per_epoch=1, seed=3,
                           cache_dir=cache, val_fraction=0.5, **FAST)
    b = train_segmentation(phantoms, tmp_path / "b", epochs=1, steps_per_epoch=1, seed=3,
                           cache_dir=cache, val_fraction=0.5, **FAST)
    assert a["val_cases"] == b["val_cases"] and a["train_cases"] == b["train_cases"]
    assert a["first_step_loss"] == b["first_step_loss"]


def test_split_is_by_case_and_deterministic():
    ids = [f"c{i}" for i in range(20)]
    train, val = split_cases(ids, 0.15, seed=0)
    assert len(val) == 3 and not set(train) & set(val) and sorted(train + val) == sorted(ids)
    assert split_cases(list(reversed(ids)), 0.15, seed=0) == (train, val)
    assert split_cases(ids, 0.15, seed=1) != (train, val)
    assert split_cases(["a", "b"], 0.01, seed=0)[1] != []
    assert split_cases(["a"], 0.5, seed=0) == (["a"], [])


def _toy_case() -> PreparedCase:
    rng = np.random.default_rng(0)
    lab = np.zeros((40, 30, 30), np.uint8)
    lab[5:35, 5:15, 5:15] = 1
    lab[5:35, 20:23, 20:23] = 2
    img = (rng.random(lab.shape, dtype=np.float32) * 0.1 + 0.5 * (lab > 0)).astype(np.float32)
    return PreparedCase("toy", img, lab, (1.0, 1.0, 1.0))


def test_sampler_is_seeded_per_step_and_oversamples_bone():
    case = _toy_case()
    s1 = PatchSampler([case], (16, 16, 16), seed=4)
    s2 = PatchSampler([case], (16, 16, 16), seed=4)
    for step in (0, 7):
        a, b = s1.batch(step, 3), s2.batch(step, 3)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(s1.batch(0, 3)[0], s1.batch(1, 3)[0])
    other_rank = PatchSampler([case], (16, 16, 16), seed=4, rank=1)
    assert not np.array_equal(s1.batch(0, 3)[0], other_rank.batch(0, 3)[0])
    # Patches centred on bone: the centre voxel is tibia or fibula about 2/3 of the time, and
    # the (tiny) fibula about as often as the tibia.
    plain = PatchSampler([case], (16, 16, 16), seed=0, augment=AugmentConfig.none())
    centres = np.array([plain.batch(s, 1)[1][0, 0, 8, 8, 8] for s in range(300)])
    assert 0.55 < np.mean(centres > 0) < 0.85
    assert 0.6 < np.sum(centres == 2) / max(1, np.sum(centres == 1)) < 1.6


def test_hard_negative_patches_centre_on_unlabelled_bone():
    case = _toy_case()
    # An unlabelled bright block: a talus or foot bone the labels leave out.
    case.image[30:36, 24:29, 2:8] = 0.6
    plain = PatchSampler([case], (16, 16, 16), seed=0, augment=AugmentConfig.none())
    hard = PatchSampler([case], (16, 16, 16), seed=0, bone_level=0.4,
                        augment=dataclasses.replace(AugmentConfig.none(), p_unlabelled_bone=0.5))
    on_block = []
    for sampler in (plain, hard):
        centres = [sampler.batch(s, 1) for s in range(200)]
        on_block.append(np.mean([(img[0, 0, 8, 8, 8] > 0.4) and lab[0, 0, 8, 8, 8] == 0
                                 for img, lab in centres]))
    assert on_block[0] < 0.05 and 0.35 < on_block[1] < 0.65
    # A case without unlabelled bone falls back to the usual centres.
    bare = _toy_case()
    img, lab = PatchSampler([bare], (16, 16, 16), seed=0, bone_level=0.4, augment=dataclasses
                            .replace(AugmentConfig.none(), p_unlabelled_bone=1.0)).batch(0, 1)
    assert img.shape == (1, 1, 16, 16, 16)


def test_augmented_patches_keep_labels_aligned_with_the_image():
    case = _toy_case()
    sampler = PatchSampler([case], (24, 24, 24), seed=2,
                           augment=AugmentConfig(p_affine=1.0, p_contrast=0.0, p_brightness=0.0,
                                                 p_noise=0.0, p_blur=0.0))
    img, lab = sampler.batch(0, 4)
    assert img.shape == lab.shape == (4, 1, 24, 24, 24)
    assert set(np.unique(lab)) <= {0, 1, 2}
    # Bone is ~0.55 and background ~0.05 in the toy image; with labels aligned, linear
    # interpolation only mixes border voxels (a one-voxel shift would fail the thin fibula).
    for value in (1, 2):
        assert np.mean(img[lab == value] > 0.3) > 0.9
    assert np.mean(img[lab == 0] < 0.3) > 0.95


def test_no_segmented_case_is_a_clear_error(tmp_path):
    ds = Dataset.create(tmp_path / "ds")
    ds.add_case("c1", Volume(np.full((8, 8, 8), -1000, np.int16)))
    with pytest.raises(InputError, match="no case has a segmentation"):
        train_segmentation(ds.root, tmp_path / "m", epochs=1, steps_per_epoch=1, **FAST)


def test_resume_without_checkpoint_is_a_clear_error(phantoms, tmp_path):
    with pytest.raises(InputError, match="checkpoint"):
        train_segmentation(phantoms, tmp_path / "m", resume=True, **FAST)


def test_load_model_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "nothing")
    folder = tmp_path / "m"
    save_model(folder, build_network(TINY_NET), TINY_PLANS, {"epoch": 1})
    (folder / "model.pt").write_bytes(b"not a torch file")
    with pytest.raises(InputError) as exc:
        load_model(folder)
    assert str(folder / "model.pt") in str(exc.value)
    # Weights of another network than the plans describe.
    other = dict(TINY_NET, channels=[8, 16, 32])
    save_model(folder, build_network(other), TINY_PLANS)
    with pytest.raises(InputError, match="do not fit"):
        load_model(folder)
    (folder / "model.pt").unlink()
    with pytest.raises(InputError, match="model.pt"):
        load_model(folder)


def test_cli_help_and_parser():
    from AnkleFractureLib.cli import train_seg_cmd

    parser = argparse.ArgumentParser(prog="ankle-fracture")
    sub = parser.add_subparsers()
    train_seg_cmd.add_parser(sub)
    args = parser.parse_args(["train-seg", "data", "--out", "m", "--patch-size", "32", "48", "64",
                              "--no-keep-checkpoint", "--optimizer", "sgd"])
    assert args.patch_size == [32, 48, 64] and args.keep_checkpoint is False
    text = sub.choices["train-seg"].format_help()
    assert "torchrun --nproc_per_node=4 -m AnkleFractureLib train-seg" in text


def test_cli_runs_a_tiny_training(phantoms, cache, tmp_path, capsys):
    from AnkleFractureLib.cli import train_seg_cmd

    plans_file = tmp_path / "plans.json"
    plans_file.write_text(json.dumps(TINY_PLANS.to_json()))
    parser = argparse.ArgumentParser(prog="ankle-fracture")
    sub = parser.add_subparsers()
    train_seg_cmd.add_parser(sub)
    args = parser.parse_args(["train-seg", str(phantoms), "--out", str(tmp_path / "m"),
                              "--plans", str(plans_file), "--epochs", "1", "--steps-per-epoch",
                              "2", "--device", "cpu", "--threads", "1", "--quiet",
                              "--cache-dir", str(cache), "--no-keep-checkpoint",
                              "--optimizer", "sgd", "--num-workers", "1"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "completed" in out and "epoch   1/1" in out
    assert (tmp_path / "m" / "model.pt").is_file()
    assert not (tmp_path / "m" / "checkpoint.pt").exists()
    summary = json.loads((tmp_path / "m" / "training.json").read_text())
    assert summary["hparams"]["optimizer"] == "sgd" and summary["hparams"]["lr"] == 0.01


DDP_SCRIPT = textwrap.dedent("""
    import sys
    from AnkleFractureLib.segmentation.plans import SegPlans
    from AnkleFractureLib.training.seg_train import train_segmentation
    net = {"architecture": "unet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
           "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}
    plans = SegPlans(model_spacing_mm=(2.0, 2.0, 2.0), patch_size=(32, 32, 32), network=net)
    s = train_segmentation(sys.argv[1], sys.argv[2], plans=plans, epochs=1, steps_per_epoch=2,
                           device="cpu", num_threads=1, cache_dir=sys.argv[3], log=print)
    print("RESULT", s["world_size"], s["status"], s["steps_run"])
""")


@pytest.mark.slow
def test_ddp_two_processes_with_torchrun(phantoms, cache, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "model"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(script), str(phantoms), str(out), str(cache)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("RESULT 2 completed 2") == 2  # both ranks finished the same run
    summary = json.loads((out / "training.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed"
    assert (out / "model.pt").is_file() and len(_rows(out)) == 1
    net, _ = load_model(out)
    assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
    # Resume the two-process run with one process (e.g. the next job got fewer GPUs): same
    # split and step count, one more epoch, one more log row.
    resumed = train_segmentation(phantoms, out, epochs=2, resume=True, device="cpu",
                                 num_threads=1, cache_dir=cache, log=None)
    assert resumed["status"] == "completed" and resumed["world_size"] == 1
    assert resumed["steps_run"] == 4 and len(_rows(out)) == 2
    assert resumed["train_cases"] == summary["train_cases"]


@pytest.mark.slow
def test_two_nodes_rendezvous_as_the_readme_says(phantoms, cache, tmp_path):
    """The README's multi-node command (``--nnodes 2 --rdzv_backend c10d --rdzv_endpoint
    HOST:PORT --rdzv_id ID``), run as two torchrun launchers (two "nodes" of one process each,
    on this machine, sharing ``--out`` as nodes share a file system): both join one run of
    world size 2, and only global rank 0 writes the model and the log."""
    from torchrun_nodes import run_two_nodes

    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "model"
    for code, stdout, stderr in run_two_nodes(script, [str(phantoms), str(out), str(cache)],
                                              tmp_path, "ankle-test"):
        assert code == 0, stdout[-3000:] + stderr[-3000:]
        assert stdout.count("RESULT 2 completed 2") == 1  # one rank per node, world size 2
    summary = json.loads((out / "training.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed"
    assert (out / "model.pt").is_file() and len(_rows(out)) == 1


def test_loader_workers_make_the_same_batches_in_order():
    from AnkleFractureLib.training.seg_data import iterate_batches

    sampler = PatchSampler([_toy_case()], (16, 16, 16), seed=9)
    plain = list(iterate_batches(sampler, 3, 4, 2, num_workers=0))
    workers = list(iterate_batches(sampler, 3, 4, 2, num_workers=2))
    assert len(plain) == len(workers) == 4
    for (a, b), (c, d) in zip(plain, workers):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_interrupt_saves_a_checkpoint_that_resumes(phantoms, cache, tmp_path):
    out = tmp_path / "model"

    def ctrl_c_at_step_3(fraction, message):
        if "step 3 " in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_segmentation(phantoms, out, epochs=2, steps_per_epoch=3, cache_dir=cache,
                           progress=ctrl_c_at_step_3, **FAST)
    assert json.loads((out / "training.json").read_text())["status"] == "interrupted"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["global_step"] == 3
    summary = train_segmentation(phantoms, out, epochs=2, steps_per_epoch=3, cache_dir=cache,
                                 resume=True, **FAST)
    assert summary["status"] == "completed" and summary["steps_run"] == 6
    assert [int(r["epoch"]) for r in _rows(out)] == [1, 2]


def test_init_weights_fine_tunes_from_a_model(trained, phantoms, cache, tmp_path):
    """--init-from: the run starts at the given model's weights (its first loss is the
    trained model's, far below a fresh run's) and records them with their sha256."""
    model_dir, _ = trained
    fresh = train_segmentation(phantoms, tmp_path / "fresh", epochs=1, steps_per_epoch=1,
                               seed=3, cache_dir=cache, **FAST)
    tuned = train_segmentation(phantoms, tmp_path / "tuned", epochs=1, steps_per_epoch=1,
                               seed=3, cache_dir=cache, init_weights=model_dir, **FAST)
    assert tuned["first_step_loss"] < fresh["first_step_loss"] - 0.05
    init = json.loads((tmp_path / "tuned" / "training.json").read_text())["hparams"]["init_weights"]
    assert init["path"].endswith("model.pt") and len(init["sha256"]) == 64
    bad = dict(FAST, plans=SegPlans(model_spacing_mm=(2.0, 2.0, 2.0), patch_size=(32, 32, 32),
                                    network=dict(TINY_NET, channels=[8, 16, 32])))
    with pytest.raises(InputError, match="do not fit the network"):
        train_segmentation(phantoms, tmp_path / "bad", epochs=1, steps_per_epoch=1,
                           cache_dir=cache, init_weights=model_dir, **bad)
