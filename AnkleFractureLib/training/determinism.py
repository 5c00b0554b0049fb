"""Deterministic training when a seed is given: one helper for segmentation and classification.

Seeding alone makes a CPU run repeatable. On a GPU, three more things vary between runs with
the same seed, and :func:`deterministic_training` switches each off for the duration of a run:

* cuDNN picks convolution algorithms by timing them (``torch.backends.cudnn.benchmark``), and
  some of them sum in a varying order: ``cudnn.deterministic = True``, ``benchmark = False``;
* PyTorch ops with a non-deterministic CUDA kernel (atomic adds in scatter/index_add, some
  pooling and interpolation backward passes): ``torch.use_deterministic_algorithms(True,
  warn_only=True)`` picks the deterministic kernel where one exists and *warns* where none
  does (an error would stop training for an op PyTorch cannot make deterministic);
* cuBLAS splits large matrix products over a workspace whose reduction order depends on the
  stream: ``CUBLAS_WORKSPACE_CONFIG=":4096:8"``, which cuBLAS reads when its first handle is
  created, i.e. it must be set before the process's first CUDA matrix product. The helper is
  therefore entered before the process group and the device are set up.

What stays non-deterministic: ops with no deterministic CUDA kernel (PyTorch warns; e.g. the
backward pass of some 3D max-pool/trilinear-upsampling layers), and a process that had used
cuBLAS before the helper ran (``cuda_initialized_before`` in the record). Runs on different
GPU models, CUDA/cuDNN versions or numbers of processes differ in floating point order anyway.

Data-loader workers (:func:`seed_worker`, :func:`loader_generator`): torch already derives each
worker's torch, numpy and ``random`` seeds from a base seed drawn from the main process's
seeded torch RNG; passing ``generator=loader_generator(seed, rank)`` and
``worker_init_fn=seed_worker`` makes that explicit and independent of what else consumed the
global RNG. The segmentation batches do not depend on it either way (every step's draws come
from a generator seeded with (seed, rank, step), see :mod:`AnkleFractureLib.training.seg_data`).

Example:
    >>> import torch
    >>> with deterministic_training(seed=0) as record:
    ...     torch.are_deterministic_algorithms_enabled()
    True
    >>> record["deterministic_algorithms"], record["warn_only"]
    (True, True)
"""

from __future__ import annotations

import os
import random
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily: the CLI imports the training package at startup
    import torch

#: cuBLAS workspace setting that makes its reductions deterministic (":16:8" also works, with
#: a smaller workspace and slower GEMMs); see the CUDA "cuBLAS reproducibility" notes.
CUBLAS_WORKSPACE_CONFIG = ":4096:8"
_CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"
#: What the record says stays non-deterministic (also in the README's training section).
NOT_COVERED = ("CUDA ops without a deterministic kernel (e.g. some 3D pooling/upsampling "
               "backward passes) still use atomic adds: PyTorch warns and they may differ in "
               "the last bits between GPU runs; CPU runs are repeatable")


@contextmanager
def deterministic_training(seed: Optional[int]) -> Iterator[Dict[str, Any]]:
    """Make the torch code run inside the block deterministic where torch can, then restore.

    Enter it before the CUDA device is first used (before
    :func:`~AnkleFractureLib.training.distributed.init_distributed`), so that cuBLAS reads
    :data:`CUBLAS_WORKSPACE_CONFIG`. The previous flags and environment are restored on exit,
    so a long-lived process (3D Slicer) does not keep the slower deterministic kernels for its
    inference afterwards.

    Args:
        seed: The run's seed; None leaves every setting as it is (no determinism asked for).

    Yields:
        The record written to training.json under ``determinism``: ``enabled``,
        ``cudnn_deterministic``, ``cudnn_benchmark``, ``deterministic_algorithms``,
        ``warn_only``, ``cublas_workspace_config``, ``cuda_initialized_before`` (True: cuBLAS
        may have been set up before the setting, so its reductions are not covered) and
        ``not_covered`` (what stays non-deterministic, in words).
    """
    import torch

    if seed is None:
        yield {"enabled": False}
        return
    previous = {"cudnn_deterministic": torch.backends.cudnn.deterministic,
                "cudnn_benchmark": torch.backends.cudnn.benchmark,
                "algorithms": torch.are_deterministic_algorithms_enabled(),
                "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
                "env": os.environ.get(_CUBLAS_ENV)}
    # A workspace setting the user chose (":16:8") is kept: both are deterministic.
    if previous["env"] not in (":4096:8", ":16:8"):
        os.environ[_CUBLAS_ENV] = CUBLAS_WORKSPACE_CONFIG
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    record = {"enabled": True, "cudnn_deterministic": True, "cudnn_benchmark": False,
              "deterministic_algorithms": True, "warn_only": True,
              "cublas_workspace_config": os.environ[_CUBLAS_ENV],
              "cuda_initialized_before": bool(torch.cuda.is_initialized()),
              "not_covered": NOT_COVERED}
    try:
        yield record
    finally:
        torch.backends.cudnn.deterministic = previous["cudnn_deterministic"]
        torch.backends.cudnn.benchmark = previous["cudnn_benchmark"]
        torch.use_deterministic_algorithms(previous["algorithms"],
                                           warn_only=previous["warn_only"])
        if previous["env"] is None:
            os.environ.pop(_CUBLAS_ENV, None)
        else:
            os.environ[_CUBLAS_ENV] = previous["env"]


def seed_worker(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn signature
    """``worker_init_fn`` of a DataLoader: seed numpy's legacy RNG and ``random`` in a worker
    from the torch seed the loader gave it (``torch.initial_seed()``: base seed + worker id)."""
    import torch

    s = torch.initial_seed() % 2 ** 32
    np.random.seed(s)
    random.seed(s)


def loader_generator(seed: int, rank: int = 0) -> "torch.Generator":
    """A CPU generator for a DataLoader's ``generator``: the workers' base seed then depends
    on (seed, rank) only, not on what else drew from the global torch RNG before."""
    import torch

    s = int(np.random.SeedSequence([int(seed), int(rank), 6151]).generate_state(1)[0])
    return torch.Generator().manual_seed(s)
