"""Classifier training: every method learns on tiny synthetic crops; files, seeds, DDP."""

from __future__ import annotations

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

from AnkleFractureLib.classification.crops import CropSet
from AnkleFractureLib.classification.model_io import load_classifier
from AnkleFractureLib.classification.plans import ClsPlans
from AnkleFractureLib.errors import InputError
from AnkleFractureLib.training.cls_train import (METHODS, ClsTrainConfig, fit_temperature,
                                                 select_labelled, split_validation,
                                                 train_classifier)

REPO = Path(__file__).resolve().parents[1]
SHAPE = (32, 16, 16)
GAP_Z = {0: None, 1: 4, 2: 14, 3: 24}  # class -> z of the fibula gap (none: intact)


def synthetic_crops(n_per_class: int = 6, seed: int = 0, unlabelled_per_class: int = 0
                    ) -> CropSet:
    """Crops whose class is the height of a gap in a 'fibula' rod (channel 2), like Weber."""
    rng = np.random.default_rng(seed)
    xs, ys, ids = [], [], []
    for k, gap in GAP_Z.items():
        for j in range(n_per_class + unlabelled_per_class):
            x = np.zeros((3,) + SHAPE, np.float32)
            x[0] = 0.3 + 0.05 * rng.standard_normal(SHAPE)
            x[1, :, 4:10, 3:9] = 1.0                      # tibia
            x[2, :, 7:10, 11:14] = 1.0                    # fibula
            if gap is not None:
                z = gap + int(rng.integers(-1, 2))
                x[2, z:z + 3] = 0.0
            x[0] = np.clip(x[0] + 0.5 * x[1] + 0.5 * x[2], 0, 1)
            xs.append(x)
            ys.append(k if j < n_per_class else -1)
            ids.append(f"c{k}_{j:02d}")
    return CropSet(ids, np.stack(xs).astype(np.float16), np.asarray(ys, np.int64),
                   [{} for _ in ids])


TINY = ClsPlans.make(widths=[4, 8, 8, 16], tta=0)


@pytest.fixture(scope="module")
def crops() -> CropSet:
    return synthetic_crops(6, seed=0, unlabelled_per_class=3)


def _run(tmp_path: Path, crops: CropSet, method: str, steps: int = 60, **kw):
    # The weak view's resampling is off by default here (affine_prob 0): on 3-voxel-wide
    # synthetic rods it slows a 60-step run several-fold; one test keeps it on.
    cfg = ClsTrainConfig(method=method, steps=steps, batch_size=8, unlabelled_batch_size=8,
                         lr=kw.pop("lr", 3e-3), val_fraction=kw.pop("val_fraction", 0.0), seed=kw.pop("seed", 0),
                         warmup_fraction=0.25, affine_prob=kw.pop("affine_prob", 0.0), **kw)
    out = tmp_path / f"model_{method}"
    torch.set_num_threads(1)
    summary = train_classifier(tmp_path, out, cfg, plans=ClsPlans.from_json(TINY.to_json()),
                               crops=crops, device="cpu", num_threads=1, log=None)
    return out, summary


def _rows(out: Path):
    with open(out / "training_log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _labelled_loss(out: Path, crops: CropSet) -> float:
    """Cross-entropy of a saved model on the labelled crops (eval mode, no augmentation)."""
    net, _ = load_classifier(out)
    lab = crops.y >= 0
    with torch.no_grad():
        logits = net(torch.from_numpy(crops.x[lab].astype(np.float32)))
    return float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(crops.y[lab])))


@pytest.fixture(scope="module")
def untrained_loss(tmp_path_factory, crops) -> float:
    """The same network after a single step: the reference every method must beat."""
    out, _ = _run(tmp_path_factory.mktemp("one_step"), crops, "supervised", steps=1)
    return _labelled_loss(out, crops)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_lowers_its_labelled_loss(tmp_path, crops, method, untrained_loss):
    # The semi-supervised loss ramps its unlabelled term in over the first steps and sits at
    # the threshold after 60 steps (labelled loss 1.19 vs 0.97 needed; 0.16 after 90).
    steps = 90 if method == "semi" else 60
    out, summary = _run(tmp_path, crops, method, steps=steps)
    trained = _labelled_loss(out, crops)
    assert trained < 0.7 * untrained_loss, (method, untrained_loss, trained)
    assert summary["status"] == "completed" and summary["steps_done"] == steps
    rows = _rows(out)
    if method != "supervised":
        # The unlabelled term really ran after the warm-up (it is logged).
        assert any(r.get("loss_u") not in (None, "") for r in rows), rows[-1]
    if method == "semi":
        assert "loss_rwn" in rows[-1] and "loss_mmd" in rows[-1]
    for name in ("plans.json", "model.pt", "training.json", "training_log.csv"):
        assert (out / name).is_file()
    net, plans = load_classifier(out)
    assert not net.training and plans.channels == ["ct", "tibia", "fibula"]
    with torch.no_grad():
        logits = net(torch.from_numpy(crops.x[:4].astype(np.float32)))
    assert logits.shape == (4, 4) and torch.isfinite(logits).all()


def test_geometric_augmentation_path_trains_too(tmp_path, crops, untrained_loss):
    out, _ = _run(tmp_path, crops, "fixmatch", steps=60, affine_prob=0.3)
    assert _labelled_loss(out, crops) < untrained_loss


def test_semi_records_pseudo_label_diagnostics_and_mmd(tmp_path):
    # Labels hidden by label_fraction are known to the run: it logs pseudo-label accuracy.
    out, _ = _run(tmp_path, synthetic_crops(6, seed=2), "semi", steps=16, label_fraction=0.5)
    rows = _rows(out)
    late = rows[-1]
    assert 0.0 <= float(late["weight"]) <= 1.0
    assert float(late["loss_mmd"]) >= 0.0
    assert 0.0 <= float(late["pseudo_acc"]) <= 1.0


def test_label_fraction_hides_labels_stratified_and_seeded(tmp_path):
    cs = synthetic_crops(10, seed=1)
    _, s1 = _run(tmp_path / "a", cs, "supervised", steps=2, label_fraction=0.2, seed=3)
    _, s2 = _run(tmp_path / "b", cs, "supervised", steps=2, label_fraction=0.2, seed=3)
    _, s3 = _run(tmp_path / "c", cs, "supervised", steps=2, label_fraction=0.2, seed=4)
    lab = s1["cases"]["labelled_train"]
    assert len(lab) == 8 and lab == s2["cases"]["labelled_train"]      # 2 per class, seeded
    assert lab != s3["cases"]["labelled_train"]
    assert sorted({i.split("_")[0] for i in lab}) == ["c0", "c1", "c2", "c3"]
    assert s1["cases"]["unlabelled"] == 32
    assert s1["first_loss"] == s2["first_loss"]                          # same seed, same run


def test_the_same_seed_writes_the_same_model_file(tmp_path, crops):
    """Training is reproducible from its command and seed: the same seed gives a model.pt with
    the same bytes (the sha256 a model card quotes), another seed other weights."""
    import hashlib

    digests = []
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        out, _ = _run(tmp_path / run, crops, "supervised", steps=8, seed=seed)
        digests.append(hashlib.sha256((out / "model.pt").read_bytes()).hexdigest())
    assert digests[0] == digests[1] and digests[2] != digests[0]


def test_select_and_split_helpers():
    y = np.array([0] * 10 + [1] * 10 + [2] * 2 + [-1] * 5)
    keep = select_labelled(y, 0.3, seed=0)
    assert (y[keep] == 0).sum() == 3 and (y[keep] == 1).sum() == 3 and (y[keep] == 2).sum() == 1
    assert not np.any(y[keep] < 0)
    train, val = split_validation(np.flatnonzero(y >= 0), y, 0.2, seed=0)
    assert set(train).isdisjoint(val) and (y[val] == 2).sum() == 0   # too few to hold out
    assert len(train) + len(val) == 22


def test_temperature_fit_calibrates_overconfident_logits():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    logits = rng.normal(0, 1, (400, 4))
    right = rng.random(400) < 0.7
    logits[np.arange(400), np.where(right, y, (y + 1) % 4)] += 3.0
    t = fit_temperature(10 * logits, y)  # 10x over-confident
    assert 5.0 < t < 20.0
    assert fit_temperature(np.zeros((0, 4)), np.zeros(0, int)) == 1.0


def test_validation_split_fits_a_temperature(tmp_path, crops):
    out, summary = _run(tmp_path, crops, "supervised", steps=6, val_fraction=0.34)
    assert summary["validation"]["n"] == 8 and summary["validation"]["temperature"] > 0
    plans = json.loads((out / "plans.json").read_text())
    assert plans["temperature"] == summary["validation"]["temperature"]


def test_bad_settings_and_used_folder_are_clear_errors(tmp_path, crops):
    with pytest.raises(InputError, match="label fraction"):
        ClsTrainConfig(label_fraction=0.0).check()
    with pytest.raises(InputError, match="method"):
        ClsTrainConfig(method="magic").check()
    out, _ = _run(tmp_path, crops, "supervised", steps=1)
    with pytest.raises(InputError, match="not empty"):
        train_classifier(tmp_path, out, ClsTrainConfig(steps=1), plans=TINY, crops=crops,
                         device="cpu", log=None)
    unl = CropSet(crops.ids, crops.x, np.full(len(crops), -1), crops.info)
    with pytest.raises(InputError, match="no case has a Weber class"):
        train_classifier(tmp_path, tmp_path / "x", ClsTrainConfig(steps=1), plans=TINY,
                         crops=unl, device="cpu", log=None)


DDP_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {testing!r})
    from test_cls_training import TINY, synthetic_crops
    from AnkleFractureLib.classification.plans import ClsPlans
    from AnkleFractureLib.training.cls_train import ClsTrainConfig, train_classifier
    cfg = ClsTrainConfig(method="semi", steps=4, batch_size=4, unlabelled_batch_size=4,
                         lr=3e-3, val_fraction=0.0, warmup_fraction=0.25)
    s = train_classifier(sys.argv[1], sys.argv[2], cfg, plans=ClsPlans.from_json(TINY.to_json()),
                         crops=synthetic_crops(3, unlabelled_per_class=2), device="cpu",
                         num_threads=1, log=None)
    print("RESULT", s.get("world_size", "rank"), s.get("status", "worker"))
""")


@pytest.mark.slow
def test_semi_runs_under_torchrun_with_two_processes(tmp_path):
    script = tmp_path / "ddp_cls.py"
    script.write_text(DDP_SCRIPT.format(testing=str(REPO / "Testing")))
    out = tmp_path / "model"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(script), str(tmp_path), str(out)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "RESULT 2 completed" in res.stdout and "RESULT rank worker" in res.stdout
    summary = json.loads((out / "training.json").read_text())
    assert summary["world_size"] == 2 and summary["steps_done"] == 4
    net, _ = load_classifier(out)
    assert net(torch.zeros(1, 3, *SHAPE)).shape == (1, 4)


@pytest.mark.slow
def test_semi_runs_on_two_nodes_with_the_readme_rendezvous(tmp_path):
    """Two torchrun launchers joined by the README's c10d rendezvous flags (two "nodes" of
    one process on this machine, sharing the output folder): one run of world size 2, rank 0
    alone returns the summary and writes the model."""
    from torchrun_nodes import run_two_nodes

    script = tmp_path / "ddp_cls.py"
    script.write_text(DDP_SCRIPT.format(testing=str(REPO / "Testing")))
    out = tmp_path / "model"
    results = run_two_nodes(script, [str(tmp_path), str(out)], tmp_path, "ankle-cls-test")
    for code, stdout, stderr in results:
        assert code == 0, stdout[-3000:] + stderr[-3000:]
    printed = "".join(stdout for _, stdout, _ in results)
    assert printed.count("RESULT 2 completed") == 1 and printed.count("RESULT rank worker") == 1
    summary = json.loads((out / "training.json").read_text())
    assert summary["world_size"] == 2 and summary["steps_done"] == 4
