"""Preprocessing shared by every stage: HU windowing, resampling, canonical orientation."""

from AnkleFractureLib.preprocessing.intensity import clip_hu, normalize_hu, REFERENCE_HU_WINDOW
from AnkleFractureLib.preprocessing.orientation import OrientationChange, to_canonical
from AnkleFractureLib.preprocessing.resample import (
    resample_like,
    resample_to_grid,
    resample_to_spacing,
)

__all__ = [
    "REFERENCE_HU_WINDOW",
    "clip_hu",
    "normalize_hu",
    "OrientationChange",
    "to_canonical",
    "resample_like",
    "resample_to_grid",
    "resample_to_spacing",
]
