"""Synthetic ankle CT phantom: demo input, training data for shipped models and test fixture.

Example:
    >>> from AnkleFractureLib.phantom import generate_case
    >>> case = generate_case(0, weber="B", side="left")          # doctest: +SKIP
    >>> case.ct.array.dtype, case.info["fracture"]["height_mm"]   # doctest: +SKIP
"""

from __future__ import annotations

from AnkleFractureLib.phantom.fractures import WEBER_CLASSES
from AnkleFractureLib.phantom.generator import PhantomCase, generate_case
from AnkleFractureLib.phantom.preview import write_preview

__all__ = ["generate_case", "PhantomCase", "WEBER_CLASSES", "write_preview"]
