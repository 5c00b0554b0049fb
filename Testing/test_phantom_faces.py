"""Fracture faces of the phantom: raw (acute: cancellous bone up to the gap) or corticated.

An acute fracture exposes the bone's inside; only an old or accessory fragment is corticated.
With "corticated" faces (the earlier datasets' look) a hairline is two cortical plates, a dense
band like a healed fracture; "raw" faces must not be.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from AnkleFractureLib.phantom.fractures import FACES, check_faces
from AnkleFractureLib.phantom.generator import generate_case


def _across_line(case, half_mm: float = 5.0, step_mm: float = 0.5) -> np.ndarray:
    """HU (linear) along the fracture plane's normal through its centre, from -half to +half."""
    f = case.info["fracture"]
    a2p = np.asarray(case.info["anatomy_to_patient"], float)
    t = np.arange(-half_mm, half_mm + 1e-6, step_mm)
    pts = (np.asarray(f["centre_anatomical"])[None] + t[:, None]
           * np.asarray(f["normal_anatomical"])[None])
    lps = pts @ a2p[:3, :3].T + a2p[:3, 3]
    ijk = case.ct.physical_to_index(lps)
    arr = np.asarray(case.ct.array, np.float32)
    return ndimage.map_coordinates(arr, [ijk[:, 2], ijk[:, 1], ijk[:, 0]], order=1)


@pytest.fixture(scope="module")
def pair():
    """The same Weber B case (a hairline through cancellous bone) with both face kinds."""
    return {faces: generate_case(5, weber="B", fractures="heldout", fracture_faces=faces)
            for faces in FACES}


def test_raw_faces_show_no_dense_band(pair):
    cort, raw = _across_line(pair["corticated"]), _across_line(pair["raw"])
    assert pair["raw"].info["fracture"]["gap_mm"] < 1.0  # a hairline
    # Corticated: the two plates read as cortex across the line.
    assert cort.max() > 1000.0
    # Raw: the line's neighbourhood stays at cancellous levels, far below the plates.
    assert raw.max() < 0.6 * cort.max()
    assert raw.max() < 800.0


@pytest.mark.parametrize("seed,family,style", [(3, "analytic", "varied"),
                                               (11, "analytic", "heldout"),
                                               (4, "vh", "heldout")])
def test_a_raw_face_has_no_bright_rim(seed, family, style):
    """Where a raw cut face lies partly in a voxel, the voxel holds cancellous bone and the
    gap's blood, not cortex: across the line the CT stays at or below the bone around it.
    (Painting the whole part as cortex and then its inside, as for an intact bone, left a
    quarter of the cortex's HU on every partly covered voxel of a cut face: a band 200-250 HU
    brighter than the bone, which made every raw hairline a dense line.)"""
    case = generate_case(seed, weber="B", family=family, fractures=style, fracture_faces="raw")
    hu = _across_line(case)
    t = np.arange(-5.0, 5.0 + 1e-6, 0.5)
    assert hu[np.abs(t) <= 1.0].max() < np.median(hu[np.abs(t) >= 3.0]) + 100.0


def test_faces_change_only_the_image_near_the_fracture(pair):
    cort, raw = pair["corticated"], pair["raw"]
    np.testing.assert_array_equal(cort.label.array, raw.label.array)
    diff = np.abs(cort.ct.array.astype(np.int32) - raw.ct.array.astype(np.int32)) > 50
    assert diff.any()
    # Every changed voxel lies within a few mm of the fracture plane.
    f = raw.info["fracture"]
    a2p = np.asarray(raw.info["anatomy_to_patient"], float)
    p2a = np.linalg.inv(a2p)
    idx = np.argwhere(diff)[:, ::-1].astype(float)
    anat = raw.ct.index_to_physical(idx) @ p2a[:3, :3].T + p2a[:3, 3]
    dist = np.abs((anat - np.asarray(f["centre_anatomical"])) @ np.asarray(f["normal_anatomical"]))
    assert np.percentile(dist, 99) < 6.0


def test_faces_recorded_only_when_raw(pair):
    assert pair["raw"].info["fracture"]["faces"] == "raw"
    assert "faces" not in pair["corticated"].info["fracture"]


def test_intact_ankle_is_the_same_either_way():
    a = generate_case(7, weber="none", fracture_faces="raw")
    b = generate_case(7, weber="none")
    np.testing.assert_array_equal(a.ct.array, b.ct.array)


def test_unknown_faces_are_refused():
    with pytest.raises(ValueError, match="fracture faces"):
        check_faces("smooth")
    with pytest.raises(ValueError, match="fracture faces"):
        generate_case(1, weber="A", fracture_faces="smooth")


def test_cli_rejects_unknown_faces(tmp_path, capsys):
    from AnkleFractureLib.cli.main import main

    with pytest.raises(SystemExit):
        main(["phantom", "--out", str(tmp_path / "x"), "--n", "1", "--fracture-faces", "smooth"])
    assert "fracture-faces" in capsys.readouterr().err
