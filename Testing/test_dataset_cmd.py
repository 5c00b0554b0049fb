"""``ankle-fracture dataset add / show``: a hospital's own cases into the training layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from AnkleFractureLib.cli.main import main
from AnkleFractureLib.dataset import Dataset
from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.io import read_image, write_image
from AnkleFractureLib.io.dicom_write import write_dicom_series


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    ct = Volume(rng.integers(-1000, 1500, (6, 8, 10)).astype(np.int16), spacing=(0.5, 0.5, 1.0),
                origin=(1.0, 2.0, 3.0))
    seg = ct.with_array((rng.integers(0, 3, ct.shape)).astype(np.uint8))
    write_image(ct, tmp_path / "ct_a.nii.gz")
    write_image(seg, tmp_path / "ct_a_seg.nii.gz")
    write_dicom_series(ct, tmp_path / "Patient 17")
    write_image(ct.region((slice(0, 5), slice(None), slice(None))), tmp_path / "short.nii.gz")
    return {"ct": ct, "seg": seg, "root": tmp_path}


def test_add_show_update_and_refuse(files, capsys):
    root, ds_dir = files["root"], files["root"] / "ds"
    assert main(["dataset", "add", str(ds_dir), str(root / "ct_a.nii.gz"),
                 "--seg", str(root / "ct_a_seg.nii.gz"), "--weber", "B", "--side", "left"]) == 0
    assert main(["dataset", "add", str(ds_dir), str(root / "Patient 17")]) == 0  # unlabelled
    ds = Dataset.load(ds_dir)
    assert [c.id for c in ds] == ["ct_a", "Patient_17"]
    a, p17 = ds.get("ct_a"), ds.get("Patient_17")
    assert (a.weber, a.side, p17.weber, p17.segmentation) == ("B", "left", None, None)
    np.testing.assert_array_equal(read_image(ds.path(a.segmentation)).array, files["seg"].array)
    back = read_image(ds.path(p17.image))  # the DICOM folder, stored as NIfTI, same voxels
    np.testing.assert_array_equal(back.array, files["ct"].array)
    assert back.same_geometry(files["ct"], atol=1e-4)

    # The same id again updates the case (class changed, segmentation dropped), no duplicate.
    assert main(["dataset", "add", str(ds_dir), str(root / "ct_a.nii.gz"), "--weber", "C"]) == 0
    ds = Dataset.load(ds_dir)
    assert len(ds) == 2 and ds.get("ct_a").weber == "C" and ds.get("ct_a").segmentation is None
    assert not (ds_dir / "labels" / "ct_a.nii.gz").exists()
    index = json.loads((ds_dir / "dataset.json").read_text())
    assert [c["id"] for c in index["cases"]] == ["ct_a", "Patient_17"]

    capsys.readouterr()
    assert main(["dataset", "show", str(ds_dir)]) == 0
    out = capsys.readouterr().out
    assert "2 cases" in out and "1 with a Weber class" in out and "1 unlabelled" in out

    # A label map on another grid is refused, naming the file; the dataset is unchanged.
    assert main(["dataset", "add", str(ds_dir), str(root / "short.nii.gz"),
                 "--seg", str(root / "ct_a_seg.nii.gz")]) == 2
    assert "ct_a_seg.nii.gz" in capsys.readouterr().err
    assert len(Dataset.load(ds_dir)) == 2


def test_add_an_annotated_fracture_line(files, capsys):
    """--fracture-line stores a 0/1 mask on the CT's grid; updating the case without it drops
    the file; a mask on another grid is refused, naming it."""
    root, ds_dir = files["root"], files["root"] / "ds"
    line = files["ct"].with_array(np.zeros(files["ct"].shape, np.uint8))
    line.array[3, 2:6, 4:8] = 7  # any non-zero value marks the line
    write_image(line, root / "line.nii.gz")
    write_image(line.region((slice(0, 5), slice(None), slice(None))), root / "line_short.nii.gz")
    assert main(["dataset", "add", str(ds_dir), str(root / "ct_a.nii.gz"), "--weber", "B",
                 "--fracture-line", str(root / "line.nii.gz")]) == 0
    assert "with a fracture line" in capsys.readouterr().out
    rec = Dataset.load(ds_dir).get("ct_a")
    stored = read_image(ds_dir / rec.fracture_line)
    np.testing.assert_array_equal(stored.array, (line.array > 0).astype(np.uint8))
    assert main(["dataset", "show", str(ds_dir)]) == 0
    assert "1 with an annotated fracture line" in capsys.readouterr().out
    assert main(["dataset", "add", str(ds_dir), str(root / "ct_a.nii.gz"), "--weber", "B"]) == 0
    assert Dataset.load(ds_dir).get("ct_a").fracture_line is None
    assert not (ds_dir / rec.fracture_line).exists()
    assert main(["dataset", "add", str(ds_dir), str(root / "ct_a.nii.gz"),
                 "--fracture-line", str(root / "line_short.nii.gz")]) == 2
    assert "line_short.nii.gz" in capsys.readouterr().err
