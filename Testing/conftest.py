"""Shared pytest fixtures: tiny synthetic volumes that carry their geometry (TorchIO-style)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# Test helper modules (io_corpus, ...) live next to the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from AnkleFractureLib.geometry.volume import Volume  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> Any:
    """The module of ``scripts/<name>.py`` (the scripts folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shared_data() -> Path:
    """The real-CT folder: $ANKLE_SHARED_DATA, else ../shared/data beside the checkout, else
    /work/shared/data (where CI's clean clone may live elsewhere on the same machine)."""
    if os.environ.get("ANKLE_SHARED_DATA"):
        return Path(os.environ["ANKLE_SHARED_DATA"])
    for candidate in (REPO_ROOT.parent / "shared" / "data", Path("/work/shared/data")):
        if candidate.is_dir():
            return candidate
    return REPO_ROOT.parent / "shared" / "data"


SHARED_DATA = _shared_data()
REAL_CT_DIR = SHARED_DATA / "vhf_ankle_ct"


def rotation(axis: str, degrees: float) -> np.ndarray:
    """3x3 rotation about 'x', 'y' or 'z' (right-handed)."""
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    r = np.eye(3)
    r[i, i] = r[j, j] = c
    r[i, j], r[j, i] = -s, s
    return r


@pytest.fixture
def oblique_volume() -> Volume:
    """A small anisotropic CT-like volume with an oblique, axis-flipped direction."""
    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 2000, size=(7, 9, 11)).astype(np.int16)
    direction = rotation("z", 30) @ rotation("x", 12) @ np.diag([1.0, -1.0, -1.0])
    return Volume(arr, spacing=(0.37, 0.52, 1.25), origin=(-12.5, 30.25, 101.0), direction=direction)


@pytest.fixture
def shared_ct_dir() -> Path:
    """The real DICOM series in ../shared/data (skips when it is not there)."""
    if not REAL_CT_DIR.is_dir():
        pytest.skip(f"shared real CT not found at {REAL_CT_DIR}")
    return REAL_CT_DIR


@pytest.fixture(scope="module")
def tiny_cls(tmp_path_factory) -> Path:
    """An untrained tiny Weber classifier folder (fast; the shipped one is tested elsewhere)."""
    import torch

    from AnkleFractureLib.classification.model_io import save_classifier
    from AnkleFractureLib.classification.network import build_classifier
    from AnkleFractureLib.classification.plans import ClsPlans

    torch.manual_seed(0)
    plans = ClsPlans.make(widths=[4, 8, 8, 16], downsample=2, tta=2)
    folder = tmp_path_factory.mktemp("tiny_cls")
    save_classifier(folder, build_classifier(plans.network), plans)
    return folder
