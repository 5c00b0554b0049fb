"""Tests of the one-page report (AnkleFractureLib.pipeline.report): PNG/PDF files, the texts a
surgeon reads, and the radiological orientation of the CT panels for any direction matrix."""

from __future__ import annotations

import os
from typing import Any, Dict, List

import numpy as np
import pytest

from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.pipeline import report as R
from AnkleFractureLib.preprocessing.orientation import to_canonical

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHAPE = (40, 48, 48)  # (z, y, x)
SPACING = (0.8, 0.9, 1.5)  # (x, y, z) mm

# Signed permutation matrices (columns = i, j, k axes in LPS): flipped and permuted grids.
DIRECTIONS = {
    "identity": np.eye(3),
    "x_flipped": np.diag([-1.0, 1.0, 1.0]),
    "feet_first": np.diag([-1.0, 1.0, -1.0]),
    "permuted": np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]]),
    "permuted_flipped": np.array([[0.0, -1, 0], [0, 0, -1], [-1, 0, 0]]),
}


def _grid(direction: np.ndarray, fill: float, dtype: Any) -> Volume:
    """A Volume of SHAPE whose physical box is centred on the LPS origin, for any direction."""
    centre_index = (np.array(SHAPE[::-1], dtype=float) - 1) / 2  # (i, j, k)
    origin = -(direction @ (np.asarray(SPACING) * centre_index))
    return Volume(np.full(SHAPE, fill, dtype=dtype), SPACING, origin, direction)


def _physical_grid(v: Volume) -> np.ndarray:
    """LPS mm (z, y, x, 3) of every voxel centre."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in v.shape], indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).reshape(-1, 3)
    return v.index_to_physical(ijk).reshape(v.shape + (3,))


def _ankle(direction: np.ndarray = np.eye(3)):
    """Synthetic CT (HU), label and Grad-CAM on one grid: vertical rods for the tibia (patient
    right-centre) and the fibula (patient left, posterior), the heatmap blob on the fibula.
    Returned arrays follow the grid's own index order, built from physical positions."""
    ct = _grid(direction, -1000, np.int16)
    p = _physical_grid(ct)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    ct.array[(x / 18) ** 2 + (y / 16) ** 2 < 1] = 40  # soft tissue
    tibia = ((x + 4) ** 2 + y ** 2 < 8 ** 2) & (z > -20)
    fibula = (x - 11) ** 2 + (y - 5) ** 2 < 3.5 ** 2
    ct.array[tibia] = 1200
    ct.array[fibula] = 1100
    lab = np.zeros(SHAPE, np.uint8)
    lab[tibia] = 1
    lab[fibula] = 2
    heat = np.exp(-(((x - 11) ** 2 + (y - 5) ** 2 + (z - 6.0) ** 2) / 6.0 ** 2)).astype(np.float32)
    return ct, ct.with_array(lab), ct.with_array(heat)


def _result(**over: Any) -> Dict[str, Any]:
    res: Dict[str, Any] = {
        "probabilities": {"none": 0.05, "A": 0.1, "B": 0.723, "C": 0.127},
        "prediction": "B",
        "uncertainty": {"unsure": False, "reasons": [], "confidence": 0.723},
        "side": "left",
        "registration": {"rms_mm": 1.234},
        "warnings": ["slice thickness 1.5 mm is coarser than recommended"],
        "refused": False,
        "refusal": None,
        "timings_s": {"segment": 10.0, "total": 17.25},
    }
    res.update(over)
    return res


def _texts(fig: Any) -> str:
    from matplotlib.text import Text

    return "\n".join(t.get_text() for t in fig.findobj(Text))


def _marker_volume(direction: np.ndarray) -> Volume:
    """Zeros with one bright voxel at the patient's right (-x), anterior (-y), superior (+z)."""
    v = _grid(direction, 0, np.int16)
    lo, hi = v.physical_extent()
    target = np.array([lo[0] + 2.0, lo[1] + 3.0, hi[2] - 3.0])
    i, j, k = np.round(v.physical_to_index(target[None])[0]).astype(int)
    v.array[k, j, i] = 1000
    return v


# ------------------------------------------------------------------------------- orientation
@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_display_slices_match_canonical_reorientation(name: str) -> None:
    v = _grid(DIRECTIONS[name], 0, np.int16)
    v.array[...] = np.arange(v.array.size, dtype=np.int16).reshape(SHAPE)
    canonical, _ = to_canonical(v)
    nz, ny, _ = canonical.shape
    for k in (0, nz // 2, nz - 1):
        np.testing.assert_array_equal(R.axial_slice_display(v, k), canonical.array[k])
    for j in (0, ny - 1):
        np.testing.assert_array_equal(R.coronal_slice_display(v, j), canonical.array[::-1, j])


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_patient_right_is_on_the_image_left_anterior_and_superior_up(name: str) -> None:
    v = _marker_volume(DIRECTIONS[name])
    k, j, i = np.argwhere(v.array > 0)[0]
    canonical, _ = to_canonical(v)
    kc, jc, ic = np.argwhere(canonical.array > 0)[0]
    axial = R.axial_slice_display(v, kc)
    row, col = np.argwhere(axial > 0)[0]
    assert col < axial.shape[1] / 2, "patient right must be on the image left"
    assert row < axial.shape[0] / 2, "anterior must be up"
    coronal = R.coronal_slice_display(v, jc)
    row, col = np.argwhere(coronal > 0)[0]
    assert col < coronal.shape[1] / 2, "patient right must be on the image left"
    assert row < coronal.shape[0] / 2, "superior must be up"
    assert v.array[k, j, i] == 1000  # the marker itself is untouched


def test_display_slice_does_not_copy_the_volume_to_float64() -> None:
    v = _marker_volume(DIRECTIONS["permuted_flipped"])
    out = R.axial_slice_display(v, 0)
    assert out.dtype == np.float32 and out.ndim == 2


@pytest.mark.parametrize("name", ["identity", "permuted_flipped"])
def test_figure_axial_panel_shows_the_left_fibula_on_the_image_right(name: str) -> None:
    ct, label, heat = _ankle(DIRECTIONS[name])
    fig = R.report_figure(ct, label, heat, _result())
    axial_ax = fig.axes[0]
    ct_img = axial_ax.images[0].get_array()
    heat_rgba = np.asarray(axial_ax.images[1].get_array())
    # The axial slice is at the heatmap's peak along the leg (z = 6 mm).
    canonical, _ = to_canonical(ct)
    k_expected = int(round(canonical.physical_to_index([[0.0, 0.0, 6.0]])[0][2]))
    matches = [k for k in range(canonical.shape[0])
               if np.array_equal(np.asarray(ct_img), canonical.array[k].astype(np.float32))]
    assert k_expected in matches
    # The fibula (patient left, +x) lies in the image's right half; so does the heat's peak.
    cols = np.argwhere(np.asarray(ct_img) == 1100)[:, 1]
    assert cols.size and cols.min() > ct_img.shape[1] / 2
    peak_col = np.unravel_index(np.argmax(heat_rgba[..., 3]), heat_rgba.shape[:2])[1]
    assert peak_col > ct_img.shape[1] / 2
    # Physical aspect: the panel's extent is in mm along the canonical x and y axes.
    left, right, bottom, top = axial_ax.images[0].get_extent()
    assert right - left == pytest.approx(canonical.shape[2] * canonical.spacing[0])
    assert bottom - top == pytest.approx(canonical.shape[1] * canonical.spacing[1])
    assert axial_ax.get_aspect() == 1.0
    # Orientation letters at the edges.
    letters = {t.get_text() for t in axial_ax.texts}
    assert {"R", "L", "A", "P"} <= letters
    assert {"R", "L", "S", "I"} <= {t.get_text() for t in fig.axes[1].texts}
    fig.clear()


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_heatmap_on_its_box_draws_as_the_heatmap_pasted_on_the_whole_grid(name: str) -> None:
    """The pipeline keeps Grad-CAM on a sub-box of the CT's lattice; the report reads it there
    (0 outside the box) and must show exactly what the box pasted onto the whole grid shows:
    the same planes (chosen at the heatmap's peak) and the same heat slices."""
    from AnkleFractureLib.crop.syndesmosis import paste_on_grid

    ct, label, heat = _ankle(DIRECTIONS[name])
    peak = np.unravel_index(int(np.argmax(heat.array)), heat.array.shape)
    box = heat.region(tuple(slice(max(0, int(p) - 7), min(n, int(p) + 4))  # off-centre
                            for p, n in zip(peak, heat.array.shape)))
    full = paste_on_grid(box, ct)
    assert full.array.shape == ct.array.shape and 0 < box.array.size < full.array.size
    figs = [R.report_figure(ct, label, h, _result()) for h in (box, full)]
    for ax in (0, 1):  # axial, coronal
        a, b = (np.asarray(f.axes[ax].images[1].get_array()) for f in figs)
        np.testing.assert_array_equal(a, b)
        assert np.asarray(figs[0].axes[ax].images[1].get_array())[..., 3].max() > 0
        assert figs[0].axes[ax].get_title() == figs[1].axes[ax].get_title()
    for f in figs:
        f.clear()


def test_coronal_plane_goes_through_the_fibula() -> None:
    ct, label, _ = _ankle()
    fig = R.report_figure(ct, label, None, _result())
    coronal = np.asarray(fig.axes[1].images[0].get_array())
    assert (coronal == 1100).any(), "the coronal panel must cut the fibula"
    assert coronal.shape == (SHAPE[0], SHAPE[2])
    fig.clear()


# ------------------------------------------------------------------------------- content
def test_normal_result_shows_percentages_prediction_and_panel_texts() -> None:
    ct, label, heat = _ankle()
    res = _result(warnings=["first warning about metal", "second warning " + "x" * 150])
    fig = R.report_figure(ct, label, heat, res)
    text = _texts(fig)
    assert "72.3 %" in text and "12.7 %" in text and "5.0 %" in text
    assert "Prediction: Weber B" in text
    assert R.FOOTER in text and "not for clinical use" in text
    assert "Side: left" in text
    assert "1.23 mm" in text
    assert "17.2 s" in text or "17.3 s" in text
    assert "first warning about metal" in text and "second warning" in text
    assert "No classification" not in text
    # The Grad-CAM has a colour bar.
    assert any(ax.get_title(loc="left") == "Grad-CAM" for ax in fig.axes)
    fig.clear()


def test_unsure_result_says_so_with_reasons() -> None:
    ct, label, heat = _ankle()
    res = _result(uncertainty={"unsure": True, "reasons": ["only 45% probability"],
                               "confidence": 0.45})
    text = _texts(R.report_figure(ct, label, heat, res))
    assert "UNSURE" in text and "only 45% probability" in text


@pytest.mark.parametrize("kind", ["refused", "withheld"])
def test_refused_or_withheld_result_shows_the_reason_and_no_percentages(kind: str) -> None:
    ct, label, _ = _ankle()
    reason = "the syndesmosis is outside the field of view"
    if kind == "refused":
        res = _result(probabilities=None, prediction=None, refused=True, refusal=reason,
                      uncertainty=None, registration=None)
    else:
        res = _result(probabilities=None, prediction=None, withheld_reason=reason)
    fig = R.report_figure(ct, label, None, res)
    text = _texts(fig)
    assert "No classification" in text
    assert reason in text.replace("\n", " ")
    assert "not for clinical use" in text
    assert not any(t.strip().endswith("%") for t in text.split("\n"))
    assert "Prediction" not in text
    fig.clear()


def test_volumes_off_the_ct_grid_are_not_drawn_but_noted() -> None:
    ct, label, heat = _ankle()
    other = Volume(np.zeros((5, 6, 7), np.uint8))
    fig = R.report_figure(ct, other, heat.with_array(heat.array[:, :, ::-1].copy()), _result())
    text = _texts(fig)
    assert "segmentation is not on the CT's grid" in text
    assert len(fig.axes[0].images) == 2  # CT and heatmap only
    fig.clear()


# ------------------------------------------------------------------------------- files
def _assert_png(path: str) -> np.ndarray:
    import matplotlib.image as mpimg

    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert float(img[..., :3].std()) > 0.05, "the report must not be blank"
    return img


@pytest.mark.parametrize("with_label,with_heat", [(True, True), (False, False), (True, False),
                                                  (False, True)])
def test_write_png_is_valid_and_atomic(tmp_path, with_label: bool, with_heat: bool) -> None:
    ct, label, heat = _ankle(DIRECTIONS["feet_first"])
    path = str(tmp_path / "report.png")
    R.write_report_png(path, ct, label if with_label else None, heat if with_heat else None,
                       _result())
    img = _assert_png(path)
    assert img.shape[:2] == (round(R.FIGSIZE_IN[1] * 110), round(R.FIGSIZE_IN[0] * 110))
    assert os.listdir(tmp_path) == ["report.png"]


def test_write_png_replaces_an_old_report_and_creates_folders(tmp_path) -> None:
    ct, label, heat = _ankle()
    path = tmp_path / "out" / "report.png"
    R.write_report_png(path, ct, label, heat, _result(), dpi=40)
    first = path.read_bytes()
    R.write_report_png(path, ct, label, None, _result(probabilities=None, refused=True,
                                                      refusal="no fibula"), dpi=40)
    assert path.read_bytes() != first
    _assert_png(str(path))
    assert os.listdir(tmp_path / "out") == ["report.png"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch) -> None:
    ct, label, heat = _ankle()
    path = tmp_path / "report.png"
    path.write_bytes(b"old")
    from matplotlib.figure import Figure

    def boom(self, *a, **k):
        with open(a[0], "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(RuntimeError):
        R.write_report_png(path, ct, label, heat, _result())
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["report.png"]


def test_figure_is_released_after_writing(tmp_path, monkeypatch) -> None:
    ct, label, heat = _ankle()
    made: List[Any] = []
    original = R.report_figure

    def spy(*args):
        fig = original(*args)
        made.append(fig)
        return fig

    monkeypatch.setattr(R, "report_figure", spy)
    R.write_report_png(tmp_path / "r.png", ct, label, heat, _result(), dpi=30)
    assert len(made) == 1 and made[0].axes == []


def test_write_pdf(tmp_path) -> None:
    ct, label, heat = _ankle(DIRECTIONS["permuted"])
    path = tmp_path / "report.pdf"
    R.write_report_pdf(path, ct, label, heat, _result())
    data = path.read_bytes()
    assert data.startswith(b"%PDF") and len(data) > 5000
    assert os.listdir(tmp_path) == ["report.pdf"]


def test_does_not_touch_pyplot(tmp_path) -> None:
    import sys

    ct, label, heat = _ankle()
    loaded = "matplotlib.pyplot" in sys.modules
    before = sys.modules["matplotlib.pyplot"].get_fignums() if loaded else None
    R.write_report_png(tmp_path / "r.png", ct, label, heat, _result(), dpi=30)
    if loaded:  # someone else imported pyplot: our figure must not be registered there
        assert sys.modules["matplotlib.pyplot"].get_fignums() == before
    else:
        assert "matplotlib.pyplot" not in sys.modules


def test_candidate_lines_the_answer_did_not_report_are_listed_for_the_reader() -> None:
    ct, label, heat = _ankle()
    lines = [{"voxels": 300, "mass": 250.0, "probability": 0.99, "height_mm": 14.2,
              "line_probability": 0.93, "found": True},
             {"voxels": 180, "mass": 150.0, "probability": 0.98, "height_mm": 47.1,
              "line_probability": 0.47, "found": False},
             {"voxels": 90, "mass": 70.0, "probability": 0.95, "height_mm": -12.0,
              "line_probability": 0.12, "found": False},
             {"voxels": 40, "mass": 30.0, "probability": 0.9, "height_mm": -20.0,
              "line_probability": 0.02, "found": False}]
    frac = {"found": True, "probability": 0.93, "height_mm": 14.2, "center_lps": None,
            "extent": None, "candidates": lines}
    text = " ".join(_texts(R.report_figure(ct, label, heat, _result(fracture=frac))).split())
    assert "Fibula fracture: 14.2 mm above the plafond" in text  # (lines wrap: spaces joined)
    assert "other candidate lines: 47.1 mm above (47 %), 12.0 mm below (12 %)" in text
    assert "20.0 mm below" not in text  # below 10 %: not listed
    # without the line model (no line probabilities) nothing more is said
    plain = [{k: v for k, v in c.items() if k != "line_probability"} for c in lines]
    text = _texts(R.report_figure(ct, label, heat, _result(fracture={**frac,
                                                                     "candidates": plain})))
    assert "other candidate lines" not in text


def test_a_line_of_the_cortical_ring_check_says_so() -> None:
    ct, label, heat = _ankle()
    ring = {"voxels": 0, "mass": 0.0, "probability": 0.6, "height_mm": 61.0, "found": True,
            "cortex_ring": 1, "line_probability": 0.9}
    frac = {"found": True, "probability": 0.9, "height_mm": 61.0, "center_lps": None,
            "extent": None, "candidates": [ring]}
    text = " ".join(_texts(R.report_figure(ct, label, heat, _result(fracture=frac))).split())
    assert "61.0 mm above the plafond" in text and "found by the cortical ring check" in text
    plain = {**frac, "candidates": [{**ring, "cortex_ring": 0}]}
    text = " ".join(_texts(R.report_figure(ct, label, heat, _result(fracture=plain))).split())
    assert "cortical ring check" not in text


def test_report_text_says_when_the_located_line_settled_the_classifiers_doubt():
    from AnkleFractureLib.pipeline.report import _info_lines

    result = {"refused": False, "prediction": "A",
              "probabilities": {"none": 0.03, "A": 0.95, "B": 0.01, "C": 0.01},
              "uncertainty": {"unsure": False, "confidence": 0.58, "reasons": [],
                              "settled_by": "the classifier alone was unsure, but the line "
                                            "located -8.0 mm from the plafond lies at the "
                                            "Weber A level"},
              "warnings": [], "findings": []}
    text = "\n".join(_info_lines(result, [], 200, heatmap_shown=False))
    assert "Uncertainty: confident (classifier 58" in text
    assert "the line located -8.0 mm from the plafond" in text
