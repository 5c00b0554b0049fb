"""The fibula window: the part of the syndesmosis crop that the fracture localiser reads.

The crop (numpy (C, z, y, x), 1.5 mm, template frame) is 96 x 72 x 144 mm; the fibula fills a
small part of it. The window keeps every slice (z) and a ``size`` (y, x) square centred on the
fibula mask's centroid, so the network spends its time on the bone whose fracture it places.
Without a fibula mask it is centred on the template's fibula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

#: Window size (y, x) in crop voxels (60 x 60 mm at 1.5 mm).
WINDOW_YX = (40, 40)
#: Fallback centre (y, x) in crop voxels: the shipped template's fibula.
DEFAULT_CENTRE_YX = (29.0, 19.0)


@dataclass(frozen=True)
class Window:
    """Where the window lies in the crop: start (y, x) voxel (may be negative or run past the
    crop's edge: the outside is zero-padded) and size (y, x)."""

    y0: int
    x0: int
    size: Tuple[int, int]

    def extract(self, channels: np.ndarray) -> np.ndarray:
        """(C, z, y, x) crop channels -> (C, z, wy, wx) window (zero outside the crop)."""
        c, nz, ny, nx = channels.shape
        wy, wx = self.size
        out = np.zeros((c, nz, wy, wx), dtype=channels.dtype)
        ys, xs = slice(max(self.y0, 0), min(self.y0 + wy, ny)), slice(max(self.x0, 0), min(self.x0 + wx, nx))
        out[:, :, ys.start - self.y0:ys.stop - self.y0, xs.start - self.x0:xs.stop - self.x0] = \
            channels[:, :, ys, xs]
        return out

    def paste(self, window: np.ndarray, crop_shape: Sequence[int]) -> np.ndarray:
        """(z, wy, wx) window array -> (z, y, x) array on the crop grid (zero elsewhere)."""
        nz, ny, nx = crop_shape
        wy, wx = self.size
        out = np.zeros((nz, ny, nx), dtype=window.dtype)
        ys, xs = slice(max(self.y0, 0), min(self.y0 + wy, ny)), slice(max(self.x0, 0), min(self.x0 + wx, nx))
        out[:, ys, xs] = window[:, ys.start - self.y0:ys.stop - self.y0, xs.start - self.x0:xs.stop - self.x0]
        return out


def fibula_window(fibula: np.ndarray, size: Tuple[int, int] = WINDOW_YX) -> Window:
    """The window centred on a fibula mask.

    Args:
        fibula: Fibula mask on the crop grid (z, y, x), float in [0, 1] or bool.
        size: Window size (y, x) in voxels.

    Returns:
        The window.

    Example:
        >>> m = np.zeros((8, 48, 64)); m[:, 30:34, 10:14] = 1
        >>> w = fibula_window(m, (16, 16)); (w.y0, w.x0)
        (24, 4)
    """
    mass = (np.asarray(fibula) > 0.5).sum(axis=0).astype(float)
    if mass.sum() < 1:
        cy, cx = DEFAULT_CENTRE_YX
    else:
        jj, ii = np.indices(mass.shape)
        cy, cx = (jj * mass).sum() / mass.sum(), (ii * mass).sum() / mass.sum()
    return Window(int(round(cy - size[0] / 2.0 + 0.5)), int(round(cx - size[1] / 2.0 + 0.5)),
                  (int(size[0]), int(size[1])))
