"""Evaluation of the pipeline's stages against reference data (segmentation metrics, ...)."""

from __future__ import annotations

from AnkleFractureLib.evaluation.seg_metrics import (
    average_surface_distance,
    dice,
    hd95,
    segmentation_metrics,
    surface_distances,
)

__all__ = [
    "average_surface_distance",
    "dice",
    "hd95",
    "segmentation_metrics",
    "surface_distances",
]
