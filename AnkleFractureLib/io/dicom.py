"""DICOM series discovery and reading (CT only).

The reader walks a folder recursively, reads every DICOM header with pydicom (no pixels), groups
the files by SeriesInstanceUID, picks the CT series (or the one the caller names), sorts its
slices by their position along the slice normal and builds a :class:`Volume` in Hounsfield units.

Geometry (all in LPS mm, as in DICOM):

* row cosine ``r`` = ImageOrientationPatient[0:3] (direction of increasing column index, the ITK
  i axis), column cosine ``c`` = ImageOrientationPatient[3:6] (ITK j axis), normal
  ``n = r x c`` (ITK k axis). ``Volume.direction`` has columns (r, c, n).
* slices are sorted by ``dot(ImagePositionPatient, n)``, never by file name or InstanceNumber.
* spacing = (PixelSpacing[1], PixelSpacing[0], median slice spacing); origin = position of the
  first sorted slice.

Tolerated quirks, reported in ``meta["warnings"]`` (the data is kept as is, never resampled):

* non-uniform slice spacing (max deviation from the median > 1 % of it or > 0.05 mm): the median
  spacing is used, so positions of the odd slices are off by up to the deviation;
* gantry tilt (slice positions not stacked along the normal): the direction stays (r, c, n) and
  the in-plane shear is ignored; the tilt angle and the resulting offset are reported;
* duplicate slice positions: the duplicates are dropped (the first by InstanceNumber, then file
  name, is kept);
* several CT series in the folder: the one with the most slices is used;
* files with a DICOM extension (.dcm, .dicom, .ima) but no DICOM header, when other valid DICOM
  files are present, are skipped.

Stripped headers (common after anonymisation) are stood in for, each named in
``meta["warnings"]`` and listed in ``meta["missing_tags"]``:

* no Modality: read as CT only when the pixel values are Hounsfield units (air at -1000 HU and
  tissue or bone, :func:`_hu_problem`) and the SOP class, if any, is a CT one;
* no ImageOrientationPatient on any slice: axial identity orientation (:data:`ASSUMED_IOP`);
* no ImagePositionPatient: slices stacked in InstanceNumber order, SpacingBetweenSlices (else
  SliceThickness) apart, from (0, 0, 0) mm;
* no PixelSpacing: 1 mm.

Refused (:class:`InputError` naming the path): missing path, empty folder, no DICOM, a file with
the DICOM magic whose header cannot be parsed, non-CT modality (or, without a Modality tag, a
non-CT SOP class or pixel values that are not HU), a single slice, a series mixing orientations
/ matrix sizes / pixel spacings, slices that cannot be placed (orientation missing on some
slices only; no position and no unique InstanceNumber or no slice distance), pixel data that
neither pydicom nor SimpleITK can decode (e.g. truncated files), multi-frame files, and volumes
above ``max_voxels``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from AnkleFractureLib.errors import InputError, PathLike
from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.io.limits import MAX_VOXELS, check_finite, check_voxel_budget

#: File extensions that claim to be DICOM even without the 128-byte preamble + "DICM" magic.
DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")

#: A CT series with fewer slices than this is treated as a scout when another series exists.
MIN_CT_SLICES = 10

_ORIENTATION_ATOL = 1e-4  # direction cosines are DS strings with ~6 decimals
_DUPLICATE_TOL_MM = 1e-3
_TILT_WARN_DEG = 0.05
_LOCALIZER_WORDS = ("LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW", "SCANOGRAM")
#: SOP classes of CT images (CT, Enhanced CT, Legacy Converted Enhanced CT).
CT_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1",
                  "1.2.840.10008.5.1.4.1.1.2.2")
#: Assumed ImageOrientationPatient when a series has none: axial, identity (row cosine +x
#: towards the patient's left, column cosine +y towards posterior, normal +z towards the head).
ASSUMED_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
#: Without a Modality tag, pixel data count as CT in HU when at least this share of the voxels
#: is air (-1100..-900 HU) and at least this share is tissue or bone (-200..3100 HU).
MIN_AIR_FRACTION, MIN_TISSUE_FRACTION = 0.005, 0.005


# ---------------------------------------------------------------------------------- headers
@dataclass
class _SliceHeader:
    """What the reader needs from one file's header (no pixel data)."""

    path: str
    series_uid: str
    modality: str
    image_type: Tuple[str, ...]
    series_description: str
    rows: int
    cols: int
    iop: Optional[np.ndarray]  # (6,) row cosine then column cosine
    ipp: Optional[np.ndarray]  # (3,) LPS mm of the centre of the first voxel
    pixel_spacing: Optional[Tuple[float, float]]  # (row spacing, column spacing) mm
    slope: float
    intercept: float
    instance_number: int
    n_frames: int
    samples_per_pixel: int
    forced: bool  # parsed with force=True (no preamble), re-read the same way for pixels
    sop_class: str = ""  # SOPClassUID (or the file meta's MediaStorageSOPClassUID)
    has_instance_number: bool = True
    slice_thickness: Optional[float] = None  # SliceThickness, mm
    spacing_between: Optional[float] = None  # SpacingBetweenSlices, mm


@dataclass
class DicomSeries:
    """One series found by :func:`list_dicom_series`.

    Attributes:
        series_uid: SeriesInstanceUID ("" when the files have none).
        modality: Modality of the first file (e.g. "CT", "MR").
        description: SeriesDescription ("" when absent).
        n_files: Number of files (slices) in the series.
        rows, cols: Matrix size of the first file.
        files: File paths, sorted by name (not yet by position).
        problem: Why the series cannot be read as a CT volume, or "" when it can.
        is_scout: True when ImageType says LOCALIZER/SCOUT or the slices do not share one
            orientation (the usual 3-plane localizer).
    """

    series_uid: str
    modality: str
    description: str
    n_files: int
    rows: int
    cols: int
    files: List[str] = field(default_factory=list)
    problem: str = ""
    is_scout: bool = False
    _headers: List[_SliceHeader] = field(default_factory=list, repr=False)


def has_dicom_magic(path: str) -> bool:
    """True when the file has the DICOM preamble's "DICM" magic at byte 128 (132 bytes read)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _floats(value: Any, n: int) -> Optional[np.ndarray]:
    try:
        arr = np.asarray([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        return None
    return arr


def _num(ds: Any, keyword: str, default: float) -> float:
    value = ds.get(keyword, None)
    try:
        out = float(value) if value is not None and value != "" else default
    except (TypeError, ValueError):
        return default
    return out if np.isfinite(out) else default


def _parse_header(ds: Any, path: str, forced: bool) -> _SliceHeader:
    iop = _floats(ds.get("ImageOrientationPatient", None) or [], 6)
    ipp = _floats(ds.get("ImagePositionPatient", None) or [], 3)
    ps = _floats(ds.get("PixelSpacing", None) or [], 2)
    image_type = tuple(str(v).upper() for v in (ds.get("ImageType", None) or []))
    return _SliceHeader(
        path=path,
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        modality=str(ds.get("Modality", "") or "").upper(),
        image_type=image_type,
        series_description=str(ds.get("SeriesDescription", "") or ""),
        rows=int(ds.get("Rows", 0) or 0),
        cols=int(ds.get("Columns", 0) or 0),
        iop=iop,
        ipp=ipp,
        pixel_spacing=None if ps is None else (float(ps[0]), float(ps[1])),
        slope=_num(ds, "RescaleSlope", 1.0),
        intercept=_num(ds, "RescaleIntercept", 0.0),
        instance_number=int(_num(ds, "InstanceNumber", 0)),
        n_frames=int(_num(ds, "NumberOfFrames", 1)),
        samples_per_pixel=int(_num(ds, "SamplesPerPixel", 1)),
        forced=forced,
        sop_class=_sop_class(ds),
        has_instance_number=ds.get("InstanceNumber", None) not in (None, ""),
        slice_thickness=_positive(_num(ds, "SliceThickness", 0.0)),
        spacing_between=_positive(_num(ds, "SpacingBetweenSlices", 0.0)),
    )


def _positive(value: float) -> Optional[float]:
    return value if value > 0 else None


def _sop_class(ds: Any) -> str:
    meta = getattr(ds, "file_meta", None)
    sop = ds.get("SOPClassUID", None) or (meta.get("MediaStorageSOPClassUID", None)
                                          if meta is not None else None)
    return str(sop or "")


def _read_header(path: str) -> Tuple[Optional[_SliceHeader], str]:
    """Read one header. Returns (header, "") or (None, why) where why is "" for non-DICOM."""
    import pydicom

    magic = has_dicom_magic(path)
    claims_dicom = magic or os.path.splitext(path)[1].lower() in DICOM_EXTENSIONS
    if not claims_dicom:
        # Files without the magic and without a DICOM extension are not DICOM for us; forcing
        # pydicom on text or PNG files "parses" garbage.
        return None, ""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=not magic)
    except Exception as exc:  # pydicom raises many types on bad bytes (not only InvalidDicomError)
        return None, f"cannot parse DICOM header ({type(exc).__name__})"
    if "DirectoryRecordSequence" in ds:  # a DICOMDIR index, not an image
        return None, ""
    if not magic and not ("Rows" in ds and "Columns" in ds):
        # force=True accepted the bytes, but they hold no image: treat as not DICOM.
        return None, "not a DICOM image (no DICOM header found)"
    if "Rows" not in ds or "Columns" not in ds:
        if _is_image_sop_class(ds):
            # pydicom stops quietly at the end of a truncated file: an image SOP class without
            # Rows/Columns is a damaged image file, not a legitimate non-image object.
            return None, "image header incomplete (file truncated?)"
        return None, ""  # a DICOM object without an image (structured report, RT plan, ...)
    try:
        return _parse_header(ds, path, forced=not magic), ""
    except Exception as exc:  # malformed values (e.g. Rows="abc")
        return None, f"cannot parse DICOM header ({type(exc).__name__}: {exc})"


def _is_image_sop_class(ds: Any) -> bool:
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    sop = ds.get("SOPClassUID", None) or (meta.get("MediaStorageSOPClassUID", None)
                                          if meta is not None else None)
    return bool(sop) and "Image Storage" in UID(str(sop)).name


def _scan_folder(folder: str) -> Tuple[List[_SliceHeader], List[Tuple[str, str]]]:
    """Return (image headers, [(file, why)] for files claiming DICOM that could not be parsed)."""
    if not os.path.exists(folder):
        raise InputError(folder, "does not exist")
    if not os.path.isdir(folder):
        raise InputError(folder, "is not a folder (a DICOM series is read from its folder)")
    paths: List[str] = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()  # deterministic walk order
        paths.extend(os.path.join(root, f) for f in sorted(files))
    if not paths:
        raise InputError(folder, "folder is empty")
    headers: List[_SliceHeader] = []
    bad: List[Tuple[str, str]] = []
    for p in paths:
        hdr, why = _read_header(p)
        if hdr is not None:
            headers.append(hdr)
        elif why:
            if has_dicom_magic(p):
                # It is certainly DICOM and certainly broken: it may be a slice of the series,
                # and silently dropping it would leave a hole in the volume.
                raise InputError(p, f"corrupt DICOM file: {why}")
            bad.append((p, why))
    if not headers:
        if bad:
            raise InputError(bad[0][0], f"corrupt DICOM file: {bad[0][1]}"
                             + (f" (and {len(bad) - 1} more such files)" if len(bad) > 1 else ""))
        raise InputError(folder, f"no DICOM files found (in {len(paths)} files)")
    return headers, bad


# ---------------------------------------------------------------------------------- series
def _orthonormal_frame(iop: np.ndarray) -> Optional[np.ndarray]:
    """Columns (row cosine, column cosine, normal), or None when IOP is degenerate."""
    r, c = iop[:3], iop[3:]
    if np.linalg.norm(r) < 0.5 or np.linalg.norm(c) < 0.5:
        return None
    r = r / np.linalg.norm(r)
    c = c / np.linalg.norm(c)
    if abs(float(np.dot(r, c))) > 1e-3:
        return None
    # Gram-Schmidt: DS strings carry ~6 decimals; Volume needs orthonormal to 1e-4.
    c = c - np.dot(c, r) * r
    c = c / np.linalg.norm(c)
    return np.column_stack([r, c, np.cross(r, c)])


def _series_problem(headers: Sequence[_SliceHeader]) -> Tuple[str, bool]:
    """(problem, is_scout) for one series; problem "" means readable as CT."""
    first = headers[0]
    is_scout = any(w in t for t in first.image_type for w in _LOCALIZER_WORDS)
    if first.modality not in ("CT", ""):
        return f"modality {first.modality} is not CT", is_scout
    if not first.modality and first.sop_class and first.sop_class not in CT_SOP_CLASSES:
        from pydicom.uid import UID

        return (f"Modality missing and the SOP class is {UID(first.sop_class).name}, not CT "
                f"(e.g. {first.path})", is_scout)
    if any(h.n_frames > 1 for h in headers):
        return "multi-frame (enhanced) DICOM is not supported; export as single-frame slices", \
            is_scout
    if any(h.samples_per_pixel != 1 for h in headers):
        return "colour (multi-sample) images are not CT slices", is_scout
    sizes = {(h.rows, h.cols) for h in headers}
    if len(sizes) > 1:
        return (f"mixed series: slices have different Rows/Columns {sorted(sizes)}", is_scout)
    problem = _placement_problem(headers)
    if problem:
        return problem, is_scout
    if first.iop is not None:
        if any(not np.allclose(h.iop, first.iop, atol=_ORIENTATION_ATOL) for h in headers):
            # The classic 3-plane localizer shares one series UID across orientations.
            return "mixed series: slices do not share one orientation", True
        if _orthonormal_frame(first.iop) is None:
            return f"invalid ImageOrientationPatient {list(first.iop)}", is_scout
    spacings = {h.pixel_spacing for h in headers if h.pixel_spacing is not None}
    if len(spacings) > 1 and not all(np.allclose(s, next(iter(spacings)), atol=1e-4)
                                     for s in spacings):
        return f"mixed series: slices have different PixelSpacing {sorted(spacings)}", is_scout
    if len(headers) == 1:
        return "a single 2D image, not a volume (only one slice in the series)", is_scout
    if is_scout:
        return f"is a localizer/scout (ImageType {'/'.join(first.image_type)})", True
    return "", is_scout


def _placement_problem(headers: Sequence[_SliceHeader]) -> str:
    """Why the slices cannot be placed in space, or "" (missing tags that
    :func:`_complete_geometry` can stand in for are not a problem)."""
    no_iop = [h.path for h in headers if h.iop is None]
    if no_iop and len(no_iop) < len(headers):
        return (f"{len(no_iop)} of {len(headers)} slices lack ImageOrientationPatient "
                f"(e.g. {no_iop[0]}), so they cannot be placed in space")
    no_ipp = [h.path for h in headers if h.ipp is None]
    if not no_ipp:
        return ""
    lack = (f"{len(no_ipp)} of {len(headers)} slices lack ImagePositionPatient "
            f"(e.g. {no_ipp[0]})")
    numbers = [h.instance_number for h in headers if h.has_instance_number]
    if len(numbers) < len(headers) or len(set(numbers)) < len(numbers):
        return (f"{lack} and InstanceNumber is missing or repeated, so the slices can neither "
                "be placed nor ordered")
    if headers[0].spacing_between is None and headers[0].slice_thickness is None:
        return (f"{lack} and neither SpacingBetweenSlices nor SliceThickness gives the "
                "distance between slices")
    return ""


def _group(headers: Sequence[_SliceHeader]) -> List[DicomSeries]:
    by_uid: Dict[str, List[_SliceHeader]] = {}
    for h in headers:
        by_uid.setdefault(h.series_uid, []).append(h)
    out = []
    for uid, hs in by_uid.items():
        hs = sorted(hs, key=lambda h: h.path)
        problem, scout = _series_problem(hs)
        out.append(DicomSeries(
            series_uid=uid, modality=hs[0].modality, description=hs[0].series_description,
            n_files=len(hs), rows=hs[0].rows, cols=hs[0].cols, files=[h.path for h in hs],
            problem=problem, is_scout=scout, _headers=hs))
    # Readable CT first, then by size: the order in which the reader would pick them.
    out.sort(key=lambda s: (s.problem != "", s.modality != "CT", -s.n_files, s.series_uid))
    return out


def list_dicom_series(folder: PathLike) -> List[DicomSeries]:
    """List the image series in a folder (searched recursively), reading headers only.

    Args:
        folder: A folder holding DICOM files (other files are ignored).

    Returns:
        One :class:`DicomSeries` per SeriesInstanceUID, readable CT series first, larger first.

    Raises:
        InputError: Missing path, empty folder, no DICOM files, or a corrupt DICOM file.
    """
    headers, _ = _scan_folder(os.fspath(folder))
    return _group(headers)


def _describe(s: DicomSeries) -> str:
    desc = f" '{s.description}'" if s.description else ""
    return f"{s.series_uid or '(no UID)'} ({s.modality}{desc}, {s.n_files} slices)"


def _pick_series(folder: str, series: List[DicomSeries], series_uid: Optional[str],
                 warnings: List[str]) -> DicomSeries:
    if series_uid is not None:
        chosen = [s for s in series if s.series_uid == series_uid]
        if not chosen:
            raise InputError(folder, f"series UID {series_uid} not found; available: "
                             + "; ".join(_describe(s) for s in series))
        s = chosen[0]
        if s.problem:
            raise InputError(folder, f"series {series_uid}: {s.problem}")
        return s
    readable = [s for s in series if not s.problem]
    if not readable:
        ct = [s for s in series if s.modality in ("CT", "")]
        if not ct:
            mods = sorted({s.modality for s in series})
            raise InputError(folder, f"no CT series: modality {'/'.join(mods)} is not CT "
                                     f"(e.g. {series[0].files[0]})")
        # Report the most promising CT series' problem (mixed series, single slice, ...).
        best = max(ct, key=lambda s: (not s.is_scout, s.n_files))
        raise InputError(folder, best.problem if len(series) == 1
                         else f"no readable CT series; series {_describe(best)}: {best.problem}")
    full = [s for s in readable if s.n_files >= MIN_CT_SLICES]
    pool = full or readable
    if not full:
        warnings.append(f"only {pool[0].n_files} slices in the CT series; "
                        "this may be a scout or a partial export")
    chosen_series = pool[0]  # already sorted: most slices first
    if len(pool) > 1:
        warnings.append(
            f"folder holds {len(pool)} CT series; using the largest, {_describe(chosen_series)}; "
            "others: " + "; ".join(_describe(s) for s in pool[1:])
            + ". Pass series_uid to choose another")
    return chosen_series


# ---------------------------------------------------------------------------------- pixels
def _decode_pixels(h: _SliceHeader) -> Tuple[np.ndarray, bool]:
    """Stored pixel values of one slice, shape (rows, cols).

    Returns:
        (array, already_rescaled): the SimpleITK fallback applies RescaleSlope/Intercept itself.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(h.path, force=h.forced)
        arr = ds.pixel_array
        if arr.shape != (h.rows, h.cols):
            raise ValueError(f"pixel array shape {arr.shape} != Rows x Columns "
                             f"{(h.rows, h.cols)}")
        return arr, False
    except Exception as exc_pydicom:  # missing handler, truncated data, bad lengths, ...
        first_error = f"{type(exc_pydicom).__name__}: {exc_pydicom}"
    # Fall back to GDCM inside SimpleITK: it decodes JPEG / JPEG-LS / JPEG 2000 without extras.
    try:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileName(h.path)
        arr = sitk.GetArrayFromImage(reader.Execute())
        arr = arr.reshape(arr.shape[-2:]) if arr.ndim == 3 and arr.shape[0] == 1 else arr
        if arr.shape != (h.rows, h.cols):
            raise ValueError(f"decoded shape {arr.shape}")
        return arr, True
    except Exception:
        first_error = first_error.splitlines()[0][:200]
        raise InputError(h.path, f"cannot decode pixel data (file truncated, corrupt, or "
                                 f"compressed with an unsupported codec): {first_error}") from None


# ---------------------------------------------------------------------------------- volume
def _sort_and_space(headers: List[_SliceHeader], frame: np.ndarray,
                    warnings: List[str]) -> Tuple[List[_SliceHeader], float]:
    """Sort slices along the normal, drop duplicates, check spacing and tilt."""
    normal = frame[:, 2]
    pos = np.array([float(np.dot(h.ipp, normal)) for h in headers])
    # Stable tiebreak so that the duplicate kept is deterministic.
    order = sorted(range(len(headers)),
                   key=lambda i: (pos[i], headers[i].instance_number, headers[i].path))
    hs = [headers[i] for i in order]
    pos = pos[order]
    keep = [0]
    for i in range(1, len(hs)):
        if pos[i] - pos[keep[-1]] > _DUPLICATE_TOL_MM:
            keep.append(i)
    if len(keep) < len(hs):
        dropped = len(hs) - len(keep)
        warnings.append(f"{dropped} slices duplicate the position of another slice and were "
                        f"dropped (kept {len(keep)})")
        hs = [hs[i] for i in keep]
        pos = pos[keep]
    if len(hs) < 2:
        raise InputError(os.path.dirname(hs[0].path),
                         "a single 2D image, not a volume (all slices share one position)")
    gaps = np.diff(pos)
    spacing = float(np.median(gaps))
    deviation = float(np.max(np.abs(gaps - spacing)))
    if deviation > min(0.01 * spacing, 0.05):
        warnings.append(
            f"non-uniform slice spacing: {gaps.min():.4g} to {gaps.max():.4g} mm; "
            f"using the median {spacing:.4g} mm, so some slices are misplaced by up to "
            f"{deviation:.3g} mm (data not resampled)")
    span = hs[-1].ipp - hs[0].ipp
    length = float(np.linalg.norm(span))
    if length > 0:
        cos = min(1.0, abs(float(np.dot(span, normal))) / length)
        tilt = float(np.degrees(np.arccos(cos)))
        if tilt > _TILT_WARN_DEG:
            shear = float(np.linalg.norm(span - np.dot(span, normal) * normal))
            warnings.append(
                f"gantry tilt of {tilt:.2f} degrees: slices are shifted in-plane by up to "
                f"{shear:.2f} mm, which the volume geometry ignores (not resampled)")
    return hs, spacing


def _complete_geometry(headers: List[_SliceHeader], warnings: List[str]
                       ) -> Tuple[List[_SliceHeader], List[str]]:
    """Stand in for geometry tags an anonymised export dropped, saying so in ``warnings``.

    ImageOrientationPatient missing on every slice: :data:`ASSUMED_IOP` (axial, identity).
    ImagePositionPatient missing: the slices are stacked along the normal in InstanceNumber order,
    SpacingBetweenSlices (else SliceThickness) mm apart, the lowest InstanceNumber at (0, 0, 0)
    mm. PixelSpacing missing: 1 mm. (:func:`_placement_problem` has refused what cannot be
    stood in for.)

    Returns:
        (headers with IOP and IPP set, names of the missing tags that were assumed).
    """
    missing: List[str] = []
    if headers[0].iop is None:
        missing.append("ImageOrientationPatient")
        headers = [replace(h, iop=np.asarray(ASSUMED_IOP, dtype=float)) for h in headers]
        warnings.append(
            "ImageOrientationPatient missing (anonymised export?): assumed axial slices in the "
            "standard orientation (identity: columns towards the patient's left, rows towards "
            "posterior, slices from foot to head). The left/right side and the head/foot "
            "direction follow from this assumption, not from the file: check the side on the "
            "images")
    if any(h.ipp is None for h in headers):
        missing.append("ImagePositionPatient")
        frame = _orthonormal_frame(headers[0].iop)
        assert frame is not None  # guaranteed by _series_problem
        first = headers[0]
        step, source = ((first.spacing_between, "SpacingBetweenSlices")
                        if first.spacing_between is not None
                        else (first.slice_thickness, "SliceThickness"))
        assert step is not None  # guaranteed by _placement_problem
        low = min(h.instance_number for h in headers)
        high = max(h.instance_number for h in headers)
        headers = [replace(h, ipp=(h.instance_number - low) * step * frame[:, 2])
                   for h in headers]
        warnings.append(
            f"ImagePositionPatient missing (anonymised export?): slices ordered by "
            f"InstanceNumber ({low} to {high}, the lowest number first along the slice normal) "
            f"and placed {step:.4g} mm apart ({source}), first slice at (0, 0, 0) mm; a "
            "reversed numbering would turn the scan upside down (and swap left and right)")
    if headers[0].pixel_spacing is None:
        missing.append("PixelSpacing")
        warnings.append("PixelSpacing missing; assuming 1 mm")
    return headers, missing


def _hu_problem(hu: np.ndarray) -> str:
    """Why values do not look like CT in Hounsfield units, or "" when they do.

    CT has air at -1000 HU around the body and tissue or bone at -200..3100 HU; MR, PET or CT
    values stored without their RescaleIntercept have neither air nor negative values.
    """
    step = max(1, hu.shape[0] // 64)
    sample = hu[::step, ::2, ::2]
    air = float(np.mean((sample >= -1100) & (sample <= -900)))
    tissue = float(np.mean((sample >= -200) & (sample <= 3100)))
    if air >= MIN_AIR_FRACTION and tissue >= MIN_TISSUE_FRACTION:
        return ""
    return (f"the pixel values ({float(hu.min()):.0f} to {float(hu.max()):.0f}) do not look "
            f"like CT in Hounsfield units ({100 * air:.2g} % air at -1000 HU, "
            f"{100 * tissue:.2g} % tissue or bone at -200..3100 HU; CT needs at least "
            f"{100 * MIN_AIR_FRACTION:g} % of each)")


def _accept_as_ct(first: _SliceHeader, hu: np.ndarray, warnings: List[str],
                  missing: List[str]) -> None:
    """A series without Modality is read as CT only when its values are HU (else InputError,
    naming the first file)."""
    problem = _hu_problem(hu)
    if problem:
        raise InputError(first.path, f"Modality missing and {problem}: not read as CT (an MR "
                                     "or other series, or RescaleIntercept missing?)")
    missing.insert(0, "Modality")
    air = float(np.mean(hu[::max(1, hu.shape[0] // 64), ::2, ::2] <= -900))
    warnings.append(f"Modality missing (anonymised export?): read as CT because the pixel "
                    f"values are Hounsfield units (air at -1000 HU in {100 * air:.0f} % of "
                    f"the voxels, up to {float(hu.max()):.0f} HU)")


def _assemble(folder: str, series: DicomSeries, warnings: List[str],
              max_voxels: int) -> Volume:
    headers, missing = _complete_geometry(list(series._headers), warnings)
    first = headers[0]
    frame = _orthonormal_frame(first.iop)
    assert frame is not None  # guaranteed by _series_problem
    hs, slice_spacing = _sort_and_space(headers, frame, warnings)
    check_voxel_budget(folder, (first.cols, first.rows, len(hs)), max_voxels)
    if first.pixel_spacing is None:
        row_sp, col_sp = 1.0, 1.0  # warned by _complete_geometry
    else:
        row_sp, col_sp = first.pixel_spacing
    if row_sp <= 0 or col_sp <= 0:
        raise InputError(folder, f"invalid PixelSpacing {first.pixel_spacing}")

    out = np.empty((len(hs), first.rows, first.cols), dtype=np.float32)
    integral = True
    for k, h in enumerate(hs):
        raw, rescaled = _decode_pixels(h)
        if rescaled:
            out[k] = raw
            integral = integral and np.array_equal(out[k], np.rint(out[k]))
        else:
            # Per slice: slope/intercept may differ between slices of one series.
            out[k] = raw.astype(np.float32) * np.float32(h.slope) + np.float32(h.intercept)
            if not (float(h.slope).is_integer() and float(h.intercept).is_integer()):
                integral = integral and np.array_equal(out[k], np.rint(out[k]))
    check_finite(folder, out)
    if not first.modality:
        _accept_as_ct(first, out, warnings, missing)
    info = np.iinfo(np.int16)
    if integral and out.size and info.min <= out.min() and out.max() <= info.max:
        array: np.ndarray = out.astype(np.int16)  # HU fit int16: half the memory
    else:
        array = out
    meta: Dict[str, Any] = {
        "source": folder,
        "format": "dicom",
        "modality": "CT",
        "series_uid": series.series_uid,
        "series_description": series.description,
        "n_slices": len(hs),
        "warnings": warnings,
        "missing_tags": missing,
    }
    return Volume(array, spacing=(col_sp, row_sp, slice_spacing),
                  origin=tuple(float(v) for v in hs[0].ipp), direction=frame, meta=meta)


def read_dicom_series(folder: PathLike, series_uid: Optional[str] = None, *,
                      max_voxels: int = MAX_VOXELS) -> Volume:
    """Read a CT DICOM series from a folder (searched recursively) into a Volume in HU.

    Args:
        folder: Folder holding the slices (one file per slice; other files are ignored).
        series_uid: SeriesInstanceUID to read. When None, the CT series with the most slices
            that is not a localizer/scout is picked (with a warning if several qualify).
        max_voxels: Refuse volumes larger than this many voxels (checked before reading pixels).

    Returns:
        Volume with array (z, y, x) in HU (int16 when all values are integers within int16,
        else float32), spacing (x, y, z) mm where z is the median slice spacing, origin = LPS
        position of the first slice along the normal, direction columns = (row cosine, column
        cosine, normal). ``meta`` holds "source", "format" ("dicom"), "modality" ("CT"),
        "series_uid", "series_description", "n_slices", "warnings" (non-uniform spacing, gantry
        tilt, duplicate slices, several CT series, skipped unreadable files, missing tags and
        what was assumed instead) and "missing_tags" (names of the missing tags that were
        stood in for, e.g. ["Modality", "ImageOrientationPatient"]).

    Raises:
        InputError: See the module docstring for the refused cases.
    """
    folder = os.fspath(folder)
    headers, bad = _scan_folder(folder)
    warnings: List[str] = []
    if bad:
        warnings.append(f"skipped {len(bad)} unreadable files with a DICOM extension, e.g. "
                        f"{bad[0][0]}: {bad[0][1]}")
    series = _pick_series(folder, _group(headers), series_uid, warnings)
    return _assemble(folder, series, warnings, max_voxels)
