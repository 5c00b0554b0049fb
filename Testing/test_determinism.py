"""Deterministic training (flags, repeatable seeded runs, seeded loader workers), the crop cache
built once by rank 0 behind a barrier under torchrun, and crop workers dealt out over the GPUs.

Everything runs on the CPU: the process group is Gloo with two spawned processes, and the GPU
count is mocked."""

from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from AnkleFractureLib.classification import crops as crops_mod
from AnkleFractureLib.classification.crops import load_crops_once, worker_devices
from AnkleFractureLib.dataset import Dataset
from AnkleFractureLib.errors import InputError
from AnkleFractureLib.training.determinism import (CUBLAS_WORKSPACE_CONFIG,
                                                   deterministic_training, loader_generator,
                                                   seed_worker)


# ------------------------------------------------------------------------------ the helper
def test_helper_sets_the_flags_and_restores_them(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    torch.backends.cudnn.benchmark = True  # as a user who tuned inference might have left it
    with deterministic_training(seed=3) as record:
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE_CONFIG == ":4096:8"
    assert record["enabled"] and record["warn_only"] and record["deterministic_algorithms"]
    assert record["cublas_workspace_config"] == ":4096:8" and "not_covered" in record
    json.dumps(record)  # goes into training.json
    # Restored: a long-lived process (Slicer) does not keep the slow kernels for inference.
    assert torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before[2]
    assert (torch.are_deterministic_algorithms_enabled(),
            torch.backends.cudnn.deterministic) == before[:2]
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_helper_keeps_a_users_workspace_setting_and_does_nothing_without_a_seed(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # also deterministic: kept
    with deterministic_training(seed=0) as record:
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert record["cublas_workspace_config"] == ":16:8"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    with deterministic_training(seed=None) as record:
        assert not torch.are_deterministic_algorithms_enabled()
    assert record == {"enabled": False}


class _Noise(torch.utils.data.Dataset):
    """Items drawn from numpy's global RNG: what a worker's seed decides."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> float:
        return float(np.random.random())


def _draws(seed: int):
    loader = torch.utils.data.DataLoader(_Noise(), batch_size=None, num_workers=2,
                                         worker_init_fn=seed_worker,
                                         generator=loader_generator(seed, rank=0))
    return [float(v) for v in loader]


def test_seeded_loader_workers_repeat_and_depend_on_the_seed():
    torch.manual_seed(123)
    first = _draws(5)
    torch.manual_seed(456)  # whatever else drew from the global RNG before: same batches
    assert _draws(5) == first
    assert _draws(6) != first
    assert len(set(first)) == len(first)  # the two workers do not repeat each other


# ------------------------------------------------------------------------------ seeded runs
def test_two_seeded_classifier_runs_give_identical_losses(tmp_path):
    from test_cls_training import TINY, synthetic_crops

    from AnkleFractureLib.classification.plans import ClsPlans
    from AnkleFractureLib.training.cls_train import ClsTrainConfig, train_classifier

    crops = synthetic_crops(4, seed=0, unlabelled_per_class=2)

    def run(name: str, seed: int):
        cfg = ClsTrainConfig(method="semi", steps=6, batch_size=6, unlabelled_batch_size=6,
                             lr=3e-3, val_fraction=0.0, seed=seed, warmup_fraction=0.34,
                             affine_prob=0.5)
        summary = train_classifier(tmp_path, tmp_path / name, cfg,
                                   plans=ClsPlans.from_json(TINY.to_json()), crops=crops,
                                   device="cpu", num_threads=1, log=None)
        with open(tmp_path / name / "training_log.csv", newline="") as fh:
            # Every column but the wall time; the unlabelled terms start at step 3.
            rows = [{k: v for k, v in r.items() if k != "minutes"} for r in csv.DictReader(fh)]
        assert rows and rows[-1]["loss_mmd"] != ""
        return summary, rows

    a, rows_a = run("a", 1)
    b, rows_b = run("b", 1)
    c, rows_c = run("c", 2)
    assert rows_a == rows_b and a["first_loss"] == b["first_loss"]
    assert rows_c != rows_a and c["first_loss"] != a["first_loss"]
    assert a["determinism"]["enabled"] and a["determinism"]["deterministic_algorithms"]
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run


def test_two_seeded_segmentation_runs_give_identical_losses(tmp_path):
    from test_seg_training import TINY_PLANS

    from AnkleFractureLib.phantom.dataset_writer import write_phantom_dataset
    from AnkleFractureLib.training.seg_train import read_log, train_segmentation

    write_phantom_dataset(tmp_path / "ds", 3, seed=5)
    fast = dict(plans=TINY_PLANS, batch_size=2, lr=3e-3, device="cpu", num_threads=1,
                log=None, cache_dir=tmp_path / "cache", epochs=2, steps_per_epoch=2)

    def losses(name: str, seed: int):
        summary = train_segmentation(tmp_path / "ds", tmp_path / name, seed=seed, **fast)
        rows = read_log(tmp_path / name / "training_log.csv")
        return summary, [(r["train_loss"], r["val_dice_mean"]) for r in rows]

    a, rows_a = losses("a", 1)
    b, rows_b = losses("b", 1)
    c, rows_c = losses("c", 2)
    assert rows_a == rows_b and a["first_step_loss"] == b["first_step_loss"]
    assert a["first_step_loss"] != c["first_step_loss"]
    record = json.loads((tmp_path / "a" / "training.json").read_text())["determinism"]
    assert record["enabled"] and record["cudnn_deterministic"] and not record["cudnn_benchmark"]
    assert not torch.are_deterministic_algorithms_enabled()


# ------------------------------------------------------------------------------ rank-0 cache
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, root: str, cache: str, out: str) -> None:
    """One rank of a Gloo job: count this rank's crop computations, load the crops once."""
    import torch.distributed as dist

    from AnkleFractureLib.classification import crops as cm

    computed = []
    real = cm._compute

    def counting(job):
        computed.append(job["id"])
        return real(job)

    cm._compute = counting
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        result = {"computed": computed}
        try:
            crops = load_crops_once(Dataset.load(root), cache, rank=rank, world_size=world,
                                    side="dataset")
            result.update(ids=crops.ids, failed=crops.failed,
                          checksum=float(np.asarray(crops.x, np.float64).sum()))
        except InputError as exc:
            result["error"] = str(exc)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _spawn(root: Path, cache: Path, out: Path):
    import torch.multiprocessing as mp

    out.mkdir(exist_ok=True)
    mp.spawn(_rank_main, args=(2, _free_port(), str(root), str(cache), str(out)), nprocs=2,
             join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def two_case_dataset(tmp_path_factory) -> Path:
    from AnkleFractureLib.geometry.volume import Volume
    from AnkleFractureLib.phantom import generate_case

    root = tmp_path_factory.mktemp("ranks") / "ds"
    ds = Dataset.create(root)
    case = generate_case(3, "B", "right", spacing="fast")
    ds.add_case("good", case.ct, case.label, weber="B", side="right")
    blank = Volume(np.zeros_like(case.label.array), case.label.spacing, case.label.origin,
                   case.label.direction)
    ds.add_case("no_bone", case.ct, blank, weber="B", side="right")  # cannot be registered
    return root


def test_rank0_builds_the_crop_cache_once_behind_a_barrier(two_case_dataset, tmp_path):
    cache = tmp_path / "cache"
    r0, r1 = _spawn(two_case_dataset, cache, tmp_path / "out")
    # Rank 0 computed both cases (one failed); rank 1 computed nothing and read rank 0's cache.
    assert sorted(r0["computed"]) == ["good", "no_bone"] and r1["computed"] == []
    assert r0["ids"] == r1["ids"] == ["good"] and r0["checksum"] == r1["checksum"]
    # The failed case carries rank 0's reason on both ranks, not "not in the crop cache".
    assert r0["failed"] == r1["failed"] and set(r0["failed"]) == {"no_bone"}
    assert "not in the crop cache" not in r1["failed"]["no_bone"]
    assert len(list((cache / "registered").glob("good-*.npz"))) == 1
    # A second job finds everything cached: nothing is computed on either rank (the failed
    # case is retried by rank 0 only).
    r0, r1 = _spawn(two_case_dataset, cache, tmp_path / "out2")
    assert r0["computed"] == ["no_bone"] and r1["computed"] == []


def test_an_error_on_rank0_reaches_the_other_ranks(tmp_path, two_case_dataset):
    # Only the case without bone: rank 0 cannot crop anything and raises; rank 1 must not
    # wait for ever, nor compute, but fail naming rank 0.
    ds = Dataset.load(two_case_dataset)
    only = Dataset.create(tmp_path / "ds")
    rec = ds.get("no_bone")
    from AnkleFractureLib.io import read_image

    only.add_case("no_bone", read_image(ds.path(rec.image)),
                  read_image(ds.path(rec.segmentation)), weber="B", side="right")
    r0, r1 = _spawn(only.root, tmp_path / "cache", tmp_path / "out")
    assert "no case could be cropped" in r0["error"]
    assert "rank 0 could not build the crop cache" in r1["error"] and r1["computed"] == []


def test_single_process_is_plain_load_crops(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(crops_mod, "load_crops", lambda *a, **k: calls.append((a, k)) or "set")
    assert load_crops_once("ds", tmp_path, rank=0, world_size=1, workers=3) == "set"
    assert calls[0][1] == {"workers": 3}


# ------------------------------------------------------------------------------ GPU workers
def test_crop_workers_are_dealt_out_round_robin_over_the_gpus():
    assert worker_devices(4, 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert worker_devices(3, 1) == ["cuda:0"] * 3
    assert worker_devices(2, 0) == ["cpu", "cpu"]


def test_run_jobs_gives_each_worker_its_own_gpu(monkeypatch):
    """With 2 (mocked) GPUs and 3 workers, the pool's initializer hands out cuda:0, cuda:1,
    cuda:0; the executor is replaced by an in-process one that records what each worker got."""
    import concurrent.futures

    seen = []

    class FakePool:
        def __init__(self, max_workers, mp_context, initializer, initargs):
            for _ in range(max_workers):  # one initializer call per worker process
                initializer(*initargs)
                seen.append(crops_mod._WORKER_DEVICE)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def map(self, fn, jobs, chunksize=1):
            return [(job["id"], None) for job in jobs]

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", FakePool)
    monkeypatch.setattr(crops_mod, "_gpu_count", lambda: 2)
    monkeypatch.setattr(crops_mod, "_WORKER_DEVICE", None)
    failed, reports = {}, []
    crops_mod._run_jobs([{"id": "a"}, {"id": "b"}], 3, failed, reports.append, None)
    assert seen == ["cuda:0", "cuda:1", "cuda:0"] and len(reports) == 2 and not failed


def test_a_worker_segments_on_its_own_device(monkeypatch, tmp_path):
    from AnkleFractureLib.phantom import generate_case
    import AnkleFractureLib.segmentation.inference as inference

    case = generate_case(4, "C", "right", spacing="fast")
    ds = Dataset.create(tmp_path / "ds")
    ds.add_case("c", case.ct, None, weber="C", side="right")  # no label map: segmented
    devices = []

    def fake_segment(ct, model_dir=None, device="auto", **kwargs):
        devices.append(device)
        return case.label

    monkeypatch.setattr(inference, "segment_ct", fake_segment)
    job = {"root": str(ds.root), "id": "c", "model_masks": False, "kind": "registered",
           "template_dir": None, "out": str(tmp_path / "c.npz"), "seg_model_dir": None,
           "side": "detect"}
    monkeypatch.setattr(crops_mod, "_WORKER_DEVICE", "cuda:1")
    assert crops_mod._compute(job) == ("c", None)
    monkeypatch.setattr(crops_mod, "_WORKER_DEVICE", None)  # in process: "auto", as before
    crops_mod._compute(job)
    assert devices == ["cuda:1", "auto"]
