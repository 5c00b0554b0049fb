"""Locate and measure the fibular fracture line on a syndesmosis crop.

The localiser network (:mod:`.network`) reads the fibula window of the crop (:mod:`.window`)
and returns, per voxel, the probability of lying on the fibular fracture line. From it:

* ``candidates``: every connected line (voxels above ``threshold``) of at least
  :data:`CANDIDATE_MIN_VOXELS` voxels, with its size, probabilities, cut and section ratio and
  height (:func:`line_candidates`). Lines that reach the scan's edge and voxels next to metal
  are not candidates (:func:`ignored_zones`);
* ``found`` / ``probability``: the reported line and its peak probability. With a line rule in
  plans.json (``decision["select"]``, e.g. the fitted line model "scored") the line that
  :func:`~AnkleFractureLib.fracture.weber_height.combine_lines` reports given the classifier;
  without one, the strongest line, found when it reaches ``found_threshold`` and
  ``min_voxels``;
* ``center_lps``: the probability-weighted centre of that line (patient LPS mm);
* ``height_mm``: its signed distance above the tibial plafond along the tibial long axis, both
  taken from the patient's registration to the template (template z axis and plafond mapped
  into the patient: true patient mm, the similarity's scale undone); negative below;
* ``extent``: the line's length along its main direction and the heights it spans (mm).

A model folder holds ``plans.json`` (network, window, thresholds, the crop arrays it reads:
``channels``, names of :data:`~AnkleFractureLib.crop.syndesmosis.ALL_CHANNELS`) and ``model.pt``
(float16 weights, the format of every model of the project).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from AnkleFractureLib.errors import InputError, PathLike
from AnkleFractureLib.fracture.window import WINDOW_YX, Window, fibula_window

KIND = "fracture_localiser"
#: Lines that come this close (mm) to the scan's edge are ignored, whole: a bone cut by the
#: edge of the field of view ends in a flat face that looks like a transverse fracture, and a
#: line cut by the edge could not be measured anyway.
EDGE_MM = 4.5
#: Line voxels this close (mm) to metal are ignored: screws cross the bone like fracture lines,
#: and their streaks add dark bands.
METAL_MM = 3.0
#: Default thresholds (plans.json "decision"). ``min_cut``: the fraction of the fibula below a
#: line that the line must cut off from the fibula above it (:func:`cut_fraction`); 0 keeps
#: every line (the rule of models fitted before it existed).
DEFAULT_DECISION = {"threshold": 0.5, "found_threshold": 0.5, "min_voxels": 6, "min_cut": 0.0}
#: Lines listed in ``result.json["fracture"]["candidates"]``: at least this many voxels, at most
#: this many lines (the found line among them).
CANDIDATE_MIN_VOXELS = 30
CANDIDATE_LIMIT = 5


def default_model_dir() -> Path:
    """The shipped localiser (``Resources/Models/fracture``)."""
    from AnkleFractureLib.resources import resources_dir

    return resources_dir() / "Models" / "fracture"


@dataclass
class FractureFinding:
    """The located fibular fracture (``result.json["fracture"]``).

    Attributes:
        found: Whether a fibular fracture line was found.
        probability: With the line model: the reported line's probability of being the
            fracture (the highest among the candidates when none is reported); else the peak
            line probability of the strongest line (0-1).
        height_mm: Height of the line's centre above the plafond (mm), None if not found.
        center_lps: [x, y, z] patient LPS mm of the line's centre, None if not found.
        extent: {"length_mm", "height_min_mm", "height_max_mm", "voxels"} or None.
        heatmap: float32 (z, y, x) line probability on the crop grid (not in JSON).
        line: uint8 (z, y, x) the found line on the crop grid (not in JSON).
        size_factor: Patient size / template size (1 / registration scale).
        model: {"name", "sha256"} of the localiser.
        ignored: Line voxels (probability above the threshold) left out: {"scan_edge": those
            of lines that reach the scan's edge, "metal": those next to metal}.
        candidates: Every line the localiser saw (:func:`line_candidates`, strongest first),
            each with its ``height_mm`` and ``found`` (whether it is the found line), so that a
            reader can check the lines that were not chosen.
    """

    found: bool
    probability: float
    height_mm: Optional[float]
    center_lps: Optional[List[float]]
    extent: Optional[Dict[str, float]]
    heatmap: np.ndarray = field(repr=False, default=None)
    line: np.ndarray = field(repr=False, default=None)
    size_factor: float = 1.0
    model: Dict[str, Any] = field(default_factory=dict)
    ignored: Dict[str, int] = field(default_factory=dict)
    candidates: List[Dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> Dict[str, Any]:
        """The JSON-ready entry (no arrays)."""
        return {"found": bool(self.found), "probability": round(float(self.probability), 4),
                "height_mm": None if self.height_mm is None else round(float(self.height_mm), 2),
                "center_lps": None if self.center_lps is None else [round(float(v), 2)
                                                                   for v in self.center_lps],
                "extent": self.extent, "size_factor": round(float(self.size_factor), 4),
                "ignored_voxels": dict(self.ignored), "model": self.model,
                "candidates": [dict(c) for c in self.candidates]}


def _components(prob: np.ndarray, threshold: float) -> Tuple[np.ndarray, int]:
    from scipy import ndimage

    return ndimage.label(prob > threshold, structure=np.ones((3, 3, 3), bool))


def ignored_zones(in_scan: Optional[np.ndarray], metal: Optional[np.ndarray],
                  spacing_mm: float) -> Dict[str, np.ndarray]:
    """Where a line on the crop grid is not a fracture: the scan's edge and around metal.

    Args:
        in_scan: bool (z, y, x): crop voxel inside the CT's field of view (None: unknown).
        metal: bool (z, y, x): metal there (None: unknown).
        spacing_mm: The crop's (isotropic) voxel size, mm.

    Returns:
        {"scan_edge": bool (z, y, x), "metal": bool (z, y, x)} for the masks given: outside
        the scan or within :data:`EDGE_MM` of its edge (the crop's own border is not an edge);
        within :data:`METAL_MM` of metal.

    Example:
        >>> m = np.ones((10, 4, 4), bool); m[7:] = False
        >>> ignored_zones(m, None, 1.5)["scan_edge"][:, 0, 0].astype(int).tolist()
        [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    """
    from scipy import ndimage

    out: Dict[str, np.ndarray] = {}
    if in_scan is not None and not np.all(in_scan):
        r = max(int(round(EDGE_MM / spacing_mm)), 1)
        out["scan_edge"] = ~ndimage.binary_erosion(in_scan, iterations=r, border_value=1)
    if metal is not None and np.any(metal):
        r = max(int(round(METAL_MM / spacing_mm)), 1)
        out["metal"] = ndimage.binary_dilation(metal, iterations=r)
    return out


def drop_touching(prob: np.ndarray, threshold: float, zone: np.ndarray) -> int:
    """Zero, in place, every connected line (voxels above ``threshold``) that reaches ``zone``.

    Returns:
        How many line voxels were dropped.
    """
    lab, n = _components(prob, threshold)
    if n == 0:
        return 0
    hit = np.unique(lab[zone & (lab > 0)])
    drop = np.isin(lab, hit[hit > 0])
    prob[drop | zone] = 0.0
    return int(drop.sum())


def cut_fraction(fibula: np.ndarray, line: np.ndarray, margin: int = 1, grow: int = 2) -> float:
    """How completely a line cuts the fibula in two: the fraction of the fibula below the line
    that is no longer connected to the fibula above it once the line (grown by ``grow``
    voxels, which closes the narrow bridges a segmentation leaves across a fracture gap) is
    removed.

    A fracture line crosses the bone: the fragment below it is cut off (1.0). The surface of
    the malleolus tip against the talus, a screw, or a vessel groove only shaves the bone
    (about 0). "Below" and "above" are along the crop's z (the tibial long axis), ``margin``
    voxels beyond the line's lowest and highest slice. A line that reaches the crop's first or
    last slice cannot be tested (what lies beyond is not in the crop): 1.0.

    Args:
        fibula: bool (z, y, x) fibula mask on the crop grid.
        line: bool (z, y, x) one connected line.
        margin: Slices left out next to the line.
        grow: Voxels by which the line is grown before it is removed.

    Returns:
        The fraction (0-1); 0 when there is no fibula below or above the line.

    Example:
        >>> fib = np.zeros((20, 5, 5), bool); fib[:, 1:4, 1:4] = True
        >>> line = np.zeros_like(fib); line[10, :, :] = True
        >>> cut_fraction(fib, line)
        1.0
        >>> groove = np.zeros_like(fib); groove[10, 0:1, 0:1] = True
        >>> cut_fraction(fib, groove)
        0.0
    """
    from scipy import ndimage

    kk = np.nonzero(line)[0]
    if kk.size == 0:
        return 0.0
    if kk.min() == 0 or kk.max() == line.shape[0] - 1:
        return 1.0
    kept = fibula & ~ndimage.binary_dilation(line, iterations=grow)
    below, above = kept.copy(), kept.copy()
    below[max(int(kk.min()) - margin, 0):] = False
    above[:int(kk.max()) + margin + 1] = False
    n_below = int(below.sum())
    if n_below == 0 or not above.any():
        return 0.0
    lab, _ = ndimage.label(kept, structure=np.ones((3, 3, 3), bool))
    up = np.unique(lab[above])
    joined = int((np.isin(lab, up[up > 0]) & below).sum())
    return float(1.0 - joined / n_below)


def cut_depth(fibula: np.ndarray, line: np.ndarray, margin: int = 1, grow: int = 2) -> float:
    """How deep a line cuts into the fibula's section: 1 minus the smallest fraction of the
    section left, over the line's slices, once the line (grown by ``grow`` voxels) is removed.

    :func:`cut_fraction` asks whether the bone falls in two, which a segmentation that fills
    part of a hairline's gap defeats: a Weber C hairline of a held-out real-shape phantom,
    marked at its true height, left 1-3 of the 26-28 fibula voxels of each slice, enough to
    keep the bone connected (cut fraction 0.008), while its depth is 0.96. A groove or a line
    along the surface leaves most of the section (depth near 0). As for :func:`cut_fraction`,
    a line with no fibula ``margin`` slices below or above it gives 0 (the malleolus tip), and
    one that reaches the crop's first or last slice cannot be tested: 1.0.

    Args:
        fibula: bool (z, y, x) fibula mask on the crop grid.
        line: bool (z, y, x) one connected line.
        margin: Slices beyond the line's lowest and highest that must hold fibula.
        grow: Voxels by which the line is grown before it is removed.

    Returns:
        The depth (0-1).

    Example:
        >>> fib = np.zeros((20, 5, 5), bool); fib[:, 1:4, 1:4] = True
        >>> line = np.zeros_like(fib); line[10, :, :] = True
        >>> cut_depth(fib, line)
        1.0
        >>> almost = line.copy(); almost[10, 3, 3] = False
        >>> round(cut_depth(fib, almost, grow=0), 3)
        0.889
    """
    from scipy import ndimage

    kk = np.nonzero(line)[0]
    if kk.size == 0:
        return 0.0
    lo, hi = int(kk.min()), int(kk.max())
    if lo == 0 or hi == line.shape[0] - 1:
        return 1.0
    if not fibula[:max(lo - margin, 0)].any() or not fibula[hi + margin + 1:].any():
        return 0.0
    removed = ndimage.binary_dilation(line, iterations=grow) if grow > 0 else line
    section = fibula[lo:hi + 1].reshape(hi + 1 - lo, -1)
    left = (fibula[lo:hi + 1] & ~removed[lo:hi + 1]).reshape(hi + 1 - lo, -1)
    areas = section.sum(axis=1)
    has = areas > 0
    if not has.any():
        return 0.0
    return float(1.0 - np.min(left.sum(axis=1)[has] / areas[has]))


def strongest_line(prob: np.ndarray, threshold: float, fibula: Optional[np.ndarray] = None,
                   min_cut: float = 0.0, min_voxels: int = 30) -> Tuple[np.ndarray, float]:
    """The connected set of voxels above ``threshold`` with the largest summed probability.

    Args:
        prob: Probability map (z, y, x).
        threshold: Voxel threshold.
        fibula: bool (z, y, x) fibula mask; with ``min_cut`` > 0, only lines of at least
            ``min_voxels`` voxels whose :func:`cut_fraction` reaches ``min_cut`` compete.
        min_cut: See ``fibula``.
        min_voxels: See ``fibula`` (smaller pieces are never "found" lines anyway).

    Returns:
        (bool mask of that line (all False when none), its peak probability; the map's peak
        when no voxel passes).
    """
    lab, n = _components(prob, threshold)
    if n == 0:
        return np.zeros(prob.shape, bool), float(prob.max()) if prob.size else 0.0
    from scipy import ndimage

    sums = ndimage.sum_labels(prob, lab, index=np.arange(1, n + 1))
    if fibula is not None and min_cut > 0:
        sizes = ndimage.sum_labels(np.ones(prob.shape, np.int32), lab, np.arange(1, n + 1))
        for i in np.nonzero(sums > 0)[0]:
            if sizes[i] < min_voxels or cut_fraction(fibula, lab == i + 1) < min_cut:
                sums[i] = 0.0
        if not np.any(sums > 0):
            return np.zeros(prob.shape, bool), float(prob.max())
    best = int(np.argmax(sums)) + 1
    mask = lab == best
    return mask, float(prob[mask].max())


def section_ratio(fibula: np.ndarray, line: np.ndarray) -> float:
    """Line voxels per voxel of the fibula's cross-section where the line lies.

    A line through the whole bone holds about (line thickness in voxels) / cos(tilt) times the
    bone's cross-section, whatever the bone's width: a thin distal shaft gives a small line that
    is still complete. A groove or a speck at the malleolus tip gives a small fraction.

    Args:
        fibula: bool (z, y, x) fibula mask on the crop grid.
        line: bool (z, y, x) one line.

    Returns:
        voxels(line) / median fibula voxels per slice over the line's slices (0 when the
        fibula is absent there).

    Example:
        >>> fib = np.zeros((20, 5, 5), bool); fib[:, 1:4, 1:4] = True
        >>> line = np.zeros_like(fib); line[10:12, 1:4, 1:4] = True
        >>> section_ratio(fib, line)
        2.0
    """
    kk = np.unique(np.nonzero(line)[0])
    if kk.size == 0:
        return 0.0
    areas = fibula[kk].reshape(kk.size, -1).sum(axis=1)
    areas = areas[areas > 0]
    return float(line.sum() / np.median(areas)) if areas.size else 0.0


def line_candidates(prob: np.ndarray, threshold: float, fibula: Optional[np.ndarray],
                    min_voxels: int = CANDIDATE_MIN_VOXELS, limit: int = CANDIDATE_LIMIT
                    ) -> List[Tuple[np.ndarray, Dict[str, float]]]:
    """Every connected line of at least ``min_voxels`` voxels, strongest first.

    Args:
        prob: Probability map (z, y, x).
        threshold: Voxel threshold.
        fibula: bool (z, y, x) fibula mask on the crop grid (None: no cut or section figures).
        min_voxels: Smallest line listed.
        limit: Most lines listed.

    Returns:
        [(bool mask, {"voxels", "mass" (summed probability), "probability" (peak),
        "cut_fraction", "cut_depth", "section_ratio"})], by decreasing mass.
    """
    from scipy import ndimage

    lab, n = _components(prob, threshold)
    if n == 0:
        return []
    idx = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(np.ones(prob.shape, np.int32), lab, idx)
    sums = ndimage.sum_labels(prob, lab, idx)
    peaks = ndimage.maximum(prob, lab, idx)
    out = []
    for i in np.argsort(-sums):
        if sizes[i] < min_voxels or len(out) >= limit:
            continue
        mask = lab == i + 1
        stats = {"voxels": int(sizes[i]), "mass": round(float(sums[i]), 2),
                 "probability": round(float(peaks[i]), 4)}
        if fibula is not None:
            stats["cut_fraction"] = round(cut_fraction(fibula, mask), 3)
            stats["cut_depth"] = round(cut_depth(fibula, mask), 3)
            stats["section_ratio"] = round(section_ratio(fibula, mask), 3)
        out.append((mask, stats))
    return out


def patient_axis(patient_to_template: np.ndarray, plafond_template: np.ndarray
                 ) -> Tuple[np.ndarray, np.ndarray, float]:
    """(plafond LPS (3,), unit tibial long axis LPS (3,), size factor patient/template) from
    the registration (4x4 patient LPS mm -> template mm) and the template's plafond (mm): what
    every fracture height is measured along."""
    t2p = np.linalg.inv(np.asarray(patient_to_template, float))
    plafond = t2p[:3, :3] @ np.asarray(plafond_template, float) + t2p[:3, 3]
    axis = t2p[:3, :3] @ np.array([0.0, 0.0, 1.0])
    size_factor = float(np.linalg.norm(axis))
    return plafond, axis / size_factor, size_factor


def crop_points(mask: np.ndarray, grid: Any, patient_to_template: np.ndarray) -> np.ndarray:
    """(k, 3) patient LPS mm of the voxels of ``mask`` (bool (z, y, x) on the crop ``grid``,
    whose physical space is template mm), through the registration (4x4 patient LPS mm ->
    template mm); in ``np.nonzero`` order."""
    kk, jj, ii = np.nonzero(mask)
    pts_t = grid.index_to_physical(np.stack([ii, jj, kk], axis=1).astype(float))
    t2p = np.linalg.inv(np.asarray(patient_to_template, float))
    return pts_t @ t2p[:3, :3].T + t2p[:3, 3]


def measure_line(mask: np.ndarray, prob: np.ndarray, grid: Any, patient_to_template: np.ndarray,
                 plafond_template: np.ndarray) -> Tuple[np.ndarray, float, Dict[str, float], float]:
    """Centre (LPS), height above the plafond and extent of a line on the crop grid.

    Args:
        mask: bool (z, y, x) line voxels on the crop grid.
        prob: Probabilities (z, y, x) (weights of the centre).
        grid: The crop grid Volume (template mm).
        patient_to_template: 4x4 patient LPS mm -> template mm.
        plafond_template: (3,) template mm of the plafond.

    Returns:
        (centre LPS (3,), height mm, extent dict, size factor patient/template).
    """
    w = prob[np.nonzero(mask)].astype(float)
    pts = crop_points(mask, grid, patient_to_template)
    centre = (pts * w[:, None]).sum(axis=0) / w.sum()
    plafond, axis, size_factor = patient_axis(patient_to_template, plafond_template)
    heights = (pts - plafond) @ axis
    height = float((centre - plafond) @ axis)
    centred = pts - centre
    main = np.linalg.svd(centred, full_matrices=False)[2][0] if len(pts) > 1 else axis
    along = centred @ main
    extent = {"length_mm": round(float(along.max() - along.min()) if len(pts) else 0.0, 2),
              "height_min_mm": round(float(heights.min()), 2),
              "height_max_mm": round(float(heights.max()), 2), "voxels": int(len(pts))}
    return centre, height, extent, size_factor


#: Candidate lines a reader is shown besides the reported one (report, Slicer panel): at
#: most this many, with a line probability of at least :data:`OTHER_LINE_MIN`.
OTHER_LINES = 3
OTHER_LINE_MIN = 0.1


def describe_other_lines(fracture: Optional[Dict[str, Any]]) -> Optional[str]:
    """The candidate lines the answer did not report, in words, for the reader to check (only
    with the line model, whose candidates carry a line probability), or None.

    Args:
        fracture: ``result.json["fracture"]`` (or None).

    Example:
        >>> describe_other_lines({"candidates": [
        ...     {"found": True, "height_mm": 14.2, "line_probability": 0.93},
        ...     {"found": False, "height_mm": 47.1, "line_probability": 0.47},
        ...     {"found": False, "height_mm": -12.0, "line_probability": 0.12},
        ...     {"found": False, "height_mm": -20.0, "line_probability": 0.02}]})
        'other candidate lines: 47.1 mm above (47 %), 12.0 mm below (12 %)'
    """
    others = [c for c in (fracture or {}).get("candidates") or []
              if not c.get("found") and float(c.get("line_probability", 0.0)) >= OTHER_LINE_MIN]
    if not others:
        return None
    others = sorted(others, key=lambda c: -float(c["line_probability"]))[:OTHER_LINES]
    text = ", ".join(f"{abs(float(c['height_mm'])):.1f} mm "
                     f"{'above' if float(c['height_mm']) >= 0 else 'below'} "
                     f"({100 * float(c['line_probability']):.0f} %)" for c in others)
    return f"other candidate lines: {text}"


class FractureLocaliser:
    """A loaded localiser.

    Args:
        network: The network (eval mode).
        plans: plans.json content ({"network", "window_yx", "decision", ...}).
        device: torch device.
        model_dir: Where it was loaded from.
    """

    def __init__(self, network: Any, plans: Dict[str, Any], device: Any,
                 model_dir: Optional[Path] = None,
                 upper: Optional[Tuple[Any, Sequence[str]]] = None) -> None:
        self.network, self.plans, self.device = network, plans, device
        self.model_dir = model_dir
        #: (network, its crop arrays) of the windows above the box, when it has its own.
        self.upper = None if upper is None else (upper[0], tuple(upper[1]))
        self.decision = {**DEFAULT_DECISION, **plans.get("decision", {})}
        self.window_yx = tuple(plans.get("window_yx", WINDOW_YX))
        self.channels = tuple(plans.get("channels", ("ct", "tibia", "fibula")))

    def inputs(self, crop: Any) -> np.ndarray:
        """The crop arrays this localiser reads (float32 (C, z, y, x), the crop's own 3
        channels when it needs no more): what :meth:`heatmap` takes. Arrays are in the order
        of :data:`~AnkleFractureLib.crop.syndesmosis.ALL_CHANNELS` up to the last one read;
        those before it that no network reads are zero (they are not computed)."""
        names = self._all_channels()
        if any(n not in ("ct", "tibia", "fibula") for n in names):
            from AnkleFractureLib.crop.syndesmosis import ALL_CHANNELS

            highest = max(ALL_CHANNELS.index(n) for n in names)
            prefix = ALL_CHANNELS[:highest + 1]
            read = [n for n in prefix if n in names or n in ("ct", "tibia", "fibula")]
            out = np.zeros((len(prefix),) + tuple(crop.channels.shape[1:]), np.float32)
            out[[prefix.index(n) for n in read]] = crop.stacked(read)
            return out
        return np.asarray(crop.channels, np.float32)

    def _all_channels(self) -> Tuple[str, ...]:
        """The crop arrays this localiser's networks read (its own, then the upper
        network's), each once."""
        extra = self.upper[1] if self.upper is not None else ()
        return tuple(dict.fromkeys(self.channels + tuple(extra)))

    @classmethod
    def load(cls, model_dir: Optional[PathLike] = None, device: str = "auto"
             ) -> "FractureLocaliser":
        """Load a model folder (the shipped one when None).

        Raises:
            InputError: Missing or damaged files (the message names the file).
        """
        from AnkleFractureLib.fracture.model_io import load_localiser, load_upper_network
        from AnkleFractureLib.segmentation.inference import resolve_device

        folder = Path(model_dir) if model_dir is not None else default_model_dir()
        dev = resolve_device(device)
        network, plans = load_localiser(folder, dev)
        return cls(network, plans, dev, folder, load_upper_network(folder, plans, dev))

    @property
    def extend_top_mm(self) -> float:
        """How far (template mm) above the classifier's box this localiser reads
        (plans.json ``inference.extend_top_mm``; 0 for earlier plans)."""
        return float((self.plans.get("inference") or {}).get("extend_top_mm", 0.0))

    @property
    def upper_window(self) -> bool:
        """Whether the part of a taller crop above the box is read as windows of their own
        (plans.json ``inference.upper_window``; see :meth:`heatmap`)."""
        return bool((self.plans.get("inference") or {}).get("upper_window", False))

    @property
    def phases_mm(self) -> List[Tuple[float, float, float]]:
        """Grid offsets (box x, y, z mm) at which the box is read again beside its own grid
        (plans.json ``inference.phases_mm``; none for earlier plans; see :mod:`.phases`)."""
        from AnkleFractureLib.fracture.phases import check_offsets

        return check_offsets((self.plans.get("inference") or {}).get("phases_mm"))

    def density_for(self, ct: Any, label: Any, patient_to_template: np.ndarray,
                    plafond_template: np.ndarray) -> Any:
        """The CT measure across the candidate lines (:class:`~.line_density.LineDensity`,
        on the grid of ``decision.density_grid_mm``) when this localiser's plans ask for it
        (:func:`~.weber_height.measures_density`), else None: what :meth:`locate` takes as
        ``density``.

        Args:
            ct: The CT (HU).
            label: The analysed leg's label map on the CT's grid (fibula = 2).
            patient_to_template: 4x4 patient LPS mm -> template mm.
            plafond_template: (3,) template mm of the plafond (``template.plafond``).
        """
        from AnkleFractureLib.fracture.weber_height import measures_density

        if not measures_density(self.decision):
            return None
        from AnkleFractureLib.fracture.line_density import LineDensity

        axis = patient_axis(patient_to_template, plafond_template)[1]
        return LineDensity(ct, np.asarray(label.array) == 2, patient_to_template, axis,
                           self.decision.get("density_grid_mm"))

    def crop_for(self, ct: Any, label: Any, patient_to_template: np.ndarray, template: Any,
                 crop: Any = None) -> Any:
        """The crop this localiser reads: the template's syndesmosis box, made
        :attr:`extend_top_mm` taller at its top (same grid spacing and axes).

        Weber C lines reach 100 mm above the plafond, which in a small patient (the
        registration scales a leg by up to 1.3) lies at 130 template mm, above the top of the
        classifier's box (109 mm): there a line cannot be found in the classifier's crop (a
        validation case whose Weber C line lay at 120 template mm: not found in the box;
        found, 5 mm from the truth, in the taller crop). Off in the shipped plans: the
        network's instance normalisation makes every output depend on the whole input, so the
        taller crop also changes lines far below its new part, and on the validation sets the
        accuracy stayed the same (docs/fracture/experiments/line_rule_v3).

        Args:
            ct: The CT (HU).
            label: The analysed leg's label map on the CT's grid.
            patient_to_template: 4x4 patient LPS mm -> template mm.
            template: The template (its ``box``).
            crop: The classifier's crop, returned as it is when no extension is asked for.

        Returns:
            A :class:`~AnkleFractureLib.crop.syndesmosis.SyndesmosisCrop`.
        """
        import dataclasses

        from AnkleFractureLib.crop.syndesmosis import crop_syndesmosis
        from AnkleFractureLib.fracture.phases import offset_voxels, shifted_template

        top = self.extend_top_mm
        if top <= 0.0 and crop is not None:
            out = self._with_fine_arrays(ct, crop)
        else:
            box = template.box
            taller = dataclasses.replace(box, centre=box.centre + box.axes[:, 2] * top / 2.0,
                                         size_mm=box.size_mm + np.array([0.0, 0.0, top]))
            template = dataclasses.replace(template, box=taller)
            out = self._with_fine_arrays(ct, crop_syndesmosis(ct, label, patient_to_template,
                                                             template))
            # The window stays centred as on the classifier's box (see heatmap).
            out.meta["box_slices"] = int(box.shape[0])
        phases = []
        for d in self.phases_mm:
            moved = crop_syndesmosis(ct, label, patient_to_template, shifted_template(template, d))
            moved.meta.update({k: v for k, v in out.meta.items() if k == "box_slices"})
            phases.append((offset_voxels(d, template.box.spacing_mm),
                           self._with_fine_arrays(ct, moved)))
        if phases:
            out = dataclasses.replace(out, phases=phases)
        return out

    def _with_fine_arrays(self, ct: Any, crop: Any) -> Any:
        """``crop`` with its min-pooled and sub-voxel bone-window CT added when a network
        reads them (they cost a sampling of the CT 27 and 8 times finer, so only then)."""
        from AnkleFractureLib.crop.syndesmosis import (SUB_CHANNELS, min_pooled_bone,
                                                       sub_sampled_bone)

        names = self._all_channels()
        if "ct_bone_min" in names and getattr(crop, "ct_bone_min", None) is None:
            crop.ct_bone_min = min_pooled_bone(ct, crop)
        if any(n in SUB_CHANNELS for n in names) and getattr(crop, "ct_bone_sub", None) is None:
            crop.ct_bone_sub = sub_sampled_bone(ct, crop)
        return crop

    def heatmap(self, channels: np.ndarray, centre_slices: Optional[int] = None
                ) -> Tuple[np.ndarray, Window]:
        """Line probability on the crop grid.

        Args:
            channels: Crop arrays (C, z, y, x) in the order of
                :data:`~AnkleFractureLib.crop.syndesmosis.ALL_CHANNELS` (CT [0, 1], tibia,
                fibula, then the bone-window CT and its min-pooled form, as far as the
                localiser reads; C = 3 for one that reads no more, see :meth:`inputs`). The
                network reads the plans' ``channels`` of them.
            centre_slices: Centre the window on the fibula of the lowest this many slices
                (the classifier's box within a taller crop: the window then lies where it
                lies on that box); None: all. With ``inference.upper_window`` in the plans,
                the slices above these are read as windows of their own
                (:meth:`_stacked_windows`).

        Returns:
            (float32 (z, y, x) probability on the crop grid (0 outside the window), window).
        """
        from AnkleFractureLib.crop.syndesmosis import ALL_CHANNELS

        need = [ALL_CHANNELS.index(c) for c in self.channels]
        names = self._all_channels()
        highest = max(ALL_CHANNELS.index(c) for c in names)
        if channels.ndim != 4 or channels.shape[0] < highest + 1:
            raise InputError(None, f"the localiser reads the crop arrays {list(names)}; "
                                   f"got an array of shape {tuple(channels.shape)} "
                                   f"(needs (C, z, y, x) in the order {list(ALL_CHANNELS)})")
        if self.upper_window and centre_slices and channels.shape[1] > centre_slices:
            return self._stacked_windows(channels, int(centre_slices))
        win = fibula_window(channels[2][:centre_slices], self.window_yx)
        return self._read(self.network, win, np.asarray(channels, np.float32)[need]), win

    def _read(self, network: Any, win: Window, picked: np.ndarray) -> np.ndarray:
        """Line probability (z, y, x) of ``network`` on one window of ``picked`` (its input
        channels (C, z, y, x)), pasted on ``picked``'s grid."""
        import torch

        x = torch.from_numpy(win.extract(picked)[None]).to(self.device)
        with torch.no_grad():
            prob = torch.sigmoid(network(x))[0, 0].float().cpu().numpy()
        return win.paste(prob, picked.shape[1:])

    def _stacked_windows(self, channels: np.ndarray, box_slices: int
                         ) -> Tuple[np.ndarray, Window]:
        """Line probability of a crop taller than the classifier's box, read in windows of the
        box's height stacked upwards (plans.json ``inference.upper_window``).

        The lowest window is the box itself, read by this localiser's network, so below the
        box's top the output is the one it gives on the box, voxel for voxel (its instance
        normalisation sees the same input). Each higher window ends at the crop's top (or one
        box height higher) and speaks only for the slices no lower window covers; it is read
        by the upper-window network when the plans name one (``upper_window: {"file": ...}``,
        trained on the box moved up: train-fracture --crop-shift-mm), else by the same
        network; it is centred on the fibula of its own slices, as a training window is, and
        is not read when those slices hold no fibula (the scan or the leg ends below them).

        Args:
            channels: The taller crop's arrays (C, z, y, x), as :meth:`heatmap` takes them.
            box_slices: Slices of the classifier's box (the lowest ones).

        Returns:
            (probability (z, y, x) on the crop grid, the lowest window).
        """
        from AnkleFractureLib.crop.syndesmosis import ALL_CHANNELS

        arrays = np.asarray(channels, np.float32)
        fibula, nz = arrays[2], arrays.shape[1]
        own = arrays[[ALL_CHANNELS.index(c) for c in self.channels]]
        net, names = self.upper or (self.network, self.channels)
        above = arrays[[ALL_CHANNELS.index(c) for c in names]]
        prob = np.zeros(arrays.shape[1:], np.float32)
        first = fibula_window(fibula[:box_slices], self.window_yx)
        prob[:box_slices] = self._read(self.network, first, own[:, :box_slices])
        done = box_slices
        while done < nz:
            start = min(done, nz - box_slices)
            end = start + box_slices
            if (fibula[done:end] > 0.5).any():
                win = fibula_window(fibula[start:end], self.window_yx)
                prob[done:end] = self._read(net, win, above[:, start:end])[done - start:]
            done = end
        return prob, first

    def locate(self, crop: Any, plafond_template: np.ndarray,
               classifier: Optional[Dict[str, float]] = None,
               density: Optional[Callable[[np.ndarray, Any], Dict[str, Any]]] = None
               ) -> FractureFinding:
        """Find and measure the fibular fracture line of a syndesmosis crop.

        With a line rule in plans.json (``decision["select"]``, see
        :func:`~AnkleFractureLib.fracture.weber_height.qualifying_lines`) every candidate line
        is tested and, given the classifier's probabilities, the reported line is the one
        :func:`~AnkleFractureLib.fracture.weber_height.combine_lines` reports (the strongest
        qualifying line without them). Without one, the strongest line is tested (the rule the
        earlier localisers were fitted with).

        Args:
            crop: A :class:`~AnkleFractureLib.crop.syndesmosis.SyndesmosisCrop`.
            plafond_template: (3,) template mm of the plafond (``template.plafond``).
            classifier: The classifier's probabilities {"none", "A", "B", "C"}, or None.
            density: With a dense-band test or a line model that reads the CT in the plans
                (:func:`~.weber_height.measures_density`): a
                :class:`~.line_density.LineDensity` of the CT, which gives every candidate
                its ``band_hu``, ``dip_hu`` and ``gap_hu`` (the CT across the line inside the
                fibula) before the lines are weighed; None: not measured.

        Returns:
            The finding (arrays on the crop grid).
        """
        from AnkleFractureLib.fracture.weber_height import (candidate_probability,
                                                            measures_density)

        prob, ignored = self._masked_heatmap(crop)
        model = {"name": "fracture", "sha256": self.plans.get("_sha256"),
                 "plans_sha256": self.plans.get("_plans_sha256")}
        scale = np.linalg.norm(np.asarray(crop.patient_to_template)[:3, 2])
        size_factor = 1.0 / float(scale)
        lines = line_candidates(prob, self.decision["threshold"], crop.channels[2] > 0.5)
        for mask, stats in lines:
            _, h, _, _ = measure_line(mask, prob, crop.grid, crop.patient_to_template,
                                      plafond_template)
            stats["height_mm"] = round(float(h), 2)
            if density is not None and measures_density(self.decision):
                measured = density(mask, crop.grid)
                stats.update({k: measured[k] for k in ("band_hu", "dip_hu", "gap_hu")})
            if "line_model" in self.decision:
                stats["line_probability"] = round(candidate_probability(stats, self.decision), 4)
        if "select" in self.decision:
            mask, peak = self._chosen_line(prob, lines, classifier, size_factor)
            found = bool(mask.any())
        else:
            mask, peak = strongest_line(prob, self.decision["threshold"], crop.channels[2] > 0.5,
                                        float(self.decision["min_cut"]))
            found = bool(peak >= self.decision["found_threshold"]
                         and mask.sum() >= self.decision["min_voxels"])
        finding = FractureFinding(found, peak, None, None, None, prob, mask.astype(np.uint8),
                                  size_factor, model, ignored)
        if found:
            c, h, ext, sf = measure_line(mask, prob, crop.grid, crop.patient_to_template,
                                         plafond_template)
            finding.center_lps, finding.height_mm, finding.extent = c.tolist(), h, ext
            finding.size_factor = sf
        else:
            finding.line = np.zeros(prob.shape, np.uint8)
        finding.candidates = [{**stats, "found": found and bool(np.any(m & mask))}
                              for m, stats in lines]
        return finding

    def _masked_heatmap(self, crop: Any) -> Tuple[np.ndarray, Dict[str, int]]:
        """The line probability with the scan's edge and metal left out, and what was."""
        prob = self._phase_heatmap(crop)
        zones = ignored_zones(getattr(crop, "in_scan", None), getattr(crop, "metal", None),
                              float(np.min(crop.grid.spacing)))
        thr = self.decision["threshold"]
        ignored = {}
        if "metal" in zones:  # voxels next to metal only: a fixated fracture keeps its line
            ignored["metal"] = int(((prob > thr) & zones["metal"]).sum())
            prob[zones["metal"]] = 0.0
        if "scan_edge" in zones:
            ignored["scan_edge"] = drop_touching(prob, thr, zones["scan_edge"])
        return prob, ignored

    def _phase_heatmap(self, crop: Any) -> np.ndarray:
        """The line probability of the crop, combined with that of its grid phases when it
        carries them (:meth:`crop_for`, plans.json ``inference.phase_combine``)."""
        from AnkleFractureLib.fracture.phases import back_on_grid, combine

        def read(c: Any) -> np.ndarray:
            return self.heatmap(self.inputs(c), (getattr(c, "meta", None) or {})
                                .get("box_slices"))[0]

        prob = read(crop)
        phases = getattr(crop, "phases", None) or []
        if not phases:
            return prob
        maps = [prob] + [back_on_grid(read(c), shift) for shift, c in phases]
        how = str((self.plans.get("inference") or {}).get("phase_combine", "mean"))
        return combine(maps, how)

    def _chosen_line(self, prob: np.ndarray, lines: List[Tuple[np.ndarray, Dict[str, Any]]],
                     classifier: Optional[Dict[str, float]], size_factor: float
                     ) -> Tuple[np.ndarray, float]:
        """(mask, probability) of the line the rule reports: its line probability with the
        line model ("scored"), else its peak probability. When no line is reported: an empty
        mask and the highest line probability (line model) or the map's peak."""
        from AnkleFractureLib.fracture.weber_height import combine_lines, qualifying_lines

        stats = [st for _, st in lines]
        if classifier is not None:
            _, chosen = combine_lines(classifier, stats, self.decision, size_factor)
        elif self.decision["select"] == "scored":
            min_q = float(self.decision.get("min_line_probability", 0.5))
            good = [st for st in stats if st["line_probability"] >= min_q]
            chosen = max(good, key=lambda st: st["line_probability"]) if good else None
        else:
            good = qualifying_lines(stats, self.decision)
            chosen = good[0] if good else None
        scored = self.decision["select"] == "scored"
        if chosen is None:
            if scored:  # the most probable line's chance of being the fracture
                return np.zeros(prob.shape, bool), max(
                    (float(st["line_probability"]) for st in stats), default=0.0)
            return np.zeros(prob.shape, bool), float(prob.max()) if prob.size else 0.0
        k = next(i for i, st in enumerate(stats) if st is chosen)
        return lines[k][0], float(stats[k]["line_probability" if scored else "probability"])

    def opinion(self, classifier: Dict[str, float], finding: FractureFinding) -> Any:
        """The Weber opinion of the classifier and this finding (:mod:`.weber_height`): with a
        line rule, every qualifying candidate line takes part; without, the found line alone.
        """
        from AnkleFractureLib.fracture.weber_height import combine, combine_lines

        if "select" in self.decision:
            return combine_lines(classifier, finding.candidates, self.decision,
                                 finding.size_factor)[0]
        return combine(classifier, finding.found, finding.probability, finding.height_mm,
                       finding.size_factor)
