"""The one-call pipeline: sanity checks, gating, ``ankle-fracture run`` end to end, re-running
later stages on a corrected label, cancellation, and the real foot-only series (refused)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from AnkleFractureLib.classification.plans import CLASSES
from AnkleFractureLib.cli.main import main
from AnkleFractureLib.crop.syndesmosis import box_on_grid
from AnkleFractureLib.errors import CancelledError
from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.io import read_image, write_image
from AnkleFractureLib.phantom import generate_case
from AnkleFractureLib.pipeline import checks as C
from AnkleFractureLib.pipeline.pipeline import (Pipeline, PipelineOptions, PipelineResult,
                                                select_leg, write_outputs)
from AnkleFractureLib.registration.side import SideDetection
from AnkleFractureLib.registration.transform_io import read_itk_transform, read_transform_json

torch.set_num_threads(1)


def codes(findings):
    return [(f.level, f.code) for f in findings]


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def case():
    """A fast Weber B left phantom with an identity direction (z index = superior)."""
    c = generate_case(10, "B", "left", spacing="fast")
    return c


@pytest.fixture(scope="module")
def pipe(tiny_cls) -> Pipeline:
    return Pipeline(PipelineOptions(device="cpu", cls_model_dir=tiny_cls, tta=0))


@pytest.fixture(scope="module")
def cli_run(case, tiny_cls, tmp_path_factory):
    """``ankle-fracture run`` once on the phantom (the CLI end to end, segmentation included)."""
    root = tmp_path_factory.mktemp("run")
    ct_path = root / "ct.nii.gz"
    write_image(case.ct, ct_path)
    out = root / "out"
    rc = main(["run", str(ct_path), "--out", str(out), "--cls-model", str(tiny_cls),
               "--device", "cpu", "--quiet"])
    return SimpleNamespace(rc=rc, ct_path=ct_path, out=out)


def _z_slab(vol: Volume, lo_mm: float, hi_mm: float, ref_z: float) -> Volume:
    """The axial slab of an identity-direction volume between ref_z + lo and ref_z + hi."""
    assert np.allclose(vol.direction, np.eye(3))
    z = vol.origin[2] + np.arange(vol.shape[0]) * vol.spacing[2]
    k = np.flatnonzero((z >= ref_z + lo_mm) & (z <= ref_z + hi_mm))
    sub = vol.region((slice(int(k[0]), int(k[-1]) + 1), slice(None), slice(None)))
    return sub.with_array(sub.array.copy())


def test_model_identity_tells_apart_folders_with_one_network_and_other_plans(tmp_path):
    """Two localiser folders with the same weights and another decision rule answer
    differently: result.json must tell them apart (``plans_sha256``), while ``sha256`` (the
    weights) stays the same."""
    import json as _json
    import shutil

    from AnkleFractureLib.fracture.localise import default_model_dir
    from AnkleFractureLib.pipeline.pipeline import Pipeline, PipelineOptions

    other = tmp_path / "fracture"
    shutil.copytree(default_model_dir(), other)
    plans = _json.loads((other / "plans.json").read_text())
    plans["decision"]["min_line_probability"] = 0.9
    (other / "plans.json").write_text(_json.dumps(plans))
    shipped = Pipeline(PipelineOptions(device="cpu")).model_info()["fracture"]
    mine = Pipeline(PipelineOptions(device="cpu", fracture_model_dir=str(other))).model_info()
    assert mine["fracture"]["sha256"] == shipped["sha256"] and len(shipped["sha256"]) == 64
    assert mine["fracture"]["plans_sha256"] != shipped["plans_sha256"]
    assert len(mine["fracture"]["plans_sha256"]) == 64


def test_run_help_lists_the_outputs(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for key in ("--out", "--side", "--device", "--tta", "--seg-model", "--cls-model",
                "segmentation.nii.gz", "transform.tfm", "gradcam.nii.gz", "result.json",
                "example"):
        assert key in out, key


# ------------------------------------------------------------------------------ check_ct
@pytest.mark.parametrize("spacing, expected", [
    ((0.5, 0.5, 1.0), []),
    ((0.5, 0.5, 3.5), [("warning", "coarse_spacing")]),
    ((1.6, 1.6, 1.0), [("warning", "coarse_spacing")]),
    ((0.5, 0.5, 6.0), [("refusal", "spacing_too_coarse")]),
    ((6.0, 0.5, 0.5), [("refusal", "spacing_too_coarse")]),  # any orientation
])
def test_check_ct_spacing(spacing, expected):
    assert codes(C.check_ct(Volume(np.zeros((4, 4, 4), np.int16), spacing))) == expected


def test_check_ct_metal_names_the_volume_in_ml():
    arr = np.full((30, 30, 30), 40, np.int16)
    arr[5:15, 5:15, 5:15] = 3071  # 1000 voxels of 1 mm^3: 1 ml of clipped metal
    found = C.check_ct(Volume(arr, meta={"warnings": ["gantry tilt of 3 degrees"]}))
    assert codes(found) == [("warning", "metal"), ("warning", "reader_note")]
    assert "1.00 ml" in found[0].message and found[0].details["metal_ml"] == 1.0
    arr[5:15, 5:15, 5:15] = 1900  # dense cortical bone is not metal
    arr[0, 0, 0] = 3500  # nor is a single hot voxel
    assert C.check_ct(Volume(arr)) == []


# ------------------------------------------------------------------------------ segmentation
def test_check_segmentation(case):
    assert C.check_segmentation(case.label) == []
    no_fib = case.label.with_array(np.where(case.label.array == 2, 0, case.label.array))
    assert codes(C.check_segmentation(no_fib)) == [("refusal", "no_fibula")]
    swapped = case.label.with_array((3 - case.label.array) % 3)  # tibia <-> fibula
    assert ("refusal", "fibula_larger_than_tibia") in codes(C.check_segmentation(swapped))
    tiny = np.zeros((40, 40, 40), np.uint8)
    tiny[5:20, 5:20, 5:20] = 1  # 3.4 ml of tibia
    tiny[25:30, 25:30, 25:35] = 2  # 0.25 ml of fibula
    found = codes(C.check_segmentation(Volume(tiny)))
    assert ("refusal", "small_tibia") in found and ("refusal", "small_fibula") in found


def test_check_segmentation_says_first_when_foot_bones_were_removed():
    """Post-processing rule 9's report in the label map's meta becomes the headline refusal,
    with its measurements; the same empty map without it only says the bones are missing."""
    empty = np.zeros((20, 20, 20), np.uint8)
    leg = {"tibia_ml": 12.17, "section_cm2": 4.75, "below_top_mm": 57.0}
    meta = {"segmentation": {"postprocess": {"not_a_leg": [dict(leg, note="no distal tibia")]}}}
    found = C.check_segmentation(Volume(empty, meta=meta))
    assert codes(found) == [("refusal", "no_distal_tibia"), ("refusal", "no_tibia"),
                            ("refusal", "no_fibula")]
    assert C.refusals(found)[0].code == "no_distal_tibia"
    assert "12.2 ml" in found[0].message and "4.8 cm^2" in found[0].message
    assert "57 mm below" in found[0].message and found[0].details == leg
    assert codes(C.check_segmentation(Volume(empty))) == [("refusal", "no_tibia"),
                                                          ("refusal", "no_fibula")]


# ------------------------------------------------------------------------------ side
def test_check_side_and_leg_selection():
    both = SideDetection(None, 0.0, "both legs in the field of view (2 leg cross-sections)", 2)
    assert codes(C.check_side(both)) == [("refusal", "both_legs")]
    assert "--side" in C.check_side(both)[0].message
    assert codes(C.check_side(both, "left")) == [("warning", "one_leg_selected")]
    right = SideDetection("right", 0.99, "fibula lies 25 mm to the patient's right", 1)
    assert C.check_side(right) == []
    assert codes(C.check_side(right, "left")) == [("warning", "side_conflict")]
    unclear = SideDetection(None, 0.0, "fibula and tibia are only 1.0 mm apart", 1)
    assert codes(C.check_side(unclear)) == [("refusal", "side_undetermined")]
    # Two legs 100 mm apart in LPS x: the patient's left leg is at +x.
    lab = np.zeros((10, 20, 60), np.uint8)
    lab[:, 5:15, 2:10] = 1
    lab[:, 5:15, 50:58] = 2
    vol = Volume(lab, spacing=(2.0, 2.0, 2.0), origin=(-60.0, 0.0, 0.0))
    left, split = select_leg(vol, "left")
    assert split is not None and abs(split) < 10
    assert set(np.unique(left.array)) == {0, 2}
    assert set(np.unique(select_leg(vol, "right")[0].array)) == {0, 1}


def test_both_legs_need_a_side_and_then_one_leg_is_analysed(case, tiny_cls):
    # The left phantom beside its mirror image (a right leg) at smaller LPS x.
    ct, lab = case.ct, case.label
    assert np.allclose(ct.direction, np.eye(3))
    two_ct = Volume(np.concatenate([np.flip(ct.array, axis=2), ct.array], axis=2), ct.spacing,
                    ct.origin)
    two_lab = Volume(np.concatenate([np.flip(lab.array, axis=2), lab.array], axis=2),
                     lab.spacing, lab.origin)
    auto = Pipeline(PipelineOptions(device="cpu", cls_model_dir=tiny_cls, tta=0))
    res = auto.run(two_ct, label=two_lab)
    assert res.refused and res.refused_stage == "segment" and res.registration is None
    assert [f.code for f in res.refusals] == ["both_legs"] and "--side" in res.refusal
    for side in ("left", "right"):
        pipe = Pipeline(PipelineOptions(side=side, device="cpu", cls_model_dir=tiny_cls, tta=0))
        res = pipe.run(two_ct, label=two_lab)
        assert not res.refused and res.side == side, [f.message for f in res.findings]
        assert res.registration.mirrored == (side == "left")
        assert res.registration.rms_mm < 3.0
        assert "one_leg_selected" in [f.code for f in res.findings]
        assert res.to_json()["prediction"] in CLASSES


# ------------------------------------------------------------------------------ field of view
def test_label_only_field_of_view(case):
    ct, lab = case.ct, case.label
    pz = float(case.info["plafond_lps"][2])
    assert C.check_field_of_view(ct, lab) == []
    # The scan ends 25 mm above the joint: refused, with the measured extent in the message.
    short = C.check_field_of_view(_z_slab(ct, -99, 25, pz), _z_slab(lab, -99, 25, pz))
    assert ("refusal", "fov_short_above") in codes(short)
    f = [x for x in short if x.code == "fov_short_above"][0]
    assert f.message.startswith("the syndesmosis is not in the field of view: the scan ends")
    assert 10 < f.details["above_joint_mm"] < 35
    # A shin scan: the tibia leaves through the bottom edge, no ankle joint in view.
    shin = C.check_field_of_view(_z_slab(ct, 40, 999, pz), _z_slab(lab, 40, 999, pz))
    assert codes(shin) == [("refusal", "fov_no_ankle_joint")]
    # Foot-like: a "fibula" only below the "tibia" (as the VHF feet): no fibular shaft beside it.
    z = lab.origin[2] + np.arange(lab.shape[0]) * lab.spacing[2]
    arr = lab.array.copy()
    arr[(z > pz - 5)[:, None, None] & (arr == 2)] = 0
    found = C.check_field_of_view(ct, lab.with_array(arr))
    assert ("refusal", "fov_no_fibula_shaft") in codes(found)


def test_registration_and_crop_checks(case, pipe):
    reg = pipe.register(case.ct, case.label)
    assert reg.side == "left"
    assert C.check_registration(reg, case.label, pipe.template) == []
    crop = pipe.crop(case.ct, case.label, reg)
    assert C.check_field_of_view(case.ct, case.label, reg, crop, pipe.template) == []
    # A fit that slid 20 mm along the shaft keeps its surface RMS; the plafond check sees it.
    slid = SimpleNamespace(**{k: getattr(reg, k) for k in (
        "rms_mm", "inlier_fraction", "scale", "side_confidence", "side_reason", "warnings")})
    for shift, expected in ((10.0, "warning"), (20.0, "refusal")):
        m = reg.patient_to_template.copy()
        m[2, 3] += shift
        slid.patient_to_template = m
        assert codes(C.check_registration(slid, case.label, pipe.template)) == [
            (expected, "registration_joint")]
    # Coverage and the bones at the syndesmosis level.
    for cov, expected in ((0.8, [("warning", "fov_coverage")]),
                          (0.5, [("warning", "fov_coverage")]),
                          (0.25, [("refusal", "fov_coverage")])):
        fake = SimpleNamespace(coverage=cov, channels=crop.channels, grid=crop.grid)
        assert codes(C.check_field_of_view(case.ct, None, reg, fake, pipe.template)) == expected
    no_fib = crop.channels.copy()
    no_fib[2] = 0
    fake = SimpleNamespace(coverage=1.0, channels=no_fib, grid=crop.grid)
    found = C.check_field_of_view(case.ct, None, reg, fake, pipe.template)
    assert codes(found) == [("refusal", "fov_bone_at_syndesmosis")]
    assert "no fibula at the syndesmosis level" in found[0].message


def test_crop_checks_speak_once_of_the_scan_ends_and_expect_a_real_fibula(case, pipe):
    reg = pipe.register(case.ct, case.label)
    crop = pipe.crop(case.ct, case.label, reg)
    pz = float(pipe.template.plafond[2])
    z = C._z_of_voxels(crop.grid) - pz  # the box: 35 mm below to 109 mm above the plafond
    expected = C.syndesmosis_bone_ml(pipe.template.labels, pz)
    half = SimpleNamespace(coverage=0.5, channels=crop.channels, grid=crop.grid)
    # Half the box in view because the scan ends 40 mm above the joint: the joint finding
    # ("the scan ends 40 mm above ...") says it; a coverage warning would say it twice.
    assert C._crop_findings(half, pz, expected, ends_mm=(60.0, 40.0)) == []
    assert C._ends_fraction(z, (60.0, 40.0)) == pytest.approx(75.0 / np.ptp(z), abs=0.02)
    # The same shortfall with the whole height in view (a box cut at the side) still warns.
    assert codes(C._crop_findings(half, pz, expected, ends_mm=(200.0, 200.0))) == [
        ("warning", "fov_coverage")]
    assert codes(C._crop_findings(half, pz, expected)) == [("warning", "fov_coverage")]
    # A real fibula is about half as thick as the analytic phantom's: 55 % of the phantom
    # template's fibula is not "little fibula" (the real-shape template's mean is the floor) ...
    slim = crop.channels.copy()
    slim[2] *= 0.55
    fake = SimpleNamespace(coverage=1.0, channels=slim, grid=crop.grid)
    assert C.check_field_of_view(case.ct, None, reg, fake, pipe.template) == []
    assert C.REAL_SYNDESMOSIS_ML[C.FIBULA] < 0.55 * expected[C.FIBULA]
    # ... but a fibula at a fifth of it still is (0.2 x 11.4 ml = 2.3 ml, 39 % of 5.8 ml).
    slim[2] = crop.channels[2] * 0.2
    found = C.check_field_of_view(case.ct, None, reg, fake, pipe.template)
    assert codes(found) == [("warning", "fov_bone_at_syndesmosis")]


def test_real_syndesmosis_volumes_are_the_real_shape_templates():
    from AnkleFractureLib.registration.template import TEMPLATE_NAME_VH, load_template
    from AnkleFractureLib.resources import resources_dir

    vh = load_template(resources_dir() / "Templates" / TEMPLATE_NAME_VH)
    ml = C.syndesmosis_bone_ml(vh.labels, float(vh.plafond[2]))
    for bone in (C.TIBIA, C.FIBULA):
        assert ml[bone] == pytest.approx(C.REAL_SYNDESMOSIS_ML[bone], abs=0.1)


@pytest.mark.parametrize("values, expected", [
    ((1.0, 0.85, 1.0, 1.0), []),
    ((4.0, 0.85, 1.0, 1.0), [("warning", "registration_rms")]),
    ((7.0, 0.85, 1.0, 1.0), [("refusal", "registration_rms")]),
    ((1.0, 0.5, 1.0, 1.0), [("warning", "registration_inliers")]),
    ((1.0, 0.85, 1.5, 1.0), [("warning", "registration_scale")]),
    ((1.0, 0.85, 0.65, 1.0), [("warning", "registration_scale")]),
    ((1.0, 0.85, 1.0, 0.5), [("warning", "side_unsure")]),
])
def test_check_registration_values(values, expected):
    assert codes(C.check_registration_values(*values)) == expected


# ------------------------------------------------------------------------------ gating
def test_gate_classification():
    res = {"probabilities": {"none": 0.1, "A": 0.1, "B": 0.7000001, "C": 0.1},
           "prediction": "B", "uncertainty": {"unsure": False, "reasons": []},
           "gradcam_class": "B"}
    g = C.gate_classification([], res)
    assert g["prediction"] == "B" and not g["uncertainty"]["unsure"]
    assert abs(sum(g["probabilities"].values()) - 1.0) < 1e-12 and g["withheld_reason"] is None
    info = C.gate_classification([C.Finding("warning", "reader_note", "tilt")], res)
    assert not info["uncertainty"]["unsure"]  # information only
    for code in ("metal", "coarse_spacing", "fov_coverage", "registration_rms"):
        g = C.gate_classification([C.Finding("warning", code, f"{code} message")], res)
        assert g["prediction"] == "B" and g["uncertainty"]["unsure"]
        assert g["uncertainty"]["reasons"] == [f"{code} message"]
    refusal = [C.Finding("warning", "metal", "m"),
               C.Finding("refusal", "fov_short_above", "the scan ends 5 mm above the joint")]
    g = C.gate_classification(refusal, res)
    assert g["prediction"] is None and g["probabilities"] is None
    assert g["withheld_reason"] == "the scan ends 5 mm above the joint"
    assert C.gate_classification([], None)["prediction"] is None  # did not run


# ------------------------------------------------------------------------------ end to end
def test_run_command_writes_every_output(cli_run, case, capsys):
    assert cli_run.rc == 0
    out = cli_run.out
    res = json.loads((out / "result.json").read_text())
    for name in ("segmentation.nii.gz", "transform.json", "transform.tfm",
                 "syndesmosis_crop.nii.gz", "gradcam.nii.gz"):
        assert (out / name).is_file() and name in res["files"], name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    assert res["refused"] is False and res["refusal"] is None and res["withheld_reason"] is None
    assert set(res["probabilities"]) == set(CLASSES)
    assert abs(sum(res["probabilities"].values()) - 1.0) < 1e-9
    assert res["prediction"] == max(res["probabilities"], key=res["probabilities"].get)
    assert res["side"] == "left" and res["registration"]["mirrored"] is True
    assert res["registration"]["rms_mm"] < 3.0 and res["crop_coverage"] > 0.9
    assert "unsure" in res["uncertainty"] and isinstance(res["warnings"], list)
    for stage in ("segment", "register", "crop", "classify", "gradcam", "checks", "total"):
        assert res["timings_s"][stage] >= 0.0, stage
    assert res["timings_s"]["total"] >= res["timings_s"]["segment"] > 0
    for model in ("segmentation", "classification"):
        assert len(res["models"][model]["sha256"]) == 64 and res["models"][model]["used"]
    assert Path(res["input"]["ct"]) == cli_run.ct_path.resolve()
    assert "not for clinical use" in res["disclaimer"]
    # The segmentation carries exactly the CT's geometry; the heatmap lies on the CT's voxel
    # lattice, covering only the crop's box.
    ct = read_image(cli_run.ct_path)
    vol = read_image(out / "segmentation.nii.gz")
    assert vol.shape == ct.shape and vol.array.dtype == np.uint8
    np.testing.assert_allclose(vol.spacing, ct.spacing, atol=1e-5)
    np.testing.assert_allclose(vol.origin, ct.origin, atol=1e-4)
    np.testing.assert_allclose(vol.direction, ct.direction, atol=1e-5)
    heat_vol = read_image(out / "gradcam.nii.gz")
    assert heat_vol.array.dtype == np.float32 and box_on_grid(heat_vol, ct, atol=1e-4)
    assert heat_vol.array.size < ct.array.size
    heat = heat_vol.array
    assert heat.min() >= 0.0 and heat.max() <= 1.0 and heat.max() > 0
    # result.json says where the heatmap's maximum is (LPS mm): the written file's hottest
    # voxel lies there.
    peak_zyx = np.argwhere(heat == heat.max())
    hottest = heat_vol.index_to_physical(peak_zyx[:, ::-1].astype(float))
    assert np.min(np.linalg.norm(hottest - np.asarray(res["gradcam"]["peak_lps"]),
                                 axis=1)) < 0.01
    seg = read_image(out / "segmentation.nii.gz").array
    dice = [2 * np.sum((seg == v) & (case.label.array == v))
            / (np.sum(seg == v) + np.sum(case.label.array == v)) for v in (1, 2)]
    assert min(dice) > 0.9
    # The transform files are the register command's.
    t = read_transform_json(out / "transform.json")
    np.testing.assert_allclose(np.linalg.inv(t["patient_to_template"]),
                               read_itk_transform(out / "transform.tfm"), atol=1e-6)
    assert t["side"] == "left" and "crop_coverage" in t


def test_rerun_registration_and_classification_on_a_corrected_label(cli_run, pipe):
    ct = read_image(cli_run.ct_path)
    label = read_image(cli_run.out / "segmentation.nii.gz")
    corrected = label.array.copy()
    corrected[np.flatnonzero(corrected.any(axis=(1, 2)))[-1]] = 0  # the clinician erases a slice
    label = label.with_array(corrected)
    messages = []
    res = pipe.run(ct, progress=lambda f, m: messages.append((f, m)), label=label)
    assert not res.refused and res.classification is not None
    assert "segment" not in res.timings and res.models["segmentation"]["used"] is False
    assert res.label is not None and np.array_equal(res.label.array, corrected)
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(m.startswith("registration:") for _, m in messages)
    data = res.to_json()
    assert abs(sum(data["probabilities"].values()) - 1.0) < 1e-9 and data["side"] == "left"
    # Stage by stage, as the Slicer module calls them.
    reg = pipe.register(ct, label, side="left")
    out = pipe.classify(ct, label, reg)
    assert box_on_grid(out.gradcam, ct) is not None and out.result.prediction in CLASSES


def test_cancel_raises_and_writes_nothing(case, pipe, tmp_path):
    calls = []

    def should_cancel() -> bool:
        calls.append(1)
        return len(calls) >= 3  # inside the segmentation (polled between patches)

    with pytest.raises(CancelledError):
        pipe.run(case.ct, should_cancel=should_cancel)
    assert len(calls) == 3 and not (tmp_path / "out").exists()
    assert main(["run", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "out"),
                 "--quiet"]) == 2  # unreadable input is a user error
    assert not (tmp_path / "out").exists()


def test_refused_result_writes_only_its_files(case, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "gradcam.nii.gz").write_bytes(b"stale")  # from an earlier run in the same folder
    res = PipelineResult(input={"ct": None}, label=case.label, refused_stage="segment",
                         findings=[C.Finding("refusal", "fov_short_above", "ends 5 mm above"),
                                   C.Finding("warning", "metal", "metal")])
    data = write_outputs(res, out, case.ct)
    assert sorted(p.name for p in out.iterdir() if p.name != "report.png") == [
        "result.json", "segmentation.nii.gz"]
    saved = json.loads((out / "result.json").read_text())
    assert saved == json.loads(json.dumps(data))
    assert saved["refused"] and saved["prediction"] is None and saved["probabilities"] is None
    assert saved["refusal"] == "ends 5 mm above" and saved["warnings"] == ["metal"]
    assert saved["registration"] is None and saved["findings"][0]["code"] == "fov_short_above"


def test_an_image_that_cannot_be_written_leaves_no_result_json(case, tmp_path, monkeypatch):
    """The images are written in a thread beside the report: a failure there still reaches
    the caller, as a clear error naming the file, and no result.json claims the outputs."""
    from AnkleFractureLib import io as af_io
    from AnkleFractureLib.errors import InputError

    real = af_io.write_image

    def full_disk(volume, path, **kw):
        if str(path).endswith("segmentation.nii.gz"):
            raise InputError(path, "cannot write image: No space left on device")
        return real(volume, path, **kw)

    monkeypatch.setattr(af_io, "write_image", full_disk)
    out = tmp_path / "out"
    res = PipelineResult(input={"ct": None}, label=case.label, refused_stage="segment")
    with pytest.raises(InputError, match="segmentation.nii.gz.*No space left"):
        write_outputs(res, out, case.ct)
    assert not (out / "result.json").exists() and not (out / "segmentation.nii.gz").exists()


# ------------------------------------------------------------------------------ real data
def test_real_foot_series_is_refused_with_no_foot_bone_labelled(shared_ct_dir, tiny_cls,
                                                                 tmp_path, capsys):
    """The real foot series (both feet, toes to the talar dome, no tibial shaft): the network
    calls plantarflexed metatarsals tibia and fibula; post-processing rule 9 finds no distal
    tibia, removes every label and the scan is refused for that, first."""
    out = tmp_path / "vhf"
    assert main(["run", str(shared_ct_dir), "--out", str(out), "--cls-model", str(tiny_cls),
                 "--device", "cpu", "--quiet"]) == 0
    stdout = capsys.readouterr().out
    res = json.loads((out / "result.json").read_text())
    assert res["refused"] is True and res["prediction"] is None and res["probabilities"] is None
    assert res["refusal"].startswith("no distal tibia in view")
    first = res["findings"][0]
    assert first["code"] == "no_distal_tibia" and first["level"] == "refusal"
    assert first["details"]["section_cm2"] < 6.0 and first["details"]["below_top_mm"] > 20.0
    labels = read_image(out / "segmentation.nii.gz").array
    assert not np.asarray(labels).any()  # foot bones are never tibia or fibula
    assert not (out / "gradcam.nii.gz").exists() and not (out / "transform.json").exists()
    assert res["models"]["classification"]["used"] is False
    assert "NO WEBER CLASS" in stdout and "foot scan" in stdout


def test_gradcam_json_names_the_maximum_and_none_for_a_map_without_one() -> None:
    """result.json gradcam.peak_lps: the hottest voxel's centre (LPS mm); a map with no finite
    value has no maximum, and says so by leaving the key out (no error)."""
    heat = np.zeros((4, 5, 6), np.float32)
    heat[1, 2, 3] = 0.9
    heat[0, 0, 0] = np.nan
    vol = Volume(heat, (2.0, 1.0, 0.5), (10.0, 20.0, 30.0), meta={"ct_box": [[0, 4]] * 3})
    got = PipelineResult._gradcam_json(SimpleNamespace(gradcam=vol, classification=None))
    assert got["peak_lps"] == [16.0, 22.0, 30.5] and got["ct_box"] == [[0, 4]] * 3
    empty = vol.with_array(np.full(heat.shape, np.nan, np.float32))
    got = PipelineResult._gradcam_json(SimpleNamespace(gradcam=empty, classification=None))
    assert "peak_lps" not in got
