"""Cases spread over spawned worker processes, their results handed back in order.

Used by ``phantom``, ``evaluate-fracture`` and ``train-fracture`` (``--workers N``). Workers are
started with ``spawn``, which works the same on Linux, macOS, Windows and inside Slicer, and
never inherits a parent's torch threads. Every task depends on its own arguments alone, so the
results are the same for any number of workers.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence


def share_threads(n_workers: int) -> None:
    """In a worker process: give torch an equal share of this machine's CPU threads, so that
    ``n_workers`` workers together do not oversubscribe the cores."""
    import os

    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(int(n_workers), 1)))


def in_processes(fn: Callable[..., Any], tasks: Iterable[Sequence[Any]], workers: int, *,
                 initializer: Optional[Callable[..., None]] = None,
                 initargs: Sequence[Any] = (), ahead: Optional[int] = None) -> Iterator[Any]:
    """``fn(*task)`` for every task, in the tasks' order, computed in ``workers`` processes.

    Args:
        fn: A module-level function (``spawn`` pickles it by name).
        tasks: Argument tuples, one per task.
        workers: Number of worker processes (at least 1).
        initializer: Run once in each worker with ``initargs`` (e.g. load the models there).
        initargs: Arguments of ``initializer``.
        ahead: At most this many tasks submitted and not yet handed back (memory: a task's
            result may be a whole CT); None: all at once.

    Yields:
        The results in task order; a task's exception is raised when its turn comes. Closing
        the iterator early (an error or an interrupt in the caller) cancels the tasks not yet
        started.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    todo = iter(tasks)
    limit = ahead if ahead is not None else float("inf")
    pool = ProcessPoolExecutor(max_workers=max(int(workers), 1),
                               mp_context=multiprocessing.get_context("spawn"),
                               initializer=initializer, initargs=tuple(initargs))
    queue: deque = deque()
    try:
        for task in todo:
            queue.append(pool.submit(fn, *task))
            if len(queue) >= limit:
                break
        while queue:
            result = queue.popleft().result()
            for task in todo:  # top the queue up by one
                queue.append(pool.submit(fn, *task))
                break
            yield result
    finally:
        for future in queue:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
