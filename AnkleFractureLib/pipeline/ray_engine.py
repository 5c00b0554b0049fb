"""The Ray engine of :func:`~AnkleFractureLib.pipeline.batch.run_batch` (``--engine ray``).

Each Ray worker is an actor that holds its own :class:`~AnkleFractureLib.pipeline.pipeline.
Pipeline` (the models are loaded once per actor) and is given one case at a time; this process
(the driver) hands out the cases, writes ``results.csv`` as they finish (the rows and folders
are exactly those of the local engine) and counts the finished cases over the whole cluster
for the progress callback.

* Workers: ``workers`` actors (default: as many as the cluster's CPUs, or GPUs, allow at
  ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs each; never more than that). Each uses
  ``cpus_per_worker`` torch threads. With ``gpus_per_worker`` > 0 (fractions share a GPU) Ray
  gives the actor its GPU and ``device="auto"`` uses it; without, the actors see no GPU.
* Where: with no ``address`` (and no Ray already initialised in this process, e.g. by a
  notebook) a local Ray runtime with ``workers * cpus_per_worker`` CPUs is started for the batch
  and shut down after it; ``address="auto"`` or ``"ray://host:10001"`` joins a running cluster.
  On a cluster every node must have AnkleFractureLib and its models installed, and ``out_dir``
  must be the same shared folder on every node (case folders are written by the workers).
* A bad case is one error row (as in the local engine). A worker that dies (killed, out of
  memory, its node lost) has its case run again on a fresh actor, at most ``max_retries``
  times; after that the case is an error row and the batch goes on.
* Cancel (``should_cancel`` or Ctrl+C): the running cases are stopped (their actors are
  killed), the finished rows stay in ``results.csv``, and :class:`CancelledError` is raised.

Ray is an optional dependency (``pip install "AnkleFractureLib[distributed]"``); it is imported
only when this engine runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from AnkleFractureLib.errors import CancelledError, InputError

#: What to install for this engine.
INSTALL_HINT = 'pip install "AnkleFractureLib[distributed]"'

#: Test hook (for the test suite only): JSON ``{"case": ID, "file": PATH, "times": K}`` makes
#: the worker running case ID exit abruptly (``os._exit``) in the middle of the case, on the
#: first K attempts (counted in the file PATH, shared by all workers of one machine).
CRASH_HOOK_ENV = "ANKLE_FRACTURE_TEST_CRASH"

#: Exit status of a worker killed by the test hook.
_CRASH_EXIT = 17


@dataclass
class RaySettings:
    """How the Ray engine runs.

    Attributes:
        address: Ray cluster to join ("auto", "ray://head:10001", "10.0.0.1:6379"); None: the
            Ray already initialised in this process, else a local runtime started for the batch.
        workers: Actors (None: as many as the cluster's resources allow).
        cpus_per_worker: CPUs each actor reserves (and its torch threads).
        gpus_per_worker: GPUs each actor reserves (0: a CPU-only worker; 0.5: two per GPU).
        max_retries: How many times a case is run again after its worker died.
    """

    address: Optional[str] = None
    workers: Optional[int] = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_retries: int = 2

    def check(self) -> None:
        """Raise InputError for a setting out of range."""
        if self.workers is not None and int(self.workers) < 1:
            raise InputError(None, f"workers must be >= 1, got {self.workers}")
        if not self.cpus_per_worker > 0:
            raise InputError(None, f"cpus per worker must be > 0, got {self.cpus_per_worker}")
        if self.gpus_per_worker < 0:
            raise InputError(None, f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if int(self.max_retries) < 0:
            raise InputError(None, f"max retries must be >= 0, got {self.max_retries}")


@dataclass
class RayRunInfo:
    """What the Ray engine reports back to the batch.

    Attributes:
        workers: Actors started at the beginning.
        retried: Case attempts run again after a worker died.
        warnings: Notes for the batch summary.
    """

    workers: int = 0
    retried: int = 0
    warnings: List[str] = field(default_factory=list)


def import_ray() -> Any:
    """The ``ray`` module, or an InputError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError(None, "the Ray engine needs Ray, which is not installed here: "
                               f"{INSTALL_HINT} (or use --engine local)") from None
    return ray


# ---------------------------------------------------------------------- the worker
def _crash_hook_progress(hook: Optional[Dict[str, Any]], case_id: str
                         ) -> Optional[Callable[[float, str], None]]:
    """The progress callback that carries out the test hook for ``case_id`` (None: no hook)."""
    if not hook or hook.get("case") != case_id:
        return None

    armed = [True]

    def progress(fraction: float, message: str) -> None:
        if fraction < 0.03 or not armed[0]:  # still reading: crash once the analysis began
            return
        armed[0] = False  # one check per attempt
        with open(hook["file"], "a", encoding="utf-8") as fh:
            fh.write("x")
        if os.path.getsize(hook["file"]) <= int(hook.get("times", 1)):
            os._exit(_CRASH_EXIT)

    return progress


class CaseWorker:
    """One Ray actor's state: a Pipeline, loaded once, that analyses one case per call.

    Args:
        options: The batch's PipelineOptions.
        threads: torch CPU threads of this worker.
        crash_hook: The test hook's settings (see :data:`CRASH_HOOK_ENV`), normally None.

    Raises:
        InputError: The requested device is not available to this worker.
    """

    def __init__(self, options: Any, threads: int, crash_hook: Optional[Dict[str, Any]] = None
                 ) -> None:
        import torch

        from AnkleFractureLib.pipeline.pipeline import Pipeline
        from AnkleFractureLib.segmentation.inference import resolve_device

        torch.set_num_threads(max(1, int(threads)))
        self.device = str(resolve_device(options.device))
        self.pipeline = Pipeline(options)
        self.crash_hook = crash_hook

    def ready(self, load_models: bool) -> Dict[str, Any]:
        """Load the models (when asked) and say where this worker runs."""
        if load_models:
            p = self.pipeline
            _ = (p.segmentation_model, p.classifier, p.template)
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": self.device}

    def run(self, case: Any, out_dir: str, report_pdf: bool) -> Dict[str, Any]:
        """One case (see :func:`~AnkleFractureLib.pipeline.batch._process_case`), plus the host."""
        from AnkleFractureLib.pipeline.batch import _process_case

        progress = _crash_hook_progress(dict(self.crash_hook or {}), case.id)
        outcome = _process_case(self.pipeline, case, Path(out_dir), report_pdf, progress)
        outcome["host"] = socket.gethostname()
        return outcome


# ---------------------------------------------------------------------- the runtime
def _start_runtime(ray: Any, settings: RaySettings) -> bool:
    """Connect to Ray; True when this call started it (and the batch must shut it down)."""
    if ray.is_initialized():
        return False
    common = dict(logging_level=logging.WARNING, log_to_driver=False)
    if settings.address:
        ray.init(address=settings.address, **common)
        return True
    package_root = str(Path(__file__).resolve().parents[2])
    before = os.environ.get("PYTHONPATH")
    paths = [package_root] + [p for p in (before or "").split(os.pathsep) if p]
    num_cpus = (math.ceil(int(settings.workers) * settings.cpus_per_worker) if settings.workers
                else os.cpu_count() or 1)
    # The local runtime's processes inherit this environment, so the workers find the package
    # without a runtime_env (which costs every worker a round trip to Ray's runtime-env agent:
    # about a second of a short batch on 2 cores).
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **common)
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before
    return True


def _worker_count(ray: Any, settings: RaySettings, n_todo: int, info: RayRunInfo) -> int:
    """Actors to start: as asked, capped by what the cluster can hold and by the cases."""
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))
    cpw, gpw = float(settings.cpus_per_worker), float(settings.gpus_per_worker)
    if gpw > 0 and gpus < gpw:
        raise InputError(None, f"--gpus-per-worker {gpw:g}: the Ray cluster has {gpus:g} GPUs "
                               "(use 0 for CPU-only workers)")
    if cpus < cpw:
        raise InputError(None, f"each worker needs {cpw:g} CPUs but the Ray cluster has "
                               f"{cpus:g}")
    fit = int(cpus // cpw)
    if gpw > 0:
        fit = min(fit, int(gpus // gpw))
    asked = int(settings.workers) if settings.workers else fit
    if asked > fit:
        info.warnings.append(f"{asked} Ray workers were asked for but the cluster holds "
                             f"{fit} ({cpus:g} CPUs, {gpus:g} GPUs); {fit} were used")
    return max(1, min(asked, fit, n_todo))


def _crash_hook() -> Optional[Dict[str, Any]]:
    text = os.environ.get(CRASH_HOOK_ENV)
    return json.loads(text) if text else None


def _died_reason(exc: BaseException) -> str:
    """A one-line reason from a Ray error (its last non-empty line)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]


def _wait_ready(ray: Any, actors: Sequence[Any], load_models: bool) -> List[Dict[str, Any]]:
    """Wait until every actor has started (and loaded the models); InputError if one fails."""
    refs = [a.ready.remote(load_models) for a in actors]
    try:
        return ray.get(refs)
    except ray.exceptions.RayError as exc:
        raise InputError(None, f"the Ray workers could not start: {_died_reason(exc)}") from None


# ---------------------------------------------------------------------- scheduling
class _Scheduler:
    """Hands the cases to the actors one at a time and records what comes back."""

    def __init__(self, ray: Any, remote_cls: Any, make_args: Tuple[Any, ...],
                 cases: Sequence[Any], out: Path, report_pdf: bool,
                 finish: Callable[[int, Dict[str, Any]], None],
                 report: Callable[[float, str], None], n: int, done: int,
                 settings: RaySettings, info: RayRunInfo) -> None:
        self.ray, self.remote_cls, self.make_args = ray, remote_cls, make_args
        self.cases, self.out, self.report_pdf = cases, out, report_pdf
        self.finish, self.report, self.n, self.done = finish, report, n, done
        self.settings, self.info = settings, info
        self.idle: List[Any] = []
        self.inflight: Dict[Any, Tuple[Any, int]] = {}
        self.queue: Deque[int] = deque()
        self.attempts: Dict[int, int] = {}
        self.invisible_warned = False

    def new_actor(self) -> Any:
        return self.remote_cls.remote(*self.make_args)

    def submit(self) -> None:
        while self.idle and self.queue:
            actor, i = self.idle.pop(), self.queue.popleft()
            self.attempts[i] = self.attempts.get(i, 0) + 1
            ref = actor.run.remote(self.cases[i], str(self.out), self.report_pdf)
            self.inflight[ref] = (actor, i)

    def step(self, timeout: float = 0.25) -> None:
        """Start what can start, then handle the cases that finished within ``timeout``."""
        self.submit()
        if not self.inflight:
            return
        # Wake on the first finished case (its actor gets the next one at once), then take
        # every other case that has finished by then too.
        ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=timeout)
        if ready:
            ready, _ = self.ray.wait(list(self.inflight), num_returns=len(self.inflight),
                                     timeout=0)
        for ref in sorted(ready, key=lambda r: self.inflight[r][1]):
            self.collect(ref)

    def collect(self, ref: Any) -> None:
        actor, i = self.inflight.pop(ref)
        ray = self.ray
        try:
            outcome = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # an exception escaped _process_case
            outcome = {"data": None, "seconds": 0.0,
                       "error": f"internal error: {_died_reason(exc)}"}
        except ray.exceptions.RayError as exc:  # the worker died: killed, OOM, node lost
            self.worker_died(actor, i, exc)
            return
        self.idle.append(actor)
        self.record(i, outcome)

    def worker_died(self, actor: Any, i: int, exc: BaseException) -> None:
        """Retry case ``i`` on a fresh actor, or give it its error row after the last try."""
        with contextlib.suppress(Exception):  # Ray raises many kinds here
            self.ray.kill(actor, no_restart=True)
        case, tries = self.cases[i], self.attempts[i]
        if tries <= int(self.settings.max_retries):
            self.info.retried += 1
            self.queue.appendleft(i)
            self.report(self.done / self.n, f"{case.id}: its Ray worker died "
                                            f"({_died_reason(exc)}); retrying on a new worker")
        else:
            self.record(i, {"data": None, "seconds": 0.0,
                            "error": f"internal error: the Ray worker running this case died "
                                     f"{tries} times (out of memory, or killed?), last: "
                                     f"{_died_reason(exc)}; run the batch again to retry it"})
        if self.queue:
            self.idle.append(self.new_actor())

    def record(self, i: int, outcome: Dict[str, Any]) -> None:
        case = self.cases[i]
        if outcome.get("data") and not (self.out / case.id / "result.json").is_file() \
                and not self.invisible_warned:
            self.invisible_warned = True
            self.info.warnings.append(
                f"{case.id}: its folder was written on {outcome.get('host')} and is not visible "
                f"here; --out must be a folder shared by every Ray node")
        outcome = {k: v for k, v in outcome.items() if k != "host"}
        self.finish(i, outcome)
        self.done += 1
        status = "error" if outcome.get("error") else "done"
        self.report(self.done / self.n, f"{case.id} ({self.done}/{len(self.cases)}): {status}")

    def drain_finished(self) -> None:
        """Record the cases that have already finished (on cancel)."""
        if not self.inflight:
            return
        ready, _ = self.ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)
        for ref in sorted(ready, key=lambda r: self.inflight[r][1]):
            actor, i = self.inflight.pop(ref)
            with contextlib.suppress(Exception):  # Ray raises many kinds here
                outcome = self.ray.get(ref)
                if isinstance(outcome, dict) and not outcome.get("cancelled"):
                    self.record(i, outcome)

    def kill_all(self) -> None:
        for actor in self.idle + [a for a, _ in self.inflight.values()]:
            with contextlib.suppress(Exception):  # Ray raises many kinds here
                self.ray.kill(actor, no_restart=True)
        self.idle, self.inflight = [], {}


def run_on_ray(cases: Sequence[Any], todo: Sequence[int], out: Path, options: Any,
               report_pdf: bool, finish: Callable[[int, Dict[str, Any]], None],
               report: Callable[[float, str], None], n: int, done: int,
               should_cancel: Optional[Callable[[], bool]], settings: RaySettings
               ) -> RayRunInfo:
    """Run the cases of ``todo`` on Ray actors (see the module docstring).

    Args:
        cases: All cases of the batch (``todo`` indexes them).
        todo: Indices of the cases to run, in order.
        out: The batch's output folder (absolute; shared by every node).
        options: PipelineOptions for every worker.
        report_pdf: Also write ``report.pdf``.
        finish: Called with (case index, outcome) as each case finishes (writes its row).
        report: Progress callback of the whole batch.
        n: Cases in the batch (the progress denominator).
        done: Cases already finished (resumed).
        should_cancel: Polled about 4 times a second; True cancels.
        settings: The engine's settings.

    Returns:
        The :class:`RayRunInfo`.

    Raises:
        InputError: Ray is not installed, the cluster cannot hold one worker, or the workers
            cannot start (a device or model folder they cannot use).
        CancelledError: Cancelled or interrupted; finished rows have been recorded.
    """
    settings.check()
    ray = import_ray()
    started = _start_runtime(ray, settings)
    try:
        return _run(ray, cases, todo, out, options, report_pdf, finish, report, n, done,
                    should_cancel, settings)
    finally:
        if started:
            ray.shutdown()


def _run(ray: Any, cases: Sequence[Any], todo: Sequence[int], out: Path, options: Any,
         report_pdf: bool, finish: Callable[[int, Dict[str, Any]], None],
         report: Callable[[float, str], None], n: int, done: int,
         should_cancel: Optional[Callable[[], bool]], settings: RaySettings) -> RayRunInfo:
    info = RayRunInfo()
    n_actors = _worker_count(ray, settings, len(todo), info)
    remote_cls = ray.remote(num_cpus=settings.cpus_per_worker,
                            num_gpus=settings.gpus_per_worker, max_restarts=0)(CaseWorker)
    threads = max(1, int(settings.cpus_per_worker))
    sched = _Scheduler(ray, remote_cls, (options, threads, _crash_hook()), cases, out,
                       report_pdf, finish, report, n, done, settings, info)
    sched.queue.extend(todo)
    info.workers = n_actors
    cancelled = False
    try:
        report(done / n, f"starting {n_actors} Ray worker{'s' if n_actors > 1 else ''}")
        sched.idle = [sched.new_actor() for _ in range(n_actors)]
        _wait_ready(ray, sched.idle, any(cases[i].kind != "missing" for i in todo))
        while sched.queue or sched.inflight:
            if should_cancel is not None and should_cancel():
                cancelled = True
                break
            sched.step()
    except KeyboardInterrupt:
        cancelled = True
    finally:
        if cancelled:
            with contextlib.suppress(Exception):  # Ray raises many kinds here
                sched.drain_finished()
        sched.kill_all()
    if cancelled:
        raise CancelledError("the batch was cancelled")
    return info
