"""Post-processing of predicted tibia/fibula label maps into maps a surgeon would accept.

:func:`clean_labels` applies these rules to a label map (0 background, 1 tibia, 2 fibula):

0. **No metal.** When the CT is given, voxels of metal (at least ``METAL_HU``, 2500 HU: steel
   and titanium implants read 2500-3071 HU, cortical bone below 2000) and the voxel next to
   them (the implant's partial-volume rim) are not bone and leave the labels before the other
   rules. A plate on the fibula that the network labelled fibula would otherwise stay in the
   map and give the registration its surface (a real-shape validation phantom's fibula: 13.4
   ml with its lateral plate, 7.8 ml without). Screws leave their tracks unlabelled.
1. **No swap.** In any field of view that covers the ankle, the tibia is much larger than the
   fibula. When the largest "tibia" component is smaller than the largest "fibula" component, the
   network confused the two bones: the labels of these two *main* components are exchanged.
2. **Fragments keep their parent bone's label.** Every other connected component (26-connected)
   of either label, e.g. a fracture fragment or a piece the network labelled wrongly, takes the
   label of the bone whose main component is nearest (distances in mm from the voxel spacing).
   A fragment keeps its own label unless the other bone is nearer by more than one voxel
   (``max(spacing)``), so that a fragment lying between the bones, such as a Tillaux fragment
   at the incisura, is not flipped by a sub-voxel difference. When the two distances are this
   close and ``probabilities`` are given, the bone with the higher mean probability wins.
   With both legs in view (two tibiae of similar size), each leg is cleaned on its own side
   of the plane midway between the tibiae, with its own main tibia and fibula. With the CT,
   a second "tibia" is the other leg only when it looks like bone: a cortex by rule 5's test,
   or its 99th-percentile CT number at least ``SECOND_LEG_HU_RATIO`` (70 %) of the larger
   tibia's and a thickness of at least ``SECOND_LEG_THICK_MM`` (10 mm). The second part holds
   for the other leg of a dim scan (soft kernel, thin metaphyseal cortex: a whole tibia with
   1.3 % of its voxels at 1000 HU, 0.89 of the first tibia's 99th percentile, 14 mm thick)
   and not for the casts and splints a network labels (thin shells: a splint piece beside a
   plate as bright as its tibia was 8.4 mm thick).
3. **No isolated specks.** A component smaller than ``min_fragment_mm3`` whose nearest main
   component is farther than ``attach_distance_mm`` is removed; a component farther than
   ``2 * attach_distance_mm`` from both main components is removed unless it is large
   (``>= large_fragment_mm3``, 5 ml), in which case it keeps its label (a bone the FOV cut in
   two); a real fracture fragment lies within a few mm of its bone, while the 1-3 ml pieces of
   talus or calcaneus a network may call tibia lie farther.
4. **No foot bones.** A large isolated piece kept by rule 3 that lies wholly more than
   ``BEYOND_TIBIA_MM`` (10 mm) beyond either end of the main tibia, along the tibia's long
   axis, is removed: the malleoli are never isolated from their bone, while metatarsals,
   cuneiforms and the calcaneus lie beyond the tibia and apart. (Applied only when the tibia
   is elongated enough to give an axis.)
5. **No label without bone.** When the CT is given, a large isolated piece kept by rule 3 in
   which fewer than ``MIN_CORTEX_FRACTION`` (5 %) of the voxels reach ``CORTEX_HU`` (1000 HU)
   is removed: every piece of tibia or fibula has a cortex (the shaft's is 1200-2000 HU, and
   30-55 % of a bone piece's labelled voxels reach 1000 HU on phantoms), while a plaster cast
   or splint (150-800 HU), which a network may call bone at its corners, has none.
6. **A cast is never a bone's main piece.** When the CT is given, a component of at least
   ``CAST_MIN_MM3`` (1 ml) that has no cortex (rule 5's test) and lies against air (at least
   ``MIN_AIR_SHELL`` (10 %) of the voxels within 3 voxels outside it below ``AIR_HU``, -400 HU;
   casts measured 13-29 %, bone pieces 0-5 % even beside a plate's dark streaks) is removed
   before the main components are chosen, wherever it lies. A cast or splint sits on air (or
   padding) and was the largest "fibula" component in two real-shape trauma scans: the true
   fibula, smaller, then counted as a fragment and took the tibia's label, and the scan was
   refused. Bone never touches air (skin and fat cover even the malleoli), and a piece of
   cancellous bone the network labelled apart from its cortex lies inside the bone, so
   neither is touched. Nor is a component with metal within ``METAL_CONTACT_MM`` (3 mm) of
   it: a plate's streaks darken the bone's surroundings below -400 HU and hide its cortex, so
   a plated fibula in a soft-kernel scan read as a cast (14 % air, 7 % cortex); a cast lies
   outside the skin, never against an implant.

7. **The leg's bones come down from above.** When the scan's superior direction is given
   (``superior_zyx``, from the image's direction matrix), a foot bone the network called tibia
   or fibula cannot win a choice made by size. A foot bone lies below the ankle: its top is at
   most about 15 mm above the main tibia's lowest point (the medial malleolus tip; the talar
   dome is 10-15 mm above it), while every tibia and fibula shaft of an ankle CT comes down
   from above the joint. So a fibula component whose top lies less than
   ``FIBULA_ABOVE_TIBIA_MM`` (20 mm) above the main tibia's lowest point is not the main
   fibula when a component of at least ``MAIN_MIN_MM3`` (1 ml) reaches higher and the low
   piece lies farther than ``attach_distance_mm`` from both that component and the main tibia
   (a 12 ml foot piece was chosen over a plated fibula that rule 0 had left at 9 ml, and the
   fibula took the tibia's label; a low piece that close is the distal fibula of a fibula
   broken low, in the tibia's notch, and stays the main one), and a second tibia is the other leg only when its top lies at least
   ``SECOND_LEG_ABOVE_MM`` (40 mm) above the main tibia's lowest point (a talus and
   calcaneus labelled tibia, 40 % of a short tibia's volume, had the one leg cut in two).

8. **A piece apart from both bones below the ankle is a foot bone.** With the superior
   direction, a component other than the two main pieces whose top lies less than
   ``FOOT_TOP_MM`` (20 mm) above the main tibia's lowest point and that lies farther than
   ``attach_distance_mm`` from both main pieces is removed, whatever its size. Rule 4 removes
   such a piece only when it lies wholly beyond the tibia's end along the tibia's axis; a
   calcaneus or navicular beside the talus does not. A fracture fragment lies across its
   fracture gap from its bone (a few mm); a talus labelled and touching the bones is left to
   the network, and so is a piece with metal beside it (rule 6's ``METAL_CONTACT_MM``): rule
   0 may leave a bit of plated bone apart from its bone.

9. **No distal tibia, no leg labels.** With the CT and the superior direction, the main tibia
   (after rule 1) must be a distal tibia (:mod:`.distal_tibia`): one of its cross-sections a
   single region of at least 6 cm^2 (the plafond's is about 8-13 cm^2, a metatarsal's 1-2),
   or its top within 20 mm of the top of the cortical bone in view (every tibia of an ankle
   CT runs out of the top of the scan). When neither holds the labels show foot bones, not a
   leg: a plantarflexed foot scan's metatarsals came out as a 12 ml "tibia", and rules 0-8,
   which judge every piece against the main tibia, kept them. Every tibia and fibula label of
   that leg is removed and ``report["not_a_leg"]`` says why (the pipeline refuses the scan
   with it). A real tibia the network labels only in part still reaches the top of the scan,
   and one ending at the knee has the plateau's large section, so neither is touched.

Everything works on the bounding box of the bones, and distances between components are measured
with k-d trees of surface-voxel centres (exact Euclidean distances in mm, capped at
``2 * attach_distance_mm``). On a clinical 512 x 512 x 350 map (0.35 x 0.35 x 0.6 mm) this takes
about 0.5 s for two clean bones and 1-2 s with fracture fragments and specks near the bones
(2 shared CPU cores). Specks scattered over the whole field of view make the working box the
whole array and cost ~5 s; the inference path passes only its bone region, so that case does
not arise there.

Example:
    >>> lab = np.zeros((20, 20, 20), np.uint8)
    >>> lab[:, 2:12, 2:12] = 1; lab[:, 14:17, 14:17] = 2; lab[10, 19, 0] = 2
    >>> out, rep = clean_labels(lab, (1.0, 1.0, 1.0))
    >>> rep["removed_voxels"], rep["swapped"], int(out[10, 19, 0])
    (1, False, 0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from AnkleFractureLib.geometry.arrays import bounding_box

TIBIA, FIBULA = 1, 2
#: Version of these rules. Crops made with the segmentation model's masks are cached under it
#: (classification/crops.py, training/fracture_data.py): bump it whenever a rule changes what
#: the labels hold. 6: rule 6 (casts out before the main components are chosen); 10: rule 9
#: (no distal tibia, no leg labels); 11: rule 7's second leg told from a cast by comparison
#: with the scan's own tibia and by its thickness.
POSTPROCESS_VERSION = 11
_NAMES = {TIBIA: "tibia", FIBULA: "fibula"}
_TWENTY_SIX = np.ones((3, 3, 3), dtype=bool)
_SIX = ndi.generate_binary_structure(3, 1)

Slices = Tuple[slice, slice, slice]

#: From this many components on, per-component Python loops (~50 us each) give way to
#: whole-array passes over the label's box (bincount, one erosion, a look-up table; ~1 s on a
#: clinical-size box): a very noisy prediction can hold tens of thousands of specks.
_MANY = 2000


def _surface_points(mask: np.ndarray, offset: Sequence[int], sp_zyx: np.ndarray) -> np.ndarray:
    """Physical (z, y, x) mm positions of the 6-connected surface voxels of ``mask``.

    The nearest voxel of a set to any point outside it is always a surface voxel, so surface
    points give exact set-to-set distances with far fewer points.
    """
    if not mask.any():
        return np.zeros((0, 3))
    surface = mask & ~ndi.binary_erosion(mask, structure=_SIX, border_value=0)
    return (np.argwhere(surface) + np.asarray(offset)) * sp_zyx


def _intersection(a: Slices, b: Slices) -> Optional[Slices]:
    out = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b))
    return None if any(s.stop <= s.start for s in out) else out  # type: ignore[return-value]


@dataclass(eq=False)
class _Component:
    """One connected component of one label.

    ``labelled`` is the ``ndi.label`` output of the label's bounding box, which starts at
    ``origin`` (voxel index in the working crop); the component is ``labelled[local] == index``.
    """

    label: int
    index: int
    voxels: int
    labelled: np.ndarray
    origin: Tuple[int, int, int]
    local: Slices

    @property
    def box(self) -> Slices:
        """Bounding box in working-crop coordinates."""
        return tuple(slice(s.start + o, s.stop + o)  # type: ignore[return-value]
                     for s, o in zip(self.local, self.origin))

    def mask(self) -> np.ndarray:
        """Boolean mask of the component over :attr:`box`."""
        return self.labelled[self.local] == self.index

    def mask_in(self, region: Slices) -> np.ndarray:
        """Boolean mask of the component over ``region`` (working-crop coordinates)."""
        out = np.zeros(tuple(s.stop - s.start for s in region), dtype=bool)
        lo = [max(r.start, b.start) for r, b in zip(region, self.box)]
        hi = [min(r.stop, b.stop) for r, b in zip(region, self.box)]
        if any(h <= l for l, h in zip(lo, hi)):
            return out
        src = tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, self.origin))
        dst = tuple(slice(l - r.start, h - r.start) for l, h, r in zip(lo, hi, region))
        out[dst] = self.labelled[src] == self.index
        return out


def _components(work: np.ndarray, value: int) -> List[_Component]:
    """26-connected components of ``work == value``, largest first."""
    mask = work == value
    box = bounding_box(mask)
    if box is None:
        return []
    labelled, n_comp = ndi.label(mask[box], structure=_TWENTY_SIX)
    origin = tuple(s.start for s in box)
    # Few components: count inside each component's own box (the boxes of a bone and a few
    # fragments hold far fewer voxels than the crop); many: one bincount of the crop.
    sizes = np.bincount(labelled.ravel(), minlength=n_comp + 1) if n_comp > _MANY else None
    comps = []
    for i, sl in enumerate(ndi.find_objects(labelled), start=1):
        if sl is None:
            continue
        n = int(sizes[i]) if sizes is not None else int(np.count_nonzero(labelled[sl] == i))
        comps.append(_Component(value, i, n, labelled, origin, sl))  # type: ignore[arg-type]
    comps.sort(key=lambda c: -c.voxels)
    return comps


def clean_labels(labels: np.ndarray, spacing_xyz: Sequence[float], *,
                 min_fragment_mm3: float = 30.0, attach_distance_mm: float = 6.0,
                 large_fragment_mm3: float = 5000.0,
                 probabilities: Optional[np.ndarray] = None, split_legs: bool = True,
                 ct_hu: Optional[np.ndarray] = None,
                 superior_zyx: Optional[Sequence[float]] = None
                 ) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Remove specks, give fragments their parent bone's label and undo tibia/fibula swaps.

    Args:
        labels: Label map (z, y, x), values 0 background, 1 tibia, 2 fibula (integer or bool
            dtype).
        spacing_xyz: Voxel size (x, y, z) in mm.
        min_fragment_mm3: Components smaller than this (mm^3) whose nearest main bone component
            is farther than ``attach_distance_mm`` are removed.
        attach_distance_mm: Distance (mm) within which a small component counts as attached to
            a bone; components farther than twice this from both bones are removed unless they
            hold at least ``large_fragment_mm3``.
        large_fragment_mm3: Volume (mm^3) from which an isolated component is kept (with its
            own label) however far it lies. 5 ml: a real fracture fragment lies within a few mm
            of its bone, while the pieces of talus or calcaneus a network may call tibia, more
            than 12 mm from it, hold 1-3 ml (measured on real-shape phantoms).
        probabilities: Optional softmax output (C >= 3, z, y, x) on the labels' grid, channel 1
            tibia and 2 fibula; only used to decide fragments that are about equally near both
            bones (within one voxel).
        split_legs: With two tibiae of similar size (both legs in view), clean each leg on its
            own side of the plane midway between them (its own main tibia and fibula), so the
            second leg's tibia is not taken for a fragment of the nearer, larger fibula.
        ct_hu: Optional CT (z, y, x) in HU on the labels' grid; enables rule 5 (a large
            isolated piece without cortical bone, such as a cast, is removed).
        superior_zyx: Optional unit vector, per array axis (z, y, x), of the patient's
            superior direction, so that a voxel's height in mm is ``(index * spacing_zyx) @
            superior_zyx`` plus a constant (:meth:`~AnkleFractureLib.geometry.volume.Volume.superior_zyx`);
            enables rules 7 and 8 (foot bones never chosen as a main bone or as the other
            leg; pieces apart from both bones below the ankle removed) and, with
            ``ct_hu``, rule 9 (no distal tibia: no leg labels).

    Returns:
        ``(cleaned, report)``: ``cleaned`` is a new uint8 (z, y, x) array (the input is never
        modified); ``report`` is JSON-serialisable::

            {"swapped": bool, "removed_voxels": int, "removed_fragments": int,
             "relabelled_fragments": int, "relabelled_voxels": int, "kept_fragments": int,
             "volumes_ml": {"tibia": float, "fibula": float}, "notes": [str, ...]}

        ``kept_fragments`` counts non-main components left with their label (fracture
        fragments, isolated large pieces); ``notes`` says in words what was changed. Rule 9
        adds ``not_a_leg``: per leg it cleared, ``{"tibia_ml", "section_cm2", "below_top_mm",
        "note"}`` (its entry in ``notes``; with ``"leg"`` when both legs are in view).

    Raises:
        ValueError: For a non-3D or non-integer array, values other than 0/1/2, a bad spacing,
            or ``probabilities`` that do not match the labels.
    """
    labels, sp, probabilities = _checked_inputs(labels, spacing_xyz, probabilities, ct_hu)
    report = _empty_report()
    if labels.size == 0:
        return labels.astype(np.uint8), report
    out = labels.astype(np.uint8, copy=True)
    box = bounding_box(out)
    if box is None:
        return out, report
    if ct_hu is not None and _drop_metal(out, box, ct_hu, float(np.prod(sp)), report):
        box = bounding_box(out)  # Rule 0 took metal out of the labels
        if box is None:
            return out, report
    work = out[box]  # a view: every change below lands in ``out``
    sp_zyx = sp[::-1].copy()
    voxel_mm3 = float(np.prod(sp))
    options = dict(min_fragment_mm3=min_fragment_mm3, attach_distance_mm=attach_distance_mm,
                   large_fragment_mm3=large_fragment_mm3)

    comps = {value: _components(work, value) for value in (TIBIA, FIBULA)}
    ct_box = ct_hu[box] if ct_hu is not None else None
    if ct_hu is not None:  # Rule 6: casts out before the legs and main components are chosen
        comps = _drop_casts(work, comps, box, ct_hu, voxel_mm3, report, sp_zyx)
    up = None if superior_zyx is None else _unit_up(superior_zyx)
    halves = _leg_halves(work.shape, comps[TIBIA], sp_zyx, voxel_mm3, large_fragment_mm3,
                         ct_box, up)
    if halves is not None and split_legs:
        return _clean_per_leg(out, box, halves, spacing_xyz, probabilities, options, ct_hu,
                              superior_zyx, report)
    if up is not None:  # Rule 7: the main fibula comes down from above the ankle
        comps[FIBULA] = _fibula_from_above(comps, sp_zyx, up, voxel_mm3, report,
                                           attach_distance_mm)
    main: Dict[int, Optional[_Component]] = {v: (c[0] if c else None) for v, c in comps.items()}
    fragments = comps[TIBIA][1:] + comps[FIBULA][1:]
    # Rule 1: the tibia is the larger bone.
    main = _tibia_is_the_larger_bone(work, main, voxel_mm3, report)
    # Rule 9: a main tibia that is no distal tibia: these labels show foot bones, not a leg.
    if _not_a_leg(work, box, main[TIBIA], ct_hu, sp_zyx, up, voxel_mm3, report):
        return out, report
    changes: List[Tuple[_Component, int]] = []
    if fragments:
        targets = _fragment_targets(work.shape, fragments, main, sp, box, probabilities,
                                    ct_hu, options, report, up)
        changes = _record_fragment_changes(fragments, targets, voxel_mm3, report)
        _apply(work, comps, changes)
    _final_volumes(comps, changes, voxel_mm3, report)
    return out, report


def _fragment_targets(shape: Sequence[int], fragments: List[_Component],
                      main: Dict[int, Optional[_Component]], sp: np.ndarray, box: Slices,
                      probabilities: Optional[np.ndarray], ct_hu: Optional[np.ndarray],
                      options: Dict[str, float], report: Dict[str, Any],
                      up: Optional[np.ndarray] = None) -> List[int]:
    """The new label of each fragment (0: removed), by rules 2-5 and 8 (``options``: the size
    and distance arguments of :func:`clean_labels`; ``sp``: spacing (x, y, z) mm; ``box``: the
    working crop in the labels' and ``ct_hu``'s grid; ``up``: the superior direction (z, y, x),
    or None)."""
    sp_zyx = sp[::-1].copy()
    voxel_mm3 = float(np.prod(sp))
    # Rules 2 and 3: fragments go to the nearer bone, specks far from both are removed.
    cap = 2.0 * options["attach_distance_mm"]
    distances = _fragment_distances(shape, fragments, main, sp_zyx, cap)
    targets = [_fragment_target(frag, distances[frag.label][k], distances[_other(frag.label)][k],
                                frag.voxels * voxel_mm3, cap=cap, margin_mm=float(sp.max()),
                                probabilities=probabilities, box=box, **options)
               for k, frag in enumerate(fragments)]
    # Rule 4: a large isolated piece beyond the end of the tibia is a foot bone.
    targets = _drop_beyond_leg(fragments, targets, distances, main.get(TIBIA), sp_zyx, cap,
                               report)
    # Rule 5: a large isolated piece without cortical bone is a cast or splint.
    if ct_hu is not None:
        targets = _drop_without_cortex(fragments, targets, distances, ct_hu[box], cap, report)
    # Rule 8: a piece apart from both bones below the ankle is a foot bone.
    if up is not None and main.get(TIBIA) is not None:
        targets = _drop_below_ankle(fragments, targets, distances, main[TIBIA], sp_zyx, up,
                                    options["attach_distance_mm"], report, ct_hu, box)
    return targets


#: Rule 8: a piece apart from both main bones whose top lies less than this (mm) above the
#: main tibia's lowest point lies below the ankle: a foot bone (as rule 7's
#: :data:`FIBULA_ABOVE_TIBIA_MM`: the talar dome is 10-15 mm above that point).
FOOT_TOP_MM = 20.0


def _drop_below_ankle(fragments: List[_Component], targets: List[int],
                      distances: Dict[int, np.ndarray], tibia: _Component, sp_zyx: np.ndarray,
                      up: np.ndarray, attach_mm: float, report: Dict[str, Any],
                      ct_hu: Optional[np.ndarray] = None, box: Optional[Slices] = None
                      ) -> List[int]:
    """Remove the kept pieces farther than ``attach_mm`` from both main bones whose top lies
    less than :data:`FOOT_TOP_MM` above the main tibia's lowest point (rule 8). A piece with
    metal beside it (``ct_hu``, with ``box`` the working crop in its grid) is spared: rule 0
    carves an implant out of the labels and may leave a piece of plated bone apart from its
    bone."""
    out = list(targets)
    floor = None
    for k, frag in enumerate(fragments):
        if out[k] == 0 or min(distances[TIBIA][k], distances[FIBULA][k]) <= attach_mm:
            continue
        if floor is None:
            floor = _height_range(tibia, sp_zyx, up)[0] + FOOT_TOP_MM
        if _height_range(frag, sp_zyx, up)[1] >= floor:
            continue
        if ct_hu is None or box is None or not _touches_metal(frag, box, ct_hu, sp_zyx):
            out[k] = 0
    _note_removed(targets, out, report, "below the ankle and apart from both bones (foot "
                                        "bones, not tibia or fibula)", what="piece(s)")
    return out


def _checked_inputs(labels: np.ndarray, spacing_xyz: Sequence[float],
                    probabilities: Optional[np.ndarray], ct_hu: Optional[np.ndarray] = None
                    ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(labels, spacing (x, y, z) mm as a float array, probabilities) as arrays, checked.

    Raises:
        ValueError: See :func:`clean_labels`.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be a 3D (z, y, x) array, got shape {labels.shape}")
    if labels.dtype.kind not in "iub":
        raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.size:
        # min/max instead of np.unique: two linear passes, not a sort of 90 M voxels.
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi > 2:
            raise ValueError(f"labels must hold only 0 (background), 1 (tibia) and 2 (fibula), "
                             f"got values from {lo} to {hi}")
    if ct_hu is not None and np.shape(ct_hu) != labels.shape:
        raise ValueError(f"ct_hu has shape {np.shape(ct_hu)}, the labels {labels.shape}")
    sp = np.asarray(spacing_xyz, dtype=float).reshape(-1)
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be 3 positive values (x, y, z) in mm, got {spacing_xyz}")
    if probabilities is not None:
        probabilities = np.asarray(probabilities)
        if probabilities.ndim != 4 or probabilities.shape[1:] != labels.shape \
                or probabilities.shape[0] < 3:
            raise ValueError(f"probabilities must be (C >= 3, z, y, x) with (z, y, x) = "
                             f"{labels.shape}, got {probabilities.shape}")
    return labels, sp, probabilities


def _empty_report() -> Dict[str, Any]:
    """The report of :func:`clean_labels` before anything was changed."""
    return {"swapped": False, "removed_voxels": 0, "removed_fragments": 0,
            "relabelled_fragments": 0, "relabelled_voxels": 0, "kept_fragments": 0,
            "volumes_ml": {"tibia": 0.0, "fibula": 0.0}, "notes": []}


def _other(label: int) -> int:
    """The other bone's label."""
    return FIBULA if label == TIBIA else TIBIA


def _tibia_is_the_larger_bone(work: np.ndarray, main: Dict[int, Optional[_Component]],
                              voxel_mm3: float, report: Dict[str, Any]
                              ) -> Dict[int, Optional[_Component]]:
    """Swap the two main components (in ``work`` and their labels) when the largest 'tibia'
    is smaller than the largest 'fibula'; the main components by label afterwards."""
    mt, mf = main[TIBIA], main[FIBULA]
    if mt is None or mf is None or mt.voxels >= mf.voxels:
        return main
    work[mt.box][mt.mask()] = FIBULA
    work[mf.box][mf.mask()] = TIBIA
    mt.label, mf.label = FIBULA, TIBIA
    report["swapped"] = True
    report["notes"].append(f"swapped tibia and fibula: the largest 'tibia' component "
                           f"({mt.voxels * voxel_mm3 / 1000:.1f} ml) was smaller than the "
                           f"largest 'fibula' component ({mf.voxels * voxel_mm3 / 1000:.1f} ml)")
    return {TIBIA: mf, FIBULA: mt}


def _fragment_target(frag: _Component, d_own: float, d_other: float, size_mm3: float, *,
                     cap: float, margin_mm: float, attach_distance_mm: float,
                     min_fragment_mm3: float, large_fragment_mm3: float,
                     probabilities: Optional[np.ndarray], box: Slices) -> int:
    """The label a fragment should have: its own, the other bone's, or 0 (removed).

    Args:
        frag: The fragment (a non-main component).
        d_own: Distance (mm) to the main component of its own label (inf beyond ``cap``).
        d_other: Distance (mm) to the other bone's main component (inf beyond ``cap``).
        size_mm3: Its volume (mm^3).
        cap: Distance (mm) beyond which it is isolated (twice ``attach_distance_mm``).
        margin_mm: Distance difference (mm, one voxel) below which both bones are equally near.
        attach_distance_mm, min_fragment_mm3, large_fragment_mm3: See :func:`clean_labels`.
        probabilities: Optional softmax (C, z, y, x) deciding ties.
        box: The working crop in the full array.
    """
    other = _other(frag.label)
    d_near = min(d_own, d_other)
    if d_near > cap:
        # Far from both bones: noise unless big enough to be a real (displaced) piece.
        return 0 if size_mm3 < large_fragment_mm3 else frag.label
    if d_near > attach_distance_mm and size_mm3 < min_fragment_mm3:
        return 0
    if d_other + margin_mm < d_own:
        return other
    if abs(d_other - d_own) <= margin_mm and probabilities is not None:
        return _more_probable(probabilities, box, frag, frag.label, other)
    return frag.label


def _record_fragment_changes(fragments: List[_Component], targets: List[int], voxel_mm3: float,
                             report: Dict[str, Any]) -> List[Tuple[_Component, int]]:
    """Count the kept, removed and relabelled fragments in ``report`` (with notes in words);
    the (fragment, new label) of those that change."""
    moved: Dict[Tuple[int, int], int] = {}
    removed_mm3 = 0.0
    changes: List[Tuple[_Component, int]] = []
    for frag, target in zip(fragments, targets):
        if target == frag.label:
            report["kept_fragments"] += 1
            continue
        changes.append((frag, target))
        if target == 0:
            report["removed_fragments"] += 1
            report["removed_voxels"] += frag.voxels
            removed_mm3 += frag.voxels * voxel_mm3
        else:
            report["relabelled_fragments"] += 1
            report["relabelled_voxels"] += frag.voxels
            key = (frag.label, target)
            moved[key] = moved.get(key, 0) + frag.voxels
    if report["removed_fragments"]:
        report["notes"].append(f"removed {report['removed_fragments']} isolated component(s) "
                               f"({removed_mm3:.1f} mm^3 in all)")
    for (src, dst), n in sorted(moved.items()):
        report["notes"].append(f"relabelled {n * voxel_mm3:.1f} mm^3 from {_NAMES[src]} to "
                               f"{_NAMES[dst]} (fragments nearest the {_NAMES[dst]})")
    return changes


def _final_volumes(comps: Dict[int, List[_Component]], changes: List[Tuple[_Component, int]],
                   voxel_mm3: float, report: Dict[str, Any]) -> None:
    """Final volumes (ml) into ``report`` from the component sizes: no further pass over the
    crop."""
    final = {TIBIA: 0, FIBULA: 0, 0: 0}
    changed = {id(c): t for c, t in changes}
    for comp in comps[TIBIA] + comps[FIBULA]:
        final[changed.get(id(comp), comp.label)] += comp.voxels
    for value, name in _NAMES.items():
        report["volumes_ml"][name] = round(final[value] * voxel_mm3 / 1000.0, 4)


#: A second tibia at least this share of the largest one (and large) means both legs are in
#: view: each leg is then cleaned on its own.
SECOND_LEG_FRACTION = 0.4
#: An isolated piece (farther than twice ``attach_distance_mm`` from both bones, and large)
#: lying wholly this far (mm) beyond either end of the main tibia, along its long axis, is
#: not tibia or fibula. The lateral malleolus does reach ~15-20 mm beyond the medial
#: malleolus (the tibia's distal end), but it is part of the fibula, never isolated from it;
#: a Weber A fragment lies within a few mm of the fibula. Metatarsals, cuneiforms and the
#: calcaneus lie farther and apart.
BEYOND_TIBIA_MM = 10.0
#: The tibia's long axis is trusted when its voxel cloud is at least this elongated (ratio of
#: the two largest standard deviations): a scan with only the plafond gives no axis.
MIN_ELONGATION = 1.3


def _long_axis_extent(comp: _Component, sp_zyx: np.ndarray, max_points: int = 20000
                      ) -> Optional[Tuple[np.ndarray, float, float]]:
    """(unit long axis (z, y, x), min, max of the projections in mm) of a component's voxel
    centres (a subsample of ``max_points``), or None when it is not elongated."""
    pts = (np.argwhere(comp.mask()) + [s.start for s in comp.box]) * sp_zyx
    if len(pts) > max_points:
        pts = pts[:: int(math.ceil(len(pts) / max_points))]
    if len(pts) < 10:
        return None
    centred = pts - pts.mean(axis=0)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    if sv[1] <= 0 or sv[0] / sv[1] < MIN_ELONGATION:
        return None
    proj = centred @ vt[0]
    return vt[0], float(proj.min()), float(proj.max())


def _drop_beyond_leg(fragments: List[_Component], targets: List[int],
                     distances: Dict[int, np.ndarray], tibia: Optional[_Component],
                     sp_zyx: np.ndarray, cap: float, report: Dict[str, Any]) -> List[int]:
    """Remove the large isolated pieces (kept by rule 3) that lie wholly beyond either end of
    the main tibia along its long axis by more than :data:`BEYOND_TIBIA_MM`: foot bones (or
    the knee's) that the network called tibia or fibula."""
    isolated = [k for k, frag in enumerate(fragments) if targets[k] == frag.label
                and min(distances[TIBIA][k], distances[FIBULA][k]) > cap]
    if not isolated or tibia is None:
        return targets
    axis_info = _long_axis_extent(tibia, sp_zyx)
    if axis_info is None:
        return targets
    axis, lo, hi = axis_info
    centre = ((np.argwhere(tibia.mask()) + [s.start for s in tibia.box]) * sp_zyx).mean(axis=0)
    out = list(targets)
    for k in isolated:
        frag = fragments[k]
        pts = (np.argwhere(frag.mask()) + [s.start for s in frag.box]) * sp_zyx
        proj = (pts - centre) @ axis
        if proj.max() < lo - BEYOND_TIBIA_MM or proj.min() > hi + BEYOND_TIBIA_MM:
            out[k] = 0
    _note_removed(targets, out, report, "beyond the end of the tibia (foot bones, not tibia "
                                        "or fibula)")
    return out


def _note_removed(before: List[int], after: List[int], report: Dict[str, Any], why: str,
                  what: str = "large piece(s)") -> None:
    """Add a note counting the pieces whose target changed from ``before`` to ``after``."""
    n = sum(1 for a, b in zip(before, after) if a != b)
    if n:
        report["notes"].append(f"removed {n} {what} {why}")


#: Rule 0: a voxel at or above this CT number (HU) is metal.
METAL_HU = 2500.0


def _drop_metal(out: np.ndarray, box: Slices, ct_hu: np.ndarray, voxel_mm3: float,
                report: Dict[str, Any]) -> bool:
    """Rule 0: unlabel metal voxels (>= :data:`METAL_HU`) and the voxels next to them, in
    place, and say so in ``report["notes"]``. Returns whether any label was taken out."""
    metal = np.asarray(ct_hu[box]) >= METAL_HU
    if not metal.any():
        return False
    work = out[box]
    gone = ndi.binary_dilation(metal, structure=_TWENTY_SIX) & (work > 0)
    n = int(np.count_nonzero(gone))
    if n:
        work[gone] = 0
        report["metal_voxels"] = n
        report["notes"].append(f"metal taken out of the labels: {n * voxel_mm3 / 1000.0:.2f} ml "
                               f"at or next to voxels of {METAL_HU:.0f} HU or more (implants "
                               "are not bone)")
    return n > 0


#: Rule 5: a voxel at or above this CT number (HU) is cortical bone.
CORTEX_HU = 1000.0
#: Rule 5: a large isolated piece is bone only when at least this fraction of its voxels is
#: cortical (bone pieces: 0.3-0.55 on phantoms; a cast or splint: at most 0.01).
MIN_CORTEX_FRACTION = 0.05


def _has_cortex(comp: _Component, ct_box: np.ndarray) -> bool:
    """Whether at least :data:`MIN_CORTEX_FRACTION` of a component's voxels reach
    :data:`CORTEX_HU` in ``ct_box`` (HU, the working box)."""
    values = ct_box[comp.box][comp.mask()]
    return not values.size or float(np.mean(values >= CORTEX_HU)) >= MIN_CORTEX_FRACTION


def _drop_without_cortex(fragments: List[_Component], targets: List[int],
                         distances: Dict[int, np.ndarray], ct_box: np.ndarray, cap: float,
                         report: Dict[str, Any]) -> List[int]:
    """Remove the large isolated pieces (kept by rule 3) whose CT shows no cortical bone
    (fewer than :data:`MIN_CORTEX_FRACTION` of their voxels at :data:`CORTEX_HU` or above):
    a cast or a splint the network called bone."""
    out = list(targets)
    for k, frag in enumerate(fragments):
        if targets[k] != frag.label or min(distances[TIBIA][k], distances[FIBULA][k]) <= cap:
            continue
        if not _has_cortex(frag, ct_box):
            out[k] = 0
    _note_removed(targets, out, report, "without cortical bone (a cast or splint, not tibia "
                                        "or fibula)")
    return out


#: Rule 6: components from this volume (mm^3) on are tested for being a cast or splint.
CAST_MIN_MM3 = 1000.0
#: Rule 6: a voxel below this CT number (HU) is air (or cast padding), never soft tissue.
AIR_HU = -400.0
#: Rule 6: a component lies against air when at least this fraction of the voxels of its
#: shell (within :data:`SHELL_VOXELS` steps outside it, 6-connected) is air.
MIN_AIR_SHELL = 0.1
#: Rule 6: thickness of the shell (voxels): 2-5 mm on clinical grids, so that the air beside
#: a cast's labelled part (the rest of the cast lies between) is reached.
SHELL_VOXELS = 3


def _air_shell_fraction(comp: _Component, box: Slices, ct_hu: np.ndarray) -> float:
    """Fraction of the voxels of a component's shell (within :data:`SHELL_VOXELS` steps
    outside it, 6-connected, within the CT) that are air (below :data:`AIR_HU`). ``box``: the
    working crop in ``ct_hu``."""
    k = SHELL_VOXELS
    full = [slice(max(b.start + c.start - k, 0), min(b.start + c.stop + k, n))
            for b, c, n in zip(box, comp.box, ct_hu.shape)]
    region = tuple(slice(f.start - b.start, f.stop - b.start) for f, b in zip(full, box))
    mask = comp.mask_in(region)  # type: ignore[arg-type]
    shell = ndi.binary_dilation(mask, structure=_SIX, iterations=k) & ~mask
    if not shell.any():
        return 0.0
    return float(np.mean(ct_hu[tuple(full)][shell] < AIR_HU))


#: Rule 6: a component within this distance (mm) of metal is the bone an implant is fixed
#: to, never a cast: a cast lies outside the skin, beyond the padding, while a plate's dark
#: streaks read as air beside the bone and its bright ones hide the cortex beneath it (a
#: plated fibula was taken for a cast and left unlabelled on real-shape phantoms).
METAL_CONTACT_MM = 3.0


def _touches_metal(comp: _Component, box: Slices, ct_hu: np.ndarray,
                   sp_zyx: np.ndarray) -> bool:
    """Whether metal (>= :data:`METAL_HU`) lies within :data:`METAL_CONTACT_MM` of a
    component, or within two voxels of the coarsest axis when that is farther (rule 0 leaves a
    voxel between them). ``box``: the working crop in ``ct_hu``."""
    limit = max(METAL_CONTACT_MM, 2.0 * float(np.max(sp_zyx)))
    reach = [int(np.ceil(limit / float(v))) for v in sp_zyx]
    full = tuple(slice(max(b.start + c.start - k, 0), min(b.start + c.stop + k, n))
                 for b, c, k, n in zip(box, comp.box, reach, ct_hu.shape))
    metal = np.asarray(ct_hu[full]) >= METAL_HU
    if not metal.any():
        return False
    # The distance map only around the metal (a plate is small; a cast's box is the leg's).
    idx = np.argwhere(metal)
    sub = tuple(slice(max(int(lo) - k, 0), min(int(hi) + 1 + k, n))
                for lo, hi, k, n in zip(idx.min(axis=0), idx.max(axis=0), reach, metal.shape))
    region = tuple(slice(f.start + s.start - b.start, f.start + s.stop - b.start)
                   for f, s, b in zip(full, sub, box))
    near = ndi.distance_transform_edt(~metal[sub], sampling=sp_zyx) <= limit
    return bool(np.any(near & comp.mask_in(region)))  # type: ignore[arg-type]


def _drop_casts(work: np.ndarray, comps: Dict[int, List[_Component]], box: Slices,
                ct_hu: np.ndarray, voxel_mm3: float, report: Dict[str, Any],
                sp_zyx: np.ndarray) -> Dict[int, List[_Component]]:
    """Rule 6: remove (in ``work``) the components of at least :data:`CAST_MIN_MM3` without
    cortex that lie against air and away from metal; the components left, largest first, by
    label."""
    ct_box = ct_hu[box]
    kept: Dict[int, List[_Component]] = {}
    gone_mm3 = 0.0
    for value, members in comps.items():
        kept[value] = []
        for comp in members:
            if (comp.voxels * voxel_mm3 >= CAST_MIN_MM3 and not _has_cortex(comp, ct_box)
                    and _air_shell_fraction(comp, box, ct_hu) >= MIN_AIR_SHELL
                    and not _touches_metal(comp, box, ct_hu, sp_zyx)):
                work[comp.box][comp.mask()] = 0
                report["removed_voxels"] += comp.voxels
                gone_mm3 += comp.voxels * voxel_mm3
            else:
                kept[value].append(comp)
    if gone_mm3:
        report["notes"].append(f"removed {gone_mm3 / 1000.0:.1f} ml labelled bone without "
                               "cortex lying against air (a cast or splint)")
    return kept


#: Rule 7: a fibula component whose top lies less than this (mm) above the main tibia's
#: lowest point (the medial malleolus tip) is not chosen as the main fibula when a component
#: reaching higher exists. The talar dome lies 10-15 mm above that point and every other foot
#: bone lower; the fibula's shaft comes down from far above it (its tip 15-20 mm below it).
FIBULA_ABOVE_TIBIA_MM = 20.0
#: Rule 7: a second tibia is the other leg only when its top lies at least this (mm) above
#: the main tibia's lowest point: the other leg's shaft comes down from above the ankle (an
#: ankle CT shows at least 40 mm of it), a talus or calcaneus labelled tibia does not.
SECOND_LEG_ABOVE_MM = 40.0
#: Rule 7: a component that replaces the largest as the main fibula holds at least this
#: (mm^3): a speck high up never does.
MAIN_MIN_MM3 = 1000.0


def _not_a_leg(work: np.ndarray, box: Slices, tibia: Optional[_Component],
               ct_hu: Optional[np.ndarray], sp_zyx: np.ndarray, up: Optional[np.ndarray],
               voxel_mm3: float, report: Dict[str, Any]) -> bool:
    """Rule 9: when the main tibia is no distal tibia (:func:`.distal_tibia.judge`: no
    single-region section of :data:`~.distal_tibia.MIN_SECTION_MM2` and its top more than
    :data:`~.distal_tibia.TOP_GAP_MM` below the top of the bone in view), remove every label
    of ``work`` (the leg's working crop, ``box`` in ``ct_hu``'s grid), record why in
    ``report["not_a_leg"]`` and return True; else (also without a tibia, the CT or the
    superior direction ``up``) change nothing and return False."""
    from AnkleFractureLib.segmentation.distal_tibia import judge

    if tibia is None or ct_hu is None or up is None:
        return False
    offset = [b.start + c.start for b, c in zip(box, tibia.box)]
    verdict = judge(tibia.mask(), offset, ct_hu, sp_zyx, up)
    if verdict["distal_tibia"]:
        return False
    labelled = int(np.count_nonzero(work))
    tibia_ml = round(tibia.voxels * voxel_mm3 / 1000.0, 2)
    work[...] = 0
    report["removed_voxels"] += labelled
    report["volumes_ml"] = {"tibia": 0.0, "fibula": 0.0}
    note = (f"no distal tibia: the {tibia_ml:.1f} ml 'tibia' has no cross-section of a distal "
            f"tibia (largest {verdict['section_cm2']:.1f} cm^2; at the plafond about 8-13) and "
            f"ends {verdict['below_top_mm']:.0f} mm below the highest bone in view (a tibia "
            f"runs out of the top of an ankle scan): every tibia and fibula label removed as "
            f"foot bones ({labelled * voxel_mm3 / 1000.0:.1f} ml)")
    report.setdefault("not_a_leg", []).append(
        {"tibia_ml": tibia_ml, "section_cm2": verdict["section_cm2"],
         "below_top_mm": verdict["below_top_mm"], "note": note})
    report["notes"].append(note)
    return True


def _unit_up(superior_zyx: Sequence[float]) -> np.ndarray:
    """The superior direction (z, y, x) as a unit vector; ValueError when it has no length."""
    up = np.asarray(superior_zyx, dtype=float).reshape(3)
    norm = float(np.linalg.norm(up))
    if not np.isfinite(norm) or norm < 1e-6:
        raise ValueError(f"superior_zyx must be a non-zero vector, got {up.tolist()}")
    return up / norm


def _height_range(comp: _Component, sp_zyx: np.ndarray, up: np.ndarray) -> Tuple[float, float]:
    """(lowest, highest) height (mm along ``up``) of a component's voxel centres, relative to
    the working crop's first voxel."""
    h = ((np.argwhere(comp.mask()) + [s.start for s in comp.box]) * sp_zyx) @ up
    return float(h.min()), float(h.max())


def _gap_mm(a: _Component, b: _Component, sp_zyx: np.ndarray) -> float:
    """Shortest distance (mm) between the voxel centres of two components."""
    pa = _surface_points(a.mask(), [s.start for s in a.box], sp_zyx)
    pb = _surface_points(b.mask(), [s.start for s in b.box], sp_zyx)
    if len(pa) == 0 or len(pb) == 0:
        return math.inf
    return float(cKDTree(pa).query(pb, k=1)[0].min())


def _fibula_from_above(comps: Dict[int, List[_Component]], sp_zyx: np.ndarray,
                       up: np.ndarray, voxel_mm3: float, report: Dict[str, Any],
                       attach_mm: float = 6.0) -> List[_Component]:
    """The fibula components with the main one first (rule 7): the largest whose top lies at
    least :data:`FIBULA_ABOVE_TIBIA_MM` above the main tibia's lowest point, when the largest
    does not and such a component of :data:`MAIN_MIN_MM3` exists, and the largest lies
    farther than ``attach_mm`` from both it and the main tibia; else unchanged. A largest piece
    that close to either is the distal fibula of a fibula broken low (by a fracture, or by
    rule 0 cutting out a plate the network labelled with the bone), lying in the tibia's
    notch, not a foot bone below the ankle: it stays the main one."""
    fibulae, tibiae = comps[FIBULA], comps[TIBIA]
    if len(fibulae) < 2 or not tibiae:
        return fibulae
    floor = _height_range(tibiae[0], sp_zyx, up)[0] + FIBULA_ABOVE_TIBIA_MM
    if _height_range(fibulae[0], sp_zyx, up)[1] >= floor:
        return fibulae
    for k, comp in enumerate(fibulae[1:], start=1):
        if comp.voxels * voxel_mm3 < MAIN_MIN_MM3:
            break  # largest first: the rest are smaller still
        if _height_range(comp, sp_zyx, up)[1] >= floor:
            if min(_gap_mm(fibulae[0], comp, sp_zyx),
                   _gap_mm(fibulae[0], tibiae[0], sp_zyx)) <= attach_mm:
                return fibulae  # the distal fibula (beside the tibia) of a broken fibula
            report["notes"].append(
                f"main fibula: the {comp.voxels * voxel_mm3 / 1000:.1f} ml piece that comes "
                f"down from above the ankle, not the larger "
                f"{fibulae[0].voxels * voxel_mm3 / 1000:.1f} ml one below it (a foot bone)")
            return [comp] + fibulae[:k] + fibulae[k + 1:]
    return fibulae


def _centroid(comp: _Component, sp_zyx: np.ndarray) -> np.ndarray:
    """Centroid (z, y, x) mm of a component in working-crop coordinates."""
    idx = np.argwhere(comp.mask()) + [s.start for s in comp.box]
    return idx.mean(axis=0) * sp_zyx


def _leg_halves(shape: Sequence[int], tibiae: List[_Component], sp_zyx: np.ndarray,
                voxel_mm3: float, large_mm3: float, ct_box: Optional[np.ndarray] = None,
                up: Optional[np.ndarray] = None) -> Optional[List[np.ndarray]]:
    """The two legs' halves (boolean arrays of ``shape``) when two tibiae are in view, else None.

    The halves are split by the plane midway between the two largest tibiae's centroids. With
    the CT (``ct_box``, HU on the working box), a second "tibia" that looks like neither
    cortical bone nor the larger tibia (a cast, :func:`_bone_like`) is no second leg; with the
    superior direction ``up`` (rule 7), nor is one whose top lies less than
    :data:`SECOND_LEG_ABOVE_MM` above the larger tibia's lowest point (a foot bone).
    """
    if len(tibiae) < 2:
        return None
    a, b = tibiae[0], tibiae[1]
    if b.voxels * voxel_mm3 < large_mm3 or b.voxels < SECOND_LEG_FRACTION * a.voxels:
        return None
    if ct_box is not None and not _bone_like(b, a, ct_box, sp_zyx):
        return None
    if up is not None and (_height_range(b, sp_zyx, up)[1]
                           < _height_range(a, sp_zyx, up)[0] + SECOND_LEG_ABOVE_MM):
        return None
    ca, cb = _centroid(a, sp_zyx), _centroid(b, sp_zyx)
    normal = cb - ca
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    dist = sum((g * s - m) * n for g, s, m, n in zip(grids, sp_zyx, 0.5 * (ca + cb), normal))
    near_b = dist > 0
    return [~near_b, near_b]


#: Rule 7: a second tibia without cortex by rule 5's test is still the other leg when its
#: 99th-percentile CT number reaches this fraction of the larger tibia's and it is at least
#: :data:`SECOND_LEG_THICK_MM` thick. Rule 5's absolute test (5 % of the voxels at 1000 HU)
#: says "no cortex" of real bone in dim scans (soft kernel, thin metaphyseal cortex): 23 of 343
#: true tibia and fibula pieces of real-shape phantoms, a whole tibia at 1.3 %. The same bone in
#: the same scan reads alike (such a scan's two tibiae: 0.89 of each other), and the casts and
#: splints a network labels mostly reach at most 0.53 of the scan's tibia, but a splint piece
#: beside a plate reached 0.95 (docs/seg_v2/rule10.json, rule10b.json).
SECOND_LEG_HU_RATIO = 0.7
#: Rule 7: ... and its thickness (the largest distance, mm, from its voxels to its surface) at
#: least this: true tibiae measured 12.8 mm or more, the network's cast and splint pieces at
#: most 12.1 mm, and the splint piece as bright as its tibia 8.4 mm (casts and splints are
#: shells a few mm thick; a tibia is at least 25 mm across from the plafond to mid-shaft).
SECOND_LEG_THICK_MM = 10.0


def _thickness_mm(comp: _Component, sp_zyx: np.ndarray) -> float:
    """The largest distance (mm) from a component's voxels to its surface."""
    mask = np.pad(comp.mask(), 1)
    return float(ndi.distance_transform_edt(mask, sampling=sp_zyx).max())


def _bone_like(b: _Component, a: _Component, ct_box: np.ndarray, sp_zyx: np.ndarray) -> bool:
    """Whether component ``b`` is bone: a cortex by rule 5's test (:func:`_has_cortex`), or
    its 99th-percentile HU at least :data:`SECOND_LEG_HU_RATIO` of component ``a``'s (the
    scan's own tibia) and a thickness of at least :data:`SECOND_LEG_THICK_MM` (a cast or
    splint is a thin shell); ``ct_box``: HU on the working box, ``sp_zyx``: voxel size (mm)."""
    if _has_cortex(b, ct_box):
        return True
    mine = ct_box[b.box][b.mask()]
    theirs = ct_box[a.box][a.mask()]
    if not mine.size or not theirs.size:
        return True
    reference = float(np.percentile(theirs, 99.0))
    if reference <= 0 or float(np.percentile(mine, 99.0)) < SECOND_LEG_HU_RATIO * reference:
        return False
    return _thickness_mm(b, sp_zyx) >= SECOND_LEG_THICK_MM


def _clean_per_leg(out: np.ndarray, box: Slices, halves: List[np.ndarray],
                   spacing_xyz: Sequence[float], probabilities: Optional[np.ndarray],
                   options: Dict[str, float], ct_hu: Optional[np.ndarray] = None,
                   superior_zyx: Optional[Sequence[float]] = None,
                   before: Optional[Dict[str, Any]] = None
                   ) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Clean each leg's half on its own and merge the maps and the reports; ``before``: the
    report of the rules applied to the whole map first (0 and 6), whose counts and notes
    the merged report keeps."""
    merged = np.zeros_like(out)
    report: Dict[str, Any] = {"swapped": False, "removed_voxels": 0, "removed_fragments": 0,
                              "relabelled_fragments": 0, "relabelled_voxels": 0,
                              "kept_fragments": 0, "volumes_ml": {"tibia": 0.0, "fibula": 0.0},
                              "notes": ["both legs in view: each leg cleaned on its own"],
                              "legs": 2}
    if before is not None:
        report["removed_voxels"] = before["removed_voxels"]
        report["notes"] = before["notes"] + report["notes"]
        if "metal_voxels" in before:
            report["metal_voxels"] = before["metal_voxels"]
    for k, half in enumerate(halves, start=1):
        sub = np.zeros_like(out)
        sub[box] = np.where(half, out[box], 0)
        cleaned, rep = clean_labels(sub, spacing_xyz, probabilities=probabilities,
                                    split_legs=False, ct_hu=ct_hu, superior_zyx=superior_zyx,
                                    **options)
        merged[box][half] = cleaned[box][half]
        report["swapped"] |= rep["swapped"]
        for key in ("removed_voxels", "removed_fragments", "relabelled_fragments",
                    "relabelled_voxels", "kept_fragments"):
            report[key] += rep[key]
        for bone in ("tibia", "fibula"):
            total = report["volumes_ml"][bone] + rep["volumes_ml"][bone]
            report["volumes_ml"][bone] = round(total, 4)
        report["notes"] += [f"leg {k}: {n}" for n in rep["notes"]]
        if rep.get("not_a_leg"):
            report.setdefault("not_a_leg", []).extend(dict(r, leg=k) for r in rep["not_a_leg"])
    return merged, report


def _apply(work: np.ndarray, comps: Dict[int, List[_Component]],
           changes: List[Tuple[_Component, int]]) -> None:
    """Write the new label of each changed component (0 = removed) into ``work``."""
    if len(changes) <= _MANY:
        for comp, target in changes:
            work[comp.box][comp.mask()] = target
        return
    # Many changes: one look-up-table pass per label over that label's box.
    for value, members in comps.items():
        if not members:
            continue
        labelled, origin = members[0].labelled, members[0].origin
        mine = [(c, t) for c, t in changes if c.labelled is labelled]
        if not mine:
            continue
        lut = np.zeros(int(labelled.max()) + 1, dtype=np.uint8)
        for comp in members:
            lut[comp.index] = comp.label
        for comp, target in mine:
            lut[comp.index] = target
        region = tuple(slice(o, o + n) for o, n in zip(origin, labelled.shape))
        inside = labelled > 0
        work[region][inside] = lut[labelled[inside]]


def _fragment_distances(shape: Sequence[int], fragments: List[_Component],
                        main: Dict[int, Optional[_Component]], sp_zyx: np.ndarray,
                        cap: float) -> Dict[int, np.ndarray]:
    """Distance (mm) from each fragment to each main component; inf beyond ``cap`` mm.

    Only the part of each main component within ``cap`` of some fragment is looked at (the
    union of the fragments' boxes grown by ``cap``), so the cost follows the fragments, not the
    bones.
    """
    grow = np.array([int(math.ceil(cap / s)) + 1 for s in sp_zyx])
    lo = np.array([[s.start for s in f.box] for f in fragments]).min(axis=0) - grow
    hi = np.array([[s.stop for s in f.box] for f in fragments]).max(axis=0) + grow
    region: Slices = tuple(slice(max(int(a), 0), min(int(b), n))  # type: ignore[assignment]
                           for a, b, n in zip(lo, hi, shape))
    points, owners = _fragment_points(fragments, sp_zyx)
    # Points grouped by fragment, so that one minimum.reduceat gives each fragment's distance
    # (ufunc.at is ~50 times slower on the millions of points of a noisy prediction).
    order = np.argsort(owners, kind="stable")
    points, owners = points[order], owners[order]
    result: Dict[int, np.ndarray] = {}
    for value, comp in main.items():
        d = np.full(len(fragments), np.inf)
        if comp is not None:
            # Only the main component's own box within reach of the fragments: never more
            # than the bone itself, however widely the fragments are scattered.
            near = _intersection(region, comp.box)
            targets = (np.zeros((0, 3)) if near is None else
                       _surface_points(comp.mask_in(near), [s.start for s in near], sp_zyx))
            if len(targets):
                d = _min_distance(cKDTree(targets), points, owners, len(fragments),
                                  [3.0 * float(sp_zyx.max()), cap * 1.0001])
        result[value] = d
    return result


def _min_distance(tree: cKDTree, points: np.ndarray, owners: np.ndarray, n: int,
                  bounds: Sequence[float]) -> np.ndarray:
    """Per-fragment minimum distance (mm) of ``points`` to ``tree``; inf beyond ``bounds[-1]``.

    ``owners`` (sorted) gives the fragment number of each point.

    A search within the first, small bound settles every fragment with a point that close (a
    fragment's distance is its points' minimum, and a bounded search is exact within its bound);
    only the other fragments' points are searched again within the next bound. Small searches
    are what keeps a noisy prediction with tens of thousands of specks beside the bone fast.
    """
    d = np.full(n, np.inf)
    todo = np.arange(len(points))
    for bound in bounds:
        if todo.size == 0:
            break
        own = owners[todo]
        first = np.flatnonzero(np.r_[True, own[1:] != own[:-1]])
        dist = tree.query(points[todo], k=1, distance_upper_bound=bound)[0]
        d[own[first]] = np.minimum.reduceat(dist, first)
        todo = todo[~np.isfinite(d[own])]
    return d


def _fragment_points(fragments: List[_Component],
                     sp_zyx: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Surface points (N, 3) in mm of all fragments, and the fragment number of each point."""
    owner_parts, point_parts = [], []
    if len(fragments) <= _MANY:
        for k, frag in enumerate(fragments):
            pts = _surface_points(frag.mask(), [s.start for s in frag.box], sp_zyx)
            point_parts.append(pts)
            owner_parts.append(np.full(len(pts), k))
    else:
        # Many fragments: one erosion per label. Distinct 26-connected components never touch,
        # so the surface of their union is the union of their surfaces.
        groups: Dict[int, Tuple[np.ndarray, Tuple[int, int, int], List[int]]] = {}
        for k, frag in enumerate(fragments):
            groups.setdefault(id(frag.labelled), (frag.labelled, frag.origin, []))[2].append(k)
        for labelled, origin, members in groups.values():
            owner_of = np.full(int(labelled.max()) + 1, -1, dtype=np.int64)
            for k in members:
                owner_of[fragments[k].index] = k
            mask = owner_of[labelled] >= 0
            surface = mask & ~ndi.binary_erosion(mask, structure=_SIX, border_value=0)
            idx = np.argwhere(surface)
            owner_parts.append(owner_of[labelled[tuple(idx.T)]])
            point_parts.append((idx + np.asarray(origin)) * sp_zyx)
    return np.concatenate(point_parts), np.concatenate(owner_parts)


def _more_probable(probabilities: np.ndarray, box: Slices, frag: _Component,
                   own: int, other: int) -> int:
    """The bone (own or other) with the higher mean probability over the fragment."""
    full = tuple(slice(b.start + s.start, b.start + s.stop) for b, s in zip(box, frag.box))
    m = frag.mask()
    p_own = float(probabilities[own][full][m].mean())
    p_other = float(probabilities[other][full][m].mean())
    return other if p_other > p_own else own
