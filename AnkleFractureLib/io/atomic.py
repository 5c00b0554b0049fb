"""Atomic file output: a reader never sees a half-written result.

Every output of the library goes through :func:`atomic_output`: the writer writes a temporary
file in the destination folder (same file system, so the final :func:`os.replace` is atomic) whose
name keeps the full extension (``.nii.gz`` stays ``.nii.gz``) so that writers that choose the
format from the extension, like SimpleITK, still do the right thing. On success the temporary
file replaces the destination; on any exception it is deleted and the destination is untouched.

Example:
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> atomic_write_json(os.path.join(d, "a", "report.json"), {"weber": "B"})
    >>> open(os.path.join(d, "a", "report.json")).read()
    '{\\n  "weber": "B"\\n}\\n'
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from typing import Any, Iterator, Tuple

from AnkleFractureLib.errors import PathLike

#: Suffixes that only say "compressed" and belong with the suffix before them.
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


def split_extension(path: PathLike) -> Tuple[str, str]:
    """Split a file name into (stem, extension), keeping compound extensions whole.

    Args:
        path: A file path or name.

    Returns:
        ``(stem, ext)`` with ``ext`` lower-cased, e.g. ``("ct", ".nii.gz")`` for ``ct.NII.GZ``.
        ``ext`` is ``""`` when the name has no extension.
    """
    name = os.path.basename(os.fspath(path))
    stem, ext = os.path.splitext(name)
    if ext.lower() in _COMPRESSION_SUFFIXES:
        stem2, ext2 = os.path.splitext(stem)
        if ext2:
            return stem2, (ext2 + ext).lower()
    return stem, ext.lower()


def _temp_name(path: str) -> str:
    folder = os.path.dirname(path)
    name = os.path.basename(path)
    stem, _ = split_extension(name)
    ext = name[len(stem):]  # the original spelling of the extension
    # Hidden (leading dot) and random, so concurrent writers of the same output never collide
    # and folder listings / globbing for "*.nii.gz" do not pick it up as a finished output.
    return os.path.join(folder, f".{stem}.{secrets.token_hex(4)}.tmp{ext}")


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[str]:
    """Context manager yielding a temporary path that replaces ``path`` on success.

    The temporary file lives in the same folder as ``path`` and has the same (compound)
    extension, e.g. ``out/.ct.3f9a1c2e.tmp.nii.gz`` for ``out/ct.nii.gz``. Parent folders are
    created. If the body raises, the temporary file is removed and ``path`` is left as it was.
    If the body does not create the temporary file, ``path`` is not touched.

    Args:
        path: The final destination.

    Yields:
        The temporary path (str) to write to.

    Example:
        >>> import tempfile, os
        >>> dest = os.path.join(tempfile.mkdtemp(), "x.txt")
        >>> with atomic_output(dest) as tmp:
        ...     _ = open(tmp, "w").write("done")
        >>> open(dest).read()
        'done'
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        if os.path.exists(tmp):
            os.replace(tmp, path)
    except BaseException:
        # BaseException too: a KeyboardInterrupt mid-write must not leave a temp file behind.
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (parent folders are created).

    Args:
        path: Destination file.
        text: The full content.
        encoding: Text encoding (UTF-8 by default).
    """
    with atomic_output(path) as tmp:
        # newline="" keeps "\n" as is on every platform, so outputs are byte-identical.
        with open(tmp, "w", encoding=encoding, newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (parent folders are created).

    Args:
        path: Destination file.
        data: The full content.
    """
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_torch_save(payload: Any, path: PathLike) -> None:
    """``torch.save(payload)`` to ``path`` atomically, with bytes that depend on the payload only.

    ``torch.save`` to a file names the zip archive's root folder after the file's stem; saved
    straight to :func:`atomic_output`'s random temporary name, two identical trainings gave
    weights files with different bytes, so a model's sha256 could not show that a training
    command was reproduced. Saved to memory first, the root is always ``archive``.

    Args:
        payload: Anything ``torch.save`` accepts (a dict of tensors and plain values).
        path: Destination file (``model.pt``).

    Example:
        >>> import hashlib, os, tempfile, torch
        >>> d = tempfile.mkdtemp()
        >>> for name in ("a.pt", "b.pt"):
        ...     atomic_torch_save({"w": torch.ones(3)}, os.path.join(d, name))
        >>> digest = lambda n: hashlib.sha256(open(os.path.join(d, n), "rb").read()).digest()
        >>> digest("a.pt") == digest("b.pt")
        True
    """
    import io

    import torch  # heavy: imported only by the writers of weights

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_json(path: PathLike, data: Any) -> None:
    """Write ``data`` as JSON (indent 2, keys in insertion order, final newline), atomically.

    Args:
        path: Destination file.
        data: Anything :func:`json.dumps` accepts.
    """
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
