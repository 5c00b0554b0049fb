"""Labels far from the registered healthy template: bones the segmentation wrongly called
tibia or fibula (the calcaneus, the talus, a metatarsal).

The segmentation network sees an 80 mm patch at a time, and a foot bone's cortex around its
marrow looks like a shaft's section in such a patch: on real-shape phantoms with the foot in
view it labels parts of the calcaneus and the talus tibia or fibula (issue 13 item 4: "foot
bones are never tibia or fibula"). The post-processing rules of
:mod:`AnkleFractureLib.segmentation.postprocess` remove what lies apart from the leg's bones;
a piece joined to the tibia, or larger than the distal fibula in a short scan, survives them.

Once the registration has placed the healthy template on the patient, the template says
where a tibia and a fibula can be. Every labelled voxel of the analysed leg is mapped into the
template (patient LPS mm -> template mm, the registration's similarity) and its distance to
the template's bone of the same label is read (template mm, turned into patient mm by the
registration's scale). A voxel farther than :data:`MARGIN_MM` from its bone is not that bone
and leaves the labels. The margins hold what separates a patient's bone from the mean shape
after a similarity fit (the fibula's tip and its distance from the tibia vary most), a
displaced fragment (up to 6 mm) and a fit a few mm off: on the real-shape development phantoms
(``seg_ff_train``) no true tibia voxel lies farther than 8 mm from the template's tibia and
no true fibula voxel farther than 15 mm from the template's fibula, while the calcaneus and
the lower talus lie 15-40 mm from both.

The template covers only the distal shafts: above its proximal end (less
:data:`TOP_MARGIN_MM`) there is nothing to compare with and the labels stay.

Arrays are numpy (z, y, x); points are (N, 3) (x, y, z) in mm.

Example:
    >>> import numpy as np
    >>> from AnkleFractureLib.phantom import generate_case
    >>> from AnkleFractureLib.registration import load_template, register_to_template
    >>> case = generate_case(3, "B", "right")
    >>> template = load_template()
    >>> reg = register_to_template(case.label, template, ct=case.ct)
    >>> stray = case.label.array.copy()
    >>> stray[2:8, 2:8, 2:8] = 1  # a "tibia" in the scan's corner, far from any tibia
    >>> cleaned, removed = apply_shape_prior(case.label.with_array(stray), reg, template)
    >>> removed["tibia_ml"] > 0, bool(cleaned.array[4, 4, 4] == 0)
    (True, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

import numpy as np

from AnkleFractureLib.errors import AnkleFractureError, CancelledError
from AnkleFractureLib.geometry.volume import Volume

if TYPE_CHECKING:  # pragma: no cover
    from scipy.spatial import cKDTree

    from AnkleFractureLib.registration.register import Registration
    from AnkleFractureLib.registration.template import Template

#: Largest distance (patient mm) of a labelled voxel from the registered template's bone of the
#: same label (1 tibia, 2 fibula); farther voxels are not that bone.
MARGIN_MM = {1: 10.0, 2: 15.0}
#: Within this many template mm of the template's proximal end the prior says nothing (the
#: template's shafts end there, a patient's go on).
TOP_MARGIN_MM = 15.0
#: A connected piece of a label that loses at least this share of its voxels to the prior
#: leaves whole: the rest of a calcaneus called fibula lies within the margin of the fibula's
#: tip, not in the fibula.
PIECE_SHARE = 0.5
#: Side (mm) of the blocks in which :func:`far_voxels` reads the labels first.
BLOCK_MM = 4.0
NAMES = {1: "tibia", 2: "fibula"}
#: The prior's removals (ml, both bones) from which the leg is registered again on the
#: cleaned labels: the first fit had matched those foot bones too.
REFIT_ML = 1.0
#: The refit is kept unless its surface RMS (mm) exceeds the first fit's by more than this:
#: the two fit different label sets, so equal fits differ by a few hundredths of a mm.
REFIT_RMS_SLACK_MM = 0.25


class TemplateDistances:
    """Distance (template mm) from any template point to the template's tibia or fibula.

    Inside the template's grid the distance map of each bone (exact Euclidean, 0 inside the
    bone) is read at the nearest voxel; outside it, the distance to the bone's nearest surface
    point (a KD-tree of the template's surface points), since there the point is outside the
    bone. Built once per template (about 0.1 s).

    Args:
        template: The :class:`~AnkleFractureLib.registration.template.Template`.
    """

    def __init__(self, template: "Template") -> None:
        from scipy import ndimage as ndi

        self.grid: Volume = template.labels
        arr = np.asarray(self.grid.array)
        sampling = np.asarray(self.grid.spacing, dtype=float)[::-1]
        self.maps = {v: ndi.distance_transform_edt(arr != v, sampling=sampling).astype(np.float32)
                     for v in NAMES}
        self._points = {v: np.asarray(template.points)[template.point_labels == v]
                        for v in NAMES}
        self._trees: Dict[int, "cKDTree"] = {}  # built on first need (a cold run rarely has)
        top = self.grid.index_to_physical(np.array([[0, 0, self.grid.size[2] - 1]]))[0, 2]
        bottom = self.grid.index_to_physical(np.array([[0, 0, 0]]))[0, 2]
        #: Template z (mm) above which the prior says nothing.
        self.top_z = float(max(top, bottom)) - TOP_MARGIN_MM

    def _tree(self, bone: int) -> "cKDTree":
        """KD-tree of the template's surface points of ``bone``."""
        if bone not in self._trees:
            from scipy.spatial import cKDTree

            self._trees[bone] = cKDTree(self._points[bone])
        return self._trees[bone]

    def distance(self, points: np.ndarray, bone: int) -> np.ndarray:
        """Distances (N,) template mm from ``points`` (N, 3) template mm to ``bone``; NaN
        above :attr:`top_z`."""
        inv = np.linalg.inv(self.grid.affine)
        idx = np.asarray(points, float) @ inv[:3, :3].T + inv[:3, 3]
        return self.distance_at_index(idx, bone)

    def distance_at_index(self, idx: np.ndarray, bone: int) -> np.ndarray:
        """As :meth:`distance`, for points given as continuous indices (N, 3) (i, j, k) of the
        template's grid (any float dtype)."""
        i = np.rint(idx).astype(np.int32)
        nx, ny, nz = self.grid.size
        inside = ((i[:, 0] >= 0) & (i[:, 1] >= 0) & (i[:, 2] >= 0) & (i[:, 0] < nx)
                  & (i[:, 1] < ny) & (i[:, 2] < nz))
        out = np.empty(idx.shape[0], dtype=np.float32)
        ii = i[inside]
        out[inside] = self.maps[bone][ii[:, 2], ii[:, 1], ii[:, 0]]
        a = self.grid.affine
        z_mm = idx @ a[2, :3].astype(idx.dtype) + a[2, 3]
        if not inside.all():
            pts = idx[~inside].astype(np.float64) @ a[:3, :3].T + a[:3, 3]
            out[~inside] = self._tree(bone).query(pts)[0]
        out[z_mm > self.top_z] = np.nan
        return out


def _box_to_template(label: Volume, box: Tuple[slice, ...], patient_to_template: np.ndarray,
                     distances: TemplateDistances) -> np.ndarray:
    """4x4 (float32): label index (i, j, k) within ``box`` -> template grid index (float32 is
    ample: template indices are below 10^3, a rounding error of 10^-4 voxel)."""
    shift = np.eye(4)
    shift[:3, 3] = [box[2].start, box[1].start, box[0].start]
    return (np.linalg.inv(distances.grid.affine) @ np.asarray(patient_to_template, float)
            @ label.affine @ shift).astype(np.float32)


def _far_in(kji: Tuple[np.ndarray, ...], m: np.ndarray, bone: int, limit: float,
            distances: TemplateDistances) -> np.ndarray:
    """Which of the points ``kji`` (box indices, z, y, x) lie farther than ``limit`` template
    mm from ``bone`` (bool, NaN above the template: False)."""
    k, j, i = kji
    ijk = np.stack([i, j, k], axis=1).astype(np.float32)
    return distances.distance_at_index(ijk @ m[:3, :3].T + m[:3, 3], bone) > limit


def far_voxels(label: Volume, patient_to_template: np.ndarray, scale: float,
               distances: TemplateDistances, margins: Dict[int, float] = MARGIN_MM
               ) -> Dict[int, np.ndarray]:
    """Flat indices (into ``label.array``) of the labelled voxels farther than the margin from
    the template's bone of their label.

    Exact, and fast on clinical grids (a few million labelled voxels): the labels are read in
    blocks of about :data:`BLOCK_MM`; a block whose centre lies closer than the margin less
    the block's half-diagonal (and a template voxel's diagonal, for the nearest-voxel reading)
    holds no far voxel, since a distance changes by at most the distance moved, so only the
    other blocks are read voxel by voxel.

    Args:
        label: Label map (1 tibia, 2 fibula; one leg), any grid and direction.
        patient_to_template: 4x4 patient LPS mm -> template mm (the registration's).
        scale: Template size / patient size (the registration's isotropic scale).
        distances: The template's :class:`TemplateDistances`.
        margins: Largest distance (patient mm) per label.

    Returns:
        {label: int64 flat indices}, per label of ``margins``.
    """
    from AnkleFractureLib.geometry.arrays import bounding_box

    arr = np.asarray(label.array)
    far: Dict[int, np.ndarray] = {b: np.zeros(0, np.int64) for b in margins}
    box = bounding_box(arr)
    if box is None:
        return far
    sub = arr[box]
    m = _box_to_template(label, box, patient_to_template, distances)
    sp = np.asarray(label.spacing, float)[::-1]  # (z, y, x) mm
    step = np.maximum(np.rint(BLOCK_MM / sp), 1).astype(int)
    half = 0.5 * float(np.linalg.norm((step - 1) * sp))  # patient mm, centre to corner
    for bone, margin in margins.items():
        limit = margin * float(scale)  # template mm
        blocks = _blocks_with(sub == bone, step)
        centres = tuple((np.asarray(b) * s + (s - 1) / 2.0) for b, s in zip(blocks, step))
        # The distance is read at the nearest template voxel: moving a point by x changes it
        # by at most x plus the template voxel's diagonal.
        slack = float(np.linalg.norm(distances.grid.spacing))
        maybe = _far_in(centres, m, bone, (margin - half) * float(scale) - slack, distances)
        hits = []
        for bk, bj, bi in zip(*(b[maybe] for b in blocks)):
            sl = tuple(slice(b * s, (b + 1) * s) for b, s in zip((bk, bj, bi), step))
            kji = np.nonzero(sub[sl] == bone)
            kji = tuple(x + q.start for x, q in zip(kji, sl))
            inside = _far_in(kji, m, bone, limit, distances)
            hits.append(tuple(x[inside] + q.start for x, q in zip(kji, box)))
        if hits:
            far[bone] = np.ravel_multi_index(
                tuple(np.concatenate([h[a] for h in hits]) for a in range(3)), arr.shape
            ).astype(np.int64)
    return far


def _blocks_with(mask: np.ndarray, step: np.ndarray) -> Tuple[np.ndarray, ...]:
    """Block indices (z, y, x arrays) of the ``step``-sized blocks of ``mask`` that hold a
    True voxel."""
    shape = np.asarray(mask.shape)
    padded = -(-shape // step) * step
    if np.any(padded != shape):
        mask = np.pad(mask, [(0, int(p - n)) for p, n in zip(padded, shape)])
    nb = padded // step
    view = mask.reshape(nb[0], step[0], nb[1], step[1], nb[2], step[2])
    return np.nonzero(view.any(axis=(1, 3, 5)))


def apply_shape_prior(label: Volume, registration: "Registration",
                      template: Optional["Template"] = None,
                      distances: Optional[TemplateDistances] = None,
                      margins: Dict[int, float] = MARGIN_MM) -> Tuple[Volume, Dict[str, float]]:
    """Remove the labelled voxels that lie too far from the registered template's bones.

    Args:
        label: Label map of the analysed leg (1 tibia, 2 fibula).
        registration: Its :class:`~AnkleFractureLib.registration.register.Registration`.
        template: The template registered to (used when ``distances`` is None).
        distances: Precomputed :class:`TemplateDistances` of that template.
        margins: Largest distance (patient mm) per label (:data:`MARGIN_MM`).

    Returns:
        (the label map without those voxels (a new Volume; ``label`` itself when nothing is
        removed), {"tibia_ml", "fibula_ml": the volumes removed}).
    """
    if distances is None:
        distances = TemplateDistances(template)
    far = far_voxels(label, registration.patient_to_template, registration.scale, distances,
                     margins)
    voxel_ml = float(np.prod(label.spacing)) / 1000.0
    if not any(idx.size for idx in far.values()):
        return label, {f"{NAMES[b]}_ml": 0.0 for b in far}
    arr = np.array(label.array, copy=True)
    removed = {}
    for bone, idx in far.items():
        gone = _remove_with_pieces(arr, bone, idx) if idx.size else 0
        removed[f"{NAMES[bone]}_ml"] = round(float(gone) * voxel_ml, 3)
    return label.with_array(arr), removed


def _remove_with_pieces(arr: np.ndarray, bone: int, far_flat: np.ndarray) -> int:
    """Zero, in place, the voxels ``far_flat`` of label ``bone`` and every connected piece of
    that label (26-connected) that loses at least :data:`PIECE_SHARE` of its voxels to them;
    returns how many voxels were zeroed (counted in the bone's box, not the whole grid)."""
    from scipy import ndimage as ndi

    from AnkleFractureLib.geometry.arrays import bounding_box

    mask = arr == bone
    box = bounding_box(mask)
    pieces, _ = ndi.label(mask[box], structure=np.ones((3, 3, 3), bool))
    kji = np.unravel_index(far_flat, arr.shape)
    hit = pieces[tuple(k - b.start for k, b in zip(kji, box))]
    size = np.bincount(pieces.ravel())
    lost = np.bincount(hit, minlength=size.size)
    whole = np.flatnonzero((lost >= PIECE_SHARE * np.maximum(size, 1)) & (lost > 0))
    whole = whole[whole > 0]
    before = int(np.count_nonzero(pieces))
    arr.ravel()[far_flat] = 0
    sub = arr[box]  # a view: zeroing it zeroes arr
    if whole.size:
        sub[np.isin(pieces, whole)] = 0
    return before - int(np.count_nonzero(sub == bone))


def describe_shape_prior(details: Dict[str, float]) -> str:
    """One plain line for the report and the panel from the finding's ``details``.

    Example:
        >>> describe_shape_prior({"tibia_ml": 14.3, "fibula_ml": 0.0, "margin_tibia_mm": 10.0,
        ...                       "margin_fibula_mm": 15.0})
        'Labels taken out, far from the healthy tibia / fibula (foot bones?): 14.3 ml tibia, 0.0 ml fibula'
    """
    again = "; the leg registered again without them" if details.get("registered_again") else ""
    return (f"Labels taken out, far from the healthy tibia / fibula (foot bones?): "
            f"{float(details.get('tibia_ml', 0.0)):.1f} ml tibia, "
            f"{float(details.get('fibula_ml', 0.0)):.1f} ml fibula{again}")


@dataclass
class PriorOutcome:
    """What :func:`prior_and_refit` did.

    Attributes:
        label: The labels without the far voxels (the input Volume when none was far).
        registration: The registration to go on with: the refit when it was kept, else the
            first.
        removed: {"tibia_ml", "fibula_ml"} taken out of the labels.
        registered_again: Whether the refit was made and kept.
    """

    label: Volume
    registration: Any
    removed: Dict[str, float]
    registered_again: bool = False


def prior_and_refit(label: Volume, registration: "Registration", *,
                    template: Optional["Template"] = None,
                    distances: Optional[TemplateDistances] = None,
                    register: Optional[Callable[[Volume], Any]] = None,
                    accept: Optional[Callable[[Any, Volume], bool]] = None) -> PriorOutcome:
    """The shape prior, then the leg registered again on the cleaned labels when it removed
    :data:`REFIT_ML` or more, exactly as ``ankle-fracture run`` does it and as the training
    crops (``crop_case``) must see it.

    The refit is kept unless ``register`` fails, ``accept`` rejects it (the caller's checks
    refuse it: the pipeline's findings, or :func:`~AnkleFractureLib.registration.quality.
    refused` for a training crop) or its surface RMS exceeds the first fit's by more than
    :data:`REFIT_RMS_SLACK_MM`.

    Args:
        label: Label map of the analysed leg (1 tibia, 2 fibula), the one ``registration``
            fitted.
        registration: Its registration.
        template: The template registered to (when ``distances`` is None).
        distances: Precomputed :class:`TemplateDistances` of that template.
        register: Registers a label map as the first fit was made (raises
            :class:`~AnkleFractureLib.errors.AnkleFractureError` on failure); None: no refit
            (the caller gave the registration, so it stays).
        accept: ``accept(refit, cleaned_label)``: whether the checks let the refit through
            (None: always; the RMS rule still applies).

    Returns:
        The :class:`PriorOutcome`.
    """
    cleaned, removed = apply_shape_prior(label, registration, template, distances=distances)
    out = PriorOutcome(cleaned, registration, removed)
    if cleaned is label or register is None or sum(removed.values()) < REFIT_ML:
        return out
    try:
        refit = register(cleaned)
    except CancelledError:
        raise
    except AnkleFractureError:
        return out
    if float(refit.rms_mm) > float(registration.rms_mm) + REFIT_RMS_SLACK_MM:
        return out
    if accept is not None and not accept(refit, cleaned):
        return out
    return PriorOutcome(cleaned, refit, removed, registered_again=True)
