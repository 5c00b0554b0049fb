"""Geometry: the Volume type, physical frames (LPS/RAS) and affine helpers (lowest layer)."""

from AnkleFractureLib.geometry.volume import Volume

__all__ = ["Volume"]
