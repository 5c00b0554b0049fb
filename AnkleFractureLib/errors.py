"""Project exception types.

Every error that a user can cause (a bad file, a bad argument, a scan that cannot support an
answer) is raised as an :class:`AnkleFractureError` subclass whose message names the file and the
problem. The command line catches this base class, prints the message and exits non-zero, so a
user never sees a traceback from deep inside numpy or ITK.
"""

from __future__ import annotations

import os
from typing import Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


class AnkleFractureError(Exception):
    """Base class of every error AnkleFracture raises on purpose."""


class InputError(AnkleFractureError):
    """An input file or folder cannot be used.

    Args:
        path: The offending file or folder (may be None for in-memory input).
        reason: A plain-language reason, e.g. ``"no DICOM files found"``.

    Example:
        >>> str(InputError("/data/ct.nii.gz", "file does not exist"))
        '/data/ct.nii.gz: file does not exist'
    """

    def __init__(self, path: Optional[PathLike], reason: str) -> None:
        self.path = None if path is None else os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path is not None else reason)


class GeometryError(AnkleFractureError):
    """Two images or an image and a transform do not share a usable geometry."""


class CancelledError(AnkleFractureError):
    """The user cancelled a long-running operation through its cancel hook."""
