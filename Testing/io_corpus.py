"""Generators of good, tricky and bad inputs for the IO tests, written into a tmp folder.

Synthetic DICOM is small (16 x 16 pixels, 12 slices) so the whole IO suite runs in seconds. Each
slice's HU values encode the slice's rank along the normal (``100 * rank + pattern``), so a test
can tell whether slices came back in position order.

Bad cases are listed in :data:`BAD_CASES` as ``(name, maker, keyword)``: ``maker(tmp_path)``
returns ``(path to read, path the error must name)`` and the message must contain ``keyword``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
_SOP_BY_MODALITY = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE, "CR": CR_IMAGE_STORAGE,
                    "US": US_IMAGE_STORAGE}

AXIAL_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def oblique_iop(degrees: float = 30.0) -> Tuple[float, ...]:
    """Row/column cosines rotated by ``degrees`` about the LPS y axis (an oblique axial)."""
    a = np.radians(degrees)
    row = (np.cos(a), 0.0, -np.sin(a))
    col = (0.0, 1.0, 0.0)
    return tuple(float(v) for v in row + col)


def slice_pattern(rows: int, cols: int) -> np.ndarray:
    """In-plane HU pattern (0..rows+cols) that differs along rows and columns."""
    j, i = np.mgrid[0:rows, 0:cols]
    return (2 * j + i).astype(np.int16)


def write_dicom_slice(path: Path, stored: np.ndarray, *, series_uid: str, ipp: Sequence[float],
                      iop: Sequence[float] = AXIAL_IOP, pixel_spacing=(0.8, 0.7),
                      modality: str = "CT", slope: float = 1.0, intercept: float = -1024.0,
                      instance_number: int = 1, image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                      description: str = "synthetic", study_uid: str = "1.2.3.4") -> Path:
    """Write one uncompressed single-frame slice (ExplicitVRLittleEndian, signed 16 bit).

    Args:
        path: Destination file.
        stored: Stored pixel values (rows, cols), int16 (HU = stored * slope + intercept).
        series_uid: SeriesInstanceUID.
        ipp: ImagePositionPatient (LPS mm).
        iop: ImageOrientationPatient (row cosine, column cosine).
        pixel_spacing: (row spacing, column spacing) mm, DICOM order.
    """
    from AnkleFractureLib.io.dicom_write import slice_dataset

    ds = slice_dataset(stored, series_uid=series_uid, study_uid=study_uid,
                       frame_uid=study_uid + ".9", ipp=ipp, iop=iop,
                       pixel_spacing=pixel_spacing, instance_number=instance_number,
                       modality=modality, sop_class=_SOP_BY_MODALITY.get(modality,
                                                                         CT_IMAGE_STORAGE),
                       slope=slope, intercept=intercept, image_type=image_type,
                       description=description, patient_name="Synthetic^Ankle",
                       patient_id="0")
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def write_ct_series(folder: Path, *, n: int = 12, rows: int = 16, cols: int = 16,
                    positions: Optional[Sequence[float]] = None, slice_spacing: float = 1.25,
                    origin: Sequence[float] = (-10.0, 20.0, 30.0),
                    iop: Sequence[float] = AXIAL_IOP, pixel_spacing=(0.8, 0.7),
                    in_plane_shift: Sequence[float] = (0.0, 0.0, 0.0),
                    modality: str = "CT", series_uid: Optional[str] = None,
                    slopes: Optional[Sequence[float]] = None,
                    intercepts: Optional[Sequence[float]] = None,
                    shuffle: bool = False, prefix: str = "slice",
                    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                    description: str = "synthetic") -> Dict[str, object]:
    """Write a synthetic series; slice of rank k (along the normal) holds HU 100*k + pattern.

    Args:
        positions: Offsets along the normal in mm (default ``k * slice_spacing``).
        in_plane_shift: Added to the IPP of slice k as ``k * shift`` (simulates gantry tilt).
        slopes, intercepts: Per-slice rescale (default 1 and -1024).
        shuffle: Give files random names and random InstanceNumbers, unrelated to position.

    Returns:
        dict with "folder", "paths" (in rank order), "hu" (expected (n, rows, cols) float HU in
        rank order), "uid", "positions".
    """
    from pydicom.uid import generate_uid

    uid = series_uid or generate_uid()
    pos = np.asarray(positions if positions is not None
                     else np.arange(n) * slice_spacing, dtype=float)
    n = len(pos)
    r, c = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(r, c)
    slopes = list(slopes) if slopes is not None else [1.0] * n
    intercepts = list(intercepts) if intercepts is not None else [-1024.0] * n
    rng = random.Random(1234)
    names = [f"{prefix}_{k:03d}.dcm" for k in range(n)]
    numbers = list(range(1, n + 1))
    if shuffle:
        rng.shuffle(names)
        rng.shuffle(numbers)
    hu = np.empty((n, rows, cols), dtype=np.float64)
    paths: List[Path] = []
    for k in range(n):
        hu_k = 100.0 * k + slice_pattern(rows, cols)
        stored = np.round((hu_k - intercepts[k]) / slopes[k]).astype(np.int16)
        hu[k] = stored.astype(np.float64) * slopes[k] + intercepts[k]
        ipp = np.asarray(origin, float) + pos[k] * normal + k * np.asarray(in_plane_shift, float)
        paths.append(write_dicom_slice(
            folder / names[k], stored, series_uid=uid, ipp=ipp, iop=iop,
            pixel_spacing=pixel_spacing, modality=modality, slope=slopes[k],
            intercept=intercepts[k], instance_number=numbers[k], image_type=image_type,
            description=description))
    return {"folder": folder, "paths": paths, "hu": hu, "uid": uid, "positions": pos}


# ---------------------------------------------------------------------------------- bad cases
Maker = Callable[[Path], Tuple[Path, Path]]


def missing_path(tmp: Path) -> Tuple[Path, Path]:
    p = tmp / "no_such_scan"
    return p, p


def empty_folder(tmp: Path) -> Tuple[Path, Path]:
    p = tmp / "empty"
    p.mkdir()
    return p, p


def folder_without_dicom(tmp: Path) -> Tuple[Path, Path]:
    p = tmp / "notes"
    p.mkdir()
    (p / "readme.txt").write_text("this is not a scan\n")
    (p / "list.csv").write_text("a,b\n1,2\n")
    return p, p


def random_bytes_dcm(tmp: Path) -> Tuple[Path, Path]:
    p = tmp / "junk"
    p.mkdir()
    f = p / "IM0001.dcm"
    f.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return p, f


def truncated_dicom_in_series(tmp: Path) -> Tuple[Path, Path]:
    s = write_ct_series(tmp / "truncated")
    victim = s["paths"][5]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 200])  # cut in the middle of Pixel Data
    return s["folder"], victim


def truncated_dicom_header(tmp: Path) -> Tuple[Path, Path]:
    s = write_ct_series(tmp / "truncated_header")
    victim = s["paths"][3]
    victim.write_bytes(victim.read_bytes()[:300])  # preamble + part of the header only
    return s["folder"], victim


def text_as_nifti(tmp: Path) -> Tuple[Path, Path]:
    f = tmp / "scan.nii.gz"
    f.write_text("hello, I am a text file\n" * 20)
    return f, f


def png_as_nrrd(tmp: Path) -> Tuple[Path, Path]:
    import SimpleITK as sitk

    png = tmp / "picture.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.uint8)), str(png))
    f = tmp / "picture.nrrd"
    png.rename(f)
    return f, f


def image_2d_mha(tmp: Path) -> Tuple[Path, Path]:
    import SimpleITK as sitk

    f = tmp / "flat.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 9), np.int16)), str(f))
    return f, f


def single_dicom_file(tmp: Path) -> Tuple[Path, Path]:
    s = write_ct_series(tmp / "one_file", n=2)
    return s["paths"][0], s["paths"][0]


def single_slice_folder(tmp: Path) -> Tuple[Path, Path]:
    s = write_ct_series(tmp / "one_slice", n=1)
    return s["folder"], s["folder"]


def _non_ct(modality: str) -> Maker:
    def make(tmp: Path) -> Tuple[Path, Path]:
        s = write_ct_series(tmp / f"series_{modality}", modality=modality)
        return s["folder"], s["folder"]

    make.__name__ = f"non_ct_{modality}"
    return make


def mixed_matrix_size(tmp: Path) -> Tuple[Path, Path]:
    s = write_ct_series(tmp / "mixed_size", n=6)
    write_ct_series(tmp / "mixed_size", n=6, rows=20, cols=20, series_uid=s["uid"],
                    origin=(-10.0, 20.0, 60.0), prefix="big")
    return s["folder"], s["folder"]


def mixed_orientation(tmp: Path) -> Tuple[Path, Path]:
    s = write_ct_series(tmp / "mixed_orient", n=6)
    write_ct_series(tmp / "mixed_orient", n=6, series_uid=s["uid"], iop=oblique_iop(20),
                    prefix="oblique")
    return s["folder"], s["folder"]


def nan_nrrd(tmp: Path) -> Tuple[Path, Path]:
    import SimpleITK as sitk

    a = np.zeros((4, 5, 6), np.float32)
    a[1, 2, 3] = np.nan
    a[2, 0, 0] = np.inf
    f = tmp / "nan.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(a), str(f))
    return f, f


def huge_mhd(tmp: Path) -> Tuple[Path, Path]:
    """A MetaImage header declaring 4000^3 int16 voxels next to a 16-byte data file."""
    (tmp / "huge.raw").write_bytes(b"\0" * 16)
    f = tmp / "huge.mhd"
    f.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4000 4000 4000\n"
                 "ElementSpacing = 1 1 1\nElementType = MET_SHORT\n"
                 "ElementDataFile = huge.raw\n")
    return f, f


def unknown_extension(tmp: Path) -> Tuple[Path, Path]:
    f = tmp / "scan.png"
    f.write_bytes(b"\x89PNG\r\n\x1a\n")
    return f, f


def truncated_nifti(tmp: Path) -> Tuple[Path, Path]:
    import SimpleITK as sitk

    f = tmp / "cut.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(
        np.random.default_rng(1).integers(-1000, 2000, (20, 30, 30)).astype(np.int16)), str(f))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # header intact, voxel data cut
    return f, f


def truncated_plain_nifti(tmp: Path) -> Tuple[Path, Path]:
    import SimpleITK as sitk

    f = tmp / "cut.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((20, 30, 30), np.int16)), str(f))
    f.write_bytes(f.read_bytes()[:-7])  # a few bytes missing at the end
    return f, f


def mhd_missing_data_file(tmp: Path) -> Tuple[Path, Path]:
    f = tmp / "orphan.mhd"
    f.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementSpacing = 1 1 1\n"
                 "ElementType = MET_SHORT\nElementDataFile = gone.raw\n")
    return f, f


def rgb_mha(tmp: Path) -> Tuple[Path, Path]:
    import SimpleITK as sitk

    f = tmp / "colour.mha"
    img = sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.uint8), isVector=True)
    sitk.WriteImage(img, str(f))
    return f, f


def image_4d_nifti(tmp: Path, frames: int = 3) -> Tuple[Path, Path]:
    import SimpleITK as sitk

    f = tmp / f"dynamic_{frames}.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((frames, 3, 4, 5), np.int16), isVector=False),
                    str(f))
    return f, f


def single_dicom_without_extension(tmp: Path) -> Tuple[Path, Path]:
    s = write_ct_series(tmp / "noext", n=2)
    f = tmp / "IM000001"
    s["paths"][0].rename(f)
    return f, f


#: (name, maker, keyword the InputError message must contain)
BAD_CASES: List[Tuple[str, Maker, str]] = [
    ("missing_path", missing_path, "does not exist"),
    ("empty_folder", empty_folder, "folder is empty"),
    ("folder_without_dicom", folder_without_dicom, "no DICOM files found"),
    ("random_bytes_dcm", random_bytes_dcm, "corrupt DICOM"),
    ("truncated_pixel_data", truncated_dicom_in_series, "cannot decode pixel data"),
    ("truncated_header", truncated_dicom_header, "corrupt DICOM"),
    ("text_as_nifti", text_as_nifti, "not a readable NIfTI"),
    ("png_as_nrrd", png_as_nrrd, "not a readable NRRD"),
    ("image_2d_mha", image_2d_mha, "2D image"),
    ("single_dicom_file", single_dicom_file, "single 2D DICOM image"),
    ("single_slice_folder", single_slice_folder, "single 2D image"),
    ("non_ct_MR", _non_ct("MR"), "modality MR is not CT"),
    ("non_ct_CR", _non_ct("CR"), "modality CR is not CT"),
    ("non_ct_US", _non_ct("US"), "modality US is not CT"),
    ("mixed_matrix_size", mixed_matrix_size, "mixed series"),
    ("mixed_orientation", mixed_orientation, "mixed series"),
    ("nan_nrrd", nan_nrrd, "non-finite voxels"),
    ("huge_mhd", huge_mhd, "too large"),
    ("unknown_extension", unknown_extension, "unsupported file extension"),
    ("truncated_nifti", truncated_nifti, "file truncated or corrupt"),
    ("truncated_plain_nifti", truncated_plain_nifti, "file truncated or corrupt"),
    ("mhd_missing_data_file", mhd_missing_data_file, "cannot read pixel data"),
    ("rgb_mha", rgb_mha, "multi-component image"),
    ("image_4d_nifti", image_4d_nifti, "4D image"),
    ("single_dicom_without_extension", single_dicom_without_extension, "single 2D DICOM image"),
]
