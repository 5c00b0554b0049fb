"""DICOM exports whose headers were stripped (anonymisation): read as CT when the pixels are HU.

Series are written with :func:`~AnkleFractureLib.io.dicom_write.write_dicom_series` (a phantom
or a small HU volume) and then lose Modality, ImageOrientationPatient, ImagePositionPatient, ...
with pydicom. What is still not CT (an MR series, values that are not HU) stays refused, naming
the file and the problem.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Iterable, Optional

import numpy as np
import pydicom
import pytest

from AnkleFractureLib.cli.main import main
from AnkleFractureLib.errors import InputError
from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.io import read_image
from AnkleFractureLib.io.dicom_write import write_dicom_series
from AnkleFractureLib.pipeline.checks import UNSURE_CODES, check_ct
from AnkleFractureLib.pipeline.result_schema import check_result_file

STRIPPED = ("Modality", "ImageOrientationPatient", "ImagePositionPatient")
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def strip(files: Iterable[Path], tags: Iterable[str] = STRIPPED,
          set_values: Optional[Dict[str, object]] = None) -> None:
    """Remove ``tags`` from every file (and set ``set_values``), in place."""
    for f in files:
        ds = pydicom.dcmread(f)
        for tag in tags:
            if tag in ds:
                delattr(ds, tag)
        for key, value in (set_values or {}).items():
            setattr(ds, key, value)
        ds.save_as(f)


def small_ct(n: int = 12) -> Volume:
    """A 20 x 24 x n HU volume: air around a soft-tissue disc with a bone core; slice k's
    bone is 1000 + 10 k HU, so the slice order can be checked."""
    j, i = np.mgrid[0:20, 0:24]
    r2 = (j - 10) ** 2 + (i - 12) ** 2
    arr = np.full((n, 20, 24), -1000, np.int16)
    for k in range(n):
        arr[k][r2 < 64] = 40
        arr[k][r2 < 9] = 1000 + 10 * k
    return Volume(arr, spacing=(0.7, 0.8, 1.25), origin=(-5.0, 12.0, 30.0))


def written(tmp_path: Path, vol: Volume, name: str = "series") -> list:
    return write_dicom_series(vol, tmp_path / name)


# ------------------------------------------------------------------------ read and say what
def test_stripped_series_reads_as_the_original_with_the_missing_tags_named(tmp_path):
    vol = small_ct()
    files = written(tmp_path, vol)
    strip(files)
    back = read_image(tmp_path / "series")
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.spacing == pytest.approx(vol.spacing, abs=1e-6)
    np.testing.assert_allclose(back.direction, np.eye(3))
    assert back.origin == pytest.approx((0.0, 0.0, 0.0))  # assumed: IPP is gone
    assert back.meta["modality"] == "CT"
    assert back.meta["missing_tags"] == list(STRIPPED)
    text = " ".join(back.meta["warnings"])
    for tag in STRIPPED:
        assert f"{tag} missing" in text, tag
    assert "InstanceNumber" in text and "SliceThickness" in text and "identity" in text


def test_stripped_positions_follow_instance_number_not_file_names(tmp_path):
    vol = small_ct()
    files = written(tmp_path, vol)
    strip(files)
    # Reverse the file names: only InstanceNumber still tells the order.
    for k, f in enumerate(files):
        f.rename(f.with_name(f"tmp_{k}"))
    for k in range(len(files)):
        (files[0].parent / f"tmp_{k}").rename(files[0].parent / f"IM{len(files) - k:04d}.dcm")
    back = read_image(tmp_path / "series")
    np.testing.assert_array_equal(back.array, vol.array)


def test_spacing_between_slices_wins_over_slice_thickness(tmp_path):
    vol = small_ct()
    files = written(tmp_path, vol)
    # Overlapping reconstruction: 3 mm thick slices every 1.25 mm.
    strip(files, set_values={"SliceThickness": "3", "SpacingBetweenSlices": "1.25"})
    back = read_image(tmp_path / "series")
    assert back.spacing[2] == pytest.approx(1.25)
    assert "SpacingBetweenSlices" in " ".join(back.meta["warnings"])


def test_only_modality_missing_keeps_the_file_geometry(tmp_path):
    theta = np.radians(20.0)
    direction = np.array([[np.cos(theta), 0, np.sin(theta)], [0, 1, 0],
                          [-np.sin(theta), 0, np.cos(theta)]])
    vol = small_ct()
    vol = Volume(vol.array, vol.spacing, vol.origin, direction)
    files = written(tmp_path, vol)
    strip(files, tags=["Modality"])
    back = read_image(tmp_path / "series")
    assert back.same_geometry(vol, atol=1e-4)
    assert back.meta["missing_tags"] == ["Modality"]
    assert not any(f.code == "assumed_geometry" for f in check_ct(back))


def test_assumed_geometry_marks_the_answer_unsure(tmp_path):
    files = written(tmp_path, small_ct())
    strip(files)
    findings = check_ct(read_image(tmp_path / "series"))
    (assumed,) = [f for f in findings if f.code == "assumed_geometry"]
    assert assumed.code in UNSURE_CODES and assumed.level == "warning"
    assert assumed.details["missing_tags"] == ["ImageOrientationPatient", "ImagePositionPatient"]
    assert sum(f.code == "reader_note" for f in findings) == 3  # one per missing tag


# ------------------------------------------------------------------------ still refused
def _refused(folder: Path, match: str) -> InputError:
    with pytest.raises(InputError, match=match) as exc:
        read_image(folder)
    return exc.value


def test_mr_series_with_modality_is_still_refused(tmp_path):
    files = written(tmp_path, small_ct())
    strip(files, tags=["ImageOrientationPatient"], set_values={"Modality": "MR"})
    err = _refused(tmp_path / "series", "modality MR is not CT")
    assert str(tmp_path / "series") in str(err) and ".dcm" in str(err)


def test_values_that_are_not_hu_are_refused_without_modality(tmp_path):
    mr = small_ct()
    mr = mr.with_array(np.clip(mr.array.astype(np.int32) + 1000, 0, None).astype(np.int16))
    files = written(tmp_path, mr)  # MR-like: background 0, no air at -1000
    strip(files)
    err = _refused(tmp_path / "series", "do not look like CT in Hounsfield units")
    assert err.path == str(files[0]) and "Modality missing" in err.reason


def test_ct_values_without_their_intercept_are_refused(tmp_path):
    files = written(tmp_path, small_ct())
    strip(files, tags=list(STRIPPED) + ["RescaleIntercept", "RescaleSlope"])  # stored = HU+1024
    _refused(tmp_path / "series", "RescaleIntercept missing")


def test_non_ct_sop_class_is_refused_without_modality(tmp_path):
    files = written(tmp_path, small_ct())
    strip(files, set_values={"SOPClassUID": MR_IMAGE_STORAGE})
    err = _refused(tmp_path / "series", "SOP class is MR Image Storage, not CT")
    assert "slice_0001.dcm" in str(err)


@pytest.mark.parametrize("extra, match", [
    (["InstanceNumber"], "InstanceNumber is missing or repeated"),
    (["SliceThickness"], "neither SpacingBetweenSlices nor SliceThickness"),
])
def test_unplaceable_slices_are_refused(tmp_path, extra, match):
    files = written(tmp_path, small_ct())
    strip(files, tags=list(STRIPPED) + extra)
    err = _refused(tmp_path / "series", match)
    assert "ImagePositionPatient" in str(err) and ".dcm" in str(err)


def test_orientation_missing_on_some_slices_only_is_refused(tmp_path):
    files = written(tmp_path, small_ct())
    strip(files[::2], tags=["ImageOrientationPatient"])
    _refused(tmp_path / "series", "6 of 12 slices lack ImageOrientationPatient")


# ------------------------------------------------------------------------ end to end
def test_stripped_phantom_runs_end_to_end(tmp_path, tiny_cls, capsys):
    from AnkleFractureLib.phantom.generator import generate_case

    case = generate_case(10, "B", "left", spacing="fast")  # identity direction
    files = write_dicom_series(case.ct, tmp_path / "dicom")
    strip(files)
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "dicom"), "--out", str(out), "--cls-model",
                 str(tiny_cls), "--tta", "0", "--device", "cpu", "--quiet"]) == 0
    stdout = capsys.readouterr().out
    data = check_result_file(out / "result.json")
    assert not data["refused"] and data["prediction"] in ("none", "A", "B", "C")
    assert data["side"] == "left"
    assert data["uncertainty"]["unsure"]  # the geometry is an assumption
    warnings = " ".join(data["warnings"])
    for tag in STRIPPED:
        assert f"{tag} missing" in warnings and tag in stdout
    codes = [f["code"] for f in data["findings"]]
    assert "assumed_geometry" in codes and codes.count("reader_note") == 3
    assert data["input"]["format"] == "dicom"
    json.dumps(data)


def test_stripped_real_series_reads_like_the_original(shared_ct_dir, tmp_path):
    """The real (Visible Human) series with its headers stripped: same voxels, same grid (its
    own IPP run 0..149 mm along an identity orientation, as assumed)."""
    original = read_image(shared_ct_dir)
    copy = tmp_path / "real"
    shutil.copytree(shared_ct_dir, copy)
    strip(sorted(copy.glob("*.dcm")))
    back = read_image(copy)
    np.testing.assert_array_equal(back.array, original.array)
    assert back.same_geometry(original, atol=1e-6)
    assert back.meta["missing_tags"] == list(STRIPPED)
