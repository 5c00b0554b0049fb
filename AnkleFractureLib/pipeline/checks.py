"""Sanity checks that protect the patient: when the scan cannot support a Weber class, say so.

Every check is a pure function returning a list of :class:`Finding`: a ``"warning"`` (the answer
is given, flagged *unsure* when the warning's code is in :data:`UNSURE_CODES`) or a
``"refusal"`` (the classification is withheld, with the reason in plain words); an ``"info"``
finding only records a measurement (it is neither a warning nor a refusal). The pipeline
runs them between its stages and stops at the first stage with a refusal.

=========================  ===========================================================  =========
check                      rule (thresholds are the module constants)                   level
=========================  ===========================================================  =========
:func:`check_ct`           coarsest voxel side > 5 mm                                   refusal
                           slices > 3 mm or in-plane > 1.5 mm                           warning
                           > 0.05 ml of voxels above 3000 HU (metal)                    warning
                           reader notes (non-uniform slices, gantry tilt, ...)          warning
                           geometry tags missing, placement assumed by the reader       warning
:func:`check_segmentation` tibia or fibula < 0.2 ml (absent)                            refusal
                           tibia < 5 ml or fibula < 1 ml (implausibly small)            refusal
                           tibia < 15 ml or fibula < 3 ml                               warning
                           fibula larger than the tibia / > 0.6 of it                   refusal /
                                                                                        warning
:func:`check_agreement`    labels vs the CT's bone (label-free, see                     info /
                           :mod:`~AnkleFractureLib.segmentation.quality`) low           warning
:func:`check_side`         both legs in view, no side given / side given                refusal /
                                                                                        warning
                           side cannot be told; side given contradicts the anatomy      refusal /
                                                                                        warning
:func:`check_field_of_view` tibia runs into the lower scan edge (no ankle joint)         refusal
                           scan ends < 40 mm / < 80 mm above the ankle joint            refusal /
                                                                                        warning
                           scan ends < 25 mm below the joint (Weber A level)            warning
                           fibula beside the tibia over < 20 mm above the joint         refusal
                           crop coverage < 0.3 / < 0.9 (the warning only when the       refusal /
                           scan's ends above and below the joint do not explain it)     warning
                           tibia or fibula in the crop 0-60 mm above the plafond        refusal /
                           < 0.3 / < 0.6 of the template's (at most the real-shape      warning
                           template's: real fibulae are slimmer than the phantom's)
:func:`check_registration` RMS > 6 mm / > 3 mm                                          refusal /
                                                                                        warning
                           inliers < 70 %, scale outside 0.7-1.4, side unsure           warning
=========================  ===========================================================  =========

The field-of-view check works in two ways. Before registration it uses only the label map and
the CT's grid: the tibia's long axis, its distal end (the medial malleolus tip, 12 mm below the
plafond on the template) and where the scan's box ends along that axis, and whether a fibula
runs beside the tibia above the joint. After registration it maps the template's plafond and
long axis into the patient, which does not depend on how far the segmentation is right, and
measures the crop. A foot-only scan (the Visible Human series in ``../shared/data``: the scan
ends at the ankle and the "fibula" the phantom-trained model finds is foot bone below the
"tibia") and a knee scan (the tibia runs out of the bottom of the scan; no fibula beside a
distal tibia) are refused with the reason.

Example:
    >>> f = check_registration_values(rms_mm=7.0, inlier_fraction=0.9, scale=1.0)
    >>> [(x.level, x.code) for x in f]
    [('refusal', 'registration_rms')]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from AnkleFractureLib.geometry.volume import Volume
# estimate_plafond lives with the registration (training crops use it too); C.estimate_plafond
# stays the pipeline's name for it.
from AnkleFractureLib.registration.leg import estimate_plafond  # noqa: F401
from AnkleFractureLib.registration.leg import main_tibia as _main_tibia
from AnkleFractureLib.registration.leg import mask_points as _points
from AnkleFractureLib.registration.quality import (REFUSE_JOINT_MM, REFUSE_RMS_MM,
                                                   mapped_plafond, rms_refused)
from AnkleFractureLib.registration.register import POOR_FIT_INLIERS
from AnkleFractureLib.segmentation.quality import describe_agreement, label_free_agreement

WARNING = "warning"
REFUSAL = "refusal"
INFO = "info"
TIBIA, FIBULA = 1, 2

# ---------------------------------------------------------------------- thresholds
#: Coarsest voxel side (mm) above which the scan is refused (fracture lines are 0.5-2 mm wide).
REFUSE_SPACING_MM = 5.0
#: Slice spacing (the coarsest voxel side, mm) above which a warning is given.
WARN_SLICE_MM = 3.0
#: In-plane spacing (the second coarsest voxel side, mm) above which a warning is given.
WARN_INPLANE_MM = 1.5
#: HU above which a voxel is metal (cortical bone stays below ~2000 HU; 12-bit scanners clip
#: metal at 3071 HU).
METAL_HU = 3000.0
#: Metal volume (ml) from which a warning is given (a 3.5 mm cortical screw is about 0.2 ml).
METAL_MIN_ML = 0.05
#: A bone with less than this (ml) labelled is absent (a few specks are not a bone; as
#: registration's ``MIN_BONE_MM3``).
ABSENT_ML = 0.2
#: Refusal below these volumes (ml): no ankle scan holds so little tibia / fibula.
REFUSE_TIBIA_ML, REFUSE_FIBULA_ML = 5.0, 1.0
#: Warning below these volumes (ml). The template holds 54 ml of tibia and 11 ml of fibula
#: 0-60 mm above the plafond; a child scales volumes by about 0.35.
WARN_TIBIA_ML, WARN_FIBULA_ML = 15.0, 3.0
#: Fibula / tibia volume ratios: about 0.3 on the phantoms and the template (fibula
#: 28 ml, tibia 89 ml); above 0.6 is unusual, above 1 impossible at the ankle.
WARN_FIB_TIB_RATIO, REFUSE_FIB_TIB_RATIO = 0.6, 1.0
#: The medial malleolus tip lies this far (mm) below the plafond (the template's tibia reaches
#: 12 mm below it); the pre-registration estimate of the joint level is tip + this.
MALLEOLUS_BELOW_PLAFOND_MM = 12.0
#: The scan must reach this far (mm) above the ankle joint: below it the syndesmosis (0-60 mm)
#: is not in view and Weber B (0-25 mm) cannot be told from C (35-100 mm).
REFUSE_ABOVE_MM = 40.0
#: Allowance (mm) for the error of the joint level when that extent is measured: a scan that
#: truly reaches 40 mm above the joint must not be refused because the plafond was placed 1-3 mm
#: too high (label-only estimate: within 3.3 mm on real-shape phantoms; registration: within
#: ~2.5 mm), or because a 3 mm slice ends the scan half a slice early. Between 37 and 40 mm the
#: scan gets the short-scan warning instead.
FOV_TOLERANCE_MM = 3.0
#: Below this extent (mm) above the joint, high Weber C fractures (up to 100 mm) may be missed.
WARN_ABOVE_MM = 80.0
#: Below this extent (mm) below the joint the Weber A level (3-20 mm below, malleolar tip to
#: 28 mm) is not fully in view.
WARN_BELOW_MM = 25.0
#: The tibia's distal end closer than this (mm) to the scan's lower edge means it is cut by it.
CUT_MARGIN_MM = 3.0
#: Slab thickness (mm) along the leg for the "fibula beside the tibia" test, the range examined
#: (mm, from 10 mm below the joint to this far above it), and the length needed (mm).
SLAB_MM = 5.0
SHAFT_RANGE_MM = 60.0
NEED_FIBULA_BESIDE_MM = 20.0
#: Bone volume (mm^3) a 5 mm slab must hold to count as tibia / fibula present (a distal
#: tibial cross-section of 3-6 cm^2 gives 1500-3000, a fibular one of 1-2 cm^2 500-1000).
SLAB_MIN_TIBIA_MM3, SLAB_MIN_FIBULA_MM3 = 300.0, 100.0
#: A fibula voxel farther (mm) from the tibia's axis than this belongs to something else.
FIBULA_MAX_DISTANCE_MM = 60.0
#: Crop coverage (fraction of the box inside the CT): refusal / warning below. The box runs
#: from 35 mm below to 109 mm above the plafond, so a scan that shows the joint and the 40 mm of
#: shaft the syndesmosis needs covers only about half of it: such a scan is warned about (high
#: Weber C fractures may lie above it), not refused. Whether the syndesmosis itself is in view
#: is judged by the specific checks (extent above the joint, bone at the syndesmosis level).
REFUSE_COVERAGE, WARN_COVERAGE = 0.3, 0.9
#: Height range (template mm above the plafond) of the syndesmosis level in the crop.
SYNDESMOSIS_Z_MM = (0.0, 60.0)
#: Bone volume in that range relative to the template's: refusal / warning below.
REFUSE_BONE_RATIO, WARN_BONE_RATIO = 0.3, 0.6
#: Template bone volumes (ml) 0-60 mm above the plafond (the shipped template) when no template
#: is given to :func:`check_field_of_view`.
TEMPLATE_SYNDESMOSIS_ML = {TIBIA: 54.2, FIBULA: 11.4}
#: The same volumes on real anatomy: the real-shape template (``healthy_right_ankle_vh``, the
#: mean of 32 anatomies built from the Visible Human bone surfaces). A real fibula is about half
#: as thick as the analytic phantom's, so the expected volume is the smaller of the two: measured
#: against the analytic template's fibula, 14 of 24 real-shape validation scans were warned of
#: "little fibula" with the whole syndesmosis in view.
REAL_SYNDESMOSIS_ML = {TIBIA: 48.4, FIBULA: 5.79}
#: Registration quality: RMS (mm) warning / refusal, inlier fraction warning, plausible scale,
#: side-detection confidence below which the side is called unsure.
#: (The refusal limits live in :mod:`AnkleFractureLib.registration.quality`, so that training
#: crops refuse what ``run`` refuses.)
WARN_RMS_MM = 3.0
#: The registration's own poor-fit threshold (share of the surface within 2.5 mm of the
#: template; good fits 0.87-1.00, clearly wrong ones <= 0.67: see registration/register.py).
WARN_INLIERS = POOR_FIT_INLIERS
PLAUSIBLE_SCALE = (0.7, 1.4)
WARN_SIDE_CONFIDENCE = 0.8
#: Distance (mm) between the plafond found on the segmentation and the template's plafond
#: mapped by the registration: warning / refusal above. A 15 mm error moves a Weber B level
#: (0-25 mm above the joint) into the C range (35-100 mm). Since the ICP anchors its starts on
#: the distal bone and trims per bone, 94 phantom fits (28 of them truncated scans, which used
#: to slide up to 55 mm along the shaft) agree within 1.2 mm; the check stays as a safety net
#: for anatomy the phantoms do not cover.
WARN_JOINT_MM = 5.0
#: DICOM tags whose absence leaves the scan's placement in the patient assumed (the reader's
#: ``meta["missing_tags"]``): a delivered class is then marked unsure.
GEOMETRY_TAGS = ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")

#: Warning codes that mark a delivered Weber class *unsure*: each means the scan or a stage
#: upstream may have misled the classifier. (``reader_note`` and ``one_leg_selected`` are
#: information only.)
UNSURE_CODES = frozenset({
    "weber_disagreement",  # the classifier and the measured fracture height name other classes
    "coarse_spacing", "metal", "small_tibia", "small_fibula", "fibula_large",
    "side_conflict", "side_unsure", "fov_short_above", "fov_short_below", "fov_coverage",
    "fov_bone_at_syndesmosis", "registration_rms", "registration_inliers", "registration_scale",
    "registration_joint", "registration_note", "assumed_geometry", "segmentation_agreement",
    "fracture_line_at_scan_edge",
    "fracture_line_by_ring_check",  # the line was found by the cortical ring check alone
})


@dataclass
class Finding:
    """One result of a sanity check.

    Attributes:
        level: ``"warning"``, ``"refusal"`` or ``"info"`` (a measurement only).
        code: Stable machine-readable code, e.g. ``"fov_short_above"``.
        message: Plain-language explanation for the clinician.
        details: Measured values behind it (plain JSON types), e.g. ``{"above_mm": 29.0}``.
    """

    level: str
    code: str
    message: str
    details: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.level not in (WARNING, REFUSAL, INFO):
            raise ValueError(f"level must be 'warning', 'refusal' or 'info', got {self.level!r}")

    def to_json(self) -> Dict[str, Any]:
        """Plain JSON dict (level, code, message, details)."""
        return {"level": self.level, "code": self.code, "message": self.message,
                "details": {k: _plain(v) for k, v in self.details.items()}}


def _plain(value: Any) -> Any:
    """numpy scalars -> Python numbers (rounded floats), for JSON."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return round(float(value), 3)
    return value


#: Order in which refusal reasons are told (the first is the headline): a scan that does not
#: show the syndesmosis says so before the consequences (odd bones, no side, a poor fit).
REFUSAL_ORDER = ("spacing_too_coarse", "fov_", "both_legs", "no_", "small_", "fibula_",
                 "bad_labels", "side_", "registration_")


def _refusal_rank(finding: Finding) -> int:
    for rank, prefix in enumerate(REFUSAL_ORDER):
        if finding.code.startswith(prefix):
            return rank
    return len(REFUSAL_ORDER)


def refusals(findings: Iterable[Finding]) -> List[Finding]:
    """The refusals among ``findings``, headline first (:data:`REFUSAL_ORDER`; stable).

    Example:
        >>> fs = [Finding("refusal", "no_fibula", "b"), Finding("warning", "metal", "m"),
        ...       Finding("refusal", "fov_coverage", "a")]
        >>> [f.message for f in refusals(fs)]
        ['a', 'b']
    """
    return sorted((f for f in findings if f.level == REFUSAL), key=_refusal_rank)


# ---------------------------------------------------------------------- the CT itself
def check_ct(ct: Volume) -> List[Finding]:
    """Spacing, metal and the reader's notes of a CT (HU).

    Orientation does not matter: the coarsest voxel side is taken as the slice spacing and the
    second coarsest as the in-plane spacing.

    Example:
        >>> v = Volume(np.zeros((4, 4, 4), np.int16), spacing=(0.5, 0.5, 6.0))
        >>> [(f.level, f.code) for f in check_ct(v)]
        [('refusal', 'spacing_too_coarse')]
    """
    out: List[Finding] = []
    sp = sorted((float(s) for s in ct.spacing), reverse=True)
    slice_mm, inplane_mm = sp[0], sp[1]
    details = {"slice_mm": slice_mm, "inplane_mm": inplane_mm}
    if slice_mm > REFUSE_SPACING_MM:
        out.append(Finding(REFUSAL, "spacing_too_coarse",
                           f"the image is too coarse to show fracture lines: {slice_mm:.1f} mm "
                           f"voxels (at most {REFUSE_SPACING_MM:.0f} mm; thin-slice ankle CT "
                           "has 0.5-1 mm)", details))
    elif slice_mm > WARN_SLICE_MM or inplane_mm > WARN_INPLANE_MM:
        out.append(Finding(WARNING, "coarse_spacing",
                           f"coarse image ({inplane_mm:.2f} mm in-plane, {slice_mm:.2f} mm "
                           f"slices; recommended at most {WARN_INPLANE_MM} mm and "
                           f"{WARN_SLICE_MM:.0f} mm): thin fracture lines may be invisible",
                           details))
    # Per slab, so a clinical 512 x 512 x 400 CT never needs a full-size boolean copy.
    metal = 0
    arr = ct.array
    for k in range(0, arr.shape[0], 32):
        metal += int(np.count_nonzero(arr[k:k + 32] > METAL_HU))
    metal_ml = metal * float(np.prod(ct.spacing)) / 1000.0
    if metal_ml >= METAL_MIN_ML:
        out.append(Finding(WARNING, "metal",
                           f"metal in the scan: {metal_ml:.2f} ml of voxels above "
                           f"{METAL_HU:.0f} HU (plates, screws, prosthesis?); its streak "
                           "artefacts can hide or mimic fracture lines",
                           {"metal_ml": metal_ml, "threshold_hu": METAL_HU}))
    for note in ct.meta.get("warnings", []) or []:
        out.append(Finding(WARNING, "reader_note", f"reading the CT: {note}"))
    assumed = [t for t in ct.meta.get("missing_tags", []) or [] if t in GEOMETRY_TAGS]
    if assumed:
        out.append(Finding(WARNING, "assumed_geometry",
                           f"the scan's geometry was assumed, not read ({', '.join(assumed)} "
                           "missing from the DICOM headers): the side, the head/foot direction "
                           "or the distances may be wrong; check them on the images",
                           {"missing_tags": assumed}))
    return out


# ---------------------------------------------------------------------- the segmentation
def bone_volumes_ml(label: Volume) -> Dict[str, float]:
    """Labelled volume (ml) of the tibia and the fibula.

    Example:
        >>> lab = np.zeros((10, 10, 10), np.uint8); lab[:, :5] = 1; lab[0, 9, 9] = 2
        >>> bone_volumes_ml(Volume(lab, spacing=(2.0, 2.0, 2.0)))
        {'tibia': 4.0, 'fibula': 0.008}
    """
    vox_ml = float(np.prod(label.spacing)) / 1000.0
    # count_nonzero of a comparison: a bincount would cast a clinical map to int64 (760 MB).
    return {name: round(float(np.count_nonzero(label.array == value)) * vox_ml, 6)
            for name, value in (("tibia", TIBIA), ("fibula", FIBULA))}


def check_segmentation(label: Volume, volumes: Optional[Dict[str, float]] = None
                       ) -> List[Finding]:
    """Missing or implausible bones in a label map (0 background, 1 tibia, 2 fibula).

    ``volumes``: :func:`bone_volumes_ml` of ``label`` when the caller has it already.

    Example:
        >>> lab = np.zeros((40, 40, 40), np.uint8); lab[:, 5:30, 5:30] = 1
        >>> [(f.level, f.code) for f in check_segmentation(Volume(lab))]
        [('refusal', 'no_fibula')]
    """
    arr = label.array
    if arr.min() < 0 or arr.max() > 2:
        return [Finding(REFUSAL, "bad_labels",
                        "the segmentation holds values other than 0 (background), 1 (tibia) "
                        "and 2 (fibula)")]
    vol = bone_volumes_ml(label) if volumes is None else volumes
    tib, fib = vol["tibia"], vol["fibula"]
    details = {"tibia_ml": tib, "fibula_ml": fib}
    out: List[Finding] = _not_a_leg_findings(label)
    for name, ml, refuse, warn in (("tibia", tib, REFUSE_TIBIA_ML, WARN_TIBIA_ML),
                                   ("fibula", fib, REFUSE_FIBULA_ML, WARN_FIBULA_ML)):
        if ml < ABSENT_ML:
            out.append(Finding(REFUSAL, f"no_{name}",
                               f"no {name} found in the scan ({ml * 1000:.0f} mm^3 labelled): "
                               f"the Weber class needs both the tibia and the fibula", details))
        elif ml < refuse:
            out.append(Finding(REFUSAL, f"small_{name}",
                               f"implausibly small {name}: {ml:.1f} ml labelled (an ankle scan "
                               f"holds at least {refuse:.0f} ml); the segmentation failed or "
                               "the scan does not show the ankle", details))
        elif ml < warn:
            out.append(Finding(WARNING, f"small_{name}",
                               f"small {name}: {ml:.1f} ml labelled (expected at least "
                               f"{warn:.0f} ml); check the segmentation and the field of view",
                               details))
    if tib >= ABSENT_ML and fib >= ABSENT_ML:
        ratio = fib / tib
        details["fibula_to_tibia"] = ratio
        if ratio > REFUSE_FIB_TIB_RATIO:
            out.append(Finding(REFUSAL, "fibula_larger_than_tibia",
                               f"implausible segmentation: the fibula ({fib:.1f} ml) is larger "
                               f"than the tibia ({tib:.1f} ml), while at the ankle the tibia is "
                               "about three times larger; these are probably not the distal "
                               "tibia and fibula", details))
        elif ratio > WARN_FIB_TIB_RATIO:
            out.append(Finding(WARNING, "fibula_large",
                               f"unusual segmentation: the fibula is {ratio:.0%} of the tibia's "
                               "volume (about 30 % at the ankle); check it", details))
    return out


def _not_a_leg_findings(label: Volume) -> List[Finding]:
    """A refusal ``no_distal_tibia`` when the segmentation's post-processing removed a leg's
    labels because its "tibia" was no distal tibia (rule 9 of
    :mod:`~AnkleFractureLib.segmentation.postprocess`: a foot scan's bones); none otherwise
    (also for a label map given by the user, which carries no post-processing report)."""
    post = ((label.meta or {}).get("segmentation") or {}).get("postprocess") or {}
    out = []
    for leg in post.get("not_a_leg") or []:
        below = leg.get("below_top_mm")
        out.append(Finding(
            REFUSAL, "no_distal_tibia",
            f"no distal tibia in view (a foot scan?): the bone the network labelled tibia "
            f"({leg.get('tibia_ml', 0.0):.1f} ml) is not a distal tibia (its largest "
            f"cross-section is {leg.get('section_cm2', 0.0):.1f} cm^2, a distal tibia's at the "
            f"plafond about 8-13 cm^2"
            + (f"; it ends {below:.0f} mm below the highest bone in view, while a tibia runs "
               "out of the top of an ankle scan" if below is not None else "")
            + "), so its tibia and fibula labels were removed as foot bones; the Weber class "
            "needs the distal tibia, the fibula and the syndesmosis in view",
            {k: v for k, v in leg.items() if v is not None and k != "note"}))
    return out


def check_agreement(ct: Volume, label: Volume) -> List[Finding]:
    """The label-free agreement of the labels with the CT's bone, as one finding.

    :func:`~AnkleFractureLib.segmentation.quality.label_free_agreement` compares the labels
    with the tibia and fibula cross-sections that thresholded bone shows above the ankle. Code
    ``"segmentation_agreement"``: a warning (the class is marked unsure) when the agreement is
    low, else an info finding carrying the numbers (also when the scan shows no leg to compare
    with: "not assessable").

    Args:
        ct: The CT (HU).
        label: The label map on the CT's grid (the analysed leg).
    """
    q = label_free_agreement(ct, label)
    details = dict(q)
    if q["level"] == "low":
        return [Finding(WARNING, "segmentation_agreement",
                        "the segmentation disagrees with the bone on the CT: "
                        + "; ".join(q["problems"]) + " (check it, correct it and run again)",
                        details)]
    text = describe_agreement(q)
    if not q["assessable"]:
        text += f": {q['reason']}"
    return [Finding(INFO, "segmentation_agreement", text, details)]


# ---------------------------------------------------------------------- the side
def check_side(detection: Any, requested: str = "auto") -> List[Finding]:
    """Side findings from a :class:`~AnkleFractureLib.registration.side.SideDetection`.

    Args:
        detection: The detection on the CT and label map (``side``, ``confidence``, ``reason``,
            ``legs``).
        requested: "auto", "left" or "right" (what the user asked for).

    Returns:
        A refusal when the side cannot be told and none was given (both legs in view: "give
        the side"); a warning when a given side contradicts a confident detection, or when both
        legs are in view and the given side's leg is analysed alone.

    Example:
        >>> from AnkleFractureLib.registration.side import SideDetection
        >>> d = SideDetection(None, 0.0, "both legs in the field of view", 2)
        >>> [f.code for f in check_side(d)], [f.level for f in check_side(d, "left")]
        (['both_legs'], ['warning'])
    """
    out: List[Finding] = []
    legs = int(getattr(detection, "legs", 1) or 0)
    if requested not in ("left", "right"):
        if legs >= 2:
            out.append(Finding(REFUSAL, "both_legs",
                               "both legs are in the field of view: give the side to analyse "
                               "(--side left or --side right)", {"legs": legs,
                                                                 "reason": detection.reason}))
        elif detection.side is None:
            out.append(Finding(REFUSAL, "side_undetermined",
                               f"cannot tell a left from a right ankle ({detection.reason}): "
                               "give the side (--side left or --side right)",
                               {"reason": detection.reason}))
        return out
    if legs >= 2:
        out.append(Finding(WARNING, "one_leg_selected",
                           f"both legs are in the field of view: only the {requested} leg "
                           "is analysed", {"legs": legs}))
    elif (detection.side is not None and detection.side != requested
          and float(detection.confidence) >= WARN_SIDE_CONFIDENCE):
        out.append(Finding(WARNING, "side_conflict",
                           f"the side given ({requested}) contradicts the anatomy "
                           f"({detection.reason}); a wrong side mirrors the ankle the wrong way",
                           {"detected": detection.side,
                            "confidence": float(detection.confidence)}))
    return out


# ---------------------------------------------------------------------- field of view
def leg_axis(points: np.ndarray) -> np.ndarray:
    """Unit long axis (LPS, pointing superior) of the tibia voxels ``points`` (N, 3).

    The principal axis when it dominates (a shaft) and is within 60 degrees of the scanner's
    z; otherwise LPS z (patients lie along the scanner axis; a short or blob-like "tibia" has
    no reliable long axis).

    Example:
        >>> pts = np.stack([np.zeros(50), np.zeros(50), -np.arange(50.0)], axis=1)
        >>> u = leg_axis(pts + np.random.default_rng(0).normal(0, 0.5, (50, 3)))
        >>> bool(np.allclose(u, [0, 0, 1], atol=0.05))
        True
    """
    z = np.array([0.0, 0.0, 1.0])
    if len(points) < 10:
        return z
    c = points - points.mean(axis=0)
    evals, evecs = np.linalg.eigh(c.T @ c / len(c))
    axis = evecs[:, int(np.argmax(evals))]
    ev = np.sort(evals)[::-1]
    if ev[0] < 2.0 * ev[1] or abs(axis[2]) < np.cos(np.deg2rad(60.0)):
        return z
    axis = axis / np.linalg.norm(axis)
    return axis if axis[2] >= 0 else -axis


def extent_along(ct: Volume, point: np.ndarray, direction: np.ndarray) -> Tuple[float, float]:
    """Where the line ``point + s * direction`` (LPS mm, unit direction) enters and leaves the
    CT's box (outer voxel faces).

    Returns:
        (s_lo, s_hi) in mm along ``direction``; s_lo > s_hi when the line misses the box.

    Example:
        >>> v = Volume(np.zeros((100, 10, 10)), spacing=(1.0, 1.0, 1.0))
        >>> extent_along(v, np.array([5.0, 5.0, 30.0]), np.array([0.0, 0.0, 1.0]))
        (-30.5, 69.5)
    """
    i0 = ct.physical_to_index(np.asarray(point, float)[None, :])[0]
    m = ct.direction @ np.diag(ct.spacing)
    di = np.linalg.solve(m, np.asarray(direction, float))
    lo, hi = -np.inf, np.inf
    for a, n in enumerate(ct.size):
        edge_lo, edge_hi = -0.5, n - 0.5
        if abs(di[a]) < 1e-12:
            if not edge_lo <= i0[a] <= edge_hi:
                return (np.inf, -np.inf)
            continue
        s1, s2 = (edge_lo - i0[a]) / di[a], (edge_hi - i0[a]) / di[a]
        lo, hi = max(lo, min(s1, s2)), min(hi, max(s1, s2))
    return (float(lo), float(hi))


def _joint_findings(above: float, below: float, source: str) -> List[Finding]:
    """Findings on the scan's extent above/below the ankle joint (mm along the leg)."""
    out: List[Finding] = []
    details = {"above_joint_mm": above, "below_joint_mm": below, "joint_from": source}
    if above < REFUSE_ABOVE_MM - FOV_TOLERANCE_MM:
        out.append(Finding(REFUSAL, "fov_short_above",
                           f"the syndesmosis is not in the field of view: the scan ends "
                           f"{max(above, 0.0):.0f} mm above the ankle joint (at least "
                           f"{REFUSE_ABOVE_MM:.0f} mm of tibial and fibular shaft are needed)",
                           details))
    elif above < WARN_ABOVE_MM:
        out.append(Finding(WARNING, "fov_short_above",
                           f"the scan ends {above:.0f} mm above the ankle joint: a high Weber C "
                           "fracture (up to 100 mm above the joint) may be outside the field "
                           "of view", details))
    if below < WARN_BELOW_MM:
        out.append(Finding(WARNING, "fov_short_below",
                           f"the scan ends {max(below, 0.0):.0f} mm below the ankle joint: the "
                           "lateral malleolus and the Weber A level (down to 28 mm below the "
                           "joint) are not fully in view", details))
    return out


#: Default of the ``plafond`` arguments below: "estimate it from the label map here".
ESTIMATE = object()


def _label_only_fov(ct: Volume, label: Volume, plafond: Any = ESTIMATE) -> List[Finding]:
    """Field of view from the label map and the CT's grid only (before registration)."""
    tib_mask, stride = _main_tibia(label)
    tib = _points(label, tib_mask, stride)
    fib = _points(label, label.array[::stride, ::stride, ::stride] == FIBULA, stride)
    if len(tib) < 10:
        return []  # check_segmentation refuses a missing tibia
    vox_mm3 = float(np.prod(label.spacing)) * stride ** 3
    u = leg_axis(tib)
    centre = tib.mean(axis=0)
    h_tib = (tib - centre) @ u
    distal = float(h_tib.min())
    # Heights are relative to the tibia's centroid. The joint is the plafond found on the
    # label; failing that (no articular surface, e.g. foot bones labelled tibia), the
    # malleolus tip + 12 mm.
    if plafond is ESTIMATE:
        plafond = estimate_plafond(label)
    s_lo, s_hi = extent_along(ct, centre, u)
    cut = distal - s_lo < CUT_MARGIN_MM + stride * max(label.spacing)
    if plafond is not None and distal <= float((plafond - centre) @ u):
        joint, source = float((plafond - centre) @ u), "segmentation (tibial plafond)"
    else:
        joint = distal + MALLEOLUS_BELOW_PLAFOND_MM
        source = f"segmentation (tibia tip + {MALLEOLUS_BELOW_PLAFOND_MM:.0f} mm)"
    out: List[Finding] = []
    # A tibia cut by the lower edge is fine when its plafond is still well inside the scan
    # (only the malleolus tip is lost: a warning after registration); without one in view (a
    # cut face is no plafond, hence the 5 mm) there is no ankle joint at all.
    if cut and (plafond is None or joint - s_lo < 5.0):
        out.append(Finding(REFUSAL, "fov_no_ankle_joint",
                           "the syndesmosis is not in the field of view: the tibia runs into the "
                           "lower edge of the scan and no ankle joint is in view (a shin or knee "
                           "scan?)", {"tibia_to_lower_edge_mm": distal - s_lo}))
        return out
    above, below = s_hi - joint, joint - s_lo
    found = _joint_findings(above, below, source)
    out.extend(f for f in found if f.level == REFUSAL)  # warnings wait for the registration
    # Is there a fibula beside the tibia above the joint? (Foot bones below a "tibia" are not.)
    lo, hi = joint - 10.0, min(s_hi, joint + SHAFT_RANGE_MM)
    beside = 0.0
    examined = max(hi - lo, 0.0)
    if len(fib) and examined >= SLAB_MM:
        rel = fib - centre
        h_fib = rel @ u
        dist = np.linalg.norm(rel - np.outer(h_fib, u), axis=1)
        h_fib = h_fib[dist < FIBULA_MAX_DISTANCE_MM]
        edges = np.arange(lo, hi + 1e-9, SLAB_MM)
        n_tib = np.histogram(h_tib, edges)[0] * vox_mm3
        n_fib = np.histogram(h_fib, edges)[0] * vox_mm3
        both = (n_tib >= SLAB_MIN_TIBIA_MM3) & (n_fib >= SLAB_MIN_FIBULA_MM3)
        beside = SLAB_MM * float(np.count_nonzero(both))
    if beside < min(NEED_FIBULA_BESIDE_MM, examined):
        out.append(Finding(REFUSAL, "fov_no_fibula_shaft",
                           "the syndesmosis is not in the field of view: no fibular shaft beside "
                           f"the tibia above the ankle joint (found over {beside:.0f} mm of the "
                           f"{examined:.0f} mm examined; at least {NEED_FIBULA_BESIDE_MM:.0f} mm "
                           "needed)", {"fibula_beside_mm": beside, "examined_mm": examined}))
    return out


def _z_of_voxels(grid: Volume) -> np.ndarray:
    """Frame z (mm) of every voxel centre of ``grid``, shape (nz, ny, nx)."""
    nz, ny, nx = grid.shape
    m = grid.direction @ np.diag(grid.spacing)
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    return grid.origin[2] + m[2, 0] * i + m[2, 1] * j + m[2, 2] * k


def syndesmosis_bone_ml(labels: Volume, plafond_z: float = 0.0,
                        z_range: Tuple[float, float] = SYNDESMOSIS_Z_MM) -> Dict[int, float]:
    """Tibia and fibula volume (ml) of a template-frame label map within ``z_range`` mm above
    the plafond (the template's own reference values)."""
    z = _z_of_voxels(labels) - plafond_z
    sel = (z >= z_range[0]) & (z <= z_range[1])
    vox_ml = float(np.prod(labels.spacing)) / 1000.0
    return {v: float(np.count_nonzero((labels.array == v) & sel)) * vox_ml
            for v in (TIBIA, FIBULA)}


def _ends_fraction(z: np.ndarray, ends_mm: Optional[Tuple[float, float]]) -> float:
    """Share of the crop's height (``z``: template mm above the plafond) between the scan's
    lower and upper ends (``ends_mm``: mm below and above the joint, template scale)."""
    if ends_mm is None or z.size == 0:
        return 1.0
    lo, hi = float(z.min()), float(z.max())
    inside = min(hi, ends_mm[1]) - max(lo, -ends_mm[0])
    return float(np.clip(inside / max(hi - lo, 1e-6), 0.0, 1.0))


def _crop_findings(crop: Any, plafond_z: float, expected: Dict[int, float],
                   ends_mm: Optional[Tuple[float, float]] = None) -> List[Finding]:
    """Coverage and bone at the syndesmosis level of the crop. ``ends_mm`` (mm of scan below
    and above the joint, template scale) explains a coverage shortfall that the scan's ends
    alone cause: the joint findings already speak of those, so no second warning says it."""
    out: List[Finding] = []
    coverage = float(crop.coverage)
    z = _z_of_voxels(crop.grid) - plafond_z
    by_ends = coverage >= WARN_COVERAGE * _ends_fraction(z, ends_mm) - 1e-3
    if coverage < REFUSE_COVERAGE:
        out.append(Finding(REFUSAL, "fov_coverage",
                           f"the syndesmosis is not in the field of view: only {coverage:.0%} of "
                           f"the syndesmosis region lies inside the scan (at least "
                           f"{REFUSE_COVERAGE:.0%} needed)", {"coverage": coverage}))
    elif coverage < WARN_COVERAGE and not by_ends:
        out.append(Finding(WARNING, "fov_coverage",
                           f"only {coverage:.0%} of the syndesmosis region lies inside the scan",
                           {"coverage": coverage}))
    channels = np.asarray(crop.channels)
    if channels.ndim != 4 or channels.shape[0] < 3:
        return out
    sel = (z >= SYNDESMOSIS_Z_MM[0]) & (z <= SYNDESMOSIS_Z_MM[1])
    vox_ml = float(np.prod(crop.grid.spacing)) / 1000.0
    # Where the scan ends inside the syndesmosis level, only the part in view is expected.
    in_view = _ends_fraction(z[sel], ends_mm) if np.any(sel) else 1.0
    for value, name in ((TIBIA, "tibia"), (FIBULA, "fibula")):
        ml = float(channels[value][sel].sum()) * vox_ml
        ratio = ml / max(expected[value] * max(in_view, 0.05), 1e-6)
        details = {"bone": name, "ml": ml, "template_ml": expected[value], "ratio": ratio,
                   "in_view_fraction": round(in_view, 3)}
        span = f"{SYNDESMOSIS_Z_MM[0]:.0f}-{SYNDESMOSIS_Z_MM[1]:.0f} mm above the ankle joint"
        if ratio < REFUSE_BONE_RATIO:
            out.append(Finding(REFUSAL, "fov_bone_at_syndesmosis",
                               f"the syndesmosis is not in the field of view: no {name} at the "
                               f"syndesmosis level ({span}; {ratio:.0%} of the template's "
                               f"{name} there)", details))
        elif ratio < WARN_BONE_RATIO:
            out.append(Finding(WARNING, "fov_bone_at_syndesmosis",
                               f"little {name} at the syndesmosis level ({span}; {ratio:.0%} of "
                               f"the template's {name} there): check the field of view and the "
                               "segmentation", details))
    return out


def check_field_of_view(ct: Volume, label: Optional[Volume], registration: Any = None,
                        crop: Any = None, template: Any = None,
                        plafond: Any = ESTIMATE) -> List[Finding]:
    """Is the syndesmosis in the field of view?

    Without ``registration`` only the label map and the CT's grid are used (refusals only; see
    the module docstring). With it, the template's plafond and long axis are mapped into the
    patient (``template_to_patient``) and the scan's extent above and below the joint is
    measured along that axis; with ``crop`` too, its coverage and the tibia and fibula present
    0-60 mm above the plafond in the crop, against the template's.

    Args:
        ct: The CT (only its grid is used).
        label: Label map on the CT's grid (1 tibia, 2 fibula), or None.
        registration: A :class:`~AnkleFractureLib.registration.register.Registration`, or None.
        crop: The :class:`~AnkleFractureLib.crop.syndesmosis.SyndesmosisCrop`, or None.
        template: The template (for its plafond and reference bone volumes; the shipped
            template's values when None).
        plafond: :func:`estimate_plafond` of ``label`` when the caller has it already (it
            takes 0.1-0.3 s on a clinical grid); estimated here by default.

    Returns:
        The findings.
    """
    if registration is None:
        if label is None:
            return []
        return _label_only_fov(ct, label, plafond)
    plafond = (np.zeros(3) if template is None
               else np.asarray(template.plafond, dtype=float).reshape(3))
    t2p = np.linalg.inv(np.asarray(registration.patient_to_template, dtype=float))
    joint = t2p[:3, :3] @ plafond + t2p[:3, 3]
    u = t2p[:3, :3] @ np.array([0.0, 0.0, 1.0])
    u = u / np.linalg.norm(u)
    s_lo, s_hi = extent_along(ct, joint, u)
    out: List[Finding] = []
    if not s_lo <= 0.0 <= s_hi:
        out.append(Finding(REFUSAL, "fov_no_ankle_joint",
                           "the syndesmosis is not in the field of view: the ankle joint, as "
                           "placed by the registration, lies outside the scan",
                           {"joint_lps_mm": [round(float(v), 2) for v in joint]}))
    else:
        out.extend(_joint_findings(s_hi, -s_lo, "registration (template plafond)"))
    if crop is not None:
        if template is not None and getattr(template, "labels", None) is not None:
            expected = syndesmosis_bone_ml(template.labels, float(plafond[2]))
        else:
            expected = dict(TEMPLATE_SYNDESMOSIS_ML)
        expected = {v: min(ml, REAL_SYNDESMOSIS_ML[v]) for v, ml in expected.items()}
        scale = float(np.cbrt(abs(np.linalg.det(np.asarray(registration.patient_to_template,
                                                            float)[:3, :3]))))
        out.extend(_crop_findings(crop, float(plafond[2]), expected,
                                  ends_mm=(-s_lo * scale, s_hi * scale)))
    return out


# ---------------------------------------------------------------------- registration
def check_registration_values(rms_mm: float, inlier_fraction: float, scale: float,
                              side_confidence: float = 1.0, side_reason: str = "") -> List[Finding]:
    """Registration quality findings from the numbers (see :func:`check_registration`)."""
    out: List[Finding] = []
    details = {"rms_mm": rms_mm, "inlier_fraction": inlier_fraction, "scale": scale}
    if rms_refused(rms_mm):
        out.append(Finding(REFUSAL, "registration_rms",
                           f"the registration to the template failed: surface RMS distance "
                           f"{rms_mm:.1f} mm (at most {REFUSE_RMS_MM:.0f} mm): the crop would "
                           "not show the syndesmosis", details))
    elif rms_mm > WARN_RMS_MM:
        out.append(Finding(WARNING, "registration_rms",
                           f"poor registration: surface RMS distance {rms_mm:.1f} mm (healthy "
                           f"ankles fit within 1 mm, displaced fractures within "
                           f"{WARN_RMS_MM:.0f} mm)", details))
    if inlier_fraction < WARN_INLIERS:
        out.append(Finding(WARNING, "registration_inliers",
                           f"poor registration: only {inlier_fraction:.0%} of the bone surface "
                           f"matches the template (expected at least {WARN_INLIERS:.0%})",
                           details))
    if not PLAUSIBLE_SCALE[0] <= scale <= PLAUSIBLE_SCALE[1]:
        out.append(Finding(WARNING, "registration_scale",
                           f"unusual bone size: the template is {scale:.2f} times the patient's "
                           f"size (expected {PLAUSIBLE_SCALE[0]}-{PLAUSIBLE_SCALE[1]}; a child, "
                           "or a wrong voxel spacing?)", details))
    if side_confidence < WARN_SIDE_CONFIDENCE:
        out.append(Finding(WARNING, "side_unsure",
                           f"the side detection is unsure ({side_confidence:.0%}): {side_reason}",
                           {"side_confidence": side_confidence}))
    return out


#: Registration warnings already covered by :func:`check_registration_values`.
_COVERED_PREFIXES = ("poor registration", "unusual bone size", "side detection is unsure")


def check_registration(registration: Any, label: Optional[Volume] = None,
                       template: Any = None, plafond: Any = ESTIMATE) -> List[Finding]:
    """Registration quality.

    RMS > 6 mm refused, > 3 mm warned; < 70 % inliers, scale outside 0.7-1.4 and an unsure
    side warned; the registration's other notes passed on as warnings. With ``label``, the
    plafond found on the segmentation (:func:`estimate_plafond`) is compared with the
    template's plafond mapped into the patient: the surface RMS cannot see a fit that slid
    along the tibial shaft (a cylinder fits anywhere along itself), this can.

    Args:
        registration: The :class:`~AnkleFractureLib.registration.register.Registration`.
        label: The label map that was registered (optional).
        template: The template (its plafond; the origin when None).
        plafond: :func:`estimate_plafond` of ``label`` when the caller has it already.
    """
    out = check_registration_values(float(registration.rms_mm),
                                    float(registration.inlier_fraction),
                                    float(registration.scale),
                                    float(registration.side_confidence),
                                    str(registration.side_reason))
    for note in getattr(registration, "warnings", []) or []:
        if not str(note).startswith(_COVERED_PREFIXES):
            out.append(Finding(WARNING, "registration_note", f"registration: {note}"))
    if label is not None:
        out.extend(_joint_agreement(registration, label, template, plafond))
    return out


def _joint_agreement(registration: Any, label: Volume, template: Any,
                     plafond: Any = ESTIMATE) -> List[Finding]:
    found = estimate_plafond(label) if plafond is ESTIMATE else plafond
    if found is None:
        return []
    mapped = mapped_plafond(registration, template)
    dist = float(np.linalg.norm(mapped - found))
    details = {"distance_mm": dist, "plafond_segmentation_lps": [round(float(v), 2) for v in found],
               "plafond_registration_lps": [round(float(v), 2) for v in mapped]}
    if dist > REFUSE_JOINT_MM:
        return [Finding(REFUSAL, "registration_joint",
                        f"the registration misplaces the ankle joint by {dist:.0f} mm (the "
                        "template's plafond lands that far from the plafond of the "
                        f"segmentation; at most {REFUSE_JOINT_MM:.0f} mm): the crop would not "
                        "show the syndesmosis at its level", details)]
    if dist > WARN_JOINT_MM:
        return [Finding(WARNING, "registration_joint",
                        f"the registration places the ankle joint {dist:.0f} mm from the plafond "
                        "of the segmentation: fracture heights may be off", details)]
    return []


# ---------------------------------------------------------------------- gating
def fracture_line_findings(ignored: Dict[str, int], min_voxels: int, spacing_mm: float
                           ) -> List[Finding]:
    """Findings on the localiser's lines that were left out (``FractureFinding.ignored``).

    A line as large as a found one that reaches the scan's edge is a warning (the fibula may be
    broken where the scan ends: the answer is unsure); lines next to metal are a note.

    Args:
        ignored: {"scan_edge": voxels, "metal": voxels} left out.
        min_voxels: The localiser's "found" size (voxels).
        spacing_mm: The crop's voxel size (mm), to give volumes.

    Example:
        >>> [f.code for f in fracture_line_findings({"scan_edge": 500, "metal": 3}, 300, 1.5)]
        ['fracture_line_at_scan_edge', 'fracture_lines_near_metal']
        >>> fracture_line_findings({"scan_edge": 20}, 300, 1.5)
        []
    """
    out: List[Finding] = []
    ml = spacing_mm ** 3 / 1000.0
    edge = int(ignored.get("scan_edge", 0))
    if edge >= max(int(min_voxels), 1):
        out.append(Finding(WARNING, "fracture_line_at_scan_edge",
                           f"a fracture-like line reaches the edge of the scan ({edge * ml:.2f} ml "
                           "of line, not measured): the fibula may be broken where the scan "
                           "ends; a scan reaching further along the leg would show it",
                           {"voxels": edge}))
    metal = int(ignored.get("metal", 0))
    if metal:
        out.append(Finding(INFO, "fracture_lines_near_metal",
                           f"line responses next to metal were left out ({metal * ml:.2f} ml): "
                           "screws and plates cross the bone like fracture lines",
                           {"voxels": metal}))
    return out


#: Warnings that a located Weber A or B line at the answer's level settles (they stay listed,
#: but do not mark the answer unsure): "the scan ends N mm above the joint, a high Weber C
#: fracture may be outside the field of view" asks whether the fibula breaks higher up; a line
#: located at the A or B level answers where it breaks. (On the validation sets, 4 answers,
#: all right, carried this warning alone with such a line; "no fracture" and Weber C answers
#: stay unsure.)
SETTLED_BY_A_LOW_LINE = frozenset({"fov_short_above"})


def settled_by_line(uncertainty: Optional[Dict[str, Any]], prediction: str,
                    height_mm: float) -> Dict[str, Any]:
    """The classifier's uncertainty when a located fracture line confirms the combined answer.

    The classifier's own doubts (low confidence, spread probabilities, shifted copies that
    disagree) say it could not tell the class from the crop alone; a fibular fracture line
    located at the height of the answer's class is evidence the surgeon can check on the CT,
    so they no longer mark the answer unsure. They are kept as ``classifier_reasons`` and
    ``settled_by`` says why. (Warnings still mark it unsure: :func:`gate_classification`.)
    On 101 answered validation phantoms (three sets, 31 of them real-shape) this took 11 right
    answers out of the 61 unsure ones and left all 11 wrong answers unsure; settling "no
    fracture" answers that no line contradicts would also have hidden a missed high Weber C,
    so the absence of a line settles nothing.

    Args:
        uncertainty: The classifier's uncertainty summary ("unsure", "reasons", ...).
        prediction: The combined class ("A", "B" or "C"), which the line's height gives.
        height_mm: The located line's height above the plafond (mm).

    Example:
        >>> u = settled_by_line({"unsure": True, "reasons": ["only 55 %"]}, "B", 12.0)
        >>> u["unsure"], u["reasons"], u["classifier_reasons"]
        (False, [], ['only 55 %'])
    """
    u = dict(uncertainty or {})
    if not u.get("unsure"):
        return u
    u["classifier_reasons"] = [str(r) for r in u.get("reasons", [])]
    u.update(unsure=False, reasons=[],
             settled_by=f"the classifier alone was unsure, but the fibular fracture line "
                        f"located {height_mm:+.1f} mm from the plafond lies at the Weber "
                        f"{prediction} level")
    return u


def gate_classification(findings: Sequence[Finding], result: Any) -> Dict[str, Any]:
    """The classification as it may be shown, given the findings.

    Any refusal withholds it: ``prediction`` and ``probabilities`` are None and
    ``withheld_reason`` says why. Warnings whose code is in :data:`UNSURE_CODES` mark a delivered
    class *unsure*, their messages joining the uncertainty's reasons.

    Args:
        findings: All findings of the run.
        result: A :class:`~AnkleFractureLib.classification.inference.ClassificationResult`, a
            dict with "probabilities", "prediction", "uncertainty" (and "gradcam_class", and
            "line_confirms": a fracture line was located at the answer's level, which settles
            the warnings in :data:`SETTLED_BY_A_LOW_LINE` for a Weber A or B answer), or None
            when the classifier did not run.

    Returns:
        {"probabilities": {class: p} (sums to 1) or None, "prediction": str or None,
        "uncertainty": dict with "unsure" and "reasons", "gradcam_class", "withheld_reason":
        str or None}.

    Example:
        >>> res = {"probabilities": {"none": 0.1, "A": 0.1, "B": 0.7, "C": 0.1},
        ...        "prediction": "B", "uncertainty": {"unsure": False, "reasons": []}}
        >>> gate_classification([Finding("refusal", "x", "no fibula")], res)["prediction"]
        >>> g = gate_classification([Finding("warning", "metal", "metal")], res)
        >>> g["prediction"], g["uncertainty"]["unsure"], g["uncertainty"]["reasons"]
        ('B', True, ['metal'])
    """
    refused = refusals(findings)
    if result is not None and not isinstance(result, dict):
        result = {"probabilities": result.probabilities, "prediction": result.prediction,
                  "uncertainty": result.uncertainty,
                  "gradcam_class": getattr(result, "gradcam_class", None)}
    if refused or result is None:
        reason = ("; ".join(f.message for f in refused) if refused
                  else "the classification did not run")
        return {"probabilities": None, "prediction": None,
                "uncertainty": {"unsure": True, "reasons": [f"withheld: {reason}"]},
                "gradcam_class": None, "withheld_reason": reason}
    names = list(result["probabilities"])
    p = np.asarray([float(result["probabilities"][c]) for c in names], dtype=np.float64)
    p = p / p.sum()  # exact: the float32 softmax sums to 1 only to ~1e-7
    uncertainty = dict(result.get("uncertainty") or {})
    reasons = [str(r) for r in uncertainty.get("reasons", [])]
    settled = (SETTLED_BY_A_LOW_LINE if result.get("line_confirms")
               and result.get("prediction") in ("A", "B") else frozenset())
    flagged = [f.message for f in findings if f.level == WARNING and f.code in UNSURE_CODES
               and f.code not in settled]
    uncertainty["unsure"] = bool(uncertainty.get("unsure", False)) or bool(flagged)
    uncertainty["reasons"] = reasons + flagged
    return {"probabilities": {c: float(v) for c, v in zip(names, p)},
            "prediction": result["prediction"], "uncertainty": uncertainty,
            "gradcam_class": result.get("gradcam_class"), "withheld_reason": None}
