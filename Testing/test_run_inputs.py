"""``ankle-fracture run`` from a DICOM folder and from a NIfTI file of the same oblique phantom:
every output is written, the label map and the heatmap have exactly the CT's geometry, and the
two inputs give the same answer (shipped models, as a user runs it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from AnkleFractureLib.crop.syndesmosis import box_on_grid
from AnkleFractureLib.cli.main import main
from AnkleFractureLib.io import read_image, write_image
from AnkleFractureLib.io.dicom_write import write_dicom_series
from AnkleFractureLib.phantom import generate_case
from AnkleFractureLib.registration.transform_io import read_itk_transform, read_transform_json

torch.set_num_threads(1)

EVERY_FILE = {"segmentation.nii.gz", "transform.json", "transform.tfm",
              "syndesmosis_crop.nii.gz", "gradcam.nii.gz", "report.png", "report.pdf",
              "result.json"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One Weber C left phantom with an oblique direction (seed 14), run from both formats."""
    case = generate_case(14, "C", "left", spacing="fast")
    assert not np.allclose(case.ct.direction, np.eye(3), atol=0.05)  # really oblique
    root = tmp_path_factory.mktemp("inputs")
    inputs = {"nifti": root / "ct.nii.gz", "dicom": root / "dicom_series"}
    write_image(case.ct, inputs["nifti"])
    write_dicom_series(case.ct, inputs["dicom"])
    out = {}
    for kind, path in inputs.items():
        out[kind] = root / f"out_{kind}"
        rc = main(["run", str(path), "--out", str(out[kind]), "--device", "cpu", "--pdf",
                   "--quiet"])
        assert rc == 0, kind
    return {"case": case, "inputs": inputs, "out": out}


@pytest.mark.parametrize("kind", ["nifti", "dicom"])
def test_every_output_on_the_ct_geometry(runs, kind):
    out: Path = runs["out"][kind]
    data = json.loads((out / "result.json").read_text())
    # The fracture line is written when the localiser found one; then it is on the CT lattice.
    every = EVERY_FILE | ({"fracture_line.nii.gz"} if data["fracture"]["found"] else set())
    assert {p.name for p in out.iterdir()} == every
    ct = read_image(runs["inputs"][kind])
    assert set(data["files"]) | {"result.json"} == every
    if data["fracture"]["found"]:
        assert box_on_grid(read_image(out / "fracture_line.nii.gz"), ct, atol=1e-4) is not None
    assert data["input"]["format"] == ("dicom" if kind == "dicom" else "nifti")
    assert data["input"]["size_xyz"] == list(ct.size)
    assert read_image(out / "segmentation.nii.gz").same_geometry(ct, atol=1e-4)
    # The heatmap covers the crop's box on the CT's voxel lattice.
    assert box_on_grid(read_image(out / "gradcam.nii.gz"), ct, atol=1e-4) is not None
    seg = read_image(out / "segmentation.nii.gz")
    assert seg.array.dtype == np.uint8 and set(np.unique(seg.array)) == {0, 1, 2}
    heat = read_image(out / "gradcam.nii.gz")
    assert heat.array.dtype == np.float32
    assert 0.0 <= heat.array.min() and heat.array.max() <= 1.0 and heat.array.max() > 0.5
    assert sum(data["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert data["side"] == "left" and not data["refused"]
    # The ITK transform file and the JSON hold the same registration.
    t_json = read_transform_json(out / "transform.json")
    t_tfm = read_itk_transform(out / "transform.tfm")
    np.testing.assert_allclose(np.linalg.inv(np.asarray(t_json["patient_to_template"])),
                               t_tfm, atol=1e-6)
    assert (out / "report.pdf").read_bytes()[:5] == b"%PDF-"
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dicom_and_nifti_give_the_same_answer(runs):
    a, b = (json.loads((runs["out"][k] / "result.json").read_text()) for k in ("nifti", "dicom"))
    assert a["prediction"] == b["prediction"] == runs["case"].info["weber"]
    for name in a["probabilities"]:
        assert a["probabilities"][name] == pytest.approx(b["probabilities"][name], abs=2e-3)
    for bone in ("tibia", "fibula"):
        assert a["bones_ml"][bone] == pytest.approx(b["bones_ml"][bone], rel=1e-3)
