"""Size and sanity limits shared by the readers.

The size check runs on header information only, before any pixel is read, so that a corrupt or
hostile header (e.g. a MetaImage declaring 4000^3 voxels) is refused without allocating memory.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from AnkleFractureLib.errors import InputError, PathLike

#: Largest image accepted by default, in voxels: 2^30 voxels = 4 GiB as float32. An ankle CT is
#: typically 512 x 512 x 200-800 voxels (50-200 M voxels), so this leaves a wide margin.
MAX_VOXELS: int = 2 ** 30

#: Bytes per voxel used for the memory estimate (float32 is the working type of the pipeline).
BYTES_PER_VOXEL: int = 4


def check_voxel_budget(path: PathLike, size: Sequence[int], max_voxels: int) -> None:
    """Refuse an image whose voxel count exceeds ``max_voxels``.

    Args:
        path: The file or folder, for the message.
        size: Image size in any axis order (voxels per axis, components included).
        max_voxels: The limit in voxels.

    Raises:
        InputError: With the size in voxels and GiB (at 4 bytes per voxel).
    """
    n = int(np.prod([int(s) for s in size], dtype=object))  # object: no int64 overflow
    if n > max_voxels:
        gib = n * BYTES_PER_VOXEL / 2 ** 30
        dims = " x ".join(str(int(s)) for s in size)
        raise InputError(
            path,
            f"image too large: {dims} = {n} voxels ({gib:.1f} GiB as float32), "
            f"limit is {max_voxels} voxels ({max_voxels * BYTES_PER_VOXEL / 2 ** 30:.1f} GiB); "
            "crop or downsample it first, or raise max_voxels")


def check_finite(path: PathLike, array: np.ndarray) -> None:
    """Refuse an array holding NaN or infinite values.

    Args:
        path: The file or folder, for the message.
        array: Voxel values (any dtype; integer arrays pass at once).

    Raises:
        InputError: "contains N non-finite voxels".
    """
    if not np.issubdtype(array.dtype, np.floating):
        return
    finite = np.isfinite(array)
    if not finite.all():
        n_bad = int(array.size - np.count_nonzero(finite))
        raise InputError(path, f"contains {n_bad} non-finite voxels (NaN or inf)")
