"""The on-disk dataset layout shared by the phantom generator, training and Slicer export."""

from AnkleFractureLib.dataset.layout import (
    CLASSES,
    LABELS,
    CaseRecord,
    Dataset,
    true_fracture_height,
)

__all__ = ["CLASSES", "LABELS", "CaseRecord", "Dataset", "true_fracture_height"]
