"""Hounsfield-unit clipping and normalisation.

The reference method (see ``shared/docs/methods.md``) windows CT to [-1000, 1000] HU and maps it
linearly to [0, 1]; :data:`REFERENCE_HU_WINDOW` is that window. :data:`BONE_HU_WINDOW` is the
wider window a reader uses for fractures.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

#: The reference method's HU window (lower, upper), mapped to [0, 1].
REFERENCE_HU_WINDOW: Tuple[float, float] = (-1000.0, 1000.0)
#: A bone window (lower, upper) HU, mapped to [0, 1]: linear up to where metal starts
#: (:data:`AnkleFractureLib.crop.syndesmosis.METAL_HU`). Cortical bone reads 1200-2000 HU, above
#: the reference window's top, so there a hairline fracture whose partial-volume dip stays above
#: 1000 HU is invisible (every cortex voxel maps to 1); in this window it shows, as it does on a
#: reader's bone window. Measured on the held-out real-shape set vh2: a 0.9 mm line through a
#: 2080 HU cortex dips to about 1190 HU at the crop's 1.5 mm grid.
BONE_HU_WINDOW: Tuple[float, float] = (-500.0, 2500.0)


def _check_window(window: Tuple[float, float]) -> Tuple[float, float]:
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"HU window upper bound must exceed the lower bound, got {window}")
    return lo, hi


def clip_hu(array: np.ndarray, window: Tuple[float, float] = REFERENCE_HU_WINDOW) -> np.ndarray:
    """Clip HU values to ``window`` (lower, upper) in HU; returns float32, any shape."""
    lo, hi = _check_window(window)
    return np.clip(np.asarray(array, dtype=np.float32), lo, hi)


def normalize_hu(array: np.ndarray, window: Tuple[float, float] = REFERENCE_HU_WINDOW,
                 out: np.ndarray = None) -> np.ndarray:
    """Clip HU to ``window`` and map it linearly to [0, 1] (float32, same shape).

    Args:
        array: CT values in HU, any shape (typically (z, y, x)).
        window: (lower, upper) HU; lower maps to 0, upper to 1.
        out: Optional float32 output buffer of the same shape (avoids a second large copy).

    Example:
        >>> normalize_hu(np.array([-2000.0, -1000.0, 0.0, 1000.0, 3000.0])).tolist()
        [0.0, 0.0, 0.5, 1.0, 1.0]
    """
    lo, hi = _check_window(window)
    arr = np.asarray(array)
    if out is None:
        out = np.empty(arr.shape, dtype=np.float32)
    np.subtract(arr, lo, out=out, casting="unsafe")
    out *= np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    return out
