"""The real ankle CT series in ../shared/data/vhf_ankle_ct (skipped when absent)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # harmless once Testing/conftest.py does the same
    sys.path.insert(0, _HERE)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from AnkleFractureLib.geometry.volume import Volume  # noqa: E402
from AnkleFractureLib.io import list_dicom_series, read_image, write_image  # noqa: E402

from conftest import REAL_CT_DIR as REAL_CT  # noqa: E402


@pytest.fixture(scope="module")
def real_ct():
    if not REAL_CT.is_dir():
        pytest.skip(f"shared real CT not found at {REAL_CT}")
    t0 = time.perf_counter()
    vol = read_image(REAL_CT)
    elapsed = time.perf_counter() - t0
    return vol, elapsed


def test_real_series_shape_spacing_and_speed(real_ct):
    vol, elapsed = real_ct
    print(f"\nread {REAL_CT} in {elapsed:.2f} s")
    assert vol.shape == (150, 512, 512)
    assert vol.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert vol.origin == pytest.approx((0.0, 0.0, 0.0))
    np.testing.assert_allclose(vol.direction, np.eye(3))
    assert vol.array.dtype == np.int16
    assert vol.meta["modality"] == "CT" and vol.meta["format"] == "dicom"
    assert vol.meta["warnings"] == []


def test_real_series_hounsfield_units(real_ct):
    vol, _ = real_ct
    a = vol.array
    corner = np.median(a[:, :32, :32])
    assert -1100 <= corner <= -900, corner  # air
    assert a.max() > 300  # bone
    bone_fraction = float(np.mean(a > 300))
    assert 0.001 < bone_fraction < 0.2, bone_fraction


def test_real_series_matches_simpleitk(real_ct):
    sitk = pytest.importorskip("SimpleITK")
    vol, _ = real_ct
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(REAL_CT)))
    ref = reader.Execute()
    np.testing.assert_allclose(vol.spacing, ref.GetSpacing())
    np.testing.assert_allclose(vol.origin, ref.GetOrigin())
    np.testing.assert_allclose(vol.direction.reshape(-1), ref.GetDirection())
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(ref))


def test_real_series_listing_and_nifti_round_trip(real_ct, tmp_path):
    vol, _ = real_ct
    (series,) = list_dicom_series(REAL_CT)
    assert series.n_files == 150 and series.modality == "CT" and series.problem == ""
    # Slices 100..109 as their own volume: origin moves 100 mm along the slice normal.
    sub = Volume(vol.array[100:110].copy(), vol.spacing,
                 vol.index_to_physical([[0, 0, 100]])[0], vol.direction)
    write_image(sub, tmp_path / "real.nii.gz")
    back = read_image(tmp_path / "real.nii.gz")
    np.testing.assert_array_equal(back.array, sub.array)
    assert back.same_geometry(sub)
