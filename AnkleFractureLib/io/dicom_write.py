"""Write a CT :class:`~AnkleFractureLib.geometry.volume.Volume` as a DICOM series.

Used for the phantoms (``ankle-fracture phantom --dicom``) so that the DICOM path of every
command can be exercised without patient data, and by tests. One uncompressed single-frame
CT Image Storage file per slice (Explicit VR Little Endian, signed 16 bit, HU = stored - 1024).

Geometry (LPS mm, as :mod:`AnkleFractureLib.io.dicom` reads it back): the volume's direction
columns are (row cosine r, column cosine c, normal n); ImageOrientationPatient = (r, c);
slice k (numpy axis 0) sits at ImagePositionPatient = origin + k * spacing_z * n; PixelSpacing
= (spacing_y, spacing_x) in DICOM's (row spacing, column spacing) order. DICOM's slice normal is
always r x c, so a left-handed volume (third column = -(r x c)) is written with its slices in
reverse order: the same voxels at the same LPS positions, read back with k axis r x c.

Example:
    >>> import tempfile, numpy as np
    >>> from AnkleFractureLib.geometry.volume import Volume
    >>> from AnkleFractureLib.io import read_image
    >>> vol = Volume(np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4) - 5,
    ...              spacing=(0.5, 0.6, 1.25), origin=(1.0, 2.0, 3.0))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = write_dicom_series(vol, d + "/series")
    ...     back = read_image(d + "/series")
    >>> bool((back.array == vol.array).all()), back.spacing
    (True, (0.5, 0.6, 1.25))
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, List, Optional, Sequence

import numpy as np

from AnkleFractureLib.errors import InputError, PathLike
from AnkleFractureLib.geometry.volume import Volume

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: Stored value = HU - INTERCEPT; int16 holds HU -1024 .. 31743.
INTERCEPT = -1024.0


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if len(text) <= 16 else f"{value:.8g}"


def slice_dataset(stored: np.ndarray, *, series_uid: str, study_uid: str, frame_uid: str,
                  ipp: Sequence[float], iop: Sequence[float], pixel_spacing: Sequence[float],
                  slice_thickness: float = 1.0, instance_number: int = 1,
                  modality: str = "CT", sop_class: str = CT_IMAGE_STORAGE,
                  slope: float = 1.0, intercept: float = INTERCEPT,
                  image_type: Sequence[str] = ("DERIVED", "SECONDARY", "AXIAL"),
                  description: str = "AnkleFracture synthetic phantom",
                  patient_name: str = "Phantom^Ankle", patient_id: str = "PHANTOM") -> Any:
    """One uncompressed single-frame image slice as a pydicom Dataset (not yet saved).

    Args:
        stored: Stored pixel values (rows, cols), int16; value = stored * slope + intercept.
        series_uid, study_uid, frame_uid: SeriesInstance-, StudyInstance-, FrameOfReferenceUID.
        ipp: ImagePositionPatient (LPS mm).
        iop: ImageOrientationPatient: row cosine then column cosine (6 values).
        pixel_spacing: (row spacing, column spacing) mm, DICOM order (= spacing y, x).
        slice_thickness: mm.
        instance_number: InstanceNumber.
        modality, sop_class: Modality and SOP Class UID (CT Image Storage by default).
        slope, intercept: RescaleSlope / RescaleIntercept.
        image_type, description, patient_name, patient_id: Header text.

    Returns:
        The dataset, with file meta (Explicit VR Little Endian); save it with
        ``ds.save_as(path, enforce_file_format=True)``.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    stored = np.ascontiguousarray(stored, dtype="<i2")
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.Modality = modality
    ds.ImageType = list(image_type)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.SeriesDescription = description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.SeriesNumber = 1
    ds.InstanceNumber = int(instance_number)
    ds.ImagePositionPatient = [_ds(float(v)) for v in ipp]
    ds.ImageOrientationPatient = [_ds(float(v)) for v in iop]
    ds.PixelSpacing = [_ds(float(v)) for v in pixel_spacing]
    ds.SliceThickness = _ds(float(slice_thickness))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = _ds(float(slope))
    ds.RescaleIntercept = _ds(float(intercept))
    ds.PixelData = stored.tobytes()
    return ds


def write_dicom_series(volume: Volume, folder: PathLike, *, patient_id: str = "PHANTOM",
                       patient_name: str = "Phantom^Ankle",
                       description: str = "AnkleFracture synthetic phantom",
                       series_uid: Optional[str] = None,
                       study_uid: Optional[str] = None) -> List[Path]:
    """Write ``volume`` (HU, array (z, y, x)) as a CT series into a new ``folder``.

    The files are written into a temporary sibling folder that is renamed into place at the
    end, so ``folder`` never holds half a series.

    Args:
        volume: CT in Hounsfield units; spacing (x, y, z) mm, origin LPS mm, direction with
            columns (i, j, k) axes in LPS.
        folder: Destination folder; must not exist or be empty.
        patient_id, patient_name, description: Header text (synthetic data only: never put a
            real patient's identity here).
        series_uid, study_uid: UIDs (generated when None).

    Returns:
        The slice files, in slice order (z index 0 first).

    Raises:
        InputError: ``folder`` exists and is not empty, or the direction is not orthonormal.
    """
    from pydicom.uid import generate_uid

    dest = Path(folder)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InputError(dest, "the DICOM output folder exists and is not empty")
    d = np.asarray(volume.direction, dtype=float)
    r, c, n = d[:, 0], d[:, 1], d[:, 2]
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-5):
        raise InputError(dest, "the volume's direction is not orthonormal")
    hu = np.asarray(volume.array)
    sx, sy, sz = (float(s) for s in volume.spacing)
    origin = np.asarray(volume.origin, dtype=float)
    if not np.allclose(np.cross(r, c), n, atol=1e-5):  # left-handed: flip the slice order
        origin = origin + (hu.shape[0] - 1) * sz * n
        n = -n
        hu = hu[::-1]
    stored = np.clip(np.rint(hu.astype(np.float64) - INTERCEPT), -32768, 32767).astype("<i2")
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        names: List[str] = []
        for k in range(stored.shape[0]):
            ds = slice_dataset(stored[k], series_uid=series_uid, study_uid=study_uid,
                               frame_uid=frame_uid, ipp=origin + k * sz * n, iop=(*r, *c),
                               pixel_spacing=(sy, sx), slice_thickness=sz,
                               instance_number=k + 1, description=description,
                               patient_name=patient_name, patient_id=patient_id)
            name = f"slice_{k + 1:04d}.dcm"
            ds.save_as(str(tmp / name), enforce_file_format=True)
            names.append(name)
        if dest.exists():
            dest.rmdir()  # empty (checked above)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [dest / name for name in names]
