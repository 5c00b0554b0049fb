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
        env = dict(os.environ)
        env.update(self.extraEnv)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(libraryPath())] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.setdefault("PYTHONUNBUFFERED", "1")
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
        p = self._process
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout)
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

    def _tail(self, name: str, size: int = 16384) -> List[str]:
        path = self.workDir / name
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - size))
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return []
        # A progress bar rewrites its line with carriage returns: keep the latest state.
        return [ln.split("\r")[-1].strip() for ln in text.splitlines() if ln.strip()]

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


def pythonExecutable() -> str:
    """The Python to run children with: Slicer's ``PythonSlicer`` inside Slicer, else ours."""
    import shutil

    # Inside Slicer sys.executable is the application itself; PythonSlicer is its interpreter.
    found = shutil.which("PythonSlicer")
    return found or sys.executable
