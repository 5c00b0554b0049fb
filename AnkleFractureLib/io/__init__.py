"""Input and output: CT volumes (DICOM, NIfTI, NRRD, MetaImage) and atomic output files.

Every reader returns a :class:`AnkleFractureLib.geometry.volume.Volume` (array (z, y, x),
spacing/origin (x, y, z) in LPS mm) and raises :class:`AnkleFractureLib.errors.InputError`
naming the path for any problem a user can cause. Every writer is atomic.
"""

from __future__ import annotations

from AnkleFractureLib.io.atomic import (atomic_output, atomic_torch_save, atomic_write_bytes,
                                        atomic_write_json, atomic_write_text)
from AnkleFractureLib.io.dicom import DicomSeries, list_dicom_series, read_dicom_series
from AnkleFractureLib.io.files import (
    SUPPORTED_EXTENSIONS,
    read_image,
    write_image,
    write_sitk_image,
)
from AnkleFractureLib.io.limits import MAX_VOXELS

__all__ = [
    "DicomSeries",
    "MAX_VOXELS",
    "SUPPORTED_EXTENSIONS",
    "atomic_output",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "list_dicom_series",
    "read_dicom_series",
    "read_image",
    "write_image",
    "write_sitk_image",
]
