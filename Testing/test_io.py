"""Round trips, atomic writes, deterministic bytes and DICOM geometry against SimpleITK."""

from __future__ import annotations

import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # harmless once Testing/conftest.py does the same
    sys.path.insert(0, _HERE)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from io_corpus import oblique_iop, write_ct_series  # noqa: E402

from AnkleFractureLib.errors import InputError  # noqa: E402
from AnkleFractureLib.geometry.volume import Volume  # noqa: E402
from AnkleFractureLib.io import (  # noqa: E402
    MAX_VOXELS, SUPPORTED_EXTENSIONS, atomic_output, atomic_write_json, atomic_write_text,
    list_dicom_series, read_dicom_series, read_image, write_image)
from AnkleFractureLib.io.atomic import split_extension  # noqa: E402

WRITABLE = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def _rot(axis: int, degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    r = np.eye(3)
    r[i, i] = r[j, j] = c
    r[i, j], r[j, i] = -s, s
    return r


def make_volume(dtype=np.int16) -> Volume:
    """Anisotropic, 30-degree oblique with an axis flip, non-zero origin."""
    rng = np.random.default_rng(3)
    if dtype == np.uint8:
        arr = rng.integers(0, 3, size=(7, 9, 11)).astype(np.uint8)
    elif dtype == np.float32:
        arr = rng.normal(0, 300, size=(7, 9, 11)).astype(np.float32)
    else:
        arr = rng.integers(-1024, 3000, size=(7, 9, 11)).astype(dtype)
    direction = _rot(2, 30.0) @ np.diag([1.0, -1.0, 1.0])  # oblique + flipped j axis
    return Volume(arr, spacing=(0.37, 0.52, 1.25), origin=(-12.5, 30.25, 101.0),
                  direction=direction)


def test_public_constants():
    assert set(WRITABLE) == set(SUPPORTED_EXTENSIONS)
    assert MAX_VOXELS == 2 ** 30


@pytest.mark.parametrize("ext", WRITABLE)
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_round_trip_keeps_geometry_and_dtype(tmp_path, ext, dtype):
    vol = make_volume(dtype)
    path = tmp_path / "sub" / f"img{ext}"
    write_image(vol, path)
    back = read_image(path)
    assert back.array.dtype == vol.array.dtype
    np.testing.assert_array_equal(back.array, vol.array)
    # NIfTI stores qform/sform as float32: 1e-5 relative. NRRD/MetaImage keep doubles.
    rtol = 1e-5 if ext.startswith(".nii") else 1e-12
    np.testing.assert_allclose(back.spacing, vol.spacing, rtol=rtol)
    np.testing.assert_allclose(back.origin, vol.origin, rtol=rtol)
    np.testing.assert_allclose(back.direction, vol.direction, rtol=rtol, atol=rtol)
    assert back.meta["source"] == str(path)
    assert back.meta["format"] in ("nifti", "nrrd", "metaimage")
    assert back.meta["warnings"] == []
    leftovers = [f for f in os.listdir(path.parent) if ".tmp" in f or f.startswith(".")]
    assert leftovers == []


def test_conftest_oblique_fixture_round_trips(tmp_path, oblique_volume):
    for ext in WRITABLE:
        write_image(oblique_volume, tmp_path / f"v{ext}")
        back = read_image(tmp_path / f"v{ext}")
        assert back.same_geometry(oblique_volume, atol=1e-4)
        np.testing.assert_array_equal(back.array, oblique_volume.array)


def test_bool_written_as_uint8(tmp_path):
    vol = make_volume(np.uint8)
    write_image(vol.with_array(vol.array > 0), tmp_path / "mask.nii.gz")
    back = read_image(tmp_path / "mask.nii.gz")
    assert back.array.dtype == np.uint8 and set(np.unique(back.array)) <= {0, 1}


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_writes_are_deterministic(tmp_path, ext):
    vol = make_volume()
    a, b = tmp_path / f"a{ext}", tmp_path / "other" / f"a{ext}"
    write_image(vol, a)
    os.utime(a, (0, 0))  # a different file time must not matter either
    write_image(vol, b)
    assert a.read_bytes() == b.read_bytes()


def test_nii_gz_is_gzip_and_mhd_has_data_file(tmp_path):
    vol = make_volume()
    write_image(vol, tmp_path / "x.nii.gz")
    assert (tmp_path / "x.nii.gz").read_bytes()[:2] == b"\x1f\x8b"
    write_image(vol, tmp_path / "m.mhd", compress=False)
    assert sorted(os.listdir(tmp_path)) == ["m.mhd", "m.raw", "x.nii.gz"]
    write_image(vol, tmp_path / "m.mhd")  # compressed: .zraw beside it
    assert "m.zraw" in os.listdir(tmp_path)
    np.testing.assert_array_equal(read_image(tmp_path / "m.mhd").array, vol.array)


def test_parallel_gzip_is_one_deterministic_member(tmp_path, monkeypatch):
    """The pigz-style writer: same bytes for any thread count, one ordinary gzip member that
    zlib, Python's gzip and ITK read, the trailer's size as the NIfTI check expects."""
    import gzip
    import io
    import struct
    import zlib

    from AnkleFractureLib.io import files

    monkeypatch.setattr(files, "GZIP_CHUNK", 1 << 16)  # many chunks from a small volume
    rng = np.random.default_rng(0)
    data = rng.integers(0, 50, 300_000, dtype=np.uint8).tobytes() + bytes(200_000)
    for payload in (b"", b"x", data):
        outs = []
        for threads, cut in ((1, 1), (2, 7), (3, 70_001)):  # any threads, any cut into pieces
            buf = io.BytesIO()
            pieces = [payload[i:i + cut] for i in range(0, len(payload), cut)]
            files._gzip_file(pieces, buf, threads=threads)
            outs.append(buf.getvalue())
        assert outs[0] == outs[1] == outs[2]
        assert gzip.decompress(outs[0]) == payload
        d = zlib.decompressobj(31)
        assert d.decompress(outs[0]) == payload and d.eof and d.unused_data == b""
        assert struct.unpack("<I", outs[0][-4:])[0] == len(payload)
    geo = make_volume()
    vol = Volume(rng.random((30, 40, 50), dtype=np.float32), geo.spacing, geo.origin,
                 geo.direction)
    write_image(vol, tmp_path / "v.nii.gz")
    assert vol.array.nbytes > 3 * (1 << 16)  # several chunks
    np.testing.assert_array_equal(read_image(tmp_path / "v.nii.gz").array, vol.array)
    itk = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "v.nii.gz")))
    np.testing.assert_array_equal(itk, vol.array)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint8, np.uint16,
                                   np.int64, bool])
def test_direct_nii_gz_matches_simpleitk(tmp_path, monkeypatch, dtype):
    """A scalar volume is gzipped straight from its array behind a patched header: the bytes
    must be exactly those of SimpleITK's own file (gzipped the same way)."""
    from AnkleFractureLib.io import files

    monkeypatch.setattr(files, "GZIP_CHUNK", 1000)
    rng = np.random.default_rng(3)
    geo = make_volume()
    for shape in ((2, 1, 1), (5, 1, 3), (17, 23, 29)):
        vol = Volume((rng.random(shape) * 60).astype(dtype), geo.spacing, geo.origin,
                     geo.direction)
        assert files._nifti_header(vol) is not None  # the direct path is taken
        write_image(vol, tmp_path / "direct.nii.gz")
        files.write_sitk_image(vol.to_sitk(), tmp_path / "sitk.nii.gz")
        assert (tmp_path / "direct.nii.gz").read_bytes() == (tmp_path / "sitk.nii.gz").read_bytes()
        back = read_image(tmp_path / "direct.nii.gz")
        np.testing.assert_array_equal(back.array, vol.array.astype(back.array.dtype))
        assert back.same_geometry(vol, atol=1e-5)
    strided = Volume(vol.array[:, ::2, ::-1], geo.spacing, geo.origin, geo.direction)
    assert not strided.array.flags.c_contiguous
    write_image(strided, tmp_path / "direct.nii.gz")
    files.write_sitk_image(strided.to_sitk(), tmp_path / "sitk.nii.gz")
    assert (tmp_path / "direct.nii.gz").read_bytes() == (tmp_path / "sitk.nii.gz").read_bytes()


def test_uncompressed_nrrd_and_mha(tmp_path):
    vol = make_volume()
    for ext in (".nrrd", ".mha"):
        write_image(vol, tmp_path / f"u{ext}", compress=False)
        np.testing.assert_array_equal(read_image(tmp_path / f"u{ext}").array, vol.array)
    big = os.path.getsize(tmp_path / "u.nrrd")
    write_image(vol, tmp_path / "c.nrrd")
    assert os.path.getsize(tmp_path / "c.nrrd") < big


def test_write_unknown_extension_refused(tmp_path):
    with pytest.raises(InputError, match="cannot write extension '.png'"):
        write_image(make_volume(), tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


def test_write_overwrites_atomically(tmp_path):
    path = tmp_path / "v.nrrd"
    write_image(make_volume(), path)
    vol2 = make_volume().with_array(np.zeros((7, 9, 11), np.int16))
    write_image(vol2, path)
    assert not read_image(path).array.any()


# ---------------------------------------------------------------------------------- atomic
def test_split_extension():
    assert split_extension("a/b/ct.NII.GZ") == ("ct", ".nii.gz")
    assert split_extension("ct.v2.nrrd") == ("ct.v2", ".nrrd")
    assert split_extension("noext") == ("noext", "")
    assert split_extension("data.gz") == ("data", ".gz")


def test_atomic_output_keeps_suffix_and_replaces(tmp_path):
    dest = tmp_path / "deep" / "er" / "seg.nii.gz"
    with atomic_output(dest) as tmp:
        assert os.path.dirname(tmp) == str(dest.parent)
        assert tmp.endswith(".tmp.nii.gz") and os.path.basename(tmp).startswith(".seg.")
        assert not dest.exists()
        with open(tmp, "wb") as fh:
            fh.write(b"data")
    assert dest.read_bytes() == b"data"
    assert os.listdir(dest.parent) == ["seg.nii.gz"]


def test_atomic_output_failure_leaves_old_file(tmp_path):
    dest = tmp_path / "report.json"
    dest.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(dest) as tmp:
            with open(tmp, "w") as fh:
                fh.write("half")
            raise RuntimeError("writer crashed")
    assert dest.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.json"]


def test_atomic_write_text_and_json(tmp_path):
    atomic_write_text(tmp_path / "a" / "t.txt", "héllo\nworld")
    assert (tmp_path / "a" / "t.txt").read_text(encoding="utf-8") == "héllo\nworld"
    data = {"z": 1, "a": [1.5, "B"], "nested": {"k": None}}
    atomic_write_json(tmp_path / "r.json", data)
    text = (tmp_path / "r.json").read_text()
    assert text.endswith("}\n") and text.index('"z"') < text.index('"a"')  # key order kept
    assert '\n  "z": 1' in text
    assert json.loads(text) == data
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "r.json", {"bad": object()})
    assert json.loads((tmp_path / "r.json").read_text()) == data
    assert sorted(os.listdir(tmp_path)) == ["a", "r.json"]


# ---------------------------------------------------------------------------------- DICOM
@pytest.mark.parametrize("iop", [(1, 0, 0, 0, 1, 0), oblique_iop(30), (0, 1, 0, 0, 0, -1)],
                         ids=["axial", "oblique30", "sagittal"])
def test_dicom_geometry_matches_simpleitk(tmp_path, iop):
    s = write_ct_series(tmp_path / "ct", iop=iop, pixel_spacing=(0.8, 0.7), slice_spacing=1.25,
                        rows=16, cols=20, shuffle=True)
    vol = read_dicom_series(s["folder"])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(s["folder"])))
    ref = reader.Execute()
    np.testing.assert_allclose(vol.spacing, ref.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(vol.origin, ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(vol.direction.reshape(-1), ref.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(ref))
    np.testing.assert_array_equal(vol.array, s["hu"])
    assert vol.spacing == pytest.approx((0.7, 0.8, 1.25))  # (column, row, slice) spacing
    assert vol.array.dtype == np.int16 and vol.shape == (12, 16, 20)
    # Index -> physical agrees with the DICOM header of a slice: voxel (i=3, j=5) of slice 7.
    ipp7 = np.asarray(_ipp(s["paths"][7]))  # rank 7 along the normal = sorted slice 7
    expected = ipp7 + 3 * 0.7 * np.asarray(iop[:3]) + 5 * 0.8 * np.asarray(iop[3:])
    np.testing.assert_allclose(vol.index_to_physical([[3, 5, 7]])[0], expected, atol=1e-4)


def _ipp(path):
    import pydicom

    return [float(v) for v in pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient]


def test_dicom_meta(tmp_path):
    s = write_ct_series(tmp_path / "ct", description="Ankle 1.0 bone")
    vol = read_image(s["folder"])
    assert vol.meta["source"] == str(s["folder"]) and vol.meta["format"] == "dicom"
    assert vol.meta["modality"] == "CT" and vol.meta["series_uid"] == s["uid"]
    assert vol.meta["series_description"] == "Ankle 1.0 bone"
    assert vol.meta["warnings"] == []
    (series,) = list_dicom_series(s["folder"])
    assert series.n_files == 12 and series.problem == "" and not series.is_scout


def test_dicom_to_nifti_round_trip(tmp_path):
    s = write_ct_series(tmp_path / "ct", iop=oblique_iop(30))
    vol = read_image(s["folder"])
    write_image(vol, tmp_path / "ct.nii.gz")
    back = read_image(tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.same_geometry(vol, atol=1e-4)


def test_compressed_dicom_reads(tmp_path):
    """JPEG 2000 slices (encoded by GDCM) decode: pydicom's Pillow plugin or the GDCM fallback."""
    import pydicom

    s = write_ct_series(tmp_path / "ct", n=12)
    comp = tmp_path / "j2k"
    comp.mkdir()
    for p in s["paths"]:
        stored = pydicom.dcmread(p).pixel_array  # int16 stored values
        encoded = tmp_path / "encoded.dcm"
        writer = sitk.ImageFileWriter()
        writer.SetImageIO("GDCMImageIO")
        writer.SetFileName(str(encoded))
        writer.SetUseCompression(True)
        writer.Execute(sitk.GetImageFromArray(stored[None]))
        enc = pydicom.dcmread(encoded)
        # Transplant the compressed pixel data into our CT header (same stored values).
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = enc.file_meta.TransferSyntaxUID
        ds.PixelData = enc.PixelData
        ds["PixelData"].is_undefined_length = True
        ds["PixelData"].VR = "OB"
        ds.save_as(comp / p.name)
    ts = pydicom.dcmread(comp / s["paths"][0].name, stop_before_pixels=True).file_meta
    assert ts.TransferSyntaxUID.is_compressed
    vol = read_image(comp)
    np.testing.assert_array_equal(vol.array, s["hu"])
    assert vol.same_geometry(read_image(s["folder"]))


def test_pixel_decoding_falls_back_to_simpleitk(tmp_path, monkeypatch):
    """When pydicom cannot decode (no codec plugin), GDCM via SimpleITK decodes instead."""
    import pydicom

    def refuse(self):
        raise RuntimeError("no pixel data handler for this transfer syntax")

    s = write_ct_series(tmp_path / "ct", slopes=[1.0, 2.0] * 6, intercepts=[-1024.0, -1000.0] * 6)
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(refuse))
    vol = read_image(s["folder"])  # SimpleITK applies the per-slice rescale itself
    np.testing.assert_array_equal(vol.array, s["hu"])
    assert vol.array.dtype == np.int16


# ---------------------------------------------------------------------- DICOM writer
@pytest.mark.parametrize("handed", ["right", "left"])
def test_dicom_writer_round_trip_keeps_every_voxel_where_it_was(tmp_path, handed):
    from AnkleFractureLib.io.dicom_write import write_dicom_series

    vol = make_volume()  # oblique, j axis flipped: left-handed
    if handed == "right":
        d = np.asarray(vol.direction).copy()
        d[:, 2] = np.cross(d[:, 0], d[:, 1])
        vol = Volume(vol.array, vol.spacing, vol.origin, d)
    files = write_dicom_series(vol, tmp_path / "series")
    assert len(files) == vol.shape[0] and all(f.is_file() for f in files)
    back = read_image(tmp_path / "series")
    assert back.meta["format"] == "dicom" and back.shape == vol.shape
    np.testing.assert_allclose(back.spacing, vol.spacing, atol=1e-5)
    # Every voxel keeps its HU at its LPS position (a left-handed frame is stored flipped).
    kji = np.argwhere(np.ones(vol.shape, bool))[::37]
    pts = vol.index_to_physical(kji[:, ::-1])
    idx = np.rint(back.physical_to_index(pts)).astype(int)[:, ::-1]
    np.testing.assert_allclose(back.index_to_physical(idx[:, ::-1]), pts, atol=1e-4)
    np.testing.assert_array_equal(back.array[tuple(idx.T)], vol.array[tuple(kji.T)])
    if handed == "right":
        np.testing.assert_allclose(back.direction, vol.direction, atol=1e-5)
        np.testing.assert_allclose(back.origin, vol.origin, atol=1e-4)


def test_dicom_writer_refuses_a_non_empty_folder_and_leaves_no_partial_series(tmp_path):
    from AnkleFractureLib.io.dicom_write import write_dicom_series

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "other.txt").write_text("x")
    with pytest.raises(InputError, match="busy"):
        write_dicom_series(make_volume(), tmp_path / "busy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
