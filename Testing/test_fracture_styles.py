"""Fracture morphology families (varied / heldout) and the localiser's training target."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from AnkleFractureLib.phantom.fracture_styles import STYLES, sample_styled
from AnkleFractureLib.phantom.fractures import WEBER_HEIGHT_MM, PlaneCut, sample_fracture

ANCHORS = SimpleNamespace(fib_tip_depth=25.0, tib_meta_rx=20.0, mm_rx=6.0, mm_cy=0.0)


def _axis(z: float) -> np.ndarray:
    return np.array([-20.0, 5.0, z])


def _draw(style: str, weber: str, n: int = 60):
    return [sample_styled(np.random.default_rng(s), weber, ANCHORS, _axis, style) for s in range(n)]


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("weber", ["A", "B", "C"])
def test_heights_stay_in_their_class_and_draws_repeat(style: str, weber: str) -> None:
    lo, hi = WEBER_HEIGHT_MM[weber]
    cuts = _draw(style, weber, 40)
    h = np.array([c.fibula.centre[2] for c in cuts])
    assert h.min() >= lo - 1e-6 and h.max() <= hi + 1e-6
    again = sample_styled(np.random.default_rng(3), weber, ANCHORS, _axis, style)
    assert np.allclose(again.fibula.normal, cuts[3].fibula.normal)
    assert again.fibula.gap_mm == cuts[3].fibula.gap_mm


def test_varied_spans_hairline_to_displaced() -> None:
    cuts = [c.fibula for w in "ABC" for c in _draw("varied", w)]
    gaps = np.array([c.gap_mm for c in cuts])
    disp = np.array([np.linalg.norm(c.translation) for c in cuts])
    assert (gaps < 0.6).mean() > 0.2 and gaps.max() > 2.0
    assert disp.min() < 0.5 and disp.max() > 4.0
    assert any(abs(c.bend) > 0.02 for c in cuts)


def test_heldout_family_is_parameterised_differently() -> None:
    b_var = [c.fibula.normal for c in _draw("varied", "B", 80)]
    b_ho = [c.fibula.normal for c in _draw("heldout", "B", 80)]
    # Steeper Weber B lines: a smaller vertical normal component on average.
    assert np.mean([n[2] for n in b_ho]) < np.mean([n[2] for n in b_var]) - 0.05
    assert np.mean([abs(c.fibula.bend) for c in _draw("heldout", "C")]) > \
        np.mean([abs(c.fibula.bend) for c in _draw("varied", "C")])


def test_curved_surface_cuts_the_fibular_axis_once() -> None:
    for cut in (c.fibula for c in _draw("heldout", "B", 80)):
        z = np.linspace(-80, 80, 1601).astype(np.float32)
        x = np.full_like(z, cut.centre[0])
        y = np.full_like(z, cut.centre[1])
        s = cut.side(x, y, z)
        assert np.count_nonzero(np.diff(np.sign(s)) != 0) == 1


def test_unknown_style_is_refused() -> None:
    with pytest.raises(ValueError, match="fracture style"):
        sample_fracture(np.random.default_rng(0), "B", ANCHORS, _axis, style="spiral")


def test_cut_round_trips_through_json() -> None:
    cut = _draw("varied", "B", 1)[0].fibula
    back = PlaneCut.from_dict(cut.to_dict(np.eye(4)))
    pts = np.random.default_rng(1).normal(0, 15, size=(3, 500)).astype(np.float32)
    assert np.allclose(back.side(*pts), cut.side(*pts), atol=1e-2)
    assert np.allclose(back.rotation, cut.rotation, atol=1e-5)


def test_target_is_the_line_through_the_fibula_at_its_height() -> None:
    from AnkleFractureLib.fracture.targets import fracture_line_target
    from AnkleFractureLib.geometry.volume import Volume

    cut = _draw("varied", "B", 1)[0]
    frac = cut.to_dict(np.eye(4))
    grid = Volume(np.zeros((80, 30, 30), np.float32), (1.0, 1.0, 1.0), (-35.0, -10.0, -20.0),
                  np.eye(3))
    zz, yy, xx = np.indices(grid.shape)
    fib = ((xx - 15) ** 2 + (yy - 15) ** 2 <= 36).astype(np.float32)  # axis x -20, y 5
    target = fracture_line_target(frac, np.eye(4), grid, np.eye(4), fib)
    k = np.nonzero(target)[0]
    assert k.size > 50
    assert abs((k.mean() - 20.0) - frac["height_mm"]) < 6.0
    assert not target[fib == 0].any() or target[fib == 0].sum() < target.sum()
    assert fracture_line_target(None, np.eye(4), grid, np.eye(4), fib).sum() == 0


def test_calibration_family_goes_beyond_both_where_the_heldout_one_is_harder() -> None:
    def hairline_share(style: str) -> float:
        gaps = [c.fibula.gap_mm for w in "ABC" for c in _draw(style, w, 80)]
        return float(np.mean(np.array(gaps) < STYLES[style].hairline_gap_mm[1] + 1e-9))

    def steepness(style: str) -> float:  # Weber B: a smaller vertical normal is steeper
        return -float(np.mean([c.fibula.normal[2] for c in _draw(style, "B", 80)]))

    def bend(style: str) -> float:
        return float(np.mean([abs(c.fibula.bend) for c in _draw(style, "C", 80)]))

    for measure in (steepness, bend):
        assert measure("calibration") > measure("heldout") > measure("varied")
    assert hairline_share("calibration") > max(hairline_share("heldout"),
                                               hairline_share("varied"))
    # ... and it is its own family: less displacement than the held-out one
    disp = {s: np.mean([np.linalg.norm(c.fibula.translation) for w in "ABC"
                        for c in _draw(s, w, 80)]) for s in ("calibration", "heldout")}
    assert disp["calibration"] < disp["heldout"]
