"""Work in a separate process, polled: Slicer stays responsive and Cancel really stops it.

:class:`BackgroundProcess` starts a command with its output going to files in a work folder
(no pipes, so nothing can block and no thread is needed); the panel polls it with a Qt timer
(:meth:`BackgroundProcess.poll`) and reads progress from the JSON lines of
:mod:`AnkleFractureLib.pipeline.job`, or from the last line a training command printed.
:meth:`BackgroundProcess.cancel` terminates the process (and kills it if it does not stop).

Example:
    >>> import sys, tempfile
    >>> job = BackgroundProcess([sys.executable, "-c", "print('hello')"], tempfile.mkdtemp())
    >>> job.start().wait(30).returncode
    0
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from AnkleFractureLib.pipeline.job import ERROR_FILE, parse_progress

PathLike = Union[str, "os.PathLike[str]"]

STDOUT = "stdout.log"
STDERR = "stderr.log"


def libraryPath() -> Path:
    """The folder that holds the ``AnkleFractureLib`` package (put on the child's PYTHONPATH)."""
    import AnkleFractureLib

    return Path(AnkleFractureLib.__file__).resolve().parent.parent


def childEnvironment(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of a child process: ours, ``extra``, AnkleFractureLib on PYTHONPATH."""
    env = dict(os.environ)
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join(
        [str(libraryPath())] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def endProcess(process: subprocess.Popen, timeout: float = 5.0) -> None:
    """Terminate a process, and kill it if it is still there after ``timeout`` s."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def tailLines(path: Path, size: int = 16384) -> List[str]:
    """The non-empty lines of the last ``size`` bytes of a log ([] when unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    # A progress bar rewrites its line with carriage returns: keep the latest state.
    return [ln.split("\r")[-1].strip() for ln in text.splitlines() if ln.strip()]


@dataclass
class ProcessState:
    """What :meth:`BackgroundProcess.poll` reports.

    Attributes:
        running: The process has not ended.
        fraction: Progress in [0, 1], or None when the command does not report it.
        message: The latest progress message or output line.
        returncode: Exit status once ended (None while running; negative: killed by a signal).
        cancelled: :meth:`BackgroundProcess.cancel` stopped it.
        error: Plain-words error of a failed process, else None.
    """

    running: bool
    fraction: Optional[float]
    message: str
    returncode: Optional[int]
    cancelled: bool = False
    error: Optional[str] = None

    @property
    def succeeded(self) -> bool:
        return not self.running and self.returncode == 0 and not self.cancelled


class BackgroundProcess:
    """A command running in its own process, with logs in ``workDir``.

    Args:
        args: Command and arguments.
        workDir: Folder for stdout.log / stderr.log (created).
        outputDir: Where the command writes ``job_error.json`` on failure (default workDir).
        env: Extra environment variables; ``AnkleFractureLib``'s folder is prepended to
            PYTHONPATH so the child imports the same library as Slicer.
    """

    def __init__(self, args: Sequence[str], workDir: PathLike,
                 outputDir: Optional[PathLike] = None,
                 env: Optional[Dict[str, str]] = None) -> None:
        self.args = [str(a) for a in args]
        self.workDir = Path(workDir)
        self.outputDir = Path(outputDir) if outputDir is not None else self.workDir
        self.extraEnv = dict(env or {})
        self._process: Optional[subprocess.Popen] = None
        self._cancelled = False
        self._files: List = []
        self.startTime = 0.0

    # ------------------------------------------------------------------ control
    def start(self) -> "BackgroundProcess":
        """Start the process (once)."""
        if self._process is not None:
            raise RuntimeError("the process was already started")
        self.workDir.mkdir(parents=True, exist_ok=True)
        env = childEnvironment(self.extraEnv)
        out = open(self.workDir / STDOUT, "wb")  # noqa: SIM115 - closed when it ends
        err = open(self.workDir / STDERR, "wb")  # noqa: SIM115
        self._files = [out, err]
        self._process = subprocess.Popen(self.args, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, env=env,
                                         cwd=str(self.workDir))
        self.startTime = time.monotonic()
        return self

    def cancel(self, timeout: float = 5.0) -> None:
        """Stop the process: terminate, and kill it if it is still there after ``timeout`` s."""
        self._cancelled = True
        if self._process is not None and self._process.poll() is None:
            endProcess(self._process, timeout)
            self._close()

    def wait(self, timeout: Optional[float] = None) -> ProcessState:
        """Block until the process ends (or ``timeout`` s); returns :meth:`poll`."""
        if self._process is not None:
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.poll()

    # ------------------------------------------------------------------ state
    @property
    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.monotonic() - self.startTime if self.startTime else 0.0

    def _close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def _tail(self, name: str) -> List[str]:
        return tailLines(self.workDir / name)

    def poll(self) -> ProcessState:
        """The process's state now (cheap: reads the end of its logs)."""
        if self._process is None:
            return ProcessState(False, None, "not started", None)
        code = self._process.poll()
        running = code is None
        lines = self._tail(STDOUT)
        record = parse_progress(lines)
        if record is not None:
            fraction: Optional[float] = float(record["progress"])
            message = str(record.get("message", ""))
        else:
            fraction = None
            tail = lines or self._tail(STDERR)
            message = tail[-1] if tail else ""
        error = None
        if not running:
            self._close()
            if self._cancelled:
                message = "cancelled"
            elif code != 0:
                error = self.errorMessage()
        return ProcessState(running, fraction, message, code, self._cancelled, error)

    def errorMessage(self) -> str:
        """Why the process failed: its ``job_error.json``, else the end of its stderr."""
        try:
            data = json.loads((self.outputDir / ERROR_FILE).read_text(encoding="utf-8"))
            return str(data.get("error") or data)
        except (OSError, ValueError):
            pass
        tail = self._tail(STDERR)
        code = self._process.returncode if self._process is not None else None
        return (tail[-1] if tail else f"the process ended with exit status {code}")


class WorkerProcess:
    """A warm ``python -m AnkleFractureLib.pipeline.job --serve`` process.

    The models load once and stay loaded: after the first click, Segment, Register and
    Classify pay no Python start-up, imports or model loading (seconds on a CPU). Requests go
    one per line on the process's stdin; each writes its progress to its own file
    (:class:`WorkerTask` reads it). Cancelling a task ends the process (the next request
    starts a fresh one), so Cancel really stops the work. The process ends by itself when
    Slicer does (its stdin closes).

    Args:
        python: The interpreter (Slicer's PythonSlicer inside Slicer).
        workDir: Folder for the process's log (worker.log).
    """

    def __init__(self, python: str, workDir: PathLike) -> None:
        self.python = python
        self.workDir = Path(workDir)
        self._process: Optional[subprocess.Popen] = None
        self._log = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self.running else None

    def start(self) -> None:
        self.stop()
        self.workDir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.workDir / "worker.log", "ab")  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(
            [self.python, "-m", "AnkleFractureLib.pipeline.job", "--serve"],
            stdin=subprocess.PIPE, stdout=self._log, stderr=self._log,
            env=childEnvironment(), cwd=str(self.workDir))

    def submit(self, requestPath: PathLike, progressPath: PathLike,
               outputDir: PathLike) -> "WorkerTask":
        """Queue one request (the process is started first when it is not running)."""
        if not self.running:
            self.start()
        Path(progressPath).write_text("", encoding="utf-8")
        line = f"{requestPath}\t{progressPath}\n"
        self._process.stdin.write(line.encode("utf-8"))
        self._process.stdin.flush()
        return WorkerTask(self, Path(progressPath), Path(outputDir))

    def returncode(self) -> Optional[int]:
        return None if self._process is None else self._process.poll()

    def logTail(self) -> List[str]:
        return tailLines(self.workDir / "worker.log")

    def kill(self, timeout: float = 5.0) -> None:
        """End the process now (what Cancel does)."""
        if self._process is not None:
            endProcess(self._process, timeout)
        self._closeLog()

    def stop(self, timeout: float = 10.0) -> None:
        """Let the process finish its request and end (closing its stdin), else end it."""
        p = self._process
        if p is not None and p.poll() is None:
            try:
                p.stdin.close()
                p.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self._closeLog()

    def _closeLog(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class WorkerTask:
    """One request of a :class:`WorkerProcess`; the same interface as
    :class:`BackgroundProcess` (poll, wait, cancel, elapsed)."""

    def __init__(self, worker: WorkerProcess, progressPath: Path, outputDir: Path) -> None:
        self.worker = worker
        self.progressPath = progressPath
        self.outputDir = outputDir
        self.startTime = time.monotonic()
        self._cancelled = False

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.startTime

    def cancel(self) -> None:
        self._cancelled = True
        self.worker.kill()

    def poll(self) -> ProcessState:
        lines = tailLines(self.progressPath)
        record = None
        for line in reversed(lines):
            try:
                record = json.loads(line)
                break
            except ValueError:
                continue  # a line still being written
        if record is not None and record.get("done"):
            code = int(record.get("exit", 1))
            return ProcessState(False, record.get("progress"), str(record.get("message", "")),
                                code, self._cancelled, record.get("error") if code else None)
        fraction = record.get("progress") if record else None
        message = str(record.get("message", "")) if record else "starting"
        if self._cancelled:
            return ProcessState(False, fraction, "cancelled", self.worker.returncode(), True)
        if not self.worker.running:  # the process died under this request
            tail = self.worker.logTail()
            return ProcessState(False, fraction, message, self.worker.returncode() or -1, False,
                                tail[-1] if tail else "the worker process ended unexpectedly")
        return ProcessState(True, fraction, message, None)

    def wait(self, timeout: Optional[float] = None) -> ProcessState:
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.poll()
            if not state.running or (end is not None and time.monotonic() > end):
                return state
            time.sleep(0.1)


def pythonExecutable() -> str:
    """The Python to run children with: Slicer's ``PythonSlicer`` inside Slicer, else ours."""
    import shutil

    # Inside Slicer sys.executable is the application itself; PythonSlicer is its interpreter.
    found = shutil.which("PythonSlicer")
    return found or sys.executable
