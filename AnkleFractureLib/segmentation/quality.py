"""A label-free quality check of a tibia/fibula label map: does it match the bone the CT shows?

No ground truth is needed. Above the ankle joint the leg holds exactly two bones, so on an
axial slice of the CT there the bone (voxels above :data:`BONE_HU`, holes filled per slice so
that the marrow inside the cortex counts as bone) shows exactly two cross-sections: a large one,
the tibia, and a small one, the fibula. On every such slice the label map's tibia (1) and fibula
(2) are compared with these two cross-sections (Dice per bone and slice). Slices that show
anything else (the talus and malleoli, foot bones, both legs, a fracture fragment, tibia and
fibula touching) are skipped rather than guessed at, and only slices of the leg count: the
longest run of such slices (a foot's talus beside the lateral malleolus, or talus over
calcaneus, also shows two sections), whose larger section lies in the tibia's 3D piece of bone
(see :func:`_leg_slices`). Two whole-scan measures add what the two-bone slices cannot see:

* ``label_off_bone``: the share of labelled voxels that lie on no bone at all (a label shifted
  off the bone, or spread into soft tissue);
* ``label_on_other_bone``: the share of labelled bone voxels that lie on bone *not connected*
  (in 3D, on the working grid, after a one-voxel erosion) to the leg's tibia and the sections
  beside it: foot bones, the talus or the other leg labelled as tibia or fibula. Joint spaces
  (2-4 mm) separate the talus from the tibia; where a joint is narrower than the working grid
  resolves, the talus is taken for tibia, which can hide such a mistake but never raises a
  false alarm.

The level is "low" when a bone's mean Dice (whole scan or distal part) is below
:data:`MIN_DICE_TIBIA` / :data:`MIN_DICE_FIBULA`, more than :data:`MAX_POOR_FRACTION` of the
slices disagree, or too many labels lie on no bone / other bone; "not_assessable" when fewer
than :data:`MIN_SLICES` leg slices are found (then only labels on no bone can make it "low").
Measured on fast phantoms: correct labels of 80 (16 seeds, all classes and sides) score
0.95-0.97 (tibia) and 0.91-0.95 (fibula) mean Dice, none low. Of 24 corrupted per kind
(``Testing/test_seg_quality.py``'s corruptions, 12 seeds), all are low when shifted 5 mm
(0.74-0.82 / 0.52-0.62), eroded to a core (0.50-0.74 / 0.58-0.75), swapped on 30 % of the
slices (29-32 % poor slices) or grown 3 voxels (20-33 % on no bone); with the foot bones
labelled 21 are low (10-34 % on other bone) and 3 pass, where the talus joins the tibia at the
working grid's resolution. A 3 mm shift is at the edge (fibula 0.72-0.78), 2 mm passes.

On real bone shapes (the ``vh`` phantom family: thin metaphyseal cortex, fatty marrow,
splints and casts, both legs in some scans) it was calibrated with
``scripts/seg_quality_calibration.py`` on 48 validation phantoms (24 analytic, 24 real-shape):
no correct label map is low; sections cut by the working box's edge (a splint, a cast, the
other leg) are left out rather than spoiling their slice, and with both legs labelled only the
leg of the largest tibia is assessed, which took the real-shape scans that could not be
assessed from 25 % to 4 %. Foot bones labelled as leg are *not* reliably caught on real shapes
(2 of 24): their joints with the talus and the tibia close at the working grid's resolution.
The figures: ``docs/seg_quality/README.md``.

Geometry: the slices are those of the CT's grid across the index axis closest to the patient's
superior-inferior axis (LPS z); numpy arrays are (z, y, x). A leg tilted by 20-30 degrees
still cuts each slice in two cross-sections, and the label map is compared on the very same
slices, so nothing is resampled. The work is done on a subsampled grid (at most
:data:`PITCH_MM` in-plane and :data:`AXIAL_PITCH_MM` between slices, coarser in-plane beyond
:data:`MAX_WORK_VOXELS`) restricted to the labelled leg's in-plane bounding box plus
:data:`MARGIN_MM` (which also keeps the other leg out of view) over the whole length of the
scan: a clinical 512 x 512 x 380 CT (0.33 x 0.33 x 0.66 mm) takes about 0.2 s.

The distal part, :data:`DISTAL_MM` above the lowest two-bone slice, is reported on its own: the
lowest slice with two separate cross-sections lies just above the tibiofibular contact at the
incisura, so this is the syndesmosis region the Weber class is read from (the crop covers 0-60
mm above the plafond).

Example:
    >>> lab = np.zeros((40, 60, 60), np.uint8)
    >>> lab[:, 10:40, 10:40] = 1; lab[:, 20:30, 46:54] = 2
    >>> ct = Volume(np.where(lab > 0, 1200, 0).astype(np.int16))
    >>> q = label_free_agreement(ct, Volume(lab))
    >>> q["level"], q["slices"], q["dice_tibia_mean"], q["dice_fibula_mean"]
    ('ok', 40, 1.0, 1.0)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from AnkleFractureLib.geometry.volume import Volume
# Metal (HU at or above this) is not bone: the segmentation's post-processing takes it out of
# the labels (rule 0), so the check leaves it out of the bone too, with one threshold.
from AnkleFractureLib.segmentation.postprocess import METAL_HU

TIBIA, FIBULA = 1, 2

#: HU above which a voxel is bone (cortical bone is 1000-2000 HU, soft tissue below 100 HU;
#: marrow and thin trabecular bone are counted through the per-slice hole filling instead).
BONE_HU = 250.0
#: Largest in-plane / between-slice spacing (mm) of the working grid (strides of the CT's grid).
#: 0.8 mm keeps a 1 mm cortex closed; 1.5 mm keeps a 3 mm joint space open.
PITCH_MM, AXIAL_PITCH_MM = 0.8, 1.5
#: The working grid is subsampled further above this many voxels (speed on huge scans).
MAX_WORK_VOXELS = 4_000_000
#: In-plane margin (mm) around the labelled bones: a label shifted by up to ~15 mm still sees
#: its bone; the other leg (bones 80+ mm apart) stays out.
MARGIN_MM = 20.0
#: With both legs labelled, labels farther (mm, in-plane) than this from the largest tibia piece's
#: box belong to the other leg (a fibula lies within ~35 mm of its tibia; legs 80+ mm apart).
LEG_REACH_MM = 40.0
#: Cross-sections smaller than this (mm^2) are ignored (vessel calcifications, noise, specks).
MIN_SECTION_MM2 = 15.0
#: Plausible cross-section areas (mm^2) above the ankle: the tibia 1-25 cm^2 (a child's shaft
#: to an adult metaphysis), the fibula 0.3-6 cm^2, and the fibula 0.08-0.6 of the tibia
#: (0.15-0.45 on the phantoms; 0.25 on an adult shaft, 0.2 at the plafond). A foot bone beside
#: a sesamoid or a calcification (0.01-0.08 on the Visible Human feet) is not a leg.
TIBIA_MM2, FIBULA_MM2, AREA_RATIO = (100.0, 2500.0), (30.0, 600.0), (0.08, 0.6)
#: Centres of the two cross-sections farther apart (mm) than this are not one leg's bones.
MAX_CENTRE_DISTANCE_MM = 60.0
#: Two-bone slices farther apart (mm) than this along the leg are not one run: the malleolar
#: slices between the leg and a talus-beside-malleolus run span 7-10 mm on the phantoms and
#: 15+ mm in patients. (A fracture that interrupts the leg's run costs its shorter part.)
MAX_GAP_MM = 5.0
#: A run of two-bone slices this long (mm) is a leg even when the bones end inside the scan
#: (a knee in view); no pair of foot bones runs side by side this far.
LONG_RUN_MM = 60.0
#: Share of a tibia section's bone voxels (HU > :data:`BONE_HU`) that must lie in the tibia's
#: 3D piece (marrow specks and a few bridging voxels aside).
PURITY = 0.9
#: A shorter run must reach this close (mm) to the top of the scan.
TOP_MM = 5.0
#: Fewer two-bone slices than this, or spanning less (mm), cannot be assessed.
MIN_SLICES, MIN_SPAN_MM = 8, 10.0
#: Length (mm) of the distal part above the lowest two-bone slice (see the module docstring).
DISTAL_MM = 60.0
#: Agreement below these mean Dice values (tibia, fibula; whole scan or distal part; the means
#: leave out the worst :data:`MAX_POOR_FRACTION` of the slices) is low.
#: Correct phantom labels score >= 0.95 / 0.90 (the fibula is small, so its thresholded outline
#: costs more Dice); a label shifted by 5 mm or eroded to a core drops below.
MIN_DICE_TIBIA, MIN_DICE_FIBULA = 0.85, 0.75
#: A slice is poor when either bone's Dice is below this; low above this share of poor slices.
POOR_SLICE_DICE, MAX_POOR_FRACTION = 0.5, 0.15
#: Low when more than this share of labelled voxels lies on no bone / on another bone. Correct
#: labels put at most 2.6 % on no bone on 48 validation phantoms (grown 3 voxels: 16-38 %), but
#: 12 % on a held-out real-shape scan from the knee to the foot (the thin cortex of the
#: proximal tibia does not close), so 0.1, fitted on the validation set, was not kept.
MAX_OFF_BONE, MAX_OTHER_BONE = 0.2, 0.05


@dataclass
class _Grid:
    """The working grid: the CT and the labels on the labelled leg's box, long axis first."""

    hu: np.ndarray          # (n, rows, cols) HU, a strided view of the CT
    label: np.ndarray       # (n, rows, cols) label values, the same view of the label map
    pitch: Tuple[float, float, float]  # mm between samples along (long, rows, cols)
    up: float               # +1 when the working index grows towards superior, else -1


def label_free_agreement(ct: Volume, label: Volume) -> Dict[str, Any]:
    """How well a label map agrees with the bone of its CT, without any ground truth.

    Args:
        ct: The CT (HU), any direction matrix; numpy (z, y, x).
        label: The label map (0 background, 1 tibia, 2 fibula) on exactly the CT's grid, one
            leg (other values are ignored).

    Returns:
        A dict of plain JSON values: ``level`` ("ok", "low" or "not_assessable"),
        ``assessable``, ``problems`` (plain-language reasons for "low"), ``reason`` (why not
        assessable, else ""), ``slices`` (two-bone slices used) and ``span_mm``,
        ``dice_tibia_mean`` / ``_median``, ``dice_fibula_mean`` / ``_median``,
        ``distal_slices``, ``dice_tibia_distal`` / ``dice_fibula_distal`` (trimmed means over the
        :data:`DISTAL_MM` above the lowest two-bone slice), ``poor_slice_fraction``,
        ``swapped_slices``, ``label_off_bone``, ``label_on_other_bone`` (shares of the
        labelled voxels), ``bone_hu`` and ``seconds``. Dice values are None when not
        assessable.
    """
    t0 = time.perf_counter()
    out: Dict[str, Any] = {"level": "not_assessable", "assessable": False, "problems": [],
                           "reason": "", "slices": 0, "span_mm": 0.0, "bone_hu": BONE_HU}
    for key in ("dice_tibia_mean", "dice_tibia_median", "dice_fibula_mean",
                "dice_fibula_median", "dice_tibia_distal", "dice_fibula_distal"):
        out[key] = None
    out.update(distal_slices=0, poor_slice_fraction=None, swapped_slices=0,
               label_off_bone=None, label_on_other_bone=None)
    grid = _working_grid(ct, label) if label.same_geometry(ct, atol=1e-3) else None
    if grid is None:
        out["reason"] = ("the label map is not on the CT's grid" if not label.same_geometry(
            ct, atol=1e-3) else "no tibia or fibula labelled")
    else:
        _measure(grid, out)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def _working_grid(ct: Volume, label: Volume) -> Optional[_Grid]:
    """Strided views of the CT and labels on the labelled box, the long axis first."""
    a = int(np.argmax(np.abs(ct.direction[2])))  # ITK index axis closest to superior
    long_np = 2 - a
    sp_np = [float(ct.spacing[2 - n]) for n in range(3)]  # spacing per numpy axis
    box = _label_box(label.array, sp_np, long_np)
    if box is None:
        return None
    strides = [max(1, int((AXIAL_PITCH_MM if n == long_np else PITCH_MM) / sp_np[n]))
               for n in range(3)]
    slices = []
    for n in range(3):
        if n == long_np:  # the whole length: unlabelled bone above / below counts too
            lo, hi = 0, ct.array.shape[n]
        else:
            m = int(np.ceil(MARGIN_MM / sp_np[n]))
            lo, hi = max(0, box[n][0] - m), min(ct.array.shape[n], box[n][1] + m)
        slices.append((lo, hi))
    n_vox = np.prod([(hi - lo) / s for (lo, hi), s in zip(slices, strides)])
    if n_vox > MAX_WORK_VOXELS:  # coarser in-plane only: the slices must resolve the joints
        f = np.sqrt(n_vox / MAX_WORK_VOXELS)
        strides = [s if n == long_np else int(np.ceil(s * f)) for n, s in enumerate(strides)]
    view = tuple(slice(lo, hi, s) for (lo, hi), s in zip(slices, strides))
    hu = np.moveaxis(ct.array[view], long_np, 0)
    lab = np.moveaxis(label.array[view], long_np, 0)
    others = [n for n in range(3) if n != long_np]
    pitch = (sp_np[long_np] * strides[long_np], sp_np[others[0]] * strides[others[0]],
             sp_np[others[1]] * strides[others[1]])
    up = 1.0 if ct.direction[2, a] >= 0 else -1.0
    return _Grid(hu, lab, pitch, up)


def _label_box(arr: np.ndarray, spacing: Sequence[float], long_axis: int
               ) -> Optional[List[Tuple[int, int]]]:
    """Index bounding box [(lo, hi)] per numpy axis of one leg's tibia/fibula labels, or None.

    With both legs labelled, the leg is the one of the largest labelled tibia piece: its
    in-plane box grown by :data:`LEG_REACH_MM` (where its fibula lies) holds the labels kept,
    so the other leg's bones fall outside the working box (or are cut by its edge, and left
    out) instead of making every slice show four sections.

    Args:
        arr: The label map, numpy (z, y, x).
        spacing: Voxel size (mm) per numpy axis.
        long_axis: The numpy axis along the leg.
    """
    step = max(1, int(np.ceil((arr.size / 2_000_000) ** (1.0 / 3.0))))
    sub = arr[::step, ::step, ::step]
    labelled = (sub == TIBIA) | (sub == FIBULA)
    if not labelled.any():
        # A very thin label may fall between the strides: look at every voxel once.
        sub, step = arr, 1
        labelled = (sub == TIBIA) | (sub == FIBULA)
        if not labelled.any():
            return None
    pieces, n = ndimage.label(sub == TIBIA)
    if n > 1:
        sizes = np.bincount(pieces.reshape(-1))[1:]
        leg = ndimage.find_objects(pieces)[int(np.argmax(sizes))]
        reach = [int(np.ceil(LEG_REACH_MM / (spacing[a] * step))) for a in range(3)]
        keep = np.zeros_like(labelled)
        keep[tuple(slice(None) if a == long_axis else
                   slice(max(leg[a].start - reach[a], 0), leg[a].stop + reach[a])
                   for a in range(3))] = True
        labelled &= keep
    idx = np.argwhere(labelled)
    lo, hi = idx.min(axis=0) * step, idx.max(axis=0) * step + step
    return [(int(lo[n]), int(min(arr.shape[n], hi[n]))) for n in range(3)]


def _measure(grid: _Grid, out: Dict[str, Any]) -> None:
    """Fill ``out`` from the working grid (see :func:`label_free_agreement`)."""
    inplane = np.zeros((3, 3, 3), bool)
    inplane[1] = True  # 8-connected within a slice, never across slices
    bone = _filled_bone(grid.hu)
    tib, fib = grid.label == TIBIA, grid.label == FIBULA
    n_lab = int(np.count_nonzero(tib) + np.count_nonzero(fib))
    off = np.count_nonzero(tib & ~bone) + np.count_nonzero(fib & ~bone)
    out["label_off_bone"] = round(float(off) / max(n_lab, 1), 4)
    pairs, sections = _two_bone_slices(bone, grid, inplane)
    if len(pairs):
        leg = _leg_slices(pairs, sections, grid)
        if len(leg):
            _dice(leg, sections, tib, fib, grid, out)
            out["label_on_other_bone"] = _other_bone(bone, sections, pairs, leg, tib | fib,
                                                     inplane)
    _judge(out)


def _filled_bone(hu: np.ndarray) -> np.ndarray:
    """Bone per slice: HU > :data:`BONE_HU`, 1-voxel cortical gaps closed, marrow filled, and
    metal (HU >= :data:`METAL_HU`) with the voxel next to it (its partial-volume rim) left out,
    as the segmentation's post-processing leaves it out of the labels.

    Separable 3 x 3 max / min filters close the gaps and a labelling of the background finds
    the holes (4x faster than ``binary_closing`` and ``binary_fill_holes`` on 4 M voxels).
    """
    metal = hu >= METAL_HU
    near_metal = ndimage.binary_dilation(metal, np.ones((3, 3, 3), bool)) if metal.any() else None
    m = (hu > BONE_HU) if near_metal is None else (hu > BONE_HU) & ~near_metal
    m = m.view(np.uint8)
    m = ndimage.minimum_filter(ndimage.maximum_filter(m, size=(1, 3, 3)), size=(1, 3, 3))
    bone = m.view(bool)
    four = np.zeros((3, 3, 3), bool)
    four[1, 1, :] = four[1, :, 1] = True  # background 4-connected within a slice
    background, n = ndimage.label(~bone, structure=four)
    outside = np.zeros(n + 1, bool)
    outside[0] = True  # the bone itself
    for edge in (background[:, 0], background[:, -1], background[:, :, 0], background[:, :, -1]):
        outside[edge.reshape(-1)] = True
    filled = bone | ~outside[background]  # + background regions enclosed by bone: the marrow
    return filled if near_metal is None else filled & ~near_metal


def _two_bone_slices(bone: np.ndarray, grid: _Grid, inplane: np.ndarray
                     ) -> Tuple[np.ndarray, np.ndarray]:
    """Slices showing exactly two plausible cross-sections.

    Returns:
        (pairs, sections): ``pairs`` (m, 3) int rows (slice, tibia section id, fibula section
        id), ``sections`` the per-slice component map (ids as in ``pairs``).
    """
    sections, n = ndimage.label(bone, structure=inplane)
    if n == 0:
        return np.zeros((0, 3), int), sections
    mm2 = grid.pitch[1] * grid.pitch[2]
    area = np.bincount(sections.reshape(-1), minlength=n + 1)[1:] * mm2
    objs = ndimage.find_objects(sections)
    rows, cols = bone.shape[1:]
    # A section cut by the box's edge is part of something wider than the labelled leg (a
    # splint or cast, the other leg, the table): it is not one of this leg's bones, so it is
    # left out rather than spoiling the slice.
    kept = [i for i in np.flatnonzero(area >= MIN_SECTION_MM2)
            if not (objs[i][1].start == 0 or objs[i][2].start == 0
                    or objs[i][1].stop == rows or objs[i][2].stop == cols)]
    per_slice: Dict[int, List[int]] = {}
    for i in kept:
        per_slice.setdefault(objs[i][0].start, []).append(int(i))
    pairs = []
    for k, ids in per_slice.items():
        if len(ids) != 2:
            continue
        big, small = sorted(ids, key=lambda i: -area[i])
        boxes = [objs[big], objs[small]]
        centres = [np.array([(b[1].start + b[1].stop) * grid.pitch[1],
                             (b[2].start + b[2].stop) * grid.pitch[2]]) / 2 for b in boxes]
        if (TIBIA_MM2[0] <= area[big] <= TIBIA_MM2[1]
                and FIBULA_MM2[0] <= area[small] <= FIBULA_MM2[1]
                and AREA_RATIO[0] <= area[small] / area[big] <= AREA_RATIO[1]
                and np.linalg.norm(centres[0] - centres[1]) <= MAX_CENTRE_DISTANCE_MM):
            pairs.append((k, big + 1, small + 1))
    pairs.sort()
    return np.asarray(pairs, dtype=int).reshape(-1, 3), sections


def _dice(pairs: np.ndarray, sections: np.ndarray, tib: np.ndarray, fib: np.ndarray,
          grid: _Grid, out: Dict[str, Any]) -> None:
    """Per-slice Dice of each label against its cross-section, summarised into ``out``."""
    n = int(sections.max())
    area = np.bincount(sections.reshape(-1), minlength=n + 1)
    tib_in = np.bincount(sections[tib], minlength=n + 1)  # tibia voxels per section
    fib_in = np.bincount(sections[fib], minlength=n + 1)
    k, t, f = pairs[:, 0], pairs[:, 1], pairs[:, 2]
    n_tib, n_fib = tib.sum(axis=(1, 2))[k], fib.sum(axis=(1, 2))[k]
    d_tib = 2.0 * tib_in[t] / (area[t] + n_tib)
    d_fib = 2.0 * fib_in[f] / (area[f] + n_fib)
    height = k * grid.pitch[0] * grid.up  # mm, growing towards superior
    distal = height <= height.min() + DISTAL_MM
    out.update(
        slices=int(len(k)), span_mm=round(float(np.ptp(height)) + grid.pitch[0], 1),
        dice_tibia_mean=round(_trimmed_mean(d_tib), 3),
        dice_tibia_median=round(float(np.median(d_tib)), 3),
        dice_fibula_mean=round(_trimmed_mean(d_fib), 3),
        dice_fibula_median=round(float(np.median(d_fib)), 3),
        distal_slices=int(distal.sum()),
        dice_tibia_distal=round(_trimmed_mean(d_tib[distal]), 3),
        dice_fibula_distal=round(_trimmed_mean(d_fib[distal]), 3),
        poor_slice_fraction=round(float(np.mean(np.minimum(d_tib, d_fib) < POOR_SLICE_DICE)), 3),
        # The labels fit the other bone better than their own.
        swapped_slices=int(np.sum(tib_in[f] + fib_in[t] > tib_in[t] + fib_in[f])))


def _trimmed_mean(values: np.ndarray) -> float:
    """Mean without the worst :data:`MAX_POOR_FRACTION` of the values.

    The poor-slice rule already tolerates that share of disagreeing slices; the means must
    too. Where the joint space closes at the scan's resolution, the lowest slices of the run
    cut the talus beside the lateral malleolus and pass for leg slices (6 of 44 distal slices
    of a real-shape phantom with 1.4 mm slices: a correct tibia label scored 0.80 distal
    Dice, 0.96 without them). A map wrong everywhere (shifted, eroded) stays low.

    Example:
        >>> round(_trimmed_mean(np.array([0.0] + [1.0] * 9)), 3)
        1.0
    """
    v = np.sort(np.asarray(values, float))
    return float(v[int(np.floor(MAX_POOR_FRACTION * len(v))):].mean())


def _leg_slices(pairs: np.ndarray, sections: np.ndarray, grid: _Grid) -> np.ndarray:
    """The two-bone slices that cut the leg's tibia and fibula, not the talus or the foot.

    Runs of two-bone slices are split where they are more than :data:`MAX_GAP_MM` apart (the
    malleolar slices show three sections). The longest run is the leg when it is at least
    :data:`LONG_RUN_MM` long or reaches the top of the scan (within :data:`TOP_MM`): an ankle
    CT's leg goes on above the field of view, while a foot's talus over the calcaneus lies
    below the malleoli, which show three sections (the Visible Human feet). Below the plafond
    a slice through the talus and the lateral malleolus (which reaches ~10 mm lower than the
    medial one) also shows two sections, the larger one the talus, and near the joint the
    filled bone can merge the talar dome with the plafond. So the larger section must lie
    (:data:`PURITY`) in the 3D piece of unfilled bone (HU > :data:`BONE_HU`, 6-connected: the
    joint's cartilage separates) that holds most of the run's larger sections: the tibia.
    The fibula may change pieces: a fracture splits it.

    Args:
        pairs: (m, 3) rows (slice, tibia section, fibula section), sorted by slice.
        sections: The per-slice section map of the filled bone.
        grid: The working grid (HU, slice pitch and direction).

    Returns:
        The kept rows sorted by slice, possibly none.
    """
    height = pairs[:, 0] * grid.pitch[0] * grid.up
    order = np.argsort(-height)  # from the top of the leg down
    runs = np.split(order, np.flatnonzero(-np.diff(height[order]) > MAX_GAP_MM) + 1)
    run = np.sort(max(runs, key=lambda r: np.ptp(height[r])))
    parts, _ = ndimage.label(grid.hu > BONE_HU)
    inside = parts > 0
    n = int(sections.max()) + 1
    piece = np.zeros(n, parts.dtype)
    piece[sections[inside]] = parts[inside]  # some piece of each section (any voxel's)
    votes = np.bincount(piece[pairs[run, 1]])
    votes[0] = 0  # a section without bone above the threshold
    if not votes.any():
        return pairs[:0]
    in_tibia = np.bincount(sections[parts == int(np.argmax(votes))], minlength=n)
    raw = np.bincount(sections[inside], minlength=n)
    big = pairs[run, 1]
    run = run[in_tibia[big] >= PURITY * np.maximum(raw[big], 1)]
    top = (sections.shape[0] - 1) * grid.pitch[0] if grid.up > 0 else 0.0  # the scan's top
    if len(run) and np.ptp(height[run]) < LONG_RUN_MM and top - height[run].max() > TOP_MM:
        return pairs[:0]
    return pairs[run]


def _other_bone(bone: np.ndarray, sections: np.ndarray, pairs: np.ndarray, leg: np.ndarray,
                labelled: np.ndarray, inplane: np.ndarray) -> float:
    """Share of the labelled bone voxels that lie on bone not connected to the leg's tibia.

    The pieces are those of the filled bone eroded by one voxel (a joint space narrowed by
    partial volume still separates; marrow specks belong to their bone). The leg's bones are
    the piece of its tibia sections and the piece of every section beside one (the fibula below
    a fracture gap is still fibula).
    """
    structure = inplane.copy()
    structure[0, 1, 1] = structure[2, 1, 1] = True  # as the sections within a slice
    parts, _ = ndimage.label(ndimage.binary_erosion(bone, border_value=1), structure=structure)
    inside = parts > 0
    piece = np.zeros(int(sections.max()) + 1, parts.dtype)
    piece[sections[inside]] = parts[inside]
    votes = np.bincount(piece[leg[:, 1]])
    votes[0] = 0
    tibia = int(np.argmax(votes))
    keep = np.union1d([tibia], piece[pairs[piece[pairs[:, 1]] == tibia, 2]])
    on_bone = parts[labelled & inside]
    other = np.count_nonzero(~np.isin(on_bone, keep[keep > 0]))
    return round(float(other) / max(len(on_bone), 1), 4)


def _judge(out: Dict[str, Any]) -> None:
    """Set ``level``, ``assessable``, ``problems`` and ``reason`` from the measures."""
    problems: List[str] = []
    off = out["label_off_bone"]
    if off is not None and off > MAX_OFF_BONE:
        problems.append(f"{off:.0%} of the labelled voxels lie on no bone")
    if out["slices"] < MIN_SLICES or out["span_mm"] < MIN_SPAN_MM:
        found = (f"only {out['slices']} slice(s) over {out['span_mm']:.0f} mm show"
                 if out["slices"] else "no run of slices shows")
        out["reason"] = (f"{found} the leg's tibia and fibula as two separate cross-sections "
                         "(no leg above the ankle in view, or both legs)")
        for key in ("dice_tibia_mean", "dice_tibia_median", "dice_fibula_mean",
                    "dice_fibula_median", "dice_tibia_distal", "dice_fibula_distal",
                    "poor_slice_fraction"):
            out[key] = None  # a few slices say nothing about the whole map
        out.update(problems=problems, level="low" if problems else "not_assessable")
        return
    out["assessable"] = True
    for bone, lo in (("tibia", MIN_DICE_TIBIA), ("fibula", MIN_DICE_FIBULA)):
        worst = min(out[f"dice_{bone}_mean"], out[f"dice_{bone}_distal"])
        if worst < lo:
            problems.append(f"the {bone} label matches the bone on the CT poorly "
                            f"(Dice {worst:.2f}, expected at least {lo:.2f})")
    if out["poor_slice_fraction"] > MAX_POOR_FRACTION:
        problems.append(f"the labels disagree with the bone on {out['poor_slice_fraction']:.0%} "
                        f"of the slices ({out['swapped_slices']} with tibia and fibula swapped)")
    other = out["label_on_other_bone"]
    if other is not None and other > MAX_OTHER_BONE:
        problems.append(f"{other:.0%} of the labelled voxels lie on bone that is not the tibia "
                        "or fibula (foot bones, talus or the other leg?)")
    out.update(problems=problems, level="low" if problems else "ok")


def describe_agreement(q: Dict[str, Any]) -> str:
    """One line for the report and the panel, from :func:`label_free_agreement`'s dict.

    Example:
        >>> describe_agreement({"level": "ok", "assessable": True, "slices": 84,
        ...                     "dice_tibia_mean": 0.97, "dice_fibula_mean": 0.93})
        'Segmentation vs CT bone: tibia 0.97, fibula 0.93 on 84 slices (agrees)'
    """
    if not q.get("assessable"):
        text = "Segmentation vs CT bone: not assessable"
        return text + (" (labels on non-bone)" if q.get("level") == "low" else "")
    verdict = "LOW agreement, check it" if q.get("level") == "low" else "agrees"
    return (f"Segmentation vs CT bone: tibia {float(q['dice_tibia_mean']):.2f}, fibula "
            f"{float(q['dice_fibula_mean']):.2f} on {int(q['slices'])} slices ({verdict})")
