"""Post-processing of predicted label maps: specks, fragments, swaps, real phantom fractures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from AnkleFractureLib.phantom.generator import generate_case
from AnkleFractureLib.segmentation.postprocess import clean_labels

SPACING = (0.8, 0.8, 1.0)  # (x, y, z) mm
SHAPE = (40, 60, 60)       # (z, y, x)


def _bones() -> np.ndarray:
    """A 'tibia' (radius 12 voxels) and a 'fibula' (radius 4) cylinder along z, 8 voxels apart."""
    z, y, x = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    lab = np.zeros(SHAPE, np.uint8)
    tib = (y - 30) ** 2 + (x - 20) ** 2 <= 12 ** 2
    fib = (y - 30) ** 2 + (x - 48) ** 2 <= 4 ** 2
    lab[np.broadcast_to(tib, SHAPE)] = 1
    lab[np.broadcast_to(fib, SHAPE)] = 2
    return lab


def test_clean_bones_are_untouched():
    lab = _bones()
    out, rep = clean_labels(lab, SPACING)
    assert np.array_equal(out, lab) and out is not lab
    assert rep["swapped"] is False and rep["removed_voxels"] == 0
    assert rep["relabelled_fragments"] == 0 and rep["notes"] == []
    json.dumps(rep, allow_nan=False)


def test_far_speck_is_removed_and_input_untouched():
    lab = _bones()
    lab[20, 2:5, 57] = 2  # 3 voxels, > 10 mm from both bones
    before = lab.copy()
    out, rep = clean_labels(lab, SPACING)
    assert np.array_equal(lab, before)
    assert out[20, 2:5, 57].tolist() == [0, 0, 0]
    assert rep["removed_voxels"] == 3 and rep["removed_fragments"] == 1
    assert np.array_equal(out, _bones())


def test_fibula_fragment_labelled_tibia_is_given_back_to_the_fibula():
    lab = _bones()
    # The fibula is cut by a 2-slice gap at z = 26-27; the part above it was labelled tibia.
    lab[26:28][lab[26:28] == 2] = 0
    frag = lab[28:] == 2
    lab[28:][frag] = 1
    out, rep = clean_labels(lab, SPACING)
    assert np.all(out[28:][frag] == 2)
    assert rep["relabelled_fragments"] == 1 and rep["relabelled_voxels"] == int(frag.sum())
    assert rep["removed_voxels"] == 0 and not rep["swapped"]
    assert any("tibia to fibula" in n for n in rep["notes"])


def test_swapped_bones_are_swapped_back():
    lab = _bones()
    swapped = np.choose(lab, [0, 2, 1]).astype(np.uint8)
    out, rep = clean_labels(swapped, SPACING)
    assert rep["swapped"] is True and any("swapped" in n for n in rep["notes"])
    assert np.array_equal(out, lab)


def test_swapped_bones_with_a_fracture_fragment():
    lab = _bones()
    lab[26:28][lab[26:28] == 2] = 0  # fibula in two pieces, both labelled 'tibia' after the swap
    swapped = np.choose(lab, [0, 2, 1]).astype(np.uint8)
    out, rep = clean_labels(swapped, SPACING)
    assert rep["swapped"] is True
    assert np.array_equal(out, lab)


def test_isolated_fragments_small_removed_large_kept():
    lab = np.zeros((40, 120, 60), np.uint8)
    lab[:, 30:60, 5:35] = 1
    lab[:, 42:48, 40:46] = 2
    small = np.zeros_like(lab, bool)
    small[2:6, 2:6, 2:6] = True         # 64 voxels = 41 mm^3 >= 30: not a speck, but far
    foot = np.zeros_like(lab, bool)
    foot[0:8, 100:120, 50:60] = True    # 1600 voxels = 1.0 ml, far: a foot bone labelled tibia
    large = np.zeros_like(lab, bool)
    large[10:30, 85:105, 10:30] = True  # 8000 voxels = 5.1 ml, 25 voxels (20 mm) away
    lab[small] = 2
    lab[foot] = 1
    lab[large] = 1
    out, rep = clean_labels(lab, SPACING)
    assert not out[small].any() and not out[foot].any()
    assert np.all(out[large] == 1)
    assert rep["removed_fragments"] == 2 and rep["kept_fragments"] == 1


def test_small_speck_near_its_bone_is_kept():
    lab = _bones()
    lab[20, 30, 34] = 1  # one voxel 1.6 mm from the tibia (an osteophyte tip, say)
    out, rep = clean_labels(lab, SPACING)
    assert out[20, 30, 34] == 1 and rep["removed_voxels"] == 0


def test_probabilities_break_ties():
    lab = _bones()
    # A blob equidistant from the tibia (edge x = 32) and the fibula (edge x = 44), labelled 1.
    lab[18:22, 36:39, 37:40] = 1
    probs = np.zeros((3,) + SHAPE, np.float32)
    probs[2, 18:22, 36:39, 37:40] = 0.6
    probs[1, 18:22, 36:39, 37:40] = 0.4
    out, _ = clean_labels(lab, SPACING)
    assert np.all(out[18:22, 36:39, 37:40] == 1)  # no probabilities: keeps its own label
    out, rep = clean_labels(lab, SPACING, probabilities=probs)
    assert np.all(out[18:22, 36:39, 37:40] == 2)
    assert rep["relabelled_fragments"] == 1


def test_empty_and_invalid_inputs():
    out, rep = clean_labels(np.zeros((4, 4, 4), np.uint8), (1, 1, 1))
    assert not out.any() and rep["volumes_ml"] == {"tibia": 0.0, "fibula": 0.0}
    with pytest.raises(ValueError):
        clean_labels(np.full((4, 4, 4), 3, np.uint8), (1, 1, 1))
    with pytest.raises(ValueError):
        clean_labels(np.zeros((4, 4), np.uint8), (1, 1, 1))
    with pytest.raises(ValueError):
        clean_labels(np.zeros((4, 4, 4), np.uint8), (1, 0, 1))
    with pytest.raises(ValueError):
        clean_labels(np.zeros((4, 4, 4), np.float32), (1, 1, 1))


def test_phantom_fracture_fragments_keep_their_label():
    case = generate_case(1, "B", "right", "fast")
    lab = case.label.array
    n_fib = ndi.label(lab == 2, structure=np.ones((3, 3, 3)))[1]
    assert n_fib >= 2  # the fractured fibula is in pieces in this phantom
    out, rep = clean_labels(lab, case.label.spacing)
    assert np.array_equal(out, lab)
    assert rep["removed_voxels"] == 0 and rep["relabelled_fragments"] == 0
    assert rep["kept_fragments"] == n_fib - 1 and not rep["swapped"]


def test_many_specks_take_the_whole_array_path_with_the_same_result(monkeypatch):
    import AnkleFractureLib.segmentation.postprocess as pp

    lab = _bones()
    lab[26:28][lab[26:28] == 2] = 0
    lab[28:][lab[28:] == 2] = 1  # a fibula piece labelled tibia
    rng = np.random.default_rng(7)
    pts = rng.integers(0, SHAPE, size=(400, 3))
    pts = pts[lab[tuple(pts.T)] == 0]  # specks in the background only
    lab[tuple(pts.T)] = rng.integers(1, 3, size=len(pts))
    swapped = np.choose(lab, [0, 2, 1]).astype(np.uint8)
    monkeypatch.setattr(pp, "_MANY", 32)
    fast_out, fast_rep = clean_labels(swapped, SPACING)
    assert fast_rep["removed_fragments"] > pp._MANY  # the whole-array path was taken
    monkeypatch.setattr(pp, "_MANY", 10 ** 9)
    loop_out, loop_rep = clean_labels(swapped, SPACING)
    assert np.array_equal(fast_out, loop_out) and fast_rep == loop_rep
    assert fast_rep["swapped"] and fast_rep["relabelled_fragments"] >= 1
    # Specks far from the bones are gone; the bones and the fibula piece are back in place.
    ref = _bones()
    ref[26:28][ref[26:28] == 2] = 0
    assert np.array_equal(fast_out[ref > 0], ref[ref > 0])
    far = ndi.distance_transform_edt(ref == 0, sampling=SPACING[::-1]) > 6.0
    assert not fast_out[far].any()
    expected = {name: round(int(np.count_nonzero(fast_out == v)) * float(np.prod(SPACING))
                            / 1000, 4) for v, name in ((1, "tibia"), (2, "fibula"))}
    assert fast_rep["volumes_ml"] == expected


def test_both_legs_keep_their_labels():
    """Both legs in view: the second leg's tibia lies next to the larger fibula (its own leg's),
    yet it stays tibia, and both fibulae stay fibula."""
    from AnkleFractureLib.segmentation.postprocess import clean_labels

    lab = np.zeros((30, 60, 140), np.uint8)
    lab[:, 10:40, 10:40] = 1   # leg A tibia
    lab[:, 42:48, 44:50] = 2   # leg A fibula (small)
    lab[:, 12:40, 80:108] = 1  # leg B tibia (a little smaller than A's)
    lab[:, 40:50, 110:120] = 2  # leg B fibula (the largest fibula: the main one)
    out, rep = clean_labels(lab, (1.0, 1.0, 1.0))
    assert np.array_equal(out, lab), rep["notes"]
    assert rep["relabelled_fragments"] == 0 and rep["removed_fragments"] == 0


def _dim_legs_scene() -> tuple:
    """Labels and CT of both legs in a dim scan (soft kernel, thin metaphyseal cortex): each
    bone a 600 HU core in a 1-voxel rim at 1050 HU (leg A) or 980 HU (leg B), so leg B's tibia
    has under 5 % of its voxels at 1000 HU (no cortex by rule 5's test), and a cast piece
    labelled fibula (500 HU) against air beside leg B."""
    lab = np.zeros((30, 60, 150), np.uint8)
    ct = np.full(lab.shape, -1000.0, np.float32)
    ct[:, 2:58, 2:128] = 40.0
    lab[:, 10:40, 10:40] = 1   # leg A tibia
    lab[:, 42:48, 44:50] = 2   # leg A fibula (small)
    lab[:, 12:40, 80:108] = 1  # leg B tibia (a little smaller than A's)
    lab[:, 40:50, 110:120] = 2  # leg B fibula (the largest fibula: the main one)
    for value, rim in ((1, 1050.0), (2, 1050.0)):
        mask = lab == value
        inner = ndi.binary_erosion(mask, iterations=1)
        ct[mask], ct[mask & ~inner] = 600.0, rim
    leg_b = np.zeros(lab.shape, bool)
    leg_b[:, :, 75:] = True
    ct[leg_b & (ct == 1050.0)] = 980.0
    cast = (slice(0, 30), slice(10, 50), slice(128, 133))
    lab[cast], ct[cast] = 2, 500.0
    return lab, ct, cast


def test_the_other_leg_of_a_dim_scan_is_a_leg_not_a_cast() -> None:
    """Rule 7's second leg, amended (docs/seg_v2/rule10b.json): leg B's tibia has no cortex by
    rule 5's absolute test, yet its 99th-percentile HU is that of leg A's tibia, so both legs
    are cleaned on their own and keep their labels (before, leg B's tibia became a fragment of
    the larger fibula, and leg A's fibula took the tibia's label). The cast beside leg B still
    leaves the labels, and the merged report keeps its note. A splint as bright as the tibia
    but thin (rule10b.json), and a thick piece at 40 % of the tibia's HU, are no leg."""
    from AnkleFractureLib.segmentation.postprocess import SECOND_LEG_HU_RATIO, \
        SECOND_LEG_THICK_MM, _components, _has_cortex, _thickness_mm

    lab, ct, cast = _dim_legs_scene()
    b = _components(lab, 1)[1]
    assert not _has_cortex(b, ct)  # the absolute test alone would call it a cast
    out, rep = clean_labels(lab, (1.0, 1.0, 1.0), ct_hu=ct)
    assert rep.get("legs") == 2, rep["notes"]
    expected = lab.copy()
    expected[cast] = 0
    assert np.array_equal(out, expected), rep["notes"]
    assert any("lying against air" in n for n in rep["notes"])
    assert rep["removed_voxels"] == np.count_nonzero(lab[cast])
    # A splint as bright as leg A's tibia but a thin shell (8 voxels, 4 mm from its surface
    # at most; 13 ml, half of the tibia) is no second leg ...
    splint_lab, splint_ct = lab.copy(), ct.copy()
    splint_lab[:, :, 75:] = 0
    splint_lab[:, 2:58, 80:88] = 1
    splint_ct[:, 2:58, 80:88] = 600.0
    splint_ct[:, 2:58, 80] = 980.0                # no cortex by rule 5, 0.93 of the tibia
    assert _thickness_mm(_components(splint_lab, 1)[1], np.ones(3)) < SECOND_LEG_THICK_MM
    _, rep = clean_labels(splint_lab, (1.0, 1.0, 1.0), ct_hu=splint_ct)
    assert "legs" not in rep, rep["notes"]
    # ... nor is a piece as large and thick as leg B's tibia at 40 % of leg A's HU.
    ct[:, 12:40, 80:108] = 0.4 * 1050.0
    assert 0.4 < SECOND_LEG_HU_RATIO
    _, rep = clean_labels(lab, (1.0, 1.0, 1.0), ct_hu=ct)
    assert "legs" not in rep


def test_a_large_isolated_piece_beyond_the_tibia_is_a_foot_bone_and_removed() -> None:
    """Rule 4: a metatarsal-sized 'fibula' piece wholly beyond the tibia's distal end (and far
    from both bones) is removed; an equally large isolated piece level with the tibia keeps its
    label (rule 3: a bone the field of view cut in two); a fracture fragment next to the
    fibula's tip, beyond the tibia's end, keeps its label too."""
    from AnkleFractureLib.segmentation.postprocess import BEYOND_TIBIA_MM

    lab = np.zeros((130, 60, 90), np.uint8)  # 1 mm voxels, z down the array = distal
    lab[10:80, 20:40, 20:40] = 1             # tibia, distal end at z 79
    lab[10:95, 24:36, 48:60] = 2             # fibula (12.2 ml), 15 mm beyond the tibia
    lab[97:100, 24:36, 48:60] = 2            # Weber A fragment 2 mm below the fibula's tip
    foot = (slice(80 + int(BEYOND_TIBIA_MM) + 15, 128), slice(20, 40), slice(5, 25))
    lab[foot] = 2                            # 20 x 20 x 23 = 9.2 ml, 25 mm beyond the tibia
    level = (slice(30, 50), slice(20, 40), slice(72, 90))
    lab[level] = 2                           # 7.2 ml, 13 mm from the fibula, level with the tibia
    out, rep = clean_labels(lab, (1.0, 1.0, 1.0))
    assert not out[foot].any()
    assert (out[level] == 2).all() and (out[97:100, 24:36, 48:60] == 2).all()
    assert any("beyond the end of the tibia" in n for n in rep["notes"])


def test_a_large_isolated_piece_without_cortex_is_a_cast_and_removed() -> None:
    """Rule 5: a splint-like 'tibia' plate beside the leg (far from both bones, 600 HU, nearly
    as large as the tibia, so without the CT it would pass for a second leg) is removed when
    the CT is given; the same plate at cortical density keeps its label, and so does the plate
    when no CT is given; the bones themselves are untouched."""
    from AnkleFractureLib.segmentation.postprocess import CORTEX_HU

    lab = np.zeros((80, 70, 90), np.uint8)
    lab[5:75, 20:40, 20:40] = 1                # tibia
    lab[5:75, 24:34, 48:58] = 2                # fibula
    splint = (slice(10, 60), slice(55, 62), slice(10, 80))
    lab[splint] = 1                            # 50 x 7 x 70 = 24.5 ml, 15 mm behind the bones
    ct = np.full(lab.shape, 40.0, np.float32)
    ct[lab > 0] = CORTEX_HU + 500.0
    ct[splint] = 600.0
    out, rep = clean_labels(lab, (1.0, 1.0, 1.0), ct_hu=ct)
    assert not out[splint].any()
    assert (out[5:75, 20:40, 20:40] == 1).all() and (out[5:75, 24:34, 48:58] == 2).all()
    assert any("without cortical bone" in n for n in rep["notes"])
    kept, _ = clean_labels(lab, (1.0, 1.0, 1.0))
    assert np.count_nonzero(kept[splint]) > 0.9 * kept[splint].size  # a "second leg"
    ct[splint] = CORTEX_HU + 500.0
    dense, _ = clean_labels(lab, (1.0, 1.0, 1.0), ct_hu=ct)
    assert np.count_nonzero(dense[splint]) > 0.9 * dense[splint].size
    with pytest.raises(ValueError, match="ct_hu has shape"):
        clean_labels(lab, (1.0, 1.0, 1.0), ct_hu=ct[:-1])


def test_metal_is_taken_out_of_the_labels() -> None:
    """Rule 0: a plate on the fibula (3000 HU, 2 voxels thick, labelled fibula as a network
    does) and a screw through the tibia leave the labels with their 1-voxel rim; the bone
    beside them keeps its label; without the CT nothing changes."""
    from AnkleFractureLib.segmentation.postprocess import METAL_HU

    lab = np.zeros((60, 60, 80), np.uint8)
    lab[5:55, 15:40, 10:35] = 1                # tibia
    lab[5:55, 20:30, 45:55] = 2                # fibula
    plate = (slice(15, 45), slice(20, 30), slice(55, 57))
    lab[plate] = 2                             # the plate, labelled fibula
    screw = (slice(30, 32), slice(26, 28), slice(10, 35))
    ct = np.full(lab.shape, 40.0, np.float32)
    ct[lab > 0] = 1500.0
    ct[plate] = ct[screw] = METAL_HU + 500.0
    out, rep = clean_labels(lab, (1.0, 1.0, 1.0), ct_hu=ct)
    assert not out[plate].any() and not out[screw].any()
    assert (out[5:55, 20:30, 45:54] == 2).all()   # the fibula but its rim next to the plate
    assert not out[15:45, 20:30, 54].any()
    assert np.count_nonzero(out == 1) > 0.95 * np.count_nonzero(lab == 1)
    assert rep["metal_voxels"] > 0 and any("metal taken out" in n for n in rep["notes"])
    same, rep0 = clean_labels(lab, (1.0, 1.0, 1.0))
    assert np.array_equal(same, lab) and "metal_voxels" not in rep0


def _cast_scene() -> tuple:
    """Labels and CT (1 mm voxels, z, y, x) of a leg in a cast whose side the network called
    fibula: the 'fibula' cast piece (15 ml, 500 HU, air on both sides) is larger than the true
    fibula (2.8 ml, 8 mm from the tibia, 28 mm from the cast)."""
    lab = np.zeros((60, 80, 100), np.uint8)
    ct = np.full(lab.shape, -1000.0, np.float32)
    ct[:, 10:70, 10:80] = 40.0                 # the leg's soft tissue
    lab[5:55, 20:45, 15:40] = 1                # tibia
    lab[5:55, 28:36, 48:55] = 2                # fibula
    ct[lab > 0] = 1500.0
    cast = (slice(5, 55), slice(10, 70), slice(83, 88))
    lab[cast] = 2
    ct[cast] = 500.0
    return lab, ct, cast


def test_a_cast_larger_than_the_fibula_is_not_taken_for_it() -> None:
    """Rule 6: without the CT the cast is the main 'fibula' and the true fibula, a smaller
    component nearer the tibia, takes the tibia's label (two real-shape trauma scans were
    refused so); with the CT the cast, cortex-free against air, leaves the labels first and the
    fibula keeps its label. A cortex-free piece inside the leg (cancellous bone labelled apart
    from its cortex) is not touched by the rule."""
    lab, ct, cast = _cast_scene()
    fibula = (slice(5, 55), slice(28, 36), slice(48, 55))
    blind, _ = clean_labels(lab, (1.0, 1.0, 1.0))
    assert (blind[fibula] == 1).all() and (blind[cast] == 2).all()
    out, rep = clean_labels(lab, (1.0, 1.0, 1.0), ct_hu=ct)
    assert not out[cast].any()
    assert (out[fibula] == 2).all() and (out[5:55, 20:45, 15:40] == 1).all()
    assert any("lying against air" in n for n in rep["notes"])
    inner = (slice(20, 35), slice(28, 38), slice(58, 66))  # 1.2 ml, 300 HU, 14 mm from air
    lab[inner], ct[inner] = 1, 300.0
    kept, rep = clean_labels(lab, (1.0, 1.0, 1.0), ct_hu=ct)
    assert np.count_nonzero(kept[inner]) == kept[inner].size  # kept (as a fibula fragment)
    assert not kept[cast].any()


def test_a_cast_without_air_around_it_is_left_to_the_other_rules() -> None:
    """Rule 6 needs air beside the piece: the same cast surrounded by soft tissue is kept as
    the main 'fibula' (what rule 5 and the network's training must then handle)."""
    lab, ct, cast = _cast_scene()
    ct[ct < -500] = 40.0
    out, rep = clean_labels(lab, (1.0, 1.0, 1.0), ct_hu=ct)
    assert (out[cast] == 2).all()
    assert not any("lying against air" in n for n in rep["notes"])


def test_a_cortex_free_piece_against_dark_voxels_beside_metal_is_not_a_cast() -> None:
    """Rule 6 spares a piece within reach of metal: a plated fibula whose cortex the plate's
    streaks hide and whose surroundings they darken reads as a cast by cortex and air alone
    (a real-shape phantom's plated fibula was removed so, and the scan refused); a cast lies
    outside the skin, never against an implant. Farther from the metal, the rule applies."""
    lab, ct, cast = _cast_scene()
    plate = (slice(10, 50), slice(30, 40), slice(89, 91))  # 1 voxel from the piece, rule 0
    ct[plate] = 3000.0
    out, rep = clean_labels(lab, (1.0, 1.0, 1.0), ct_hu=ct)
    assert np.count_nonzero(out[cast] == 2) > 0.8 * out[cast].size  # kept, minus rule 0's rim
    assert not any("lying against air" in n for n in rep["notes"])
    ct[plate] = -1000.0
    far = (slice(10, 50), slice(30, 40), slice(96, 98))  # 8 mm from the piece
    ct[far] = 3000.0
    out, rep = clean_labels(lab, (1.0, 1.0, 1.0), ct_hu=ct)
    assert not out[cast].any() and any("lying against air" in n for n in rep["notes"])


def _foot_scene() -> tuple:
    """1 mm voxels, array z running distally: a tibia (28 ml, lowest voxel z 79), a thin
    fibula 3 mm beside it (3.9 ml) and a larger piece labelled fibula (16.8 ml) 9 mm below the
    tibia's end and 14 mm from the fibula: a calcaneus the network called fibula."""
    lab = np.zeros((125, 60, 90), np.uint8)
    lab[10:80, 20:40, 20:40] = 1
    fibula = (slice(10, 80), slice(24, 32), slice(43, 50))
    foot = (slice(88, 116), slice(15, 45), slice(10, 30))
    lab[fibula], lab[foot] = 2, 2
    return lab, fibula, foot


def test_a_foot_bone_larger_than_the_fibula_is_not_taken_for_it() -> None:
    """Rule 7: without the superior direction the foot piece is the main 'fibula' and the true
    fibula, nearer the tibia, takes the tibia's label; with it, the fibula that comes down
    from above the ankle is the main one and keeps its label, whichever way the array runs."""
    lab, fibula, foot = _foot_scene()
    blind, _ = clean_labels(lab, (1.0, 1.0, 1.0))
    assert (blind[fibula] == 1).all() and (blind[foot] == 2).all()
    out, rep = clean_labels(lab, (1.0, 1.0, 1.0), superior_zyx=(-1.0, 0.0, 0.0))
    assert (out[fibula] == 2).all() and (out[10:80, 20:40, 20:40] == 1).all()
    assert any("comes down from above the ankle" in n for n in rep["notes"])
    assert not out[foot].any()  # rule 8: apart from both bones, below the ankle
    flipped, _ = clean_labels(lab[::-1], (1.0, 1.0, 1.0), superior_zyx=(2.0, 0.0, 0.0))
    assert np.array_equal(flipped[::-1], out)
    # Told the wrong way up, the foot piece is 'above' and nothing changes from the blind run.
    upside, _ = clean_labels(lab, (1.0, 1.0, 1.0), superior_zyx=(1.0, 0.0, 0.0))
    assert np.array_equal(upside, blind)


def test_a_foot_bone_labelled_tibia_is_not_the_other_leg() -> None:
    """Rule 7: a 'tibia' piece of 40 % of the tibia's volume lying below the ankle was taken
    for the other leg's tibia and the one leg cut in two; with the superior direction it is
    not, while a second tibia that comes down from above still is the other leg."""
    lab = np.zeros((120, 60, 180), np.uint8)
    lab[10:80, 20:40, 20:40] = 1
    lab[10:80, 24:32, 43:50] = 2
    lab[85:115, 15:45, 45:70] = 1                     # 22.5 ml below the tibia's end
    up = (-1.0, 0.0, 0.0)
    _, blind = clean_labels(lab, (1.0, 1.0, 1.0))
    assert blind.get("legs") == 2
    _, rep = clean_labels(lab, (1.0, 1.0, 1.0), superior_zyx=up)
    assert "legs" not in rep
    lab[5:75, 20:40, 130:150] = 1                     # the other leg's tibia, from above
    lab[5:75, 24:32, 153:160] = 2
    _, rep = clean_labels(lab, (1.0, 1.0, 1.0), superior_zyx=up)
    assert rep.get("legs") == 2


def test_a_superior_direction_without_length_is_refused() -> None:
    with pytest.raises(ValueError, match="superior_zyx"):
        clean_labels(_bones(), SPACING, superior_zyx=(0.0, 0.0, 0.0))


def test_a_piece_apart_from_both_bones_below_the_ankle_is_a_foot_bone() -> None:
    """Rule 8: with the superior direction, a 'tibia' piece 8 mm from both bones whose top
    lies below the ankle (a calcaneus beside the talus, not beyond the tibia's end along its
    axis) is removed; a fracture fragment 2 mm below the fibula's tip stays, and so does a
    piece apart from the bones with metal beside it (a bit of plated bone rule 0 cut off)."""
    lab = np.zeros((120, 70, 90), np.uint8)
    lab[10:80, 20:40, 20:40] = 1                        # tibia, lowest voxel z 79
    lab[10:90, 24:32, 43:50] = 2                        # fibula, tip z 89
    frag = (slice(92, 96), slice(24, 32), slice(43, 50))
    foot = (slice(70, 95), slice(48, 60), slice(20, 40))  # 8 mm behind the tibia, top z 70
    lab[frag], lab[foot] = 2, 1
    up = (-1.0, 0.0, 0.0)
    blind, _ = clean_labels(lab, (1.0, 1.0, 1.0))
    assert (blind[foot] == 1).all()
    out, rep = clean_labels(lab, (1.0, 1.0, 1.0), superior_zyx=up)
    assert not out[foot].any() and (out[frag] == 2).all()
    assert (out[10:80, 20:40, 20:40] == 1).all() and (out[10:90, 24:32, 43:50] == 2).all()
    assert any("below the ankle and apart from both bones" in n for n in rep["notes"])
    ct = np.zeros(lab.shape, np.float32)
    ct[lab > 0] = 1500.0
    ct[80:85, 61:63, 25:35] = 3000.0                    # a screw 1 mm behind the piece
    kept, _ = clean_labels(lab, (1.0, 1.0, 1.0), superior_zyx=up, ct_hu=ct)
    assert (kept[foot] == 1).all()


def test_a_fibula_broken_low_keeps_its_distal_piece_as_the_main_one() -> None:
    """Rule 7's exception: the larger fibula piece lies low (its top 8 mm above the tibia's
    end) but in the tibia's notch, 3 mm from it, and the piece above it is 7 mm away (a
    plate the network labelled with the bone, cut out by rule 0): it is the distal fibula,
    not a foot bone, and stays the main fibula; both pieces keep the fibula's label."""
    lab = np.zeros((125, 60, 90), np.uint8)
    lab[10:80, 20:40, 20:40] = 1
    distal = (slice(71, 100), slice(22, 34), slice(43, 56))   # 4.5 ml, top z 71
    upper = (slice(10, 64), slice(26, 32), slice(50, 56))     # 1.9 ml, 7 mm above it
    lab[distal], lab[upper] = 2, 2
    out, rep = clean_labels(lab, (1.0, 1.0, 1.0), superior_zyx=(-1.0, 0.0, 0.0))
    assert (out[distal] == 2).all() and (out[upper] == 2).all(), rep["notes"]
    assert not any("comes down from above the ankle" in n for n in rep["notes"])


def _foot_scan() -> tuple:
    """1 mm voxels, array z superior: a foot scan. Three parallel 'metatarsals' (8 x 8 mm
    tubes of cortex, z 10-59) labelled tibia, one labelled fibula, and unlabelled tarsal
    bones above them up to the top of the scan (z 70-99). (labels, CT in HU)."""
    lab = np.zeros((100, 60, 80), np.uint8)
    ct = np.full(lab.shape, 40.0)
    for x0, value in ((10, 1), (25, 1), (40, 1), (55, 2)):
        lab[10:60, 26:34, x0:x0 + 8] = value
        ct[10:60, 26:34, x0:x0 + 8] = 1300.0
    ct[70:100, 15:45, 10:65] = 1200.0
    return lab, ct


def test_foot_bones_labelled_tibia_and_fibula_in_a_foot_scan_are_removed() -> None:
    """Rule 9: a main 'tibia' with no cross-section of a distal tibia (0.64 cm^2 here) that
    ends far below the top of the bone in view (40 mm) is a foot bone: every label goes, the
    report says why; without the CT or the superior direction nothing is judged."""
    lab, ct = _foot_scan()
    out, rep = clean_labels(lab, (1.0, 1.0, 1.0), ct_hu=ct, superior_zyx=(1.0, 0.0, 0.0))
    assert not out.any()
    assert [{k: v for k, v in r.items() if k != "note"} for r in rep["not_a_leg"]] == [
        {"tibia_ml": 3.2, "section_cm2": 0.64, "below_top_mm": 40.0}]
    assert rep["not_a_leg"][0]["note"] in rep["notes"]
    assert rep["volumes_ml"] == {"tibia": 0.0, "fibula": 0.0}
    assert rep["removed_voxels"] == int(np.count_nonzero(lab))
    assert any("no distal tibia" in n for n in rep["notes"])
    for kwargs in ({"ct_hu": ct}, {"superior_zyx": (1.0, 0.0, 0.0)}):
        kept, rep = clean_labels(lab, (1.0, 1.0, 1.0), **kwargs)
        assert kept.any() and "not_a_leg" not in rep


def test_a_thin_tibia_reaching_the_top_or_a_wide_one_ending_low_keeps_its_labels() -> None:
    """Rule 9 needs both tests to fail: a thin 'tibia' (a blob the network labelled inside the
    bone) that runs out of the top of the scan is kept, and so is a tibia ending 40 mm below
    the top of the bone (a knee in view) whose section is that of a distal tibia (9 cm^2)."""
    lab, ct = _foot_scan()
    up = (1.0, 0.0, 0.0)
    lab[60:100, 26:34, 10:18] = 1          # the first tube now runs out of the top
    ct[60:100, 26:34, 10:18] = 1300.0
    out, rep = clean_labels(lab, (1.0, 1.0, 1.0), ct_hu=ct, superior_zyx=up)
    assert "not_a_leg" not in rep and (out[10:100, 26:34, 10:18] == 1).all()
    lab, ct = _foot_scan()
    lab[20:60, 10:40, 5:35] = 1            # 30 x 30 mm: a distal tibia's section
    ct[20:60, 10:40, 5:35] = 1300.0
    out, rep = clean_labels(lab, (1.0, 1.0, 1.0), ct_hu=ct, superior_zyx=up)
    assert "not_a_leg" not in rep and (out[20:60, 10:40, 5:35] == 1).all()


def test_a_foot_scan_with_both_feet_loses_the_labels_of_each() -> None:
    """Rule 9 runs per leg: two feet side by side, each with a large 'tibia' tube (both
    legs in view by size), each leg's labels removed and reported with its leg number."""
    lab, ct = _foot_scan()
    lab[10:60, 26:34, 10:18] = 0
    lab[10:60, 20:40, 10:20] = 1           # 10 ml 'tibia', 2 cm^2 section
    twin = np.concatenate([lab, np.zeros_like(lab), lab], axis=2)
    twin_ct = np.concatenate([ct, np.full_like(ct, 40.0), ct], axis=2)
    out, rep = clean_labels(twin, (1.0, 1.0, 1.0), ct_hu=twin_ct, superior_zyx=(1.0, 0.0, 0.0))
    assert rep.get("legs") == 2 and not out.any()
    assert sorted(r["leg"] for r in rep["not_a_leg"]) == [1, 2]
