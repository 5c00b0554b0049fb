"""Reading and writing single-file volumes (NIfTI, NRRD, MetaImage) through SimpleITK.

Reading always looks at the header first (``ImageFileReader.ReadImageInformation``) and refuses
2D, 4D and multi-component images and oversized volumes before any pixel is read; a folder is
read as a DICOM series. Writing is atomic (temporary file, then :func:`os.replace`) and
deterministic: writing the same Volume twice gives byte-identical files (``.nii.gz`` is written as
plain NIfTI and gzipped here with a zero timestamp).

Geometry precision: NRRD and MetaImage store spacing, origin and direction as decimal text with
full double precision, so round trips are exact (to ~1e-15). NIfTI stores the qform/sform as
float32, so spacing, origin and direction come back to about 1e-6 relative (tested at 1e-5).

Detached-header formats: ``.mhd`` (+ ``.raw``/``.zraw``) and ``.nhdr`` (+ ``.raw``/``.raw.gz``)
are written into a private temporary folder under their final names, then the data file and the
header are moved into place (data first, header last), so the header never points at a missing
file. The pair is not replaced in a single atomic step: a crash between the two moves leaves an
orphan data file, never a header that points to half-written data.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from typing import Dict, Optional

import numpy as np

from AnkleFractureLib.errors import GeometryError, InputError, PathLike
from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.io.atomic import atomic_output, split_extension
from AnkleFractureLib.io.dicom import DICOM_EXTENSIONS, read_dicom_series
from AnkleFractureLib.io.limits import MAX_VOXELS, check_finite, check_voxel_budget
from AnkleFractureLib.io.nifti import check_nifti_complete

#: Extension -> (format name, SimpleITK ImageIO). Readable and writable.
_FORMATS: Dict[str, tuple] = {
    ".nii": ("nifti", "NiftiImageIO"),
    ".nii.gz": ("nifti", "NiftiImageIO"),
    ".nrrd": ("nrrd", "NrrdImageIO"),
    ".nhdr": ("nrrd", "NrrdImageIO"),
    ".mha": ("metaimage", "MetaImageIO"),
    ".mhd": ("metaimage", "MetaImageIO"),
}

#: File extensions read by :func:`read_image` (a folder is read as DICOM).
SUPPORTED_EXTENSIONS = tuple(_FORMATS)

_DETACHED = (".mhd", ".nhdr")
_FORMAT_NAMES = {"nifti": "NIfTI", "nrrd": "NRRD", "metaimage": "MetaImage"}


def read_image(path: PathLike, *, max_voxels: int = MAX_VOXELS,
               series_uid: Optional[str] = None) -> Volume:
    """Read a 3D CT or label volume from a file or a DICOM folder.

    Args:
        path: A folder (read as a DICOM series, see
            :func:`AnkleFractureLib.io.dicom.read_dicom_series`) or a file ending in one of
            :data:`SUPPORTED_EXTENSIONS`.
        max_voxels: Refuse images with more voxels than this (checked from the header, before
            reading pixels). The default, :data:`MAX_VOXELS`, is 2^30 (4 GiB as float32).
        series_uid: For DICOM folders, the SeriesInstanceUID to read (default: automatic).

    Returns:
        Volume with array (z, y, x) in the file's pixel type (HU for CT), spacing/origin (x, y, z)
        in LPS mm. ``meta`` has "source" (the path), "format" ("nifti", "nrrd", "metaimage" or
        "dicom") and "warnings" (list of str); DICOM adds "modality", "series_uid",
        "series_description".

    Raises:
        InputError: Missing path, unknown extension, unreadable header or pixels, 2D / 4D /
            multi-component image, too many voxels, NaN or inf voxels, or any DICOM problem.
    """
    spath = os.fspath(path)
    if not os.path.exists(spath):
        raise InputError(spath, "does not exist")
    if os.path.isdir(spath):
        return read_dicom_series(spath, series_uid, max_voxels=max_voxels)
    _, ext = split_extension(spath)
    if ext in DICOM_EXTENSIONS or (ext == "" and _looks_like_dicom(spath)):
        raise InputError(spath, "a single 2D DICOM image, not a series; pass the folder that "
                                "holds all the slices")
    if ext not in _FORMATS:
        raise InputError(spath, f"unsupported file extension '{ext or '(none)'}'; expected a "
                                f"DICOM folder or one of {', '.join(SUPPORTED_EXTENSIONS)}")
    if os.path.getsize(spath) == 0:
        raise InputError(spath, "file is empty")
    fmt, io_name = _FORMATS[ext]
    return _read_with_sitk(spath, fmt, io_name, max_voxels)


def _looks_like_dicom(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _read_with_sitk(path: str, fmt: str, io_name: str, max_voxels: int) -> Volume:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    # Pin the ImageIO to the extension: otherwise ITK probes every format and happily reads a
    # PNG renamed .nrrd as a 2D PNG, giving a confusing message.
    reader.SetImageIO(io_name)
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(path, f"not a readable {_FORMAT_NAMES[fmt]} file (header cannot be "
                               "parsed)") from None
    size = tuple(int(s) for s in reader.GetSize())
    dim = reader.GetDimension()
    ncomp = reader.GetNumberOfComponents()
    if ncomp != 1:
        raise InputError(path, f"multi-component image ({ncomp} values per voxel, e.g. RGB or "
                               "a vector field); expected a scalar 3D volume")
    if dim == 4 and size[3] == 1:
        pass  # a 3D volume stored with a trailing time axis of length 1: squeezed below
    elif dim != 3:
        what = "2D" if dim == 2 else f"{dim}D"
        raise InputError(path, f"{what} image of size {' x '.join(map(str, size))}; "
                               "expected a 3D volume")
    if size[2] == 1:
        raise InputError(path, f"2D image (a single slice, size {' x '.join(map(str, size))}); "
                               "expected a 3D volume")
    check_voxel_budget(path, size, max_voxels)
    if fmt == "nifti":
        check_nifti_complete(path)  # ITK zero-fills truncated NIfTI data without an error
    try:
        img = reader.Execute()
    except RuntimeError:
        raise InputError(path, "cannot read pixel data (file truncated or corrupt, or its data "
                               "file is missing)") from None
    if dim == 4:
        img = img[:, :, :, 0]
    try:
        vol = Volume.from_sitk(img, {"source": path, "format": fmt, "warnings": []})
    except GeometryError as exc:
        raise InputError(path, f"invalid geometry in header: {exc}") from None
    if np.iscomplexobj(vol.array):
        raise InputError(path, "complex-valued image; expected real voxel values")
    check_finite(path, vol.array)
    return vol


def write_image(volume: Volume, path: PathLike, *, compress: bool = True) -> None:
    """Write a Volume atomically and deterministically.

    Args:
        volume: The image (array (z, y, x), spacing/origin (x, y, z) LPS mm). Its dtype is kept
            (bool is written as uint8).
        path: Destination ending in .nii, .nii.gz, .nrrd, .nhdr, .mha or .mhd. Parent folders are
            created. ``.nii.gz`` is always gzip-compressed and ``.nii`` never is.
        compress: Compress the voxel data of NRRD and MetaImage files (zlib/gzip, lossless).

    Raises:
        InputError: Unknown extension, or the file cannot be written (permissions, disk full).
    """
    spath = os.fspath(path)
    _, ext = split_extension(spath)
    if ext not in _FORMATS:
        raise InputError(spath, f"cannot write extension '{ext or '(none)'}'; use one of "
                                f"{', '.join(SUPPORTED_EXTENSIONS)}")
    write_sitk_image(volume.to_sitk(), spath, compress=compress)


def write_sitk_image(img: "object", path: PathLike, *, compress: bool = True) -> None:
    """Write a ``SimpleITK.Image`` (scalar or vector) atomically and deterministically.

    The worker behind :func:`write_image`, also used for multi-channel outputs (the syndesmosis
    crop). Same extensions and rules as :func:`write_image`.
    """
    import SimpleITK as sitk

    spath = os.fspath(path)
    _, ext = split_extension(spath)
    if ext not in _FORMATS:
        raise InputError(spath, f"cannot write extension '{ext or '(none)'}'; use one of "
                                f"{', '.join(SUPPORTED_EXTENSIONS)}")
    try:
        if ext in _DETACHED:
            _write_detached(img, spath, compress)
        elif ext == ".nii.gz":
            # ITK's gzip stream is deterministic today, but we do not rely on it: plain .nii,
            # then gzip with mtime=0 and no file name in the header -> identical bytes.
            with atomic_output(spath) as tmp:
                with tempfile.TemporaryDirectory(dir=os.path.dirname(tmp)) as work:
                    plain = os.path.join(work, "volume.nii")
                    sitk.WriteImage(img, plain, False)
                    with open(plain, "rb") as src, open(tmp, "wb") as raw_out:
                        with gzip.GzipFile(filename="", mode="wb", fileobj=raw_out, mtime=0,
                                           compresslevel=6) as gz:
                            shutil.copyfileobj(src, gz, 1 << 20)
        else:
            with atomic_output(spath) as tmp:
                sitk.WriteImage(img, tmp, bool(compress) and ext != ".nii")
    except (RuntimeError, OSError) as exc:
        raise InputError(spath, f"cannot write image: {str(exc).strip().splitlines()[-1]}") \
            from None


def _write_detached(img: "object", path: str, compress: bool) -> None:
    """Write a header + data file pair so that the header never points at missing data."""
    import SimpleITK as sitk

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    work = tempfile.mkdtemp(dir=folder, prefix="." + os.path.basename(path) + ".")
    try:
        # Final names inside the private folder: the header references the data file by its
        # bare name, which stays valid after the move.
        sitk.WriteImage(img, os.path.join(work, os.path.basename(path)), bool(compress))
        header = os.path.basename(path)
        produced = sorted(os.listdir(work))
        for name in produced:
            if name != header:
                os.replace(os.path.join(work, name), os.path.join(folder, name))
        os.replace(os.path.join(work, header), os.path.join(folder, header))
    finally:
        shutil.rmtree(work, ignore_errors=True)
