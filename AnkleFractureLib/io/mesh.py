"""Triangle surface meshes: STL (binary or ASCII) to a numpy array of triangles.

Only what the phantom's shape library needs: read the triangles, with clear errors for a file
that is missing, truncated or not an STL. Coordinates are returned as stored (the file's own
frame and units, usually mm); no frame conversion happens here.

Example:
    >>> import os, tempfile, numpy as np
    >>> tri = np.array([[[0, 0, 0], [1, 0, 0], [0, 1, 0]]], dtype=np.float32)
    >>> path = os.path.join(tempfile.mkdtemp(), "one.stl")
    >>> write_stl(path, tri)
    >>> read_stl(path).shape
    (1, 3, 3)
"""

from __future__ import annotations

import os
import re
import struct

import numpy as np

from AnkleFractureLib.errors import InputError, PathLike

_BINARY = np.dtype([("normal", "<f4", 3), ("v", "<f4", (3, 3)), ("attr", "<u2")])
_FLOAT = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_VERTEX = re.compile(rb"vertex\s+(" + _FLOAT.encode() + rb")\s+(" + _FLOAT.encode()
                     + rb")\s+(" + _FLOAT.encode() + rb")")


def _binary_count(data: bytes) -> int:
    """Triangle count of a binary STL, or -1 when the size does not match a binary STL."""
    if len(data) < 84:
        return -1
    n = struct.unpack("<I", data[80:84])[0]
    return n if 84 + 50 * n == len(data) else -1


def read_stl(path: PathLike) -> np.ndarray:
    """Read an STL file (binary or ASCII).

    Args:
        path: The ``.stl`` file.

    Returns:
        Triangles, float64 array (n, 3, 3): triangle, vertex, coordinate (x, y, z in the file's
        frame and units).

    Raises:
        InputError: Missing file, not an STL, truncated data or no triangles.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(path, "mesh file does not exist")
    with open(path, "rb") as f:
        data = f.read()
    n = _binary_count(data)
    if n >= 0:
        tri = np.frombuffer(data, _BINARY, count=n, offset=84)["v"].astype(np.float64)
    elif data.lstrip()[:5].lower() == b"solid":
        values = _VERTEX.findall(data)
        if len(values) % 3:
            raise InputError(path, f"ASCII STL holds {len(values)} vertices, not a multiple of 3")
        tri = np.asarray(values, dtype=np.float64).reshape(-1, 3, 3)
    else:
        raise InputError(path, "not an STL file (neither a binary STL of matching size nor "
                               "ASCII 'solid ...')")
    if tri.shape[0] == 0:
        raise InputError(path, "STL file holds no triangles")
    if not np.isfinite(tri).all():
        raise InputError(path, "STL file holds non-finite coordinates")
    return tri


def write_stl(path: PathLike, triangles: np.ndarray) -> None:
    """Write triangles (n, 3, 3) as a binary STL (normals from the vertex order)."""
    tri = np.asarray(triangles, dtype=np.float32).reshape(-1, 3, 3)
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    rec = np.zeros(tri.shape[0], _BINARY)
    rec["normal"], rec["v"] = normal, tri
    with open(os.fspath(path), "wb") as f:
        f.write(b"AnkleFractureLib STL".ljust(80, b" "))
        f.write(struct.pack("<I", tri.shape[0]))
        f.write(rec.tobytes())
