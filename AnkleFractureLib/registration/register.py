"""Mirror + ICP registration of a tibia/fibula segmentation onto the healthy template.

The full map from the patient to the template is kept explicit::

    patient_to_template = icp_similarity @ mirror

where ``mirror`` is :data:`MIRROR_X` (reflection of the patient's x axis, LPS) for a left ankle
and the identity for a right one, and ``icp_similarity`` (rotation, translation, isotropic scale)
comes from trimmed, label-aware ICP between the segmentation's surface points and the template's
(:func:`AnkleFractureLib.registration.icp.similarity_icp`). The matrix maps patient LPS mm to
template mm and is always invertible.

A long, near-cylindrical shaft fits itself anywhere along its length, so only the distal
features (plafond, malleoli, metaphyseal flare) fix where the joint is. Three choices keep the
fit from sliding along the shaft when the patient's bones or field of view differ from the
template's: the ICP starts align the distal 60 mm of both clouds rather than their centroids
(:data:`LONG_AXIS`); the tibia and the fibula are trimmed separately (:data:`LABEL_TRIM`), so
the fit cannot discard the distal tibia; and points beyond the template's proximal end, or on
the scan's cut faces, take no part.

Example:
    >>> from AnkleFractureLib.phantom import generate_case
    >>> case = generate_case(3, "B", "left")
    >>> reg = register_to_template(case.label, ct=case.ct)
    >>> reg.side, reg.mirrored, reg.rms_mm < 2.0
    ('left', True, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from AnkleFractureLib.errors import AnkleFractureError, GeometryError, InputError
from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.registration.labels import check_overlap

#: Reflection of the patient's x (left-right) axis, LPS, as a 4x4 matrix. Its own inverse.
MIRROR_X = np.diag([-1.0, 1.0, 1.0, 1.0])

#: Above this RMS surface distance (mm) the fit is reported as poor. Healthy phantoms fit at
#: 0.7-0.9 mm; a displaced Weber C fibula legitimately raises it to about 2-2.3 mm.
POOR_FIT_RMS_MM = 3.0
#: Weight of fibula points relative to tibia points in the final point-to-plane ICP. Weber
#: fractures displace the fibula (and a C fracture widens the syndesmosis), so the tibia
#: anchors the frame; the fibula, lightly weighted, still fixes the rotation about the tibial
#: axis. On 22 phantoms of the template's anatomy this cut the worst error at the syndesmosis
#: from 6.1 mm (point-to-point, equal weights) to under 1 mm.
LABEL_WEIGHTS = {1: 1.0, 2: 0.1}
#: Fraction of each bone's closest correspondences kept in every ICP step (trimmed ICP, per
#: label). Trimming 15 % of all points together (the previous rule) let a fit drop the distal
#: tibia (plafond and medial malleolus, about 15 % of the tibial points) and slide 6-55 mm along
#: the shaft while shrinking, on other anatomies than the template's and on scans ending
#: 40-95 mm above the joint. Keeping 95 % of the tibia leaves room for a malleolar fragment or
#: a segmentation defect but not for the joint; the fibula, displaced by every Weber fracture
#: (and widened away from the tibia by a C), keeps only its closest 60 %. On 94 phantom fits
#: (different anatomies, truncated scans) 0.90 for the tibia let one truncated scan slide 35 mm;
#: fibula fractions of 0.5-0.75 gave similar plafond errors (worst 1.1-1.5 mm), 0.6 rather than
#: 0.75 halved the worst syndesmosis error on the template's own anatomy (0.70 -> 0.31 mm).
LABEL_TRIM = {1: 0.95, 2: 0.6}
#: The template's long axis (template frame: z superior), from the ankle joint, which every
#: scan holds, up the leg, where scans end at different heights (see ``long_axis`` of
#: :func:`~AnkleFractureLib.registration.icp.similarity_icp`).
LONG_AXIS = np.array([0.0, 0.0, 1.0])
#: The patient's superior direction (LPS +z, unchanged by :data:`MIRROR_X`): a fit must not
#: turn it upside down against :data:`LONG_AXIS` (more than
#: :data:`~AnkleFractureLib.registration.icp.MAX_AXIS_ANGLE_DEG`). LPS is a patient frame, so
#: the tibia points up in it whatever the scanner set-up; an upside-down fit (foot bones
#: labelled tibia matched to the template's shaft, the real shaft hidden beyond the template's
#: proximal end) won with surface inliers of 91-95 % on 3 of 8 such phantoms without this.
PATIENT_SUPERIOR = np.array([0.0, 0.0, 1.0])
#: Surface distance (mm) within which a point counts as an inlier (see
#: :data:`~AnkleFractureLib.registration.icp.INLIER_DISTANCE_MM` for the choice).
INLIER_DISTANCE_MM = 2.5
#: With a plafond hint (the plafond found on the label map itself), a fit that puts the
#: template's plafond farther than this from it (mm) is tried again anchored on the hint.
JOINT_RETRY_MM = 8.0
#: On that retry, surface points more than this far (mm) below the hint are left out: the
#: malleolar tips end 10-30 mm below the plafond, so lower labels are foot bones or specks.
BELOW_JOINT_MM = 40.0
#: With a plafond hint, tibia surface points more than this far (mm) below it are left out of
#: every fit: the medial malleolus ends 11-17 mm below the plafond (16 single-leg real-shape
#: validation phantoms), so lower "tibia" is the talus or a foot bone that the segmentation
#: joined to the tibia. A talar shell labelled tibia down to 40 mm below the joint, part of the
#: tibia's main piece, pulled a fit 30 mm along the shaft with scale 0.96 (true 1.18), and the
#: re-anchored refit found the same minimum; without those points it lands 4 mm from the joint.
TIBIA_BELOW_JOINT_MM = 25.0
#: With a plafond hint, surface points more than this far (mm) above it are left out of every
#: fit: the template reaches 130 mm above its plafond (180 mm at the largest plausible scale),
#: so the rest of a whole-leg scan's shafts (and the knee) has nothing to match and only
#: pulls the scale down.
ABOVE_JOINT_MM = 200.0
#: The anchored refit is kept when its surface RMS is at most this much (mm) worse than the
#: first fit's (or than POOR_FIT_RMS_MM); the poor-fit checks still judge it afterwards.
RETRY_RMS_SLACK_MM = 1.0
#: Below this inlier fraction the fit is reported as poor. The fraction is weighted like the
#: fit (:data:`LABEL_WEIGHTS`), so the fibula a fracture displaced does not make a poor fit
#: (unweighted, good Weber C fits score 0.59). Measured (weighted, 2.5 mm): good fits 0.87-1.00
#: on 94 phantom fits (26 anatomies of their own, 40 test-set phantoms, 28 truncated scans,
#: all classes), 0.79-0.92 with a +-2 voxel random error on the label boundaries; bad ones:
#: foot bones labelled tibia 0.43-0.60 (6 phantoms; 2 more refused), the good fits moved 5 mm
#: sideways 0.42-0.55, 20 mm along the shaft 0.55-0.67, tilted 20 degrees 0.25-0.84. 0.7 lies
#: in the gap; the old 0.6 passed one of the foot-bone fits (0.599). Insensitive by design to
#: turns about the shaft (45 degrees: 0.70-0.85) and blind to a mirror image (wrong side:
#: 0.90-0.96), which side detection and the plafond check have to catch.
POOR_FIT_INLIERS = 0.7
#: Outside this scale range the patient's bones are reported as unusually sized.
PLAUSIBLE_SCALE = (0.75, 1.33)
#: Minimum bone volume (mm^3) for a label to count as present (a few specks are not a bone).
MIN_BONE_MM3 = 200.0

ProgressCallback = Callable[[float, str], None]


@dataclass
class Registration:
    """The result of :func:`register_to_template`.

    Attributes:
        patient_to_template: 4x4 matrix, patient LPS mm -> template mm (mirror included).
        side: "left" or "right".
        mirrored: True when the patient's x axis was reflected (left ankle).
        rms_mm: RMS distance (mm) of the closest ``trim_fraction`` (85 %) of the surface
            correspondences after ICP.
        inlier_fraction: Fraction of the surface points within :data:`INLIER_DISTANCE_MM` of the
            template's surface (same bone) after the fit, weighted by :data:`LABEL_WEIGHTS`;
            points beyond the template's proximal end are not counted.
        iterations: ICP iterations of the winning start.
        converged: ICP met its tolerance before the iteration limit.
        scale: Isotropic scale of the similarity (template size / patient size).
        side_confidence: Confidence of the automatic side detection (1.0 when given).
        side_reason: Why that side (plain words).
        warnings: Plain-language warnings (poor fit, unusual scale, ...).
    """

    patient_to_template: np.ndarray
    side: str
    mirrored: bool
    rms_mm: float
    inlier_fraction: float
    iterations: int
    converged: bool
    scale: float
    side_confidence: float = 1.0
    side_reason: str = "given by the caller"
    warnings: List[str] = field(default_factory=list)

    @property
    def template_to_patient(self) -> np.ndarray:
        """Inverse map, template mm -> patient LPS mm."""
        return np.linalg.inv(self.patient_to_template)

    def to_json(self) -> Dict[str, Any]:
        """``transform.json`` content (the keys the command line writes)."""
        return {
            "patient_to_template": [[float(v) for v in row] for row in self.patient_to_template],
            "side": self.side,
            "mirrored": bool(self.mirrored),
            "rms_mm": round(float(self.rms_mm), 4),
            "inlier_fraction": round(float(self.inlier_fraction), 4),
            "inlier_distance_mm": INLIER_DISTANCE_MM,
            "iterations": int(self.iterations),
            "converged": bool(self.converged),
            "scale": round(float(self.scale), 5),
            "side_confidence": round(float(self.side_confidence), 4),
            "side_reason": self.side_reason,
            "warnings": list(self.warnings),
            "frame": "LPS mm (patient) -> template mm",
        }

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "Registration":
        """Inverse of :meth:`to_json` (as returned by ``read_transform_json``)."""
        return cls(np.asarray(data["patient_to_template"], dtype=float), data["side"],
                   bool(data["mirrored"]), float(data["rms_mm"]), float(data["inlier_fraction"]),
                   int(data["iterations"]), bool(data.get("converged", True)),
                   float(data.get("scale", np.nan)), float(data.get("side_confidence", 1.0)),
                   str(data.get("side_reason", "")), list(data.get("warnings", [])))


def check_label_map(label: Volume, where: Any = None) -> None:
    """Refuse label maps that cannot be registered: not integer, values other than 0/1/2, or a
    missing (or speck-sized) tibia or fibula."""
    where = where if where is not None else label.meta.get("source")
    arr = label.array
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.mod(arr, 1) == 0):
            raise InputError(where, f"segmentation must hold integer labels, got {arr.dtype} values")
    # No int64 copy of a clinical-size volume: min/max are cheap passes, and the bone volumes
    # only need to be estimated (against a speck threshold), so every second voxel per axis is
    # counted.
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi > 2:
        raise InputError(where, "segmentation values must be 0 (background), 1 (tibia) or "
                                f"2 (fibula), found values from {lo} to {hi}")
    sub = arr[::2, ::2, ::2]
    counts = {v: int(np.count_nonzero(sub == v)) for v in (1, 2)}
    voxel_mm3 = float(np.prod(label.spacing)) * arr.size / max(sub.size, 1)
    missing = [name for name, value in (("tibia", 1), ("fibula", 2))
               if counts[value] * voxel_mm3 < MIN_BONE_MM3]
    if missing:
        what = " and ".join(missing)
        raise InputError(where, f"no {what} in the segmentation (less than {MIN_BONE_MM3:.0f} mm^3 "
                                f"labelled); registration needs both bones")


def register_to_template(label: Volume, template: Any = None, side: str = "auto",
                         ct: Optional[Volume] = None, *, max_iterations: int = 50,
                         tolerance: float = 1e-8, trim_fraction: float = 0.85,
                         max_points: int = 4000, seed: int = 0,
                         progress: Optional[ProgressCallback] = None,
                         plafond_hint: Optional[np.ndarray] = None,
                         side_detection: Any = None) -> Registration:
    """Mirror (left ankles) and ICP-register a tibia/fibula label map onto the template.

    Args:
        label: uint8 label map (0 background, 1 tibia, 2 fibula), any grid, LPS.
        template: A :class:`~AnkleFractureLib.registration.template.Template`; the shipped
            healthy right-ankle template when None.
        side: "auto" (detect from the anatomy), "left" or "right".
        ct: The CT the labels belong to (optional): lets side detection notice both legs in the
            field of view, and checks that the labels overlap it.
        max_iterations: ICP iteration limit (the reference method uses 50).
        tolerance: ICP convergence threshold on the change of the trimmed mean squared error
            (the reference method uses 1e-8).
        trim_fraction: Fraction of closest correspondences over which ``rms_mm`` is reported
            (each bone's fit trims by :data:`LABEL_TRIM`, so a displaced fragment or a
            different field of view does not drag the fit).
        max_points: Surface points sampled per bone.
        seed: Seed of the surface point subsampling (results are deterministic).
        progress: Optional callback (fraction in [0, 1], message).
        plafond_hint: Optional tibial plafond (3,) LPS mm found on ``label`` itself (e.g.
            :func:`AnkleFractureLib.registration.leg.estimate_plafond`). A fit that lands the
            template's plafond more than :data:`JOINT_RETRY_MM` from it (a fit that slid
            along the shaft, e.g. pulled by a mislabelled piece of foot) is run again from a
            start anchored on the hint, without the points far below it, and the fit that
            places the joint better is kept (noted in ``warnings``). Points more than
            :data:`ABOVE_JOINT_MM` above the hint are left out of every fit (a whole-leg
            scan: the template is a distal leg).
        side_detection: The :class:`~AnkleFractureLib.registration.side.SideDetection` of
            ``detect_side(label, ct)`` when the caller already has it (the pipeline's checks
            tell the side before the registration); used only with ``side="auto"``.

    Returns:
        The :class:`Registration`.

    Raises:
        InputError: Empty or one-bone masks, masks outside the CT, a side that cannot be told
            (with the reason; pass ``side`` explicitly), or an absurd scale.
    """
    from AnkleFractureLib.registration.icp import similarity_icp
    from AnkleFractureLib.registration.template import load_template

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(fraction, message)

    if side not in ("auto", "left", "right"):
        raise ValueError(f"side must be 'auto', 'left' or 'right', got {side!r}")
    where = label.meta.get("source")
    check_label_map(label, where)
    if ct is not None:
        check_overlap(label, ct, where)
    if template is None:
        template = load_template()

    report(0.05, "detecting the side")
    side_, confidence, reason = _resolve_side(label, ct, side, where, side_detection)
    mirror = MIRROR_X if side_ == "left" else np.eye(4)

    report(0.2, "extracting bone surfaces")
    points, point_labels = _fit_points(label, mirror, max_points, seed)

    report(0.4, "ICP registration to the template")

    def fit(pts: np.ndarray, labs: np.ndarray, init: Optional[np.ndarray] = None) -> Any:
        return similarity_icp(pts, template.points, source_labels=labs,
                              target_labels=template.point_labels, max_iterations=max_iterations,
                              tolerance=tolerance, trim_fraction=trim_fraction, with_scale=True,
                              target_normals=template_normals(template),
                              label_weights=LABEL_WEIGHTS, label_trim=LABEL_TRIM,
                              long_axis=LONG_AXIS, source_axis=PATIENT_SUPERIOR,
                              inlier_distance_mm=INLIER_DISTANCE_MM, init=init)

    notes: List[str] = []
    hint = None
    if plafond_hint is not None:
        hint = mirror[:3, :3] @ np.asarray(plafond_hint, dtype=float).reshape(3)
        points, point_labels = _near_the_joint(points, point_labels, hint)
    try:
        icp = fit(points, point_labels)
        if hint is not None:
            icp = _anchor_on_joint(icp, fit, points, point_labels, template, hint, notes)
            icp = _without_foot_pieces(icp, fit, label, mirror, (max_points, seed), template,
                                       hint, plafond_hint, notes)
    except GeometryError as exc:
        raise InputError(where, f"registration failed: {exc}") from None
    warnings = notes + _fit_warnings(icp, confidence, reason)
    report(1.0, "registered")
    return Registration(icp.matrix @ mirror, side_, side_ == "left", float(icp.rms_mm),
                        float(icp.inlier_fraction), int(icp.iterations), bool(icp.converged),
                        float(icp.scale), confidence, reason, warnings)


def _resolve_side(label: Volume, ct: Optional[Volume], side: str, where: Any,
                  detection: Any = None) -> Tuple[str, float, str]:
    """(side, confidence in [0, 1], reason): detected when ``side`` is "auto" (``detection``
    when given, else ``detect_side(label, ct)``), else given.

    Raises:
        InputError: The side cannot be told from the anatomy.
    """
    from AnkleFractureLib.registration.side import detect_side

    if side != "auto":
        return side, 1.0, "given by the caller"
    if detection is None:
        detection = detect_side(label, ct)
    if detection.side is None:
        raise InputError(where, f"cannot tell left from right: {detection.reason}; "
                                "give the side explicitly (side='left' or 'right')")
    return detection.side, float(detection.confidence), detection.reason


def _fit_points(label: Volume, mirror: np.ndarray, max_points: int, seed: int
                ) -> Tuple[np.ndarray, np.ndarray]:
    """Bone surface points (N, 3) LPS mm, mirrored to the template's side, and their labels."""
    from AnkleFractureLib.registration.surface import labelled_surface_points, main_pieces

    # The faces where the field of view cut the bones are no bone surface: left out, they
    # neither pull the fit nor count as outliers.
    points, point_labels = labelled_surface_points(label, max_points_per_bone=max_points, seed=seed,
                                                   exclude_edges=True)
    # Only each bone's largest piece (fragments within LINK_MM included): a stray blob far away
    # would pull the fit along the shaft.
    main = main_pieces(points, point_labels)
    return points[main] @ mirror[:3, :3].T, point_labels[main]  # MIRROR_X has no translation


def _near_the_joint(points: np.ndarray, labels: np.ndarray, hint: np.ndarray
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """The surface points (N, 3) mirrored LPS mm, and their labels, at most
    :data:`ABOVE_JOINT_MM` above the plafond ``hint`` and, for the tibia, at most
    :data:`TIBIA_BELOW_JOINT_MM` below it (all of them when fewer than both bones would
    remain). No warning: the template is a distal leg by design, so a scan that reaches the
    knee is registered on its distal part as a matter of course, and the tibia never reaches
    that far below its own plafond."""
    z = points[:, 2]  # LPS z is superior (mirroring keeps it)
    too_low = (labels == 1) & (z < hint[2] - TIBIA_BELOW_JOINT_MM)
    keep = (z <= hint[2] + ABOVE_JOINT_MM) & ~too_low
    if keep.all() or len(np.unique(labels[keep])) < 2:
        return points, labels
    return points[keep], labels[keep]


def _joint_miss(matrix: np.ndarray, template: Any, hint: np.ndarray) -> float:
    """Distance (mm) from ``hint`` (mirrored patient mm) to where ``matrix`` (mirrored patient
    -> template) puts the template's plafond."""
    inv = np.linalg.inv(matrix)
    plafond = np.asarray(template.plafond, dtype=float).reshape(3)
    return float(np.linalg.norm(inv[:3, :3] @ plafond + inv[:3, 3] - hint))


def _anchor_on_joint(icp: Any, fit: Callable[..., Any], points: np.ndarray,
                     labels: np.ndarray, template: Any, hint: np.ndarray,
                     notes: List[str]) -> Any:
    """``icp``, or a refit anchored on the plafond ``hint`` when that places the joint better.

    The refit starts from ``icp`` shifted so that the template's plafond lands on the hint,
    and leaves out the points more than :data:`BELOW_JOINT_MM` below it. It is kept when it
    moves the joint closer to the hint and its surface RMS is at most
    :data:`RETRY_RMS_SLACK_MM` worse.
    """
    miss = _joint_miss(icp.matrix, template, hint)
    if miss <= JOINT_RETRY_MM:
        return icp
    keep = points[:, 2] >= hint[2] - BELOW_JOINT_MM  # LPS z is superior (mirroring keeps it)
    if len(np.unique(labels[keep])) < 2:
        return icp
    start = np.array(icp.matrix, dtype=float)
    at = start[:3, :3] @ hint + start[:3, 3]
    start[:3, 3] += np.asarray(template.plafond, dtype=float).reshape(3) - at
    try:
        refit = fit(points[keep], labels[keep], init=start)
    except GeometryError:
        return icp
    miss2 = _joint_miss(refit.matrix, template, hint)
    # A fit that slid along the shaft can match the surface as well as the right one (a
    # cylinder fits anywhere along itself): the joint decides, within RETRY_RMS_SLACK_MM.
    if miss2 < miss and refit.rms_mm <= max(icp.rms_mm, POOR_FIT_RMS_MM) + RETRY_RMS_SLACK_MM:
        notes.append(f"re-anchored at the ankle joint: the first fit placed the template's "
                     f"plafond {miss:.0f} mm from the plafond of the labels, the kept fit "
                     f"{miss2:.0f} mm")
        return refit
    return icp


def pieces_below_joint(label: Volume, plafond_hint: np.ndarray) -> np.ndarray:
    """bool (z, y, x): the tibia and fibula pieces that lie wholly below the plafond and are not
    their bone's largest piece.

    Below the joint the tibia and fibula end in the malleoli, which belong to the bone's main
    piece; a separate piece there is a foot bone the segmentation mislabelled (a talus piece
    labelled tibia), or a small malleolar fragment. Either way the registration is better off
    without it: a few thousand such voxels turned one fit 45 degrees and shrank it by a quarter.

    Args:
        label: uint8 (z, y, x) label map (1 tibia, 2 fibula), LPS.
        plafond_hint: (3,) LPS mm of the plafond on ``label``.

    Returns:
        The mask (all False when there is no such piece).

    Example:
        >>> from AnkleFractureLib.geometry.volume import Volume
        >>> a = np.zeros((30, 6, 6), np.uint8); a[10:, 1:4, 1:4] = 1; a[2:6, 1:4, 1:4] = 1
        >>> v = Volume(a, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
        >>> int(pieces_below_joint(v, np.array([2.0, 2.0, 12.0])).sum())
        36
    """
    from scipy import ndimage

    arr = np.asarray(label.array)
    out = np.zeros(arr.shape, bool)
    for value in (1, 2):
        comp, n = ndimage.label(arr == value, structure=np.ones((3, 3, 3), bool))
        if n < 2:
            continue
        sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
        for i, box in enumerate(ndimage.find_objects(comp)):
            if box is None or i == int(np.argmax(sizes)):
                continue
            corners = np.array([[b.start, b.stop - 1] for b in box])  # z, y, x index ranges
            ijk = np.array([[x, y, z] for z in corners[0] for y in corners[1] for x in corners[2]],
                           dtype=float)
            top = float(label.index_to_physical(ijk)[:, 2].max())  # LPS z is superior
            if top < float(plafond_hint[2]):
                out[box] |= comp[box] == i + 1
    return out


def _without_foot_pieces(icp: Any, fit: Callable[..., Any], label: Volume, mirror: np.ndarray,
                         sampling: Tuple[int, int], template: Any, hint: np.ndarray,
                         plafond_hint: np.ndarray, notes: List[str]) -> Any:
    """``icp``, or, when it still misses the joint, a fit without :func:`pieces_below_joint`
    (anchored as :func:`_anchor_on_joint` does) when that places the joint better."""
    miss = _joint_miss(icp.matrix, template, hint)
    if miss <= JOINT_RETRY_MM:
        return icp
    below = pieces_below_joint(label, np.asarray(plafond_hint, dtype=float).reshape(3))
    if not below.any():
        return icp
    cleaned = label.with_array(np.where(below, 0, label.array).astype(label.array.dtype))
    points, labels = _fit_points(cleaned, mirror, *sampling)
    points, labels = _near_the_joint(points, labels, hint)
    if len(np.unique(labels)) < 2:
        return icp
    tried: List[str] = []
    refit = _anchor_on_joint(fit(points, labels), fit, points, labels, template, hint, tried)
    miss2 = _joint_miss(refit.matrix, template, hint)
    if miss2 < miss and refit.rms_mm <= max(icp.rms_mm, POOR_FIT_RMS_MM) + RETRY_RMS_SLACK_MM:
        ml = float(below.sum()) * float(np.prod(label.spacing)) / 1000.0
        notes.append(f"registered without {ml:.1f} ml of bone labels below the ankle joint "
                     f"that are not part of the tibia or fibula (foot bones labelled as leg?): "
                     f"the fit with them placed the template's plafond {miss:.0f} mm from the "
                     f"plafond of the labels, the kept fit {miss2:.0f} mm")
        return refit
    return icp


def _fit_warnings(icp: Any, confidence: float, reason: str) -> List[str]:
    """Plain-words warnings about a finished fit (poor surface match, odd scale, unsure side)."""
    warnings: List[str] = []
    if icp.rms_mm > POOR_FIT_RMS_MM:
        warnings.append(f"poor registration: surface RMS distance {icp.rms_mm:.2f} mm exceeds "
                        f"{POOR_FIT_RMS_MM:.1f} mm")
    if icp.inlier_fraction < POOR_FIT_INLIERS:
        warnings.append(f"poor registration: only {icp.inlier_fraction:.0%} of the bone surface "
                        f"lies within {INLIER_DISTANCE_MM:g} mm of the template's (expected at "
                        f"least {POOR_FIT_INLIERS:.0%})")
    if not PLAUSIBLE_SCALE[0] <= icp.scale <= PLAUSIBLE_SCALE[1]:
        warnings.append(f"unusual bone size: the template is {icp.scale:.2f} times the patient's "
                        "size (child, or wrong voxel spacing?)")
    # Not converging to the reference method's 1e-8 mm^2 within the iteration cap is common and
    # harmless once the fit is good (``converged`` is reported in transform.json); only a poor
    # fit, caught above, deserves a warning.
    if confidence < 0.8:
        warnings.append(f"side detection is unsure ({confidence:.0%}): {reason}")
    return warnings


def template_normals(template: Any) -> np.ndarray:
    """Unit surface normals (M, 3) at the template's surface points (computed once, cached)."""
    from AnkleFractureLib.registration.surface import surface_normals

    cached = getattr(template, "_normals_cache", None)
    if cached is None or len(cached) != len(template.points):
        cached = surface_normals(template.labels, template.points, template.point_labels)
        template._normals_cache = cached
    return cached


def rotation_angle_deg(matrix: np.ndarray) -> float:
    """Rotation angle (degrees) of the rotation part of a similarity matrix (scale removed).

    Example:
        >>> m = np.eye(4); m[:3, :3] = 2.0 * np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]])
        >>> round(rotation_angle_deg(m), 6)
        90.0
    """
    a = np.asarray(matrix, dtype=float)[:3, :3]
    scale = abs(np.linalg.det(a)) ** (1.0 / 3.0)
    r = a / scale
    if np.linalg.det(r) < 0:
        raise AnkleFractureError("matrix contains a reflection; compare matrices of the same side")
    cos = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)))
