"""A dependency-free text progress bar for the command line."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class ProgressBar:
    """Draws ``[#####.....]  42%  message`` on a terminal (plain lines when not a TTY).

    Use it as the ``progress(fraction, message)`` callback of library functions.
    """

    def __init__(self, label: str = "", stream: Optional[TextIO] = None, width: int = 30,
                 enabled: bool = True) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self._last_message = None

    def __call__(self, fraction: float, message: str = "") -> None:
        if not self.enabled:
            return
        fraction = min(max(float(fraction), 0.0), 1.0)
        filled = int(round(fraction * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.monotonic() - self.start
        text = f"{self.label} [{bar}] {fraction * 100:3.0f}% {elapsed:5.1f}s {message}"
        if self.tty:
            self.stream.write("\r\x1b[2K" + text[:200])
            if fraction >= 1.0:
                self.stream.write("\n")
        elif message != self._last_message:
            self.stream.write(text + "\n")
        self._last_message = message
        self.stream.flush()
