"""Reading and writing single-file volumes (NIfTI, NRRD, MetaImage) through SimpleITK.

Reading always looks at the header first (``ImageFileReader.ReadImageInformation``) and refuses
2D, 4D and multi-component images and oversized volumes before any pixel is read; a folder is
read as a DICOM series. Writing is atomic (temporary file, then :func:`os.replace`) and
deterministic: writing the same Volume twice gives byte-identical files (``.nii.gz`` is written as
plain NIfTI and gzipped here with a zero timestamp).

Speed: zlib's default (level 6) is slow on CT-sized volumes and hardly smaller than faster
settings, so ``.nii.gz`` data is deflated (:func:`_gzip_settings`) with the run-length strategy
(``Z_RLE``) for float and 8-bit volumes (heatmaps, label maps, masks: mostly runs of zeros) and
at level 1 for other integer volumes (CT HU, where RLE would read 20 % slower). CPU seconds on a
512 x 512 x 365 grid, write / read-back, against level 6: float32 heatmap 0.8 / 0.7 (2.1 / 0.8,
file 0.6 % smaller), uint8 labels 0.1 / 0.1 (0.2 / 0.1, 0.01 MB smaller), int16 CT 2.0 / 0.8
(12.9 / 0.8, 2 % smaller). It is gzipped like ``pigz`` does it
(:func:`_gzip_file`): fixed 4 MiB chunks deflated on several threads (zlib releases the GIL),
each primed with the previous chunk's last 32 KiB, joined into one ordinary gzip member. The
bytes depend only on the data, never on the number of threads or cores. A scalar volume is
compressed straight from its numpy array behind the header SimpleITK writes for a 2 x 2 x 2
image of the same geometry and pixel type (only the sizes patched): the same bytes as
SimpleITK's own file, without a copy of the volume or a temporary plain ``.nii``.

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

import collections
import contextlib
import os
import shutil
import struct
import tempfile
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO, Deque, Dict, Iterable, Iterator, Optional, Tuple, Union

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
BytesLike = Union[bytes, bytearray, memoryview]

#: zlib (level, strategy) of ``.nii.gz`` outputs: float and 8-bit data, other data (see above).
GZIP_RUNS = (6, zlib.Z_RLE)
GZIP_OTHER = (1, zlib.Z_DEFAULT_STRATEGY)
#: Uncompressed bytes per independently deflated chunk. Fixed: the compressed bytes depend on
#: it (never on the thread count), so changing it changes every ``.nii.gz`` written.
GZIP_CHUNK = 4 << 20
#: Most threads used to deflate one file.
GZIP_MAX_THREADS = 4
_DICT_BYTES = 32 << 10  # deflate's window: a chunk may refer back this far into the previous
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
    if ext == ".nii.gz":
        header = _nifti_header(volume)
        if header is not None:
            try:
                with atomic_output(spath) as tmp, open(tmp, "wb") as raw_out:
                    _gzip_file([header, _voxel_bytes(volume.array)], raw_out,
                               *_gzip_settings(volume.array.dtype))
            except (RuntimeError, OSError) as exc:
                raise InputError(spath, "cannot write image: "
                                        f"{str(exc).strip().splitlines()[-1]}") from None
            return
    write_sitk_image(volume.to_sitk(), spath, compress=compress)


def _voxel_bytes(array: np.ndarray) -> memoryview:
    """The voxel data as NIfTI stores it (x fastest: the C order of (z, y, x)), without a copy
    when the array is C-contiguous; bool as uint8."""
    arr = np.ascontiguousarray(array)
    if arr.dtype == bool:
        arr = arr.view(np.uint8)
    return memoryview(arr).cast("B")


def _nifti_header(volume: Volume) -> Optional[bytes]:
    """The NIfTI-1 header (and 4-byte extension flag) SimpleITK writes for ``volume``, or None
    when the direct path does not apply (then SimpleITK writes the whole file).

    SimpleITK writes the header of a 2 x 2 x 2 image with the volume's pixel type, spacing,
    origin and direction; only ``dim[1..3]`` depend on the size and are patched (tested against
    SimpleITK's own files). Not for sizes over 32767 (NIfTI-2), non-native byte order or types
    SimpleITK does not store as such.
    """
    import SimpleITK as sitk

    arr = volume.array
    if arr.ndim != 3 or max(arr.shape) > 32767 or not arr.dtype.isnative:
        return None
    if arr.dtype != bool and (arr.dtype.kind not in "uif" or arr.dtype.itemsize > 8
                              or arr.dtype == np.float16):
        return None
    sample = arr.dtype if arr.dtype != bool else np.dtype(np.uint8)
    try:
        proxy = sitk.GetImageFromArray(np.zeros((2, 2, 2), sample))
        proxy.SetSpacing(volume.spacing)
        proxy.SetOrigin(volume.origin)
        proxy.SetDirection(tuple(float(v) for v in volume.direction.reshape(-1)))
        with tempfile.TemporaryDirectory() as work:
            small = os.path.join(work, "header.nii")
            sitk.WriteImage(proxy, small, False)
            with open(small, "rb") as fh:
                data = fh.read()
    except (RuntimeError, OSError, TypeError, ValueError):
        return None  # SimpleITK's own path will say what is wrong
    if len(data) < 352 or struct.unpack("<i", data[:4])[0] != 348:
        return None
    vox_offset = int(struct.unpack("<f", data[108:112])[0])
    dims = struct.unpack("<8h", data[40:56])
    if (vox_offset < 348 or len(data) != vox_offset + 8 * sample.itemsize
            or dims[:4] != (3, 2, 2, 2)):
        return None
    nx, ny, nz = volume.size
    return data[:42] + struct.pack("<3h", nx, ny, nz) + data[48:vox_offset]


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
                        _gzip_file(_file_pieces(src), raw_out, *_gzip_settings(
                            np.dtype(_SITK_TYPES.get(img.GetPixelIDTypeAsString(), "i2"))))
        else:
            with atomic_output(spath) as tmp:
                sitk.WriteImage(img, tmp, bool(compress) and ext != ".nii")
    except (RuntimeError, OSError) as exc:
        raise InputError(spath, f"cannot write image: {str(exc).strip().splitlines()[-1]}") \
            from None


#: SimpleITK pixel types (``GetPixelIDTypeAsString``) that :func:`_gzip_settings` treats as
#: float or 8-bit; anything else counts as "other integers".
_SITK_TYPES = {"8-bit unsigned integer": "u1", "8-bit signed integer": "i1",
               "32-bit float": "f4", "64-bit float": "f8",
               "vector of 8-bit unsigned integer": "u1", "vector of 8-bit signed integer": "i1",
               "vector of 32-bit float": "f4", "vector of 64-bit float": "f8"}


def _gzip_settings(dtype: np.dtype) -> Tuple[int, int]:
    """zlib (level, strategy) for voxels of ``dtype``: :data:`GZIP_RUNS` for float, bool and
    8-bit data, :data:`GZIP_OTHER` for other integers."""
    dt = np.dtype(dtype)
    return GZIP_RUNS if dt.kind in "fb" or dt.itemsize == 1 else GZIP_OTHER


def _gzip_threads() -> int:
    """Threads for :func:`_gzip_file`: the cores this process may use, at most
    :data:`GZIP_MAX_THREADS`."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(GZIP_MAX_THREADS, n))


def _deflate_chunk(data: bytes, primer: bytes, last: bool, level: int, strategy: int) -> bytes:
    """Raw deflate of one chunk: primed with ``primer`` (the previous chunk's tail), ended with a
    sync flush (byte-aligned, not final) or, for the last chunk, with the final block."""
    if primer:
        comp = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 8, strategy, primer)
    else:
        comp = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 8, strategy)
    return comp.compress(data) + comp.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def _file_pieces(src: BinaryIO) -> Iterator[bytes]:
    """The contents of an open binary file, in :data:`GZIP_CHUNK`-byte pieces."""
    while True:
        piece = src.read(GZIP_CHUNK)
        if not piece:
            return
        yield piece


def _chunks(pieces: Iterable[BytesLike]) -> Iterator[BytesLike]:
    """Re-cut a stream of byte pieces into :data:`GZIP_CHUNK`-byte chunks (the last shorter),
    so that the chunks depend on the bytes only; a piece's whole chunks are zero-copy slices."""
    carry = b""
    for piece in pieces:
        view = memoryview(piece).cast("B")
        if carry:
            take = GZIP_CHUNK - len(carry)
            carry += bytes(view[:take])
            view = view[take:]
            if len(carry) < GZIP_CHUNK:
                continue
            yield carry
            carry = b""
        whole = len(view) - len(view) % GZIP_CHUNK
        for i in range(0, whole, GZIP_CHUNK):
            yield view[i:i + GZIP_CHUNK]
        carry = bytes(view[whole:])
    if carry:
        yield carry


def _gzip_file(pieces: Iterable[BytesLike], dst: BinaryIO, level: int = GZIP_RUNS[0],
               strategy: int = GZIP_RUNS[1], threads: Optional[int] = None) -> None:
    """Gzip the concatenated ``pieces`` into ``dst`` as one gzip member (no name, mtime 0).

    As ``pigz``: the data is cut into :data:`GZIP_CHUNK`-byte chunks that are deflated in
    parallel, each with the previous chunk's last 32 KiB as its preset dictionary, and the raw
    deflate streams are concatenated (sync flushes between them, the final block last). Any gzip
    reader (zlib, ITK, Python's gzip) reads it as an ordinary single-member file, and the bytes
    are the same for any ``threads`` and any cut of the data into pieces. Memory: about
    2 x ``threads`` chunks.

    Args:
        pieces: The data, as consecutive bytes-like pieces (e.g. a header and a numpy buffer).
        dst: Writable binary file.
        level: zlib compression level (1 fastest .. 9 smallest; hardly matters with Z_RLE).
        strategy: zlib strategy (``zlib.Z_RLE``, ``zlib.Z_DEFAULT_STRATEGY``, ...).
        threads: Worker threads (None: :func:`_gzip_threads`).
    """
    # Header: magic, deflate, no flags, mtime 0, extra flags as Python's gzip sets them,
    # OS "unknown".
    xfl = 4 if level == 1 else 2 if level == 9 else 0
    dst.write(b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + bytes([xfl, 255]))
    crc = 0
    total = 0
    primer = b""
    nthreads = _gzip_threads() if threads is None else max(1, int(threads))
    pending: Deque["Future[bytes]"] = collections.deque()
    chunks = _chunks(pieces)
    data = next(chunks, b"")
    with ThreadPoolExecutor(max_workers=nthreads) if nthreads > 1 else \
            contextlib.nullcontext() as pool:
        while True:
            following = next(chunks, None)  # one chunk ahead: is this the last one?
            last = following is None
            total += len(data)
            crc = zlib.crc32(data, crc)
            if pool is None or (last and not pending):
                dst.write(_deflate_chunk(data, primer, last, level, strategy))
            else:
                pending.append(pool.submit(_deflate_chunk, data, primer, last, level, strategy))
                while len(pending) > 2 * nthreads:  # bounded memory; order kept
                    dst.write(pending.popleft().result())
            if last:
                break
            primer = bytes(data[-_DICT_BYTES:])
            data = following
        while pending:
            dst.write(pending.popleft().result())
    dst.write(struct.pack("<II", crc & 0xFFFFFFFF, total & 0xFFFFFFFF))


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
