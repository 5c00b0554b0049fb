"""Helpers for single-process and ``torchrun`` (DistributedDataParallel) training.

``torchrun --nproc_per_node=N`` starts N copies of the command and tells each one who it is
through the environment variables ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and where the
rendezvous is through ``MASTER_ADDR``/``MASTER_PORT``). Without them the code runs as one
process (rank 0 of 1) and never touches ``torch.distributed``.

The process group uses NCCL when every rank drives its own GPU and Gloo on the CPU.

Example:
    >>> ctx = init_distributed("cpu")
    >>> (ctx.rank, ctx.world_size, ctx.is_main, str(ctx.device))
    (0, 1, True, 'cpu')
    >>> all_reduce_sum([1.0, 2.0], ctx)
    [1.0, 2.0]
    >>> cleanup_distributed(ctx)
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import numpy as np

from AnkleFractureLib.errors import InputError

if TYPE_CHECKING:  # torch is imported lazily: the CLI imports this module at startup
    import torch

DEVICES = ("auto", "cpu", "cuda")


def env_ranks() -> Tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment, (0, 1, 0) without it."""
    def _int(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            return default

    world = max(1, _int("WORLD_SIZE", 1))
    rank = _int("RANK", 0) if world > 1 else 0
    local = _int("LOCAL_RANK", rank) if world > 1 else 0
    return rank, world, local


def available_cpus() -> int:
    """CPU cores this process may use (the affinity mask, which respects containers/taskset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_device(device: str = "auto", local_rank: int = 0) -> "torch.device":
    """The torch device for ``device`` in ``DEVICES``; with CUDA, GPU number ``local_rank``.

    Raises:
        InputError: ``device`` is unknown, or "cuda" was asked for where there is no GPU.
    """
    import torch

    if device not in DEVICES:
        raise InputError(None, f"device must be one of {list(DEVICES)}, got {device!r}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError(None, "--device cuda was requested but no CUDA GPU is available "
                               "(use --device auto or cpu)")
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise InputError(None, f"process with LOCAL_RANK {local_rank} has no GPU (only {n} "
                               "visible); start at most one process per GPU")
    return torch.device("cuda", local_rank)


@dataclass
class DistContext:
    """Who this process is in the training job.

    Attributes:
        rank: Global rank (0 .. world_size - 1).
        world_size: Number of processes (1 without torchrun).
        local_rank: Rank on this machine (selects the GPU).
        device: The torch device this process trains on.
        backend: "nccl", "gloo" or "" (single process, no process group).
    """

    rank: int
    world_size: int
    local_rank: int
    device: "torch.device"
    backend: str = ""

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is running (world_size > 1)."""
        return self.world_size > 1


def init_distributed(device: str = "auto", num_threads: Optional[int] = None) -> DistContext:
    """Detect torchrun, pick the device and start the process group when world_size > 1.

    Also sets torch's intra-op thread count on the CPU to cores // world_size, because torchrun
    sets OMP_NUM_THREADS=1 (slow for CPU training) and N processes with all cores each would
    oversubscribe the machine.

    Args:
        device: "auto" (CUDA when available), "cpu" or "cuda".
        num_threads: torch CPU threads of this process (None: cores // world_size). On a
            machine shared with other jobs fewer threads can be much faster.

    Returns:
        The :class:`DistContext`.
    """
    import torch

    rank, world, local = env_ranks()
    dev = resolve_device(device, local)
    backend = ""
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if num_threads is not None:
        torch.set_num_threads(max(1, int(num_threads)))
    elif dev.type == "cpu":
        torch.set_num_threads(max(1, available_cpus() // world))
    if world > 1:
        import torch.distributed as dist

        backend = "nccl" if dev.type == "cuda" else "gloo"
        if not dist.is_initialized():
            # env:// reads MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE set by torchrun.
            kwargs = {"device_id": dev} if dev.type == "cuda" else {}
            try:
                dist.init_process_group(backend=backend, init_method="env://", **kwargs)
            except TypeError:  # torch < 2.3 has no device_id argument
                dist.init_process_group(backend=backend, init_method="env://")
    return DistContext(rank, world, local, dev, backend)


def cleanup_distributed(ctx: DistContext) -> None:
    """Destroy the process group (no-op for a single process)."""
    if ctx.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait until every rank gets here (no-op for a single process)."""
    if ctx.distributed:
        import torch.distributed as dist

        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def _reduce(values: Sequence[float], ctx: DistContext, op: str) -> List[float]:
    vals = [float(v) for v in values]
    if not ctx.distributed:
        return vals
    import torch
    import torch.distributed as dist

    # NCCL only reduces CUDA tensors; Gloo wants CPU tensors. float64 keeps sums of counts exact.
    t = torch.tensor(vals, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return [float(v) for v in t.cpu().tolist()]


def all_reduce_sum(values: Sequence[float], ctx: DistContext) -> List[float]:
    """Element-wise sum of ``values`` over all ranks (every rank gets the result)."""
    return _reduce(values, ctx, "sum")


def all_reduce_max(values: Sequence[float], ctx: DistContext) -> List[float]:
    """Element-wise maximum of ``values`` over all ranks (e.g. "any rank wants to stop")."""
    return _reduce(values, ctx, "max")


def all_reduce_mean(values: Sequence[float], ctx: DistContext) -> List[float]:
    """Element-wise mean of ``values`` over all ranks."""
    return [v / ctx.world_size for v in _reduce(values, ctx, "sum")]


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python ``random``, numpy's legacy global RNG and torch (CPU and CUDA) per rank.

    Each rank gets its own stream (so ranks draw different patches and dropout masks) derived
    from (seed, rank) with numpy's SeedSequence, which keeps nearby seeds independent.

    Returns:
        The 32-bit seed actually used for this rank.
    """
    import torch

    s = int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)  # also seeds every CUDA device
    return s
