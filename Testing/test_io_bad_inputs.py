"""The bad-input corpus: every case raises InputError naming the path and the reason.

Also the tricky-but-valid DICOM folders (scout beside CT, CT beside MR, shuffled names,
non-uniform spacing, gantry tilt, per-slice rescale, duplicates) that must load, with warnings.
"""

from __future__ import annotations

import os
import sys
import tracemalloc

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # harmless once Testing/conftest.py does the same
    sys.path.insert(0, _HERE)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from io_corpus import (  # noqa: E402
    BAD_CASES, huge_mhd, image_4d_nifti, oblique_iop, random_bytes_dcm, write_ct_series)

from AnkleFractureLib.errors import InputError  # noqa: E402
from AnkleFractureLib.io import list_dicom_series, read_dicom_series, read_image  # noqa: E402


@pytest.mark.parametrize("name,maker,keyword", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_raises_input_error(tmp_path, name, maker, keyword):
    to_read, offending = maker(tmp_path)
    with pytest.raises(InputError) as info:
        read_image(to_read)
    message = str(info.value)
    assert os.fspath(offending) in message, message
    assert keyword in message, message
    assert info.value.path == os.fspath(offending)


def test_list_dicom_series_errors_too(tmp_path):
    with pytest.raises(InputError, match="folder is empty"):
        (tmp_path / "e").mkdir()
        list_dicom_series(tmp_path / "e")
    with pytest.raises(InputError, match="does not exist"):
        list_dicom_series(tmp_path / "missing")


def test_huge_header_refused_without_allocating(tmp_path):
    path, _ = huge_mhd(tmp_path)
    tracemalloc.start()
    with pytest.raises(InputError) as info:
        read_image(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    msg = str(info.value)
    assert "64000000000 voxels" in msg and "238.4 GiB" in msg, msg
    assert peak < 10 * 2 ** 20  # refused from the header: nothing was allocated
    # A small limit refuses an ordinary volume too, before reading its pixels.
    s = write_ct_series(tmp_path / "ct")
    with pytest.raises(InputError, match="too large"):
        read_image(s["folder"], max_voxels=1000)


def test_scout_alongside_ct_picks_ct(tmp_path):
    folder = tmp_path / "study"
    ct = write_ct_series(folder / "ct", n=12)
    write_ct_series(folder / "scout", n=3, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                    rows=20, cols=20)
    # A 3-plane localizer without the LOCALIZER word: mixed orientations in one series.
    loc = write_ct_series(folder / "3plane", n=2, prefix="ax")
    write_ct_series(folder / "3plane", n=2, prefix="sag", series_uid=loc["uid"],
                    iop=(0, 1, 0, 0, 0, -1))
    # A CT series with too few slices to be a volume.
    write_ct_series(folder / "small", n=4)
    vol = read_image(folder)
    assert vol.meta["series_uid"] == ct["uid"]
    assert vol.shape == (12, 16, 16)
    np.testing.assert_array_equal(vol.array, ct["hu"])
    assert vol.meta["warnings"] == []  # the others are not candidates
    uids = [s.series_uid for s in list_dicom_series(folder)]
    assert uids[0] == ct["uid"] and len(uids) == 4


def test_ct_and_mr_picks_ct_and_series_uid_selects(tmp_path):
    folder = tmp_path / "study"
    mr = write_ct_series(folder / "mr", n=20, modality="MR")
    ct = write_ct_series(folder / "ct", n=12)
    vol = read_image(folder)
    assert vol.meta["series_uid"] == ct["uid"] and vol.meta["modality"] == "CT"
    assert read_image(folder, series_uid=ct["uid"]).meta["series_uid"] == ct["uid"]
    with pytest.raises(InputError, match="modality MR is not CT"):
        read_image(folder, series_uid=mr["uid"])
    with pytest.raises(InputError, match="not found"):
        read_image(folder, series_uid="1.2.3.nope")


def test_two_ct_series_picks_largest_with_warning(tmp_path):
    folder = tmp_path / "study"
    write_ct_series(folder / "a", n=11)
    big = write_ct_series(folder / "b", n=14)
    vol = read_image(folder)
    assert vol.meta["series_uid"] == big["uid"]
    assert any("2 CT series" in w for w in vol.meta["warnings"])


def test_shuffled_names_and_instance_numbers_sorted_by_position(tmp_path):
    s = write_ct_series(tmp_path / "shuffled", shuffle=True, iop=oblique_iop(25))
    vol = read_image(s["folder"])
    np.testing.assert_array_equal(vol.array, s["hu"])
    first_ipp = np.asarray(_ipp(s["paths"][0]))  # paths are in rank order
    np.testing.assert_allclose(vol.origin, first_ipp, atol=1e-5)
    assert vol.meta["warnings"] == []


def _ipp(path):
    import pydicom

    return [float(v) for v in pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient]


def test_reversed_positions_give_positive_spacing(tmp_path):
    # Positions decreasing with the file order (feet-first style): still sorted along +normal.
    s = write_ct_series(tmp_path / "rev", positions=[-1.25 * k for k in range(12)])
    vol = read_image(s["folder"])
    np.testing.assert_array_equal(vol.array, s["hu"][::-1])
    assert vol.spacing[2] == pytest.approx(1.25)
    assert vol.origin[2] == pytest.approx(30.0 - 1.25 * 11)


def test_non_uniform_spacing_loads_with_warning(tmp_path):
    pos = list(np.arange(12) * 1.0)
    pos[6:] = [p + 1.5 for p in pos[6:]]  # a 2.5 mm gap in a 1 mm series
    s = write_ct_series(tmp_path / "gap", positions=pos)
    vol = read_image(s["folder"])
    assert vol.shape == (12, 16, 16)
    assert vol.spacing[2] == pytest.approx(1.0)
    warning = " ".join(vol.meta["warnings"])
    assert "non-uniform slice spacing" in warning and "1 to 2.5 mm" in warning


def test_gantry_tilt_warns_with_angle(tmp_path):
    # Each slice 1 mm along z and shifted 0.3640 mm along y: tilt = atan(0.364) = 20 degrees.
    shift = np.tan(np.radians(20.0))
    s = write_ct_series(tmp_path / "tilt", slice_spacing=1.0, in_plane_shift=(0, shift, 0))
    vol = read_image(s["folder"])
    warning = " ".join(vol.meta["warnings"])
    assert "gantry tilt of 20.00 degrees" in warning, warning
    np.testing.assert_allclose(vol.direction, np.eye(3), atol=1e-6)
    assert vol.spacing[2] == pytest.approx(1.0)


def test_rescale_slope_intercept_per_slice(tmp_path):
    slopes = [1.0, 2.0, 0.5] * 4
    intercepts = [-1024.0, -1000.0, 0.0] * 4
    s = write_ct_series(tmp_path / "rescale", slopes=slopes, intercepts=intercepts)
    vol = read_image(s["folder"])
    np.testing.assert_allclose(vol.array, s["hu"])
    # 0.5 * odd stored value is not an integer -> float32; otherwise int16.
    assert vol.array.dtype in (np.float32, np.int16)
    s2 = write_ct_series(tmp_path / "rescale_int", slopes=[2.0] * 12, intercepts=[-1000.0] * 12)
    v2 = read_image(s2["folder"])
    assert v2.array.dtype == np.int16
    np.testing.assert_array_equal(v2.array, s2["hu"])
    s3 = write_ct_series(tmp_path / "rescale_frac", slopes=[0.25] * 12, intercepts=[-1024.3] * 12)
    v3 = read_image(s3["folder"])
    assert v3.array.dtype == np.float32
    np.testing.assert_allclose(v3.array, s3["hu"], atol=1e-3)


def test_duplicate_slices_dropped_with_warning(tmp_path):
    s = write_ct_series(tmp_path / "dup")
    (tmp_path / "dup" / "copy_of_slice.dcm").write_bytes(s["paths"][4].read_bytes())
    vol = read_image(s["folder"])
    assert vol.shape == (12, 16, 16)
    np.testing.assert_array_equal(vol.array, s["hu"])
    assert any("duplicate" in w for w in vol.meta["warnings"])


def test_junk_beside_valid_series_is_skipped_with_warning(tmp_path):
    folder, junk = random_bytes_dcm(tmp_path)
    s = write_ct_series(folder / "series")
    (folder / "notes.txt").write_text("ignored silently\n")
    vol = read_image(folder)
    np.testing.assert_array_equal(vol.array, s["hu"])
    assert len(vol.meta["warnings"]) == 1 and str(junk) in vol.meta["warnings"][0]


def test_non_dicom_files_skipped_silently_and_recursive(tmp_path):
    s = write_ct_series(tmp_path / "a" / "b" / "c")
    (tmp_path / "a" / "README").write_text("export notes\n")
    (tmp_path / "a" / "thumb.jpg").write_bytes(b"\xff\xd8\xff")
    vol = read_dicom_series(tmp_path / "a")
    np.testing.assert_array_equal(vol.array, s["hu"])
    assert vol.meta["warnings"] == []


def test_4d_with_one_frame_is_read_as_3d(tmp_path):
    path, _ = image_4d_nifti(tmp_path, frames=1)
    vol = read_image(path)
    assert vol.shape == (3, 4, 5)


def test_few_slices_load_with_warning(tmp_path):
    s = write_ct_series(tmp_path / "short", n=4)
    vol = read_image(s["folder"])
    assert vol.shape == (4, 16, 16)
    assert any("only 4 slices" in w for w in vol.meta["warnings"])


def test_messages_are_single_line_and_free_of_itk_noise(tmp_path):
    for name, maker, _ in BAD_CASES:
        case_dir = tmp_path / name
        case_dir.mkdir()
        to_read, _ = maker(case_dir)
        with pytest.raises(InputError) as info:
            read_image(to_read)
        msg = str(info.value)
        assert "\n" not in msg and "itk::" not in msg and len(msg) < 600, msg
